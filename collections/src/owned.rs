//! [`Owned`]: a value that owns heap blocks while it is outside the heap,
//! and [`IntoPersist`]: what a collection accepts to store.

use crate::error::{Error, Result};
use crate::persist::{Persist, Plain};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::rc::Rc;

/// How to find the blocks a value owns: [`crate::shape::trace_value`] for
/// its type.
type TraceFn = fn(&rvm_heap::Heap, usize) -> std::result::Result<Vec<usize>, crate::shape::TraceError>;

/// A write transaction's record of its [`Owned`] values that own blocks.
pub(crate) struct Floating<'h> {
    heap: &'h rvm_heap::Heap,
    next: Cell<u64>,
    /// Values outside the heap, not yet stored, by id: a copy of their
    /// bytes and how to trace them. One never stored nor dropped (passed
    /// to `mem::forget`) is traced and freed at commit.
    live: RefCell<HashMap<u64, (Vec<u8>, TraceFn)>>,
    /// Blocks of dropped values, freed at commit (as every free).
    dropped: RefCell<Vec<usize>>,
    /// A value that could not be traced when dropped (a bug or damage):
    /// the commit fails.
    failed: Cell<bool>,
}

impl std::fmt::Debug for Floating<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Floating").field("live", &self.live.borrow().len()).finish_non_exhaustive()
    }
}

impl<'h> Floating<'h> {
    pub(crate) fn new(heap: &'h rvm_heap::Heap) -> Self {
        Floating {
            heap,
            next: Cell::new(1),
            live: RefCell::new(HashMap::new()),
            dropped: RefCell::new(Vec::new()),
            failed: Cell::new(false),
        }
    }

    /// Records `value` (outside the heap, owning blocks); its id (0 for a
    /// type that owns none).
    pub(crate) fn register<T: Persist>(&self, value: &T) -> u64 {
        if !T::OWNS_BLOCKS {
            return 0;
        }
        let id = self.next.get();
        self.next.set(id + 1);
        let bytes = crate::persist::bytes_of(value).to_vec();
        self.live.borrow_mut().insert(id, (bytes, crate::shape::trace_value::<T>));
        id
    }

    /// Forgets value `id` (stored in the heap now).
    fn settle(&self, id: u64) {
        if id != 0 {
            self.live.borrow_mut().remove(&id);
        }
    }

    /// Value `id`, at `addr`, is dropped: its blocks go.
    fn drop_value<T: Persist>(&self, id: u64, addr: usize) {
        if id == 0 {
            return;
        }
        self.live.borrow_mut().remove(&id);
        match crate::shape::trace_value::<T>(self.heap, addr) {
            Ok(b) => self.dropped.borrow_mut().extend(b),
            Err(_) => self.failed.set(true),
        }
    }

    /// Every block to free at commit: the dropped values' and the
    /// forgotten ones'. `Err` if a value could not be traced.
    pub(crate) fn take_garbage(&self) -> Result<Vec<usize>> {
        let mut out: Vec<usize> = self.dropped.borrow_mut().drain(..).collect();
        for (_, (bytes, trace)) in self.live.borrow_mut().drain() {
            match trace(self.heap, bytes.as_ptr() as usize) {
                Ok(b) => out.extend(b),
                Err(_) => self.failed.set(true),
            }
        }
        if self.failed.get() {
            return Err(Error::Damaged { name: "a value dropped in the transaction".into() });
        }
        Ok(out)
    }
}

/// A value of a write transaction that owns heap blocks but is not (or no
/// longer) stored in the heap: a box just made ([`crate::WriteTx::new_box`]),
/// an element popped or removed from a collection (`pop_owned`,
/// `remove_owned`, ...). Read it through `Deref`; store it with any method
/// that takes an [`IntoPersist`] (`push`, `insert`, `root_or_insert_with`,
/// ...); drop it, and what it owns is freed in the transaction.
///
/// It cannot leave its transaction's closure (its lifetime is the
/// transaction's, which the closure cannot name), so no value that owns
/// blocks ever exists outside the heap between transactions; and one that
/// is never stored nor dropped (`mem::forget`) is freed at commit: nothing
/// leaks. Its lifetime is not tied to the guard it came from, so it can
/// move from one place of a root to another.
///
/// ```compile_fail
/// # use rvm_collections::{Config, Error, PHeap};
/// # fn f(heap: &PHeap) {
/// let escaped = heap.write(|tx| Ok::<_, Error>(tx.new_box(1u64)?));
/// # }
/// ```
pub struct Owned<'h, T: Persist> {
    floating: Rc<Floating<'h>>,
    value: ManuallyDrop<T>,
    /// The value's id in `floating`.
    id: u64,
    /// Whether the value has been stored (so the drop frees nothing).
    moved: bool,
}

impl<'h, T: Persist> Owned<'h, T> {
    /// Wraps `value` (outside the heap, owning blocks of `floating`'s
    /// transaction).
    pub(crate) fn new(floating: Rc<Floating<'h>>, value: T) -> Self {
        let id = floating.register(&value);
        Owned { floating, value: ManuallyDrop::new(value), id, moved: false }
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
            self.floating.drop_value::<T>(self.id, &*self.value as *const T as usize);
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
    /// The value, for storing in the heap of the transaction whose record
    /// is `floating`.
    #[doc(hidden)]
    #[allow(private_interfaces)]
    fn into_value(self, floating: &Rc<Floating<'_>>) -> Result<T>;
}

impl<T: Persist> sealed::Sealed<T> for T {}

/// A bare value: made by safe code outside the heap, so it owns no block
/// (every constructor of a block-owning value returns an [`Owned`]).
impl<T: Persist> IntoPersist<T> for T {
    #[allow(private_interfaces)]
    fn into_value(self, _: &Rc<Floating<'_>>) -> Result<T> {
        Ok(self)
    }
}

impl<T: Persist> sealed::Sealed<T> for Owned<'_, T> {}

impl<T: Persist> IntoPersist<T> for Owned<'_, T> {
    #[allow(private_interfaces)]
    fn into_value(mut self, floating: &Rc<Floating<'_>>) -> Result<T> {
        if !std::ptr::addr_eq(Rc::as_ptr(&self.floating), Rc::as_ptr(floating)) {
            // Another heap's (or transaction's) blocks: dropped, so freed
            // in its own transaction.
            return Err(Error::ForeignValue);
        }
        self.moved = true;
        self.floating.settle(self.id);
        // SAFETY: the value is taken once: `moved` makes the drop skip it.
        Ok(unsafe { ManuallyDrop::take(&mut self.value) })
    }
}
