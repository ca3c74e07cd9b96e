//! Helpers shared by the `rvmutl` tests (`tests/cli*.rs`): running the tool
//! as a separate process and checking what it printed and returned.
#![allow(dead_code)] // each test file uses its own subset

use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Serializes the tests of one file. A process spawned by one test thread
/// briefly holds duplicates of every file descriptor of the test process
/// (between fork and exec), and with them the `flock` of any log another
/// test has open, so a test reopening its log right after closing it could
/// see a spurious "in use" error.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `rvmutl` with `args`.
pub fn rvmutl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rvmutl")).args(args).output().expect("running rvmutl")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing the output when it differs.
#[track_caller]
pub fn expect_code(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}
