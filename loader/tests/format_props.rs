//! Property tests of the load-map format (no mapping, no files):
//!
//! - arbitrary bytes as a header give either a valid map that round-trips
//!   exactly or a typed header error (the fuzz body checks both);
//! - so do valid encodings with bytes changed, with and without the
//!   checksum recomputed (so the change reaches the checks behind it);
//! - valid maps round-trip exactly through the binary and the text forms;
//! - the validation rules agree with a brute-force model (pairwise overlap
//!   checks, in the segment and in memory).
//!
//! `PROPTEST_CASES=N` runs more cases.

use proptest::prelude::*;
use rvm_loader::format::{
    ENTRY_LEN, FIXED_HEADER_LEN, MAX_HEADER_LEN, MAX_REGIONS, MIN_BASE, NAME_LEN, USER_ADDRESS_LIMIT,
};
use rvm_loader::testing::{fuzz_header, reseal};
use rvm_loader::{CopyMode, LoadMap, LoaderError, RegionSpec};

fn config() -> ProptestConfig {
    // 256 cases unless PROPTEST_CASES says otherwise.
    ProptestConfig { cases: ProptestConfig::default().cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn copy_mode() -> impl Strategy<Value = CopyMode> {
    prop_oneof![Just(CopyMode::OnDemand), Just(CopyMode::OnMap), Just(CopyMode::NoCopy)]
}

fn name() -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9_.-]{{1,{NAME_LEN}}}")).unwrap()
}

