//! The generation checkpoint: an O(1) freeze, a sweep that runs while
//! transactions go on, and a durable hand-over that frees the log.
//!
//! After the 1995 note on one-bit generation checkpoints, adapted to RVM's
//! transactions (see `docs/DESIGN.md`, "The generation checkpoint"):
//!
//! - Every region has two page sets ([`PageBits`]), one per generation. A
//!   commit marks the pages it changes in the set of the current
//!   generation, under the commit lock.
//! - The freeze, under the commit lock, takes the pending batch (its end in
//!   the log is the checkpoint position L), flips the generation bit, and
//!   notes the transactions in flight. Nothing else: no walk over pages,
//!   regions or sets.
//! - The sweep writes each page of the old set once, as it stood at L:
//!   memory, except where memory may hold bytes that are not committed at L
//!   (ranges of transactions in flight at the freeze, and leftovers of
//!   no-restore aborts), and pages of no-copy regions (their memory began
//!   as zeros, not the segment's bytes): those pages are rebuilt from the
//!   segment plus the log up to L, exactly what a replay would write. A `set_range` that touches a page still waiting in the old
//!   set copies the page first (the write barrier), so stores made after
//!   the freeze never reach the sweep.
//! - Finish: segments synced, then a status with head = L; the log before L
//!   is free.

use super::Inner;
use crate::error::{Error, Result};
use crate::log::{self, format};
use crate::mem;
use crate::segment::{CopyMode, RegionInner, SegmentInner};
use crate::stats::Counters;
use crate::track::{Padded, TxTrack};
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A barrier copy: the page's region (kept alive, and its `copied` bit
/// cleared when the copy goes) and the page's bytes.
type PageCopy = (Arc<RegionInner>, Box<[u8]>);

impl Checkpointer {
    /// Every range the open transactions have declared, sorted by start
    /// (for the undeclared-store detector).
    pub fn open_ranges(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for t in self.txs.lock().iter() {
            v.extend(t.ranges.lock().iter().copied());
        }
        v.sort_unstable();
        v
    }
}

/// Page copies made by the write barrier, and which generation is swept.
#[derive(Debug, Default)]
struct Copies {
    /// (region key, page) → the page as it stood before a post-freeze
    /// store. Changed only through `put` and `take`, which keep the
    /// regions' `copied` bits equal to the keys.
    pages: HashMap<(usize, usize), PageCopy>,
    /// Page buffers to reuse (fresh memory costs a page fault per page on
    /// the writer's path); at most [`SPARE_PAGES`] are kept.
    spare: Vec<Box<[u8]>>,
    /// Whether the sweep is set up (writers may then write pages out
    /// themselves instead of copying past the limit).
    sweeping: bool,
    /// Pages the sweep is writing straight from memory: (region key, first
    /// page, end page). A store into one of them waits until it is written.
    writing: Option<(usize, usize, usize)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Frozen; the batch ending at L is being written and synced.
    Frozen,
    /// Set up: pages are being written.
    Sweeping,
}

/// One checkpoint in progress.
#[derive(Debug)]
struct Sweep {
    phase: Phase,
    /// The checkpoint position L (known once the freeze batch is written).
    lsn: u64,
    /// Transactions in flight at the freeze.
    frozen: Vec<Arc<TxTrack>>,
    /// Regions with pages in the old set, by address.
    regions: Vec<Arc<RegionInner>>,
    /// Next page to look at: (index in `regions`, page).
    cursor: (usize, usize),
    /// Segments written so far (synced at the finish).
    written: HashMap<u32, Arc<SegmentInner>>,
    started: Instant,
    pages: u64,
    rebuilt: u64,
    /// Pages to sweep, counted at the setup (for pacing).
    to_sweep: u64,
}

/// The checkpointer's state, one per instance.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    /// The current generation (0 or 1); read and flipped under the commit lock.
    gen: AtomicUsize,
    /// The generation being swept (meaningful while `barrier` is on).
    old: AtomicUsize,
    /// On from the freeze to the finish: `set_range` must run the barrier.
    barrier: AtomicBool,
    txs: Mutex<Vec<Arc<TxTrack>>>,
    /// Taken by the sweep for every page: kept off the cache lines that
    /// every `set_range` reads (`barrier`, `old`) or locks (`txs`).
    copies: Padded<Mutex<Copies>>,
    /// Signalled when the sweep's direct write of `Copies::writing` ends.
    written: Condvar,
    sweep: Padded<Mutex<Option<Sweep>>>,
    /// One checkpoint start (freeze + setup) at a time.
    starting: Mutex<()>,
    /// Barrier copies kept at most (pages) before writers write pages out
    /// themselves.
    copy_limit: usize,
    /// A region with dirty pages was unmapped: the next checkpoint must
    /// replay the log instead (the pages' memory is gone).
    retired_dirty: AtomicBool,
    /// Pages writers are writing to segments right now (copy pool full).
    writer_writes: AtomicUsize,
    /// Bytes per second a sweep writes at most ([`crate::Options::checkpoint_rate`]).
    rate: Option<u64>,
    /// Threads waiting for the running checkpoint to end (a writer that
    /// found the log full, a replay, an unmap): while any, the sweep does
    /// not pace itself.
    hurry: AtomicUsize,
}

