//! Loader benchmark: time to load a 1 GiB segment copy-on-demand versus
//! copy-on-map, side by side in one run, with a warm and a cold page cache.
//!
//! Workload: segments of one region each, one per copy mode, whose region
//! holds `RVM_BENCH_SIZE_MIB` (default 1024) MiB of real (non-zero) data,
//! written and synced before timing (`RVM_BENCH_SPARSE=1` leaves the files
//! sparse instead). Each round times, for each copy mode, `load_segment`
//! alone (the regions are unloaded between loads), and "copy-on-demand +
//! touch": loading on demand and then reading one byte of every page, to
//! show where the cost of on-demand loading goes. Every row runs twice per
//! round: with the segment's pages in the page cache (warm), and after
//! dropping exactly that file's pages from it with
//! `posix_fadvise(POSIX_FADV_DONTNEED)` (cold: the data comes from the
//! disk). A last row loads a sparse `RVM_BENCH_BIG_GIB` (default 16) GiB
//! segment on demand, to show that the load time does not grow with size.
//! `RVM_BENCH_ROUNDS` rounds (default 7); median, minimum and maximum.
//!
//! Run with `cargo bench --bench loader`. `RVM_BENCH_DIR` picks the folder
//! (default: a temporary one under the system's temp folder; it needs about
//! twice the region size of free disk space).

use rvm::loader::{create_segment, load_segment, LoadMap, RegionSpec};
use rvm::{create_log, CopyMode, Options, Rvm};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Drops the file's pages from the page cache (they are clean: the file was
/// synced), so the next read comes from the disk.
fn drop_cache(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

/// Loads the segment, optionally reads a byte of every page, unloads it;
/// returns the time until the load (and the reads) returned.
fn timed_load(rvm: &Rvm, path: &Path, touch: bool) -> Result<Duration, Box<dyn std::error::Error>> {
    let ps = rvm::page_size();
    let t = Instant::now();
    let mut seg = load_segment(rvm, path)?;
    if touch {
        let region = seg.region("data").ok_or("region `data` missing")?;
        let mut sum = 0u8;
        let mut b = [0u8; 1];
        for off in (0..region.len()).step_by(ps) {
            // SAFETY: this program is single-threaded: nothing stores into the region while it is read.
            unsafe { region.read(off, &mut b) }.ok_or("read outside the region")?;
            sum = sum.wrapping_add(b[0]);
        }
        std::hint::black_box(sum);
    }
    let elapsed = t.elapsed();
    seg.unload()?;
    Ok(elapsed)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo test --benches` runs bench binaries with `--test`; only measure
    // when asked to bench (or run with no arguments).
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return Ok(());
    }
    let size = env_u64("RVM_BENCH_SIZE_MIB", 1024) << 20;
    let big = env_u64("RVM_BENCH_BIG_GIB", 16) << 30;
    let rounds = env_u64("RVM_BENCH_ROUNDS", 7).max(1) as usize;
    let sparse = std::env::var("RVM_BENCH_SPARSE").is_ok_and(|v| v == "1");
    let tmp = match std::env::var_os("RVM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let log = tmp.path().join("log");
    create_log(&log, 16 << 20)?;
    // Sparse segments (the largest is 16 GiB): the bench fills what it reads.
    let rvm =
        Rvm::open(&log, Options { truncate_threshold: None, reserve_segment_space: false, ..Options::default() })?;
    let ps = rvm::page_size() as u64;
    let modes = [("on-demand", CopyMode::OnDemand, 0x5b00_0000_0000u64), ("on-map", CopyMode::OnMap, 0x5b40_0000_0000)];
    let mut paths = Vec::new();
    for (name, copy, base) in modes {
        let map = LoadMap::new().region(RegionSpec::new("data", ps, size, base).copy(copy));
        let path = tmp.path().join(name);
        create_segment(&rvm, &path, ps + size, &map)?;
        if !sparse {
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            let chunk: Vec<u8> = (0..8usize << 20).map(|i| (i * 31 + 7) as u8).collect();
            let mut off = 0;
            while off < size {
                let n = chunk.len().min((size - off) as usize);
                f.write_all_at(&chunk[..n], ps + off)?;
                off += n as u64;
            }
            f.sync_all()?;
        }
        paths.push(path);
    }
    let big_path = tmp.path().join("big-on-demand");
    let big_map = LoadMap::new().region(RegionSpec::new("data", ps, big, 0x5c00_0000_0000));
    create_segment(&rvm, &big_path, ps + big, &big_map)?;

    // Rows: (label, segment, touch every page, cold cache).
    let rows: Vec<(String, &Path, bool, bool)> = [false, true]
        .into_iter()
        .flat_map(|cold| {
            let cache = if cold { "cold" } else { "warm" };
            [
                (format!("copy-on-demand, {cache}"), paths[0].as_path(), false, cold),
                (format!("copy-on-map, {cache}"), paths[1].as_path(), false, cold),
                (format!("copy-on-demand + touch every page, {cache}"), paths[0].as_path(), true, cold),
            ]
        })
        .chain([(format!("copy-on-demand, {} GiB sparse", big >> 30), big_path.as_path(), false, false)])
        .collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
    for _ in 0..rounds {
        for (i, (_, path, touch, cold)) in rows.iter().enumerate() {
            if *cold {
                drop_cache(path)?;
            }
            times[i].push(timed_load(&rvm, path, *touch)?);
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "loader: load a {} MiB segment ({} file), {rounds} rounds, page {ps} B",
        size >> 20,
        if sparse { "sparse" } else { "dense" }
    )?;
    writeln!(out, "{:<46} {:>11} {:>11} {:>11} {:>9}", "mode", "median ms", "min ms", "max ms", "GiB/s")?;
    for ((label, path, touch, _), t) in rows.iter().zip(times) {
        let (med, min, max) = stats(t);
        // A rate only where the row reads the data (copy-on-map, or touch).
        let gibs = if *touch || *path == paths[1].as_path() {
            format!("{:.2}", (size as f64 / (1u64 << 30) as f64) / med.as_secs_f64())
        } else {
            "-".to_string()
        };
        writeln!(out, "{label:<46} {:>11.3} {:>11.3} {:>11.3} {gibs:>9}", ms(med), ms(min), ms(max))?;
    }
    Ok(())
}
