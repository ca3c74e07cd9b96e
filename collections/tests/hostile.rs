//! Hostile heap files through the safe typed API: bytes of a closed heap
//! file changed behind the library's back, then the heap opened and used
//! with safe calls only. Every case must end in a typed error or a
//! refusal (or, for damage to plain data bytes, wrong values), never in
//! undefined behaviour, a crash, a panic or an endless loop.

use rvm_collections::{Config, Error, PBTreeMap, PBox, PHashMap, PHeap, PString, PVec, Persist};
use std::path::Path;

fn small() -> Config {
    Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() }
}

/// Replaces the one occurrence of `from` in the closed heap file of `dir`
/// by `to` (same length).
fn patch(dir: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let path = dir.join(rvm_collections::HEAP_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let hits: Vec<usize> = bytes.windows(from.len()).enumerate().filter(|(_, w)| *w == from).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "the pattern must occur once");
    bytes[hits[0]..hits[0] + to.len()].copy_from_slice(to);
    std::fs::write(&path, bytes).unwrap();
}

/// The three header words of a `PVec` root (pointer, length, capacity),
/// as stored.
fn vec_header(heap: &PHeap, name: &str) -> Vec<u8> {
    // SAFETY: inspection only: no transaction runs while the bytes are read.
    let root = unsafe { heap.raw_heap() }.root(name).unwrap();
    // SAFETY: the root's block holds a `PVec` header (24 bytes).
    unsafe { std::slice::from_raw_parts(root.ptr.as_ptr(), 24) }.to_vec()
}

/// Two roots whose vectors share one buffer (one root's header copied
/// over the other's in the file): each root alone looks sound, together
/// they own a block twice. Before the fix both were accepted, and once one
/// grew (its old buffer freed) and the block was reused, reading the
/// other followed garbage pointers: a segfault from safe calls. Now both
/// are refused.
#[test]
fn two_roots_sharing_a_buffer_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let mut a = tx.root_or_insert_with("a", PVec::<PVec<u64>>::new)?;
        a.reserve(4)?;
        a.push(PVec::<u64>::new())?;
        let mut b = tx.root_or_insert_with("b", PVec::<PVec<u64>>::new)?;
        b.reserve(5)?;
        b.push(PVec::<u64>::new())?;
        Ok::<_, Error>(())
    })
    .unwrap();
    let (ha, hb) = (vec_header(&heap, "a"), vec_header(&heap, "b"));
    heap.close().unwrap();
    patch(dir.path(), &hb, &ha);
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let r = heap.read(|r| r.root::<PVec<PVec<u64>>>("a").map(|a| a.map(|a| a.len())));
    assert!(matches!(r, Err(Error::Damaged { .. })), "{r:?}");
    // What crashed before: grow one, reuse its old buffer, read the other.
    let _ = heap.write(|tx| tx.root_mut::<PVec<PVec<u64>>>("a")?.unwrap().reserve(100));
    heap.write(|tx| {
        let mut c = tx.root_or_insert_with("c", PVec::<u64>::new)?;
        c.reserve(12)?;
        c.extend([0x4141_4141_4141_4000, 1 << 40, 1 << 40, 0x4141_4141_4141_4000, 1 << 40, 1 << 40])
    })
    .unwrap();
    for name in ["a", "b"] {
        let r =
            heap.read(|r| r.root::<PVec<PVec<u64>>>(name).map(|v| v.map(|v| v.iter().map(|v| v.len()).sum::<usize>())));
        assert!(matches!(r, Err(Error::Damaged { .. })), "{name}: {r:?}");
        let r = heap.write(|tx| tx.root_mut::<PVec<PVec<u64>>>(name).map(|_| ()));
        assert!(matches!(r, Err(Error::Damaged { .. })), "{name}: {r:?}");
    }
    // The check names both.
    let report = heap.check().unwrap();
    let mut damaged: Vec<_> = report.reachability.damaged_roots.iter().map(|(n, _)| n.as_str()).collect();
    damaged.sort_unstable();
    assert_eq!(damaged, ["a", "b"]);
    // The sound root is untouched.
    assert_eq!(heap.read(|r| r.root::<PVec<u64>>("c").unwrap().unwrap().len()), 6);
}

