//! Typed-layer benchmarks: `PHashMap<u64, u64>` and `PBTreeMap<u64, u64>`
//! inserts in no-flush transactions (one, or 1,000, per transaction),
//! random `get` on a 1,000,000-key tree, durable (flush) single inserts
//! against raw `pwrite`+`fdatasync` in the same slices, open of heaps
//! holding 1,000,000 entries, the volatile `std` maps as the ceiling, and
//! a breakdown of a write transaction's fixed costs. Prints a markdown
//! table of medians (each workload repeated, interleaved).
//!
//! `cargo bench -p rvm-collections --bench collections`;
//! `RVM_BENCH_QUICK=1` for a short run that only checks it works;
//! `RVM_BENCH_ROUNDS=n` repetitions (default 5); `RVM_BENCH_DIR` chooses
//! where the files go (default: the target dir, the same disk as the raw
//! baseline's file, which lies next to the heaps);
//! `RVM_BENCH_PROFILE=hash1000` runs only the batched hash-map inserts,
//! for a profiler; `RVM_BENCH_PROFILE=threads` only the durable inserts
//! from 1 and 4 threads (group commit against a flush under the writer
//! lock, emulated by a lock around each `write`).

#[path = "../../benches/common/mod.rs"]
mod common;

use common::{median, quick, si, Rng};
use rvm_collections::{Config, Error, PBTreeMap, PHashMap, PHeap};
use rvm_core::{CommitMode, RestoreMode};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type HMap = PHashMap<u64, u64>;
type BMap = PBTreeMap<u64, u64>;
const MIB: u64 = 1 << 20;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench_root() -> PathBuf {
    let base = std::env::var_os("RVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/deps/collections-<hash> -> target/rvm-bench
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors().nth(3).map(|p| p.join("rvm-bench")).unwrap_or_else(|| PathBuf::from("rvm-bench"))
    });
    let dir = base.join(format!("collections-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

fn fresh(root: &Path, name: &str, heap_mib: u64, log_mib: u64) -> PHeap {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config { heap_len: heap_mib * MIB, log_len: log_mib * MIB, ..Config::default() };
    PHeap::open_or_create(&dir, config).expect("create heap")
}

fn close_and_remove(heap: PHeap) {
    let dir = heap.dir().to_path_buf();
    heap.close().expect("close");
    let _ = std::fs::remove_dir_all(dir);
}

fn keys(seed: u64, n: usize) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.next()).collect()
}

