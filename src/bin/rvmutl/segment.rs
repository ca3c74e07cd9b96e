//! `rvmutl segment …`: create a segment whose header holds a load map, and
//! print a segment's load map.
//!
//! ```text
//! rvmutl segment create <segment> --log <log> --region heap:16K:1G:0x5a00_0000_0000 [--region …] [--size N]
//! rvmutl segment create <segment> --log <log> --map map.txt [--size N]
//! rvmutl segment show <segment> [--log <log>] [--spec | --json]
//! ```
//!
//! The load map's text form (for `--map` files, and printed by `show
//! --spec`) is documented in `rvm::loader::spec`: one region per line as
//! `name:offset:length:base[:copy]`, optional `page_size = N` and
//! `header_len = N` settings, `#` comments.

use crate::progress::Progress;
use crate::{ndjson, Failure, Outcome, EXIT_CODES, EXIT_INVALID, EXIT_IO, EXIT_USAGE};
use clap::{ArgGroup, Args, Subcommand};
use rvm::loader::format::{copy_mode_name, FORMAT_VERSION, MAX_HEADER_LEN};
use rvm::loader::spec::parse_number;
use rvm::loader::{create_segment, read_load_map_file, read_load_map_image, LoadMap, LoaderError};
use rvm::log::inspect::segment_snapshot;
use rvm::{FileVfs, Options, Rvm};
use serde_json::json;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The `segment` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum SegmentCommand {
    /// Create a segment file whose header holds a load map (which regions of the segment are
    /// mapped at which fixed addresses).
    ///
    /// The map comes from `--region` arguments or from a `--map` file in the text form: one region
    /// per line as `name:offset:length:base[:copy]`, optional `page_size = N` and
    /// `header_len = N` lines, `#` comments. Numbers are decimal or 0x-hex with optional `_` and
    /// K/M/G/T suffixes; the copy mode is on-demand (default), on-map or no-copy. The header is
    /// written through the log in one flush-committed transaction, then the log is truncated.
    #[command(after_help = EXIT_CODES, group(ArgGroup::new("source").required(true).args(["map", "region"])))]
    Create(CreateArgs),
    /// Print a segment's load map: a table, its text form (--spec), or JSON (--json).
    ///
    /// Reads without a lock and writes nothing. Without --log the segment file is read as it is;
    /// with --log the header is read as recovery would leave it: the log's complete transactions
    /// are applied to a copy of it in memory, so a map changed through the log and not yet
    /// truncated into the file shows as committed (a live view if a program has the files open).
    #[command(after_help = SHOW_JSON)]
    Show(ShowArgs),
}

/// The fields of `segment show --json`.
const SHOW_JSON: &str = concat!(
    "\
JSON (--json): one object per line, each with \"type\":
  segment  segment, log (null without --log), live (true: read without a lock), device_len,
           format_version, page_size, header_len, capacity (regions the header can hold), regions
           (count)
  region   name, offset, len, base, base_hex, copy (on-demand | on-map | no-copy)

",
    crate::exit_codes!()
);

/// Arguments of `segment create`.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Path of the new segment file (an existing file is never overwritten).
    segment: PathBuf,
    /// The log the header is written through (made with `rvmutl create-log`; it records the
    /// segment).
    #[arg(long)]
    log: PathBuf,
    /// Segment size in bytes (suffixes K, M, G, T); default: the smallest size that holds the map.
    #[arg(long, value_parser = parse_number)]
    size: Option<u64>,
    /// A file holding the load map in text form; `-` reads standard input. A FIFO is read only if a
    /// writer has it open already (one without a writer is refused, not waited for).
    #[arg(long, value_name = "FILE")]
    map: Option<PathBuf>,
    /// A region, `name:offset:length:base[:copy]`; repeat for more regions.
    #[arg(long = "region", value_name = "SPEC")]
    region: Vec<String>,
    /// Page size of the map (default: the system's); with --region only.
    #[arg(long, value_parser = parse_number, conflicts_with = "map")]
    page_size: Option<u64>,
    /// Bytes reserved for the header (default: enough pages for the region table); with --region
    /// only.
    #[arg(long, value_parser = parse_number, conflicts_with = "map")]
    header_len: Option<u64>,
    /// Do not allocate the segment's disk blocks now (a sparse file: blocks are taken as pages are
    /// written, and a full disk then stops a later checkpoint instead of this command).
    #[arg(long)]
    sparse: bool,
}

