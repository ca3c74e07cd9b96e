//! Smoke test: a flush commit survives a crash on the simulated disk.
use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::path::Path;
use std::sync::Arc;

#[test]
fn commit_survives_crash_on_sim() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
    let opts = Options { truncate_threshold: None, ..Options::default() };
    {
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts.clone()).unwrap();
        let seg = rvm.create_segment("seg", 1 << 16).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        // SAFETY: single-threaded test; nothing else touches the region.
        unsafe { tx.modify_bytes(r.addr() + 100, b"durable").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        // SAFETY: as above.
        unsafe { tx.modify_bytes(r.addr() + 200, b"lost").unwrap() };
        tx.commit(CommitMode::NoFlush).unwrap();
        disk.crash(CrashMode::LoseUnsynced);
    }
    let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts).unwrap();
    assert_eq!(rvm.recovery_report().transactions, 1);
    let seg = rvm.open_segment("seg").unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
    let mut b = [0u8; 7];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(100, &mut b) }.unwrap();
    assert_eq!(&b, b"durable");
    let mut b = [0u8; 4];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(200, &mut b) }.unwrap();
    assert_eq!(b, [0; 4]);
}

/// Dropping the last handle shuts the instance down on the caller's thread,
/// even while the background truncator is busy: the files are unlocked and
/// pending no-flush commits flushed when `drop` returns.
#[test]
fn drop_releases_files_at_once_with_background_truncation() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
    let opts = Options { truncate_threshold: Some(0.05), pending_limit: 64 << 10, ..Options::default() };
    for round in 0..20u8 {
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts.clone()).unwrap();
        let seg =
            if round == 0 { rvm.create_segment("seg", 1 << 16).unwrap() } else { rvm.open_segment("seg").unwrap() };
        let r = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
        for i in 0..2000usize {
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: single-threaded test; nothing else touches the region.
            unsafe { tx.modify_bytes(r.addr() + (i * 64) % (1 << 16), &[round; 64]).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
        }
        rvm.flush().unwrap();
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: as above.
        unsafe { tx.modify_bytes(r.addr() + 8, b"last").unwrap() };
        tx.commit(CommitMode::NoFlush).unwrap();
        drop(r);
        drop(seg);
        drop(rvm);
        // Simulated power loss right after drop returns: the last no-flush
        // commit was flushed by drop.
        disk.crash(CrashMode::LoseUnsynced);
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts.clone()).unwrap();
        let seg = rvm.open_segment("seg").unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
        let mut b = [0u8; 4];
        // SAFETY: nothing stores into the region while the test reads it.
        unsafe { r.read(8, &mut b) }.unwrap();
        assert_eq!(&b, b"last", "round {round}");
    }
}

/// A region prints where it is and what it maps in a line (it printed the
/// instance's page bitmaps and locks: kilobytes for a large region).
#[test]
fn a_region_prints_briefly() {
    let dir = tempfile::tempdir().unwrap();
    create_log(dir.path().join("log"), 1 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 64 << 20).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 64 << 20)).unwrap();
    let line = format!("{r:?}");
    assert!(line.starts_with(&format!("Region {{ addr: {:#x}, len: {}", r.addr(), 64 << 20)), "{line}");
    assert!(line.contains("seg"), "{line}");
    assert!(line.len() < 300, "{} bytes: {line}", line.len());
}
