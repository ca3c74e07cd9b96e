//! Absolute pointers survive across processes: real processes, real files.
//!
//! Each test re-runs this test binary as a child process
//! (`std::env::current_exe()`, filtered with `--exact` to the same test
//! function) with `RVM_LOADER_CHILD` naming a work folder; when it is set,
//! the test function plays the child's part instead of the parent's. The
//! parent takes a free address range (`rvm_loader::testing::address_range`)
//! and passes it to the child, which puts the load map's regions there.
//!
//! * `pointers_survive_a_clean_exit`: the child creates a segment whose map
//!   has a `roots` region and a `nodes` region, builds a linked list of
//!   nodes in `nodes` (in a scrambled order, so the `next` pointers jump
//!   about) whose every node also holds its own address, stores the address
//!   of the head and a pointer to the root page itself in `roots`, commits
//!   with flush and exits. The parent loads the segment and follows the
//!   pointers by dereferencing them.
//! * `pointers_survive_kill9_after_a_flush_commit`: the same, but the child
//!   keeps the changes in the log only (no truncation), reports the flush
//!   commit, and goes on with no-flush commits until the parent kills it
//!   with `SIGKILL`; recovery replays the log and the pointers hold.
//! * `a_segment_loaded_by_another_process_is_locked`: while a child has the
//!   segment loaded, loading it in the parent is a `Locked` error that maps
//!   nothing; once the child is killed the parent loads it.

use rvm_core::{create_log, CommitMode, Error, Options, RestoreMode, Rvm};
use rvm_loader::testing::{address_range, range_is_free};
use rvm_loader::{create_segment, load_segment, LoadMap, LoadedSegment, LoaderError, RegionSpec};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::Duration;

/// Set in the child: the work folder. Its presence selects the child role.
const CHILD_ENV: &str = "RVM_LOADER_CHILD";
/// Set in the child: the start of its address range (decimal).
const BASE_ENV: &str = "RVM_LOADER_BASE";
/// Printed by a child when the parent may go on.
const READY: &str = "RVM-CHILD-READY";
/// A child whose parent went away stops by itself after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

const NODES: usize = 200;
const NODE_LEN: usize = 32;
/// Offset of the `nodes` region's base from the range's start: the two
/// regions are far apart in memory (and in the opposite order in the file).
const NODES_AT: usize = 256 << 20;

/// A list node as stored in the segment: plain data with absolute pointers.
#[repr(C)]
struct Node {
    value: u64,
    /// Address of the next node, or 0.
    next: usize,
    /// Address of this node itself.
    me: usize,
    /// Position in the list.
    index: u64,
}

const _: () = assert!(std::mem::size_of::<Node>() == NODE_LEN);

fn value_of(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed
}

/// Where list position `i` lives: a scrambled slot of the nodes region.
fn slot_of(i: usize) -> usize {
    (i * 73 + 11) % NODES
}

fn load_map(base: usize) -> LoadMap {
    let ps = rvm_core::page_size() as u64;
    LoadMap::new()
        .region(RegionSpec::new("nodes", ps, ((NODES * NODE_LEN) as u64).div_ceil(ps) * ps, (base + NODES_AT) as u64))
        .region(RegionSpec::new("roots", 16 * ps, ps, base as u64))
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("log"), dir.join("seg"))
}

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

