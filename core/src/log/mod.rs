//! The write-ahead redo log: on-disk format, ring I/O, creation, and the
//! scanner shared by recovery, truncation and `rvmutl dump`.

pub mod format;
pub mod inspect;
pub(crate) mod parallel;

use crate::error::{Error, LogError, Result};
use crate::storage::{OpenMode, Storage, Vfs};
use format::{Frame, FrameDefect, RangeRef, RecordHeader, RecordInfo, Status, Superblock, MAX_RECORD, RECORD_HEADER};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The record area seen as a circular byte buffer addressed by log position
/// (LSN): position `p` lives at `area_offset + p % area_len`.
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    pub dev: Arc<dyn Storage>,
    pub path: PathBuf,
    pub area_offset: u64,
    pub area_len: u64,
}

impl Ring {
    fn pieces(&self, lsn: u64, len: usize) -> [(u64, usize); 2] {
        let at = lsn % self.area_len;
        let first = ((self.area_len - at) as usize).min(len);
        [(self.area_offset + at, first), (self.area_offset, len - first)]
    }

    /// Writes `buf` at log position `lsn` (wrapping at the end of the area).
    pub fn write(&self, lsn: u64, buf: &[u8]) -> Result<()> {
        let mut done = 0;
        for (off, n) in self.pieces(lsn, buf.len()) {
            if n > 0 {
                self.dev
                    .write_at(&buf[done..done + n], off)
                    .map_err(|e| Error::io("writing the log", &self.path, e))?;
                done += n;
            }
        }
        Ok(())
    }

    /// The first stretch of log positions in `[lsn, end)` that may hold
    /// written bytes, clipped to `end` and to the area's end (where the
    /// ring wraps); `None` if all of `[lsn, end)` reads as zeros, never
    /// written ([`Storage::written_from`]).
    pub fn written_stretch(&self, lsn: u64, end: u64) -> Result<Option<std::ops::Range<u64>>> {
        let mut lsn = lsn;
        while lsn < end {
            let at = lsn % self.area_len;
            let (phys, area_end) = (self.area_offset + at, self.area_offset + self.area_len);
            let piece_end = (lsn + (self.area_len - at)).min(end);
            let found =
                self.dev.written_from(phys).map_err(|e| Error::io("looking for written log space", &self.path, e))?;
            if let Some(r) = found {
                let (first, last) = (r.start.max(phys), r.end.min(area_end));
                let start = lsn + (first - phys);
                if first < last && start < piece_end {
                    return Ok(Some(start..(lsn + (last - phys)).min(piece_end)));
                }
            }
            lsn = piece_end;
        }
        Ok(None)
    }

    /// The record area mapped read-only, if the device has a descriptor
    /// and the file holds the whole area (else the caller reads with
    /// [`Ring::read`]).
    pub fn view(&self) -> Option<crate::mem::FileView> {
        let fd = self.dev.raw_fd()?;
        crate::mem::FileView::new(fd, self.area_offset, usize::try_from(self.area_len).ok()?)
    }

    /// Reads `buf.len()` bytes at log position `lsn`.
    pub fn read(&self, lsn: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        for (off, n) in self.pieces(lsn, buf.len()) {
            if n > 0 {
                self.dev
                    .read_at(&mut buf[done..done + n], off)
                    .map_err(|e| Error::io("reading the log", &self.path, e))?;
                done += n;
            }
        }
        Ok(())
    }
}

/// Creates a log of exactly `size` bytes at `path` (a new file, or an
/// existing block device of at least that size) and writes its superblock
/// and an initial status. The file is created with mode 0600 and its disk
/// blocks are allocated (where the file system supports `fallocate`), so
/// that commits never meet a full disk: without room for `size` bytes this
/// fails with an I/O error of kind [`std::io::ErrorKind::StorageFull`] and
/// leaves no file behind.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// let log = dir.path().join("demo.log");
/// rvm_core::create_log(&log, 1 << 20).unwrap();
/// assert!(rvm_core::create_log(&log, 1 << 20).is_err()); // never overwrites
/// ```
pub fn create_log(path: impl AsRef<Path>, size: u64) -> Result<()> {
    create_log_with(&crate::storage::FileVfs, path.as_ref(), size)
}

/// [`create_log`] on any [`Vfs`] (for instance the simulated disk).
pub fn create_log_with(vfs: &dyn Vfs, path: &Path, size: u64) -> Result<()> {
    let sb = Superblock::for_size(size).ok_or(LogError::BadSize {
        requested: size,
        reason: "a log needs at least 196 KiB (superblock, two status slots, 64 KiB of records)",
    })?;
    if i64::try_from(size).is_err() {
        return Err(LogError::BadSize { requested: size, reason: "a file holds at most 2^63 - 1 bytes" }.into());
    }
    let dev = vfs.open(path, OpenMode::CreateNew).map_err(|e| Error::io("creating the log", path, e))?;
    let made = write_new_log(dev.as_ref(), path, size, &sb);
    if made.is_err() {
        // Not a log yet (the superblock goes last): remove it, so that the
        // path is free for another try.
        drop(dev);
        let _ = vfs.remove(path);
    }
    made
}

/// Writes a new log's statuses, first area block and superblock, each
/// step synced.
fn write_new_log(dev: &dyn Storage, path: &Path, size: u64, sb: &Superblock) -> Result<()> {
    let io = |op, r: std::io::Result<()>| r.map_err(|e| Error::io(op, path, e));
    io("sizing the log", dev.set_len(size))?;
    // Its blocks are taken now: a commit never meets a full disk.
    io("allocating the log's space", dev.allocate(0, size))?;
    // A fresh status in both slots.
    let status = Status { seq: 0, epoch: 1, next_segment_id: 1, ..Status::default() };
    let image = status.encode().ok_or(LogError::BadSize { requested: size, reason: "status does not fit" })?;
    for slot in 0..2 {
        io("writing the log status", dev.write_at(&image, Status::slot_offset(slot)))?;
    }
    // Zero the first block of the area so a scan of a new log ends at once.
    io("writing the log", dev.write_at(&[0u8; format::BLOCK as usize], sb.area_offset))?;
    io("syncing the log", dev.sync())?;
    // The superblock goes last: until it is durable the file is not a log.
    io("writing the log superblock", dev.write_at(&sb.encode(), 0))?;
    io("syncing the log", dev.sync())?;
    Ok(())
}

/// An opened log device: superblock and the newest valid status.
#[derive(Debug)]
pub(crate) struct LogDevice {
    pub ring: Ring,
    pub sb: Superblock,
    pub status: Status,
}

