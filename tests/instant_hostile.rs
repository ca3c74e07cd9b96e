//! Instant recovery (`Options::instant_recovery`) against hostile files
//! and careless callers, on real files:
//!
//! * damaged synced data (a record with synced records after it, status
//!   slots, the superblock), a log cut short, and a log or segment that is
//!   not a regular file of this format (a directory, a FIFO, `/dev/zero`,
//!   an empty file, another format version, a symlink loop): a typed error,
//!   no hang, and the files byte-identical afterwards, with instant
//!   recovery and without;
//! * misuse of handles while the background apply runs: dropping the
//!   instance or keeping a region past it, a second open of the same log,
//!   transactions (committed and aborted) on pending pages, truncation,
//!   checkpoints, flushes, unmapping and mapping again, closing and
//!   reopening segments, growing: every call ends in `Ok` or a typed error,
//!   and the state afterwards is the committed one.

use rvm::log::format::{AREA_OFFSET, BLOCK, STATUS_SLOT};
use rvm::*;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

const PAGES: usize = 512;

/// The tests open and reopen files in one directory each; they run one
/// at a time (each is short) so that timing-dependent misuse meets a
/// background apply still running.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn opts(instant: bool) -> Options {
    Options { instant_recovery: instant, truncate_threshold: None, ..Options::default() }
}

fn seg_len() -> usize {
    PAGES * page_size()
}

/// A log holding transactions over every page of a segment, unapplied.
struct Files {
    dir: tempfile::TempDir,
    log: PathBuf,
    seg: PathBuf,
    log_img: Vec<u8>,
    seg_img: Vec<u8>,
    /// The committed state.
    model: Vec<u8>,
    /// Log positions `[start, end)` of the records (no wrap).
    records: (u64, u64),
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
        create_log(&log, 4 << 20).unwrap();
        let ps = page_size();
        let mut model = vec![0u8; seg_len()];
        {
            let rvm = Rvm::open(&log, opts(false)).unwrap();
            let s = rvm.create_segment(&seg, seg_len() as u64).unwrap();
            let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
            for t in 0..128usize {
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                for k in 0..8usize {
                    let page = (t * 8 + k) % PAGES;
                    let off = page * ps + (t * 40 + k * 8) % (ps - 64);
                    let data: Vec<u8> = (0..64).map(|i| (t * 7 + k + i) as u8 | 1).collect();
                    // SAFETY: this thread alone uses the region; inside it.
                    unsafe { tx.modify_bytes(r.addr() + off, &data).unwrap() };
                    model[off..off + 64].copy_from_slice(&data);
                }
                tx.commit(if t % 16 == 15 { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
            }
        }
        let report = rvm::log::inspect::inspect(&FileVfs, &log).unwrap();
        let scan = report.scan.unwrap();
        assert!(scan.transactions >= 8 && report.superblock.area_len > scan.end);
        Files {
            log_img: std::fs::read(&log).unwrap(),
            seg_img: std::fs::read(&seg).unwrap(),
            dir,
            log,
            seg,
            model,
            records: (scan.start, scan.end),
        }
    }

    /// The files back as made (in place: identities and owner marks
    /// stay), the log as `log`.
    fn reset_with(&self, log: &[u8]) {
        for (p, img) in [(&self.log, log), (&self.seg, &self.seg_img[..])] {
            if std::fs::symlink_metadata(p).is_ok_and(|m| !m.is_file()) {
                remove(p);
            }
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(p).unwrap();
            std::io::Write::write_all(&mut f, img).unwrap();
            f.sync_all().unwrap();
        }
    }

    fn reset(&self) {
        self.reset_with(&self.log_img);
    }

    /// The bytes of the log and segment (or what stands at their paths).
    fn snapshot(&self) -> Vec<Option<Vec<u8>>> {
        // Only regular files are read (a FIFO's read would wait for a
        // writer); what else stands there is described by its type.
        [&self.log, &self.seg]
            .iter()
            .map(|p| match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_file() => std::fs::read(p).ok(),
                Ok(m) => Some(format!("{:?}", m.file_type()).into_bytes()),
                Err(_) => None,
            })
            .collect()
    }

