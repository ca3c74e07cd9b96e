//! Tracked transactions against explicit `set_range` (issue 11), Rhino's
//! three methods side by side in one process: explicit declaration,
//! tracked page diffing, tracked whole-page logging; tracking by faults
//! (the default) and by kernel write-protect (`TrackingMethod::WriteProtect`)
//! as rows of the same tables.
//!
//! 1. Small transactions, no-flush: 1–4 ranges of 8–64 B at random offsets
//!    of a 64 MiB region, each method in turn, several rounds; tx/s
//!    (median).
//! 2. The same transactions flush-committed: tracked diff / explicit.
//! 3. `hashbrown::HashMap<u64, u64>` in a tracked heap through
//!    `TrackedAlloc`, 1,000 inserts per no-flush transaction: inserts/s,
//!    and its ratio to the same map in volatile memory and to `PHashMap`
//!    (1,000 inserts per no-flush `write_no_flush`).
//!
//! `cargo bench --bench tracked`; `RVM_BENCH_QUICK=1` for a short check;
//! `RVM_BENCH_DIR` chooses where the files go (default `rvm-bench/` in the
//! target directory; a real disk, not tmpfs, for the flush figures).

mod common;
use common::{median, quick, si, Rng};
use foldhash::fast::FixedState;
use rvm::heap::{HeapSpec, PersistentHeap, TrackedAlloc};
use rvm::{create_log, CommitMode, MapSpec, Options, Region, RestoreMode, Rvm, TrackedLogging, TrackingMethod};
use std::alloc::Layout;
use std::path::{Path, PathBuf};
use std::time::Instant;

const MIB: usize = 1 << 20;
const REGION: usize = 64 * MIB;

fn bench_root() -> PathBuf {
    let base = std::env::var_os("RVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors().nth(3).map(|p| p.join("rvm-bench")).unwrap_or_else(|| PathBuf::from("rvm-bench"))
    });
    let dir = base.join(format!("tracked-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Explicit,
    /// Explicit, with the undeclared-store detector on.
    Verified,
    Diff,
    WholePage,
    /// Page diff, write-protect tracking (userfaultfd + PAGEMAP_SCAN).
    WriteProtect,
}

impl Method {
    fn explicit(self) -> bool {
        matches!(self, Method::Explicit | Method::Verified)
    }

    fn name(self) -> &'static str {
        match self {
            Method::Explicit => "explicit set_range",
            Method::Verified => "explicit, verify_stores on",
            Method::Diff => "tracked, page diff",
            Method::WholePage => "tracked, whole pages",
            Method::WriteProtect => "tracked, page diff, write-protect",
        }
    }
}

/// One instance with a 64 MiB region, tracked unless explicit.
struct Setup {
    rvm: Rvm,
    region: Region,
    dir: PathBuf,
}

fn setup(root: &Path, name: &str, method: Method) -> Setup {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    create_log(dir.join("log"), 256 << 20).unwrap();
    let logging = if method == Method::WholePage { TrackedLogging::WholePage } else { TrackedLogging::Diff };
    let mut opts =
        Options { tracked_logging: logging, verify_stores: method == Method::Verified, ..Options::default() };
    if std::env::var_os("RVM_BENCH_NO_THREADS").is_some() {
        // No background threads (an experiment: fewer CPUs to flush TLBs on).
        opts.write_behind = false;
        opts.truncate_threshold = None;
    }
    let rvm = Rvm::open(dir.join("log"), opts).unwrap();
    let seg = rvm.create_segment(dir.join("seg"), REGION as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, REGION)).unwrap();
    // Touch every page once, so the first pass pays no page-in.
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    for p in (0..REGION).step_by(4096) {
        // SAFETY: this thread's transaction owns the range.
        unsafe { tx.modify_bytes(region.addr() + p, &[1]).unwrap() };
    }
    tx.commit(CommitMode::Flush).unwrap();
    rvm.checkpoint().unwrap();
    if !method.explicit() {
        let how = if method == Method::WriteProtect { TrackingMethod::WriteProtect } else { TrackingMethod::Fault };
        rvm.track_with(&region, how).unwrap();
    }
    Setup { rvm, region, dir }
}

