//! Shapes: where a [`Persist`] type's pointers are, as data.
//!
//! Every `Persist` type describes itself ([`Persist::describe`]) as a small
//! table of [`Def`]s: plain bytes, a struct with the offsets of its fields
//! that hold pointers, an array, a [`crate::PBox`], a [`crate::PVec`], a
//! [`crate::PHashMap`] or a [`crate::PBTreeMap`]. One tracer
//! (the tracer) walks a value by its shape, without recursion (a list a
//! million boxes long is a loop, not a million stack frames), checking every
//! pointer against the heap as it goes: each must be a live block, aligned
//! and large enough, with lengths and capacities that agree, and owned
//! once (no sharing, no cycle). It serves three callers:
//!
//! - a root's first borrow checks its value ([`crate::WriteTx::root`]);
//! - dropping or removing a value frees every block it owns;
//! - [`crate::PHeap::check`] and `rvmutl heap check` find blocks no root
//!   reaches (leaks). For that the typed layer keeps the shapes of its
//!   roots' types in the heap itself (root [`SHAPES_ROOT`], encoded as
//!   below), so a program that does not know the types can still walk
//!   them.
//!
//! # Stored form (root `rvm:shapes`)
//!
//! Little-endian. `b"rvmshape"`, `version: u32 = 1`, `defs: u32`,
//! `roots: u32`; then each def: `kind: u8`, `size: u64`, `align: u64`,
//! and by kind: 0 plain (nothing), 1 struct (`fields: u32`, then `offset:
//! u64, def: u32` each), 2 array (`len: u64, elem: u32`), 3 box (`target:
//! u32, nullable: u8`), 4 vec (`elem: u32, utf8: u8`), 5 hash map and 6
//! B-tree map (`key_size: u64, key_align: u64, value: u32`); then each
//! root type: `fingerprint: u64, def: u32`; then the CRC32C of everything
//! before it (`u32`). A decoded table is checked before use: indices in
//! range, sizes and alignments that agree, fields inside their struct, no
//! type containing itself inline.

use crate::persist::Persist;
use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::ptr::NonNull;
use std::sync::Arc;

/// The heap root under which the typed layer keeps its roots' shapes.
/// Root names starting with `rvm:` are reserved.
pub const SHAPES_ROOT: &str = "rvm:shapes";

/// Index of a [`Def`] in a [`Shapes`] table.
pub type ShapeId = u32;

/// One type's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Def {
    /// `size_of` the type.
    pub size: u64,
    /// `align_of` the type.
    pub align: u64,
    /// Where its pointers are.
    pub kind: Kind,
}

/// What a type is, as far as its pointers go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bytes without pointers.
    Plain,
    /// A struct; the fields that hold pointers, by offset.
    Struct(Vec<(u64, ShapeId)>),
    /// `len` values of `elem`, back to back.
    Array {
        /// Elements.
        len: u64,
        /// Their type.
        elem: ShapeId,
    },
    /// A [`crate::PBox`] (one word: the target's address), or an
    /// `Option<PBox>` (`nullable`: 0 is `None`).
    Box {
        /// The boxed type.
        target: ShapeId,
        /// Whether 0 is allowed.
        nullable: bool,
    },
    /// A [`crate::PVec`] (`ptr, len, cap` words), or a [`crate::PString`]
    /// (`utf8`: its bytes are UTF-8).
    Vec {
        /// The element type.
        elem: ShapeId,
        /// Whether the bytes must be UTF-8.
        utf8: bool,
    },
    /// A [`crate::PHashMap`] (`ptr, len, cap, deleted` words).
    HashMap {
        /// Key size.
        key_size: u64,
        /// Key alignment.
        key_align: u64,
        /// The value type.
        value: ShapeId,
    },
    /// A [`crate::PBTreeMap`] (`root, len, height` words).
    BTreeMap {
        /// Key size.
        key_size: u64,
        /// Key alignment.
        key_align: u64,
        /// The value type.
        value: ShapeId,
    },
}

/// A table of [`Def`]s: the shapes of one or more types.
#[derive(Clone, Debug, Default)]
pub struct Shapes {
    defs: Vec<Def>,
    /// Types described so far (building only).
    index: HashMap<TypeId, ShapeId>,
    /// Whether a value of each def may hold a pointer (filled by
    /// [`Shapes::finish`]).
    owns: Vec<bool>,
}

