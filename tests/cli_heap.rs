//! `rvmutl heap create | check | stats`, run as a separate process on real
//! files: on heaps made and filled through the library, and the messages and
//! exit codes on bad input (1 = usage, 2 = I/O or lock, 3 = not a heap or a
//! damaged one).

use rvm::heap::PersistentHeap;
use rvm::{CommitMode, Options, RestoreMode, Rvm};
use serde_json::Value;
use std::alloc::Layout;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{expect_code, ndjson, record, records, rvmutl, serial, stderr, stdout};

/// A fixed base per test (distinct, so the library side of two tests never
/// collides; the CLI maps in its own process).
fn base(n: u64) -> u64 {
    0x5e80_0000_0000 + n * (1 << 30)
}

fn heap_cmd(cmd: &str, log: &Path, seg: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["heap", cmd, seg.to_str().expect("utf-8 path"), "--log", log.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    rvmutl(&args)
}

/// The NDJSON records of `o`.
fn json(o: &Output) -> Vec<Value> {
    ndjson(o)
}

struct Fixture {
    dir: tempfile::TempDir,
    log: PathBuf,
    seg: PathBuf,
}

/// A log (made with `rvmutl create-log`) and a 1 MiB heap made with `rvmutl
/// heap create` at `base`.
fn fixture(base: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let seg = dir.path().join("app.heap");
    expect_code(&rvmutl(&["create-log", log.to_str().unwrap(), "--size", "2M"]), 0);
    let o = heap_cmd("create", &log, &seg, &["--size", "1M", "--base", &format!("{base:#x}")]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("created heap"), "{}", stdout(&o));
    assert_log_empty(&log);
    Fixture { dir, log, seg }
}

/// `rvmutl heap create | grow` leave no records in the log: the segment
/// holds everything and is tied to no log records.
fn assert_log_empty(log: &Path) {
    let o = rvmutl(&["status", "--json", log.to_str().unwrap()]);
    expect_code(&o, 0);
    let all = json(&o);
    let scan = record(&all, "scan");
    assert_eq!((scan["used_bytes"].as_u64(), scan["transactions"].as_u64()), (Some(0), Some(0)), "{scan}");
}

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

#[test]
fn create_check_and_stats_of_a_heap_in_use() {
    let _serial = serial();
    let f = fixture(base(0));
    let o = heap_cmd("check", &f.log, &f.seg, &[]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("OK") && stdout(&o).contains("1 free"), "{}", stdout(&o));

    // Fill it through the library: 50 blocks, 10 freed again, two roots.
    {
        let rvm = Rvm::open(&f.log, opts()).unwrap();
        let heap = PersistentHeap::open(&rvm, &f.seg).unwrap();
        assert_eq!(heap.heap_region().addr() as u64, base(0) + rvm::page_size() as u64);
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        let blocks: Vec<_> =
            (0..50).map(|i| tx.malloc(Layout::from_size_align(8 + i * 40, 8).unwrap()).unwrap()).collect();
        tx.set_root("first", Some((blocks[0], 8, 0x11))).unwrap();
        tx.set_root("second", Some((blocks[1], 48, 0x22))).unwrap();
        tx.commit(CommitMode::Flush).unwrap();
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        for &p in &blocks[40..] {
            tx.free(p).unwrap();
        }
        tx.commit(CommitMode::NoFlush).unwrap();
        heap.close().unwrap();
        // Closed without truncating: the CLI finds the last commits by recovery.
        rvm.close().unwrap();
    }
    let o = heap_cmd("stats", &f.log, &f.seg, &[]);
    expect_code(&o, 0);
    let text = stdout(&o);
    for needle in
        ["allocations:  50", "frees:        10", "live blocks:  40", "roots:        2 of 62", "first", "second"]
    {
        assert!(text.contains(needle), "stats lack {needle:?}:\n{text}");
    }
    let o = heap_cmd("stats", &f.log, &f.seg, &["--json"]);
    expect_code(&o, 0);
    let all = json(&o);
    let doc = record(&all, "stats");
    assert_eq!(doc["live_blocks"], 40);
    assert_eq!(doc["heap_bytes"], 1 << 20);
    assert_eq!(doc["log_transactions"], 2);
    let per_class: u64 = records(&all, "class").iter().map(|c| c["live_blocks"].as_u64().unwrap()).sum();
    assert_eq!(per_class, 40);
    let roots = records(&all, "root");
    assert_eq!((roots.len(), &roots[1]["name"], &roots[1]["type_tag"]), (2, &"second".into(), &0x22.into()));

    let o = heap_cmd("check", &f.log, &f.seg, &["--json"]);
    expect_code(&o, 0);
    let all = json(&o);
    let doc = record(&all, "check");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["allocated_blocks"], 40);
    assert_eq!(doc["roots"], 2);
    assert_eq!(doc["dangling_roots"], 0);
    assert!(records(&all, "finding").is_empty(), "{all:?}");
    // The heap can be reopened by the library afterwards (the CLI closed it).
    let rvm = Rvm::open(&f.log, opts()).unwrap();
    assert_eq!(PersistentHeap::open(&rvm, &f.seg).unwrap().stats().live_blocks, 40);
}

