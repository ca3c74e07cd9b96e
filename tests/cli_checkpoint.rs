//! `rvmutl checkpoint` and the checkpoint fields of `rvmutl status`, run as
//! a separate process on real files.

use rvm::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};
use serde_json::Value;

mod common;
use common::{expect_code, rvmutl, serial, stdout};

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
    let o = rvmutl(&["checkpoint", l]);
    expect_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("transactions replayed:  1"), "{out}");
    assert!(out.contains("checkpoint at log position"), "{out}");
    assert!(out.contains("generation 1"), "{out}");
    assert_eq!(&std::fs::read(&seg).unwrap()[100..112], b"checkpointed");
    let o = rvmutl(&["status", l, "--json"]);
    expect_code(&o, 0);
    let json: Value = common::log_doc(&o);
    let text = json.to_string();
    assert!(text.contains("\"checkpoint_generation\":1"), "{text}");
    // A second checkpoint: generation 2.
    let o = rvmutl(&["checkpoint", l]);
    expect_code(&o, 0);
    let out = stdout(&o);
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