impl Shapes {
    /// The def of `T` if described already, else a new one whose kind
    /// `make` computes (which may describe other types, and `T` itself
    /// again: that finds the def being made, so a type may point at
    /// itself).
    pub fn define<T: 'static>(&mut self, make: impl FnOnce(&mut Shapes) -> Kind) -> ShapeId {
        if let Some(&id) = self.index.get(&TypeId::of::<T>()) {
            return id;
        }
        let id = self.defs.len() as ShapeId;
        self.defs.push(Def {
            size: std::mem::size_of::<T>() as u64,
            align: std::mem::align_of::<T>() as u64,
            kind: Kind::Plain,
        });
        self.index.insert(TypeId::of::<T>(), id);
        let kind = make(self);
        self.defs[id as usize].kind = kind;
        id
    }

    /// The def of `T` as plain bytes.
    pub fn plain<T: 'static>(&mut self) -> ShapeId {
        self.define::<T>(|_| Kind::Plain)
    }

    /// The defs.
    pub fn defs(&self) -> &[Def] {
        &self.defs
    }

    /// Computes which defs may hold pointers.
    fn finish(mut self) -> Self {
        let n = self.defs.len();
        let mut owns: Vec<bool> = self
            .defs
            .iter()
            .map(|d| {
                matches!(d.kind, Kind::Box { .. } | Kind::Vec { .. } | Kind::HashMap { .. } | Kind::BTreeMap { .. })
            })
            .collect();
        // Inline containment is acyclic (checked on decode, true by
        // construction for Rust types), so `n` rounds reach the fixpoint.
        for _ in 0..n {
            let mut changed = false;
            for i in 0..n {
                if owns[i] {
                    continue;
                }
                let o = match &self.defs[i].kind {
                    Kind::Struct(fields) => fields.iter().any(|&(_, f)| owns[f as usize]),
                    Kind::Array { len, elem } => *len > 0 && owns[*elem as usize],
                    _ => false,
                };
                if o {
                    owns[i] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        self.owns = owns;
        self
    }

    fn owns(&self, id: ShapeId) -> bool {
        self.owns.get(id as usize).copied().unwrap_or(false)
    }

    fn def(&self, id: ShapeId) -> &Def {
        &self.defs[id as usize]
    }
}

/// The shape of one type: a table and the def of the type in it.
#[derive(Debug)]
pub struct TypeShape {
    pub(crate) shapes: Shapes,
    pub(crate) root: ShapeId,
}

impl TypeShape {
    /// Whether a value of the type may own blocks.
    pub(crate) fn owns(&self) -> bool {
        self.shapes.owns(self.root)
    }
}

/// The shape of `T` (built once per type and process).
pub fn shape_of<T: Persist>() -> Arc<TypeShape> {
    static CACHE: parking_lot::RwLock<Option<HashMap<TypeId, Arc<TypeShape>>>> = parking_lot::RwLock::new(None);
    if let Some(s) = CACHE.read().as_ref().and_then(|c| c.get(&TypeId::of::<T>())) {
        return s.clone();
    }
    let mut shapes = Shapes::default();
    let root = T::describe(&mut shapes);
    let shape = Arc::new(TypeShape { shapes: shapes.finish(), root });
    CACHE.write().get_or_insert_with(HashMap::new).insert(TypeId::of::<T>(), shape.clone());
    shape
}

/// Why a traced value is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} at {at:#x}")]
pub struct TraceError {
    /// What is wrong.
    pub what: &'static str,
    /// The address of the pointer or header.
    pub at: usize,
}

fn bad(what: &'static str, at: usize) -> TraceError {
    TraceError { what, at }
}

/// A walk over the blocks values own.
pub(crate) struct Tracer<'a> {
    heap: &'a rvm_heap::Heap,
    /// Every block reached (each once: a second arrival is sharing or a
    /// cycle, refused).
    pub(crate) blocks: Vec<usize>,
    seen: HashSet<usize>,
    /// Values still to visit: address, def, how many back to back.
    work: Vec<(usize, ShapeId, u64)>,
    /// Whether to check that string bytes are UTF-8.
    check_utf8: bool,
    /// Whether only committed blocks count as live (not those the calling
    /// thread's open transaction allocated): for values no transaction
    /// has changed yet.
    committed_only: bool,
}

impl<'a> Tracer<'a> {
    pub(crate) fn new(heap: &'a rvm_heap::Heap) -> Self {
        Tracer {
            heap,
            blocks: Vec::new(),
            seen: HashSet::new(),
            work: Vec::new(),
            check_utf8: true,
            committed_only: false,
        }
    }

    /// Counts only committed blocks as live (see `committed_only`).
    pub(crate) fn committed_only(mut self) -> Self {
        self.committed_only = true;
        self
    }

    /// Marks `addrs` as reached already (blocks a value must not point at:
    /// a root's own block, for instance).
    pub(crate) fn exclude(&mut self, addrs: impl IntoIterator<Item = usize>) {
        self.seen.extend(addrs);
    }

    /// Traces the value of def `root` of `shapes` at `addr` (whose own
    /// bytes the caller vouches for: a live block or a slot in one).
    pub(crate) fn trace(&mut self, shapes: &Shapes, root: ShapeId, addr: usize) -> Result<(), TraceError> {
        if !shapes.owns(root) {
            return Ok(());
        }
        self.work.push((addr, root, 1));
        while let Some((at, id, count)) = self.work.pop() {
            let def = shapes.def(id);
            for k in 0..count {
                let v = at + (k as usize) * def.size as usize;
                self.value(shapes, def, v)?;
            }
        }
        Ok(())
    }

    /// Records block `p` (a value's pointer found at `at`), which must be
    /// live, aligned to `align` and at least `len` bytes, and reached for
    /// the first time.
    fn block(&mut self, p: u64, len: u64, align: u64, at: usize) -> Result<usize, TraceError> {
        let addr = usize::try_from(p).map_err(|_| bad("pointer out of range", at))?;
        let ptr = NonNull::new(addr as *mut u8).ok_or_else(|| bad("null pointer", at))?;
        if align == 0 || !p.is_multiple_of(align) {
            return Err(bad("misaligned pointer", at));
        }
        let live = if self.committed_only { self.heap.committed_block_len(ptr) } else { self.heap.live_block_len(ptr) };
        if live.is_none_or(|l| l < len) {
            return Err(bad("pointer to no live block of the size needed", at));
        }
        if !self.seen.insert(addr) {
            return Err(bad("a block owned twice (shared, or a cycle)", at));
        }
        self.blocks.push(addr);
        Ok(addr)
    }

    fn value(&mut self, shapes: &Shapes, def: &Def, v: usize) -> Result<(), TraceError> {
        match &def.kind {
            Kind::Plain => {}
            Kind::Struct(fields) => {
                for &(off, f) in fields {
                    if shapes.owns(f) {
                        self.work.push((v + off as usize, f, 1));
                    }
                }
            }
            Kind::Array { len, elem } => {
                if shapes.owns(*elem) {
                    self.work.push((v, *elem, *len));
                }
            }
            Kind::Box { target, nullable } => {
                // SAFETY: `v` is a value of this def inside a block or slot
                // the caller (or an earlier step) checked to be live and
                // large enough; a box is one word.
                let p = unsafe { crate::raw::read_word(v, 0) };
                if p == 0 {
                    return if *nullable { Ok(()) } else { Err(bad("null box", v)) };
                }
                let t = shapes.def(*target);
                let addr = self.block(p, t.size, t.align, v)?;
                if shapes.owns(*target) {
                    self.work.push((addr, *target, 1));
                }
            }
            Kind::Vec { elem, utf8 } => {
                // SAFETY: as for a box: three words of a checked value.
                let (ptr, len, cap) =
                    unsafe { (crate::raw::read_word(v, 0), crate::raw::read_word(v, 1), crate::raw::read_word(v, 2)) };
                if len > cap {
                    return Err(bad("vector length past its capacity", v));
                }
                if cap == 0 {
                    return if ptr == 0 { Ok(()) } else { Err(bad("vector without capacity with a buffer", v)) };
                }
                let e = shapes.def(*elem);
                let bytes = cap.checked_mul(e.size).ok_or_else(|| bad("vector capacity overflows", v))?;
                let addr = self.block(ptr, bytes, e.align, v)?;
                if *utf8 && self.check_utf8 {
                    // SAFETY: `len <= cap` bytes of the live block checked
                    // just above.
                    let b = unsafe { crate::raw::slice::<u8>(addr, len as usize) };
                    if std::str::from_utf8(b).is_err() {
                        return Err(bad("string bytes that are not UTF-8", v));
                    }
                }
                if shapes.owns(*elem) {
                    self.work.push((addr, *elem, len));
                }
            }
            Kind::HashMap { key_size, key_align, value } => {
                // SAFETY: four words of a checked value.
                let w = |i| unsafe { crate::raw::read_word(v, i) };
                let (ptr, len, cap, deleted) = (w(0), w(1), w(2), w(3));
                let val = shapes.def(*value);
                let g = crate::hash_map::Header { ptr, len, cap, deleted }
                    .validate(*key_size, *key_align, val.size, val.align)
                    .ok_or_else(|| bad("hash map header that does not add up", v))?;
                let Some(g) = g else { return Ok(()) };
                let addr = self.block(ptr, g.layout.size() as u64, g.layout.align() as u64, v)?;
                if shapes.owns(*value) {
                    for i in 0..cap as usize {
                        let slot = addr + i * g.stride;
                        // SAFETY: byte 0 of slot `i < cap` (the control
                        // byte), inside the live block checked above.
                        let c = unsafe { crate::raw::slice::<u8>(slot, 1)[0] };
                        if crate::hash_map::is_full(c) {
                            self.work.push((slot + g.val_off, *value, 1));
                        }
                    }
                }
            }
            Kind::BTreeMap { key_size, key_align, value } => {
                // SAFETY: three words of a checked value.
                let w = |i| unsafe { crate::raw::read_word(v, i) };
                let (root, len, height) = (w(0), w(1), w(2));
                let val = shapes.def(*value);
                let nl = crate::btree_map::NodeLayout::new(*key_size, *key_align, val.size, val.align)
                    .ok_or_else(|| bad("B-tree of impossible key or value sizes", v))?;
                if root == 0 {
                    return if len == 0 && height == 0 { Ok(()) } else { Err(bad("empty B-tree with entries", v)) };
                }
                if height >= crate::btree_map::MAX_HEIGHT {
                    return Err(bad("B-tree too deep", v));
                }
                let mut total: u64 = 0;
                let mut nodes = vec![(root, height, v)];
                while let Some((n, level, from)) = nodes.pop() {
                    let size = if level == 0 { nl.leaf_size } else { nl.inner_size };
                    let addr = self.block(n, size as u64, nl.align as u64, from)?;
                    // SAFETY: a live block of at least the node's size (at
                    // least 16 bytes), 8-aligned: its first two words.
                    let (nlen, lvl) = unsafe { (crate::raw::read_word(addr, 0), crate::raw::read_word(addr, 1)) };
                    if lvl != level || nlen > crate::btree_map::CAP as u64 {
                        return Err(bad("B-tree node of the wrong level or length", addr));
                    }
                    if level == 0 {
                        if nlen == 0 {
                            return Err(bad("empty B-tree leaf", addr));
                        }
                        total = total.saturating_add(nlen);
                        if shapes.owns(*value) {
                            self.work.push((addr + nl.vals, *value, nlen));
                        }
                    } else {
                        for i in 0..=nlen as usize {
                            let at = addr + nl.kids + i * 8;
                            // SAFETY: child slot `i <= len <= CAP` of an
                            // internal node block of `inner_size` bytes.
                            nodes.push((unsafe { crate::raw::read_word(at, 0) }, level - 1, at));
                        }
                    }
                }
                if total != len {
                    return Err(bad("B-tree whose leaves do not add up to its length", v));
                }
            }
        }
        Ok(())
    }
}

/// Checks the value of type `T` at `addr` (a live block of `T`'s size,
/// aligned): every block it owns, transitively. Returns those blocks.
pub(crate) fn trace_value<T: Persist>(heap: &rvm_heap::Heap, addr: usize) -> Result<Vec<usize>, TraceError> {
    let s = shape_of::<T>();
    if !s.owns() {
        return Ok(Vec::new());
    }
    let mut t = Tracer::new(heap);
    // The value's own block is not one it may point at.
    t.exclude([addr]);
    t.trace(&s.shapes, s.root, addr)?;
    Ok(t.blocks)
}

const MAGIC: &[u8; 8] = b"rvmshape";
const VERSION: u32 = 1;

/// The stored shape table: defs and, per root type fingerprint, its def.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stored {
    pub(crate) shapes: Shapes,
    pub(crate) roots: HashMap<u64, ShapeId>,
}

