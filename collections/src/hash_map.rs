//! [`PHashMap`]: a hash table in the heap, and its entry and iterator
//! types (as `std::collections::hash_map`).
//!
//! # Format
//!
//! The map's value (what a root holds) is a 32-byte `#[repr(C)]` header of
//! four native-endian words:
//!
//! | offset | field     | meaning                                          |
//! |--------|-----------|--------------------------------------------------|
//! | 0      | `ptr`     | address of the table block (0 iff `cap` is 0)    |
//! | 8      | `len`     | entries                                          |
//! | 16     | `cap`     | slots: 0 or a power of two, at least 8           |
//! | 24     | `deleted` | tombstones (slots freed by a removal)            |
//!
//! The table block is `cap` slots of `stride` bytes, aligned for `K` and
//! `V`. A slot holds its control byte at offset 0, the key at `key_off`
//! (1 rounded up to `align_of K`) and the value at `val_off` (the key's
//! end rounded up to `align_of V`); `stride` is the value's end rounded up
//! to the larger alignment. So an insertion changes one run of bytes (the
//! control byte, the key and the value, padding written as zeros): one
//! logged range. A control byte is `0x00..=0x7f` for a full slot (the top
//! 7 bits of the key's hash), `0x80` for a tombstone and `0xff` for an
//! empty slot; any other value (damage) reads as empty. Only full slots'
//! keys and values are ever read.
//!
//! Open addressing with linear probing: key `k` lives in the first slot at
//! or after `stable_hash(k) & (cap - 1)` (wrapping) that holds it, and a
//! probe stops at an empty slot or after `cap` slots. Full slots and
//! tombstones stay at most 7/8 of the slots: an insertion past that builds
//! a new table (double the slots, or the same number if tombstones were
//! most of the load) in a new block, in the same transaction.
//!
//! # Keys are compared by their bytes
//!
//! `K` needs neither `Eq` nor `Hash`: two keys are equal when their bytes
//! are ([`Persist`] types have no padding, so every byte is meaningful),
//! and the hash is [`stable_hash`] of those bytes: a fixed function that
//! is part of the format, the same in every run and build (std's
//! `DefaultHasher` is seeded at random per process, and `Hash` impls may
//! change between releases). So `-0.0` and `0.0` are different keys, and
//! two NaNs are the same key only if their bits are. The hash has no
//! secret seed: keys chosen by an adversary can collide on purpose.

use crate::error::{Error, Result};
use crate::owned::{IntoPersist, Owned};
use crate::persist::{bytes_of, fingerprint_mix, fingerprint_start, Persist, Plain};
use crate::shape::{Kind, ShapeId, Shapes};
use crate::tx::Mut;
use std::alloc::Layout;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Control byte of an empty slot.
const EMPTY: u8 = 0xff;
/// Control byte of a tombstone (a removed entry).
const DELETED: u8 = 0x80;
/// Fewest slots of a table that has any.
const MIN_CAP: usize = 8;

/// Version of [`stable_hash`] and of the table format, mixed into the
/// fingerprint: a map written with another hash function or table layout
/// is refused as another type ([`Error::RootType`]) instead of failing its
/// lookups. 2: one slot per entry (1 had arrays of control bytes, keys
/// and values).
const FORMAT_VERSION: u64 = 2;

/// `2^64 / φ`, odd.
const MUL: u64 = 0x9e37_79b9_7f4a_7c15;
/// Digits of π.
const SEED: u64 = 0x243f_6a88_85a3_08d3;

/// The hash [`PHashMap`] files a key under: [`stable_hash_bytes`] of the
/// key's bytes. Fixed, so a map written by one run is read by the next
/// (the key's bytes are native-endian, as every value in the heap).
///
/// ```
/// use rvm_collections::hash_map::stable_hash;
/// assert_eq!(stable_hash(&42u64), stable_hash(&42u64));
/// assert_ne!(stable_hash(&42u64), stable_hash(&43u64));
/// ```
pub fn stable_hash<K: Persist>(key: &K) -> u64 {
    stable_hash_bytes(bytes_of(key))
}

/// A fixed 64-bit hash of `bytes`: the length, then each 8-byte
/// little-endian word (the last one zero-filled), each mixed in as
/// `h = rotl((h ^ w) * 0x9e3779b97f4a7c15, 29)` starting from
/// `0x243f6a8885a308d3 ^ len * 0x9e3779b97f4a7c15`, and MurmurHash3's
/// 64-bit finaliser at the end. Not keyed: no defence against chosen
/// collisions.
pub fn stable_hash_bytes(bytes: &[u8]) -> u64 {
    let mix = |h: u64, w: u64| (h ^ w).wrapping_mul(MUL).rotate_left(29);
    let mut h = SEED ^ (bytes.len() as u64).wrapping_mul(MUL);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = mix(h, u64::from_le_bytes(b));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(b));
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The control byte of a full slot holding a key of hash `hash`.
fn tag(hash: u64) -> u8 {
    (hash >> 57) as u8
}

/// Whether control byte `c` marks a full slot.
pub(crate) fn is_full(c: u8) -> bool {
    c < 0x80
}

/// Entries a table of `cap` slots holds (with its tombstones) before it
/// grows: 7/8 of the slots.
fn max_load(cap: usize) -> usize {
    cap - cap / 8
}

