//! Statistics counters and their snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $(pub $name: AtomicU64,)* }

        /// A snapshot of an instance's statistics (see [`crate::Rvm::stats`]).
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            pub fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Transactions begun.
    begun,
    /// Transactions committed (both modes).
    committed,
    /// Transactions aborted (explicitly or by drop).
    aborted,
    /// Commits in flush mode.
    flush_commits,
    /// Commits in no-flush mode.
    no_flush_commits,
    /// Bytes declared by committed transactions (`set_range` lengths).
    bytes_declared,
    /// Bytes saved by intra-transaction coalescing.
    bytes_saved_intra,
    /// Bytes saved by inter-transaction coalescing of unflushed commits.
    bytes_saved_inter,
    /// Range data bytes written to the log.
    bytes_logged,
    /// Total bytes appended to the log (frames, headers included).
    log_bytes_written,
    /// Batches written to the log.
    log_writes,
    /// Log syncs (`fdatasync`); group commit makes this smaller than
    /// `flush_commits`.
    log_syncs,
    /// Truncations completed.
    truncations,
    /// Log bytes reclaimed by truncation.
    truncated_bytes,
    /// Bytes written to segments by truncation.
    segment_bytes_written,
    /// Times a writer waited for log space.
    log_full_waits,
    /// Generation checkpoints completed.
    checkpoints,
    /// Checkpoints cancelled because a log-replay truncation overtook them.
    checkpoints_cancelled,
    /// Pages written to segments by checkpoints.
    checkpoint_pages,
    /// Bytes written to segments by checkpoints.
    checkpoint_bytes,
    /// Pages a checkpoint rebuilt from the segment and the log (they held
    /// bytes of transactions in flight at the freeze, or of a no-restore
    /// abort).
    checkpoint_rebuilt_pages,
    /// Total time spent frozen (commit lock held by a freeze), nanoseconds.
    checkpoint_freeze_ns,
    /// Longest freeze, nanoseconds.
    checkpoint_freeze_max_ns,
    /// Last freeze, nanoseconds.
    checkpoint_freeze_last_ns,
    /// Total time from freeze to finish of completed checkpoints, nanoseconds.
    checkpoint_sweep_ns,
    /// Pages copied by the write barrier (a store to a page still waiting
    /// to be swept).
    checkpoint_copies,
    /// Times a writer found the copy pool full and swept pages itself.
    checkpoint_stalls,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

impl Stats {
    /// Bytes saved by both kinds of coalescing.
    pub fn bytes_saved(&self) -> u64 {
        self.bytes_saved_intra + self.bytes_saved_inter
    }
}
