//! `rvmutl heap`: create, check and inspect RDS heaps.
//!
//! ```text
//! rvmutl heap create <segment> --log <log> --size 64M --base 0x5b00_0000_0000 [--static-len N] [--max 64G]
//! rvmutl heap grow <segment> --log <log> [--size 2G] [--max 128G]
//! rvmutl heap check <segment> --log <log> [--json]
//! rvmutl heap stats <segment> --log <log> [--json]
//! ```
//!
//! `create` opens the log as an application would and writes the new
//! segment through it. `check` and `stats` write nothing and take no lock:
//! they read the segment and the log read-only, build the segment as
//! recovery would leave it in memory
//! (`rvm::log::inspect::segment_snapshot`), and load the heap from that
//! image on in-memory devices (`rvm::storage::MemVfs`) at its fixed
//! addresses, so they work on a heap a program has open (a live view).
//! `check` also walks a heap made by the typed layer (`rvm::collections`)
//! from its roots, by the type shapes stored in it (root `rvm:shapes`):
//! each pointer must lead to a live block of the right size, owned once;
//! live blocks no root reaches are reported as leaks (warnings).
//! Exit codes as for the rest of `rvmutl`; a heap that fails its check (a
//! damaged typed value included), or a segment that is not a heap, is 3.

use crate::progress::Progress;
use crate::{ndjson, Failure, Outcome, EXIT_CODES, EXIT_INVALID, EXIT_IO, EXIT_USAGE};
use clap::Subcommand;
use rvm::collections::Reachability;
use rvm::heap::{
    CheckReport, HeapError, HeapSpec, HeapStats, PersistentHeap, CLASS_BOUNDS, DEFAULT_MAX_HEAP_LEN, HEAP_REGION,
    STATIC_REGION,
};
use rvm::loader::spec::parse_number;
use rvm::loader::LoaderError;
use rvm::log::inspect::{segment_snapshot, ScanReport};
use rvm::storage::MemVfs;
use rvm::{Error, FileVfs, Options, Rvm, Vfs};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `heap` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum HeapCommand {
    /// Create a segment holding an empty heap at fixed addresses.
    ///
    /// Made through the loader: the segment gets a load map with two regions: `heap.static` (header, counters and
    /// roots; one page unless --static-len says otherwise) at --base, and `heap` (--size
    /// bytes) right after it. Programs that store pointers in the heap must load it at these
    /// addresses, so choose them once. The log must exist (`rvmutl create-log`).
    #[command(after_help = EXIT_CODES)]
    Create {
        /// Path of the new segment file (an existing file is never overwritten).
        segment: PathBuf,
        /// The log (made with `rvmutl create-log`; it records the segment).
        #[arg(long)]
        log: PathBuf,
        /// Bytes of heap (rounded up to whole pages); decimal or 0x hex, with an optional
        /// K, M, G or T suffix.
        #[arg(long, value_parser = parse_number)]
        size: u64,
        /// Address of the static region, page-aligned (the heap follows it), e.g.
        /// 0x5b00_0000_0000.
        #[arg(long, value_parser = parse_number)]
        base: u64,
        /// Bytes of the static region (rounded up to whole pages; 62 roots per 4 KiB page,
        /// less 2 slots of header).
        #[arg(long, value_parser = parse_number)]
        static_len: Option<u64>,
        /// The size the heap may grow to in place (default 64G; --max 0 makes a heap that does not
        /// grow). Loading the heap reserves the address range from the heap's start up to it
        /// (no memory or swap is used), so it must be free in the programs that load the heap.
        #[arg(long, value_parser = parse_number)]
        max: Option<u64>,
        /// Do not allocate the segment's disk blocks now (a sparse file: blocks are taken as pages
        /// are written, and a full disk then stops a later checkpoint instead of this command).
        #[arg(long)]
        sparse: bool,
    },
    /// Grow a heap in place, or change its maximum size.
    ///
    /// Opens the log as an application would (recovery runs), grows the heap to --size bytes
    /// (its new total size; the segment file, its load map, the heap region and the heap's free
    /// space grow together, durably, in one flush-committed transaction: a crash leaves the old
    /// size or the new one) and/or records --max as its new maximum size. No block moves.
    #[command(after_help = EXIT_CODES, group(clap::ArgGroup::new("change").required(true).multiple(true).args(["size", "max"])))]
    Grow {
        /// The heap's segment.
        segment: PathBuf,
        /// The log that records the segment.
        #[arg(long)]
        log: PathBuf,
        /// The heap's new size in bytes (rounded up to whole pages).
        #[arg(long, value_parser = parse_number)]
        size: Option<u64>,
        /// The heap's new maximum size (set before growing).
        #[arg(long, value_parser = parse_number)]
        max: Option<u64>,
        /// Do not allocate the segment's disk blocks now (a sparse file: blocks are taken as pages
        /// are written, and a full disk then stops a later checkpoint instead of this command).
        #[arg(long)]
        sparse: bool,
    },
    /// Run the full heap check on the heap as recovery would leave it, writing nothing.
    ///
    /// The segment and the log are read without a lock (a program may have them open: the result
    /// is then a live view, possibly slightly behind it); the log's complete transactions are
    /// applied to a copy of the segment in memory, and the heap is loaded from that copy. The check
    /// covers every block's header guard, size and tail guard, blocks tiling the heap, no adjacent
    /// free blocks, counters and indexes agreeing, and the root slots. Loading already refuses a
    /// damaged heap; the exit code is then 3 and the damage is named on stderr (and as a finding
    /// with --json).
    #[command(after_help = HEAP_CHECK_JSON)]
    Check {
        /// The heap's segment.
        segment: PathBuf,
        /// The log that records the segment (read, not recovered: nothing is written).
        #[arg(long)]
        log: PathBuf,
        /// Print newline-delimited JSON: a "check" object, then one "finding" object per finding.
        #[arg(long)]
        json: bool,
    },
    /// Print a heap's statistics, as recovery would leave it, writing nothing.
    ///
    /// Lifetime allocations and frees, live blocks and bytes, free bytes, largest free block,
    /// live blocks per size class, roots. Read like `heap check`: without a lock, in memory.
    #[command(after_help = HEAP_STATS_JSON)]
    Stats {
        /// The heap's segment.
        segment: PathBuf,
        /// The log that records the segment (read, not recovered: nothing is written).
        #[arg(long)]
        log: PathBuf,
        /// Print newline-delimited JSON: a "stats" object, one "class" object per size class, one
        /// "root" object per root.
        #[arg(long)]
        json: bool,
    },
}