/// The fewest slots (a power of two, at least [`MIN_CAP`]) for `items`
/// entries.
fn slots_for(items: usize) -> Option<usize> {
    let mut cap = MIN_CAP;
    while max_load(cap) < items {
        cap = cap.checked_mul(2)?;
    }
    Some(cap)
}

/// Where the parts of a table of `cap` slots lie in its block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    /// The whole block.
    pub(crate) layout: Layout,
    /// Bytes per slot.
    pub(crate) stride: usize,
    /// Offset of the key in a slot.
    key_off: usize,
    /// Offset of the value in a slot.
    pub(crate) val_off: usize,
    /// End of the value in a slot (what an insertion writes).
    val_end: usize,
}

fn geometry<K, V>(cap: usize) -> Option<Geometry> {
    let (k, v) = (Layout::new::<K>(), Layout::new::<V>());
    geometry_of(cap, k.size() as u64, k.align() as u64, v.size() as u64, v.align() as u64)
}

/// [`geometry`] from the key's and value's sizes and alignments.
fn geometry_of(cap: usize, ks: u64, ka: u64, vs: u64, va: u64) -> Option<Geometry> {
    let (ks, ka, vs, va) =
        (usize::try_from(ks).ok()?, usize::try_from(ka).ok()?, usize::try_from(vs).ok()?, usize::try_from(va).ok()?);
    if !ka.is_power_of_two() || !va.is_power_of_two() {
        return None;
    }
    let key_off = 1usize.checked_next_multiple_of(ka)?;
    let val_off = key_off.checked_add(ks)?.checked_next_multiple_of(va)?;
    let val_end = val_off.checked_add(vs)?;
    let align = ka.max(va);
    let stride = val_end.checked_next_multiple_of(align)?;
    let layout = Layout::from_size_align(stride.checked_mul(cap)?, align).ok()?;
    Some(Geometry { layout, stride, key_off, val_off, val_end })
}

/// A map's header, as read from the heap.
pub(crate) struct Header {
    pub(crate) ptr: u64,
    pub(crate) len: u64,
    pub(crate) cap: u64,
    pub(crate) deleted: u64,
}

impl Header {
    /// Whether the numbers agree (`None` if not): `Some(None)` for a map
    /// without a table, else the table's geometry (its block is the
    /// caller's to check: live, `layout.size()` bytes, aligned).
    pub(crate) fn validate(&self, ks: u64, ka: u64, vs: u64, va: u64) -> Option<Option<Geometry>> {
        if self.len > self.cap || self.deleted > self.cap - self.len {
            return None;
        }
        if self.cap == 0 {
            return (self.ptr == 0).then_some(None);
        }
        let cap = usize::try_from(self.cap).ok()?;
        if !cap.is_power_of_two() || cap < MIN_CAP {
            return None;
        }
        geometry_of(cap, ks, ka, vs, va).map(Some)
    }
}

fn damaged() -> Error {
    Error::Damaged { name: "PHashMap".into() }
}

/// A table for more entries than the address space holds: the same
/// error as an impossible `PVec` capacity, not damage.
fn too_many<K, V>() -> Error {
    Error::Heap(rvm_heap::HeapError::BadLayout {
        size: usize::MAX,
        align: std::mem::align_of::<K>().max(std::mem::align_of::<V>()),
    })
}

/// A hash map in the heap, like `HashMap<K, V>`, of [`Plain`] keys and
/// any [`Persist`] values, whose keys are compared and hashed by their
/// bytes with a fixed hash function (see [the module](crate::hash_map)).
///
/// Read it through any guard (`&PHashMap` gives `len`, `get`,
/// `contains_key`, `iter`, `keys`, `values`), change it through its
/// [`Mut`] guard in a write transaction (`insert`, `remove`, `get_mut`,
/// `entry`, `get_or_insert_with`, `retain`, `clear`, `reserve`,
/// `extend`; for values that own blocks, `insert_owned` and
/// `remove_owned`). Each change declares only the bytes it changes: the header
/// (declared when the root is borrowed), and the control byte, key and
/// value of the slot it touches; growing builds a new table block in the
/// same transaction and frees the old one at commit.
///
/// ```
/// use rvm_collections::{Config, Error, PHashMap, PHeap};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut m = tx.root_or_insert_with("balances", PHashMap::<u64, i64>::new)?;
///     m.insert(7, 100)?;
///     m.insert(9, 50)?;
///     *m.get_or_insert_with(7, || 0)? -= 30;
///     assert_eq!(m.remove(&9)?, Some(50));
///     Ok::<_, Error>(())
/// })?;
/// let b = heap.read(|r| r.root::<PHashMap<u64, i64>>("balances").map(|m| m.and_then(|m| m.get(&7).copied())))?;
/// assert_eq!(b, Some(70));
/// # Ok::<(), Error>(())
/// ```
#[repr(C)]
pub struct PHashMap<K, V> {
    ptr: u64,
    len: u64,
    cap: u64,
    deleted: u64,
    _kv: PhantomData<(K, V)>,
}

