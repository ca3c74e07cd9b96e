//! The typed layer end to end on real files: typed roots across reopen,
//! type checks, borrow checks, abort on `Err` and on panic, readers
//! isolated from writers.

use rvm_collections::{Config, Error, PHeap, Persist};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Pair {
    a: u64,
    b: u64,
}

#[derive(Persist, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Other {
    x: u32,
    y: u32,
    z: u64,
}

fn small() -> Config {
    Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() }
}

#[test]
fn roots_survive_reopen_and_keep_their_type() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let base = heap.base();
    heap.write(|tx| {
        tx.root_or_insert_with("pair", || Pair { a: 1, b: 2 })?.a = 10;
        *tx.root_or_insert_with("n", || 5u64)? += 1;
        tx.root_or_insert_with("arr", || [7u8; 16])?[3] = 9;
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.close().unwrap();

    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(heap.base(), base, "the base is recorded in the segment");
    heap.read(|r| {
        assert_eq!(r.root::<Pair>("pair").unwrap().copied(), Some(Pair { a: 10, b: 2 }));
        assert_eq!(r.root::<u64>("n").unwrap().copied(), Some(6));
        let arr = *r.root::<[u8; 16]>("arr").unwrap().unwrap();
        assert_eq!((arr[2], arr[3]), (7, 9));
        assert!(r.root::<u64>("missing").unwrap().is_none());
        // The same size, another layout: refused, never reinterpreted.
        assert!(matches!(r.root::<Other>("pair"), Err(Error::RootType { .. })));
        assert!(matches!(r.root::<[u64; 2]>("pair"), Err(Error::RootType { .. })));
        assert!(matches!(r.root::<i64>("n"), Err(Error::RootType { .. })));
    });
    // Also inside a write transaction, and for creation.
    let r = heap.write(|tx| tx.root_or_insert_with("n", || 0i64).map(|_| ()));
    assert!(matches!(r, Err(Error::RootType { .. })), "{r:?}");
}

#[test]
fn a_root_is_borrowed_mutably_once_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let first = tx.root_or_insert_with("pair", || Pair { a: 1, b: 2 })?;
        assert!(matches!(tx.root_mut::<Pair>("pair"), Err(Error::RootBorrowed { .. })));
        assert!(matches!(tx.root::<Pair>("pair"), Err(Error::RootBorrowed { .. })));
        assert!(matches!(tx.remove_root::<Pair>("pair"), Err(Error::RootBorrowed { .. })));
        drop(first);
        let s1 = tx.root::<Pair>("pair")?.unwrap();
        let s2 = tx.root::<Pair>("pair")?.unwrap();
        assert_eq!(s1.a + s2.b, 3);
        assert!(matches!(tx.root_mut::<Pair>("pair"), Err(Error::RootBorrowed { .. })));
        drop((s1, s2));
        // Two different roots at once are fine.
        let mut p = tx.root_mut::<Pair>("pair")?.unwrap();
        let mut n = tx.root_or_insert_with("n", || 0u64)?;
        *n += p.a;
        p.b = *n;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(heap.read(|r| r.root::<Pair>("pair").unwrap().copied()), Some(Pair { a: 1, b: 1 }));
}

#[derive(Debug)]
enum AppError {
    #[allow(dead_code)] // read through Debug when a test fails
    Heap(Error),
    Refused,
}
impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Heap(e)
    }
}

