//! The volatile index of free space available to new allocations. Rebuilt
//! from the persistent block headers at load; never stored.
//!
//! Three parts, all holding heap offsets of space that lies in committed free
//! blocks and is reserved by no transaction:
//!
//! - **Size classes** (quick lists) for small blocks: one LIFO list per block
//!   size from 32 to [`SMALL_MAX`] bytes in steps of 16. A small block freed
//!   (or returned by an abort) goes to its list as it is, without merging, so
//!   the next request of that size takes it in O(1). The lists hold at most
//!   `bin_limit` bytes; past that, blocks are merged into the extents.
//! - **Extents**: maximal free runs by address (for merging neighbours) and
//!   by size (best fit), for large blocks and for small ones when their list
//!   is empty.
//! - **Preallocated blocks** of any size ([`Avail::preallocate`], RDS's
//!   preallocation), used first for requests of exactly that size.
//!
//! When the extents cannot satisfy a request, the lists and preallocated
//! blocks are merged back into the extents and the search is repeated, so a
//! request fails only when no free run can hold it.
//!
//! The persistent layout is independent of all this: free blocks are always
//! merged there (see `heap.rs`).

use crate::layout::{HDR, MIN_BLOCK};
use std::collections::{BTreeMap, BTreeSet};

/// Largest block size kept in a size class.
pub(crate) const SMALL_MAX: u64 = 1024;
/// Number of size classes (block sizes 32, 48, ..., [`SMALL_MAX`]).
pub(crate) const CLASSES: usize = ((SMALL_MAX - MIN_BLOCK) / HDR + 1) as usize;
/// How many candidates best fit examines for an aligned request before it
/// settles for an extent large enough to fit at any alignment.
const ALIGNED_PROBES: usize = 32;

fn class_of(size: u64) -> Option<usize> {
    (size <= SMALL_MAX).then(|| ((size - MIN_BLOCK) / HDR) as usize)
}

/// Free space not reserved by any transaction, as heap offsets.
#[derive(Debug)]
pub(crate) struct Avail {
    by_addr: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
    extent_bytes: u64,
    /// Size classes: free blocks of exactly `32 + 16 * i` bytes.
    bins: Vec<Vec<u64>>,
    binned_bytes: u64,
    bin_limit: u64,
    /// Preallocated blocks by block size.
    cache: BTreeMap<u64, Vec<u64>>,
    cached_bytes: u64,
}

impl Default for Avail {
    fn default() -> Self {
        Avail::new(u64::MAX)
    }
}

impl Avail {
    /// An empty index whose size classes hold at most `bin_limit` bytes.
    pub fn new(bin_limit: u64) -> Avail {
        Avail {
            by_addr: BTreeMap::new(),
            by_size: BTreeSet::new(),
            extent_bytes: 0,
            bins: vec![Vec::new(); CLASSES],
            binned_bytes: 0,
            bin_limit,
            cache: BTreeMap::new(),
            cached_bytes: 0,
        }
    }

    /// Free bytes (extents, size classes and preallocated blocks).
    pub fn free_bytes(&self) -> u64 {
        self.extent_bytes + self.binned_bytes + self.cached_bytes
    }

    /// Size of the largest free block or extent.
    pub fn largest(&self) -> u64 {
        let extent = self.by_size.last().map_or(0, |&(s, _)| s);
        let cached = self.cache.iter().rev().find(|(_, v)| !v.is_empty()).map_or(0, |(&s, _)| s);
        let binned = self.bins.iter().rposition(|v| !v.is_empty()).map_or(0, |i| MIN_BLOCK + i as u64 * HDR);
        extent.max(cached).max(binned)
    }

    /// Free extents.
    pub fn extent_count(&self) -> usize {
        self.by_addr.len()
    }

    /// Blocks waiting in the size classes, per class.
    pub fn binned(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.bins.iter().enumerate().map(|(i, v)| (MIN_BLOCK + i as u64 * HDR, v.len()))
    }

    /// Everything available, as (offset, size): extents, size classes and
    /// preallocated blocks.
    pub fn all(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let extents = self.by_addr.iter().map(|(&a, &s)| (a, s));
        let bins =
            self.bins.iter().enumerate().flat_map(|(i, v)| v.iter().map(move |&a| (a, MIN_BLOCK + i as u64 * HDR)));
        let cache = self.cache.iter().flat_map(|(&s, v)| v.iter().map(move |&a| (a, s)));
        extents.chain(bins).chain(cache)
    }

