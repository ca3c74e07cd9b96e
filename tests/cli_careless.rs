//! `rvmutl` driven carelessly: garbage for every argument and every path
//! (missing files, folders, FIFOs, symlink loops, character devices, a
//! segment where a log belongs and the reverse, a log another process
//! holds). Each run ends within a time limit with exit code 0-3 and a
//! one-line `rvmutl: error:` first, never a panic; a refusal leaves every
//! file byte-identical (the log's status too: an open starts a new epoch,
//! so what can be refused before the log is opened is refused before).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{expect_code, s, serial, stderr};

/// Runs `rvmutl`, failing the test if it has not ended within 20 s.
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rvmutl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running rvmutl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("waiting for rvmutl").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("killing rvmutl");
            let o = child.wait_with_output().expect("reaping rvmutl");
            panic!("rvmutl {args:?} still running after 20 s; stderr:\n{}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("collecting rvmutl's output")
}

/// The regular files of `dir` and their bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// A log, a heap and a plain segment made through it, and the oddities.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        use rustix::fs::{FileType, Mode, CWD};
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture { dir };
        expect_code(&run(&["create-log", s(&fx.p("log")), "--size", "1M"]), 0);
        let (log, heap, seg) = (fx.p("log"), fx.p("heap"), fx.p("seg"));
        expect_code(
            &run(&["heap", "create", s(&heap), "--log", s(&log), "--size", "64K", "--base", "0x5e1000000000"]),
            0,
        );
        expect_code(&run(&["segment", "create", s(&seg), "--log", s(&log), "--region", "r:4K:8K:0x5e2000000000"]), 0);
        rustix::fs::mknodat(CWD, fx.p("fifo"), FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        std::os::unix::fs::symlink(fx.p("loop2"), fx.p("loop1")).unwrap();
        std::os::unix::fs::symlink(fx.p("loop1"), fx.p("loop2")).unwrap();
        std::fs::create_dir(fx.p("folder")).unwrap();
        fx
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[track_caller]
fn refused(fx: &Fixture, args: &[&str], codes: &[i32]) -> String {
    let before = files(fx.dir.path());
    let o = run(args);
    let err = stderr(&o);
    let code = o.status.code();
    assert!(code.is_some_and(|c| codes.contains(&c)), "{args:?}: exit {:?}, wanted one of {codes:?}:\n{err}", o.status);
    assert!(!err.contains("panicked"), "{args:?}:\n{err}");
    assert!(err.starts_with("rvmutl: error: "), "{args:?}:\n{err}");
    let after = files(fx.dir.path());
    for (p, bytes) in &before {
        assert!(after.get(p) == Some(bytes), "{args:?} was refused but changed {}:\n{err}", p.display());
    }
    assert_eq!(before.len(), after.len(), "{args:?} was refused but left a file behind:\n{err}");
    err
}

/// Commands that write, refused before they open the log: the log used
/// to get a new epoch in its status (and a heap a new owner), although
/// the command changed nothing.
#[test]
fn refused_writes_leave_every_file_byte_identical() {
    let _serial = serial();
    let fx = Fixture::new();
    let log = fx.p("log");
    let log = s(&log);
    let (heap, seg, fifo, loop1, folder) = (fx.p("heap"), fx.p("seg"), fx.p("fifo"), fx.p("loop1"), fx.p("folder"));
    let (heap, seg, fifo, loop1, folder) = (s(&heap), s(&seg), s(&fifo), s(&loop1), s(&folder));
    let missing_folder = fx.p("no/such/file");
    let missing_folder = s(&missing_folder);
    let region = "r:4K:4K:0x5e3000000000";
    for existing in [heap, seg, fifo, loop1, folder, log, "/dev/null"] {
        let e = refused(&fx, &["segment", "create", existing, "--log", log, "--region", region], &[2]);
        assert!(e.contains("exists") || e.contains("/dev/null"), "{e}");
        refused(&fx, &["heap", "create", existing, "--log", log, "--size", "64K", "--base", "0x5e4000000000"], &[2]);
    }
    refused(&fx, &["segment", "create", missing_folder, "--log", log, "--region", region], &[2]);
    refused(&fx, &["heap", "create", missing_folder, "--log", log, "--size", "64K", "--base", "0x5e4000000000"], &[2]);
    // Not a heap, or no segment at all.
    let e = refused(&fx, &["heap", "grow", seg, "--log", log, "--size", "128K"], &[3]);
    assert!(e.contains("not a heap segment"), "{e}");
    for garbage in [fifo, loop1, folder, "/dev/null", missing_folder] {
        refused(&fx, &["heap", "grow", garbage, "--log", log, "--size", "128K"], &[2]);
    }
    // A --max the load map's rules refuse (past the 1 TiB region limit):
    // refused before the log is opened, as a bad --size is.
    let e = refused(&fx, &["heap", "grow", heap, "--log", log, "--size", "128K", "--max", "2T"], &[1]);
    assert!(e.contains("maximum length"), "{e}");
    // Load maps the loader refuses, before the log is opened.
    let bad = fx.p("new.seg");
    for spec in ["r:4K:4K:1", "r:4K:0:0x5e3000000000", "r:1:4K:0x5e3000000000", "r:4K:4K:0xffffffffffff0000"] {
        refused(&fx, &["segment", "create", s(&bad), "--log", log, "--region", spec], &[1]);
    }
    for (size, base) in
        [("64K", "1"), ("0", "0x5e4000000000"), ("64K", "0xfffffffffffff000"), ("16E", "0x5e4000000000")]
    {
        refused(&fx, &["heap", "create", s(&bad), "--log", log, "--size", size, "--base", base], &[1]);
    }
}

/// Every command, every path argument given garbage: exit 1-3, one error
/// line first, no panic, no wait, and nothing written.
#[test]
fn garbage_paths_through_every_command() {
    let _serial = serial();
    let fx = Fixture::new();
    let (log, heap, seg) = (fx.p("log"), fx.p("heap"), fx.p("seg"));
    let (log, heap, seg) = (s(&log), s(&heap), s(&seg));
    let garbage: Vec<String> = ["fifo", "loop1", "folder", "missing", ""]
        .iter()
        .map(|n| if n.is_empty() { String::new() } else { s(&fx.p(n)).to_string() })
        .chain(["/dev/null".to_string(), "/dev/zero".to_string()])
        .collect();
    for g in &garbage {
        let g = g.as_str();
        for args in [
            vec!["status", g],
            vec!["status", "--json", g],
            vec!["dump", g],
            vec!["recover", g],
            vec!["recover", "--salvage", g],
            vec!["truncate", g],
            vec!["checkpoint", g],
            vec!["segment", "show", g],
            vec!["segment", "show", seg, "--log", g],
            vec!["heap", "check", g, "--log", log],
            vec!["heap", "check", heap, "--log", g],
            vec!["heap", "stats", "--json", g, "--log", log],
            vec!["heap", "grow", heap, "--log", g, "--size", "128K"],
            vec!["segment", "create", s(&fx.p("n.seg")), "--log", g, "--region", "r:4K:4K:0x5e3000000000"],
            vec!["heap", "create", s(&fx.p("n.heap")), "--log", g, "--size", "64K", "--base", "0x5e4000000000"],
        ] {
            refused(&fx, &args, &[1, 2, 3]);
        }
    }
    // A segment where a log belongs, a log where a segment belongs.
    for args in [
        vec!["status", heap],
        vec!["dump", seg],
        vec!["recover", heap],
        vec!["truncate", seg],
        vec!["checkpoint", heap],
        vec!["segment", "show", log],
        vec!["heap", "check", log, "--log", log],
        vec!["heap", "stats", heap, "--log", heap],
        vec!["heap", "grow", log, "--log", log, "--size", "128K"],
        vec!["heap", "grow", heap, "--log", heap, "--size", "128K"],
    ] {
        refused(&fx, &args, &[2, 3]);
    }
}

/// Sizes and numbers that are not: usage errors (exit 1), nothing created.
#[test]
fn garbage_numbers_are_usage_errors() {
    let _serial = serial();
    let fx = Fixture::new();
    let log = fx.p("log");
    let (log, heap, new) = (s(&log), fx.p("heap"), fx.p("new"));
    let (heap, new) = (s(&heap), s(&new));
    for size in ["1", "4095", "195K"] {
        refused(&fx, &["create-log", new, "--size", size], &[1]);
    }
    for size in ["", "-1", "abc", "1.5M", "0x", "99999999999999999999", "16E", "1Q", "0", "196K-1"] {
        refused(&fx, &["create-log", new, "--size", size], &[1]);
        refused(&fx, &["heap", "create", new, "--log", log, "--size", size, "--base", "0x5e4000000000"], &[1]);
        refused(&fx, &["heap", "grow", heap, "--log", log, "--max", size, "--size", "abc"], &[1]);
        refused(
            &fx,
            &["segment", "create", new, "--log", log, "--region", &format!("r:4K:{size}:0x5e3000000000")],
            &[1],
        );
    }
    for base in ["", "-4096", "0x", "zz", "18446744073709551616"] {
        refused(&fx, &["heap", "create", new, "--log", log, "--size", "64K", "--base", base], &[1]);
    }
    refused(&fx, &["completions", "tcsh"], &[1]);
    refused(&fx, &["no-such-command"], &[1]);
    refused(&fx, &["status"], &[1]);
}

/// A log another process holds: commands that write refuse it (exit 2)
/// and change nothing; inspection works.
#[test]
fn a_log_held_by_another_process_is_refused_by_writers() {
    let _serial = serial();
    let fx = Fixture::new();
    let log = fx.p("log");
    let rvm = rvm::Rvm::open(&log, rvm::Options::default()).unwrap();
    let (log, heap, seg) = (s(&log), fx.p("heap"), fx.p("seg"));
    let (heap, seg) = (s(&heap), s(&seg));
    for args in [
        vec!["recover", log],
        vec!["truncate", log],
        vec!["checkpoint", log],
        vec!["heap", "grow", heap, "--log", log, "--size", "128K"],
        vec!["segment", "create", s(&fx.p("n.seg")), "--log", log, "--region", "r:4K:4K:0x5e3000000000"],
    ] {
        let e = refused(&fx, &args, &[2]);
        assert!(e.contains("in use") || e.contains("locked"), "{args:?}: {e}");
    }
    for args in [
        vec!["status", log],
        vec!["dump", log],
        vec!["heap", "check", heap, "--log", log],
        vec!["segment", "show", seg],
    ] {
        expect_code(&run(&args), 0);
    }
    drop(rvm);
}

/// `heap grow --size S --max M` with S past the old maximum raised the
/// maximum, then failed the growth as "the address range after it is taken
/// by another mapping" (exit 2): the heap keeps the address space it
/// reserved at load, and the command grew it in the same load. Now it
/// loads the heap again after raising the maximum. A --size past the new
/// maximum is refused before the log is opened, changing nothing.
#[test]
fn heap_grow_past_the_old_maximum_with_a_new_one_works() {
    let _serial = serial();
    let fx = Fixture::new();
    let (log, heap) = (fx.p("log"), fx.p("heap"));
    let (log, heap) = (s(&log), s(&heap));
    expect_code(&run(&["heap", "grow", heap, "--log", log, "--max", "128K"]), 0);
    let e = refused(&fx, &["heap", "grow", heap, "--log", log, "--size", "1M", "--max", "512K"], &[1]);
    assert!(e.contains("maximum"), "{e}");
    let e = refused(&fx, &["heap", "grow", heap, "--log", log, "--size", "256K"], &[1]);
    assert!(e.contains("maximum"), "{e}");
    let o = run(&["heap", "grow", heap, "--log", log, "--size", "512K", "--max", "1M"]);
    expect_code(&o, 0);
    assert!(common::stdout(&o).contains("-> 524288 bytes (maximum 1048576 bytes)"), "{}", common::stdout(&o));
    let o = run(&["heap", "check", heap, "--log", log]);
    expect_code(&o, 0);
}

/// A heap segment a program holds (its lock): `heap grow` refuses it
/// before the log is opened, so the log is byte-identical too.
#[test]
fn heap_grow_of_a_segment_in_use_changes_nothing() {
    let _serial = serial();
    let fx = Fixture::new();
    let (log, heap) = (fx.p("log"), fx.p("heap"));
    let held = std::fs::File::open(&heap).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let e = refused(&fx, &["heap", "grow", s(&heap), "--log", s(&log), "--size", "128K"], &[2]);
    assert!(e.contains("in use"), "{e}");
    drop(held);
    expect_code(&run(&["heap", "grow", s(&heap), "--log", s(&log), "--size", "128K"]), 0);
}
