//! rvmutl: create, inspect, recover and truncate RVM logs.
//!
//! ```text
//! rvmutl create-log <path> --size 64M   create a log of a fixed size
//! rvmutl status <log> [--json]          superblock, status slots, space in use, how the log ends
//! rvmutl dump <log> [--json]            one line (or JSON object) per frame
//! rvmutl recover <log>                  replay the log onto its segments
//! rvmutl truncate <log>                 open (recovering), truncate, close
//! rvmutl checkpoint <log>               open (recovering), checkpoint, close
//! rvmutl segment create <seg> --log <log> (--region SPEC… | --map FILE)
//! rvmutl segment show <seg> [--log <log>] [--spec | --json]
//! rvmutl heap create|check|stats ...    RDS heaps (see heap.rs)
//! rvmutl completions <shell>            shell completion script
//! ```
//!
//! Exit codes: 0 success; 1 usage error (bad arguments, invalid size);
//! 2 I/O error, missing file, log locked by another user, or a segment the
//! log names cannot be opened; 3 not a log, unsupported version, or a
//! corrupted log.
//!
//! Inspection never writes and takes no lock: `status`, `dump`, `heap
//! check`, `heap stats` and `segment show` read the files read-only (a
//! live view of files a program may hold), and where they need the
//! recovered state they build it in memory. `--json` prints
//! newline-delimited JSON: one object per line, each with a `"type"`.

/// `eprintln!` that ignores a failed write: an unwritable standard error
/// (`2>/dev/full`) must not turn the exit code into a panic's 101.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that ignores a failed write (see `say!`).
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

mod heap;
mod progress;
mod segment;

use clap::{CommandFactory, Parser, Subcommand};
use progress::Progress;
use rvm::log::format::{FrameDefect, FrameKind, Status, VERSION};
use rvm::log::inspect::{FrameBody, FrameReport, LogEnd, LogInspector, ScanReport, SlotReport};
use rvm::log::ScanStop;
use rvm::{Error, FileVfs, LogError, Options, Rvm};
use serde_json::{json, Value};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Refuses, before the log is opened, a path a `create` command would
/// create that exists already (a file, a directory, a symlink, even a
/// dangling one): opening the log starts a new epoch in its status, and a
/// refused command leaves every file byte-identical.
/// So is a path whose folder does not exist.
pub(crate) fn refuse_existing(path: &Path, op: &'static str) -> Result<(), Failure> {
    let refuse =
        |kind, text: &str| Failure::Rvm(Error::Io { op, path: path.into(), source: io::Error::new(kind, text) });
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(refuse(io::ErrorKind::AlreadyExists, "the path exists already"));
    }
    let folder = rvm::storage::folder_of(path);
    if !std::fs::metadata(folder).is_ok_and(|m| m.is_dir()) {
        return Err(refuse(io::ErrorKind::NotFound, "its folder does not exist (or is not a folder)"));
    }
    Ok(())
}

/// Refuses `len` new bytes of a segment whose blocks are to be allocated
/// (not `sparse`) when its folder's file system has less room, before
/// the log is opened (an open starts a new epoch in its status). The
/// allocation at creation stays the guarantee; this only refuses early
/// what it would refuse.
pub(crate) fn refuse_no_room(path: &Path, len: u64, sparse: bool) -> Result<(), Failure> {
    let folder = rvm::storage::folder_of(path);
    let Ok(fs) = rustix::fs::statvfs(folder) else { return Ok(()) };
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    if sparse || free >= len {
        return Ok(());
    }
    Err(Failure::Rvm(Error::Io {
        op: "allocating segment space",
        path: path.into(),
        source: io::Error::new(
            io::ErrorKind::StorageFull,
            format!("No space left on device: {len} bytes asked, {free} free"),
        ),
    }))
}

/// The exit codes, as every `--help` ends.
macro_rules! exit_codes {
    () => {
        "\
Exit codes:
  0  success
  1  usage error (bad arguments, invalid size, invalid load map)
  2  I/O error, missing file, log locked by another user, or a segment named by the log cannot be opened
  3  not an RVM log, unsupported format version, or corrupted log (or a segment without a valid load map)"
    };
}
pub(crate) use exit_codes;

/// Shown at the end of every `--help`.
const EXIT_CODES: &str = exit_codes!();

/// Exit code for a usage error.
const EXIT_USAGE: u8 = 1;
/// Exit code for I/O, lock and missing-file errors.
const EXIT_IO: u8 = 2;
/// Exit code for bad or corrupted logs.
const EXIT_INVALID: u8 = 3;