impl LogDevice {
    /// Opens and validates a log (locks it exclusively).
    pub fn open(vfs: &dyn Vfs, path: &Path) -> Result<LogDevice> {
        let dev = vfs.open(path, OpenMode::Existing).map_err(|e| Error::io("opening the log", path, e))?;
        let len = dev.len().map_err(|e| Error::io("sizing the log", path, e))?;
        let mut block = vec![0u8; format::BLOCK as usize];
        if len < format::BLOCK {
            return Err(LogError::NotALog { path: path.into() }.into());
        }
        dev.read_at(&mut block, 0).map_err(|e| Error::io("reading the log superblock", path, e))?;
        let sb = match Superblock::decode(&block) {
            Ok(sb) => sb,
            Err(format::SuperblockError::BadMagic) => return Err(LogError::NotALog { path: path.into() }.into()),
            Err(format::SuperblockError::Version(v)) => {
                return Err(LogError::UnsupportedVersion { found: v, supported: format::VERSION }.into())
            }
            Err(format::SuperblockError::Corrupt(why)) => {
                return Err(Error::corrupted(format!("log superblock ({why})"), format!("{} offset 0", path.display())))
            }
        };
        if sb.device_size > len {
            return Err(Error::corrupted(
                "log superblock (device shorter than recorded size)",
                format!("{} offset 16", path.display()),
            ));
        }
        let status = read_status(dev.as_ref(), path)?;
        if status.head.checked_add(sb.area_len).is_none() {
            return Err(Error::corrupted(
                "log status (head position out of range)",
                format!("{} status", path.display()),
            ));
        }
        // Recovery writes up to two statuses (the synced end, then the new
        // epoch and head): it must be able to, or it would fail after
        // writing segments.
        if status.head >= format::OPEN_LIMIT
            || status.seq >= format::OPEN_LIMIT - 4
            || status.epoch >= format::OPEN_LIMIT - 2
        {
            return Err(Error::corrupted(
                format!(
                    "log status (head {}, sequence number {} or epoch {} at or too close to 2^61, the \
                     limit an open accepts)",
                    status.head, status.seq, status.epoch
                ),
                format!("{} status", path.display()),
            ));
        }
        let ring = Ring { dev, path: path.into(), area_offset: sb.area_offset, area_len: sb.area_len };
        Ok(LogDevice { ring, sb, status })
    }
}

/// Reads both status slots and returns the valid one with the larger seq.
///
/// Every status write leaves both slots holding it (see [`write_status`]),
/// and while one slot is being written the other holds a status that
/// leads to every committed frame, so one damaged slot loses nothing.
pub(crate) fn read_status(dev: &dyn Storage, path: &Path) -> Result<Status> {
    let mut best: Option<Status> = None;
    let read = |buf: &mut [u8], at: u64| dev.read_at(buf, at).map_err(|e| Error::io("reading the log status", path, e));
    for slot in 0..2u64 {
        // A slot's first block holds its fixed part and, but for a long
        // segment dictionary, all of it: the rest of the 64 KiB slot is
        // read only when the dictionary's length says it is needed.
        let at = Status::slot_offset(slot);
        let mut buf = vec![0u8; format::BLOCK as usize];
        read(&mut buf, at)?;
        let needed = format::Status::encoded_len(&buf).min(format::STATUS_SLOT as usize).next_multiple_of(buf.len());
        if needed > buf.len() {
            buf.resize(needed, 0);
            read(&mut buf[format::BLOCK as usize..], at + format::BLOCK)?;
        }
        if let Some(s) = Status::decode(&buf) {
            if best.as_ref().is_none_or(|b| s.seq > b.seq) {
                best = Some(s);
            }
        }
    }
    best.ok_or_else(|| Error::corrupted("log status (both slots invalid)", format!("{} offset 4096", path.display())))
}

/// Writes `status` to slot 0, syncs, then to slot 1, and syncs again.
///
/// No frame depends on a status before this returns (the writer uses a new
/// epoch, dictionary entry or freed space only afterwards), so whichever
/// slot a crash or later damage leaves valid leads to every committed frame.
pub(crate) fn write_status(ring: &Ring, status: &Status) -> Result<()> {
    if [status.seq, status.epoch, status.head].iter().any(|&v| v >= format::OPEN_LIMIT) {
        // A status the next open would refuse (`LogDevice::open`): written,
        // it would lose everything after it.
        return Err(Error::corrupted(
            "log status (a position or counter reached 2^61, the limit an open accepts)",
            format!("{} status", ring.path.display()),
        ));
    }
    let image = status.encode().ok_or(LogError::SegmentDictionaryFull { limit: format::DICT_LIMIT })?;
    for slot in 0..2 {
        ring.dev
            .write_at(&image, Status::slot_offset(slot))
            .map_err(|e| Error::io("writing the log status", &ring.path, e))?;
        ring.dev.sync().map_err(|e| Error::io("syncing the log", &ring.path, e))?;
    }
    Ok(())
}

/// Why a scan stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanStop {
    /// It reached the requested limit.
    Limit,
    /// The frame at `lsn` failed a check; the log ends there (whether
    /// synced records follow it, which makes it damage, is told by
    /// [`inspect::ScanReport::damage`]).
    Defect {
        /// Position of the refused frame.
        lsn: u64,
        /// What was wrong.
        defect: FrameDefect,
    },
}

/// What a scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanEnd {
    /// Log position just after the last complete transaction.
    pub end: u64,
    /// Complete transactions seen.
    pub transactions: u64,
    /// Bytes of valid frames after `end` that belong to no complete
    /// transaction (a torn or unfinished tail), discarded.
    pub discarded: u64,
    /// Why it stopped.
    pub stop: ScanStop,
}

/// One logical item (a range, or a transaction's commit) as the scanner
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedFrame<'a> {
    /// Position of the record holding it.
    pub lsn: u64,
    /// The record's length with padding, on the record's last item; 0 on
    /// its other items (so the lengths of all items add up to the log bytes).
    pub len: u32,
    /// Log position of a range's first data byte (the record's position
    /// for a commit).
    pub data_lsn: u64,
    /// The decoded item.
    pub frame: Frame<'a>,
}

/// Scans the log from `start` (at most up to `limit`) in `epoch`.
///
/// `on_frame` sees every range of every valid record in order (including
/// those of a tail that turns out incomplete) and each transaction's
/// commit; `on_commit` is called with the position range `[tx_start,
/// tx_end)` of each complete transaction, after its items. Reading stops
/// at the first record that fails a check.
pub(crate) fn scan(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    mut on_frame: impl FnMut(&ScannedFrame<'_>) -> Result<()>,
    mut on_commit: impl FnMut(u64, u64) -> Result<()>,
) -> Result<ScanEnd> {
    scan_records(ring, start, limit, epoch, |lsn, rec, info, ranges, tx| {
        let last = ranges.len().wrapping_sub(usize::from(info.commit.is_none()));
        for (i, r) in ranges.iter().enumerate() {
            let data = &rec[r.data_at as usize..(r.data_at + r.len) as usize];
            let len = if i == last { info.len as u32 } else { 0 };
            let frame = Frame::Range { segment: r.segment, offset: r.offset, data };
            on_frame(&ScannedFrame { lsn, len, data_lsn: lsn + u64::from(r.data_at), frame })?;
        }
        if let Some((first_tx, last_tx, synced)) = info.commit {
            let frame = Frame::Commit { ranges: tx.ranges, first_tx, last_tx, bytes: tx.bytes, synced };
            on_frame(&ScannedFrame { lsn, len: info.len as u32, data_lsn: lsn, frame })?;
            on_commit(tx.start, lsn + info.len as u64)?;
        }
        Ok(())
    })
}

/// The transaction a scan is in.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TxSoFar {
    /// Where it starts.
    pub start: u64,
    /// Ranges and data bytes in its records so far.
    pub ranges: u32,
    pub bytes: u64,
}