/// A thread waiting for the running checkpoint (see [`Checkpointer::hurry`]).
pub(crate) struct Hurry<'a>(&'a AtomicUsize);

impl Drop for Hurry<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Copy buffers kept for reuse between copies and checkpoints.
const SPARE_PAGES: usize = 1024;

impl Copies {
    /// A buffer for one page copy.
    fn buffer(&mut self) -> Box<[u8]> {
        self.spare.pop().unwrap_or_else(|| vec![0u8; mem::page_size()].into_boxed_slice())
    }

    /// Adds the copy of page `p` of `r`.
    fn put(&mut self, r: &Arc<RegionInner>, p: usize, page: Box<[u8]>) {
        r.track.copied.insert_range(p, p);
        self.pages.insert((region_key(r), p), (r.clone(), page));
    }

    /// Takes the copy of page `p` of `r`, if there is one.
    fn take(&mut self, r: &Arc<RegionInner>, p: usize) -> Option<Box<[u8]>> {
        let (_, page) = self.pages.remove(&(region_key(r), p))?;
        r.track.copied.remove(p);
        Some(page)
    }

    fn has(&self, r: &RegionInner, p: usize) -> bool {
        r.track.copied.contains(p)
    }

    fn recycle(&mut self, page: Box<[u8]>) {
        if self.spare.len() < SPARE_PAGES {
            self.spare.push(page);
        }
    }

    /// Drops every copy, keeping some buffers.
    fn clear(&mut self) {
        let pages = std::mem::take(&mut self.pages);
        for ((_, p), (r, page)) in pages {
            r.track.copied.remove(p);
            self.recycle(page);
        }
        self.spare.truncate(SPARE_PAGES);
    }
}

/// Bytes of page images rebuilt from the log at once (each batch of them
/// costs a scan of the log up to the checkpoint position).
const REBUILD_BYTES: usize = 16 << 20;

/// Pages written with one `write_at` at most (writers touching them wait
/// for the write).
const RUN_PAGES: usize = 16;

impl Checkpointer {
    pub fn new(copy_limit: usize, rate: Option<u64>) -> Checkpointer {
        Checkpointer {
            gen: AtomicUsize::new(0),
            old: AtomicUsize::new(1),
            barrier: AtomicBool::new(false),
            txs: Mutex::new(Vec::new()),
            copies: Padded(Mutex::new(Copies::default())),
            written: Condvar::new(),
            sweep: Padded(Mutex::new(None)),
            starting: Mutex::new(()),
            copy_limit: copy_limit.max(1),
            retired_dirty: AtomicBool::new(false),
            writer_writes: AtomicUsize::new(0),
            rate: rate.filter(|&r| r > 0),
            hurry: AtomicUsize::new(0),
        }
    }

    /// Notes that a region with dirty pages was unmapped (with no
    /// checkpoint running).
    pub fn retire_dirty_region(&self) {
        self.retired_dirty.store(true, Ordering::SeqCst);
    }

    /// The generation commits mark now (call under the commit lock).
    pub fn current(&self) -> usize {
        self.gen.load(Ordering::Relaxed)
    }

    /// Asks a paced sweep to go at full speed until the guard is dropped;
    /// take it before waiting for the checkpoint to end.
    pub fn hurry(&self) -> Hurry<'_> {
        self.hurry.fetch_add(1, Ordering::AcqRel);
        Hurry(&self.hurry)
    }

    pub fn is_active(&self) -> bool {
        self.barrier.load(Ordering::Acquire)
    }

    /// Registers a new transaction (at begin), reusing `spare` (a record
    /// no one else holds) if given.
    pub fn track(&self, spare: Option<Arc<TxTrack>>) -> Arc<TxTrack> {
        let t = match spare {
            Some(t) => {
                t.ranges.lock().clear();
                t
            }
            None => Arc::new(TxTrack::default()),
        };
        self.txs.lock().push(t.clone());
        t
    }

    /// Forgets a finished transaction (a freeze may still hold it).
    pub fn untrack(&self, t: &Arc<TxTrack>) {
        let mut txs = self.txs.lock();
        if let Some(i) = txs.iter().position(|x| Arc::ptr_eq(x, t)) {
            txs.swap_remove(i);
        }
    }
}