/// The entries, as a map in table order (as `HashMap` prints).
impl<K: Plain + std::fmt::Debug, V: Persist + std::fmt::Debug> std::fmt::Debug for PHashMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Reads.
///
/// ```
/// use rvm_collections::{Config, Error, PHashMap, PHeap};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| tx.root_or_insert_with("m", PHashMap::<u32, u64>::new)?.extend([(1, 10), (2, 20)]))?;
/// heap.read(|r| {
///     let m = r.root::<PHashMap<u32, u64>>("m")?.unwrap();
///     assert_eq!((m.len(), m.get(&1), m.contains_key(&3)), (2, Some(&10), false));
///     let mut all: Vec<(u32, u64)> = m.iter().map(|(k, v)| (*k, *v)).collect();
///     all.sort();
///     assert_eq!(all, [(1, 10), (2, 20)]);
///     assert_eq!(m.values().sum::<u64>(), 30);
///     Ok::<_, Error>(())
/// })?;
/// # Ok::<(), Error>(())
/// ```
impl<K: Plain, V: Persist> PHashMap<K, V> {
    /// An empty map (owns no block): the value to make a root with.
    pub fn new() -> Self {
        PHashMap { ptr: 0, len: 0, cap: 0, deleted: 0, _kv: PhantomData }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries it holds before it grows (as `HashMap::capacity`; its
    /// tombstones count against this until the next growth).
    pub fn capacity(&self) -> usize {
        match self.cap {
            0 => 0,
            cap => max_load(cap as usize),
        }
    }

    /// Where the table's parts lie (`None` when it has no block).
    fn table(&self) -> Option<(usize, usize, Geometry)> {
        let cap = self.cap as usize;
        if cap == 0 {
            return None;
        }
        // The root check confirmed the geometry exists before any guard
        // handed this value out, and only this map's methods change it.
        Some((self.ptr as usize, cap, geometry::<K, V>(cap)?))
    }

    /// Slots of the table (0 without one).
    fn slots(&self) -> usize {
        self.table().map_or(0, |(_, cap, _)| cap)
    }

    /// The control byte of slot `i < slots()`.
    fn ctrl_at(&self, i: usize) -> u8 {
        let Some((ptr, cap, g)) = self.table() else { return EMPTY };
        assert!(i < cap);
        // SAFETY: the root check confirmed, before any guard handed this
        // value out, that `ptr` is a live block of at least `cap` slots;
        // byte 0 of slot `i < cap` is its control byte (any value is a
        // valid `u8`); only this map's methods change the block, through
        // an exclusive guard, which excludes this shared borrow.
        unsafe { crate::raw::slice::<u8>(ptr + i * g.stride, 1)[0] }
    }

    /// The entry in full slot `i`.
    fn entry_at(&self, i: usize) -> (&K, &V) {
        let (ptr, cap, g) = self.table().expect("a full slot is in a table");
        assert!(i < cap);
        let slot = ptr + i * g.stride;
        // SAFETY: slot `i < cap` lies in the block, and its key and value
        // are aligned (the block is aligned for `K` and `V`, checked; the
        // stride and offsets are multiples of their alignments); callers
        // pass full slots, whose key and value were written from a `K` and
        // a `V` by a transaction (trusted as every value in the heap is,
        // see `Persist`). Shared for the borrow of `self` (as in `ctrl_at`).
        unsafe { (&*((slot + g.key_off) as *const K), &*((slot + g.val_off) as *const V)) }
    }

    /// The slot holding the key whose bytes are `key` and hash `hash`.
    fn find(&self, key: &[u8], hash: u64) -> Option<usize> {
        let (ptr, cap, g) = self.table()?;
        let mask = cap - 1;
        let t = tag(hash);
        let mut i = hash as usize & mask;
        for _ in 0..cap {
            let slot = ptr + i * g.stride;
            // SAFETY: slot `i < cap` lies in the table block (as in
            // `ctrl_at`); its byte 0 is the control byte, and a full slot's
            // key (at `key_off`) was written from a `K`.
            let c = unsafe { *(slot as *const u8) };
            if c == t {
                // SAFETY: as above: the key bytes of a full slot.
                let k = unsafe { crate::raw::slice::<u8>(slot + g.key_off, key.len()) };
                if k == key {
                    return Some(i);
                }
            } else if c != DELETED && !is_full(c) {
                return None;
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.get_key_value(key).map(|(_, v)| v)
    }

    /// The stored key equal to `key`, and its value.
    pub fn get_key_value(&self, key: &K) -> Option<(&K, &V)> {
        let k = bytes_of(key);
        self.find(k, stable_hash_bytes(k)).map(|i| self.entry_at(i))
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// Iterates over the entries, in slot order (which the keys' hashes
    /// decide; the same in every run).
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter { map: self, slots: self.slots(), next: 0, left: self.len() }
    }

    /// Iterates over the keys.
    pub fn keys(&self) -> Keys<'_, K, V> {
        Keys(self.iter())
    }

    /// Iterates over the values.
    pub fn values(&self) -> Values<'_, K, V> {
        Values(self.iter())
    }
}

impl<K: Plain, V: Persist> Default for PHashMap<K, V> {
    fn default() -> Self {
        PHashMap::new()
    }
}

impl<'a, K: Plain, V: Persist> IntoIterator for &'a PHashMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The entries of a [`PHashMap`], from [`PHashMap::iter`].
pub struct Iter<'a, K, V> {
    map: &'a PHashMap<K, V>,
    slots: usize,
    next: usize,
    /// Entries the header says are left (a hint only).
    left: usize,
}

impl<K, V> std::fmt::Debug for Iter<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iter").field("slots", &self.slots).field("next", &self.next).finish_non_exhaustive()
    }
}

impl<'a, K: Plain, V: Persist> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.slots {
            let i = self.next;
            self.next += 1;
            if is_full(self.map.ctrl_at(i)) {
                self.left = self.left.saturating_sub(1);
                return Some(self.map.entry_at(i));
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let slots = self.slots - self.next;
        (self.left.min(slots), Some(slots))
    }
}

