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

impl Inner {
    /// Starts the truncation thread unless it runs or the instance is
    /// closing. A thread that cannot be started is tried again at the next
    /// batch past the threshold; meanwhile a full log is reclaimed by the
    /// committer that finds it full, as without a threshold.
    pub(super) fn start_truncator(&self) {
        // Under the handle's lock: the close sets `stop`, then takes the
        // handle, so a thread started here is either never started or
        // joined.
        let mut slot = self.bg_thread.lock();
        if slot.is_some() || *self.background.stop.lock() {
            return;
        }
        let (weak, bg) = (self.me.clone(), self.background.clone());
        if let Ok(handle) =
            std::thread::Builder::new().name("rvm-truncate".into()).spawn(move || background_loop(weak, bg))
        {
            *slot = Some(handle);
        }
    }
}

fn background_loop(weak: Weak<Inner>, bg: Arc<Background>) {
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

#[cfg(test)]
mod tests {
    use crate::{create_log, CommitMode, MapSpec, Options, RestoreMode, Rvm};

    /// An open starts neither the write-behind nor the truncation thread:
    /// the first spooled batch starts the one, the log passing its
    /// threshold the other, which then reclaims the log; the close joins
    /// both.
    #[test]
    fn threads_start_when_first_needed() {
        let dir = tempfile::tempdir().unwrap();
        let (log, seg) = (dir.path().join("log"), dir.path().join("seg"));
        create_log(&log, 1 << 20).unwrap();
        let opts = Options { truncate_threshold: Some(0.25), pending_limit: 4096, ..Options::default() };
        let rvm = Rvm::open(&log, opts).unwrap();
        let running = |rvm: &Rvm| (rvm.inner.log_writer.lock().is_some(), rvm.inner.bg_thread.lock().is_some());
        assert_eq!(running(&rvm), (false, false));
        let s = rvm.create_segment(&seg, 1 << 16).unwrap();
        let region = rvm.map(&s, MapSpec::new(0, 1 << 16)).unwrap();
        let commit = |n: u8, mode| {
            let mut t = rvm.begin(RestoreMode::NoRestore).unwrap();
            // SAFETY: this thread alone uses the region.
            unsafe { t.modify_bytes(region.addr() + usize::from(n) * 256, &[n; 256]).unwrap() };
            t.commit(mode).unwrap();
        };
        commit(1, CommitMode::Flush);
        assert_eq!(running(&rvm), (false, false), "a flush commit writes its batch itself");
        // No-flush commits until a batch is full (a few KiB) and spooled.
        for i in 0..64u8 {
            commit(i, CommitMode::NoFlush);
        }
        assert!(running(&rvm).0, "a full batch was spooled");
        assert!(!running(&rvm).1, "the log is far from its threshold");
        // Past a quarter of the log (256 KiB).
        for i in 0..1200u32 {
            commit((i % 200) as u8, CommitMode::Flush);
        }
        assert!(running(&rvm).1, "the log passed its threshold");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while rvm.stats().truncations + rvm.stats().checkpoints == 0 {
            assert!(std::time::Instant::now() < deadline, "the truncation thread reclaimed nothing");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop((region, s));
        rvm.close().unwrap();
    }
}
