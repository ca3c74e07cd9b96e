//! Read-only inspection of a log: the superblock, both status slots, and
//! the frames from the head to the end of the log, as typed values.
//!
//! This is what `rvmutl status` and `rvmutl dump` print. Inspection never
//! writes: it does not run recovery, does not start a new epoch and does not
//! repair anything, so it can be pointed at a damaged log to see what a
//! recovery would find.
//!
//! [`LogInspector::open`] takes the device's exclusive lock for as long as
//! the [`LogInspector`] lives (see [`Vfs::open`]): inspecting a log that an
//! instance holds open that way fails with [`Error::Locked`].
//! [`LogInspector::open_shared`] takes no lock ([`Vfs::open_read_only`]):
//! it inspects a log a running program holds, as a **live view** that may
//! be behind the writer (a batch being written shows as a torn tail).
//!
//! [`ScanReport::log_end`] says how the log ends in an operator's words: a
//! clean end, a torn (or unfinished) tail, or damage.
//!
//! ```
//! use rvm_core::log::inspect::LogInspector;
//! use rvm_core::FileVfs;
//! # let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("demo.log");
//! rvm_core::create_log(&path, 1 << 20).unwrap();
//!
//! let log = LogInspector::open(&FileVfs, &path).unwrap();
//! assert_eq!(log.chosen_slot(), Some(0)); // a new log has one valid slot
//! let mut frames = 0;
//! let scan = log.walk(|_frame| frames += 1).unwrap();
//! assert_eq!((frames, scan.transactions, scan.used()), (0, 0, 0));
//! ```

use super::format::{self, Frame, FrameKind, Status, Superblock};
use super::{look_past_stop, read_valid_frame, scan, Damage, Ring, ScanStop, ScannedFrame};
use crate::error::{Error, LogError, Result};
use crate::storage::{OpenMode, Storage, Vfs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a status slot does not hold a valid status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotProblem {
    /// Every byte of the slot's fixed part is zero: it was never written.
    Empty,
    /// The slot does not start with the status magic.
    BadMagic,
    /// Checksum mismatch or a malformed segment dictionary: a torn or
    /// damaged write.
    Damaged,
}

impl SlotProblem {
    /// Human-readable reason.
    pub fn describe(self) -> &'static str {
        match self {
            SlotProblem::Empty => "never written (all zero)",
            SlotProblem::BadMagic => "bad magic",
            SlotProblem::Damaged => "checksum mismatch or malformed dictionary",
        }
    }
}

/// One of the two status slots as found on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotReport {
    /// Slot number, 0 or 1.
    pub index: u8,
    /// Byte offset of the slot on the device.
    pub offset: u64,
    /// The decoded status, whenever the slot holds a whole, checksummed one
    /// (valid or not).
    pub status: Option<Status>,
    /// Why the slot is not valid; `None` for a valid slot.
    pub problem: Option<SlotProblem>,
}

impl SlotReport {
    /// Whether recovery may use this slot.
    pub fn is_valid(&self) -> bool {
        self.problem.is_none()
    }

    /// The status, if the slot is valid.
    pub fn valid_status(&self) -> Option<&Status> {
        if self.is_valid() {
            self.status.as_ref()
        } else {
            None
        }
    }

    /// Decodes the image of slot `index` (read at `offset`).
    fn decode(index: u8, offset: u64, image: &[u8]) -> SlotReport {
        let fixed = &image[..format::STATUS_FIXED.min(image.len())];
        let status = Status::decode(image);
        let problem = match &status {
            Some(_) => None,
            None if fixed.iter().all(|&b| b == 0) => Some(SlotProblem::Empty),
            None if !image.starts_with(&format::STATUS_MAGIC) => Some(SlotProblem::BadMagic),
            None => Some(SlotProblem::Damaged),
        };
        SlotReport { index, offset, status, problem }
    }
}

/// What a frame carries, without its data bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameBody {
    /// New bytes for a range of a segment.
    Range {
        /// Segment id (see the status's segment dictionary).
        segment: u32,
        /// Byte offset in the segment.
        offset: u64,
        /// Number of data bytes the range carries.
        data_len: u32,
        /// Log position of its first data byte.
        data_lsn: u64,
    },
    /// The end of a log transaction.
    Commit {
        /// Number of range frames since the previous commit frame.
        ranges: u32,
        /// First commit sequence number the transaction covers.
        first_tx: u64,
        /// Last commit sequence number it covers (inter-transaction
        /// coalescing folds several commits into one log transaction).
        last_tx: u64,
        /// Data bytes in its ranges.
        bytes: u64,
        /// The log was durable up to this position when the frame was made.
        synced: u64,
    },
}

/// One valid frame found by [`LogInspector::walk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameReport {
    /// Log position (LSN) of the frame.
    pub lsn: u64,
    /// Total length of the frame in bytes, header and padding included.
    pub len: u32,
    /// Kind-specific fields.
    pub body: FrameBody,
}

impl FrameReport {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self.body {
            FrameBody::Range { .. } => FrameKind::Range,
            FrameBody::Commit { .. } => FrameKind::Commit,
        }
    }

    fn from_frame(f: &ScannedFrame<'_>) -> FrameReport {
        let (lsn, len, data_lsn) = (f.lsn, f.len, f.data_lsn);
        let body = match f.frame {
            Frame::Range { segment, offset, data } => {
                // decode_record bounds data by RECORD_CAPACITY, which fits u32.
                FrameBody::Range { segment, offset, data_len: u32::try_from(data.len()).unwrap_or(u32::MAX), data_lsn }
            }
            Frame::Commit { ranges, first_tx, last_tx, bytes, synced } => {
                FrameBody::Commit { ranges, first_tx, last_tx, bytes, synced }
            }
        };
        FrameReport { lsn, len, body }
    }
}

