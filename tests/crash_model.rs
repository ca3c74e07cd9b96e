//! The crash model: random workloads on the simulated disk, checked against a
//! reference model of what the durability rules allow.
//!
//! A workload is a sequence of [`Op`]s: begin (both restore modes), declare
//! and store (`set_range` + plain stores, or `modify_bytes`), commit (both
//! modes), abort (explicit and by drop), flush, truncate, unmap + map again,
//! a clean close + reopen, and a crash (losing unsynced writes, or keeping a
//! random subset of them with the last sector torn) followed by a reopen.
//! One transaction is open at a time (a nested begin must be refused).
//!
//! The [`Model`] keeps the committed transactions since the last (re)open,
//! in commit order, with the bytes each one wrote, and the index `durable`
//! of the last commit known durable (a flush commit, `flush()` or
//! `truncate()` makes every earlier commit durable). After a crash and
//! reopen the segment must hold the image after some prefix `0..=k` of those
//! commits with `durable <= k`: nothing uncommitted, never part of a
//! transaction. The recovered image becomes the model's new base.
//!
//! Along the way the model also checks memory (a commit leaves the committed
//! bytes in the region; a restore-mode abort brings back the old bytes
//! exactly), the segment's image (only ever a committed prefix: no steal;
//! and recovery never goes behind it: WAL), statistics and `query()`.
//!
//! Case counts: each property runs [`DEFAULT_CASES`] cases unless the
//! `PROPTEST_CASES` environment variable asks for more (or fewer), e.g.
//! `PROPTEST_CASES=2000 cargo test --release --test crash_model`. Shrunk
//! failures are saved in `tests/proptest-regressions/crash_model.txt` and
//! replayed first on the next run; each real failure found is also kept
//! below as a named deterministic test (`regression_*`).

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};
use rvm::log::format::{transaction_bytes_max, AREA_OFFSET, MIN_AREA};
use rvm::testing::{CrashMode, SimDisk};
use rvm::*;
use std::path::Path;
use std::sync::Arc;

const LOG: &str = "log";
const SEG: &str = "seg";

/// Cases per property when `PROPTEST_CASES` is not set (keeps the file
/// well under a minute in a debug build on two cores).
const DEFAULT_CASES: u32 = 48;

/// Proptest configuration: `cases` unless `PROPTEST_CASES` overrides it,
/// failures persisted under `tests/proptest-regressions/`.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/crash_model.txt"
        )))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------

/// The setup a workload runs on.
#[derive(Clone, Debug)]
struct Cfg {
    log_size: u64,
    seg_pages: usize,
    opts: Options,
}

impl Cfg {
    /// A roomy log (1 MiB): no wrap-around in a typical workload.
    fn roomy(coalesce: bool) -> Cfg {
        Cfg {
            log_size: 1 << 20,
            seg_pages: 8,
            opts: Options { coalesce, truncate_threshold: None, ..Options::default() },
        }
    }

    /// The smallest log there is (64 KiB of records) and the smallest
    /// pending limit: batches spill often, the log wraps around and fills
    /// up, and writers truncate to make room.
    fn tiny(coalesce: bool) -> Cfg {
        Cfg {
            log_size: AREA_OFFSET + MIN_AREA,
            seg_pages: 8,
            opts: Options { coalesce, pending_limit: 4096, truncate_threshold: None, ..Options::default() },
        }
    }

    /// With instant recovery (`Options::instant_recovery`): every reopen
    /// leaves the apply to a background thread (on the simulated disk a
    /// map waits for it; the world then waits for it to be durable).
    fn instant(mut self) -> Cfg {
        self.opts.instant_recovery = true;
        self
    }

    /// The smallest log: writers may truncate (and so settle a running
    /// checkpoint) whenever they commit.
    fn tiny_log(&self) -> bool {
        self.log_size == AREA_OFFSET + MIN_AREA
    }

