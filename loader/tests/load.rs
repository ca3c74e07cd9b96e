//! Creating and loading segments on real files: several segments with
//! several regions at once, lookups by name, the all-or-nothing rule on
//! address conflicts and damaged or hostile headers, loading twice,
//! adding regions, unloading, and concurrent loads.
//!
//! Every test takes its own 1 GiB address range from
//! `rvm_loader::testing::address_range`, so the tests of this binary run in
//! parallel without colliding on addresses.

use rvm_core::{create_log, CommitMode, Error, MapError, MapSpec, Options, Region, RestoreMode, Rvm};
use rvm_loader::format::{FIXED_HEADER_LEN, USER_ADDRESS_LIMIT};
use rvm_loader::testing::{address_range, range_is_free, reseal, AddressRange};
use rvm_loader::{
    create_segment, load_segment, read_load_map, read_load_map_file, CopyMode, LoadMap, LoadedSegment, LoaderError,
    RegionSpec,
};
use std::path::{Path, PathBuf};

fn ps() -> u64 {
    rvm_core::page_size() as u64
}

struct Env {
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        create_log(&log, 4 << 20).unwrap();
        Env { dir, log }
    }
    fn open(&self) -> Rvm {
        Rvm::open(&self.log, Options::default()).unwrap()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A map of `n` regions of `pages` pages each, laid out one after another
/// in the segment and 16 MiB apart in memory from `base`.
fn map_of(n: usize, pages: u64, base: u64) -> LoadMap {
    let ps = ps();
    let mut map = LoadMap::new();
    for i in 0..n as u64 {
        map.push(RegionSpec::new(format!("r{i}"), ps * (1 + i * pages), pages * ps, base + i * (16 << 20)));
    }
    map
}

fn write(rvm: &Rvm, r: &Region, off: usize, bytes: &[u8]) {
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    // SAFETY: each test owns its regions; one thread writes them.
    unsafe { tx.modify_bytes(r.addr() + off, bytes).unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
}

fn read(r: &Region, off: usize, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(off, &mut b) }.unwrap();
    b
}

/// Asserts that none of the map's address ranges holds a mapping, and that
/// the instance has none of the segment's regions.
#[track_caller]
fn nothing_mapped(rvm: &Rvm, map: &LoadMap, seg: &Path) {
    for r in map.regions() {
        assert!(range_is_free(r.base as usize, r.len as usize), "region `{}` is still mapped", r.name);
    }
    let canonical = seg.canonicalize().unwrap();
    let left: Vec<_> = rvm.regions().into_iter().filter(|r| r.segment().name() == canonical).collect();
    assert!(left.is_empty(), "the instance still maps {} region(s) of the segment", left.len());
}

#[test]
fn several_segments_with_several_regions_load_at_once() {
    let env = Env::new();
    let rvm = env.open();
    let ranges: Vec<AddressRange> = (0..3).map(|_| address_range()).collect();
    let mut loaded: Vec<LoadedSegment> = Vec::new();
    for (s, range) in ranges.iter().enumerate() {
        let map = map_of(3 + s, 2, range.at(0))
            .region(RegionSpec::new("on-map", ps() * 64, ps(), range.at(512 << 20)).copy(CopyMode::OnMap));
        let path = env.path(&format!("seg{s}"));
        create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
        let seg = load_segment(&rvm, &path).unwrap();
        assert_eq!(seg.load_map(), map);
        assert_eq!(seg.regions().count(), map.regions().len());
        loaded.push(seg);
    }
    // Every region of every segment is at its base, writable, and found by
    // name, with its pointer and length.
    for (s, seg) in loaded.iter().enumerate() {
        for (i, spec) in seg.load_map().regions().iter().enumerate() {
            let r = seg.region(&spec.name).unwrap();
            assert_eq!(r.addr() as u64, spec.base);
            assert_eq!(r.as_ptr().as_ptr() as u64, spec.base);
            assert_eq!(r.len() as u64, spec.len);
            assert_eq!(r.segment_offset(), spec.offset);
            write(&rvm, r, 8, format!("segment {s} region {i}").as_bytes());
        }
        assert!(seg.region("missing").is_none());
        let names: Vec<&str> = seg.regions().map(|(n, _)| n).collect();
        let map = seg.load_map();
        let expect: Vec<&str> = map.regions().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, expect);
    }
    drop(loaded);
    drop(rvm);
    // After a restart every segment loads again with the data in place.
    let rvm = env.open();
    for s in 0..3 {
        let seg = load_segment(&rvm, env.path(&format!("seg{s}"))).unwrap();
        for (i, (_, r)) in seg.regions().enumerate() {
            let text = format!("segment {s} region {i}");
            assert_eq!(read(r, 8, text.len()), text.as_bytes());
        }
    }
}

