//! The verifying scan of a mapped log on two threads, by parts (instant
//! recovery's scan with `Options::parallel_scan`, `docs/DESIGN.md` §3.9).
//!
//! The log is cut into chunks at fixed nominal positions. The calling
//! thread scans chunk 0 from the head (starting the second thread on the
//! way); then both threads claim the next chunk in turn. A chunk's *part*
//! (the caller's accumulator, `S`) starts at the chunk's first transaction
//! start, found by probing every 8-byte position for a valid record (its
//! CRC is seeded with its position and epoch, so a record is valid only
//! where it was written), and ends at the first transaction start past the
//! chunk, or where the log ends.
//!
//! Last, the calling thread joins the parts in log order from the head,
//! taking a chunk's part only if it starts exactly where the joined parts
//! end (a transaction start reached by following the records from the
//! head): from the same position, a scan sees the same records, so the
//! joined parts are what one thread would have made. Anything else (a part
//! that started at bytes that merely passed for a record, one that failed
//! or was given up) is never used: the calling thread scans that chunk
//! itself. It waits for a part still being made only while the other
//! thread moves on (on a busy machine it may get no core), and a second
//! thread that never starts (no core, no thread to be had) costs nothing:
//! the calling thread claims every chunk.

use super::{record_loop, Cursor, Mapped, Ring, ScanEnd, ScanStop, TxSoFar};
use crate::error::Result;
use crate::log::format::{self, RangeRef, RecordInfo};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How a log is cut into chunks: the first `first` bytes long, doubling
/// every `grow_every` chunks up to `max` (few parts for a long log, small
/// ones at first so that the second thread has work early).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunks {
    pub first: u64,
    pub grow_every: usize,
    pub max: u64,
}

impl Chunks {
    /// The chunks of instant recovery's scan.
    pub const DEFAULT: Chunks = Chunks { first: 256 << 10, grow_every: 4, max: 1 << 20 };

    /// Length of chunk `j`.
    fn len(&self, j: usize) -> u64 {
        let doublings = (j / self.grow_every.max(1)).min(63) as u32;
        self.first.max(8).saturating_mul(1u64 << doublings.min(40)).min(self.max.max(8))
    }

    /// The growing chunks, a level at a time: `(first chunk, chunks,
    /// length)` per level, the last level (length `max`) without end.
    fn levels(&self) -> impl Iterator<Item = (usize, usize, u64)> + '_ {
        let g = self.grow_every.max(1);
        (0..).scan(false, move |done, level: usize| {
            if *done {
                return None;
            }
            let len = self.len(level * g);
            *done = len >= self.max.max(8) || level >= 62;
            Some((level * g, if *done { usize::MAX } else { g }, len))
        })
    }

    /// Nominal start of chunk `j`, from `start` (a few steps whatever `j`:
    /// a level at a time).
    fn start(&self, start: u64, j: usize) -> u64 {
        let mut at = start;
        for (first, n, len) in self.levels() {
            let k = (j - first).min(n);
            at = at.saturating_add((k as u64).saturating_mul(len));
            if j - first <= n {
                break;
            }
        }
        at
    }

    /// The chunk holding position `pos` (at or past `start`).
    fn of(&self, start: u64, pos: u64) -> usize {
        let mut at = start;
        for (first, n, len) in self.levels() {
            let span = (n as u64).saturating_mul(len);
            if pos.saturating_sub(at) < span || n == usize::MAX {
                return first + (pos.saturating_sub(at) / len) as usize;
            }
            at = at.saturating_add(span);
        }
        unreachable!("the last level has no end")
    }
}

/// Tuning of [`scan_parts`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub chunks: Chunks,
    /// Start the second thread (where the machine has two cores).
    pub two_threads: bool,
    /// Log bytes the calling thread scans before it starts the second
    /// thread (a short log is not worth one).
    pub spawn_after: u64,
    /// How long the calling thread waits for a part in progress that does
    /// not advance before it scans the chunk itself.
    pub stall: Duration,
}

impl Plan {
    /// Instant recovery's plan: two threads if `two_threads` and the
    /// machine has two cores ([`crate::Options::parallel_scan`]).
    pub fn for_machine(two_threads: bool) -> Plan {
        Plan {
            chunks: Chunks::DEFAULT,
            two_threads: two_threads && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
            spawn_after: 1 << 20,
            stall: Duration::from_micros(300),
        }
    }
}

/// A part the second thread made.
struct Made<S> {
    /// Where it starts (a transaction start).
    begin: u64,
    /// Where it stopped: position, transaction in progress, complete
    /// transactions in the part.
    pos: u64,
    tx: TxSoFar,
    transactions: u64,
    /// How the log ended in it, if it did.
    stop: Option<ScanStop>,
    part: S,
}

