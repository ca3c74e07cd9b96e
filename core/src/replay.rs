//! Log replay: applies the complete transactions of a log range to their
//! segments (recovery at open, and truncation by replay).
//!
//! The scan (reading, CRC checks, decoding) collects range records into
//! chunks of about [`CHUNK_BYTES`] of data. The applier copies each range,
//! in log order, into an in-memory image of the segment pages it touches
//! ([`PageCache`]): a page is read from the segment once (with its
//! neighbours in a block of [`BLOCK_PAGES`]), or not at all if a range
//! covers it whole, takes every later range in place, and is written back
//! once, in runs of neighbouring pages, at the end of the replay (or when
//! the cache reaches [`CACHE_BYTES`]). So a byte changed many times is
//! written once, and a page changed by many small ranges costs one read
//! and one write, however long the log. A log range of more than one
//! chunk is replayed as a pipeline: a second thread applies chunk *n*
//! while the scan reads chunk *n + 1*, in order. A range of one chunk
//! (every small replay) is applied on the calling thread, in program
//! order.
//!
//! Why whole pages may be written: replay is the only writer of a segment
//! while it runs (the caller holds the truncation lock, or is recovery),
//! and a segment only ever holds committed bytes, so the bytes of a page
//! that no range changed are committed bytes read back, and writing them
//! again changes nothing even if the write is torn or lost. Only pages a
//! range touched are written.

use crate::coalesce::Piece;
use crate::error::{Error, LogError, Result};
use crate::log::format::{RangeRef, RecordInfo};
use crate::log::{self, Ring, ScanEnd, TxSoFar};
use crate::pagemap::PageMap;
use crate::storage::Storage;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

/// Data bytes per chunk.
pub(crate) const CHUNK_BYTES: usize = 16 << 20;
/// Chunks in flight at most: one filling, one queued, one being applied.
const CHUNKS: usize = 3;
/// Segment page size of the replay's cache (the page cache's unit).
const PAGE: usize = 4096;
/// Pages read at once when a range needs a page not in the cache.
const BLOCK_PAGES: u64 = 16;
/// Bytes of pages the cache holds before it writes them back and starts
/// afresh.
const CACHE_BYTES: usize = 256 << 20;
/// Bytes written with one `write_at` at most.
const MAX_WRITE: usize = 1 << 20;
/// How many ranges ahead the applier prefetches the page bytes a range
/// goes to.
const PREFETCH_AHEAD: usize = 8;
/// Batches of fewer puts than this are applied in log order, unsorted.
const SORT_MIN: usize = 4096;

/// A replay's sizes (tests make them small, to reach every path).
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// Data bytes per chunk.
    chunk: usize,
    /// Bytes of pages the cache holds before it writes them back.
    cache: usize,
    /// Batches of fewer puts than this are applied in log order.
    sort_min: usize,
}

impl Sizes {
    const DEFAULT: Sizes = Sizes { chunk: CHUNK_BYTES, cache: CACHE_BYTES, sort_min: SORT_MIN };
}

/// What a replay did.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// Where and why the scan stopped.
    pub end: ScanEnd,
    /// Log bytes of the complete transactions replayed.
    pub log_bytes: u64,
    /// Segment bytes written.
    pub segment_bytes: u64,
}

/// Range records of complete transactions, in log order.
#[derive(Debug, Default)]
struct Chunk {
    pieces: Vec<Piece>,
    data: Vec<u8>,
}

impl Chunk {
    /// An empty chunk with room for `chunk_bytes` of data (and the record
    /// that passes it) and the pieces they usually make, so that filling
    /// it neither grows nor moves it.
    fn with_room(chunk_bytes: usize) -> Chunk {
        if chunk_bytes > 256 << 20 {
            return Chunk::default();
        }
        Chunk {
            pieces: Vec::with_capacity(chunk_bytes / 16),
            data: Vec::with_capacity(chunk_bytes + crate::log::format::MAX_RECORD),
        }
    }

    fn clear(&mut self) {
        self.pieces.clear();
        self.data.clear();
    }
}

/// One segment's pages in the cache: page number to slot + 1 (0: not
/// cached).
#[derive(Default)]
struct PageTable(PageMap<u32>);

impl PageTable {
    #[inline]
    fn get(&self, page: u64) -> Option<usize> {
        let slot = *self.0.get(page)?;
        (slot != 0).then(|| slot as usize - 1)
    }

    fn set(&mut self, page: u64, slot: usize) {
        *self.0.get_or_insert_with(page, || 0) = slot as u32 + 1;
    }
}

/// Segment pages as replay leaves them; see the module docs. Segments are
/// named by their index in the applier's device list.
struct PageCache {
    /// Page images, one slot after another.
    arena: Vec<u8>,
    /// Per slot: device index, page number, changed by a range.
    slots: Vec<(u32, u64, bool)>,
    /// Page tables by device index.
    tables: Vec<PageTable>,
    /// Slots kept at most.
    limit: usize,
    /// Scratch for block reads and write-back runs.
    scratch: Vec<u8>,
}

/// A segment as the applier holds it.
struct Device {
    dev: Arc<dyn Storage>,
    name: PathBuf,
    len: u64,
}

