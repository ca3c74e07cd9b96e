//! A new user's pass over the typed layer: every documented error made to
//! happen, panics in closures, limits (a full heap, a full log, huge and
//! empty values, many keys), handles misused, files damaged or left
//! unfinished by a crash, and `kill -9` of a child process in the middle
//! of typed writes. Each case ends in the documented answer: a typed
//! error, an abort with the heap usable and every earlier commit there,
//! never a panic, a hang or less data with `Ok`.

use rvm_collections::{Config, Error, PBTreeMap, PBox, PHashMap, PHeap, PString, PVec, Persist};
use rvm_core::testing::{CrashMode, SimDisk};
use std::path::Path;
use std::sync::Arc;

fn small() -> Config {
    Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() }
}

/// A heap that cannot grow past 1 MiB.
fn fixed() -> Config {
    Config { heap_len: 1 << 20, max_heap_len: 1 << 20, log_len: 4 << 20, ..Config::default() }
}

fn values(heap: &PHeap, name: &str) -> Vec<u64> {
    heap.read(|r| r.root::<PVec<u64>>(name).unwrap().map_or(Vec::new(), |v| v.to_vec()))
}

fn clean(heap: &PHeap) {
    let report = heap.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// Every file of `dir`, by name, with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

fn is_oom(e: &Error) -> bool {
    matches!(
        e,
        Error::Heap(
            rvm_heap::HeapError::OutOfMemory { .. }
                | rvm_heap::HeapError::GrowthLimit { .. }
                | rvm_heap::HeapError::BadLayout { .. }
        )
    )
}

/// A heap that cannot grow: pushes in one transaction until the heap is
/// full end in a typed out-of-memory error; the transaction aborts, the
/// heap is usable, every earlier commit is there after a reopen, and the
/// check is clean. A closure that swallows the error and commits keeps
/// what it stored before the error, whole.
#[test]
fn a_full_heap_is_a_typed_error_and_the_heap_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), fixed()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("kept", PVec::<u64>::new)?.extend(0..100)).unwrap();
    let r: Result<(), Error> = heap.write(|tx| {
        let mut v = tx.root_or_insert_with("big", PVec::<u64>::new)?;
        loop {
            v.push(7)?;
        }
    });
    let e: Error = r.unwrap_err();
    assert!(is_oom(&e), "{e:?}");
    assert!(values(&heap, "big").is_empty());
    clean(&heap);
    // Strings and boxes too.
    let e = heap
        .write(|tx| -> Result<(), Error> {
            let mut v = tx.root_or_insert_with("strings", PVec::<PString>::new)?;
            loop {
                v.push(tx.new_string(&"x".repeat(4000))?)?;
            }
        })
        .unwrap_err();
    assert!(is_oom(&e), "{e:?}");
    let e = heap
        .write(|tx| {
            let mut m = tx.root_or_insert_with("map", PBTreeMap::<u64, PBox<[u64; 64]>>::new)?;
            for i in 0.. {
                m.insert_owned(i, tx.new_box([i; 64])?)?;
            }
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert!(is_oom(&e), "{e:?}");
    let e = heap
        .write(|tx| {
            let mut m = tx.root_or_insert_with("hmap", PHashMap::<u64, u64>::new)?;
            for i in 0.. {
                m.insert(i, i)?;
            }
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert!(is_oom(&e), "{e:?}");
    clean(&heap);

    // Errors swallowed: what was stored before the full heap commits.
    let stored = heap
        .write(|tx| {
            let mut v = tx.root_or_insert_with("partial", PVec::<PString>::new)?;
            let mut n = 0u64;
            while v.push(tx.new_string(&format!("{n:04000}"))?).is_ok() {
                n += 1;
            }
            Ok::<_, Error>(n)
        })
        .unwrap_or_else(|e| {
            // new_string itself ran out of room.
            assert!(is_oom(&e), "{e:?}");
            u64::MAX
        });
    clean(&heap);
    heap.write(|tx| tx.root_mut::<PVec<u64>>("kept")?.unwrap().push(100)).unwrap();
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), fixed()).unwrap();
    assert_eq!(values(&heap, "kept"), (0..=100).collect::<Vec<_>>());
    assert!(values(&heap, "big").is_empty());
    if stored != u64::MAX {
        let n = heap.read(|r| r.root::<PVec<PString>>("partial").unwrap().map_or(0, |v| v.len()));
        assert_eq!(n as u64, stored);
    }
    clean(&heap);
}

/// Sizes no heap can hold: a typed error, not a panic or an overflow.
#[test]
fn impossible_sizes_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), fixed()).unwrap();
    for n in [usize::MAX, usize::MAX / 8, 1 << 61, 1 << 40, 1 << 30] {
        let e = heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.reserve(n)).unwrap_err();
        assert!(is_oom(&e), "reserve({n}): {e:?}");
        let e = heap
            .write(|tx| {
                let mut v = tx.root_or_insert_with("v", PVec::<u64>::new)?;
                v.push(1)?;
                v.reserve(n)
            })
            .unwrap_err();
        assert!(is_oom(&e), "reserve({n}) after a push: {e:?}");
    }
    let e = heap.write(|tx| tx.new_string(&"y".repeat(2 << 20)).map(drop)).unwrap_err();
    assert!(is_oom(&e), "{e:?}");
    assert!(values(&heap, "v").is_empty());
    clean(&heap);
}

/// A hash map asked to reserve more entries than the address space
/// holds answers a typed out-of-memory error (as `PVec::reserve`), not
/// `Error::Damaged`: the map is sound and stays usable.
#[test]
fn a_huge_hash_map_reserve_is_out_of_memory_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), fixed()).unwrap();
    for n in [usize::MAX, usize::MAX / 2, usize::MAX / 8, 1 << 61, 1 << 40] {
        let e = heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?.reserve(n)).unwrap_err();
        assert!(is_oom(&e), "reserve({n}): {e:?}");
        let e = heap
            .write(|tx| {
                let mut m = tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?;
                m.insert(1, 1)?;
                m.reserve(n)
            })
            .unwrap_err();
        assert!(is_oom(&e), "reserve({n}) after an insert: {e:?}");
    }
    heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?.insert(2, 20)).unwrap();
    assert_eq!(heap.read(|r| r.root::<PHashMap<u64, u64>>("m").unwrap().unwrap().get(&2).copied()), Some(20));
    clean(&heap);
}