impl Stored {
    /// Adds type `T` (its defs, appended) unless its fingerprint is known.
    /// Whether it changed.
    pub(crate) fn add<T: Persist>(&mut self) -> bool {
        if self.roots.contains_key(&T::FINGERPRINT) {
            return false;
        }
        let t = shape_of::<T>();
        let base = self.shapes.defs.len() as ShapeId;
        let shift = |id: ShapeId| id + base;
        for d in t.shapes.defs() {
            let kind = match &d.kind {
                Kind::Plain => Kind::Plain,
                Kind::Struct(f) => Kind::Struct(f.iter().map(|&(o, id)| (o, shift(id))).collect()),
                Kind::Array { len, elem } => Kind::Array { len: *len, elem: shift(*elem) },
                Kind::Box { target, nullable } => Kind::Box { target: shift(*target), nullable: *nullable },
                Kind::Vec { elem, utf8 } => Kind::Vec { elem: shift(*elem), utf8: *utf8 },
                Kind::HashMap { key_size, key_align, value } => {
                    Kind::HashMap { key_size: *key_size, key_align: *key_align, value: shift(*value) }
                }
                Kind::BTreeMap { key_size, key_align, value } => {
                    Kind::BTreeMap { key_size: *key_size, key_align: *key_align, value: shift(*value) }
                }
            };
            self.shapes.defs.push(Def { size: d.size, align: d.align, kind });
        }
        self.roots.insert(T::FINGERPRINT, shift(t.root));
        self.shapes = std::mem::take(&mut self.shapes).finish();
        true
    }