    /// Opens with both recoveries, each under a time limit: both must fail
    /// with a typed error and write nothing. Returns the errors' texts.
    #[track_caller]
    fn refused(&self, what: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for instant in [false, true] {
            let before = self.snapshot();
            let r = open_within(&self.log, opts(instant));
            let e = match r {
                Ok(_) => panic!("{what}: an open (instant {instant}) succeeded"),
                Err(e) => e,
            };
            assert!(
                matches!(e, Error::Corrupted { .. } | Error::Log(_) | Error::Io { .. }),
                "{what}: untyped error {e:?}"
            );
            assert!(!e.to_string().is_empty());
            assert!(self.snapshot() == before, "{what}: a failed open (instant {instant}) wrote: {e}");
            errors.push(e.to_string());
        }
        errors
    }

    /// Opens with instant recovery and reads every page (last first):
    /// the committed state.
    fn check_instant(&self) {
        let rvm = Rvm::open(&self.log, opts(true)).unwrap();
        let s = rvm.open_segment(&self.seg).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
        assert!(read_backwards(&r) == self.model);
        rvm.wait_for_recovery().unwrap();
    }

    /// After whatever happened: a full recovery of the files shows the
    /// committed state with `extra` written over it.
    #[track_caller]
    fn check_full(&self, extra: &[(usize, Vec<u8>)]) {
        let rvm = Rvm::open(&self.log, opts(false)).unwrap();
        let s = rvm.open_segment(&self.seg).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
        let mut want = self.model.clone();
        for (off, d) in extra {
            want[*off..off + d.len()].copy_from_slice(d);
        }
        assert!(read_all(&r) == want, "the files do not recover to the committed state");
    }
}

/// CRC32C (Castagnoli), bit by bit: the superblock's checksum.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Makes something at a path (a file, a directory, a FIFO, a symlink).
type Maker = Box<dyn Fn(&Path)>;

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// `Rvm::open` on another thread, failing the test if it takes more than
/// 20 s (a read that blocks forever, on a FIFO say).
fn open_within(log: &Path, opts: Options) -> Result<Rvm> {
    let (tx, rx) = std::sync::mpsc::channel();
    let log = log.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Rvm::open(&log, opts));
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("the open hung")
}

fn read_all(r: &Region) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    // SAFETY: no transaction runs in the region.
    unsafe { r.read(0, &mut v) };
    v
}

fn read_backwards(r: &Region) -> Vec<u8> {
    let ps = page_size();
    let mut v = vec![0u8; r.len()];
    for p in (0..r.len() / ps).rev() {
        // SAFETY: no transaction runs in the region.
        unsafe { r.read(p * ps, &mut v[p * ps..(p + 1) * ps]) };
    }
    v
}

fn read_at(r: &Region, off: usize, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: no transaction runs in the region.
    unsafe { r.read(off, &mut v) };
    v
}

// ---------------------------------------------------------------------------
// Damaged and foreign files
// ---------------------------------------------------------------------------

#[test]
fn damaged_synced_records_slots_and_superblock_are_refused_both_ways() {
    let _s = serial();
    let f = Files::new();
    let (start, end) = f.records;
    let dev = |lsn: u64| (AREA_OFFSET + lsn) as usize;
    // A byte of a record with synced records after it: at the first
    // record, in the middle, a quarter from the end.
    for lsn in [start + 2, start + 9, (start + end) / 2, end - (end - start) / 4] {
        let mut img = f.log_img.clone();
        img[dev(lsn)] ^= 0x40;
        f.reset_with(&img);
        let e = f.refused(&format!("a flipped byte at position {lsn}"));
        assert!(e.iter().all(|e| e.contains("salvage")), "{e:?}");
    }
    // Both status slots (a byte of the fixed part, of the dictionary).
    for off in [10usize, 30, 90] {
        let mut img = f.log_img.clone();
        img[BLOCK as usize + off] ^= 1;
        img[(BLOCK + STATUS_SLOT) as usize + off] ^= 1;
        f.reset_with(&img);
        f.refused(&format!("both slots at {off}"));
        // One slot only: the other holds the status, nothing is lost.
        let mut img = f.log_img.clone();
        img[BLOCK as usize + off] ^= 1;
        f.reset_with(&img);
        f.check_instant();
        f.reset();
        f.check_full(&[]);
    }
    // The superblock: magic, version, sizes, log id, checksum.
    for off in [0usize, 8, 16, 33, 50, 61] {
        let mut img = f.log_img.clone();
        img[off] ^= 2;
        f.reset_with(&img);
        f.refused(&format!("superblock byte {off}"));
    }
    f.reset();
    f.check_full(&[]);
}

