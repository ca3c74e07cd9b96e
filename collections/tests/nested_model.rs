//! Values that own blocks, nested: a derived struct holding a B-tree map
//! of structs with strings and vectors, a vector of vectors, a hash map of
//! strings and a linked list of boxes, against a model of `std` types.
//! Random operations (moving owned values between places, dropping them,
//! forgetting them) in transactions that commit (flush or not), abort (by
//! `Err` and by panic), and crashes of the simulated disk at random
//! points. After every reopen the value equals the model at a committed
//! prefix that includes every flushed transaction, the heap check passes
//! and every live block is reached from a root: nothing leaks, nothing is
//! freed twice or shared.

mod common;

use common::{End, Step, Subject};
use proptest::prelude::*;
use rvm_collections::{Config, Error, Mut, Owned, PBTreeMap, PBox, PHashMap, PHeap, PString, PVec, Persist, RootMut};
use rvm_core::testing::CrashMode;
use std::collections::{BTreeMap, HashMap};

#[derive(Persist)]
#[repr(C)]
struct Book {
    year: u64,
    title: PString,
    tags: PVec<u32>,
}

#[derive(Persist)]
#[repr(C)]
struct Link {
    value: u64,
    next: Option<PBox<Link>>,
}

#[derive(Persist)]
#[repr(C)]
struct Library {
    books: PBTreeMap<u64, Book>,
    shelves: PVec<PVec<u64>>,
    index: PHashMap<u32, PString>,
    chain: Option<PBox<Link>>,
    count: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    books: BTreeMap<u64, (u64, String, Vec<u32>)>,
    shelves: Vec<Vec<u64>>,
    index: HashMap<u32, String>,
    /// Front first.
    chain: Vec<u64>,
    count: u64,
}

#[derive(Clone, Debug)]
enum Op {
    AddBook(u8, u64, u8),
    Tag(u8, u32),
    RemoveBook(u8),
    /// Moves the first book to key + 100 (an owned value moved, not freed).
    MoveFirstBook,
    ClearBooks,
    NewShelf,
    Shelve(u8, u64),
    DropShelf(u8),
    SwapShelves(u8, u8),
    TruncateShelves(u8),
    IndexPut(u8, u8),
    IndexAppend(u8, u8),
    IndexRemove(u8),
    IndexClear,
    PushLink(u64),
    PopLink,
    /// A string made and forgotten: freed at commit.
    Forget(u8),
    /// A string made and dropped: freed at once.
    Drop(u8),
    Count(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..24, any::<u64>(), 0u8..40).prop_map(|(k, y, t)| Op::AddBook(k, y, t)),
        3 => (0u8..24, any::<u32>()).prop_map(|(k, t)| Op::Tag(k, t)),
        2 => (0u8..24).prop_map(Op::RemoveBook),
        1 => Just(Op::MoveFirstBook),
        1 => Just(Op::ClearBooks),
        2 => Just(Op::NewShelf),
        4 => (any::<u8>(), any::<u64>()).prop_map(|(i, x)| Op::Shelve(i, x)),
        1 => any::<u8>().prop_map(Op::DropShelf),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::SwapShelves(a, b)),
        1 => (0u8..8).prop_map(Op::TruncateShelves),
        3 => (0u8..16, 0u8..30).prop_map(|(k, n)| Op::IndexPut(k, n)),
        2 => (0u8..16, 0u8..30).prop_map(|(k, n)| Op::IndexAppend(k, n)),
        1 => (0u8..16).prop_map(Op::IndexRemove),
        1 => Just(Op::IndexClear),
        3 => any::<u64>().prop_map(Op::PushLink),
        2 => Just(Op::PopLink),
        1 => (0u8..30).prop_map(Op::Forget),
        1 => (0u8..30).prop_map(Op::Drop),
        1 => any::<u64>().prop_map(Op::Count),
    ]
}

/// A string of `n` characters (some of them two bytes long) made from `seed`.
fn text(seed: u64, n: u8) -> String {
    (0..u64::from(n))
        .map(|i| if (seed + i).is_multiple_of(7) { 'é' } else { (b'a' + ((seed + i) % 26) as u8) as char })
        .collect()
}

