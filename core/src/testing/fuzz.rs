//! The fuzz body for the log scanner and recovery ([`fuzz_log_image`]),
//! shared by the cargo-fuzz target (`fuzz/fuzz_targets/log_scan.rs`) and
//! the seed-corpus test (`tests/fuzz_seeds_log.rs`).
//!
//! # Input
//!
//! One flag byte ([`RESEAL`], [`WRAPPED`]), then a list of edits applied to
//! a valid log (and its one segment) made once per process by a real
//! instance on a [`SimDisk`]: a 256 KiB log holding four committed,
//! unapplied transactions (five ranges) for a 16 KiB segment named
//! `seg`. Without [`WRAPPED`] the log is fresh (head 0) and was closed
//! cleanly (its status records how far it is synced); with it the log was
//! filled, truncated, and written again so that its records run across the
//! end of the ring, and the instance then crashed (its status is older
//! than its last records).
//!
//! Each edit is one byte `t`, a 24-bit little-endian offset `off`, and
//! `(t >> 3) + 1` bytes of payload (fewer if the input ends); `t & 7` picks
//! the target (see [`Target`]): the superblock, a status slot, the record
//! area at log position `head + off`, the raw log device, the log's length,
//! the segment's length or the segment's bytes. [`LogEdit::encode`] writes
//! them.
//!
//! With [`RESEAL`], every checksum the edits touched is recomputed after
//! the edits: the superblock's, each status slot's, and each record's along
//! the chain of record lengths from the head, seeded with the template's
//! epoch (so crafted lengths, tags, flags, varints and trailers get past
//! the checksums to the checks behind them).
//!
//! # What is checked
//!
//! The log is inspected ([`LogInspector::open`], [`walk`](LogInspector::walk),
//! [`inspect`]) and then recovered ([`Rvm::open_with`]) twice from the same
//! images, without and with [`Options::salvage`]. Besides "no panic":
//!
//! - every error is typed ([`Error::Corrupted`] or [`Error::Log`]; no I/O
//!   error, since no fault is injected);
//! - what the inspector reports is consistent (frames in order inside one
//!   lap, counts, damage) and [`inspect`] agrees with [`walk`](LogInspector::walk);
//! - a log the inspector refuses, or whose scan reports damage, is refused by
//!   recovery without salvage with [`Error::Corrupted`]; a recovery that fails
//!   leaves the log's and the segment's durable and live images unchanged;
//! - a recovery that succeeds replays exactly the transactions the
//!   inspector found (same counts, same stop, a salvage report exactly when
//!   there is damage, the damaged log copied first), and the segment then
//!   holds the template's bytes with the committed range frames applied in
//!   log order;
//! - reopening after a successful recovery is idempotent: the log
//!   inspects, and when it holds no transaction (always, unless the edits
//!   forged frames of the next epoch, checksums included) the second
//!   recovery succeeds and leaves the segment as the first one did;
//! - without damage, recovery with and without salvage agree;
//! - instant recovery (`Options::instant_recovery`) ends as recovery
//!   without salvage does: the same error kind with nothing written, or the
//!   same segment, read through a mapped region and in the file.

use crate::error::Error;
use crate::log::format::{self, MAX_RECORD, RECORD_HEADER, RECORD_MIN, STATUS_FIXED, STATUS_SLOT};
use crate::log::inspect::{inspect, FrameBody, FrameReport, LogInspector, ScanReport};
use crate::log::ScanStop;
use crate::testing::{CrashMode, SimDisk};
use crate::{create_log_with, CommitMode, MapSpec, Options, RestoreMode, Rvm, Vfs};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Flag bit 0: recompute the checksums the edits touched.
pub const RESEAL: u8 = 1;
/// Flag bit 1: start from the log whose records wrap around the ring.
pub const WRAPPED: u8 = 2;

/// Size of the fuzzed log device.
pub const LOG_LEN: u64 = 256 << 10;
/// Size of the fuzzed segment.
pub const SEGMENT_LEN: u64 = 16 << 10;
/// Most edits read from one input (the rest is ignored).
pub const MAX_EDITS: usize = 64;

const LOG: &str = "log";
const SEGMENT: &str = "seg";

