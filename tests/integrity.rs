//! Integrity features of log format 2, one behaviour per test:
//!
//! - damage in the middle of a log (a flipped bit, a zeroed sector, a
//!   frame header's epoch or position field) is refused as `Corrupted`
//!   naming the position, with nothing written; `Options::salvage` keeps a
//!   copy, applies the prefix and reports exactly what it dropped; damage
//!   to the last synced transaction alone is undetectable (documented);
//! - the two status slots: one damaged slot loses nothing, both damaged is
//!   `Corrupted`, a crash between the two slot writes loses nothing;
//! - segment handles of another instance (`ForeignSegment`);
//! - segment identity (`SegmentReplaced`, `Options::accept_segment`);
//! - a log unlinked or renamed over while open (`LogUnlinked`, poisoned);
//! - owner marks across logs (`SegmentInOtherLog`, stale marks);
//! - a segment truncated behind the log's back (`SegmentTooShort`);
//! - region claims of loaded segments (`MapError::Claimed`).
//!
//! Most tests run on the simulated disk; those that need real files
//! (unlink, extended attributes, truncation by another party, the loader)
//! use a temporary directory.

use rvm::log::format::{Status, AREA_OFFSET, STATUS_FIXED};
use rvm::log::inspect::{self, FrameBody, FrameReport};
use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const LOG: &str = "log";
const SEG: &str = "seg";
const LOG_SIZE: u64 = 256 << 10;
/// Flush commits made by the mid-log fixture.
const TXS: usize = 6;

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

fn ps() -> usize {
    page_size()
}

/// Commits `bytes` at `off` of `r` in one transaction.
fn commit(rvm: &Rvm, r: &Region, off: usize, bytes: &[u8], mode: CommitMode) -> Result<()> {
    let mut t = rvm.begin(RestoreMode::NoRestore)?;
    // SAFETY: each test owns its regions; one thread writes them.
    unsafe { t.modify_bytes(r.addr() + off, bytes)? };
    t.commit(mode)
}

fn read(r: &Region, off: usize, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(off, &mut b) }.unwrap();
    b
}

/// Every file of the disk with its durable and live images: equal before
/// and after an operation means it wrote (and created) nothing.
fn snapshot(disk: &SimDisk) -> Vec<(PathBuf, Vec<u8>, Vec<u8>)> {
    disk.file_names()
        .into_iter()
        .map(|p| {
            let d = disk.durable_image(&p).unwrap();
            let l = disk.live_image(&p).unwrap();
            (p, d, l)
        })
        .collect()
}

#[track_caller]
fn assert_unchanged(disk: &SimDisk, before: &[(PathBuf, Vec<u8>, Vec<u8>)], what: &str) {
    let after = snapshot(disk);
    let names = |s: &[(PathBuf, Vec<u8>, Vec<u8>)]| s.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(before), names(&after), "{what}: files were created or removed");
    for (b, a) in before.iter().zip(&after) {
        assert!(b.1 == a.1, "{what}: the durable image of {} changed", b.0.display());
        assert!(b.2 == a.2, "{what}: the live image of {} changed", b.0.display());
    }
}

fn corrupted(r: Result<Rvm>) -> (String, String) {
    match r {
        Err(Error::Corrupted { what, location }) => (what, location),
        Err(e) => panic!("expected Corrupted, got {e:?}"),
        Ok(_) => panic!("expected Corrupted, the open succeeded"),
    }
}

// ---------------------------------------------------------------------------
// 1. Mid-log damage

/// One transaction of the fixture's log: its frames.
#[derive(Clone, Debug)]
struct TxFrames {
    /// Position of its first frame.
    start: u64,
    /// Position after its commit frame.
    end: u64,
    /// Its range frames' positions.
    ranges: Vec<u64>,
    /// Its commit frame's position.
    commit: u64,
}

/// A log holding `TXS` flush commits (no truncation), after a crash.
struct Mid {
    disk: SimDisk,
    vfs: Arc<dyn Vfs>,
    /// Durable log image.
    log: Vec<u8>,
    /// Segment contents after each prefix of the commits.
    states: Vec<Vec<u8>>,
    txs: Vec<TxFrames>,
    /// The epoch of the log's status (the salvage copy is named by it).
    epoch: u64,
}

