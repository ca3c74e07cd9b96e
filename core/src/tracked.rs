//! Tracked transactions: the MMU finds the stores, no `set_range`.
//!
//! A tracked region's pages are read-only outside tracked write
//! transactions. In one, the first store to a page faults; the fault hook
//! ([`TrackedPages`], run by [`crate::fault`]'s handler) copies the page to
//! a twin from the instance's preallocated pool, notes the page in the
//! transaction's dirty list and makes the page writable. Commit compares
//! each dirty page with its twin and logs exactly the changed runs (runs a
//! few bytes apart are merged when one record costs less than two), or the
//! whole page with [`TrackedLogging::WholePage`]; then the pages are made
//! read-only again. Abort copies the twins back.
//!
//! One tracked transaction per instance at a time (the writer lock), owned
//! by one thread: a store into a read-only tracked page from any other
//! thread, or outside a tracked transaction, is reported on standard error
//! and kills the process with `SIGSEGV` instead of being attributed to the
//! transaction. Readers never fault: the pages are always readable.
//!
//! The checkpoint (see `docs/DESIGN.md`): a twin is the page's committed
//! image from the first store of the transaction until its end (no other
//! transaction can commit to the page meanwhile), so the sweep reads a
//! twinned page's twin instead of its memory, and a transaction that
//! commits a page the sweep still has to write leaves its twin behind as
//! the write barrier's copy.

use crate::error::{Result, TxError};
use crate::fault::{self, Access, FaultHook, Resolution};
use crate::instance::{Inner, Rvm};
use crate::mem::{self, Mapping, Placement};
use crate::segment::{Region, RegionInner};
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// What a tracked commit logs for a page it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrackedLogging {
    /// The runs of bytes that differ from the twin (runs closer than a log
    /// record's header are merged). The default.
    #[default]
    Diff,
    /// Every changed page whole (Rhino's page-grain logging; for
    /// comparison).
    WholePage,
}

/// Page state: not twinned (read-only, equal to its committed image).
const CLEAN: usize = 0;
/// Page state: the fault hook is copying the page to its twin.
const TWINNING: usize = 1;
// Any other value: the twin's address (the page is writable).

/// An instance's tracked-transaction state: the writer lock, the owner
/// thread, the twin pool and the dirty list. Created with the first
/// tracked region.
#[derive(Debug)]
pub(crate) struct Session {
    /// Held by the open tracked transaction.
    writer: Mutex<()>,
    /// The kernel thread id of the open tracked transaction's thread; 0
    /// when none is open.
    owner: AtomicI64,
    page_size: usize,
    /// Preallocated twins (populated at creation).
    pool: Mapping,
    pool_pages: usize,
    /// Twins past the pool: reserved address space the kernel fills on
    /// demand. A transaction that uses one fails at commit
    /// ([`TxError::TwinPoolExhausted`]) and is rolled back from its twins.
    overflow: Mapping,
    overflow_pages: usize,
    /// Page addresses twinned by the open transaction, in order
    /// (`pool_pages + overflow_pages` entries).
    dirty: Mapping,
    /// Twins handed out (entries of `dirty` in use).
    used: AtomicUsize,
    logging: TrackedLogging,
}

impl Session {
    fn new(pool_pages: usize, logging: TrackedLogging) -> Result<Session> {
        let ps = mem::page_size();
        let pool_pages = pool_pages.max(1);
        let overflow_pages = pool_pages.max(256);
        let entries = pool_pages + overflow_pages;
        Ok(Session {
            writer: Mutex::new(()),
            owner: AtomicI64::new(0),
            page_size: ps,
            pool: Mapping::anonymous_populated(Placement::Anywhere, pool_pages * ps)?,
            pool_pages,
            overflow: Mapping::anonymous(Placement::Anywhere, overflow_pages * ps)?,
            overflow_pages,
            dirty: Mapping::anonymous_populated(
                Placement::Anywhere,
                (entries * std::mem::size_of::<usize>()).next_multiple_of(ps),
            )?,
            used: AtomicUsize::new(0),
            logging,
        })
    }