fn apply(op: &Op, model: &mut Model, lib: &mut Mut<'_, '_, Library>) -> Result<(), Error> {
    let tx = lib.tx();
    match *op {
        Op::AddBook(k, year, t) => {
            let k = u64::from(k);
            let title = text(year, t);
            let old =
                lib.field_mut(|l| &l.books).insert_owned(k, Book { year, title: PString::new(), tags: PVec::new() })?;
            drop(old);
            let mut books = lib.field_mut(|l| &l.books);
            let mut b = books.get_mut(&k)?.expect("just inserted");
            b.field_mut(|b| &b.title).push_str(&title)?;
            model.books.insert(k, (year, title, Vec::new()));
        }
        Op::Tag(k, t) => {
            let k = u64::from(k);
            let mut books = lib.field_mut(|l| &l.books);
            let found = books.get_mut(&k)?;
            match (found, model.books.get_mut(&k)) {
                (Some(mut b), Some(m)) => {
                    b.field_mut(|b| &b.tags).push(t)?;
                    m.2.push(t);
                }
                (None, None) => {}
                _ => panic!("books disagree on key {k}"),
            };
        }
        Op::RemoveBook(k) => {
            let k = u64::from(k);
            let got = lib.field_mut(|l| &l.books).remove_owned(&k)?;
            let want = model.books.remove(&k);
            assert_eq!(got.map(|b| b.title.to_string()), want.map(|w| w.1));
        }
        Op::MoveFirstBook => {
            let mut books = lib.field_mut(|l| &l.books);
            if let Some((k, book)) = books.pop_first_owned()? {
                let old = books.insert_owned(k + 100, book)?;
                drop(old);
                let (k0, v) = model.books.pop_first().expect("model has a first book");
                assert_eq!(k0, k);
                model.books.insert(k + 100, v);
            } else {
                assert!(model.books.is_empty());
            }
        }
        Op::ClearBooks => {
            lib.field_mut(|l| &l.books).clear()?;
            model.books.clear();
        }
        Op::NewShelf => {
            lib.field_mut(|l| &l.shelves).push(PVec::new())?;
            model.shelves.push(Vec::new());
        }
        Op::Shelve(i, x) => {
            if !model.shelves.is_empty() {
                let i = usize::from(i) % model.shelves.len();
                lib.field_mut(|l| &l.shelves).get_mut(i)?.expect("in range").push(x)?;
                model.shelves[i].push(x);
            }
        }
        Op::DropShelf(i) => {
            if !model.shelves.is_empty() {
                let i = usize::from(i) % model.shelves.len();
                let gone: Owned<'_, PVec<u64>> = lib.field_mut(|l| &l.shelves).remove_owned(i)?;
                assert_eq!(gone.as_slice(), &model.shelves.remove(i)[..]);
            }
        }
        Op::SwapShelves(a, b) => {
            if !model.shelves.is_empty() {
                let (a, b) = (usize::from(a) % model.shelves.len(), usize::from(b) % model.shelves.len());
                lib.field_mut(|l| &l.shelves).swap(a, b)?;
                model.shelves.swap(a, b);
            }
        }
        Op::TruncateShelves(n) => {
            lib.field_mut(|l| &l.shelves).truncate(usize::from(n))?;
            model.shelves.truncate(usize::from(n));
        }
        Op::IndexPut(k, n) => {
            let s = text(u64::from(k) * 31 + u64::from(n), n);
            let new = tx.new_string(&s)?;
            let old = lib.field_mut(|l| &l.index).insert_owned(u32::from(k), new)?;
            assert_eq!(old.map(|o| o.to_string()), model.index.insert(u32::from(k), s));
        }
        Op::IndexAppend(k, n) => {
            let s = text(u64::from(n), n);
            lib.field_mut(|l| &l.index).get_or_insert_with(u32::from(k), PString::new)?.push_str(&s)?;
            model.index.entry(u32::from(k)).or_default().push_str(&s);
        }
        Op::IndexRemove(k) => {
            let got = lib.field_mut(|l| &l.index).remove_owned(&u32::from(k))?;
            assert_eq!(got.map(|o| o.to_string()), model.index.remove(&u32::from(k)));
        }
        Op::IndexClear => {
            lib.field_mut(|l| &l.index).clear()?;
            model.index.clear();
        }
        Op::PushLink(v) => {
            let mut head = lib.field_mut(|l| &l.chain);
            let rest = head.take()?;
            let node = tx.new_box(Link { value: v, next: None })?;
            assert!(head.replace(node)?.is_none());
            head.as_mut().expect("just set").field_mut(|n| &n.next).replace_with(rest)?;
            model.chain.insert(0, v);
        }
        Op::PopLink => {
            let mut head = lib.field_mut(|l| &l.chain);
            let next = match head.as_mut() {
                Some(mut first) => first.field_mut(|n| &n.next).take()?,
                None => None,
            };
            let first = head.replace_with(next)?;
            assert_eq!(first.map(|f| f.value), (!model.chain.is_empty()).then(|| model.chain.remove(0)));
        }
        Op::Forget(n) => std::mem::forget(tx.new_string(&text(u64::from(n), n))?),
        Op::Drop(n) => drop(tx.new_string(&text(u64::from(n), n))?),
        Op::Count(x) => {
            *lib.field_mut(|l| &l.count) = x;
            model.count = x;
        }
    }
    assert_eq!(read(lib), *model);
    Ok(())
}

