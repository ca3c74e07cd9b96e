//! Files and devices as the library leaves them: new logs and segments are
//! private (mode 0600), a log or segment already open in this process is
//! refused with a clear [`Error::Locked`] (another process is covered by
//! `tests/kill9.rs`), creating over an existing file never clobbers it, and
//! recovery reports the bytes of an unfinished tail it discards.

use rvm::log::format::FrameDefect;
use rvm::log::inspect::{self, FrameBody};
use rvm::testing::SimDisk;
use rvm::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn new_logs_and_segments_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("private.log");
    create_log(&log, 1 << 20).unwrap();
    assert_eq!(mode(&log), 0o600, "a new log must be readable and writable by its owner only");
    let rvm = Rvm::open(&log, opts()).unwrap();
    let seg = dir.path().join("private.seg");
    rvm.create_segment(&seg, 1 << 16).unwrap();
    assert_eq!(mode(&seg), 0o600, "a new segment must be readable and writable by its owner only");
    // Opening an existing file leaves its mode alone.
    let shared = dir.path().join("shared.seg");
    std::fs::write(&shared, vec![0u8; 1 << 16]).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
    rvm.open_segment(&shared).unwrap();
    assert_eq!(mode(&shared), 0o640);
}

/// Asserts `r` is `Error::Locked` naming `path`, with a message that says so.
#[track_caller]
fn assert_locked<T: std::fmt::Debug>(r: Result<T>, path: &Path, what: &str) {
    match r {
        Err(e @ Error::Locked { .. }) => {
            let Error::Locked { path: p } = &e else { unreachable!() };
            assert_eq!(p.file_name(), path.file_name(), "{what}: Locked names {}", p.display());
            let msg = e.to_string();
            assert!(
                msg.contains(&*path.file_name().unwrap().to_string_lossy()) && msg.contains("already in use"),
                "{what}: unclear message {msg:?}"
            );
        }
        other => panic!("{what}: expected Error::Locked, got {other:?}"),
    }
}

#[test]
fn a_second_open_in_this_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (log, other_log, seg) = (dir.path().join("a.log"), dir.path().join("b.log"), dir.path().join("a.seg"));
    create_log(&log, 1 << 20).unwrap();
    create_log(&other_log, 1 << 20).unwrap();
    let rvm = Rvm::open(&log, opts()).unwrap();
    let s = rvm.create_segment(&seg, 1 << 16).unwrap();
    let region = rvm.map(&s, MapSpec::new(0, 1 << 16)).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: single-threaded; nothing else touches the region.
    unsafe { tx.modify_bytes(region.addr(), b"first instance").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();

    // The log: a second instance, recovery and inspection are all refused.
    assert_locked(Rvm::open(&log, opts()), &log, "Rvm::open of an open log");
    assert_locked(recover_log(&FileVfs, &log, &Options::default()), &log, "recover_log of an open log");
    assert_locked(inspect::inspect(&FileVfs, &log), &log, "inspecting an open log");
    // Creating a log over it fails without touching it.
    let before = std::fs::read(&log).unwrap();
    assert!(create_log(&log, 1 << 20).is_err(), "create_log over an existing log");
    assert_eq!(std::fs::read(&log).unwrap(), before, "create_log changed an existing log");

    // The segment, through another instance: refused, and not clobbered.
    {
        let other = Rvm::open(&other_log, opts()).unwrap();
        assert_locked(other.open_segment(&seg), &seg, "open_segment of a segment another instance holds");
        match other.create_segment(&seg, 1 << 12) {
            Err(Error::Io { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists),
            r => panic!("create_segment over an existing segment: {r:?}"),
        }
        other.close().unwrap();
    }
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 1 << 16, "create_segment resized an existing segment");

    // The same instance hands out the same segment, and maps a range once.
    let again = rvm.open_segment(&seg).unwrap();
    assert_eq!((again.id(), again.name()), (s.id(), s.name()));
    match rvm.map(&again, MapSpec::new(0, rvm::page_size())) {
        Err(Error::Map(MapError::AlreadyMapped { .. })) => {}
        r => panic!("mapping a mapped range again: {r:?}"),
    }
    match rvm.create_segment(&seg, 1 << 16) {
        Err(Error::Io { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists),
        r => panic!("create_segment of a segment this instance holds: {r:?}"),
    }

    // Once the holder is gone, the other log still cannot take the segment:
    // its committed bytes are in the first log until that log applies them
    // (through the other log it would show stale bytes, and the first
    // log's recovery would later overwrite the other's commits).
    drop((region, again, s));
    rvm.close().unwrap();
    let other = Rvm::open(&other_log, opts()).unwrap();
    match other.open_segment(&seg) {
        Err(Error::Log(LogError::SegmentInOtherLog { .. })) => {}
        r => panic!("a segment with records in another log: {r:?}"),
    }
    other.close().unwrap();
    // And the first log opens again; its recovery puts the bytes in place.
    let rvm = Rvm::open(&log, opts()).expect("the log is free once its instance is closed");
    assert_eq!(rvm.recovery_report().transactions, 1);
    let s = rvm.open_segment(&seg).unwrap();
    let region = rvm.map(&s, MapSpec::new(0, 1 << 16)).unwrap();
    let mut b = [0u8; 14];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(0, &mut b) }.unwrap();
    assert_eq!(&b, b"first instance");
}

