//! The log's on-disk format (version 3): superblock, two status slots,
//! and compact records (varint-encoded ranges, one checksum per record). All integers are little-endian. Byte offsets are
//! documented in `docs/DESIGN.md` and mirrored by the constants here.
//!
//! Every decoder here takes untrusted bytes and returns a typed result; none
//! panics, whatever the input.

use std::path::PathBuf;

/// Size of the superblock and the alignment of every on-disk area.
pub const BLOCK: u64 = 4096;
/// Size of one status slot (two of them follow the superblock).
pub const STATUS_SLOT: u64 = 64 * 1024;
/// Where the record area starts.
pub const AREA_OFFSET: u64 = BLOCK + 2 * STATUS_SLOT;
/// The smallest record area accepted at creation.
pub const MIN_AREA: u64 = 64 * 1024;
/// Format version written and read by this build.
pub const VERSION: u32 = 3;
/// Superblock magic.
pub const LOG_MAGIC: [u8; 8] = *b"RVMLOG\0\x01";
/// Status slot magic.
pub const STATUS_MAGIC: [u8; 8] = *b"RVMSTAT1";

/// Bytes of a record's fixed header (CRC, length, tag, flags).
pub const RECORD_HEADER: usize = 9;
/// The shortest valid record: header, the end-of-ranges byte.
pub const RECORD_MIN: usize = RECORD_HEADER + 1;
/// Bytes of range encoding (control, segment, offset, data) one record
/// holds at most; longer ranges continue in the next record.
pub const RECORD_CAPACITY: usize = 1 << 20;
/// A range is split at a record's end only if at least this much of it
/// fits there (otherwise the record is closed and the range starts anew).
pub const MIN_SPLIT: usize = 64;
/// Bytes a range's encoding adds to its data at most: control varint (4),
/// segment id (5), offset delta (10).
pub const RANGE_OVERHEAD_MAX: usize = 19;
/// Bytes a range usually adds to its data inside a record: the control
/// varint and an offset delta of one or two bytes (the segment id comes
/// only when it changes). Logging a gap of unchanged bytes this long costs
/// what a second range would.
pub const RANGE_HEADER_TYPICAL: usize = 3;
/// Bytes a record adds besides its ranges at most: header, end-of-ranges
/// byte, commit trailer (three varints), padding.
pub const RECORD_OVERHEAD_MAX: usize = RECORD_HEADER + 1 + 30 + 7;
/// No valid record is longer than this (bounds every read of untrusted
/// input).
pub const MAX_RECORD: usize = RECORD_HEADER + RECORD_CAPACITY + 1 + 30;
/// Status bytes before the segment dictionary.
pub const STATUS_FIXED: usize = 80;
/// Counters and positions in a status must stay below this (a status past
/// it is refused as damaged), so incrementing them can never overflow.
pub const MAX_POSITION: u64 = 1 << 62;
/// A log whose status has a position, sequence number or epoch at or past
/// this is refused at open (`Error::Corrupted`): every open and status
/// write increments them, and a status that reached [`MAX_POSITION`]
/// would be refused at the next open, losing what came after it. No log
/// gets here by use (2^61 bytes of records, or status writes); a crafted
/// status does.
pub const OPEN_LIMIT: u64 = MAX_POSITION / 2;
/// Room for the segment dictionary in one slot.
pub const DICT_LIMIT: usize = STATUS_SLOT as usize - STATUS_FIXED;

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Rounds `n` up to a multiple of 8 (frames are 8-byte aligned).
pub const fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// The superblock: fixed facts about the log, written once at creation.
///
/// Layout (block 0): magic `[0..8)`, version u32 `[8..12)`, block size u32
/// `[12..16)`, device size u64 `[16..24)`, area offset u64 `[24..32)`, area
/// length u64 `[32..40)`, status slot length u32 `[40..44)`, log id u128
/// `[44..60)`, CRC32C of `[0..60)` u32 `[60..64)`; the rest of the block is
/// zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// A random identity given at creation: segments name the log that
    /// holds their unapplied records by it.
    pub log_id: u128,
    /// Size of the log device in bytes.
    pub device_size: u64,
    /// Offset of the record area.
    pub area_offset: u64,
    /// Length of the record area (the ring's capacity).
    pub area_len: u64,
}

/// Why a superblock was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperblockError {
    /// Not a log at all.
    BadMagic,
    /// A version this build does not read.
    Version(u32),
    /// Checksum or field checks failed.
    Corrupt(&'static str),
}

impl Superblock {
    /// The layout for a log device of `device_size` bytes.
    pub fn for_size(device_size: u64) -> Option<Superblock> {
        let area_len = device_size.checked_sub(AREA_OFFSET)? / BLOCK * BLOCK;
        (area_len >= MIN_AREA).then_some(Superblock {
            log_id: random_u128(),
            device_size,
            area_offset: AREA_OFFSET,
            area_len,
        })
    }

