//! Tracked transactions: stores found by page faults, no `set_range`.
//!
//! - A crash model on the simulated disk: random stores anywhere in the
//!   tracked pages, commits of both modes, aborts, checkpoints started and
//!   stepped while a tracked transaction is open, flushes, crashes (losing
//!   unsynced writes, or keeping a random subset with a torn last sector).
//!   After every crash the recovered region equals the image after some
//!   committed prefix that contains every durable commit, byte for byte.
//! - Child processes (this test binary re-executed with `RVM_TRACKED_CHILD`
//!   naming a scenario) show that faults which are not a tracked
//!   transaction's still end the process with `SIGSEGV`: a null
//!   dereference, a store into a read-only page no region owns, a store
//!   into a tracked page outside a transaction, and one from a thread that
//!   does not hold the transaction (reported on standard error), also in a
//!   forked child.
//! - The twin pool running out (a typed error, everything rolled back),
//!   threads (serialized writers, readers that never fault), every copy
//!   mode, and what a commit logs (the changed runs, or whole pages).
//! - The write-protect method (`TrackingMethod::WriteProtect`) through the
//!   same crash model, pool, copy-mode, thread and checkpoint tests, plus
//!   its own rules: stores outside a transaction are undone and reported
//!   at the next begin, another thread's store during one is attributed
//!   to it, tracking does not cross `fork`, pages changed before tracking
//!   keep their committed image, and both methods in one transaction.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};
use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

const CHILD_ENV: &str = "RVM_TRACKED_CHILD";
const PAGES: usize = 8;

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/tracked.txt"
        )))),
        ..ProptestConfig::default()
    }
}

fn ps() -> usize {
    page_size()
}

/// Reads the whole region.
fn image(region: &Region) -> Vec<u8> {
    let mut v = vec![0u8; region.len()];
    // SAFETY: no transaction of this test stores while it reads.
    unsafe { region.read(0, &mut v) }.unwrap();
    v
}

/// Stores `bytes` at `off` of a tracked region with plain writes.
fn store(region: &Region, off: usize, bytes: &[u8]) {
    assert!(off + bytes.len() <= region.len());
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: inside the region; the calling thread holds the tracked
        // transaction, and no reference into the region is alive.
        unsafe { std::ptr::write_volatile((region.addr() + off + i) as *mut u8, b) };
    }
}

struct Sim {
    disk: SimDisk,
    vfs: Arc<dyn Vfs>,
    opts: Options,
    /// The order in which `open_all` tracks its regions, as ranks by
    /// address (one region: `[0]`).
    order: Vec<usize>,
}

fn seg_name(i: usize) -> String {
    if i == 0 {
        "seg".into()
    } else {
        format!("seg{i}")
    }
}

impl Sim {
    fn new(opts: Options) -> Sim {
        Sim::with_regions(opts, vec![0])
    }

    /// `order.len()` segments of `PAGES` pages, one region each.
    fn with_regions(opts: Options, order: Vec<usize>) -> Sim {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts.clone()).unwrap();
        for i in 0..order.len() {
            rvm.create_segment(seg_name(i), (PAGES * ps()) as u64).unwrap();
        }
        rvm.close().unwrap();
        Sim { disk, vfs, opts, order }
    }

    fn open(&self) -> (Rvm, Region) {
        let (rvm, mut regions) = self.open_all();
        assert_eq!(regions.len(), 1);
        (rvm, regions.remove(0))
    }

    /// Opens the instance and maps every segment; returns the regions in
    /// segment order, tracked in `order` (ranks by address: the kernel
    /// picks the addresses, so they may come in another order after each
    /// reopening).
    fn open_all(&self) -> (Rvm, Vec<Region>) {
        let rvm = Rvm::open_with(self.vfs.clone(), Path::new("log"), self.opts.clone()).unwrap();
        let regions: Vec<Region> = (0..self.order.len())
            .map(|i| {
                let seg = rvm.open_segment(seg_name(i)).unwrap();
                rvm.map(&seg, MapSpec::new(0, PAGES * ps())).unwrap()
            })
            .collect();
        let mut by_addr: Vec<usize> = (0..regions.len()).collect();
        by_addr.sort_by_key(|&i| regions[i].addr());
        for &rank in &self.order {
            let r = &regions[by_addr[rank]];
            rvm.track(r).unwrap();
            assert!(r.is_tracked());
        }
        (rvm, regions)
    }
}

/// The regions' images, one after the other.
fn concat_images(regions: &[Region]) -> Vec<u8> {
    regions.iter().flat_map(image).collect()
}

