//! The heap's persistent format: the static area (header, counters and
//! roots) and block headers. All integers little-endian. Every byte of it
//! is covered by a checksum or a guard word, checked at load and by the
//! heap check.
//!
//! Static area (start of the static region), format version 2:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RVMHEAP1` |
//! | 8 | 4 | format version (2) |
//! | 12 | 4 | root slots |
//! | 16 | 8 | heap region address |
//! | 24 | 8 | heap region length |
//! | 32 | 8 | static region address |
//! | 40 | 8 | nonce (mixed into guard words and checksums) |
//! | 48 | 4 | CRC32C of bytes 0..48 |
//! | 52 | 12 | zero |
//! | 64 | 8 | allocations committed (lifetime) |
//! | 72 | 8 | frees committed (lifetime) |
//! | 80 | 8 | live blocks |
//! | 88 | 8 | bytes in live blocks |
//! | 96 | 8 | root slots in use |
//! | 104 | 20 | zero |
//! | 124 | 4 | CRC32C of the nonce and bytes 64..124 |
//! | 128 | 64 × slots | root slots |
//!
//! Bytes 0..64 change only when the heap grows (the heap region length and
//! the checksum, in the growth's transaction). The counters at
//! 64..128 are rewritten (with their checksum) by every commit that
//! allocates, frees or changes a root, in the same transaction as the block
//! headers and root slots, so they always agree with them (the load and the
//! check verify it).
//!
//! Root slot (64 bytes): name (36 bytes, NUL-padded; empty = unused), CRC32C
//! u32 at 36 (of the nonce, the slot's index and the slot's other 60 bytes),
//! type tag u64 at 40, block offset from the heap start u64 at 48, size u64
//! at 56. An unused slot is zero but for its checksum, so a slot zeroed by
//! damage fails its check instead of passing for an unused one.
//!
//! Block header (16 bytes at the block's start; blocks are 16-aligned,
//! sizes multiples of 16, at least 32): size | allocated-bit u64 at 0, slack
//! u32 at 8 (allocated: bytes from the end of the user data to the block
//! end; the first 8 of them hold the tail guard), guard u32 at 12 (a hash of
//! the block's offset, size word, slack and the heap nonce).
//!
//! Version 1 (no checksums over the counters and root slots, 40-byte root
//! names) is refused with [`crate::HeapError::UnsupportedVersion`].

/// Static area magic.
pub const MAGIC: [u8; 8] = *b"RVMHEAP1";
/// Format version.
pub const VERSION: u32 = 2;
/// Bytes of the immutable header at the start of the static region.
pub const HEADER_LEN: usize = 64;
/// Offset of the persistent counters in the static region.
pub const COUNTERS_AT: usize = 64;
/// Bytes of the persistent counters, their padding and their checksum.
pub const COUNTERS_LEN: usize = 64;
/// Bytes before the root slots.
pub const STATIC_FIXED: usize = 128;
/// Bytes per root slot.
pub const ROOT_SLOT: usize = 64;
/// Longest root name.
pub const ROOT_NAME_MAX: usize = 36;
/// Block header size (and block alignment).
pub const HDR: u64 = 16;
/// Smallest block.
pub const MIN_BLOCK: u64 = 32;
/// Tail guard size.
pub const TAIL_GUARD: u64 = 8;
/// Bit 0 of the size word: allocated.
pub const ALLOCATED: u64 = 1;

/// The immutable heap header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticHeader {
    /// Root slots.
    pub root_slots: u32,
    /// Heap region address.
    pub heap_addr: u64,
    /// Heap region length.
    pub heap_len: u64,
    /// Static region address.
    pub static_addr: u64,
    /// Guard nonce.
    pub nonce: u64,
}

