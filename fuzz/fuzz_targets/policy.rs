#![no_main]
//! `cargo +nightly fuzz run policy`: see fuzz/README.md and the checks in `checks/policy.rs`.

#[path = "../checks/policy.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::policy(data));