/// The fields of `heap check --json`.
const HEAP_CHECK_JSON: &str = concat!(
    "\
JSON (--json): one object per line, each with \"type\":
  check    segment, log, live (true: read without a lock), log_transactions (complete transactions
           of the log applied in memory), log_end (clean | torn | damaged), ok, and when ok: blocks,
           allocated_blocks, free_blocks, allocated_bytes, free_bytes, largest_free, allocations,
           frees, roots, dangling_roots (count); typed_roots (walked by their stored shapes; null
           if the shape table is damaged), untyped_roots, reachable_blocks, unreachable_blocks,
           unreachable_bytes (heaps made by rvm::collections); ok is false for a damaged typed root
  finding  severity (error | warning), kind (corrupted | not_a_heap | dangling_root |
           damaged_root | damaged_shapes | untyped_root | unreachable_block), message,
           root (for *_root), addr and len (for unreachable_block)

",
    crate::exit_codes!()
);

/// The fields of `heap stats --json`.
const HEAP_STATS_JSON: &str = concat!(
    "\
JSON (--json): one object per line, each with \"type\":
  stats  segment, log, live, log_transactions, heap_bytes, max_heap_bytes, allocations, frees, live_blocks,
         bytes_in_use, free_bytes, largest_free, free_extents, root_slots, roots (count)
  class  block_bytes (size class, e.g. \"33-64\"), live_blocks
  root   name, addr, size, type_tag

",
    crate::exit_codes!()
);

/// Runs a `heap` subcommand.
pub(crate) fn run(cmd: HeapCommand, quiet: bool, out: &mut dyn Write) -> Outcome {
    match cmd {
        HeapCommand::Create { log, segment, size, base, static_len, max, sparse } => {
            create(&log, &segment, create_spec(size, base, static_len, max), sparse, out)
        }
        HeapCommand::Grow { log, segment, size, max, sparse } => grow(&log, &segment, size, max, sparse, out),
        HeapCommand::Check { log, segment, json } => check(&log, &segment, json, quiet, out),
        HeapCommand::Stats { log, segment, json } => stats(&log, &segment, json, quiet, out),
    }
}

impl From<HeapError> for Failure {
    fn from(e: HeapError) -> Self {
        match e {
            HeapError::Core(e) => Failure::Rvm(e),
            // A bad --base or --size gets the heap's own hint; other loader
            // errors are reported as for `rvmutl segment`.
            e @ HeapError::Loader(LoaderError::InvalidMap { .. } | LoaderError::PageSize { .. }) => Failure::Heap(e),
            HeapError::Loader(e) => Failure::from(e),
            e => Failure::Heap(e),
        }
    }
}

/// Prints a heap failure on stderr and returns the exit code: 3 for a heap
/// that fails its check or a segment that is not a heap, 1 for a --base or
/// --size the load map cannot take, 2 otherwise.
pub(crate) fn report(e: &HeapError) -> u8 {
    say!("rvmutl: error: {e}");
    let (code, hint_text) = match e {
        _ if e.is_corruption() => {
            (EXIT_INVALID, Some("the heap failed its check; it was not used, and nothing was changed"))
        }
        HeapError::BadRegions { .. } => {
            (EXIT_INVALID, Some("the segment's load map has no `heap.static` and `heap` regions"))
        }
        HeapError::Loader(_) => (
            EXIT_USAGE,
            Some("--base must be page-aligned, and the heap (up to its maximum size) must lie in the user half of the address space without overlapping its static region"),
        ),
        HeapError::GrowthLimit { .. } => (EXIT_USAGE, Some("raise the maximum with --max")),
        _ => (EXIT_IO, None),
    };
    if let Some(h) = hint_text {
        say!("rvmutl: hint: {h}");
    }
    code
}

/// Opens the log for one command (no background truncation); `sparse`:
/// the segment's blocks are not allocated at creation or growth.
fn open_log(log: &Path, sparse: bool) -> Result<Rvm, Failure> {
    Ok(Rvm::open(log, Options { truncate_threshold: None, reserve_segment_space: !sparse, ..Options::default() })?)
}

/// `heap create`'s spec from its arguments.
fn create_spec(size: u64, base: u64, static_len: Option<u64>, max: Option<u64>) -> HeapSpec {
    let spec = HeapSpec::new(base, size).with_max_len(max.unwrap_or(DEFAULT_MAX_HEAP_LEN));
    match static_len {
        Some(len) => spec.with_static_len(len),
        None => spec,
    }
}

fn create(log: &Path, segment: &Path, spec: HeapSpec, sparse: bool, out: &mut dyn Write) -> Outcome {
    let base = spec.base();
    // Refused before the log is opened (an open starts a new epoch in its
    // status): a bad --base or --size, an existing path.
    let map = spec.load_map();
    map.validate_for_device(map.min_device_len()).map_err(HeapError::Loader)?;
    crate::refuse_existing(segment, "creating segment")?;
    crate::refuse_no_room(segment, spec.segment_len(), sparse)?;
    let rvm = open_log(log, sparse)?;
    let heap = PersistentHeap::create(&rvm, segment, &spec)?;
    let (slots, bytes) = (heap.root_slots(), heap.stats().heap_bytes);
    // Applied and the log emptied: the new segment holds everything and is
    // tied to no log records (it can be moved or copied at once).
    rvm.truncate()?;
    heap.close()?;
    rvm.close()?;
    writeln!(
        out,
        "created heap {}: {bytes} bytes at {:#x}, growing to at most {} bytes (static region at {base:#x}, {slots} \
         root slots); segment {} bytes",
        segment.display(),
        spec.heap_base(),
        spec.max_len(),
        spec.segment_len()
    )?;
    Ok(())
}

fn grow(log: &Path, segment: &Path, size: Option<u64>, max: Option<u64>, sparse: bool, out: &mut dyn Write) -> Outcome {
    not_a_heap_segment(log, segment, size, max, sparse)?;
    let rvm = open_log(log, sparse)?;
    let mut heap = PersistentHeap::open(&rvm, segment)?;
    let old = heap.heap_len();
    // A size past the new maximum is refused before the maximum changes:
    // a failed command changes nothing.
    if let (Some(size), Some(max)) = (size, max) {
        if let Err(e) = heap.check_growth(size, max) {
            heap.close()?;
            rvm.close()?;
            return Err(e.into());
        }
    }
    if let Some(max) = max {
        heap.set_max_len(max)?;
        if size.is_some() {
            // A heap keeps the address space it reserved at load: loaded
            // again, it reserves up to the new maximum, which the growth
            // may need (else it failed as "taken by another mapping").
            heap.close()?;
            heap = PersistentHeap::open(&rvm, segment)?;
        }
    }
    let result = match size {
        Some(size) => heap.grow(size).map(|_| ()),
        None => Ok(()),
    };
    let (new, max_now) = (heap.heap_len(), heap.max_len());
    // As `create`: the log emptied, the segment self-contained.
    let truncated = rvm.truncate();
    heap.close()?;
    rvm.close()?;
    result?;
    truncated?;
    writeln!(out, "heap {}: {old} -> {new} bytes (maximum {max_now} bytes)", segment.display())?;
    // Say so when an option asked for less than there is (it changed
    // nothing, which is not an error).
    if size.is_some_and(|s| s <= old) {
        writeln!(out, "the heap already has at least the --size asked for: not grown")?;
    }
    if let Some(m) = max.filter(|&m| m < old) {
        writeln!(out, "--max {m} is below the heap's size: the maximum is {max_now} bytes (a heap never shrinks)")?;
    }
    Ok(())
}

/// Refuses, before the log is opened (an open starts a new epoch in its
/// status, and a refused command leaves every file byte-identical), a
/// segment that is no file or block device, or whose load map, as recovery
/// through `log` would leave it (read without a lock, nothing written),
/// is no load map or has no heap regions, or a `--size` past the maximum.
/// Anything this view cannot tell
/// (the log cannot be read) is left to the open, which reports it as
/// before.
fn not_a_heap_segment(
    log: &Path,
    segment: &Path,
    size: Option<u64>,
    max: Option<u64>,
    sparse: bool,
) -> Result<(), Failure> {
    let file = rvm::storage::open_read_only(segment).map_err(|source| Error::Io {
        op: "opening segment",
        path: segment.into(),
        source,
    })?;
    // In use by a program (it holds the exclusive lock): the open would
    // refuse it after the log's status was written.
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) == Err(rustix::io::Errno::WOULDBLOCK)
    {
        return Err(Error::Locked { path: segment.into() }.into());
    }
    drop(file);
    let header = Some((0, rvm::loader::format::MAX_HEADER_LEN));
    let Ok(snap) = segment_snapshot(&FileVfs, log, segment, header, &mut |_, _| {}) else { return Ok(()) };
    // The header recovery would leave: the heap's open would refuse it too.
    let map = rvm::loader::read_load_map_image(segment, &snap.bytes, snap.device_len)?;
    if let Some(name) = [STATIC_REGION, HEAP_REGION].into_iter().find(|name| map.get(name).is_none()) {
        return Err(HeapError::BadRegions {
            reason: format!("segment {} has no region named {name:?}: not a heap segment", segment.display()),
        }
        .into());
    }
    // A --size past the maximum (the new one, or the map's), as the
    // growth would find it after the open.
    if let Some(size) = size {
        rvm::heap::Heap::check_growth_of(&map, size, max)?;
        // Room on the disk for the segment's new bytes.
        if let Some(heap) = map.get(HEAP_REGION) {
            let new_len = heap.offset.saturating_add(size.div_ceil(map.page_size()) * map.page_size());
            crate::refuse_no_room(segment, new_len.saturating_sub(snap.device_len), sparse)?;
        }
    }
    Ok(())
}

