//! [`PVec`]: a growable array in the heap.

use crate::error::Result;
use crate::owned::{IntoPersist, Owned};
use crate::persist::{fingerprint_mix, fingerprint_start, Persist, Plain};
use crate::shape::{Kind, ShapeId, Shapes};
use crate::tx::Mut;
use std::alloc::Layout;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A growable array in the heap, like `Vec<T>`, of any [`Persist`]
/// elements: plain data, or values that own blocks themselves (strings,
/// boxes, other collections).
///
/// Read it through any guard (`&PVec<T>` gives `len`, `get`, `iter`,
/// indexing and every shared method of `[T]`, which it derefs to), change
/// it through its [`Mut`] guard in a write transaction (`push`, `insert`,
/// `get_mut`, `extend`, `retain`, `truncate`, `reserve`, `swap`,
/// `pop_owned`, `remove_owned`; and for [`Plain`] elements `pop`,
/// `remove`, `set`, `as_mut_slice`, which hand values out by value or by
/// `&mut`). Each change declares only the bytes it changes:
/// the three-word header and the elements it writes or moves; growing
/// copies the elements into a new block, in the same transaction, and
/// frees the old one at commit. Elements that leave the vector
/// (`truncate`, `clear`) are dropped: what they own is freed in the same
/// transaction.
///
/// ```
/// use rvm_collections::{Config, Error, PHeap, PVec};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut v = tx.root_or_insert_with("log", PVec::<u64>::new)?;
///     v.extend([1, 2, 3])?;
///     v.push(4)?;
///     assert_eq!(v.pop()?, Some(4));
///     v.insert(0, 0)?;
///     Ok::<_, Error>(())
/// })?;
/// let all = heap.read(|r| r.root::<PVec<u64>>("log").map(|v| v.map(|v| v.to_vec())))?;
/// assert_eq!(all, Some(vec![0, 1, 2, 3]));
/// # Ok::<(), Error>(())
/// ```
#[repr(C)]
pub struct PVec<T> {
    ptr: u64,
    len: u64,
    cap: u64,
    _t: PhantomData<T>,
}

/// The elements, as a list (as `Vec` prints).
impl<T: Persist + std::fmt::Debug> std::fmt::Debug for PVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Persist> PVec<T> {
    /// An empty vector (owns no block): the value to make a root with.
    ///
    /// Elements must have a size: a vector of a zero-sized type (an empty
    /// struct, `[u8; 0]`) does not compile (keep a count instead).
    ///
    /// ```compile_fail
    /// use rvm_collections::{PVec, Persist};
    /// #[derive(Persist)]
    /// #[repr(C)]
    /// struct Marker {}
    /// let _ = PVec::<Marker>::new();
    /// ```
    pub fn new() -> Self {
        const { assert!(std::mem::size_of::<T>() > 0, "PVec of a zero-sized type") };
        PVec { ptr: 0, len: 0, cap: 0, _t: PhantomData }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements it can hold before it grows.
    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `check` confirmed, before any guard handed this value
        // out, that `ptr` is a live block aligned for `T` with room for
        // `cap >= len` elements, and only this vector's methods change
        // it (through a `RootMut`, which excludes this shared borrow).
        unsafe { crate::raw::slice(self.ptr as usize, self.len as usize) }
    }

    /// The element at `index`.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.as_slice().get(index)
    }

    /// The first element.
    pub fn first(&self) -> Option<&T> {
        self.as_slice().first()
    }

    /// The last element.
    pub fn last(&self) -> Option<&T> {
        self.as_slice().last()
    }

    /// Iterates over the elements.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.as_slice().iter()
    }

    /// Copies the elements into a `Vec`.
    pub fn to_vec(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.as_slice().to_vec()
    }
}

impl<T: Persist> Default for PVec<T> {
    fn default() -> Self {
        PVec::new()
    }
}

