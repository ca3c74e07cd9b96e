//! Instant restart (`Options::instant_recovery`): recovery's steps 5 and 6
//! on a background thread after `open` has returned, pages brought up to
//! date on first touch (see `docs/DESIGN.md` §3.9; the index and the page
//! apply are in [`crate::lazy`]).

use super::Inner;
use crate::error::{Error, Result};
use crate::lazy::{self, Protected, Shared};
use crate::log::{self, format::Status};
use crate::segment::{RegionInner, SegmentInner};
use crate::stats::Counters;
use crate::storage::Storage;
use parking_lot::{Condvar, Mutex};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// More runs of pending pages than this in one region, and `map` brings
/// the segment up to date instead of protecting them (each run splits the
/// mapping, and the kernel limits a process's mappings).
const MAX_RUNS: usize = 8192;

/// What recovery leaves to the background thread.
pub(crate) struct Deferred {
    /// The frozen index of pending pages.
    pub shared: Shared,
    /// The devices of its segments, in its order.
    pub devices: Vec<(std::path::PathBuf, Arc<dyn Storage>)>,
    /// The end of the last complete transaction: the new head.
    pub end: u64,
    /// Complete transactions in the log.
    pub transactions: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Done,
    Failed,
}

struct State {
    phase: Phase,
    /// The index, until the apply is done.
    shared: Option<Arc<Shared>>,
    /// On-demand regions with protected pages.
    regions: Vec<Weak<RegionInner>>,
    /// The segments recovery opened (and locked), by path, until the apply
    /// ends: `open_segment` reuses them.
    devices: Vec<(std::path::PathBuf, Arc<dyn Storage>)>,
}

/// Instant recovery in progress (or done) for one instance.
pub(crate) struct Instant {
    state: Mutex<State>,
    changed: Condvar,
    end: u64,
    transactions: u64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Stop applying (the instance is closing with a failure, or a test
    /// asks): the next open recovers again.
    stop: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Instant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instant").field("end", &self.end).field("phase", &self.state.lock().phase).finish()
    }
}

impl Instant {
    pub(super) fn new(d: Deferred) -> Instant {
        Instant {
            state: Mutex::new(State {
                phase: Phase::Running,
                shared: Some(Arc::new(d.shared)),
                regions: Vec::new(),
                devices: d.devices,
            }),
            changed: Condvar::new(),
            end: d.end,
            transactions: d.transactions,
            thread: Mutex::new(None),
            stop: Default::default(),
        }
    }

    fn running(&self) -> Option<Arc<Shared>> {
        let st = self.state.lock();
        (st.phase == Phase::Running).then(|| st.shared.clone()).flatten()
    }

    /// The device recovery opened for the segment at `name`, while the
    /// apply runs (the segment is locked by it: a second open would fail).
    pub(super) fn device(&self, name: &Path) -> Option<Arc<dyn Storage>> {
        self.state.lock().devices.iter().find(|(p, _)| p == name).map(|(_, d)| d.clone())
    }
}

impl Inner {
    /// Blocks until instant recovery's background apply is durable (the
    /// status with the new epoch written); an error if it failed. Returns
    /// at once without instant recovery.
    pub(crate) fn wait_recovered(&self) -> Result<()> {
        let Some(i) = &self.instant else { return Ok(()) };
        let mut st = i.state.lock();
        while st.phase == Phase::Running {
            i.changed.wait(&mut st);
        }
        let failed = st.phase == Phase::Failed;
        drop(st);
        if failed {
            return self.recovery_failed();
        }
        Ok(())
    }

    /// Whether instant recovery's status recording the synced end (§3.4
    /// step 4) is durable, or not needed (true without instant recovery,
    /// and once the apply ended, even in failure).
    pub(crate) fn status_durable(&self) -> bool {
        match &self.instant {
            None => true,
            Some(i) => i.running().is_none_or(|s| s.writable.load(Ordering::Acquire)),
        }
    }

    /// Blocks until [`Inner::status_durable`]; an error if instant recovery
    /// failed.
    pub(crate) fn wait_status_durable(&self) -> Result<()> {
        let Some(i) = &self.instant else { return Ok(()) };
        let Some(shared) = i.running() else { return self.check_failed(i) };
        let mut st = i.state.lock();
        while !shared.writable.load(Ordering::Acquire) && st.phase == Phase::Running {
            i.changed.wait(&mut st);
        }
        drop(st);
        if shared.failed.load(Ordering::Acquire) {
            return self.recovery_failed();
        }
        Ok(())
    }

