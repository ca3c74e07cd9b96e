//! The background truncator: frees log space when the used fraction passes
//! `Options::truncate_threshold`, or half of `Options::max_unapplied_log`
//! is in use, by checkpoint or by replay.

use super::Inner;
use crate::options::Reclaim;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

#[derive(Debug, Default)]
pub(super) struct Background {
    pub(super) stop: Mutex<bool>,
    pub(super) wake: Condvar,
}

pub(super) fn background_loop(weak: Weak<Inner>, bg: Arc<Background>) {
    loop {
        {
            let mut stop = bg.stop.lock();
            if *stop {
                return;
            }
            bg.wake.wait_for(&mut stop, Duration::from_millis(100));
            if *stop {
                return;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.poisoned.load(Ordering::Acquire) {
            return;
        }
        let written = inner.log_tail();
        let used = written - inner.head.load(Ordering::Acquire);
        if inner.reclaim_at().is_some_and(|at| used > at) {
            // Errors poison the instance; committers will report them.
            let _ = match inner.opts.reclaim {
                Reclaim::Checkpoint => inner.checkpoint_full().map(|_| ()),
                Reclaim::Replay => inner.sync_to(written).and_then(|_| inner.truncate_to(written)),
            };
        }
    }
}
