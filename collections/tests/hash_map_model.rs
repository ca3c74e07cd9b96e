//! `PHashMap` against `std::collections::HashMap`: random operations in
//! transactions that commit (flush or not), abort (by `Err` and by panic),
//! and crashes of the simulated disk at random points. After every reopen
//! the map equals the model at a committed prefix that includes every
//! flushed transaction, the heap check passes, and no block leaks. Run
//! with `u64` keys and with a `#[derive(Persist)]` struct key.

mod common;

use common::{Step, Subject};
use proptest::prelude::*;
use rvm_collections::hash_map::{stable_hash, stable_hash_bytes, Entry};
use rvm_collections::{Config, Error, PHashMap, PHeap, Persist, Plain, RootMut};
use rvm_core::testing::SimDisk;
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;

/// A key type of the test: made from a number.
trait TestKey: Plain + Copy + Eq + Hash + Debug {
    fn make(n: u64) -> Self;
}

impl TestKey for u64 {
    fn make(n: u64) -> Self {
        n
    }
}

#[derive(Persist, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
struct Account {
    branch: u32,
    teller: u16,
    kind: [u8; 2],
    id: u64,
}

impl TestKey for Account {
    fn make(n: u64) -> Self {
        Account { branch: (n % 7) as u32, teller: (n % 3) as u16, kind: [b'a', (n % 5) as u8], id: n / 3 }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64),
    Remove(u64),
    GetMut(u64, u64),
    GetOrInsert(u64, u64),
    EntryRemove(u64),
    AndModify(u64, u64),
    Clear,
    Reserve(usize),
    Extend(u8),
}

/// Mostly a small key space (so that keys come back, collide and are
/// removed), sometimes any key.
fn key() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..48, 1 => any::<u64>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (key(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
        4 => key().prop_map(Op::Remove),
        2 => (key(), any::<u64>()).prop_map(|(k, v)| Op::GetMut(k, v)),
        2 => (key(), any::<u64>()).prop_map(|(k, v)| Op::GetOrInsert(k, v)),
        1 => key().prop_map(Op::EntryRemove),
        1 => (key(), any::<u64>()).prop_map(|(k, v)| Op::AndModify(k, v)),
        1 => Just(Op::Clear),
        1 => (0usize..100).prop_map(Op::Reserve),
        2 => any::<u8>().prop_map(Op::Extend),
    ]
}

type Model<K> = HashMap<K, u64>;

fn contents<K: TestKey>(m: &PHashMap<K, u64>) -> Model<K> {
    let all: Model<K> = m.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(all.len(), m.len(), "iter yields len entries, each once");
    assert_eq!(m.keys().count(), m.len());
    assert_eq!(m.values().count(), m.len());
    assert!(m.len() <= m.capacity());
    all
}