impl<K: Plain, V: Persist> std::iter::FusedIterator for Iter<'_, K, V> {}

/// The keys of a [`PHashMap`], from [`PHashMap::keys`].
#[derive(Debug)]
pub struct Keys<'a, K, V>(Iter<'a, K, V>);

impl<'a, K: Plain, V: Persist> Iterator for Keys<'a, K, V> {
    type Item = &'a K;
    fn next(&mut self) -> Option<&'a K> {
        self.0.next().map(|(k, _)| k)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// The values of a [`PHashMap`], from [`PHashMap::values`].
#[derive(Debug)]
pub struct Values<'a, K, V>(Iter<'a, K, V>);

impl<'a, K: Plain, V: Persist> Iterator for Values<'a, K, V> {
    type Item = &'a V;
    fn next(&mut self) -> Option<&'a V> {
        self.0.next().map(|(_, v)| v)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

// SAFETY: four native-endian words, `#[repr(C)]`, no padding (the
// `PhantomData` is zero-sized); the table is a heap block (an address in
// the heap, which loads at a fixed base); the fingerprint mixes in the key
// and value types' layout ids and the hash function's version; `describe`
// reports the table.
unsafe impl<K: Plain, V: Persist> Persist for PHashMap<K, V> {
    const FINGERPRINT: u64 = fingerprint_mix(
        fingerprint_mix(
            fingerprint_mix(fingerprint_mix(fingerprint_start(32, 8), K::LAYOUT_ID), V::LAYOUT_ID),
            FORMAT_VERSION,
        ),
        71,
    );
    const LAYOUT_ID: u64 = fingerprint_mix(fingerprint_start(32, 8), 73);
    const OWNS_BLOCKS: bool = true;

    /// The tracer checks the header's numbers and that the table is a live
    /// block, large enough and aligned: O(1) for values that own nothing
    /// (the control bytes are not scanned: whatever they hold, no read
    /// goes outside the table, and only full slots' keys and values are
    /// read); values that own blocks are traced, slot by slot.
    fn describe(shapes: &mut Shapes) -> ShapeId {
        shapes.define::<Self>(|s| Kind::HashMap {
            key_size: std::mem::size_of::<K>() as u64,
            key_align: std::mem::align_of::<K>() as u64,
            value: V::describe(s),
        })
    }
}

/// Changes, through the guard of a write transaction.
///
/// ```
/// use rvm_collections::{Config, Error, PHashMap, PHeap};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut m = tx.root_or_insert_with("m", PHashMap::<u64, u64>::new)?;
///     m.reserve(100)?; // one table for 100 entries, no growth below
///     for i in 0..100 {
///         assert_eq!(m.insert(i, i * i)?, None);
///     }
///     assert_eq!(m.insert(3, 0)?, Some(9));
///     if let Some(mut v) = m.get_mut(&4)? {
///         *v += 1;
///     }
///     assert_eq!(m.remove(&5)?, Some(25));
///     assert_eq!((m.len(), m.get(&4)), (99, Some(&17)));
///     m.clear()?;
///     assert!(m.is_empty());
///     Ok::<_, Error>(())
/// })?;
/// # Ok::<(), Error>(())
/// ```
///
/// Values that own blocks (strings, vectors, boxes) are stored with
/// `insert_owned` and come back as [`Owned`] values:
///
/// ```
/// use rvm_collections::{Config, Error, PHashMap, PHeap, PString};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut names = tx.root_or_insert_with("names", PHashMap::<u32, PString>::new)?;
///     names.insert_owned(1, tx.new_string("ada")?)?;
///     names.get_or_insert_with(2, PString::new)?.push_str("grace")?;
///     let old = names.insert_owned(1, tx.new_string("alan")?)?;
///     assert_eq!(old.as_deref().map(|s| s.as_str()), Some("ada")); // freed when dropped
///     Ok::<_, Error>(())
/// })?;
/// let two = heap.read(|r| r.root::<PHashMap<u32, PString>>("names").map(|m| m.unwrap().get(&2).map(|s| s.to_string())))?;
/// assert_eq!(two.as_deref(), Some("grace"));
/// # Ok::<(), Error>(())
/// ```
impl<'t, 'h, K: Plain, V: Persist> Mut<'t, 'h, PHashMap<K, V>> {
    fn map(&self) -> &PHashMap<K, V> {
        self
    }

    /// The table: block address, slots, geometry (an error when it has no
    /// block or its geometry is impossible: only with a damaged header).
    fn table_mut(&self) -> Result<(usize, usize, Geometry)> {
        self.map().table().ok_or_else(damaged)
    }

    fn set_header(&mut self, ptr: usize, len: usize, cap: usize, deleted: usize) {
        // The header was declared when the guard was made.
        let m = self.value_mut();
        (m.ptr, m.len, m.cap, m.deleted) = (ptr as u64, len as u64, cap as u64, deleted as u64);
    }

    /// Declares `[addr, addr + bytes.len())` of the table and stores
    /// `bytes` there.
    fn store(&self, addr: usize, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let p = NonNull::new(addr as *mut u8).ok_or_else(damaged)?;
        // SAFETY: callers pass a range of this map's table block (or of a
        // block this transaction just allocated for it), which only this
        // guard reaches; the writer lock keeps other threads away, and no
        // reference into the range is alive (the map's methods hold none
        // across a store; `&mut self` excludes the caller's).
        self.tx().with_htx(|htx| unsafe { Ok(htx.write(p, bytes)?) })
    }