    fn twin_addr(&self, n: usize) -> usize {
        if n < self.pool_pages {
            self.pool.addr() + n * self.page_size
        } else {
            self.overflow.addr() + (n - self.pool_pages) * self.page_size
        }
    }

    fn dirty_slot(&self, n: usize) -> *mut usize {
        (self.dirty.addr() + n * std::mem::size_of::<usize>()) as *mut usize
    }

    /// The pages the open transaction twinned (owner thread only).
    fn dirty_pages(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.used.load(Ordering::Acquire).min(self.pool_pages + self.overflow_pages);
        // SAFETY: entries below `used` were written by the fault hook on
        // this (the owner) thread before it returned; the mapping lives as
        // long as the session.
        (0..n).map(move |i| unsafe { *self.dirty_slot(i) })
    }
}

/// A tracked region's page states, and its fault hook.
#[derive(Debug)]
pub(crate) struct TrackedPages {
    base: usize,
    len: usize,
    /// Per page: [`CLEAN`], [`TWINNING`], or the twin's address.
    state: Box<[AtomicUsize]>,
    session: Arc<Session>,
}

impl TrackedPages {
    fn page_state(&self, page_addr: usize) -> &AtomicUsize {
        &self.state[(page_addr - self.base) / self.session.page_size]
    }

    /// The twin of page `p` (index in the region) if the open transaction
    /// has one, waiting while the fault hook fills it. Callers hold the
    /// checkpoint's copy lock, under which twins are released.
    pub(crate) fn twin_of(&self, p: usize) -> Option<usize> {
        loop {
            match self.state[p].load(Ordering::SeqCst) {
                CLEAN => return None,
                TWINNING => std::hint::spin_loop(),
                twin => return Some(twin),
            }
        }
    }

    /// Forgets page `p`'s twin (under the checkpoint's copy lock).
    pub(crate) fn clear(&self, p: usize) {
        self.state[p].store(CLEAN, Ordering::SeqCst);
    }
}

impl FaultHook for TrackedPages {
    fn on_fault(&self, addr: usize, access: Access) -> Resolution {
        if addr < self.base || addr >= self.base + self.len {
            return Resolution::NotOurs;
        }
        if access == Access::Read {
            // Tracked pages are always readable: not a fault of ours.
            return Resolution::NotOurs;
        }
        let s = &*self.session;
        let owner = s.owner.load(Ordering::SeqCst);
        if owner == 0 {
            return Resolution::Fatal("store into a tracked page outside a tracked transaction");
        }
        if owner != fault::thread_id() {
            return Resolution::Fatal(
                "store into a tracked page by a thread that does not hold its tracked transaction",
            );
        }
        let page = addr & !(s.page_size - 1);
        let state = self.page_state(page);
        if state.load(Ordering::SeqCst) != CLEAN {
            // Twinned already (a racing protection change): writable again.
            // SAFETY: the page is part of this live tracked region.
            return if unsafe { fault::protect(page, s.page_size, true) } {
                Resolution::Handled
            } else {
                Resolution::Fatal("mprotect of a tracked page failed")
            };
        }
        let n = s.used.load(Ordering::Relaxed);
        if n >= s.pool_pages + s.overflow_pages {
            return Resolution::Fatal("a tracked transaction used up its twin pool and the overflow reserve");
        }
        let twin = s.twin_addr(n);
        // Announced before the copy: a sweep that finds TWINNING waits for
        // the twin, one that finds CLEAN after its own copy of the page
        // knows the page was still read-only during that copy.
        state.store(TWINNING, Ordering::SeqCst);
        // SAFETY: the page is readable (tracked pages always are) and stays
        // mapped (the region cannot be unmapped while a tracked transaction
        // is open); the twin is ours alone: slot `n` of the pool, handed out
        // by this thread only (the owner), not yet in use.
        unsafe { std::ptr::copy_nonoverlapping(page as *const u8, twin as *mut u8, s.page_size) };
        // SAFETY: entry `n` of the dirty list is inside its mapping (n is
        // below its capacity, checked above) and only the owner writes it.
        unsafe { *s.dirty_slot(n) = page };
        s.used.store(n + 1, Ordering::Release);
        state.store(twin, Ordering::SeqCst);
        // SAFETY: the page is part of this live tracked region.
        if unsafe { fault::protect(page, s.page_size, true) } {
            Resolution::Handled
        } else {
            Resolution::Fatal("mprotect of a tracked page failed")
        }
    }
}