/// The child's part: create, build the list, flush-commit. Returns the
/// instance and the loaded segment.
fn build(dir: &Path, base: usize) -> (Rvm, LoadedSegment) {
    let (log, seg_path) = paths(dir);
    create_log(&log, 1 << 20).unwrap();
    let rvm = Rvm::open(&log, opts()).unwrap();
    let map = load_map(base);
    create_segment(&rvm, &seg_path, map.min_device_len(), &map).unwrap();
    let seg = load_segment(&rvm, &seg_path).unwrap();
    let nodes = seg.region("nodes").unwrap().addr();
    let roots = seg.region("roots").unwrap().addr();
    let at = |i: usize| nodes + slot_of(i) * NODE_LEN;
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    for i in 0..NODES {
        let next = if i + 1 < NODES { at(i + 1) } else { 0 };
        let mut bytes = Vec::with_capacity(NODE_LEN);
        for w in [value_of(i), next as u64, at(i) as u64, i as u64] {
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        // SAFETY: the child's one thread alone uses the regions.
        unsafe { tx.modify_bytes(at(i), &bytes).unwrap() };
    }
    let mut root = Vec::new();
    for w in [at(0), roots, NODES] {
        root.extend_from_slice(&(w as u64).to_ne_bytes());
    }
    // SAFETY: as above.
    unsafe { tx.modify_bytes(roots, &root).unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    (rvm, seg)
}

/// The parent's part: load in this process and follow the pointers.
fn follow(dir: &Path, base: usize) {
    let (log, seg_path) = paths(dir);
    let rvm = Rvm::open(&log, opts()).unwrap();
    let seg = load_segment(&rvm, &seg_path).unwrap();
    assert_eq!(seg.load_map(), load_map(base));
    let roots = seg.region("roots").unwrap();
    let nodes = seg.region("nodes").unwrap();
    assert_eq!(roots.addr(), base);
    let root = roots.as_ptr().cast::<usize>().as_ptr();
    // SAFETY: the roots region is mapped (we hold `seg`) and one page long;
    // no transaction writes it while this test reads it.
    let (head, me, count) = unsafe { (root.read(), root.add(1).read(), root.add(2).read()) };
    assert_eq!(me, base, "the self-referential root pointer");
    // SAFETY: as above; `me` was just checked to be the root page itself.
    assert_eq!(unsafe { (me as *const usize).add(2).read() }, NODES);
    assert_eq!(count, NODES);
    let inside =
        |p: usize| p >= nodes.addr() && p + NODE_LEN <= nodes.addr() + nodes.len() && p.is_multiple_of(NODE_LEN);
    let mut p = head;
    let mut seen = 0;
    while p != 0 {
        assert!(inside(p), "pointer {p:#x} of node {seen} is outside the nodes region");
        // SAFETY: `p` is an aligned node slot inside the mapped nodes
        // region (checked just above); no one writes the region now.
        let node = unsafe { &*(p as *const Node) };
        assert_eq!(node.me, p, "node {seen} does not hold its own address");
        assert_eq!(node.index, seen as u64);
        assert_eq!(node.value, value_of(seen));
        p = node.next;
        seen += 1;
        assert!(seen <= NODES, "the list has a cycle");
    }
    assert_eq!(seen, NODES);
}

fn child_settings() -> Option<(PathBuf, usize)> {
    let dir = PathBuf::from(std::env::var_os(CHILD_ENV)?);
    let base = std::env::var(BASE_ENV).ok()?.parse().ok()?;
    Some((dir, base))
}

fn ready() {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // On a line of its own: the harness has printed `test name ... ` already.
    writeln!(out, "\n{READY}").unwrap();
    out.flush().unwrap();
}

/// Serializes the parents of this file. A child spawned by one test thread
/// holds duplicates of every file descriptor of the test process between
/// fork and exec, and with them the `flock` of a log or segment another
/// test has open at that moment, so that test could see a spurious
/// "in use" error.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts this test function as a child process.
fn spawn(test: &str, dir: &Path, base: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(BASE_ENV, base.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits until the child prints the ready line.
fn wait_ready(child: &mut Child) {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.trim() == READY {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(CHILD_LIFETIME).is_err() {
        let _ = child.kill();
        panic!("the child never became ready: {:?}", child.wait());
    }
}

fn kill9(mut child: Child) {
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

#[test]
fn pointers_survive_a_clean_exit() {
    if let Some((dir, base)) = child_settings() {
        let (rvm, seg) = build(&dir, base);
        drop(seg);
        rvm.close().unwrap();
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let range = address_range();
    let status = spawn("pointers_survive_a_clean_exit", dir.path(), range.start()).wait().unwrap();
    assert!(status.success(), "child failed: {status:?}");
    follow(dir.path(), range.start());
}

#[test]
fn pointers_survive_kill9_after_a_flush_commit() {
    if let Some((dir, base)) = child_settings() {
        let (rvm, seg) = build(&dir, base);
        ready();
        // Keep committing (no flush) into the roots page's fourth word until
        // killed: a commit in flight at the kill must not disturb the list.
        let counter = seg.region("roots").unwrap().addr() + 24;
        let deadline = std::time::Instant::now() + CHILD_LIFETIME;
        let mut n = 0u64;
        while std::time::Instant::now() < deadline {
            n += 1;
            let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
            // SAFETY: the child's one thread alone uses the region.
            unsafe { tx.modify_bytes(counter, &n.to_ne_bytes()).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
            if n.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let range = address_range();
    let mut child = spawn("pointers_survive_kill9_after_a_flush_commit", dir.path(), range.start());
    wait_ready(&mut child);
    std::thread::sleep(Duration::from_millis(50));
    kill9(child);
    // The list is in the log only: the segment file holds the header alone.
    let (_, seg_path) = paths(dir.path());
    let file = std::fs::read(&seg_path).unwrap();
    let ps = rvm_core::page_size();
    assert!(file[ps..].iter().all(|&b| b == 0), "the child's changes reached the segment file before recovery");
    follow(dir.path(), range.start());
}

#[test]
fn a_segment_loaded_by_another_process_is_locked() {
    if let Some((dir, base)) = child_settings() {
        let (_rvm, _seg) = build(&dir, base);
        ready();
        std::thread::sleep(CHILD_LIFETIME);
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let range = address_range();
    let mut child = spawn("a_segment_loaded_by_another_process_is_locked", dir.path(), range.start());
    wait_ready(&mut child);
    let (_, seg_path) = paths(dir.path());
    {
        let other = dir.path().join("other-log");
        create_log(&other, 1 << 20).unwrap();
        let rvm = Rvm::open(&other, opts()).unwrap();
        let e = load_segment(&rvm, &seg_path).unwrap_err();
        assert!(matches!(e, LoaderError::Core(Error::Locked { .. })), "{e:?}");
        assert!(e.to_string().contains("already in use"), "{e}");
        assert!(rvm.regions().is_empty());
        for r in load_map(range.start()).regions() {
            assert!(range_is_free(r.base as usize, r.len as usize));
        }
    }
    kill9(child);
    follow(dir.path(), range.start());
}
