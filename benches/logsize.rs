//! Log size and replay speed of the log format: bytes of log per
//! transaction (a TPC-A bank transfer, and the core benchmark's 1–4 ranges
//! of 8–64 B), replay of a log of small ranges (MB of log per second, wall
//! and CPU), and restart time with the default options.
//!
//! Uses only API that log format 2 had too, so the same file builds at an
//! older commit and the two can be run back to back (see
//! docs/BENCHMARKS.md). `cargo bench --bench logsize`;
//! `RVM_BENCH_QUICK=1` for a short check; `RVM_BENCH_DIR` picks the
//! directory (default: `rvm-bench/` in the target directory).

mod common;

use common::{quick, Rng};
use rvm::{create_log, CommitMode, MapSpec, Options, Region, RestoreMode, Rvm};
use std::path::PathBuf;
use std::time::Instant;

const MIB: usize = 1 << 20;

fn bench_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("RVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("exe");
        exe.parent().and_then(|p| p.parent()).map_or_else(|| PathBuf::from("."), |p| p.join("rvm-bench"))
    });
    let dir = base.join(format!("logsize-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

/// Process CPU seconds (user, system), all threads, from `getrusage`.
fn cpu_split() -> (f64, f64) {
    // SAFETY: `getrusage` fills the zeroed struct it is given; RUSAGE_SELF
    // is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime), t(ru.ru_stime))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

struct Inst {
    rvm: Rvm,
    region: Region,
    dir: PathBuf,
}

fn open(name: &str, log: usize, region_len: usize, opts: Options) -> Inst {
    let dir = bench_dir(name);
    create_log(dir.join("log"), log as u64).expect("log");
    let rvm = Rvm::open(dir.join("log"), opts).expect("open");
    let seg = rvm.create_segment(dir.join("seg"), region_len as u64).expect("segment");
    let region = rvm.map(&seg, MapSpec::new(0, region_len)).expect("map");
    Inst { rvm, region, dir }
}

/// One bank transfer: two 8-byte balances and a 32-byte history record.
fn transfer(inst: &Inst, rng: &mut Rng, accounts: usize, history: &mut usize, mode: CommitMode) {
    let base = inst.region.addr();
    let hist_base = accounts * 8;
    let hist_slots = (inst.region.len() - hist_base) / 32;
    let (a, b) = (rng.below(accounts), rng.below(accounts));
    let mut tx = inst.rvm.begin(RestoreMode::NoRestore).expect("begin");
    let amount = 1 + rng.below(100) as u64;
    // SAFETY: every address lies inside the region, which only this thread
    // touches; each range is declared before it is stored into.
    unsafe {
        let pa = (base + a * 8) as *mut u64;
        let pb = (base + b * 8) as *mut u64;
        tx.set_range(pa as usize, 8).expect("set_range");
        tx.set_range(pb as usize, 8).expect("set_range");
        pa.write(pa.read().wrapping_sub(amount));
        pb.write(pb.read().wrapping_add(amount));
        let h = base + hist_base + (*history % hist_slots) * 32;
        let rec = [a as u64, b as u64, amount, *history as u64];
        tx.set_range(h, 32).expect("set_range");
        std::ptr::copy_nonoverlapping(rec.as_ptr().cast::<u8>(), h as *mut u8, 32);
    }
    *history += 1;
    tx.commit(mode).expect("commit");
}

/// The core benchmark's transaction: 1-4 ranges of 8-64 B, uniform.
fn small_tx(inst: &Inst, rng: &mut Rng, mode: CommitMode) -> usize {
    let base = inst.region.addr();
    let len = inst.region.len();
    let mut tx = inst.rvm.begin(RestoreMode::NoRestore).expect("begin");
    let mut declared = 0;
    for _ in 0..rng.range(1, 4) {
        let l = rng.range(8, 64);
        let off = rng.range(0, len - l);
        // SAFETY: inside the region; only this thread writes it; declared first.
        unsafe {
            tx.set_range(base + off, l).expect("set_range");
            std::ptr::write_bytes((base + off) as *mut u8, rng.next() as u8, l);
        }
        declared += l;
    }
    tx.commit(mode).expect("commit");
    declared
}

fn quiet() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

/// Log bytes per transaction: (bank transfer, core-bench transaction),
/// each with a flush per commit and with no-flush commits (coalesced).
fn log_bytes_per_tx(n: usize) {
    let accounts = 100_000;
    println!("| workload | commit | payload B/tx | log B/tx | target (1.25 × payload + 24) | met |");
    println!("|---|---|---:|---:|---:|---|");
    for (mode, mode_name) in [(CommitMode::Flush, "flush"), (CommitMode::NoFlush, "no-flush")] {
        let n = if mode == CommitMode::Flush { n / 10 } else { n };
        let inst = open("bank", 256 * MIB, 1600 * 4096, quiet());
        let mut rng = Rng::new(7);
        let mut history = 0;
        let before = inst.rvm.stats().log_bytes_written;
        for _ in 0..n {
            transfer(&inst, &mut rng, accounts, &mut history, mode);
        }
        inst.rvm.flush().expect("flush");
        let per = (inst.rvm.stats().log_bytes_written - before) as f64 / n as f64;
        let target = 1.25 * 48.0 + 24.0;
        println!(
            "| bank transfer (2 × 8 B + 32 B) | {mode_name} | 48 | {per:.1} | {target:.0} | {} |",
            if per <= target { "yes" } else { "no" }
        );
        let dir = inst.dir.clone();
        drop(inst);
        let _ = std::fs::remove_dir_all(dir);

        let inst = open("small", 256 * MIB, 64 * MIB, quiet());
        let before = inst.rvm.stats().log_bytes_written;
        let mut declared = 0;
        for _ in 0..n {
            declared += small_tx(&inst, &mut rng, mode);
        }
        inst.rvm.flush().expect("flush");
        let per = (inst.rvm.stats().log_bytes_written - before) as f64 / n as f64;
        let payload = declared as f64 / n as f64;
        let target = 1.25 * payload + 24.0;
        println!(
            "| core bench tx (1-4 ranges of 8-64 B) | {mode_name} | {payload:.1} | {per:.1} | {target:.0} | {} |",
            if per <= target { "yes" } else { "no" }
        );
        let dir = inst.dir.clone();
        drop(inst);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Writes `target` bytes of log of small ranges (coalescing off, as the
/// core benchmark's recovery workload), then times the `Rvm::open` that
/// replays them: (MB of log per second wall, per CPU-second, seconds, log
/// bytes). With `RVM_BENCH_REPLAY_LOG=<dir>`, the log and segment are
/// written once into `<dir>` (if it holds none yet) and every run replays
/// a fresh copy of them: two builds run back to back replay the same bytes.
fn replay_run(target: usize, seed: u64) -> (f64, f64, f64, u64) {
    let mut opts = Options { coalesce: false, truncate_threshold: None, ..Options::default() };
    let shared = std::env::var_os("RVM_BENCH_REPLAY_LOG").map(PathBuf::from);
    let dir = match &shared {
        Some(src) => {
            if !src.join("log").exists() {
                let inst = open("replay-src", target + 96 * MIB, 64 * MIB, opts.clone());
                write_small_log(&inst, target, seed);
                let made = inst.dir.clone();
                drop(inst);
                let _ = std::fs::remove_dir_all(src);
                copy_dir(&made, src);
                // The log names its segment by the path it was made at.
                std::fs::write(src.join("recorded"), made.join("seg").to_string_lossy().as_bytes()).expect("note");
                let _ = std::fs::remove_dir_all(made);
            }
            let dir = bench_dir("replay");
            copy_dir(src, &dir);
            let recorded = std::fs::read_to_string(src.join("recorded")).expect("recorded segment path");
            // A copy is another file: accepted in place of the recorded one.
            opts.accepted_segments = vec![(PathBuf::from(recorded), dir.join("seg"))];
            // The copy is in the page cache, as a just-written log would be;
            // written back first, so that the replay's syncs write only its own.
            let _ = std::process::Command::new("sync").status();
            dir
        }
        None => {
            let inst = open("replay", target + 96 * MIB, 64 * MIB, opts.clone());
            write_small_log(&inst, target, seed);
            let dir = inst.dir.clone();
            drop(inst);
            dir
        }
    };
    if std::env::var_os("RVM_BENCH_KEEP").is_some() {
        // For profiling the recovery alone (not a measured mode).
        let keep = dir.with_extension("kept");
        let _ = std::fs::remove_dir_all(&keep);
        copy_dir(&dir, &keep);
        eprintln!("kept a copy of the log and segment in {}", keep.display());
    }
    let (user, sys) = cpu_split();
    let t = Instant::now();
    let rvm = Rvm::open(dir.join("log"), opts).expect("recover");
    let secs = t.elapsed().as_secs_f64();
    let (user2, sys2) = cpu_split();
    let cpu = (user2 - user + sys2 - sys).max(1e-3);
    let bytes = rvm.recovery_report().log_bytes;
    eprintln!("  replay CPU: user {:.3} s, system {:.3} s", user2 - user, sys2 - sys);
    drop(rvm);
    let _ = std::fs::remove_dir_all(&dir);
    (bytes as f64 / 1e6 / secs, bytes as f64 / 1e6 / cpu, secs, bytes)
}

/// Commits core-bench transactions (no flush) until `target` bytes of log
/// are written, then flushes.
fn write_small_log(inst: &Inst, target: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    while (inst.rvm.stats().log_bytes_written as usize) < target {
        for _ in 0..2048 {
            small_tx(inst, &mut rng, CommitMode::NoFlush);
        }
    }
    inst.rvm.flush().expect("flush");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("copy dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// Closes `inst` (closing applies nothing), times the reopen under the
/// default options and removes the files: (ms, log bytes replayed).
fn timed_reopen(inst: Inst) -> (f64, u64) {
    let dir = inst.dir.clone();
    drop(inst);
    let t = Instant::now();
    let rvm = Rvm::open(dir.join("log"), Options::default()).expect("recover");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let bytes = rvm.recovery_report().log_bytes;
    drop(rvm);
    let _ = std::fs::remove_dir_all(&dir);
    (ms, bytes)
}

/// Restart under the default options after `n` bank transfers (100,000
/// accounts, a flush every 1,000), as [`restart_ms`].
fn restart_bank_ms(n: usize, seed: u64) -> (f64, u64) {
    let inst = open("restart-bank", 256 * MIB, 1600 * 4096, Options::default());
    let mut rng = Rng::new(seed);
    let mut history = 0;
    for i in 0..n {
        let mode = if i % 1000 == 999 { CommitMode::Flush } else { CommitMode::NoFlush };
        transfer(&inst, &mut rng, 100_000, &mut history, mode);
    }
    timed_reopen(inst)
}

/// Restart under the default options: `n` core-bench transactions (a
/// flush every 1,000), the instance closed (closing applies nothing: the
/// log the background reclaim has not applied yet stays for recovery),
/// then the reopen timed: (ms, log bytes replayed).
fn restart_ms(n: usize, seed: u64) -> (f64, u64) {
    let inst = open("restart", 256 * MIB, 64 * MIB, Options::default());
    let mut rng = Rng::new(seed);
    for i in 0..n {
        small_tx(&inst, &mut rng, if i % 1000 == 999 { CommitMode::Flush } else { CommitMode::NoFlush });
    }
    timed_reopen(inst)
}

/// A bank after `n` transfers (100,000 accounts, a flush every 1,000) as a
/// crash leaves it: the files copied while the instance is open (the log
/// durable, its status not updated since the segment was opened) to a
/// backup folder. Returns the bank's folder and the backup's.
fn crashed_bank(n: usize, seed: u64) -> (PathBuf, PathBuf) {
    let inst = open("instant-bank", 256 * MIB, 1600 * 4096, Options::default());
    let mut rng = Rng::new(seed);
    let mut history = 0;
    for i in 0..n {
        let mode = if i % 1000 == 999 || i + 1 == n { CommitMode::Flush } else { CommitMode::NoFlush };
        transfer(&inst, &mut rng, 100_000, &mut history, mode);
    }
    let backup = inst.dir.with_extension("crashed");
    let _ = std::fs::remove_dir_all(&backup);
    copy_dir(&inst.dir, &backup);
    let dir = inst.dir.clone();
    drop(inst);
    (dir, backup)
}

/// Puts the crash image back in place (same files: same identity, owner
/// mark kept) and reopens it: (ms to open + map + read one balance, ms to
/// read all balances, ms until recovery is durable, pages deferred).
fn reopen_bank(dir: &std::path::Path, backup: &std::path::Path, instant: bool) -> (f64, f64, f64, u64) {
    for f in ["log", "seg"] {
        std::fs::copy(backup.join(f), dir.join(f)).expect("restore");
    }
    let opts = Options { instant_recovery: instant, ..Options::default() };
    let t = Instant::now();
    let rvm = Rvm::open(dir.join("log"), opts).expect("reopen");
    let t_open = t.elapsed().as_secs_f64() * 1e3;
    let s = rvm.open_segment(dir.join("seg")).expect("segment");
    let region = rvm.map(&s, MapSpec::new(0, 1600 * 4096)).expect("map");
    let t_map = t.elapsed().as_secs_f64() * 1e3;
    let mut b = [0u8; 8];
    // SAFETY: no transaction runs in the region.
    unsafe { region.read(8 * 4242, &mut b) };
    let first = t.elapsed().as_secs_f64() * 1e3;
    let mut sum = 0u64;
    for a in 0..100_000 {
        // SAFETY: as above.
        unsafe { region.read(a * 8, &mut b) };
        sum = sum.wrapping_add(u64::from_le_bytes(b));
    }
    std::hint::black_box(sum);
    let all = t.elapsed().as_secs_f64() * 1e3;
    rvm.wait_for_recovery().expect("recovery");
    let durable = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("  open {t_open:.2} ms, + segment and map {t_map:.2} ms, + first read {first:.2} ms");
    let pages = rvm.recovery_report().deferred_pages;
    drop(region);
    drop(rvm);
    (first, all, durable, pages)
}

/// Instant restart next to full recovery, on the same crashed bank.
fn instant_part(q: bool, runs: usize) {
    println!("\n## Reopen after 200,000 bank transfers and a crash: instant recovery vs full recovery\n");
    let n = if q { 20_000 } else { 200_000 };
    let mut rows: Vec<[Vec<f64>; 3]> = vec![Default::default(), Default::default()];
    let mut pages = 0;
    for r in 0..runs {
        let (dir, backup) = crashed_bank(n, 170 + r as u64);
        // Alternate which goes first (the page cache is warm for both).
        let order = if r % 2 == 0 { [true, false] } else { [false, true] };
        for instant in order {
            let (f, all, d, p) = reopen_bank(&dir, &backup, instant);
            let row = &mut rows[usize::from(!instant)];
            row[0].push(f);
            row[1].push(all);
            row[2].push(d);
            if instant {
                pages = p;
            }
            eprintln!("run {r} instant {instant}: first read {f:.2} ms, all read {all:.2} ms, durable {d:.2} ms");
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&backup);
    }
    println!("| reopen | to the first read, ms | to all balances read, ms | until durable, ms |");
    println!("|---|---:|---:|---:|");
    for (i, name) in ["instant (`instant_recovery: true`)", "full recovery (default)"].iter().enumerate() {
        let m: Vec<f64> = rows[i].iter().map(|v| median(&mut v.clone())).collect();
        let fmt = |v: &Vec<f64>| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" ");
        println!(
            "| {name} | **{:.2}** ({}) | **{:.2}** ({}) | {:.1} ({}) |",
            m[0],
            fmt(&rows[i][0]),
            m[1],
            fmt(&rows[i][1]),
            m[2],
            fmt(&rows[i][2])
        );
    }
    println!("\n(pages deferred by the instant open: {pages})");
    println!("\n## Instant open by unapplied log size (small ranges, coalescing off)\n");
    println!("| unapplied log | open ms (instant) | to the first read ms | open ms (full recovery) | pages deferred |");
    println!("|---:|---:|---:|---:|---:|");
    // RVM_BENCH_SIZES: the unapplied log sizes in MiB (comma-separated).
    let sizes: Vec<usize> = match std::env::var("RVM_BENCH_SIZES") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) if q => vec![16],
        Err(_) => vec![16, 256, 1024],
    };
    for &mib in &sizes {
        let (mut open_i, mut first_i, mut open_f) = (Vec::new(), Vec::new(), Vec::new());
        let mut pages = 0;
        let mut bytes = 0;
        for r in 0..runs.min(3) {
            let opts = Options { coalesce: false, truncate_threshold: None, ..Options::default() };
            let inst = open("instant-size", mib * MIB + 160 * MIB, 64 * MIB, opts.clone());
            let mut rng = Rng::new(300 + r as u64);
            while (inst.rvm.stats().log_bytes_written as usize) < mib * MIB {
                for _ in 0..2048 {
                    small_tx(&inst, &mut rng, CommitMode::NoFlush);
                }
            }
            inst.rvm.flush().expect("flush");
            let dir = inst.dir.clone();
            drop(inst);
            let copy = dir.with_extension("copy");
            copy_dir(&dir, &copy);
            for instant in [true, false] {
                // The same files each time (identity and owner mark kept).
                for f in ["log", "seg"] {
                    std::fs::copy(copy.join(f), dir.join(f)).expect("restore");
                }
                let d = dir.clone();
                let o = Options { instant_recovery: instant, ..opts.clone() };
                let t = Instant::now();
                let rvm = Rvm::open(d.join("log"), o).expect("reopen");
                let opened = t.elapsed().as_secs_f64() * 1e3;
                if instant {
                    let s = rvm.open_segment(d.join("seg")).expect("segment");
                    let region = rvm.map(&s, MapSpec::new(0, 64 * MIB)).expect("map");
                    let mut b = [0u8; 8];
                    // SAFETY: no transaction runs in the region.
                    unsafe { region.read(12345 * 8, &mut b) };
                    first_i.push(t.elapsed().as_secs_f64() * 1e3);
                    open_i.push(opened);
                    pages = rvm.recovery_report().deferred_pages;
                    bytes = rvm.recovery_report().log_bytes;
                    rvm.wait_for_recovery().expect("recovery");
                    drop(region);
                } else {
                    open_f.push(opened);
                }
                drop(rvm);
            }
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(&copy);
        }
        println!(
            "| {mib} MiB ({:.0} MB of transactions) | **{:.1}** | {:.1} | {:.1} | {pages} |",
            bytes as f64 / 1e6,
            median(&mut open_i),
            median(&mut first_i),
            median(&mut open_f)
        );
    }
}

fn main() {
    let q = quick();
    let runs = if q { 1 } else { 5 };
    println!("# log size and replay ({})\n", if q { "QUICK: figures not meaningful" } else { "full run" });
    // RVM_BENCH_ONLY: the parts to run (1 log size, 2 replay, 3 restart,
    // 4 instant restart).
    let only = std::env::var("RVM_BENCH_ONLY").unwrap_or_default();
    let want = |p: char| only.is_empty() || only.contains(p);
    if want('1') {
        println!("## Log bytes per transaction\n");
        log_bytes_per_tx(if q { 20_000 } else { 200_000 });
    }
    if want('4') && !only.is_empty() && !only.contains('2') && !only.contains('3') {
        return instant_part(q, runs);
    }
    if !want('2') {
        return restart_part(q, runs, want('3'));
    }
    println!("\n## Replay of small ranges (1-4 ranges of 8-64 B per tx, coalescing off)\n");
    let target = if q { 16 * MIB } else { 256 * MIB };
    let (mut wall, mut cpu, mut secs) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let (w, c, s, bytes) = replay_run(target, 50 + r as u64);
        eprintln!("replay run {r}: {:.0} MB of log, {s:.3} s, {w:.0} MB/s, {c:.0} MB/CPU-s", bytes as f64 / 1e6);
        wall.push(w);
        cpu.push(c);
        secs.push(s);
    }
    println!("| measure | median | runs |");
    println!("|---|---:|---|");
    println!(
        "| MB of log per second (wall) | {:.0} | {:?} |",
        median(&mut wall.clone()),
        wall.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
    println!(
        "| MB of log per CPU-second | {:.0} | {:?} |",
        median(&mut cpu.clone()),
        cpu.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
    println!("| seconds | {:.3} | {:?} |", median(&mut secs.clone()), secs);
    restart_part(q, runs, want('3'));
    if want('4') {
        instant_part(q, runs);
    }
}

fn restart_part(q: bool, runs: usize, run: bool) {
    if !run {
        return;
    }
    println!("\n## Restart with the default options after 200,000 bank transfers (a flush every 1,000)\n");
    let (mut ms, mut logs) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let (m, b) = restart_bank_ms(if q { 20_000 } else { 200_000 }, 70 + r as u64);
        ms.push(m);
        logs.push(b);
    }
    println!("| measure | median | runs |");
    println!("|---|---:|---|");
    println!(
        "| reopen (recovery) ms | {:.1} | {:?} |",
        median(&mut ms.clone()),
        ms.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    println!("| log bytes replayed | {} | {:?} |", logs[logs.len() / 2], logs);
    println!("\n## Restart with the default options after 1,000,000 commits (a flush every 1,000)\n");
    let mut ms = Vec::new();
    let mut logs = Vec::new();
    for r in 0..runs {
        let (m, b) = restart_ms(if q { 100_000 } else { 1_000_000 }, 90 + r as u64);
        ms.push(m);
        logs.push(b);
    }
    println!("| measure | median | runs |");
    println!("|---|---:|---|");
    println!(
        "| reopen (recovery) ms | {:.1} | {:?} |",
        median(&mut ms.clone()),
        ms.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    println!("| log bytes replayed | {} | {:?} |", logs[logs.len() / 2], logs);
}