/// Pages `[first, last]` of `region` that `[addr, addr + len)` touches.
fn page_span(region: &RegionInner, addr: usize, len: usize) -> (usize, usize) {
    let ps = mem::page_size();
    let off = addr - region.addr();
    (off / ps, (off + len.max(1) - 1) / ps)
}

fn region_key(r: &Arc<RegionInner>) -> usize {
    Arc::as_ptr(r) as usize
}

/// How [`Inner::checkpoint_start`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Frozen and set up: the sweep can run.
    Started,
    /// Another checkpoint is running; nothing was frozen.
    Running,
    /// Frozen, then dropped because a log-replay truncation overtook it.
    Overtaken,
}

/// What a completed checkpoint did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The checkpoint position L: the log before it is free.
    pub lsn: u64,
    /// Pages written to segments.
    pub pages: u64,
    /// Pages rebuilt from the segment and the log (instead of memory).
    pub rebuilt: u64,
}

impl Inner {
    /// Commit side: marks the pages of a committed range in the current
    /// generation. Called under the commit lock.
    pub(crate) fn mark_dirty(&self, region: &RegionInner, addr: usize, len: usize) {
        let (first, last) = page_span(region, addr, len);
        region.track.dirty[self.ckpt.current()].insert_range(first, last);
    }

    /// A no-restore abort left uncommitted bytes in these ranges.
    pub(crate) fn mark_polluted(&self, region: &RegionInner, addr: usize, len: usize) {
        let (first, last) = page_span(region, addr, len);
        region.track.polluted.insert_range(first, last);
    }

    /// The write barrier, run by `set_range` after the range is recorded and
    /// before the caller stores: a page still waiting in the old set is
    /// copied first, so the sweep writes it as it stood before the store.
    pub(crate) fn checkpoint_barrier(&self, region: &Arc<RegionInner>, addr: usize, len: usize) {
        if !self.ckpt.is_active() {
            return;
        }
        let old = self.ckpt.old.load(Ordering::Acquire);
        let set = &region.track.dirty[old];
        let (first, last) = page_span(region, addr, len);
        let ps = mem::page_size();
        for p in first..=last {
            // Not waiting, or copied already (the bit may clear meanwhile:
            // then the sweep took the copy, and the page left the set).
            if !set.contains(p) || region.track.copied.contains(p) {
                continue;
            }
            let mut copies = self.ckpt.copies.lock();
            // The sweep is writing this page from memory: wait for it.
            let key = region_key(region);
            while copies.writing.is_some_and(|(k, first, end)| k == key && (first..end).contains(&p)) {
                self.ckpt.written.wait(&mut copies);
            }
            if !set.contains(p) || copies.has(region, p) {
                continue;
            }
            let mut page = copies.buffer();
            let at = region.addr() + p * ps;
            if copies.sweeping {
                // SAFETY: the page lies inside `region`, whose mapping this
                // transaction holds. Once the sweep is set up, no store can
                // race with this read: a page of the old set holds no range of
                // a transaction in flight at the freeze (those pages were
                // rebuilt and left the set), and every later store into it
                // waits for this lock in its own barrier first.
                unsafe { mem::copy_from(at, &mut page) };
            } else {
                // SAFETY: inside the held region's mapping. Before the setup,
                // a transaction in flight at the freeze may store into this
                // page; such pages are rebuilt from the log at setup and
                // their copies dropped, so racy bytes are never used.
                unsafe { mem::copy_from_racy(at, &mut page) };
            }
            if copies.pages.len() < self.ckpt.copy_limit || !copies.sweeping {
                copies.put(region, p, page);
                Counters::add(&self.counters.checkpoint_copies, 1);
                continue;
            }
            // The copy pool is full: write the page out now, on this thread
            // (slowing the writer down rather than holding more memory).
            set.remove(p);
            self.ckpt.writer_writes.fetch_add(1, Ordering::AcqRel);
            drop(copies);
            let off = region.offset + (p * ps) as u64;
            let r = region
                .segment
                .dev
                .write_at(&page, off)
                .map_err(|e| Error::io("writing segment", &region.segment.name, e));
            self.ckpt.writer_writes.fetch_sub(1, Ordering::AcqRel);
            self.ckpt.copies.lock().recycle(page);
            Counters::add(&self.counters.checkpoint_stalls, 1);
            Counters::add(&self.counters.checkpoint_pages, 1);
            Counters::add(&self.counters.checkpoint_bytes, ps as u64);
            let _ = self.poison(r);
        }
    }

