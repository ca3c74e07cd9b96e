//! Real-process crash tests on real files: `kill -9` at a random moment.
//!
//! Each test re-runs this test binary as a child process
//! (`std::env::current_exe()`, filtered with `--exact` to the same test
//! function) with the environment variable `RVM_KILL9_CHILD` naming a work
//! folder. When that variable is set, the test function runs the child's
//! workload instead of the parent's logic; in a normal `cargo test` run it is
//! unset and the function is the parent.
//!
//! * `kill9_recovery_keeps_a_committed_prefix`: the child opens a log and a
//!   segment (files in a temporary folder) and commits numbered transactions
//!   forever, mixing flush and no-flush commits, restore and no-restore
//!   transactions, aborts, explicit flushes and truncations, on a small log so
//!   that background truncation and log-full waits run all the time. After
//!   every flush commit (and explicit flush) returns, it appends the committed
//!   number to a side file with its own `fsync`: a lower bound of what must be
//!   durable. The parent kills the child with `SIGKILL` after a random 20-300
//!   ms, reads the raw segment file (no-steal check), opens the instance
//!   (recovery), and checks that the recovered state is exactly the state
//!   after one transaction `c` (counter, slot array, striped page-crossing
//!   payloads and a header checksum all agree; nothing partial), that `c` is
//!   at least the last number of the side file and at least the previous
//!   round's `c`, and that the segment file holds what the mapping shows. The
//!   next round's child continues from the recovered state, so recovery runs
//!   again and again on the same files (sometimes on a child killed during
//!   its own recovery).
//! * `kill9_second_process_is_locked_out`: while a child holds the log and
//!   the segment open, the parent's `Rvm::open` of that log, `recover_log` on
//!   it and `open_segment` of that segment (through another log) all fail
//!   with `Error::Locked`; after the child is killed the parent opens both
//!   and finds the child's flush-committed data.
//!
//! The default run (10 rounds) takes a few seconds. Set `RVM_KILL9_ROUNDS=N`
//! for more rounds, and `RVM_KILL9_SEED=S` to fix the random kill delays and
//! per-round options (the seed in use is printed; timing still varies).

mod common;
use common::serial;

use rvm::{create_log, recover_log, CommitMode, CopyMode, Error, FileVfs, MapSpec, Options, Region, RestoreMode, Rvm};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the child: the work folder. Its presence selects the child role.
const CHILD_ENV: &str = "RVM_KILL9_CHILD";
/// Set in the child: which workload ("commit" or "hold").
const ROLE_ENV: &str = "RVM_KILL9_ROLE";
/// Set in the child: the copy mode of its mapping ("ondemand" or "onmap").
const COPY_ENV: &str = "RVM_KILL9_COPY";
/// Set in the child: whether the instance coalesces ("1" or "0").
const COALESCE_ENV: &str = "RVM_KILL9_COALESCE";
/// Number of kill rounds of the crash test.
const ROUNDS_ENV: &str = "RVM_KILL9_ROUNDS";
/// Seed of the random kill delays and per-round options.
const SEED_ENV: &str = "RVM_KILL9_SEED";
const DEFAULT_ROUNDS: u32 = 10;

/// A child that outlives its parent stops by itself after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

/// Log size: small, so truncation (background and log-full) runs often and
/// the circular log wraps many times per round.
const LOG_SIZE: u64 = 256 << 10;
const SEG_SIZE: usize = 64 << 10;

// Region layout. Header (page 0): counter, two derived words, checksum.
const COUNTER: usize = 0;
const DERIVED_A: usize = 8;
const DERIVED_B: usize = 16;
const CHECKSUM: usize = 24;
const HEADER_LEN: usize = 32;
/// Page 1: 512 u64 slots; transaction `n` writes `n` into slot `n % 512`.
const SLOTS: usize = 4096;
const NSLOTS: u64 = 512;
/// Stripes: transaction `n` writes a pattern of `n` into stripe `n % 8`,
/// 512 bytes that cross a page boundary.
const STRIPES: usize = 8192;
const NSTRIPES: u64 = 8;
const STRIPE_LEN: usize = 512;
const STRIPE_SKEW: usize = 4096 - 256;

