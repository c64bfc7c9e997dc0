//! Replays the cargo-fuzz corpora of the gateway's parsers on stable Rust: every input under
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the same checks the
//! fuzz target runs (`fuzz/checks/*.rs`, included here, not copied). See `fuzz/README.md`.

#[path = "../../fuzz/checks/config.rs"]
mod config_checks;
#[path = "../../fuzz/checks/peek.rs"]
mod peek_checks;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn peek_tls_corpus_replays() {
    replay::replay(MANIFEST_DIR, "peek_tls", peek_checks::tls);
}

#[test]
fn peek_http_corpus_replays() {
    replay::replay(MANIFEST_DIR, "peek_http", peek_checks::http);
}

#[test]
fn http_framing_corpus_replays() {
    replay::replay(MANIFEST_DIR, "http_framing", peek_checks::http_framing);
}

#[test]
fn peek_postgres_corpus_replays() {
    replay::replay(MANIFEST_DIR, "peek_postgres", peek_checks::postgres);
}

#[test]
fn config_corpus_replays() {
    replay::replay(MANIFEST_DIR, "config", config_checks::config);
}