/// Where the log ends, as the recovery scanner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanReport {
    /// Where the scan started: the head of the chosen status.
    pub start: u64,
    /// Log position just after the last complete transaction: recovery
    /// would replay `[start, end)`.
    pub end: u64,
    /// Complete log transactions in `[start, end)`.
    pub transactions: u64,
    /// Commits those transactions cover (a log transaction may cover several
    /// coalesced commits).
    pub commits: u64,
    /// Valid frames seen, including those of a discarded tail.
    pub frames: u64,
    /// Bytes of valid frames after `end` that belong to no complete
    /// transaction (an unfinished or torn tail); recovery discards them.
    pub discarded: u64,
    /// Why the scan stopped. A [`ScanStop::Defect`] is the normal end of a
    /// log: the first position after the last frame holds zeros or stale
    /// bytes from an earlier lap or epoch.
    pub stop: ScanStop,
    /// Set when the bad frame where the scan stopped is damage rather than
    /// the log's end: records after it had been synced. Recovery refuses
    /// such a log unless told to salvage it.
    pub damage: Option<Damage>,
    /// The first valid frame of the status's epoch found after the refused
    /// one (within one maximal frame), damage or not: valid frames follow
    /// the bad one. Without damage they were never synced (a crash tore or
    /// lost the write before them), and recovery discards them.
    pub next_valid: Option<u64>,
    /// Whether the frame header where the scan stopped is all zero (never
    /// written).
    pub stop_blank: bool,
}

/// How a log ends, in words an operator can act on ([`ScanReport::log_end`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogEnd {
    /// Nothing follows the last complete transaction: the scan reached the
    /// end of the record area, or stopped on a never-written (all-zero) or
    /// stale header (a frame of an earlier lap of the ring or an earlier
    /// epoch) with no valid frame after it.
    Clean,
    /// A torn or unfinished tail: frames of a transaction whose commit
    /// frame is missing, a partly written frame, or valid frames after a
    /// refused one that were never synced. A crash leaves this (and so does
    /// a writer caught mid-write by a live view); recovery discards the
    /// tail, and nothing acknowledged is lost.
    Torn,
    /// Damage to synced records ([`ScanReport::damage`]): recovery refuses
    /// the log until it is restored or salvaged.
    Damaged,
}

impl LogEnd {
    /// A short name (`clean`, `torn`, `damaged`), as `rvmutl --json` prints it.
    pub fn name(self) -> &'static str {
        match self {
            LogEnd::Clean => "clean",
            LogEnd::Torn => "torn",
            LogEnd::Damaged => "damaged",
        }
    }
}

impl ScanReport {
    /// Bytes of the record area that hold complete transactions.
    pub fn used(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the frame at `lsn` belongs to a complete transaction (as
    /// opposed to a discarded tail).
    pub fn is_committed(&self, lsn: u64) -> bool {
        lsn >= self.start && lsn < self.end
    }

    /// How the log ends: clean, torn or damaged (see [`LogEnd`]).
    pub fn log_end(&self) -> LogEnd {
        use super::format::FrameDefect;
        if self.damage.is_some() {
            return LogEnd::Damaged;
        }
        if self.discarded > 0 || self.next_valid.is_some() {
            return LogEnd::Torn;
        }
        match self.stop {
            ScanStop::Limit => LogEnd::Clean,
            ScanStop::Defect { defect: FrameDefect::WrongPosition | FrameDefect::WrongEpoch, .. } => LogEnd::Clean,
            ScanStop::Defect { .. } if self.stop_blank => LogEnd::Clean,
            ScanStop::Defect { .. } => LogEnd::Torn,
        }
    }

    /// Human-readable reason the scan stopped.
    pub fn describe_stop(&self) -> &'static str {
        match self.stop {
            ScanStop::Limit => "reached the end of the record area",
            ScanStop::Defect { defect, .. } => defect.describe(),
        }
    }
}

/// Everything [`inspect`] finds in a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogReport {
    /// The log's path.
    pub path: PathBuf,
    /// Size of the device in bytes.
    pub device_len: u64,
    /// The superblock.
    pub superblock: Superblock,
    /// Both status slots.
    pub slots: [SlotReport; 2],
    /// The slot recovery would use (the valid one with the larger sequence
    /// number); `None` if neither is valid.
    pub chosen_slot: Option<u8>,
    /// The frames from the head on, in log order; empty without a valid slot.
    pub frames: Vec<FrameReport>,
    /// Where the log ends; `None` without a valid slot.
    pub scan: Option<ScanReport>,
}

/// Inspects the log at `path` on `vfs`, collecting every frame.
///
/// Fails like [`LogInspector::open`]; a log whose two status slots are both
/// invalid is not an error here (see [`LogReport::chosen_slot`]). For very
/// large logs prefer [`LogInspector::walk`], which does not keep the frames.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("demo.log");
/// # rvm_core::create_log(&path, 1 << 20).unwrap();
/// let report = rvm_core::log::inspect::inspect(&rvm_core::FileVfs, &path).unwrap();
/// assert_eq!(report.superblock.device_size, 1 << 20);
/// assert!(report.slots[0].is_valid() && report.slots[1].is_valid()); // both hold the status
/// assert!(report.frames.is_empty());
/// ```
pub fn inspect(vfs: &dyn Vfs, path: &Path) -> Result<LogReport> {
    let log = LogInspector::open(vfs, path)?;
    let (frames, scan) = match log.chosen_slot() {
        Some(_) => {
            let (frames, scan) = log.frames()?;
            (frames, Some(scan))
        }
        None => (Vec::new(), None),
    };
    Ok(LogReport {
        path: path.to_path_buf(),
        device_len: log.device_len,
        superblock: log.superblock,
        slots: log.slots.clone(),
        chosen_slot: log.chosen,
        frames,
        scan,
    })
}

