//! [`Owned`]: a value that owns heap blocks while it is outside the heap,
//! and [`IntoPersist`]: what a collection accepts to store.

use crate::error::{Error, Result};
use crate::persist::{Persist, Plain};
use std::mem::ManuallyDrop;
use std::ops::Deref;

/// What an [`Owned`] value reports to when dropped: its transaction.
pub(crate) trait Sink {
    /// Frees `blocks` (a dropped value's) in the transaction.
    fn drop_blocks(&self, blocks: &[usize]);
    /// Identifies the transaction.
    fn id(&self) -> usize;
}

/// A value of a write transaction that owns heap blocks but is not (or no
/// longer) stored in the heap: a box just made ([`crate::WriteTx::new_box`]),
/// an element popped or removed from a collection (`pop_owned`,
/// `remove_owned`, ...). Read it through `Deref`; store it with any method
/// that takes an [`IntoPersist`] (`push`, `insert`, `root_or_insert_with`,
/// ...); drop it, and what it owns is freed in the transaction.
///
/// It cannot outlive its transaction (its lifetime is the transaction's
/// borrow), so no value that owns blocks ever exists outside the heap
/// between transactions; and one that is never stored nor dropped
/// (`mem::forget`) is freed at commit: nothing leaks.
///
/// ```compile_fail
/// # use rvm_collections::{Config, Error, PHeap};
/// # fn f(heap: &PHeap) {
/// let escaped = heap.write(|tx| Ok::<_, Error>(tx.new_box(1u64)?));
/// # }
/// ```
pub struct Owned<'t, T: Persist> {
    sink: &'t dyn Sink,
    value: ManuallyDrop<T>,
    /// Every block the value owns.
    blocks: Vec<usize>,
    /// Whether the value has been stored (so the drop frees nothing).
    moved: bool,
}

impl<'t, T: Persist> Owned<'t, T> {
    pub(crate) fn new(sink: &'t dyn Sink, value: T, blocks: Vec<usize>) -> Self {
        Owned { sink, value: ManuallyDrop::new(value), blocks, moved: false }
    }

    /// The value, for a type that owns nothing (a bitwise copy is the
    /// value; nothing is freed).
    pub fn into_inner(mut self) -> T
    where
        T: Plain,
    {
        self.moved = true;
        // SAFETY: the value is taken once: `moved` makes the drop skip it.
        unsafe { ManuallyDrop::take(&mut self.value) }
    }
}

impl<T: Persist> Deref for Owned<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Persist + std::fmt::Debug> std::fmt::Debug for Owned<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Owned").field(&*self.value).finish()
    }
}

impl<T: Persist> Drop for Owned<'_, T> {
    fn drop(&mut self) {
        if !self.moved {
            self.sink.drop_blocks(&self.blocks);
        }
    }
}

mod sealed {
    pub trait Sealed<T> {}
}

/// A value a collection (or a root) can store: a bare `T` (one that owns
/// no block yet: plain data, an empty collection), or an [`Owned`] value
/// of the same transaction.
pub trait IntoPersist<T: Persist>: sealed::Sealed<T> {
    /// The value and the blocks it owns, for storing in `sink`'s heap.
    #[doc(hidden)]
    #[allow(private_interfaces)]
    fn into_value(self, sink: &dyn Sink) -> Result<(T, Vec<usize>)>;
}

impl<T: Persist> sealed::Sealed<T> for T {}

/// A bare value: made by safe code outside the heap, so it owns no block
/// (every constructor of a block-owning value returns an [`Owned`]).
impl<T: Persist> IntoPersist<T> for T {
    #[allow(private_interfaces)]
    fn into_value(self, _: &dyn Sink) -> Result<(T, Vec<usize>)> {
        Ok((self, Vec::new()))
    }
}

impl<T: Persist> sealed::Sealed<T> for Owned<'_, T> {}

impl<T: Persist> IntoPersist<T> for Owned<'_, T> {
    #[allow(private_interfaces)]
    fn into_value(mut self, sink: &dyn Sink) -> Result<(T, Vec<usize>)> {
        if self.sink.id() != sink.id() {
            // Another heap's (or transaction's) blocks: dropped, so freed
            // in its own transaction.
            return Err(Error::ForeignValue);
        }
        self.moved = true;
        let blocks = std::mem::take(&mut self.blocks);
        // SAFETY: the value is taken once: `moved` makes the drop skip it.
        let value = unsafe { ManuallyDrop::take(&mut self.value) };
        Ok((value, blocks))
    }
}
