//! An RVM instance: one log, its segments and regions. The instance's
//! state (`Inner`) is one struct; its concerns live in the child modules:
//!
//! - [`pipeline`]: pending no-flush commits, ordered batch writes, the
//!   write-behind thread, group commit;
//! - [`truncate`]: log truncation by replay, and the synced-end status;
//! - [`recovery`]: recovery at open;
//! - [`checkpoint`]: the generation checkpoint;
//! - [`background`]: the background truncator thread;
//! - [`segments`]: opening, claiming and mapping segments.
//!
//! Module dependencies run one way: `tx` → `instance` → `segment` →
//! `track`, and everything uses `options`, `log`, `replay`, `storage`.

mod background;
pub(crate) mod checkpoint;
mod instant;
mod pipeline;
mod recovery;
mod segments;
mod tracking;
mod truncate;

pub use checkpoint::CheckpointReport;
pub(crate) use pipeline::Span;
pub use recovery::recover_log;

use crate::error::{Error, MapError, Result};
use crate::log::format::Status;
use crate::log::{LogDevice, Ring};
use crate::options::{Options, Query, RecoveryReport};
use crate::segment::{MapSpec, Region, RegionClaim, RegionTable, Segment, SegmentInner};
use crate::stats::{Counters, Stats};
use crate::storage::{FileVfs, Vfs};
use background::Background;
use checkpoint::Checkpointer;
use parking_lot::{Condvar, Mutex, RwLock};
use pipeline::{CommitState, Writer};
use recovery::recover;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct StatusState {
    pub(crate) status: Status,
    segments: HashMap<u32, Arc<SegmentInner>>,
}

impl StatusState {
    /// Writes the status `change` makes of the one held (its sequence
    /// number one higher) to both slots, and holds it once it is durable.
    pub(crate) fn write_next(&mut self, ring: &Ring, change: impl FnOnce(&mut Status)) -> Result<()> {
        let mut next = self.status.clone();
        next.seq += 1;
        change(&mut next);
        crate::log::write_status(ring, &next)?;
        self.status = next;
        Ok(())
    }
}

pub(crate) struct Inner {
    pub(crate) id: u64,
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
    /// The write-behind thread, started with the first batch spooled.
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
    /// The truncation thread, started when the log first passes its
    /// threshold ([`Inner::start_truncator`]).
    bg_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// This instance, for the threads it starts after `open`.
    me: std::sync::Weak<Inner>,
    /// Tracked transactions' state (created with the first tracked region).
    pub(crate) tracked: tracking::SessionCell,
    /// The undeclared-store detector, if on.
    pub(crate) verify: Option<crate::verify::Verifier>,
    /// Instant recovery's background apply (`Options::instant_recovery`).
    instant: Option<instant::Instant>,
    /// The opening process's fork count and id ([`crate::mem::fork_count`]):
    /// a forked child that inherited the instance is refused
    /// ([`Inner::check_process`]).
    process: (u64, u32),
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
        // In a forked child the instance's threads do not exist and its
        // files are the parent's: nothing to join, nothing to write.
        if inner.check_process().is_err() {
            return;
        }
        // Instant recovery's background apply finishes first.
        inner.join_instant();
        // A background checkpoint still sweeping finishes at full speed.
        let _hurry = inner.ckpt.hurry();
        *inner.background.stop.lock() = true;
        inner.background.wake.notify_all();
        // Taken out before the join: the threads the truncator waits for
        // take this lock to see that it runs (`start_truncator`).
        let truncator = inner.bg_thread.lock().take();
        if let Some(h) = truncator {
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
        let writer = inner.log_writer.lock().take();
        if let Some(h) = writer {
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
    /// [`crate::create_log`]) and runs recovery. The background threads the
    /// options ask for start when first needed: the truncator when the log
    /// first passes its threshold, the write-behind log writer with the
    /// first full batch of no-flush commits.
    ///
    /// The log and every segment are locked exclusively (`flock`) while
    /// open: a second open, in this process or another, fails with
    /// [`crate::Error::Locked`]. The lock belongs to the open file, so a
    /// child made with `fork` holds it too until the child exits or calls
    /// `exec` (descriptors are close-on-exec): a program that forks workers
    /// without `exec` cannot reopen the log until they are gone. The child
    /// cannot use the instance it inherited either: every call that would
    /// write the log or the segments, or wait for the instance's threads,
    /// fails there with [`crate::Error::ForkedChild`], and its drops write
    /// nothing (reads of the child's copy of the regions still work).
    pub fn open(log_path: impl AsRef<Path>, opts: Options) -> Result<Rvm> {
        Rvm::open_with(Arc::new(FileVfs), log_path.as_ref(), opts)
    }

    /// [`Rvm::open`] on any [`Vfs`], such as the simulated disk.
    pub fn open_with(vfs: Arc<dyn Vfs>, log_path: &Path, opts: Options) -> Result<Rvm> {
        let LogDevice { ring, sb, status } = LogDevice::open(vfs.as_ref(), log_path)?;
        let (status, recovery, deferred) = recover(vfs.as_ref(), &ring, &sb, status, &opts)?;
        // With instant recovery the instance starts where recovery will
        // leave the log (head at the end of the last complete transaction,
        // the next epoch); the durable status says so only once the
        // background apply is done, and nothing is written to the log
        // before.
        let (head, epoch) = match &deferred {
            Some(d) => (d.end, status.epoch + 1),
            None => (status.head, status.epoch),
        };
        let pending_limit = opts.pending_limit.clamp(4096, (sb.area_len / 4) as usize);
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            vfs,
            epoch,
            pending_limit,
            state: Mutex::new(CommitState::new()),
            flushed: Condvar::new(),
            gathered: Condvar::new(),
            last_sync_ns: AtomicU64::new(0),
            spooled: Condvar::new(),
            spool_room: Condvar::new(),
            log_writer: Mutex::new(None),
            spooled_bytes: AtomicU64::new(0),
            writer: Mutex::new(Writer::default()),
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
            instant: deferred.map(instant::Instant::new),
            log_id: sb.log_id,
            ring,
            opts,
            process: crate::mem::fork_count(),
        });
        inner.start_instant(log_path)?;
        // The truncation and write-behind threads start when first needed
        // (each start took 0.1 ms of the open on the benchmark machine).
        Ok(Rvm { _life: Arc::new(Lifetime { inner: inner.clone() }), inner })
    }

