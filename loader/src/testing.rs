//! Test support: free, non-colliding fixed address ranges for tests that
//! run in parallel in one process (feature `testing`).
//!
//! Tests that load segments at fixed base addresses must not pick the same
//! addresses: the second one would fail with an address conflict. Cargo runs
//! the tests of one binary on parallel threads of one process, so each test
//! asks [`address_range`] for its own range instead of hard-coding one.
//!
//! The ranges are consecutive [`RANGE_LEN`] (1 GiB) slices of a window that
//! starts at [`WINDOW_START`] (`0x5a00_0000_0000`) and holds
//! [`WINDOW_RANGES`] of them (4 TiB, up to `0x5e00_0000_0000`). That window
//! lies in the user half of the address space, far from where Linux puts
//! executables (`0x55..`/`0x56..` for position-independent ones), the brk
//! heap, and `mmap` without an address (just below the stack, `0x7f..`).
//! An atomic counter hands each slice out once per process; a slice that
//! is not free (something is mapped in it) is skipped. Child processes get
//! their own address space, so a parent can pass its range to a child.
//!
//! ```
//! let r = rvm_loader::testing::address_range();
//! assert_eq!(r.len(), 1 << 30);
//! assert_ne!(r, rvm_loader::testing::address_range());
//! assert!(rvm_loader::testing::range_is_free(r.start(), r.len()));
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

/// Start of the window the ranges come from.
pub const WINDOW_START: usize = 0x5a00_0000_0000;
/// Length of every range: 1 GiB.
pub const RANGE_LEN: usize = 1 << 30;
/// How many ranges the window holds (4096: 4 TiB).
pub const WINDOW_RANGES: usize = 4096;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A free address range handed out to one test: `[start, start + len)`,
/// page-aligned (1 GiB-aligned, in fact).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRange {
    start: usize,
    len: usize,
}

impl AddressRange {
    /// First address.
    pub fn start(&self) -> usize {
        self.start
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The address `offset` bytes into the range, as a load-map base.
    ///
    /// # Panics
    ///
    /// If `offset` is outside the range (a bug in the test).
    pub fn at(&self, offset: usize) -> u64 {
        assert!(offset < self.len, "offset {offset:#x} is outside the test's address range");
        (self.start + offset) as u64
    }
}

/// Hands out a fresh 1 GiB range, free at the time of the call and never
/// handed out before in this process.
///
/// # Panics
///
/// When the window is exhausted (4096 ranges in one process).
pub fn address_range() -> AddressRange {
    loop {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(i < WINDOW_RANGES, "rvm_loader::testing: the test address window is exhausted");
        let start = WINDOW_START + i * RANGE_LEN;
        if range_is_free(start, RANGE_LEN) {
            return AddressRange { start, len: RANGE_LEN };
        }
    }
}

/// Whether nothing is mapped in `[addr, addr + len)` right now (tests use it
/// to check that a failed load left nothing behind).
pub fn range_is_free(addr: usize, len: usize) -> bool {
    crate::raw::range_is_free(addr, len)
}
