//! The heap: allocation state, transactions, roots, check, statistics.
//!
//! # How concurrent transactions never tangle
//!
//! Persistent allocator metadata is the block headers and tail guards, the
//! counters and the root slots. They are written **only at commit**, under the heap lock, into
//! the committing transaction, and the core commit (which copies the new
//! values) happens before the lock is released. So no transaction ever holds
//! an uncommitted change to heap metadata while another runs: an abort has
//! nothing of the heap's to restore, and cannot clobber anyone.
//!
//! Between `malloc` and commit, the block is only *reserved* in volatile
//! state ([`Avail`]); its header and tail guard are written at commit, computed against the
//! committed layout at that moment (a mirror of the committed free blocks is
//! kept in memory). `free` is deferred to commit (RDS's rule): an abort never
//! loses a block, and an allocation of an aborted transaction returns to the
//! free space. A reserved block goes back to the free space only **after**
//! its transaction has ended (committed, or aborted with its ranges
//! restored), even when the transaction frees it itself: otherwise another
//! transaction could reuse the memory while this one still has ranges
//! declared in it, and this one's restore-mode abort would overwrite the
//! other's data. The full argument is in `docs/DESIGN.md`, section 7.3.

mod grow;

pub use grow::{GrowthPolicy, DEFAULT_MAX_HEAP_LEN};

use crate::avail::Avail;
use crate::error::{HeapError, Result};
use crate::layout::{
    self, BlockHeader, Counters, HeaderError, RootSlot, StaticHeader, COUNTERS_AT, COUNTERS_LEN, HDR, HEADER_LEN,
    MIN_BLOCK, ROOT_NAME_MAX, ROOT_SLOT, STATIC_FIXED, TAIL_GUARD,
};
use crate::raw;
use parking_lot::Mutex;
use rvm_core::{CommitMode, Region, RestoreMode, Rvm, Transaction};
use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::NonNull;
use std::rc::{Rc, Weak};

/// Root slots of a heap whose static region is one 4 KiB page (what
/// [`crate::PersistentHeap::create`] makes by default).
pub const DEFAULT_ROOT_SLOTS: u32 = ((4096 - STATIC_FIXED) / ROOT_SLOT) as u32;
/// Most root slots a heap has, however large its static region (the slots
/// are read at load).
pub const MAX_ROOT_SLOTS: u32 = 1 << 16;
/// Size-class boundaries for per-class statistics (block sizes up to and
/// including each bound; the last class holds everything larger).
pub const CLASS_BOUNDS: [u64; 9] = [32, 64, 128, 256, 512, 1024, 2048, 4096, u64::MAX];

/// Heap statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeapStats {
    /// Committed allocations over the heap's lifetime (persistent).
    pub allocations: u64,
    /// Committed frees over the heap's lifetime (persistent).
    pub frees: u64,
    /// Live (committed, allocated) blocks.
    pub live_blocks: u64,
    /// Bytes in live blocks (headers, guards and slack included).
    pub bytes_in_use: u64,
    /// Free bytes available to new allocations (not counting blocks that
    /// transactions in flight have reserved).
    pub free_bytes: u64,
    /// Largest free block or extent available.
    pub largest_free: u64,
    /// Live blocks per size class ([`CLASS_BOUNDS`]).
    pub live_per_class: [u64; 9],
    /// Free blocks waiting in the small-block size classes, per class
    /// ([`CLASS_BOUNDS`]).
    pub quick_per_class: [u64; 9],
    /// Free extents in the volatile index (a measure of fragmentation).
    pub free_extents: u64,
    /// Bytes reserved by transactions in flight.
    pub reserved_bytes: u64,
    /// Heap region size.
    pub heap_bytes: u64,
    /// The size the heap may grow to ([`Heap::max_len`]).
    pub max_heap_bytes: u64,
}

/// What a full heap check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Blocks walked.
    pub blocks: u64,
    /// Allocated blocks.
    pub allocated: u64,
    /// Free blocks.
    pub free: u64,
    /// Bytes in allocated blocks.
    pub allocated_bytes: u64,
    /// Bytes in free blocks.
    pub free_bytes: u64,
    /// Largest free block.
    pub largest_free: u64,
    /// Roots in use.
    pub roots: u64,
    /// Roots whose block is not allocated (the application freed a rooted
    /// block without removing the root). Not heap damage, so not an error.
    pub dangling_roots: Vec<String>,
}

/// A named persistent root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// Its name.
    pub name: String,
    /// The block's user data.
    pub ptr: NonNull<u8>,
    /// Bytes the root was created with.
    pub size: u64,
    /// The caller's type tag.
    pub type_tag: u64,
}

/// Block offsets are distinct multiples of 16: a multiplicative hash is
/// enough and much cheaper than SipHash on the allocation path.
#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type OffsetBuild = BuildHasherDefault<OffsetHasher>;

#[derive(Debug)]
struct State {
    avail: Avail,
    /// The committed layout's free blocks (offset → size).
    committed_free: BTreeMap<u64, u64>,
    /// Committed blocks freed by transactions in flight.
    pending_frees: HashSet<u64, OffsetBuild>,
    /// Bytes reserved by transactions in flight.
    reserved: u64,
    /// The persistent counters as committed.
    counters: Counters,
    live_per_class: [u64; 9],
    /// Root name → slot, and the unused slots (lowest first).
    roots: HashMap<String, usize>,
    free_slots: BTreeSet<usize>,
}

/// A recoverable heap on two mapped regions: a static one (header,
/// counters and roots) and the heap proper.
///
/// [`Heap::format`] and [`Heap::load`] work on regions the caller mapped;
/// [`crate::PersistentHeap`] creates and loads a heap's segment through the
/// loader in one call.
pub struct Heap {
    /// The heap's entry among live heaps ([`crate::TrackedAlloc`]); first,
    /// so it goes before the rest of the heap.
    _live: crate::tracked_alloc::LiveHeap,
    /// Identifies the heap in the per-thread registry of open heap
    /// transactions (never reused within a process).
    id: u64,
    rvm: Rvm,
    static_region: Region,
    heap_region: Region,
    /// Claims on the regions, where nobody (such as the loader) held one
    /// already: nobody else can unmap them under the heap.
    _claims: [Option<rvm_core::RegionClaim>; 2],
    /// This heap's hold on its regions (no other heap value may use them).
    _held: HeldRegions,
    header: StaticHeader,
    /// The heap region's committed length (`header.heap_len` at load; grows
    /// with [`Heap::grow`], stored while the heap lock is held, after the
    /// new space is mapped and committed).
    len: std::sync::atomic::AtomicU64,
    /// How the heap region grows in place, for a heap loaded through the
    /// loader from a segment whose map lets it grow.
    growth: Option<rvm_loader::RegionGrowth>,
    /// The heap region's maximum length (0 without `growth`).
    max: std::sync::atomic::AtomicU64,
    /// The growth policy; held while a growth runs (serializes growths).
    policy: Mutex<GrowthPolicy>,
    state: Mutex<State>,
}

/// Where the heap is and how large (not the allocator's free lists and
/// counters: [`Heap::stats`] has those). Takes no lock, so it prints inside
/// a transaction too.
impl std::fmt::Debug for Heap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Acquire;
        f.debug_struct("Heap")
            .field("heap_region", &self.heap_region)
            .field("static_region", &format_args!("{:#x}", self.static_region.addr()))
            .field("len", &self.len.load(Acquire))
            .field("max", &self.max.load(Acquire))
            .field("root_slots", &self.header.root_slots)
            .field("rvm", &self.rvm)
            .finish_non_exhaustive()
    }
}

static NEXT_HEAP_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The addresses of the regions that live heaps of this process use. A
/// region's address names it while a heap holds it: the heap keeps a handle
/// to the region, so it stays mapped and nothing else can be mapped there.
static HELD_REGIONS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// A heap's hold on its two regions: while it lives, [`Heap::format`] and
/// [`Heap::load`] refuse them to any other heap ([`HeapError::RegionInUse`]).
#[derive(Debug)]
struct HeldRegions([usize; 2]);

