//! The commit pipeline: committed transactions' bytes go into a pending
//! batch; full batches are written to the log in batch-number order (by
//! the committer, or by the write-behind thread); group commit makes them
//! durable with one sync for many flushing threads.

use super::Inner;
use crate::coalesce::{Coalescer, Piece};
use crate::error::{Error, LogError, Result};
use crate::log::format::{self, FrameWriter};
use crate::mem;
use crate::segment::RegionInner;
use crate::stats::Counters;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Unflushed no-flush commits, in commit order.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pieces: Vec<Piece>,
    pub(super) data: Vec<u8>,
    /// (end index in `pieces`, commit sequence number) per transaction.
    tx_ends: Vec<(usize, u64)>,
    /// Bytes after intra-transaction coalescing.
    bytes: u64,
    /// Log bytes its transactions' frames take at most (before any
    /// inter-transaction coalescing): bounds the batch so it always fits
    /// in the log, however small its ranges.
    frame_bytes: u64,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.tx_ends.is_empty()
    }
}

/// Full batches that may wait for the background log writer
/// ([`Options::write_behind`]), besides the one it is writing, before
/// committers wait for it.
pub(crate) const SPOOLED_BATCHES: usize = 2;

#[derive(Debug, Default)]
pub(crate) struct CommitState {
    pub(crate) pending: Batch,
    pub(crate) next_tx: u64,
    /// Every commit with a sequence number up to this is durable.
    durable_tx: u64,
    pub(crate) next_batch: u64,
    flushing: bool,
    /// Full batches for the background log writer, in batch-number order
    /// (they are queued under this lock as their numbers are handed out).
    spool: std::collections::VecDeque<(u64, Batch)>,
    /// Written batches kept for reuse: their buffers are grown already.
    pub(super) spare: Vec<Batch>,
    /// Tells the background log writer to exit once the spool is empty.
    pub(super) writer_stop: bool,
    /// Threads in `flush_to`.
    flush_waiters: usize,
    /// Flushers the last log sync served (its leader waited for as many).
    last_group: usize,
    /// A leader waits for more flushers (`Inner::gathered`).
    gathering: bool,
}

/// The longest a flush leader waits for other flushers before its sync.
const MAX_GATHER: Duration = Duration::from_millis(1);

impl CommitState {
    /// The state of a new instance: the first commit gets number 1.
    pub(super) fn new() -> CommitState {
        CommitState { next_tx: 1, ..CommitState::default() }
    }

    /// Takes the pending batch (replaced by a spare one) and gives it the
    /// next batch number: log order is the order of these calls.
    pub(crate) fn take_batch(&mut self) -> (u64, Batch) {
        let fresh = self.spare.pop().unwrap_or_default();
        let batch = std::mem::replace(&mut self.pending, fresh);
        self.next_batch += 1;
        (self.next_batch - 1, batch)
    }

