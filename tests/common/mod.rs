//! Helpers shared by the integration tests: running `rvmutl` as a separate
//! process and checking what it printed and returned (`tests/cli*.rs`),
//! killing a child test process (`tests/kill9*.rs`), and a fresh instance
//! with a reader of its regions (`tests/careless.rs`,
//! `tests/hostile_caller.rs`).
#![allow(dead_code)] // each test file uses its own subset

use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Serializes the tests of one file. A process spawned by one test thread
/// briefly holds duplicates of every file descriptor of the test process
/// (between fork and exec), and with them the `flock` of any log another
/// test has open, so a test reopening its log right after closing it could
/// see a spurious "in use" error.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `rvmutl` with `args`.
pub fn rvmutl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rvmutl")).args(args).output().expect("running rvmutl")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing the output when it differs.
#[track_caller]
pub fn expect_code(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

/// Parses newline-delimited JSON (`--json`): every line must be one JSON
/// object with a string `"type"`.
#[track_caller]
pub fn ndjson(o: &Output) -> Vec<serde_json::Value> {
    let text = stdout(o);
    assert!(text.is_empty() || text.ends_with('\n'), "NDJSON output does not end with a newline:\n{text}");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("line {} is not JSON ({e}): {line:?}\nstderr:\n{}", i + 1, stderr(o)));
            assert!(v.is_object() && v["type"].is_string(), "line {} is not a typed object: {line}", i + 1);
            v
        })
        .collect()
}

/// The NDJSON records of one type.
pub fn records<'a>(records: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    records.iter().filter(|r| r["type"] == kind).collect()
}

/// The one NDJSON record of a type.
#[track_caller]
pub fn record<'a>(all: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found = records(all, kind);
    assert_eq!(found.len(), 1, "expected one {kind:?} record in {all:?}");
    found[0]
}

/// `status --json` or `dump --json` gathered into one object: the "log"
/// record's fields, plus "slots" (the slot records), "frames" (the frame
/// records) and "scan" (the scan record, or null).
#[track_caller]
pub fn log_doc(o: &Output) -> serde_json::Value {
    let all = ndjson(o);
    let mut doc = record(&all, "log").clone();
    doc["slots"] = serde_json::Value::Array(records(&all, "slot").into_iter().cloned().collect());
    doc["frames"] = serde_json::Value::Array(records(&all, "frame").into_iter().cloned().collect());
    doc["scan"] = records(&all, "scan").first().map_or(serde_json::Value::Null, |s| (*s).clone());
    doc
}

/// SIGKILLs a child test process and reaps it; panics, showing what it
/// wrote to `stderr_file`, if it had ended by itself or by another signal.
pub fn kill_child(child: &mut std::process::Child, stderr_file: &std::path::Path) {
    use std::os::unix::process::ExitStatusExt;
    let err = || std::fs::read_to_string(stderr_file).unwrap_or_default();
    if let Some(status) = child.try_wait().unwrap() {
        panic!("the child ended by itself ({status}) before the kill:\n{}", err());
    }
    child.kill().expect("killing the child");
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the child ended with {status}, not by SIGKILL:\n{}", err());
}

/// A new 4 MiB log in `dir`, opened with the default options.
pub fn setup(dir: &std::path::Path) -> rvm::Rvm {
    rvm::create_log(dir.join("log"), 4 << 20).unwrap();
    rvm::Rvm::open(dir.join("log"), rvm::Options::default()).unwrap()
}

/// `n` bytes of `r` from `off`.
pub fn read(r: &rvm::Region, off: usize, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    // SAFETY: no other thread stores into the region meanwhile.
    unsafe { r.read(off, &mut v).unwrap() };
    v
}

/// A temporary path as the `&str` an `rvmutl` argument list takes.
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
