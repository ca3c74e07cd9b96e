//! Out-of-range values through safe calls of the core, the heap, the
//! typed layer and `rvmutl`: each is a typed error (or exit code 1 with a
//! message), never a panic (an arithmetic overflow in a debug build, a
//! silent wrap in a release build), and a refused call leaves nothing
//! behind that breaks the next one.

use rvm::heap::{HeapSpec, PersistentHeap};
use rvm::{MapSpec, Options, Rvm};
use std::process::Command;

/// A reservation of `usize::MAX` bytes overflowed its page round-up
/// inside `map` (a panic), after the segment range had been claimed: the
/// range then stayed claimed, and every later map of it was refused as
/// `AlreadyMapped`. Now refused up front; the range maps afterwards.
#[test]
fn a_reservation_beyond_the_address_space_is_refused_and_the_range_still_maps() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 1 << 16).unwrap();
    for reserve in [usize::MAX, usize::MAX - 4095, isize::MAX as usize + 1] {
        let r = rvm.map(&seg, MapSpec::new(0, 4096).reserve(reserve));
        assert!(matches!(r, Err(rvm::Error::Map(rvm::MapError::BadAddress { .. }))), "{reserve:#x}: {r:?}");
    }
    let region = rvm.map(&seg, MapSpec::new(0, 4096).reserve(1 << 20)).unwrap();
    assert_eq!(region.len(), 4096);
    rvm.unmap(region).unwrap();
}

/// `HeapSpec` lengths whose page round-up overflows (`u64::MAX` as the
/// heap length, the maximum or the static region's length) panicked in
/// the builder (and wrapped to 0 in release builds). Now the heap's
/// creation refuses them with the loader's reason.
#[test]
fn heap_spec_lengths_beyond_the_address_space_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let base = 0x5b00_0000_0000;
    let specs = [
        HeapSpec::new(base, u64::MAX),
        HeapSpec::new(base, 64 << 10).with_max_len(u64::MAX),
        HeapSpec::new(base, 64 << 10).with_static_len(u64::MAX),
        HeapSpec::fixed(base, u64::MAX - 1),
    ];
    for (i, spec) in specs.iter().enumerate() {
        let r = PersistentHeap::create(&rvm, dir.path().join(format!("heap{i}")), spec);
        assert!(matches!(r, Err(rvm::heap::HeapError::Loader(_))), "spec {i}: {r:?}");
    }
    // Nothing was left mapped or recorded that stops a sound heap.
    let heap = PersistentHeap::create(&rvm, dir.path().join("good"), &HeapSpec::new(base, 64 << 10)).unwrap();
    heap.check().unwrap();
}

/// `Config::max_heap_len = u64::MAX` ("no limit") panicked in the heap's
/// spec; now a configuration error naming the limit.
#[test]
fn a_typed_heap_larger_than_the_address_space_is_a_config_error() {
    use rvm::collections::{Config, Error, PHeap};
    for config in [
        Config { heap_len: 1 << 20, log_len: 1 << 20, max_heap_len: u64::MAX, ..Config::default() },
        Config { heap_len: u64::MAX - 4095, log_len: 1 << 20, ..Config::default() },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let r = PHeap::open_or_create(dir.path(), config.clone());
        assert!(matches!(r, Err(Error::Config(ref m)) if m.contains("address space")), "{config:?}: {r:?}");
        assert!(!dir.path().join(rvm::collections::HEAP_FILE).exists());
    }
}

/// `rvmutl heap create` with sizes whose page round-up overflows: exit 1
/// with the reason, no panic, no segment file.
#[test]
fn rvmutl_heap_create_with_huge_sizes_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let out =
        Command::new(env!("CARGO_BIN_EXE_rvmutl")).arg("create-log").arg(&log).args(["--size", "1M"]).output().unwrap();
    assert!(out.status.success());
    let max = u64::MAX.to_string();
    for (i, extra) in
        [["--size", max.as_str()], ["--static-len", max.as_str()], ["--max", max.as_str()]].iter().enumerate()
    {
        let seg = dir.path().join(format!("heap{i}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmutl"));
        cmd.args(["heap", "create"]).arg(&seg).arg("--log").arg(&log).args(["--base", "0x5b00_0000_0000"]);
        if extra[0] != "--size" {
            cmd.args(["--size", "64K"]);
        }
        let out = cmd.args(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked") && stderr.contains("rvmutl: error:"), "{extra:?}: {stderr}");
        assert!(!seg.exists(), "{extra:?}: a segment was left behind");
    }
}

/// `rvmutl heap check` and `heap stats` read the heap segment into memory
/// (a view that writes nothing). A heap larger than the machine's memory
/// (here a 1 TiB sparse heap, which `heap create` allows) made the
/// allocation fail and the process abort (SIGABRT, exit 134), or, with
/// overcommit, read on towards the OOM killer. Now exit 2 with the sizes.
#[test]
fn rvmutl_heap_check_of_a_heap_larger_than_memory_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (log, seg) = (dir.path().join("log"), dir.path().join("heap"));
    let rvmutl = || Command::new(env!("CARGO_BIN_EXE_rvmutl"));
    assert!(rvmutl().arg("create-log").arg(&log).args(["--size", "1M"]).output().unwrap().status.success());
    let out = rvmutl()
        .args(["heap", "create"])
        .arg(&seg)
        .arg("--log")
        .arg(&log)
        .args(["--size", "1T", "--base", "0x5b00_0000_0000", "--sparse"])
        .output()
        .unwrap();
    if !out.status.success() {
        // A file system without sparse files of 1 TiB: nothing to check.
        eprintln!("skipped: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    // SAFETY: `sysconf` reads a system constant.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) } as u64;
    if pages.saturating_mul(4096) >= 1 << 40 {
        eprintln!("skipped: this machine has 1 TiB of memory or more");
        return;
    }
    for cmd in ["check", "stats"] {
        let out = rvmutl().args(["heap", cmd]).arg(&seg).arg("--log").arg(&log).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "heap {cmd}: {stderr}");
        assert!(stderr.contains("do not fit in memory"), "heap {cmd}: {stderr}");
    }
}