    fn seg_len(&self) -> usize {
        self.seg_pages * page_size()
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// One step of a workload. Offsets are segment (= region) offsets and are
/// clamped into the segment when run.
#[derive(Clone, Debug)]
enum Op {
    /// Begin a transaction (inside one: a nested begin, which must fail).
    Begin(RestoreMode),
    /// `set_range(off, len)`, then plain stores of fresh bytes into
    /// `[off + store_at, off + store_at + store_len)` (a part of the range,
    /// possibly empty). Outside a transaction it begins one (restore mode).
    SetRange { off: usize, len: usize, store_at: usize, store_len: usize },
    /// `modify_bytes(off, fresh bytes of len)`; begins a transaction if none.
    Modify { off: usize, len: usize },
    /// Commit the open transaction (no-op without one).
    Commit(CommitMode),
    /// Abort it explicitly.
    Abort,
    /// Drop it (abort by drop).
    Drop,
    /// `Rvm::flush`.
    Flush,
    /// `Rvm::truncate`.
    Truncate,
    /// Crash the disk (an open transaction is in flight at the crash), then
    /// reopen the instance, open the segment and map it again.
    Crash(CrashMode),
    /// Close cleanly (an open transaction is dropped first) and reopen.
    Reopen,
    /// Unmap the region and map it again (inside a transaction that has
    /// declared ranges: unmap must be refused).
    Remap,
    /// `Rvm::checkpoint_start`: the freeze (and the pages rebuilt from the
    /// log); inside a transaction, the transaction is in flight across it.
    CkptStart,
    /// `Rvm::checkpoint_step(n)`: sweep up to n pages.
    CkptStep(usize),
    /// `Rvm::checkpoint_finish`.
    CkptFinish,
    /// `Rvm::checkpoint`: a whole checkpoint.
    Checkpoint,
    /// `Rvm::checkpoint_abandon`: stop the running checkpoint part-way.
    CkptAbandon,
    /// Media damage: the next restart (after a crash or a clean close)
    /// finds this damage in the log's durable image.
    Damage(MediaDamage),
}

/// Where media damage hits the log: a bit flip or a zeroed 512-byte sector.
#[derive(Clone, Copy, Debug)]
struct MediaDamage {
    spot: Spot,
    /// Picks the byte within the spot.
    pick: u64,
    /// Zero the sector around the byte instead of flipping `bit` of it.
    zero_sector: bool,
    bit: u8,
}

#[derive(Clone, Copy, Debug)]
enum Spot {
    /// The live record area, from the head to a little past the last valid
    /// frame.
    Records,
    /// The used bytes of status slot 0 or 1.
    Slot(u8),
    /// The superblock's fields.
    Superblock,
}

use Op::*;

const R: RestoreMode = RestoreMode::Restore;
const NR: RestoreMode = RestoreMode::NoRestore;
const F: CommitMode = CommitMode::Flush;
const NF: CommitMode = CommitMode::NoFlush;

fn keep(seed: u64) -> CrashMode {
    CrashMode::KeepRandomSubset { seed, tear_last: true }
}

fn op_strategy(seg_len: usize, max_big: usize) -> impl Strategy<Value = Op> {
    // Ranges overlap and touch often: most live in a hot 512-byte window at
    // 8-byte granularity; some cross sectors, some cross pages.
    let range = prop_oneof![
        5 => (0usize..64, 1usize..=8).prop_map(|(o, l)| (o * 8, l * 8)),
        3 => (0usize..512, 1usize..=64),
        2 => (0..seg_len, 1usize..=700),
        1 => (0..seg_len, 1..=max_big),
    ];
    let restore = prop_oneof![Just(R), Just(NR)];
    let commit = prop_oneof![1 => Just(F), 2 => Just(NF)];
    let crash = prop_oneof![
        1 => Just(CrashMode::LoseUnsynced),
        3 => (any::<u64>(), any::<bool>()).prop_map(|(seed, tear_last)| CrashMode::KeepRandomSubset { seed, tear_last }),
    ];
    prop_oneof![
        8 => restore.prop_map(Begin),
        12 => range.clone().prop_map(|(off, len)| Modify { off, len }),
        10 => (range, any::<u16>(), any::<u16>()).prop_map(|((off, len), a, b)| {
            let store_at = a as usize % len;
            let store_len = b as usize % (len - store_at + 1);
            SetRange { off, len, store_at, store_len }
        }),
        10 => commit.prop_map(Commit),
        2 => Just(Abort),
        2 => Just(Drop),
        2 => Just(Flush),
        1 => Just(Truncate),
        2 => crash.prop_map(Crash),
        1 => Just(Reopen),
        1 => Just(Remap),
        2 => Just(CkptStart),
        2 => (1usize..4).prop_map(CkptStep),
        1 => Just(CkptFinish),
        1 => Just(Checkpoint),
        1 => Just(CkptAbandon),
        2 => (
            prop_oneof![4 => Just(Spot::Records), 2 => (0u8..2).prop_map(Spot::Slot), 1 => Just(Spot::Superblock)],
            any::<u64>(),
            prop::bool::weighted(0.3),
            0u8..8
        )
            .prop_map(|(spot, pick, zero_sector, bit)| Damage(MediaDamage { spot, pick, zero_sector, bit })),
    ]
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

/// The writes of one committed transaction: (offset, bytes), in order.
type Writes = Vec<(usize, Vec<u8>)>;

#[derive(Debug)]
struct Model {
    /// The segment's image at the last (re)open: everything in it is durable.
    base: Vec<u8>,
    /// Transactions committed since then, in commit order.
    commits: Vec<Writes>,
    /// Commits `0..durable` are known durable.
    durable: usize,
    /// What the mapped region holds now (including uncommitted stores).
    mem: Vec<u8>,
}

impl Model {
    fn new(base: Vec<u8>) -> Model {
        Model { mem: base.clone(), base, commits: Vec::new(), durable: 0 }
    }

    fn n(&self) -> usize {
        self.commits.len()
    }

    fn apply(img: &mut [u8], writes: &Writes) {
        for (off, bytes) in writes {
            img[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// The image after commits `0..k`.
    fn state(&self, k: usize) -> Vec<u8> {
        let mut s = self.base.clone();
        for c in &self.commits[..k] {
            Model::apply(&mut s, c);
        }
        s
    }

    /// Every `k` whose prefix image equals `img`.
    fn matching_prefixes(&self, img: &[u8]) -> Vec<usize> {
        let mut s = self.base.clone();
        let mut out = Vec::new();
        if s == img {
            out.push(0);
        }
        for (k, c) in self.commits.iter().enumerate() {
            Model::apply(&mut s, c);
            if s == img {
                out.push(k + 1);
            }
        }
        out
    }

    /// The first byte of `img` whose value it had in no committed state
    /// `0..=n` (the no-steal rule, byte by byte).
    fn uncommitted_byte(&self, img: &[u8]) -> Option<usize> {
        let mut s = self.base.clone();
        let mut ok: Vec<bool> = s.iter().zip(img).map(|(a, b)| a == b).collect();
        for c in &self.commits {
            Model::apply(&mut s, c);
            for (o, bytes) in c {
                for i in *o..*o + bytes.len() {
                    ok[i] |= s[i] == img[i];
                }
            }
        }
        ok.iter().position(|&b| !b)
    }

    /// A readable account of how `img` differs from the allowed states.
    fn explain(&self, img: &[u8]) -> String {
        let mut out = format!("{} commits since open, durable prefix {}\n", self.n(), self.durable);
        for k in [self.durable, self.n()] {
            let s = self.state(k);
            out += &format!("  vs state after {k} commits: {}\n", diff(&s, img));
        }
        for (i, c) in self.commits.iter().enumerate() {
            let ranges: Vec<_> = c.iter().map(|(o, b)| (*o, b.len(), b.first().copied())).collect();
            out += &format!("  commit {i}: (offset, len, first byte) {ranges:?}\n");
        }
        out
    }

    /// After a crash and recovery: `img` is the new durable base.
    fn rebase(&mut self, img: Vec<u8>) {
        self.mem = img.clone();
        self.base = img;
        self.commits.clear();
        self.durable = 0;
    }
}

fn diff(want: &[u8], got: &[u8]) -> String {
    if want.len() != got.len() {
        return format!("length {} vs {}", want.len(), got.len());
    }
    let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
    match (bad.first(), bad.last()) {
        (None, _) => "equal".into(),
        (Some(&a), Some(&b)) => {
            format!("{} bytes differ in [{a}, {b}]; at {a}: want {:#04x} got {:#04x}", bad.len(), want[a], got[a])
        }
        _ => unreachable!(),
    }
}

/// Fresh bytes for the `w`-th store of a workload: never zero, and a run
/// of them is unlikely to equal any earlier run.
fn fresh(w: u32, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((w as usize * 37 + j * 7) % 251 + 1) as u8 ^ (w >> 8) as u8 | 1).collect()
}

/// Log bytes one transaction needs, as `commit` computes it.
fn log_needed(declared: &[(usize, usize)], coalesce: bool) -> u64 {
    let mut spans: Vec<(usize, usize)> = declared.to_vec();
    if coalesce && spans.len() > 1 {
        spans.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (a, l) in spans {
            match merged.last_mut() {
                Some(m) if a <= m.0 + m.1 => m.1 = m.1.max(a + l - m.0),
                _ => merged.push((a, l)),
            }
        }
        spans = merged;
    }
    transaction_bytes_max(spans.len() as u64, spans.iter().map(|&(_, l)| l as u64).sum())
}

// ---------------------------------------------------------------------------
// Running a workload
// ---------------------------------------------------------------------------

/// An open instance with the segment mapped. Fields drop in order: region,
/// segment, instance.
struct Inst {
    region: Region,
    seg: Segment,
    rvm: Rvm,
}

fn read_region(r: &Region) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(0, &mut v) }.unwrap();
    v
}

/// What the instance's statistics must say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Expect {
    begun: u64,
    committed: u64,
    aborted: u64,
    flush_commits: u64,
    no_flush_commits: u64,
}

/// The rule for a segment's image found before recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Before {
    /// Exactly the state after some prefix of the commits (truncations and
    /// recoveries always finished).
    Prefix,
    /// Every byte holds a value it had in some committed state (a
    /// truncation or recovery may have stopped part-way, which writes
    /// committed bytes in segment order, not commit order).
    CommittedBytes,
}

struct World {
    cfg: Cfg,
    disk: SimDisk,
    vfs: Arc<dyn Vfs>,
    model: Model,
    expect: Expect,
    /// Stores issued so far (seeds `fresh`).
    w: u32,
    /// Operations run so far (for messages).
    step: usize,
    /// What the segment's image before recovery must be.
    before: Before,
    /// Commits in the model when the running checkpoint froze.
    ckpt: Option<usize>,
    /// An abandoned checkpoint left pages of two states in the segment
    /// (until the next checkpoint or truncation completes).
    mixed: bool,
    /// Media damage the next restart finds in the log.
    damage: Option<MediaDamage>,
}

impl World {
    fn new(cfg: &Cfg) -> (World, Inst) {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        create_log_with(vfs.as_ref(), Path::new(LOG), cfg.log_size).unwrap();
        let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), cfg.opts.clone()).unwrap();
        let seg = rvm.create_segment(SEG, cfg.seg_len() as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, cfg.seg_len())).unwrap();
        let model = Model::new(vec![0; cfg.seg_len()]);
        let world = World {
            cfg: cfg.clone(),
            disk,
            vfs,
            model,
            expect: Expect::default(),
            w: 0,
            step: 0,
            before: Before::Prefix,
            ckpt: None,
            mixed: false,
            damage: None,
        };
        (world, Inst { region, seg, rvm })
    }

    fn open(&self) -> Inst {
        let rvm = Rvm::open_with(self.vfs.clone(), Path::new(LOG), self.cfg.opts.clone())
            .unwrap_or_else(|e| panic!("step {}: reopen failed: {e}", self.step));
        let seg = rvm.open_segment(SEG).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, self.cfg.seg_len())).unwrap();
        rvm.wait_for_recovery().unwrap_or_else(|e| panic!("step {}: instant recovery failed: {e}", self.step));
        Inst { region, seg, rvm }
    }

    /// Damages the log's durable image as `d` says and opens it. The open
    /// must either succeed (then the usual prefix checks run; `false` is
    /// returned when the damage was undetectable by design: nothing after
    /// it proves it was synced) or fail with a typed corruption error
    /// having written nothing, after which the damage is repaired and the
    /// open must succeed. One damaged status slot must never stop an open
    /// while the other is valid.
    fn open_damaged(&mut self, d: MediaDamage) -> (Inst, bool) {
        use rvm::log::inspect::{FrameBody, LogInspector};
        let clean = self.disk.durable_image(LOG).unwrap();
        let seg = (self.disk.durable_image(SEG).unwrap(), self.disk.live_image(SEG).unwrap());
        let (range, must_open, detectable) = {
            let log = LogInspector::open(self.vfs.as_ref(), Path::new(LOG))
                .unwrap_or_else(|e| panic!("step {}: inspecting the undamaged log failed: {e}", self.step));
            let sb = log.superblock();
            let status = log.status().unwrap_or_else(|e| panic!("step {}: undamaged log: {e}", self.step)).clone();
            let mut commits = Vec::new(); // (lsn, synced)
            let mut valid_end = status.head;
            let scan = log
                .walk(|f| {
                    valid_end = f.lsn + u64::from(f.len);
                    if let FrameBody::Commit { synced, .. } = f.body {
                        commits.push((f.lsn, synced));
                    }
                })
                .unwrap();
            assert!(scan.damage.is_none(), "step {}: the undamaged log reports damage: {scan:?}", self.step);
            let sector = |at: usize| at & !511;
            match d.spot {
                Spot::Records => {
                    let lsn = status.head + d.pick % (valid_end - status.head + 64);
                    let at = (sb.area_offset + lsn % sb.area_len) as usize;
                    let (start, len) = if d.zero_sector { (sector(at), 512) } else { (at, 1) };
                    // Only bytes the damage changes count: zeroing a
                    // record's padding (zeros already) leaves the record
                    // valid, and the first record it spoils may lie past
                    // every proof of a sync.
                    let changed = |p: &usize| !d.zero_sector || clean[*p] != 0;
                    let from = (start..start + len).find(changed).unwrap_or(start + len);
                    let to = (start..start + len).rev().find(changed).map_or(from, |p| p + 1);
                    // Bytes before the head are freed: the first live
                    // damaged byte is where the scan can stop.
                    let first = (lsn + from as u64 - at as u64).max(status.head);
                    let last = lsn + to as u64 - at as u64;
                    let proved = status.synced_end > first || commits.iter().any(|&(c, s)| c >= last && s > first);
                    (start..start + len, false, proved)
                }
                Spot::Slot(i) => {
                    let slot = &log.slots()[usize::from(i)];
                    let used = slot.status.as_ref().map_or(80, |s| s.encode().map_or(80, |b| b.len()));
                    let at = slot.offset as usize + (d.pick % used as u64) as usize;
                    let other_valid = log.slots()[usize::from(1 - i)].is_valid();
                    let range = if d.zero_sector { sector(at)..sector(at) + 512 } else { at..at + 1 };
                    (range, other_valid, true)
                }
                Spot::Superblock => {
                    let at = (d.pick % 64) as usize;
                    let range = if d.zero_sector { 0..512 } else { at..at + 1 };
                    (range, false, true)
                }
            }
        };
        let mut img = clean.clone();
        if d.zero_sector {
            img[range].fill(0);
        } else {
            img[range.start] ^= 1 << d.bit;
        }
        self.disk.set_durable_image(LOG, img.clone());
        match Rvm::open_with(self.vfs.clone(), Path::new(LOG), self.cfg.opts.clone()) {
            Ok(rvm) => {
                let seg = rvm.open_segment(SEG).unwrap();
                let region = rvm.map(&seg, MapSpec::new(0, self.cfg.seg_len())).unwrap();
                rvm.wait_for_recovery().unwrap_or_else(|e| panic!("step {}: instant recovery failed: {e}", self.step));
                (Inst { region, seg, rvm }, detectable)
            }
            Err(e) => {
                assert!(!must_open, "step {}: one damaged status slot ({d:?}) stopped the open: {e}", self.step);
                assert!(
                    matches!(
                        e,
                        Error::Corrupted { .. }
                            | Error::Log(LogError::NotALog { .. } | LogError::UnsupportedVersion { .. })
                    ),
                    "step {}: damage {d:?} gave an untyped error: {e:?}",
                    self.step
                );
                assert!(
                    self.disk.durable_image(LOG).unwrap() == img && self.disk.live_image(LOG).unwrap() == img,
                    "step {}: a refused open wrote to the log",
                    self.step
                );
                assert!(
                    (self.disk.durable_image(SEG).unwrap(), self.disk.live_image(SEG).unwrap()) == seg,
                    "step {}: a refused open wrote to the segment",
                    self.step
                );
                self.disk.set_durable_image(LOG, clean);
                (self.open(), true)
            }
        }
    }

    fn clamp(&self, off: usize, len: usize) -> (usize, usize) {
        let seg_len = self.cfg.seg_len();
        let len = len.clamp(1, seg_len);
        (off.min(seg_len - len), len)
    }

    /// Checks that the region shows exactly what the model expects.
    fn check_mem(&self, inst: &Inst, what: &str) {
        let got = read_region(&inst.region);
        assert!(
            got == self.model.mem,
            "step {}: {what}: region differs from the model: {}",
            self.step,
            diff(&self.model.mem, &got)
        );
    }

    fn check_stats(&self, inst: &Inst, in_flight: usize) {
        let s = inst.rvm.stats();
        let got = Expect {
            begun: s.begun,
            committed: s.committed,
            aborted: s.aborted,
            flush_commits: s.flush_commits,
            no_flush_commits: s.no_flush_commits,
        };
        assert_eq!(got, self.expect, "step {}: statistics", self.step);
        assert_eq!(inst.rvm.query().in_flight, in_flight, "step {}: in-flight transactions", self.step);
    }

    /// After `flush` or `truncate`: everything committed is durable.
    fn all_durable(&mut self) {
        self.model.durable = self.model.n();
    }

    /// After `truncate` (or a remap that applies the log): the segment
    /// holds the whole committed state, durably, and the log is empty.
    fn check_truncated(&self, inst: &Inst) {
        let want = self.model.state(self.model.n());
        let durable = self.disk.durable_image(SEG).unwrap();
        assert!(durable == want, "step {}: segment after truncation: {}", self.step, diff(&want, &durable));
        assert_eq!(self.disk.live_image(SEG).unwrap(), durable, "step {}: segment has unsynced writes", self.step);
        let q = inst.rvm.query();
        assert_eq!((q.log_used, q.pending_bytes), (0, 0), "step {}: log after truncation: {q:?}", self.step);
    }

    /// The no-steal rule on the segment's live image, byte by byte.
    fn check_segment_bytes(&self, what: &str) {
        let live = self.disk.live_image(SEG).unwrap();
        if let Some(i) = self.model.uncommitted_byte(&live) {
            panic!(
                "step {}: {what}: byte {i} of the segment ({:#04x}) is in no committed state (steal)\n{}",
                self.step,
                live[i],
                self.model.explain(&live)
            );
        }
    }

    /// The checkpoint operations (inside or outside a transaction).
    fn checkpoint_op(&mut self, inst: &Inst, op: &Op) {
        let rvm = &inst.rvm;
        let step = self.step;
        match *op {
            CkptStart => {
                let started = rvm.checkpoint_start().unwrap_or_else(|e| panic!("step {step}: checkpoint_start: {e}"));
                match (self.ckpt, started) {
                    (Some(_), true) => panic!("step {step}: a second freeze while a checkpoint runs"),
                    (Some(_), false) => {}
                    (None, true) => {
                        // Everything committed is in the log up to L, synced.
                        self.ckpt = Some(self.model.n());
                        self.all_durable();
                        assert!(rvm.query().checkpointing, "step {step}: not checkpointing after a start");
                    }
                    (None, false) => {
                        assert!(self.cfg.tiny_log(), "step {step}: checkpoint_start refused with none running")
                    }
                }
                self.check_segment_bytes("checkpoint start");
            }
            CkptStep(n) => {
                let wrote = rvm.checkpoint_step(n).unwrap_or_else(|e| panic!("step {step}: checkpoint_step: {e}"));
                assert!(wrote <= n, "step {step}: swept {wrote} pages, asked for {n}");
                if self.ckpt.is_none() {
                    assert_eq!(wrote, 0, "step {step}: swept pages with no checkpoint running");
                }
                self.check_segment_bytes("checkpoint step");
            }
            CkptFinish => {
                let r = rvm.checkpoint_finish().unwrap_or_else(|e| panic!("step {step}: checkpoint_finish: {e}"));
                match (self.ckpt.take(), r) {
                    (Some(k), Some(report)) => {
                        self.mixed = false;
                        self.check_checkpointed(inst, k, report.lsn)
                    }
                    (Some(_), None) => {
                        assert!(self.cfg.tiny_log(), "step {step}: the running checkpoint vanished")
                    }
                    (None, Some(r)) => panic!("step {step}: finished a checkpoint that was not running: {r:?}"),
                    (None, None) => {}
                }
            }
            CkptAbandon => {
                let was = rvm.checkpoint_abandon().unwrap_or_else(|e| panic!("step {step}: checkpoint_abandon: {e}"));
                if self.ckpt.take().is_some() {
                    self.mixed = true;
                    assert!(was || self.cfg.tiny_log(), "step {step}: the running checkpoint vanished");
                } else {
                    assert!(!was, "step {step}: abandoned a checkpoint that was not running");
                }
                assert!(!rvm.query().checkpointing, "step {step}: still checkpointing after abandon");
            }
            Checkpoint => {
                let report = rvm.checkpoint().unwrap_or_else(|e| panic!("step {step}: checkpoint: {e}"));
                self.mixed = false;
                self.ckpt = None;
                self.all_durable();
                self.check_checkpointed(inst, self.model.n(), report.lsn);
                let q = rvm.query();
                assert_eq!((q.log_used, q.pending_bytes), (0, 0), "step {step}: log after a checkpoint: {q:?}");
            }
            _ => unreachable!(),
        }
    }

    /// After a checkpoint that froze after `k` commits finished at `lsn`:
    /// the segment holds exactly the state after those commits, durably
    /// (nothing of a transaction in flight, nothing committed after the
    /// freeze), and the log's head is `lsn`.
    fn check_checkpointed(&self, inst: &Inst, k: usize, lsn: u64) {
        let want = self.model.state(k);
        let durable = self.disk.durable_image(SEG).unwrap();
        assert!(durable == want, "step {}: segment after checkpoint: {}", self.step, diff(&want, &durable));
        assert_eq!(self.disk.live_image(SEG).unwrap(), durable, "step {}: segment has unsynced writes", self.step);
        assert_eq!(inst.rvm.query().head, lsn, "step {}: log head after checkpoint", self.step);
    }

    /// Crash (if `mode`) or close cleanly, reopen, and check the recovered
    /// image against the model.
    fn restart(&mut self, inst: Inst, mode: Option<CrashMode>, already_crashed: bool) -> Inst {
        let n = self.model.n();
        match mode {
            Some(mode) => {
                if !already_crashed {
                    self.disk.crash(mode);
                }
                drop(inst); // its handles are dead: the drop-time flush fails quietly
            }
            None => {
                let Inst { region, seg, rvm } = inst;
                drop(region);
                drop(seg);
                rvm.close().unwrap_or_else(|e| panic!("step {}: close failed: {e}", self.step));
                self.all_durable();
            }
        }
        // No steal: the segment only ever holds committed prefixes; and WAL:
        // recovery cannot end behind what the segment already holds.
        let before = self.disk.durable_image(SEG).unwrap();
        // A crash mid-sweep leaves pages of two committed states.
        let mixed = std::mem::take(&mut self.mixed);
        let rule = if self.ckpt.take().is_some() || mixed { Before::CommittedBytes } else { self.before };
        let js = match rule {
            Before::Prefix => self.model.matching_prefixes(&before),
            Before::CommittedBytes => {
                if let Some(i) = self.model.uncommitted_byte(&before) {
                    panic!(
                        "step {}: before recovery byte {i} of the segment ({:#04x}) is in no committed state (steal?)\n{}",
                        self.step,
                        before[i],
                        self.model.explain(&before)
                    );
                }
                vec![0]
            }
        };
        assert!(
            !js.is_empty(),
            "step {}: before recovery the segment holds a state that is no committed prefix (steal?)\n{}",
            self.step,
            self.model.explain(&before)
        );
        let mut lower = self.model.durable.max(js[0]);
        let inst = match self.damage.take() {
            None => self.open(),
            Some(d) => {
                let (inst, detectable) = self.open_damaged(d);
                if !detectable {
                    // Damage past the last proof of a sync looks like a
                    // torn tail: acknowledged commits after it may be lost
                    // (the documented limit), but never what the segment
                    // already held.
                    lower = js[0];
                }
                inst
            }
        };
        let got = read_region(&inst.region);
        assert_eq!(
            self.disk.durable_image(SEG).unwrap(),
            got,
            "step {}: mapped image is not the durable one",
            self.step
        );
        let ks = self.model.matching_prefixes(&got);
        assert!(
            ks.iter().any(|&k| k >= lower && k <= n),
            "step {}: after {} the recovered segment is not an allowed prefix \
             (need k in {lower}..={n}; matching prefixes {ks:?}; segment before recovery matched {js:?})\n{}",
            self.step,
            match mode {
                Some(m) => format!("crash {m:?}"),
                None => "a clean close".to_string(),
            },
            self.model.explain(&got)
        );
        if mode.is_none() {
            assert!(got == self.model.state(n), "step {}: a clean close must keep every commit", self.step);
        }
        self.model.rebase(got);
        self.expect = Expect::default();
        self.check_stats(&inst, 0);
        inst
    }
}