/// A root whose box was damaged to point at another root's block: alone
/// it traces (a live block of the right size), but dropping its value
/// would free the other root's block under it. Refused.
#[test]
fn a_value_pointing_at_another_roots_block_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        tx.root_or_insert_with("v", PVec::<u64>::new)?.extend([1, 2, 3])?;
        let b = tx.new_box(0x5eed_u64)?;
        tx.root_or_insert_with("p", || None::<PBox<u64>>)?.replace(b)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    // SAFETY: inspection only: no transaction runs meanwhile.
    let raw = unsafe { heap.raw_heap() };
    let v_block = raw.root("v").unwrap().ptr.as_ptr() as u64;
    // SAFETY: the root "p" holds one word, its box's address.
    let boxed = unsafe { raw.root("p").unwrap().ptr.cast::<u64>().read() };
    heap.close().unwrap();
    patch(dir.path(), &boxed.to_ne_bytes(), &v_block.to_ne_bytes());
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let r = heap.write(|tx| {
        // Dropping the box would free the vector's block.
        drop(tx.root_mut::<Option<PBox<u64>>>("p")?.unwrap().take()?);
        Ok::<_, Error>(())
    });
    assert!(matches!(r, Err(Error::Damaged { .. })), "{r:?}");
    assert_eq!(heap.read(|r| r.root::<PVec<u64>>("v").unwrap().unwrap().to_vec()), [1, 2, 3]);
    assert!(!heap.check().unwrap().is_clean());
}

/// A record that owns blocks of every kind (a string, a vector, a box).
#[derive(Persist)]
#[repr(C)]
struct Rec {
    id: u64,
    name: PString,
    tags: PVec<u32>,
    next: Option<PBox<Rec>>,
}

/// A closed heap file holding one root of every collection type, nested,
/// with the file offsets and lengths of its live blocks' data and their
/// addresses.
fn pristine() -> (Vec<u8>, Vec<(usize, usize)>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        tx.root_or_insert_with("v", PVec::<u64>::new)?.extend(0..200)?;
        tx.root_or_insert_with("s", PString::new)?.push_str("héllo, wörld: a string of some length")?;
        let mut h = tx.root_or_insert_with("h", PHashMap::<u64, PString>::new)?;
        for i in 0..40u64 {
            h.insert_owned(i, tx.new_string(&format!("value {i}"))?)?;
        }
        drop(h);
        let mut t = tx.root_or_insert_with("t", PBTreeMap::<u64, PVec<u64>>::new)?;
        for i in 0..100u64 {
            t.insert_owned(i * 3, PVec::new())?;
            t.get_mut(&(i * 3))?.unwrap().extend([i, i + 1])?;
        }
        drop(t);
        let mut r =
            tx.root_or_insert_with("r", || Rec { id: 1, name: PString::new(), tags: PVec::new(), next: None })?;
        r.field_mut(|r| &r.name).push_str("first")?;
        r.field_mut(|r| &r.tags).extend([1, 2, 3])?;
        let second = tx.new_box(Rec { id: 2, name: PString::new(), tags: PVec::new(), next: None })?;
        r.field_mut(|r| &r.next).replace(second)?;
        *tx.root_or_insert_with("n", || 0u64)? += 1;
        Ok::<_, Error>(())
    })
    .unwrap();
    // SAFETY: inspection only: no transaction runs meanwhile.
    let raw = unsafe { heap.raw_heap() };
    let blocks = raw.live_blocks().unwrap();
    // SAFETY: the root "v" holds a `PVec<u64>` whose first word is its
    // buffer's address (holding 0, 1, 2...).
    let v_buf = unsafe { raw.root("v").unwrap().ptr.cast::<u64>().read() } as usize;
    heap.close().unwrap();
    let bytes = std::fs::read(dir.path().join(rvm_collections::HEAP_FILE)).unwrap();
    // Where the heap's addresses lie in the file: find the vector's 5, 6, 7.
    let pattern: Vec<u8> = [5u64, 6, 7].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let at = bytes.windows(24).position(|w| w == pattern).unwrap();
    let delta = at as isize - (v_buf + 40) as isize;
    let ranges = blocks.iter().map(|&(p, len)| ((p.as_ptr() as isize + delta) as usize, len as usize)).collect();
    (bytes, ranges, blocks.iter().map(|&(p, _)| p.as_ptr() as u64).collect())
}

