//! Heaps that grow in place, on real files: explicit growth, readers
//! running through growths, the typed errors (maximum, full disk, address
//! range taken) that leave the heap usable at its old size.

use rvm_core::testing::SimDisk;
use rvm_core::{create_log, create_log_with, CommitMode, MapSpec, Options, RestoreMode, Rvm, Vfs};
use rvm_heap::{GrowthPolicy, HeapError, HeapSpec, PersistentHeap};
use std::alloc::Layout;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn base() -> u64 {
    rvm_loader::testing::address_range().at(0)
}

fn store(heap: &PersistentHeap, size: usize, byte: u8) -> usize {
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let p = tx.malloc(Layout::from_size_align(size, 16).unwrap()).unwrap();
    // SAFETY: the block is this transaction's alone.
    unsafe { tx.write(p, &vec![byte; size]).unwrap() };
    tx.commit(CommitMode::NoFlush).unwrap();
    p.as_ptr() as usize
}

#[test]
fn explicit_growth_keeps_pointers_and_readers_run_through_it() {
    let dir = tempfile::tempdir().unwrap();
    create_log(dir.path().join("log"), 4 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let spec = HeapSpec::fixed(base(), 64 << 10).with_max_len(512 << 20);
    let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &spec).unwrap();
    assert_eq!(heap.max_len(), 512 << 20);
    assert_eq!(heap.stats().max_heap_bytes, 512 << 20);
    let first = store(&heap, 1000, 7);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        // A reader: the block's bytes never change and never go away while
        // the heap grows under it.
        s.spawn(|| {
            let mut reads = 0u64;
            while !done.load(Ordering::Relaxed) || reads == 0 {
                let mut b = [0u8; 1000];
                // SAFETY: committed block that nothing writes.
                unsafe { std::ptr::copy_nonoverlapping(first as *const u8, b.as_mut_ptr(), 1000) };
                assert!(b.iter().all(|&x| x == 7));
                reads += 1;
            }
        });
        let mut len = heap.heap_len();
        for _ in 0..8 {
            len = heap.grow(len * 2).unwrap();
            store(&heap, 20_000, 9);
        }
        done.store(true, Ordering::Relaxed);
    });
    assert_eq!(heap.heap_len(), 64 << 18);
    heap.check().unwrap();
    // Past the maximum: refused, nothing changes.
    match heap.grow(1 << 30) {
        Err(HeapError::GrowthLimit { max, .. }) => assert_eq!(max, 512 << 20),
        other => panic!("{other:?}"),
    }
    assert_eq!(heap.heap_len(), 64 << 18);
    let len = heap.heap_len();
    drop(heap);
    drop(rvm);
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let heap = PersistentHeap::open(&rvm, dir.path().join("heap")).unwrap();
    assert_eq!(heap.heap_len(), len);
    assert_eq!(heap.segment().load_map().get(rvm_heap::HEAP_REGION).unwrap().len, len);
    heap.check().unwrap();
    // SAFETY: a live committed block.
    assert_eq!(unsafe { *(first as *const u8) }, 7);
}

/// With the policy manual, a full heap is out of memory; with doubling it
/// grows, by at most the step limit.
#[test]
fn the_growth_policy_decides() {
    let dir = tempfile::tempdir().unwrap();
    create_log(dir.path().join("log"), 4 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let spec = HeapSpec::fixed(base(), 64 << 10).with_max_len(64 << 20);
    let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &spec).unwrap();
    heap.set_growth_policy(GrowthPolicy::Manual);
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    assert!(matches!(tx.malloc(Layout::from_size_align(100_000, 16).unwrap()), Err(HeapError::OutOfMemory { .. })));
    drop(tx);
    heap.set_growth_policy(GrowthPolicy::Doubling { min_step: 64 << 10, max_step: 1 << 20 });
    store(&heap, 100_000, 1);
    // By what the request needs (more than the doubling), page-rounded.
    assert_eq!(heap.heap_len(), ((64 << 10) + 100_032u64).next_multiple_of(4096));
    for _ in 0..30 {
        store(&heap, 100_000, 2);
    }
    assert!(heap.heap_len() <= 5 << 20, "{}", heap.heap_len());
    heap.check().unwrap();
    assert_eq!(GrowthPolicy::default().target(1 << 20, 100, 64 << 30), Some(2 << 20));
    assert_eq!(GrowthPolicy::default().target(8 << 30, 100, 64 << 30), Some(9 << 30));
    assert_eq!(GrowthPolicy::default().target(64 << 30, 100, 64 << 30), None);
    assert_eq!(GrowthPolicy::Manual.target(1 << 20, 100, 64 << 30), None);
}

