//! A process that makes and closes many heaps in turn (a property test, a
//! heap per tenant) keeps running: closed heaps keep their address ranges
//! reserved only up to a limit, oldest let go first. Its own test binary:
//! it fills a large part of the process's address space.

use rvm_collections::{Config, PHeap};
use rvm_core::storage::Vfs;
use rvm_core::testing::SimDisk;
use std::path::Path;
use std::sync::Arc;

/// Bytes of address space held by `PROT_NONE` mappings of this process
/// (the reservations of closed heaps, among others).
fn inaccessible_bytes() -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
    maps.lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.starts_with("---")))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
        })
        .sum()
}

/// 160 heaps that may grow to 1 TiB each, made, written and closed one
/// after another: 160 TiB, more than the 128 TiB of address space a
/// process has. Every heap used to keep its range reserved until the
/// process ended, so about the 127th failed ("picking a base address":
/// out of memory). Now every one is made, the reservations stay under 33
/// TiB, the last heap opens again with its data, and so does the first
/// (its range was let go; nothing took it).
#[test]
fn closed_heaps_never_exhaust_the_address_space() {
    let config = Config { heap_len: 1 << 20, max_heap_len: 1 << 40, log_len: 1 << 20, ..Config::default() };
    let dir = Path::new("db");
    let disks: Vec<SimDisk> = (0..160).map(|_| SimDisk::new()).collect();
    for (i, disk) in disks.iter().enumerate() {
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        let heap = PHeap::open_or_create_with(vfs, dir, config.clone())
            .unwrap_or_else(|e| panic!("heap {i} of 160 could not be made: {e}"));
        heap.write(|tx| tx.root_or_insert_with("n", || i as u64).map(|_| ())).unwrap();
        drop(heap);
        assert!(inaccessible_bytes() < 33 << 40, "closed heaps hold {} TiB after {i}", inaccessible_bytes() >> 40);
    }
    for i in [159, 0] {
        let heap = PHeap::open_or_create_with(Arc::new(disks[i].clone()), dir, config.clone()).unwrap();
        assert_eq!(heap.read(|r| r.root::<u64>("n").map(|n| n.copied())).unwrap(), Some(i as u64));
    }
}