impl Mid {
    fn build() -> Mid {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        create_log_with(vfs.as_ref(), Path::new(LOG), LOG_SIZE).unwrap();
        let mut states = vec![vec![0u8; ps()]];
        {
            let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts()).unwrap();
            let s = rvm.create_segment(SEG, ps() as u64).unwrap();
            let r = rvm.map(&s, MapSpec::new(0, ps())).unwrap();
            for i in 0..TXS {
                // 300 bytes each: a transaction takes 416 bytes of log, so
                // the records span several 512-byte sectors.
                let data: Vec<u8> = (0..300).map(|j| (i * 37 + j + 1) as u8).collect();
                commit(&rvm, &r, i * 512, &data, CommitMode::Flush).unwrap();
                let mut st = states.last().unwrap().clone();
                st[i * 512..i * 512 + 300].copy_from_slice(&data);
                states.push(st);
            }
            let q = rvm.query();
            assert_eq!(q.durable, q.tail);
            disk.crash(CrashMode::LoseUnsynced);
        }
        let log = disk.durable_image(LOG).unwrap();
        assert_eq!(disk.durable_image(SEG).unwrap(), states[0], "nothing reaches the segment before truncation");
        let report = inspect::inspect(&disk, Path::new(LOG)).unwrap();
        let epoch = report.slots[report.chosen_slot.unwrap() as usize].valid_status().unwrap().epoch;
        let txs = group(&report.frames);
        assert_eq!(txs.len(), TXS);
        assert!(txs.iter().all(|t| t.ranges.len() == 1));
        Mid { disk, vfs, log, states, txs, epoch }
    }

    /// Device offset of log position `lsn` (the records do not wrap).
    fn off(lsn: u64) -> usize {
        (AREA_OFFSET + lsn) as usize
    }

    /// Puts `img` as the log's durable image, the segment back to its
    /// state before any commit, and removes any other file.
    fn reset(&self, img: &[u8]) {
        for f in self.disk.file_names() {
            if f != Path::new(LOG) && f != Path::new(SEG) {
                self.disk.remove(&f);
            }
        }
        self.disk.set_durable_image(LOG, img.to_vec());
        self.disk.set_durable_image(SEG, self.states[0].clone());
    }

    fn open(&self, opts: Options) -> Result<Rvm> {
        Rvm::open_with(self.vfs.clone(), Path::new(LOG), opts)
    }

    fn seg(&self) -> Vec<u8> {
        self.disk.durable_image(SEG).unwrap()
    }

    /// Refused with nothing written, naming `lsn`; then the undamaged log
    /// recovers every transaction.
    #[track_caller]
    fn refused_at(&self, damaged: &[u8], lsn: u64) {
        self.reset(damaged);
        let before = snapshot(&self.disk);
        let (what, location) = corrupted(self.open(opts()));
        assert!(
            location.contains(&format!("position {lsn} "))
                && location.contains(&format!("byte offset {}", Mid::off(lsn))),
            "location {location:?} does not name position {lsn}"
        );
        assert!(what.contains("salvage"), "{what}");
        assert_unchanged(&self.disk, &before, "refused open");
        // Repairing the bytes: everything comes back.
        self.reset(&self.log);
        let rvm = self.open(opts()).unwrap();
        let rep = rvm.recovery_report();
        assert_eq!((rep.transactions, rep.salvage), (TXS as u64, None));
        drop(rvm);
        assert_eq!(self.seg(), self.states[TXS]);
    }
}

/// Groups frames into transactions.
fn group(frames: &[FrameReport]) -> Vec<TxFrames> {
    let mut txs = Vec::new();
    let mut ranges = Vec::new();
    let mut start = None;
    for f in frames {
        start.get_or_insert(f.lsn);
        match f.body {
            FrameBody::Commit { .. } => {
                txs.push(TxFrames {
                    start: start.take().unwrap(),
                    end: f.lsn + u64::from(f.len),
                    ranges: std::mem::take(&mut ranges),
                    commit: f.lsn,
                });
            }
            _ => ranges.push(f.lsn),
        }
    }
    txs
}

#[test]
fn mid_log_bit_flip_is_refused_and_repair_recovers_everything() {
    let fx = Mid::build();
    let bad = fx.txs[1].ranges[0];
    let mut img = fx.log.clone();
    // A data byte of the second transaction's range frame.
    img[Mid::off(bad) + 48 + 10] ^= 0x04;
    fx.refused_at(&img, bad);
}

#[test]
fn mid_log_zeroed_sector_is_refused() {
    let fx = Mid::build();
    let end = fx.txs.last().unwrap().end;
    // The 512-byte sector (of the device) holding the middle of the records.
    let mid = Mid::off(end / 2);
    let sector = mid / 512 * 512;
    assert!(sector > AREA_OFFSET as usize && sector + 512 < Mid::off(fx.txs[TXS - 1].start));
    let mut img = fx.log.clone();
    img[sector..sector + 512].fill(0);
    // The scan stops at the first frame reaching into the sector.
    let lsn_of = |o: usize| o as u64 - AREA_OFFSET;
    let frames: Vec<(u64, u64)> = fx
        .txs
        .iter()
        .flat_map(|t| {
            let mut v: Vec<(u64, u64)> = t.ranges.iter().map(|&r| (r, r)).collect();
            v.push((t.commit, t.end));
            v
        })
        .collect();
    // (frame start, frame end): ends are the next frame's start.
    let mut bounds = Vec::new();
    for (i, &(s, _)) in frames.iter().enumerate() {
        let e = frames.get(i + 1).map_or(end, |f| f.0);
        bounds.push((s, e));
    }
    let bad = bounds.iter().find(|&&(_, e)| e > lsn_of(sector)).unwrap().0;
    fx.refused_at(&img, bad);
}

#[test]
fn mid_log_frame_header_epoch_and_position_damage_is_refused() {
    let fx = Mid::build();
    // The tag byte [7] of the third transaction's record: its low nibble
    // is the epoch's (mod 16), its high nibble the ring lap's.
    let bad = fx.txs[2].commit;
    let mut img = fx.log.clone();
    let at = Mid::off(bad) + 7;
    let tag = img[at];
    assert_eq!(u64::from(tag & 15), fx.epoch % 16, "the record carries the status's epoch");
    img[at] = (tag & 0xf0) | (tag.wrapping_sub(1) & 15);
    fx.refused_at(&img, bad);

    // The lap nibble of the second transaction's record.
    let bad = fx.txs[1].ranges[0];
    let mut img = fx.log.clone();
    img[Mid::off(bad) + 7] ^= 0x10;
    fx.refused_at(&img, bad);
}

