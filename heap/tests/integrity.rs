//! All persistent heap metadata is checked at load: damage to the header,
//! the counters or a root slot is a typed error from `PersistentHeap::open`
//! (and the heap check), never a heap that loads with a root renamed,
//! moved or missing; hostile values behind a valid checksum are errors, not
//! overflows; an older format version is refused.

mod common;

use common::Disk;
use rvm_core::{CommitMode, RestoreMode, Rvm};
use rvm_heap::layout::{RootSlot, COUNTERS_AT, HEADER_LEN, ROOT_SLOT, STATIC_FIXED};
use rvm_heap::{HeapError, PersistentHeap};
use std::alloc::Layout;

/// A heap with two roots and a few blocks, committed, truncated into the
/// segment and closed. Returns the disk and the roots' (name, address).
fn heap_with_roots() -> (Disk, Vec<(String, usize)>) {
    let disk = Disk::new(1 << 20, false);
    let (rvm, heap) = disk.open(true).unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let mut roots = Vec::new();
    for (i, name) in ["config", "index"].into_iter().enumerate() {
        let p = tx.malloc(Layout::from_size_align(100 + i * 50, 8).unwrap()).unwrap();
        tx.set_root(name, Some((p, 100, i as u64))).unwrap();
        roots.push((name.to_string(), p.as_ptr() as usize));
    }
    tx.malloc(Layout::new::<[u64; 9]>()).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    heap.close().unwrap();
    rvm.truncate().unwrap();
    rvm.close().unwrap();
    (disk, roots)
}

/// Opens the heap after damage: either an error that says corruption, or
/// (when the damage did not touch anything that matters) the same roots.
fn open_after_damage(disk: &Disk) -> Result<(Rvm, PersistentHeap), HeapError> {
    let rvm = Rvm::open_with(
        std::sync::Arc::new(disk.disk.clone()),
        std::path::Path::new("log"),
        rvm_core::Options::default(),
    )
    .unwrap();
    let heap = PersistentHeap::open(&rvm, "heap")?;
    Ok((rvm, heap))
}

fn expect_corrupted(disk: &Disk, what: &str, at: usize) {
    match open_after_damage(disk) {
        Ok((_rvm, heap)) => {
            let roots: Vec<_> = heap.roots().into_iter().map(|r| (r.name, r.ptr)).collect();
            panic!("damage at static offset {at} ({what}) loaded a heap with roots {roots:?}");
        }
        Err(e) => {
            assert!(e.is_corruption(), "damage at {at} ({what}): {e}");
            assert!(
                matches!(e, HeapError::Corrupted { .. } | HeapError::UnsupportedVersion { .. }),
                "damage at {at} ({what}): {e:?}"
            );
        }
    }
}

/// Every single-bit flip in the header, the counters and the used and
/// unused root slots, and zeroing a slot, fails the load: before the
/// checksums a flipped bit renamed a root (and `root_or_init` then made a
/// new, empty one), and a zeroed slot passed for an unused one.
#[test]
fn every_bit_of_the_static_metadata_is_checked() {
    let (disk, roots) = heap_with_roots();
    let s = disk.static_at();
    let pristine = disk.disk.durable_image("heap").unwrap();
    let mut flips = 0;
    // Header, counters, slots 0 and 1 (used) and 2 (unused).
    for at in 0..STATIC_FIXED + 3 * ROOT_SLOT {
        for bit in [0, 3, 7] {
            disk.damage(|img| img[s + at] ^= 1 << bit);
            expect_corrupted(&disk, "bit flip", at);
            disk.disk.set_durable_image("heap", pristine.clone());
            flips += 1;
        }
    }
    for slot in 0..3 {
        let at = STATIC_FIXED + slot * ROOT_SLOT;
        disk.damage(|img| img[s + at..s + at + ROOT_SLOT].fill(0));
        expect_corrupted(&disk, "zeroed root slot", at);
        disk.disk.set_durable_image("heap", pristine.clone());
    }
    // Slot 0 copied over slot 2 (a shifted write): the index is in the checksum.
    disk.damage(|img| {
        img.copy_within(s + STATIC_FIXED..s + STATIC_FIXED + ROOT_SLOT, s + STATIC_FIXED + 2 * ROOT_SLOT)
    });
    expect_corrupted(&disk, "root slot copied to another slot", STATIC_FIXED + 2 * ROOT_SLOT);
    disk.disk.set_durable_image("heap", pristine.clone());
    assert!(flips >= 900, "{flips} flips");
    // Undamaged, it loads with both roots.
    let (_rvm, heap) = open_after_damage(&disk).unwrap();
    let got: Vec<_> = heap.roots().into_iter().map(|r| (r.name, r.ptr.as_ptr() as usize)).collect();
    assert_eq!(got, roots);
    heap.check().unwrap();
}

