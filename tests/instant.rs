//! Instant restart (`Options::instant_recovery`, docs/DESIGN.md §3.9).
//!
//! * Every page of a region read right after an instant open equals the
//!   committed state and a fully recovered copy of the same files (random
//!   logs, real files: pages come in through the fault hook).
//! * Threads touching the same pending pages at once never see a page half
//!   applied or stale.
//! * On the simulated disk: an I/O failure or crash at a random point of
//!   the open or of the background apply, then a reopen, gives the same
//!   state; commits made right after an instant open (flush and no-flush)
//!   survive a crash; damage in the log is refused at open with nothing
//!   written.
//! * A child process killed with `SIGKILL` while its background apply runs
//!   leaves files that recover to the same state.

use proptest::prelude::*;

/// Cases per property: `default` unless `PROPTEST_CASES` asks for more or
/// fewer (README, deeper runs).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn instant() -> Options {
    Options { instant_recovery: true, truncate_threshold: None, ..Options::default() }
}

fn full() -> Options {
    Options { instant_recovery: false, truncate_threshold: None, ..Options::default() }
}

/// One transaction: (offset, length, seed) ranges.
type Tx = Vec<(usize, usize, u8)>;

fn bytes_of(len: usize, seed: u8, k: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i + k) as u8)).collect()
}

/// Commits `txs` into `region` (no-flush, a flush every `flush_every`, and
/// at the end), updating `model`.
fn commit_all(rvm: &Rvm, region: &Region, txs: &[Tx], model: &mut [u8], flush_every: usize) {
    let len = region.len();
    for (k, tx) in txs.iter().enumerate() {
        let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
        for &(off, n, seed) in tx {
            let off = off % len;
            let n = n.clamp(1, len - off);
            let b = bytes_of(n, seed, k);
            // SAFETY: this thread alone uses the region.
            unsafe { t.modify_bytes(region.addr() + off, &b).unwrap() };
            model[off..off + n].copy_from_slice(&b);
        }
        let mode =
            if (k + 1) % flush_every == 0 || k + 1 == txs.len() { CommitMode::Flush } else { CommitMode::NoFlush };
        t.commit(mode).unwrap();
    }
}

/// The region read page by page in `order` (each page brought in by the
/// fault hook as it is touched).
fn read_pages(region: &Region, order: Vec<usize>) -> Vec<u8> {
    let ps = page_size();
    let mut got = vec![0u8; region.len()];
    for p in order {
        // SAFETY: no transaction runs in the region.
        unsafe { region.read(p * ps, &mut got[p * ps..(p + 1) * ps]) };
    }
    got
}

/// What an instant open of the files in `a` showed (`got`) is the
/// committed state (`model`) and what full recovery of their copy in `b`
/// shows; after the background apply the segment file holds it too.
fn same_as_full_recovery(rvm: &Rvm, a: &Path, b: &Path, got: &[u8], model: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(got == model, "instant open differs from the committed state");
    let opts = full().accept_segment(a.join("seg").canonicalize().unwrap(), b.join("seg"));
    let copy = Rvm::open(b.join("log"), opts).unwrap();
    let cseg = copy.open_segment(b.join("seg")).unwrap();
    let cregion = copy.map(&cseg, MapSpec::new(0, model.len())).unwrap();
    prop_assert!(read_all(&cregion) == got, "instant open differs from a fully recovered copy");
    rvm.wait_for_recovery().unwrap();
    prop_assert!(std::fs::read(a.join("seg")).unwrap() == model, "the segment file after the apply");
    Ok(())
}

fn read_all(region: &Region) -> Vec<u8> {
    let mut v = vec![0u8; region.len()];
    // SAFETY: no transaction runs in the region.
    unsafe { region.read(0, &mut v) };
    v
}

