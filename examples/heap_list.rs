//! A persistent linked list in the recoverable heap: records that survive
//! restarts, kills and crashes, linked by ordinary (absolute) pointers.
//!
//! ```text
//! cargo run --release --example heap_list            # uses $TMPDIR/rvm-heap-list
//! cargo run --release --example heap_list -- ./data  # or a folder of your choice
//! ```
//!
//! Each run opens (and on the first run creates) a log and a heap segment in
//! the folder. The heap is loaded at a fixed address, so the pointers stored
//! in it are valid as they are. The run prints the list, then appends 20
//! records, each in its own flush-committed transaction that allocates the
//! record, links it at the tail and, once the list holds 50 records, frees
//! the oldest one. Kill it at any moment and run it again: the list is whole
//! and every record it reported committed is there.

#[path = "common/folder.rs"]
mod folder;
use rvm::heap::bytemuck::{self, NoUninit};
use rvm::heap::{HeapSpec, PersistentHeap};
use rvm::{create_log, CommitMode, Options, RestoreMode, Rvm};
use std::alloc::Layout;
use std::mem::offset_of;
use std::ptr::NonNull;

/// Where the heap lives in the address space (page-aligned, fixed for the
/// life of the heap: pointers inside it depend on it).
const BASE: u64 = 0x5c00_0000_0000;
/// Type tag of the list's root.
const LIST_TAG: u64 = 0x4c49_5354; // "LIST"
/// Records kept; older ones are freed.
const KEEP: u64 = 50;

/// The root: the list's ends and counters. `NoUninit` (no padding bytes)
/// is what `root_or_init` asks of a root's type: all its bytes go to the log.
#[derive(Clone, Copy, Debug, NoUninit)]
#[bytemuck(crate = "rvm::heap::bytemuck")]
#[repr(C)]
struct List {
    /// Address of the oldest record (0: empty).
    head: u64,
    /// Address of the newest record (0: empty).
    tail: u64,
    /// Records in the list.
    len: u64,
    /// Records ever appended.
    appended: u64,
    /// Completed runs.
    runs: u64,
}

/// A record of the list.
#[derive(Clone, Copy, Debug, NoUninit)]
#[bytemuck(crate = "rvm::heap::bytemuck")]
#[repr(C)]
struct Record {
    /// Address of the next (newer) record, 0 at the tail.
    next: u64,
    /// Number of the record (1, 2, ...).
    seq: u64,
    /// Text, NUL-padded.
    text: [u8; 48],
}

fn bytes_of<T: NoUninit>(v: &T) -> Vec<u8> {
    bytemuck::bytes_of(v).to_vec()
}

/// Reads a `T` stored in the heap at `addr`.
///
/// # Safety
///
/// `addr` must hold a `T` written by a committed transaction, in a heap that
/// is loaded, and no transaction may be writing it.
unsafe fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: per the contract.
    unsafe { (addr as *const T).read() }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = folder::folder(std::env::args_os().nth(1), "rvm-heap-list")?;
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("list.log");
    let seg = dir.join("list.heap");
    if !log.exists() {
        create_log(&log, 4 << 20)?;
    }
    let rvm = Rvm::open(&log, Options::default())?;
    let heap = if seg.exists() {
        PersistentHeap::open(&rvm, &seg)?
    } else {
        println!("creating a 4 MiB heap at {BASE:#x} in {}", seg.display());
        PersistentHeap::create(&rvm, &seg, &HeapSpec::new(BASE, 4 << 20))?
    };
    let root = heap.root_or_init("list", LIST_TAG, || List { head: 0, tail: 0, len: 0, appended: 0, runs: 0 })?;
    let list_addr = root.as_ptr() as u64;

    // SAFETY: the root holds a List; this program's one thread is its only user.
    let list: List = unsafe { read(list_addr) };
    println!(
        "{} completed run(s), {} record(s) appended in all; the list holds {}:",
        list.runs, list.appended, list.len
    );
    let mut at = list.head;
    let mut walked = 0;
    while at != 0 {
        // SAFETY: every link was written, with its record, by a committed
        // transaction, and points at a live record block.
        let r: Record = unsafe { read(at) };
        let end = r.text.iter().position(|&b| b == 0).unwrap_or(r.text.len());
        if walked < 3 || r.next == 0 {
            println!("  #{:<5} at {at:#x}: {}", r.seq, String::from_utf8_lossy(&r.text[..end]));
        } else if walked == 3 {
            println!("  ...");
        }
        walked += 1;
        at = r.next;
    }
    assert_eq!(walked, list.len, "the list's length and its links agree");

    let run = list.runs + 1;
    for i in 0..20 {
        let mut tx = heap.begin(RestoreMode::Restore)?;
        // SAFETY: as above.
        let mut list: List = unsafe { read(list_addr) };
        list.appended += 1;
        let mut text = [0u8; 48];
        let msg = format!("record {} (run {run}, step {i})", list.appended);
        text[..msg.len()].copy_from_slice(msg.as_bytes());
        let rec = tx.malloc(Layout::new::<Record>())?;
        let rec_addr = rec.as_ptr() as u64;
        // SAFETY: the new block is this transaction's; the list and its
        // records are used by this thread alone (so for the stores below too).
        unsafe { tx.write(rec, &bytes_of(&Record { next: 0, seq: list.appended, text }))? };
        if list.tail == 0 {
            list.head = rec_addr;
        } else {
            let next_field = NonNull::new((list.tail + offset_of!(Record, next) as u64) as *mut u8).ok_or("null")?;
            // SAFETY: see above.
            unsafe { tx.write(next_field, &rec_addr.to_le_bytes())? };
        }
        list.tail = rec_addr;
        list.len += 1;
        if list.len > KEEP {
            // Drop the oldest record: freed when this transaction commits.
            let oldest = list.head;
            // SAFETY: a live record (see the walk above).
            list.head = unsafe { read::<Record>(oldest) }.next;
            list.len -= 1;
            tx.free(NonNull::new(oldest as *mut u8).ok_or("null")?)?;
        }
        // SAFETY: see above.
        unsafe { tx.write(root.cast(), &bytes_of(&list))? };
        tx.commit(CommitMode::Flush)?;
    }
    let mut tx = heap.begin(RestoreMode::Restore)?;
    // SAFETY: as above.
    let runs = unsafe { read::<List>(list_addr) }.runs + 1;
    let runs_field = NonNull::new((list_addr + offset_of!(List, runs) as u64) as *mut u8).ok_or("null")?;
    // SAFETY: as above.
    unsafe { tx.write(runs_field, &runs.to_le_bytes())? };
    tx.commit(CommitMode::Flush)?;

    let report = heap.check()?;
    let stats = heap.stats();
    println!(
        "appended 20 records; heap check passed: {} live block(s), {} bytes in use, {} free (largest free block {})",
        report.allocated, stats.bytes_in_use, stats.free_bytes, stats.largest_free
    );
    println!("run it again (or kill it mid-run and run it again): the list carries on from here");
    heap.close()?;
    rvm.close()?;
    Ok(())
}

fn main() {
    // Errors are shown by their `Display` (what went wrong, and where), not `Debug`.
    if let Err(e) = run() {
        eprintln!("heap_list: error: {e}");
        std::process::exit(1);
    }
}
