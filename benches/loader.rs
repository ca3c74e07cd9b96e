//! Loader benchmark: time to load a 1 GiB segment copy-on-demand versus
//! copy-on-map, side by side in one run.
//!
//! Two segments of one 1 GiB region each (one per copy mode; sparse files
//! unless `RVM_BENCH_DENSE=1`, which writes real data into them first) are
//! loaded and unloaded alternately, `RVM_BENCH_ROUNDS` times (default 7);
//! the median, minimum and maximum load times are printed. A third row
//! loads copy-on-demand and then touches every page, to show where the cost
//! of on-demand loading goes. The page cache is warm (the files were just
//! written or are sparse), so copy-on-map shows memory bandwidth rather
//! than disk bandwidth; a cold cache makes it slower, not on-demand.
//!
//! Run with `cargo bench --bench loader`. `RVM_BENCH_DIR` picks the folder
//! (default: a temporary one under the system's temp folder);
//! `RVM_BENCH_SIZE_MIB` the region size (default 1024).

use rvm::loader::{create_segment, load_segment, LoadMap, RegionSpec};
use rvm::{create_log, CopyMode, Options, Rvm};
use std::io::Write;
use std::os::unix::fs::FileExt;
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo test --benches` runs bench binaries with `--bench`-less args;
    // only run the measurement when asked to bench (or with no arguments).
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return Ok(());
    }
    let size = env_u64("RVM_BENCH_SIZE_MIB", 1024) << 20;
    let rounds = env_u64("RVM_BENCH_ROUNDS", 7).max(1) as usize;
    let dense = std::env::var("RVM_BENCH_DENSE").is_ok_and(|v| v == "1");
    let tmp = match std::env::var_os("RVM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let log = tmp.path().join("log");
    create_log(&log, 16 << 20)?;
    let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() })?;
    let ps = rvm::page_size() as u64;
    let modes = [
        ("copy-on-demand", CopyMode::OnDemand, 0x5b00_0000_0000u64),
        ("copy-on-map", CopyMode::OnMap, 0x5b40_0000_0000),
    ];
    let mut paths = Vec::new();
    for (name, copy, base) in modes {
        let map = LoadMap::new().region(RegionSpec::new("data", ps, size, base).copy(copy));
        let path = tmp.path().join(name);
        create_segment(&rvm, &path, ps + size, &map)?;
        if dense {
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
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    for _ in 0..rounds {
        for (i, path) in paths.iter().enumerate() {
            let t = Instant::now();
            let mut seg = load_segment(&rvm, path)?;
            times[i].push(t.elapsed());
            seg.unload()?;
        }
        // On demand, then fault in every page (one read per page).
        let t = Instant::now();
        let mut seg = load_segment(&rvm, &paths[0])?;
        let region = seg.region("data").ok_or("region `data` missing")?;
        let mut sum = 0u8;
        let mut b = [0u8; 1];
        let mut off = 0;
        while off < region.len() {
            region.read(off, &mut b).ok_or("read outside region")?;
            sum = sum.wrapping_add(b[0]);
            off += ps as usize;
        }
        std::hint::black_box(sum);
        times[2].push(t.elapsed());
        seg.unload()?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "loader: load a {} MiB segment ({} file, warm page cache), {rounds} rounds, page {ps} B",
        size >> 20,
        if dense { "dense" } else { "sparse" }
    )?;
    writeln!(out, "{:<40} {:>12} {:>12} {:>12} {:>10}", "mode", "median ms", "min ms", "max ms", "GiB/s")?;
    let labels = ["copy-on-demand", "copy-on-map", "copy-on-demand + touch every page"];
    for (label, t) in labels.iter().zip(times) {
        let (med, min, max) = stats(t);
        let gibs = (size as f64 / (1u64 << 30) as f64) / med.as_secs_f64();
        writeln!(out, "{label:<40} {:>12.3} {:>12.3} {:>12.3} {gibs:>10.2}", ms(med), ms(min), ms(max))?;
    }
    Ok(())
}
