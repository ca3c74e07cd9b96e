//! [`PBTreeMap`]: an ordered map in the heap, a B+-tree of fixed-size
//! node blocks.
//!
//! # Node layout
//!
//! Every node is one heap block, aligned to `ALIGN = max(8, align_of K,
//! align_of V)`, with `CAP = 32` slots. Offsets are computed from the key
//! and value types alone (so they are the same in every build and run; the
//! fingerprint mixes in both types and `CAP`):
//!
//! | bytes | leaf (level 0) | internal node (level ≥ 1) |
//! |---|---|---|
//! | `0..8` | `len`: keys in use (u64) | `len`: separators in use (u64) |
//! | `8..16` | `level` = 0 (u64) | `level` (u64), children are one lower |
//! | `KEYS..` | `CAP` keys (`KEYS` = 16 rounded up to `align_of K`) | `CAP` separator keys |
//! | after the keys | `CAP` values (rounded up to `align_of V`) | `CAP + 1` child addresses (u64, rounded up to 8) |
//!
//! Only the first `len` slots (`len + 1` children) hold values; the others
//! and any alignment gap are never read (nor logged).

use crate::error::{Error, Result};
use crate::owned::{IntoPersist, Owned};
use crate::persist::{bytes_of, fingerprint_mix, fingerprint_start, Persist, Plain};
use crate::shape::{Kind, ShapeId, Shapes};
use crate::tx::Mut;
use std::alloc::Layout;
use std::cmp::Ordering;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::ptr::NonNull;

/// Slots per node.
pub(crate) const CAP: usize = 32;

/// Where the parts of a node lie, from the key's and value's sizes and
/// alignments (the same numbers as `PBTreeMap`'s constants; used by the
/// tracer, which knows the types only by their shapes).
pub(crate) struct NodeLayout {
    pub(crate) vals: usize,
    pub(crate) kids: usize,
    pub(crate) leaf_size: usize,
    pub(crate) inner_size: usize,
    pub(crate) align: usize,
}

impl NodeLayout {
    pub(crate) fn new(ks: u64, ka: u64, vs: u64, va: u64) -> Option<NodeLayout> {
        let (ks, ka, vs, va) = (
            usize::try_from(ks).ok()?,
            usize::try_from(ka).ok()?,
            usize::try_from(vs).ok()?,
            usize::try_from(va).ok()?,
        );
        if ka == 0 || va == 0 {
            return None;
        }
        let up = |x: usize, a: usize| x.checked_next_multiple_of(a);
        let keys = up(16, ka)?;
        let keys_end = keys.checked_add(CAP.checked_mul(ks)?)?;
        let vals = up(keys_end, va)?;
        let kids = up(keys_end, 8)?;
        let leaf_size = vals.checked_add(CAP.checked_mul(vs)?)?;
        let inner_size = kids.checked_add((CAP + 1) * 8)?;
        Some(NodeLayout { vals, kids, leaf_size, inner_size, align: 8.max(ka).max(va) })
    }
}
/// Deepest tree the root check ([`crate::shape`]) accepts (a cycle or a damaged level
/// word cannot make a walk run forever; a real tree of `CAP = 32` slots
/// never gets near it).
pub(crate) const MAX_HEIGHT: u64 = 64;

/// The order of a [`PBTreeMap`]'s keys.
///
/// A map lives longer than the program that made it, so its order must be
/// the same in every build and every run: it is this trait, which the
/// crate implements for the integers (numeric order), `bool`, `char`,
/// floats (IEEE 754 `total_cmp`) and arrays of keys (lexicographic; so
/// `[u8; N]` is byte order), rather than `Ord` (a user type's `Ord` may
/// change between versions without anyone thinking of stored data).
///
/// For a type of your own, implement it as a total order that you will
/// not change:
///
/// ```
/// use rvm_collections::{btree_map::PKey, Persist};
/// use std::cmp::Ordering;
///
/// #[derive(Persist, Clone, Copy)]
/// #[repr(C)]
/// struct Date {
///     year: u16,
///     month: u8,
///     day: u8,
/// }
///
/// impl PKey for Date {
///     fn cmp_key(&self, other: &Self) -> Ordering {
///         (self.year, self.month, self.day).cmp(&(other.year, other.month, other.day))
///     }
/// }
/// ```
///
/// An order that is not total, or that changes, gives wrong answers (a key
/// not found, a range that skips keys), never undefined behaviour: the map
/// never trusts the order for memory safety.
pub trait PKey: Plain {
    /// Compares two keys.
    fn cmp_key(&self, other: &Self) -> Ordering;
}

macro_rules! ord_key {
    ($($t:ty),*) => {$(
        impl PKey for $t {
            fn cmp_key(&self, other: &Self) -> Ordering {
                self.cmp(other)
            }
        }
    )*};
}
ord_key!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, bool, char);

