//! Closure transactions: [`WriteTx`] and [`ReadTx`], and typed root access.

use crate::error::{Error, Result};
use crate::persist::{bytes_of, Persist, Plain};
use rvm_core::CommitMode;
use rvm_heap::{Heap, HeapTx};
use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

/// The roots (block address, fingerprint) of one [`crate::PHeap`] whose
/// value passed [`Persist::check`], in this transaction or an earlier one
/// of the same open heap: only the typed layer's own methods have changed
/// them since (an abort puts back the committed value, which is the one
/// that was checked), so the check (which may walk a whole structure) is
/// not repeated. Calling [`crate::PHeap::raw_heap`] turns the cache off
/// for good: the raw API can change a root's bytes between transactions,
/// and those bytes must then be checked again at every borrow.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    set: parking_lot::Mutex<HashSet<(usize, u64)>>,
    off: AtomicBool,
}

impl Checked {
    fn contains(&self, id: (usize, u64)) -> bool {
        !self.off.load(AtomicOrdering::SeqCst) && self.set.lock().contains(&id)
    }

    fn insert(&self, id: (usize, u64)) {
        if !self.off.load(AtomicOrdering::SeqCst) {
            self.set.lock().insert(id);
        }
    }

    fn remove(&self, id: (usize, u64)) {
        self.set.lock().remove(&id);
    }

    /// Stops caching: every later borrow checks its root again.
    pub(crate) fn disable(&self) {
        self.off.store(true, AtomicOrdering::SeqCst);
        self.set.lock().clear();
    }
}

/// Finds root `name` of heap `heap` and checks that it holds a `T`: the
/// recorded size and fingerprint are `T`'s, and it points at a live,
/// aligned block large enough; its value passes [`Persist::check`] unless
/// `checked` says it did already.
fn typed_root<T: Persist>(heap: &Heap, name: &str, checked: &Checked) -> Result<Option<NonNull<u8>>> {
    let Some(root) = heap.root(name) else { return Ok(None) };
    let size = std::mem::size_of::<T>() as u64;
    if root.size != size || root.type_tag != T::FINGERPRINT {
        return Err(Error::RootType {
            name: name.into(),
            expected_size: size,
            expected: T::FINGERPRINT,
            found_size: root.size,
            found: root.type_tag,
        });
    }
    let live = heap.live_block_len(root.ptr).is_some_and(|len| len >= size);
    if !live || !(root.ptr.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::RootNotLive { name: name.into(), size });
    }
    let id = (root.ptr.as_ptr() as usize, T::FINGERPRINT);
    if checked.contains(id) {
        return Ok(Some(root.ptr));
    }
    // SAFETY: a live, aligned block of a `T`'s size recorded as a `T`;
    // callers hold the heap's reader or writer lock, so nothing changes it
    // while `check` reads it.
    if !unsafe { crate::raw::view::<T>(root.ptr) }.check(heap) {
        return Err(Error::Damaged { name: name.into() });
    }
    checked.insert(id);
    Ok(Some(root.ptr))
}

/// Read access to the heap, inside [`crate::PHeap::read`].
#[derive(Debug)]
pub struct ReadTx<'h> {
    heap: &'h Heap,
    checked: &'h Checked,
}

impl<'h> ReadTx<'h> {
    pub(crate) fn new(heap: &'h Heap, checked: &'h Checked) -> Self {
        ReadTx { heap, checked }
    }

    /// The root `name` as a `T`, if it exists; [`Error::RootType`] if it
    /// holds another type.
    pub fn root<T: Persist>(&self, name: &str) -> Result<Option<&T>> {
        Ok(typed_root::<T>(self.heap, name, self.checked)?.map(|ptr| {
            // SAFETY: `typed_root` checked a live, aligned block of a
            // `T`'s size recorded as a `T`; the read lock keeps writers
            // out (no exclusive reference exists) and the heap mapped for
            // the borrow of `self`.
            unsafe { crate::raw::view::<T>(ptr) }
        }))
    }
}