#[test]
fn loading_a_loaded_segment_again_is_a_clear_error() {
    let env = Env::new();
    let rvm = env.open();
    let range = address_range();
    let map = map_of(2, 1, range.at(0));
    let path = env.path("seg");
    create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    let mut seg = load_segment(&rvm, &path).unwrap();
    write(&rvm, seg.region("r0").unwrap(), 0, b"first");

    let e = load_segment(&rvm, &path).unwrap_err();
    assert!(matches!(e, LoaderError::AlreadyLoaded { .. }), "{e:?}");
    assert!(e.to_string().contains("already loaded"), "{e}");
    // The failed attempt changed nothing.
    assert_eq!(read(seg.region("r0").unwrap(), 0, 5), b"first");
    assert_eq!(rvm.regions().len(), 3);

    // Another instance in the same process: the segment is locked.
    let env2 = Env::new();
    let rvm2 = env2.open();
    let e = load_segment(&rvm2, &path).unwrap_err();
    assert!(matches!(e, LoaderError::Core(Error::Locked { .. })), "{e:?}");
    assert!(rvm2.regions().is_empty());

    // Unloaded, it loads again (in the instance that holds it open).
    seg.unload().unwrap();
    assert!(!seg.is_loaded());
    assert!(seg.region("r0").is_none());
    nothing_mapped(&rvm, &map, &path);
    let seg = load_segment(&rvm, &path).unwrap();
    assert_eq!(read(seg.region("r0").unwrap(), 0, 5), b"first");
}

/// A `Region` handle cloned before an unload keeps its memory mapped (it
/// stays readable: no dangling handle), so a reload meanwhile is
/// `AlreadyLoaded`; once the handle is dropped the segment loads again, at
/// the same addresses, as many times as asked.
#[test]
fn a_region_handle_kept_across_an_unload_holds_its_mapping_until_dropped() {
    let env = Env::new();
    let rvm = env.open();
    let range = address_range();
    let map = map_of(1, 1, range.at(0));
    let path = env.path("seg");
    create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    let mut seg = load_segment(&rvm, &path).unwrap();
    write(&rvm, seg.region("r0").unwrap(), 0, b"kept");
    let handle = seg.region("r0").unwrap().clone();
    seg.unload().unwrap();
    assert_eq!(read(&handle, 0, 4), b"kept");
    let e = load_segment(&rvm, &path).unwrap_err();
    assert!(matches!(e, LoaderError::AlreadyLoaded { .. }), "{e:?}");
    drop(handle);
    drop(seg);
    for _ in 0..20 {
        let seg = load_segment(&rvm, &path).unwrap();
        let r = seg.region("r0").unwrap();
        assert_eq!(r.addr() as u64, range.at(0));
        assert_eq!(read(r, 0, 4), b"kept");
    }
    nothing_mapped(&rvm, &map, &path);
}

