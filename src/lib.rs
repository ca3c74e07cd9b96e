//! # rvm: a recoverable persistent heap
//!
//! The facade crate: it re-exports the layers and ships the `rvmutl`
//! command-line tool. Start with the typed layer:
//!
//! - [`collections`] (`rvm-collections`): typed roots, `PVec`,
//!   `PString`, `PHashMap`, `PBTreeMap`, `PBox` and your own
//!   `#[derive(Persist)]` structs in a heap that survives restarts and
//!   crashes, changed in closure transactions — no `unsafe`;
//! - the core ([`rvm_core`], re-exported at this crate's root: [`Rvm`],
//!   [`Transaction`], [`Region`], ...): RVM's segments, regions and
//!   transactions, where the program declares the ranges it changes;
//! - [`heap`] (`rvm-heap`): the recoverable allocator under the typed
//!   layer (`malloc`/`free` in transactions, raw roots);
//! - [`loader`] (`rvm-loader`): segments whose regions load at fixed
//!   addresses.
//!
//! ```
//! use rvm::collections::{Config, Error, PHeap, PString, PVec, Persist};
//!
//! #[derive(Persist)]
//! #[repr(C)] // a stable layout: the heap outlives the program
//! struct Customer {
//!     name: PString,
//!     orders: PVec<u64>,
//! }
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let heap = PHeap::open_or_create(dir.path(), Config::default())?; // log + heap in one folder
//! heap.write(|tx| {
//!     // Commits (durably) on Ok, undoes everything on Err or panic.
//!     let mut c = tx.root_or_insert_with("ada", || Customer { name: PString::new(), orders: PVec::new() })?;
//!     c.field_mut(|c| &c.name).push_str("Ada")?;
//!     c.field_mut(|c| &c.orders).push(1001)?;
//!     Ok::<_, Error>(())
//! })?;
//! drop(heap);
//!
//! // The next run (or the one after a crash) finds what was committed.
//! let heap = PHeap::open_or_create(dir.path(), Config::default())?;
//! heap.read(|r| {
//!     let c = r.root::<Customer>("ada")?.expect("committed above");
//!     assert_eq!((c.name.as_str(), c.orders.to_vec()), ("Ada", vec![1001]));
//!     Ok::<_, Error>(())
//! })?;
//! # Ok::<(), Error>(())
//! ```
pub use rvm_collections as collections;
pub use rvm_core::*;
pub use rvm_heap as heap;
pub use rvm_loader as loader;
