//! No-copy regions and the generation checkpoint ("No silent loss").
//!
//! A `CopyMode::NoCopy` region starts as zero memory: the bytes of the
//! segment it maps are never read. A log replay writes only the committed
//! bytes, so the segment keeps the old values of every byte no transaction
//! wrote. A checkpoint writes whole pages; these tests check that it writes
//! exactly what a replay would: an explicit checkpoint, one driven step by
//! step around transactions in flight, the background checkpoint, and a
//! checkpoint interrupted by a crash of the simulated disk and recovered.

use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LOG: &str = "log";
const SEG: &str = "seg";
/// Pages of the segment.
const SEG_PAGES: usize = 4;
/// The no-copy region maps pages `REGION_PAGE..REGION_PAGE + REGION_PAGES`.
const REGION_PAGE: usize = 1;
const REGION_PAGES: usize = 2;

/// The segment's bytes before any transaction: never zero, so a page
/// written from zero memory shows.
fn pattern() -> Vec<u8> {
    (0..SEG_PAGES * page_size()).map(|i| (i % 251) as u8 + 1).collect()
}

/// Segment offset of region offset `off`.
fn seg_off(off: usize) -> usize {
    REGION_PAGE * page_size() + off
}

fn spec() -> MapSpec {
    MapSpec::new((REGION_PAGE * page_size()) as u64, REGION_PAGES * page_size()).copy(CopyMode::NoCopy)
}

/// `img` with `data` at region offset `off`.
fn with(mut img: Vec<u8>, off: usize, data: &[u8]) -> Vec<u8> {
    img[seg_off(off)..seg_off(off) + data.len()].copy_from_slice(data);
    img
}

/// Commits `data` at region offset `off` in one transaction.
fn commit(rvm: &Rvm, region: &Region, off: usize, data: &[u8], mode: CommitMode) {
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: the range lies inside the region; this thread alone uses it.
    unsafe { tx.modify_bytes(region.addr() + off, data).unwrap() };
    tx.commit(mode).unwrap();
}

/// Fails with the first differing byte (a segment image is too long to print).
#[track_caller]
fn assert_image(want: &[u8], got: &[u8], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: length");
    if let Some(i) = want.iter().zip(got).position(|(a, b)| a != b) {
        let ps = page_size();
        let differ = want.iter().zip(got).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: byte {i} (page {}, offset {}) is {:#04x}, want {:#04x} ({differ} bytes differ)",
            i / ps,
            i % ps,
            got[i],
            want[i]
        );
    }
}

/// Options for deterministic runs: no background thread, I/O in program order.
fn quiet() -> Options {
    Options { truncate_threshold: None, write_behind: false, checkpoint_rate: None, ..Options::default() }
}

// ---------------------------------------------------------------------------
// Real files: a checkpoint and a replay leave identical segments.

/// Maps the no-copy region over a segment file of [`pattern`], commits a
/// small range in one page, frees the log with `reclaim` and returns the
/// segment file's bytes.
fn on_files(reclaim: impl FnOnce(&Rvm)) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join(LOG);
    let seg_path = dir.path().join(SEG);
    create_log(&log, 1 << 20).unwrap();
    std::fs::write(&seg_path, pattern()).unwrap();
    let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
    let seg = rvm.open_segment(&seg_path).unwrap();
    let region = rvm.map(&seg, spec()).unwrap();
    commit(&rvm, &region, 100, b"sixteen bytes!!!", CommitMode::NoFlush);
    reclaim(&rvm);
    assert_eq!(rvm.query().log_used, 0, "the log is free");
    let img = std::fs::read(&seg_path).unwrap();
    drop(region);
    drop(seg);
    rvm.close().unwrap();
    img
}

#[test]
fn checkpoint_writes_what_a_replay_writes() {
    let want = with(pattern(), 100, b"sixteen bytes!!!");
    let replayed = on_files(|rvm| rvm.truncate().unwrap());
    assert_image(&want, &replayed, "segment after a replay");
    let checkpointed = on_files(|rvm| {
        let report = rvm.checkpoint().unwrap();
        assert_eq!(report.pages, 1, "one dirty page: {report:?}");
    });
    assert_image(&replayed, &checkpointed, "segment after a checkpoint (against the replay's)");
}

