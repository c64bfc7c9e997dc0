#![no_main]
//! `cargo +nightly fuzz run state_file`: see fuzz/README.md and the checks in `checks/state.rs`.

#[path = "../checks/state.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::state_file(data));
