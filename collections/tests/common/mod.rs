//! The model-test loop shared by the collection tests: random operations
//! in transactions that commit (flush or not) or abort (by `Err`, by
//! panic), crashes of the simulated disk and clean reopens; after every
//! reopen the collection must equal its model at a committed prefix that
//! includes every flushed transaction, the heap check must pass, and
//! exactly the root block and the blocks the collection owns may be live.

#![allow(dead_code)] // each test file uses part of it

use proptest::prelude::*;
use rvm_collections::{Config, Error, PHeap, Persist, RootMut};
use rvm_core::testing::{CrashMode, SimDisk};
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

/// How a transaction ends.
#[derive(Clone, Debug)]
pub enum End {
    Flush,
    NoFlush,
    Err,
    Panic,
}

/// One step of a test.
#[derive(Clone, Debug)]
pub enum Step<O> {
    Tx(Vec<O>, End),
    Crash(CrashMode),
    Reopen,
}

/// Steps of transactions of 1 to `max_ops` operations, crashes and reopens.
pub fn steps<O: Clone + Debug>(
    op: impl Strategy<Value = O>,
    max_ops: usize,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Step<O>>> {
    let end = prop_oneof![3 => Just(End::Flush), 4 => Just(End::NoFlush), 1 => Just(End::Err), 1 => Just(End::Panic)];
    let crash = prop_oneof![
        Just(CrashMode::LoseUnsynced),
        (any::<u64>(), any::<bool>()).prop_map(|(seed, tear_last)| CrashMode::KeepRandomSubset { seed, tear_last }),
    ];
    let step = prop_oneof![
        8 => (prop::collection::vec(op, 1..max_ops), end).prop_map(|(ops, e)| Step::Tx(ops, e)),
        2 => crash.prop_map(Step::Crash),
        1 => Just(Step::Reopen),
    ];
    prop::collection::vec(step, len)
}

/// Proptest cases: `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A collection under test, kept under the root `"subject"`.
pub trait Subject {
    /// The persistent type.
    type Root: Persist;
    /// Its model (a `std` collection).
    type Model: Clone + Debug + PartialEq + Default;
    /// One operation.
    type Op: Debug;
    /// An empty value, to make the root with.
    fn empty() -> Self::Root;
    /// Applies `op` to the model and to the persistent value alike (and
    /// checks whatever the operation returns).
    fn apply(op: &Self::Op, model: &mut Self::Model, root: &mut RootMut<'_, '_, Self::Root>) -> Result<(), Error>;
    /// The model of a persistent value.
    fn read(root: &Self::Root) -> Self::Model;
}

fn open(disk: &SimDisk, config: &Config) -> PHeap {
    PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("db"), config.clone()).unwrap()
}

fn read<S: Subject>(heap: &PHeap) -> Option<S::Model> {
    heap.read(|r| r.root::<S::Root>("subject").unwrap().map(|v| S::read(v)))
}

/// Checks the recovered heap: the value is one of `states[lower..]`
/// (returns its index), the heap passes its check, and every live block
/// is reached from a root (nothing leaked).
fn recovered<S: Subject>(heap: &PHeap, states: &[S::Model], lower: usize) -> usize {
    let got = read::<S>(heap).unwrap_or_default();
    let report = heap.check().unwrap();
    assert!(report.is_clean(), "blocks leaked or roots damaged: {:?}", report.reachability);
    match states.iter().rposition(|s| *s == got) {
        Some(k) if k >= lower => k,
        _ => panic!("recovered {got:?} is not a committed state at or after {lower}: {states:?}"),
    }
}

/// Runs `steps` on a fresh simulated disk, checking as described above,
/// and ends with a crash that loses everything unsynced.
pub fn run<S: Subject>(steps: &[Step<S::Op>], config: &Config) {
    let disk = SimDisk::new();
    let mut heap = open(&disk, config);
    // Committed states since the last reopen, and the index of the last
    // one known durable.
    let mut states = vec![S::Model::default()];
    let mut durable = 0;
    for s in steps {
        match s {
            Step::Tx(ops, end) => {
                let mut model = states.last().unwrap().clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let body = |tx: &mut rvm_collections::WriteTx<'_>| {
                        let mut v = tx.root_or_insert_with("subject", S::empty)?;
                        for op in ops {
                            S::apply(op, &mut model, &mut v)?;
                            assert_eq!(S::read(&v), model, "after {op:?}");
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
                        let now = read::<S>(&heap).unwrap_or_default();
                        assert_eq!(now, *states.last().unwrap(), "an abort left changes");
                    }
                    (e, r) => panic!("{e:?} ended as {r:?}"),
                }
            }
            Step::Crash(mode) => {
                disk.crash(*mode);
                drop(heap);
                heap = open(&disk, config);
                let k = recovered::<S>(&heap, &states, durable);
                states = vec![states[k].clone()];
                durable = 0;
            }
            Step::Reopen => {
                heap.close().unwrap();
                heap = open(&disk, config);
                let n = states.len() - 1;
                let k = recovered::<S>(&heap, &states, n);
                states = vec![states[k].clone()];
                durable = 0;
            }
        }
    }
    disk.crash(CrashMode::LoseUnsynced);
    drop(heap);
    let heap = open(&disk, config);
    recovered::<S>(&heap, &states, durable);
}
