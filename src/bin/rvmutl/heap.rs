//! `rvmutl heap`: create, check and inspect RDS heaps.
//!
//! ```text
//! rvmutl heap create <segment> --log <log> --size 64M --base 0x5b00_0000_0000 [--static-len N]
//! rvmutl heap check <segment> --log <log> [--json]
//! rvmutl heap stats <segment> --log <log> [--json]
//! ```
//!
//! Each opens the log as an application would (running recovery), loads the
//! heap's segment at its fixed addresses through the loader, and closes both
//! again. Exit codes as for the rest of `rvmutl`; a heap that fails its
//! check, or a segment that is not a heap, is 3.

use crate::{Failure, Outcome, EXIT_CODES, EXIT_INVALID, EXIT_IO, EXIT_USAGE};
use clap::Subcommand;
use rvm::heap::{CheckReport, HeapError, HeapSpec, HeapStats, PersistentHeap, CLASS_BOUNDS};
use rvm::loader::spec::parse_number;
use rvm::loader::LoaderError;
use rvm::{Options, Rvm};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

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
    },
    /// Load a heap and run the full heap check.
    ///
    /// The check covers every block's header guard, size and tail guard, blocks tiling the
    /// heap, no adjacent free blocks, counters and indexes agreeing, and the root slots.
    /// Loading already refuses a damaged heap; the exit code is then 3 and the damage is
    /// named on stderr (and in the JSON document with --json).
    #[command(after_help = EXIT_CODES)]
    Check {
        /// The heap's segment.
        segment: PathBuf,
        /// The log (opened first, running recovery, as a program would).
        #[arg(long)]
        log: PathBuf,
        /// Print a JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load a heap and print its statistics.
    ///
    /// Lifetime allocations and frees, live blocks and bytes, free bytes, largest free block,
    /// live blocks per size class, roots.
    #[command(after_help = EXIT_CODES)]
    Stats {
        /// The heap's segment.
        segment: PathBuf,
        /// The log (opened first, running recovery, as a program would).
        #[arg(long)]
        log: PathBuf,
        /// Print a JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `heap` subcommand.
pub(crate) fn run(cmd: HeapCommand, out: &mut dyn Write) -> Outcome {
    match cmd {
        HeapCommand::Create { log, segment, size, base, static_len } => {
            create(&log, &segment, size, base, static_len, out)
        }
        HeapCommand::Check { log, segment, json } => check(&log, &segment, json, out),
        HeapCommand::Stats { log, segment, json } => stats(&log, &segment, json, out),
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
    eprintln!("rvmutl: error: {e}");
    let (code, hint_text) = match e {
        _ if e.is_corruption() => {
            (EXIT_INVALID, Some("the heap failed its check; it was not used, and nothing was changed"))
        }
        HeapError::BadRegions { .. } => {
            (EXIT_INVALID, Some("the segment's load map has no `heap.static` and `heap` regions"))
        }
        HeapError::Loader(_) => (
            EXIT_USAGE,
            Some("--base must be page-aligned, and the heap must lie in the user half of the address space"),
        ),
        _ => (EXIT_IO, None),
    };
    if let Some(h) = hint_text {
        eprintln!("rvmutl: hint: {h}");
    }
    code
}

fn open_log(log: &Path) -> Result<Rvm, Failure> {
    Ok(Rvm::open(log, Options { truncate_threshold: None, ..Options::default() })?)
}

fn create(log: &Path, segment: &Path, size: u64, base: u64, static_len: Option<u64>, out: &mut dyn Write) -> Outcome {
    let rvm = open_log(log)?;
    let mut spec = HeapSpec::new(base, size);
    if let Some(len) = static_len {
        spec = spec.with_static_len(len);
    }
    let heap = PersistentHeap::create(&rvm, segment, &spec)?;
    let (slots, bytes) = (heap.root_slots(), heap.stats().heap_bytes);
    heap.close()?;
    rvm.close()?;
    writeln!(
        out,
        "created heap {}: {bytes} bytes at {:#x} (static region at {base:#x}, {slots} root slots); segment {} bytes",
        segment.display(),
        spec.heap_base(),
        spec.segment_len()
    )?;
    Ok(())
}

/// Opens the log and the heap and runs `f` on it; closes both.
fn with_heap<T>(
    log: &Path,
    segment: &Path,
    f: impl FnOnce(&PersistentHeap) -> Result<T, HeapError>,
) -> Result<T, Failure> {
    let rvm = open_log(log)?;
    let heap = PersistentHeap::open(&rvm, segment)?;
    let r = f(&heap);
    heap.close()?;
    rvm.close()?;
    Ok(r?)
}

fn check(log: &Path, segment: &Path, json: bool, out: &mut dyn Write) -> Outcome {
    let result = with_heap(log, segment, |h| Ok((h.check()?, h.stats())));
    let (report, stats) = match result {
        Ok(r) => r,
        Err(Failure::Heap(e)) if json && (e.is_corruption() || matches!(e, HeapError::BadRegions { .. })) => {
            let doc = json!({ "segment": segment.to_string_lossy(), "ok": false, "error": e.to_string() });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc).unwrap_or_default())?;
            return Err(Failure::Heap(e));
        }
        Err(Failure::Loader(e))
            if json && matches!(e, LoaderError::NotALoadMap { .. } | LoaderError::Corrupted { .. }) =>
        {
            let doc = json!({ "segment": segment.to_string_lossy(), "ok": false, "error": e.to_string() });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc).unwrap_or_default())?;
            return Err(Failure::Loader(e));
        }
        Err(e) => return Err(e),
    };
    if json {
        let mut doc = report_json(&report, &stats);
        doc["segment"] = json!(segment.to_string_lossy());
        doc["ok"] = json!(true);
        writeln!(out, "{}", serde_json::to_string_pretty(&doc).unwrap_or_default())?;
        return Ok(());
    }
    writeln!(out, "heap {}: OK", segment.display())?;
    writeln!(out, "  blocks:       {} ({} allocated, {} free)", report.blocks, report.allocated, report.free)?;
    writeln!(out, "  allocated:    {} bytes", report.allocated_bytes)?;
    writeln!(out, "  free:         {} bytes, largest free block {} bytes", report.free_bytes, report.largest_free)?;
    writeln!(out, "  counters:     {} allocations, {} frees (agree with the blocks)", stats.allocations, stats.frees)?;
    writeln!(out, "  roots:        {} ({} dangling)", report.roots, report.dangling_roots.len())?;
    for name in &report.dangling_roots {
        writeln!(out, "  warning: root {name:?} names a block that is not allocated")?;
    }
    Ok(())
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
        "dangling_roots": r.dangling_roots,
    })
}

