//! Load-map headers and load-map text from untrusted bytes: decoding and
//! validation never panic, and whatever is accepted round-trips exactly.
//! The body is `rvm_loader::testing::fuzz_header`, which the ordinary test
//! `loader/tests/fuzz_seeds.rs` also runs over `fuzz/seeds/load_map/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rvm_loader::testing::fuzz_header(data));
