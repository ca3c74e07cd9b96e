//! CRC32C of log records, with the SSE 4.2 `crc32` instruction where the
//! CPU has it (checked at run time) and the `crc32c` crate elsewhere.
//!
//! A record's checksum covers two words that are not stored (its position
//! and epoch) followed by its bytes. The crate computes that in two calls,
//! each of which starts and ends a byte at a time until its input is
//! aligned; records are short (100-200 bytes is usual), so those edges and
//! the calls cost about as much as the bytes. [`seeded`] takes the two
//! words as the first 16 bytes and the rest 8 bytes per instruction from
//! wherever it starts (unaligned loads cost nothing extra on x86-64); a
//! long record (a batch of no-flush commits) goes on to the crate, which
//! runs three streams at once. The only unsafe code is calling the
//! `#[target_feature]` function after the feature was detected.

/// CRC32C of `a` and `b` (u64 little-endian each) followed by `rest`: the
/// same as `crc32c_append(crc32c(&[a, b] as bytes), rest)`.
#[inline]
pub(crate) fn seeded(a: u64, b: u64, rest: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2 (detected just above), the only
        // feature `hw::seeded` is compiled for; it reads only `rest`.
        return unsafe { hw::seeded(a, b, rest) };
    }
    portable(a, b, rest)
}

/// [`seeded`] with the crate only (and the reference the tests compare to).
fn portable(a: u64, b: u64, rest: &[u8]) -> u32 {
    let mut seed = [0u8; 16];
    seed[..8].copy_from_slice(&a.to_le_bytes());
    seed[8..].copy_from_slice(&b.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&seed), rest)
}

/// Inputs from this long go to the crate, which runs three `crc32`
/// streams at once and joins them: for a batch of no-flush commits (one
/// record of tens of KB) that is about twice the speed of one stream;
/// shorter inputs stay on one stream, where the crate's aligned edges cost
/// more than they save.
const LONG: usize = 2048;

#[cfg(target_arch = "x86_64")]
mod hw {
    use super::LONG;
    use std::arch::x86_64::{_mm_crc32_u16, _mm_crc32_u32, _mm_crc32_u64, _mm_crc32_u8};

    /// # Safety
    ///
    /// The CPU must support SSE 4.2.
    #[target_feature(enable = "sse4.2")]
    pub(super) unsafe fn seeded(a: u64, b: u64, rest: &[u8]) -> u32 {
        let mut c = _mm_crc32_u64(u64::from(u32::MAX), a);
        c = _mm_crc32_u64(c, b);
        if rest.len() >= LONG {
            // Three streams at once (the crate's long-input path): each
            // `crc32` waits 3 cycles for the one before it in one stream.
            return crc32c::crc32c_append(!(c as u32), rest);
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            let mut x = [0u8; 8];
            x.copy_from_slice(w);
            c = _mm_crc32_u64(c, u64::from_le_bytes(x));
        }
        let mut c = c as u32;
        let mut tail = words.remainder();
        if tail.len() >= 4 {
            c = _mm_crc32_u32(c, u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
            tail = &tail[4..];
        }
        if tail.len() >= 2 {
            c = _mm_crc32_u16(c, u16::from_le_bytes([tail[0], tail[1]]));
            tail = &tail[2..];
        }
        if let Some(&x) = tail.first() {
            c = _mm_crc32_u8(c, x);
        }
        !c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fast paths (one stream, and three for long inputs) equal
        /// the crate's two calls, for every length and alignment.
        #[test]
        fn seeded_equals_the_crate(a in any::<u64>(), b in any::<u64>(), bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..300), prop::collection::vec(any::<u8>(), LONG - 16..LONG * 4)], skip in 0usize..8) {
            let rest = &bytes[skip.min(bytes.len())..];
            prop_assert_eq!(seeded(a, b, rest), portable(a, b, rest));
        }
    }

    #[test]
    fn seeded_matches_a_known_value() {
        // CRC32C of 16 zero bytes and "123456789".
        let mut all = vec![0u8; 16];
        all.extend_from_slice(b"123456789");
        assert_eq!(seeded(0, 0, b"123456789"), crc32c::crc32c(&all));
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
