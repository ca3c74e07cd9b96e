//! The `tracked_map` example (`examples/tracked_map.rs`) under `kill -9`: a
//! child (this test binary re-executed with `RVM_TRACKED_MAP_CHILD` naming
//! the data folder) adds rounds of 1,000 entries to a plain
//! `hashbrown::HashMap` in a tracked heap, printing each round once it is
//! flush-committed; the parent SIGKILLs it at a random moment, reopens the
//! heap and checks that the map holds whole rounds only, at least every
//! round the child reported. Three kills per run (more with
//! `RVM_KILL9_ROUNDS`), with each tracking method.

#[allow(dead_code)]
#[path = "../examples/tracked_map.rs"]
mod tracked_map;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "RVM_TRACKED_MAP_CHILD";
/// `1` in the child: track with the write-protect method.
const WP_ENV: &str = "RVM_TRACKED_MAP_WP";

/// Whether the kernel offers write-protect tracking here.
fn wp_available() -> bool {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
    let rvm = rvm::Rvm::open(dir.path().join("log"), rvm::Options::default()).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
    let region = rvm.map(&seg, rvm::MapSpec::new(0, 4096)).unwrap();
    match rvm.track_with(&region, rvm::TrackingMethod::WriteProtect) {
        Ok(()) => true,
        Err(rvm::Error::Map(rvm::MapError::TrackingUnavailable { .. })) => false,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn child_adds_rounds_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let tracking = if std::env::var(WP_ENV).as_deref() == Ok("1") {
        rvm::TrackingMethod::WriteProtect
    } else {
        rvm::TrackingMethod::Fault
    };
    let mut store = tracked_map::open(Path::new(&dir), rvm::Options { tracking, ..rvm::Options::default() }).unwrap();
    store.check().unwrap();
    loop {
        let round = store.add_round().unwrap();
        println!("{round}");
    }
}

#[test]
fn a_plain_hashbrown_map_survives_kill_9() {
    kill_9(false);
}

#[test]
fn a_plain_hashbrown_map_survives_kill_9_write_protect() {
    if wp_available() {
        kill_9(true);
    }
}

/// Serializes the parents of this file's tests: both map the example's
/// heap at its one fixed base address (two at once: `AddressInUse`), and a
/// child spawned by one test briefly holds duplicates of every descriptor
/// of the test process (between fork and exec), and with them the `flock`
/// of the log the other test has open.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kill_9(wp: bool) {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let kills: u32 = std::env::var("RVM_KILL9_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut reported = 0;
    for kill in 0..kills {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child_adds_rounds_until_killed", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .env(WP_ENV, if wp { "1" } else { "0" })
            .env_remove("RUST_TEST_THREADS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Let it commit a few rounds, then kill it at a random moment.
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let extra = Duration::from_millis((seed >> 33) % 40);
        // Kept open until the child is dead: a closed pipe would end it.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let start = Instant::now();
        let mut seen = 0;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Ok(round) = line.trim().parse::<u64>() {
                reported = reported.max(round);
                seen += 1;
            }
            if seen >= 3 || start.elapsed() > Duration::from_secs(60) {
                break;
            }
        }
        std::thread::sleep(extra);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "kill {kill}: the child ended by itself: {status}");
        assert!(seen > 0, "kill {kill}: the child committed nothing");
        drop(lines);
        // No background thread: closing releases the files at once for the
        // next child.
        let opts = rvm::Options { truncate_threshold: None, ..rvm::Options::default() };
        let store = tracked_map::open(&dir, opts).unwrap();
        let rounds = store.check().unwrap_or_else(|e| panic!("kill {kill}: {e}"));
        assert!(rounds >= reported, "kill {kill}: {rounds} rounds recovered, {reported} were reported committed");
        store.heap.check().unwrap();
        store.heap.close().unwrap();
        store.rvm.close().unwrap();
    }
}