impl PKey for f32 {
    fn cmp_key(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
}

impl PKey for f64 {
    fn cmp_key(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
}

impl<T: PKey, const N: usize> PKey for [T; N] {
    fn cmp_key(&self, other: &Self) -> Ordering {
        for (a, b) in self.iter().zip(other) {
            match a.cmp_key(b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        Ordering::Equal
    }
}

/// An ordered map in the heap, like `std::collections::BTreeMap`, of
/// [`PKey`] keys and any [`Persist`] values.
///
/// A B+-tree of fixed-size node blocks (32 keys each; layout in the
/// [module docs](self)): an insert or a removal declares (logs) only the
/// bytes it changes in one leaf and, when a node splits or empties, in
/// the nodes on the path to the root — O(node size × height), never
/// O(len). The order is [`PKey`]'s, stable across builds.
///
/// Read it through any guard (`&PBTreeMap` gives `len`, `get`,
/// `first_key_value`, `last_key_value`, and `iter` and `range`, which run
/// from both ends), change it through its [`Mut`] guard in a write
/// transaction (`insert`, `remove`, `get_mut`, `get_or_insert_with`,
/// `pop_first`, `pop_last`, `retain`, `clear`; for values that own
/// blocks, `insert_owned`, `remove_owned`, `pop_first_owned`,
/// `pop_last_owned`).
///
/// ```
/// use rvm_collections::{Config, Error, PBTreeMap, PHeap};
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut m = tx.root_or_insert_with("prices", PBTreeMap::<u64, u64>::new)?;
///     for (k, v) in [(30, 3), (10, 1), (20, 2), (40, 4)] {
///         m.insert(k, v)?;
///     }
///     assert_eq!(m.insert(20, 22)?, Some(2));
///     assert_eq!(m.remove(&40)?, Some(4));
///     *m.get_mut(&10)?.unwrap() += 10;
///     Ok::<_, Error>(())
/// })?;
/// heap.read(|r| {
///     let m = r.root::<PBTreeMap<u64, u64>>("prices")?.unwrap();
///     assert_eq!(m.get(&20), Some(&22));
///     assert_eq!(m.first_key_value(), Some((&10, &11)));
///     let mid: Vec<(u64, u64)> = m.range(15..).map(|(k, v)| (*k, *v)).collect();
///     assert_eq!(mid, [(20, 22), (30, 3)]);
///     Ok::<_, Error>(())
/// })?;
/// # Ok::<(), Error>(())
/// ```
///
/// # Invariants and checks
///
/// All leaves are at the same depth (`height`); every leaf holds at least
/// one key, every internal node at least one child (an empty map has no
/// node). Removal rebalances lazily: nodes may be underfull; a node that
/// empties is freed and unlinked from its parent, and a root left with one
/// child is replaced by it.
///
/// the root check ([`crate::shape`]), which runs when a root is first borrowed after the
/// heap is opened (the heap remembers checked roots; see
/// [`crate::PHeap::raw_heap`] for when it stops), walks the whole tree:
/// each node must be a live block large enough and aligned, at its
/// expected level, with `len <= 32`, reached once only (no cycle, no
/// sharing), and the leaves' lengths must add up to `len`. That is
/// O(nodes), about `len / 16` block lookups: the price of reading nodes
/// with plain references afterwards. The key order is not checked (it
/// does not matter for memory safety).
#[repr(C)]
pub struct PBTreeMap<K, V> {
    root: u64,
    len: u64,
    height: u64,
    _kv: PhantomData<(K, V)>,
}

/// The entries, as a map in key order (as `BTreeMap` prints).
impl<K: PKey + std::fmt::Debug, V: Persist + std::fmt::Debug> std::fmt::Debug for PBTreeMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

const fn round_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// A node's address (validated by the root check ([`crate::shape`]), or made by the open
/// transaction).
type Node = usize;

impl<K: PKey, V: Persist> PBTreeMap<K, V> {
    const SK: usize = std::mem::size_of::<K>();
    const SV: usize = std::mem::size_of::<V>();
    const ALIGN: usize = max(8, max(std::mem::align_of::<K>(), std::mem::align_of::<V>()));
    const KEYS: usize = round_up(16, std::mem::align_of::<K>());
    const KEYS_END: usize = Self::KEYS + CAP * Self::SK;
    const VALS: usize = round_up(Self::KEYS_END, std::mem::align_of::<V>());
    const KIDS: usize = round_up(Self::KEYS_END, 8);
    const LEAF_SIZE: usize = Self::VALS + CAP * Self::SV;
    const INNER_SIZE: usize = Self::KIDS + (CAP + 1) * 8;

    /// An empty map (owns no block): the value to make a root with.
    pub fn new() -> Self {
        PBTreeMap { root: 0, len: 0, height: 0, _kv: PhantomData }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Levels of internal nodes above the leaves (0 for one leaf or none).
    pub fn height(&self) -> usize {
        self.height as usize
    }

    // Raw node access. Every `Node` passed to these is a node of this map:
    // checked by `check` when the root was borrowed, or written by this
    // map's methods in the open transaction, which keep the invariants
    // (`len <= CAP`, live block of the level's size, aligned).

    fn nlen(n: Node) -> usize {
        // SAFETY: `n` is a node (see above): a live block of at least 16
        // bytes, 8-aligned; word 0 is its length.
        let len = unsafe { *(n as *const u64) } as usize;
        // `check` bounds it; the clamp keeps every slot index in the block
        // even if a bug broke that.
        len.min(CAP)
    }

    fn key_ptr(n: Node, i: usize) -> usize {
        n + Self::KEYS + i * Self::SK
    }

    fn val_ptr(n: Node, i: usize) -> usize {
        n + Self::VALS + i * Self::SV
    }

    fn kid_ptr(n: Node, i: usize) -> usize {
        n + Self::KIDS + i * 8
    }

    fn key<'a>(n: Node, i: usize) -> &'a K {
        debug_assert!(i < Self::nlen(n));
        // SAFETY: slot `i < len` of node `n` holds a key written by a
        // committed transaction or this one; aligned by the layout; not
        // changed while the map is borrowed shared.
        unsafe { &*(Self::key_ptr(n, i) as *const K) }
    }

    fn val<'a>(n: Node, i: usize) -> &'a V {
        debug_assert!(i < Self::nlen(n));
        // SAFETY: as in `key`, for the value slot of a leaf.
        unsafe { &*(Self::val_ptr(n, i) as *const V) }
    }

    fn kid(n: Node, i: usize) -> Node {
        debug_assert!(i <= Self::nlen(n));
        // SAFETY: child slot `i <= len` of internal node `n`, 8-aligned.
        unsafe { *(Self::kid_ptr(n, i) as *const u64) as usize }
    }

    /// Bytes `[at, at + len)` of a node (initialised: written keys,
    /// values or child addresses).
    fn bytes<'a>(at: usize, len: usize) -> &'a [u8] {
        if len == 0 {
            return &[];
        }
        // SAFETY: callers pass whole slots below `len` (or `len + 1`
        // children) of a node: initialised bytes of `Plain` values in a
        // live block.
        unsafe { std::slice::from_raw_parts(at as *const u8, len) }
    }

    /// First slot of `n` whose key is not below `key` (`len` if none), and
    /// whether it equals `key`. Any order gives an index in `0..=len`.
    fn lower_bound(n: Node, key: &K) -> (usize, bool) {
        let (mut lo, mut hi) = (0, Self::nlen(n));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match Self::key(n, mid).cmp_key(key) {
                Ordering::Less => lo = mid + 1,
                _ => hi = mid,
            }
        }
        let eq = lo < Self::nlen(n) && Self::key(n, lo).cmp_key(key) == Ordering::Equal;
        (lo, eq)
    }

    /// Number of keys of `n` not above `key`: the child to descend into.
    fn upper_bound(n: Node, key: &K) -> usize {
        let (mut lo, mut hi) = (0, Self::nlen(n));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match Self::key(n, mid).cmp_key(key) {
                Ordering::Greater => hi = mid,
                _ => lo = mid + 1,
            }
        }
        lo
    }

    /// The leaf where `key` belongs, and the slot in it.
    fn find(&self, key: &K) -> Option<(Node, usize, bool)> {
        if self.root == 0 {
            return None;
        }
        let mut n = self.root as usize;
        for _ in 0..self.height {
            n = Self::kid(n, Self::upper_bound(n, key));
        }
        let (i, eq) = Self::lower_bound(n, key);
        Some((n, i, eq))
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        match self.find(key)? {
            (n, i, true) => Some(Self::val(n, i)),
            _ => None,
        }
    }

    /// The stored key equal to `key`, and its value.
    pub fn get_key_value(&self, key: &K) -> Option<(&K, &V)> {
        match self.find(key)? {
            (n, i, true) => Some((Self::key(n, i), Self::val(n, i))),
            _ => None,
        }
    }

    /// Whether `key` is in the map.
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// The leftmost (`last == false`) or rightmost leaf.
    fn edge_leaf(&self, last: bool) -> Option<Node> {
        if self.root == 0 {
            return None;
        }
        let mut n = self.root as usize;
        for _ in 0..self.height {
            n = Self::kid(n, if last { Self::nlen(n) } else { 0 });
        }
        Some(n)
    }

    /// The entry with the smallest key.
    pub fn first_key_value(&self) -> Option<(&K, &V)> {
        let n = self.edge_leaf(false)?;
        (Self::nlen(n) > 0).then(|| (Self::key(n, 0), Self::val(n, 0)))
    }

    /// The entry with the largest key.
    pub fn last_key_value(&self) -> Option<(&K, &V)> {
        let n = self.edge_leaf(true)?;
        let len = Self::nlen(n);
        (len > 0).then(|| (Self::key(n, len - 1), Self::val(n, len - 1)))
    }

    /// Iterates over the entries in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        self.range::<std::ops::RangeFull>(..)
    }