/// A root made in the open transaction: address, size, fingerprint.
type Created = (NonNull<u8>, u64, u64);

/// How a root is borrowed in a write transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Borrow {
    Shared(usize),
    Exclusive,
}

/// A write transaction, inside [`crate::PHeap::write`]: typed roots,
/// created or borrowed, shared or exclusive (checked like a `RefCell`:
/// a root is borrowed mutably once at a time).
#[derive(Debug)]
pub struct WriteTx<'h> {
    heap: &'h Heap,
    htx: RefCell<Option<HeapTx<'h>>>,
    /// Roots borrowed now, by address.
    borrows: RefCell<HashMap<usize, Borrow>>,
    /// Roots made in this transaction (not visible in the heap before its
    /// commit), by name.
    created: RefCell<HashMap<String, Created>>,
    /// Roots removed in this transaction (still in the heap until its
    /// commit): they are gone for this transaction.
    removed: RefCell<HashSet<String>>,
    /// Roots whose value passed its check (see [`Checked`]).
    checked: &'h Checked,
}

impl<'h> WriteTx<'h> {
    pub(crate) fn new(heap: &'h Heap, htx: HeapTx<'h>, checked: &'h Checked) -> Self {
        WriteTx {
            heap,
            htx: RefCell::new(Some(htx)),
            borrows: RefCell::new(HashMap::new()),
            created: RefCell::new(HashMap::new()),
            removed: RefCell::new(HashSet::new()),
            checked,
        }
    }

    pub(crate) fn commit(self, mode: CommitMode) -> Result<()> {
        let htx = self.htx.borrow_mut().take();
        match htx {
            Some(htx) => Ok(htx.commit(mode)?),
            None => Ok(()),
        }
    }

    /// Declares `[ptr, ptr + len)` (inside a block this transaction may
    /// change) for the stores the caller makes next.
    pub(crate) fn declare(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        // SAFETY: callers pass ranges of heap blocks reachable only through
        // a guard they hold exclusively (or blocks this transaction made);
        // the writer lock keeps other threads out, and callers hold no
        // reference into the range while it is declared.
        self.with_htx(|htx| unsafe { Ok(htx.set_range(ptr, len)?) })
    }

