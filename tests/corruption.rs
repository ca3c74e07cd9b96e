//! Corruption tests: damaged and truncated logs on the simulated disk.
//!
//! A small log holding a few committed transactions is built once; its
//! durable image is then damaged in many ways (a bit flipped at every byte
//! of the superblock, of the used part of both status slots and of the
//! written part of the record area; the file cut short at many lengths; the
//! records zeroed from every offset on) and recovery is run on each copy.
//! Recovery must return a typed error, or succeed with the segment equal to
//! the state after a prefix of the committed transactions: never panic and
//! never produce any other state. The read-only inspector
//! (`rvm::log::inspect`) runs on every damaged copy too and must not panic.
//!
//! The default sweep flips three bit positions per byte, cuts the file at
//! every length within the superblock and the written records and at every
//! 512 bytes elsewhere, and fits in a few seconds. Set `RVM_DEEP_TESTS=1`
//! for the full sweep: all eight bits of every byte, and every length.

use rvm::log::format::{Status, AREA_OFFSET, BLOCK, STATUS_FIXED, STATUS_SLOT};
use rvm::log::inspect;
use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Once};

const LOG: &str = "log";
const SEG: &str = "seg";
const LOG_SIZE: u64 = 256 << 10;

fn deep() -> bool {
    std::env::var("RVM_DEEP_TESTS").is_ok_and(|v| v == "1")
}

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

/// The committed log and what recovery may turn the segment into.
struct Fixture {
    disk: SimDisk,
    vfs: Arc<dyn Vfs>,
    log: Vec<u8>,
    seg: Vec<u8>,
    /// Segment contents after each prefix of the commits (`states[0]` is
    /// the segment before any).
    states: Vec<Vec<u8>>,
    /// Device offsets of the written records: `[records.0, records.1)`.
    records: (usize, usize),
    /// Device offsets of the used bytes of each status slot.
    slots: [(usize, usize); 2],
    /// Log transactions in the log (no-flush commits share one).
    log_transactions: u64,
}

/// One commit: (segment offset, bytes) pairs.
type Tx = Vec<(usize, Vec<u8>)>;

fn build() -> Fixture {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let log = Path::new(LOG);
    create_log_with(vfs.as_ref(), log, LOG_SIZE).unwrap();
    let ps = page_size();
    let txs: Vec<(CommitMode, Tx)> = vec![
        (CommitMode::Flush, vec![(100, b"first".to_vec())]),
        (CommitMode::Flush, vec![(0, b"AAAA".to_vec()), (3000, b"BBBBBBBB".to_vec())]),
        // Long enough for its frame to cross a sector boundary.
        (CommitMode::Flush, vec![(1000, (0..600u32).map(|i| (i * 7 + 1) as u8).collect())]),
        // Two no-flush commits that the flush commit after them writes,
        // together with itself, as one log transaction.
        (CommitMode::NoFlush, vec![(100, b"second!!".to_vec())]),
        (CommitMode::NoFlush, vec![(2000, b"CCCCCCCC".to_vec()), (1010, b"DD".to_vec())]),
        (CommitMode::Flush, vec![(96, vec![0xEE; 16])]),
    ];
    let mut states = vec![vec![0u8; ps]];
    let (head, tail);
    {
        let rvm = Rvm::open_with(vfs.clone(), log, opts()).unwrap();
        let s = rvm.create_segment(SEG, ps as u64).unwrap();
        let r = rvm.map(&s, MapSpec::new(0, ps)).unwrap();
        head = rvm.query().head;
        for (mode, tx) in &txs {
            let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
            let mut state = states.last().unwrap().clone();
            for (off, bytes) in tx {
                // SAFETY: single-threaded test; nothing else touches the region.
                unsafe { t.modify_bytes(r.addr() + off, bytes).unwrap() };
                state[*off..off + bytes.len()].copy_from_slice(bytes);
            }
            t.commit(*mode).unwrap();
            states.push(state);
        }
        tail = rvm.query().tail;
        assert_eq!(rvm.query().durable, tail, "everything must be durable before the crash");
        disk.crash(CrashMode::LoseUnsynced);
    }
    // The durable images, taken before any reopen (which would recover and
    // empty the log).
    let log_img = disk.durable_image(LOG).unwrap();
    let seg_img = disk.durable_image(SEG).unwrap();
    assert_eq!(seg_img, states[0], "nothing may reach the segment before truncation");
    let area_len = log_img.len() as u64 - AREA_OFFSET;
    assert!(tail - head < area_len && head % area_len + (tail - head) <= area_len, "records must not wrap");
    let start = (AREA_OFFSET + head % area_len) as usize;
    let records = (start, start + (tail - head) as usize);

    let report = inspect::inspect(&disk, log).unwrap();
    let used = |i: usize| {
        let st = report.slots[i].valid_status().expect("both slots valid");
        let at = (BLOCK + i as u64 * STATUS_SLOT) as usize;
        (at, at + STATUS_FIXED + Status::dict_len(&st.segments))
    };
    let slots = [used(0), used(1)];
    let scan = report.scan.unwrap();
    assert_eq!((scan.start, scan.end, scan.discarded), (head, tail, 0));
    Fixture { disk, vfs, log: log_img, seg: seg_img, states, records, slots, log_transactions: scan.transactions }
}