/// `rvmutl segment create --map FILE` read the whole input into memory:
/// `--map /dev/zero` (or an endless pipe on `--map -`) ate memory until
/// the allocation failed. Now refused past 4 MiB as a bad map, exit 1
/// (as a map file that is not UTF-8 text; it was 2, an I/O error, before).
#[test]
fn rvmutl_segment_create_refuses_an_endless_map_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let rvmutl = || Command::new(env!("CARGO_BIN_EXE_rvmutl"));
    assert!(rvmutl().arg("create-log").arg(&log).args(["--size", "1M"]).output().unwrap().status.success());
    let seg = dir.path().join("seg");
    let out = rvmutl()
        .args(["segment", "create"])
        .arg(&seg)
        .arg("--log")
        .arg(&log)
        .args(["--map", "/dev/zero"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a load map"), "{stderr}");
    assert!(!seg.exists());
}

/// A segment length past what a file holds: the error said only "out of
/// range integral type conversion attempted"; now it names the limit.
#[test]
fn a_segment_longer_than_a_file_holds_is_refused_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let r = rvm.create_segment(dir.path().join("seg"), u64::MAX);
    let message = r.map(|_| ()).unwrap_err().to_string();
    assert!(message.contains("more than a file holds"), "{message}");
}

/// `rvmutl completions SHELL > /dev/full` panicked (the completion
/// generator panics when its writer fails) and `--help > /dev/full`
/// exited 0 with nothing written; both now exit 2 with the reason. With
/// standard error unwritable every error exited 101 (`eprintln!`
/// panics); now with its own code.
#[test]
fn rvmutl_output_to_a_full_disk_is_an_error_not_a_panic() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: no /dev/full");
        return;
    };
    for args in
        [&["completions", "bash"][..], &["completions", "zsh"], &["--help"], &["status", "--help"], &["--version"]]
    {
        let out =
            Command::new(env!("CARGO_BIN_EXE_rvmutl")).args(args).stdout(full.try_clone().unwrap()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("writing the output") && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Standard error unwritable: the exit code still tells what happened
    // (eprintln! panicked, exit 101).
    for (args, code) in [(&["status", "/nonexistent/log"][..], 2), (&["status", "--bogus"], 1)] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_rvmutl")).args(args).stderr(full.try_clone().unwrap()).output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}");
    }
    // Help on a pipe is plain text, as before.
    let out = Command::new(env!("CARGO_BIN_EXE_rvmutl")).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.contains(&0x1b), "no terminal styling in piped help");
}

/// `Options::tracked_pool_pages = usize::MAX` overflowed computing the
/// twin pool's size when a region was first tracked (a panic); now
/// `MapError::BadAddress`, and the region stays usable untracked.
#[test]
fn a_tracked_pool_beyond_the_address_space_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
    let opts = Options { tracked_pool_pages: usize::MAX, ..Options::default() };
    let rvm = Rvm::open(dir.path().join("log"), opts).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 1 << 16).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
    let r = rvm.track(&region);
    assert!(matches!(r, Err(rvm::Error::Map(rvm::MapError::BadAddress { .. }))), "{r:?}");
    let mut tx = rvm.begin(rvm::RestoreMode::Restore).unwrap();
    // SAFETY: the region is this test's alone; 8 bytes inside it.
    unsafe { tx.modify_bytes(region.addr(), &7u64.to_le_bytes()).unwrap() };
    tx.commit(rvm::CommitMode::Flush).unwrap();
}

/// A region handle kept after its instance is dropped keeps its mapping,
/// and with it the segment file and its lock: reopening the log is
/// refused while it lives (typed, naming this process's handles as a
/// possible holder), and succeeds once it is dropped.
#[test]
fn a_region_kept_after_its_instance_holds_the_segment_until_dropped() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 1 << 16).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
    let mut tx = rvm.begin(rvm::RestoreMode::Restore).unwrap();
    // SAFETY: the region is this test's alone; 8 bytes inside it.
    unsafe { tx.modify_bytes(region.addr(), &7u64.to_le_bytes()).unwrap() };
    tx.commit(rvm::CommitMode::Flush).unwrap();
    drop(rvm);
    let r = Rvm::open(dir.path().join("log"), Options::default());
    let message = r.map(|_| ()).unwrap_err().to_string();
    assert!(message.contains("a handle of this process"), "{message}");
    drop((region, seg));
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 1 << 16)).unwrap();
    let mut first = [0u8; 8];
    // SAFETY: nothing stores into the region meanwhile.
    unsafe { region.read(0, &mut first) }.unwrap();
    assert_eq!(u64::from_le_bytes(first), 7);
}
