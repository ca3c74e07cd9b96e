//! [`PVec`]: a growable array in the heap.

use crate::error::Result;
use crate::persist::{fingerprint_mix, fingerprint_start, Block, Persist, Plain};
use crate::tx::RootMut;
use std::alloc::Layout;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A growable array of [`Plain`] values in the heap, like `Vec<T>`.
///
/// Kept under a root: read it through any guard (`&PVec<T>` gives `len`,
/// `get`, `iter`, slices), change it through the [`RootMut`] guard of a
/// write transaction (`push`, `pop`, `insert`, `remove`, `get_mut`,
/// `extend`, `truncate`, `reserve`, ...). Each change declares only the
/// bytes it changes: the three-word header and the elements it writes or
/// moves; growing copies the elements into a new block, in the same
/// transaction, and frees the old one at commit.
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

impl<T> std::fmt::Debug for PVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PVec").field("len", &self.len).field("cap", &self.cap).finish_non_exhaustive()
    }
}

impl<T: Plain> PVec<T> {
    /// An empty vector (owns no block): the value to make a root with.
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

impl<T: Plain> Default for PVec<T> {
    fn default() -> Self {
        PVec::new()
    }
}

impl<'a, T: Plain> IntoIterator for &'a PVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

// SAFETY: three little-endian words, `#[repr(C)]`, no padding; the buffer
// is a heap block (an address in the heap, which loads at a fixed base);
// the fingerprint mixes in the element type's.
unsafe impl<T: Plain> Persist for PVec<T> {
    const FINGERPRINT: u64 = fingerprint_mix(fingerprint_mix(fingerprint_start(24, 8), T::FINGERPRINT), 61);

    fn visit_blocks(&self, visit: &mut dyn FnMut(Block)) {
        if self.cap > 0 {
            visit(Block { addr: self.ptr as usize });
        }
    }

    fn check(&self, heap: &rvm_heap::Heap) -> bool {
        let size = std::mem::size_of::<T>() as u64;
        if self.len > self.cap {
            return false;
        }
        if self.cap == 0 {
            return self.ptr == 0;
        }
        let Some(bytes) = self.cap.checked_mul(size) else { return false };
        let Some(ptr) = NonNull::new(self.ptr as usize as *mut u8) else { return false };
        self.ptr.is_multiple_of(std::mem::align_of::<T>() as u64)
            && heap.live_block_len(ptr).is_some_and(|len| len >= bytes)
    }
}

impl<T: Plain> RootMut<'_, '_, PVec<T>> {
    fn header(&self) -> (usize, usize, usize) {
        let v: &PVec<T> = self;
        (v.ptr as usize, v.len as usize, v.cap as usize)
    }