    /// Syncs every segment the sweep may have written (its own writes, and
    /// pages writers wrote when the copy pool was full), once no writer is
    /// still writing one.
    /// A tracked transaction's end (see `crate::tracked`): under the copy
    /// lock, so a sweep never reads a twin or shadow while it changes. With
    /// `committed`, a page the sweep still has to write whose committed
    /// bytes changed after the freeze (it is in both generations' sets:
    /// tracked pages take no other commits while a tracked transaction
    /// holds them) keeps its image from before the transaction (twin or
    /// shadow), the page as of the freeze, as the write barrier's copy.
    pub(crate) fn tracked_release(&self, ended: &crate::tracked::Ended) {
        let ps = mem::page_size();
        let committed = ended.committed;
        let held: Vec<(Arc<RegionInner>, usize)> = {
            let regions = self.regions.read();
            ended
                .pages
                .iter()
                .filter_map(|&page| regions.find(page, page + ps).map(|r| (r.clone(), (page - r.addr()) / ps)))
                .collect()
        };
        let mut copies = self.ckpt.copies.lock();
        let active = self.ckpt.is_active();
        let old = self.ckpt.old.load(Ordering::Acquire);
        for (r, p) in &held {
            let Some(t) = r.tracked.get() else { continue };
            let p = *p;
            if committed
                && active
                && r.track.dirty[old].contains(p)
                && r.track.dirty[old ^ 1].contains(p)
                && !copies.has(r, p)
            {
                let mut page = copies.buffer();
                if t.pages.before_image(p, &mut page) {
                    copies.put(r, p, page);
                    Counters::add(&self.counters.checkpoint_copies, 1);
                } else {
                    copies.recycle(page);
                }
            }
            ended.settle(&t.pages, p);
        }
    }

    /// The sweep's image of page `p` of a tracked region, as of the freeze
    /// (see `TrackedPages::snapshot`).
    fn tracked_snapshot(&self, copies: &mut Copies, r: &RegionInner, p: usize) -> Result<Box<[u8]>> {
        let mut page = copies.buffer();
        if let Some(t) = r.tracked.get() {
            t.pages
                .snapshot(p, &mut page)
                .map_err(|e| Error::io("reading a tracked page's committed image", &r.segment.name, e))?;
        }
        Ok(page)
    }

    fn sync_swept(&self, sweep: &Sweep) -> Result<()> {
        while self.ckpt.writer_writes.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
        let mut segs: HashMap<u32, &Arc<SegmentInner>> = sweep.written.iter().map(|(k, v)| (*k, v)).collect();
        for r in &sweep.regions {
            segs.entry(r.segment.id).or_insert(&r.segment);
        }
        for seg in segs.values() {
            seg.dev.sync().map_err(|e| Error::io("syncing segment", &seg.name, e))?;
        }
        Ok(())
    }

    /// Runs a whole checkpoint (finishing one in progress first): every
    /// commit made before the call is in the segments when it returns, and
    /// the log before it is free.
    pub(crate) fn checkpoint_full(&self) -> Result<CheckpointReport> {
        loop {
            match self.checkpoint_start()? {
                Start::Started => {
                    if let Some(report) = self.checkpoint_finish()? {
                        return Ok(report);
                    }
                }
                Start::Running => {
                    self.checkpoint_finish()?;
                }
                // A replay truncation took over; freeze again so that every
                // commit before the call is covered.
                Start::Overtaken => {}
            }
        }
    }

    /// Freezes and sets up a checkpoint.
    pub(crate) fn checkpoint_start(&self) -> Result<Start> {
        self.wait_recovered()?;
        let _one = self.ckpt.starting.lock();
        self.check_poison()?;
        if self.ckpt.sweep.lock().is_some() {
            return Ok(Start::Running);
        }
        // The freeze: O(1) in heap size, under the commit lock.
        let (n, batch, last_tx, old) = {
            let mut st = self.state.lock();
            let t0 = Instant::now();
            self.check_poison()?;
            let (n, batch) = st.take_batch();
            let last_tx = st.next_tx - 1;
            let old = self.ckpt.gen.load(Ordering::Relaxed);
            self.ckpt.gen.store(old ^ 1, Ordering::Relaxed);
            self.ckpt.old.store(old, Ordering::Release);
            self.ckpt.barrier.store(true, Ordering::SeqCst);
            let frozen = self.ckpt.txs.lock().clone();
            *self.ckpt.sweep.lock() = Some(Sweep {
                phase: Phase::Frozen,
                lsn: 0,
                frozen,
                regions: Vec::new(),
                cursor: (0, 0),
                written: HashMap::new(),
                started: Instant::now(),
                pages: 0,
                rebuilt: 0,
                to_sweep: 0,
            });
            let ns = t0.elapsed().as_nanos() as u64;
            Counters::add(&self.counters.checkpoint_freeze_ns, ns);
            self.counters.checkpoint_freeze_max_ns.fetch_max(ns, Ordering::Relaxed);
            self.counters.checkpoint_freeze_last_ns.store(ns, Ordering::Relaxed);
            (n, batch, last_tx, old)
        };
        // WAL: the log is durable up to L before any page is written, and
        // a status records it (so damage to any record a page reflects is
        // refused at the next open, never taken for a torn end).
        let r = self
            .write_batch(n, &batch)
            .and_then(|lsn| self.sync_to(lsn).and_then(|_| self.record_synced_end(lsn)).map(|_| lsn));
        self.recycle_batch(batch);
        let lsn = match r {
            Ok(lsn) => lsn,
            Err(e) => {
                self.drop_checkpoint()?;
                return Err(e);
            }
        };
        self.mark_durable(last_tx);
        if let Err(e) = self.verify_sweep(old) {
            self.drop_checkpoint()?;
            return Err(e);
        }
        let _t = self.truncation.lock();
        let mut guard = self.ckpt.sweep.lock();
        let Some(sweep) = guard.as_mut() else {
            // A truncation replayed the log meanwhile and dropped this one.
            return Ok(Start::Overtaken);
        };
        let r = self.setup_sweep(sweep, lsn, old);
        if matches!(r, Ok(false)) {
            drop(guard);
            drop(_t);
            let _ = self.drop_checkpoint();
            Counters::add(&self.counters.checkpoints_cancelled, 1);
            self.ckpt.retired_dirty.store(false, Ordering::SeqCst);
            // Everything committed before the flag was cleared, replayed.
            self.replay_all()?;
            return Ok(Start::Overtaken);
        }
        if r.is_err() {
            drop(guard);
            let _ = self.drop_checkpoint();
            return self.poison(r).map(|_| Start::Overtaken);
        }
        Ok(Start::Started)
    }

