//! `kill -9` while a child process runs the lifecycle calls a crash test
//! of commits alone never reaches: creating segments, extending a segment
//! and growing its region in place, explicit checkpoints, truncations,
//! closing and deleting segments. After every call that returns, the child
//! appends what it made durable to a side file (synced). The parent kills
//! it at a random moment and reopens: the open must be `Ok` with every
//! acknowledged step there (the counter at least the last one written, the
//! newest transient segment with its marker, deleted segments gone, the
//! grown segment at least as long as acknowledged with its stores), and
//! the next child carries on from the recovered files (cleaning up what
//! an unacknowledged step left).
//!
//! Rounds: `RVM_KILL9_ROUNDS` (default 6 here), delays fixed by
//! `RVM_KILL9_SEED`.

mod common;

use rvm::{create_log, CommitMode, MapSpec, Options, Region, RestoreMode, Rvm};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "RVM_KILL9_LIFECYCLE_CHILD";
const PAGE: usize = 4096;
/// The growing segment stops growing here (the reservation is larger).
const GROW_LIMIT: usize = 2 << 20;
const RESERVE: usize = 4 << 20;
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

struct Paths {
    log: PathBuf,
    main: PathBuf,
    grow: PathBuf,
    side: PathBuf,
    stderr: PathBuf,
    dir: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Paths {
        Paths {
            log: dir.join("log"),
            main: dir.join("main"),
            grow: dir.join("grow"),
            side: dir.join("side"),
            stderr: dir.join("stderr"),
            dir: dir.to_path_buf(),
        }
    }
    fn transient(&self, n: u64) -> PathBuf {
        self.dir.join(format!("s{n}"))
    }
}

fn opts() -> Options {
    // A small log and a low threshold: background reclaim runs too.
    Options { truncate_threshold: Some(0.3), ..Options::default() }
}

fn u64_at(r: &Region, off: usize) -> u64 {
    let mut b = [0; 8];
    // SAFETY: one thread uses the region at a time; inside it.
    unsafe { r.read(off, &mut b).unwrap() };
    u64::from_le_bytes(b)
}

fn store(rvm: &Rvm, r: &Region, off: usize, v: u64) {
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: as above.
    unsafe { tx.modify_bytes(r.addr() + off, &v.to_le_bytes()).unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
}

fn note(side: &mut File, line: &str) {
    writeln!(side, "{line}").unwrap();
    side.sync_data().unwrap();
}

fn transients(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix('s')?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

fn child_main(dir: &Path) {
    let start = Instant::now();
    let paths = Paths::new(dir);
    let mut side = OpenOptions::new().append(true).create(true).open(&paths.side).unwrap();
    let rvm = Rvm::open(&paths.log, opts()).unwrap();
    let main_seg = rvm.open_segment(&paths.main).unwrap();
    let main = rvm.map(&main_seg, MapSpec::new(0, PAGE)).unwrap();
    let grow_seg = rvm.open_segment(&paths.grow).unwrap();
    let mut grow_len = grow_seg.len() as usize / PAGE * PAGE;
    let grow = rvm.map(&grow_seg, MapSpec::new(0, grow_len).reserve(RESERVE)).unwrap();
    let mut c = u64_at(&main, 0);
    // What an unacknowledged step left: transient segments other than the
    // newest acknowledged one.
    for m in transients(dir) {
        if m != c {
            let seg = rvm.open_segment(paths.transient(m)).unwrap();
            rvm.delete_segment(seg).unwrap();
        }
    }
    while start.elapsed() < CHILD_LIFETIME {
        let n = c + 1;
        // 1. A new segment with its marker, committed and durable.
        let seg = rvm.create_segment(paths.transient(n), 2 * PAGE as u64).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 2 * PAGE)).unwrap();
        store(&rvm, &r, PAGE + 8, n);
        rvm.unmap(r).unwrap();
        if n.is_multiple_of(2) {
            rvm.close_segment(seg).unwrap();
        }
        note(&mut side, &format!("s {n}"));
        // 2. The growing segment: extended, its region grown, a store at
        // the new end.
        if grow_len < GROW_LIMIT {
            let new_len = grow_len + PAGE * (1 + n as usize % 3);
            rvm.extend_segment(&grow_seg, new_len as u64).unwrap();
            rvm.grow_region(&grow, new_len).unwrap();
            store(&rvm, &grow, new_len - 8, n);
            grow_len = new_len;
            note(&mut side, &format!("g {new_len} {n}"));
        }
        // 3. The counter.
        store(&rvm, &main, 0, n);
        note(&mut side, &format!("c {n}"));
        c = n;
        // 4. Reclaim the log one way or another.
        match n % 3 {
            0 => drop(rvm.checkpoint().unwrap()),
            1 => rvm.truncate().unwrap(),
            _ => {
                if rvm.checkpoint_start().unwrap() {
                    rvm.checkpoint_step(1).unwrap();
                    rvm.checkpoint_finish().unwrap();
                }
            }
        }
        // 5. The previous transient segment goes.
        if n > 1 {
            let old = rvm.open_segment(paths.transient(n - 1)).unwrap();
            rvm.delete_segment(old).unwrap();
            note(&mut side, &format!("d {}", n - 1));
        }
    }
}

