//! Heap images from untrusted bytes: loading a heap segment whose static
//! area (header, counters, root slots) and heap region are arbitrary bytes,
//! checking it and running a few transactions on it never panics, never
//! leaves a failed load mapped, and never accepts a heap its own check
//! rejects. The body is `rvm_heap::testing::fuzz_heap_image` (input: one
//! flag byte, bit 0 = recompute the static area's checksums, then the
//! image), which the ordinary test `heap/tests/fuzz_seeds.rs` also runs
//! over `fuzz/seeds/heap_load/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rvm_heap::testing::fuzz_heap_image(data);
});
