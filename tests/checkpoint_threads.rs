//! The generation checkpoint with several threads committing: the
//! background checkpointer (and explicit checkpoints) run while threads
//! commit in both modes, abort (leaving garbage behind in no-restore mode),
//! and a crash of the simulated disk hits at a random moment. After
//! recovery every slot is whole (never part of a transaction, never an
//! uncommitted byte) and holds at least the last flush-acknowledged value.
//!
//! `RVM_THREAD_ROUNDS=N` runs more rounds (default 4).

use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const THREADS: usize = 4;
const PAGES: usize = 32;
/// Words per slot: all equal in every committed state.
const WORDS: usize = 8;
const SLOT: usize = WORDS * 8;

fn rounds() -> u64 {
    std::env::var("RVM_THREAD_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4)
}

/// Thread `t` owns two slots on different pages, updated together.
fn slots(t: usize) -> [usize; 2] {
    let ps = page_size();
    [(t * 3 % PAGES) * ps + t * SLOT, ((t * 3 + PAGES / 2) % PAGES) * ps + 512 + t * SLOT]
}

fn value(t: usize, n: u64) -> u64 {
    ((t as u64) << 56) | n
}

fn read_slot(img: &[u8], at: usize) -> [u64; WORDS] {
    std::array::from_fn(|i| u64::from_le_bytes(img[at + i * 8..at + i * 8 + 8].try_into().unwrap()))
}

struct Shared {
    /// Per thread: the highest counter acknowledged by a flush commit.
    acked: [AtomicU64; THREADS],
    /// Per thread: the highest counter committed (any mode).
    committed: [AtomicU64; THREADS],
    stop: AtomicBool,
}

/// One worker: transactions on its two slots until stopped or the instance
/// fails (after the crash).
fn worker(rvm: &Rvm, base: usize, t: usize, seed: u64, shared: &Shared) {
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut n = shared.committed[t].load(Ordering::Relaxed);
    while !shared.stop.load(Ordering::Relaxed) {
        let r = next();
        let mode = if r & 1 == 0 { RestoreMode::Restore } else { RestoreMode::NoRestore };
        let Ok(mut tx) = rvm.begin(mode) else { return };
        n += 1;
        let v = value(t, n);
        for at in slots(t) {
            // SAFETY: the slots are this thread's alone.
            if unsafe { tx.set_range(base + at, SLOT) }.is_err() {
                return;
            }
            // Garbage first, then the value, word by word: a half-done slot
            // must never reach the segment.
            for i in 0..WORDS {
                let p = (base + at + i * 8) as *mut u64;
                // SAFETY: inside the declared range, owned by this thread.
                unsafe { p.write_volatile(!v) };
            }
            if r % 13 == 0 {
                let _ = rvm.checkpoint_step(2);
            }
            for i in 0..WORDS {
                let p = (base + at + i * 8) as *mut u64;
                // SAFETY: as above.
                unsafe { p.write_volatile(v) };
            }
        }
        // An upper bound: a commit that fails after entering the commit
        // order may still be durable.
        shared.committed[t].fetch_max(n, Ordering::Relaxed);
        match r % 16 {
            0 => {
                tx.abort();
                n -= 1;
                if mode == RestoreMode::NoRestore {
                    // Memory keeps the aborted value; rewrite it committed.
                    continue;
                }
            }
            1..=3 => {
                if tx.commit(CommitMode::Flush).is_err() {
                    return;
                }
                shared.acked[t].store(n, Ordering::Relaxed);
            }
            4 => {
                if tx.commit(CommitMode::NoFlush).is_err() {
                    return;
                }
                if rvm.checkpoint().is_err() {
                    return;
                }
                // A checkpoint makes every earlier commit durable.
                shared.acked[t].store(n, Ordering::Relaxed);
            }
            _ => {
                if tx.commit(CommitMode::NoFlush).is_err() {
                    return;
                }
            }
        }
    }
}

fn opts() -> Options {
    Options {
        truncate_threshold: Some(0.25),
        reclaim: Reclaim::Checkpoint,
        checkpoint_copy_limit: 4,
        pending_limit: 16 << 10,
        ..Options::default()
    }
}

/// Checks every thread's slots in `img`; returns per-thread counters.
fn check_image(img: &[u8], shared: &Shared, what: &str) -> [u64; THREADS] {
    std::array::from_fn(|t| {
        let [a, b] = slots(t);
        let (wa, wb) = (read_slot(img, a), read_slot(img, b));
        assert!(wa.iter().all(|&w| w == wa[0]), "{what}: thread {t} slot A is torn: {wa:x?}");
        assert_eq!(wa, wb, "{what}: thread {t}: the two slots of one transaction differ");
        let n = if wa[0] == 0 {
            0
        } else {
            assert_eq!(wa[0] >> 56, t as u64, "{what}: thread {t}: foreign value {:x}", wa[0]);
            wa[0] & ((1 << 56) - 1)
        };
        let acked = shared.acked[t].load(Ordering::Relaxed);
        let committed = shared.committed[t].load(Ordering::Relaxed);
        assert!(n >= acked, "{what}: thread {t}: value {n} is older than the acknowledged {acked}");
        assert!(n <= committed, "{what}: thread {t}: value {n} was never committed (last {committed})");
        n
    })
}

fn run_round(round: u64, crash: Option<CrashMode>) {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let len = PAGES * page_size();
    create_log_with(vfs.as_ref(), Path::new("log"), rvm::log::format::AREA_OFFSET + (256 << 10)).unwrap();
    let shared = Shared { acked: Default::default(), committed: Default::default(), stop: AtomicBool::new(false) };
    {
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts()).unwrap();
        let seg = rvm.create_segment("seg", len as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
        let base = region.addr();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (rvm, shared) = (&rvm, &shared);
                s.spawn(move || worker(rvm, base, t, round * 1000 + t as u64 + 1, shared));
            }
            std::thread::sleep(std::time::Duration::from_millis(150 + round * 37 % 200));
            match crash {
                Some(mode) => disk.crash(mode),
                None => shared.stop.store(true, Ordering::Relaxed),
            }
            if crash.is_some() {
                // Workers stop at their next failing call; make sure they do.
                std::thread::sleep(std::time::Duration::from_millis(20));
                shared.stop.store(true, Ordering::Relaxed);
            }
        });
        let stats = rvm.stats();
        assert!(stats.committed > 0, "round {round}: nothing committed");
        if crash.is_none() {
            // Quiet now: a last checkpoint puts everything in the segment.
            rvm.checkpoint().unwrap();
            let mut mem = vec![0u8; len];
            // SAFETY: nothing stores into the region while the test reads it.
            unsafe { region.read(0, &mut mem) }.unwrap();
            let seg_img = disk.durable_image("seg").unwrap();
            check_image(&mem, &shared, "memory");
            assert!(seg_img == mem, "round {round}: segment differs from memory after the last checkpoint");
            let stats = rvm.stats();
            assert!(stats.checkpoints > 0, "round {round}: no checkpoint ran: {stats:?}");
        }
    }
    // Reopen (recovery) and check.
    let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts()).unwrap();
    let seg = rvm.open_segment("seg").unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
    let mut img = vec![0u8; len];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(0, &mut img) }.unwrap();
    check_image(&img, &shared, &format!("round {round} after recovery ({crash:?})"));
}

