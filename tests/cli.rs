//! The `rvmutl` command-line tool, run as a separate process on real files:
//! every subcommand on a log holding transactions made through the library,
//! and the messages and exit codes on bad input (1 = usage, 2 = I/O or lock,
//! 3 = not a log or corrupted).

use rvm::log::format::{AREA_OFFSET, BLOCK, STATUS_SLOT};
use rvm::{CommitMode, MapSpec, Options, Region, RestoreMode, Rvm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{expect_code, log_doc, rvmutl, serial, stderr, stdout};

/// Runs `rvmutl` on a path argument.
fn rvmutl_on(cmd: &str, path: &Path, extra: &[&str]) -> Output {
    let p = path.to_str().expect("utf-8 temp path");
    let mut args = vec![cmd, p];
    args.extend_from_slice(extra);
    rvmutl(&args)
}

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

fn commit(rvm: &Rvm, r: &Region, writes: &[(usize, &[u8])]) {
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    for &(off, bytes) in writes {
        // SAFETY: single-threaded test; nothing else touches the region.
        unsafe { tx.modify_bytes(r.addr() + off, bytes).unwrap() };
    }
    tx.commit(CommitMode::Flush).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    log: PathBuf,
    seg: PathBuf,
}

/// A 1 MiB log made with `rvmutl create-log` and a segment, with three
/// committed transactions left in the log (no truncation).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("test.log");
    let seg = dir.path().join("test.seg");
    let o = rvmutl_on("create-log", &log, &["--size", "1M"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("created log"), "{}", stdout(&o));
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 1 << 20);
    {
        let rvm = Rvm::open(&log, opts()).unwrap();
        let ps = rvm::page_size();
        let s = rvm.create_segment(&seg, ps as u64).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, ps)).unwrap();
        commit(&rvm, &r, &[(100, b"hello")]);
        commit(&rvm, &r, &[(0, b"AAAA"), (200, b"BBBBBBBB")]);
        commit(&rvm, &r, &[(300, &[7u8; 600])]);
        rvm.close().unwrap();
    }
    Fixture { _dir: dir, log, seg }
}

#[test]
fn help_lists_the_exit_codes() {
    let _serial = serial();
    let o = rvmutl(&["--help"]);
    expect_code(&o, 0);
    let text = stdout(&o);
    for needle in ["create-log", "status", "dump", "recover", "truncate", "Exit codes", "3  not an RVM log"] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
    let o = rvmutl(&["dump", "--help"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("--json") && stdout(&o).contains("Exit codes"));
}

#[test]
fn usage_errors_exit_1() {
    let _serial = serial();
    expect_code(&rvmutl(&[]), 1);
    expect_code(&rvmutl(&["frobnicate"]), 1);
    expect_code(&rvmutl(&["status"]), 1);
    expect_code(&rvmutl(&["create-log", "x.log"]), 1);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.log");
    for bad in ["12X", "-1", "lots", "99999999999T"] {
        let o = rvmutl_on("create-log", &p, &["--size", bad]);
        expect_code(&o, 1);
    }
    // Too small for a log: refused by the library, still a usage error.
    let o = rvmutl_on("create-log", &p, &["--size", "64K"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("invalid"), "{}", stderr(&o));
    assert!(!p.exists());
    // An empty path on either side of --accept-segment.
    for bad in ["=", "seg=", "=seg", ""] {
        let o = rvmutl_on("recover", &p, &["--accept-segment", bad]);
        expect_code(&o, 1);
        assert!(stderr(&o).contains("neither path empty"), "{}", stderr(&o));
    }
}

/// A log in `dir` with transactions for a one-page segment at `seg`, not
/// applied; returns the log's path and the bytes the segment must hold.
fn unapplied(dir: &Path, seg: &Path) -> (PathBuf, Vec<u8>) {
    let log = dir.join("test.log");
    rvm::create_log(&log, 1 << 20).unwrap();
    let rvm = Rvm::open(&log, opts()).unwrap();
    let ps = rvm::page_size();
    let s = rvm.create_segment(seg, ps as u64).unwrap();
    let r = rvm.map(&s, MapSpec::new(0, ps)).unwrap();
    commit(&rvm, &r, &[(100, b"hello"), (300, b"world")]);
    let mut want = vec![0u8; ps];
    want[100..105].copy_from_slice(b"hello");
    want[300..305].copy_from_slice(b"world");
    drop(r);
    rvm.close().unwrap();
    (log, want)
}

#[test]
fn accept_segment_takes_restored_and_moved_segments_with_equals_in_their_paths() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().join("a=b");
    std::fs::create_dir_all(&here).unwrap();
    let seg = here.join("s=1.seg");
    let (log, want) = unapplied(&here, &seg);
    // Restored from a copy: the same path, another file.
    let copy = here.join("copy");
    std::fs::copy(&seg, &copy).unwrap();
    std::fs::rename(&copy, &seg).unwrap();
    let o = rvmutl_on("recover", &log, &[]);
    assert_ne!(o.status.code(), Some(0), "a restored segment taken without --accept-segment");
    let o = rvmutl_on("recover", &log, &["--accept-segment", seg.to_str().unwrap()]);
    expect_code(&o, 0);
    assert_eq!(std::fs::read(&seg).unwrap(), want);

    // Moved: RECORDED=NOW, both holding `=`.
    let dir = tempfile::tempdir().unwrap();
    let (from, to) = (dir.path().join("x=y"), dir.path().join("m=n"));
    std::fs::create_dir_all(&from).unwrap();
    std::fs::create_dir_all(&to).unwrap();
    let seg = from.join("seg");
    let (log, want) = unapplied(&from, &seg);
    let moved = to.join("k=v.seg");
    std::fs::rename(&seg, &moved).unwrap();
    let arg = format!("{}={}", seg.display(), moved.display());
    let o = rvmutl_on("recover", &log, &["--accept-segment", &arg]);
    expect_code(&o, 0);
    assert_eq!(std::fs::read(&moved).unwrap(), want);
}

#[test]
fn create_log_accepts_suffixes_and_never_overwrites() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    for (size, bytes) in [("196K", 196u64 << 10), ("2m", 2 << 20), ("300000", 300_000)] {
        let p = dir.path().join(format!("{size}.log"));
        expect_code(&rvmutl_on("create-log", &p, &["--size", size]), 0);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), bytes);
        let o = rvmutl_on("create-log", &p, &["--size", size]);
        expect_code(&o, 2);
        assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    }
}

