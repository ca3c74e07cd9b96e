//! `PVec<u64>` against `Vec<u64>`: random operations in transactions
//! that commit (flush or not), abort (by `Err` and by panic), and crashes
//! of the simulated disk at random points. After every reopen the vector
//! equals the model at a committed prefix that includes every flushed
//! transaction, the heap check passes, and no block leaks.

use proptest::prelude::*;
use rvm_collections::{Config, Error, PHeap, PVec};
use rvm_core::testing::{CrashMode, SimDisk};
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Op {
    Push(u64),
    Pop,
    Insert(usize, u64),
    Remove(usize),
    Set(usize, u64),
    GetMut(usize, u64),
    Truncate(usize),
    Reserve(usize),
    Extend(u8),
}

#[derive(Clone, Debug)]
enum End {
    Flush,
    NoFlush,
    Err,
    Panic,
}

#[derive(Clone, Debug)]
enum Step {
    Tx(Vec<Op>, End),
    Crash(CrashMode),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u64>().prop_map(Op::Push),
        2 => Just(Op::Pop),
        2 => (0usize..64, any::<u64>()).prop_map(|(i, v)| Op::Insert(i, v)),
        2 => (0usize..64).prop_map(Op::Remove),
        2 => (0usize..64, any::<u64>()).prop_map(|(i, v)| Op::Set(i, v)),
        1 => (0usize..64, any::<u64>()).prop_map(|(i, v)| Op::GetMut(i, v)),
        1 => (0usize..40).prop_map(Op::Truncate),
        1 => (0usize..100).prop_map(Op::Reserve),
        1 => any::<u8>().prop_map(Op::Extend),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let end = prop_oneof![3 => Just(End::Flush), 4 => Just(End::NoFlush), 1 => Just(End::Err), 1 => Just(End::Panic)];
    let crash = prop_oneof![
        Just(CrashMode::LoseUnsynced),
        (any::<u64>(), any::<bool>()).prop_map(|(seed, tear_last)| CrashMode::KeepRandomSubset { seed, tear_last }),
    ];
    prop_oneof![
        8 => (prop::collection::vec(op(), 1..12), end).prop_map(|(ops, e)| Step::Tx(ops, e)),
        2 => crash.prop_map(Step::Crash),
        1 => Just(Step::Reopen),
    ]
}

/// Applies `op` to the model and to the persistent vector alike.
fn apply(op: &Op, model: &mut Vec<u64>, v: &mut rvm_collections::RootMut<'_, '_, PVec<u64>>) -> Result<(), Error> {
    match *op {
        Op::Push(x) => {
            model.push(x);
            v.push(x)?;
        }
        Op::Pop => assert_eq!(v.pop()?, model.pop()),
        Op::Insert(i, x) if i <= model.len() => {
            model.insert(i, x);
            v.insert(i, x)?;
        }
        Op::Remove(i) if i < model.len() => assert_eq!(v.remove(i)?, model.remove(i)),
        Op::Set(i, x) if i < model.len() => assert_eq!(v.set(i, x)?, std::mem::replace(&mut model[i], x)),
        Op::GetMut(i, x) => match (v.get_mut(i)?, model.get_mut(i)) {
            (Some(a), Some(b)) => {
                *a = x;
                *b = x;
            }
            (None, None) => {}
            (a, b) => panic!("get_mut disagrees: {a:?} vs {b:?}"),
        },
        Op::Truncate(n) => {
            model.truncate(n);
            v.truncate(n)?;
        }
        Op::Reserve(n) => {
            v.reserve(n)?;
            assert!(v.capacity() >= model.len() + n);
        }
        Op::Extend(k) => {
            let items: Vec<u64> = (0..u64::from(k % 20)).map(|i| i * 3 + u64::from(k)).collect();
            model.extend(&items);
            v.extend_from_slice(&items)?;
        }
        _ => {}
    }
    assert_eq!(v.as_slice(), &model[..]);
    Ok(())
}

fn config() -> Config {
    Config { heap_len: 1 << 20, log_len: 512 << 10, ..Config::default() }
}

