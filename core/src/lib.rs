//! # rvm-core: recoverable virtual memory
//!
//! Segments (files or block devices) are mapped into memory as regions;
//! transactions declare the ranges they change ([`Transaction::set_range`]),
//! store into them with ordinary writes, and commit. Commits go to a
//! write-ahead redo log; truncation applies the log to the segments; at open,
//! recovery replays what the log holds. After any crash, the segments show a
//! prefix of the commit order that includes every flush-committed
//! transaction.
//!
//! This is the core layer of the `rvm` crate; see `docs/DESIGN.md` for the
//! on-disk formats and protocols.
#![deny(unsafe_op_in_unsafe_fn)]

mod coalesce;
mod crc;
mod error;
mod fault;
mod instance;
mod lazy;
pub mod log;
mod mem;
mod options;
mod pagemap;
mod replay;
mod segment;
mod stats;
pub mod storage;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod track;
mod tracked;
mod tx;
mod verify;
mod wp;

pub use error::{Error, LogError, MapError, Result, TxError};
pub use instance::{recover_log, CheckpointReport, Rvm};
pub use log::{create_log, create_log_with};
pub use mem::page_size;
pub use options::{
    CommitMode, Options, ProgressHook, Query, Reclaim, RecoveryPhase, RecoveryProgress, RecoveryReport, RestoreMode,
    Salvage,
};
pub use segment::{CopyMode, MapSpec, Placement, Region, RegionClaim, Segment};
pub use stats::Stats;
pub use storage::{FileStorage, FileVfs, OpenMode, Storage, Vfs};
pub use tracked::{TrackedLogging, TrackingMethod};
pub use tx::Transaction;
