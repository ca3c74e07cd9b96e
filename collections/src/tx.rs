//! Closure transactions: [`WriteTx`] and [`ReadTx`], and typed root access.

use crate::error::{Error, Result};
use crate::owned::{Floating, IntoPersist, Owned};
use crate::persist::{bytes_of, Persist, Plain};
use crate::shape::{walk_roots, Outcome, Stored, Tracer, TypeShape, SHAPES_ROOT};
use rvm_core::CommitMode;
use rvm_heap::{Heap, HeapTx};
use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

/// The roots (block address, fingerprint) of one [`crate::PHeap`] whose
/// value passed the root check ([`crate::shape`]), in this transaction or an earlier one
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
    /// Fingerprints of the types whose shapes the heap's shape table holds
    /// (committed); `None` until the table is first read.
    shapes: parking_lot::Mutex<Option<HashSet<u64>>>,
    /// What the walk over every root found, by root block address: made
    /// at the first check after the heap opened (see [`Checked::sound`]);
    /// an entry leaves once its root is checked.
    walk: parking_lot::Mutex<Option<HashMap<usize, Outcome>>>,
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
        // What the walk found for it then no longer tells anything.
        if let Some(w) = self.walk.lock().as_mut() {
            w.remove(&id.0);
        }
    }

    /// Stops caching: every later borrow checks its root again.
    pub(crate) fn disable(&self) {
        self.off.store(true, AtomicOrdering::SeqCst);
        self.set.lock().clear();
        *self.shapes.lock() = None;
        *self.walk.lock() = None;
    }

    /// Whether the root at `addr`, whose type has the shape `shape`, is
    /// sound: its value traces by that shape (every pointer a live block
    /// of the right size, owned once, no root's block among them), and it
    /// shares no block with another root.
    ///
    /// Each root's trace alone cannot see two roots that own one block
    /// (their pointers damaged to one buffer): using one would then free
    /// or overwrite what the other reads. So the first check after the
    /// heap opens walks every root ([`walk_roots`]): this one by its
    /// type's shape, the others by the shapes stored in the heap; the
    /// others' results are kept. A later root is sound if that walk found
    /// it owning the blocks its own type's trace finds, alone. The walk
    /// stays true for roots not yet checked: until its check, no typed
    /// method changes a root's value, and the blocks it owns are live and
    /// owned by no other sound root, so no other root frees or reallocates
    /// them. A root the walk could not follow (no stored shape, or a
    /// shape that disagrees with its type's) is judged by a new walk of
    /// the heap as it is now; so is every root while the cache is off.
    fn sound(&self, heap: &Heap, addr: usize, shape: &TypeShape) -> bool {
        let given = Some((addr, &shape.shapes, shape.root));
        let fresh_walk = || {
            let stored = crate::shape::load_stored(heap).ok().flatten();
            // With the cache on, a root not yet checked must reach only
            // committed blocks (a block the open transaction just made may
            // still be stored elsewhere or freed, and the result is kept);
            // with it off, nothing is kept and every root counts the open
            // transaction's blocks (the raw API's changes are the caller's
            // duty).
            let off = self.off.load(AtomicOrdering::SeqCst);
            let trusted = |addr: usize, tag: u64| off || self.contains((addr, tag));
            walk_roots(heap, stored.as_ref(), given, &trusted)
                .into_iter()
                .map(|(r, o)| (r.ptr.as_ptr() as usize, o))
                .collect::<HashMap<usize, Outcome>>()
        };
        let owns = |walk: &HashMap<usize, Outcome>| matches!(walk.get(&addr), Some(Outcome::Owns(_)));
        if self.off.load(AtomicOrdering::SeqCst) {
            return owns(&fresh_walk());
        }
        let mut cached = self.walk.lock();
        let Some(walk) = cached.as_mut() else {
            // The first check since the heap opened: this root by its
            // type's shape, the others kept for their own checks.
            let mut walk = fresh_walk();
            let ok = owns(&walk);
            walk.remove(&addr);
            *cached = Some(walk);
            return ok;
        };
        match walk.get(&addr) {
            Some(Outcome::Damaged(_)) => return false,
            Some(Outcome::Owns(blocks)) => {
                let mut t = Tracer::new(heap).committed_only();
                t.exclude(heap.roots().iter().map(|r| r.ptr.as_ptr() as usize));
                if t.trace(&shape.shapes, shape.root, addr).is_err() {
                    return false;
                }
                let mut mine = t.blocks;
                mine.sort_unstable();
                if mine == *blocks {
                    walk.remove(&addr);
                    return true;
                }
            }
            _ => {}
        }
        drop(cached);
        owns(&fresh_walk())
    }

    /// Records roots made by a committed transaction as checked: the typed
    /// layer made their values, from values it owned alone.
    fn created(&self, roots: impl IntoIterator<Item = (usize, u64)>) {
        for id in roots {
            self.insert(id);
            if let Some(w) = self.walk.lock().as_mut() {
                w.remove(&id.0);
            }
        }
    }

    /// Whether the shape table holds `fingerprint` (`None`: not read yet).
    fn shape_known(&self, fingerprint: u64) -> Option<bool> {
        if self.off.load(AtomicOrdering::SeqCst) {
            return None;
        }
        self.shapes.lock().as_ref().map(|s| s.contains(&fingerprint))
    }

    /// Records the committed table's fingerprints.
    fn shapes_committed(&self, fingerprints: impl IntoIterator<Item = u64>) {
        if !self.off.load(AtomicOrdering::SeqCst) {
            self.shapes.lock().get_or_insert_with(HashSet::new).extend(fingerprints);
        }
    }
}