/// How a transaction ended, for the outer loop.
enum Next {
    Continue,
    /// The disk crashed while the transaction was open; recover.
    Crashed(CrashMode),
    /// Close and reopen cleanly.
    Reopen,
}

/// Runs a transaction from `ops[*i]` on until it ends.
fn run_tx(world: &mut World, inst: &Inst, mode: RestoreMode, ops: &[Op], i: &mut usize) -> Next {
    let rvm = &inst.rvm;
    let addr = inst.region.addr();
    let mut tx = rvm.begin(mode).unwrap_or_else(|e| panic!("step {}: begin failed: {e}", world.step));
    world.expect.begun += 1;
    let snapshot = world.model.mem.clone();
    let mut declared: Vec<(usize, usize)> = Vec::new();

    // The model's view of an abort (explicit, by drop, or a failed commit).
    fn aborted(world: &mut World, mode: RestoreMode, snapshot: Vec<u8>) {
        world.expect.aborted += 1;
        if mode == RestoreMode::Restore {
            world.model.mem = snapshot;
        }
    }

    loop {
        world.check_stats(inst, 1);
        let Some(op) = ops.get(*i) else {
            drop(tx);
            aborted(world, mode, snapshot);
            world.check_mem(inst, "drop at the end of the workload");
            return Next::Continue;
        };
        *i += 1;
        world.step += 1;
        match *op {
            Begin(m) => {
                let r = rvm.begin(m);
                assert!(matches!(r, Err(Error::Tx(TxError::Nested))), "step {}: nested begin: {r:?}", world.step);
            }
            SetRange { off, len, store_at, store_len } => {
                let (off, len) = world.clamp(off, len);
                let store_at = store_at.min(len);
                let store_len = store_len.min(len - store_at);
                world.w += 1;
                let data = fresh(world.w, store_len);
                // SAFETY: single-threaded; the range lies inside the mapped
                // region (clamped); the stores stay inside the declared range.
                unsafe {
                    tx.set_range(addr + off, len).unwrap();
                    std::ptr::copy_nonoverlapping(data.as_ptr(), (addr + off + store_at) as *mut u8, store_len);
                }
                world.model.mem[off + store_at..off + store_at + store_len].copy_from_slice(&data);
                declared.push((off, len));
                world.check_mem(inst, "set_range + stores");
            }
            Modify { off, len } => {
                let (off, len) = world.clamp(off, len);
                world.w += 1;
                let data = fresh(world.w, len);
                // SAFETY: as above.
                unsafe { tx.modify_bytes(addr + off, &data).unwrap() };
                world.model.mem[off..off + len].copy_from_slice(&data);
                declared.push((off, len));
                world.check_mem(inst, "modify_bytes");
            }
            Commit(cm) => {
                let too_large = log_needed(&declared, world.cfg.opts.coalesce) > rvm.query().log_capacity;
                let r = tx.commit(cm);
                if too_large {
                    assert!(
                        matches!(r, Err(Error::Log(LogError::TransactionTooLarge { .. }))),
                        "step {}: a transaction larger than the log: {r:?}",
                        world.step
                    );
                    aborted(world, mode, snapshot);
                } else {
                    if let Err(e) = r {
                        panic!("step {}: commit({cm:?}) failed: {e}", world.step);
                    }
                    let mem = &world.model.mem;
                    world.model.commits.push(declared.iter().map(|&(o, l)| (o, mem[o..o + l].to_vec())).collect());
                    world.expect.committed += 1;
                    match cm {
                        CommitMode::Flush => {
                            world.expect.flush_commits += 1;
                            world.all_durable();
                        }
                        CommitMode::NoFlush => world.expect.no_flush_commits += 1,
                    }
                }
                world.check_mem(inst, "commit");
                return Next::Continue;
            }
            Abort => {
                tx.abort();
                aborted(world, mode, snapshot);
                world.check_mem(inst, "abort");
                return Next::Continue;
            }
            Drop => {
                drop(tx);
                aborted(world, mode, snapshot);
                world.check_mem(inst, "abort by drop");
                return Next::Continue;
            }
            Flush => {
                rvm.flush().unwrap_or_else(|e| panic!("step {}: flush failed: {e}", world.step));
                world.all_durable();
            }
            Damage(d) => world.damage = Some(d),
            Truncate => {
                rvm.truncate().unwrap_or_else(|e| panic!("step {}: truncate failed: {e}", world.step));
                world.ckpt = None;
                world.mixed = false;
                world.all_durable();
                world.check_truncated(inst);
            }
            Crash(cm) => {
                // The transaction is in flight at the crash.
                world.disk.crash(cm);
                drop(tx);
                return Next::Crashed(cm);
            }
            Reopen => {
                drop(tx);
                aborted(world, mode, snapshot);
                return Next::Reopen;
            }
            ref op @ (CkptStart | CkptStep(_) | CkptFinish | Checkpoint | CkptAbandon) => world.checkpoint_op(inst, op),
            Remap => {
                if !declared.is_empty() {
                    let r = rvm.unmap(inst.region.clone());
                    assert!(
                        matches!(r, Err(Error::Map(MapError::Busy { .. }))),
                        "step {}: unmap with an uncommitted transaction: {r:?}",
                        world.step
                    );
                    assert!(rvm.region_at(addr).is_some(), "step {}: a refused unmap unmapped", world.step);
                }
            }
        }
    }
}