/// An open, read-only view of a log.
///
/// Opened with [`open`](Self::open), it holds the device's exclusive lock
/// until dropped; with [`open_shared`](Self::open_shared) it holds no lock
/// and is a live view.
#[derive(Debug)]
pub struct LogInspector {
    ring: Ring,
    device_len: u64,
    superblock: Superblock,
    slots: [SlotReport; 2],
    chosen: Option<u8>,
    live: bool,
}

impl LogInspector {
    /// Opens the log at `path` on `vfs` and decodes its superblock and both
    /// status slots. Nothing is written.
    ///
    /// Errors: [`Error::Io`] (missing file, unreadable device),
    /// [`Error::Locked`] (an instance or another inspector has it open),
    /// [`LogError::NotALog`], [`LogError::UnsupportedVersion`], and
    /// [`Error::Corrupted`] for a damaged superblock or a device shorter
    /// than the superblock says. Invalid status slots are reported, not
    /// refused.
    pub fn open(vfs: &dyn Vfs, path: &Path) -> Result<LogInspector> {
        let dev = vfs.open(path, OpenMode::Existing).map_err(|e| Error::io("opening the log", path, e))?;
        Self::open_on(dev, path, false)
    }

    /// Opens the log at `path` on `vfs` for reading only **without taking
    /// its lock** ([`Vfs::open_read_only`]), so a log that a running program
    /// holds can be inspected. Nothing is written, and the program is not
    /// disturbed.
    ///
    /// The result is a **live view**: the status slots are read once, at
    /// open, and the frames when [`walk`](Self::walk) reads them, while the
    /// program may be writing. A batch being written shows as a torn tail
    /// (never as damage: a walk that stops on a frame that is valid when
    /// read again reports no damage), and commits made after the read are
    /// not shown. Errors as for [`open`](Self::open), without
    /// [`Error::Locked`].
    ///
    /// ```
    /// use rvm_core::log::inspect::LogInspector;
    /// use rvm_core::{FileVfs, Options, Rvm};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("live.log");
    /// rvm_core::create_log(&path, 1 << 20).unwrap();
    /// let rvm = Rvm::open(&path, Options::default()).unwrap(); // holds the lock
    /// let view = LogInspector::open_shared(&FileVfs, &path).unwrap();
    /// assert!(view.is_live());
    /// assert_eq!(view.walk(|_| {}).unwrap().transactions, 0);
    /// # drop(rvm);
    /// ```
    pub fn open_shared(vfs: &dyn Vfs, path: &Path) -> Result<LogInspector> {
        let dev = vfs.open_read_only(path).map_err(|e| Error::io("opening the log", path, e))?;
        Self::open_on(dev, path, true)
    }

    /// Whether this is a live view ([`open_shared`](Self::open_shared)): a
    /// program may be writing the log, and the view may be behind it.
    pub fn is_live(&self) -> bool {
        self.live
    }

    fn open_on(dev: Arc<dyn Storage>, path: &Path, live: bool) -> Result<LogInspector> {
        let device_len = dev.len().map_err(|e| Error::io("sizing the log", path, e))?;
        if device_len < format::BLOCK {
            return Err(LogError::NotALog { path: path.into() }.into());
        }
        let mut block = vec![0u8; format::BLOCK as usize];
        dev.read_at(&mut block, 0).map_err(|e| Error::io("reading the log superblock", path, e))?;
        let superblock = match Superblock::decode(&block) {
            Ok(sb) => sb,
            Err(format::SuperblockError::BadMagic) => return Err(LogError::NotALog { path: path.into() }.into()),
            Err(format::SuperblockError::Version(v)) => {
                return Err(LogError::UnsupportedVersion { found: v, supported: format::VERSION }.into())
            }
            Err(format::SuperblockError::Corrupt(why)) => {
                return Err(Error::corrupted(format!("log superblock ({why})"), format!("{} offset 0", path.display())))
            }
        };
        if superblock.device_size > device_len {
            return Err(Error::corrupted(
                "log superblock (device shorter than recorded size)",
                format!("{} offset 16", path.display()),
            ));
        }
        let mut image = vec![0u8; format::STATUS_SLOT as usize];
        let mut read_slot = |index: u8| -> Result<SlotReport> {
            let offset = Status::slot_offset(u64::from(index));
            dev.read_at(&mut image, offset).map_err(|e| Error::io("reading the log status", path, e))?;
            Ok(SlotReport::decode(index, offset, &image))
        };
        let slots = [read_slot(0)?, read_slot(1)?];
        // The same choice as recovery: the valid slot with the larger seq
        // (slot 0 when both hold the same status).
        let chosen = slots
            .iter()
            .filter_map(|s| s.valid_status().map(|st| (st.seq, s.index)))
            .fold(None, |best: Option<(u64, u8)>, (seq, index)| match best {
                Some((b, _)) if b >= seq => best,
                _ => Some((seq, index)),
            })
            .map(|(_, index)| index);
        let ring = Ring { dev, path: path.into(), area_offset: superblock.area_offset, area_len: superblock.area_len };
        Ok(LogInspector { ring, device_len, superblock, slots, chosen, live })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.ring.path
    }