#[test]
fn an_address_conflict_maps_nothing_and_leaves_the_occupant_alone() {
    let env = Env::new();
    let rvm = env.open();
    let range = address_range();
    let ps = ps();
    let map = map_of(3, 4, range.at(0));
    let path = env.path("seg");
    create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    // An occupant: a region of another segment, with data, at a fixed
    // address inside region i of the map.
    let other = rvm.create_segment(env.path("other"), 4 * ps).unwrap();
    for (i, spec) in map.regions().iter().enumerate() {
        let at = spec.base as usize + ps as usize; // overlaps the region's second page
        let occupant = rvm.map(&other, MapSpec::new(0, 2 * ps as usize).at(at)).unwrap();
        write(&rvm, &occupant, 100, b"occupant data");

        let e = load_segment(&rvm, &path).unwrap_err();
        match &e {
            LoaderError::MapRegion { region, base, source: Error::Map(MapError::AddressInUse { .. }), .. } => {
                assert_eq!(region, &spec.name);
                assert_eq!(*base, spec.base);
            }
            other => panic!("conflict in region {i}: {other:?}"),
        }
        let text = e.to_string();
        assert!(text.contains(&format!("`{}`", spec.name)) && text.contains("already in use"), "{text}");
        // Nothing of the segment is mapped; the occupant is intact.
        for (j, r) in map.regions().iter().enumerate() {
            if j != i {
                assert!(range_is_free(r.base as usize, r.len as usize), "region {j} stayed mapped");
            }
        }
        assert_eq!(rvm.regions().len(), 1);
        assert_eq!(occupant.addr(), at);
        assert_eq!(read(&occupant, 100, 13), b"occupant data");
        rvm.unmap(occupant).unwrap();
    }
    // With the occupant gone the segment loads (no stale claims remain).
    let seg = load_segment(&rvm, &path).unwrap();
    assert_eq!(seg.regions().count(), 3);
}

#[test]
fn two_segments_whose_maps_overlap_cannot_both_be_loaded() {
    let env = Env::new();
    let rvm = env.open();
    let range = address_range();
    let a = map_of(2, 1, range.at(0));
    let b = LoadMap::new().region(RegionSpec::new("free", ps(), ps(), range.at(256 << 20))).region(RegionSpec::new(
        "clash",
        2 * ps(),
        ps(),
        range.at(16 << 20),
    ));
    create_segment(&rvm, env.path("a"), a.min_device_len(), &a).unwrap();
    create_segment(&rvm, env.path("b"), b.min_device_len(), &b).unwrap();
    let seg_a = load_segment(&rvm, env.path("a")).unwrap();
    let e = load_segment(&rvm, env.path("b")).unwrap_err();
    assert!(matches!(&e, LoaderError::MapRegion { region, .. } if region == "clash"), "{e:?}");
    assert!(range_is_free(range.start() + (256 << 20), ps() as usize));
    drop(seg_a);
    load_segment(&rvm, env.path("b")).unwrap();
}