/// A tracked region's registration (dropped with the region).
#[derive(Debug)]
pub(crate) struct Tracked {
    pub pages: Arc<TrackedPages>,
    _registration: fault::Registration,
}

/// An open tracked transaction's hold on the instance's session.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    session: &'a Session,
    _guard: MutexGuard<'a, ()>,
}

/// Bytes of unchanged data worth logging to save a second range record.
fn merge_gap() -> usize {
    crate::log::format::RANGE_HEADER_TYPICAL
}

/// The runs of `page` that differ from `twin`, as (offset, len), with runs
/// at most `gap` bytes apart merged.
pub(crate) fn diff_runs(page: &[u8], twin: &[u8], gap: usize, out: &mut Vec<(usize, usize)>) {
    let n = page.len().min(twin.len());
    let mut i = 0;
    let mut cur: Option<(usize, usize)> = None;
    while i < n {
        // Word-wise skip of equal bytes.
        if i + 8 <= n && page[i..i + 8] == twin[i..i + 8] {
            i += 8;
            continue;
        }
        if page[i] == twin[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && page[i] != twin[i] {
            i += 1;
        }
        cur = match cur {
            Some((s, e)) if start - e <= gap => Some((s, i)),
            Some((s, e)) => {
                out.push((s, e - s));
                Some((start, i))
            }
            None => Some((start, i)),
        };
    }
    if let Some((s, e)) = cur {
        out.push((s, e - s));
    }
}

impl<'a> Writer<'a> {
    /// Takes the instance's tracked writer lock for the calling thread.
    pub(crate) fn begin(rvm: &'a Inner) -> Result<Writer<'a>> {
        let session = session(rvm)?;
        let guard = session.writer.lock();
        session.used.store(0, Ordering::SeqCst);
        session.owner.store(fault::thread_id(), Ordering::SeqCst);
        Ok(Writer { session, _guard: guard })
    }

    /// Whether the transaction needed more twins than the pool holds.
    pub(crate) fn exhausted(&self) -> Option<TxError> {
        let used = self.session.used.load(Ordering::Acquire);
        (used > self.session.pool_pages)
            .then_some(TxError::TwinPoolExhausted { pool_pages: self.session.pool_pages, needed: used })
    }

    /// Appends the changed runs of every dirty page to `spans` (as
    /// `(addr, len, index in held)`), holding the regions in `held`.
    pub(crate) fn collect(
        &self,
        rvm: &Inner,
        held: &mut Vec<Arc<RegionInner>>,
        spans: &mut Vec<(usize, usize, usize)>,
    ) -> Result<()> {
        let s = self.session;
        let ps = s.page_size;
        let gap = merge_gap();
        let mut runs = Vec::new();
        for page in s.dirty_pages() {
            let i = match held.iter().position(|r| r.contains(page, page + ps)) {
                Some(i) => i,
                None => {
                    let table = rvm.regions.read();
                    let r = table.find(page, page + ps).ok_or(TxError::RangeNotMapped { addr: page, len: ps })?;
                    r.active_txs.fetch_add(1, Ordering::AcqRel);
                    held.push(r.clone());
                    held.len() - 1
                }
            };
            let Some(pages) = held[i].tracked.get().map(|t| &t.pages) else { continue };
            let Some(twin) = pages.twin_of((page - pages.base) / ps) else { continue };
            // SAFETY: the page is in a held region and writable only by this
            // thread (the owner); the twin is this transaction's.
            let (now, before) = unsafe {
                (std::slice::from_raw_parts(page as *const u8, ps), std::slice::from_raw_parts(twin as *const u8, ps))
            };
            match s.logging {
                TrackedLogging::WholePage => {
                    if now != before {
                        spans.push((page, ps, i));
                    }
                }
                TrackedLogging::Diff => {
                    runs.clear();
                    diff_runs(now, before, gap, &mut runs);
                    spans.extend(runs.iter().map(|&(off, len)| (page + off, len, i)));
                }
            }
        }
        Ok(())
    }

    /// Ends the transaction's hold on its pages: with `restore`, the twins
    /// go back first (abort); the pages are made read-only and their twins
    /// released (see [`Inner::tracked_release`] for the checkpoint's part).
    pub(crate) fn end(self, rvm: &Inner, restore: bool) {
        let s = self.session;
        let ps = s.page_size;
        let pages: Vec<usize> = s.dirty_pages().collect();
        let regions = rvm.regions.read();
        let mut done: Vec<(Arc<RegionInner>, usize)> = Vec::with_capacity(pages.len());
        for &page in &pages {
            let Some(r) = regions.find(page, page + ps) else { continue };
            let Some(t) = r.tracked.get() else { continue };
            let p = (page - r.addr()) / ps;
            if let Some(twin) = t.pages.twin_of(p) {
                if restore {
                    // SAFETY: the page is writable and this thread's alone
                    // (the owner's); the twin holds its old bytes.
                    unsafe { std::ptr::copy_nonoverlapping(twin as *const u8, page as *mut u8, ps) };
                }
            }
            // SAFETY: a page of a live tracked region; no Rust reference
            // holds it mutably (the transaction's stores are over).
            unsafe { fault::protect(page, ps, false) };
            done.push((r.clone(), p));
        }
        drop(regions);
        rvm.tracked_release(&done, !restore);
        s.used.store(0, Ordering::SeqCst);
        s.owner.store(0, Ordering::SeqCst);
    }
}

/// The instance's session, created on first use.
fn session(rvm: &Inner) -> Result<&Session> {
    if let Some(s) = rvm.tracked.get() {
        return Ok(s);
    }
    let made = Session::new(rvm.opts().tracked_pool_pages, rvm.opts().tracked_logging)?;
    // A racing creator may win; its session is as good as ours.
    let _ = rvm.tracked.set(Arc::new(made));
    Ok(rvm.tracked.get().unwrap_or_else(|| unreachable!("set above")))
}

/// The session slot in [`Inner`].
pub(crate) type SessionCell = OnceLock<Arc<Session>>;

/// A region's tracked state slot in [`RegionInner`].
pub(crate) type TrackedCell = OnceLock<Tracked>;

/// Holds tracked transactions off while `region` (if tracked) is unmapped;
/// refused on the thread that has one open.
pub(crate) fn hold_writers<'a>(rvm: &'a Inner, region: &RegionInner) -> Result<Option<MutexGuard<'a, ()>>> {
    let Some(s) = rvm.tracked.get().filter(|_| is_tracked(region)) else { return Ok(None) };
    if s.owner.load(Ordering::SeqCst) == fault::thread_id() {
        return Err(crate::MapError::Busy { addr: region.addr(), count: 1 }.into());
    }
    Ok(Some(s.writer.lock()))
}

