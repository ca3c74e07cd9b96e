//! `HeapAllocator` inside an open heap transaction: `dealloc` frees inside
//! that transaction (at its commit; not at all if it aborts) instead of
//! leaking the block silently, and fails loudly when it cannot free.

mod common;

use common::Disk;
use rvm_core::{CommitMode, RestoreMode};
use rvm_heap::HeapAllocator;
use std::alloc::{GlobalAlloc, Layout};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

fn layout() -> Layout {
    Layout::from_size_align(64, 8).unwrap()
}

/// Before the fix, the `dealloc` below found the thread's transaction open,
/// could not begin its own, and returned without freeing: the block stayed
/// live after the commit.
#[test]
fn dealloc_inside_an_open_transaction_frees_at_its_commit() {
    let disk = Disk::new(1 << 20, false);
    let (_rvm, heap) = disk.open(true).unwrap();
    let a = HeapAllocator::new(&heap);
    // SAFETY: a valid layout; the block is freed once, with its layout.
    let p = unsafe { a.alloc(layout()) };
    assert!(!p.is_null());
    assert_eq!(heap.stats().live_blocks, 1);

    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let own = tx.malloc(layout()).unwrap();
    // SAFETY: p came from this allocator with this layout; own is a block
    // of the open transaction, handed out for this layout.
    unsafe {
        a.dealloc(p, layout());
        a.dealloc(own.as_ptr(), layout());
    }
    // Deferred to the commit, like HeapTx::free.
    assert_eq!(heap.stats().live_blocks, 1);
    assert!(matches!(tx.free(NonNull::new(p).unwrap()), Err(rvm_heap::HeapError::DoubleFree { .. })));
    tx.commit(CommitMode::Flush).unwrap();
    assert_eq!(heap.stats().live_blocks, 0, "the block was freed at the commit");
    assert_eq!(heap.stats().reserved_bytes, 0);
    heap.check().unwrap();
}

/// A dealloc inside a transaction that aborts is undone with it (the block
/// stays live, as with `HeapTx::free`), and the next dealloc outside any
/// transaction frees it.
#[test]
fn dealloc_inside_an_aborted_transaction_is_undone() {
    let disk = Disk::new(1 << 20, false);
    let (_rvm, heap) = disk.open(true).unwrap();
    let a = HeapAllocator::new(&heap);
    // SAFETY: a valid layout.
    let p = unsafe { a.alloc(layout()) };
    let tx = heap.begin(RestoreMode::Restore).unwrap();
    // SAFETY: as above.
    unsafe { a.dealloc(p, layout()) };
    drop(tx);
    assert_eq!(heap.stats().live_blocks, 1);
    heap.check().unwrap();
    // SAFETY: still live (the free was aborted); freed once more.
    unsafe { a.dealloc(p, layout()) };
    assert_eq!(heap.stats().live_blocks, 0);
    heap.check().unwrap();
}

/// A dealloc that cannot be done panics instead of leaking silently: with
/// a core transaction (not a heap one) open on the instance, and for a
/// pointer the heap did not hand out.
#[test]
fn dealloc_that_cannot_free_fails_loudly() {
    let disk = Disk::new(1 << 20, false);
    let (rvm, heap) = disk.open(true).unwrap();
    let a = HeapAllocator::new(&heap);
    // SAFETY: a valid layout.
    let p = unsafe { a.alloc(layout()) };
    let core_tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: p is live; the call panics before touching it.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe { a.dealloc(p, layout()) }));
    let msg = r.expect_err("dealloc with a core transaction open must not return quietly");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("not freed") && msg.contains("nested"), "{msg}");
    drop(core_tx);
    assert_eq!(heap.stats().live_blocks, 1);
    // SAFETY: a pointer inside the block, never handed out: the call panics.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe { a.dealloc(p.add(16), layout()) }));
    assert!(r.is_err(), "an invalid pointer must not be ignored");
    heap.check().unwrap();
}
