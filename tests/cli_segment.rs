//! `rvmutl segment create` and `rvmutl segment show`, run as a separate
//! process on real files: maps from `--region` arguments, from a file and
//! from standard input; the three output forms; the map a program added
//! through the log; and the messages and exit codes on bad input (1 = an
//! invalid map or usage, 2 = I/O or lock, 3 = not a load map or corrupted).

use rvm::loader::testing::address_range;
use rvm::loader::{load_segment, read_load_map_file, CopyMode, LoadMap, RegionSpec};
use rvm::{Options, Rvm};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

mod common;
use common::{expect_code, ndjson, record, records, rvmutl, s, serial, stderr, stdout};

fn rvmutl_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rvmutl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running rvmutl");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("test.log");
        expect_code(&rvmutl(&["create-log", s(&log), "--size", "1M"]), 0);
        Fixture { dir, log }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn help_lists_the_segment_commands() {
    let _serial = serial();
    let o = rvmutl(&["--help"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("segment"), "{}", stdout(&o));
    let o = rvmutl(&["segment", "--help"]);
    expect_code(&o, 0);
    for needle in ["create", "show"] {
        assert!(stdout(&o).contains(needle), "segment --help lacks {needle}:\n{}", stdout(&o));
    }
    let o = rvmutl(&["segment", "create", "--help"]);
    expect_code(&o, 0);
    for needle in ["name:offset:length:base[:copy]", "--map", "--region", "Exit codes"] {
        assert!(stdout(&o).contains(needle), "segment create --help lacks {needle}:\n{}", stdout(&o));
    }
}

#[test]
fn create_from_arguments_then_show_in_every_form() {
    let _serial = serial();
    let fx = Fixture::new();
    let range = address_range();
    let seg = fx.path("a.seg");
    let heap = format!("heap:16K:1M:{:#x}", range.start());
    let roots = format!("roots:4K:4K:{:#x}:on-map", range.start() + (64 << 20));
    let o = rvmutl(&["segment", "create", s(&seg), "--log", s(&fx.log), "--region", &heap, "--region", &roots]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("created segment") && stdout(&o).contains("2 region(s)"), "{}", stdout(&o));
    // Applied and the log emptied: the segment is tied to no log records.
    let status = rvmutl(&["status", "--json", s(&fx.log)]);
    let scan = record(&ndjson(&status), "scan").clone();
    assert_eq!((scan["used_bytes"].as_u64(), scan["transactions"].as_u64()), (Some(0), Some(0)), "{scan}");
    let ps = rvm::page_size() as u64;
    let expect = LoadMap::new()
        .region(RegionSpec::new("heap", 16 << 10, 1 << 20, range.start() as u64))
        .region(RegionSpec::new("roots", 4 << 10, 4 << 10, (range.start() + (64 << 20)) as u64).copy(CopyMode::OnMap));
    // The default size is the smallest that holds the map.
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), (16 << 10) + (1 << 20));
    assert_eq!(read_load_map_file(&seg).unwrap(), expect);

    // Table.
    let o = rvmutl(&["segment", "show", s(&seg)]);
    expect_code(&o, 0);
    let text = stdout(&o);
    for needle in ["heap", "roots", "on-map", &format!("[{:#x}, ", range.start()), &format!("page size {ps:#x}")] {
        assert!(text.contains(needle), "show lacks {needle:?}:\n{text}");
    }
    // Text form: parses back to the same map.
    let o = rvmutl(&["segment", "show", s(&seg), "--spec"]);
    expect_code(&o, 0);
    assert_eq!(LoadMap::from_spec(&stdout(&o)).unwrap(), expect);
    // JSON.
    let o = rvmutl(&["segment", "show", s(&seg), "--json"]);
    expect_code(&o, 0);
    let all = ndjson(&o);
    let doc = record(&all, "segment");
    assert_eq!(doc["device_len"], (16 << 10) + (1 << 20));
    assert_eq!(doc["header_len"], ps);
    assert_eq!(doc["regions"], 2);
    let regions = records(&all, "region");
    assert_eq!(regions[0]["name"], "heap");
    assert_eq!(regions[0]["base"], range.start() as u64);
    assert_eq!(regions[1]["copy"], "on-map");
    // Through the log: the same.
    let o = rvmutl(&["segment", "show", s(&seg), "--log", s(&fx.log), "--spec"]);
    expect_code(&o, 0);
    assert_eq!(LoadMap::from_spec(&stdout(&o)).unwrap(), expect);

    // The segment loads at the addresses given on the command line.
    let rvm = Rvm::open(&fx.log, Options::default()).unwrap();
    let loaded = load_segment(&rvm, &seg).unwrap();
    assert_eq!(loaded.region("heap").unwrap().addr(), range.start());
    assert_eq!(loaded.region("roots").unwrap().len(), 4096);
}