/// Create, inspect, recover and truncate RVM (recoverable virtual memory) logs.
///
/// Inspection (`status`, `dump`, `heap check`, `heap stats`, `segment show`) never writes and
/// takes no lock: it works on files a running program holds, as a live view that may be slightly
/// behind the program. `--json` prints one JSON object per line.
#[derive(Debug, Parser)]
#[command(name = "rvmutl", version, after_help = EXIT_CODES, arg_required_else_help = true)]
struct Cli {
    /// Show no progress (progress is drawn on standard error, only when it is a terminal).
    #[arg(long, short, global = true)]
    quiet: bool,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new log of a fixed size (an existing file is never overwritten).
    #[command(after_help = EXIT_CODES)]
    CreateLog {
        /// Path of the new log file (or an existing block device).
        path: PathBuf,
        /// Size in bytes; suffixes K, M, G, T (powers of 1024, also KiB, MiB, ...) are accepted.
        /// At least 196K.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Show the superblock, both status slots, the chosen slot, the space in use and how the log ends.
    ///
    /// The end is told in three words: a clean end (nothing follows the last complete transaction),
    /// a torn tail (an unfinished transaction, a partly written frame, or valid frames after a bad one
    /// that were never synced: what a crash leaves; recovery discards it and loses nothing
    /// acknowledged), or damage (records after the bad frame had been synced: recovery refuses the
    /// log). Reads without a lock and writes nothing: a log a program holds shows as a live view.
    #[command(after_help = STATUS_JSON)]
    Status {
        /// The log.
        log: PathBuf,
        /// Print newline-delimited JSON: a "log" object, two "slot" objects, a "scan" object.
        #[arg(long)]
        json: bool,
    },
    /// Print every frame from the head to the end of the log, one per line.
    ///
    /// Frames of an unfinished tail (no commit frame) are shown and marked; recovery discards them.
    /// Reads without a lock and writes nothing (a live view of a log a program holds).
    #[command(after_help = DUMP_JSON)]
    Dump {
        /// The log.
        log: PathBuf,
        /// Print newline-delimited JSON: a "log" object, one "frame" object per frame, a "scan" object.
        #[arg(long)]
        json: bool,
    },
    /// Replay the complete transactions of the log onto their segments and empty the log.
    ///
    /// The segments the log names must exist at their recorded paths.
    #[command(after_help = EXIT_CODES)]
    Recover {
        /// The log.
        log: PathBuf,
        /// Accept a damaged log: keep a copy of it (LOG.damaged-EPOCH), apply the complete transactions
        /// before the damage, drop the rest, and report what was dropped.
        #[arg(long)]
        salvage: bool,
        /// Accept the file at NOW as the segment the log recorded as RECORDED (restored from a copy or moved);
        /// its identity is not checked. Repeat for several segments. A path holding `=` is read whole if it
        /// names a file, else cut where the part after `=` names one.
        #[arg(long, value_name = "RECORDED=NOW", value_parser = parse_accept)]
        accept_segment: Vec<(PathBuf, PathBuf)>,
    },
    /// Open the log as an application would (running recovery), truncate it, and close it.
    #[command(after_help = EXIT_CODES)]
    Truncate {
        /// The log.
        log: PathBuf,
    },
    /// Open the log as an application would (running recovery), run a generation checkpoint, and close it.
    ///
    /// A log no program has open has no memory to sweep: recovery replays its records onto the segments,
    /// then the checkpoint records its position and generation in the status (see `status`).
    #[command(after_help = EXIT_CODES)]
    Checkpoint {
        /// The log.
        log: PathBuf,
    },
    /// Create a segment with a load map (regions at fixed addresses), or print a segment's load map.
    #[command(subcommand, after_help = EXIT_CODES)]
    Segment(segment::SegmentCommand),
    /// Create, check and inspect RDS heaps (`rvmutl heap --help`).
    #[command(subcommand)]
    Heap(heap::HeapCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on standard output.
    ///
    /// For example: `rvmutl completions bash > ~/.local/share/bash-completion/completions/rvmutl`,
    /// or `rvmutl completions zsh > "${fpath[1]}/_rvmutl"`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// The fields of `status --json`, shown by `status --help`.
const STATUS_JSON: &str = concat!(
    "\
JSON (--json): one object per line, each with \"type\":
  log   log, live (read without a lock: may be behind a program writing the log), superblock
        {version, device_size, device_len, area_offset, area_len}, chosen_slot (null: both invalid)
  slot  index, offset, valid, problem (null or why invalid), status (null, or seq, epoch, head,
        synced_end, checkpoint_lsn, checkpoint_generation, committed, next_segment_id,
        segments [{id, name, inode, birth_ns}])
  scan  start, end, transactions, commits, frames, discarded_bytes, used_bytes, free_bytes,
        log_end (clean | torn | damaged), stop {reason, lsn, description, blank}, next_valid
        (first valid frame after the bad one, or null), damage (null, or lsn, reason, synced_to,
        next_valid, valid_end, transactions_after); absent when both slots are invalid

",
    exit_codes!()
);

/// The fields of `dump --json`, shown by `dump --help`.
const DUMP_JSON: &str = concat!(
    "\
JSON (--json): one object per line, each with \"type\":
  log    log, live, superblock (as in `status`), chosen_slot, status (the chosen status, as in `status`)
  frame  lsn, device_offset, len, committed (false: unfinished tail, discarded by recovery), kind,
         and for kind \"range\": segment, segment_name, offset, data_len;
         for kind \"commit\": ranges, first_tx, last_tx, bytes, synced
  scan   as in `status`
A log without a valid status slot gives the log object with chosen_slot null and both slot objects.

",
    exit_codes!()
);

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// An error from the library.
    Rvm(Error),
    /// The log has no valid status slot (already reported on stdout).
    NoValidStatus,
    /// Writing the output failed.
    Output(io::Error),
    /// An error from the segment loader (`segment` subcommands).
    Loader(rvm::loader::LoaderError),
    /// A heap error (not a core one).
    Heap(rvm::heap::HeapError),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Rvm(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // Usage errors: the one error prefix, then clap's text.
            say_raw!("{}", usage_error(&e.render().to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            // Help and version go to stdout with success, unless they
            // cannot be written (a full disk; a closed pipe is fine).
            let text = e.render();
            let written = if io::IsTerminal::is_terminal(&io::stdout()) {
                write!(io::stdout(), "{}", text.ansi())
            } else {
                write!(io::stdout(), "{text}")
            }
            .and_then(|()| io::stdout().flush());
            return match written {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => ExitCode::from(report_failure(&Failure::Output(e))),
                _ => ExitCode::SUCCESS,
            };
        }
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = run(cli.command, cli.quiet, &mut out).and_then(|()| out.flush().map_err(Failure::Output));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let _ = out.flush();
            ExitCode::from(report_failure(&failure))
        }
    }
}

/// A clap usage error with rvmutl's error prefix (`rvmutl: error: `)
/// instead of clap's `error: `.
fn usage_error(rendered: &str) -> String {
    let text = rendered.strip_prefix("error: ").unwrap_or(rendered);
    format!("rvmutl: error: {text}")
}

/// Prints a failure on stderr and returns the exit code.
fn report_failure(failure: &Failure) -> u8 {
    match failure {
        // The reader went away (`rvmutl dump log | head`): nothing to say.
        Failure::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Failure::Output(e) => {
            say!("rvmutl: error: writing the output: {e}");
            EXIT_IO
        }
        Failure::Heap(e) => heap::report(e),
        Failure::NoValidStatus => {
            say!("rvmutl: error: corrupted log: both status slots are invalid");
            EXIT_INVALID
        }
        Failure::Loader(e) => segment::report(e),
        Failure::Rvm(e) => {
            say!("rvmutl: error: {e}");
            if let Some(hint) = hint(e) {
                say!("rvmutl: hint: {hint}");
            }
            exit_code(e)
        }
    }
}

/// The exit code for a library error.
fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Io { .. } | Error::Locked { .. } | Error::Poisoned { .. } => EXIT_IO,
        Error::Corrupted { .. } => EXIT_INVALID,
        // A request too big for the log is the arguments' doing, not damage.
        Error::Log(LogError::BadSize { .. } | LogError::TransactionTooLarge { .. }) => EXIT_USAGE,
        Error::Log(LogError::MissingSegment { .. } | LogError::ViewUnstable { .. } | LogError::LogUnlinked { .. }) => {
            EXIT_IO
        }
        Error::Log(LogError::NotALog { .. } | LogError::UnsupportedVersion { .. }) => EXIT_INVALID,
        Error::Log(_) => EXIT_INVALID,
        _ => EXIT_IO,
    }
}

