//! A careless or hostile user of the core, the loader and the raw heap:
//! handles used where they do not belong, ranges that do not fit, calls
//! racing each other. Each case is a typed error or a correct result, never
//! a panic, a hang, or a lost acknowledged commit.

use rvm::{CommitMode, Error, MapError, MapSpec, Options, RestoreMode, Rvm, TxError};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const PAGE: usize = 4096;

mod common;
use common::{read, setup};

fn is_not_mapped<T: std::fmt::Debug>(r: rvm::Result<T>) -> bool {
    matches!(r, Err(Error::Tx(TxError::RangeNotMapped { .. })))
}

#[test]
fn set_range_outside_across_and_overflowing_regions_is_range_not_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), 4 * PAGE as u64).unwrap();
    let a = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    let b = rvm.map(&seg, MapSpec::new(PAGE as u64, PAGE)).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: every range below is refused before any byte is touched, or
    // lies in a region this thread alone uses.
    unsafe {
        assert!(is_not_mapped(tx.set_range(a.addr() + PAGE - 1, 2)), "past the end of a");
        assert!(is_not_mapped(tx.set_range(a.addr().wrapping_sub(1), 2)), "before a");
        assert!(is_not_mapped(tx.set_range(a.addr(), usize::MAX)), "overflowing length");
        assert!(is_not_mapped(tx.set_range(usize::MAX, 2)), "overflowing address");
        assert!(is_not_mapped(tx.set_range(usize::MAX - 1, 1)), "the top of the address space");
        assert!(is_not_mapped(tx.set_range(0, 8)), "null");
        assert!(is_not_mapped(tx.set_range(a.addr(), 2 * PAGE)), "two regions, even if adjacent");
        // A zero-length range declares nothing.
        tx.set_range(a.addr(), 0).unwrap();
        tx.modify_bytes(b.addr(), b"b").unwrap();
    }
    assert_eq!(a.active_transactions(), 0, "a refused range holds no region");
    assert_eq!(b.active_transactions(), 1);
    rvm.unmap(a).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    assert_eq!(read(&b, 0, 1), b"b");
}

#[test]
fn set_range_in_an_unmapped_region_is_refused_even_with_the_handle_kept() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), PAGE as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    let kept = region.clone();
    rvm.unmap(region).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: refused before any byte is touched.
    assert!(is_not_mapped(unsafe { tx.set_range(kept.addr(), 8) }));
    tx.abort();
    // Unmapping it again, growing it: typed errors, no panic.
    assert!(matches!(rvm.unmap(kept.clone()), Err(Error::Map(MapError::NotMapped { .. }))));
    drop(kept);
    // The range maps again once the last handle is gone.
    rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
}

#[test]
fn unmap_while_a_transaction_holds_ranges_is_busy_then_works() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), PAGE as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: this thread alone uses the region.
    unsafe { tx.modify_bytes(region.addr(), b"x").unwrap() };
    let r = rvm.unmap(region.clone());
    assert!(matches!(r, Err(Error::Map(MapError::Busy { count: 1, .. }))), "{r:?}");
    // The refused unmap changed nothing: the transaction commits.
    tx.commit(CommitMode::Flush).unwrap();
    rvm.unmap(region).unwrap();
    drop((seg, rvm));
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    assert_eq!(read(&region, 0, 1), b"x");
}