#[test]
fn a_damaged_heap_fails_the_check_with_3() {
    let _serial = serial();
    let f = fixture(base(1));
    let block = {
        let rvm = Rvm::open(&f.log, opts()).unwrap();
        let heap = PersistentHeap::open(&rvm, &f.seg).unwrap();
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        let p = tx.malloc(Layout::from_size_align(200, 8).unwrap()).unwrap();
        tx.commit(CommitMode::Flush).unwrap();
        let r = heap.heap_region();
        let at = r.segment_offset() + (p.as_ptr() as usize - 16 - r.addr()) as u64;
        heap.close().unwrap();
        rvm.truncate().unwrap();
        at
    };
    // Overwrite the block's tail guard (as an overrun would).
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&f.seg).unwrap();
        file.write_all_at(&[0xab; 4], block + 16 + 200).unwrap();
    }
    let o = heap_cmd("check", &f.log, &f.seg, &[]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("corrupted tail guard"), "{}", stderr(&o));
    let o = heap_cmd("check", &f.log, &f.seg, &["--json"]);
    expect_code(&o, 3);
    let all = json(&o);
    assert_eq!(record(&all, "check")["ok"], false);
    let finding = record(&all, "finding");
    assert_eq!((&finding["severity"], &finding["kind"]), (&"error".into(), &"corrupted".into()));
    assert!(finding["message"].as_str().unwrap().contains("tail guard"), "{finding}");
    expect_code(&heap_cmd("stats", &f.log, &f.seg, &[]), 3);
}