    /// Changes how many bytes the size classes may hold (a heap that grew
    /// keeps its classes at the same share of its size). Blocks already in
    /// the classes stay there.
    pub fn set_bin_limit(&mut self, bin_limit: u64) {
        self.bin_limit = bin_limit;
    }

    /// Fills an empty index with `extents`: sorted by address, none
    /// adjacent to or overlapping another (a heap's free blocks at load).
    /// Bulk-built, without a lookup per extent.
    pub fn fill_sorted(&mut self, extents: &[(u64, u64)]) {
        debug_assert!(self.by_addr.is_empty() && extents.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
        self.by_addr = extents.iter().copied().collect();
        let mut by_size: Vec<(u64, u64)> = extents.iter().map(|&(at, size)| (size, at)).collect();
        by_size.sort_unstable();
        self.by_size = by_size.into_iter().collect();
        self.extent_bytes = extents.iter().map(|e| e.1).sum();
    }

    fn insert_extent(&mut self, at: u64, size: u64) {
        self.by_addr.insert(at, size);
        self.by_size.insert((size, at));
        self.extent_bytes += size;
    }

    fn remove_extent(&mut self, at: u64, size: u64) {
        self.by_addr.remove(&at);
        self.by_size.remove(&(size, at));
        self.extent_bytes -= size;
    }

    /// Returns a block to the free space: to its size class if it is small
    /// and the classes have room, else merged into the extents.
    pub fn release(&mut self, at: u64, size: u64) {
        if let Some(c) = class_of(size) {
            if self.binned_bytes + size <= self.bin_limit {
                self.bins[c].push(at);
                self.binned_bytes += size;
                return;
            }
        }
        self.merge(at, size);
    }

    /// Returns `[at, at + size)` to the extents, merging neighbours.
    pub fn merge(&mut self, mut at: u64, mut size: u64) {
        if let Some((&p, &ps)) = self.by_addr.range(..at).next_back() {
            if p + ps == at {
                self.remove_extent(p, ps);
                at = p;
                size += ps;
            }
        }
        if let Some(&ns) = self.by_addr.get(&(at + size)) {
            self.remove_extent(at + size, ns);
            size += ns;
        }
        self.insert_extent(at, size);
    }

    /// Merges every block of the size classes and every preallocated block
    /// into the extents; returns whether there were any.
    pub fn consolidate(&mut self) -> bool {
        let mut any = false;
        for i in 0..self.bins.len() {
            let size = MIN_BLOCK + i as u64 * HDR;
            for at in std::mem::take(&mut self.bins[i]) {
                self.merge(at, size);
                any = true;
            }
        }
        self.binned_bytes = 0;
        for (size, v) in std::mem::take(&mut self.cache) {
            for at in v {
                self.merge(at, size);
                any = true;
            }
        }
        self.cached_bytes = 0;
        any
    }

    /// Takes a block of `need` bytes (multiple of 16, at least MIN_BLOCK)
    /// whose user data (`HDR` after its start) is aligned to `align` (a power
    /// of two) relative to address `base_mod + offset` (`base_mod` is the
    /// heap's address modulo `align`). Returns (offset, block size), the size
    /// possibly a little larger than `need` when the rest of an extent is too
    /// small to stand alone.
    pub fn take(&mut self, need: u64, align: u64, base_mod: u64) -> Option<(u64, u64)> {
        let fits = |at: u64| align <= HDR || (base_mod + at + HDR).is_multiple_of(align);
        if let Some(c) = class_of(need) {
            if let Some(&at) = self.bins[c].last() {
                if fits(at) {
                    self.bins[c].pop();
                    self.binned_bytes -= need;
                    return Some((at, need));
                }
            }
        }
        if let Some(v) = self.cache.get_mut(&need) {
            if let Some(&at) = v.last() {
                if fits(at) {
                    v.pop();
                    self.cached_bytes -= need;
                    return Some((at, need));
                }
            }
        }
        if let Some(x) = self.take_extent(need, align, base_mod) {
            return Some(x);
        }
        if self.consolidate() {
            return self.take_extent(need, align, base_mod);
        }
        None
    }

    fn take_extent(&mut self, need: u64, align: u64, base_mod: u64) -> Option<(u64, u64)> {
        let (at, size, start) = self.find_extent(need, align, base_mod)?;
        self.remove_extent(at, size);
        if start > at {
            self.insert_extent(at, start - at);
        }
        let end = at + size;
        let mut block = need;
        let rest = end - (start + need);
        if rest >= MIN_BLOCK {
            self.insert_extent(start + need, rest);
        } else {
            block += rest;
        }
        Some((start, block))
    }

    /// Best fit: the smallest extent that holds the block at the alignment.
    /// For an aligned request that does not fit the first few candidates,
    /// the smallest extent that fits at any alignment, and only if there is
    /// none, every candidate (so a request fails only if nothing fits).
    fn find_extent(&self, need: u64, align: u64, base_mod: u64) -> Option<(u64, u64, u64)> {
        let fit = |&(size, at): &(u64, u64)| aligned_start(at, size, need, align, base_mod).map(|s| (at, size, s));
        if align <= HDR {
            return self.by_size.range((need, 0)..).next().and_then(fit);
        }
        if let Some(x) = self.by_size.range((need, 0)..).take(ALIGNED_PROBES).find_map(fit) {
            return Some(x);
        }
        // An extent of need + align + MIN_BLOCK bytes fits at any alignment.
        let sure = need.checked_add(align)?.checked_add(MIN_BLOCK)?;
        if let Some(x) = self.by_size.range((sure, 0)..).next().and_then(fit) {
            return Some(x);
        }
        self.by_size.range((need, 0)..(sure, 0)).skip(ALIGNED_PROBES).find_map(fit)
    }

    /// Moves up to `count` blocks of `size` bytes from the extents into the
    /// preallocated blocks for `size`; returns how many it moved.
    pub fn preallocate(&mut self, size: u64, count: usize) -> usize {
        let mut done = 0;
        for _ in 0..count {
            match self.take_extent(size, HDR, 0) {
                Some((at, got)) if got == size => {
                    self.cache.entry(size).or_default().push(at);
                    self.cached_bytes += size;
                    done += 1;
                }
                Some((at, got)) => {
                    self.merge(at, got);
                    break;
                }
                None => break,
            }
        }
        done
    }

    /// Checks the index's own consistency: both extent maps agree, extents
    /// are maximal, nothing overlaps, and the byte counts add up.
    pub fn verify(&self) -> Result<(), String> {
        if self.by_addr.len() != self.by_size.len() {
            return Err(format!("{} extents by address, {} by size", self.by_addr.len(), self.by_size.len()));
        }
        let mut prev_end = None;
        let mut sum = 0;
        for (&at, &size) in &self.by_addr {
            if !self.by_size.contains(&(size, at)) {
                return Err(format!("extent {at:#x}+{size:#x} missing from the size index"));
            }
            if size < MIN_BLOCK || !at.is_multiple_of(HDR) || !size.is_multiple_of(HDR) {
                return Err(format!("extent {at:#x}+{size:#x} is not a valid block"));
            }
            if prev_end == Some(at) {
                return Err(format!("extents touch at {at:#x} (not merged)"));
            }
            prev_end = Some(at + size);
            sum += size;
        }
        if sum != self.extent_bytes {
            return Err(format!("extents hold {sum} bytes, counted {}", self.extent_bytes));
        }
        let binned: u64 =
            self.bins.iter().enumerate().map(|(i, v)| v.len() as u64 * (MIN_BLOCK + i as u64 * HDR)).sum();
        let cached: u64 = self.cache.iter().map(|(&s, v)| v.len() as u64 * s).sum();
        if binned != self.binned_bytes || cached != self.cached_bytes {
            return Err(format!(
                "size classes hold {binned} bytes (counted {}), preallocated blocks {cached} (counted {})",
                self.binned_bytes, self.cached_bytes
            ));
        }
        let mut spans: Vec<(u64, u64)> = self.all().collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(format!("free space {:#x}+{:#x} overlaps {:#x}", w[0].0, w[0].1, w[1].0));
            }
        }
        Ok(())
    }
}