#[test]
fn status_dump_recover_truncate() {
    let _serial = serial();
    let fx = fixture();

    // status: both slots, the chosen one, space in use, transactions.
    let o = rvmutl_on("status", &fx.log, &[]);
    expect_code(&o, 0);
    let text = stdout(&o);
    for needle in ["slot 0", "slot 1", "chosen slot:", "used:", "free:", "3 complete in the log (3 commits)"] {
        assert!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }
    assert!(text.contains(fx.seg.file_name().unwrap().to_str().unwrap()), "segment dictionary not shown:\n{text}");
    let o = rvmutl_on("status", &fx.log, &["--json"]);
    expect_code(&o, 0);
    let st: Value = log_doc(&o);
    assert_eq!(st["scan"]["transactions"], 3);
    let used = st["scan"]["used_bytes"].as_u64().unwrap();
    let free = st["scan"]["free_bytes"].as_u64().unwrap();
    assert!(used > 600);
    assert_eq!(used + free, st["superblock"]["area_len"].as_u64().unwrap());

    // dump: one line per frame (4 ranges + 3 commits) between comment lines.
    let o = rvmutl_on("dump", &fx.log, &[]);
    expect_code(&o, 0);
    let text = stdout(&o);
    let frames: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(frames.len(), 7, "{text}");
    assert_eq!(frames.iter().filter(|l| l.contains(" range ")).count(), 4, "{text}");
    assert_eq!(frames.iter().filter(|l| l.contains(" commit ")).count(), 3, "{text}");
    assert!(frames[0].contains("offset 100 len 5"), "{text}");
    assert!(!text.contains("unfinished"), "{text}");

    // dump --json: a JSON document with the same frames.
    let o = rvmutl_on("dump", &fx.log, &["--json"]);
    expect_code(&o, 0);
    let doc: Value = log_doc(&o);
    let frames = doc["frames"].as_array().unwrap();
    let kinds: Vec<&str> = frames.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["range", "commit", "range", "range", "commit", "range", "commit"]);
    assert!(frames.iter().all(|f| f["committed"] == true));
    assert_eq!(
        (&frames[0]["offset"], &frames[0]["data_len"], &frames[0]["segment"]),
        (&100.into(), &5.into(), &1.into())
    );
    assert_eq!(
        (&frames[2]["offset"], &frames[3]["offset"], &frames[5]["data_len"]),
        (&0.into(), &200.into(), &600.into())
    );
    assert_eq!((&frames[4]["ranges"], &frames[4]["bytes"]), (&2.into(), &12.into()));
    let mut lsn = 0;
    for f in frames {
        assert_eq!(f["lsn"].as_u64().unwrap(), lsn);
        lsn += f["len"].as_u64().unwrap();
    }
    assert_eq!(doc["scan"]["end"].as_u64().unwrap(), lsn);
    assert_eq!(doc["scan"]["transactions"], 3);
    assert_eq!(doc["scan"]["discarded_bytes"], 0);
    assert_eq!(doc["status"]["segments"][0]["id"], 1);

    // An instance holds the lock: inspection still works (a live view,
    // without a lock); a command that writes is refused with exit code 2
    // and a hint naming the locked log.
    {
        let _rvm = Rvm::open(&fx.log, opts()).unwrap();
        let o = rvmutl_on("status", &fx.log, &[]);
        expect_code(&o, 0);
        assert!(stdout(&o).contains("live view"), "{}", stdout(&o));
        let o = rvmutl_on("recover", &fx.log, &[]);
        expect_code(&o, 2);
        assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
        let hint = stderr(&o).lines().find(|l| l.starts_with("rvmutl: hint:")).unwrap_or_default().to_string();
        assert!(hint.contains(fx.log.to_str().unwrap()), "the hint does not name the log: {hint}");
    }
    // (That open ran recovery, so the log is empty again: add a transaction.)
    {
        let rvm = Rvm::open(&fx.log, opts()).unwrap();
        let s = rvm.open_segment(&fx.seg).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, rvm::page_size())).unwrap();
        commit(&rvm, &r, &[(1000, b"recover me")]);
        rvm.close().unwrap();
    }
    assert_eq!(&std::fs::read(&fx.seg).unwrap()[1000..1010], &[0; 10]);

    // recover: replays onto the segment and empties the log.
    let o = rvmutl_on("recover", &fx.log, &[]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("transactions replayed:  1"), "{}", stdout(&o));
    let seg = std::fs::read(&fx.seg).unwrap();
    assert_eq!(&seg[1000..1010], b"recover me");
    assert_eq!(&seg[100..105], b"hello");
    let o = rvmutl_on("status", &fx.log, &["--json"]);
    expect_code(&o, 0);
    let st: Value = log_doc(&o);
    assert_eq!((&st["scan"]["transactions"], &st["scan"]["used_bytes"]), (&0.into(), &0.into()));

    // truncate: open (recovering), truncate, close.
    {
        let rvm = Rvm::open(&fx.log, opts()).unwrap();
        let s = rvm.open_segment(&fx.seg).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, rvm::page_size())).unwrap();
        commit(&rvm, &r, &[(2000, b"truncate me")]);
        rvm.close().unwrap();
    }
    let o = rvmutl_on("truncate", &fx.log, &[]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("transactions replayed:  1") && stdout(&o).contains("truncated"), "{}", stdout(&o));
    assert_eq!(&std::fs::read(&fx.seg).unwrap()[2000..2011], b"truncate me");
    let o = rvmutl_on("dump", &fx.log, &["--json"]);
    expect_code(&o, 0);
    let doc: Value = log_doc(&o);
    assert_eq!(doc["frames"].as_array().unwrap().len(), 0);
}

