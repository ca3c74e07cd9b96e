//! Instant restart (`Options::instant_recovery`): the index of segment
//! pages that recovery left to bring up to date, and the page apply that
//! both the background thread and the page-fault hook run (see
//! `docs/DESIGN.md` §3.9).
//!
//! The index is built once, by recovery's verifying scan, and is frozen
//! afterwards: per segment, a two-level table from page number to the chain
//! of the page's pieces (a piece is the part of a logged range that falls
//! in the page) in log order, and one atomic state per page
//! (`PENDING → APPLYING → DONE`, or `FAILED`). The ranges' bytes are copied
//! into one buffer during the scan, so applying a page needs no log I/O.
//!
//! Bringing a page up to date is the same idempotent redo a replay does,
//! page by page: read the segment page, apply its pieces in log order. The
//! background thread ([`Shared::apply_segment`]) writes runs of pages back
//! to the segment and marks them `DONE`. The fault hook ([`LazyRegion`])
//! runs inside the `SIGSEGV` handler for a `PROT_NONE` page of an
//! on-demand region ([`Shared::fault_page`]): once segment writes are
//! allowed (§3.4 step 4 durable) it writes the page back to the segment
//! (its page cache), marks it `DONE` and makes the mapping's page
//! accessible, which then shows the final bytes; before that, it builds the
//! page in fresh private memory and moves it over the inaccessible page in
//! one `mremap`, writing nothing to the segment. Either way no thread ever
//! sees a page half applied. Everything that path touches is preallocated
//! (the index, a pool of scratch pages); it takes no lock, allocates no
//! heap memory and calls only `pread`, `pwrite`, `mmap`, `mremap`,
//! `munmap`, `mprotect`, `sched_yield` and `nanosleep`.

use crate::fault::{self, Access, FaultHook, Resolution};
use crate::log::format::RangeRef;
use crate::pagemap::PageMap;
use crate::storage::Storage;
use std::cell::UnsafeCell;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

/// A page waits for its pieces.
pub(crate) const PENDING: u8 = 0;
/// A thread is applying the page.
pub(crate) const APPLYING: u8 = 1;
/// The segment holds the page's final bytes.
pub(crate) const DONE: u8 = 2;
/// Applying the page failed: it can never be shown.
pub(crate) const FAILED: u8 = 3;

/// No piece (end of a chain).
const NONE: u32 = u32::MAX;
/// Scratch pages the fault hook may use at once (a faulting thread that
/// finds none free yields until one is).
const SCRATCH_PAGES: usize = 64;
/// Pages the background apply reads and writes with one call at most.
const RUN_PAGES: usize = 256;
/// Logged ranges the background apply applies in one run at most (beyond
/// its first page's): a fault on a page of the run waits for the whole run,
/// so this bounds that wait (about a tenth of a millisecond), where 256
/// pages of a bank's balances (2,000 ranges each) made it 2-3 ms.
const RUN_RANGES: usize = 16_384;
/// Neighbouring pending pages a fault before segment writes are allowed
/// installs at once at most (one `mmap`, `pread` and `mremap` for all: a
/// program reading a region in order faults once per this many pages, and
/// the mapping splits once).
const INSTALL_PAGES: u64 = 16;
/// Logged ranges such a fault applies at most beyond its own page's: a
/// neighbour that would pass this is left to a later fault, so a read
/// after an instant open of a log full of small ranges does not wait for
/// sixteen pages of them.
const INSTALL_RANGES: usize = 4096;
/// A mapping's first fault applies its own page's ranges only, each later
/// one up to twice the ranges of the one before (from this many, up to
/// [`INSTALL_RANGES`]), as readahead ramps up: the first read after an
/// open waits for one page, a program reading on gets neighbours.
const FIRST_INSTALL_RANGES: usize = 256;

/// The part of a logged range that falls in one page, or (a group, when
/// `data` has [`GROUP`]) ranges that follow one another in one record and
/// lie in one page, read from the record's items when the page is brought
/// up to date.
///
/// Groups keep the index small where it is large: a batch of no-flush
/// commits is one record whose ranges are sorted by offset, so a page's
/// ranges in it come one after another (the 200,000-transfer bank log of
/// the benchmarks has about ten per page per record).
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// Where its bytes are: a log position (the log mapped), or an offset
    /// in the copied bytes; for a group, where its first item starts.
    data: u64,
    /// Offset in the page (pages are at most 64 KiB) of its (first) range.
    at: u16,
    /// Bytes, minus one; for a group, its ranges, minus one.
    len_m1: u16,
    /// The page's next piece in log order.
    next: u32,
}

/// [`Piece::data`]'s flag for a group. Log positions stay below it: an
/// index of a log whose positions reach [`MAX_POSITION`] overflows (and
/// recovery runs the usual way).
const GROUP: u64 = 1 << 63;
/// Log positions an index holds stay below this.
const MAX_POSITION: u64 = 1 << 62;

/// The bytes pieces name: the log's record area mapped (positions wrap
/// around it), or the bytes a builder copied.
#[derive(Clone, Copy)]
enum Bytes<'a> {
    Ring(&'a [u8]),
    Copied(&'a [u8]),
}

impl Bytes<'_> {
    /// The byte at `pos`.
    #[inline]
    fn byte(&self, pos: u64) -> Option<u8> {
        match self {
            Bytes::Ring(area) => area.get((pos % area.len().max(1) as u64) as usize).copied(),
            Bytes::Copied(data) => usize::try_from(pos).ok().and_then(|p| data.get(p)).copied(),
        }
    }

    /// The bytes from `pos` to the end of the ring (or of the copied
    /// bytes), without wrapping.
    #[inline]
    fn from(&self, pos: u64) -> &[u8] {
        match self {
            Bytes::Ring(area) => &area[(pos % area.len().max(1) as u64) as usize..],
            Bytes::Copied(data) => usize::try_from(pos).ok().and_then(|p| data.get(p..)).unwrap_or(&[]),
        }
    }

    /// Copies the bytes at `pos` into `dst`; false if they are not there.
    #[inline]
    fn copy(&self, pos: u64, dst: &mut [u8]) -> bool {
        let len = dst.len();
        match self {
            Bytes::Ring(area) => {
                if len > area.len() {
                    return false;
                }
                // A range may wrap around the end of the ring.
                let from = (pos % area.len().max(1) as u64) as usize;
                let first = len.min(area.len() - from);
                dst[..first].copy_from_slice(&area[from..from + first]);
                dst[first..].copy_from_slice(&area[..len - first]);
                true
            }
            Bytes::Copied(data) => match usize::try_from(pos).ok().and_then(|p| data.get(p..p.checked_add(len)?)) {
                Some(src) => {
                    dst.copy_from_slice(src);
                    true
                }
                None => false,
            },
        }
    }
}

/// Applies the chain from `head` (`piece(i)`: piece `i`) to `buf`, its
/// page as the segment holds it (shorter than a page at a segment's end),
/// whose pieces name bytes in `bytes`. False if a piece does not fit the
/// page or a group's items do not read: the log is not what the scan
/// verified (changed under recovery), and the page must not be shown.
///
/// This runs in the fault handler (on a hook stack: `fault::on_hook_stack`):
/// the group paths are functions of their own, so that only one reader's
/// frame is on the stack at a time, and no iterator adapters or nested
/// closures deepen it.
fn apply_chain(head: u32, piece: impl Fn(u32) -> Piece, bytes: Bytes<'_>, buf: &mut [u8]) -> bool {
    let mut i = head;
    while i != NONE {
        let p = piece(i);
        let ok = if p.data & GROUP == 0 {
            let at = usize::from(p.at);
            match buf.get_mut(at..at + usize::from(p.len_m1) + 1) {
                Some(dst) => bytes.copy(p.data, dst),
                None => false,
            }
        } else {
            // Read in place up to the end of the bytes (the usual case: no
            // division per byte); a group that wraps around the ring's end
            // is read again through the wrapping reader.
            group_in_place(p, bytes, buf) || matches!(bytes, Bytes::Ring(_)) && group_wrapping(p, bytes, buf)
        };
        if !ok {
            return false;
        }
        i = p.next;
    }
    true
}

/// The part of `buf` a group's range of `len` bytes at `off` covers, if it
/// lies in it.
#[inline]
fn page_part(buf: &mut [u8], off: u64, len: u32) -> Option<&mut [u8]> {
    let from = usize::try_from(off).ok()?;
    let to = from.checked_add(len as usize)?;
    buf.get_mut(from..to)
}

/// Group `p`'s ranges, read from the bytes from its position to their end
/// (no wrapping); false as [`apply_chain`], or if the group wraps.
#[inline(never)]
fn group_in_place(p: Piece, bytes: Bytes<'_>, buf: &mut [u8]) -> bool {
    let flat = bytes.from(p.data & !GROUP);
    crate::log::format::read_items(
        |k| flat.get(k).copied(),
        u64::from(p.at),
        usize::from(p.len_m1) + 1,
        |off, data_at, len| {
            let Some(dst) = page_part(buf, off, len) else { return false };
            let Some(src) = flat.get(data_at..data_at + dst.len()) else { return false };
            dst.copy_from_slice(src);
            true
        },
    )
}

