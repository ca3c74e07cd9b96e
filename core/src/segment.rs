//! Segments (devices holding recoverable data) and regions (page-aligned
//! pieces of a segment mapped into memory).

use crate::mem::Mapping;
use crate::storage::Storage;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

pub use crate::mem::Placement;

#[derive(Debug)]
pub(crate) struct SegmentInner {
    pub id: u32,
    /// The instance that opened it (its commits go to that log only).
    pub instance: u64,
    pub name: PathBuf,
    pub dev: Arc<dyn Storage>,
    /// The device's length; grows with [`crate::Rvm::extend_segment`].
    pub len: AtomicU64,
    /// Segment ranges currently mapped, `[start, end)` (also held while a
    /// region grows, which serializes region growths).
    pub mapped: Mutex<Vec<(u64, u64)>>,
    /// The end of the furthest range ever mapped in this instance: the log
    /// can hold unapplied records only below it, so a region growing into
    /// the segment past it needs no replay first.
    pub mapped_end: AtomicU64,
    /// Held while the device is extended (serializes extensions).
    pub resize: Mutex<()>,
    /// Sequence number of the last committed transaction that touched it.
    pub last_tx: AtomicU64,
    /// Closed by [`crate::Rvm::close_segment`]: no region may map it
    /// (set and checked under `mapped`).
    pub closed: std::sync::atomic::AtomicBool,
}

/// An open segment: a file or block device whose bytes regions map.
///
/// Obtained from [`crate::Rvm::open_segment`]; cheap to clone.
#[derive(Clone)]
pub struct Segment(pub(crate) Arc<SegmentInner>);

impl Segment {
    /// The segment's canonical name (its path).
    pub fn name(&self) -> &Path {
        &self.0.name
    }
    /// Size of the segment device in bytes.
    pub fn len(&self) -> u64 {
        self.0.len()
    }
    /// Whether the device is empty.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }
    /// The id log records use for this segment.
    pub fn id(&self) -> u32 {
        self.0.id
    }
}

impl SegmentInner {
    /// The device's length.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.0.name)
            .field("id", &self.0.id)
            .field("len", &self.0.len())
            .finish()
    }
}

/// How a region's contents come into memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Pages are read lazily on first touch (a private file mapping). Needs
    /// a device with a file descriptor; other devices are copied at map time.
    #[default]
    OnDemand,
    /// The whole region is read into memory when it is mapped.
    OnMap,
    /// Nothing is read: the region starts zero-filled, for a region the
    /// caller will overwrite completely. Bytes not overwritten and committed
    /// keep their old value in the segment.
    NoCopy,
}

/// What to map: a page-aligned range of a segment, where, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Offset of the region in the segment (page multiple).
    pub offset: u64,
    /// Length of the region (page multiple, not zero).
    pub len: usize,
    /// Fixed address or anywhere.
    pub placement: Placement,
    /// How the contents are brought in.
    pub copy: CopyMode,
    /// Address space to reserve for the region, from its start (0, or at
    /// most `len`: none): the region can grow into it in place with
    /// [`crate::Rvm::grow_region`]. The range is reserved without access
    /// and without memory or swap accounted; nothing else can be mapped
    /// there while the region lives.
    pub reserve: usize,
}

impl MapSpec {
    /// Maps `[offset, offset + len)` wherever the system chooses, copy-on-demand.
    pub fn new(offset: u64, len: usize) -> Self {
        MapSpec { offset, len, placement: Placement::Anywhere, copy: CopyMode::OnDemand, reserve: 0 }
    }
    /// Reserves `reserve` bytes of address space from the region's start
    /// (see [`MapSpec::reserve`](MapSpec#structfield.reserve)).
    pub fn reserve(mut self, reserve: usize) -> Self {
        self.reserve = reserve;
        self
    }
    /// Places the region at `addr` exactly.
    pub fn at(mut self, addr: usize) -> Self {
        self.placement = Placement::Fixed(addr);
        self
    }
    /// Chooses the copy mode.
    pub fn copy(mut self, copy: CopyMode) -> Self {
        self.copy = copy;
        self
    }
}

#[derive(Debug)]
pub(crate) struct RegionInner {
    /// Pending pages of instant recovery made inaccessible, and their fault
    /// hook (`crate::lazy`); first, so the hook goes before the mapping.
    pub lazy: Mutex<Option<crate::lazy::Protected>>,
    /// Tracked mode ([`crate::Rvm::track`]); first, so the fault handler
    /// forgets the range before the mapping goes.
    pub tracked: std::sync::OnceLock<crate::tracked::Tracked>,
    pub mapping: Mapping,
    /// Shadow pages of the undeclared-store detector (`Options::verify_stores`).
    pub shadow: crate::verify::Shadow,
    pub segment: Arc<SegmentInner>,
    pub offset: u64,
    /// Uncommitted transactions that declared ranges here.
    pub active_txs: AtomicUsize,
    pub copy: CopyMode,
    /// Dirty pages per generation, pages polluted by no-restore aborts.
    pub track: crate::track::RegionTrack,
    /// Held by a [`RegionClaim`]: plain [`crate::Rvm::unmap`] refuses it.
    pub claimed: std::sync::atomic::AtomicBool,
}

