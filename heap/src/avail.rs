//! The volatile index of free space available to new allocations: free
//! extents by address (for coalescing) and by size (for best fit), plus
//! per-size caches filled by preallocation. Rebuilt from the persistent
//! block headers at load; never stored.

use crate::layout::{HDR, MIN_BLOCK};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Free extents not reserved by any transaction, as heap offsets.
#[derive(Debug, Default)]
pub(crate) struct Avail {
    by_addr: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
    /// Preallocated blocks by block size.
    cache: HashMap<u64, Vec<u64>>,
    free_bytes: u64,
    cached_bytes: u64,
}

impl Avail {
    /// Free bytes (extents and caches).
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes + self.cached_bytes
    }

    /// Size of the largest free extent.
    pub fn largest(&self) -> u64 {
        self.by_size.last().map_or(0, |&(s, _)| s)
    }

    /// Extents, by address.
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.by_addr.iter().map(|(&a, &s)| (a, s))
    }

    /// Cached blocks as (offset, size).
    pub fn cached(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.cache.iter().flat_map(|(&s, v)| v.iter().map(move |&a| (a, s)))
    }

    fn insert_raw(&mut self, at: u64, size: u64) {
        self.by_addr.insert(at, size);
        self.by_size.insert((size, at));
        self.free_bytes += size;
    }

    fn remove_raw(&mut self, at: u64, size: u64) {
        self.by_addr.remove(&at);
        self.by_size.remove(&(size, at));
        self.free_bytes -= size;
    }

    /// Returns `[at, at + size)` to the free space, merging neighbours.
    pub fn give_back(&mut self, mut at: u64, mut size: u64) {
        if let Some((&p, &ps)) = self.by_addr.range(..at).next_back() {
            if p + ps == at {
                self.remove_raw(p, ps);
                at = p;
                size += ps;
            }
        }
        if let Some(&ns) = self.by_addr.get(&(at + size)) {
            self.remove_raw(at + size, ns);
            size += ns;
        }
        self.insert_raw(at, size);
    }

    /// Takes a block of `need` bytes (multiple of 16, at least MIN_BLOCK)
    /// whose user data (`HDR` after its start) is aligned to `align`
    /// relative to the heap start plus `base_mod` (the heap's address modulo
    /// `align`). Best fit; returns (offset, block size), the size possibly a
    /// little larger than `need` when the leftover is too small to stand alone.
    pub fn take(&mut self, need: u64, align: u64, base_mod: u64) -> Option<(u64, u64)> {
        if let Some(v) = self.cache.get_mut(&need) {
            if let Some(at) = v.pop() {
                if align <= HDR || (base_mod + at + HDR).is_multiple_of(align) {
                    self.cached_bytes -= need;
                    return Some((at, need));
                }
                v.push(at);
            }
        }
        // Best fit: the smallest extent that can hold the block aligned.
        let mut found = None;
        for &(size, at) in self.by_size.range((need, 0)..) {
            let start = aligned_start(at, size, need, align, base_mod)?;
            if let Some(start) = start {
                found = Some((at, size, start));
                break;
            }
        }
        let (at, size, start) = found?;
        self.remove_raw(at, size);
        if start > at {
            self.insert_raw(at, start - at);
        }
        let end = at + size;
        let mut block = need;
        let rest = end - (start + need);
        if rest >= MIN_BLOCK {
            self.insert_raw(start + need, rest);
        } else {
            block += rest;
        }
        Some((start, block))
    }

    /// Moves `count` blocks of `size` bytes into the cache for `size`.
    pub fn preallocate(&mut self, size: u64, count: usize) -> usize {
        let mut done = 0;
        for _ in 0..count {
            match self.take(size, HDR, 0) {
                Some((at, got)) if got == size => {
                    self.cache.entry(size).or_default().push(at);
                    self.cached_bytes += size;
                    done += 1;
                }
                Some((at, got)) => {
                    self.give_back(at, got);
                    break;
                }
                None => break,
            }
        }
        done
    }
}

/// Where in extent `[at, at+size)` a block of `need` bytes can start so
/// that its data is aligned; the gap before it must be zero or a whole
/// block. `None` inside `Some` = does not fit in this extent.
fn aligned_start(at: u64, size: u64, need: u64, align: u64, base_mod: u64) -> Option<Option<u64>> {
    if align <= HDR {
        return Some(Some(at));
    }
    let data = at.checked_add(HDR)?;
    let mis = (base_mod + data) % align;
    let mut start = if mis == 0 { at } else { at + (align - mis) };
    // A gap before the block must be able to stand alone as a free block:
    // step by whole multiples of `align` until it can.
    while start > at && start - at < MIN_BLOCK {
        start = start.checked_add(align)?;
    }
    Some((start + need <= at + size).then_some(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_splits_and_merges() {
        let mut a = Avail::default();
        a.give_back(0, 1024);
        let (x, s) = a.take(64, 16, 0).unwrap();
        assert_eq!((x, s), (0, 64));
        assert_eq!(a.free_bytes(), 960);
        a.give_back(x, s);
        assert_eq!(a.extents().collect::<Vec<_>>(), vec![(0, 1024)]);
    }

    #[test]
    fn small_leftovers_are_absorbed() {
        let mut a = Avail::default();
        a.give_back(0, 80);
        assert_eq!(a.take(64, 16, 0), Some((0, 80)));
        assert_eq!(a.free_bytes(), 0);
    }

    #[test]
    fn aligned_blocks_leave_whole_gaps() {
        let mut a = Avail::default();
        a.give_back(0, 8192);
        let (x, _) = a.take(64, 256, 0).unwrap();
        assert_eq!((x + HDR) % 256, 0);
        assert!(x == 0 || x >= MIN_BLOCK);
        for (at, size) in a.extents() {
            assert!(size >= MIN_BLOCK, "fragment {at}+{size}");
        }
    }

    #[test]
    fn preallocated_blocks_are_used_first() {
        let mut a = Avail::default();
        a.give_back(0, 4096);
        assert_eq!(a.preallocate(64, 4), 4);
        let (x, s) = a.take(64, 16, 0).unwrap();
        assert_eq!(s, 64);
        assert!(x < 256);
        assert_eq!(a.free_bytes(), 4096 - 64);
    }
}
