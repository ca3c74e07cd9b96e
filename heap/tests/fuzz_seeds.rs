//! The cargo-fuzz body for heap images (`rvm_heap::testing::fuzz_heap_image`,
//! also run by `fuzz/fuzz_targets/heap_load.rs`) over a small seed corpus,
//! as an ordinary test, so CI exercises it without nightly.
//!
//! The corpus is the files in `fuzz/seeds/heap_load/` (the seeds below, and
//! any input the fuzzer ever found a problem with, kept as a regression)
//! plus the seeds below generated in code, plus a few truncations and byte
//! flips of each (with and without the reseal flag).
//! `RVM_FUZZ_WRITE_SEEDS=1` rewrites the generated seeds into the folder.

use rvm_core::{CommitMode, RestoreMode};
use rvm_heap::layout::{Counters, RootSlot, COUNTERS_AT, COUNTERS_LEN, STATIC_FIXED};
use rvm_heap::testing::{fuzz_heap_image, heap_image, RESEAL, STATIC_LEN};
use std::alloc::Layout;
use std::path::PathBuf;

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/heap_load")
}

fn populated() -> Vec<u8> {
    heap_image(|heap| {
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        let mut ptrs = Vec::new();
        for (i, size) in [8usize, 100, 700, 30, 1500, 64].into_iter().enumerate() {
            let p = tx.malloc(Layout::from_size_align(size, 1 << (i % 6)).unwrap()).unwrap();
            // SAFETY: the block is this transaction's alone.
            unsafe { tx.write(p, &vec![i as u8; size]).unwrap() };
            ptrs.push((p, size));
        }
        tx.set_root("config", Some((ptrs[1].0, 100, 7))).unwrap();
        tx.set_root("index", Some((ptrs[4].0, 1500, 8))).unwrap();
        tx.commit(CommitMode::Flush).unwrap();
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        tx.free(ptrs[0].0).unwrap();
        tx.free(ptrs[2].0).unwrap();
        tx.commit(CommitMode::Flush).unwrap();
    })
}

/// Byte `at` of the static area in an input.
fn s(at: usize) -> usize {
    1 + at
}

/// Named seeds: valid heaps and classic damage.
fn generated() -> Vec<(String, Vec<u8>)> {
    let empty = heap_image(|_| {});
    let full = populated();
    let nonce = u64::from_le_bytes(full[s(40)..s(48)].try_into().unwrap());
    let mut seeds = vec![("empty.bin".to_string(), empty.clone()), ("roots.bin".into(), full.clone())];
    let mut add = |name: &str, flags: u8, f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = full.clone();
        v[0] = flags;
        f(&mut v);
        seeds.push((name.into(), v));
    };
    add("root_name_flip.bin", 0, &|v| v[s(STATIC_FIXED + 2)] ^= 4);
    add("root_slot_zeroed.bin", 0, &|v| v[s(STATIC_FIXED)..s(STATIC_FIXED + 64)].fill(0));
    add("root_size_huge.bin", RESEAL, &|v| v[s(STATIC_FIXED + 56)..s(STATIC_FIXED + 64)].fill(0xff));
    add("root_size_huge_exact.bin", 0, &|v| {
        let slot = RootSlot { name: "config".into(), type_tag: 7, off: 0, size: u64::MAX - 15 };
        v[s(STATIC_FIXED)..s(STATIC_FIXED + 64)].copy_from_slice(&RootSlot::encode(Some(&slot), nonce, 0));
    });
    add("root_off_unaligned.bin", RESEAL, &|v| v[s(STATIC_FIXED + 48)] ^= 8);
    add("root_count_off.bin", RESEAL, &|v| v[s(COUNTERS_AT + 32)] ^= 1);
    add("counters_at_limit.bin", 0, &|v| {
        let b: [u8; COUNTERS_LEN] = v[s(COUNTERS_AT)..s(COUNTERS_AT + COUNTERS_LEN)].try_into().unwrap();
        let mut c = Counters::decode(&b, nonce).unwrap();
        c.frees = u64::MAX - c.live_blocks;
        c.allocations = u64::MAX;
        v[s(COUNTERS_AT)..s(COUNTERS_AT + COUNTERS_LEN)].copy_from_slice(&c.encode(nonce));
    });
    add("root_slots_many.bin", RESEAL, &|v| v[s(12)..s(16)].copy_from_slice(&u32::MAX.to_le_bytes()));
    add("heap_len_huge.bin", RESEAL, &|v| v[s(24)..s(32)].copy_from_slice(&(u64::MAX - 15).to_le_bytes()));
    add("version_1.bin", RESEAL, &|v| v[s(8)] = 1);
    add("block_header_flip.bin", 0, &|v| v[s(STATIC_LEN + 3)] ^= 0x40);
    // The 100-byte block at heap offset 32 (after the freed 32-byte one):
    // its tail guard starts at 32 + 16 + 100.
    add("tail_guard_flip.bin", 0, &|v| v[s(STATIC_LEN + 150)] ^= 1);
    add("heap_zeroed.bin", 0, &|v| v[s(STATIC_LEN)..].fill(0));
    add("truncated.bin", 0, &|v| v.truncate(100));
    seeds.push(("blank.bin".into(), vec![0; 1 + STATIC_LEN]));
    seeds.push(("flag_only.bin".into(), vec![RESEAL]));
    seeds
}

/// Deterministic single-bit flips, mostly in the static area's used part.
fn flips(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if bytes.len() < 2 {
        return out;
    }
    for k in 0..12usize {
        let span = if k % 3 == 0 { bytes.len() - 1 } else { (STATIC_FIXED + 3 * 64).min(bytes.len() - 1) };
        let at = 1 + (k * 7919 + k * k * 104_729) % span;
        let mut b = bytes.to_vec();
        b[at] ^= 1 << (k % 8);
        b[0] = (k % 2) as u8;
        out.push(b);
    }
    out
}

#[test]
fn fuzz_body_over_the_seed_corpus() {
    let dir = seed_dir();
    if std::env::var("RVM_FUZZ_WRITE_SEEDS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in generated() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut inputs = generated();
    // The valid images load (and go through the transactions); damage does not.
    for (name, bytes) in &inputs {
        let want = matches!(name.as_str(), "empty.bin" | "roots.bin" | "counters_at_limit.bin");
        assert_eq!(fuzz_heap_image(bytes), want, "seed {name}");
    }
    let mut from_files = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/heap_load exists") {
        let entry = entry.unwrap();
        inputs.push((entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()));
        from_files += 1;
    }
    assert!(from_files >= generated().len(), "the seed folder {} lacks the generated seeds", dir.display());
    let mut runs = 0;
    for (name, bytes) in &inputs {
        let mut variants = vec![bytes.clone()];
        for n in [1usize, 49, 129, 1 + STATIC_LEN, 1 + STATIC_LEN + 100] {
            variants.push(bytes[..n.min(bytes.len())].to_vec());
        }
        variants.extend(flips(bytes));
        for v in variants {
            let r = std::panic::catch_unwind(|| {
                fuzz_heap_image(&v);
            });
            assert!(r.is_ok(), "seed {name}: the fuzz body failed on {} bytes", v.len());
            runs += 1;
        }
    }
    assert!(runs > 300, "only {runs} inputs ran");
}