#[test]
fn err_and_panic_abort_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("pair", || Pair { a: 1, b: 2 }).map(|_| ())).unwrap();
    let live = heap.stats().live_blocks;

    let r = heap.write(|tx| {
        tx.root_mut::<Pair>("pair")?.unwrap().a = 99;
        tx.root_or_insert_with("new", || 5u64)?;
        Err::<(), _>(AppError::Refused)
    });
    assert!(matches!(r, Err(AppError::Refused)));

    let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        heap.write(|tx| {
            tx.root_mut::<Pair>("pair")?.unwrap().b = 77;
            tx.root_or_insert_with("other", || 6u64)?;
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<_, Error>(())
        })
    }));
    assert!(p.is_err(), "the panic continues after the abort");

    heap.read(|r| {
        assert_eq!(r.root::<Pair>("pair").unwrap().copied(), Some(Pair { a: 1, b: 2 }));
        assert!(r.root::<u64>("new").unwrap().is_none());
        assert!(r.root::<u64>("other").unwrap().is_none());
    });
    assert_eq!(heap.stats().live_blocks, live, "aborted allocations are given back");
    heap.check().unwrap();
    // And the heap goes on working (no lock or transaction left behind).
    heap.write(|tx| {
        tx.root_mut::<Pair>("pair")?.unwrap().a = 3;
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.close().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(heap.read(|r| r.root::<Pair>("pair").unwrap().copied()), Some(Pair { a: 3, b: 2 }));
}

#[test]
fn removed_roots_free_their_block() {
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let live = heap.stats().live_blocks;
    heap.write(|tx| tx.root_or_insert_with("gone", || [1u64; 32]).map(|_| ())).unwrap();
    // Its block, and the shape table (the first root of a type records
    // the type's shape in it).
    assert_eq!(heap.stats().live_blocks, live + 2);
    assert!(heap.write(|tx| tx.remove_root::<[u64; 32]>("gone")).unwrap());
    assert!(!heap.write(|tx| tx.remove_root::<[u64; 32]>("gone")).unwrap());
    assert_eq!(heap.stats().live_blocks, live + 1);
    heap.check().unwrap();
}

#[test]
fn readers_never_see_half_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let heap = Arc::new(PHeap::open_or_create(dir.path(), small()).unwrap());
    heap.write(|tx| tx.root_or_insert_with("pair", || Pair { a: 0, b: 1000 }).map(|_| ())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Both readers read once before the writes begin, then keep reading
    // until the writes are done (and at least once while they run: the
    // writer yields between its transactions).
    let started = Arc::new(std::sync::Barrier::new(3));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (heap, stop, started) = (heap.clone(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                let mut seen = 0u64;
                loop {
                    let stopping = stop.load(Ordering::Relaxed);
                    let p = heap.read(|r| r.root::<Pair>("pair").unwrap().copied().unwrap());
                    assert_eq!(p.a + p.b, 1000, "a reader saw half a transfer: {p:?}");
                    seen += 1;
                    if seen == 1 {
                        started.wait();
                    } else if stopping {
                        break seen;
                    }
                }
            })
        })
        .collect();
    started.wait();
    for i in 0..300u64 {
        std::thread::yield_now();
        heap.write_no_flush(|tx| {
            let mut p = tx.root_mut::<Pair>("pair")?.unwrap();
            let amount = i % 7;
            if p.b >= amount {
                p.b -= amount;
                p.a += amount;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    heap.flush().unwrap();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 1);
    }
    let p = heap.read(|r| r.root::<Pair>("pair").unwrap().copied().unwrap());
    assert_eq!(p.a + p.b, 1000);
}

#[test]
fn heaps_pick_distinct_bases_and_an_unfinished_creation_is_redone() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A crash while the heap segment was being made leaves this file.
    std::fs::write(d2.path().join("heap.seg.creating"), vec![0u8; 8192]).unwrap();
    let h1 = PHeap::open_or_create(d1.path(), small()).unwrap();
    let h2 = PHeap::open_or_create(d2.path(), small()).unwrap();
    assert_ne!(h1.base(), h2.base());
    assert!(!d2.path().join("heap.seg.creating").exists());
    for (h, v) in [(&h1, 1u64), (&h2, 2)] {
        h.write(|tx| tx.root_or_insert_with("v", || v).map(|_| ())).unwrap();
    }
    assert_eq!(h1.read(|r| r.root::<u64>("v").unwrap().copied()), Some(1));
    assert_eq!(h2.read(|r| r.root::<u64>("v").unwrap().copied()), Some(2));
    // A fixed base is honoured.
    let d3 = tempfile::tempdir().unwrap();
    let base = 0x5e00_0000_0000u64;
    let h3 = PHeap::open_or_create(d3.path(), Config { base: Some(base), ..small() }).unwrap();
    assert_eq!(h3.base() as u64, base);
    // A bad size is a typed error.
    let d4 = tempfile::tempdir().unwrap();
    assert!(matches!(PHeap::open_or_create(d4.path(), Config { heap_len: 1000, ..small() }), Err(Error::Config(_))));
}

#[test]
fn the_folder_is_opened_exclusively() {
    let dir = tempfile::tempdir().unwrap();
    let _h = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert!(matches!(PHeap::open_or_create(dir.path(), small()), Err(Error::Core(rvm_core::Error::Locked { .. }))));
}

#[test]
fn strings_stay_utf8_across_changes_aborts_and_reopen() {
    use rvm_collections::PString;
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| {
        let mut s = tx.root_or_insert_with("s", PString::new)?;
        s.push_str("naïve ")?;
        s.push('☃')?;
        assert_eq!(s.pop()?, Some('☃'));
        s.push_str("café")?;
        Ok::<_, Error>(())
    })
    .unwrap();
    // A truncate inside a character panics (as String's does): the
    // transaction aborts, the string is unchanged.
    let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        heap.write(|tx| {
            let mut s = tx.root_mut::<PString>("s")?.unwrap();
            s.push_str(" more")?;
            s.truncate(3)?; // inside 'ï'
            Ok::<_, Error>(())
        })
    }));
    assert!(p.is_err());
    heap.close().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    let s = heap.read(|r| r.root::<PString>("s").unwrap().map(|s| s.as_str().to_owned()));
    assert_eq!(s.as_deref(), Some("naïve café"));
    // A string is not a byte vector (another fingerprint).
    assert!(matches!(heap.read(|r| r.root::<rvm_collections::PVec<u8>>("s").map(|_| ())), Err(Error::RootType { .. })));
    assert!(heap.write(|tx| tx.remove_root::<PString>("s")).unwrap());
    heap.check().unwrap();
    assert_eq!(heap.stats().live_blocks, 1, "the string's buffer is freed with its root (the shape table stays)");
}

