//! Recovery at open: verify the whole live log, check the segments it
//! names, then replay it (see `docs/DESIGN.md` §3.4).

use super::instant::Deferred;
use super::segments::OwnerMark;
use crate::error::{Error, LogError, Result};
use crate::log::format::{self, Status};
use crate::log::format::{RangeRef, RecordInfo};
use crate::log::{self, LogDevice, Ring, ScanEnd, ScanStop};
use crate::options::{Options, RecoveryPhase, RecoveryReport, Salvage, PROGRESS_STEP};
use crate::replay::{self, replay_with_progress, Replayed};
use crate::storage::{OpenMode, Storage, Vfs};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Recovery, in two passes so that a damaged log is refused before anything
/// is written:
///
/// 1. verify: scan every frame from the head (CRCs, positions, epoch),
///    noting the segments the complete transactions touch and how far; tell
///    a torn or clean end from damage ([`log::look_past_stop`]);
/// 2. open every touched segment and check it is the file the log recorded,
///    long enough, and not claimed by another log;
/// 3. replay the complete transactions, sync the segments, then write a
///    status with the log empty and a new epoch.
///
/// Running it again after a crash at any point redoes the same idempotent
/// writes.
pub(super) fn recover(
    vfs: &dyn Vfs,
    ring: &Ring,
    sb: &format::Superblock,
    status: Status,
    opts: &Options,
) -> Result<(Status, RecoveryReport, Option<Deferred>)> {
    if opts.instant_recovery {
        return recover_instant(vfs, ring, sb, status, opts);
    }
    let mut touched = Touched::default();
    let progress = opts.recovery_progress.as_ref();
    let mut verifying = Verifying::new(opts, &status);
    // Segments are opened once, by whichever needs them first: the staging
    // applier (to read pages) or the checks below.
    let opened = parking_lot::Mutex::new(HashMap::<u32, (Arc<dyn Storage>, PathBuf)>::new());
    let dictionary = status.segments.clone();
    let open_segment = |id: u32| -> Result<(Arc<dyn Storage>, PathBuf)> {
        if let Some(d) = opened.lock().get(&id) {
            return Ok(d.clone());
        }
        let (dev, path) = open_recorded(vfs, ring, opts, &dictionary, id)?;
        opened.lock().insert(id, (dev.clone(), path.clone()));
        Ok((dev, path))
    };
    // One scan verifies every record and, on a second thread, applies the
    // complete transactions to an in-memory image of their pages; nothing
    // is written until the checks below pass.
    let staged =
        replay::stage(ring, status.head, u64::MAX, status.epoch, &open_segment, &mut |lsn, info, ranges, _| {
            touched.record(info, ranges);
            verifying.at(lsn);
        })?;
    let verified = staged.end;
    let (devices, salvage) = check(vfs, ring, sb, &status, opts, None, &verified, &touched.touched, &open_segment)?;
    // Before any segment write, a status says how far the log is durable:
    // should the replay be cut short by a crash, later damage to the
    // records it applied is still refused, never taken for the log's end.
    let mut status = status;
    if status.synced_end < verified.end {
        status.seq += 1;
        status.synced_end = verified.end;
        log::write_status(ring, &status)?;
    }
    verifying.end(verified.end);
    let total = verified.end - status.head;
    let on_replay = |done: u64| {
        if let Some(p) = progress {
            p.report(RecoveryPhase::Replay, done, total);
        }
    };
    let (end, log_bytes, segment_bytes) = if staged.complete() {
        let log_bytes = staged.log_bytes;
        let segment_bytes = staged.write()?;
        on_replay(total);
        (verified, log_bytes, segment_bytes)
    } else {
        // The touched pages did not fit in memory: a second scan replays
        // in bounded memory, writing as it goes.
        drop(staged);
        let resolve = |id| {
            devices.get(&id).cloned().ok_or_else(|| {
                Error::corrupted(
                    format!("log record (segment id {id} changed between scans)"),
                    ring.path.display().to_string(),
                )
            })
        };
        let Replayed { end, log_bytes, segment_bytes } =
            replay_with_progress(ring, status.head, verified.end, status.epoch, resolve, &on_replay)?;
        if end.end != verified.end {
            return Err(Error::corrupted(
                "log (records changed between the verifying scan and the replay)",
                format!("{} position {}", ring.path.display(), end.end),
            ));
        }
        (end, log_bytes, segment_bytes)
    };
    // The segments are closed (unlocked) when it returns, before the
    // application opens them.
    drop(devices);
    let report = RecoveryReport {
        transactions: end.transactions,
        log_bytes,
        discarded_bytes: verified.discarded,
        segment_bytes_written: segment_bytes,
        stopped_at: match verified.stop {
            ScanStop::Limit => None,
            ScanStop::Defect { lsn, defect } => Some((lsn, defect.describe())),
        },
        salvage,
        deferred_pages: 0,
    };
    let next = Status {
        seq: status.seq + 1,
        epoch: status.epoch + 1,
        head: end.end,
        synced_end: end.end,
        committed: status.committed.saturating_add(end.transactions),
        // The dictionary stays: ids are stable per name, so both slots
        // usually agree on it.
        ..status
    };
    log::write_status(ring, &next)?;
    Ok((next, report, None))
}