impl HeldRegions {
    fn take(static_region: &Region, heap_region: &Region) -> Result<HeldRegions> {
        let pair = [static_region.addr(), heap_region.addr()];
        if pair[0] == pair[1] {
            return Err(HeapError::RegionInUse { addr: pair[0] });
        }
        let mut held = HELD_REGIONS.lock();
        if let Some(&addr) = pair.iter().find(|a| held.contains(a)) {
            return Err(HeapError::RegionInUse { addr });
        }
        held.extend_from_slice(&pair);
        Ok(HeldRegions(pair))
    }
}

impl Drop for HeldRegions {
    fn drop(&mut self) {
        HELD_REGIONS.lock().retain(|a| !self.0.contains(a));
    }
}

fn class_of(size: u64) -> usize {
    CLASS_BOUNDS.iter().position(|&b| size <= b).unwrap_or(CLASS_BOUNDS.len() - 1)
}

#[derive(Clone, Copy, Debug)]
struct Walked {
    off: u64,
    header: BlockHeader,
}

impl Heap {
    /// Formats a new heap on the two regions (in one flush transaction):
    /// writes the header, zero counters, empty roots (as many slots as the
    /// static region holds, up to [`MAX_ROOT_SLOTS`]), and one free block
    /// covering the heap region. Whatever the regions held is lost.
    ///
    /// Regions a live heap of this process uses (or one region given as
    /// both) are refused with [`HeapError::RegionInUse`], before anything
    /// is written.
    pub fn format(rvm: &Rvm, static_region: Region, heap_region: Region) -> Result<Heap> {
        let held = HeldRegions::take(&static_region, &heap_region)?;
        let slots = (static_region.len().saturating_sub(STATIC_FIXED) / ROOT_SLOT).min(MAX_ROOT_SLOTS as usize);
        if slots == 0 {
            return Err(HeapError::BadRegions {
                reason: format!(
                    "static region of {} bytes is too small (at least {} bytes)",
                    static_region.len(),
                    STATIC_FIXED + ROOT_SLOT
                ),
            });
        }
        let len = heap_region.len() as u64;
        if len < MIN_BLOCK || !len.is_multiple_of(HDR) || !heap_region.addr().is_multiple_of(HDR as usize) {
            return Err(HeapError::BadRegions {
                reason: "heap region must be 16-aligned and at least 32 bytes".into(),
            });
        }
        let nonce = {
            let t =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            t ^ (heap_region.addr() as u64).rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15
        };
        let header = StaticHeader {
            root_slots: slots as u32,
            heap_addr: heap_region.addr() as u64,
            heap_len: len,
            static_addr: static_region.addr() as u64,
            nonce,
        };
        let mut tx = rvm.begin(RestoreMode::NoRestore)?;
        raw::store(&mut tx, static_region.addr(), &header.encode())?;
        let mut rest = Vec::with_capacity(STATIC_FIXED - HEADER_LEN + slots * ROOT_SLOT);
        rest.extend_from_slice(&Counters::default().encode(nonce));
        for i in 0..slots {
            rest.extend_from_slice(&RootSlot::encode(None, nonce, i as u32));
        }
        raw::store(&mut tx, static_region.addr() + HEADER_LEN, &rest)?;
        let first = BlockHeader { size: len, allocated: false, slack: 0 };
        raw::store(&mut tx, heap_region.addr(), &first.encode(nonce, 0))?;
        tx.commit(CommitMode::Flush)?;
        Heap::load_held(rvm, static_region, heap_region, held)
    }

    /// Loads a heap from its regions: checks the header, walks every block
    /// (checking each header, tail guard and the tiling), checks the
    /// persistent counters against the blocks and the root slots, and
    /// rebuilds the volatile indexes. A heap that fails is reported as
    /// [`HeapError::Corrupted`], never used.
    ///
    /// One heap value per pair of regions: regions a live heap of this
    /// process uses are refused with [`HeapError::RegionInUse`] (two heap
    /// values on the same memory would hand out the same blocks).
    pub fn load(rvm: &Rvm, static_region: Region, heap_region: Region) -> Result<Heap> {
        let held = HeldRegions::take(&static_region, &heap_region)?;
        Heap::load_held(rvm, static_region, heap_region, held)
    }

    fn load_held(rvm: &Rvm, static_region: Region, heap_region: Region, held: HeldRegions) -> Result<Heap> {
        let mut fixed = [0u8; HEADER_LEN];
        raw::read_metadata(&static_region, 0, &mut fixed)
            .ok_or_else(|| HeapError::BadRegions { reason: "static region too small".into() })?;
        let header = StaticHeader::decode(&fixed).map_err(|e| match e {
            HeaderError::Corrupted(why) => {
                HeapError::corrupted(format!("heap header ({why})"), "static region offset 0")
            }
            HeaderError::Version(found) => HeapError::UnsupportedVersion { found, supported: layout::VERSION },
        })?;
        if header.heap_addr != heap_region.addr() as u64 || header.heap_len != heap_region.len() as u64 {
            return Err(HeapError::corrupted(
                format!(
                    "heap header (it places the heap at {:#x}, {} bytes; the region mapped is at {:#x}, {} bytes)",
                    header.heap_addr,
                    header.heap_len,
                    heap_region.addr(),
                    heap_region.len()
                ),
                "static region offset 16",
            ));
        }
        if header.static_addr != static_region.addr() as u64
            || header.root_slots == 0
            || header.root_slots > MAX_ROOT_SLOTS
            || STATIC_FIXED + header.root_slots as usize * ROOT_SLOT > static_region.len()
            || header.heap_len < MIN_BLOCK
            || !header.heap_len.is_multiple_of(HDR)
        {
            return Err(HeapError::corrupted(
                "heap header (static region address, root slot count or heap length out of range)",
                "static region offset 12",
            ));
        }
        let counters = read_counters(&static_region, header.nonce)?;
        let id = NEXT_HEAP_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let heap = Heap {
            _live: crate::tracked_alloc::LiveHeap::new(id),
            id,
            rvm: rvm.clone(),
            _claims: [static_region.claim().ok(), heap_region.claim().ok()],
            _held: held,
            static_region,
            heap_region,
            header,
            len: std::sync::atomic::AtomicU64::new(header.heap_len),
            growth: None,
            max: std::sync::atomic::AtomicU64::new(0),
            policy: Mutex::new(GrowthPolicy::default()),
            state: Mutex::new(State {
                avail: Avail::new(bin_limit(header.heap_len)),
                committed_free: BTreeMap::new(),
                pending_frees: HashSet::default(),
                reserved: 0,
                counters,
                live_per_class: [0; 9],
                roots: HashMap::new(),
                free_slots: BTreeSet::new(),
            }),
        };
        let mut st = heap.state.lock();
        let (mut live, mut live_bytes) = (0u64, 0u64);
        {
            let State { avail, committed_free, live_per_class, .. } = &mut *st;
            // Free blocks come in address order and never adjacent (the
            // walk checks it): both indexes are bulk-built from the list.
            let mut free = Vec::new();
            heap.walk(|b| {
                if b.header.allocated {
                    live += 1;
                    live_bytes += b.header.size;
                    live_per_class[class_of(b.header.size)] += 1;
                } else {
                    free.push((b.off, b.header.size));
                }
            })?;
            *committed_free = free.iter().copied().collect();
            avail.fill_sorted(&free);
        }
        if live != counters.live_blocks || live_bytes != counters.live_bytes {
            return Err(HeapError::corrupted(
                format!(
                    "heap counters ({} live blocks of {} bytes recorded, {live} of {live_bytes} found)",
                    counters.live_blocks, counters.live_bytes
                ),
                format!("static region offset {COUNTERS_AT}"),
            ));
        }
        if counters.allocations.checked_sub(counters.frees) != Some(live) {
            return Err(HeapError::corrupted(
                format!(
                    "heap counters ({} allocations minus {} frees is not {live} live blocks)",
                    counters.allocations, counters.frees
                ),
                format!("static region offset {COUNTERS_AT}"),
            ));
        }
        for i in 0..header.root_slots as usize {
            match heap.read_slot(i)? {
                None => {
                    st.free_slots.insert(i);
                }
                Some(s) => {
                    if st.roots.insert(s.name.clone(), i).is_some() {
                        return Err(HeapError::corrupted(
                            format!("root table (the name {:?} is used twice)", s.name),
                            format!("static region offset {}", heap.slot_off(i)),
                        ));
                    }
                }
            }
        }
        if st.roots.len() as u64 != counters.roots {
            return Err(HeapError::corrupted(
                format!(
                    "heap counters ({} roots recorded, {} found in the root slots)",
                    counters.roots,
                    st.roots.len()
                ),
                format!("static region offset {}", COUNTERS_AT + 32),
            ));
        }
        drop(st);
        Ok(heap)
    }