/// Arguments of `segment show`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The segment file (or block device).
    segment: PathBuf,
    /// Show the map as recovery through this log would leave it (built in memory; nothing is
    /// written, nothing locked).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Print the map's text form, which `segment create --map` reads.
    #[arg(long, conflicts_with = "json")]
    spec: bool,
    /// Print newline-delimited JSON: a "segment" object, then one "region" object per region.
    #[arg(long)]
    json: bool,
}

impl From<LoaderError> for Failure {
    fn from(e: LoaderError) -> Self {
        match e {
            // Core errors keep the core's exit codes and hints.
            LoaderError::Core(e) => Failure::Rvm(e),
            e => Failure::Loader(e),
        }
    }
}

/// Runs a `segment` subcommand.
pub(crate) fn run(command: SegmentCommand, quiet: bool, out: &mut dyn Write) -> Outcome {
    match command {
        SegmentCommand::Create(args) => create(args, out),
        SegmentCommand::Show(args) => show(args, quiet, out),
    }
}

/// Prints a loader error on stderr and returns the exit code: 1 for a load
/// map given on the command line that is malformed or breaks a rule, 3 for
/// a segment without a valid load map, 2 otherwise.
pub(crate) fn report(e: &LoaderError) -> u8 {
    say!("rvmutl: error: {e}");
    let (code, hint) = match e {
        LoaderError::Spec { .. } | LoaderError::InvalidMap { .. } | LoaderError::PageSize { .. } => {
            (EXIT_USAGE, Some("see `rvmutl segment create --help` for the load map's form and rules"))
        }
        LoaderError::NotALoadMap { found, .. } if *found == [0; 8] => (
            EXIT_INVALID,
            Some("a blank header: the segment's creation did not complete; remove the file and create it again"),
        ),
        LoaderError::NotALoadMap { .. } => {
            (EXIT_INVALID, Some("create segments with a load map with `rvmutl segment create`"))
        }
        LoaderError::UnsupportedVersion { .. } | LoaderError::Corrupted { .. } => (EXIT_INVALID, None),
        LoaderError::Core(e) => {
            if let Some(hint) = crate::hint(e) {
                say!("rvmutl: hint: {hint}");
            }
            return crate::exit_code(e);
        }
        _ => (EXIT_IO, None),
    };
    if let Some(hint) = hint {
        say!("rvmutl: hint: {hint}");
    }
    code
}

/// The most text a load map file may hold: 1,024 regions with long lines
/// and comments fit many times over. A longer input (`/dev/zero`, a
/// wrong file) is refused instead of read into memory without end.
const MAX_MAP_TEXT: u64 = 4 << 20;

fn read_map_text(path: &Path) -> Result<String, Failure> {
    let mut bytes = Vec::new();
    let source: io::Result<(Box<dyn Read>, bool)> =
        if path == Path::new("-") { Ok((Box::new(io::stdin()), false)) } else { open_map_file(path) };
    let pipe = source
        .and_then(|(r, pipe)| r.take(MAX_MAP_TEXT + 1).read_to_end(&mut bytes).map(|_| pipe))
        .map_err(|source| Failure::Loader(LoaderError::Io { op: "reading the load map", path: path.into(), source }))?;
    if pipe && bytes.is_empty() {
        // A named FIFO nobody writes to reads as empty at once (it used to
        // block in `open` for good): not the empty load map it would make.
        return Err(LoaderError::Spec {
            line: 1,
            reason: "nothing to read: a FIFO or pipe without a writer, or an empty one".into(),
        }
        .into());
    }
    // Content that is not a load map's text is a usage error (exit 1), as
    // any other bad map, not an I/O error: the line says where.
    let line_at = |at: usize| bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    if bytes.len() as u64 > MAX_MAP_TEXT {
        let line = line_at(MAX_MAP_TEXT as usize);
        return Err(
            LoaderError::Spec { line, reason: format!("longer than {MAX_MAP_TEXT} bytes: not a load map") }.into()
        );
    }
    if let Err(e) = std::str::from_utf8(&bytes) {
        let at = e.valid_up_to();
        let line = line_at(at);
        return Err(LoaderError::Spec { line, reason: format!("byte {at} is not UTF-8 text: not a load map") }.into());
    }
    String::from_utf8(bytes).map_err(|e| LoaderError::Spec { line: 1, reason: e.to_string() }.into())
}