    /// An error if instant recovery failed.
    fn check_failed(&self, i: &Instant) -> Result<()> {
        if i.state.lock().phase == Phase::Failed {
            return self.recovery_failed();
        }
        Ok(())
    }

    /// The error of a failed instant recovery: the instance's poison (its
    /// cause), else a plain one.
    fn recovery_failed<T>(&self) -> Result<T> {
        self.check_poison()?;
        Err(Error::Poisoned { cause: "instant recovery failed".into() })
    }

    /// Whether recovery is complete and durable (at once without instant
    /// recovery; with it, once the background apply wrote its final status):
    /// no record from before this open is live any more.
    pub(crate) fn recovery_done(&self) -> bool {
        self.instant.as_ref().is_none_or(|i| i.state.lock().phase == Phase::Done)
    }

    /// Whether instant recovery's background apply is still running.
    pub(crate) fn recovering(&self) -> bool {
        self.instant.as_ref().is_some_and(|i| i.state.lock().phase == Phase::Running)
    }

    /// Starts the background apply.
    pub(super) fn start_instant(self: &Arc<Self>, log_path: &Path) -> Result<()> {
        let Some(i) = &self.instant else { return Ok(()) };
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name("rvm-recover".into())
            .spawn(move || me.instant_thread())
            .map_err(|e| Error::io("starting the recovery thread", log_path, e))?;
        *i.thread.lock() = Some(handle);
        Ok(())
    }

    /// Waits for the background apply to end (closing the instance).
    pub(super) fn join_instant(&self) {
        let Some(i) = &self.instant else { return };
        if let Some(h) = i.thread.lock().take() {
            if h.join().is_err() {
                let _ = self.poison::<()>(Err(Error::Poisoned { cause: "the recovery thread panicked".into() }));
            }
        }
        // A panicked thread left the phase running: end it.
        let mut st = i.state.lock();
        if st.phase == Phase::Running {
            st.phase = Phase::Failed;
            if let Some(s) = &st.shared {
                s.failed.store(true, Ordering::Release);
            }
            i.changed.notify_all();
        }
    }

    fn instant_thread(self: Arc<Self>) {
        let i = self.instant.as_ref().expect("started only with instant recovery");
        let Some(shared) = i.running() else { return };
        let devices = i.state.lock().devices.clone();
        let r = self.instant_apply(i, &shared, &devices);
        let r = self.poison(r);
        drop(devices);
        if r.is_ok() {
            // Every page is up to date: regions get their normal protection
            // back and their hooks go, before the apply counts as done (a
            // checkpoint may then hand region memory to `pwrite`). A region
            // a `map` registers meanwhile is taken in the next round; one
            // registered after the phase changes releases itself.
            loop {
                let regions = std::mem::take(&mut i.state.lock().regions);
                if regions.is_empty() {
                    break;
                }
                for region in regions.iter().filter_map(Weak::upgrade) {
                    if let Some(p) = region.lazy.lock().as_ref() {
                        p.release();
                    }
                }
            }
        }
        let mut st = i.state.lock();
        // The segments recovery opened are closed (and unlocked) here, under
        // the lock `device` takes, unless the application opened them (then
        // its handle keeps them).
        st.devices.clear();
        if r.is_ok() {
            st.phase = Phase::Done;
            st.shared = None;
        } else {
            st.phase = Phase::Failed;
            shared.failed.store(true, Ordering::Release);
            shared.writable.store(true, Ordering::Release);
        }
        i.changed.notify_all();
    }