/// Applies `op` to the model and to the persistent map alike.
fn apply<K: TestKey>(op: &Op, model: &mut Model<K>, m: &mut RootMut<'_, '_, PHashMap<K, u64>>) -> Result<(), Error> {
    match *op {
        Op::Insert(k, v) => assert_eq!(m.insert(K::make(k), v)?, model.insert(K::make(k), v)),
        Op::Remove(k) => assert_eq!(m.remove(&K::make(k))?, model.remove(&K::make(k))),
        Op::GetMut(k, v) => match (m.get_mut(&K::make(k))?, model.get_mut(&K::make(k))) {
            (Some(mut a), Some(b)) => {
                *a = v;
                *b = v;
            }
            (None, None) => {}
            (a, b) => panic!("get_mut disagrees: {a:?} vs {b:?}"),
        },
        Op::GetOrInsert(k, v) => {
            let mut a = m.get_or_insert_with(K::make(k), || v)?;
            *a = a.wrapping_add(1);
            let b = model.entry(K::make(k)).or_insert(v);
            *b = b.wrapping_add(1);
            assert_eq!(*a, *b);
        }
        Op::EntryRemove(k) => match m.entry(K::make(k)) {
            Entry::Occupied(e) => {
                assert_eq!(*e.key(), K::make(k));
                assert_eq!(Some(*e.get()), model.get(&K::make(k)).copied());
                assert_eq!(e.remove_entry()?, (K::make(k), model.remove(&K::make(k)).unwrap()));
            }
            Entry::Vacant(e) => {
                assert_eq!(e.into_key(), K::make(k));
                assert!(!model.contains_key(&K::make(k)));
            }
        },
        Op::AndModify(k, v) => {
            let a = *m.entry(K::make(k)).and_modify(|x| *x ^= v)?.or_insert(v)?;
            let b = *model.entry(K::make(k)).and_modify(|x| *x ^= v).or_insert(v);
            assert_eq!(a, b);
        }
        Op::Clear => {
            model.clear();
            m.clear()?;
        }
        Op::Reserve(n) => {
            let cap = m.capacity();
            m.reserve(n)?;
            assert!(m.capacity() >= model.len() + n);
            let after = m.capacity();
            // Reserved room takes the inserts without growing.
            assert!(after >= cap);
        }
        Op::Extend(n) => {
            let items: Vec<(K, u64)> =
                (0..u64::from(n % 24)).map(|i| (K::make(i * 5 % 64), i + u64::from(n))).collect();
            model.extend(items.iter().copied());
            m.extend(items)?;
        }
    }
    for k in 0..48 {
        assert_eq!(m.get(&K::make(k)), model.get(&K::make(k)));
        assert_eq!(m.contains_key(&K::make(k)), model.contains_key(&K::make(k)));
    }
    assert_eq!(contents(m), *model);
    Ok(())
}

fn config() -> Config {
    Config { heap_len: 1 << 20, log_len: 512 << 10, ..Config::default() }
}

/// Tests of this file run one at a time: a closed heap's recorded base is
/// free until it reopens, and another test's new heap may pick it then.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn open(disk: &SimDisk) -> PHeap {
    PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("db"), config()).unwrap()
}

fn read<K: TestKey>(heap: &PHeap) -> Option<(Model<K>, usize)> {
    heap.read(|r| r.root::<PHashMap<K, u64>>("m").unwrap().map(|m| (contents(m), m.capacity())))
}

struct Map<K>(std::marker::PhantomData<K>);

impl<K: TestKey> Subject for Map<K> {
    type Root = PHashMap<K, u64>;
    type Model = Model<K>;
    type Op = Op;
    fn empty() -> PHashMap<K, u64> {
        PHashMap::new()
    }
    fn apply(op: &Op, model: &mut Model<K>, root: &mut RootMut<'_, '_, PHashMap<K, u64>>) -> Result<(), Error> {
        apply(op, model, root)
    }
    fn read(root: &PHashMap<K, u64>) -> Model<K> {
        contents(root)
    }
}

fn run<K: TestKey>(steps: &[Step<Op>]) {
    common::run::<Map<K>>(steps, &config());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(32), ..ProptestConfig::default() })]

    #[test]
    fn phashmap_matches_hashmap_across_commits_aborts_and_crashes(steps in common::steps(op(), 16, 1..40)) {
        run::<u64>(&steps);
    }

    #[test]
    fn phashmap_with_a_struct_key_matches_hashmap(steps in common::steps(op(), 16, 1..30)) {
        run::<Account>(&steps);
    }
}

