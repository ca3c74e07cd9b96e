//! The heap: allocation state, transactions, roots, check, statistics.
//!
//! # How concurrent transactions never tangle
//!
//! Persistent allocator metadata is only the block headers and the root
//! slots. They are written **only at commit**, under the heap lock, into the
//! committing transaction, and the core commit (which copies the new values)
//! happens before the lock is released. So no transaction ever holds an
//! uncommitted change to a header or root slot while another runs: an abort
//! has nothing of the heap's to restore, and cannot clobber anyone.
//!
//! Between `malloc` and commit, the block is only *reserved* in volatile
//! state ([`Avail`]); its header is written at commit, computed against the
//! committed layout at that moment (a mirror of the committed free blocks is
//! kept in memory). `free` is deferred to commit (RDS's rule): an abort never
//! loses a block, and an allocation of an aborted transaction returns to the
//! free space.

use crate::avail::Avail;
use crate::error::{HeapError, Result};
use crate::layout::{
    self, BlockHeader, StaticHeader, HDR, MIN_BLOCK, ROOT_NAME_MAX, ROOT_SLOT, STATIC_FIXED, TAIL_GUARD,
};
use crate::raw;
use parking_lot::Mutex;
use rvm_core::{CommitMode, Region, RestoreMode, Rvm, Transaction};
use std::alloc::Layout;
use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::NonNull;

/// Root slots in a heap made by [`Heap::format`].
pub const DEFAULT_ROOT_SLOTS: u32 = 62;
/// Largest supported alignment.
pub const MAX_ALIGN: usize = 4096;
/// Size-class boundaries for per-class statistics (block sizes up to and
/// including each bound; the last class holds everything larger).
pub const CLASS_BOUNDS: [u64; 9] = [32, 64, 128, 256, 512, 1024, 2048, 4096, u64::MAX];

/// Heap statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeapStats {
    /// Committed allocations since load.
    pub allocations: u64,
    /// Committed frees since load.
    pub frees: u64,
    /// Live (committed, allocated) blocks.
    pub live_blocks: u64,
    /// Bytes in live blocks (headers and slack included).
    pub bytes_in_use: u64,
    /// Free bytes available to new allocations.
    pub free_bytes: u64,
    /// Largest free extent.
    pub largest_free: u64,
    /// Live blocks per size class ([`CLASS_BOUNDS`]).
    pub live_per_class: [u64; 9],
    /// Heap region size.
    pub heap_bytes: u64,
}

/// What a full heap check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Blocks walked.
    pub blocks: u64,
    /// Allocated blocks.
    pub allocated: u64,
    /// Free blocks.
    pub free: u64,
    /// Bytes in free blocks.
    pub free_bytes: u64,
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
struct OffsetHasher(u64);

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

#[derive(Debug, Default)]
struct State {
    avail: Avail,
    /// The committed layout's free blocks (offset → size).
    committed_free: BTreeMap<u64, u64>,
    /// Committed blocks freed by transactions in flight.
    pending_frees: HashSet<u64, BuildHasherDefault<OffsetHasher>>,
    stats: HeapStats,
}

/// A recoverable heap on two mapped regions: a static one (header and
/// roots) and the heap proper.
#[derive(Debug)]
pub struct Heap {
    rvm: Rvm,
    static_region: Region,
    heap_region: Region,
    header: StaticHeader,
    state: Mutex<State>,
}

fn class_of(size: u64) -> usize {
    CLASS_BOUNDS.iter().position(|&b| size <= b).unwrap_or(CLASS_BOUNDS.len() - 1)
}