/// A vector reads as a slice, as `Vec` does: `contains`, `binary_search`,
/// `windows`, `chunks`, ranges (`&v[1..3]`), `iter().rev()` and the rest
/// of `[T]`'s shared methods. Changes go through the [`Mut`] guard's
/// methods (and, for [`Plain`] elements, `as_mut_slice`).
///
/// ```
/// use rvm_collections::{Config, Error, PHeap, PVec};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| tx.root_or_insert_with("v", PVec::<u32>::new)?.extend([1, 3, 5, 7]))?;
/// heap.read(|r| {
///     let v = r.root::<PVec<u32>>("v")?.unwrap();
///     assert!(v.contains(&5));
///     assert_eq!(v.binary_search(&7), Ok(3));
///     assert_eq!(&v[1..3], &[3, 5]);
///     assert_eq!(v.iter().rev().next(), Some(&7));
///     assert_eq!(v.iter().sum::<u32>(), 16);
///     Ok::<_, Error>(())
/// })?;
/// # Ok::<(), Error>(())
/// ```
impl<T: Persist> std::ops::Deref for PVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<'a, T: Persist> IntoIterator for &'a PVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Compares the elements (as `Vec` does): two vectors of different roots
/// are equal when their elements are.
///
/// ```
/// use rvm_collections::{Config, Error, PHeap, PVec};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     tx.root_or_insert_with("a", PVec::<u32>::new)?.extend([1, 2, 3])?;
///     tx.root_or_insert_with("b", PVec::<u32>::new)?.extend([1, 2, 3])?;
///     Ok::<_, Error>(())
/// })?;
/// heap.read(|r| {
///     let (a, b) = (r.root::<PVec<u32>>("a")?.unwrap(), r.root::<PVec<u32>>("b")?.unwrap());
///     assert_eq!(a, b);
///     assert_eq!(*a, [1, 2, 3]);
///     assert_eq!(*a, vec![1, 2, 3]);
///     assert_eq!(*a, [1, 2, 3][..]);
///     Ok::<_, Error>(())
/// })?;
/// # Ok::<(), Error>(())
/// ```
impl<T: Persist + PartialEq<U>, U: Persist> PartialEq<PVec<U>> for PVec<T> {
    fn eq(&self, other: &PVec<U>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Persist + Eq> Eq for PVec<T> {}

impl<T: Persist + PartialEq<U>, U> PartialEq<[U]> for PVec<T> {
    fn eq(&self, other: &[U]) -> bool {
        self.as_slice() == other
    }
}

impl<T: Persist + PartialEq<U>, U, const N: usize> PartialEq<[U; N]> for PVec<T> {
    fn eq(&self, other: &[U; N]) -> bool {
        self.as_slice() == other
    }
}

impl<T: Persist + PartialEq<U>, U> PartialEq<Vec<U>> for PVec<T> {
    fn eq(&self, other: &Vec<U>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Persist + PartialEq<U>, U> PartialEq<&[U]> for PVec<T> {
    fn eq(&self, other: &&[U]) -> bool {
        self.as_slice() == *other
    }
}

impl<T: Persist> AsRef<[T]> for PVec<T> {
    fn as_ref(&self) -> &[T] {
        self.as_slice()
    }
}

/// Indexing by position or by range (`v[2]`, `&v[1..3]`), as `Vec`.
///
/// # Panics
///
/// If the index or range is out of bounds (as for slices).
impl<T: Persist, I: std::slice::SliceIndex<[T]>> std::ops::Index<I> for PVec<T> {
    type Output = I::Output;
    fn index(&self, index: I) -> &I::Output {
        &self.as_slice()[index]
    }
}

// SAFETY: three native-endian words, `#[repr(C)]`, no padding; the
// buffer is a heap block (an address in the heap, which loads at a fixed
// base) holding `len` elements; the fingerprint mixes in the element
// type's layout id; `describe` reports the buffer.
unsafe impl<T: Persist> Persist for PVec<T> {
    const FINGERPRINT: u64 = fingerprint_mix(fingerprint_mix(fingerprint_start(24, 8), T::LAYOUT_ID), 61);
    const LAYOUT_ID: u64 = fingerprint_mix(fingerprint_start(24, 8), 62);
    const OWNS_BLOCKS: bool = true;

    fn describe(shapes: &mut Shapes) -> ShapeId {
        shapes.define::<Self>(|s| Kind::Vec { elem: T::describe(s), utf8: false })
    }
}

impl<T: Persist> PVec<T> {
    /// A vector of `len` elements in the block at `ptr` (0 if `len` is 0)
    /// with exactly `len` slots.
    pub(crate) fn from_raw_parts(ptr: usize, len: usize) -> Self {
        PVec { ptr: ptr as u64, len: len as u64, cap: len as u64, _t: PhantomData }
    }
}

impl<'t, 'h, T: Persist> Mut<'t, 'h, PVec<T>> {
    fn header(&self) -> (usize, usize, usize) {
        let v: &PVec<T> = self;
        (v.ptr as usize, v.len as usize, v.cap as usize)
    }

    fn set_header(&mut self, ptr: usize, len: usize, cap: usize) {
        // The header was declared when the guard was made.
        let v = self.value_mut();
        (v.ptr, v.len, v.cap) = (ptr as u64, len as u64, cap as u64);
    }

    /// Declares elements `[from, to)` of the buffer at `ptr`.
    fn declare(&self, ptr: usize, from: usize, to: usize) -> Result<()> {
        let size = std::mem::size_of::<T>();
        match NonNull::new((ptr + from * size) as *mut u8) {
            Some(p) if to > from => self.tx().declare(p, (to - from) * size),
            _ => Ok(()),
        }
    }

    /// Address of slot `index` of the buffer.
    fn slot(&self, index: usize) -> usize {
        self.header().0 + index * std::mem::size_of::<T>()
    }

    /// Makes room for at least `min_cap` elements: a new block, the
    /// elements' bytes copied into it (they move: what they own moves with
    /// them), the old block freed at commit.
    fn grow_to(&mut self, min_cap: usize) -> Result<()> {
        let (ptr, len, cap) = self.header();
        if min_cap <= cap {
            return Ok(());
        }
        let new_cap = min_cap.max(cap.saturating_mul(2)).max(4);
        let layout = Layout::array::<T>(new_cap).map_err(|_| {
            crate::Error::Heap(rvm_heap::HeapError::BadLayout {
                size: new_cap.saturating_mul(std::mem::size_of::<T>()),
                align: std::mem::align_of::<T>(),
            })
        })?;
        // SAFETY: the first `len` slots of this vector's live buffer: the
        // bytes of valid values (every byte initialised, by `Persist`).
        let old_bytes = unsafe { crate::raw::slice::<u8>(ptr, len * std::mem::size_of::<T>()) };
        let new = self.tx().with_htx(|htx| {
            let new = htx.malloc(layout)?;
            if !old_bytes.is_empty() {
                // SAFETY: a block this transaction just allocated: nothing
                // else references or writes it.
                unsafe { htx.write(new, old_bytes)? };
            }
            if let Some(p) = NonNull::new(ptr as *mut u8) {
                htx.free(p)?;
            }
            Ok(new)
        })?;
        self.set_header(new.as_ptr() as usize, len, new_cap);
        Ok(())
    }

    /// Appends `value` (growing the buffer in this transaction if full).
    pub fn push(&mut self, value: impl IntoPersist<T>) -> Result<()> {
        let tx = self.tx();
        let value = tx.accept(value)?;
        let (_, len, cap) = self.header();
        if len == cap {
            if let Err(e) = self.grow_to(len + 1) {
                tx.float(&value);
                return Err(e);
            }
        }
        crate::tx::store_value(tx, self.slot(len), value)?;
        let (ptr, _, cap) = self.header();
        self.set_header(ptr, len + 1, cap);
        Ok(())
    }

    /// Inserts `value` at `index`, shifting the later elements up.
    ///
    /// # Panics
    ///
    /// If `index > len` (as `Vec::insert`; inside a write transaction the
    /// panic aborts it).
    pub fn insert(&mut self, index: usize, value: impl IntoPersist<T>) -> Result<()> {
        let (_, len, _) = self.header();
        assert!(index <= len, "insertion index (is {index}) should be <= len (is {len})");
        let tx = self.tx();
        let value = tx.accept(value)?;
        let room = (|| {
            let (_, len, cap) = self.header();
            if len == cap {
                self.grow_to(len + 1)?;
            }
            let (ptr, _, _) = self.header();
            self.declare(ptr, index, len + 1)
        })();
        if let Err(e) = room {
            tx.float(&value);
            return Err(e);
        }
        let (ptr, _, cap) = self.header();
        // SAFETY: `[index, len]` lies in the buffer (len < cap), declared
        // just above; no reference into it exists.
        unsafe { crate::raw::shift::<T>(ptr, index, index + 1, len - index) };
        crate::tx::store_value(tx, self.slot(index), value)?;
        self.set_header(ptr, len + 1, cap);
        Ok(())
    }

    /// The element at `index`, to change (its bytes are declared): `&mut`
    /// through the guard for [`Plain`] elements, the element's own methods
    /// otherwise.
    pub fn get_mut(&mut self, index: usize) -> Result<Option<Mut<'_, 'h, T>>> {
        let (_, len, _) = self.header();
        if index >= len {
            return Ok(None);
        }
        let at = self.slot(index);
        // SAFETY: slot `index < len` holds a valid element this vector
        // owns, reachable only through this guard (borrowed mutably).
        unsafe { self.child::<T>(at) }.map(Some)
    }

    /// The first element, to change.
    pub fn first_mut(&mut self) -> Result<Option<Mut<'_, 'h, T>>> {
        self.get_mut(0)
    }

    /// The last element, to change.
    pub fn last_mut(&mut self) -> Result<Option<Mut<'_, 'h, T>>> {
        let (_, len, _) = self.header();
        match len {
            0 => Ok(None),
            _ => self.get_mut(len - 1),
        }
    }

    /// Swaps elements `a` and `b`.
    ///
    /// # Panics
    ///
    /// If either is out of bounds.
    pub fn swap(&mut self, a: usize, b: usize) -> Result<()> {
        let (ptr, len, _) = self.header();
        assert!(a < len && b < len, "swap indices ({a}, {b}) should be < len (is {len})");
        if a == b {
            return Ok(());
        }
        self.declare(ptr, a, a + 1)?;
        self.declare(ptr, b, b + 1)?;
        let size = std::mem::size_of::<T>();
        // SAFETY: two distinct slots below `len` of the live buffer, both
        // declared just above; no reference into them is alive.
        unsafe { std::ptr::swap_nonoverlapping((ptr + a * size) as *mut T, (ptr + b * size) as *mut T, 1) };
        Ok(())
    }

    /// Removes and returns the last element, as an [`Owned`] value (store
    /// it elsewhere, or drop it and what it owns is freed).
    pub fn pop_owned(&mut self) -> Result<Option<Owned<'h, T>>> {
        let (ptr, len, cap) = self.header();
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: slot `len - 1` holds a valid value; it leaves the vector
        // (the length shrinks below it) and is never read again.
        let v = unsafe { crate::raw::take::<T>(ptr, len - 1) };
        self.set_header(ptr, len - 1, cap);
        self.tx().adopt(v).map(Some)
    }

    /// Removes the element at `index`, shifting the later ones down, and
    /// returns it as an [`Owned`] value.
    ///
    /// # Panics
    ///
    /// If `index >= len` (as `Vec::remove`).
    pub fn remove_owned(&mut self, index: usize) -> Result<Owned<'h, T>> {
        let v = self.take_at(index)?;
        self.tx().adopt(v)
    }

    /// Moves element `index` out (the later ones shift down).
    fn take_at(&mut self, index: usize) -> Result<T> {
        let (ptr, len, cap) = self.header();
        assert!(index < len, "removal index (is {index}) should be < len (is {len})");
        self.declare(ptr, index, len - 1)?;
        // SAFETY: slot `index` holds a valid value, moved out here; the
        // later slots move down over it (declared above); the last slot
        // leaves the vector.
        let v = unsafe {
            let v = crate::raw::take::<T>(ptr, index);
            crate::raw::shift::<T>(ptr, index + 1, index, len - index - 1);
            v
        };
        self.set_header(ptr, len - 1, cap);
        Ok(v)
    }

    /// Shortens it to `len` elements (nothing if it is shorter); the
    /// elements cut off are dropped (what they own is freed).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let (ptr, old, cap) = self.header();
        if len >= old {
            return Ok(());
        }
        if T::OWNS_BLOCKS {
            for i in len..old {
                self.tx().drop_value::<T>(self.slot(i))?;
            }
        }
        self.set_header(ptr, len, cap);
        Ok(())
    }

    /// Removes every element, dropping them (the buffer stays).
    pub fn clear(&mut self) -> Result<()> {
        self.truncate(0)
    }

    /// Keeps only the elements for which `keep` returns `true`, in their
    /// order (as `Vec::retain`); the others are dropped (what they own is
    /// freed in this transaction). `keep` sees every element once, by
    /// `&`, before anything changes; then the kept elements after the
    /// first removed one move down, and only that stretch is declared.
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PHeap, PString, PVec};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut v = tx.root_or_insert_with("v", PVec::<u64>::new)?;
    ///     v.extend(0..10)?;
    ///     v.retain(|x| x % 3 != 0)?;
    ///     assert_eq!(v.to_vec(), [1, 2, 4, 5, 7, 8]);
    ///     let mut names = tx.root_or_insert_with("names", PVec::<PString>::new)?;
    ///     for n in ["ada", "", "bob"] {
    ///         names.push(tx.new_string(n)?)?;
    ///     }
    ///     names.retain(|s| !s.is_empty())?; // the empty string is freed
    ///     assert_eq!(names.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["ada", "bob"]);
    ///     Ok::<_, Error>(())
    /// })?;
    /// assert!(heap.check()?.is_clean());
    /// # Ok::<(), Error>(())
    /// ```
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> Result<()> {
        let (ptr, len, cap) = self.header();
        let v: &PVec<T> = self;
        let kept: Vec<bool> = v.iter().map(&mut keep).collect();
        let Some(first) = kept.iter().position(|k| !k) else { return Ok(()) };
        let new_len = first + kept[first..].iter().filter(|k| **k).count();
        if T::OWNS_BLOCKS {
            for i in (first..len).filter(|&i| !kept[i]) {
                self.tx().drop_value::<T>(self.slot(i))?;
            }
        }
        self.declare(ptr, first, new_len)?;
        for (to, from) in (first..).zip((first + 1..len).filter(|&i| kept[i])) {
            // SAFETY: `from` and `to < from` are slots below `len` of the
            // live buffer; `[first, new_len)`, where every `to` lies, is
            // declared above; slot `from` holds a kept value that moves
            // down (what it owns moves with it), slot `to` a dropped one
            // or one already moved; no reference into the buffer is alive
            // (`kept` holds booleans).
            unsafe { crate::raw::shift::<T>(ptr, from, to, 1) };
        }
        self.set_header(ptr, new_len, cap);
        Ok(())
    }

