//! A hostile caller of the typed layer's safe API: key orders that lie,
//! panic or call back into the heap. Each ends in a typed error, a
//! documented panic with the write rolled back, or wrong answers from a
//! consistent heap; never undefined behaviour, a hang or a damaged heap.

use rvm_collections::btree_map::PKey;
use rvm_collections::{Config, PBTreeMap, PHeap, Persist};
use std::cell::Cell;
use std::cmp::Ordering;

fn small() -> Config {
    Config { heap_len: 4 << 20, log_len: 4 << 20, ..Config::default() }
}

/// What the key order does on the current thread.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Honest,
    /// A pseudo-random answer each call.
    Liar,
    /// Panics at the given call.
    PanicAt(u64),
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Honest) };
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Key(u64);

impl PKey for Key {
    fn cmp_key(&self, other: &Self) -> Ordering {
        let n = CALLS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        match MODE.with(Cell::get) {
            Mode::Honest => self.0.cmp(&other.0),
            Mode::Liar => {
                let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.0;
                x ^= x >> 29;
                [Ordering::Less, Ordering::Equal, Ordering::Greater][(x % 3) as usize]
            }
            Mode::PanicAt(at) => {
                assert!(n != at, "a key order that panics");
                self.0.cmp(&other.0)
            }
        }
    }
}

type Map = PBTreeMap<Key, u64>;

fn clean(heap: &PHeap) {
    let report = heap.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

fn honest_len_and_sum(heap: &PHeap) -> (usize, usize, u64) {
    MODE.with(|m| m.set(Mode::Honest));
    heap.read(|r| {
        let m = r.root::<Map>("m").unwrap().unwrap();
        (m.len(), m.iter().count(), m.values().sum())
    })
}

/// A key order that answers at random: inserts, lookups, removals and
/// ranges give wrong answers, but the map stays a well-formed tree whose
/// length matches its entries, the heap checks clean, and it reopens.
#[test]
fn a_lying_key_order_gives_wrong_answers_from_a_consistent_map() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    MODE.with(|m| m.set(Mode::Liar));
    for round in 0..4u64 {
        heap.write(|tx| -> Result<(), rvm_collections::Error> {
            let mut m = tx.root_or_insert_with("m", Map::new)?;
            for i in 0..600 {
                m.insert(Key(i % 700 + round), i)?;
            }
            for i in 0..200 {
                m.remove(&Key(i * 3))?;
            }
            m.pop_first()?;
            m.pop_last()?;
            let _ = m.get(&Key(5));
            let _ = m.range(Key(10)..Key(20)).count();
            Ok(())
        })
        .unwrap();
    }
    let (len, count, _) = honest_len_and_sum(&heap);
    assert_eq!(len, count, "the map's length matches its entries");
    clean(&heap);
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(honest_len_and_sum(&heap).0, len);
    clean(&heap);
}

/// A key order that panics in the middle of inserts (node splits under
/// way) aborts the write: the map is as the last commit left it.
#[test]
fn a_key_order_that_panics_mid_insert_rolls_the_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    MODE.with(|m| m.set(Mode::Honest));
    heap.write(|tx| -> Result<(), rvm_collections::Error> {
        let mut m = tx.root_or_insert_with("m", Map::new)?;
        for i in 0..500 {
            m.insert(Key(i * 2), i)?;
        }
        Ok(())
    })
    .unwrap();
    let before = honest_len_and_sum(&heap);
    for at in [1u64, 7, 100, 1000, 3000, 5000] {
        CALLS.with(|c| c.set(0));
        MODE.with(|m| m.set(Mode::PanicAt(at)));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            heap.write(|tx| -> Result<(), rvm_collections::Error> {
                let mut m = tx.root_mut::<Map>("m")?.unwrap();
                for i in 0..1000 {
                    m.insert(Key(i * 2 + 1), i)?;
                    if i % 3 == 0 {
                        m.remove(&Key(i * 2))?;
                    }
                }
                Ok(())
            })
        }));
        assert!(r.is_err(), "call {at}: the order panicked");
        assert_eq!(honest_len_and_sum(&heap), before, "call {at}: rolled back");
        clean(&heap);
    }
}

/// A key order that calls back into the same heap from inside a write:
/// a nested write is refused (the order cannot report it, so it goes on),
/// a nested read panics as documented and the write rolls back.
#[test]
fn a_key_order_calling_back_into_the_heap_is_refused_or_rolled_back() {
    use std::sync::OnceLock;
    static HEAP: OnceLock<PHeap> = OnceLock::new();
    thread_local! {
        static CALLBACK: Cell<u8> = const { Cell::new(0) };
    }
    #[derive(Persist, Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    struct Nosy(u64);
    impl PKey for Nosy {
        fn cmp_key(&self, other: &Self) -> Ordering {
            let heap = HEAP.get().unwrap();
            match CALLBACK.with(Cell::get) {
                1 => {
                    let r = heap.write(|_| Ok::<_, rvm_collections::Error>(()));
                    assert!(matches!(r, Err(rvm_collections::Error::NestedTransaction)), "{r:?}");
                    assert!(matches!(heap.check(), Err(rvm_collections::Error::NestedTransaction)));
                }
                2 => {
                    heap.read(|_| ());
                }
                _ => {}
            }
            self.0.cmp(&other.0)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let heap = HEAP.get_or_init(|| PHeap::open_or_create(dir.path(), small()).unwrap());
    let fill = |n: u64| {
        heap.write(|tx| -> Result<(), rvm_collections::Error> {
            let mut m = tx.root_or_insert_with("n", PBTreeMap::<Nosy, u64>::new)?;
            for i in 0..n {
                m.insert(Nosy(i), i)?;
            }
            Ok(())
        })
    };
    fill(50).unwrap();
    CALLBACK.with(|c| c.set(1));
    fill(100).unwrap();
    CALLBACK.with(|c| c.set(2));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fill(200)));
    assert!(r.is_err(), "a read inside the write panics");
    CALLBACK.with(|c| c.set(0));
    let len = heap.read(|r| r.root::<PBTreeMap<Nosy, u64>>("n").unwrap().unwrap().len());
    assert_eq!(len, 100, "the panicking write rolled back");
    clean(heap);
    fill(300).unwrap();
}

/// The heap's own instance driven from inside a write of the heap (the
/// thread holds the write's transaction): flush, checkpoint and truncate
/// return instead of waiting for it, and the write commits whole.
#[test]
fn instance_calls_from_inside_a_write_return_and_the_write_commits() {
    use rvm_collections::PVec;
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let r = heap.write(|w| -> Result<Vec<String>, rvm_collections::Error> {
                let mut v = w.root_or_insert_with("v", PVec::<u64>::new)?;
                v.extend(0..100)?;
                let rvm = heap.rvm();
                Ok(vec![
                    format!("flush {:?}", heap.flush()),
                    format!("checkpoint {:?}", rvm.checkpoint().map(drop)),
                    format!("truncate {:?}", rvm.truncate()),
                    format!("check {:?}", heap.check().map(drop)),
                ])
            });
            let _ = tx.send(r);
        });
        let said = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a deadlock").unwrap();
        assert!(said[0].ends_with("Ok(())") && said[1].ends_with("Ok(())") && said[2].ends_with("Ok(())"), "{said:?}");
        assert!(said[3].contains("NestedTransaction"), "{said:?}");
    });
    let n = heap.read(|r| r.root::<PVec<u64>>("v").unwrap().unwrap().len());
    assert_eq!(n, 100);
    clean(&heap);
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(heap.read(|r| r.root::<PVec<u64>>("v").unwrap().unwrap().len()), 100);
}