/// Finds root `name` of heap `heap` and checks that it holds a `T`: the
/// recorded size and fingerprint are `T`'s, and it points at a live,
/// aligned block large enough; its value passes the root check ([`crate::shape`]) unless
/// `checked` says it did already.
fn typed_root<T: Persist>(heap: &Heap, name: &str, checked: &Checked) -> Result<Option<NonNull<u8>>> {
    reserved(name)?;
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
    let addr = root.ptr.as_ptr() as usize;
    let id = (addr, T::FINGERPRINT);
    if checked.contains(id) {
        return Ok(Some(root.ptr));
    }
    // A live, aligned block of a `T`'s size recorded as a `T`; callers
    // hold the heap's reader or writer lock, so nothing changes it while
    // the tracer reads it. Its value may point at no root's block, and
    // may share no block with another root.
    if !checked.sound(heap, addr, &crate::shape::shape_of::<T>()) {
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

    /// The heap blocks `value` (a value read from this heap) owns,
    /// transitively: a collection's buffer or nodes, a box's block, and
    /// what their elements own. Their addresses, in no particular order.
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PHeap, PString, PVec};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut v = tx.root_or_insert_with("v", PVec::<PString>::new)?;
    ///     v.push(tx.new_string("one")?)?;
    ///     v.push(tx.new_string("two")?)?;
    ///     Ok::<_, Error>(())
    /// })?;
    /// let n = heap.read(|r| r.owned_blocks(&*r.root::<PVec<PString>>("v")?.unwrap()).map(|b| b.len()))?;
    /// assert_eq!(n, 3); // the buffer and two strings
    /// # Ok::<(), Error>(())
    /// ```
    pub fn owned_blocks<T: Persist>(&self, value: &T) -> Result<Vec<usize>> {
        crate::shape::trace_value::<T>(self.heap, value as *const T as usize)
            .map_err(|_| Error::Damaged { name: std::any::type_name::<T>().into() })
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

/// Whether `name` is one the typed layer keeps for itself (`rvm:...`).
fn reserved(name: &str) -> Result<()> {
    if name.starts_with("rvm:") {
        return Err(Error::ReservedName { name: name.into() });
    }
    Ok(())
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
    /// The [`Owned`] values of the transaction: floating (freed at commit
    /// unless stored) and dropped (freed at commit).
    floating: Rc<Floating<'h>>,
    /// The shape table as this transaction changed it, and the
    /// fingerprints it added (see [`crate::shape`]).
    shapes: RefCell<Option<(Stored, Vec<u64>)>>,
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
            floating: Rc::new(Floating::new(heap)),
            shapes: RefCell::new(None),
        }
    }

    pub(crate) fn commit(self, mode: CommitMode) -> Result<()> {
        // Blocks of values dropped, and of values never stored nor dropped:
        // no one reaches them after the commit.
        let gone = self.floating.take_garbage()?;
        self.free_blocks(&gone)?;
        let added = self.shapes.borrow_mut().take().map(|(_, added)| added);
        let htx = self.htx.borrow_mut().take();
        if let Some(htx) = htx {
            htx.commit(mode)?;
        }
        if let Some(added) = added {
            self.checked.shapes_committed(added);
        }
        let made = self.created.borrow();
        self.checked
            .created(made.iter().filter(|(n, _)| n.as_str() != SHAPES_ROOT).map(|(_, c)| (c.0.as_ptr() as usize, c.2)));
        Ok(())
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

    /// Frees `blocks` (at commit, as every free).
    pub(crate) fn free_blocks(&self, blocks: &[usize]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.with_htx(|htx| {
            for &b in blocks {
                if let Some(p) = NonNull::new(b as *mut u8) {
                    htx.free(p)?;
                }
            }
            Ok(())
        })
    }

    /// Frees every block the `T` at `addr` owns (a value leaving the heap
    /// for good: removed, truncated away, overwritten).
    pub(crate) fn drop_value<T: Persist>(&self, addr: usize) -> Result<()> {
        if !T::OWNS_BLOCKS {
            return Ok(());
        }
        let blocks = crate::shape::trace_value::<T>(self.heap, addr)
            .map_err(|_| Error::Damaged { name: std::any::type_name::<T>().into() })?;
        self.free_blocks(&blocks)
    }

    /// Wraps `value`, which owns blocks of this transaction's heap (just
    /// allocated, or just moved out of the heap), as an [`Owned`] value.
    pub(crate) fn adopt<T: Persist>(&self, value: T) -> Result<Owned<'h, T>> {
        Ok(Owned::new(self.floating.clone(), value))
    }

    /// Takes the value out of `value` (a bare value or an [`Owned`] of
    /// this transaction) to store it in the heap: its blocks are no longer
    /// floating once the caller has written it.
    pub(crate) fn accept<T: Persist>(&self, value: impl IntoPersist<T>) -> Result<T> {
        value.into_value(&self.floating)
    }

    /// A new [`crate::PBox`] holding `value`, in this transaction's heap.
    /// Store it (in a collection, a field, a root) before the commit, or
    /// it is freed.
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PBox, PHeap, PVec};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut boxes = tx.root_or_insert_with("boxes", PVec::<PBox<u64>>::new)?;
    ///     let b = tx.new_box(7u64)?;
    ///     assert_eq!(**b, 7);
    ///     boxes.push(b)?;
    ///     Ok::<_, Error>(())
    /// })?;
    /// let first = heap.read(|r| r.root::<PVec<PBox<u64>>>("boxes").map(|v| v.map(|v| *v[0])))?;
    /// assert_eq!(first, Some(7));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn new_box<T: Persist>(&self, value: impl IntoPersist<T>) -> Result<Owned<'h, crate::PBox<T>>> {
        let value = self.accept(value)?;
        let ptr = self.place(value, |_, _| Ok(()))?;
        self.adopt(crate::PBox::from_block(ptr))
    }

    /// A new [`crate::PString`] holding `s`, in this transaction's heap.
    /// Store it before the commit, or it is freed.
    pub fn new_string(&self, s: &str) -> Result<Owned<'h, crate::PString>> {
        let ptr = if s.is_empty() {
            0
        } else {
            self.with_htx(|htx| {
                let ptr = htx.malloc(
                    Layout::array::<u8>(s.len())
                        .map_err(|_| rvm_heap::HeapError::BadLayout { size: s.len(), align: 1 })?,
                )?;
                // SAFETY: a block this transaction just allocated.
                unsafe { htx.write(ptr, s.as_bytes())? };
                Ok(ptr.as_ptr() as usize)
            })?
        };
        self.adopt(crate::PString::from_raw_parts(ptr, s.len()))
    }

    /// Moves `value` into a block of its own, allocated here, and runs
    /// `then` on the block in the same heap call; on failure the value's
    /// blocks float again (freed at commit, unless the transaction aborts).
    fn place<T: Persist>(
        &self,
        value: T,
        then: impl FnOnce(&mut HeapTx<'h>, NonNull<u8>) -> Result<()>,
    ) -> Result<NonNull<u8>> {
        let placed = self.with_htx(|htx| {
            let ptr = htx.malloc(Layout::new::<T>())?;
            if std::mem::size_of::<T>() > 0 {
                // SAFETY: a block this transaction just allocated: nothing
                // else references or writes it.
                unsafe { htx.write(ptr, bytes_of(&value))? };
            }
            then(htx, ptr)?;
            Ok(ptr)
        });
        match placed {
            Ok(ptr) => {
                // Moved into the heap.
                std::mem::forget(value);
                Ok(ptr)
            }
            Err(e) => {
                self.float(&value);
                Err(e)
            }
        }
    }

    /// Puts the blocks of `value` back among the floating ones (a value
    /// taken for storing whose store failed).
    pub(crate) fn float<T: Persist>(&self, value: &T) {
        self.floating.register(value);
    }

    /// Adds `T`'s shape to the heap's shape table if it is not there yet
    /// (the first root of each type does it).
    fn record_shape<T: Persist>(&self) -> Result<()> {
        if self.checked.shape_known(T::FINGERPRINT) == Some(true) {
            return Ok(());
        }
        let mut slot = self.shapes.borrow_mut();
        if slot.is_none() {
            // A damaged table is replaced by a new one: it only serves
            // checks, and must not stop the program from making roots.
            let stored = crate::shape::load_stored(self.heap).ok().flatten().unwrap_or_default();
            self.checked.shapes_committed(stored.roots.keys().copied());
            *slot = Some((stored, Vec::new()));
        }
        let (stored, added) = slot.as_mut().expect("filled above");
        if !stored.add::<T>() {
            return Ok(());
        }
        added.push(T::FINGERPRINT);
        let bytes = stored.encode();
        let old = self.heap.root(SHAPES_ROOT).map(|r| r.ptr);
        let created = self.created.borrow().get(SHAPES_ROOT).map(|c| c.0);
        self.with_htx(|htx| {
            let ptr = htx.malloc(
                Layout::from_size_align(bytes.len(), 8)
                    .map_err(|_| rvm_heap::HeapError::BadLayout { size: bytes.len(), align: 8 })?,
            )?;
            // SAFETY: a block this transaction just allocated.
            unsafe { htx.write(ptr, &bytes)? };
            htx.set_root(SHAPES_ROOT, Some((ptr, bytes.len() as u64, SHAPES_TAG)))?;
            if let Some(p) = created.or(old) {
                htx.free(p)?;
            }
            self.created.borrow_mut().insert(SHAPES_ROOT.into(), (ptr, bytes.len() as u64, SHAPES_TAG));
            Ok(())
        })
    }

    /// Finds root `name` as a `T` (made in this transaction or before).
    fn find<T: Persist>(&self, name: &str) -> Result<Option<NonNull<u8>>> {
        reserved(name)?;
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
    pub fn root_mut<T: Persist>(&self, name: &str) -> Result<Option<Mut<'_, 'h, T>>> {
        let Some(ptr) = self.find::<T>(name)? else { return Ok(None) };
        self.borrow(name, ptr, true)?;
        // SAFETY: the block is a live root block of a `T`'s size (checked by
        // `find`); no reference to it exists (the borrow table gave the
        // exclusive borrow); the writer lock keeps other threads away.
        let declared = self.with_htx(|htx| unsafe { Ok(htx.set_range(ptr, std::mem::size_of::<T>())?) });
        if let Err(e) = declared.and_then(|()| self.record_shape::<T>()) {
            self.release(ptr);
            return Err(e);
        }
        Ok(Some(Mut { tx: self, ptr, root: true, _t: std::marker::PhantomData }))
    }

    /// The root `name` as a `T`, to change, made with `init()` if it does
    /// not exist (in this transaction: it exists once it commits).
    ///
    /// # Errors
    ///
    /// - [`Error::RootType`] if the root holds another type,
    ///   [`Error::RootBorrowed`] if it is borrowed already in this
    ///   transaction;
    /// - `Error::Heap(`[`HeapError::BadRootName`](rvm_heap::HeapError::BadRootName)`)`
    ///   for a name that is empty, longer than 36 bytes or holds a NUL,
    ///   [`Error::ReservedName`] for one starting with `rvm:`;
    /// - `Error::Heap(`[`HeapError::RootsFull`](rvm_heap::HeapError::RootsFull)`)`
    ///   when every root slot is taken: a typed heap has 62, one of them
    ///   the library's own, so keep many values under one root (a
    ///   [`crate::PHashMap`] or [`crate::PBTreeMap`]) rather than one
    ///   root each;
    /// - an out-of-memory or log error of the allocation, as any change.
    pub fn root_or_insert_with<T: Persist, V: IntoPersist<T>>(
        &self,
        name: &str,
        init: impl FnOnce() -> V,
    ) -> Result<Mut<'_, 'h, T>> {
        if let Some(r) = self.root_mut::<T>(name)? {
            return Ok(r);
        }
        let value = self.accept(init())?;
        let size = std::mem::size_of::<T>();
        let ptr = self.place(value, |htx, ptr| Ok(htx.set_root(name, Some((ptr, size as u64, T::FINGERPRINT)))?))?;
        self.created.borrow_mut().insert(name.to_owned(), (ptr, size as u64, T::FINGERPRINT));
        self.record_shape::<T>()?;
        self.borrow(name, ptr, true)?;
        Ok(Mut { tx: self, ptr, root: true, _t: std::marker::PhantomData })
    }

    /// Removes root `name` (a `T`) and frees its block and every block its
    /// value owns, at commit. `false` if there is no such root.
    pub fn remove_root<T: Persist>(&self, name: &str) -> Result<bool> {
        let Some(ptr) = self.find::<T>(name)? else { return Ok(false) };
        if self.borrows.borrow().contains_key(&(ptr.as_ptr() as usize)) {
            return Err(Error::RootBorrowed { name: name.into() });
        }
        self.drop_value::<T>(ptr.as_ptr() as usize)?;
        self.with_htx(|htx| {
            htx.set_root(name, None)?;
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

/// Writes `value` at `addr` (declared here: a slot of a block the caller's
/// guard owns exclusively, or one this transaction allocated) and forgets
/// it: it lives in the heap now. On failure its blocks float again (freed
/// at commit unless the transaction aborts).
pub(crate) fn store_value<T: Persist>(tx: &WriteTx<'_>, addr: usize, value: T) -> Result<()> {
    if std::mem::size_of::<T>() == 0 {
        return Ok(());
    }
    let Some(p) = NonNull::new(addr as *mut u8) else {
        tx.float(&value);
        return Err(Error::Damaged { name: std::any::type_name::<T>().into() });
    };
    // SAFETY: per the contract above: the slot lies in a live block only
    // the caller's exclusive guard (or this transaction) reaches, the
    // writer lock keeps other threads away, and no reference into the slot
    // is alive.
    let written = tx.with_htx(|htx| unsafe { Ok(htx.write(p, bytes_of(&value))?) });
    match written {
        Ok(()) => {
            // Moved into the heap.
            std::mem::forget(value);
            Ok(())
        }
        Err(e) => {
            tx.float(&value);
            Err(e)
        }
    }
}

/// The type tag of the shape table's root.
const SHAPES_TAG: u64 = 0x7276_6d73_6861_7065; // "rvmshape"

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

/// A value in the heap borrowed to change in a [`WriteTx`]: a root
/// ([`WriteTx::root_mut`]), an element or value of a collection
/// (`get_mut`), a box's target, a field ([`Mut::field_mut`]).
/// Dereferences to the `T`, and mutably when `T` is [`Plain`]; a value that
/// owns blocks (a collection, a box) changes through the methods this
/// guard has for its type, so that no owner is ever overwritten,
/// duplicated or moved out of the heap. Stores through it are logged at
/// commit and undone at abort.
///
/// No `&mut` to a value that owns blocks (`mem::swap` or `mem::replace`
/// through it would duplicate or drop an owner, unlogged):
///
/// ```compile_fail
/// # use rvm_collections::{Error, PHeap, PVec};
/// # fn f(heap: &PHeap) {
/// heap.write(|tx| {
///     let mut v = tx.root_or_insert_with("v", PVec::<u64>::new)?;
///     let r: &mut PVec<u64> = &mut v;
///     Ok::<_, Error>(())
/// });
/// # }
/// ```
#[derive(Debug)]
#[repr(C)] // the same layout for every `T`: see `Mut::as_inner`
pub struct Mut<'t, 'h, T: Persist> {
    tx: &'t WriteTx<'h>,
    ptr: NonNull<u8>,
    /// Whether this guard holds a root's borrow (released on drop).
    root: bool,
    _t: std::marker::PhantomData<&'t mut T>,
}

/// The guard of a root borrowed to change: a [`Mut`].
pub type RootMut<'t, 'h, T> = Mut<'t, 'h, T>;

impl<T: Persist> Deref for Mut<'_, '_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: as in `deref_mut`; shared for the borrow of `self`.
        unsafe { crate::raw::view::<T>(self.ptr) }
    }
}

/// Only for [`Plain`] values: a value that owns heap blocks (a
/// [`crate::PVec`]) changes through its methods.
impl<T: Plain> DerefMut for Mut<'_, '_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: a live value of a `T` (checked when its root was
        // borrowed, kept so by this layer's methods), declared in the
        // transaction when the guard was made; the guard is exclusive
        // (the root's borrow table, or a `&mut` borrow of the parent
        // guard), so this is the only reference (for the borrow of `self`).
        unsafe { crate::raw::view_mut::<T>(self.ptr) }
    }
}

impl<'t, 'h, T: Persist> Mut<'t, 'h, T> {
    /// The transaction the guard belongs to (to make values to store:
    /// [`WriteTx::new_box`], [`WriteTx::new_string`]). Borrowing the
    /// guard's root again through it is refused while the guard lives.
    pub fn tx(&self) -> &'t WriteTx<'h> {
        self.tx
    }

    /// The value's address.
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// A guard of the `U` at `addr`, inside a block this guard's value
    /// owns, declared here.
    ///
    /// # Safety
    ///
    /// `addr` holds a valid `U` (aligned, in a live block) that the value
    /// of this guard owns, reachable only through it.
    pub(crate) unsafe fn child<U: Persist>(&mut self, addr: usize) -> Result<Mut<'_, 'h, U>> {
        let ptr = NonNull::new(addr as *mut u8).ok_or_else(|| Error::Damaged { name: "value".into() })?;
        if std::mem::size_of::<U>() > 0 {
            self.tx.declare(ptr, std::mem::size_of::<U>())?;
        }
        Ok(Mut { tx: self.tx, ptr, root: false, _t: std::marker::PhantomData })
    }

    /// A guard of a field of the value (or any part of it): `f` gets the
    /// value and returns a reference to the part, which must lie within
    /// the value's own bytes (a field, an array element; not what a box
    /// or collection points at, which their own methods reach).
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PHeap, PString, PVec, Persist};
    ///
    /// #[derive(Persist)]
    /// #[repr(C)]
    /// struct Team {
    ///     wins: u64,
    ///     name: PString,
    ///     scores: PVec<u32>,
    /// }
    ///
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut t = tx.root_or_insert_with("team", || Team { wins: 0, name: PString::new(), scores: PVec::new() })?;
    ///     *t.field_mut(|t| &t.wins) += 1;
    ///     t.field_mut(|t| &t.name).push_str("rovers")?;
    ///     t.field_mut(|t| &t.scores).extend([3, 1, 4])?;
    ///     Ok::<_, Error>(())
    /// })?;
    /// heap.read(|r| {
    ///     let t = r.root::<Team>("team")?.unwrap();
    ///     assert_eq!((t.wins, t.name.as_str(), t.scores.as_slice()), (1, "rovers", &[3, 1, 4][..]));
    ///     Ok::<_, Error>(())
    /// })?;
    /// # Ok::<(), Error>(())
    /// ```
    ///
    /// # Panics
    ///
    /// If the reference `f` returns lies outside the value's bytes (inside
    /// a write transaction the panic aborts it).
    pub fn field_mut<U: Persist>(&mut self, f: impl FnOnce(&T) -> &U) -> Mut<'_, 'h, U> {
        let base = self.addr();
        let part = f(self) as *const U as usize;
        let inside = part >= base
            && part.checked_add(std::mem::size_of::<U>()).is_some_and(|end| end <= base + std::mem::size_of::<T>());
        assert!(inside, "Mut::field_mut: the closure must return a part of the value itself");
        // The part lies in the value's bytes, which were declared when this
        // guard was made, and is a `U` (a reference to one, in a value
        // without interior mutability); the new guard borrows this one
        // mutably, so it is the only way to it.
        Mut {
            tx: self.tx,
            ptr: NonNull::new(part as *mut u8).expect("inside a live value"),
            root: false,
            _t: std::marker::PhantomData,
        }
    }

    /// This guard, seen as a guard of `U`, a type `T` wraps.
    ///
    /// # Safety
    ///
    /// `T` is `#[repr(transparent)]` over `U` (so a `T` value is a `U`
    /// value), and `U`'s invariants are all `T` needs besides its own,
    /// which the caller keeps.
    pub(crate) unsafe fn as_inner<U: Persist>(&mut self) -> &mut Mut<'t, 'h, U> {
        // SAFETY: `Mut` is `#[repr(C)]` with fields that do not depend on
        // the type parameter but through a zero-sized marker, so both
        // types have the same layout; the caller vouches that the bytes at
        // `ptr` are a valid `U`.
        unsafe { &mut *(self as *mut Self).cast::<Mut<'t, 'h, U>>() }
    }

    /// The value, to change through the collection's own methods (which
    /// declare what they store).
    pub(crate) fn value_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref_mut`: the only reference for the borrow of
        // `self`; the value's bytes were declared when the guard was made.
        unsafe { crate::raw::view_mut::<T>(self.ptr) }
    }
}

impl<T: Persist> Drop for Mut<'_, '_, T> {
    fn drop(&mut self) {
        if self.root {
            self.tx.release(self.ptr);
        }
    }
}
