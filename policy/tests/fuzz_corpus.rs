//! Replays the cargo-fuzz corpus of the policy loader on stable Rust: every input under
//! `fuzz/corpus/policy/` and `fuzz/regressions/policy/` goes through the same checks the fuzz
//! target runs (`fuzz/checks/policy.rs`, included here, not copied). See `fuzz/README.md`.

#[path = "../../fuzz/checks/policy.rs"]
mod policy_checks;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn policy_corpus_replays() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "policy", policy_checks::policy);
}