/// A chunk the second thread claimed.
enum Slot<S> {
    Working,
    Made(Made<S>),
    /// Nothing usable: no transaction start in the chunk, a failure, or
    /// taken back by the calling thread.
    Nothing,
}

/// What the two threads share.
struct Board<S> {
    slots: BTreeMap<usize, Slot<S>>,
    /// The next chunk to claim.
    next_claim: usize,
}

/// Scans the mapped record area `area` (as [`Ring::view`] gives it) from
/// `start` up to `limit` as [`super::scan_records_in`] does, calling
/// `on_record(part, lsn, info, ranges, tx)` for every valid record, with
/// the records cut into parts (each made by `new_part`, see the module
/// documentation); returns how the scan ended and the parts in log order.
/// `progress(pos)` is called (on the calling thread) as the scan passes
/// `pos`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan_parts<S, N, R>(
    ring: &Ring,
    area: &[u8],
    start: u64,
    limit: u64,
    epoch: u64,
    plan: Plan,
    new_part: &N,
    on_record: &R,
    progress: &mut dyn FnMut(u64),
) -> Result<(ScanEnd, Vec<S>)>
where
    S: Send,
    N: Fn() -> S + Sync,
    R: Fn(&mut S, u64, &RecordInfo, &[RangeRef], &TxSoFar) -> Result<()> + Sync,
{
    debug_assert_eq!(area.len() as u64, ring.area_len);
    let limit = limit.min(start.saturating_add(ring.area_len));
    let board = parking_lot::Mutex::new(Board::<S> { slots: BTreeMap::new(), next_claim: 1 });
    let helper_pos = AtomicU64::new(0);
    let taken_back = AtomicUsize::new(usize::MAX);
    let end_chunk = AtomicUsize::new(usize::MAX);
    let made = parking_lot::Condvar::new();
    let shared = Shared {
        made: &made,
        area,
        limit,
        epoch,
        chunks: plan.chunks,
        start,
        board: &board,
        helper_pos: &helper_pos,
        taken_back: &taken_back,
        end_chunk: &end_chunk,
    };
    let mut cur = Cursor::new(start);
    let mut part = new_part();
    if !plan.two_threads {
        // One part, one thread (progress told every MiB).
        let mut told = start;
        let stop = shared.scan_from(&mut cur, Until::End, &mut part, on_record, |pos| {
            if pos >= told + (1 << 20) {
                told = pos;
                progress(pos);
            }
            false
        })?;
        progress(cur.pos);
        return Ok((cur.end(stop.unwrap_or(ScanStop::Limit)), vec![part]));
    }
    std::thread::scope(|scope| {
        // When the scan is over, no part is wanted any more: also when it
        // unwinds (the scope waits for the second thread before a panic
        // goes on, and that thread would otherwise scan the rest of the
        // log first).
        let _over = Over(&end_chunk);
        let result = (|| -> Result<(ScanEnd, Vec<S>)> {
            // Chunk 0, starting the second thread on the way.
            let spawn_at = start.saturating_add(plan.spawn_after);
            let mut stop = shared.scan_from(&mut cur, Until::Record(spawn_at), &mut part, on_record, |_| false)?;
            if stop.is_none() {
                // This part goes on to the chunk after the one the scan is
                // in; the chunks after it are claimed in turn.
                let k0 = shared.chunks.of(start, cur.pos);
                board.lock().next_claim = k0 + 1;
                // No thread to be had (a process or cgroup limit): this one
                // does every chunk.
                let _ = std::thread::Builder::new()
                    .name("rvm-scan".into())
                    .spawn_scoped(scope, || shared.work(new_part, on_record, false));
                let next = shared.chunks.start(start, k0 + 1);
                stop = shared.scan_from(&mut cur, Until::TxStart(next), &mut part, on_record, |_| false)?;
            }
            let made = Made { begin: start, pos: cur.pos, tx: cur.tx, transactions: cur.transactions, stop, part };
            board.lock().slots.insert(0, Slot::Made(made));
            if stop.is_some() {
                end_chunk.store(0, Ordering::Relaxed);
            } else {
                // Then chunks as the second thread does, while there are any.
                shared.work(new_part, on_record, true);
            }
            // The parts in log order.
            let mut parts = Vec::new();
            let mut cur = Cursor::new(start);
            loop {
                let k = shared.chunks.of(start, cur.pos);
                if let Some(made) = shared.take(k, cur.pos, plan.stall) {
                    cur = Cursor {
                        pos: made.pos,
                        tx: made.tx,
                        transactions: cur.transactions + made.transactions,
                        ranges: Vec::new(),
                    };
                    parts.push(made.part);
                    progress(cur.pos);
                    if let Some(stop) = made.stop {
                        return Ok((cur.end(stop), parts));
                    }
                    continue;
                }
                // Nothing usable starts here: this chunk on this thread.
                let next = shared.chunks.start(start, k + 1);
                let mut part = new_part();
                let stop = shared.scan_from(&mut cur, Until::TxStart(next), &mut part, on_record, |_| false)?;
                parts.push(part);
                progress(cur.pos);
                if let Some(stop) = stop {
                    return Ok((cur.end(stop), parts));
                }
            }
        })();
        result
    })
}