/// A suggestion for the usual causes of an error.
fn hint(e: &Error) -> Option<String> {
    match e {
        Error::Locked { path } => Some(format!(
            "{} is open in a program (or another rvmutl); stop it first to change it (inspection works while it \
             runs: `rvmutl status`, `dump`, `heap check`, `heap stats` and `segment show` read without a lock)",
            path.display()
        )),
        Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => Some("check the path".into()),
        Error::Io { path, source, .. } if source.kind() == io::ErrorKind::AlreadyExists => Some(format!(
            "{} exists: rvmutl never overwrites a file it creates; choose another path or remove it",
            path.display()
        )),
        Error::Io { op: "allocating segment space", source, .. } if source.kind() == io::ErrorKind::StorageFull => {
            Some(
                "the disk has no room for the whole segment (its blocks are allocated when it is made or grown): \
                 free space, ask for a smaller --size, or pass --sparse to take blocks only as pages are written"
                    .into(),
            )
        }
        Error::Io { op: "allocating the log's space", source, .. } if source.kind() == io::ErrorKind::StorageFull => {
            Some("the disk has no room for a log of that size: free space or ask for a smaller --size".into())
        }
        Error::Log(LogError::NotALog { .. }) => {
            Some("create a log with `rvmutl create-log <path> --size <bytes>`".into())
        }
        Error::Log(LogError::MissingSegment { .. }) => {
            Some("the segments must be at the paths the log recorded; `rvmutl status` lists them".into())
        }
        Error::Log(LogError::TransactionTooLarge { .. }) => Some(
            "the log is too small for what was asked: use a larger log (`rvmutl create-log --size`) or ask for \
             less (a smaller --static-len or load map); a segment file this command was creating was deleted \
             again"
                .into(),
        ),
        Error::Log(LogError::ViewUnstable { .. }) => {
            Some("a program is truncating or checkpointing the log busily; run the command again".into())
        }
        _ => None,
    }
}

