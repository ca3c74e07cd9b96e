//! A long randomized soak of the heap, for `RVM_HEAP_SOAK` seconds:
//!
//! - random programs of the crash model (`common::Engine`), 200 steps each,
//!   with crashes of every kind, each checked after every step and reload;
//! - rounds of 2 to 6 threads allocating, freeing and aborting concurrently
//!   (background truncation on), the disk crashed under them at a random
//!   moment, then the heap reloaded and checked against every thread's
//!   history.
//!
//! `RVM_HEAP_SOAK_SEED` fixes the first seed (it is printed, and every
//! failure names its seed: a model program replays exactly from it; a
//! thread round's interleaving and crash moment vary from run to run). Without `RVM_HEAP_SOAK` one
//! short round of each runs, so the soak's code stays exercised by the
//! default suite.

mod common;

use common::{random_program, run_workers, verify_threads, Ctx, Disk, Engine, Rng, HEAP};
use rvm_core::testing::CrashMode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One crash-model program of `steps` steps from `seed`.
fn model_round(seed: u64, steps: usize) -> Result<(), String> {
    let mut rng = Rng(seed);
    let program = random_program(&mut rng, steps, 3);
    let mut e = Engine::new()?;
    e.run(&program)
}

/// One round of threads with a crash under them.
fn threads_round(seed: u64, max_iters: u64) -> Result<(), String> {
    let mut rng = Rng(seed);
    let threads = 2 + rng.below(5) as usize;
    let disk = Disk::new(HEAP, true);
    let (rvm, heap) = disk.open(true)?;
    let stop = AtomicBool::new(false);
    let crash_after = Duration::from_millis(20 + rng.below(400));
    let mode = match rng.below(3) {
        0 => CrashMode::LoseUnsynced,
        1 => CrashMode::KeepRandomSubset { seed: rng.next(), tear_last: false },
        _ => CrashMode::KeepRandomSubset { seed: rng.next(), tear_last: true },
    };
    let logs = run_workers(&heap, threads, max_iters, rng.next(), &stop, || {
        std::thread::sleep(crash_after);
        disk.disk.crash(mode);
        stop.store(true, Ordering::Relaxed);
    });
    if let Some(f) = logs.iter().find_map(|l| l.fatal.clone()) {
        return Err(f);
    }
    drop(heap);
    drop(rvm);
    let (_rvm, heap) = disk.open(false).ctx("reload after the crash")?;
    verify_threads(&heap, &logs, false)?;
    Ok(())
}

#[test]
fn soak() {
    let secs: Option<u64> = std::env::var("RVM_HEAP_SOAK").ok().and_then(|s| s.parse().ok());
    let mut seed: u64 = std::env::var("RVM_HEAP_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let Some(secs) = secs else {
        // The short round of the default suite: fixed seeds.
        model_round(0x50a4, 60).unwrap_or_else(|e| panic!("model, seed 0x50a4: {e}"));
        threads_round(0x50a5, 200).unwrap_or_else(|e| panic!("threads, seed 0x50a5: {e}"));
        return;
    };
    eprintln!("heap soak for {secs} s from seed {seed}");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut models, mut rounds) = (0u64, 0u64);
    while Instant::now() < deadline {
        model_round(seed, 200).unwrap_or_else(|e| panic!("model, seed {seed} (RVM_HEAP_SOAK_SEED={seed}): {e}"));
        models += 1;
        seed = seed.wrapping_add(1);
        threads_round(seed, 100_000)
            .unwrap_or_else(|e| panic!("threads, seed {seed} (RVM_HEAP_SOAK_SEED={seed}): {e}"));
        rounds += 1;
        seed = seed.wrapping_add(1);
    }
    eprintln!("heap soak: {models} model programs and {rounds} thread rounds passed");
}