    /// Address of value `i` of the table.
    fn value_addr(&self, i: usize) -> Result<usize> {
        let (ptr, cap, g) = self.table_mut()?;
        assert!(i < cap);
        Ok(ptr + i * g.stride + g.val_off)
    }

    /// Value `i` of the table (a full slot), to change (declared here).
    fn value_mut_at(&mut self, i: usize) -> Result<Mut<'_, 'h, V>> {
        let at = self.value_addr(i)?;
        // SAFETY: a full slot's value (callers pass full slots), inside the
        // table block and aligned (as in `entry_at`), owned by this map and
        // reachable only through this guard.
        unsafe { self.child::<V>(at) }
    }

    /// Builds a table of `new_cap` slots in a new block (written in full:
    /// control bytes, keys and values), moves every entry into it (the
    /// values' bytes move, and what they own with them), frees the old
    /// block at commit.
    fn rebuild(&mut self, new_cap: usize) -> Result<()> {
        let g = geometry::<K, V>(new_cap).ok_or_else(|| {
            Error::Heap(rvm_heap::HeapError::BadLayout {
                size: new_cap.saturating_mul(1 + std::mem::size_of::<K>() + std::mem::size_of::<V>()),
                align: std::mem::align_of::<K>().max(std::mem::align_of::<V>()),
            })
        })?;
        // The heap block first: a table the heap cannot hold is a typed
        // error before any volatile memory is asked for its image.
        let new = self.tx().with_htx(|htx| Ok(htx.malloc(g.layout)?))?;
        // The new table's image: every control byte empty, then each
        // entry moved into its slot (the values' bytes move, and what they
        // own with them).
        let mut image = vec![0u8; g.layout.size()];
        for slot in image.chunks_exact_mut(g.stride) {
            slot[0] = EMPTY;
        }
        let mask = new_cap - 1;
        let mut len = 0;
        let old = self.map();
        for (k, v) in old.iter() {
            let (kb, vb) = (bytes_of(k), bytes_of(v));
            let hash = stable_hash_bytes(kb);
            let mut i = hash as usize & mask;
            let mut probes = 0;
            while image[i * g.stride] != EMPTY {
                probes += 1;
                if probes == new_cap {
                    // More full control bytes than the new table holds:
                    // only a damaged table has them. The new block goes
                    // back (a closure that swallows the error leaks none).
                    self.tx().with_htx(|htx| Ok(htx.free(new)?))?;
                    return Err(damaged());
                }
                i = (i + 1) & mask;
            }
            let slot = &mut image[i * g.stride..(i + 1) * g.stride];
            slot[0] = tag(hash);
            slot[g.key_off..g.key_off + kb.len()].copy_from_slice(kb);
            slot[g.val_off..g.val_end].copy_from_slice(vb);
            len += 1;
        }
        let old_ptr = old.ptr as usize;
        let at = new.as_ptr() as usize;
        self.store(at, &image)?;
        if let Some(p) = NonNull::new(old_ptr as *mut u8) {
            self.tx().with_htx(|htx| Ok(htx.free(p)?))?;
        }
        self.set_header(at, len, new_cap, 0);
        Ok(())
    }

    /// Makes room for `items` entries without tombstones in the way.
    fn make_room(&mut self, items: usize) -> Result<()> {
        let m = self.map();
        let (cap, deleted) = (m.cap as usize, m.deleted as usize);
        let used = items.checked_add(deleted).ok_or_else(too_many::<K, V>)?;
        if cap > 0 && used <= max_load(cap) {
            return Ok(());
        }
        let mut new_cap = slots_for(items).ok_or_else(too_many::<K, V>)?;
        // Mostly tombstones: rebuild at the same size; else at least double.
        if cap > 0 && items > max_load(cap) / 2 {
            new_cap = new_cap.max(cap.saturating_mul(2));
        }
        new_cap = new_cap.max(cap);
        self.rebuild(new_cap)
    }

    /// Inserts a key known to be absent, with `value` (taken for storing:
    /// on failure its blocks float again); returns its slot.
    fn insert_new(&mut self, hash: u64, key: &K, value: V) -> Result<usize> {
        let len = self.map().len();
        if let Err(e) = self.make_room(len + 1) {
            self.tx().float(&value);
            return Err(e);
        }
        let (ptr, cap, g) = self.table_mut()?;
        let mask = cap - 1;
        let mut i = hash as usize & mask;
        let mut probes = 0;
        while is_full(self.map().ctrl_at(i)) {
            probes += 1;
            if probes == cap {
                self.tx().float(&value);
                return Err(damaged());
            }
            i = (i + 1) & mask;
        }
        let was_tombstone = self.map().ctrl_at(i) == DELETED;
        // The control byte, the key and the value, in one run (padding as
        // zeros): one declared range.
        let mut slot = [0u8; 64];
        let mut big = Vec::new();
        let buf: &mut [u8] = if g.val_end <= slot.len() {
            &mut slot[..g.val_end]
        } else {
            big.resize(g.val_end, 0);
            &mut big
        };
        buf[0] = tag(hash);
        buf[g.key_off..g.key_off + std::mem::size_of::<K>()].copy_from_slice(bytes_of(key));
        buf[g.val_off..].copy_from_slice(bytes_of(&value));
        if let Err(e) = self.store(ptr + i * g.stride, buf) {
            self.tx().float(&value);
            return Err(e);
        }
        // Moved into the heap.
        std::mem::forget(value);
        let m = self.map();
        let (len, deleted) = (m.len() + 1, (m.deleted as usize).saturating_sub(usize::from(was_tombstone)));
        self.set_header(ptr, len, cap, deleted);
        Ok(i)
    }

