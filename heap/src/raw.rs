//! The heap's unsafe fence: stores into recoverable memory through a core
//! transaction, and the write-back after a failed commit.

use rvm_core::Transaction;

/// Declares `[addr, addr + bytes.len())` in `tx` and stores `bytes` there.
///
/// Callers pass only ranges the heap owns exclusively at that moment: heap
/// metadata (written only under the heap lock, inside a commit), or the
/// interior of a block reserved to `tx`.
pub(crate) fn store(tx: &mut Transaction<'_>, addr: usize, bytes: &[u8]) -> rvm_core::Result<()> {
    // SAFETY: by the heap's locking discipline (see the callers and
    // docs/DESIGN.md, "Heap"), no other thread writes these bytes until `tx`
    // commits or aborts, and the heap holds no Rust reference into them.
    unsafe { tx.modify_bytes(addr, bytes) }
}

/// Declares `[addr, addr + len)` in `tx` for stores the caller makes.
///
/// # Safety
///
/// As [`Transaction::set_range`]: no other thread writes the range until
/// `tx` ends, and no Rust reference holds it while the transaction reads it.
pub(crate) unsafe fn declare(tx: &mut Transaction<'_>, addr: usize, len: usize) -> rvm_core::Result<()> {
    // SAFETY: forwarded contract.
    unsafe { tx.set_range(addr, len) }
}

/// Writes `bytes` at `addr` outside any transaction.
///
/// # Safety
///
/// `[addr, addr + bytes.len())` must lie in a live mapped region and no
/// other thread may access it concurrently.
pub(crate) unsafe fn write_back(addr: usize, bytes: &[u8]) {
    // SAFETY: per the contract, the destination is valid and exclusive.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) }
}

/// Copies heap metadata out of `region` (`None` if `[off, + dst.len())`
/// is outside it).
///
/// Callers read only heap metadata (header, counters, root slots, block
/// headers and guards), which this crate alone stores into, under the heap
/// lock or before the heap is shared (at load).
pub(crate) fn read_metadata(region: &rvm_core::Region, off: usize, dst: &mut [u8]) -> Option<()> {
    // SAFETY: by the heap's locking discipline no thread stores into heap
    // metadata while the caller (holding the heap lock, or loading the
    // heap before anyone else can use it) reads it.
    unsafe { region.read(off, dst) }
}
