//! A careless or hostile caller of the safe API: forked children, handles
//! outliving their owners, foreign signal handlers, re-entrant calls.

use rvm::{CommitMode, Error, MapSpec, Options, RestoreMode, Rvm};
use std::path::Path;

const PAGE: usize = 4096;

mod common;
use common::{read, setup};

/// Runs `child` in a forked child and returns its exit code (the child
/// leaves with `_exit`, running no destructors nor atexit handlers).
fn in_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `child` and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(99);
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// Every file under `dir`, with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

fn forked(e: &Error) -> bool {
    matches!(e, Error::ForkedChild { .. })
}

/// A child made with `fork` inherits the instance (its descriptors, locks
/// and a copy of its memory, but none of its threads): every call that
/// would write the parent's log or segments is refused, dropping the
/// child's handles writes nothing, and the parent goes on undisturbed.
#[test]
fn a_forked_child_cannot_commit_flush_or_write_into_the_parents_files() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), 4 * PAGE as u64).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: this thread alone uses the region.
    unsafe { tx.modify_bytes(r.addr(), b"parent").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    // A no-flush commit pending at the fork: the child must not write it.
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: as above.
    unsafe { tx.modify_bytes(r.addr() + 8, b"pending").unwrap() };
    tx.commit(CommitMode::NoFlush).unwrap();
    let before = snapshot(dir.path());
    let code = in_child(|| {
        let mut bad = Vec::new();
        let mut expect = |what: &str, r: rvm::Result<()>| match r {
            Err(e) if forked(&e) => {}
            other => bad.push(format!("{what}: {other:?}")),
        };
        expect("begin", rvm.begin(RestoreMode::Restore).map(drop));
        expect("begin_tracked", rvm.begin_tracked(RestoreMode::Restore).map(drop));
        expect("flush", rvm.flush());
        expect("checkpoint", rvm.checkpoint().map(drop));
        expect("checkpoint_start", rvm.checkpoint_start().map(drop));
        expect("truncate", rvm.truncate());
        expect("create_segment", rvm.create_segment(dir.path().join("child"), PAGE as u64).map(drop));
        expect("open_segment", rvm.open_segment(dir.path().join("seg")).map(drop));
        expect("map", rvm.map(&seg, MapSpec::new(PAGE as u64, PAGE)).map(drop));
        expect("extend_segment", rvm.extend_segment(&seg, 8 * PAGE as u64));
        expect("grow_region", rvm.grow_region(&r, 2 * PAGE));
        expect("track", rvm.track(&r));
        expect("unmap", rvm.unmap(r.clone()));
        expect("close_segment", rvm.close_segment(seg.clone()));
        expect("delete_segment", rvm.delete_segment(seg.clone()));
        expect("wait_for_recovery", rvm.wait_for_recovery());
        expect("close", rvm.clone().close());
        // Dropping every handle (the last one flushes in the parent).
        drop((r.clone(), seg.clone(), rvm.clone()));
        if bad.is_empty() {
            0
        } else {
            eprintln!("not refused in the child: {bad:#?}");
            1
        }
    });
    assert_eq!(code, 0, "the child's calls were refused");
    assert!(before == snapshot(dir.path()), "the child changed the parent's files");
    // The parent goes on: its pending commit and a new one are durable.
    let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    // SAFETY: as above.
    unsafe { tx.modify_bytes(r.addr() + 16, b"after").unwrap() };
    tx.commit(CommitMode::Flush).unwrap();
    drop((r, seg, rvm));
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    assert_eq!(read(&r, 0, 21), b"parent\0\0pending\0after");
    assert!(!dir.path().join("child").exists());
}

/// Whether the typed layer's error is the core's `ForkedChild`, through
/// whichever layers wrap it (heap, loader).
fn core_forked(e: &rvm::collections::Error) -> bool {
    format!("{e:?}").contains("ForkedChild {")
}