/// Ops per second of `n` operations taking `f`.
fn rate(n: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    n as f64 / t.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------
// Workloads.

/// Inserts `keys` into a new `PHashMap` root, `per_tx` per no-flush
/// transaction; returns inserts/s.
fn hash_inserts(heap: &PHeap, keys: &[u64], per_tx: usize, reserve: bool) -> f64 {
    heap.write(|tx| {
        let mut m = tx.root_or_insert_with("m", HMap::new)?;
        if reserve {
            m.reserve(keys.len())?;
        }
        Ok::<_, Error>(())
    })
    .expect("root");
    rate(keys.len(), || {
        for chunk in keys.chunks(per_tx) {
            heap.write_no_flush(|tx| {
                let mut m = tx.root_mut::<HMap>("m")?.expect("root");
                for &k in chunk {
                    m.insert(k, k)?;
                }
                Ok::<_, Error>(())
            })
            .expect("insert");
        }
    })
}

fn btree_inserts(heap: &PHeap, keys: &[u64], per_tx: usize) -> f64 {
    heap.write(|tx| tx.root_or_insert_with("t", BMap::new).map(|_| ())).expect("root");
    rate(keys.len(), || {
        for chunk in keys.chunks(per_tx) {
            heap.write_no_flush(|tx| {
                let mut m = tx.root_mut::<BMap>("t")?.expect("root");
                for &k in chunk {
                    m.insert(k, k)?;
                }
                Ok::<_, Error>(())
            })
            .expect("insert");
        }
    })
}

/// `n` random gets of present keys, in one read closure.
fn btree_gets(heap: &PHeap, keys: &[u64], n: usize, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let probe: Vec<u64> = (0..n).map(|_| keys[rng.below(keys.len())]).collect();
    rate(n, || {
        heap.read(|r| {
            let m = r.root::<BMap>("t").expect("root").expect("root");
            let mut sum = 0u64;
            for k in &probe {
                sum = sum.wrapping_add(*m.get(k).expect("present"));
            }
            black_box(sum);
        })
    })
}

/// Read closures borrowing the tree (`ReadTx::root`), per second.
fn btree_borrows(heap: &PHeap, n: usize) -> f64 {
    rate(n, || {
        for _ in 0..n {
            heap.read(|r| black_box(r.root::<BMap>("t").expect("root").expect("root").len()));
        }
    })
}

fn std_hash(keys: &[u64]) -> f64 {
    rate(keys.len(), || {
        let mut m = HashMap::new();
        for &k in keys {
            m.insert(k, k);
        }
        black_box(m.len());
    })
}

fn std_btree(keys: &[u64]) -> f64 {
    rate(keys.len(), || {
        let mut m = BTreeMap::new();
        for &k in keys {
            m.insert(k, k);
        }
        black_box(m.len());
    })
}

fn std_btree_gets(m: &BTreeMap<u64, u64>, keys: &[u64], n: usize, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let probe: Vec<u64> = (0..n).map(|_| keys[rng.below(keys.len())]).collect();
    rate(n, || {
        let mut sum = 0u64;
        for k in &probe {
            sum = sum.wrapping_add(*m.get(k).expect("present"));
        }
        black_box(sum);
    })
}

/// A write transaction's fixed costs, ops/s each: the heap transaction
/// alone (begin + no-flush commit, nothing declared), an empty typed
/// write (adds the writer lock, `catch_unwind`, `WriteTx`), and one that
/// borrows the map root mutably (adds the root lookup, its check and the
/// header's declaration).
fn overheads(heap: &PHeap, n: usize) -> [f64; 3] {
    // SAFETY: no typed transaction runs while the raw one does (this
    // thread runs them one after another), and it changes nothing.
    let raw = unsafe { heap.raw_heap() };
    let heap_tx = rate(n, || {
        for _ in 0..n {
            raw.begin(RestoreMode::Restore).expect("begin").commit(CommitMode::NoFlush).expect("commit");
        }
    });
    let empty = rate(n, || {
        for _ in 0..n {
            heap.write_no_flush(|_| Ok::<_, Error>(())).expect("write");
        }
    });
    let borrow = rate(n, || {
        for _ in 0..n {
            heap.write_no_flush(|tx| tx.root_mut::<HMap>("m").map(|m| black_box(m.map(|m| m.len())))).expect("write");
        }
    });
    [heap_tx, empty, borrow]
}

/// Raw disk baseline: `pwrite` of `size` bytes appending in a sparse file,
/// then `fdatasync`.
struct Raw {
    file: File,
    len: u64,
    pos: u64,
    buf: Vec<u8>,
}

impl Raw {
    fn new(path: &Path, len: u64, size: usize) -> Raw {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).expect("raw file");
        file.set_len(len).expect("set_len");
        Raw { file, len, pos: 0, buf: vec![0xA5; size] }
    }

    fn run(&mut self, dur: Duration) -> f64 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            if self.pos + self.buf.len() as u64 > self.len {
                self.pos = 0;
            }
            self.file.write_all_at(&self.buf, self.pos).expect("pwrite");
            self.file.sync_data().expect("fdatasync");
            self.pos += self.buf.len() as u64;
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    }
}

/// Durable single inserts (`PHeap::write`, flush) for `dur`; inserts/s.
fn flush_inserts(heap: &PHeap, btree: bool, rng: &mut Rng, dur: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        let k = rng.next();
        heap.write(|tx| {
            if btree {
                tx.root_mut::<BMap>("t")?.expect("root").insert(k, k)?;
            } else {
                tx.root_mut::<HMap>("m")?.expect("root").insert(k, k)?;
            }
            Ok::<_, Error>(())
        })
        .expect("flush insert");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `threads` threads each make `per_thread` durable single inserts into
/// one `PHashMap`; with `one_at_a_time`, a lock around each `write` keeps
/// the next writer out until the previous one's sync is done (what
/// `write` did before it released the writer lock before the sync).
/// Inserts/s.
fn threaded_flush_inserts(heap: &PHeap, threads: u64, per_thread: u64, one_at_a_time: bool, first: u64) -> f64 {
    let turn = parking_lot::Mutex::new(());
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let turn = &turn;
            s.spawn(move || {
                for i in 0..per_thread {
                    let _turn = one_at_a_time.then(|| turn.lock());
                    heap.write(|tx| {
                        tx.root_mut::<HMap>("m")?.expect("root").insert(t << 32 | (first + i), i)?;
                        Ok::<_, Error>(())
                    })
                    .expect("durable insert");
                }
            });
        }
    });
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