/// The record loop behind [`scan`]: `on_record(lsn, record bytes, info,
/// ranges, tx)` for every valid record, with the transaction's totals
/// including this record. Reads the log with `pread` into a buffer; see
/// [`scan_records_in`] for a scan of a mapped log.
pub(crate) fn scan_records(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    on_record: impl FnMut(u64, &[u8], &RecordInfo, &[RangeRef], &TxSoFar) -> Result<()>,
) -> Result<ScanEnd> {
    scan_records_in(ring, None, start, limit, epoch, on_record)
}

/// [`scan_records`], reading the record area from `area` (the whole area,
/// mapped: [`Ring::view`]) if given, with no copy but for a record that
/// wraps around the end of the ring. Both ways see the same bytes and
/// give the same results.
pub(crate) fn scan_records_in(
    ring: &Ring,
    area: Option<&[u8]>,
    start: u64,
    limit: u64,
    epoch: u64,
    on_record: impl FnMut(u64, &[u8], &RecordInfo, &[RangeRef], &TxSoFar) -> Result<()>,
) -> Result<ScanEnd> {
    let limit = limit.min(start.saturating_add(ring.area_len));
    let mut cur = Cursor::new(start);
    let stop = match area.filter(|a| a.len() as u64 == ring.area_len) {
        Some(area) => {
            let mut src = Mapped { area, limit, wrapped: Vec::new() };
            record_loop(&mut src, &mut cur, |_, _| false, epoch, ring.area_len, on_record)?
        }
        None => {
            let mut src = Buffered { ring, limit, buf: Vec::new(), valid: 0, buf_lsn: start };
            record_loop(&mut src, &mut cur, |_, _| false, epoch, ring.area_len, on_record)?
        }
    };
    Ok(cur.end(stop.unwrap_or(ScanStop::Limit)))
}

/// Where a scan reads the log: `get(pos, need)` gives the bytes
/// `[pos, pos + need)`, or `None` if they do not all lie below the scan's
/// limit.
trait Source {
    fn get(&mut self, pos: u64, need: usize) -> Result<Option<&[u8]>>;
}

/// The log read with `pread`, 4 MiB at a time.
struct Buffered<'r> {
    ring: &'r Ring,
    limit: u64,
    /// `buf[..valid]` holds the log from `buf_lsn`; `buf` keeps its length
    /// (no zeroing on every refill).
    buf: Vec<u8>,
    valid: usize,
    buf_lsn: u64,
}

impl Source for Buffered<'_> {
    fn get(&mut self, pos: u64, need: usize) -> Result<Option<&[u8]>> {
        const CHUNK: usize = 4 << 20;
        if pos + need as u64 > self.limit {
            return Ok(None);
        }
        let have_from = (pos - self.buf_lsn) as usize;
        if have_from + need > self.valid {
            let want = need.max(CHUNK).min((self.limit - pos) as usize);
            let keep = self.valid.saturating_sub(have_from);
            self.buf.copy_within(have_from.min(self.valid)..self.valid, 0);
            self.buf_lsn = pos;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            if keep < want {
                self.ring.read(pos + keep as u64, &mut self.buf[keep..want])?;
            }
            self.valid = want.max(keep);
        }
        let at = (pos - self.buf_lsn) as usize;
        Ok(Some(&self.buf[at..at + need]))
    }
}

/// The record area mapped: bytes are read in place, but for a record that
/// wraps around the end of the ring (copied into `wrapped`).
struct Mapped<'a> {
    area: &'a [u8],
    limit: u64,
    wrapped: Vec<u8>,
}

impl Source for Mapped<'_> {
    fn get(&mut self, pos: u64, need: usize) -> Result<Option<&[u8]>> {
        if pos + need as u64 > self.limit {
            return Ok(None);
        }
        let at = (pos % self.area.len() as u64) as usize;
        if let Some(bytes) = self.area.get(at..at + need) {
            return Ok(Some(bytes));
        }
        // The scan covers at most one lap (`limit`), so `need` is below
        // the area's length.
        let first = self.area.len() - at;
        self.wrapped.clear();
        self.wrapped.extend_from_slice(&self.area[at..]);
        self.wrapped.extend_from_slice(&self.area[..need - first]);
        Ok(Some(&self.wrapped))
    }
}

/// Where a scan is (so that it can go on on another thread).
struct Cursor {
    pos: u64,
    tx: TxSoFar,
    transactions: u64,
    ranges: Vec<RangeRef>,
}

impl Cursor {
    fn new(start: u64) -> Cursor {
        Cursor { pos: start, tx: TxSoFar { start, ..TxSoFar::default() }, transactions: 0, ranges: Vec::new() }
    }

    fn end(&self, stop: ScanStop) -> ScanEnd {
        ScanEnd { end: self.tx.start, transactions: self.transactions, discarded: self.pos - self.tx.start, stop }
    }
}

/// The loop of [`scan_records_in`] over either source, from `cur`: how it
/// stopped, or `None` if it paused (at the first record whose position
/// `pause(position, whether a transaction starts there)` accepts).
fn record_loop(
    src: &mut impl Source,
    cur: &mut Cursor,
    mut pause: impl FnMut(u64, bool) -> bool,
    epoch: u64,
    area_len: u64,
    mut on_record: impl FnMut(u64, &[u8], &RecordInfo, &[RangeRef], &TxSoFar) -> Result<()>,
) -> Result<Option<ScanStop>> {
    let Cursor { pos: at, tx, transactions, ranges } = cur;
    let stop = loop {
        let pos = *at;
        if pause(pos, pos == tx.start) {
            return Ok(None);
        }
        let Some(h) = src.get(pos, RECORD_HEADER)? else { break ScanStop::Limit };
        let mut hb = [0u8; RECORD_HEADER];
        hb.copy_from_slice(h);
        let len = match format::check_header(&RecordHeader::parse(&hb), pos, epoch, area_len) {
            Ok(len) => len,
            Err(defect) => break ScanStop::Defect { lsn: pos, defect },
        };
        let Some(rec) = src.get(pos, len)? else {
            break ScanStop::Defect { lsn: pos, defect: FrameDefect::BadLength };
        };
        let info = match format::decode_record(rec, pos, epoch, ranges) {
            Ok(info) => info,
            Err(defect) => break ScanStop::Defect { lsn: pos, defect },
        };
        // The first record of a transaction says so, and only it: a record
        // cannot be taken out of its transaction.
        if (info.flags & format::FLAG_FIRST != 0) != (pos == tx.start) {
            break ScanStop::Defect { lsn: pos, defect: FrameDefect::BadBody };
        }
        tx.ranges = tx.ranges.saturating_add(ranges.len() as u32);
        tx.bytes += info.data_bytes;
        on_record(pos, rec, &info, ranges, tx)?;
        *at = pos + info.len as u64;
        if info.commit.is_some() {
            *transactions += 1;
            *tx = TxSoFar { start: *at, ..TxSoFar::default() };
        }
    };
    Ok(Some(stop))
}

