//! Log replay: applies the complete transactions of a log range to their
//! segments (recovery at open, and truncation by replay).
//!
//! The scan (reading, CRC checks, decoding) collects range records into
//! chunks of about [`CHUNK_BYTES`] of data. Each chunk is coalesced (newest
//! bytes win, so a byte changed many times is written once per chunk) and
//! written through the write combiner. A log range of more than one chunk
//! is replayed as a pipeline: a second thread applies chunk *n* while the
//! scan reads chunk *n + 1*, in order. A range of one chunk (every small
//! replay) is applied on the calling thread, in program order.

use crate::coalesce::{Coalescer, Piece};
use crate::combine::Combiner;
use crate::error::{Error, LogError, Result};
use crate::log::{self, format, Ring, ScanEnd};
use crate::storage::Storage;
use std::cell::RefCell;
use std::collections::hash_map::{Entry, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

/// Data bytes per chunk.
pub(crate) const CHUNK_BYTES: usize = 16 << 20;

/// What a replay did.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// Where and why the scan stopped.
    pub end: ScanEnd,
    /// Log bytes of the complete transactions replayed.
    pub log_bytes: u64,
    /// Segment bytes written.
    pub segment_bytes: u64,
}

/// Range records of complete transactions, in log order.
#[derive(Debug, Default)]
struct Chunk {
    pieces: Vec<Piece>,
    data: Vec<u8>,
}

impl Chunk {
    fn clear(&mut self) {
        self.pieces.clear();
        self.data.clear();
    }
}

/// The segment side: opens devices as records name them, coalesces each
/// chunk and writes its runs.
struct SegmentWriter<R> {
    resolve: R,
    devices: HashMap<u32, (Arc<dyn Storage>, PathBuf, u64)>,
    coalescer: Coalescer,
    combiner: Combiner,
    segment_bytes: u64,
}

impl<R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)>> SegmentWriter<R> {
    fn apply(&mut self, chunk: &Chunk) -> Result<()> {
        let SegmentWriter { resolve, devices, coalescer, combiner, segment_bytes } = self;
        // Runs go to the segments through the write combiner (one
        // read-modify-write per cluster of nearby runs).
        let mut write_pending = |c: &mut Combiner, devices: &HashMap<u32, (Arc<dyn Storage>, PathBuf, u64)>| {
            let Some(seg) = c.pending() else { return Ok(()) };
            // Every run's segment was resolved before the run was pushed.
            let (dev, name, _) = devices
                .get(&seg)
                .ok_or_else(|| Error::corrupted(format!("log replay (segment id {seg} unresolved)"), "replay"))?;
            *segment_bytes += c.write_to(dev.as_ref()).map_err(|e| Error::io("writing segment", name, e))?;
            Ok::<(), Error>(())
        };
        coalescer.run::<Error>(&chunk.pieces, &chunk.data, |seg, off, bytes| {
            let (_, name, len) = match devices.entry(seg) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let (dev, name) = resolve(seg)?;
                    let len = dev.len().map_err(|e| Error::io("sizing segment", &name, e))?;
                    e.insert((dev, name, len))
                }
            };
            if off.checked_add(bytes.len() as u64).is_none_or(|end| end > *len) {
                // The log was checked before: the segment shrank since its
                // records were written (truncated by someone else).
                return Err(LogError::SegmentTooShort {
                    path: name.clone(),
                    needed: off.saturating_add(bytes.len() as u64),
                    len: *len,
                }
                .into());
            }
            if !combiner.joins(seg, off, bytes.len()) {
                write_pending(combiner, devices)?;
            }
            combiner.push(seg, off, bytes);
            Ok(())
        })?;
        write_pending(combiner, devices)
    }

    fn sync(&self) -> Result<()> {
        for (dev, name, _) in self.devices.values() {
            dev.sync().map_err(|e| Error::io("syncing segment", name, e))?;
        }
        Ok(())
    }
}