    /// Steps 4 to 6 of §3.4, with step 5 page by page.
    fn instant_apply(
        &self,
        i: &Instant,
        shared: &Shared,
        devices: &[(std::path::PathBuf, Arc<dyn Storage>)],
    ) -> Result<()> {
        // Step 4: before any segment write, a status records how far the
        // log is durable. Written without the status lock, so that opening
        // a recorded segment does not wait for it: no other status write
        // can happen meanwhile (log truncations and checkpoints wait for
        // the apply, a dictionary entry for this status:
        // `open_segment`).
        let next = {
            let st = self.status.lock();
            (st.status.synced_end < i.end).then(|| {
                let mut next = st.status.clone();
                next.seq += 1;
                next.synced_end = i.end;
                next
            })
        };
        if let Some(next) = next {
            log::write_status(&self.ring, &next)?;
            self.status.lock().status = next;
        }
        {
            let _st = i.state.lock();
            shared.writable.store(true, Ordering::Release);
            i.changed.notify_all();
        }
        // Step 5: every pending page, then the segments synced.
        let stop = || i.stop.load(Ordering::Acquire);
        for (s, (path, dev)) in devices.iter().enumerate() {
            let written = shared
                .apply_segment(s, dev.as_ref(), &stop)
                .map_err(|e| Error::io("instant recovery: applying", path, e))?;
            Counters::add(&self.counters.segment_bytes_written, written);
        }
        if stop() {
            return Err(Error::Poisoned { cause: "instant recovery stopped".into() });
        }
        for (path, dev) in devices {
            dev.sync().map_err(|e| Error::io("syncing segment", path, e))?;
        }
        // Step 6: the new epoch and head.
        let mut st = self.status.lock();
        let next = Status {
            seq: st.status.seq + 1,
            epoch: self.epoch,
            head: i.end,
            // As full recovery's: the old synced end may lie past the
            // new head (a salvage drops the records up to it), and a
            // synced end past the head reads as damage at the next open.
            synced_end: i.end,
            committed: st.status.committed.saturating_add(i.transactions),
            ..st.status.clone()
        };
        log::write_status(&self.ring, &next)?;
        st.status = next;
        Ok(())
    }

    /// Brings every pending page of `seg` up to date on the calling thread
    /// (waiting for segment writes to be allowed), and gives its lazily
    /// protected regions their normal protection back. For what cannot work
    /// with pages brought in on a fault: regions copied at map time, tracked
    /// regions, growing a region.
    pub(crate) fn settle_segment(&self, seg: &SegmentInner) -> Result<()> {
        let Some(i) = &self.instant else { return Ok(()) };
        let Some(shared) = i.running() else { return self.check_poison() };
        let Some(s) = shared.seg_of(&seg.dev) else { return Ok(()) };
        if !shared.segment_done(s) {
            self.wait_status_durable()?;
            let applied = shared.apply_segment(s, seg.dev.as_ref(), &|| false);
            let written = self.poison(applied.map_err(|e| Error::io("instant recovery: applying", &seg.name, e)))?;
            Counters::add(&self.counters.segment_bytes_written, written);
        }
        let regions: Vec<_> = i.state.lock().regions.iter().filter_map(Weak::upgrade).collect();
        for r in regions.iter().filter(|r| std::ptr::eq(Arc::as_ptr(&r.segment), seg)) {
            if let Some(p) = r.lazy.lock().as_ref() {
                p.release();
            }
        }
        Ok(())
    }

    /// Protects the pending pages of a just-mapped on-demand region
    /// `[addr, addr + len)` (segment offset `offset`); falls back to
    /// bringing the segment up to date.
    pub(super) fn instant_protect(
        &self,
        seg: &SegmentInner,
        addr: usize,
        len: usize,
        offset: u64,
    ) -> Result<Option<Protected>> {
        let Some(i) = &self.instant else { return Ok(None) };
        {
            let st = i.state.lock();
            if st.phase == Phase::Failed {
                drop(st);
                return self.recovery_failed();
            }
            let Some(shared) = st.shared.clone().filter(|_| st.phase == Phase::Running) else { return Ok(None) };
            let Some(s) = shared.seg_of(&seg.dev) else { return Ok(None) };
            let ps = shared.page() as u64;
            let runs = shared.segs[s].pending_runs(offset / ps, (offset + len as u64) / ps);
            if runs.is_empty() {
                return Ok(None);
            }
            if runs.len() <= MAX_RUNS {
                if let Ok(p) = lazy::protect_region(&shared, s, addr, len, offset, &runs) {
                    return Ok(Some(p));
                }
            }
        }
        // Too many runs, no fault slot, or mprotect failed: the region is
        // accessible, so every page must be up to date before it is shown.
        self.settle_segment(seg)?;
        Ok(None)
    }

    /// Remembers a published region with protected pages, for the end of
    /// the apply.
    pub(super) fn instant_register(&self, region: &Arc<RegionInner>) {
        if let Some(i) = &self.instant {
            let mut st = i.state.lock();
            if st.phase == Phase::Running {
                st.regions.retain(|w| w.strong_count() > 0);
                st.regions.push(Arc::downgrade(region));
                return;
            }
            drop(st);
            // The apply ended meanwhile (every page is up to date).
            if let Some(p) = region.lazy.lock().as_ref() {
                p.release();
            }
        }
    }
}