/// The in-memory log the heap view is opened through (its records are the
/// view's own: loading and closing the heap).
const VIEW_LOG_LEN: u64 = 4 << 20;

/// What the heap view was built from.
struct View {
    /// The scan of the real log whose complete transactions were applied.
    scan: ScanReport,
}

/// Loads the heap of `segment` as recovery through `log` would leave it,
/// without writing anything or taking a lock, and runs `f` on it: the
/// segment with the log's complete transactions applied, in memory
/// ([`segment_snapshot`]), opened through an empty in-memory log.
fn with_heap<T>(
    log: &Path,
    segment: &Path,
    quiet: bool,
    f: impl FnOnce(&PersistentHeap) -> Result<T, HeapError>,
) -> Result<(T, View), Failure> {
    let progress = Progress::bytes(quiet, "reading the heap and the log", 0);
    let snap = segment_snapshot(&FileVfs, log, segment, None, &mut |done, total| progress.set(done, total));
    progress.finish();
    let snap = snap?;
    let name = FileVfs.canonical_name(segment).map_err(|source| Error::Io {
        op: "resolving the name of",
        path: segment.into(),
        source,
    })?;
    let mem = MemVfs::new();
    rvm::create_log_with(&mem, log, VIEW_LOG_LEN)?;
    mem.insert(&name, snap.bytes);
    let vfs: Arc<dyn Vfs> = Arc::new(mem);
    let rvm = Rvm::open_with(vfs, log, Options { truncate_threshold: None, ..Options::default() })?;
    let heap = PersistentHeap::open(&rvm, &name)?;
    let r = f(&heap);
    heap.close()?;
    rvm.close()?;
    Ok((r?, View { scan: snap.scan }))
}