    /// Encodes into one block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(&LOG_MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 12, BLOCK as u32);
        put_u64(&mut b, 16, self.device_size);
        put_u64(&mut b, 24, self.area_offset);
        put_u64(&mut b, 32, self.area_len);
        put_u32(&mut b, 40, STATUS_SLOT as u32);
        b[44..60].copy_from_slice(&self.log_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..60]);
        put_u32(&mut b, 60, crc);
        b
    }

    /// Decodes and validates a block read from offset 0.
    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() < 64 || b[0..6] != LOG_MAGIC[0..6] {
            return Err(SuperblockError::BadMagic);
        }
        if b[0..8] != LOG_MAGIC || le_u32(b, 8) != VERSION {
            return Err(SuperblockError::Version(le_u32(b, 8)));
        }
        if crc32c::crc32c(&b[0..60]) != le_u32(b, 60) {
            return Err(SuperblockError::Corrupt("checksum mismatch"));
        }
        if le_u32(b, 12) as u64 != BLOCK || le_u32(b, 40) as u64 != STATUS_SLOT {
            return Err(SuperblockError::Corrupt("unsupported block or slot size"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[44..60]);
        let sb = Superblock {
            log_id: u128::from_le_bytes(id),
            device_size: le_u64(b, 16),
            area_offset: le_u64(b, 24),
            area_len: le_u64(b, 32),
        };
        if sb.area_offset != AREA_OFFSET
            || sb.area_len < MIN_AREA
            || !sb.area_len.is_multiple_of(BLOCK)
            || sb.area_offset.checked_add(sb.area_len).is_none_or(|end| end > sb.device_size)
        {
            return Err(SuperblockError::Corrupt("area outside the device"));
        }
        Ok(sb)
    }
}

/// One entry of the segment dictionary: which segment a frame's id means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentEntry {
    /// The id frames use.
    pub id: u32,
    /// The segment's canonical name (a path).
    pub name: PathBuf,
    /// The identity of the device that was opened under that name, so that
    /// recovery never applies records to another file put in its place
    /// (`None`: the device has no stable identity, such as a block device).
    pub device: Option<DeviceId>,
}

/// What identifies one file across renames (not across copies): its inode
/// number and birth time. Recorded per segment in the log's dictionary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId {
    /// The file's inode number.
    pub file: u64,
    /// The file's birth time in nanoseconds since the epoch (0 where the
    /// file system does not record one).
    pub birth: u64,
}

impl DeviceId {
    /// Whether both identify the same file: same inode, and the same birth
    /// time where both are known (a birth time of 0 means unknown).
    pub fn same_file(&self, other: &DeviceId) -> bool {
        self.file == other.file && (self.birth == other.birth || self.birth == 0 || other.birth == 0)
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "inode {} born {}", self.file, self.birth)
    }
}

/// Bytes of a dictionary entry before its name: id u32, name length u16,
/// flags u16 (bit 0: device id present), inode u64, birth u64.
const ENTRY_FIXED: usize = 24;

/// A random 128-bit value from the standard library's randomly seeded
/// hasher keys (no extra dependency; uniqueness, not secrecy, is needed).
fn random_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut parts = [0u64; 2];
    for (i, part) in parts.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i as u64);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        *part = h.finish();
    }
    (u128::from(parts[0]) << 64) | u128::from(parts[1])
}

/// The log's mutable state, written to both slots in turn (each synced).
///
/// Layout of a slot: magic `[0..8)`, seq u64 `[8..16)`, epoch u64
/// `[16..24)`, head LSN u64 `[24..32)`, tail hint u64 `[32..40)`,
/// checkpoint LSN u64 `[40..48)`, checkpoint generation u64 `[48..56)`,
/// committed transactions u64 `[56..64)`, next segment id u32 `[64..68)`,
/// dictionary entries u32 `[68..72)`, dictionary bytes u32 `[72..76)`,
/// CRC32C u32 `[76..80)` over `[0..76)` followed by the dictionary; the
/// dictionary at `[80..)`: per entry id u32, name length u16, flags u16,
/// inode u64, birth u64, name bytes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Status {
    /// Write sequence; the valid slot with the larger one wins (both slots
    /// hold the same status once a status write has finished).
    pub seq: u64,
    /// Incremented at every open; frames carry it, so frames left over from
    /// before a crash can never be mistaken for new ones.
    pub epoch: u64,
    /// Oldest live log position.
    pub head: u64,
    /// The log was durable up to this position when the status was written:
    /// a scan that stops before it has met damaged synced records.
    pub synced_end: u64,
    /// Log position of the last completed checkpoint (0 = none).
    pub checkpoint_lsn: u64,
    /// Generation of the last completed checkpoint.
    pub checkpoint_generation: u64,
    /// Log transactions applied to segments by log replay (recovery and
    /// truncation) over the log's life (statistics). A checkpoint frees the
    /// log without reading it and does not add to it.
    pub committed: u64,
    /// Next unused segment id.
    pub next_segment_id: u32,
    /// Segments that live records may name.
    pub segments: Vec<SegmentEntry>,
}