/// Writes `bytes` over the start of a segment file.
fn patch_file(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn damaged_and_hostile_headers_are_typed_errors_and_map_nothing() {
    let env = Env::new();
    let range = address_range();
    let ps = ps();
    let map = map_of(2, 2, range.at(0));
    let path = env.path("seg");
    let dev = map.min_device_len();
    {
        let rvm = env.open();
        create_segment(&rvm, &path, dev, &map).unwrap();
    }
    let good = map.encode();
    assert_eq!(read_load_map_file(&path).unwrap(), map);
    fn entry(i: usize, field: usize) -> usize {
        FIXED_HEADER_LEN + 80 * i + field
    }
    fn set_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("a flipped bit", Box::new(|b| b[entry(1, 60)] ^= 4), "checksum mismatch"),
        ("a wrong magic", Box::new(|b| b[0] = b'X'), "no load map"),
        ("a newer version", Box::new(move |b| set_u32(b, 8, 2)), "version 2 is not supported"),
        (
            "a region past the end of the device",
            Box::new(move |b| {
                set_u64(b, entry(1, 56), 64 * ps);
                reseal(b);
            }),
            "`r1`",
        ),
        (
            "a region in the kernel half",
            Box::new(move |b| {
                set_u64(b, entry(0, 64), USER_ADDRESS_LIMIT);
                reseal(b);
            }),
            "user half",
        ),
        (
            "an absurd length",
            Box::new(move |b| {
                set_u64(b, entry(0, 56), 1 << 62);
                reseal(b);
            }),
            "`r0`",
        ),
        (
            "regions overlapping in memory",
            Box::new(move |b| {
                let base0 = u64::from_le_bytes(b[entry(0, 64)..entry(0, 64) + 8].try_into().unwrap());
                set_u64(b, entry(1, 64), base0 + ps);
                reseal(b);
            }),
            "overlap in memory",
        ),
        (
            "regions overlapping in the segment",
            Box::new(move |b| {
                set_u64(b, entry(1, 48), 2 * ps);
                reseal(b);
            }),
            "overlap in segment",
        ),
        (
            "a huge header area",
            Box::new(move |b| {
                set_u64(b, 24, 1 << 40);
                reseal(b);
            }),
            "header length",
        ),
        (
            "the largest region count on a one-page device table",
            Box::new(move |b| {
                set_u32(b, 20, 1024);
                reseal(b);
            }),
            "",
        ),
        (
            "an absurd region count",
            Box::new(move |b| {
                set_u32(b, 20, u32::MAX);
                reseal(b);
            }),
            "exceeds the limit",
        ),
        (
            "a name with a bad byte",
            Box::new(|b| {
                b[entry(0, 1)] = b'/';
                reseal(b);
            }),
            "contains '/'",
        ),
    ];
    for (what, damage, needle) in cases {
        let mut bytes = good.clone();
        damage(&mut bytes);
        patch_file(&path, &bytes);
        let rvm = env.open();
        let e = load_segment(&rvm, &path).unwrap_err();
        assert!(
            matches!(
                e,
                LoaderError::Corrupted { .. }
                    | LoaderError::NotALoadMap { .. }
                    | LoaderError::UnsupportedVersion { .. }
            ),
            "{what}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(needle), "{what}: {text:?} lacks {needle:?}");
        assert!(text.contains(&path.canonicalize().unwrap().display().to_string()), "{what}: {text}");
        nothing_mapped(&rvm, &map, &path);
        // The file-only reader says the same.
        let e2 = read_load_map_file(&path).unwrap_err();
        assert_eq!(std::mem::discriminant(&e2), std::mem::discriminant(&e), "{what}: {e2}");
    }
    patch_file(&path, &good);
    let rvm = env.open();
    load_segment(&rvm, &path).unwrap();
}

#[test]
fn short_blank_and_missing_devices_are_typed_errors() {
    let env = Env::new();
    let range = address_range();
    let map = map_of(2, 2, range.at(0));
    let path = env.path("seg");
    {
        let rvm = env.open();
        create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    }
    // Cut inside the last region: the map names it.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(map.min_device_len() - ps()).unwrap();
    let rvm = env.open();
    let e = load_segment(&rvm, &path).unwrap_err();
    assert!(matches!(e, LoaderError::Corrupted { .. }), "{e:?}");
    assert!(e.to_string().contains("`r1`") && e.to_string().contains("past the end of the device"), "{e}");
    nothing_mapped(&rvm, &map, &path);
    drop(rvm);
    // Cut inside the header.
    f.set_len(FIXED_HEADER_LEN as u64 - 1).unwrap();
    let rvm = env.open();
    let e = load_segment(&rvm, &path).unwrap_err();
    assert!(matches!(e, LoaderError::Corrupted { .. }), "{e:?}");
    assert!(e.to_string().contains("bytes long"), "{e}");
    drop(rvm);
    assert!(read_load_map_file(&path).is_err());
    // Blank: what a crash during creation leaves.
    f.set_len(0).unwrap();
    f.set_len(map.min_device_len()).unwrap();
    let rvm = env.open();
    let e = load_segment(&rvm, &path).unwrap_err();
    assert!(matches!(e, LoaderError::NotALoadMap { found, .. } if found == [0; 8]), "{e:?}");
    assert!(e.to_string().contains("did not complete"), "{e}");
    // Missing.
    let e = load_segment(&rvm, env.path("nothing-here")).unwrap_err();
    assert!(matches!(e, LoaderError::Core(Error::Io { .. })), "{e:?}");
}

#[test]
fn invalid_maps_are_refused_before_anything_is_created() {
    let env = Env::new();
    let rvm = env.open();
    let range = address_range();
    let path = env.path("seg");
    let overlapping = LoadMap::new().region(RegionSpec::new("a", ps(), 2 * ps(), range.at(0))).region(RegionSpec::new(
        "b",
        4 * ps(),
        ps(),
        range.at(ps() as usize),
    ));
    let e = create_segment(&rvm, &path, 8 * ps(), &overlapping).unwrap_err();
    assert!(matches!(&e, LoaderError::InvalidMap { region: Some(r), .. } if r == "b"), "{e:?}");
    let e = create_segment(&rvm, &path, 2 * ps(), &map_of(2, 1, range.at(0))).unwrap_err();
    assert!(e.to_string().contains("past the end of the device"), "{e}");
    if ps() == 4096 {
        let e = create_segment(&rvm, &path, 1 << 20, &LoadMap::with_page_size(2048)).unwrap_err();
        assert!(matches!(e, LoaderError::InvalidMap { .. }), "{e:?}");
    }
    assert!(!path.exists());
    // An existing file is never overwritten.
    std::fs::write(&path, b"precious").unwrap();
    let e = create_segment(&rvm, &path, 2 * ps(), &LoadMap::new()).unwrap_err();
    assert!(matches!(e, LoaderError::Core(Error::Io { .. })), "{e:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn regions_added_later_persist_and_conflicts_change_nothing() {
    let env = Env::new();
    let range = address_range();
    let ps = ps();
    let map = map_of(1, 1, range.at(0)).with_header_len(ps);
    let path = env.path("seg");
    let dev = 128 * ps;
    {
        let rvm = env.open();
        create_segment(&rvm, &path, dev, &map).unwrap();
        let mut seg = load_segment(&rvm, &path).unwrap();
        let r = seg.add_region(RegionSpec::new("added", 8 * ps, 2 * ps, range.at(64 << 20))).unwrap().clone();
        assert_eq!(r.addr(), range.start() + (64 << 20));
        write(&rvm, &r, 0, b"added data");
        assert_eq!(seg.load_map().regions().len(), 2);

        // Address in use: a typed error, the map and mappings unchanged.
        let blocker_seg = rvm.create_segment(env.path("blocker"), ps).unwrap();
        let blocker = rvm.map(&blocker_seg, MapSpec::new(0, ps as usize).at(range.start() + (128 << 20))).unwrap();
        let e = seg.add_region(RegionSpec::new("blocked", 16 * ps, 2 * ps, range.at(128 << 20))).unwrap_err();
        assert!(matches!(&e, LoaderError::MapRegion { region, .. } if region == "blocked"), "{e:?}");
        assert!(range_is_free(range.start() + (128 << 20) + ps as usize, ps as usize));
        rvm.unmap(blocker).unwrap();
        // Breaking a rule: refused, nothing mapped.
        for (bad, needle) in [
            (RegionSpec::new("added", 32 * ps, ps, range.at(200 << 20)), "used twice"),
            (RegionSpec::new("x", 8 * ps, ps, range.at(200 << 20)), "overlap in segment"),
            (RegionSpec::new("x", 32 * ps, ps, range.at((64 << 20) + ps as usize)), "overlap in memory"),
            (RegionSpec::new("x", 127 * ps, 2 * ps, range.at(200 << 20)), "past the end of the device"),
        ] {
            let e = seg.add_region(bad).unwrap_err();
            assert!(matches!(e, LoaderError::InvalidMap { .. }), "{e:?}");
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        }
        assert!(range_is_free(range.start() + (200 << 20), ps as usize));
        assert_eq!(seg.load_map().regions().len(), 2);
        // The one-page header area holds (page - 64) / 80 entries.
        let room = seg.load_map().capacity();
        for i in 2..room {
            seg.add_region(RegionSpec::new(
                format!("fill{i}"),
                (32 + i as u64) * ps,
                ps,
                range.at((300 << 20) + i * 65536),
            ))
            .unwrap_or_else(|e| panic!("region {i} of {room}: {e}"));
        }
        let e = seg.add_region(RegionSpec::new("overflow", 30 * ps, ps, range.at(900 << 20))).unwrap_err();
        assert!(e.to_string().contains("cannot hold"), "{e}");
        // Not truncated into the file yet: the file shows the old map, the
        // log-aware reader (below, after restart) the new one.
    }
    let rvm = env.open();
    let full = read_load_map(&rvm, &path).unwrap();
    assert_eq!(full.regions().len(), full.capacity());
    let seg = load_segment(&rvm, &path).unwrap();
    assert_eq!(seg.load_map(), full);
    assert_eq!(read(seg.region("added").unwrap(), 0, 10), b"added data");
    assert!(seg.region("blocked").is_none());
}

#[test]
fn unload_waits_for_open_transactions() {
    let env = Env::new();
    let rvm = env.open();
    let range = address_range();
    let map = map_of(2, 1, range.at(0));
    let path = env.path("seg");
    create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    let mut seg = load_segment(&rvm, &path).unwrap();
    let r1 = seg.region("r1").unwrap().clone();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: this test alone uses the region.
    unsafe { tx.modify_bytes(r1.addr(), b"pending").unwrap() };
    let e = seg.unload().unwrap_err();
    assert!(matches!(&e, LoaderError::Busy { region, count: 1 } if region == "r1"), "{e:?}");
    assert!(seg.is_loaded() && seg.region("r0").is_some());
    tx.commit(CommitMode::Flush).unwrap();
    drop(r1);
    seg.unload().unwrap();
    nothing_mapped(&rvm, &map, &path);
    seg.unload().unwrap(); // unloading twice is harmless
}

#[test]
fn concurrent_loads_never_leave_a_half_loaded_segment() {
    let env = Env::new();
    let rvm = env.open();
    let range = address_range();
    let map = map_of(4, 1, range.at(0));
    let path = env.path("seg");
    create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    for _ in 0..2000 {
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| load_segment(&rvm, &path))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut loaded = 0;
        for r in results {
            match r {
                Ok(seg) => {
                    loaded += 1;
                    assert_eq!(seg.regions().count(), 4);
                    drop(seg);
                }
                Err(LoaderError::AlreadyLoaded { .. }) => {}
                Err(e) => panic!("unexpected error: {e:?}"),
            }
        }
        // Exactly one load wins (the winner holds the segment until the
        // results are looked at); the others are refused, never all of them.
        // Results were dropped above: the segment is unloaded again.
        assert_eq!(loaded, 1, "concurrent loads of one segment");
        nothing_mapped(&rvm, &map, &path);
    }
    // Different segments load in parallel without trouble.
    let paths: Vec<PathBuf> = (0..3).map(|i| env.path(&format!("par{i}"))).collect();
    let maps: Vec<LoadMap> = (0..3).map(|_| map_of(3, 1, address_range().at(0))).collect();
    for (p, m) in paths.iter().zip(&maps) {
        create_segment(&rvm, p, m.min_device_len(), m).unwrap();
    }
    std::thread::scope(|s| {
        for p in &paths {
            let rvm = &rvm;
            s.spawn(move || {
                for _ in 0..10 {
                    let seg = load_segment(rvm, p).unwrap();
                    write(rvm, seg.region("r2").unwrap(), 0, b"x");
                }
            });
        }
    });
}

#[test]
fn loaded_segments_and_maps_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<LoadedSegment>();
    send_sync::<LoadMap>();
    send_sync::<LoaderError>();
}