/// Why a static header does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Damaged or not a heap: the reason.
    Corrupted(&'static str),
    /// A heap of another format version (the version found).
    Version(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl StaticHeader {
    /// Encodes the 64 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.root_slots.to_le_bytes());
        b[16..24].copy_from_slice(&self.heap_addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.heap_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.static_addr.to_le_bytes());
        b[40..48].copy_from_slice(&self.nonce.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks the 64 header bytes (magic, version, checksum,
    /// zero padding). The caller checks the values against the regions.
    pub fn decode(b: &[u8]) -> Result<StaticHeader, HeaderError> {
        use HeaderError::Corrupted as C;
        if b.len() < HEADER_LEN {
            return Err(C("static region too small for a heap header"));
        }
        if b[0..8] == [0; 8] {
            return Err(C("no heap header (blank: the heap was never formatted, or its creation did not complete)"));
        }
        if b[0..8] != MAGIC {
            return Err(C("not a heap (bad magic)"));
        }
        let version = u32_at(b, 8);
        if crc32c::crc32c(&b[0..48]) != u32_at(b, 48) {
            return Err(C("heap header checksum mismatch"));
        }
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        if b[52..HEADER_LEN].iter().any(|&c| c != 0) {
            return Err(C("heap header padding not zero"));
        }
        Ok(StaticHeader {
            root_slots: u32_at(b, 12),
            heap_addr: u64_at(b, 16),
            heap_len: u64_at(b, 24),
            static_addr: u64_at(b, 32),
            nonce: u64_at(b, 40),
        })
    }
}

/// The persistent counters (static region bytes 64..128).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Allocations committed over the heap's lifetime.
    pub allocations: u64,
    /// Frees committed over the heap's lifetime.
    pub frees: u64,
    /// Live (allocated) blocks.
    pub live_blocks: u64,
    /// Bytes in live blocks (headers, guards and slack included).
    pub live_bytes: u64,
    /// Root slots in use.
    pub roots: u64,
}

fn counters_crc(nonce: u64, b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&nonce.to_le_bytes()), &b[..COUNTERS_LEN - 4])
}

impl Counters {
    /// Encodes the 64 counter bytes (with their checksum, which binds them
    /// to the heap's `nonce`).
    pub fn encode(&self, nonce: u64) -> [u8; COUNTERS_LEN] {
        let mut b = [0u8; COUNTERS_LEN];
        for (i, v) in
            [self.allocations, self.frees, self.live_blocks, self.live_bytes, self.roots].into_iter().enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = counters_crc(nonce, &b);
        b[COUNTERS_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes the 64 counter bytes, checking their checksum and padding
    /// (the values themselves are checked against the blocks and roots by
    /// the load).
    pub fn decode(b: &[u8; COUNTERS_LEN], nonce: u64) -> Result<Counters, &'static str> {
        if counters_crc(nonce, b) != u32_at(b, COUNTERS_LEN - 4) {
            return Err("checksum mismatch");
        }
        if b[40..COUNTERS_LEN - 4].iter().any(|&c| c != 0) {
            return Err("padding not zero");
        }
        Ok(Counters {
            allocations: u64_at(b, 0),
            frees: u64_at(b, 8),
            live_blocks: u64_at(b, 16),
            live_bytes: u64_at(b, 24),
            roots: u64_at(b, 32),
        })
    }
}

/// A decoded root slot in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootSlot {
    /// The root's name (1 to [`ROOT_NAME_MAX`] bytes of UTF-8, no NUL).
    pub name: String,
    /// The caller's type tag.
    pub type_tag: u64,
    /// Offset of the root's block from the heap start (a multiple of 16).
    pub off: u64,
    /// Bytes the root names.
    pub size: u64,
}

fn slot_crc(nonce: u64, index: u32, b: &[u8; ROOT_SLOT]) -> u32 {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&nonce.to_le_bytes());
    key[8..].copy_from_slice(&index.to_le_bytes());
    let c = crc32c::crc32c_append(crc32c::crc32c(&key), &b[..ROOT_NAME_MAX]);
    crc32c::crc32c_append(c, &b[ROOT_NAME_MAX + 4..])
}