impl Status {
    /// Bytes the dictionary takes when encoded.
    pub fn dict_len(segments: &[SegmentEntry]) -> usize {
        segments.iter().map(|s| ENTRY_FIXED + s.name.as_os_str().len()).sum()
    }

    /// Encodes into a slot image (None if the dictionary does not fit).
    pub fn encode(&self) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let dict = Self::dict_len(&self.segments);
        if dict > DICT_LIMIT || self.segments.iter().any(|s| s.name.as_os_str().len() > u16::MAX as usize) {
            return None;
        }
        let mut b = vec![0u8; STATUS_FIXED + dict];
        b[0..8].copy_from_slice(&STATUS_MAGIC);
        put_u64(&mut b, 8, self.seq);
        put_u64(&mut b, 16, self.epoch);
        put_u64(&mut b, 24, self.head);
        put_u64(&mut b, 32, self.synced_end);
        put_u64(&mut b, 40, self.checkpoint_lsn);
        put_u64(&mut b, 48, self.checkpoint_generation);
        put_u64(&mut b, 56, self.committed);
        put_u32(&mut b, 64, self.next_segment_id);
        put_u32(&mut b, 68, self.segments.len() as u32);
        put_u32(&mut b, 72, dict as u32);
        let mut at = STATUS_FIXED;
        for s in &self.segments {
            let name = s.name.as_os_str().as_bytes();
            put_u32(&mut b, at, s.id);
            b[at + 4..at + 6].copy_from_slice(&(name.len() as u16).to_le_bytes());
            let dev = s.device.unwrap_or(DeviceId { file: 0, birth: 0 });
            b[at + 6..at + 8].copy_from_slice(&u16::from(s.device.is_some()).to_le_bytes());
            put_u64(&mut b, at + 8, dev.file);
            put_u64(&mut b, at + 16, dev.birth);
            b[at + ENTRY_FIXED..at + ENTRY_FIXED + name.len()].copy_from_slice(name);
            at += ENTRY_FIXED + name.len();
        }
        let mut crc = crc32c::crc32c(&b[0..76]);
        crc = crc32c::crc32c_append(crc, &b[STATUS_FIXED..]);
        put_u32(&mut b, 76, crc);
        Some(b)
    }

    /// The bytes of a slot its status takes, as its fixed part (the first
    /// [`STATUS_FIXED`] bytes of `b`) says: the fixed part and the segment
    /// dictionary. Unchecked (a damaged length is found by
    /// [`Status::decode`]); [`STATUS_FIXED`] if `b` is shorter than that.
    pub fn encoded_len(b: &[u8]) -> usize {
        if b.len() < STATUS_FIXED {
            return STATUS_FIXED;
        }
        STATUS_FIXED.saturating_add(le_u32(b, 72) as usize)
    }

    /// Decodes a slot image; `None` for anything that is not a whole,
    /// valid status (a torn or never-written slot).
    pub fn decode(b: &[u8]) -> Option<Status> {
        use std::os::unix::ffi::OsStrExt;
        if b.len() < STATUS_FIXED || b[0..8] != STATUS_MAGIC {
            return None;
        }
        let count = le_u32(b, 68) as usize;
        let dict = Status::encoded_len(b) - STATUS_FIXED;
        if dict > DICT_LIMIT || STATUS_FIXED + dict > b.len() {
            return None;
        }
        let mut crc = crc32c::crc32c(&b[0..76]);
        crc = crc32c::crc32c_append(crc, &b[STATUS_FIXED..STATUS_FIXED + dict]);
        if crc != le_u32(b, 76) {
            return None;
        }
        let d = &b[STATUS_FIXED..STATUS_FIXED + dict];
        let mut segments = Vec::with_capacity(count.min(dict / ENTRY_FIXED));
        let mut at = 0;
        for _ in 0..count {
            if at + ENTRY_FIXED > d.len() {
                return None;
            }
            let id = le_u32(d, at);
            let n = u16::from_le_bytes([d[at + 4], d[at + 5]]) as usize;
            let flags = u16::from_le_bytes([d[at + 6], d[at + 7]]);
            if flags > 1 || at + ENTRY_FIXED + n > d.len() {
                return None;
            }
            let device = (flags == 1).then(|| DeviceId { file: le_u64(d, at + 8), birth: le_u64(d, at + 16) });
            let name = PathBuf::from(std::ffi::OsStr::from_bytes(&d[at + ENTRY_FIXED..at + ENTRY_FIXED + n]));
            segments.push(SegmentEntry { id, name, device });
            at += ENTRY_FIXED + n;
        }
        if at != d.len() {
            return None;
        }
        let (seq, epoch, head) = (le_u64(b, 8), le_u64(b, 16), le_u64(b, 24));
        if seq >= MAX_POSITION || epoch >= MAX_POSITION || head >= MAX_POSITION {
            return None;
        }
        Some(Status {
            seq,
            epoch,
            head,
            synced_end: le_u64(b, 32),
            checkpoint_lsn: le_u64(b, 40),
            checkpoint_generation: le_u64(b, 48),
            committed: le_u64(b, 56),
            next_segment_id: le_u32(b, 64),
            segments,
        })
    }

    /// Offset of status slot `slot` (0 or 1).
    pub fn slot_offset(slot: u64) -> u64 {
        BLOCK + (slot % 2) * STATUS_SLOT
    }
}

