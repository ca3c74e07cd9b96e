//! The instance's options and the reports it gives (pure data).

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Tuning knobs of an instance; [`Options::default`] suits most uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Coalesce overlapping and adjacent ranges within a transaction and
    /// across unflushed no-flush commits (default on). Off gives a faithful
    /// log: one log transaction per commit, ranges exactly as declared.
    pub coalesce: bool,
    /// Bytes of unflushed no-flush commits kept in memory before they are
    /// written to the log (without a sync). Default 4 MiB, and never more
    /// than a quarter of the log.
    pub pending_limit: usize,
    /// Start background truncation when this fraction of the log is in use
    /// (default `Some(0.5)`); `None` disables the background thread, so
    /// space is reclaimed only by [`Rvm::truncate`](crate::Rvm::truncate) or by a writer that finds
    /// the log full.
    pub truncate_threshold: Option<f64>,
    /// The most log, in bytes, that may wait for recovery after a crash
    /// (default `None`: no bound but the log's size). The background thread starts reclaiming (a
    /// checkpoint, by default) when half of it is in use, and a writer
    /// that would take the log past it reclaims first, as when the log is
    /// full. A transaction larger than the bound is written alone.
    /// Enforced only where the background thread runs
    /// ([`Options::truncate_threshold`] is `Some`); `None` bounds the
    /// unapplied log by the log's size alone.
    ///
    /// Restart time follows the segment pages the unapplied log touches
    /// (each is read and written once) more than its bytes: after 200,000
    /// bank transfers the bound cut a reopen from 316 ms to 53 ms on a
    /// loaded 2-core machine. The price is paid by workloads that dirty
    /// many pages: small commits spread over 64 MiB ran at about half the
    /// rate, since writers then reclaim inline (docs/BENCHMARKS.md, "Log
    /// format 3"). No single bound in bytes gives both: restart follows
    /// the pages the unapplied log touches, so a bound that keeps restart
    /// near 20 ms for spread-out commits (well under 1 MB of their log)
    /// would checkpoint almost continuously. So the default is `None` (the
    /// unapplied log is bounded by the log's size alone, and a 256 MiB log
    /// of small ranges replays in about 0.3-1.2 s): set it (8 MiB was
    /// measured) where restart time matters more than peak commit rate.
    pub max_unapplied_log: Option<u64>,
    /// How the background thread frees log space when the threshold is
    /// passed (default [`Reclaim::Checkpoint`]). A writer that finds the
    /// log full always replays it ([`Rvm::truncate`](crate::Rvm::truncate)'s way), since it cannot
    /// wait for a sweep.
    pub reclaim: Reclaim,
    /// Bytes per second a checkpoint's sweep writes (default
    /// `Some(128 MiB)`), so that a large sweep leaves the disk and the CPU
    /// to the application's commits; `None` sweeps at full speed. A sweep
    /// goes faster when the log grows fast: it keeps ahead of the commits
    /// made since its freeze, so as to end before they fill half of the log
    /// space free at the freeze. The pace is dropped as soon as something
    /// waits for the checkpoint to end: a writer that finds the log full, a
    /// log-replay truncation, an unmap, closing the instance.
    /// [`Rvm::checkpoint_step`](crate::Rvm::checkpoint_step) is never paced.
    pub checkpoint_rate: Option<u64>,
    /// Write full batches of no-flush commits to the log on a background
    /// thread (default on), so the committing thread goes on at memory
    /// speed. At most two full batches wait for that thread besides the one
    /// it writes; a committer that finds more waits. Off, the committer that fills a
    /// batch writes it itself: one thread does all I/O in program order,
    /// which fault-injection tests rely on.
    pub write_behind: bool,
    /// Pages the checkpoint's write barrier may hold as copies at once
    /// (default 16384, 64 MiB with 4 KiB pages). Past it, a writer that
    /// touches a page still waiting to be swept sweeps pages itself first.
    pub checkpoint_copy_limit: usize,
    /// Open a damaged log anyway (default off). Recovery normally refuses a
    /// log whose synced records are damaged ([`Error::Corrupted`](crate::Error::Corrupted)) and
    /// writes nothing; with `salvage` it keeps a copy of the log beside it
    /// (`<log>.damaged-<epoch>`), applies the complete transactions before
    /// the damage, drops the rest, and reports what it dropped in
    /// [`RecoveryReport::salvage`].
    pub salvage: bool,
    /// Segments accepted although their file is not the one the log
    /// recorded: `(recorded name, path now)`. For a segment restored from a
    /// copy (same path twice) or moved to another path; see
    /// [`Options::accept_segment`].
    pub accepted_segments: Vec<(PathBuf, PathBuf)>,
    /// Called as recovery at open goes (about every MiB of log, and at the
    /// end of each phase), for a progress display; `None` (the default)
    /// reports nothing.
    pub recovery_progress: Option<ProgressHook>,
    /// Twin pages preallocated for tracked transactions (default 4096, 16
    /// MiB with 4 KiB pages): the pages one tracked transaction may change.
    /// A transaction that changes more fails at commit
    /// ([`crate::TxError::TwinPoolExhausted`]) and is rolled back.
    pub tracked_pool_pages: usize,
    /// What tracked commits log (default [`crate::TrackedLogging::Diff`]).
    pub tracked_logging: crate::TrackedLogging,
    /// How [`crate::Rvm::track`] finds tracked stores (default
    /// [`crate::TrackingMethod::Fault`]; [`crate::Rvm::track_with`] chooses
    /// per region). [`crate::TrackingMethod::WriteProtect`] costs page
    /// tables for the whole of every region it tracks (≈ 2 MiB per GiB)
    /// and a walk of them at each begin and commit (≈ 0.4 µs per MiB).
    pub tracking: crate::TrackingMethod,
    /// Check for stores that no `set_range` declared (default: on in debug
    /// builds, off in release builds): at commit, every page the
    /// transaction declared something in, and before a checkpoint's sweep,
    /// every page it will write; an undeclared changed byte fails the
    /// commit or checkpoint with [`crate::TxError::UndeclaredStore`]. Costs
    /// a shadow copy of each page ever declared and a page compare per
    /// declared page at commit.
    pub verify_stores: bool,
    /// Instant restart (default off): [`Rvm::open`] returns once the log is
    /// verified and the segments checked (steps 1-3 of recovery), without
    /// applying the log; a background thread applies it and writes the new
    /// status, and a page of a copy-on-demand region that still waits for
    /// its records is brought up to date the first time it is touched (a
    /// page fault; before the status allowing segment writes is durable,
    /// the page is built in private memory and the segment is left
    /// alone, so the first touch waits for no log sync). Regions copied at
    /// map time, tracked regions and region growth wait for their
    /// segment's pages instead. Until the background
    /// apply is durable nothing is written to the log: a full batch of
    /// no-flush commits, a flush, a truncation or a checkpoint waits for it
    /// ([`Rvm::wait_for_recovery`]). A crash meanwhile recovers again from
    /// the same log. The open still verifies the whole log (its time grows
    /// with the log); the index of pending pages costs about 16 bytes per
    /// logged range until the apply ends, and a log whose index would take
    /// more than a quarter of the memory the process may use is recovered the usual
    /// way instead (docs/DESIGN.md §3.9). It pays where the log's pending
    /// pages are few for its bytes: for a log of small ranges spread over
    /// a whole segment (278 MB over 16,384 pages measured), the open took
    /// about as long as full recovery and the background apply ended 3.4-5.4x
    /// later.
    ///
    /// Pages are brought in by a `SIGSEGV` handler: the kernel does not
    /// fault for its own accesses, so a system call given a pointer into a
    /// page that is still pending (`read(2)` into a region, `write(2)` from
    /// one) fails with `EFAULT`; touch the memory first or wait for
    /// recovery. A `SIGSEGV` handler the program installs after the open
    /// must pass faults it does not own to the action it replaced (as
    /// crash reporters do), or the first touch of a pending page goes to
    /// it alone.
    ///
    /// [`Rvm::open`]: crate::Rvm::open
    /// [`Rvm::wait_for_recovery`]: crate::Rvm::wait_for_recovery
    pub instant_recovery: bool,
    /// Instant recovery's verifying scan on two threads (default off):
    /// both scan chunks of the log into parts of the index, joined in log
    /// order only where each starts exactly where the ones before end, so
    /// the result is the one-thread scan's (docs/DESIGN.md §3.9); the
    /// second thread starts after the first MiB of log. Off by default: on
    /// the 2-vCPU virtual machine it was measured on, a 10.7 MB log was
    /// scanned in 3.5 ms instead of 4.7-4.9 ms for 1.3x the CPU, but each
    /// thread ran 25-30% slower while both ran and a 2 MB log opened
    /// slower (docs/BENCHMARKS.md). Measured again after the one-thread
    /// open got faster, from a fresh crash per reopen of an 8-9 MB log,
    /// the first read came about 1 ms later with it than without (2.7
    /// against 1.8 ms; not traced further). Ignored without instant
    /// recovery, on one core, or when the log cannot be mapped.
    pub parallel_scan: bool,
    /// Allocate a segment's disk blocks when it is created or extended
    /// ([`Rvm::create_segment`](crate::Rvm::create_segment),
    /// [`Rvm::extend_segment`](crate::Rvm::extend_segment); default on), so
    /// that a full disk is an error of kind
    /// [`std::io::ErrorKind::StorageFull`] there and then, never at a later
    /// checkpoint or truncation (which would stop the instance with its
    /// commits safe in the log, but unable to apply them until space is
    /// freed). Off makes segments sparse: blocks are taken as pages are
    /// written, for a segment much larger than the data it will hold. On a
    /// full `tmpfs` (which allocates even to read a hole through a
    /// mapping), reading a never-written page of a mapped region then
    /// raises `SIGBUS`. File systems without `fallocate` are always sparse.
    /// The log's own space is always allocated by
    /// [`create_log`](crate::create_log).
    pub reserve_segment_space: bool,
}