/// What an edit changes (the low three bits of its first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Target {
    /// Superblock bytes at `off % 4096`.
    Superblock = 0,
    /// Status slot 0 bytes at `off % 64 KiB` of the slot.
    Slot0 = 1,
    /// Status slot 1 bytes at `off % 64 KiB` of the slot.
    Slot1 = 2,
    /// Record area bytes at log position `head + off % area_len` (wrapping
    /// at the end of the ring), where `head` is the template's head.
    Area = 3,
    /// Log device bytes at `off % log length`.
    Raw = 4,
    /// The log device is cut to `off % (length + 1)` bytes (payload unused).
    LogLen = 5,
    /// The segment is cut to `off % (length + 1)` bytes (payload unused).
    SegmentLen = 6,
    /// Segment bytes at `off % segment length`.
    SegmentBytes = 7,
}

/// One edit of a fuzz input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEdit {
    /// What it changes.
    pub target: Target,
    /// Where (24 bits are encoded).
    pub offset: u32,
    /// The new bytes (1 to 32 are encoded; for the length targets one
    /// ignored byte).
    pub bytes: Vec<u8>,
}

impl LogEdit {
    /// An edit of `target` at `offset` writing `bytes`.
    pub fn new(target: Target, offset: u32, bytes: &[u8]) -> LogEdit {
        LogEdit { target, offset, bytes: bytes.to_vec() }
    }

    /// Encodes a whole input: the flag byte and the edits.
    pub fn encode(flags: u8, edits: &[LogEdit]) -> Vec<u8> {
        let mut out = vec![flags];
        for e in edits {
            let n = e.bytes.len().clamp(1, 32);
            out.push(e.target as u8 | (((n - 1) as u8) << 3));
            out.extend_from_slice(&e.offset.to_le_bytes()[..3]);
            let mut payload = e.bytes.clone();
            payload.resize(n, 0);
            out.extend_from_slice(&payload);
        }
        out
    }

    fn decode_all(data: &[u8]) -> Vec<LogEdit> {
        let mut edits = Vec::new();
        let mut rest = data;
        while edits.len() < MAX_EDITS && rest.len() >= 4 {
            let t = rest[0];
            let offset = u32::from_le_bytes([rest[1], rest[2], rest[3], 0]);
            let n = usize::from(t >> 3) + 1;
            let payload = &rest[4..(4 + n).min(rest.len())];
            let target = match t & 7 {
                0 => Target::Superblock,
                1 => Target::Slot0,
                2 => Target::Slot1,
                3 => Target::Area,
                4 => Target::Raw,
                5 => Target::LogLen,
                6 => Target::SegmentLen,
                _ => Target::SegmentBytes,
            };
            edits.push(LogEdit { target, offset, bytes: payload.to_vec() });
            rest = &rest[(4 + n).min(rest.len())..];
        }
        edits
    }
}

/// A valid log and its segment, made once per process by an instance.
#[derive(Debug)]
pub struct LogTemplate {
    /// The log's durable image.
    pub log: Vec<u8>,
    /// The segment's durable image (the records are not applied yet).
    pub segment: Vec<u8>,
    /// Head of the log's status.
    pub head: u64,
    /// Epoch of the log's status.
    pub epoch: u64,
    /// Where the record area starts on the device.
    pub area_offset: u64,
    /// Length of the record area.
    pub area_len: u64,
    /// The frames from the head, as the inspector reports them.
    pub frames: Vec<FrameReport>,
}

impl LogTemplate {
    /// Device offset of log position `lsn`.
    pub fn device_offset(&self, lsn: u64) -> usize {
        (self.area_offset + lsn % self.area_len) as usize
    }
}

static FRESH: OnceLock<LogTemplate> = OnceLock::new();
static WRAP: OnceLock<LogTemplate> = OnceLock::new();

/// The template [`fuzz_log_image`] edits: the wrapped one if `wrapped`.
pub fn log_template(wrapped: bool) -> &'static LogTemplate {
    if wrapped {
        WRAP.get_or_init(|| make_template(true))
    } else {
        FRESH.get_or_init(|| make_template(false))
    }
}

fn quiet(salvage: bool) -> Options {
    Options { truncate_threshold: None, write_behind: false, salvage, ..Options::default() }
}