fn run_as_child() -> bool {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => {
            child_main(Path::new(&dir));
            true
        }
        None => false,
    }
}

fn spawn_child(dir: &Path) -> Child {
    let stderr = File::create(Paths::new(dir).stderr).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args(["kill9_during_segment_lifecycle_calls", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env_remove("RUST_TEST_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawning the child")
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The side file's acknowledged steps.
#[derive(Default)]
struct Acked {
    counter: u64,
    deleted: Vec<u64>,
    grown: Option<(usize, u64)>,
}

fn acked(side: &Path) -> Acked {
    let text = std::fs::read_to_string(side).unwrap_or_default();
    let mut a = Acked::default();
    // A line cut by the kill was not acknowledged.
    for line in text.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match (w.first(), w.len()) {
            (Some(&"c"), 2) => a.counter = w[1].parse().unwrap(),
            (Some(&"d"), 2) => a.deleted.push(w[1].parse().unwrap()),
            (Some(&"g"), 3) => a.grown = Some((w[1].parse().unwrap(), w[2].parse().unwrap())),
            _ => {}
        }
    }
    a
}

/// Reopens after the kill and checks every acknowledged step.
fn check(paths: &Paths, round: u32) {
    let a = acked(&paths.side);
    let rvm = Rvm::open(&paths.log, Options { truncate_threshold: None, ..Options::default() })
        .unwrap_or_else(|e| panic!("round {round}: the reopen after kill -9 failed: {e}"));
    let main_seg = rvm.open_segment(&paths.main).unwrap();
    let main = rvm.map(&main_seg, MapSpec::new(0, PAGE)).unwrap();
    let c = u64_at(&main, 0);
    assert!(c >= a.counter, "round {round}: counter {c} < acknowledged {}", a.counter);
    if c > 0 {
        let seg = rvm
            .open_segment(paths.transient(c))
            .unwrap_or_else(|e| panic!("round {round}: segment s{c} of the recovered counter: {e}"));
        let r = rvm.map(&seg, MapSpec::new(0, 2 * PAGE)).unwrap();
        assert_eq!(u64_at(&r, PAGE + 8), c, "round {round}: s{c}'s marker");
    }
    for m in &a.deleted {
        assert!(!paths.transient(*m).exists(), "round {round}: s{m} was deleted (acknowledged) but is back");
    }
    if let Some((len, n)) = a.grown {
        let seg = rvm.open_segment(&paths.grow).unwrap();
        assert!(seg.len() as usize >= len, "round {round}: grown segment {} < acknowledged {len}", seg.len());
        let r = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
        assert_eq!(u64_at(&r, len - 8), n, "round {round}: the store at the acknowledged end");
    }
}

#[test]
fn kill9_during_segment_lifecycle_calls() {
    if run_as_child() {
        return;
    }
    let seed = match std::env::var("RVM_KILL9_SEED") {
        Ok(s) => s.parse().expect("RVM_KILL9_SEED must be an integer"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    let rounds: u32 = std::env::var("RVM_KILL9_ROUNDS").map_or(6, |s| s.parse().expect("a number"));
    eprintln!("kill9_lifecycle seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path());
    create_log(&paths.log, 1 << 20).unwrap();
    {
        let rvm = Rvm::open(&paths.log, Options::default()).unwrap();
        rvm.create_segment(&paths.main, PAGE as u64).unwrap();
        rvm.create_segment(&paths.grow, PAGE as u64).unwrap();
        rvm.close().unwrap();
    }
    for round in 0..rounds {
        let mut child = spawn_child(dir.path());
        let delay = 60 + splitmix(seed ^ round as u64) % 400;
        std::thread::sleep(Duration::from_millis(delay));
        common::kill_child(&mut child, &Paths::new(dir.path()).stderr);
        check(&paths, round);
    }
    let a = acked(&paths.side);
    assert!(a.counter > 0, "no child acknowledged anything: the test tested nothing");
}