/// The typed heap in a forked child: writes, flushes and a close are
/// refused, a second open of the folder is refused (the child shares the
/// parent's locks), dropping the heap writes nothing, and reads of the
/// child's copy of the memory still work.
#[test]
fn a_forked_child_cannot_write_the_parents_typed_heap() {
    use rvm::collections::{Config, PHeap, PVec};
    let dir = tempfile::tempdir().unwrap();
    let config = Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() };
    let heap = PHeap::open_or_create(dir.path(), config.clone()).unwrap();
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.extend(0..10)).unwrap();
    heap.write_no_flush(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(10)).unwrap();
    let before = snapshot(dir.path());
    let code = in_child(|| {
        let mut bad = Vec::new();
        let push = |tx: &mut rvm::collections::WriteTx<'_>| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(99);
        match heap.write(push) {
            Err(e) if core_forked(&e) => {}
            other => bad.push(format!("write: {other:?}")),
        }
        match heap.write_no_flush(push) {
            Err(e) if core_forked(&e) => {}
            other => bad.push(format!("write_no_flush: {other:?}")),
        }
        match heap.flush() {
            Err(e) if core_forked(&e) => {}
            other => bad.push(format!("flush: {other:?}")),
        }
        match PHeap::open_or_create(dir.path(), config.clone()) {
            Err(_) => {}
            Ok(_) => bad.push("a second open in the child".into()),
        }
        let seen = heap.read(|r| r.root::<PVec<u64>>("v").unwrap().map(|v| v.to_vec()));
        if seen != Some((0..11).collect()) {
            bad.push(format!("read: {seen:?}"));
        }
        // SAFETY: the child's copy of `heap` is never used again (the
        // child leaves with _exit); the parent's is untouched.
        let mine = unsafe { std::ptr::read(&heap) };
        // The close fails, dropping every part of the heap on the way.
        match mine.close() {
            Err(e) if core_forked(&e) => {}
            other => bad.push(format!("close: {other:?}")),
        }
        if bad.is_empty() {
            0
        } else {
            eprintln!("not refused in the child: {bad:#?}");
            1
        }
    });
    assert_eq!(code, 0, "the child's calls were refused");
    assert!(before == snapshot(dir.path()), "the child changed the parent's files");
    heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(11)).unwrap();
    heap.close().unwrap();
    let heap = PHeap::open_or_create(dir.path(), config).unwrap();
    let v = heap.read(|r| r.root::<PVec<u64>>("v").unwrap().unwrap().to_vec());
    assert_eq!(v, (0..12).collect::<Vec<u64>>());
}

/// The write end of the pipe a user's fault handler reports to (one byte a
/// run), in a child process.
static HANDLER_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// A crash reporter's handler: reports and returns, relying on
/// `SA_RESETHAND` (or a handler before it) for the default action.
extern "C" fn reporter(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let fd = HANDLER_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: write(2) of one static byte is async-signal-safe.
    unsafe { libc::write(fd, b"H".as_ptr().cast(), 1) };
}

/// A reporter that puts the default action back itself before returning.
extern "C" fn resetting_reporter(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    reporter(sig, info, ctx);
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
}

fn install_reporter(f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void), flags: libc::c_int) {
    // SAFETY: a zeroed sigaction is valid; every field used is set.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = f as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | flags;
    // SAFETY: valid sigaction values; `f` has the SA_SIGINFO signature.
    let rc = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut())
    };
    assert_eq!(rc, 0);
}

/// When a user's fault handler goes in, relative to the instance's.
#[derive(Clone, Copy, Debug)]
enum Reporter {
    None,
    Before(extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void), libc::c_int),
    After(extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void), libc::c_int),
}

/// Runs in a forked child: an instance with a tracked region (so the
/// library's `SIGSEGV` handler is in place) and a tracked transaction
/// open, the user's handler per `how`, then a genuine bad load in user
/// code. Returns how the child ended (`Some(signal)` if killed by one,
/// `None` if it hung and was killed after the deadline) and how many times
/// the user's handler ran.
fn fault_in_child(how: Reporter) -> (Option<i32>, usize) {
    fault_in_child_with(how, false)
}

/// Recurses until the stack overflows (a genuine bug of user code).
fn overflow(depth: u64) -> u64 {
    let pad = std::hint::black_box([depth; 64]);
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    overflow(depth + 1) + pad[(depth % 64) as usize]
}

/// [`fault_in_child`], the bug being a stack overflow if `overflow`.
fn fault_in_child_with(how: Reporter, stack_overflow: bool) -> (Option<i32>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child does its work and dies or leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        HANDLER_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
        if let Reporter::Before(f, flags) = how {
            install_reporter(f, flags);
        }
        let rvm = setup(dir.path());
        let seg = rvm.create_segment(dir.path().join("seg"), PAGE as u64).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
        rvm.track(&r).unwrap();
        let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
        // SAFETY: the tracked transaction is this thread's.
        unsafe { *(r.addr() as *mut u64) = 7 };
        if let Reporter::After(f, flags) = how {
            install_reporter(f, flags);
        }
        if stack_overflow {
            std::hint::black_box(overflow(0));
        }
        // A genuine bug: a load from an unmapped address near null.
        // SAFETY: not safe at all: this is the fault under test.
        let v = unsafe { std::ptr::read_volatile(std::hint::black_box(8usize) as *const u64) };
        drop(tx);
        // SAFETY: not reached unless the load succeeded.
        unsafe { libc::_exit(if v == 0 { 3 } else { 4 }) };
    }
    // SAFETY: closes the parent's copy of the write end.
    unsafe { libc::close(fds[1]) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut status = 0;
    let end = loop {
        // SAFETY: polls the child just made.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            break if libc::WIFSIGNALED(status) {
                Some(libc::WTERMSIG(status))
            } else {
                Some(-libc::WEXITSTATUS(status))
            };
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut runs = 0;
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reads into `buf`; the write end is closed in both processes.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        runs += n as usize;
    }
    // SAFETY: closes our read end.
    unsafe { libc::close(fds[0]) };
    (end, runs)
}

