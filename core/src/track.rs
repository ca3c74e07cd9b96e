//! Page tracking shared by commits, transactions and the generation
//! checkpoint: per-region dirty page sets (one per generation), the pages a
//! no-restore abort polluted, the pages the write barrier copied, and the
//! ranges each open transaction declared.

use crate::mem;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A set of pages: one bit per page in atomic words, so commits can mark
/// pages while the sweep clears others.
///
/// The words come in chunks allocated on first insertion, so a region
/// with a large reservation (a heap that may grow to tens of gigabytes)
/// costs memory only for the part that is written to.
#[derive(Debug)]
pub(crate) struct PageBits {
    chunks: Box<[std::sync::OnceLock<Box<[AtomicU64]>>]>,
    /// Words per chunk.
    chunk: usize,
}

/// Most words in one chunk (64 Ki pages, 256 MiB of 4 KiB pages).
const CHUNK_WORDS: usize = 1024;

impl PageBits {
    pub fn new(pages: usize) -> PageBits {
        let words = pages.div_ceil(64).max(1);
        let chunk = words.min(CHUNK_WORDS);
        PageBits { chunks: (0..words.div_ceil(chunk)).map(|_| std::sync::OnceLock::new()).collect(), chunk }
    }

    /// Word `i`, if its chunk exists.
    fn word(&self, i: usize) -> Option<&AtomicU64> {
        self.chunks.get(i / self.chunk)?.get().map(|c| &c[i % self.chunk])
    }

    /// Word `i`, its chunk allocated if needed.
    fn word_mut(&self, i: usize) -> &AtomicU64 {
        let chunk = self.chunk;
        &self.chunks[i / chunk].get_or_init(|| (0..chunk).map(|_| AtomicU64::new(0)).collect())[i % chunk]
    }

    /// The allocated words with their indexes, in order.
    fn words(&self) -> impl Iterator<Item = (usize, &AtomicU64)> + '_ {
        let chunk = self.chunk;
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(c, w)| w.get().map(|w| (c, w)))
            .flat_map(move |(c, w)| w.iter().enumerate().map(move |(i, w)| (c * chunk + i, w)))
    }

    /// Adds pages `first..=last`.
    pub fn insert_range(&self, first: usize, last: usize) {
        let mut p = first;
        while p <= last {
            let bit = p % 64;
            let n = (64 - bit).min(last - p + 1);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            self.word_mut(p / 64).fetch_or(mask, Ordering::AcqRel);
            p += n;
        }
    }

    pub fn contains(&self, p: usize) -> bool {
        self.word(p / 64).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (p % 64)) != 0)
    }

    pub fn remove(&self, p: usize) {
        if let Some(w) = self.word(p / 64) {
            w.fetch_and(!(1 << (p % 64)), Ordering::AcqRel);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.words().all(|(_, w)| w.load(Ordering::Acquire) == 0)
    }

    /// Pages in the set.
    pub fn count(&self) -> usize {
        self.words().map(|(_, w)| w.load(Ordering::Acquire).count_ones() as usize).sum()
    }

    /// The first page at or after `from` in the set.
    pub fn next(&self, from: usize) -> Option<usize> {
        let first = from / 64;
        let mut mask = u64::MAX << (from % 64);
        for c in first / self.chunk..self.chunks.len() {
            let Some(words) = self.chunks[c].get() else {
                mask = u64::MAX;
                continue;
            };
            let skip = if c == first / self.chunk { first % self.chunk } else { 0 };
            for (j, w) in words.iter().enumerate().skip(skip) {
                let w = w.load(Ordering::Acquire) & mask;
                mask = u64::MAX;
                if w != 0 {
                    return Some((c * self.chunk + j) * 64 + w.trailing_zeros() as usize);
                }
            }
        }
        None
    }

    /// Moves every page of `self` into `other`.
    pub fn move_into(&self, other: &PageBits) {
        for (i, a) in self.words() {
            let w = a.swap(0, Ordering::AcqRel);
            if w != 0 {
                other.word_mut(i).fetch_or(w, Ordering::AcqRel);
            }
        }
    }

    /// Pages in the set, in order.
    pub fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.intersection(self)
    }

    /// Pages in both `self` and `other`, in order.
    pub fn intersection<'a>(&'a self, other: &'a PageBits) -> impl Iterator<Item = usize> + 'a {
        self.words().filter_map(move |(i, a)| other.word(i).map(|b| (i, a, b))).flat_map(|(i, a, b)| {
            let mut w = a.load(Ordering::Acquire) & b.load(Ordering::Acquire);
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros() as usize;
                    w &= w - 1;
                    i * 64 + bit
                })
            })
        })
    }
}

/// A value on cache lines of its own, so that one thread's stores to it do
/// not slow down other threads' loads of its neighbours (false sharing).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A region's checkpoint bookkeeping.
#[derive(Debug)]
pub(crate) struct RegionTrack {
    /// Pages changed by commits, one set per generation.
    pub dirty: [PageBits; 2],
    /// Pages whose memory may differ from the committed image outside any
    /// open transaction (a no-restore abort left its stores there). The
    /// sweep always rebuilds them from the segment and the log.
    pub polluted: PageBits,
    /// Pages with a barrier copy in the running checkpoint's pool: exactly
    /// the pool's keys for this region (changed only with the copy lock
    /// held), so a store into a page copied already skips the lock.
    pub copied: PageBits,
}

impl RegionTrack {
    pub fn new(len: usize) -> RegionTrack {
        let pages = len.div_ceil(mem::page_size());
        RegionTrack {
            dirty: [PageBits::new(pages), PageBits::new(pages)],
            polluted: PageBits::new(pages),
            copied: PageBits::new(pages),
        }
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty[0].is_empty() || !self.dirty[1].is_empty()
    }
}

/// The ranges an open transaction has declared, visible to a freeze.
#[derive(Debug, Default)]
pub(crate) struct TxTrack {
    pub(crate) ranges: Mutex<Vec<(usize, usize)>>,
}

impl TxTrack {
    pub fn record(&self, addr: usize, len: usize) {
        self.ranges.lock().push((addr, len));
    }
}