/// Synced records found past the frame where a scan stopped: the log is
/// damaged, not merely torn at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Position of the first bad frame.
    pub lsn: u64,
    /// What was wrong with it.
    pub defect: FrameDefect,
    /// The log is known to have been durable up to here (from the status or
    /// from a later frame), beyond `lsn`: acknowledged records were lost.
    pub synced_to: u64,
    /// Position of the first valid frame after the bad one, if one was found
    /// (within one maximal frame of it).
    pub next_valid: Option<u64>,
    /// Where the valid frames after the bad one end.
    pub valid_end: u64,
    /// Complete transactions (commit frames) among those valid frames: what
    /// a salvage drops, besides the transaction the bad frame belonged to.
    pub transactions_after: u64,
}

impl Damage {
    /// The typed error recovery returns for this damage.
    pub(crate) fn error(&self, path: &Path, area_offset: u64, area_len: u64) -> Error {
        Error::corrupted(
            format!(
                "log frame ({}) followed by records that were acknowledged as durable up to position {} \
                 ({} complete transaction(s) after it); nothing was written; open with `Options::salvage` \
                 (rvmutl recover --salvage) to keep only the records before it",
                self.defect.describe(),
                self.synced_to,
                self.transactions_after,
            ),
            format!("{} position {} (byte offset {})", path.display(), self.lsn, area_offset + self.lsn % area_len),
        )
    }
}

/// What lies past the frame where a scan stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PastStop {
    /// The first valid frame of the epoch after the refused one (within one
    /// maximal frame), whether or not it proves damage.
    pub next_valid: Option<u64>,
    /// Set when records past the refused frame had been synced.
    pub damage: Option<Damage>,
}

/// Tells damage from a torn or clean end, and where the next valid frame
/// is: after a scan from `start` stopped on a bad frame, looks for
/// evidence that records past it were synced — the status's `synced_end`
/// beyond it, or a valid frame of this epoch within one maximal frame
/// after it whose commit frames (or any later one's) record a synced
/// position beyond it. A write lost or torn by a
/// crash is never synced, so such evidence means the bytes changed after
/// they were acknowledged. `area`: the record area as the scan mapped it
/// ([`Ring::view`]), if it did (else it is mapped again, or read).
pub(crate) fn look_past_stop(
    ring: &Ring,
    area: Option<&[u8]>,
    start: u64,
    end: &ScanEnd,
    epoch: u64,
    synced_end: u64,
) -> Result<PastStop> {
    let ScanStop::Defect { lsn, defect } = end.stop else { return Ok(PastStop::default()) };
    let limit = start.saturating_add(ring.area_len);
    let next_valid = probe_valid_frame(ring, area, lsn, limit, epoch)?;
    let (mut synced_to, mut valid_end, mut transactions_after) = (synced_end, lsn, 0);
    if let Some(first) = next_valid {
        let mut pos = first;
        // A commit counts as a transaction after the damage only if its
        // transaction's first record lies after it too.
        let mut started = false;
        while let Some((len, info)) = read_valid_frame(ring, pos, limit, epoch)? {
            started |= info.flags & format::FLAG_FIRST != 0;
            if let Some((_, _, synced)) = info.commit {
                synced_to = synced_to.max(synced);
                if started {
                    transactions_after += 1;
                }
                started = false;
            }
            pos += len as u64;
        }
        valid_end = pos;
    }
    let damage =
        (synced_to > lsn).then_some(Damage { lsn, defect, synced_to, next_valid, valid_end, transactions_after });
    Ok(PastStop { next_valid, damage })
}

/// The first position after `lsn` (8-aligned, within one maximal record)
/// where a valid record of `epoch` starts (`area`: as for [`look_past_stop`]).
fn probe_valid_frame(ring: &Ring, area: Option<&[u8]>, lsn: u64, limit: u64, epoch: u64) -> Result<Option<u64>> {
    let window_end = limit.min(lsn.saturating_add((MAX_RECORD + 64) as u64));
    let read_end = limit.min(window_end.saturating_add((MAX_RECORD + 8) as u64));
    let Some(len) = read_end.checked_sub(lsn).filter(|&n| n > 0) else { return Ok(None) };
    // Read in place where the log maps (no 2 MiB copy at every open whose
    // scan stopped, which is nearly every open), through the scan's
    // mapping where it has one (a second one costs its page faults and an
    // unmap again).
    let view = if area.is_none() { ring.view() } else { None };
    let mut buffered = Vec::new();
    let mut src: Box<dyn Source + '_> = match area.or(view.as_ref().map(|v| v.bytes())) {
        Some(area) => Box::new(Mapped { area, limit: read_end, wrapped: Vec::new() }),
        None => {
            buffered.resize(len as usize, 0);
            ring.read(lsn, &mut buffered)?;
            Box::new(Window { bytes: &buffered, from: lsn })
        }
    };
    let mut ranges = Vec::new();
    let mut p = lsn + 8;
    // Log positions that may hold written bytes; the file's holes (log
    // space never written, as past the end of a log that has not wrapped
    // yet) read as zeros and are skipped unread.
    let mut written = p..p;
    while p + RECORD_HEADER as u64 <= window_end {
        if p >= written.end {
            let Some(next) = ring.written_stretch(p, window_end)? else { return Ok(None) };
            // A header has 4 zero bytes of length in a hole: none starts
            // before the stretch. Positions stay `lsn` plus a multiple of 8.
            p = p.max(lsn + ((next.start - lsn) & !7));
            written = next;
            continue;
        }
        // The length field alone first: a whole header read in a
        // stretch's last 8 bytes would touch the hole after it, and a fault
        // in a hole makes the kernel zero its whole read-around window of
        // page cache (`read_ahead_kb`, 8 MiB on the benchmark machine).
        let Some(len_field) = src.get(p + 4, 3)? else {
            p += 8;
            continue;
        };
        if len_field == [0; 3] {
            // Zeros (log space written with zeros, or not written as far
            // as the block's end) hold no header: skip them at memory
            // speed to the first position whose length field is not zero,
            // or to the end of the written stretch.
            let span = (window_end.min(written.end).max(p + 7) - (p + 4)).min(1 << 16) as usize;
            if let Some(b) = src.get(p + 4, span)? {
                p = match first_nonzero(b) {
                    None => p + (span as u64 & !7).max(8),
                    // Positions stay `lsn` plus a multiple of 8.
                    Some(i) => (p + 4 + i as u64 - 6).saturating_sub(lsn).next_multiple_of(8).max(p + 8 - lsn) + lsn,
                };
                continue;
            }
        }
        if record_at(&mut *src, p, epoch, ring.area_len, &mut ranges)?.is_some() {
            return Ok(Some(p));
        }
        p += 8;
    }
    Ok(None)
}