/// Stores `bytes` at `off` of the regions' concatenation (split at their
/// ends).
fn store_all(regions: &[Region], mut off: usize, mut bytes: &[u8]) {
    for r in regions {
        if bytes.is_empty() {
            return;
        }
        if off >= r.len() {
            off -= r.len();
            continue;
        }
        let n = bytes.len().min(r.len() - off);
        store(r, off, &bytes[..n]);
        bytes = &bytes[n..];
        off = 0;
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A tracked transaction: stores (offset, bytes), then commit (flush or
    /// not), abort, or abort by drop; `ckpt` starts a checkpoint and steps
    /// it after the stores, while the transaction is open.
    Tx {
        stores: Vec<(usize, Vec<u8>)>,
        end: End,
        ckpt: Option<usize>,
    },
    Flush,
    Checkpoint,
    Truncate,
    Crash {
        keep: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug)]
enum End {
    Flush,
    NoFlush,
    Abort,
    Drop,
}

fn op() -> impl Strategy<Value = Op> {
    op_in(PAGES * 4096)
}

/// Ops storing into `span` bytes.
fn op_in(span: usize) -> impl Strategy<Value = Op> {
    let stores = prop::collection::vec(
        (0..span, prop::collection::vec(any::<u8>(), 1..96)).prop_map(move |(off, b)| {
            let off = off.min(span - b.len());
            (off, b)
        }),
        0..6,
    );
    let end = prop_oneof![Just(End::Flush), Just(End::NoFlush), Just(End::Abort), Just(End::Drop)];
    prop_oneof![
        6 => (stores, end, prop::option::weighted(0.3, 0..4usize)).prop_map(|(stores, end, ckpt)| Op::Tx { stores, end, ckpt }),
        1 => Just(Op::Flush),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Truncate),
        1 => prop::option::of(any::<u64>()).prop_map(|keep| Op::Crash { keep }),
    ]
}

/// Runs `ops` and checks every recovery against the committed prefixes.
fn run(ops: &[Op], opts: Options) {
    run_regions(ops, opts, vec![0]);
}

/// As [`run`], over `order.len()` regions tracked in `order` (ranks by
/// address); the ops' offsets run over the regions one after the other.
fn run_regions(ops: &[Op], opts: Options, order: Vec<usize>) {
    assert_eq!(ps(), 4096, "the model assumes 4 KiB pages");
    let sim = Sim::with_regions(opts, order);
    let (mut rvm, mut region) = sim.open_all();
    // Images after each commit since the last recovery; `durable` indexes
    // the last one known durable.
    let mut images = vec![concat_images(&region)];
    let mut durable = 0;
    for op in ops {
        match op {
            Op::Tx { stores, end, ckpt } => {
                let before = concat_images(&region);
                let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
                for (off, bytes) in stores {
                    store_all(&region, *off, bytes);
                }
                if let Some(steps) = ckpt {
                    rvm.checkpoint_start().unwrap();
                    rvm.checkpoint_step(*steps).unwrap();
                }
                let after = concat_images(&region);
                match end {
                    End::Flush | End::NoFlush => {
                        let flush = matches!(end, End::Flush);
                        tx.commit(if flush { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
                        assert_eq!(concat_images(&region), after);
                        images.push(after);
                        if flush {
                            durable = images.len() - 1;
                        }
                    }
                    End::Abort => {
                        tx.abort();
                        assert_eq!(concat_images(&region), before, "abort restores the tracked pages");
                    }
                    End::Drop => {
                        drop(tx);
                        assert_eq!(concat_images(&region), before, "drop restores the tracked pages");
                    }
                }
            }
            Op::Flush => {
                rvm.flush().unwrap();
                durable = images.len() - 1;
            }
            Op::Checkpoint => {
                rvm.checkpoint().unwrap();
                durable = images.len() - 1;
            }
            Op::Truncate => {
                rvm.truncate().unwrap();
                durable = images.len() - 1;
            }
            Op::Crash { keep } => {
                let mode = match keep {
                    None => CrashMode::LoseUnsynced,
                    Some(seed) => CrashMode::KeepRandomSubset { seed: *seed, tear_last: seed % 2 == 0 },
                };
                sim.disk.crash(mode);
                drop(region);
                drop(rvm);
                (rvm, region) = sim.open_all();
                let got = concat_images(&region);
                let k = images.iter().rposition(|img| *img == got).unwrap_or_else(|| {
                    panic!("the recovered region is no committed prefix ({} commits)", images.len())
                });
                assert!(k >= durable, "recovery lost a durable commit: prefix {k}, durable {durable}");
                images = vec![got];
                durable = 0;
            }
        }
    }
    // A final crash must also recover a committed prefix.
    sim.disk.crash(CrashMode::LoseUnsynced);
    drop(region);
    drop(rvm);
    let (_rvm, region) = sim.open_all();
    let got = concat_images(&region);
    let k = images.iter().rposition(|img| *img == got).expect("a committed prefix");
    assert!(k >= durable);
}

fn model_opts(logging: TrackedLogging) -> Options {
    Options { truncate_threshold: None, tracked_logging: logging, ..Options::default() }
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn crash_model_diff(ops in prop::collection::vec(op(), 1..24)) {
        run(&ops, model_opts(TrackedLogging::Diff));
    }

    #[test]
    fn crash_model_whole_pages(ops in prop::collection::vec(op(), 1..24)) {
        run(&ops, model_opts(TrackedLogging::WholePage));
    }

    #[test]
    fn crash_model_write_protect(ops in prop::collection::vec(op(), 1..24)) {
        if wp_available() {
            run(&ops, Options { tracking: TrackingMethod::WriteProtect, ..model_opts(TrackedLogging::Diff) });
        }
    }

    /// Three write-protect regions tracked in any order of their addresses
    /// (the written pages of several regions must come out sorted).
    /// The same over three fault-method regions.
    #[test]
    fn crash_model_fault_regions(
        ops in prop::collection::vec(op_in(3 * PAGES * 4096), 1..24),
        order in Just(vec![0usize, 1, 2]).prop_shuffle(),
    ) {
        run_regions(&ops, model_opts(TrackedLogging::Diff), order);
    }

    #[test]
    fn crash_model_write_protect_regions(
        ops in prop::collection::vec(op_in(3 * PAGES * 4096), 1..24),
        order in Just(vec![0usize, 1, 2]).prop_shuffle(),
    ) {
        if wp_available() {
            let opts = Options { tracking: TrackingMethod::WriteProtect, ..model_opts(TrackedLogging::Diff) };
            run_regions(&ops, opts, order);
        }
    }
}

/// Forking (a child of `fork`, or of `Command::spawn` between its fork and
/// exec) duplicates every descriptor of this process, and with them the
/// `flock` of files other tests have open: a test that closes a log and
/// opens it again could then meet a spurious `Error::Locked`. Tests that
/// fork hold this exclusively; tests on real files share it.
static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn forking() -> std::sync::RwLockWriteGuard<'static, ()> {
    FORKS.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn on_files() -> std::sync::RwLockReadGuard<'static, ()> {
    FORKS.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether write-protect tracking works here; where it does not, checks
/// that asking for it is a typed error and that the region stays
/// untracked.
fn wp_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        create_log(dir.path().join("log"), 1 << 20).unwrap();
        let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
        let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
        match rvm.track_with(&region, TrackingMethod::WriteProtect) {
            Ok(()) => {
                assert_eq!(region.tracking(), Some(TrackingMethod::WriteProtect));
                true
            }
            Err(Error::Map(MapError::TrackingUnavailable { reason })) => {
                assert!(!region.is_tracked());
                eprintln!("write-protect tracking unavailable here: {reason}");
                false
            }
            Err(e) => panic!("track_with(WriteProtect): {e}"),
        }
    })
}