/// `dst.copy_from_slice(src)` for the short ranges replay mostly sees,
/// without a call to `memcpy` (fixed-size copies compile to a few moves;
/// the two halves may overlap).
#[inline]
fn copy_small(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    match n {
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        17..=32 => {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        }
        33..=64 => {
            dst[..32].copy_from_slice(&src[..32]);
            dst[n - 32..].copy_from_slice(&src[n - 32..]);
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

impl PageCache {
    fn new(limit_bytes: usize) -> PageCache {
        PageCache {
            arena: Vec::new(),
            slots: Vec::new(),
            tables: Vec::new(),
            limit: (limit_bytes.min(u32::MAX as usize / 2) / PAGE).max(BLOCK_PAGES as usize),
            scratch: Vec::new(),
        }
    }

    /// A new slot for page `page` of `seg` (contents to be filled in).
    fn alloc(&mut self, seg: u32, page: u64) -> usize {
        let slot = self.slots.len();
        self.slots.push((seg, page, false));
        self.arena.resize(self.arena.len() + PAGE, 0);
        self.table(seg).set(page, slot);
        slot
    }

    fn table(&mut self, seg: u32) -> &mut PageTable {
        let i = seg as usize;
        if self.tables.len() <= i {
            self.tables.resize_with(i + 1, PageTable::default);
        }
        &mut self.tables[i]
    }

    #[inline]
    fn lookup(&self, seg: u32, page: u64) -> Option<usize> {
        self.tables.get(seg as usize)?.get(page)
    }

    /// Reads the block holding `page` and caches its pages not cached yet.
    fn load_block(&mut self, seg: u32, d: &Device, page: u64) -> Result<()> {
        let first = page / BLOCK_PAGES * BLOCK_PAGES;
        let start = first * PAGE as u64;
        let end = ((first + BLOCK_PAGES) * PAGE as u64).min(d.len);
        let n = (end - start) as usize;
        self.scratch.clear();
        self.scratch.resize(n.div_ceil(PAGE) * PAGE, 0);
        d.dev.read_at(&mut self.scratch[..n], start).map_err(|e| Error::io("reading segment", &d.name, e))?;
        for (i, p) in (first..).take(n.div_ceil(PAGE)).enumerate() {
            if self.lookup(seg, p).is_none() {
                let slot = self.slots.len();
                self.slots.push((seg, p, false));
                self.arena.extend_from_slice(&self.scratch[i * PAGE..(i + 1) * PAGE]);
                self.table(seg).set(p, slot);
            }
        }
        Ok(())
    }

    /// Writes every changed page back, in runs of neighbouring pages, and
    /// empties the cache; returns the bytes written.
    fn write_back(&mut self, devices: &[Device]) -> Result<u64> {
        let mut order: Vec<usize> = (0..self.slots.len()).filter(|&s| self.slots[s].2).collect();
        order.sort_unstable_by_key(|&s| (self.slots[s].0, self.slots[s].1));
        let mut written = 0u64;
        let mut i = 0;
        while i < order.len() {
            let (seg, first, _) = self.slots[order[i]];
            let Some(Device { dev, name, len, .. }) = devices.get(seg as usize) else {
                return Err(Error::corrupted(format!("log replay (segment {seg} unresolved)"), "replay"));
            };
            let len = *len;
            let mut j = i;
            self.scratch.clear();
            while j < order.len() {
                let (s, p, _) = self.slots[order[j]];
                if s != seg || p != first + (j - i) as u64 || self.scratch.len() >= MAX_WRITE {
                    break;
                }
                let slot = order[j];
                self.scratch.extend_from_slice(&self.arena[slot * PAGE..(slot + 1) * PAGE]);
                j += 1;
            }
            let start = first * PAGE as u64;
            let n = (self.scratch.len() as u64).min(len.saturating_sub(start)) as usize;
            dev.write_at(&self.scratch[..n], start).map_err(|e| Error::io("writing segment", name, e))?;
            written += n as u64;
            i = j;
        }
        self.clear();
        Ok(written)
    }

    /// Drops every page.
    fn clear(&mut self) {
        self.arena.clear();
        self.slots.clear();
        self.tables.clear();
    }
}

/// The segment side: opens devices as records name them and applies each
/// chunk's ranges to the page cache, in order.
struct SegmentWriter<R> {
    resolve: R,
    /// Open devices; the cache names them by index here.
    devices: Vec<Device>,
    /// Segment id to device index.
    index: HashMap<u32, u32>,
    cache: PageCache,
    segment_bytes: u64,
    /// Staging ([`stage`]): nothing may be written; a range that would
    /// need a write-back, or any error, gives the staging up (`gave_up`)
    /// and the caller replays again.
    staging: bool,
    gave_up: bool,
    /// A batch's puts in log order, and sorted by page (scratch).
    puts: Vec<Put>,
    sorted: Vec<Put>,
    /// Per slot: puts counted, then where they go (scratch).
    counts: Vec<u32>,
    /// Batches of fewer puts than this are applied in log order.
    sort_min: usize,
}

/// A range's bytes for one page: `len` bytes from `src` in the chunk's
/// data to byte `dst` of the page image (the page is `dst / PAGE`'s slot).
#[derive(Clone, Copy, Debug)]
struct Put {
    src: usize,
    dst: u32,
    len: u32,
}

impl<R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)>> SegmentWriter<R> {
    fn new(resolve: R, sizes: Sizes, staging: bool) -> Self {
        SegmentWriter {
            resolve,
            devices: Vec::new(),
            index: HashMap::new(),
            cache: PageCache::new(sizes.cache),
            segment_bytes: 0,
            staging,
            gave_up: false,
            puts: Vec::new(),
            sorted: Vec::new(),
            counts: Vec::new(),
            sort_min: sizes.sort_min,
        }
    }

    /// [`Self::apply_chunk`], or, when staging, giving up instead of
    /// failing or writing.
    fn apply(&mut self, chunk: &Chunk) -> Result<()> {
        if !self.staging {
            return self.apply_chunk(chunk);
        }
        if !self.gave_up && self.apply_chunk(chunk).is_err() {
            self.gave_up = true;
            self.cache.clear();
        }
        Ok(())
    }

    fn device(&mut self, id: u32) -> Result<u32> {
        if let Some(&i) = self.index.get(&id) {
            return Ok(i);
        }
        let (dev, name) = (self.resolve)(id)?;
        let len = dev.len().map_err(|e| Error::io("sizing segment", &name, e))?;
        let i = self.devices.len() as u32;
        self.devices.push(Device { dev, name, len });
        self.index.insert(id, i);
        Ok(i)
    }

    /// Applies a chunk's ranges, in batches that fit the cache: each batch
    /// is first resolved to page slots ([`Self::resolve_puts`]), then
    /// applied page by page ([`Self::apply_puts`]).
    fn apply_chunk(&mut self, chunk: &Chunk) -> Result<()> {
        let mut next = 0;
        loop {
            next = self.resolve_puts(chunk, next)?;
            self.apply_puts(&chunk.data);
            if next == chunk.pieces.len() {
                return Ok(());
            }
            // The cache is full: write it back and start afresh (never
            // when staging: resolving failed instead).
            self.flush()?;
        }
    }

    /// Turns `chunk.pieces[from..]`, split at page ends, into puts
    /// (`self.puts`), loading or allocating the pages they go to, until the
    /// cache is full; returns the index of the first piece not taken.
    fn resolve_puts(&mut self, chunk: &Chunk, from: usize) -> Result<usize> {
        self.puts.clear();
        // Records name one segment at a time, usually: look it up on change.
        let mut last: Option<(u32, u32)> = None;
        for (i, p) in chunk.pieces.iter().enumerate().skip(from) {
            let dev = match last {
                Some((id, i)) if id == p.segment => i,
                _ => {
                    let i = self.device(p.segment)?;
                    last = Some((p.segment, i));
                    i
                }
            };
            let d = &self.devices[dev as usize];
            let (off, len) = (p.offset, p.len as u64);
            if off.checked_add(len).is_none_or(|end| end > d.len) {
                // The log was checked before: the segment shrank since its
                // records were written (truncated by someone else).
                return Err(LogError::SegmentTooShort {
                    path: d.name.clone(),
                    needed: off.saturating_add(len),
                    len: d.len,
                }
                .into());
            }
            // New slots a range may take: a block for each partial page
            // at its ends, one slot per whole page between them.
            let pages = (off % PAGE as u64 + len).div_ceil(PAGE as u64) as usize;
            if self.cache.slots.len() + pages + 2 * BLOCK_PAGES as usize > self.cache.limit {
                if self.staging {
                    return Err(Error::corrupted("log replay (staged pages over the limit)", "replay"));
                }
                if !self.cache.slots.is_empty() {
                    return Ok(i);
                }
                // An empty cache takes any one range.
            }
            let mut done = 0usize;
            while done < p.len {
                let at = off + done as u64;
                let page = at / PAGE as u64;
                let in_page = (at % PAGE as u64) as usize;
                let n = (PAGE - in_page).min(p.len - done);
                let slot = match self.cache.lookup(dev, page) {
                    Some(slot) => slot,
                    None => {
                        let d = &self.devices[dev as usize];
                        if in_page == 0 && (n == PAGE || at + n as u64 == d.len) {
                            // Every byte of the page (up to the segment's
                            // end) is the range's: nothing to read.
                            self.cache.alloc(dev, page)
                        } else {
                            self.cache.load_block(dev, d, page)?;
                            self.cache.lookup(dev, page).ok_or_else(|| {
                                Error::corrupted(format!("log replay (page {page} of segment id {dev})"), "replay")
                            })?
                        }
                    }
                };
                self.puts.push(Put { src: p.data_at + done, dst: (slot * PAGE + in_page) as u32, len: n as u32 });
                done += n;
            }
        }
        Ok(chunk.pieces.len())
    }

    /// Copies `self.puts` into the page image. Many puts: sorted by page
    /// first (a stable counting sort on the slot, so that a page's puts
    /// keep their log order), then applied page after page, each page
    /// staying in the CPU cache while its puts land, instead of a cache
    /// and TLB miss per put; few: in log order.
    fn apply_puts(&mut self, data: &[u8]) {
        let slots = self.cache.slots.len();
        let arena = &mut self.cache.arena;
        if self.puts.len() < self.sort_min || self.puts.len() < slots / 4 {
            for (k, put) in self.puts.iter().enumerate() {
                if let Some(ahead) = self.puts.get(k + PREFETCH_AHEAD) {
                    crate::mem::prefetch(arena, ahead.dst as usize);
                }
                let (src, dst, n) = (put.src, put.dst as usize, put.len as usize);
                copy_small(&mut arena[dst..dst + n], &data[src..src + n]);
                self.cache.slots[dst / PAGE].2 = true;
            }
            return;
        }
        let counts = &mut self.counts;
        counts.clear();
        counts.resize(slots + 1, 0);
        for put in &self.puts {
            counts[put.dst as usize / PAGE + 1] += 1;
        }
        // counts[s + 1] holds slot s's count; summed up, counts[s] is where
        // slot s's puts start in the sorted order.
        for s in 1..counts.len() {
            if counts[s] != 0 {
                self.cache.slots[s - 1].2 = true;
            }
            counts[s] += counts[s - 1];
        }
        let sorted = &mut self.sorted;
        sorted.clear();
        sorted.resize(self.puts.len(), Put { src: 0, dst: 0, len: 0 });
        for put in &self.puts {
            let at = &mut counts[put.dst as usize / PAGE];
            sorted[*at as usize] = *put;
            *at += 1;
        }
        for (k, put) in sorted.iter().enumerate() {
            // The page is at hand; the bytes come from anywhere in the
            // chunk: ask for a later put's bytes, and its page, now.
            if let Some(ahead) = sorted.get(k + PREFETCH_AHEAD) {
                crate::mem::prefetch(data, ahead.src);
            }
            if let Some(ahead) = sorted.get(k + 2 * PREFETCH_AHEAD) {
                crate::mem::prefetch(arena, ahead.dst as usize);
            }
            let (src, dst, n) = (put.src, put.dst as usize, put.len as usize);
            copy_small(&mut arena[dst..dst + n], &data[src..src + n]);
        }
    }

    /// Writes the cached pages back.
    fn flush(&mut self) -> Result<()> {
        self.segment_bytes += self.cache.write_back(&self.devices)?;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        for d in &self.devices {
            d.dev.sync().map_err(|e| Error::io("syncing segment", &d.name, e))?;
        }
        Ok(())
    }
}

/// A chunk handed to the applying thread, and chunks it hands back.
struct Pipe<'s, R> {
    to_worker: mpsc::SyncSender<Chunk>,
    returned: mpsc::Receiver<Chunk>,
    worker: std::thread::ScopedJoinHandle<'s, Result<SegmentWriter<R>>>,
}

/// Replays the complete transactions in `[start, limit)` of `ring` onto the
/// segments `resolve` opens by id, then syncs every segment written. The
/// bytes of an unfinished tail are not applied. Idempotent: running it
/// again over the same range writes the same bytes.
pub(crate) fn replay<R>(ring: &Ring, start: u64, limit: u64, epoch: u64, resolve: R) -> Result<Replayed>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    replay_with_progress(ring, start, limit, epoch, resolve, &|_| {})
}

