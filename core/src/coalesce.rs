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

/// Calls `emit(segment, offset, bytes)` for each coalesced run, in
/// (segment, offset) order. `scratch` is reused between calls.
pub(crate) fn coalesce<E>(
    pieces: &[Piece],
    data: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(u32, u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut order: Vec<u32> = (0..pieces.len() as u32).collect();
    // Stable sort keeps commit order among pieces that start together.
    order.sort_by_key(|&i| (pieces[i as usize].segment, pieces[i as usize].offset));
    let mut i = 0;
    while i < order.len() {
        let first = pieces[order[i] as usize];
        let mut end = first.end();
        let mut j = i + 1;
        while j < order.len() {
            let p = pieces[order[j] as usize];
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
            let cluster = &mut order[i..j];
            cluster.sort_unstable();
            scratch.clear();
            scratch.resize((end - first.offset) as usize, 0);
            for &k in cluster.iter() {
                let p = pieces[k as usize];
                let at = (p.offset - first.offset) as usize;
                scratch[at..at + p.len].copy_from_slice(&data[p.data_at..p.data_at + p.len]);
            }
            emit(first.segment, first.offset, scratch)?;
        }
        i = j;
    }
    Ok(())
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
        coalesce::<()>(&ps, &data, &mut Vec::new(), |s, o, b| {
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