    /// Keeps a written batch's buffers for a later one, if it is big enough
    /// to be worth keeping (a full batch) and few are kept already.
    fn recycle(&mut self, mut batch: Batch, pending_limit: usize) {
        if self.spare.len() < SPOOLED_BATCHES && batch.data.capacity() >= pending_limit {
            batch.pieces.clear();
            batch.data.clear();
            batch.tx_ends.clear();
            batch.bytes = 0;
            batch.frame_bytes = 0;
            self.spare.push(batch);
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Writer {
    pub(super) next_batch: u64,
    frames: Vec<u8>,
    coalescer: Coalescer,
}

/// A piece a commit logs: the `len` bytes at `from` for `[addr, addr +
/// len)` of `held[region]`. `from` is `addr` itself, or the tracked
/// transaction's staged copy of those bytes (the write-protect method logs
/// what its diff read, which its shadows also take).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub addr: usize,
    pub len: usize,
    pub region: usize,
    pub from: usize,
}

impl Inner {
    /// Adds a committed transaction to the pending batch. `pieces` address
    /// memory (`data_at` is the memory address); bytes are copied now.
    pub(crate) fn commit_pieces(&self, held: &[Arc<RegionInner>], spans: &[Span], declared: u64) -> Result<u64> {
        let bytes: u64 = spans.iter().map(|r| r.len as u64).sum();
        let needed = format::transaction_bytes_max(spans.len() as u64, bytes);
        if needed > self.ring.area_len {
            return Err(LogError::TransactionTooLarge { needed, capacity: self.ring.area_len }.into());
        }
        // Batches to write on this thread, in order (write-behind off).
        let mut spills: [Option<(u64, Batch)>; 2] = [None, None];
        // Half the log: a batch's frames stay below it, or the batch is a
        // single transaction (at most the whole log, checked above).
        let frame_cap = self.ring.area_len / 2;
        let seq;
        {
            let mut st = self.state.lock();
            self.check_poison()?;
            seq = st.next_tx;
            st.next_tx += 1;
            if spans.is_empty() {
                // Nothing to redo: no log record. A flush of it still makes
                // every earlier commit durable (`flush_to(seq)`).
                drop(st);
                Counters::add(&self.counters.committed, 1);
                return Ok(seq);
            }
            // With this transaction the batch might not fit in the log: it
            // goes first. (A loop: waiting for room in the spool releases
            // the lock, and other commits may fill the next batch.)
            while !st.pending.is_empty() && st.pending.frame_bytes + needed > frame_cap {
                if let Some(spill) = self.hand_over(&mut st) {
                    spills[0] = Some(spill);
                }
            }
            let b = &mut st.pending;
            for &Span { addr, len, region, from } in spans {
                let region = &held[region];
                let seg = &region.segment;
                let offset = region.segment_offset(addr);
                let at = b.data.len();
                // SAFETY: `from` is either [addr, addr + len) itself, declared
                // inside a region the transaction holds (so the mapping is
                // alive; by the `set_range` contract no one else writes it
                // until commit), or the open tracked transaction's staged
                // copy of it (alive and unchanged until the transaction ends).
                unsafe { mem::append_from(from, len, &mut b.data) };
                b.pieces.push(Piece { segment: seg.id, offset, len, data_at: at });
                seg.last_tx.fetch_max(seq, Ordering::AcqRel);
                self.mark_dirty(region, addr, len);
            }
            b.tx_ends.push((b.pieces.len(), seq));
            b.bytes += bytes;
            b.frame_bytes += needed;
            if b.data.len() >= self.pending_limit || b.frame_bytes >= frame_cap {
                spills[1] = self.hand_over(&mut st);
            }
        }
        Counters::add(&self.counters.committed, 1);
        Counters::add(&self.counters.bytes_declared, declared);
        Counters::add(&self.counters.bytes_saved_intra, declared - bytes);
        for (n, batch) in spills.into_iter().flatten() {
            let r = self.write_batch(n, &batch);
            self.recycle_batch(batch);
            r?;
        }
        Ok(seq)
    }

    /// Takes the pending batch (a full one) and queues it for the
    /// write-behind thread, or, with write-behind off, returns it for the
    /// committing thread to write once it has released the commit lock.
    fn hand_over(&self, st: &mut parking_lot::MutexGuard<'_, CommitState>) -> Option<(u64, Batch)> {
        let (n, batch) = st.take_batch();
        if !self.opts.write_behind || !self.start_log_writer(st.writer_stop) {
            // Written by the committer (also if no thread could be started:
            // batches are written in order whoever writes them).
            return Some((n, batch));
        }
        self.spooled_bytes.fetch_add(batch.data.len() as u64, Ordering::AcqRel);
        st.spool.push_back((n, batch));
        self.spooled.notify_one();
        // Bounded memory: wait while the writer is behind.
        while st.spool.len() >= SPOOLED_BATCHES && !self.poisoned.load(Ordering::Acquire) {
            self.spool_room.wait(st);
        }
        None
    }

    /// Log position after the last written batch.
    pub(crate) fn log_tail(&self) -> u64 {
        self.tail.load(Ordering::Acquire)
    }

    /// Keeps a written batch's buffers for a later batch.
    pub(crate) fn recycle_batch(&self, batch: Batch) {
        self.state.lock().recycle(batch, self.pending_limit);
    }

    /// Starts the write-behind thread unless it runs (called under the
    /// commit lock, with its `writer_stop`); false if there is none.
    fn start_log_writer(&self, stopped: bool) -> bool {
        let mut slot = self.log_writer.lock();
        if slot.is_some() {
            return true;
        }
        if stopped {
            return false;
        }
        let Some(me) = self.me.upgrade() else { return false };
        match std::thread::Builder::new().name("rvm-log-writer".into()).spawn(move || me.write_spooled()) {
            Ok(handle) => {
                *slot = Some(handle);
                true
            }
            Err(_) => false,
        }
    }

    /// The background log writer's work: spooled batches, in order.
    pub(super) fn write_spooled(&self) {
        loop {
            let (n, batch) = {
                let mut st = self.state.lock();
                loop {
                    if let Some(b) = st.spool.pop_front() {
                        break b;
                    }
                    if st.writer_stop {
                        return;
                    }
                    self.spooled.wait(&mut st);
                }
            };
            // A failure poisons the instance: committers and flushes report
            // it. So does a panic, which must not leave them waiting for a
            // batch that will never be written.
            let wrote =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_batch_from(n, &batch, true)));
            if wrote.is_err() {
                let _ =
                    self.poison::<()>(Err(Error::corrupted("log writer (panicked writing a batch)", "write-behind")));
                let mut w = self.writer.lock();
                if w.next_batch == n {
                    self.spooled_bytes.fetch_sub(batch.data.len() as u64, Ordering::AcqRel);
                    w.next_batch += 1;
                }
                self.written_cv.notify_all();
            }
            let mut st = self.state.lock();
            st.recycle(batch, self.pending_limit);
            self.spool_room.notify_all();
        }
    }

