//! What a user expects of the collections' API from the standard
//! library's: `Debug` prints contents (and a heap handle prints briefly),
//! the error type travels in `Box<dyn Error + Send + Sync>`.

use rvm_collections::{Config, Error, PBTreeMap, PBox, PHashMap, PHeap, PString, PVec, Persist};

fn small() -> Config {
    Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() }
}

#[derive(Persist, Debug)]
#[repr(C)]
struct Item {
    name: PString,
    tags: PVec<PString>,
    qty: u64,
}

/// `{:?}` of the collections prints what they hold, as `Vec`, `String`,
/// `HashMap`, `BTreeMap` and `Box` do (it printed lengths and capacities,
/// and a `PString` as `PString(PVec { len: 5, .. })`); a derived `Debug`
/// of a user's struct of them reads as the data.
#[test]
fn debug_prints_the_contents() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        tx.root_or_insert_with("v", PVec::<u64>::new)?.extend([1, 2, 3])?;
        tx.root_or_insert_with("s", PString::new)?.push_str("hé \"x\"")?;
        tx.root_or_insert_with("m", PHashMap::<u32, u64>::new)?.insert(7, 70)?;
        let mut b = tx.root_or_insert_with("b", PBTreeMap::<u32, u64>::new)?;
        b.insert(2, 20)?;
        b.insert(1, 10)?;
        drop(b);
        let name = tx.new_string("bolt")?;
        let tag = tx.new_string("m4")?;
        let mut item = tx.root_or_insert_with("item", || Item { name: PString::new(), tags: PVec::new(), qty: 3 })?;
        item.field_mut(|i| &i.name).push_str(&name)?;
        item.field_mut(|i| &i.tags).push(tag)?;
        drop(item);
        let boxed = tx.new_box(5u64)?;
        tx.root_or_insert_with("box", || Option::<PBox<u64>>::None)?.replace(boxed)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.read(|r| {
        assert_eq!(format!("{:?}", r.root::<PVec<u64>>("v").unwrap().unwrap()), "[1, 2, 3]");
        assert_eq!(format!("{:?}", r.root::<PString>("s").unwrap().unwrap()), format!("{:?}", "hé \"x\""));
        assert_eq!(format!("{:?}", r.root::<PHashMap<u32, u64>>("m").unwrap().unwrap()), "{7: 70}");
        assert_eq!(format!("{:?}", r.root::<PBTreeMap<u32, u64>>("b").unwrap().unwrap()), "{1: 10, 2: 20}");
        assert_eq!(
            format!("{:?}", r.root::<Item>("item").unwrap().unwrap()),
            r#"Item { name: "bolt", tags: ["m4"], qty: 3 }"#
        );
        assert_eq!(format!("{:?}", r.root::<Option<PBox<u64>>>("box").unwrap().unwrap()), "Some(5)");
        assert_eq!(format!("{:?}", PVec::<u64>::new()), "[]");
        assert_eq!(format!("{:?}", PString::new()), "\"\"");
    });
    // Inside a write too (the guard derefs to the value).
    heap.write(|tx| {
        let v = tx.root_mut::<PVec<u64>>("v")?.unwrap();
        assert_eq!(format!("{:?}", *v), "[1, 2, 3]");
        Ok::<_, Error>(())
    })
    .unwrap();
}

/// A heap handle prints its folder, base and log in a line, not the
/// allocator's and the instance's internals (several kilobytes before),
/// and printing it inside its own transaction does not wait for itself.
#[test]
fn a_heap_handle_prints_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let line = format!("{heap:?}");
    assert!(line.starts_with("PHeap { dir: "), "{line}");
    assert!(line.contains(&format!("{:#x}", heap.base())), "{line}");
    assert!(line.len() < 400, "{} bytes: {line}", line.len());
    let inside = heap.write(|_| Ok::<_, Error>(format!("{heap:?}"))).unwrap();
    assert_eq!(inside, line);
}

