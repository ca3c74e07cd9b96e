//! Test support (feature `testing`): the fuzz body for heap images
//! ([`fuzz_heap_image`]), shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/heap_load.rs`) and the seed-corpus test
//! (`heap/tests/fuzz_seeds.rs`), and [`heap_image`] to make seeds.
//!
//! A fuzz input is one flag byte and then a heap image: the static region
//! ([`STATIC_LEN`] bytes: header, counters, root slots) followed by the heap
//! region ([`HEAP_LEN`] bytes), as they lie in the heap's segment. Missing
//! bytes are zero, extra bytes are ignored. Flag bit 0 asks for every
//! checksum of the static area to be recomputed before the load, so that
//! hostile values get past the checksums to the checks behind them.
//!
//! The image is placed in a heap segment (on a [`SimDisk`], at fixed
//! addresses chosen once per process) whose log is empty, then opened with
//! [`PersistentHeap::open`]. A load that fails must leave nothing mapped; a
//! load that succeeds must pass [`Heap::check`], expose roots inside the
//! heap, and survive a few transactions (allocations, frees of the roots'
//! blocks, root changes, commits) with the check still passing.

use crate::{Heap, HeapSpec, PersistentHeap};
use rvm_core::testing::SimDisk;
use rvm_core::{create_log_with, CommitMode, Options, RestoreMode, Rvm, Vfs};
use std::alloc::Layout;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// Bytes of the static region of the fuzzed heap (one page).
pub const STATIC_LEN: usize = 4096;
/// Bytes of the heap region of the fuzzed heap.
pub const HEAP_LEN: usize = 8192;
/// The flag that asks for the static area's checksums to be recomputed.
pub const RESEAL: u8 = 1;

const LOG_LEN: u64 = 256 << 10;

/// The empty log, the segment (load map, formatted heap) and the segment
/// offsets of the static region, made once per process.
struct Template {
    spec: HeapSpec,
    log: Vec<u8>,
    segment: Vec<u8>,
    static_at: usize,
}

/// One fuzz body at a time: every run maps the same fixed addresses.
static LOCK: Mutex<()> = Mutex::new(());
static TEMPLATE: OnceLock<Template> = OnceLock::new();

fn template() -> &'static Template {
    TEMPLATE.get_or_init(|| {
        assert_eq!(rvm_core::page_size(), STATIC_LEN, "the fuzz images assume 4 KiB pages");
        let spec = HeapSpec::fixed(rvm_loader::testing::address_range().at(0), HEAP_LEN as u64);
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        create_log_with(vfs.as_ref(), Path::new("log"), LOG_LEN).expect("create the template log");
        let rvm = Rvm::open_with(vfs, Path::new("log"), Options::default()).expect("open the template log");
        let heap = PersistentHeap::create(&rvm, "heap", &spec).expect("create the template heap");
        let static_at = heap.static_region().segment_offset() as usize;
        heap.close().expect("close the template heap");
        rvm.truncate().expect("truncate the template log");
        rvm.close().expect("close the template instance");
        Template {
            spec,
            log: disk.durable_image("log").expect("template log"),
            segment: disk.durable_image("heap").expect("template segment"),
            static_at,
        }
    })
}

/// Opens the heap of `segment` (an image of the template's segment) on a
/// fresh simulated disk with the template's empty log.
fn open(t: &Template, segment: Vec<u8>) -> (SimDisk, Rvm, crate::Result<PersistentHeap>) {
    let disk = SimDisk::new();
    disk.set_durable_image("log", t.log.clone());
    disk.set_durable_image("heap", segment);
    let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
    let rvm = Rvm::open_with(vfs, Path::new("log"), Options::default()).expect("the template log opens");
    let heap = PersistentHeap::open(&rvm, "heap");
    (disk, rvm, heap)
}

