//! Tracked transactions: the MMU finds the stores, no `set_range`.
//!
//! Two ways to find a transaction's stores, chosen per region
//! ([`TrackingMethod`]):
//!
//! - **Fault** (the default, strict): a tracked region's pages are
//!   read-only outside tracked write transactions. In one, the first store
//!   to a page faults; the fault hook ([`TrackedPages`], run by
//!   [`crate::fault`]'s handler) copies the page to a twin from the
//!   session's preallocated pool, notes the page in the transaction's dirty
//!   list and makes the page writable. A store into a read-only tracked
//!   page from any other thread, or outside a tracked transaction, is
//!   reported on standard error and kills the process with `SIGSEGV`
//!   instead of being attributed to the transaction.
//! - **WriteProtect** (opt-in, faster for transactions that change many
//!   pages): the kernel write-protects the pages ([`crate::wp`]) and
//!   resolves the first store to each by itself, remembering it as written.
//!   Commit lists the written pages with one `PAGEMAP_SCAN` (which protects
//!   them again) and diffs them against a *shadow* of the committed image
//!   (made lazily: a page without one has the segment's bytes, or zeros).
//!   The kernel does not say which thread stored: a store by another
//!   thread during a transaction is attributed to it (the strict method
//!   kills such a thread), and stores made outside any transaction are
//!   found at the next begin, undone from the shadow and reported as
//!   [`TxError::StoresOutsideTransaction`].
//!
//! Commit compares each changed page with its twin (or shadow) and logs
//! exactly the changed runs (runs a few bytes apart are merged when one
//! record costs less than two), or the whole page with
//! [`TrackedLogging::WholePage`]. Abort copies the twins (or shadows) back.
//! One tracked transaction per instance at a time (the writer lock), owned
//! by one thread. Readers never fault: the pages are always readable.
//!
//! The checkpoint (see `docs/DESIGN.md`): a twin or shadow is the page's
//! committed image until the transaction's end (no other transaction can
//! commit to the page meanwhile), so the sweep reads it instead of the
//! page's memory, and a transaction that commits a page the sweep still
//! has to write leaves that image behind as the write barrier's copy.
//!
//! This module knows nothing of the instance or the region table: the
//! instance hands it addresses, the session, and a [`Source`] per region
//! (module arrows run one way, `instance` → `segment` → `tracked`).

use crate::error::{Error, MapError, Result, TxError};
use crate::fault::{self, Access, FaultHook, Resolution};
use crate::mem::{self, Mapping, Placement};
use crate::track::PageBits;
use crate::wp::{Uffd, Unavailable};
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

/// How a tracked region's stores are found (see `docs/DESIGN.md` §3.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrackingMethod {
    /// Read-only pages and a `SIGSEGV` per first store to a page (twin,
    /// `mprotect`). Strict: a store by a thread without the transaction,
    /// or outside one, kills the process. Costs ≈ 10 µs per changed page.
    #[default]
    Fault,
    /// `userfaultfd` asynchronous write-protect and `PAGEMAP_SCAN` (Linux
    /// 6.7+): no signal, no `mprotect`. ≈ 1 µs per changed page, plus one
    /// scan of the region's page table at each begin and commit (≈ 0.4 µs
    /// per MiB of region, whatever the transaction changed: ≈ 0.8 ms per
    /// begin and commit on a 1 GiB region). Weaker: a store by another
    /// thread during the transaction is attributed to it; stores outside
    /// transactions are found at the next begin
    /// ([`TxError::StoresOutsideTransaction`]).
    ///
    /// Memory: a shadow copy of every page committed since the region was
    /// mapped, and page tables for the whole region from the moment it is
    /// tracked (never-touched pages are protected through their page-table
    /// entries): ≈ 2 MiB per GiB of region. Suits regions of up to a few
    /// hundred MiB, or transactions changing many pages; for small
    /// transactions in a large region, [`TrackingMethod::Fault`] costs per
    /// changed page only. [`MapError::TrackingUnavailable`] where the
    /// kernel refuses it.
    WriteProtect,
}

/// Page state: not twinned (read-only, equal to its committed image).
const CLEAN: usize = 0;
/// Page state: the fault hook is copying the page to its twin.
const TWINNING: usize = 1;
// Any other value: the twin's address (the page is writable).

/// An instance's tracked-transaction state: the writer lock, the owner
/// thread, the twin pool, the dirty list and the tracked regions. Created
/// with the first tracked region.
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
    /// The write-protect machinery, opened with the first region that
    /// uses it.
    uffd: OnceLock<std::result::Result<Uffd, Unavailable>>,
    /// The tracked regions (changed with the writer lock held).
    regions: Mutex<Vec<Arc<TrackedPages>>>,
    /// Why write-protect tracking can no longer tell which pages hold
    /// uncommitted stores (a protecting scan or an unprotect failed part
    /// way): every later tracked transaction is refused.
    broken: Mutex<Option<String>>,
}

