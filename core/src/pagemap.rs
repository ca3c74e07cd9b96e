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
