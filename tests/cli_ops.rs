//! `rvmutl` for operators, run as separate processes on real files:
//! inspection of a log and a heap that another process holds and commits
//! to (the output parses, the holder is undisturbed), checks that never
//! write (every file's bytes unchanged), newline-delimited JSON, the words
//! for a clean end, a torn tail and damage, one error prefix, progress only
//! on a terminal, and shell completions.

use rvm::heap::{HeapSpec, PersistentHeap};
use rvm::{CommitMode, Options, RestoreMode, Rvm};
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{expect_code, log_doc, ndjson, record, records, rvmutl, s, serial, stderr, stdout};

/// Heap bases for these tests (distinct from the other CLI tests').
fn base(n: u64) -> u64 {
    0x5f80_0000_0000 + n * (1 << 30)
}

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

/// Every file of `dir` and its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// The environment variable that turns `holder_process` on.
const HOLDER_DIR: &str = "RVM_OPS_HOLDER_DIR";

/// The program `live_inspection_leaves_the_holder_undisturbed` runs in a
/// second process (this test binary again, filtered to that test, with
/// `RVM_OPS_HOLDER_DIR` set). It opens `app.log`, creates the heap `app.heap`,
/// and commits one allocation per transaction (flush commits, the count in
/// root "count") until the file `stop` appears, truncating now and then so
/// the log's head moves; `ready` appears after the first 20 commits. At the
/// end it checks its heap, closes, and writes the number of commits to
/// `done`. Any failed commit panics, failing the process.
fn holder_process(dir: PathBuf) {
    let rvm = Rvm::open(dir.join("app.log"), opts()).unwrap();
    let heap = PersistentHeap::create(&rvm, dir.join("app.heap"), &HeapSpec::fixed(base(0), 1 << 20)).unwrap();
    let mut count = 0u64;
    let started = Instant::now();
    while !dir.join("stop").exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "never told to stop");
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        let p = tx.malloc(Layout::from_size_align(64, 8).unwrap()).unwrap();
        count += 1;
        // SAFETY: the block was just allocated by this transaction; nothing else uses it.
        unsafe { tx.write(p, &count.to_le_bytes()).unwrap() };
        tx.set_root("count", Some((p, 8, count))).unwrap();
        tx.commit(CommitMode::Flush).unwrap();
        if count == 20 {
            std::fs::write(dir.join("ready"), b"").unwrap();
        }
        if count.is_multiple_of(150) {
            rvm.truncate().unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    heap.check().unwrap();
    assert_eq!(heap.stats().allocations, count);
    heap.close().unwrap();
    rvm.close().unwrap();
    std::fs::write(dir.join("done"), count.to_string()).unwrap();
}