/// [`replay`], calling `progress` with the log bytes read so far (about
/// every chunk, and at the end).
pub(crate) fn replay_with_progress<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    progress: &dyn Fn(u64),
) -> Result<Replayed>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    replay_in_chunks(ring, start, limit, epoch, resolve, Sizes::DEFAULT, progress)
}

fn replay_in_chunks<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    sizes: Sizes,
    progress: &dyn Fn(u64),
) -> Result<Replayed>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    let writer = SegmentWriter::new(resolve, sizes, false);
    let (end, log_bytes, mut writer) =
        scan_and_apply(ring, start, limit, epoch, writer, sizes.chunk, progress, &mut |_, _, _, _| {})?;
    writer.flush()?;
    writer.sync()?;
    Ok(Replayed { end, log_bytes, segment_bytes: writer.segment_bytes })
}

/// Called for every valid record a scan reads: its position, what it
/// holds, its ranges, and its transaction so far.
pub(crate) type OnRecord<'a> = dyn FnMut(u64, &RecordInfo, &[RangeRef], &TxSoFar) + 'a;

/// Transactions scanned and applied to the page image of their segments,
/// nothing written yet ([`stage`]).
pub(crate) struct Staged<R> {
    writer: SegmentWriter<R>,
    /// Where and why the scan stopped.
    pub end: ScanEnd,
    /// Log bytes of the complete transactions.
    pub log_bytes: u64,
}