fn stripe_offset(j: u64) -> usize {
    STRIPES + j as usize * 4096 + STRIPE_SKEW
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The header as transaction `n` leaves it.
fn header(n: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    if n == 0 {
        return h;
    }
    h[COUNTER..COUNTER + 8].copy_from_slice(&n.to_le_bytes());
    h[DERIVED_A..DERIVED_A + 8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    h[DERIVED_B..DERIVED_B + 8].copy_from_slice(&splitmix(n).to_le_bytes());
    let sum = fnv1a(&h[..CHECKSUM]);
    h[CHECKSUM..CHECKSUM + 8].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The stripe pattern transaction `n` writes.
fn stripe(n: u64) -> [u8; STRIPE_LEN] {
    let mut s = [0u8; STRIPE_LEN];
    for (i, w) in s.chunks_mut(8).enumerate() {
        w.copy_from_slice(&splitmix(n.rotate_left(20) ^ i as u64).to_le_bytes());
    }
    s
}

/// The largest `k` in `1..=c` with `k % m == j`.
fn last_with_residue(c: u64, m: u64, j: u64) -> Option<u64> {
    if c < j {
        return None;
    }
    let k = c - (c - j) % m;
    (k >= 1).then_some(k)
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

/// Checks that `img` is exactly the state after transaction `c` (and the
/// `c` before it): returns `c`, or what is inconsistent.
fn check_image(img: &[u8]) -> Result<u64, String> {
    let c = u64_at(img, COUNTER);
    if img[..HEADER_LEN] != header(c) {
        return Err(format!("header of counter {c} is inconsistent: {:02x?}", &img[..HEADER_LEN]));
    }
    for i in 0..NSLOTS {
        let got = u64_at(img, SLOTS + i as usize * 8);
        let want = last_with_residue(c, NSLOTS, i).unwrap_or(0);
        if got != want {
            return Err(format!("counter {c}: slot {i} holds {got}, expected {want}"));
        }
    }
    for j in 0..NSTRIPES {
        let at = stripe_offset(j);
        let got = &img[at..at + STRIPE_LEN];
        let want = last_with_residue(c, NSTRIPES, j).map_or([0u8; STRIPE_LEN], stripe);
        if got != want {
            let from = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap();
            return Err(format!(
                "counter {c}: stripe {j} differs from the pattern of {:?} from byte {from}",
                last_with_residue(c, NSTRIPES, j)
            ));
        }
    }
    Ok(c)
}

/// No steal: a segment that recovery has not touched yet holds only bytes
/// some committed transaction wrote (truncation may have applied part of
/// the log, so fields may come from different transactions, all `<= c`).
fn check_no_steal(raw: &[u8], c: u64) -> Result<(), String> {
    let hc = u64_at(raw, COUNTER);
    if hc > c {
        return Err(format!("raw segment counter {hc} is ahead of the recovered counter {c}"));
    }
    for i in 0..NSLOTS {
        let s = u64_at(raw, SLOTS + i as usize * 8);
        if s != 0 && (s % NSLOTS != i || s > c) {
            return Err(format!("raw segment slot {i} holds {s}, never committed there (recovered counter {c})"));
        }
    }
    Ok(())
}

fn read_region(region: &Region) -> Vec<u8> {
    let mut img = vec![0u8; region.len()];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(0, &mut img) }.unwrap();
    img
}

struct Paths {
    log: PathBuf,
    seg: PathBuf,
    side: PathBuf,
    ready: PathBuf,
    stderr: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Self {
        Paths {
            log: dir.join("kill9.log"),
            seg: dir.join("kill9.seg"),
            side: dir.join("flushed"),
            ready: dir.join("ready"),
            stderr: dir.join("child.stderr"),
        }
    }
}

/// Numbers the child reported durable, in order (a torn last record is
/// ignored).
fn side_numbers(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

// ---------------------------------------------------------------------------
// Child side.

fn child_main(dir: &Path) {
    let role = std::env::var(ROLE_ENV).unwrap_or_default();
    let paths = Paths::new(dir);
    let copy = match std::env::var(COPY_ENV).as_deref() {
        Ok("onmap") => CopyMode::OnMap,
        _ => CopyMode::OnDemand,
    };
    let coalesce = std::env::var(COALESCE_ENV).as_deref() != Ok("0");
    let opts = Options { coalesce, ..Options::default() };
    let rvm = Rvm::open(&paths.log, opts).expect("child: opening the log");
    let seg = rvm.open_segment(&paths.seg).expect("child: opening the segment");
    let region = rvm.map(&seg, MapSpec::new(0, SEG_SIZE).copy(copy)).expect("child: mapping");
    match role.as_str() {
        "commit" => commit_forever(&rvm, &region, &paths),
        "hold" => hold(&rvm, &region, &paths),
        other => panic!("child: unknown role {other:?}"),
    }
}

fn append_durable(side: &mut File, n: u64) {
    side.write_all(&n.to_le_bytes()).expect("child: side file write");
    side.sync_data().expect("child: side file sync");
}

fn commit_forever(rvm: &Rvm, region: &Region, paths: &Paths) {
    let base = region.addr();
    let mut side = OpenOptions::new().create(true).append(true).open(&paths.side).expect("child: side file");
    let mut img = [0u8; 8];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(COUNTER, &mut img) }.unwrap();
    let start = u64::from_le_bytes(img);
    let started = Instant::now();
    let mut n = start;
    while started.elapsed() < CHILD_LIFETIME {
        n += 1;
        if n % 7 == 3 {
            // An aborted transaction must leave no trace, in memory or log.
            let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
            // SAFETY: this thread is the only user of the region.
            unsafe {
                tx.modify_bytes(base + COUNTER, &u64::MAX.to_le_bytes()).unwrap();
                tx.modify_bytes(base + SLOTS + (n % NSLOTS) as usize * 8, &u64::MAX.to_le_bytes()).unwrap();
                tx.modify_bytes(base + stripe_offset(n % NSTRIPES), &[0xee; STRIPE_LEN]).unwrap();
            }
            if n % 2 == 0 {
                tx.abort();
            } else {
                drop(tx);
            }
        }
        let restore = if n % 3 == 0 { RestoreMode::NoRestore } else { RestoreMode::Restore };
        // Phases of frequent flush commits alternate with long runs of
        // no-flush commits that overflow the pending batch into the log
        // (written, not synced).
        let flush = if (n / 1000) % 2 == 0 { n % 5 == 0 } else { n % 250 == 0 };
        let h = header(n);
        let s = stripe(n);
        let mut tx = rvm.begin(restore).unwrap();
        // SAFETY: this thread is the only user of the region; every range
        // lies inside it, and no reference to the region's memory exists.
        unsafe {
            // Declare first, store with plain writes (RVM style) ...
            let at = base + stripe_offset(n % NSTRIPES);
            tx.set_range(at, STRIPE_LEN).unwrap();
            std::ptr::copy_nonoverlapping(s.as_ptr(), at as *mut u8, STRIPE_LEN);
            tx.modify_bytes(base + SLOTS + (n % NSLOTS) as usize * 8, &n.to_le_bytes()).unwrap();
            // ... and the header in pieces, in an order that varies.
            if n % 2 == 0 {
                tx.modify_bytes(base + CHECKSUM, &h[CHECKSUM..]).unwrap();
                tx.modify_bytes(base + DERIVED_A, &h[DERIVED_A..CHECKSUM]).unwrap();
                tx.modify_bytes(base + COUNTER, &h[..DERIVED_A]).unwrap();
            } else {
                tx.modify_bytes(base + COUNTER, &h[..DERIVED_A]).unwrap();
                tx.modify_bytes(base + DERIVED_A, &h[DERIVED_A..DERIVED_B]).unwrap();
                tx.modify_bytes(base + DERIVED_B, &h[DERIVED_B..]).unwrap();
                // A range declared twice, overlapping.
                tx.modify_bytes(base + CHECKSUM - 4, &h[CHECKSUM - 4..]).unwrap();
            }
        }
        tx.commit(if flush { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
        if flush {
            append_durable(&mut side, n);
        }
        if n % 97 == 0 {
            rvm.flush().unwrap();
            append_durable(&mut side, n);
        }
        if n % 1009 == 0 {
            rvm.truncate().unwrap();
            append_durable(&mut side, n);
        }
    }
    panic!("child: still running after {CHILD_LIFETIME:?}; the parent must have gone away");
}

fn hold(rvm: &Rvm, region: &Region, paths: &Paths) {
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: this thread is the only user of the region.
    unsafe { tx.modify_bytes(region.addr() + 100, b"held by the child").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    File::create(&paths.ready).and_then(|f| f.sync_all()).expect("child: ready file");
    std::thread::sleep(CHILD_LIFETIME);
    panic!("child: still holding after {CHILD_LIFETIME:?}; the parent must have gone away");
}

// ---------------------------------------------------------------------------
// Parent side.

/// Runs the child workload when this process is a child; returns true then.
fn run_as_child() -> bool {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => {
            child_main(Path::new(&dir));
            true
        }
        None => false,
    }
}

fn spawn_child(test: &str, dir: &Path, role: &str, copy: &str, coalesce: bool) -> Child {
    let stderr = File::create(Paths::new(dir).stderr).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(ROLE_ENV, role)
        .env(COPY_ENV, copy)
        .env(COALESCE_ENV, if coalesce { "1" } else { "0" })
        .env_remove("RUST_TEST_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawning the child")
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(s) => s.parse().expect("RVM_KILL9_SEED must be an integer"),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            splitmix(t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32))
        }
    }
}

fn rounds() -> u32 {
    match std::env::var(ROUNDS_ENV) {
        Ok(s) => s.parse().expect("RVM_KILL9_ROUNDS must be a number"),
        Err(_) => DEFAULT_ROUNDS,
    }
}

/// Options of the parent's own instances: no background truncation thread,
/// so that dropping the instance closes (and unlocks) its files before the
/// next child starts (the background thread can briefly own the instance).
fn parent_opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

/// Creates the log and an all-zero segment (in the parent, so a kill can
/// never land in the middle of creating them).
fn create_files(paths: &Paths) {
    create_log(&paths.log, LOG_SIZE).unwrap();
    let rvm = Rvm::open(&paths.log, parent_opts()).unwrap();
    rvm.create_segment(&paths.seg, SEG_SIZE as u64).unwrap();
    rvm.close().unwrap();
}

#[test]
fn kill9_recovery_keeps_a_committed_prefix() {
    if run_as_child() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path());
    create_files(&paths);
    let seed = seed();
    let rounds = rounds();
    eprintln!("kill9: {rounds} round(s), {SEED_ENV}={seed}");
    let mut rng = Rng(seed);
    let mut previous = 0u64;
    for round in 0..rounds {
        let copy = if rng.below(2) == 0 { "ondemand" } else { "onmap" };
        let coalesce = rng.below(4) != 0;
        let delay = Duration::from_millis(20 + rng.below(281));
        let mut child = spawn_child("kill9_recovery_keeps_a_committed_prefix", dir.path(), "commit", copy, coalesce);
        std::thread::sleep(delay);
        common::kill_child(&mut child, &Paths::new(dir.path()).stderr);

        let side = side_numbers(&paths.side);
        assert!(side.windows(2).all(|w| w[0] <= w[1]), "side file not monotonic: {side:?}");
        let durable = side.last().copied().unwrap_or(0);
        let raw = std::fs::read(&paths.seg).unwrap();
        assert_eq!(raw.len(), SEG_SIZE, "segment file changed size");

        let rvm = Rvm::open(&paths.log, parent_opts()).unwrap_or_else(|e| panic!("round {round}: recovery: {e}"));
        let report = rvm.recovery_report();
        let seg = rvm.open_segment(&paths.seg).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, SEG_SIZE).copy(CopyMode::OnMap)).unwrap();
        let img = read_region(&region);
        let c = check_image(&img)
            .unwrap_or_else(|e| panic!("round {round}: recovered state is not a transaction boundary: {e}"));
        eprintln!(
            "kill9 round {round}: killed after {delay:?} ({copy}, coalesce {coalesce}); recovered counter {c} \
             (+{} this round, last flushed {durable}); replayed {} tx / {} log bytes, discarded {} bytes, stop {:?}",
            c - previous,
            report.transactions,
            report.log_bytes,
            report.discarded_bytes,
            report.stopped_at
        );
        assert!(c >= durable, "round {round}: counter {c} lost flush-committed transaction {durable}");
        assert!(c >= previous, "round {round}: counter went back from {previous} to {c}");
        check_no_steal(&raw, c).unwrap_or_else(|e| panic!("round {round}: {e}"));
        // Recovery applied the log and synced the segment: the file holds
        // what the mapping shows.
        let after = std::fs::read(&paths.seg).unwrap();
        assert!(after == img, "round {round}: segment file differs from the recovered mapping");
        previous = c;
        drop(region);
        drop(seg);
        rvm.close().unwrap();
    }
    assert!(previous > 0, "no transaction survived any round: the child never got going");
}