    /// The instance the heap lives in.
    pub fn rvm(&self) -> &Rvm {
        &self.rvm
    }

    /// The heap region. Its length is the heap's ([`Heap::heap_len`]),
    /// except after a growth that failed past mapping its new pages: the
    /// region then shows more pages than the heap uses (the next growth
    /// uses them).
    pub fn heap_region(&self) -> &Region {
        &self.heap_region
    }

    /// The static region (header, counters and roots).
    pub fn static_region(&self) -> &Region {
        &self.static_region
    }

    /// Root slots of this heap.
    pub fn root_slots(&self) -> usize {
        self.header.root_slots as usize
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Puts the heap region in tracked mode ([`rvm_core::Rvm::track`]):
    /// from then on every heap transaction is a tracked one, whose stores
    /// into the heap need no `set_range`, and [`crate::TrackedAlloc`]
    /// allocates in it. Fails while a transaction is open on the heap.
    pub fn track(&self) -> Result<()> {
        self.rvm.track(&self.heap_region)?;
        Ok(())
    }

    /// [`Heap::track`] with a chosen [`rvm_core::TrackingMethod`]
    /// ([`rvm_core::Rvm::track_with`]; `track` takes the instance's
    /// [`rvm_core::Options::tracking`]).
    pub fn track_with(&self, method: rvm_core::TrackingMethod) -> Result<()> {
        self.rvm.track_with(&self.heap_region, method)?;
        Ok(())
    }

    pub(crate) fn base(&self) -> usize {
        self.heap_region.addr()
    }

    /// The region (heap or static) holding `[addr, addr + len)`.
    fn region_of(&self, addr: usize, len: usize) -> Option<&Region> {
        [&self.heap_region, &self.static_region]
            .into_iter()
            .find(|r| addr >= r.addr() && addr.checked_add(len).is_some_and(|e| e <= r.addr() + r.len()))
    }

    /// Puts back bytes of heap metadata after a failed commit.
    fn write_back(&self, addr: usize, bytes: &[u8]) {
        if self.region_of(addr, bytes.len()).is_none() {
            return;
        }
        // Through a no-restore transaction that is then aborted (nothing is
        // logged): the core sees the stores as a transaction's, so its
        // undeclared-store detector (`Options::verify_stores`) takes the
        // put-back bytes instead of blaming them on the next commit that
        // checks the page (a thread's commit failed that way about one run
        // in thirty of the heap's soak test). On a stopped instance, where
        // no transaction begins, the bytes are stored directly.
        if let Ok(mut tx) = self.rvm.begin(RestoreMode::NoRestore) {
            // SAFETY: inside one of the heap's live regions (checked); the
            // caller holds the heap lock, the only context that writes heap
            // metadata, and the failed transaction has ended.
            let stored = unsafe { tx.modify_bytes(addr, bytes) };
            tx.abort();
            if stored.is_ok() {
                return;
            }
        }
        // SAFETY: as above.
        unsafe { raw::write_back(addr, bytes) };
    }

    fn read_header(&self, off: u64) -> std::result::Result<BlockHeader, &'static str> {
        let mut b = [0u8; HDR as usize];
        raw::read_metadata(&self.heap_region, off as usize, &mut b).ok_or("block header outside the heap")?;
        BlockHeader::decode(&b, self.header.nonce, off, self.heap_len())
    }

    /// Walks every block in address order, checking headers, tail guards
    /// and that no two free blocks are adjacent.
    fn walk(&self, mut visit: impl FnMut(Walked)) -> Result<()> {
        let mut off = 0u64;
        let mut prev_free = false;
        let len = self.heap_len();
        while off < len {
            let h = self
                .read_header(off)
                .map_err(|why| HeapError::corrupted(format!("heap block ({why})"), format!("heap offset {off:#x}")))?;
            if h.allocated {
                let data_end = off + h.size - h.slack as u64;
                let mut g = [0u8; TAIL_GUARD as usize];
                raw::read_metadata(&self.heap_region, data_end as usize, &mut g);
                if u64::from_le_bytes(g) != layout::tail_guard(self.header.nonce, off) {
                    return Err(HeapError::corrupted(
                        format!("tail guard of the block at heap offset {off:#x} (written past its end?)"),
                        format!("heap offset {data_end:#x}"),
                    ));
                }
            } else if prev_free {
                return Err(HeapError::corrupted(
                    "heap layout (two adjacent free blocks)",
                    format!("heap offset {off:#x}"),
                ));
            }
            prev_free = !h.allocated;
            visit(Walked { off, header: h });
            off += h.size;
        }
        Ok(())
    }

    /// Full check: walks every block (header guard words, sizes, tail
    /// guards, blocks tiling the heap exactly so nothing overlaps, no two
    /// free blocks adjacent), and checks that the persistent counters, the
    /// per-class counts, the mirror of the committed free blocks, the
    /// volatile free index and the reservations of transactions in flight
    /// all agree with the blocks, and that every root slot is sound. Runs
    /// under the heap lock (commits wait). Dangling roots are reported, not
    /// errors.
    pub fn check(&self) -> Result<CheckReport> {
        let st = self.state.lock();
        let mut report = CheckReport::default();
        let mut free = Vec::new();
        let mut per_class = [0u64; 9];
        let mut allocated = HashSet::<u64, OffsetBuild>::default();
        self.walk(|b| {
            report.blocks += 1;
            if b.header.allocated {
                report.allocated += 1;
                report.allocated_bytes += b.header.size;
                per_class[class_of(b.header.size)] += 1;
                allocated.insert(b.off);
            } else {
                report.free += 1;
                report.free_bytes += b.header.size;
                report.largest_free = report.largest_free.max(b.header.size);
                free.push((b.off, b.header.size));
            }
        })?;
        let mismatch = |what: String| HeapError::corrupted(format!("heap state ({what})"), "volatile index");
        let persisted = read_counters(&self.static_region, self.header.nonce)?;
        if persisted != st.counters {
            return Err(HeapError::corrupted(
                format!("heap counters (memory holds {persisted:?}, the heap committed {:?})", st.counters),
                format!("static region offset {COUNTERS_AT}"),
            ));
        }
        if report.allocated != st.counters.live_blocks || report.allocated_bytes != st.counters.live_bytes {
            return Err(HeapError::corrupted(
                format!(
                    "heap counters ({} live blocks of {} bytes recorded, {} of {} found)",
                    st.counters.live_blocks, st.counters.live_bytes, report.allocated, report.allocated_bytes
                ),
                format!("static region offset {COUNTERS_AT}"),
            ));
        }
        if st.counters.allocations.checked_sub(st.counters.frees) != Some(report.allocated) {
            return Err(mismatch(format!(
                "{} allocations minus {} frees is not {} live blocks",
                st.counters.allocations, st.counters.frees, report.allocated
            )));
        }
        if per_class != st.live_per_class {
            return Err(mismatch(format!("live blocks per class {:?}, found {per_class:?}", st.live_per_class)));
        }
        if !free.iter().copied().eq(st.committed_free.iter().map(|(&a, &s)| (a, s))) {
            return Err(mismatch("free blocks differ from the committed layout mirror".into()));
        }
        st.avail.verify().map_err(mismatch)?;
        // Every byte available to allocation lies in a committed free block,
        // and those bytes plus the reservations are all the free space.
        for (at, size) in st.avail.all() {
            match st.committed_free.range(..=at).next_back() {
                Some((&f, &fs)) if at + size <= f + fs => {}
                _ => {
                    return Err(mismatch(format!(
                        "available space {at:#x}+{size:#x} lies outside the committed free blocks"
                    )))
                }
            }
        }
        if st.avail.free_bytes() + st.reserved != report.free_bytes {
            return Err(mismatch(format!(
                "{} bytes available and {} reserved, but {} bytes in free blocks",
                st.avail.free_bytes(),
                st.reserved,
                report.free_bytes
            )));
        }
        for &off in &st.pending_frees {
            if !allocated.contains(&off) {
                return Err(mismatch(format!("a pending free of heap offset {off:#x}, which is not a live block")));
            }
        }
        let mut used = 0;
        for i in 0..self.root_slots() {
            match self.read_slot(i)? {
                None => {
                    if !st.free_slots.contains(&i) {
                        return Err(mismatch(format!("root slot {i} is empty but indexed as used")));
                    }
                }
                Some(s) => {
                    used += 1;
                    if st.roots.get(&s.name) != Some(&i) {
                        return Err(mismatch(format!("root {:?} in slot {i} is not indexed there", s.name)));
                    }
                    if !allocated.contains(&s.off) {
                        report.dangling_roots.push(s.name);
                    }
                }
            }
        }
        if used != st.roots.len() || used + st.free_slots.len() != self.root_slots() {
            return Err(mismatch("root index and root slots disagree".into()));
        }
        if used as u64 != st.counters.roots {
            return Err(HeapError::corrupted(
                format!("heap counters ({} roots recorded, {used} found in the root slots)", st.counters.roots),
                format!("static region offset {}", COUNTERS_AT + 32),
            ));
        }
        report.roots = used as u64;
        Ok(report)
    }

