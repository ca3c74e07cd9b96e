//! Frames that survive a crash behind a torn one must never be replayed
//! later, even when new frames line up with them exactly (the epoch rule).

use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::path::Path;
use std::sync::Arc;

fn opts() -> Options {
    // One log transaction per commit.
    Options { truncate_threshold: None, coalesce: false, ..Options::default() }
}

fn commit(rvm: &Rvm, r: &Region, off: usize, bytes: &[u8], mode: CommitMode) {
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    // SAFETY: single-threaded test; nothing else touches the region.
    unsafe { tx.modify_bytes(r.addr() + off, bytes).unwrap() };
    tx.commit(mode).unwrap();
}

#[test]
fn intact_frames_after_a_lost_one_stay_dead() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let log = Path::new("log");
    create_log_with(vfs.as_ref(), log, 256 << 10).unwrap();
    let area = rvm::log::format::AREA_OFFSET as usize;

    // Two transactions A then B written in one batch and synced together;
    // then pretend A was lost and B survived, as unsynced writes may
    // persist in any order (B's commit frame records that nothing after the
    // head was synced when it was written, so this is a torn end, not
    // damage: DESIGN.md 5).
    let (a_len, b_len);
    {
        let rvm = Rvm::open_with(vfs.clone(), log, opts()).unwrap();
        let seg = rvm.create_segment("seg", 4096).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
        let head = rvm.query().head as usize;
        commit(&rvm, &r, 0, b"AAAA", CommitMode::NoFlush);
        commit(&rvm, &r, 8, b"BBBB", CommitMode::Flush);
        disk.crash(CrashMode::LoseUnsynced);
        // A's record: the first one from the head.
        let (frames, _) = rvm::log::inspect::LogInspector::open_shared(vfs.as_ref(), log).unwrap().frames().unwrap();
        a_len = frames.iter().find(|f| f.len > 0).unwrap().len as usize;
        b_len = rvm.query().tail as usize - head - a_len;
        let mut img = disk.durable_image(log).unwrap();
        let start = area + head % (img.len() - area);
        img[start..start + a_len].fill(0);
        disk.set_durable_image(log, img);
    }
    assert!(b_len > 0);
    {
        let rvm = Rvm::open_with(vfs.clone(), log, opts()).unwrap();
        assert_eq!(rvm.recovery_report().transactions, 0, "B must not be replayed without A");
        let seg = rvm.open_segment("seg").unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
        // C has exactly A's size, so B's frames sit right where the reader
        // looks after C.
        commit(&rvm, &r, 0, b"CCCC", CommitMode::Flush);
        assert_eq!(rvm.query().tail - rvm.query().head, a_len as u64);
        disk.crash(CrashMode::LoseUnsynced);
    }
    let rvm = Rvm::open_with(vfs.clone(), log, opts()).unwrap();
    assert_eq!(rvm.recovery_report().transactions, 1);
    let seg = rvm.open_segment("seg").unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
    let mut b = [0u8; 12];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(0, &mut b) }.unwrap();
    assert_eq!(&b, b"CCCC\0\0\0\0\0\0\0\0");
}