/// Empty values and zero-sized elements.
#[test]
fn empty_values_and_zero_sized_elements() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let mut s = tx.root_or_insert_with("s", PString::new)?;
        s.push_str("")?;
        assert_eq!(s.pop()?, None);
        s.truncate(0)?;
        s.clear()?;
        let mut v = tx.root_or_insert_with("v", PVec::<PString>::new)?;
        v.push(tx.new_string("")?)?;
        v.push(PString::new())?;
        let mut z = tx.root_or_insert_with("z", PVec::<PBox<[u64; 0]>>::new)?;
        for _ in 0..100 {
            z.push(tx.new_box([])?)?;
        }
        drop(z.pop_owned()?);
        let mut zm = tx.root_or_insert_with("zm", PBTreeMap::<u64, [u8; 0]>::new)?;
        for i in 0..100 {
            zm.insert(i, [])?;
        }
        let mut zh = tx.root_or_insert_with("zh", PHashMap::<[u8; 0], [u8; 0]>::new)?;
        zh.insert([], [])?;
        assert_eq!(zh.insert([], [])?, Some([]));
        tx.root_or_insert_with("zr", || [0u8; 0])?;
        let mut e = tx.root_or_insert_with("e", PVec::<u64>::new)?;
        assert_eq!(e.pop()?, None);
        e.truncate(5)?;
        e.clear()?;
        e.reserve(0)?;
        e.extend(std::iter::empty::<u64>())?;
        let mut m = tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?;
        assert_eq!(m.remove(&1)?, None);
        m.clear()?;
        let mut b = tx.root_or_insert_with("b", PBTreeMap::<u64, PString>::new)?;
        assert!(b.remove_owned(&1)?.is_none());
        assert!(b.pop_first_owned()?.is_none());
        assert!(b.pop_last_owned()?.is_none());
        b.clear()?;
        assert!(!tx.remove_root::<u64>("absent")?);
        Ok::<_, Error>(())
    })
    .unwrap();
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.read(|r| {
        assert_eq!(r.root::<PString>("s")?.unwrap().as_str(), "");
        let v = r.root::<PVec<PString>>("v")?.unwrap();
        assert_eq!((v.len(), v[0].as_str(), v[1].as_str()), (2, "", ""));
        assert_eq!(r.root::<PVec<PBox<[u64; 0]>>>("z")?.unwrap().len(), 99);
        assert_eq!(r.root::<PBTreeMap<u64, [u8; 0]>>("zm")?.unwrap().len(), 100);
        assert_eq!(r.root::<PHashMap<[u8; 0], [u8; 0]>>("zh")?.unwrap().len(), 1);
        assert!(r.root::<[u8; 0]>("zr")?.is_some());
        assert!(r.root::<PHashMap<u64, u64>>("m")?.unwrap().is_empty());
        Ok::<_, Error>(())
    })
    .unwrap();
    clean(&heap);
}

/// Root names: empty, too long, with NUL, reserved: typed errors; long
/// and non-ASCII names that fit work.
#[test]
fn bad_root_names_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    for name in ["", "a\0b", &"n".repeat(100_000)] {
        let e = heap.write(|tx| tx.root_or_insert_with(name, || 1u64).map(drop)).unwrap_err();
        assert!(matches!(e, Error::Heap(rvm_heap::HeapError::BadRootName { .. })), "{name:.20?}: {e:?}");
        assert!(heap.read(|r| r.root::<u64>(name).map(|r| r.is_none()).unwrap_or(true)));
        let _ = heap.write(|tx| tx.root_mut::<u64>(name).map(|r| r.is_none()));
        let _ = heap.write(|tx| tx.remove_root::<u64>(name));
    }
    let e = heap.write(|tx| tx.root_or_insert_with("rvm:mine", || 1u64).map(drop)).unwrap_err();
    assert!(matches!(e, Error::ReservedName { .. }), "{e:?}");
    assert!(matches!(heap.read(|r| r.root::<u64>("rvm:shapes").map(drop)), Err(Error::ReservedName { .. })));
    heap.write(|tx| tx.root_or_insert_with("ünïcødé ☃", || 3u64).map(drop)).unwrap();
    assert_eq!(heap.read(|r| r.root::<u64>("ünïcødé ☃").unwrap().copied()), Some(3));
    clean(&heap);
}

