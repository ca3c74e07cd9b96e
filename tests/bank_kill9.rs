//! The `bank` example under real `kill -9`: every transfer it reported
//! committed is in the history after the kill, and the bank's checks pass
//! (the money is all there, branch totals match, one history record per
//! transfer). `RVM_KILL9_ROUNDS` sets the rounds (default 4).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The example binary `cargo test` builds next to the test binaries.
fn bank_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().and_then(Path::parent).unwrap();
    let bin = target.join("examples").join("bank");
    if !bin.exists() {
        let profile = if target.ends_with("release") { vec!["--release"] } else { vec![] };
        let st = Command::new(env!("CARGO")).args(["build", "--example", "bank"]).args(profile).status().unwrap();
        assert!(st.success(), "building the bank example failed");
    }
    bin
}

/// Runs the bank once (no new transfers) and returns the transfer count it
/// found; panics if its checks fail.
fn audit(bin: &Path, dir: &Path) -> u64 {
    let out = Command::new(bin).arg(dir).arg("0").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the bank's checks failed after a kill:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text.lines().find(|l| l.contains("transfers so far")).unwrap_or_else(|| panic!("no summary in {text}"));
    line.split(": ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap()
}

#[test]
fn every_reported_transfer_survives_kill_9() {
    let bin = bank_binary();
    let dir = tempfile::tempdir().unwrap();
    let rounds: usize = std::env::var("RVM_KILL9_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let mut acknowledged = 0u64;
    for round in 0..rounds {
        let mut child = Command::new(&bin)
            .arg(dir.path())
            .arg("1000000")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("committed transfer ") {
                    let _ = tx.send(n.trim().parse::<u64>().unwrap());
                }
            }
        });
        // Kill it after it has reported at least one batch this round, at
        // a point that varies with the round.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen_this_round = 0;
        while seen_this_round < 1 + round % 3 && Instant::now() < deadline {
            if let Ok(n) = rx.recv_timeout(Duration::from_millis(100)) {
                acknowledged = acknowledged.max(n);
                seen_this_round += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(7 * round as u64));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok(n) = rx.try_recv() {
            acknowledged = acknowledged.max(n);
        }
        assert!(seen_this_round > 0, "round {round}: the bank reported nothing in 60 s");
        let found = audit(&bin, dir.path());
        assert!(
            found >= acknowledged,
            "round {round}: {acknowledged} transfers were reported committed, {found} survived"
        );
    }
}

/// A damaged heap segment makes the bank exit with an error (code 1) that
/// says what is wrong, never a panic: pages of the heap overwritten with
/// `0x7f` bytes gave balances whose sum overflowed `i64` (a panic in the
/// audit) before the audit checked shapes and ranges first.
#[test]
fn a_damaged_bank_is_an_error_not_a_panic() {
    use std::os::unix::fs::FileExt;
    let bin = bank_binary();
    let dir = tempfile::tempdir().unwrap();
    let first = Command::new(&bin).arg(dir.path()).arg("10").output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let seg = dir.path().join("heap.seg");
    let clean = std::fs::read(&seg).unwrap();
    let mut refused = 0;
    for page in 2..12u64 {
        let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        file.write_all_at(&[0x7f; 4096], page * 4096).unwrap();
        drop(file);
        let out = Command::new(&bin).arg(dir.path()).arg("0").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                assert!(err.starts_with("bank: error: "), "page {page}: {err}");
                refused += 1;
            }
            other => panic!("page {page}: exit {other:?} (a panic or a signal):\n{err}"),
        }
        // Put the page back in place (the file keeps its identity).
        let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        file.write_all_at(&clean[(page * 4096) as usize..][..4096], page * 4096).unwrap();
    }
    assert!(refused > 0, "no damaged page was noticed");
}