#[test]
fn dump_stops_at_a_damaged_last_record() {
    let _serial = serial();
    let fx = fixture();
    let o = rvmutl_on("dump", &fx.log, &["--json"]);
    let doc: Value = log_doc(&o);
    let last = &doc["frames"][6];
    assert_eq!(last["kind"], "commit");
    // Damage the last record (one range and the commit of the third
    // transaction): the log ends before it.
    let mut img = std::fs::read(&fx.log).unwrap();
    let at = last["device_offset"].as_u64().unwrap() as usize;
    img[at + 9] ^= 0x80;
    std::fs::write(&fx.log, &img).unwrap();

    let o = rvmutl_on("dump", &fx.log, &["--json"]);
    expect_code(&o, 0);
    let doc: Value = log_doc(&o);
    let frames = doc["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 5);
    assert!(frames.iter().all(|f| f["committed"] == true));
    assert_eq!(doc["scan"]["transactions"], 2);
    assert_eq!(doc["scan"]["discarded_bytes"], 0);
    assert_eq!(doc["scan"]["stop"]["reason"], "bad_checksum");
    assert_eq!(doc["scan"]["stop"]["lsn"], last["lsn"]);

    let o = rvmutl_on("dump", &fx.log, &[]);
    expect_code(&o, 0);
    let text = stdout(&o);
    assert_eq!(text.lines().filter(|l| l.contains("unfinished tail")).count(), 0, "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");

    // The log was closed cleanly, so its status says the commit frame was
    // synced: recovery refuses the damage rather than take it for a torn
    // end; a salvage replays the two complete transactions only.
    let o = rvmutl_on("recover", &fx.log, &[]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("--salvage"), "{}", stderr(&o));
    let o = rvmutl_on("recover", &fx.log, &["--salvage"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("transactions replayed:  2"), "{}", stdout(&o));
    assert!(stdout(&o).contains("SALVAGED"), "{}", stdout(&o));
    let seg = std::fs::read(&fx.seg).unwrap();
    assert_eq!(&seg[200..208], b"BBBBBBBB");
    assert_eq!(&seg[300..310], &[0; 10]);
}

/// Runs every log-reading subcommand on `path` and checks its exit code
/// and that stderr says `needle`.
#[track_caller]
fn all_refuse(path: &Path, code: i32, needle: &str) {
    for (cmd, extra) in [
        ("status", &[][..]),
        ("status", &["--json"][..]),
        ("dump", &[][..]),
        ("dump", &["--json"][..]),
        ("recover", &[][..]),
        ("truncate", &[][..]),
    ] {
        let o = rvmutl_on(cmd, path, extra);
        expect_code(&o, code);
        let err = stderr(&o);
        assert!(err.starts_with("rvmutl: error:"), "{cmd}: {err}");
        assert!(err.contains(needle), "{cmd} {extra:?}: expected {needle:?} in {err}");
        assert!(!err.contains("panicked"), "{cmd}: {err}");
    }
}

#[test]
fn bad_files_give_clear_errors_and_exit_codes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.log");
    all_refuse(&missing, 2, "No such file");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "these are not the bytes you are looking for\n".repeat(200)).unwrap();
    all_refuse(&text, 3, "not an RVM log");

    let empty = dir.path().join("empty.log");
    std::fs::write(&empty, b"").unwrap();
    all_refuse(&empty, 3, "not an RVM log");

    let dirpath = dir.path().join("a-directory");
    std::fs::create_dir(&dirpath).unwrap();
    for cmd in ["status", "dump", "recover", "truncate"] {
        let o = rvmutl_on(cmd, &dirpath, &[]);
        expect_code(&o, 2);
    }

    let fx = fixture();
    let img = std::fs::read(&fx.log).unwrap();
    let bad = dir.path().join("bad.log");

    // Truncated files: inside the superblock, inside the status area, inside the records.
    for len in [100, BLOCK as usize + 10, AREA_OFFSET as usize + 100, img.len() - 1] {
        std::fs::write(&bad, &img[..len]).unwrap();
        let needle = if len < BLOCK as usize { "not an RVM log" } else { "corrupted" };
        all_refuse(&bad, 3, needle);
    }

    // Another format version.
    let mut v9 = img.clone();
    v9[8] = 9;
    std::fs::write(&bad, &v9).unwrap();
    all_refuse(&bad, 3, "version 9 is not supported");

    // A damaged superblock.
    let mut sb = img.clone();
    sb[20] ^= 1;
    std::fs::write(&bad, &sb).unwrap();
    all_refuse(&bad, 3, "corrupted log superblock");

    // Both status slots damaged: status still shows what it can, then fails.
    let mut st = img.clone();
    st[BLOCK as usize + 30] ^= 1;
    st[(BLOCK + STATUS_SLOT) as usize + 30] ^= 1;
    std::fs::write(&bad, &st).unwrap();
    all_refuse(&bad, 3, "status");
    let o = rvmutl_on("status", &bad, &[]);
    assert!(stdout(&o).contains("INVALID (checksum mismatch"), "{}", stdout(&o));
    let o = rvmutl_on("status", &bad, &["--json"]);
    let doc: Value = log_doc(&o);
    assert_eq!(doc["chosen_slot"], Value::Null);

    // A segment named by the log is gone: recovery cannot replay.
    std::fs::remove_file(&fx.seg).unwrap();
    for cmd in ["recover", "truncate"] {
        let o = rvmutl_on(cmd, &fx.log, &[]);
        expect_code(&o, 2);
        assert!(stderr(&o).contains("cannot be opened"), "{}", stderr(&o));
    }
    // ... but inspection still works.
    expect_code(&rvmutl_on("dump", &fx.log, &[]), 0);
}

