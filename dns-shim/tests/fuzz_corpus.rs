//! Replays the cargo-fuzz corpora of the DNS shim's readers on stable Rust: every input under
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the same checks the
//! fuzz target runs (`fuzz/checks/dns.rs`, included here, not copied). See `fuzz/README.md`.

#[path = "../../fuzz/checks/dns.rs"]
mod dns_checks;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn dns_query_corpus_replays() {
    replay::replay(MANIFEST_DIR, "dns_query", dns_checks::query);
}

#[test]
fn dns_response_corpus_replays() {
    replay::replay(MANIFEST_DIR, "dns_response", dns_checks::response);
}

#[path = "../../fuzz/checks/state.rs"]
mod state_checks;

#[test]
fn state_file_corpus_replays() {
    replay::replay(MANIFEST_DIR, "state_file", state_checks::state_file);
}