/// Many roots: made until the slots run out (a typed error), every one
/// readable after a reopen.
#[test]
fn roots_until_the_slots_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let mut made = 0u64;
    for i in 0..100_000u64 {
        match heap.write(|tx| tx.root_or_insert_with(&format!("root{i}"), || i).map(drop)) {
            Ok(()) => made += 1,
            Err(e) => {
                assert!(
                    matches!(e, Error::Heap(rvm_heap::HeapError::RootsFull { .. })) || is_oom(&e),
                    "root {i}: {e:?}"
                );
                break;
            }
        }
    }
    assert!(made > 10, "{made}");
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    for i in 0..made {
        assert_eq!(heap.read(|r| r.root::<u64>(&format!("root{i}")).unwrap().copied()), Some(i));
    }
    heap.write(|tx| {
        for i in 0..made {
            assert!(tx.remove_root::<u64>(&format!("root{i}"))?);
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.write(|tx| tx.root_or_insert_with("again", || 1u64).map(drop)).unwrap();
    clean(&heap);
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct V1 {
    a: u64,
    b: u64,
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct V2 {
    a: u64,
    b: u64,
    c: u64,
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct V3 {
    a: u64,
    b: [u8; 8],
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Flags {
    a: u32,
    b: u32,
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct FlagsChanged {
    a: char,
    b: u32,
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Bytes {
    a: [u8; 4],
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Bools {
    a: [bool; 4],
}

/// A root of a struct whose definition changed between runs, opened as
/// the new one: `Error::RootType` whenever a field's type changed to one
/// with other valid values (a `bool` or `char` over bytes), and for any
/// change of size; the root itself is untouched.
#[test]
fn a_changed_struct_is_refused_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        tx.root_or_insert_with("v", || V1 { a: 1, b: 2 })?;
        tx.root_or_insert_with("f", || Flags { a: 0xffff_ffff, b: 9 })?;
        tx.root_or_insert_with("bytes", || Bytes { a: [7; 4] })?;
        tx.root_or_insert_with("vec", PVec::<Flags>::new)?.push(Flags { a: u32::MAX, b: 1 })?;
        Ok::<_, Error>(())
    })
    .unwrap();
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let root_type = |r: Result<bool, Error>| matches!(r, Err(Error::RootType { .. }));
    assert!(root_type(heap.read(|r| r.root::<V2>("v").map(|v| v.is_some()))));
    assert!(root_type(heap.write(|tx| tx.root_mut::<V2>("v").map(|v| v.is_some()))));
    assert!(root_type(heap.write(|tx| tx.root_or_insert_with("v", || V2 { a: 0, b: 0, c: 0 }).map(|_| true))));
    assert!(root_type(heap.write(|tx| tx.remove_root::<V2>("v"))));
    assert!(root_type(heap.read(|r| r.root::<V3>("v").map(|v| v.is_some()))));
    assert!(root_type(heap.read(|r| r.root::<FlagsChanged>("f").map(|v| v.is_some()))));
    assert!(root_type(heap.read(|r| r.root::<Bools>("bytes").map(|v| v.is_some()))));
    assert!(root_type(heap.read(|r| r.root::<PVec<FlagsChanged>>("vec").map(|v| v.is_some()))));
    assert!(root_type(heap.read(|r| r.root::<PVec<u64>>("vec").map(|v| v.is_some()))));
    assert!(root_type(heap.read(|r| r.root::<PString>("vec").map(|v| v.is_some()))));
    assert!(root_type(heap.read(|r| r.root::<PVec<u8>>("bytes").map(|v| v.is_some()))));
    assert_eq!(heap.read(|r| r.root::<V1>("v").unwrap().copied()), Some(V1 { a: 1, b: 2 }));
    clean(&heap);
}

#[derive(Debug)]
#[allow(dead_code)] // the fields are shown by `Debug`
enum AppError {
    Heap(Error),
    Refused(&'static str),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Heap(e)
    }
}

/// Panics at every step of a transaction that makes, changes and removes
/// roots and moves owned values: each aborts, the heap is usable on the
/// same and on another thread, and a reopen shows only what committed.
#[test]
fn a_panic_anywhere_in_a_transaction_rolls_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let heap = Arc::new(PHeap::open_or_create(dir.path(), small()).unwrap());
    heap.write(|tx| {
        tx.root_or_insert_with("gone", || 5u64)?;
        let mut m = tx.root_or_insert_with("m", PBTreeMap::<u64, PString>::new)?;
        m.insert_owned(1, tx.new_string("one")?)?;
        tx.root_or_insert_with("v", PVec::<u64>::new)?.extend([1, 2, 3])
    })
    .unwrap();
    for step in 0..9 {
        for flush in [true, false] {
            let h = heap.clone();
            let body = move |tx: &mut rvm_collections::WriteTx<'_>| -> Result<(), AppError> {
                let at = |s: i32| {
                    if s == step {
                        panic!("step {s}");
                    }
                };
                at(0);
                tx.root_or_insert_with("new", || 1u64)?;
                at(1);
                assert!(tx.remove_root::<u64>("gone")?);
                at(2);
                let mut m = tx.root_mut::<PBTreeMap<u64, PString>>("m")?.unwrap();
                let one = m.remove_owned(&1)?.unwrap();
                at(3);
                m.insert_owned(2, one)?;
                m.insert_owned(3, tx.new_string("three")?)?;
                let _floating = tx.new_string("dropped")?;
                at(4);
                let mut v = tx.root_mut::<PVec<u64>>("v")?.unwrap();
                v.extend(4..1000)?;
                at(5);
                v.as_mut_slice()?.fill(0);
                at(6);
                drop(v);
                tx.root_or_insert_with("box", PVec::<PBox<u64>>::new)?.push(tx.new_box(9u64)?)?;
                at(7);
                Err(AppError::Refused("no"))
            };
            let r = std::thread::spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if flush {
                        h.write(body)
                    } else {
                        h.write_no_flush(body)
                    }
                }))
            })
            .join()
            .unwrap();
            match r {
                Err(_) => assert!(step < 8),
                Ok(Err(AppError::Refused(_))) => assert_eq!(step, 8),
                Ok(other) => panic!("step {step}: {other:?}"),
            }
            assert_eq!(values(&heap, "v"), [1, 2, 3], "step {step}");
            heap.read(|r| {
                assert_eq!(r.root::<u64>("gone").unwrap().copied(), Some(5));
                assert!(r.root::<u64>("new").unwrap().is_none());
                let m = r.root::<PBTreeMap<u64, PString>>("m").unwrap().unwrap();
                assert_eq!(m.iter().map(|(k, v)| (*k, v.to_string())).collect::<Vec<_>>(), [(1, "one".to_string())]);
            });
            clean(&heap);
        }
    }
    heap.write(|tx| tx.root_mut::<PVec<u64>>("v")?.unwrap().push(4)).unwrap();
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(values(&heap, "v"), [1, 2, 3, 4]);
    clean(&heap);
}

/// Many keys in both maps, removed again, with absent keys removed in
/// between; reopened; the check clean throughout.
#[test]
fn many_keys_in_both_maps() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), Config { heap_len: 16 << 20, log_len: 64 << 20, ..small() }).unwrap();
    const N: u64 = 20_000;
    heap.write(|tx| {
        let mut h = tx.root_or_insert_with("h", PHashMap::<u64, u64>::new)?;
        let mut b = tx.root_or_insert_with("b", PBTreeMap::<u64, u64>::new)?;
        for i in 0..N {
            assert_eq!(h.insert(i * 7919 % N, i)?, None);
            assert_eq!(b.insert(i * 7919 % N, i)?, None);
        }
        assert_eq!(h.remove(&N)?, None);
        assert_eq!(b.remove(&(N + 1))?, None);
        Ok::<_, Error>(())
    })
    .unwrap();
    clean(&heap);
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.read(|r| {
        let h = r.root::<PHashMap<u64, u64>>("h").unwrap().unwrap();
        let b = r.root::<PBTreeMap<u64, u64>>("b").unwrap().unwrap();
        assert_eq!((h.len() as u64, b.len() as u64), (N, N));
        assert!(b.keys().copied().eq(0..N));
        for i in 0..N {
            assert_eq!(h.get(&(i * 7919 % N)), Some(&i));
        }
    });
    heap.write(|tx| {
        let mut h = tx.root_mut::<PHashMap<u64, u64>>("h")?.unwrap();
        let mut b = tx.root_mut::<PBTreeMap<u64, u64>>("b")?.unwrap();
        for i in (0..N).rev() {
            assert!(h.remove(&i)?.is_some());
            assert!(h.remove(&i)?.is_none());
            assert!(b.remove(&i)?.is_some());
            assert!(b.remove(&i)?.is_none());
        }
        assert!(h.is_empty() && b.is_empty());
        Ok::<_, Error>(())
    })
    .unwrap();
    clean(&heap);
    let stats = heap.stats();
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.read(|r| assert!(r.root::<PBTreeMap<u64, u64>>("b").unwrap().unwrap().is_empty()));
    clean(&heap);
    let _ = stats;
}