/// Makes a log and a segment in `dir` holding `txs`, not applied (the
/// instance is closed cleanly; closing applies nothing). Returns the model.
fn make_files(dir: &Path, pages: usize, txs: &[Tx]) -> Vec<u8> {
    let len = pages * page_size();
    create_log(dir.join("log"), 4 << 20).unwrap();
    let rvm = Rvm::open(dir.join("log"), full()).unwrap();
    let seg = rvm.create_segment(dir.join("seg"), len as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
    let mut model = vec![0u8; len];
    commit_all(&rvm, &region, txs, &mut model, 7);
    drop(region);
    rvm.close().unwrap();
    model
}

/// The tests on real files run one at a time: a child process that
/// `kill9_during_the_background_apply` spawns holds copies of the
/// descriptors (and, if forked, mappings) the other tests have open at
/// that moment until it execs,
/// and with them their logs' `flock`s, so an open in that window fails
/// with `LogError::Locked` (seen about once in ten runs of this binary).
static REAL_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn real_files() -> std::sync::MutexGuard<'static, ()> {
    REAL_FILES.lock().unwrap_or_else(|e| e.into_inner())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["log", "seg"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn tx_strategy(len: usize) -> impl Strategy<Value = Tx> {
    prop::collection::vec((0..len, prop_oneof![1usize..64, 1usize..3 * 4096], any::<u8>()), 1..5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]
    /// Every page read right after an instant open (each brought in by the
    /// fault hook) equals the committed state and a fully recovered copy;
    /// after the background apply the segment file holds it too.
    #[test]
    fn instant_open_shows_what_full_recovery_shows(
        txs in prop::collection::vec(tx_strategy(16 * 4096), 1..60),
        backwards in any::<bool>(),
        parallel_scan in any::<bool>(),
    ) {
        let _serial = real_files();
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        let pages = 16 * 4096 / page_size();
        let model = make_files(&a, pages, &txs);
        copy_dir(&a, &b);
        let len = model.len();

        let rvm = Rvm::open(a.join("log"), Options { parallel_scan, ..instant() }).unwrap();
        prop_assert!(rvm.recovery_report().deferred_pages > 0);
        prop_assert_eq!(rvm.recovery_report().segment_bytes_written, 0);
        let seg = rvm.open_segment(a.join("seg")).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
        // Page by page, in either order, each read as soon as possible.
        let order: Vec<usize> = if backwards { (0..pages).rev().collect() } else { (0..pages).collect() };
        let got = read_pages(&region, order);
        same_as_full_recovery(&rvm, &a, &b, &got, &model)?;
        prop_assert!(!rvm.query().recovering);
        drop(region);
        rvm.close().unwrap();
        // The new status: a reopen finds nothing to replay.
        let again = Rvm::open(a.join("log"), full()).unwrap();
        prop_assert_eq!(again.recovery_report().transactions, 0);
    }
}

/// Transactions of many short ranges close together in a few pages
/// (`len` bytes): each writes `per_tx` ranges of 1..8 bytes, `gap` bytes
/// apart from a random start, some overlapping. Coalesced into batches of
/// no-flush commits (ranges sorted) or each its own record, a page's ranges
/// follow one another in a record: the index makes them groups.
fn dense_txs(seed: u64, n: usize, per_tx: usize, gap: usize, len: usize) -> Vec<Tx> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as usize
    };
    (0..n)
        .map(|_| {
            let start = next() % len;
            (0..per_tx).map(|j| ((start + j * gap) % len, 1 + next() % 8, next() as u8)).collect()
        })
        .collect()
}

/// [`make_files`] with a flush every `flush_every` commits, coalesced or
/// not.
fn make_files_with(dir: &Path, pages: usize, txs: &[Tx], flush_every: usize, coalesce: bool) -> Vec<u8> {
    let len = pages * page_size();
    create_log(dir.join("log"), 8 << 20).unwrap();
    let rvm = Rvm::open(dir.join("log"), Options { coalesce, ..full() }).unwrap();
    let seg = rvm.create_segment(dir.join("seg"), len as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
    let mut model = vec![0u8; len];
    commit_all(&rvm, &region, txs, &mut model, flush_every);
    drop(region);
    rvm.close().unwrap();
    model
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(8), ..ProptestConfig::default() })]
    /// A log of many short ranges in a few pages (an index of many group
    /// pieces, some of hundreds of ranges): an instant open shows what full
    /// recovery shows, through faults (pages read in a random order, each
    /// fault installing neighbours) or through the background apply alone,
    /// and the segment file holds it after the apply.
    #[test]
    fn many_groups_read_as_full_recovery(
        seed in any::<u64>(),
        pages in 1usize..6,
        n in 20usize..400,
        per_tx in 1usize..48,
        gap in 2usize..40,
        flush_every in prop_oneof![Just(1usize), 1usize..400],
        coalesce in any::<bool>(),
        parallel_scan in any::<bool>(),
        read_first in any::<bool>(),
    ) {
        let _serial = real_files();
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        let len = pages * page_size();
        let txs = dense_txs(seed, n, per_tx, gap, len);
        let model = make_files_with(&a, pages, &txs, flush_every, coalesce);
        copy_dir(&a, &b);

        let rvm = Rvm::open(a.join("log"), Options { parallel_scan, ..instant() }).unwrap();
        prop_assert!(rvm.recovery_report().deferred_pages > 0);
        let seg = rvm.open_segment(a.join("seg")).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
        let got = if read_first {
            let mut order: Vec<usize> = (0..pages).collect();
            order.rotate_left(seed as usize % pages);
            read_pages(&region, order)
        } else {
            rvm.wait_for_recovery().unwrap();
            read_all(&region)
        };
        same_as_full_recovery(&rvm, &a, &b, &got, &model)?;
        drop(region);
        rvm.close().unwrap();
    }

    /// The same logs on the simulated disk (no descriptor: the index copies
    /// the ranges' and groups' bytes, and the background apply brings every
    /// page up to date).
    #[test]
    fn many_groups_copied_read_as_the_model(
        seed in any::<u64>(),
        n in 20usize..300,
        per_tx in 1usize..48,
        gap in 2usize..40,
    ) {
        let txs = dense_txs(seed, n, per_tx, gap, SEG_LEN);
        let (_disk, vfs, model) = sim_files(&txs);
        let (rvm, got) = sim_state(&vfs, instant());
        prop_assert!(rvm.recovery_report().transactions > 0);
        prop_assert!(got == model, "an instant open of copied groups");
    }
}