/// Runs a workload on a fresh disk, checking the model at every step, and
/// ends with a crash that loses everything unsynced.
fn run(cfg: &Cfg, ops: &[Op]) {
    let (mut world, mut inst) = World::new(cfg);
    let mut i = 0;
    while i < ops.len() {
        world.check_stats(&inst, 0);
        let next = match ops[i] {
            Begin(mode) => {
                i += 1;
                world.step += 1;
                run_tx(&mut world, &inst, mode, ops, &mut i)
            }
            SetRange { .. } | Modify { .. } => run_tx(&mut world, &inst, R, ops, &mut i),
            ref op => {
                i += 1;
                world.step += 1;
                match *op {
                    Commit(_) | Abort | Drop | Begin(_) | SetRange { .. } | Modify { .. } => Next::Continue,
                    Flush => {
                        inst.rvm.flush().unwrap_or_else(|e| panic!("step {}: flush failed: {e}", world.step));
                        world.all_durable();
                        let q = inst.rvm.query();
                        assert_eq!(
                            (q.pending_bytes, q.durable),
                            (0, q.tail),
                            "step {}: after flush: {q:?}",
                            world.step
                        );
                        Next::Continue
                    }
                    ref op @ (CkptStart | CkptStep(_) | CkptFinish | Checkpoint | CkptAbandon) => {
                        world.checkpoint_op(&inst, op);
                        Next::Continue
                    }
                    Truncate => {
                        inst.rvm.truncate().unwrap_or_else(|e| panic!("step {}: truncate failed: {e}", world.step));
                        world.ckpt = None;
                        world.mixed = false;
                        world.all_durable();
                        world.check_truncated(&inst);
                        assert!(inst.rvm.query().quiescent, "step {}: not quiescent after truncate", world.step);
                        Next::Continue
                    }
                    Crash(mode) => {
                        inst = world.restart(inst, Some(mode), false);
                        Next::Continue
                    }
                    Reopen => Next::Reopen,
                    Damage(d) => {
                        world.damage = Some(d);
                        Next::Continue
                    }
                    Remap => {
                        let Inst { region, seg, rvm } = inst;
                        rvm.unmap(region).unwrap_or_else(|e| panic!("step {}: unmap failed: {e}", world.step));
                        let region = rvm
                            .map(&seg, MapSpec::new(0, world.cfg.seg_len()))
                            .unwrap_or_else(|e| panic!("step {}: map again failed: {e}", world.step));
                        inst = Inst { region, seg, rvm };
                        // The region shows the committed image (uncommitted
                        // no-restore stores are gone); the log was applied.
                        world.model.mem = world.model.state(world.model.n());
                        world.check_mem(&inst, "map after unmap");
                        if world.model.n() > 0 {
                            // Mapping applied the log (finishing a running
                            // checkpoint first).
                            world.ckpt = None;
                            world.mixed = false;
                            world.all_durable();
                            world.check_truncated(&inst);
                        }
                        if !inst.rvm.query().checkpointing {
                            world.ckpt = None;
                        }
                        Next::Continue
                    }
                }
            }
        };
        match next {
            Next::Continue => {}
            Next::Crashed(mode) => inst = world.restart(inst, Some(mode), true),
            Next::Reopen => inst = world.restart(inst, None, false),
        }
    }
    world.step += 1;
    world.restart(inst, Some(CrashMode::LoseUnsynced), false);
}