impl RegionInner {
    pub fn addr(&self) -> usize {
        self.mapping.addr()
    }
    pub fn end(&self) -> usize {
        self.mapping.addr() + self.mapping.len()
    }
    pub fn contains(&self, addr: usize, end: usize) -> bool {
        addr >= self.addr() && end <= self.end()
    }
    /// Segment offset of a memory address inside the region.
    pub fn segment_offset(&self, addr: usize) -> u64 {
        self.offset + (addr - self.addr()) as u64
    }
}

impl Drop for RegionInner {
    fn drop(&mut self) {
        let start = self.offset;
        self.segment.mapped.lock().retain(|&(s, _)| s != start);
    }
}

/// A mapped region: `len()` bytes of recoverable memory at `addr()`.
///
/// Reading the memory is ordinary; changing it must happen inside a
/// transaction ([`crate::Transaction::set_range`] before the stores). The
/// memory stays mapped until [`crate::Rvm::unmap`] and until every clone of
/// this handle is gone.
#[derive(Clone, Debug)]
pub struct Region(pub(crate) Arc<RegionInner>);

impl Region {
    /// Start address.
    pub fn addr(&self) -> usize {
        self.0.addr()
    }
    /// Start pointer.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.0.mapping.ptr()
    }
    /// Length in bytes (grows with [`crate::Rvm::grow_region`]; never
    /// shrinks).
    pub fn len(&self) -> usize {
        self.0.mapping.len()
    }
    /// The most bytes the region can grow to in place: its length plus the
    /// address space reserved after it ([`MapSpec::reserve`]).
    pub fn capacity(&self) -> usize {
        self.0.mapping.span()
    }
    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Offset of the region in its segment.
    pub fn segment_offset(&self) -> u64 {
        self.0.offset
    }
    /// The segment the region maps.
    pub fn segment(&self) -> Segment {
        Segment(self.0.segment.clone())
    }
    /// How the region was mapped.
    pub fn copy_mode(&self) -> CopyMode {
        self.0.copy
    }
    /// Uncommitted transactions with ranges in this region.
    pub fn active_transactions(&self) -> usize {
        self.0.active_txs.load(Ordering::Acquire)
    }
    /// Copies bytes out of the region (a convenience for inspection and
    /// tests; `off + dst.len()` must lie inside the region, else `None`).
    ///
    /// # Safety
    ///
    /// No other thread may store into `[addr() + off, + dst.len())` while
    /// this runs (a transaction's stores, or a heap's, into those bytes
    /// would be a data race): hold the application's lock for that data,
    /// as for any read of it. The segment file must not be truncated by
    /// another process while an on-demand region is mapped (pages not read
    /// in yet would raise `SIGBUS`; see [`crate::Rvm::map`]).
    pub unsafe fn read(&self, off: usize, dst: &mut [u8]) -> Option<()> {
        let end = off.checked_add(dst.len())?;
        if end > self.len() {
            return None;
        }
        // SAFETY: the range is inside this live mapping (checked above; the
        // handle keeps the mapping alive); the caller excludes concurrent
        // writers (this function's contract).
        unsafe { crate::mem::copy_from(self.addr() + off, dst) };
        Some(())
    }

    /// Claims the region for a component that relies on it staying mapped
    /// (the loader claims every region of a loaded segment, a heap its
    /// regions): while the claim lives, [`crate::Rvm::unmap`] refuses the
    /// region ([`crate::MapError::Claimed`]), and only the claim's holder
    /// unmaps it ([`crate::Rvm::unmap_claimed`]). A region has at most one
    /// claim; dropping the claim ends it.
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
    /// let region = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
    /// let claim = region.claim().unwrap();
    /// assert!(matches!(rvm.unmap(region.clone()), Err(Error::Map(MapError::Claimed { .. }))));
    /// assert!(region.claim().is_err());
    /// rvm.unmap_claimed(claim).unwrap();
    /// ```
    pub fn claim(&self) -> crate::Result<RegionClaim> {
        if self.0.claimed.swap(true, Ordering::AcqRel) {
            return Err(crate::MapError::Claimed { addr: self.addr() }.into());
        }
        Ok(RegionClaim { region: Some(self.clone()) })
    }
}

