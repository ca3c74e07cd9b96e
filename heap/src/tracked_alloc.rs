//! [`TrackedAlloc`]: an allocator handle for ordinary Rust collections kept
//! in a tracked heap (its documentation says which types are sound to keep
//! there).

use crate::error::{HeapError, Result};
use crate::heap::{Heap, Intents};
use parking_lot::Mutex;
use std::alloc::{GlobalAlloc, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;
use std::rc::{Rc, Weak};

/// Heaps alive in the process (their ids): a registry entry of a heap that
/// is gone (possible only after a `mem::forget` of a heap transaction) is
/// never used.
static LIVE: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// A heap's entry in [`LIVE`], removed when the heap is dropped (its first
/// field, so before anything else of the heap goes).
#[derive(Debug)]
pub(crate) struct LiveHeap(u64);

impl LiveHeap {
    pub(crate) fn new(id: u64) -> LiveHeap {
        LIVE.lock().push(id);
        LiveHeap(id)
    }
}

impl Drop for LiveHeap {
    fn drop(&mut self) {
        LIVE.lock().retain(|&i| i != self.0);
    }
}

/// An open tracked heap transaction of this thread.
struct Open {
    base: usize,
    id: u64,
    heap: *const Heap,
    intents: Weak<RefCell<Intents>>,
}

thread_local! {
    static OPEN: RefCell<Vec<Open>> = const { RefCell::new(Vec::new()) };
}

/// Notes a tracked heap transaction of this thread (at its begin).
pub(crate) fn register(heap: &Heap, intents: &Rc<RefCell<Intents>>) {
    OPEN.with(|o| {
        let mut o = o.borrow_mut();
        o.retain(|e| e.intents.strong_count() > 0 && e.id != heap.id());
        o.push(Open { base: heap.base(), id: heap.id(), heap, intents: Rc::downgrade(intents) });
    });
}

/// Runs `f` on the calling thread's open tracked transaction on the heap
/// at `base`; `None` when there is none.
fn with_open<R>(base: usize, f: impl FnOnce(&Heap, &RefCell<Intents>) -> R) -> Option<R> {
    let (id, heap, intents) = OPEN
        .try_with(|o| {
            let o = o.borrow();
            let e = o.iter().rev().find(|e| e.base == base)?;
            Some((e.id, e.heap, e.intents.upgrade()?))
        })
        .ok()
        .flatten()?;
    // Held while the heap is used: a heap being dropped waits (its
    // `LiveHeap` goes first).
    let live = LIVE.lock();
    if !live.contains(&id) {
        return None;
    }
    // SAFETY: the heap is alive (its id is in LIVE, and it cannot leave
    // while we hold the lock), and `heap` is its address: the entry was made
    // from a reference to it and a heap does not move while a transaction
    // borrows it (its id identifies that very value; ids are never reused).
    let heap = unsafe { &*heap };
    Some(f(heap, &intents))
}

/// An allocator handle for ordinary Rust collections kept in a tracked heap.
///
/// With the heap region tracked ([`Heap::track`]), every heap transaction
/// is a tracked one: stores into the heap need no `set_range`, the page
/// faults find them. What is left is allocation: `TrackedAlloc` implements
/// `allocator_api2`'s `Allocator` (and [`GlobalAlloc`]) by allocating and
/// freeing inside the transaction the calling thread has open on the heap.
/// So `allocator_api2::vec::Vec<T, TrackedAlloc>`,
/// `allocator_api2::boxed::Box<T, TrackedAlloc>` and
/// `hashbrown::HashMap<K, V, S, TrackedAlloc>` kept under a root change
/// with their ordinary methods inside a transaction, and a commit makes
/// the change durable as a whole, an abort (or a crash before the commit)
/// undoes it as a whole.
///
/// The handle holds only the heap's base address, so it can itself live in
/// the heap (inside the collections) and stays valid across restarts,
/// provided the heap is loaded at the same address (the loader does that).
///
/// Outside a transaction on its heap, the handle refuses to allocate
/// (`AllocError`, or null for `GlobalAlloc`): an allocation nobody logs
/// would be lost in a crash. Freeing outside a transaction panics (the
/// block would leak for good; dropping a persistent collection belongs in a
/// transaction).
///
/// # Which types are sound to keep in the heap
///
/// A value survives a restart byte for byte, at the same address. It is
/// sound to keep there if all its bytes mean the same thing in the next
/// process:
///
/// - plain data (integers, floats, `bool`, arrays and structs of them);
/// - pointers into the same heap only: `Vec`, `Box`, `HashMap` (and other
///   collections generic over an allocator) whose allocator is
///   `TrackedAlloc`, of such types;
/// - a hasher whose state is the same in every run: `BuildHasherDefault`
///   of a deterministic hasher, or `foldhash::fast::FixedState::with_seed`.
///   A randomly seeded one (`RandomState`, hashbrown's default) hashes
///   differently in the next process and loses every key.
///
/// Not sound: anything pointing outside the heap — `std`'s `Box`, `Vec`,
/// `String` (the global allocator's memory is gone after a restart),
/// references and `&'static str` (binary addresses change with ASLR),
/// function pointers and trait objects (vtables), `Rc`/`Arc`, file
/// descriptors, thread handles. One trap: an empty `hashbrown` table that
/// never allocated points at a static in the binary; create maps with a
/// capacity (`with_capacity_and_hasher_in`) and do not `shrink_to_fit`
/// an empty one. And the layout of a type must be the same in every build
/// that opens the heap: pin the compiler and the collection crates'
/// versions (or keep `#[repr(C)]` types of your own).
///
/// ```
/// # use rvm_core::*;
/// # use rvm_heap::*;
/// # let dir = tempfile::tempdir().unwrap();
/// # create_log(dir.path().join("log"), 1 << 20).unwrap();
/// # let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
/// # let seg = rvm.create_segment(dir.path().join("seg"), 1 << 20).unwrap();
/// # let s = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
/// # let h = rvm.map(&seg, MapSpec::new(4096, (1 << 20) - 4096)).unwrap();
/// let heap = Heap::format(&rvm, s, h).unwrap();
/// heap.track().unwrap();
/// // SAFETY: what this handle allocates is stored in the heap or dropped
/// // inside the transaction that allocated it, and changed only inside
/// // transactions on the heap (see `TrackedAlloc::new`).
/// let alloc = unsafe { TrackedAlloc::new(&heap) }.unwrap();
/// let tx = heap.begin(RestoreMode::Restore).unwrap();
/// let mut v = allocator_api2::vec::Vec::new_in(alloc);
/// v.extend_from_slice(&[1u64, 2, 3]);
/// let (ptr, len, cap) = (v.as_ptr(), v.len(), v.capacity());
/// std::mem::forget(v); // kept in the heap (a root would point at it)
/// tx.commit(CommitMode::Flush).unwrap();
/// // Outside a transaction the handle refuses.
/// assert!(allocator_api2::vec::Vec::<u64, _>::new_in(alloc).try_reserve(4).is_err());
/// # let _ = (ptr, len, cap);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TrackedAlloc {
    /// The heap region's address.
    base: usize,
}

