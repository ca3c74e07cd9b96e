//! A heap in its own segment, created and loaded through the loader in one
//! call.
//!
//! The segment's load map has two regions at fixed bases:
//! [`STATIC_REGION`] (header, counters, roots: one page by default) and
//! [`HEAP_REGION`] (the blocks). Loading maps both at the addresses recorded
//! in the segment, so absolute pointers stored in the heap stay valid across
//! restarts and crashes.

use crate::error::{HeapError, Result};
use crate::heap::Heap;
use rvm_core::{CopyMode, Rvm};
use rvm_loader::{create_segment, load_segment, LoadMap, LoadedSegment, RegionSpec};
use std::path::Path;

/// Load-map name of the static region (header, counters and root slots).
pub const STATIC_REGION: &str = "heap.static";
/// Load-map name of the heap region (the blocks).
pub const HEAP_REGION: &str = "heap";

/// Where a new heap goes and how large it is (see
/// [`PersistentHeap::create`]).
///
/// ```
/// let spec = rvm_heap::HeapSpec::new(0x5b00_0000_0000, 64 << 20);
/// assert_eq!(spec.heap_base(), 0x5b00_0000_0000 + 4096);
/// assert_eq!(spec.max_len(), rvm_heap::DEFAULT_MAX_HEAP_LEN); // grows by default
/// assert_eq!(rvm_heap::HeapSpec::fixed(0x5b00_0000_0000, 64 << 20).max_len(), 64 << 20);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapSpec {
    base: u64,
    heap_len: u64,
    static_len: u64,
    heap_base: Option<u64>,
    copy: CopyMode,
    max_len: u64,
}

/// `len` rounded up to whole pages; the largest page multiple if that
/// overflows (a length no address space holds, refused when the heap is
/// made, as any length beyond the user address space is).
fn whole_pages(len: u64) -> u64 {
    let page = rvm_core::page_size() as u64;
    len.checked_next_multiple_of(page).unwrap_or(u64::MAX / page * page)
}

impl HeapSpec {
    /// A heap of `heap_len` bytes (rounded up to whole pages) whose static
    /// region is mapped at `base` (page-aligned) and whose heap region
    /// follows it directly. It grows in place when it fills, up to
    /// [`crate::DEFAULT_MAX_HEAP_LEN`] (64 GiB; see
    /// [`HeapSpec::with_max_len`]): loading it reserves that much address
    /// space from the heap region's base (no memory or swap), so nothing
    /// else should be placed there. [`HeapSpec::fixed`] makes a heap that
    /// never grows (for heaps packed at fixed bases close together).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use rvm_core::{create_log, CommitMode, Options, RestoreMode, Rvm};
    /// use rvm_heap::{HeapSpec, PersistentHeap};
    /// use std::alloc::Layout;
    /// create_log(dir.path().join("log"), 8 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &HeapSpec::new(0x5b60_0000_0000, 64 << 10)).unwrap();
    /// let mut tx = heap.begin(RestoreMode::Restore).unwrap();
    /// tx.malloc(Layout::from_size_align(1 << 20, 8).unwrap()).unwrap(); // more than the heap holds: it grows
    /// tx.commit(CommitMode::Flush).unwrap();
    /// assert!(heap.stats().heap_bytes > 1 << 20);
    /// heap.check().unwrap();
    /// ```
    pub fn new(base: u64, heap_len: u64) -> HeapSpec {
        HeapSpec::fixed(base, heap_len).with_max_len(crate::DEFAULT_MAX_HEAP_LEN)
    }

    /// [`HeapSpec::new`] for a heap that never grows: no address space is
    /// reserved beyond it, and an allocation that finds no room fails with
    /// [`HeapError::OutOfMemory`].
    pub fn fixed(base: u64, heap_len: u64) -> HeapSpec {
        let page = rvm_core::page_size() as u64;
        HeapSpec {
            base,
            heap_len: whole_pages(heap_len),
            static_len: page,
            heap_base: None,
            copy: CopyMode::OnDemand,
            max_len: 0,
        }
    }