/// The phase recovery is in ([`RecoveryProgress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryPhase {
    /// Checking every frame of the live log, writing nothing.
    Verify,
    /// Applying the complete transactions to the segments.
    Replay,
}

/// How far recovery is: `done` of `total` log bytes in `phase` (`total`
/// is an estimate while verifying: the part of the log known durable; it
/// grows if the scan goes past it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryProgress {
    /// The phase.
    pub phase: RecoveryPhase,
    /// Log bytes done in this phase.
    pub done: u64,
    /// Log bytes this phase covers (see above).
    pub total: u64,
}

/// A callback for [`Options::recovery_progress`].
///
/// ```
/// use rvm_core::{Options, ProgressHook};
/// let opts = Options {
///     recovery_progress: Some(ProgressHook::new(|p| eprintln!("{:?}: {} of {}", p.phase, p.done, p.total))),
///     ..Options::default()
/// };
/// # let _ = opts;
/// ```
#[derive(Clone)]
pub struct ProgressHook(Arc<dyn Fn(RecoveryProgress) + Send + Sync>);

impl ProgressHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn(RecoveryProgress) + Send + Sync + 'static) -> Self {
        ProgressHook(Arc::new(f))
    }

    pub(crate) fn report(&self, phase: RecoveryPhase, done: u64, total: u64) {
        (self.0)(RecoveryProgress { phase, done, total: total.max(done) });
    }
}

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