impl Session {
    pub(crate) fn new(pool_pages: usize, logging: TrackedLogging) -> Result<Session> {
        let ps = mem::page_size();
        let pool_pages = pool_pages.max(1);
        let overflow_pages = pool_pages.max(256);
        // A pool no address space holds (`Options::tracked_pool_pages` far
        // too large) is refused, not an overflow.
        let too_big = || MapError::BadAddress { addr: 0, len: pool_pages.saturating_mul(ps).saturating_mul(2) };
        let pool_len = pool_pages.checked_mul(ps).filter(|&l| l <= isize::MAX as usize).ok_or_else(too_big)?;
        // At least the pool's length (overflow_pages >= pool_pages).
        let overflow_len = overflow_pages.checked_mul(ps).ok_or_else(too_big)?;
        let entries = pool_pages.checked_add(overflow_pages).ok_or_else(too_big)?;
        let dirty_len = entries
            .checked_mul(std::mem::size_of::<usize>())
            .and_then(|l| l.checked_next_multiple_of(ps))
            .ok_or_else(too_big)?;
        Ok(Session {
            writer: Mutex::new(()),
            owner: AtomicI64::new(0),
            page_size: ps,
            pool: Mapping::anonymous_populated(Placement::Anywhere, pool_len)?,
            pool_pages,
            overflow: Mapping::anonymous(Placement::Anywhere, overflow_len)?,
            overflow_pages,
            dirty: Mapping::anonymous_populated(Placement::Anywhere, dirty_len)?,
            used: AtomicUsize::new(0),
            logging,
            uffd: OnceLock::new(),
            regions: Mutex::new(Vec::new()),
            broken: Mutex::new(None),
        })
    }

    /// Whether the calling thread holds the open tracked transaction.
    pub(crate) fn held_by_me(&self) -> bool {
        self.owner.load(Ordering::SeqCst) == fault::thread_id()
    }

    /// Holds tracked transactions off (for `track` and `unmap`).
    pub(crate) fn lock_writers(&self) -> MutexGuard<'_, ()> {
        self.writer.lock()
    }

    fn uffd(&self) -> std::result::Result<&Uffd, &Unavailable> {
        self.uffd.get_or_init(Uffd::open).as_ref()
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

    /// Refuses every later tracked transaction: write-protect tracking
    /// lost track of pages that may hold uncommitted stores.
    fn poison(&self, why: String) {
        self.broken.lock().get_or_insert(why);
    }

    /// The tracked region holding `page`.
    fn region_of(regions: &[Arc<TrackedPages>], page: usize) -> Option<&Arc<TrackedPages>> {
        regions.iter().find(|t| page >= t.base && page < t.base + t.len)
    }
}

/// Reads `buf.len()` bytes of the segment at an offset in the region.
pub(crate) type ReadPage = Box<dyn Fn(usize, &mut [u8]) -> std::io::Result<()> + Send + Sync>;

/// Where the committed image of a write-protect-tracked page without a
/// shadow comes from: the page was not changed since the region was mapped
/// (or it has a shadow), so it is the segment's bytes (a private file
/// mapping) or zeros (anonymous memory never touched).
pub(crate) enum Source {
    /// Zeros.
    Zero,
    /// `read(offset in region, buffer)` from the segment.
    Read(ReadPage),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Zero => "Source::Zero",
            Source::Read(_) => "Source::Read",
        })
    }
}

/// A write-protect-tracked region's committed image.
#[derive(Debug)]
struct Shadow {
    uffd_base: usize,
    /// One page per region page (address space; a page takes memory once
    /// it holds a shadow).
    pages: Mapping,
    /// Pages whose shadow is valid (set with release ordering after the
    /// copy).
    valid: PageBits,
    source: Source,
}

/// A tracked region's page states, and its fault hook.
#[derive(Debug)]
pub(crate) struct TrackedPages {
    base: usize,
    len: usize,
    /// Per page (fault method): [`CLEAN`], [`TWINNING`], or the twin's
    /// address.
    state: Box<[AtomicUsize]>,
    session: Arc<Session>,
    /// The write-protect method's shadow; `None` for the fault method.
    shadow: Option<Shadow>,
}

impl TrackedPages {
    fn page_state(&self, page_addr: usize) -> &AtomicUsize {
        &self.state[(page_addr - self.base) / self.session.page_size]
    }

    /// The twin of page `p` (index in the region) if the open transaction
    /// has one, waiting while the fault hook fills it. Callers hold the
    /// checkpoint's copy lock, under which twins are released.
    fn twin_of(&self, p: usize) -> Option<usize> {
        let state = self.state.get(p)?;
        loop {
            match state.load(Ordering::SeqCst) {
                CLEAN => return None,
                TWINNING => std::hint::spin_loop(),
                twin => return Some(twin),
            }
        }
    }

    /// The method the region uses.
    pub(crate) fn method(&self) -> TrackingMethod {
        if self.shadow.is_some() {
            TrackingMethod::WriteProtect
        } else {
            TrackingMethod::Fault
        }
    }

    /// Page `p`'s committed image into `buf` from its shadow or source
    /// (write-protect method).
    fn shadow_image(&self, sh: &Shadow, p: usize, buf: &mut [u8]) -> std::io::Result<()> {
        let ps = self.session.page_size;
        if sh.valid.contains(p) {
            // SAFETY: page `p` of the shadow mapping (p < pages); shadow
            // pages change only under the copy lock or, before they are
            // valid, on the owner thread.
            unsafe { mem::copy_from(sh.pages.addr() + p * ps, buf) };
            Ok(())
        } else {
            match &sh.source {
                Source::Zero => {
                    buf.fill(0);
                    Ok(())
                }
                Source::Read(read) => read(p * ps, buf),
            }
        }
    }

