//! A file's `fdatasync` makes its contents durable, not its name: after a
//! power cut, a new file whose folder was not synced may be gone, and with
//! it every commit in it (a log) or the bytes a log's dictionary names (a
//! segment). Each file the library creates or removes has its folder synced
//! before the call returns. Checked from the system calls (`strace`; the
//! test says it was skipped where `strace` cannot run).

use std::path::Path;
use std::process::Command;

/// The system calls `program args` makes (with `envs` set), one per line,
/// or `None` (saying why) where `strace` cannot run.
fn traced(program: &Path, args: &[&std::ffi::OsStr], envs: &[(&str, &Path)]) -> Option<Vec<String>> {
    let calls_traced = "trace=openat,fsync,fdatasync,mkdir,mkdirat,unlink,unlinkat,rename,renameat,renameat2";
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", calls_traced])
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: cannot run strace: {e}");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if text.contains("PTRACE") || text.contains("ptrace") || text.contains("Operation not permitted") {
            eprintln!("skipped: strace cannot trace here: {}", text.lines().next().unwrap_or(""));
            return None;
        }
        panic!("{} {args:?} failed under strace: {text}", program.display());
    }
    Some(calls(&text))
}

/// `rvmutl args`, traced.
fn traced_rvmutl(args: &[&std::ffi::OsStr]) -> Option<Vec<String>> {
    traced(Path::new(env!("CARGO_BIN_EXE_rvmutl")), args, &[])
}

/// The test `name` of this file run again as a child process with `env`
/// set to `value` (the child does the traced work), traced.
fn traced_child(name: &str, env: &str, value: &Path) -> Option<Vec<String>> {
    let me = std::env::current_exe().unwrap();
    traced(&me, &["--exact".as_ref(), name.as_ref(), "--test-threads=1".as_ref()], &[(env, value)])
}

/// `strace` output as one call per line, without the `[pid N] ` prefixes
/// of `-f`.
fn calls(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| match l.strip_prefix("[pid ") {
            Some(rest) => rest.split_once("] ").map_or(l, |(_, call)| call).to_owned(),
            None => l.to_owned(),
        })
        .collect()
}

/// Whether the trace opens `folder` and syncs that descriptor after the
/// call that created (or removed) `file`.
fn folder_synced_after(trace: &[String], file: &Path, op: &str) -> bool {
    let file = file.display().to_string();
    let folder = Path::new(&file).parent().unwrap().display().to_string();
    let Some(made) = trace.iter().position(|l| l.contains(op) && l.contains(&format!("\"{file}\""))) else {
        panic!("no {op} of {file} in:\n{}", trace.join("\n"));
    };
    trace[made..].iter().enumerate().any(|(i, l)| {
        let opened = l.starts_with("openat(") && l.contains(&format!("\"{folder}\"")) && l.contains("O_RDONLY");
        let fd = l.rsplit("= ").next().unwrap_or("").trim().to_owned();
        opened && trace[made + i..].iter().any(|m| m.starts_with(&format!("fsync({fd})")))
    })
}

#[test]
fn new_logs_and_segments_have_durable_names() {
    let dir = tempfile::tempdir().unwrap();
    let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
    let Some(trace) = traced_rvmutl(&["create-log".as_ref(), log.as_os_str(), "--size".as_ref(), "1M".as_ref()]) else {
        return;
    };
    assert!(folder_synced_after(&trace, &log, "O_CREAT"), "create-log: folder not synced:\n{}", trace.join("\n"));
    let trace = traced_rvmutl(&[
        "segment".as_ref(),
        "create".as_ref(),
        seg.as_os_str(),
        "--log".as_ref(),
        log.as_os_str(),
        "--region".as_ref(),
        "a:4096:4096:0x5d00_0000_0000".as_ref(),
    ])
    .unwrap();
    assert!(folder_synced_after(&trace, &seg, "O_CREAT"), "segment create: folder not synced:\n{}", trace.join("\n"));
}

#[test]
fn a_removed_segment_file_has_its_folder_synced() {
    use rvm::{create_log, Options, Rvm};
    // `rvmutl` has no delete command: this test, run again as a child
    // process under `strace`, deletes the segment.
    if let Some(folder) = std::env::var_os("RVM_DELETE_SEGMENT_CHILD") {
        let folder = Path::new(&folder);
        let rvm = Rvm::open(folder.join("log"), Options::default()).unwrap();
        let s = rvm.open_segment(folder.join("seg")).unwrap();
        rvm.delete_segment(s).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
    create_log(&log, 1 << 20).unwrap();
    {
        let rvm = Rvm::open(&log, Options::default()).unwrap();
        rvm.create_segment(&seg, 4096).unwrap();
    }
    let Some(trace) =
        traced_child("a_removed_segment_file_has_its_folder_synced", "RVM_DELETE_SEGMENT_CHILD", dir.path())
    else {
        return;
    };
    assert!(!seg.exists());
    assert!(folder_synced_after(&trace, &seg, "unlink"), "delete_segment: folder not synced:\n{}", trace.join("\n"));
}

/// `PHeap::open_or_create` on a folder that does not exist yet makes each
/// folder it creates durable (its parent synced), and the heap's files.
#[test]
fn a_new_heap_folder_has_a_durable_name() {
    if let Some(folder) = std::env::var_os("RVM_NEW_HEAP_CHILD") {
        let config = rvm::collections::Config { heap_len: 1 << 20, log_len: 1 << 20, ..Default::default() };
        rvm::collections::PHeap::open_or_create(folder, config).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("a").join("b");
    let Some(trace) = traced_child("a_new_heap_folder_has_a_durable_name", "RVM_NEW_HEAP_CHILD", &folder) else {
        return;
    };
    let text = trace.join("\n");
    for made in [dir.path().join("a"), folder.clone()] {
        assert!(folder_synced_after(&trace, &made, "mkdir"), "{}: parent not synced:\n{text}", made.display());
    }
    for file in [rvm::collections::LOG_FILE, "heap.seg.creating"] {
        assert!(folder_synced_after(&trace, &folder.join(file), "O_CREAT"), "{file}: folder not synced:\n{text}");
    }
}