/// Whether `region` is tracked.
pub(crate) fn is_tracked(region: &RegionInner) -> bool {
    region.tracked.get().is_some()
}

impl Rvm {
    /// Puts `region` in tracked mode for good: its pages become read-only
    /// outside tracked transactions ([`Rvm::begin_tracked`]), which find
    /// their stores by page faults and need no `set_range`. An ordinary
    /// transaction's `set_range` into it is refused
    /// ([`TxError::TrackedRegion`]). Tracking a region twice does nothing.
    ///
    /// Fails with [`crate::MapError::Busy`] while a transaction has ranges
    /// in the region, or when the calling thread has a tracked transaction
    /// open; waits for another thread's tracked transaction to end.
    ///
    /// Stores into the region outside a tracked transaction, or from a
    /// thread other than the transaction's, kill the process with
    /// `SIGSEGV` (after a message on standard error). Stores by the kernel
    /// (`read(2)` into the region) fail with `EFAULT` instead of being
    /// tracked: read into a buffer and copy.
    pub fn track(&self, region: &Region) -> Result<()> {
        let inner = &self.inner;
        let r = &region.0;
        if r.tracked.get().is_some() {
            return Ok(());
        }
        // Instant recovery: the region's pages up to date and accessible
        // (its fault hook gone) before tracking protects them.
        inner.settle_segment(&r.segment)?;
        r.lazy.lock().take();
        let session = session(inner)?;
        if session.owner.load(Ordering::SeqCst) == fault::thread_id() {
            // This thread's own tracked transaction is open: waiting for it
            // would never end.
            return Err(crate::MapError::Busy { addr: r.addr(), count: 1 }.into());
        }
        // No tracked transaction may run while pages change mode.
        let _w = session.writer.lock();
        let busy = r.active_txs.load(Ordering::Acquire);
        if busy > 0 {
            return Err(crate::MapError::Busy { addr: r.addr(), count: busy }.into());
        }
        let ps = mem::page_size();
        let pages = Arc::new(TrackedPages {
            base: r.addr(),
            len: r.mapping.len(),
            state: (0..r.mapping.len() / ps).map(|_| AtomicUsize::new(CLEAN)).collect(),
            session: inner.tracked.get().cloned().unwrap_or_else(|| unreachable!("created above")),
        });
        let registration = fault::register(r.addr(), r.end(), pages.clone()).map_err(|e| crate::MapError::System {
            addr: r.addr(),
            len: r.mapping.len(),
            errno: e.to_string(),
        })?;
        // SAFETY: the whole live mapping of the region; it becomes
        // read-only, which no Rust reference can notice (references into
        // mapped memory may not write it outside transactions).
        if !unsafe { fault::protect(r.addr(), r.mapping.len(), false) } {
            return Err(crate::MapError::System {
                addr: r.addr(),
                len: r.mapping.len(),
                errno: std::io::Error::last_os_error().to_string(),
            }
            .into());
        }
        let _ = r.tracked.set(Tracked { pages, _registration: registration });
        // The undeclared-store detector does not watch tracked regions.
        r.shadow.lock().clear();
        Ok(())
    }

