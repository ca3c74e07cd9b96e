//! The cargo-fuzz body for the log scanner and recovery
//! (`rvm_core::testing::fuzz_log_image`, also run by
//! `fuzz/fuzz_targets/log_scan.rs`) over a small seed corpus, as an
//! ordinary test, so CI exercises it without nightly.
//!
//! The corpus is the files in `fuzz/seeds/log_scan/` (the seeds below, and
//! any input the fuzzer ever found a problem with, kept as a regression)
//! plus the seeds below generated in code, plus a few truncations and bit
//! flips of each. `RVM_FUZZ_WRITE_SEEDS=1` rewrites the generated seeds
//! into the folder.

use rvm_core::log::format::{FrameKind, FLAG_COMMIT};
use rvm_core::log::inspect::FrameBody;
use rvm_core::testing::{
    fuzz_log_image, log_template, LogEdit, LogOutcome, LogTemplate, Refusal, Target, RESEAL, WRAPPED,
};
use std::path::PathBuf;

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/log_scan")
}

/// Record-area offset (from the head) of byte `at` of the record holding
/// item `i`.
fn frame_at(t: &LogTemplate, i: usize, at: u64) -> u32 {
    (t.frames[i].lsn - t.head + at) as u32
}

/// The template's byte at record-area offset `off`.
fn byte_at(t: &LogTemplate, off: u32) -> u8 {
    t.log[t.device_offset(t.head + u64::from(off))]
}

/// The template's byte at record-area offset `off`, with `mask` flipped.
fn flipped(t: &LogTemplate, off: u32, mask: u8) -> [u8; 1] {
    [t.log[t.device_offset(t.head + u64::from(off))] ^ mask]
}

/// An edit of record-area bytes.
fn area(off: u32, bytes: &[u8]) -> LogEdit {
    LogEdit::new(Target::Area, off, bytes)
}

/// The same edit of both status slots.
fn both_slots(off: u32, bytes: &[u8]) -> [LogEdit; 2] {
    [LogEdit::new(Target::Slot0, off, bytes), LogEdit::new(Target::Slot1, off, bytes)]
}