/// What a recovery attempt gave.
#[derive(Debug)]
enum Outcome {
    /// A typed error (its kind, for the summary).
    Refused(&'static str),
    /// Recovery succeeded; the segment shows the state after this many commits.
    Prefix(usize),
}

fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Io { .. } => "io",
        Error::Corrupted { .. } => "corrupted",
        Error::Locked { .. } => "locked",
        Error::Log(LogError::NotALog { .. }) => "not a log",
        Error::Log(LogError::UnsupportedVersion { .. }) => "unsupported version",
        Error::Log(LogError::MissingSegment { .. }) => "missing segment",
        Error::Log(_) => "other log error",
        _ => "other",
    }
}

thread_local! {
    /// While set, panics on this thread are expected to be caught and
    /// reported by the sweep, so the panic hook stays quiet.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
}

impl Fixture {
    /// Installs `log` as the log's durable image (and the segment's
    /// original image), runs the inspector and recovery, and judges the
    /// result. `Err` describes a violation.
    fn trial(&self, log: Vec<u8>) -> Result<Outcome, String> {
        self.disk.set_durable_image(LOG, log);
        self.disk.set_durable_image(SEG, self.seg.clone());
        QUIET.with(|q| q.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| {
            // Inspection never writes; it may fail but must not panic.
            let _ = inspect::inspect(&self.disk, Path::new(LOG));
            Rvm::open_with(self.vfs.clone(), Path::new(LOG), opts()).map(|rvm| rvm.recovery_report())
        }));
        QUIET.with(|q| q.set(false));
        let recovered = match r {
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(format!("panicked: {msg}"));
            }
            Ok(Err(e)) => {
                return match e {
                    Error::Io { .. }
                    | Error::Corrupted { .. }
                    | Error::Log(LogError::NotALog { .. } | LogError::UnsupportedVersion { .. }) => {
                        Ok(Outcome::Refused(error_kind(&e)))
                    }
                    // The segment is there: nothing else is an acceptable refusal.
                    e => Err(format!("unexpected error: {e}")),
                };
            }
            Ok(Ok(report)) => report,
        };
        if recovered.transactions > self.log_transactions {
            return Err(format!(
                "replayed {} transactions, the log holds {}",
                recovered.transactions, self.log_transactions
            ));
        }
        let seg = self.disk.live_image(SEG).unwrap_or_default();
        match self.states.iter().position(|s| *s == seg) {
            Some(k) => Ok(Outcome::Prefix(k)),
            None => Err(format!("segment is not a prefix state after recovery ({recovered:?})")),
        }
    }
}

/// Collects outcomes and violations over a sweep.
#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, usize>,
    violations: Vec<String>,
    trials: usize,
}

impl Tally {
    fn record(&mut self, what: impl FnOnce() -> String, r: Result<Outcome, String>) {
        self.trials += 1;
        match r {
            Ok(Outcome::Refused(kind)) => *self.outcomes.entry(format!("error: {kind}")).or_default() += 1,
            Ok(Outcome::Prefix(k)) => *self.outcomes.entry(format!("prefix of {k} commits")).or_default() += 1,
            Err(v) => {
                *self.outcomes.entry("VIOLATION".into()).or_default() += 1;
                if self.violations.len() < 20 {
                    self.violations.push(format!("{}: {v}", what()));
                }
            }
        }
    }