#[test]
fn threads_commit_while_checkpoints_run() {
    for round in 0..rounds() {
        run_round(round, None);
    }
}

#[test]
fn threads_crash_while_checkpoints_run() {
    for round in 0..rounds() {
        let mode = match round % 3 {
            0 => CrashMode::LoseUnsynced,
            1 => CrashMode::KeepRandomSubset { seed: round, tear_last: true },
            _ => CrashMode::KeepRandomSubset { seed: round * 7 + 1, tear_last: false },
        };
        run_round(round, Some(mode));
    }
}

/// A region unmapped with dirty pages (its memory, the checkpoint's source,
/// is gone): the next checkpoint replays the log instead, so the commits
/// survive the log being reclaimed and a crash.
#[test]
fn checkpoint_after_unmapping_a_dirty_region_keeps_its_commits() {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new("log"), 1 << 20).unwrap();
    let opts = Options { truncate_threshold: None, ..Options::default() };
    let ps = page_size();
    {
        let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts.clone()).unwrap();
        let seg = rvm.create_segment("seg", 4 * ps as u64).unwrap();
        let a = rvm.map(&seg, MapSpec::new(0, 2 * ps)).unwrap();
        let b = rvm.map(&seg, MapSpec::new(2 * ps as u64, 2 * ps)).unwrap();
        for (r, text) in [(&a, b"in a"), (&b, b"in b")] {
            let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
            // SAFETY: single-threaded; inside the region.
            unsafe { tx.modify_bytes(r.addr() + 10, text).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
        }
        rvm.unmap(a).unwrap();
        rvm.checkpoint().unwrap();
        let q = rvm.query();
        assert_eq!(q.log_used, 0, "{q:?}");
        let img = disk.durable_image("seg").unwrap();
        assert_eq!(&img[10..14], b"in a");
        assert_eq!(&img[2 * ps + 10..2 * ps + 14], b"in b");
        disk.crash(CrashMode::LoseUnsynced);
    }
    let rvm = Rvm::open_with(vfs.clone(), Path::new("log"), opts).unwrap();
    let seg = rvm.open_segment("seg").unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 4 * ps)).unwrap();
    let mut buf = [0u8; 4];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(10, &mut buf) }.unwrap();
    assert_eq!(&buf, b"in a");
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(2 * ps + 10, &mut buf) }.unwrap();
    assert_eq!(&buf, b"in b");
}