#[test]
fn growth_across_doublings_inside_an_aborted_transaction_gives_everything_back() {
    let _serial = serial();
    let disk = SimDisk::new();
    let heap = open(&disk);
    heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?.extend((0..5).map(|i| (i, i)))).unwrap();
    let before = (heap.stats(), read::<u64>(&heap).unwrap());
    // The root, the table and the typed layer's shape table.
    assert_eq!(before.0.live_blocks, 3);
    // Err: 8 slots -> 16 -> ... -> 2048, every old table freed in the
    // transaction, the new ones allocated in it.
    let r = heap.write(|tx| {
        let mut m = tx.root_mut::<PHashMap<u64, u64>>("m")?.unwrap();
        for i in 0..1500 {
            m.insert(i * 7919, i)?;
        }
        assert!(m.capacity() >= 1500);
        Err::<(), _>(Error::Config("refused".into()))
    });
    assert!(r.is_err());
    let after = (heap.stats(), read::<u64>(&heap).unwrap());
    assert_eq!((after.0.live_blocks, after.0.free_bytes, &after.1), (3, before.0.free_bytes, &before.1));
    // Panic: the same.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        heap.write(|tx| {
            let mut m = tx.root_mut::<PHashMap<u64, u64>>("m")?.unwrap();
            m.reserve(3000)?;
            m.extend((0..600).map(|i| (i, i)))?;
            panic!("abort by panic");
            #[allow(unreachable_code)]
            Ok::<_, Error>(())
        })
    }));
    assert!(r.is_err());
    let after = (heap.stats(), read::<u64>(&heap).unwrap());
    assert_eq!((after.0.live_blocks, after.0.free_bytes, &after.1), (3, before.0.free_bytes, &before.1));
    heap.check().unwrap();
    // And growth that commits keeps one table.
    heap.write(|tx| tx.root_mut::<PHashMap<u64, u64>>("m")?.unwrap().extend((0..1000).map(|i| (i, i)))).unwrap();
    assert_eq!(heap.stats().live_blocks, 3);
    heap.check().unwrap();
}

#[test]
fn the_hash_is_a_fixed_function() {
    // These constants are part of the heap format: a change here means
    // maps written before cannot be read (and FORMAT_VERSION must change).
    assert_eq!(stable_hash_bytes(&[]), 0x7acd_bb98_b134_4213);
    assert_eq!(stable_hash(&0u64), 0x5a13_977c_3153_3873);
    assert_eq!(stable_hash(&42u64), 0xe16f_6d21_669b_2c24);
    assert_eq!(stable_hash(b"hello"), 0x150b_2024_17c5_89b3);
    assert_eq!(stable_hash(&Account::make(12345)), 0xa590_57e3_aab9_76f3);
    assert_eq!(stable_hash_bytes(&0u64.to_ne_bytes()), stable_hash(&0u64));
    // So is the layout fingerprint a map's root records.
    // Format 2 (one slot per entry: control byte, key, value).
    assert_eq!(<PHashMap<u64, u64>>::FINGERPRINT, 0x1090_4c62_99e3_d970);
    assert_ne!(<PHashMap<u64, u64>>::FINGERPRINT, <PHashMap<u64, i64>>::FINGERPRINT);
    assert_ne!(<PHashMap<u64, u64>>::FINGERPRINT, <PHashMap<i64, u64>>::FINGERPRINT);
    assert_ne!(<PHashMap<u64, u64>>::FINGERPRINT, <rvm_collections::PVec<u64>>::FINGERPRINT);
}

#[test]
fn keys_are_compared_by_their_bytes() {
    let _serial = serial();
    let disk = SimDisk::new();
    let heap = open(&disk);
    heap.write(|tx| {
        let mut m = tx.root_or_insert_with("f", PHashMap::<f64, u8>::new)?;
        m.insert(0.0, 1)?;
        m.insert(-0.0, 2)?;
        m.insert(f64::NAN, 3)?;
        assert_eq!((m.len(), m.get(&0.0), m.get(&-0.0), m.get(&f64::NAN)), (3, Some(&1), Some(&2), Some(&3)));
        // Zero-sized keys and values: one key, a set.
        let mut s = tx.root_or_insert_with("z", PHashMap::<[u8; 0], [u8; 0]>::new)?;
        assert_eq!(s.insert([], [])?, None);
        assert_eq!(s.insert([], [])?, Some([]));
        assert_eq!(s.len(), 1);
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.close().unwrap();
    let heap = open(&disk);
    heap.read(|r| {
        let m = r.root::<PHashMap<f64, u8>>("f").unwrap().unwrap();
        assert_eq!(m.get(&-0.0), Some(&2));
        assert!(matches!(r.root::<PHashMap<u64, u8>>("f"), Err(Error::RootType { .. })));
    });
}

/// Known bug of the typed layer (PVec too): a root's `check` asks
/// `Heap::live_block_len` once knew committed blocks only, so a
/// collection whose block was allocated earlier in the same transaction
/// is refused as `Error::Damaged` when its root is borrowed again.
#[test]
fn a_map_reborrowed_after_growth_in_the_same_transaction() {
    let _serial = serial();
    let disk = SimDisk::new();
    let heap = open(&disk);
    heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u64, u64>::new).map(|_| ())).unwrap();
    heap.write(|tx| {
        tx.root_mut::<PHashMap<u64, u64>>("m")?.unwrap().extend((0..100).map(|i| (i, i)))?;
        // The table is a block allocated by this transaction.
        let m = tx.root::<PHashMap<u64, u64>>("m")?.unwrap();
        assert_eq!(m.get(&99), Some(&99));
        Ok::<_, Error>(())
    })
    .unwrap();
}