/// The power fails at every storage operation of a heap's first open (the
/// log and the heap file being made), with unsynced writes kept or lost
/// at random: the next open must make or find the heap, never refuse the
/// folder for good. (A log file left half-made by a crash in its creation
/// used to be `NotALog` at every later open.)
#[test]
fn a_crash_during_the_first_open_never_bricks_the_folder() {
    let config = Config { heap_len: 1 << 20, max_heap_len: 4 << 20, log_len: 1 << 20, ..Config::default() };
    let open = |disk: &SimDisk| PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("db"), config.clone());
    let total = {
        let disk = SimDisk::new();
        let heap = open(&disk).unwrap();
        heap.write(|tx| tx.root_or_insert_with("n", || 1u64).map(drop)).unwrap();
        disk.op_count()
    };
    for cut in (0..total + 2).step_by(3) {
        for mode in [CrashMode::LoseUnsynced, CrashMode::KeepRandomSubset { seed: cut, tear_last: cut % 2 == 0 }] {
            let disk = SimDisk::new();
            disk.fail_after(cut);
            let acked = match open(&disk) {
                Ok(heap) => {
                    let w = heap.write(|tx| tx.root_or_insert_with("n", || 1u64).map(drop));
                    drop(heap);
                    w.is_ok()
                }
                Err(_) => false,
            };
            disk.crash(mode);
            disk.clear_faults();
            let heap = open(&disk).unwrap_or_else(|e| panic!("cut {cut}, {mode:?}: reopen refused: {e:?}"));
            let n = heap.read(|r| r.root::<u64>("n").map(|n| n.copied()));
            let n = n.unwrap_or_else(|e| panic!("cut {cut}, {mode:?}: {e:?}"));
            if acked {
                assert_eq!(n, Some(1), "cut {cut}, {mode:?}");
            }
            heap.write(|tx| tx.root_or_insert_with("m", || 2u64).map(drop)).unwrap();
            clean(&heap);
        }
    }
}

/// What a `kill -9` (no power loss: every write kept) can leave of a
/// heap's first open in its folder: a log file just created (empty), just
/// sized (zeros), or written but for its superblock (written last); and
/// the heap file not made yet. The next open must start again: these used
/// to be `NotALog` at every later open. A file that is no unfinished log
/// (other bytes in its first block), or an unfinished log beside a heap
/// file, is still refused, and left as it was.
#[test]
fn a_log_left_unfinished_by_a_killed_first_open_is_made_again() {
    let pristine = {
        let dir = tempfile::tempdir().unwrap();
        drop(PHeap::open_or_create(dir.path(), small()).unwrap());
        std::fs::read(dir.path().join(rvm_collections::LOG_FILE)).unwrap()
    };
    let mut no_superblock = pristine.clone();
    no_superblock[..4096].fill(0);
    let unfinished = [("empty", Vec::new()), ("zeros", vec![0; pristine.len()]), ("no superblock", no_superblock)];
    for (what, bytes) in &unfinished {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(rvm_collections::LOG_FILE), bytes).unwrap();
        let heap = PHeap::open_or_create(dir.path(), small()).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        heap.write(|tx| tx.root_or_insert_with("n", || 1u64).map(drop)).unwrap();
        drop(heap);
        let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
        assert_eq!(heap.read(|r| r.root::<u64>("n").unwrap().copied()), Some(1));
    }
    // Not an unfinished log: refused, nothing changed.
    let mut text = b"my notes, not a log\n".to_vec();
    text.resize(8192, b' ');
    let refuse = |files: &[(&str, &[u8])]| {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let before = snapshot(dir.path());
        let r = PHeap::open_or_create(dir.path(), small());
        assert!(matches!(r, Err(Error::Core(_))), "{files:.0?}: {r:?}");
        assert_eq!(snapshot(dir.path()), before);
    };
    refuse(&[("rvm.log", &text[..])]);
    refuse(&[("rvm.log", &b"short"[..])]);
    refuse(&[("rvm.log", &[0u8; 100][..])]);
    for (_, bytes) in &unfinished {
        refuse(&[("rvm.log", &bytes[..]), ("heap.seg", &b""[..])]);
        refuse(&[("rvm.log", &bytes[..]), ("heap.seg.creating", &b""[..])]);
    }
}

/// The environment variable that makes `child_process` do a job (this
/// test binary runs itself as the child of the `kill -9` tests).
const CHILD_JOB: &str = "RVM_NEW_USER_CHILD_JOB";
/// The folder the child works in.
const CHILD_DIR: &str = "RVM_NEW_USER_CHILD_DIR";

/// One record of the `kill -9` tests: every write puts the same number in
/// a vector, a string map and a hash map, so a half-applied transaction
/// shows.
#[derive(Persist)]
#[repr(C)]
struct Journal {
    seq: PVec<u64>,
    names: PBTreeMap<u64, PString>,
    sums: PHashMap<u64, u64>,
}

fn new_journal() -> Journal {
    Journal { seq: PVec::new(), names: PBTreeMap::new(), sums: PHashMap::new() }
}

fn append(tx: &rvm_collections::WriteTx<'_>, i: u64) -> Result<(), Error> {
    let mut j = tx.root_or_insert_with("journal", new_journal)?;
    j.field_mut(|j| &j.seq).push(i)?;
    j.field_mut(|j| &j.names)
        .insert_owned(i, tx.new_string(&format!("entry {i} {}", "x".repeat(i as usize % 300)))?)?;
    j.field_mut(|j| &j.sums).insert(i, i * 3)?;
    Ok(())
}