    /// Every committed live block: its data address and usable length, in
    /// address order (what [`Heap::live_block_len`] reports for each). For
    /// reachability checks (the typed layer's `PHeap::check`); walks the
    /// whole heap under the heap lock.
    pub fn live_blocks(&self) -> Result<Vec<(NonNull<u8>, u64)>> {
        let _st = self.state.lock();
        let base = self.base();
        let mut out = Vec::new();
        self.walk(|b| {
            if b.header.allocated {
                let len = b.header.size.saturating_sub(u64::from(b.header.slack)).saturating_sub(HDR);
                if let Some(p) = NonNull::new((base as u64 + b.off + HDR) as usize as *mut u8) {
                    out.push((p, len));
                }
            }
        })?;
        Ok(out)
    }

    /// Statistics.
    pub fn stats(&self) -> HeapStats {
        let st = self.state.lock();
        let mut quick = [0u64; 9];
        for (size, n) in st.avail.binned() {
            quick[class_of(size)] += n as u64;
        }
        HeapStats {
            allocations: st.counters.allocations,
            frees: st.counters.frees,
            live_blocks: st.counters.live_blocks,
            bytes_in_use: st.counters.live_bytes,
            free_bytes: st.avail.free_bytes(),
            largest_free: st.avail.largest(),
            live_per_class: st.live_per_class,
            quick_per_class: quick,
            free_extents: st.avail.extent_count() as u64,
            reserved_bytes: st.reserved,
            heap_bytes: self.heap_len(),
            max_heap_bytes: self.max_len(),
        }
    }

    /// Sets aside up to `count` blocks for `size`-byte requests ahead of a
    /// burst (RDS's preallocation); returns how many it set aside. They stay
    /// free (persistently and in the statistics) and are handed out first to
    /// requests of that size with an alignment of at most 16.
    pub fn preallocate(&self, size: usize, count: usize) -> usize {
        match layout::block_size_for(size) {
            Some(need) => self.state.lock().avail.preallocate(need, count),
            None => 0,
        }
    }