/// A sum that wraps (damaged numbers may be anything).
fn wsum(items: impl Iterator<Item = u64>) -> u64 {
    items.fold(0, u64::wrapping_add)
}

/// Every safe call a user might make on the heap: reads of every root,
/// then changes to each (each in its own transaction: an error of one
/// must not hide the others), then the check. Errors are fine; the point
/// is that nothing crashes, panics or hangs.
fn exercise(heap: &PHeap) {
    type Tree = PBTreeMap<u64, PVec<u64>>;
    let _ = heap.check();
    heap.read(|r| {
        if let Ok(Some(v)) = r.root::<PVec<u64>>("v") {
            let _ = (v.len(), wsum(v.iter().copied()), v.get(5).copied(), v.last().copied());
        }
        if let Ok(Some(s)) = r.root::<PString>("s") {
            let _ = (s.as_str().chars().count(), s.len());
        }
        if let Ok(Some(h)) = r.root::<PHashMap<u64, PString>>("h") {
            let _ = wsum(h.iter().map(|(k, v)| k.wrapping_add(v.len() as u64)));
            let _ = (0..50).filter(|k| h.get(k).is_some()).count();
        }
        if let Ok(Some(t)) = r.root::<Tree>("t") {
            let _ = wsum(t.iter().map(|(k, v)| k.wrapping_add(wsum(v.iter().copied()))));
            let _ = (t.range(10..40).count(), t.get(&9).map(|v| v.len()), t.first_key_value().map(|(k, _)| *k));
            let _ = (t.range(50..).count(), t.range(..=20).count(), t.last_key_value().map(|(k, _)| *k));
        }
        if let Ok(Some(rec)) = r.root::<Rec>("r") {
            let mut at = Some(rec);
            let mut n = 0;
            while let Some(x) = at {
                let _ = (x.id, x.name.as_str().len(), wsum(x.tags.iter().map(|&t| u64::from(t))));
                at = x.next.as_deref();
                n += 1;
                assert!(n < 10, "a list longer than made: a cycle was followed");
            }
        }
        let _ = r.root::<u64>("n").map(|n| n.copied());
    });
    let _ = heap.write(|tx| {
        let mut v = tx.root_mut::<PVec<u64>>("v")?.ok_or(Error::Config("gone".into()))?;
        v.push(7)?;
        // Indices within the length (out of bounds is a documented panic).
        if v.len() > 3 {
            v.remove(3)?;
        }
        v.insert(1, 9)?;
        v.reserve(1000)?;
        v.truncate(10)?;
        Ok::<_, Error>(())
    });
    let _ = heap.write(|tx| {
        let mut s = tx.root_mut::<PString>("s")?.ok_or(Error::Config("gone".into()))?;
        s.push_str("!")?;
        s.pop()?;
        Ok::<_, Error>(())
    });
    let _ = heap.write(|tx| {
        let mut h = tx.root_mut::<PHashMap<u64, PString>>("h")?.ok_or(Error::Config("gone".into()))?;
        for k in [3u64, 500] {
            h.get_or_insert_with(k, PString::new)?.push_str("+")?;
            if let Some(mut v) = h.get_mut(&(k + 1))? {
                v.push('!')?;
            }
        }
        for k in 0..60u64 {
            if k % 2 == 0 {
                drop(h.remove_owned(&k)?);
            } else {
                drop(h.insert_owned(k + 100, tx.new_string("new")?)?);
            }
        }
        Ok::<_, Error>(())
    });
    let _ = heap.write(|tx| {
        let mut t = tx.root_mut::<Tree>("t")?.ok_or(Error::Config("gone".into()))?;
        for k in 0..120u64 {
            if k % 2 == 0 {
                drop(t.remove_owned(&k)?);
            } else {
                drop(t.insert_owned(k + 1000, PVec::new())?);
            }
        }
        drop(t.pop_first_owned()?);
        drop(t.pop_last_owned()?);
        t.get_or_insert_with(7, PVec::new)?.push(1)?;
        if let Some(mut v) = t.get_mut(&9)? {
            v.extend([1, 2, 3])?;
        }
        Ok::<_, Error>(())
    });
    let _ = heap.write(|tx| {
        let mut r = tx.root_mut::<Rec>("r")?.ok_or(Error::Config("gone".into()))?;
        r.field_mut(|r| &r.tags).push(4)?;
        drop(r.field_mut(|r| &r.next).take()?);
        Ok::<_, Error>(())
    });
    let _ = heap.write(|tx| {
        for name in ["v", "s", "n"] {
            let _ = tx.remove_root::<PVec<u64>>(name);
        }
        let _ = tx.remove_root::<Tree>("t")?;
        Ok::<_, Error>(())
    });
    let _ = heap.check();
}