    /// Takes down a checkpoint that will not finish (error or cancel).
    ///
    /// Pages it wrote are synced: a swept page's bit is gone, so a later
    /// checkpoint, which syncs only what it writes itself, would free the
    /// log that covers it. (On an error path the instance is poisoned and
    /// the sync result does not matter.)
    /// The undeclared-store check before a sweep reads memory: every page
    /// of the old generation (see `crate::verify`). A finding also goes to
    /// the next commit (a background checkpoint's error is not seen).
    fn verify_sweep(&self, old: usize) -> Result<()> {
        let Some(v) = &self.verify else { return Ok(()) };
        let _exclusive = v.exclusive();
        let open = self.ckpt.open_ranges();
        let regions: Vec<Arc<RegionInner>> = self.regions.read().iter().cloned().collect();
        for r in &regions {
            if let Err(e) = crate::verify::check_pages(r, r.track.dirty[old].pages(), &open) {
                if let crate::Error::Tx(t) = &e {
                    v.set_pending(t.clone());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn drop_checkpoint(&self) -> Result<()> {
        let dropped = self.ckpt.sweep.lock().take();
        if dropped.is_some() {
            // Pages not swept go back to the current generation: the log
            // stays until the next checkpoint writes them (or a replay does).
            let old = self.ckpt.old.load(Ordering::Acquire);
            for r in self.regions.read().iter() {
                r.track.dirty[old].move_into(&r.track.dirty[old ^ 1]);
            }
        }
        // The pool first: it holds regions, which `unmap` may hand back to
        // the application once the barrier is off. (No copy can be added
        // meanwhile: the old set is empty or moved.)
        {
            let mut copies = self.ckpt.copies.lock();
            copies.clear();
            copies.sweeping = false;
        }
        self.ckpt.barrier.store(false, Ordering::SeqCst);
        match &dropped {
            Some(sweep) => {
                let r = self.sync_swept(sweep);
                self.poison(r)
            }
            None => Ok(()),
        }
    }

    /// Setup, with the truncation lock held: picks the regions to sweep and
    /// writes the pages that must be rebuilt from the log. `false` if a
    /// dirty region was unmapped: the log must be replayed instead.
    fn setup_sweep(&self, sweep: &mut Sweep, lsn: u64, old: usize) -> Result<bool> {
        sweep.lsn = lsn;
        {
            let table = self.regions.read();
            // Read under the regions lock that `unmap` holds while it sets
            // the flag: an unmap either finished before this (flag seen) or
            // comes after and, seeing this checkpoint, waits for its finish.
            if self.ckpt.retired_dirty.load(Ordering::SeqCst) {
                return Ok(false);
            }
            sweep.regions = table.iter().filter(|r| !r.track.dirty[old].is_empty()).cloned().collect();
        }
        // Pages memory cannot give as of L: ranges of transactions in flight
        // at the freeze, pages polluted by no-restore aborts, and every page
        // of a no-copy region (its memory started as zeros, not the
        // segment's bytes: only the log says which bytes it holds rightly).
        let mut rebuild: BTreeSet<(usize, usize)> = BTreeSet::new();
        for t in &sweep.frozen {
            for &(addr, len) in t.ranges.lock().iter() {
                let i = sweep.regions.partition_point(|r| r.addr() <= addr);
                if i == 0 || !sweep.regions[i - 1].contains(addr, addr + len) {
                    continue;
                }
                let r = &sweep.regions[i - 1];
                let (first, last) = page_span(r, addr, len);
                rebuild.extend((first..=last).filter(|&p| r.track.dirty[old].contains(p)).map(|p| (i - 1, p)));
            }
        }
        for (i, r) in sweep.regions.iter().enumerate() {
            let dirty = &r.track.dirty[old];
            if r.copy == CopyMode::NoCopy {
                rebuild.extend(dirty.pages().map(|p| (i, p)));
            } else {
                rebuild.extend(dirty.intersection(&r.track.polluted).map(|p| (i, p)));
            }
        }
        // In chunks of bounded memory, one scan of the log each.
        let rebuild: Vec<(usize, usize)> = rebuild.into_iter().collect();
        for chunk in rebuild.chunks((REBUILD_BYTES / mem::page_size()).max(1)) {
            let images = self.rebuild_pages(sweep, chunk, lsn)?;
            for (&(i, p), image) in chunk.iter().zip(images) {
                let r = &sweep.regions[i];
                {
                    let mut copies = self.ckpt.copies.lock();
                    r.track.dirty[old].remove(p);
                    if let Some(page) = copies.take(r, p) {
                        copies.recycle(page);
                    }
                }
                self.write_pages(sweep, i, p, &image)?;
            }
        }
        if !rebuild.is_empty() {
            Counters::add(&self.counters.checkpoint_rebuilt_pages, rebuild.len() as u64);
            sweep.rebuilt = rebuild.len() as u64;
        }
        // Warm copy buffers for the writers' barrier, as many as it may
        // hold: fresh memory would cost them a page fault per copy.
        let dirty: usize = sweep.regions.iter().map(|r| r.track.dirty[old].count()).sum();
        let want = dirty.min(self.ckpt.copy_limit);
        let have = self.ckpt.copies.lock().spare.len();
        if want > have {
            let fresh: Vec<Box<[u8]>> = (have..want)
                .map(|_| {
                    let mut page = vec![0u8; mem::page_size()].into_boxed_slice();
                    // Touch it now (calloc may hand out untouched zero pages).
                    page.iter_mut().step_by(512).for_each(|b| *b = 1);
                    page
                })
                .collect();
            self.ckpt.copies.lock().spare.extend(fresh);
        }
        sweep.to_sweep = dirty as u64;
        sweep.phase = Phase::Sweeping;
        self.ckpt.copies.lock().sweeping = true;
        Ok(true)
    }

    /// Images of `pages` as of `lsn`: the segment's bytes (as of the head:
    /// nothing of this checkpoint is written yet) with the complete
    /// transactions of the log `[head, lsn)` applied in order.
    fn rebuild_pages(&self, sweep: &Sweep, pages: &[(usize, usize)], lsn: u64) -> Result<Vec<Box<[u8]>>> {
        let ps = mem::page_size();
        // (segment id, segment offset of the page) → image index.
        let mut index: BTreeMap<(u32, u64), usize> = BTreeMap::new();
        let mut images = Vec::with_capacity(pages.len());
        for &(i, p) in pages {
            let r = &sweep.regions[i];
            let off = r.offset + (p * ps) as u64;
            let mut image = vec![0u8; mem::page_size()].into_boxed_slice();
            r.segment.dev.read_at(&mut image, off).map_err(|e| Error::io("reading segment", &r.segment.name, e))?;
            index.insert((r.segment.id, off), images.len());
            images.push(image);
        }
        let head = self.head.load(Ordering::Acquire);
        let mut tx: Vec<(u32, u64, Vec<u8>)> = Vec::new();
        let images = std::cell::RefCell::new(images);
        let tx = std::cell::RefCell::new(&mut tx);
        let end = log::scan(
            &self.ring,
            head,
            lsn,
            self.epoch,
            |f| {
                if let format::Frame::Range { segment, offset, data } = f.frame {
                    tx.borrow_mut().push((segment, offset, data.to_vec()));
                }
                Ok(())
            },
            |_, _| {
                let mut images = images.borrow_mut();
                for (segment, offset, data) in tx.borrow_mut().drain(..) {
                    let end = offset + data.len() as u64;
                    let first = offset - offset % ps as u64;
                    for (&(_, page_off), &k) in index.range((segment, first)..(segment, end)) {
                        let from = offset.max(page_off);
                        let to = end.min(page_off + ps as u64);
                        images[k][(from - page_off) as usize..(to - page_off) as usize]
                            .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
                    }
                }
                Ok(())
            },
        )?;
        if end.end != lsn {
            return Err(Error::corrupted(
                "log (records before the checkpoint position are unreadable)",
                format!("{} position {}", self.ring.path.display(), end.end),
            ));
        }
        Ok(images.into_inner())
    }

    /// Writes `image` (whole pages from page `p` of region `i`) to the segment.
    fn write_pages(&self, sweep: &mut Sweep, i: usize, p: usize, image: &[u8]) -> Result<()> {
        let r = &sweep.regions[i];
        let off = r.offset + (p * mem::page_size()) as u64;
        r.segment.dev.write_at(image, off).map_err(|e| Error::io("writing segment", &r.segment.name, e))?;
        sweep.written.entry(r.segment.id).or_insert_with(|| r.segment.clone());
        let pages = (image.len() / mem::page_size()) as u64;
        sweep.pages += pages;
        Counters::add(&self.counters.checkpoint_pages, pages);
        Counters::add(&self.counters.checkpoint_bytes, image.len() as u64);
        Ok(())
    }

    /// Writes up to `max` pages of the old set; returns how many (0 when the
    /// sweep is done or no checkpoint is set up).
    pub(crate) fn checkpoint_step(&self, max: usize) -> Result<usize> {
        self.check_poison()?;
        let mut guard = self.ckpt.sweep.lock();
        let Some(sweep) = guard.as_mut().filter(|s| s.phase == Phase::Sweeping) else { return Ok(0) };
        let r = self.sweep_pages(sweep, max, false);
        if r.is_err() {
            drop(guard);
            let _ = self.drop_checkpoint();
        }
        self.poison(r)
    }

    /// Writes up to `max` pages of the old set; `paced`: at most
    /// [`Checkpointer::rate`] bytes per second since the freeze, unless
    /// someone hurries it.
    fn sweep_pages(&self, sweep: &mut Sweep, max: usize, paced: bool) -> Result<usize> {
        let ps = mem::page_size();
        let old = self.ckpt.old.load(Ordering::Acquire);
        let mut done = 0;
        while done < max {
            let (i, from) = sweep.cursor;
            let Some(r) = sweep.regions.get(i).cloned() else { break };
            let set = &r.track.dirty[old];
            let Some(first) = set.next(from) else {
                sweep.cursor = (i + 1, 0);
                continue;
            };
            // A run of pages still in the set.
            let mut end = first + 1;
            while end - first < RUN_PAGES && done + (end - first) < max && set.contains(end) {
                end += 1;
            }
            sweep.cursor = (i, end);
            // Pages with a barrier copy leave the set with the copy taken,
            // under the copy lock, and the copy is written. The others are
            // written straight from memory, marked as being written: a
            // writer's barrier for one of them waits until the write ends,
            // so they cannot change meanwhile.
            let key = region_key(&r);
            let mut p = first;
            while p < end {
                let mut copies = self.ckpt.copies.lock();
                if !set.contains(p) {
                    // A writer wrote it out itself meanwhile.
                    p += 1;
                    continue;
                }
                if r.tracked.get().is_some() && !copies.has(&r, p) {
                    // Never written straight from memory: tracked stores
                    // are not announced, so `writing` could not hold them
                    // off.
                    let page = self.tracked_snapshot(&mut copies, &r, p)?;
                    copies.put(&r, p, page);
                }
                if let Some(page) = copies.take(&r, p) {
                    set.remove(p);
                    drop(copies);
                    let r = self.write_pages(sweep, i, p, &page);
                    self.ckpt.copies.lock().recycle(page);
                    r?;
                    done += 1;
                    p += 1;
                    continue;
                }
                let mut e = p + 1;
                while e < end && set.contains(e) && !copies.has(&r, e) {
                    e += 1;
                }
                copies.writing = Some((key, p, e));
                drop(copies);
                // SAFETY: pages [p, e) lie inside the region's live mapping
                // (the sweep holds the region). None holds a range of a
                // transaction in flight at the freeze (those pages were
                // rebuilt at setup), and a store after the freeze first
                // passes its barrier, which waits while the pages are marked
                // as being written: no thread writes these bytes until the
                // write returns.
                let w = unsafe {
                    mem::with_bytes(r.addr() + p * ps, (e - p) * ps, |bytes| self.write_pages(sweep, i, p, bytes))
                };
                let mut copies = self.ckpt.copies.lock();
                if w.is_ok() {
                    for q in p..e {
                        set.remove(q);
                    }
                }
                copies.writing = None;
                drop(copies);
                self.ckpt.written.notify_all();
                w?;
                done += e - p;
                p = e;
                if paced {
                    self.pace(sweep);
                }
            }
        }
        Ok(done)
    }

    /// Waits while the sweep is ahead of both its schedules, a few
    /// milliseconds at a time: the rate ([`Checkpointer::rate`] bytes per
    /// second since the freeze), and the log's growth (the sweep must end
    /// before commits made since the freeze fill half of the space that
    /// was free then, so pacing never makes writers wait for log space).
    /// Someone waiting for the checkpoint ends all pacing.
    fn pace(&self, sweep: &Sweep) {
        let Some(rate) = self.ckpt.rate else { return };
        let due = Duration::from_secs_f64(sweep.pages as f64 * mem::page_size() as f64 / rate as f64);
        let done = sweep.pages as f64 / sweep.to_sweep.max(1) as f64;
        let live_at_freeze = sweep.lsn - self.head.load(Ordering::Acquire);
        let free_at_freeze = self.ring.area_len.saturating_sub(live_at_freeze);
        // Writers reclaim themselves past the unapplied-log bound: end
        // before commits fill half of the room left under it, too.
        let room =
            self.unapplied_bound().map_or(free_at_freeze, |b| free_at_freeze.min(b.saturating_sub(live_at_freeze)));
        let budget = (room / 2).max(1) as f64;
        while self.ckpt.hurry.load(Ordering::Acquire) == 0 {
            let Some(early) = due.checked_sub(sweep.started.elapsed()).filter(|d| !d.is_zero()) else { return };
            let logged = self.log_tail().saturating_sub(sweep.lsn) as f64 / budget;
            if logged >= done {
                return;
            }
            std::thread::sleep(early.min(Duration::from_millis(2)));
        }
    }

    /// Completes the running checkpoint (all pages, segment syncs, status);
    /// `false` if none is set up. Any thread may call it.
    pub(crate) fn checkpoint_finish(&self) -> Result<Option<CheckpointReport>> {
        let _one = self.ckpt.starting.lock();
        let _t = self.truncation.lock();
        self.finish_locked()
    }

    /// Stops the running checkpoint without freeing the log: pages written
    /// so far stay written (they hold committed bytes, and the log still
    /// covers them), the rest wait for the next checkpoint.
    pub(crate) fn checkpoint_abandon(&self) -> Result<bool> {
        let _one = self.ckpt.starting.lock();
        let _t = self.truncation.lock();
        self.check_poison()?;
        let running = self.ckpt.sweep.lock().is_some();
        if running {
            Counters::add(&self.counters.checkpoints_cancelled, 1);
            self.drop_checkpoint()?;
        }
        Ok(running)
    }

    /// With the truncation lock held: finishes a checkpoint that is set up,
    /// or cancels one still frozen (the caller is about to replay the log,
    /// which covers it).
    /// For a writer that found the log full: finishes a sweeping
    /// checkpoint at full speed (not a frozen one, whose batch comes after
    /// the writer's), which frees the log before its position.
    pub(crate) fn finish_checkpoint_for_room(&self) -> Result<()> {
        let _hurry = self.ckpt.hurry();
        let _t = self.truncation.lock();
        // Nothing unless one is sweeping (a frozen one stays).
        self.finish_locked().map(|_| ())
    }

    pub(crate) fn settle_checkpoint_locked(&self) -> Result<()> {
        let frozen = matches!(self.ckpt.sweep.lock().as_ref(), Some(s) if s.phase == Phase::Frozen);
        if frozen {
            Counters::add(&self.counters.checkpoints_cancelled, 1);
            self.drop_checkpoint()?;
            return Ok(());
        }
        self.finish_locked().map(|_| ())
    }

    fn finish_locked(&self) -> Result<Option<CheckpointReport>> {
        self.check_poison()?;
        let mut guard = self.ckpt.sweep.lock();
        let Some(sweep) = guard.as_mut().filter(|s| s.phase == Phase::Sweeping) else { return Ok(None) };
        let r = (|| {
            self.sweep_pages(sweep, usize::MAX, true)?;
            self.sync_swept(sweep)?;
            self.status.lock().write_next(&self.ring, |next| {
                next.head = sweep.lsn.max(next.head);
                next.synced_end = sweep.lsn;
                next.checkpoint_lsn = sweep.lsn;
                next.checkpoint_generation += 1;
            })
        })();
        if r.is_err() {
            drop(guard);
            let _ = self.drop_checkpoint();
            return self.poison(r).map(|_| None);
        }
        let before = self.head.swap(sweep.lsn.max(self.head.load(Ordering::Acquire)), Ordering::AcqRel);
        let report = CheckpointReport { lsn: sweep.lsn, pages: sweep.pages, rebuilt: sweep.rebuilt };
        let c = &self.counters;
        Counters::add(&c.checkpoints, 1);
        Counters::add(&c.checkpoint_sweep_ns, sweep.started.elapsed().as_nanos() as u64);
        Counters::add(&c.truncated_bytes, sweep.lsn.saturating_sub(before));
        *guard = None;
        drop(guard);
        self.drop_checkpoint()?;
        Ok(Some(report))
    }
}