/// The methods to run a test with: both where write-protect works.
fn methods() -> Vec<TrackingMethod> {
    let mut m = vec![TrackingMethod::Fault];
    if wp_available() {
        m.push(TrackingMethod::WriteProtect);
    }
    m
}

#[test]
fn commit_logs_changed_runs_only() {
    let sim = Sim::new(model_opts(TrackedLogging::Diff));
    let (rvm, region) = sim.open();
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 100, &[1, 2, 3]);
    store(&region, 3000, &[4; 10]);
    store(&region, ps() + 7, &[5]);
    tx.commit(CommitMode::Flush).unwrap();
    // Three runs: 3 + 10 + 1 bytes.
    assert_eq!(rvm.stats().bytes_declared, 14);

    let sim = Sim::new(model_opts(TrackedLogging::WholePage));
    let (rvm, region) = sim.open();
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 100, &[1, 2, 3]);
    store(&region, ps() + 7, &[5]);
    tx.commit(CommitMode::Flush).unwrap();
    assert_eq!(rvm.stats().bytes_declared, 2 * ps() as u64);

    if wp_available() {
        let sim = Sim::new(Options { tracking: TrackingMethod::WriteProtect, ..model_opts(TrackedLogging::Diff) });
        let (rvm, region) = sim.open();
        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
        store(&region, 100, &[1, 2, 3]);
        store(&region, 3000, &[4; 10]);
        store(&region, ps() + 7, &[5]);
        tx.commit(CommitMode::Flush).unwrap();
        assert_eq!(rvm.stats().bytes_declared, 14);
    }
}

#[test]
fn ordinary_set_range_into_a_tracked_region_is_refused() {
    let sim = Sim::new(Options::default());
    let (rvm, region) = sim.open();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: refused before any store.
    let err = unsafe { tx.set_range(region.addr(), 8) }.unwrap_err();
    assert!(matches!(err, Error::Tx(TxError::TrackedRegion { .. })), "{err}");
    tx.abort();
    // Inside a tracked transaction it is accepted (and not needed).
    let mut tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    // SAFETY: this thread holds the tracked transaction.
    unsafe { tx.modify_bytes(region.addr() + 8, b"declared").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    assert_eq!(&image(&region)[8..16], b"declared");
}

#[test]
fn untracked_regions_keep_set_range_in_a_tracked_transaction() {
    let sim = Sim::new(Options::default());
    let (rvm, region) = sim.open();
    let seg2 = rvm.create_segment("plain", 4096).unwrap();
    let plain = rvm.map(&seg2, MapSpec::new(0, 4096)).unwrap();
    let mut tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 5, b"tracked");
    // SAFETY: the range is this transaction's.
    unsafe { tx.modify_bytes(plain.addr(), b"explicit").unwrap() };
    tx.abort();
    assert_eq!(&image(&region)[5..12], &[0; 7]);
    assert_eq!(&image(&plain)[..8], &[0; 8]);
    let mut tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 5, b"tracked");
    // SAFETY: as above.
    unsafe { tx.modify_bytes(plain.addr(), b"explicit").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    sim.disk.crash(CrashMode::LoseUnsynced);
    drop((region, plain, seg2));
    drop(rvm);
    let (rvm, region) = sim.open();
    let plain = rvm.map(&rvm.open_segment("plain").unwrap(), MapSpec::new(0, 4096)).unwrap();
    assert_eq!(&image(&region)[5..12], b"tracked");
    assert_eq!(&image(&plain)[..8], b"explicit");
}