#[test]
fn overlapping_and_repeated_maps_are_refused_with_the_first_map_intact() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), 8 * PAGE as u64).unwrap();
    let a = rvm.map(&seg, MapSpec::new(PAGE as u64, 2 * PAGE)).unwrap();
    for (off, len) in [(PAGE, 2 * PAGE), (0, 2 * PAGE), (2 * PAGE, PAGE), (2 * PAGE, 4 * PAGE), (0, 8 * PAGE)] {
        let r = rvm.map(&seg, MapSpec::new(off as u64, len));
        assert!(matches!(r, Err(Error::Map(MapError::AlreadyMapped { .. }))), "[{off}, +{len}): {r:?}");
    }
    // The same segment opened again is the same segment: still refused.
    let again = rvm.open_segment(dir.path().join("seg")).unwrap();
    let r = rvm.map(&again, MapSpec::new(PAGE as u64, PAGE));
    assert!(matches!(r, Err(Error::Map(MapError::AlreadyMapped { .. }))), "{r:?}");
    // A fixed address inside `a` is in use.
    let r = rvm.map(&seg, MapSpec::new(4 * PAGE as u64, PAGE).at(a.addr()));
    assert!(matches!(r, Err(Error::Map(MapError::AddressInUse { .. }))), "{r:?}");
    // Growing into a mapped neighbour is refused.
    let b = rvm.map(&seg, MapSpec::new(4 * PAGE as u64, PAGE)).unwrap();
    let c = rvm.map(&seg, MapSpec::new(3 * PAGE as u64, PAGE).reserve(4 * PAGE)).unwrap();
    let r = rvm.grow_region(&c, 2 * PAGE);
    assert!(matches!(r, Err(Error::Map(MapError::AlreadyMapped { .. }))), "{r:?}");
    // Odd sizes, offsets and addresses.
    let r = rvm.map(&seg, MapSpec::new(6 * PAGE as u64, 0));
    assert!(matches!(r, Err(Error::Map(MapError::EmptyRegion))), "{r:?}");
    let r = rvm.map(&seg, MapSpec::new(6 * PAGE as u64 + 1, PAGE));
    assert!(matches!(r, Err(Error::Map(MapError::NotPageAligned { .. }))), "{r:?}");
    let r = rvm.map(&seg, MapSpec::new(6 * PAGE as u64, PAGE + 1));
    assert!(matches!(r, Err(Error::Map(MapError::NotPageAligned { .. }))), "{r:?}");
    let r = rvm.map(&seg, MapSpec::new(u64::MAX - PAGE as u64 + 1, PAGE));
    assert!(matches!(r, Err(Error::Map(MapError::OutsideSegment { .. }))), "{r:?}");
    let r = rvm.map(&seg, MapSpec::new(6 * PAGE as u64, 4 * PAGE));
    assert!(matches!(r, Err(Error::Map(MapError::OutsideSegment { .. }))), "{r:?}");
    for addr in [usize::MAX - PAGE + 1, 0, 1 << 63, (1 << 47) - PAGE] {
        let r = rvm.map(&seg, MapSpec::new(6 * PAGE as u64, 2 * PAGE).at(addr));
        assert!(
            matches!(
                r,
                Err(Error::Map(MapError::BadAddress { .. } | MapError::AddressInUse { .. } | MapError::System { .. }))
            ),
            "{addr:#x}: {r:?}"
        );
    }
    // None of the refusals left the range claimed.
    let d = rvm.map(&seg, MapSpec::new(6 * PAGE as u64, 2 * PAGE)).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: this thread alone uses the regions.
    unsafe {
        tx.modify_bytes(a.addr(), b"a").unwrap();
        tx.modify_bytes(d.addr(), b"d").unwrap();
    }
    tx.commit(CommitMode::Flush).unwrap();
    drop((b, c));
}

#[test]
fn grow_region_with_bad_lengths_is_typed() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), PAGE as u64).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, PAGE).reserve(4 * PAGE)).unwrap();
    let e = rvm.grow_region(&r, PAGE + 1);
    assert!(matches!(e, Err(Error::Map(MapError::NotPageAligned { .. }))), "{e:?}");
    let e = rvm.grow_region(&r, 2 * PAGE);
    assert!(matches!(e, Err(Error::Map(MapError::OutsideSegment { .. }))), "segment not extended: {e:?}");
    let e = rvm.grow_region(&r, usize::MAX - PAGE + 1);
    assert!(matches!(e, Err(Error::Map(MapError::BeyondReservation { .. }))), "{e:?}");
    rvm.grow_region(&r, 0).unwrap();
    assert_eq!(r.len(), PAGE);
    rvm.extend_segment(&seg, u64::MAX).expect_err("a segment of u64::MAX bytes");
    assert_eq!(seg.len(), PAGE as u64);
    assert_eq!(std::fs::metadata(dir.path().join("seg")).unwrap().len(), PAGE as u64);
    rvm.extend_segment(&seg, 4 * PAGE as u64).unwrap();
    rvm.grow_region(&r, 4 * PAGE).unwrap();
    let e = rvm.grow_region(&r, 5 * PAGE);
    assert!(matches!(e, Err(Error::Map(MapError::BeyondReservation { .. }))), "{e:?}");
}