/// A log whose every transaction writes one whole page with one value in
/// every word (its number): a reader sees a page half applied, or stale,
/// if its words differ or are not the page's last value.
fn page_log(dir: &Path, pages: usize, rounds: usize) -> Vec<u64> {
    page_log_with(dir, pages, rounds, None)
}

/// [`page_log`]; with `crash`, the files are also copied there while the
/// instance is open, after a last flush commit (what a crash of the process
/// leaves: the status does not record how far the log is synced, so an
/// instant open must write it, §3.4 step 4, before any segment write).
fn page_log_with(dir: &Path, pages: usize, rounds: usize, crash: Option<&Path>) -> Vec<u64> {
    let ps = page_size();
    create_log(dir.join("log"), 16 << 20).unwrap();
    let rvm = Rvm::open(dir.join("log"), Options { coalesce: false, ..full() }).unwrap();
    let seg = rvm.create_segment(dir.join("seg"), (pages * ps) as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, pages * ps)).unwrap();
    let mut last = vec![0u64; pages];
    let mut x = 12345u64;
    for n in 1..=(pages * rounds) as u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let p = (x >> 33) as usize % pages;
        let words: Vec<u8> = std::iter::repeat_n(n.to_le_bytes(), ps / 8).flatten().collect();
        let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: this thread alone uses the region.
        unsafe { t.modify_bytes(region.addr() + p * ps, &words).unwrap() };
        t.commit(CommitMode::NoFlush).unwrap();
        last[p] = n;
    }
    if let Some(to) = crash {
        rvm.flush().unwrap();
        copy_dir(dir, to);
    }
    drop(region);
    rvm.close().unwrap();
    last
}

/// Four threads read the same pending pages at once, in different orders,
/// right after an instant open: every page they see is whole and final.
#[test]
fn concurrent_readers_never_see_a_partial_page() {
    let pages = 256;
    let _serial = real_files();
    let tmp = tempfile::tempdir().unwrap();
    let last = Arc::new(page_log(tmp.path(), pages, 6));
    for round in 0..4 {
        // Each round: the files as the log left them (the apply of the
        // previous round is undone by restoring the copies).
        let dir = tmp.path().join(format!("r{round}"));
        copy_dir(tmp.path(), &dir);
        let opts = instant().accept_segment(tmp.path().join("seg").canonicalize().unwrap(), dir.join("seg"));
        let rvm = Rvm::open(dir.join("log"), opts).unwrap();
        let seg = rvm.open_segment(dir.join("seg")).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, pages * page_size())).unwrap();
        let threads: Vec<_> = (0..4usize)
            .map(|t| {
                let (region, last) = (region.clone(), last.clone());
                std::thread::spawn(move || {
                    let ps = page_size();
                    let mut buf = vec![0u8; ps];
                    for i in 0..pages {
                        let p = match t {
                            0 => i,
                            1 => pages - 1 - i,
                            2 => (i * 37 + round) % pages,
                            _ => (i * 101 + 7) % pages,
                        };
                        // SAFETY: nobody writes the region.
                        unsafe { region.read(p * ps, &mut buf) };
                        let want = last[p].to_le_bytes();
                        for (w, word) in buf.chunks(8).enumerate() {
                            assert_eq!(word, &want[..], "thread {t}: page {p} word {w} is not the page's last value");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        rvm.wait_for_recovery().unwrap();
    }
}

// ---------------------------------------------------------------------------
// The simulated disk
// ---------------------------------------------------------------------------

const LOG: &str = "/log";
const SEG: &str = "/seg";
const SEG_LEN: usize = 16 * 4096;

/// A simulated disk with a log of flush-committed `txs`, unapplied
/// (crashed after the last flush). Returns the disk and the model.
fn sim_files(txs: &[Tx]) -> (SimDisk, Arc<dyn Vfs>, Vec<u8>) {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new(LOG), 1 << 20).unwrap();
    let mut model = vec![0u8; SEG_LEN];
    {
        let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), Options { write_behind: false, ..full() }).unwrap();
        let seg = rvm.create_segment(SEG, SEG_LEN as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, SEG_LEN)).unwrap();
        commit_all(&rvm, &region, txs, &mut model, 5);
        disk.crash(CrashMode::LoseUnsynced);
    }
    (disk, vfs, model)
}

