//! [`PString`]: a UTF-8 string in the heap.

use crate::error::Result;
use crate::persist::{fingerprint_mix, fingerprint_start, Persist};
use crate::shape::{Kind, ShapeId, Shapes};
use crate::tx::Mut;
use crate::vec::PVec;

/// A growable UTF-8 string in the heap, like `String`: a [`PVec<u8>`]
/// whose bytes are always UTF-8 (checked whenever it is borrowed from the
/// heap).
///
/// ```
/// use rvm_collections::{Config, Error, PHeap, PString};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut s = tx.root_or_insert_with("greeting", PString::new)?;
///     s.push_str("hello")?;
///     s.push(',')?;
///     s.push_str(" wörld")?;
///     Ok::<_, Error>(())
/// })?;
/// let s = heap.read(|r| r.root::<PString>("greeting").map(|s| s.map(|s| s.as_str().to_owned())))?;
/// assert_eq!(s.as_deref(), Some("hello, wörld"));
/// # Ok::<(), Error>(())
/// ```
#[repr(transparent)]
#[derive(Default)]
pub struct PString(PVec<u8>);

/// The string, quoted (as `String` prints).
impl std::fmt::Debug for PString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PString {
    /// An empty string (owns no block).
    pub fn new() -> Self {
        PString(PVec::new())
    }

    /// A string of the `len` UTF-8 bytes in the block at `ptr`.
    pub(crate) fn from_raw_parts(ptr: usize, len: usize) -> Self {
        PString(PVec::from_raw_parts(ptr, len))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // `check` confirmed UTF-8 when the value was borrowed, and only
        // this type's methods (which keep it UTF-8) change it. Checked
        // again rather than trusted: a damaged string reads as empty.
        std::str::from_utf8(self.0.as_slice()).unwrap_or_default()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for PString {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

// SAFETY: `#[repr(transparent)]` over a `PVec<u8>` (which is `Persist`);
// its own fingerprint; `describe` reports the buffer, as UTF-8.
unsafe impl Persist for PString {
    const FINGERPRINT: u64 = fingerprint_mix(<PVec<u8> as Persist>::FINGERPRINT, 71);
    const LAYOUT_ID: u64 = fingerprint_mix(fingerprint_start(24, 8), 72);
    const OWNS_BLOCKS: bool = true;

    fn describe(shapes: &mut Shapes) -> ShapeId {
        shapes.define::<Self>(|s| Kind::Vec { elem: u8::describe(s), utf8: true })
    }
}

impl std::fmt::Display for PString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for PString {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for PString {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for PString {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<PString> for str {
    fn eq(&self, other: &PString) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<PString> for &str {
    fn eq(&self, other: &PString) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<PString> for String {
    fn eq(&self, other: &PString) -> bool {
        self.as_str() == other.as_str()
    }
}

/// Compares the strings (as `String` does): two strings of different
/// roots, or of different heaps, are equal when their text is.
///
/// ```
/// use rvm_collections::{Config, Error, PHeap, PString};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let a = tx.new_string("pear")?;
///     let b = tx.new_string("pear")?;
///     let c = tx.new_string("apple")?;
///     assert_eq!(*a, *b);
///     assert!(*c < *a);
///     assert_eq!(*a, "pear".to_string());
///     assert!("pear" == *a);
///     Ok::<_, Error>(())
/// })?;
/// # Ok::<(), Error>(())
/// ```
impl PartialEq for PString {
    fn eq(&self, other: &PString) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for PString {}

impl PartialOrd for PString {
    fn partial_cmp(&self, other: &PString) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// By the text, as `str` orders.
impl Ord for PString {
    fn cmp(&self, other: &PString) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// As the `str` hashes (so a `PString` and its text hash alike).
impl std::hash::Hash for PString {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl AsRef<str> for PString {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for PString {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl<'t, 'h> Mut<'t, 'h, PString> {
    fn bytes(&mut self) -> &mut Mut<'t, 'h, PVec<u8>> {
        // SAFETY: `PString` is `#[repr(transparent)]` over `PVec<u8>`; every
        // change below keeps the bytes UTF-8.
        unsafe { self.as_inner::<PVec<u8>>() }
    }

    /// Appends `s`.
    pub fn push_str(&mut self, s: &str) -> Result<()> {
        self.bytes().extend_copied(s.as_bytes())
    }

    /// Appends `c`.
    pub fn push(&mut self, c: char) -> Result<()> {
        self.push_str(c.encode_utf8(&mut [0; 4]))
    }

    /// Removes and returns the last character.
    pub fn pop(&mut self) -> Result<Option<char>> {
        let Some(c) = self.as_str().chars().next_back() else { return Ok(None) };
        let len = self.len() - c.len_utf8();
        self.bytes().truncate(len)?;
        Ok(Some(c))
    }

    /// Shortens it to `len` bytes.
    ///
    /// # Panics
    ///
    /// If `len` is not on a character boundary (as `String::truncate`).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len < self.len() {
            assert!(self.as_str().is_char_boundary(len), "truncate: {len} is not a char boundary");
            self.bytes().truncate(len)?;
        }
        Ok(())
    }

    /// Empties it (the buffer stays).
    pub fn clear(&mut self) -> Result<()> {
        self.bytes().clear()
    }
}