#[test]
fn handles_of_another_instance_are_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let one = setup(dir.path());
    rvm::create_log(dir.path().join("log2"), 1 << 20).unwrap();
    let two = Rvm::open(dir.path().join("log2"), Options::default()).unwrap();
    let seg = one.create_segment(dir.path().join("seg"), 2 * PAGE as u64).unwrap();
    let region = one.map(&seg, MapSpec::new(0, PAGE).reserve(2 * PAGE)).unwrap();
    let foreign = |r: rvm::Result<()>| matches!(r, Err(Error::Map(MapError::ForeignSegment { .. })));
    assert!(foreign(two.map(&seg, MapSpec::new(PAGE as u64, PAGE)).map(drop)));
    assert!(foreign(two.extend_segment(&seg, 4 * PAGE as u64)));
    assert!(foreign(two.grow_region(&region, 2 * PAGE)));
    assert!(foreign(two.close_segment(seg.clone())));
    assert!(foreign(two.delete_segment(seg.clone())));
    let r = two.unmap(region.clone());
    assert!(matches!(r, Err(Error::Map(MapError::NotMapped { .. }))), "{r:?}");
    // A transaction of `two` cannot declare `one`'s memory.
    let mut tx = two.begin(RestoreMode::Restore).unwrap();
    // SAFETY: refused before any byte is touched.
    assert!(is_not_mapped(unsafe { tx.set_range(region.addr(), 8) }));
    tx.abort();
    // The segment is locked by `one`: `two` cannot open it.
    let r = two.open_segment(dir.path().join("seg"));
    assert!(matches!(r, Err(Error::Locked { .. })), "{r:?}");
    assert!(dir.path().join("seg").exists());
}