/// Group `p`'s ranges, read through the wrapping reader; false as
/// [`apply_chain`].
#[inline(never)]
fn group_wrapping(p: Piece, bytes: Bytes<'_>, buf: &mut [u8]) -> bool {
    let start = p.data & !GROUP;
    crate::log::format::read_items(
        |k| bytes.byte(start.wrapping_add(k as u64)),
        u64::from(p.at),
        usize::from(p.len_m1) + 1,
        |off, data_at, len| {
            let Some(dst) = page_part(buf, off, len) else { return false };
            bytes.copy(start.wrapping_add(data_at as u64), dst)
        },
    )
}

/// A pending page: its chain of pieces and its state.
#[derive(Debug)]
struct Entry {
    head: u32,
    state: AtomicU8,
    /// The on-demand mapping ([`LazyRegion::id`]) whose page was replaced
    /// by a private up-to-date copy before segment writes were allowed
    /// (0: none). Written under `APPLYING` (the page's lock); a fault in
    /// that mapping then only retries: the copy is the program's page now
    /// and may hold its stores.
    installed: AtomicU32,
}

impl Entry {
    fn empty() -> Entry {
        Entry { head: NONE, state: AtomicU8::new(PENDING), installed: AtomicU32::new(0) }
    }
}

/// One segment's pending pages.
#[derive(Debug)]
pub(crate) struct SegIndex {
    /// The address of the device recovery opened (the instance's
    /// `open_segment` reuses that device: this tells it apart).
    dev_addr: usize,
    /// Its length at open.
    pub len: u64,
    /// The raw descriptor, if the device has one (the fault path's I/O;
    /// valid while a region of the segment is mapped: the region holds the
    /// device).
    fd: Option<RawFd>,
    leaves: Leaves,
    /// Pages with pieces.
    pub pages: u64,
}

impl SegIndex {
    fn entry(&self, page: u64) -> Option<&Entry> {
        self.leaves.get(page).filter(|e| e.head != NONE)
    }

    /// Pending pages (not yet `DONE`) in `[first, end)`, as runs of
    /// neighbouring pages `(first page, pages)`.
    pub fn pending_runs(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (page, _) in self
            .pages_in_order()
            .skip_while(|&(p, _)| p < first)
            .take_while(|&(p, _)| p < end)
            .filter(|(_, e)| e.state.load(Ordering::Acquire) != DONE)
        {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == page => *n += 1,
                _ => runs.push((page, 1)),
            }
        }
        runs
    }

    /// Every page with pieces, in page order.
    fn pages_in_order(&self) -> impl Iterator<Item = (u64, &Entry)> + '_ {
        self.leaves.iter().filter(|(_, e)| e.head != NONE)
    }
}

/// A segment's page table.
type Leaves = PageMap<Entry>;