fn make_template(wrapped: bool) -> LogTemplate {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new(LOG), LOG_LEN).expect("create the template log");
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), quiet(false)).expect("open the template log");
    let seg = rvm.create_segment(SEGMENT, SEGMENT_LEN).expect("create the template segment");
    let region = rvm.map(&seg, MapSpec::new(0, SEGMENT_LEN as usize)).expect("map the template segment");
    let area_len = rvm.query().log_capacity;
    let commit = |writes: &[(usize, &[u8])]| {
        let mut tx = rvm.begin(RestoreMode::NoRestore).expect("begin");
        for &(at, data) in writes {
            assert!(at + data.len() <= region.len());
            // SAFETY: the region is mapped for the whole function and only
            // this thread touches it; the write lies inside it (checked).
            unsafe { tx.modify_bytes(region.addr() + at, data) }.expect("modify");
        }
        tx.commit(CommitMode::Flush).expect("commit");
    };
    if wrapped {
        // Fill most of the ring and free it, then bring the head to a
        // little before the end of the ring and free again: the
        // transactions below run across the end.
        let mut i = 0u8;
        while rvm.query().log_used + 8192 < area_len {
            commit(&[(usize::from(i % 4) * 4000, &[i; 3000])]);
            i = i.wrapping_add(1);
        }
        rvm.truncate().expect("truncate the template log");
        loop {
            let room = area_len - rvm.query().tail % area_len;
            if (600..=2500).contains(&room) {
                break;
            }
            let n = if (5000..).contains(&room) || room < 600 { 3000 } else { room - 1600 };
            commit(&[(0, &vec![i; n as usize])]);
            i = i.wrapping_add(1);
        }
        rvm.truncate().expect("truncate the template log");
    }
    commit(&[(0, b"alpha")]);
    commit(&[(100, &[0xb0; 300]), (5000, b"two ranges, one transaction")]);
    commit(&[(8192, &[0x3c; 3000])]);
    commit(&[(40, b"last")]);
    drop(region);
    drop(seg);
    if wrapped {
        // A crash: the status is older than the last records.
        disk.crash(CrashMode::LoseUnsynced);
    }
    drop(rvm);
    let log = disk.durable_image(LOG).expect("template log");
    let segment = disk.durable_image(SEGMENT).expect("template segment");
    let inspector = LogInspector::open(&disk, Path::new(LOG)).expect("inspect the template");
    let status = inspector.status().expect("the template has a status").clone();
    let (frames, scan) = inspector.frames().expect("walk the template");
    assert_eq!((scan.transactions, frames.len(), scan.damage), (4, 9, None), "template log {wrapped}");
    let sb = inspector.superblock();
    let t = LogTemplate {
        log,
        segment,
        head: status.head,
        epoch: status.epoch,
        area_offset: sb.area_offset,
        area_len: sb.area_len,
        frames,
    };
    if wrapped {
        assert!(t.head / t.area_len != scan.end / t.area_len, "the wrapped template does not wrap");
    }
    t
}

/// What [`fuzz_log_image`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogOutcome {
    /// Complete transactions the inspector found (`None`: it refused the
    /// log or found no valid status).
    pub scanned: Option<u64>,
    /// The inspector reported damage.
    pub damaged: bool,
    /// Recovery without salvage: transactions replayed, or the error kind.
    pub strict: Result<u64, Refusal>,
    /// Recovery with salvage: transactions replayed, or the error kind.
    pub salvaged: Result<u64, Refusal>,
}

/// The kind of a typed error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// [`Error::Corrupted`].
    Corrupted,
    /// [`Error::Log`].
    Log,
}

fn refusal(e: &Error, what: &str) -> Refusal {
    assert!(!e.to_string().is_empty());
    match e {
        Error::Corrupted { .. } => Refusal::Corrupted,
        Error::Log(_) => Refusal::Log,
        other => panic!("{what}: unexpected error kind: {other:?}"),
    }
}

/// The edited images.
struct Images {
    log: Vec<u8>,
    segment: Vec<u8>,
}