fn read(lib: &Library) -> Model {
    let mut chain = Vec::new();
    let mut at = lib.chain.as_deref();
    while let Some(link) = at {
        chain.push(link.value);
        at = link.next.as_deref();
    }
    Model {
        books: lib.books.iter().map(|(k, b)| (*k, (b.year, b.title.to_string(), b.tags.to_vec()))).collect(),
        shelves: lib.shelves.iter().map(|s| s.to_vec()).collect(),
        index: lib.index.iter().map(|(k, s)| (*k, s.to_string())).collect(),
        chain,
        count: lib.count,
    }
}

struct Nested;

impl Subject for Nested {
    type Root = Library;
    type Model = Model;
    type Op = Op;
    fn empty() -> Library {
        Library { books: PBTreeMap::new(), shelves: PVec::new(), index: PHashMap::new(), chain: None, count: 0 }
    }
    fn apply(op: &Op, model: &mut Model, root: &mut RootMut<'_, '_, Library>) -> Result<(), Error> {
        apply(op, model, root)
    }
    fn read(root: &Library) -> Model {
        read(root)
    }
}

fn run(steps: &[Step<Op>]) {
    common::run::<Nested>(steps, &Config { heap_len: 2 << 20, log_len: 1 << 20, ..Config::default() });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(24), ..ProptestConfig::default() })]

    #[test]
    fn nested_values_match_their_model_across_commits_aborts_and_crashes(steps in common::steps(op(), 12, 1..30)) {
        run(&steps);
    }
}

#[test]
fn owned_values_moved_dropped_and_forgotten_in_aborted_and_committed_transactions() {
    use Op::*;
    run(&[
        Step::Tx(vec![AddBook(1, 1999, 12), Tag(1, 7), NewShelf, Shelve(0, 5), PushLink(1), PushLink(2)], End::Flush),
        Step::Tx(vec![MoveFirstBook, Forget(9), Drop(3), IndexPut(1, 20), PopLink], End::Err),
        Step::Tx(vec![MoveFirstBook, DropShelf(0), IndexPut(2, 5), IndexAppend(2, 4)], End::Panic),
        Step::Tx(vec![MoveFirstBook, Forget(9), IndexPut(1, 20), IndexPut(1, 3), PopLink], End::NoFlush),
        Step::Crash(CrashMode::LoseUnsynced),
        Step::Tx(vec![AddBook(2, 5, 3), RemoveBook(1), ClearBooks, IndexClear, TruncateShelves(0)], End::Flush),
        Step::Reopen,
    ]);
}

fn small() -> Config {
    Config { heap_len: 8 << 20, log_len: 8 << 20, ..Config::default() }
}

/// A list a hundred thousand boxes long is checked, read and freed
/// without recursion (no stack overflow), and nothing leaks.
#[test]
fn a_long_linked_list_is_traced_and_freed_iteratively() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), Config { heap_len: 32 << 20, log_len: 64 << 20, ..Config::default() })
        .unwrap();
    let n = 100_000u64;
    heap.write(|tx| {
        let mut head = tx.root_or_insert_with("list", || None::<PBox<Link>>)?;
        for value in 0..n {
            let rest = head.take()?;
            let node = tx.new_box(Link { value, next: None })?;
            head.replace(node)?;
            head.as_mut().expect("just set").field_mut(|l| &l.next).replace_with(rest)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.close().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let sum = heap.read(|r| {
        let mut at = r.root::<Option<PBox<Link>>>("list")?.unwrap().as_deref();
        let mut sum = 0;
        while let Some(l) = at {
            sum += l.value;
            at = l.next.as_deref();
        }
        Ok::<_, Error>(sum)
    });
    assert_eq!(sum.unwrap(), n * (n - 1) / 2);
    let report = heap.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.reachability);
    assert_eq!(report.reachability.reachable_blocks, n + 2);
    heap.write(|tx| tx.remove_root::<Option<PBox<Link>>>("list")).unwrap();
    assert_eq!(heap.stats().live_blocks, 1, "only the shape table is left");
}

/// An owned value of one heap cannot be stored in another (its blocks are
/// the first heap's); it is refused and freed in its own transaction.
#[test]
fn an_owned_value_of_another_heap_is_refused() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ha = PHeap::open_or_create(a.path(), small()).unwrap();
    let hb = PHeap::open_or_create(b.path(), small()).unwrap();
    let r = ha.write(|txa| {
        let s = txa.new_string("from a")?;
        hb.write(|txb| {
            let mut v = txb.root_or_insert_with("v", PVec::<PString>::new)?;
            v.push(s)
        })
    });
    assert!(matches!(r, Err(Error::ForeignValue)), "{r:?}");
    assert!(ha.check().unwrap().is_clean());
    assert!(hb.check().unwrap().is_clean());
}