/// Waits until `path` exists, failing if `child` ends first or it takes too long.
fn wait_for(path: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the holder ended early with {status}");
        }
        assert!(Instant::now() < deadline, "the holder never made {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn live_inspection_leaves_the_holder_undisturbed() {
    if let Some(dir) = std::env::var_os(HOLDER_DIR) {
        return holder_process(PathBuf::from(dir));
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (log, heap) = (dir.path().join("app.log"), dir.path().join("app.heap"));
    expect_code(&rvmutl(&["create-log", s(&log), "--size", "1M"]), 0);
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "live_inspection_leaves_the_holder_undisturbed", "--nocapture", "--test-threads=1"])
        .env(HOLDER_DIR, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the holder");
    wait_for(&dir.path().join("ready"), &mut holder);

    let mut seen_transactions = 0;
    let mut last_count = 0;
    for round in 0..4 {
        // status and dump: a live view that parses, line by line.
        let o = rvmutl(&["status", s(&log), "--json"]);
        expect_code(&o, 0);
        let doc = log_doc(&o);
        assert_eq!(doc["live"], true, "{doc}");
        assert_ne!(doc["scan"]["log_end"], "damaged", "a live writer is not damage: {doc}");
        let o = rvmutl(&["status", s(&log)]);
        expect_code(&o, 0);
        assert!(stdout(&o).contains("live view"), "{}", stdout(&o));
        let o = rvmutl(&["dump", s(&log), "--json"]);
        expect_code(&o, 0);
        let all = ndjson(&o);
        assert_eq!(record(&all, "log")["live"], true);
        let scan = record(&all, "scan");
        let commits = records(&all, "frame").iter().filter(|f| f["kind"] == "commit" && f["committed"] == true).count();
        assert_eq!(scan["transactions"].as_u64().unwrap(), commits as u64, "{scan}");
        seen_transactions += commits;

        // heap check and stats: the heap as recovery would leave it, in memory.
        let o = rvmutl(&["heap", "check", s(&heap), "--log", s(&log), "--json"]);
        expect_code(&o, 0);
        let all = ndjson(&o);
        let check = record(&all, "check");
        assert_eq!((&check["ok"], &check["live"]), (&true.into(), &true.into()), "{check}");
        let o = rvmutl(&["heap", "stats", s(&heap), "--log", s(&log), "--json"]);
        expect_code(&o, 0);
        let all = ndjson(&o);
        let root = record(&all, "root");
        assert_eq!(root["name"], "count");
        // The commit count is the root's type tag; it only grows.
        let count = root["type_tag"].as_u64().unwrap();
        assert!(count >= 20 && count >= last_count, "round {round}: count {count} after {last_count}");
        assert_eq!(record(&all, "stats")["allocations"].as_u64().unwrap(), count, "{all:?}");
        last_count = count;

        let o = rvmutl(&["segment", "show", s(&heap), "--log", s(&log), "--json"]);
        expect_code(&o, 0);
        let all = ndjson(&o);
        let names: Vec<&str> = records(&all, "region").iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["heap.static", "heap"]);
        assert!(holder.try_wait().unwrap().is_none(), "the holder ended during the inspection");
    }
    assert!(seen_transactions > 0, "the views saw no transaction in the log");
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    let out = holder.wait_with_output().unwrap();
    assert!(out.status.success(), "the holder failed:\n{}\n{}", stdout(&out), stderr(&out));
    let done: u64 = std::fs::read_to_string(dir.path().join("done")).unwrap().parse().unwrap();
    assert!(done >= last_count);
    // After the holder closed: the same heap, every commit in it.
    let o = rvmutl(&["heap", "stats", s(&heap), "--log", s(&log), "--json"]);
    expect_code(&o, 0);
    let all = ndjson(&o);
    assert_eq!(record(&all, "stats")["allocations"].as_u64().unwrap(), done);
    assert_eq!(record(&all, "root")["type_tag"].as_u64().unwrap(), done);
}