fn apply_edits(t: &LogTemplate, flags: u8, edits: &[LogEdit]) -> Images {
    let mut log = t.log.clone();
    let mut segment = t.segment.clone();
    let area_len = t.area_len as usize;
    let area_offset = t.area_offset as usize;
    // Which bytes of the record area (by ring offset), slots and superblock
    // the edits touched, for the reseal.
    let mut area_touched = vec![false; area_len];
    let mut slot_touched = [false; 2];
    let mut sb_touched = false;
    let mut write_raw = |log: &mut Vec<u8>, at: usize, b: u8| {
        if at < log.len() {
            log[at] = b;
            if at < format::BLOCK as usize {
                sb_touched = true;
            } else if at < area_offset {
                slot_touched[(at - format::BLOCK as usize) / STATUS_SLOT as usize] = true;
            } else if at < area_offset + area_len {
                area_touched[at - area_offset] = true;
            }
        }
    };
    for e in edits {
        let off = e.offset as usize;
        match e.target {
            Target::Superblock | Target::Slot0 | Target::Slot1 | Target::Raw => {
                let base = match e.target {
                    Target::Superblock => off % format::BLOCK as usize,
                    Target::Slot0 => format::BLOCK as usize + off % STATUS_SLOT as usize,
                    Target::Slot1 => (format::BLOCK + STATUS_SLOT) as usize + off % STATUS_SLOT as usize,
                    _ => off % log.len().max(1),
                };
                for (i, &b) in e.bytes.iter().enumerate() {
                    write_raw(&mut log, base + i, b);
                }
            }
            Target::Area => {
                let start = (t.head % t.area_len) as usize + off % area_len;
                for (i, &b) in e.bytes.iter().enumerate() {
                    write_raw(&mut log, area_offset + (start + i) % area_len, b);
                }
            }
            Target::LogLen => log.truncate(off % (log.len() + 1)),
            Target::SegmentLen => segment.truncate(off % (segment.len() + 1)),
            Target::SegmentBytes => {
                if !segment.is_empty() {
                    let at = off % segment.len();
                    let n = e.bytes.len().min(segment.len() - at);
                    segment[at..at + n].copy_from_slice(&e.bytes[..n]);
                }
            }
        }
    }
    if flags & RESEAL != 0 {
        if sb_touched && log.len() >= 64 {
            let crc = crc32c::crc32c(&log[0..60]);
            log[60..64].copy_from_slice(&crc.to_le_bytes());
        }
        for (slot, touched) in slot_touched.into_iter().enumerate() {
            let at = (format::BLOCK + slot as u64 * STATUS_SLOT) as usize;
            if touched && log.len() >= at + STATUS_FIXED {
                let s = &mut log[at..];
                let dict = u32::from_le_bytes([s[72], s[73], s[74], s[75]]) as usize;
                if dict <= format::DICT_LIMIT && STATUS_FIXED + dict <= s.len() {
                    let crc = crc32c::crc32c_append(crc32c::crc32c(&s[0..76]), &s[STATUS_FIXED..STATUS_FIXED + dict]);
                    s[76..80].copy_from_slice(&crc.to_le_bytes());
                }
            }
        }
        if log.len() >= area_offset + area_len {
            reseal_frames(t, &mut log, &area_touched);
        }
    }
    Images { log, segment }
}

/// Recomputes the checksum of every record along the chain of lengths
/// from the template's head that overlaps a touched byte (seeded with the
/// record's position and the template's epoch, as the writer does).
fn reseal_frames(t: &LogTemplate, log: &mut [u8], touched: &[bool]) {
    let area_len = t.area_len as usize;
    let at = |lsn: u64| t.device_offset(lsn);
    let mut pos = t.head;
    let end = t.head + t.area_len;
    while pos + RECORD_HEADER as u64 <= end {
        let len = u32::from_le_bytes([log[at(pos + 4)], log[at(pos + 5)], log[at(pos + 6)], 0]) as usize;
        let padded = format::align8(len);
        if !(RECORD_MIN..=MAX_RECORD).contains(&len) || pos + padded as u64 > end {
            break;
        }
        let first = (pos % t.area_len) as usize;
        if (0..len).any(|i| touched[(first + i) % area_len]) {
            let mut seeded: Vec<u8> = pos.to_le_bytes().into_iter().chain(t.epoch.to_le_bytes()).collect();
            seeded.extend((4..len as u64).map(|i| log[at(pos + i)]));
            let crc = crc32c::crc32c(&seeded).to_le_bytes();
            for (i, b) in crc.into_iter().enumerate() {
                log[at(pos + i as u64)] = b;
            }
        }
        pos += padded as u64;
    }
}

/// A simulated disk holding the images (the log first, so that the files
/// get the identities the template's dictionary recorded).
fn disk_with(images: &Images) -> SimDisk {
    let disk = SimDisk::new();
    disk.set_durable_image(LOG, images.log.clone());
    disk.set_durable_image(SEGMENT, images.segment.clone());
    disk
}

/// What the inspector found in a log that it could walk.
struct Inspected {
    scan: ScanReport,
    frames: Vec<FrameReport>,
    /// The segment the template's segment would hold after the committed
    /// frames are applied, if every committed frame names `seg` and lies
    /// inside it.
    expected: Option<Vec<u8>>,
    /// A committed range frame names an id the dictionary lacks.
    unknown_segment: bool,
}

