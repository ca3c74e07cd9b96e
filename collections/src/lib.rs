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