#[test]
fn mid_log_damage_salvage_keeps_the_prefix_and_a_copy() {
    let fx = Mid::build();
    let bad = fx.txs[1].ranges[0];
    let mut img = fx.log.clone();
    img[Mid::off(bad) + 48 + 10] ^= 0x04;
    fx.reset(&img);

    let rvm = fx.open(Options { salvage: true, ..opts() }).unwrap();
    let rep = rvm.recovery_report();
    let copy = PathBuf::from(format!("{LOG}.damaged-{}", fx.epoch));
    assert_eq!(rep.transactions, 1, "only the transaction before the damage is applied");
    let s = rep.salvage.clone().expect("the report tells of the salvage");
    assert_eq!(s.damaged_at, bad);
    assert_eq!(s.defect, "checksum mismatch");
    assert_eq!(s.copy, copy);
    // Everything from the damaged transaction to the end of the records.
    assert_eq!(s.dropped_bytes, fx.txs[TXS - 1].end - fx.txs[1].start);
    // The last commit frame was made when the log was durable up to the
    // start of its transaction.
    assert_eq!(s.synced_to, fx.txs[TXS - 1].start);
    drop(rvm);
    assert_eq!(fx.seg(), fx.states[1], "the segment holds the prefix only");
    assert_eq!(fx.disk.durable_image(&copy).as_deref(), Some(&img[..]), "the copy is the damaged log");

    // Reopening works and finds nothing more to do; new commits survive.
    let rvm = fx.open(opts()).unwrap();
    let rep = rvm.recovery_report();
    assert_eq!((rep.transactions, rep.salvage), (0, None));
    let seg = rvm.open_segment(SEG).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, ps())).unwrap();
    assert_eq!(read(&r, 0, ps()), fx.states[1]);
    commit(&rvm, &r, 4000, b"after salvage", CommitMode::Flush).unwrap();
    fx.disk.crash(CrashMode::LoseUnsynced);
    drop((r, seg, rvm));
    let rvm = fx.open(opts()).unwrap();
    assert_eq!(rvm.recovery_report().transactions, 1);
    drop(rvm);
    assert_eq!(&fx.seg()[4000..4013], b"after salvage");
    assert_eq!(fx.disk.durable_image(&copy).as_deref(), Some(&img[..]), "the copy stays");

    // Transactions 2..TXS are complete after the damaged one (transaction 1,
    // whose range frame is bad and whose commit frame alone survives).
    assert_eq!(
        s.dropped_transactions,
        (TXS - 2) as u64,
        "dropped_transactions must not count the damaged transaction's own commit frame \
         (documented: 'besides the one the damaged frame belonged to'); report: {s:?}"
    );
}

#[test]
fn damage_before_the_status_synced_end_is_refused_without_later_frames() {
    // A status written after the commits (here: a new segment's dictionary
    // entry) records how far the log was durable, so damage to the last
    // transaction is detected although no frame follows it.
    let fx = Mid::build();
    let rvm = fx.open(opts()).unwrap();
    let s = rvm.open_segment(SEG).unwrap();
    let r = rvm.map(&s, MapSpec::new(0, ps())).unwrap();
    let mut txs = Vec::new();
    for i in 0..3 {
        let start = rvm.query().tail;
        commit(&rvm, &r, 3000 + i * 8, &[i as u8 + 1; 8], CommitMode::Flush).unwrap();
        txs.push(start);
    }
    rvm.create_segment("other", ps() as u64).unwrap();
    fx.disk.crash(CrashMode::LoseUnsynced);
    drop((r, s, rvm));
    let img = fx.disk.durable_image(LOG).unwrap();
    let st = slot_status(&img, 0).unwrap();
    assert_eq!(st, slot_status(&img, 1).unwrap());
    assert!(st.synced_end > txs[2], "the status records the synced end {} > {}", st.synced_end, txs[2]);
    let mut bad = img.clone();
    let off = (AREA_OFFSET + txs[2] % (LOG_SIZE - AREA_OFFSET)) as usize;
    bad[off + 9] ^= 0xff;
    fx.disk.set_durable_image(LOG, bad);
    let before = snapshot(&fx.disk);
    let (_, location) = corrupted(fx.open(opts()));
    assert!(location.contains(&format!("position {} ", txs[2])), "{location}");
    assert_unchanged(&fx.disk, &before, "refused open");
    let rvm = fx.open(Options { salvage: true, ..opts() }).unwrap();
    let s = rvm.recovery_report().salvage.unwrap();
    assert_eq!((s.damaged_at, s.synced_to), (txs[2], st.synced_end));
    assert_eq!(rvm.recovery_report().transactions, 2);
    drop(rvm);
    let seg = fx.seg();
    assert_eq!(&seg[3000..3016], &[[1u8; 8], [2u8; 8]].concat()[..]);
    assert_eq!(&seg[3016..3024], &[0u8; 8]);
    // Nothing complete follows the damaged (last) transaction.
    assert_eq!(s.dropped_transactions, 0, "the damaged transaction's own commit frame was counted: {s:?}");
}

#[test]
fn salvage_twice_keeps_both_copies() {
    let fx = Mid::build();
    let bad = fx.txs[3].ranges[0];
    let mut img = fx.log.clone();
    img[Mid::off(bad) + 48] ^= 0x80;
    fx.reset(&img);
    drop(fx.open(Options { salvage: true, ..opts() }).unwrap());
    // The same damaged image again (restored from a backup): the first copy
    // is kept, the second gets another name.
    fx.disk.set_durable_image(LOG, img.clone());
    fx.disk.set_durable_image(SEG, fx.states[0].clone());
    let rvm = fx.open(Options { salvage: true, ..opts() }).unwrap();
    let s = rvm.recovery_report().salvage.unwrap();
    let first = PathBuf::from(format!("{LOG}.damaged-{}", fx.epoch));
    assert_eq!(s.copy, PathBuf::from(format!("{}.1", first.display())));
    assert_eq!(fx.disk.durable_image(&first).as_deref(), Some(&img[..]));
    assert_eq!(fx.disk.durable_image(&s.copy).as_deref(), Some(&img[..]));
    drop(rvm);
    assert_eq!(fx.seg(), fx.states[3]);
}

#[test]
fn damage_to_the_last_synced_transaction_alone_is_undetectable() {
    // Documented limit: nothing after the last transaction says it was
    // synced (the status's synced end is older), so its damage looks like
    // a torn write and recovery keeps the prefix without complaint.
    let fx = Mid::build();
    let last = &fx.txs[TXS - 1];
    let mut img = fx.log.clone();
    img[Mid::off(last.ranges[0]) + 48 + 3] ^= 0x01;
    fx.reset(&img);
    let rvm = fx.open(opts()).unwrap();
    let rep = rvm.recovery_report();
    assert_eq!(rep.transactions, (TXS - 1) as u64);
    assert_eq!(rep.salvage, None);
    assert_eq!(rep.stopped_at.map(|s| s.0), Some(last.start));
    assert_eq!(rep.discarded_bytes, 0);
    drop(rvm);
    assert_eq!(fx.seg(), fx.states[TXS - 1]);
    assert_eq!(fx.disk.file_names().len(), 2, "no copy is made");
}

