//! Read-only inspection of a log: the superblock, both status slots, and
//! the frames from the head to the end of the log, as typed values.
//!
//! This is what `rvmutl status` and `rvmutl dump` print. Inspection never
//! writes: it does not run recovery, does not start a new epoch and does not
//! repair anything, so it can be pointed at a damaged log to see what a
//! recovery would find.
//!
//! Opening a log takes the device's exclusive lock for as long as the
//! [`LogInspector`] lives (see [`Vfs::open`]): inspecting a log that an
//! instance holds open fails with [`Error::Locked`].
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
use super::{find_damage, scan, Damage, Ring, ScanStop};
use crate::error::{Error, LogError, Result};
use crate::storage::{OpenMode, Vfs};
use std::path::{Path, PathBuf};

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
        /// Number of data bytes the frame carries.
        data_len: u32,
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

    fn from_frame(lsn: u64, len: u32, frame: &Frame<'_>) -> FrameReport {
        let body = match *frame {
            Frame::Range { segment, offset, data } => {
                // decode_frame bounds data by MAX_RANGE_DATA, which fits u32.
                FrameBody::Range { segment, offset, data_len: u32::try_from(data.len()).unwrap_or(u32::MAX) }
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
/// Holds the device's exclusive lock until dropped.
#[derive(Debug)]
pub struct LogInspector {
    ring: Ring,
    device_len: u64,
    superblock: Superblock,
    slots: [SlotReport; 2],
    chosen: Option<u8>,
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
        Ok(LogInspector { ring, device_len, superblock, slots, chosen })
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
        let status = self.status()?;
        let start = status.head;
        if start.checked_add(self.superblock.area_len).is_none() {
            return Err(Error::corrupted(
                "log status (head position out of range)",
                format!("{} status", self.ring.path.display()),
            ));
        }
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
                let report = FrameReport::from_frame(f.lsn, f.len, &f.frame);
                if let FrameBody::Commit { first_tx, last_tx, .. } = report.body {
                    last_covered.set(last_tx.saturating_sub(first_tx).saturating_add(1));
                }
                frames += 1;
                on_frame(&report);
                Ok(())
            },
            |_, _| {
                commits = commits.saturating_add(last_covered.get());
                Ok(())
            },
        )?;
        let damage = find_damage(&self.ring, start, &end, status.epoch, status.synced_end)?;
        Ok(ScanReport {
            start,
            end: end.end,
            transactions: end.transactions,
            commits,
            frames,
            discarded: end.discarded,
            stop: end.stop,
            damage,
        })
    }

    /// [`walk`](Self::walk), collecting the frames.
    pub fn frames(&self) -> Result<(Vec<FrameReport>, ScanReport)> {
        let mut frames = Vec::new();
        let scan = self.walk(|f| frames.push(*f))?;
        Ok((frames, scan))
    }
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
        assert_eq!(report.frames[0].body, FrameBody::Range { segment: 1, offset: 0, data_len: 3 });
        assert_eq!(report.frames[3].kind(), FrameKind::Commit);
        assert!(report.frames.iter().all(|f| scan.is_committed(f.lsn)));

        // Damage the last commit frame: its transaction becomes a discarded tail.
        let mut img = disk.durable_image(log).unwrap();
        let last = report.frames[5];
        let at = (report.superblock.area_offset + last.lsn % report.superblock.area_len) as usize;
        img[at + 40] ^= 1;
        disk.set_durable_image(log, img);
        let inspector = LogInspector::open(vfs.as_ref(), log).unwrap();
        let (frames, scan) = inspector.frames().unwrap();
        assert_eq!((scan.transactions, frames.len()), (2, 5));
        assert_eq!(scan.discarded, u64::from(frames[4].len));
        assert!(!scan.is_committed(frames[4].lsn));
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