#[cfg(test)]
thread_local! {
    /// Tests: the next index built on this thread overflows (as one of
    /// more than 2^32 pieces, or past the memory cap, would).
    pub(crate) static OVERFLOW_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a test asked the next index to overflow.
fn forced_overflow() -> bool {
    #[cfg(test)]
    return OVERFLOW_NEXT.with(|c| c.replace(false));
    #[cfg(not(test))]
    false
}

/// Pieces a builder takes from the index's arena at once.
const RUN: usize = 4096;
// A group is of one batch of `Builder::record`, at most a run: its count
// of ranges, minus one, fits `Piece::len_m1`.
const _: () = assert!(RUN <= 1 << 16);

// SAFETY: a Piece is integers only (no padding: 8 + 2 + 2 + 4 bytes):
// every bit pattern is a valid Piece, and it needs no drop.
unsafe impl crate::mem::AnyBits for Piece {}
const _: () = assert!(std::mem::size_of::<Piece>() == 16);

/// The index's pieces: one arena, named by slot (builders of the parts of
/// one index, on two threads, fill runs of it: [`Builder::part`]).
type Arena = crate::mem::HugeArena<Piece>;

/// A page's chain of pieces in a builder: its first and last piece.
#[derive(Clone, Copy, Debug)]
struct Chain {
    head: u32,
    tail: u32,
}

impl Chain {
    const EMPTY: Chain = Chain { head: NONE, tail: NONE };
}

/// Where bytes `[from, to)` of a record at `lsn` stay for a piece: their
/// log position (`rec` is `None`: the log is mapped), or their offset in
/// `data`, where they are copied now. A range's data, or a group's items.
fn data_of(data: &mut Vec<u8>, lsn: u64, rec: Option<&[u8]>, from: u32, to: u32) -> u64 {
    match rec {
        None => lsn + u64::from(from),
        Some(rec) => {
            let at = data.len() as u64;
            data.extend_from_slice(&rec[from as usize..to as usize]);
            at
        }
    }
}

/// Builds the index during recovery's scan, for the whole log or for a
/// part of it ([`Builder::part`], joined in log order with
/// [`Builder::append`]).
pub(crate) struct Builder {
    page: u64,
    /// Per segment: its id, its pages' chains.
    segs: Vec<(u32, PageMap<Chain>)>,
    /// The segment of the last range (an index into `segs`).
    last_seg: usize,
    /// Where the pieces are (shared by the builders of one index).
    arena: Arc<Arena>,
    /// The runs of the arena this builder took, in order (first slots).
    runs: Vec<usize>,
    /// Pieces in the last run.
    filled: usize,
    /// The ranges' bytes, copied (when the log cannot be mapped).
    data: Vec<u8>,
    /// Whether the log's record area is mapped (recovery's scan reads it
    /// through the same mapping, handed over at [`Builder::finish`]):
    /// pieces then name their bytes by log position, and nothing is copied.
    mapped: bool,
    /// What complete transactions made: the first `.0` runs, the last of
    /// them holding `.1` pieces, and `.2` bytes of `data`. The pieces of an
    /// unfinished tail come after them in every chain, and are cut off at
    /// [`Builder::finish`].
    committed: (usize, usize, usize),
    /// Pieces whose bytes a later range of the transaction being read
    /// replaced (see [`Builder::record`]), with their bytes before: put
    /// back if the transaction is cut off unfinished.
    replaced: Vec<(u32, u64)>,
    /// The unfinished tail was cut off ([`Builder::cut_unfinished`]).
    cut: bool,
    /// Bytes the page tables of this index (all its parts) may still
    /// take: the scan indexes ranges before their segments' lengths are
    /// checked, so a forged offset must not make a table of 2^40 leaves.
    tables: Arc<std::sync::atomic::AtomicU64>,
    /// Set if the index cannot hold the log (more than 2^32 pieces, no
    /// memory, page tables over their budget, or pages over 64 KiB):
    /// recovery then runs the usual way.
    pub overflow: bool,
}

impl Builder {
    /// An empty index for pages of `page` bytes, for a log of at most
    /// `log_bytes` bytes (which bounds the pieces: a piece needs at least
    /// a byte of its range's data and two of its encoding, or a page of
    /// data), in at most a quarter of the memory the process may use (the
    /// machine's, or its control group's limit). `mapped`: the log's record area will be handed to
    /// [`Builder::finish`] mapped, so ranges' bytes need no copy.
    pub fn new(page: usize, log_bytes: u64, mapped: bool) -> Builder {
        // At most a quarter of the machine's memory: a longer log's index
        // overflows, and recovery runs the usual way (in bounded memory).
        // Read once (the control group's files under /sys): the pieces and the
        // page tables each take a share of it.
        let memory = crate::mem::memory_limit();
        let memory_cap = memory.map_or(u64::MAX, |m| m / 4 / std::mem::size_of::<Piece>() as u64);
        let cap = usize::try_from(log_bytes.min(memory_cap)).unwrap_or(usize::MAX).min(NONE as usize - 1);
        let arena = Arena::new(cap);
        // The page tables (16 MiB of segment a leaf of 4,096 chains), at
        // most an eighth of it.
        let tables = memory.map_or(1 << 30, |m| m / 8);
        Builder {
            page: page as u64,
            segs: Vec::new(),
            last_seg: usize::MAX,
            overflow: arena.is_none() || page > 1 << 16 || !page.is_power_of_two() || forced_overflow(),
            arena: Arc::new(arena.unwrap_or_else(|| Arena::new(0).expect("an empty arena maps nothing"))),
            runs: Vec::new(),
            filled: RUN,
            data: Vec::new(),
            mapped,
            committed: (0, 0, 0),
            replaced: Vec::new(),
            cut: false,
            tables: Arc::new(std::sync::atomic::AtomicU64::new(tables)),
        }
    }

    /// An empty builder for a part of the same index (another part of the
    /// log, scanned on another thread: see `log::parallel`).
    pub fn part(&self) -> Builder {
        Builder {
            page: self.page,
            segs: Vec::new(),
            last_seg: usize::MAX,
            arena: self.arena.clone(),
            runs: Vec::new(),
            filled: RUN,
            data: Vec::new(),
            mapped: self.mapped,
            committed: (0, 0, 0),
            replaced: Vec::new(),
            cut: false,
            tables: self.tables.clone(),
            overflow: self.overflow,
        }
    }

    /// The ranges of a verified record at log position `lsn`: their
    /// pieces join the pages' chains at once (see `committed`). `rec`, the
    /// record's bytes, is needed only by a builder not made `mapped` (it
    /// copies the ranges' bytes).
    ///
    /// This is instant recovery's hot loop (a log of small ranges makes a
    /// piece per range): a range that lies in one page, while the current
    /// run of the arena has room, takes a short path with no per-piece
    /// checks beyond the chain's; others go through [`Builder::add`].
    pub fn record(&mut self, lsn: u64, rec: Option<&[u8]>, ranges: &[RangeRef]) {
        if self.mapped != rec.is_none() || lsn >= MAX_POSITION {
            // Pieces would name their bytes the wrong way (or a position
            // would read as a group): recover the usual way instead.
            self.overflow = true;
        }
        if self.overflow {
            return;
        }
        let (page, shift, mask) = (self.page, self.page.trailing_zeros(), self.page - 1);
        let one_page = |r: &RangeRef| r.len > 0 && (r.offset & mask) + u64::from(r.len) <= page;
        let mut rest = ranges;
        while let Some(r) = rest.first() {
            if self.filled == RUN && !self.new_run() {
                return;
            }
            let n = rest.iter().take(RUN - self.filled).take_while(|x| x.segment == r.segment && one_page(x)).count();
            if n == 0 {
                let data = data_of(&mut self.data, lsn, rec, r.data_at, r.data_at + r.len);
                self.add(r.segment, r.offset, u64::from(r.len), data);
                if self.overflow {
                    return;
                }
                rest = &rest[1..];
                continue;
            }
            let s = self.seg_slot(r.segment);
            let first = (self.runs[self.runs.len() - 1] + self.filled) as u32;
            let mut id = first;
            let chains = &mut self.segs[s].1;
            let mut batch = &rest[..n];
            while let Some(r) = batch.first() {
                let page = r.offset >> shift;
                // The ranges after it in its page: one piece, a group,
                // names them all.
                // (A batch is at most an arena run, so its count fits
                // `len_m1`.)
                let k = 1 + batch[1..].iter().take_while(|x| x.offset >> shift == page).count();
                let piece = if k == 1 {
                    let data = data_of(&mut self.data, lsn, rec, r.data_at, r.data_at + r.len);
                    Piece { data, at: (r.offset & mask) as u16, len_m1: (r.len - 1) as u16, next: NONE }
                } else {
                    let last = &batch[k - 1];
                    let data = data_of(&mut self.data, lsn, rec, r.item_at, last.data_at + last.len);
                    Piece { data: data | GROUP, at: (r.offset & mask) as u16, len_m1: (k - 1) as u16, next: NONE }
                };
                batch = &batch[k..];
                let Some(chain) = chains.get_or_insert_within(page, || Chain::EMPTY, &self.tables) else {
                    self.overflow = true;
                    return;
                };
                if chain.head != NONE {
                    // SAFETY: a chain's tail is a slot this builder wrote
                    // (its runs, or an appended part's, now its own); no
                    // other reference to any slot lives during this loop.
                    let tail = unsafe { &mut *self.arena.ptr(chain.tail as usize) };
                    if k == 1 && tail.data & GROUP == 0 && (tail.at, tail.len_m1) == (piece.at, piece.len_m1) {
                        // The page's last piece names exactly these bytes
                        // (a counter every transaction sets): the newer
                        // bytes replace its own, and the chain does not
                        // grow. A page's first fault then applies one piece
                        // where it would have applied one per transaction.
                        self.replaced.push((chain.tail, tail.data));
                        tail.data = piece.data;
                        continue;
                    }
                    tail.next = id;
                } else {
                    chain.head = id;
                }
                chain.tail = id;
                // SAFETY: slot `id` lies in this builder's current run
                // (`filled` was at most RUN - n, and this batch of n
                // ranges makes at most n pieces), handed to it alone; no
                // reference to any slot lives during this loop.
                unsafe { self.arena.ptr(id as usize).write(piece) };
                id += 1;
            }
            self.filled += (id - first) as usize;
            rest = &rest[n..];
        }
    }

    /// The index into `segs` of `segment`'s chains, made if new.
    #[inline]
    fn seg_slot(&mut self, segment: u32) -> usize {
        let s = match self.segs.get(self.last_seg) {
            Some((id, _)) if *id == segment => self.last_seg,
            _ => match self.segs.iter().position(|s| s.0 == segment) {
                Some(s) => s,
                None => {
                    self.segs.push((segment, PageMap::default()));
                    self.segs.len() - 1
                }
            },
        };
        self.last_seg = s;
        s
    }

    /// A range of the transaction being read, its bytes `bytes` at log
    /// position `lsn`: range by range, the reference [`Builder::record`]
    /// is tested against.
    #[cfg(test)]
    pub fn range(&mut self, segment: u32, offset: u64, bytes: &[u8], lsn: u64) {
        let data = data_of(&mut self.data, lsn, (!self.mapped).then_some(bytes), 0, bytes.len() as u32);
        if !self.overflow {
            self.add(segment, offset, bytes.len() as u64, data);
        }
    }

    /// [`Builder::range`] of a builder made `mapped`, which needs only the
    /// range's length and the log position of its first byte.
    #[cfg(test)]
    pub fn range_mapped(&mut self, segment: u32, offset: u64, len: u32, lsn: u64) {
        debug_assert!(self.mapped);
        if !self.overflow {
            self.add(segment, offset, u64::from(len), lsn);
        }
    }

    /// Piece `id`, which this builder wrote.
    #[inline]
    fn piece_mut(&mut self, id: u32) -> &mut Piece {
        // SAFETY: `id` names a slot of one of this builder's runs (the
        // arena handed it to this builder alone, or to a part appended to
        // it, whose runs are now this builder's); `&mut self` is the only
        // way to it, so no other reference to the slot lives.
        unsafe { self.arena.slot(id as usize) }
    }

    /// A fresh run of the arena; false if there is none.
    #[cold]
    #[inline(never)]
    fn new_run(&mut self) -> bool {
        match self.arena.claim(RUN) {
            Some(at) => {
                self.runs.push(at);
                self.filled = 0;
                true
            }
            None => {
                self.overflow = true;
                false
            }
        }
    }

    /// Links the pieces of `[offset, offset + len)` of `segment`, whose
    /// bytes are at `data`, to their pages' chains.
    #[inline]
    fn add(&mut self, segment: u32, offset: u64, len: u64, data: u64) {
        let s = self.seg_slot(segment);
        // Pages are a power of two (checked in `new`): shifts, not
        // divisions, on this path.
        let (shift, mask) = (self.page.trailing_zeros(), self.page - 1);
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let page = off >> shift;
            let at = off & mask;
            let n = (self.page - at).min(end - off);
            if self.filled == RUN && !self.new_run() {
                return;
            }
            let id = (self.runs[self.runs.len() - 1] + self.filled) as u32;
            self.filled += 1;
            *self.piece_mut(id) =
                Piece { data: data + (off - offset), at: at as u16, len_m1: (n - 1) as u16, next: NONE };
            let Some(chain) = self.segs[s].1.get_or_insert_within(page, || Chain::EMPTY, &self.tables) else {
                self.overflow = true;
                return;
            };
            let tail = std::mem::replace(&mut chain.tail, id);
            if chain.head == NONE {
                chain.head = id;
            } else {
                self.piece_mut(tail).next = id;
            }
            off += n;
        }
    }

    /// The transaction being read is complete.
    pub fn commit(&mut self) {
        self.committed = (self.runs.len(), self.filled, self.data.len());
        self.replaced.clear();
    }

    /// Cuts off the pieces of an unfinished tail (see `committed`): they
    /// are the last of their chains. Nothing may be appended afterwards
    /// (the chains' tails are not kept right).
    pub fn cut_unfinished(&mut self) {
        self.cut = true;
        // Pieces of complete transactions whose bytes the unfinished one
        // replaced get their own back (newest replacement first).
        for (id, data) in std::mem::take(&mut self.replaced).into_iter().rev() {
            self.piece_mut(id).data = data;
        }
        let (runs, filled, bytes) = self.committed;
        if runs == self.runs.len() && (runs == 0 || filled == self.filled) {
            return;
        }
        // Pieces past the cut: the later part of run `runs - 1`, the runs
        // after it.
        let mut dropped: Vec<usize> = self.runs.drain(runs..).collect();
        dropped.sort_unstable();
        let last = self.runs.last().map(|&r| (r, filled));
        self.filled = filled;
        self.data.truncate(bytes);
        let kept = |id: u32| {
            let i = id as usize;
            let in_dropped = dropped.partition_point(|&r| r <= i).checked_sub(1).is_some_and(|k| i < dropped[k] + RUN);
            id != NONE && !in_dropped && last.is_none_or(|(r, f)| !(r..r + RUN).contains(&i) || i < r + f)
        };
        let mut slots = Vec::new();
        for (k, &r) in self.runs.iter().enumerate() {
            let n = if k + 1 == self.runs.len() { filled } else { RUN };
            slots.extend((r..r + n).map(|i| i as u32));
        }
        for id in slots {
            let p = self.piece_mut(id);
            if p.next != NONE && !kept(p.next) {
                p.next = NONE;
            }
        }
        for (_, chains) in &mut self.segs {
            for chain in chains.values_mut() {
                if chain.head != NONE && !kept(chain.head) {
                    *chain = Chain::EMPTY;
                }
            }
        }
    }

    /// Joins `later`, a part of the same index made from the records that
    /// follow this builder's (all of whose transactions are complete):
    /// its pieces come after this builder's in every chain.
    pub fn append(&mut self, mut later: Builder) {
        debug_assert!(Arc::ptr_eq(&self.arena, &later.arena) && self.mapped == later.mapped && !self.cut);
        // Its transactions are complete (or it was cut): nothing to put back.
        debug_assert!(later.replaced.is_empty());
        self.overflow |= later.overflow;
        // A cut part's tails are stale: it must be the last one joined.
        self.cut |= later.cut;
        if self.overflow {
            return;
        }
        // Copied bytes are named by their offset in `data`.
        let shift = self.data.len() as u64;
        if !self.mapped && shift > 0 {
            let runs = later.runs.clone();
            for (k, &r) in runs.iter().enumerate() {
                let n = if k + 1 == runs.len() { later.filled } else { RUN };
                for i in r..r + n {
                    // A run in the middle may end in slots never written
                    // (any bytes: no chain reaches them).
                    let p = later.piece_mut(i as u32);
                    p.data = p.data.wrapping_add(shift);
                }
            }
        }
        self.data.append(&mut later.data);
        let (runs, filled, bytes) = later.committed;
        self.committed = if runs == 0 {
            (self.runs.len(), self.filled, shift as usize + bytes)
        } else {
            (self.runs.len() + runs, filled, shift as usize + bytes)
        };
        if !later.runs.is_empty() {
            self.filled = later.filled;
        }
        self.runs.append(&mut later.runs);
        for (id, chains) in later.segs {
            let s = self.seg_slot(id);
            for (page, c) in chains.iter().filter(|(_, c)| c.head != NONE) {
                let Some(mine) = self.segs[s].1.get_or_insert_within(page, || Chain::EMPTY, &self.tables) else {
                    self.overflow = true;
                    return;
                };
                let tail = std::mem::replace(&mut mine.tail, c.tail);
                if mine.head == NONE {
                    mine.head = c.head;
                } else {
                    self.piece_mut(tail).next = c.head;
                }
            }
        }
    }

    /// Freezes the index; `log` is the record area mapped and its length
    /// (given if and only if the builder was made `mapped`), `device(id)`
    /// gives each segment's device, path and length. Also returns the
    /// devices, in the order of [`Shared::segs`]. `None` also if a part of
    /// the index is still held elsewhere.
    #[allow(clippy::type_complexity)]
    pub fn finish(
        mut self,
        log: Option<(crate::mem::FileView, u64)>,
        mut device: impl FnMut(u32) -> Option<(Arc<dyn Storage>, PathBuf, u64)>,
    ) -> Option<(Shared, Vec<(PathBuf, Arc<dyn Storage>)>)> {
        if self.mapped != log.is_some() {
            // Pieces would name their bytes the wrong way.
            return None;
        }
        self.cut_unfinished();
        let mut segs = Vec::new();
        let mut devices = Vec::new();
        for (id, chains) in std::mem::take(&mut self.segs) {
            let mut leaves = Leaves::default();
            let mut pages = 0;
            for (page, c) in chains.iter().filter(|(_, c)| c.head != NONE) {
                leaves.get_or_insert_with(page, Entry::empty).head = c.head;
                pages += 1;
            }
            if pages == 0 {
                // Only an unfinished tail (cut off) named it: recovery
                // neither checked nor opened it, and nothing is pending.
                continue;
            }
            let (dev, path, len) = device(id)?;
            let fd = dev.raw_fd().map(|fd| fd.as_raw_fd());
            let dev_addr = Arc::as_ptr(&dev) as *const () as usize;
            devices.push((path, dev));
            segs.push(SegIndex { dev_addr, len, fd, leaves, pages });
        }
        let shared = Shared {
            page: self.page as usize,
            segs,
            pieces: Arc::into_inner(self.arena)?.freeze(),
            data: self.data,
            log,
            scratch: Scratch::new(self.page as usize),
            writable: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            process: crate::mem::fork_count(),
            orphans: AtomicBool::new(false),
        };
        Some((shared, devices))
    }
}

