//! A plain `hashbrown::HashMap` in the recoverable heap, changed with its
//! ordinary methods: no `set_range`, no serialization, and it survives
//! `kill -9`.
//!
//! ```text
//! cargo run --release --example tracked_map            # uses $TMPDIR/rvm-tracked-map
//! cargo run --release --example tracked_map -- ./data  # or a folder of your choice
//! ```
//!
//! The heap is *tracked* (`Heap::track`): its pages are read-only outside
//! transactions, and inside one the first store to each page is caught by
//! a page fault, so the commit logs exactly the bytes the map changed. The
//! map allocates through `TrackedAlloc`, which takes its blocks from the
//! open transaction. Each run adds 20 rounds of 1,000 entries, one
//! flush-committed transaction per round. Kill it at any moment and run it
//! again: every round it reported is there, whole, and no part of an
//! unfinished one.

#[path = "common/folder.rs"]
mod folder;
use foldhash::fast::FixedState;
use rvm::heap::{HeapSpec, PersistentHeap, TrackedAlloc};
use rvm::{create_log, CommitMode, Options, RestoreMode, Rvm};
use std::alloc::Layout;
use std::path::Path;

/// Where the heap lives (fixed: the map's pointers depend on it).
pub const BASE: u64 = 0x5d00_0000_0000;
/// Entries per round (one transaction).
pub const PER_ROUND: u64 = 1000;
/// The key that holds the number of completed rounds.
pub const ROUNDS_KEY: u64 = u64::MAX;

/// The map as it lives in the heap. The hasher's seed is fixed: a random
/// one would hash differently in the next run.
pub type Map = hashbrown::HashMap<u64, u64, FixedState, TrackedAlloc>;

/// The value stored for `key`.
pub fn value_of(key: u64) -> u64 {
    key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed
}

/// The open store: the instance, the tracked heap, and the map in it.
pub struct Store {
    /// The instance.
    pub rvm: Rvm,
    /// The tracked heap.
    pub heap: PersistentHeap,
    /// The map's block (the root "map"), valid while `heap` is loaded.
    map: *mut Map,
}

/// Opens (creating on first use) the log and the heap in `dir` with `opts`,
/// tracks the heap and finds (or creates) the map.
pub fn open(dir: &Path, opts: Options) -> Result<Store, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("map.log");
    let seg = dir.join("map.heap");
    if !log.exists() {
        create_log(&log, 64 << 20)?;
    }
    let rvm = Rvm::open(&log, opts)?;
    let heap = if seg.exists() {
        PersistentHeap::open(&rvm, &seg)?
    } else {
        PersistentHeap::create(&rvm, &seg, &HeapSpec::fixed(BASE, 64 << 20))?
    };
    heap.track()?;
    let map = match heap.root("map") {
        Some(root) => root.ptr.as_ptr().cast::<Map>(),
        None => {
            // SAFETY: the map lives in the heap under the root "map" and
            // changes only inside transactions on the heap.
            let alloc = unsafe { TrackedAlloc::new(&heap) }?;
            let mut tx = heap.begin(RestoreMode::Restore)?;
            let block = tx.malloc(Layout::new::<Map>())?;
            // With a capacity: an empty map that never allocated would
            // point into this binary, which moves between runs.
            let map = Map::with_capacity_and_hasher_in(16, FixedState::with_seed(0x5eed), alloc);
            // SAFETY: a fresh block of this transaction, sized and aligned
            // for a Map.
            unsafe { block.cast::<Map>().as_ptr().write(map) };
            tx.set_root("map", Some((block, std::mem::size_of::<Map>() as u64, 0x4d4150)))?;
            tx.commit(CommitMode::Flush)?;
            block.as_ptr().cast::<Map>()
        }
    };
    Ok(Store { rvm, heap, map })
}

impl Store {
    /// Adds one round of entries in one flush-committed transaction; returns
    /// the number of completed rounds.
    pub fn add_round(&mut self) -> Result<u64, Box<dyn std::error::Error>> {
        let tx = self.heap.begin(RestoreMode::Restore)?;
        // SAFETY: the root holds a Map; this thread holds the heap's (tracked)
        // transaction, and no other reference to the map is alive (`&mut self`).
        let map = unsafe { &mut *self.map };
        // The code a Rust user writes anyway:
        let round = map.get(&ROUNDS_KEY).copied().unwrap_or(0) + 1;
        for i in 0..PER_ROUND {
            let key = (round - 1) * PER_ROUND + i;
            map.insert(key, value_of(key));
        }
        map.insert(ROUNDS_KEY, round);
        tx.commit(CommitMode::Flush)?;
        Ok(round)
    }

    /// Checks the map: `rounds` whole rounds and nothing else. Returns `rounds`.
    pub fn check(&self) -> Result<u64, String> {
        // SAFETY: the root holds a Map; no transaction is open (they live
        // inside `add_round`, which takes `&mut self`).
        let map = unsafe { &*self.map };
        let rounds = map.get(&ROUNDS_KEY).copied().unwrap_or(0);
        let want = rounds * PER_ROUND + u64::from(rounds > 0);
        if map.len() as u64 != want {
            return Err(format!("{} entries for {rounds} rounds (want {want})", map.len()));
        }
        for key in 0..rounds * PER_ROUND {
            if map.get(&key) != Some(&value_of(key)) {
                return Err(format!("key {key} is missing or wrong"));
            }
        }
        Ok(rounds)
    }
}

#[allow(dead_code)]
fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = folder::folder(std::env::args_os().nth(1), "rvm-tracked-map")?;
    let mut store = open(&dir, Options::default())?;
    let rounds = store.check()?;
    println!("the map holds {rounds} round(s) of {PER_ROUND} entries, all present and correct");
    let start = std::time::Instant::now();
    for _ in 0..20 {
        let round = store.add_round()?;
        println!("round {round} committed");
    }
    let secs = start.elapsed().as_secs_f64();
    println!("20 rounds in {secs:.2} s ({:.0} inserts/s, each round flushed)", 20.0 * PER_ROUND as f64 / secs);
    store.check()?;
    store.heap.check()?;
    store.heap.close()?;
    store.rvm.close()?;
    Ok(())
}

fn main() {
    // Errors are shown by their `Display` (what went wrong, and where), not `Debug`.
    if let Err(e) = run() {
        eprintln!("tracked_map: error: {e}");
        std::process::exit(1);
    }
}