#[test]
fn delete_and_close_of_a_mapped_segment_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let path = dir.path().join("seg");
    let seg = rvm.create_segment(&path, PAGE as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: this thread alone uses the region.
    unsafe { tx.modify_bytes(region.addr(), b"kept").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    for r in [rvm.delete_segment(seg.clone()), rvm.close_segment(seg.clone())] {
        assert!(matches!(r, Err(Error::Map(MapError::SegmentInUse { regions: 1, .. }))), "{r:?}");
    }
    assert!(path.exists());
    // Still usable after the refusals.
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: as above.
    unsafe { tx.modify_bytes(region.addr() + 4, b"more").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    rvm.unmap(region).unwrap();
    // Deleted through one handle: the other one is closed.
    let other = seg.clone();
    rvm.delete_segment(seg).unwrap();
    assert!(!path.exists());
    let r = rvm.map(&other, MapSpec::new(0, PAGE));
    assert!(matches!(r, Err(Error::Map(MapError::SegmentClosed { .. }))), "{r:?}");
    let r = rvm.delete_segment(other.clone());
    assert!(r.is_ok() || matches!(r, Err(Error::Io { .. })), "{r:?}");
    rvm.close_segment(other).unwrap();
    // The log does not need the file any more.
    drop(rvm);
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    // And a new segment at that name starts from zeros.
    let seg = rvm.create_segment(&path, PAGE as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    assert_eq!(read(&region, 0, 8), [0; 8]);
}

#[test]
fn creating_a_segment_twice_or_over_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let path = dir.path().join("seg");
    let _seg = rvm.create_segment(&path, PAGE as u64).unwrap();
    assert!(matches!(rvm.create_segment(&path, PAGE as u64), Err(Error::Io { .. })));
    std::fs::write(dir.path().join("other"), b"precious").unwrap();
    assert!(matches!(rvm.create_segment(dir.path().join("other"), PAGE as u64), Err(Error::Io { .. })));
    assert_eq!(std::fs::read(dir.path().join("other")).unwrap(), b"precious");
    // The log as a segment of itself: locked.
    let r = rvm.open_segment(dir.path().join("log"));
    assert!(matches!(r, Err(Error::Locked { .. })), "{r:?}");
    let r = rvm.open_segment(dir.path().join("missing"));
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    let r = rvm.open_segment(dir.path());
    assert!(r.is_err(), "a directory as a segment: {r:?}");
}

#[test]
fn a_segment_of_another_log_is_refused_while_that_log_holds_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg");
    {
        let one = setup(dir.path());
        let seg = one.create_segment(&path, PAGE as u64).unwrap();
        let region = one.map(&seg, MapSpec::new(0, PAGE)).unwrap();
        let mut tx = one.begin(RestoreMode::Restore).unwrap();
        // SAFETY: this thread alone uses the region.
        unsafe { tx.modify_bytes(region.addr(), b"one").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
    }
    rvm::create_log(dir.path().join("log2"), 1 << 20).unwrap();
    let two = Rvm::open(dir.path().join("log2"), Options::default()).unwrap();
    let r = two.open_segment(&path);
    assert!(matches!(r, Err(Error::Log(rvm::LogError::SegmentInOtherLog { .. }))), "{r:?}");
    drop(two);
    // Through its own log the commit is there.
    let one = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = one.open_segment(&path).unwrap();
    let region = one.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    assert_eq!(read(&region, 0, 3), b"one");
}

/// Commits on several threads while others truncate, checkpoint and flush;
/// every flush-committed value is there after a reopen.
#[test]
fn truncate_checkpoint_and_flush_race_commits_and_lose_nothing() {
    for instant in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
        let opts = Options { instant_recovery: instant, ..Options::default() };
        let threads = 3;
        {
            let rvm = Rvm::open(dir.path().join("log"), opts.clone()).unwrap();
            let seg = rvm.create_segment(dir.path().join("seg"), (threads * PAGE) as u64).unwrap();
            let region = rvm.map(&seg, MapSpec::new(0, threads * PAGE)).unwrap();
            // A first round, left in the log for recovery.
            let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
            // SAFETY: no other thread runs yet.
            unsafe { tx.modify_bytes(region.addr(), &[1; 64]).unwrap() };
            tx.commit(CommitMode::Flush).unwrap();
            // Closing leaves the records in the log: the next open
            // recovers them (in the background with instant recovery).
        }
        let rvm = Arc::new(Rvm::open(dir.path().join("log"), opts.clone()).unwrap());
        let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, threads * PAGE)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for t in 0..threads {
            let (rvm, region) = (rvm.clone(), region.clone());
            workers.push(std::thread::spawn(move || {
                let mut last = 0u64;
                for i in 1..=200u64 {
                    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
                    let at = region.addr() + t * PAGE + 512;
                    // SAFETY: each thread stores into its own page only.
                    unsafe { tx.modify_bytes(at, &i.to_le_bytes()).unwrap() };
                    let mode = if i % 3 == 0 { CommitMode::Flush } else { CommitMode::NoFlush };
                    tx.commit(mode).unwrap();
                    if mode == CommitMode::Flush {
                        last = i;
                    }
                }
                last
            }));
        }
        let chaos = {
            let (rvm, stop) = (rvm.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    match n % 4 {
                        0 => rvm.truncate().unwrap(),
                        1 => drop(rvm.checkpoint().unwrap()),
                        2 => rvm.flush().unwrap(),
                        _ => {
                            if rvm.checkpoint_start().unwrap() {
                                rvm.checkpoint_step(1).unwrap();
                                rvm.checkpoint_abandon().unwrap();
                            }
                        }
                    }
                    n += 1;
                }
            })
        };
        let lasts: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Release);
        chaos.join().unwrap();
        drop(region);
        drop(seg);
        // A reopen sees every flush-committed value (the last one is a
        // flush: 200 % 3 != 0, so the last flush is 198).
        drop(Arc::try_unwrap(rvm).unwrap());
        let rvm = Rvm::open(dir.path().join("log"), opts).unwrap();
        let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, threads * PAGE)).unwrap();
        for (t, last) in lasts.iter().enumerate() {
            let got = u64::from_le_bytes(read(&region, t * PAGE + 512, 8).try_into().unwrap());
            assert!(got >= *last, "instant {instant}, thread {t}: {got} < {last}");
        }
        assert_eq!(read(&region, 0, 64), [1; 64], "instant {instant}: the recovered first commit");
    }
}