    /// Iterates over the keys in order (`.rev()` for the reverse).
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    /// Iterates over the values in key order (`.rev()` for the reverse).
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Iterates, in order, over the entries whose keys lie in `range`
    /// (`a..b`, `a..=b`, `a..`, `..b`, `..`, or a pair of [`Bound`]s). A
    /// range whose start is past its end is empty (`std` panics there).
    pub fn range<R: RangeBounds<K>>(&self, range: R) -> Iter<'_, K, V> {
        let end = match range.end_bound() {
            Bound::Included(k) => Bound::Included(Self::copy_key(k)),
            Bound::Excluded(k) => Bound::Excluded(Self::copy_key(k)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let start = match range.start_bound() {
            Bound::Included(k) => Bound::Included(Self::copy_key(k)),
            Bound::Excluded(k) => Bound::Excluded(Self::copy_key(k)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut it = Iter {
            stack: Vec::new(),
            leaf: None,
            end,
            left: self.len,
            height: self.height as usize,
            root: self.root as usize,
            start,
            back: None,
            front_last: None,
            back_last: None,
            _map: PhantomData,
        };
        if self.root == 0 {
            return it;
        }
        let mut n = self.root as usize;
        for _ in 0..self.height {
            let ci = match range.start_bound() {
                Bound::Included(k) | Bound::Excluded(k) => Self::upper_bound(n, k),
                Bound::Unbounded => 0,
            };
            it.stack.push((n, ci));
            n = Self::kid(n, ci);
        }
        let i = match range.start_bound() {
            Bound::Included(k) => Self::lower_bound(n, k).0,
            Bound::Excluded(k) => Self::upper_bound(n, k),
            Bound::Unbounded => 0,
        };
        it.leaf = Some((n, i));
        it
    }

    /// A bitwise copy of a key (for the range's end bound).
    fn copy_key(k: &K) -> Box<K> {
        // SAFETY: `K: Plain` owns nothing, so a bitwise copy is a valid,
        // independent value (any drop glue it has runs on plain bytes).
        Box::new(unsafe { std::ptr::read(k) })
    }
}

impl<K: PKey, V: Persist> Default for PBTreeMap<K, V> {
    fn default() -> Self {
        PBTreeMap::new()
    }
}

impl<'a, K: PKey, V: Persist> IntoIterator for &'a PBTreeMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// A cursor of an [`Iter`]: internal nodes from the root down with the
/// child being visited, and the leaf with a slot index (`None`: finished).
type Cursor = (Vec<(Node, usize)>, Option<(Node, usize)>);

/// An iterator over (a range of) a [`PBTreeMap`]'s entries, in key order;
/// from both ends (`.rev()`, `next_back`), as `BTreeMap`'s.
pub struct Iter<'a, K, V> {
    /// Internal nodes from the root down, with the child being visited.
    stack: Vec<(Node, usize)>,
    /// The leaf being visited and the next slot in it.
    leaf: Option<(Node, usize)>,
    end: Bound<Box<K>>,
    /// Entries the map holds: a bound on the iterations (both ends).
    left: u64,
    /// Levels of internal nodes.
    height: usize,
    /// The root (0: empty), where the back cursor starts its descent.
    root: Node,
    /// The range's start, which the back cursor stops before.
    start: Bound<Box<K>>,
    /// The back cursor, made at the first `next_back`: internal nodes from
    /// the root down with the child being visited, and the leaf with the
    /// number of its slots not yet passed from the back (`None` inside:
    /// finished).
    back: Option<Cursor>,
    /// The last keys yielded from the front and from the back: the two
    /// cursors stop where they would cross (keys are unique and ordered).
    front_last: Option<&'a K>,
    back_last: Option<&'a K>,
    _map: PhantomData<&'a PBTreeMap<K, V>>,
}

impl<K, V> std::fmt::Debug for Iter<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iter").finish_non_exhaustive()
    }
}

impl<'a, K: PKey, V: Persist> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (n, i) = self.leaf?;
            if i < PBTreeMap::<K, V>::nlen(n) {
                let k: &'a K = PBTreeMap::<K, V>::key(n, i);
                let past = match &self.end {
                    Bound::Included(e) => k.cmp_key(e) == Ordering::Greater,
                    Bound::Excluded(e) => k.cmp_key(e) != Ordering::Less,
                    Bound::Unbounded => false,
                };
                let crossed = self.back_last.is_some_and(|b| k.cmp_key(b) != Ordering::Less);
                if past || crossed || self.left == 0 {
                    self.leaf = None;
                    return None;
                }
                self.left -= 1;
                self.leaf = Some((n, i + 1));
                self.front_last = Some(k);
                return Some((k, PBTreeMap::<K, V>::val(n, i)));
            }
            // Next leaf: up to the first node with a child to the right,
            // then down its leftmost path.
            self.leaf = None;
            loop {
                let (p, ci) = self.stack.pop()?;
                if ci < PBTreeMap::<K, V>::nlen(p) {
                    self.stack.push((p, ci + 1));
                    let mut c = PBTreeMap::<K, V>::kid(p, ci + 1);
                    // Internal nodes down to the leaves' level.
                    while self.stack.len() < self.height {
                        self.stack.push((c, 0));
                        c = PBTreeMap::<K, V>::kid(c, 0);
                    }
                    self.leaf = Some((c, 0));
                    break;
                }
            }
        }
    }
}

