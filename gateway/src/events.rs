//! The JSON lines the gateway prints on stdout: one `decision` per connection (and per UDP flow
//! the relay decides), and one more for
//! a refused later message of an allowed one (a second ClientHello after a HelloRetryRequest, a
//! later HTTP/1 request), one `close` per connection that was relayed. Field names and their order are a stable interface (README,
//! "Logs").

use std::collections::BTreeMap;
use std::net::SocketAddr;

use egressgate_log::{rfc3339_now, write_json_line, write_observed_line};
use egressgate_policy::DnsName;
use serde::Serialize;

use crate::decision::{Reason, Verdict};
use crate::identity::Owner;
use crate::peek::http::Host;
use crate::protocol::Protocol;

/// Identifies the pod in a line. Of a pod no enforce-mode policy selects (audit mode, or
/// unselected), also its labels and owner: what `egressgate suggest` groups by. Enforced pods
/// leave them out, so their lines cost what they did.
#[derive(Debug, Clone, Serialize)]
pub struct PodName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<&'a BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<&'a Owner>,
}

/// One decision, printed once, borrowing what the connection learned.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionLine<'a> {
    pub time: String,
    pub event: &'static str,
    pub connection: u64,
    pub verdict: Verdict,
    pub reason: Reason,
    /// The peeker's precise code for `malformed` (e.g. `tls_sni_ip_literal`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
    pub pod: Option<PodName<'a>>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Live names this pod resolved to the destination: the one the first message asked for
    /// first, at most 8.
    pub names: LoggedNames<'a>,
    /// How many names the pod holds for the destination, when `names` lists only some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names_total: Option<usize>,
    /// CNAME targets on the way to the destination (recorded, never granting).
    pub cnames: &'a [String],
    /// `tls`, `http`, `http2`, `postgresql`, `tcp`, `unknown`, or `udp` for a UDP flow's first
    /// datagram; absent when nothing was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub alpn: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ech: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<&'a Host>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    /// The startup's `replication` parameter, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<&'a str>,
    /// `tls` or `gssapi` when a PostgreSQL session turned encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgresql_encryption: Option<&'static str>,
    /// The policy (`namespace/name`, or `name` for a cluster policy) whose rule allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a str>,
    /// Index of that rule in the policy's `spec.egress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Accept to verdict.
    pub decision_us: u64,
}

/// The names a line lists, at most `max`: `names[first]` (the name the first message asked
/// for, when the pod resolved it) ahead of the others, which keep their order. Written without
/// reordering or copying the connection's names.
#[derive(Debug, Clone, Copy)]
pub struct LoggedNames<'a> {
    pub names: &'a [DnsName],
    pub first: Option<usize>,
    pub max: usize,
}

impl LoggedNames<'_> {
    pub fn len(&self) -> usize {
        self.names.len().min(self.max)
    }
}

impl Serialize for LoggedNames<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let first = self.first.filter(|&at| at < self.names.len());
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        let rest = self
            .names
            .iter()
            .enumerate()
            .filter(|&(at, _)| Some(at) != first)
            .map(|(_, name)| name);
        for name in first
            .map(|at| &self.names[at])
            .into_iter()
            .chain(rest)
            .take(self.max)
        {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

impl DecisionLine<'_> {
    pub fn print(&mut self) {
        self.time = rfc3339_now();
        write_observed_line(self);
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
