//! Crash-test your own persistent structures: a template.
//!
//! Copy this file into your project's `tests/` (with `rvm-core`'s
//! `testing` feature and `proptest` as dev-dependencies) and replace
//! `Shop`, `Op` and `apply` with your own types and operations. It runs
//! random operations in transactions on a **simulated disk**, cuts the
//! power at a random storage operation (the disk keeps only what was
//! synced, plus any subset of the rest, with the last sector torn), reopens,
//! and checks that what it finds is exactly the state after some prefix of
//! the committed transactions that includes every durable one — never a
//! half-done transaction, never a lost flush.
//!
//! ```text
//! cargo test -p rvm-collections --test crash_harness
//! PROPTEST_CASES=2000 cargo test --release -p rvm-collections --test crash_harness
//! ```

use proptest::prelude::*;
use rvm_collections::{Config, Error, PBTreeMap, PHeap, PVec, Persist};
use rvm_core::testing::{CrashMode, SimDisk};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Your data: a derived plain struct, and a map of structs that own a
/// vector each, kept under two roots.
#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Shop {
    orders: u64,
    revenue: u64,
}

#[derive(Persist)]
#[repr(C)]
struct Stock {
    count: u64,
    price: u64,
    /// The order numbers of its sales.
    sales: PVec<u64>,
}

/// Your operations.
#[derive(Clone, Debug)]
enum Op {
    Restock { item: u64, count: u64, price: u64 },
    Sell { item: u64 },
}

/// The model: what the state must be after the same operations.
#[derive(Clone, Debug, PartialEq, Default)]
struct Model {
    shop: (u64, u64),
    /// Count, price, sales.
    stock: BTreeMap<u64, (u64, u64, Vec<u64>)>,
}

/// One operation, on the model and in the transaction alike.
fn apply(op: &Op, m: &mut Model, tx: &rvm_collections::WriteTx<'_>) -> Result<(), Error> {
    let mut shop = tx.root_or_insert_with("shop", || Shop { orders: 0, revenue: 0 })?;
    let mut stock = tx.root_or_insert_with("stock", PBTreeMap::<u64, Stock>::new)?;
    match *op {
        Op::Restock { item, count, price } => {
            let mut s = stock.get_or_insert_with(item, || Stock { count: 0, price, sales: PVec::new() })?;
            *s.field_mut(|s| &s.count) += count;
            *s.field_mut(|s| &s.price) = price;
            let e = m.stock.entry(item).or_default();
            (e.0, e.1) = (e.0 + count, price);
        }
        Op::Sell { item } => {
            if let Some(mut s) = stock.get_mut(&item)? {
                if s.count > 0 {
                    let order = shop.orders + 1;
                    *s.field_mut(|s| &s.count) -= 1;
                    s.field_mut(|s| &s.sales).push(order)?;
                    shop.orders = order;
                    shop.revenue += s.price;
                    let e = m.stock.get_mut(&item).expect("the model has it too");
                    e.0 -= 1;
                    e.2.push(order);
                    m.shop = (m.shop.0 + 1, m.shop.1 + e.1);
                }
            }
        }
    }
    Ok(())
}

/// Reads the state back.
fn read(heap: &PHeap) -> Model {
    heap.read(|r| {
        let shop = r.root::<Shop>("shop").unwrap().map_or((0, 0), |s| (s.orders, s.revenue));
        let stock = r
            .root::<PBTreeMap<u64, Stock>>("stock")
            .unwrap()
            .map(|m| m.iter().map(|(k, v)| (*k, (v.count, v.price, v.sales.to_vec()))).collect())
            .unwrap_or_default();
        Model { shop, stock }
    })
}

fn open(disk: &SimDisk) -> Result<PHeap, Error> {
    let config = Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() };
    PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("shop"), config)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..20, 1u64..5, 1u64..100).prop_map(|(item, count, price)| Op::Restock { item, count, price }),
        (0u64..20).prop_map(|item| Op::Sell { item }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    /// Transactions of 1-4 operations, each flushed or not; the power fails
    /// at storage operation `cut` (counted from the first transaction).
    #[test]
    fn the_shop_survives_power_loss(
        txs in prop::collection::vec((prop::collection::vec(op(), 1..4), any::<bool>()), 1..30),
        cut in 0u64..400,
        seed in any::<u64>(),
    ) {
        let disk = SimDisk::new();
        let heap = open(&disk).unwrap();
        // Committed states in order; `durable` is the last one flushed.
        let mut states = vec![Model::default()];
        let mut durable = 0;
        disk.fail_after(cut);
        for (ops, flush) in &txs {
            let mut m = states.last().unwrap().clone();
            let mut ran = false;
            let body = |tx: &mut rvm_collections::WriteTx<'_>| {
                ops.iter().try_for_each(|op| apply(op, &mut m, tx))?;
                ran = true;
                Ok::<_, Error>(())
            };
            let r = if *flush { heap.write(body) } else { heap.write_no_flush(body) };
            match r {
                Ok(()) => {
                    states.push(m);
                    if *flush {
                        durable = states.len() - 1;
                    }
                }
                // The power is failing: nothing more commits. A commit
                // that failed in its write or sync may still have reached
                // the disk: its state is allowed, not required.
                Err(_) => {
                    if ran {
                        states.push(m);
                    }
                    break;
                }
            }
        }
        // Power loss: unsynced writes are kept or lost at random, the last
        // sector torn.
        disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: true });
        disk.clear_faults();
        drop(heap);
        let heap = open(&disk).unwrap();
        let found = read(&heap);
        let k = states.iter().rposition(|s| *s == found);
        prop_assert!(
            k.is_some_and(|k| k >= durable),
            "after the crash: {found:?}\nnot a committed state at or after #{durable} of {states:?}"
        );
        // The heap is sound and every block is reached from a root.
        let report = heap.check().unwrap();
        prop_assert!(report.is_clean(), "{:?}", report.reachability);
    }
}