    /// Makes page `p`'s shadow valid (owner thread, the page's image not
    /// changing meanwhile: no commit can reach it but ours).
    fn materialize(&self, sh: &Shadow, p: usize) -> std::io::Result<usize> {
        let ps = self.session.page_size;
        let at = sh.pages.addr() + p * ps;
        if !sh.valid.contains(p) {
            match &sh.source {
                // The anonymous shadow page reads as zeros already.
                Source::Zero => {}
                Source::Read(read) => {
                    // SAFETY: page `p` of the shadow mapping; not valid yet,
                    // so no reader looks at it (readers of an invalid
                    // shadow go to the source, which holds these bytes).
                    let buf = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, ps) };
                    read(p * ps, buf)?;
                }
            }
            sh.valid.insert_range(p, p);
        }
        Ok(at)
    }

    /// The sweep's image of page `p` as of the freeze: the twin if the
    /// open transaction has one (its memory holds stores not committed at
    /// the freeze), else the page (read-only under the fault method, so no
    /// store lands during the copy: a store first twins the page, which the
    /// check after the copy sees); under the write-protect method always
    /// the shadow or the source, never memory. The caller holds the copy
    /// lock.
    pub(crate) fn snapshot(&self, p: usize, buf: &mut [u8]) -> std::io::Result<()> {
        if let Some(sh) = &self.shadow {
            return self.shadow_image(sh, p, buf);
        }
        // SAFETY: a page of a live region (the sweep holds it); other
        // threads' stores are possible only after the page is twinned,
        // and then the copy is replaced below.
        unsafe { mem::copy_from_racy(self.base + p * self.session.page_size, buf) };
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(twin) = self.twin_of(p) {
            // SAFETY: the twin stays the transaction's until it is released
            // under the copy lock, which the caller holds.
            unsafe { mem::copy_from(twin, buf) };
        }
        Ok(())
    }

    /// The committed image before the open transaction of a page it
    /// changed (its twin or shadow), for the write barrier; false if there
    /// is none. The caller holds the copy lock.
    pub(crate) fn before_image(&self, p: usize, buf: &mut [u8]) -> bool {
        match &self.shadow {
            Some(sh) => self.shadow_image(sh, p, buf).is_ok(),
            None => match self.twin_of(p) {
                Some(twin) => {
                    // SAFETY: the twin is a page of the session's pool, not
                    // released before `settle` (the caller holds the copy
                    // lock).
                    unsafe { mem::copy_from(twin, buf) };
                    true
                }
                None => false,
            },
        }
    }

    /// The transaction is over for page `p` (under the copy lock): the
    /// twin is released, or with a commit the shadow takes the page's
    /// committed bytes (`runs`: the changed runs logged for it, absolute
    /// addresses and where their bytes are in `staged`, the very bytes the
    /// log holds; with the shadow's old bytes they make the new image).
    fn settle(&self, p: usize, committed: bool, runs: &[(usize, usize, usize)], staged: &[u8]) {
        match &self.shadow {
            None => self.state[p].store(CLEAN, Ordering::SeqCst),
            Some(sh) => {
                if committed {
                    let ps = self.session.page_size;
                    let page = self.base + p * ps;
                    for &(addr, len, at) in runs {
                        // Runs come from one page's diff: never across its
                        // bounds (checked, so a wrong run cannot write
                        // another page's shadow, or outside the mapping).
                        if addr < page || addr + len > page + ps {
                            debug_assert!(false, "run {addr:#x}+{len} outside page {page:#x}");
                            continue;
                        }
                        let Some(bytes) = staged.get(at..at + len) else { continue };
                        // SAFETY: `[addr, addr + len)` lies inside page `p`
                        // (checked above), so the destination lies inside
                        // page `p` of the shadow mapping; the shadow page is
                        // ours (copy lock held).
                        unsafe { mem::copy_to(sh.pages.addr() + (addr - self.base), bytes) };
                    }
                    sh.valid.insert_range(p, p);
                }
            }
        }
    }
}

/// A tracked transaction's end, handed to the checkpoint's release
/// (`Inner::tracked_release`), which calls [`Ended::settle`] for each page
/// under its copy lock.
#[derive(Debug)]
pub(crate) struct Ended {
    /// The pages the transaction changed (twinned, or written).
    pub pages: Vec<usize>,
    /// Whether it committed.
    pub committed: bool,
    /// The logged runs of write-protect pages as `(addr, len, at in
    /// staged)`, sorted by address (one page's runs are adjacent).
    runs: Vec<(usize, usize, usize)>,
    /// The logged bytes of `runs`.
    staged: Vec<u8>,
}

