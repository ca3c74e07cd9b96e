//! A `GlobalAlloc`-style handle: each allocation and each deallocation is
//! its own small no-flush transaction.

use crate::heap::Heap;
use rvm_core::{CommitMode, RestoreMode};
use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;

/// Allocates recoverable memory through the [`GlobalAlloc`] interface.
///
/// Every `alloc` and `dealloc` runs its own no-flush transaction (so a
/// later flush makes them durable). It returns null (as `GlobalAlloc`
/// requires) on any failure, including when the calling thread already has
/// a transaction open on the instance: inside a transaction, use
/// [`crate::HeapTx::malloc`] instead, which makes the allocation part of
/// that transaction. It cannot be the process's `#[global_allocator]` (it
/// borrows a heap that lives in recoverable memory).
///
/// ```
/// # use rvm_core::*;
/// # use rvm_heap::*;
/// # use std::alloc::{GlobalAlloc, Layout};
/// # let dir = tempfile::tempdir().unwrap();
/// # create_log(dir.path().join("log"), 1 << 20).unwrap();
/// # let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
/// # let seg = rvm.create_segment(dir.path().join("seg"), 1 << 20).unwrap();
/// # let s = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
/// # let h = rvm.map(&seg, MapSpec::new(4096, (1 << 20) - 4096)).unwrap();
/// # let heap = Heap::format(&rvm, s, h).unwrap();
/// let alloc = HeapAllocator::new(&heap);
/// let layout = Layout::new::<[u64; 4]>();
/// // SAFETY: a non-zero-size layout; the pointer is freed with the same layout.
/// unsafe {
///     let p = alloc.alloc(layout);
///     assert!(!p.is_null());
///     alloc.dealloc(p, layout);
/// }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct HeapAllocator<'h> {
    heap: &'h Heap,
}

impl<'h> HeapAllocator<'h> {
    /// A handle on `heap`.
    pub fn new(heap: &'h Heap) -> Self {
        HeapAllocator { heap }
    }

    fn try_alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        let mut tx = self.heap.begin(RestoreMode::NoRestore).ok()?;
        let p = tx.malloc(layout).ok()?;
        tx.commit(CommitMode::NoFlush).ok()?;
        Some(p)
    }
}

// SAFETY: `alloc` returns blocks that are at least `layout.size()` bytes,
// aligned to `layout.align()`, and disjoint from every other live block
// (the heap's allocator guarantees it); `dealloc` frees only what `alloc`
// returned. Failures return null as the trait requires.
unsafe impl GlobalAlloc for HeapAllocator<'_> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.try_alloc(layout).map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        let Some(p) = NonNull::new(ptr) else { return };
        if let Ok(mut tx) = self.heap.begin(RestoreMode::NoRestore) {
            if tx.free(p).is_ok() {
                let _ = tx.commit(CommitMode::NoFlush);
            }
        }
    }
}