fn run(command: Command, quiet: bool, out: &mut dyn Write) -> Outcome {
    match command {
        Command::CreateLog { path, size } => create_log(&path, size, out),
        Command::Status { log, json } => status(&log, json, quiet, out),
        Command::Dump { log, json } => dump(&log, json, quiet, out),
        Command::Recover { log, salvage, accept_segment } => recover(&log, salvage, &accept_segment, quiet, out),
        Command::Truncate { log } => truncate(&log, quiet, out),
        Command::Checkpoint { log } => checkpoint(&log, quiet, out),
        Command::Segment(command) => segment::run(command, quiet, out),
        Command::Heap(cmd) => heap::run(cmd, quiet, out),
        Command::Completions { shell } => {
            // Made in memory first: the generator panics when its writer
            // fails (a full disk, a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "rvmutl", &mut script);
            out.write_all(&script).map_err(Failure::Output)
        }
    }
}

/// Parses a size: digits with an optional binary suffix (K, M, G, T, with
/// or without `iB`, any case).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let bad = || format!("`{s}` is not a size: expected a number of bytes with an optional suffix K, M, G or T");
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("`{s}` is too large"))
}

fn create_log(path: &Path, size: u64, out: &mut dyn Write) -> Outcome {
    rvm::create_log(path, size)?;
    let area = rvm::log::format::Superblock::for_size(size).map_or(0, |sb| sb.area_len);
    writeln!(out, "created log {}: {size} bytes, record area {area} bytes", path.display())?;
    Ok(())
}

/// Percentage for display.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn slot_line(slot: &SlotReport, chosen: Option<u8>) -> String {
    let state = match (&slot.problem, chosen == Some(slot.index)) {
        (None, true) => "valid, chosen".to_string(),
        (None, false) => "valid, older".to_string(),
        (Some(p), _) => format!("INVALID ({})", p.describe()),
    };
    let mut line = format!("slot {} (offset {}): {state}", slot.index, slot.offset);
    if let Some(s) = &slot.status {
        line.push_str(&format!(
            "\n    seq {}, epoch {}, head {}, synced end {}, checkpoint lsn {} generation {}, committed {}, next segment id {}",
            s.seq,
            s.epoch,
            s.head,
            s.synced_end,
            s.checkpoint_lsn,
            s.checkpoint_generation,
            s.committed,
            s.next_segment_id
        ));
        if s.segments.is_empty() {
            line.push_str("\n    segments: none");
        }
        for seg in &s.segments {
            line.push_str(&format!("\n    segment {}: {}", seg.id, seg.name.display()));
            if let Some(d) = seg.device {
                line.push_str(&format!(" ({d})"));
            }
        }
    }
    line
}

fn status_json(s: &Status) -> Value {
    json!({
        "seq": s.seq,
        "epoch": s.epoch,
        "head": s.head,
        "synced_end": s.synced_end,
        "checkpoint_lsn": s.checkpoint_lsn,
        "checkpoint_generation": s.checkpoint_generation,
        "committed": s.committed,
        "next_segment_id": s.next_segment_id,
        "segments": s.segments.iter().map(|e| json!({
            "id": e.id,
            "name": e.name.to_string_lossy(),
            "inode": e.device.map(|d| d.file),
            "birth_ns": e.device.map(|d| d.birth),
        })).collect::<Vec<_>>(),
    })
}

fn slot_json(slot: &SlotReport) -> Value {
    json!({
        "type": "slot",
        "index": slot.index,
        "offset": slot.offset,
        "valid": slot.is_valid(),
        "problem": slot.problem.map(|p| p.describe()),
        "status": slot.status.as_ref().map(status_json),
    })
}

fn defect_name(defect: FrameDefect) -> &'static str {
    match defect {
        FrameDefect::BadLength => "bad_length",
        FrameDefect::WrongPosition => "wrong_position",
        FrameDefect::WrongEpoch => "wrong_epoch",
        FrameDefect::BadChecksum => "bad_checksum",
        FrameDefect::BadBody => "bad_body",
    }
}

fn scan_json(scan: &ScanReport, capacity: u64) -> Value {
    let stop = match scan.stop {
        ScanStop::Limit => {
            json!({ "reason": "end_of_area", "lsn": null, "description": scan.describe_stop(), "blank": false })
        }
        ScanStop::Defect { lsn, defect } => json!({
            "reason": defect_name(defect),
            "lsn": lsn,
            "description": scan.describe_stop(),
            "blank": scan.stop_blank,
        }),
    };
    json!({
        "type": "scan",
        "start": scan.start,
        "end": scan.end,
        "transactions": scan.transactions,
        "commits": scan.commits,
        "frames": scan.frames,
        "discarded_bytes": scan.discarded,
        "used_bytes": scan.used(),
        "free_bytes": capacity - scan.used(),
        "log_end": scan.log_end().name(),
        "stop": stop,
        "next_valid": scan.next_valid,
        "damage": scan.damage.map(|d| json!({
            "lsn": d.lsn,
            "reason": defect_name(d.defect),
            "synced_to": d.synced_to,
            "next_valid": d.next_valid,
            "valid_end": d.valid_end,
            "transactions_after": d.transactions_after,
        })),
    })
}

