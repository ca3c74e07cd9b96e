//! The typed layer's unsafe fence: viewing root blocks as typed values,
//! and probing for a free address range.

use crate::persist::Persist;
use std::ptr::NonNull;

/// A shared view of a `T` stored at `ptr`.
///
/// # Safety
///
/// `ptr` is the start of a live heap block of at least `size_of::<T>()`
/// bytes, aligned for `T`, holding the bytes of a valid `T` (written by a
/// committed transaction or this one); the heap stays mapped and no
/// exclusive reference to the block exists for `'a`.
pub(crate) unsafe fn view<'a, T: Persist>(ptr: NonNull<u8>) -> &'a T {
    // SAFETY: per the contract.
    unsafe { ptr.cast::<T>().as_ref() }
}

/// An exclusive view of a `T` stored at `ptr`.
///
/// # Safety
///
/// As [`view`], and no other reference to the block exists for `'a`; the
/// block's bytes are declared in the open transaction, so stores through
/// the reference are logged at commit and undone at abort.
pub(crate) unsafe fn view_mut<'a, T: Persist>(ptr: NonNull<u8>) -> &'a mut T {
    // SAFETY: per the contract.
    unsafe { ptr.cast::<T>().as_mut() }
}

/// Room left free above a picked range: the kernel places the next
/// mappings (the loader's header area, other threads' allocations) at the
/// top of the gap just released, so they land here and not in the range.
const HEADROOM: usize = 256 << 20;

/// An address range of `len` bytes that no mapping of this process uses
/// right now (the bottom of a `PROT_NONE` reservation the kernel chose,
/// released at once), aligned to `align`. Another thread may map it before
/// the caller does: the caller's fixed mapping then fails and it may retry.
pub(crate) fn free_address_range(len: usize, align: usize) -> std::io::Result<usize> {
    use rustix::mm::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    let span = len
        .checked_add(align)
        .and_then(|s| s.checked_add(HEADROOM))
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a fresh anonymous PROT_NONE mapping chosen by the kernel
    // (null hint) overlaps no existing mapping and is never accessed.
    let p = unsafe {
        mmap_anonymous(std::ptr::null_mut(), span, ProtFlags::empty(), MapFlags::PRIVATE | MapFlags::NORESERVE)
    }?;
    // SAFETY: unmaps exactly the mapping made above, which nothing uses.
    unsafe { munmap(p, span) }?;
    let addr = p as usize;
    Ok(addr.div_ceil(align) * align)
}
