//! The cargo-fuzz body (`rvm_loader::testing::fuzz_header`, also run by
//! `fuzz/fuzz_targets/load_map.rs`) over a small seed corpus, as an
//! ordinary test, so CI exercises it without nightly.
//!
//! The corpus is the files in `fuzz/seeds/load_map/` (the seeds below, and
//! any input the fuzzer ever found a problem with, kept as a regression)
//! plus the seeds below generated in code, plus every truncation and a few
//! byte flips of each. `RVM_FUZZ_WRITE_SEEDS=1` rewrites the generated
//! seeds into the folder (to start a fuzzing run from them).

use rvm_loader::testing::fuzz_header;
use rvm_loader::{CopyMode, LoadMap, RegionSpec};
use std::path::PathBuf;

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/load_map")
}

/// Named seeds: valid headers of several shapes, their text forms, and a
/// few classic bad inputs.
fn generated() -> Vec<(String, Vec<u8>)> {
    let one = LoadMap::with_page_size(4096).region(RegionSpec::new("heap", 4096, 1 << 20, 0x5a00_0000_0000));
    let three = LoadMap::with_page_size(4096)
        .region(RegionSpec::new("roots", 8192, 4096, 0x5a00_0000_0000))
        .region(RegionSpec::new("heap.main", 16384, 1 << 20, 0x5a00_4000_0000).copy(CopyMode::OnMap))
        .region(RegionSpec::new("scratch-1", 1 << 30, 65536, 0x1_0000).copy(CopyMode::NoCopy))
        .with_header_len(8192);
    let huge_pages =
        LoadMap::with_page_size(2 << 20).region(RegionSpec::new("big", 2 << 20, 4 << 20, 0x7000_0000_0000));
    let mut many = LoadMap::with_page_size(4096);
    for i in 0..60u64 {
        many.push(RegionSpec::new(format!("r{i}"), (i + 4) * 4096, 4096, 0x5b00_0000_0000 + i * 8192));
    }
    let empty = LoadMap::with_page_size(4096);
    let mut seeds = Vec::new();
    for (name, map) in
        [("one", &one), ("three", &three), ("huge_pages", &huge_pages), ("many", &many), ("empty", &empty)]
    {
        seeds.push((format!("{name}.bin"), map.encode()));
        seeds.push((format!("{name}.txt"), map.to_string().into_bytes()));
    }
    seeds.push(("blank.bin".into(), vec![0; 4096]));
    seeds.push((
        "spec_units.txt".into(),
        b"page_size = 4K\nheader_len=16K # room\nheap:16K:1G:0x5a00_0000_0000\nidx:0x40004000:64MiB:0x5a00_4000_0000:on-map\n"
            .to_vec(),
    ));
    seeds.push(("spec_bad.txt".into(), b"a:0:4K:0x10000\nb:4K\ncolour=3\n".to_vec()));
    seeds
}

/// Deterministic single-bit flips spread over the input.
fn flips(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if bytes.is_empty() {
        return out;
    }
    for k in 0..24usize {
        let at = (k * 7919 + k * k * 104_729) % bytes.len();
        let mut b = bytes.to_vec();
        b[at] ^= 1 << (k % 8);
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
    let mut from_files = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/load_map exists") {
        let entry = entry.unwrap();
        inputs.push((entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()));
        from_files += 1;
    }
    assert!(from_files >= generated().len(), "the seed folder {} lacks the generated seeds", dir.display());
    let mut runs = 0;
    for (name, bytes) in &inputs {
        let mut variants = vec![bytes.clone()];
        variants.extend((0..bytes.len().min(700)).map(|n| bytes[..n].to_vec()));
        variants.extend(flips(bytes));
        for v in variants {
            let r = std::panic::catch_unwind(|| fuzz_header(&v));
            assert!(r.is_ok(), "seed {name}: the fuzz body failed on {} bytes {:02x?}", v.len(), &v[..v.len().min(96)]);
            runs += 1;
        }
    }
    assert!(runs > 1000, "only {runs} inputs ran");
}
