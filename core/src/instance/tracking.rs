//! The instance's side of tracked transactions (`crate::tracked`): the
//! session, `Rvm::track`, and holding tracked writers off while a region
//! goes.

use super::{Inner, Rvm};
use crate::error::{MapError, Result};
use crate::segment::{CopyMode, Region, RegionInner};
use crate::tracked::{Session, Source, TrackingMethod};
use parking_lot::MutexGuard;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

/// The session slot in [`Inner`].
pub(crate) type SessionCell = OnceLock<Arc<Session>>;

impl Inner {
    /// The instance's tracked-transaction session, created on first use.
    pub(crate) fn tracked_session(&self) -> Result<&Arc<Session>> {
        if let Some(s) = self.tracked.get() {
            return Ok(s);
        }
        let made = Session::new(self.opts().tracked_pool_pages, self.opts().tracked_logging)?;
        // A racing creator may win; its session is as good as ours.
        let _ = self.tracked.set(Arc::new(made));
        Ok(self.tracked.get().unwrap_or_else(|| unreachable!("set above")))
    }
}

/// Holds tracked transactions off while `region` (if tracked) is unmapped;
/// refused on the thread that has one open.
pub(crate) fn hold_writers<'a>(rvm: &'a Inner, region: &RegionInner) -> Result<Option<MutexGuard<'a, ()>>> {
    let Some(s) = rvm.tracked.get().filter(|_| region.tracked.get().is_some()) else { return Ok(None) };
    if s.held_by_me() {
        return Err(MapError::Busy { addr: region.addr(), count: 1 }.into());
    }
    Ok(Some(s.lock_writers()))
}

impl Rvm {
    /// Puts `region` in tracked mode for good, with the method of
    /// [`crate::Options::tracking`] ([`TrackingMethod::Fault`] by default):
    /// see [`Rvm::track_with`].
    pub fn track(&self, region: &Region) -> Result<()> {
        self.track_with(region, self.inner.opts().tracking)
    }

    /// Puts `region` in tracked mode for good: tracked transactions
    /// ([`Rvm::begin_tracked`]) find its stores with `method` and need no
    /// `set_range`. An ordinary transaction's `set_range` into it is
    /// refused ([`crate::TxError::TrackedRegion`]). Tracking a region twice
    /// does nothing (the first method stays).
    ///
    /// Fails with [`MapError::Busy`] while a transaction has ranges in the
    /// region, or when the calling thread has a tracked transaction open;
    /// waits for another thread's tracked transaction to end. With
    /// [`TrackingMethod::WriteProtect`], fails with
    /// [`MapError::TrackingUnavailable`] where the kernel does not offer
    /// it (the region stays untracked).
    ///
    /// [`TrackingMethod::Fault`]: the pages are read-only outside tracked
    /// transactions; stores into the region outside one, or from a thread
    /// other than the transaction's, kill the process with `SIGSEGV`
    /// (after a message on standard error); stores by the kernel
    /// (`read(2)` into the region) fail with `EFAULT`: read into a buffer
    /// and copy. The method relies on the `SIGSEGV` handler installed
    /// with the first tracked region: a handler the program installs
    /// afterwards (a crash reporter) must pass faults it does not own to
    /// the action it replaced, or the first store into a tracked page goes
    /// to it alone. [`TrackingMethod::WriteProtect`]: stores always succeed;
    /// another thread's store during a tracked transaction is attributed to
    /// it, stores outside transactions are undone and reported at the next
    /// begin, `read(2)` into the region is tracked like a store.
    pub fn track_with(&self, region: &Region, method: TrackingMethod) -> Result<()> {
        self.inner.check_process()?;
        let inner = &self.inner;
        let r = &region.0;
        if r.tracked.get().is_some() {
            return Ok(());
        }
        // Instant recovery: the region's pages up to date and accessible
        // (its fault hook gone) before tracking protects them.
        inner.settle_segment(&r.segment)?;
        r.lazy.lock().take();
        let session = inner.tracked_session()?;
        if session.held_by_me() {
            // This thread's own tracked transaction is open: waiting for it
            // would never end.
            return Err(MapError::Busy { addr: r.addr(), count: 1 }.into());
        }
        // No tracked transaction may run while pages change mode.
        let _w = session.lock_writers();
        // Nor may an ordinary transaction start using the region: its
        // `set_range` checks `tracked` and counts itself in `active_txs`
        // under the table's read lock, so under the write lock, held until
        // `tracked` is set, either we see its count or it sees `tracked`.
        let _table = inner.regions.write();
        if r.tracked.get().is_some() {
            return Ok(());
        }
        let busy = r.active_txs.load(Ordering::Acquire);
        if busy > 0 {
            return Err(MapError::Busy { addr: r.addr(), count: busy }.into());
        }
        let source = match r.copy {
            // A private file mapping: a page never changed since the map
            // shows the segment's bytes (map applied the log first, and
            // only changed pages are written back).
            CopyMode::OnDemand => {
                let dev = r.segment.dev.clone();
                let at = r.offset;
                Source::Read(Box::new(move |off, buf| dev.read_at(buf, at + off as u64)))
            }
            // Anonymous memory: every page filled or stored into is
            // private (its shadow is taken at once); the others are zeros.
            CopyMode::OnMap | CopyMode::NoCopy => Source::Zero,
        };
        let tracked = crate::tracked::track_range(session, r.addr(), r.mapping.len(), method, source)?;
        let _ = r.tracked.set(tracked);
        // The undeclared-store detector does not watch tracked regions.
        r.shadow.lock().clear();
        Ok(())
    }
}

impl Region {
    /// Whether the region is tracked ([`Rvm::track`]).
    pub fn is_tracked(&self) -> bool {
        self.0.tracked.get().is_some()
    }

    /// The region's tracking method, if it is tracked.
    pub fn tracking(&self) -> Option<TrackingMethod> {
        self.0.tracked.get().map(|t| t.pages.method())
    }
}