/// `RVM_BENCH_PROFILE=threads`: durable inserts from 4 threads with group
/// commit, from 4 threads one sync at a time, and from 1 thread, in turn.
fn durable_threads(rounds: usize, per_thread: u64) {
    let root = bench_root();
    let heap = fresh(&root, "threads", 256, 512);
    heap.write(|tx| tx.root_or_insert_with("m", HMap::new).map(|_| ())).expect("root");
    let (mut group, mut serial, mut single) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        // Fresh keys in every run: each insert adds an entry.
        let first = r as u64 * 12 * per_thread;
        serial.push(threaded_flush_inserts(&heap, 4, per_thread, true, first));
        group.push(threaded_flush_inserts(&heap, 4, per_thread, false, first + 4 * per_thread));
        single.push(threaded_flush_inserts(&heap, 1, 4 * per_thread, false, first + 8 * per_thread));
    }
    let ratios: Vec<f64> = group.iter().zip(&serial).map(|(g, s)| g / s).collect();
    println!("| durable single inserts, `PHashMap` | inserts/s (median of {rounds}) |");
    println!("|---|---:|");
    println!("| 4 threads, group commit (`write`) | {} |", si(median(&group)));
    println!("| 4 threads, one sync at a time (lock around `write`) | {} |", si(median(&serial)));
    println!("| 1 thread | {} |", si(median(&single)));
    println!("| group / one at a time, median of paired rounds | {:.2}x |", median(&ratios));
    close_and_remove(heap);
    let _ = std::fs::remove_dir_all(&root);
}

/// Opens the heap in `dir` and borrows root `name` once (its check);
/// returns (open ms, first borrow ms).
fn open_ms(dir: &Path, btree: bool) -> (f64, f64) {
    let t = Instant::now();
    let heap = PHeap::open_or_create(dir, Config::default()).expect("open");
    let open = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let len = heap.read(|r| {
        if btree {
            r.root::<BMap>("t").expect("root").expect("root").len()
        } else {
            r.root::<HMap>("m").expect("root").expect("root").len()
        }
    });
    let first = t.elapsed().as_secs_f64() * 1e3;
    black_box(len);
    heap.close().expect("close");
    (open, first)
}

// ---------------------------------------------------------------------------
// Table.

struct Row {
    what: String,
    unit: &'static str,
    runs: Vec<f64>,
    /// (at least, shown target)
    target: Option<(f64, String)>,
    fmt: fn(f64) -> String,
}

fn ratio(x: f64) -> String {
    format!("{x:.2}")
}

fn ms(x: f64) -> String {
    format!("{x:.1}")
}