/// A genuine bad load in user code while the library's fault handler is
/// installed kills the process with `SIGSEGV`, once, whatever handler the
/// program installed before or after the instance's: none, one that puts
/// the default action back itself, or a crash reporter that relies on
/// `SA_RESETHAND` and returns (which must run once, not loop).
#[test]
fn a_genuine_fault_in_user_code_still_kills_the_process_once() {
    let cases = [
        (Reporter::None, 0),
        (Reporter::Before(resetting_reporter, 0), 1),
        (Reporter::Before(reporter, libc::SA_RESETHAND), 1),
        (Reporter::Before(reporter, libc::SA_RESETHAND | libc::SA_ONSTACK), 1),
        (Reporter::Before(reporter, libc::SA_RESETHAND | libc::SA_NODEFER), 1),
        (Reporter::After(resetting_reporter, 0), 1),
        (Reporter::After(reporter, libc::SA_RESETHAND), 1),
    ];
    for (how, runs) in cases {
        let got = fault_in_child(how);
        assert_eq!(got, (Some(libc::SIGSEGV), runs), "{how:?}: (how the child ended, reporter runs)");
    }
    // A stack overflow still reaches Rust's own handler (installed before
    // ours), which reports it and aborts.
    assert_eq!(fault_in_child_with(Reporter::None, true), (Some(libc::SIGABRT), 0), "stack overflow");
}

/// One thread unmaps and maps again the region another thread runs
/// transactions in (finding it by address each time), a third closes and
/// reopens a second segment and checkpoints: every call either works or
/// is a typed error (`Busy`, `RangeNotMapped`, `SegmentInUse`, ...), no
/// store lands in unmapped memory, and what was committed is there after
/// a reopen. (Run under ThreadSanitizer too: README.)
#[test]
fn unmapping_closing_and_checkpointing_under_running_transactions() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), 4 * PAGE as u64).unwrap();
    let other = rvm.create_segment(dir.path().join("other"), PAGE as u64).unwrap();
    drop(other);
    // The region the writer means (it takes a clone to work with; none
    // while the unmapper has taken it out).
    let current = Mutex::new(Some(rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap()));
    let stop = AtomicBool::new(false);
    let last = AtomicU64::new(0);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let Some(region) = current.lock().unwrap().clone() else { continue };
                let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
                // SAFETY: this thread alone stores into the region; a range
                // of a region unmapped meanwhile is refused before any store
                // (the handle keeps its memory mapped).
                match unsafe { tx.modify_bytes(region.addr(), &(n + 1).to_le_bytes()) } {
                    Ok(()) => {
                        tx.commit(CommitMode::NoFlush).unwrap();
                        n += 1;
                        last.store(n, Ordering::Release);
                    }
                    Err(Error::Tx(rvm::TxError::RangeNotMapped { .. })) => {}
                    Err(e) => panic!("writer: {e}"),
                }
            }
            n
        });
        s.spawn(|| {
            for _ in 0..300 {
                let r = current.lock().unwrap().take().unwrap();
                match rvm.unmap(r.clone()) {
                    Ok(()) => {
                        drop(r);
                        // The range counts as mapped until the writer drops
                        // its clone of the old handle (documented on unmap).
                        let r = loop {
                            match rvm.map(&seg, MapSpec::new(0, PAGE)) {
                                Ok(r) => break r,
                                Err(Error::Map(rvm::MapError::AlreadyMapped { .. })) => std::thread::yield_now(),
                                Err(e) => panic!("map again: {e}"),
                            }
                        };
                        *current.lock().unwrap() = Some(r);
                    }
                    Err(Error::Map(rvm::MapError::Busy { .. })) => {
                        *current.lock().unwrap() = Some(r);
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("unmapper: {e}"),
                }
            }
        });
        s.spawn(|| {
            for i in 0..100 {
                let other = rvm.open_segment(dir.path().join("other")).unwrap();
                if i % 2 == 0 {
                    let r = rvm.map(&other, MapSpec::new(0, PAGE)).unwrap();
                    assert!(matches!(
                        rvm.close_segment(other.clone()),
                        Err(Error::Map(rvm::MapError::SegmentInUse { .. }))
                    ));
                    rvm.unmap(r).unwrap();
                }
                rvm.close_segment(other).unwrap();
                if i % 10 == 0 {
                    rvm.checkpoint().unwrap();
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        while last.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        stop.store(true, Ordering::Release);
        assert!(writer.join().unwrap() > 0);
    });
    rvm.flush().unwrap();
    let n = last.load(Ordering::Acquire);
    let r = current.into_inner().unwrap().unwrap();
    assert_eq!(read(&r, 0, 8), n.to_le_bytes());
    drop((r, seg, rvm));
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    assert_eq!(read(&r, 0, 8), n.to_le_bytes());
}

/// Instant recovery (pages brought up to date on first touch, a background
/// thread applying the rest) and forks in the middle: a child's first
/// touch of a page still pending must not wait for the background thread
/// (which did not survive the fork; it may have held the page being
/// applied at the fork), and shows the recovered bytes.
#[test]
fn a_child_forked_during_instant_recovery_reads_every_page_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let pages = 2048;
    let byte = |p: usize, k: usize| ((p * 7 + k) % 251) as u8 + 1;
    let opts = || Options { instant_recovery: true, truncate_threshold: None, ..Options::default() };
    rvm::create_log(dir.path().join("log"), 64 << 20).unwrap();
    {
        let rvm = Rvm::open(dir.path().join("log"), opts()).unwrap();
        let seg = rvm.create_segment(dir.path().join("seg"), (pages * PAGE) as u64).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, pages * PAGE)).unwrap();
        for k in 0..8 {
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            for p in 0..pages {
                // SAFETY: this thread alone uses the region.
                unsafe { tx.modify_bytes(r.addr() + p * PAGE + k * 64, &[byte(p, k); 48]).unwrap() };
            }
            tx.commit(CommitMode::NoFlush).unwrap();
        }
        rvm.flush().unwrap();
    }
    let mut forked_while_recovering = 0;
    for _ in 0..20 {
        let rvm = Rvm::open(dir.path().join("log"), opts()).unwrap();
        let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, pages * PAGE)).unwrap();
        let addr = r.addr();
        let recovering = rvm.query().recovering;
        // SAFETY: the child reads its copy of the region and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut ok = true;
            for p in (0..pages).rev() {
                for k in 0..8 {
                    // SAFETY: a read of the child's own copy of the region.
                    let b = unsafe { std::ptr::read_volatile((addr + p * PAGE + k * 64) as *const u8) };
                    ok &= b == byte(p, k);
                }
            }
            // SAFETY: leaving the child.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut status = 0;
        loop {
            // SAFETY: polls our child.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                break;
            }
            if std::time::Instant::now() > deadline {
                // SAFETY: kills and reaps our child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                panic!("a child forked during instant recovery (recovering: {recovering}) hung reading its pages");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
        forked_while_recovering += recovering as u32;
        rvm.wait_for_recovery().unwrap();
        assert_eq!(read(&r, 5 * PAGE + 64, 1), [byte(5, 1)]);
    }
    eprintln!("forked while recovering: {forked_while_recovering} of 20");
}