// ---------------------------------------------------------------------------
// 2. Status slots

/// The byte range of slot `i` that its status uses.
fn slot_bytes(img: &[u8], i: u64) -> std::ops::Range<usize> {
    let at = Status::slot_offset(i) as usize;
    let st = Status::decode(&img[at..at + 65536]).expect("valid slot");
    at..at + STATUS_FIXED + Status::dict_len(&st.segments)
}

fn slot_status(img: &[u8], i: u64) -> Option<Status> {
    let at = Status::slot_offset(i) as usize;
    Status::decode(&img[at..at + 65536])
}

#[test]
fn both_slots_hold_the_status_and_one_damaged_slot_loses_nothing() {
    let fx = Mid::build();
    let (s0, s1) = (slot_status(&fx.log, 0).unwrap(), slot_status(&fx.log, 1).unwrap());
    assert_eq!(s0, s1, "a status write leaves both slots holding it");

    // One byte of slot 0 (its seq), then slot 1 zeroed entirely.
    let mut a = fx.log.clone();
    a[slot_bytes(&fx.log, 0).start + 8] ^= 0x01;
    let mut b = fx.log.clone();
    let r1 = Status::slot_offset(1) as usize;
    b[r1..r1 + 65536].fill(0);
    // A byte of slot 1's dictionary.
    let mut c = fx.log.clone();
    c[slot_bytes(&fx.log, 1).end - 1] ^= 0x20;
    for img in [a, b, c] {
        fx.reset(&img);
        let rvm = fx.open(opts()).unwrap();
        assert_eq!(rvm.recovery_report().transactions, TXS as u64);
        drop(rvm);
        assert_eq!(fx.seg(), fx.states[TXS]);
    }
}

#[test]
fn both_slots_damaged_is_corrupted_and_writes_nothing() {
    let fx = Mid::build();
    let mut img = fx.log.clone();
    img[slot_bytes(&fx.log, 0).start + 20] ^= 0x10;
    let r1 = Status::slot_offset(1) as usize;
    img[r1..r1 + 512].fill(0);
    fx.reset(&img);
    let before = snapshot(&fx.disk);
    let (what, _) = corrupted(fx.open(opts()));
    assert!(what.contains("status"), "{what}");
    assert_unchanged(&fx.disk, &before, "refused open");
}

#[test]
fn crash_between_the_two_slot_writes_loses_nothing() {
    let fx = Mid::build();
    let old = slot_status(&fx.log, 0).unwrap();
    // Operations a successful recovery issues.
    fx.reset(&fx.log);
    let n0 = fx.disk.op_count();
    drop(fx.open(opts()).unwrap());
    let ops = fx.disk.op_count() - n0;
    let mut split = 0;
    for n in 0..ops + 2 {
        fx.reset(&fx.log);
        fx.disk.fail_after(n);
        drop(fx.open(opts()));
        fx.disk.crash(CrashMode::LoseUnsynced);
        fx.disk.clear_faults();
        let img = fx.disk.durable_image(LOG).unwrap();
        let (a, b) = (slot_status(&img, 0), slot_status(&img, 1));
        assert!(a.is_some() && b.is_some(), "after a failure at op {n} a slot is invalid");
        let mut variants = vec![img.clone()];
        if a != b {
            split += 1;
            // Slot 0 was written first: it holds the new status, slot 1
            // the one before (recovery writes two: the synced position
            // before it replays, then the emptied log).
            let (sa, sb) = (a.as_ref().unwrap().seq, b.as_ref().unwrap().seq);
            assert!(sb == old.seq || sb == old.seq + 1, "op {n}: {b:?}");
            assert_eq!(sa, sb + 1, "op {n}");
            // Losing the newer slot too must lose nothing.
            let mut v = img.clone();
            v[slot_bytes(&img, 0)].fill(0);
            variants.push(v);
        }
        let seg = fx.seg();
        for v in variants {
            fx.disk.set_durable_image(LOG, v);
            fx.disk.set_durable_image(SEG, seg.clone());
            let rvm = fx.open(opts()).unwrap_or_else(|e| panic!("after a failure at op {n}: {e}"));
            drop(rvm);
            assert_eq!(fx.seg(), fx.states[TXS], "after a failure at op {n}");
        }
    }
    assert!(split >= 1, "no failure point fell between the two slot writes ({ops} ops)");
}

// ---------------------------------------------------------------------------
// 3. Foreign segment handles

#[test]
fn segment_handles_of_another_instance_are_refused() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new("log_a"), LOG_SIZE).unwrap();
    create_log_with(vfs.as_ref(), Path::new("log_b"), LOG_SIZE).unwrap();
    let a = Rvm::open_with(vfs.clone(), Path::new("log_a"), opts()).unwrap();
    let b = Rvm::open_with(vfs.clone(), Path::new("log_b"), opts()).unwrap();
    let seg = a.create_segment(SEG, ps() as u64).unwrap();
    match b.map(&seg, MapSpec::new(0, ps())) {
        Err(Error::Map(MapError::ForeignSegment { segment })) => assert_eq!(segment, Path::new(SEG)),
        other => panic!("expected ForeignSegment, got {other:?}"),
    }
    match b.close_segment(seg.clone()) {
        Err(Error::Map(MapError::ForeignSegment { segment })) => assert_eq!(segment, Path::new(SEG)),
        other => panic!("expected ForeignSegment, got {other:?}"),
    }
    assert!(b.regions().is_empty());
    // The owner is not disturbed.
    let r = a.map(&seg, MapSpec::new(0, ps())).unwrap();
    commit(&a, &r, 0, b"mine", CommitMode::Flush).unwrap();
    assert_eq!(read(&r, 0, 4), b"mine");
    a.unmap(r).unwrap();
    a.close_segment(seg).unwrap();
}