    pub(crate) fn with_htx<R>(&self, f: impl FnOnce(&mut HeapTx<'h>) -> Result<R>) -> Result<R> {
        let mut htx = self.htx.borrow_mut();
        // Present until `commit` consumes the transaction.
        let htx = htx.as_mut().ok_or_else(|| Error::Config("transaction already ended".into()))?;
        f(htx)
    }

    /// Finds root `name` as a `T` (made in this transaction or before).
    fn find<T: Persist>(&self, name: &str) -> Result<Option<NonNull<u8>>> {
        if let Some(&(ptr, size, fp)) = self.created.borrow().get(name) {
            if size != std::mem::size_of::<T>() as u64 || fp != T::FINGERPRINT {
                return Err(Error::RootType {
                    name: name.into(),
                    expected_size: std::mem::size_of::<T>() as u64,
                    expected: T::FINGERPRINT,
                    found_size: size,
                    found: fp,
                });
            }
            return Ok(Some(ptr));
        }
        if self.removed.borrow().contains(name) {
            return Ok(None);
        }
        typed_root::<T>(self.heap, name, self.checked)
    }

    fn borrow(&self, name: &str, ptr: NonNull<u8>, exclusive: bool) -> Result<()> {
        let mut b = self.borrows.borrow_mut();
        let key = ptr.as_ptr() as usize;
        let next = match (b.get(&key).copied(), exclusive) {
            (None, true) => Borrow::Exclusive,
            (None, false) => Borrow::Shared(1),
            (Some(Borrow::Shared(n)), false) => Borrow::Shared(n + 1),
            _ => return Err(Error::RootBorrowed { name: name.into() }),
        };
        b.insert(key, next);
        Ok(())
    }

    fn release(&self, ptr: NonNull<u8>) {
        let mut b = self.borrows.borrow_mut();
        let key = ptr.as_ptr() as usize;
        match b.get(&key).copied() {
            Some(Borrow::Shared(n)) if n > 1 => {
                b.insert(key, Borrow::Shared(n - 1));
            }
            _ => {
                b.remove(&key);
            }
        }
    }

    /// The root `name` as a `T`, shared, if it exists; [`Error::RootType`]
    /// if it holds another type, [`Error::RootBorrowed`] if it is borrowed
    /// mutably.
    pub fn root<T: Persist>(&self, name: &str) -> Result<Option<RootRef<'_, 'h, T>>> {
        let Some(ptr) = self.find::<T>(name)? else { return Ok(None) };
        self.borrow(name, ptr, false)?;
        Ok(Some(RootRef { tx: self, ptr, _t: std::marker::PhantomData }))
    }

    /// The root `name` as a `T`, to change, if it exists. Its bytes are
    /// declared in the transaction (restore mode: an abort puts them back),
    /// so every store through the guard is logged at commit.
    pub fn root_mut<T: Persist>(&self, name: &str) -> Result<Option<RootMut<'_, 'h, T>>> {
        let Some(ptr) = self.find::<T>(name)? else { return Ok(None) };
        self.borrow(name, ptr, true)?;
        // SAFETY: the block is a live root block of a `T`'s size (checked by
        // `find`); no reference to it exists (the borrow table gave the
        // exclusive borrow); the writer lock keeps other threads away.
        let declared = self.with_htx(|htx| unsafe { Ok(htx.set_range(ptr, std::mem::size_of::<T>())?) });
        if let Err(e) = declared {
            self.release(ptr);
            return Err(e);
        }
        Ok(Some(RootMut { tx: self, ptr, _t: std::marker::PhantomData }))
    }

    /// The root `name` as a `T`, to change, made with `init()` if it does
    /// not exist (in this transaction: it exists once it commits).
    pub fn root_or_insert_with<T: Persist>(&self, name: &str, init: impl FnOnce() -> T) -> Result<RootMut<'_, 'h, T>> {
        if let Some(r) = self.root_mut::<T>(name)? {
            return Ok(r);
        }
        let value = init();
        let size = std::mem::size_of::<T>();
        let ptr = self.with_htx(|htx| {
            let ptr = htx.malloc(Layout::new::<T>())?;
            // SAFETY: a block this transaction just allocated: nothing else
            // references or writes it.
            unsafe { htx.write(ptr, bytes_of(&value))? };
            htx.set_root(name, Some((ptr, size as u64, T::FINGERPRINT)))?;
            Ok(ptr)
        })?;
        self.created.borrow_mut().insert(name.to_owned(), (ptr, size as u64, T::FINGERPRINT));
        self.borrow(name, ptr, true)?;
        Ok(RootMut { tx: self, ptr, _t: std::marker::PhantomData })
    }

    /// Removes root `name` (a `T`) and frees its block, at commit. `false`
    /// if there is no such root.
    pub fn remove_root<T: Persist>(&self, name: &str) -> Result<bool> {
        let Some(ptr) = self.find::<T>(name)? else { return Ok(false) };
        if self.borrows.borrow().contains_key(&(ptr.as_ptr() as usize)) {
            return Err(Error::RootBorrowed { name: name.into() });
        }
        let mut owned = Vec::new();
        // SAFETY: a live root block of a checked `T` (by `find`), not
        // borrowed (checked above); the writer lock holds other threads off.
        unsafe { crate::raw::view::<T>(ptr) }.visit_blocks(&mut |b| owned.push(b.addr));
        self.with_htx(|htx| {
            htx.set_root(name, None)?;
            for addr in owned {
                if let Some(p) = NonNull::new(addr as *mut u8) {
                    htx.free(p)?;
                }
            }
            htx.free(ptr)?;
            Ok(())
        })?;
        self.created.borrow_mut().remove(name);
        self.removed.borrow_mut().insert(name.to_owned());
        // Freed at commit: a later root at the same address is checked anew.
        self.checked.remove((ptr.as_ptr() as usize, T::FINGERPRINT));
        Ok(true)
    }
}

/// A root borrowed shared in a [`WriteTx`]; dereferences to the `T`.
#[derive(Debug)]
pub struct RootRef<'t, 'h, T: Persist> {
    tx: &'t WriteTx<'h>,
    ptr: NonNull<u8>,
    _t: std::marker::PhantomData<&'t T>,
}

impl<T: Persist> Deref for RootRef<'_, '_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a live root block of a `T` (checked when borrowed); the
        // borrow table holds it shared while this guard lives, so no
        // exclusive reference exists.
        unsafe { crate::raw::view::<T>(self.ptr) }
    }
}