/// Runs `n` small transactions; returns tx/s.
fn small_txs(s: &Setup, method: Method, n: usize, mode: CommitMode, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let base = s.region.addr();
    let t = Instant::now();
    for i in 0..n {
        let ranges = rng.range(1, 4);
        let mut tx = if method.explicit() {
            s.rvm.begin(RestoreMode::NoRestore).unwrap()
        } else {
            s.rvm.begin_tracked(RestoreMode::Restore).unwrap()
        };
        for _ in 0..ranges {
            let len = rng.range(8, 64);
            let off = rng.below(REGION - len);
            if method.explicit() {
                // SAFETY: this thread's transaction owns the range.
                unsafe { tx.set_range(base + off, len).unwrap() };
            }
            // SAFETY: as above (tracked: this thread holds the tracked
            // transaction).
            unsafe { std::ptr::write_bytes((base + off) as *mut u8, (i as u8) | 1, len) };
        }
        tx.commit(mode).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

type Map = hashbrown::HashMap<u64, u64, FixedState, TrackedAlloc>;

/// Inserts `keys` into a hashbrown map in a tracked heap, `per_tx` per
/// no-flush transaction; inserts/s.
fn tracked_map_inserts(root: &Path, name: &str, keys: &[u64], per_tx: usize, how: TrackingMethod) -> f64 {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    create_log(dir.join("log"), 256 << 20).unwrap();
    // Growing the table rewrites it whole in one transaction: the pool must
    // hold it (2^21 buckets of 17 bytes at 1M keys).
    let opts = Options { tracked_pool_pages: 32768, ..Options::default() };
    let rvm = Rvm::open(dir.join("log"), opts).unwrap();
    let heap = PersistentHeap::create(&rvm, dir.join("heap"), &HeapSpec::fixed(0x5e00_0000_0000, 256 << 20)).unwrap();
    heap.track_with(how).unwrap();
    // SAFETY: the map lives in the heap (its rooted block) and changes
    // only inside transactions on the heap.
    let alloc = unsafe { TrackedAlloc::new(&heap) }.unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let block = tx.malloc(Layout::new::<Map>()).unwrap();
    // SAFETY: a fresh block of this transaction, sized for a Map.
    unsafe {
        block.cast::<Map>().as_ptr().write(Map::with_capacity_and_hasher_in(16, FixedState::with_seed(1), alloc))
    };
    tx.set_root("m", Some((block, std::mem::size_of::<Map>() as u64, 0))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    let map = block.as_ptr().cast::<Map>();
    let t = Instant::now();
    for chunk in keys.chunks(per_tx) {
        let tx = heap.begin(RestoreMode::Restore).unwrap();
        // SAFETY: this thread holds the heap's tracked transaction.
        let m = unsafe { &mut *map };
        for &k in chunk {
            m.insert(k, k);
        }
        tx.commit(CommitMode::NoFlush).unwrap();
    }
    let r = keys.len() as f64 / t.elapsed().as_secs_f64();
    // SAFETY: no transaction is open.
    assert_eq!(unsafe { &*map }.len(), keys.len());
    heap.close().unwrap();
    rvm.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn volatile_map_inserts(keys: &[u64]) -> f64 {
    let mut m: hashbrown::HashMap<u64, u64, FixedState> =
        hashbrown::HashMap::with_capacity_and_hasher(16, FixedState::with_seed(1));
    let t = Instant::now();
    for &k in keys {
        m.insert(k, k);
    }
    let r = keys.len() as f64 / t.elapsed().as_secs_f64();
    assert_eq!(std::hint::black_box(&m).len(), keys.len());
    r
}

fn phashmap_inserts(root: &Path, name: &str, keys: &[u64], per_tx: usize) -> f64 {
    use rvm::collections::{Config, Error, PHashMap, PHeap};
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config { heap_len: 256 << 20, log_len: 256 << 20, ..Config::default() };
    let heap = PHeap::open_or_create(&dir, config).unwrap();
    heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u64, u64>::new).map(|_| ())).unwrap();
    let t = Instant::now();
    for chunk in keys.chunks(per_tx) {
        heap.write_no_flush(|tx| {
            let mut m = tx.root_mut::<PHashMap<u64, u64>>("m")?.expect("root");
            for &k in chunk {
                m.insert(k, k)?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let r = keys.len() as f64 / t.elapsed().as_secs_f64();
    heap.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn main() {
    let q = quick();
    let rounds = if q { 1 } else { 5 };
    let root = bench_root();
    if std::env::var_os("RVM_BENCH_PROFILE").is_some() {
        // Only one loop (tracked diff, `wp`: write-protect, `verify`:
        // explicit with the detector, `map-wp`: the write-protect map), for
        // a profiler.
        if std::env::var("RVM_BENCH_PROFILE").as_deref() == Ok("map-wp") {
            let mut rng = Rng::new(42);
            let keys: Vec<u64> = (0..1_000_000).map(|_| rng.next()).collect();
            let r = tracked_map_inserts(&root, "profile-map", &keys, 1000, TrackingMethod::WriteProtect);
            println!("hashbrown, write-protect: {} inserts/s", si(r));
            return;
        }
        let m = match std::env::var("RVM_BENCH_PROFILE").as_deref() {
            Ok("verify") => Method::Verified,
            Ok("wp") => Method::WriteProtect,
            _ => Method::Diff,
        };
        let s = setup(&root, "profile", m);
        let r = small_txs(&s, m, 200_000, CommitMode::NoFlush, 1);
        println!("{}, no-flush: {} tx/s", m.name(), si(r));
        return;
    }
    println!("# tracked transactions (issue 11); {rounds} round(s), medians; all runs in brackets");
    println!("machine: {} CPUs; load {}", std::thread::available_parallelism().map_or(0, |n| n.get()), {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    });

    // 1 + 2: small transactions.
    let methods = [Method::Explicit, Method::Diff, Method::WholePage, Method::Verified, Method::WriteProtect];
    let setups: Vec<Setup> = methods.iter().map(|&m| setup(&root, &format!("{m:?}"), m)).collect();
    let n_noflush = if q { 2_000 } else { 100_000 };
    let n_flush = if q { 50 } else { 1_000 };
    let mut noflush = vec![Vec::new(); methods.len()];
    let mut flush = vec![Vec::new(); methods.len()];
    for round in 0..rounds {
        for (i, (&m, s)) in methods.iter().zip(&setups).enumerate() {
            noflush[i].push(small_txs(s, m, n_noflush, CommitMode::NoFlush, round as u64 * 7 + 1));
            s.rvm.flush().unwrap();
        }
    }
    // Flush rates swing with the shared disk: short runs, methods
    // alternating, so each ratio compares neighbours in time.
    let mut flush_ratio = vec![Vec::new(); methods.len()];
    for round in 0..rounds * 4 {
        let mut here = Vec::new();
        for (i, (&m, s)) in methods.iter().zip(&setups).enumerate() {
            let r = small_txs(s, m, n_flush / 4, CommitMode::Flush, round as u64 * 7 + 3);
            flush[i].push(r);
            here.push(r);
        }
        for i in 0..methods.len() {
            flush_ratio[i].push(here[i] / here[0]);
        }
    }
    let fmt_runs = |v: &[f64]| v.iter().map(|&x| si(x)).collect::<Vec<_>>().join(" ");
    println!("\n## small transactions (1-4 ranges of 8-64 B at random offsets of 64 MiB)\n");
    println!("| method | no-flush tx/s | flush tx/s | log bytes per tx (no-flush runs) |");
    println!("|---|---|---|---|");
    let explicit_flush = median(&flush[0]);
    let explicit_noflush = median(&noflush[0]);
    for (i, (&m, s)) in methods.iter().zip(&setups).enumerate() {
        let st = s.rvm.stats();
        let per_tx = st.log_bytes_written as f64 / st.committed.max(1) as f64;
        println!(
            "| {} | {} [{}] ({:.2}x explicit) | {} ({:.2}x explicit; median of paired ratios {:.2}) | {:.0} |",
            m.name(),
            si(median(&noflush[i])),
            fmt_runs(&noflush[i]),
            median(&noflush[i]) / explicit_noflush,
            si(median(&flush[i])),
            median(&flush[i]) / explicit_flush,
            median(&flush_ratio[i]),
            per_tx
        );
    }
    for s in setups {
        let dir = s.dir.clone();
        drop(s.region);
        s.rvm.close().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    // 3: hashbrown in the heap.
    let n = if q { 20_000 } else { 1_000_000 };
    let mut rng = Rng::new(42);
    let keys: Vec<u64> = (0..n).map(|_| rng.next()).collect();
    let (mut tracked, mut wp, mut volatile, mut pmap) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.min(3) {
        tracked.push(tracked_map_inserts(&root, &format!("map{round}"), &keys, 1000, TrackingMethod::Fault));
        wp.push(tracked_map_inserts(&root, &format!("wmap{round}"), &keys, 1000, TrackingMethod::WriteProtect));
        volatile.push(volatile_map_inserts(&keys));
        pmap.push(phashmap_inserts(&root, &format!("pmap{round}"), &keys, 1000));
    }
    println!("\n## HashMap<u64, u64> inserts, {n} random keys, 1,000 per no-flush transaction\n");
    println!("| map | inserts/s | ratio to tracked hashbrown |");
    println!("|---|---|---|");
    let t = median(&tracked);
    println!("| hashbrown in a tracked heap (TrackedAlloc), fault | {} [{}] | 1.00 |", si(t), fmt_runs(&tracked));
    println!(
        "| hashbrown in a tracked heap (TrackedAlloc), write-protect | {} [{}] | {:.2} |",
        si(median(&wp)),
        fmt_runs(&wp),
        median(&wp) / t
    );
    println!(
        "| hashbrown, volatile memory | {} [{}] | {:.2} |",
        si(median(&volatile)),
        fmt_runs(&volatile),
        median(&volatile) / t
    );
    println!(
        "| PHashMap (typed layer, explicit) | {} [{}] | {:.2} |",
        si(median(&pmap)),
        fmt_runs(&pmap),
        median(&pmap) / t
    );
    let _ = std::fs::remove_dir_all(&root);
}
