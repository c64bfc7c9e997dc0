#![no_main]
//! `cargo +nightly fuzz run http_framing`: see fuzz/README.md and the checks in `checks/peek.rs`.

// Several targets share one checks module and run one of its entry points each.
#[allow(dead_code)]
#[path = "../checks/peek.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::http_framing(data));
