//! Thread tests: several threads committing at once on one region, with
//! crashes of the simulated disk while they run, and group commit.
//!
//! * `threads_crash_*`: 3 or 4 threads share one region of a segment on the
//!   simulated disk ([`SimDisk`]), on a small log (128 KiB of records, so it
//!   wraps many times per round) with background reclaim on (the
//!   generation checkpoint in some rounds, log replay in others; writers
//!   that find the log full replay it in both). Each thread
//!   owns a **record**: a head (counter `v` and a hash of it) in a sector
//!   every thread's head shares, and a 1 KiB payload derived from `v` that
//!   crosses a page boundary. A transaction moves the record from `v` to
//!   `v + 1`, declaring it in one of several shapes (`modify_bytes`,
//!   `set_range` then plain stores, overlapping and touching declarations,
//!   a head declared twice with different bytes), in either restore mode,
//!   committed with or without flush. Aborted transactions (explicit or by
//!   drop, both restore modes) store a value with the `ABORTED` bit, which
//!   must never be seen again; a restore-mode abort must bring back the old
//!   bytes exactly. Threads also call `flush()` and `truncate()`.
//!
//!   Some transactions also update a **pair** shared by all threads, under a
//!   mutex held until the commit returns (the application's locking, as in
//!   RVM): two halves in different pages, each holding the pair counter `c`,
//!   the thread and its new `v`, and a hash. So one transaction changes the
//!   thread's record and both halves atomically.
//!
//!   The main thread waits until a random number of commits have returned,
//!   crashes the disk (losing every unsynced write, or keeping a random
//!   subset of them with or without a torn last sector) while the threads
//!   are still committing, stops them, reopens (recovery) and checks the
//!   prefix rule exactly:
//!   - every record and both pair halves are internally consistent (never a
//!     part of a transaction), no aborted value is visible, and every byte
//!     outside them is zero;
//!   - each record holds a value at least its last acknowledged flush (a
//!     flush commit, `flush()` or `truncate()` that returned `Ok`), at least
//!     the value recovered in the previous round, and at most the last value
//!     handed to `commit` (nothing uncommitted); likewise the pair;
//!   - the pair and the records agree on one prefix of the commit order:
//!     the thread the pair names holds at least the `v` the pair names;
//!     every pair transaction with a counter up to the recovered one is
//!     reflected in its thread's record; and a record that reflects a pair
//!     transaction implies the pair's counter reached it.
//!
//!   Each test runs several rounds on the same disk (each round continues
//!   from the recovered state), then a round without a crash, closed cleanly,
//!   where every commit must survive exactly.
//! * `group_commit_*`: with four threads doing flush commits, the log is
//!   synced fewer times than there are flush commits. One test holds the
//!   first sync until all four commits are in, so the count is exact (at
//!   most two syncs); the other runs free on real files.
//!
//! Nothing here asserts on time. `RVM_THREAD_ROUNDS=N` runs `N` crash
//! rounds per test instead of the default; `RVM_THREAD_SEED=S` fixes the
//! random choices (the seed in use is printed; thread interleavings still
//! vary from run to run).

use rvm::log::format::{AREA_OFFSET, MIN_AREA};
use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

const LOG: &str = "log";
const SEG: &str = "seg";
/// Records area: 128 KiB, so a round's commits wrap the log several times.
const LOG_SIZE: u64 = AREA_OFFSET + 2 * MIN_AREA;
const PAGES: usize = 8;
const MAX_THREADS: usize = 4;
const PAYLOAD: usize = 1024;
const HEAD: usize = 16;
const PAIR: usize = 32;
/// Set in the counter of a value that a transaction stored and then aborted.
const ABORTED: u64 = 1 << 63;
/// Crash rounds per test when `RVM_THREAD_ROUNDS` is not set.
const DEFAULT_ROUNDS: u32 = 16;
/// A round that has not reached its crash point after this long is stuck.
const STUCK: Duration = Duration::from_secs(120);

fn opts(coalesce: bool, reclaim: Reclaim) -> Options {
    Options { coalesce, pending_limit: 4096, truncate_threshold: Some(0.25), reclaim, ..Options::default() }
}