impl PartialEq for ProgressHook {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Log bytes between two progress reports.
pub(crate) const PROGRESS_STEP: u64 = 1 << 20;

impl Options {
    /// Accepts the file at `now_at` as the segment the log recorded as
    /// `recorded` (its identity is not checked): for a segment restored
    /// from a copy (`now_at == recorded`) or moved. Its records are applied
    /// to `now_at`.
    ///
    /// ```
    /// let opts = rvm_core::Options::default().accept_segment("/data/app.seg", "/data/app.seg");
    /// assert_eq!(opts.accepted_segments.len(), 1);
    /// ```
    pub fn accept_segment(mut self, recorded: impl Into<PathBuf>, now_at: impl Into<PathBuf>) -> Self {
        self.accepted_segments.push((recorded.into(), now_at.into()));
        self
    }

    /// The path a recorded segment name is opened at, and whether its
    /// identity is checked.
    pub(crate) fn segment_location(&self, recorded: &Path) -> (PathBuf, bool) {
        match self.accepted_segments.iter().find(|(r, _)| r == recorded) {
            Some((_, now)) => (now.clone(), false),
            None => (recorded.to_path_buf(), true),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            coalesce: true,
            pending_limit: 4 << 20,
            truncate_threshold: Some(0.5),
            max_unapplied_log: None,
            reclaim: Reclaim::Checkpoint,
            checkpoint_copy_limit: 16384,
            write_behind: true,
            checkpoint_rate: Some(128 << 20),
            salvage: false,
            accepted_segments: Vec::new(),
            recovery_progress: None,
            tracked_pool_pages: 4096,
            tracked_logging: crate::TrackedLogging::Diff,
            tracking: crate::TrackingMethod::Fault,
            verify_stores: cfg!(debug_assertions),
            instant_recovery: false,
            parallel_scan: false,
            reserve_segment_space: true,
        }
    }
}

/// How log space is reclaimed in the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reclaim {
    /// The generation checkpoint: each dirty page written once, from memory,
    /// while transactions go on ([`Rvm::checkpoint`](crate::Rvm::checkpoint)).
    #[default]
    Checkpoint,
    /// Log replay: the log's records are applied to the segments
    /// ([`Rvm::truncate`](crate::Rvm::truncate)), RVM's classic truncation.
    Replay,
}