#[test]
fn an_empty_twin_pool_fails_the_transaction_cleanly() {
    for tracking in methods() {
        empty_pool(tracking);
    }
}

fn empty_pool(tracking: TrackingMethod) {
    let opts = Options { tracked_pool_pages: 2, tracking, ..Options::default() };
    let sim = Sim::new(opts);
    let (rvm, region) = sim.open();
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 0, b"kept");
    tx.commit(CommitMode::Flush).unwrap();
    let before = image(&region);
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    for p in 0..5 {
        store(&region, p * ps() + 100, b"too many pages");
    }
    let err = tx.commit(CommitMode::Flush).unwrap_err();
    assert!(matches!(err, Error::Tx(TxError::TwinPoolExhausted { pool_pages: 2, needed: 5 })), "{err}");
    assert_eq!(image(&region), before, "every page is rolled back");
    // The instance goes on: a transaction within the pool commits.
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, ps(), b"next");
    tx.commit(CommitMode::Flush).unwrap();
    sim.disk.crash(CrashMode::LoseUnsynced);
    drop(region);
    drop(rvm);
    let (_rvm, region) = sim.open();
    let img = image(&region);
    assert_eq!(&img[..4], b"kept");
    assert_eq!(&img[ps()..ps() + 4], b"next");
    assert_eq!(&img[100..114], &[0; 14]);
}

#[test]
fn every_copy_mode_with_files() {
    let _guard = on_files();
    for (copy, tracking) in [CopyMode::OnDemand, CopyMode::OnMap, CopyMode::NoCopy]
        .into_iter()
        .flat_map(|c| methods().into_iter().map(move |m| (c, m)))
    {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        create_log(&log, 1 << 20).unwrap();
        let opts = Options { truncate_threshold: None, ..Options::default() };
        {
            let rvm = Rvm::open(&log, opts.clone()).unwrap();
            let seg = rvm.create_segment(dir.path().join("seg"), (4 * ps()) as u64).unwrap();
            let region = rvm.map(&seg, MapSpec::new(0, 4 * ps()).copy(copy)).unwrap();
            rvm.track_with(&region, tracking).unwrap();
            for round in 0..3u8 {
                let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
                store(&region, round as usize * ps() + 10, &[round + 1; 20]);
                tx.commit(CommitMode::Flush).unwrap();
                if round == 1 {
                    rvm.checkpoint().unwrap();
                }
            }
            drop((region, seg));
            rvm.close().unwrap();
        }
        let rvm = Rvm::open(&log, opts).unwrap();
        let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, 4 * ps())).unwrap();
        let img = image(&region);
        for round in 0..3usize {
            assert_eq!(&img[round * ps() + 10..round * ps() + 30], &[round as u8 + 1; 20], "{copy:?} {tracking:?}");
        }
    }
}

#[test]
fn threads_take_turns_and_readers_never_fault() {
    for tracking in methods() {
        threads_take_turns(tracking);
    }
}

fn threads_take_turns(tracking: TrackingMethod) {
    let sim = Sim::new(Options { truncate_threshold: None, tracking, ..Options::default() });
    let (rvm, region) = sim.open();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| {
        // A reader: reads a tracked page all the time while writers commit
        // (a page they never write, so the reads race with nothing).
        let reader = {
            let stop = stop.clone();
            let addr = region.addr() + (PAGES - 1) * ps();
            s.spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // SAFETY: inside the region; no thread writes this page.
                    let v = unsafe { std::ptr::read_volatile(addr as *const u64) };
                    std::hint::black_box(v);
                    reads += 1;
                }
                reads
            })
        };
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let rvm = rvm.clone();
                let region = region.clone();
                s.spawn(move || {
                    for _ in 0..200 {
                        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
                        // Counter of this thread, and a shared counter on
                        // page 0: writers are serialized, so no increment
                        // is lost.
                        let mine = (region.addr() + (t + 1) * ps()) as *mut u64;
                        let shared = (region.addr() + 8) as *mut u64;
                        // SAFETY: this thread holds the tracked transaction.
                        unsafe {
                            *mine += 1;
                            *shared += 1;
                        }
                        tx.commit(CommitMode::NoFlush).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    rvm.flush().unwrap();
    let img = image(&region);
    let word = |at: usize| u64::from_ne_bytes(img[at..at + 8].try_into().unwrap());
    assert_eq!(word(8), 800);
    for t in 0..4 {
        assert_eq!(word((t + 1) * ps()), 200);
    }
}

#[test]
fn checkpoint_threads_with_tracked_writers() {
    for tracking in methods() {
        checkpoint_threads(tracking);
    }
}

fn checkpoint_threads(tracking: TrackingMethod) {
    // A checkpoint thread sweeps while tracked writers commit; the
    // recovered image after a crash is the last flushed one.
    let sim = Sim::new(Options { truncate_threshold: None, checkpoint_rate: None, tracking, ..Options::default() });
    let (rvm, region) = sim.open();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                rvm.checkpoint().unwrap();
            }
        });
        for i in 0..300u64 {
            let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
            for p in 0..PAGES {
                let at = region.addr() + p * ps() + ((i as usize * 8) % ps());
                // SAFETY: this thread holds the tracked transaction.
                unsafe { *(at as *mut u64) = i + 1 };
            }
            tx.commit(CommitMode::NoFlush).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    rvm.flush().unwrap();
    let want = image(&region);
    sim.disk.crash(CrashMode::LoseUnsynced);
    drop(region);
    drop(rvm);
    let (_rvm, region) = sim.open();
    assert_eq!(image(&region), want);
}

