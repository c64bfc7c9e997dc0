//! The JSON lines the gateway prints on stdout: one `decision` per connection, one `close` per
//! connection that was relayed. Field names are a stable interface (README, "Logs").

use std::net::SocketAddr;

use egressgate_dns_shim::log::{rfc3339_now, write_json_line};
use serde::Serialize;

use crate::connection::{ClientAddr, OrigDstAddr};
use crate::decision::{PolicyDenial, Reason, Verdict};
use crate::protocol::Protocol;

/// Identifies the pod in a line.
#[derive(Debug, Clone, Serialize)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

/// One decision. Built up while the connection is examined, printed once.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionLine {
    pub time: String,
    pub event: &'static str,
    pub connection: u64,
    pub verdict: Verdict,
    pub reason: Reason,
    /// The peeker's precise code for `malformed` (e.g. `tls_sni_ip_literal`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
    pub pod: Option<PodName>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Live names this pod resolved to the destination.
    pub names: Vec<String>,
    /// CNAME targets on the way to the destination (recorded, never granting).
    pub cnames: Vec<String>,
    /// `tls`, `http`, `http2`, `postgresql`, `tcp` or `unknown`; absent when nothing was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ech: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The startup's `replication` parameter, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<String>,
    /// `tls` or `gssapi` when a PostgreSQL session turned encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgresql_encryption: Option<&'static str>,
    /// The policy (`namespace/name`, or `name` for a cluster policy) whose rule allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Index of that rule in the policy's `spec.egress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Accept to verdict.
    pub decision_us: u64,
}

impl DecisionLine {
    pub fn new(connection: u64, source: ClientAddr, destination: OrigDstAddr) -> Self {
        DecisionLine {
            time: String::new(),
            event: "decision",
            connection,
            verdict: Verdict::Deny,
            reason: Reason::Policy(PolicyDenial::NotAllowed),
            detail: None,
            pod: None,
            source: source.0,
            destination: destination.0,
            names: Vec::new(),
            cnames: Vec::new(),
            protocol: None,
            sni: None,
            alpn: Vec::new(),
            ech: None,
            host: None,
            database: None,
            user: None,
            replication: None,
            postgresql_encryption: None,
            policy: None,
            rule: None,
            decision_us: 0,
        }
    }

    pub fn print(&mut self) {
        self.time = rfc3339_now();
        write_json_line(self);
    }
}

/// The end of a relayed connection.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CloseLine {
    pub time: String,
    pub event: &'static str,
    pub connection: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// Why the relay ended abnormally (upstream unreachable, reset…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CloseLine {
    pub fn print(connection: u64, bytes: (u64, u64), duration_ms: u64, error: Option<String>) {
        write_json_line(&CloseLine {
            time: rfc3339_now(),
            event: "close",
            connection,
            bytes_up: bytes.0,
            bytes_down: bytes.1,
            duration_ms,
            error,
        });
    }
}
