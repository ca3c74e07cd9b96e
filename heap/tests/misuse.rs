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

/// Garbage pointers, layouts and names through every safe call of a heap
/// transaction: typed errors (or `None`), never a panic, and the heap
/// checks clean with its committed blocks intact afterwards.
#[test]
fn garbage_pointers_layouts_and_names_are_typed_errors() {
    use std::ptr::NonNull;
    let (_dir, rvm, statics, region) = env();
    let heap = Heap::format(&rvm, statics.clone(), region.clone()).unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let kept = tx.malloc(Layout::from_size_align(100, 16).unwrap()).unwrap();
    // SAFETY: the block is this transaction's; one thread.
    unsafe { tx.write(kept, b"kept").unwrap() };
    tx.set_root("kept", Some((kept, 100, 7))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();

    let base = region.addr();
    let end = base + region.len();
    let garbage: Vec<usize> = vec![
        1,
        base,
        base + 1,
        base + 8,
        kept.as_ptr() as usize + 16,
        kept.as_ptr() as usize - 16,
        end - 16,
        end,
        end + 4096,
        statics.addr() + 64,
        usize::MAX,
        usize::MAX - 15,
        isize::MAX as usize + 1,
    ];
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    for &addr in &garbage {
        let p = NonNull::new(addr as *mut u8).unwrap();
        // (The start of a free block's data is a double free.)
        let r = tx.free(p);
        assert!(
            matches!(r, Err(HeapError::InvalidPointer { .. } | HeapError::DoubleFree { .. })),
            "free({addr:#x}): {r:?}"
        );
        let r = tx.set_root("g", Some((p, 1, 0)));
        assert!(matches!(r, Err(HeapError::InvalidPointer { .. })), "set_root({addr:#x}): {r:?}");
        assert_eq!(heap.live_block_len(p), None, "{addr:#x}");
        assert_eq!(heap.committed_block_len(p), None, "{addr:#x}");
        // SAFETY: refused before any byte is touched (outside every region
        // or, for the heap's own addresses, declared only).
        let r = unsafe { tx.set_range(p, usize::MAX) };
        assert!(r.is_err(), "set_range({addr:#x}, MAX): {r:?}");
    }
    // Layouts no heap can hold.
    for (size, align) in
        [(isize::MAX as usize - 64, 1), (isize::MAX as usize - 4096, 4096), (1 << 40, 8), (8, 1 << 40), (8, 1 << 62)]
    {
        let layout = Layout::from_size_align(size, align).unwrap();
        let r = tx.malloc(layout);
        assert!(matches!(r, Err(HeapError::OutOfMemory { .. } | HeapError::BadLayout { .. })), "{size}/{align}: {r:?}");
    }
    // A zero-size block is a block.
    let zero = tx.malloc(Layout::from_size_align(0, 1).unwrap()).unwrap();
    tx.free(zero).unwrap();
    assert!(matches!(tx.free(zero), Err(HeapError::DoubleFree { .. } | HeapError::InvalidPointer { .. })));
    // Roots: names and sizes that do not fit.
    for name in ["", "a\0b", &"n".repeat(10_000)] {
        let r = tx.set_root(name, Some((kept, 1, 0)));
        assert!(matches!(r, Err(HeapError::BadRootName { .. })), "{name:?}: {r:?}");
    }
    let r = tx.set_root("big", Some((kept, u64::MAX, 0)));
    assert!(matches!(r, Err(HeapError::RootTooLarge { .. })), "{r:?}");
    // Freed twice in one transaction, then in the next.
    tx.free(kept).unwrap();
    assert!(matches!(tx.free(kept), Err(HeapError::DoubleFree { .. })));
    let r = tx.set_root("freed", Some((kept, 1, 0)));
    assert!(matches!(r, Err(HeapError::InvalidPointer { .. })), "a root on a block freed here: {r:?}");
    // A nested transaction on the same thread.
    let r = heap.begin(RestoreMode::Restore);
    assert!(matches!(r, Err(HeapError::Core(rvm_core::Error::Tx(rvm_core::TxError::Nested)))), "{r:?}");
    tx.abort();
    // The aborted free left the block live, with its root and bytes.
    heap.check().unwrap();
    assert_eq!(heap.live_block_len(kept), Some(100));
    assert_eq!(heap.root("kept").unwrap().ptr, kept);
    let mut b = [0u8; 4];
    // SAFETY: nothing stores into the block meanwhile.
    unsafe { region.read(kept.as_ptr() as usize - base, &mut b).unwrap() };
    assert_eq!(&b, b"kept");
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.free(kept).unwrap();
    tx.set_root("kept", None).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    assert!(matches!(tx.free(kept), Err(HeapError::DoubleFree { .. } | HeapError::InvalidPointer { .. })));
    tx.abort();
    heap.check().unwrap();
}
