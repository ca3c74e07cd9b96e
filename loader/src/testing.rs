//! Test support (feature `testing`): free, non-colliding fixed address
//! ranges for tests that run in parallel in one process, and the fuzz body
//! for load-map headers ([`fuzz_header`]) shared by the cargo-fuzz target
//! and the ordinary seed-corpus test.
//!
//! Tests that load segments at fixed base addresses must not pick the same
//! addresses: the second one would fail with an address conflict. Cargo runs
//! the tests of one binary on parallel threads of one process, so each test
//! asks [`address_range`] for its own range instead of hard-coding one.
//!
//! The ranges are consecutive [`RANGE_LEN`] (1 GiB) slices of a window that
//! starts at [`WINDOW_START`] (`0x5a00_0000_0000`) and holds
//! [`WINDOW_RANGES`] of them (4 TiB, up to `0x5e00_0000_0000`). That window
//! lies in the user half of the address space, far from where Linux puts
//! executables (`0x55..`/`0x56..` for position-independent ones), the brk
//! heap, and `mmap` without an address (just below the stack, `0x7f..`).
//! An atomic counter hands each slice out once per process; a slice that
//! is not free (something is mapped in it) is skipped. Child processes get
//! their own address space, so a parent can pass its range to a child.
//!
//! ```
//! let r = rvm_loader::testing::address_range();
//! assert_eq!(r.len(), 1 << 30);
//! assert_ne!(r, rvm_loader::testing::address_range());
//! assert!(rvm_loader::testing::range_is_free(r.start(), r.len()));
//! ```

use crate::{LoadMap, LoaderError};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Start of the window the ranges come from.
pub const WINDOW_START: usize = 0x5a00_0000_0000;
/// Length of every range: 1 GiB.
pub const RANGE_LEN: usize = 1 << 30;
/// How many ranges the window holds (4096: 4 TiB).
pub const WINDOW_RANGES: usize = 4096;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A free address range handed out to one test: `[start, start + len)`,
/// page-aligned (1 GiB-aligned, in fact).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRange {
    start: usize,
    len: usize,
}