#[test]
fn bad_input_and_its_exit_codes() {
    let _serial = serial();
    let f = fixture(base(2));
    let new = f.dir.path().join("new.heap");
    // Usage errors: 1.
    expect_code(&rvmutl(&["heap"]), 1);
    expect_code(
        &rvmutl(&["heap", "create", new.to_str().unwrap(), "--log", f.log.to_str().unwrap(), "--size", "1M"]),
        1,
    );
    expect_code(&rvmutl(&["heap", "check", f.seg.to_str().unwrap()]), 1);
    for (size, b) in
        [("12X", "0x5f00_0000_0000"), ("1M", "nowhere"), ("1M", "0x5f00_0000_0010"), ("1M", "0x8000_0000_0000")]
    {
        let o = heap_cmd("create", &f.log, &new, &["--size", size, "--base", b]);
        expect_code(&o, 1);
        assert!(!new.exists(), "a refused create left {}", new.display());
    }
    // The segment exists already, the log is missing: 2.
    let o = heap_cmd("create", &f.log, &f.seg, &["--size", "1M", "--base", "0x5f00_0000_0000"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    let o = heap_cmd("check", &f.dir.path().join("none.log"), &f.seg, &[]);
    expect_code(&o, 2);
    let o = heap_cmd("stats", &f.log, &f.dir.path().join("none.heap"), &[]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("No such file"), "{}", stderr(&o));
    // Not a heap: 3.
    let junk = f.dir.path().join("junk");
    std::fs::write(&junk, vec![0x5au8; 64 << 10]).unwrap();
    let o = heap_cmd("check", &f.log, &junk, &[]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("no load map"), "{}", stderr(&o));
    let other = f.dir.path().join("other.seg");
    {
        let rvm = Rvm::open(&f.log, opts()).unwrap();
        let map = rvm::loader::LoadMap::new().region(rvm::loader::RegionSpec::new("data", 4096, 4096, base(3)));
        rvm::loader::create_segment(&rvm, &other, 8192, &map).unwrap();
    }
    let o = heap_cmd("check", &f.log, &other, &[]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("not a heap segment"), "{}", stderr(&o));
    // The static region is whole pages: --static-len rounds up.
    let o = heap_cmd("create", &f.log, &new, &["--size", "64K", "--base", "0x5f00_0000_0000", "--static-len", "1"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("62 root slots"), "{}", stdout(&o));
    let big = f.dir.path().join("big.heap");
    let o = heap_cmd("create", &f.log, &big, &["--size", "64K", "--base", "0x5f40_0000_0000", "--static-len", "8K"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("126 root slots"), "{}", stdout(&o));
}

#[test]
fn help_names_the_subcommands_and_exit_codes() {
    let _serial = serial();
    let o = rvmutl(&["heap", "--help"]);
    expect_code(&o, 0);
    for needle in ["create", "check", "stats"] {
        assert!(stdout(&o).contains(needle), "{}", stdout(&o));
    }
    let o = rvmutl(&["heap", "create", "--help"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("--base") && stdout(&o).contains("Exit codes"), "{}", stdout(&o));
    let o = rvmutl(&["--help"]);
    assert!(stdout(&o).contains("heap"), "{}", stdout(&o));
}

/// `heap grow` grows a heap in place and raises its maximum; `heap stats`
/// and `segment show` show the size, the maximum and the reserved range;
/// the library then opens it at the new size with its blocks where they
/// were.
#[test]
fn grow_a_heap_and_show_its_maximum() {
    let _serial = serial();
    let f = fixture(base(4));
    let rvm = Rvm::open(&f.log, opts()).unwrap();
    let heap = PersistentHeap::open(&rvm, &f.seg).unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let p = tx.malloc(Layout::new::<u64>()).unwrap();
    tx.set_root("kept", Some((p, 8, 1))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    heap.close().unwrap();
    rvm.close().unwrap();

    let o = heap_cmd("grow", &f.log, &f.seg, &["--size", "3M"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("1048576 -> 3145728 bytes (maximum 68719476736 bytes)"), "{}", stdout(&o));
    let o = heap_cmd("grow", &f.log, &f.seg, &["--size", "65G"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("its maximum is 68719476736"), "{}", stderr(&o));
    let o = heap_cmd("grow", &f.log, &f.seg, &["--max", "65G", "--size", "4M"]);
    expect_code(&o, 0);
    expect_code(&heap_cmd("grow", &f.log, &f.seg, &[]), 1);
    assert_log_empty(&f.log);

    let o = heap_cmd("stats", &f.log, &f.seg, &["--json"]);
    expect_code(&o, 0);
    let all = json(&o);
    let stats = record(&all, "stats");
    assert_eq!(stats["heap_bytes"], 4 << 20);
    assert_eq!(stats["max_heap_bytes"], 65u64 << 30);
    expect_code(&heap_cmd("check", &f.log, &f.seg, &[]), 0);
    let o = rvmutl(&["segment", "show", f.seg.to_str().unwrap(), "--log", f.log.to_str().unwrap()]);
    expect_code(&o, 0);
    let reserved_to = format!("{:#x}", base(4) + 4096 + (65u64 << 30));
    assert!(stdout(&o).contains(&reserved_to), "{}", stdout(&o));

    let rvm = Rvm::open(&f.log, opts()).unwrap();
    let heap = PersistentHeap::open(&rvm, &f.seg).unwrap();
    assert_eq!((heap.heap_len(), heap.max_len()), (4 << 20, 65 << 30));
    assert_eq!(heap.root("kept").unwrap().ptr, p);
    heap.check().unwrap();
    drop(f.dir);
}

/// `heap grow --size S --max M` with S past M failed (exit 1) but had
/// already lowered the maximum to M; now it changes nothing.
#[test]
fn a_grow_past_the_new_maximum_changes_nothing() {
    let _serial = serial();
    let f = fixture(base(5));
    let o = heap_cmd("grow", &f.log, &f.seg, &["--size", "3M", "--max", "2M"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("cannot grow to 3145728 bytes: its maximum is 2097152"), "{}", stderr(&o));
    let o = heap_cmd("stats", &f.log, &f.seg, &["--json"]);
    expect_code(&o, 0);
    let stats = record(&json(&o), "stats").clone();
    assert_eq!((stats["heap_bytes"].as_u64(), stats["max_heap_bytes"].as_u64()), (Some(1 << 20), Some(64 << 30)));
    // Within the new maximum both happen.
    let o = heap_cmd("grow", &f.log, &f.seg, &["--size", "2M", "--max", "2M"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("1048576 -> 2097152 bytes (maximum 2097152 bytes)"), "{}", stdout(&o));
    assert_log_empty(&f.log);
    // Asking for less than there is changes nothing, and says so.
    let o = heap_cmd("grow", &f.log, &f.seg, &["--size", "1M", "--max", "1M"]);
    expect_code(&o, 0);
    let text = stdout(&o);
    assert!(text.contains("2097152 -> 2097152 bytes (maximum 2097152 bytes)"), "{text}");
    assert!(text.contains("not grown") && text.contains("below the heap's size"), "{text}");
}

/// A heap whose formatting needs more log than the log has (a 1 GiB static
/// region holds the most root slots, a 4 MiB transaction, on a 2 MiB log)
/// exited 3, which the help reserves for damaged files, with no hint; it is
/// a usage error, and the hint says what to do.
#[test]
fn a_heap_too_big_for_the_log_is_a_usage_error() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let seg = dir.path().join("app.heap");
    expect_code(&rvmutl(&["create-log", log.to_str().unwrap(), "--size", "2M"]), 0);
    let base = format!("{:#x}", base(6));
    let o = heap_cmd("create", &log, &seg, &["--size", "1M", "--base", &base, "--static-len", "1G"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("larger log"), "{}", stderr(&o));
    // No half-made segment is left: the same path takes a heap at once,
    // and the log opens and recovers as before.
    assert!(!seg.exists(), "a failed create left {}", seg.display());
    let o = heap_cmd("create", &log, &seg, &["--size", "1M", "--base", &base]);
    expect_code(&o, 0);
    expect_code(&heap_cmd("check", &log, &seg, &[]), 0);
}
