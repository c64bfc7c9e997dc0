#![no_main]
//! `cargo +nightly fuzz run dns_query`: see fuzz/README.md and the checks in `checks/dns.rs`.

// Several targets share one checks module and run one of its entry points each.
#[allow(dead_code)]
#[path = "../checks/dns.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::query(data));