fn rounds() -> u32 {
    std::env::var("RVM_THREAD_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_ROUNDS)
}

fn seed() -> u64 {
    let seed = std::env::var("RVM_THREAD_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    eprintln!("threads: seed {seed} (set RVM_THREAD_SEED={seed} to repeat the random choices)");
    seed
}

// ---------------------------------------------------------------------------
// Layout and record contents
// ---------------------------------------------------------------------------

fn region_len() -> usize {
    PAGES * page_size()
}

/// Every thread's head lies in the first sector: torn sectors hit them all.
fn head_at(t: usize) -> usize {
    HEAD * t
}

/// Crosses the boundary between pages `t` and `t + 1` and several sectors.
fn payload_at(t: usize) -> usize {
    (t + 1) * page_size() - 300
}

/// The pair's halves: one across the first sector boundary, one across the
/// boundary of the last two pages.
fn pair_at() -> [usize; 2] {
    [500, 7 * page_size() - 10]
}

/// Byte ranges the workload uses; everything else must stay zero.
fn used_ranges() -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> =
        (0..MAX_THREADS).flat_map(|t| [(head_at(t), HEAD), (payload_at(t), PAYLOAD)]).collect();
    v.extend(pair_at().map(|a| (a, PAIR)));
    v
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn head_hash(t: usize, v: u64) -> u64 {
    mix(mix(t as u64 ^ 0x4845_4144) ^ v)
}

fn head_bytes(t: usize, v: u64) -> [u8; HEAD] {
    let mut b = [0u8; HEAD];
    b[..8].copy_from_slice(&v.to_le_bytes());
    b[8..].copy_from_slice(&head_hash(t, v).to_le_bytes());
    b
}

fn payload(t: usize, v: u64) -> Vec<u8> {
    let k = mix((t as u64) << 56 ^ v);
    (0..PAYLOAD / 8).flat_map(|i| mix(k ^ i as u64).to_le_bytes()).collect()
}

/// A pair half: counter `c`, thread `t`, its value `v`, hash.
fn pair_bytes(c: u64, t: usize, v: u64) -> [u8; PAIR] {
    let mut b = [0u8; PAIR];
    b[..8].copy_from_slice(&c.to_le_bytes());
    b[8..16].copy_from_slice(&(t as u64).to_le_bytes());
    b[16..24].copy_from_slice(&v.to_le_bytes());
    b[24..].copy_from_slice(&mix(mix(c) ^ mix(t as u64 + 7) ^ v).to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Thread `t`'s value in `img`, if its record is whole.
fn parse_record(img: &[u8], t: usize) -> Result<u64, String> {
    let h = &img[head_at(t)..head_at(t) + HEAD];
    let v = u64_at(h, 0);
    if h != head_bytes(t, v) {
        return Err(format!("thread {t}: head {h:02x?} is not a valid head (torn or partial)"));
    }
    if img[payload_at(t)..payload_at(t) + PAYLOAD] != payload(t, v)[..] {
        let want = payload(t, v);
        let got = &img[payload_at(t)..payload_at(t) + PAYLOAD];
        let first = (0..PAYLOAD).find(|&i| want[i] != got[i]).unwrap_or(0);
        return Err(format!(
            "thread {t}: the head says {v:#x} but the payload differs from byte {first} on \
             (part of a transaction)"
        ));
    }
    if v & ABORTED != 0 {
        return Err(format!("thread {t}: value {:#x} of an aborted transaction is visible", v & !ABORTED));
    }
    Ok(v)
}

/// The pair (c, t, v) in `img`, if both halves are whole and agree.
fn parse_pair(img: &[u8]) -> Result<(u64, usize, u64), String> {
    let [a, b] = pair_at().map(|at| &img[at..at + PAIR]);
    if a != b {
        return Err(format!("pair halves differ: {a:02x?} vs {b:02x?} (part of a transaction)"));
    }
    let (c, t, v) = (u64_at(a, 0), u64_at(a, 8) as usize, u64_at(a, 16));
    if t >= MAX_THREADS || a != pair_bytes(c, t, v) {
        return Err(format!("pair {a:02x?} is not a valid pair (torn or partial)"));
    }
    Ok((c, t, v))
}

// ---------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// Declares and stores thread `t`'s record `v` in one of several shapes.
///
/// # Safety
///
/// The record's bytes belong to the calling thread (it alone writes them).
unsafe fn store_record(tx: &mut Transaction<'_>, base: usize, t: usize, v: u64, shape: u64) -> Result<()> {
    let head = head_bytes(t, v);
    let pay = payload(t, v);
    let (h, p) = (base + head_at(t), base + payload_at(t));
    // SAFETY: the ranges lie inside the mapped region and belong to this
    // thread (the caller's contract); each is declared before it is stored
    // into.
    unsafe {
        match shape % 4 {
            0 => {
                tx.modify_bytes(h, &head)?;
                tx.modify_bytes(p, &pay)?;
            }
            1 => {
                // Declared first, then plain stores.
                tx.set_range(p, PAYLOAD)?;
                tx.set_range(h, HEAD)?;
                std::ptr::copy_nonoverlapping(pay.as_ptr(), p as *mut u8, PAYLOAD);
                std::ptr::copy_nonoverlapping(head.as_ptr(), h as *mut u8, HEAD);
            }
            2 => {
                // Overlapping, touching and nested declarations.
                for (o, l) in [(0, 300), (250, 400), (650, 374), (100, 50)] {
                    tx.set_range(p + o, l)?;
                }
                tx.set_range(h + 8, 8)?;
                tx.set_range(h, 8)?;
                tx.set_range(h, HEAD)?;
                std::ptr::copy_nonoverlapping(pay.as_ptr(), p as *mut u8, PAYLOAD);
                std::ptr::copy_nonoverlapping(head.as_ptr(), h as *mut u8, HEAD);
            }
            _ => {
                // Payload in chunks; the head stored twice, the last wins.
                for (i, chunk) in pay.chunks(100).enumerate() {
                    tx.modify_bytes(p + i * 100, chunk)?;
                }
                tx.modify_bytes(h, &head_bytes(t, v ^ 0x5A5A))?;
                tx.modify_bytes(h, &head)?;
            }
        }
    }
    Ok(())
}

/// Declares and stores both halves of the pair.
///
/// # Safety
///
/// The caller holds the pair's lock until the transaction ends.
unsafe fn store_pair(tx: &mut Transaction<'_>, base: usize, c: u64, t: usize, v: u64) -> Result<()> {
    let bytes = pair_bytes(c, t, v);
    let [a, b] = pair_at().map(|at| base + at);
    // SAFETY: both halves are inside the region, and the pair lock the
    // caller holds until commit or abort keeps every other thread off them.
    unsafe {
        tx.modify_bytes(a, &bytes)?;
        tx.set_range(b, PAIR)?;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), b as *mut u8, PAIR);
    }
    Ok(())
}

/// The volatile mirror of the pair, kept under the pair's lock.
#[derive(Clone, Copy, Debug, Default)]
struct PairMirror {
    /// Last pair (c, t, v) whose commit returned `Ok`.
    committed: (u64, usize, u64),
    /// Largest counter handed to `commit`.
    attempted: u64,
    /// Largest counter known durable.
    acked: u64,
    /// A pair commit failed (after the crash): no more pair transactions this
    /// round, so the one failed counter is never handed out twice.
    broken: bool,
}

/// State shared by the threads of a round.
struct Shared {
    pair: Mutex<PairMirror>,
    /// Set just before the crash: errors are expected from then on.
    crashing: AtomicBool,
    /// Set after the crash: the threads stop.
    stop: AtomicBool,
    /// Commits that returned `Ok`.
    commits: AtomicU64,
    /// A thread met an error before the crash.
    failed: AtomicBool,
}

/// What one thread did in a round.
#[derive(Clone, Debug, Default)]
struct ThreadLog {
    /// Value at the start of the round (durable).
    start: u64,
    /// Last value whose commit returned `Ok`.
    committed: u64,
    /// Largest value handed to `commit`.
    attempted: u64,
    /// Largest value known durable.
    acked: u64,
    /// (own value, pair counter) of every pair transaction handed to commit.
    pair_txs: Vec<(u64, u64)>,
    /// The error that stopped the thread, and whether the crash had begun.
    error: Option<(String, bool)>,
    commits: u64,
    flush_commits: u64,
    aborts: u64,
    flushes: u64,
}

fn expected_after_crash(e: &Error) -> bool {
    matches!(e, Error::Io { .. } | Error::Poisoned { .. })
}

/// One thread's loop: transactions on its record and on the pair until
/// `stop` (or, with `limit`, that many operations), or the first error.
fn worker(
    rvm: &Rvm,
    region: &Region,
    shared: &Shared,
    t: usize,
    start: u64,
    seed: u64,
    limit: Option<u64>,
) -> ThreadLog {
    let mut log = ThreadLog { start, committed: start, attempted: start, acked: start, ..ThreadLog::default() };
    let mut rng = Rng::new(seed);
    let base = region.addr();
    // Whether memory holds the committed record (a no-restore abort leaves
    // its stores behind).
    let mut clean = true;
    let mut ops = 0u64;
    while !shared.stop.load(Ordering::Acquire) && limit.is_none_or(|l| ops < l) {
        ops += 1;
        let r = step(rvm, region, shared, t, &mut rng, &mut log, &mut clean, base);
        if let Err(e) = r {
            let crashing = shared.crashing.load(Ordering::Acquire);
            let expected = crashing && expected_after_crash(&e);
            log.error = Some((format!("{e} ({e:?})"), expected));
            if !expected {
                shared.failed.store(true, Ordering::Release);
            }
            break;
        }
    }
    log
}

#[allow(clippy::too_many_arguments)]
fn step(
    rvm: &Rvm,
    region: &Region,
    shared: &Shared,
    t: usize,
    rng: &mut Rng,
    log: &mut ThreadLog,
    clean: &mut bool,
    base: usize,
) -> Result<()> {
    let v = log.committed;
    let restore = if rng.coin() { RestoreMode::Restore } else { RestoreMode::NoRestore };
    let commit = if rng.below(4) == 0 { CommitMode::Flush } else { CommitMode::NoFlush };
    let shape = rng.next();
    let dice = rng.below(100);
    match dice {
        // A transaction on the thread's own record.
        0..=54 => {
            let mut tx = rvm.begin(restore)?;
            // SAFETY: the record is this thread's alone.
            unsafe { store_record(&mut tx, base, t, v + 1, shape)? };
            log.attempted = v + 1;
            tx.commit(commit)?;
            committed(shared, log, commit, clean);
        }
        // The record and the pair, atomically, under the pair's lock.
        55..=69 => {
            let mut p = shared.pair.lock().expect("pair lock");
            if p.broken {
                return Ok(());
            }
            let c = p.committed.0 + 1;
            let mut tx = rvm.begin(restore)?;
            // SAFETY: the record is ours; the pair lock is held until the
            // transaction has ended.
            unsafe {
                store_record(&mut tx, base, t, v + 1, shape)?;
                store_pair(&mut tx, base, c, t, v + 1)?;
            }
            log.attempted = v + 1;
            log.pair_txs.push((v + 1, c));
            p.attempted = c;
            if let Err(e) = tx.commit(commit) {
                p.broken = true;
                return Err(e);
            }
            p.committed = (c, t, v + 1);
            if commit == CommitMode::Flush {
                p.acked = p.acked.max(c);
            }
            drop(p);
            committed(shared, log, commit, clean);
        }
        // An aborted transaction on the record (explicit or by drop).
        70..=84 => {
            let mut tx = rvm.begin(restore)?;
            // SAFETY: the record is this thread's alone.
            unsafe { store_record(&mut tx, base, t, (v + 1) | ABORTED, shape)? };
            if rng.coin() {
                tx.abort();
            } else {
                drop(tx);
            }
            log.aborts += 1;
            match restore {
                RestoreMode::Restore if *clean => {
                    let mut got = vec![0u8; PAYLOAD];
                    // SAFETY: nothing stores into the region while the test reads it.
                    unsafe { region.read(payload_at(t), &mut got) }.expect("in region");
                    let mut head = [0u8; HEAD];
                    // SAFETY: nothing stores into the region while the test reads it.
                    unsafe { region.read(head_at(t), &mut head) }.expect("in region");
                    assert!(
                        head == head_bytes(t, v) && got == payload(t, v),
                        "thread {t}: a restore-mode abort did not bring back value {v}"
                    );
                }
                RestoreMode::Restore => {}
                RestoreMode::NoRestore => *clean = false,
            }
        }
        // An aborted transaction on the record and the pair.
        85..=89 => {
            let p = shared.pair.lock().expect("pair lock");
            let c = p.committed.0 + 1;
            let mut tx = rvm.begin(restore)?;
            // SAFETY: as for the committed pair transaction.
            unsafe {
                store_record(&mut tx, base, t, (v + 1) | ABORTED, shape)?;
                store_pair(&mut tx, base, c | ABORTED, t, (v + 1) | ABORTED)?;
            }
            tx.abort();
            drop(p);
            log.aborts += 1;
            if restore == RestoreMode::NoRestore {
                *clean = false;
            }
        }
        // flush() (or, rarely, truncate()): every earlier commit is durable.
        _ => {
            let pair_before = shared.pair.lock().expect("pair lock").committed.0;
            if dice == 99 {
                rvm.truncate()?;
            } else {
                rvm.flush()?;
            }
            log.flushes += 1;
            log.acked = v;
            let mut p = shared.pair.lock().expect("pair lock");
            p.acked = p.acked.max(pair_before);
        }
    }
    Ok(())
}

fn committed(shared: &Shared, log: &mut ThreadLog, mode: CommitMode, clean: &mut bool) {
    log.committed += 1;
    log.commits += 1;
    if mode == CommitMode::Flush {
        log.acked = log.committed;
        log.flush_commits += 1;
    }
    *clean = true;
    shared.commits.fetch_add(1, Ordering::AcqRel);
}

// ---------------------------------------------------------------------------
// Rounds
// ---------------------------------------------------------------------------

struct Inst {
    rvm: Rvm,
    seg: Segment,
    region: Region,
}

fn open(vfs: &Arc<dyn Vfs>, opts: &Options, ctx: &str) -> Inst {
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts.clone())
        .unwrap_or_else(|e| panic!("{ctx}: reopen (recovery) failed: {e}"));
    let seg = rvm.open_segment(SEG).unwrap_or_else(|e| panic!("{ctx}: open_segment failed: {e}"));
    let region = rvm.map(&seg, MapSpec::new(0, region_len())).unwrap_or_else(|e| panic!("{ctx}: map failed: {e}"));
    Inst { rvm, seg, region }
}

fn read_all(region: &Region) -> Vec<u8> {
    let mut img = vec![0u8; region.len()];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(0, &mut img) }.expect("whole region");
    img
}

