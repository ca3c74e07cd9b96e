//! A sparse table from page number to a value: a top level of leaves of
//! [`LEAF`] entries, each made on first use. Replay's page cache and
//! instant recovery's page index both use it (a segment of 2^64 bytes has
//! far too many pages for a flat table, and a hash map costs a hash per
//! lookup on their hot paths). Lookups allocate nothing, so the fault
//! hook may use them.

/// Pages per leaf (16 MiB of segment with 4 KiB pages).
pub(crate) const LEAF: u64 = 4096;

#[derive(Debug)]
pub(crate) struct PageMap<T> {
    leaves: Vec<Option<Box<[T]>>>,
}

impl<T> Default for PageMap<T> {
    fn default() -> Self {
        PageMap { leaves: Vec::new() }
    }
}

impl<T> PageMap<T> {
    /// The entry of `page`, if its leaf has been made.
    #[inline]
    pub fn get(&self, page: u64) -> Option<&T> {
        let leaf = self.leaves.get((page / LEAF) as usize)?.as_ref()?;
        Some(&leaf[(page % LEAF) as usize])
    }

    /// The entry of `page`, making its leaf (every entry `empty()`) first
    /// if needed.
    #[inline]
    pub fn get_or_insert_with(&mut self, page: u64, empty: impl Fn() -> T) -> &mut T {
        let top = (page / LEAF) as usize;
        if self.leaves.len() <= top {
            self.leaves.resize_with(top + 1, || None);
        }
        let leaf = self.leaves[top].get_or_insert_with(|| new_leaf(empty));
        &mut leaf[(page % LEAF) as usize]
    }

    /// [`Self::get_or_insert_with`], unless making the leaf (and growing
    /// the top level to reach it) would take more than `budget`'s bytes:
    /// `None` then, nothing made. What it makes is taken from `budget`
    /// (shared by the tables of one index). An index built from a log's
    /// ranges before their segments' lengths are checked uses this: a
    /// forged offset near 2^64 must not make a top level of 2^40 leaves.
    #[inline]
    pub fn get_or_insert_within(
        &mut self,
        page: u64,
        empty: impl Fn() -> T,
        budget: &std::sync::atomic::AtomicU64,
    ) -> Option<&mut T> {
        let top = usize::try_from(page / LEAF).ok()?;
        if !matches!(self.leaves.get(top), Some(Some(_))) && !self.make_leaf(top, empty, budget) {
            return None;
        }
        self.leaves.get_mut(top)?.as_deref_mut()?.get_mut((page % LEAF) as usize)
    }

    /// Makes leaf `top` if `budget` holds its bytes (and the top level's
    /// growth); false if not.
    #[cold]
    #[inline(never)]
    fn make_leaf(&mut self, top: usize, empty: impl Fn() -> T, budget: &std::sync::atomic::AtomicU64) -> bool {
        use std::sync::atomic::Ordering;
        let entry = std::mem::size_of::<Option<Box<[T]>>>() as u64;
        let growth = (top as u64).saturating_add(1).saturating_sub(self.leaves.len() as u64);
        let cost = growth.saturating_mul(entry).saturating_add(LEAF.saturating_mul(std::mem::size_of::<T>() as u64));
        if budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(cost)).is_err() {
            return false;
        }
        if self.leaves.len() <= top {
            self.leaves.resize_with(top + 1, || None);
        }
        self.leaves[top] = Some(new_leaf(empty));
        true
    }

    /// Every entry of every leaf made, with its page number, in page order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.leaves
            .iter()
            .enumerate()
            .filter_map(|(top, l)| l.as_deref().map(|l| (top, l)))
            .flat_map(|(top, leaf)| leaf.iter().enumerate().map(move |(i, e)| (top as u64 * LEAF + i as u64, e)))
    }

    /// Every entry of every leaf made, mutably.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.leaves.iter_mut().flatten().flat_map(|l| l.iter_mut())
    }
}

/// A leaf of `empty()` entries, out of the lookup's way.
#[cold]
#[inline(never)]
fn new_leaf<T>(empty: impl Fn() -> T) -> Box<[T]> {
    (0..LEAF).map(|_| empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_budget_bounds_the_leaves_and_the_top_level() {
        let leaf = LEAF * std::mem::size_of::<u32>() as u64;
        let entry = std::mem::size_of::<Option<Box<[u32]>>>() as u64;
        let budget = AtomicU64::new(2 * leaf + 4 * entry);
        let mut m = PageMap::<u32>::default();
        *m.get_or_insert_within(5, || 0, &budget).unwrap() = 7;
        assert_eq!(budget.load(Ordering::Relaxed), leaf + 3 * entry);
        // The same leaf again costs nothing.
        assert_eq!(*m.get_or_insert_within(LEAF - 1, || 0, &budget).unwrap(), 0);
        assert_eq!(m.get(5), Some(&7));
        // A page near the top of u64: a top level of 2^40 leaves is refused,
        // nothing made.
        assert!(m.get_or_insert_within(u64::MAX - 1, || 0, &budget).is_none());
        assert!(m.get_or_insert_within(1 << 50, || 0, &budget).is_none());
        assert_eq!(budget.load(Ordering::Relaxed), leaf + 3 * entry);
        // A second leaf fits; a third does not.
        assert!(m.get_or_insert_within(3 * LEAF, || 0, &budget).is_some());
        assert!(m.get_or_insert_within(2 * LEAF, || 0, &budget).is_none());
        assert_eq!(m.iter().count() as u64, 2 * LEAF);
    }
}
