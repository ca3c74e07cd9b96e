//! Transactions: declare ranges, store into them, commit or abort.

use crate::error::{Result, TxError};
use crate::instance::{Inner, Rvm, Span};
use crate::mem;
use crate::options::{CommitMode, RestoreMode};
use crate::segment::RegionInner;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;

thread_local! {
    /// Instances on which this thread has an open transaction.
    static OPEN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Buffers of this thread's last finished transaction, reused by the
    /// next one so a small transaction allocates nothing.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A transaction's buffers, kept between transactions of a thread.
#[derive(Default)]
struct Scratch {
    ranges: Vec<Declared>,
    undo: Vec<u8>,
    spans: Vec<Span>,
    track: Option<Arc<crate::track::TxTrack>>,
}

#[derive(Clone, Copy, Debug)]
struct Declared {
    addr: usize,
    len: usize,
    /// Index into `Transaction::held`.
    region: usize,
    /// Offset of the old values in `undo` (restore mode).
    undo_at: usize,
}

/// An open transaction. Commit with [`Transaction::commit`]; dropping it
/// without committing aborts it.
///
/// Do not leak one (`mem::forget`): it then stays open for good, its
/// regions stay busy (no unmap), and this thread's next
/// [`crate::Rvm::begin`] on the instance fails with
/// [`crate::TxError::Nested`]. Leaking is safe (no undefined behaviour), but
/// only dropping or ending the transaction gives the thread back.
///
/// ```
/// # use rvm_core::*;
/// # let dir = tempfile::tempdir().unwrap();
/// # create_log(dir.path().join("log"), 1 << 20).unwrap();
/// # let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
/// # let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
/// # let region = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
/// let counter = region.addr() as *mut u64;
/// let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
/// // SAFETY: nothing else touches the counter while the transaction runs.
/// unsafe {
///     tx.set_range(counter as usize, 8).unwrap();
///     *counter += 1;
/// }
/// tx.abort(); // the old value comes back
/// // SAFETY: as above.
/// assert_eq!(unsafe { *counter }, 0);
/// ```
///
/// A transaction ends once: `commit` and `abort` take it by value, so a
/// second commit does not compile.
///
/// ```compile_fail,E0382
/// # use rvm_core::*;
/// # fn f(rvm: &Rvm) -> Result<()> {
/// let tx = rvm.begin(RestoreMode::Restore)?;
/// tx.commit(CommitMode::Flush)?;
/// tx.commit(CommitMode::Flush)?; // used after move
/// # Ok(()) }
/// ```
///
/// It belongs to the thread that began it: it cannot be sent to another.
///
/// ```compile_fail,E0277
/// # use rvm_core::*;
/// # fn f(rvm: &Rvm) -> Result<()> {
/// let tx = rvm.begin(RestoreMode::Restore)?;
/// std::thread::scope(|s| {
///     s.spawn(move || tx.commit(CommitMode::Flush));
/// });
/// # Ok(()) }
/// ```
///
/// And it borrows its instance, which cannot be closed under it.
///
/// ```compile_fail,E0505
/// # use rvm_core::*;
/// # fn f(rvm: Rvm) -> Result<()> {
/// let tx = rvm.begin(RestoreMode::Restore)?;
/// drop(rvm); // moved out while borrowed
/// tx.commit(CommitMode::Flush)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Transaction<'a> {
    rvm: &'a Inner,
    instance: u64,
    mode: RestoreMode,
    ranges: Vec<Declared>,
    undo: Vec<u8>,
    held: Vec<Arc<RegionInner>>,
    /// Commit's work list (reused buffer).
    spans: Vec<Span>,
    /// The declared ranges as a checkpoint freeze sees them.
    track: Arc<crate::track::TxTrack>,
    /// A tracked transaction's hold on the instance's tracked writer lock.
    tracked: Option<crate::tracked::Writer<'a>>,
    finished: bool,
    /// Transactions belong to the thread that began them (the nesting check
    /// is per thread), so they are neither `Send` nor `Sync`.
    _not_send: PhantomData<*const ()>,
}

