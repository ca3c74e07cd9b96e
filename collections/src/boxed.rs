//! [`PBox`]: an owned pointer to a value in the heap.

use crate::error::Result;
use crate::owned::{IntoPersist, Owned};
use crate::persist::{fingerprint_mix, fingerprint_start, Persist};
use crate::shape::{Kind, ShapeId, Shapes};
use crate::tx::Mut;
use std::marker::PhantomData;
use std::num::NonZeroU64;
use std::ptr::NonNull;

/// A pointer to a `T` in a block of its own, which it owns, like
/// `Box<T>`: made with [`crate::WriteTx::new_box`], read through `Deref`,
/// changed through [`Mut::as_mut`] on its guard, freed (with everything
/// the `T` owns) when the value holding it is removed or dropped.
///
/// `Option<PBox<T>>` is `Persist` too, one word (0 is `None`), so a type
/// may point at itself: lists and trees.
///
/// ```
/// use rvm_collections::{Config, Error, PBox, PHeap, Persist};
///
/// #[derive(Persist)]
/// #[repr(C)]
/// struct Node {
///     value: u64,
///     next: Option<PBox<Node>>,
/// }
///
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut head = tx.root_or_insert_with("list", || None::<PBox<Node>>)?;
///     for value in [3, 2, 1] {
///         let rest = head.take()?;
///         let node = tx.new_box(Node { value, next: None })?;
///         head.replace(node)?;
///         head.as_mut().expect("just set").field_mut(|n| &n.next).replace_with(rest)?;
///     }
///     Ok::<_, Error>(())
/// })?;
/// let values = heap.read(|r| {
///     let mut out = Vec::new();
///     let head = r.root::<Option<PBox<Node>>>("list")?.unwrap();
///     let mut at = head.as_deref();
///     while let Some(n) = at {
///         out.push(n.value);
///         at = n.next.as_deref();
///     }
///     Ok::<_, Error>(out)
/// })?;
/// assert_eq!(values, [1, 2, 3]);
/// # Ok::<(), Error>(())
/// ```
#[repr(transparent)]
pub struct PBox<T> {
    ptr: NonZeroU64,
    _t: PhantomData<T>,
}

/// The boxed value (as `Box` prints).
impl<T: Persist + std::fmt::Debug> std::fmt::Debug for PBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl<T: Persist> PBox<T> {
    /// A box of the block at `ptr` (which holds a `T`).
    pub(crate) fn from_block(ptr: NonNull<u8>) -> Self {
        PBox { ptr: NonZeroU64::new(ptr.as_ptr() as usize as u64).expect("non-null"), _t: PhantomData }
    }

    fn addr(&self) -> usize {
        self.ptr.get() as usize
    }
}

impl<T: Persist> std::ops::Deref for PBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a box read from the heap was traced before any guard
        // handed it out (its root's check: a live block, aligned, of a
        // `T`'s size, holding a checked `T`), or was made by `new_box` in
        // the open transaction; only this layer's methods change or free
        // the block, through an exclusive guard, which excludes this
        // shared borrow.
        unsafe { crate::raw::view::<T>(NonNull::new_unchecked(self.addr() as *mut u8)) }
    }
}

// SAFETY: one word (`repr(transparent)` over a `NonZeroU64`), no padding;
// the target is a heap block (an address in the heap, which loads at a
// fixed base); the fingerprint mixes in the target's layout id; `describe`
// reports the pointer.
unsafe impl<T: Persist> Persist for PBox<T> {
    const FINGERPRINT: u64 = fingerprint_mix(Self::LAYOUT_ID, T::LAYOUT_ID);
    const LAYOUT_ID: u64 = fingerprint_mix(fingerprint_start(8, 8), 81);
    const OWNS_BLOCKS: bool = true;

    fn describe(shapes: &mut Shapes) -> ShapeId {
        shapes.define::<Self>(|s| Kind::Box { target: T::describe(s), nullable: false })
    }
}

// SAFETY: `Option<PBox<T>>` is one word, 0 for `None` (the guaranteed
// null-pointer optimisation of `Option` over a `repr(transparent)` wrapper
// of a `NonZero` integer); otherwise as `PBox<T>`.
unsafe impl<T: Persist> Persist for Option<PBox<T>> {
    const FINGERPRINT: u64 = fingerprint_mix(Self::LAYOUT_ID, T::LAYOUT_ID);
    const LAYOUT_ID: u64 = fingerprint_mix(fingerprint_start(8, 8), 82);
    const OWNS_BLOCKS: bool = true;

    fn describe(shapes: &mut Shapes) -> ShapeId {
        shapes.define::<Self>(|s| Kind::Box { target: T::describe(s), nullable: true })
    }
}

impl<'t, 'h, T: Persist> Mut<'t, 'h, PBox<T>> {
    /// The boxed value, to change (its bytes are declared).
    pub fn as_mut(&mut self) -> Result<Mut<'_, 'h, T>> {
        let at = self.addr_of_target();
        // SAFETY: the target block holds a valid `T` that this box owns,
        // reachable only through it (see `Deref`).
        unsafe { self.child::<T>(at) }
    }

    fn addr_of_target(&self) -> usize {
        let b: &PBox<T> = self;
        b.addr()
    }

    /// Replaces the boxed value with `value`; returns the old one.
    pub fn replace(&mut self, value: impl IntoPersist<T>) -> Result<Owned<'h, T>> {
        let tx = self.tx();
        let at = self.addr_of_target();
        let value = tx.accept(value)?;
        // SAFETY: the old value moves out (bitwise) before the slot is
        // overwritten below; it is adopted (its blocks owned by the
        // returned value).
        let old = unsafe { crate::raw::take::<T>(at, 0) };
        crate::tx::store_value(tx, at, value)?;
        tx.adopt(old)
    }
}

impl<'t, 'h, T: Persist> Mut<'t, 'h, Option<PBox<T>>> {
    /// The boxed value, to change, if there is a box.
    pub fn as_mut(&mut self) -> Option<Mut<'_, 'h, T>> {
        let at = self.as_ref().map(|b| b.addr())?;
        // SAFETY: as in `Mut<PBox<T>>::as_mut`.
        unsafe { self.child::<T>(at) }.ok()
    }

    /// Puts `b` in; returns the box that was there.
    pub fn replace(&mut self, b: impl IntoPersist<PBox<T>>) -> Result<Option<Owned<'h, PBox<T>>>> {
        self.replace_with(Some(b))
    }

    /// Puts `b` (a box or none) in; returns the box that was there.
    pub fn replace_with<B: IntoPersist<PBox<T>>>(&mut self, b: Option<B>) -> Result<Option<Owned<'h, PBox<T>>>> {
        let tx = self.tx();
        let new = match b {
            Some(b) => Some(tx.accept(b)?),
            None => None,
        };
        let old = std::mem::replace(self.value_mut(), new);
        match old {
            Some(old) => Ok(Some(tx.adopt(old)?)),
            None => Ok(None),
        }
    }

    /// Takes the box out, leaving none.
    pub fn take(&mut self) -> Result<Option<Owned<'h, PBox<T>>>> {
        self.replace_with(None::<PBox<T>>)
    }
}