    /// Empties full slot `i`: an empty slot if the next one is empty (and
    /// then the tombstones just before it become empty too), else a
    /// tombstone.
    fn erase(&mut self, i: usize) -> Result<()> {
        let (ptr, cap, g) = self.table_mut()?;
        let mask = cap - 1;
        let m = self.map();
        let (len, mut deleted) = (m.len().saturating_sub(1), m.deleted as usize);
        let next = m.ctrl_at((i + 1) & mask);
        if is_full(next) || next == DELETED {
            self.store(ptr + i * g.stride, &[DELETED])?;
            deleted += 1;
        } else {
            // No probe passes slot `i` to reach a later one: it and the
            // tombstones right before it end no probe that matters.
            self.store(ptr + i * g.stride, &[EMPTY])?;
            let mut j = i;
            for _ in 0..cap - 1 {
                j = j.wrapping_sub(1) & mask;
                if self.map().ctrl_at(j) != DELETED {
                    break;
                }
                self.store(ptr + j * g.stride, &[EMPTY])?;
                deleted = deleted.saturating_sub(1);
            }
        }
        self.set_header(ptr, len, cap, deleted);
        Ok(())
    }

    /// Puts `value` into full slot `i`; returns the value it replaces
    /// (moved out, bitwise).
    fn replace_at(&mut self, i: usize, value: V) -> Result<V> {
        let at = self.value_addr(i)?;
        // SAFETY: a full slot's valid value, moved out here; the slot is
        // overwritten next (on failure the transaction must abort: the
        // slot then still holds the old bytes or is restored).
        let old = unsafe { crate::raw::take::<V>(at, 0) };
        crate::tx::store_value(self.tx(), at, value)?;
        Ok(old)
    }

    /// Inserts `value` under `key`; returns the value it replaces (the
    /// stored key stays: it has the same bytes).
    fn put(&mut self, key: K, value: impl IntoPersist<V>) -> Result<Option<V>> {
        let value = self.tx().accept(value)?;
        let k = bytes_of(&key);
        let hash = stable_hash_bytes(k);
        if let Some(i) = self.map().find(k, hash) {
            return self.replace_at(i, value).map(Some);
        }
        self.insert_new(hash, &key, value)?;
        Ok(None)
    }

    /// Inserts `value` under `key`; returns the value it replaces as an
    /// [`Owned`] value (dropping it frees what it owns).
    pub fn insert_owned(&mut self, key: K, value: impl IntoPersist<V>) -> Result<Option<Owned<'h, V>>> {
        match self.put(key, value)? {
            Some(old) => self.tx().adopt(old).map(Some),
            None => Ok(None),
        }
    }