impl Rvm {
    /// Begins a transaction on this thread. A thread may have one open
    /// transaction per instance (no nesting).
    pub fn begin(&self, mode: RestoreMode) -> Result<Transaction<'_>> {
        Transaction::begin(self, mode)
    }

    /// Begins a tracked transaction on this thread: stores into tracked
    /// regions need no `set_range` (they are found by the region's
    /// [`crate::TrackingMethod`]), and `set_range` still works for untracked
    /// regions. Tracked transactions of an instance run one at a time: this
    /// waits for the open one to end. Abort always restores tracked pages
    /// (their twins or shadows hold the old bytes); `mode` governs declared
    /// ranges of untracked regions.
    ///
    /// With write-protect-tracked regions, fails with
    /// [`crate::TxError::StoresOutsideTransaction`] if their pages were
    /// stored into since the last tracked transaction (those stores are
    /// undone first; the next begin succeeds).
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 1 << 16).unwrap();
    /// let region = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
    /// rvm.track(&region).unwrap();
    /// let counter = region.addr() as *mut u64;
    /// let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    /// // SAFETY: the tracked transaction serializes writers; nothing else
    /// // holds a reference to the counter.
    /// unsafe { *counter += 1 };
    /// tx.commit(CommitMode::Flush).unwrap();
    /// // SAFETY: as above.
    /// assert_eq!(unsafe { *counter }, 1);
    /// ```
    pub fn begin_tracked(&self, mode: RestoreMode) -> Result<Transaction<'_>> {
        Transaction::begin_tracked(self, mode)
    }
}

impl<'a> Transaction<'a> {
    pub(crate) fn begin(rvm: &'a Rvm, mode: RestoreMode) -> Result<Self> {
        Self::begin_with(rvm, mode, false)
    }

    pub(crate) fn begin_tracked(rvm: &'a Rvm, mode: RestoreMode) -> Result<Self> {
        Self::begin_with(rvm, mode, true)
    }

    fn begin_with(rvm: &'a Rvm, mode: RestoreMode, tracked: bool) -> Result<Self> {
        let instance = rvm.instance_id();
        rvm.inner.check_poison()?;
        OPEN.with(|open| {
            let mut open = open.borrow_mut();
            if open.contains(&instance) {
                return Err(TxError::Nested);
            }
            open.push(instance);
            Ok(())
        })?;
        // Taken after the nesting check (this thread cannot hold it), before
        // anything the transaction must give back.
        let tracked = match tracked
            .then(|| rvm.inner.tracked_session().and_then(|s| crate::tracked::Writer::begin(s)))
            .transpose()
        {
            Ok(w) => w,
            Err(e) => {
                OPEN.with(|open| open.borrow_mut().retain(|&i| i != instance));
                return Err(e);
            }
        };
        rvm.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        crate::stats::Counters::add(&rvm.inner.counters.begun, 1);
        let scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let track = rvm.inner.ckpt.track(scratch.track);
        Ok(Transaction {
            track,
            rvm: &rvm.inner,
            instance,
            mode,
            ranges: scratch.ranges,
            undo: scratch.undo,
            spans: scratch.spans,
            held: Vec::new(),
            tracked,
            finished: false,
            _not_send: PhantomData,
        })
    }

    /// The restore mode the transaction was begun with.
    pub fn mode(&self) -> RestoreMode {
        self.mode
    }

    /// Declares that the transaction will modify `[addr, addr + len)`,
    /// which must lie inside one mapped region. In restore mode the current
    /// bytes are saved for abort. Call it *before* storing.
    ///
    /// # Safety
    ///
    /// From this call until the transaction commits or aborts, no other
    /// thread may write the range (the application's locks must cover it,
    /// held until commit or abort, as in RVM), and no Rust reference may
    /// hold it mutably while the transaction reads it (here, at commit, and
    /// at abort, which writes it back in restore mode).
    pub unsafe fn set_range(&mut self, addr: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let not_mapped = TxError::RangeNotMapped { addr, len };
        let end = addr.checked_add(len).ok_or(not_mapped.clone())?;
        let region = match self.held.iter().position(|r| r.contains(addr, end)) {
            Some(i) => i,
            None => {
                let table = self.rvm.regions.read();
                let r = table.find(addr, end).ok_or(not_mapped)?;
                if r.tracked.get().is_some() {
                    // A tracked transaction's stores there are found by
                    // faults; an ordinary one may not store there at all.
                    return match self.tracked {
                        Some(_) => Ok(()),
                        None => Err(TxError::TrackedRegion { addr, len }.into()),
                    };
                }
                // Counted under the table lock, so `unmap` sees it.
                r.active_txs.fetch_add(1, Ordering::AcqRel);
                self.held.push(r.clone());
                self.held.len() - 1
            }
        };
        let undo_at = self.undo.len();
        if self.mode == RestoreMode::Restore {
            self.undo.resize(undo_at + len, 0);
            // SAFETY: [addr, end) is inside a region this transaction holds
            // (its mapping cannot go away), and the caller guarantees no
            // concurrent writer.
            unsafe { mem::copy_from(addr, &mut self.undo[undo_at..]) };
        }
        self.ranges.push(Declared { addr, len, region, undo_at });
        // Recorded before the barrier looks at the generation: a freeze
        // either sees this range (and rebuilds its pages from the log) or
        // turned the barrier on before we look (and we copy the pages).
        match &self.rvm.verify {
            Some(v) => v.declare(&self.held[region], addr, len, || self.track.record(addr, len)),
            None => self.track.record(addr, len),
        }
        self.rvm.checkpoint_barrier(&self.held[region], addr, len);
        Ok(())
    }