/// A recovery-progress hook that opens the log it is recovering (refused:
/// `Locked`) or panics in the middle of the replay: the panic leaves the
/// open, nothing stays locked, and the next open recovers everything.
#[test]
fn a_progress_hook_that_reopens_or_panics_leaves_a_recoverable_log() {
    use rvm::{ProgressHook, RecoveryPhase};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    {
        let rvm = setup(dir.path());
        let seg = rvm.create_segment(dir.path().join("seg"), 64 * PAGE as u64).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 64 * PAGE)).unwrap();
        for i in 0..64 {
            let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: this thread alone uses the region.
            unsafe { tx.modify_bytes(r.addr() + i * PAGE, &[i as u8 + 1; 512]).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
        }
        rvm.flush().unwrap();
    }
    let inner: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = inner.clone();
    let again = log.clone();
    let hook = ProgressHook::new(move |p| {
        if p.phase == RecoveryPhase::Replay {
            let r = Rvm::open(&again, Options::default()).map(drop);
            seen.lock().unwrap().push(format!("{r:?}"));
            panic!("a hook that panics");
        }
    });
    let opts = Options { recovery_progress: Some(hook), ..Options::default() };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Rvm::open(&log, opts).map(drop)));
    assert!(r.is_err(), "the hook's panic leaves the open");
    let seen = inner.lock().unwrap().clone();
    assert!(!seen.is_empty() && seen.iter().all(|s| s.contains("Locked")), "{seen:?}");
    let rvm = Rvm::open(&log, Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 64 * PAGE)).unwrap();
    for i in 0..64 {
        assert_eq!(read(&r, i * PAGE, 512), vec![i as u8 + 1; 512], "page {i}");
    }
}