    /// Begins a tracked transaction on this thread: stores into tracked
    /// regions need no `set_range` (the first store to each page is
    /// caught by a page fault), and `set_range` still works for untracked
    /// regions. Tracked transactions of an instance run one at a time: this
    /// waits for the open one to end. Abort always restores tracked pages
    /// (their twins hold the old bytes); `mode` governs declared ranges of
    /// untracked regions.
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
    pub fn begin_tracked(&self, mode: crate::RestoreMode) -> Result<crate::Transaction<'_>> {
        crate::tx::Transaction::begin_tracked(self, mode)
    }
}

impl Region {
    /// Whether the region is tracked ([`Rvm::track`]).
    pub fn is_tracked(&self) -> bool {
        is_tracked(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::diff_runs;

    #[test]
    fn runs_merge_across_small_gaps_only() {
        let twin = vec![0u8; 4096];
        let mut page = twin.clone();
        page[10] = 1;
        page[12] = 1;
        page[2000] = 1;
        page[2001] = 1;
        page[4095] = 1;
        let mut out = Vec::new();
        diff_runs(&page, &twin, 8, &mut out);
        assert_eq!(out, vec![(10, 3), (2000, 2), (4095, 1)]);
        out.clear();
        diff_runs(&twin, &twin, 8, &mut out);
        assert!(out.is_empty());
        out.clear();
        diff_runs(&page, &twin, 4096, &mut out);
        assert_eq!(out, vec![(10, 4086)]);
    }
}