/// Dropping the instance while other threads still commit: they finish
/// (they hold clones of it), and every flush commit is found again.
#[test]
fn dropping_the_last_handle_while_threads_commit_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = Arc::new(setup(dir.path()));
    let seg = rvm.create_segment(dir.path().join("seg"), 2 * PAGE as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 2 * PAGE)).unwrap();
    let mut workers = Vec::new();
    for t in 0..2 {
        let (rvm, region) = (rvm.clone(), region.clone());
        workers.push(std::thread::spawn(move || {
            for i in 1..=100u64 {
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                // SAFETY: each thread stores into its own page only.
                unsafe { tx.modify_bytes(region.addr() + t * PAGE, &i.to_le_bytes()).unwrap() };
                tx.commit(CommitMode::Flush).unwrap();
            }
            drop(region);
            drop(rvm);
        }));
    }
    drop((region, seg, rvm));
    for w in workers {
        w.join().unwrap();
    }
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 2 * PAGE)).unwrap();
    for t in 0..2 {
        assert_eq!(read(&region, t * PAGE, 8), 100u64.to_le_bytes());
    }
}

/// `Placement::Fixed` at an address a region of this instance uses, or
/// overlapping its reservation.
#[test]
fn fixed_placement_inside_another_regions_reservation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), 8 * PAGE as u64).unwrap();
    let a = rvm.map(&seg, MapSpec::new(0, PAGE).reserve(4 * PAGE)).unwrap();
    let r = rvm.map(&seg, MapSpec::new(4 * PAGE as u64, PAGE).at(a.addr() + 2 * PAGE));
    assert!(matches!(r, Err(Error::Map(MapError::AddressInUse { .. }))), "{r:?}");
    rvm.extend_segment(&seg, 8 * PAGE as u64).unwrap();
    rvm.grow_region(&a, 4 * PAGE).unwrap();
}

/// The log's segment dictionary kept an entry for every segment ever
/// opened, closed and deleted ones too, and never dropped one: a program
/// that makes and deletes segments hit `SegmentDictionaryFull` after a few
/// hundred (long names) to a few thousand, for good (no truncation or
/// reopen removed them). Closing or deleting a segment now removes its
/// entry.
#[test]
fn creating_and_deleting_segments_never_fills_the_dictionary() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    // 200-byte names: about 290 entries fill the dictionary.
    let name = |i: usize| dir.path().join(format!("{i:05}-{}", "x".repeat(194)));
    let keep = rvm.create_segment(dir.path().join("kept"), PAGE as u64).unwrap();
    let kept = rvm.map(&keep, MapSpec::new(0, PAGE)).unwrap();
    for i in 0..400 {
        let seg = rvm.create_segment(name(i), PAGE as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: this thread alone uses the regions.
        unsafe {
            tx.modify_bytes(region.addr(), &(i as u64).to_le_bytes()).unwrap();
            tx.modify_bytes(kept.addr(), &(i as u64).to_le_bytes()).unwrap();
        }
        tx.commit(CommitMode::NoFlush).unwrap();
        rvm.unmap(region).unwrap();
        if i % 2 == 0 {
            rvm.delete_segment(seg).unwrap();
        } else {
            // Closed, not deleted: its entry goes too, its data stays.
            rvm.close_segment(seg).unwrap();
        }
    }
    rvm.flush().unwrap();
    drop((kept, keep, rvm));
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let keep = rvm.open_segment(dir.path().join("kept")).unwrap();
    assert_eq!(read(&rvm.map(&keep, MapSpec::new(0, PAGE)).unwrap(), 0, 8), 399u64.to_le_bytes());
    let seg = rvm.open_segment(name(399)).unwrap();
    assert_eq!(read(&rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap(), 0, 8), 399u64.to_le_bytes());
    assert!(!name(398).exists());
}

