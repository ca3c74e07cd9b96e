//! Basic heap behaviour: allocation, deferred free, abort, typed errors,
//! roots, alignment, reload through the loader, corrupted heaps refused.

mod common;

use common::{fresh_base, Disk};
use rvm_core::testing::CrashMode;
use rvm_core::{create_log, CommitMode, Options, RestoreMode, Rvm};
use rvm_heap::{HeapError, HeapSpec, PersistentHeap, DEFAULT_ROOT_SLOTS};
use std::alloc::Layout;
use std::ptr::NonNull;

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

fn offset(p: NonNull<u8>, n: usize) -> NonNull<u8> {
    NonNull::new((p.as_ptr() as usize + n) as *mut u8).unwrap()
}

#[test]
fn alloc_free_abort_and_reload() {
    let disk = Disk::new(1 << 20, false);
    let (rvm, heap) = disk.open(true).unwrap();
    let free0 = heap.stats().free_bytes;

    // An aborted allocation comes back.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.malloc(layout(100, 8)).unwrap();
    assert!(heap.stats().free_bytes < free0);
    assert_eq!(heap.stats().reserved_bytes, 128);
    tx.abort();
    assert_eq!(heap.stats().free_bytes, free0);
    heap.check().unwrap();

    // Committed allocations, with data and a root.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let a = tx.malloc(layout(100, 8)).unwrap();
    let b = tx.malloc(layout(3000, 256)).unwrap();
    assert_eq!(b.as_ptr() as usize % 256, 0);
    // SAFETY: both blocks belong to this transaction.
    unsafe {
        tx.set_range(a, 100).unwrap();
        a.as_ptr().write_bytes(7, 100);
    }
    tx.set_root("a", Some((a, 100, 1))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    heap.check().unwrap();
    let st = heap.stats();
    assert_eq!((st.live_blocks, st.allocations, st.frees), (2, 2, 0));
    assert_eq!(st.live_per_class.iter().sum::<u64>(), 2);

    // A free is deferred: an abort keeps the block.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.free(b).unwrap();
    assert!(matches!(tx.free(b), Err(HeapError::DoubleFree { .. })));
    tx.abort();
    heap.check().unwrap();
    assert_eq!(heap.stats().live_blocks, 2);

    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.free(b).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    heap.check().unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    assert!(matches!(tx.free(b), Err(HeapError::DoubleFree { .. })));
    for bogus in [offset(a, 32), offset(a, 1), NonNull::new(8 as *mut u8).unwrap(), heap.static_region().as_ptr()] {
        assert!(matches!(tx.free(bogus), Err(HeapError::InvalidPointer { .. })), "{bogus:?}");
    }
    // Allocated and freed in one transaction: as if never allocated; twice
    // is a double free.
    let c = tx.malloc(layout(10, 1)).unwrap();
    tx.free(c).unwrap();
    assert!(matches!(tx.free(c), Err(HeapError::DoubleFree { .. })));
    tx.commit(CommitMode::NoFlush).unwrap();
    assert_eq!(heap.stats().allocations, 2);
    heap.check().unwrap();

    drop(heap);
    disk.disk.crash(CrashMode::KeepRandomSubset { seed: 3, tear_last: true });
    drop(rvm);
    let (_rvm, heap) = disk.open(false).unwrap();
    heap.check().unwrap();
    let st = heap.stats();
    assert_eq!((st.live_blocks, st.allocations, st.frees), (1, 2, 1));
    let root = heap.root("a").unwrap();
    assert_eq!(root.ptr, a);
    // SAFETY: the root block is live and nothing else uses it.
    assert_eq!(unsafe { root.ptr.as_ptr().read() }, 7);
}

#[test]
fn sizes_alignments_and_out_of_memory() {
    let disk = Disk::new(1 << 20, false);
    let (_rvm, heap) = disk.open(true).unwrap();
    let total = heap.stats().heap_bytes;
    let mut tx = heap.begin(RestoreMode::NoRestore).unwrap();
    // Most of the heap in one block.
    let big = tx.malloc(layout(total as usize - 64, 8)).unwrap();
    assert!(matches!(tx.malloc(layout(64, 8)), Err(HeapError::OutOfMemory { .. })));
    tx.commit(CommitMode::NoFlush).unwrap();
    let mut tx = heap.begin(RestoreMode::NoRestore).unwrap();
    tx.free(big).unwrap();
    tx.commit(CommitMode::NoFlush).unwrap();
    let mut tx = heap.begin(RestoreMode::NoRestore).unwrap();
    let e = tx.malloc(layout(total as usize, 8)).unwrap_err();
    assert!(matches!(e, HeapError::OutOfMemory { largest, .. } if largest == total), "{e}");
    assert!(e.to_string().contains("out of memory"), "{e}");
    // Every power-of-two alignment the heap can hold.
    let mut blocks = Vec::new();
    for shift in 0..=18 {
        let p = tx.malloc(layout(1 + shift * 3, 1 << shift)).unwrap();
        assert_eq!(p.as_ptr() as usize % (1 << shift), 0, "alignment {}", 1 << shift);
        blocks.push(p);
    }
    assert!(matches!(tx.malloc(layout(8, 1 << 21)), Err(HeapError::OutOfMemory { .. })));
    // Zero-sized requests get distinct blocks.
    let z1 = tx.malloc(layout(0, 1)).unwrap();
    let z2 = tx.malloc(layout(0, 1)).unwrap();
    assert_ne!(z1, z2);
    tx.commit(CommitMode::NoFlush).unwrap();
    heap.check().unwrap();
    let st = heap.stats();
    assert_eq!(st.live_blocks, 21);
    assert_eq!(st.free_bytes + st.bytes_in_use, total);
    let mut tx = heap.begin(RestoreMode::NoRestore).unwrap();
    for p in blocks.into_iter().chain([z1, z2]) {
        tx.free(p).unwrap();
    }
    tx.commit(CommitMode::NoFlush).unwrap();
    let report = heap.check().unwrap();
    assert_eq!((report.allocated, report.free_bytes), (0, total), "{report:?}");
    assert_eq!(heap.stats().free_bytes, total);
    // Small blocks freed stay separate free blocks (size classes), but the
    // whole heap is one block again for a request that needs it.
    let mut tx = heap.begin(RestoreMode::NoRestore).unwrap();
    let all = tx.malloc(layout(total as usize - 24, 16)).unwrap();
    tx.commit(CommitMode::NoFlush).unwrap();
    assert_eq!(heap.check().unwrap().blocks, 1);
    let mut tx = heap.begin(RestoreMode::NoRestore).unwrap();
    tx.free(all).unwrap();
    tx.commit(CommitMode::NoFlush).unwrap();
    let report = heap.check().unwrap();
    assert_eq!((report.blocks, report.free, report.free_bytes), (1, 1, total), "{report:?}");
}

#[test]
fn roots_typed_listed_and_checked() {
    let disk = Disk::new(1 << 20, false);
    let (rvm, heap) = disk.open(true).unwrap();
    assert_eq!(heap.root_slots(), DEFAULT_ROOT_SLOTS as usize);
    // No padding (the NoUninit bound): all 64 bytes are fields.
    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::NoUninit)]
    #[repr(C, align(64))]
    struct Config {
        version: u64,
        limit: u64,
        spare: [u64; 6],
    }
    let p = heap.root_or_init("config", 0xc0f, || Config { version: 3, limit: 99, spare: [0; 6] }).unwrap();
    assert_eq!(p.as_ptr() as usize % 64, 0);
    // SAFETY: the root block holds a Config written at creation.
    assert_eq!(unsafe { p.as_ptr().read() }, Config { version: 3, limit: 99, spare: [0; 6] });
    // Found again, not created again.
    let q = heap.root_or_init("config", 0xc0f, || Config { version: 0, limit: 0, spare: [1; 6] }).unwrap();
    assert_eq!(p, q);
    assert!(matches!(heap.root_or_init("config", 0xbad, || 0u64), Err(HeapError::RootMismatch { .. })));
    let r = heap.root_or_create("bytes", 5, 1, 7, |b| b.copy_from_slice(b"hello")).unwrap();
    assert_eq!((r.size, r.type_tag), (5, 7));
    let names: Vec<String> = heap.roots().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["config", "bytes"]);
    assert_eq!(heap.stats().allocations, 2);

    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    assert!(matches!(tx.set_root("", None), Err(HeapError::BadRootName { .. })));
    assert!(matches!(tx.set_root(&"x".repeat(37), None), Err(HeapError::BadRootName { .. })));
    assert!(matches!(tx.set_root("a\0b", None), Err(HeapError::BadRootName { .. })));
    // A huge name makes a short message that gives its length.
    let e = tx.set_root(&"é".repeat(50_000), None).unwrap_err();
    let text = e.to_string();
    assert!(text.len() < 200 && text.contains("100000 bytes") && text.contains('…'), "{text}");
    assert!(matches!(tx.set_root("x", Some((offset(r.ptr, 16), 1, 0))), Err(HeapError::InvalidPointer { .. })));
    assert!(matches!(tx.set_root("x", Some((r.ptr, 64, 0))), Err(HeapError::RootTooLarge { .. })));
    tx.free(r.ptr).unwrap();
    assert!(matches!(tx.set_root("x", Some((r.ptr, 1, 0))), Err(HeapError::InvalidPointer { .. })));
    tx.set_root("bytes", None).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    assert!(heap.root("bytes").is_none());
    let report = heap.check().unwrap();
    assert_eq!((report.roots, report.dangling_roots.len()), (1, 0));

    // A rooted block freed without removing its root: reported, not damage.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.free(p.cast()).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    assert_eq!(heap.check().unwrap().dangling_roots, ["config"]);

    // Filling every slot.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    let blk = tx.malloc(layout(8, 8)).unwrap();
    for i in 0..DEFAULT_ROOT_SLOTS {
        tx.set_root(&format!("r{i}"), Some((blk, 8, 0))).unwrap();
    }
    assert!(matches!(tx.commit(CommitMode::Flush), Err(HeapError::RootsFull { slots: 62 })));
    heap.check().unwrap();
    assert_eq!(heap.roots().len(), 1);
    assert_eq!(heap.stats().reserved_bytes, 0);
    drop(heap);
    drop(rvm);
    let (_rvm, heap) = disk.open(false).unwrap();
    assert_eq!(heap.roots().len(), 1);
    assert_eq!(heap.check().unwrap().dangling_roots, ["config"]);
}

