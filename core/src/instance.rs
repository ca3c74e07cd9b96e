//! An RVM instance: one log, its segments and regions, the commit pipeline
//! (pending no-flush commits, ordered batch writes, group commit), log
//! truncation by replay, recovery at open, and the background truncator.

use crate::checkpoint::{CheckpointReport, Checkpointer, RegionTrack};
use crate::coalesce::{Coalescer, Piece};
use crate::error::{Error, LogError, MapError, Result};
use crate::log::format::{self, FrameWriter, Status};
use crate::log::{self, LogDevice, Ring, ScanStop};
use crate::mem::{self, Mapping};
use crate::replay::{replay, replay_with_progress, Replayed};
use crate::segment::{
    CopyMode, MapSpec, Placement, Region, RegionClaim, RegionInner, RegionTable, Segment, SegmentInner,
};
use crate::stats::{Counters, Stats};
use crate::storage::{FileVfs, OpenMode, Vfs};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

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
    /// space is reclaimed only by [`Rvm::truncate`] or by a writer that finds
    /// the log full.
    pub truncate_threshold: Option<f64>,
    /// How the background thread frees log space when the threshold is
    /// passed (default [`Reclaim::Checkpoint`]). A writer that finds the
    /// log full always replays it ([`Rvm::truncate`]'s way), since it cannot
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
    /// [`Rvm::checkpoint_step`] is never paced.
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
    /// log whose synced records are damaged ([`Error::Corrupted`]) and
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
    /// Check for stores that no `set_range` declared (default: on in debug
    /// builds, off in release builds): at commit, every page the
    /// transaction declared something in, and before a checkpoint's sweep,
    /// every page it will write; an undeclared changed byte fails the
    /// commit or checkpoint with [`crate::TxError::UndeclaredStore`]. Costs
    /// a shadow copy of each page ever declared and a page compare per
    /// declared page at commit.
    pub verify_stores: bool,
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

    fn report(&self, phase: RecoveryPhase, done: u64, total: u64) {
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
const PROGRESS_STEP: u64 = 1 << 20;

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
    fn segment_location(&self, recorded: &Path) -> (PathBuf, bool) {
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
            reclaim: Reclaim::Checkpoint,
            checkpoint_copy_limit: 16384,
            write_behind: true,
            checkpoint_rate: Some(128 << 20),
            salvage: false,
            accepted_segments: Vec::new(),
            recovery_progress: None,
            tracked_pool_pages: 4096,
            tracked_logging: crate::TrackedLogging::Diff,
            verify_stores: cfg!(debug_assertions),
        }
    }
}

/// How log space is reclaimed in the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reclaim {
    /// The generation checkpoint: each dirty page written once, from memory,
    /// while transactions go on ([`Rvm::checkpoint`]).
    #[default]
    Checkpoint,
    /// Log replay: the log's records are applied to the segments
    /// ([`Rvm::truncate`]), RVM's classic truncation.
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
    /// the reason (`None` if the scan reached the end of the ring).
    pub stopped_at: Option<(u64, &'static str)>,
    /// Set when a damaged log was salvaged ([`Options::salvage`]): what was
    /// dropped.
    pub salvage: Option<Salvage>,
}

/// A snapshot of the log and transaction state (see [`Rvm::query`]).
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
}

/// Unflushed no-flush commits, in commit order.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pieces: Vec<Piece>,
    data: Vec<u8>,
    /// (end index in `pieces`, commit sequence number) per transaction.
    tx_ends: Vec<(usize, u64)>,
    /// Bytes after intra-transaction coalescing.
    bytes: u64,
    /// Log bytes its transactions' frames take at most (before any
    /// inter-transaction coalescing): bounds the batch so it always fits
    /// in the log, however small its ranges.
    frame_bytes: u64,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.tx_ends.is_empty()
    }
}

/// Full batches that may wait for the background log writer
/// ([`Options::write_behind`]), besides the one it is writing, before
/// committers wait for it.
pub(crate) const SPOOLED_BATCHES: usize = 2;

#[derive(Debug, Default)]
pub(crate) struct CommitState {
    pub(crate) pending: Batch,
    pub(crate) next_tx: u64,
    /// Every commit with a sequence number up to this is durable.
    durable_tx: u64,
    pub(crate) next_batch: u64,
    flushing: bool,
    /// Full batches for the background log writer, in batch-number order
    /// (they are queued under this lock as their numbers are handed out).
    spool: std::collections::VecDeque<(u64, Batch)>,
    /// Written batches kept for reuse: their buffers are grown already.
    spare: Vec<Batch>,
    /// Tells the background log writer to exit once the spool is empty.
    writer_stop: bool,
    /// Threads in `flush_to`.
    flush_waiters: usize,
    /// Flushers the last log sync served (its leader waited for as many).
    last_group: usize,
    /// A leader waits for more flushers (`Inner::gathered`).
    gathering: bool,
}

/// The longest a flush leader waits for other flushers before its sync.
const MAX_GATHER: Duration = Duration::from_millis(1);

impl CommitState {
    /// Takes the pending batch (replaced by a spare one) and gives it the
    /// next batch number: log order is the order of these calls.
    pub(crate) fn take_batch(&mut self) -> (u64, Batch) {
        let fresh = self.spare.pop().unwrap_or_default();
        let batch = std::mem::replace(&mut self.pending, fresh);
        self.next_batch += 1;
        (self.next_batch - 1, batch)
    }

    /// Keeps a written batch's buffers for a later one, if it is big enough
    /// to be worth keeping (a full batch) and few are kept already.
    fn recycle(&mut self, mut batch: Batch, pending_limit: usize) {
        if self.spare.len() < SPOOLED_BATCHES && batch.data.capacity() >= pending_limit {
            batch.pieces.clear();
            batch.data.clear();
            batch.tx_ends.clear();
            batch.bytes = 0;
            batch.frame_bytes = 0;
            self.spare.push(batch);
        }
    }
}

#[derive(Debug)]
struct Writer {
    next_batch: u64,
    frames: Vec<u8>,
    coalescer: Coalescer,
}

#[derive(Debug)]
pub(crate) struct StatusState {
    pub(crate) status: Status,
    segments: HashMap<u32, Arc<SegmentInner>>,
}

#[derive(Debug, Default)]
struct Background {
    stop: Mutex<bool>,
    wake: Condvar,
}

pub(crate) struct Inner {
    id: u64,
    /// The log's identity (its superblock's), written in segments' owner marks.
    log_id: u128,
    vfs: Arc<dyn Vfs>,
    pub(crate) ring: Ring,
    pub(crate) opts: Options,
    pub(crate) epoch: u64,
    pending_limit: usize,
    pub(crate) state: Mutex<CommitState>,
    flushed: Condvar,
    /// Wakes a flush leader waiting for more flushers.
    gathered: Condvar,
    /// How long the last log sync took, in nanoseconds.
    last_sync_ns: AtomicU64,
    /// Wakes the background log writer (a batch was spooled, or stop).
    spooled: Condvar,
    /// Wakes committers waiting for room in the spool.
    spool_room: Condvar,
    log_writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Bytes of spooled batches not yet written (raised under the commit
    /// lock as a batch is spooled, lowered as its write completes).
    spooled_bytes: AtomicU64,
    writer: Mutex<Writer>,
    written_cv: Condvar,
    synced: AtomicU64,
    /// Log position after the last written batch: changed only under the
    /// writer lock, read anywhere.
    tail: AtomicU64,
    pub(crate) head: AtomicU64,
    pub(crate) status: Mutex<StatusState>,
    pub(crate) truncation: Mutex<()>,
    pub(crate) ckpt: Checkpointer,
    pub(crate) regions: RwLock<RegionTable>,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) counters: Counters,
    recovery: RecoveryReport,
    background: Arc<Background>,
    bg_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Tracked transactions' state (created with the first tracked region).
    pub(crate) tracked: crate::tracked::SessionCell,
    /// The undeclared-store detector, if on.
    pub(crate) verify: Option<crate::verify::Verifier>,
}

