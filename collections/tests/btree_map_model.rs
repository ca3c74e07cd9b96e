//! `PBTreeMap<u64, u64>` against `std::collections::BTreeMap<u64, u64>`:
//! random operations (single and bulk inserts, removals, pops, in-place
//! changes, range queries) in transactions that commit (flush or not),
//! abort (by `Err` and by panic), and crashes of the simulated disk at
//! random points. After every reopen the map equals the model at a
//! committed prefix that includes every flushed transaction (in order),
//! the heap check passes, and exactly the root block and the tree's nodes
//! are live.

mod common;

use common::{End, Step, Subject};
use proptest::prelude::*;
use rvm_collections::{Config, Error, PBTreeMap, PHeap, Persist, ReadTx, RootMut};
use rvm_core::testing::CrashMode;
use std::collections::BTreeMap;
use std::ops::Bound;

type Map = PBTreeMap<u64, u64>;
type Model = BTreeMap<u64, u64>;

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64),
    Remove(u64),
    GetMut(u64, u64),
    PopFirst,
    PopLast,
    /// Inserts `count` keys `start, start + step, ...` (splits, new levels).
    Bulk(u64, u16, u8),
    /// Removes every key in `[a, b)` one by one (merges, freed nodes).
    RemoveRange(u64, u64),
    Range(Bound<u64>, Bound<u64>),
    Clear,
}

const KEYS: u64 = 1200;

fn bound() -> impl Strategy<Value = Bound<u64>> {
    prop_oneof![(0..KEYS).prop_map(Bound::Included), (0..KEYS).prop_map(Bound::Excluded), Just(Bound::Unbounded),]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS, any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
        4 => (0..KEYS).prop_map(Op::Remove),
        1 => (0..KEYS, any::<u64>()).prop_map(|(k, v)| Op::GetMut(k, v)),
        1 => Just(Op::PopFirst),
        1 => Just(Op::PopLast),
        2 => (0..KEYS, 0u16..400, 1u8..4).prop_map(|(s, c, st)| Op::Bulk(s, c, st)),
        1 => (0..KEYS, 0u64..300).prop_map(|(a, n)| Op::RemoveRange(a, a + n)),
        2 => (bound(), bound()).prop_map(|(a, b)| Op::Range(a, b)),
        1 => Just(Op::Clear),
    ]
}

fn entries(m: &Map) -> Vec<(u64, u64)> {
    m.iter().map(|(k, v)| (*k, *v)).collect()
}

fn valid(a: Bound<u64>, b: Bound<u64>) -> bool {
    match (a, b) {
        (Bound::Included(x) | Bound::Excluded(x), Bound::Included(y) | Bound::Excluded(y)) if x > y => false,
        (Bound::Excluded(x), Bound::Excluded(y)) if x == y => false,
        _ => true,
    }
}

/// Checks the read side of `m` against `model`.
fn same(m: &Map, model: &Model) {
    assert_eq!(m.len(), model.len());
    assert_eq!(m.is_empty(), model.is_empty());
    assert_eq!(m.first_key_value(), model.first_key_value());
    assert_eq!(m.last_key_value(), model.last_key_value());
    let all: Vec<(u64, u64)> = model.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(entries(m), all);
}

/// Applies `op` to the model and to the persistent map alike.
fn apply(op: &Op, model: &mut Model, m: &mut RootMut<'_, '_, Map>) -> Result<(), Error> {
    match op {
        &Op::Insert(k, v) => assert_eq!(m.insert(k, v)?, model.insert(k, v)),
        Op::Remove(k) => assert_eq!(m.remove(k)?, model.remove(k)),
        &Op::GetMut(k, v) => match (m.get_mut(&k)?, model.get_mut(&k)) {
            (Some(mut a), Some(b)) => {
                *a = v;
                *b = v;
            }
            (None, None) => {}
            (a, b) => panic!("get_mut disagrees: {a:?} vs {b:?}"),
        },
        Op::PopFirst => assert_eq!(m.pop_first()?, model.pop_first()),
        Op::PopLast => assert_eq!(m.pop_last()?, model.pop_last()),
        &Op::Bulk(start, count, step) => {
            for i in 0..u64::from(count) {
                let k = start + i * u64::from(step);
                assert_eq!(m.insert(k, k ^ 0x5555)?, model.insert(k, k ^ 0x5555));
            }
        }
        &Op::RemoveRange(a, b) => {
            for k in a..b {
                assert_eq!(m.remove(&k)?, model.remove(&k));
            }
        }
        &Op::Range(a, b) => {
            let got: Vec<(u64, u64)> = m.range((a, b)).map(|(k, v)| (*k, *v)).collect();
            if valid(a, b) {
                let want: Vec<(u64, u64)> = model.range((a, b)).map(|(k, v)| (*k, *v)).collect();
                assert_eq!(got, want, "range {a:?}..{b:?}");
            } else {
                assert!(got.is_empty());
            }
        }
        Op::Clear => {
            m.clear()?;
            model.clear();
        }
    }
    for k in [0, 1, KEYS / 2, KEYS - 1] {
        assert_eq!(m.get(&k), model.get(&k));
        assert_eq!(m.contains_key(&k), model.contains_key(&k));
    }
    same(m, model);
    Ok(())
}