/// Named seeds with the outcome each must have.
fn generated() -> Vec<(&'static str, Vec<u8>, LogOutcome)> {
    let t = log_template(false);
    let w = log_template(true);
    assert_eq!(t.frames.len(), 9);
    let (range0, commit0, range2) = (0, 1, 2);
    assert_eq!(t.frames[range0].kind(), FrameKind::Range);
    assert_eq!(t.frames[commit0].kind(), FrameKind::Commit);
    let last_commit = 8;
    // The record that runs across the end of the ring in the wrapped log.
    let straddling = (0..w.frames.len())
        .find(|&i| (w.frames[i].lsn + u64::from(w.frames[i].len)) % w.area_len < w.frames[i].lsn % w.area_len)
        .expect("a frame runs across the end of the ring");
    let before_straddle = w.frames[..straddling].iter().filter(|f| f.kind() == FrameKind::Commit).count() as u64;
    let ok = |n: u64| LogOutcome { scanned: Some(n), damaged: false, strict: Ok(n), salvaged: Ok(n) };
    let damaged = |n: u64, salvaged: u64| LogOutcome {
        scanned: Some(n),
        damaged: true,
        strict: Err(Refusal::Corrupted),
        salvaged: Ok(salvaged),
    };
    let refused = |scanned: Option<u64>, kind: Refusal| LogOutcome {
        scanned,
        damaged: false,
        strict: Err(kind),
        salvaged: Err(kind),
    };
    let next_epoch = (t.epoch + 1).to_le_bytes();
    let head2 = t.frames[2].lsn.to_le_bytes();
    // Record 1 (at the head): CRC [0..4), length u24 [4..7), tag [7],
    // flags [8], then its range: control [9], segment [10], offset delta
    // [11], "alpha" [12..17), end of ranges [17], commit trailer.
    let rec1_len = u32::from_le_bytes([byte_at(t, 4), byte_at(t, 5), byte_at(t, 6), 0]);
    let tag = byte_at(t, 7);
    // Record 3: 3000 bytes at 8192 (control in two bytes [9..11), segment
    // [11], offset delta zigzag(8192) in three bytes [12..15)); 16380 is
    // three bytes too.
    let rec3 = 5;
    let enc = LogEdit::encode;
    vec![
        ("clean.bin", enc(0, &[]), ok(4)),
        ("clean_wrapped.bin", enc(WRAPPED, &[]), ok(4)),
        ("empty.bin", Vec::new(), ok(4)),
        // Data of the first range flipped: synced records follow it.
        ("frame_data_flip.bin", enc(0, &[area(13, &flipped(t, 13, 4))]), damaged(0, 0)),
        // The last record flipped: the status says it was synced.
        (
            "last_commit_flip.bin",
            enc(0, &[area(frame_at(t, last_commit, 9), &flipped(t, frame_at(t, last_commit, 9), 1))]),
            damaged(3, 3),
        ),
        // The same after a crash: a torn end, not damage.
        (
            "wrapped_torn_tail.bin",
            enc(WRAPPED, &[area(frame_at(w, last_commit, 9), &flipped(w, frame_at(w, last_commit, 9), 1))]),
            ok(3),
        ),
        // The record across the end of the ring flipped: later commits say
        // it was synced.
        (
            "wrapped_straddle_flip.bin",
            enc(WRAPPED, &[area(frame_at(w, straddling, 20), &flipped(w, frame_at(w, straddling, 20), 0x80))]),
            if before_straddle < 3 { damaged(before_straddle, before_straddle) } else { ok(3) },
        ),
        ("status_flip.bin", enc(0, &[LogEdit::new(Target::Slot0, 20, &[0x55])]), ok(4)),
        ("both_status_flip.bin", enc(0, &both_slots(12, &[0x55])), refused(None, Refusal::Corrupted)),
        // A crafted length, too short; then one longer by 8, resealed.
        ("frame_len_short.bin", enc(0, &[area(4, &[5, 0, 0])]), damaged(0, 0)),
        ("frame_len_longer.bin", enc(RESEAL, &[area(4, &(rec1_len + 8).to_le_bytes()[..3])]), damaged(0, 0)),
        // A range's data length beyond its record, resealed.
        ("range_len_crafted.bin", enc(RESEAL, &[area(9, &[0xff, 0xff, 0x7f])]), damaged(0, 0)),
        // Records from another epoch: one record's tag, or the status.
        ("frame_epoch.bin", enc(RESEAL, &[area(7, &[(tag & 0xf0) | ((t.epoch + 1) & 15) as u8])]), damaged(0, 0)),
        ("status_epoch.bin", enc(RESEAL, &both_slots(16, &next_epoch)), damaged(0, 0)),
        ("frame_position.bin", enc(RESEAL, &[area(frame_at(t, commit0, 7), &[tag ^ 0x10])]), damaged(0, 0)),
        // The first record of a transaction that does not say so.
        ("commit_ranges.bin", enc(RESEAL, &[area(frame_at(t, commit0, 8), &[FLAG_COMMIT])]), damaged(0, 0)),
        // A range naming a segment the dictionary lacks (record 2: control in
        // two bytes, then the segment), or past its end.
        (
            "unknown_segment.bin",
            enc(RESEAL, &[area(frame_at(t, range2, 11), &[9])]),
            refused(Some(4), Refusal::Corrupted),
        ),
        (
            "range_past_segment.bin",
            enc(RESEAL, &[area(frame_at(t, rec3, 12), &[0xf8, 0xff, 0x01])]),
            refused(Some(4), Refusal::Log),
        ),
        ("segment_short.bin", enc(0, &[LogEdit::new(Target::SegmentLen, 8000, &[0])]), refused(Some(4), Refusal::Log)),
        // The dictionary names another file.
        ("dictionary_renamed.bin", enc(RESEAL, &both_slots(80 + 24 + 2, b"x")), refused(Some(4), Refusal::Log)),
        // The head moved to the second transaction.
        ("status_head.bin", enc(RESEAL, &both_slots(24, &head2)), ok(3)),
        (
            "superblock_flip.bin",
            enc(0, &[LogEdit::new(Target::Superblock, 20, &[0x7f])]),
            refused(None, Refusal::Corrupted),
        ),
        // A version 2 log is refused by name.
        (
            "superblock_version.bin",
            enc(RESEAL, &[LogEdit::new(Target::Superblock, 8, &[2])]),
            refused(None, Refusal::Log),
        ),
        ("log_cut.bin", enc(0, &[LogEdit::new(Target::LogLen, 200_000, &[0])]), refused(None, Refusal::Corrupted)),
        // Garbage over the records past the first transaction, raw: a torn
        // tail that the synced status calls damage.
        (
            "raw_garbage.bin",
            enc(0, &[LogEdit::new(Target::Raw, (t.device_offset(t.frames[2].lsn) + 3) as u32, &[0xa5; 32])]),
            damaged(1, 1),
        ),
        // Segment bytes do not matter to recovery.
        ("segment_bytes.bin", enc(0, &[LogEdit::new(Target::SegmentBytes, 12_000, &[1, 2, 3])]), ok(4)),
        // A record's data changed and resealed: replayed as it now reads.
        ("resealed_data.bin", enc(RESEAL | WRAPPED, &[area(12, b"ALPHA")]), ok(4)),
    ]
}