/// Kinds of the logical items a record holds (as scans report them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// New value of a byte range of a segment.
    Range = 1,
    /// Ends a transaction: everything since the previous commit is atomic.
    Commit = 2,
}

/// Record flag: the record closes a transaction (a commit trailer follows
/// its ranges).
pub const FLAG_COMMIT: u8 = 1;
/// Record flag: the record is the first of its transaction.
pub const FLAG_FIRST: u8 = 2;

/// Reads the fixed record header `[0..RECORD_HEADER)`: CRC32C u32
/// `[0..4)`, length u24 `[4..7)` (bytes of the record before padding),
/// tag u8 `[7]` (epoch mod 16 in the low nibble, lap of the ring mod 16 in
/// the high one), flags u8 `[8]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Checksum of the record, seeded with its position and epoch.
    pub crc: u32,
    /// Record length before padding.
    pub len: u32,
    /// Epoch and lap nibbles.
    pub tag: u8,
    /// [`FLAG_COMMIT`], [`FLAG_FIRST`].
    pub flags: u8,
}

impl RecordHeader {
    /// Parses the fixed bytes (no validation beyond layout).
    pub fn parse(b: &[u8; RECORD_HEADER]) -> RecordHeader {
        RecordHeader { crc: le_u32(b, 0), len: u32::from_le_bytes([b[4], b[5], b[6], 0]), tag: b[7], flags: b[8] }
    }
}

/// The tag byte of a record at `lsn` in `epoch` of a ring of `area_len`.
pub fn record_tag(lsn: u64, epoch: u64, area_len: u64) -> u8 {
    let lap = lsn / area_len.max(1);
    ((epoch & 15) | ((lap & 15) << 4)) as u8
}

/// The checksum of a record at `lsn` in `epoch`: CRC32C over the position
/// and epoch (u64 LE each, not stored) followed by bytes `[4..len)`.
fn record_crc(lsn: u64, epoch: u64, rest: &[u8]) -> u32 {
    crate::crc::seeded(lsn, epoch, rest)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Reads a varint at `*at`, advancing it; `None` past the end or for more
/// than ten bytes or a value above `u64::MAX`.
#[inline(always)]
fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    varint_with(|i| b.get(i).copied(), at)
}

/// [`get_varint`] of bytes `byte(i)` gives (`None` past the end).
#[inline(always)]
fn varint_with(byte: impl Fn(usize) -> Option<u8>, at: &mut usize) -> Option<u64> {
    let first = byte(*at)?;
    if first < 0x80 {
        *at += 1;
        return Some(u64::from(first));
    }
    let mut v = 0u64;
    for i in 0..10 {
        let byte = byte(*at + i)?;
        let bits = u64::from(byte & 0x7f);
        if i == 9 && byte > 1 {
            return None;
        }
        v |= bits << (7 * i);
        if byte < 0x80 {
            *at += i + 1;
            return Some(v);
        }
    }
    None
}

fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Reads `count` range items of one segment that follow one another in a
/// record, the first at `byte(0)` (`byte(i)`: the item bytes from there on,
/// `None` past them), calling `f(offset, data_at, len)` for each range
/// (`data_at` counted like `byte`'s positions). The first range's offset is
/// given (`first`: a reader that knows it need not read the ranges before
/// it; the offsets of the next ones are relative to it, so it may be given
/// in any frame, such as an offset in a page). False at the first item that
/// does not read, or when `f` says so: the bytes are not the ones the
/// verifying scan read.
pub(crate) fn read_items(
    byte: impl Fn(usize) -> Option<u8>,
    first: u64,
    count: usize,
    mut f: impl FnMut(u64, usize, u32) -> bool,
) -> bool {
    let (mut at, mut offset) = (0usize, first);
    for k in 0..count {
        let Some(ctl) = varint_with(&byte, &mut at).and_then(|c| c.checked_sub(1)) else { return false };
        if ctl & 1 == 1 && varint_with(&byte, &mut at).is_none() {
            return false;
        }
        let Some(delta) = varint_with(&byte, &mut at) else { return false };
        let Ok(len) = u32::try_from(ctl >> 1) else { return false };
        if k > 0 {
            offset = offset.wrapping_add(unzigzag(delta) as u64);
        }
        if !f(offset, at, len) {
            return false;
        }
        at += len as usize;
        offset = offset.wrapping_add(u64::from(len));
    }
    true
}

