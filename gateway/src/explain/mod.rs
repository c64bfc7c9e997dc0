//! `egressgate explain` and `egressgate test`: what the gateway would decide for a pod, a
//! destination and a first message, step by step, from the gateway's own decision code.
//!
//! - `query`: the question (`Query` on the wire, `Asked` once checked).
//! - `trace`: runs the connection stages on it and records each step (`Explanation`).
//! - `why`: each reason code in words.
//! - `endpoint`: `POST /v1/explain` on the admin socket (the running gateway).
//! - `offline`: the same from a policy directory, an identity file and `--resolved` names.
//! - `line`: why a decision line came out as it did.
//! - `policy_tests`: the `egressgate test` file of expectations.
//! - `render`: table, JSON and YAML output. `cli`: the commands' arguments and exit codes.

pub mod cli;
pub mod endpoint;
pub mod line;
pub mod offline;
pub mod policy_tests;
pub mod query;
pub mod render;
pub mod trace;
pub mod why;
