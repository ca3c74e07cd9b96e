//! Truncation by log replay (`Rvm::truncate`, the `Replay` policy, a
//! writer that finds the log full), and the status record of how far the
//! log is synced that must precede any segment write.

use super::Inner;
use crate::error::{Error, Result};
use crate::replay::{replay, Replayed};
use crate::stats::Counters;
use std::sync::atomic::Ordering;

impl Inner {
    /// Makes sure a durable status says the log is synced at least up to
    /// `upto` (writing one at the current synced position if not). Called
    /// before segments receive bytes from records below `upto`: from then
    /// on, damage to those records is always refused at open, never taken
    /// for a torn end that recovery would silently stop at (with the
    /// segment already holding part of what follows).
    pub(crate) fn record_synced_end(&self, upto: u64) -> Result<()> {
        self.wait_recovered()?;
        let synced = self.synced_end();
        let mut st = self.status.lock();
        if st.status.synced_end >= upto.min(synced) {
            return Ok(());
        }
        // A status write that failed may have damaged a slot: stop.
        self.poison(st.write_next(&self.ring, |next| next.synced_end = synced))
    }

    /// The position up to which the log is durable (a status records it,
    /// so that recovery can tell damage from a torn end).
    pub(crate) fn synced_end(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// Flushes every commit so far, then replays the whole log onto the
    /// segments and frees it.
    pub(crate) fn replay_all(&self) -> Result<()> {
        let last = self.state.lock().next_tx - 1;
        self.flush_to(last)?;
        self.sync_to(self.log_tail())?;
        self.truncate_to(self.synced.load(Ordering::Acquire))
    }

    /// Applies the durable log up to `cut` (a batch boundary) to the
    /// segments, then frees it: the split of the log into the part being
    /// truncated and the active part, where commits go on.
    pub(super) fn truncate_to(&self, cut: u64) -> Result<()> {
        // A running checkpoint ends first (below): at full speed.
        let _hurry = self.ckpt.hurry();
        self.wait_recovered()?;
        let _t = self.truncation.lock();
        self.check_poison()?;
        // A checkpoint in progress is finished first (its page images are
        // older than what the replay writes) or, still frozen, dropped (the
        // replay covers it).
        self.settle_checkpoint_locked()?;
        let head = self.head.load(Ordering::Acquire);
        let cut = cut.min(self.synced.load(Ordering::Acquire));
        if cut <= head {
            return Ok(());
        }
        let r = (|| {
            self.record_synced_end(cut)?;
            // Each segment the records name is looked up when the replay
            // first meets it, and only those are held until it ends: a
            // segment closed meanwhile (one without records here; a close
            // of one with records replays first, behind `truncation`) is
            // not kept open, so it can be opened again at once.
            let resolve = |id| {
                let st = self.status.lock();
                st.segments.get(&id).map(|s| (s.dev.clone(), s.name.clone())).ok_or_else(|| {
                    Error::corrupted(
                        format!("log frame (unknown segment id {id})"),
                        self.ring.path.display().to_string(),
                    )
                })
            };
            let Replayed { end, segment_bytes, .. } = replay(&self.ring, head, cut, self.epoch, resolve)?;
            if end.end != cut {
                return Err(Error::corrupted(
                    "log (records this instance wrote are unreadable)",
                    format!("{} position {}", self.ring.path.display(), end.end),
                ));
            }
            Counters::add(&self.counters.segment_bytes_written, segment_bytes);
            self.status.lock().write_next(&self.ring, |next| {
                next.head = cut;
                next.synced_end = cut;
                next.committed = next.committed.saturating_add(end.transactions);
            })
        })();
        self.poison(r)?;
        self.head.store(cut, Ordering::Release);
        Counters::add(&self.counters.truncations, 1);
        Counters::add(&self.counters.truncated_bytes, cut - head);
        Ok(())
    }
}