    /// Size of the device in bytes (at least the superblock's
    /// [`device_size`](Superblock::device_size)).
    pub fn device_len(&self) -> u64 {
        self.device_len
    }

    /// The decoded superblock.
    pub fn superblock(&self) -> Superblock {
        self.superblock
    }

    /// Both status slots, valid or not.
    pub fn slots(&self) -> &[SlotReport; 2] {
        &self.slots
    }

    /// The slot recovery would use: the valid one with the larger sequence
    /// number, or `None` if neither is valid.
    pub fn chosen_slot(&self) -> Option<u8> {
        self.chosen
    }

    /// The status recovery would use; [`Error::Corrupted`] if both slots
    /// are invalid.
    pub fn status(&self) -> Result<&Status> {
        self.chosen.and_then(|i| self.slots[usize::from(i)].valid_status()).ok_or_else(|| {
            Error::corrupted(
                "log status (both slots invalid)",
                format!("{} offset {}", self.ring.path.display(), format::BLOCK),
            )
        })
    }

    /// The name the chosen status's segment dictionary gives segment `id`.
    pub fn segment_name(&self, id: u32) -> Option<&Path> {
        let status = self.status().ok()?;
        status.segments.iter().find(|s| s.id == id).map(|s| s.name.as_path())
    }

    /// Walks the frames from the head of the chosen status, exactly as
    /// recovery reads them (same epoch, same checks, at most one lap of the
    /// ring), calling `on_frame` for each valid frame in log order. Frames
    /// of an unfinished tail are reported too; tell them apart with
    /// [`ScanReport::is_committed`].
    ///
    /// Errors: [`Error::Corrupted`] if both status slots are invalid or the
    /// head is out of range; [`Error::Io`] if the device cannot be read.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("demo.log");
    /// # rvm_core::create_log(&path, 1 << 20).unwrap();
    /// use rvm_core::log::inspect::{FrameBody, LogInspector};
    /// let log = LogInspector::open(&rvm_core::FileVfs, &path).unwrap();
    /// let mut commits = 0;
    /// let scan = log
    ///     .walk(|f| {
    ///         if let FrameBody::Commit { .. } = f.body {
    ///             commits += 1;
    ///         }
    ///     })
    ///     .unwrap();
    /// assert_eq!(commits, scan.transactions);
    /// ```
    pub fn walk(&self, mut on_frame: impl FnMut(&FrameReport)) -> Result<ScanReport> {
        self.scan_frames(
            |f| {
                on_frame(&FrameReport::from_frame(f));
                Ok(())
            },
            || Ok(()),
        )
    }

    /// Replays the log into `apply` as recovery would, writing nothing:
    /// calls `apply(segment, offset, data)` for every range frame of every
    /// complete transaction from the head, in log order (frames of an
    /// unfinished tail are not passed). Applying them in this order to the
    /// segments' bytes gives what recovery would leave there. A transaction's
    /// frames are held in memory until its commit frame is read.
    ///
    /// The caller decides what damage means ([`ScanReport::damage`]):
    /// recovery refuses a damaged log; the frames passed lie before the
    /// damage. Errors as for [`walk`](Self::walk), and whatever `apply`
    /// returns (which stops the replay).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("demo.log");
    /// # rvm_core::create_log(&path, 1 << 20).unwrap();
    /// use rvm_core::log::inspect::LogInspector;
    /// let log = LogInspector::open_shared(&rvm_core::FileVfs, &path).unwrap();
    /// let mut image = vec![0u8; 4096];
    /// let scan = log
    ///     .replay(|_segment, offset, data| {
    ///         image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    ///         Ok(())
    ///     })
    ///     .unwrap();
    /// assert_eq!(scan.transactions, 0);
    /// ```
    pub fn replay(&self, mut apply: impl FnMut(u32, u64, &[u8]) -> Result<()>) -> Result<ScanReport> {
        let pending = std::cell::RefCell::new(Vec::<(u32, u64, Vec<u8>)>::new());
        self.scan_frames(
            |f| {
                if let Frame::Range { segment, offset, data } = f.frame {
                    pending.borrow_mut().push((segment, offset, data.to_vec()));
                }
                Ok(())
            },
            || {
                for (segment, offset, data) in pending.borrow_mut().drain(..) {
                    apply(segment, offset, &data)?;
                }
                Ok(())
            },
        )
    }