    /// Removes `key`; returns its value as an [`Owned`] value.
    pub fn remove_owned(&mut self, key: &K) -> Result<Option<Owned<'h, V>>> {
        match self.take(key)? {
            Some((_, v)) => self.tx().adopt(v).map(Some),
            None => Ok(None),
        }
    }

    /// Removes `key`; moves its entry out.
    fn take(&mut self, key: &K) -> Result<Option<(K, V)>> {
        let k = bytes_of(key);
        let Some(i) = self.map().find(k, stable_hash_bytes(k)) else { return Ok(None) };
        self.remove_at(i).map(Some)
    }

    fn remove_at(&mut self, i: usize) -> Result<(K, V)> {
        let (k, v) = self.map().entry_at(i);
        // SAFETY: both are valid values (full slot); the slot leaves the
        // map just below and its bytes are never read as values again, so
        // the copies are the only owners.
        let kv = unsafe { (std::ptr::read(k), std::ptr::read(v)) };
        self.erase(i)?;
        Ok(kv)
    }

    /// The value of `key`, to change (only its bytes are declared).
    pub fn get_mut(&mut self, key: &K) -> Result<Option<Mut<'_, 'h, V>>> {
        let k = bytes_of(key);
        match self.map().find(k, stable_hash_bytes(k)) {
            Some(i) => self.value_mut_at(i).map(Some),
            None => Ok(None),
        }
    }

    /// The value of `key`, inserted as `make()` if it has none.
    pub fn get_or_insert_with<I: IntoPersist<V>>(
        &mut self,
        key: K,
        make: impl FnOnce() -> I,
    ) -> Result<Mut<'_, 'h, V>> {
        self.entry(key).or_insert_with(make)
    }

    /// The entry of `key`, to read, insert, change or remove in place
    /// (as `HashMap::entry`).
    ///
    /// ```
    /// use rvm_collections::hash_map::Entry;
    /// use rvm_collections::{Config, Error, PHashMap, PHeap};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut words = tx.root_or_insert_with("counts", PHashMap::<[u8; 8], u64>::new)?;
    ///     for w in [*b"apple   ", *b"pear    ", *b"apple   "] {
    ///         *words.entry(w).or_insert(0)? += 1;
    ///     }
    ///     assert_eq!(words.get(b"apple   "), Some(&2));
    ///     match words.entry(*b"pear    ") {
    ///         Entry::Occupied(e) => assert_eq!(e.remove()?, 1),
    ///         Entry::Vacant(_) => unreachable!(),
    ///     }
    ///     words.entry(*b"plum    ").and_modify(|n| *n += 1)?.or_default()?;
    ///     assert_eq!(words.get(b"plum    "), Some(&0));
    ///     Ok::<_, Error>(())
    /// })?;
    /// # Ok::<(), Error>(())
    /// ```
    pub fn entry(&mut self, key: K) -> Entry<'_, 't, 'h, K, V> {
        let k = bytes_of(&key);
        let hash = stable_hash_bytes(k);
        match self.map().find(k, hash) {
            Some(index) => Entry::Occupied(OccupiedEntry { map: self, index }),
            None => Entry::Vacant(VacantEntry { map: self, key, hash }),
        }
    }

    /// Removes every entry, dropping the values (what they own is freed),
    /// and frees the table (at commit): O(1) to log, whatever the size. The
    /// next insertion makes a new one (`reserve` to make it at once).
    pub fn clear(&mut self) -> Result<()> {
        let m = self.map();
        if m.cap == 0 {
            return Ok(());
        }
        let (ptr, cap, g) = self.table_mut()?;
        if V::OWNS_BLOCKS {
            let full: Vec<usize> = (0..cap).filter(|&i| is_full(self.map().ctrl_at(i))).collect();
            for i in full {
                self.tx().drop_value::<V>(ptr + i * g.stride + g.val_off)?;
            }
        }
        let p = NonNull::new(ptr as *mut u8).ok_or_else(damaged)?;
        self.tx().with_htx(|htx| Ok(htx.free(p)?))?;
        self.set_header(0, 0, 0, 0);
        Ok(())
    }

    /// Keeps only the entries for which `keep` returns `true` (as
    /// `HashMap::retain`, but `keep` sees the value by `&`: change values
    /// through [`get_mut`](Self::get_mut)); the others are removed and
    /// their values dropped (what they own is freed in this transaction).
    /// `keep` sees every entry once, before anything changes.
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PHashMap, PHeap};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut m = tx.root_or_insert_with("m", PHashMap::<u32, u64>::new)?;
    ///     m.extend((0..10).map(|i| (i, u64::from(i) * 10)))?;
    ///     m.retain(|k, v| k % 2 == 0 && *v < 60)?;
    ///     let mut left: Vec<u32> = m.keys().copied().collect();
    ///     left.sort();
    ///     assert_eq!(left, [0, 2, 4]);
    ///     Ok::<_, Error>(())
    /// })?;
    /// # Ok::<(), Error>(())
    /// ```
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) -> Result<()> {
        let m = self.map();
        let slots = m.cap as usize;
        let doomed: Vec<usize> = (0..slots)
            .filter(|&i| is_full(m.ctrl_at(i)))
            .filter(|&i| {
                let (k, v) = m.entry_at(i);
                !keep(k, v)
            })
            .collect();
        // Erasing a slot moves no other entry: the indexes stay right.
        for i in doomed {
            let (_, v) = self.remove_at(i)?;
            drop(self.tx().adopt(v)?);
        }
        Ok(())
    }

    /// Makes room for at least `additional` more entries (a new table now,
    /// so that inserting them grows nothing).
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let len = self.map().len();
        self.make_room(len.checked_add(additional).ok_or_else(too_many::<K, V>)?)
    }

    /// Inserts every entry of `items` (later ones replace earlier ones,
    /// which are dropped).
    pub fn extend<I: IntoPersist<V>>(&mut self, items: impl IntoIterator<Item = (K, I)>) -> Result<()> {
        let items = items.into_iter();
        self.reserve(items.size_hint().0)?;
        for (k, v) in items {
            if let Some(old) = self.put(k, v)? {
                self.tx().adopt(old)?;
            }
        }
        Ok(())
    }
}

/// By value, for values that own nothing.
impl<K: Plain, V: Plain> Mut<'_, '_, PHashMap<K, V>> {
    /// Inserts `value` under `key`; returns the value it replaces (the
    /// stored key stays: it has the same bytes).
    pub fn insert(&mut self, key: K, value: V) -> Result<Option<V>> {
        self.put(key, value)
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Result<Option<V>> {
        Ok(self.take(key)?.map(|(_, v)| v))
    }

    /// Removes `key`; returns the stored key and its value.
    pub fn remove_entry(&mut self, key: &K) -> Result<Option<(K, V)>> {
        self.take(key)
    }
}

/// An entry of a [`PHashMap`], from `entry` on its [`Mut`] guard:
/// occupied or vacant, as `std::collections::hash_map::Entry`.
#[derive(Debug)]
pub enum Entry<'a, 't, 'h, K: Plain, V: Persist> {
    /// The key has a value.
    Occupied(OccupiedEntry<'a, 't, 'h, K, V>),
    /// The key has none.
    Vacant(VacantEntry<'a, 't, 'h, K, V>),
}

/// An entry whose key has a value.
#[derive(Debug)]
pub struct OccupiedEntry<'a, 't, 'h, K: Plain, V: Persist> {
    map: &'a mut Mut<'t, 'h, PHashMap<K, V>>,
    index: usize,
}

/// An entry whose key has no value.
#[derive(Debug)]
pub struct VacantEntry<'a, 't, 'h, K: Plain, V: Persist> {
    map: &'a mut Mut<'t, 'h, PHashMap<K, V>>,
    key: K,
    hash: u64,
}