/// The typed layer's error is `Send + Sync + 'static`: `?` works into
/// `Box<dyn Error + Send + Sync>` and it crosses threads.
#[test]
fn the_error_type_boxes_and_crosses_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Error>();
    assert_send_sync::<PHeap>();
    fn run(dir: &std::path::Path) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
        let heap = PHeap::open_or_create(dir, small())?;
        let n = heap.read(|r| r.root::<u32>("n").map(|v| v.copied()));
        assert!(n.is_ok());
        // A closure transaction may return the boxed error too (undone on Err).
        let r: Result<(), Box<dyn std::error::Error + Send + Sync>> = heap.write(|tx| {
            *tx.root_or_insert_with("n", || 1u64)? += 1;
            Err("changed my mind".into())
        });
        assert_eq!(r.unwrap_err().to_string(), "changed my mind");
        heap.write(|tx| tx.root_or_insert_with("n", || 1u64).map(|_| ()))?;
        Ok(heap.read(|r| r.root::<u32>("n").map(|v| v.copied()))?.map_or(0, u64::from))
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let e = std::thread::spawn(move || run(&path).unwrap_err()).join().unwrap();
    let e = e.downcast::<Error>().expect("the typed layer's error");
    assert!(matches!(*e, Error::RootType { .. }), "{e:?}");
}

