//! Proptest crash model of the heap.
//!
//! Random programs of heap transactions — malloc (1 B to 64 KiB, power-of-two
//! alignments 1 to 4096), free (of committed blocks, of blocks allocated in
//! the same transaction, double and bogus frees), writes of recognisable
//! patterns into live blocks, roots — each ending in a commit (flush or
//! no-flush), an abort (explicit or by drop) or a crash while open; between
//! them `rvm.flush()`, `rvm.truncate()`, generation checkpoints (whole, or a
//! sweep left running under later steps), preallocation, clean restarts and
//! crashes of the simulated disk (`LoseUnsynced`, `KeepRandomSubset` with and
//! without a torn last write), each followed by recovery and `Heap::load` at
//! the same fixed addresses.
//!
//! The heap can grow (from 4 to 12 MiB): allocations that find no room
//! grow it by its policy, and `Step::Grow` grows it explicitly, optionally
//! with the power failing at a chosen storage operation of the growth
//! protocol; the reload must show the old or the new size, never between.
//!
//! Media damage (`Step::Damage`) flips a bit or zeroes 8 bytes of the
//! heap's synced metadata in the segment (header, counters, root slots, a
//! live block's header or tail guard); the reopen must either fail with a
//! typed corruption error or come back with every commit intact, never Ok
//! with less (a root silently missing or different).
//!
//! The model (`common::Engine`) keeps the committed states. After every step
//! the heap check passes and the statistics, roots, live blocks and their
//! contents equal the newest committed state. After every crash the reloaded
//! heap equals one committed state from the last durable one (the last flush
//! commit, flush or truncate, and everything before it) to the newest: a
//! prefix of the commits, never anything uncommitted.
//!
//! Cases: `PROPTEST_CASES` when set, else a default sized to finish in well
//! under a minute in a debug build. Shrunk failures are kept in
//! `tests/crash_model.proptest-regressions` and replayed first.

mod common;

use common::{Crash, End, Engine, Op, Rng, Step};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use rvm_core::CommitMode::{Flush, NoFlush};

/// Cases when `PROPTEST_CASES` is not set.
const DEFAULT_CASES: u32 = 48;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        max_shrink_iters: 2048,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/crash_model.proptest-regressions"))),
        ..ProptestConfig::default()
    }
}

fn crash() -> impl Strategy<Value = Crash> {
    prop_oneof![
        2 => Just(Crash::Lose),
        1 => any::<u64>().prop_map(|seed| Crash::Keep { seed, tear: false }),
        3 => any::<u64>().prop_map(|seed| Crash::Keep { seed, tear: true }),
    ]
}

/// 1 B to 64 KiB, log-uniform (shrinks towards 1).
fn size() -> impl Strategy<Value = usize> {
    (0u32..=16, any::<u32>()).prop_map(|(e, r)| {
        let lo = 1usize << e;
        (lo + r as usize % lo).min(65536)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (size(), prop_oneof![2 => 0u8..=4, 1 => 5u8..=12]).prop_map(|(size, align_log2)| Op::Malloc { size, align_log2 }),
        3 => any::<u16>().prop_map(Op::FreeCommitted),
        1 => any::<u16>().prop_map(Op::FreeOwn),
        1 => any::<u16>().prop_map(Op::FreeAgain),
        1 => any::<u16>().prop_map(Op::FreeBogus),
        3 => (any::<u16>(), any::<u16>(), size(), any::<u8>())
            .prop_map(|(target, at, len, seed)| Op::Write { target, at, len: len as u32, seed }),
        1 => (any::<u8>(), proptest::option::weighted(0.8, any::<u16>()), any::<u8>())
            .prop_map(|(name, target, tag)| Op::SetRoot { name, target, tag }),
    ]
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        3 => Just(End::Commit(Flush)),
        6 => Just(End::Commit(NoFlush)),
        2 => Just(End::Abort),
        2 => Just(End::Drop),
        1 => crash().prop_map(End::CrashInside),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        14 => (proptest::bool::weighted(0.75), proptest::collection::vec(op(), 0..8), end())
            .prop_map(|(restore, ops, end)| Step::Tx { restore, ops, end }),
        1 => Just(Step::Flush),
        1 => Just(Step::Truncate),
        1 => prop_oneof![Just(0u8), 1u8..8].prop_map(|steps| Step::Checkpoint { steps }),
        3 => crash().prop_map(Step::Crash),
        1 => Just(Step::Restart),
        1 => (1usize..512, 0u8..16).prop_map(|(size, count)| Step::Preallocate { size, count }),
        1 => (any::<u32>(), 0u8..8, proptest::bool::weighted(0.25)).prop_map(|(sel, bit, zero)| Step::Damage { sel, bit, zero }),
        1 => (0u16..1024, proptest::option::weighted(0.6, (0u16..40, crash())))
            .prop_map(|(pages, fail)| Step::Grow { pages, fail }),
    ]
}

