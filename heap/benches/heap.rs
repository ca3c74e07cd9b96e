//! Heap benchmarks: malloc+free pairs against the system allocator and
//! `linked_list_allocator`, fragmentation under a random workload, and load
//! time of a heap with many live blocks. Prints a table of medians.
//!
//! Growth: growing a heap from 1 GiB to 2 GiB and the first allocations
//! after it; malloc+free pairs on heaps of 64 MiB to 64 GiB (sparse files);
//! load time and volatile-index memory of heaps with 1 and 10 million live
//! blocks.
//!
//! `cargo bench -p rvm-heap --bench heap`; `RVM_BENCH_QUICK=1` for a short
//! run; `RVM_BENCH_ONLY=pairs|frag|load|grow|sizes|load10m` (comma-separated) for parts;
//! `RVM_BENCH_DIR` chooses where the files go (default: the target dir).

use rvm_core::{create_log, CommitMode, Options, RestoreMode, Rvm};
use rvm_heap::{HeapSpec, PersistentHeap};
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

fn wanted(part: &str) -> bool {
    std::env::var("RVM_BENCH_ONLY").map_or(part != "rvm-pairs", |only| only.split(',').any(|o| o == part))
}

/// This run's directory (removed at the end): under `RVM_BENCH_DIR`, else
/// the target directory, else the system's temporary directory.
fn bench_dir() -> PathBuf {
    let base = std::env::var_os("RVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors()
            .find(|p| p.file_name().is_some_and(|n| n == "target"))
            .map_or_else(std::env::temp_dir, |t| t.join("rvm-bench"))
    });
    let dir = base.join(format!("heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

struct Setup {
    dir: PathBuf,
    heap: PersistentHeap,
    rvm: Rvm,
}

/// A fresh log and heap (created through the loader at `base`).
fn setup(name: &str, heap_bytes: usize, base: u64) -> Setup {
    setup_spec(name, &HeapSpec::fixed(base, heap_bytes as u64))
}

/// A fresh log and heap made to `spec`.
fn setup_spec(name: &str, spec: &HeapSpec) -> Setup {
    let dir = bench_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    create_log(dir.join("log"), 512 << 20).expect("log");
    // Sparse: the largest heaps measured (64 GiB) need not fit on the disk.
    let opts = Options { reserve_segment_space: false, ..Options::default() };
    let rvm = Rvm::open(dir.join("log"), opts).expect("open");
    let heap = PersistentHeap::create(&rvm, dir.join("heap"), spec).expect("create");
    Setup { dir, heap, rvm }
}

/// The system allocator, counting the bytes live on the Rust heap, so the
/// memory an open heap's volatile indexes hold can be measured exactly
/// (the heap's own pages are file mappings, not counted).
struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Bytes live on the Rust heap now.
fn live_bytes() -> usize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Growing a 1 GiB heap to 2 GiB: (ms for the growth, µs for the first
/// small allocation after it (malloc + no-flush commit), µs for the first
/// allocation that needs the new space (1.5 GiB)).
fn grow_once(run: usize) -> (f64, f64, f64) {
    let spec = HeapSpec::fixed(0x7000_0000_0000, 1 << 30).with_max_len(4 << 30);
    let s = setup_spec(&format!("grow{run}"), &spec);
    let alloc = |size: usize| {
        let t = Instant::now();
        let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
        tx.malloc(Layout::from_size_align(size, 16).expect("layout")).expect("malloc");
        tx.commit(CommitMode::NoFlush).expect("commit");
        t.elapsed().as_secs_f64() * 1e6
    };
    alloc(64);
    let t = Instant::now();
    assert_eq!(s.heap.grow(2 << 30).expect("grow"), 2 << 30);
    let grow_ms = t.elapsed().as_secs_f64() * 1e3;
    let small = alloc(64);
    let large = alloc(3 << 29);
    s.heap.check().expect("check");
    let Setup { dir, heap, rvm } = s;
    heap.close().expect("close");
    drop(rvm);
    let _ = std::fs::remove_dir_all(dir);
    (grow_ms, small, large)
}

/// Load time and Rust-heap memory held by the open heap, of a heap holding
/// `blocks` live blocks (every other one freed when `holes`, which makes
/// half as many free extents: the volatile index's worst case).
fn load_stats(blocks: usize, holes: bool, runs: usize) -> (f64, f64) {
    let heap_bytes = (blocks * 64 + (1 << 20)).next_multiple_of(4096);
    let s = setup("load", heap_bytes, 0x6f00_0000_0000);
    let mut n = 0;
    let mut every_other = Vec::new();
    while n < blocks {
        let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
        for _ in 0..1000.min(blocks - n) {
            let p = tx.malloc(Layout::from_size_align(16, 8).expect("layout")).expect("malloc");
            if holes && n % 2 == 0 {
                every_other.push(p);
            }
            n += 1;
        }
        tx.commit(CommitMode::NoFlush).expect("commit");
    }
    for chunk in every_other.chunks(1000) {
        let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
        for &p in chunk {
            tx.free(p).expect("free");
        }
        tx.commit(CommitMode::NoFlush).expect("commit");
    }
    let live = blocks - every_other.len();
    s.rvm.truncate().expect("truncate");
    let Setup { dir, heap, rvm } = s;
    heap.close().expect("close");
    drop(rvm);
    let (mut loads, mut mem) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let rvm = Rvm::open(dir.join("log"), Options::default()).expect("open");
        let before = live_bytes();
        let t = Instant::now();
        let heap = PersistentHeap::open(&rvm, dir.join("heap")).expect("load");
        loads.push(t.elapsed().as_secs_f64());
        mem.push(live_bytes().saturating_sub(before) as f64);
        assert_eq!(heap.stats().live_blocks, live as u64);
        heap.close().expect("close");
    }
    let _ = std::fs::remove_dir_all(dir);
    (median(&mut loads), median(&mut mem))
}

/// This thread's time on a CPU so far, in seconds (from
/// `/proc/thread-self/schedstat`; 0 where that is missing). The machine is
/// shared, so rates per CPU-second are printed next to wall-clock ones.
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()))
        .map_or(0.0, |ns| ns / 1e9)
}