// ---------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(DEFAULT_CASES))]

    #[test]
    fn crash_model_coalescing(ops in prop::collection::vec(op_strategy(8 * page_size(), 3000), 1..160)) {
        run(&Cfg::roomy(true), &ops);
    }

    #[test]
    fn crash_model_faithful_log(ops in prop::collection::vec(op_strategy(8 * page_size(), 3000), 1..160)) {
        run(&Cfg::roomy(false), &ops);
    }

    #[test]
    fn crash_model_tiny_log_coalescing(ops in prop::collection::vec(op_strategy(8 * page_size(), 8192), 1..240)) {
        run(&Cfg::tiny(true), &ops);
    }

    #[test]
    fn crash_model_tiny_log_faithful(ops in prop::collection::vec(op_strategy(8 * page_size(), 8192), 1..240)) {
        run(&Cfg::tiny(false), &ops);
    }

    /// Every reopen (after a crash, media damage or a clean close) by
    /// instant recovery.
    #[test]
    fn crash_model_instant_recovery(ops in prop::collection::vec(op_strategy(8 * page_size(), 3000), 1..160)) {
        run(&Cfg::roomy(true).instant(), &ops);
    }

    #[test]
    fn crash_model_tiny_log_instant_recovery(ops in prop::collection::vec(op_strategy(8 * page_size(), 8192), 1..240)) {
        run(&Cfg::tiny(false).instant(), &ops);
    }
}

