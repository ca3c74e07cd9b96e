//! Log images from untrusted bytes: a valid log (and its segment) edited
//! as the input says, then inspected and recovered without and with
//! salvage, never panics, refuses damage without writing, and replays
//! exactly what the scanner reports. The body is
//! `rvm_core::testing::fuzz_log_image` (input: one flag byte, bit 0 =
//! recompute the checksums the edits touch, bit 1 = start from a log whose
//! records wrap around the ring; then edits), which the ordinary test
//! `tests/fuzz_seeds_log.rs` also runs over `fuzz/seeds/log_scan/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rvm_core::testing::fuzz_log_image(data);
});