#[test]
fn recovery_reports_the_discarded_tail() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let log = Path::new("log");
    create_log_with(vfs.as_ref(), log, 1 << 20).unwrap();
    let o = Options { coalesce: false, ..opts() };
    {
        let rvm = Rvm::open_with(vfs.clone(), log, o.clone()).unwrap();
        let seg = rvm.create_segment("seg", 1 << 16).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
        for (off, bytes) in [(0, &b"one"[..]), (100, b"two"), (200, b"three")] {
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: single-threaded; nothing else touches the region.
            unsafe {
                tx.modify_bytes(r.addr() + off, bytes).unwrap();
                tx.modify_bytes(r.addr() + off + 1000, bytes).unwrap();
            }
            tx.commit(CommitMode::Flush).unwrap();
        }
        // A crash, not a clean close (which would record the synced end
        // and make the damage below detectable).
        disk.crash(rvm::testing::CrashMode::LoseUnsynced);
        drop((r, seg, rvm));
    }
    // Damage the last transaction's record: nothing after it proves it was
    // synced, so recovery takes it for a torn end and stops before it (the
    // documented limit, DESIGN.md 5).
    let report = inspect::inspect(vfs.as_ref(), log).unwrap();
    let frames = &report.frames;
    assert_eq!(frames.len(), 9, "{frames:?}");
    let commit = frames[8];
    assert!(matches!(commit.body, FrameBody::Commit { ranges: 2, .. }), "{commit:?}");
    // One record holds the whole transaction: nothing of it stays valid.
    let tail = 0u64;
    let sb = report.superblock;
    let at = (sb.area_offset + commit.lsn % sb.area_len) as usize;
    let mut img = disk.durable_image(log).unwrap();
    img[at + 9] ^= 0x01;
    disk.set_durable_image(log, img);

    // The inspector sees the same end as recovery will.
    let scan = inspect::inspect(vfs.as_ref(), log).unwrap().scan.unwrap();
    assert_eq!((scan.transactions, scan.discarded), (2, tail));
    assert_eq!(scan.stop, rvm::log::ScanStop::Defect { lsn: commit.lsn, defect: FrameDefect::BadChecksum });

    let rvm = Rvm::open_with(vfs.clone(), log, o.clone()).unwrap();
    let rep = rvm.recovery_report();
    assert_eq!(rep.transactions, 2, "{rep:?}");
    assert_eq!(rep.discarded_bytes, tail, "{rep:?}");
    assert_eq!(rep.stopped_at, Some((commit.lsn, FrameDefect::BadChecksum.describe())), "{rep:?}");
    assert_eq!(rep.log_bytes, frames[6].lsn - frames[0].lsn, "{rep:?}");
    let seg = rvm.open_segment("seg").unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
    let mut b = [0u8; 1205];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(0, &mut b) }.unwrap();
    assert_eq!((&b[0..3], &b[100..103], &b[1100..1103]), (&b"one"[..], &b"two"[..], &b"two"[..]));
    assert_eq!((&b[200..205], &b[1200..1205]), (&[0u8; 5][..], &[0u8; 5][..]), "a discarded transaction was applied");
    drop((r, seg));
    drop(rvm);

    // The tail stays dead: the next recovery finds nothing to replay or discard.
    let rvm = Rvm::open_with(vfs.clone(), log, o).unwrap();
    let rep = rvm.recovery_report();
    assert_eq!((rep.transactions, rep.discarded_bytes), (0, 0), "{rep:?}");
}

