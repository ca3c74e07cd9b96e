//! Ordinary Rust collections in a tracked heap, under crashes.
//!
//! A `hashbrown::HashMap<u64, u64, FixedState, TrackedAlloc>`, an
//! `allocator_api2::vec::Vec<u64, TrackedAlloc>` and an
//! `allocator_api2::boxed::Box<[u8; 24], TrackedAlloc>` live in one rooted
//! block of a tracked heap on the simulated disk. A random program changes
//! them with their ordinary methods in transactions (committed in both
//! modes, aborted, dropped) and crashes (losing unsynced writes, or keeping
//! a random subset with the last sector torn). After every crash and
//! reload the heap passes its check and the collections equal the state
//! after some committed prefix that holds every durable commit; after an
//! abort they equal the state before the transaction.

mod common;

use allocator_api2::boxed::Box as ABox;
use allocator_api2::vec::Vec as AVec;
use common::Disk;
use foldhash::fast::FixedState;
use proptest::prelude::*;
use rvm_core::testing::CrashMode;
use rvm_core::{CommitMode, RestoreMode};
use rvm_heap::{Heap, TrackedAlloc};
use std::alloc::Layout;
use std::collections::BTreeMap;

type Map = hashbrown::HashMap<u64, u64, FixedState, TrackedAlloc>;

/// The rooted block.
struct Roots {
    map: Map,
    vec: AVec<u64, TrackedAlloc>,
    boxed: ABox<[u8; 24], TrackedAlloc>,
}

/// What the collections hold.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    map: BTreeMap<u64, u64>,
    vec: Vec<u64>,
    boxed: [u8; 24],
}

fn roots_ptr(heap: &Heap) -> Option<*mut Roots> {
    heap.root("roots").map(|r| r.ptr.as_ptr().cast::<Roots>())
}

/// Creates the rooted block (in one flush transaction).
fn create_roots(heap: &Heap) {
    heap.track().unwrap();
    // SAFETY: what the handle allocates lives in the rooted block or is
    // dropped inside the transaction that allocated it, and changes only
    // inside transactions on the heap.
    let alloc = unsafe { TrackedAlloc::new(heap) }.unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let p = tx.malloc(Layout::new::<Roots>()).unwrap();
    let roots = Roots {
        // With a capacity: an empty table that never allocated points into
        // the binary (see TrackedAlloc's docs).
        map: Map::with_capacity_and_hasher_in(4, FixedState::with_seed(7), alloc),
        vec: AVec::with_capacity_in(4, alloc),
        boxed: ABox::new_in([0; 24], alloc),
    };
    // SAFETY: a fresh block of this transaction, large and aligned enough.
    unsafe { p.cast::<Roots>().as_ptr().write(roots) };
    tx.set_root("roots", Some((p, std::mem::size_of::<Roots>() as u64, 1))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
}

fn state(heap: &Heap) -> State {
    let p = roots_ptr(heap).expect("the root");
    // SAFETY: no transaction is open; the block holds a Roots (created by
    // create_roots, changed only by committed transactions).
    let r = unsafe { &*p };
    State { map: r.map.iter().map(|(&k, &v)| (k, v)).collect(), vec: r.vec.to_vec(), boxed: *r.boxed }
}

#[derive(Clone, Debug)]
enum Change {
    Insert(u64, u64),
    Remove(u64),
    Push(u64),
    Pop,
    Box(u8, u8),
    Shrink,
}

#[derive(Clone, Copy, Debug)]
enum End {
    Flush,
    NoFlush,
    Abort,
    Drop,
}

#[derive(Clone, Debug)]
enum Op {
    Tx(Vec<Change>, End),
    Crash(Option<u64>),
    Checkpoint,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0..64u64, any::<u64>()).prop_map(|(k, v)| Change::Insert(k, v)),
        2 => (0..64u64).prop_map(Change::Remove),
        2 => any::<u64>().prop_map(Change::Push),
        1 => Just(Change::Pop),
        1 => (0..24u8, any::<u8>()).prop_map(|(i, b)| Change::Box(i, b)),
        1 => Just(Change::Shrink),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let end = prop_oneof![Just(End::Flush), Just(End::NoFlush), Just(End::Abort), Just(End::Drop)];
    prop_oneof![
        6 => (prop::collection::vec(change(), 0..40), end).prop_map(|(c, e)| Op::Tx(c, e)),
        1 => prop::option::of(any::<u64>()).prop_map(Op::Crash),
        1 => Just(Op::Checkpoint),
    ]
}

