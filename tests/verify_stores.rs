//! The undeclared-store detector (`Options::verify_stores`, on in debug
//! builds): a store no `set_range` declared is reported with its address
//! and region at commit and before a checkpoint sweeps the page; declared
//! stores of concurrent transactions on one page are not.

use rvm::testing::SimDisk;
use rvm::*;
use std::path::Path;
use std::sync::Arc;

fn open(verify: bool) -> (Rvm, Region) {
    let vfs: Arc<dyn Vfs> = Arc::new(SimDisk::new());
    create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
    let opts = Options { verify_stores: verify, truncate_threshold: None, ..Options::default() };
    let rvm = Rvm::open_with(vfs, Path::new("log"), opts).unwrap();
    let seg = rvm.create_segment("seg", 4 * 4096).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 4 * 4096)).unwrap();
    (rvm, region)
}

/// A store the transaction did not declare.
fn sneak(addr: usize, v: u8) {
    // SAFETY: inside the test's region; no reference into it is alive and
    // no other thread writes these bytes.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) };
}

#[test]
fn debug_builds_verify_by_default() {
    assert_eq!(Options::default().verify_stores, cfg!(debug_assertions));
}

#[test]
fn an_undeclared_store_fails_the_commit_with_its_address() {
    let (rvm, region) = open(true);
    let a = region.addr();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: declared range, this thread's alone.
    unsafe { tx.modify_bytes(a + 100, b"declared").unwrap() };
    sneak(a + 108, 7);
    sneak(a + 109, 7);
    let err = tx.commit(CommitMode::Flush).unwrap_err();
    match err {
        Error::Tx(TxError::UndeclaredStore { addr, len, region: r, runs }) => {
            assert_eq!((addr, len, r, runs), (a + 108, 2, a, 1));
        }
        other => panic!("{other}"),
    }
    // The transaction was rolled back: its declared bytes are back.
    let mut b = [0u8; 8];
    // SAFETY: no transaction stores meanwhile.
    unsafe { region.read(100, &mut b) }.unwrap();
    assert_eq!(b, [0; 8]);
}

#[test]
fn declared_stores_pass_also_beside_other_open_transactions() {
    let (rvm, region) = open(true);
    let a = region.addr();
    std::thread::scope(|s| {
        for t in 0..4usize {
            let rvm = rvm.clone();
            s.spawn(move || {
                for i in 0..200u64 {
                    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
                    // Four threads, one page, disjoint 8-byte slots.
                    // SAFETY: each thread has its own slot.
                    unsafe { tx.modify_bytes(a + t * 8, &i.to_le_bytes()).unwrap() };
                    if i % 3 == 0 {
                        tx.abort();
                    } else {
                        tx.commit(CommitMode::NoFlush).unwrap();
                    }
                }
            });
        }
    });
    rvm.checkpoint().unwrap();
}

#[test]
fn a_checkpoint_refuses_to_sweep_an_undeclared_store() {
    let (rvm, region) = open(true);
    let a = region.addr();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: declared range, this thread's alone.
    unsafe { tx.modify_bytes(a + 4096, b"page one").unwrap() };
    tx.commit(CommitMode::NoFlush).unwrap();
    // Outside any transaction, on the dirty page the sweep would write.
    sneak(a + 4096 + 2000, 9);
    let err = rvm.checkpoint().unwrap_err();
    assert!(
        matches!(err, Error::Tx(TxError::UndeclaredStore { addr, region: r, .. }) if addr == a + 6096 && r == a),
        "{err}"
    );
    // The finding is also handed to the next commit.
    let tx = rvm.begin(RestoreMode::Restore).unwrap();
    assert!(matches!(tx.commit(CommitMode::NoFlush), Err(Error::Tx(TxError::UndeclaredStore { .. }))));
}

#[test]
fn off_it_sees_nothing() {
    let (rvm, region) = open(false);
    let a = region.addr();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: declared range, this thread's alone.
    unsafe { tx.modify_bytes(a, b"x").unwrap() };
    sneak(a + 1, 1);
    tx.commit(CommitMode::Flush).unwrap();
    rvm.checkpoint().unwrap();
}
