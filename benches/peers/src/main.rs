//! The peers benchmark: this library (as one mapped region and as the
//! typed heap) against SQLite, LMDB, redb and PMDK's libpmemobj (when
//! installed: see build.rs) on a TPC-A-style bank, five
//! workloads, medians of several rounds. See docs/BENCHMARKS.md ("Peers").
//!
//! `cargo run --release --manifest-path benches/peers/Cargo.toml` runs it,
//! prints the table, and writes `docs/peers.svg` and the table into
//! `docs/BENCHMARKS.md` (between its `peers-table` markers).
//! `RVM_BENCH_QUICK=1`: a smoke run of a few seconds that writes nothing
//! into docs/ (its plot goes to the bench folder).
//! `RVM_PEERS_INSTANT=1`: the rvm systems reopen with instant recovery
//! (`Options::instant_recovery`). `RVM_PEERS_ROUNDS=N`: rounds (default 5). `RVM_PEERS_DIR`: where the
//! databases live (default `target/rvm-peers` in the repository).

#[path = "../../common/mod.rs"]
mod common;

mod bank;
mod lmdb;
mod plot;
#[cfg(pmemobj)]
mod pmemobj;
mod redb_bank;
mod rvm;
mod sqlite;

use anyhow::{bail, ensure, Context, Result};
use bank::{Bank, System, Teller, SYSTEMS, TOTAL};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The throughput workloads, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// One transfer per durable commit, one thread.
    Durable1,
    /// 1,000 transfers per durable commit, one thread.
    Group1000,
    /// One transfer per durable commit, four threads.
    Durable4Threads,
    /// One balance per read transaction, one thread.
    RandomReads,
}

pub const WORKLOADS: [Workload; 4] =
    [Workload::Durable1, Workload::Group1000, Workload::Durable4Threads, Workload::RandomReads];

impl Workload {
    pub fn label(self) -> &'static str {
        match self {
            Workload::Durable1 => "durable, 1 transfer per commit, 1 thread",
            Workload::Group1000 => "durable, 1,000 transfers per commit",
            Workload::Durable4Threads => "durable, 1 transfer per commit, 4 threads",
            Workload::RandomReads => "random reads, 1 balance per read transaction",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Workload::Durable1 => "durable, 1 thread",
            Workload::Group1000 => "groups of 1,000",
            Workload::Durable4Threads => "durable, 4 threads",
            Workload::RandomReads => "random reads",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::RandomReads => "reads/s",
            _ => "transfers/s",
        }
    }
}

/// How long and how much.
struct Plan {
    quick: bool,
    rounds: usize,
    /// Time each system runs each throughput workload, per round.
    slice: Duration,
    /// Unapplied transfers before the crash.
    crash_transfers: u64,
    dir: PathBuf,
}

impl Plan {
    fn from_env() -> Result<Plan> {
        let quick = common::quick();
        let rounds = match std::env::var("RVM_PEERS_ROUNDS") {
            Ok(v) => v.parse().context("RVM_PEERS_ROUNDS is not a number")?,
            Err(_) if quick => 1,
            Err(_) => 5,
        };
        ensure!(rounds > 0, "RVM_PEERS_ROUNDS must be at least 1");
        let dir = std::env::var_os("RVM_PEERS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target").join("rvm-peers"));
        Ok(Plan {
            quick,
            rounds,
            slice: if quick { Duration::from_millis(200) } else { Duration::from_secs(2) },
            crash_transfers: if quick { 5_000 } else { 200_000 },
            dir,
        })
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Everything measured, per round.
#[derive(Default)]
pub struct Results {
    /// (workload, system) → rate per round.
    pub rates: Vec<(Workload, System, Vec<f64>)>,
    /// system → (reopen-to-first-read ms, full reopen ms) per round.
    pub reopen: Vec<(System, Vec<(f64, f64)>)>,
    /// (what, system) → log bytes per transfer per round (this library).
    pub log_bytes: Vec<(&'static str, System, Vec<f64>)>,
}

impl Results {
    fn rate(&mut self, w: Workload, s: System, v: f64) {
        match self.rates.iter_mut().find(|(w2, s2, _)| *w2 == w && *s2 == s) {
            Some(e) => e.2.push(v),
            None => self.rates.push((w, s, vec![v])),
        }
    }

    fn reopened(&mut self, s: System, first: f64, full: f64) {
        match self.reopen.iter_mut().find(|(s2, _)| *s2 == s) {
            Some(e) => e.1.push((first, full)),
            None => self.reopen.push((s, vec![(first, full)])),
        }
    }