#[test]
fn create_from_a_file_and_from_stdin() {
    let _serial = serial();
    let fx = Fixture::new();
    let range = address_range();
    let text = format!(
        "# two regions and room for more\npage_size = 4K\nheader_len = 16K\n\nindex : 16K : 64K : {:#x} # the index\nlog:80K:8K:{:#x}:no-copy\n",
        range.start(),
        range.start() + (1 << 20)
    );
    let map_file = fx.path("map.txt");
    std::fs::write(&map_file, &text).unwrap();
    let seg = fx.path("file.seg");
    let o = rvmutl(&["segment", "create", s(&seg), "--log", s(&fx.log), "--map", s(&map_file), "--size", "1M"]);
    expect_code(&o, 0);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 1 << 20);
    let map = read_load_map_file(&seg).unwrap();
    assert_eq!(map, LoadMap::from_spec(&text).unwrap());
    assert_eq!(map.header_len(), 16 << 10);
    assert_eq!(map.get("log").unwrap().copy, CopyMode::NoCopy);

    // Round trip: `show --spec` output as the input of another segment.
    let spec = stdout(&rvmutl(&["segment", "show", s(&seg), "--spec"]));
    let seg2 = fx.path("stdin.seg");
    let o = rvmutl_stdin(&["segment", "create", s(&seg2), "--log", s(&fx.log), "--map", "-"], &spec);
    expect_code(&o, 0);
    assert_eq!(read_load_map_file(&seg2).unwrap(), map);
}