/// Deterministic mutations: truncations and bit flips (the flag byte too).
fn mutations(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for n in [1, 5, bytes.len() / 2, bytes.len().saturating_sub(1)] {
        if n < bytes.len() {
            out.push(bytes[..n].to_vec());
        }
    }
    if bytes.is_empty() {
        return out;
    }
    for k in 0..12usize {
        let at = (k * 7919 + k * k * 104_729) % bytes.len();
        let mut b = bytes.to_vec();
        b[at] ^= 1 << (k % 8);
        if k % 4 == 3 {
            b[0] ^= RESEAL;
        }
        out.push(b);
    }
    out
}

#[test]
fn fuzz_body_over_the_log_seed_corpus() {
    let dir = seed_dir();
    let seeds = generated();
    if std::env::var("RVM_FUZZ_WRITE_SEEDS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes, _) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let wrong: Vec<_> = seeds
        .iter()
        .map(|(name, bytes, want)| (name, fuzz_log_image(bytes), want))
        .filter(|(_, got, want)| got != *want)
        .map(|(name, got, want)| format!("seed {name}: got {got:?}, want {want:?}"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let mut inputs: Vec<(String, Vec<u8>)> = seeds.into_iter().map(|(n, b, _)| (n.to_string(), b)).collect();
    let mut from_files = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/log_scan exists") {
        let entry = entry.unwrap();
        inputs.push((entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()));
        from_files += 1;
    }
    assert!(from_files >= generated().len(), "the seed folder {} lacks the generated seeds", dir.display());
    let mut runs = 0;
    let mut outcomes = std::collections::HashSet::new();
    for (name, bytes) in &inputs {
        for v in std::iter::once(bytes.clone()).chain(mutations(bytes)) {
            let r = std::panic::catch_unwind(|| fuzz_log_image(&v));
            let outcome = r.unwrap_or_else(|_| panic!("seed {name}: the fuzz body failed on {v:?}"));
            outcomes.insert((outcome.damaged, outcome.strict, outcome.salvaged));
            runs += 1;
        }
    }
    assert!(runs > 300, "only {runs} inputs ran");
    // The mutations reach every kind of outcome.
    assert!(outcomes.len() >= 5, "{outcomes:?}");
}

/// The wrapped template really runs across the end of the ring, and its
/// frames are what the seeds assume.
#[test]
fn templates_hold_four_transactions() {
    for wrapped in [false, true] {
        let t = log_template(wrapped);
        let commits = t.frames.iter().filter(|f| matches!(f.body, FrameBody::Commit { .. })).count();
        assert_eq!((t.frames.len(), commits), (9, 4));
        let last = t.frames.last().unwrap();
        let wraps = (last.lsn + u64::from(last.len)) / t.area_len != t.head / t.area_len;
        assert_eq!(wraps, wrapped);
    }
}