fn nonce(disk: &Disk) -> u64 {
    let img = disk.disk.durable_image("heap").unwrap();
    let s = disk.static_at();
    u64::from_le_bytes(img[s + 40..s + 48].try_into().unwrap())
}

/// A root slot with a valid checksum but a hostile size or offset: before
/// the fix `HDR + size` overflowed (a panic in debug builds, a 2^64-byte
/// root accepted in release builds).
#[test]
fn hostile_root_sizes_behind_a_valid_checksum_are_errors() {
    let (disk, _) = heap_with_roots();
    let s = disk.static_at();
    let nonce = nonce(&disk);
    let pristine = disk.disk.durable_image("heap").unwrap();
    for (off, size) in [(0, u64::MAX), (0, u64::MAX - 15), (!15, 64), (0, 1 << 20), (1 << 40, 8)] {
        let slot = RootSlot { name: "config".into(), type_tag: 0, off, size };
        let b = RootSlot::encode(Some(&slot), nonce, 0);
        disk.damage(|img| img[s + STATIC_FIXED..s + STATIC_FIXED + ROOT_SLOT].copy_from_slice(&b));
        let e = open_after_damage(&disk).err().unwrap_or_else(|| panic!("off {off:#x} size {size:#x} accepted"));
        assert!(matches!(e, HeapError::Corrupted { .. }), "{e}");
        assert!(e.to_string().contains("root slot 0"), "{e}");
        disk.disk.set_durable_image("heap", pristine.clone());
    }
}

/// Counters with a valid checksum whose lifetime allocation count is at
/// the top of the range: the next allocation is an error, not an overflow.
#[test]
fn a_lifetime_counter_at_its_limit_is_an_error_not_an_overflow() {
    let (disk, _) = heap_with_roots();
    let s = disk.static_at();
    let nonce = nonce(&disk);
    let img = disk.disk.durable_image("heap").unwrap();
    let b: [u8; 64] = img[s + COUNTERS_AT..s + COUNTERS_AT + 64].try_into().unwrap();
    let mut c = rvm_heap::layout::Counters::decode(&b, nonce).unwrap();
    c.frees = u64::MAX - c.live_blocks;
    c.allocations = u64::MAX;
    disk.damage(|img| img[s + COUNTERS_AT..s + COUNTERS_AT + 64].copy_from_slice(&c.encode(nonce)));
    let (_rvm, heap) = open_after_damage(&disk).unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.malloc(Layout::new::<u64>()).unwrap();
    let e = tx.commit(CommitMode::Flush).unwrap_err();
    assert!(matches!(e, HeapError::Corrupted { .. }) && e.to_string().contains("overflow"), "{e}");
    heap.check().unwrap();
    assert_eq!(heap.stats().allocations, u64::MAX);
}

/// A heap of format version 1 is refused with a typed error, not misread.
#[test]
fn an_older_format_version_is_refused() {
    let (disk, _) = heap_with_roots();
    let s = disk.static_at();
    disk.damage(|img| {
        let h = &mut img[s..s + HEADER_LEN];
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&h[..48]);
        h[48..52].copy_from_slice(&crc.to_le_bytes());
    });
    let e = open_after_damage(&disk).expect_err("a version 1 heap is refused");
    assert!(matches!(e, HeapError::UnsupportedVersion { found: 1, supported: 2 }), "{e:?}");
    assert!(e.is_corruption());
    assert!(e.to_string().contains("version 1"), "{e}");
}
