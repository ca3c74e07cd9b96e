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
///
/// Ranges recorded with [`claim_range`] (heaps of this process, mapped or
/// closed for a while) are never picked: the kernel would see them free
/// while their heap is closed. If the kernel has no gap left, the closed
/// heaps' ranges are let go ([`forget_closed`]) and the pick is tried once
/// more.
///
/// A range in [`PICK_WINDOW`] is tried first, at random places: the
/// kernel's own picks lie where every process keeps its libraries, thread
/// stacks and allocator arenas, so a heap made by one process at such a
/// pick often could not be mapped by another (`AddressInUse` at open: a
/// heap made by a child process, opened by its parent).
pub(crate) fn free_address_range(len: usize, align: usize) -> std::io::Result<usize> {
    match pick_range(len, align) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOMEM.raw_os_error()) && forget_closed(0) > 0 => {
            pick_range(len, align)
        }
        picked => picked,
    }
}

fn pick_range(len: usize, align: usize) -> std::io::Result<usize> {
    use rustix::mm::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    if let Some(addr) = pick_in_window(len, align) {
        return Ok(addr);
    }
    let span = len
        .checked_add(align)
        .and_then(|s| s.checked_add(HEADROOM))
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // Picks that overlap a claimed range stay reserved (so the kernel
    // offers another gap) until a good one is found.
    let mut held = Vec::new();
    let result = loop {
        // SAFETY: a fresh anonymous PROT_NONE mapping chosen by the kernel
        // (null hint) overlaps no existing mapping and is never accessed.
        let p = match unsafe {
            mmap_anonymous(std::ptr::null_mut(), span, ProtFlags::empty(), MapFlags::PRIVATE | MapFlags::NORESERVE)
        } {
            Ok(p) => p,
            Err(e) => break Err(e.into()),
        };
        held.push(p);
        let addr = (p as usize).div_ceil(align) * align;
        if held.len() < 64 && overlaps_claimed(addr, len) {
            continue;
        }
        break Ok(addr);
    };
    for p in held {
        // SAFETY: unmaps exactly a mapping made above, which nothing uses.
        let _ = unsafe { munmap(p, span) };
    }
    result
}

/// Where [`free_address_range`] looks first: `[32 TiB, 80 TiB)`, an
/// address range Linux does not use unless asked (programs load at
/// `0x55…`/`0x56…`, the kernel's `mmap` picks and the stack lie near
/// `0x7f…`; sanitizer shadow memory ends below 17 TiB; the loader's
/// tests and examples use `0x5a00…` and up).
const PICK_WINDOW: (usize, usize) = (0x2000_0000_0000, 0x5000_0000_0000);

/// A free range of `len` bytes aligned to `align` at a random place of
/// [`PICK_WINDOW`] (`None` if it does not fit there, or the address space
/// has no such addresses, or 32 random places were taken).
fn pick_in_window(len: usize, align: usize) -> Option<usize> {
    use std::hash::{BuildHasher, Hasher};
    let (lo, hi) = PICK_WINDOW;
    let room = (hi - lo).checked_sub(len)?;
    if align == 0 || len == 0 || len > (hi - lo) / 4 {
        return None;
    }
    let slots = room / align;
    for _ in 0..32 {
        // A random number: the std hasher's keys are random per process
        // and differ at every `RandomState::new`.
        let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let addr = lo + (r as usize % slots.max(1)) * align;
        if overlaps_claimed(addr, len) {
            continue;
        }
        if reserve_at(addr, len) {
            // SAFETY: unmaps exactly the reservation just made, which
            // nothing uses.
            let _ = unsafe { rustix::mm::munmap(addr as *mut std::ffi::c_void, len) };
            return Some(addr);
        }
    }
    None
}