/// Page buffers the fault hook takes without a lock.
struct Scratch {
    page: usize,
    mem: Box<[UnsafeCell<u8>]>,
    busy: Box<[AtomicBool]>,
}

// SAFETY: a scratch page is handed to one thread at a time (its `busy`
// flag, taken with a compare-exchange and released after use), so the
// UnsafeCell bytes are never accessed by two threads at once.
unsafe impl Sync for Scratch {}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch").field("pages", &self.busy.len()).finish()
    }
}

impl Scratch {
    fn new(page: usize) -> Scratch {
        Scratch {
            page,
            mem: (0..page * SCRATCH_PAGES).map(|_| UnsafeCell::new(0)).collect(),
            busy: (0..SCRATCH_PAGES).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Takes a free page (yielding until one is), runs `f` on it, frees it.
    fn with<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut spins = 0u32;
        let slot = loop {
            if let Some(i) = self
                .busy
                .iter()
                .position(|b| b.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok())
            {
                break i;
            }
            pause(&mut spins);
        };
        // SAFETY: slot `slot` is ours until `busy[slot]` is cleared below
        // (no other thread touches its bytes meanwhile), and the range lies
        // inside `mem`. UnsafeCell<u8> has the layout of u8.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(UnsafeCell::raw_get(self.mem.as_ptr().add(slot * self.page)), self.page)
        };
        let r = f(buf);
        self.busy[slot].store(false, Ordering::Release);
        r
    }
}

/// Waits a little, async-signal-safely: `sched_yield` at first, then
/// sleeps of 50 µs.
fn pause(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 64 {
        // SAFETY: sched_yield takes no arguments and is async-signal-safe.
        unsafe { libc::sched_yield() };
    } else {
        let ts = libc::timespec { tv_sec: 0, tv_nsec: 50_000 };
        // SAFETY: nanosleep is async-signal-safe; `ts` is a valid timespec
        // and a null remainder is allowed.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }
}

/// The frozen index and what applying pages needs, shared by recovery's
/// background thread, map and the fault hooks.
#[derive(Debug)]
pub(crate) struct Shared {
    page: usize,
    /// Segments with pending pages.
    pub segs: Vec<SegIndex>,
    /// The pieces, named by slot.
    pieces: crate::mem::Frozen<Piece>,
    data: Vec<u8>,
    /// The record area mapped, and its length (see [`Builder`]).
    log: Option<(crate::mem::FileView, u64)>,
    scratch: Scratch,
    /// Segment writes are allowed (the status recording the synced end is
    /// durable: §3.4 step 4).
    pub writable: AtomicBool,
    /// Applying failed: pages not yet `DONE` can never be shown.
    pub failed: AtomicBool,
    /// The process that built the index ([`crate::mem::fork_count`]): a
    /// forked child's faults take [`Shared::fault_page`]'s child path.
    process: (u64, u32),
    /// In a forked child: a page was found left `APPLYING` by a thread
    /// that did not survive the fork; the child's later faults on
    /// `APPLYING` pages take them as left so too, at once.
    orphans: AtomicBool,
}

/// What the fault path did with a page ([`Shared::fault_page`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Brought {
    /// The index does not hold the page (it was never pending).
    NotIndexed,
    /// The segment (its page cache) holds the page's final bytes.
    Done,
    /// The faulting mapping holds a private up-to-date copy of the page.
    Installed,
}

/// Why a page could not be brought up to date.
const FAILED_MSG: &str = "instant recovery failed: a segment page could not be brought up to date";
/// A forked child could not make a private copy of a pending page.
const CHILD_NO_COPY_MSG: &str =
    "instant recovery: a forked child could not map a private copy of a pending page (no memory or mappings left)";
/// Pauses ([`pause`]) a forked child waits for a page another thread is
/// applying (about 10 ms) before taking the page as left `APPLYING` by a
/// thread that did not survive the fork (once one was, it waits no more:
/// the background apply's run held up to [`RUN_PAGES`] of them).
const ORPHAN_PAUSES: u32 = 64 + 200;
/// Why the background apply failed when the log's bytes no longer read as
/// the scan verified them.
const CHANGED_MSG: &str =
    "instant recovery failed: the log changed after it was verified (its bytes no longer read as \
                           the scan found them); nothing wrong was written";