fn sim_state(vfs: &Arc<dyn Vfs>, opts: Options) -> (Rvm, Vec<u8>) {
    let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts).unwrap();
    let seg = rvm.open_segment(SEG).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, SEG_LEN)).unwrap();
    let got = read_all(&region);
    drop(region);
    (rvm, got)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]
    /// An I/O failure at a random storage operation of an instant open or
    /// of its background apply, then a crash (keeping a random subset of
    /// the unsynced writes, the last one torn), then a reopen: the same
    /// state as recovery without a crash, and the files recover again to it.
    #[test]
    fn crash_during_instant_recovery_recovers_the_same_state(
        txs in prop::collection::vec(tx_strategy(SEG_LEN), 1..40),
        fail_at in 0u64..200,
        seed in any::<u64>(),
        reopen_instant in any::<bool>(),
    ) {
        let (disk, vfs, model) = sim_files(&txs);
        disk.fail_after(fail_at);
        match Rvm::open_with(vfs.clone(), Path::new(LOG), instant()) {
            Ok(rvm) => {
                // The apply runs (or fails) on its own; a map waits for it.
                if let Ok(seg) = rvm.open_segment(SEG) {
                    if let Ok(region) = rvm.map(&seg, MapSpec::new(0, SEG_LEN)) {
                        prop_assert!(read_all(&region) == model, "a map after an instant open");
                    }
                }
                let _ = rvm.wait_for_recovery();
                disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: true });
                drop(rvm);
            }
            Err(_) => disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: true }),
        }
        disk.clear_faults();
        let opts = if reopen_instant { instant() } else { full() };
        let (rvm, got) = sim_state(&vfs, opts);
        prop_assert!(got == model, "the state after a crash during instant recovery");
        rvm.wait_for_recovery().unwrap();
        drop(rvm);
        disk.crash(CrashMode::LoseUnsynced);
        let (_, again) = sim_state(&vfs, full());
        prop_assert!(again == model, "the state after recovering once more");
    }

    /// Commits made right after an instant open, flush and no-flush, while
    /// the apply may still run: a crash keeps every flushed one.
    #[test]
    fn commits_after_an_instant_open_survive_a_crash(
        txs in prop::collection::vec(tx_strategy(SEG_LEN), 1..30),
        more in prop::collection::vec(tx_strategy(SEG_LEN), 1..20),
        write_behind in any::<bool>(),
    ) {
        let (disk, vfs, mut model) = sim_files(&txs);
        let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), Options { write_behind, ..instant() }).unwrap();
        let seg = rvm.open_segment(SEG).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, SEG_LEN)).unwrap();
        prop_assert!(read_all(&region) == model);
        commit_all(&rvm, &region, &more, &mut model, 3);
        disk.crash(CrashMode::LoseUnsynced);
        drop(region);
        drop(rvm);
        let (_, got) = sim_state(&vfs, instant());
        prop_assert!(got == model, "flushed commits after an instant open were lost");
    }
}

/// Damage in the synced records is refused at an instant open, and nothing
/// is written to the log or the segment.
#[test]
fn damage_is_refused_with_nothing_written() {
    let txs: Vec<Tx> = (0..40).map(|i| vec![(i * 1000, 100, i as u8)]).collect();
    let (disk, vfs, _) = sim_files(&txs);
    let log = disk.durable_image(LOG).unwrap();
    let seg = disk.durable_image(SEG).unwrap();
    let area = rvm::log::format::AREA_OFFSET as usize;
    let mut bad = log.clone();
    bad[area + 600] ^= 0x10;
    disk.set_durable_image(LOG, bad.clone());
    let e = Rvm::open_with(vfs.clone(), Path::new(LOG), instant()).unwrap_err();
    assert!(matches!(e, Error::Corrupted { .. }), "{e:?}");
    assert!(disk.durable_image(LOG).unwrap() == bad && disk.live_image(LOG).unwrap() == bad);
    assert!(disk.durable_image(SEG).unwrap() == seg && disk.live_image(SEG).unwrap() == seg);
}