/// The record of `epoch` that starts at `p` in `src`, if the bytes there
/// are one: header, flags, the body's shape, then CRC and body. Flags and
/// shape are checked before the CRC: bytes that pass the header's checks
/// by chance (1 in 256) fail them, before a CRC over up to a MiB.
fn record_at<S: Source + ?Sized>(
    src: &mut S,
    p: u64,
    epoch: u64,
    area_len: u64,
    ranges: &mut Vec<RangeRef>,
) -> Result<Option<RecordInfo>> {
    let Some(h) = src.get(p, RECORD_HEADER)? else { return Ok(None) };
    let mut hb = [0u8; RECORD_HEADER];
    hb.copy_from_slice(h);
    let header = RecordHeader::parse(&hb);
    let Ok(len) = format::check_header(&header, p, epoch, area_len) else { return Ok(None) };
    if header.flags & !(format::FLAG_COMMIT | format::FLAG_FIRST) != 0 {
        return Ok(None);
    }
    let Some(rec) = src.get(p, len)? else { return Ok(None) };
    if !format::has_record_shape(rec, p, ranges) {
        return Ok(None);
    }
    Ok(format::decode_record(rec, p, epoch, ranges).ok())
}

/// The index of the first byte of `b` that is not zero: 64 bytes per
/// step (a vectorized OR), then byte by byte in the step that has one.
fn first_nonzero(b: &[u8]) -> Option<usize> {
    let mut chunks = b.chunks_exact(64);
    let mut at = 0;
    for c in &mut chunks {
        // Eight word loads OR-ed (a byte-wise fold compiles to 64 byte
        // loads); `unwrap_or_default` never defaults: chunks are 8 long.
        let any = c.chunks_exact(8).fold(0u64, |a, w| a | u64::from_ne_bytes(w.try_into().unwrap_or_default()));
        if any != 0 {
            return c.iter().position(|&x| x != 0).map(|i| at + i);
        }
        at += 64;
    }
    chunks.remainder().iter().position(|&x| x != 0).map(|i| at + i)
}

/// Bytes of the log from position `from`, read beforehand.
struct Window<'a> {
    bytes: &'a [u8],
    from: u64,
}

impl Source for Window<'_> {
    fn get(&mut self, pos: u64, need: usize) -> Result<Option<&[u8]>> {
        let at = (pos - self.from) as usize;
        Ok(self.bytes.get(at..at + need))
    }
}