/// The recovered state: each thread's value and the pair.
#[derive(Clone, Debug)]
struct State {
    values: [u64; MAX_THREADS],
    pair: (u64, usize, u64),
}

/// Checks `img` against what the round did; returns the recovered state.
fn check(img: &[u8], before: &State, logs: &[ThreadLog], pair: &PairMirror, ctx: &str) -> State {
    let fail = |what: String| -> ! {
        panic!("{ctx}: {what}\nthreads: {logs:#?}\npair mirror: {pair:?}\nstate before the round: {before:?}")
    };
    // Nothing outside the records.
    let mut used = vec![false; img.len()];
    for (at, len) in used_ranges() {
        used[at..at + len].iter_mut().for_each(|u| *u = true);
    }
    if let Some(i) = (0..img.len()).find(|&i| !used[i] && img[i] != 0) {
        fail(format!("byte {i} outside every record is {:#04x}", img[i]));
    }
    // Whole records, within bounds.
    let mut values = [0u64; MAX_THREADS];
    for (t, value) in values.iter_mut().enumerate() {
        let v = parse_record(img, t).unwrap_or_else(|e| fail(e));
        let (lo, hi) = match logs.get(t) {
            Some(l) => (l.acked.max(l.start), l.attempted),
            None => (before.values[t], before.values[t]),
        };
        if v < lo {
            fail(format!(
                "thread {t}: recovered value {v} is below {lo}, acknowledged durable (a flushed commit lost)"
            ));
        }
        if v > hi {
            fail(format!("thread {t}: recovered value {v} is above {hi}, the last one committed (uncommitted data)"));
        }
        *value = v;
    }
    // The pair: whole, within bounds, and on the same prefix as the records.
    let (c, pt, pv) = parse_pair(img).unwrap_or_else(|e| fail(e));
    let lo = pair.acked.max(before.pair.0);
    if c < lo || c > pair.attempted.max(before.pair.0) {
        fail(format!("pair counter {c} outside [{lo}, {}]", pair.attempted));
    }
    if values[pt] < pv {
        fail(format!("the pair (counter {c}) names thread {pt} at value {pv}, but its record holds {}", values[pt]));
    }
    for (t, l) in logs.iter().enumerate() {
        for &(v, pc) in &l.pair_txs {
            if pc <= c && values[t] < v {
                fail(format!(
                    "the pair reached counter {c}, but thread {t}'s record ({}) lacks value {v} of pair transaction {pc}",
                    values[t]
                ));
            }
            if pc > c && values[t] >= v {
                fail(format!(
                    "thread {t}'s record ({}) holds value {v} of pair transaction {pc}, but the pair is at {c}",
                    values[t]
                ));
            }
        }
    }
    State { values, pair: (c, pt, pv) }
}