/// Reserves `[addr, addr + len)` with an inaccessible `PROT_NONE` mapping
/// if no mapping of the process uses any of it; false otherwise. The
/// caller unmaps it.
fn reserve_at(addr: usize, len: usize) -> bool {
    use rustix::mm::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    // SAFETY: a PROT_NONE anonymous mapping at a fixed address with
    // FIXED_NOREPLACE: it fails rather than replace anything; it is never
    // accessed, only unmapped.
    let mapped = unsafe {
        mmap_anonymous(
            addr as *mut std::ffi::c_void,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
        )
    };
    match mapped {
        Ok(p) if p as usize == addr => true,
        // An old kernel may treat the flag as a hint and map elsewhere.
        Ok(p) => {
            // SAFETY: unmaps the mapping just made, which nothing uses.
            let _ = unsafe { munmap(p, len) };
            false
        }
        Err(_) => false,
    }
}

/// A heap's address range in this process: `[start, end)`, and what holds
/// it.
struct Claimed {
    start: usize,
    end: usize,
    state: ClaimState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ClaimState {
    /// Its heap is open (mapped there).
    Open,
    /// Its heap is closed; `reserved`: a `PROT_NONE` reservation holds
    /// the range. `closed` orders the closings (older first).
    Closed { reserved: bool, closed: u64 },
}

/// Address ranges of heaps this process made or opened, and the count of
/// closings so far.
static CLAIMED: parking_lot::Mutex<(Vec<Claimed>, u64)> = parking_lot::Mutex::new((Vec::new(), 0));

/// The most address space the ranges of closed heaps keep reserved (32
/// TiB, a quarter of the 128 TiB a process has with 4-level page tables;
/// a closed heap of the default 64 GiB maximum holds a little more than
/// that). Past it the oldest closed heaps' ranges are let go: a process
/// that opens and closes thousands of heaps in turn (a property test, one
/// heap per tenant) would otherwise run out of address space, and its
/// next heap, or any large allocation, would fail.
const CLOSED_RESERVE_LIMIT: usize = 32 << 40;

/// Records `[start, start + len)` as an open heap's: [`free_address_range`]
/// never picks it for another heap of this process.
pub(crate) fn claim_range(start: usize, len: usize) {
    let c = &mut CLAIMED.lock().0;
    let end = start.saturating_add(len);
    match c.iter_mut().find(|r| r.start == start && r.end == end) {
        Some(r) => r.state = ClaimState::Open,
        None => c.push(Claimed { start, end, state: ClaimState::Open }),
    }
}

fn overlaps_claimed(start: usize, len: usize) -> bool {
    let end = start.saturating_add(len);
    CLAIMED.lock().0.iter().any(|r| start < r.end && r.start < end)
}

/// Holds a closed heap's range with a `PROT_NONE` reservation, so that no
/// other mapping of the process (an allocation, another heap) takes it
/// before the heap is opened again. Best effort: the range is only marked
/// closed if it cannot be reserved. Then lets go of the oldest closed
/// ranges past [`CLOSED_RESERVE_LIMIT`]: such a heap opens again at its
/// address if nothing took the range meanwhile, else its open fails (the
/// loader's `MapRegion` error), as for a heap made by another process.
pub(crate) fn reserve_claimed(start: usize, len: usize) {
    let end = start.saturating_add(len);
    {
        let (c, closings) = &mut *CLAIMED.lock();
        let Some(r) = c.iter_mut().find(|r| r.start == start && r.end == end && r.state == ClaimState::Open) else {
            return;
        };
        // Unmapped by `release_claimed` or `forget_closed`.
        let reserved = reserve_at(start, len);
        *closings += 1;
        r.state = ClaimState::Closed { reserved, closed: *closings };
    }
    forget_closed(CLOSED_RESERVE_LIMIT);
}

/// Lets go of the ranges of closed heaps, oldest closing first, until
/// those left span at most `keep` bytes; returns how many were let go.
fn forget_closed(keep: usize) -> usize {
    let c = &mut CLAIMED.lock().0;
    let closed_at = |r: &Claimed| match r.state {
        ClaimState::Closed { closed, .. } => Some(closed),
        ClaimState::Open => None,
    };
    let mut closed: Vec<(u64, usize)> = c.iter().filter_map(|r| Some((closed_at(r)?, r.end - r.start))).collect();
    let mut spanned: usize = closed.iter().map(|&(_, len)| len).fold(0, usize::saturating_add);
    closed.sort_unstable();
    let mut cutoff = None;
    for &(at, len) in &closed {
        if spanned <= keep {
            break;
        }
        spanned -= len;
        cutoff = Some(at);
    }
    let Some(cutoff) = cutoff else { return 0 };
    let before = c.len();
    c.retain(|r| match r.state {
        ClaimState::Closed { reserved, closed } if closed <= cutoff => {
            if reserved {
                // SAFETY: unmaps exactly a reservation made by
                // `reserve_claimed`, which nothing uses.
                let _ = unsafe { rustix::mm::munmap(r.start as *mut std::ffi::c_void, r.end - r.start) };
            }
            false
        }
        _ => true,
    });
    before - c.len()
}

/// Releases the reservations of claimed ranges overlapping
/// `[start, start + len)` (a heap about to be mapped there).
pub(crate) fn release_claimed(start: usize, len: usize) {
    let end = start.saturating_add(len);
    for r in CLAIMED.lock().0.iter_mut().filter(|r| start < r.end && r.start < end) {
        if let ClaimState::Closed { reserved: reserved @ true, .. } = &mut r.state {
            // SAFETY: unmaps exactly a reservation made by
            // `reserve_claimed`, which nothing uses.
            let _ = unsafe { rustix::mm::munmap(r.start as *mut std::ffi::c_void, r.end - r.start) };
            *reserved = false;
        }
    }
}

/// The `len` values of type `T` at `ptr` as a slice.
///
/// # Safety
///
/// `ptr` is null only if `len` is 0; otherwise it is aligned for `T` and
/// `[ptr, ptr + len * size_of::<T>())` lies in a live heap block holding
/// valid `T`s, not changed for `'a` except through the returned slice (if
/// mutable).
pub(crate) unsafe fn slice<'a, T>(ptr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(ptr as *const T, len) }
}