    /// Makes room for at least `additional` more elements.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let (_, len, _) = self.header();
        self.grow_to(len.saturating_add(additional))
    }

    /// Appends every element of `items`.
    pub fn extend<V: IntoPersist<T>>(&mut self, items: impl IntoIterator<Item = V>) -> Result<()> {
        let items = items.into_iter();
        self.reserve(items.size_hint().0)?;
        for v in items {
            self.push(v)?;
        }
        Ok(())
    }
}

/// By value and by `&mut`, for elements that own nothing.
impl<T: Plain> Mut<'_, '_, PVec<T>> {
    /// Removes and returns the last element.
    pub fn pop(&mut self) -> Result<Option<T>> {
        Ok(self.pop_owned()?.map(Owned::into_inner))
    }

    /// Removes and returns the element at `index`, shifting the later ones
    /// down.
    ///
    /// # Panics
    ///
    /// If `index >= len` (as `Vec::remove`).
    pub fn remove(&mut self, index: usize) -> Result<T> {
        self.take_at(index)
    }

    /// Replaces the element at `index`, returning the old one.
    ///
    /// # Panics
    ///
    /// If `index >= len`.
    pub fn set(&mut self, index: usize, value: T) -> Result<T> {
        let (ptr, len, _) = self.header();
        assert!(index < len, "index (is {index}) should be < len (is {len})");
        // SAFETY: slot `index` holds a valid value; a `Plain` copy owns
        // nothing, and the slot is overwritten next.
        let old = unsafe { crate::raw::take::<T>(ptr, index) };
        crate::tx::store_value(self.tx(), self.slot(index), value)?;
        Ok(old)
    }