/// Not a test of its own: the child's side of the `kill -9` tests (does
/// nothing unless `RVM_NEW_USER_CHILD_JOB` is set).
#[test]
fn child_process() {
    let Ok(job) = std::env::var(CHILD_JOB) else { return };
    let dir = std::path::PathBuf::from(std::env::var(CHILD_DIR).unwrap());
    use std::io::Write;
    let say = |s: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "CHILD {s}").unwrap();
        out.flush().unwrap();
    };
    let heap = match PHeap::open_or_create(&dir, small()) {
        Ok(h) => h,
        Err(e) => {
            say(format!("open-error {e:?}"));
            return;
        }
    };
    say("open".into());
    match job.as_str() {
        "hold" => loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        "make" => {
            heap.write(|tx| append(tx, 0)).unwrap();
            let base = heap.base();
            drop(heap);
            say(format!("made {base}"));
        }
        "cycle" => {
            // Open, write, close, over and over: a kill lands anywhere
            // in a heap's life (its open, recovery, writes, close).
            let mut heap = Some(heap);
            loop {
                let h = match heap.take() {
                    Some(h) => h,
                    None => PHeap::open_or_create(&dir, small()).unwrap(),
                };
                let n = h.read(|r| r.root::<Journal>("journal").unwrap().map_or(0, |j| j.seq.len() as u64));
                for i in n..n + 3 {
                    h.write(|tx| append(tx, i)).unwrap();
                    say(format!("d {i}"));
                }
                if n % 2 == 0 {
                    h.close().unwrap();
                } else {
                    drop(h);
                }
            }
        }
        "rvm-calls" => {
            // Every safe call of the heap's `Rvm` a user might try on it.
            heap.write(|tx| append(tx, 0)).unwrap();
            let rvm = heap.rvm();
            for region in rvm.regions() {
                say(format!("unmap {:?}", rvm.unmap(region.clone()).map_err(|e| e.to_string())));
            }
            let seg = rvm.open_segment(dir.join(rvm_collections::HEAP_FILE));
            say(format!("open_segment {:?}", seg.as_ref().map(drop).map_err(|e| e.to_string())));
            if let Ok(seg) = seg {
                say(format!("close_segment {:?}", rvm.close_segment(seg.clone()).map_err(|e| e.to_string())));
                say(format!("delete_segment {:?}", rvm.delete_segment(seg).map_err(|e| e.to_string())));
            }
            say(format!("truncate {:?}", rvm.truncate().map_err(|e| e.to_string())));
            say(format!("checkpoint {:?}", rvm.checkpoint().map(drop).map_err(|e| e.to_string())));
            heap.write(|tx| append(tx, 1)).unwrap();
            for region in rvm.regions() {
                say(format!("track {:?}", rvm.track(&region).map_err(|e| e.to_string())));
            }
            let w = heap.write(|tx| append(tx, 2));
            say(format!("write after track {:?}", w.map_err(|e| e.to_string())));
            let n = heap.read(|r| r.root::<Journal>("journal").unwrap().map_or(0, |j| j.seq.len()));
            say(format!("read {n}"));
            say(format!("check {:?}", heap.check().map(|c| c.is_clean()).map_err(|e| e.to_string())));
            say(format!("close {:?}", heap.close().map_err(|e| e.to_string())));
            say("end".into());
        }
        "write" => {
            let start = heap.read(|r| r.root::<Journal>("journal").unwrap().map_or(0, |j| j.seq.len() as u64));
            for i in start.. {
                // Every third write does not wait for the disk: it is
                // acknowledged as durable by the next flushing one.
                if i % 3 == 1 {
                    heap.write_no_flush(|tx| append(tx, i)).unwrap();
                    say(format!("n {i}"));
                } else {
                    heap.write(|tx| append(tx, i)).unwrap();
                    say(format!("d {i}"));
                }
            }
        }
        other => panic!("unknown job {other}"),
    }
}

/// Runs this test binary as a child doing `job` in `dir`, its stdout
/// piped.
fn spawn_child(job: &str, dir: &Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_JOB, job)
        .env(CHILD_DIR, dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The child's `CHILD ...` lines, read on a thread, sent as they come.
fn child_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // The first follows libtest's "test child_process ... ".
            if let Some(at) = line.find("CHILD ") {
                if tx.send(line[at + 6..].to_string()).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// Reads the journal after a crash: a prefix `0..n` in the vector, the
/// same keys in both maps with their values, and the check clean.
fn audit_journal(heap: &PHeap) -> u64 {
    let n = heap.read(|r| {
        let Some(j) = r.root::<Journal>("journal").unwrap() else { return 0 };
        let n = j.seq.len() as u64;
        assert!(j.seq.iter().copied().eq(0..n), "the sequence has a gap");
        assert_eq!(j.names.len() as u64, n);
        assert_eq!(j.sums.len() as u64, n);
        for (k, v) in j.names.iter() {
            assert!(v.as_str().starts_with(&format!("entry {k} ")), "{k}: {v}");
            assert_eq!(j.sums.get(k), Some(&(k * 3)));
        }
        n
    });
    clean(heap);
    n
}

/// `kill -9` of a child in the middle of typed writes (durable and not),
/// several times on one folder: every write acknowledged as durable (a
/// flushing write, and every write before it) is there after the reopen,
/// nothing is half-applied, the check is clean; the heap goes on growing.
#[test]
fn kill_9_in_the_middle_of_typed_writes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut durable = 0u64;
    for round in 0..4u64 {
        let mut child = spawn_child("write", dir.path());
        let lines = child_lines(&mut child);
        let target = 20 + round * 17;
        let mut acked;
        loop {
            let line = lines.recv_timeout(std::time::Duration::from_secs(60)).expect("the child stopped writing");
            assert!(!line.starts_with("open-error"), "{line}");
            if let Some(i) = line.strip_prefix("d ") {
                let i: u64 = i.parse().unwrap();
                acked = i + 1;
                if i >= durable + target {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Every other round reopens with instant recovery (the log
        // applied in the background, pages brought up to date on touch).
        let mut config = small();
        config.options.instant_recovery = round % 2 == 1;
        let heap = PHeap::open_or_create(dir.path(), config).unwrap();
        let n = audit_journal(&heap);
        assert!(n >= acked, "round {round}: {n} writes found, {acked} acknowledged durable");
        durable = n;
    }
}

/// `kill -9` of a child at many moments of its first open (the log and
/// the heap being made) and its first writes: the next open always works
/// and finds a sound heap.
#[test]
fn kill_9_during_the_first_open_never_bricks_the_folder() {
    for k in 0..12u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_child("write", dir.path());
        std::thread::sleep(std::time::Duration::from_micros(k * k * 400));
        child.kill().unwrap();
        child.wait().unwrap();
        let heap = PHeap::open_or_create(dir.path(), small())
            .unwrap_or_else(|e| panic!("killed after {} us: {e:?}", k * k * 400));
        audit_journal(&heap);
        let n = heap.read(|r| r.root::<Journal>("journal").unwrap().map_or(0, |j| j.seq.len() as u64));
        heap.write(|tx| append(tx, n)).unwrap();
    }
}

/// The same folder opened by two processes: the second gets a typed
/// error (the log is locked), changes nothing, and opens it once the
/// first is gone.
#[test]
fn a_folder_held_by_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(PHeap::open_or_create(dir.path(), small()).unwrap());
    let mut child = spawn_child("hold", dir.path());
    let lines = child_lines(&mut child);
    assert_eq!(lines.recv_timeout(std::time::Duration::from_secs(60)).unwrap(), "open");
    let before = snapshot(dir.path());
    let r = PHeap::open_or_create(dir.path(), small());
    assert!(matches!(r, Err(Error::Core(rvm_core::Error::Locked { .. }))), "{r:?}");
    assert_eq!(snapshot(dir.path()), before);
    child.kill().unwrap();
    child.wait().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    clean(&heap);
}

/// Heaps made by other processes (children), opened by this one while it
/// has heaps of its own open (each holding its 64 GiB range) and threads
/// running. A heap's base used to be the kernel's free pick in the process
/// that made it, where every process keeps its libraries, stacks, arenas
/// and heaps: this process could not map it about one time in five
/// (`AddressInUse`; the first failure came at the first to third heap).
/// Bases are now picked in `[32 TiB, 80 TiB)`, where Linux maps nothing by
/// default; only another heap's range can be there (each held range takes
/// about 1/768 of it, and this test binary holds dozens), so a few
/// failures are tolerated, never most.
#[test]
fn heaps_made_by_other_processes_open_here() {
    let mine: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _open: Vec<_> = mine.iter().map(|d| PHeap::open_or_create(d.path(), small()).unwrap()).collect();
    let mut refused = Vec::new();
    for i in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_child("make", dir.path());
        let said: Vec<String> = child_lines(&mut child).iter().collect();
        child.wait().unwrap();
        assert_eq!(said.len(), 2, "{said:?}");
        let base: u64 = said[1].strip_prefix("made ").unwrap().parse().unwrap();
        assert!((0x2000_0000_0000..0x5000_0000_0000).contains(&base), "heap {i}: base {base:#x}");
        match PHeap::open_or_create(dir.path(), small()) {
            Ok(heap) => assert_eq!(audit_journal(&heap), 1),
            Err(e) => refused.push(format!("heap {i}: {e:?}")),
        }
    }
    assert!(refused.len() <= 3, "{refused:#?}");
}

/// An empty folder path names the current folder, as a relative path
/// does: the heap is made there (in a child process, whose current folder
/// this test chooses). The folder sync after the log's creation opened
/// the empty path and failed after making the files.
#[test]
fn an_empty_folder_path_is_the_current_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_JOB, "make")
        .env(CHILD_DIR, "")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let said: Vec<String> = child_lines(&mut child).iter().collect();
    child.wait().unwrap();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said[1].starts_with("made "), "{said:?}");
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(audit_journal(&heap), 1);
}