/// The verifying scan's progress reports ([`Options::recovery_progress`]).
struct Verifying<'a> {
    progress: Option<&'a crate::options::ProgressHook>,
    head: u64,
    /// The log bytes the scan expects to read (from the status).
    estimate: u64,
    reported: u64,
}

impl<'a> Verifying<'a> {
    fn new(opts: &'a Options, status: &Status) -> Verifying<'a> {
        let estimate = status.synced_end.saturating_sub(status.head);
        Verifying { progress: opts.recovery_progress.as_ref(), head: status.head, estimate, reported: 0 }
    }

    /// The scan is at `lsn`: a report every [`PROGRESS_STEP`] bytes.
    fn at(&mut self, lsn: u64) {
        let done = lsn - self.head;
        if let Some(p) = self.progress.filter(|_| done >= self.reported + PROGRESS_STEP) {
            self.reported = done;
            p.report(RecoveryPhase::Verify, done, self.estimate);
        }
    }

    /// The scan verified the log up to `end`.
    fn end(&self, end: u64) {
        if let Some(p) = self.progress {
            p.report(RecoveryPhase::Verify, end - self.head, end - self.head);
        }
    }
}

/// Copies a damaged log to `<log>.damaged-<epoch>` (or `...-<epoch>.<n>`
/// if that exists) before a salvage rewrites its status.
fn keep_damaged_copy(vfs: &dyn Vfs, log: &Path, epoch: u64) -> Result<PathBuf> {
    let base = format!("{}.damaged-{epoch}", log.display());
    for n in 0..1000 {
        let to = PathBuf::from(if n == 0 { base.clone() } else { format!("{base}.{n}") });
        match vfs.copy(log, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("keeping a copy of the damaged log", to, e)),
        }
    }
    Err(Error::io("keeping a copy of the damaged log", base, std::io::ErrorKind::AlreadyExists.into()))
}

/// Runs recovery on a log without keeping it open (what `rvmutl recover`
/// does); returns the report.
///
/// `opts` supplies [`Options::salvage`] and [`Options::accepted_segments`];
/// the other fields do not matter here.
pub fn recover_log(vfs: &dyn Vfs, log_path: &Path, opts: &Options) -> Result<RecoveryReport> {
    let LogDevice { ring, sb, status } = LogDevice::open(vfs, log_path)?;
    let opts = Options { instant_recovery: false, ..opts.clone() };
    Ok(recover(vfs, &ring, &sb, status, &opts)?.1)
}

/// What instant recovery's scan makes of a part of the log: its pages'
/// index, the segments it touches, its complete transactions' log bytes.
struct IndexPart {
    index: crate::lazy::Builder,
    touched: Touched,
    log_bytes: u64,
}

impl IndexPart {
    /// A verified record of a mapped log (pieces name their bytes by log
    /// position).
    fn record(&mut self, lsn: u64, info: &RecordInfo, ranges: &[RangeRef], tx: &log::TxSoFar) -> Result<()> {
        self.record_with(lsn, None, info, ranges, tx);
        Ok(())
    }