impl RootSlot {
    /// Encodes root slot number `index` holding `slot` (`None`: unused),
    /// with its checksum. The name must be valid (see [`RootSlot::name`]).
    pub fn encode(slot: Option<&RootSlot>, nonce: u64, index: u32) -> [u8; ROOT_SLOT] {
        let mut b = [0u8; ROOT_SLOT];
        if let Some(s) = slot {
            let n = s.name.len().min(ROOT_NAME_MAX);
            b[..n].copy_from_slice(&s.name.as_bytes()[..n]);
            b[40..48].copy_from_slice(&s.type_tag.to_le_bytes());
            b[48..56].copy_from_slice(&s.off.to_le_bytes());
            b[56..64].copy_from_slice(&s.size.to_le_bytes());
        }
        let crc = slot_crc(nonce, index, &b);
        b[ROOT_NAME_MAX..ROOT_NAME_MAX + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks root slot number `index` of a heap of `heap_len`
    /// bytes: its checksum, its name, and that the root's block and size
    /// lie inside the heap (with checked arithmetic: a hostile slot is an
    /// error, never an overflow).
    pub fn decode(
        b: &[u8; ROOT_SLOT],
        nonce: u64,
        index: u32,
        heap_len: u64,
    ) -> Result<Option<RootSlot>, &'static str> {
        if slot_crc(nonce, index, b) != u32_at(b, ROOT_NAME_MAX) {
            return Err("checksum mismatch");
        }
        let n = b[..ROOT_NAME_MAX].iter().position(|&c| c == 0).unwrap_or(ROOT_NAME_MAX);
        if n == 0 {
            let rest_zero = b[..ROOT_NAME_MAX].iter().chain(&b[ROOT_NAME_MAX + 4..]).all(|&c| c == 0);
            return if rest_zero { Ok(None) } else { Err("unused but not zero") };
        }
        if b[n..ROOT_NAME_MAX].iter().any(|&c| c != 0) {
            return Err("name not NUL-padded");
        }
        let name = std::str::from_utf8(&b[..n]).map_err(|_| "name is not UTF-8")?.to_owned();
        let (type_tag, off, size) = (u64_at(b, 40), u64_at(b, 48), u64_at(b, 56));
        // The block's user data [off + HDR, off + HDR + size) and its tail
        // guard must lie inside the heap.
        let end = off.checked_add(HDR).and_then(|e| e.checked_add(size)).and_then(|e| e.checked_add(TAIL_GUARD));
        if !off.is_multiple_of(HDR) || end.is_none_or(|e| e > heap_len) {
            return Err("block offset or size out of range");
        }
        Ok(Some(RootSlot { name, type_tag, off, size }))
    }
}

/// Recomputes every checksum of a static area in place (header, counters
/// and the root slots its header declares, as far as `b` holds them), so a
/// test can change a field and reach the checks behind the checksums.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn reseal(b: &mut [u8]) {
    if b.len() < STATIC_FIXED {
        return;
    }
    let crc = crc32c::crc32c(&b[0..48]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
    let nonce = u64_at(b, 40);
    let crc = counters_crc(nonce, &b[COUNTERS_AT..COUNTERS_AT + COUNTERS_LEN]);
    b[COUNTERS_AT + COUNTERS_LEN - 4..COUNTERS_AT + COUNTERS_LEN].copy_from_slice(&crc.to_le_bytes());
    let slots = (u32_at(b, 12) as usize).min((b.len() - STATIC_FIXED) / ROOT_SLOT);
    for i in 0..slots {
        let at = STATIC_FIXED + i * ROOT_SLOT;
        let mut s = [0u8; ROOT_SLOT];
        s.copy_from_slice(&b[at..at + ROOT_SLOT]);
        let crc = slot_crc(nonce, i as u32, &s);
        b[at + ROOT_NAME_MAX..at + ROOT_NAME_MAX + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A decoded block header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// Block size in bytes.
    pub size: u64,
    /// Allocated or free.
    pub allocated: bool,
    /// Slack after the user data (allocated blocks).
    pub slack: u32,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Guard word of a header at heap offset `off`.
pub fn header_guard(nonce: u64, off: u64, size_word: u64, slack: u32) -> u32 {
    mix(nonce ^ mix(off ^ mix(size_word ^ ((slack as u64) << 32)))) as u32
}

/// Tail guard of an allocated block at heap offset `off`.
pub fn tail_guard(nonce: u64, off: u64) -> u64 {
    mix(!nonce ^ off.rotate_left(17))
}

impl BlockHeader {
    /// Encodes for a block at heap offset `off`.
    pub fn encode(&self, nonce: u64, off: u64) -> [u8; HDR as usize] {
        let word = self.size | if self.allocated { ALLOCATED } else { 0 };
        let mut b = [0u8; HDR as usize];
        b[0..8].copy_from_slice(&word.to_le_bytes());
        b[8..12].copy_from_slice(&self.slack.to_le_bytes());
        b[12..16].copy_from_slice(&header_guard(nonce, off, word, self.slack).to_le_bytes());
        b
    }

    /// Decodes and checks a header read at heap offset `off` of a heap of
    /// `heap_len` bytes.
    pub fn decode(b: &[u8; HDR as usize], nonce: u64, off: u64, heap_len: u64) -> Result<BlockHeader, &'static str> {
        let word = u64_at(b, 0);
        let slack = u32_at(b, 8);
        if header_guard(nonce, off, word, slack) != u32_at(b, 12) {
            return Err("block header guard mismatch");
        }
        let size = word & !15;
        if word & 14 != 0 || size < MIN_BLOCK || off.checked_add(size).is_none_or(|e| e > heap_len) {
            return Err("block size out of range");
        }
        let allocated = word & ALLOCATED != 0;
        if allocated && (slack as u64) < TAIL_GUARD || slack as u64 > size - HDR {
            return Err("block slack out of range");
        }
        Ok(BlockHeader { size, allocated, slack })
    }
}

/// Block size needed for `size` bytes of user data (header, tail guard,
/// rounding to 16).
pub fn block_size_for(size: usize) -> Option<u64> {
    let need = (size as u64).checked_add(HDR + TAIL_GUARD + 15)? & !15;
    Some(need.max(MIN_BLOCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_guard() {
        let h = BlockHeader { size: 64, allocated: true, slack: 20 };
        let b = h.encode(7, 128);
        assert_eq!(BlockHeader::decode(&b, 7, 128, 4096), Ok(h));
        assert!(BlockHeader::decode(&b, 7, 144, 4096).is_err(), "guard binds the offset");
        assert!(BlockHeader::decode(&b, 8, 128, 4096).is_err(), "guard binds the nonce");
        assert!(BlockHeader::decode(&b, 7, 4064, 4096).is_err(), "block past the end");
        for i in 0..16 {
            let mut d = b;
            d[i] ^= 4;
            assert!(BlockHeader::decode(&d, 7, 128, 4096).is_err());
        }
    }

    #[test]
    fn static_header_round_trip() {
        let s = StaticHeader { root_slots: 8, heap_addr: 1 << 40, heap_len: 1 << 20, static_addr: 1 << 39, nonce: 99 };
        let b = s.encode();
        assert_eq!(StaticHeader::decode(&b), Ok(s));
        for i in 0..HEADER_LEN {
            let mut d = b;
            d[i] ^= 1;
            assert!(StaticHeader::decode(&d).is_err(), "a flip at byte {i} passes");
        }
        assert!(
            matches!(StaticHeader::decode(&[0u8; HEADER_LEN]), Err(HeaderError::Corrupted(w)) if w.contains("blank"))
        );
        // A version 1 header (its own checksum valid) is refused as such.
        let mut v1 = b;
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1[0..48]);
        v1[48..52].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(StaticHeader::decode(&v1), Err(HeaderError::Version(1)));
    }

    #[test]
    fn counters_round_trip() {
        let c = Counters { allocations: 5, frees: 2, live_blocks: 3, live_bytes: 96, roots: 1 };
        let b = c.encode(7);
        assert_eq!(Counters::decode(&b, 7), Ok(c));
        assert!(Counters::decode(&b, 8).is_err(), "the checksum binds the nonce");
        assert!(Counters::decode(&[0u8; COUNTERS_LEN], 7).is_err(), "zeroed counters fail");
        for i in 0..COUNTERS_LEN {
            for bit in 0..8 {
                let mut d = b;
                d[i] ^= 1 << bit;
                assert!(Counters::decode(&d, 7).is_err(), "a flip at byte {i} bit {bit} passes");
            }
        }
    }

    #[test]
    fn root_slot_round_trip_and_damage() {
        let s = RootSlot { name: "config".into(), type_tag: 9, off: 4096, size: 100 };
        let b = RootSlot::encode(Some(&s), 7, 3);
        assert_eq!(RootSlot::decode(&b, 7, 3, 1 << 20), Ok(Some(s.clone())));
        assert!(RootSlot::decode(&b, 7, 4, 1 << 20).is_err(), "the checksum binds the slot index");
        assert!(RootSlot::decode(&b, 8, 3, 1 << 20).is_err(), "the checksum binds the nonce");
        for i in 0..ROOT_SLOT {
            for bit in 0..8 {
                let mut d = b;
                d[i] ^= 1 << bit;
                assert!(RootSlot::decode(&d, 7, 3, 1 << 20).is_err(), "a flip at byte {i} bit {bit} passes");
            }
        }
        let unused = RootSlot::encode(None, 7, 3);
        assert_eq!(RootSlot::decode(&unused, 7, 3, 1 << 20), Ok(None));
        assert!(RootSlot::decode(&[0u8; ROOT_SLOT], 7, 3, 1 << 20).is_err(), "a zeroed slot is damage, not unused");
    }

    /// A slot with a valid checksum but a hostile size: `HDR + size`
    /// overflows (a panic in debug builds; a 2^64-byte root accepted in
    /// release builds before the fix).
    #[test]
    fn root_slot_sizes_use_checked_arithmetic() {
        for (off, size) in [(0, u64::MAX), (0, u64::MAX - 15), (16, u64::MAX - 20), (u64::MAX - 15, 0), (0, 1 << 20)] {
            let s = RootSlot { name: "r".into(), type_tag: 0, off, size };
            let b = RootSlot::encode(Some(&s), 1, 0);
            assert!(RootSlot::decode(&b, 1, 0, 1 << 20).is_err(), "off {off:#x} size {size:#x} accepted");
        }
        let s = RootSlot { name: "r".into(), type_tag: 0, off: 0, size: (1 << 20) - 24 };
        assert!(RootSlot::decode(&RootSlot::encode(Some(&s), 1, 0), 1, 0, 1 << 20).is_ok());
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size_for(1), Some(32));
        assert_eq!(block_size_for(8), Some(32));
        assert_eq!(block_size_for(9), Some(48));
        assert_eq!(block_size_for(usize::MAX), None);
    }
}
