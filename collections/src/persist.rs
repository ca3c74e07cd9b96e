//! The [`Persist`] trait: which types may live in the heap.

pub use crate::shape::{ShapeId, Shapes};
pub use rvm_heap::Heap;

/// A type whose values may live in the recoverable heap and be read back,
/// as the same values, after the program restarts (or crashes).
///
/// Implemented for the integers, floats, `bool`, `char`, arrays of
/// `Persist` types, and every `#[derive(Persist)]` struct. Not for
/// anything that points into volatile memory — references, raw pointers,
/// `Box`, `Vec`, `String`, `Rc`, `Arc`, cells, handles — so none can be
/// stored in the heap by safe code:
///
/// ```compile_fail
/// use rvm_collections::Persist;
/// #[derive(Persist)]
/// #[repr(C)]
/// struct Bad {
///     name: Box<u64>, // points into this run's memory: gone after a restart
/// }
/// ```
///
/// ```compile_fail
/// use rvm_collections::Persist;
/// #[derive(Persist)]
/// #[repr(C)]
/// struct Bad {
///     r: &'static u64,
/// }
/// ```
///
/// ```compile_fail
/// use rvm_collections::Persist;
/// #[derive(Persist)]
/// #[repr(C)]
/// struct Bad {
///     v: Vec<u8>,
/// }
/// ```
///
/// ```compile_fail
/// use rvm_collections::Persist;
/// #[derive(Persist)]
/// #[repr(C)]
/// struct Bad {
///     shared: std::sync::Arc<u64>,
/// }
/// ```
///
/// ```compile_fail
/// use rvm_collections::Persist;
/// #[derive(Persist)]
/// #[repr(C)]
/// struct Bad {
///     c: std::cell::Cell<u64>,
/// }
/// ```
///
/// The derive also refuses a struct with padding (its padding bytes are
/// uninitialised and would reach the log) and one without `#[repr(C)]`
/// (Rust's default layout may change between compiler versions; the heap
/// outlives the program):
///
/// ```compile_fail
/// use rvm_collections::Persist;
/// #[derive(Persist)]
/// #[repr(C)]
/// struct Padded {
///     small: u8,
///     big: u64,
/// }
/// const _: u64 = <Padded as Persist>::FINGERPRINT;
/// ```
///
/// ```compile_fail
/// use rvm_collections::Persist;
/// #[derive(Persist)]
/// struct NoRepr {
///     a: u64,
/// }
/// ```
///
/// ```
/// use rvm_collections::Persist;
/// #[derive(Persist, Clone, Copy, Debug, PartialEq)]
/// #[repr(C)]
/// struct Account {
///     id: u64,
///     balance: i64,
///     flags: [u8; 8],
/// }
/// assert_ne!(Account::FINGERPRINT, <[u64; 3]>::FINGERPRINT);
/// ```
///
/// # Safety
///
/// An implementation promises that:
/// 1. every byte of every value is initialised (no padding, no
///    `MaybeUninit`), so the bytes of a value can go to the log;
/// 2. the bytes a value is stored as are, after a restart, a valid value
///    meaning the same thing: no pointer, reference or handle into
///    volatile memory, no interior mutability, a layout that does not
///    change between compilations (`#[repr(C)]`, primitives, arrays);
/// 3. [`Persist::FINGERPRINT`] changes whenever the layout does, and
///    [`Persist::LAYOUT_ID`] whenever the layout of the value's own bytes
///    does;
/// 4. [`Persist::describe`] tells the truth: every heap pointer the value
///    holds is reported, at its offset, as the kind of pointer or
///    collection it is (the tracer reads those bytes as such), and
///    [`Persist::OWNS_BLOCKS`] is `true` whenever it reports one.
///
/// The derive keeps all four. Bytes are trusted once written by a
/// committed transaction: damage to the heap's data bytes themselves (not
/// its checksummed metadata) is not detected, and a damaged `bool`, `char`
/// or zeroed `PBox` would be an invalid value. Pointers, lengths and
/// capacities are checked before use, so damage there is an error.
pub unsafe trait Persist: Sized + 'static {
    /// A hash of the type's layout (size, alignment, and each field's
    /// offset and fingerprint; a pointer or collection mixes in its
    /// target's [`Persist::LAYOUT_ID`]): a root stores it, and opening the
    /// root as another type is an error, never a reinterpretation.
    const FINGERPRINT: u64;

    /// A hash of the value's own bytes' layout that stops at pointers: a
    /// pointer or collection contributes a constant of its kind, not its
    /// target. What a pointer's [`Persist::FINGERPRINT`] mixes in for its
    /// target, so that a type may point at itself (`Option<PBox<Node>>`
    /// inside `Node`) without a cycle. Equal to the fingerprint for types
    /// that hold no pointer.
    const LAYOUT_ID: u64 = Self::FINGERPRINT;

    /// Whether a value may own heap blocks (a pointer or a collection in
    /// it). `false` for every [`Plain`] type.
    const OWNS_BLOCKS: bool = false;

    /// Describes the type for the tracer that checks values read from the
    /// heap, frees what a dropped value owns and finds unreachable blocks
    /// (see [`crate::shape`]): where its pointers are and what they point
    /// at. The default, for types without pointers, is plain bytes.
    fn describe(shapes: &mut Shapes) -> ShapeId {
        shapes.plain::<Self>()
    }
}

