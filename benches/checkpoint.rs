//! Generation checkpoint benchmark (issue 5's figures), side by side in one
//! process, medians of several runs:
//!
//! 1. **Freeze time** with 64 MiB, 1 GiB and 8 GiB mapped (sparse segment
//!    files, `NoCopy` regions) at 1% and 50% of pages dirty: the time the
//!    commit lock is held by `checkpoint_start`'s freeze (the instance's
//!    `checkpoint_freeze_last_ns`), measured `ROUNDS` times per case
//!    (start, then `checkpoint_abandon`, which hands the pages back, so the
//!    next freeze sees the same dirty set).
//! 2. **No-flush commit throughput during a sweep**: one thread commits
//!    transactions of 1-4 random ranges of 8-64 bytes in a 64 MiB region
//!    (the core benchmark's workload) while another sweeps 1 GiB of dirty
//!    pages (`checkpoint_finish`), against the same workload with no
//!    checkpoint, alternately.
//! 3. **Segment bytes written** on a hot-spot workload (90% of updates to
//!    1% of pages): a checkpoint, against log-replay truncation of the same
//!    workload (this crate's replay, which coalesces), and against replaying
//!    every logged record (classic RVM truncation; the log's range bytes).
//!
//! `cargo bench --bench checkpoint`; `RVM_BENCH_QUICK=1` for a short run
//! (smaller sizes); `RVM_BENCH_ONLY=freeze|sweep|bytes` for one part;
//! `RVM_BENCH_VERBOSE=1` prints each sweep's statistics; `RVM_BENCH_DIR` picks the folder (default: a temporary
//! folder under the system's temp folder; it must be a real disk).

mod common;
use common::{median, quick, Rng};
use rvm::{create_log, CommitMode, CopyMode, MapSpec, Options, Region, RestoreMode, Rvm};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

/// An instance with one region of `len` bytes (a sparse segment file).
fn setup(dir: &Path, name: &str, log_size: usize, len: usize, copy: CopyMode, o: Options) -> (Rvm, Region) {
    let log = dir.join(format!("{name}.log"));
    create_log(&log, log_size as u64).expect("create log");
    let rvm = Rvm::open(&log, o).expect("open");
    let seg = rvm.create_segment(dir.join(format!("{name}.seg")), len as u64).expect("segment");
    let region = rvm.map(&seg, MapSpec::new(0, len).copy(copy)).expect("map");
    (rvm, region)
}

/// Dirties `pages` pages spread evenly over the region (8 bytes each),
/// 256 pages per transaction.
fn dirty_pages(rvm: &Rvm, region: &Region, pages: usize) {
    let ps = rvm::page_size();
    let total = region.len() / ps;
    let stride = (total / pages.max(1)).max(1);
    let mut p = 0;
    while p < pages {
        let mut tx = rvm.begin(RestoreMode::NoRestore).expect("begin");
        for q in p..(p + 256).min(pages) {
            // SAFETY: single-threaded; inside the region.
            unsafe { tx.modify_bytes(region.addr() + q * stride * ps, &(q as u64 + 1).to_le_bytes()).expect("modify") };
        }
        tx.commit(CommitMode::NoFlush).expect("commit");
        p += 256;
    }
    rvm.flush().expect("flush");
}