#[test]
fn background_checkpoint_keeps_unwritten_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join(LOG);
    let seg_path = dir.path().join(SEG);
    create_log(&log, 1 << 20).unwrap();
    std::fs::write(&seg_path, pattern()).unwrap();
    // A faithful log (no coalescing), so commits to one word fill it and
    // the background thread checkpoints. Small batches: the pending limit
    // counts data bytes, and frames of 8-byte commits are many times larger.
    let opts = Options {
        coalesce: false,
        pending_limit: 4096,
        truncate_threshold: Some(0.25),
        reclaim: Reclaim::Checkpoint,
        checkpoint_rate: None,
        ..Options::default()
    };
    let rvm = Rvm::open(&log, opts).unwrap();
    let seg = rvm.open_segment(&seg_path).unwrap();
    let region = rvm.map(&seg, spec()).unwrap();
    // One commit on the region's second page; then commits to a word of
    // the first page fill the log. (The background freeze is likely to
    // catch one of those in flight, and such pages are rebuilt from the
    // log anyway: the second page is the one the sweep takes from memory.)
    let hello = (page_size() + 40, b"hello!!!");
    commit(&rvm, &region, hello.0, hello.1, CommitMode::NoFlush);
    let off = 200;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0u64;
    while rvm.stats().checkpoints == 0 {
        assert!(Instant::now() < deadline, "no background checkpoint after {n} commits");
        n += 1;
        commit(&rvm, &region, off, &n.to_le_bytes(), CommitMode::NoFlush);
    }
    while rvm.query().checkpointing {
        assert!(Instant::now() < deadline, "the background checkpoint does not end");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The checkpoint wrote both pages: every byte but the words is the old one.
    let img = std::fs::read(&seg_path).unwrap();
    let pat = pattern();
    // (The words hold some committed value each: taken from the image.)
    let mut want = pat.clone();
    for w in [seg_off(off)..seg_off(off) + 8, seg_off(hello.0)..seg_off(hello.0) + 8] {
        want[w.clone()].copy_from_slice(&img[w]);
    }
    assert_image(&want, &img, "segment after a background checkpoint (outside the words)");
    rvm.truncate().unwrap();
    let img = std::fs::read(&seg_path).unwrap();
    let want = with(with(pat, off, &n.to_le_bytes()), hello.0, hello.1);
    assert_image(&want, &img, "segment after the final replay");
    drop(region);
    drop(seg);
    rvm.close().unwrap();
}

// ---------------------------------------------------------------------------
// The simulated disk: step-driven checkpoints and crashes.

struct Sim {
    disk: SimDisk,
    vfs: Arc<dyn Vfs>,
    rvm: Rvm,
    seg: Segment,
    region: Region,
}

/// A log and a segment of [`pattern`] on a fresh simulated disk, the region
/// mapped with `copy`.
fn sim(copy: CopyMode) -> Sim {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new(LOG), 1 << 20).unwrap();
    disk.set_durable_image(SEG, pattern());
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), quiet()).unwrap();
    let seg = rvm.open_segment(SEG).unwrap();
    let region = rvm.map(&seg, spec().copy(copy)).unwrap();
    Sim { disk, vfs, rvm, seg, region }
}

/// Transactions in flight at the freeze, stores after it (through the
/// write barrier) and a no-restore abort, on both pages of the region: the
/// checkpoint writes the state as of its freeze, a replay then the rest,
/// and the unwritten bytes keep their old values throughout.
#[test]
fn step_driven_checkpoint_with_transactions_around_the_freeze() {
    let ps = page_size();
    let s = sim(CopyMode::NoCopy);
    let (rvm, region) = (&s.rvm, &s.region);
    commit(rvm, region, 100, b"AAAAAAAA", CommitMode::NoFlush);
    commit(rvm, region, ps + 50, b"aaaaaaaa", CommitMode::Flush);
    // A no-restore abort leaves its bytes in memory (never committed).
    {
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: inside the region; this thread alone uses it.
        unsafe { tx.modify_bytes(region.addr() + 400, b"GARBAGE!").unwrap() };
        tx.abort();
    }
    // In flight at the freeze.
    let mut b = rvm.begin(RestoreMode::NoRestore).unwrap();
    // SAFETY: as above.
    unsafe { b.modify_bytes(region.addr() + 300, b"BBBBBBBB").unwrap() };
    assert!(rvm.checkpoint_start().unwrap());
    b.commit(CommitMode::NoFlush).unwrap();
    // After the freeze, on the other page (the barrier's business).
    commit(rvm, region, ps + 60, b"cccccccc", CommitMode::NoFlush);
    let at_freeze = with(with(pattern(), 100, b"AAAAAAAA"), ps + 50, b"aaaaaaaa");
    // Whatever the sweep wrote so far holds committed bytes as of the freeze.
    rvm.checkpoint_step(1).unwrap();
    assert_image(&at_freeze, &s.disk.live_image(SEG).unwrap(), "segment during the sweep");
    let report = rvm.checkpoint_finish().unwrap().expect("the checkpoint was running");
    assert_eq!(report.pages, 2, "both pages written once: {report:?}");
    assert_image(&at_freeze, &s.disk.durable_image(SEG).unwrap(), "segment after the checkpoint");
    rvm.truncate().unwrap();
    let all = with(with(at_freeze, 300, b"BBBBBBBB"), ps + 60, b"cccccccc");
    assert_image(&all, &s.disk.durable_image(SEG).unwrap(), "segment after the replay");
    // A second checkpoint, with nothing in the log before it but new commits.
    commit(rvm, region, 8, b"dd", CommitMode::NoFlush);
    rvm.checkpoint().unwrap();
    assert_image(&with(all, 8, b"dd"), &s.disk.durable_image(SEG).unwrap(), "segment after a second checkpoint");
}