/// The fields every `check` and `stats` record starts with.
fn view_json(kind: &str, log: &Path, segment: &Path, view: Option<&View>) -> Value {
    json!({
        "type": kind,
        "segment": segment.to_string_lossy(),
        "log": log.to_string_lossy(),
        "live": true,
        "log_transactions": view.map(|v| v.scan.transactions),
        "log_end": view.map(|v| v.scan.log_end().name()),
    })
}

/// Merges the fields of `extra` into the object `v`.
fn merge(mut v: Value, extra: Value) -> Value {
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
        v.extend(extra);
    }
    v
}

/// The first line of the human output: what the view was built from.
fn view_line(log: &Path, view: &View) -> String {
    format!(
        "  view:         read without a lock, writing nothing: the segment with the {} complete transaction(s) of {} \
         applied in memory (a live view if a program has them open)",
        view.scan.transactions,
        log.display()
    )
}

fn check(log: &Path, segment: &Path, json: bool, quiet: bool, out: &mut dyn Write) -> Outcome {
    let result = with_heap(log, segment, quiet, |h| {
        let (report, stats) = (h.check()?, h.stats());
        Ok((report, stats, reachability(h.heap())))
    });
    let failed = |out: &mut dyn Write, kind: &str, message: String| -> std::io::Result<()> {
        ndjson(out, &merge(view_json("check", log, segment, None), json!({ "ok": false })))?;
        ndjson(out, &json!({ "type": "finding", "severity": "error", "kind": kind, "message": message }))
    };
    let ((report, stats, reach), view) = match result {
        Ok(r) => r,
        Err(Failure::Heap(e)) if json && (e.is_corruption() || matches!(e, HeapError::BadRegions { .. })) => {
            let kind = if e.is_corruption() { "corrupted" } else { "not_a_heap" };
            failed(out, kind, e.to_string())?;
            return Err(Failure::Heap(e));
        }
        Err(Failure::Loader(e))
            if json && matches!(e, LoaderError::NotALoadMap { .. } | LoaderError::Corrupted { .. }) =>
        {
            let kind = if matches!(e, LoaderError::Corrupted { .. }) { "corrupted" } else { "not_a_heap" };
            failed(out, kind, e.to_string())?;
            return Err(Failure::Loader(e));
        }
        Err(e) => return Err(e),
    };
    let damage = reach.damage();
    if json {
        let doc = merge(view_json("check", log, segment, Some(&view)), json!({ "ok": damage.is_none() }));
        let doc = merge(merge(doc, report_json(&report, &stats)), reach.json());
        ndjson(out, &doc)?;
        for name in &report.dangling_roots {
            ndjson(
                out,
                &json!({
                    "type": "finding",
                    "severity": "warning",
                    "kind": "dangling_root",
                    "root": name,
                    "message": format!("root {name:?} names a block that is not allocated"),
                }),
            )?;
        }
        for f in reach.findings() {
            ndjson(out, &f)?;
        }
        return damage.map_or(Ok(()), |e| Err(Failure::Heap(e)));
    }
    let verdict = if damage.is_some() { "DAMAGED" } else { "OK" };
    writeln!(out, "heap {}: {verdict}", segment.display())?;
    writeln!(out, "{}", view_line(log, &view))?;
    writeln!(out, "  blocks:       {} ({} allocated, {} free)", report.blocks, report.allocated, report.free)?;
    writeln!(out, "  allocated:    {} bytes", report.allocated_bytes)?;
    writeln!(out, "  free:         {} bytes, largest free block {} bytes", report.free_bytes, report.largest_free)?;
    writeln!(out, "  counters:     {} allocations, {} frees (agree with the blocks)", stats.allocations, stats.frees)?;
    writeln!(out, "  roots:        {} ({} dangling)", report.roots, report.dangling_roots.len())?;
    for name in &report.dangling_roots {
        writeln!(out, "  warning: root {name:?} names a block that is not allocated")?;
    }
    reach.human(out)?;
    damage.map_or(Ok(()), |e| Err(Failure::Heap(e)))
}

