//! Range coalescing: one routine serves inter-transaction coalescing of
//! unflushed commits, and the replay of log records onto segments
//! (recovery and truncation).
//!
//! Input is a list of pieces in commit order; later pieces win where they
//! overlap. Output is the union as maximal runs: overlapping or adjacent
//! pieces of one segment become a single run holding the newest bytes.

/// One range of new bytes, in commit order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Segment id.
    pub segment: u32,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
    /// Where the bytes are in the accompanying data buffer.
    pub data_at: usize,
}

/// A piece as the sort sees it: its sort key and all the loop needs, so
/// the sorted order is walked without looking pieces up at random.
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    segment: u32,
    /// Index in commit order (ties between equal offsets keep it).
    index: u32,
    offset: u64,
    len: usize,
    data_at: usize,
}

impl Entry {
    /// Segment (bits 96..128), offset (32..96), index (0..32): sorting by
    /// it sorts by (segment, offset) and keeps commit order among pieces
    /// that start together.
    fn key(&self) -> u128 {
        (self.segment as u128) << 96 | (self.offset as u128) << 32 | self.index as u128
    }

    fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// How many pieces ahead [`Coalescer::run`] prefetches bytes.
const PREFETCH_AHEAD: usize = 16;

/// Reusable buffers of [`Coalescer::run`].
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    entries: Vec<Entry>,
    /// The radix sort's second buffer.
    sorted: Vec<Entry>,
    /// A merged cluster's bytes.
    run: Vec<u8>,
}

