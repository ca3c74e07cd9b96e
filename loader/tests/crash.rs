//! The load map is written atomically: on the simulated disk, an I/O error
//! injected at every storage operation of `create_segment` and of
//! `LoadedSegment::add_region`, followed by a power failure that keeps a
//! random subset of the unsynced writes (tearing the last one), leaves
//! either the old map or the complete new one, never a damaged header. A
//! call that returned `Ok` is durable.

use rvm_core::testing::{CrashMode, SimDisk};
use rvm_core::{create_log_with, Error, Options, Rvm, Vfs};
use rvm_loader::testing::address_range;
use rvm_loader::{create_segment, load_segment, LoadMap, LoaderError, RegionSpec};
use std::path::Path;
use std::sync::Arc;

const LOG: &str = "log";
const SEG: &str = "seg";

fn opts() -> Options {
    Options { truncate_threshold: None, ..Options::default() }
}

fn open(vfs: &Arc<dyn Vfs>) -> Rvm {
    Rvm::open_with(vfs.clone(), Path::new(LOG), opts()).unwrap()
}

fn fresh_disk() -> (SimDisk, Arc<dyn Vfs>) {
    let disk = SimDisk::new();
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    create_log_with(vfs.as_ref(), Path::new(LOG), 1 << 20).unwrap();
    (disk, vfs)
}

fn crash_modes(n: u64) -> [CrashMode; 2] {
    [
        CrashMode::LoseUnsynced,
        CrashMode::KeepRandomSubset { seed: n.wrapping_mul(0x9e37_79b9_7f4a_7c15), tear_last: true },
    ]
}

/// Runs `attempt(n, mode)` (fault at storage operation `n`, then a crash
/// in `mode`; it returns whether the call succeeded) for `n = 0, 1, ...`
/// in both crash modes, until a call succeeds; every operation before that
/// must have failed once per mode.
fn fault_every_op_until_success(what: &str, mut attempt: impl FnMut(u64, CrashMode) -> bool) {
    let mut failed = 0;
    for n in 0..400u64 {
        let mut completed = false;
        for mode in crash_modes(n) {
            let ok = attempt(n, mode);
            completed |= ok;
            failed += usize::from(!ok);
        }
        if completed {
            assert!(failed >= 4, "only {failed} injected failures");
            eprintln!("{failed} injected failures, then success at op {n}");
            return;
        }
    }
    panic!("{what} never completed within 400 storage operations");
}

/// What loading the segment after a crash shows: `None` when the segment
/// is missing, blank or shorter than its map (creation did not complete).
fn loaded_map(rvm: &Rvm) -> Option<LoadMap> {
    match load_segment(rvm, SEG) {
        Ok(seg) => Some(seg.load_map()),
        Err(LoaderError::NotALoadMap { found, .. }) if found == [0; 8] => None,
        Err(LoaderError::Core(Error::Io { source, .. })) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(LoaderError::Corrupted { what, .. }) if what.contains("bytes long") => None,
        Err(e) => panic!("a crash left a damaged segment: {e:?}"),
    }
}

#[test]
fn create_segment_is_all_or_nothing_under_crashes() {
    let range = address_range();
    let ps = rvm_core::page_size() as u64;
    let map = LoadMap::new().region(RegionSpec::new("roots", ps, ps, range.at(0))).region(RegionSpec::new(
        "heap",
        2 * ps,
        8 * ps,
        range.at(1 << 20),
    ));
    fault_every_op_until_success("create_segment", |n, mode| {
        let (disk, vfs) = fresh_disk();
        let rvm = open(&vfs);
        disk.fail_after(n);
        let result = create_segment(&rvm, SEG, map.min_device_len(), &map);
        drop(rvm);
        disk.crash(mode);
        disk.clear_faults();
        let rvm = open(&vfs);
        match loaded_map(&rvm) {
            Some(m) => assert_eq!(m, map, "fault at op {n}: a different map"),
            None => assert!(result.is_err(), "fault at op {n}: create_segment returned Ok but the map is gone"),
        }
        result.is_ok()
    });
}

#[test]
fn add_region_is_all_or_nothing_under_crashes() {
    let range = address_range();
    let ps = rvm_core::page_size() as u64;
    let old = LoadMap::new().region(RegionSpec::new("roots", ps, ps, range.at(0)));
    let added = RegionSpec::new("more", 4 * ps, 2 * ps, range.at(1 << 20));
    let new = {
        let mut m = old.clone();
        m.push(added.clone());
        m
    };
    fault_every_op_until_success("add_region", |n, mode| {
        let (disk, vfs) = fresh_disk();
        let rvm = open(&vfs);
        create_segment(&rvm, SEG, 16 * ps, &old).unwrap();
        let mut seg = load_segment(&rvm, SEG).unwrap();
        disk.fail_after(n);
        let result = seg.add_region(added.clone()).map(|_| ());
        if result.is_err() {
            assert_eq!(seg.load_map(), old, "a failed add_region changed the loaded map");
            assert!(seg.region("more").is_none());
        }
        drop(seg);
        drop(rvm);
        disk.crash(mode);
        disk.clear_faults();
        let rvm = open(&vfs);
        let m = loaded_map(&rvm).unwrap_or_else(|| panic!("fault at op {n}: the segment lost its map"));
        if result.is_ok() {
            assert_eq!(m, new, "fault at op {n}: add_region returned Ok but the region is gone");
        } else {
            assert!(m == old || m == new, "fault at op {n}: neither the old nor the new map: {m}");
        }
        result.is_ok()
    });
}