/// A log and a heap whose last transactions are in the log only (closed
/// without truncation), with a dangling root.
fn closed_heap(dir: &Path, n: u64) -> (PathBuf, PathBuf) {
    let (log, heap) = (dir.join("app.log"), dir.join("app.heap"));
    expect_code(&rvmutl(&["create-log", s(&log), "--size", "2M"]), 0);
    let o =
        rvmutl(&["heap", "create", s(&heap), "--log", s(&log), "--size", "1M", "--base", &format!("{:#x}", base(n))]);
    expect_code(&o, 0);
    let rvm = Rvm::open(&log, opts()).unwrap();
    let h = PersistentHeap::open(&rvm, &heap).unwrap();
    let mut tx = h.begin(RestoreMode::Restore).unwrap();
    let blocks: Vec<_> = (0..10).map(|i| tx.malloc(Layout::from_size_align(16 + i * 8, 8).unwrap()).unwrap()).collect();
    tx.set_root("kept", Some((blocks[0], 16, 1))).unwrap();
    tx.set_root("dangling", Some((blocks[9], 88, 2))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    let mut tx = h.begin(RestoreMode::Restore).unwrap();
    tx.free(blocks[9]).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    h.close().unwrap();
    rvm.close().unwrap();
    (log, heap)
}

#[test]
fn checks_and_inspection_write_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (log, heap) = closed_heap(dir.path(), 1);
    let before = files(dir.path());
    let (l, h) = (s(&log), s(&heap));
    let commands: Vec<Vec<&str>> = vec![
        vec!["status", l],
        vec!["status", l, "--json"],
        vec!["dump", l],
        vec!["dump", l, "--json"],
        vec!["heap", "check", h, "--log", l],
        vec!["heap", "check", h, "--log", l, "--json"],
        vec!["heap", "stats", h, "--log", l],
        vec!["heap", "stats", h, "--log", l, "--json"],
        vec!["segment", "show", h],
        vec!["segment", "show", h, "--log", l, "--json"],
        vec!["segment", "show", h, "--log", l, "--spec"],
    ];
    for args in &commands {
        let o = rvmutl(args);
        expect_code(&o, 0);
        assert_eq!(files(dir.path()), before, "rvmutl {args:?} changed a file (or made one)");
    }
    // The log still holds both transactions: the check saw them in memory.
    let o = rvmutl(&["status", l, "--json"]);
    assert_eq!(log_doc(&o)["scan"]["transactions"], 2);
    let o = rvmutl(&["heap", "check", h, "--log", l, "--json"]);
    let all = ndjson(&o);
    assert_eq!(record(&all, "check")["log_transactions"], 2);
    assert_eq!(record(&all, "check")["allocated_blocks"], 9);
    let finding = record(&all, "finding");
    assert_eq!((&finding["kind"], &finding["root"]), (&"dangling_root".into(), &"dangling".into()));
    // A damaged log is refused by the check as recovery would refuse it,
    // and still nothing is written.
    let o = rvmutl(&["dump", l, "--json"]);
    let frame = records(&ndjson(&o), "frame")[0].clone();
    let mut img = std::fs::read(&log).unwrap();
    img[frame["device_offset"].as_u64().unwrap() as usize + 48] ^= 1;
    std::fs::write(&log, &img).unwrap();
    let before = files(dir.path());
    let o = rvmutl(&["heap", "check", h, "--log", l]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("--salvage"), "{}", stderr(&o));
    assert_eq!(files(dir.path()), before);
}

#[test]
fn ndjson_is_one_object_per_line_for_every_command() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (log, heap) = closed_heap(dir.path(), 2);
    let (l, h) = (s(&log), s(&heap));
    for (args, first, per_line) in [
        (vec!["status", l, "--json"], "log", "slot"),
        (vec!["dump", l, "--json"], "log", "frame"),
        (vec!["heap", "check", h, "--log", l, "--json"], "check", "finding"),
        (vec!["heap", "stats", h, "--log", l, "--json"], "stats", "class"),
        (vec!["segment", "show", h, "--json"], "segment", "region"),
    ] {
        let o = rvmutl(&args);
        expect_code(&o, 0);
        let all = ndjson(&o);
        assert_eq!(all[0]["type"], first, "{args:?}");
        assert!(!records(&all, per_line).is_empty(), "{args:?}: no {per_line:?} records");
        // Each line stands alone (a streaming reader needs no other line).
        for line in stdout(&o).lines() {
            assert!(!line.trim().is_empty() && line.starts_with('{') && line.ends_with('}'), "{line}");
        }
    }
    let o = rvmutl(&["dump", l, "--json"]);
    let all = ndjson(&o);
    assert_eq!(all.last().unwrap()["type"], "scan");
    assert_eq!(records(&all, "frame").len() as u64, all.last().unwrap()["frames"].as_u64().unwrap());
}