/// A rate measured both ways: (per wall-clock second, per CPU-second).
#[derive(Clone, Copy)]
struct Rate(f64, f64);

fn rate(n: usize, wall_start: Instant, cpu_start: f64) -> Rate {
    let wall = wall_start.elapsed().as_secs_f64();
    let cpu = thread_cpu() - cpu_start;
    Rate(n as f64 / wall, if cpu > 0.0 { n as f64 / cpu } else { f64::NAN })
}

fn medians(v: &[Rate]) -> Rate {
    let mut w: Vec<f64> = v.iter().map(|r| r.0).collect();
    let mut c: Vec<f64> = v.iter().map(|r| r.1).collect();
    Rate(median(&mut w), median(&mut c))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// malloc+free pairs per second, `per_tx` pairs per no-flush transaction;
/// each pair frees a block allocated by an earlier transaction.
fn rvm_pairs(s: &Setup, per_tx: usize, total: usize, seed: u64) -> Rate {
    let mut rng = Rng(seed);
    let mut live: Vec<NonNull<u8>> = Vec::new();
    // Warm-up working set.
    let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
    for _ in 0..1000 {
        live.push(tx.malloc(Layout::from_size_align(rng.range(16, 256) as usize, 8).expect("layout")).expect("malloc"));
    }
    tx.commit(CommitMode::NoFlush).expect("commit");
    let (start, cpu) = (Instant::now(), thread_cpu());
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
    let rate = rate(done, start, cpu);
    let mut tx = s.heap.begin(RestoreMode::NoRestore).expect("begin");
    for p in live {
        tx.free(p).expect("free");
    }
    tx.commit(CommitMode::NoFlush).expect("commit");
    rate
}

/// The same pattern on a volatile allocator.
fn volatile_pairs(alloc: &dyn Fn(Layout) -> *mut u8, free: &dyn Fn(*mut u8, Layout), total: usize, seed: u64) -> Rate {
    let mut rng = Rng(seed);
    let mut live: Vec<(*mut u8, Layout)> = Vec::new();
    for _ in 0..1000 {
        let l = Layout::from_size_align(rng.range(16, 256) as usize, 8).expect("layout");
        live.push((alloc(l), l));
    }
    let (start, cpu) = (Instant::now(), thread_cpu());
    for _ in 0..total {
        let l = Layout::from_size_align(rng.range(16, 256) as usize, 8).expect("layout");
        let p = alloc(l);
        let i = rng.next() as usize % live.len();
        let (q, ql) = live.swap_remove(i);
        free(q, ql);
        live.push((p, l));
    }
    let rate = rate(total, start, cpu);
    for (p, l) in live {
        free(p, l);
    }
    rate
}

/// The fragmentation workload: transactions of 16 steps; each step
/// allocates (log-uniform 16 B - 4 KiB) while the live bytes are under half
/// the heap (and with even odds up to 10% over it), else frees a random live
/// block. `alloc` returns the block's address and the end of the bytes it
/// occupies (for the high-water mark); `free` frees; `end_tx` ends a group.
/// Returns (high-water bytes / peak live bytes, high water, peak live).
fn frag_workload(
    heap_bytes: usize,
    steps: usize,
    seed: u64,
    alloc: &mut dyn FnMut(usize) -> (usize, u64),
    free: &mut dyn FnMut(usize, usize),
    end_tx: &mut dyn FnMut(),
) -> (f64, u64, u64) {
    let mut rng = Rng(seed);
    let mut live: Vec<(usize, usize)> = Vec::new();
    let (mut live_bytes, mut peak_live, mut high_water) = (0u64, 0u64, 0u64);
    let target = heap_bytes as u64 / 2;
    for _ in 0..steps {
        for _ in 0..16 {
            if live_bytes < target || rng.next().is_multiple_of(2) && live_bytes < target + target / 10 {
                let size = rng.log_uniform(16.0, 4096.0);
                let (p, end) = alloc(size);
                high_water = high_water.max(end);
                live.push((p, size));
                live_bytes += size as u64;
                peak_live = peak_live.max(live_bytes);
            } else if !live.is_empty() {
                let i = rng.next() as usize % live.len();
                let (p, size) = live.swap_remove(i);
                free(p, size);
                live_bytes -= size as u64;
            }
        }
        end_tx();
    }
    (high_water as f64 / peak_live as f64, high_water, peak_live)
}

/// The fragmentation workload on the heap (one no-flush transaction per
/// group of 16 steps). High water: the end of the highest block's bytes
/// (header, data, tail guard) from the heap's start.
fn fragmentation(heap_bytes: usize, steps: usize, seed: u64) -> (f64, u64, u64) {
    let s = setup("frag", heap_bytes, 0x6e00_0000_0000);
    let base = s.heap.heap_region().addr();
    let tx = std::cell::RefCell::new(Some(s.heap.begin(RestoreMode::NoRestore).expect("begin")));
    let r = frag_workload(
        heap_bytes,
        steps,
        seed,
        &mut |size| {
            let mut t = tx.borrow_mut();
            let p = t.as_mut().expect("tx").malloc(Layout::from_size_align(size, 8).expect("layout")).expect("malloc");
            (p.as_ptr() as usize, (p.as_ptr() as usize - base + size + 8) as u64)
        },
        &mut |p, _| {
            let mut t = tx.borrow_mut();
            t.as_mut().expect("tx").free(NonNull::new(p as *mut u8).expect("non-null")).expect("free");
        },
        &mut || {
            let mut t = tx.borrow_mut();
            t.take().expect("tx").commit(CommitMode::NoFlush).expect("commit");
            *t = Some(s.heap.begin(RestoreMode::NoRestore).expect("begin"));
        },
    );
    drop(tx);
    s.heap.check().expect("check");
    r
}

/// The same workload on `linked_list_allocator` (first fit) over an arena of
/// the same size. High water: the end of the highest allocation.
fn fragmentation_lla(heap_bytes: usize, steps: usize, seed: u64) -> (f64, u64, u64) {
    let arena: &mut [u8] = vec![0u8; heap_bytes].leak();
    let base = arena.as_ptr() as usize;
    let lheap = linked_list_allocator::LockedHeap::empty();
    // SAFETY: the arena is leaked, so it lives for the rest of the program.
    unsafe { lheap.lock().init(arena.as_mut_ptr(), arena.len()) };
    frag_workload(
        heap_bytes,
        steps,
        seed,
        &mut |size| {
            // SAFETY: a valid non-zero layout.
            let p = unsafe { GlobalAlloc::alloc(&lheap, Layout::from_size_align(size, 8).expect("layout")) };
            assert!(!p.is_null(), "linked_list_allocator ran out of memory");
            (p as usize, (p as usize - base + size) as u64)
        },
        // SAFETY: freed with the layout it was allocated with.
        &mut |p, size| unsafe {
            GlobalAlloc::dealloc(&lheap, p as *mut u8, Layout::from_size_align(size, 8).expect("layout"))
        },
        &mut || {},
    )
}

/// Time to load (one call: map both regions through the loader, check and
/// index every block) a heap holding `blocks` live blocks, after a clean
/// shutdown (the log truncated; the segment in the page cache).
fn load_time(blocks: usize, runs: usize) -> (Vec<f64>, f64) {
    let heap_bytes = (blocks * 64 + (1 << 20)).next_multiple_of(4096);
    let s = setup("load", heap_bytes, 0x6f00_0000_0000);
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
    let Setup { dir, heap, rvm } = s;
    heap.close().expect("close");
    drop(rvm);
    let mut loads = Vec::new();
    for _ in 0..runs {
        let rvm = Rvm::open(dir.join("log"), Options::default()).expect("open");
        let t = Instant::now();
        let heap = PersistentHeap::open(&rvm, dir.join("heap")).expect("load");
        loads.push(t.elapsed().as_secs_f64());
        assert_eq!(heap.stats().live_blocks, blocks as u64);
        heap.close().expect("close");
    }
    (loads, fill)
}

fn main() {
    let runs = if quick() { 1 } else { 5 };
    let total = if quick() { 20_000 } else { 400_000 };
    println!("rvm-heap benchmarks ({runs} run(s) each, medians)");
    println!("machine: {} cores; {}", std::thread::available_parallelism().map_or(0, |n| n.get()), cpu_model());

    if wanted("rvm-pairs") {
        // For profiling: only the heap's batched pairs.
        let s = setup("pairs", 64 << 20, 0x6d00_0000_0000);
        let r = rvm_pairs(&s, 100, total * 4, 1);
        println!("rvm-heap, 100 pairs per no-flush tx: {:.0} pairs/s, {:.0} per CPU-second", r.0, r.1);
    }
    if wanted("pairs") {
        let (mut one, mut hundred, mut sys, mut lla) = (vec![], vec![], vec![], vec![]);
        for r in 0..runs {
            let seed = 0x1234_5678 + r as u64;
            let s = setup("pairs", 64 << 20, 0x6d00_0000_0000);
            one.push(rvm_pairs(&s, 1, total / 4, seed));
            hundred.push(rvm_pairs(&s, 100, total, seed));
            drop(s);
            sys.push(volatile_pairs(
                // SAFETY: System's alloc/dealloc with matching layouts.
                &|l| unsafe { System.alloc(l) },
                // SAFETY: as above.
                &|p, l| unsafe { System.dealloc(p, l) },
                total,
                seed,
            ));
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
        let rows = [
            ("rvm-heap, 1 pair per no-flush tx", medians(&one)),
            ("rvm-heap, 100 pairs per no-flush tx", medians(&hundred)),
            ("system allocator (volatile)", medians(&sys)),
            ("linked_list_allocator (volatile)", medians(&lla)),
        ];
        let batched = rows[1].1;
        println!("\nmalloc+free pairs (sizes 16-256 B, each pair frees a block allocated earlier; 1000 live)");
        println!("| allocator | pairs/s (wall) | pairs per CPU-second | this / rvm-heap batched (wall) |");
        println!("|---|---:|---:|---:|");
        for (name, r) in rows {
            println!("| {name} | {:.0} | {:.0} | {:.3} |", r.0, r.1, r.0 / batched.0);
        }
    }

    if wanted("frag") {
        let (heap_bytes, steps) = if quick() { (8 << 20, 5_000) } else { (64 << 20, 60_000) };
        let (ratio, hw, peak) = fragmentation(heap_bytes, steps, 42);
        let (lratio, lhw, lpeak) = fragmentation_lla(heap_bytes, steps, 42);
        println!("\nfragmentation (log-uniform 16 B - 4 KiB, random frees, live ~50% of {} MiB)", heap_bytes >> 20);
        println!("| allocator | high-water bytes | peak live bytes | ratio |");
        println!("|---|---:|---:|---:|");
        println!("| rvm-heap | {hw} | {peak} | {ratio:.3} |");
        println!("| linked_list_allocator | {lhw} | {lpeak} | {lratio:.3} |");
    }

    if wanted("load") {
        let blocks = if quick() { 50_000 } else { 1_000_000 };
        let (mut loads, fill) = load_time(blocks, runs);
        println!(
            "\nload of a heap with {blocks} live blocks (PersistentHeap::open): median {:.1} ms, min {:.1} ms \
             (filling it took {fill:.2} s)",
            median(&mut loads) * 1e3,
            loads[0] * 1e3
        );
    }
    if wanted("grow") {
        let (mut ms, mut small, mut large) = (vec![], vec![], vec![]);
        for run in 0..runs {
            let (g, a, b) = grow_once(run);
            ms.push(g);
            small.push(a);
            large.push(b);
        }
        println!(
            "\ngrowing a heap in place from 1 GiB to 2 GiB (max 4 GiB; file extended and allocated, flush commit)"
        );
        println!("| step | median | min | max |");
        println!("|---|---:|---:|---:|");
        for (name, unit, v) in [
            ("Heap::grow(2 GiB)", "ms", &mut ms),
            ("first small allocation after it (malloc + no-flush commit)", "µs", &mut small),
            ("first allocation of the new space (1.5 GiB block)", "µs", &mut large),
        ] {
            let (lo, hi) = (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
            println!("| {name} | {:.2} {unit} | {lo:.2} {unit} | {hi:.2} {unit} |", median(v));
        }
    }

    if wanted("sizes") {
        let sizes: [(u64, &str, u64); 4] = [
            (64 << 20, "64 MiB", 0x6d00_0000_0000),
            (1 << 30, "1 GiB", 0x6d40_0000_0000),
            (16 << 30, "16 GiB", 0x6d80_0000_0000),
            (64 << 30, "64 GiB", 0x6e00_0000_0000),
        ];
        let mut results: Vec<Vec<Rate>> = vec![Vec::new(); sizes.len()];
        // Interleaved, so that noise from other work on the machine falls
        // on every size alike.
        for r in 0..runs {
            for (i, &(bytes, _, base)) in sizes.iter().enumerate() {
                let s = setup(&format!("size{i}"), bytes as usize, base);
                results[i].push(rvm_pairs(&s, 100, total, 0x5151 + r as u64));
                let Setup { dir, heap, rvm } = s;
                heap.close().expect("close");
                drop(rvm);
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        let rates: Vec<Rate> = results.iter().map(|v| medians(v)).collect();
        let lo = rates.iter().map(|r| r.0).fold(f64::MAX, f64::min);
        println!(
            "\nmalloc+free pairs by heap size (100 pairs per no-flush tx, sizes 16-256 B, 1000 live; sparse files)"
        );
        println!("| heap | pairs/s (wall) | pairs per CPU-second | / slowest (wall) |");
        println!("|---|---:|---:|---:|");
        for (&(_, name, _), r) in sizes.iter().zip(&rates) {
            println!("| {name} | {:.0} | {:.0} | {:.2} |", r.0, r.1, r.0 / lo);
        }
    }

    if wanted("load10m") {
        let big = if quick() { 2_000_000 } else { 10_000_000 };
        println!("\nload (PersistentHeap::open) and the memory the open heap holds (Rust heap bytes) by live blocks");
        println!("| live blocks | free extents | load ms | ms per million live blocks | bytes held | bytes per free extent |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for (blocks, holes) in [(1_000_000, false), (big, false), (1_000_000, true)] {
            let (t, mem) = load_stats(blocks, holes, runs.min(3));
            let live = if holes { blocks / 2 } else { blocks };
            let extents = if holes { blocks / 2 } else { 1 };
            let m = live as f64 / 1e6;
            println!(
                "| {live} | {extents} | {:.1} | {:.1} | {mem:.0} | {:.0} |",
                t * 1e3,
                t * 1e3 / m,
                mem / extents as f64
            );
        }
    }
    let _ = std::fs::remove_dir_all(bench_dir());
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