impl TrackedAlloc {
    /// A handle on `heap`, whose heap region must be tracked
    /// ([`Heap::track`]); otherwise [`HeapError::NotTracked`].
    ///
    /// # Safety
    ///
    /// A block the handle allocates belongs to the transaction that
    /// allocated it until that transaction commits: an abort (or a drop of
    /// the transaction) frees it again, whatever still points at it. So
    /// every value holding memory from this handle (and from its copies)
    /// must, before its transaction ends, be stored in the heap (reached
    /// from a root, whose bytes an abort puts back) or dropped; a value
    /// kept outside the heap across an abort would own a free block that
    /// the next allocation hands to another value (two owners of one
    /// block: aliasing, a double free). And its memory is changed only
    /// inside a transaction on the heap: outside one the tracked pages are
    /// read-only, and a store kills the process (`SIGSEGV`).
    ///
    /// Safe code alone could otherwise break both (found by the acceptance
    /// tests), so the duty is the caller's:
    ///
    /// ```compile_fail,E0133
    /// # fn f(heap: &rvm_heap::Heap) {
    /// let alloc = rvm_heap::TrackedAlloc::new(heap); // needs `unsafe`
    /// # }
    /// ```
    pub unsafe fn new(heap: &Heap) -> Result<TrackedAlloc> {
        if !heap.heap_region().is_tracked() {
            return Err(HeapError::NotTracked);
        }
        Ok(TrackedAlloc { base: heap.base() })
    }

    fn alloc_block(&self, layout: Layout) -> Option<NonNull<u8>> {
        with_open(self.base, |heap, intents| crate::heap::malloc_in(heap, intents, layout).ok()).flatten()
    }

    fn free_block(&self, ptr: NonNull<u8>) {
        match with_open(self.base, |heap, intents| crate::heap::free_in_cell(heap, intents, ptr)) {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("TrackedAlloc: freeing {ptr:p} failed, the block is not freed: {e}"),
            None => panic!(
                "TrackedAlloc: {ptr:p} freed outside a transaction on its heap (drop persistent collections inside one)"
            ),
        }
    }
}

/// A dangling, aligned pointer for zero-sized requests.
fn dangling(layout: Layout) -> NonNull<u8> {
    // An alignment is never zero.
    NonNull::new(layout.align() as *mut u8).unwrap_or(NonNull::dangling())
}

// SAFETY: blocks come from the heap's allocator (at least the requested
// size, aligned as asked, disjoint from every other live block) and stay
// valid until deallocated: an allocation is the transaction's until it
// commits and then a live block. Zero-sized requests get a dangling aligned
// pointer and are never freed. The handle is a plain address: copies refer
// to the same heap.
unsafe impl allocator_api2::alloc::Allocator for TrackedAlloc {
    fn allocate(&self, layout: Layout) -> std::result::Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            return Ok(NonNull::slice_from_raw_parts(dangling(layout), 0));
        }
        let p = self.alloc_block(layout).ok_or(allocator_api2::alloc::AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            self.free_block(ptr);
        }
    }
}

// SAFETY: as for `Allocator` above; failures return null as the trait
// requires.
unsafe impl GlobalAlloc for TrackedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() == 0 {
            return std::ptr::null_mut();
        }
        self.alloc_block(layout).map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr).filter(|_| layout.size() != 0) {
            self.free_block(p);
        }
    }
}