impl Ended {
    /// Ends the transaction's hold on page `p` of `pages` (copy lock held).
    pub(crate) fn settle(&self, pages: &TrackedPages, p: usize) {
        let ps = pages.session.page_size;
        let page = pages.base + p * ps;
        // The runs starting inside [page, page + ps): a binary search, valid
        // because `runs` is sorted (checked when it was built).
        let from = self.runs.partition_point(|&(a, _, _)| a < page);
        let to = from + self.runs[from..].partition_point(|&(a, _, _)| a < page + ps);
        pages.settle(p, self.committed, &self.runs[from..to], &self.staged);
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

/// A tracked region's registration (dropped with the region, before its
/// mapping).
#[derive(Debug)]
pub(crate) struct Tracked {
    pub pages: Arc<TrackedPages>,
    _registration: Option<fault::Registration>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let s = &self.pages.session;
        s.regions.lock().retain(|t| !Arc::ptr_eq(t, &self.pages));
        if let Some(sh) = &self.pages.shadow {
            if let Some(Ok(u)) = s.uffd.get() {
                u.unregister(sh.uffd_base, self.pages.len);
            }
        }
    }
}

fn system(addr: usize, len: usize, e: impl std::fmt::Display) -> MapError {
    MapError::System { addr, len, errno: e.to_string() }
}

/// Puts `[base, base + len)` (a live region with no transaction in it)
/// in tracked mode with `method`; `source` gives the committed image of
/// pages the write-protect method finds without a shadow. The caller holds
/// the session's writer lock.
pub(crate) fn track_range(
    session: &Arc<Session>,
    base: usize,
    len: usize,
    method: TrackingMethod,
    source: Source,
) -> Result<Tracked> {
    let ps = mem::page_size();
    let tracked = match method {
        TrackingMethod::Fault => {
            let pages = Arc::new(TrackedPages {
                base,
                len,
                state: (0..len / ps).map(|_| AtomicUsize::new(CLEAN)).collect(),
                session: session.clone(),
                shadow: None,
            });
            let registration = fault::register(base, base + len, pages.clone()).map_err(|e| system(base, len, e))?;
            // SAFETY: the whole live mapping of the region; it becomes
            // read-only, which no Rust reference can notice (references into
            // mapped memory may not write it outside transactions).
            if !unsafe { fault::protect(base, len, false) } {
                return Err(system(base, len, std::io::Error::last_os_error()).into());
            }
            Tracked { pages, _registration: Some(registration) }
        }
        TrackingMethod::WriteProtect => {
            let uffd = session.uffd().map_err(|e| MapError::TrackingUnavailable { reason: e.0.clone() })?;
            let shadow = Shadow {
                uffd_base: base,
                pages: Mapping::anonymous(Placement::Anywhere, len)?,
                valid: PageBits::new(len / ps),
                source,
            };
            // Pages with private memory may differ from the source (stores
            // committed before tracking, or a no-restore abort's): their
            // shadow is taken now, from memory (no transaction is open in
            // the region, so memory is the image the fault method's twin
            // would take).
            let mut private = Vec::new();
            crate::wp::private_pages(base, len, &mut private)
                .map_err(|e| MapError::TrackingUnavailable { reason: e.to_string() })?;
            for page in private {
                let p = (page - base) / ps;
                // SAFETY: a page of the live region, read while no
                // transaction can store into it (the writer lock is held and
                // the region has no active transaction); the shadow page is
                // not shared yet.
                unsafe {
                    std::ptr::copy_nonoverlapping(page as *const u8, (shadow.pages.addr() + p * ps) as *mut u8, ps)
                };
                shadow.valid.insert_range(p, p);
            }
            // SAFETY: the region's live private mapping; it stays
            // registered until `Tracked` drops, before the mapping goes.
            unsafe { uffd.register(base, len) }.map_err(|e| MapError::TrackingUnavailable { reason: e.to_string() })?;
            let pages = Arc::new(TrackedPages {
                base,
                len,
                state: Box::new([]),
                session: session.clone(),
                shadow: Some(shadow),
            });
            Tracked { pages, _registration: None }
        }
    };
    session.regions.lock().push(tracked.pages.clone());
    Ok(tracked)
}

/// An open tracked transaction's hold on the instance's session.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    session: &'a Session,
    _guard: MutexGuard<'a, ()>,
    /// Pages of write-protect regions the transaction wrote (after
    /// `scanned`), sorted by address, each once.
    written: Vec<usize>,
    scanned: bool,
    /// The changed runs of `written` as `(addr, len, at)`, sorted by
    /// address (found at commit); their bytes are `staged[at..at + len]`.
    wp_runs: Vec<(usize, usize, usize)>,
    /// The bytes of `wp_runs` as the diff read them: what the commit logs
    /// and what the shadows take at the end, so a shadow always equals
    /// the logged image (a store by another thread after the diff is not
    /// in it; the scan protected the page again before the diff, so such
    /// a store leaves the page written, and the next begin undoes it).
    staged: Vec<u8>,
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        self.session.used.store(0, Ordering::SeqCst);
        self.session.owner.store(0, Ordering::SeqCst);
    }
}

/// Bytes of unchanged data worth logging to save a second range record.
fn merge_gap() -> usize {
    crate::log::format::RANGE_HEADER_TYPICAL
}