/// A [`Persist`] type that owns no heap block: its values may be copied,
/// moved, overwritten or dropped freely (nothing leaks, nothing is owned
/// twice), so the typed layer hands out `&mut` to it. Integers, floats,
/// `bool`, `char`, arrays of `Plain`, and every `#[derive(Persist)]`
/// struct whose fields are all `Plain`. Collections such as
/// [`crate::PVec`] are `Persist` but not `Plain`: they change only through
/// their methods.
///
/// # Safety
///
/// The type and every field owns no heap block
/// ([`Persist::OWNS_BLOCKS`] is `false` and [`Persist::describe`] reports
/// plain bytes).
pub unsafe trait Plain: Persist {}

/// Starts a layout fingerprint (FNV-1a over 64-bit words).
pub const fn fingerprint_start(size: usize, align: usize) -> u64 {
    fingerprint_mix(fingerprint_mix(0xcbf2_9ce4_8422_2325, size as u64), align as u64)
}

/// Mixes one word into a fingerprint.
pub const fn fingerprint_mix(h: u64, word: u64) -> u64 {
    let mut h = h;
    let mut i = 0;
    while i < 8 {
        h ^= (word >> (i * 8)) & 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

macro_rules! primitive {
    ($($t:ty => $tag:expr),* $(,)?) => {$(
        // SAFETY: a primitive: no padding, no pointers, a fixed layout; the
        // tag differs per type.
        unsafe impl Persist for $t {
            const FINGERPRINT: u64 = fingerprint_mix(
                fingerprint_start(std::mem::size_of::<$t>(), std::mem::align_of::<$t>()),
                $tag,
            );
        }
        // SAFETY: a primitive owns nothing.
        unsafe impl Plain for $t {}
    )*};
}

primitive! {
    u8 => 1, u16 => 2, u32 => 3, u64 => 4, u128 => 5, usize => 6,
    i8 => 11, i16 => 12, i32 => 13, i64 => 14, i128 => 15, isize => 16,
    f32 => 21, f64 => 22, bool => 31, char => 32,
}

// SAFETY: array elements are laid out back to back (an element's size is
// a multiple of its alignment), so an array of padding-free `Persist`
// values has no padding and the same layout everywhere.
unsafe impl<T: Persist, const N: usize> Persist for [T; N] {
    const FINGERPRINT: u64 = fingerprint_mix(fingerprint_mix(T::FINGERPRINT, N as u64), 51);
    const LAYOUT_ID: u64 = fingerprint_mix(fingerprint_mix(T::LAYOUT_ID, N as u64), 51);
    const OWNS_BLOCKS: bool = T::OWNS_BLOCKS && N > 0;

    fn describe(shapes: &mut Shapes) -> ShapeId {
        if !Self::OWNS_BLOCKS {
            return shapes.plain::<Self>();
        }
        shapes.define::<Self>(|s| crate::shape::Kind::Array { len: N as u64, elem: T::describe(s) })
    }
}

// SAFETY: an array of values that own nothing owns nothing.
unsafe impl<T: Plain, const N: usize> Plain for [T; N] {}

/// The bytes of a value (every one initialised, by [`Persist`]'s contract).
pub(crate) fn bytes_of<T: Persist>(value: &T) -> &[u8] {
    // SAFETY: `T: Persist` has no padding and no uninitialised bytes, so
    // all `size_of::<T>()` bytes behind the reference are initialised; the
    // slice borrows `value`.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The bytes of a slice of values (every one initialised, by
/// [`Persist`]'s contract).
pub(crate) fn bytes_of_slice<T: Persist>(values: &[T]) -> &[u8] {
    // SAFETY: as in `bytes_of`, for each of the values, which lie next to
    // each other with no gap (a slice's stride is the size); the slice
    // borrows `values`.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_type_and_length() {
        let all = [
            u8::FINGERPRINT,
            i8::FINGERPRINT,
            u64::FINGERPRINT,
            i64::FINGERPRINT,
            f64::FINGERPRINT,
            <[u8; 8]>::FINGERPRINT,
            <[u8; 7]>::FINGERPRINT,
            <[u64; 1]>::FINGERPRINT,
            bool::FINGERPRINT,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn bytes_of_is_the_value() {
        assert_eq!(bytes_of(&0x0102_0304u32), &0x0102_0304u32.to_ne_bytes());
        assert_eq!(bytes_of(&[7u8; 3]), &[7, 7, 7]);
    }
}
