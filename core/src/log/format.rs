//! The log's on-disk format (version 2): superblock, two status slots,
//! and framed records. All integers are little-endian. Byte offsets are
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
pub const VERSION: u32 = 2;
/// Superblock magic.
pub const LOG_MAGIC: [u8; 8] = *b"RVMLOG\0\x01";
/// Status slot magic.
pub const STATUS_MAGIC: [u8; 8] = *b"RVMSTAT1";

/// Frame header length.
pub const FRAME_HEADER: usize = 32;
/// Range frames carry at most this much data; longer ranges are split.
pub const MAX_RANGE_DATA: usize = 1 << 20;
/// Length of a range frame's fixed part (header + offset, length).
pub const RANGE_FIXED: usize = FRAME_HEADER + 16;
/// Length of a commit frame.
pub const COMMIT_FRAME: usize = FRAME_HEADER + 32;
/// No valid frame is longer than this (bounds every read of untrusted input).
pub const MAX_FRAME: usize = RANGE_FIXED + MAX_RANGE_DATA;
/// Status bytes before the segment dictionary.
pub const STATUS_FIXED: usize = 80;
/// Counters and positions in a status must stay below this (a status past
/// it is refused as damaged), so incrementing them can never overflow.
pub const MAX_POSITION: u64 = 1 << 62;
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

    /// Decodes a slot image; `None` for anything that is not a whole,
    /// valid status (a torn or never-written slot).
    pub fn decode(b: &[u8]) -> Option<Status> {
        use std::os::unix::ffi::OsStrExt;
        if b.len() < STATUS_FIXED || b[0..8] != STATUS_MAGIC {
            return None;
        }
        let count = le_u32(b, 68) as usize;
        let dict = le_u32(b, 72) as usize;
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

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// New value of a byte range of a segment.
    Range = 1,
    /// Ends a transaction: everything since the previous commit is atomic.
    Commit = 2,
}

/// Frame header layout: CRC32C u32 `[0..4)` over `[4..len)`, length u32
/// `[4..8)` (multiple of 8, header included), LSN u64 `[8..16)`, epoch u64
/// `[16..24)`, kind u8 `[24]`, zero `[25..28)`, aux u32 `[28..32)` (segment
/// id for ranges, range count for commits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Checksum of the rest of the frame.
    pub crc: u32,
    /// Total frame length.
    pub len: u32,
    /// Log position of the frame.
    pub lsn: u64,
    /// Epoch the frame was written in.
    pub epoch: u64,
    /// Kind byte (validated by the reader).
    pub kind: u8,
    /// Kind-specific value.
    pub aux: u32,
}

impl FrameHeader {
    /// Parses the fixed 32 bytes (no validation beyond layout).
    pub fn parse(b: &[u8; FRAME_HEADER]) -> FrameHeader {
        FrameHeader {
            crc: le_u32(b, 0),
            len: le_u32(b, 4),
            lsn: le_u64(b, 8),
            epoch: le_u64(b, 16),
            kind: b[24],
            aux: le_u32(b, 28),
        }
    }
}

/// Appends frames to a byte buffer, assigning consecutive log positions.
#[derive(Debug)]
pub struct FrameWriter<'a> {
    out: &'a mut Vec<u8>,
    lsn: u64,
    epoch: u64,
}

impl<'a> FrameWriter<'a> {
    /// Frames appended to `out` start at log position `lsn`.
    pub fn new(out: &'a mut Vec<u8>, lsn: u64, epoch: u64) -> Self {
        FrameWriter { out, lsn, epoch }
    }

    /// Log position after the last appended frame.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    fn frame(&mut self, kind: FrameKind, aux: u32, fixed: &[u8], data: &[u8]) {
        let len = align8(FRAME_HEADER + fixed.len() + data.len());
        let start = self.out.len();
        self.out.resize(start + FRAME_HEADER, 0);
        self.out.extend_from_slice(fixed);
        self.out.extend_from_slice(data);
        self.out.resize(start + len, 0);
        let f = &mut self.out[start..];
        put_u32(f, 4, len as u32);
        put_u64(f, 8, self.lsn);
        put_u64(f, 16, self.epoch);
        f[24] = kind as u8;
        put_u32(f, 28, aux);
        let crc = crc32c::crc32c(&f[4..len]);
        put_u32(f, 0, crc);
        self.lsn += len as u64;
    }

    /// Appends range frames for `data` at `offset` of segment `segment`
    /// (split in pieces of at most [`MAX_RANGE_DATA`]); returns how many.
    pub fn range(&mut self, segment: u32, offset: u64, data: &[u8]) -> u32 {
        let mut n = 0;
        for (i, piece) in data.chunks(MAX_RANGE_DATA).enumerate() {
            let mut fixed = [0u8; 16];
            put_u64(&mut fixed, 0, offset + (i * MAX_RANGE_DATA) as u64);
            put_u32(&mut fixed, 8, piece.len() as u32);
            self.frame(FrameKind::Range, segment, &fixed, piece);
            n += 1;
        }
        n
    }

    /// Appends the commit frame that closes a transaction of `ranges` range
    /// frames covering commits `first_tx..=last_tx`, `bytes` bytes of data.
    /// `synced` is the position up to which the log was durable when the
    /// frame was made: a later reader that finds this frame knows that
    /// everything before `synced` was acknowledged, so a bad frame there is
    /// damage, not a torn write.
    pub fn commit(&mut self, ranges: u32, first_tx: u64, last_tx: u64, bytes: u64, synced: u64) {
        let mut fixed = [0u8; 32];
        put_u64(&mut fixed, 0, first_tx);
        put_u64(&mut fixed, 8, last_tx);
        put_u64(&mut fixed, 16, bytes);
        put_u64(&mut fixed, 24, synced);
        self.frame(FrameKind::Commit, ranges, &fixed, &[]);
    }
}