    /// Begins a heap transaction (wrapping a core transaction; the calling
    /// thread must not have one open on this instance).
    pub fn begin(&self, mode: RestoreMode) -> Result<HeapTx<'_>> {
        let tracked = self.heap_region.is_tracked();
        let tx = if tracked { self.rvm.begin_tracked(mode)? } else { self.rvm.begin(mode)? };
        let intents = Rc::new(RefCell::new(Intents { allocs: Spare::take(), frees: Vec::new() }));
        // The core let this thread begin, so any heap transaction the
        // registry still lists for this heap on this thread was forgotten
        // (`mem::forget`: never committed, aborted or dropped): give its
        // reservations and deferred frees back, as its drop would have.
        if let Some(stale) = OpenTx::replace(self.id, &intents) {
            let mut st = self.state.lock();
            release(&mut st, &mut stale.borrow_mut());
        }
        if tracked {
            crate::tracked_alloc::register(self, &intents);
        }
        Ok(HeapTx { heap: self, tx: Some(tx), intents, roots: Vec::new() })
    }

    /// Frees `ptr` inside the heap transaction the calling thread has open
    /// on this heap, if any ([`crate::HeapAllocator`]'s `dealloc` inside a
    /// transaction): `None` when there is none, else the result of
    /// [`HeapTx::free`].
    pub(crate) fn free_in_open_tx(&self, ptr: NonNull<u8>) -> Option<Result<()>> {
        let intents = OpenTx::get(self.id)?;
        let mut intents = intents.try_borrow_mut().ok()?;
        Some(free_in(self, &mut intents, ptr))
    }

    fn slot_off(&self, i: usize) -> usize {
        STATIC_FIXED + i * ROOT_SLOT
    }

    /// Reads and checks root slot `i`.
    fn read_slot(&self, i: usize) -> Result<Option<RootSlot>> {
        let at = self.slot_off(i);
        let bad =
            |what: &str| HeapError::corrupted(format!("root slot {i} ({what})"), format!("static region offset {at}"));
        let mut b = [0u8; ROOT_SLOT];
        raw::read_metadata(&self.static_region, at, &mut b).ok_or_else(|| bad("outside the static region"))?;
        RootSlot::decode(&b, self.header.nonce, i as u32, self.heap_len()).map_err(bad)
    }

    fn root_from_slot(&self, s: RootSlot) -> Option<Root> {
        let ptr = NonNull::new((self.base() + (s.off + HDR) as usize) as *mut u8)?;
        Some(Root { name: s.name, ptr, size: s.size, type_tag: s.type_tag })
    }

    /// The length of the user data of the live block whose data starts at
    /// `ptr` (a committed, allocated block, or one the calling thread's open
    /// transaction on this heap allocated), or `None` if `ptr` is not the
    /// start of one: for typed layers that must not trust a pointer read
    /// from the heap (a root slot, a stored pointer) before viewing it as a
    /// value.
    pub fn live_block_len(&self, ptr: NonNull<u8>) -> Option<u64> {
        let data_off = (ptr.as_ptr() as usize).checked_sub(self.base())? as u64;
        if data_off < HDR || !data_off.is_multiple_of(HDR) || data_off >= self.heap_len() {
            return None;
        }
        let off = data_off - HDR;
        // A block the calling thread's open transaction on this heap
        // allocated (and has not freed) is live for that transaction.
        if let Some(intents) = OpenTx::get(self.id) {
            if let Ok(mut intents) = intents.try_borrow_mut() {
                if let Some(r) = intents.allocs.find(off) {
                    return (!r.freed).then(|| r.size - HDR - u64::from(r.slack));
                }
            }
        }
        // A valid allocated header marks a live block (see `free_in`).
        let _st = self.state.lock();
        let h = self.read_header(off).ok().filter(|h| h.allocated)?;
        h.size.checked_sub(u64::from(h.slack))?.checked_sub(HDR)
    }

    /// [`Heap::live_block_len`] as committed: blocks the calling thread's
    /// open transaction allocated do not count (their headers are written
    /// at its commit), blocks it freed still do (freed at its commit). For
    /// typed layers that check a value no transaction has changed yet: its
    /// pointers must lead to committed blocks, not to blocks the open
    /// transaction just made, which it may still free or store elsewhere.
    pub fn committed_block_len(&self, ptr: NonNull<u8>) -> Option<u64> {
        let data_off = (ptr.as_ptr() as usize).checked_sub(self.base())? as u64;
        if data_off < HDR || !data_off.is_multiple_of(HDR) || data_off >= self.heap_len() {
            return None;
        }
        let _st = self.state.lock();
        let h = self.read_header(data_off - HDR).ok().filter(|h| h.allocated)?;
        h.size.checked_sub(u64::from(h.slack))?.checked_sub(HDR)
    }

    /// The root called `name`.
    pub fn root(&self, name: &str) -> Option<Root> {
        let st = self.state.lock();
        let &i = st.roots.get(name)?;
        self.read_slot(i).ok().flatten().and_then(|s| self.root_from_slot(s))
    }

    /// Every root, in slot order.
    pub fn roots(&self) -> Vec<Root> {
        let st = self.state.lock();
        let mut slots: Vec<usize> = st.roots.values().copied().collect();
        slots.sort_unstable();
        slots
            .into_iter()
            .filter_map(|i| self.read_slot(i).ok().flatten())
            .filter_map(|s| self.root_from_slot(s))
            .collect()
    }

    /// The root `name`, created if missing: a block of `size` bytes aligned
    /// to `align` is allocated, `init` fills it (it receives the block's
    /// bytes, zeroed), and the root is recorded, all in one flush-committed
    /// transaction. An existing root with another size or type tag is
    /// [`HeapError::RootMismatch`]. Safe against a race with another thread
    /// creating the same root: one creates it, the other gets it. The
    /// calling thread must not have a transaction open on the instance.
    pub fn root_or_create(
        &self,
        name: &str,
        size: usize,
        align: usize,
        type_tag: u64,
        init: impl FnOnce(&mut [u8]),
    ) -> Result<Root> {
        let existing = |r: Root| {
            if r.size != size as u64 || r.type_tag != type_tag {
                return Err(HeapError::RootMismatch {
                    name: name.into(),
                    size: r.size,
                    type_tag: r.type_tag,
                    want_size: size as u64,
                    want_tag: type_tag,
                });
            }
            Ok(r)
        };
        if let Some(r) = self.root(name) {
            return existing(r);
        }
        let layout = Layout::from_size_align(size, align.max(1)).map_err(|_| HeapError::BadLayout { size, align })?;
        let mut tx = self.begin(RestoreMode::Restore)?;
        let ptr = tx.malloc(layout)?;
        let mut bytes = vec![0u8; size];
        init(&mut bytes);
        raw::store(tx.tx(), ptr.as_ptr() as usize, &bytes)?;
        tx.roots.push(RootChange {
            name: check_root_name(name)?,
            target: Some((block_off(self, ptr), size as u64, type_tag)),
            create: true,
        });
        match tx.commit(CommitMode::Flush) {
            Ok(()) => {}
            Err(HeapError::RootExists { .. }) => {}
            Err(e) => return Err(e),
        }
        match self.root(name) {
            Some(r) => existing(r),
            None => {
                Err(HeapError::corrupted(format!("root table (root {name:?} missing after its commit)"), "root table"))
            }
        }
    }

    /// The root `name` holding a `T`, created with `init()` if missing (see
    /// [`Heap::root_or_create`]; size and alignment are `T`'s). `T` must be
    /// plain data without padding ([`bytemuck::NoUninit`], re-exported as
    /// [`crate::bytemuck`]: every byte of it is initialised, so its bytes
    /// can go to the log) that is valid for any bytes a `T` was stored as,
    /// and may hold pointers into this heap (they stay valid across loads).
    /// Reading and writing through the pointer follows the usual rules:
    /// declare a range in a transaction before storing.
    ///
    /// ```
    /// # use rvm_core::{create_log, MapSpec, Options, Rvm};
    /// # use rvm_heap::Heap;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// # let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// # let seg = rvm.create_segment(dir.path().join("seg"), 1 << 20).unwrap();
    /// # let s = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
    /// # let h = rvm.map(&seg, MapSpec::new(4096, (1 << 20) - 4096)).unwrap();
    /// # let heap = Heap::format(&rvm, s, h).unwrap();
    /// use rvm_heap::bytemuck::NoUninit;
    ///
    /// #[derive(Clone, Copy, NoUninit)]
    /// #[bytemuck(crate = "rvm_heap::bytemuck")]
    /// #[repr(C)]
    /// struct Config {
    ///     version: u64,
    ///     limit: u64,
    /// }
    /// let p = heap.root_or_init("config", 1, || Config { version: 3, limit: 99 }).unwrap();
    /// // SAFETY: the root holds a Config written by a committed transaction.
    /// assert_eq!(unsafe { p.as_ptr().read() }.limit, 99);
    /// ```
    ///
    /// A type with padding is refused at compile time (its padding bytes
    /// are uninitialised, and would reach the log):
    ///
    /// ```compile_fail
    /// # use rvm_heap::Heap;
    /// # fn f(heap: &Heap) {
    /// #[derive(Clone, Copy)]
    /// #[repr(C)]
    /// struct Padded {
    ///     small: u8,
    ///     // 7 bytes of padding here
    ///     big: u64,
    /// }
    /// heap.root_or_init("padded", 1, || Padded { small: 1, big: 2 });
    /// # }
    /// ```
    pub fn root_or_init<T: bytemuck::NoUninit>(
        &self,
        name: &str,
        type_tag: u64,
        init: impl FnOnce() -> T,
    ) -> Result<NonNull<T>> {
        let size = std::mem::size_of::<T>();
        let root = self.root_or_create(name, size, std::mem::align_of::<T>(), type_tag, |bytes| {
            let value = init();
            bytes.copy_from_slice(bytemuck::bytes_of(&value));
        })?;
        Ok(root.ptr.cast::<T>())
    }
}

/// Reads and checks the persistent counters (their checksum; the load and
/// the check compare the values with the blocks and roots).
fn read_counters(static_region: &Region, nonce: u64) -> Result<Counters> {
    let at = format!("static region offset {COUNTERS_AT}");
    let mut b = [0u8; COUNTERS_LEN];
    raw::read_metadata(static_region, COUNTERS_AT, &mut b)
        .ok_or_else(|| HeapError::corrupted("heap counters (outside the static region)", at.clone()))?;
    Counters::decode(&b, nonce).map_err(|why| HeapError::corrupted(format!("heap counters ({why})"), at))
}

/// The block size limit of the size classes: 1/16 of the heap, at least
/// 64 KiB (blocks in the size classes are not merged, so they are bounded
/// to keep fragmentation in check).
pub(super) fn bin_limit(heap_len: u64) -> u64 {
    (heap_len / 16).max(64 << 10)
}

fn check_root_name(name: &str) -> Result<String> {
    if name.is_empty() || name.len() > ROOT_NAME_MAX || name.contains('\0') {
        const SHOWN: usize = 64;
        let shown = match name.char_indices().map(|(i, _)| i).find(|&i| i >= SHOWN) {
            Some(cut) if cut < name.len() => format!("{}…", &name[..cut]),
            _ => name.to_owned(),
        };
        return Err(HeapError::BadRootName { name: shown, len: name.len(), max: ROOT_NAME_MAX });
    }
    Ok(name.into())
}

/// The heap offset of the block whose data starts at `ptr` (not checked).
fn block_off(heap: &Heap, ptr: NonNull<u8>) -> u64 {
    (ptr.as_ptr() as usize).wrapping_sub(heap.base() + HDR as usize) as u64
}

/// A root change to make at commit.
#[derive(Debug)]
struct RootChange {
    name: String,
    /// (block offset, size, type tag), or `None` to remove the root.
    target: Option<(u64, u64, u64)>,
    /// Fail with [`HeapError::RootExists`] if the root exists.
    create: bool,
}

/// A committed block freed by a transaction in flight (its header as read).
#[derive(Clone, Copy, Debug)]
struct Freed {
    off: u64,
    size: u64,
    slack: u32,
}

#[derive(Clone, Copy, Debug)]
struct Reserved {
    size: u64,
    slack: u32,
    /// Freed again by its own transaction: no header at commit, and back to
    /// the free space once the transaction has ended.
    freed: bool,
}