fn ns(x: f64) -> String {
    format!("{x:.0}")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `RVM_BENCH_PROFILE=hash1000`: only the batched hash-map inserts
    // (three times, table reserved), to run under a profiler.
    if std::env::var("RVM_BENCH_PROFILE").is_ok_and(|v| v == "hash1000") {
        let (root, ks) = (bench_root(), keys(7, 1_000_000));
        for _ in 0..3 {
            let h = fresh(&root, "profile", 256, 512);
            eprintln!("{}", si(hash_inserts(&h, &ks, 1000, true)));
            close_and_remove(h);
        }
        let _ = std::fs::remove_dir_all(&root);
        return;
    }
    let q = quick();
    if std::env::var("RVM_BENCH_PROFILE").is_ok_and(|v| v == "threads") {
        durable_threads(if q { 1 } else { env_usize("RVM_BENCH_ROUNDS", 5) }, if q { 20 } else { 500 });
        return;
    }
    let rounds = if q { 1 } else { env_usize("RVM_BENCH_ROUNDS", 5) };
    let n_hash1 = if q { 2_000 } else { env_usize("RVM_BENCH_HASH1_N", 200_000) };
    let n_big = if q { 20_000 } else { 1_000_000 };
    let n_btree1 = if q { 2_000 } else { env_usize("RVM_BENCH_BTREE1_N", 100_000) };
    let n_gets = if q { 20_000 } else { 1_000_000 };
    let n_over = if q { 2_000 } else { 100_000 };
    let slices = if q { 2 } else { 10 };
    let slice = if q { Duration::from_millis(50) } else { Duration::from_millis(200) };
    let root = bench_root();
    let fs_dir = std::fs::canonicalize(&root).unwrap_or(root.clone());
    println!("# rvm-collections benchmark{}", if q { " (quick)" } else { "" });
    println!();
    println!("- files in {} (heaps and the raw baseline's file side by side)", fs_dir.display());
    println!("- {rounds} repetitions, interleaved; medians");
    println!("- load average at start: {}", loadavg());
    println!();

    // The 1,000,000-entry heaps (built once: hash map 1,000 per tx, tree
    // 1,000 per tx), for the batched rows, the gets and the open rows.
    eprintln!("building the {n_big}-entry maps");
    let big_keys = keys(7, n_big);
    let big_hash = fresh(&root, "big-hash", 256, 512);
    let hash_1000 = hash_inserts(&big_hash, &big_keys, 1000, false);
    let big_tree = fresh(&root, "big-tree", 256, 512);
    let tree_1000 = btree_inserts(&big_tree, &big_keys, 1000);
    let std_tree: BTreeMap<u64, u64> = big_keys.iter().map(|&k| (k, k)).collect();
    let mut hash_1000s = vec![hash_1000];
    let mut tree_1000s = vec![tree_1000];

    // Flush heaps and the raw file: one per run, kept across repetitions.
    let fl_hash = fresh(&root, "flush-hash", 64, 256);
    fl_hash.write(|tx| tx.root_or_insert_with("m", HMap::new).map(|_| ())).expect("root");
    let fl_tree = fresh(&root, "flush-tree", 64, 256);
    fl_tree.write(|tx| tx.root_or_insert_with("t", BMap::new).map(|_| ())).expect("root");
    let mut frng = Rng::new(99);
    // Room for every durable insert of the run, so that none rebuilds the
    // table (a rebuild writes the whole table: not a single insert's cost).
    fl_hash.write(|tx| tx.root_mut::<HMap>("m")?.expect("root").reserve(200_000)).expect("reserve");
    // Log bytes of one durable insert: the raw baseline writes as many.
    let s0 = fl_hash.rvm().stats();
    let t = Instant::now();
    let r = flush_inserts(&fl_hash, false, &mut frng, Duration::from_millis(100));
    let s1 = fl_hash.rvm().stats();
    let commits = ((r * t.elapsed().as_secs_f64()).round() as u64).max(1);
    let frame = ((s1.log_bytes_written - s0.log_bytes_written) / commits) as usize;
    let raw_path = root.join("raw.bin");
    let _ = std::fs::remove_file(&raw_path);
    let mut raw = Raw::new(&raw_path, 256 * MIB, frame.max(1));

    let names = [
        "hash1",
        "std_hash",
        "btree1",
        "std_btree",
        "gets",
        "std_gets",
        "borrow",
        "raw",
        "fl_hash",
        "fl_tree",
        "r_hash",
        "r_tree",
        "hash1000r",
        "o_heap",
        "o_empty",
        "o_borrow",
        "o_hash_insert",
        "o_tree_borrow",
    ];
    let mut res: HashMap<&str, Vec<f64>> = names.iter().map(|n| (*n, Vec::new())).collect();
    let mut push = |k: &'static str, v: f64| res.get_mut(k).expect("name").push(v);

    for r in 0..rounds {
        eprintln!("round {}/{rounds} (load {})", r + 1, loadavg());
        let ks = keys(100 + r as u64, n_hash1);
        let h = fresh(&root, "hash1", 64, 256);
        push("hash1", hash_inserts(&h, &ks, 1, false));
        let [a, b, c] = overheads(&h, n_over);
        push("o_heap", a);
        push("o_empty", b);
        push("o_borrow", c);
        close_and_remove(h);
        push("std_hash", std_hash(&ks));

        let ks = keys(200 + r as u64, n_btree1);
        let t = fresh(&root, "btree1", 64, 256);
        push("btree1", btree_inserts(&t, &ks, 1));
        let nb = (n_over / 100).max(10);
        push(
            "o_tree_borrow",
            rate(nb, || {
                for _ in 0..nb {
                    t.write_no_flush(|tx| tx.root_mut::<BMap>("t").map(|m| black_box(m.map(|m| m.len()))))
                        .expect("write");
                }
            }),
        );
        close_and_remove(t);
        push("std_btree", std_btree(&ks));

        push("gets", btree_gets(&big_tree, &big_keys, n_gets, 300 + r as u64));
        push("std_gets", std_btree_gets(&std_tree, &big_keys, n_gets, 300 + r as u64));
        push("borrow", btree_borrows(&big_tree, n_over));

        if r > 0 {
            // Batched rows again, on fresh heaps (the first came with the build).
            let h = fresh(&root, "hash1000", 256, 512);
            hash_1000s.push(hash_inserts(&h, &big_keys, 1000, false));
            close_and_remove(h);
            let t = fresh(&root, "tree1000", 256, 512);
            tree_1000s.push(btree_inserts(&t, &big_keys, 1000));
            close_and_remove(t);
        }
        let h = fresh(&root, "hash1000r", 256, 512);
        push("hash1000r", hash_inserts(&h, &big_keys, 1000, true));
        close_and_remove(h);

        // Durable single inserts against the raw disk, in the same slices.
        let (mut sr, mut sh, mut st) = (0.0, 0.0, 0.0);
        for _ in 0..slices {
            sr += raw.run(slice);
            sh += flush_inserts(&fl_hash, false, &mut frng, slice);
            st += flush_inserts(&fl_tree, true, &mut frng, slice);
        }
        let k = slices as f64;
        push("raw", sr / k);
        push("fl_hash", sh / k);
        push("fl_tree", st / k);
        push("r_hash", sh / sr);
        push("r_tree", st / sr);
    }
    close_and_remove(fl_hash);
    close_and_remove(fl_tree);
    drop(raw);
    let _ = std::fs::remove_file(&raw_path);

    // Open of the 1,000,000-entry heaps: once after a plain close (the log
    // is replayed), then after a truncation (clean shutdown), `rounds`
    // times each, alternating.
    eprintln!("open");
    let (hdir, tdir) = (big_hash.dir().to_path_buf(), big_tree.dir().to_path_buf());
    let (hstats, tstats) = (big_hash.stats(), big_tree.stats());
    big_hash.close().expect("close");
    big_tree.close().expect("close");
    let replay_hash = open_ms(&hdir, false);
    let replay_tree = open_ms(&tdir, true);
    for d in [&hdir, &tdir] {
        let h = PHeap::open_or_create(d, Config::default()).expect("open");
        h.rvm().truncate().expect("truncate");
        h.close().expect("close");
    }
    let (mut oh, mut ot, mut fh, mut ft) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds.max(3) {
        let (o, f) = open_ms(&hdir, false);
        oh.push(o);
        fh.push(f);
        let (o, f) = open_ms(&tdir, true);
        ot.push(o);
        ft.push(f);
    }
    let _ = std::fs::remove_dir_all(&root);

    // ---- table
    let m = |k: &str| res[k].clone();
    let per_op = |k: &str| res[k].iter().map(|r| 1e9 / r).collect::<Vec<f64>>();
    let mut rows = vec![
        Row {
            what: "PHashMap<u64,u64> insert, 1 per no-flush tx".into(),
            unit: "inserts/s",
            runs: m("hash1"),
            target: Some((500e3, "≥ 500k".into())),
            fmt: si,
        },
        Row {
            what: "PHashMap<u64,u64> insert, 1,000 per no-flush tx".into(),
            unit: "inserts/s",
            runs: hash_1000s.clone(),
            target: Some((3e6, "≥ 3M".into())),
            fmt: si,
        },
        Row {
            what: "same, into a table reserved for them all (no growth)".into(),
            unit: "inserts/s",
            runs: m("hash1000r"),
            target: None,
            fmt: si,
        },
        Row {
            what: "std HashMap<u64,u64> insert".into(),
            unit: "inserts/s",
            runs: m("std_hash"),
            target: None,
            fmt: si,
        },
        Row {
            what: "PBTreeMap<u64,u64> insert, 1 per no-flush tx".into(),
            unit: "inserts/s",
            runs: m("btree1"),
            target: Some((300e3, "≥ 300k".into())),
            fmt: si,
        },
        Row {
            what: "PBTreeMap<u64,u64> insert, 1,000 per no-flush tx".into(),
            unit: "inserts/s",
            runs: tree_1000s.clone(),
            target: None,
            fmt: si,
        },
        Row {
            what: "std BTreeMap<u64,u64> insert".into(),
            unit: "inserts/s",
            runs: m("std_btree"),
            target: None,
            fmt: si,
        },
        Row {
            what: format!("PBTreeMap random get, {n_big} keys, one read closure"),
            unit: "gets/s",
            runs: m("gets"),
            target: Some((3e6, "≥ 3M".into())),
            fmt: si,
        },
        Row {
            what: format!("std BTreeMap random get, {n_big} keys"),
            unit: "gets/s",
            runs: m("std_gets"),
            target: None,
            fmt: si,
        },
        Row {
            what: format!("read + ReadTx::root of the {n_big}-key PBTreeMap, already checked (cached)"),
            unit: "ns",
            runs: per_op("borrow"),
            target: None,
            fmt: ns,
        },
        Row {
            what: format!("raw pwrite {frame} B (one flush insert's log bytes) + fdatasync"),
            unit: "ops/s",
            runs: m("raw"),
            target: None,
            fmt: si,
        },
        Row {
            what: "PHashMap insert, 1 per flush tx".into(),
            unit: "inserts/s",
            runs: m("fl_hash"),
            target: None,
            fmt: si,
        },
        Row {
            what: "same / raw (same slices)".into(),
            unit: "ratio",
            runs: m("r_hash"),
            target: Some((0.8, "≥ 0.80".into())),
            fmt: ratio,
        },
        Row {
            what: "PBTreeMap insert, 1 per flush tx".into(),
            unit: "inserts/s",
            runs: m("fl_tree"),
            target: None,
            fmt: si,
        },
        Row {
            what: "same / raw (same slices)".into(),
            unit: "ratio",
            runs: m("r_tree"),
            target: Some((0.8, "≥ 0.80".into())),
            fmt: ratio,
        },
        Row {
            what: format!("open, PHashMap of {n_big} entries ({} blocks), clean log", hstats.live_blocks),
            unit: "ms",
            runs: oh,
            target: None,
            fmt: ms,
        },
        Row { what: "  then first ReadTx::root (O(1) check)".into(), unit: "ms", runs: fh, target: None, fmt: ms },
        Row {
            what: format!("open, PBTreeMap of {n_big} entries ({} blocks), clean log", tstats.live_blocks),
            unit: "ms",
            runs: ot,
            target: None,
            fmt: ms,
        },
        Row {
            what: "  then first ReadTx::root (walks every node)".into(),
            unit: "ms",
            runs: ft,
            target: None,
            fmt: ms,
        },
        Row {
            what: "open after a plain close (log replayed), PHashMap / PBTreeMap".into(),
            unit: "ms",
            runs: vec![replay_hash.0, replay_tree.0],
            target: None,
            fmt: ms,
        },
        Row {
            what: "write-tx cost: HeapTx begin + no-flush commit, empty".into(),
            unit: "ns",
            runs: per_op("o_heap"),
            target: None,
            fmt: ns,
        },
        Row {
            what: "write-tx cost: empty write_no_flush".into(),
            unit: "ns",
            runs: per_op("o_empty"),
            target: None,
            fmt: ns,
        },
        Row {
            what: "write-tx cost: write_no_flush + root_mut of the PHashMap".into(),
            unit: "ns",
            runs: per_op("o_borrow"),
            target: None,
            fmt: ns,
        },
        Row {
            what: "write-tx cost: + one insert (the 1-per-tx row)".into(),
            unit: "ns",
            runs: per_op("hash1"),
            target: None,
            fmt: ns,
        },
        Row {
            what: format!("write-tx cost: write_no_flush + root_mut of the {n_btree1}-key PBTreeMap"),
            unit: "ns",
            runs: per_op("o_tree_borrow"),
            target: None,
            fmt: ns,
        },
    ];
    let _ = &mut rows;
    println!("| figure | unit | target | median | runs | met |");
    println!("|---|---|---|---:|---|---|");
    for r in &rows {
        let med = median(&r.runs);
        let runs = r.runs.iter().map(|&x| (r.fmt)(x)).collect::<Vec<_>>().join(" ");
        let (target, met) = match &r.target {
            Some((min, shown)) => (shown.clone(), if med >= *min { "yes" } else { "**no**" }),
            None => (String::new(), ""),
        };
        println!("| {} | {} | {} | {} | {} | {} |", r.what, r.unit, target, (r.fmt)(med), runs, met);
    }
    println!();
    println!("(the batched rows' first run is the build of the 1,000,000-entry maps used by the get and open rows;");
    println!("open rows: warm page cache, {} opens each)", rounds.max(3));
    println!("load average at end: {}", loadavg());
}
