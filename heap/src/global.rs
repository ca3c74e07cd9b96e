//! A `GlobalAlloc`-style handle: each allocation and each deallocation is
//! its own small no-flush transaction.

use crate::error::HeapError;
use crate::heap::Heap;
use rvm_core::{CommitMode, RestoreMode, TxError};
use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;

/// Allocates recoverable memory through the [`GlobalAlloc`] interface.
///
/// Every `alloc`, `alloc_zeroed`, `realloc` and `dealloc` runs its own
/// no-flush transaction (so a later flush makes them durable); `alloc_zeroed`
/// and `realloc` declare the zeroes and the copied bytes in that transaction,
/// so they are recoverable too. Stores the caller makes afterwards with plain
/// writes are **not** recoverable: declare them in a transaction. It returns
/// null (as `GlobalAlloc` requires) on any failure, including when the
/// calling thread already has a transaction open on the instance: inside a
/// transaction, use [`crate::HeapTx::malloc`] instead, which makes the
/// allocation part of that transaction. It cannot be the process's
/// `#[global_allocator]` (it borrows a heap that lives in recoverable
/// memory).
///
/// `dealloc` while the calling thread has a [`crate::HeapTx`] open on the
/// same heap frees the block inside that transaction, exactly as
/// [`crate::HeapTx::free`]: the block is freed when the transaction
/// commits, and stays allocated if it aborts. `dealloc` cannot report an
/// error, so it panics rather than lose a block silently when the free
/// fails (a pointer the heap did not hand out, a double free) or cannot be
/// done (the thread has some other transaction open on the instance, a
/// core transaction or one on another heap; or the instance failed).
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

    fn try_alloc(&self, layout: Layout, zeroed: bool) -> Option<NonNull<u8>> {
        let mut tx = self.heap.begin(RestoreMode::NoRestore).ok()?;
        let p = tx.malloc(layout).ok()?;
        if zeroed {
            // SAFETY: the block belongs to this transaction alone.
            unsafe { tx.write(p, &vec![0u8; layout.size()]).ok()? };
        }
        tx.commit(CommitMode::NoFlush).ok()?;
        Some(p)
    }

    /// Frees `p` in its own no-flush transaction, or inside the heap
    /// transaction the thread has open on this heap.
    fn try_dealloc(&self, p: NonNull<u8>) -> crate::Result<()> {
        match self.heap.begin(RestoreMode::NoRestore) {
            Ok(mut tx) => {
                tx.free(p)?;
                tx.commit(CommitMode::NoFlush)
            }
            Err(HeapError::Core(rvm_core::Error::Tx(TxError::Nested))) => match self.heap.free_in_open_tx(p) {
                Some(r) => r,
                None => Err(HeapError::Core(rvm_core::Error::Tx(TxError::Nested))),
            },
            Err(e) => Err(e),
        }
    }

    fn try_realloc(&self, old: NonNull<u8>, layout: Layout, new_size: usize) -> Option<NonNull<u8>> {
        let new_layout = Layout::from_size_align(new_size, layout.align()).ok()?;
        let keep = layout.size().min(new_size);
        let mut bytes = vec![0u8; keep];
        // SAFETY: `old` is a live block of at least `layout.size()` bytes
        // (the GlobalAlloc contract), and its owner is not writing it while
        // it asks for it to be moved.
        unsafe { std::ptr::copy_nonoverlapping(old.as_ptr(), bytes.as_mut_ptr(), keep) };
        let mut tx = self.heap.begin(RestoreMode::NoRestore).ok()?;
        let p = tx.malloc(new_layout).ok()?;
        // SAFETY: the new block belongs to this transaction alone.
        unsafe { tx.write(p, &bytes).ok()? };
        tx.free(old).ok()?;
        tx.commit(CommitMode::NoFlush).ok()?;
        Some(p)
    }
}

// SAFETY: `alloc`, `alloc_zeroed` and `realloc` return blocks of at least
// the requested size, aligned as asked, and disjoint from every other live
// block (the heap's allocator guarantees it); `alloc_zeroed` zeroes them;
// `realloc` keeps the old contents up to the smaller size and leaves the old
// block alone when it fails; `dealloc` frees only what they returned.
// Failures return null as the trait requires.
unsafe impl GlobalAlloc for HeapAllocator<'_> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.try_alloc(layout, false).map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.try_alloc(layout, true).map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // On failure the old block stays allocated, as the trait requires.
        NonNull::new(ptr)
            .and_then(|old| self.try_realloc(old, layout, new_size))
            .map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        let Some(p) = NonNull::new(ptr) else { return };
        if let Err(e) = self.try_dealloc(p) {
            panic!("HeapAllocator::dealloc of {ptr:p} failed, the block is not freed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvm_core::testing::{CrashMode, SimDisk};
    use rvm_core::{create_log_with, MapSpec, Options, Rvm, Vfs};
    use std::path::Path;
    use std::sync::Arc;

    fn open(vfs: &Arc<dyn Vfs>, base: usize, create: bool) -> (Rvm, Heap) {
        if create {
            create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
        }
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), Options::default()).unwrap();
        let seg = if create { rvm.create_segment("seg", 1 << 20) } else { rvm.open_segment("seg") }.unwrap();
        let s = rvm.map(&seg, MapSpec::new(0, 4096).at(base)).unwrap();
        let h = rvm.map(&seg, MapSpec::new(4096, (1 << 20) - 4096).at(base + 4096)).unwrap();
        let heap = if create { Heap::format(&rvm, s, h) } else { Heap::load(&rvm, s, h) }.unwrap();
        (rvm, heap)
    }

    #[test]
    fn zeroed_and_reallocated_contents_are_recoverable() {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        let base = rvm_loader::testing::address_range().start();
        let (rvm, heap) = open(&vfs, base, true);
        let a = HeapAllocator::new(&heap);
        let layout = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: valid layouts; pointers are used with the layouts they
        // were allocated with; nothing else touches the blocks.
        let (z, r) = unsafe {
            let z = a.alloc_zeroed(layout);
            let p = a.alloc(layout);
            let mut tx = heap.begin(RestoreMode::Restore).unwrap();
            tx.write(NonNull::new(p).unwrap(), &[9u8; 64]).unwrap();
            tx.commit(CommitMode::NoFlush).unwrap();
            let r = a.realloc(p, layout, 4000);
            assert!(!z.is_null() && !r.is_null());
            (z as usize, r as usize)
        };
        assert_eq!(heap.stats().live_blocks, 2);
        heap.check().unwrap();
        rvm.flush().unwrap();
        // The zeroes and the copy were logged: after a crash that keeps only
        // what was synced, the blocks hold them.
        drop(heap);
        disk.crash(CrashMode::LoseUnsynced);
        drop(rvm);
        let (_rvm, heap) = open(&vfs, base, false);
        heap.check().unwrap();
        assert_eq!(heap.stats().live_blocks, 2);
        let mut buf = vec![1u8; 64];
        // SAFETY: nothing stores into the region while the test reads it.
        unsafe { heap.heap_region().read(z - base - 4096, &mut buf) }.unwrap();
        assert_eq!(buf, vec![0u8; 64]);
        // SAFETY: nothing stores into the region while the test reads it.
        unsafe { heap.heap_region().read(r - base - 4096, &mut buf) }.unwrap();
        assert_eq!(buf, vec![9u8; 64]);
    }
}