    /// The stored form (see the module docs).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.shapes.defs.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.roots.len() as u32).to_le_bytes());
        for d in &self.shapes.defs {
            let (tag, rest): (u8, Vec<u8>) = match &d.kind {
                Kind::Plain => (0, Vec::new()),
                Kind::Struct(f) => {
                    let mut r = (f.len() as u32).to_le_bytes().to_vec();
                    for &(o, id) in f {
                        r.extend_from_slice(&o.to_le_bytes());
                        r.extend_from_slice(&id.to_le_bytes());
                    }
                    (1, r)
                }
                Kind::Array { len, elem } => (2, [&len.to_le_bytes()[..], &elem.to_le_bytes()].concat()),
                Kind::Box { target, nullable } => (3, [&target.to_le_bytes()[..], &[*nullable as u8]].concat()),
                Kind::Vec { elem, utf8 } => (4, [&elem.to_le_bytes()[..], &[*utf8 as u8]].concat()),
                Kind::HashMap { key_size, key_align, value } => {
                    (5, [&key_size.to_le_bytes()[..], &key_align.to_le_bytes(), &value.to_le_bytes()].concat())
                }
                Kind::BTreeMap { key_size, key_align, value } => {
                    (6, [&key_size.to_le_bytes()[..], &key_align.to_le_bytes(), &value.to_le_bytes()].concat())
                }
            };
            b.push(tag);
            b.extend_from_slice(&d.size.to_le_bytes());
            b.extend_from_slice(&d.align.to_le_bytes());
            b.extend_from_slice(&rest);
        }
        let mut roots: Vec<_> = self.roots.iter().collect();
        roots.sort();
        for (fp, id) in roots {
            b.extend_from_slice(&fp.to_le_bytes());
            b.extend_from_slice(&id.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a stored table, checking everything a trace relies on.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Stored, &'static str> {
        let body_len = bytes.len().checked_sub(4).ok_or("too short")?;
        let (body, crc) = bytes.split_at(body_len);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err("checksum mismatch");
        }
        let mut r = Reader(body);
        if r.take(8)? != MAGIC {
            return Err("not a shape table");
        }
        if r.u32()? != VERSION {
            return Err("unsupported shape table version");
        }
        let (ndefs, nroots) = (r.u32()? as usize, r.u32()? as usize);
        // Every def takes at least 17 bytes: a count beyond the bytes is damage.
        if ndefs > body.len() / 17 || nroots > body.len() / 12 {
            return Err("counts larger than the table");
        }
        let mut defs = Vec::with_capacity(ndefs);
        for _ in 0..ndefs {
            let tag = r.u8()?;
            let (size, align) = (r.u64()?, r.u64()?);
            let kind = match tag {
                0 => Kind::Plain,
                1 => {
                    let n = r.u32()? as usize;
                    if n > r.0.len() / 12 {
                        return Err("field count larger than the table");
                    }
                    let mut f = Vec::with_capacity(n);
                    for _ in 0..n {
                        f.push((r.u64()?, r.u32()?));
                    }
                    Kind::Struct(f)
                }
                2 => Kind::Array { len: r.u64()?, elem: r.u32()? },
                3 => Kind::Box { target: r.u32()?, nullable: r.u8()? != 0 },
                4 => Kind::Vec { elem: r.u32()?, utf8: r.u8()? != 0 },
                5 => Kind::HashMap { key_size: r.u64()?, key_align: r.u64()?, value: r.u32()? },
                6 => Kind::BTreeMap { key_size: r.u64()?, key_align: r.u64()?, value: r.u32()? },
                _ => return Err("unknown shape kind"),
            };
            defs.push(Def { size, align, kind });
        }
        let mut roots = HashMap::new();
        for _ in 0..nroots {
            let (fp, id) = (r.u64()?, r.u32()?);
            if id as usize >= ndefs {
                return Err("root type index out of range");
            }
            roots.insert(fp, id);
        }
        if !r.0.is_empty() {
            return Err("trailing bytes");
        }
        validate(&defs)?;
        let shapes = Shapes { defs, index: HashMap::new(), owns: Vec::new() }.finish();
        Ok(Stored { shapes, roots })
    }
}