// ---------------------------------------------------------------------------
// 4. Segment identity

/// Two segments `a` and `b` with records in the log, after a crash.
fn two_segments() -> (SimDisk, Arc<dyn Vfs>) {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new(LOG), LOG_SIZE).unwrap();
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts()).unwrap();
    for name in ["a", "b"] {
        let s = rvm.create_segment(name, ps() as u64).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, ps())).unwrap();
        commit(&rvm, &r, 8, format!("in {name}").as_bytes(), CommitMode::Flush).unwrap();
    }
    disk.crash(CrashMode::LoseUnsynced);
    drop(rvm);
    (disk, vfs)
}

fn replaced(r: Result<Rvm>) -> PathBuf {
    match r {
        Err(Error::Log(LogError::SegmentReplaced { path, recorded, found })) => {
            assert_ne!(recorded, found);
            path
        }
        Err(e) => panic!("expected SegmentReplaced, got {e:?}"),
        Ok(_) => panic!("expected SegmentReplaced, the open succeeded"),
    }
}

#[test]
fn swapped_or_replaced_segments_are_refused_and_accept_segment_takes_them() {
    let (disk, vfs) = two_segments();
    let open = |o: Options| Rvm::open_with(vfs.clone(), Path::new(LOG), o);

    // Swap the two files.
    assert!(disk.rename("a", "tmp") && disk.rename("b", "a") && disk.rename("tmp", "b"));
    let before = snapshot(&disk);
    let path = replaced(open(opts()));
    assert!(path == Path::new("a") || path == Path::new("b"), "{}", path.display());
    assert_unchanged(&disk, &before, "refused open (swapped)");
    assert!(disk.rename("a", "tmp") && disk.rename("b", "a") && disk.rename("tmp", "b"));

    // Replace `a` by a fresh file with the same bytes (a restored copy).
    let bytes = disk.durable_image("a").unwrap();
    assert!(disk.remove("a"));
    disk.set_durable_image("a", bytes);
    let before = snapshot(&disk);
    assert_eq!(replaced(open(opts())), Path::new("a"));
    assert_unchanged(&disk, &before, "refused open (replaced)");

    // Accepted on purpose: the records are applied to it.
    let rvm = open(opts().accept_segment("a", "a")).unwrap();
    assert_eq!(rvm.recovery_report().transactions, 2);
    drop(rvm);
    assert_eq!(&disk.durable_image("a").unwrap()[8..12], b"in a");
    assert_eq!(&disk.durable_image("b").unwrap()[8..12], b"in b");

    // The next cycle records the new file and needs no acceptance.
    let rvm = open(opts()).unwrap();
    let s = rvm.open_segment("a").unwrap();
    let r = rvm.map(&s, MapSpec::new(0, ps())).unwrap();
    commit(&rvm, &r, 100, b"next", CommitMode::Flush).unwrap();
    disk.crash(CrashMode::LoseUnsynced);
    drop((r, s, rvm));
    let rvm = open(opts()).unwrap();
    assert_eq!(rvm.recovery_report().transactions, 1);
    drop(rvm);
    assert_eq!(&disk.durable_image("a").unwrap()[100..104], b"next");
}

#[test]
fn moved_segment_is_accepted_at_its_new_path() {
    let (disk, vfs) = two_segments();
    assert!(disk.rename("a", "moved"));
    let open = |o: Options| Rvm::open_with(vfs.clone(), Path::new(LOG), o);
    let before = snapshot(&disk);
    match open(opts()) {
        Err(Error::Log(LogError::MissingSegment { path, .. })) => assert_eq!(path, Path::new("a")),
        Err(e) => panic!("expected MissingSegment, got {e:?}"),
        Ok(_) => panic!("expected MissingSegment"),
    }
    assert_unchanged(&disk, &before, "refused open (moved)");
    let rvm = open(opts().accept_segment("a", "moved")).unwrap();
    assert_eq!(rvm.recovery_report().transactions, 2);
    drop(rvm);
    assert_eq!(&disk.durable_image("moved").unwrap()[8..12], b"in a");
    assert_eq!(&disk.durable_image("b").unwrap()[8..12], b"in b");
    assert!(disk.durable_image("a").is_none(), "nothing is created at the recorded name");
}

// ---------------------------------------------------------------------------
// Real files

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn log(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        create_log(&p, 1 << 20).unwrap();
        p
    }
}

// 5. Log unlinked while open

fn unlinked_then_poisoned(replace: impl FnOnce(&Path)) {
    let d = Dir::new();
    let log = d.log("log");
    let rvm = Rvm::open(&log, opts()).unwrap();
    let s = rvm.create_segment(d.path("seg"), ps() as u64).unwrap();
    let r = rvm.map(&s, MapSpec::new(0, ps())).unwrap();
    commit(&rvm, &r, 0, b"before", CommitMode::Flush).unwrap();
    replace(&log);
    match commit(&rvm, &r, 0, b"after", CommitMode::Flush) {
        Err(Error::Log(LogError::LogUnlinked { path })) => {
            assert_eq!(path.file_name(), log.file_name(), "{}", path.display())
        }
        other => panic!("expected LogUnlinked, got {other:?}"),
    }
    // The instance is stopped: later commits fail too.
    let later = commit(&rvm, &r, 8, b"later", CommitMode::Flush);
    assert!(matches!(later, Err(Error::Poisoned { .. })), "{later:?}");
    let later = commit(&rvm, &r, 8, b"later", CommitMode::NoFlush).and_then(|()| rvm.flush());
    assert!(later.is_err(), "a no-flush commit and flush succeeded on an unlinked log");
}