#[test]
fn a_log_cut_short_is_refused_both_ways() {
    let _s = serial();
    let f = Files::new();
    let (start, end) = f.records;
    let cuts = [
        0,
        1,
        63,
        BLOCK as usize,
        BLOCK as usize + 100,
        (BLOCK + STATUS_SLOT) as usize + 7,
        AREA_OFFSET as usize,
        (AREA_OFFSET + start + 5) as usize,
        (AREA_OFFSET + (start + end) / 2) as usize,
        (AREA_OFFSET + end) as usize,
        f.log_img.len() - 1,
    ];
    for n in cuts {
        f.reset_with(&f.log_img[..n]);
        f.refused(&format!("the log cut to {n} bytes"));
    }
    // Cut, then made as long again with zeros (the records after the cut
    // lost): the synced records are missing.
    let mut img = f.log_img[..(AREA_OFFSET + (start + end) / 2) as usize].to_vec();
    img.resize(f.log_img.len(), 0);
    f.reset_with(&img);
    f.refused("the records zeroed from the middle on");
    f.reset();
    f.check_full(&[]);
}

/// Things put where a log or segment file should be: a directory, an
/// empty file, a FIFO, a symlink to `/dev/zero`.
fn impostors() -> Vec<(&'static str, Maker)> {
    vec![
        ("a directory", Box::new(|p| std::fs::create_dir(p).unwrap())),
        ("an empty file", Box::new(|p| std::fs::write(p, b"").unwrap())),
        (
            "a FIFO",
            Box::new(|p| {
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a valid C string; mkfifo has no other precondition.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            }),
        ),
        ("a symlink to /dev/zero", Box::new(|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap())),
    ]
}