/// A commit the core refuses (larger than the log) after the heap has
/// written its headers: everything is put back, in both restore modes.
#[test]
fn a_failed_commit_leaves_the_heap_as_it_was() {
    let disk = Disk::new(8 << 20, false);
    let (_rvm, heap) = disk.open(true).unwrap();
    let mut tx = heap.begin(RestoreMode::NoRestore).unwrap();
    let keep: Vec<_> = (0..40).map(|i| tx.malloc(layout(1 + i * 97, 8)).unwrap()).collect();
    tx.set_root("keep", Some((keep[3], 1, 0))).unwrap();
    tx.commit(CommitMode::Flush).unwrap();
    let before = heap.stats();
    let roots = heap.roots();
    for mode in [RestoreMode::NoRestore, RestoreMode::Restore] {
        let mut tx = heap.begin(mode).unwrap();
        for (i, &p) in keep.iter().enumerate() {
            if i % 3 == 0 {
                tx.free(p).unwrap();
            }
        }
        let small: Vec<_> = (0..30).map(|i| tx.malloc(layout(16 + i * 40, 16)).unwrap()).collect();
        tx.free(small[4]).unwrap();
        tx.set_root("keep", Some((small[7], 8, 1))).unwrap();
        tx.set_root("new", Some((small[9], 8, 1))).unwrap();
        // Larger than the 4 MiB log: the core refuses the commit.
        let big = tx.malloc(layout(5 << 20, 8)).unwrap();
        // SAFETY: the block is this transaction's.
        unsafe { tx.write(big, &vec![0xee; 5 << 20]).unwrap() };
        let e = tx.commit(CommitMode::NoFlush).unwrap_err();
        assert!(
            matches!(e, HeapError::Core(rvm_core::Error::Log(rvm_core::LogError::TransactionTooLarge { .. }))),
            "{e}"
        );
        heap.check().unwrap();
        let after = heap.stats();
        let key = |s: &rvm_heap::HeapStats| {
            (s.allocations, s.frees, s.live_blocks, s.bytes_in_use, s.free_bytes, s.live_per_class, s.reserved_bytes)
        };
        assert_eq!(key(&after), key(&before), "{mode:?}");
        assert_eq!(heap.roots(), roots);
        // A commit that declares only data on the pages whose headers were
        // put back checks those pages: the undeclared-store detector (on
        // in debug builds) used to blame the put-back headers of a
        // no-restore transaction on it.
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        for &p in keep.iter().skip(1).step_by(3) {
            // SAFETY: a committed block of this test, which nothing else uses.
            unsafe { tx.write(p, &[0x5a]).unwrap() };
        }
        tx.commit(CommitMode::NoFlush).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    }
    // And the heap goes on working.
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    tx.free(keep[0]).unwrap();
    tx.malloc(layout(100, 8)).unwrap();
    tx.commit(CommitMode::NoFlush).unwrap();
    heap.check().unwrap();
}

