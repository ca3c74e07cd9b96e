//! Threads allocating, freeing and aborting on one heap at once.
//!
//! Each thread keeps its live blocks in its own persistent directory (a
//! rooted block it updates in the same transaction as its allocations and
//! frees) and fills every block with a pattern of its own; some
//! transactions also allocate, write and free a scratch block, and a third
//! of them abort (restore mode) or are dropped. A tangle between
//! transactions (an abort restoring bytes another transaction owns, a block
//! handed to two transactions, a lost or leaked block) shows as a failed heap
//! check, a damaged pattern, or a live set that differs from the union of
//! the directories. Checked at the end in memory, and after a crash of the
//! simulated disk (at rest, and while the threads run).

mod common;

use common::{run_workers, verify_threads, Ctx, Disk, ThreadLog};
use rvm_core::testing::CrashMode;
use std::sync::atomic::{AtomicBool, Ordering};

const THREADS: usize = 4;

fn assert_clean(logs: &[ThreadLog]) {
    for l in logs {
        assert!(l.fatal.is_none(), "{:?}", l.fatal);
        assert!(l.error.is_none(), "{:?}", l.error);
        assert!(l.commits > 0 && l.aborts > 0, "thread {} committed {} and aborted {}", l.id, l.commits, l.aborts);
    }
}

#[test]
fn concurrent_transactions_never_tangle_and_survive_a_crash() {
    let disk = Disk::new(common::HEAP, false);
    let (rvm, heap) = disk.open(true).unwrap();
    let stop = AtomicBool::new(false);
    let logs = run_workers(&heap, THREADS, 250, 0x7157, &stop, || {});
    assert_clean(&logs);
    verify_threads(&heap, &logs, true).unwrap();
    let st = heap.stats();
    assert_eq!(st.reserved_bytes, 0);
    assert_eq!(st.free_bytes + st.bytes_in_use, st.heap_bytes);

    // A second round on the same heap, then a crash that loses or tears
    // unsynced writes: each thread's directory is one of its states since
    // its last flush commit, and the heap holds exactly those blocks.
    let logs = run_workers(&heap, THREADS, 150, 0xc4a5, &stop, || {});
    assert_clean(&logs);
    verify_threads(&heap, &logs, true).unwrap();
    drop(heap);
    disk.disk.crash(CrashMode::KeepRandomSubset { seed: 11, tear_last: true });
    drop(rvm);
    let (_rvm, heap) = disk.open(false).unwrap();
    verify_threads(&heap, &logs, false).unwrap();
}

#[test]
fn a_crash_while_threads_run_leaves_a_consistent_heap() {
    for (round, mode) in
        [CrashMode::LoseUnsynced, CrashMode::KeepRandomSubset { seed: 5, tear_last: true }].into_iter().enumerate()
    {
        let disk = Disk::new(common::HEAP, true);
        let (rvm, heap) = disk.open(true).unwrap();
        let stop = AtomicBool::new(false);
        let logs = run_workers(&heap, THREADS, 100_000, 0xd00d + round as u64, &stop, || {
            // Let the threads get going, crash the disk under them, stop them.
            std::thread::sleep(std::time::Duration::from_millis(300));
            disk.disk.crash(mode);
            stop.store(true, Ordering::Relaxed);
        });
        for l in &logs {
            assert!(l.fatal.is_none(), "{:?}", l.fatal);
        }
        assert!(logs.iter().map(|l| l.commits).sum::<u64>() > 0, "no commits before the crash");
        drop(heap);
        drop(rvm);
        let (_rvm, heap) = disk.open(false).ctx("reload after the crash").unwrap();
        verify_threads(&heap, &logs, false).unwrap();
    }
}

/// Threads fill a heap far past its initial size: allocations that find no
/// room grow it (several times, concurrently with the other threads'
/// transactions and reads); the heap check passes, every directory and
/// block is intact, in memory and after a crash and reload.
#[test]
fn threads_grow_the_heap_and_survive_a_crash() {
    let disk = Disk::growable(64 << 10, 4 * common::HEAP, false);
    let (rvm, heap) = disk.open(true).unwrap();
    let stop = AtomicBool::new(false);
    let logs = run_workers(&heap, THREADS, 400, 0x960, &stop, || {});
    assert_clean(&logs);
    verify_threads(&heap, &logs, true).unwrap();
    assert!(heap.heap_len() > 64 << 10, "the heap did not grow ({} bytes)", heap.heap_len());
    let len = heap.heap_len();
    drop(heap);
    disk.disk.crash(CrashMode::KeepRandomSubset { seed: 3, tear_last: true });
    drop(rvm);
    let (_rvm, heap) = disk.open(false).unwrap();
    assert_eq!(heap.heap_len(), len, "a growth is durable when it returns");
    verify_threads(&heap, &logs, false).unwrap();
}
