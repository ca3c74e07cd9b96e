//! Damaged files through every `rvmutl` command: a log and a heap segment
//! with committed transactions still in the log get random byte changes
//! (and sometimes a cut), then every command runs on them. Each must end
//! with one of the documented exit codes (0-3) and no panic; and when
//! `status` finds the log damaged, the commands that write (`recover`,
//! `truncate`, `checkpoint`) must refuse with 3 and change no byte of
//! either file (nothing is written before the user salvages).
//!
//! Every third copy has one bit flipped in a synced record, which must be
//! reported as damage. 10 damaged copies by default; `RVM_DEEP_TESTS=1`
//! runs 150.

use proptest::prelude::Rng as _;
use proptest::test_runner::{RngAlgorithm, TestRng};
use rvm::heap::{HeapSpec, PersistentHeap};
use rvm::{CommitMode, Options, RestoreMode, Rvm};
use std::alloc::Layout;
use std::path::{Path, PathBuf};

mod common;
use common::{expect_code, ndjson, record, rvmutl, s, serial, stderr};

const BASE: u64 = 0x5d40_0000_0000;

/// A log (2 MiB) and a 1 MiB heap whose last transactions are still in
/// the log (the instance dropped without truncating, as after a crash).
fn pristine(dir: &Path) -> (PathBuf, PathBuf) {
    let (log, heap) = (dir.join("app.log"), dir.join("app.heap"));
    expect_code(&rvmutl(&["create-log", s(&log), "--size", "2M"]), 0);
    let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
    let h = PersistentHeap::create(&rvm, &heap, &HeapSpec::new(BASE, 1 << 20)).unwrap();
    for round in 0..20u64 {
        let mut tx = h.begin(RestoreMode::Restore).unwrap();
        let p = tx.malloc(Layout::from_size_align(24 + round as usize * 8, 8).unwrap()).unwrap();
        tx.set_root(&format!("r{}", round % 7), Some((p, 24, round))).unwrap();
        tx.commit(if round % 3 == 0 { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
    }
    rvm.flush().unwrap();
    drop(h);
    drop(rvm);
    (log, heap)
}

/// A seeded random source (the same damage in every run).
struct Rng(TestRng);

impl Rng {
    fn new() -> Rng {
        Rng(TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n.max(1)
    }
}

/// Changes a few bytes of `path` (mostly near the start, where headers,
/// status slots and the first records are), sometimes cuts it.
fn damage(path: &Path, rng: &mut Rng) {
    let mut bytes = std::fs::read(path).unwrap();
    for _ in 0..1 + rng.below(6) {
        let span = [8192, 65_536, 300_000, bytes.len() as u64][rng.below(4) as usize];
        let at = rng.below(span.min(bytes.len() as u64)) as usize;
        bytes[at] ^= 1 << rng.below(8);
    }
    if rng.below(8) == 0 {
        bytes.truncate(rng.below(bytes.len() as u64) as usize);
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_files_through_every_command() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (log, heap) = pristine(dir.path());
    let (log_bytes, heap_bytes) = (std::fs::read(&log).unwrap(), std::fs::read(&heap).unwrap());
    // Where the log's records lie in the file (a new log: they do not wrap).
    let status = ndjson(&rvmutl(&["status", "--json", s(&log)]));
    let area_offset = record(&status, "log")["superblock"]["area_offset"].as_u64().unwrap();
    let scan = record(&status, "scan");
    let (first, end) = (scan["start"].as_u64().unwrap(), scan["end"].as_u64().unwrap());
    assert!(end > first, "the pristine log holds no records: {scan}");
    let rounds = if std::env::var_os("RVM_DEEP_TESTS").is_some() { 150 } else { 10 };
    let mut rng = Rng::new();
    let mut refused = 0;
    for round in 0..rounds {
        let work = dir.path().join(format!("round-{round}"));
        std::fs::create_dir_all(&work).unwrap();
        let (wlog, wheap) = (work.join("app.log"), work.join("app.heap"));
        std::fs::write(&wlog, &log_bytes).unwrap();
        std::fs::write(&wheap, &heap_bytes).unwrap();
        if round % 3 == 0 {
            // One bit of a synced record: damage the log must refuse.
            let at = (area_offset + first + rng.below(end - first)) as usize;
            let mut bytes = log_bytes.clone();
            bytes[at] ^= 1 << rng.below(8);
            std::fs::write(&wlog, bytes).unwrap();
        } else {
            damage(if rng.below(3) == 0 { &wheap } else { &wlog }, &mut rng);
        }
        let status = rvmutl(&["status", "--json", s(&wlog)]);
        let damaged = status.status.code() == Some(3)
            || (status.status.code() == Some(0) && !record(&ndjson(&status), "scan")["damage"].is_null());
        assert!(damaged || round % 3 != 0, "round {round}: a flipped bit in a synced record went unseen");
        let inspect: [&[&str]; 6] = [
            &["status", s(&wlog)],
            &["dump", s(&wlog)],
            &["dump", "--json", s(&wlog)],
            &["heap", "check", s(&wheap), "--log", s(&wlog)],
            &["heap", "stats", "--json", s(&wheap), "--log", s(&wlog)],
            &["segment", "show", s(&wheap)],
        ];
        for args in inspect {
            let o = rvmutl(args);
            let code = o.status.code();
            assert!(matches!(code, Some(0..=3)), "round {round}: {args:?} ended with {:?}: {}", o.status, stderr(&o));
            assert!(!stderr(&o).contains("panicked"), "round {round}: {args:?}: {}", stderr(&o));
        }
        let before = (std::fs::read(&wlog).unwrap(), std::fs::read(&wheap).unwrap());
        for cmd in ["recover", "truncate", "checkpoint"] {
            let o = rvmutl(&[cmd, s(&wlog)]);
            let code = o.status.code();
            assert!(matches!(code, Some(0..=3)), "round {round}: {cmd} ended with {:?}: {}", o.status, stderr(&o));
            assert!(!stderr(&o).contains("panicked"), "round {round}: {cmd}: {}", stderr(&o));
            if damaged {
                assert_eq!(code, Some(3), "round {round}: {cmd} on a damaged log: {}", stderr(&o));
                let after = (std::fs::read(&wlog).unwrap(), std::fs::read(&wheap).unwrap());
                assert!(after == before, "round {round}: {cmd} wrote to the files of a damaged log");
                refused += 1;
            }
        }
        std::fs::remove_dir_all(&work).unwrap();
    }
    // Every third round damages a synced record (else the refusal half
    // above would check nothing).
    eprintln!("refusals checked: {refused} in {rounds} rounds");
    assert!(refused > 0, "no round damaged the log");
}
