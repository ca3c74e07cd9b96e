//! Quick start: a persistent run counter and a small journal that survive
//! restarts, kills and crashes.
//!
//! ```text
//! cargo run --release --example quickstart            # uses $TMPDIR/rvm-quickstart
//! cargo run --release --example quickstart -- ./data  # or a folder of your choice
//! ```
//!
//! Each run opens (and on the first run creates) a log and a segment in the
//! folder, maps the segment, prints what earlier runs committed, and then
//! commits 1000 more updates with flush commits. Kill it at any moment
//! (Ctrl-C, `kill -9`) and run it again: every update it reported committed
//! is there.

use rvm::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};
use std::path::Path;

#[path = "common/folder.rs"]
pub mod folder;

/// Layout of the segment's first page, at fixed offsets.
const RUNS: usize = 0; // u64: completed runs
const UPDATES: usize = 8; // u64: committed updates, all runs together
const LAST: usize = 16; // [u8; 48]: text of the last update

/// One run in folder `dir`; returns the counts it leaves: (completed runs,
/// committed updates).
pub fn run(dir: &Path) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the folder {}: {e}", dir.display()))?;
    let log = dir.join("quickstart.log");
    let seg_path = dir.join("quickstart.seg");
    if !log.exists() {
        create_log(&log, 4 << 20)?;
        println!("created log {}", log.display());
    }
    let rvm = match Rvm::open(&log, Options::default()) {
        Ok(rvm) => rvm,
        Err(e @ rvm::Error::Log(rvm::LogError::UnsupportedVersion { .. })) => {
            // A folder from an older release: its log format is refused by
            // name, never misread.
            eprintln!("quickstart: {e}");
            eprintln!(
                "quickstart: hint: {} was written by an older release; remove {} (or pass another folder) to start afresh",
                log.display(),
                dir.display()
            );
            std::process::exit(1);
        }
        Err(e) => return Err(e.into()),
    };
    let report = rvm.recovery_report();
    println!(
        "recovery replayed {} transaction(s), discarded {} byte(s) of unfinished tail",
        report.transactions, report.discarded_bytes
    );
    let segment =
        if seg_path.exists() { rvm.open_segment(&seg_path)? } else { rvm.create_segment(&seg_path, 64 * 1024)? };
    let region = rvm.map(&segment, MapSpec::new(0, 64 * 1024))?;
    let base = region.addr();

    let read_u64 = |off: usize| {
        let mut b = [0u8; 8];
        // SAFETY: this program is single-threaded: nothing stores into the region while it is read.
        unsafe { region.read(off, &mut b) }.map(|_| u64::from_le_bytes(b)).unwrap_or(0)
    };
    let mut last = [0u8; 48];
    // SAFETY: this program is single-threaded: nothing stores into the region while it is read.
    unsafe { region.read(LAST, &mut last) };
    let text_end = last.iter().position(|&b| b == 0).unwrap_or(last.len());
    println!(
        "found {} completed run(s), {} committed update(s); last update: {:?}",
        read_u64(RUNS),
        read_u64(UPDATES),
        String::from_utf8_lossy(&last[..text_end])
    );

    for i in 0..1000u64 {
        let updates = read_u64(UPDATES) + 1;
        let mut text = [0u8; 48];
        let msg = format!("update {updates} (run {}, step {i})", read_u64(RUNS) + 1);
        text[..msg.len()].copy_from_slice(msg.as_bytes());
        let mut tx = rvm.begin(RestoreMode::Restore)?;
        // SAFETY: this program is the only user of the region, and one
        // thread does all of its transactions.
        unsafe {
            tx.modify_bytes(base + UPDATES, &updates.to_le_bytes())?;
            tx.modify_bytes(base + LAST, &text)?;
        }
        tx.commit(CommitMode::Flush)?;
    }
    let mut tx = rvm.begin(RestoreMode::Restore)?;
    // SAFETY: as above.
    unsafe { tx.modify_bytes(base + RUNS, &(read_u64(RUNS) + 1).to_le_bytes())? };
    tx.commit(CommitMode::Flush)?;

    let stats = rvm.stats();
    println!(
        "this run committed {} transactions with {} log sync(s); now {} run(s), {} update(s)",
        stats.committed,
        stats.log_syncs,
        read_u64(RUNS),
        read_u64(UPDATES)
    );
    println!("run it again (or kill it mid-run and run it again): the counts carry on from here");
    let counts = (read_u64(RUNS), read_u64(UPDATES));
    rvm.close()?;
    Ok(counts)
}

fn main() {
    // Errors are shown by their `Display` (what went wrong, and where), not `Debug`.
    let ran =
        folder::folder(std::env::args_os().nth(1), "rvm-quickstart").map_err(Into::into).and_then(|dir| run(&dir));
    if let Err(e) = ran {
        eprintln!("quickstart: error: {e}");
        std::process::exit(1);
    }
}