    /// Declares `[addr, addr + data.len())` and stores `data` there.
    ///
    /// # Safety
    ///
    /// As for [`Transaction::set_range`].
    pub unsafe fn modify_bytes(&mut self, addr: usize, data: &[u8]) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.set_range(addr, data.len())? };
        // SAFETY: set_range checked the range lies in a held region; the
        // caller guarantees exclusive access.
        unsafe { mem::copy_to(addr, data) };
        Ok(())
    }

    /// Commits. With [`CommitMode::Flush`] it returns once the transaction
    /// is durable; with [`CommitMode::NoFlush`] at once. If the commit fails
    /// (the log is too small for it, or an earlier I/O failure stopped the
    /// instance) the transaction is aborted and the error returned.
    pub fn commit(mut self, mode: CommitMode) -> Result<()> {
        // A stopped instance is reported as such, before the detector: its
        // check could blame stores that a failed transaction's owner put
        // back after the failure.
        if let Err(e) = self.rvm.check_poison().and_then(|()| self.verify_declared()) {
            self.rollback();
            return Err(e);
        }
        let mut declared: u64 = self.ranges.iter().map(|r| r.len as u64).sum();
        let mut spans = std::mem::take(&mut self.spans);
        spans.clear();
        spans.extend(self.ranges.iter().map(|r| Span { addr: r.addr, len: r.len, region: r.region, from: r.addr }));
        if self.tracked.is_some() {
            let found = spans.len();
            if let Err(e) = self.collect_tracked(&mut spans) {
                self.spans = spans;
                self.rollback();
                return Err(e);
            }
            for span in &spans[found..] {
                // Seen by a checkpoint freeze as this transaction's ranges:
                // if it commits before the freeze, the sweep rebuilds them.
                self.track.record(span.addr, span.len);
                declared += span.len as u64;
            }
        }
        if self.rvm_coalesces() && spans.len() > 1 {
            merge_spans(&mut spans);
        }
        let r = self.rvm.commit_pieces(&self.held, &spans, declared);
        self.spans = spans;
        let seq = match r {
            Ok(seq) => seq,
            Err(e) => {
                self.rollback();
                return Err(e);
            }
        };
        if let Some(w) = self.tracked.take() {
            let rvm = self.rvm;
            w.end(false, |ended| rvm.tracked_release(ended));
        }
        self.sync_shadows();
        self.finish();
        let c = &self.rvm.counters;
        match mode {
            CommitMode::NoFlush => {
                crate::stats::Counters::add(&c.no_flush_commits, 1);
                Ok(())
            }
            CommitMode::Flush => {
                crate::stats::Counters::add(&c.flush_commits, 1);
                self.rvm.flush_to(seq)
            }
        }
    }

    /// Appends the tracked transaction's changed runs to `spans`, holding
    /// their regions.
    fn collect_tracked(&mut self, spans: &mut Vec<Span>) -> Result<()> {
        let Some(w) = &mut self.tracked else { return Ok(()) };
        let mut found = Vec::new();
        w.collect(&mut found)?;
        for (addr, len, from) in found {
            let i = match self.held.iter().position(|r| r.contains(addr, addr + len)) {
                Some(i) => i,
                None => {
                    let table = self.rvm.regions.read();
                    let r = table.find(addr, addr + len).ok_or(TxError::RangeNotMapped { addr, len })?;
                    r.active_txs.fetch_add(1, Ordering::AcqRel);
                    self.held.push(r.clone());
                    self.held.len() - 1
                }
            };
            spans.push(Span { addr, len, region: i, from });
        }
        Ok(())
    }

    /// Aborts: in restore mode every declared range gets its old bytes back.
    pub fn abort(mut self) {
        self.rollback();
    }

    /// The undeclared-store check at commit (see `crate::verify`).
    fn verify_declared(&self) -> Result<()> {
        let Some(v) = &self.rvm.verify else { return Ok(()) };
        let _exclusive = v.exclusive();
        if let Some(e) = v.take_pending() {
            return Err(e.into());
        }
        if self.ranges.is_empty() {
            return Ok(());
        }
        let open = self.rvm.ckpt.open_ranges();
        let ps = crate::mem::page_size();
        for (i, region) in self.held.iter().enumerate() {
            let mut pages: Vec<usize> = self
                .ranges
                .iter()
                .filter(|r| r.region == i)
                .flat_map(|r| {
                    let off = r.addr - region.addr();
                    off / ps..=(off + r.len - 1) / ps
                })
                .collect();
            pages.sort_unstable();
            pages.dedup();
            crate::verify::check_pages(region, pages.into_iter(), &open)?;
        }
        Ok(())
    }

    /// The transaction's ranges are settled (committed or rolled back):
    /// the detector's shadows take their bytes.
    fn sync_shadows(&self) {
        if let Some(v) = &self.rvm.verify {
            for r in &self.ranges {
                v.sync(&self.held[r.region], r.addr, r.len);
            }
        }
    }

    fn rvm_coalesces(&self) -> bool {
        self.rvm.coalesces()
    }

    fn rollback(&mut self) {
        if self.finished {
            return;
        }
        if let Some(w) = self.tracked.take() {
            let rvm = self.rvm;
            w.end(true, |ended| rvm.tracked_release(ended));
        }
        if self.mode == RestoreMode::Restore {
            // Newest first, so the first saved value of a byte wins.
            for r in self.ranges.iter().rev() {
                // SAFETY: the range is in a held region; the set_range
                // contract gives this transaction exclusive access.
                unsafe { mem::copy_to(r.addr, &self.undo[r.undo_at..r.undo_at + r.len]) };
            }
        } else {
            // Memory keeps stores that are never committed: the checkpoint
            // must not take these pages from memory.
            for r in &self.ranges {
                self.rvm.mark_polluted(&self.held[r.region], r.addr, r.len);
            }
        }
        crate::stats::Counters::add(&self.rvm.counters.aborted, 1);
        self.sync_shadows();
        self.finish();
    }

    fn finish(&mut self) {
        self.finished = true;
        for r in self.held.drain(..) {
            r.active_txs.fetch_sub(1, Ordering::AcqRel);
        }
        self.rvm.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.rvm.ckpt.untrack(&self.track);
        let me = self.instance;
        // `try_with`: a transaction kept in a thread-local of the program
        // may be dropped at thread exit after this one is gone (nothing
        // left to unregister from then; a panic there would abort).
        let _ = OPEN.try_with(|open| open.borrow_mut().retain(|&i| i != me));
        // Hand the buffers to the thread's next transaction. The range
        // record is reused only if no checkpoint freeze still holds it.
        let mut ranges = std::mem::take(&mut self.ranges);
        let mut undo = std::mem::take(&mut self.undo);
        ranges.clear();
        undo.clear();
        let track = (Arc::strong_count(&self.track) == 1).then(|| self.track.clone());
        let spans = std::mem::take(&mut self.spans);
        let _ = SCRATCH.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                *s = Scratch { ranges, undo, spans, track };
            }
        });
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        self.rollback();
    }
}