impl<'a, K: PKey, V: Persist> Iter<'a, K, V> {
    /// The back cursor at the range's end: the leaf where the last key
    /// within the end bound lies, and the number of its keys within it.
    fn seek_back(&self) -> Cursor {
        type M<K, V> = PBTreeMap<K, V>;
        let mut stack = Vec::with_capacity(self.height);
        if self.root == 0 {
            return (stack, None);
        }
        let mut n = self.root;
        for _ in 0..self.height {
            // Keys not above the end lie in this child or the ones left of
            // it (a key equal to a separator lies right of it).
            let ci = match &self.end {
                Bound::Included(k) | Bound::Excluded(k) => M::<K, V>::upper_bound(n, k),
                Bound::Unbounded => M::<K, V>::nlen(n),
            };
            stack.push((n, ci));
            n = M::<K, V>::kid(n, ci);
        }
        let j = match &self.end {
            Bound::Included(k) => M::<K, V>::upper_bound(n, k),
            Bound::Excluded(k) => M::<K, V>::lower_bound(n, k).0,
            Bound::Unbounded => M::<K, V>::nlen(n),
        };
        (stack, Some((n, j)))
    }
}

impl<K: PKey, V: Persist> DoubleEndedIterator for Iter<'_, K, V> {
    fn next_back(&mut self) -> Option<Self::Item> {
        type M<K, V> = PBTreeMap<K, V>;
        if self.back.is_none() {
            self.back = Some(self.seek_back());
        }
        let (start, front_last, height) = (&self.start, self.front_last, self.height);
        let (stack, leaf) = self.back.as_mut()?;
        loop {
            let (n, j) = (*leaf)?;
            if j > 0 {
                let k = M::<K, V>::key(n, j - 1);
                let before = match start {
                    Bound::Included(s) => k.cmp_key(s) == Ordering::Less,
                    Bound::Excluded(s) => k.cmp_key(s) != Ordering::Greater,
                    Bound::Unbounded => false,
                };
                let crossed = front_last.is_some_and(|f| k.cmp_key(f) != Ordering::Greater);
                if before || crossed || self.left == 0 {
                    *leaf = None;
                    return None;
                }
                self.left -= 1;
                *leaf = Some((n, j - 1));
                self.back_last = Some(k);
                return Some((k, M::<K, V>::val(n, j - 1)));
            }
            // The previous leaf: up to the first node with a child to the
            // left, then down its rightmost path.
            *leaf = None;
            loop {
                let (p, ci) = stack.pop()?;
                if ci > 0 {
                    stack.push((p, ci - 1));
                    let mut c = M::<K, V>::kid(p, ci - 1);
                    while stack.len() < height {
                        let l = M::<K, V>::nlen(c);
                        stack.push((c, l));
                        c = M::<K, V>::kid(c, l);
                    }
                    *leaf = Some((c, M::<K, V>::nlen(c)));
                    break;
                }
            }
        }
    }
}