#[test]
fn bad_maps_and_bad_segments_have_clear_errors_and_exit_codes() {
    let _serial = serial();
    let fx = Fixture::new();
    let seg = fx.path("x.seg");
    let create = |extra: &[&str]| {
        let mut args = vec!["segment", "create", s(&seg), "--log", s(&fx.log)];
        args.extend_from_slice(extra);
        rvmutl(&args)
    };
    // Usage and invalid maps: exit 1, nothing created.
    for (args, needle) in [
        (vec![], "required"),
        (vec!["--region", "a:8K:4K"], "expected name:offset:length:base"),
        (vec!["--region", "a:8K:4K:0x5a0000000000:sometimes"], "copy mode"),
        (vec!["--region", "a:0:4K:0x5a0000000000"], "inside the header area"),
        (vec!["--region", "a:8K:8K:0x5a0000000000", "--region", "b:12K:4K:0x5b0000000000"], "overlap in segment"),
        (vec!["--region", "a:8K:4K:0xffff800000000000"], "user half"),
        (vec!["--region", "a:8K:4K:0x5a0000000000", "--size", "8K"], "past the end of the device"),
        (vec!["--region", "a:8K:4K:0x5a0000000000", "--page-size", "3000"], "power of two"),
        (vec!["--region", "a/b:8K:4K:0x5a0000000000"], "contains '/'"),
        (vec!["--map", "/nonexistent/map.txt"], "reading the load map"),
    ] {
        let o = create(&args);
        let code = if needle == "reading the load map" { 2 } else { 1 };
        expect_code(&o, code);
        assert!(stderr(&o).contains(needle), "{args:?}: stderr lacks {needle:?}:\n{}", stderr(&o));
        assert!(!seg.exists(), "{args:?} created the segment");
    }
    let bad_file = fx.path("bad.txt");
    std::fs::write(&bad_file, "page_size = 4096\n\nok:8K:4K:0x5a0000000000\nbroken line\n").unwrap();
    let o = create(&["--map", s(&bad_file)]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("line 4"), "{}", stderr(&o));

    // An existing file is never overwritten: exit 2.
    std::fs::write(&seg, b"precious").unwrap();
    let o = create(&["--region", "a:8K:4K:0x5a0000000000"]);
    expect_code(&o, 2);
    assert_eq!(std::fs::read(&seg).unwrap(), b"precious");
    // A missing log: exit 2.
    let o = rvmutl(&[
        "segment",
        "create",
        s(&fx.path("y.seg")),
        "--log",
        s(&fx.path("no.log")),
        "--region",
        "a:8K:4K:0x5a0000000000",
    ]);
    expect_code(&o, 2);

    // Segments without a valid load map: exit 3.
    let o = rvmutl(&["segment", "show", s(&seg)]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("0x8 bytes long"), "{}", stderr(&o));
    let blank = fx.path("blank.seg");
    std::fs::write(&blank, vec![0u8; 8192]).unwrap();
    let o = rvmutl(&["segment", "show", s(&blank)]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("did not complete"), "{}", stderr(&o));
    let o = rvmutl(&["segment", "show", s(&fx.log)]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("no load map"), "{}", stderr(&o));
    let good = fx.path("good.seg");
    expect_code(
        &rvmutl(&["segment", "create", s(&good), "--log", s(&fx.log), "--region", "a:8K:4K:0x5a0000000000"]),
        0,
    );
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[70] ^= 1;
    std::fs::write(&good, &bytes).unwrap();
    let o = rvmutl(&["segment", "show", s(&good), "--json"]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    // A missing segment: exit 2.
    expect_code(&rvmutl(&["segment", "show", s(&fx.path("none.seg"))]), 2);
}

#[test]
fn show_through_the_log_sees_a_region_added_by_a_program() {
    let _serial = serial();
    let fx = Fixture::new();
    let range = address_range();
    let seg = fx.path("grow.seg");
    let first = format!("first:4K:4K:{:#x}", range.start());
    let o = rvmutl(&["segment", "create", s(&seg), "--log", s(&fx.log), "--region", &first, "--size", "64K"]);
    expect_code(&o, 0);
    {
        // A program adds a region; the change stays in the log.
        let rvm = Rvm::open(&fx.log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
        let mut loaded = load_segment(&rvm, &seg).unwrap();
        loaded.add_region(RegionSpec::new("second", 8 << 10, 4 << 10, (range.start() + (1 << 20)) as u64)).unwrap();
        // While the program runs, the map is read without a lock, as
        // recovery would leave it (in memory): the added region shows.
        let o = rvmutl(&["segment", "show", s(&seg), "--log", s(&fx.log), "--spec"]);
        expect_code(&o, 0);
        assert_eq!(LoadMap::from_spec(&stdout(&o)).unwrap().regions().len(), 2, "{}", stdout(&o));
    }
    // The file alone still shows the map as created; through the log
    // (recovery) the region added.
    let o = rvmutl(&["segment", "show", s(&seg), "--spec"]);
    expect_code(&o, 0);
    assert_eq!(LoadMap::from_spec(&stdout(&o)).unwrap().regions().len(), 1);
    let o = rvmutl(&["segment", "show", s(&seg), "--log", s(&fx.log), "--spec"]);
    expect_code(&o, 0);
    let map = LoadMap::from_spec(&stdout(&o)).unwrap();
    assert_eq!(map.regions().len(), 2);
    assert_eq!(map.get("second").unwrap().base, (range.start() + (1 << 20)) as u64);
}

/// Runs `rvmutl` with `args`, killing it if it has not ended within
/// `limit` (so a command that blocks fails the test instead of hanging it).
fn rvmutl_within(args: &[&str], limit: std::time::Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rvmutl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running rvmutl");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("waiting for rvmutl").is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().expect("killing rvmutl");
            let o = child.wait_with_output().expect("reaping rvmutl");
            panic!("rvmutl {args:?} still running after {limit:?} (blocked?); stderr:\n{}", stderr(&o));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().expect("collecting rvmutl's output")
}

/// A FIFO is neither a segment nor a log: every command that opens one
/// refuses it at once, with a non-zero exit. (`segment show` used to block
/// forever in `open`, waiting for a writer to open the FIFO's other end.)
#[test]
fn a_fifo_is_refused_without_blocking() {
    use rustix::fs::{FileType, Mode, CWD};
    let _serial = serial();
    let fx = Fixture::new();
    let fifo = fx.path("fifo");
    rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).expect("mkfifo");
    let limit = std::time::Duration::from_secs(10);
    let (f, log) = (s(&fifo), s(&fx.log));
    // `segment show` reads the file itself: a clear refusal, exit 2.
    for args in [vec!["segment", "show", f], vec!["segment", "show", f, "--json"]] {
        let o = rvmutl_within(&args, limit);
        expect_code(&o, 2);
        assert!(stderr(&o).contains("not a regular file or block device (a FIFO)"), "{args:?}:\n{}", stderr(&o));
    }
    // The others go through the library's devices (opened read-write, which
    // does not wait for a FIFO's other end) and refuse what they read.
    for args in [
        vec!["status", f],
        vec!["dump", f],
        vec!["recover", f],
        vec!["truncate", f],
        vec!["checkpoint", f],
        vec!["segment", "show", f, "--log", log],
        vec!["heap", "check", "--log", log, f],
        vec!["heap", "stats", "--log", log, f],
    ] {
        let o = rvmutl_within(&args, limit);
        assert_ne!(o.status.code(), Some(0), "{args:?} accepted a FIFO:\n{}", stdout(&o));
        assert!(stderr(&o).starts_with("rvmutl: error: "), "{args:?}:\n{}", stderr(&o));
    }
    // A FIFO as the load map file: `segment create --map FIFO` used to block
    // in `open` for good, waiting for a writer. Now a FIFO without a writer
    // reads as empty at once and is refused as a usage error; nothing is
    // created and the log is not opened.
    let seg = fx.path("from-fifo.seg");
    let log_before = std::fs::read(&fx.log).unwrap();
    let o = rvmutl_within(&["segment", "create", s(&seg), "--log", log, "--map", f], limit);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("without a writer"), "{}", stderr(&o));
    assert!(!seg.exists());
    assert!(std::fs::read(&fx.log).unwrap() == log_before, "the refusal wrote the log");
}

/// A load map file that is not text (binary bytes, or text with a byte
/// that is not UTF-8) exited 2, "I/O error", as if the disk had failed; it
/// is a bad map, exit 1, naming the line, and nothing is created. So is a
/// file longer than any load map.
#[test]
fn a_map_file_that_is_not_text_is_a_usage_error() {
    let _serial = serial();
    let fx = Fixture::new();
    let seg = fx.path("x.seg");
    let not_utf8 = fx.path("bad.map");
    std::fs::write(&not_utf8, b"a:8K:4K:0x5a0000000000\nb\xff:12K:4K:0x5b0000000000\n").unwrap();
    let o = rvmutl(&["segment", "create", s(&seg), "--log", s(&fx.log), "--map", s(&not_utf8)]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("line 2") && stderr(&o).contains("not UTF-8"), "{}", stderr(&o));
    let long = fx.path("long.map");
    std::fs::write(&long, "# padding\n".repeat(500_000)).unwrap();
    let o = rvmutl(&["segment", "create", s(&seg), "--log", s(&fx.log), "--map", s(&long)]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("not a load map"), "{}", stderr(&o));
    assert!(!seg.exists());
}