fn config() -> Config {
    Config { heap_len: 2 << 20, log_len: 2 << 20, ..Config::default() }
}

fn nodes(r: &ReadTx<'_>, m: &Map) -> usize {
    r.owned_blocks(m).unwrap().len()
}

/// Live blocks besides a map's nodes: its root block and the typed
/// layer's shape table.
const OTHER_BLOCKS: u64 = 2;

/// Tests of this file that open real folders run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Tree;

impl Subject for Tree {
    type Root = Map;
    type Model = Model;
    type Op = Op;
    fn empty() -> Map {
        PBTreeMap::new()
    }
    fn apply(op: &Op, model: &mut Model, root: &mut RootMut<'_, '_, Map>) -> Result<(), Error> {
        apply(op, model, root)
    }
    fn read(root: &Map) -> Model {
        let model: Model = root.iter().map(|(k, v)| (*k, *v)).collect();
        same(root, &model);
        model
    }
}

fn run(steps: &[Step<Op>]) {
    common::run::<Tree>(steps, &config());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(32), ..ProptestConfig::default() })]

    #[test]
    fn pbtreemap_matches_btreemap_across_commits_aborts_and_crashes(steps in common::steps(op(), 10, 1..30)) {
        run(&steps);
    }
}

#[test]
fn splits_and_frees_inside_aborted_transactions_give_everything_back() {
    run(&[
        Step::Tx(vec![Op::Bulk(0, 399, 1), Op::Insert(5000, 1)], End::Flush),
        Step::Tx(vec![Op::Bulk(400, 399, 2), Op::RemoveRange(0, 300)], End::Err),
        Step::Tx(vec![Op::Clear, Op::Bulk(3, 200, 3)], End::Panic),
        Step::Crash(CrashMode::LoseUnsynced),
        Step::Tx(vec![Op::RemoveRange(0, 200), Op::PopFirst, Op::PopLast], End::NoFlush),
        Step::Reopen,
        Step::Tx(vec![Op::RemoveRange(0, 1000)], End::Flush),
        Step::Crash(CrashMode::LoseUnsynced),
    ]);
}

fn small() -> Config {
    Config { heap_len: 16 << 20, log_len: 16 << 20, ..Config::default() }
}