// ---------------------------------------------------------------------------
// Child processes: faults that are not ours still kill
// ---------------------------------------------------------------------------

/// Runs the scenario `name` in a child; returns its status and stderr.
fn in_child(name: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child_scenarios", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env_remove("RUST_TEST_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("running the child");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A tracked region on a file-backed instance in `dir`.
fn tracked_on_files(dir: &Path) -> (Rvm, Region) {
    let log = dir.join("log");
    create_log(&log, 1 << 20).unwrap();
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    let seg = rvm.create_segment(dir.join("seg"), (4 * ps()) as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 4 * ps())).unwrap();
    rvm.track(&region).unwrap();
    (rvm, region)
}

/// The child side: one scenario, chosen by `RVM_TRACKED_CHILD`; each is
/// expected to die by `SIGSEGV` (the parent checks).
#[test]
fn child_scenarios() {
    let Ok(name) = std::env::var(CHILD_ENV) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (rvm, region) = tracked_on_files(dir.path());
    match name.as_str() {
        "null" => {
            let p = std::hint::black_box(std::ptr::null_mut::<u64>());
            // SAFETY: not safe at all: the point is to fault.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
        "foreign_read_only" => {
            // SAFETY: a fresh read-only anonymous page no region owns.
            let p = unsafe {
                rustix::mm::mmap_anonymous(
                    std::ptr::null_mut(),
                    ps(),
                    rustix::mm::ProtFlags::READ,
                    rustix::mm::MapFlags::PRIVATE,
                )
            }
            .unwrap();
            // SAFETY: the store faults (the page is read-only).
            unsafe { std::ptr::write_volatile(p.cast::<u8>(), 1) };
        }
        "outside_tx" => store(&region, 0, b"x"),
        "other_thread" => {
            let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
            store(&region, 0, b"mine");
            let addr = region.addr() + ps();
            std::thread::spawn(move || {
                // SAFETY: the store faults: this thread has no transaction.
                unsafe { std::ptr::write_volatile(addr as *mut u8, 1) };
            })
            .join()
            .ok();
            tx.commit(CommitMode::Flush).unwrap();
        }
        "fork" => {
            let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
            store(&region, 0, b"parent");
            // SAFETY: the child only stores into memory and exits; it makes
            // no allocation or lock (fork in a threaded process).
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // The child is not the transaction's thread: its store into
                // another tracked page is reported and kills it.
                // SAFETY: the store faults.
                unsafe { std::ptr::write_volatile((region.addr() + 2 * ps()) as *mut u8, 1) };
                // SAFETY: not reached; exit without running destructors.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV, "fork child: {status}");
            // The parent's transaction goes on and commits.
            store(&region, ps(), b"after fork");
            tx.commit(CommitMode::Flush).unwrap();
            let img = image(&region);
            assert_eq!(&img[..6], b"parent");
            assert_eq!(&img[2 * ps()..2 * ps() + 1], &[0]);
            // Report success by the expected death.
            // SAFETY: the point is to fault.
            unsafe { std::ptr::write_volatile(std::hint::black_box(std::ptr::null_mut::<u8>()), 1) };
        }
        other => panic!("unknown scenario {other}"),
    }
    // Reaching here means the fault did not kill us.
    std::process::exit(3);
}

#[test]
fn foreign_faults_still_kill_with_sigsegv() {
    let _guard = forking();
    for name in ["null", "foreign_read_only", "outside_tx", "other_thread", "fork"] {
        let (status, err) = in_child(name);
        assert_eq!(status.signal(), Some(libc::SIGSEGV), "{name}: {status}\n{err}");
        match name {
            "outside_tx" => assert!(err.contains("outside a tracked transaction"), "{err}"),
            "other_thread" => assert!(err.contains("does not hold its tracked transaction"), "{err}"),
            "fork" => assert!(err.contains("does not hold its tracked transaction"), "{err}"),
            _ => assert!(!err.contains("rvm:"), "{name}: a foreign fault is not ours to report\n{err}"),
        }
    }
}

#[test]
fn track_and_unmap_refuse_the_thread_holding_a_tracked_transaction() {
    let sim = Sim::new(Options::default());
    let (rvm, region) = sim.open();
    let seg2 = rvm.create_segment("plain", 4096).unwrap();
    let plain = rvm.map(&seg2, MapSpec::new(0, 4096)).unwrap();
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    // Waiting for its own transaction would never end: refused instead.
    assert!(matches!(rvm.track(&plain), Err(Error::Map(MapError::Busy { .. }))));
    assert!(matches!(rvm.unmap(region.clone()), Err(Error::Map(MapError::Busy { .. }))));
    tx.abort();
    rvm.track(&plain).unwrap();
    rvm.unmap(region).unwrap();
}

// ---------------------------------------------------------------------------
// The write-protect method's own rules
// ---------------------------------------------------------------------------

/// A write-protect-tracked region of `pages` pages on files in `dir`
/// (`copy` mode), after `before` was committed into it by an ordinary
/// transaction (so those pages were changed before tracking).
fn wp_on_files(dir: &Path, copy: CopyMode, before: &[u8]) -> (Rvm, Region) {
    let log = dir.join("log");
    if !log.exists() {
        create_log(&log, 1 << 20).unwrap();
    }
    let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
    let seg = match rvm.open_segment(dir.join("seg")) {
        Ok(seg) => seg,
        Err(_) => rvm.create_segment(dir.join("seg"), (4 * ps()) as u64).unwrap(),
    };
    let region = rvm.map(&seg, MapSpec::new(0, 4 * ps()).copy(copy)).unwrap();
    if !before.is_empty() {
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        // SAFETY: inside the region; this thread alone uses it.
        unsafe { tx.modify_bytes(region.addr() + 100, before) }.unwrap();
        tx.commit(CommitMode::Flush).unwrap();
    }
    rvm.track_with(&region, TrackingMethod::WriteProtect).unwrap();
    (rvm, region)
}

#[test]
fn wp_stores_outside_a_transaction_are_undone_and_reported() {
    let _guard = on_files();
    if !wp_available() {
        return;
    }
    for copy in [CopyMode::OnDemand, CopyMode::OnMap, CopyMode::NoCopy] {
        let dir = tempfile::tempdir().unwrap();
        let (rvm, region) = wp_on_files(dir.path(), copy, b"declared");
        let committed = image(&region);
        // Stores with no transaction open: on a page changed before
        // tracking and on one never changed. The kernel lets them through.
        store(&region, 104, b"STRAY");
        store(&region, 3 * ps() + 7, b"STRAY");
        let err = rvm.begin_tracked(RestoreMode::Restore).unwrap_err();
        assert!(
            matches!(err, Error::Tx(TxError::StoresOutsideTransaction { pages: 2, addr }) if addr == region.addr()),
            "{copy:?}: {err}"
        );
        assert_eq!(image(&region), committed, "{copy:?}: the stray stores are undone");
        // The next transaction begins, and logs only its own stores.
        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
        store(&region, 2 * ps(), b"mine");
        tx.commit(CommitMode::Flush).unwrap();
        let want = image(&region);
        drop(region);
        rvm.close().unwrap();
        // Read back copied from the segment (no-copy mapping shows zeros).
        let (_rvm, region) = wp_on_files(dir.path(), CopyMode::OnDemand, b"");
        assert!(image(&region) == want, "{copy:?}: the recovered image differs");
        assert_eq!(&want[100..108], b"declared");
        assert_eq!(&want[2 * ps()..2 * ps() + 4], b"mine");
    }
}

#[test]
fn wp_pages_changed_before_tracking_keep_their_committed_image() {
    let _guard = on_files();
    if !wp_available() {
        return;
    }
    for copy in [CopyMode::OnDemand, CopyMode::OnMap, CopyMode::NoCopy] {
        let dir = tempfile::tempdir().unwrap();
        let (rvm, region) = wp_on_files(dir.path(), copy, b"before tracking");
        let committed = image(&region);
        // Abort puts back the image committed before tracking (the shadow
        // taken at `track_with`), not the segment's older bytes.
        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
        store(&region, 100, b"BEFORE");
        store(&region, ps() + 1, b"new page");
        tx.abort();
        assert_eq!(image(&region), committed, "{copy:?}");
        // Commit logs the changed bytes only, against that image.
        let declared = rvm.stats().bytes_declared;
        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
        store(&region, 107, b"T");
        tx.commit(CommitMode::Flush).unwrap();
        assert_eq!(rvm.stats().bytes_declared - declared, 1, "{copy:?}: one byte changed");
        assert_eq!(&image(&region)[100..115], b"before Tracking");
    }
}

#[test]
fn wp_other_threads_between_transactions_are_reported_and_during_one_attributed() {
    let _guard = on_files();
    if !wp_available() {
        return;
    }
    let sim = Sim::new(Options { tracking: TrackingMethod::WriteProtect, ..Options::default() });
    let (rvm, region) = sim.open();
    let addr = region.addr();
    // Another thread stores while no transaction is open: found at the
    // next begin, undone, not logged.
    std::thread::spawn(move || {
        // SAFETY: inside the region; the point is a store outside any
        // transaction (the write-protect method lets it through).
        unsafe { std::ptr::write_volatile((addr + 5 * 4096) as *mut u8, 0xee) };
    })
    .join()
    .unwrap();
    let err = rvm.begin_tracked(RestoreMode::Restore).unwrap_err();
    assert!(matches!(err, Error::Tx(TxError::StoresOutsideTransaction { pages: 1, .. })), "{err}");
    assert_eq!(image(&region)[5 * ps()], 0);
    // During a transaction, the kernel cannot tell threads apart: the other
    // thread's store is committed with the transaction (the documented
    // trade-off; the fault method kills such a thread instead).
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 0, b"owner");
    std::thread::spawn(move || {
        // SAFETY: inside the region; the owner does not touch this byte.
        unsafe { std::ptr::write_volatile((addr + 6 * 4096) as *mut u8, 0xdd) };
    })
    .join()
    .unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    sim.disk.crash(CrashMode::LoseUnsynced);
    drop(region);
    drop(rvm);
    let (_rvm, region) = sim.open();
    let img = image(&region);
    assert_eq!(&img[..5], b"owner");
    assert_eq!(img[5 * ps()], 0);
    assert_eq!(img[6 * ps()], 0xdd);
}