/// A log whose records must go to a segment, told to accept something that
/// is no segment in its place (`/dev/null`, a FIFO, a folder, the log
/// itself): refused, nothing written, and the real segment still recovers.
#[test]
fn accepting_something_that_is_no_segment_is_refused() {
    use rustix::fs::{FileType, Mode, CWD};
    let dir = tempfile::tempdir().unwrap();
    let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
    {
        let rvm = setup(dir.path());
        let s = rvm.create_segment(&seg, PAGE as u64).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, PAGE)).unwrap();
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        // SAFETY: this thread alone uses the region.
        unsafe { tx.modify_bytes(r.addr(), b"acknowledged").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
    }
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
    let log_bytes = std::fs::read(&log).unwrap();
    let canonical = seg.canonicalize().unwrap();
    for instead in [Path::new("/dev/null"), Path::new("/dev/zero"), &fifo, dir.path(), &log] {
        for instant in [false, true] {
            let opts = Options { instant_recovery: instant, ..Options::default() }.accept_segment(&canonical, instead);
            let r = Rvm::open(&log, opts);
            assert!(
                matches!(r, Err(Error::Log(_) | Error::Locked { .. } | Error::Io { .. })),
                "{} accepted (instant {instant}): {r:?}",
                instead.display()
            );
            assert!(std::fs::read(&log).unwrap() == log_bytes, "{}: the refusal wrote the log", instead.display());
        }
    }
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    let s = rvm.open_segment(&seg).unwrap();
    assert_eq!(read(&rvm.map(&s, MapSpec::new(0, PAGE)).unwrap(), 0, 12), b"acknowledged");
}