/// Writes one NDJSON record: the value on one line.
pub(crate) fn ndjson(out: &mut dyn Write, v: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, v).map_err(io::Error::from)?;
    writeln!(out)
}

/// Superblock facts shared by `status` and `dump`.
fn superblock_json(log: &LogInspector) -> Value {
    let sb = log.superblock();
    json!({
        "version": VERSION,
        "device_size": sb.device_size,
        "device_len": log.device_len(),
        "area_offset": sb.area_offset,
        "area_len": sb.area_len,
    })
}

/// The first NDJSON record of `status` and `dump`.
fn log_json(path: &Path, log: &LogInspector) -> Value {
    json!({
        "type": "log",
        "log": path.to_string_lossy(),
        "live": log.is_live(),
        "superblock": superblock_json(log),
        "chosen_slot": log.chosen_slot(),
    })
}

/// The line that says the view was read without a lock.
const LIVE_VIEW: &str =
    "live view: read without a lock, writing nothing; if a program has the log open, this may be slightly behind it";

/// How the log ends, in words (`status`, `dump`): a clean end, a torn
/// tail, or damage, and whether valid frames follow a bad one.
fn end_words(scan: &ScanReport) -> String {
    let after = |at: u64| {
        format!(
            "; valid frames follow the bad one (from position {at}), but nothing shows they were synced: \
             recovery discards them"
        )
    };
    match (scan.log_end(), scan.stop) {
        (LogEnd::Clean, ScanStop::Limit) => {
            format!("cleanly at position {}: the record area is full up to there", scan.end)
        }
        (LogEnd::Clean, ScanStop::Defect { defect, .. }) => {
            let what = if scan.stop_blank {
                "a never-written header".to_string()
            } else {
                format!("a stale header ({})", defect.describe())
            };
            format!("cleanly at position {}: {what} follows the last complete transaction", scan.end)
        }
        (LogEnd::Torn, stop) => {
            let mut words = format!("in a torn tail after position {}", scan.end);
            if scan.discarded > 0 {
                words.push_str(&format!(": {} bytes of an unfinished transaction", scan.discarded));
            }
            if let ScanStop::Defect { lsn, .. } = stop {
                words.push_str(&format!(
                    "{} the record at position {lsn} is incomplete or bad ({})",
                    if scan.discarded > 0 { ", then" } else { ":" },
                    scan.describe_stop()
                ));
            }
            if let Some(at) = scan.next_valid {
                words.push_str(&after(at));
            } else {
                words.push_str("; recovery discards the tail, and nothing acknowledged is lost");
            }
            words
        }
        (_, stop) => {
            let lsn = match stop {
                ScanStop::Defect { lsn, .. } => lsn,
                ScanStop::Limit => scan.end,
            };
            format!("DAMAGED at position {lsn} ({})", scan.describe_stop())
        }
    }
}

/// A scan estimate for the progress bar: the durable part of the log.
fn scan_total(log: &LogInspector) -> u64 {
    log.status().map(|s| s.synced_end.saturating_sub(s.head)).unwrap_or(0)
}

fn status(path: &Path, as_json: bool, quiet: bool, out: &mut dyn Write) -> Outcome {
    let log = LogInspector::open_shared(&FileVfs, path)?;
    let sb = log.superblock();
    let chosen = log.chosen_slot();
    let scan = match chosen {
        Some(_) => {
            let progress = Progress::bytes(quiet, "scanning the log", scan_total(&log));
            let start = log.status()?.head;
            let total = scan_total(&log);
            let scan = log.walk(|f| progress.set(f.lsn + u64::from(f.len) - start, total))?;
            progress.finish();
            Some(scan)
        }
        None => None,
    };
    if as_json {
        ndjson(out, &log_json(path, &log))?;
        for slot in log.slots() {
            ndjson(out, &slot_json(slot))?;
        }
        if let Some(scan) = &scan {
            ndjson(out, &scan_json(scan, sb.area_len))?;
        }
    } else {
        writeln!(out, "log:            {}", path.display())?;
        writeln!(out, "view:           {LIVE_VIEW}")?;
        writeln!(out, "format version: {VERSION}")?;
        writeln!(out, "device size:    {} bytes (file is {} bytes)", sb.device_size, log.device_len())?;
        writeln!(out, "record area:    {} bytes at offset {}", sb.area_len, sb.area_offset)?;
        for slot in log.slots() {
            writeln!(out, "{}", slot_line(slot, chosen))?;
        }
        match (chosen, &scan) {
            (Some(index), Some(scan)) => {
                let used = scan.used();
                writeln!(out, "chosen slot:    {index}")?;
                writeln!(out, "head:           {}", scan.start)?;
                writeln!(out, "end:            {} (after the last complete transaction)", scan.end)?;
                writeln!(out, "used:           {used} bytes ({:.1}%)", percent(used, sb.area_len))?;
                writeln!(out, "free:           {} bytes", sb.area_len - used)?;
                writeln!(out, "transactions:   {} complete in the log ({} commits)", scan.transactions, scan.commits)?;
                writeln!(out, "discarded:      {} bytes of unfinished tail", scan.discarded)?;
                match scan.damage {
                    Some(d) => writeln!(
                        out,
                        "DAMAGED:        the record at position {} is bad ({}) but the log was durable up to {}; \
                         valid frames follow{} ({} complete transaction(s) after it). Recovery refuses this log; \
                         `rvmutl recover --salvage` keeps only what precedes the damage",
                        d.lsn,
                        d.defect.describe(),
                        d.synced_to,
                        d.next_valid.map(|p| format!(" from position {p}")).unwrap_or_default(),
                        d.transactions_after
                    )?,
                    None => writeln!(out, "log ends:       {}", end_words(scan))?,
                }
            }
            _ => writeln!(out, "chosen slot:    none (both slots are invalid; recovery would refuse this log)")?,
        }
    }
    match chosen {
        Some(_) => Ok(()),
        None => Err(Failure::NoValidStatus),
    }
}