/// The walk from the typed roots (`rvm::collections::reachability`): what
/// it found, or why it could not run.
enum Reach {
    /// The heap has no typed roots' shapes (not made by the typed layer):
    /// nothing to walk.
    NoShapes,
    /// The shape table is damaged.
    BadShapes(String),
    Walked(Reachability),
}

/// Most unreachable blocks listed one by one (human output).
const LIST_UNREACHABLE: usize = 10;

fn reachability(heap: &rvm::heap::Heap) -> Reach {
    if heap.root(rvm::collections::shape::SHAPES_ROOT).is_none() {
        return Reach::NoShapes;
    }
    match rvm::collections::reachability(heap) {
        Ok(r) => Reach::Walked(r),
        Err(e) => Reach::BadShapes(e.to_string()),
    }
}

impl Reach {
    /// The damage it found, as the error `check` fails with.
    fn damage(&self) -> Option<HeapError> {
        let what = match self {
            Reach::NoShapes => return None,
            Reach::BadShapes(e) => format!("the typed layer's shape table ({e})"),
            Reach::Walked(r) => {
                let (name, why) = r.damaged_roots.first()?;
                format!("typed root {name:?} ({why})")
            }
        };
        Some(HeapError::Corrupted { what, location: "heap data".into() })
    }

    fn json(&self) -> Value {
        match self {
            Reach::NoShapes => json!({ "typed_roots": 0 }),
            Reach::BadShapes(_) => json!({ "typed_roots": null }),
            Reach::Walked(r) => json!({
                "typed_roots": r.typed_roots,
                "untyped_roots": r.untyped_roots.len(),
                "reachable_blocks": r.reachable_blocks,
                "unreachable_blocks": r.unreachable.len(),
                "unreachable_bytes": r.unreachable.iter().map(|&(_, len)| len).sum::<u64>(),
            }),
        }
    }