/// The valid record of `epoch` at `pos`, if there is one below `limit`:
/// its length with padding and what it holds.
pub(crate) fn read_valid_frame(ring: &Ring, pos: u64, limit: u64, epoch: u64) -> Result<Option<(usize, RecordInfo)>> {
    if pos + RECORD_HEADER as u64 > limit {
        return Ok(None);
    }
    let mut hb = [0u8; RECORD_HEADER];
    ring.read(pos, &mut hb)?;
    let Ok(len) = format::check_header(&RecordHeader::parse(&hb), pos, epoch, ring.area_len) else {
        return Ok(None);
    };
    if pos + len as u64 > limit {
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    ring.read(pos, &mut buf)?;
    Ok(format::decode_record(&buf, pos, epoch, &mut Vec::new()).ok().map(|info| (len, info)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SimDisk;

    /// A status is read from its slot's first block, and the rest of the
    /// slot only when its segment dictionary runs past that block: a long
    /// dictionary (here about 40 KiB) reads back whole from either slot, and
    /// damage past the first block is still found.
    #[test]
    fn a_status_with_a_long_dictionary_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        crate::create_log(&path, format::AREA_OFFSET + format::MIN_AREA).unwrap();
        let LogDevice { ring, mut status, .. } = LogDevice::open(&crate::storage::FileVfs, &path).unwrap();
        for short in [true, false] {
            status.seq += 1;
            status.segments = (0..if short { 3 } else { 200 })
                .map(|i| format::SegmentEntry {
                    id: i + 1,
                    name: format!("/data/{}/segment-{i}", "d".repeat(160)).into(),
                    device: None,
                })
                .collect();
            write_status(&ring, &status).unwrap();
            let read = read_status(ring.dev.as_ref(), &path).unwrap();
            assert_eq!(read, status);
        }
        assert!(Status::encoded_len(&status.encode().unwrap()) > 8 * format::BLOCK as usize);
        // A flip in slot 0's dictionary, past its first block: slot 1 is used.
        let at = Status::slot_offset(0) + 6 * format::BLOCK;
        let mut b = [0u8; 1];
        ring.dev.read_at(&mut b, at).unwrap();
        ring.dev.write_at(&[b[0] ^ 1], at).unwrap();
        assert_eq!(read_status(ring.dev.as_ref(), &path).unwrap(), status);
        ring.dev.write_at(&[b[0] ^ 1], Status::slot_offset(1) + 6 * format::BLOCK).unwrap();
        assert!(read_status(ring.dev.as_ref(), &path).is_err(), "both slots damaged");
    }

    /// A size no file can have is a usage error, and a creation that
    /// fails part way (here the disk refuses the length) leaves no file
    /// behind, so the same path can be tried again.
    #[test]
    fn a_failed_creation_leaves_no_file() {
        let disk = SimDisk::with_max_file_len(1 << 20);
        let path = Path::new("log");
        for size in [u64::MAX, 1 << 63] {
            let e = crate::create_log_with(&disk, path, size).unwrap_err();
            assert!(matches!(e, Error::Log(LogError::BadSize { .. })), "{e:?}");
        }
        assert!(disk.file_names().is_empty());
        let e = crate::create_log_with(&disk, path, 2 << 20).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(disk.file_names().is_empty(), "{:?}", disk.file_names());
        crate::create_log_with(&disk, path, 1 << 20).unwrap();
        crate::Rvm::open_with(Arc::new(disk.clone()), path, crate::Options::default()).unwrap();
    }

    /// A log of an older format (here version 2, whose records this build
    /// cannot read) is refused with a typed error naming both versions,
    /// by recovery and by the inspector, and nothing is written.
    #[test]
    fn an_older_format_is_refused_by_name() {
        let disk = SimDisk::new();
        let path = Path::new("log");
        crate::create_log_with(&disk, path, 256 << 10).unwrap();
        let mut img = disk.durable_image(path).unwrap();
        img[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&img[0..60]);
        img[60..64].copy_from_slice(&crc.to_le_bytes());
        disk.set_durable_image(path, img.clone());
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        let e = crate::Rvm::open_with(vfs, path, crate::Options::default()).unwrap_err();
        assert!(
            matches!(e, Error::Log(LogError::UnsupportedVersion { found: 2, supported: format::VERSION })),
            "{e:?}"
        );
        assert!(e.to_string().contains("version 2"), "{e}");
        let e = inspect::LogInspector::open(&disk, path).unwrap_err();
        assert!(matches!(e, Error::Log(LogError::UnsupportedVersion { found: 2, .. })), "{e:?}");
        assert!(disk.durable_image(path).unwrap() == img, "a refused log was written");
    }
    /// What a scan reported: every record (position, bytes, info, ranges,
    /// transaction so far) and how it ended.
    type Seen = (Vec<(u64, Vec<u8>, RecordInfo, Vec<RangeRef>, u64, u32, u64)>, ScanEnd);

    fn scan_with(ring: &Ring, area: Option<&[u8]>, start: u64, limit: u64, epoch: u64) -> Seen {
        let mut seen = Vec::new();
        let end = scan_records_in(ring, area, start, limit, epoch, |lsn, rec, info, ranges, tx| {
            seen.push((lsn, rec.to_vec(), *info, ranges.to_vec(), tx.start, tx.ranges, tx.bytes));
            Ok(())
        })
        .unwrap();
        (seen, end)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The scan of a mapped log (on one thread or two) and the scan
        /// through `pread` see the same records and stop at the same place, for random logs in real
        /// files: anywhere in the ring (records wrapping around its end),
        /// over leftovers of older laps, with unfinished tails, flipped
        /// bytes and limits.
        #[test]
        fn mapped_and_buffered_scans_agree(
            start in 0u64..(3 << 13),
            epoch in 1u64..40,
            seed in proptest::prelude::any::<u64>(),
            txs in proptest::collection::vec(
                (proptest::collection::vec((1u32..4, 0u64..100_000, 0usize..400), 0..5), proptest::prelude::any::<bool>()),
                0..60,
            ),
            big in proptest::option::of(2_000usize..20_000),
            flips in proptest::collection::vec((0usize..70_000, 1u8..=255), 0..3),
            limit_cut in proptest::option::of(0u64..70_000),
            split in (0u64..20_000, 1usize..20, 1usize..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("log");
            crate::create_log(&path, format::AREA_OFFSET + format::MIN_AREA).unwrap();
            let dev = LogDevice::open(&crate::storage::FileVfs, &path).unwrap();
            let ring = &dev.ring;
            let area_len = ring.area_len;
            // Whatever an older lap left: noise.
            let mut x = seed | 1;
            let noise: Vec<u8> = (0..area_len).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
            ring.write(0, &noise).unwrap();
            let start = start * 8;
            let mut out = Vec::new();
            let mut w = format::FrameWriter::new(&mut out, start, epoch, area_len);
            let mut n = 0u64;
            for (i, (ranges, commit)) in txs.iter().enumerate() {
                for &(seg, off, len) in ranges {
                    let len = if i == 0 { big.unwrap_or(len) } else { len };
                    let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ off) as u8).collect();
                    w.range(seg, off, &data);
                }
                if *commit || ranges.is_empty() {
                    n += 1;
                    w.commit(n, n, start);
                }
            }
            let whole = flips.is_empty() && out.len() < (area_len - 8) as usize;
            out.truncate((area_len - 8) as usize);
            for &(at, x) in &flips {
                if let Some(b) = out.get_mut(at) {
                    *b ^= x;
                }
            }
            ring.write(start, &out).unwrap();
            let view = ring.view().expect("a log file maps");
            for limit in [u64::MAX, limit_cut.map_or(u64::MAX, |c| start + c)] {
                let buffered = scan_with(ring, None, start, limit, epoch);
                let mapped = scan_with(ring, Some(view.bytes()), start, limit, epoch);
                proptest::prop_assert_eq!(&mapped, &buffered);
                // By parts on two threads, cut anywhere, the second thread
                // waited for or not: the same calls (but for the bytes) in
                // order, and the same end.
                let want: Vec<_> =
                    buffered.0.iter().map(|(l, _, i, r, s, n, b)| (*l, *i, r.clone(), *s, *n, *b)).collect();
                // The second thread started in the first chunk, or in a
                // later one (the first part then runs past that chunk).
                let (early, late) = (split.0 / 2, split.0.saturating_mul(5) / 2);
                let (zero, forever) = (std::time::Duration::ZERO, std::time::Duration::MAX);
                for (two_threads, stall, spawn_after) in [(true, zero, early), (true, forever, early), (true, zero, late), (false, zero, early)] {
                    let plan = parallel::Plan {
                        chunks: parallel::Chunks { first: split.0.max(1), grow_every: split.1, max: 1 << 14 },
                        two_threads,
                        spawn_after,
                        stall,
                    };
                    let (end, parts) = parallel::scan_parts(ring, view.bytes(), start, limit, epoch, plan, &Vec::new, &|seen: &mut Vec<_>, lsn, info: &RecordInfo, ranges: &[RangeRef], tx: &TxSoFar| {
                        seen.push((lsn, *info, ranges.to_vec(), tx.start, tx.ranges, tx.bytes));
                        Ok(())
                    }, &mut |_| {})
                    .unwrap();
                    let seen: Vec<_> = parts.into_iter().flatten().collect();
                    proptest::prop_assert_eq!((&seen, end), (&want, buffered.1));
                }
            }
            if whole {
                // Intact: every transaction is found (noise after the end
                // never passes for a record).
                proptest::prop_assert_eq!(scan_with(ring, Some(view.bytes()), start, u64::MAX, epoch).1.transactions, n);
            }
        }
    }

    /// A log file in `dir` of 399 transactions of one 8-byte range each,
    /// from position 0, epoch 5.
    fn log_of_399_transactions(dir: &Path) -> LogDevice {
        let path = dir.join("log");
        crate::create_log(&path, format::AREA_OFFSET + format::MIN_AREA).unwrap();
        let dev = LogDevice::open(&crate::storage::FileVfs, &path).unwrap();
        let mut out = Vec::new();
        let mut w = format::FrameWriter::new(&mut out, 0, 5, dev.ring.area_len);
        for n in 1..400 {
            w.range(1, n * 8, &[n as u8; 8]);
            w.commit(n, n, 0);
        }
        dev.ring.write(0, &out).unwrap();
        dev
    }

    /// A failure of the caller's `on_record` is the result of a scan by
    /// parts, whichever thread met it first, and no record after it is
    /// taken into a part.
    #[test]
    fn a_failing_reader_stops_a_scan_by_parts() {
        let dir = tempfile::tempdir().unwrap();
        let dev = log_of_399_transactions(dir.path());
        let ring = &dev.ring;
        let view = ring.view().unwrap();
        let mut at = Vec::new();
        scan_records(ring, 0, u64::MAX, 5, |lsn, _, _, _, _| {
            at.push(lsn);
            Ok(())
        })
        .unwrap();
        let bad = at[250];
        for stall in [std::time::Duration::ZERO, std::time::Duration::MAX] {
            let plan = parallel::Plan {
                chunks: parallel::Chunks { first: 512, grow_every: 2, max: 2048 },
                two_threads: true,
                spawn_after: 256,
                stall,
            };
            let record = |seen: &mut Vec<u64>, lsn, _: &RecordInfo, _: &[RangeRef], _: &TxSoFar| {
                if lsn == bad {
                    return Err(Error::corrupted("test", "here"));
                }
                seen.push(lsn);
                Ok(())
            };
            let e = parallel::scan_parts(ring, view.bytes(), 0, u64::MAX, 5, plan, &Vec::new, &record, &mut |_| {})
                .unwrap_err();
            assert!(e.to_string().contains("test"), "{e}");
            let (end, parts) = parallel::scan_parts(
                ring,
                view.bytes(),
                0,
                u64::MAX,
                5,
                plan,
                &Vec::new,
                &|_: &mut Vec<u64>, _, _: &RecordInfo, _: &[RangeRef], _: &TxSoFar| Ok(()),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(end.transactions, 399);
            assert!(parts.len() > 3, "{} parts", parts.len());
        }
    }

    /// A panic on the calling thread of a scan by parts stops the second
    /// thread too (the thread scope waits for it before the panic goes
    /// on): it does not scan the rest of the log first.
    #[test]
    fn a_panic_on_the_calling_thread_stops_the_second_one() {
        let dir = tempfile::tempdir().unwrap();
        let dev = log_of_399_transactions(dir.path());
        let ring = &dev.ring;
        let view = ring.view().unwrap();
        let plan = parallel::Plan {
            chunks: parallel::Chunks { first: 512, grow_every: 2, max: 2048 },
            two_threads: true,
            spawn_after: 256,
            stall: std::time::Duration::MAX,
        };
        let on_helper = std::sync::atomic::AtomicUsize::new(0);
        let record = |_: &mut (), lsn: u64, _: &RecordInfo, _: &[RangeRef], _: &TxSoFar| {
            if std::thread::current().name() == Some("rvm-scan") {
                on_helper.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Slow enough that the panic (its hook, the unwinding) is
                // over long before the rest of the log could be scanned,
                // even when the hook prints a backtrace under a sanitizer
                // (RUST_BACKTRACE=1 and ThreadSanitizer: about 2 s).
                std::thread::sleep(std::time::Duration::from_millis(20));
            } else if lsn >= 256 {
                panic!("the reader failed");
            }
            Ok(())
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            parallel::scan_parts(ring, view.bytes(), 0, u64::MAX, 5, plan, &|| (), &record, &mut |_| {})
        }));
        assert!(r.is_err());
        let n = on_helper.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n < 200, "the second thread went on for {n} of 399 records");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The probe past a stopped scan finds the first valid record a
        /// plain walk over every 8-byte position finds, past zeros (which
        /// it skips in runs), holes of the file (which it skips unread),
        /// noise and records, mapped or read.
        #[test]
        fn the_probe_past_a_stop_finds_what_a_plain_walk_finds(
            gap in 0usize..70_000,
            noise in proptest::collection::vec((0usize..80_000, 1u8..=255), 0..20),
            record_at in proptest::option::of(0usize..60_000),
            holes in proptest::collection::vec(0u64..16, 0..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("log");
            crate::create_log(&path, format::AREA_OFFSET + format::MIN_AREA).unwrap();
            let dev = LogDevice::open(&crate::storage::FileVfs, &path).unwrap();
            let ring = &dev.ring;
            let (epoch, lsn) = (5u64, 4096u64);
            let mut img = vec![0u8; 200_000.min(ring.area_len as usize - 4096)];
            for &(at, x) in &noise {
                if let Some(b) = img.get_mut(at) {
                    *b = x;
                }
            }
            if let Some(at) = record_at {
                let pos = lsn + 8 + (gap + at) as u64 / 8 * 8;
                let mut out = Vec::new();
                let mut w = format::FrameWriter::new(&mut out, pos, epoch, ring.area_len);
                w.range(1, 64, &[7; 40]);
                w.commit(1, 1, pos);
                let from = (pos - lsn) as usize;
                if from + out.len() <= img.len() {
                    img[from..from + out.len()].copy_from_slice(&out);
                }
            }
            ring.write(lsn, &img).unwrap();
            // Blocks of the area made holes again (as if never written),
            // over zeros, noise or the record alike.
            for &block in &holes {
                let at = ring.area_offset + block * format::BLOCK;
                punch_hole(ring, at, format::BLOCK);
            }
            let limit = lsn + ring.area_len;
            // The plain walk.
            let window_end = limit.min(lsn + (MAX_RECORD + 64) as u64);
            let mut want = None;
            let mut p = lsn + 8;
            while p + RECORD_HEADER as u64 <= window_end {
                if let Ok(Some(_)) = read_valid_frame(ring, p, limit.min(window_end + (MAX_RECORD + 8) as u64), epoch) {
                    want = Some(p);
                    break;
                }
                p += 8;
            }
            proptest::prop_assert_eq!(probe_valid_frame(ring, None, lsn, limit, epoch).unwrap(), want);
            // Through a scan's mapping, as instant recovery passes it.
            let view = ring.view().unwrap();
            proptest::prop_assert_eq!(probe_valid_frame(ring, Some(view.bytes()), lsn, limit, epoch).unwrap(), want);
        }
    }

    /// Makes `[at, at + len)` of the log's file a hole (zeros where the
    /// file system cannot punch one).
    fn punch_hole(ring: &Ring, at: u64, len: u64) {
        use rustix::fs::{fallocate, FallocateFlags};
        let punched = ring
            .dev
            .raw_fd()
            .is_some_and(|fd| fallocate(fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, at, len).is_ok());
        if !punched {
            ring.dev.write_at(&vec![0; len as usize], at).unwrap();
        }
    }

    /// Where a log file has holes, the written stretches it reports cover
    /// every byte written, and the holes between them read as zeros; the
    /// stretches of the ring wrap at the area's end.
    #[test]
    fn written_stretches_cover_every_written_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        crate::create_log(&path, format::AREA_OFFSET + 16 * format::BLOCK).unwrap();
        let LogDevice { ring, .. } = LogDevice::open(&crate::storage::FileVfs, &path).unwrap();
        let area = ring.area_len;
        punch_hole(&ring, ring.area_offset, area);
        // Blocks 3 and 9 of the area written (a byte each); the rest holes.
        for (lsn, x) in [(3 * 4096 + 100, 1u8), (9 * 4096 + 4095, 2)] {
            ring.write(lsn, &[x]).unwrap();
        }
        // From block 5 of the second lap: a stretch holding block 9, then
        // one holding block 3 after the wrap, then nothing before `end`.
        let from = area + 5 * 4096;
        let mut seen = Vec::new();
        let mut at = from;
        while let Some(s) = ring.written_stretch(at, from + area).unwrap() {
            assert!(s.start >= at && s.end > s.start && s.end <= from + area, "{s:?} from {at}");
            // Holes read as zeros.
            let mut gap = vec![0xffu8; (s.start - at) as usize];
            ring.read(at, &mut gap).unwrap();
            assert!(gap.iter().all(|&b| b == 0), "a hole before {s:?} holds data");
            seen.push(s.clone());
            at = s.end;
        }
        let covered = |lsn: u64| seen.iter().any(|s| s.contains(&lsn));
        assert!(covered(area + 9 * 4096 + 4095) && covered(2 * area + 3 * 4096 + 100), "{seen:?}");
        let mut rest = vec![0xffu8; (from + area - at) as usize];
        ring.read(at, &mut rest).unwrap();
        assert!(rest.iter().all(|&b| b == 0), "the space after the last stretch holds data");
        // Where the file system tells holes apart, block 12 is skipped.
        if ring
            .dev
            .written_from(ring.area_offset + 12 * 4096)
            .unwrap()
            .is_none_or(|r| r.start > ring.area_offset + 12 * 4096)
        {
            assert!(!covered(area + 12 * 4096), "{seen:?}");
        }
    }

    /// A device that reports written stretches at any byte boundaries
    /// (as `written_from` may), its bytes outside them zeros.
    #[derive(Debug)]
    struct Stretched {
        bytes: Vec<u8>,
        /// Sorted, disjoint; `None`: the device cannot tell (the default).
        stretches: Option<Vec<std::ops::Range<u64>>>,
    }

    impl Storage for Stretched {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            buf.copy_from_slice(&self.bytes[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::PermissionDenied.into())
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.bytes.len() as u64)
        }
        fn set_len(&self, _: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::PermissionDenied.into())
        }
        fn sync(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn written_from(&self, offset: u64) -> std::io::Result<Option<std::ops::Range<u64>>> {
            let Some(s) = &self.stretches else { return Ok(Some(offset..u64::MAX)) };
            Ok(s.iter().find(|r| r.end > offset).map(|r| r.start.max(offset)..r.end))
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64)
        ))]
        /// The probe past a stop finds what a plain walk finds on a device
        /// whose written stretches start and end anywhere (not only at
        /// blocks), tiny ones too, in a window that wraps around the end of
        /// a small ring; the stretches `written_stretch` reports hold every
        /// byte that is not zero.
        #[test]
        fn the_probe_over_any_stretches_finds_what_a_plain_walk_finds(
            area_blocks in 16u64..40,
            at in 0u64..40 * 4096,
            back in 0u64..4096,
            records in proptest::collection::vec((0u64..160_000, 1u32..3000), 0..3),
            noise in proptest::collection::vec((0u64..160_000, 1u8..=255), 0..30),
            cuts in proptest::collection::vec((0u64..160_000, 0u64..9000), 0..12),
            tell in proptest::prelude::any::<bool>(),
        ) {
            let area_len = area_blocks * format::BLOCK;
            let area_offset = format::BLOCK;
            let epoch = 3u64;
            // The stop, somewhere in the second lap, 8-aligned.
            let lsn = area_len + (at % area_len) / 8 * 8;
            let start = lsn.saturating_sub(back / 8 * 8).max(area_len);
            let mut area = vec![0u8; area_len as usize];
            let put = |area: &mut Vec<u8>, pos: u64, b: &[u8]| {
                for (i, &x) in b.iter().enumerate() {
                    area[((pos + i as u64) % area_len) as usize] = x;
                }
            };
            for &(off, len) in &records {
                let pos = lsn + 8 + off % (area_len - 8) / 8 * 8;
                let mut out = Vec::new();
                let mut w = format::FrameWriter::new(&mut out, pos, epoch, area_len);
                w.range(1, 64, &vec![9; len as usize]);
                w.commit(1, 1, pos);
                put(&mut area, pos, &out);
            }
            for &(off, x) in &noise {
                put(&mut area, lsn + off, &[x]);
            }
            // Stretches: the area minus the cuts (zeroed), any alignment.
            let mut holes: Vec<(u64, u64)> =
                cuts.iter().map(|&(o, n)| (o % area_len, (o % area_len + n).min(area_len))).collect();
            holes.sort_unstable();
            let mut stretches = Vec::new();
            let mut from = 0u64;
            for (a, b) in holes {
                area[a as usize..b as usize].fill(0);
                if a > from {
                    stretches.push(area_offset + from..area_offset + a);
                }
                from = from.max(b);
            }
            if from < area_len {
                stretches.push(area_offset + from..area_offset + area_len);
            }
            let mut bytes = vec![0u8; area_offset as usize];
            bytes.extend_from_slice(&area);
            bytes.extend_from_slice(&[0xAB; 64]);
            let dev = Stretched { bytes, stretches: tell.then_some(stretches) };
            let ring = Ring { dev: Arc::new(dev), path: PathBuf::from("stretched"), area_offset, area_len };
            let limit = start + area_len;
            // Every byte not zero lies in a reported stretch.
            let mut seen = Vec::new();
            let mut p = lsn;
            while let Some(s) = ring.written_stretch(p, limit).unwrap() {
                proptest::prop_assert!(s.start >= p && s.end > s.start && s.end <= limit, "{:?} from {}", s, p);
                seen.push(s.clone());
                p = s.end;
            }
            for q in lsn..limit {
                if area[(q % area_len) as usize] != 0 {
                    proptest::prop_assert!(seen.iter().any(|s| s.contains(&q)), "byte {} outside {:?}", q, seen);
                }
            }
            // The plain walk.
            let window_end = limit.min(lsn + (MAX_RECORD + 64) as u64);
            let mut want = None;
            let mut p = lsn + 8;
            while p + RECORD_HEADER as u64 <= window_end {
                if let Ok(Some(_)) = read_valid_frame(&ring, p, limit.min(window_end + (MAX_RECORD + 8) as u64), epoch) {
                    want = Some(p);
                    break;
                }
                p += 8;
            }
            proptest::prop_assert_eq!(probe_valid_frame(&ring, None, lsn, limit, epoch).unwrap(), want);
            proptest::prop_assert_eq!(probe_valid_frame(&ring, Some(&area), lsn, limit, epoch).unwrap(), want);
        }
    }

    /// A view is made only of bytes the file holds.
    #[test]
    fn a_view_never_reaches_past_the_file() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::File::options().read(true).write(true).create_new(true).open(&path).unwrap();
        f.set_len(3 * 4096 + 10).unwrap();
        assert!(crate::mem::FileView::new(f.as_fd(), 0, 3 * 4096 + 10).is_some());
        assert!(crate::mem::FileView::new(f.as_fd(), 4096, 2 * 4096 + 11).is_none());
        assert!(crate::mem::FileView::new(f.as_fd(), 100, 4096).is_none(), "unaligned offset");
        assert!(crate::mem::FileView::new(f.as_fd(), 0, 0).is_none());
    }
}