/// Another mapping where the heap would grow: the heap opens at its size,
/// a growth is `AddressRangeTaken`, and the heap stays usable.
#[test]
fn an_address_range_taken_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    create_log(dir.path().join("log"), 4 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let spec = HeapSpec::fixed(base(), 64 << 10).with_max_len(256 << 20);
    PersistentHeap::create(&rvm, dir.path().join("heap"), &spec).unwrap().close().unwrap();
    let other = rvm.create_segment(dir.path().join("other"), 4096).unwrap();
    let at = spec.heap_base() as usize + (1 << 20);
    let squatter = rvm.map(&other, MapSpec::new(0, 4096).at(at)).unwrap();
    let heap = PersistentHeap::open(&rvm, dir.path().join("heap")).unwrap();
    match heap.grow(2 << 20) {
        Err(HeapError::AddressRangeTaken { addr, .. }) => assert_eq!(addr, spec.heap_base() as usize + (64 << 10)),
        other => panic!("{other:?}"),
    }
    assert_eq!(heap.heap_len(), 64 << 10);
    store(&heap, 1000, 3);
    heap.check().unwrap();
    rvm.unmap(squatter).unwrap();
}

/// A disk too small for the growth: `DiskFull`, the heap unchanged and
/// usable, and a later reload shows the old size.
#[test]
fn a_full_disk_is_a_typed_error() {
    let disk = SimDisk::with_max_file_len(1 << 20);
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new("log"), 256 << 10).unwrap();
    let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), Options::default()).unwrap();
    let spec = HeapSpec::fixed(base(), 64 << 10).with_max_len(64 << 20);
    let heap = PersistentHeap::create(&rvm, "heap", &spec).unwrap();
    store(&heap, 1000, 4);
    match heap.grow(2 << 20) {
        Err(HeapError::DiskFull { requested, .. }) => assert_eq!(requested, 2 << 20),
        other => panic!("{other:?}"),
    }
    assert_eq!(heap.heap_len(), 64 << 10);
    store(&heap, 1000, 5);
    heap.check().unwrap();
    // Room for a smaller growth.
    assert_eq!(heap.grow(512 << 10).unwrap(), 512 << 10);
    heap.check().unwrap();
    drop(heap);
    drop(rvm);
    let rvm = Rvm::open_with(vfs, Path::new("log"), Options::default()).unwrap();
    let heap = PersistentHeap::open(&rvm, "heap").unwrap();
    assert_eq!(heap.heap_len(), 512 << 10);
    heap.check().unwrap();
}

/// A heap created without a maximum does not grow.
#[test]
fn a_heap_without_a_maximum_does_not_grow() {
    let dir = tempfile::tempdir().unwrap();
    create_log(dir.path().join("log"), 4 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &HeapSpec::fixed(base(), 64 << 10)).unwrap();
    assert_eq!(heap.max_len(), 64 << 10);
    assert!(matches!(heap.grow(1 << 20), Err(HeapError::GrowthLimit { .. })));
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    assert!(matches!(tx.malloc(Layout::from_size_align(100_000, 16).unwrap()), Err(HeapError::OutOfMemory { .. })));
}