    /// The scan behind [`walk`](Self::walk) and [`replay`](Self::replay):
    /// `on_frame` sees every valid frame, `on_commit` is called after the
    /// frames of each complete transaction.
    fn scan_frames(
        &self,
        mut on_frame: impl FnMut(&ScannedFrame<'_>) -> Result<()>,
        mut on_commit: impl FnMut() -> Result<()>,
    ) -> Result<ScanReport> {
        let status = self.status()?;
        let start = status.head;
        let limit = match start.checked_add(self.superblock.area_len) {
            Some(limit) => limit,
            None => {
                return Err(Error::corrupted(
                    "log status (head position out of range)",
                    format!("{} status", self.ring.path.display()),
                ))
            }
        };
        let mut frames = 0u64;
        let mut commits = 0u64;
        // Commits the last commit frame covers (the callbacks share it).
        let last_covered = std::cell::Cell::new(0u64);
        let end = scan(
            &self.ring,
            start,
            u64::MAX,
            status.epoch,
            |f| {
                if let Frame::Commit { first_tx, last_tx, .. } = f.frame {
                    last_covered.set(last_tx.saturating_sub(first_tx).saturating_add(1));
                }
                frames += 1;
                on_frame(f)
            },
            |_, _| {
                commits = commits.saturating_add(last_covered.get());
                on_commit()
            },
        )?;
        let mut past = look_past_stop(&self.ring, None, start, &end, status.epoch, status.synced_end)?;
        let mut stop_blank = false;
        if let ScanStop::Defect { lsn, .. } = end.stop {
            let mut header = [0u8; format::RECORD_HEADER];
            self.ring.read(lsn, &mut header)?;
            stop_blank = header.iter().all(|&b| b == 0);
            // A live view may have read a frame the writer was writing (and
            // then found the frames it wrote after it): if the frame is
            // valid now, the scan stopped at the writer's moving end, not on
            // damage.
            if self.live && past.damage.is_some() && read_valid_frame(&self.ring, lsn, limit, status.epoch)?.is_some() {
                past.damage = None;
            }
        }
        Ok(ScanReport {
            start,
            end: end.end,
            transactions: end.transactions,
            commits,
            frames,
            discarded: end.discarded,
            stop: end.stop,
            damage: past.damage,
            next_valid: past.next_valid,
            stop_blank,
        })
    }

    /// [`walk`](Self::walk), collecting the frames.
    pub fn frames(&self) -> Result<(Vec<FrameReport>, ScanReport)> {
        let mut frames = Vec::new();
        let scan = self.walk(|f| frames.push(*f))?;
        Ok((frames, scan))
    }
}

/// How many times [`segment_snapshot`] reads before giving up on a log that
/// keeps changing under it.
pub const SNAPSHOT_ATTEMPTS: u32 = 8;

/// A window of a segment's bytes as recovery would leave them, built in
/// memory by [`segment_snapshot`] without writing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSnapshot {
    /// The segment's length.
    pub device_len: u64,
    /// Segment offset of `bytes[0]`.
    pub offset: u64,
    /// The window's bytes: the segment's, with the log's complete
    /// transactions for it applied in log order.
    pub bytes: Vec<u8>,
    /// The segment's id in the log's dictionary; `None` if the log does not
    /// name it (then nothing was applied).
    pub segment_id: Option<u32>,
    /// Range frames that touched the window.
    pub applied: u64,
    /// The scan of the log the bytes reflect.
    pub scan: ScanReport,
    /// Whether the log was read as a live view (always: the snapshot takes
    /// no lock), for the record.
    pub live: bool,
    /// Reads it took to get a consistent view (1 unless a truncation or
    /// checkpoint moved the log's head meanwhile).
    pub attempts: u32,
}

/// A zeroed buffer of `len` bytes for an in-memory view, or an
/// out-of-memory error naming the size: refused when it exceeds the
/// machine's physical memory (a large heap file would otherwise abort the
/// process when the allocation fails, or push it into the OOM killer), or
/// when the allocation fails.
fn in_memory(len: u64) -> std::io::Result<Vec<u8>> {
    let too_big = |limit: String| {
        std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!("{len} bytes do not fit in memory ({limit}); an in-memory view cannot hold them"),
        )
    };
    if let Some(mem) = crate::mem::memory_limit().filter(|&m| len > m) {
        return Err(too_big(format!("this process may use {mem} bytes")));
    }
    let n = usize::try_from(len).map_err(|_| too_big("more than the address space".into()))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(n).map_err(|_| too_big("the allocation failed".into()))?;
    bytes.resize(n, 0);
    Ok(bytes)
}