fn freeze_times(dir: &Path, rounds: usize) {
    println!("\n## Freeze time (commit lock held by the freeze), medians of {rounds}");
    println!("| mapped | dirty pages | freeze median | min | max |");
    println!("|---|---|---|---|---|");
    let sizes: &[usize] = if quick() { &[64 * MIB, 256 * MIB] } else { &[64 * MIB, 1024 * MIB, 8192 * MIB] };
    let mut medians = Vec::new();
    for &len in sizes {
        for pct in [1usize, 50] {
            let pages = len / rvm::page_size() * pct / 100;
            let (rvm, region) = setup(dir, "freeze", 256 * MIB, len, CopyMode::NoCopy, opts());
            dirty_pages(&rvm, &region, pages);
            let mut ns = Vec::new();
            for i in 0..rounds {
                // As in real use, a commit runs just before the freeze (the
                // commit path's memory is warm, not evicted by the previous
                // round's abandon, which walks every bitmap).
                let mut tx = rvm.begin(RestoreMode::NoRestore).expect("begin");
                // SAFETY: single-threaded; inside the region.
                unsafe { tx.modify_bytes(region.addr(), &(i as u64).to_le_bytes()).expect("modify") };
                tx.commit(CommitMode::NoFlush).expect("commit");
                assert!(rvm.checkpoint_start().expect("start"));
                ns.push(rvm.stats().checkpoint_freeze_last_ns as f64);
                assert!(rvm.checkpoint_abandon().expect("abandon"));
            }
            let (lo, hi) = (ns.iter().cloned().fold(f64::MAX, f64::min), ns.iter().cloned().fold(0.0, f64::max));
            let m = median(&ns);
            medians.push(m);
            println!(
                "| {} MiB | {pct}% ({pages}) | {:.2} µs | {:.2} µs | {:.2} µs |",
                len / MIB,
                m / 1e3,
                lo / 1e3,
                hi / 1e3
            );
            drop(region);
            drop(rvm);
            for f in ["freeze.log", "freeze.seg"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
    }
    let (lo, hi) = (medians.iter().cloned().fold(f64::MAX, f64::min), medians.iter().cloned().fold(0.0, f64::max));
    println!("\nlargest median / smallest median = {:.2}", hi / lo);
}

/// The core benchmark's no-flush workload on `region` until `stop`;
/// returns transactions per second.
fn workload(rvm: &Rvm, region: &Region, stop: &dyn Fn(Duration) -> bool, seed: u64) -> f64 {
    let mut rng = Rng(seed | 1);
    let t0 = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..256 {
            let mut tx = rvm.begin(RestoreMode::Restore).expect("begin");
            for _ in 0..1 + rng.below(4) {
                let len = 8 + rng.below(57);
                let off = rng.below(region.len() - len);
                // SAFETY: this thread alone writes the region.
                unsafe {
                    tx.set_range(region.addr() + off, len).expect("set_range");
                    std::ptr::write_bytes((region.addr() + off) as *mut u8, n as u8, len);
                }
            }
            tx.commit(CommitMode::NoFlush).expect("commit");
            n += 1;
        }
        if stop(t0.elapsed()) {
            break;
        }
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// `rate`: the sweep's `Options::checkpoint_rate`.
fn throughput_during_sweep(dir: &Path, rounds: usize, rate: Option<u64>) {
    let sweep_len = if quick() { 128 * MIB } else { 1024 * MIB };
    let pace = rate.map_or("unpaced (full speed)".to_string(), |r| format!("paced at {} MiB/s", r / MIB as u64));
    println!(
        "\n## No-flush commits (1-4 ranges of 8-64 B in 64 MiB) with and without a sweep of {} MiB, sweep {pace}, {rounds} rounds",
        sweep_len / MIB
    );
    let o = Options { truncate_threshold: None, pending_limit: 4 * MIB, checkpoint_rate: rate, ..Options::default() };
    let name = if rate.is_some() { "sweep-paced" } else { "sweep-full" };
    let (rvm, hot) = setup(dir, name, 4096 * MIB, 64 * MIB, CopyMode::NoCopy, o);
    let seg = rvm.create_segment(dir.join(format!("{name}-big.seg")), sweep_len as u64).expect("segment");
    let big = rvm.map(&seg, MapSpec::new(0, sweep_len).copy(CopyMode::NoCopy)).expect("map");
    // Warm up: both regions dirty.
    workload(&rvm, &hot, &|t| t > Duration::from_millis(300), 1);
    rvm.checkpoint().expect("checkpoint");
    let mut base = Vec::new();
    let mut during = Vec::new();
    let mut io_only = Vec::new();
    let mut sweep_secs = Vec::new();
    let mut copies = Vec::new();
    for round in 0..rounds {
        dirty_pages(&rvm, &big, sweep_len / rvm::page_size());
        workload(&rvm, &hot, &|t| t > Duration::from_millis(200), 100 + round as u64);
        let before = rvm.stats();
        assert!(rvm.checkpoint_start().expect("start"));
        let done = AtomicBool::new(false);
        let t0 = Instant::now();
        let (rate, secs) = std::thread::scope(|s| {
            let sweeper = s.spawn(|| {
                rvm.checkpoint_finish().expect("finish");
                done.store(true, Ordering::Release);
                t0.elapsed().as_secs_f64()
            });
            let rate = workload(&rvm, &hot, &|_| done.load(Ordering::Acquire), 200 + round as u64);
            (rate, sweeper.join().expect("sweeper"))
        });
        let after = rvm.stats();
        copies.push((after.checkpoint_copies - before.checkpoint_copies) as f64);
        if std::env::var_os("RVM_BENCH_VERBOSE").is_some() {
            eprintln!(
                "round {round}: copies {} stalls {} pages {} rebuilt {} log-full waits {}",
                after.checkpoint_copies - before.checkpoint_copies,
                after.checkpoint_stalls - before.checkpoint_stalls,
                after.checkpoint_pages - before.checkpoint_pages,
                after.checkpoint_rebuilt_pages - before.checkpoint_rebuilt_pages,
                after.log_full_waits - before.log_full_waits
            );
        }
        during.push(rate);
        sweep_secs.push(secs);
        // The same workload for as long, no checkpoint (the hot region's
        // pages are dirty again; nothing sweeps them). Each phase starts
        // with the log emptied, so none runs into a full log.
        rvm.checkpoint().expect("checkpoint");
        let d = Duration::from_secs_f64(secs);
        let before = rvm.stats();
        base.push(workload(&rvm, &hot, &|t| t >= d, 300 + round as u64));
        if std::env::var_os("RVM_BENCH_VERBOSE").is_some() {
            eprintln!("round {round}: baseline log-full waits {}", rvm.stats().log_full_waits - before.log_full_waits);
        }
        // The same workload while another thread only writes as many bytes
        // to a file and syncs it (no checkpoint): what the machine's second
        // core and the page cache cost, apart from the checkpoint.
        rvm.checkpoint().expect("checkpoint");
        let done = AtomicBool::new(false);
        let path = dir.join("io-only");
        io_only.push(std::thread::scope(|s| {
            s.spawn(|| {
                use std::io::Write;
                let mut f = std::fs::File::create(&path).expect("io file");
                let chunk = vec![7u8; 256 << 10];
                for _ in 0..sweep_len / chunk.len() {
                    f.write_all(&chunk).expect("write");
                }
                f.sync_data().expect("sync");
                done.store(true, Ordering::Release);
            });
            workload(&rvm, &hot, &|_| done.load(Ordering::Acquire), 400 + round as u64)
        }));
        let _ = std::fs::remove_file(&path);
        rvm.checkpoint().expect("checkpoint");
    }
    let (b, d) = (median(&base), median(&during));
    println!("| case | tx/s median | runs |");
    println!("|---|---|---|");
    println!("| no checkpoint | {:.0} | {:?} |", b, base.iter().map(|x| *x as u64).collect::<Vec<_>>());
    println!("| during the sweep | {:.0} | {:?} |", d, during.iter().map(|x| *x as u64).collect::<Vec<_>>());
    println!(
        "| while another thread writes and syncs as many bytes to a file | {:.0} | {:?} |",
        median(&io_only),
        io_only.iter().map(|x| *x as u64).collect::<Vec<_>>()
    );
    println!(
        "\nduring / without = {:.2}; sweep (freeze to finish, incl. segment fsync) median {:.2} s; barrier copies per sweep median {:.0}",
        d / b,
        median(&sweep_secs),
        median(&copies)
    );
    drop((big, seg, hot, rvm));
    for f in [format!("{name}.log"), format!("{name}.seg"), format!("{name}-big.seg")] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

fn hot_spot(dir: &Path) {
    let (len, updates) = if quick() { (4 * MIB, 200_000) } else { (4 * MIB, 2_000_000) };
    let ps = rvm::page_size();
    let pages = len / ps;
    let hot = (pages / 100).max(1);
    println!(
        "\n## Segment bytes written: hot spot ({updates} updates of 8-64 B, 90% to {hot} of {pages} pages), same workload"
    );
    let run = |name: &str, checkpoint: bool| {
        let o = Options { truncate_threshold: None, coalesce: false, ..Options::default() };
        let (rvm, region) = setup(dir, name, 1024 * MIB, len, CopyMode::NoCopy, o);
        let mut rng = Rng(42);
        for i in 0..updates {
            let page = if rng.below(10) < 9 { rng.below(hot) } else { hot + rng.below(pages - hot) };
            let n = 8 + rng.below(57);
            let off = page * ps + rng.below(ps - n);
            let mut tx = rvm.begin(RestoreMode::NoRestore).expect("begin");
            // SAFETY: single-threaded; inside the region.
            unsafe { tx.modify_bytes(region.addr() + off, &vec![i as u8; n]).expect("modify") };
            tx.commit(CommitMode::NoFlush).expect("commit");
        }
        rvm.flush().expect("flush");
        let logged = rvm.stats().bytes_logged;
        if checkpoint {
            rvm.checkpoint().expect("checkpoint");
            (rvm.stats().checkpoint_bytes, logged)
        } else {
            rvm.truncate().expect("truncate");
            (rvm.stats().segment_bytes_written, logged)
        }
    };
    let (ckpt, logged) = run("hot-ckpt", true);
    let (replay, _) = run("hot-replay", false);
    println!("| reclaim | segment bytes written | ÷ checkpoint |");
    println!("|---|---|---|");
    println!("| generation checkpoint (whole pages, each once) | {ckpt} | 1 |");
    println!(
        "| log replay, this crate (coalesced, newest bytes win) | {replay} | {:.2} |",
        replay as f64 / ckpt as f64
    );
    println!(
        "| log replay, record by record (classic RVM: every logged range) | {logged} | {:.2} |",
        logged as f64 / ckpt as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let tmp = match std::env::var_os("RVM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("bench folder");
    println!("# Generation checkpoint benchmark ({})", if quick() { "quick" } else { "full" });
    // `RVM_BENCH_ONLY=freeze|sweep|bytes` runs one part.
    let only = std::env::var("RVM_BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;
    if part("freeze") {
        freeze_times(tmp.path(), if quick() { 5 } else { 41 });
    }
    if part("sweep") {
        let rounds = if quick() { 2 } else { 5 };
        // The default pace, then full speed.
        throughput_during_sweep(tmp.path(), rounds, Options::default().checkpoint_rate);
        throughput_during_sweep(tmp.path(), rounds, None);
    }
    if part("bytes") {
        hot_spot(tmp.path());
    }
}