/// A block of synced records punched out of the log file (a hole: it
/// reads as zeros, as a lost write to space the file never held would):
/// both recoveries find the records after it, past the hole that the
/// probe for them skips unread, and refuse the log, writing nothing.
#[test]
fn a_hole_in_synced_records_is_refused() {
    use rustix::fs::{fallocate, FallocateFlags};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ps = page_size();
    create_log(dir.join("log"), 4 << 20).unwrap();
    let rvm = Rvm::open(dir.join("log"), full()).unwrap();
    let seg = rvm.create_segment(dir.join("seg"), (16 * ps) as u64).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 16 * ps)).unwrap();
    // Flush commits of a page each: each record claims the sync of the
    // one before it, so damage before the last is damage to synced data.
    for n in 0..40u8 {
        let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: this thread alone uses the region.
        unsafe { t.modify_bytes(region.addr() + usize::from(n % 16) * ps, &vec![n; ps]).unwrap() };
        t.commit(CommitMode::Flush).unwrap();
    }
    // The crash: the files as they are now, put back in place after the close.
    copy_dir(dir, &dir.join("crashed"));
    drop((region, seg));
    rvm.close().unwrap();
    for f in ["log", "seg"] {
        std::fs::copy(dir.join("crashed").join(f), dir.join(f)).unwrap();
    }
    let log = std::fs::OpenOptions::new().write(true).open(dir.join("log")).unwrap();
    let at = rvm::log::format::AREA_OFFSET + 16 * 4096;
    if fallocate(&log, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, at, 4096).is_err() {
        // A file system without holes: zeros written instead.
        std::os::unix::fs::FileExt::write_all_at(&log, &[0; 4096], at).unwrap();
    }
    log.sync_all().unwrap();
    drop(log);
    let files = || ["log", "seg"].map(|f| std::fs::read(dir.join(f)).unwrap());
    let before = files();
    for opts in [instant(), full()] {
        let e = Rvm::open(dir.join("log"), opts).unwrap_err();
        assert!(matches!(e, Error::Corrupted { .. }), "{e:?}");
        assert!(files() == before, "the refused open wrote");
    }
}

// ---------------------------------------------------------------------------
// kill -9 during the background apply
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "RVM_INSTANT_CHILD";

/// The child: opens the files with instant recovery, reads one page, says
/// so, and waits to be killed (its background apply running meanwhile).
fn child(dir: &Path) -> ! {
    let rvm = Rvm::open(dir.join("log"), instant()).unwrap();
    let seg = rvm.open_segment(dir.join("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, seg.len() as usize)).unwrap();
    let mut b = [0u8; 8];
    // SAFETY: no transaction runs.
    unsafe { region.read(0, &mut b) };
    println!("ready");
    std::io::Write::flush(&mut std::io::stdout()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(60));
    std::process::exit(0)
}

/// A child killed with `SIGKILL` right after its instant open (its
/// background apply part done): the files recover to the same state, with
/// instant recovery and without.
#[test]
fn kill9_during_the_background_apply() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
    }
    let _serial = real_files();
    let tmp = tempfile::tempdir().unwrap();
    let pages = 2048;
    let last = page_log(tmp.path(), pages, 3);
    for round in 0..4 {
        let dir: PathBuf = tmp.path().join(format!("r{round}"));
        copy_dir(tmp.path(), &dir);
        // The copy's dictionary names the original segment: move it there
        // for the child (the names must match for the open).
        std::fs::copy(dir.join("seg"), tmp.path().join("seg")).unwrap();
        let mut c = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "kill9_during_the_background_apply", "--nocapture"])
            .env(CHILD_ENV, tmp.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_micros(round as u64 * 700));
        c.kill().unwrap();
        c.wait().unwrap();
        let rvm = Rvm::open(tmp.path().join("log"), if round % 2 == 0 { instant() } else { full() }).unwrap();
        let seg = rvm.open_segment(tmp.path().join("seg")).unwrap();
        let ps = page_size();
        let region = rvm.map(&seg, MapSpec::new(0, pages * ps)).unwrap();
        let got = read_all(&region);
        for p in 0..pages {
            let want = last[p].to_le_bytes();
            assert!(got[p * ps..(p + 1) * ps].chunks(8).all(|w| w == want), "round {round}: page {p}");
        }
        rvm.wait_for_recovery().unwrap();
        drop(region);
        drop(seg);
        rvm.close().unwrap();
        // Back to the unapplied files for the next round.
        std::fs::copy(dir.join("log"), tmp.path().join("log")).unwrap();
        std::fs::copy(dir.join("seg"), tmp.path().join("seg")).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Faults before the status is durable (§3.4 step 4 held back)