/// The fixture's log with one bit flipped in the second transaction's
/// record (mid-log damage: a later commit records that the log was durable
/// past it). Returns the damaged record's position and the damaged bytes.
fn damage_second_transaction(fx: &Fixture) -> (u64, Vec<u8>) {
    let o = rvmutl_on("dump", &fx.log, &["--json"]);
    expect_code(&o, 0);
    let doc: Value = log_doc(&o);
    // Frames: range, commit | range, range, commit | range, commit.
    let frame = &doc["frames"][2];
    assert_eq!(frame["kind"], "range");
    let lsn = frame["lsn"].as_u64().unwrap();
    let at = frame["device_offset"].as_u64().unwrap() as usize;
    assert_eq!(at as u64, AREA_OFFSET + lsn);
    let mut img = std::fs::read(&fx.log).unwrap();
    img[at + 9] ^= 0x02;
    std::fs::write(&fx.log, &img).unwrap();
    (lsn, img)
}

#[test]
fn recover_refuses_mid_log_damage_and_changes_nothing() {
    let _serial = serial();
    let fx = fixture();
    let (lsn, img) = damage_second_transaction(&fx);
    let seg = std::fs::read(&fx.seg).unwrap();

    let o = rvmutl_on("recover", &fx.log, &[]);
    expect_code(&o, 3);
    let err = stderr(&o);
    assert!(err.contains(&format!("position {lsn} ")), "{err}");
    assert!(err.contains(&format!("byte offset {}", AREA_OFFSET + lsn)), "{err}");
    assert!(err.contains("--salvage"), "{err}");
    assert_eq!(std::fs::read(&fx.log).unwrap(), img, "the refused recovery changed the log");
    assert_eq!(std::fs::read(&fx.seg).unwrap(), seg, "the refused recovery changed the segment");
    let names: Vec<_> = std::fs::read_dir(fx.log.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "no file may be created: {names:?}");
    // So does `truncate`, which opens the log as an application would.
    let o = rvmutl_on("truncate", &fx.log, &[]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains(&format!("position {lsn} ")), "{}", stderr(&o));
    assert_eq!(std::fs::read(&fx.log).unwrap(), img);
}