impl<K: PKey, V: Persist> std::iter::FusedIterator for Iter<'_, K, V> {}

// SAFETY: three words, `#[repr(C)]`, no padding; `root` is a heap block
// (an address in the heap, which loads at a fixed base) and so is every
// node below it; the fingerprint mixes in the key and value types' layout
// ids and the node capacity, which fix the node layout; `describe`
// reports the tree.
unsafe impl<K: PKey, V: Persist> Persist for PBTreeMap<K, V> {
    const FINGERPRINT: u64 = fingerprint_mix(
        fingerprint_mix(
            fingerprint_mix(fingerprint_mix(fingerprint_start(24, 8), K::LAYOUT_ID), V::LAYOUT_ID),
            CAP as u64,
        ),
        71,
    );
    const LAYOUT_ID: u64 = fingerprint_mix(fingerprint_start(24, 8), 74);
    const OWNS_BLOCKS: bool = true;

    fn describe(shapes: &mut Shapes) -> ShapeId {
        shapes.define::<Self>(|s| Kind::BTreeMap {
            key_size: std::mem::size_of::<K>() as u64,
            key_align: std::mem::align_of::<K>() as u64,
            value: V::describe(s),
        })
    }
}

impl<K: PKey, V: Persist> PBTreeMap<K, V> {
    /// Every node, in no particular order.
    fn nodes(&self) -> Vec<Node> {
        let mut out = Vec::new();
        if self.root == 0 {
            return out;
        }
        let mut stack = vec![(self.root as usize, self.height)];
        while let Some((n, level)) = stack.pop() {
            out.push(n);
            if level > 0 {
                for i in 0..=Self::nlen(n) {
                    stack.push((Self::kid(n, i), level - 1));
                }
            }
        }
        out
    }
}

impl<'t, 'h, K: PKey, V: Persist> Mut<'t, 'h, PBTreeMap<K, V>> {
    fn map(&self) -> &PBTreeMap<K, V> {
        self
    }

    fn set_header(&mut self, root: Node, len: u64, height: u64) {
        // The header was declared when the root was borrowed.
        let m = self.value_mut();
        (m.root, m.len, m.height) = (root as u64, len, height);
    }

    /// Declares `len` bytes at `at` (nothing if empty).
    fn declare(&self, at: usize, len: usize) -> Result<()> {
        match NonNull::new(at as *mut u8) {
            Some(p) if len > 0 => self.tx().declare(p, len),
            _ => Ok(()),
        }
    }

    /// Declares and stores `bytes` at `at`.
    fn store(&self, at: usize, bytes: &[u8]) -> Result<()> {
        let Some(p) = NonNull::new(at as *mut u8) else { return Err(Error::Damaged { name: "PBTreeMap".into() }) };
        if bytes.is_empty() {
            return Ok(());
        }
        // SAFETY: `at` lies in a node of this map (or one this transaction
        // allocated); the guard is exclusive and the writer lock holds
        // other threads off; no reference into the node is alive (reads
        // borrow the guard, which this method borrows).
        self.tx().with_htx(|htx| unsafe { Ok(htx.write(p, bytes)?) })
    }

    fn set_len(&self, n: Node, len: usize) -> Result<()> {
        self.store(n, &(len as u64).to_ne_bytes())
    }

    /// Moves `count` slots of `size` bytes from slot `from` to slot `to`
    /// of the array at `base`, declaring the destination first.
    fn shift(&self, base: usize, size: usize, from: usize, to: usize, count: usize) -> Result<()> {
        if count == 0 || size == 0 {
            return Ok(());
        }
        self.declare(base + to * size, count * size)?;
        // SAFETY: both ranges lie in the same node's array (callers keep
        // `from + count` and `to + count` within `CAP` slots, `CAP + 1`
        // for children); the destination is declared; no reference into
        // the node is alive.
        unsafe { std::ptr::copy((base + from * size) as *const u8, (base + to * size) as *mut u8, count * size) };
        Ok(())
    }