/// Bytes that range frames for `len` bytes of data take.
pub fn range_frames_len(len: usize) -> usize {
    let full = len / MAX_RANGE_DATA;
    let rest = len % MAX_RANGE_DATA;
    full * align8(RANGE_FIXED + MAX_RANGE_DATA) + if rest > 0 || len == 0 { align8(RANGE_FIXED + rest) } else { 0 }
}

/// A frame body that passed its checks.
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
        /// Number of range frames since the previous commit.
        ranges: u32,
        /// First commit sequence number the transaction covers.
        first_tx: u64,
        /// Last commit sequence number it covers.
        last_tx: u64,
        /// Data bytes in its ranges.
        bytes: u64,
        /// The log was durable up to this position when the frame was made.
        synced: u64,
    },
}

/// Why a frame was refused: the log ends (cleanly or not) there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameDefect {
    /// Length is not a multiple of 8, too small or too large.
    BadLength,
    /// The frame belongs to another place or an older lap of the ring.
    WrongPosition,
    /// The frame belongs to an earlier epoch (left over from before a crash).
    WrongEpoch,
    /// The checksum does not match.
    BadChecksum,
    /// Unknown kind, or fields inconsistent with the length.
    BadBody,
}

impl FrameDefect {
    /// Human-readable reason.
    pub fn describe(self) -> &'static str {
        match self {
            FrameDefect::BadLength => "bad frame length",
            FrameDefect::WrongPosition => "frame from another position or lap",
            FrameDefect::WrongEpoch => "frame from an earlier epoch",
            FrameDefect::BadChecksum => "checksum mismatch",
            FrameDefect::BadBody => "malformed frame body",
        }
    }
}

/// Checks a header against the position and epoch where it was read;
/// returns the frame length to read.
pub fn check_header(h: &FrameHeader, lsn: u64, epoch: u64) -> Result<usize, FrameDefect> {
    let len = h.len as usize;
    if len < FRAME_HEADER || !len.is_multiple_of(8) || len > MAX_FRAME + 8 {
        return Err(FrameDefect::BadLength);
    }
    if h.lsn != lsn {
        return Err(FrameDefect::WrongPosition);
    }
    if h.epoch != epoch {
        return Err(FrameDefect::WrongEpoch);
    }
    Ok(len)
}

/// Validates a whole frame (header already checked by [`check_header`]).
pub fn decode_frame(f: &[u8]) -> Result<Frame<'_>, FrameDefect> {
    if f.len() < FRAME_HEADER || le_u32(f, 4) as usize != f.len() {
        return Err(FrameDefect::BadLength);
    }
    if crc32c::crc32c(&f[4..]) != le_u32(f, 0) {
        return Err(FrameDefect::BadChecksum);
    }
    let aux = le_u32(f, 28);
    if f[25..28] != [0, 0, 0] {
        return Err(FrameDefect::BadBody);
    }
    match f[24] {
        1 => {
            if f.len() < RANGE_FIXED {
                return Err(FrameDefect::BadBody);
            }
            let offset = le_u64(f, FRAME_HEADER);
            let n = le_u32(f, FRAME_HEADER + 8) as usize;
            if n > MAX_RANGE_DATA || align8(RANGE_FIXED + n) != f.len() || offset.checked_add(n as u64).is_none() {
                return Err(FrameDefect::BadBody);
            }
            Ok(Frame::Range { segment: aux, offset, data: &f[RANGE_FIXED..RANGE_FIXED + n] })
        }
        2 => {
            if f.len() != COMMIT_FRAME {
                return Err(FrameDefect::BadBody);
            }
            Ok(Frame::Commit {
                ranges: aux,
                first_tx: le_u64(f, FRAME_HEADER),
                last_tx: le_u64(f, FRAME_HEADER + 8),
                bytes: le_u64(f, FRAME_HEADER + 16),
                synced: le_u64(f, FRAME_HEADER + 24),
            })
        }
        _ => Err(FrameDefect::BadBody),
    }
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

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 64, 5);
        assert_eq!(w.range(3, 100, b"hello"), 1);
        w.commit(1, 1, 1, 5, 40);
        let end = w.lsn();
        assert_eq!(end, 64 + out.len() as u64);
        assert_eq!(range_frames_len(5), align8(RANGE_FIXED + 5));
        let h = FrameHeader::parse(out[..32].try_into().unwrap());
        let len = check_header(&h, 64, 5).unwrap();
        assert_eq!(decode_frame(&out[..len]), Ok(Frame::Range { segment: 3, offset: 100, data: b"hello" }));
        assert_eq!(check_header(&h, 64, 4), Err(FrameDefect::WrongEpoch));
        assert_eq!(check_header(&h, 72, 5), Err(FrameDefect::WrongPosition));
        let c = &out[len..];
        assert_eq!(decode_frame(c), Ok(Frame::Commit { ranges: 1, first_tx: 1, last_tx: 1, bytes: 5, synced: 40 }));
    }

    #[test]
    fn big_ranges_split() {
        let data = vec![7u8; MAX_RANGE_DATA * 2 + 3];
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 0, 1);
        assert_eq!(w.range(1, 0, &data), 3);
        assert_eq!(out.len(), range_frames_len(data.len()));
    }
}