/// Appends records to a byte buffer, assigning consecutive log positions.
///
/// A log transaction is a run of records whose last one carries
/// [`FLAG_COMMIT`]; ranges are packed into records of at most
/// [`RECORD_CAPACITY`] bytes of range encoding, a range that does not fit
/// being split across two records.
#[derive(Debug)]
pub struct FrameWriter<'a> {
    out: &'a mut Vec<u8>,
    lsn: u64,
    epoch: u64,
    area_len: u64,
    /// Where the open record starts in `out`, if one is open.
    open: Option<usize>,
    /// Whether the next record is the first of its transaction.
    first: bool,
    /// Segment and end offset of the last range in the open record.
    segment: u32,
    prev_end: u64,
}

impl<'a> FrameWriter<'a> {
    /// Records appended to `out` start at log position `lsn`, in `epoch`,
    /// in a ring of `area_len` bytes.
    pub fn new(out: &'a mut Vec<u8>, lsn: u64, epoch: u64, area_len: u64) -> Self {
        FrameWriter { out, lsn, epoch, area_len, open: None, first: true, segment: 0, prev_end: 0 }
    }

    /// Log position after the last closed record.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    fn start_record(&mut self) -> usize {
        let start = self.out.len();
        self.out.extend_from_slice(&[0u8; RECORD_HEADER]);
        self.out[start + 8] = if self.first { FLAG_FIRST } else { 0 };
        self.first = false;
        self.open = Some(start);
        self.prev_end = 0;
        start
    }

    /// Ends the open record (commit trailer already appended, if any):
    /// length, tag, checksum, padding.
    fn close_record(&mut self, start: usize) {
        let len = self.out.len() - start;
        self.out.resize(start + align8(len), 0);
        let f = &mut self.out[start..];
        f[4..7].copy_from_slice(&(len as u32).to_le_bytes()[..3]);
        f[7] = record_tag(self.lsn, self.epoch, self.area_len);
        let crc = record_crc(self.lsn, self.epoch, &f[4..len]);
        put_u32(f, 0, crc);
        self.lsn += align8(len) as u64;
        self.open = None;
    }

    /// Appends the new value `data` of `[offset, offset + len)` of segment
    /// `segment` to the transaction being written.
    pub fn range(&mut self, segment: u32, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        loop {
            let start = match self.open {
                Some(s) => s,
                None => self.start_record(),
            };
            let used = self.out.len() - start - RECORD_HEADER;
            let fresh = used == 0;
            let new_segment = fresh || segment != self.segment;
            let at = offset.wrapping_add(done as u64);
            let delta = zigzag(at.wrapping_sub(self.prev_end) as i64);
            let rest = data.len() - done;
            // Encoding before the data, for the longest piece that fits.
            let fixed = 4 + if new_segment { varint_len(u64::from(segment)) } else { 0 } + varint_len(delta);
            let room = RECORD_CAPACITY.saturating_sub(used + fixed);
            if room == 0 || (room < rest && room < MIN_SPLIT && !fresh) {
                // Full: close this record and go on in the next one.
                self.out.push(0);
                self.close_record(start);
                continue;
            }
            let n = rest.min(room);
            put_varint(self.out, (((n as u64) << 1) | u64::from(new_segment)) + 1);
            if new_segment {
                put_varint(self.out, u64::from(segment));
            }
            put_varint(self.out, delta);
            self.out.extend_from_slice(&data[done..done + n]);
            self.segment = segment;
            self.prev_end = at.wrapping_add(n as u64);
            done += n;
            if done == data.len() {
                return;
            }
        }
    }

    /// Closes the transaction: its last record gets the commit trailer —
    /// the first and last commit sequence numbers it covers and `synced`,
    /// the position up to which the log was durable when it was made (a
    /// later reader that finds this record knows that everything before
    /// `synced` was acknowledged, so a bad record there is damage, not a
    /// torn write). `synced` must not lie beyond the record.
    pub fn commit(&mut self, first_tx: u64, last_tx: u64, synced: u64) {
        let start = match self.open {
            Some(s) => s,
            None => self.start_record(),
        };
        self.out[start + 8] |= FLAG_COMMIT;
        self.out.push(0);
        put_varint(self.out, first_tx);
        put_varint(self.out, last_tx.wrapping_sub(first_tx));
        put_varint(self.out, self.lsn.saturating_sub(synced));
        self.close_record(start);
        self.first = true;
    }
}

/// Log bytes a transaction of `ranges` ranges and `data` data bytes takes
/// at most (records, headers, trailers, padding): what a batch is bounded
/// by so that it always fits in the log.
pub fn transaction_bytes_max(ranges: u64, data: u64) -> u64 {
    let encoded = data + ranges * RANGE_OVERHEAD_MAX as u64;
    // Every record but the last is full to within one range's overhead
    // and a split's minimum, and a split adds one range overhead.
    let records = 1 + encoded / (RECORD_CAPACITY - 2 * RANGE_OVERHEAD_MAX - MIN_SPLIT) as u64;
    encoded + records * (RECORD_OVERHEAD_MAX + RANGE_OVERHEAD_MAX) as u64
}