/// Inspects the log on `disk`: `Err` if the inspector refuses it, `Ok(None)`
/// without a valid status, else what it found (checked for consistency).
fn inspect_log(disk: &SimDisk, segment: &[u8]) -> Result<Option<Inspected>, Refusal> {
    let path = Path::new(LOG);
    let inspector = match LogInspector::open(disk, path) {
        Ok(i) => i,
        Err(e) => return Err(refusal(&e, "LogInspector::open")),
    };
    let sb = inspector.superblock();
    assert!(sb.area_offset + sb.area_len <= inspector.device_len());
    let status = match inspector.status() {
        Ok(s) => s.clone(),
        Err(e) => {
            assert_eq!(inspector.chosen_slot(), None);
            assert_eq!(refusal(&e, "status"), Refusal::Corrupted);
            let walked = inspector.walk(|_| {});
            assert!(matches!(walked, Err(Error::Corrupted { .. })), "walk without a status: {walked:?}");
            drop(inspector);
            let report = inspect(disk, path).expect("inspect opens what the inspector opened");
            assert_eq!((report.chosen_slot, report.scan, report.frames.len()), (None, None, 0));
            return Ok(None);
        }
    };
    let chosen = inspector.chosen_slot().expect("a status comes from a chosen slot");
    assert_eq!(inspector.slots()[usize::from(chosen)].valid_status(), Some(&status));
    let mut frames = Vec::new();
    let scan = match inspector.walk(|f| frames.push(*f)) {
        Ok(scan) => scan,
        Err(e) => {
            // Only a head out of range is refused once a status was chosen.
            assert_eq!(refusal(&e, "walk"), Refusal::Corrupted);
            assert!(status.head.checked_add(sb.area_len).is_none(), "walk refused a status: {e}");
            return Ok(None);
        }
    };
    drop(inspector);
    let report = inspect(disk, path).expect("inspect opens what the inspector opened");
    assert_eq!(report.scan, Some(scan), "inspect and walk disagree");
    assert_eq!(report.frames, frames, "inspect and walk disagree");

    // The scan's own consistency.
    assert_eq!(scan.start, status.head);
    assert!(scan.start <= scan.end && scan.end - scan.start <= sb.area_len, "{scan:?}");
    assert_eq!(scan.frames, frames.len() as u64);
    let mut pos = scan.start;
    let mut committed = 0u64;
    for f in &frames {
        assert_eq!(f.lsn, pos, "frames are contiguous from the head");
        pos += u64::from(f.len);
        assert!(pos - scan.start <= sb.area_len, "a frame lies past one lap: {f:?}");
        if scan.is_committed(f.lsn) && f.kind() == format::FrameKind::Commit {
            committed += 1;
        }
    }
    assert_eq!(committed, scan.transactions);
    assert!(scan.commits >= scan.transactions);
    assert_eq!(pos - scan.end, scan.discarded, "{scan:?}");
    match scan.stop {
        ScanStop::Limit => assert!(scan.damage.is_none()),
        ScanStop::Defect { lsn, defect } => {
            assert_eq!(lsn, pos, "the scan stops after its last frame");
            if let Some(d) = scan.damage {
                assert_eq!((d.lsn, d.defect), (lsn, defect));
                assert!(d.synced_to > d.lsn);
                assert!(d.valid_end >= d.lsn);
                if let Some(next) = d.next_valid {
                    assert!(next > d.lsn && next <= d.valid_end, "{d:?}");
                }
            }
        }
    }

    // What replaying the committed frames must do to the segment.
    let mut expected = Some(segment.to_vec());
    let mut unknown_segment = false;
    let log = disk.live_image(LOG).expect("the log");
    for f in frames.iter().filter(|f| scan.is_committed(f.lsn)) {
        let FrameBody::Range { segment: id, offset, data_len, data_lsn } = f.body else { continue };
        match status.segments.iter().find(|e| e.id == id) {
            None => unknown_segment = true,
            Some(e) if e.name != Path::new(SEGMENT) => expected = None,
            Some(_) => {}
        }
        let Some(seg) = &mut expected else { continue };
        let (Ok(start), Some(end)) = (usize::try_from(offset), offset.checked_add(u64::from(data_len))) else {
            expected = None;
            continue;
        };
        if end > seg.len() as u64 {
            expected = None;
            continue;
        }
        for i in 0..data_len as usize {
            let lsn = data_lsn + i as u64;
            seg[start + i] = log[(sb.area_offset + lsn % sb.area_len) as usize];
        }
    }
    Ok(Some(Inspected { scan, frames, expected, unknown_segment }))
}