/// The exclusive right to unmap a region ([`Region::claim`]); not `Clone`.
#[derive(Debug)]
pub struct RegionClaim {
    /// `None` only after [`RegionClaim::release`].
    region: Option<Region>,
}

impl RegionClaim {
    /// The claimed region.
    pub fn region(&self) -> &Region {
        // Only `release` (which consumes the claim) takes it out.
        self.region.as_ref().unwrap_or_else(|| unreachable!("a claim holds its region until released"))
    }

    /// Ends the claim and returns the region.
    pub fn release(mut self) -> Region {
        let region = self.region.take().unwrap_or_else(|| unreachable!("a claim holds its region until released"));
        region.0.claimed.store(false, Ordering::Release);
        region
    }
}

impl Drop for RegionClaim {
    fn drop(&mut self) {
        if let Some(r) = &self.region {
            r.0.claimed.store(false, Ordering::Release);
        }
    }
}

/// Regions by start address, for address lookups.
#[derive(Debug, Default)]
pub(crate) struct RegionTable {
    by_addr: BTreeMap<usize, Arc<RegionInner>>,
}

impl RegionTable {
    /// The region containing `[addr, end)`, if one does.
    pub fn find(&self, addr: usize, end: usize) -> Option<&Arc<RegionInner>> {
        let (_, r) = self.by_addr.range(..=addr).next_back()?;
        r.contains(addr, end).then_some(r)
    }
    pub fn insert(&mut self, r: Arc<RegionInner>) {
        self.by_addr.insert(r.addr(), r);
    }
    pub fn remove(&mut self, addr: usize) -> Option<Arc<RegionInner>> {
        self.by_addr.remove(&addr)
    }
    pub fn get(&self, addr: usize) -> Option<&Arc<RegionInner>> {
        self.by_addr.get(&addr)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<RegionInner>> {
        self.by_addr.values()
    }
}

/// Maps `[mapping.len(), new_len)` of a region at segment offset `offset`
/// into the mapping's reservation, with the region's copy mode.
pub(crate) fn grow_mapping(
    seg: &SegmentInner,
    mapping: &Mapping,
    copy: CopyMode,
    offset: u64,
    new_len: usize,
) -> crate::Result<()> {
    let old = mapping.len();
    if new_len <= old {
        return Ok(());
    }
    let at = offset + old as u64;
    match copy {
        CopyMode::OnDemand => {
            let fd = seg.dev.raw_fd().ok_or(crate::MapError::System {
                addr: mapping.addr() + old,
                len: new_len - old,
                errno: "device has no file descriptor".into(),
            })?;
            mapping.grow_file_private(fd, at, new_len)?;
        }
        CopyMode::OnMap => mapping
            .grow_anonymous(new_len, |dst| {
                for (i, chunk) in dst.chunks_mut(8 << 20).enumerate() {
                    seg.dev.read_at(chunk, at + (i * (8 << 20)) as u64)?;
                }
                Ok(())
            })?
            .map_err(|e| crate::Error::io("reading segment", &seg.name, e))?,
        CopyMode::NoCopy => {
            mapping.grow_anonymous(new_len, |_| Ok(()))?.map_err(|e| crate::Error::io("mapping", &seg.name, e))?
        }
    }
    Ok(())
}

impl crate::Rvm {
    /// Extends the segment's device to `new_len` bytes (a no-op if it is
    /// that long already; segments never shrink here): the new bytes read
    /// as zeros, their disk blocks are allocated where the device supports
    /// it ([`Storage::allocate`]: a full disk is reported now, as an I/O
    /// error of kind [`std::io::ErrorKind::StorageFull`], not at a later
    /// write), and the new length is synced before this returns. A crash
    /// leaves the old or the new length; nothing in the segment refers to
    /// the new bytes until the caller commits something that does. A
    /// handle kept after [`crate::Rvm::close_segment`] or
    /// [`crate::Rvm::delete_segment`] is refused
    /// ([`crate::MapError::SegmentClosed`]), the file untouched.
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
    /// rvm.extend_segment(&seg, 3 * 4096).unwrap();
    /// assert_eq!(seg.len(), 3 * 4096);
    /// assert_eq!(std::fs::metadata(dir.path().join("seg")).unwrap().len(), 3 * 4096);
    /// ```
    pub fn extend_segment(&self, segment: &Segment, new_len: u64) -> crate::Result<()> {
        self.inner.check_process()?;
        let seg = &segment.0;
        if seg.instance != self.inner.id {
            return Err(crate::MapError::ForeignSegment { segment: seg.name.clone() }.into());
        }
        let _serial = seg.resize.lock();
        // A handle kept after `close_segment` (or `delete_segment`) names a
        // file the instance no longer has open: not one to change.
        if seg.closed.load(Ordering::Acquire) {
            return Err(crate::MapError::SegmentClosed { segment: seg.name.clone() }.into());
        }
        let old = seg.len();
        if new_len <= old {
            return Ok(());
        }
        let fail = |op, e| crate::Error::io(op, &seg.name, e);
        seg.dev.set_len(new_len).map_err(|e| fail("extending segment", e))?;
        if let Err(e) = seg.dev.allocate(old, new_len - old) {
            // Give the space back (best effort): the caller sees the old size.
            let _ = seg.dev.set_len(old);
            return Err(fail("allocating segment space", e));
        }
        seg.dev.sync().map_err(|e| fail("syncing segment", e))?;
        seg.len.store(new_len, Ordering::Release);
        Ok(())
    }