// ---------------------------------------------------------------------------

/// Holds syncs of the log back while shut: instant recovery's status write
/// (§3.4 step 4) then waits, and so does every segment write.
#[derive(Debug, Default)]
struct Gate {
    shut: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// Syncs that found the gate shut.
    held: std::sync::atomic::AtomicUsize,
}

impl Gate {
    fn shut() -> Arc<Gate> {
        Arc::new(Gate { shut: std::sync::Mutex::new(true), ..Gate::default() })
    }

    fn pass(&self) {
        let shut = self.shut.lock().unwrap();
        if *shut {
            self.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        // Bounded, so that a bug shows as a failed assertion, not a hang.
        let (_shut, _) =
            self.opened.wait_timeout_while(shut, std::time::Duration::from_secs(60), |shut| *shut).unwrap();
    }

    fn open(&self) {
        *self.shut.lock().unwrap() = false;
        self.opened.notify_all();
    }

    /// Whether the status write reached the gate (waiting for it up to
    /// 10 s: the background thread may not have run yet). The reads before
    /// this call then came before the status was durable, and the status
    /// was needed.
    fn reached(&self) -> bool {
        let t = std::time::Instant::now();
        while self.held.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            if t.elapsed() > std::time::Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }
}

/// Real files, with the log's syncs behind a [`Gate`].
#[derive(Debug)]
struct GatedVfs(Arc<Gate>);

/// A real file; `sync` passes the gate first if it has one.
#[derive(Debug)]
struct Gated {
    file: Arc<dyn Storage>,
    gate: Option<Arc<Gate>>,
}

impl Storage for Gated {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        if let Some(g) = &self.gate {
            g.pass();
        }
        self.file.sync()
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.file.allocate(offset, len)
    }
    fn raw_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.file.raw_fd()
    }
    fn identity(&self) -> std::io::Result<Option<rvm::log::format::DeviceId>> {
        self.file.identity()
    }
    fn is_unlinked(&self) -> std::io::Result<bool> {
        self.file.is_unlinked()
    }
    fn owner_mark(&self) -> std::io::Result<Option<Vec<u8>>> {
        self.file.owner_mark()
    }
    fn set_owner_mark(&self, mark: Option<&[u8]>) -> std::io::Result<()> {
        self.file.set_owner_mark(mark)
    }
}

impl Vfs for GatedVfs {
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn Storage>> {
        let file = FileVfs.open(path, mode)?;
        let gate = (path.file_name() == Some("log".as_ref())).then(|| self.0.clone());
        Ok(Arc::new(Gated { file, gate }))
    }
    fn open_read_only(&self, path: &Path) -> std::io::Result<Arc<dyn Storage>> {
        FileVfs.open_read_only(path)
    }
    fn canonical_name(&self, path: &Path) -> std::io::Result<PathBuf> {
        FileVfs.canonical_name(path)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        FileVfs.remove(path)
    }
    fn copy(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        FileVfs.copy(from, to)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        FileVfs.rename(from, to)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        FileVfs.exists(path)
    }
}

/// The files of a crashed [`page_log_with`] in `dir`, in place (the same
/// files, so the segment is the one the log recorded: opening it writes no
/// status). Returns the pages' last values.
fn crashed_page_log(dir: &Path, pages: usize, rounds: usize) -> Vec<u64> {
    let crashed = dir.join("crashed");
    let last = page_log_with(dir, pages, rounds, Some(&crashed));
    for f in ["log", "seg"] {
        std::fs::copy(crashed.join(f), dir.join(f)).unwrap();
    }
    last
}

/// An instant open of the files in `dir` with the log's syncs behind
/// `gate`.
fn gated_open(dir: &Path, gate: &Arc<Gate>) -> Rvm {
    Rvm::open_with(Arc::new(GatedVfs(gate.clone())), &dir.join("log"), instant()).unwrap()
}

/// Whether page `p` of `region` holds `value` in every word.
fn page_is(region: &Region, p: usize, value: u64) -> bool {
    let ps = page_size();
    let mut buf = vec![0u8; ps];
    // SAFETY: no transaction writes the page meanwhile.
    unsafe { region.read(p * ps, &mut buf) };
    buf.chunks(8).all(|w| w == value.to_le_bytes())
}