fn frame_line(log: &LogInspector, f: &FrameReport, committed: bool) -> String {
    let sb = log.superblock();
    let device_offset = sb.area_offset + f.lsn % sb.area_len;
    let body = match f.body {
        FrameBody::Range { segment, offset, data_len, .. } => {
            let name = log.segment_name(segment).map_or_else(|| "?".to_string(), |p| p.display().to_string());
            format!("range   segment {segment} ({name}) offset {offset} len {data_len}")
        }
        FrameBody::Commit { ranges, first_tx, last_tx, bytes, synced } => {
            format!("commit  ranges {ranges} commits {first_tx}..={last_tx} bytes {bytes} synced {synced}")
        }
    };
    let tail = if committed { "" } else { "  [unfinished tail, discarded by recovery]" };
    format!("{:>12} {:>12} {:>8}  {body}{tail}", f.lsn, device_offset, f.len)
}

fn frame_json(log: &LogInspector, f: &FrameReport, committed: bool) -> Value {
    let sb = log.superblock();
    let mut v = json!({
        "type": "frame",
        "lsn": f.lsn,
        "device_offset": sb.area_offset + f.lsn % sb.area_len,
        "len": f.len,
        "committed": committed,
    });
    let extra = match f.body {
        FrameBody::Range { segment, offset, data_len, .. } => json!({
            "kind": "range",
            "segment": segment,
            "segment_name": log.segment_name(segment).map(|p| p.to_string_lossy()),
            "offset": offset,
            "data_len": data_len,
        }),
        FrameBody::Commit { ranges, first_tx, last_tx, bytes, synced } => json!({
            "kind": "commit",
            "ranges": ranges,
            "first_tx": first_tx,
            "last_tx": last_tx,
            "bytes": bytes,
            "synced": synced,
        }),
    };
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
        v.extend(extra);
    }
    v
}

/// Walks the log, calling `emit(frame, committed)` for every frame in log
/// order. A frame is committed if a commit frame follows it, so the frames
/// of each transaction are held back until its commit frame is seen (or
/// the scan ends). Stops emitting at the first output error.
fn walk_frames(
    log: &LogInspector,
    quiet: bool,
    mut emit: impl FnMut(&FrameReport, bool) -> io::Result<()>,
) -> Result<ScanReport, Failure> {
    let mut open_tx: Vec<FrameReport> = Vec::new();
    let mut failed: Option<io::Error> = None;
    let start = log.status()?.head;
    let total = scan_total(log);
    let progress = Progress::bytes(quiet, "reading the log", total);
    let scan = log.walk(|f| {
        progress.set(f.lsn + u64::from(f.len) - start, total);
        open_tx.push(*f);
        if f.kind() == FrameKind::Commit {
            for g in open_tx.drain(..) {
                if failed.is_none() {
                    failed = emit(&g, true).err();
                }
            }
        }
    })?;
    progress.finish();
    if let Some(e) = failed {
        return Err(e.into());
    }
    for g in &open_tx {
        emit(g, false)?;
    }
    Ok(scan)
}