/// Valid maps: regions laid out one after another in the segment with
/// random gaps, and at shuffled, non-overlapping slots in memory.
fn valid_map() -> impl Strategy<Value = LoadMap> {
    let page = prop_oneof![Just(4096u64), Just(8192), Just(65536), Just(2 << 20)];
    (page, prop::collection::vec((name(), 1u64..16, 0u64..4, copy_mode()), 0..12), 0u64..3, any::<u64>()).prop_map(
        |(ps, regions, extra_header_pages, seed)| {
            let mut map = LoadMap::with_page_size(ps);
            let header_pages = (FIXED_HEADER_LEN + regions.len() * ENTRY_LEN).div_ceil(ps as usize) as u64;
            let header_len = ((header_pages + extra_header_pages) * ps).min(MAX_HEADER_LEN).max(header_pages * ps);
            let mut offset = header_len;
            // Memory slots of 16 pages, picked in a seeded order so the
            // table order differs from the address order.
            let slot_len = 16 * ps;
            let window = (USER_ADDRESS_LIMIT - MIN_BASE) / slot_len;
            let mut used = std::collections::BTreeSet::new();
            for (i, (name, pages, gap, copy)) in regions.into_iter().enumerate() {
                let name = format!("{i}{name}");
                let name = name[..name.len().min(NAME_LEN)].to_owned();
                let mut slot = seed.wrapping_mul(i as u64 + 1).wrapping_add(i as u64 * 0x9e37_79b9) % window;
                while !used.insert(slot) {
                    slot = (slot + 1) % window;
                }
                let base = (MIN_BASE.div_ceil(ps) * ps) + slot * slot_len;
                let len = pages * ps;
                map.push(RegionSpec { name, offset: offset + gap * ps, len, base, copy, max_len: len });
                offset += gap * ps + len;
            }
            let grown = map.header_len();
            map.with_header_len(header_len.max(grown))
        },
    )
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_a_valid_map_or_a_typed_error(bytes in prop::collection::vec(any::<u8>(), 0..1200)) {
        fuzz_header(&bytes);
        // With the magic, version and entry length in place, the bytes get
        // past the first checks more often.
        let mut b = bytes.clone();
        b.resize(b.len().max(FIXED_HEADER_LEN), 0);
        b[..8].copy_from_slice(&rvm_loader::format::MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[32..36].copy_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
        fuzz_header(&b);
    }

    #[test]
    fn valid_maps_round_trip_exactly(map in valid_map()) {
        prop_assert!(map.validate().is_ok(), "{:?}", map.validate());
        let bytes = map.encode();
        prop_assert_eq!(bytes.len(), FIXED_HEADER_LEN + map.regions().len() * ENTRY_LEN);
        let decoded = LoadMap::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded, &map);
        prop_assert_eq!(decoded.encode(), bytes.clone());
        // Trailing bytes (the rest of the header area) do not matter.
        let mut padded = bytes.clone();
        padded.extend(std::iter::repeat_n(0x5a, 333));
        prop_assert_eq!(&LoadMap::decode(&padded).unwrap(), &map);
        prop_assert_eq!(&LoadMap::from_spec(&map.to_string()).unwrap(), &map);
        prop_assert!(map.validate_for_device(map.min_device_len()).is_ok());
        prop_assert!(map.validate_for_device(map.min_device_len() - 1).is_err());
        fuzz_header(&bytes);
    }

    #[test]
    fn changed_bytes_of_a_valid_header_are_caught(
        map in valid_map(),
        changes in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        sealed in any::<bool>(),
    ) {
        let original = map.encode();
        let mut bytes = original.clone();
        for (at, x) in &changes {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        if sealed {
            reseal(&mut bytes);
        }
        match LoadMap::decode(&bytes) {
            // A change may leave a valid map (a new base, a new name...),
            // but never one that fails to round-trip.
            Ok(m) => {
                prop_assert!(sealed || bytes == original, "a changed header passed the checksum");
                prop_assert_eq!(m.encode(), bytes[..m.encoded_len()].to_vec());
            }
            Err(e) => prop_assert!(
                matches!(e, LoaderError::Corrupted { .. } | LoaderError::NotALoadMap { .. } | LoaderError::UnsupportedVersion { .. }),
                "{e:?}"
            ),
        }
        fuzz_header(&bytes);
    }

    #[test]
    fn overlap_rules_match_a_pairwise_model(
        regions in prop::collection::vec((0u64..12, 1u64..4, 0u64..12), 1..6),
    ) {
        let ps = 4096u64;
        let mut map = LoadMap::with_page_size(ps);
        for (i, (off, len, slot)) in regions.iter().enumerate() {
            map.push(RegionSpec::new(format!("r{i}"), (1 + off) * ps, len * ps, 0x5a00_0000_0000 + slot * ps));
        }
        let rs = map.regions();
        let mut expect_ok = true;
        for i in 0..rs.len() {
            for j in i + 1..rs.len() {
                if overlaps((rs[i].offset, rs[i].len), (rs[j].offset, rs[j].len))
                    || overlaps((rs[i].base, rs[i].len), (rs[j].base, rs[j].len))
                {
                    expect_ok = false;
                }
            }
        }
        match map.validate() {
            Ok(()) => prop_assert!(expect_ok, "overlapping regions accepted: {map}"),
            Err(e) => {
                prop_assert!(!expect_ok, "rejected without an overlap: {e}\n{map}");
                let text = e.to_string();
                prop_assert!(text.contains("overlap"), "{text}");
                prop_assert!(matches!(e, LoaderError::InvalidMap { region: Some(_), .. }), "{text}");
            }
        }
        // The same map read from a segment header is reported as corruption.
        let mut bytes = map.encode();
        reseal(&mut bytes);
        prop_assert_eq!(LoadMap::decode(&bytes).is_ok(), expect_ok);
    }
}

#[test]
fn the_largest_table_is_accepted_and_one_more_is_not() {
    let ps = 4096u64;
    let mut map = LoadMap::with_page_size(ps);
    for i in 0..MAX_REGIONS as u64 {
        map.push(RegionSpec::new(format!("r{i}"), (64 + i) * ps, ps, 0x5a00_0000_0000 + i * ps));
    }
    map.validate().unwrap();
    let bytes = map.encode();
    assert_eq!(LoadMap::decode(&bytes).unwrap(), map);
    map.push(RegionSpec::new("one-more", (64 + MAX_REGIONS as u64) * ps, ps, 0x5b00_0000_0000));
    assert!(map.validate().unwrap_err().to_string().contains("exceed the limit"));
    // A header claiming more regions than the limit is refused before any
    // table is read or allocated.
    let mut b = bytes.clone();
    b[20..24].copy_from_slice(&(u32::MAX).to_le_bytes());
    let e = LoadMap::decode(&b).unwrap_err();
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
}