#[test]
fn log_unlinked_while_open_fails_the_flush_and_poisons() {
    unlinked_then_poisoned(|log| std::fs::remove_file(log).unwrap());
}

#[test]
fn log_renamed_over_while_open_fails_the_flush_and_poisons() {
    unlinked_then_poisoned(|log| {
        let other = log.with_file_name("other");
        std::fs::write(&other, b"not a log").unwrap();
        std::fs::rename(&other, log).unwrap();
    });
}

// 6. Owner marks across logs

/// Whether the temporary directory's file system takes user xattrs.
fn xattrs_supported(d: &Dir) -> bool {
    let p = d.path("xattr-probe");
    let f = std::fs::File::create(&p).unwrap();
    let ok = rustix::fs::fsetxattr(&f, "user.rvm.probe", b"1", rustix::fs::XattrFlags::empty()).is_ok();
    drop(f);
    std::fs::remove_file(&p).unwrap();
    if !ok {
        eprintln!("skipped: the temporary directory does not support user extended attributes");
    }
    ok
}

/// The owner mark of a segment file: the log path it names.
fn mark_log(seg: &Path) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let f = std::fs::File::open(seg).unwrap();
    let mut buf = vec![0u8; 8192];
    let n = rustix::fs::fgetxattr(&f, "user.rvm.log", &mut buf[..]).ok()?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&buf[16..n])))
}

fn in_other_log(r: Result<Segment>, other: &Path) {
    match r {
        Err(Error::Log(LogError::SegmentInOtherLog { other_log, .. })) => {
            assert_eq!(other_log, other.canonicalize().unwrap());
        }
        other => panic!("expected SegmentInOtherLog, got {other:?}"),
    }
}

/// Log A commits to `seg` (no-flush, then flush) and is dropped with the
/// records still in it.
fn records_in_a(d: &Dir) -> (PathBuf, PathBuf, PathBuf) {
    let (a, b, seg) = (d.log("a.log"), d.log("b.log"), d.path("seg"));
    let rvm = Rvm::open(&a, opts()).unwrap();
    let s = rvm.create_segment(&seg, ps() as u64).unwrap();
    let r = rvm.map(&s, MapSpec::new(0, ps())).unwrap();
    commit(&rvm, &r, 0, b"from A", CommitMode::NoFlush).unwrap();
    rvm.flush().unwrap();
    drop((r, s, rvm));
    assert_eq!(&std::fs::read(&seg).unwrap()[..6], &[0; 6], "the records are still in A");
    assert_eq!(mark_log(&seg), Some(a.canonicalize().unwrap()));
    (a, b, seg)
}

/// The mark names the log by its canonical path, however the program
/// named it, so a process with another working directory finds it.
#[test]
fn owner_marks_name_the_log_by_its_canonical_path() {
    let d = Dir::new();
    if !xattrs_supported(&d) {
        return;
    }
    let a = d.log("a.log");
    std::fs::create_dir(d.path("sub")).unwrap();
    let roundabout = d.path("sub").join("..").join(".").join("a.log");
    let rvm = Rvm::open(&roundabout, opts()).unwrap();
    let seg = d.path("seg");
    let s = rvm.create_segment(&seg, ps() as u64).unwrap();
    assert_eq!(mark_log(&seg), Some(a.canonicalize().unwrap()));
    drop((s, rvm));
    // Reopened by its plain name, the log finds its own mark.
    let rvm = Rvm::open(&a, opts()).unwrap();
    let s = rvm.open_segment(&seg).unwrap();
    assert_eq!(mark_log(&seg), Some(a.canonicalize().unwrap()));
    drop((s, rvm));
}

#[test]
fn segment_with_records_in_another_log_is_refused_until_closed_there() {
    let d = Dir::new();
    if !xattrs_supported(&d) {
        return;
    }
    let (a, b, seg) = records_in_a(&d);
    let seg_bytes = std::fs::read(&seg).unwrap();
    let a_bytes = std::fs::read(&a).unwrap();

    let rvm_b = Rvm::open(&b, opts()).unwrap();
    in_other_log(rvm_b.open_segment(&seg), &a);
    assert_eq!(std::fs::read(&seg).unwrap(), seg_bytes, "the refused open changed the segment");
    assert_eq!(std::fs::read(&a).unwrap(), a_bytes, "the refused open changed log A");
    assert_eq!(mark_log(&seg), Some(a.canonicalize().unwrap()));

    // A reopened (its recovery applies the records) and still open: B is
    // refused while A holds its mark.
    let rvm_a = Rvm::open(&a, opts()).unwrap();
    assert_eq!(rvm_a.recovery_report().transactions, 1);
    in_other_log(rvm_b.open_segment(&seg), &a);
    // A closes it: the mark goes, and B can use it and sees A's commit.
    let s = rvm_a.open_segment(&seg).unwrap();
    rvm_a.close_segment(s).unwrap();
    assert_eq!(mark_log(&seg), None);
    let s = rvm_b.open_segment(&seg).unwrap();
    assert_eq!(mark_log(&seg), Some(b.canonicalize().unwrap()));
    let r = rvm_b.map(&s, MapSpec::new(0, ps())).unwrap();
    assert_eq!(read(&r, 0, 6), b"from A");
    // B's turn to leave records; A, reopened, is not held up by them (it
    // holds none for the segment), but cannot take the segment.
    commit(&rvm_b, &r, 100, b"from B", CommitMode::Flush).unwrap();
    drop((r, s, rvm_b));
    drop(rvm_a);
    let rvm_a = Rvm::open(&a, opts()).unwrap();
    in_other_log(rvm_a.open_segment(&seg), &b);
    drop(rvm_a);
    let rvm_b = Rvm::open(&b, opts()).unwrap();
    assert_eq!(rvm_b.recovery_report().transactions, 1);
    drop(rvm_b);
    assert_eq!(&std::fs::read(&seg).unwrap()[100..106], b"from B");
}