/// The undamaged file: every root is sound, every change commits, and the
/// check is clean (no false alarm from the checks the damage tests rely
/// on).
fn undamaged_passes(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(rvm_collections::HEAP_FILE), bytes).unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        // First borrows inside a write transaction that has made blocks.
        tx.root_mut::<PVec<u64>>("v")?.unwrap().reserve(500)?;
        let s = tx.new_string("fresh")?;
        tx.root_mut::<PHashMap<u64, PString>>("h")?.unwrap().insert_owned(1000, s)?;
        assert_eq!(tx.root::<PBTreeMap<u64, PVec<u64>>>("t")?.unwrap().len(), 100);
        assert_eq!(tx.root::<Rec>("r")?.unwrap().next.as_deref().map(|r| r.id), Some(2));
        assert_eq!(tx.root::<PString>("s")?.unwrap().len(), 39);
        Ok::<_, Error>(())
    })
    .unwrap();
    exercise(&heap);
    assert!(heap.check().unwrap().is_clean());
}

/// Opens a copy of the heap file with `bytes` in a new folder and
/// exercises it, on a thread with a deadline (an endless loop fails).
fn try_damaged(bytes: Vec<u8>, what: &str) {
    let what = what.to_owned();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(rvm_collections::HEAP_FILE), bytes).unwrap();
        if let Ok(heap) = PHeap::open_or_create(dir.path(), small()) {
            exercise(&heap);
            let _ = heap.close();
        }
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(()) => worker.join().unwrap_or_else(|_| panic!("{what}: a panic")),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let _ = worker.join();
            panic!("{what}: a panic");
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no end after 60 s"),
    }
}

/// Seeded damage to a heap file holding every collection type: single
/// bit flips and random bytes at offsets that hold something (the
/// headers, the heap's metadata, the values), then every safe call.
/// `RVM_DEEP_TESTS=1` runs 1,500 cases instead of 60.
#[test]
fn flipped_bytes_of_a_heap_file_never_crash_the_safe_api() {
    use proptest::prelude::Rng as _;
    use proptest::test_runner::{RngAlgorithm, TestRng};
    let deep = std::env::var("RVM_DEEP_TESTS").is_ok_and(|v| v == "1");
    let cases = if deep { 1500 } else { 60 };
    let (good, _, _) = pristine();
    undamaged_passes(&good);
    let nonzero: Vec<usize> = (0..good.len()).filter(|&i| good[i] != 0).collect();
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    for case in 0..cases {
        let mut bytes = good.clone();
        let flips = 1 + rng.next_u64() % 3;
        let mut what = format!("case {case}:");
        for _ in 0..flips {
            let at = if rng.next_u64().is_multiple_of(8) {
                (rng.next_u64() % good.len() as u64) as usize
            } else {
                nonzero[(rng.next_u64() % nonzero.len() as u64) as usize]
            };
            if rng.next_u64().is_multiple_of(2) {
                bytes[at] ^= 1 << (rng.next_u64() % 8);
            } else {
                bytes[at] = rng.next_u64() as u8;
            }
            what.push_str(&format!(" byte {at:#x} -> {:#04x}", bytes[at]));
        }
        try_damaged(bytes, &what);
    }
}