/// Checks what a trace relies on: indices in range, power-of-two
/// alignments, sizes multiples of alignments, pointer kinds one to four
/// 8-aligned words, fields inside and aligned in their struct, arrays
/// exactly their elements, and no def containing itself inline.
fn validate(defs: &[Def]) -> Result<(), &'static str> {
    let get = |id: ShapeId| defs.get(id as usize).ok_or("shape index out of range");
    for d in defs {
        if d.align == 0 || !d.align.is_power_of_two() || d.align > 4096 || !d.size.is_multiple_of(d.align) {
            return Err("impossible size or alignment");
        }
        if d.size > isize::MAX as u64 {
            return Err("impossible size");
        }
        let words = |n: u64| d.size == 8 * n && d.align == 8;
        match &d.kind {
            Kind::Plain => {}
            Kind::Struct(fields) => {
                for &(off, f) in fields {
                    let fd = get(f)?;
                    let end = off.checked_add(fd.size).ok_or("field past its struct")?;
                    if end > d.size || !off.is_multiple_of(fd.align) || fd.align > d.align {
                        return Err("field past or misaligned in its struct");
                    }
                }
            }
            Kind::Array { len, elem } => {
                let e = get(*elem)?;
                if len.checked_mul(e.size) != Some(d.size) || e.align != d.align {
                    return Err("array size is not its elements'");
                }
            }
            Kind::Box { target, .. } => {
                get(*target)?;
                if !words(1) {
                    return Err("a box is one word");
                }
            }
            Kind::Vec { elem, .. } => {
                if get(*elem)?.size == 0 || !words(3) {
                    return Err("a vector is three words of non-empty elements");
                }
            }
            Kind::HashMap { key_size, key_align, value } => {
                get(*value)?;
                if !words(4) || *key_align == 0 || !key_align.is_power_of_two() || !key_size.is_multiple_of(*key_align)
                {
                    return Err("a hash map is four words");
                }
            }
            Kind::BTreeMap { key_size, key_align, value } => {
                get(*value)?;
                if !words(3) || *key_align == 0 || !key_align.is_power_of_two() || !key_size.is_multiple_of(*key_align)
                {
                    return Err("a B-tree map is three words");
                }
            }
        }
    }
    // No inline cycle (a struct or array containing itself): colour DFS
    // over struct and array edges, iteratively.
    let n = defs.len();
    let mut state = vec![0u8; n]; // 0 new, 1 on the stack, 2 done
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        state[start] = 1;
        while let Some(&mut (i, ref mut next)) = stack.last_mut() {
            let kids: Vec<usize> = match &defs[i].kind {
                Kind::Struct(f) => f.iter().map(|&(_, id)| id as usize).collect(),
                Kind::Array { elem, .. } => vec![*elem as usize],
                _ => Vec::new(),
            };
            if *next < kids.len() {
                let k = kids[*next];
                *next += 1;
                match state[k] {
                    0 => {
                        state[k] = 1;
                        stack.push((k, 0));
                    }
                    1 => return Err("a type that contains itself"),
                    _ => {}
                }
            } else {
                state[i] = 2;
                stack.pop();
            }
        }
    }
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "truncated")?))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "truncated")?))
    }
}