fn open(disk: &SimDisk) -> PHeap {
    PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("db"), config()).unwrap()
}

/// Checks the recovered heap: the vector is one of `states[lower..]`
/// (returns its index), the heap passes its check, and exactly the root
/// block and the vector's buffer (if any) are live.
fn recovered(heap: &PHeap, states: &[Vec<u64>], lower: usize) -> usize {
    let (got, cap) = heap.read(|r| match r.root::<PVec<u64>>("v").unwrap() {
        Some(v) => (v.to_vec(), v.capacity()),
        None => (Vec::new(), usize::MAX),
    });
    heap.check().unwrap();
    let live = heap.stats().live_blocks;
    let expected = match cap {
        usize::MAX => 0,
        0 => 1,
        _ => 2,
    };
    assert_eq!(live, expected, "blocks leaked or lost (capacity {cap})");
    match states.iter().rposition(|s| *s == got) {
        Some(k) if k >= lower => k,
        _ => panic!("recovered {got:?} is not a committed state at or after {lower}: {states:?}"),
    }
}

fn run(steps: &[Step]) {
    let disk = SimDisk::new();
    let mut heap = open(&disk);
    // Committed states since the last reopen, and the index of the last
    // one known durable.
    let mut states = vec![Vec::new()];
    let mut durable = 0;
    for s in steps {
        match s {
            Step::Tx(ops, end) => {
                let mut model = states.last().unwrap().clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let body = |tx: &mut rvm_collections::WriteTx<'_>| {
                        let mut v = tx.root_or_insert_with("v", PVec::<u64>::new)?;
                        for op in ops {
                            apply(op, &mut model, &mut v)?;
                        }
                        match end {
                            End::Err => Err(Error::Config("refused".into())),
                            End::Panic => panic!("abort by panic"),
                            _ => Ok(()),
                        }
                    };
                    match end {
                        End::NoFlush => heap.write_no_flush(body),
                        _ => heap.write(body),
                    }
                }));
                match (end, r) {
                    (End::Flush, Ok(Ok(()))) => {
                        states.push(model);
                        durable = states.len() - 1;
                    }
                    (End::NoFlush, Ok(Ok(()))) => states.push(model),
                    (End::Err, Ok(Err(_))) | (End::Panic, Err(_)) => {
                        let now = heap.read(|r| r.root::<PVec<u64>>("v").unwrap().map(|v| v.to_vec()));
                        assert_eq!(now.unwrap_or_default(), *states.last().unwrap(), "an abort left changes");
                    }
                    (e, r) => panic!("{e:?} ended as {r:?}"),
                }
            }
            Step::Crash(mode) => {
                disk.crash(*mode);
                drop(heap);
                heap = open(&disk);
                let k = recovered(&heap, &states, durable);
                states = vec![states[k].clone()];
                durable = 0;
            }
            Step::Reopen => {
                heap.close().unwrap();
                heap = open(&disk);
                let n = states.len() - 1;
                let k = recovered(&heap, &states, n);
                states = vec![states[k].clone()];
                durable = 0;
            }
        }
    }
    disk.crash(CrashMode::LoseUnsynced);
    drop(heap);
    let heap = open(&disk);
    recovered(&heap, &states, durable);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]

    #[test]
    fn pvec_matches_vec_across_commits_aborts_and_crashes(steps in prop::collection::vec(step(), 1..40)) {
        run(&steps);
    }
}

#[test]
fn growth_inside_an_aborted_transaction_gives_everything_back() {
    run(&[
        Step::Tx(vec![Op::Extend(19), Op::Push(1)], End::Flush),
        Step::Tx(vec![Op::Extend(19), Op::Extend(19), Op::Reserve(90)], End::Err),
        Step::Tx(vec![Op::Extend(19), Op::Reserve(90)], End::Panic),
        Step::Crash(CrashMode::LoseUnsynced),
        Step::Tx(vec![Op::Reserve(50), Op::Insert(0, 9), Op::Remove(3)], End::NoFlush),
        Step::Reopen,
    ]);
}