    /// A verified record; `rec`, its bytes, when the log is not mapped
    /// (the index copies the ranges' bytes).
    fn record_with(&mut self, lsn: u64, rec: Option<&[u8]>, info: &RecordInfo, ranges: &[RangeRef], tx: &log::TxSoFar) {
        self.touched.record(info, ranges);
        self.index.record(lsn, rec, ranges);
        if info.commit.is_some() {
            self.index.commit();
            self.log_bytes += lsn + info.len as u64 - tx.start;
        }
    }
}

/// The segments complete transactions touch, and how far.
#[derive(Default)]
struct Touched {
    /// Ordered, so the first refused segment (and the error) is the same
    /// at every open.
    touched: std::collections::BTreeMap<u32, u64>,
    in_tx: Vec<(u32, u64)>,
}

impl Touched {
    fn record(&mut self, info: &RecordInfo, ranges: &[RangeRef]) {
        let mut note = |segment: u32, end: u64| {
            // Per run of ranges of one segment, the furthest end.
            match self.in_tx.last_mut() {
                Some((s, e)) if *s == segment => *e = (*e).max(end),
                _ => self.in_tx.push((segment, end)),
            }
        };
        match info.one_segment_end {
            // The usual record: its decoding summed it up.
            Some((segment, end)) => note(segment, end),
            None => ranges.iter().for_each(|r| note(r.segment, r.offset.saturating_add(u64::from(r.len)))),
        }
        if info.commit.is_some() {
            for (id, end) in self.in_tx.drain(..) {
                let e = self.touched.entry(id).or_insert(0);
                *e = (*e).max(end);
            }
        }
    }

    /// Adds what a later part of the log touched.
    fn merge(&mut self, later: Touched) {
        for (id, end) in later.touched {
            let e = self.touched.entry(id).or_insert(0);
            *e = (*e).max(end);
        }
    }
}

/// Segments opened by recovery: id → (device, path).
type Devices = HashMap<u32, (Arc<dyn Storage>, PathBuf)>;

/// Recovery's checks after the verifying scan, writing nothing: tells
/// damage from a torn end (refusing it, or salvaging with
/// [`Options::salvage`]), then opens every touched segment and checks it
/// is the file the log recorded, long enough, and not another log's.
#[allow(clippy::too_many_arguments)]
fn check(
    vfs: &dyn Vfs,
    ring: &Ring,
    sb: &format::Superblock,
    status: &Status,
    opts: &Options,
    area: Option<&[u8]>,
    verified: &ScanEnd,
    touched: &std::collections::BTreeMap<u32, u64>,
    open_segment: &dyn Fn(u32) -> Result<(Arc<dyn Storage>, PathBuf)>,
) -> Result<(Devices, Option<Salvage>)> {
    let verified = *verified;
    let mut salvage = None;
    if let Some(damage) =
        log::look_past_stop(ring, area, status.head, &verified, status.epoch, status.synced_end)?.damage
    {
        if !opts.salvage {
            return Err(damage.error(&ring.path, ring.area_offset, ring.area_len));
        }
        let copy = keep_damaged_copy(vfs, &ring.path, status.epoch)?;
        salvage = Some(Salvage {
            damaged_at: damage.lsn,
            defect: damage.defect.describe(),
            synced_to: damage.synced_to,
            dropped_bytes: damage.valid_end.max(damage.lsn) - verified.end,
            dropped_transactions: damage.transactions_after,
            copy,
        });
    }
    // Every segment is opened and checked before any is written.
    let mut devices = HashMap::new();
    // As owner marks name it; asked of the file system only when a mark
    // names this log's id (not at every open).
    let our_log = std::cell::OnceCell::new();
    let our_log = || our_log.get_or_init(|| vfs.canonical_name(&ring.path).unwrap_or_else(|_| ring.path.clone()));
    for (&id, &needed) in touched.iter() {
        let entry = status.segments.iter().find(|e| e.id == id).ok_or_else(|| {
            Error::corrupted(
                format!("log record (segment id {id} not in the dictionary)"),
                ring.path.display().to_string(),
            )
        })?;
        let (_, checked) = opts.segment_location(&entry.name);
        let (dev, path) = open_segment(id)?;
        if checked {
            let found = dev.identity().map_err(|e| Error::io("identifying segment", &path, e))?;
            if let (Some(recorded), Some(found)) = (entry.device, found) {
                if !recorded.same_file(&found) {
                    return Err(LogError::SegmentReplaced { path, recorded, found }.into());
                }
            }
            let mark = dev.owner_mark().map_err(|e| Error::io("reading the segment's owner mark", &path, e))?;
            match mark.as_deref().and_then(OwnerMark::decode) {
                Some(other) if other.log_id != sb.log_id => {
                    return Err(LogError::SegmentInOtherLog { path, other_log: other.log }.into());
                }
                Some(mine) if mine.log != *our_log() && another_file_is_this_log(vfs, ring, sb.log_id, &mine.log) => {
                    return Err(LogError::SegmentOfCopiedLog { path, owner_log: mine.log }.into());
                }
                _ => {}
            }
        }
        let len = dev.len().map_err(|e| Error::io("sizing segment", &path, e))?;
        if len < needed {
            return Err(LogError::SegmentTooShort { path, needed, len }.into());
        }
        devices.insert(id, (dev, path));
    }
    Ok((devices, salvage))
}

