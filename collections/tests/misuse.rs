//! Misuse of the typed layer's handles that must end in an error (or a
//! documented panic), never in a deadlock: closure transactions nested on
//! one thread, reads waiting behind a queued writer.

use rvm_collections::{Config, Error, PHeap, PVec};
use std::sync::Arc;
use std::time::Duration;

fn small() -> Config {
    Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() }
}

/// Runs `f` on a thread and fails if it does not end within 20 s (a
/// deadlock); returns its result, or the panic message.
fn within_deadline<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("a deadlock: no end after 20 s")
}

fn values(heap: &PHeap) -> Vec<u64> {
    heap.read(|r| r.root::<PVec<u64>>("v").unwrap().map_or(Vec::new(), |v| v.to_vec()))
}

/// `write` inside a `write` of the same heap on the same thread used to
/// wait for the writer lock its own thread held: a deadlock. Now
/// `Error::NestedTransaction`, and the outer write goes on.
#[test]
fn a_write_inside_a_write_of_the_same_heap_is_refused_not_a_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let heap = Arc::new(PHeap::open_or_create(dir.path(), small()).unwrap());
    let h = heap.clone();
    let inner = within_deadline(move || {
        h.write(|tx| {
            tx.root_or_insert_with("v", PVec::<u64>::new)?.push(1)?;
            let inner = h.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(2));
            Ok::<_, Error>(format!("{inner:?}"))
        })
    })
    .unwrap()
    .unwrap();
    assert_eq!(inner, "Err(NestedTransaction)");
    assert_eq!(values(&heap), [1]);
}

/// A write inside a read, and a check inside a write, of the same heap on
/// the same thread: refused (they used to deadlock). A check inside a read
/// and a write of another heap inside a write are fine.
#[test]
fn a_write_inside_a_read_and_a_check_inside_a_write_are_refused() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let heap = Arc::new(PHeap::open_or_create(d1.path(), small()).unwrap());
    let other = Arc::new(PHeap::open_or_create(d2.path(), small()).unwrap());
    let (h, o) = (heap.clone(), other.clone());
    within_deadline(move || {
        let r = h.read(|_| h.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(1)));
        assert!(matches!(r, Err(Error::NestedTransaction)), "{r:?}");
        let r = h.write(|_| h.check().map(|_| ()));
        assert!(matches!(r, Err(Error::NestedTransaction)), "{r:?}");
        assert!(h.read(|_| h.check()).unwrap().is_clean());
        h.write(|tx| {
            tx.root_or_insert_with("v", PVec::<u64>::new)?.push(3)?;
            o.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(4))
        })
        .unwrap();
    })
    .unwrap();
    assert_eq!((values(&heap), values(&other)), (vec![3], vec![4]));
}

/// `read` returns no `Result`: inside a write of the same heap on the same
/// thread it panics (documented) instead of waiting for itself; the panic
/// aborts the write and the heap stays usable.
#[test]
fn a_read_inside_a_write_of_the_same_heap_panics_and_aborts_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let heap = Arc::new(PHeap::open_or_create(dir.path(), small()).unwrap());
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(1)).unwrap();
    let h = heap.clone();
    let r = within_deadline(move || {
        h.write(|tx| {
            tx.root_mut::<PVec<u64>>("v")?.unwrap().push(2)?;
            let n = h.read(|r| r.root::<PVec<u64>>("v").map(|v| v.map(|v| v.len())));
            Ok::<_, Error>(format!("{n:?}"))
        })
    });
    let message = r.expect_err("a read inside a write of the same heap must not run");
    assert!(message.contains("inside a write transaction"), "{message}");
    assert_eq!(values(&heap), [1], "the panic aborted the write");
    heap.write(|tx| tx.root_mut::<PVec<u64>>("v")?.unwrap().push(3)).unwrap();
    assert_eq!(values(&heap), [1, 3]);
    assert!(heap.check().unwrap().is_clean());
}

/// A read inside a read of the same heap while another thread waits to
/// write: the writer waits for the outer read, and a fair lock would make
/// the inner read wait for the writer (a deadlock). The inner read goes
/// first.
#[test]
fn a_read_inside_a_read_does_not_wait_for_a_queued_writer() {
    let dir = tempfile::tempdir().unwrap();
    let heap = Arc::new(PHeap::open_or_create(dir.path(), small()).unwrap());
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(1)).unwrap();
    let (h, w) = (heap.clone(), heap.clone());
    let n = within_deadline(move || {
        h.read(|_| {
            let writer = std::thread::spawn(move || w.write(|tx| tx.root_mut::<PVec<u64>>("v")?.unwrap().push(2)));
            // Give the writer time to queue behind this read.
            std::thread::sleep(Duration::from_millis(100));
            let n = h.read(|r| r.root::<PVec<u64>>("v").unwrap().unwrap().len());
            let c = h.check().unwrap().is_clean();
            (n, c, writer)
        })
    })
    .unwrap();
    assert_eq!((n.0, n.1), (1, true));
    n.2.join().unwrap().unwrap();
    assert_eq!(values(&heap), [1, 2]);
}
