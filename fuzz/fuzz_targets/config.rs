#![no_main]
//! `cargo +nightly fuzz run config`: see fuzz/README.md and the checks in `checks/config.rs`.

#[path = "../checks/config.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config(data));
