//! Core benchmarks for `rvm` (issue 2, "Figures to reach"): no-flush commit
//! throughput, flush commit against raw `pwrite`+`fdatasync`, group commit
//! with four threads, recovery replay speed, and bytes saved by coalescing on
//! a hot-spot workload. Every figure is the median of several runs taken
//! side by side in one process; all runs are printed too. Next to the
//! wall-clock rates, the no-flush and recovery figures are also given per
//! second of the working thread's CPU time: on a loaded machine the
//! wall-clock rate mostly measures the share of a core the thread got.
//!
//! `cargo bench --bench core` runs the full set (a few minutes);
//! `RVM_BENCH_QUICK=1 cargo bench --bench core` a short check that it works.
//! `RVM_BENCH_DIR` chooses where the files go (default: `rvm-bench/` in the
//! cargo target directory); it must be on a real disk, not tmpfs.

mod common;
use common::{median, quick, si, Rng};
use rvm::{create_log, CommitMode, MapSpec, Options, Region, RestoreMode, Rvm, Stats};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Where the log's record area starts (superblock + two status slots), so
/// the raw baseline writes at the same file offsets as the log does.
const LOG_AREA_OFFSET: u64 = 4096 + 2 * 64 * 1024;

fn bench_root() -> PathBuf {
    let base = std::env::var_os("RVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/deps/core-<hash> -> target/rvm-bench
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors().nth(3).map(|p| p.join("rvm-bench")).unwrap_or_else(|| PathBuf::from("rvm-bench"))
    });
    let dir = base.join(format!("core-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create dir");
    dir
}

// ---------------------------------------------------------------------------
// Machine description.

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn cpu_model() -> String {
    read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

fn mem_total() -> String {
    read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "?".into())
}

/// (device, fstype, mount point, options) of the mount holding `dir`.
fn filesystem_of(dir: &Path) -> (String, String, String, String) {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut best: Option<(usize, (String, String, String, String))> = None;
    for line in read("/proc/mounts").lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let mp = Path::new(f[1]);
        if dir.starts_with(mp) {
            let depth = mp.components().count();
            // Later entries of the same depth shadow earlier ones.
            if best.as_ref().is_none_or(|(d, _)| depth >= *d) {
                best = Some((depth, (f[0].into(), f[2].into(), f[1].into(), f[3].into())));
            }
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| ("?".into(), "?".into(), "?".into(), "?".into()))
}

fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// CPU time the calling thread has run, in seconds (from
/// `/proc/thread-self/schedstat`, nanoseconds; NaN if unavailable). On a
/// loaded machine wall-clock rates mostly measure the share of a core the
/// thread got; rates per CPU second show what the code costs.
fn thread_cpu() -> f64 {
    read("/proc/thread-self/schedstat")
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse::<u64>().ok())
        .map_or(f64::NAN, |ns| ns as f64 / 1e9)
}

// ---------------------------------------------------------------------------
// Figures.

fn runs_list(v: &[f64], f: impl Fn(f64) -> String) -> String {
    v.iter().map(|&x| f(x)).collect::<Vec<_>>().join(" ")
}

/// One row of the summary table.
struct Row {
    workload: String,
    unit: &'static str,
    runs: Vec<f64>,
    target: String,
    /// `Some(met)` when the row has a target.
    verdict: Option<bool>,
    fmt: fn(f64) -> String,
}

fn row(workload: impl Into<String>, unit: &'static str, runs: &[f64]) -> Row {
    Row { workload: workload.into(), unit, runs: runs.to_vec(), target: String::new(), verdict: None, fmt: si }
}

impl Row {
    fn target(mut self, target: impl Into<String>, met: bool) -> Row {
        self.target = target.into();
        self.verdict = Some(met);
        self
    }
    fn fmt(mut self, f: fn(f64) -> String) -> Row {
        self.fmt = f;
        self
    }
}

fn ratio_fmt(x: f64) -> String {
    format!("{x:.2}")
}

