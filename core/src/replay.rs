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
use crate::storage::Storage;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

/// Data bytes per chunk.
pub(crate) const CHUNK_BYTES: usize = 16 << 20;
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
/// Pages per leaf of a segment's page table (16 MiB of segment).
const LEAF: u64 = 4096;

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
    fn clear(&mut self) {
        self.pieces.clear();
        self.data.clear();
    }
}

/// One segment's pages in the cache: a two-level table from page number to
/// slot + 1 (0: not cached).
#[derive(Default)]
struct PageTable {
    leaves: Vec<Option<Box<[u32]>>>,
}

impl PageTable {
    #[inline]
    fn get(&self, page: u64) -> Option<usize> {
        let leaf = self.leaves.get((page / LEAF) as usize)?.as_ref()?;
        let slot = leaf[(page % LEAF) as usize];
        (slot != 0).then(|| slot as usize - 1)
    }

    fn set(&mut self, page: u64, slot: usize) {
        let top = (page / LEAF) as usize;
        if self.leaves.len() <= top {
            self.leaves.resize_with(top + 1, || None);
        }
        let leaf = self.leaves[top].get_or_insert_with(|| vec![0u32; LEAF as usize].into_boxed_slice());
        leaf[(page % LEAF) as usize] = slot as u32 + 1;
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
        _ => dst.copy_from_slice(src),
    }
}

impl PageCache {
    fn new(limit_bytes: usize) -> PageCache {
        PageCache {
            arena: Vec::new(),
            slots: Vec::new(),
            tables: Vec::new(),
            limit: (limit_bytes / PAGE).max(BLOCK_PAGES as usize),
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

    /// Applies the new bytes `data` at `offset` of segment `seg` (already
    /// checked to lie inside it).
    fn apply(&mut self, seg: u32, d: &Device, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let page = at / PAGE as u64;
            let in_page = (at % PAGE as u64) as usize;
            let n = (PAGE - in_page).min(data.len() - done);
            let slot = match self.lookup(seg, page) {
                Some(slot) => slot,
                None => {
                    let whole = in_page == 0 && (n == PAGE || at + n as u64 == d.len);
                    if whole {
                        // Every byte of the page (up to the segment's end)
                        // is the range's: nothing to read.
                        self.alloc(seg, page)
                    } else {
                        self.load_block(seg, d, page)?;
                        self.lookup(seg, page).ok_or_else(|| {
                            Error::corrupted(format!("log replay (page {page} of segment id {seg})"), "replay")
                        })?
                    }
                }
            };
            copy_small(&mut self.arena[slot * PAGE + in_page..slot * PAGE + in_page + n], &data[done..done + n]);
            self.slots[slot].2 = true;
            done += n;
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
}

impl<R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)>> SegmentWriter<R> {
    fn new(resolve: R, cache_bytes: usize, staging: bool) -> Self {
        SegmentWriter {
            resolve,
            devices: Vec::new(),
            index: HashMap::new(),
            cache: PageCache::new(cache_bytes),
            segment_bytes: 0,
            staging,
            gave_up: false,
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

    fn apply_chunk(&mut self, chunk: &Chunk) -> Result<()> {
        // Records name one segment at a time, usually: look it up on change.
        let mut last: Option<(u32, u32)> = None;
        for (i, p) in chunk.pieces.iter().enumerate() {
            // Ranges land on random pages: ask for a later range's cache
            // line now, so that its copy does not wait for memory.
            if let (Some(a), Some((id, dev))) = (chunk.pieces.get(i + PREFETCH_AHEAD), last) {
                if a.segment == id {
                    if let Some(slot) = self.cache.lookup(dev, a.offset / PAGE as u64) {
                        crate::mem::prefetch(&self.cache.arena, slot * PAGE + (a.offset % PAGE as u64) as usize);
                    }
                }
            }
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
            // The cache may pass its limit by one range's pages (a range
            // is at most one record long).
            if self.cache.slots.len() + BLOCK_PAGES as usize > self.cache.limit {
                if self.staging {
                    return Err(Error::corrupted("log replay (staged pages over the limit)", "replay"));
                }
                self.flush()?;
            }
            let d = &self.devices[dev as usize];
            self.cache.apply(dev, d, off, &chunk.data[p.data_at..p.data_at + p.len])?;
        }
        Ok(())
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
    replay_in_chunks(ring, start, limit, epoch, resolve, (CHUNK_BYTES, CACHE_BYTES), progress)
}

fn replay_in_chunks<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    (chunk_bytes, cache_bytes): (usize, usize),
    progress: &dyn Fn(u64),
) -> Result<Replayed>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    let writer = SegmentWriter::new(resolve, cache_bytes, false);
    let (end, log_bytes, mut writer) =
        scan_and_apply(ring, start, limit, epoch, writer, chunk_bytes, progress, &mut |_, _, _, _| {})?;
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
    stage_in(ring, start, limit, epoch, resolve, (CHUNK_BYTES, CACHE_BYTES), on_record)
}

fn stage_in<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    (chunk_bytes, cache_bytes): (usize, usize),
    on_record: &mut OnRecord<'_>,
) -> Result<Staged<R>>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    let writer = SegmentWriter::new(resolve, cache_bytes, true);
    let (end, log_bytes, writer) = scan_and_apply(ring, start, limit, epoch, writer, chunk_bytes, &|_| {}, on_record)?;
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
            /// Pieces of the transaction being read (its bytes are at the
            /// end of `chunk.data`).
            tx: Vec<Piece>,
            writer: Option<SegmentWriter<R>>,
            pipe: Option<Pipe<'s, R>>,
            log_bytes: u64,
        }
        let state = RefCell::new(Scan {
            chunk: Chunk::default(),
            tx: Vec::new(),
            writer: Some(writer),
            pipe: None,
            log_bytes: 0,
        });
        let scanned = log::scan_records(ring, start, limit, epoch, |lsn, rec, info, ranges, tx| {
            on_record(lsn, info, ranges, tx);
            let me = &mut *state.borrow_mut();
            if let (Some(first), Some(last)) = (ranges.first(), ranges.last()) {
                // One copy per record: its ranges' data with the range
                // headers between them (skipped by the pieces).
                let (from, to) = (first.data_at as usize, (last.data_at + last.len) as usize);
                let base = me.chunk.data.len();
                me.chunk.data.extend_from_slice(&rec[from..to]);
                me.tx.extend(ranges.iter().map(|r| Piece {
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
            me.chunk.pieces.append(&mut me.tx);
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
            let spare = pipe.returned.try_recv().unwrap_or_default();
            let full = std::mem::replace(&mut me.chunk, spare);
            // A closed pipe means the applier failed: its error is
            // reported when it is joined.
            pipe.to_worker.send(full).map_err(|_| Error::corrupted("log replay (applier stopped)", "replay"))
        });
        let Scan { mut chunk, tx, writer, pipe, log_bytes } = state.into_inner();
        // The unfinished tail's bytes are after every piece: not applied.
        drop(tx);
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

    fn replays(txs: &[Tx], coalesce: bool, sizes: &[(usize, usize)]) -> (Vec<u8>, Vec<Run>) {
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
        let sizes = [(usize::MAX, usize::MAX), (256, CACHE_BYTES), (256, 0)];
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
                (512, cache),
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
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
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
            let sizes = [(usize::MAX, usize::MAX), (512, CACHE_BYTES), (512, 0)];
            let (want, runs) = replays(&txs, coalesce, &sizes);
            for (r, size) in runs.iter().zip(sizes) {
                prop_assert!(r.2 == want, "replay with sizes {:?} (coalesce {})", size, coalesce);
            }
        }
    }
}
