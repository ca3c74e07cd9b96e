//! `rvmutl checkpoint` and the checkpoint fields of `rvmutl status`, run as
//! a separate process on real files.

use rvm::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};
use serde_json::Value;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Serializes the tests of this file: a process spawned by one test holds
/// duplicates of the test process's file descriptors between fork and exec,
/// and with them the lock of a log another test has open.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn rvmutl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rvmutl")).args(args).output().expect("running rvmutl")
}

#[track_caller]
fn expect_code(o: &Output, code: i32) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(code), "stdout:\n{out}\nstderr:\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn checkpoint_replays_and_records_its_position() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let seg = dir.path().join("seg");
    create_log(&log, 1 << 20).unwrap();
    {
        let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
        let s = rvm.create_segment(&seg, 1 << 16).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, 1 << 16)).unwrap();
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        // SAFETY: single-threaded; inside the region.
        unsafe { tx.modify_bytes(r.addr() + 100, b"checkpointed").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
        // The commit stays in the log (no truncation, no checkpoint).
    }
    assert_ne!(&std::fs::read(&seg).unwrap()[100..112], b"checkpointed");
    let l = log.to_str().unwrap();
    let out = expect_code(&rvmutl(&["checkpoint", l]), 0);
    assert!(out.contains("transactions replayed:  1"), "{out}");
    assert!(out.contains("checkpoint at log position"), "{out}");
    assert!(out.contains("generation 1"), "{out}");
    assert_eq!(&std::fs::read(&seg).unwrap()[100..112], b"checkpointed");
    let json: Value = serde_json::from_str(&expect_code(&rvmutl(&["status", l, "--json"]), 0)).unwrap();
    let text = json.to_string();
    assert!(text.contains("\"checkpoint_generation\":1"), "{text}");
    // A second checkpoint: generation 2.
    let out = expect_code(&rvmutl(&["checkpoint", l]), 0);
    assert!(out.contains("generation 2"), "{out}");
}

#[test]
fn checkpoint_on_bad_files_fails_cleanly() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 300_000]).unwrap();
    let o = rvmutl(&["checkpoint", junk.to_str().unwrap()]);
    expect_code(&o, 3);
    let o = rvmutl(&["checkpoint", dir.path().join("missing").to_str().unwrap()]);
    expect_code(&o, 2);
}