/// Intra-transaction coalescing: sorts spans and merges those of one
/// region that overlap or touch and read from one stretch of memory.
fn merge_spans(spans: &mut Vec<Span>) {
    spans.sort_unstable_by_key(|s| (s.region, s.addr));
    let mut out = 0;
    for i in 0..spans.len() {
        let s = spans[i];
        if out > 0 {
            let last = &mut spans[out - 1];
            if last.region == s.region
                && s.addr <= last.addr + last.len
                && s.from.wrapping_sub(s.addr) == last.from.wrapping_sub(last.addr)
            {
                last.len = last.len.max(s.addr + s.len - last.addr);
                continue;
            }
        }
        spans[out] = s;
        out += 1;
    }
    spans.truncate(out);
}

#[cfg(test)]
mod tests {
    use super::{merge_spans, Span};

    #[test]
    fn spans_merge_when_they_touch() {
        let merged = |v: Vec<(usize, usize, usize)>| {
            let mut v: Vec<Span> =
                v.into_iter().map(|(addr, len, region)| Span { addr, len, region, from: addr }).collect();
            merge_spans(&mut v);
            v.into_iter().map(|s| (s.addr, s.len, s.region)).collect::<Vec<_>>()
        };
        assert_eq!(merged(vec![(10, 5, 0), (15, 5, 0), (30, 1, 0), (12, 1, 0)]), vec![(10, 10, 0), (30, 1, 0)]);
        assert_eq!(merged(vec![(10, 5, 0), (15, 5, 1)]), vec![(10, 5, 0), (15, 5, 1)]);
        assert_eq!(merged(vec![(10, 5, 0), (0, 30, 0), (40, 1, 0)]), vec![(0, 30, 0), (40, 1, 0)]);
    }

    #[test]
    fn spans_from_different_sources_stay_apart() {
        let s = |addr, len, from| Span { addr, len, region: 0, from };
        // Staged copies laid out back to back merge like the memory they
        // stand for; a span read from elsewhere does not join them.
        let mut v = vec![s(100, 4, 5000), s(104, 4, 5004), s(108, 2, 108)];
        merge_spans(&mut v);
        assert_eq!(v, vec![s(100, 8, 5000), s(108, 2, 108)]);
    }
}