    /// All elements, to change in place (all of them are declared).
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        let (ptr, len, _) = self.header();
        self.declare(ptr, 0, len)?;
        // SAFETY: every slot below `len` holds a valid value, declared
        // above; the slice borrows this guard mutably, so it is the only
        // reference.
        Ok(unsafe { crate::raw::slice_mut::<T>(ptr, len) })
    }

    /// Appends copies of `items`, their bytes written in one go (one
    /// declared range, not one per element).
    pub(crate) fn extend_copied(&mut self, items: &[T]) -> Result<()>
    where
        T: Copy,
    {
        if items.is_empty() {
            return Ok(());
        }
        let (_, len, _) = self.header();
        let too_long = rvm_heap::HeapError::BadLayout { size: usize::MAX, align: std::mem::align_of::<T>() };
        let new_len = len.checked_add(items.len()).ok_or(crate::Error::Heap(too_long))?;
        self.grow_to(new_len)?;
        let (ptr, _, cap) = self.header();
        let at = NonNull::new(self.slot(len) as *mut u8)
            .ok_or_else(|| crate::Error::Damaged { name: std::any::type_name::<T>().into() })?;
        // SAFETY: slots `[len, new_len)` lie in this vector's buffer (just
        // grown to hold them), which only this guard reaches; no reference
        // into them exists. `Plain` copies own nothing.
        self.tx().with_htx(|htx| unsafe { Ok(htx.write(at, crate::persist::bytes_of_slice(items))?) })?;
        self.set_header(ptr, new_len, cap);
        Ok(())
    }

    /// Appends clones of `items`.
    pub fn extend_from_slice(&mut self, items: &[T]) -> Result<()>
    where
        T: Clone,
    {
        self.extend(items.iter().cloned())
    }
}
