//! The unsafe fence: raw mappings and raw copies to and from mapped memory.
//!
//! Everything else in the crate works with addresses (`usize`) that the
//! region table has checked; only this module turns them into pointers.

use crate::error::MapError;
use rustix::mm::{MapFlags, ProtFlags};
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// The memory this process may use: the machine's physical memory, or
/// less if its control group (as a container sees it at `/sys/fs/cgroup`,
/// version 2 or 1) is limited to less.
pub fn memory_limit() -> Option<u64> {
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .min();
    match (physical_memory(), cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

/// Bytes of physical memory of the machine, if the system tells.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: `sysconf` reads a system constant; it has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    u64::try_from(pages).ok().filter(|&p| p > 0).and_then(|p| p.checked_mul(page_size() as u64))
}

/// Highest user address this crate will map at (the lower half of a 48-bit
/// address space, which every 64-bit Linux target provides).
pub const USER_ADDRESS_LIMIT: usize = 1 << 47;

/// An owned memory mapping; dropping it unmaps.
///
/// A mapping may own more address space than it maps: `[addr, addr + len)`
/// is accessible, `[addr + len, addr + span)` is a reservation
/// (`PROT_NONE`, no swap reserved) that [`Mapping::grow_file_private`] and
/// [`Mapping::grow_anonymous`] map into later. Nothing else in the process
/// can take the reserved range: the kernel never places another mapping
/// over an existing one unless asked to with `MAP_FIXED`, and only this
/// type maps there.
#[derive(Debug)]
pub struct Mapping {
    addr: NonNull<u8>,
    /// Bytes accessible from `addr`; only grows, published with release
    /// ordering after the pages are mapped.
    len: std::sync::atomic::AtomicUsize,
    /// Bytes of address space owned from `addr` (at least `len`).
    span: usize,
}

// SAFETY: a Mapping is only an owned address range; access to its bytes is
// synchronized by the transaction rules documented on the public API.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping gives no access to the bytes by itself.
unsafe impl Sync for Mapping {}

/// Hints the CPU to bring the cache line of `bytes[at]` in: a pure hint,
/// for loops that visit memory in an order the hardware cannot guess.
#[inline]
pub fn prefetch(bytes: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < bytes.len() {
        // SAFETY: a prefetch neither reads nor writes memory as far as the
        // program can tell and never faults; the address is inside `bytes`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(bytes.as_ptr().add(at).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at);
}

/// Where a mapping goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Exactly at this address; an occupied range is an error.
    Fixed(usize),
    /// Wherever the system chooses.
    Anywhere,
}

fn check_placement(placement: Placement, len: usize) -> Result<(), MapError> {
    if let Placement::Fixed(addr) = placement {
        let bad = || MapError::BadAddress { addr, len };
        let end = addr.checked_add(len).ok_or_else(bad)?;
        if addr == 0 || end > USER_ADDRESS_LIMIT {
            return Err(bad());
        }
    }
    Ok(())
}

fn finish(placement: Placement, got: *mut std::ffi::c_void, len: usize) -> Result<Mapping, MapError> {
    let addr =
        NonNull::new(got.cast::<u8>()).ok_or(MapError::System { addr: 0, len, errno: "mmap returned null".into() })?;
    let m = Mapping { addr, len: std::sync::atomic::AtomicUsize::new(len), span: len };
    if let Placement::Fixed(want) = placement {
        if m.addr() != want {
            // Kernels before 4.17 treat MAP_FIXED_NOREPLACE as a hint; the
            // mapping landed elsewhere, which means the range was occupied.
            drop(m);
            return Err(MapError::AddressInUse { addr: want, len });
        }
    }
    Ok(m)
}

fn map_err(placement: Placement, len: usize, e: rustix::io::Errno) -> MapError {
    let addr = match placement {
        Placement::Fixed(a) => a,
        Placement::Anywhere => 0,
    };
    if e == rustix::io::Errno::EXIST {
        MapError::AddressInUse { addr, len }
    } else {
        MapError::System { addr, len, errno: e.to_string() }
    }
}

/// Region mappings are private (copy-on-write) and `MAP_NORESERVE`: the
/// kernel does not charge their whole length to the commit limit up front
/// (a writable private mapping of a 64 GiB heap would otherwise be refused
/// on a machine with less memory, though only the pages a program changes
/// ever take memory).
fn flags_for(placement: Placement) -> (*mut std::ffi::c_void, MapFlags) {
    match placement {
        Placement::Fixed(a) => {
            (a as *mut std::ffi::c_void, MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE)
        }
        Placement::Anywhere => (std::ptr::null_mut(), MapFlags::PRIVATE | MapFlags::NORESERVE),
    }
}

impl Mapping {
    /// Zero-filled private memory of `len` bytes (page multiple).
    pub fn anonymous(placement: Placement, len: usize) -> Result<Mapping, MapError> {
        Self::anonymous_with(placement, len, MapFlags::empty())
    }

    /// [`Mapping::anonymous`] with its pages allocated now
    /// (`MAP_POPULATE`), for memory about to be filled whole: one system
    /// call instead of a page fault per page.
    pub fn anonymous_populated(placement: Placement, len: usize) -> Result<Mapping, MapError> {
        Self::anonymous_with(placement, len, MapFlags::POPULATE)
    }

    fn anonymous_with(placement: Placement, len: usize, extra: MapFlags) -> Result<Mapping, MapError> {
        check_placement(placement, len)?;
        let (hint, flags) = flags_for(placement);
        let flags = flags | extra;
        // SAFETY: a private anonymous mapping; with FIXED_NOREPLACE the kernel
        // refuses (EEXIST) rather than replace anything already mapped, and
        // without a fixed address it picks a free range. No existing memory
        // is affected either way.
        let got = unsafe { rustix::mm::mmap_anonymous(hint, len, ProtFlags::READ | ProtFlags::WRITE, flags) }
            .map_err(|e| map_err(placement, len, e))?;
        finish(placement, got, len)
    }

    /// A private (copy-on-write) mapping of `len` bytes of `fd` at `offset`:
    /// pages are read lazily on first touch and stores never reach the file.
    pub fn file_private(
        placement: Placement,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Result<Mapping, MapError> {
        check_placement(placement, len)?;
        let (hint, flags) = flags_for(placement);
        // SAFETY: as for `anonymous`: FIXED_NOREPLACE never replaces a
        // mapping. MAP_PRIVATE means stores stay in this process. The caller
        // (region mapping) checked that [offset, offset+len) lies inside the
        // device, so touching the pages cannot raise SIGBUS while the device
        // keeps its size (we hold its exclusive lock).
        let got = unsafe { rustix::mm::mmap(hint, len, ProtFlags::READ | ProtFlags::WRITE, flags, fd, offset) }
            .map_err(|e| map_err(placement, len, e))?;
        finish(placement, got, len)
    }

    /// Reserves `span` bytes of address space (`PROT_NONE`,
    /// `MAP_NORESERVE`: no access, no memory or swap accounted) at
    /// `placement`, never over an existing mapping, and gives a mapping of
    /// length 0 that owns it; the grow functions map into it.
    pub fn reserve(placement: Placement, span: usize) -> Result<Mapping, MapError> {
        check_placement(placement, span)?;
        let (hint, flags) = flags_for(placement);
        // SAFETY: as for `anonymous`: FIXED_NOREPLACE never replaces an
        // existing mapping, and without a fixed address the kernel picks a
        // free range. The reservation is inaccessible until grown into.
        let got = unsafe { rustix::mm::mmap_anonymous(hint, span, ProtFlags::empty(), flags | MapFlags::NORESERVE) }
            .map_err(|e| map_err(placement, span, e))?;
        let m = finish(placement, got, span)?;
        m.len.store(0, std::sync::atomic::Ordering::Release);
        Ok(m)
    }

    /// Bytes of address space the mapping owns (its length plus its
    /// reservation).
    pub fn span(&self) -> usize {
        self.span
    }

    /// The range a growth to `new_len` maps: `[addr + len, addr + new_len)`
    /// as (address, length), checked against the reservation.
    fn growth(&self, new_len: usize) -> Result<(usize, usize), MapError> {
        let len = self.len();
        if new_len < len || new_len > self.span {
            return Err(MapError::BadAddress { addr: self.addr() + len, len: new_len.saturating_sub(len) });
        }
        Ok((self.addr() + len, new_len - len))
    }

    /// Maps `[len, new_len)` of the mapping privately from `fd`, the file
    /// bytes at `offset` onwards, into the reservation, and makes it
    /// accessible (lazily read, as [`Mapping::file_private`]).
    ///
    /// The caller serializes growths of one mapping (they publish `len`).
    pub fn grow_file_private(&self, fd: BorrowedFd<'_>, offset: u64, new_len: usize) -> Result<(), MapError> {
        let (at, n) = self.growth(new_len)?;
        if n == 0 {
            return Ok(());
        }
        let flags = MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE;
        // SAFETY: `[at, at + n)` lies in this mapping's own reservation
        // (checked by `growth`): no other mapping lives there and nothing
        // refers to those pages (they were inaccessible), so MAP_FIXED
        // replaces only our PROT_NONE pages. The caller checked that the
        // file holds `[offset, offset + n)`.
        let got = unsafe { rustix::mm::mmap(at as *mut _, n, ProtFlags::READ | ProtFlags::WRITE, flags, fd, offset) }
            .map_err(|e| map_err(Placement::Fixed(at), n, e))?;
        if got as usize != at {
            return Err(MapError::AddressInUse { addr: at, len: n });
        }
        self.len.store(new_len, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Maps `[len, new_len)` of the mapping as zero-filled private memory
    /// inside the reservation, calls `fill` on the new bytes, then makes
    /// them part of the mapping. A failed `fill` leaves the length as it
    /// was (the pages stay mapped but outside the length).
    pub fn grow_anonymous(
        &self,
        new_len: usize,
        fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<std::io::Result<()>, MapError> {
        let (at, n) = self.growth(new_len)?;
        if n == 0 {
            return Ok(Ok(()));
        }
        let flags = MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE;
        // SAFETY: as in `grow_file_private`: only our own reservation is
        // replaced.
        let got = unsafe { rustix::mm::mmap_anonymous(at as *mut _, n, ProtFlags::READ | ProtFlags::WRITE, flags) }
            .map_err(|e| map_err(Placement::Fixed(at), n, e))?;
        if got as usize != at {
            return Err(MapError::AddressInUse { addr: at, len: n });
        }
        // SAFETY: the new pages were just mapped and are not published yet
        // (the length is stored after `fill`), so nothing else refers to them.
        let dst = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, n) };
        if let Err(e) = fill(dst) {
            return Ok(Err(e));
        }
        self.len.store(new_len, std::sync::atomic::Ordering::Release);
        Ok(Ok(()))
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// Start pointer.
    pub fn ptr(&self) -> NonNull<u8> {
        self.addr
    }

    /// Length in bytes (what is accessible; see [`Mapping::span`]).
    pub fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Fills `[off, off + src.len())` of the mapping from `src`, for
    /// copy-on-map loading before the region is published.
    pub fn fill(
        &self,
        off: usize,
        src_len: usize,
        fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        assert!(off.checked_add(src_len).is_some_and(|e| e <= self.len()), "fill out of bounds");
        // SAFETY: the range is inside this mapping (asserted), the mapping is
        // not yet published to any other thread (only region creation calls
        // this), so the exclusive slice cannot alias.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr().add(off), src_len) };
        fill(dst)
    }
}

/// A read-only shared mapping of part of a file, read as a byte slice
/// (recovery's scan reads the log's record area this way, without copying
/// it into a buffer).
///
/// It is made only after checking that the file holds the whole range, and
/// is meant for files this process holds locked (the log): touching a page
/// past the end of a file raises `SIGBUS`, so a cooperating writer must not
/// shorten it meanwhile, and the bytes it shows are those of the page cache,
/// which nothing writes while the view is read (the log is not written
/// before recovery ends).
#[derive(Debug)]
pub struct FileView {
    map: memmap2::Mmap,
}

impl FileView {
    /// Maps `len` (> 0) bytes of `fd` at `offset` (page-aligned) read-only,
    /// if the file holds them all (else `None`, as for any mapping failure:
    /// the caller reads the file instead).
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Option<FileView> {
        // The end of the file (of a block device too, whose `st_size` is
        // 0); nothing reads or writes the log at its file position.
        let size = rustix::fs::seek(fd, rustix::fs::SeekFrom::End(0)).ok()?;
        let end = offset.checked_add(len as u64)?;
        if len == 0 || !offset.is_multiple_of(page_size() as u64) || size < end {
            return None;
        }
        // SAFETY: the file holds the whole range (checked above) and is one
        // this process holds locked (the log), so no cooperating writer
        // shortens it while the view lives (no SIGBUS), and nothing writes
        // the range meanwhile (the log is not written before recovery
        // ends): the bytes behind the slice do not change under it.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(&fd) }.ok()?;
        Some(FileView { map })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; nothing refers to it after drop (the
        // region table removes the region and checks no transaction holds
        // it before dropping the Mapping).
        let _ = unsafe { rustix::mm::munmap(self.addr.as_ptr().cast(), self.span) };
    }
}

/// Copies `dst.len()` bytes of mapped memory at `addr` into `dst`.
///
/// # Safety
///
/// `[addr, addr + dst.len())` must lie inside a live mapping, and no other
/// thread may write it concurrently (the transaction rules guarantee this
/// for declared ranges).
pub unsafe fn copy_from(addr: usize, dst: &mut [u8]) {
    // SAFETY: per the contract, the source is valid for reads and not
    // concurrently written; `dst` is a distinct Rust buffer.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), dst.len()) }
}

/// Appends `len` bytes of mapped memory at `addr` to `dst` (no zero-fill
/// first).
///
/// # Safety
///
/// As for [`copy_from`].
pub unsafe fn append_from(addr: usize, len: usize, dst: &mut Vec<u8>) {
    dst.reserve(len);
    let at = dst.len();
    // SAFETY: the source is valid and not concurrently written (contract);
    // `reserve` made room for `len` bytes after `at`, which the copy
    // initializes before `set_len` exposes them.
    unsafe {
        std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr().add(at), len);
        dst.set_len(at + len);
    }
}

/// Copies mapped memory that other threads may be storing into at the same
/// time (the checkpoint's page snapshots): byte-wise volatile reads, so the
/// compiler assumes nothing about the source. Bytes that a concurrent store
/// touches may come out old or new; callers only use such bytes where they
/// replace them afterwards (ranges of transactions in flight at a freeze).
///
/// # Safety
///
/// `[addr, addr + dst.len())` must lie inside a live mapping.
pub unsafe fn copy_from_racy(addr: usize, dst: &mut [u8]) {
    let src = addr as *const u8;
    let mut i = 0;
    // Byte reads up to 8-byte alignment, then whole words, then bytes.
    while i < dst.len() && !(addr + i).is_multiple_of(8) {
        // SAFETY: inside the live mapping per the contract; volatile reads
        // of plain memory that may be written concurrently (see above).
        dst[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + 8 <= dst.len() {
        // SAFETY: as above; `addr + i` is 8-byte aligned here.
        let w = unsafe { std::ptr::read_volatile(src.add(i).cast::<u64>()) };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < dst.len() {
        // SAFETY: as above.
        dst[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Calls `f` with `len` bytes of mapped memory at `addr` as a slice (to
/// write them to a device without copying them first).
///
/// # Safety
///
/// `[addr, addr + len)` must lie inside a live mapping, and no thread may
/// write it until `f` returns.
pub unsafe fn with_bytes<R>(addr: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
    // SAFETY: valid for reads and not written while the slice lives (the
    // contract); the slice does not outlive `f`.
    f(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
}

/// Copies `src` into mapped memory at `addr`.
///
/// # Safety
///
/// `[addr, addr + src.len())` must lie inside a live mapping and no other
/// thread may access it concurrently; no Rust reference may point into it.
pub unsafe fn copy_to(addr: usize, src: &[u8]) {
    // SAFETY: per the contract, the destination is valid for writes and
    // exclusively ours for the duration of the copy.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, src.len()) }
}

/// Types for which every bit pattern is a valid value (an arena's slots
/// not yet written hold zeros, or what an earlier arena of the same
/// mapping left).
///
/// # Safety
///
/// Every bit pattern of the type's size must be a valid value of it, and
/// the type must need no drop.
pub(crate) unsafe trait AnyBits: Copy {}

/// The mapping of the last arena dropped, its pages handed back to the
/// kernel lazily (`MADV_FREE`): the next arena of at most its size reuses
/// it, and a program that opens instances one after another (or a test
/// suite) does not fault in and zero its index memory again each time.
static SPARE: parking_lot::Mutex<Option<Mapping>> = parking_lot::Mutex::new(None);

/// Gives an arena's mapping back: its first `used` bytes are freed lazily
/// (the kernel takes the pages only if it needs memory; a later write
/// takes them back) and the mapping is kept for the next arena, if none is
/// kept already.
fn recycle(map: Mapping, used: usize) {
    let used = used.min(map.len()).next_multiple_of(page_size()).min(map.len());
    if used > 0 {
        // SAFETY: the range lies inside this mapping, which we own and no
        // one reads any more; MADV_FREE only lets the kernel drop the
        // pages (reading them later gives zeros or the old bytes, both
        // valid slots: AnyBits).
        let _ = unsafe { rustix::mm::madvise(map.ptr().as_ptr().cast(), used, rustix::mm::Advice::LinuxFree) };
    }
    let mut spare = SPARE.lock();
    if spare.as_ref().is_none_or(|s| s.len() < map.len()) {
        *spare = Some(map);
    }
}

/// Slots of plain values in one anonymous mapping that asks for
/// transparent huge pages (`MADV_HUGEPAGE`) past its first 2 MiB, handed
/// out in runs to the threads that fill them. Instant recovery's page index keeps its pieces
/// here: building an index of tens of MB at open takes one page fault per
/// 2 MiB instead of 512 (page faults cost about 2 µs each on a virtual
/// machine), and the two threads of the scan fill runs of one mapping, so
/// their parts join with no copy. Where huge pages are off or scarce the
/// kernel uses small pages, as for any memory.
pub(crate) struct HugeArena<T: AnyBits> {
    /// `None` for an arena of no slots.
    map: Option<Mapping>,
    cap: usize,
    /// Slots handed out so far.
    handed: std::sync::atomic::AtomicUsize,
    _values: std::marker::PhantomData<T>,
}

impl<T: AnyBits> HugeArena<T> {
    /// An arena of `cap` slots (address space only: memory is taken as
    /// slots are written); `None` if it cannot be mapped.
    pub fn new(cap: usize) -> Option<HugeArena<T>> {
        const { assert!(std::mem::align_of::<T>() <= 4096 && std::mem::size_of::<T>() > 0) };
        if cap == 0 {
            return Some(HugeArena { map: None, cap, handed: 0.into(), _values: std::marker::PhantomData });
        }
        const HUGE: usize = 2 << 20;
        let bytes = cap.checked_mul(std::mem::size_of::<T>())?.checked_next_multiple_of(HUGE)?;
        {
            let mut spare = SPARE.lock();
            if spare.as_ref().is_some_and(|m| m.len() >= bytes) {
                let map = spare.take();
                return Some(HugeArena { map, cap, handed: 0.into(), _values: std::marker::PhantomData });
            }
        }
        let map = Mapping::anonymous(Placement::Anywhere, bytes).ok()?;
        // The first 2 MiB stay in small pages: a small index (a short log:
        // most opens) then never pays for zeroing a whole huge page.
        if bytes > HUGE {
            // SAFETY: the range lies inside this mapping, which we own;
            // the advice changes only how the kernel backs it, never its
            // contents (a refusal leaves small pages, which is fine).
            let _ = unsafe {
                rustix::mm::madvise(
                    map.ptr().as_ptr().add(HUGE).cast(),
                    bytes - HUGE,
                    rustix::mm::Advice::LinuxHugepage,
                )
            };
        }
        Some(HugeArena { map: Some(map), cap, handed: 0.into(), _values: std::marker::PhantomData })
    }

    /// Hands out `n` slots no one was handed before: the first one's index
    /// (`None` if fewer than `n` are left).
    pub fn claim(&self, n: usize) -> Option<usize> {
        use std::sync::atomic::Ordering;
        let at = self.handed.fetch_add(n, Ordering::Relaxed);
        if at.checked_add(n).is_none_or(|end| end > self.cap) {
            // Leave the counter past the end: every later claim fails too.
            self.handed.store(self.cap, Ordering::Relaxed);
            return None;
        }
        Some(at)
    }

    /// Slot `i`, for writing.
    ///
    /// # Safety
    ///
    /// Slot `i` must have been handed out ([`HugeArena::claim`]) to the
    /// caller, and no other reference to it may live while the returned
    /// one does (one thread fills a run; a slot is read only after
    /// [`HugeArena::freeze`]).
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot(&self, i: usize) -> &mut T {
        // SAFETY: `i < cap` (it was handed out, so the mapping exists), so
        // the slot lies inside the mapping, page-aligned and so aligned for
        // T; its bytes are a valid T whatever they are (AnyBits); the
        // caller guarantees no other reference to it lives.
        unsafe { &mut *self.ptr(i) }
    }

    /// Where slot `i` is (null for an arena of no slots). Writing through
    /// it is for the slot's holder only, as for [`HugeArena::slot`]; a
    /// pointer keeps a tight loop free of the checks `slot` makes and lets
    /// it write two slots of one run without two `&mut` to one run.
    #[inline]
    pub fn ptr(&self, i: usize) -> *mut T {
        debug_assert!(i < self.cap);
        self.map.as_ref().map_or(std::ptr::null_mut(), |m| m.ptr().as_ptr().cast::<T>().wrapping_add(i))
    }

    /// The arena, read-only: every slot handed out (written, or zeros, or
    /// what an earlier arena of a recycled mapping left: any bit pattern).
    pub fn freeze(mut self) -> Frozen<T> {
        let len = (*self.handed.get_mut()).min(self.cap);
        Frozen { map: self.map.take(), len, _values: std::marker::PhantomData }
    }
}

impl<T: AnyBits> Drop for HugeArena<T> {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            let used = (*self.handed.get_mut()).min(self.cap) * std::mem::size_of::<T>();
            recycle(map, used);
        }
    }
}

// SAFETY: the arena owns its slots (plain values, no drop); threads write
// only the slots handed to them (`slot`'s contract), so sharing it is
// like sharing disjoint `&mut [T]`s.
unsafe impl<T: AnyBits + Send> Send for HugeArena<T> {}
// SAFETY: as above.
unsafe impl<T: AnyBits + Send> Sync for HugeArena<T> {}

impl<T: AnyBits> std::fmt::Debug for HugeArena<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugeArena").field("cap", &self.cap).finish()
    }
}

/// A [`HugeArena`] after filling: its handed-out slots as a slice.
pub(crate) struct Frozen<T: AnyBits> {
    map: Option<Mapping>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: AnyBits> std::ops::Deref for Frozen<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match &self.map {
            None => &[],
            // SAFETY: the first `len` slots lie inside the mapping
            // (`len <= cap`), aligned; whatever bytes a slot holds are a
            // valid T (AnyBits); nothing writes them any more (the arena
            // was consumed by `freeze`).
            Some(map) => unsafe { std::slice::from_raw_parts(map.ptr().as_ptr().cast::<T>(), self.len) },
        }
    }
}

impl<T: AnyBits> Drop for Frozen<T> {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            recycle(map, self.len * std::mem::size_of::<T>());
        }
    }
}

impl<T: AnyBits> std::fmt::Debug for Frozen<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen").field("len", &self.len).finish()
    }
}

// SAFETY: read-only plain values owned by the Frozen.
unsafe impl<T: AnyBits + Send> Send for Frozen<T> {}
// SAFETY: as above.
unsafe impl<T: AnyBits + Sync> Sync for Frozen<T> {}

/// Forks of this process since it started, as the child handler that
/// [`fork_count`] installs counts them: in a child made with `fork(2)`
/// (or anything calling the C library's `fork`), the count is higher than
/// its parent's was at the fork.
static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether the counter's `pthread_atfork` handler is in place.
static WATCHING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn count_fork() {
    // One atomic add: async-signal-safe, as a handler run in a forked
    // child of a multithreaded process must be.
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The process's fork count now, with the process id: a value to compare
/// with [`forked_since`] later. The first call installs the counter
/// (`pthread_atfork`, once per process); where that failed, the process id
/// alone tells a child from its parent.
pub(crate) fn fork_count() -> (u64, u32) {
    static WATCH: std::sync::Once = std::sync::Once::new();
    WATCH.call_once(|| {
        // SAFETY: `count_fork` is an `extern "C"` function with no
        // arguments that lives as long as the program and only adds to an
        // atomic; no prepare or parent handler is given.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(count_fork)) };
        WATCHING.store(rc == 0, std::sync::atomic::Ordering::Release);
    });
    (FORKS.load(std::sync::atomic::Ordering::Acquire), std::process::id())
}

/// Whether this process is a forked child of the one in which
/// [`fork_count`] returned `then` (or a descendant of it): one atomic load,
/// or a `getpid` where the counter could not be installed.
pub(crate) fn forked_since(then: (u64, u32)) -> bool {
    if WATCHING.load(std::sync::atomic::Ordering::Acquire) {
        FORKS.load(std::sync::atomic::Ordering::Acquire) != then.0
    } else {
        std::process::id() != then.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory limit is known here, and at most the machine's memory.
    #[test]
    fn the_memory_limit_is_at_most_the_machines() {
        let (limit, machine) = (memory_limit().unwrap(), physical_memory().unwrap());
        assert!(limit > 0 && limit <= machine, "{limit} {machine}");
    }

    #[test]
    fn fixed_mapping_refuses_occupied_range() {
        let ps = page_size();
        let a = Mapping::anonymous(Placement::Anywhere, 4 * ps).unwrap();
        let err = Mapping::anonymous(Placement::Fixed(a.addr() + ps), ps).unwrap_err();
        assert!(matches!(err, MapError::AddressInUse { .. }), "{err:?}");
        // The original mapping is untouched and still readable.
        let mut b = [1u8; 8];
        // SAFETY: inside `a`, which no one else uses.
        unsafe { copy_from(a.addr(), &mut b) };
        assert_eq!(b, [0; 8]);
    }

    #[test]
    fn bad_addresses_are_errors() {
        let ps = page_size();
        assert!(matches!(
            Mapping::anonymous(Placement::Fixed(usize::MAX - ps + 1), ps),
            Err(MapError::BadAddress { .. })
        ));
        assert!(matches!(Mapping::anonymous(Placement::Fixed(0), ps), Err(MapError::BadAddress { .. })));
    }
}