    /// What recovery did at open.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner.recovery.clone()
    }

    /// Waits until recovery is complete and durable: with
    /// [`Options::instant_recovery`], until the background thread has
    /// applied every page the log changes, synced the segments and written
    /// the status with the new epoch (at once otherwise). An error if that
    /// failed (the instance is poisoned then; reopen it to recover again).
    pub fn wait_for_recovery(&self) -> Result<()> {
        self.inner.check_process()?;
        self.inner.wait_recovered()
    }

    /// `Ok` in the process that opened the instance;
    /// [`Error::ForkedChild`] in a child made with `fork` that inherited
    /// it. A layer that takes locks of its own before calling the instance
    /// (a lock another thread of the parent may have held at the fork,
    /// for good in the child) asks this first.
    pub fn check_process(&self) -> Result<()> {
        self.inner.check_process()
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
        self.inner.check_process()?;
        self.inner.open_segment(path.as_ref(), None)
    }

    /// Creates a segment file of `len` bytes (mode 0600); an existing file
    /// is an error. Its disk blocks are allocated now
    /// ([`Options::reserve_segment_space`], default on): on a disk without
    /// room for `len` bytes this fails with an I/O error of kind
    /// [`std::io::ErrorKind::StorageFull`] and leaves no file behind.
    pub fn create_segment(&self, path: impl AsRef<Path>, len: u64) -> Result<Segment> {
        self.inner.check_process()?;
        self.inner.open_segment(path.as_ref(), Some(len))
    }

    /// Deletes a segment: closes it ([`Rvm::close_segment`]: every commit
    /// that changed it is applied to it first, so the log holds nothing
    /// recovery would need the file for), then removes its file through
    /// the instance's storage. Refused, with nothing changed, while a region
    /// of it is mapped ([`MapError::SegmentInUse`]). For a segment no longer
    /// wanted, such as one whose setup failed after [`Rvm::create_segment`]
    /// (the loader's and the heap's creation calls delete the segment they
    /// made when a later step fails). Removing the file some other way
    /// while the log still holds commits for it would make recovery refuse
    /// the log until the segment is given back.
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let path = dir.path().join("seg");
    /// let seg = rvm.create_segment(&path, 4096).unwrap();
    /// let region = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
    /// assert!(rvm.delete_segment(seg.clone()).is_err()); // mapped
    /// rvm.unmap(region).unwrap();
    /// rvm.delete_segment(seg).unwrap();
    /// assert!(!path.exists());
    /// ```
    pub fn delete_segment(&self, segment: Segment) -> Result<()> {
        let name = segment.name().to_path_buf();
        self.close_segment(segment)?;
        self.inner.vfs.remove(&name).map_err(|e| Error::io("deleting segment", &name, e))
    }

    /// Closes a segment: applies every commit that changed it to it (a log
    /// replay, if any is still in the log) and forgets it (its entry in the
    /// log's segment dictionary too), so its device is
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
        self.inner.check_process()?;
        let seg = segment.0;
        self.inner.check_own(&seg)?;
        // The log may hold records for it that only recovery applies.
        self.inner.wait_recovered()?;
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
        // No live record names its id now (ids are never reused): its
        // dictionary entry goes too, durably, so that a program creating
        // and deleting (or closing) segments does not fill the dictionary
        // ([`LogError::SegmentDictionaryFull`]). A crash before the status
        // is durable leaves the entry, which is harmless.
        let pruned = {
            let mut st = self.inner.status.lock();
            st.segments.remove(&seg.id);
            if st.status.segments.iter().any(|e| e.id == seg.id) {
                let synced = self.inner.synced_end();
                // A status write that failed may have damaged a slot: stop.
                self.inner.poison(st.write_next(&self.inner.ring, |next| {
                    next.segments.retain(|e| e.id != seg.id);
                    next.synced_end = synced.max(next.synced_end);
                }))
            } else {
                Ok(())
            }
        };
        // This log holds nothing for it now (best effort: a mark left
        // behind is recognised as stale by the next log that opens it).
        let _ = seg.dev.set_owner_mark(None);
        pruned
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
    /// on-demand ([`CopyMode::OnDemand`](crate::CopyMode::OnDemand)) region is mapped makes the first
    /// access to a page not yet read in raise `SIGBUS`; one that **writes**
    /// the file changes the bytes of such pages under the program (copy
    /// modes `OnMap` and `NoCopy` read nothing from the file after `map`).
    /// `map` is nevertheless safe: it hands out no reference into the
    /// memory; every access goes through `unsafe` code whose contract
    /// ([`Region::read`], [`crate::Transaction::modify_bytes`], raw
    /// pointers) includes that the file is not changed behind the lock, as
    /// memmap2's `Mmap::map` states for the same hazard. A segment truncated
    /// behind the log's back is reported at the next open as
    /// [`LogError::SegmentTooShort`](crate::LogError::SegmentTooShort), never as log damage.
    pub fn map(&self, segment: &Segment, spec: MapSpec) -> Result<Region> {
        self.inner.check_process()?;
        self.inner.map(segment, spec)
    }

    /// Unmaps a region. Refused while a transaction with ranges in it is
    /// uncommitted. The memory goes away when the last clone of the handle
    /// is dropped; until then the segment range still counts as mapped
    /// (mapping it again is [`MapError::AlreadyMapped`]), so that two
    /// live copies of one segment range never exist. A clone kept
    /// elsewhere (another thread, a cache) thus delays a remap.
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
        self.inner.check_process()?;
        let addr = region.addr();
        // A tracked region's pages may be twinned by the open tracked
        // transaction (which counts no ranges in `active_txs`): wait for it.
        let _tracked = tracking::hold_writers(&self.inner, &region.0)?;
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

    /// Makes every earlier commit durable (one `fdatasync`, shared with
    /// concurrent flushes).
    pub fn flush(&self) -> Result<()> {
        self.inner.check_process()?;
        let last = self.inner.state.lock().next_tx - 1;
        self.inner.flush_to(last)
    }

    /// Runs a generation checkpoint: freezes (O(1): the commit lock is held
    /// for a few microseconds whatever the heap size), writes every page
    /// changed since the previous checkpoint once, as it stood at the
    /// freeze, syncs the segments and frees the log before the freeze.
    /// Transactions on other threads go on meanwhile. Every commit made
    /// before the call is in the segments when it returns. The sweep keeps
    /// [`Options::checkpoint_rate`](crate::Options::checkpoint_rate)'s
    /// pace here too (it takes about the dirty bytes over the rate) until
    /// something waits for it to end (a full log, [`Rvm::truncate`],
    /// `unmap`, closing); [`Rvm::checkpoint_step`] is never paced.
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
        self.inner.check_process()?;
        self.inner.checkpoint_full()
    }

    /// Starts a checkpoint (the freeze, and the pages that must be rebuilt
    /// from the log), leaving the sweep to [`Rvm::checkpoint_step`] and
    /// [`Rvm::checkpoint_finish`]: for driving a checkpoint step by step, as
    /// deterministic tests do. Returns `false` if a checkpoint is running
    /// already (a second freeze never starts while a sweep runs), or if a
    /// log-replay truncation overtook this one.
    pub fn checkpoint_start(&self) -> Result<bool> {
        self.inner.check_process()?;
        use checkpoint::Start;
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
        self.inner.check_process()?;
        self.inner.checkpoint_step(max_pages)
    }

    /// Completes the running checkpoint: the remaining pages, the segment
    /// syncs, the status that frees the log. `None` if none was running.
    pub fn checkpoint_finish(&self) -> Result<Option<CheckpointReport>> {
        self.inner.check_process()?;
        self.inner.checkpoint_finish()
    }

    /// Stops the running checkpoint without freeing the log (pages already
    /// written stay; they hold committed bytes the log still covers). The
    /// next checkpoint writes the rest. Returns whether one was running.
    pub fn checkpoint_abandon(&self) -> Result<bool> {
        self.inner.check_process()?;
        self.inner.checkpoint_abandon()
    }

    /// Flushes, then applies the whole log to the segments and empties it.
    pub fn truncate(&self) -> Result<()> {
        self.inner.check_process()?;
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
            recovering: inner.recovering(),
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

    /// Refuses a forked child ([`Error::ForkedChild`]): called first (before
    /// any lock, which a thread that did not survive the fork may hold) by
    /// every call that writes the instance's files or waits for its threads.
    pub(crate) fn check_process(&self) -> Result<()> {
        if crate::mem::forked_since(self.process) {
            return Err(Error::ForkedChild { path: self.ring.path.clone(), owner: self.process.1 });
        }
        Ok(())
    }

    pub(crate) fn check_poison(&self) -> Result<()> {
        self.check_process()?;
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
}
