//! The undeclared-store detector ([`crate::Options::verify_stores`]).
//!
//! A store into recoverable memory that no `set_range` declared is lost in
//! a crash (a log replay never writes it), yet a checkpoint that sweeps the
//! page writes it: what survives depends on timing. The detector keeps a
//! shadow of every page a transaction declared something in (copied at the
//! first declaration): the page's bytes as the committed state and the
//! open transactions' declared ranges explain them. Every transaction's
//! end brings its ranges' shadow bytes up to date (the committed bytes, the
//! restored ones, or a no-restore abort's leftovers).
//!
//! Checked:
//! - at commit, every page the committing transaction declared something
//!   in: a byte that differs from the shadow and lies in no open
//!   transaction's declared range is an undeclared store; the commit fails
//!   with [`TxError::UndeclaredStore`] (address, run length, region) and
//!   the transaction is aborted;
//! - before a checkpoint's sweep reads memory, every page it will sweep;
//!   the checkpoint fails with the same error (one started by the
//!   background thread hands it to the next commit).
//!
//! Declarations and checks exclude each other (a read-write lock), so a
//! check never sees a store whose declaration it missed. Tracked regions
//! need no detector (their stores are found by faults).

use crate::error::{Result, TxError};
use crate::mem;
use crate::segment::RegionInner;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use std::collections::HashMap;
use std::sync::Arc;

/// Shadow pages of one region (page index → bytes).
pub(crate) type Shadow = Mutex<HashMap<usize, Box<[u8]>>>;

/// The instance's detector.
#[derive(Debug, Default)]
pub(crate) struct Verifier {
    lock: RwLock<()>,
    /// A finding of a background checkpoint, for the next commit to report.
    pending: Mutex<Option<TxError>>,
}

impl Verifier {
    /// Shadows the pages `[addr, addr + len)` touches (a declaration).
    pub fn declare(&self, region: &RegionInner, addr: usize, len: usize, record: impl FnOnce()) {
        let _g = self.lock.read();
        let ps = mem::page_size();
        let (first, last) = pages_of(region, addr, len);
        let mut shadow = region.shadow.lock();
        for p in first..=last {
            shadow.entry(p).or_insert_with(|| {
                let mut page = vec![0u8; ps].into_boxed_slice();
                // SAFETY: a page of a live region the caller's transaction
                // holds. Other transactions may be storing into their own
                // declared ranges on it; those bytes are excluded from every
                // check while open and rewritten in the shadow when they end.
                unsafe { mem::copy_from_racy(region.addr() + p * ps, &mut page) };
                page
            });
        }
        // Recorded under the read lock: a check after it sees the range.
        record();
    }

    /// Brings the shadow of `[addr, addr + len)` up to date with memory (a
    /// transaction's end).
    pub fn sync(&self, region: &RegionInner, addr: usize, len: usize) {
        let ps = mem::page_size();
        let mut shadow = region.shadow.lock();
        let (first, last) = pages_of(region, addr, len);
        for p in first..=last {
            let Some(page) = shadow.get_mut(&p) else { continue };
            let page_addr = region.addr() + p * ps;
            let from = addr.max(page_addr);
            let to = (addr + len).min(page_addr + ps);
            // SAFETY: inside a live region; the range is the ending
            // transaction's, which no one else writes.
            unsafe { mem::copy_from(from, &mut page[from - page_addr..to - page_addr]) };
        }
    }

    /// Takes the check lock (declarations wait while it is held).
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write()
    }

    /// A finding left by a background checkpoint.
    pub fn take_pending(&self) -> Option<TxError> {
        self.pending.lock().take()
    }

    pub fn set_pending(&self, e: TxError) {
        *self.pending.lock() = Some(e);
    }
}

fn pages_of(region: &RegionInner, addr: usize, len: usize) -> (usize, usize) {
    let ps = mem::page_size();
    let off = addr - region.addr();
    (off / ps, (off + len.max(1) - 1) / ps)
}

/// Checks pages `pages` of `region` against their shadows, ignoring bytes
/// inside `open` (declared ranges of open transactions, sorted by start).
/// The caller holds the check lock.
pub(crate) fn check_pages(
    region: &Arc<RegionInner>,
    pages: impl Iterator<Item = usize>,
    open: &[(usize, usize)],
) -> Result<()> {
    if region.tracked.get().is_some() {
        // Shadows from before `track` are stale: tracked stores are found
        // by faults instead.
        return Ok(());
    }
    let ps = mem::page_size();
    let open = merged(open);
    let open = &open[..];
    let shadow = region.shadow.lock();
    for p in pages {
        let Some(old) = shadow.get(&p) else { continue };
        let page_addr = region.addr() + p * ps;
        let mut found: Option<(usize, usize)> = None;
        let mut runs = 0usize;
        // The end of the run being measured, if the last byte looked at
        // was part of one.
        let mut open_run: Option<usize> = None;
        for w in 0..ps / 8 {
            // SAFETY: a word of a live, page-aligned region; bytes of open
            // ranges may be stored into meanwhile (a racy read, as the
            // checkpoint's snapshots do); they are ignored below.
            let now = unsafe { std::ptr::read_volatile((page_addr + w * 8) as *const u64) }.to_ne_bytes();
            let was = &old[w * 8..w * 8 + 8];
            if now[..] == was[..] {
                open_run = None;
                continue;
            }
            for b in 0..8 {
                let at = page_addr + w * 8 + b;
                if now[b] != was[b] && !declared(open, at) {
                    match (open_run, &mut found) {
                        (Some(_), Some((start, len))) if *start + *len == at => *len += 1,
                        (Some(_), _) => {}
                        (None, f) => {
                            runs += 1;
                            f.get_or_insert((at, 1));
                        }
                    }
                    open_run = Some(at);
                } else {
                    open_run = None;
                }
            }
        }
        if let Some((addr, len)) = found {
            return Err(TxError::UndeclaredStore { addr, len, region: region.addr(), runs }.into());
        }
    }
    Ok(())
}

/// `open` (sorted by start, possibly overlapping) as disjoint ranges,
/// sorted: so at most one can hold an address.
fn merged(open: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(open.len());
    for &(a, l) in open {
        match out.last_mut() {
            Some((b, m)) if a <= *b + *m => *m = (*m).max(a + l - *b),
            _ => out.push((a, l)),
        }
    }
    out
}

/// Whether `addr` is inside one of `open` (disjoint, sorted by start):
/// a binary search, so a check stays linear in the bytes changed however
/// many ranges a transaction declared.
fn declared(open: &[(usize, usize)], addr: usize) -> bool {
    let i = open.partition_point(|&(a, _)| a <= addr);
    i > 0 && addr < open[i - 1].0 + open[i - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_finds_addresses_in_overlapping_ranges() {
        let open = merged(&[(10, 5), (12, 10), (30, 2), (31, 1), (40, 0)]);
        assert_eq!(open, [(10, 12), (30, 2), (40, 0)]);
        for a in 0..50 {
            let want = (10..22).contains(&a) || (30..32).contains(&a);
            assert_eq!(declared(&open, a), want, "{a}");
        }
    }
}