    /// The same as [`HeapSpec::new`] (kept for code written when `new`
    /// made heaps that never grow).
    pub fn growable(base: u64, heap_len: u64) -> HeapSpec {
        HeapSpec::new(base, heap_len)
    }

    /// Lets the heap grow in place up to `max_len` bytes (rounded up to
    /// whole pages; a value below the heap's length means no growth, as
    /// [`HeapSpec::fixed`] makes). The maximum is recorded in the segment's load map;
    /// at load the address range `[heap base, heap base + max_len)` is
    /// reserved (`PROT_NONE`, `MAP_NORESERVE`, never over an existing
    /// mapping: if something is there already, the heap loads at its size
    /// and a growth reports [`HeapError::AddressRangeTaken`]).
    pub fn with_max_len(mut self, max_len: u64) -> HeapSpec {
        self.max_len = whole_pages(max_len);
        self
    }

    /// The most the heap may grow to (its length if it does not grow).
    pub fn max_len(&self) -> u64 {
        self.max_len.max(self.heap_len)
    }

    /// Sets the static region's length (rounded up to whole pages; default
    /// one page, which holds 62 roots; each 64 bytes more hold one more).
    pub fn with_static_len(mut self, len: u64) -> HeapSpec {
        self.static_len = whole_pages(len.max(1));
        self
    }

    /// Maps the heap region at `addr` instead of right after the static
    /// region.
    pub fn with_heap_base(mut self, addr: u64) -> HeapSpec {
        self.heap_base = Some(addr);
        self
    }

    /// How the heap region is mapped at load (default
    /// [`CopyMode::OnDemand`]: pages come in as they are touched).
    pub fn with_copy(mut self, copy: CopyMode) -> HeapSpec {
        self.copy = copy;
        self
    }

    /// The static region's address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The heap region's address.
    pub fn heap_base(&self) -> u64 {
        self.heap_base.unwrap_or(self.base.wrapping_add(self.static_len))
    }

    /// The heap region's length.
    pub fn heap_len(&self) -> u64 {
        self.heap_len
    }

    /// The load map of the heap's segment.
    pub fn load_map(&self) -> LoadMap {
        let map = LoadMap::new();
        let first = map.header_len();
        map.region(RegionSpec::new(STATIC_REGION, first, self.static_len, self.base)).region(
            RegionSpec::new(HEAP_REGION, first.saturating_add(self.static_len), self.heap_len, self.heap_base())
                .copy(self.copy)
                .max_len(self.max_len),
        )
    }

    /// The segment's length: the load map's header, the static region and
    /// the heap region.
    pub fn segment_len(&self) -> u64 {
        self.load_map().min_device_len()
    }
}

/// A heap in its own segment, loaded at its fixed addresses: dereferences
/// to the [`Heap`]. Dropping it unloads the segment (commit or abort every
/// transaction first; pointers into the heap dangle afterwards).
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// use rvm_core::{create_log, CommitMode, Options, RestoreMode, Rvm};
/// use rvm_heap::{HeapSpec, PersistentHeap};
/// use std::alloc::Layout;
///
/// let base = 0x5b40_0000_0000u64;
/// create_log(dir.path().join("log"), 1 << 20).unwrap();
/// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
/// let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &HeapSpec::new(base, 1 << 20)).unwrap();
/// let mut tx = heap.begin(RestoreMode::Restore).unwrap();
/// let p = tx.malloc(Layout::new::<u64>()).unwrap();
/// // SAFETY: the block is this transaction's alone.
/// unsafe { tx.write(p, &7u64.to_le_bytes()).unwrap() };
/// tx.set_root("seven", Some((p, 8, 1))).unwrap();
/// tx.commit(CommitMode::Flush).unwrap();
/// drop(heap);
///
/// // Another run: one call maps both regions where they were and checks the heap.
/// let heap = PersistentHeap::open(&rvm, dir.path().join("heap")).unwrap();
/// let root = heap.root("seven").unwrap();
/// assert_eq!(root.ptr, p);
/// // SAFETY: a live block of 8 bytes, written by a committed transaction.
/// assert_eq!(unsafe { root.ptr.cast::<u64>().as_ptr().read() }, 7);
/// ```
#[derive(Debug)]
pub struct PersistentHeap {
    // Declared first: dropped before the segment unmaps its regions.
    heap: Heap,
    segment: LoadedSegment,
}