/// The runs of `page` that differ from `twin`, as (offset, len), with runs
/// at most `gap` bytes apart merged.
///
/// Equal stretches are skipped 64 bytes, then 8 bytes at a time, and a
/// run of differing bytes grows 8 bytes at a time while no byte of the word
/// is equal; single bytes only at a run's two ends.
pub(crate) fn diff_runs(page: &[u8], twin: &[u8], gap: usize, out: &mut Vec<(usize, usize)>) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let n = page.len().min(twin.len());
    let (page, twin) = (&page[..n], &twin[..n]);
    let word = |i: usize| {
        let a = u64::from_ne_bytes(page[i..i + 8].try_into().unwrap_or([0; 8]));
        let b = u64::from_ne_bytes(twin[i..i + 8].try_into().unwrap_or([0; 8]));
        a ^ b
    };
    let mut i = 0;
    let mut cur: Option<(usize, usize)> = None;
    while i < n {
        if i + 64 <= n && (0..8).fold(0, |acc, k| acc | word(i + 8 * k)) == 0 {
            i += 64;
            continue;
        }
        if i + 8 <= n && word(i) == 0 {
            i += 8;
            continue;
        }
        if page[i] == twin[i] {
            i += 1;
            continue;
        }
        let start = i;
        loop {
            // A word with no equal byte (no zero byte in the XOR) is
            // inside the run whole.
            if i + 8 <= n {
                let x = word(i);
                if x.wrapping_sub(ONES) & !x & HIGHS == 0 {
                    i += 8;
                    continue;
                }
            }
            if i < n && page[i] != twin[i] {
                i += 1;
                continue;
            }
            break;
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

/// The runs of `now` that differ from `before` under `logging`, as
/// `(offset, len)` in `out` (cleared first).
fn page_runs(logging: TrackedLogging, now: &[u8], before: &[u8], gap: usize, out: &mut Vec<(usize, usize)>) {
    out.clear();
    match logging {
        TrackedLogging::WholePage => {
            if now != before {
                out.push((0, now.len()));
            }
        }
        TrackedLogging::Diff => diff_runs(now, before, gap, out),
    }
}

impl<'a> Writer<'a> {
    /// Takes the instance's tracked writer lock for the calling thread.
    /// Under the write-protect method, pages written since the last tracked
    /// transaction (stores outside any transaction) are put back to their
    /// committed image and reported.
    pub(crate) fn begin(session: &'a Session) -> Result<Writer<'a>> {
        let guard = session.writer.lock();
        if let Some(why) = session.broken.lock().clone() {
            return Err(TxError::TrackingFailed { what: why }.into());
        }
        session.used.store(0, Ordering::SeqCst);
        session.owner.store(fault::thread_id(), Ordering::SeqCst);
        let mut w = Writer {
            session,
            _guard: guard,
            written: Vec::new(),
            scanned: false,
            wp_runs: Vec::new(),
            staged: Vec::new(),
        };
        w.check_between()?;
        Ok(w)
    }

    fn wp_regions(&self) -> Vec<Arc<TrackedPages>> {
        self.session.regions.lock().iter().filter(|t| t.shadow.is_some()).cloned().collect()
    }

    fn uffd(&self) -> Result<&'a Uffd> {
        self.session.uffd().map_err(|e| TxError::TrackingFailed { what: e.0.clone() }.into())
    }

    fn check_between(&mut self) -> Result<()> {
        let regions = self.wp_regions();
        if regions.is_empty() {
            return Ok(());
        }
        let uffd = self.uffd()?;
        let mut stray = Vec::new();
        for t in &regions {
            uffd.written(t.base, t.len, false, &mut stray)
                .map_err(|e| TxError::TrackingFailed { what: e.to_string() })?;
        }
        if stray.is_empty() {
            return Ok(());
        }
        stray.sort_unstable();
        stray.dedup();
        let first = stray[0];
        let pages = stray.len();
        self.restore_wp(&regions, &stray)?;
        Err(TxError::StoresOutsideTransaction { addr: first, pages }.into())
    }

    /// Puts written write-protect pages back to their committed images and
    /// protects those again. A page whose image cannot be read is left
    /// written (the next begin finds it and tries again) and the first such
    /// error returned; if it cannot be left written, tracking is poisoned.
    fn restore_wp(&self, regions: &[Arc<TrackedPages>], pages: &[usize]) -> Result<()> {
        let uffd = self.uffd()?;
        let ps = self.session.page_size;
        let mut pages = pages.to_vec();
        pages.sort_unstable();
        pages.dedup();
        let mut buf = vec![0u8; ps];
        let mut restored = Vec::with_capacity(pages.len());
        let mut failed = None;
        for page in pages {
            let Some(t) = Session::region_of(regions, page) else { continue };
            let Some(sh) = &t.shadow else { continue };
            match t.shadow_image(sh, (page - t.base) / ps, &mut buf) {
                Ok(()) => {
                    // SAFETY: a page of a live tracked region (the writer
                    // lock holds unmap off); this thread holds the tracked
                    // transaction. The store leaves the page written (if a
                    // commit's scan had protected it) until protected below.
                    unsafe { mem::copy_to(page, &buf) };
                    restored.push(page);
                }
                Err(e) => {
                    // Not restored: it must stay written so the next begin
                    // finds it (a commit's scan may have protected it).
                    // SAFETY: a page of a registered region.
                    if let Err(u) = unsafe { uffd.unprotect(page, ps) } {
                        self.session.poison(format!(
                            "a page at {page:#x} keeps an aborted transaction's stores and could not be marked \
                             written ({u}); reopen the instance"
                        ));
                    }
                    failed.get_or_insert(e);
                }
            }
        }
        for (start, len) in runs_of(&restored, ps, 1) {
            // SAFETY: pages of registered regions. On failure the pages
            // stay written: the next begin puts the same bytes back.
            unsafe { uffd.protect(start, len) }.map_err(|e| TxError::TrackingFailed { what: e.to_string() })?;
        }
        match failed {
            Some(e) => Err(Error::io("reading a tracked page's committed image", "segment", e)),
            None => Ok(()),
        }
    }

    /// Lists the pages the transaction wrote in write-protect regions, once,
    /// sorted by address; with `reprotect` (commit) the same scan protects
    /// them again. A protecting scan that fails part way may have protected
    /// pages it did not report (they would keep the transaction's stores
    /// unseen): tracking is poisoned.
    fn scan(&mut self, regions: &[Arc<TrackedPages>], reprotect: bool) -> Result<()> {
        if self.scanned || regions.is_empty() {
            self.scanned = true;
            return Ok(());
        }
        let uffd = self.uffd()?;
        for t in regions {
            if let Err(e) = uffd.written(t.base, t.len, reprotect, &mut self.written) {
                if reprotect && uffd.owned_here() {
                    self.session.poison(format!(
                        "a protecting PAGEMAP_SCAN failed part way ({e}): pages may hold stores no scan will \
                         report; reopen the instance"
                    ));
                }
                return Err(TxError::TrackingFailed { what: e.to_string() }.into());
            }
        }
        // Each region's pages come in address order, the regions in the
        // order they were tracked: sorted here, for `runs_of`, the sorted
        // `wp_runs` and `Ended::settle`'s binary search.
        self.written.sort_unstable();
        self.written.dedup();
        self.scanned = true;
        Ok(())
    }

    /// Whether the transaction needed more twins than the pool holds.
    pub(crate) fn exhausted(&self) -> Option<TxError> {
        let used = self.session.used.load(Ordering::Acquire);
        (used > self.session.pool_pages)
            .then_some(TxError::TwinPoolExhausted { pool_pages: self.session.pool_pages, needed: used })
    }

    /// Appends the changed runs of every page the transaction wrote to
    /// `spans` as `(addr, len, from)`: the bytes to log for `[addr, addr +
    /// len)` are at `from` (the page itself under the fault method, the
    /// transaction's staged copy under the write-protect method, valid
    /// until [`Writer::end`]).
    pub(crate) fn collect(&mut self, spans: &mut Vec<(usize, usize, usize)>) -> Result<()> {
        if let Some(e) = self.exhausted() {
            return Err(e.into());
        }
        let s = self.session;
        let ps = s.page_size;
        let gap = merge_gap();
        let mut runs = Vec::new();
        let regions = s.regions.lock().clone();
        for page in s.dirty_pages() {
            let Some(t) = Session::region_of(&regions, page) else { continue };
            let Some(twin) = t.twin_of((page - t.base) / ps) else { continue };
            // SAFETY: the page is in a live tracked region and written only
            // by this thread (the owner); the twin is this transaction's.
            let (now, before) = unsafe {
                (std::slice::from_raw_parts(page as *const u8, ps), std::slice::from_raw_parts(twin as *const u8, ps))
            };
            page_runs(s.logging, now, before, gap, &mut runs);
            spans.extend(runs.iter().map(|&(off, len)| (page + off, len, page + off)));
        }
        let wp: Vec<_> = regions.iter().filter(|t| t.shadow.is_some()).cloned().collect();
        self.scan(&wp, true)?;
        let needed = self.written.len() + s.used.load(Ordering::Acquire);
        if needed > s.pool_pages {
            return Err(TxError::TwinPoolExhausted { pool_pages: s.pool_pages, needed }.into());
        }
        self.wp_runs.clear();
        self.staged.clear();
        for &page in &self.written {
            let Some(t) = Session::region_of(&wp, page) else { continue };
            let Some(sh) = &t.shadow else { continue };
            let before = t
                .materialize(sh, (page - t.base) / ps)
                .map_err(|e| Error::io("reading a tracked page's committed image", "segment", e))?;
            // SAFETY: the page is in a live tracked region; `before` is its
            // shadow, changed only by this transaction's end.
            let (now, before) = unsafe {
                (std::slice::from_raw_parts(page as *const u8, ps), std::slice::from_raw_parts(before as *const u8, ps))
            };
            page_runs(s.logging, now, before, gap, &mut runs);
            for &(off, len) in &runs {
                self.wp_runs.push((page + off, len, self.staged.len()));
                self.staged.extend_from_slice(&now[off..off + len]);
            }
        }
        debug_assert!(self.wp_runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "wp runs out of order");
        let base = self.staged.as_ptr() as usize;
        spans.extend(self.wp_runs.iter().map(|&(addr, len, at)| (addr, len, base + at)));
        Ok(())
    }

    /// Ends the transaction's hold on its pages: with `restore`, the twins
    /// (or shadows) go back first (abort); the pages are protected again,
    /// then `release` runs (the checkpoint's part: see
    /// `Inner::tracked_release`), then the twins are free.
    pub(crate) fn end(mut self, restore: bool, release: impl FnOnce(&Ended)) {
        let s = self.session;
        let ps = s.page_size;
        let regions = s.regions.lock().clone();
        let mut pages: Vec<usize> = s.dirty_pages().collect();
        for &page in &pages {
            let Some(t) = Session::region_of(&regions, page) else { continue };
            if restore {
                if let Some(twin) = t.twin_of((page - t.base) / ps) {
                    // SAFETY: the page is writable and this thread's alone
                    // (the owner's); the twin holds its old bytes.
                    unsafe { std::ptr::copy_nonoverlapping(twin as *const u8, page as *mut u8, ps) };
                }
            }
        }
        let mut sorted = pages.clone();
        sorted.sort_unstable();
        // Protected again in runs: pages up to 16 apart share one
        // `mprotect` (one VMA merge instead of several), never across a
        // region's end (the pages between are read-only already).
        for t in &regions {
            let mine: Vec<usize> = sorted.iter().copied().filter(|&p| p >= t.base && p < t.base + t.len).collect();
            for (start, len) in runs_of(&mine, ps, 16) {
                // SAFETY: pages of a live tracked region; no Rust reference
                // holds them mutably (the transaction's stores are over).
                unsafe { fault::protect(start, len, false) };
            }
        }
        let wp: Vec<_> = regions.iter().filter(|t| t.shadow.is_some()).cloned().collect();
        if !wp.is_empty() {
            if restore {
                // An abort that did not reach commit's scan scans now,
                // leaving the pages written: `restore_wp` protects only the
                // pages it put back, so a page it cannot restore (or all of
                // them, if this scan fails; in a forked child it finds
                // nothing) is found by the next begin, which tries again.
                let _ = self.scan(&wp, false);
                let written = std::mem::take(&mut self.written);
                let _ = self.restore_wp(&wp, &written);
                self.written = written;
            }
            pages.extend_from_slice(&self.written);
        }
        let (runs, staged) = if restore {
            (Vec::new(), Vec::new())
        } else {
            (std::mem::take(&mut self.wp_runs), std::mem::take(&mut self.staged))
        };
        release(&Ended { pages, committed: !restore, runs, staged });
    }
}

/// `pages` (sorted addresses) as `(start, len)` runs, pages at most `gap`
/// pages apart joined.
fn runs_of(pages: &[usize], ps: usize, gap: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, len)) if p >= *start + *len && p - (*start + *len) <= (gap - 1) * ps => *len = p + ps - *start,
            Some((start, len)) if p < *start + *len => {}
            _ => out.push((p, ps)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A write-protect-tracked anonymous region of four pages whose
    /// committed image is read from a source that fails while `fail` is
    /// set; `None` where the kernel lacks write-protect tracking.
    fn wp_region(session: &Arc<Session>, fail: &Arc<AtomicBool>) -> Option<(Tracked, Mapping)> {
        if session.uffd().is_err() {
            return None;
        }
        let ps = mem::page_size();
        let region = Mapping::anonymous(Placement::Anywhere, 4 * ps).unwrap();
        let fail = fail.clone();
        let source = Source::Read(Box::new(move |_, buf| {
            if fail.load(Ordering::SeqCst) {
                Err(std::io::Error::other("injected read failure"))
            } else {
                buf.fill(0);
                Ok(())
            }
        }));
        let tracked = track_range(session, region.addr(), 4 * ps, TrackingMethod::WriteProtect, source).unwrap();
        Some((tracked, region))
    }

    fn poke(addr: usize, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: inside a live test region; no reference into it.
            unsafe { std::ptr::write_volatile((addr + i) as *mut u8, b) };
        }
    }

    fn peek(addr: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        // SAFETY: inside a live test region; no store meanwhile.
        unsafe { mem::copy_from(addr, &mut v) };
        v
    }

    fn strays(r: Result<Writer<'_>>) -> usize {
        match r {
            Err(Error::Tx(TxError::StoresOutsideTransaction { pages, .. })) => pages,
            Err(e) => panic!("begin: {e}"),
            Ok(_) => 0,
        }
    }

    #[test]
    fn an_abort_that_cannot_read_the_committed_image_leaves_the_pages_written() {
        let ps = mem::page_size();
        let session = Arc::new(Session::new(16, TrackedLogging::Diff).unwrap());
        let fail = Arc::new(AtomicBool::new(false));
        let Some((tracked, region)) = wp_region(&session, &fail) else { return };
        let base = region.addr();
        // Aborted with no commit's scan first, then after one (which
        // protected the pages again before the commit failed).
        for after_scan in [false, true] {
            let mut w = Writer::begin(&session).unwrap();
            poke(base + 5, b"aborted");
            poke(base + 2 * ps + 7, b"aborted");
            fail.store(true, Ordering::SeqCst);
            if after_scan {
                // The diff cannot read the committed image: commit fails.
                assert!(w.collect(&mut Vec::new()).is_err());
            }
            w.end(true, |_| {});
            // The image could not be read: the stores stay, and so does
            // the pages' written mark.
            assert_eq!(peek(base + 5, 7), b"aborted");
            fail.store(false, Ordering::SeqCst);
            assert_eq!(strays(Writer::begin(&session)), 2, "after_scan {after_scan}");
            assert_eq!(peek(base, 4 * ps), vec![0; 4 * ps], "the next begin restored them");
            assert_eq!(strays(Writer::begin(&session)), 0);
        }
        drop(tracked);
    }

    #[test]
    fn the_shadow_takes_the_logged_bytes_not_later_stores() {
        let ps = mem::page_size();
        let session = Arc::new(Session::new(16, TrackedLogging::Diff).unwrap());
        let fail = Arc::new(AtomicBool::new(false));
        let Some((tracked, region)) = wp_region(&session, &fail) else { return };
        let page = region.addr() + ps;
        let mut w = Writer::begin(&session).unwrap();
        poke(page + 8, b"logged");
        let mut spans = Vec::new();
        w.collect(&mut spans).unwrap();
        assert_eq!(spans.len(), 1);
        let (addr, len, from) = spans[0];
        assert_eq!((addr, len), (page + 8, 6));
        // A store after the diff (another thread's, say) into the run.
        poke(page + 9, b"X");
        assert_eq!(peek(from, len), b"logged", "the commit logs the diffed bytes");
        let pages = &tracked.pages;
        w.end(false, |ended| {
            for &p in &ended.pages {
                ended.settle(pages, (p - pages.base) / ps);
            }
        });
        let mut img = vec![0; ps];
        pages.shadow_image(pages.shadow.as_ref().unwrap(), 1, &mut img).unwrap();
        assert_eq!(&img[8..14], b"logged", "the shadow equals the log");
        // The later store left the page written: undone at the next begin.
        assert_eq!(strays(Writer::begin(&session)), 1);
        assert_eq!(peek(page + 8, 6), b"logged");
        drop(tracked);
    }

    #[test]
    fn a_protecting_scan_that_fails_part_way_poisons_tracking() {
        let session = Arc::new(Session::new(16, TrackedLogging::Diff).unwrap());
        let fail = Arc::new(AtomicBool::new(false));
        let Some((a, ra)) = wp_region(&session, &fail) else { return };
        let (b, rb) = wp_region(&session, &fail).unwrap();
        let mut w = Writer::begin(&session).unwrap();
        poke(ra.addr(), b"a");
        poke(rb.addr(), b"b");
        // The first region's scan protects its page again, the second's
        // fails: pages may now hide stores.
        crate::wp::testing::fail_scans_after(Some(1));
        let err = w.collect(&mut Vec::new()).unwrap_err();
        crate::wp::testing::fail_scans_after(None);
        assert!(matches!(err, Error::Tx(TxError::TrackingFailed { .. })), "{err}");
        w.end(true, |_| {});
        // The abort still put back what it found.
        assert_eq!(peek(ra.addr(), 1), [0]);
        assert_eq!(peek(rb.addr(), 1), [0]);
        let err = Writer::begin(&session).map(|_| ()).unwrap_err();
        assert!(matches!(&err, Error::Tx(TxError::TrackingFailed { what }) if what.contains("reopen")), "{err}");
        drop((a, b));
    }

    #[test]
    fn page_runs_join_near_pages() {
        let ps = 4096;
        let pages = [0, ps, 3 * ps, 40 * ps, 40 * ps];
        assert_eq!(super::runs_of(&pages, ps, 1), vec![(0, 2 * ps), (3 * ps, ps), (40 * ps, ps)]);
        assert_eq!(super::runs_of(&pages, ps, 16), vec![(0, 4 * ps), (40 * ps, ps)]);
        assert!(super::runs_of(&[], ps, 16).is_empty());
    }

    /// The runs, byte by byte (the reference for the fast version).
    fn slow_runs(page: &[u8], twin: &[u8], gap: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < page.len() {
            if page[i] == twin[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < page.len() && page[i] != twin[i] {
                i += 1;
            }
            match out.last_mut() {
                Some((s, l)) if start - (*s + *l) <= gap => *l = i - *s,
                _ => out.push((start, i - start)),
            }
        }
        out
    }

    #[test]
    fn fast_runs_equal_byte_runs() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..2000 {
            let len = [4096, 4096, 100, 7, 64, 0][case % 6];
            let twin: Vec<u8> = (0..len).map(|_| (next() % 3) as u8).collect();
            let mut page = twin.clone();
            for _ in 0..next() % 12 {
                if len == 0 {
                    break;
                }
                let at = (next() as usize) % len;
                let run = 1 + (next() as usize) % [1, 9, 70, 600][case % 4];
                for b in page.iter_mut().skip(at).take(run) {
                    // Sometimes equal again (a store of the same value).
                    *b = if next() % 5 == 0 { *b } else { b.wrapping_add(1 + (next() % 250) as u8) };
                }
            }
            let gap = [0, 8, 16][case % 3];
            let mut fast = Vec::new();
            diff_runs(&page, &twin, gap, &mut fast);
            assert_eq!(fast, slow_runs(&page, &twin, gap), "case {case}");
        }
    }

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
