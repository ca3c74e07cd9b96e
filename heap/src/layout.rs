//! The heap's persistent format: the static area (header and roots) and
//! block headers. All integers little-endian.
//!
//! Static area (start of the static region):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RVMHEAP1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | root slots |
//! | 16 | 8 | heap region address |
//! | 24 | 8 | heap region length |
//! | 32 | 8 | static region address |
//! | 40 | 8 | nonce (mixed into guard words) |
//! | 48 | 4 | CRC32C of bytes 0..48 |
//! | 52 | 12 | zero |
//! | 64 | 8 | allocations committed (lifetime) |
//! | 72 | 8 | frees committed (lifetime) |
//! | 80 | 8 | live blocks |
//! | 88 | 8 | bytes in live blocks |
//! | 96 | 32 | zero |
//! | 128 | 64 × slots | root slots |
//!
//! Bytes 0..64 never change after the heap is formatted. The counters at
//! 64..96 are rewritten by every commit that allocates or frees, in the same
//! transaction as the block headers, so they always agree with the blocks
//! (the load and the check verify it).
//!
//! Root slot (64 bytes): name (40 bytes, NUL-padded; empty = unused), type
//! tag u64 at 40, block offset from the heap start u64 at 48, size u64 at 56.
//!
//! Block header (16 bytes at the block's start; blocks are 16-aligned,
//! sizes multiples of 16, at least 32): size | allocated-bit u64 at 0, slack
//! u32 at 8 (allocated: bytes from the end of the user data to the block
//! end; the first 8 of them hold the tail guard), guard u32 at 12 (a hash of
//! the block's offset, size word, slack and the heap nonce).

/// Static area magic.
pub const MAGIC: [u8; 8] = *b"RVMHEAP1";
/// Format version.
pub const VERSION: u32 = 1;
/// Bytes of the immutable header at the start of the static region.
pub const HEADER_LEN: usize = 64;
/// Offset of the persistent counters in the static region.
pub const COUNTERS_AT: usize = 64;
/// Bytes of the persistent counters.
pub const COUNTERS_LEN: usize = 32;
/// Bytes before the root slots.
pub const STATIC_FIXED: usize = 128;
/// Bytes per root slot.
pub const ROOT_SLOT: usize = 64;
/// Longest root name.
pub const ROOT_NAME_MAX: usize = 40;
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

    /// Decodes and checks the 64 header bytes.
    pub fn decode(b: &[u8]) -> Result<StaticHeader, &'static str> {
        if b.len() < HEADER_LEN {
            return Err("static region too small for a heap header");
        }
        if b[0..8] == [0; 8] {
            return Err("no heap header (blank: the heap was never formatted, or its creation did not complete)");
        }
        if b[0..8] != MAGIC {
            return Err("not a heap (bad magic)");
        }
        if u32_at(b, 8) != VERSION {
            return Err("unsupported heap format version");
        }
        if crc32c::crc32c(&b[0..48]) != u32_at(b, 48) {
            return Err("heap header checksum mismatch");
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

/// The persistent counters (static region bytes 64..96).
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
}

impl Counters {
    /// Encodes the 32 counter bytes.
    pub fn encode(&self) -> [u8; COUNTERS_LEN] {
        let mut b = [0u8; COUNTERS_LEN];
        for (i, v) in [self.allocations, self.frees, self.live_blocks, self.live_bytes].into_iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes the 32 counter bytes (any value decodes; the load checks
    /// them against the blocks).
    pub fn decode(b: &[u8; COUNTERS_LEN]) -> Counters {
        Counters {
            allocations: u64_at(b, 0),
            frees: u64_at(b, 8),
            live_blocks: u64_at(b, 16),
            live_bytes: u64_at(b, 24),
        }
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
        let mut d = b;
        d[20] ^= 1;
        assert!(StaticHeader::decode(&d).is_err());
        assert!(StaticHeader::decode(&[0u8; HEADER_LEN]).unwrap_err().contains("blank"));
    }

    #[test]
    fn counters_round_trip() {
        let c = Counters { allocations: 5, frees: 2, live_blocks: 3, live_bytes: 96 };
        assert_eq!(Counters::decode(&c.encode()), c);
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size_for(1), Some(32));
        assert_eq!(block_size_for(8), Some(32));
        assert_eq!(block_size_for(9), Some(48));
        assert_eq!(block_size_for(usize::MAX), None);
    }
}
