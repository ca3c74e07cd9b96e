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
//! derived structs of them) are handed out as `&mut`; the collections
//! ([`PVec`], [`PString`], [`PHashMap`], [`PBTreeMap`]) are kept as roots
//! and change through their root's guard, each change declaring only the
//! bytes it changes. Persistent pointers (`PBox`) and collections nested in
//! other values come next.

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