impl Coalescer {
    /// Calls `emit(segment, offset, bytes)` for each coalesced run, in
    /// (segment, offset) order.
    pub(crate) fn run<E>(
        &mut self,
        pieces: &[Piece],
        data: &[u8],
        mut emit: impl FnMut(u32, u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let Coalescer { entries, sorted, run } = self;
        // The index takes the low 32 bits of a key.
        debug_assert!(pieces.len() <= u32::MAX as usize, "too many pieces for one coalescing");
        entries.clear();
        entries.extend(pieces.iter().enumerate().map(|(i, p)| Entry {
            segment: p.segment,
            index: i as u32,
            offset: p.offset,
            len: p.len,
            data_at: p.data_at,
        }));
        radix_sort(entries, sorted, Entry::key);
        let mut i = 0;
        while i < entries.len() {
            // The bytes are read in offset order, far from commit order: ask
            // for those of a piece a few steps ahead.
            if let Some(ahead) = entries.get(i + PREFETCH_AHEAD) {
                crate::mem::prefetch(data, ahead.data_at);
            }
            let first = entries[i];
            let mut end = first.end();
            let mut j = i + 1;
            while j < entries.len() {
                let p = &entries[j];
                if p.segment != first.segment || p.offset > end {
                    break;
                }
                end = end.max(p.end());
                j += 1;
            }
            if j == i + 1 {
                emit(first.segment, first.offset, &data[first.data_at..first.data_at + first.len])?;
            } else {
                // Paint the cluster's pieces in commit order: the newest wins.
                let cluster = &mut entries[i..j];
                cluster.sort_unstable_by_key(|e| e.index);
                run.clear();
                run.resize((end - first.offset) as usize, 0);
                for p in cluster.iter() {
                    let at = (p.offset - first.offset) as usize;
                    run[at..at + p.len].copy_from_slice(&data[p.data_at..p.data_at + p.len]);
                }
                emit(first.segment, first.offset, run)?;
            }
            i = j;
        }
        Ok(())
    }
}

/// Sorts `items` by `key`, whose low 32 bits must already be in increasing
/// order (the index): an LSD radix sort over the key bytes above them in
/// which the items differ (4 passes for a 64 MiB region), as a batch holds
/// a hundred thousand pieces. Every pass is stable, so items equal above
/// the low 32 bits stay in index order: the result equals a full sort.
fn radix_sort<T: Copy + Default>(items: &mut Vec<T>, spare: &mut Vec<T>, key: impl Fn(&T) -> u128) {
    if items.len() < 512 {
        items.sort_unstable_by_key(&key);
        return;
    }
    let (mut any, mut all) = (0u128, !0u128);
    for k in items.iter().map(&key) {
        any |= k;
        all &= k;
    }
    let differ = (any ^ all) >> 32;
    spare.clear();
    spare.resize(items.len(), T::default());
    for byte in 0..12 {
        if (differ >> (8 * byte)) as u8 == 0 {
            continue;
        }
        let shift = 32 + 8 * byte;
        let digit = |t: &T| (key(t) >> shift) as u8 as usize;
        let mut at = [0usize; 256];
        for t in items.iter() {
            at[digit(t)] += 1;
        }
        let mut sum = 0;
        for slot in at.iter_mut() {
            let n = *slot;
            *slot = sum;
            sum += n;
        }
        for t in items.iter() {
            let d = digit(t);
            spare[at[d]] = *t;
            at[d] += 1;
        }
        std::mem::swap(items, spare);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(pieces: &[(u32, u64, &[u8])]) -> Vec<(u32, u64, Vec<u8>)> {
        let mut data = Vec::new();
        let ps: Vec<Piece> = pieces
            .iter()
            .map(|&(segment, offset, bytes)| {
                let p = Piece { segment, offset, len: bytes.len(), data_at: data.len() };
                data.extend_from_slice(bytes);
                p
            })
            .collect();
        let mut out = Vec::new();
        Coalescer::default()
            .run::<()>(&ps, &data, |s, o, b| {
                out.push((s, o, b.to_vec()));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn newest_bytes_win_and_neighbours_merge() {
        let out = run(&[(1, 10, b"aaaa"), (1, 12, b"bb"), (1, 14, b"cc"), (1, 11, b"X"), (2, 0, b"z")]);
        assert_eq!(out, vec![(1, 10, b"aXbbcc".to_vec()), (2, 0, b"z".to_vec())]);
    }

    #[test]
    fn empty_pieces_are_harmless() {
        let out = run(&[(1, 10, b""), (1, 10, b"ab"), (1, 12, b""), (1, 12, b"c"), (1, 40, b""), (2, 0, b"")]);
        assert_eq!(out, vec![(1, 10, b"abc".to_vec()), (1, 40, Vec::new()), (2, 0, Vec::new())]);
    }

    #[test]
    fn disjoint_ranges_stay_apart() {
        let out = run(&[(1, 20, b"b"), (1, 10, b"a")]);
        assert_eq!(out, vec![(1, 10, b"a".to_vec()), (1, 20, b"b".to_vec())]);
    }

    proptest! {
        /// The radix sort (taken from 512 keys on) equals a plain sort, with
        /// ties of (segment, offset) and spread bits in every byte.
        #[test]
        fn radix_sort_equals_plain_sort(
            n in 0usize..3000,
            segs in 1u32..4,
            offset_bits in 1u32..64,
            seed in any::<u64>(),
        ) {
            let mut x = seed | 1;
            let mut keys: Vec<u128> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let seg = (x % segs as u64) as u128;
                    let off = (x >> 3) & (u64::MAX >> (64 - offset_bits));
                    seg << 96 | (off as u128) << 32 | i as u128
                })
                .collect();
            let mut want = keys.clone();
            want.sort_unstable();
            radix_sort(&mut keys, &mut Vec::new(), |&k| k);
            prop_assert_eq!(keys, want);
        }

        #[test]
        fn equals_painting_in_order(ops in prop::collection::vec((0u32..2, 0u64..64, prop::collection::vec(any::<u8>(), 0..16)), 0..40)) {
            let pieces: Vec<(u32, u64, &[u8])> = ops.iter().map(|(s, o, b)| (*s, *o, b.as_slice())).collect();
            let out = run(&pieces);
            // Reference: paint into per-segment byte maps.
            let mut want = std::collections::BTreeMap::new();
            for (s, o, b) in &ops {
                for (i, x) in b.iter().enumerate() {
                    want.insert((*s, *o + i as u64), *x);
                }
            }
            let mut got = std::collections::BTreeMap::new();
            for (s, o, b) in &out {
                for (i, x) in b.iter().enumerate() {
                    prop_assert!(got.insert((*s, *o + i as u64), *x).is_none(), "runs overlap");
                }
            }
            prop_assert_eq!(&got, &want);
            // Runs are maximal: no two runs of a segment touch.
            for w in out.windows(2) {
                if w[0].0 == w[1].0 {
                    prop_assert!((w[0].1 + w[0].2.len() as u64) < w[1].1);
                }
            }
        }
    }
}