#[test]
fn a_root_removed_and_made_again_in_one_transaction_is_the_new_one() {
    use rvm_collections::PVec;
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("n", || 5u64).map(|_| ())).unwrap();
    heap.write(|tx| {
        assert!(tx.remove_root::<u64>("n")?);
        assert!(tx.root::<u64>("n")?.is_none(), "a removed root is gone for the rest of the transaction");
        assert!(tx.root_mut::<u64>("n")?.is_none());
        *tx.root_or_insert_with("n", || 100u64)? += 1;
        // A collection that grows, then is borrowed again in the same
        // transaction: its new block is live for this transaction.
        tx.root_or_insert_with("v", PVec::<u64>::new)?.extend(0..100)?;
        assert_eq!(tx.root::<PVec<u64>>("v")?.unwrap().len(), 100);
        tx.root_mut::<PVec<u64>>("v")?.unwrap().push(100)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    heap.close().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    assert_eq!(heap.read(|r| r.root::<u64>("n").unwrap().copied()), Some(101));
    assert_eq!(heap.read(|r| r.root::<PVec<u64>>("v").unwrap().map(|v| v.len())), Some(101));
    heap.check().unwrap();
    // Two roots, the vector's buffer, the shape table.
    assert_eq!(heap.stats().live_blocks, 4);
}

#[test]
fn a_closed_heaps_range_is_not_given_to_a_new_heap() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let h1 = PHeap::open_or_create(d1.path(), small()).unwrap();
    let base = h1.base();
    h1.close().unwrap();
    // While the first heap is closed its range is free to the kernel, but
    // not to another heap of this process.
    let h2 = PHeap::open_or_create(d2.path(), small()).unwrap();
    assert_ne!(h2.base(), base);
    let h1 = PHeap::open_or_create(d1.path(), small()).unwrap();
    assert_eq!(h1.base(), base);
}

/// A root's check runs once per open heap (later borrows find it in the
/// checked set), but bytes the raw API writes after that are still seen:
/// `raw_heap` turns the cache off.
#[test]
fn a_checked_root_damaged_through_the_raw_api_is_refused() {
    use rvm_collections::PHashMap;
    use rvm_core::{CommitMode, RestoreMode};
    let dir = tempfile::tempdir().unwrap();
    let heap = PHeap::open_or_create(dir.path(), small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?.insert(1, 10).map(|_| ())).unwrap();
    // Checked (and remembered) by a write and a read.
    heap.write(|tx| tx.root_mut::<PHashMap<u64, u64>>("m").map(|m| assert_eq!(m.unwrap().get(&1), Some(&10)))).unwrap();
    assert_eq!(heap.read(|r| r.root::<PHashMap<u64, u64>>("m").map(|m| m.unwrap().len())).unwrap(), 1);
    // SAFETY: no typed transaction runs while this one does; it writes a
    // slot count that is not a power of two into the map's header (damage
    // the check must see; no reference into the block exists).
    unsafe {
        let raw = heap.raw_heap();
        let root = raw.root("m").unwrap();
        let mut htx = raw.begin(RestoreMode::Restore).unwrap();
        htx.write(root.ptr.add(16), &3u64.to_ne_bytes()).unwrap();
        htx.commit(CommitMode::Flush).unwrap();
    }
    assert!(matches!(heap.read(|r| r.root::<PHashMap<u64, u64>>("m").map(|_| ())), Err(Error::Damaged { .. })));
    let r = heap.write(|tx| tx.root_mut::<PHashMap<u64, u64>>("m").map(|_| ()));
    assert!(matches!(r, Err(Error::Damaged { .. })));
}