/// Seeded damage to the words of the values themselves (pointers, lengths,
/// capacities, control bytes, node headers: bytes no checksum covers),
/// set to values chosen to hurt (zero, one, huge, a neighbour of the old
/// value, another block's address), then every safe call.
/// `RVM_DEEP_TESTS=1` runs 3,000 cases instead of 100.
#[test]
fn damaged_value_words_never_crash_the_safe_api() {
    use proptest::prelude::Rng as _;
    use proptest::test_runner::{RngAlgorithm, TestRng};
    let deep = std::env::var("RVM_DEEP_TESTS").is_ok_and(|v| v == "1");
    let cases = if deep { 3000 } else { 100 };
    let (good, ranges, blocks) = pristine();
    // Every 8-byte word of every live block's data.
    let words: Vec<usize> = ranges.iter().flat_map(|&(off, len)| (0..len / 8).map(move |i| off + 8 * i)).collect();
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    for case in 0..cases {
        let mut bytes = good.clone();
        let mut what = format!("case {case}:");
        for _ in 0..1 + rng.next_u64() % 2 {
            let at = words[(rng.next_u64() % words.len() as u64) as usize];
            let old = u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
            let other = blocks[(rng.next_u64() % blocks.len() as u64) as usize];
            let new = match rng.next_u64() % 10 {
                0 => 0,
                1 => 1,
                2 => u64::MAX,
                3 => 1 << (rng.next_u64() % 64),
                4 => old ^ (1 << (rng.next_u64() % 64)),
                5 => old.wrapping_add(16),
                6 => old.wrapping_sub(16),
                7 => other,
                8 => other + 8 * (rng.next_u64() % 4),
                _ => old.wrapping_add(1 + rng.next_u64() % 300),
            };
            bytes[at..at + 8].copy_from_slice(&new.to_ne_bytes());
            what.push_str(&format!(" word {at:#x}: {old:#x} -> {new:#x}"));
        }
        try_damaged(bytes, &what);
    }
}

/// A root whose box was damaged to point at a block that is free in the
/// file. A write transaction allocates that block for a new value, then
/// borrows the damaged root for the first time: the block is live for the
/// transaction, so the root's check alone passed, and once the new value
/// was stored in another root the two shared it. A root not yet checked
/// must reach committed blocks only: refused.
#[test]
fn a_root_pointing_at_a_block_the_transaction_just_made_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        tx.root_or_insert_with("a", PVec::<PBox<u64>>::new)?.reserve(4)?;
        let b = tx.new_box(1u64)?;
        tx.root_or_insert_with("c", || None::<PBox<u64>>)?.replace(b)?;
        let t = tx.new_box(2u64)?;
        tx.root_or_insert_with("tmp", || None::<PBox<u64>>)?.replace(t)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    // SAFETY: inspection only: no transaction runs meanwhile.
    let raw = unsafe { heap.raw_heap() };
    // SAFETY: the roots hold one word each, their box's address.
    let (c_box, freed) =
        unsafe { (raw.root("c").unwrap().ptr.cast::<u64>().read(), raw.root("tmp").unwrap().ptr.cast::<u64>().read()) };
    heap.write(|tx| tx.root_mut::<Option<PBox<u64>>>("tmp")?.unwrap().take().map(drop)).unwrap();
    heap.close().unwrap();
    // The box of "c" now points at the free block the dropped box left.
    patch(dir.path(), &c_box.to_ne_bytes(), &freed.to_ne_bytes());
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let r = heap.write(|tx| {
        let b = tx.new_box(3u64)?;
        assert_eq!(&**b as *const u64 as u64, freed, "the new box takes the freed block");
        tx.root_mut::<PVec<PBox<u64>>>("a")?.unwrap().push(b)?;
        let c = tx.root::<Option<PBox<u64>>>("c")?.unwrap();
        Ok::<_, Error>(c.as_deref().copied())
    });
    assert!(matches!(r, Err(Error::Damaged { .. })), "{r:?}");
    // Also in a transaction of its own, after the block was stored.
    heap.write(|tx| tx.root_mut::<PVec<PBox<u64>>>("a")?.unwrap().push(tx.new_box(3u64)?)).unwrap();
    let r = heap.read(|r| r.root::<Option<PBox<u64>>>("c").map(|c| c.map(|c| c.as_deref().copied())));
    assert!(matches!(r, Err(Error::Damaged { .. })), "{r:?}");
}