/// A log smaller than one transaction's changes: the write fails with a
/// typed error (no hang, no panic), the heap is usable for smaller ones,
/// and a reopen shows every earlier commit.
#[test]
fn a_transaction_larger_than_the_log_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { heap_len: 8 << 20, max_heap_len: 8 << 20, log_len: 256 << 10, ..Config::default() };
    let heap = PHeap::open_or_create(dir.path(), config.clone()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.extend(0..100)).unwrap();
    for flush in [true, false] {
        let big = |tx: &mut rvm_collections::WriteTx<'_>| {
            let mut v = tx.root_or_insert_with("big", PVec::<u64>::new)?;
            v.extend(0..200_000u64)
        };
        let r = if flush { heap.write(big) } else { heap.write_no_flush(big) };
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Core(_) | Error::Heap(_)), "{e:?}");
        assert!(values(&heap, "big").is_empty());
        heap.write(|tx| tx.root_mut::<PVec<u64>>("v")?.unwrap().push(100)).unwrap();
    }
    // Many small transactions through the small log: it is reused.
    for i in 0..2000u64 {
        heap.write_no_flush(|tx| tx.root_mut::<PVec<u64>>("v")?.unwrap().as_mut_slice().map(|s| s[0] = i)).unwrap();
    }
    heap.flush().unwrap();
    clean(&heap);
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), config).unwrap();
    let v = values(&heap, "v");
    assert_eq!((v.len(), v[0], v[101]), (102, 1999, 100));
    assert!(values(&heap, "big").is_empty());
    clean(&heap);
}

/// Leaves in `dir` what a crash after 40 durable writes leaves: the heap
/// dropped, not closed, so its commits are in the log and not all in the
/// heap file.
fn make_crashed(dir: &Path) {
    let heap = PHeap::open_or_create(dir, small()).unwrap();
    for i in 0..40u64 {
        heap.write_no_flush(|tx| append(tx, i)).unwrap();
    }
    heap.flush().unwrap();
}

/// A change made to a folder's files.
type Damage = Box<dyn Fn(&Path)>;

/// A folder left by a crash (the heap dropped, not closed: its commits
/// are still in the log, not all in the heap file), then damaged: a byte
/// of the log flipped at seeded places, the log or the heap file cut
/// short, zeroed or removed (the heap file keeps its owner mark, an
/// extended attribute, where the file system has them: a removed log is
/// then detected). Every open is either `Ok` with every commit
/// (the damage hit bytes that hold nothing) or a typed error with the
/// files byte-identical; never a panic or a wrong answer.
#[test]
fn a_damaged_folder_is_refused_untouched_or_opens_whole() {
    let pristine = tempfile::tempdir().unwrap();
    make_crashed(pristine.path());
    let expect: Vec<u64> = (0..40).collect();
    let log_len = std::fs::metadata(pristine.path().join("rvm.log")).unwrap().len() as usize;
    let heap_len = std::fs::metadata(pristine.path().join("heap.seg")).unwrap().len() as usize;
    let mut damages: Vec<(String, Damage)> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    // Bytes that hold something (the superblock, the statuses, the
    // records; each case's log is laid out alike), and a few anywhere.
    let held: Vec<usize> = std::fs::read(pristine.path().join("rvm.log"))
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, b)| **b != 0)
        .map(|(i, _)| i)
        .collect();
    for n in 0..48 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let at = if n % 8 == 0 { (seed >> 20) as usize % log_len } else { held[(seed >> 20) as usize % held.len()] };
        let bit = 1u8 << ((seed >> 8) % 8);
        damages.push((
            format!("log byte {at} ^ {bit:#x}"),
            Box::new(move |d: &Path| {
                let p = d.join("rvm.log");
                let mut b = std::fs::read(&p).unwrap();
                b[at] ^= bit;
                std::fs::write(&p, b).unwrap();
            }),
        ));
    }
    for (file, len) in [("rvm.log", log_len), ("heap.seg", heap_len)] {
        for cut in [0, 100, 4096, len / 2, len - 1] {
            damages.push((
                format!("{file} cut to {cut}"),
                Box::new(move |d: &Path| {
                    std::fs::OpenOptions::new().write(true).open(d.join(file)).unwrap().set_len(cut as u64).unwrap()
                }),
            ));
        }
        damages.push((
            format!("{file} zeroed"),
            Box::new(move |d: &Path| std::fs::write(d.join(file), vec![0u8; len]).unwrap()),
        ));
    }
    damages.push(("heap.seg removed".into(), Box::new(|d: &Path| std::fs::remove_file(d.join("heap.seg")).unwrap())));
    damages.push(("rvm.log removed".into(), Box::new(|d: &Path| std::fs::remove_file(d.join("rvm.log")).unwrap())));
    for (what, damage) in &damages {
        let dir = tempfile::tempdir().unwrap();
        // Made in place, not copied: a copy would lose the heap file's
        // owner mark, and its log would name the original's heap file.
        make_crashed(dir.path());
        damage(dir.path());
        let before = snapshot(dir.path());
        let opened = std::panic::catch_unwind(|| PHeap::open_or_create(dir.path(), small()))
            .unwrap_or_else(|_| panic!("{what}: the open panicked"));
        match opened {
            Ok(heap) => {
                let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    heap.read(|r| r.root::<Journal>("journal").map(|j| j.map(|j| j.seq.to_vec())))
                }))
                .unwrap_or_else(|_| panic!("{what}: a read panicked"));
                match found {
                    Ok(seq) => assert_eq!(seq.as_deref(), Some(&expect[..]), "{what}: Ok with other data"),
                    Err(e) => panic!("{what}: opened, then {e:?}"),
                }
            }
            Err(e) => {
                assert_eq!(snapshot(dir.path()), before, "{what}: refused ({e}) but the files changed");
            }
        }
    }
}