/// Totals over rounds, to show the test exercised what it claims.
#[derive(Debug, Default)]
struct Totals {
    commits: u64,
    flush_commits: u64,
    aborts: u64,
    flushes: u64,
    pair_txs: u64,
    truncations: u64,
    checkpoints: u64,
    log_bytes: u64,
    acked_nonzero_rounds: u32,
}

/// One round: `threads` threads run until `crash_after` commits have
/// returned, then the disk crashes with `mode` (or, with `None`, the
/// threads run `ops` operations each and the instance is closed cleanly).
#[allow(clippy::too_many_arguments)]
fn round(
    disk: &SimDisk,
    vfs: &Arc<dyn Vfs>,
    opts: &Options,
    state: &State,
    threads: usize,
    crash: Option<(u64, CrashMode)>,
    seed: u64,
    totals: &mut Totals,
    ctx: &str,
) -> State {
    let inst = open(vfs, opts, ctx);
    let img = read_all(&inst.region);
    let now = check(&img, state, &[], &PairMirror { attempted: state.pair.0, ..PairMirror::default() }, ctx);
    assert_eq!((now.values, now.pair), (state.values, state.pair), "{ctx}: state changed between rounds");
    let shared = Shared {
        pair: Mutex::new(PairMirror {
            committed: state.pair,
            attempted: state.pair.0,
            acked: state.pair.0,
            broken: false,
        }),
        crashing: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        commits: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    };
    let limit = if crash.is_none() { Some(150) } else { None };
    let (logs, stats) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (rvm, region, shared) = (&inst.rvm, &inst.region, &shared);
                let start = state.values[t];
                let seed = seed ^ mix(t as u64 + 1);
                s.spawn(move || worker(rvm, region, shared, t, start, seed, limit))
            })
            .collect();
        let mut stats = None;
        if let Some((after, mode)) = crash {
            let deadline = Instant::now() + STUCK;
            while shared.commits.load(Ordering::Acquire) < after
                && !shared.failed.load(Ordering::Acquire)
                && !handles.iter().all(|h| h.is_finished())
            {
                assert!(Instant::now() < deadline, "{ctx}: no progress towards the crash point");
                std::thread::sleep(Duration::from_micros(200));
            }
            stats = Some(inst.rvm.stats());
            shared.crashing.store(true, Ordering::Release);
            disk.crash(mode);
            shared.stop.store(true, Ordering::Release);
        }
        let logs: Vec<ThreadLog> =
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panic!("{ctx}: a thread panicked"))).collect();
        (logs, stats.unwrap_or_else(|| inst.rvm.stats()))
    });
    for (t, l) in logs.iter().enumerate() {
        if let Some((e, false)) = &l.error {
            panic!("{ctx}: thread {t} failed before the crash (or with an unexpected error): {e}\n{logs:#?}");
        }
        totals.commits += l.commits;
        totals.flush_commits += l.flush_commits;
        totals.aborts += l.aborts;
        totals.flushes += l.flushes;
        totals.pair_txs += l.pair_txs.len() as u64;
    }
    totals.truncations += stats.truncations;
    totals.checkpoints += stats.checkpoints;
    totals.log_bytes += stats.log_bytes_written;
    if logs.iter().any(|l| l.acked > l.start) {
        totals.acked_nonzero_rounds += 1;
    }
    let pair = *shared.pair.lock().expect("pair lock");
    let Inst { rvm, seg, region } = inst;
    match crash {
        Some(_) => {
            // Its handles are dead: dropping it flushes nothing.
            drop((region, seg, rvm));
        }
        None => {
            assert_eq!(rvm.query().in_flight, 0, "{ctx}: transactions left in flight");
            drop((region, seg));
            rvm.close().unwrap_or_else(|e| panic!("{ctx}: close failed: {e}"));
        }
    }
    let inst = open(vfs, opts, ctx);
    let img = read_all(&inst.region);
    assert_eq!(disk.durable_image(SEG).as_deref(), Some(&img[..]), "{ctx}: the mapped image is not the segment's");
    let after = check(&img, state, &logs, &pair, ctx);
    if crash.is_none() {
        for (t, l) in logs.iter().enumerate() {
            assert_eq!(after.values[t], l.committed, "{ctx}: a clean close lost commits of thread {t}");
        }
        assert_eq!(after.pair, pair.committed, "{ctx}: a clean close lost pair commits");
    }
    after
}

