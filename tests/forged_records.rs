//! Records forged with valid checksums (written with the log's own
//! `FrameWriter`, so position, epoch, tag and CRC are right) whose contents
//! lie: ranges past a segment's end or near `u64::MAX`, segment ids the
//! dictionary lacks, empty ranges, dense ranges in one page whose offsets
//! go backwards and overlap, transaction numbers that go backwards, an
//! unfinished transaction naming a segment no complete one touches.
//!
//! Each log goes through full recovery and instant recovery
//! (`Options::instant_recovery`), on real files (pages come in through
//! the fault hook), and the two must agree: the same typed error with the
//! files byte-identical afterwards, or the same bytes in every page of
//! every segment (read page by page, last page first), which the segment
//! files then hold. `rvmutl status`, `dump` and `recover` on the same log
//! end with a documented exit code, never a panic.

use rvm::log::format::{FrameWriter, AREA_OFFSET};
use rvm::log::inspect::inspect;
use rvm::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const LOG_LEN: u64 = 4 << 20;
const PAGES: usize = 8;

fn opts(instant: bool) -> Options {
    Options { instant_recovery: instant, truncate_threshold: None, ..Options::default() }
}

/// A log with five flushed transactions on segment `a` (segment `b`
/// exists, is in the dictionary, and no record names it), closed without
/// applying them; the images of the three files.
struct Base {
    _dir: tempfile::TempDir,
    log: PathBuf,
    segs: [PathBuf; 2],
    log_img: Vec<u8>,
    seg_imgs: [Vec<u8>; 2],
    /// Segment ids of `a` and `b` in the dictionary.
    ids: [u32; 2],
    epoch: u64,
    area_len: u64,
    /// Where the complete transactions end (forged records go there).
    end: u64,
    /// Segment `a` as the complete transactions leave it.
    model_a: Vec<u8>,
    /// Instant recovery scans on two threads (`Options::parallel_scan`).
    parallel: bool,
}

fn seg_len() -> usize {
    PAGES * page_size()
}

impl Base {
    fn new() -> Base {
        Base::build(5, 100, false)
    }