    fn set_header(&mut self, ptr: usize, len: usize, cap: usize) {
        // The header was declared when the root was borrowed.
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

    /// Makes room for at least `min_cap` elements: a new block, the
    /// elements copied into it (declared), the old block freed at commit.
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
        let old: &[T] = self.as_slice();
        // SAFETY: `old` is this vector's live buffer, a slice of valid
        // values (any bytes of a `Plain` value may be copied).
        let old_bytes = unsafe { std::slice::from_raw_parts(old.as_ptr().cast::<u8>(), std::mem::size_of_val(old)) };
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

    /// Writes `value` into slot `index` (declared by the caller).
    fn put(&mut self, index: usize, value: T) -> Result<()> {
        let (ptr, _, _) = self.header();
        let at = ptr + index * std::mem::size_of::<T>();
        let p = NonNull::new(at as *mut u8).ok_or(crate::Error::Damaged { name: "PVec".into() })?;
        // SAFETY: slot `index` lies in this vector's buffer (callers keep
        // `index < cap`); the writer lock and this guard exclude every
        // other reference to it.
        self.tx().with_htx(|htx| unsafe { Ok(htx.write(p, crate::persist::bytes_of(&value))?) })?;
        // Moved into the heap.
        std::mem::forget(value);
        Ok(())
    }

    /// Appends `value` (growing the buffer in this transaction if full).
    pub fn push(&mut self, value: T) -> Result<()> {
        let (_, len, cap) = self.header();
        if len == cap {
            self.grow_to(len + 1)?;
        }
        self.put(len, value)?;
        let (ptr, _, cap) = self.header();
        self.set_header(ptr, len + 1, cap);
        Ok(())
    }

    /// Removes and returns the last element.
    pub fn pop(&mut self) -> Result<Option<T>> {
        let (ptr, len, cap) = self.header();
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: slot `len - 1` holds a valid value; it leaves the vector
        // (the length shrinks below it) and is never read again.
        let v = unsafe { crate::raw::take::<T>(ptr, len - 1) };
        self.set_header(ptr, len - 1, cap);
        Ok(Some(v))
    }

    /// Inserts `value` at `index`, shifting the later elements up.
    ///
    /// # Panics
    ///
    /// If `index > len` (as `Vec::insert`; inside a write transaction the
    /// panic aborts it).
    pub fn insert(&mut self, index: usize, value: T) -> Result<()> {
        let (_, len, cap) = self.header();
        assert!(index <= len, "insertion index (is {index}) should be <= len (is {len})");
        if len == cap {
            self.grow_to(len + 1)?;
        }
        let (ptr, _, cap) = self.header();
        self.declare(ptr, index, len + 1)?;
        // SAFETY: `[index, len]` lies in the buffer (len < cap), declared
        // just above; no reference into it exists.
        unsafe { crate::raw::shift::<T>(ptr, index, index + 1, len - index) };
        self.put(index, value)?;
        self.set_header(ptr, len + 1, cap);
        Ok(())
    }

    /// Removes and returns the element at `index`, shifting the later ones
    /// down.
    ///
    /// # Panics
    ///
    /// If `index >= len` (as `Vec::remove`).
    pub fn remove(&mut self, index: usize) -> Result<T> {
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

    /// Replaces the element at `index`, returning the old one.
    ///
    /// # Panics
    ///
    /// If `index >= len`.
    pub fn set(&mut self, index: usize, value: T) -> Result<T> {
        let (ptr, len, _) = self.header();
        assert!(index < len, "index (is {index}) should be < len (is {len})");
        // SAFETY: slot `index` holds a valid value; it is overwritten next.
        let old = unsafe { crate::raw::take::<T>(ptr, index) };
        self.put(index, value)?;
        Ok(old)
    }

    /// The element at `index`, to change in place (its bytes are declared).
    pub fn get_mut(&mut self, index: usize) -> Result<Option<&mut T>> {
        let (ptr, len, _) = self.header();
        if index >= len {
            return Ok(None);
        }
        self.declare(ptr, index, index + 1)?;
        // SAFETY: the slot holds a valid value, declared above; the
        // returned reference borrows this guard mutably, so it is the only
        // one.
        Ok(Some(unsafe { &mut crate::raw::slice_mut::<T>(ptr, len)[index] }))
    }

    /// All elements, to change in place (all of them are declared).
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        let (ptr, len, _) = self.header();
        self.declare(ptr, 0, len)?;
        // SAFETY: as in `get_mut`, for every element.
        Ok(unsafe { crate::raw::slice_mut::<T>(ptr, len) })
    }

    /// Shortens it to `len` elements (nothing if it is shorter).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let (ptr, old, cap) = self.header();
        if len < old {
            self.set_header(ptr, len, cap);
        }
        Ok(())
    }

    /// Removes every element (the buffer stays).
    pub fn clear(&mut self) -> Result<()> {
        self.truncate(0)
    }

    /// Makes room for at least `additional` more elements.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let (_, len, _) = self.header();
        self.grow_to(len.saturating_add(additional))
    }

    /// Appends every element of `items`.
    pub fn extend(&mut self, items: impl IntoIterator<Item = T>) -> Result<()> {
        let items = items.into_iter();
        self.reserve(items.size_hint().0)?;
        for v in items {
            self.push(v)?;
        }
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