impl Shared {
    /// The page size of the index.
    pub fn page(&self) -> usize {
        self.page
    }

    /// Pages with pieces, over all segments.
    pub fn pages(&self) -> u64 {
        self.segs.iter().map(|s| s.pages).sum()
    }

    /// The index of the segment open as `dev` (the instance reuses the
    /// device recovery opened; it may know the segment under another id,
    /// if it moved: `Options::accept_segment`).
    pub fn seg_of(&self, dev: &Arc<dyn Storage>) -> Option<usize> {
        let addr = Arc::as_ptr(dev) as *const () as usize;
        self.segs.iter().position(|s| s.dev_addr == addr)
    }

    /// Applies the page's pieces, in log order, to `buf` (the page as the
    /// segment holds it); false if the log's bytes are not what the scan
    /// verified ([`apply_chain`]).
    fn apply_pieces(&self, e: &Entry, buf: &mut [u8]) -> bool {
        let bytes = match &self.log {
            None => Bytes::Copied(&self.data),
            Some((view, _)) => Bytes::Ring(view.bytes()),
        };
        apply_chain(e.head, |i| self.pieces[i as usize], bytes, buf)
    }

    /// The logged ranges (or parts of ranges) the page's pieces apply,
    /// counted up to just past `limit` (a long chain is not walked to its
    /// end only to be found over it).
    fn ranges_of(&self, e: &Entry, limit: usize) -> usize {
        let (mut i, mut n) = (e.head, 0);
        while let Some(p) = self.pieces.get(i as usize) {
            n += if p.data & GROUP == 0 { 1 } else { usize::from(p.len_m1) + 1 };
            if n > limit {
                break;
            }
            i = p.next;
        }
        n
    }

    /// Bytes of page `page` of segment `s` inside the segment.
    fn page_len(&self, s: &SegIndex, page: u64) -> usize {
        let off = page * self.page as u64;
        (s.len.saturating_sub(off)).min(self.page as u64) as usize
    }

    /// Bytes of the run of `n` pages of `s` from `first` inside the segment.
    fn run_len(&self, s: &SegIndex, first: u64, n: usize) -> usize {
        (n - 1) * self.page + self.page_len(s, first + n as u64 - 1)
    }

    /// Applies the pieces of a run of neighbouring pages (`entries`, in
    /// page order) to `buf`, the run as the segment holds it; false as
    /// [`Shared::apply_pieces`].
    fn apply_run<'a>(&self, entries: impl Iterator<Item = &'a Entry>, buf: &mut [u8]) -> bool {
        // A plain loop: on the fault path `all`'s chain of adapters cost
        // about 700 bytes of an unoptimized build's stack (see
        // `apply_chain`).
        for (k, e) in entries.enumerate() {
            let from = k * self.page;
            let to = (from + self.page).min(buf.len());
            if !self.apply_pieces(e, &mut buf[from..to]) {
                return false;
            }
        }
        true
    }

    /// Reads the run at segment offset `off` into `buf` with `pread`
    /// (async-signal-safe: the fault path) and applies its pages' pieces;
    /// false if the read or the pieces failed.
    fn read_run<'a>(&self, fd: RawFd, off: u64, buf: &mut [u8], entries: impl Iterator<Item = &'a Entry>) -> bool {
        pread_full(fd, buf, off) && self.apply_run(entries, buf)
    }

    /// Brings page `page` of segment `s` up to date for a fault at
    /// `addr` (the page's address) in the on-demand mapping `map` (its
    /// [`LazyRegion::id`]), async-signal-safely (the fault path).
    ///
    /// After segment writes are allowed (§3.4 step 4 durable): reads the
    /// segment page, applies its pieces, writes it back to the segment (its
    /// page cache) and marks it `DONE` ([`Brought::Done`]: the caller makes
    /// the mapping's page accessible, and it shows the page cache's page).
    /// Before: builds the up-to-date page in fresh private memory and moves
    /// it over the mapping's inaccessible page in one step
    /// ([`fault::replace_page`]), writing nothing to the segment; the page
    /// stays pending for the segment (the background apply writes it after
    /// step 4) and is marked installed in `map` ([`Brought::Installed`]).
    /// Waits only for a thread already applying the page (or, if no private
    /// page can be had, for segment writes to be allowed). `Err` if the
    /// page can never be shown.
    /// `end`: the first segment page past the mapping (a fault may install
    /// up to [`INSTALL_PAGES`] pending pages from `page` on, each still
    /// `PROT_NONE` in the mapping).
    fn fault_page(
        &self,
        s: usize,
        page: u64,
        end: u64,
        map: u32,
        addr: usize,
        neighbour_ranges: usize,
    ) -> Result<Brought, &'static str> {
        let seg = &self.segs[s];
        let Some(e) = seg.entry(page) else { return Ok(Brought::NotIndexed) };
        let mut spins = 0u32;
        // No private page could be made (no memory, or no more mappings):
        // wait for segment writes to be allowed instead.
        let mut no_copy = false;
        // A forked child (the region's instance is its parent's): the
        // segment files are the parent's, so it never writes them (every
        // page it brings in is a private copy), and a page the parent's
        // background thread was applying at the fork stays `APPLYING` in
        // the child's copy of the index for good (that thread is gone).
        let child = crate::mem::forked_since(self.process);
        loop {
            // Set only by this mapping's own handlers, and this mapping
            // lives while its hook runs: once seen, it stays.
            if e.installed.load(Ordering::Acquire) == map {
                return Ok(Brought::Installed);
            }
            match e.state.load(Ordering::Acquire) {
                DONE => return Ok(Brought::Done),
                FAILED => return Err(FAILED_MSG),
                APPLYING if child && (spins >= ORPHAN_PAUSES || self.orphans.load(Ordering::Acquire)) => {
                    self.orphans.store(true, Ordering::Release);
                    return self.install_orphan(seg, e, page, map, addr);
                }
                APPLYING => {}
                _ if self.failed.load(Ordering::Acquire) => return Err(FAILED_MSG),
                _ if no_copy && !self.writable.load(Ordering::Acquire) => {}
                _ => {
                    if e.state.compare_exchange(PENDING, APPLYING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                        continue;
                    }
                    // The page is ours until its state is stored again.
                    if e.installed.load(Ordering::Acquire) == map {
                        e.state.store(PENDING, Ordering::Release);
                        return Ok(Brought::Installed);
                    }
                    let Some(fd) = seg.fd else {
                        e.state.store(FAILED, Ordering::Release);
                        return Err(FAILED_MSG);
                    };
                    let off = page * self.page as u64;
                    if self.writable.load(Ordering::Acquire) && !child {
                        let len = self.page_len(seg, page);
                        let ok = self.scratch.with(|buf| {
                            self.read_run(fd, off, &mut buf[..len], std::iter::once(e))
                                && pwrite_full(fd, &buf[..len], off)
                        });
                        if !ok {
                            return self.fail(e);
                        }
                        e.state.store(DONE, Ordering::Release);
                        return Ok(Brought::Done);
                    }
                    // Before step 4: claim the pending neighbours that
                    // follow too (each not installed in this mapping, so
                    // still PROT_NONE in it, as every page not DONE at map
                    // time was made).
                    let mut n = 1u64;
                    let mut ranges = 0;
                    while n < INSTALL_PAGES && page + n < end {
                        let Some(next) = seg.entry(page + n) else { break };
                        ranges += self.ranges_of(next, neighbour_ranges.saturating_sub(ranges));
                        if ranges > neighbour_ranges
                            || next.installed.load(Ordering::Acquire) == map
                            || next
                                .state
                                .compare_exchange(PENDING, APPLYING, Ordering::AcqRel, Ordering::Acquire)
                                .is_err()
                        {
                            break;
                        }
                        // Checked again under the claim: another thread may
                        // have installed it between the load and the claim.
                        if next.installed.load(Ordering::Acquire) == map {
                            next.state.store(PENDING, Ordering::Release);
                            break;
                        }
                        n += 1;
                    }
                    // The claimed pages, in order (each has an entry).
                    let claimed = (page..page + n).filter_map(|p| seg.entry(p));
                    let bytes = self.run_len(seg, page, n as usize);
                    let fill = |buf: &mut [u8]| self.read_run(fd, off, &mut buf[..bytes], claimed.clone());
                    // SAFETY: `[addr, addr + n pages)` are pages of the
                    // region's private mapping (the caller checked the
                    // first, `end` bounds the rest), alive while its hook
                    // runs; they are PROT_NONE (not DONE, not installed in
                    // this mapping, claimed by us), so nothing refers to
                    // their bytes. Their normal protection is read and
                    // write.
                    let r = unsafe { fault::replace_page(addr, n as usize * self.page, fill) };
                    let (installed, state) = match r {
                        fault::Replaced::Yes => (map, PENDING),
                        fault::Replaced::FillFailed => (0, FAILED),
                        fault::Replaced::NoResources => (0, PENDING),
                    };
                    for e in claimed.clone() {
                        if installed != 0 {
                            e.installed.store(installed, Ordering::Release);
                        }
                        e.state.store(state, Ordering::Release);
                    }
                    match r {
                        fault::Replaced::Yes => return Ok(Brought::Installed),
                        fault::Replaced::FillFailed => {
                            self.failed.store(true, Ordering::Release);
                            return Err(FAILED_MSG);
                        }
                        // No segment write will ever come in a child.
                        fault::Replaced::NoResources if child => return Err(CHILD_NO_COPY_MSG),
                        fault::Replaced::NoResources => {
                            no_copy = true;
                            continue;
                        }
                    }
                }
            }
            pause(&mut spins);
        }
    }

    /// A forked child's fault on a page left `APPLYING` (by a thread that
    /// did not survive the fork, after [`ORPHAN_PAUSES`]): the page is
    /// built in private memory without a claim (the redo is idempotent, so
    /// whatever mix of old and new bytes the segment holds, applying the
    /// page's pieces gives its final bytes) and installed in the mapping.
    fn install_orphan(
        &self,
        seg: &SegIndex,
        e: &Entry,
        page: u64,
        map: u32,
        addr: usize,
    ) -> Result<Brought, &'static str> {
        let Some(fd) = seg.fd else { return Err(FAILED_MSG) };
        let off = page * self.page as u64;
        let bytes = self.run_len(seg, page, 1);
        let fill = |buf: &mut [u8]| self.read_run(fd, off, &mut buf[..bytes], std::iter::once(e));
        // SAFETY: `addr` is a page of the region's private mapping (the
        // caller checked it), alive while its hook runs; it is PROT_NONE
        // (not DONE, not installed in this mapping), so nothing refers to
        // its bytes; its normal protection is read and write. (A child
        // thread applying the page itself for more than ORPHAN_PAUSES
        // would install the same bytes over this copy.)
        match unsafe { fault::replace_page(addr, self.page, fill) } {
            fault::Replaced::Yes => {
                e.installed.store(map, Ordering::Release);
                Ok(Brought::Installed)
            }
            fault::Replaced::FillFailed => Err(FAILED_MSG),
            fault::Replaced::NoResources => Err(CHILD_NO_COPY_MSG),
        }
    }

    /// The page held by this thread (`APPLYING`) could not be read or
    /// written: it, and every page not yet `DONE`, can never be shown.
    fn fail(&self, e: &Entry) -> Result<Brought, &'static str> {
        e.state.store(FAILED, Ordering::Release);
        self.failed.store(true, Ordering::Release);
        Err(FAILED_MSG)
    }

    /// Applies every pending page of segment `s` through its device (the
    /// background thread, and map's fallback): claims runs of neighbouring
    /// pending pages, reads each run from `dev` (the segment's device) with one call, applies the pages'
    /// pieces, writes the run back with one call, marks its pages `DONE`;
    /// then waits for pages other threads are applying, and takes again the
    /// ones they left pending. Returns the segment bytes written. `stop` is
    /// polled between runs.
    pub fn apply_segment(&self, s: usize, dev: &dyn Storage, stop: &dyn Fn() -> bool) -> std::io::Result<u64> {
        let seg = &self.segs[s];
        let ps = self.page as u64;
        let mut written = 0u64;
        let mut buf = Vec::new();
        let mut run: Vec<&Entry> = Vec::with_capacity(RUN_PAGES);
        // Pages a faulting thread claimed before segment writes were
        // allowed are left pending (installed in its mapping only): passes
        // repeat until none is (a fault claims such a page only before it
        // sees `writable`, so few passes follow the first).
        loop {
            let mut it = seg.pages_in_order().peekable();
            while let Some((first, e)) = it.next() {
                if stop() {
                    break;
                }
                if e.state.compare_exchange(PENDING, APPLYING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                    continue;
                }
                run.clear();
                run.push(e);
                let mut ranges = 0;
                while run.len() < RUN_PAGES {
                    match it.peek() {
                        Some(&(p, n))
                            if p == first + run.len() as u64
                                && {
                                    ranges += self.ranges_of(n, RUN_RANGES - ranges);
                                    ranges <= RUN_RANGES
                                }
                                && n.state
                                    .compare_exchange(PENDING, APPLYING, Ordering::AcqRel, Ordering::Acquire)
                                    .is_ok() =>
                        {
                            run.push(n);
                            it.next();
                        }
                        _ => break,
                    }
                }
                let off = first * ps;
                let len = self.run_len(seg, first, run.len());
                buf.resize(len, 0);
                let r = dev.read_at(&mut buf, off).and_then(|()| {
                    if !self.apply_run(run.iter().copied(), &mut buf) {
                        return Err(std::io::Error::other(CHANGED_MSG));
                    }
                    dev.write_at(&buf, off)
                });
                let state = if r.is_ok() { DONE } else { FAILED };
                if r.is_err() {
                    self.failed.store(true, Ordering::Release);
                }
                for e in &run {
                    e.state.store(state, Ordering::Release);
                }
                r?;
                written += len as u64;
            }
            // Pages a faulting thread claimed: wait until it is done with
            // them.
            let mut again = false;
            for (_, e) in seg.pages_in_order() {
                let mut spins = 0u32;
                loop {
                    match e.state.load(Ordering::Acquire) {
                        APPLYING => pause(&mut spins),
                        FAILED => return Err(std::io::Error::other(FAILED_MSG)),
                        PENDING => {
                            again = true;
                            break;
                        }
                        _ => break,
                    }
                }
            }
            if !again || stop() {
                return Ok(written);
            }
        }
    }

    /// Whether every page of segment `s` is `DONE`.
    pub fn segment_done(&self, s: usize) -> bool {
        self.segs[s].pages_in_order().all(|(_, e)| e.state.load(Ordering::Acquire) == DONE)
    }
}