    fn findings(&self) -> Vec<Value> {
        let mut out = Vec::new();
        match self {
            Reach::NoShapes => {}
            Reach::BadShapes(e) => out.push(json!({
                "type": "finding", "severity": "error", "kind": "damaged_shapes",
                "message": format!("the typed layer's shape table is damaged ({e}): typed roots cannot be walked"),
            })),
            Reach::Walked(r) => {
                for (name, why) in &r.damaged_roots {
                    out.push(json!({
                        "type": "finding", "severity": "error", "kind": "damaged_root", "root": name,
                        "message": format!("typed root {name:?} holds a damaged value: {why}"),
                    }));
                }
                for name in &r.untyped_roots {
                    out.push(json!({
                        "type": "finding", "severity": "warning", "kind": "untyped_root", "root": name,
                        "message": format!("root {name:?} has no stored type (made by the raw API): what it points at cannot be walked"),
                    }));
                }
                for &(addr, len) in &r.unreachable {
                    out.push(json!({
                        "type": "finding", "severity": "warning", "kind": "unreachable_block",
                        "addr": format!("{addr:#x}"), "len": len,
                        "message": if r.complete() {
                            format!("block {addr:#x} ({len} bytes) is reached by no root: leaked")
                        } else {
                            format!("block {addr:#x} ({len} bytes) is reached by no typed root (an untyped root may own it)")
                        },
                    }));
                }
            }
        }
        out
    }

    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        match self {
            Reach::NoShapes => {
                writeln!(out, "  reachability: no typed roots (not made by rvm::collections): not walked")
            }
            Reach::BadShapes(e) => {
                writeln!(out, "  error: the typed layer's shape table is damaged ({e}): typed roots cannot be walked")
            }
            Reach::Walked(r) => {
                let bytes: u64 = r.unreachable.iter().map(|&(_, len)| len).sum();
                writeln!(
                    out,
                    "  reachability: {} typed root(s) walked, {} live block(s) reached, {} unreachable ({bytes} bytes)",
                    r.typed_roots,
                    r.reachable_blocks,
                    r.unreachable.len()
                )?;
                for (name, why) in &r.damaged_roots {
                    writeln!(out, "  error: typed root {name:?} holds a damaged value: {why}")?;
                }
                for name in &r.untyped_roots {
                    writeln!(
                        out,
                        "  warning: root {name:?} has no stored type (made by the raw API): what it points at cannot be walked"
                    )?;
                }
                let leaked = if r.complete() { "leaked" } else { "reached by no typed root" };
                for &(addr, len) in r.unreachable.iter().take(LIST_UNREACHABLE) {
                    writeln!(out, "  warning: block {addr:#x} ({len} bytes) is {leaked}")?;
                }
                if r.unreachable.len() > LIST_UNREACHABLE {
                    writeln!(
                        out,
                        "  warning: ... and {} more such block(s) (--json lists all)",
                        r.unreachable.len() - LIST_UNREACHABLE
                    )?;
                }
                Ok(())
            }
        }
    }
}