    /// Grows a region in place to `new_len` bytes (a page multiple; a no-op
    /// if it is that long already): the segment bytes that follow it are
    /// mapped at the addresses that follow it, inside the address space it
    /// reserved when it was mapped ([`MapSpec::reserve`]; past it:
    /// [`crate::MapError::BeyondReservation`]). The segment must hold them
    /// ([`crate::Rvm::extend_segment`] first), and no other region may map
    /// them. Nothing moves: addresses in the region stay valid, and other
    /// threads may read and run transactions in the region meanwhile.
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
    /// let region = rvm.map(&seg, MapSpec::new(0, 4096).reserve(1 << 20)).unwrap();
    /// let start = region.addr();
    /// rvm.extend_segment(&seg, 2 * 4096).unwrap();
    /// rvm.grow_region(&region, 2 * 4096).unwrap();
    /// assert_eq!((region.addr(), region.len(), region.capacity()), (start, 2 * 4096, 1 << 20));
    /// let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    /// // SAFETY: this thread alone uses the region.
    /// unsafe { tx.modify_bytes(start + 4096, b"grown").unwrap() };
    /// tx.commit(CommitMode::Flush).unwrap();
    /// ```
    pub fn grow_region(&self, region: &Region, new_len: usize) -> crate::Result<()> {
        self.inner.check_process()?;
        let r = &region.0;
        let seg = &r.segment;
        if seg.instance != self.inner.id {
            return Err(crate::MapError::ForeignSegment { segment: seg.name.clone() }.into());
        }
        let ps = crate::mem::page_size();
        if !new_len.is_multiple_of(ps) {
            return Err(crate::MapError::NotPageAligned {
                what: "region length",
                value: new_len as u64,
                page_size: ps,
            }
            .into());
        }
        if new_len <= r.mapping.len() {
            return Ok(());
        }
        if r.tracked.get().is_some() {
            // Its tracking (read-only pages and a fault hook, or kernel
            // write-protect and shadows) covers the length it had.
            return Err(crate::MapError::TrackedGrowth { addr: r.addr() }.into());
        }
        if new_len > r.mapping.span() {
            return Err(crate::MapError::BeyondReservation {
                addr: r.addr(),
                len: new_len,
                capacity: r.mapping.span(),
            }
            .into());
        }
        let end = r.offset.checked_add(new_len as u64).filter(|&e| e <= seg.len()).ok_or_else(|| {
            crate::MapError::OutsideSegment {
                segment: seg.name.clone(),
                offset: r.offset,
                len: new_len as u64,
                segment_len: seg.len(),
            }
        })?;
        let old_end = r.offset + r.mapping.len() as u64;
        // Instant recovery: the new range shows the segment's pages up to
        // date (and the region's own get their normal protection back).
        self.inner.settle_segment(seg)?;
        // Unapplied log records for the new range exist only if it was
        // mapped before in this instance: the segment must show them first.
        if seg.mapped_end.load(Ordering::Acquire) > old_end && seg.last_tx.load(Ordering::Acquire) > 0 {
            self.inner.replay_all()?;
        }
        // Truncation held off while the contents are read in; taken before
        // the segment's range list, in the order a region dropped under a
        // truncation takes them.
        let _t = self.inner.truncation.lock();
        let mut mapped = seg.mapped.lock();
        if mapped.iter().any(|&(s, e)| s != r.offset && old_end < e && s < end) {
            return Err(crate::MapError::AlreadyMapped {
                segment: seg.name.clone(),
                offset: old_end,
                len: end - old_end,
            }
            .into());
        }
        grow_mapping(seg, &r.mapping, r.copy, r.offset, new_len)?;
        for m in mapped.iter_mut().filter(|m| m.0 == r.offset) {
            m.1 = end;
        }
        seg.mapped_end.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }
}