/// Opens a load map file for reading without waiting for a writer: a
/// FIFO is opened non-blocking (a plain open would wait until something
/// opens its other end, for good if nothing does), then read normally, so
/// a pipe with a writer (`--map <(...)`) streams as before and one without
/// reads as empty. Returns the reader and whether it is a FIFO or pipe.
fn open_map_file(path: &Path) -> io::Result<(Box<dyn Read>, bool)> {
    use rustix::fs::{FileType, OFlags};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(OFlags::NONBLOCK.bits() as i32).open(path)?;
    rustix::fs::fcntl_setfl(&file, rustix::fs::fcntl_getfl(&file)? - OFlags::NONBLOCK)?;
    let pipe = FileType::from_raw_mode(rustix::fs::fstat(&file)?.st_mode) == FileType::Fifo;
    Ok((Box::new(file), pipe))
}

fn create(args: CreateArgs, out: &mut dyn Write) -> Outcome {
    let map = match &args.map {
        Some(path) => LoadMap::from_spec(&read_map_text(path)?)?,
        None => {
            let mut items = args.region.clone();
            if let Some(ps) = args.page_size {
                items.push(format!("page_size = {ps}"));
            }
            if let Some(hl) = args.header_len {
                items.push(format!("header_len = {hl}"));
            }
            LoadMap::from_region_specs(&items)?
        }
    };
    let size = args.size.unwrap_or_else(|| map.min_device_len());
    // What can be refused without the log is refused before it is opened
    // (an open starts a new epoch in the log's status).
    map.validate_for_device(size)?;
    crate::refuse_existing(&args.segment, "creating segment")?;
    crate::refuse_no_room(&args.segment, size, args.sparse)?;
    let rvm = Rvm::open(
        &args.log,
        Options { truncate_threshold: None, reserve_segment_space: !args.sparse, ..Options::default() },
    )?;
    create_segment(&rvm, &args.segment, size, &map)?;
    // Applied and the log emptied: the new segment holds its load map and
    // is tied to no log records.
    rvm.truncate()?;
    rvm.close()?;
    writeln!(
        out,
        "created segment {}: {size} bytes ({size:#x}), through log {}",
        args.segment.display(),
        args.log.display()
    )?;
    write!(out, "{map:#}")?;
    Ok(())
}

fn device_len(path: &Path) -> Result<u64, Failure> {
    use std::io::Seek;
    let io = |source| Failure::Loader(LoaderError::Io { op: "sizing segment", path: path.into(), source });
    let mut f = rvm::storage::open_read_only(path).map_err(io)?;
    f.seek(io::SeekFrom::End(0)).map_err(io)
}

fn show(args: ShowArgs, quiet: bool, out: &mut dyn Write) -> Outcome {
    let map = match &args.log {
        Some(log) => {
            // The header as recovery would leave it: its largest possible
            // extent, with the log's records applied, in memory.
            let progress = Progress::bytes(quiet, "reading the header and the log", 0);
            let snap = segment_snapshot(&FileVfs, log, &args.segment, Some((0, MAX_HEADER_LEN)), &mut |d, t| {
                progress.set(d, t)
            });
            progress.finish();
            let snap = snap?;
            read_load_map_image(&args.segment, &snap.bytes, snap.device_len)?
        }
        None => read_load_map_file(&args.segment)?,
    };
    let dev = device_len(&args.segment)?;
    if args.spec {
        write!(out, "{map}")?;
    } else if args.json {
        ndjson(
            out,
            &json!({
                "type": "segment",
                "segment": args.segment.to_string_lossy(),
                "log": args.log.as_ref().map(|l| l.to_string_lossy()),
                "live": true,
                "device_len": dev,
                "format_version": FORMAT_VERSION,
                "page_size": map.page_size(),
                "header_len": map.header_len(),
                "capacity": map.capacity(),
                "regions": map.regions().len(),
            }),
        )?;
        for r in map.regions() {
            ndjson(
                out,
                &json!({
                    "type": "region",
                    "name": r.name,
                    "offset": r.offset,
                    "len": r.len,
                    "base": r.base,
                    "base_hex": format!("{:#x}", r.base),
                    "copy": copy_mode_name(r.copy),
                    "max_len": r.span(),
                    "reserved_end_hex": format!("{:#x}", r.base.saturating_add(r.span())),
                }),
            )?;
        }
    } else {
        writeln!(out, "segment {}: {dev} bytes ({dev:#x})", args.segment.display())?;
        write!(out, "{map:#}")?;
    }
    Ok(())
}