/// A transaction kept in a thread-local and never ended: the thread's exit
/// drops it among the thread's other locals, in an order the program does
/// not choose (here after the library's own per-thread state is gone). It
/// aborts like any dropped transaction instead of panicking in a
/// thread-local destructor, which aborts the process. Same for a heap
/// transaction.
#[test]
fn a_transaction_dropped_at_thread_exit_after_the_librarys_locals_aborts_cleanly() {
    use std::cell::RefCell;
    thread_local! {
        static KEPT: RefCell<Option<rvm::Transaction<'static>>> = const { RefCell::new(None) };
        static KEPT_HEAP: RefCell<Option<rvm::heap::HeapTx<'static>>> = const { RefCell::new(None) };
    }
    let dir = tempfile::tempdir().unwrap();
    // In a child: a panic in a thread-local destructor aborts the process.
    let code = in_child(|| {
        let rvm: &'static Rvm = Box::leak(Box::new(setup(dir.path())));
        let seg = rvm.create_segment(dir.path().join("seg"), 64 * PAGE as u64).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
        let statics = rvm.map(&seg, MapSpec::new(PAGE as u64, PAGE)).unwrap();
        let heap_region = rvm.map(&seg, MapSpec::new(2 * PAGE as u64, 62 * PAGE)).unwrap();
        let heap: &'static rvm::heap::Heap =
            Box::leak(Box::new(rvm::heap::Heap::format(rvm, statics, heap_region).unwrap()));
        let addr = r.addr();
        let core = std::thread::spawn(move || {
            // Registered first, so destroyed after the library's locals,
            // which the begin call below touches first.
            KEPT.with(|k| drop(k.borrow()));
            let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
            // SAFETY: this thread alone uses the region.
            unsafe { tx.modify_bytes(addr, b"never committed").unwrap() };
            KEPT.with(|k| *k.borrow_mut() = Some(tx));
        })
        .join();
        let heaps = std::thread::spawn(move || {
            // As above.
            KEPT_HEAP.with(|k| drop(k.borrow()));
            let mut htx = heap.begin(RestoreMode::Restore).unwrap();
            htx.malloc(std::alloc::Layout::new::<u64>()).unwrap();
            KEPT_HEAP.with(|k| *k.borrow_mut() = Some(htx));
        })
        .join();
        if core.is_err() || heaps.is_err() {
            return 1;
        }
        // Aborted: the bytes are back, the region is free, the heap clean.
        if read(&r, 0, 15) != [0; 15] || r.active_transactions() != 0 {
            return 2;
        }
        if heap.check().map(|c| c.allocated).ok() != Some(0) {
            return 3;
        }
        0
    });
    assert_eq!(code, 0, "the child's thread exited cleanly and its transactions aborted");
}

/// A segment handle kept after `close_segment` or `delete_segment`:
/// growing it is refused (`SegmentClosed`) and the file is untouched. It
/// used to extend (and sync) a file the instance no longer had open.
#[test]
fn a_segment_handle_kept_after_close_or_delete_cannot_grow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let closed = |r: rvm::Result<()>| matches!(r, Err(Error::Map(rvm::MapError::SegmentClosed { .. })));
    let path = dir.path().join("seg");
    let seg = rvm.create_segment(&path, PAGE as u64).unwrap();
    rvm.close_segment(seg.clone()).unwrap();
    assert!(closed(rvm.extend_segment(&seg, 4 * PAGE as u64)));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), PAGE as u64);
    assert!(matches!(rvm.map(&seg, MapSpec::new(0, PAGE)), Err(Error::Map(rvm::MapError::SegmentClosed { .. }))));
    drop(seg);
    let seg = rvm.open_segment(&path).unwrap();
    rvm.extend_segment(&seg, 2 * PAGE as u64).unwrap();
    let kept = seg.clone();
    rvm.delete_segment(seg).unwrap();
    assert!(closed(rvm.extend_segment(&kept, 4 * PAGE as u64)));
    assert!(!path.exists());
}

