//! Write combining for log replay (recovery and truncation).
//!
//! Replaying a log of small ranges spread over a segment yields many small
//! runs; one `pwrite` each made replay syscall-bound (about 2.5 µs a run,
//! under 100 MB/s of log). The combiner gathers the runs that
//! [`Coalescer::run`](crate::coalesce::Coalescer::run) emits in (segment, offset) order
//! into clusters whose runs lie in the same or neighbouring 4 KiB file
//! pages, and writes each cluster with one read of its span (for the bytes
//! between the runs), the runs painted over it, and one write.
//!
//! Why the gap bytes may be rewritten: replay is the only writer of a
//! segment while it runs (the caller holds the truncation lock, or is
//! recovery), and a segment only ever holds committed bytes, so the gap
//! bytes read are committed bytes and writing them back changes nothing,
//! even if the write is torn or lost. No file page that no run touches is
//! written, so the pages made dirty (and later synced) are the same as with
//! one write per run.

use crate::storage::Storage;
use std::io;

/// File pages, for the neighbourhood rule (the page cache's unit).
const PAGE: u64 = 4096;
/// A cluster's span is written once it reaches this size.
const MAX_SPAN: u64 = 1 << 20;
/// Runs this long gain nothing from combining (a write of a page or more
/// costs about what the extra read and copies would): they go alone.
const ALONE: usize = PAGE as usize;

/// Gathers runs of one segment into clusters; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Combiner {
    /// Segment id, first byte and end of the current cluster.
    seg: u32,
    start: u64,
    end: u64,
    /// The runs' bytes, in order, and each run's (offset, length).
    data: Vec<u8>,
    runs: Vec<(u64, usize)>,
    /// The span's image, reused between clusters.
    span: Vec<u8>,
}

impl Combiner {
    /// Whether a run at `offset` of segment `seg`, `len` bytes long, joins
    /// the pending cluster (or there is none). Runs arrive in (segment,
    /// offset) order and never overlap; if one does not join, write the
    /// pending cluster first ([`Self::write_to`]).
    pub fn joins(&self, seg: u32, offset: u64, len: usize) -> bool {
        self.runs.is_empty()
            || len == 0
            || (len < ALONE
                // A long run never joins, so it is alone in its cluster.
                && (self.runs.len() > 1 || self.data.len() < ALONE)
                && seg == self.seg
                && offset >= self.end
                && offset / PAGE <= (self.end - 1) / PAGE + 1
                && offset + len as u64 - self.start <= MAX_SPAN)
    }

    /// Adds a run to the pending cluster (see [`Self::joins`]).
    pub fn push(&mut self, seg: u32, offset: u64, bytes: &[u8]) {
        debug_assert!(self.joins(seg, offset, bytes.len()));
        if bytes.is_empty() {
            // Nothing to write (a range frame may carry no bytes).
            return;
        }
        if self.runs.is_empty() {
            self.seg = seg;
            self.start = offset;
        }
        self.end = offset + bytes.len() as u64;
        self.runs.push((offset, bytes.len()));
        self.data.extend_from_slice(bytes);
    }

    /// The segment of the pending cluster, if there is one.
    pub fn pending(&self) -> Option<u32> {
        (!self.runs.is_empty()).then_some(self.seg)
    }

    /// Writes the pending cluster to `dev` (the device of [`Self::pending`])
    /// and empties it. Returns the run bytes written (gap bytes excluded).
    pub fn write_to(&mut self, dev: &dyn Storage) -> io::Result<u64> {
        let run_bytes = self.data.len() as u64;
        let r = if self.runs.len() == 1 || run_bytes == self.end - self.start {
            // One run, or runs that touch: no gap to read.
            dev.write_at(&self.data, self.start)
        } else {
            let span_len = (self.end - self.start) as usize;
            self.span.resize(span_len, 0);
            dev.read_at(&mut self.span[..span_len], self.start).and_then(|()| {
                let mut at = 0;
                for &(off, len) in &self.runs {
                    let pos = (off - self.start) as usize;
                    self.span[pos..pos + len].copy_from_slice(&self.data[at..at + len]);
                    at += len;
                }
                dev.write_at(&self.span[..span_len], self.start)
            })
        };
        self.runs.clear();
        self.data.clear();
        r.map(|()| run_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use proptest::prelude::*;

    /// A device in memory that records where it was written.
    #[derive(Debug)]
    struct Recorder {
        bytes: Mutex<Vec<u8>>,
        writes: Mutex<Vec<(u64, usize)>>,
    }

    impl Storage for Recorder {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let b = self.bytes.lock();
            buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.bytes.lock()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            self.writes.lock().push((offset, buf.len()));
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.bytes.lock().len() as u64)
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    // Room for 60 runs of up to 6000 bytes pushed apart from offsets below 40,000.
    const LEN: usize = 40_000 + 60 * 6000;

    proptest! {
        /// Combined writes leave every segment exactly as one write per run
        /// would, write no page that no run touches, and count run bytes.
        #[test]
        fn same_image_as_one_write_per_run(
            runs in prop::collection::vec((0u32..2, 0u64..40_000, 0usize..6000), 1..60),
            fill in any::<u8>(),
        ) {
            // Sorted and disjoint per segment, as coalesce emits them.
            let mut runs = runs;
            runs.sort();
            let mut clean: Vec<(u32, u64, Vec<u8>)> = Vec::new();
            for (i, (s, off, len)) in runs.into_iter().enumerate() {
                let off = match clean.last() {
                    Some((ls, lo, lb)) if *ls == s => off.max(lo + lb.len() as u64),
                    _ => off,
                };
                clean.push((s, off, vec![i as u8 ^ 0x5A; len]));
            }
            let devs: Vec<Recorder> = (0..2)
                .map(|_| Recorder { bytes: Mutex::new(vec![fill; LEN]), writes: Mutex::new(Vec::new()) })
                .collect();
            let mut want = vec![vec![fill; LEN]; 2];
            let mut touched = vec![std::collections::BTreeSet::new(); 2];
            for (s, off, b) in &clean {
                let (s, off) = (*s as usize, *off as usize);
                want[s][off..off + b.len()].copy_from_slice(b);
                if !b.is_empty() {
                    touched[s].extend(off / PAGE as usize..=(off + b.len() - 1) / PAGE as usize);
                }
            }
            let mut c = Combiner::default();
            let mut written = 0;
            for (s, off, b) in &clean {
                if !c.joins(*s, *off, b.len()) {
                    let seg = c.pending().unwrap() as usize;
                    written += c.write_to(&devs[seg]).unwrap();
                }
                c.push(*s, *off, b);
            }
            if let Some(seg) = c.pending() {
                written += c.write_to(&devs[seg as usize]).unwrap();
            }
            prop_assert_eq!(c.pending(), None);
            prop_assert_eq!(written, clean.iter().map(|r| r.2.len() as u64).sum::<u64>());
            for s in 0..2 {
                prop_assert!(*devs[s].bytes.lock() == want[s], "segment {} differs", s);
                for &(off, len) in devs[s].writes.lock().iter() {
                    let (off, len) = (off as usize, len);
                    prop_assert!(len as u64 <= MAX_SPAN);
                    for p in off / PAGE as usize..=(off + len - 1) / PAGE as usize {
                        prop_assert!(touched[s].contains(&p), "segment {}: page {} written but no run touches it", s, p);
                    }
                }
            }
        }
    }
}