#[test]
fn a_log_that_is_not_a_log_file_is_refused_both_ways() {
    let _s = serial();
    let f = Files::new();
    let replace = |make: &dyn Fn(&Path)| {
        f.reset();
        remove(&f.log);
        make(&f.log);
    };
    let mut cases = impostors();
    cases.extend::<[(&str, Maker); 4]>([
        ("a symlink to /dev/null", Box::new(|p| std::os::unix::fs::symlink("/dev/null", p).unwrap())),
        ("a symlink loop", Box::new(|p| std::os::unix::fs::symlink(p, p).unwrap())),
        ("a dangling symlink", Box::new(|p| std::os::unix::fs::symlink(p.with_extension("gone"), p).unwrap())),
        ("zeros", Box::new(|p| std::fs::write(p, vec![0u8; 4 << 20]).unwrap())),
    ]);
    for (what, make) in &cases {
        replace(make.as_ref());
        f.refused(what);
    }
    // Another format version, its checksum right.
    let mut img = f.log_img.clone();
    for version in [0u32, 1, 2, 4, u32::MAX] {
        img[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32c(&img[0..60]);
        img[60..64].copy_from_slice(&crc.to_le_bytes());
        f.reset_with(&img);
        let e = f.refused(&format!("version {version}"));
        assert!(e.iter().all(|e| e.contains(&version.to_string())), "{e:?}");
    }
    remove(&f.log);
    f.reset();
    f.check_full(&[]);
}

#[test]
fn a_segment_that_is_not_the_recorded_file_is_refused_both_ways() {
    let _s = serial();
    let f = Files::new();
    let mut cases = impostors();
    cases.extend::<[(&str, Maker); 2]>([
        ("missing", Box::new(|_| {})),
        ("a copy", Box::new(|p| std::fs::write(p, vec![0u8; seg_len()]).unwrap())),
    ]);
    for (what, make) in &cases {
        f.reset();
        remove(&f.seg);
        make(&f.seg);
        f.refused(&format!("the segment replaced by {what}"));
    }
    // The recorded file, cut short: the log holds records past its end.
    f.reset();
    std::fs::OpenOptions::new().write(true).open(&f.seg).unwrap().set_len(seg_len() as u64 / 2).unwrap();
    f.refused("the segment cut short");
}

// ---------------------------------------------------------------------------
// Misuse while the background apply runs
// ---------------------------------------------------------------------------

#[test]
fn dropping_the_instance_while_it_applies_loses_nothing() {
    let _s = serial();
    let f = Files::new();
    for round in 0..4 {
        f.reset();
        let rvm = Rvm::open(&f.log, opts(true)).unwrap();
        if round % 2 == 1 {
            let s = rvm.open_segment(&f.seg).unwrap();
            let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
            let p = (round * 97) % PAGES * page_size();
            assert!(read_at(&r, p, 64) == f.model[p..p + 64]);
            // The region outlives the instance: it still shows the state.
            drop(s);
            drop(rvm);
            assert!(read_backwards(&r) == f.model);
            drop(r);
        } else {
            drop(rvm);
        }
        f.check_full(&[]);
    }
}

#[test]
fn a_second_open_of_the_log_while_it_applies_is_refused() {
    let _s = serial();
    let f = Files::new();
    f.reset();
    let rvm = Rvm::open(&f.log, opts(true)).unwrap();
    for instant in [true, false] {
        match Rvm::open(&f.log, opts(instant)) {
            Err(Error::Locked { .. }) => {}
            Err(e) => panic!("a second open failed with {e:?}"),
            Ok(_) => panic!("a second open of a log in use succeeded"),
        }
        // The inspector reads it as a live view meanwhile.
        let report = rvm::log::inspect::inspect(&FileVfs, &f.log);
        assert!(matches!(report, Ok(_) | Err(Error::Locked { .. })), "{report:?}");
    }
    let s = rvm.open_segment(&f.seg).unwrap();
    let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
    assert!(read_backwards(&r) == f.model);
    drop(r);
    drop(s);
    rvm.close().unwrap();
    f.check_full(&[]);
}

#[test]
fn transactions_on_pending_pages_commit_and_abort_correctly() {
    let _s = serial();
    let f = Files::new();
    let ps = page_size();
    for round in 0..3 {
        f.reset();
        let rvm = Rvm::open(&f.log, opts(true)).unwrap();
        let s = rvm.open_segment(&f.seg).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
        let pages = [PAGES - 1, 3, PAGES / 2, 200 + round];
        // An aborted transaction over pending pages: they show the
        // recovered state again, not the stale segment.
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        for &p in &pages {
            // SAFETY: this thread alone uses the region; inside it.
            unsafe { tx.modify_bytes(r.addr() + p * ps + 10, b"aborted!").unwrap() };
        }
        tx.abort();
        for &p in &pages {
            assert!(read_at(&r, p * ps, ps) == f.model[p * ps..(p + 1) * ps], "round {round}: page {p} after abort");
        }
        // A committed one over other pending pages.
        let mut extra = Vec::new();
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        for p in [PAGES - 2, 5, PAGES / 2 + 1] {
            let off = p * ps + 100;
            // SAFETY: as above.
            unsafe { tx.set_range(r.addr() + off, 16).unwrap() };
            // SAFETY: the range was declared; this thread alone writes it.
            unsafe { std::ptr::copy_nonoverlapping(b"committed, kept!".as_ptr(), (r.addr() + off) as *mut u8, 16) };
            extra.push((off, b"committed, kept!".to_vec()));
        }
        tx.commit(if round == 1 { CommitMode::NoFlush } else { CommitMode::Flush }).unwrap();
        let mut want = f.model.clone();
        for (off, d) in &extra {
            want[*off..off + d.len()].copy_from_slice(d);
        }
        assert!(read_backwards(&r) == want, "round {round}");
        rvm.flush().unwrap();
        drop(r);
        drop(s);
        if round == 2 {
            rvm.close().unwrap();
        } else {
            drop(rvm);
        }
        f.check_full(&extra);
    }
}

#[test]
fn truncation_checkpoints_and_flushes_during_the_apply_wait_and_lose_nothing() {
    let _s = serial();
    let f = Files::new();
    for op in ["truncate", "checkpoint", "flush", "checkpoint_steps", "query"] {
        f.reset();
        let rvm = Rvm::open(&f.log, opts(true)).unwrap();
        let s = rvm.open_segment(&f.seg).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
        match op {
            "truncate" => rvm.truncate().unwrap(),
            "checkpoint" => {
                rvm.checkpoint().unwrap();
            }
            "flush" => rvm.flush().unwrap(),
            "checkpoint_steps" => {
                if rvm.checkpoint_start().unwrap() {
                    while rvm.checkpoint_step(7).unwrap() > 0 {}
                    rvm.checkpoint_finish().unwrap();
                }
            }
            _ => {
                let _ = rvm.query();
                let _ = rvm.stats();
            }
        }
        assert!(read_backwards(&r) == f.model, "{op}");
        drop(r);
        drop(s);
        rvm.close().unwrap();
        f.check_full(&[]);
    }
}

#[test]
fn unmapping_remapping_and_closing_segments_while_pages_are_pending() {
    let _s = serial();
    let f = Files::new();
    let ps = page_size();
    for round in 0..3usize {
        f.reset();
        let rvm = Rvm::open(&f.log, opts(true)).unwrap();
        let s = rvm.open_segment(&f.seg).unwrap();
        // A part of the segment, unmapped after one read.
        let r = rvm.map(&s, MapSpec::new((64 * ps) as u64, 64 * ps)).unwrap();
        assert!(read_at(&r, 5 * ps, ps) == f.model[69 * ps..70 * ps]);
        rvm.unmap(r).unwrap();
        // The same range twice at once is refused, typed.
        let a = rvm.map(&s, MapSpec::new(0, 32 * ps)).unwrap();
        let twice = rvm.map(&s, MapSpec::new((16 * ps) as u64, 32 * ps));
        assert!(matches!(twice, Err(Error::Map(_))), "{:?}", twice.map(|r| r.addr()));
        rvm.unmap(a).unwrap();
        // Closing the segment and opening it again (a handle of the same
        // file under another name, a hard link, too).
        match round {
            0 => rvm.close_segment(s).unwrap(),
            1 => {
                let link = f.dir.path().join("seg-link");
                let _ = std::fs::remove_file(&link);
                std::fs::hard_link(&f.seg, &link).unwrap();
                let other = rvm.open_segment(&link);
                assert!(other.is_ok() || matches!(other, Err(Error::Locked { .. })), "{other:?}");
                drop(other);
                drop(s);
                std::fs::remove_file(&link).unwrap();
            }
            _ => drop(s),
        }
        let s = rvm.open_segment(&f.seg).unwrap();
        // A region that starts zero-filled (its pending pages are brought
        // up to date in the segment first), then copies.
        let z = rvm.map(&s, MapSpec::new(0, seg_len()).copy(CopyMode::NoCopy)).unwrap();
        assert!(read_at(&z, 0, ps).iter().all(|&b| b == 0));
        rvm.unmap(z).unwrap();
        for mode in [CopyMode::OnMap, CopyMode::OnDemand] {
            let r = rvm.map(&s, MapSpec::new(0, seg_len()).copy(mode)).unwrap();
            assert!(read_backwards(&r) == f.model, "round {round}, {mode:?}");
            rvm.unmap(r).unwrap();
        }
        // A new segment, made while the apply may still run.
        let other = f.dir.path().join(format!("new-{round}"));
        let n = rvm.create_segment(&other, 4 * ps as u64).unwrap();
        drop(n);
        drop(s);
        rvm.close().unwrap();
        std::fs::remove_file(&other).unwrap();
        f.check_full(&[]);
    }
}

#[test]
fn growing_a_region_with_pending_pages() {
    let _s = serial();
    let f = Files::new();
    let ps = page_size();
    f.reset();
    let rvm = Rvm::open(&f.log, opts(true)).unwrap();
    let s = rvm.open_segment(&f.seg).unwrap();
    let r = rvm.map(&s, MapSpec::new(0, 64 * ps).reserve(seg_len() + 64 * ps)).unwrap();
    assert!(read_at(&r, 0, ps) == f.model[..ps]);
    rvm.grow_region(&r, seg_len()).unwrap();
    assert!(read_backwards(&r) == f.model);
    // Past the segment's end: refused until the segment grows.
    assert!(matches!(rvm.grow_region(&r, seg_len() + 8 * ps), Err(Error::Map(_))));
    rvm.extend_segment(&s, (seg_len() + 8 * ps) as u64).unwrap();
    rvm.grow_region(&r, seg_len() + 8 * ps).unwrap();
    assert!(read_at(&r, seg_len(), 8 * ps).iter().all(|&b| b == 0));
    assert!(read_at(&r, 0, seg_len()) == f.model);
    drop(r);
    drop(s);
    rvm.close().unwrap();
}

// ---------------------------------------------------------------------------
// Records across the end of the ring; salvage
// ---------------------------------------------------------------------------

/// Commits `writes` (offset, bytes) as one transaction with a flush.
fn commit(rvm: &Rvm, r: &Region, writes: &[(usize, Vec<u8>)], model: &mut [u8]) {
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    for (off, d) in writes {
        // SAFETY: this thread alone uses the region; inside it.
        unsafe { tx.modify_bytes(r.addr() + off, d).unwrap() };
        model[*off..off + d.len()].copy_from_slice(d);
    }
    tx.commit(CommitMode::Flush).unwrap();
}

/// Records that run across the end of the ring (single ranges, and many
/// small ranges in one page, which the index keeps as one group read
/// through the mapping of the log) read the same with instant recovery as
/// with full recovery, at every distance of the record's start from the
/// end of the ring.
#[test]
fn records_across_the_end_of_the_ring_read_the_same_both_ways() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
    create_log(&log, 256 << 10).unwrap();
    let ps = page_size();
    let len = 16 * ps;
    let mut model = vec![0u8; len];
    let rvm = Rvm::open(&log, opts(false)).unwrap();
    let s = rvm.create_segment(&seg, len as u64).unwrap();
    let r = rvm.map(&s, MapSpec::new(0, len)).unwrap();
    let area = rvm.query().log_capacity;
    let mut k = 0usize;
    for room in [40u64, 200, 600, 1500, 2600] {
        // Bring the tail to `room` bytes (give or take a record) before the
        // end of the ring, the log emptied.
        loop {
            let left = area - rvm.query().tail % area;
            if left <= room + 4096 && left >= room {
                break;
            }
            let n = if left > room + 6000 { 3000 } else { (left - room).saturating_sub(60).max(1) as usize };
            commit(&rvm, &r, &[(k % 8 * ps, vec![k as u8; n.min(ps)])], &mut model);
            k += 1;
            rvm.truncate().unwrap();
        }
        rvm.truncate().unwrap();
        let start = rvm.query().tail;
        // Many small ranges in one page (one group), then ranges over
        // several pages, a range over a page boundary.
        let page = 8 + k % 4;
        let group: Vec<(usize, Vec<u8>)> =
            (0..150).map(|i| (page * ps + (i * 26) % (ps - 8), vec![(k + i) as u8 | 0x80; 8])).collect();
        commit(&rvm, &r, &group, &mut model);
        let spread: Vec<(usize, Vec<u8>)> =
            (0..12).map(|i| (i * ps + 3 * ps / 4, vec![(k + i) as u8; ps / 2])).collect();
        commit(&rvm, &r, &spread, &mut model);
        k += 1;
        assert!(rvm.query().tail / area > start / area, "room {room}: the records do not cross the end");
        // Copies of the files as the instance leaves them (unapplied).
        rvm.flush().unwrap();
        let images = (std::fs::read(&log).unwrap(), std::fs::read(&seg).unwrap());
        let mut got = Vec::new();
        for instant in [true, false] {
            let other = dir.path().join(format!("copy-{instant}"));
            std::fs::create_dir_all(&other).unwrap();
            let (clog, cseg) = (other.join("log"), other.join("seg"));
            std::fs::write(&clog, &images.0).unwrap();
            std::fs::write(&cseg, &images.1).unwrap();
            let o = opts(instant).accept_segment(seg.canonicalize().unwrap(), &cseg);
            let c = Rvm::open(&clog, o).unwrap();
            assert!(c.recovery_report().transactions > 0);
            let cs = c.open_segment(&cseg).unwrap();
            let cr = c.map(&cs, MapSpec::new(0, len)).unwrap();
            got.push(read_backwards(&cr));
            c.wait_for_recovery().unwrap();
            drop(cr);
            drop(cs);
            c.close().unwrap();
            assert!(std::fs::read(&cseg).unwrap() == *got.last().unwrap(), "room {room}: the segment file");
            std::fs::remove_dir_all(&other).unwrap();
        }
        assert!(got[0] == model, "room {room}: instant recovery differs from the committed state");
        assert!(got[1] == model, "room {room}: full recovery differs from the committed state");
    }
}

