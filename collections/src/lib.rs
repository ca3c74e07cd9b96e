//! # rvm-collections: typed, safe persistent data
//!
//! The layer a program touches: values of [`Persist`] types live in a
//! recoverable heap under named, typed roots, and change only inside
//! closure transactions that commit on `Ok` and undo everything on `Err`
//! or panic.
//!
//! ```
//! use rvm_collections::{Config, PHeap, Persist};
//!
//! #[derive(Persist, Clone, Copy)]
//! #[repr(C)]
//! struct Totals {
//!     deposits: u64,
//!     withdrawals: u64,
//! }
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let heap = PHeap::open_or_create(dir.path(), Config::default())?;
//! // Commits durably on Ok ...
//! heap.write(|tx| {
//!     let mut t = tx.root_or_insert_with("totals", || Totals { deposits: 0, withdrawals: 0 })?;
//!     t.deposits += 100;
//!     Ok::<_, rvm_collections::Error>(())
//! })?;
//! // ... and undoes every change on Err (or panic).
//! #[derive(Debug)]
//! enum BankError {
//!     Heap(rvm_collections::Error),
//!     InsufficientFunds,
//! }
//! impl From<rvm_collections::Error> for BankError {
//!     fn from(e: rvm_collections::Error) -> Self {
//!         BankError::Heap(e)
//!     }
//! }
//! let r = heap.write(|tx| {
//!     let mut t = tx.root_mut::<Totals>("totals")?.expect("made above");
//!     t.withdrawals += 500;
//!     if t.withdrawals > t.deposits {
//!         return Err(BankError::InsufficientFunds);
//!     }
//!     Ok(())
//! });
//! assert!(matches!(r, Err(BankError::InsufficientFunds)));
//! let t = heap.read(|r| r.root::<Totals>("totals").map(|t| t.copied()))?.unwrap();
//! assert_eq!((t.deposits, t.withdrawals), (100, 0));
//! # Ok::<(), rvm_collections::Error>(())
//! ```
//!
//! Values that own no heap block ([`Plain`]: integers, floats, arrays,
//! derived structs of them) are handed out as `&mut` (through a [`Mut`]
//! guard). Values that own blocks — the collections [`PVec`], [`PString`],
//! [`PHashMap`], [`PBTreeMap`], the owned pointer [`PBox`], and structs
//! holding them — nest in one another to any depth and change through
//! their guard's methods, each declaring only the bytes it changes; a
//! value moved out of the heap is an [`Owned`] value of the transaction,
//! stored elsewhere or freed when dropped:
//!
//! ```
//! use rvm_collections::{Config, Error, PBTreeMap, PHeap, PString, PVec, Persist};
//!
//! #[derive(Persist)]
//! #[repr(C)]
//! struct Customer {
//!     name: PString,
//!     orders: PVec<u64>,
//! }
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let heap = PHeap::open_or_create(dir.path(), Config::default())?;
//! heap.write(|tx| {
//!     let mut customers = tx.root_or_insert_with("customers", PBTreeMap::<u64, Customer>::new)?;
//!     customers.insert_owned(7, Customer { name: PString::new(), orders: PVec::new() })?;
//!     let mut c = customers.get_mut(&7)?.expect("just inserted");
//!     c.field_mut(|c| &c.name).push_str("Ada")?;
//!     c.field_mut(|c| &c.orders).extend([1001, 1002])?;
//!     Ok::<_, Error>(())
//! })?;
//! let orders = heap.read(|r| {
//!     let customers = r.root::<PBTreeMap<u64, Customer>>("customers")?.expect("made above");
//!     Ok::<_, Error>(customers.get(&7).map(|c| (c.name.to_string(), c.orders.to_vec())))
//! })?;
//! assert_eq!(orders, Some(("Ada".to_string(), vec![1001, 1002])));
//! # Ok::<(), Error>(())
//! ```
//!
//! [`PHeap::check`] (and `rvmutl heap check`) walks every root by its
//! type's shape, stored in the heap, and reports any block no root
//! reaches.
//!
//! # Crash-testing your own structures
//!
//! The simulated disk (`rvm_core::testing::SimDisk`, feature `testing`;
//! `rvm::testing` in the facade crate) keeps a live and a durable image of
//! every file, can fail the N-th storage operation, and at a crash keeps
//! only what was synced plus any subset of the rest, the last sector torn.
//! Run your transactions on it, cut the power anywhere, reopen, and check
//! that you find a committed state that includes every flushed
//! transaction:
//!
//! ```
//! use rvm_collections::{Config, Error, PHeap, PVec};
//! use rvm_core::testing::{CrashMode, SimDisk};
//! use std::{path::Path, sync::Arc};
//!
//! let config = Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() };
//! let open = |disk: &SimDisk| PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("db"), config.clone());
//! for cut in (0..300).step_by(13) {
//!     let disk = SimDisk::new();
//!     let heap = open(&disk)?;
//!     disk.fail_after(cut); // the power fails at storage operation `cut`
//!     let mut flushed = 0;
//!     for i in 0..20u64 {
//!         if heap.write(|tx| tx.root_or_insert_with("log", PVec::<u64>::new)?.push(i)).is_err() {
//!             break;
//!         }
//!         flushed = i + 1;
//!     }
//!     disk.crash(CrashMode::KeepRandomSubset { seed: cut, tear_last: true });
//!     disk.clear_faults();
//!     drop(heap);
//!     let heap = open(&disk)?;
//!     let found = heap.read(|r| r.root::<PVec<u64>>("log").map(|v| v.map_or(Vec::new(), |v| v.to_vec())))?;
//!     // Every flushed push is there (the one that failed may be too), in order.
//!     assert!(found.len() as u64 == flushed || found.len() as u64 == flushed + 1, "{found:?}");
//!     assert!(found.iter().copied().eq(0..found.len() as u64));
//!     assert!(heap.check()?.is_clean());
//! }
//! # Ok::<(), Error>(())
//! ```
//!
//! `collections/tests/crash_harness.rs` in the repository is the same
//! idea as a proptest (random operations on a derived structure that owns
//! collections, random cut points, a model to compare with): copy it into
//! your `tests/` and put your own types and operations in.

mod boxed;
pub mod btree_map;
mod error;
pub mod hash_map;
mod owned;
pub mod persist;
mod pheap;
mod raw;
pub mod shape;
mod string;
mod tx;
mod vec;

pub use boxed::PBox;
pub use btree_map::PBTreeMap;
pub use error::{Error, Result};
pub use hash_map::PHashMap;
pub use owned::{IntoPersist, Owned};
pub use persist::Persist;
pub use persist::Plain;
pub use pheap::{CheckReport, Config, PHeap, HEAP_FILE, LOG_FILE};
pub use rvm_collections_derive::Persist;
pub use shape::{reachability, Reachability};
pub use string::PString;
pub use tx::{Mut, ReadTx, RootMut, RootRef, WriteTx};
pub use vec::PVec;