fn apply(r: &mut Roots, s: &mut State, c: &Change) {
    match *c {
        Change::Insert(k, v) => {
            assert_eq!(r.map.insert(k, v), s.map.insert(k, v));
        }
        Change::Remove(k) => {
            assert_eq!(r.map.remove(&k), s.map.remove(&k));
        }
        Change::Push(v) => {
            r.vec.push(v);
            s.vec.push(v);
        }
        Change::Pop => {
            assert_eq!(r.vec.pop(), s.vec.pop());
        }
        Change::Box(i, b) => {
            r.boxed[i as usize] = b;
            s.boxed[i as usize] = b;
        }
        Change::Shrink => {
            // Frees and moves the vector's buffer (never to the empty
            // static: a Vec's empty buffer is a dangling constant).
            r.vec.shrink_to_fit();
            r.map.shrink_to(r.map.len().max(1));
        }
    }
}

fn run(ops: &[Op]) {
    let disk = Disk::new(1 << 20, false);
    let (mut rvm, mut heap) = disk.open(true).unwrap();
    create_roots(heap.heap());
    let mut states = vec![state(heap.heap())];
    let mut durable = 0;
    for op in ops {
        match op {
            Op::Tx(changes, end) => {
                let h = heap.heap();
                let before = state(h);
                let tx = h.begin(RestoreMode::Restore).unwrap();
                let mut s = before.clone();
                {
                    // SAFETY: this thread holds the heap's tracked
                    // transaction; no other reference to the block lives.
                    let r = unsafe { &mut *roots_ptr(h).unwrap() };
                    for c in changes {
                        apply(r, &mut s, c);
                    }
                }
                match end {
                    End::Flush | End::NoFlush => {
                        let flush = matches!(end, End::Flush);
                        tx.commit(if flush { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
                        assert_eq!(state(h), s);
                        states.push(s);
                        if flush {
                            durable = states.len() - 1;
                        }
                    }
                    End::Abort => {
                        tx.abort();
                        assert_eq!(state(h), before);
                    }
                    End::Drop => {
                        drop(tx);
                        assert_eq!(state(h), before);
                    }
                }
                h.check().unwrap();
            }
            Op::Checkpoint => {
                rvm.checkpoint().unwrap();
                durable = states.len() - 1;
            }
            Op::Crash(keep) => {
                let mode = match keep {
                    None => CrashMode::LoseUnsynced,
                    Some(seed) => CrashMode::KeepRandomSubset { seed: *seed, tear_last: seed % 2 == 1 },
                };
                disk.disk.crash(mode);
                drop(heap);
                drop(rvm);
                (rvm, heap) = disk.open(false).unwrap();
                heap.heap().check().unwrap();
                heap.heap().track().unwrap();
                let got = state(heap.heap());
                let k = states.iter().rposition(|s| *s == got).expect("a committed state");
                assert!(k >= durable, "lost a durable commit: state {k}, durable {durable}");
                states = vec![got];
                durable = 0;
            }
        }
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn collections_survive_crashes(ops in prop::collection::vec(op(), 1..16)) {
        run(&ops);
    }
}

#[test]
fn the_handle_refuses_outside_a_transaction_and_on_untracked_heaps() {
    let disk = Disk::new(1 << 20, false);
    let (_rvm, heap) = disk.open(true).unwrap();
    let h = heap.heap();
    // SAFETY: refused (the heap is not tracked): no handle is made.
    let refused = unsafe { TrackedAlloc::new(h) };
    assert!(matches!(refused, Err(rvm_heap::HeapError::NotTracked)));
    h.track().unwrap();
    // SAFETY: the handle's one allocation below is forgotten before its
    // transaction aborts, and nothing else it allocates outlives one.
    let alloc = unsafe { TrackedAlloc::new(h) }.unwrap();
    assert!(AVec::<u64, _>::new_in(alloc).try_reserve(8).is_err());
    // SAFETY: a valid layout; the null result is not used.
    assert!(unsafe { std::alloc::GlobalAlloc::alloc(&alloc, Layout::new::<u64>()) }.is_null());
    // Inside one it allocates; the block is the transaction's, and an
    // abort returns it.
    let live = h.stats().live_blocks;
    let tx = h.begin(RestoreMode::Restore).unwrap();
    let v: AVec<u64, _> = AVec::with_capacity_in(8, alloc);
    assert!(v.capacity() >= 8);
    std::mem::forget(v);
    tx.abort();
    assert_eq!(h.stats().live_blocks, live);
    h.check().unwrap();
}