#[test]
fn thousands_of_keys_in_several_levels() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let mut model = Model::new();
    // A scrambled order (multiplicative hashing), in a few transactions.
    let n = 20_000u64;
    for chunk in 0..4 {
        heap.write(|tx| {
            let mut m = tx.root_or_insert_with("big", Map::new)?;
            for i in chunk * n / 4..(chunk + 1) * n / 4 {
                let k = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                assert_eq!(m.insert(k, i)?, model.insert(k, i));
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    heap.close().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.read(|r| {
        let m = r.root::<Map>("big").unwrap().unwrap();
        assert!(m.height() >= 2, "height {}", m.height());
        same(m, &model);
        for (a, b) in [(0, 10), (1000, 1 << 20), (5 << 20, 6 << 20), (u64::MAX - 5, u64::MAX)] {
            let got: Vec<_> = m.range(a..b).map(|(k, v)| (*k, *v)).collect();
            let want: Vec<_> = model.range(a..b).map(|(k, v)| (*k, *v)).collect();
            assert_eq!(got, want);
        }
        assert_eq!(heap.stats().live_blocks, OTHER_BLOCKS + nodes(r, m) as u64);
    });
    // Remove all but a few, from both ends and the middle.
    let keys: Vec<u64> = model.keys().copied().collect();
    heap.write(|tx| {
        let mut m = tx.root_mut::<Map>("big")?.unwrap();
        for (j, k) in keys.iter().enumerate() {
            if j % 1000 != 7 {
                assert_eq!(m.remove(k)?, model.remove(k));
            }
        }
        same(&m, &model);
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.read(|r| {
        let m = r.root::<Map>("big").unwrap().unwrap();
        same(m, &model);
        // Lazy rebalancing: underfull nodes stay, empty ones are gone.
        assert!(nodes(r, m) <= model.len() * (m.height() + 1), "{} nodes", nodes(r, m));
        assert_eq!(heap.stats().live_blocks, OTHER_BLOCKS + nodes(r, m) as u64);
    });
    heap.check().unwrap();
}

#[test]
fn remove_root_frees_every_node() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let mut m = tx.root_or_insert_with("m", Map::new)?;
        for k in 0..5000 {
            m.insert(k, k)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let n = heap.read(|r| nodes(r, r.root::<Map>("m").unwrap().unwrap()));
    assert!(n > 100);
    assert_eq!(heap.stats().live_blocks, OTHER_BLOCKS + n as u64);
    heap.write(|tx| tx.remove_root::<Map>("m")).unwrap();
    // Only the shape table is left.
    assert_eq!(heap.stats().live_blocks, OTHER_BLOCKS - 1);
    heap.check().unwrap();
    // `clear` frees them too, and the map is usable afterwards.
    heap.write(|tx| {
        let mut m = tx.root_or_insert_with("m", Map::new)?;
        for k in 0..2000 {
            m.insert(k, k)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.write(|tx| {
        let mut m = tx.root_mut::<Map>("m")?.unwrap();
        m.clear()?;
        m.insert(7, 7)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(heap.stats().live_blocks, OTHER_BLOCKS + 1);
    heap.read(|r| assert_eq!(entries(r.root::<Map>("m").unwrap().unwrap()), [(7, 7)]));
}

#[test]
fn byte_array_keys_sort_as_bytes_and_inserts_log_one_node() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let mut m = tx.root_or_insert_with("b", PBTreeMap::<[u8; 4], u32>::new)?;
        for i in 0..3000u32 {
            m.insert(i.to_be_bytes(), i)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    // One more insert into a tree of ~100 leaves: the log grows by about
    // one node's worth, not by the whole map.
    let before = heap.rvm().stats().bytes_logged;
    heap.write(|tx| tx.root_mut::<PBTreeMap<[u8; 4], u32>>("b")?.unwrap().insert(1500u32.to_be_bytes(), 0).map(|_| ()))
        .unwrap();
    let logged = heap.rvm().stats().bytes_logged - before;
    assert!(logged < 4096, "one insert logged {logged} bytes");
    heap.read(|r| {
        let m = r.root::<PBTreeMap<[u8; 4], u32>>("b").unwrap().unwrap();
        let ks: Vec<u32> = m.range([0, 0, 0, 10]..[0, 0, 1, 0]).map(|(_, v)| *v).collect();
        assert_eq!(ks, (10..256).collect::<Vec<_>>());
        assert_eq!(m.get(&1500u32.to_be_bytes()), Some(&0));
    });
}

/// Forges a root of the map's type with the raw API (safe, and able to
/// write any bytes): `header` is (root, len, height).
fn forge(heap: &PHeap, name: &str, header: [u64; 3]) {
    let bytes: Vec<u8> = header.iter().flat_map(|w| w.to_ne_bytes()).collect();
    // SAFETY: no typed transaction runs meanwhile; the forged header is
    // damage to integers and pointers, which the map's check must refuse.
    unsafe { heap.raw_heap() }.root_or_create(name, 24, 8, Map::FINGERPRINT, |b| b.copy_from_slice(&bytes)).unwrap();
}

/// A raw block of `size` bytes holding `words` (then zeros): allocated
/// by the raw API, owned by no root (a typed root may not point at a
/// root's block).
fn raw_block(heap: &PHeap, size: usize, words: &[u64]) -> u64 {
    use rvm_core::{CommitMode, RestoreMode};
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    bytes.resize(size, 0);
    // SAFETY: no typed transaction runs meanwhile; a new raw block.
    let mut htx = unsafe { heap.raw_heap() }.begin(RestoreMode::Restore).unwrap();
    let p = htx.malloc(std::alloc::Layout::from_size_align(size, 8).unwrap()).unwrap();
    // SAFETY: a block this transaction just allocated.
    unsafe { htx.write(p, &bytes).unwrap() };
    htx.commit(CommitMode::Flush).unwrap();
    p.as_ptr() as u64
}

#[test]
fn wrong_type_and_damage_are_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("m", Map::new)?.insert(1, 2).map(|_| ())).unwrap();
    heap.read(|r| {
        assert!(matches!(r.root::<PBTreeMap<u64, u32>>("m"), Err(Error::RootType { .. })));
        assert!(matches!(r.root::<PBTreeMap<i64, u64>>("m"), Err(Error::RootType { .. })));
    });
    // Node layout for u64 keys and values: 16 header bytes, 32 keys, then
    // 32 values (leaf: 528 bytes) or 33 children (internal: 536 bytes).
    let mut leaf = vec![1, 0, 5];
    leaf.resize(2 + 32, 0);
    leaf.push(6);
    let a = raw_block(&heap, 528, &leaf);
    // The sound map's own copy: a leaf that two roots own is damage.
    let good = raw_block(&heap, 528, &leaf);
    let small_block = raw_block(&heap, 64, &[1, 0, 5]);
    let empty_leaf = raw_block(&heap, 528, &[0, 0]);
    let mut shared = vec![1, 1, 9];
    shared.resize(2 + 32, 0);
    shared.extend([a, a]);
    let b = raw_block(&heap, 536, &shared);
    let mut cyc = vec![0, 1];
    cyc.resize(2 + 32, 0);
    cyc.push(b);
    let c = raw_block(&heap, 536, &cyc);
    forge(&heap, "good", [good, 1, 0]);
    forge(&heap, "too small", [small_block, 1, 0]);
    forge(&heap, "not live", [a + 16, 1, 0]);
    forge(&heap, "empty leaf", [empty_leaf, 0, 0]);
    forge(&heap, "len", [a, 2, 0]);
    forge(&heap, "level", [a, 1, 1]);
    forge(&heap, "shared", [b, 2, 1]);
    forge(&heap, "deep", [c, 2, 2]);
    forge(&heap, "tall", [a, 1, 1000]);
    heap.read(|r| {
        let m = r.root::<Map>("good").unwrap().unwrap();
        assert_eq!(entries(m), [(5, 6)]);
        for name in ["too small", "not live", "empty leaf", "len", "level", "shared", "deep", "tall"] {
            assert!(matches!(r.root::<Map>(name), Err(Error::Damaged { .. })), "{name}");
        }
    });
    heap.write(|tx| {
        assert!(matches!(tx.root_mut::<Map>("shared"), Err(Error::Damaged { .. })));
        assert!(matches!(tx.remove_root::<Map>("shared"), Err(Error::Damaged { .. })));
        Ok::<_, Error>(())
    })
    .unwrap();
}

#[test]
fn borrowed_again_after_growth_in_the_same_transaction() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        tx.root_or_insert_with("m", Map::new)?.insert(1, 1)?;
        tx.root_or_insert_with("v", rvm_collections::PVec::<u64>::new)?.push(1)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    // New nodes and a new buffer are not live blocks before commit: the
    // second borrow must not take them for damage.
    let (len, vlen) = heap
        .write(|tx| {
            tx.root_mut::<Map>("m")?.unwrap().insert_many()?;
            tx.root_mut::<rvm_collections::PVec<u64>>("v")?.unwrap().extend(0..100)?;
            let m = tx.root::<Map>("m")?.unwrap();
            let v = tx.root::<rvm_collections::PVec<u64>>("v")?.unwrap();
            Ok::<_, Error>((m.len(), v.len()))
        })
        .unwrap();
    assert_eq!((len, vlen), (1000, 101));
}

trait InsertMany {
    fn insert_many(&mut self) -> Result<(), Error>;
}

impl InsertMany for RootMut<'_, '_, Map> {
    fn insert_many(&mut self) -> Result<(), Error> {
        for k in 0..1000 {
            self.insert(k, k)?;
        }
        Ok(())
    }
}