/// Whether the log file at `other` (a path other than this log's, from a
/// segment's owner mark) has this log's id but is another file: one of the
/// two logs is a copy of the other. A log moved away from `other` (no file
/// there, or another log) is not.
fn another_file_is_this_log(vfs: &dyn Vfs, ring: &Ring, log_id: u128, other: &Path) -> bool {
    let Ok(dev) = vfs.open_read_only(other) else { return false };
    if let (Ok(Some(theirs)), Ok(Some(ours))) = (dev.identity(), ring.dev.identity()) {
        if theirs.same_file(&ours) {
            // This log under another name (a hard link).
            return false;
        }
    }
    let mut block = vec![0u8; format::BLOCK as usize];
    dev.read_at(&mut block, 0).is_ok() && format::Superblock::decode(&block).is_ok_and(|sb| sb.log_id == log_id)
}

/// Instant recovery (`Options::instant_recovery`): steps 1-3 of §3.4 as
/// always (the verifying scan, damage, segment checks), building the index
/// of the pages each complete transaction changes instead of staging them;
/// steps 4-6 are left to the instance's background thread.
fn recover_instant(
    vfs: &dyn Vfs,
    ring: &Ring,
    sb: &format::Superblock,
    status: Status,
    opts: &Options,
) -> Result<(Status, RecoveryReport, Option<Deferred>)> {
    let mut touched = Touched::default();
    let mut verifying = Verifying::new(opts, &status);
    // One read-only mapping of the record area serves the scan (no copy
    // into a buffer) and then the index (pieces name their bytes by log
    // position); without a descriptor the scan reads with `pread` and the
    // index copies the ranges' bytes.
    let view = ring.view();
    let mut index = crate::lazy::Builder::new(crate::mem::page_size(), ring.area_len, view.is_some());
    let mut log_bytes = 0u64;
    let new_part = || IndexPart { index: index.part(), touched: Touched::default(), log_bytes: 0 };
    let (verified, parts) = match &view {
        // A mapped log may be scanned on two threads, by parts (see
        // `log::parallel`), joined in log order: the same index as one
        // thread makes.
        Some(view) => log::parallel::scan_parts(
            ring,
            view.bytes(),
            status.head,
            u64::MAX,
            status.epoch,
            log::parallel::Plan::for_machine(opts.parallel_scan),
            &new_part,
            &IndexPart::record,
            &mut |pos| verifying.at(pos),
        )?,
        None => {
            let mut part = new_part();
            let end = log::scan_records(ring, status.head, u64::MAX, status.epoch, |lsn, rec, info, ranges, tx| {
                part.record_with(lsn, Some(rec), info, ranges, tx);
                verifying.at(lsn);
                Ok(())
            })?;
            (end, vec![part])
        }
    };
    let last = parts.len().saturating_sub(1);
    for (i, mut part) in parts.into_iter().enumerate() {
        if i == last {
            part.index.cut_unfinished();
        }
        index.append(part.index);
        touched.merge(part.touched);
        log_bytes += part.log_bytes;
    }
    let dictionary = status.segments.clone();
    let open_segment = |id: u32| open_recorded(vfs, ring, opts, &dictionary, id);
    let area = view.as_ref().map(|v| v.bytes());
    let (devices, salvage) = check(vfs, ring, sb, &status, opts, area, &verified, &touched.touched, &open_segment)?;
    if index.overflow {
        // More pieces than the index can number: recover the usual way.
        drop((index, devices));
        let opts = Options { instant_recovery: false, ..opts.clone() };
        return recover(vfs, ring, sb, status, &opts);
    }
    verifying.end(verified.end);
    let (shared, devices) = index
        .finish(view.map(|v| (v, ring.area_len)), |id| {
            let (dev, path) = devices.get(&id)?.clone();
            let len = dev.len().ok()?;
            // The name `open_segment` will look it up by.
            let path = vfs.canonical_name(&path).unwrap_or(path);
            Some((dev, path, len))
        })
        .ok_or_else(|| {
            Error::corrupted("log (a segment changed between the scan and the checks)", ring.path.display().to_string())
        })?;
    let report = RecoveryReport {
        transactions: verified.transactions,
        log_bytes,
        discarded_bytes: verified.discarded,
        segment_bytes_written: 0,
        stopped_at: match verified.stop {
            ScanStop::Limit => None,
            ScanStop::Defect { lsn, defect } => Some((lsn, defect.describe())),
        },
        salvage,
        deferred_pages: shared.pages(),
    };
    let deferred = Deferred { shared, devices, end: verified.end, transactions: verified.transactions };
    Ok((status, report, Some(deferred)))
}