/// An RVM instance: a log and the segments whose changes it records.
///
/// Cheap to clone (a shared handle); safe to use from many threads. The
/// instance flushes pending no-flush commits when the last handle is
/// dropped; [`Rvm::close`] does the same and reports errors.
///
/// ```
/// use rvm_core::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};
/// # let dir = tempfile::tempdir().unwrap();
/// let log = dir.path().join("log");
/// create_log(&log, 1 << 20).unwrap();
/// let rvm = Rvm::open(&log, Options::default()).unwrap();
/// let seg = rvm.create_segment(dir.path().join("seg"), 1 << 16).unwrap();
/// let region = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
/// let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
/// // SAFETY: the range is ours alone for the transaction's duration.
/// unsafe { tx.modify_bytes(region.addr(), b"hello").unwrap() };
/// tx.commit(CommitMode::Flush).unwrap();
/// ```
#[derive(Clone)]
pub struct Rvm {
    pub(crate) inner: Arc<Inner>,
    _life: Arc<Lifetime>,
}

/// Shared by the user's handles only (never by the background thread), so
/// dropping the last handle always runs the shutdown on the user's thread:
/// stop and join the truncator, then flush. Files are unlocked when `drop`
/// returns.
struct Lifetime {
    inner: Arc<Inner>,
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        let inner = &self.inner;
        // A background checkpoint still sweeping finishes at full speed.
        let _hurry = inner.ckpt.hurry();
        *inner.background.stop.lock() = true;
        inner.background.wake.notify_all();
        if let Some(h) = inner.bg_thread.lock().take() {
            let _ = h.join();
        }
        if !inner.poisoned.load(Ordering::Acquire) {
            let last = inner.state.lock().next_tx - 1;
            if inner.flush_to(last).is_ok() {
                // Record how far the log is durable, so that damage to any
                // of its records is told from a torn end at the next open.
                let _ = inner.record_synced_end(u64::MAX);
            }
        }
        // The log writer empties the spool (a flush did already, unless the
        // instance failed) and exits.
        inner.state.lock().writer_stop = true;
        inner.spooled.notify_all();
        if let Some(h) = inner.log_writer.lock().take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Rvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rvm").field("log", &self.inner.ring.path).field("epoch", &self.inner.epoch).finish()
    }
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

impl Rvm {
    /// Opens the log at `log_path` (a file or block device made by
    /// [`crate::create_log`]), runs recovery, and starts the background
    /// truncator if the options ask for one.
    pub fn open(log_path: impl AsRef<Path>, opts: Options) -> Result<Rvm> {
        Rvm::open_with(Arc::new(FileVfs), log_path.as_ref(), opts)
    }

    /// [`Rvm::open`] on any [`Vfs`], such as the simulated disk.
    pub fn open_with(vfs: Arc<dyn Vfs>, log_path: &Path, opts: Options) -> Result<Rvm> {
        let LogDevice { ring, sb, status } = LogDevice::open(vfs.as_ref(), log_path)?;
        let (status, recovery) = recover(vfs.as_ref(), &ring, &sb, status, &opts)?;
        let head = status.head;
        let pending_limit = opts.pending_limit.clamp(4096, (sb.area_len / 4) as usize);
        let inner = Arc::new(Inner {
            id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            vfs,
            epoch: status.epoch,
            pending_limit,
            state: Mutex::new(CommitState { next_tx: 1, ..CommitState::default() }),
            flushed: Condvar::new(),
            gathered: Condvar::new(),
            last_sync_ns: AtomicU64::new(0),
            spooled: Condvar::new(),
            spool_room: Condvar::new(),
            log_writer: Mutex::new(None),
            spooled_bytes: AtomicU64::new(0),
            writer: Mutex::new(Writer { next_batch: 0, frames: Vec::new(), coalescer: Coalescer::default() }),
            written_cv: Condvar::new(),
            synced: AtomicU64::new(head),
            tail: AtomicU64::new(head),
            head: AtomicU64::new(head),
            status: Mutex::new(StatusState { status, segments: HashMap::new() }),
            truncation: Mutex::new(()),
            ckpt: Checkpointer::new(opts.checkpoint_copy_limit, opts.checkpoint_rate),
            regions: RwLock::new(RegionTable::default()),
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            counters: Counters::default(),
            recovery,
            background: Arc::new(Background::default()),
            bg_thread: Mutex::new(None),
            tracked: Default::default(),
            verify: opts.verify_stores.then(Default::default),
            log_id: sb.log_id,
            ring,
            opts,
        });
        if let Some(threshold) = inner.opts.truncate_threshold {
            let weak = Arc::downgrade(&inner);
            let bg = inner.background.clone();
            let handle = std::thread::Builder::new()
                .name("rvm-truncate".into())
                .spawn(move || background_loop(weak, bg, threshold))
                .map_err(|e| Error::io("starting the truncation thread", log_path, e))?;
            *inner.bg_thread.lock() = Some(handle);
        }
        if inner.opts.write_behind {
            let me = inner.clone();
            let handle = std::thread::Builder::new()
                .name("rvm-log-writer".into())
                .spawn(move || me.write_spooled())
                .map_err(|e| Error::io("starting the log writer thread", log_path, e))?;
            *inner.log_writer.lock() = Some(handle);
        }
        Ok(Rvm { _life: Arc::new(Lifetime { inner: inner.clone() }), inner })
    }