#[test]
fn stale_owner_marks_are_taken_over() {
    let d = Dir::new();
    if !xattrs_supported(&d) {
        return;
    }
    // A's records were applied by its recovery: its mark is stale.
    let (a, b, seg) = records_in_a(&d);
    drop(Rvm::open(&a, opts()).unwrap());
    assert_eq!(mark_log(&seg), Some(a.canonicalize().unwrap()));
    let rvm_b = Rvm::open(&b, opts()).unwrap();
    let s = rvm_b.open_segment(&seg).unwrap();
    assert_eq!(mark_log(&seg), Some(b.canonicalize().unwrap()));
    let r = rvm_b.map(&s, MapSpec::new(0, ps())).unwrap();
    assert_eq!(read(&r, 0, 6), b"from A");
    drop((r, s, rvm_b));

    // A deleted with its records: nobody can apply them. The segment is
    // refused (it lacks A's commits) until accepted as it stands.
    let d = Dir::new();
    let (a, b, seg) = records_in_a(&d);
    std::fs::remove_file(&a).unwrap();
    let rvm_b = Rvm::open(&b, opts()).unwrap();
    log_gone(rvm_b.open_segment(&seg), &a);
    let a_canonical = d.path("").canonicalize().unwrap().join("a.log");
    assert_eq!(mark_log(&seg), Some(a_canonical), "a refused open changed the mark");
    drop(rvm_b);
    let rvm_b = Rvm::open(&b, opts().accept_segment(&seg, &seg)).unwrap();
    let s = rvm_b.open_segment(&seg).unwrap();
    assert_eq!(mark_log(&seg), Some(b.canonicalize().unwrap()));
    let r = rvm_b.map(&s, MapSpec::new(0, ps())).unwrap();
    assert_eq!(read(&r, 0, 6), &[0; 6]);

    // Another log now at A's path (a new log id): A is gone as well.
    let d = Dir::new();
    let (a, b, seg) = records_in_a(&d);
    std::fs::remove_file(&a).unwrap();
    create_log(&a, 1 << 20).unwrap();
    let rvm_b = Rvm::open(&b, opts()).unwrap();
    log_gone(rvm_b.open_segment(&seg), &a);
    drop(rvm_b);
    // The new log at A's own path: refused the same way (not "open it
    // through that log": it is this one).
    let rvm_a = Rvm::open(&a, opts()).unwrap();
    log_gone(rvm_a.open_segment(&seg), &a);
    drop(rvm_a);
    let rvm_b = Rvm::open(&b, opts().accept_segment(&seg, &seg)).unwrap();
    rvm_b.open_segment(&seg).unwrap();
    assert_eq!(mark_log(&seg), Some(b.canonicalize().unwrap()));
}

fn log_gone(r: Result<Segment>, log: &Path) {
    match r {
        Err(Error::Log(LogError::SegmentLogGone { owner_log, .. })) => {
            let dir = log.parent().unwrap().canonicalize().unwrap();
            assert_eq!(owner_log, dir.join(log.file_name().unwrap()));
        }
        other => panic!("expected SegmentLogGone, got {other:?}"),
    }
}

// 7. Segment truncated behind the log's back

#[test]
fn segment_truncated_behind_the_log_is_too_short_not_corrupted() {
    let d = Dir::new();
    let (log, seg) = (d.log("log"), d.path("seg"));
    let off = 3 * ps() + 100;
    {
        let rvm = Rvm::open(&log, opts()).unwrap();
        let s = rvm.create_segment(&seg, 4 * ps() as u64).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, 4 * ps())).unwrap();
        commit(&rvm, &r, off, b"high", CommitMode::Flush).unwrap();
    }
    std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(ps() as u64).unwrap();
    let (log_bytes, seg_bytes) = (std::fs::read(&log).unwrap(), std::fs::read(&seg).unwrap());
    match Rvm::open(&log, opts()) {
        Err(Error::Log(LogError::SegmentTooShort { path, needed, len })) => {
            assert_eq!(path, seg.canonicalize().unwrap());
            assert_eq!((needed, len), (off as u64 + 4, ps() as u64));
        }
        Err(e) => panic!("expected SegmentTooShort, got {e:?}"),
        Ok(_) => panic!("expected SegmentTooShort, the open succeeded"),
    }
    assert_eq!(std::fs::read(&log).unwrap(), log_bytes, "the refused open changed the log");
    assert_eq!(std::fs::read(&seg).unwrap(), seg_bytes, "the refused open changed the segment");
    // Extended again: the records apply.
    std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(4 * ps() as u64).unwrap();
    let rvm = Rvm::open(&log, opts()).unwrap();
    assert_eq!(rvm.recovery_report().transactions, 1);
    drop(rvm);
    assert_eq!(&std::fs::read(&seg).unwrap()[off..off + 4], b"high");
}

// 8. Region claims