/// Durable writes from several threads share syncs (a writer waits for the
/// disk after releasing the writer lock); a crash at a random moment keeps
/// every write that was acknowledged, on every thread.
#[test]
fn concurrent_durable_writers_lose_nothing_acknowledged_in_a_crash() {
    use rvm_collections::PBTreeMap;
    use rvm_core::testing::{CrashMode, SimDisk};
    use std::path::Path;
    for seed in 0..6u64 {
        let disk = SimDisk::new();
        let heap = Arc::new(PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("db"), small()).unwrap());
        heap.write(|tx| tx.root_or_insert_with("m", PBTreeMap::<u64, u64>::new).map(|_| ())).unwrap();
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let heap = heap.clone();
                std::thread::spawn(move || {
                    let mut acknowledged = Vec::new();
                    for i in 0..10_000u64 {
                        let key = t << 32 | i;
                        let r = heap.write(|tx| {
                            tx.root_mut::<PBTreeMap<u64, u64>>("m")?.unwrap().insert(key, i)?;
                            Ok::<_, Error>(())
                        });
                        match r {
                            Ok(()) => acknowledged.push(key),
                            Err(_) => break, // the disk is gone
                        }
                    }
                    acknowledged
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(5 + seed * 7));
        disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: true });
        let acknowledged: Vec<u64> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        drop(heap);
        let heap = PHeap::open_or_create_with(Arc::new(disk.clone()), Path::new("db"), small()).unwrap();
        heap.read(|r| {
            let m = r.root::<PBTreeMap<u64, u64>>("m").unwrap().unwrap();
            for k in &acknowledged {
                assert_eq!(m.get(k), Some(&(k & 0xffff_ffff)), "acknowledged write {k:#x} lost (seed {seed})");
            }
        });
        heap.check().unwrap();
    }
}

/// After `close` the heap file holds every commit: the folder can be
/// moved, and the heap file alone copied into a fresh folder, and both
/// open with everything in them.
#[test]
fn a_closed_folder_can_be_moved_and_its_heap_file_copied_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let heap = PHeap::open_or_create(&a, small()).unwrap();
    for i in 0..50u64 {
        heap.write_no_flush(|tx| {
            let mut p = tx.root_or_insert_with("pair", || Pair { a: 0, b: 0 })?;
            p.a += i;
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    heap.close().unwrap();
    std::fs::rename(&a, &b).unwrap();
    let heap = PHeap::open_or_create(&b, small()).unwrap();
    assert_eq!(heap.read(|r| r.root::<Pair>("pair").unwrap().copied()), Some(Pair { a: 1225, b: 0 }));
    heap.write(|tx| tx.root_mut::<Pair>("pair").map(|p| p.unwrap().b = 7)).unwrap();
    heap.close().unwrap();
    std::fs::create_dir(&c).unwrap();
    std::fs::copy(b.join("heap.seg"), c.join("heap.seg")).unwrap();
    let heap = PHeap::open_or_create(&c, small()).unwrap();
    assert_eq!(heap.read(|r| r.root::<Pair>("pair").unwrap().copied()), Some(Pair { a: 1225, b: 7 }));
    heap.check().unwrap();
    heap.close().unwrap();
    // The log of a closed folder holds nothing the heap file lacks: a new
    // log takes the heap file over.
    std::fs::remove_file(b.join("rvm.log")).unwrap();
    let heap = PHeap::open_or_create(&b, small()).unwrap();
    assert_eq!(heap.read(|r| r.root::<Pair>("pair").unwrap().copied()), Some(Pair { a: 1225, b: 7 }));
    heap.close().unwrap();
}

/// A log lost after a crash may have held commits the heap file lacks:
/// a new log does not take the heap file over (where the file system
/// keeps the owner mark).
#[test]
fn a_heap_whose_log_was_lost_after_a_crash_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("db");
    let heap = PHeap::open_or_create(&dir, small()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("pair", || Pair { a: 1, b: 2 }).map(|_| ())).unwrap();
    drop(heap); // as a crash would leave it: the commit is in the log only
    std::fs::remove_file(dir.join("rvm.log")).unwrap();
    let marked = std::fs::File::open(dir.join("heap.seg"))
        .ok()
        .and_then(|f| rustix::fs::fgetxattr(&f, "user.rvm.log", &mut [0u8; 4096][..]).ok())
        .is_some();
    if !marked {
        eprintln!("skipped: no owner mark (the file system has no user extended attributes)");
        return;
    }
    // (The error arrives through the loader, which opens the segment.)
    let e = PHeap::open_or_create(&dir, small()).map(|_| ()).unwrap_err();
    assert!(format!("{e:?}").contains("SegmentLogGone"), "{e:?}");
    assert!(e.to_string().contains("accept"), "{e}");
    // Accepted as it stands: it opens, without the lost commit.
    let seg = dir.join("heap.seg");
    let config = Config { options: small().options.accept_segment(&seg, &seg), ..small() };
    let heap = PHeap::open_or_create(&dir, config).unwrap();
    assert_eq!(heap.read(|r| r.root::<Pair>("pair").unwrap().copied()), None);
    heap.check().unwrap();
}