#[test]
fn the_end_of_the_log_is_told_in_clear_words() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (log, _heap) = closed_heap(dir.path(), 3);
    let l = s(&log);
    let o = rvmutl(&["status", l]);
    expect_code(&o, 0);
    let line = stdout(&o).lines().find(|l| l.starts_with("log ends:")).unwrap_or_default().to_string();
    assert!(line.contains("cleanly") && line.contains("never-written header"), "{line}");
    assert_eq!(log_doc(&rvmutl(&["status", l, "--json"]))["scan"]["log_end"], "clean");
    let o = rvmutl(&["dump", l]);
    assert!(stdout(&o).lines().last().unwrap().contains("the log ends cleanly"), "{}", stdout(&o));

    // Garbage where the next frame would go (a write torn by a crash): a
    // torn tail, not damage, and not the words of a clean end.
    let doc = log_doc(&rvmutl(&["status", l, "--json"]));
    let end = doc["scan"]["end"].as_u64().unwrap();
    let area = doc["superblock"]["area_offset"].as_u64().unwrap();
    let clean = std::fs::read(&log).unwrap();
    let mut img = clean.clone();
    img[(area + end) as usize..(area + end) as usize + 16].fill(0xab);
    std::fs::write(&log, &img).unwrap();
    let o = rvmutl(&["status", l]);
    expect_code(&o, 0);
    let line = stdout(&o).lines().find(|l| l.starts_with("log ends:")).unwrap_or_default().to_string();
    assert!(line.contains("torn tail") && line.contains("nothing acknowledged is lost"), "{line}");
    let doc = log_doc(&rvmutl(&["status", l, "--json"]));
    assert_eq!((&doc["scan"]["log_end"], &doc["scan"]["stop"]["blank"]), (&"torn".into(), &false.into()));

    // A bad frame with synced frames after it: damage, and status says that
    // valid frames follow it.
    let frames = records(&ndjson(&rvmutl(&["dump", l, "--json"])), "frame").into_iter().cloned().collect::<Vec<_>>();
    let mut img = clean.clone();
    img[frames[0]["device_offset"].as_u64().unwrap() as usize + 48] ^= 1;
    std::fs::write(&log, &img).unwrap();
    let o = rvmutl(&["status", l]);
    let damaged = stdout(&o).lines().find(|l| l.starts_with("DAMAGED:")).unwrap_or_default().to_string();
    assert!(damaged.contains("valid frames follow from position"), "{}", stdout(&o));
    let doc = log_doc(&rvmutl(&["status", l, "--json"]));
    assert_eq!(doc["scan"]["log_end"], "damaged");
    assert!(doc["scan"]["next_valid"].as_u64().unwrap() > frames[0]["lsn"].as_u64().unwrap(), "{doc}");
    let o = rvmutl(&["dump", l]);
    assert!(stdout(&o).lines().last().unwrap().contains("DAMAGED"), "{}", stdout(&o));
}

#[test]
fn one_error_prefix_for_usage_and_runtime_errors() {
    let _serial = serial();
    for args in [&["frobnicate"][..], &["status"], &["create-log", "x.log", "--size", "12X"], &["dump", "--bogus", "x"]]
    {
        let o = rvmutl(args);
        expect_code(&o, 1);
        assert!(stderr(&o).starts_with("rvmutl: error: "), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("\nerror:"), "{args:?}: {}", stderr(&o));
    }
    let o = rvmutl(&["status", "/nonexistent/x.log"]);
    expect_code(&o, 2);
    assert!(stderr(&o).starts_with("rvmutl: error: "), "{}", stderr(&o));
}