    /// What recovery did at open.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner.recovery.clone()
    }

    /// The log's path.
    pub fn log_path(&self) -> &Path {
        &self.inner.ring.path
    }

    /// Opens an existing segment (file or block device), locking it
    /// exclusively. Opening a segment this instance has open already returns
    /// the same segment.
    ///
    /// A segment's committed changes stay in the log that recorded them
    /// until a checkpoint or truncation applies them (closing the instance
    /// does not). Until then, open the segment through that same log: its
    /// recovery applies them. Opened through another log, or read directly,
    /// the segment shows the state before those commits.
    pub fn open_segment(&self, path: impl AsRef<Path>) -> Result<Segment> {
        self.inner.open_segment(path.as_ref(), None)
    }

    /// Creates a segment file of `len` bytes (mode 0600); an existing file
    /// is an error.
    pub fn create_segment(&self, path: impl AsRef<Path>, len: u64) -> Result<Segment> {
        self.inner.open_segment(path.as_ref(), Some(len))
    }

    /// Closes a segment: applies every commit that changed it to it (a log
    /// replay, if any is still in the log) and forgets it, so its device is
    /// closed and unlocked once the last handle to it is gone (a clone of
    /// `segment` held elsewhere keeps it open). Refused while a region of
    /// it is mapped ([`MapError::SegmentInUse`]); mapping it afterwards
    /// through another handle is [`MapError::SegmentClosed`]. Open it again
    /// with [`Rvm::open_segment`].
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
    /// let region = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
    /// let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    /// // SAFETY: this thread alone uses the region.
    /// unsafe { tx.modify_bytes(region.addr(), b"kept").unwrap() };
    /// tx.commit(CommitMode::NoFlush).unwrap();
    /// rvm.unmap(region).unwrap();
    /// rvm.close_segment(seg).unwrap();
    /// // Applied and unlocked: the file holds the commit.
    /// assert_eq!(&std::fs::read(dir.path().join("seg")).unwrap()[..4], b"kept");
    /// ```
    pub fn close_segment(&self, segment: Segment) -> Result<()> {
        let seg = segment.0;
        self.inner.check_own(&seg)?;
        {
            let mapped = seg.mapped.lock();
            if !mapped.is_empty() {
                return Err(MapError::SegmentInUse { segment: seg.name.clone(), regions: mapped.len() }.into());
            }
            seg.closed.store(true, Ordering::Release);
        }
        // No region maps it any more, so no commit can change it now; the
        // replay applies every earlier one (the log must not keep records
        // naming a segment the instance no longer has open).
        if seg.last_tx.load(Ordering::Acquire) > 0 {
            if let Err(e) = self.inner.replay_all() {
                seg.closed.store(false, Ordering::Release);
                return Err(e);
            }
        }
        self.inner.status.lock().segments.remove(&seg.id);
        // This log holds nothing for it now (best effort: a mark left
        // behind is recognised as stale by the next log that opens it).
        let _ = seg.dev.set_owner_mark(None);
        Ok(())
    }

    /// Maps a page-aligned range of `segment` into memory. The region shows
    /// the segment's committed image. Fails if the range is mapped already
    /// (a range is mapped at most once), lies outside the segment, or (for a
    /// fixed placement) the address range is in use, or if `segment` was
    /// opened by another instance ([`MapError::ForeignSegment`]).
    ///
    /// # Other processes and the segment file
    ///
    /// The instance holds an exclusive (advisory) lock on the segment file.
    /// A process that ignores it and **truncates** the file while an
    /// on-demand ([`CopyMode::OnDemand`]) region is mapped makes the first
    /// access to a page not yet read in raise `SIGBUS`; one that **writes**
    /// the file changes the bytes of such pages under the program (copy
    /// modes `OnMap` and `NoCopy` read nothing from the file after `map`).
    /// `map` is nevertheless safe: it hands out no reference into the
    /// memory; every access goes through `unsafe` code whose contract
    /// ([`Region::read`], [`crate::Transaction::modify_bytes`], raw
    /// pointers) includes that the file is not changed behind the lock, as
    /// memmap2's `Mmap::map` states for the same hazard. A segment truncated
    /// behind the log's back is reported at the next open as
    /// [`LogError::SegmentTooShort`], never as log damage.
    pub fn map(&self, segment: &Segment, spec: MapSpec) -> Result<Region> {
        self.inner.map(segment, spec)
    }

    /// Unmaps a region. Refused while a transaction with ranges in it is
    /// uncommitted. The memory goes away when the last clone of the handle
    /// is dropped.
    ///
    /// A region claimed by a loaded segment or a heap
    /// ([`Region::claim`]) is refused ([`MapError::Claimed`]): only its
    /// owner unmaps it, with [`Rvm::unmap_claimed`].
    pub fn unmap(&self, region: Region) -> Result<()> {
        self.unmap_region(region, false)
    }

    /// Unmaps a region its owner claimed ([`Region::claim`]), ending the
    /// claim; otherwise as [`Rvm::unmap`].
    pub fn unmap_claimed(&self, claim: RegionClaim) -> Result<()> {
        self.unmap_region(claim.release(), true)
    }

    fn unmap_region(&self, region: Region, claimed: bool) -> Result<()> {
        let addr = region.addr();
        // A tracked region's pages may be twinned by the open tracked
        // transaction (which counts no ranges in `active_txs`): wait for it.
        let _tracked = crate::tracked::hold_writers(&self.inner, &region.0)?;
        loop {
            {
                let mut table = self.inner.regions.write();
                match table.get(addr) {
                    Some(r) if Arc::ptr_eq(r, &region.0) => {}
                    _ => return Err(MapError::NotMapped { addr }.into()),
                }
                if !claimed && region.0.claimed.load(Ordering::Acquire) {
                    return Err(MapError::Claimed { addr }.into());
                }
                let busy = region.0.active_txs.load(Ordering::Acquire);
                if busy > 0 {
                    return Err(MapError::Busy { addr, count: busy }.into());
                }
                if !self.inner.ckpt.is_active() {
                    // The region's memory was the only copy a checkpoint could
                    // sweep its dirty pages from: the next checkpoint replays
                    // the log instead, so those commits reach the segment
                    // before the log is reclaimed.
                    if region.0.track.is_dirty() {
                        self.inner.ckpt.retire_dirty_region();
                    }
                    table.remove(addr);
                    return Ok(());
                }
            }
            // A running checkpoint may hold the region's memory: let it
            // finish, at full speed, so the segment range is free again.
            let _hurry = self.inner.ckpt.hurry();
            self.inner.checkpoint_finish()?;
        }
    }

    /// The region containing `addr`, if any.
    pub fn region_at(&self, addr: usize) -> Option<Region> {
        self.inner.regions.read().find(addr, addr.saturating_add(1)).cloned().map(Region)
    }

    /// All mapped regions, by address.
    pub fn regions(&self) -> Vec<Region> {
        self.inner.regions.read().iter().cloned().map(Region).collect()
    }

    /// Begins a transaction on this thread. A thread may have one open
    /// transaction per instance (no nesting).
    pub fn begin(&self, mode: RestoreMode) -> Result<crate::Transaction<'_>> {
        crate::tx::Transaction::begin(self, mode)
    }

    /// Makes every earlier commit durable (one `fdatasync`, shared with
    /// concurrent flushes).
    pub fn flush(&self) -> Result<()> {
        let last = self.inner.state.lock().next_tx - 1;
        self.inner.flush_to(last)
    }

    /// Runs a generation checkpoint: freezes (O(1): the commit lock is held
    /// for a few microseconds whatever the heap size), writes every page
    /// changed since the previous checkpoint once, as it stood at the
    /// freeze, syncs the segments and frees the log before the freeze.
    /// Transactions on other threads go on meanwhile. Every commit made
    /// before the call is in the segments when it returns.
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 1 << 16).unwrap();
    /// let region = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
    /// for i in 0..100u64 {
    ///     let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    ///     // SAFETY: this thread alone uses the region.
    ///     unsafe { tx.modify_bytes(region.addr(), &i.to_le_bytes()).unwrap() };
    ///     tx.commit(CommitMode::NoFlush).unwrap();
    /// }
    /// let report = rvm.checkpoint().unwrap();
    /// assert_eq!(report.pages, 1); // a hot word: one page written, once
    /// assert_eq!(rvm.query().log_used, 0);
    /// ```
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        self.inner.checkpoint_full()
    }

    /// Starts a checkpoint (the freeze, and the pages that must be rebuilt
    /// from the log), leaving the sweep to [`Rvm::checkpoint_step`] and
    /// [`Rvm::checkpoint_finish`]: for driving a checkpoint step by step, as
    /// deterministic tests do. Returns `false` if a checkpoint is running
    /// already (a second freeze never starts while a sweep runs), or if a
    /// log-replay truncation overtook this one.
    pub fn checkpoint_start(&self) -> Result<bool> {
        use crate::checkpoint::Start;
        // Overtaken: a replay did the work (a log-full writer, or an unmapped
        // dirty region); freeze again, a few times at most.
        for _ in 0..3 {
            match self.inner.checkpoint_start()? {
                Start::Started => return Ok(true),
                Start::Running => return Ok(false),
                Start::Overtaken => {}
            }
        }
        Ok(false)
    }

    /// Writes up to `max_pages` pages of the running checkpoint; returns how
    /// many it wrote (0 once all are written, or if none is running).
    pub fn checkpoint_step(&self, max_pages: usize) -> Result<usize> {
        self.inner.checkpoint_step(max_pages)
    }

    /// Completes the running checkpoint: the remaining pages, the segment
    /// syncs, the status that frees the log. `None` if none was running.
    pub fn checkpoint_finish(&self) -> Result<Option<CheckpointReport>> {
        self.inner.checkpoint_finish()
    }

    /// Stops the running checkpoint without freeing the log (pages already
    /// written stay; they hold committed bytes the log still covers). The
    /// next checkpoint writes the rest. Returns whether one was running.
    pub fn checkpoint_abandon(&self) -> Result<bool> {
        self.inner.checkpoint_abandon()
    }

    /// Flushes, then applies the whole log to the segments and empties it.
    pub fn truncate(&self) -> Result<()> {
        self.inner.replay_all()
    }

    /// Statistics since open.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Transactions in flight and log space.
    pub fn query(&self) -> Query {
        let inner = &self.inner;
        let pending_bytes = {
            let st = inner.state.lock();
            st.pending.data.len() as u64 + inner.spooled_bytes.load(Ordering::Acquire)
        };
        let tail = inner.log_tail();
        let head = inner.head.load(Ordering::Acquire);
        let used = tail - head;
        let in_flight = inner.in_flight.load(Ordering::Acquire);
        Query {
            in_flight,
            log_capacity: inner.ring.area_len,
            log_used: used,
            log_free: inner.ring.area_len - used,
            pending_bytes,
            head,
            tail,
            durable: inner.synced.load(Ordering::Acquire),
            quiescent: in_flight == 0 && pending_bytes == 0 && used == 0,
            checkpointing: inner.ckpt.is_active(),
        }
    }

    /// Flushes pending commits and stops the instance, reporting errors
    /// that dropping would swallow.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    pub(crate) fn instance_id(&self) -> u64 {
        self.inner.id
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("log", &self.ring.path).field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn opts(&self) -> &Options {
        &self.opts
    }

    pub(crate) fn coalesces(&self) -> bool {
        self.opts.coalesce
    }

    pub(crate) fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            let cause = self.poison_cause.lock().clone().unwrap_or_default();
            return Err(Error::Poisoned { cause });
        }
        Ok(())
    }

    /// Records a failure after which durability can no longer be promised.
    pub(crate) fn poison<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let mut cause = self.poison_cause.lock();
            if cause.is_none() {
                *cause = Some(e.to_string());
            }
            self.poisoned.store(true, Ordering::Release);
            self.flushed.notify_all();
            self.written_cv.notify_all();
            self.spool_room.notify_all();
        }
        r
    }

    fn open_segment(&self, path: &Path, create: Option<u64>) -> Result<Segment> {
        let name = self.vfs.canonical_name(path).map_err(|e| Error::io("resolving segment path", path, e))?;
        let mut st = self.status.lock();
        if let Some(seg) = st.segments.values().find(|s| s.name == name) {
            if create.is_some() {
                return Err(Error::io(
                    "creating segment",
                    path,
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
            return Ok(Segment(seg.clone()));
        }
        let mode = if create.is_some() { OpenMode::CreateNew } else { OpenMode::Existing };
        let dev = self.vfs.open(&name, mode).map_err(|e| Error::io("opening segment", &name, e))?;
        let opened = (|| {
            if let Some(len) = create {
                dev.set_len(len).map_err(|e| Error::io("sizing segment", &name, e))?;
                dev.sync().map_err(|e| Error::io("syncing segment", &name, e))?;
            }
            let len = dev.len().map_err(|e| Error::io("sizing segment", &name, e))?;
            let device = dev.identity().map_err(|e| Error::io("identifying segment", &name, e))?;
            self.claim_segment(dev.as_ref(), &name)?;
            let known = st.status.segments.iter().find(|e| e.name == name).cloned();
            let id = known.as_ref().map_or(st.status.next_segment_id, |e| e.id);
            let same = |e: &format::SegmentEntry| match (e.device, device) {
                (Some(a), Some(b)) => a.same_file(&b),
                (a, b) => a == b,
            };
            if known.as_ref().is_none_or(|e| !same(e)) {
                // The dictionary entry (new, or naming the file now under
                // that name: the log holds no records for it, since
                // recovery emptied it and this instance has not opened
                // it) is durable before any record can name the id.
                let mut next = st.status.clone();
                next.seq += 1;
                if known.is_none() {
                    next.next_segment_id =
                        id.checked_add(1).ok_or(LogError::SegmentDictionaryFull { limit: format::DICT_LIMIT })?;
                }
                next.segments.retain(|e| e.id != id);
                next.segments.push(format::SegmentEntry { id, name: name.clone(), device });
                next.synced_end = self.synced_end();
                log::write_status(&self.ring, &next)?;
                st.status = next;
            }
            Ok((id, len))
        })();
        let (id, len) = match opened {
            Ok(v) => v,
            Err(e) => {
                if create.is_some() {
                    // No record names the new file: remove it, so that a
                    // retry can create it (best effort; the error stands).
                    drop(dev);
                    let _ = self.vfs.remove(&name);
                }
                return Err(e);
            }
        };
        let seg = Arc::new(SegmentInner {
            id,
            instance: self.id,
            name,
            dev,
            len,
            mapped: Mutex::new(Vec::new()),
            last_tx: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        st.segments.insert(id, seg.clone());
        Ok(Segment(seg))
    }

    /// Makes sure a durable status says the log is synced at least up to
    /// `upto` (writing one at the current synced position if not). Called
    /// before segments receive bytes from records below `upto`: from then
    /// on, damage to those records is always refused at open, never taken
    /// for a torn end that recovery would silently stop at (with the
    /// segment already holding part of what follows).
    pub(crate) fn record_synced_end(&self, upto: u64) -> Result<()> {
        let synced = self.synced_end();
        let mut st = self.status.lock();
        if st.status.synced_end >= upto.min(synced) {
            return Ok(());
        }
        let mut next = st.status.clone();
        next.seq += 1;
        next.synced_end = synced;
        // A status write that failed may have damaged a slot: stop.
        self.poison(log::write_status(&self.ring, &next))?;
        st.status = next;
        Ok(())
    }

    /// The position up to which the log is durable (a status records it,
    /// so that recovery can tell damage from a torn end).
    pub(crate) fn synced_end(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// Marks the segment as this log's (its unapplied records live here),
    /// refusing one whose mark names another log that may still hold
    /// records for it. The mark is durable before the segment can be
    /// changed through this log.
    fn claim_segment(&self, dev: &dyn crate::storage::Storage, name: &Path) -> Result<()> {
        let mark = dev.owner_mark().map_err(|e| Error::io("reading the segment's owner mark", name, e))?;
        let theirs = mark.as_deref().and_then(OwnerMark::decode);
        if theirs.as_ref().is_some_and(|m| m.log_id == self.log_id && m.log == self.ring.path) {
            return Ok(());
        }
        if let Some(other) = theirs.filter(|m| m.log_id != self.log_id) {
            if other_log_holds(self.vfs.as_ref(), &other, name)? {
                return Err(LogError::SegmentInOtherLog { path: name.to_path_buf(), other_log: other.log }.into());
            }
        }
        let ours = OwnerMark { log_id: self.log_id, log: self.ring.path.clone() }.encode();
        dev.set_owner_mark(Some(&ours)).map_err(|e| Error::io("writing the segment's owner mark", name, e))
    }

    /// Refuses a segment handle of another instance: its commits would go
    /// to that instance's log.
    fn check_own(&self, seg: &SegmentInner) -> Result<()> {
        if seg.instance != self.id {
            return Err(MapError::ForeignSegment { segment: seg.name.clone() }.into());
        }
        Ok(())
    }

    fn map(&self, segment: &Segment, spec: MapSpec) -> Result<Region> {
        let ps = mem::page_size();
        let seg = &segment.0;
        self.check_own(seg)?;
        if spec.len == 0 {
            return Err(MapError::EmptyRegion.into());
        }
        if !spec.offset.is_multiple_of(ps as u64) {
            return Err(MapError::NotPageAligned { what: "segment offset", value: spec.offset, page_size: ps }.into());
        }
        if !spec.len.is_multiple_of(ps) {
            return Err(
                MapError::NotPageAligned { what: "region length", value: spec.len as u64, page_size: ps }.into()
            );
        }
        if let Placement::Fixed(a) = spec.placement {
            if a % ps != 0 {
                return Err(MapError::NotPageAligned { what: "address", value: a as u64, page_size: ps }.into());
            }
        }
        let end = spec.offset.checked_add(spec.len as u64).filter(|&e| e <= seg.len).ok_or_else(|| {
            MapError::OutsideSegment {
                segment: seg.name.clone(),
                offset: spec.offset,
                len: spec.len as u64,
                segment_len: seg.len,
            }
        })?;
        // Claim the segment range (a range is mapped at most once).
        {
            let mut mapped = seg.mapped.lock();
            if seg.closed.load(Ordering::Acquire) {
                return Err(MapError::SegmentClosed { segment: seg.name.clone() }.into());
            }
            if mapped.iter().any(|&(s, e)| spec.offset < e && s < end) {
                return Err(MapError::AlreadyMapped {
                    segment: seg.name.clone(),
                    offset: spec.offset,
                    len: spec.len as u64,
                }
                .into());
            }
            mapped.push((spec.offset, end));
        }
        let unclaim = || seg.mapped.lock().retain(|&(s, _)| s != spec.offset);
        let result = self.map_claimed(seg, spec);
        if result.is_err() {
            unclaim();
        }
        result
    }

    fn map_claimed(&self, seg: &Arc<SegmentInner>, spec: MapSpec) -> Result<Region> {
        // The segment must show its committed image: if committed changes to
        // it are not yet applied (the range was mapped, changed and unmapped
        // before), apply the log first.
        if seg.last_tx.load(Ordering::Acquire) > 0 {
            self.replay_all()?;
        }
        // Hold truncation off while the contents are read in.
        let _t = self.truncation.lock();
        let copy = match (spec.copy, seg.dev.raw_fd()) {
            (CopyMode::OnDemand, Some(_)) => CopyMode::OnDemand,
            (CopyMode::OnDemand, None) => CopyMode::OnMap,
            (c, _) => c,
        };
        let mapping = match copy {
            CopyMode::OnDemand => {
                let fd = seg.dev.raw_fd().ok_or(MapError::System {
                    addr: 0,
                    len: spec.len,
                    errno: "device has no file descriptor".into(),
                })?;
                Mapping::file_private(spec.placement, fd, spec.offset, spec.len)?
            }
            CopyMode::OnMap => {
                let m = Mapping::anonymous_populated(spec.placement, spec.len)?;
                m.fill(0, spec.len, |dst| {
                    for (i, chunk) in dst.chunks_mut(8 << 20).enumerate() {
                        seg.dev.read_at(chunk, spec.offset + (i * (8 << 20)) as u64)?;
                    }
                    Ok(())
                })
                .map_err(|e| Error::io("reading segment", &seg.name, e))?;
                m
            }
            CopyMode::NoCopy => Mapping::anonymous(spec.placement, spec.len)?,
        };
        let region = Arc::new(RegionInner {
            tracked: Default::default(),
            shadow: Default::default(),
            mapping,
            segment: seg.clone(),
            offset: spec.offset,
            active_txs: AtomicUsize::new(0),
            copy,
            track: RegionTrack::new(spec.len),
            claimed: AtomicBool::new(false),
        });
        self.regions.write().insert(region.clone());
        Ok(Region(region))
    }

    /// Adds a committed transaction to the pending batch. `pieces` address
    /// memory (`data_at` is the memory address); bytes are copied now.
    pub(crate) fn commit_pieces(
        &self,
        held: &[Arc<RegionInner>],
        spans: &[(usize, usize, usize)],
        declared: u64,
    ) -> Result<u64> {
        let bytes: u64 = spans.iter().map(|r| r.1 as u64).sum();
        let needed =
            spans.iter().map(|r| format::range_frames_len(r.1) as u64).sum::<u64>() + format::COMMIT_FRAME as u64;
        if needed > self.ring.area_len {
            return Err(LogError::TransactionTooLarge { needed, capacity: self.ring.area_len }.into());
        }
        // Batches to write on this thread, in order (write-behind off).
        let mut spills: [Option<(u64, Batch)>; 2] = [None, None];
        // Half the log: a batch's frames stay below it, or the batch is a
        // single transaction (at most the whole log, checked above).
        let frame_cap = self.ring.area_len / 2;
        let seq;
        {
            let mut st = self.state.lock();
            self.check_poison()?;
            seq = st.next_tx;
            st.next_tx += 1;
            if spans.is_empty() {
                // Nothing to redo: no log record. A flush of it still makes
                // every earlier commit durable (`flush_to(seq)`).
                drop(st);
                Counters::add(&self.counters.committed, 1);
                return Ok(seq);
            }
            // With this transaction the batch might not fit in the log: it
            // goes first. (A loop: waiting for room in the spool releases
            // the lock, and other commits may fill the next batch.)
            while !st.pending.is_empty() && st.pending.frame_bytes + needed > frame_cap {
                if let Some(spill) = self.hand_over(&mut st) {
                    spills[0] = Some(spill);
                }
            }
            let b = &mut st.pending;
            for &(addr, len, region) in spans {
                let region = &held[region];
                let seg = &region.segment;
                let offset = region.segment_offset(addr);
                let at = b.data.len();
                // SAFETY: the transaction declared [addr, addr + len) inside a
                // region it holds (so the mapping is alive), and by the
                // `set_range` contract no one else writes it until commit.
                unsafe { mem::append_from(addr, len, &mut b.data) };
                b.pieces.push(Piece { segment: seg.id, offset, len, data_at: at });
                seg.last_tx.fetch_max(seq, Ordering::AcqRel);
                self.mark_dirty(region, addr, len);
            }
            b.tx_ends.push((b.pieces.len(), seq));
            b.bytes += bytes;
            b.frame_bytes += needed;
            if b.data.len() >= self.pending_limit || b.frame_bytes >= frame_cap {
                spills[1] = self.hand_over(&mut st);
            }
        }
        Counters::add(&self.counters.committed, 1);
        Counters::add(&self.counters.bytes_declared, declared);
        Counters::add(&self.counters.bytes_saved_intra, declared - bytes);
        for (n, batch) in spills.into_iter().flatten() {
            let r = self.write_batch(n, &batch);
            self.recycle_batch(batch);
            r?;
        }
        Ok(seq)
    }

    /// Takes the pending batch (a full one) and queues it for the
    /// write-behind thread, or, with write-behind off, returns it for the
    /// committing thread to write once it has released the commit lock.
    fn hand_over(&self, st: &mut parking_lot::MutexGuard<'_, CommitState>) -> Option<(u64, Batch)> {
        let (n, batch) = st.take_batch();
        if !self.opts.write_behind {
            return Some((n, batch));
        }
        self.spooled_bytes.fetch_add(batch.data.len() as u64, Ordering::AcqRel);
        st.spool.push_back((n, batch));
        self.spooled.notify_one();
        // Bounded memory: wait while the writer is behind.
        while st.spool.len() >= SPOOLED_BATCHES && !self.poisoned.load(Ordering::Acquire) {
            self.spool_room.wait(st);
        }
        None
    }

    /// Log position after the last written batch.
    pub(crate) fn log_tail(&self) -> u64 {
        self.tail.load(Ordering::Acquire)
    }

    /// Keeps a written batch's buffers for a later batch.
    pub(crate) fn recycle_batch(&self, batch: Batch) {
        self.state.lock().recycle(batch, self.pending_limit);
    }

    /// The background log writer's work: spooled batches, in order.
    fn write_spooled(&self) {
        loop {
            let (n, batch) = {
                let mut st = self.state.lock();
                loop {
                    if let Some(b) = st.spool.pop_front() {
                        break b;
                    }
                    if st.writer_stop {
                        return;
                    }
                    self.spooled.wait(&mut st);
                }
            };
            // A failure poisons the instance: committers and flushes report
            // it. So does a panic, which must not leave them waiting for a
            // batch that will never be written.
            let wrote =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_batch_from(n, &batch, true)));
            if wrote.is_err() {
                let _ =
                    self.poison::<()>(Err(Error::corrupted("log writer (panicked writing a batch)", "write-behind")));
                let mut w = self.writer.lock();
                if w.next_batch == n {
                    self.spooled_bytes.fetch_sub(batch.data.len() as u64, Ordering::AcqRel);
                    w.next_batch += 1;
                }
                self.written_cv.notify_all();
            }
            let mut st = self.state.lock();
            st.recycle(batch, self.pending_limit);
            self.spool_room.notify_all();
        }
    }

    /// Writes batch number `n` after every earlier batch (batch numbers are
    /// handed out under the commit lock, so log order is commit order).
    /// Returns the log position after the batch.
    pub(crate) fn write_batch(&self, n: u64, batch: &Batch) -> Result<u64> {
        self.write_batch_from(n, batch, false)
    }

    /// [`Inner::write_batch`]; `spooled` if the batch came from the spool.
    fn write_batch_from(&self, n: u64, batch: &Batch, spooled: bool) -> Result<u64> {
        let mut w = self.writer.lock();
        while w.next_batch != n {
            self.written_cv.wait(&mut w);
        }
        let r = if self.poisoned.load(Ordering::Acquire) {
            self.check_poison().map(|_| 0)
        } else if batch.is_empty() {
            Ok(self.log_tail())
        } else {
            let r = self.write_locked(&mut w, batch).map(|_| self.log_tail());
            self.poison(r)
        };
        if spooled {
            // Before the batch counts as written, so a flush that waited
            // for it sees no spooled bytes left.
            self.spooled_bytes.fetch_sub(batch.data.len() as u64, Ordering::AcqRel);
        }
        w.next_batch += 1;
        self.written_cv.notify_all();
        drop(w);
        if self.over_threshold() {
            self.background.wake.notify_one();
        }
        r
    }

    fn write_locked(&self, w: &mut Writer, batch: &Batch) -> Result<()> {
        let Writer { frames, coalescer, .. } = w;
        // Only this function, under the writer lock, moves the tail.
        let written = self.tail.load(Ordering::Acquire);
        frames.clear();
        let mut fw = FrameWriter::new(frames, written, self.epoch);
        let synced = self.synced_end();
        let mut logged = 0u64;
        if self.opts.coalesce {
            let mut ranges = 0u32;
            coalescer
                .run::<()>(&batch.pieces, &batch.data, |seg, off, bytes| {
                    ranges += fw.range(seg, off, bytes);
                    logged += bytes.len() as u64;
                    Ok(())
                })
                .ok();
            let first = batch.tx_ends.first().map_or(0, |t| t.1);
            let last = batch.tx_ends.last().map_or(0, |t| t.1);
            fw.commit(ranges, first, last, logged, synced);
        } else {
            let mut start = 0;
            for &(end, seq) in &batch.tx_ends {
                let mut ranges = 0;
                let mut bytes = 0;
                for p in &batch.pieces[start..end] {
                    ranges += fw.range(p.segment, p.offset, &batch.data[p.data_at..p.data_at + p.len]);
                    bytes += p.len as u64;
                }
                fw.commit(ranges, seq, seq, bytes, synced);
                logged += bytes;
                start = end;
            }
        }
        let len = frames.len() as u64;
        let cap = self.ring.area_len;
        if len > cap {
            return Err(LogError::TransactionTooLarge { needed: len, capacity: cap }.into());
        }
        let mut waited = false;
        while written + len - self.head.load(Ordering::Acquire) > cap {
            // The log is full: make what is written durable and apply it.
            if !waited {
                Counters::add(&self.counters.log_full_waits, 1);
                waited = true;
            }
            let before = self.head.load(Ordering::Acquire);
            self.sync_to(written)?;
            // A sweeping checkpoint frees the log up to its position once
            // it ends: finishing it is cheaper than replaying that part.
            // Only if that is not room enough is the rest replayed.
            self.finish_checkpoint_for_room()?;
            if written + len - self.head.load(Ordering::Acquire) > cap {
                self.truncate_to(written)?;
            }
            if self.head.load(Ordering::Acquire) == before {
                return Err(Error::corrupted(
                    "log (truncation made no progress)",
                    self.ring.path.display().to_string(),
                ));
            }
        }
        self.ring.write(written, frames)?;
        self.tail.store(written + len, Ordering::Release);
        let c = &self.counters;
        Counters::add(&c.log_writes, 1);
        Counters::add(&c.log_bytes_written, len);
        Counters::add(&c.bytes_logged, logged);
        Counters::add(&c.bytes_saved_inter, batch.bytes.saturating_sub(logged));
        Ok(())
    }

    fn over_threshold(&self) -> bool {
        match self.opts.truncate_threshold {
            Some(t) => {
                let head = self.head.load(Ordering::Acquire);
                self.log_tail().saturating_sub(head) as f64 > t * self.ring.area_len as f64
            }
            None => false,
        }
    }

    /// Group commit: returns once commit `seq` (and all before it) is durable.
    pub(crate) fn flush_to(&self, seq: u64) -> Result<()> {
        let mut st = self.state.lock();
        st.flush_waiters += 1;
        if st.gathering {
            self.gathered.notify_one();
        }
        let r = self.flush_locked(&mut st, seq);
        st.flush_waiters -= 1;
        r
    }

    fn flush_locked(&self, st: &mut parking_lot::MutexGuard<'_, CommitState>, seq: u64) -> Result<()> {
        loop {
            self.check_poison()?;
            if st.durable_tx >= seq {
                return Ok(());
            }
            if st.flushing {
                self.flushed.wait(st);
                continue;
            }
            // Become the leader. As many flushers as the last sync served
            // are likely on their way (threads its sync released, now
            // running their next transaction): wait for them a little, at
            // most half a sync's time, so that one sync serves them all.
            st.flushing = true;
            if st.flush_waiters < st.last_group {
                let wait = Duration::from_nanos(self.last_sync_ns.load(Ordering::Relaxed) / 2).min(MAX_GATHER);
                let deadline = std::time::Instant::now() + wait;
                st.gathering = true;
                while st.flush_waiters < st.last_group && !self.gathered.wait_until(st, deadline).timed_out() {}
                st.gathering = false;
            }
            st.last_group = st.flush_waiters;
            let target = st.next_tx - 1;
            let mine = (!st.pending.is_empty()).then(|| st.take_batch());
            let all_before = st.next_batch;
            let mut spent = None;
            let r = parking_lot::MutexGuard::unlocked(st, || -> Result<()> {
                if let Some((n, batch)) = mine {
                    let r = self.write_batch(n, &batch);
                    spent = Some(batch);
                    r?;
                }
                let written = {
                    let mut w = self.writer.lock();
                    while w.next_batch < all_before && !self.poisoned.load(Ordering::Acquire) {
                        self.written_cv.wait(&mut w);
                    }
                    self.log_tail()
                };
                self.check_poison()?;
                self.sync_to(written)
            });
            st.flushing = false;
            if let Some(batch) = spent {
                st.recycle(batch, self.pending_limit);
            }
            if r.is_ok() {
                st.durable_tx = st.durable_tx.max(target);
            }
            self.flushed.notify_all();
            r?;
        }
    }

    /// Flushes every commit so far, then replays the whole log onto the
    /// segments and frees it.
    pub(crate) fn replay_all(&self) -> Result<()> {
        let last = self.state.lock().next_tx - 1;
        self.flush_to(last)?;
        self.sync_to(self.log_tail())?;
        self.truncate_to(self.synced.load(Ordering::Acquire))
    }

    /// Every commit up to `seq` is durable (its batch was written and synced).
    pub(crate) fn mark_durable(&self, seq: u64) {
        let mut st = self.state.lock();
        st.durable_tx = st.durable_tx.max(seq);
    }

    /// Syncs the log if `upto` is not durable yet.
    pub(crate) fn sync_to(&self, upto: u64) -> Result<()> {
        if self.synced.load(Ordering::Acquire) >= upto {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let r = self.ring.dev.sync().map_err(|e| Error::io("syncing the log", &self.ring.path, e)).and_then(|()| {
            // A log that lost its name cannot be recovered from: what this
            // sync made durable is in a file nobody can open again.
            match self.ring.dev.is_unlinked() {
                Ok(false) => Ok(()),
                Ok(true) => Err(LogError::LogUnlinked { path: self.ring.path.clone() }.into()),
                Err(e) => Err(Error::io("checking the log file", &self.ring.path, e)),
            }
        });
        self.last_sync_ns.store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.poison(r)?;
        Counters::add(&self.counters.log_syncs, 1);
        self.synced.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Applies the durable log up to `cut` (a batch boundary) to the
    /// segments, then frees it: the split of the log into the part being
    /// truncated and the active part, where commits go on.
    fn truncate_to(&self, cut: u64) -> Result<()> {
        // A running checkpoint ends first (below): at full speed.
        let _hurry = self.ckpt.hurry();
        let _t = self.truncation.lock();
        self.check_poison()?;
        // A checkpoint in progress is finished first (its page images are
        // older than what the replay writes) or, still frozen, dropped (the
        // replay covers it).
        self.settle_checkpoint_locked()?;
        let head = self.head.load(Ordering::Acquire);
        let cut = cut.min(self.synced.load(Ordering::Acquire));
        if cut <= head {
            return Ok(());
        }
        let segments = self.status.lock().segments.clone();
        let r = (|| {
            self.record_synced_end(cut)?;
            let resolve = |id| {
                segments.get(&id).map(|s| (s.dev.clone(), s.name.clone())).ok_or_else(|| {
                    Error::corrupted(
                        format!("log frame (unknown segment id {id})"),
                        self.ring.path.display().to_string(),
                    )
                })
            };
            let Replayed { end, segment_bytes, .. } = replay(&self.ring, head, cut, self.epoch, resolve)?;
            if end.end != cut {
                return Err(Error::corrupted(
                    "log (records this instance wrote are unreadable)",
                    format!("{} position {}", self.ring.path.display(), end.end),
                ));
            }
            Counters::add(&self.counters.segment_bytes_written, segment_bytes);
            let mut st = self.status.lock();
            let mut next = st.status.clone();
            next.seq += 1;
            next.head = cut;
            next.synced_end = cut;
            next.committed = next.committed.saturating_add(end.transactions);
            log::write_status(&self.ring, &next)?;
            st.status = next;
            Ok(())
        })();
        self.poison(r)?;
        self.head.store(cut, Ordering::Release);
        Counters::add(&self.counters.truncations, 1);
        Counters::add(&self.counters.truncated_bytes, cut - head);
        Ok(())
    }
}

fn background_loop(weak: Weak<Inner>, bg: Arc<Background>, threshold: f64) {
    loop {
        {
            let mut stop = bg.stop.lock();
            if *stop {
                return;
            }
            bg.wake.wait_for(&mut stop, Duration::from_millis(100));
            if *stop {
                return;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.poisoned.load(Ordering::Acquire) {
            return;
        }
        let written = inner.log_tail();
        let used = written - inner.head.load(Ordering::Acquire);
        if used as f64 > threshold * inner.ring.area_len as f64 {
            // Errors poison the instance; committers will report them.
            let _ = match inner.opts.reclaim {
                Reclaim::Checkpoint => inner.checkpoint_full().map(|_| ()),
                Reclaim::Replay => inner.sync_to(written).and_then(|_| inner.truncate_to(written)),
            };
        }
    }
}

/// Recovery, in two passes so that a damaged log is refused before anything
/// is written:
///
/// 1. verify: scan every frame from the head (CRCs, positions, epoch),
///    noting the segments the complete transactions touch and how far; tell
///    a torn or clean end from damage ([`log::find_damage`]);
/// 2. open every touched segment and check it is the file the log recorded,
///    long enough, and not claimed by another log;
/// 3. replay the complete transactions, sync the segments, then write a
///    status with the log empty and a new epoch.
///
/// Running it again after a crash at any point redoes the same idempotent
/// writes.
fn recover(
    vfs: &dyn Vfs,
    ring: &Ring,
    sb: &format::Superblock,
    status: Status,
    opts: &Options,
) -> Result<(Status, RecoveryReport)> {
    use crate::log::format::Frame;
    // Ordered, so the first refused segment (and the error) is the same
    // at every open.
    let touched = std::cell::RefCell::new(std::collections::BTreeMap::<u32, u64>::new());
    let in_tx = std::cell::RefCell::new(Vec::<(u32, u64)>::new());
    let progress = opts.recovery_progress.as_ref();
    let estimate = status.synced_end.saturating_sub(status.head);
    let mut reported = 0u64;
    let verified = log::scan(
        ring,
        status.head,
        u64::MAX,
        status.epoch,
        |f| {
            if let Frame::Range { segment, offset, data } = f.frame {
                in_tx.borrow_mut().push((segment, offset.saturating_add(data.len() as u64)));
            }
            let done = f.lsn - status.head;
            if let Some(p) = progress.filter(|_| done >= reported + PROGRESS_STEP) {
                reported = done;
                p.report(RecoveryPhase::Verify, done, estimate);
            }
            Ok(())
        },
        |_, _| {
            let mut touched = touched.borrow_mut();
            for (id, end) in in_tx.borrow_mut().drain(..) {
                let e = touched.entry(id).or_insert(0);
                *e = (*e).max(end);
            }
            Ok(())
        },
    )?;
    let mut salvage = None;
    if let Some(damage) = log::find_damage(ring, status.head, &verified, status.epoch, status.synced_end)? {
        if !opts.salvage {
            return Err(damage.error(&ring.path, ring.area_offset, ring.area_len));
        }
        let copy = keep_damaged_copy(vfs, &ring.path, status.epoch)?;
        salvage = Some(Salvage {
            damaged_at: damage.lsn,
            defect: damage.defect.describe(),
            synced_to: damage.synced_to,
            dropped_bytes: damage.valid_end.max(damage.lsn) - verified.end,
            dropped_transactions: damage.transactions_after,
            copy,
        });
    }
    // Every segment is opened and checked before any is written.
    let mut devices = HashMap::new();
    for (&id, &needed) in touched.borrow().iter() {
        let entry = status.segments.iter().find(|e| e.id == id).ok_or_else(|| {
            Error::corrupted(
                format!("log frame (segment id {id} not in the dictionary)"),
                ring.path.display().to_string(),
            )
        })?;
        let (path, checked) = opts.segment_location(&entry.name);
        let dev = vfs
            .open(&path, OpenMode::Existing)
            .map_err(|e| LogError::MissingSegment { path: path.clone(), reason: e.to_string() })?;
        if checked {
            let found = dev.identity().map_err(|e| Error::io("identifying segment", &path, e))?;
            if let (Some(recorded), Some(found)) = (entry.device, found) {
                if !recorded.same_file(&found) {
                    return Err(LogError::SegmentReplaced { path, recorded, found }.into());
                }
            }
            let mark = dev.owner_mark().map_err(|e| Error::io("reading the segment's owner mark", &path, e))?;
            if let Some(other) = mark.as_deref().and_then(OwnerMark::decode).filter(|m| m.log_id != sb.log_id) {
                return Err(LogError::SegmentInOtherLog { path, other_log: other.log }.into());
            }
        }
        let len = dev.len().map_err(|e| Error::io("sizing segment", &path, e))?;
        if len < needed {
            return Err(LogError::SegmentTooShort { path, needed, len }.into());
        }
        devices.insert(id, (dev, path));
    }
    // Before any segment write, a status says how far the log is durable:
    // should the replay be cut short by a crash, later damage to the
    // records it applied is still refused, never taken for the log's end.
    let mut status = status;
    if status.synced_end < verified.end {
        status.seq += 1;
        status.synced_end = verified.end;
        log::write_status(ring, &status)?;
    }
    let resolve = |id| {
        devices.get(&id).cloned().ok_or_else(|| {
            Error::corrupted(
                format!("log frame (segment id {id} changed between scans)"),
                ring.path.display().to_string(),
            )
        })
    };
    if let Some(p) = progress {
        p.report(RecoveryPhase::Verify, verified.end - status.head, verified.end - status.head);
    }
    let total = verified.end - status.head;
    let on_replay = |done: u64| {
        if let Some(p) = progress {
            p.report(RecoveryPhase::Replay, done, total);
        }
    };
    let Replayed { end, log_bytes, segment_bytes } =
        replay_with_progress(ring, status.head, verified.end, status.epoch, resolve, &on_replay)?;
    if end.end != verified.end {
        return Err(Error::corrupted(
            "log (records changed between the verifying scan and the replay)",
            format!("{} position {}", ring.path.display(), end.end),
        ));
    }
    // The segments are closed (unlocked) when it returns, before the
    // application opens them.
    drop(devices);
    let report = RecoveryReport {
        transactions: end.transactions,
        log_bytes,
        discarded_bytes: verified.discarded,
        segment_bytes_written: segment_bytes,
        stopped_at: match verified.stop {
            ScanStop::Limit => None,
            ScanStop::Defect { lsn, defect } => Some((lsn, defect.describe())),
        },
        salvage,
    };
    let next = Status {
        seq: status.seq + 1,
        epoch: status.epoch + 1,
        head: end.end,
        synced_end: end.end,
        committed: status.committed.saturating_add(end.transactions),
        // The dictionary stays: ids are stable per name, so both slots
        // usually agree on it.
        ..status
    };
    log::write_status(ring, &next)?;
    Ok((next, report))
}

/// Copies a damaged log to `<log>.damaged-<epoch>` (or `...-<epoch>.<n>`
/// if that exists) before a salvage rewrites its status.
fn keep_damaged_copy(vfs: &dyn Vfs, log: &Path, epoch: u64) -> Result<PathBuf> {
    let base = format!("{}.damaged-{epoch}", log.display());
    for n in 0..1000 {
        let to = PathBuf::from(if n == 0 { base.clone() } else { format!("{base}.{n}") });
        match vfs.copy(log, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("keeping a copy of the damaged log", to, e)),
        }
    }
    Err(Error::io("keeping a copy of the damaged log", base, std::io::ErrorKind::AlreadyExists.into()))
}

/// A segment's owner mark: the log that may hold unapplied records for it
/// (its id and path). Stored as an extended attribute on segment files:
/// log id u128 (16 bytes), then the log's canonical path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OwnerMark {
    pub log_id: u128,
    pub log: PathBuf,
}

impl OwnerMark {
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let mut b = self.log_id.to_le_bytes().to_vec();
        b.extend_from_slice(self.log.as_os_str().as_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<OwnerMark> {
        use std::os::unix::ffi::OsStrExt;
        let id: [u8; 16] = b.get(..16)?.try_into().ok()?;
        Some(OwnerMark { log_id: u128::from_le_bytes(id), log: PathBuf::from(std::ffi::OsStr::from_bytes(&b[16..])) })
    }
}

/// Whether the log a foreign owner mark names may still hold records for
/// the segment `name`: true if that log is open elsewhere (locked) or its
/// live records name the segment; false if it is gone, is another log now,
/// or holds nothing for the segment (the mark is stale).
fn other_log_holds(vfs: &dyn Vfs, mark: &OwnerMark, name: &Path) -> Result<bool> {
    let log = match crate::log::inspect::LogInspector::open(vfs, &mark.log) {
        Ok(log) => log,
        Err(Error::Locked { .. }) => return Ok(true),
        Err(_) => return Ok(false),
    };
    if log.superblock().log_id != mark.log_id {
        return Ok(false);
    }
    let Ok(status) = log.status() else { return Ok(true) };
    let Some(id) = status.segments.iter().find(|e| e.name == name).map(|e| e.id) else { return Ok(false) };
    let mut names_it = false;
    log.walk(|f| {
        if let crate::log::inspect::FrameBody::Range { segment, .. } = f.body {
            names_it |= segment == id;
        }
    })?;
    Ok(names_it)
}

/// Runs recovery on a log without keeping it open (what `rvmutl recover`
/// does); returns the report.
///
/// `opts` supplies [`Options::salvage`] and [`Options::accepted_segments`];
/// the other fields do not matter here.
pub fn recover_log(vfs: &dyn Vfs, log_path: &Path, opts: &Options) -> Result<RecoveryReport> {
    let LogDevice { ring, sb, status } = LogDevice::open(vfs, log_path)?;
    Ok(recover(vfs, &ring, &sb, status, opts)?.1)
}