    fn finish(self, name: &str) {
        eprintln!("{name}: {} trials: {:?}", self.trials, self.outcomes);
        assert!(self.violations.is_empty(), "{name}: violations (first 20):\n{}", self.violations.join("\n"));
    }
}

/// Bit positions flipped at each byte.
fn bits() -> Vec<u8> {
    if deep() {
        (0..8).collect()
    } else {
        vec![0, 3, 7]
    }
}

/// Flips each chosen bit of every byte in `range` and runs recovery.
fn flip_sweep(fx: &Fixture, name: &str, range: std::ops::Range<usize>, tally: &mut Tally) {
    for at in range {
        for bit in bits() {
            let mut img = fx.log.clone();
            img[at] ^= 1 << bit;
            tally.record(|| format!("{name}: bit {bit} of byte {at}"), fx.trial(img));
        }
    }
}

#[test]
fn the_undamaged_log_recovers_everything() {
    let fx = build();
    for _ in 0..2 {
        let r = fx.trial(fx.log.clone());
        assert!(matches!(r, Ok(Outcome::Prefix(k)) if k == fx.states.len() - 1), "{r:?}");
    }
}

#[test]
fn bit_flips_in_the_superblock() {
    install_quiet_hook();
    let fx = build();
    let mut tally = Tally::default();
    // The superblock's fields and checksum take 64 bytes; the rest of the
    // block is zero padding, which is swept too.
    flip_sweep(&fx, "superblock", 0..BLOCK as usize, &mut tally);
    let full = format!("prefix of {} commits", fx.states.len() - 1);
    let survived = tally.outcomes.get(&full).copied().unwrap_or(0);
    tally.finish("superblock");
    // Every flip of a field or of the checksum is refused; padding is ignored.
    assert_eq!(survived, (BLOCK as usize - 64) * bits().len());
}

#[test]
fn bit_flips_in_the_status_slots() {
    install_quiet_hook();
    let fx = build();
    let mut tally = Tally::default();
    for (i, &(start, end)) in fx.slots.iter().enumerate() {
        // The used bytes, and a few after them (never part of a status).
        flip_sweep(&fx, &format!("status slot {i}"), start..end + 16, &mut tally);
    }
    tally.finish("status slots");
}

#[test]
fn bit_flips_in_the_records() {
    install_quiet_hook();
    let fx = build();
    let mut tally = Tally::default();
    let (start, end) = fx.records;
    // The written records and the block after them (stale or zero bytes).
    flip_sweep(&fx, "records", start..end + 64, &mut tally);
    // A flip in a record that synced records follow is refused, never
    // recovered as a shorter prefix; only damage to the last transaction
    // (nothing after it proves it was synced) can end the log early. The
    // last log transaction covers the fixture's last three commits.
    let full = fx.states.len() - 1;
    let before_last = full - 3;
    let shorter: Vec<&String> = tally
        .outcomes
        .keys()
        .filter(|k| k.starts_with("prefix of ") && **k != format!("prefix of {full} commits"))
        .collect();
    assert!(
        shorter.iter().all(|k| **k == format!("prefix of {before_last} commits")),
        "damage before the last transaction was accepted: {:?}",
        tally.outcomes
    );
    assert!(tally.outcomes.keys().any(|k| k.starts_with("error: corrupted")), "{:?}", tally.outcomes);
    tally.finish("records");
}

#[test]
fn truncated_log_files() {
    install_quiet_hook();
    let fx = build();
    let mut tally = Tally::default();
    let len = fx.log.len();
    let (start, end) = fx.records;
    let lens: Vec<usize> = if deep() {
        (0..len).collect()
    } else {
        let mut v: Vec<usize> = (0..BLOCK as usize).chain((0..len).step_by(512)).chain(start..=end).collect();
        v.extend([len - 1, AREA_OFFSET as usize - 1, AREA_OFFSET as usize + 1]);
        v.sort_unstable();
        v.dedup();
        v
    };
    for n in lens {
        tally.record(|| format!("truncated to {n} bytes"), fx.trial(fx.log[..n].to_vec()));
    }
    tally.finish("truncation");
}