/// `retain` on the three collections, with plain values and with values
/// that own blocks: the kept entries are the model's, in order, the
/// dropped ones are freed (the check finds no unreachable block), and an
/// aborted `retain` leaves everything as it was.
#[test]
fn retain_keeps_what_the_closure_keeps_and_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let keep = |k: u64| k % 3 != 1 && !k.is_multiple_of(7);
    heap.write(|tx| {
        let mut v = tx.root_or_insert_with("v", PVec::<u64>::new)?;
        v.extend(0..500)?;
        drop(v);
        let mut vs = tx.root_or_insert_with("vs", PVec::<PString>::new)?;
        for i in 0..300u64 {
            vs.push(tx.new_string(&i.to_string())?)?;
        }
        drop(vs);
        let mut m = tx.root_or_insert_with("m", PHashMap::<u64, PVec<u64>>::new)?;
        for i in 0..300u64 {
            m.get_or_insert_with(i, PVec::new)?.extend([i, i + 1])?;
        }
        drop(m);
        let mut b = tx.root_or_insert_with("b", PBTreeMap::<u64, PString>::new)?;
        for i in 0..1000u64 {
            b.insert_owned(i, tx.new_string(&format!("v{i}"))?)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    // Aborted: nothing changes.
    let r = heap.write(|tx| {
        tx.root_mut::<PVec<u64>>("v")?.unwrap().retain(|_| false)?;
        tx.root_mut::<PBTreeMap<u64, PString>>("b")?.unwrap().retain(|_, _| false)?;
        Err::<(), _>(Error::Config("undo".into()))
    });
    assert!(r.is_err());
    heap.read(|r| {
        assert_eq!(r.root::<PVec<u64>>("v").unwrap().unwrap().len(), 500);
        assert_eq!(r.root::<PBTreeMap<u64, PString>>("b").unwrap().unwrap().len(), 1000);
    });
    heap.write(|tx| {
        let mut seen = Vec::new();
        tx.root_mut::<PVec<u64>>("v")?.unwrap().retain(|x| {
            seen.push(*x);
            keep(*x)
        })?;
        assert_eq!(seen, (0..500).collect::<Vec<_>>(), "each element seen once, in order");
        tx.root_mut::<PVec<PString>>("vs")?.unwrap().retain(|s| keep(s.parse().unwrap()))?;
        tx.root_mut::<PHashMap<u64, PVec<u64>>>("m")?.unwrap().retain(|k, v| keep(*k) && v[0] == *k)?;
        tx.root_mut::<PBTreeMap<u64, PString>>("b")?.unwrap().retain(|k, s| keep(*k) && *s == format!("v{k}"))?;
        // Keeping everything and nothing.
        let mut e = tx.root_or_insert_with("e", PVec::<u64>::new)?;
        e.retain(|_| false)?;
        e.extend([1, 2])?;
        e.retain(|_| true)?;
        assert_eq!(e.to_vec(), [1, 2]);
        e.retain(|_| false)?;
        assert!(e.is_empty());
        Ok::<_, Error>(())
    })
    .unwrap();
    drop(heap);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.read(|r| {
        let v = r.root::<PVec<u64>>("v").unwrap().unwrap();
        assert_eq!(v.to_vec(), (0..500).filter(|&k| keep(k)).collect::<Vec<_>>());
        let vs = r.root::<PVec<PString>>("vs").unwrap().unwrap();
        let want: Vec<String> = (0..300).filter(|&k| keep(k)).map(|k| k.to_string()).collect();
        assert_eq!(vs.iter().map(|s| s.to_string()).collect::<Vec<_>>(), want);
        let m = r.root::<PHashMap<u64, PVec<u64>>>("m").unwrap().unwrap();
        let mut keys: Vec<u64> = m.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, (0..300).filter(|&k| keep(k)).collect::<Vec<_>>());
        assert!(m.iter().all(|(k, v)| v.to_vec() == [*k, k + 1]));
        let b = r.root::<PBTreeMap<u64, PString>>("b").unwrap().unwrap();
        assert_eq!(b.keys().copied().collect::<Vec<_>>(), (0..1000).filter(|&k| keep(k)).collect::<Vec<_>>());
        assert!(b.iter().all(|(k, s)| *s == format!("v{k}")));
    });
    let report = heap.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// Strings and vectors compare as `String` and `Vec` do: with each other,
/// with the standard types, and (strings) in order and by hash.
#[test]
fn strings_and_vectors_compare_as_the_standard_ones() {
    use std::collections::HashSet;
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let mut names = tx.root_or_insert_with("names", PVec::<PString>::new)?;
        for n in ["pear", "apple", "pear", ""] {
            names.push(tx.new_string(n)?)?;
        }
        tx.root_or_insert_with("a", PVec::<u8>::new)?.extend_from_slice(b"xyz")?;
        tx.root_or_insert_with("b", PVec::<u8>::new)?.extend_from_slice(b"xyz")?;
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.read(|r| {
        let names = r.root::<PVec<PString>>("names").unwrap().unwrap();
        assert_eq!(names[0], names[2]);
        assert_ne!(names[0], names[1]);
        assert!(names[1] < names[0] && names[3] < names[1]);
        assert_eq!(names.iter().max().map(|s| s.as_str()), Some("pear"));
        assert_eq!(names[0], "pear".to_string());
        assert_eq!("pear".to_string(), names[0]);
        assert!("apple" == names[1] && names[1] == *"apple");
        let unique: HashSet<&PString> = names.iter().collect();
        assert_eq!(unique.len(), 3);
        let by_text: HashSet<&str> = names.iter().map(|s| s.as_ref()).collect();
        assert_eq!(by_text.len(), 3);
        let (a, b) = (r.root::<PVec<u8>>("a").unwrap().unwrap(), r.root::<PVec<u8>>("b").unwrap().unwrap());
        assert_eq!(a, b);
        assert_eq!(*a, *b"xyz");
        assert_eq!(*a, b"xyz".to_vec());
        assert_eq!(*a, &b"xyz"[..]);
        assert_ne!(*a, *b"xy");
        assert_eq!(PVec::<u8>::new(), PVec::<u8>::new());
        // A vector reads as a slice.
        assert!(a.contains(&b'y') && !a.contains(&b'q'));
        assert_eq!(a.windows(2).count(), 2);
        assert_eq!(&a[1..], b"yz");
        assert_eq!(a.iter().rev().copied().collect::<Vec<u8>>(), b"zyx");
        assert_eq!(names.iter().position(|s| *s == "apple"), Some(1));
        assert!(PVec::<u64>::new().is_empty());
    });
}

/// A `PBTreeMap`'s iterators run from both ends as `BTreeMap`'s do: over
/// random ranges of a tree three levels deep with nodes thinned by
/// removals and a stretch of leaves emptied, random mixes of `next` and `next_back` give the model's
/// entries, each once, and both ends stop where they meet.
#[test]
fn btree_iterators_run_from_both_ends() {
    use std::collections::BTreeMap;
    use std::ops::Bound;
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), Config { heap_len: 8 << 20, log_len: 16 << 20, ..small() }).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut model = BTreeMap::new();
    heap.write(|tx| {
        let mut m = tx.root_or_insert_with("m", PBTreeMap::<u32, u32>::new)?;
        for i in 0..40_000u32 {
            let k = i * 3;
            m.insert(k, i)?;
            model.insert(k, i);
        }
        // Thin some nodes out (removal rebalances lazily).
        for k in (30_000..60_000u32).step_by(3).filter(|k| k % 7 != 0) {
            m.remove(&k)?;
            model.remove(&k);
        }
        // Empty whole leaves (freed and unlinked from their parents).
        for k in (60_000..90_000u32).step_by(3) {
            m.remove(&k)?;
            model.remove(&k);
        }
        assert!(m.height() >= 2, "height {}", m.height());
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.read(|r| {
        let m = r.root::<PBTreeMap<u32, u32>>("m").unwrap().unwrap();
        let all: Vec<(u32, u32)> = m.iter().rev().map(|(k, v)| (*k, *v)).collect();
        let want: Vec<(u32, u32)> = model.iter().rev().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(all, want);
        assert_eq!(m.keys().next_back(), model.keys().next_back());
        assert_eq!(m.values().rev().nth(5), model.values().rev().nth(5));
        let bound = |x: u64| match x % 3 {
            0 => Bound::Included((x / 3 % 130_000) as u32),
            1 => Bound::Excluded((x / 3 % 130_000) as u32),
            _ => Bound::Unbounded,
        };
        for round in 0..300 {
            let (lo, hi) = (bound(rand()), bound(rand()));
            let valid = match (lo, hi) {
                (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
                    a < b || (a == b && matches!((lo, hi), (Bound::Included(_), Bound::Included(_))))
                }
                _ => true,
            };
            if !valid {
                // std panics on such a range; ours is empty both ways.
                assert_eq!(m.range((lo, hi)).next_back(), None, "{lo:?}..{hi:?}");
                continue;
            }
            let mut ours = m.range((lo, hi));
            let mut theirs = model.range((lo, hi));
            loop {
                let back = rand() % 2 == 0;
                let (a, b) = if back {
                    (ours.next_back().map(|(k, v)| (*k, *v)), theirs.next_back().map(|(k, v)| (*k, *v)))
                } else {
                    (ours.next().map(|(k, v)| (*k, *v)), theirs.next().map(|(k, v)| (*k, *v)))
                };
                assert_eq!(a, b, "round {round}, {lo:?}..{hi:?}, back {back}");
                if a.is_none() {
                    assert_eq!(ours.next(), None);
                    assert_eq!(ours.next_back(), None);
                    break;
                }
            }
        }
    });
    // An empty map, and one of one entry.
    heap.write(|tx| {
        let mut e = tx.root_or_insert_with("e", PBTreeMap::<u32, u32>::new)?;
        assert_eq!(e.iter().next_back(), None);
        e.insert(1, 10)?;
        let mut it = e.iter();
        assert_eq!(it.next_back(), Some((&1, &10)));
        assert_eq!((it.next(), it.next_back()), (None, None));
        Ok::<_, Error>(())
    })
    .unwrap();
}