// ---------------------------------------------------------------------------
// Deterministic scenarios (and regressions found by the properties)
// ---------------------------------------------------------------------------

#[test]
fn every_op_once_in_both_modes() {
    for coalesce in [true, false] {
        let ops = [
            Begin(R),
            Modify { off: 0, len: 16 },
            SetRange { off: 8, len: 16, store_at: 4, store_len: 8 },
            Begin(NR),
            Remap,
            Commit(NF),
            Modify { off: 16, len: 8 },
            Commit(F),
            Begin(NR),
            Modify { off: 4, len: 4 },
            Abort,
            Begin(R),
            Modify { off: 0, len: 64 },
            Drop,
            Remap,
            Modify { off: 100, len: 4 },
            Commit(NF),
            Flush,
            Modify { off: 200, len: 4 },
            Commit(NF),
            Crash(keep(7)),
            Modify { off: 300, len: 4 },
            Commit(NF),
            Truncate,
            Modify { off: 300, len: 4 },
            Reopen,
            Modify { off: 400, len: 4 },
            Crash(CrashMode::LoseUnsynced),
        ];
        run(&Cfg::roomy(coalesce), &ops);
        run(&Cfg::tiny(coalesce), &ops);
        run(&Cfg::roomy(coalesce).instant(), &ops);
    }
}

/// Regression (shrunk by `crash_model_faithful_log`): a commit with no
/// ranges wrote a commit frame that no later truncation removed, so the log
/// was not empty after a remap applied it.
#[test]
fn regression_empty_commit_then_remap() {
    for coalesce in [true, false] {
        run(&Cfg::roomy(coalesce), &[Begin(R), Commit(F), Remap]);
        run(&Cfg::roomy(coalesce), &[Begin(NR), Commit(NF), Modify { off: 0, len: 8 }, Commit(F), Remap, Truncate]);
    }
}

/// Regression (found by the crash model with the fix removed): pages a
/// checkpoint did not sweep before it was abandoned (or overtaken by a
/// replay) stayed marked in the old generation only, so the next
/// checkpoint skipped them and freed their log records.
#[test]
fn regression_abandoned_checkpoint_pages_go_to_the_next_one() {
    for coalesce in [true, false] {
        let ops = [Modify { off: 0, len: 8 }, Commit(F), CkptStart, CkptAbandon, CkptStart, CkptFinish];
        run(&Cfg::roomy(coalesce), &ops);
        let ops =
            [Modify { off: 0, len: 8 }, Commit(NF), CkptStart, CkptStep(1), CkptAbandon, Checkpoint, Crash(keep(3))];
        run(&Cfg::roomy(coalesce), &ops);
        // A page rebuilt at setup (a transaction was in flight) and written,
        // then the checkpoint abandoned: the write must be synced before a
        // later checkpoint frees the log.
        let ops = [
            Modify { off: 0, len: 8 },
            Commit(F),
            Modify { off: 0, len: 56 },
            CkptStart,
            Drop,
            Begin(R),
            CkptAbandon,
            Checkpoint,
        ];
        run(&Cfg::roomy(coalesce), &ops);
    }
}

/// A transaction in flight across the freeze, in both modes, committed or
/// aborted after it: its bytes never reach the segment through the sweep.
#[test]
fn transaction_in_flight_across_the_freeze() {
    for mode in [R, NR] {
        for end in [Commit(NF), Abort, Drop] {
            let ops = [
                Modify { off: 0, len: 64 },
                Commit(NF),
                Begin(mode),
                Modify { off: 16, len: 32 },
                CkptStart,
                Modify { off: 4000, len: 200 },
                CkptStep(1),
                end.clone(),
                CkptFinish,
                Crash(keep(1)),
            ];
            run(&Cfg::roomy(true), &ops);
            run(&Cfg::roomy(false), &ops);
        }
    }
}

/// A crash with a transaction in flight, in both restore modes, after
/// no-flush commits that overlap it.
#[test]
fn crash_with_transaction_in_flight() {
    for mode in [R, NR] {
        for seed in 0..16 {
            let ops = [
                Modify { off: 0, len: 32 },
                Commit(NF),
                Modify { off: 16, len: 32 },
                Commit(NF),
                Begin(mode),
                Modify { off: 8, len: 64 },
                Crash(keep(seed)),
            ];
            run(&Cfg::roomy(true), &ops);
            run(&Cfg::roomy(false), &ops);
        }
    }
}

/// Many commits on the smallest log: it wraps around several times and
/// fills up, so writers truncate to make room; crashes in between.
#[test]
fn tiny_log_wraps_and_fills() {
    for coalesce in [true, false] {
        let cfg = Cfg::tiny(coalesce);
        let (mut world, mut inst) = World::new(&cfg);
        for round in 0..3u64 {
            for i in 0..150usize {
                let ops = [
                    Modify { off: (i * 523) % 20000, len: 1500 },
                    Modify { off: i * 8 % 512, len: 24 },
                    Commit(if i % 7 == 0 { F } else { NF }),
                ];
                let mut j = 0;
                world.step += 1;
                match run_tx(&mut world, &inst, R, &ops, &mut j) {
                    Next::Continue => {}
                    _ => unreachable!(),
                }
            }
            let q = inst.rvm.query();
            assert!(q.tail > q.log_capacity, "round {round}: the log did not wrap: {q:?}");
            assert!(inst.rvm.stats().log_full_waits > 0, "round {round}: the log never filled up");
            inst = world.restart(inst, Some(keep(round)), false);
        }
    }
}

/// A transaction bigger than the log is refused and aborted (restore mode
/// brings the old bytes back), and the instance goes on working.
#[test]
fn transaction_larger_than_the_log_is_refused() {
    for coalesce in [true, false] {
        let mut ops = vec![Modify { off: 0, len: 8 }, Commit(F), Begin(R)];
        // 40 overlapping 2 KiB ranges: 80 KiB declared, 2.5 KiB coalesced.
        ops.extend((0..40).map(|i| Modify { off: 100 + i * 8, len: 2048 }));
        ops.extend([Commit(F), Modify { off: 0, len: 8 }, Commit(NF), Crash(CrashMode::LoseUnsynced)]);
        // With a faithful log the 80 KiB do not fit in 64 KiB.
        run(&Cfg::tiny(coalesce), &ops);
    }
}

// ---------------------------------------------------------------------------
// I/O error injection
// ---------------------------------------------------------------------------

