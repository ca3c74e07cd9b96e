//! The loader driven carelessly: a segment file replaced between runs by
//! something else (another length, a folder, a FIFO, a device, a link
//! loop, another segment), a loaded segment loaded again under another
//! name, growth asked beyond reason. Typed errors, nothing left mapped, no
//! wait; the files still load correctly once given back.

use rvm_core::{create_log, CommitMode, Error, Options, Region, RestoreMode, Rvm};
use rvm_loader::testing::{address_range, range_is_free};
use rvm_loader::{create_segment, load_segment, LoadMap, LoaderError, RegionSpec};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn ps() -> u64 {
    rvm_core::page_size() as u64
}

fn write(rvm: &Rvm, r: &Region, bytes: &[u8]) {
    let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
    // SAFETY: one thread writes the region, inside it.
    unsafe { tx.modify_bytes(r.addr(), bytes).unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
}

fn read(r: &Region, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { r.read(0, &mut b) }.unwrap();
    b
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

#[test]
fn a_segment_replaced_between_runs_is_a_typed_error_and_maps_nothing() {
    use rustix::fs::{FileType, Mode, CWD};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    create_log(&log, 2 << 20).unwrap();
    let range = address_range();
    let map = LoadMap::new().region(RegionSpec::new("data", ps(), 2 * ps(), range.at(0)));
    let path = dir.path().join("seg");
    let other: PathBuf = dir.path().join("other");
    {
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
        let seg = load_segment(&rvm, &path).unwrap();
        write(&rvm, seg.region("data").unwrap(), b"kept");
        drop(seg);
        // Applied to the file, so the file alone holds the state.
        rvm.truncate().unwrap();
        // Another segment, with another map at other addresses.
        let map2 = LoadMap::new().region(RegionSpec::new("else", ps(), ps(), range.at(4 * ps() as usize)));
        create_segment(&rvm, &other, map2.min_device_len(), &map2).unwrap();
    }
    let good = std::fs::read(&path).unwrap();
    let free = || range_is_free(range.at(0) as usize, 2 * ps() as usize);
    type Make = Box<dyn Fn(&Path)>;
    let makers: Vec<(&str, Make)> = vec![
        ("a folder", Box::new(|p| std::fs::create_dir(p).unwrap())),
        ("a FIFO", Box::new(|p| rustix::fs::mknodat(CWD, p, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap())),
        ("a link to /dev/zero", Box::new(|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap())),
        ("a link to /dev/null", Box::new(|p| std::os::unix::fs::symlink("/dev/null", p).unwrap())),
        ("a link to itself", Box::new(|p| std::os::unix::fs::symlink(p, p).unwrap())),
        ("an empty file", Box::new(|p| std::fs::write(p, b"").unwrap())),
        ("one byte", Box::new(|p| std::fs::write(p, b"x").unwrap())),
        ("the header alone", {
            let g = good.clone();
            Box::new(move |p| std::fs::write(p, &g[..ps() as usize]).unwrap())
        }),
        ("half a region short", {
            let g = good.clone();
            Box::new(move |p| std::fs::write(p, &g[..g.len() - ps() as usize / 2]).unwrap())
        }),
    ];
    for (what, make) in &makers {
        remove(&path);
        make(&path);
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        let start = Instant::now();
        let r = load_segment(&rvm, &path);
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: the load waited");
        match r {
            Ok(_) => panic!("{what}: loaded"),
            Err(LoaderError::Core(Error::Io { .. } | Error::Map(_)))
            | Err(LoaderError::Corrupted { .. } | LoaderError::NotALoadMap { .. } | LoaderError::Io { .. }) => {}
            Err(e) => panic!("{what}: untyped or unexpected error {e:?}"),
        }
        assert!(free(), "{what}: a refused load left a mapping");
        assert!(rvm.regions().is_empty(), "{what}: a refused load left a region");
        drop(rvm);
    }
    // Longer than before: the map still fits, the data is there.
    remove(&path);
    let mut longer = good.clone();
    longer.resize(good.len() + 16 * ps() as usize, 0xee);
    std::fs::write(&path, &longer).unwrap();
    {
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        let seg = load_segment(&rvm, &path).unwrap();
        assert_eq!(read(seg.region("data").unwrap(), 4), b"kept");
    }
    // Another segment's file under this name: its own map, its own
    // addresses (no records of the log name it).
    remove(&path);
    std::fs::copy(&other, &path).unwrap();
    {
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        let seg = load_segment(&rvm, &path).unwrap();
        assert!(seg.region("data").is_none() && seg.region("else").is_some());
        // The real `other` is the same map at the same addresses: refused.
        let e = load_segment(&rvm, &other).unwrap_err();
        assert!(matches!(e, LoaderError::MapRegion { .. }), "{e:?}");
    }
    // Given back, it loads with its data.
    remove(&path);
    std::fs::write(&path, &good).unwrap();
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    let seg = load_segment(&rvm, &path).unwrap();
    assert_eq!(read(seg.region("data").unwrap(), 4), b"kept");
}

#[test]
fn a_loaded_segment_under_another_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    create_log(&log, 2 << 20).unwrap();
    let range = address_range();
    let map = LoadMap::new().region(RegionSpec::new("data", ps(), ps(), range.at(0)));
    let path = dir.path().join("seg");
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    let seg = load_segment(&rvm, &path).unwrap();
    let sym = dir.path().join("sym");
    std::os::unix::fs::symlink(&path, &sym).unwrap();
    let e = load_segment(&rvm, &sym).unwrap_err();
    assert!(matches!(e, LoaderError::AlreadyLoaded { .. }), "symlink: {e:?}");
    let hard = dir.path().join("hard");
    std::fs::hard_link(&path, &hard).unwrap();
    let e = load_segment(&rvm, &hard).unwrap_err();
    assert!(
        matches!(e, LoaderError::AlreadyLoaded { .. } | LoaderError::Core(Error::Locked { .. })),
        "hard link: {e:?}"
    );
    // The log as a segment, and the segment's folder.
    let e = load_segment(&rvm, &log).unwrap_err();
    assert!(matches!(e, LoaderError::Core(Error::Locked { .. })), "the log: {e:?}");
    let e = load_segment(&rvm, dir.path()).unwrap_err();
    assert!(matches!(e, LoaderError::Core(Error::Io { .. })), "a folder: {e:?}");
    assert_eq!(rvm.regions().len(), 2, "header and data of the one load");
    write(&rvm, seg.region("data").unwrap(), b"still");
}

#[test]
fn growth_beyond_reason_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    create_log(&log, 2 << 20).unwrap();
    let range = address_range();
    let map = LoadMap::new().region(RegionSpec::new("data", ps(), ps(), range.at(0)).max_len(4 * ps()));
    let path = dir.path().join("seg");
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    create_segment(&rvm, &path, map.min_device_len(), &map).unwrap();
    let seg = load_segment(&rvm, &path).unwrap();
    let growth = seg.region_growth("data").unwrap();
    assert!(seg.region_growth("nothing").is_none());
    let len_before = std::fs::metadata(&path).unwrap().len();
    for new_len in [u64::MAX, u64::MAX - ps() + 1, 5 * ps(), ps() + 1, 1 << 62] {
        let r = growth.grow::<LoaderError>(new_len, |_| Ok(()));
        assert!(r.is_err(), "{new_len:#x}: {r:?}");
        assert_eq!(seg.region("data").unwrap().len() as u64, ps());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len_before, "{new_len:#x}");
    }
    assert!(!growth.grow::<LoaderError>(0, |_| Ok(())).unwrap(), "0: nothing to do");
    assert!(growth.grow::<LoaderError>(2 * ps(), |_| Ok(())).unwrap());
    assert_eq!(seg.load_map().get("data").unwrap().len, 2 * ps());
}