fn pct_fmt(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn print_table(rows: &[Row]) {
    println!("| workload | unit | median | all runs (in order) | target | met |");
    println!("|---|---|---:|---|---|---|");
    for r in rows {
        let m = median(&r.runs);
        let met = match r.verdict {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.workload,
            r.unit,
            (r.fmt)(m),
            runs_list(&r.runs, r.fmt),
            r.target,
            met
        );
    }
}

// ---------------------------------------------------------------------------
// Instances.

struct Instance {
    rvm: Rvm,
    region: Region,
}

fn instance(dir: &Path, log_size: usize, region_len: usize, opts: Options) -> Instance {
    create_log(dir.join("log"), log_size as u64).expect("create log");
    let rvm = Rvm::open(dir.join("log"), opts).expect("open");
    let seg = rvm.create_segment(dir.join("seg"), region_len as u64).expect("segment");
    let region = rvm.map(&seg, MapSpec::new(0, region_len)).expect("map");
    Instance { rvm, region }
}

impl Instance {
    /// Writes one byte of every page in a transaction, so the timed loops do
    /// not pay first-touch (copy-on-write) page faults, then empties the log.
    fn touch_pages(&self) {
        let ps = rvm::page_size();
        let mut tx = self.rvm.begin(RestoreMode::NoRestore).expect("begin");
        for p in (0..self.region.len()).step_by(ps) {
            let addr = self.region.addr() + p;
            // SAFETY: the byte lies in this region, which only this thread
            // uses; the range is declared before the store.
            unsafe {
                tx.set_range(addr, 1).expect("set_range");
                let b = std::ptr::read_volatile(addr as *const u8);
                std::ptr::write_volatile(addr as *mut u8, b);
            }
        }
        tx.commit(CommitMode::NoFlush).expect("commit");
        self.rvm.truncate().expect("truncate");
    }
}

/// Where a workload's ranges go.
#[derive(Clone, Copy)]
enum Spread {
    /// Uniform over the whole region.
    Uniform,
    /// `hot_permille` of ranges in the first `hot_fraction` of the region,
    /// the rest uniform.
    HotSpot { hot_fraction: f64, hot_permille: u64 },
}

/// Runs `n` transactions of 1-4 ranges of `lo..=hi` bytes (`set_range` and
/// a store into each), committing each with `mode`. With `flush_every`, a
/// flush follows every that many commits. Returns transactions per second
/// of wall-clock time and per second of this thread's CPU time.
#[allow(clippy::too_many_arguments)]
fn run_txs(
    inst: &Instance,
    n: usize,
    seed: u64,
    restore: RestoreMode,
    mode: CommitMode,
    spread: Spread,
    (lo, hi): (usize, usize),
    flush_every: Option<usize>,
) -> (f64, f64) {
    let mut rng = Rng::new(seed);
    let base = inst.region.addr();
    let len = inst.region.len();
    let cpu = thread_cpu();
    let start = Instant::now();
    for i in 0..n {
        let mut tx = inst.rvm.begin(restore).expect("begin");
        for _ in 0..rng.range(1, 4) {
            let l = rng.range(lo, hi);
            let span = match spread {
                Spread::Uniform => len,
                Spread::HotSpot { hot_fraction, hot_permille } => {
                    if rng.next() % 1000 < hot_permille {
                        (len as f64 * hot_fraction) as usize
                    } else {
                        len
                    }
                }
            };
            let off = rng.range(0, span - l);
            let v = rng.next() as u8;
            // SAFETY: [base + off, base + off + l) is inside the region
            // (off + l <= len); only this thread writes the region; the range
            // is declared before the store.
            unsafe {
                tx.set_range(base + off, l).expect("set_range");
                std::ptr::write_bytes((base + off) as *mut u8, v, l);
            }
        }
        tx.commit(mode).expect("commit");
        if flush_every.is_some_and(|k| (i + 1) % k == 0) {
            inst.rvm.flush().expect("flush");
        }
    }
    (n as f64 / start.elapsed().as_secs_f64(), n as f64 / (thread_cpu() - cpu))
}

fn delta(after: Stats, before: Stats) -> Stats {
    let mut d = after;
    d.flush_commits -= before.flush_commits;
    d.no_flush_commits -= before.no_flush_commits;
    d.committed -= before.committed;
    d.bytes_declared -= before.bytes_declared;
    d.bytes_logged -= before.bytes_logged;
    d.bytes_saved_intra -= before.bytes_saved_intra;
    d.bytes_saved_inter -= before.bytes_saved_inter;
    d.log_bytes_written -= before.log_bytes_written;
    d.log_writes -= before.log_writes;
    d.log_syncs -= before.log_syncs;
    d.truncations -= before.truncations;
    d.checkpoints -= before.checkpoints;
    d.log_full_waits -= before.log_full_waits;
    d
}

// ---------------------------------------------------------------------------
// Flush commits and the raw baseline.

/// Runs flush commits of one 64-byte range on `threads` threads (each its
/// own page of the region) for `dur`. Returns (commits/s, stats delta).
fn flush_commits(inst: &Instance, threads: usize, dur: Duration) -> (f64, Stats) {
    let before = inst.rvm.stats();
    let start = Instant::now();
    let deadline = start + dur;
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let rvm = inst.rvm.clone();
                let addr = inst.region.addr() + t * rvm::page_size();
                s.spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let mut tx = rvm.begin(RestoreMode::NoRestore).expect("begin");
                        // SAFETY: each thread owns its page of the region;
                        // the 64 bytes are declared before the store.
                        unsafe {
                            tx.set_range(addr, 64).expect("set_range");
                            std::ptr::write_bytes(addr as *mut u8, n as u8, 64);
                        }
                        tx.commit(CommitMode::Flush).expect("commit");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    let el = start.elapsed().as_secs_f64();
    (total as f64 / el, delta(inst.rvm.stats(), before))
}

/// Raw disk baseline: `pwrite` of `size` bytes then `fdatasync`, repeated
/// for `dur`. With `advance`, each write goes after the previous one (as log
/// appends do, wrapping at the end of the file); otherwise every write
/// overwrites the same block-aligned slot in turn.
struct Raw {
    file: File,
    len: u64,
    pos: u64,
    size: usize,
    advance: bool,
}

impl Raw {
    /// A sparse file (like a new log) or a fully written one.
    fn new(path: &Path, len: u64, size: usize, advance: bool, prefill: bool) -> Raw {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).expect("raw file");
        file.set_len(len).expect("set_len");
        if prefill {
            let zeros = vec![0u8; MIB];
            for off in (0..len).step_by(MIB) {
                file.write_all_at(&zeros, off).expect("prefill");
            }
            file.sync_all().expect("sync");
        }
        Raw { file, len, pos: LOG_AREA_OFFSET, size, advance }
    }

    fn run(&mut self, dur: Duration) -> f64 {
        let buf = vec![0xA5u8; self.size];
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            if self.pos + self.size as u64 > self.len {
                self.pos = LOG_AREA_OFFSET;
            }
            self.file.write_all_at(&buf, self.pos).expect("pwrite");
            self.file.sync_data().expect("fdatasync");
            if self.advance {
                self.pos += self.size as u64;
            }
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    }

    /// `threads` threads doing what [`Raw::run`] does at once, each
    /// appending in its own part of the file (no sharing of syncs beyond
    /// what the kernel and the disk do by themselves). Returns total ops/s.
    fn run_threads(&mut self, threads: usize, dur: Duration) -> f64 {
        let part = (self.len - LOG_AREA_OFFSET) / threads as u64;
        let (size, file) = (self.size, &self.file);
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let buf = vec![0x5Au8; size];
                        let first = LOG_AREA_OFFSET + t as u64 * part;
                        let mut pos = first;
                        let mut n = 0u64;
                        while start.elapsed() < dur {
                            if pos + size as u64 > first + part {
                                pos = first;
                            }
                            file.write_all_at(&buf, pos).expect("pwrite");
                            file.sync_data().expect("fdatasync");
                            pos += size as u64;
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        total as f64 / start.elapsed().as_secs_f64()
    }
}

// ---------------------------------------------------------------------------
// Recovery.

struct RecoveryRun {
    mb_per_s: f64,
    /// Log MB replayed per second of CPU time (recovery runs on the
    /// calling thread).
    mb_per_cpu_s: f64,
    secs: f64,
    log_bytes: u64,
    transactions: u64,
    segment_bytes: u64,
}

/// Writes at least `target` bytes of log records (no-flush commits,
/// coalescing off, no truncation), drops the instance, and times the
/// `Rvm::open` that replays them.
fn recovery(root: &Path, target: usize, sizes: (usize, usize), seed: u64) -> RecoveryRun {
    let dir = fresh_dir(root, "recovery");
    let region_len = 64 * MIB;
    let opts = Options { coalesce: false, truncate_threshold: None, ..Options::default() };
    {
        let inst = instance(&dir, target + 96 * MIB, region_len, opts.clone());
        let mut i = 0;
        while (inst.rvm.stats().log_bytes_written as usize) < target {
            run_txs(&inst, 2048, seed + i, RestoreMode::NoRestore, CommitMode::NoFlush, Spread::Uniform, sizes, None);
            i += 1;
        }
        inst.rvm.flush().expect("flush");
        let st = inst.rvm.stats();
        assert_eq!((st.truncations, st.log_full_waits), (0, 0), "the log must hold every record");
    } // dropped: flushes, does not truncate
    let cpu = thread_cpu();
    let start = Instant::now();
    let rvm = Rvm::open(dir.join("log"), opts).expect("recovery");
    let secs = start.elapsed().as_secs_f64();
    let cpu = thread_cpu() - cpu;
    let rep = rvm.recovery_report();
    drop(rvm);
    let _ = std::fs::remove_dir_all(&dir);
    RecoveryRun {
        mb_per_s: rep.log_bytes as f64 / 1e6 / secs,
        mb_per_cpu_s: rep.log_bytes as f64 / 1e6 / cpu,
        secs,
        log_bytes: rep.log_bytes,
        transactions: rep.transactions,
        segment_bytes: rep.segment_bytes_written,
    }
}

// ---------------------------------------------------------------------------

fn main() {
    let q = quick();
    let runs = if q { 2 } else { 5 };
    let nf_txs = if q { 50_000 } else { 1_000_000 };
    let flush_dur = Duration::from_millis(if q { 150 } else { 2000 });
    let rec_target = if q { 16 * MIB } else { 256 * MIB };
    let hot_txs = if q { 20_000 } else { 300_000 };

    let root = bench_root();
    let (dev, fstype, mp, mopts) = filesystem_of(&root);
    println!("# rvm core benchmarks ({})", if q { "QUICK mode: figures are not meaningful" } else { "full run" });
    println!();
    println!(
        "- CPU: {} ({} cores available), memory {}",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total()
    );
    println!("- kernel: Linux {}", read("/proc/sys/kernel/osrelease").trim());
    println!("- bench dir: {} on {dev} ({fstype}, mounted at {mp}, {mopts})", root.display());
    if fstype == "tmpfs" || fstype == "ramfs" {
        println!(
            "- **WARNING**: the bench dir is in memory; sync figures mean nothing. Set RVM_BENCH_DIR to a real disk."
        );
    }
    println!("- load average at start: {}", loadavg());
    println!("- {runs} runs of every workload, interleaved; figures are medians");
    println!();

    let mut rows = Vec::new();
    let mut details = String::new();
    let only = std::env::var("RVM_BENCH_ONLY").unwrap_or_default();
    let want = |n: char| only.is_empty() || only.contains(n);

    // 1. No-flush commits.
    if want('1') {
        eprintln!("[1/5] no-flush commits");
        // The last one with an 8 MiB unapplied-log bound (the cost of
        // `max_unapplied_log`, measured side by side; off by default).
        let configs: [(&str, bool, RestoreMode, bool); 4] = [
            (
                "no-flush tx, 1-4 ranges of 8-64 B in 64 MiB, coalescing on, no-restore",
                true,
                RestoreMode::NoRestore,
                true,
            ),
            ("same, coalescing off", false, RestoreMode::NoRestore, true),
            ("same, coalescing on, restore mode", true, RestoreMode::Restore, true),
            (
                "same as the first, unapplied-log bound 8 MiB (max_unapplied_log: Some(8 MiB))",
                true,
                RestoreMode::NoRestore,
                false,
            ),
        ];
        let insts: Vec<Instance> = configs
            .iter()
            .enumerate()
            .map(|(i, &(_, coalesce, _, default_bound))| {
                let dir = fresh_dir(&root, &format!("noflush{i}"));
                let bound = if default_bound { None } else { Some(8 << 20) };
                let opts = Options { coalesce, max_unapplied_log: bound, ..Options::default() };
                let inst = instance(&dir, 256 * MIB, 64 * MIB, opts);
                inst.touch_pages();
                run_txs(
                    &inst,
                    nf_txs / 10,
                    7,
                    RestoreMode::NoRestore,
                    CommitMode::NoFlush,
                    Spread::Uniform,
                    (8, 64),
                    None,
                );
                inst.rvm.flush().expect("flush");
                inst
            })
            .collect();
        let mut nf: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut nf_cpu: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut nf_stats = vec![Stats::default(); configs.len()];
        for r in 0..runs {
            for (c, (cfg, inst)) in configs.iter().zip(&insts).enumerate() {
                let before = inst.rvm.stats();
                let seed = 1000 + r as u64;
                let (wall, cpu) =
                    run_txs(inst, nf_txs, seed, cfg.2, CommitMode::NoFlush, Spread::Uniform, (8, 64), None);
                nf[c].push(wall);
                nf_cpu[c].push(cpu);
                inst.rvm.flush().expect("flush");
                nf_stats[c] = delta(inst.rvm.stats(), before);
            }
        }
        drop(insts);
        for (c, cfg) in configs.iter().enumerate() {
            let m = median(&nf[c]);
            let r = row(cfg.0, "tx/s", &nf[c]);
            rows.push(if c == 0 { r.target("≥ 1,000,000 tx/s", m >= 1e6) } else { r });
        }
        rows.push(row(
            "no-flush tx, coalescing on, no-restore, per second of the committing thread's CPU time",
            "tx/CPU-s",
            &nf_cpu[0],
        ));
        rows.push(row("same, no unapplied-log bound, per CPU second", "tx/CPU-s", &nf_cpu[3]));
        let _ = writeln!(
            details,
            "No-flush commits, last run ({nf_txs} transactions): bytes logged / declared; log writes; \
             background checkpoints and log replays; log-full waits:\n"
        );
        for (c, cfg) in configs.iter().enumerate() {
            let s = nf_stats[c];
            let _ = writeln!(
                details,
                "- {}: {} / {} B; {} writes of {:.1} MiB avg; {} checkpoints, {} replays; {} waits",
                cfg.0,
                s.bytes_logged,
                s.bytes_declared,
                s.log_writes,
                s.log_bytes_written as f64 / s.log_writes.max(1) as f64 / MIB as f64,
                s.checkpoints,
                s.truncations,
                s.log_full_waits
            );
        }
        let _ = writeln!(details);
    }

    // 2 and 3. Flush commits, raw baseline, group commit.
    if want('2') || want('3') {
        eprintln!("[2-3/5] flush commits and raw pwrite+fdatasync");
        let fdir = fresh_dir(&root, "flush");
        let finst = instance(&fdir, 64 * MIB, MIB, Options::default());
        finst.touch_pages();
        // One flush commit tells the size of a commit's log write.
        let b = finst.rvm.stats();
        {
            let mut tx = finst.rvm.begin(RestoreMode::NoRestore).expect("begin");
            // SAFETY: the first 64 bytes of the region, used by this thread only.
            unsafe { tx.modify_bytes(finst.region.addr(), &[1u8; 64]).expect("modify") };
            tx.commit(CommitMode::Flush).expect("commit");
        }
        let d = delta(finst.rvm.stats(), b);
        let frame = (d.log_bytes_written / d.log_writes.max(1)) as usize;
        let mut raw_frame = Raw::new(&fdir.join("raw-sparse"), 64 * MIB as u64, frame, true, false);
        let mut raw_4k = Raw::new(&fdir.join("raw-4k"), 64 * MIB as u64, 4096, true, true);
        let mut raw_threads = Raw::new(&fdir.join("raw-threads"), 64 * MIB as u64, frame, true, false);
        let (mut raw, mut raw4, mut one, mut four, mut ratio1, mut ratio4, mut per_sync) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut raw_t, mut ratio_t) = (vec![], vec![]);
        let mut syncs_line = Vec::new();
        let mut syncs_line1 = Vec::new();
        // The virtual disk's sync latency drifts by up to 10x within
        // seconds, so each run interleaves the five workloads in short
        // slices and averages each one's slice rates: every ratio compares
        // workloads that saw the same disk.
        let slices = if q { 3 } else { 10 };
        let slice = flush_dur / slices;
        for _ in 0..runs {
            let mut sum = [0f64; 5];
            let mut st = Stats::default();
            let mut st1 = Stats::default();
            for _ in 0..slices {
                sum[0] += raw_frame.run(slice);
                let (o1, d1) = flush_commits(&finst, 1, slice);
                sum[1] += o1;
                st1.flush_commits += d1.flush_commits;
                st1.log_syncs += d1.log_syncs;
                let (f, d) = flush_commits(&finst, 4, slice);
                sum[2] += f;
                st.flush_commits += d.flush_commits;
                st.log_syncs += d.log_syncs;
                sum[3] += raw_threads.run_threads(4, slice);
                sum[4] += raw_4k.run(slice);
            }
            let [r, o, f, rt, r4] = sum.map(|x| x / slices as f64);
            raw.push(r);
            one.push(o);
            four.push(f);
            raw_t.push(rt);
            raw4.push(r4);
            ratio1.push(o / r);
            ratio4.push(f / o);
            ratio_t.push(f / rt);
            per_sync.push(st.flush_commits as f64 / st.log_syncs.max(1) as f64);
            syncs_line.push(format!("{}/{}", st.flush_commits, st.log_syncs));
            syncs_line1.push(format!("{}/{}", st1.flush_commits, st1.log_syncs));
        }
        drop(finst);
        rows.push(row(
            format!("raw pwrite {frame} B (a commit's log write, appending in a sparse file) + fdatasync"),
            "ops/s",
            &raw,
        ));
        rows.push(row("raw pwrite 4 KiB (appending in a written file) + fdatasync, for reference", "ops/s", &raw4));
        rows.push(row("flush commit, 1 thread, one 64 B range", "commits/s", &one));
        rows.push(
            row("flush commit 1 thread / raw pwrite+fdatasync (same run)", "ratio", &ratio1)
                .fmt(ratio_fmt)
                .target("≥ 0.80", median(&ratio1) >= 0.8),
        );
        rows.push(row("flush commit, 4 threads (own ranges), total", "commits/s", &four));
        rows.push(
            row("flush commit 4 threads / 1 thread (same run)", "ratio", &ratio4)
                .fmt(ratio_fmt)
                .target("≥ 2.00", median(&ratio4) >= 2.0),
        );
        rows.push(
            row("4 threads: flush commits per log sync (group commit)", "commits/sync", &per_sync).fmt(ratio_fmt),
        );
        rows.push(row(
            format!("raw pwrite {frame} B + fdatasync, 4 threads (each appending in its own part of one file), total"),
            "ops/s",
            &raw_t,
        ));
        rows.push(row("flush commit 4 threads / raw 4 threads (same run)", "ratio", &ratio_t).fmt(ratio_fmt));
        let _ =
            writeln!(details, "Group commit, 4 threads, flush_commits/log_syncs per run: {}\n", syncs_line.join(", "));
        let _ = writeln!(details, "One thread, flush_commits/log_syncs per run: {}\n", syncs_line1.join(", "));
    }

    // 4. Recovery.
    if want('4') {
        eprintln!("[4/5] recovery");
        let (mut rec_small, mut rec_big) = (Vec::new(), Vec::new());
        let (mut cpu_small, mut cpu_big) = (Vec::new(), Vec::new());
        let mut rec_lines = Vec::new();
        for r in 0..runs {
            let a = recovery(&root, rec_target, (8, 64), 50 + r as u64);
            let b = recovery(&root, rec_target, (256, 4096), 90 + r as u64);
            rec_small.push(a.mb_per_s);
            rec_big.push(b.mb_per_s);
            cpu_small.push(a.mb_per_cpu_s);
            cpu_big.push(b.mb_per_cpu_s);
            rec_lines.push((a, b));
        }
        rows.push(
            row("recovery replay, log of 1-4 ranges of 8-64 B per tx", "MB/s", &rec_small)
                .target("≥ 500 MB/s", median(&rec_small) >= 500.0),
        );
        rows.push(
            row("recovery replay, log of 1-4 ranges of 256-4096 B per tx", "MB/s", &rec_big)
                .target("≥ 500 MB/s", median(&rec_big) >= 500.0),
        );
        rows.push(row("recovery replay, small ranges, per second of CPU time", "MB/CPU-s", &cpu_small));
        rows.push(row("recovery replay, large ranges, per second of CPU time", "MB/CPU-s", &cpu_big));
        let _ = writeln!(
            details,
            "Recovery runs (log warm in the page cache; time of `Rvm::open`, which replays, writes and syncs the segment):\n"
        );
        let _ = writeln!(
            details,
            "| run | small ranges: log MB, tx, segment MB written, s | large ranges: log MB, tx, segment MB written, s |"
        );
        let _ = writeln!(details, "|---|---|---|");
        for (i, (a, b)) in rec_lines.iter().enumerate() {
            let _ = writeln!(
                details,
                "| {} | {:.0}, {}, {:.0}, {:.3} | {:.0}, {}, {:.0}, {:.3} |",
                i + 1,
                a.log_bytes as f64 / 1e6,
                a.transactions,
                a.segment_bytes as f64 / 1e6,
                a.secs,
                b.log_bytes as f64 / 1e6,
                b.transactions,
                b.segment_bytes as f64 / 1e6,
                b.secs
            );
        }
        let _ = writeln!(details);
    }

    // 5. Coalescing on a hot spot.
    if want('5') {
        eprintln!("[5/5] coalescing");
        let hot = Spread::HotSpot { hot_fraction: 0.01, hot_permille: 900 };
        let cdir = fresh_dir(&root, "coalesce");
        let cinst = instance(&cdir, 256 * MIB, 64 * MIB, Options::default());
        let (mut saved_nf, mut saved_f100) = (vec![], vec![]);
        let (mut st_nf, mut st_f100) = (Stats::default(), Stats::default());
        for r in 0..runs {
            for (flush_every, out, st) in
                [(None, &mut saved_nf, &mut st_nf), (Some(100), &mut saved_f100, &mut st_f100)]
            {
                let before = cinst.rvm.stats();
                let seed = 300 + r as u64;
                run_txs(&cinst, hot_txs, seed, RestoreMode::NoRestore, CommitMode::NoFlush, hot, (8, 64), flush_every);
                cinst.rvm.flush().expect("flush");
                let d = delta(cinst.rvm.stats(), before);
                out.push(d.bytes_saved() as f64 / d.bytes_declared as f64);
                *st = d;
            }
        }
        drop(cinst);
        rows.push(
            row("hot spot (90% of ranges in 1% of 64 MiB), no-flush, saved/declared", "fraction", &saved_nf)
                .fmt(pct_fmt)
                .target("≈ 50% (manual)", median(&saved_nf) >= 0.4),
        );
        rows.push(row("same, with a flush every 100 commits", "fraction", &saved_f100).fmt(pct_fmt));
        let _ = writeln!(details, "Coalescing, last run ({hot_txs} transactions):\n");
        let _ = writeln!(details, "| variant | bytes_declared | bytes_logged | bytes_saved (intra + inter) | saved |");
        let _ = writeln!(details, "|---|---:|---:|---:|---:|");
        for (name, s) in [("no-flush, 4 MiB pending batches", st_nf), ("flush every 100 commits", st_f100)] {
            let _ = writeln!(
                details,
                "| {name} | {} | {} | {} ({} + {}) | {:.1}% |",
                s.bytes_declared,
                s.bytes_logged,
                s.bytes_saved(),
                s.bytes_saved_intra,
                s.bytes_saved_inter,
                100.0 * s.bytes_saved() as f64 / s.bytes_declared.max(1) as f64
            );
        }
        let _ = writeln!(details);
    }

    println!("## Results");
    println!();
    print_table(&rows);
    println!();
    println!("## Details");
    println!();
    print!("{details}");
    println!("load average at end: {}", loadavg());
    let _ = std::fs::remove_dir_all(&root);
}