#[test]
fn wp_tracking_does_not_cross_fork() {
    let _guard = forking();
    if !wp_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (rvm, region) = wp_on_files(dir.path(), CopyMode::OnDemand, b"");
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 0, b"parent");
    tx.commit(CommitMode::Flush).unwrap();
    // SAFETY: the child stores into its own copy of the region and calls
    // begin_tracked, which takes no lock another thread could hold at the
    // fork (the session's locks are this test's), then exits without
    // running destructors.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        store(&region, ps(), b"child");
        let code = match rvm.begin_tracked(RestoreMode::Restore) {
            // The instance refuses a forked child as a whole.
            Err(Error::ForkedChild { .. }) => 0,
            Err(_) => 1,
            Ok(_) => 2,
        };
        // SAFETY: leaving the forked child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status}");
    // The child's store stayed in its copy: the parent sees nothing stray.
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&region, 2 * ps(), b"after fork");
    tx.commit(CommitMode::Flush).unwrap();
    let img = image(&region);
    assert_eq!(&img[..6], b"parent");
    assert_eq!(&img[ps()..ps() + 5], &[0; 5]);
    assert_eq!(&img[2 * ps()..2 * ps() + 10], b"after fork");
}

#[test]
fn wp_and_fault_regions_share_one_transaction() {
    let _guard = on_files();
    if !wp_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (rvm, wp) = wp_on_files(dir.path(), CopyMode::OnDemand, b"");
    let seg = rvm.create_segment(dir.path().join("seg2"), (2 * ps()) as u64).unwrap();
    let fault = rvm.map(&seg, MapSpec::new(0, 2 * ps())).unwrap();
    rvm.track_with(&fault, TrackingMethod::Fault).unwrap();
    assert_eq!(fault.tracking(), Some(TrackingMethod::Fault));
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&wp, 10, b"wp");
    store(&fault, 20, b"fault");
    tx.abort();
    assert_eq!(&image(&wp)[10..12], &[0, 0]);
    assert_eq!(&image(&fault)[20..25], &[0; 5]);
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(&wp, 10, b"wp");
    store(&fault, 20, b"fault");
    tx.commit(CommitMode::Flush).unwrap();
    drop((wp, fault, seg));
    rvm.close().unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let a = rvm.map(&rvm.open_segment(dir.path().join("seg")).unwrap(), MapSpec::new(0, 4 * ps())).unwrap();
    let b = rvm.map(&rvm.open_segment(dir.path().join("seg2")).unwrap(), MapSpec::new(0, 2 * ps())).unwrap();
    assert_eq!(&image(&a)[10..12], b"wp");
    assert_eq!(&image(&b)[20..25], b"fault");
}