impl<'a, 'h, K: Plain, V: Persist> Entry<'a, '_, 'h, K, V> {
    /// The entry's key.
    pub fn key(&self) -> &K {
        match self {
            Entry::Occupied(e) => e.key(),
            Entry::Vacant(e) => e.key(),
        }
    }

    /// The value, inserted as `default` if there is none.
    pub fn or_insert(self, default: impl IntoPersist<V>) -> Result<Mut<'a, 'h, V>> {
        self.or_insert_with(|| default)
    }

    /// The value, inserted as `make()` if there is none.
    pub fn or_insert_with<I: IntoPersist<V>>(self, make: impl FnOnce() -> I) -> Result<Mut<'a, 'h, V>> {
        match self {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(make()),
        }
    }

    /// The value, inserted as `make(&key)` if there is none.
    pub fn or_insert_with_key<I: IntoPersist<V>>(self, make: impl FnOnce(&K) -> I) -> Result<Mut<'a, 'h, V>> {
        match self {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let v = make(&e.key);
                e.insert(v)
            }
        }
    }

    /// The value, inserted as `V::default()` if there is none.
    pub fn or_default(self) -> Result<Mut<'a, 'h, V>>
    where
        V: Default,
    {
        self.or_insert_with(V::default)
    }
}

impl<K: Plain, V: Plain> Entry<'_, '_, '_, K, V> {
    /// Calls `f` on the value if there is one.
    pub fn and_modify(self, f: impl FnOnce(&mut V)) -> Result<Self> {
        match self {
            Entry::Occupied(mut e) => {
                f(&mut *e.get_mut()?);
                Ok(Entry::Occupied(e))
            }
            vacant => Ok(vacant),
        }
    }
}

impl<'a, 't, 'h, K: Plain, V: Persist> OccupiedEntry<'a, 't, 'h, K, V> {
    /// The stored key.
    pub fn key(&self) -> &K {
        self.map.map().entry_at(self.index).0
    }

    /// The value.
    pub fn get(&self) -> &V {
        self.map.map().entry_at(self.index).1
    }

    /// The value, to change (its bytes are declared).
    pub fn get_mut(&mut self) -> Result<Mut<'_, 'h, V>> {
        self.map.value_mut_at(self.index)
    }

    /// The value, to change, for as long as the entry's borrow.
    pub fn into_mut(self) -> Result<Mut<'a, 'h, V>> {
        self.map.value_mut_at(self.index)
    }

    /// Replaces the value; returns the old one as an [`Owned`] value.
    pub fn insert_owned(&mut self, value: impl IntoPersist<V>) -> Result<Owned<'h, V>> {
        let value = self.map.tx().accept(value)?;
        let old = self.map.replace_at(self.index, value)?;
        self.map.tx().adopt(old)
    }

    /// Removes the entry; returns its value as an [`Owned`] value.
    pub fn remove_owned(self) -> Result<Owned<'h, V>> {
        let (_, v) = self.map.remove_at(self.index)?;
        self.map.tx().adopt(v)
    }
}

impl<K: Plain, V: Plain> OccupiedEntry<'_, '_, '_, K, V> {
    /// Replaces the value; returns the old one.
    pub fn insert(&mut self, value: V) -> Result<V> {
        self.map.replace_at(self.index, value)
    }

    /// Removes the entry; returns its value.
    pub fn remove(self) -> Result<V> {
        Ok(self.remove_entry()?.1)
    }

    /// Removes the entry; returns the stored key and the value.
    pub fn remove_entry(self) -> Result<(K, V)> {
        self.map.remove_at(self.index)
    }
}

impl<'a, 'h, K: Plain, V: Persist> VacantEntry<'a, '_, 'h, K, V> {
    /// The key it would insert.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// The key, back.
    pub fn into_key(self) -> K {
        self.key
    }

    /// Inserts `value` under the key (growing the table in this
    /// transaction if it is full); returns it, to change.
    pub fn insert(self, value: impl IntoPersist<V>) -> Result<Mut<'a, 'h, V>> {
        let VacantEntry { map, key, hash } = self;
        let value = map.tx().accept(value)?;
        let i = map.insert_new(hash, &key, value)?;
        map.value_mut_at(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_for_keeps_the_load_at_most_seven_eighths() {
        assert_eq!(slots_for(0), Some(8));
        assert_eq!(slots_for(7), Some(8));
        assert_eq!(slots_for(8), Some(16));
        assert_eq!(slots_for(14), Some(16));
        assert_eq!(slots_for(15), Some(32));
        assert_eq!(slots_for(usize::MAX), None);
    }

    #[test]
    fn geometry_has_no_overlap_and_aligns() {
        let g = geometry::<u8, u128>(8).unwrap();
        assert_eq!((g.key_off, g.val_off, g.val_end, g.stride), (1, 16, 32, 32));
        assert_eq!((g.layout.size(), g.layout.align()), (256, 16));
        let g = geometry::<u64, u64>(8).unwrap();
        assert_eq!((g.key_off, g.val_off, g.stride), (8, 16, 24));
        let g = geometry::<u8, u8>(8).unwrap();
        assert_eq!((g.key_off, g.val_off, g.stride), (1, 2, 3));
        let g = geometry::<[u8; 0], [u8; 0]>(8).unwrap();
        assert_eq!(g.layout.size(), 8);
        assert!(geometry::<u64, u64>(usize::MAX / 4).is_none());
    }
}