#[test]
fn progress_never_reaches_a_pipe_and_quiet_is_accepted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (log, heap) = closed_heap(dir.path(), 4);
    let (l, h) = (s(&log), s(&heap));
    // Standard error is a pipe here: no progress is drawn.
    for args in [vec!["dump", l], vec!["status", l], vec!["heap", "check", h, "--log", l], vec!["recover", l]] {
        let o = rvmutl(&args);
        expect_code(&o, 0);
        assert_eq!(stderr(&o), "", "{args:?}");
    }
    for args in [vec!["--quiet", "dump", l], vec!["dump", "-q", l], vec!["checkpoint", l, "--quiet"]] {
        let o = rvmutl(&args);
        expect_code(&o, 0);
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

#[test]
fn completions_for_the_usual_shells() {
    let _serial = serial();
    for (shell, needle) in [("bash", "_rvmutl()"), ("zsh", "#compdef rvmutl"), ("fish", "complete -c rvmutl")] {
        let o = rvmutl(&["completions", shell]);
        expect_code(&o, 0);
        let text = stdout(&o);
        assert!(text.contains(needle), "{shell}: no {needle:?}");
        for sub in ["status", "dump", "heap", "segment", "checkpoint"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    expect_code(&rvmutl(&["completions", "tcsh"]), 1);
    let o = rvmutl(&["--help"]);
    assert!(stdout(&o).contains("completions") && stdout(&o).contains("--quiet"), "{}", stdout(&o));
    let o = rvmutl(&["status", "--help"]);
    assert!(stdout(&o).contains("log_end") && stdout(&o).contains("Exit codes"), "{}", stdout(&o));
}

/// `heap check` walks a typed heap's roots by the shapes the typed layer
/// stored: clean for what the typed API made; a block the raw API
/// allocated and linked from nowhere is a warning (leaked); a typed value
/// whose pointer is damaged fails the check (exit 3), named.
#[test]
fn heap_check_walks_typed_roots_and_reports_leaks_and_damage() {
    use rvm::collections::{Config, Error, PHeap, PString, PVec, HEAP_FILE, LOG_FILE};
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() };
    let (log, seg) = (dir.path().join(LOG_FILE), dir.path().join(HEAP_FILE));
    let check = |code: i32| {
        let o = rvmutl(&["heap", "check", s(&seg), "--log", s(&log), "--json"]);
        expect_code(&o, code);
        let human = rvmutl(&["heap", "check", s(&seg), "--log", s(&log)]);
        expect_code(&human, code);
        (ndjson(&o), stdout(&human))
    };
    let heap = PHeap::open_or_create(dir.path(), config.clone()).unwrap();
    heap.write(|tx| {
        let mut v = tx.root_or_insert_with("names", PVec::<PString>::new)?;
        v.push(tx.new_string("ada")?)?;
        v.push(tx.new_string("grace")?)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.close().unwrap();
    let (docs, human) = check(0);
    let c = record(&docs, "check");
    assert_eq!(
        (c["ok"].as_bool(), c["typed_roots"].as_u64(), c["unreachable_blocks"].as_u64()),
        (Some(true), Some(1), Some(0))
    );
    // The root's block, the vector's buffer, two strings, the shape table.
    assert_eq!(c["reachable_blocks"].as_u64(), Some(5));
    assert!(human.contains("1 typed root(s) walked, 5 live block(s) reached, 0 unreachable"), "{human}");

    let heap = PHeap::open_or_create(dir.path(), config.clone()).unwrap();
    // SAFETY: no typed transaction runs while the raw API is used.
    let raw = unsafe { heap.raw_heap() };
    let mut htx = raw.begin(RestoreMode::Restore).unwrap();
    let lost = htx.malloc(Layout::from_size_align(100, 8).unwrap()).unwrap();
    htx.commit(CommitMode::Flush).unwrap();
    heap.close().unwrap();
    let (docs, human) = check(0);
    let leak =
        records(&docs, "finding").into_iter().find(|f| f["kind"] == "unreachable_block").expect("a leak finding");
    assert_eq!(leak["addr"].as_str(), Some(format!("{:#x}", lost.as_ptr() as usize).as_str()));
    assert!(human.contains("is leaked"), "{human}");

    let heap = PHeap::open_or_create(dir.path(), config).unwrap();
    // SAFETY: as above.
    let raw = unsafe { heap.raw_heap() };
    let root = raw.root("names").unwrap();
    let mut htx = raw.begin(RestoreMode::Restore).unwrap();
    // The vector's buffer pointer now leads into the middle of nowhere.
    // SAFETY: the root's block is live; no reference into it exists.
    unsafe { htx.write(root.ptr, &(root.ptr.as_ptr() as u64 + 8).to_ne_bytes()).unwrap() };
    htx.commit(CommitMode::Flush).unwrap();
    heap.close().unwrap();
    let (docs, human) = check(3);
    assert_eq!(record(&docs, "check")["ok"].as_bool(), Some(false));
    let bad = records(&docs, "finding").into_iter().find(|f| f["kind"] == "damaged_root").expect("a damage finding");
    assert_eq!(bad["root"].as_str(), Some("names"));
    assert!(human.contains("DAMAGED") && human.contains("\"names\""), "{human}");
}