    /// A new node: header, `len` keys and the values (leaf) or `len + 1`
    /// children (internal) written, the rest of the block left unwritten.
    fn alloc_node(&self, level: u64, len: usize, keys: &[u8], second: &[u8]) -> Result<Node> {
        let size = if level == 0 { PBTreeMap::<K, V>::LEAF_SIZE } else { PBTreeMap::<K, V>::INNER_SIZE };
        let layout = Layout::from_size_align(size, PBTreeMap::<K, V>::ALIGN)
            .map_err(|_| Error::Heap(rvm_heap::HeapError::BadLayout { size, align: PBTreeMap::<K, V>::ALIGN }))?;
        let n = self.tx().with_htx(|htx| Ok(htx.malloc(layout)?))?.as_ptr() as usize;
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&(len as u64).to_ne_bytes());
        head[8..].copy_from_slice(&level.to_ne_bytes());
        self.store(n, &head)?;
        self.store(n + PBTreeMap::<K, V>::KEYS, keys)?;
        let second_at = if level == 0 { PBTreeMap::<K, V>::VALS } else { PBTreeMap::<K, V>::KIDS };
        self.store(n + second_at, second)?;
        Ok(n)
    }

    fn free(&self, n: Node) -> Result<()> {
        let p = NonNull::new(n as *mut u8).ok_or(Error::Damaged { name: "PBTreeMap".into() })?;
        self.tx().with_htx(|htx| Ok(htx.free(p)?))
    }

    /// Inserts `key` with the bytes of `value`; returns the value it
    /// replaces (the stored key stays, as in `std`). On `Ok`, `value`'s
    /// bytes are in the map (the caller forgets it).
    fn insert_raw(&mut self, key: &K, value: &V) -> Result<Option<V>> {
        type M<K, V> = PBTreeMap<K, V>;
        let (sk, sv) = (M::<K, V>::SK, M::<K, V>::SV);
        let (root, len, height) = (self.map().root as usize, self.map().len, self.map().height);
        if root == 0 {
            let leaf = self.alloc_node(0, 1, bytes_of(key), bytes_of(value))?;
            self.set_header(leaf, 1, 0);
            return Ok(None);
        }
        let mut path = Vec::with_capacity(height as usize);
        let mut n = root;
        for _ in 0..height {
            let ci = M::<K, V>::upper_bound(n, key);
            path.push((n, ci));
            n = M::<K, V>::kid(n, ci);
        }
        let (i, eq) = M::<K, V>::lower_bound(n, key);
        if eq {
            // SAFETY: slot `i` holds a valid value; it is overwritten next
            // (the old one moves out, as in `PVec::set`).
            let old = unsafe { std::ptr::read(M::<K, V>::val_ptr(n, i) as *const V) };
            self.store(M::<K, V>::val_ptr(n, i), bytes_of(value))?;
            return Ok(Some(old));
        }
        let l = M::<K, V>::nlen(n);
        if l < CAP {
            self.shift(n + M::<K, V>::KEYS, sk, i, i + 1, l - i)?;
            self.shift(n + M::<K, V>::VALS, sv, i, i + 1, l - i)?;
            self.store(M::<K, V>::key_ptr(n, i), bytes_of(key))?;
            self.store(M::<K, V>::val_ptr(n, i), bytes_of(value))?;
            self.set_len(n, l + 1)?;
            self.set_header(root, len + 1, height);
            return Ok(None);
        }
        // Split the full leaf: CAP + 1 entries, the first `m` stay.
        let keys = M::<K, V>::bytes(n + M::<K, V>::KEYS, CAP * sk);
        let vals = M::<K, V>::bytes(n + M::<K, V>::VALS, CAP * sv);
        let kb = [&keys[..i * sk], bytes_of(key), &keys[i * sk..]].concat();
        let vb = [&vals[..i * sv], bytes_of(value), &vals[i * sv..]].concat();
        let m = CAP.div_ceil(2);
        let right = self.alloc_node(0, CAP + 1 - m, &kb[m * sk..], &vb[m * sv..])?;
        let s = i.min(m);
        self.store(M::<K, V>::key_ptr(n, s), &kb[s * sk..m * sk])?;
        self.store(M::<K, V>::val_ptr(n, s), &vb[s * sv..m * sv])?;
        self.set_len(n, m)?;
        let mut sep = kb[m * sk..(m + 1) * sk].to_vec();
        let mut new = right;
        // Insert (sep, new) into the parents, splitting full ones.
        while let Some((p, ci)) = path.pop() {
            let pl = M::<K, V>::nlen(p);
            if pl < CAP {
                self.shift(p + M::<K, V>::KEYS, sk, ci, ci + 1, pl - ci)?;
                self.shift(p + M::<K, V>::KIDS, 8, ci + 1, ci + 2, pl - ci)?;
                self.store(M::<K, V>::key_ptr(p, ci), &sep)?;
                self.store(M::<K, V>::kid_ptr(p, ci + 1), &(new as u64).to_ne_bytes())?;
                self.set_len(p, pl + 1)?;
                self.set_header(root, len + 1, height);
                return Ok(None);
            }
            // CAP + 1 separators and CAP + 2 children: the first `m`
            // separators and `m + 1` children stay, separator `m` goes up.
            let keys = M::<K, V>::bytes(p + M::<K, V>::KEYS, CAP * sk);
            let kids = M::<K, V>::bytes(p + M::<K, V>::KIDS, (CAP + 1) * 8);
            let kb = [&keys[..ci * sk], &sep, &keys[ci * sk..]].concat();
            let cb = [&kids[..(ci + 1) * 8], &(new as u64).to_ne_bytes(), &kids[(ci + 1) * 8..]].concat();
            let m = CAP / 2;
            // SAFETY: an internal node's level word (see `nlen`).
            let level = unsafe { *((p + 8) as *const u64) };
            let right = self.alloc_node(level, CAP - m, &kb[(m + 1) * sk..], &cb[(m + 1) * 8..])?;
            let s = ci.min(m);
            self.store(M::<K, V>::key_ptr(p, s), &kb[s * sk..m * sk])?;
            let s = (ci + 1).min(m + 1);
            self.store(M::<K, V>::kid_ptr(p, s), &cb[s * 8..(m + 1) * 8])?;
            self.set_len(p, m)?;
            sep = kb[m * sk..(m + 1) * sk].to_vec();
            new = right;
        }
        // The root split: a new root above it.
        let kids = [(root as u64).to_ne_bytes(), (new as u64).to_ne_bytes()].concat();
        let new_root = self.alloc_node(height + 1, 1, &sep, &kids)?;
        self.set_header(new_root, len + 1, height + 1);
        Ok(None)
    }

    /// Inserts `value` (taken for storing) under `key`.
    fn put(&mut self, key: K, value: impl IntoPersist<V>) -> Result<Option<V>> {
        let value = self.tx().accept(value)?;
        match self.insert_raw(&key, &value) {
            Ok(old) => {
                // Moved into the heap.
                std::mem::forget(value);
                Ok(old)
            }
            Err(e) => {
                self.tx().float(&value);
                Err(e)
            }
        }
    }

    /// Inserts `value` under `key`; returns the value it replaces as an
    /// [`Owned`] value (dropping it frees what it owns).
    pub fn insert_owned(&mut self, key: K, value: impl IntoPersist<V>) -> Result<Option<Owned<'h, V>>> {
        match self.put(key, value)? {
            Some(old) => self.tx().adopt(old).map(Some),
            None => Ok(None),
        }
    }

    /// Removes slot `i` of `leaf` (reached by `path`, the internal nodes
    /// from the root with the child taken) and returns its key and value.
    fn remove_at(&mut self, mut path: Vec<(Node, usize)>, leaf: Node, i: usize) -> Result<(K, V)> {
        type M<K, V> = PBTreeMap<K, V>;
        let (sk, sv) = (M::<K, V>::SK, M::<K, V>::SV);
        let (mut root, len, mut height) = (self.map().root as usize, self.map().len, self.map().height);
        // SAFETY: slot `i < len` holds a valid key and value; they move out
        // here and the slot leaves the leaf below (shifted over, or the
        // leaf freed).
        let (k, v) = unsafe {
            (
                std::ptr::read(M::<K, V>::key_ptr(leaf, i) as *const K),
                std::ptr::read(M::<K, V>::val_ptr(leaf, i) as *const V),
            )
        };
        let l = M::<K, V>::nlen(leaf);
        if l > 1 {
            self.shift(leaf + M::<K, V>::KEYS, sk, i + 1, i, l - i - 1)?;
            self.shift(leaf + M::<K, V>::VALS, sv, i + 1, i, l - i - 1)?;
            self.set_len(leaf, l - 1)?;
            self.set_header(root, len - 1, height);
            return Ok((k, v));
        }
        // The leaf empties: unlink it (and any parent left without
        // children) from the tree, then free what was unlinked. Frees come
        // last: if a store fails (an error the caller should answer by
        // aborting), no node the map still reaches has been freed.
        let mut unlinked = vec![leaf];
        loop {
            let Some((p, ci)) = path.pop() else {
                // The root itself emptied: so did the map.
                self.set_header(0, 0, 0);
                break;
            };
            let pl = M::<K, V>::nlen(p);
            if pl == 0 {
                unlinked.push(p);
                continue;
            }
            let ki = ci.saturating_sub(1);
            self.shift(p + M::<K, V>::KEYS, sk, ki + 1, ki, pl - ki - 1)?;
            self.shift(p + M::<K, V>::KIDS, 8, ci + 1, ci, pl - ci)?;
            self.set_len(p, pl - 1)?;
            // A root left with one child gives way to it.
            while height > 0 && M::<K, V>::nlen(root) == 0 {
                unlinked.push(root);
                root = M::<K, V>::kid(root, 0);
                height -= 1;
            }
            self.set_header(root, len - 1, height);
            break;
        }
        for n in unlinked {
            self.free(n)?;
        }
        Ok((k, v))
    }

    /// Removes `key`; moves its entry out.
    fn take(&mut self, key: &K) -> Result<Option<(K, V)>> {
        type M<K, V> = PBTreeMap<K, V>;
        let Some((path, n)) = self.descend(|n| M::<K, V>::upper_bound(n, key)) else { return Ok(None) };
        match M::<K, V>::lower_bound(n, key) {
            (i, true) => self.remove_at(path, n, i).map(Some),
            _ => Ok(None),
        }
    }

    /// Keeps only the entries for which `keep` returns `true` (as
    /// `BTreeMap::retain`, but `keep` sees the value by `&`: change values
    /// through [`get_mut`](Self::get_mut)); the others are removed and
    /// their values dropped (what they own is freed in this transaction).
    /// `keep` sees every entry once, in key order, before anything
    /// changes.
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PBTreeMap, PHeap};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut m = tx.root_or_insert_with("m", PBTreeMap::<u32, u64>::new)?;
    ///     for i in 0..100 {
    ///         m.insert(i, u64::from(i))?;
    ///     }
    ///     m.retain(|k, _| k % 10 == 0)?;
    ///     assert_eq!(m.keys().copied().collect::<Vec<_>>(), [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]);
    ///     Ok::<_, Error>(())
    /// })?;
    /// # Ok::<(), Error>(())
    /// ```
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) -> Result<()> {
        let doomed: Vec<Box<K>> =
            self.map().iter().filter(|(k, v)| !keep(k, v)).map(|(k, _)| PBTreeMap::<K, V>::copy_key(k)).collect();
        for k in doomed {
            if let Some((_, v)) = self.take(&k)? {
                drop(self.tx().adopt(v)?);
            }
        }
        Ok(())
    }

    /// Removes `key`; returns its value as an [`Owned`] value.
    pub fn remove_owned(&mut self, key: &K) -> Result<Option<Owned<'h, V>>> {
        match self.take(key)? {
            Some((_, v)) => self.tx().adopt(v).map(Some),
            None => Ok(None),
        }
    }

    /// The path from the root to a leaf, taking child `choose(node)` at
    /// each internal node: the (node, child index) pairs and the leaf;
    /// `None` for an empty map.
    fn descend(&self, mut choose: impl FnMut(usize) -> usize) -> Option<(Vec<(usize, usize)>, usize)> {
        let (root, height) = (self.map().root as usize, self.map().height);
        if root == 0 {
            return None;
        }
        let mut path = Vec::with_capacity(height as usize);
        let mut n = root;
        for _ in 0..height {
            let ci = choose(n);
            path.push((n, ci));
            n = PBTreeMap::<K, V>::kid(n, ci);
        }
        Some((path, n))
    }

    /// Removes and returns the entry with the smallest (`last == false`)
    /// or largest key.
    fn pop_edge(&mut self, last: bool) -> Result<Option<(K, V)>> {
        type M<K, V> = PBTreeMap<K, V>;
        let Some((path, n)) = self.descend(|n| if last { M::<K, V>::nlen(n) } else { 0 }) else { return Ok(None) };
        let l = M::<K, V>::nlen(n);
        if l == 0 {
            return Err(Error::Damaged { name: "PBTreeMap".into() });
        }
        self.remove_at(path, n, if last { l - 1 } else { 0 }).map(Some)
    }

    /// Removes the entry with the smallest key; returns the key and the
    /// value as an [`Owned`] value.
    pub fn pop_first_owned(&mut self) -> Result<Option<(K, Owned<'h, V>)>> {
        match self.pop_edge(false)? {
            Some((k, v)) => Ok(Some((k, self.tx().adopt(v)?))),
            None => Ok(None),
        }
    }

    /// Removes the entry with the largest key; returns the key and the
    /// value as an [`Owned`] value.
    pub fn pop_last_owned(&mut self) -> Result<Option<(K, Owned<'h, V>)>> {
        match self.pop_edge(true)? {
            Some((k, v)) => Ok(Some((k, self.tx().adopt(v)?))),
            None => Ok(None),
        }
    }

    /// The value of `key`, to change (its bytes are declared).
    pub fn get_mut(&mut self, key: &K) -> Result<Option<Mut<'_, 'h, V>>> {
        let Some((n, i, true)) = self.map().find(key) else { return Ok(None) };
        let at = PBTreeMap::<K, V>::val_ptr(n, i);
        // SAFETY: slot `i < len` of a leaf of this map holds a valid value
        // this map owns, reachable only through this guard.
        unsafe { self.child::<V>(at) }.map(Some)
    }

    /// The value of `key`, inserted as `make()` if it has none.
    pub fn get_or_insert_with<I: IntoPersist<V>>(
        &mut self,
        key: K,
        make: impl FnOnce() -> I,
    ) -> Result<Mut<'_, 'h, V>> {
        if self.map().get(&key).is_none() {
            self.put(*PBTreeMap::<K, V>::copy_key(&key), make())?;
        }
        match self.get_mut(&key)? {
            Some(v) => Ok(v),
            None => Err(Error::Damaged { name: "PBTreeMap".into() }),
        }
    }

    /// Removes every entry and frees every node (at commit).
    ///
    /// Like every method here, on `Err` the change may be half made: let
    /// the error end the transaction (the closure returns it, which
    /// aborts). Committing anyway may leave wrong answers or leaked
    /// nodes, never a freed node reachable from the map.
    pub fn clear(&mut self) -> Result<()> {
        if V::OWNS_BLOCKS {
            let values: Vec<usize> = self.map().iter().map(|(_, v)| v as *const V as usize).collect();
            for at in values {
                self.tx().drop_value::<V>(at)?;
            }
        }
        let nodes = self.map().nodes();
        // Unlinked first: a failing free leaves leaked nodes at worst,
        // never a freed one the map still reaches.
        self.set_header(0, 0, 0);
        for n in nodes {
            self.free(n)?;
        }
        Ok(())
    }
}

/// By value, for values that own nothing.
impl<K: PKey, V: Plain> Mut<'_, '_, PBTreeMap<K, V>> {
    /// Inserts `key` with `value`; returns the value it replaces (the
    /// stored key stays, as in `std`).
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

    /// Removes and returns the entry with the smallest key.
    pub fn pop_first(&mut self) -> Result<Option<(K, V)>> {
        self.pop_edge(false)
    }

    /// Removes and returns the entry with the largest key.
    pub fn pop_last(&mut self) -> Result<Option<(K, V)>> {
        self.pop_edge(true)
    }
}