/// Runs `f` on a thread; fails if it does not end within 20 s.
fn within_deadline<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a deadlock: no end after 20 s") {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Instance-wide calls made by the thread that has a transaction open
/// (ranges declared, not committed): each returns (done or a typed error)
/// instead of waiting for the transaction its own thread holds, and the
/// transaction then commits.
#[test]
fn instance_calls_from_inside_an_open_transaction_do_not_wait_for_it() {
    let said = within_deadline(|| {
        let dir = tempfile::tempdir().unwrap();
        let rvm = setup(dir.path());
        let seg = rvm.create_segment(dir.path().join("seg"), 8 * PAGE as u64).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, PAGE).reserve(4 * PAGE)).unwrap();
        let other = rvm.create_segment(dir.path().join("other"), PAGE as u64).unwrap();
        let o = rvm.map(&other, MapSpec::new(0, PAGE)).unwrap();
        for i in 0..50u8 {
            let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
            // SAFETY: this thread alone uses the regions.
            unsafe { tx.modify_bytes(o.addr() + i as usize, &[i]).unwrap() };
            tx.commit(CommitMode::NoFlush).unwrap();
        }
        let mut said = Vec::new();
        let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
        // SAFETY: as above.
        unsafe { tx.modify_bytes(r.addr(), b"open").unwrap() };
        said.push(format!("flush {:?}", rvm.flush()));
        said.push(format!("checkpoint {:?}", rvm.checkpoint().map(drop)));
        said.push(format!("truncate {:?}", rvm.truncate()));
        said.push(format!("checkpoint_start {:?}", rvm.checkpoint_start()));
        said.push(format!("checkpoint_step {:?}", rvm.checkpoint_step(1)));
        said.push(format!("checkpoint_finish {:?}", rvm.checkpoint_finish().map(|r| r.is_some())));
        said.push(format!("extend_segment {:?}", rvm.extend_segment(&seg, 8 * PAGE as u64)));
        said.push(format!("grow_region {:?}", rvm.grow_region(&r, 2 * PAGE)));
        said.push(format!("unmap other {:?}", rvm.unmap(o)));
        said.push(format!("close other {:?}", rvm.close_segment(other)));
        said.push(format!("unmap busy {:?}", rvm.unmap(r.clone())));
        said.push(format!("track busy {:?}", rvm.track(&r)));
        tx.commit(CommitMode::Flush).unwrap();
        assert_eq!(read(&r, 0, 4), b"open");
        said
    });
    for line in &said {
        assert!(!line.contains("Poisoned"), "{said:#?}");
    }
    assert!(said.iter().any(|l| l.starts_with("unmap busy Err(Map(Busy")), "{said:#?}");
}

/// Options at and past their limits (a threshold that is no fraction, a
/// zero bound, a checkpoint pace of one byte a second, no room for
/// pending commits or barrier copies): an open, commits that fill the log
/// several times over, an explicit checkpoint hurried by a truncation
/// work within seconds, and the last commit is there after a reopen.
#[test]
fn options_at_their_limits_never_hang_or_panic() {
    let cases: Vec<(&str, Options)> = vec![
        ("threshold NaN", Options { truncate_threshold: Some(f64::NAN), ..Options::default() }),
        ("threshold -1", Options { truncate_threshold: Some(-1.0), ..Options::default() }),
        ("threshold 0", Options { truncate_threshold: Some(0.0), ..Options::default() }),
        ("threshold inf", Options { truncate_threshold: Some(f64::INFINITY), ..Options::default() }),
        ("threshold 2", Options { truncate_threshold: Some(2.0), ..Options::default() }),
        ("unapplied 0", Options { max_unapplied_log: Some(0), ..Options::default() }),
        ("unapplied 1", Options { max_unapplied_log: Some(1), ..Options::default() }),
        ("unapplied max", Options { max_unapplied_log: Some(u64::MAX), ..Options::default() }),
        ("rate 1", Options { checkpoint_rate: Some(1), ..Options::default() }),
        ("rate 0", Options { checkpoint_rate: Some(0), ..Options::default() }),
        ("pending 0", Options { pending_limit: 0, ..Options::default() }),
        ("pending max", Options { pending_limit: usize::MAX, ..Options::default() }),
        ("copies 0", Options { checkpoint_copy_limit: 0, ..Options::default() }),
        ("replay reclaim", Options { reclaim: rvm::Reclaim::Replay, max_unapplied_log: Some(1), ..Options::default() }),
    ];
    for (what, opts) in cases {
        let last = within_deadline(move || {
            let dir = tempfile::tempdir().unwrap();
            rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
            let rvm = Rvm::open(dir.path().join("log"), opts.clone()).unwrap();
            let seg = rvm.create_segment(dir.path().join("seg"), 64 * PAGE as u64).unwrap();
            let r = rvm.map(&seg, MapSpec::new(0, 64 * PAGE)).unwrap();
            let mut last = 0u64;
            for i in 0..600u64 {
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                // SAFETY: this thread alone uses the region.
                unsafe {
                    tx.modify_bytes(r.addr() + (i as usize % 64) * PAGE, &[i as u8; 4000]).unwrap();
                    tx.modify_bytes(r.addr() + 8, &i.to_le_bytes()).unwrap();
                }
                tx.commit(if i % 7 == 0 { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
                last = i;
                if i == 300 {
                    // An explicit checkpoint keeps the configured pace (at
                    // one byte a second it would take hours) until
                    // something waits for it: here a truncation.
                    // The truncation is repeated until the checkpoint has
                    // ended: on a busy machine the checkpoint may start
                    // only after a first truncation returned.
                    std::thread::scope(|s| {
                        let c = s.spawn(|| rvm.checkpoint().map(drop));
                        while !c.is_finished() {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            rvm.truncate().unwrap();
                        }
                        c.join().unwrap().unwrap();
                    });
                }
            }
            rvm.truncate().unwrap();
            drop((r, seg, rvm));
            let rvm = Rvm::open(dir.path().join("log"), opts).unwrap();
            let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
            let r = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
            (u64::from_le_bytes(read(&r, 8, 8).try_into().unwrap()), last)
        });
        assert_eq!(last.0, last.1, "{what}");
    }
}

/// The action a chaining reporter replaced.
static CHAINED: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();

/// A crash reporter done right: it passes every fault to the action it
/// replaced (and would report only if that returned for a fault of its own).
extern "C" fn chaining_reporter(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = CHAINED.get().expect("installed");
    // SAFETY: the action the library installed is an SA_SIGINFO handler.
    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
        unsafe { std::mem::transmute(prev.sa_sigaction) };
    f(sig, info, ctx);
}

/// A crash reporter installed after the first tracked region, chaining to
/// the action it replaced: tracked transactions go on working (their
/// stores fault into the library's handler through it), and commit.
#[test]
fn tracked_transactions_work_under_a_chaining_handler_installed_later() {
    let dir = tempfile::tempdir().unwrap();
    let code = in_child(|| {
        let rvm = setup(dir.path());
        let seg = rvm.create_segment(dir.path().join("seg"), 4 * PAGE as u64).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 4 * PAGE)).unwrap();
        rvm.track(&r).unwrap();
        // SAFETY: a zeroed sigaction is valid; every field used is set.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = chaining_reporter as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid sigaction values; the handler has the SA_SIGINFO
        // signature.
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSEGV, &sa, &mut old) != 0 {
                return 1;
            }
        }
        let _ = CHAINED.set(old);
        for i in 0..4 {
            let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
            // SAFETY: the tracked transaction is this thread's.
            unsafe { std::ptr::write_volatile((r.addr() + i * PAGE) as *mut u64, 7 + i as u64) };
            tx.commit(CommitMode::Flush).unwrap();
        }
        drop((r, seg, rvm));
        let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
        let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 4 * PAGE)).unwrap();
        let ok = (0..4).all(|i| read(&r, i * PAGE, 8) == (7 + i as u64).to_le_bytes());
        if ok {
            0
        } else {
            2
        }
    });
    assert_eq!(code, 0);
}

