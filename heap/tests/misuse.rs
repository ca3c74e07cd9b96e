//! Misuse of the raw heap's handles through safe calls: every one is a
//! typed error and leaves the heap as it was.

use rvm_core::{create_log, CommitMode, MapSpec, Options, Region, RestoreMode, Rvm};
use rvm_heap::{Heap, HeapError};
use std::alloc::Layout;

fn env() -> (tempfile::TempDir, Rvm, Region, Region) {
    let dir = tempfile::tempdir().unwrap();
    create_log(dir.path().join("log"), 4 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 1 << 20).unwrap();
    let statics = rvm.map(&seg, MapSpec::new(0, 1 << 12)).unwrap();
    let region = rvm.map(&seg, MapSpec::new(1 << 12, (1 << 20) - (1 << 12))).unwrap();
    (dir, rvm, statics, region)
}

/// Two heap values on the same regions would hand out the same block
/// twice (each rebuilds its own free lists), and formatting regions a live
/// heap uses would wipe it under that heap: both were accepted, and the
/// heap ended up corrupted. Now a second `load` or `format` on regions a
/// live heap holds (or one region given as both) is
/// `HeapError::RegionInUse`, with nothing written.
#[test]
fn a_second_heap_on_the_same_regions_is_refused() {
    let (_dir, rvm, statics, region) = env();
    let heap = Heap::format(&rvm, statics.clone(), region.clone()).unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let a = tx.malloc(Layout::new::<u64>()).unwrap();
    tx.set_root("a", Some((a, 8, 0))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();

    let second = Heap::load(&rvm, statics.clone(), region.clone());
    assert!(matches!(second, Err(HeapError::RegionInUse { addr }) if addr == statics.addr()), "{second:?}");
    let wiped = Heap::format(&rvm, statics.clone(), region.clone());
    assert!(matches!(wiped, Err(HeapError::RegionInUse { .. })), "{wiped:?}");
    let swapped = Heap::load(&rvm, region.clone(), statics.clone());
    assert!(matches!(swapped, Err(HeapError::RegionInUse { .. })), "{swapped:?}");
    heap.check().unwrap();
    assert_eq!(heap.root("a").unwrap().ptr, a);

    // The same region as both static and heap region.
    drop(heap);
    let one = Heap::format(&rvm, region.clone(), region.clone());
    assert!(matches!(one, Err(HeapError::RegionInUse { .. })), "{one:?}");
    let one = Heap::load(&rvm, statics.clone(), statics.clone());
    assert!(matches!(one, Err(HeapError::RegionInUse { .. })), "{one:?}");

    // Once the heap is dropped its regions load again, intact.
    let heap = Heap::load(&rvm, statics, region).unwrap();
    heap.check().unwrap();
    assert_eq!(heap.root("a").unwrap().ptr, a);
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    assert_ne!(tx.malloc(Layout::new::<u64>()).unwrap(), a);
    tx.abort();
}