/// Whether an abort restores memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    /// Old values are saved at `set_range`; abort restores them exactly.
    Restore,
    /// No old values are kept; after an abort the declared ranges hold
    /// whatever was stored in them (they are never committed).
    NoRestore,
}

/// Whether a commit waits for durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitMode {
    /// Returns when the transaction (and every earlier commit) is durable.
    Flush,
    /// Returns at memory speed; a later flush makes it durable.
    NoFlush,
}

/// What a salvage ([`Options::salvage`]) dropped from a damaged log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Salvage {
    /// Log position of the first damaged frame: transactions from there on
    /// were dropped.
    pub damaged_at: u64,
    /// What was wrong with it.
    pub defect: &'static str,
    /// The log had been durable up to this position.
    pub synced_to: u64,
    /// Log bytes dropped: from the damage to the end of the valid frames
    /// after it.
    pub dropped_bytes: u64,
    /// Complete transactions seen after the damage (dropped), besides the
    /// one the damaged frame belonged to.
    pub dropped_transactions: u64,
    /// Where the damaged log was copied before anything was written.
    pub copy: PathBuf,
}

/// What recovery did when the instance was opened.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    /// Complete transactions replayed onto segments.
    pub transactions: u64,
    /// Log bytes of those transactions.
    pub log_bytes: u64,
    /// Bytes of valid frames after the last complete transaction (an
    /// unfinished tail), discarded.
    pub discarded_bytes: u64,
    /// Segment bytes written.
    pub segment_bytes_written: u64,
    /// Log position where the scan stopped on a damaged or stale frame, with
    /// the reason (`None` if the scan reached the end of the ring). Every
    /// log that does not fill its ring ends so: after a clean close the
    /// scan stops at the first never-written or stale byte (`"bad record
    /// length"` and the like), which is the log's normal end, not damage.
    /// Damage that loses acknowledged commits makes `open` fail instead
    /// (or, with [`Options::salvage`], is reported in
    /// [`RecoveryReport::salvage`]).
    pub stopped_at: Option<(u64, &'static str)>,
    /// Set when a damaged log was salvaged ([`Options::salvage`]): what was
    /// dropped.
    pub salvage: Option<Salvage>,
    /// Segment pages left to instant recovery's background thread
    /// ([`Options::instant_recovery`]; 0 otherwise): `open` wrote none of
    /// them.
    pub deferred_pages: u64,
}

/// A snapshot of the log and transaction state (see [`Rvm::query`](crate::Rvm::query)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Query {
    /// Transactions begun and not yet committed or aborted.
    pub in_flight: usize,
    /// Capacity of the log's record area.
    pub log_capacity: u64,
    /// Log bytes written and not yet truncated.
    pub log_used: u64,
    /// Log bytes free.
    pub log_free: u64,
    /// Bytes of committed no-flush transactions not yet written to the log.
    pub pending_bytes: u64,
    /// Oldest live log position.
    pub head: u64,
    /// Log position after the last written batch.
    pub tail: u64,
    /// Log position up to which the log is durable.
    pub durable: u64,
    /// True when nothing is pending, the log is empty and no transaction is
    /// in flight: segments hold the whole committed state.
    pub quiescent: bool,
    /// A generation checkpoint is running (frozen or sweeping).
    pub checkpointing: bool,
    /// Instant recovery's background apply is still running
    /// ([`Options::instant_recovery`]).
    pub recovering: bool,
}