/// One range as a record holds it: the data is at `data_at..data_at + len`
/// of the record's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeRef {
    /// Segment id.
    pub segment: u32,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Where the data starts in the record.
    pub data_at: u32,
    /// Where its item (the varints before the data) starts in the record.
    pub item_at: u32,
    /// Data bytes.
    pub len: u32,
}

/// A record that passed its checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    /// [`FLAG_COMMIT`], [`FLAG_FIRST`].
    pub flags: u8,
    /// Record length with padding (the next record starts this far on).
    pub len: usize,
    /// The commit trailer (`first_tx`, `last_tx`, `synced`), for a record
    /// that closes its transaction.
    pub commit: Option<(u64, u64, u64)>,
    /// Data bytes of its ranges.
    pub data_bytes: u64,
    /// If all its ranges name one segment: that segment and the furthest
    /// byte they reach (`None`: no range, or several segments). Recovery
    /// notes how far each segment is written from this, not range by
    /// range, for the usual record.
    pub one_segment_end: Option<(u32, u64)>,
}

/// A logical item of a record that passed its checks, as scans report them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// New bytes for `[offset, offset + data.len())` of `segment`.
    Range {
        /// Segment id.
        segment: u32,
        /// Byte offset in the segment.
        offset: u64,
        /// The new bytes.
        data: &'a [u8],
    },
    /// The end of a transaction.
    Commit {
        /// Number of ranges in the transaction.
        ranges: u32,
        /// First commit sequence number the transaction covers.
        first_tx: u64,
        /// Last commit sequence number it covers.
        last_tx: u64,
        /// Data bytes in its ranges.
        bytes: u64,
        /// The log was durable up to this position when the record was made.
        synced: u64,
    },
}

/// Why a record was refused: the log ends (cleanly or not) there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameDefect {
    /// Length too small or too large.
    BadLength,
    /// The record belongs to an older lap of the ring.
    WrongPosition,
    /// The record belongs to an earlier epoch (left over from before a crash).
    WrongEpoch,
    /// The checksum does not match.
    BadChecksum,
    /// Unknown flags, or fields inconsistent with the length.
    BadBody,
}

impl FrameDefect {
    /// Human-readable reason.
    pub fn describe(self) -> &'static str {
        match self {
            FrameDefect::BadLength => "bad record length",
            FrameDefect::WrongPosition => "record from another lap of the ring",
            FrameDefect::WrongEpoch => "record from an earlier epoch",
            FrameDefect::BadChecksum => "checksum mismatch",
            FrameDefect::BadBody => "malformed record body",
        }
    }
}

/// Checks a header against the position and epoch where it was read;
/// returns the record's length with padding (what to read).
pub fn check_header(h: &RecordHeader, lsn: u64, epoch: u64, area_len: u64) -> Result<usize, FrameDefect> {
    let len = h.len as usize;
    if !(RECORD_MIN..=MAX_RECORD).contains(&len) {
        return Err(FrameDefect::BadLength);
    }
    let want = record_tag(lsn, epoch, area_len);
    if h.tag & 15 != want & 15 {
        return Err(FrameDefect::WrongEpoch);
    }
    if h.tag != want {
        return Err(FrameDefect::WrongPosition);
    }
    Ok(align8(len))
}

/// Validates a whole record read at `lsn` in `epoch` (header checked by
/// [`check_header`]; `f` holds at least its length with padding) and
/// lists its ranges in `ranges` (cleared first).
pub fn decode_record(f: &[u8], lsn: u64, epoch: u64, ranges: &mut Vec<RangeRef>) -> Result<RecordInfo, FrameDefect> {
    let f = &f[..record_len(f)?];
    if record_crc(lsn, epoch, &f[4..]) != le_u32(f, 0) {
        ranges.clear();
        return Err(FrameDefect::BadChecksum);
    }
    decode_body(f, lsn, ranges)
}

/// Whether `f` has a record's shape, as [`decode_record`] checks it but
/// without its checksum (a walk over the items, not over their bytes):
/// probing for a record at every 8-byte position, where bytes that pass
/// the header's checks by chance claim lengths of up to a MiB, this
/// refuses nearly all of them before a checksum over that length.
/// `ranges` is scratch.
pub fn has_record_shape(f: &[u8], lsn: u64, ranges: &mut Vec<RangeRef>) -> bool {
    record_len(f).is_ok_and(|len| decode_body(&f[..len], lsn, ranges).is_ok())
}

/// The length a record's header gives, if it is one a record can have and
/// `f` holds it with its padding.
fn record_len(f: &[u8]) -> Result<usize, FrameDefect> {
    if f.len() < RECORD_HEADER {
        return Err(FrameDefect::BadLength);
    }
    let len = u32::from_le_bytes([f[4], f[5], f[6], 0]) as usize;
    if !(RECORD_MIN..=MAX_RECORD).contains(&len) || align8(len) > f.len() {
        return Err(FrameDefect::BadLength);
    }
    Ok(len)
}