/// A child forked while the parent's instance runs its threads (the
/// write-behind log writer, the background truncator) drops the last
/// handle it has: no join of a thread that does not exist in it, no hang;
/// the parent goes on and loses nothing.
#[test]
fn a_forked_child_drops_an_instance_whose_threads_stayed_with_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 4 << 20).unwrap();
    let opts = Options { pending_limit: 4096, truncate_threshold: Some(0.0), ..Options::default() };
    let rvm = Rvm::open(dir.path().join("log"), opts).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 16 * PAGE as u64).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 16 * PAGE)).unwrap();
    let commit = |i: u64| {
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: this thread alone uses the region.
        unsafe {
            tx.modify_bytes(r.addr() + (i as usize % 16) * PAGE + 64, &[i as u8; 2000]).unwrap();
            tx.modify_bytes(r.addr(), &i.to_le_bytes()).unwrap();
        }
        tx.commit(CommitMode::NoFlush).unwrap();
    };
    for i in 1..=200 {
        commit(i);
    }
    let (kept_r, kept_seg, kept_rvm) = (r.clone(), seg.clone(), rvm.clone());
    let originals =
        (&r as *const rvm::Region as usize, &seg as *const rvm::Segment as usize, &rvm as *const Rvm as usize);
    let code = within_deadline(move || {
        in_child(move || {
            // Every handle in the child's memory goes: the kept clones, then
            // the child's copies of the originals, the last of them running
            // the instance's shutdown.
            drop((kept_r, kept_seg, kept_rvm));
            // SAFETY: bitwise copies of the child's copies of the handles,
            // which nothing in the child uses again (it leaves with _exit);
            // the parent's are untouched.
            unsafe {
                drop(std::ptr::read(originals.0 as *const rvm::Region));
                drop(std::ptr::read(originals.1 as *const rvm::Segment));
                drop(std::ptr::read(originals.2 as *const Rvm));
            }
            0
        })
    });
    assert_eq!(code, 0);
    for i in 201..=400 {
        commit(i);
    }
    rvm.flush().unwrap();
    drop((r, seg, rvm));
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, PAGE)).unwrap();
    assert_eq!(read(&r, 0, 8), 400u64.to_le_bytes());
}

