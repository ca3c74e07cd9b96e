//! Crash testing: a simulated device that can lose or tear unsynced writes.
//!
//! [`SimDisk`] is an in-memory [`Vfs`](crate::storage::Vfs): one crash
//! domain holding several named files. Every file keeps a *live* image (what
//! reads see) and a *durable* image (what survives a crash), and remembers
//! the sector writes issued since its last [`sync`](crate::storage::Storage::sync).
//! [`SimDisk::crash`] then throws away all, or a random subset, of those
//! writes, optionally tearing the last one, and invalidates every open
//! handle, exactly like a power failure followed by a restart.
//!
//! The device also injects faults: [`SimDisk::fail_after`] makes the n-th
//! storage operation from now (and every later one) fail, and
//! [`SimDisk::fail_syncs`] makes every sync fail.
//!
//! This module exists in unit tests and with the `testing` feature. It
//! also holds the fuzz body for the log scanner and recovery
//! ([`fuzz_log_image`]).

mod fuzz;
mod sim;
pub use fuzz::*;
pub use sim::*;