/// Opens the segment a log record names by `id`, at the path its
/// dictionary entry records (or where `Options::accept_segment` says it
/// is now).
fn open_recorded(
    vfs: &dyn Vfs,
    ring: &Ring,
    opts: &Options,
    dictionary: &[format::SegmentEntry],
    id: u32,
) -> Result<(Arc<dyn Storage>, PathBuf)> {
    let entry = dictionary.iter().find(|e| e.id == id).ok_or_else(|| {
        Error::corrupted(format!("log record (segment id {id} not in the dictionary)"), ring.path.display().to_string())
    })?;
    let (path, _) = opts.segment_location(&entry.name);
    let dev = vfs
        .open(&path, OpenMode::Existing)
        .map_err(|e| LogError::MissingSegment { path: path.clone(), reason: e.to_string() })?;
    Ok((dev, path))
}

#[cfg(test)]
mod tests {
    use crate::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};

    /// An instant open whose index overflows (more pieces than it can
    /// name, or than the memory cap allows) recovers the usual way: the
    /// same data, nothing deferred.
    #[test]
    fn an_index_that_overflows_falls_back_to_full_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
        create_log(&log, 1 << 20).unwrap();
        let len = 8 * crate::mem::page_size();
        let mut model = vec![0u8; len];
        {
            let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
            let s = rvm.create_segment(&seg, len as u64).unwrap();
            let region = rvm.map(&s, MapSpec::new(0, len)).unwrap();
            for i in 0..50usize {
                let at = i * 997 % (len - 16);
                let bytes = [i as u8; 16];
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                // SAFETY: the region is this test's alone; 16 bytes inside it.
                unsafe { tx.modify_bytes(region.addr() + at, &bytes).unwrap() };
                tx.commit(CommitMode::Flush).unwrap();
                model[at..at + 16].copy_from_slice(&bytes);
            }
        }
        crate::lazy::OVERFLOW_NEXT.with(|c| c.set(true));
        let rvm = Rvm::open(&log, Options { instant_recovery: true, ..Options::default() }).unwrap();
        let report = rvm.recovery_report();
        assert_eq!(report.transactions, 50);
        assert_eq!(report.deferred_pages, 0, "recovered the usual way");
        assert!(report.segment_bytes_written > 0);
        assert!(!rvm.query().recovering);
        let s = rvm.open_segment(&seg).unwrap();
        let region = rvm.map(&s, MapSpec::new(0, len)).unwrap();
        let mut got = vec![0u8; len];
        // SAFETY: no transaction runs in the region.
        unsafe { region.read(0, &mut got) }.unwrap();
        assert!(got == model);
    }
}