/// A panic in the middle of a tracked transaction (pages twinned, stores
/// made): unwinding aborts it (restore mode puts every page back), its
/// writer hold goes, and the next tracked transaction, on another thread,
/// begins, commits, and is all a reopen shows.
#[test]
fn a_panic_inside_a_tracked_transaction_rolls_it_back_and_frees_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let rvm = setup(dir.path());
    let seg = rvm.create_segment(dir.path().join("seg"), 8 * PAGE as u64).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 8 * PAGE)).unwrap();
    rvm.track(&r).unwrap();
    let addr = r.addr();
    let store = |i: usize, v: u64| {
        // SAFETY: inside the region; the calling thread holds the tracked
        // transaction.
        unsafe { std::ptr::write_volatile((addr + i * PAGE) as *mut u64, v) }
    };
    let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
    store(0, 1);
    tx.commit(CommitMode::Flush).unwrap();
    for round in 0..3u64 {
        let panicked = std::thread::scope(|s| {
            s.spawn(|| {
                let _tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
                for i in 0..8 {
                    store(i, 100 + round);
                }
                panic!("a bug in the middle of a tracked transaction");
            })
            .join()
            .is_err()
        });
        assert!(panicked);
        assert_eq!(read(&r, 0, 8), 1u64.to_le_bytes(), "round {round}: rolled back");
        assert_eq!(read(&r, 7 * PAGE, 8), [0; 8], "round {round}: rolled back");
        within_deadline({
            let rvm = rvm.clone();
            move || {
                let tx = rvm.begin_tracked(RestoreMode::Restore).unwrap();
                // SAFETY: as above (this thread holds the transaction).
                unsafe { std::ptr::write_volatile((addr + PAGE) as *mut u64, 2 + round) };
                tx.commit(CommitMode::Flush).unwrap();
            }
        });
    }
    drop((r, seg, rvm));
    let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    let seg = rvm.open_segment(dir.path().join("seg")).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 8 * PAGE)).unwrap();
    assert_eq!(read(&r, 0, 8), 1u64.to_le_bytes());
    assert_eq!(read(&r, PAGE, 8), 4u64.to_le_bytes());
    assert_eq!(read(&r, 7 * PAGE, 8), [0; 8]);
}

/// Runs `child` in a forked child; its exit code, or `None` if it had not
/// ended after `secs` seconds (it is killed then).
fn in_child_within(secs: u64, child: impl FnOnce() -> i32) -> Option<i32> {
    // SAFETY: the child runs `child` and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(99);
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut status = 0;
    loop {
        // SAFETY: polls our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A fork while another thread of the parent is inside a write of the
/// typed heap (it holds the heap's writer lock, and will never release it
/// in the child): the child's write is refused (`ForkedChild`) at once
/// instead of waiting forever for that lock.
#[test]
fn a_child_forked_during_a_typed_write_is_refused_not_deadlocked() {
    use rvm::collections::{Config, PHeap, PVec};
    let dir = tempfile::tempdir().unwrap();
    let config = Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() };
    let heap = PHeap::open_or_create(dir.path(), config).unwrap();
    let (inside_tx, inside_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let heap = &heap;
        s.spawn(move || {
            heap.write(|tx| {
                tx.root_or_insert_with("v", PVec::<u64>::new)?.push(1)?;
                inside_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok::<_, rvm::collections::Error>(())
            })
            .unwrap();
        });
        inside_rx.recv().unwrap();
        let code =
            in_child_within(10, || match heap.write(|tx| tx.root_or_insert_with("v", PVec::<u64>::new)?.push(2)) {
                Err(e) if core_forked(&e) => 0,
                other => {
                    eprintln!("child write: {other:?}");
                    1
                }
            });
        go_tx.send(()).unwrap();
        assert_eq!(code, Some(0), "the child's write is refused at once (None: it hung)");
    });
    assert_eq!(heap.read(|r| r.root::<PVec<u64>>("v").unwrap().unwrap().to_vec()), vec![1]);
}

/// A segment closed while another thread's truncations run opens again at
/// once: a truncation holds only the segments its records name (it held
/// every open segment until it ended, so an immediate reopen of one just
/// closed was `Locked` now and then).
#[test]
fn a_closed_segment_opens_again_at_once_while_truncations_run() {
    let dir = tempfile::tempdir().unwrap();
    rvm::create_log(dir.path().join("log"), 1 << 20).unwrap();
    let opts = Options { truncate_threshold: None, ..Options::default() };
    let rvm = Rvm::open(dir.path().join("log"), opts).unwrap();
    let seg = rvm.create_segment(dir.path().join("seg"), 64 * PAGE as u64).unwrap();
    let r = rvm.map(&seg, MapSpec::new(0, 64 * PAGE)).unwrap();
    drop(rvm.create_segment(dir.path().join("other"), PAGE as u64).unwrap());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                // SAFETY: this thread alone stores into the region.
                unsafe { tx.modify_bytes(r.addr() + (i % 64) * PAGE, &[i as u8; 2048]).unwrap() };
                tx.commit(CommitMode::Flush).unwrap();
                rvm.truncate().unwrap();
                i += 1;
            }
        });
        let reopened = (0..400).try_for_each(|round| {
            let other = rvm.open_segment(dir.path().join("other")).map_err(|e| format!("round {round}: {e}"))?;
            rvm.close_segment(other).map_err(|e| format!("round {round}: close: {e}"))
        });
        stop.store(true, std::sync::atomic::Ordering::Release);
        reopened.unwrap();
    });
}
