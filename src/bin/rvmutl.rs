//! rvmutl: create, inspect, recover and truncate RVM logs.
fn main() {}