#[test]
fn a_tracked_region_does_not_grow() {
    let _guard = on_files();
    for tracking in methods() {
        let dir = tempfile::tempdir().unwrap();
        create_log(dir.path().join("log"), 1 << 20).unwrap();
        let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
        let seg = rvm.create_segment(dir.path().join("seg"), (2 * ps()) as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, ps()).reserve(4 * ps())).unwrap();
        rvm.track_with(&region, tracking).unwrap();
        let err = rvm.grow_region(&region, 2 * ps()).unwrap_err();
        assert!(matches!(err, Error::Map(MapError::TrackedGrowth { .. })), "{tracking:?}: {err}");
        assert_eq!(region.len(), ps());
    }
}

/// Write-protect regions on files, one segment each, mapped at `addrs`
/// (free addresses far apart) and tracked in that order; flush commits
/// into every region, an abort, a checkpoint, close and reopen.
fn wp_regions_at(addrs: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    create_log(&log, 1 << 22).unwrap();
    let pages = 4;
    let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
    let regions: Vec<Region> = addrs
        .iter()
        .enumerate()
        .map(|(i, &at)| {
            let seg = rvm.create_segment(dir.path().join(format!("seg{i}")), (pages * ps()) as u64).unwrap();
            let region = rvm.map(&seg, MapSpec::new(0, pages * ps()).at(at)).unwrap();
            assert_eq!(region.addr(), at);
            rvm.track_with(&region, TrackingMethod::WriteProtect).unwrap();
            region
        })
        .collect();
    let what = |addrs: &[usize]| format!("regions tracked at {addrs:x?}");
    // Flush commits storing into every region, on pages of both ends.
    for round in 0..3u8 {
        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap_or_else(|e| panic!("{}: begin: {e}", what(addrs)));
        for (i, r) in regions.iter().enumerate() {
            store(r, 10 + round as usize, &[b'A' + i as u8; 5]);
            store(r, (pages - 1) * ps() + 100 * round as usize, format!("region {i} round {round}").as_bytes());
        }
        tx.commit(CommitMode::Flush).unwrap();
    }
    let committed: Vec<Vec<u8>> = regions.iter().map(image).collect();
    // An abort after those commits puts back exactly the committed images
    // (pages with a shadow, pages read from the segment).
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    for r in &regions {
        store(r, 11, b"aborted");
        store(r, ps() + 3, b"aborted too");
        store(r, (pages - 1) * ps(), b"x");
    }
    tx.abort();
    for (i, r) in regions.iter().enumerate() {
        assert!(image(r) == committed[i], "{}: region {i} after abort", what(addrs));
    }
    // The next begin finds no stray stores (the abort protected every page
    // again), and a commit after the abort logs against the right shadows.
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap_or_else(|e| panic!("{}: begin: {e}", what(addrs)));
    for (i, r) in regions.iter().enumerate() {
        store(r, 2 * ps() + i, b"last");
    }
    tx.commit(CommitMode::Flush).unwrap();
    let want: Vec<Vec<u8>> = regions.iter().map(image).collect();
    // The checkpoint writes every page from its shadow; the log is freed.
    rvm.checkpoint().unwrap();
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    drop(regions);
    rvm.close().unwrap();
    // The segments hold every byte before any replay.
    for (i, want) in want.iter().enumerate() {
        let on_disk = std::fs::read(dir.path().join(format!("seg{i}"))).unwrap();
        assert!(on_disk[..want.len()] == want[..], "{}: segment {i} after the checkpoint", what(addrs));
    }
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    for (i, want) in want.iter().enumerate() {
        let seg = rvm.open_segment(dir.path().join(format!("seg{i}"))).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, pages * ps())).unwrap();
        assert!(image(&r) == *want, "{}: region {i} after reopening", what(addrs));
    }
}