/// Reads right after an instant open, while the status that allows
/// segment writes is held back: four threads fault the same pages at once
/// and see every page whole and final; the segment file is not written
/// meanwhile. A transaction then changes a page brought in that way and
/// commits: the background apply does not undo the change in memory, the
/// segment file ends up as full recovery leaves it, and a crash then
/// recovers the commit.
#[test]
fn faults_before_the_status_is_durable() {
    let pages = 128;
    let ps = page_size();
    let tmp = tempfile::tempdir().unwrap();
    let crashed = tmp.path();
    let last = crashed_page_log(crashed, pages, 4);
    let last = Arc::new(last);
    let seg_before = std::fs::read(crashed.join("seg")).unwrap();
    let gate = Gate::shut();
    let rvm = gated_open(crashed, &gate);
    assert!(rvm.recovery_report().deferred_pages > 0);
    let seg = rvm.open_segment(crashed.join("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, pages * ps)).unwrap();
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            let (region, last) = (region.clone(), last.clone());
            std::thread::spawn(move || {
                for i in 0..pages {
                    // Threads 0 and 1 take the pages in the same order: they
                    // fault the same page at the same time.
                    let p = match t {
                        0 | 1 => i,
                        2 => pages - 1 - i,
                        _ => (i * 37 + 5) % pages,
                    };
                    assert!(page_is(&region, p, last[p]), "thread {t}: page {p} is not whole and final");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every page was read before the status write could end.
    assert!(rvm.query().recovering);
    assert!(gate.reached(), "the status write did not reach the gate");
    assert!(std::fs::read(crashed.join("seg")).unwrap() == seg_before, "a segment write before step 4");

    // A transaction changes page 3 (a private copy) before the status is
    // durable; its commit waits for it.
    let new = vec![0xabu8; ps];
    let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
    // SAFETY: this thread alone writes the region.
    unsafe { t.modify_bytes(region.addr() + 3 * ps, &new).unwrap() };
    gate.open();
    t.commit(CommitMode::Flush).unwrap();
    rvm.wait_for_recovery().unwrap();
    assert!(!rvm.query().recovering);
    let want = page_image(&last);
    // The segment file: every logged page as full recovery writes it (the
    // new commit is in the log only).
    let file = std::fs::read(crashed.join("seg")).unwrap();
    assert!(file == want, "the segment file after the background apply");
    let mut model = want.clone();
    model[3 * ps..4 * ps].copy_from_slice(&new);
    assert!(read_all(&region) == model, "the region after the background apply");

    // A crash now: both kinds of recovery give the model.
    let after = tmp.path().join("after");
    copy_dir(crashed, &after);
    for opts in [full(), instant()] {
        let dir = tmp.path().join("again");
        copy_dir(&after, &dir);
        let opts = opts.accept_segment(tmp.path().join("seg").canonicalize().unwrap(), dir.join("seg"));
        let again = Rvm::open(dir.join("log"), opts).unwrap();
        let s = again.open_segment(dir.join("seg")).unwrap();
        let r = again.map(&s, MapSpec::new(0, pages * ps)).unwrap();
        assert!(read_all(&r) == model, "recovered after the crash");
        again.wait_for_recovery().unwrap();
        drop(r);
        drop(s);
        again.close().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
    drop(region);
    drop(seg);
    rvm.close().unwrap();
}

/// A region unmapped and mapped again while the status is held back: the
/// pages brought into the first mapping are brought into the second one
/// too, and every page equals what full recovery of a copy shows.
#[test]
fn unmap_and_map_again_before_the_status_is_durable() {
    let pages = 64;
    let ps = page_size();
    let tmp = tempfile::tempdir().unwrap();
    let crashed = tmp.path();
    let last = crashed_page_log(crashed, pages, 3);
    let copy = tmp.path().join("copy");
    copy_dir(crashed, &copy);
    let gate = Gate::shut();
    let rvm = gated_open(crashed, &gate);
    let seg = rvm.open_segment(crashed.join("seg")).unwrap();
    // A small region first: a fault installs pending neighbours too, never
    // past the region's end.
    let small = rvm.map(&seg, MapSpec::new(10 * ps as u64, 3 * ps)).unwrap();
    for p in 0..3 {
        assert!(page_is(&small, p, last[10 + p]), "small region: page {p}");
    }
    rvm.unmap(small).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, pages * ps)).unwrap();
    for p in (0..pages).step_by(2) {
        assert!(page_is(&region, p, last[p]), "first mapping: page {p}");
    }
    rvm.unmap(region).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, pages * ps)).unwrap();
    for p in (0..pages).rev() {
        assert!(page_is(&region, p, last[p]), "second mapping: page {p}");
    }
    assert!(gate.reached() && rvm.query().recovering, "the status was written before the reads");
    let opts = full().accept_segment(tmp.path().join("seg").canonicalize().unwrap(), copy.join("seg"));
    let fully = Rvm::open(copy.join("log"), opts).unwrap();
    let cseg = fully.open_segment(copy.join("seg")).unwrap();
    let cregion = fully.map(&cseg, MapSpec::new(0, pages * ps)).unwrap();
    assert!(read_all(&cregion) == read_all(&region), "differs from full recovery");
    gate.open();
    rvm.wait_for_recovery().unwrap();
    assert!(std::fs::read(crashed.join("seg")).unwrap() == read_all(&cregion), "the segment file after the apply");
    assert!(read_all(&region) == read_all(&cregion));
}

/// The pages of a [`page_log`]: every word of page `p` is `last[p]`.
fn page_image(last: &[u64]) -> Vec<u8> {
    last.iter().flat_map(|v| std::iter::repeat_n(v.to_le_bytes(), page_size() / 8).flatten()).collect()
}

/// `Rvm::track` of a region whose pages came in before the status was
/// durable (private copies): it waits for the apply; a tracked transaction
/// then changes such a page, and a crash recovers the commit.
#[test]
fn track_after_faults_before_the_status_is_durable() {
    for method in [TrackingMethod::Fault, TrackingMethod::WriteProtect] {
        let pages = 32;
        let ps = page_size();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let last = crashed_page_log(dir, pages, 2);
        let gate = Gate::shut();
        let rvm = gated_open(dir, &gate);
        let seg = rvm.open_segment(dir.join("seg")).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, pages * ps)).unwrap();
        for (p, &v) in last.iter().enumerate() {
            assert!(page_is(&region, p, v), "{method:?}: page {p}");
        }
        assert!(gate.reached() && rvm.query().recovering, "the status was written before the reads");
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                gate.open();
            })
        };
        let tracked = rvm.track_with(&region, method);
        opener.join().unwrap();
        match tracked {
            Err(e) if method == TrackingMethod::WriteProtect && e.to_string().contains("not available") => {
                eprintln!("skipped: {e}");
                continue;
            }
            r => r.unwrap(),
        }
        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
        // SAFETY: the tracked transaction serializes writers; this thread
        // alone uses the region.
        unsafe { std::ptr::write_bytes((region.addr() + 5 * ps) as *mut u8, 0xcd, ps) };
        tx.commit(CommitMode::Flush).unwrap();
        rvm.wait_for_recovery().unwrap();
        let mut model = page_image(&last);
        model[5 * ps..6 * ps].fill(0xcd);
        assert!(read_all(&region) == model, "{method:?}: the region after the commit");
        // A crash now.
        let after = dir.join("after");
        copy_dir(dir, &after);
        let opts = full().accept_segment(dir.join("seg").canonicalize().unwrap(), after.join("seg"));
        let again = Rvm::open(after.join("log"), opts).unwrap();
        let s = again.open_segment(after.join("seg")).unwrap();
        let r = again.map(&s, MapSpec::new(0, pages * ps)).unwrap();
        assert!(read_all(&r) == model, "{method:?}: recovered after the crash");
    }
}

