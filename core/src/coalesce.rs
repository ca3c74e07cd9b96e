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

impl Piece {
    fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// Reusable buffers of [`Coalescer::run`].
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    /// Sort keys: segment (bits 96..128), offset (32..96), piece index
    /// (0..32). Sorting them whole sorts by (segment, offset) and keeps
    /// commit order among pieces that start together, and compares plain
    /// integers instead of looking pieces up.
    keys: Vec<u128>,
    /// The radix sort's second buffer.
    sorted: Vec<u128>,
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
        let Coalescer { keys, sorted, run } = self;
        // The index takes the low 32 bits of a key.
        debug_assert!(pieces.len() <= u32::MAX as usize, "too many pieces for one coalescing");
        keys.clear();
        keys.extend(
            pieces.iter().enumerate().map(|(i, p)| (p.segment as u128) << 96 | (p.offset as u128) << 32 | i as u128),
        );
        sort_keys(keys, sorted);
        let piece = |k: u128| &pieces[k as u32 as usize];
        let mut i = 0;
        while i < keys.len() {
            let first = piece(keys[i]);
            let mut end = first.end();
            let mut j = i + 1;
            while j < keys.len() {
                let p = piece(keys[j]);
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
                let cluster = &mut keys[i..j];
                cluster.sort_unstable_by_key(|&k| k as u32);
                run.clear();
                run.resize((end - first.offset) as usize, 0);
                for &k in cluster.iter() {
                    let p = piece(k);
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

/// Sorts coalescing keys: an LSD radix sort over the bytes of segment and
/// offset in which the keys differ (4 passes for a 64 MiB region), as a
/// batch holds a hundred thousand pieces. Keys come in index order and
/// every pass is stable, so equal (segment, offset) stay in index order:
/// the result equals a full sort of the keys.
fn sort_keys(keys: &mut Vec<u128>, spare: &mut Vec<u128>) {
    if keys.len() < 512 {
        keys.sort_unstable();
        return;
    }
    let (mut any, mut all) = (0u128, !0u128);
    for &k in keys.iter() {
        any |= k;
        all &= k;
    }
    let differ = (any ^ all) >> 32;
    spare.clear();
    spare.resize(keys.len(), 0);
    for byte in 0..12 {
        if (differ >> (8 * byte)) as u8 == 0 {
            continue;
        }
        let shift = 32 + 8 * byte;
        let digit = |k: u128| (k >> shift) as u8 as usize;
        let mut at = [0usize; 256];
        for &k in keys.iter() {
            at[digit(k)] += 1;
        }
        let mut sum = 0;
        for slot in at.iter_mut() {
            let n = *slot;
            *slot = sum;
            sum += n;
        }
        for &k in keys.iter() {
            let d = digit(k);
            spare[at[d]] = k;
            at[d] += 1;
        }
        std::mem::swap(keys, spare);
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
            sort_keys(&mut keys, &mut Vec::new());
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