/// Repeats `op(done)`, a `pread` or `pwrite` of the rest from byte `done`,
/// until `len` bytes are done; false on an error or end of file
/// (async-signal-safe: no allocation, `EINTR` retried).
fn all_of(len: usize, mut op: impl FnMut(usize) -> isize) -> bool {
    let mut done = 0;
    while done < len {
        let n = op(done);
        if n > 0 {
            done += n as usize;
        } else if n < 0 && fault::errno() == libc::EINTR {
            continue;
        } else {
            return false;
        }
    }
    true
}

/// Reads all of `buf` at `off` (async-signal-safe).
fn pread_full(fd: RawFd, buf: &mut [u8], off: u64) -> bool {
    let len = buf.len();
    all_of(len, |done| {
        // SAFETY: pread(2) is async-signal-safe; the pointer and length
        // describe the unread rest of `buf`, which we own.
        unsafe { libc::pread(fd, buf[done..].as_mut_ptr().cast(), len - done, (off + done as u64) as libc::off_t) }
    })
}

/// Writes all of `buf` at `off` (async-signal-safe).
fn pwrite_full(fd: RawFd, buf: &[u8], off: u64) -> bool {
    all_of(buf.len(), |done| {
        // SAFETY: pwrite(2) is async-signal-safe; the pointer and length
        // describe the unwritten rest of `buf`.
        unsafe { libc::pwrite(fd, buf[done..].as_ptr().cast(), buf.len() - done, (off + done as u64) as libc::off_t) }
    })
}

/// The fault hook of an on-demand region with pending pages.
pub(crate) struct LazyRegion {
    base: usize,
    len: usize,
    /// Segment offset of `base`.
    offset: u64,
    seg: usize,
    /// This mapping, among every on-demand mapping of the process (never
    /// 0): pages installed in it are marked with it ([`Entry::installed`]).
    id: u32,
    /// The index (a leaked `Arc<Shared>`); null once the region is
    /// released (every page up to date and accessible).
    shared: AtomicPtr<Shared>,
    /// Handlers using `shared` right now.
    users: AtomicUsize,
    /// Logged ranges of neighbouring pages the next fault may apply: none
    /// at the mapping's first, then from [`FIRST_INSTALL_RANGES`] doubling
    /// up to [`INSTALL_RANGES`].
    neighbour_ranges: AtomicUsize,
}

impl LazyRegion {
    /// Every page is accessible now: faults still arriving were raised
    /// before (their handler ran late) and only need a retry. Frees the
    /// index reference once no handler uses it.
    fn detach(&self) {
        let p = self.shared.swap(std::ptr::null_mut(), Ordering::SeqCst);
        while self.users.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
        }
        if !p.is_null() {
            // SAFETY: `p` came from Arc::into_raw in `protect_region` and was
            // taken out by the swap above (nobody else frees it); no handler
            // uses it (users is zero, later ones see null).
            drop(unsafe { Arc::from_raw(p) });
        }
    }
}

impl Drop for LazyRegion {
    fn drop(&mut self) {
        self.detach();
    }
}