#[test]
fn root_names_starting_with_rvm_are_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let r = heap.write(|tx| tx.root_or_insert_with("rvm:shapes", || 1u64).map(|_| ()));
    assert!(matches!(r, Err(Error::ReservedName { .. })), "{r:?}");
    assert!(matches!(heap.read(|r| r.root::<u64>("rvm:x").map(|_| ())), Err(Error::ReservedName { .. })));
}

#[test]
#[should_panic(expected = "must return a part of the value itself")]
fn field_mut_refuses_a_reference_outside_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    static OUTSIDE: u64 = 0;
    let _ = heap.write(|tx| {
        let mut v = tx.root_or_insert_with("n", || 1u64)?;
        let _ = v.field_mut(|_| &OUTSIDE);
        Ok::<_, Error>(())
    });
}

/// Blocks the raw API allocates and links from nowhere are found by the
/// check, and a root the raw API made (no stored shape) makes the walk
/// incomplete rather than calling its blocks leaks.
#[test]
fn the_check_finds_blocks_no_root_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.extend(0..10)).unwrap();
    assert!(heap.check().unwrap().is_clean());
    // SAFETY: no typed transaction runs meanwhile.
    let raw = unsafe { heap.raw_heap() };
    let mut htx = raw.begin(rvm_core::RestoreMode::Restore).unwrap();
    let lost = htx.malloc(std::alloc::Layout::from_size_align(100, 8).unwrap()).unwrap();
    htx.commit(rvm_core::CommitMode::Flush).unwrap();
    let report = heap.check().unwrap();
    assert!(!report.is_clean());
    assert!(report.reachability.complete());
    assert_eq!(report.reachability.unreachable.len(), 1);
    assert_eq!(report.reachability.unreachable[0].0, lost.as_ptr() as usize);
    // An untyped root: the walk cannot see into it.
    raw.root_or_create("raw", 8, 8, 42, |b| b.fill(0)).unwrap();
    let report = heap.check().unwrap();
    assert_eq!(report.reachability.untyped_roots, ["raw"]);
    assert!(!report.reachability.complete());
}

/// A box whose pointer leads to a freed block, or back to its own root,
/// is refused when the root is borrowed: never followed.
#[test]
fn a_damaged_box_is_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let mut b = tx.root_or_insert_with("b", || None::<PBox<u64>>)?;
        b.replace(tx.new_box(5u64)?)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    // SAFETY: no typed transaction runs meanwhile.
    let raw = unsafe { heap.raw_heap() };
    let root = raw.root("b").unwrap();
    for bad in [root.ptr.as_ptr() as u64, root.ptr.as_ptr() as u64 + 4096, 8] {
        let mut htx = raw.begin(rvm_core::RestoreMode::Restore).unwrap();
        // SAFETY: the root block is live; no reference to it.
        unsafe { htx.write(root.ptr, &bad.to_ne_bytes()).unwrap() };
        htx.commit(rvm_core::CommitMode::Flush).unwrap();
        let r = heap.read(|r| r.root::<Option<PBox<u64>>>("b").map(|_| ()));
        assert!(matches!(r, Err(Error::Damaged { .. })), "{bad:#x}: {r:?}");
        let report = heap.check().unwrap();
        assert_eq!(report.reachability.damaged_roots.len(), 1);
    }
}

/// A damaged shape table is an error of the check (not a silent pass),
/// and the next root of a new type replaces it.
#[test]
fn a_damaged_shape_table_is_reported_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("s", PString::new)?.push_str("x")).unwrap();
    // SAFETY: no typed transaction runs meanwhile.
    let raw = unsafe { heap.raw_heap() };
    let table = raw.root(rvm_collections::shape::SHAPES_ROOT).unwrap();
    let mut htx = raw.begin(rvm_core::RestoreMode::Restore).unwrap();
    // SAFETY: the table's block is live; no reference to it.
    unsafe { htx.write(table.ptr, b"garbage!").unwrap() };
    htx.commit(rvm_core::CommitMode::Flush).unwrap();
    assert!(matches!(heap.check(), Err(Error::Damaged { .. })));
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u32>::new).map(|_| ())).unwrap();
    let report = heap.check().unwrap();
    // The replaced table knows the new root's type; the string's type is
    // learnt again when the string is next borrowed to change.
    assert_eq!(report.reachability.untyped_roots, ["s"]);
    heap.write(|tx| tx.root_mut::<PString>("s").map(|_| ())).unwrap();
    assert!(heap.check().unwrap().is_clean());
}