/// `Rvm::delete_segment` applies the commits still in the log for the segment
/// before it removes the file, so the log recovers without it afterwards;
/// a loaded segment is not deleted.
#[test]
fn a_deleted_segment_leaves_a_log_that_recovers() {
    let env = Env::new();
    let range = address_range();
    let (keep, gone) = (env.path("keep"), env.path("gone"));
    {
        let rvm = env.open();
        let map = |at: u64| LoadMap::new().region(RegionSpec::new("data", ps(), ps(), at));
        create_segment(&rvm, &keep, 2 * ps(), &map(range.at(0))).unwrap();
        create_segment(&rvm, &gone, 2 * ps(), &map(range.at(1 << 20))).unwrap();
        for path in [&keep, &gone] {
            let seg = load_segment(&rvm, path).unwrap();
            let data = seg.region("data").unwrap();
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: the region is this test's; 8 bytes inside it.
            unsafe { tx.modify_bytes(data.addr(), b"unsynced").unwrap() };
            // Not flushed, not applied: the log holds it.
            tx.commit(CommitMode::NoFlush).unwrap();
            if path == &gone {
                let refused = rvm.delete_segment(rvm.open_segment(path).unwrap());
                assert!(matches!(refused, Err(Error::Map(MapError::SegmentInUse { .. }))), "{refused:?}");
                assert!(path.exists());
            }
        }
        rvm.delete_segment(rvm.open_segment(&gone).unwrap()).unwrap();
        assert!(!gone.exists());
        rvm.flush().unwrap();
    }
    // The log needs only the segment that is left.
    let rvm = env.open();
    let seg = load_segment(&rvm, &keep).unwrap();
    let mut got = [0u8; 8];
    // SAFETY: no transaction runs in the region.
    unsafe { seg.region("data").unwrap().read(0, &mut got) }.unwrap();
    assert_eq!(&got, b"unsynced");
}