impl<T: Persist> Drop for RootRef<'_, '_, T> {
    fn drop(&mut self) {
        self.tx.release(self.ptr);
    }
}

/// A root borrowed to change in a [`WriteTx`]; dereferences (mutably) to
/// the `T`. Stores through it are logged at commit and undone at abort.
#[derive(Debug)]
#[repr(C)] // the same layout for every `T`: see `RootMut::as_inner`
pub struct RootMut<'t, 'h, T: Persist> {
    tx: &'t WriteTx<'h>,
    ptr: NonNull<u8>,
    _t: std::marker::PhantomData<&'t mut T>,
}

impl<T: Persist> Deref for RootMut<'_, '_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: as in `deref_mut`; shared for the borrow of `self`.
        unsafe { crate::raw::view::<T>(self.ptr) }
    }
}

/// Only for [`Plain`] values: a value that owns heap blocks (a [`crate::PVec`])
/// changes through its methods, so that no owner is ever overwritten,
/// duplicated or moved out of the heap.
impl<T: Plain> DerefMut for RootMut<'_, '_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: a live root block of a `T` (checked when borrowed),
        // declared in the transaction; the borrow table holds it exclusive
        // while this guard lives, so this is the only reference (for the
        // borrow of `self`).
        unsafe { crate::raw::view_mut::<T>(self.ptr) }
    }
}

impl<'t, 'h, T: Persist> RootMut<'t, 'h, T> {
    /// The transaction the guard belongs to.
    pub(crate) fn tx(&self) -> &'t WriteTx<'h> {
        self.tx
    }

    /// This guard, seen as a guard of `U`, a type `T` wraps.
    ///
    /// # Safety
    ///
    /// `T` is `#[repr(transparent)]` over `U` (so a `T` value is a `U`
    /// value), and `U`'s invariants are all `T` needs besides its own,
    /// which the caller keeps.
    pub(crate) unsafe fn as_inner<U: Persist>(&mut self) -> &mut RootMut<'t, 'h, U> {
        // SAFETY: `RootMut` is `#[repr(C)]` with fields that do not depend
        // on the type parameter but through a zero-sized marker, so both
        // types have the same layout; the caller vouches that the bytes at
        // `ptr` are a valid `U`.
        unsafe { &mut *(self as *mut Self).cast::<RootMut<'t, 'h, U>>() }
    }

    /// The value, to change through the collection's own methods (which
    /// declare what they store).
    pub(crate) fn value_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref_mut`: the only reference for the borrow of
        // `self`; the value's bytes were declared when it was borrowed.
        unsafe { crate::raw::view_mut::<T>(self.ptr) }
    }
}

impl<T: Persist> Drop for RootMut<'_, '_, T> {
    fn drop(&mut self) {
        self.tx.release(self.ptr);
    }
}