fn dump(path: &Path, as_json: bool, quiet: bool, out: &mut dyn Write) -> Outcome {
    let log = LogInspector::open_shared(&FileVfs, path)?;
    let sb = log.superblock();
    let Some(chosen) = log.chosen_slot() else {
        if as_json {
            ndjson(out, &log_json(path, &log))?;
            for slot in log.slots() {
                ndjson(out, &slot_json(slot))?;
            }
        } else {
            for slot in log.slots() {
                writeln!(out, "# {}", slot_line(slot, None).replace('\n', "\n# "))?;
            }
        }
        return Err(Failure::NoValidStatus);
    };
    let status = log.status()?.clone();
    if as_json {
        let mut head = log_json(path, &log);
        head["status"] = status_json(&status);
        ndjson(out, &head)?;
        let scan = walk_frames(&log, quiet, |f, committed| ndjson(out, &frame_json(&log, f, committed)))?;
        ndjson(out, &scan_json(&scan, sb.area_len))?;
    } else {
        writeln!(
            out,
            "# log {}: head {}, epoch {}, status slot {chosen}, record area {} bytes at offset {}",
            path.display(),
            status.head,
            status.epoch,
            sb.area_len,
            sb.area_offset
        )?;
        writeln!(out, "# {LIVE_VIEW}")?;
        writeln!(out, "# {:>10} {:>12} {:>8}  frame", "lsn", "offset", "len")?;
        let scan = walk_frames(&log, quiet, |f, committed| writeln!(out, "{}", frame_line(&log, f, committed)))?;
        let stop = match scan.damage {
            Some(d) => format!(
                "DAMAGED: the frame at {} is bad ({}) but the log was durable up to {}; valid frames follow; \
                 recovery refuses this log",
                d.lsn,
                d.defect.describe(),
                d.synced_to
            ),
            None => format!("the log ends {}", end_words(&scan)),
        };
        writeln!(
            out,
            "# end {}: {} complete transactions ({} commits), {} frames, {} bytes used, {} bytes discarded; {stop}",
            scan.end,
            scan.transactions,
            scan.commits,
            scan.frames,
            scan.used(),
            scan.discarded
        )?;
    }
    Ok(())
}

fn recovery_lines(r: &rvm::RecoveryReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "  transactions replayed:  {}", r.transactions)?;
    writeln!(out, "  log bytes replayed:     {}", r.log_bytes)?;
    writeln!(out, "  segment bytes written:  {}", r.segment_bytes_written)?;
    writeln!(out, "  unfinished tail:        {} bytes discarded", r.discarded_bytes)?;
    match r.stopped_at {
        Some((lsn, why)) => writeln!(out, "  log ended at:           position {lsn} (next frame: {why})")?,
        None => writeln!(out, "  log ended at:           the end of the record area")?,
    }
    if let Some(s) = &r.salvage {
        writeln!(out, "  SALVAGED a damaged log: record at position {} was bad ({})", s.damaged_at, s.defect)?;
        writeln!(
            out,
            "  dropped:                {} log bytes, {} complete transaction(s) after the damage, and the",
            s.dropped_bytes, s.dropped_transactions
        )?;
        writeln!(
            out,
            "                          transaction the damaged frame belonged to (the log had been durable up to {})",
            s.synced_to
        )?;
        writeln!(out, "  damaged log kept at:    {}", s.copy.display())?;
    }
    Ok(())
}

/// `--accept-segment RECORDED=NOW` (or `PATH`, accepted where it is):
/// neither path may be empty.
/// A path may hold `=`: an argument naming an existing file is taken
/// whole (the `PATH` form); otherwise it is cut at the first `=` after
/// which an existing file is named, or else at the first `=`.
fn parse_accept(arg: &str) -> Result<(PathBuf, PathBuf), String> {
    let cuts: Vec<usize> = arg.match_indices('=').map(|(i, _)| i).collect();
    let (recorded, now) = match cuts.first() {
        Some(&first) if !Path::new(arg).exists() => {
            let at = cuts.iter().copied().find(|&i| Path::new(&arg[i + 1..]).exists()).unwrap_or(first);
            (&arg[..at], &arg[at + 1..])
        }
        _ => (arg, arg),
    };
    if recorded.is_empty() || now.is_empty() {
        return Err(format!("`{arg}`: expected RECORDED=NOW (or PATH), with neither path empty"));
    }
    Ok((PathBuf::from(recorded), PathBuf::from(now)))
}

/// What a recovery of `path` has to replay, for the progress line (read
/// without a lock; nothing if the log cannot be read that way).
fn recover(path: &Path, salvage: bool, accept: &[(PathBuf, PathBuf)], quiet: bool, out: &mut dyn Write) -> Outcome {
    let mut opts = Options { salvage, ..Options::default() };
    for (recorded, now) in accept {
        opts = opts.accept_segment(recorded, now);
    }
    let progress = Arc::new(Progress::bytes(quiet, format!("verifying {}", path.display()), 0));
    opts.recovery_progress = Some(recovery_hook(&progress, path));
    let report = rvm::recover_log(&FileVfs, path, &opts);
    progress.finish();
    let report = report?;
    writeln!(out, "recovered {}:", path.display())?;
    recovery_lines(&report, out)?;
    if report.salvage.is_some() {
        writeln!(out, "the log is now empty; its segments hold every complete transaction before the damage")?;
    } else {
        writeln!(out, "the log is now empty and its segments hold every complete transaction")?;
    }
    Ok(())
}

