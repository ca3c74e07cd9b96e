//! Basic heap behaviour: allocation, deferred free, abort, reload, check.

use rvm_core::testing::{CrashMode, SimDisk};
use rvm_core::{create_log_with, CommitMode, MapSpec, Options, RestoreMode, Rvm, Vfs};
use rvm_heap::{Heap, HeapError};
use std::alloc::Layout;
use std::path::Path;
use std::sync::Arc;

const SEG: u64 = 1 << 20;
const STATIC: usize = 4096;
const BASE: usize = 0x6a10_0000_0000;

fn open(vfs: &Arc<dyn Vfs>, create: bool) -> (Rvm, Heap) {
    let opts = Options { truncate_threshold: None, ..Options::default() };
    if create {
        create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
    }
    let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts).unwrap();
    let seg = if create { rvm.create_segment("seg", SEG).unwrap() } else { rvm.open_segment("seg").unwrap() };
    // Fixed addresses, so absolute pointers survive the reload.
    let s = rvm.map(&seg, MapSpec::new(0, STATIC).at(BASE)).unwrap();
    let h = rvm.map(&seg, MapSpec::new(STATIC as u64, SEG as usize - STATIC).at(BASE + STATIC)).unwrap();
    let heap = if create { Heap::format(&rvm, s, h).unwrap() } else { Heap::load(&rvm, s, h).unwrap() };
    (rvm, heap)
}

#[test]
fn alloc_free_abort_and_reload() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let (rvm, heap) = open(&vfs, true);
    let free0 = heap.stats().free_bytes;

    // An aborted allocation comes back.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.malloc(Layout::from_size_align(100, 8).unwrap()).unwrap();
    tx.abort();
    assert_eq!(heap.stats().free_bytes, free0);
    heap.check().unwrap();

    // Committed allocations, with data and a root.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let a = tx.malloc(Layout::from_size_align(100, 8).unwrap()).unwrap();
    let b = tx.malloc(Layout::from_size_align(3000, 256).unwrap()).unwrap();
    assert_eq!(b.as_ptr() as usize % 256, 0);
    // SAFETY: both blocks belong to this transaction.
    unsafe {
        tx.set_range(a, 100).unwrap();
        a.as_ptr().write_bytes(7, 100);
    }
    tx.set_root("a", Some((a, 100, 1))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    heap.check().unwrap();
    assert_eq!(heap.stats().live_blocks, 2);

    // A free is deferred: an abort keeps the block.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.free(b).unwrap();
    assert!(matches!(tx.free(b), Err(HeapError::DoubleFree { .. })));
    tx.abort();
    heap.check().unwrap();
    assert_eq!(heap.stats().live_blocks, 2);

    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.free(b).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    heap.check().unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    assert!(matches!(tx.free(b), Err(HeapError::DoubleFree { .. })));
    let bogus = std::ptr::NonNull::new(unsafe_offset(a, 32)).unwrap();
    assert!(matches!(tx.free(bogus), Err(HeapError::InvalidPointer { .. })));
    drop(tx);

    drop(heap);
    disk.crash(CrashMode::KeepRandomSubset { seed: 3, tear_last: true });
    drop(rvm);
    let (_rvm, heap) = open(&vfs, false);
    heap.check().unwrap();
    assert_eq!(heap.stats().live_blocks, 1);
    let root = heap.root("a").unwrap();
    assert_eq!(root.ptr, a);
    // SAFETY: the root block is live and nothing else uses it.
    assert_eq!(unsafe { root.ptr.as_ptr().read() }, 7);
}

fn unsafe_offset(p: std::ptr::NonNull<u8>, n: usize) -> *mut u8 {
    (p.as_ptr() as usize + n) as *mut u8
}