/// A damaged log salvaged with instant recovery ends as a salvage with full
/// recovery does: the transactions before the damage, a copy of the
/// damaged log, and a log that then opens without salvage.
#[test]
fn salvage_with_instant_recovery_matches_full_recovery() {
    let _s = serial();
    let f = Files::new();
    let (start, end) = f.records;
    let mut img = f.log_img.clone();
    let at = (AREA_OFFSET + start + (end - start) / 2) as usize;
    img[at] ^= 0x08;
    let mut got = Vec::new();
    for instant in [true, false] {
        f.reset_with(&img);
        for e in std::fs::read_dir(f.dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.to_string_lossy().contains("damaged") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let rvm = Rvm::open(&f.log, Options { salvage: true, ..opts(instant) }).unwrap();
        let report = rvm.recovery_report();
        let salvage = report.salvage.clone().expect("a salvage report");
        assert!(std::fs::read(&salvage.copy).unwrap() == img, "the salvage copy");
        let s = rvm.open_segment(&f.seg).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
        let seen = read_backwards(&r);
        rvm.wait_for_recovery().unwrap();
        drop(r);
        drop(s);
        rvm.close().unwrap();
        // Without salvage now, both ways: the same state.
        for again in [true, false] {
            let rvm = Rvm::open(&f.log, opts(again)).unwrap();
            let s = rvm.open_segment(&f.seg).unwrap();
            let r = rvm.map(&s, MapSpec::new(0, seg_len())).unwrap();
            assert!(read_backwards(&r) == seen, "instant {instant}: a reopen (instant {again}) after the salvage");
        }
        got.push((report.transactions, salvage.damaged_at, salvage.dropped_transactions, seen));
    }
    assert!(got[0] == got[1], "instant and full salvage differ");
    assert!(got[0].3 != f.model && got[0].0 > 0);
}

// ---------------------------------------------------------------------------
// Crafted statuses (valid checksums)
// ---------------------------------------------------------------------------

/// The log image with both status slots replaced by the chosen one
/// edited by `edit` (checksum recomputed).
fn crafted(img: &[u8], edit: impl FnOnce(&mut rvm::log::format::Status)) -> Vec<u8> {
    use rvm::log::format::Status;
    let slot = |i: u64| Status::slot_offset(i) as usize;
    let mut status = (0..2)
        .filter_map(|i| Status::decode(&img[slot(i)..slot(i) + STATUS_SLOT as usize]))
        .max_by_key(|s| s.seq)
        .unwrap();
    edit(&mut status);
    let bytes = status.encode().unwrap();
    let mut img = img.to_vec();
    for i in 0..2 {
        img[slot(i)..slot(i) + STATUS_SLOT as usize].fill(0);
        img[slot(i)..slot(i) + bytes.len()].copy_from_slice(&bytes);
    }
    img
}

/// Statuses with counters at their limits, or a dictionary that lies:
/// every open ends in a typed error with nothing written, or succeeds; and
/// a flush acknowledged after a successful open is there at the next open.
/// A status at the limit an open accepts (2^61) is refused at once; one
/// just below it opens, and what would pass the limit (a status, records)
/// is refused before it is written (so a log whose epoch reaches the limit
/// is refused from then on, typed, holding what it acknowledged).
#[test]
fn crafted_statuses_at_the_limits_never_lose_an_acknowledged_flush() {
    use rvm::log::format::{MAX_POSITION, OPEN_LIMIT};
    let _s = serial();
    let f = Files::new();
    let seg_name = f.seg.canonicalize().unwrap();
    type Edit = Box<dyn Fn(&mut rvm::log::format::Status)>;
    // (what, edit, refused at open)
    let edits: Vec<(&str, Edit, bool)> = vec![
        ("seq at the limit", Box::new(|s| s.seq = MAX_POSITION - 1), true),
        ("seq near the limit", Box::new(|s| s.seq = MAX_POSITION - 3), true),
        ("epoch at the limit", Box::new(|s| s.epoch = MAX_POSITION - 1), true),
        ("epoch near the limit", Box::new(|s| s.epoch = MAX_POSITION - 2), true),
        ("epoch at 2^61", Box::new(|s| s.epoch = OPEN_LIMIT), true),
        ("seq at 2^61", Box::new(|s| s.seq = OPEN_LIMIT), true),
        ("head at 2^61", Box::new(|s| s.head = OPEN_LIMIT), true),
        ("head near 2^62", Box::new(|s| s.head = MAX_POSITION - 8), true),
        // The records are of another epoch now: damage.
        ("epoch below 2^61", Box::new(|s| s.epoch = OPEN_LIMIT - 3), true),
        ("epoch below 2^61, the log empty", Box::new(|s| (s.epoch, s.head) = (OPEN_LIMIT - 3, s.synced_end)), false),
        ("seq below 2^61", Box::new(|s| s.seq = OPEN_LIMIT - 5), false),
        ("head below 2^61", Box::new(|s| s.head = OPEN_LIMIT - 3 * 4096), false),
        // The records after the last one claim to be synced: damage.
        ("synced end at u64::MAX", Box::new(|s| s.synced_end = u64::MAX), true),
        ("synced end 0", Box::new(|s| s.synced_end = 0), false),
        ("committed at u64::MAX", Box::new(|s| s.committed = u64::MAX), false),
        (
            "checkpoint at u64::MAX",
            Box::new(|s| (s.checkpoint_lsn, s.checkpoint_generation) = (u64::MAX, u64::MAX)),
            false,
        ),
        ("next segment id at u32::MAX", Box::new(|s| s.next_segment_id = u32::MAX), false),
        ("next segment id 0", Box::new(|s| s.next_segment_id = 0), false),
        ("the segment's id changed", Box::new(|s| s.segments[0].id = s.segments[0].id.wrapping_add(5)), true),
        ("the entry duplicated", Box::new(|s| s.segments.push(s.segments[0].clone())), false),
        (
            "an entry of the same id before it, naming /dev/zero",
            Box::new(|s| {
                let mut e = s.segments[0].clone();
                e.name = "/dev/zero".into();
                s.segments.insert(0, e);
            }),
            true,
        ),
        ("the entry names a relative path", Box::new(|s| s.segments[0].name = "seg".into()), true),
        ("the entry names the root", Box::new(|s| s.segments[0].name = "/".into()), true),
        ("the entry has no identity", Box::new(|s| s.segments[0].device = None), false),
        ("no dictionary", Box::new(|s| s.segments.clear()), true),
    ];
    let ps = page_size();
    for (what, edit, refused) in &edits {
        let img = crafted(&f.log_img, |s| {
            assert_eq!(s.segments.len(), 1);
            assert_eq!(s.segments[0].name, seg_name);
            edit(s)
        });
        for instant in [false, true] {
            f.reset_with(&img);
            let before = f.snapshot();
            let rvm = match open_within(&f.log, opts(instant)) {
                Err(e) => {
                    assert!(matches!(e, Error::Corrupted { .. } | Error::Log(_) | Error::Io { .. }), "{what}: {e:?}");
                    assert!(f.snapshot() == before, "{what} (instant {instant}): a failed open wrote: {e}");
                    assert!(refused, "{what} (instant {instant}): refused: {e}");
                    continue;
                }
                Ok(rvm) => rvm,
            };
            assert!(!refused, "{what} (instant {instant}): opened");
            // Opened: the segment, its pages, one acknowledged flush.
            let mut want = None;
            if let Ok(s) = rvm.open_segment(&f.seg) {
                if let Ok(r) = rvm.map(&s, MapSpec::new(0, seg_len())) {
                    let seen = read_backwards(&r);
                    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                    // SAFETY: this thread alone uses the region; inside it.
                    unsafe { tx.modify_bytes(r.addr() + 3 * ps + 1, b"acknowledged").unwrap() };
                    if tx.commit(CommitMode::Flush).is_ok() {
                        let mut w = seen;
                        w[3 * ps + 1..3 * ps + 13].copy_from_slice(b"acknowledged");
                        want = Some(w);
                    }
                }
            }
            let _ = rvm.wait_for_recovery();
            drop(rvm);
            let Some(want) = want else { continue };
            for again in [false, true] {
                let reopened = match open_within(&f.log, opts(again)) {
                    Ok(r) => r,
                    // The epoch (one per open) or the sequence number
                    // (one per status write) reached the limit: the log
                    // is refused from now on, with nothing written, never
                    // opened without the flush.
                    Err(e @ Error::Corrupted { .. }) if e.to_string().contains("2^61") && what.contains("below") => {
                        eprintln!("{what}: the reopen is refused: {e}");
                        continue;
                    }
                    Err(e) => {
                        panic!("{what} (instant {instant}): a flush was acknowledged, then the reopen failed: {e}")
                    }
                };
                let s = reopened.open_segment(&f.seg).unwrap();
                let r = reopened.map(&s, MapSpec::new(0, seg_len())).unwrap();
                assert!(read_backwards(&r) == want, "{what} (instant {instant}): the acknowledged flush is lost");
            }
        }
    }
}
