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

/// A sort key: where a piece goes, and its place in commit order.
#[derive(Clone, Copy, Debug)]
struct Key {
    segment: u32,
    offset: u64,
    index: usize,
    end: u64,
}

/// A coalesced run and where its bytes are painted in the scratch buffer.
#[derive(Clone, Copy, Debug)]
struct Run {
    segment: u32,
    offset: u64,
    end: u64,
    at: usize,
}

/// Buffers [`coalesce`] reuses from call to call (fresh buffers of tens of
/// MiB per call cost more in page faults than the coalescing itself).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    bytes: Vec<u8>,
    keys: Vec<Key>,
    runs: Vec<Run>,
    run_of: Vec<usize>,
}

/// Calls `emit(segment, offset, bytes)` for each coalesced run, in
/// (segment, offset) order.
pub(crate) fn coalesce<E>(
    pieces: &[Piece],
    data: &[u8],
    scratch: &mut Scratch,
    mut emit: impl FnMut(u32, u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    // One sort of direct keys (segment, offset, index; the index breaks ties,
    // so an unstable sort does), one pass in that order to find the runs,
    // and one pass in commit order to paint every piece into its run, laid
    // side by side in `bytes`: the newest bytes win without sorting each run
    // by age, and every pass reads memory in order.
    let Scratch { bytes, keys, runs, run_of } = scratch;
    keys.clear();
    keys.extend(pieces.iter().enumerate().map(|(index, p)| Key {
        segment: p.segment,
        offset: p.offset,
        index,
        end: p.end(),
    }));
    keys.sort_unstable_by_key(|k| (k.segment, k.offset, k.index));
    runs.clear();
    run_of.clear();
    run_of.resize(pieces.len(), 0);
    for k in keys.iter() {
        match runs.last_mut() {
            Some(r) if r.segment == k.segment && k.offset <= r.end => r.end = r.end.max(k.end),
            _ => runs.push(Run { segment: k.segment, offset: k.offset, end: k.end, at: 0 }),
        }
        run_of[k.index] = runs.len() - 1;
    }
    let mut total = 0;
    for r in runs.iter_mut() {
        r.at = total;
        total += (r.end - r.offset) as usize;
    }
    // Every byte of a run is painted below, so stale contents may stay.
    if bytes.len() < total {
        bytes.resize(total, 0);
    }
    for (p, &r) in pieces.iter().zip(run_of.iter()) {
        let r = &runs[r];
        let at = r.at + (p.offset - r.offset) as usize;
        bytes[at..at + p.len].copy_from_slice(&data[p.data_at..p.data_at + p.len]);
    }
    for r in runs.iter() {
        emit(r.segment, r.offset, &bytes[r.at..r.at + (r.end - r.offset) as usize])?;
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
        coalesce::<()>(&ps, &data, &mut Scratch::default(), |s, o, b| {
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
    fn disjoint_ranges_stay_apart() {
        let out = run(&[(1, 20, b"b"), (1, 10, b"a")]);
        assert_eq!(out, vec![(1, 10, b"a".to_vec()), (1, 20, b"b".to_vec())]);
    }

    proptest! {
        #[test]
        fn equals_painting_in_order(ops in prop::collection::vec((0u32..2, 0u64..64, prop::collection::vec(any::<u8>(), 1..16)), 0..40)) {
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