/// A checkpoint on real files: the segment file then holds every commit,
/// seen by a plain read, by a copy-on-demand map after reopening, and
/// after a later replay over the same pages.
#[test]
fn checkpointed_pages_reach_the_segment_file() {
    let dir = tempfile::tempdir().unwrap();
    let (log, seg_path) = (dir.path().join("ck.log"), dir.path().join("ck.seg"));
    create_log(&log, 4 << 20).unwrap();
    let ps = page_size();
    let len = 64 * ps;
    let mut want = vec![0u8; len];
    {
        let rvm = Rvm::open(&log, opts()).unwrap();
        let seg = rvm.create_segment(&seg_path, len as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
        // Runs of dirty pages (direct writes) and lone ones.
        for p in (0..48).chain([50, 52, 60]) {
            let data: Vec<u8> = (0..ps).map(|i| (p * 7 + i % 251) as u8).collect();
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: single-threaded; the page is inside the region.
            unsafe { tx.modify_bytes(region.addr() + p * ps, &data).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
            want[p * ps..(p + 1) * ps].copy_from_slice(&data);
        }
        let report = rvm.checkpoint().unwrap();
        assert_eq!(report.pages, 51);
        assert_eq!(rvm.query().log_used, 0);
        assert_eq!(std::fs::read(&seg_path).unwrap(), want, "segment file after the checkpoint");
        // A later commit over checkpointed pages, applied by a replay
        // through the page cache, is seen over the direct writes.
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: as above.
        unsafe { tx.modify_bytes(region.addr() + 3 * ps + 5, b"replayed").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
        want[3 * ps + 5..3 * ps + 13].copy_from_slice(b"replayed");
        rvm.truncate().unwrap();
    }
    assert_eq!(std::fs::read(&seg_path).unwrap(), want, "segment file after the replay");
    let rvm = Rvm::open(&log, opts()).unwrap();
    let seg = rvm.open_segment(&seg_path).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, len).copy(CopyMode::OnDemand)).unwrap();
    // SAFETY: no transaction runs; the region is mapped and `len` long.
    let got = unsafe { std::slice::from_raw_parts(region.addr() as *const u8, len) };
    assert_eq!(got, &want[..], "segment mapped after reopening");
}

/// A segment whose creation fails part-way (sizing, syncing, or the log's
/// dictionary write) is not left behind: the error is returned, the file is
/// gone, and creating it again works.
#[test]
fn a_failed_segment_creation_leaves_no_file() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
    let rvm = Rvm::open_with(vfs, Path::new("log"), opts()).unwrap();
    let mut failures = 0;
    for n in 0..12 {
        let seg = format!("seg{n}");
        disk.fail_after(n);
        let r = rvm.create_segment(&seg, 1 << 16);
        disk.clear_faults();
        match r {
            Ok(_) => assert!(disk.file_names().iter().any(|f| f == Path::new(&seg))),
            Err(e) => {
                failures += 1;
                assert!(matches!(e, Error::Io { .. }), "fail_after({n}): {e}");
                assert!(!disk.file_names().iter().any(|f| f == Path::new(&seg)), "fail_after({n}): {seg} left behind");
                rvm.create_segment(&seg, 1 << 16).unwrap_or_else(|e| panic!("fail_after({n}): retry: {e}"));
            }
        }
    }
    assert!(failures >= 3, "the faults hit only {failures} creations");
}

/// `close_segment`: refused while a region is mapped; applies the
/// segment's commits (the file holds them, the log is empty); the file is
/// unlocked, so it can be opened again, and a stale handle cannot map it.
#[test]
fn closing_a_segment_applies_its_commits_and_unlocks_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = (dir.path().join("close.log"), dir.path().join("close.seg"));
    create_log(&log, 1 << 20).unwrap();
    let rvm = Rvm::open(&log, opts()).unwrap();
    let seg = rvm.create_segment(&path, 8192).unwrap();
    let stale = seg.clone();
    let region = rvm.map(&seg, MapSpec::new(0, 8192)).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: single-threaded; inside the region.
    unsafe { tx.modify_bytes(region.addr() + 4096, b"closed").unwrap() };
    tx.commit(CommitMode::NoFlush).unwrap();
    match rvm.close_segment(seg.clone()) {
        Err(Error::Map(MapError::SegmentInUse { regions: 1, .. })) => {}
        other => panic!("closing a mapped segment: {other:?}"),
    }
    rvm.unmap(region).unwrap();
    rvm.close_segment(seg).unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[4096..4102], b"closed");
    assert_eq!(rvm.query().log_used, 0);
    match rvm.map(&stale, MapSpec::new(0, 4096)) {
        Err(Error::Map(MapError::SegmentClosed { .. })) => {}
        other => panic!("mapping a closed segment: {other:?}"),
    }
    drop(stale);
    // Unlocked once the last handle went: it opens again, with the commit.
    let seg = rvm.open_segment(&path).unwrap();
    let region = rvm.map(&seg, MapSpec::new(4096, 4096)).unwrap();
    // SAFETY: no transaction is open; the region is mapped.
    assert_eq!(unsafe { std::slice::from_raw_parts(region.addr() as *const u8, 6) }, b"closed");
}