impl FaultHook for LazyRegion {
    fn on_fault(&self, addr: usize, _access: Access) -> Resolution {
        if addr < self.base || addr >= self.base + self.len {
            return Resolution::NotOurs;
        }
        self.users.fetch_add(1, Ordering::SeqCst);
        let shared = self.shared.load(Ordering::SeqCst);
        let r = if shared.is_null() {
            // Released: the page is accessible; the fault predates that.
            Resolution::Handled
        } else {
            // SAFETY: not freed while `users` counts us in (see `detach`).
            let shared = unsafe { &*shared };
            // (The handler keeps the interrupted code's errno.)
            let ps = shared.page;
            let page_addr = addr & !(ps - 1);
            let page = (self.offset + (page_addr - self.base) as u64) / ps as u64;
            let end = (self.offset + self.len as u64) / ps as u64;
            // Racing faults may both read the same budget: no harm.
            let budget = self.neighbour_ranges.load(Ordering::Relaxed);
            let next = budget.saturating_mul(2).clamp(FIRST_INSTALL_RANGES, INSTALL_RANGES);
            self.neighbour_ranges.store(next, Ordering::Relaxed);
            match shared.fault_page(self.seg, page, end, self.id, page_addr, budget) {
                Ok(Brought::NotIndexed) => Resolution::NotOurs,
                Err(msg) => Resolution::Fatal(msg),
                // The mapping holds the page's private copy already.
                Ok(Brought::Installed) => Resolution::Handled,
                // SAFETY: the page lies inside the region's mapping (checked
                // above), which this hook's registration outlives; the
                // region's normal protection is read and write.
                Ok(Brought::Done) => match unsafe { fault::protect(page_addr, ps, true) } {
                    true => Resolution::Handled,
                    false => Resolution::Fatal("instant recovery could not make a page accessible"),
                },
            }
        };
        self.users.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

/// A region's pending pages made inaccessible and its fault hook. The hook
/// stays registered after [`Protected::release`] (a fault raised before the
/// release may reach the handler after it, and must find a hook that lets
/// it retry); dropping this unregisters it (with the region, or before the
/// region is tracked).
#[derive(Debug)]
pub(crate) struct Protected {
    base: usize,
    len: usize,
    hook: Arc<LazyRegion>,
    registration: Option<fault::Registration>,
}

impl std::fmt::Debug for LazyRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRegion").field("base", &self.base).field("len", &self.len).finish()
    }
}

impl Protected {
    /// Makes the whole region accessible again (every page must be `DONE`)
    /// and lets the hook go of the index. Idempotent.
    pub fn release(&self) -> bool {
        if self.hook.shared.load(Ordering::SeqCst).is_null() {
            return true;
        }
        // SAFETY: `[base, base + len)` is the region's mapping, alive while
        // the region is (the caller holds it); its normal protection is
        // read and write, and every page holds its final bytes.
        let ok = unsafe { fault::protect(self.base, self.len, true) };
        self.hook.detach();
        ok
    }
}