/// What a reachability walk found: see [`crate::PHeap::check`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reachability {
    /// Roots whose type's shape is stored, walked.
    pub typed_roots: u64,
    /// Roots of a type with no stored shape (made by the raw API): their
    /// own block counts as reached, what it points at cannot be known.
    pub untyped_roots: Vec<String>,
    /// Roots whose value is damaged, with the reason.
    pub damaged_roots: Vec<(String, String)>,
    /// Live blocks reached from the roots (root blocks included).
    pub reachable_blocks: u64,
    /// Live blocks no root reaches: address and length. With untyped
    /// roots these may be theirs; without, they are leaks.
    pub unreachable: Vec<(usize, u64)>,
}

impl Reachability {
    /// Whether the walk covered every root (no untyped or damaged ones),
    /// so that [`Reachability::unreachable`] are certainly leaks.
    pub fn complete(&self) -> bool {
        self.untyped_roots.is_empty() && self.damaged_roots.is_empty()
    }
}

/// What the ownership walk ([`walk_roots`]) found for one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No shape is known for its type: what it points at is unknown.
    Untyped,
    /// Refused, with the reason.
    Damaged(String),
    /// Sound: the blocks its value owns (its own block not included),
    /// sorted, none of them owned by another root nor a root's block.
    Owns(Vec<usize>),
}