fn report_json(r: &CheckReport, s: &HeapStats) -> Value {
    json!({
        "blocks": r.blocks,
        "allocated_blocks": r.allocated,
        "free_blocks": r.free,
        "allocated_bytes": r.allocated_bytes,
        "free_bytes": r.free_bytes,
        "largest_free": r.largest_free,
        "allocations": s.allocations,
        "frees": s.frees,
        "roots": r.roots,
        "dangling_roots": r.dangling_roots.len(),
    })
}

fn class_name(i: usize) -> String {
    match (i.checked_sub(1).map(|j| CLASS_BOUNDS[j]), CLASS_BOUNDS[i]) {
        (_, u64::MAX) => format!("> {}", CLASS_BOUNDS[i - 1]),
        (None, hi) => format!("<= {hi}"),
        (Some(lo), hi) => format!("{}-{hi}", lo + 1),
    }
}

fn stats(log: &Path, segment: &Path, json: bool, quiet: bool, out: &mut dyn Write) -> Outcome {
    let ((s, roots, slots), view) = with_heap(log, segment, quiet, |h| {
        let roots: Vec<(String, u64, u64, u64)> =
            h.roots().into_iter().map(|r| (r.name, (r.ptr.as_ptr() as u64), r.size, r.type_tag)).collect();
        Ok((h.stats(), roots, h.root_slots()))
    })?;
    if json {
        let doc = json!({
            "heap_bytes": s.heap_bytes,
            "max_heap_bytes": s.max_heap_bytes,
            "allocations": s.allocations,
            "frees": s.frees,
            "live_blocks": s.live_blocks,
            "bytes_in_use": s.bytes_in_use,
            "free_bytes": s.free_bytes,
            "largest_free": s.largest_free,
            "free_extents": s.free_extents,
            "root_slots": slots,
            "roots": roots.len(),
        });
        ndjson(out, &merge(view_json("stats", log, segment, Some(&view)), doc))?;
        for i in 0..CLASS_BOUNDS.len() {
            ndjson(out, &json!({ "type": "class", "block_bytes": class_name(i), "live_blocks": s.live_per_class[i] }))?;
        }
        for (name, addr, size, tag) in &roots {
            ndjson(out, &json!({ "type": "root", "name": name, "addr": addr, "size": size, "type_tag": tag }))?;
        }
        return Ok(());
    }
    let pct = |part: u64| if s.heap_bytes == 0 { 0.0 } else { part as f64 * 100.0 / s.heap_bytes as f64 };
    writeln!(out, "heap {}: {} bytes (maximum {} bytes)", segment.display(), s.heap_bytes, s.max_heap_bytes)?;
    writeln!(out, "{}", view_line(log, &view))?;
    writeln!(out, "  allocations:  {} (lifetime)", s.allocations)?;
    writeln!(out, "  frees:        {} (lifetime)", s.frees)?;
    writeln!(out, "  live blocks:  {}", s.live_blocks)?;
    writeln!(
        out,
        "  in use:       {} bytes ({:.1}%, headers and guards included)",
        s.bytes_in_use,
        pct(s.bytes_in_use)
    )?;
    writeln!(
        out,
        "  free:         {} bytes ({:.1}%) in {} extent(s)",
        s.free_bytes,
        pct(s.free_bytes),
        s.free_extents
    )?;
    writeln!(out, "  largest free: {} bytes", s.largest_free)?;
    writeln!(out, "  live blocks per class (block bytes):")?;
    for i in 0..CLASS_BOUNDS.len() {
        writeln!(out, "    {:>12}  {}", class_name(i), s.live_per_class[i])?;
    }
    writeln!(out, "  roots:        {} of {slots} slots", roots.len())?;
    for (name, addr, size, tag) in &roots {
        writeln!(out, "    {name:<40}  {addr:#x}  {size} bytes  type tag {tag:#x}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names() {
        assert_eq!(class_name(0), "<= 32");
        assert_eq!(class_name(1), "33-64");
        assert_eq!(class_name(CLASS_BOUNDS.len() - 1), "> 4096");
    }
}