/// Both recoveries report the verifying scan's progress, ending with the
/// whole log verified (done = total), never going back.
#[test]
fn both_recoveries_report_the_verifying_scan() {
    let _serial = real_files();
    // A small log, and one of about 2 MB live (a report along the way).
    let small: Vec<Tx> = (0..200).map(|i| vec![(i * 97 % 30_000, 40, i as u8)]).collect();
    let big: Vec<Tx> = (0..300).map(|i| vec![(i * 4096 % 49_152, 16_384, i as u8)]).collect();
    for (txs, pages, reports) in [(small, 8, 1), (big, 16, 2)] {
        for opts in [full(), instant(), Options { parallel_scan: true, ..instant() }] {
            let dir = tempfile::tempdir().unwrap();
            make_files(dir.path(), pages, &txs);
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let log = seen.clone();
            let hook = rvm::ProgressHook::new(move |p| log.lock().unwrap().push((p.phase, p.done, p.total)));
            let rvm = Rvm::open(dir.path().join("log"), Options { recovery_progress: Some(hook), ..opts }).unwrap();
            rvm.wait_for_recovery().unwrap();
            let seen = seen.lock().unwrap().clone();
            let verify: Vec<_> = seen.iter().filter(|s| s.0 == rvm::RecoveryPhase::Verify).collect();
            let last = verify.last().expect("no verify report");
            assert!(last.1 > 0 && last.1 == last.2, "{verify:?}");
            assert!(verify.windows(2).all(|w| w[0].1 <= w[1].1), "{verify:?}");
            assert!(verify.len() >= reports, "{verify:?}");
            drop(rvm);
        }
    }
}