/// [`slice`], mutable.
///
/// # Safety
///
/// As [`slice`], and no other reference to the range exists for `'a`; the
/// range is declared in the open transaction.
pub(crate) unsafe fn slice_mut<'a, T>(ptr: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) }
}

/// Moves `count` values of `T` from index `from` to index `to` of the
/// array at `ptr` (the ranges may overlap).
///
/// # Safety
///
/// Both ranges lie in one live heap block aligned for `T`, declared in the
/// open transaction, with no reference into them.
pub(crate) unsafe fn shift<T>(ptr: usize, from: usize, to: usize, count: usize) {
    let base = ptr as *mut T;
    // SAFETY: per the contract.
    unsafe { std::ptr::copy(base.add(from), base.add(to), count) }
}

/// Moves the value out of index `i` of the array at `ptr` (a bitwise copy:
/// the slot is dead afterwards).
///
/// # Safety
///
/// Index `i` holds a valid `T` in a live heap block aligned for `T`, and
/// the slot is treated as uninitialised afterwards.
pub(crate) unsafe fn take<T>(ptr: usize, i: usize) -> T {
    // SAFETY: per the contract.
    unsafe { std::ptr::read((ptr as *const T).add(i)) }
}

/// Word `i` (native-endian `u64`) of the value at `addr`, read unaligned.
///
/// # Safety
///
/// `[addr + 8 i, addr + 8 i + 8)` lies in a live heap block (or a mapped
/// part of the heap) that no one writes meanwhile.
pub(crate) unsafe fn read_word(addr: usize, i: usize) -> u64 {
    // SAFETY: per the contract.
    unsafe { std::ptr::read_unaligned((addr + 8 * i) as *const u64) }
}