/// An instance with `pages` pages, all dirty, and the given sweep rate.
fn dirty_instance(disk: &SimDisk, pages: usize, rate: Option<u64>) -> (Rvm, Region) {
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new("log"), 4 << 20).unwrap();
    let opts = Options { truncate_threshold: None, checkpoint_rate: rate, ..Options::default() };
    let rvm = Rvm::open_with(vfs, Path::new("log"), opts).unwrap();
    let seg = rvm.create_segment("seg", (pages * page_size()) as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, pages * page_size())).unwrap();
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    for p in 0..pages {
        // SAFETY: single-threaded; inside the region.
        unsafe { tx.modify_bytes(region.addr() + p * page_size(), &[(p % 251) as u8 + 1; 8]).unwrap() };
    }
    tx.commit(CommitMode::NoFlush).unwrap();
    (rvm, region)
}

/// `Options::checkpoint_rate` paces a sweep: 1 MiB of dirty pages at
/// 4 MiB/s takes at least a quarter second (a lower bound: sleeping
/// makes it true on any machine).
#[test]
fn a_sweep_keeps_to_its_rate() {
    let pages = (1 << 20) / page_size();
    let (rvm, _region) = dirty_instance(&SimDisk::new(), pages, Some(4 << 20));
    let t0 = std::time::Instant::now();
    let report = rvm.checkpoint().unwrap();
    assert_eq!(report.pages as usize, pages);
    let took = t0.elapsed();
    assert!(took >= std::time::Duration::from_millis(240), "a paced 1 MiB sweep at 4 MiB/s took {took:?}");
}

/// A paced sweep goes at full speed once something waits for it: here a
/// log-replay truncation started while the sweep crawls at 64 KiB/s
/// (paced, 4 MiB would take a minute).
#[test]
fn a_waiting_truncation_lifts_the_pace() {
    let pages = (4 << 20) / page_size();
    let disk = SimDisk::new();
    let (rvm, region) = dirty_instance(&disk, pages, Some(64 << 10));
    assert!(rvm.checkpoint_start().unwrap());
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        let sweeper = s.spawn(|| rvm.checkpoint_finish().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        rvm.truncate().unwrap();
        sweeper.join().unwrap();
    });
    let took = t0.elapsed();
    assert!(took < std::time::Duration::from_secs(30), "the truncation did not hurry the sweep ({took:?})");
    assert!(rvm.query().quiescent);
    // SAFETY: no transaction is open; the region is mapped.
    let mem = unsafe { std::slice::from_raw_parts(region.addr() as *const u8, pages * page_size()) };
    assert_eq!(disk.durable_image("seg").unwrap(), mem, "the segment holds every commit");
}
