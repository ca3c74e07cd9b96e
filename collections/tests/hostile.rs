//! Hostile heap files through the safe typed API: bytes of a closed heap
//! file changed behind the library's back, then the heap opened and used
//! with safe calls only. Every case must end in a typed error or a
//! refusal (or, for damage to plain data bytes, wrong values), never in
//! undefined behaviour, a crash, a panic or an endless loop.

use rvm_collections::{Config, Error, PBox, PHeap, PVec};
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