/// The common path is unchanged: a region whose memory holds the segment's
/// bytes is swept from memory, nothing rebuilt from the log.
#[test]
fn copied_regions_are_still_swept_from_memory() {
    let s = sim(CopyMode::OnMap);
    commit(&s.rvm, &s.region, 100, b"sixteen bytes!!!", CommitMode::NoFlush);
    let report = s.rvm.checkpoint().unwrap();
    assert_eq!((report.pages, report.rebuilt), (1, 0), "{report:?}");
    assert_image(&with(pattern(), 100, b"sixteen bytes!!!"), &s.disk.durable_image(SEG).unwrap(), "segment");
}

/// A checkpoint whose page writes are not synced when the disk crashes
/// (all lost, or a random subset kept, the last one possibly torn): the
/// segment holds only old or committed bytes, and recovery ends in the
/// image a replay gives.
#[test]
fn checkpoint_interrupted_by_a_crash_recovers_to_the_replay_image() {
    let data = b"sixteen bytes!!!";
    let want = with(pattern(), 100, data);
    let pat = pattern();
    let mut modes: Vec<CrashMode> =
        (0..8).map(|seed| CrashMode::KeepRandomSubset { seed, tear_last: seed % 2 == 1 }).collect();
    modes.push(CrashMode::LoseUnsynced);
    for mode in modes {
        let s = sim(CopyMode::NoCopy);
        commit(&s.rvm, &s.region, 100, data, CommitMode::Flush);
        assert!(s.rvm.checkpoint_start().unwrap());
        s.rvm.checkpoint_step(usize::MAX).unwrap();
        // The page is written, not synced; the log still covers it.
        let live = s.disk.live_image(SEG).unwrap();
        s.disk.crash(mode);
        let Sim { disk, vfs, rvm, seg, region } = s;
        drop(region);
        drop(seg);
        drop(rvm); // its handles are dead
        let before = disk.durable_image(SEG).unwrap();
        if let Some(i) = (0..before.len()).find(|&i| before[i] != pat[i] && before[i] != want[i]) {
            panic!(
                "{mode:?}: before recovery byte {i} of the segment is {:#04x}: neither old nor committed",
                before[i]
            );
        }
        let rvm = Rvm::open_with(vfs, Path::new(LOG), quiet()).unwrap();
        assert_image(&want, &disk.durable_image(SEG).unwrap(), &format!("{mode:?}: segment after recovery"));
        let seg = rvm.open_segment(SEG).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, SEG_PAGES * page_size()).copy(CopyMode::OnMap)).unwrap();
        let mut mem = vec![0u8; region.len()];
        // SAFETY: nothing stores into the region while the test reads it.
        unsafe { region.read(0, &mut mem) }.unwrap();
        assert_image(&want, &mem, &format!("{mode:?}: mapped after recovery"));
        assert_image(&want, &live, &format!("{mode:?}: segment written by the sweep before the crash"));
    }
}

/// More dirty no-copy pages than the checkpoint rebuilds at once (16 MiB
/// of images): every one is written right, in several scans of the log.
#[test]
fn many_dirty_pages_are_rebuilt_in_batches() {
    let ps = page_size();
    let pages = (16 << 20) / ps + 100;
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new(LOG), 4 << 20).unwrap();
    let old: Vec<u8> = (0..pages * ps).map(|i| (i % 253) as u8 + 1).collect();
    disk.set_durable_image(SEG, old.clone());
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), quiet()).unwrap();
    let seg = rvm.open_segment(SEG).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, pages * ps).copy(CopyMode::NoCopy)).unwrap();
    let mut want = old;
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    for p in 0..pages {
        let at = p * ps + p * 8 % ps;
        // SAFETY: inside the region; this thread alone uses it.
        unsafe { tx.modify_bytes(region.addr() + at, &[0, 0xee]).unwrap() };
        want[at..at + 2].copy_from_slice(&[0, 0xee]);
    }
    tx.commit(CommitMode::NoFlush).unwrap();
    let report = rvm.checkpoint().unwrap();
    assert_eq!((report.pages, report.rebuilt), (pages as u64, pages as u64), "{report:?}");
    assert_image(&want, &disk.durable_image(SEG).unwrap(), "segment after the checkpoint");
}