/// Where in extent `[at, at + size)` a block of `need` bytes can start so
/// that its data is aligned; the gap before it must be zero or a whole
/// block. `None` if it does not fit in this extent.
fn aligned_start(at: u64, size: u64, need: u64, align: u64, base_mod: u64) -> Option<u64> {
    let end = at.checked_add(size)?;
    if align <= HDR {
        return (need <= size).then_some(at);
    }
    let data = base_mod.checked_add(at)?.checked_add(HDR)?;
    let mis = data % align;
    let mut start = if mis == 0 { at } else { at.checked_add(align - mis)? };
    // A gap before the block must be able to stand alone as a free block:
    // step by whole multiples of `align` until it can (align >= 32 here).
    if start > at && start - at < MIN_BLOCK {
        start = start.checked_add(align)?;
    }
    (start.checked_add(need)? <= end).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_splits_and_merges() {
        let mut a = Avail::default();
        a.merge(0, 2048);
        let (x, s) = a.take(1536, 16, 0).unwrap();
        assert_eq!((x, s), (0, 1536));
        assert_eq!(a.free_bytes(), 512);
        a.release(x, s);
        assert_eq!(a.all().collect::<Vec<_>>(), vec![(0, 2048)]);
        a.verify().unwrap();
    }

    #[test]
    fn small_blocks_use_their_size_class() {
        let mut a = Avail::default();
        a.merge(0, 4096);
        let (x, s) = a.take(64, 16, 0).unwrap();
        let (y, _) = a.take(64, 16, 0).unwrap();
        a.release(x, s);
        assert_eq!(a.free_bytes(), 4096 - 64);
        // Not merged back: the next request of that size gets it at once.
        assert_eq!(a.take(64, 16, 0), Some((x, 64)));
        a.release(x, 64);
        a.release(y, 64);
        a.verify().unwrap();
        // A request nothing else can hold merges the classes back first.
        assert_eq!(a.take(4096, 16, 0), Some((0, 4096)));
        assert_eq!(a.free_bytes(), 0);
        a.verify().unwrap();
    }

    #[test]
    fn the_size_classes_are_bounded() {
        let mut a = Avail::new(128);
        a.merge(0, 4096);
        let blocks: Vec<_> = (0..4).map(|_| a.take(64, 16, 0).unwrap()).collect();
        for &(x, s) in &blocks {
            a.release(x, s);
        }
        assert_eq!(a.binned().map(|(_, n)| n).sum::<usize>(), 2);
        assert_eq!(a.free_bytes(), 4096);
        a.verify().unwrap();
    }

    #[test]
    fn small_leftovers_are_absorbed() {
        let mut a = Avail::default();
        a.merge(0, 2080);
        assert_eq!(a.take(2064, 16, 0), Some((0, 2080)));
        assert_eq!(a.free_bytes(), 0);
    }

    #[test]
    fn aligned_blocks_leave_whole_gaps() {
        let mut a = Avail::default();
        a.merge(0, 8192);
        for align in [32, 64, 256, 4096] {
            let (x, _) = a.take(64, align, 0).unwrap();
            assert_eq!((x + HDR) % align, 0);
        }
        for (at, size) in a.all() {
            assert!(size >= MIN_BLOCK, "fragment {at}+{size}");
        }
        a.verify().unwrap();
        // Relative to a heap base that is not itself aligned.
        let mut b = Avail::default();
        b.merge(0, 1 << 20);
        let (x, _) = b.take(48, 1 << 16, 4096).unwrap();
        assert_eq!((4096 + x + HDR) % (1 << 16), 0);
        assert_eq!(b.take(48, 1 << 40, 4096), None, "alignment larger than the heap");
        b.verify().unwrap();
    }

    #[test]
    fn aligned_search_finds_a_fit_beyond_the_probes() {
        let mut a = Avail::default();
        // Many extents too small to hold an aligned block, then one that can.
        for i in 0..100 {
            a.merge(i * 4096, 96);
        }
        a.merge(100 * 4096, 4096 + 64);
        let (x, _) = a.take(64, 4096, 0).unwrap();
        assert_eq!((x + HDR) % 4096, 0);
    }

    #[test]
    fn preallocated_blocks_are_used_first() {
        let mut a = Avail::default();
        a.merge(0, 1 << 16);
        assert_eq!(a.preallocate(2048, 4), 4);
        let (x, s) = a.take(2048, 16, 0).unwrap();
        assert_eq!(s, 2048);
        assert!(x < 4 * 2048);
        assert_eq!(a.free_bytes(), (1 << 16) - 2048);
        a.verify().unwrap();
    }
}