fn crash_rounds(coalesce: bool) {
    let seed = seed() ^ u64::from(coalesce);
    let mut rng = Rng::new(seed);
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new(LOG), LOG_SIZE).unwrap();
    // Every record and the pair start whole, at zero, durably.
    {
        let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts(coalesce, Reclaim::Replay)).unwrap();
        let seg = rvm.create_segment(SEG, region_len() as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, region_len())).unwrap();
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: no other thread exists yet.
        unsafe {
            for t in 0..MAX_THREADS {
                store_record(&mut tx, region.addr(), t, 0, 0).unwrap();
            }
            store_pair(&mut tx, region.addr(), 0, 0, 0).unwrap();
        }
        tx.commit(CommitMode::Flush).unwrap();
        drop((region, seg));
        rvm.close().unwrap();
    }
    let mut state = State { values: [0; MAX_THREADS], pair: (0, 0, 0) };
    let mut totals = Totals::default();
    let n = rounds();
    for r in 0..n {
        let threads = 3 + (r as usize % 2);
        let reclaim = if (r / 2) % 2 == 0 { Reclaim::Checkpoint } else { Reclaim::Replay };
        let mode = match r % 3 {
            0 => CrashMode::LoseUnsynced,
            1 => CrashMode::KeepRandomSubset { seed: rng.next(), tear_last: true },
            _ => CrashMode::KeepRandomSubset { seed: rng.next(), tear_last: false },
        };
        let after = 100 + rng.below(900);
        let ctx = format!(
            "seed {seed}, coalesce {coalesce}, round {r}: {threads} threads, background {reclaim:?}, \
             crash {mode:?} after {after} commits"
        );
        let o = opts(coalesce, reclaim);
        state = round(&disk, &vfs, &o, &state, threads, Some((after, mode)), rng.next(), &mut totals, &ctx);
    }
    let ctx = format!("seed {seed}, coalesce {coalesce}, final round without a crash");
    round(&disk, &vfs, &opts(coalesce, Reclaim::Checkpoint), &state, MAX_THREADS, None, rng.next(), &mut totals, &ctx);
    eprintln!("coalesce {coalesce}: {n} crash rounds: {totals:?}");
    // The workload did what the test claims: the log wrapped and was
    // truncated, flushes were acknowledged, pairs and aborts happened.
    assert!(totals.log_bytes > 2 * (LOG_SIZE - AREA_OFFSET), "the log did not wrap: {totals:?}");
    assert!(totals.truncations > 0 && totals.checkpoints > 0, "no log replay or no checkpoint ran: {totals:?}");
    assert!(totals.flush_commits > 0 && totals.flushes > 0 && totals.acked_nonzero_rounds > 0, "{totals:?}");
    assert!(totals.pair_txs > 0 && totals.aborts > 0, "{totals:?}");
}