    /// Writes batch number `n` after every earlier batch (batch numbers are
    /// handed out under the commit lock, so log order is commit order).
    /// Returns the log position after the batch.
    pub(crate) fn write_batch(&self, n: u64, batch: &Batch) -> Result<u64> {
        self.write_batch_from(n, batch, false)
    }

    /// [`Inner::write_batch`]; `spooled` if the batch came from the spool.
    fn write_batch_from(&self, n: u64, batch: &Batch, spooled: bool) -> Result<u64> {
        // Nothing goes to the log before instant recovery's status with the
        // new epoch is durable (a failure poisons the instance: seen below).
        let _ = self.wait_recovered();
        let mut w = self.writer.lock();
        while w.next_batch != n {
            self.written_cv.wait(&mut w);
        }
        let r = if self.poisoned.load(Ordering::Acquire) {
            self.check_poison().map(|_| 0)
        } else if batch.is_empty() {
            Ok(self.log_tail())
        } else {
            let r = self.write_locked(&mut w, batch).map(|_| self.log_tail());
            self.poison(r)
        };
        if spooled {
            // Before the batch counts as written, so a flush that waited
            // for it sees no spooled bytes left.
            self.spooled_bytes.fetch_sub(batch.data.len() as u64, Ordering::AcqRel);
        }
        w.next_batch += 1;
        self.written_cv.notify_all();
        drop(w);
        if self.over_threshold() {
            self.start_truncator();
            self.background.wake.notify_one();
        }
        r
    }

    fn write_locked(&self, w: &mut Writer, batch: &Batch) -> Result<()> {
        let Writer { frames, coalescer, .. } = w;
        // Only this function, under the writer lock, moves the tail.
        let written = self.tail.load(Ordering::Acquire);
        frames.clear();
        let mut fw = FrameWriter::new(frames, written, self.epoch, self.ring.area_len);
        let synced = self.synced_end();
        let mut logged = 0u64;
        if self.opts.coalesce {
            coalescer
                .run::<()>(&batch.pieces, &batch.data, |seg, off, bytes| {
                    fw.range(seg, off, bytes);
                    logged += bytes.len() as u64;
                    Ok(())
                })
                .ok();
            let first = batch.tx_ends.first().map_or(0, |t| t.1);
            let last = batch.tx_ends.last().map_or(0, |t| t.1);
            fw.commit(first, last, synced);
        } else {
            let mut start = 0;
            for &(end, seq) in &batch.tx_ends {
                for p in &batch.pieces[start..end] {
                    fw.range(p.segment, p.offset, &batch.data[p.data_at..p.data_at + p.len]);
                    logged += p.len as u64;
                }
                fw.commit(seq, seq, synced);
                start = end;
            }
        }
        let len = frames.len() as u64;
        let cap = self.ring.area_len;
        if len > cap {
            return Err(LogError::TransactionTooLarge { needed: len, capacity: cap }.into());
        }
        if written + len >= crate::log::format::OPEN_LIMIT {
            // Records there would need a status the next open refuses (only
            // a crafted status starts a log this close to the limit).
            return Err(Error::corrupted(
                "log (positions reached 2^61, the limit an open accepts)",
                format!("{} position {written}", self.ring.path.display()),
            ));
        }
        // The log's room, or the unapplied-log bound (never less than this
        // batch, which is then written alone).
        let room = self.unapplied_bound().map_or(cap, |b| cap.min(b.max(len)));
        let mut waited = false;
        while written + len - self.head.load(Ordering::Acquire) > room {
            // The log is full: make what is written durable and apply it.
            if !waited {
                Counters::add(&self.counters.log_full_waits, 1);
                waited = true;
            }
            let before = self.head.load(Ordering::Acquire);
            self.sync_to(written)?;
            // A sweeping checkpoint frees the log up to its position once
            // it ends: finishing it is cheaper than replaying that part.
            // Only if that is not room enough is the rest replayed.
            self.finish_checkpoint_for_room()?;
            if written + len - self.head.load(Ordering::Acquire) > room {
                self.truncate_to(written)?;
            }
            if self.head.load(Ordering::Acquire) == before {
                return Err(Error::corrupted(
                    "log (truncation made no progress)",
                    self.ring.path.display().to_string(),
                ));
            }
        }
        self.ring.write(written, frames)?;
        self.tail.store(written + len, Ordering::Release);
        let c = &self.counters;
        Counters::add(&c.log_writes, 1);
        Counters::add(&c.log_bytes_written, len);
        Counters::add(&c.bytes_logged, logged);
        Counters::add(&c.bytes_saved_inter, batch.bytes.saturating_sub(logged));
        Ok(())
    }