/// Runs `steps` on a fresh heap.
fn run(steps: &[Step]) -> Result<Engine, String> {
    let mut e = Engine::new()?;
    e.run(steps)?;
    Ok(e)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn heap_survives_crashes_as_a_committed_prefix(steps in proptest::collection::vec(step(), 1..40)) {
        run(&steps).map_err(TestCaseError::fail)?;
    }
}

fn tx(ops: Vec<Op>, end: End) -> Step {
    Step::Tx { restore: true, ops, end }
}

fn malloc(size: usize, align_log2: u8) -> Op {
    Op::Malloc { size, align_log2 }
}

/// The model itself: unflushed commits are lost by `LoseUnsynced`, flushed
/// ones survive, and a clean restart keeps everything.
#[test]
fn unflushed_commits_are_lost_and_flushed_ones_kept() {
    let steps = vec![
        tx(vec![malloc(100, 3), malloc(5000, 12)], End::Commit(Flush)),
        tx(vec![malloc(7, 0), Op::FreeCommitted(0)], End::Commit(NoFlush)),
        tx(vec![Op::Write { target: 1, at: 100, len: 3000, seed: 9 }], End::Commit(NoFlush)),
        Step::Crash(Crash::Lose),
        tx(vec![malloc(64, 6), Op::FreeCommitted(1)], End::Commit(NoFlush)),
        Step::Restart,
        tx(vec![malloc(65536, 12), Op::FreeOwn(0), malloc(300, 4)], End::Commit(NoFlush)),
        Step::Crash(Crash::Keep { seed: 1, tear: true }),
    ];
    let e = run(&steps).unwrap();
    assert_eq!(e.tally.crashes, 2);
    assert_eq!(e.tally.lossy_reloads, 2, "{:?}", e.tally);
    assert_eq!(e.tally.lost_commits, 3, "{:?}", e.tally);
}

/// Aborts (both kinds, both restore modes) return their allocations and
/// keep the blocks they freed; a crash inside a transaction leaves nothing
/// of it.
#[test]
fn aborts_and_crash_inside_a_transaction_leave_no_trace() {
    let steps = vec![
        tx(vec![malloc(1000, 4), malloc(20, 0), Op::SetRoot { name: 0, target: Some(0), tag: 3 }], End::Commit(Flush)),
        tx(vec![malloc(40000, 12), Op::FreeCommitted(0), Op::Write { target: 0, at: 0, len: 9, seed: 1 }], End::Abort),
        Step::Tx { restore: false, ops: vec![malloc(333, 5), Op::FreeCommitted(1)], end: End::Drop },
        tx(
            vec![Op::FreeCommitted(0), Op::FreeAgain(0), Op::FreeBogus(0), malloc(9, 9)],
            End::CrashInside(Crash::Keep { seed: 7, tear: true }),
        ),
        tx(vec![Op::FreeCommitted(0), Op::FreeCommitted(0)], End::Commit(NoFlush)),
        Step::Truncate,
        Step::Crash(Crash::Lose),
    ];
    run(&steps).unwrap();
}

/// A checkpoint sweep running under transactions that allocate, free and
/// write (its write barrier), then a crash mid-sweep.
#[test]
fn a_checkpoint_sweep_under_heap_transactions_and_a_crash() {
    let steps = vec![
        tx(vec![malloc(3000, 4), malloc(100, 3), malloc(40000, 6)], End::Commit(NoFlush)),
        tx(vec![Op::Write { target: 2, at: 0, len: 40000, seed: 1 }], End::Commit(NoFlush)),
        Step::Checkpoint { steps: 1 },
        tx(
            vec![Op::FreeCommitted(0), malloc(2000, 4), Op::Write { target: 1, at: 0, len: 90, seed: 2 }],
            End::Commit(NoFlush),
        ),
        tx(vec![malloc(500, 12), Op::Write { target: 2, at: 30000, len: 9000, seed: 3 }], End::Abort),
        Step::Crash(Crash::Keep { seed: 4, tear: true }),
        tx(vec![malloc(10, 0), Op::FreeCommitted(1)], End::Commit(Flush)),
        Step::Checkpoint { steps: 0 },
        Step::Checkpoint { steps: 2 },
        tx(vec![malloc(64, 5), Op::Write { target: 0, at: 0, len: 64, seed: 5 }], End::Commit(NoFlush)),
        Step::Checkpoint { steps: 1 },
        Step::Crash(Crash::Lose),
    ];
    let e = run(&steps).unwrap();
    assert_eq!(e.tally.checkpoints, 3);
}