/// Segments opened and never closed (the instance dropped instead) kept
/// their dictionary entries for good: run after run, new segments filled
/// the dictionary, and then no new segment could ever be opened. When the
/// dictionary is full, the entries of segments the instance does not have
/// open now go (no live record names them after recovery).
#[test]
fn segments_never_closed_do_not_fill_the_dictionary_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 4 << 20).unwrap();
    let name = |i: usize| dir.path().join(format!("{i:05}-{}", "y".repeat(194)));
    for run in 0..4 {
        let opts = Options { instant_recovery: run % 2 == 1, ..Options::default() };
        let rvm = Rvm::open(dir.path().join("log"), opts).unwrap();
        for i in run * 100..(run + 1) * 100 {
            let seg = rvm.create_segment(name(i), PAGE as u64).unwrap();
            let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: this thread alone uses the region.
            unsafe { tx.modify_bytes(region.addr(), &(i as u64).to_le_bytes()).unwrap() };
            tx.commit(if i % 10 == 9 { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
        }
        // Dropped, not closed: the records stay in the log for recovery.
    }
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    for i in (0..10).chain(390..400) {
        let seg = rvm.open_segment(name(i)).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
        assert_eq!(read(&region, 0, 8), (i as u64).to_le_bytes(), "segment {i}");
    }
}

/// A careless program: random calls of the whole segment and region API
/// on three segments (open, create, map in every copy mode, unmap, extend,
/// grow, transactions committed either way or aborted, truncate,
/// checkpoint, flush, close, delete, reopen with either recovery), many of
/// them refused. Refusals must be the typed errors of misuse, and every
/// read of a region and every reopen must show exactly the committed
/// bytes.
#[test]
fn random_careless_calls_keep_the_committed_state() {
    use rvm::CopyMode;
    use std::collections::HashMap;
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }
    let seed = std::env::var("RVM_CARELESS_SEED").map_or(0x5eed_1234_u64, |s| s.parse().unwrap());
    let steps: usize = std::env::var("RVM_CARELESS_STEPS").map_or(1500, |s| s.parse().unwrap());
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    rvm::create_log(&log, 1 << 20).unwrap();
    let path = |k: usize| dir.path().join(format!("seg{k}"));
    // The committed bytes of each segment that exists.
    let mut model: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut rvm = Some(Rvm::open(&log, Options::default()).unwrap());
    let mut segs: HashMap<usize, rvm::Segment> = HashMap::new();
    let mut regions: Vec<(usize, rvm::Region)> = Vec::new();
    let allowed = |e: &Error| {
        matches!(
            e,
            Error::Map(
                MapError::AlreadyMapped { .. }
                    | MapError::SegmentInUse { .. }
                    | MapError::SegmentClosed { .. }
                    | MapError::BeyondReservation { .. }
                    | MapError::OutsideSegment { .. }
                    | MapError::NotMapped { .. }
            )
        )
    };
    let check = |r: &rvm::Region, k: usize, model: &HashMap<usize, Vec<u8>>, step: usize| {
        let m = &model[&k];
        let off = r.segment_offset() as usize;
        let got = read(r, 0, r.len());
        assert!(got[..] == m[off..off + r.len()], "step {step}: seg{k} [{off:#x}, +{:#x}) differs", r.len());
    };
    for step in 0..steps {
        let inst = rvm.as_ref().unwrap();
        let k = rng.below(3) as usize;
        match rng.below(16) {
            0 | 1 => {
                // Open, or create when missing.
                let r = match model.entry(k) {
                    std::collections::hash_map::Entry::Occupied(_) => inst.open_segment(path(k)),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let len = PAGE as u64 * (1 + rng.below(4));
                        let r = inst.create_segment(path(k), len);
                        if r.is_ok() {
                            v.insert(vec![0; len as usize]);
                        }
                        r
                    }
                };
                segs.insert(k, r.unwrap_or_else(|e| panic!("step {step}: opening seg{k}: {e}")));
            }
            2 | 3 => {
                if let Some(seg) = segs.get(&k) {
                    let pages = seg.len() as usize / PAGE;
                    let first = rng.below(pages as u64) as usize;
                    let n = 1 + rng.below((pages - first) as u64) as usize;
                    let copy = [CopyMode::OnDemand, CopyMode::OnMap][rng.below(2) as usize];
                    let spec = MapSpec::new((first * PAGE) as u64, n * PAGE).copy(copy).reserve(16 * PAGE);
                    match inst.map(seg, spec) {
                        Ok(r) => {
                            check(&r, k, &model, step);
                            regions.push((k, r));
                        }
                        Err(e) if allowed(&e) => {}
                        Err(e) => panic!("step {step}: map seg{k}: {e}"),
                    }
                }
            }
            4 => {
                if !regions.is_empty() {
                    let (_, r) = regions.swap_remove(rng.below(regions.len() as u64) as usize);
                    inst.unmap(r).unwrap_or_else(|e| panic!("step {step}: unmap: {e}"));
                }
            }
            5 => {
                if !regions.is_empty() {
                    let i = rng.below(regions.len() as u64) as usize;
                    let (k, r) = (regions[i].0, regions[i].1.clone());
                    let seg = r.segment();
                    let new_len = r.len() + PAGE * (1 + rng.below(2) as usize);
                    let end = r.segment_offset() + new_len as u64;
                    if end > seg.len() && rng.below(2) == 0 {
                        inst.extend_segment(&seg, end).unwrap();
                        model.get_mut(&k).unwrap().resize(end as usize, 0);
                    }
                    match inst.grow_region(&r, new_len) {
                        Ok(()) => check(&r, k, &model, step),
                        Err(e) if allowed(&e) => {}
                        Err(e) => panic!("step {step}: grow seg{k}: {e}"),
                    }
                }
            }
            6..=10 => {
                if !regions.is_empty() {
                    let mut tx = inst.begin(RestoreMode::Restore).unwrap();
                    let mut changes = Vec::new();
                    for _ in 0..1 + rng.below(3) {
                        let (k, r) = &regions[rng.below(regions.len() as u64) as usize];
                        let len = 1 + rng.below(64) as usize;
                        let at = rng.below((r.len() - len) as u64) as usize;
                        let byte = rng.below(255) as u8 + 1;
                        let bytes = vec![byte; len];
                        // SAFETY: this thread alone uses the regions; inside one.
                        unsafe { tx.modify_bytes(r.addr() + at, &bytes).unwrap() };
                        changes.push((*k, r.segment_offset() as usize + at, bytes));
                    }
                    match rng.below(3) {
                        0 => tx.abort(),
                        n => {
                            tx.commit(if n == 1 { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
                            for (k, at, bytes) in changes {
                                model.get_mut(&k).unwrap()[at..at + bytes.len()].copy_from_slice(&bytes);
                            }
                        }
                    }
                    let (k, r) = &regions[rng.below(regions.len() as u64) as usize];
                    check(r, *k, &model, step);
                }
            }
            11 => match rng.below(3) {
                0 => inst.truncate().unwrap(),
                1 => drop(inst.checkpoint().unwrap()),
                _ => inst.flush().unwrap(),
            },
            12 | 13 => {
                if let Some(seg) = segs.get(&k).cloned() {
                    let delete = rng.below(2) == 0;
                    let r = if delete { inst.delete_segment(seg) } else { inst.close_segment(seg) };
                    match r {
                        Ok(()) => {
                            segs.remove(&k);
                            if delete {
                                model.remove(&k);
                            }
                        }
                        Err(e) if allowed(&e) => {}
                        Err(e) => panic!("step {step}: close/delete seg{k}: {e}"),
                    }
                }
            }
            _ => {
                // Everything dropped, the log reopened.
                regions.clear();
                segs.clear();
                drop(rvm.take());
                let instant = rng.below(2) == 0;
                rvm = Some(Rvm::open(&log, Options { instant_recovery: instant, ..Options::default() }).unwrap());
                let inst = rvm.as_ref().unwrap();
                for (&k, m) in &model {
                    let seg = inst.open_segment(path(k)).unwrap();
                    assert_eq!(seg.len() as usize, m.len(), "step {step}: seg{k}'s length");
                    let r = inst.map(&seg, MapSpec::new(0, m.len())).unwrap();
                    check(&r, k, &model, step);
                    inst.unmap(r).unwrap();
                    segs.insert(k, seg);
                }
            }
        }
    }
}

/// A fixed placement over memory the program uses (its heap, its stack,
/// its code) is refused and leaves that memory alone.
#[test]
fn fixed_placement_over_the_programs_own_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), 4 * PAGE as u64).unwrap();
    let boxed = vec![0xabu8; 64 * PAGE];
    let on_stack = [0x5au8; 64];
    let page_of = |p: usize| p & !(PAGE - 1);
    let code = page_of(fixed_placement_over_the_programs_own_memory_is_refused as fn() as usize);
    for addr in [page_of(boxed.as_ptr() as usize + PAGE), page_of(on_stack.as_ptr() as usize), code] {
        let r = rvm.map(&seg, MapSpec::new(0, PAGE).at(addr));
        assert!(matches!(r, Err(Error::Map(MapError::AddressInUse { .. }))), "{addr:#x}: {r:?}");
        let r = rvm.map(&seg, MapSpec::new(0, PAGE).at(addr).copy(rvm::CopyMode::OnMap).reserve(4 * PAGE));
        assert!(matches!(r, Err(Error::Map(MapError::AddressInUse { .. }))), "{addr:#x} reserved: {r:?}");
    }
    assert!(boxed.iter().all(|&b| b == 0xab));
    assert!(on_stack.iter().all(|&b| b == 0x5a));
    rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
}