impl<R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)>> Staged<R> {
    /// Whether every complete transaction is in the page image (else the
    /// caller must replay again: the pages did not fit in memory, or
    /// applying failed, for a reason a replay will report).
    pub fn complete(&self) -> bool {
        !self.writer.gave_up
    }

    /// Writes the page image to the segments and syncs them; returns the
    /// segment bytes written.
    pub fn write(mut self) -> Result<u64> {
        self.writer.flush()?;
        self.writer.sync()?;
        Ok(self.writer.segment_bytes)
    }
}

/// The verifying pass of recovery and the replay in one scan: scans
/// `[start, limit)` as [`replay`] does, calling `on_record` for every valid
/// record, and applies the complete transactions to an in-memory image of
/// their segments' pages on a second thread, reading segments but writing
/// nothing. Once the caller has checked what the scan found, [`Staged::write`]
/// writes the image; if it is not [`Staged::complete`], the caller replays
/// with [`replay`] instead.
pub(crate) fn stage<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    on_record: &mut OnRecord<'_>,
) -> Result<Staged<R>>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    stage_in(ring, start, limit, epoch, resolve, Sizes::DEFAULT, on_record)
}

fn stage_in<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    sizes: Sizes,
    on_record: &mut OnRecord<'_>,
) -> Result<Staged<R>>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    let writer = SegmentWriter::new(resolve, sizes, true);
    let (end, log_bytes, writer) = scan_and_apply(ring, start, limit, epoch, writer, sizes.chunk, &|_| {}, on_record)?;
    Ok(Staged { writer, end, log_bytes })
}