/// Media damage over every kind of metadata byte: each is refused with a
/// corruption error (before the checksums, a flipped root name or a zeroed
/// root slot loaded a heap with the root missing).
#[test]
fn media_damage_is_refused_or_harmless() {
    let mut steps = vec![tx(
        vec![
            malloc(100, 3),
            malloc(5000, 12),
            Op::SetRoot { name: 0, target: Some(0), tag: 3 },
            Op::SetRoot { name: 1, target: Some(1), tag: 4 },
        ],
        End::Commit(NoFlush),
    )];
    // Header, counters, the two used root slots and an unused one, then
    // the block headers and tail guards, with single bits and zeroed words.
    for sel in (0..128 + 3 * 64).step_by(5).chain(128 + 6 * 64..128 + 6 * 64 + 48) {
        steps.push(Step::Damage { sel, bit: (sel % 8) as u8, zero: sel % 7 == 0 });
    }
    let e = run(&steps).unwrap();
    assert!(e.tally.damage_refused >= 100, "{:?}", e.tally);
    assert_eq!(e.tally.damage_loaded, 0, "{:?}", e.tally);
}

/// Fixed-seed random programs (the soak's generator): a deterministic
/// sample of the same space, independent of proptest's seed.
#[test]
fn fixed_seed_programs() {
    let mut lossy = 0;
    for seed in 0..6 {
        let mut rng = Rng(0x5eed_0000 + seed);
        let steps = common::random_program(&mut rng, 30, 3);
        let e = run(&steps).unwrap_or_else(|err| panic!("seed {seed}: {err}"));
        lossy += e.tally.lossy_reloads;
    }
    assert!(lossy > 0, "no crash lost a commit: the programs do not exercise the prefix rule");
}

/// Storage operations one growth issues on the simulated disk (measured on
/// a fresh heap).
fn growth_ops() -> u64 {
    let mut e = Engine::new().unwrap();
    e.run(&[tx(vec![malloc(100, 3)], End::Commit(Flush))]).unwrap();
    e.op_count_of(|e| e.step(&Step::Grow { pages: 255, fail: None }).unwrap())
}

/// The power fails at every storage operation of a growth in turn (with
/// committed, flushed and unflushed blocks in the heap, and unsynced writes
/// kept or torn at random): every reload comes back at the old or the new
/// size, passes the heap check, keeps every durable commit, and allocates
/// into the new space afterwards.
#[test]
fn a_crash_at_every_step_of_a_growth() {
    let n = growth_ops();
    assert!(n >= 4, "a growth issued only {n} storage operations");
    let (mut old, mut new) = (0, 0);
    for k in 0..n + 2 {
        for crash in [Crash::Lose, Crash::Keep { seed: k, tear: true }] {
            let steps = vec![
                tx(
                    vec![malloc(3000, 4), malloc(100, 3), Op::SetRoot { name: 0, target: Some(0), tag: 1 }],
                    End::Commit(Flush),
                ),
                tx(vec![malloc(40000, 6), Op::FreeCommitted(1)], End::Commit(NoFlush)),
                Step::Grow { pages: 255, fail: Some((k as u16, crash)) },
                tx(vec![malloc(60000, 4), malloc(60000, 4), malloc(9, 0)], End::Commit(NoFlush)),
                Step::Crash(Crash::Keep { seed: k + 1, tear: true }),
            ];
            let e = run(&steps).unwrap_or_else(|err| panic!("power failure at operation {k} of {n}: {err}"));
            old += e.tally.growth_crashes_old;
            new += e.tally.growth_crashes_new;
        }
    }
    assert!(old > 0 && new > 0, "crashes left the old size {old} times and the new one {new} times");
}

/// Allocations grow the heap by its policy up to its maximum, then run out
/// of memory; explicit growth past the maximum is refused and changes
/// nothing; everything survives a crash and a restart.
#[test]
fn allocations_grow_the_heap_to_its_maximum() {
    let mut steps = Vec::new();
    for _ in 0..70 {
        steps.push(tx(
            vec![malloc(65536, 4), malloc(65536, 4), malloc(65536, 12), malloc(200, 3)],
            End::Commit(NoFlush),
        ));
    }
    steps.push(Step::Crash(Crash::Keep { seed: 3, tear: true }));
    steps.push(Step::Grow { pages: 1023, fail: None });
    steps.push(Step::Restart);
    let e = run(&steps).unwrap();
    assert!(e.tally.growths >= 2, "{:?}", e.tally);
    assert!(e.tally.ooms > 0, "the heap never filled: {:?}", e.tally);
}