    /// `txs` flushed transactions of `len` bytes each on segment `a`.
    fn build(txs: usize, len: usize, parallel: bool) -> Base {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let segs = [dir.path().join("a"), dir.path().join("b")];
        create_log(&log, LOG_LEN).unwrap();
        let mut model_a = vec![0u8; seg_len()];
        {
            // Every transaction logged as it is (not coalesced in a batch).
            let rvm = Rvm::open(&log, Options { coalesce: false, ..opts(false) }).unwrap();
            let a = rvm.create_segment(&segs[0], seg_len() as u64).unwrap();
            let _b = rvm.create_segment(&segs[1], seg_len() as u64).unwrap();
            let r = rvm.map(&a, MapSpec::new(0, seg_len())).unwrap();
            for i in 0..txs {
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                let data = vec![(i as u8).wrapping_add(1); len];
                let at = i * 1500 % (seg_len() - len);
                // SAFETY: this thread alone uses the region; inside it.
                unsafe { tx.modify_bytes(r.addr() + at, &data).unwrap() };
                model_a[at..at + len].copy_from_slice(&data);
                tx.commit(if i % 50 == 49 || i + 1 == txs { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
            }
        }
        let report = inspect(&FileVfs, &log).unwrap();
        let status = report.slots[report.chosen_slot.unwrap() as usize].valid_status().unwrap().clone();
        let scan = report.scan.unwrap();
        assert!(scan.transactions >= 1);
        let id = |p: &Path| {
            let canon = p.canonicalize().unwrap();
            status.segments.iter().find(|e| e.name == canon).unwrap().id
        };
        let ids = [id(&segs[0]), id(&segs[1])];
        Base {
            log_img: std::fs::read(&log).unwrap(),
            seg_imgs: [std::fs::read(&segs[0]).unwrap(), std::fs::read(&segs[1]).unwrap()],
            _dir: dir,
            log,
            segs,
            ids,
            epoch: status.epoch,
            area_len: report.superblock.area_len,
            end: scan.end,
            model_a,
            parallel,
        }
    }

    /// The log image with records `write` makes appended after the
    /// complete transactions (`lsn` is where they start).
    fn forged(&self, write: impl FnOnce(&mut FrameWriter<'_>)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, self.end, self.epoch, self.area_len);
        write(&mut w);
        self.with_bytes(self.end, &out)
    }

    /// The log image with `bytes` at log position `lsn`.
    fn with_bytes(&self, lsn: u64, bytes: &[u8]) -> Vec<u8> {
        let mut img = self.log_img.clone();
        for (i, &b) in bytes.iter().enumerate() {
            let at = AREA_OFFSET + (lsn + i as u64) % self.area_len;
            img[at as usize] = b;
        }
        img
    }

    /// Puts the images back in place (same files: identities and owner
    /// marks stay), the log as `log`.
    fn reset(&self, log: &[u8]) {
        write_in_place(&self.log, log);
        for (p, img) in self.segs.iter().zip(&self.seg_imgs) {
            write_in_place(p, img);
        }
    }

    fn files(&self) -> Vec<Vec<u8>> {
        [&self.log, &self.segs[0], &self.segs[1]].iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    /// Opens `log` (full or instant recovery) and reads every page of
    /// both segments; `Err` with the error's kind after checking that
    /// nothing was written.
    fn outcome(&self, log: &[u8], instant: bool) -> Result<[Vec<u8>; 2], String> {
        self.reset(log);
        let before = self.files();
        let o = Options { parallel_scan: self.parallel, ..opts(instant) };
        let rvm = match Rvm::open(&self.log, o) {
            Ok(rvm) => rvm,
            Err(e) => {
                assert!(self.files() == before, "a failed open (instant {instant}) wrote to the files: {e}");
                return Err(kind(&e));
            }
        };
        let mut got = [Vec::new(), Vec::new()];
        for (k, p) in self.segs.iter().enumerate() {
            let seg = rvm.open_segment(p).unwrap();
            let region = rvm.map(&seg, MapSpec::new(0, seg_len())).unwrap();
            got[k] = read_pages_backwards(&region);
        }
        rvm.wait_for_recovery().unwrap();
        rvm.close().unwrap();
        for (k, p) in self.segs.iter().enumerate() {
            assert!(std::fs::read(p).unwrap() == got[k], "segment {k} on disk differs from what was read");
        }
        Ok(got)
    }

    /// Both recoveries of `log` agree; returns the outcome.
    #[track_caller]
    fn both(&self, log: &[u8]) -> Result<[Vec<u8>; 2], String> {
        let full = self.outcome(log, false);
        let instant = self.outcome(log, true);
        assert!(full == instant, "full recovery {:?} but instant {:?}", summary(&full), summary(&instant));
        self.cli(log, &full);
        full
    }

    /// `rvmutl status`, `dump` and `recover` on `log`: documented exit
    /// codes, no panic; `recover` succeeds exactly when recovery does.
    fn cli(&self, log: &[u8], expect: &Result<[Vec<u8>; 2], String>) {
        self.reset(log);
        for args in [&["status"][..], &["dump"], &["dump", "--json"], &["recover"]] {
            let o = Command::new(env!("CARGO_BIN_EXE_rvmutl")).args(args).arg(&self.log).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(matches!(o.status.code(), Some(0..=3)), "{args:?}: {:?} {err}", o.status);
            assert!(!err.contains("panicked"), "{args:?}: {err}");
            if args == ["recover"] {
                assert_eq!(o.status.success(), expect.is_ok(), "rvmutl recover: {err}");
                if expect.is_err() {
                    assert!(!err.is_empty(), "rvmutl recover failed without a message");
                }
            }
        }
    }
}

fn summary(r: &Result<[Vec<u8>; 2], String>) -> String {
    match r {
        Ok(_) => "Ok(..)".into(),
        Err(e) => format!("Err({e})"),
    }
}

fn write_in_place(p: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(p).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

fn kind(e: &Error) -> String {
    match e {
        Error::Corrupted { .. } => "Corrupted".into(),
        Error::Log(l) => format!("Log({})", format!("{l:?}").split([' ', '{', '(']).next().unwrap()),
        other => panic!("unexpected error kind: {other:?}"),
    }
}

fn read_pages_backwards(region: &Region) -> Vec<u8> {
    let ps = page_size();
    let mut got = vec![0u8; region.len()];
    for p in (0..region.len() / ps).rev() {
        // SAFETY: no transaction runs in the region.
        unsafe { region.read(p * ps, &mut got[p * ps..(p + 1) * ps]) };
    }
    got
}

/// The committed state of `base` plus `writes` on segment `k`.
fn expect_with(base: &Base, writes: &[(usize, u64, &[u8])]) -> [Vec<u8>; 2] {
    let mut want = [base.model_a.clone(), base.seg_imgs[1].clone()];
    for &(k, off, data) in writes {
        want[k][off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    want
}

#[test]
fn the_base_log_recovers_the_same_both_ways() {
    let b = Base::new();
    assert!(b.both(&b.log_img) == Ok(expect_with(&b, &[])));
}

#[test]
fn a_range_past_the_segments_end_is_refused_both_ways() {
    let b = Base::new();
    let len = seg_len() as u64;
    let log = b.forged(|w| {
        w.range(b.ids[1], len - 4, b"12345678");
        w.commit(1000, 1000, b.end);
    });
    assert_eq!(b.both(&log), Err("Log(SegmentTooShort)".into()));
}

#[test]
fn ranges_at_offsets_near_the_top_of_u64_are_refused_both_ways() {
    let b = Base::new();
    for offset in [1u64 << 40, 1 << 62, u64::MAX - 8, u64::MAX / 2] {
        let log = b.forged(|w| {
            w.range(b.ids[0], 16, b"ok");
            w.range(b.ids[0], offset, b"12345678");
            w.commit(1000, 1000, b.end);
        });
        assert_eq!(b.both(&log), Err("Log(SegmentTooShort)".into()), "offset {offset:#x}");
    }
}

#[test]
fn a_range_whose_end_overflows_ends_the_log_both_ways() {
    let b = Base::new();
    // offset + len overflows: the record's body is refused, so the log
    // ends before it (nothing after it was synced).
    let log = b.forged(|w| {
        w.range(b.ids[0], u64::MAX - 3, b"12345678");
        w.commit(1000, 1000, b.end);
    });
    assert!(b.both(&log) == Ok(expect_with(&b, &[])));
}

#[test]
fn a_segment_id_not_in_the_dictionary_is_refused_both_ways() {
    let b = Base::new();
    for id in [77u32, u32::MAX, 0] {
        if b.ids.contains(&id) {
            continue;
        }
        let log = b.forged(|w| {
            w.range(id, 0, b"x");
            w.commit(1000, 1000, b.end);
        });
        assert_eq!(b.both(&log), Err("Corrupted".into()), "id {id}");
    }
}

#[test]
fn empty_ranges_change_nothing_both_ways() {
    let b = Base::new();
    let log = b.forged(|w| {
        w.range(b.ids[1], 0, b"");
        w.range(b.ids[1], seg_len() as u64, b"");
        w.range(b.ids[0], 5, b"");
        w.range(b.ids[0], 6, b"z");
        w.commit(1000, 1000, b.end);
    });
    assert!(b.both(&log) == Ok(expect_with(&b, &[(0, 6, b"z")])));
    // An empty range past the end still names a segment that is too short.
    let log = b.forged(|w| {
        w.range(b.ids[1], 1 << 50, b"");
        w.commit(1000, 1000, b.end);
    });
    let got = b.both(&log);
    assert!(got.is_err() || got == Ok(expect_with(&b, &[])), "{:?}", summary(&got));
}

#[test]
fn dense_ranges_in_one_page_going_backwards_and_overlapping_apply_in_order() {
    let b = Base::new();
    let ps = page_size() as u64;
    // Ranges of one record in one page (the index keeps them as one
    // group), with offsets that go backwards, overlap, repeat, touch the
    // page's last byte, then continue in the next page and come back.
    let writes: Vec<(usize, u64, Vec<u8>)> = vec![
        (1, ps + 100, vec![1; 10]),
        (1, ps + 50, vec![2; 60]),
        (1, ps + 100, vec![3; 5]),
        (1, ps + 100, vec![4; 1]),
        (1, 2 * ps - 1, vec![5; 1]),
        (1, ps, vec![6; 1]),
        (1, 2 * ps - 30, vec![7; 30]),
        (1, 2 * ps + 3, vec![8; 3]),
        (1, ps + 7, vec![9; 2]),
        (1, ps + 1, vec![10; 3]),
        (0, ps + 1, vec![11; 3]),
        (1, ps + 2, vec![12; 3]),
        (1, ps - 2, vec![13; 4]),
        (1, ps + 2, vec![14; 1]),
    ];
    let log = b.forged(|w| {
        for (k, off, data) in &writes {
            w.range(b.ids[*k], *off, data);
        }
        w.commit(1000, 1000, b.end);
    });
    let refs: Vec<(usize, u64, &[u8])> = writes.iter().map(|(k, o, d)| (*k, *o, &d[..])).collect();
    assert!(b.both(&log) == Ok(expect_with(&b, &refs)));
}

#[test]
fn transaction_numbers_that_go_backwards_or_skip_do_not_matter_to_recovery() {
    let b = Base::new();
    let log = b.forged(|w| {
        w.range(b.ids[1], 10, b"one");
        w.commit(5, 5, b.end);
        w.range(b.ids[1], 20, b"two");
        w.commit(1, 1, b.end);
        w.range(b.ids[1], 30, b"three");
        w.commit(u64::MAX - 1, u64::MAX, b.end);
        w.range(b.ids[1], 40, b"four");
        w.commit(0, 0, b.end);
    });
    let want = expect_with(&b, &[(1, 10, b"one"), (1, 20, b"two"), (1, 30, b"three"), (1, 40, b"four")]);
    assert!(b.both(&log) == Ok(want));
}

/// A transaction longer than a record is cut off by a crash before its
/// commit record: its first record is valid, and names segment `b` (which
/// no complete transaction touches), a huge offset, or an id the
/// dictionary lacks. Both recoveries drop it.
#[test]
fn an_unfinished_transaction_on_an_untouched_segment_is_dropped_both_ways() {
    let b = Base::new();
    let big = vec![0x5a; 1 << 20];
    let small = [0xa5u8; 24];
    for what in ["small ranges in the segment", "a huge offset", "an unknown segment"] {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, b.end, b.epoch, b.area_len);
        let mut k = 0u64;
        // Until the first record is closed (full).
        while w.lsn() == b.end {
            match what {
                "small ranges in the segment" => w.range(b.ids[1], k * 40 % (seg_len() as u64 - 24), &small),
                "a huge offset" => w.range(b.ids[1], (1 << 61) + k * (1 << 20), &big),
                _ => w.range(77, k * 100, &small),
            }
            k += 1;
        }
        w.commit(1000, 1000, b.end);
        // Keep only the first record: the rest (and the commit) was never
        // written.
        let first_len = (w.lsn() - b.end) as usize;
        let _ = first_len;
        let rec = u32::from_le_bytes([out[4], out[5], out[6], 0]) as usize;
        let rec = (rec + 7) & !7;
        assert!(rec < out.len(), "{what}: more than one record");
        let log = b.with_bytes(b.end, &out[..rec]);
        assert!(b.both(&log) == Ok(expect_with(&b, &[])), "{what}");
    }
}

/// The same lies after a long log, which instant recovery scans by parts on
/// two threads (`Options::parallel_scan`; on a machine of one core, one).
#[test]
fn forged_records_after_a_long_log_scanned_on_two_threads() {
    let b = Base::build(400, 3000, true);
    assert!(b.end > 1 << 20, "the log is long enough for several parts");
    assert!(b.both(&b.log_img) == Ok(expect_with(&b, &[])));
    let log = b.forged(|w| {
        w.range(b.ids[0], 1 << 62, b"12345678");
        w.commit(1000, 1000, b.end);
    });
    assert_eq!(b.both(&log), Err("Log(SegmentTooShort)".into()));
    let log = b.forged(|w| {
        w.range(77, 0, b"x");
        w.commit(1000, 1000, b.end);
    });
    assert_eq!(b.both(&log), Err("Corrupted".into()));
    let ps = page_size() as u64;
    let writes: Vec<(usize, u64, Vec<u8>)> =
        (0..40).map(|i| (1, ps + (i * 97) % (ps - 8), vec![i as u8; 8])).chain([(1, ps - 3, vec![9; 6])]).collect();
    let log = b.forged(|w| {
        for (k, off, data) in &writes {
            w.range(b.ids[*k], *off, data);
        }
        w.commit(1000, 1000, b.end);
    });
    let refs: Vec<(usize, u64, &[u8])> = writes.iter().map(|(k, o, d)| (*k, *o, &d[..])).collect();
    assert!(b.both(&log) == Ok(expect_with(&b, &refs)));
}