/// A full dictionary while instant recovery still applies the log: a new
/// segment waits for the apply (after which the entries of segments not
/// open can go) instead of failing with `SegmentDictionaryFull`.
#[test]
fn a_full_dictionary_during_instant_recovery_waits_for_the_apply() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 4 << 20).unwrap();
    let name = |i: usize| dir.path().join(format!("{i:05}-{}", "z".repeat(194)));
    let mut made = 0;
    {
        let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
        // Fill the dictionary, each segment with a commit left in the log.
        loop {
            let seg = match rvm.create_segment(name(made), PAGE as u64) {
                Ok(seg) => seg,
                Err(Error::Log(rvm::LogError::SegmentDictionaryFull { .. })) => break,
                Err(e) => panic!("{e}"),
            };
            let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: this thread alone uses the region.
            unsafe { tx.modify_bytes(region.addr(), &(made as u64 + 1).to_le_bytes()).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
            made += 1;
        }
        assert!(!name(made).exists(), "a refused creation leaves no file");
    }
    let rvm = Rvm::open(dir.path().join("log"), Options { instant_recovery: true, ..Options::default() }).unwrap();
    let seg = rvm.create_segment(name(made), PAGE as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    assert_eq!(read(&region, 0, 8), [0; 8]);
    for i in [0, made / 2, made - 1] {
        let seg = rvm.open_segment(name(i)).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
        assert_eq!(read(&region, 0, 8), (i as u64 + 1).to_le_bytes(), "segment {i}");
    }
}