/// Handles used where they do not belong: a value made in another heap's
/// transaction stored here (`ForeignValue`, both heaps unchanged by it),
/// a root removed or borrowed again while a guard of it lives
/// (`RootBorrowed`), a root made in this transaction asked for as another
/// type (`RootType`), the transaction reached through a guard's `tx()`.
#[test]
fn handles_used_where_they_do_not_belong_are_typed_errors() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = PHeap::open_or_create(d1.path(), small()).unwrap();
    let b = PHeap::open_or_create(d2.path(), small()).unwrap();
    a.write(|tx| {
        let mut v = tx.root_or_insert_with("v", PVec::<PString>::new)?;
        let r = b.write(|tx_b| {
            let s = tx_b.new_string("from b")?;
            let e = v.push(s).unwrap_err();
            assert!(matches!(e, Error::ForeignValue), "{e:?}");
            let boxed = tx_b.new_box(5u64)?;
            let mut boxes = tx.root_or_insert_with("boxes", PVec::<PBox<u64>>::new)?;
            assert!(matches!(boxes.push(boxed), Err(Error::ForeignValue)));
            tx_b.root_or_insert_with("w", PVec::<u64>::new)?.push(1)
        });
        r?;
        v.push(tx.new_string("from a")?)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    clean(&a);
    clean(&b);
    assert_eq!(a.read(|r| r.root::<PVec<PString>>("v").unwrap().unwrap().len()), 1);
    assert_eq!(values(&b, "w"), [1]);

    a.write(|tx| {
        let g = tx.root_mut::<PVec<PString>>("v")?.unwrap();
        assert!(matches!(tx.remove_root::<PVec<PString>>("v"), Err(Error::RootBorrowed { .. })));
        assert!(matches!(tx.root::<PVec<PString>>("v"), Err(Error::RootBorrowed { .. })));
        assert!(matches!(g.tx().root_mut::<PVec<PString>>("v"), Err(Error::RootBorrowed { .. })));
        drop(g);
        let shared = tx.root::<PVec<PString>>("v")?.unwrap();
        let again = tx.root::<PVec<PString>>("v")?.unwrap();
        assert_eq!(shared.len(), again.len());
        assert!(matches!(tx.root_mut::<PVec<PString>>("v"), Err(Error::RootBorrowed { .. })));
        assert!(matches!(tx.remove_root::<PVec<PString>>("v"), Err(Error::RootBorrowed { .. })));
        drop((shared, again));
        tx.root_or_insert_with("fresh", || 1u32)?;
        assert!(matches!(tx.root::<u64>("fresh"), Err(Error::RootType { .. })));
        assert!(matches!(tx.root_or_insert_with("fresh", || 1u64).map(drop), Err(Error::RootType { .. })));
        assert!(matches!(tx.remove_root::<u64>("fresh"), Err(Error::RootType { .. })));
        // Its guard was dropped at once: removed, gone for this transaction.
        assert!(tx.remove_root::<u32>("fresh")?);
        assert!(tx.root::<u32>("fresh")?.is_none());
        Ok::<_, Error>(())
    })
    .unwrap_or_else(|e| panic!("{e:?}"));
    clean(&a);
}

/// Many threads on one heap at once: writers (some failing, some
/// panicking), readers, checks and flushes. No deadlock, no torn read (a
/// reader sees the two roots agree), every successful write there.
#[test]
fn threads_reading_writing_checking_and_panicking_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let heap = Arc::new(PHeap::open_or_create(dir.path(), small()).unwrap());
    heap.write(|tx| {
        tx.root_or_insert_with("a", PVec::<u64>::new)?;
        tx.root_or_insert_with("b", PBTreeMap::<u64, u64>::new).map(drop)
    })
    .unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let heap = heap.clone();
        let done = done_tx.clone();
        threads.push(std::thread::spawn(move || {
            let mut ok = 0u64;
            for i in 0..40u64 {
                let n = t * 1000 + i;
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let body = |tx: &mut rvm_collections::WriteTx<'_>| {
                        tx.root_mut::<PVec<u64>>("a")?.unwrap().push(n)?;
                        tx.root_mut::<PBTreeMap<u64, u64>>("b")?.unwrap().insert(n, n)?;
                        match i % 5 {
                            3 => Err(Error::Config("refused".into())),
                            4 => panic!("writer {t} panics at {i}"),
                            _ => Ok(()),
                        }
                    };
                    if i % 2 == 0 {
                        heap.write(body)
                    } else {
                        heap.write_no_flush(body)
                    }
                }));
                if let Ok(Ok(())) = r {
                    ok += 1;
                }
            }
            done.send(()).unwrap();
            ok
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..3 {
        let heap = heap.clone();
        readers.push(std::thread::spawn(move || {
            for k in 0..60 {
                heap.read(|r| {
                    let a = r.root::<PVec<u64>>("a").unwrap().unwrap();
                    let b = r.root::<PBTreeMap<u64, u64>>("b").unwrap().unwrap();
                    assert_eq!(a.len(), b.len());
                    assert!(a.iter().all(|k| b.get(k) == Some(k)));
                });
                if k % 20 == 0 {
                    assert!(heap.check().unwrap().is_clean());
                    heap.flush().unwrap();
                }
            }
        }));
    }
    for _ in 0..4 {
        done_rx.recv_timeout(std::time::Duration::from_secs(60)).expect("a deadlock");
    }
    let committed: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(committed, 4 * 24);
    drop(Arc::try_unwrap(heap).unwrap());
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(values(&heap, "a").len() as u64, committed);
    clean(&heap);
}