/// Registers the fault hook for the on-demand region `[base, base + len)`
/// (segment offset `offset`) of segment `s`, then makes its pending pages
/// inaccessible (`runs`: page runs from [`SegIndex::pending_runs`]).
/// On failure, the region is left accessible and unregistered; the caller
/// must then bring the segment up to date before publishing the region.
pub(crate) fn protect_region(
    shared: &Arc<Shared>,
    s: usize,
    base: usize,
    len: usize,
    offset: u64,
    runs: &[(u64, u64)],
) -> Result<Protected, String> {
    // Ids are never reused in practice (2^32 mappings) and never 0.
    static NEXT_ID: AtomicU32 = AtomicU32::new(1);
    let id = loop {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            break id;
        }
    };
    let hook = Arc::new(LazyRegion {
        base,
        len,
        offset,
        seg: s,
        id,
        shared: AtomicPtr::new(Arc::into_raw(shared.clone()).cast_mut()),
        users: AtomicUsize::new(0),
        neighbour_ranges: AtomicUsize::new(0),
    });
    let registration = fault::register(base, base + len, hook.clone()).map_err(|e| e.to_string())?;
    let mut p = Protected { base, len, hook, registration: Some(registration) };
    let ps = shared.page as u64;
    for &(first, n) in runs {
        let at = base + (first * ps - offset) as usize;
        // SAFETY: the run lies inside the region's mapping (the caller
        // takes the runs from the region's own page range); the mapping is
        // not published yet, so no reference into it exists.
        let rc = unsafe { libc::mprotect(at as *mut libc::c_void, (n * ps) as usize, libc::PROT_NONE) };
        if rc != 0 {
            let e = std::io::Error::last_os_error().to_string();
            // SAFETY: as above; back to the normal protection.
            unsafe { fault::protect(base, len, true) };
            p.registration.take();
            return Err(e);
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Per (segment, page), the page a builder's chain makes of a page of
    /// 0xEE bytes (through [`apply_chain`], as a fault would); `None` if a
    /// chain did not apply.
    fn pages(b: &mut Builder, log: &[u8]) -> Option<BTreeMap<(u32, u64), Vec<u8>>> {
        let heads: Vec<_> = b
            .segs
            .iter()
            .flat_map(|(id, chains)| chains.iter().filter(|(_, c)| c.head != NONE).map(move |(p, c)| (*id, p, c.head)))
            .collect();
        let mut out = BTreeMap::new();
        for (id, page, head) in heads {
            let mut buf = vec![0xEE; b.page as usize];
            let bytes = if b.mapped { Bytes::Ring(log) } else { Bytes::Copied(&b.data) };
            let arena = b.arena.clone();
            // SAFETY: (a test) the builder is done; no reference to a slot
            // lives.
            let piece = |i: u32| unsafe { *arena.ptr(i as usize) };
            if !apply_chain(head, piece, bytes, &mut buf) {
                return None;
            }
            out.insert((id, page), buf);
        }
        Some(out)
    }

    /// The group pieces in a builder's chains.
    fn groups(b: &Builder) -> usize {
        let mut n = 0;
        for (_, chains) in &b.segs {
            for (_, c) in chains.iter() {
                let mut i = c.head;
                while i != NONE {
                    // SAFETY: (a test) the builder is done; no reference
                    // to a slot lives.
                    let p = unsafe { *b.arena.ptr(i as usize) };
                    n += usize::from(p.data & GROUP != 0);
                    i = p.next;
                }
            }
        }
        n
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64)
        ))]
        /// An index built by parts a record at a time (cut at any
        /// transaction boundaries, the last part's unfinished transaction
        /// cut off, the parts joined in order; `record`, the path recovery
        /// takes, with its groups) brings every page to what one builder
        /// fed range by range (`range`, `range_mapped`: no groups) makes of
        /// the whole log, copied bytes or mapped.
        #[test]
        fn parts_joined_equal_one_builder(
            txs in prop::collection::vec(
                prop::collection::vec((1u32..3, 0u64..60_000, prop_oneof![0u32..64, 1u32..9_000]), 1..24),
                1..40,
            ),
            sorted in any::<bool>(),
            counter in any::<bool>(),
            last_committed in any::<bool>(),
            cuts in prop::collection::vec(0usize..40, 0..6),
            mapped in any::<bool>(),
            page in prop_oneof![Just(4096usize), Just(16384), Just(65536)],
            dense in prop_oneof![Just(0usize), 0usize..400],
            run_of in 1usize..8,
            filler in prop_oneof![
                3 => Just(0usize),
                1 => crate::log::format::RECORD_CAPACITY - 4000..crate::log::format::RECORD_CAPACITY - 16,
            ],
        ) {
            // Offsets scale with the page, so that every page size has
            // ranges across pages and many ranges in one page.
            let scale = page as u64 / 4096;
            // The log: each transaction's ranges (sorted by segment and
            // offset, as a coalesced batch has them, or not), then its
            // commit, as records.
            let mut log = Vec::new();
            let mut w = crate::log::format::FrameWriter::new(&mut log, 0, 1, 1 << 40);
            let mut tx_ends = Vec::new();
            for (i, tx) in txs.iter().enumerate() {
                let mut tx: Vec<(u32, u64, u32)> = tx.iter().map(|&(seg, off, len)| (seg, off * scale, len)).collect();
                // Many short ranges close together (runs of `run_of` in
                // one segment, then the other; some empty): many groups,
                // and more pieces than an arena run holds.
                tx.extend((0..dense).map(|j| {
                    (1 + (j / run_of % 2) as u32, (i as u64 * 7919 + j as u64 * 13) % 60_000 * scale, (j % 5) as u32)
                }));
                if counter {
                    // The same 8 bytes set by every transaction, alone in
                    // their page: one piece whose bytes each replaces (and
                    // an unfinished last one gives back).
                    tx.push((1, 62_000 * scale, 8));
                }
                if sorted {
                    tx.sort_by_key(|&(seg, off, _)| (seg, off));
                }
                if i == 0 && filler > 0 {
                    // A range that leaves the first record a few bytes:
                    // the ranges after it go on in the next record, one
                    // of them split across the two.
                    w.range(3, 0, &vec![0x5A; filler]);
                }
                for (k, &(seg, off, len)) in tx.iter().enumerate() {
                    let data: Vec<u8> = (0..len).map(|j| (i * 31 + k * 7 + j as usize) as u8).collect();
                    w.range(seg, off, &data);
                }
                w.commit(0, 0, 0);
                tx_ends.push(w.lsn());
            }
            let mut records = Vec::new();
            let (mut at, mut ranges) = (0usize, Vec::new());
            while at < log.len() {
                let info = crate::log::format::decode_record(&log[at..], at as u64, 1, &mut ranges).expect("a record");
                let tx = tx_ends.partition_point(|&e| e <= at as u64);
                records.push((at, info.len, ranges.clone(), info.commit.is_some(), tx));
                at += info.len;
            }
            let committed = |tx: usize| tx + 1 < txs.len() || last_committed;
            let mut whole = Builder::new(page, 1 << 24, mapped);
            for (at, len, ranges, commit, tx) in &records {
                for r in ranges {
                    let lsn = (at + r.data_at as usize) as u64;
                    if mapped {
                        whole.range_mapped(r.segment, r.offset, r.len, lsn);
                    } else {
                        whole.range(r.segment, r.offset, &log[lsn as usize..][..r.len as usize], lsn);
                    }
                }
                let _ = len;
                if *commit && committed(*tx) {
                    whole.commit();
                }
            }
            whole.cut_unfinished();
            let mut root = Builder::new(page, 1 << 24, mapped);
            let mut part = root.part();
            let mut parts = Vec::new();
            let mut last_tx = usize::MAX;
            for (at, len, ranges, commit, tx) in &records {
                if *tx != last_tx && cuts.contains(tx) {
                    parts.push(std::mem::replace(&mut part, root.part()));
                }
                last_tx = *tx;
                part.record(*at as u64, (!mapped).then_some(&log[*at..at + len]), ranges);
                if *commit && committed(*tx) {
                    part.commit();
                }
            }
            part.cut_unfinished();
            parts.push(part);
            for p in parts {
                root.append(p);
            }
            prop_assert!(!whole.overflow && !root.overflow);
            // Runs of short ranges of one segment in one page, the first
            // transaction's kept: groups.
            prop_assert!(dense < 50 || run_of < 3 || !committed(0) || groups(&root) > 0);
            let a = pages(&mut whole, &log);
            prop_assert!(a.is_some());
            prop_assert_eq!(a, pages(&mut root, &log));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
        ))]
        /// Applying a chain runs in the fault handler, where a panic is
        /// fatal: any pieces over any bytes (the log changed under
        /// recovery), mapped or copied, into a page of any length, return
        /// true or false and never panic (debug builds check overflow too).
        #[test]
        fn apply_chain_never_panics_on_any_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            continuation in any::<bool>(),
            pieces in prop::collection::vec(
                (prop_oneof![any::<u64>(), 0u64..400, (0u64..400).prop_map(|d| d | GROUP)], any::<u16>(), prop_oneof![any::<u16>(), 0u16..8]),
                1..6,
            ),
            page_len in prop_oneof![Just(4096usize), 0usize..4097],
            mapped in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if continuation {
                // Long varints, all the way to ten bytes and past.
                for (i, b) in bytes.iter_mut().enumerate() {
                    if i % 11 != 10 {
                        *b |= 0x80;
                    }
                }
            }
            let n = pieces.len() as u32;
            let pieces: Vec<Piece> = pieces
                .iter()
                .enumerate()
                .map(|(i, &(data, at, len_m1))| {
                    let next = if i as u32 + 1 == n { NONE } else { i as u32 + 1 };
                    Piece { data, at: at % 4096, len_m1, next }
                })
                .collect();
            let src = if mapped { Bytes::Ring(&bytes) } else { Bytes::Copied(&bytes) };
            let mut page = vec![0u8; page_len];
            let ok = apply_chain(0, |i| pieces[i as usize], src, &mut page);
            if pieces.iter().all(|p| p.data & GROUP == 0) {
                // Plain pieces apply exactly when each lies in the page
                // and its bytes are there, each over the ones before it.
                let mut want = vec![0u8; page_len];
                let fits = pieces.iter().all(|p| {
                    let (at, len) = (usize::from(p.at), usize::from(p.len_m1) + 1);
                    let Some(dst) = want.get_mut(at..at + len) else { return false };
                    let from = match src {
                        Bytes::Ring(_) if len > bytes.len() => return false,
                        Bytes::Ring(_) => (p.data % bytes.len() as u64) as usize,
                        Bytes::Copied(_) => match usize::try_from(p.data) {
                            Ok(d) if d.checked_add(len).is_some_and(|e| e <= bytes.len()) => d,
                            _ => return false,
                        },
                    };
                    for (k, b) in dst.iter_mut().enumerate() {
                        *b = bytes[(from + k) % bytes.len()];
                    }
                    true
                });
                prop_assert_eq!(ok, fits);
                if ok {
                    prop_assert_eq!(page, want);
                }
            }
        }
    }

    /// Group pieces whose items no longer read (the log changed after the
    /// scan) make the page fail instead of showing wrong bytes.
    #[test]
    fn a_group_over_changed_bytes_fails() {
        let mut log = Vec::new();
        let mut w = crate::log::format::FrameWriter::new(&mut log, 0, 1, 1 << 40);
        for k in 0..8u64 {
            w.range(1, 100 + k * 16, &[k as u8; 8]);
        }
        w.commit(0, 0, 0);
        let mut ranges = Vec::new();
        crate::log::format::decode_record(&log, 0, 1, &mut ranges).expect("a record");
        let mut b = Builder::new(4096, 1 << 20, true);
        b.record(0, None, &ranges);
        b.commit();
        let (pieces, chain) = (b.filled, b.segs[0].1.get(0).expect("page 0").head);
        assert_eq!(pieces, 1, "eight ranges in one page make one group");
        let arena = b.arena.clone();
        // SAFETY: (a test) the builder is done; no reference to a slot lives.
        let piece = |i: u32| unsafe { *arena.ptr(i as usize) };
        let mut page = vec![0u8; 4096];
        assert!(apply_chain(chain, piece, Bytes::Ring(&log), &mut page));
        assert_eq!(&page[100 + 7 * 16..][..8], &[7; 8]);
        // An item's length now reaches past the page: refused, at every
        // byte of the items that makes one unreadable or out of the page.
        let first = ranges[0].item_at as usize;
        let mut bad = log.clone();
        bad[first] = 0xff;
        bad[first + 1] = 0xff;
        assert!(!apply_chain(chain, piece, Bytes::Ring(&bad), &mut vec![0u8; 4096]));
        // Fewer bytes than the items need (the same positions, unwrapped).
        assert!(!apply_chain(chain, piece, Bytes::Copied(&log[..ranges[3].data_at as usize]), &mut vec![0u8; 4096]));
        // The page's end (a segment's last page is shorter).
        assert!(!apply_chain(chain, piece, Bytes::Ring(&log), &mut [0u8; 150]));
    }

    /// A group whose items wrap around the end of the ring reads as one
    /// that does not, at every point of the wrap.
    #[test]
    fn a_group_across_the_ring_end_reads_the_same() {
        let area_len = 4096u64;
        for cut in 1..120u64 {
            let lsn = area_len * 3 - cut;
            let mut out = Vec::new();
            let mut w = crate::log::format::FrameWriter::new(&mut out, lsn, 1, area_len);
            for k in 0..6u64 {
                w.range(1, 8192 + 40 + k * 24, &[k as u8 + 1; 12]);
            }
            w.commit(0, 0, 0);
            let mut ranges = Vec::new();
            crate::log::format::decode_record(&out, lsn, 1, &mut ranges).expect("a record");
            let mut area = vec![0u8; area_len as usize];
            for (i, &b) in out.iter().enumerate() {
                area[((lsn + i as u64) % area_len) as usize] = b;
            }
            let mut b = Builder::new(4096, 1 << 20, true);
            b.record(lsn, None, &ranges);
            b.commit();
            assert_eq!(b.filled, 1, "one group");
            let head = b.segs[0].1.get(2).expect("page 2").head;
            let arena = b.arena.clone();
            // SAFETY: (a test) the builder is done; no reference to a slot
            // lives.
            let piece = |i: u32| unsafe { *arena.ptr(i as usize) };
            let mut page = vec![0u8; 4096];
            assert!(apply_chain(head, piece, Bytes::Ring(&area), &mut page), "cut {cut}");
            for k in 0..6usize {
                assert_eq!(&page[40 + k * 24..][..12], &[k as u8 + 1; 12], "cut {cut}");
            }
        }
    }

    /// An index whose pieces would not fit the arena says so (recovery
    /// then runs the usual way) instead of failing.
    #[test]
    fn a_full_arena_overflows_the_index() {
        let mut b = Builder::new(4096, RUN as u64, true);
        for i in 0..=RUN as u64 {
            b.range_mapped(1, i * 8192, 8, i);
        }
        assert!(b.overflow);
    }
}