/// The flags, ranges and commit trailer of the record `f` (exactly its
/// length, checksum not checked here), listed in `ranges` (cleared first).
fn decode_body(f: &[u8], lsn: u64, ranges: &mut Vec<RangeRef>) -> Result<RecordInfo, FrameDefect> {
    ranges.clear();
    let len = f.len();
    let flags = f[8];
    if flags & !(FLAG_COMMIT | FLAG_FIRST) != 0 {
        return Err(FrameDefect::BadBody);
    }
    let bad = FrameDefect::BadBody;
    let mut at = RECORD_HEADER;
    let (mut segment, mut prev_end, mut data_bytes) = (None, 0u64, 0u64);
    let (mut span, mut several) = (None::<(u32, u64)>, false);
    loop {
        let item_at = at as u32;
        let ctl = get_varint(f, &mut at).ok_or(bad)?;
        if ctl == 0 {
            break;
        }
        let ctl = ctl - 1;
        if ctl & 1 == 1 {
            let id = get_varint(f, &mut at).ok_or(bad)?;
            segment = Some(u32::try_from(id).map_err(|_| bad)?);
        }
        let segment = segment.ok_or(bad)?;
        let offset = prev_end.wrapping_add(unzigzag(get_varint(f, &mut at).ok_or(bad)?) as u64);
        let n = ctl >> 1;
        if n > RECORD_CAPACITY as u64 || (len - at) < n as usize {
            return Err(bad);
        }
        let end = offset.checked_add(n).ok_or(bad)?;
        ranges.push(RangeRef { segment, offset, data_at: at as u32, item_at, len: n as u32 });
        match &mut span {
            Some((s, e)) if *s == segment => *e = (*e).max(end),
            Some(_) => several = true,
            None => span = Some((segment, end)),
        }
        at += n as usize;
        prev_end = end;
        data_bytes += n;
    }
    let commit = if flags & FLAG_COMMIT != 0 {
        let first = get_varint(f, &mut at).ok_or(bad)?;
        let last = first.checked_add(get_varint(f, &mut at).ok_or(bad)?).ok_or(bad)?;
        let synced = lsn.checked_sub(get_varint(f, &mut at).ok_or(bad)?).ok_or(bad)?;
        Some((first, last, synced))
    } else {
        None
    };
    // A record holds a range or closes its transaction: every record has
    // an item to report.
    if at != len || (ranges.is_empty() && commit.is_none()) {
        return Err(bad);
    }
    Ok(RecordInfo { flags, len: align8(len), commit, data_bytes, one_segment_end: span.filter(|_| !several) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock::for_size(1 << 20).unwrap();
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b), Ok(sb));
        for i in 0..64 {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert!(Superblock::decode(&d).is_err(), "flip at {i} accepted");
        }
        assert!(Superblock::for_size(AREA_OFFSET + MIN_AREA - 1).is_none());
    }

    #[test]
    fn status_round_trips_and_rejects_every_flip() {
        let st = Status {
            seq: 7,
            epoch: 3,
            head: 4096,
            synced_end: 8192,
            checkpoint_lsn: 0,
            checkpoint_generation: 0,
            committed: 99,
            next_segment_id: 2,
            segments: vec![
                SegmentEntry { id: 1, name: "/tmp/seg".into(), device: Some(DeviceId { file: 12, birth: 34 }) },
                SegmentEntry { id: 2, name: "/dev/x".into(), device: None },
            ],
        };
        let b = st.encode().unwrap();
        assert_eq!(Status::decode(&b), Some(st));
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert_eq!(Status::decode(&d), None, "flip at {i} accepted");
        }
        for n in 0..b.len() {
            assert_eq!(Status::decode(&b[..n]), None);
        }
    }

    type Item = (u32, u64, Vec<u8>, Option<(u64, u64, u64)>);

    fn scan_all(out: &[u8], mut lsn: u64, epoch: u64, area: u64) -> Vec<Item> {
        let mut items = Vec::new();
        let mut at = 0;
        let mut ranges = Vec::new();
        while at < out.len() {
            let h = RecordHeader::parse(out[at..at + RECORD_HEADER].try_into().unwrap());
            let len = check_header(&h, lsn, epoch, area).unwrap();
            // The probe's pre-check never refuses a real record.
            assert!(has_record_shape(&out[at..at + len], lsn, &mut ranges));
            let info = decode_record(&out[at..at + len], lsn, epoch, &mut ranges).unwrap();
            // The one-segment summary is the ranges' own.
            let one = ranges.first().map(|r| r.segment).filter(|&s| ranges.iter().all(|r| r.segment == s));
            let furthest = ranges.iter().map(|r| r.offset + u64::from(r.len)).max();
            assert_eq!(info.one_segment_end, one.zip(furthest));
            for r in &ranges {
                let d = &out[at + r.data_at as usize..at + (r.data_at + r.len) as usize];
                items.push((r.segment, r.offset, d.to_vec(), None));
            }
            if info.commit.is_some() {
                items.push((0, 0, Vec::new(), info.commit));
            }
            at += len;
            lsn += len as u64;
        }
        items
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 64, 5, 1 << 20);
        w.range(3, 100, b"hello");
        w.range(3, 90, b"abc");
        w.range(4, 1 << 40, b"");
        w.commit(7, 9, 40);
        let end = w.lsn();
        assert_eq!(end, 64 + out.len() as u64);
        assert!(out.len() <= 48, "{} bytes", out.len());
        let items = scan_all(&out, 64, 5, 1 << 20);
        assert_eq!(
            items,
            vec![
                (3, 100, b"hello".to_vec(), None),
                (3, 90, b"abc".to_vec(), None),
                (4, 1 << 40, vec![], None),
                (0, 0, vec![], Some((7, 9, 40))),
            ]
        );
        let h = RecordHeader::parse(out[..RECORD_HEADER].try_into().unwrap());
        assert_eq!(check_header(&h, 64, 4, 1 << 20), Err(FrameDefect::WrongEpoch));
        assert_eq!(check_header(&h, 64 + (1 << 20), 5, 1 << 20), Err(FrameDefect::WrongPosition));
        let mut v = Vec::new();
        assert_eq!(decode_record(&out, 72, 5, &mut v), Err(FrameDefect::BadChecksum));
        for i in 0..out.len() {
            let mut d = out.clone();
            d[i] ^= 1;
            let h = RecordHeader::parse(d[..RECORD_HEADER].try_into().unwrap());
            let ok = check_header(&h, 64, 5, 1 << 20).is_ok() && decode_record(&d, 64, 5, &mut v).is_ok();
            // Padding is not covered (never read).
            let len = u32::from_le_bytes([out[4], out[5], out[6], 0]) as usize;
            assert!(!ok || i >= len, "flip at {i} accepted");
            // A flip outside the length field (a torn or damaged record)
            // is a checksum mismatch, whatever the body's shape says now.
            if !(4..7).contains(&i) && i < len {
                assert_eq!(decode_record(&d, 64, 5, &mut v), Err(FrameDefect::BadChecksum), "flip at {i}");
            }
        }
    }

    #[test]
    fn big_ranges_span_records_within_the_bound() {
        let data: Vec<u8> = (0..RECORD_CAPACITY * 2 + 3).map(|i| i as u8).collect();
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 0, 1, 1 << 30);
        w.range(1, 8, b"x");
        w.range(1, 4096, &data);
        w.commit(1, 1, 0);
        assert!(out.len() as u64 <= transaction_bytes_max(2, data.len() as u64 + 1));
        let items = scan_all(&out, 0, 1, 1 << 30);
        let mut got = Vec::new();
        for (seg, off, d, _) in &items[1..items.len() - 1] {
            assert_eq!((*seg, *off), (1, 4096 + got.len() as u64));
            got.extend_from_slice(d);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn varints_round_trip_and_refuse_overlong() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            let mut at = 0;
            assert_eq!(get_varint(&b, &mut at), Some(v));
            assert_eq!(at, b.len());
        }
        let mut at = 0;
        assert_eq!(get_varint(&[0xff; 11], &mut at), None);
        // With bytes after it, at every length, and with overlong but
        // valid encodings: the value and the length read are those of a
        // plain byte-by-byte reading.
        let slow = |b: &[u8]| -> Option<(u64, usize)> {
            let mut v = 0u64;
            for (i, &byte) in b.iter().enumerate().take(10) {
                if i == 9 && byte > 1 {
                    return None;
                }
                v |= u64::from(byte & 0x7f) << (7 * i);
                if byte < 0x80 {
                    return Some((v, i + 1));
                }
            }
            None
        };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for k in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = x >> (k % 64);
            let mut b = Vec::new();
            put_varint(&mut b, v);
            if k % 7 == 0 {
                // Overlong: a zero group appended.
                let last = b.len() - 1;
                b[last] |= 0x80;
                b.push(0);
            }
            let tail = (k % 12) as usize;
            b.extend((0..tail).map(|i| (x >> (i * 5)) as u8));
            let mut at = 0;
            let got = get_varint(&b, &mut at).map(|v| (v, at));
            assert_eq!(got, slow(&b), "{b:02x?}");
            if k % 7 != 0 {
                assert_eq!(got.map(|g| g.0), Some(v));
            }
        }
        // Any bytes, from any position: the same as the plain reading.
        for k in 0..50_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b: Vec<u8> = (0..16).map(|i| (x.rotate_left(i * 7) >> (k % 3)) as u8).collect();
            // Mostly continuation bits, so that every length comes up.
            for (i, byte) in b.iter_mut().enumerate() {
                if (k >> (i % 8)) % 5 != 0 {
                    *byte |= 0x80;
                }
            }
            let (from, to) = ((k % 5) as usize, 5 + (k % 12) as usize);
            let mut at = from;
            let got = get_varint(&b[..to], &mut at).map(|v| (v, at - from));
            assert_eq!(got, slow(&b[from..to]), "{:02x?}", &b[from..to]);
        }
        for d in [0i64, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(d)), d);
        }
    }
}