/// Reads the window `[offset, offset + len)` of `segment` (`None`: the
/// whole segment) as recovery through `log` would leave it, **writing
/// nothing** and taking no lock: the segment's bytes, with the range frames
/// of the log's complete transactions for that segment applied in log
/// order, in memory. A program may hold both files meanwhile.
///
/// The segment is read before the log, and the log's status is read before
/// and after: if the head or epoch moved (a truncation, checkpoint or
/// reopen finished while reading), the read is repeated, up to
/// [`SNAPSHOT_ATTEMPTS`] times. So the bytes are the committed state at one
/// moment, which may be behind a running writer. `progress(done, total)`
/// is called as the segment and the log are read (bytes; the log's share of
/// `total` is an estimate).
///
/// Errors: [`Error::Io`] (a missing or unreadable file), the log errors of
/// [`LogInspector::open_shared`], [`Error::Corrupted`] for a log recovery
/// would refuse (both status slots bad, or damage: see
/// [`ScanReport::damage`]), [`LogError::SegmentReplaced`] if the file is
/// not the one the log recorded, [`LogError::SegmentTooShort`] if the log
/// holds records past its end, and [`LogError::ViewUnstable`] if the head
/// moved during every attempt.
///
/// ```
/// use rvm_core::log::inspect::segment_snapshot;
/// use rvm_core::{CommitMode, FileVfs, MapSpec, Options, RestoreMode, Rvm};
/// # let dir = tempfile::tempdir().unwrap();
/// let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
/// rvm_core::create_log(&log, 1 << 20).unwrap();
/// let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
/// let s = rvm.create_segment(&seg, 4096).unwrap();
/// let r = rvm.map(&s, MapSpec::new(0, 4096)).unwrap();
/// let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
/// // SAFETY: nothing else touches the region.
/// unsafe { tx.modify_bytes(r.addr() + 8, b"in the log").unwrap() };
/// tx.commit(CommitMode::Flush).unwrap();
/// // The program still runs; the record is in the log only.
/// assert_eq!(&std::fs::read(&seg).unwrap()[8..18], &[0; 10]);
/// let snap = segment_snapshot(&FileVfs, &log, &seg, Some((8, 10)), &mut |_, _| {}).unwrap();
/// assert_eq!(snap.bytes, b"in the log");
/// # drop(r);
/// ```
pub fn segment_snapshot(
    vfs: &dyn Vfs,
    log: &Path,
    segment: &Path,
    window: Option<(u64, u64)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SegmentSnapshot> {
    let name = vfs.canonical_name(segment).map_err(|e| Error::io("resolving the segment's name", segment, e))?;
    for attempt in 1..=SNAPSHOT_ATTEMPTS {
        let before = LogInspector::open_shared(vfs, log)?;
        let status = before.status()?.clone();
        let entry = status.segments.iter().find(|e| e.name == name);
        let dev = vfs.open_read_only(segment).map_err(|e| Error::io("opening the segment", segment, e))?;
        let device_len = dev.len().map_err(|e| Error::io("sizing the segment", segment, e))?;
        if let (Some(recorded), Some(found)) = (
            entry.and_then(|e| e.device),
            dev.identity().map_err(|e| Error::io("reading the segment's identity", segment, e))?,
        ) {
            if !recorded.same_file(&found) {
                return Err(LogError::SegmentReplaced { path: name, recorded, found }.into());
            }
        }
        let (offset, len) = window.unwrap_or((0, device_len));
        let offset = offset.min(device_len);
        let len = len.min(device_len - offset);
        let log_estimate = status.synced_end.saturating_sub(status.head);
        let mut total = len.saturating_add(log_estimate);
        let mut bytes = in_memory(len).map_err(|e| Error::io("reading the segment", segment, e))?;
        const CHUNK: usize = 8 << 20;
        let mut done = 0usize;
        while done < bytes.len() {
            let n = CHUNK.min(bytes.len() - done);
            dev.read_at(&mut bytes[done..done + n], offset + done as u64)
                .map_err(|e| Error::io("reading the segment", segment, e))?;
            done += n;
            progress(done as u64, total);
        }
        drop(dev);
        let id = entry.map(|e| e.id);
        let mut applied = 0u64;
        let window_end = offset + len;
        let scan = before.replay(|sid, at, data| {
            if Some(sid) != id {
                return Ok(());
            }
            let end = at.saturating_add(data.len() as u64);
            if end > device_len {
                return Err(LogError::SegmentTooShort { path: name.clone(), needed: end, len: device_len }.into());
            }
            let (lo, hi) = (at.max(offset), end.min(window_end));
            if lo < hi {
                bytes[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
                applied += 1;
            }
            Ok(())
        })?;
        if let Some(d) = scan.damage {
            let sb = before.superblock();
            return Err(d.error(log, sb.area_offset, sb.area_len));
        }
        total = total.max(len + scan.used());
        progress(total, total);
        let after = LogInspector::open_shared(vfs, log)?;
        let now = after.status()?;
        if (now.head, now.epoch) == (status.head, status.epoch) {
            return Ok(SegmentSnapshot {
                device_len,
                offset,
                bytes,
                segment_id: id,
                applied,
                scan,
                live: true,
                attempts: attempt,
            });
        }
    }
    Err(LogError::ViewUnstable { path: log.to_path_buf(), attempts: SNAPSHOT_ATTEMPTS }.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::FrameDefect;
    use crate::testing::{CrashMode, SimDisk};
    use crate::{CommitMode, MapSpec, Options, RestoreMode, Rvm};
    use std::sync::Arc;

    fn opts() -> Options {
        Options { truncate_threshold: None, ..Options::default() }
    }

    #[test]
    fn reports_frames_slots_and_the_torn_tail() {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        let log = Path::new("log");
        crate::create_log_with(vfs.as_ref(), log, 256 << 10).unwrap();
        let tail;
        {
            let rvm = Rvm::open_with(vfs.clone(), log, opts()).unwrap();
            let seg = rvm.create_segment("seg", 4096).unwrap();
            let r = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
            for (i, data) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                // SAFETY: single-threaded test; nothing else touches the region.
                unsafe { tx.modify_bytes(r.addr() + 16 * i, data).unwrap() };
                tx.commit(CommitMode::Flush).unwrap();
            }
            tail = rvm.query().tail;
            disk.crash(CrashMode::LoseUnsynced);
        }
        let report = inspect(vfs.as_ref(), log).unwrap();
        assert_eq!(report.chosen_slot, Some(0));
        assert!(report.slots.iter().all(SlotReport::is_valid));
        let status = report.slots[0].valid_status().unwrap();
        assert_eq!(status.segments.len(), 1);
        let scan = report.scan.unwrap();
        assert_eq!((scan.transactions, scan.commits, scan.frames, scan.discarded), (3, 3, 6, 0));
        assert_eq!(scan.end, tail);
        assert_eq!(
            report.frames[0].body,
            FrameBody::Range { segment: 1, offset: 0, data_len: 3, data_lsn: report.frames[0].lsn + 12 }
        );
        assert_eq!(report.frames[3].kind(), FrameKind::Commit);
        assert!(report.frames.iter().all(|f| scan.is_committed(f.lsn)));

        // Damage the last record: the log ends before it.
        let mut img = disk.durable_image(log).unwrap();
        let last = report.frames[5];
        let at = (report.superblock.area_offset + last.lsn % report.superblock.area_len) as usize;
        img[at + 9] ^= 1;
        disk.set_durable_image(log, img);
        let inspector = LogInspector::open(vfs.as_ref(), log).unwrap();
        let (frames, scan) = inspector.frames().unwrap();
        assert_eq!((scan.transactions, frames.len()), (2, 4));
        assert_eq!(scan.discarded, 0);
        assert_eq!(scan.stop, ScanStop::Defect { lsn: last.lsn, defect: FrameDefect::BadChecksum });
        assert_eq!(inspector.segment_name(1), Some(Path::new("seg")));
        // The inspector holds the lock.
        assert!(matches!(Rvm::open_with(vfs.clone(), log, opts()), Err(Error::Locked { .. })));
    }

    #[test]
    fn invalid_slots_are_reported_not_refused() {
        let disk = SimDisk::new();
        let log = Path::new("log");
        crate::create_log_with(&disk, log, 256 << 10).unwrap();
        let mut img = disk.durable_image(log).unwrap();
        // One damaged slot: the other holds the same status.
        img[format::BLOCK as usize + 20] ^= 4;
        disk.set_durable_image(log, img.clone());
        let report = inspect(&disk, log).unwrap();
        assert_eq!(report.slots[0].problem, Some(SlotProblem::Damaged));
        assert_eq!(report.slots[1].problem, None);
        assert_eq!(report.chosen_slot, Some(1));
        assert!(report.scan.is_some());
        // Both damaged: reported, and a walk is refused.
        let slot1 = (format::BLOCK + format::STATUS_SLOT) as usize;
        img[slot1] = 0xff; // one junk byte: bad magic
        disk.set_durable_image(log, img.clone());
        let report = inspect(&disk, log).unwrap();
        assert_eq!(report.slots[1].problem, Some(SlotProblem::BadMagic));
        assert_eq!((report.chosen_slot, report.scan), (None, None));
        let inspector = LogInspector::open(&disk, log).unwrap();
        assert!(matches!(inspector.walk(|_| {}), Err(Error::Corrupted { .. })));
        drop(inspector);
        img[slot1..slot1 + format::STATUS_SLOT as usize].fill(0);
        disk.set_durable_image(log, img);
        assert_eq!(inspect(&disk, log).unwrap().slots[1].problem, Some(SlotProblem::Empty));
    }

    /// A log with `n` flush-committed one-range transactions on a 4 KiB
    /// segment "seg" (writes `i` at offset 16 * i), left open in `rvm`.
    fn live_log(disk: &SimDisk, n: usize) -> (Rvm, crate::Region) {
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        crate::create_log_with(vfs.as_ref(), Path::new("log"), 256 << 10).unwrap();
        let rvm = Rvm::open_with(vfs, Path::new("log"), opts()).unwrap();
        let seg = rvm.create_segment("seg", 4096).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
        for i in 0..n {
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: single-threaded test; nothing else touches the region.
            unsafe { tx.modify_bytes(r.addr() + 16 * i, &[i as u8 + 1; 8]).unwrap() };
            tx.commit(CommitMode::Flush).unwrap();
        }
        (rvm, r)
    }

    #[test]
    fn a_shared_view_reads_a_held_log_and_writes_nothing() {
        let disk = SimDisk::new();
        let (rvm, r) = live_log(&disk, 3);
        let before = disk.live_image("log").unwrap();
        let ops = disk.op_count();
        let view = LogInspector::open_shared(&disk, Path::new("log")).unwrap();
        assert!(view.is_live());
        let (frames, scan) = view.frames().unwrap();
        assert_eq!((frames.len(), scan.transactions), (6, 3));
        assert_eq!(scan.log_end(), LogEnd::Clean);
        assert!(scan.stop_blank);
        let mut seen = Vec::new();
        let replayed = view
            .replay(|seg, off, data| {
                seen.push((seg, off, data.to_vec()));
                Ok(())
            })
            .unwrap();
        assert_eq!(replayed, scan);
        assert_eq!(seen, (0..3u8).map(|i| (1, 16 * u64::from(i), vec![i + 1; 8])).collect::<Vec<_>>());
        // Reads only: the live image is unchanged and no write was counted
        // (the op counter counts reads too, so compare the bytes).
        assert!(disk.op_count() > ops);
        assert_eq!(disk.live_image("log").unwrap(), before);
        // The holder carries on.
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: single-threaded test; nothing else touches the region.
        unsafe { tx.modify_bytes(r.addr(), b"more").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
        assert_eq!(view.walk(|_| {}).unwrap().transactions, 4);
        // A shared view cannot write through its device.
        assert!(view.ring.write(0, b"x").is_err());
    }

    #[test]
    fn log_end_tells_clean_torn_and_damaged_apart() {
        let disk = SimDisk::new();
        let (rvm, _r) = live_log(&disk, 3);
        let frames = LogInspector::open_shared(&disk, Path::new("log")).unwrap().frames().unwrap().0;
        drop(_r);
        rvm.close().unwrap();
        let clean = disk.durable_image("log").unwrap();
        let at = |lsn: u64| (format::AREA_OFFSET + lsn) as usize;
        let end_of = |img: &[u8]| {
            disk.set_durable_image("log", img.to_vec());
            LogInspector::open_shared(&disk, Path::new("log")).unwrap().walk(|_| {}).unwrap()
        };
        assert_eq!(end_of(&clean).log_end(), LogEnd::Clean);
        // Synced frames damaged mid-log: damage.
        let mut img = clean.clone();
        img[at(frames[2].lsn) + 9] ^= 1;
        let scan = end_of(&img);
        assert_eq!(scan.log_end(), LogEnd::Damaged);
        assert_eq!(scan.next_valid, Some(frames[4].lsn));
        // A partial frame at the end of a log whose status does not vouch for it: torn.
        let mut img = clean.clone();
        let status_at = format::BLOCK as usize;
        for slot in 0..2 {
            let o = status_at + slot * format::STATUS_SLOT as usize;
            let mut st = Status::decode(&img[o..o + format::STATUS_SLOT as usize]).unwrap();
            st.synced_end = frames[4].lsn;
            let enc = st.encode().unwrap();
            img[o..o + enc.len()].copy_from_slice(&enc);
        }
        img[at(frames[5].lsn) + 9] ^= 1;
        let scan = end_of(&img);
        assert_eq!((scan.log_end(), scan.transactions, scan.next_valid), (LogEnd::Torn, 2, None));
        // A non-blank header at the end (garbage past the last frame): torn.
        let mut img = clean.clone();
        let end = frames[5].lsn + u64::from(frames[5].len);
        img[at(end)..at(end) + 8].copy_from_slice(&[0xab; 8]);
        let scan = end_of(&img);
        assert_eq!((scan.log_end(), scan.stop_blank), (LogEnd::Torn, false));
    }

    #[test]
    fn a_snapshot_is_what_recovery_leaves_and_writes_nothing() {
        let disk = SimDisk::new();
        let (rvm, r) = live_log(&disk, 4);
        let (log_before, seg_before) = (disk.live_image("log").unwrap(), disk.live_image("seg").unwrap());
        let seg = Path::new("seg");
        let snap = segment_snapshot(&disk, Path::new("log"), seg, None, &mut |_, _| {}).unwrap();
        assert_eq!(
            (snap.device_len, snap.offset, snap.segment_id, snap.applied, snap.attempts),
            (4096, 0, Some(1), 4, 1)
        );
        assert_eq!(disk.live_image("log").unwrap(), log_before);
        assert_eq!(disk.live_image("seg").unwrap(), seg_before);
        let window = segment_snapshot(&disk, Path::new("log"), seg, Some((20, 30)), &mut |_, _| {}).unwrap();
        assert_eq!(window.bytes, snap.bytes[20..50]);
        assert_eq!(window.applied, 3);
        // What recovery writes into the segment is what the snapshot showed.
        drop(r);
        rvm.truncate().unwrap();
        rvm.close().unwrap();
        assert_eq!(disk.live_image("seg").unwrap(), snap.bytes);
        // A segment the log does not name: its bytes as they are.
        disk.set_durable_image("other", vec![7u8; 100]);
        let other = segment_snapshot(&disk, Path::new("log"), Path::new("other"), None, &mut |_, _| {}).unwrap();
        assert_eq!((other.segment_id, other.bytes), (None, vec![7u8; 100]));
    }

    #[test]
    fn a_snapshot_refuses_what_recovery_refuses() {
        let disk = SimDisk::new();
        let (rvm, r) = live_log(&disk, 3);
        let frames = LogInspector::open_shared(&disk, Path::new("log")).unwrap().frames().unwrap().0;
        drop(r);
        drop(rvm); // no close: the records stay in the log
        let img = disk.durable_image("log").unwrap();
        let snap = |_: ()| segment_snapshot(&disk, Path::new("log"), Path::new("seg"), None, &mut |_, _| {});
        // A shorter segment than the records need.
        let seg = disk.durable_image("seg").unwrap();
        disk.set_durable_image("seg", seg[..20].to_vec());
        assert!(matches!(snap(()), Err(Error::Log(LogError::SegmentTooShort { needed: 24, len: 20, .. }))));
        disk.set_durable_image("seg", seg.clone());
        // Damage.
        let mut bad = img.clone();
        bad[(format::AREA_OFFSET + frames[2].lsn) as usize + 9] ^= 1;
        disk.set_durable_image("log", bad);
        assert!(matches!(snap(()), Err(Error::Corrupted { .. })));
        disk.set_durable_image("log", img);
        assert_eq!(snap(()).unwrap().applied, 3);
        // Another file under the segment's name.
        disk.remove("seg");
        disk.set_durable_image("seg", seg);
        assert!(matches!(snap(()), Err(Error::Log(LogError::SegmentReplaced { .. }))));
    }

    #[test]
    fn bad_devices_are_typed_errors() {
        let disk = SimDisk::new();
        assert!(matches!(LogInspector::open(&disk, Path::new("missing")), Err(Error::Io { .. })));
        disk.set_durable_image("short", vec![0u8; 100]);
        assert!(matches!(LogInspector::open(&disk, Path::new("short")), Err(Error::Log(LogError::NotALog { .. }))));
        crate::create_log_with(&disk, Path::new("log"), 256 << 10).unwrap();
        let img = disk.durable_image("log").unwrap();
        disk.set_durable_image("log", &img[..img.len() - 1]);
        assert!(matches!(LogInspector::open(&disk, Path::new("log")), Err(Error::Corrupted { .. })));
        disk.set_durable_image("log", img);
        let _held = LogInspector::open(&disk, Path::new("log")).unwrap();
        assert!(matches!(LogInspector::open(&disk, Path::new("log")), Err(Error::Locked { .. })));
    }
}