/// A shape to walk one root by instead of the stored one: the root's
/// block address, the table, the def in it.
pub(crate) type Given<'s> = (usize, &'s Shapes, ShapeId);

/// Walks every root of `heap` (the typed layer's own shape table aside):
/// each by its type's stored shape (`stored`), or by `given` for the root
/// at its address. Roots for which `trusted(address, type tag)` holds
/// (checked already: the open transaction may have changed them) may
/// reach blocks the calling thread's open transaction allocated; the
/// others only committed blocks (see `Tracer::committed_only`). A root is sound when its value traces alone (every
/// pointer a live block of the right size, owned once) without reaching a
/// root's block, and shares no block with another sound root and no
/// block with another root. Two roots that share a block (their values
/// point at one buffer, or their slots at one block: damage each root's
/// check alone cannot see) are both refused: using one would free or
/// overwrite what the other still reads. Reads the heap as it is: the
/// caller keeps writers out.
pub(crate) fn walk_roots(
    heap: &rvm_heap::Heap,
    stored: Option<&Stored>,
    given: Option<Given<'_>>,
    trusted: &dyn Fn(usize, u64) -> bool,
) -> Vec<(rvm_heap::Root, Outcome)> {
    let roots = heap.roots();
    let root_blocks: Vec<usize> = roots.iter().map(|r| r.ptr.as_ptr() as usize).collect();
    let mut slots_per_block: HashMap<usize, usize> = HashMap::new();
    for &b in &root_blocks {
        *slots_per_block.entry(b).or_default() += 1;
    }
    let mut out: Vec<(rvm_heap::Root, Outcome)> = Vec::with_capacity(roots.len());
    for root in roots {
        let addr = root.ptr.as_ptr() as usize;
        if root.name == SHAPES_ROOT {
            continue;
        }
        let outcome = if slots_per_block[&addr] > 1 {
            Outcome::Damaged("a root block that another root names too".into())
        } else {
            let shape = match given {
                Some((at, shapes, id)) if at == addr => Some((shapes, id)),
                _ => stored.and_then(|s| s.roots.get(&root.type_tag).map(|&id| (&s.shapes, id))),
            };
            match shape {
                None => Outcome::Untyped,
                Some((shapes, id)) => {
                    let def = shapes.def(id);
                    let live = heap.live_block_len(root.ptr).is_some_and(|l| l >= def.size);
                    if !live || def.size != root.size || !(addr as u64).is_multiple_of(def.align) {
                        Outcome::Damaged("root block does not fit its type".into())
                    } else {
                        // A root whose value the open transaction may have
                        // changed (`trusted`: checked already) may reach its
                        // new blocks; any other only committed ones.
                        let mut t = Tracer::new(heap);
                        if !trusted(addr, root.type_tag) {
                            t = t.committed_only();
                        }
                        t.exclude(root_blocks.iter().copied());
                        match t.trace(shapes, id, addr) {
                            Ok(()) => {
                                let mut blocks = t.blocks;
                                blocks.sort_unstable();
                                Outcome::Owns(blocks)
                            }
                            Err(e) => Outcome::Damaged(e.to_string()),
                        }
                    }
                }
            }
        };
        out.push((root, outcome));
    }
    // A block two sound roots reach: both are refused (each root's own
    // trace saw every block once, so only roots can collide).
    let owning: Vec<usize> =
        (0..out.len()).filter(|&i| matches!(&out[i].1, Outcome::Owns(b) if !b.is_empty())).collect();
    let mut shared: HashSet<usize> = HashSet::new();
    if owning.len() > 1 {
        let mut all: Vec<(usize, usize)> = Vec::new();
        for &i in &owning {
            if let Outcome::Owns(blocks) = &out[i].1 {
                all.extend(blocks.iter().map(|&b| (b, i)));
            }
        }
        all.sort_unstable();
        for w in all.windows(2) {
            if w[0].0 == w[1].0 {
                shared.insert(w[0].1);
                shared.insert(w[1].1);
            }
        }
    }
    for i in shared {
        out[i].1 = Outcome::Damaged("a block that another root owns too".into());
    }
    out
}

