//! # rvm-heap: an RDS-style recoverable heap
//!
//! `malloc` and `free` of recoverable memory inside transactions, on two
//! mapped regions of a segment: a static region (header, counters,
//! persistent roots) and the heap region. All allocator metadata lives in
//! recoverable memory and changes only through transactions, at commit,
//! under the heap lock; the volatile indexes (free extents by address and by
//! size, size classes for small blocks, preallocated blocks) are rebuilt
//! from the block headers at load.
//!
//! - [`PersistentHeap::create`] / [`PersistentHeap::open`]: a heap in its own
//!   segment, at fixed addresses, through the loader, in one call.
//! - [`Heap::format`] / [`Heap::load`]: the same on regions the caller mapped.
//! - [`HeapTx::malloc`] / [`HeapTx::free`]: allocation inside a transaction;
//!   frees take effect at commit, allocations of an aborted transaction
//!   return to the free space.
//! - Roots: [`Heap::root_or_create`], [`Heap::root_or_init`],
//!   [`HeapTx::set_root`], [`Heap::roots`].
//! - [`Heap::check`], [`Heap::stats`], [`Heap::preallocate`].
//! - [`HeapAllocator`]: a `GlobalAlloc`-style handle.
//!
//! ```
//! use rvm_core::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};
//! use rvm_heap::Heap;
//! use std::alloc::Layout;
//! # let dir = tempfile::tempdir().unwrap();
//! create_log(dir.path().join("log"), 1 << 20).unwrap();
//! let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
//! let seg = rvm.create_segment(dir.path().join("seg"), 1 << 20).unwrap();
//! let statics = rvm.map(&seg, MapSpec::new(0, 1 << 12)).unwrap();
//! let region = rvm.map(&seg, MapSpec::new(1 << 12, (1 << 20) - (1 << 12))).unwrap();
//! let heap = Heap::format(&rvm, statics, region).unwrap();
//!
//! let mut tx = heap.begin(RestoreMode::Restore).unwrap();
//! let p = tx.malloc(Layout::new::<u64>()).unwrap();
//! // SAFETY: the block was just allocated by this transaction.
//! unsafe {
//!     tx.set_range(p, 8).unwrap();
//!     p.cast::<u64>().as_ptr().write(42);
//! }
//! tx.set_root("answer", Some((p, 8, 0))).unwrap();
//! tx.commit(CommitMode::Flush).unwrap();
//! assert_eq!(heap.root("answer").unwrap().ptr, p);
//! heap.check().unwrap();
//! ```

mod avail;
mod error;
mod global;
mod heap;
pub mod layout;
mod persistent;
mod raw;
#[cfg(feature = "testing")]
pub mod testing;
mod tracked_alloc;

/// The `bytemuck` crate, for the [`bytemuck::NoUninit`] bound of
/// [`Heap::root_or_init`] (derive it with
/// `#[bytemuck(crate = "rvm_heap::bytemuck")]` without a dependency of your
/// own).
pub use bytemuck;
pub use error::{HeapError, Result};
pub use global::HeapAllocator;
pub use heap::{CheckReport, Heap, HeapStats, HeapTx, Root, CLASS_BOUNDS, DEFAULT_ROOT_SLOTS, MAX_ROOT_SLOTS};
pub use persistent::{HeapSpec, PersistentHeap, HEAP_REGION, STATIC_REGION};
pub use tracked_alloc::TrackedAlloc;