/// A fuzz input (flag byte 0) holding the heap that `populate` makes in a
/// freshly formatted heap at the fuzz addresses, committed and written
/// back to the segment.
pub fn heap_image(populate: impl FnOnce(&Heap)) -> Vec<u8> {
    let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let t = template();
    let (disk, rvm, heap) = open(t, t.segment.clone());
    let heap = heap.expect("the template heap loads");
    populate(&heap);
    heap.close().expect("close the heap");
    rvm.truncate().expect("truncate the log");
    rvm.close().expect("close the instance");
    let seg = disk.durable_image("heap").expect("the segment");
    let mut input = vec![0u8];
    input.extend_from_slice(&seg[t.static_at..t.static_at + STATIC_LEN + HEAP_LEN]);
    input
}

/// The fuzz body: loads `data` as a heap image (see the module docs) and
/// panics exactly when the heap breaks a promise (a panic inside the heap,
/// a failed load that leaves its regions mapped, a load that passes with a
/// heap its own check rejects, a root outside the heap). Returns whether
/// the heap loaded.
pub fn fuzz_heap_image(data: &[u8]) -> bool {
    let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let t = template();
    let (flags, image) = data.split_first().map_or((0, &[][..]), |(f, rest)| (*f, rest));
    let mut segment = t.segment.clone();
    let area = &mut segment[t.static_at..t.static_at + STATIC_LEN + HEAP_LEN];
    area.fill(0);
    let n = image.len().min(area.len());
    area[..n].copy_from_slice(&image[..n]);
    if flags & RESEAL != 0 {
        crate::layout::reseal(&mut area[..STATIC_LEN]);
    }
    let (_disk, rvm, heap) = open(t, segment);
    let base = t.spec.base() as usize;
    let span = STATIC_LEN + HEAP_LEN;
    let heap = match heap {
        Ok(h) => h,
        Err(e) => {
            // Rendering the error must work too.
            assert!(!e.to_string().is_empty());
            assert!(rvm_loader::testing::range_is_free(base, span), "a failed heap load left its regions mapped: {e}");
            return false;
        }
    };
    exercise(&heap);
    heap.close().expect("no transaction is open");
    drop(rvm);
    assert!(rvm_loader::testing::range_is_free(base, span), "closing the heap left its regions mapped");
    true
}

/// What a loaded (possibly hostile) heap must survive.
fn exercise(heap: &Heap) {
    let report = heap.check().unwrap_or_else(|e| panic!("a heap that loaded fails its check: {e}"));
    let region = heap.heap_region();
    let (lo, hi) = (region.addr(), region.addr() + region.len());
    let roots = heap.roots();
    assert_eq!(roots.len() as u64, report.roots);
    for r in &roots {
        let p = r.ptr.as_ptr() as usize;
        let end = (r.size as usize).checked_add(p).expect("a root's end fits the address space");
        assert!(p >= lo && end <= hi, "root {:?} at {p:#x}+{} lies outside the heap", r.name, r.size);
        let mut buf = vec![0u8; r.size as usize];
        // SAFETY: the fuzz driver is single-threaded: nothing stores into
        // the heap while it reads.
        assert!(unsafe { region.read(p - lo, &mut buf) }.is_some());
    }
    let stats = heap.stats();
    assert!(stats.free_bytes + stats.bytes_in_use == stats.heap_bytes, "{stats:?}");
    // Transactions: free every root's block (dangling roots give errors),
    // allocate, re-root, commit; abort one; the check still passes.
    for commit in [false, true] {
        let Ok(mut tx) = heap.begin(RestoreMode::Restore) else { return };
        for r in &roots {
            let _ = tx.free(r.ptr);
            let _ = tx.set_root(&r.name, None);
        }
        for size in [1usize, 40, 300, 2000] {
            if let Ok(p) = tx.malloc(Layout::from_size_align(size, 16).expect("valid layout")) {
                let _ = tx.set_root("fuzz", Some((p, size as u64, 1)));
            }
        }
        if commit {
            let _ = tx.commit(CommitMode::NoFlush);
        } else {
            tx.abort();
        }
        heap.check().unwrap_or_else(|e| panic!("the check fails after a transaction on a loaded heap: {e}"));
    }
    let _ = heap.root_or_create("fuzz2", 24, 8, 2, |b| b.fill(7));
    heap.check().unwrap_or_else(|e| panic!("the check fails after root_or_create on a loaded heap: {e}"));
}