/// One transaction of a fault-injection workload.
#[derive(Clone, Debug)]
struct Step {
    mode: RestoreMode,
    writes: Vec<(usize, usize)>,
    commit: CommitMode,
    /// Call `flush()` while the transaction is open (before committing).
    flush_inside: bool,
    /// Call `truncate()` after the commit.
    truncate_after: bool,
    /// Run a whole checkpoint while the transaction is open (it is in
    /// flight across the freeze).
    checkpoint_inside: bool,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Before step `at`, make the `n`-th storage operation from then on
    /// (and all later ones) fail.
    After { at: usize, n: u64 },
    /// Before step `at`, make every sync fail.
    Syncs { at: usize },
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        prop_oneof![Just(R), Just(NR)],
        prop::collection::vec((0usize..4096, 1usize..=600), 1..4),
        prop_oneof![Just(F), Just(NF)],
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(mode, writes, commit, flush_inside, truncate_after, checkpoint_inside)| Step {
            mode,
            writes,
            commit,
            flush_inside,
            truncate_after,
            checkpoint_inside,
        })
}

fn fault_strategy() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => (0usize..30, 0u64..80).prop_map(|(at, n)| Fault::After { at, n }),
        1 => (0usize..30).prop_map(|at| Fault::Syncs { at }),
    ]
}

/// Errors that a failing device may surface.
fn is_io_or_poisoned(e: &Error) -> bool {
    matches!(e, Error::Io { .. } | Error::Poisoned { .. })
}

/// Runs `steps` with `fault` armed, then clears the fault, crashes with
/// `crash`, optionally fails the first recovery after `recovery_fault`
/// operations (and crashes again), reopens and checks the prefix rule.
fn run_faulty(cfg: &Cfg, steps: &[Step], fault: Fault, crash: CrashMode, recovery_fault: Option<u64>) {
    // Every log write on this thread, in program order: the n-th storage
    // operation is the same one each run, and a failure surfaces at the
    // operation that caused it.
    let cfg = &Cfg { opts: Options { write_behind: false, ..cfg.opts.clone() }, ..cfg.clone() };
    let (mut world, inst) = World::new(cfg);
    // A failure can stop a truncation (or a recovery) part-way, leaving a mix
    // of committed states in the segment that the next recovery repairs.
    world.before = Before::CommittedBytes;
    let addr = inst.region.addr();
    // Set once an operation failed: the instance must refuse everything.
    let mut failed: Option<String> = None;
    for (s, step) in steps.iter().enumerate() {
        world.step = s;
        match fault {
            Fault::After { at, n } if at == s => world.disk.fail_after(n),
            Fault::Syncs { at } if at == s => world.disk.fail_syncs(true),
            _ => {}
        }
        let mut tx = match inst.rvm.begin(step.mode) {
            Ok(tx) => {
                assert!(failed.is_none(), "step {s}: begin succeeded after a failure ({failed:?})");
                tx
            }
            Err(e) => {
                assert!(failed.is_some(), "step {s}: begin failed without an earlier failure: {e}");
                assert!(matches!(e, Error::Poisoned { .. }), "step {s}: begin after a failure: {e}");
                continue;
            }
        };
        let snapshot = world.model.mem.clone();
        let mut declared = Vec::new();
        for &(off, len) in &step.writes {
            let (off, len) = world.clamp(off, len);
            world.w += 1;
            let data = fresh(world.w, len);
            // SAFETY: single-threaded; the range is inside the region.
            unsafe { tx.modify_bytes(addr + off, &data).unwrap() };
            world.model.mem[off..off + len].copy_from_slice(&data);
            declared.push((off, len));
        }
        if step.flush_inside && failed.is_none() {
            match inst.rvm.flush() {
                Ok(()) => world.all_durable(),
                Err(e) => {
                    assert!(is_io_or_poisoned(&e), "step {s}: flush: {e}");
                    failed = Some(format!("flush: {e}"));
                }
            }
        }
        if step.checkpoint_inside && failed.is_none() {
            match inst.rvm.checkpoint() {
                Ok(_) => world.all_durable(),
                Err(e) => {
                    assert!(is_io_or_poisoned(&e), "step {s}: checkpoint: {e}");
                    failed = Some(format!("checkpoint: {e}"));
                }
            }
        }
        let after_writes = world.model.mem.clone();
        match tx.commit(step.commit) {
            Ok(()) => {
                assert!(failed.is_none(), "step {s}: commit succeeded after a failure ({failed:?})");
                let mem = &world.model.mem;
                world.model.commits.push(declared.iter().map(|&(o, l)| (o, mem[o..o + l].to_vec())).collect());
                if step.commit == F {
                    world.all_durable();
                }
            }
            Err(e) => {
                let got = read_region(&inst.region);
                if failed.is_some() {
                    assert!(matches!(e, Error::Poisoned { .. }), "step {s}: commit after a failure: {e}");
                } else {
                    assert!(is_io_or_poisoned(&e), "step {s}: commit: {e}");
                    failed = Some(format!("commit: {e}"));
                }
                // A commit that failed before it entered the commit order is
                // aborted (restore mode: old bytes back); one whose flush
                // failed stays committed in memory and may or may not be
                // durable: it is the last commit of the order.
                let rolled_back = step.mode == R && got == snapshot && got != after_writes;
                if rolled_back {
                    world.model.mem = snapshot;
                } else if step.mode == R {
                    assert!(got == after_writes, "step {s}: a failed commit left memory half restored");
                    let mem = &world.model.mem;
                    world.model.commits.push(declared.iter().map(|&(o, l)| (o, mem[o..o + l].to_vec())).collect());
                } else {
                    // No-restore: memory cannot tell; treat the commit as
                    // possibly committed only if it did not fail up front.
                    if !matches!(e, Error::Poisoned { .. }) {
                        let mem = &world.model.mem;
                        world.model.commits.push(declared.iter().map(|&(o, l)| (o, mem[o..o + l].to_vec())).collect());
                    }
                }
            }
        }
        if step.truncate_after {
            match inst.rvm.truncate() {
                Ok(()) => {
                    assert!(failed.is_none(), "step {s}: truncate succeeded after a failure ({failed:?})");
                    world.all_durable();
                }
                Err(e) => {
                    assert!(is_io_or_poisoned(&e), "step {s}: truncate: {e}");
                    failed.get_or_insert(format!("truncate: {e}"));
                }
            }
        }
        if failed.is_some() {
            let r = inst.rvm.flush();
            assert!(matches!(r, Err(Error::Poisoned { .. })), "step {s}: flush after a failure: {r:?}");
        }
    }
    world.disk.clear_faults();
    world.step = steps.len();
    world.disk.crash(crash);
    if let Some(n) = recovery_fault {
        // A crash during recovery: the first attempt fails part-way (or
        // succeeds), the disk crashes again, recovery runs again.
        world.disk.fail_after(n);
        let r = Rvm::open_with(world.vfs.clone(), Path::new(LOG), cfg.opts.clone());
        drop(r);
        world.disk.clear_faults();
        world.disk.crash(CrashMode::KeepRandomSubset { seed: n, tear_last: true });
    }
    world.restart(inst, Some(crash), true);
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES * 2))]

    #[test]
    fn io_errors_are_errors_and_recovery_finds_a_prefix(
        steps in prop::collection::vec(step_strategy(), 1..40),
        fault in fault_strategy(),
        coalesce in any::<bool>(),
        tiny in any::<bool>(),
        seed in any::<u64>(),
        recovery_fault in prop::option::of(0u64..40),
    ) {
        let cfg = if tiny { Cfg::tiny(coalesce) } else { Cfg::roomy(coalesce) };
        run_faulty(&cfg, &steps, fault, keep(seed), recovery_fault);
    }
}