#[test]
fn wp_regions_tracked_in_any_address_order() {
    let _guard = on_files();
    if !wp_available() {
        return;
    }
    // Far from the kernel's choices (and from other tests'), a TiB apart:
    // a run taken from the wrong region's list would land far outside.
    let base: usize = 0x5e00_0000_0000;
    let tib = 1usize << 40;
    let (lo, mid, hi) = (base, base + tib, base + 2 * tib);
    wp_regions_at(&[hi, lo]);
    wp_regions_at(&[hi, mid, lo]);
    wp_regions_at(&[mid, hi, lo]);
    wp_regions_at(&[lo, hi, mid]);
    wp_regions_at(&[lo, mid, hi]);
}

/// `track_with` racing an ordinary transaction's `set_range` into the
/// region: either the transaction holds the region (tracking is refused
/// with `Busy`) or tracking won (`set_range` is refused), never both (its
/// stores would kill the process under the fault method, or be undone as
/// stray stores under the write-protect method).
#[test]
fn tracking_races_ordinary_transactions_cleanly() {
    for tracking in methods() {
        let sim = Sim::new(Options { truncate_threshold: None, ..Options::default() });
        let rvm = Rvm::open_with(sim.vfs.clone(), Path::new("log"), sim.opts.clone()).unwrap();
        let seg = rvm.open_segment("seg").unwrap();
        for round in 0..100u8 {
            let region = rvm.map(&seg, MapSpec::new(0, ps())).unwrap();
            let addr = region.addr();
            let committed = std::thread::scope(|s| {
                let writer = s.spawn(|| {
                    let mut last = None;
                    loop {
                        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
                        // SAFETY: inside the region; this thread alone
                        // stores into it while it is untracked.
                        match unsafe { tx.modify_bytes(addr, &[round; 8]) } {
                            Ok(()) => {
                                tx.commit(CommitMode::NoFlush).unwrap();
                                last = Some(round);
                            }
                            Err(Error::Tx(TxError::TrackedRegion { .. })) => return last,
                            Err(e) => panic!("set_range: {e}"),
                        }
                    }
                });
                loop {
                    match rvm.track_with(&region, tracking) {
                        Ok(()) => break,
                        Err(Error::Map(MapError::Busy { .. })) => std::thread::yield_now(),
                        Err(e) => panic!("track_with: {e}"),
                    }
                }
                writer.join().unwrap()
            });
            // Every ordinary store came before tracking: none is stray.
            let tx = rvm
                .begin_tracked(RestoreMode::Restore)
                .unwrap_or_else(|e| panic!("{tracking:?} round {round}: begin_tracked: {e}"));
            tx.commit(CommitMode::NoFlush).unwrap();
            if committed.is_some() {
                assert_eq!(&image(&region)[..8], &[round; 8]);
            }
            rvm.unmap(region).unwrap();
        }
    }
}