fn class_name(i: usize) -> String {
    match (i.checked_sub(1).map(|j| CLASS_BOUNDS[j]), CLASS_BOUNDS[i]) {
        (_, u64::MAX) => format!("> {}", CLASS_BOUNDS[i - 1]),
        (None, hi) => format!("<= {hi}"),
        (Some(lo), hi) => format!("{}-{hi}", lo + 1),
    }
}

fn stats(log: &Path, segment: &Path, json: bool, out: &mut dyn Write) -> Outcome {
    let (s, roots, slots) = with_heap(log, segment, |h| {
        let roots: Vec<(String, u64, u64, u64)> =
            h.roots().into_iter().map(|r| (r.name, (r.ptr.as_ptr() as u64), r.size, r.type_tag)).collect();
        Ok((h.stats(), roots, h.root_slots()))
    })?;
    if json {
        let classes: Vec<Value> = (0..CLASS_BOUNDS.len())
            .map(|i| json!({ "block_bytes": class_name(i), "live_blocks": s.live_per_class[i] }))
            .collect();
        let doc = json!({
            "segment": segment.to_string_lossy(),
            "heap_bytes": s.heap_bytes,
            "allocations": s.allocations,
            "frees": s.frees,
            "live_blocks": s.live_blocks,
            "bytes_in_use": s.bytes_in_use,
            "free_bytes": s.free_bytes,
            "largest_free": s.largest_free,
            "free_extents": s.free_extents,
            "classes": classes,
            "root_slots": slots,
            "roots": roots.iter().map(|(n, a, sz, t)| json!({ "name": n, "addr": a, "size": sz, "type_tag": t })).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc).unwrap_or_default())?;
        return Ok(());
    }
    let pct = |part: u64| if s.heap_bytes == 0 { 0.0 } else { part as f64 * 100.0 / s.heap_bytes as f64 };
    writeln!(out, "heap {}: {} bytes", segment.display(), s.heap_bytes)?;
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