#[test]
fn status_reports_mid_log_damage() {
    let _serial = serial();
    let fx = fixture();
    let (lsn, img) = damage_second_transaction(&fx);
    let o = rvmutl_on("status", &fx.log, &[]);
    let text = stdout(&o);
    let line = text.lines().find(|l| l.starts_with("DAMAGED:")).unwrap_or_else(|| panic!("no DAMAGED line:\n{text}"));
    assert!(line.contains(&format!("position {lsn} ")) && line.contains("--salvage"), "{line}");
    let o = rvmutl_on("status", &fx.log, &["--json"]);
    let st: Value = log_doc(&o);
    let d = &st["scan"]["damage"];
    assert_eq!(d["lsn"], lsn);
    assert_eq!(d["reason"], "bad_checksum");
    assert!(d["synced_to"].as_u64().unwrap() > lsn, "{d}");
    assert!(d["next_valid"].as_u64().unwrap() > lsn, "{d}");
    assert_eq!(std::fs::read(&fx.log).unwrap(), img, "status changed the log");
}

#[test]
fn recover_salvage_keeps_the_prefix_and_a_copy() {
    let _serial = serial();
    let fx = fixture();
    let (lsn, img) = damage_second_transaction(&fx);
    let o = rvmutl_on("status", &fx.log, &["--json"]);
    let st: Value = log_doc(&o);
    let chosen = st["chosen_slot"].as_u64().unwrap() as usize;
    let epoch = st["slots"][chosen]["status"]["epoch"].as_u64().unwrap();
    let end = st["scan"]["damage"]["valid_end"].as_u64().unwrap();

    let o = rvmutl_on("recover", &fx.log, &["--salvage"]);
    expect_code(&o, 0);
    let text = stdout(&o);
    let copy = PathBuf::from(format!("{}.damaged-{epoch}", fx.log.display()));
    assert!(text.contains("transactions replayed:  1"), "{text}");
    assert!(text.contains(&format!("SALVAGED a damaged log: record at position {lsn} was bad")), "{text}");
    assert!(text.contains(&format!("damaged log kept at:    {}", copy.display())), "{text}");
    assert!(text.contains(&format!("dropped:                {} log bytes", end - lsn)), "{text}");
    assert_eq!(std::fs::read(&copy).unwrap(), img, "the copy is the damaged log");
    // The first transaction only.
    let seg = std::fs::read(&fx.seg).unwrap();
    assert_eq!(&seg[100..105], b"hello");
    assert_eq!(&seg[0..4], &[0; 4]);
    assert_eq!(&seg[300..310], &[0; 10]);
    // The log is usable again.
    let o = rvmutl_on("status", &fx.log, &[]);
    expect_code(&o, 0);
    assert!(!stdout(&o).contains("DAMAGED"), "{}", stdout(&o));
    let o = rvmutl_on("recover", &fx.log, &[]);
    expect_code(&o, 0);
    // One complete transaction (the third) followed the damaged one.
    assert!(text.contains(", 1 complete transaction(s) after the damage"), "{text}");
}