/// Ends a scan by parts when dropped: the second thread claims no more
/// chunks and gives up the one it is in.
struct Over<'a>(&'a AtomicUsize);

impl Drop for Over<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// What both threads of [`scan_parts`] read.
struct Shared<'a, S> {
    area: &'a [u8],
    limit: u64,
    epoch: u64,
    chunks: Chunks,
    start: u64,
    board: &'a parking_lot::Mutex<Board<S>>,
    /// The second thread's position (it moves while that thread works).
    helper_pos: &'a AtomicU64,
    /// The chunk the calling thread took back from the second thread.
    taken_back: &'a AtomicUsize,
    /// The first chunk in which a part found the log's end (parts of later
    /// chunks are not wanted; 0 once the scan is over).
    end_chunk: &'a AtomicUsize,
    /// Signalled when a part is made (or given up).
    made: &'a parking_lot::Condvar,
}

/// How long the calling thread spins for a part in progress before it
/// sleeps.
const SPIN: Duration = Duration::from_micros(30);
/// How often a sleeping calling thread looks at the second thread's
/// progress.
const LOOK: Duration = Duration::from_micros(100);

impl<S> Shared<'_, S> {
    /// Scans from `cur` into `part` until `until` (or `quit(position)`);
    /// how the log ended, if it did.
    fn scan_from<R>(
        &self,
        cur: &mut Cursor,
        until: Until,
        part: &mut S,
        on_record: &R,
        mut quit: impl FnMut(u64) -> bool,
    ) -> Result<Option<ScanStop>>
    where
        R: Fn(&mut S, u64, &RecordInfo, &[RangeRef], &TxSoFar) -> Result<()>,
    {
        let area_len = self.area.len() as u64;
        let mut src = Mapped { area: self.area, limit: self.limit, wrapped: Vec::new() };
        record_loop(
            &mut src,
            cur,
            |pos, tx_start| {
                quit(pos)
                    || match until {
                        Until::End => false,
                        Until::Record(at) => pos >= at,
                        Until::TxStart(at) => pos >= at && tx_start,
                    }
            },
            self.epoch,
            area_len,
            |lsn, _, info, ranges, tx| on_record(part, lsn, info, ranges, tx),
        )
    }

    /// The calling thread, at `pos` in chunk `k`: the part made of chunk
    /// `k` if it starts at `pos` (waiting for it while the second thread
    /// makes it and moves); otherwise nothing, and the chunk is the
    /// calling thread's to scan.
    fn take(&self, k: usize, pos: u64, stall: Duration) -> Option<Made<S>> {
        let mut last = (self.helper_pos.load(Ordering::Relaxed), Instant::now());
        // Spin a little (a part about to be finished is taken at once),
        // then sleep until a part is made, looking at the second thread's
        // progress now and then (a spinning thread would take the core a
        // busy machine's second thread may be waiting for).
        let spin_until = Instant::now() + SPIN;
        let mut board = self.board.lock();
        loop {
            match board.slots.get(&k) {
                None | Some(Slot::Nothing) => return None,
                Some(Slot::Made(m)) if m.begin != pos => return None,
                Some(Slot::Made(_)) => match board.slots.remove(&k) {
                    Some(Slot::Made(m)) => return Some(m),
                    _ => return None,
                },
                Some(Slot::Working) => {}
            }
            let now = self.helper_pos.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= stall {
                // Not moving: take the chunk back.
                board.slots.insert(k, Slot::Nothing);
                self.taken_back.store(k, Ordering::Relaxed);
                return None;
            }
            if Instant::now() < spin_until {
                parking_lot::MutexGuard::unlocked(&mut board, std::hint::spin_loop);
            } else {
                self.made.wait_for(&mut board, LOOK);
            }
        }
    }

    /// Claims chunks not yet claimed and makes their parts, until there are
    /// none (past the log's end or its limit, or the scan is over). On the
    /// second thread (`main` false) it reports its position as it goes.
    fn work<N, R>(&self, new_part: &N, on_record: &R, main: bool)
    where
        N: Fn() -> S,
        R: Fn(&mut S, u64, &RecordInfo, &[RangeRef], &TxSoFar) -> Result<()>,
    {
        loop {
            let k = {
                let mut board = self.board.lock();
                let k = board.next_claim;
                if k > self.end_chunk.load(Ordering::Relaxed) || self.chunks.start(self.start, k) >= self.limit {
                    return;
                }
                board.next_claim = k + 1;
                board.slots.insert(k, Slot::Working);
                k
            };
            let lo = self.chunks.start(self.start, k);
            let hi = self.chunks.start(self.start, k + 1).min(self.limit);
            let mut n = 0u32;
            // Checked every 64 records or probes: whether the part is still
            // wanted.
            let mut gone = |p: u64| {
                n = n.wrapping_add(1);
                if !n.is_multiple_of(64) {
                    return false;
                }
                if main {
                    return k > self.end_chunk.load(Ordering::Relaxed);
                }
                self.helper_pos.store(p, Ordering::Relaxed);
                k > self.end_chunk.load(Ordering::Relaxed) || self.taken_back.load(Ordering::Relaxed) == k
            };
            let (slot, end_found) = match self.first_tx_start(lo, hi, &mut gone) {
                Probe::Found(begin) => {
                    let mut part = new_part();
                    let mut cur = Cursor::new(begin);
                    let mut quit = false;
                    let scanned = self.scan_from(&mut cur, Until::TxStart(hi), &mut part, on_record, |p| {
                        quit = gone(p);
                        quit
                    });
                    match scanned {
                        // Given up: the part is not wanted.
                        Ok(None) if quit => (Slot::Nothing, false),
                        Ok(stop) => {
                            let made =
                                Made { begin, pos: cur.pos, tx: cur.tx, transactions: cur.transactions, stop, part };
                            (Slot::Made(made), stop.is_some())
                        }
                        // The calling thread meets the same failure in order
                        // (or never reaches it).
                        Err(_) => (Slot::Nothing, true),
                    }
                }
                Probe::NoStart { any_record } => (Slot::Nothing, !any_record),
                Probe::Gone => (Slot::Nothing, false),
            };
            let mut board = self.board.lock();
            // Taken back meanwhile: it stays the calling thread's.
            if let Some(s @ Slot::Working) = board.slots.get_mut(&k) {
                *s = slot;
            }
            if end_found {
                self.end_chunk.fetch_min(k, Ordering::Relaxed);
            }
            self.made.notify_all();
        }
    }

    /// The first transaction start in `[lo, hi)`: every 8-byte position is
    /// tried; from a valid record on, the records are followed.
    fn first_tx_start(&self, lo: u64, hi: u64, gone: &mut dyn FnMut(u64) -> bool) -> Probe {
        let area_len = self.area.len() as u64;
        let mut src = Mapped { area: self.area, limit: self.limit, wrapped: Vec::new() };
        let mut ranges = Vec::new();
        let mut p = lo.next_multiple_of(8);
        let mut any_record = false;
        while p < hi {
            if gone(p) {
                return Probe::Gone;
            }
            match super::record_at(&mut src, p, self.epoch, area_len, &mut ranges).ok().flatten() {
                Some(info) if info.flags & format::FLAG_FIRST != 0 => return Probe::Found(p),
                Some(info) => {
                    any_record = true;
                    p += info.len as u64;
                }
                None => p += 8,
            }
        }
        Probe::NoStart { any_record }
    }
}