/// The records lost from some offset on (a crash that kept a prefix of the
/// log writes, with the last one torn): every result is a prefix.
#[test]
fn records_zeroed_from_every_offset() {
    install_quiet_hook();
    let fx = build();
    let mut tally = Tally::default();
    let (start, end) = fx.records;
    let mut seen_prefixes = std::collections::BTreeSet::new();
    for cut in start..=end {
        let mut img = fx.log.clone();
        img[cut..end].fill(0);
        let r = fx.trial(img);
        match &r {
            Ok(Outcome::Prefix(k)) => {
                seen_prefixes.insert(*k);
            }
            Ok(Outcome::Refused(kind)) => panic!("zeroing from {cut} refused ({kind}); a lost tail must recover"),
            Err(_) => {}
        }
        tally.record(|| format!("records zeroed from byte {cut}"), r);
    }
    // Commits 4 and 5 (no-flush) and 6 (the flush that wrote them) went to
    // the log as one transaction.
    assert_eq!(seen_prefixes.into_iter().collect::<Vec<_>>(), [0, 1, 2, 3, 6]);
    tally.finish("zeroed tail");
}

/// Statuses with a valid checksum but extreme field values: hostile input
/// rather than random damage, which the checksum catches. Recovery must
/// refuse them or recover a prefix, never panic.
fn crafted_status_case(name: &str, edit: impl FnOnce(&mut Status)) -> Result<Outcome, String> {
    let fx = build();
    let slot0 = BLOCK as usize;
    let mut status = Status::decode(&fx.log[slot0..slot0 + STATUS_SLOT as usize]).expect("slot 0 is valid");
    edit(&mut status);
    let mut img = fx.log.clone();
    let at = Status::slot_offset(status.seq) as usize;
    let bytes = status.encode().expect("fits");
    img[at..at + bytes.len()].copy_from_slice(&bytes);
    install_quiet_hook();
    let r = fx.trial(img);
    eprintln!("{name}: {r:?}");
    r
}

#[test]
fn crafted_status_with_extreme_head() {
    let area_len = LOG_SIZE - AREA_OFFSET;
    for head in [u64::MAX, u64::MAX - area_len, u64::MAX - area_len - 4096, 1 << 63] {
        let r = crafted_status_case("head", |s| s.head = head);
        assert!(r.is_ok(), "head {head}: {r:?}");
    }
}

#[test]
fn crafted_status_with_extreme_ids_and_checkpoint() {
    for (name, r) in [
        ("next_segment_id", crafted_status_case("next_segment_id", |s| s.next_segment_id = u32::MAX)),
        ("synced_end", crafted_status_case("synced_end", |s| s.synced_end = u64::MAX)),
        (
            "checkpoint",
            crafted_status_case("checkpoint", |s| {
                s.checkpoint_lsn = u64::MAX;
                s.checkpoint_generation = u64::MAX;
            }),
        ),
    ] {
        assert!(r.is_ok(), "{name}: {r:?}");
    }
}

/// Writes a status with a valid checksum into the log image of a fresh
/// fixture and returns the fixture with the image installed.
fn install_crafted_status(edit: impl FnOnce(&mut Status)) -> Fixture {
    let fx = build();
    let slot0 = BLOCK as usize;
    let mut status = Status::decode(&fx.log[slot0..slot0 + STATUS_SLOT as usize]).expect("slot 0 is valid");
    edit(&mut status);
    let mut img = fx.log.clone();
    let at = Status::slot_offset(status.seq) as usize;
    let bytes = status.encode().expect("fits");
    img[at..at + bytes.len()].copy_from_slice(&bytes);
    fx.disk.set_durable_image(LOG, img);
    fx
}

/// Opens the log (running recovery), then opens the segment (which writes
/// another status). Either may refuse; neither may panic.
fn open_after_crafted_status(fx: &Fixture) {
    if let Ok(rvm) = Rvm::open_with(fx.vfs.clone(), Path::new(LOG), opts()) {
        let _ = rvm.open_segment(SEG);
    }
}

#[test]
fn crafted_status_with_maximal_seq() {
    open_after_crafted_status(&install_crafted_status(|s| s.seq = u64::MAX));
}

#[test]
fn crafted_status_with_nearly_maximal_seq() {
    open_after_crafted_status(&install_crafted_status(|s| s.seq = u64::MAX - 1));
}

#[test]
fn crafted_status_with_maximal_epoch() {
    open_after_crafted_status(&install_crafted_status(|s| s.epoch = u64::MAX));
}

#[test]
fn crafted_status_with_maximal_committed_count() {
    open_after_crafted_status(&install_crafted_status(|s| s.committed = u64::MAX));
}