/// The blocks a transaction reserved, in order, with an index by offset
/// that is built only when a transaction with many of them looks one up
/// (to free it, or to root it).
#[derive(Debug, Default)]
struct Reservations {
    list: Vec<(u64, Reserved)>,
    index: HashMap<u64, usize, OffsetBuild>,
    /// `index` covers `list[..indexed]`.
    indexed: usize,
}

impl Reservations {
    fn push(&mut self, off: u64, r: Reserved) {
        self.list.push((off, r));
    }

    fn find(&mut self, off: u64) -> Option<&mut Reserved> {
        if self.list.len() <= 16 {
            return self.list.iter_mut().rev().find(|e| e.0 == off).map(|e| &mut e.1);
        }
        while self.indexed < self.list.len() {
            self.index.insert(self.list[self.indexed].0, self.indexed);
            self.indexed += 1;
        }
        let i = *self.index.get(&off)?;
        Some(&mut self.list[i].1)
    }

    fn iter(&self) -> impl Iterator<Item = &(u64, Reserved)> + '_ {
        self.list.iter()
    }

    fn clear(&mut self) {
        self.list.clear();
        self.index.clear();
        self.indexed = 0;
    }
}

thread_local! {
    /// Each thread's spare reservation list, reused by its next transaction
    /// (growing a fresh one for every transaction costs more than the
    /// allocations it records).
    static SPARE: std::cell::RefCell<Option<Reservations>> = const { std::cell::RefCell::new(None) };
}

/// Access to [`SPARE`].
struct Spare;

impl Spare {
    fn take() -> Reservations {
        SPARE.with(|s| s.borrow_mut().take()).unwrap_or_default()
    }

    fn give(mut r: Reservations) {
        r.clear();
        // `try_with`: a heap transaction kept in a thread-local of the
        // program may be dropped at thread exit after this one is gone.
        let _ = SPARE.try_with(|s| *s.borrow_mut() = Some(r));
    }
}

/// A transaction on the heap: allocations and frees take effect at commit,
/// together with the stores the transaction declares. Dropping it without
/// committing aborts it.
#[derive(Debug)]
pub struct HeapTx<'h> {
    heap: &'h Heap,
    tx: Option<Transaction<'h>>,
    /// Its reservations and deferred frees, shared with the thread's
    /// registry of open heap transactions ([`OpenTx`]) so that
    /// [`crate::HeapAllocator`]'s `dealloc` can free inside it.
    intents: Rc<RefCell<Intents>>,
    roots: Vec<RootChange>,
}

/// What a heap transaction does at commit to the allocation state.
#[derive(Debug, Default)]
pub(crate) struct Intents {
    /// Blocks reserved by the transaction, by offset.
    allocs: Reservations,
    /// Committed blocks to free at commit.
    frees: Vec<Freed>,
}

/// Gives a transaction's reservations back to the free space and drops its
/// deferred frees (after its core transaction has ended).
fn release(st: &mut State, intents: &mut Intents) {
    for &(off, r) in intents.allocs.iter() {
        st.reserved -= r.size;
        st.avail.release(off, r.size);
    }
    intents.allocs.clear();
    for f in intents.frees.drain(..) {
        st.pending_frees.remove(&f.off);
    }
}

thread_local! {
    /// The heap transactions open on this thread: (heap id, its intents).
    static OPEN_TX: RefCell<Vec<(u64, Weak<RefCell<Intents>>)>> = const { RefCell::new(Vec::new()) };
}

/// Access to [`OPEN_TX`].
struct OpenTx;

impl OpenTx {
    /// Registers `intents` as the open transaction of heap `id`; returns
    /// the one registered before, if it is still alive (a forgotten one).
    fn replace(id: u64, intents: &Rc<RefCell<Intents>>) -> Option<Rc<RefCell<Intents>>> {
        OPEN_TX.with(|o| {
            let mut o = o.borrow_mut();
            o.retain(|(_, w)| w.strong_count() > 0);
            match o.iter_mut().find(|(h, _)| *h == id) {
                Some((_, w)) => std::mem::replace(w, Rc::downgrade(intents)).upgrade(),
                None => {
                    o.push((id, Rc::downgrade(intents)));
                    None
                }
            }
        })
    }

    /// The open transaction of heap `id` on this thread.
    fn get(id: u64) -> Option<Rc<RefCell<Intents>>> {
        OPEN_TX.with(|o| o.borrow().iter().find(|(h, _)| *h == id).and_then(|(_, w)| w.upgrade()))
    }

    /// Unregisters `intents` (its transaction has ended).
    fn remove(id: u64, intents: &Rc<RefCell<Intents>>) {
        // `try_with`: a transaction dropped while the thread's locals are
        // being destroyed has nothing left to unregister from.
        let _ = OPEN_TX.try_with(|o| {
            let mut o = o.borrow_mut();
            o.retain(|(h, w)| !(*h == id && std::ptr::eq(w.as_ptr(), Rc::as_ptr(intents))));
        });
    }
}

impl<'h> HeapTx<'h> {
    /// The core transaction, for declaring ranges of the caller's own data.
    pub fn tx(&mut self) -> &mut Transaction<'h> {
        // The option is only empty after commit or abort, which consume self.
        self.tx.as_mut().expect("heap transaction used after it ended")
    }

    /// The heap.
    pub fn heap(&self) -> &'h Heap {
        self.heap
    }

    /// Declares `[ptr, ptr + len)` (inside a block of this heap, or any
    /// mapped memory) for stores the caller makes next.
    ///
    /// # Safety
    ///
    /// As [`Transaction::set_range`]: no other thread writes the range until
    /// this transaction ends, and no Rust reference holds it meanwhile.
    pub unsafe fn set_range(&mut self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { raw::declare(self.tx(), ptr.as_ptr() as usize, len)? };
        Ok(())
    }

    /// Declares `[ptr, ptr + bytes.len())` and stores `bytes` there.
    ///
    /// # Safety
    ///
    /// As [`HeapTx::set_range`].
    pub unsafe fn write(&mut self, ptr: NonNull<u8>, bytes: &[u8]) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.tx().modify_bytes(ptr.as_ptr() as usize, bytes)? };
        Ok(())
    }

    /// Allocates a block for `layout` (any size the heap can hold, any
    /// power-of-two alignment). The memory is the transaction's until it
    /// ends; it becomes a live block at commit, and returns to the free space
    /// if the transaction aborts. Its contents are undefined until written
    /// (declare them in this transaction to make them durable).
    pub fn malloc(&mut self, layout: Layout) -> Result<NonNull<u8>> {
        malloc_in(self.heap, &self.intents, layout)
    }

    /// Frees a block: at commit, or (if this transaction allocated it) as
    /// if it had never been allocated. Freeing twice, or a pointer the heap
    /// did not hand out, is an error ([`HeapError::DoubleFree`],
    /// [`HeapError::InvalidPointer`]).
    pub fn free(&mut self, ptr: NonNull<u8>) -> Result<()> {
        free_in(self.heap, &mut self.intents.borrow_mut(), ptr)
    }

    /// Records (or with `None` removes) the root `name` at commit. `target`
    /// is (block pointer, size, type tag): the pointer must be a live block
    /// of this heap (allocated by this transaction, or committed and not
    /// freed by it) and `size` at most the bytes it was allocated with.
    pub fn set_root(&mut self, name: &str, target: Option<(NonNull<u8>, u64, u64)>) -> Result<()> {
        let name = check_root_name(name)?;
        let target = match target {
            None => None,
            Some((ptr, size, tag)) => {
                let addr = ptr.as_ptr() as usize;
                let off = block_off(self.heap, ptr);
                let mut guard = self.intents.borrow_mut();
                let Intents { allocs, frees } = &mut *guard;
                let capacity = match allocs.find(off) {
                    Some(r) if !r.freed => Some(r.size - HDR - r.slack as u64),
                    Some(_) => None,
                    None if off >= self.heap.heap_len() || frees.iter().any(|f| f.off == off) => None,
                    None => {
                        let _st = self.heap.state.lock();
                        match self.heap.read_header(off) {
                            Ok(h) if h.allocated => Some(h.size - HDR - h.slack as u64),
                            _ => None,
                        }
                    }
                };
                match capacity {
                    Some(c) if size <= c => Some((off, size, tag)),
                    Some(capacity) => return Err(HeapError::RootTooLarge { name, size, capacity }),
                    None => return Err(HeapError::InvalidPointer { addr }),
                }
            }
        };
        self.roots.push(RootChange { name, target, create: false });
        Ok(())
    }

    /// Commits: under the heap lock, writes the headers of allocated and
    /// freed blocks, the counters and the root slots into the transaction
    /// and commits it (see the module docs for why this never tangles with
    /// other transactions); with [`CommitMode::Flush`] then waits for
    /// durability. On error the transaction is aborted (allocations return
    /// to the free space, frees are dropped).
    pub fn commit(mut self, mode: CommitMode) -> Result<()> {
        let heap = self.heap;
        let tx = self.tx.take().expect("heap transaction used after it ended");
        OpenTx::remove(heap.id, &self.intents);
        let Intents { allocs, frees } = std::mem::take(&mut *self.intents.borrow_mut());
        let roots = std::mem::take(&mut self.roots);
        let mut guard = heap.state.lock();
        let mut undo = Undo::new(tx.mode(), frees.len());
        let mut tx = tx;
        let result = match apply_intents(heap, &mut guard, &mut tx, &allocs, &frees, &roots, &mut undo) {
            // The core commit copies the new values while the lock is held,
            // so no other commit can write heap metadata in between.
            Ok(()) => tx.commit(CommitMode::NoFlush).map_err(HeapError::from),
            Err(e) => {
                // Abort under the lock, before anything goes back to the
                // free space.
                tx.abort();
                Err(e)
            }
        };
        let st = &mut *guard;
        match &result {
            Ok(()) => {
                for &(off, r) in allocs.iter() {
                    st.reserved -= r.size;
                    if r.freed {
                        st.avail.release(off, r.size);
                    } else {
                        st.live_per_class[class_of(r.size)] += 1;
                    }
                }
                for f in &frees {
                    st.pending_frees.remove(&f.off);
                    st.avail.release(f.off, f.size);
                    st.live_per_class[class_of(f.size)] -= 1;
                }
            }
            Err(_) => {
                // The core aborted the transaction (restoring what it can in
                // restore mode); put back what the heap changed in memory and
                // in its mirrors, still under the lock.
                undo.rollback(heap, st, &frees);
                for &(off, r) in allocs.iter() {
                    st.reserved -= r.size;
                    st.avail.release(off, r.size);
                }
                for f in &frees {
                    st.pending_frees.remove(&f.off);
                }
            }
        }
        // Not under the lock: the flush below waits for the disk.
        drop(guard);
        Spare::give(allocs);
        result?;
        if mode == CommitMode::Flush {
            heap.rvm.flush()?;
        }
        Ok(())
    }

    /// Aborts: the core transaction is aborted first (restore mode puts the
    /// old bytes of every declared range back), then reserved blocks return
    /// to the free space and deferred frees are dropped.
    pub fn abort(self) {}
}