    fn logged(&mut self, what: &'static str, s: System, v: f64) {
        match self.log_bytes.iter_mut().find(|(w2, s2, _)| *w2 == what && *s2 == s) {
            Some(e) => e.2.push(v),
            None => self.log_bytes.push((what, s, vec![v])),
        }
    }

    pub fn median_rate(&self, w: Workload, s: System) -> Option<f64> {
        self.rates.iter().find(|(w2, s2, _)| *w2 == w && *s2 == s).map(|(_, _, v)| common::median(v))
    }

    /// Median (first read, full) reopen in ms.
    pub fn median_reopen(&self, s: System) -> Option<(f64, f64)> {
        self.reopen.iter().find(|(s2, _)| *s2 == s).map(|(_, v)| {
            let first: Vec<f64> = v.iter().map(|x| x.0).collect();
            let full: Vec<f64> = v.iter().map(|x| x.1).collect();
            (common::median(&first), common::median(&full))
        })
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--crash-child") => crash_child(&args[2..]),
        Some("--reopen-child") => reopen_child(&args[2..]),
        Some("--sync-probe") => sync_probe(&args[2..]),
        Some(other) => bail!("unknown argument {other:?} (the bench takes none; see RVM_BENCH_QUICK)"),
        None => run(),
    }
}

fn run() -> Result<()> {
    let plan = Plan::from_env()?;
    let machine = machine(&plan.dir);
    println!("peers bench: {} round(s), {:?} per system and workload", plan.rounds, plan.slice);
    println!("{machine}");
    let mut results = Results::default();
    for round in 0..plan.rounds {
        let dir = plan.dir.join(format!("round-{round}"));
        remove_dir(&dir)?;
        // A different system goes first in each round.
        let mut order = SYSTEMS.to_vec();
        order.rotate_left(round % SYSTEMS.len());
        throughput_round(&plan, &dir, &order, round as u64 + 1, &mut results)?;
        crash_round(&plan, &dir, &order, &mut results)?;
        remove_dir(&dir)?;
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let table = table(&plan, &results, &machine, load_after.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("\n{table}");
    let svg = if plan.quick { plan.dir.join("peers.svg") } else { repo_root().join("docs").join("peers.svg") };
    plot::draw(&svg, &results)?;
    println!("plot written to {}", svg.display());
    if !plan.quick {
        update_benchmarks_md(&table)?;
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context(format!("removing {}", dir.display())),
        _ => Ok(()),
    }
}

/// The sum of balances and the count of history records must be what the
/// transfers made.
fn check(bank: &dyn Bank, system: System, transfers: u64, when: &str) -> Result<()> {
    let sum = bank.sum()?;
    ensure!(sum == TOTAL, "{}: the balances sum to {sum}, not {TOTAL}, {when}", system.label());
    let records = bank.history_len()?;
    ensure!(records == transfers, "{}: {records} history records, not {transfers}, {when}", system.label());
    Ok(())
}

/// Runs `step` (which returns the operations it did) until `slice` has
/// passed, at least once; returns the operations and the seconds taken.
fn run_for(slice: Duration, mut step: impl FnMut() -> Result<u64>) -> Result<(u64, f64)> {
    let start = Instant::now();
    let mut ops = step()?;
    while start.elapsed() < slice {
        ops += step()?;
    }
    Ok((ops, start.elapsed().as_secs_f64()))
}

/// Runs workload `w` on `bank` for `slice`; returns the operations done
/// and the seconds taken.
fn run_slice(w: Workload, bank: &dyn Bank, slice: Duration, seed: u64) -> Result<(u64, f64)> {
    match w {
        Workload::Durable1 | Workload::Group1000 => {
            let per_commit = if w == Workload::Durable1 { 1 } else { 1000 };
            let mut teller = Teller::new(seed, 0);
            let mut batch = Vec::new();
            run_for(slice, || {
                teller.fill(per_commit, &mut batch);
                bank.transfer(0, &batch, true)?;
                Ok(per_commit as u64)
            })
        }
        Workload::Durable4Threads => {
            let start = Instant::now();
            let done: Result<Vec<u64>> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..4)
                    .map(|t| {
                        scope.spawn(move || {
                            let mut teller = Teller::new(seed, t);
                            let mut batch = Vec::new();
                            run_for(slice, || {
                                teller.fill(1, &mut batch);
                                bank.transfer(t, &batch, true)?;
                                Ok(1)
                            })
                            .map(|(ops, _)| ops)
                        })
                    })
                    .collect();
                workers.into_iter().map(|h| h.join().expect("a worker panicked")).collect()
            });
            Ok((done?.iter().sum(), start.elapsed().as_secs_f64()))
        }
        Workload::RandomReads => {
            let mut teller = Teller::new(seed, 0);
            let mut sink = 0u64;
            let r = run_for(slice, || {
                for _ in 0..100 {
                    sink = sink.wrapping_add(bank.balance(teller.account())?);
                }
                Ok(100)
            })?;
            std::hint::black_box(sink);
            Ok(r)
        }
    }
}

/// Lets the writeback of the banks just made end before anything is
/// timed (else its I/O falls on the first system's syncs): `sync`, then a
/// short pause.
fn settle() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// Slices per system and workload in a round: the systems take turns,
/// so that a drift of the disk's sync latency (up to 10x within seconds
/// here) falls on all of them alike.
const SLICES: u32 = 10;

fn throughput_round(plan: &Plan, dir: &Path, order: &[System], seed: u64, results: &mut Results) -> Result<()> {
    let mut banks = Vec::new();
    for &s in order {
        let bank = s.create(&dir.join(s.key())).with_context(|| format!("creating the {} bank", s.label()))?;
        banks.push((s, bank, 0u64));
    }
    settle();
    for w in WORKLOADS {
        // Per system: operations, seconds, log bytes.
        let mut sums = vec![(0u64, 0f64, 0u64); banks.len()];
        for k in 0..SLICES {
            for ((s, bank, transfers), sum) in banks.iter_mut().zip(&mut sums) {
                let log_before = bank.log_bytes();
                let (ops, secs) = run_slice(w, bank.as_ref(), plan.slice / SLICES, seed * 100 + u64::from(k))
                    .with_context(|| format!("{} on {}", w.short(), s.label()))?;
                if w != Workload::RandomReads {
                    *transfers += ops;
                }
                sum.0 += ops;
                sum.1 += secs;
                if let (Some(before), Some(after)) = (log_before, bank.log_bytes()) {
                    sum.2 += after - before;
                }
            }
        }
        for ((s, bank, transfers), (ops, secs, log)) in banks.iter().zip(sums) {
            check(bank.as_ref(), *s, *transfers, &format!("after {}", w.short()))?;
            let rate = ops as f64 / secs;
            results.rate(w, *s, rate);
            let mut line =
                format!("  {:<44} {:<13} {:>12}", w.label(), s.label(), format!("{} {}", common::si(rate), w.unit()));
            if bank.log_bytes().is_some() && w != Workload::RandomReads {
                let per = log as f64 / ops as f64;
                results.logged(w.short(), *s, per);
                line += &format!("   log {per:.0} B/transfer");
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn crash_round(plan: &Plan, dir: &Path, order: &[System], results: &mut Results) -> Result<()> {
    let exe = std::env::current_exe()?;
    for &s in order {
        settle();
        let bank_dir = dir.join(format!("crash-{}", s.key()));
        let n = plan.crash_transfers;
        // The writer: makes the bank, commits the transfers, says so, and
        // waits to be killed.
        let mut child = Command::new(&exe);
        child.args(["--crash-child", s.key(), &bank_dir.to_string_lossy(), &n.to_string()]).stdout(Stdio::piped());
        if s == System::Pmem {
            // libpmemobj has no non-durable commit: this makes its commits
            // cache flushes instead of `msync`s (see src/pmemobj.rs).
            child.env("PMEM_IS_PMEM_FORCE", "1");
        }
        let mut child = child.spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no pipe")?).read_line(&mut line)?;
        // `Child::kill` sends SIGKILL.
        child.kill()?;
        child.wait()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        ensure!(words.first() == Some(&"ready"), "the {} writer did not finish: {line:?}", s.label());
        let write_secs: f64 = words.get(1).context("no time")?.parse()?;
        let mut note = format!("{n} transfers written in {write_secs:.2} s");
        if let Some(bytes) = words.get(2).and_then(|w| w.parse::<f64>().ok()) {
            results.logged("reopen: 1 per non-durable commit", s, bytes / n as f64);
            note += &format!(", log {:.0} B/transfer", bytes / n as f64);
        }
        // The reader: a new process, as a program restarting would be.
        let out = Command::new(&exe)
            .args(["--reopen-child", s.key(), &bank_dir.to_string_lossy(), &n.to_string()])
            .stderr(Stdio::inherit())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "the {} reopen failed: {text}", s.label());
        let words: Vec<&str> = text.split_whitespace().collect();
        ensure!(words.first() == Some(&"reopened"), "unexpected reopen output {text:?}");
        let first: f64 = words[1].parse()?;
        if let Some(recovery) = text.lines().nth(1) {
            note += &format!("; {recovery}");
        }
        let full: f64 = words[2].parse()?;
        results.reopened(s, first, full);
        println!(
            "  {:<44} {:<13} first read {first:>8.2} ms, full {full:>8.2} ms ({note})",
            "reopen after a crash",
            s.label()
        );
    }
    Ok(())
}

fn child_args(args: &[String]) -> Result<(System, PathBuf, u64)> {
    let [system, dir, n] = args else { bail!("expected: system folder transfers") };
    Ok((System::from_key(system).context("no such system")?, PathBuf::from(dir), n.parse()?))
}

/// The crash workload's writer (a child process): a new bank, `n`
/// transfers each in its own non-durable commit but the last (durable),
/// then "ready <seconds> [<log bytes>]" and a wait for SIGKILL.
fn crash_child(args: &[String]) -> Result<()> {
    let (system, dir, n) = child_args(args)?;
    remove_dir(&dir)?;
    let bank = system.create(&dir)?;
    let log_before = bank.log_bytes();
    let mut teller = Teller::new(7, 0);
    let start = Instant::now();
    for i in 0..n {
        bank.transfer(0, &[teller.next()], i + 1 == n)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = match (log_before, bank.log_bytes()) {
        (Some(a), Some(b)) => format!(" {}", b - a),
        _ => String::new(),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {secs} {bytes}")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}

/// The crash workload's reader (a child process): opens the bank, reads
/// one balance, then every balance; prints "reopened <ms to the first
/// read> <ms to the full sum>" once the sum and the history are checked.
fn reopen_child(args: &[String]) -> Result<()> {
    let (system, dir, n) = child_args(args)?;
    let start = Instant::now();
    let bank = system.open(&dir)?;
    std::hint::black_box(bank.balance(12_345)?);
    let first = start.elapsed();
    let sum = bank.sum()?;
    let full = start.elapsed();
    ensure!(sum == TOTAL, "{}: the balances sum to {sum}, not {TOTAL}, after the crash", system.label());
    check(bank.as_ref(), system, n, "after the crash")?;
    println!("reopened {} {}", first.as_secs_f64() * 1e3, full.as_secs_f64() * 1e3);
    if let Some(note) = bank.recovery_note() {
        println!("{note}");
    }
    Ok(())
}

/// `--sync-probe <system> <folder> <n>`: a new bank, then `n` transfers in
/// durable commits of one, after a `getpid` call that marks where they
/// start; run under `strace -f -e trace=getpid,fsync,fdatasync,msync` to
/// count the syncs per durable commit (docs/BENCHMARKS.md, "Peers").
fn sync_probe(args: &[String]) -> Result<()> {
    let (system, dir, n) = child_args(args)?;
    remove_dir(&dir)?;
    let bank = system.create(&dir)?;
    let mut teller = Teller::new(3, 0);
    std::hint::black_box(std::process::id());
    let start = Instant::now();
    for _ in 0..n {
        bank.transfer(0, &[teller.next()], true)?;
    }
    println!("{n} durable commits in {:.3} s", start.elapsed().as_secs_f64());
    check(bank.as_ref(), system, n, "after the probe")?;
    drop(bank);
    remove_dir(&dir)
}

/// CPU, cores, memory, kernel, file system of `dir`, load: for the table.
fn machine(dir: &Path) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1048576.0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let _ = std::fs::create_dir_all(dir);
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let fs = read("/proc/mounts")
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() > 2 && dir.starts_with(w[1])).then(|| (w[1].len(), format!("{} on {}", w[2], w[0])))
        })
        .max()
        .map_or_else(|| "unknown file system".into(), |(_, f)| f);
    let load = read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let versions = peer_versions();
    let rvm_recovery = if rvm::instant() { "rvm with instant recovery" } else { "rvm with full recovery at open" };
    format!(
        "{date}; {cpu}, {cores} cores, {mem_gib:.1} GiB, Linux {kernel}, {fs}; load average {load} at the start; \
         {rvm_recovery}; {versions}"
    )
}

/// The peers' versions, from this crate's Cargo.lock.
fn peer_versions() -> String {
    let lock = include_str!("../Cargo.lock");
    let version = |name: &str| {
        let tag = format!("name = \"{name}\"\nversion = \"");
        lock.find(&tag).and_then(|i| lock[i + tag.len()..].split('"').next()).unwrap_or("?").to_string()
    };
    let mut v = format!(
        "SQLite {} (rusqlite {}, bundled), LMDB {} (heed {}), redb {}",
        rusqlite::version(),
        version("rusqlite"),
        version("lmdb-master-sys"),
        version("heed"),
        version("redb")
    );
    if SYSTEMS.contains(&System::Pmem) {
        let pmdk = Command::new("pkg-config").args(["--modversion", "libpmemobj"]).output();
        let pmdk =
            pmdk.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        v += &format!(", PMDK libpmemobj {}", pmdk.as_deref().unwrap_or("?"));
    }
    v
}

fn table(plan: &Plan, r: &Results, machine: &str, load_after: String) -> String {
    let mut t = String::new();
    let runs = if plan.quick { " (QUICK MODE: smoke run, not figures)" } else { "" };
    t += &format!(
        "Measured {machine}, load average {load_after} at the end. Medians of {} round(s){runs}; \
         each cell: rate (or time) and its ratio to rvm (region), higher is better for rates.\n\n",
        plan.rounds
    );
    t += "| workload |";
    for &s in SYSTEMS {
        t += &format!(" {} |", s.label());
    }
    t += "\n|---|";
    for _ in SYSTEMS {
        t += "---:|";
    }
    t += "\n";
    for w in WORKLOADS {
        t += &format!("| {} |", w.label());
        let base = r.median_rate(w, System::Flat);
        for &s in SYSTEMS {
            match (r.median_rate(w, s), base) {
                (Some(v), Some(b)) => t += &format!(" {} ({}) |", ratio(v / b), common::si(v)),
                _ => t += " - |",
            }
        }
        t += "\n";
    }
    for (i, what) in
        ["reopen after a crash: to the first read", "reopen after a crash: all balances read"].iter().enumerate()
    {
        t += &format!("| {what}, {} unapplied transfers, ms |", common::si(plan.crash_transfers as f64));
        let pick = |s| r.median_reopen(s).map(|(a, b)| if i == 0 { a } else { b });
        let base = pick(System::Flat);
        for &s in SYSTEMS {
            match (pick(s), base) {
                (Some(v), Some(b)) => t += &format!(" **{}** ({}) |", ms(v), ratio(v / b)),
                _ => t += " - |",
            }
        }
        t += "\n";
    }
    let whats: Vec<&str> = {
        let mut w: Vec<&str> = r.log_bytes.iter().map(|x| x.0).collect();
        w.dedup();
        w
    };
    for what in whats {
        t += &format!("| log bytes per transfer, {what} |");
        for &s in SYSTEMS {
            match r.log_bytes.iter().find(|x| x.0 == what && x.1 == s) {
                Some(x) => t += &format!(" {:.0} |", common::median(&x.2)),
                None => t += " |",
            }
        }
        t += "\n";
    }
    t
}

/// A ratio to rvm (region): two decimals, or two significant digits
/// below 0.1.
fn ratio(x: f64) -> String {
    if (x - 1.0).abs() < 0.005 {
        "1.00".into()
    } else if x < 0.1 && x > 0.0 {
        let decimals = (1.0 - x.log10().floor()) as usize;
        format!("{x:.decimals$}x")
    } else {
        format!("{x:.2}x")
    }
}

fn ms(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0} ms")
    } else if x >= 1.0 {
        format!("{x:.1} ms")
    } else {
        format!("{x:.2} ms")
    }
}

const TABLE_BEGIN: &str = "<!-- peers-table:begin (written by the peers bench) -->";
const TABLE_END: &str = "<!-- peers-table:end -->";

/// Puts the table between the markers in docs/BENCHMARKS.md.
fn update_benchmarks_md(table: &str) -> Result<()> {
    let path = repo_root().join("docs").join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path)?;
    let (Some(a), Some(b)) = (text.find(TABLE_BEGIN), text.find(TABLE_END)) else {
        println!("{} has no peers-table markers: table not written there", path.display());
        return Ok(());
    };
    ensure!(a < b, "the peers-table markers in {} are out of order", path.display());
    let new = format!("{}{TABLE_BEGIN}\n{table}{}", &text[..a], &text[b..]);
    std::fs::write(&path, new)?;
    println!("table written into {}", path.display());
    Ok(())
}