/// Shows recovery's phases and bytes on `progress`.
fn recovery_hook(progress: &Arc<Progress>, path: &Path) -> rvm::ProgressHook {
    let (progress, path) = (progress.clone(), path.display().to_string());
    rvm::ProgressHook::new(move |p| {
        let phase = match p.phase {
            rvm::RecoveryPhase::Verify => "verifying",
            rvm::RecoveryPhase::Replay => "replaying",
        };
        progress.message(format!("{phase} {path}"));
        progress.set(p.done, p.total);
    })
}

/// Opens the log at `path` as an application would, showing recovery's
/// progress.
fn open_with_progress(path: &Path, quiet: bool) -> Result<Rvm, rvm::Error> {
    let progress = Arc::new(Progress::bytes(quiet, format!("opening {}", path.display()), 0));
    let opts = Options {
        truncate_threshold: None,
        recovery_progress: Some(recovery_hook(&progress, path)),
        ..Options::default()
    };
    let rvm = Rvm::open_with(Arc::new(FileVfs), path, opts);
    progress.finish();
    rvm
}

fn truncate(path: &Path, quiet: bool, out: &mut dyn Write) -> Outcome {
    let rvm = open_with_progress(path, quiet)?;
    let report = rvm.recovery_report();
    writeln!(out, "opened {} (recovery at open):", path.display())?;
    recovery_lines(&report, out)?;
    let before = rvm.query();
    let progress =
        Progress::spinner(quiet, format!("truncating {} ({} bytes of log)", path.display(), before.log_used));
    rvm.truncate()?;
    let after = rvm.query();
    rvm.close()?;
    progress.finish();
    writeln!(
        out,
        "truncated: {} bytes applied; log empty at position {} ({} of {} bytes free); closed",
        before.log_used, after.head, after.log_free, after.log_capacity
    )?;
    Ok(())
}

fn checkpoint(path: &Path, quiet: bool, out: &mut dyn Write) -> Outcome {
    let rvm = open_with_progress(path, quiet)?;
    writeln!(out, "opened {} (recovery at open):", path.display())?;
    recovery_lines(&rvm.recovery_report(), out)?;
    let progress = Progress::spinner(quiet, format!("checkpointing {}", path.display()));
    let report = rvm.checkpoint()?;
    let q = rvm.query();
    rvm.close()?;
    progress.finish();
    let generation =
        LogInspector::open_shared(&FileVfs, path).ok().and_then(|l| l.status().ok().map(|s| s.checkpoint_generation));
    writeln!(
        out,
        "checkpoint at log position {}{}: {} page(s) written; log empty ({} of {} bytes free); closed",
        report.lsn,
        generation.map(|g| format!(", generation {g}")).unwrap_or_default(),
        report.pages,
        q.log_free,
        q.log_capacity
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64kib"), Ok(64 << 10));
        assert_eq!(parse_size("3M"), Ok(3 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "K", "12X", "-1", "1.5M", "99999999999999999999", "20000000T"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn exit_codes_follow_the_help_text() {
        let io = Error::Locked { path: "x".into() };
        assert_eq!(exit_code(&io), EXIT_IO);
        let bad = Error::Corrupted { what: "log".into(), location: "here".into() };
        assert_eq!(exit_code(&bad), EXIT_INVALID);
        assert_eq!(exit_code(&LogError::NotALog { path: "x".into() }.into()), EXIT_INVALID);
        assert_eq!(exit_code(&LogError::BadSize { requested: 1, reason: "small" }.into()), EXIT_USAGE);
        assert_eq!(exit_code(&LogError::ViewUnstable { path: "x".into(), attempts: 8 }.into()), EXIT_IO);
        assert_eq!(exit_code(&LogError::LogUnlinked { path: "x".into() }.into()), EXIT_IO);
    }

    /// A transaction too big for the log (`heap create --static-len 1G` on
    /// a 4 MiB log) exited 3, "corrupted log", with no hint; it is a usage
    /// error (1), with a hint to use a larger log.
    #[test]
    fn a_transaction_too_large_for_the_log_is_a_usage_error() {
        let e: Error = LogError::TransactionTooLarge { needed: 4 << 20, capacity: 1 << 20 }.into();
        assert_eq!(exit_code(&e), EXIT_USAGE);
        assert!(hint(&e).unwrap().contains("larger log"));
    }

    #[test]
    fn usage_errors_get_the_one_prefix() {
        assert_eq!(usage_error("error: unexpected argument\n"), "rvmutl: error: unexpected argument\n");
        assert_eq!(usage_error("odd text\n"), "rvmutl: error: odd text\n");
        let e = Cli::try_parse_from(["rvmutl", "frobnicate"]).unwrap_err();
        assert!(usage_error(&e.render().to_string()).starts_with("rvmutl: error: unrecognized subcommand"));
    }

    #[test]
    fn the_lock_hint_names_the_locked_file() {
        let h = hint(&Error::Locked { path: "/data/app.heap".into() }).unwrap();
        assert!(h.starts_with("/data/app.heap is open"), "{h}");
    }
}