/// The scan behind [`replay`] and [`stage`]: returns where it ended, the
/// log bytes of the complete transactions, and the applier.
#[allow(clippy::too_many_arguments)]
fn scan_and_apply<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    writer: SegmentWriter<R>,
    chunk_bytes: usize,
    progress: &dyn Fn(u64),
    on_record: &mut OnRecord<'_>,
) -> Result<(ScanEnd, u64, SegmentWriter<R>)>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    std::thread::scope(|scope| {
        struct Scan<'s, R> {
            /// Complete transactions not yet applied.
            chunk: Chunk,
            /// Pieces of `chunk` of complete transactions: those after
            /// them (and their bytes) are the transaction being read.
            complete: usize,
            writer: Option<SegmentWriter<R>>,
            pipe: Option<Pipe<'s, R>>,
            log_bytes: u64,
            /// Chunks made so far (at most [`CHUNKS`]; then they are reused).
            made: usize,
        }
        let state = RefCell::new(Scan {
            made: 1,
            chunk: Chunk::with_room(chunk_bytes),
            complete: 0,
            writer: Some(writer),
            pipe: None,
            log_bytes: 0,
        });
        // The record area mapped where the log has a descriptor: the scan
        // then reads records in place instead of copying the log into a
        // buffer first.
        let view = ring.view();
        let area = view.as_ref().map(crate::mem::FileView::bytes);
        let scanned = log::scan_records_in(ring, area, start, limit, epoch, |lsn, rec, info, ranges, tx| {
            on_record(lsn, info, ranges, tx);
            let me = &mut *state.borrow_mut();
            if let (Some(first), Some(last)) = (ranges.first(), ranges.last()) {
                // One copy per record: its ranges' data with the range
                // headers between them (skipped by the pieces).
                let (from, to) = (first.data_at as usize, (last.data_at + last.len) as usize);
                let base = me.chunk.data.len();
                me.chunk.data.extend_from_slice(&rec[from..to]);
                me.chunk.pieces.extend(ranges.iter().map(|r| Piece {
                    segment: r.segment,
                    offset: r.offset,
                    len: r.len as usize,
                    data_at: base + r.data_at as usize - from,
                }));
            }
            if info.commit.is_none() {
                return Ok(());
            }
            let e = lsn + info.len as u64;
            me.log_bytes += e - tx.start;
            me.complete = me.chunk.pieces.len();
            if me.chunk.data.len() < chunk_bytes {
                return Ok(());
            }
            progress(e - start);
            // A full chunk (and no unfinished bytes after it): to the
            // applying thread, started with the first one.
            if me.pipe.is_none() {
                let (to_worker, from_scan) = mpsc::sync_channel::<Chunk>(1);
                let (back, returned) = mpsc::channel::<Chunk>();
                let mut writer = me.writer.take().expect("the writer is here until the pipe starts");
                let worker = scope.spawn(move || {
                    for mut chunk in from_scan {
                        writer.apply(&chunk)?;
                        chunk.clear();
                        let _ = back.send(chunk);
                    }
                    Ok(writer)
                });
                me.pipe = Some(Pipe { to_worker, returned, worker });
            }
            let pipe = me.pipe.as_ref().expect("started above");
            // One chunk filling, one queued, one being applied: then the
            // scan waits for one back rather than allocate.
            let spare = match pipe.returned.try_recv() {
                Ok(chunk) => chunk,
                Err(_) if me.made < CHUNKS => {
                    me.made += 1;
                    Chunk::with_room(chunk_bytes)
                }
                Err(_) => {
                    pipe.returned.recv().map_err(|_| Error::corrupted("log replay (applier stopped)", "replay"))?
                }
            };
            let full = std::mem::replace(&mut me.chunk, spare);
            me.complete = 0;
            // A closed pipe means the applier failed: its error is
            // reported when it is joined.
            pipe.to_worker.send(full).map_err(|_| Error::corrupted("log replay (applier stopped)", "replay"))
        });
        let Scan { mut chunk, complete, writer, pipe, log_bytes, .. } = state.into_inner();
        // The unfinished tail's pieces are the last ones: not applied.
        chunk.pieces.truncate(complete);
        let writer = match pipe {
            None => {
                let mut writer = writer.expect("no pipe: the writer is here");
                if scanned.is_ok() {
                    writer.apply(&chunk)?;
                }
                writer
            }
            Some(Pipe { to_worker, returned, worker }) => {
                if scanned.is_ok() {
                    // The last chunk; if the applier stopped, join says why.
                    let _ = to_worker.send(std::mem::take(&mut chunk));
                }
                drop(to_worker);
                drop(returned);
                let joined =
                    worker.join().unwrap_or_else(|_| Err(Error::corrupted("log replay (applier panicked)", "replay")));
                // An applier error explains a closed pipe; otherwise the
                // scan's own error stands.
                joined?
            }
        };
        let end = scanned?;
        Ok((end, log_bytes, writer))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogDevice;
    use crate::testing::SimDisk;
    use crate::{create_log_with, CommitMode, MapSpec, Options, RestoreMode, Rvm};
    use proptest::prelude::*;

    /// Cases per property: `default` unless `PROPTEST_CASES` says otherwise.
    fn cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    }
    use std::path::Path;

    /// One transaction: ranges (offset, length, fill byte) of a 16-page
    /// segment whose length is not a multiple of the cache's page.
    type Tx = Vec<(usize, usize, u8)>;

    const SEG_LEN: usize = 16 * 4096 + 4096;

    /// Commits `txs` (coalescing on or off, no truncation), then replays
    /// the log with every (chunk, cache) size given, and returns the
    /// reference image (the committed transactions applied in order) and
    /// each replay's (transactions, log bytes, segment image).
    /// A replay's transactions, log bytes and resulting segment image.
    type Run = (u64, u64, Vec<u8>);

    fn sz(chunk: usize, cache: usize) -> Sizes {
        Sizes { chunk, cache, sort_min: 0 }
    }

    fn replays(txs: &[Tx], coalesce: bool, sizes: &[Sizes]) -> (Vec<u8>, Vec<Run>) {
        let disk = SimDisk::new();
        let vfs: Arc<dyn crate::Vfs> = Arc::new(disk.clone());
        let (log, seg) = (Path::new("/replay.log"), Path::new("/replay.seg"));
        create_log_with(vfs.as_ref(), log, 4 << 20).unwrap();
        let ps = crate::page_size();
        let map_len = SEG_LEN / ps * ps;
        let mut want = vec![0u8; SEG_LEN];
        {
            let opts = Options { coalesce, truncate_threshold: None, write_behind: false, ..Options::default() };
            let rvm = Rvm::open_with(vfs.clone(), log, opts).unwrap();
            let s = rvm.create_segment(seg, SEG_LEN as u64).unwrap();
            let region = rvm.map(&s, MapSpec::new(0, map_len)).unwrap();
            for tx in txs {
                let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
                for &(off, n, fill) in tx {
                    let off = off % map_len;
                    let n = n.min(map_len - off);
                    let bytes: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
                    // SAFETY: single-threaded; inside the region.
                    unsafe { t.modify_bytes(region.addr() + off, &bytes).unwrap() };
                    want[off..off + n].copy_from_slice(&bytes);
                }
                t.commit(CommitMode::NoFlush).unwrap();
            }
        } // flushed, not truncated
        let (log_img, seg_img) = (disk.durable_image(log).unwrap(), disk.durable_image(seg).unwrap());
        let runs = sizes
            .iter()
            .map(|&sizes| {
                disk.set_durable_image(log, log_img.clone());
                disk.set_durable_image(seg, seg_img.clone());
                let LogDevice { ring, status, .. } = LogDevice::open(vfs.as_ref(), log).unwrap();
                let name = status.segments[0].name.clone();
                let r = replay_in_chunks(
                    &ring,
                    status.head,
                    u64::MAX,
                    status.epoch,
                    |_| Ok((vfs.open(&name, crate::OpenMode::Existing).unwrap(), name.clone())),
                    sizes,
                    &|_| {},
                )
                .unwrap();
                (r.end.transactions, r.log_bytes, disk.live_image(seg).unwrap())
            })
            .collect();
        (want, runs)
    }

    /// Replay in one chunk on the calling thread, pipelined in many chunks,
    /// and with a cache so small that it writes back before every range:
    /// each leaves the segment byte for byte as the committed transactions
    /// applied in order (what a full replay must leave).
    #[test]
    fn pipelined_replay_equals_inline_replay() {
        let mut x = 7u64;
        let txs: Vec<Tx> = (0..600u64)
            .map(|i| {
                (0..1 + i % 3)
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((x >> 20) as usize, 1 + (x >> 60) as usize * 9, i as u8)
                    })
                    .collect()
            })
            .collect();
        let sizes = [Sizes::DEFAULT, sz(usize::MAX, usize::MAX), sz(256, CACHE_BYTES), sz(256, 0)];
        let (want, runs) = replays(&txs, false, &sizes);
        assert_eq!(runs[0].0, 600);
        for (r, size) in runs.iter().zip(sizes) {
            assert!(r.2 == want, "replay with sizes {size:?}");
            assert_eq!((r.0, r.1), (runs[0].0, runs[0].1));
        }
    }

    /// Staging writes nothing until asked, then leaves what a replay
    /// leaves; with pages over its limit it gives up, still writing nothing.
    #[test]
    fn staging_writes_nothing_until_asked_and_gives_up_past_its_limit() {
        let txs: Vec<Tx> = (0..200u64).map(|i| vec![((i as usize * 4099) % SEG_LEN, 40, i as u8)]).collect();
        let (want, _) = replays(&txs, false, &[]);
        for (cache, complete) in [(CACHE_BYTES, true), (0, false)] {
            let disk = SimDisk::new();
            let vfs: Arc<dyn crate::Vfs> = Arc::new(disk.clone());
            let (log, seg) = (Path::new("/replay.log"), Path::new("/replay.seg"));
            create_log_with(vfs.as_ref(), log, 4 << 20).unwrap();
            {
                let opts = Options { coalesce: false, truncate_threshold: None, ..Options::default() };
                let rvm = Rvm::open_with(vfs.clone(), log, opts).unwrap();
                let s = rvm.create_segment(seg, SEG_LEN as u64).unwrap();
                let ps = crate::page_size();
                let region = rvm.map(&s, MapSpec::new(0, SEG_LEN / ps * ps)).unwrap();
                for tx in &txs {
                    let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
                    for &(off, n, fill) in tx {
                        let off = off % region.len();
                        let n = n.min(region.len() - off);
                        let bytes: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
                        // SAFETY: single-threaded; inside the region.
                        unsafe { t.modify_bytes(region.addr() + off, &bytes).unwrap() };
                    }
                    t.commit(CommitMode::NoFlush).unwrap();
                }
            }
            let before = disk.live_image(seg).unwrap();
            let LogDevice { ring, status, .. } = LogDevice::open(vfs.as_ref(), log).unwrap();
            let name = status.segments[0].name.clone();
            let mut records = 0;
            let staged = stage_in(
                &ring,
                status.head,
                u64::MAX,
                status.epoch,
                |_| Ok((vfs.open(&name, crate::OpenMode::Existing).unwrap(), name.clone())),
                sz(512, cache),
                &mut |_, _, _, _| records += 1,
            )
            .unwrap();
            assert_eq!((staged.end.transactions, records), (200, 200));
            assert!(disk.live_image(seg).unwrap() == before, "staging wrote");
            assert_eq!(staged.complete(), complete);
            if complete {
                staged.write().unwrap();
                let img = disk.live_image(seg).unwrap();
                assert!(img == disk.durable_image(seg).unwrap(), "the staged write was not synced");
                assert!(img[..want.len()] == want[..], "the staged image differs from a replay");
            } else {
                drop(staged);
                assert!(disk.live_image(seg).unwrap() == before, "a staging that gave up wrote");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(24), ..ProptestConfig::default() })]
        /// Random logs (small and page-spanning ranges, hot and spread,
        /// coalescing on and off): every replay equals the reference apply.
        #[test]
        fn replay_equals_the_committed_transactions_applied_in_order(
            txs in prop::collection::vec(
                prop::collection::vec(
                    (prop_oneof![0usize..256, 0usize..SEG_LEN], prop_oneof![1usize..64, 1usize..9000], any::<u8>()),
                    1..5,
                ),
                1..80,
            ),
            coalesce in any::<bool>(),
        ) {
            let sizes = [Sizes::DEFAULT, sz(usize::MAX, usize::MAX), sz(512, CACHE_BYTES), sz(512, 0)];
            let (want, runs) = replays(&txs, coalesce, &sizes);
            for (r, size) in runs.iter().zip(sizes) {
                prop_assert!(r.2 == want, "replay with sizes {:?} (coalesce {})", size, coalesce);
            }
        }
    }

    /// Segment lengths of the multi-segment test (none a page multiple).
    const SEGS: [usize; 3] = [9 * 4096 + 100, 3 * 4096 + 7, 40 * 4096 + 2048];

    /// A range of the multi-segment test: segment (index into [`SEGS`]),
    /// offset, length, fill byte.
    type MultiTx = Vec<(usize, usize, usize, u8)>;

    /// The reference replay: the log read record by record with the plain
    /// scanner, each complete transaction's ranges copied in log order onto
    /// images of the segments; returns the images by segment id.
    fn reference_replay(
        ring: &Ring,
        head: u64,
        epoch: u64,
        mut images: HashMap<u32, Vec<u8>>,
    ) -> HashMap<u32, Vec<u8>> {
        let pending: RefCell<Vec<(u32, u64, Vec<u8>)>> = RefCell::new(Vec::new());
        let images_ref = &mut images;
        log::scan(
            ring,
            head,
            u64::MAX,
            epoch,
            |f| {
                if let crate::log::format::Frame::Range { segment, offset, data } = f.frame {
                    pending.borrow_mut().push((segment, offset, data.to_vec()));
                }
                Ok(())
            },
            |_, _| {
                for (seg, off, data) in pending.borrow_mut().drain(..) {
                    let img = images_ref.get_mut(&seg).expect("a known segment");
                    img[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
                Ok(())
            },
        )
        .unwrap();
        images
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(24), ..ProptestConfig::default() })]
        /// Random logs over three segments (small, page-crossing and
        /// overlapping ranges, coalescing on and off), the log torn or
        /// damaged at a random place or not at all: the replay — sorted by
        /// page or in log order, in one chunk or many, with a cache that
        /// holds everything or writes back often — leaves every segment
        /// byte for byte as the reference replay does.
        #[test]
        fn replay_equals_a_record_by_record_reference(
            txs in prop::collection::vec(
                prop::collection::vec(
                    (0usize..3, prop_oneof![0usize..512, any::<usize>()], prop_oneof![1usize..70, 1usize..10_000], any::<u8>()),
                    1..6,
                ),
                1..60,
            ),
            coalesce in any::<bool>(),
            tear in prop::option::of((0.0f64..1.0, any::<bool>())),
        ) {
            let txs: Vec<MultiTx> = txs;
            let disk = SimDisk::new();
            let vfs: Arc<dyn crate::Vfs> = Arc::new(disk.clone());
            let log = Path::new("/multi.log");
            create_log_with(vfs.as_ref(), log, 4 << 20).unwrap();
            let ps = crate::page_size();
            let names: Vec<PathBuf> = (0..SEGS.len()).map(|i| PathBuf::from(format!("/multi{i}.seg"))).collect();
            {
                let opts = Options { coalesce, truncate_threshold: None, write_behind: false, ..Options::default() };
                let rvm = Rvm::open_with(vfs.clone(), log, opts).unwrap();
                let regions: Vec<_> = SEGS
                    .iter()
                    .zip(&names)
                    .map(|(&len, name)| {
                        let s = rvm.create_segment(name, len as u64).unwrap();
                        rvm.map(&s, MapSpec::new(0, len / ps * ps)).unwrap()
                    })
                    .collect();
                for tx in &txs {
                    let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
                    for &(seg, off, n, fill) in tx {
                        let region = &regions[seg];
                        let off = off % region.len();
                        let n = n.min(region.len() - off);
                        let bytes: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
                        // SAFETY: single-threaded; inside the region.
                        unsafe { t.modify_bytes(region.addr() + off, &bytes).unwrap() };
                    }
                    t.commit(CommitMode::NoFlush).unwrap();
                }
            } // flushed, not truncated
            let LogDevice { ring, status, .. } = LogDevice::open(vfs.as_ref(), log).unwrap();
            let (area_offset, area_len) = (ring.area_offset, ring.area_len);
            drop(ring);
            if let Some((at, zero)) = tear {
                // Tear (zero the rest of a sector) or damage (flip a byte)
                // the log at a random place of its used part.
                let mut img = disk.durable_image(log).unwrap();
                let used = status.synced_end.saturating_sub(status.head).max(1);
                let pos = status.head + (at * used as f64) as u64;
                let off = (area_offset + pos % area_len) as usize;
                if zero {
                    let end = (off / 512 + 1) * 512;
                    img[off..end].fill(0);
                } else {
                    img[off] ^= 0x40;
                }
                disk.set_durable_image(log, img);
            }
            let (log_img, seg_imgs): (Vec<u8>, Vec<Vec<u8>>) =
                (disk.durable_image(log).unwrap(), names.iter().map(|n| disk.durable_image(n).unwrap()).collect());
            let ids: HashMap<u32, PathBuf> = status.segments.iter().map(|e| (e.id, e.name.clone())).collect();
            let before: HashMap<u32, Vec<u8>> = ids
                .iter()
                .map(|(&id, name)| (id, seg_imgs[names.iter().position(|n| n == name).unwrap()].clone()))
                .collect();
            let want = {
                let LogDevice { ring, status, .. } = LogDevice::open(vfs.as_ref(), log).unwrap();
                reference_replay(&ring, status.head, status.epoch, before)
            };
            let sizes = [
                Sizes::DEFAULT,
                sz(usize::MAX, usize::MAX),
                Sizes { sort_min: usize::MAX, ..sz(usize::MAX, usize::MAX) },
                sz(300, CACHE_BYTES),
                Sizes { sort_min: usize::MAX, ..sz(300, CACHE_BYTES) },
                sz(300, 0),
                sz(5000, 20 * 4096),
            ];
            for size in sizes {
                disk.set_durable_image(log, log_img.clone());
                for (n, img) in names.iter().zip(&seg_imgs) {
                    disk.set_durable_image(n, img.clone());
                }
                let LogDevice { ring, status, .. } = LogDevice::open(vfs.as_ref(), log).unwrap();
                replay_in_chunks(
                    &ring,
                    status.head,
                    u64::MAX,
                    status.epoch,
                    |id| {
                        let name = ids[&id].clone();
                        Ok((vfs.open(&name, crate::OpenMode::Existing).unwrap(), name))
                    },
                    size,
                    &|_| {},
                )
                .unwrap();
                for (id, name) in &ids {
                    let got = disk.live_image(name).unwrap();
                    prop_assert!(got == want[id], "segment {} differs after a replay with {:?}", id, size);
                }
            }
        }
    }
}
