//! Heap benchmarks: malloc+free pairs against the system allocator and
//! `linked_list_allocator`, fragmentation under a random workload, and load
//! time of a heap with many live blocks. Prints a table of medians.
//!
//! `cargo bench -p rvm-heap --bench heap`; `RVM_BENCH_QUICK=1` for a short
//! run; `RVM_BENCH_DIR` chooses where the files go (default: the target dir).

use rvm_core::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};
use rvm_heap::Heap;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// Log-uniform in [lo, hi].
    fn log_uniform(&mut self, lo: f64, hi: f64) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (lo * (hi / lo).powf(u)) as usize
    }
}

fn quick() -> bool {
    std::env::var_os("RVM_BENCH_QUICK").is_some()
}

fn bench_dir() -> PathBuf {
    let base = std::env::var_os("RVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors().nth(3).map(|p| p.join("rvm-bench")).unwrap_or_else(|| PathBuf::from("rvm-bench"))
    });
    let dir = base.join(format!("heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

struct Setup {
    _dir: PathBuf,
    rvm: Rvm,
    heap: Heap,
}

fn setup(name: &str, heap_bytes: usize, base: usize) -> Setup {
    let dir = bench_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    create_log(dir.join("log"), 512 << 20).expect("log");
    let rvm = Rvm::open(dir.join("log"), Options::default()).expect("open");
    let seg = rvm.create_segment(dir.join("seg"), (heap_bytes + 4096) as u64).expect("segment");
    let s = rvm.map(&seg, MapSpec::new(0, 4096).at(base)).expect("map");
    let h = rvm.map(&seg, MapSpec::new(4096, heap_bytes).at(base + 4096)).expect("map");
    let heap = Heap::format(&rvm, s, h).expect("format");
    Setup { _dir: dir, rvm, heap }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// malloc+free pairs per second, `per_tx` pairs per no-flush transaction;
/// each pair frees a block allocated by an earlier transaction.
fn rvm_pairs(s: &Setup, per_tx: usize, total: usize, seed: u64) -> f64 {
    let mut rng = Rng(seed);
    let mut live: Vec<NonNull<u8>> = Vec::new();
    // Warm-up working set.
    let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
    for _ in 0..1000 {
        live.push(tx.malloc(Layout::from_size_align(rng.range(16, 256) as usize, 8).expect("layout")).expect("malloc"));
    }
    tx.commit(CommitMode::NoFlush).expect("commit");
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
        let mut fresh = Vec::with_capacity(per_tx);
        for _ in 0..per_tx {
            fresh.push(
                tx.malloc(Layout::from_size_align(rng.range(16, 256) as usize, 8).expect("layout")).expect("malloc"),
            );
            let i = rng.next() as usize % live.len();
            tx.free(live.swap_remove(i)).expect("free");
        }
        tx.commit(CommitMode::NoFlush).expect("commit");
        live.extend(fresh);
        done += per_tx;
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
    for p in live {
        tx.free(p).expect("free");
    }
    tx.commit(CommitMode::NoFlush).expect("commit");
    rate
}

/// The same pattern on a volatile allocator.
fn volatile_pairs(alloc: &dyn Fn(Layout) -> *mut u8, free: &dyn Fn(*mut u8, Layout), total: usize, seed: u64) -> f64 {
    let mut rng = Rng(seed);
    let mut live: Vec<(*mut u8, Layout)> = Vec::new();
    for _ in 0..1000 {
        let l = Layout::from_size_align(rng.range(16, 256) as usize, 8).expect("layout");
        live.push((alloc(l), l));
    }
    let start = Instant::now();
    for _ in 0..total {
        let l = Layout::from_size_align(rng.range(16, 256) as usize, 8).expect("layout");
        let p = alloc(l);
        let i = rng.next() as usize % live.len();
        let (q, ql) = live.swap_remove(i);
        free(q, ql);
        live.push((p, l));
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    for (p, l) in live {
        free(p, l);
    }
    rate
}

/// Fragmentation: log-uniform sizes 16 B – 4 KiB, random frees, live set
/// around half the heap. Returns high-water bytes / peak live bytes.
fn fragmentation(heap_bytes: usize, steps: usize, seed: u64) -> (f64, u64, u64) {
    let s = setup("frag", heap_bytes, 0x6e00_0000_0000);
    let mut rng = Rng(seed);
    let base = s.heap.heap_region().addr();
    let mut live: Vec<(NonNull<u8>, usize)> = Vec::new();
    let (mut live_bytes, mut peak_live, mut high_water) = (0u64, 0u64, 0u64);
    let target = heap_bytes as u64 / 2;
    for _ in 0..steps {
        let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
        for _ in 0..16 {
            if live_bytes < target || rng.next().is_multiple_of(2) && live_bytes < target + target / 10 {
                let size = rng.log_uniform(16.0, 4096.0);
                let p = tx.malloc(Layout::from_size_align(size, 8).expect("layout")).expect("malloc");
                let end = (p.as_ptr() as usize - base + size + 8) as u64;
                high_water = high_water.max(end);
                live.push((p, size));
                live_bytes += size as u64;
                peak_live = peak_live.max(live_bytes);
            } else if !live.is_empty() {
                let i = rng.next() as usize % live.len();
                let (p, size) = live.swap_remove(i);
                tx.free(p).expect("free");
                live_bytes -= size as u64;
            }
        }
        tx.commit(CommitMode::NoFlush).expect("commit");
    }
    s.heap.check().expect("check");
    (high_water as f64 / peak_live as f64, high_water, peak_live)
}

/// Time to load a heap holding `blocks` live blocks.
fn load_time(blocks: usize) -> (f64, f64) {
    let heap_bytes = (blocks * 64 + (1 << 20)).next_multiple_of(4096);
    let base = 0x6f00_0000_0000;
    let s = setup("load", heap_bytes, base);
    let t = Instant::now();
    let mut n = 0;
    while n < blocks {
        let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
        for _ in 0..1000.min(blocks - n) {
            tx.malloc(Layout::from_size_align(16, 8).expect("layout")).expect("malloc");
            n += 1;
        }
        tx.commit(CommitMode::NoFlush).expect("commit");
    }
    let fill = t.elapsed().as_secs_f64();
    s.rvm.truncate().expect("truncate");
    let Setup { _dir: dir, rvm, heap } = s;
    drop(heap);
    drop(rvm);
    let rvm = Rvm::open(dir.join("log"), Options::default()).expect("open");
    let seg = rvm.open_segment(dir.join("seg")).expect("segment");
    let t = Instant::now();
    let st = rvm.map(&seg, MapSpec::new(0, 4096).at(base)).expect("map");
    let h = rvm.map(&seg, MapSpec::new(4096, heap_bytes).at(base + 4096)).expect("map");
    let heap = Heap::load(&rvm, st, h).expect("load");
    let load = t.elapsed().as_secs_f64();
    assert_eq!(heap.stats().live_blocks, blocks as u64);
    (load, fill)
}

fn main() {
    let runs = if quick() { 1 } else { 5 };
    let total = if quick() { 20_000 } else { 400_000 };
    println!("rvm-heap benchmarks ({} run(s) each, medians)", runs);
    println!("machine: {} cores; {}", std::thread::available_parallelism().map_or(0, |n| n.get()), cpu_model());

    let (mut one, mut hundred, mut sys, mut lla) = (vec![], vec![], vec![], vec![]);
    for r in 0..runs {
        let seed = 0x1234_5678 + r as u64;
        let s = setup("pairs", 64 << 20, 0x6d00_0000_0000);
        one.push(rvm_pairs(&s, 1, total / 4, seed));
        hundred.push(rvm_pairs(&s, 100, total, seed));
        drop(s);
        // SAFETY: System's alloc/dealloc with matching layouts.
        sys.push(volatile_pairs(&|l| unsafe { System.alloc(l) }, &|p, l| unsafe { System.dealloc(p, l) }, total, seed));
        let arena = vec![0u8; 64 << 20].leak();
        let lheap = linked_list_allocator::LockedHeap::empty();
        // SAFETY: the arena is leaked, so it lives for the rest of the program.
        unsafe { lheap.lock().init(arena.as_mut_ptr(), arena.len()) };
        lla.push(volatile_pairs(
            // SAFETY: LockedHeap implements GlobalAlloc; matching layouts.
            &|l| unsafe { GlobalAlloc::alloc(&lheap, l) },
            // SAFETY: as above.
            &|p, l| unsafe { GlobalAlloc::dealloc(&lheap, p, l) },
            total,
            seed,
        ));
    }
    let (m1, m100, ms, ml) = (median(&mut one), median(&mut hundred), median(&mut sys), median(&mut lla));
    println!("\nmalloc+free pairs (sizes 16-256 B, each pair frees a block allocated earlier)");
    println!("| allocator | pairs/s | ratio to rvm batched |");
    println!("|---|---:|---:|");
    println!("| rvm-heap, 1 pair per no-flush tx | {m1:.0} | {:.2} |", m1 / m100);
    println!("| rvm-heap, 100 pairs per no-flush tx | {m100:.0} | 1.00 |");
    println!("| system allocator | {ms:.0} | {:.2} |", ms / m100);
    println!("| linked_list_allocator | {ml:.0} | {:.2} |", ml / m100);

    let (ratio, hw, peak) =
        fragmentation(if quick() { 8 << 20 } else { 64 << 20 }, if quick() { 5_000 } else { 60_000 }, 42);
    println!(
        "\nfragmentation (log-uniform 16 B - 4 KiB, live ~50%): high-water {hw} B / peak live {peak} B = {ratio:.3}"
    );

    let blocks = if quick() { 50_000 } else { 1_000_000 };
    let mut loads = vec![];
    let mut fill = 0.0;
    for _ in 0..runs.min(3) {
        let (l, f) = load_time(blocks);
        loads.push(l);
        fill = f;
    }
    println!(
        "\nload of a heap with {blocks} live blocks: median {:.1} ms (filling it took {:.2} s)",
        median(&mut loads) * 1e3,
        fill
    );
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