impl Heap {
    /// Formats a new heap on the two regions (in one flush transaction):
    /// writes the header, empty roots, and one free block covering the heap
    /// region.
    pub fn format(rvm: &Rvm, static_region: Region, heap_region: Region) -> Result<Heap> {
        let slots = DEFAULT_ROOT_SLOTS;
        if static_region.len() < STATIC_FIXED + slots as usize * ROOT_SLOT {
            return Err(HeapError::BadRegions {
                reason: format!("static region of {} bytes is too small", static_region.len()),
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
            root_slots: slots,
            heap_addr: heap_region.addr() as u64,
            heap_len: len,
            static_addr: static_region.addr() as u64,
            nonce,
        };
        let mut tx = rvm.begin(RestoreMode::NoRestore)?;
        raw::store(&mut tx, static_region.addr(), &header.encode())?;
        raw::store(&mut tx, static_region.addr() + STATIC_FIXED, &vec![0u8; slots as usize * ROOT_SLOT])?;
        let first = BlockHeader { size: len, allocated: false, slack: 0 };
        raw::store(&mut tx, heap_region.addr(), &first.encode(nonce, 0))?;
        tx.commit(CommitMode::Flush)?;
        Heap::load(rvm, static_region, heap_region)
    }

    /// Loads a heap from its regions: checks the header, walks every block
    /// (checking each), and rebuilds the volatile indexes. A heap that fails
    /// is reported as [`HeapError::Corrupted`], never used.
    pub fn load(rvm: &Rvm, static_region: Region, heap_region: Region) -> Result<Heap> {
        let mut fixed = [0u8; STATIC_FIXED];
        static_region
            .read(0, &mut fixed)
            .ok_or_else(|| HeapError::BadRegions { reason: "static region too small".into() })?;
        let header = StaticHeader::decode(&fixed)
            .map_err(|why| HeapError::corrupted(format!("heap header ({why})"), "static region offset 0"))?;
        if header.heap_addr != heap_region.addr() as u64 || header.heap_len != heap_region.len() as u64 {
            return Err(HeapError::corrupted(
                "heap header (heap region address or length differ from the mapped region)",
                "static region offset 16",
            ));
        }
        if header.static_addr != static_region.addr() as u64
            || STATIC_FIXED + header.root_slots as usize * ROOT_SLOT > static_region.len()
        {
            return Err(HeapError::corrupted("heap header (static region mismatch)", "static region offset 12"));
        }
        let heap = Heap { rvm: rvm.clone(), static_region, heap_region, header, state: Mutex::new(State::default()) };
        let walk = heap.walk()?;
        let mut st = heap.state.lock();
        for b in &walk {
            if b.header.allocated {
                st.stats.live_blocks += 1;
                st.stats.bytes_in_use += b.header.size;
                st.stats.live_per_class[class_of(b.header.size)] += 1;
            } else {
                st.committed_free.insert(b.off, b.header.size);
                st.avail.give_back(b.off, b.header.size);
            }
        }
        st.stats.heap_bytes = header.heap_len;
        drop(st);
        Ok(heap)
    }

    /// The instance the heap lives in.
    pub fn rvm(&self) -> &Rvm {
        &self.rvm
    }

    /// The heap region.
    pub fn heap_region(&self) -> &Region {
        &self.heap_region
    }

    /// The static region (header and roots).
    pub fn static_region(&self) -> &Region {
        &self.static_region
    }

    fn base(&self) -> usize {
        self.heap_region.addr()
    }

    /// The region (heap or static) holding `[addr, addr + len)`.
    fn region_of(&self, addr: usize, len: usize) -> Option<&Region> {
        [&self.heap_region, &self.static_region]
            .into_iter()
            .find(|r| addr >= r.addr() && addr.checked_add(len).is_some_and(|e| e <= r.addr() + r.len()))
    }

    fn read_mem(&self, addr: usize, buf: &mut [u8]) {
        if let Some(r) = self.region_of(addr, buf.len()) {
            r.read(addr - r.addr(), buf);
        }
    }

    /// Puts back bytes of a header or root slot after a failed commit.
    fn write_back(&self, addr: usize, bytes: &[u8]) {
        if self.region_of(addr, bytes.len()).is_some() {
            // SAFETY: inside one of the heap's live regions (checked); the
            // caller holds the heap lock, the only context that writes
            // headers and root slots, and the failed transaction has ended.
            unsafe { raw::write_back(addr, bytes) };
        }
    }

    fn read_header(&self, off: u64) -> std::result::Result<BlockHeader, &'static str> {
        let mut b = [0u8; HDR as usize];
        self.heap_region.read(off as usize, &mut b).ok_or("block header outside the heap")?;
        BlockHeader::decode(&b, self.header.nonce, off, self.header.heap_len)
    }

    fn walk(&self) -> Result<Vec<Walked>> {
        let mut out = Vec::new();
        let mut off = 0u64;
        let mut prev_free = false;
        while off < self.header.heap_len {
            let h = self
                .read_header(off)
                .map_err(|why| HeapError::corrupted(format!("heap block ({why})"), format!("heap offset {off:#x}")))?;
            if h.allocated {
                let data_end = off + h.size - h.slack as u64;
                let mut g = [0u8; TAIL_GUARD as usize];
                self.heap_region.read(data_end as usize, &mut g);
                if u64::from_le_bytes(g) != layout::tail_guard(self.header.nonce, off) {
                    return Err(HeapError::corrupted(
                        "heap block tail guard (overrun?)",
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
            out.push(Walked { off, header: h });
            off += h.size;
        }
        Ok(out)
    }

    /// Walks every block and checks headers, guards, tail guards, that
    /// blocks tile the heap without overlap, that the volatile indexes agree
    /// with the persistent state, and that the counters agree.
    pub fn check(&self) -> Result<CheckReport> {
        let st = self.state.lock();
        let walk = self.walk()?;
        let mut report = CheckReport::default();
        let mut free = BTreeMap::new();
        let mut live = 0;
        for b in &walk {
            report.blocks += 1;
            if b.header.allocated {
                report.allocated += 1;
                live += b.header.size;
            } else {
                report.free += 1;
                report.free_bytes += b.header.size;
                free.insert(b.off, b.header.size);
            }
        }
        let mismatch = |what: &str| HeapError::corrupted(format!("heap state ({what})"), "volatile index");
        if free != st.committed_free {
            return Err(mismatch("free blocks differ from the committed layout mirror"));
        }
        if report.allocated != st.stats.live_blocks || live != st.stats.bytes_in_use {
            return Err(mismatch("live counters disagree with the blocks"));
        }
        // Every byte available to allocation lies in a committed free block.
        for (at, size) in st.avail.extents().chain(st.avail.cached()) {
            match st.committed_free.range(..=at).next_back() {
                Some((&f, &fs)) if at + size <= f + fs => {}
                _ => return Err(mismatch("available space outside the committed free blocks")),
            }
        }
        Ok(report)
    }

    /// Statistics.
    pub fn stats(&self) -> HeapStats {
        let st = self.state.lock();
        let mut s = st.stats.clone();
        s.free_bytes = st.avail.free_bytes();
        s.largest_free = st.avail.largest();
        s
    }

    /// Fills the cache for `size`-byte requests with up to `count` blocks
    /// ahead of a burst (RDS's preallocation); returns how many it made.
    pub fn preallocate(&self, size: usize, count: usize) -> usize {
        match layout::block_size_for(size) {
            Some(need) => self.state.lock().avail.preallocate(need, count),
            None => 0,
        }
    }

    /// Begins a heap transaction (wrapping a core transaction).
    pub fn begin(&self, mode: RestoreMode) -> Result<HeapTx<'_>> {
        Ok(HeapTx {
            heap: self,
            tx: Some(self.rvm.begin(mode)?),
            allocs: Vec::new(),
            frees: Vec::new(),
            roots: Vec::new(),
        })
    }

    fn slot_addr(&self, i: usize) -> usize {
        self.static_region.addr() + STATIC_FIXED + i * ROOT_SLOT
    }

    fn read_slot(&self, i: usize) -> Option<(String, u64, u64, u64)> {
        let mut b = [0u8; ROOT_SLOT];
        self.static_region.read(STATIC_FIXED + i * ROOT_SLOT, &mut b)?;
        let n = b[..ROOT_NAME_MAX].iter().position(|&c| c == 0).unwrap_or(ROOT_NAME_MAX);
        if n == 0 {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        Some((String::from_utf8_lossy(&b[..n]).into_owned(), word(40), word(48), word(56)))
    }

    fn root_from_slot(&self, (name, type_tag, off, size): (String, u64, u64, u64)) -> Option<Root> {
        if off >= self.header.heap_len {
            return None;
        }
        let ptr = NonNull::new((self.base() + off as usize + HDR as usize) as *mut u8)?;
        Some(Root { name, ptr, size, type_tag })
    }

    /// The root called `name`.
    pub fn root(&self, name: &str) -> Option<Root> {
        let _st = self.state.lock();
        (0..self.header.root_slots as usize)
            .filter_map(|i| self.read_slot(i))
            .find(|s| s.0 == name)
            .and_then(|s| self.root_from_slot(s))
    }

    /// Every root.
    pub fn roots(&self) -> Vec<Root> {
        let _st = self.state.lock();
        (0..self.header.root_slots as usize)
            .filter_map(|i| self.read_slot(i))
            .filter_map(|s| self.root_from_slot(s))
            .collect()
    }

    /// The root `name`, created if missing: a block of `size` bytes is
    /// allocated, `init` fills it (it receives the zeroed block's bytes), and
    /// the root is recorded, all in one flush transaction. An existing root
    /// with another size or type tag is an error.
    pub fn root_or_create(&self, name: &str, size: usize, type_tag: u64, init: impl FnOnce(&mut [u8])) -> Result<Root> {
        if let Some(r) = self.root(name) {
            if r.size != size as u64 || r.type_tag != type_tag {
                return Err(HeapError::corrupted(
                    format!("root {name:?} (exists with size {} and type tag {:#x})", r.size, r.type_tag),
                    "root table",
                ));
            }
            return Ok(r);
        }
        let mut tx = self.begin(RestoreMode::Restore)?;
        let ptr = tx.malloc(
            Layout::from_size_align(size.max(1), 16)
                .map_err(|_| HeapError::BadAlignment { align: 16, max: MAX_ALIGN })?,
        )?;
        let mut bytes = vec![0u8; size];
        init(&mut bytes);
        raw::store(tx.tx(), ptr.as_ptr() as usize, &bytes)?;
        tx.set_root(name, Some((ptr, size as u64, type_tag)))?;
        tx.commit(CommitMode::Flush)?;
        self.root(name)
            .ok_or_else(|| HeapError::corrupted(format!("root {name:?} (missing after commit)"), "root table"))
    }
}

#[derive(Clone, Copy, Debug)]
struct Walked {
    off: u64,
    header: BlockHeader,
}

/// A root to record at commit: name, and (block offset, size, type tag) or
/// `None` to remove it.
type RootChange = (String, Option<(u64, u64, u64)>);

#[derive(Clone, Copy, Debug)]
struct Reserved {
    off: u64,
    size: u64,
    slack: u32,
}

/// A transaction on the heap: allocations and frees take effect at commit,
/// together with the stores the transaction declares.
#[derive(Debug)]
pub struct HeapTx<'h> {
    heap: &'h Heap,
    tx: Option<Transaction<'h>>,
    allocs: Vec<Reserved>,
    frees: Vec<u64>,
    roots: Vec<RootChange>,
}

impl<'h> HeapTx<'h> {
    /// The core transaction, for declaring ranges of the caller's own data.
    pub fn tx(&mut self) -> &mut Transaction<'h> {
        // The option is only empty after commit or abort, which consume self.
        self.tx.as_mut().expect("heap transaction used after it ended")
    }

    /// Declares `[ptr, ptr + len)` (inside a block of this heap, or any
    /// mapped memory) for stores the caller makes next.
    ///
    /// # Safety
    ///
    /// As [`Transaction::set_range`].
    pub unsafe fn set_range(&mut self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { raw::declare(self.tx(), ptr.as_ptr() as usize, len)? };
        Ok(())
    }

    /// Allocates a block for `layout` (any size, power-of-two alignment up to
    /// 4096). The memory is the transaction's until it ends; if the
    /// transaction aborts, the block returns to the free space.
    pub fn malloc(&mut self, layout: Layout) -> Result<NonNull<u8>> {
        let heap = self.heap;
        let align = layout.align();
        if align > MAX_ALIGN {
            return Err(HeapError::BadAlignment { align, max: MAX_ALIGN });
        }
        let size = layout.size();
        let oom = |largest| HeapError::OutOfMemory { size, align, largest };
        let need = layout::block_size_for(size).ok_or_else(|| oom(0))?;
        let base_mod = (heap.base() % align.max(1)) as u64;
        let (off, block) = {
            let mut st = heap.state.lock();
            match st.avail.take(need, align as u64, base_mod) {
                Some(x) => x,
                None => return Err(oom(st.avail.largest())),
            }
        };
        let slack = (block - HDR - size as u64) as u32;
        self.allocs.push(Reserved { off, size: block, slack });
        let data = heap.base() + (off + HDR) as usize;
        let guard = layout::tail_guard(heap.header.nonce, off);
        // The block's interior is reserved to this transaction alone.
        raw::store(self.tx(), data + size, &guard.to_le_bytes())?;
        NonNull::new(data as *mut u8).ok_or_else(|| oom(0))
    }

    /// Frees a block at commit (or at once, if this transaction allocated
    /// it). Freeing twice, or a pointer the heap did not hand out, is an error.
    pub fn free(&mut self, ptr: NonNull<u8>) -> Result<()> {
        let heap = self.heap;
        let addr = ptr.as_ptr() as usize;
        let bad = HeapError::InvalidPointer { addr };
        let data_off = addr.checked_sub(heap.base()).ok_or(HeapError::InvalidPointer { addr })? as u64;
        if data_off < HDR || !data_off.is_multiple_of(HDR) || data_off >= heap.header.heap_len {
            return Err(bad);
        }
        let off = data_off - HDR;
        let mut st = heap.state.lock();
        if let Some(i) = self.allocs.iter().position(|r| r.off == off) {
            let r = self.allocs.swap_remove(i);
            st.avail.give_back(r.off, r.size);
            return Ok(());
        }
        if st.pending_frees.contains(&off) {
            return Err(HeapError::DoubleFree { addr });
        }
        if let Some((&f, &fs)) = st.committed_free.range(..=off).next_back() {
            if off < f + fs {
                return Err(HeapError::DoubleFree { addr });
            }
        }
        match heap.read_header(off) {
            Ok(h) if h.allocated => {}
            _ => return Err(bad),
        }
        st.pending_frees.insert(off);
        self.frees.push(off);
        Ok(())
    }

    /// Records (or with `None` removes) the root `name` at commit. `target`
    /// is (block pointer from this heap, size, type tag).
    pub fn set_root(&mut self, name: &str, target: Option<(NonNull<u8>, u64, u64)>) -> Result<()> {
        if name.is_empty() || name.len() > ROOT_NAME_MAX || name.contains('\0') {
            return Err(HeapError::BadRootName { name: name.into(), max: ROOT_NAME_MAX });
        }
        let t = match target {
            Some((ptr, size, tag)) => {
                let off = (ptr.as_ptr() as usize)
                    .checked_sub(self.heap.base() + HDR as usize)
                    .filter(|&o| (o as u64) < self.heap.header.heap_len)
                    .ok_or(HeapError::InvalidPointer { addr: ptr.as_ptr() as usize })?;
                Some((off as u64, size, tag))
            }
            None => None,
        };
        self.roots.push((name.into(), t));
        Ok(())
    }

    /// Commits: under the heap lock, writes the headers of allocated and
    /// freed blocks and the root slots into the transaction and commits it
    /// (see the module docs for why this never tangles with other
    /// transactions); with [`CommitMode::Flush`] then waits for durability.
    pub fn commit(mut self, mode: CommitMode) -> Result<()> {
        let heap = self.heap;
        let mut tx = self.tx.take().expect("heap transaction used after it ended");
        let allocs = std::mem::take(&mut self.allocs);
        let frees = std::mem::take(&mut self.frees);
        let roots = std::mem::take(&mut self.roots);
        let mut st = heap.state.lock();
        let mut undo = Undo::default();
        let r = apply_intents(heap, &mut st, &mut tx, &allocs, &frees, &roots, &mut undo)
            .and_then(|()| tx.commit(CommitMode::NoFlush).map_err(HeapError::from));
        match r {
            Ok(()) => {
                let State { avail, pending_frees, stats, .. } = &mut *st;
                for r in &allocs {
                    stats.allocations += 1;
                    stats.live_blocks += 1;
                    stats.bytes_in_use += r.size;
                    stats.live_per_class[class_of(r.size)] += 1;
                }
                for &(off, size) in &undo.freed {
                    pending_frees.remove(&off);
                    avail.give_back(off, size);
                    stats.frees += 1;
                    stats.live_blocks -= 1;
                    stats.bytes_in_use -= size;
                    stats.live_per_class[class_of(size)] -= 1;
                }
                drop(st);
                if mode == CommitMode::Flush {
                    heap.rvm.flush()?;
                }
                Ok(())
            }
            Err(e) => {
                // The core aborted the transaction; put back what the heap
                // changed in memory and in its mirror, under the same lock.
                undo.rollback(heap, &mut st);
                for r in &allocs {
                    st.avail.give_back(r.off, r.size);
                }
                for off in &frees {
                    st.pending_frees.remove(off);
                }
                Err(e)
            }
        }
    }

    /// Aborts: reserved blocks return to the free space, frees are dropped,
    /// and (restore mode) declared stores are undone.
    pub fn abort(self) {}
}

impl Drop for HeapTx<'_> {
    fn drop(&mut self) {
        if self.tx.is_none() {
            return;
        }
        let mut st = self.heap.state.lock();
        for r in self.allocs.drain(..) {
            st.avail.give_back(r.off, r.size);
        }
        for off in self.frees.drain(..) {
            st.pending_frees.remove(&off);
        }
        drop(st);
        // Dropping the core transaction aborts it.
        self.tx = None;
    }
}

/// What a commit changed, to put back if the core commit fails.
#[derive(Debug, Default)]
struct Undo {
    /// Every store made: (address, offset of its old bytes in `old`, length).
    stores: Vec<(usize, usize, usize)>,
    old: Vec<u8>,
    /// Mirror entries removed and inserted.
    removed: Vec<(u64, u64)>,
    inserted: Vec<u64>,
    /// Blocks freed: (offset, size).
    freed: Vec<(u64, u64)>,
}

impl Undo {
    fn store(&mut self, heap: &Heap, tx: &mut Transaction<'_>, addr: usize, bytes: &[u8]) -> Result<()> {
        let at = self.old.len();
        self.old.resize(at + bytes.len(), 0);
        heap.read_mem(addr, &mut self.old[at..]);
        self.stores.push((addr, at, bytes.len()));
        raw::store(tx, addr, bytes)?;
        Ok(())
    }

    fn remove(&mut self, st: &mut State, off: u64) -> Option<u64> {
        let size = st.committed_free.remove(&off)?;
        self.removed.push((off, size));
        Some(size)
    }

    fn insert(&mut self, st: &mut State, off: u64, size: u64) {
        st.committed_free.insert(off, size);
        self.inserted.push(off);
    }

    fn rollback(self, heap: &Heap, st: &mut State) {
        for off in self.inserted.iter().rev() {
            st.committed_free.remove(off);
        }
        for &(off, size) in self.removed.iter().rev() {
            st.committed_free.insert(off, size);
        }
        // Still under the heap lock: nobody else writes headers or slots,
        // and the failed transaction is over.
        for &(addr, at, len) in self.stores.iter().rev() {
            heap.write_back(addr, &self.old[at..at + len]);
        }
    }
}

fn apply_intents(
    heap: &Heap,
    st: &mut State,
    tx: &mut Transaction<'_>,
    allocs: &[Reserved],
    frees: &[u64],
    roots: &[RootChange],
    undo: &mut Undo,
) -> Result<()> {
    let base = heap.base();
    let nonce = heap.header.nonce;
    let corrupt =
        |what: &str, off: u64| HeapError::corrupted(format!("heap layout ({what})"), format!("heap offset {off:#x}"));
    for r in allocs {
        // The committed free block that contains the reservation.
        let (f, fs) = match st.committed_free.range(..=r.off).next_back() {
            Some((&f, &fs)) if r.off + r.size <= f + fs => (f, fs),
            _ => return Err(corrupt("reserved block outside committed free space", r.off)),
        };
        undo.remove(st, f);
        if r.off > f {
            undo.insert(st, f, r.off - f);
            let h = BlockHeader { size: r.off - f, allocated: false, slack: 0 };
            undo.store(heap, tx, base + f as usize, &h.encode(nonce, f))?;
        }
        let h = BlockHeader { size: r.size, allocated: true, slack: r.slack };
        undo.store(heap, tx, base + r.off as usize, &h.encode(nonce, r.off))?;
        let end = r.off + r.size;
        if end < f + fs {
            undo.insert(st, end, f + fs - end);
            let h = BlockHeader { size: f + fs - end, allocated: false, slack: 0 };
            undo.store(heap, tx, base + end as usize, &h.encode(nonce, end))?;
        }
    }
    for &off in frees {
        let h = heap.read_header(off).map_err(|why| corrupt(why, off))?;
        let (mut start, mut end) = (off, off + h.size);
        if let Some((&p, &ps)) = st.committed_free.range(..off).next_back() {
            if p + ps == off {
                undo.remove(st, p);
                start = p;
                // The freed block's header is now interior: invalidate it so
                // a stale pointer can never pass for a live block.
                undo.store(heap, tx, base + off as usize, &[0u8; HDR as usize])?;
            }
        }
        if let Some(&ns) = st.committed_free.get(&end) {
            undo.remove(st, end);
            end += ns;
        }
        undo.insert(st, start, end - start);
        let fh = BlockHeader { size: end - start, allocated: false, slack: 0 };
        undo.store(heap, tx, base + start as usize, &fh.encode(nonce, start))?;
        undo.freed.push((off, h.size));
    }
    for (name, target) in roots {
        let slots = heap.header.root_slots as usize;
        let existing = (0..slots).find(|&i| heap.read_slot(i).is_some_and(|s| &s.0 == name));
        let slot = match (existing, target) {
            (Some(i), _) => i,
            (None, None) => continue,
            (None, Some(_)) => {
                (0..slots).find(|&i| heap.read_slot(i).is_none()).ok_or(HeapError::RootsFull { slots })?
            }
        };
        let mut b = [0u8; ROOT_SLOT];
        if let Some((off, size, tag)) = target {
            b[..name.len()].copy_from_slice(name.as_bytes());
            b[40..48].copy_from_slice(&tag.to_le_bytes());
            b[48..56].copy_from_slice(&off.to_le_bytes());
            b[56..64].copy_from_slice(&size.to_le_bytes());
        }
        undo.store(heap, tx, heap.slot_addr(slot), &b)?;
    }
    Ok(())
}