/// Two threads race to create the same root: one creates it, both get it,
/// nothing leaks.
#[test]
fn racing_root_creation_creates_one_root() {
    let disk = Disk::new(1 << 20, false);
    let (_rvm, heap) = disk.open(true).unwrap();
    let got: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| heap.root_or_create("shared", 64, 8, 1, |_| {}).unwrap().ptr.as_ptr() as usize))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|&p| p == got[0]));
    assert_eq!(heap.stats().live_blocks, 1);
    heap.check().unwrap();
}

/// The hazard of a block freed by its own transaction: it must not reach
/// another transaction before this one ends, or this one's restore-mode
/// abort would write old bytes over the other's committed data.
#[test]
fn a_block_freed_by_its_own_transaction_waits_for_the_end() {
    let disk = Disk::new(1 << 20, false);
    let (_rvm, heap) = disk.open(true).unwrap();
    let (to_b, from_a) = std::sync::mpsc::channel();
    let (to_a, from_b) = std::sync::mpsc::channel();
    let theirs = std::thread::scope(|s| {
        let heap = &*heap;
        s.spawn(move || {
            let mut tx = heap.begin(RestoreMode::Restore).unwrap();
            let p = tx.malloc(layout(48, 16)).unwrap();
            // SAFETY: the block is this transaction's.
            unsafe { tx.write(p, &[0xaa; 48]).unwrap() };
            tx.free(p).unwrap();
            to_b.send(()).unwrap();
            from_b.recv().unwrap();
            tx.abort();
        });
        let b = s.spawn(move || {
            from_a.recv().unwrap();
            let mut tx = heap.begin(RestoreMode::Restore).unwrap();
            let q = tx.malloc(layout(48, 16)).unwrap();
            // SAFETY: the block is this transaction's.
            unsafe { tx.write(q, &[0x55; 48]).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
            to_a.send(()).unwrap();
            q.as_ptr() as usize
        });
        b.join().unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(10));
    heap.check().unwrap();
    let mut buf = [0u8; 48];
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { heap.heap_region().read(theirs - heap.heap_region().addr(), &mut buf) }.unwrap();
    assert_eq!(buf, [0x55; 48]);
}

/// A heap whose persistent state fails the check on load is reported and
/// not used: its segment is unloaded again.
#[test]
fn a_corrupted_heap_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let path = dir.path().join("heap");
    create_log(&log, 1 << 20).unwrap();
    let spec = HeapSpec::fixed(fresh_base(), 1 << 20);
    let (block_at, counters_at) = {
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        let heap = PersistentHeap::create(&rvm, &path, &spec).unwrap();
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        let p = tx.malloc(layout(100, 8)).unwrap();
        tx.commit(CommitMode::Flush).unwrap();
        let seg_off = |addr: usize| {
            let (name, r) =
                heap.segment().regions().find(|(_, r)| addr >= r.addr() && addr < r.addr() + r.len()).unwrap();
            assert!(name.starts_with("heap"));
            r.segment_offset() + (addr - r.addr()) as u64
        };
        let at = (seg_off(p.as_ptr() as usize - 16), seg_off(heap.static_region().addr() + 64));
        heap.close().unwrap();
        rvm.truncate().unwrap();
        at
    };
    let damage = |at: u64, f: &dyn Fn(u8) -> u8| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut b = [0u8];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[f(b[0])], at).unwrap();
    };
    for (at, what) in [(block_at, "heap block"), (block_at + 100 + 16 + 2, "tail guard"), (counters_at, "counters")] {
        damage(at, &|b| b ^ 0x10);
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        let e = PersistentHeap::open(&rvm, &path).unwrap_err();
        assert!(e.is_corruption() && matches!(e, HeapError::Corrupted { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
        assert!(rvm_loader::testing::range_is_free(spec.base() as usize, 2 << 20), "the segment stays loaded");
        drop(rvm);
        damage(at, &|b| b ^ 0x10);
    }
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    let heap = PersistentHeap::open(&rvm, &path).unwrap();
    assert_eq!(heap.check().unwrap().allocated, 1);
    // Not a heap segment at all.
    drop(heap);
    let other = dir.path().join("other");
    let map = rvm_loader::LoadMap::new().region(rvm_loader::RegionSpec::new("data", 4096, 4096, fresh_base()));
    rvm_loader::create_segment(&rvm, &other, 8192, &map).unwrap();
    assert!(matches!(PersistentHeap::open(&rvm, &other), Err(HeapError::BadRegions { .. })));
}

/// A heap whose first transaction does not fit the log (a static region of
/// 1 GiB on a 2 MiB log) is refused, and the segment file `create` made is
/// deleted again: the same path takes a heap at once, and the log reopens
/// as before (it holds nothing for the deleted segment).
#[test]
fn a_failed_create_leaves_no_segment_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = (dir.path().join("log"), dir.path().join("heap"));
    create_log(&log, 2 << 20).unwrap();
    let base = fresh_base();
    {
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        let big = HeapSpec::new(base, 1 << 20).with_static_len(1 << 30);
        let Err(e) = PersistentHeap::create(&rvm, &path, &big) else { panic!("a heap too large for the log was made") };
        assert!(
            matches!(e, HeapError::Core(rvm_core::Error::Log(rvm_core::LogError::TransactionTooLarge { .. }))),
            "{e}"
        );
        assert!(!path.exists(), "a failed create left its segment");
        let heap = PersistentHeap::create(&rvm, &path, &HeapSpec::new(base, 1 << 20)).unwrap();
        let mut tx = heap.begin(RestoreMode::Restore).unwrap();
        let p = tx.malloc(layout(8, 8)).unwrap();
        tx.set_root("p", Some((p, 8, 0))).unwrap();
        tx.commit(CommitMode::Flush).unwrap();
    }
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    let heap = PersistentHeap::open(&rvm, &path).unwrap();
    heap.check().unwrap();
    assert!(heap.root("p").is_some());
}

/// A heap prints where it is and how large in a few lines (it printed the
/// allocator's free lists, counters and every root slot), and printing it
/// inside one of its transactions does not wait for a lock.
#[test]
fn a_heap_prints_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    create_log(&log, 1 << 20).unwrap();
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &HeapSpec::fixed(fresh_base(), 1 << 20)).unwrap();
    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    for _ in 0..100 {
        tx.malloc(layout(48, 8)).unwrap();
    }
    let inside = format!("{:?}", heap.heap());
    tx.commit(CommitMode::Flush).unwrap();
    let line = format!("{:?}", heap.heap());
    assert_eq!(inside, line);
    assert!(line.starts_with("Heap { heap_region: Region { addr: "), "{line}");
    assert!(line.contains(&format!("root_slots: {DEFAULT_ROOT_SLOTS}")), "{line}");
    assert!(line.len() < 600, "{} bytes: {line}", line.len());
    let whole = format!("{heap:?}");
    assert!(whole.len() < 3000, "{} bytes: {whole}", whole.len());
}