/// Runs recovery on the images and checks it against the inspection;
/// returns the outcome and, after a successful recovery, the segment image.
fn recover_checked(
    images: &Images,
    inspected: &Result<Option<Inspected>, Refusal>,
    salvage: bool,
) -> (Result<u64, Refusal>, Option<Vec<u8>>) {
    let disk = disk_with(images);
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let what = if salvage { "recovery with salvage" } else { "recovery" };
    let opened = Rvm::open_with(vfs.clone(), Path::new(LOG), quiet(salvage));
    let rvm = match opened {
        Err(e) => {
            let kind = refusal(&e, what);
            for (name, image) in [(LOG, &images.log), (SEGMENT, &images.segment)] {
                assert!(disk.durable_image(name).as_ref() == Some(image), "a failed {what} changed {name}: {e}");
                assert!(disk.live_image(name).as_ref() == Some(image), "a failed {what} changed {name}: {e}");
            }
            match inspected {
                Ok(Some(i)) if i.scan.damage.is_some() && !salvage => {
                    assert_eq!(kind, Refusal::Corrupted, "damage refused with {e}")
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => assert_eq!(kind, Refusal::Corrupted, "a log without a usable status: {e}"),
            }
            return (Err(kind), None);
        }
        Ok(rvm) => rvm,
    };
    let i = match inspected {
        Ok(Some(i)) => i,
        Ok(None) => panic!("{what} accepted a log without a usable status"),
        Err(k) => panic!("{what} accepted a log the inspector refuses ({k:?})"),
    };
    assert!(!i.unknown_segment, "{what} replayed a frame of a segment the dictionary lacks");
    let report = rvm.recovery_report();
    let scan = &i.scan;
    assert_eq!(report.transactions, scan.transactions, "{what} replayed other transactions than inspected");
    assert_eq!(report.discarded_bytes, scan.discarded);
    let stopped = match scan.stop {
        ScanStop::Limit => None,
        ScanStop::Defect { lsn, defect } => Some((lsn, defect.describe())),
    };
    assert_eq!(report.stopped_at, stopped);
    let committed_len: u64 =
        i.frames.iter().filter(|f| scan.is_committed(f.lsn)).map(|f| u64::from(f.len)).sum::<u64>();
    assert_eq!(report.log_bytes, committed_len);
    match (scan.damage, &report.salvage) {
        (None, None) => {}
        (Some(d), Some(s)) => {
            assert!(salvage, "recovery without salvage accepted a damaged log");
            assert_eq!((s.damaged_at, s.synced_to, s.dropped_transactions), (d.lsn, d.synced_to, d.transactions_after));
            assert_eq!(s.defect, d.defect.describe());
            assert!(disk.durable_image(&s.copy).as_ref() == Some(&images.log), "the salvage copy is not the log");
        }
        (d, s) => panic!("{what}: damage {d:?} but salvage report {s:?}"),
    }
    rvm.close().expect("close after recovery");
    let segment = disk.durable_image(SEGMENT).expect("the segment");
    assert!(disk.live_image(SEGMENT).as_ref() == Some(&segment), "recovery left the segment unsynced");
    if let Some(expected) = &i.expected {
        assert!(&segment == expected, "{what} did not apply exactly the committed frames");
    }

    // Again: the log now inspects, and recovery is idempotent. (Frames of
    // the next epoch exist only if forged, with their checksums, by the
    // edits; then the second recovery may replay or refuse them.)
    let again = match inspect_log(&disk, &segment) {
        Ok(Some(a)) => a,
        other => panic!("the log does not inspect after {what}: {:?}", other.map(|o| o.map(|a| a.scan))),
    };
    let log_now = disk.durable_image(LOG).expect("the log");
    match Rvm::open_with(vfs, Path::new(LOG), quiet(false)) {
        Ok(rvm) => {
            assert_eq!(again.scan.damage, None, "a second recovery after {what} accepted damage");
            assert_eq!(rvm.recovery_report().transactions, again.scan.transactions);
            rvm.close().expect("close after the second recovery");
            if again.scan.transactions == 0 {
                let after = disk.durable_image(SEGMENT).expect("the segment");
                assert!(after == segment, "a second recovery after {what} changed the segment");
            }
        }
        Err(e) => {
            let kind = refusal(&e, "second recovery");
            assert!(
                again.scan.transactions > 0 || again.scan.damage.is_some(),
                "an empty log is refused after {what}: {e}"
            );
            if again.scan.damage.is_some() {
                assert_eq!(kind, Refusal::Corrupted);
            }
            assert!(disk.durable_image(LOG) == Some(log_now), "a failed second recovery changed the log");
            assert!(
                disk.durable_image(SEGMENT).as_ref() == Some(&segment),
                "a failed second recovery changed the segment"
            );
        }
    }
    (Ok(report.transactions), Some(segment))
}

/// Instant recovery (`Options::instant_recovery`) of the same images must
/// end as full recovery without salvage did (`strict`, and the segment it
/// left): the same error kind with nothing written, or the same segment,
/// as the mapped region shows it and as the file holds it once the
/// background apply is done.
fn recover_instant_checked(images: &Images, strict: &Result<u64, Refusal>, strict_segment: Option<&Vec<u8>>) {
    let disk = disk_with(images);
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let opts = Options { instant_recovery: true, ..quiet(false) };
    let rvm = match Rvm::open_with(vfs, Path::new(LOG), opts) {
        Err(e) => {
            let kind = refusal(&e, "instant recovery");
            assert_eq!(Err(kind), *strict, "instant recovery refused ({e}), full recovery gave {strict:?}");
            for (name, image) in [(LOG, &images.log), (SEGMENT, &images.segment)] {
                assert!(disk.durable_image(name).as_ref() == Some(image), "a failed instant recovery changed {name}");
                assert!(disk.live_image(name).as_ref() == Some(image), "a failed instant recovery changed {name}");
            }
            return;
        }
        Ok(rvm) => rvm,
    };
    assert_eq!(Ok(rvm.recovery_report().transactions), *strict, "instant recovery succeeded where full recovery gave");
    let want = strict_segment.expect("full recovery left a segment");
    if let Ok(seg) = rvm.open_segment(SEGMENT) {
        let len = seg.len() as usize;
        // (A segment cut to a length that is not whole pages may not map.)
        if let Ok(region) = rvm.map(&seg, MapSpec::new(0, len)) {
            let mut got = vec![0u8; len];
            // SAFETY: no transaction runs in the region.
            unsafe { region.read(0, &mut got) }.expect("read the region");
            assert!(got == want[..len], "instant recovery shows another segment than full recovery left");
        }
    }
    rvm.wait_for_recovery().expect("the background apply");
    rvm.close().expect("close after instant recovery");
    assert!(disk.durable_image(SEGMENT).as_ref() == Some(want), "instant recovery left another segment");
}

/// The fuzz body: edits the template log as `data` says (see the module
/// docs), inspects it, recovers it without and with salvage, and panics
/// exactly when the scanner or recovery breaks a promise.
pub fn fuzz_log_image(data: &[u8]) -> LogOutcome {
    let (flags, rest) = data.split_first().map_or((0, &[][..]), |(f, rest)| (*f, rest));
    let t = log_template(flags & WRAPPED != 0);
    let images = apply_edits(t, flags, &LogEdit::decode_all(rest));
    let inspected = inspect_log(&disk_with(&images), &images.segment);
    let (strict, strict_segment) = recover_checked(&images, &inspected, false);
    recover_instant_checked(&images, &strict, strict_segment.as_ref());
    let (salvaged, salvaged_segment) = recover_checked(&images, &inspected, true);
    let damaged = matches!(&inspected, Ok(Some(i)) if i.scan.damage.is_some());
    if damaged {
        assert!(strict == Err(Refusal::Corrupted), "damage not refused: {strict:?}");
    } else {
        // Without damage salvage changes nothing (the error kind may
        // differ: segments are checked in no fixed order).
        assert_eq!(strict.is_ok(), salvaged.is_ok(), "salvage changed the outcome without damage");
        assert_eq!(strict.ok(), salvaged.ok());
        assert!(strict_segment == salvaged_segment, "salvage changed the segment without damage");
    }
    let scanned = match &inspected {
        Ok(Some(i)) => Some(i.scan.transactions),
        _ => None,
    };
    LogOutcome { scanned, damaged, strict, salvaged }
}