#[test]
fn threads_crash_coalescing() {
    crash_rounds(true);
}

#[test]
fn threads_crash_faithful_log() {
    crash_rounds(false);
}

// ---------------------------------------------------------------------------
// Group commit
// ---------------------------------------------------------------------------

/// A door the log's syncs wait at while it is closed.
#[derive(Debug, Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    /// Syncs waiting at the door now.
    waiting: AtomicUsize,
}

impl Gate {
    fn pass(&self) {
        let mut closed = self.closed.lock().expect("gate");
        if *closed {
            self.waiting.fetch_add(1, Ordering::AcqRel);
            while *closed {
                closed = self.opened.wait(closed).expect("gate");
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
    fn set(&self, closed: bool) {
        *self.closed.lock().expect("gate") = closed;
        self.opened.notify_all();
    }
}

/// The simulated disk, with the log's syncs held at a [`Gate`].
#[derive(Debug)]
struct GatedDisk {
    disk: SimDisk,
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct GatedFile {
    inner: Arc<dyn Storage>,
    gate: Arc<Gate>,
}

impl Vfs for GatedDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let inner = self.disk.open(path, mode)?;
        if path == Path::new(LOG) {
            Ok(Arc::new(GatedFile { inner, gate: self.gate.clone() }))
        } else {
            Ok(inner)
        }
    }
    fn canonical_name(&self, path: &Path) -> io::Result<PathBuf> {
        self.disk.canonical_name(path)
    }
}

impl Storage for GatedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.gate.pass();
        self.inner.sync()
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Four flush commits while the first sync is held: the leader's sync covers
/// what it took, and one more sync covers the other commits, which queued
/// behind it. So four flush commits cost at most two syncs, exactly.
#[test]
fn group_commit_shares_a_held_sync() {
    let disk = SimDisk::new();
    let gate = Arc::new(Gate::default());
    let vfs: Arc<dyn Vfs> = Arc::new(GatedDisk { disk: disk.clone(), gate: gate.clone() });
    create_log_with(vfs.as_ref(), Path::new(LOG), 1 << 20).unwrap();
    let opts = Options { truncate_threshold: None, ..Options::default() };
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts.clone()).unwrap();
    let seg = rvm.create_segment(SEG, region_len() as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, region_len())).unwrap();
    let before = rvm.stats();
    gate.set(true);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4usize)
            .map(|t| {
                let (rvm, base) = (&rvm, region.addr());
                s.spawn(move || {
                    let mut tx = rvm.begin(RestoreMode::Restore)?;
                    // SAFETY: each thread writes its own 64 bytes.
                    unsafe { tx.modify_bytes(base + 64 * t, &[t as u8 + 1; 64])? };
                    tx.commit(CommitMode::Flush)
                })
            })
            .collect();
        // Open the gate once all four have committed and a sync is held.
        let deadline = Instant::now() + STUCK;
        while rvm.stats().flush_commits - before.flush_commits < 4 || gate.waiting.load(Ordering::Acquire) == 0 {
            assert!(Instant::now() < deadline, "the four commits never reached the sync");
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.set(false);
        for h in handles {
            h.join().expect("thread").expect("flush commit");
        }
    });
    let d = rvm.stats();
    let (commits, syncs) = (d.flush_commits - before.flush_commits, d.log_syncs - before.log_syncs);
    assert_eq!(commits, 4);
    assert!((1..=2).contains(&syncs), "4 flush commits queued behind one sync took {syncs} syncs");
    // They are durable: a crash right now keeps all four.
    disk.crash(CrashMode::LoseUnsynced);
    drop((region, seg, rvm));
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts).unwrap();
    let seg = rvm.open_segment(SEG).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, region_len())).unwrap();
    for t in 0..4usize {
        let mut b = [0u8; 64];
        // SAFETY: nothing stores into the region while the test reads it.
        unsafe { region.read(64 * t, &mut b) }.unwrap();
        assert_eq!(b, [t as u8 + 1; 64], "thread {t}'s flush commit was lost");
    }
}

