//! A linked list with absolute pointers that survives restarts: the loader
//! maps the segment's regions at the same fixed addresses on every run, so
//! pointers stored in recoverable memory stay valid as they are.
//!
//! ```text
//! cargo run --release --example persistent_list            # uses $TMPDIR/rvm-persistent-list
//! cargo run --release --example persistent_list -- ./data  # or a folder of your choice
//! ```
//!
//! The first run creates a log and a segment whose load map puts a `roots`
//! page at `0x6000_0000_0000` and a `nodes` region at `0x6000_4000_0000`.
//! Every run loads the segment, walks the list from the root by following
//! the stored pointers (plain dereferences, no offsets, no serialization),
//! prints it, and pushes one node for this run in a flush-committed
//! transaction. Kill it at any moment and run it again: the list holds
//! every run that reported its node committed. `rvmutl segment show
//! <folder>/list.seg` prints the load map.

#[path = "common/folder.rs"]
mod folder;
use rvm::loader::{create_segment, load_segment, LoadMap, RegionSpec};
use rvm::{create_log, CommitMode, Options, RestoreMode, Rvm};
use std::ptr::NonNull;

const ROOTS_BASE: u64 = 0x6000_0000_0000;
const NODES_BASE: u64 = 0x6000_4000_0000;
const NODES_LEN: u64 = 1 << 20;

/// The root page: the head of the list and the next free node slot.
#[repr(C)]
struct Roots {
    /// The newest node, or null.
    head: *const Node,
    /// Nodes allocated so far (slot `allocated` is the next free one).
    allocated: u64,
}

/// A list node, stored in the `nodes` region.
#[repr(C)]
struct Node {
    /// The next (older) node, or null: an absolute address.
    next: *const Node,
    /// Which run pushed it.
    run: u64,
    /// What that run said, NUL-padded.
    text: [u8; 48],
}

const NODE_LEN: usize = std::mem::size_of::<Node>();

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = folder::folder(std::env::args_os().nth(1), "rvm-persistent-list")?;
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("list.log");
    let seg_path = dir.join("list.seg");
    if !log.exists() {
        create_log(&log, 4 << 20)?;
    }
    let rvm = Rvm::open(&log, Options::default())?;
    if !seg_path.exists() {
        let ps = rvm::page_size() as u64;
        let map = LoadMap::new().region(RegionSpec::new("roots", ps, ps, ROOTS_BASE)).region(RegionSpec::new(
            "nodes",
            2 * ps,
            NODES_LEN,
            NODES_BASE,
        ));
        create_segment(&rvm, &seg_path, map.min_device_len(), &map)?;
        println!("created {} with this load map:\n{map:#}", seg_path.display());
    }
    let seg = load_segment(&rvm, &seg_path)?;
    let roots_region = seg.region("roots").ok_or("the load map has no `roots` region")?;
    let nodes_region = seg.region("nodes").ok_or("the load map has no `nodes` region")?;
    let roots: NonNull<Roots> = roots_region.as_ptr().cast();
    let nodes_start = nodes_region.addr();
    let slots = nodes_region.len() / NODE_LEN;
    println!("loaded: roots at {:p}, {} nodes' room at {:#x}", roots, slots, nodes_start);

    // Walk the list. The pointers were stored by earlier runs (earlier
    // processes); they are valid because the regions are at the same
    // addresses. Each one is checked against the region before use, as
    // any pointer read from a file should be.
    // SAFETY: the roots region is mapped while `seg` lives, is aligned
    // (page-aligned) and large enough for `Roots`; this program's one
    // thread is the only user, and it stores only inside transactions.
    let (mut p, allocated) = unsafe { ((*roots.as_ptr()).head, (*roots.as_ptr()).allocated) };
    let mut count = 0;
    while !p.is_null() {
        let at = p as usize;
        let inside = at >= nodes_start
            && at + NODE_LEN <= nodes_start + nodes_region.len()
            && (at - nodes_start).is_multiple_of(NODE_LEN);
        if !inside || count >= slots {
            return Err(format!("node pointer {at:#x} is not a node slot: the segment is damaged").into());
        }
        // SAFETY: `p` is an aligned node slot inside the mapped nodes
        // region (checked above), written by an earlier committed run.
        let node = unsafe { &*p };
        let end = node.text.iter().position(|&b| b == 0).unwrap_or(node.text.len());
        println!("  {at:#x}: run {:>3}  {}", node.run, String::from_utf8_lossy(&node.text[..end]));
        p = node.next;
        count += 1;
    }
    println!("the list holds {count} node(s)");

    if allocated as usize >= slots {
        println!("the nodes region is full; remove {} to start again", dir.display());
        return Ok(());
    }
    // Push a node for this run: the node itself and the root, in one
    // transaction.
    let run = allocated + 1;
    let slot = nodes_start + allocated as usize * NODE_LEN;
    let mut text = [0u8; 48];
    let msg = format!("hello from run {run} (pid {})", std::process::id());
    text[..msg.len()].copy_from_slice(msg.as_bytes());
    let mut tx = rvm.begin(RestoreMode::Restore)?;
    // SAFETY: both ranges lie inside mapped regions; this program's one
    // thread is their only user, and no reference into them is alive (the
    // `node` borrows above ended with the walk).
    unsafe {
        tx.set_range(slot, NODE_LEN)?;
        tx.set_range(roots.as_ptr() as usize, std::mem::size_of::<Roots>())?;
        let node = slot as *mut Node;
        node.write(Node { next: (*roots.as_ptr()).head, run, text });
        (*roots.as_ptr()).head = node;
        (*roots.as_ptr()).allocated = run;
    }
    tx.commit(CommitMode::Flush)?;
    println!("pushed node {slot:#x} for run {run}; run me again to see it");
    drop(seg);
    rvm.close()?;
    Ok(())
}

fn main() {
    // Errors are shown by their `Display` (what went wrong, and where), not `Debug`.
    if let Err(e) = run() {
        eprintln!("persistent_list: error: {e}");
        std::process::exit(1);
    }
}
