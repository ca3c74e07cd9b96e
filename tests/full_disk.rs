//! A full disk, on a real file system: a small `tmpfs` mounted for each
//! test (it needs the right to mount: root, or `CAP_SYS_ADMIN`; without it
//! each test says it was skipped and checks nothing).
//!
//! The log's and segments' disk blocks are allocated when they are made
//! (`create_log`, `Rvm::create_segment`, `Options::reserve_segment_space`),
//! so a disk without room refuses the creation with `StorageFull` and
//! leaves no file, and a disk that fills up later stops neither commits
//! nor checkpoints.

use rvm::{create_log, CommitMode, Error, MapSpec, Options, Region, RestoreMode, Rvm};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A `tmpfs` of `bytes` mounted on a fresh folder; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                eprintln!("skipped: cannot mount a tmpfs here: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Fills what is left of the disk with a file of zeros written out.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        let _ = f.sync_all();
        let free = rustix::fs::statvfs(self.dir.path()).unwrap();
        assert!(
            free.f_bavail * free.f_frsize < 8192,
            "the disk is not full: {} bytes free",
            free.f_bavail * free.f_frsize
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn storage_full(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == ErrorKind::StorageFull)
}

/// Commits `value` at `off` of `region` in one transaction.
fn commit(rvm: &Rvm, region: &Region, off: usize, value: u64, mode: CommitMode) -> rvm::Result<()> {
    let mut tx = rvm.begin(RestoreMode::NoRestore)?;
    // SAFETY: one thread writes the region, inside its bounds.
    unsafe { tx.modify_bytes(region.addr() + off, &value.to_le_bytes())? };
    tx.commit(mode)
}

fn read(region: &Region, off: usize) -> u64 {
    let mut b = [0; 8];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(off, &mut b) }.unwrap();
    u64::from_le_bytes(b)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_log_larger_than_the_free_space_is_refused_and_leaves_no_file() {
    let Some(disk) = SmallDisk::mount(1 << 20) else { return };
    let e = create_log(disk.path("log"), 4 << 20).unwrap_err();
    assert!(storage_full(&e), "{e}");
    assert!(listing(disk.dir.path()).is_empty(), "{:?}", listing(disk.dir.path()));
    // A log that fits is made and works.
    create_log(disk.path("log"), 512 << 10).unwrap();
    Rvm::open(disk.path("log"), Options::default()).unwrap().close().unwrap();
}

#[test]
fn a_segment_larger_than_the_free_space_is_refused_unless_sparse() {
    let Some(disk) = SmallDisk::mount(2 << 20) else { return };
    create_log(disk.path("log"), 512 << 10).unwrap();
    let rvm = Rvm::open(disk.path("log"), Options::default()).unwrap();
    let e = rvm.create_segment(disk.path("big"), 8 << 20).unwrap_err();
    assert!(storage_full(&e), "{e}");
    assert_eq!(listing(disk.dir.path()), ["log"]);
    // The instance goes on: a segment that fits is made, and committed to.
    let seg = rvm.create_segment(disk.path("seg"), 64 << 10).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 64 << 10)).unwrap();
    commit(&rvm, &region, 0, 42, CommitMode::Flush).unwrap();
    rvm.unmap(region).unwrap();
    // Growing past the free space is refused the same way, size unchanged.
    let e = rvm.extend_segment(&seg, 8 << 20).unwrap_err();
    assert!(storage_full(&e), "{e}");
    assert_eq!(seg.len(), 64 << 10);
    drop(seg);
    rvm.close().unwrap();

    // Sparse on request: the file is made, its blocks are not taken.
    let sparse = Options { reserve_segment_space: false, ..Options::default() };
    let rvm = Rvm::open(disk.path("log"), sparse).unwrap();
    let big = rvm.create_segment(disk.path("big"), 8 << 20).unwrap();
    assert_eq!(big.len(), 8 << 20);
    let seg = rvm.open_segment(disk.path("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, 64 << 10)).unwrap();
    assert_eq!(read(&region, 0), 42);
}

/// Once made, the log and the segment need no more space: a disk filled
/// up by something else stops neither commits (the log wraps many times)
/// nor the checkpoints and truncations that apply them.
#[test]
fn a_disk_filled_after_creation_stops_neither_commits_nor_checkpoints() {
    let Some(disk) = SmallDisk::mount(4 << 20) else { return };
    create_log(disk.path("log"), 256 << 10).unwrap();
    let len: u64 = 1 << 20;
    {
        let rvm = Rvm::open(disk.path("log"), Options::default()).unwrap();
        rvm.create_segment(disk.path("seg"), len).unwrap();
        rvm.close().unwrap();
    }
    disk.fill();
    let rvm = Rvm::open(disk.path("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(disk.path("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, len as usize)).unwrap();
    let pages = len as usize / 4096;
    // Every page written, many times over: about 10 MB of log through a
    // 256 KiB log.
    for round in 0..40u64 {
        for page in 0..pages {
            let mode = if page % 16 == 0 { CommitMode::Flush } else { CommitMode::NoFlush };
            commit(&rvm, &region, page * 4096, round * 1_000_000 + page as u64, mode)
                .unwrap_or_else(|e| panic!("round {round} page {page}: {e}"));
        }
        if round % 10 == 9 {
            rvm.checkpoint().unwrap();
        }
    }
    rvm.flush().unwrap();
    rvm.truncate().unwrap();
    rvm.unmap(region).unwrap();
    drop(seg);
    rvm.close().unwrap();
    let rvm = Rvm::open(disk.path("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(disk.path("seg")).unwrap();
    let region = rvm.map(&seg, MapSpec::new(0, len as usize)).unwrap();
    for page in 0..pages {
        assert_eq!(read(&region, page * 4096), 39 * 1_000_000 + page as u64, "page {page}");
    }
}

/// `rvmutl` refuses a segment or heap the disk has no room for, with a
/// hint naming `--sparse`, leaving no file; `--sparse` makes it.
#[test]
fn rvmutl_refuses_a_segment_larger_than_the_disk_unless_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let free = rustix::fs::statvfs(dir.path()).unwrap();
    if free.f_bavail.saturating_mul(free.f_frsize) >= 512 << 30 {
        eprintln!("skipped: the disk has 512 GiB free or more");
        return;
    }
    let rvmutl = || Command::new(env!("CARGO_BIN_EXE_rvmutl"));
    let log = dir.path().join("log");
    assert!(rvmutl().arg("create-log").arg(&log).args(["--size", "1M"]).output().unwrap().status.success());
    let mut log_bytes = std::fs::read(&log).unwrap();
    let heap = ["heap", "create", "--size", "1T", "--base", "0x5b00_0000_0000"];
    let seg = ["segment", "create", "--size", "1T", "--region", "a:4096:4096:0x5c00_0000_0000"];
    for (args, name) in [(heap, "heap"), (seg, "seg")] {
        let path = dir.path().join(name);
        let out = rvmutl().args(&args[..2]).arg(&path).arg("--log").arg(&log).args(&args[2..]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("No space left") && stderr.contains("--sparse"), "{stderr}");
        assert!(!path.exists(), "{name} left behind");
        // Refused before the log was opened: it is as it was.
        assert_eq!(std::fs::read(&log).unwrap(), log_bytes, "{name}: the refusal changed the log");
        let out = rvmutl()
            .args(&args[..2])
            .arg(&path)
            .arg("--log")
            .arg(&log)
            .args(&args[2..])
            .arg("--sparse")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::metadata(&path).unwrap().len() >= 1 << 40);
        log_bytes = std::fs::read(&log).unwrap();
    }
    // Growing a heap past the free space: refused the same way, before the
    // log is opened; `--sparse` grows it.
    let small = dir.path().join("small");
    let create = ["heap", "create", "--size", "1M", "--base", "0x5d00_0000_0000"];
    let out = rvmutl().args(&create[..2]).arg(&small).arg("--log").arg(&log).args(&create[2..]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log_bytes = std::fs::read(&log).unwrap();
    let grow = |sparse: bool| {
        let mut cmd = rvmutl();
        cmd.args(["heap", "grow"]).arg(&small).arg("--log").arg(&log).args(["--size", "512G", "--max", "1T"]);
        if sparse {
            cmd.arg("--sparse");
        }
        cmd.output().unwrap()
    };
    let out = grow(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("No space left") && stderr.contains("--sparse"), "{stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), log_bytes, "heap grow: the refusal changed the log");
    let out = grow(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&small).unwrap().len() > 512 << 30);
}

/// A typed heap that cannot grow on a full disk: the write that needed the
/// growth fails with a typed error and changes nothing; the heap goes on
/// working in the space it has, and every acknowledged write is there
/// after a reopen.
#[test]
fn a_typed_heap_that_cannot_grow_on_a_full_disk_keeps_what_it_has() {
    use rvm::collections::{Config, PHeap, PVec};
    let Some(disk) = SmallDisk::mount(8 << 20) else { return };
    let folder = disk.path("heap");
    let config = Config { heap_len: 256 << 10, max_heap_len: 64 << 20, log_len: 1 << 20, ..Config::default() };
    let heap = PHeap::open_or_create(&folder, config.clone()).unwrap();
    disk.fill();
    // 4 KiB per write, until the heap needs more than the disk has.
    let mut written = 0u64;
    let failure = loop {
        let r = heap.write(|tx| {
            let mut v = tx.root_or_insert_with("items", PVec::<u64>::new)?;
            v.extend(written..written + 512)
        });
        match r {
            Ok(()) => written += 512,
            Err(e) => break e,
        }
        assert!(written < 2 << 20, "the heap grew past the disk's size");
    };
    let text = failure.to_string();
    assert!(written > 0 && text.contains("No space left on device"), "after {written} items: {text}");
    let items = |heap: &PHeap| heap.read(|r| r.root::<PVec<u64>>("items").unwrap().map_or(Vec::new(), |v| v.to_vec()));
    let expected: Vec<u64> = (0..written).collect();
    assert_eq!(items(&heap), expected, "the failed write changed the heap");
    // Smaller writes still fit in the space the heap has.
    heap.write(|tx| tx.root_or_insert_with("small", || 7u64).map(|_| ())).unwrap();
    drop(heap);
    std::fs::remove_file(disk.path("filler")).unwrap();
    let heap = PHeap::open_or_create(&folder, config).unwrap();
    assert_eq!(items(&heap), expected);
}

/// A salvage needs room for its copy of the damaged log: on a full disk it
/// fails with the disk's error, leaves no partial copy, and changes
/// nothing; with room, it goes ahead.
#[test]
fn a_salvage_without_room_for_its_copy_changes_nothing() {
    let Some(disk) = SmallDisk::mount(3 << 20) else { return };
    let log = disk.path("log");
    create_log(&log, 1 << 20).unwrap();
    {
        let rvm = Rvm::open(&log, Options { truncate_threshold: None, ..Options::default() }).unwrap();
        let seg = rvm.create_segment(disk.path("seg"), 64 << 10).unwrap();
        let region = rvm.map(&seg, MapSpec::new(0, 64 << 10)).unwrap();
        for i in 0..200u64 {
            commit(&rvm, &region, (i as usize % 16) * 4096, i, CommitMode::Flush).unwrap();
        }
    }
    // A flipped bit in the records of an early commit, with later synced
    // commits after it: damage, not a torn end.
    let mut bytes = std::fs::read(&log).unwrap();
    let at = rvm::log::format::AREA_OFFSET as usize + 2048;
    bytes[at] ^= 0x10;
    std::fs::write(&log, &bytes).unwrap();
    let e = Rvm::open(&log, Options::default()).expect_err("the damage is refused");
    assert!(matches!(e, Error::Corrupted { .. }), "{e}");
    disk.fill();
    let salvage = Options { salvage: true, ..Options::default() };
    let e = Rvm::open(&log, salvage.clone()).expect_err("no room for the copy");
    assert!(storage_full(&e), "{e}");
    assert_eq!(listing(disk.dir.path()), ["filler", "log", "seg"], "a partial copy was left");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the log was changed");
    std::fs::remove_file(disk.path("filler")).unwrap();
    let rvm = Rvm::open(&log, salvage).unwrap();
    assert!(rvm.recovery_report().salvage.is_some());
}
