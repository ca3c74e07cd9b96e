//! # rvm: a recoverable persistent heap
//!
//! The facade crate: it re-exports the layers ([`core`](rvm_core),
//! [`loader`], [`heap`]) and ships the `rvmutl` command-line tool.
pub use rvm_collections as collections;
pub use rvm_core::*;
pub use rvm_heap as heap;
pub use rvm_loader as loader;