/// Where [`Shared::scan_from`] pauses.
#[derive(Clone, Copy)]
enum Until {
    /// Nowhere: to the log's end.
    End,
    /// At the first record at or past a position.
    Record(u64),
    /// At the first transaction start at or past a position (a part ends
    /// there).
    TxStart(u64),
}

/// What [`Shared::first_tx_start`] found.
enum Probe {
    Found(u64),
    /// No transaction starts in the chunk; `any_record`: some record is
    /// there (a transaction crossing it), so the log goes on.
    NoStart {
        any_record: bool,
    },
    /// The scan no longer wants the chunk.
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk starts and the chunk of a position, by levels, agree with
    /// adding the lengths one by one, also for logs far longer than any
    /// loop over chunks could walk.
    #[test]
    fn chunk_starts_and_positions_agree_with_the_lengths() {
        for chunks in [
            Chunks::DEFAULT,
            Chunks { first: 64, grow_every: 3, max: 4096 },
            Chunks { first: 8, grow_every: 1, max: 8 },
        ] {
            let start = 4096;
            let mut at = start;
            for j in 0..200 {
                assert_eq!(chunks.start(start, j), at, "{chunks:?} chunk {j}");
                assert_eq!(chunks.of(start, at), j);
                assert_eq!(chunks.of(start, at + chunks.len(j) - 1), j);
                at += chunks.len(j);
            }
            // A position past 2^50 bytes is found in a few steps.
            let far = chunks.of(start, 1 << 50);
            assert!(chunks.start(start, far) <= 1 << 50 && (1 << 50) < chunks.start(start, far + 1));
        }
    }
}
