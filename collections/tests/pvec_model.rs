//! `PVec<u64>` against `Vec<u64>`: random operations in transactions
//! that commit (flush or not), abort (by `Err` and by panic), and crashes
//! of the simulated disk at random points. After every reopen the vector
//! equals the model at a committed prefix that includes every flushed
//! transaction, the heap check passes, and no block leaks.

mod common;

use common::{End, Step, Subject};
use proptest::prelude::*;
use rvm_collections::{Config, Error, PVec, RootMut};
use rvm_core::testing::CrashMode;

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

/// Applies `op` to the model and to the persistent vector alike.
fn apply(op: &Op, model: &mut Vec<u64>, v: &mut RootMut<'_, '_, PVec<u64>>) -> Result<(), Error> {
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
            (Some(mut a), Some(b)) => {
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

struct Vector;

impl Subject for Vector {
    type Root = PVec<u64>;
    type Model = Vec<u64>;
    type Op = Op;
    fn empty() -> PVec<u64> {
        PVec::new()
    }
    fn apply(op: &Op, model: &mut Vec<u64>, root: &mut RootMut<'_, '_, PVec<u64>>) -> Result<(), Error> {
        apply(op, model, root)
    }
    fn read(root: &PVec<u64>) -> Vec<u64> {
        root.to_vec()
    }
}

fn run(steps: &[Step<Op>]) {
    common::run::<Vector>(steps, &Config { heap_len: 1 << 20, log_len: 512 << 10, ..Config::default() });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(32), ..ProptestConfig::default() })]

    #[test]
    fn pvec_matches_vec_across_commits_aborts_and_crashes(steps in common::steps(op(), 12, 1..40)) {
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