/// Walks every root of `heap` by the shapes stored in it and lists the
/// live blocks none reaches. Reads the heap as it is: the caller keeps
/// writers out.
pub fn reachability(heap: &rvm_heap::Heap) -> Result<Reachability, crate::Error> {
    let stored = load_stored(heap)?;
    let mut out = Reachability::default();
    let mut reached: HashSet<usize> = heap.roots().iter().map(|r| r.ptr.as_ptr() as usize).collect();
    for (root, outcome) in walk_roots(heap, stored.as_ref(), None, &|_, _| false) {
        match outcome {
            Outcome::Untyped => out.untyped_roots.push(root.name),
            Outcome::Damaged(why) => out.damaged_roots.push((root.name, why)),
            Outcome::Owns(blocks) => {
                out.typed_roots += 1;
                reached.extend(blocks);
            }
        }
    }
    for (ptr, len) in heap.live_blocks()? {
        let a = ptr.as_ptr() as usize;
        if reached.contains(&a) {
            out.reachable_blocks += 1;
        } else {
            out.unreachable.push((a, len));
        }
    }
    Ok(out)
}

/// The shape table stored in `heap`, if any.
pub(crate) fn load_stored(heap: &rvm_heap::Heap) -> Result<Option<Stored>, crate::Error> {
    let Some(root) = heap.root(SHAPES_ROOT) else { return Ok(None) };
    let damaged = || crate::Error::Damaged { name: SHAPES_ROOT.into() };
    let len = heap.live_block_len(root.ptr).ok_or_else(damaged)?;
    if root.size > len {
        return Err(damaged());
    }
    // SAFETY: `root.size` bytes of a live block (checked above); the
    // caller keeps writers out while it reads.
    let bytes = unsafe { crate::raw::slice::<u8>(root.ptr.as_ptr() as usize, root.size as usize) };
    Stored::decode(bytes).map(Some).map_err(|_| damaged())
}