    fn over_threshold(&self) -> bool {
        let used = self.log_tail().saturating_sub(self.head.load(Ordering::Acquire));
        self.reclaim_at().is_some_and(|at| used > at)
    }

    /// Log bytes in use past which the background thread reclaims: the
    /// threshold's fraction of the log, or half the unapplied-log bound if
    /// that is less. `None` without a background thread.
    pub(super) fn reclaim_at(&self) -> Option<u64> {
        let t = self.opts.truncate_threshold?;
        let at = (t * self.ring.area_len as f64) as u64;
        Some(self.unapplied_bound().map_or(at, |b| at.min(b / 2)))
    }

    /// The most log that may wait for recovery ([`crate::Options::max_unapplied_log`]),
    /// where the background thread enforces it.
    pub(super) fn unapplied_bound(&self) -> Option<u64> {
        self.opts.truncate_threshold.and(self.opts.max_unapplied_log).map(|b| b.max(1))
    }

    /// Group commit: returns once commit `seq` (and all before it) is durable.
    pub(crate) fn flush_to(&self, seq: u64) -> Result<()> {
        let mut st = self.state.lock();
        st.flush_waiters += 1;
        if st.gathering {
            self.gathered.notify_one();
        }
        let r = self.flush_locked(&mut st, seq);
        st.flush_waiters -= 1;
        r
    }

    fn flush_locked(&self, st: &mut parking_lot::MutexGuard<'_, CommitState>, seq: u64) -> Result<()> {
        loop {
            self.check_poison()?;
            if st.durable_tx >= seq {
                return Ok(());
            }
            if st.flushing {
                self.flushed.wait(st);
                continue;
            }
            // Become the leader. As many flushers as the last sync served
            // are likely on their way (threads its sync released, now
            // running their next transaction): wait for them a little, at
            // most half a sync's time, so that one sync serves them all.
            st.flushing = true;
            if st.flush_waiters < st.last_group {
                let wait = Duration::from_nanos(self.last_sync_ns.load(Ordering::Relaxed) / 2).min(MAX_GATHER);
                let deadline = std::time::Instant::now() + wait;
                st.gathering = true;
                while st.flush_waiters < st.last_group && !self.gathered.wait_until(st, deadline).timed_out() {}
                st.gathering = false;
            }
            st.last_group = st.flush_waiters;
            let target = st.next_tx - 1;
            let mine = (!st.pending.is_empty()).then(|| st.take_batch());
            let all_before = st.next_batch;
            let mut spent = None;
            let r = parking_lot::MutexGuard::unlocked(st, || -> Result<()> {
                if let Some((n, batch)) = mine {
                    let r = self.write_batch(n, &batch);
                    spent = Some(batch);
                    r?;
                }
                let written = {
                    let mut w = self.writer.lock();
                    while w.next_batch < all_before && !self.poisoned.load(Ordering::Acquire) {
                        self.written_cv.wait(&mut w);
                    }
                    self.log_tail()
                };
                self.check_poison()?;
                self.sync_to(written)
            });
            st.flushing = false;
            if let Some(batch) = spent {
                st.recycle(batch, self.pending_limit);
            }
            if r.is_ok() {
                st.durable_tx = st.durable_tx.max(target);
            }
            self.flushed.notify_all();
            r?;
        }
    }

    /// Every commit up to `seq` is durable (its batch was written and synced).
    pub(crate) fn mark_durable(&self, seq: u64) {
        let mut st = self.state.lock();
        st.durable_tx = st.durable_tx.max(seq);
    }

    /// Syncs the log if `upto` is not durable yet.
    pub(crate) fn sync_to(&self, upto: u64) -> Result<()> {
        if self.synced.load(Ordering::Acquire) >= upto {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let r = self.ring.dev.sync().map_err(|e| Error::io("syncing the log", &self.ring.path, e)).and_then(|()| {
            // A log that lost its name cannot be recovered from: what this
            // sync made durable is in a file nobody can open again.
            match self.ring.dev.is_unlinked() {
                Ok(false) => Ok(()),
                Ok(true) => Err(LogError::LogUnlinked { path: self.ring.path.clone() }.into()),
                Err(e) => Err(Error::io("checking the log file", &self.ring.path, e)),
            }
        });
        self.last_sync_ns.store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.poison(r)?;
        Counters::add(&self.counters.log_syncs, 1);
        self.synced.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }
}