impl Drop for HeapTx<'_> {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        OpenTx::remove(self.heap.id, &self.intents);
        // First the core abort, while the reserved blocks are still ours:
        // it may write old bytes back into them.
        tx.abort();
        let mut intents = self.intents.borrow_mut();
        let mut st = self.heap.state.lock();
        release(&mut st, &mut intents);
        drop(st);
        Spare::give(std::mem::take(&mut intents.allocs));
    }
}

/// [`HeapTx::free`] on a transaction's intents.
/// [`HeapTx::malloc`] on a transaction's intents (also
/// [`crate::TrackedAlloc`]'s way in).
pub(crate) fn malloc_in(heap: &Heap, intents: &RefCell<Intents>, layout: Layout) -> Result<NonNull<u8>> {
    // Never borrowed elsewhere while user code runs.
    let mut intents = intents.borrow_mut();
    let (size, align) = (layout.size(), layout.align());
    let oom = |largest| HeapError::OutOfMemory { size, align, largest };
    let need = layout::block_size_for(size).ok_or_else(|| oom(0))?;
    let base_mod = (heap.base() % align) as u64;
    let (off, block) = loop {
        let mut st = heap.state.lock();
        if let Some(x) = st.avail.take(need, align as u64, base_mod) {
            st.reserved += x.1;
            break x;
        }
        let largest = st.avail.largest();
        let seen = heap.heap_len();
        drop(st);
        // No room: grow the heap (by its policy) and try again.
        if !heap.grow_for(need.saturating_add(align as u64), seen)? {
            return Err(oom(largest));
        }
    };
    // At most the 16-byte rounding, the tail guard and a leftover too
    // small to stand alone (< MIN_BLOCK): always fits in u32.
    let slack = (block - HDR - size as u64) as u32;
    intents.allocs.push(off, Reserved { size: block, slack, freed: false });
    // Header and tail guard are written at commit.
    NonNull::new((heap.base() + (off + HDR) as usize) as *mut u8).ok_or_else(|| oom(0))
}

/// [`free_in`] on a transaction's intents.
pub(crate) fn free_in_cell(heap: &Heap, intents: &RefCell<Intents>, ptr: NonNull<u8>) -> Result<()> {
    free_in(heap, &mut intents.borrow_mut(), ptr)
}

fn free_in(heap: &Heap, intents: &mut Intents, ptr: NonNull<u8>) -> Result<()> {
    let addr = ptr.as_ptr() as usize;
    let bad = || HeapError::InvalidPointer { addr };
    let Some(data_off) = addr.checked_sub(heap.base()).map(|o| o as u64) else { return Err(bad()) };
    if data_off < HDR || !data_off.is_multiple_of(HDR) || data_off >= heap.heap_len() {
        return Err(bad());
    }
    let off = data_off - HDR;
    if let Some(r) = intents.allocs.find(off) {
        if r.freed {
            return Err(HeapError::DoubleFree { addr });
        }
        r.freed = true;
        return Ok(());
    }
    let mut st = heap.state.lock();
    // A valid allocated header marks a live block: committed layouts
    // hold no stale allocated headers (a header that becomes interior
    // to a free block is zeroed, see `apply_intents`).
    let h = match heap.read_header(off) {
        Ok(h) if h.allocated => h,
        _ => {
            // Freed already (the pointer lies in committed free space),
            // or never a block.
            return match st.committed_free.range(..=off).next_back() {
                Some((&f, &fs)) if off < f + fs => Err(HeapError::DoubleFree { addr }),
                _ => Err(bad()),
            };
        }
    };
    if !st.pending_frees.insert(off) {
        return Err(HeapError::DoubleFree { addr });
    }
    drop(st);
    intents.frees.push(Freed { off, size: h.size, slack: h.slack });
    Ok(())
}

/// A change to the committed-free mirror, in order.
#[derive(Clone, Copy, Debug)]
enum MirrorOp {
    Removed(u64, u64),
    Inserted(u64),
    /// Size changed in place from the size given.
    Resized(u64, u64),
}

/// What a commit changed, to put back if the core commit fails.
///
/// Every piece of committed heap metadata a commit overwrites is the header
/// of a committed free block it removes from the mirror, the header of a
/// block it frees, the counters, or a root slot (the other headers it writes
/// land inside committed free blocks, where nothing committed lives). So a
/// rollback re-encodes those headers from the mirror and the freed blocks,
/// and keeps old bytes only of root slots and counters. (A restore-mode
/// transaction gets all of it back from the core's own abort; the heap then
/// only repairs its mirrors.)
#[derive(Debug)]
struct Undo {
    /// Whether memory must be put back by the heap (no-restore: the core
    /// keeps no old values).
    write_back: bool,
    mirror: Vec<MirrorOp>,
    /// The counters before.
    counters: Option<Counters>,
    /// Root slots written: (slot, old bytes), and index changes (name, the
    /// slot it had).
    slots: Vec<(usize, [u8; ROOT_SLOT])>,
    roots: Vec<(String, Option<usize>)>,
}

impl Undo {
    fn new(mode: RestoreMode, frees: usize) -> Undo {
        Undo {
            write_back: mode == RestoreMode::NoRestore,
            mirror: Vec::with_capacity(frees * 3 + 8),
            counters: None,
            slots: Vec::new(),
            roots: Vec::new(),
        }
    }

