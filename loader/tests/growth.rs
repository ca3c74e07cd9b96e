//! Regions that grow in place: the maximum length in the load map, the
//! reservation at load, `RegionGrowth`, and hostile maxima in headers.

use rvm_core::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};
use rvm_loader::format::MAX_REGION_LEN;
use rvm_loader::{create_segment, load_segment, LoadMap, LoaderError, RegionSpec};

const PAGE: u64 = 4096;

fn rvm(dir: &std::path::Path) -> Rvm {
    create_log(dir.join("log"), 1 << 20).unwrap();
    Rvm::open(dir.join("log"), Options::default()).unwrap()
}

/// A map with one growable region "g" (16 pages, maximum 256) after a
/// fixed one.
fn map(base: u64) -> LoadMap {
    LoadMap::with_page_size(PAGE)
        .region(RegionSpec::new("fixed", PAGE, PAGE, base))
        .region(RegionSpec::new("g", 2 * PAGE, 16 * PAGE, base + (1 << 20)).max_len(256 * PAGE))
}

#[test]
fn a_region_grows_in_place_and_its_new_length_survives_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = rvm(dir.path());
    let base = rvm_loader::testing::address_range().at(0);
    let path = dir.path().join("seg");
    create_segment(&rvm, &path, 18 * PAGE, &map(base)).unwrap();
    let seg = load_segment(&rvm, &path).unwrap();
    let g = seg.region("g").unwrap().clone();
    assert_eq!((g.len() as u64, g.capacity() as u64), (16 * PAGE, 256 * PAGE));
    // The reservation keeps everything else out.
    let other = rvm.create_segment(dir.path().join("other"), PAGE).unwrap();
    let clash = rvm.map(&other, MapSpec::new(0, PAGE as usize).at((base + (1 << 20) + 100 * PAGE) as usize));
    assert!(clash.is_err(), "a mapping landed in a region's reservation");
    let growth = seg.region_growth("g").unwrap();
    let grown = growth
        .grow(64 * PAGE, |tx| {
            // SAFETY: the new pages are this test's alone.
            unsafe { tx.modify_bytes(g.addr() + 40 * PAGE as usize, b"in the new part") }?;
            Ok::<_, LoaderError>(())
        })
        .unwrap();
    assert!(grown);
    assert_eq!(g.len() as u64, 64 * PAGE);
    assert_eq!(seg.load_map().get("g").unwrap().len, 64 * PAGE);
    assert!(!growth.grow(32 * PAGE, |_| Ok::<_, LoaderError>(())).unwrap(), "shrinking is a no-op");
    let past = growth.grow(257 * PAGE, |_| Ok::<_, LoaderError>(())).unwrap_err();
    assert!(matches!(past, LoaderError::InvalidMap { .. }), "{past}");
    // A failing body leaves the map as it was.
    let failed = growth.grow(80 * PAGE, |_| Err(LoaderError::InvalidMap { region: None, reason: "no".into() }));
    assert!(failed.is_err());
    assert_eq!(seg.load_map().get("g").unwrap().len, 64 * PAGE);
    drop((g, growth));
    drop(seg);
    drop(rvm);
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = load_segment(&rvm, &path).unwrap();
    let g = seg.region("g").unwrap();
    assert_eq!(g.len() as u64, 64 * PAGE);
    let mut b = [0u8; 15];
    // SAFETY: nothing writes the region meanwhile.
    unsafe { g.read(40 * PAGE as usize, &mut b) }.unwrap();
    assert_eq!(&b, b"in the new part");
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: as above.
    unsafe { tx.modify_bytes(g.addr() + 63 * PAGE as usize, b"end") }.unwrap();
    tx.commit(CommitMode::Flush).unwrap();
}

/// The maximum length field of an entry, in every hostile form: a typed
/// corruption error at decode, never a reservation.
#[test]
fn hostile_maxima_are_corruption_errors() {
    let base = 0x5a00_0000_0000u64;
    let good = map(base).encode();
    let entry = 64 + 80; // region "g"
    let cases: [(u32, &str); 4] = [
        (u32::MAX, "absurd maximum"),
        ((MAX_REGION_LEN / PAGE) as u32 + 1, "past the limit"),
        (16, "equal to the length"),
        (3, "below the length"),
    ];
    for (pages, what) in cases {
        let mut bad = good.clone();
        bad[entry + 76..entry + 80].copy_from_slice(&pages.to_le_bytes());
        assert!(rvm_loader::testing::reseal(&mut bad));
        match LoadMap::decode(&bad) {
            Err(LoaderError::Corrupted { .. }) => {}
            other => panic!("{what} ({pages} pages): {other:?}"),
        }
    }
    // A reservation past the user half of the address space.
    let top = rvm_loader::format::USER_ADDRESS_LIMIT - 2 * PAGE;
    let high = LoadMap::with_page_size(PAGE).region(RegionSpec::new("a", PAGE, PAGE, top).max_len(4 * PAGE));
    assert!(high.validate().is_err());
    let mut bad = high.clone().region(RegionSpec::new("z", 2 * PAGE, PAGE, base)).encode();
    bad[64 + 76..64 + 80].copy_from_slice(&4u32.to_le_bytes());
    assert!(rvm_loader::testing::reseal(&mut bad));
    assert!(matches!(LoadMap::decode(&bad), Err(LoaderError::Corrupted { .. })));
    // A growth range running into the next region, in the segment or in memory.
    let overlap = LoadMap::with_page_size(PAGE)
        .region(RegionSpec::new("a", PAGE, PAGE, base).max_len(8 * PAGE))
        .region(RegionSpec::new("b", 4 * PAGE, PAGE, base + (1 << 30)));
    assert!(overlap.validate().is_err());
    let overlap = LoadMap::with_page_size(PAGE)
        .region(RegionSpec::new("a", PAGE, PAGE, base).max_len(8 * PAGE))
        .region(RegionSpec::new("b", 64 * PAGE, PAGE, base + 4 * PAGE));
    assert!(overlap.validate().is_err());
    // The text form carries the maximum.
    let m = map(base);
    assert_eq!(LoadMap::from_spec(&m.to_string()).unwrap(), m);
}

/// Something mapped where the region would grow: the segment loads at its
/// size all the same, and growing reports the range as taken.
#[test]
fn an_occupied_growth_range_loads_but_does_not_grow() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = rvm(dir.path());
    let base = rvm_loader::testing::address_range().at(0);
    let path = dir.path().join("seg");
    create_segment(&rvm, &path, 18 * PAGE, &map(base)).unwrap();
    let other = rvm.create_segment(dir.path().join("other"), PAGE).unwrap();
    let squatter =
        rvm.map(&other, MapSpec::new(0, PAGE as usize).at((base + (1 << 20) + 100 * PAGE) as usize)).unwrap();
    let seg = load_segment(&rvm, &path).unwrap();
    let g = seg.region("g").unwrap();
    assert_eq!(g.capacity(), g.len());
    let e = seg.region_growth("g").unwrap().grow(64 * PAGE, |_| Ok::<_, LoaderError>(())).unwrap_err();
    assert!(matches!(e, LoaderError::Core(rvm_core::Error::Map(rvm_core::MapError::BeyondReservation { .. }))), "{e}");
    assert_eq!(seg.load_map().get("g").unwrap().len, 16 * PAGE);
    drop(squatter);
}