/// Four threads doing flush commits on real files, started together: the
/// log is synced fewer times than there are flush commits.
#[test]
fn group_commit_on_files_uses_fewer_syncs_than_flush_commits() {
    const PER_THREAD: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gc.log");
    create_log(&log, 4 << 20).unwrap();
    let opts = Options { truncate_threshold: None, ..Options::default() };
    let rvm = Rvm::open(&log, opts.clone()).unwrap();
    let seg = rvm.create_segment(dir.path().join("gc.seg"), page_size() as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, page_size())).unwrap();
    let before = rvm.stats();
    let start = Barrier::new(4);
    std::thread::scope(|s| {
        for t in 0..4usize {
            let (rvm, base, start) = (&rvm, region.addr(), &start);
            s.spawn(move || {
                start.wait();
                for i in 1..=PER_THREAD {
                    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                    // SAFETY: each thread writes its own 8 bytes.
                    unsafe { tx.modify_bytes(base + 8 * t, &i.to_le_bytes()).unwrap() };
                    tx.commit(CommitMode::Flush).unwrap();
                }
            });
        }
    });
    let d = rvm.stats();
    let (commits, syncs) = (d.flush_commits - before.flush_commits, d.log_syncs - before.log_syncs);
    eprintln!("group commit on files: {commits} flush commits, {syncs} log syncs");
    assert_eq!(commits, 4 * PER_THREAD);
    assert!(syncs < commits, "{commits} flush commits from 4 threads took {syncs} syncs: no sync was shared");
    drop((region, seg));
    rvm.close().unwrap();
    let rvm = Rvm::open(&log, opts).unwrap();
    let seg = rvm.open_segment(dir.path().join("gc.seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, page_size())).unwrap();
    for t in 0..4usize {
        let mut b = [0u8; 8];
        // SAFETY: nothing stores into the region while the test reads it.
        unsafe { region.read(8 * t, &mut b) }.unwrap();
        assert_eq!(u64::from_le_bytes(b), PER_THREAD, "thread {t}");
    }
}