    fn remove(&mut self, st: &mut State, off: u64) -> Option<u64> {
        let size = st.committed_free.remove(&off)?;
        self.mirror.push(MirrorOp::Removed(off, size));
        Some(size)
    }

    fn insert(&mut self, st: &mut State, off: u64, size: u64) {
        st.committed_free.insert(off, size);
        self.mirror.push(MirrorOp::Inserted(off));
    }

    fn rollback(self, heap: &Heap, st: &mut State, frees: &[Freed]) {
        // Newest first, so a block a commit both made and used goes away.
        for op in self.mirror.iter().rev() {
            match *op {
                MirrorOp::Removed(off, size) | MirrorOp::Resized(off, size) => {
                    st.committed_free.insert(off, size);
                }
                MirrorOp::Inserted(off) => {
                    st.committed_free.remove(&off);
                }
            }
        }
        if let Some(c) = self.counters {
            st.counters = c;
        }
        for (name, slot) in self.roots.into_iter().rev() {
            if let Some(&now) = st.roots.get(&name) {
                st.free_slots.insert(now);
                st.roots.remove(&name);
            }
            if let Some(i) = slot {
                st.free_slots.remove(&i);
                st.roots.insert(name, i);
            }
        }
        if !self.write_back {
            return;
        }
        // Still under the heap lock: nobody else writes heap metadata, and
        // the failed transaction is over.
        let (base, nonce) = (heap.base(), heap.header.nonce);
        for op in &self.mirror {
            if let MirrorOp::Removed(off, size) | MirrorOp::Resized(off, size) = *op {
                if st.committed_free.get(&off) == Some(&size) {
                    let h = BlockHeader { size, allocated: false, slack: 0 };
                    heap.write_back(base + off as usize, &h.encode(nonce, off));
                }
            }
        }
        for f in frees {
            let h = BlockHeader { size: f.size, allocated: true, slack: f.slack };
            heap.write_back(base + f.off as usize, &h.encode(nonce, f.off));
        }
        if self.counters.is_some() {
            heap.write_back(heap.static_region.addr() + COUNTERS_AT, &st.counters.encode(nonce));
        }
        for (slot, old) in self.slots.iter().rev() {
            heap.write_back(heap.static_region.addr() + heap.slot_off(*slot), old);
        }
    }
}

/// Writes the commit's heap metadata into `tx`: root slots, the headers of
/// allocated blocks (splitting the committed free block that holds each)
/// and of freed ones (merged with their free neighbours), and the counters.
/// Also updates the mirror of the committed free blocks and the root index;
/// `undo` records how to put it all back.
fn apply_intents(
    heap: &Heap,
    st: &mut State,
    tx: &mut Transaction<'_>,
    allocs: &Reservations,
    frees: &[Freed],
    roots: &[RootChange],
    undo: &mut Undo,
) -> Result<()> {
    let base = heap.base();
    let nonce = heap.header.nonce;
    let corrupt =
        |what: &str, off: u64| HeapError::corrupted(format!("heap layout ({what})"), format!("heap offset {off:#x}"));
    let mut counters = st.counters;
    // Roots first: they can fail for ordinary reasons (full, created by
    // someone else), best before anything else is written.
    for change in roots {
        let existing = st.roots.get(&change.name).copied();
        if change.create && existing.is_some() {
            return Err(HeapError::RootExists { name: change.name.clone() });
        }
        let slot = match (existing, change.target) {
            (Some(i), _) => i,
            (None, None) => continue,
            (None, Some(_)) => match st.free_slots.first() {
                Some(&i) => i,
                None => return Err(HeapError::RootsFull { slots: heap.root_slots() }),
            },
        };
        undo.roots.push((change.name.clone(), existing));
        let b = match change.target {
            Some((off, size, type_tag)) => {
                st.free_slots.remove(&slot);
                st.roots.insert(change.name.clone(), slot);
                let s = RootSlot { name: change.name.clone(), type_tag, off, size };
                RootSlot::encode(Some(&s), nonce, slot as u32)
            }
            None => {
                st.roots.remove(&change.name);
                st.free_slots.insert(slot);
                RootSlot::encode(None, nonce, slot as u32)
            }
        };
        counters.roots = st.roots.len() as u64;
        let mut old = [0u8; ROOT_SLOT];
        raw::read_metadata(&heap.static_region, heap.slot_off(slot), &mut old);
        undo.slots.push((slot, old));
        raw::store(tx, heap.static_region.addr() + heap.slot_off(slot), &b)?;
    }
    // Lifetime counters come from disk: a hostile value near 2^64 is an
    // error, not an overflow.
    let overflow = || {
        HeapError::corrupted(
            "heap counters (a lifetime counter overflows)",
            format!("static region offset {COUNTERS_AT}"),
        )
    };
    for &(off, r) in allocs.iter() {
        if r.freed {
            continue;
        }
        // The committed free block that holds the reservation (committed
        // free blocks are maximal, so one holds it whole); what lies before
        // the reservation stays free, resized in place.
        let (f, fs) = match st.committed_free.range_mut(..=off).next_back() {
            Some((&f, fs)) if off + r.size <= f + *fs => {
                let old = *fs;
                if off > f {
                    undo.mirror.push(MirrorOp::Resized(f, old));
                    *fs = off - f;
                }
                (f, old)
            }
            _ => return Err(corrupt("reserved block outside committed free space", off)),
        };
        if off == f {
            undo.remove(st, f);
        } else {
            let h = BlockHeader { size: off - f, allocated: false, slack: 0 };
            raw::store(tx, base + f as usize, &h.encode(nonce, f))?;
        }
        let end = off + r.size;
        let h = BlockHeader { size: r.size, allocated: true, slack: r.slack }.encode(nonce, off);
        let guard = layout::tail_guard(nonce, off).to_le_bytes();
        let (at, guard_at) = (base + off as usize, base + (end - r.slack as u64) as usize);
        // Header and tail guard: with the data the caller declares in
        // between, the core merges them into one logged range.
        raw::store(tx, at, &h)?;
        raw::store(tx, guard_at, &guard)?;
        if end < f + fs {
            undo.insert(st, end, f + fs - end);
            let h = BlockHeader { size: f + fs - end, allocated: false, slack: 0 };
            raw::store(tx, base + end as usize, &h.encode(nonce, end))?;
        }
        counters.allocations = counters.allocations.checked_add(1).ok_or_else(overflow)?;
        counters.live_blocks += 1;
        counters.live_bytes += r.size;
    }
    for fr in frees {
        let (off, size) = (fr.off, fr.size);
        let mut end = off + size;
        // Merge with the free block after, then with the one before (resized
        // in place), else it becomes a free block of its own.
        if let Some(ns) = undo.remove(st, end) {
            end += ns;
        }
        let prev = match st.committed_free.range_mut(..off).next_back() {
            Some((&p, ps)) if p + *ps > off => return Err(corrupt("freed block inside committed free space", off)),
            Some((&p, ps)) if p + *ps == off => {
                undo.mirror.push(MirrorOp::Resized(p, *ps));
                *ps = end - p;
                Some(p)
            }
            _ => None,
        };
        let start = match prev {
            Some(p) => {
                // The freed block's header is now interior: invalidate it so
                // a stale pointer can never pass for a live block.
                raw::store(tx, base + off as usize, &[0u8; HDR as usize])?;
                p
            }
            None => {
                undo.insert(st, off, end - off);
                off
            }
        };
        let fh = BlockHeader { size: end - start, allocated: false, slack: 0 };
        raw::store(tx, base + start as usize, &fh.encode(nonce, start))?;
        counters.frees = counters.frees.checked_add(1).ok_or_else(overflow)?;
        counters.live_blocks -= 1;
        counters.live_bytes -= size;
    }
    if counters != st.counters {
        undo.counters = Some(st.counters);
        st.counters = counters;
        raw::store(tx, heap.static_region.addr() + COUNTERS_AT, &counters.encode(nonce))?;
    }
    Ok(())
}