impl PersistentHeap {
    /// Creates the segment file `path` (it must not exist) with the load map
    /// of `spec`, loads it, and formats the heap in it. When this returns
    /// `Ok` the heap is durable. Should a step after the file's creation
    /// fail (the heap's first transaction too large for the log, say), the
    /// segment is deleted again ([`Rvm::delete_segment`]) and the
    /// error returned: the same path can be used at once.
    ///
    /// A crash during creation leaves a segment that [`PersistentHeap::open`]
    /// rejects (blank load map, or a load map with a blank heap header),
    /// never a half-formatted heap that passes for a good one; remove the
    /// file and create it again.
    pub fn create(rvm: &Rvm, path: impl AsRef<Path>, spec: &HeapSpec) -> Result<PersistentHeap> {
        let map = spec.load_map();
        create_segment(rvm, path.as_ref(), map.min_device_len(), &map)?;
        let made = (|| {
            let segment = load_segment(rvm, path.as_ref())?;
            let (s, h) = regions(&segment)?;
            let mut heap = Heap::format(rvm, s, h)?;
            if let Some(growth) = segment.region_growth(HEAP_REGION) {
                heap.set_growth(growth);
            }
            Ok(PersistentHeap { heap, segment })
        })();
        if made.is_err() {
            // No half-made heap is left behind (the segment was unloaded
            // when the closure returned; best effort, as in
            // `create_segment`).
            let _ = rvm.open_segment(path.as_ref()).and_then(|seg| rvm.delete_segment(seg));
        }
        made
    }

    /// Loads the heap of segment `path`: one call that maps its regions at
    /// their bases (recovery has already run when `rvm` was opened) and
    /// checks and indexes the heap ([`Heap::load`]). A heap that fails its
    /// check is reported ([`HeapError::Corrupted`]) and its segment unloaded.
    pub fn open(rvm: &Rvm, path: impl AsRef<Path>) -> Result<PersistentHeap> {
        PersistentHeap::from_segment(load_segment(rvm, path.as_ref())?)
    }

    /// Loads the heap of a segment loaded already.
    pub fn from_segment(segment: LoadedSegment) -> Result<PersistentHeap> {
        let (s, h) = regions(&segment)?;
        let mut heap = Heap::load(segment.rvm(), s, h)?;
        if let Some(growth) = segment.region_growth(HEAP_REGION) {
            heap.set_growth(growth);
        }
        Ok(PersistentHeap { heap, segment })
    }

    /// The heap.
    pub fn heap(&self) -> &Heap {
        &self.heap
    }

    /// The loaded segment.
    pub fn segment(&self) -> &LoadedSegment {
        &self.segment
    }

    /// Unloads the segment, reporting errors that dropping would swallow
    /// (a transaction still open on the heap: [`rvm_loader::LoaderError::Busy`]).
    pub fn close(self) -> Result<()> {
        let PersistentHeap { heap, mut segment } = self;
        drop(heap);
        segment.unload()?;
        Ok(())
    }
}

impl std::ops::Deref for PersistentHeap {
    type Target = Heap;
    fn deref(&self) -> &Heap {
        &self.heap
    }
}

fn regions(segment: &LoadedSegment) -> Result<(rvm_core::Region, rvm_core::Region)> {
    let find = |name: &str| {
        segment.region(name).cloned().ok_or_else(|| HeapError::BadRegions {
            reason: format!("segment {} has no region named {name:?}: not a heap segment", segment.path().display()),
        })
    };
    Ok((find(STATIC_REGION)?, find(HEAP_REGION)?))
}