/// A chunk handed to the applying thread, and chunks it hands back.
struct Pipe<'s, R> {
    to_worker: mpsc::SyncSender<Chunk>,
    returned: mpsc::Receiver<Chunk>,
    worker: std::thread::ScopedJoinHandle<'s, Result<SegmentWriter<R>>>,
}

/// Replays the complete transactions in `[start, limit)` of `ring` onto the
/// segments `resolve` opens by id, then syncs every segment written. The
/// bytes of an unfinished tail are not applied. Idempotent: running it
/// again over the same range writes the same bytes.
pub(crate) fn replay<R>(ring: &Ring, start: u64, limit: u64, epoch: u64, resolve: R) -> Result<Replayed>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    replay_with_progress(ring, start, limit, epoch, resolve, &|_| {})
}

/// [`replay`], calling `progress` with the log bytes read so far (about
/// every chunk, and at the end).
pub(crate) fn replay_with_progress<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    progress: &dyn Fn(u64),
) -> Result<Replayed>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    replay_in_chunks(ring, start, limit, epoch, resolve, CHUNK_BYTES, progress)
}

fn replay_in_chunks<R>(
    ring: &Ring,
    start: u64,
    limit: u64,
    epoch: u64,
    resolve: R,
    chunk_bytes: usize,
    progress: &dyn Fn(u64),
) -> Result<Replayed>
where
    R: FnMut(u32) -> Result<(Arc<dyn Storage>, PathBuf)> + Send,
{
    let writer = SegmentWriter {
        resolve,
        devices: HashMap::new(),
        coalescer: Coalescer::default(),
        combiner: Combiner::default(),
        segment_bytes: 0,
    };
    std::thread::scope(|scope| {
        struct Scan<'s, R> {
            /// Complete transactions not yet applied.
            chunk: Chunk,
            /// Pieces of the transaction being read (its bytes are at the
            /// end of `chunk.data`).
            tx: Vec<Piece>,
            writer: Option<SegmentWriter<R>>,
            pipe: Option<Pipe<'s, R>>,
            log_bytes: u64,
        }
        let state = RefCell::new(Scan {
            chunk: Chunk::default(),
            tx: Vec::new(),
            writer: Some(writer),
            pipe: None,
            log_bytes: 0,
        });
        let scanned = log::scan(
            ring,
            start,
            limit,
            epoch,
            |f| {
                if let format::Frame::Range { segment, offset, data } = f.frame {
                    let me = &mut *state.borrow_mut();
                    let at = me.chunk.data.len();
                    me.chunk.data.extend_from_slice(data);
                    me.tx.push(Piece { segment, offset, len: data.len(), data_at: at });
                }
                Ok(())
            },
            |s, e| {
                let me = &mut *state.borrow_mut();
                me.log_bytes += e - s;
                me.chunk.pieces.append(&mut me.tx);
                if me.chunk.data.len() < chunk_bytes {
                    return Ok(());
                }
                progress(e - start);
                // A full chunk (and no unfinished bytes after it): to the
                // applying thread, started with the first one.
                if me.pipe.is_none() {
                    let (to_worker, from_scan) = mpsc::sync_channel::<Chunk>(1);
                    let (back, returned) = mpsc::channel::<Chunk>();
                    let mut writer = me.writer.take().expect("the writer is here until the pipe starts");
                    let worker = scope.spawn(move || {
                        for mut chunk in from_scan {
                            writer.apply(&chunk)?;
                            chunk.clear();
                            let _ = back.send(chunk);
                        }
                        Ok(writer)
                    });
                    me.pipe = Some(Pipe { to_worker, returned, worker });
                }
                let pipe = me.pipe.as_ref().expect("started above");
                let spare = pipe.returned.try_recv().unwrap_or_default();
                let full = std::mem::replace(&mut me.chunk, spare);
                // A closed pipe means the applier failed: its error is
                // reported when it is joined.
                pipe.to_worker.send(full).map_err(|_| Error::corrupted("log replay (applier stopped)", "replay"))
            },
        );
        let Scan { mut chunk, tx, writer, pipe, log_bytes } = state.into_inner();
        // The unfinished tail's bytes are after every piece: not applied.
        drop(tx);
        let writer = match pipe {
            None => {
                let mut writer = writer.expect("no pipe: the writer is here");
                if scanned.is_ok() {
                    writer.apply(&chunk)?;
                }
                writer
            }
            Some(Pipe { to_worker, returned, worker }) => {
                if scanned.is_ok() {
                    // The last chunk; if the applier stopped, join says why.
                    let _ = to_worker.send(std::mem::take(&mut chunk));
                }
                drop(to_worker);
                drop(returned);
                let joined =
                    worker.join().unwrap_or_else(|_| Err(Error::corrupted("log replay (applier panicked)", "replay")));
                // An applier error explains a closed pipe; otherwise the
                // scan's own error stands.
                joined?
            }
        };
        let end = scanned?;
        writer.sync()?;
        Ok(Replayed { end, log_bytes, segment_bytes: writer.segment_bytes })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogDevice;
    use crate::testing::SimDisk;
    use crate::{create_log_with, CommitMode, MapSpec, Options, RestoreMode, Rvm};
    use std::path::Path;

    /// A pipelined replay (many chunks, a second thread) leaves the segment
    /// exactly as one applied on the calling thread, and as committed.
    #[test]
    fn pipelined_replay_equals_inline_replay() {
        let disk = SimDisk::new();
        let vfs: Arc<dyn crate::Vfs> = Arc::new(disk.clone());
        let (log, seg) = (Path::new("/replay.log"), Path::new("/replay.seg"));
        create_log_with(vfs.as_ref(), log, 1 << 20).unwrap();
        let len = 16 * crate::page_size();
        let mut want = vec![0u8; len];
        {
            let opts = Options { coalesce: false, truncate_threshold: None, ..Options::default() };
            let rvm = Rvm::open_with(vfs.clone(), log, opts).unwrap();
            let s = rvm.create_segment(seg, len as u64).unwrap();
            let region = rvm.map(&s, MapSpec::new(0, len)).unwrap();
            let mut x = 7u64;
            for i in 0..600u64 {
                let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
                for _ in 0..1 + i % 3 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let n = 1 + (x >> 60) as usize * 9;
                    let off = (x >> 20) as usize % (len - n);
                    let bytes: Vec<u8> = (0..n).map(|k| (i as usize + k) as u8).collect();
                    // SAFETY: single-threaded; inside the region.
                    unsafe { tx.modify_bytes(region.addr() + off, &bytes).unwrap() };
                    want[off..off + n].copy_from_slice(&bytes);
                }
                tx.commit(CommitMode::NoFlush).unwrap();
            }
        } // flushed, not truncated
        let (log_img, seg_img) = (disk.durable_image(log).unwrap(), disk.durable_image(seg).unwrap());
        let run = |chunk_bytes: usize| {
            disk.set_durable_image(log, log_img.clone());
            disk.set_durable_image(seg, seg_img.clone());
            let LogDevice { ring, status, .. } = LogDevice::open(vfs.as_ref(), log).unwrap();
            let name = status.segments[0].name.clone();
            let r = replay_in_chunks(
                &ring,
                status.head,
                u64::MAX,
                status.epoch,
                |_| Ok((vfs.open(&name, crate::OpenMode::Existing).unwrap(), name.clone())),
                chunk_bytes,
                &|_| {},
            )
            .unwrap();
            (r.end.transactions, r.log_bytes, disk.live_image(seg).unwrap())
        };
        let inline = run(usize::MAX);
        let piped = run(256);
        assert_eq!(inline.0, 600);
        assert_eq!(inline.2, want, "inline replay");
        assert_eq!(piped, inline, "pipelined replay");
    }
}
