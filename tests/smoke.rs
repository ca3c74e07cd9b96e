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
    r.read(100, &mut b).unwrap();
    assert_eq!(&b, b"durable");
    let mut b = [0u8; 4];
    r.read(200, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
}