#[test]
fn churn_reuses_tombstones_without_growing_without_bound() {
    let _serial = serial();
    let disk = SimDisk::new();
    let heap = open(&disk);
    let mut model = Model::<u64>::new();
    heap.write(|tx| {
        let mut m = tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?;
        for round in 0..200u64 {
            for i in 0..40 {
                let k = round * 40 + i;
                assert_eq!(m.insert(k, round)?, model.insert(k, round));
            }
            for i in 0..40 {
                let k = round * 40 + i;
                if i % 8 != 0 || round % 3 == 0 {
                    assert_eq!(m.remove(&k)?, model.remove(&k));
                }
            }
        }
        assert_eq!(contents(&m), model);
        // 200 rounds of 40 inserts with ~5 surviving each: the table is
        // rebuilt when tombstones pile up, at the size the entries need.
        assert!(m.capacity() < 4 * model.len(), "{} slots for {} entries", m.capacity(), model.len());
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.close().unwrap();
    let heap = open(&disk);
    assert_eq!(read::<u64>(&heap).unwrap().0, model);
    // The root, the table and the typed layer's shape table.
    assert_eq!(heap.stats().live_blocks, 3);
}

/// Control bytes damaged behind the typed layer's back (by the raw API)
/// give wrong answers or `Error::Damaged`, never an access outside the
/// table, a panic or an endless probe.
#[test]
fn damaged_control_bytes_stay_inside_the_table() {
    use rvm_core::{CommitMode, RestoreMode};
    let _serial = serial();
    let disk = SimDisk::new();
    let heap = open(&disk);
    heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?.extend((0..20).map(|i| (i, i)))).unwrap();
    // SAFETY: inspection only; no typed transaction runs meanwhile.
    let root = unsafe { heap.raw_heap() }.root("m").unwrap();
    // SAFETY: the root's block holds a `PHashMap` header, whose first word
    // is the table's address; no transaction is running.
    let (table, slots) = unsafe {
        let words = root.ptr.as_ptr().cast::<u64>();
        (words.read() as usize, words.add(2).read() as usize)
    };
    assert_eq!(slots, 32);
    for fill in [|i: usize| (i * 37 % 256) as u8, |_| 0x05, |_| 0x80, |i| if i % 2 == 0 { 0x7f } else { 0x81 }] {
        let garbage: Vec<u8> = (0..slots).map(fill).collect();
        // SAFETY: no typed transaction runs while this one does; the bytes
        // it writes are damage to integers and control bytes, which the
        // map must survive.
        let mut htx = unsafe { heap.raw_heap() }.begin(RestoreMode::Restore).unwrap();
        // SAFETY: the map's control bytes, in its live table block; no
        // reference into them exists (no typed transaction is running).
        unsafe { htx.write(std::ptr::NonNull::new(table as *mut u8).unwrap(), &garbage).unwrap() };
        htx.commit(CommitMode::Flush).unwrap();
        heap.read(|r| {
            let m = r.root::<PHashMap<u64, u64>>("m").unwrap().unwrap();
            let n = m.iter().count();
            assert!(n <= slots);
            for k in 0..100 {
                let _ = m.get(&k);
            }
        });
        let _ = heap.write(|tx| {
            let mut m = tx.root_mut::<PHashMap<u64, u64>>("m")?.unwrap();
            for k in 0..100 {
                let _ = m.remove(&k);
                let _ = m.insert(k, k);
                let _ = m.get_mut(&k);
            }
            Err::<(), _>(Error::Config("undo".into()))
        });
    }
}