/// Every operation count of a fixed workload, as the failure point.
#[test]
fn io_error_at_every_operation() {
    let steps: Vec<Step> = (0..12)
        .map(|i| Step {
            mode: if i % 3 == 2 { NR } else { R },
            writes: vec![(i * 300 % 4000, 40 + i * 10), (i * 8 % 256, 16)],
            commit: if i % 2 == 0 { F } else { NF },
            flush_inside: i % 5 == 4,
            truncate_after: i % 4 == 3,
            checkpoint_inside: i % 3 == 1,
        })
        .collect();
    for coalesce in [true, false] {
        for n in 0..60 {
            run_faulty(&Cfg::tiny(coalesce), &steps, Fault::After { at: 1, n }, keep(n), None);
            run_faulty(&Cfg::roomy(coalesce), &steps, Fault::After { at: 0, n }, CrashMode::LoseUnsynced, Some(n % 7));
        }
    }
}

/// A failed sync poisons the instance: the flush commit reports the I/O
/// error, every later begin, commit, flush and truncate is refused with
/// `Error::Poisoned`, and after a crash the state is an allowed prefix.
#[test]
fn failed_sync_poisons_until_reopen() {
    for seed in 0..8 {
        let (mut world, inst) = World::new(&Cfg::roomy(true));
        let addr = inst.region.addr();
        let commit = |world: &mut World, off: usize, mode: CommitMode| {
            let mut tx = inst.rvm.begin(R).unwrap();
            world.w += 1;
            let data = fresh(world.w, 16);
            // SAFETY: single-threaded; inside the region.
            unsafe { tx.modify_bytes(addr + off, &data).unwrap() };
            world.model.mem[off..off + 16].copy_from_slice(&data);
            let r = tx.commit(mode);
            world.model.commits.push(vec![(off, data)]);
            r
        };
        commit(&mut world, 0, F).unwrap();
        world.all_durable();
        commit(&mut world, 16, NF).unwrap();
        world.disk.fail_syncs(true);
        let e = commit(&mut world, 32, F).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        // Still committed in memory; it may or may not be durable.
        world.check_mem(&inst, "after the failed flush commit");
        assert!(matches!(inst.rvm.begin(R), Err(Error::Poisoned { .. })));
        assert!(matches!(inst.rvm.flush(), Err(Error::Poisoned { .. })));
        assert!(matches!(inst.rvm.truncate(), Err(Error::Poisoned { .. })));
        world.disk.clear_faults();
        // Clearing the fault does not revive the instance.
        assert!(matches!(inst.rvm.begin(R), Err(Error::Poisoned { .. })));
        world.disk.crash(keep(seed));
        let inst = world.restart(inst, Some(keep(seed)), true);
        drop(inst);
    }
}

/// A transaction that is open while a flush fails cannot commit: it gets
/// `Error::Poisoned` and (restore mode) its old bytes back.
#[test]
fn open_transaction_cannot_commit_after_failed_sync() {
    for mode in [F, NF] {
        let (mut world, inst) = World::new(&Cfg::roomy(false));
        let addr = inst.region.addr();
        let mut tx = inst.rvm.begin(R).unwrap();
        // SAFETY: single-threaded; inside the region.
        unsafe { tx.modify_bytes(addr + 64, &fresh(1, 32)).unwrap() };
        world.disk.fail_syncs(true);
        // Something must be pending for the flush to sync.
        {
            let other = std::thread::scope(|s| {
                s.spawn(|| {
                    let mut t2 = inst.rvm.begin(NR).unwrap();
                    // SAFETY: disjoint from the main thread's range.
                    unsafe { t2.modify_bytes(addr + 1024, &fresh(2, 8)).unwrap() };
                    t2.commit(NF)
                })
                .join()
                .unwrap()
            });
            other.unwrap();
            world.model.mem[1024..1032].copy_from_slice(&fresh(2, 8));
            world.model.commits.push(vec![(1024, fresh(2, 8))]);
        }
        assert!(matches!(inst.rvm.flush(), Err(Error::Io { .. })));
        let r = tx.commit(mode);
        assert!(matches!(r, Err(Error::Poisoned { .. })), "{r:?}");
        world.check_mem(&inst, "restore after a refused commit");
        world.disk.clear_faults();
        world.disk.crash(keep(3));
        world.restart(inst, Some(keep(3)), true);
    }
}

/// Write-behind under faults: the background log writer hits an injected
/// I/O error while writing a spooled batch. Nothing hangs; the failure
/// reaches the application as an error at a later commit or flush; and
/// after a crash and recovery the segment holds a prefix of the commits,
/// including every one a successful flush covered.
#[test]
fn write_behind_failure_poisons_and_recovery_keeps_a_prefix() {
    let ps = page_size();
    let len = 4 * ps;
    for n in [0u64, 1, 2, 3, 5, 8, 13] {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        create_log_with(vfs.as_ref(), Path::new(LOG), 1 << 20).unwrap();
        let opts = Options { pending_limit: 4096, truncate_threshold: None, write_behind: true, ..Options::default() };
        let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts.clone()).unwrap();
        let seg = rvm.create_segment(SEG, len as u64).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
        // states[k]: the segment after the first k commits.
        let mut states = vec![vec![0u8; len]];
        let mut flushed = 0;
        disk.fail_after(n);
        let mut failed = false;
        for i in 0..400u32 {
            let off = (i as usize * 97) % (len - 64);
            let data = fresh(i + 1, 64);
            let mut tx = match rvm.begin(RestoreMode::NoRestore) {
                Ok(tx) => tx,
                Err(e) => {
                    assert!(matches!(e, Error::Poisoned { .. }), "begin: {e}");
                    failed = true;
                    break;
                }
            };
            // SAFETY: single-threaded; inside the region.
            unsafe { tx.modify_bytes(region.addr() + off, &data).unwrap() };
            match tx.commit(CommitMode::NoFlush) {
                Ok(()) => {
                    let mut next = states.last().unwrap().clone();
                    next[off..off + 64].copy_from_slice(&data);
                    states.push(next);
                }
                Err(e) => {
                    assert!(matches!(e, Error::Poisoned { .. } | Error::Io { .. }), "commit: {e}");
                    failed = true;
                    break;
                }
            }
            if i % 50 == 49 {
                match rvm.flush() {
                    Ok(()) => flushed = states.len() - 1,
                    Err(e) => {
                        assert!(matches!(e, Error::Poisoned { .. } | Error::Io { .. }), "flush: {e}");
                        failed = true;
                        break;
                    }
                }
            }
        }
        assert!(failed, "fail_after({n}): the injected error never surfaced");
        assert!(matches!(rvm.flush(), Err(Error::Poisoned { .. })), "a poisoned instance refuses to flush");
        disk.clear_faults();
        disk.crash(CrashMode::LoseUnsynced);
        drop((region, seg, rvm));
        let rvm = Rvm::open_with(vfs.clone(), Path::new(LOG), opts).unwrap();
        let seg = rvm.open_segment(SEG).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, len)).unwrap();
        let got = read_region(&region);
        let k = states.iter().rposition(|s| *s == got);
        assert!(k.is_some_and(|k| k >= flushed), "fail_after({n}): not a prefix with the {flushed} flushed commits");
    }
}

/// Found at 2,000 cases: a zeroed sector whose first bytes are the zero
/// padding of a record the status proves synced, the rest the last flush
/// commit's record, which nothing proves synced. The padding's record
/// stays valid, so recovery ends the log before the last commit (the
/// documented undetectable case); the model had counted the damage as
/// starting inside the proved bytes and demanded a refusal.
#[test]
fn zeroed_padding_before_an_unproved_last_commit_is_a_torn_tail() {
    let ops = [
        Modify { off: 0, len: 381 },
        SetRange { off: 0, len: 48, store_at: 0, store_len: 0 },
        Commit(F),
        Commit(F),
        Commit(F),
        Modify { off: 64, len: 40 },
        Commit(F),
        CkptStart,
        Modify { off: 64, len: 16 },
        Commit(F),
        Damage(MediaDamage { spot: Spot::Records, pick: 1471030164075671984, zero_sector: true, bit: 0 }),
        Crash(CrashMode::LoseUnsynced),
    ];
    run(&Cfg::tiny(false), &ops);
}