/// The heap file's load map rewritten (a valid checksum: forged, not
/// flipped) to place the heap where it must not go: over memory this
/// process uses, over its own static region, past the end of the file,
/// with an extra region. Each open is refused with the loader's error, and
/// the process's memory there is untouched (a fixed mapping must never
/// replace what is mapped).
#[test]
fn a_forged_load_map_is_refused_and_clobbers_nothing() {
    use rvm_loader::{LoadMap, RegionSpec};
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.extend(0..10)).unwrap();
    heap.close().unwrap();
    let path = dir.path().join(rvm_collections::HEAP_FILE);
    let good = std::fs::read(&path).unwrap();
    let map = LoadMap::decode(&good).unwrap();
    let (stat, heap_r) = (map.regions()[0].clone(), map.regions()[1].clone());
    // Memory this process uses: a buffer of its own, four pages aligned.
    let mut mine = vec![0x5au8; 64 << 10];
    let inside = (mine.as_ptr() as u64).next_multiple_of(16 << 10);
    let rebuilt = |regions: Vec<RegionSpec>| {
        let mut m = LoadMap::with_page_size(map.page_size()).with_header_len(map.header_len());
        for r in regions {
            m.push(r);
        }
        m
    };
    let with = |r: &RegionSpec, offset: u64, len: u64, base: u64| {
        RegionSpec::new(r.name.clone(), offset, len, base).copy(r.copy).max_len(r.max_len)
    };
    let forged = [
        (
            "static region over this process's memory",
            rebuilt(vec![with(&stat, stat.offset, stat.len, inside), heap_r.clone()]),
        ),
        (
            "heap region over this process's memory",
            rebuilt(vec![stat.clone(), RegionSpec::new(heap_r.name.clone(), heap_r.offset, heap_r.len, inside)]),
        ),
        (
            "heap over the static region",
            rebuilt(vec![stat.clone(), with(&heap_r, heap_r.offset, heap_r.len, stat.base)]),
        ),
        (
            "heap past the end of the file",
            rebuilt(vec![stat.clone(), with(&heap_r, heap_r.offset, heap_r.len << 4, heap_r.base)]),
        ),
        (
            "an extra region over the heap's bytes",
            rebuilt(vec![
                stat.clone(),
                heap_r.clone(),
                RegionSpec::new("extra", heap_r.offset, 4096, 0x5e00_0000_0000),
            ]),
        ),
        ("no heap region", rebuilt(vec![stat.clone()])),
    ];
    for (what, m) in forged {
        let mut bytes = good.clone();
        let header = m.encode();
        bytes[..header.len()].copy_from_slice(&header);
        std::fs::write(&path, &bytes).unwrap();
        let r = PHeap::open_or_create(dir.path(), small());
        assert!(r.is_err(), "{what}: opened");
        assert!(mine.iter().all(|&b| b == 0x5a), "{what}: this process's memory was overwritten");
    }
    mine[0] = 0;
    // The real map still opens, with everything.
    std::fs::write(&path, &good).unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(heap.read(|r| r.root::<PVec<u64>>("v").unwrap().unwrap().to_vec()), (0..10).collect::<Vec<_>>());
}