fn wait_for(path: &Path, child: &mut Child, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let err = std::fs::read_to_string(Paths::new(dir).stderr).unwrap_or_default();
            panic!("the child ended ({status}) before it was ready:\n{err}");
        }
        assert!(Instant::now() < deadline, "the child did not get ready in time");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kill9_second_process_is_locked_out() {
    if run_as_child() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path());
    create_files(&paths);
    let mut child = spawn_child("kill9_second_process_is_locked_out", dir.path(), "hold", "ondemand", true);
    wait_for(&paths.ready, &mut child, dir.path());

    match Rvm::open(&paths.log, parent_opts()) {
        Err(Error::Locked { path }) => assert!(path.ends_with("kill9.log"), "Locked names {}", path.display()),
        other => panic!("opening a log another process holds: expected Error::Locked, got {other:?}"),
    }
    match recover_log(&FileVfs, &paths.log, &rvm::Options::default()) {
        Err(Error::Locked { .. }) => {}
        other => panic!("recovering a log another process holds: expected Error::Locked, got {other:?}"),
    }
    // The segment, through a log of our own.
    let other_log = dir.path().join("other.log");
    create_log(&other_log, LOG_SIZE).unwrap();
    {
        let rvm = Rvm::open(&other_log, parent_opts()).unwrap();
        match rvm.open_segment(&paths.seg) {
            Err(Error::Locked { path }) => assert!(path.ends_with("kill9.seg"), "Locked names {}", path.display()),
            other => panic!("opening a segment another process holds: expected Error::Locked, got {other:?}"),
        }
        rvm.close().unwrap();
    }

    common::kill_child(&mut child, &Paths::new(dir.path()).stderr);
    let rvm = Rvm::open(&paths.log, parent_opts()).expect("opening the log after the holder died");
    assert_eq!(rvm.recovery_report().transactions, 1);
    // A second open in this process is refused as well.
    assert!(matches!(Rvm::open(&paths.log, parent_opts()), Err(Error::Locked { .. })));
    let seg = rvm.open_segment(&paths.seg).expect("opening the segment after the holder died");
    let region = rvm.map(&seg, MapSpec::new(0, SEG_SIZE)).unwrap();
    let mut b = [0u8; 17];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(100, &mut b) }.unwrap();
    assert_eq!(&b, b"held by the child");
    // And the other log can now take the segment too, once this one lets go.
    drop(region);
    drop(seg);
    rvm.close().unwrap();
    let rvm = Rvm::open(&other_log, parent_opts()).unwrap();
    rvm.open_segment(&paths.seg).expect("opening the released segment through another log");
}