#[test]
fn loaded_regions_are_claimed_until_unloaded() {
    use rvm_loader::{create_segment as create_loadable, load_segment, LoadMap, RegionSpec};
    let d = Dir::new();
    let log = d.log("log");
    let seg = d.path("seg");
    let range = rvm_loader::testing::address_range();
    let p = ps() as u64;
    let map = LoadMap::new().region(RegionSpec::new("x", p, 2 * p, range.at(0))).region(RegionSpec::new(
        "y",
        3 * p,
        p,
        range.at(16 << 20),
    ));
    let rvm = Rvm::open(&log, opts()).unwrap();
    create_loadable(&rvm, &seg, 4 * p, &map).unwrap();
    let mut loaded = load_segment(&rvm, &seg).unwrap();
    let x = loaded.region("x").unwrap().clone();
    match rvm.unmap(x.clone()) {
        Err(Error::Map(MapError::Claimed { addr })) => assert_eq!(addr, x.addr()),
        other => panic!("expected Claimed, got {other:?}"),
    }
    let all = rvm.regions();
    assert!(all.len() >= 2);
    for r in all {
        let addr = r.addr();
        match rvm.unmap(r) {
            Err(Error::Map(MapError::Claimed { addr: a })) => assert_eq!(a, addr),
            other => panic!("expected Claimed for {addr:#x}, got {other:?}"),
        }
    }
    // Still loaded and usable.
    commit(&rvm, &x, 0, b"claimed", CommitMode::Flush).unwrap();
    assert!(x.claim().is_err(), "a claimed region cannot be claimed twice");
    drop(x);
    loaded.unload().unwrap();
    assert!(rvm.regions().is_empty());
    // Unloaded: the segment's ranges map and unmap as usual.
    let s = loaded.segment().clone();
    let r = rvm.map(&s, MapSpec::new(p, 2 * ps())).unwrap();
    assert_eq!(read(&r, 0, 7), b"claimed");
    rvm.unmap(r).unwrap();
    let claim = rvm.map(&s, MapSpec::new(p, 2 * ps())).unwrap().claim().unwrap();
    rvm.unmap_claimed(claim).unwrap();
    assert!(rvm.regions().is_empty());
}

/// Many tiny no-flush commits (a byte each, so each one's frames are over
/// a hundred times its data) never make a batch larger than the log, with
/// or without coalescing and write-behind; nor does a large transaction
/// arriving on top of a partly filled batch.
#[test]
fn batches_always_fit_in_the_log() {
    for (coalesce, write_behind) in [(false, false), (false, true), (true, false), (true, true)] {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        create_log_with(vfs.as_ref(), Path::new("log"), 256 << 10).unwrap();
        let opts = Options { coalesce, write_behind, truncate_threshold: None, ..Options::default() };
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts).unwrap();
        let seg = rvm.create_segment("seg", 1 << 20).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, 1 << 20)).unwrap();
        for i in 0..40_000usize {
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: single-threaded; nothing else touches the region.
            unsafe { tx.modify_bytes(region.addr() + (i * 8) % (1 << 19), &[i as u8]).unwrap() };
            tx.commit(CommitMode::NoFlush)
                .unwrap_or_else(|e| panic!("coalesce {coalesce}, write-behind {write_behind}: commit {i}: {e}"));
        }
        // A partly filled batch, then a transaction of most of the log.
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        let big = vec![7u8; 100 << 10];
        // SAFETY: as above.
        unsafe { tx.modify_bytes(region.addr() + (1 << 19), &big).unwrap() };
        tx.commit(CommitMode::Flush).unwrap_or_else(|e| panic!("coalesce {coalesce}: the large commit: {e}"));
        drop(region);
        drop(seg);
        rvm.close().unwrap();
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), Options::default()).unwrap();
        let seg = rvm.open_segment("seg").unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, 1 << 20)).unwrap();
        let mut b = vec![0u8; 100 << 10];
        // SAFETY: nothing stores into the region while the test reads it.
        unsafe { region.read(1 << 19, &mut b) }.unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }
}

/// A copied data directory: the copy of the log names the original's
/// segment (its dictionary records canonical paths), and the original's
/// owner mark names the original log, which has the copy's id. Opening the
/// copy wrote the copy's records into the original segment, and the
/// copied segment then opened without them (Ok, acknowledged commits
/// missing from what the program read). Now the open is refused, under
/// both recoveries, with nothing written; with `accept_segment` (the
/// recorded segment now at the copy) the copy recovers into its own
/// segment, and the original log still recovers into the original.
#[test]
fn a_copied_log_never_recovers_into_the_original_segment() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (log_a, seg_a) = (a.path().join("log"), a.path().join("seg"));
    let (log_b, seg_b) = (b.path().join("log"), b.path().join("seg"));
    create_log(&log_a, 1 << 20).unwrap();
    {
        let rvm = Rvm::open(&log_a, Options { truncate_threshold: None, ..Options::default() }).unwrap();
        let seg = rvm.create_segment(&seg_a, 4096).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: this test's region; 4 bytes inside it.
        unsafe { tx.modify_bytes(region.addr() + 100, b"kept").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
        // Closed with the commit in the log only.
    }
    std::fs::copy(&log_a, &log_b).unwrap();
    std::fs::copy(&seg_a, &seg_b).unwrap();
    let (original_log, original_seg) = (std::fs::read(&log_a).unwrap(), std::fs::read(&seg_a).unwrap());
    for instant in [false, true] {
        match Rvm::open(&log_b, Options { instant_recovery: instant, ..Options::default() }) {
            Err(Error::Log(LogError::SegmentOfCopiedLog { path, owner_log, .. })) => {
                assert_eq!(path, std::fs::canonicalize(&seg_a).unwrap());
                assert_eq!(owner_log, std::fs::canonicalize(&log_a).unwrap());
            }
            other => panic!("instant {instant}: expected SegmentOfCopiedLog, got {:?}", other.err()),
        }
        assert!(std::fs::read(&seg_a).unwrap() == original_seg && std::fs::read(&log_a).unwrap() == original_log);
    }
    let read = |rvm: &Rvm, path: &Path| {
        let seg = rvm.open_segment(path).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
        let mut got = [0u8; 4];
        // SAFETY: no transaction runs in the region.
        unsafe { region.read(100, &mut got) }.unwrap();
        got
    };
    {
        let accept = Options::default().accept_segment(std::fs::canonicalize(&seg_a).unwrap(), &seg_b);
        let rvm = Rvm::open(&log_b, accept).unwrap();
        assert_eq!(&read(&rvm, &seg_b), b"kept");
    }
    assert!(std::fs::read(&seg_a).unwrap() == original_seg, "the copy's recovery wrote the original segment");
    let rvm = Rvm::open(&log_a, Options::default()).unwrap();
    assert_eq!(&read(&rvm, &seg_a), b"kept");
}
