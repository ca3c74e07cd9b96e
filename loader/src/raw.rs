//! The loader's unsafe fence: the one store into recoverable memory the
//! loader makes (writing the load map into the header area through a
//! transaction) and, for test support, probing whether an address range is
//! free. Everything else in the crate is safe code over the core's API.

use crate::error::{LoaderError, Result};
use rvm_core::{CommitMode, Region, RegionClaim, RestoreMode, Rvm};

/// A mapping of a segment's header area `[0, header_len)`, claimed
/// ([`Region::claim`]) so that nobody else can unmap it.
///
/// Only this crate creates one, and it never hands the region or its
/// address out: no other code stores into the header through safe means,
/// and no Rust reference ever points into it.
#[derive(Debug)]
pub(crate) struct HeaderArea(pub(crate) RegionClaim);

impl HeaderArea {
    pub(crate) fn region(&self) -> &Region {
        self.0.region()
    }

    /// Copies `dst.len()` bytes from offset `off` of the header area
    /// (`None` if that is outside it).
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) -> Option<()> {
        // SAFETY: only `commit_header` stores into the area, and it needs
        // `&mut HeaderArea`, which cannot coexist with this `&self`; the
        // claim keeps the area mapped.
        unsafe { self.region().read(off, dst) }
    }
}

/// Writes `bytes` at the start of the header area in one restore-mode
/// transaction committed with [`CommitMode::Flush`]: when this returns `Ok`
/// the new load map is durable (in the log), and after any crash the header
/// shows either the old bytes or all of the new ones.
///
/// Takes `&mut HeaderArea`: the caller holds the area exclusively.
pub(crate) fn commit_header(rvm: &Rvm, header: &mut HeaderArea, bytes: &[u8]) -> Result<()> {
    if bytes.len() > header.region().len() {
        return Err(LoaderError::InvalidMap {
            region: None,
            reason: format!("the load map needs {} bytes; the header area has {}", bytes.len(), header.region().len()),
        });
    }
    let mut tx = rvm.begin(RestoreMode::Restore)?;
    // SAFETY: `[addr, addr + bytes.len())` lies inside the header mapping
    // (checked above), which stays mapped while `header` lives. The area is
    // private to this crate (see `HeaderArea`) and borrowed mutably here, so
    // no other thread writes it during the transaction and no Rust reference
    // points into it; the transaction ends (commit, or abort on error) before
    // this function returns.
    unsafe { tx.modify_bytes(header.region().addr(), bytes)? };
    tx.commit(CommitMode::Flush)?;
    Ok(())
}

/// Declares the start of the header area in `tx` and stores `bytes`
/// there (a growing region's new load map, written under the map's lock,
/// which every header writer holds: see [`crate::RegionGrowth::grow`]).
pub(crate) fn store_header(tx: &mut rvm_core::Transaction<'_>, header: &Region, bytes: &[u8]) -> Result<()> {
    if bytes.len() > header.len() {
        return Err(LoaderError::InvalidMap {
            region: None,
            reason: format!("the load map needs {} bytes; the header area has {}", bytes.len(), header.len()),
        });
    }
    // SAFETY: `[addr, addr + bytes.len())` lies inside the header mapping
    // (checked above), kept alive by the `Region` handle. Only this crate
    // stores into the header area, always holding the load map's lock (the
    // caller holds it), so no other thread writes it during the
    // transaction; no Rust reference points into it.
    unsafe { tx.modify_bytes(header.addr(), bytes)? };
    Ok(())
}

/// Whether `[addr, addr + len)` is free in this process's address space
/// right now: a `PROT_NONE` reservation with `MAP_FIXED_NOREPLACE` succeeds
/// there (and is removed at once).
#[cfg(feature = "testing")]
pub(crate) fn range_is_free(addr: usize, len: usize) -> bool {
    use rustix::mm::{MapFlags, ProtFlags};
    if addr == 0 || len == 0 || addr.checked_add(len).is_none() {
        return false;
    }
    let flags = MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE | MapFlags::NORESERVE;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping (the
    // kernel fails with EEXIST instead, or on kernels before 4.17 treats the
    // address as a hint), so no memory in use is affected. The reservation is
    // inaccessible (PROT_NONE) and its address is not published.
    let got = unsafe { rustix::mm::mmap_anonymous(addr as *mut std::ffi::c_void, len, ProtFlags::empty(), flags) };
    match got {
        Ok(p) => {
            // SAFETY: `[p, p + len)` is the reservation made just above;
            // nothing refers to it.
            let _ = unsafe { rustix::mm::munmap(p, len) };
            p as usize == addr
        }
        Err(_) => false,
    }
}