impl AddressRange {
    /// First address.
    pub fn start(&self) -> usize {
        self.start
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The address `offset` bytes into the range, as a load-map base.
    ///
    /// # Panics
    ///
    /// If `offset` is outside the range (a bug in the test).
    pub fn at(&self, offset: usize) -> u64 {
        assert!(offset < self.len, "offset {offset:#x} is outside the test's address range");
        (self.start + offset) as u64
    }
}

/// Hands out a fresh 1 GiB range, free at the time of the call and never
/// handed out before in this process.
///
/// # Panics
///
/// When the window is exhausted (4096 ranges in one process).
pub fn address_range() -> AddressRange {
    loop {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(i < WINDOW_RANGES, "rvm_loader::testing: the test address window is exhausted");
        let start = WINDOW_START + i * RANGE_LEN;
        if range_is_free(start, RANGE_LEN) {
            return AddressRange { start, len: RANGE_LEN };
        }
    }
}

/// Whether nothing is mapped in `[addr, addr + len)` right now (tests use it
/// to check that a failed load left nothing behind).
pub fn range_is_free(addr: usize, len: usize) -> bool {
    crate::raw::range_is_free(addr, len)
}

/// Recomputes the CRC32C field of a load-map header in place (over the
/// region table its count field implies), so that a test can change a
/// field and still get past the checksum to the checks behind it. Returns
/// false, changing nothing, when `header` is too short for its table or
/// its count is over [`MAX_REGIONS`](crate::format::MAX_REGIONS).
///
/// ```
/// use rvm_loader::{LoadMap, LoaderError, RegionSpec};
/// let map = LoadMap::with_page_size(4096).region(RegionSpec::new("a", 4096, 4096, 0x5a00_0000_0000));
/// let mut bytes = map.encode();
/// bytes[64 + 56] = 0x10; // region length 0x1010: not a page multiple
/// assert!(LoadMap::decode(&bytes).unwrap_err().to_string().contains("checksum"));
/// assert!(rvm_loader::testing::reseal(&mut bytes));
/// let e = LoadMap::decode(&bytes).unwrap_err();
/// assert!(matches!(e, LoaderError::Corrupted { .. }));
/// assert!(e.to_string().contains("not a multiple of the page size"), "{e}");
/// ```
pub fn reseal(header: &mut [u8]) -> bool {
    crate::format::reseal(header)
}

/// The fuzz body for load-map headers and their text form, shared by the
/// cargo-fuzz target (`fuzz/fuzz_targets/load_map.rs`) and the seed-corpus
/// test that CI runs: it panics exactly when the loader breaks a promise.
///
/// `data` is tried three ways:
/// - as a header: [`LoadMap::decode`] either fails with a header error
///   ([`NotALoadMap`](LoaderError::NotALoadMap),
///   [`UnsupportedVersion`](LoaderError::UnsupportedVersion),
///   [`Corrupted`](LoaderError::Corrupted)) or gives a valid map whose
///   encoding is exactly the input's first bytes, which fits a device of
///   [`LoadMap::min_device_len`] bytes and no smaller one, and whose text
///   form parses back to it;
/// - as a header with its checksum recomputed ([`reseal`]), so that mutated
///   fields reach the validation behind the checksum;
/// - as load-map text, if it is UTF-8: [`LoadMap::from_spec`] either fails
///   with [`Spec`](LoaderError::Spec) or
///   [`InvalidMap`](LoaderError::InvalidMap) or gives a valid map that
///   encodes, decodes and prints back to itself.
///
/// ```
/// let map = rvm_loader::LoadMap::from_spec("page_size=4096\na:4K:4K:0x5a00_0000_0000").unwrap();
/// rvm_loader::testing::fuzz_header(&map.encode());
/// rvm_loader::testing::fuzz_header(map.to_string().as_bytes());
/// rvm_loader::testing::fuzz_header(&[0xff; 300]);
/// ```
pub fn fuzz_header(data: &[u8]) {
    check_header(data);
    let mut sealed = data.to_vec();
    if reseal(&mut sealed) {
        check_header(&sealed);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_text(text);
    }
}

fn check_header(bytes: &[u8]) {
    use crate::format::FIXED_HEADER_LEN;
    let prefix = crate::encoded_len_from_prefix(bytes);
    match LoadMap::decode(bytes) {
        Ok(map) => {
            let n = match prefix {
                Ok(n) => n,
                Err(e) => panic!("decode accepted a header whose prefix is refused: {e}"),
            };
            assert!(n >= FIXED_HEADER_LEN && n <= bytes.len());
            let encoded = map.encode();
            assert_eq!(encoded.len(), n, "encoded length differs from the prefix's");
            assert!(encoded == bytes[..n], "decode accepted a non-canonical header");
            if let Err(e) = map.validate() {
                panic!("decode accepted an invalid map: {e}");
            }
            let min = map.min_device_len();
            if let Err(e) = map.validate_for_device(min) {
                panic!("a decoded map does not fit its minimal device of {min:#x} bytes: {e}");
            }
            assert!(map.validate_for_device(min - 1).is_err(), "a map fits a device shorter than its minimum");
            assert!(map.regions().len() <= map.capacity());
            for r in map.regions() {
                assert_eq!(map.get(&r.name), Some(r));
            }
            round_trip_text(&map);
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    LoaderError::NotALoadMap { .. }
                        | LoaderError::UnsupportedVersion { .. }
                        | LoaderError::Corrupted { .. }
                ),
                "a bad header gave an error of the wrong kind: {e:?}"
            );
            assert!(!e.to_string().is_empty());
        }
    }
}

fn check_text(text: &str) {
    match LoadMap::from_spec(text) {
        Ok(map) => {
            if let Err(e) = map.validate() {
                panic!("from_spec accepted an invalid map: {e}");
            }
            match LoadMap::decode(&map.encode()) {
                Ok(decoded) => assert_eq!(decoded, map, "a parsed map does not survive encoding"),
                Err(e) => panic!("the encoding of a parsed map is refused: {e}"),
            }
            round_trip_text(&map);
        }
        Err(e) => {
            assert!(
                matches!(e, LoaderError::Spec { .. } | LoaderError::InvalidMap { .. }),
                "bad load-map text gave an error of the wrong kind: {e:?}"
            );
            assert!(!e.to_string().is_empty());
        }
    }
}

fn round_trip_text(map: &LoadMap) {
    let text = map.to_string();
    match LoadMap::from_spec(&text) {
        Ok(parsed) => assert_eq!(&parsed, map, "the text form does not parse back to the map:\n{text}"),
        Err(e) => panic!("the text form of a valid map is refused: {e}\n{text}"),
    }
    let table = format!("{map:#}");
    assert!(table.lines().count() == map.regions().len() + 2);
}