/// `kill -9` of a child that opens, writes, and closes (or drops) a heap
/// over and over: wherever the kill lands (an open, a recovery, a close
/// applying the log to the heap file), the next open finds every
/// acknowledged write and a sound heap.
#[test]
fn kill_9_anywhere_in_a_heaps_life() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = 0u64;
    for round in 0..6u64 {
        let mut child = spawn_child("cycle", dir.path());
        let lines = child_lines(&mut child);
        let stop = acked + 4 + round * 3;
        loop {
            let line = lines.recv_timeout(std::time::Duration::from_secs(60)).expect("the child stopped");
            assert!(!line.starts_with("open-error"), "{line}");
            if let Some(i) = line.strip_prefix("d ") {
                acked = acked.max(i.parse::<u64>().unwrap() + 1);
                if acked >= stop {
                    break;
                }
            }
        }
        // A little later: somewhere in the next write, close or open.
        std::thread::sleep(std::time::Duration::from_micros(round * 700));
        child.kill().unwrap();
        child.wait().unwrap();
        let heap = PHeap::open_or_create(dir.path(), small()).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        let n = audit_journal(&heap);
        assert!(n >= acked, "round {round}: {n} found, {acked} acknowledged");
        acked = n;
    }
}

/// Big strings and vectors in one transaction (a default-sized heap and
/// log): written whole, read back equal after a reopen; a big append to
/// a string is one write, not one per byte (4 MiB took seconds in a
/// debug build before), and an aborted one leaves the string as it was.
#[test]
fn big_strings_and_vectors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), Config { heap_len: 32 << 20, ..Config::default() }).unwrap();
    let big: String = (0..(4 << 20) / 4).map(|i| ['a', 'é', '€', '𝄞'][i % 4]).collect::<String>();
    heap.write(|tx| {
        let mut s = tx.root_or_insert_with("s", PString::new)?;
        s.push_str("head ")?;
        s.push_str(&big)?;
        tx.root_or_insert_with("v", PVec::<u64>::new)?.extend(0..500_000)?;
        let one = tx.new_string(&big)?;
        tx.root_or_insert_with("strings", PVec::<PString>::new)?.push(one)
    })
    .unwrap();
    let r: Result<(), Error> = heap.write(|tx| {
        tx.root_mut::<PString>("s")?.unwrap().push_str(&big)?;
        Err(Error::Config("changed my mind".into()))
    });
    assert!(r.is_err());
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), Config::default()).unwrap();
    heap.read(|r| {
        let s = r.root::<PString>("s").unwrap().unwrap();
        assert_eq!(s.len(), 5 + big.len());
        assert!(s.as_str().starts_with("head a") && s.as_str()[5..] == big);
        assert!(r.root::<PVec<u64>>("v").unwrap().unwrap().iter().copied().eq(0..500_000));
        assert_eq!(r.root::<PVec<PString>>("strings").unwrap().unwrap()[0].as_str(), big);
    });
    clean(&heap);
}

/// Writes that do not wait for the disk are still there after the heap
/// is dropped or closed without a crash (only a crash may lose them), and
/// a reopen with instant recovery finds the same.
#[test]
fn no_flush_writes_survive_a_drop_and_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    for i in 0..50 {
        heap.write_no_flush(|tx| append(tx, i)).unwrap();
    }
    drop(heap);
    let mut instant = small();
    instant.options.instant_recovery = true;
    let heap = PHeap::open_or_create(dir.path(), instant.clone()).unwrap();
    assert_eq!(audit_journal(&heap), 50);
    for i in 50..80 {
        heap.write_no_flush(|tx| append(tx, i)).unwrap();
    }
    heap.close().unwrap();
    let heap = PHeap::open_or_create(dir.path(), instant).unwrap();
    assert_eq!(audit_journal(&heap), 80);
}

/// Configurations no heap can have: typed errors at the first open (no
/// panic, no overflow), and the folder can then be opened with a good one.
#[test]
fn impossible_configurations_are_typed_errors() {
    let bad = [
        Config { base: Some(0), ..small() },
        Config { base: Some(1), ..small() },
        Config { base: Some(!0xfff), ..small() },
        Config { base: Some(0xffff_8000_0000_0000), ..small() },
        Config { base: Some(0x7fff_ffff_f000), ..small() },
        Config { heap_len: !0xfff, ..small() },
        Config { heap_len: 1 << 62, max_heap_len: 1 << 62, ..small() },
        Config { max_heap_len: u64::MAX, ..small() },
        Config { log_len: 0, ..small() },
        Config { log_len: 4096, ..small() },
        Config { log_len: u64::MAX, ..small() },
    ];
    for config in bad {
        let dir = tempfile::tempdir().unwrap();
        let shown = format!("{config:?}");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            PHeap::open_or_create(dir.path(), config).map(drop)
        }))
        .unwrap_or_else(|_| panic!("{shown}: panicked"));
        assert!(r.is_err(), "{shown}: opened");
        let heap = PHeap::open_or_create(dir.path(), small()).unwrap_or_else(|e| panic!("{shown}, then: {e:?}"));
        heap.write(|tx| tx.root_or_insert_with("n", || 1u64).map(drop)).unwrap();
        clean(&heap);
    }
}

/// The heap's `Rvm` (a safe accessor) used for every safe call a user
/// might try on it while the heap is open: unmapping its regions, closing
/// or deleting its segment, truncating, checkpointing, tracking its
/// regions. Each is refused with a typed error or harmless; the process
/// does not crash (it runs in a child), and the heap reopens sound.
#[test]
fn the_heaps_rvm_cannot_pull_the_heap_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child("rvm-calls", dir.path());
    let said: Vec<String> = child_lines(&mut child).iter().collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?} after {said:#?}");
    assert_eq!(said.last().map(String::as_str), Some("end"), "{said:#?}");
    for line in &said {
        assert!(!line.starts_with("unmap Ok") && !line.starts_with("close_segment Ok"), "{said:#?}");
        assert!(!line.starts_with("delete_segment Ok"), "{said:#?}");
    }
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert!(audit_journal(&heap) >= 2);
}
