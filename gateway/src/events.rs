//! The JSON lines the gateway prints on stdout: one `decision` per connection (and per UDP flow
//! the relay decides), and one more for
//! a refused later message of an allowed one (a second ClientHello after a HelloRetryRequest, a
//! later HTTP/1 request), one `close` per connection that was relayed. Field names and their order are a stable interface (README,
//! "Logs").

use std::collections::BTreeMap;
use std::net::SocketAddr;

use egressgate_log::{write_json_object, write_observed_object, JsonObject};
use egressgate_policy::{DnsName, PolicyRef};

use crate::decision::{Reason, Verdict};
use crate::identity::Owner;
use crate::peek::http::Host;
use crate::protocol::Protocol;

/// Identifies the pod in a line. Of a pod no enforce-mode policy selects (audit mode, or
/// unselected), also its labels and owner: what `egressgate suggest` groups by. Enforced pods
/// leave them out, so their lines cost what they did.
#[derive(Debug, Clone)]
pub struct PodName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub owner: Option<&'a Owner>,
}

/// One decision, printed once, borrowing what the connection learned. Written field by field
/// ([`JsonObject`]): one per connection.
#[derive(Debug, Clone)]
pub struct DecisionLine<'a> {
    pub connection: u64,
    pub verdict: Verdict,
    pub reason: Reason,
    /// The peeker's precise code for `malformed` (e.g. `tls_sni_ip_literal`).
    pub detail: Option<&'static str>,
    pub pod: Option<PodName<'a>>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Live names this pod resolved to the destination: the one the first message asked for
    /// first, at most 8.
    pub names: LoggedNames<'a>,
    /// How many names the pod holds for the destination, when `names` lists only some.
    pub names_total: Option<usize>,
    /// CNAME targets on the way to the destination (recorded, never granting).
    pub cnames: &'a [String],
    /// `tls`, `http`, `http2`, `postgresql`, `tcp`, `unknown`, or `udp` for a UDP flow's first
    /// datagram; absent when nothing was read.
    pub protocol: Option<Protocol>,
    pub sni: Option<&'a str>,
    /// Left out when empty.
    pub alpn: &'a [String],
    pub ech: Option<bool>,
    pub host: Option<&'a Host>,
    pub database: Option<&'a str>,
    pub user: Option<&'a str>,
    /// The startup's `replication` parameter, when present.
    pub replication: Option<&'a str>,
    /// `tls` or `gssapi` when a PostgreSQL session turned encrypted.
    pub postgresql_encryption: Option<&'static str>,
    /// The policy (`namespace/name`, or `name` for a cluster policy) whose rule allowed it.
    pub policy: Option<&'a PolicyRef>,
    /// Index of that rule in the policy's `spec.egress`.
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

impl<'a> LoggedNames<'a> {
    /// The names in the order the line lists them.
    fn iter(&self) -> impl Iterator<Item = &'a DnsName> + use<'a> {
        let names = self.names;
        let first = self.first.filter(|&at| at < names.len());
        let rest = names
            .iter()
            .enumerate()
            .filter(move |&(at, _)| Some(at) != first)
            .map(|(_, name)| name);
        first
            .map(|at| &names[at])
            .into_iter()
            .chain(rest)
            .take(self.max)
    }
}

impl DecisionLine<'_> {
    pub fn print(&self) {
        write_observed_object(|line| {
            line.time("time");
            self.write_fields(line);
        });
    }

    /// Every field after `time`, in the order of the README's "Logs" (a stable interface).
    pub fn write_fields(&self, line: &mut JsonObject<'_>) {
        line.str("event", "decision");
        line.u64("connection", self.connection);
        line.str("verdict", self.verdict.as_str());
        line.str("reason", self.reason.as_str());
        line.opt_str("detail", self.detail);
        match &self.pod {
            Some(pod) => line.object("pod", |fields| {
                fields.str("namespace", pod.namespace);
                fields.str("name", pod.name);
                // Maps of strings: serializing them cannot fail.
                if let Some(labels) = pod.labels {
                    let _ = fields.value("labels", labels);
                }
                if let Some(owner) = pod.owner {
                    let _ = fields.value("owner", owner);
                }
            }),
            None => line.null("pod"),
        }
        line.socket_addr("source", self.source);
        line.socket_addr("destination", self.destination);
        line.strs("names", self.names.iter().map(DnsName::as_str));
        if let Some(total) = self.names_total {
            line.u64("namesTotal", total as u64);
        }
        line.strs("cnames", self.cnames.iter().map(String::as_str));
        line.opt_str("protocol", self.protocol.map(Protocol::as_str));
        line.opt_str("sni", self.sni);
        if !self.alpn.is_empty() {
            line.strs("alpn", self.alpn.iter().map(String::as_str));
        }
        if let Some(ech) = self.ech {
            line.bool("ech", ech);
        }
        if let Some(host) = self.host {
            line.display("host", host);
        }
        line.opt_str("database", self.database);
        line.opt_str("user", self.user);
        line.opt_str("replication", self.replication);
        line.opt_str("postgresqlEncryption", self.postgresql_encryption);
        if let Some(policy) = self.policy {
            line.concat("policy", &policy.display_parts());
        }
        if let Some(rule) = self.rule {
            line.u64("rule", rule as u64);
        }
        line.u64("decisionUs", self.decision_us);
    }
}

/// The end of a relayed connection: `connection`, `bytesUp`, `bytesDown`, `durationMs`, and
/// `error` when the relay ended abnormally (upstream unreachable, reset…).
pub fn print_close(connection: u64, bytes: (u64, u64), duration_ms: u64, error: Option<&str>) {
    write_json_object(|line| {
        line.time("time");
        close_fields(line, connection, bytes, duration_ms, error);
    });
}

/// Every field of a `close` line after `time`, in the README's order.
fn close_fields(
    line: &mut JsonObject<'_>,
    connection: u64,
    bytes: (u64, u64),
    duration_ms: u64,
    error: Option<&str>,
) {
    line.str("event", "close");
    line.u64("connection", connection);
    line.u64("bytesUp", bytes.0);
    line.u64("bytesDown", bytes.1);
    line.u64("durationMs", duration_ms);
    line.opt_str("error", error);
}

/// A line as printed, with an empty `time`: what the shape tests compare.
#[cfg(test)]
pub fn with_empty_time(fields: impl FnOnce(&mut JsonObject<'_>)) -> String {
    let mut out = Vec::new();
    let mut line = JsonObject::new(&mut out);
    line.str("time", "");
    fields(&mut line);
    line.end();
    String::from_utf8(out).expect("UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields, their order and their values are what logs, dashboards and alerts read.
    #[test]
    fn close_lines_keep_their_shape() {
        let close = |error| with_empty_time(|line| close_fields(line, 7, (517, 4096), 12, error));
        assert_eq!(
            close(None),
            r#"{"time":"","event":"close","connection":7,"bytesUp":517,"bytesDown":4096,"durationMs":12}"#
        );
        assert_eq!(
            close(Some(
                "destination side: Connection reset by peer (os error 104)"
            )),
            r#"{"time":"","event":"close","connection":7,"bytesUp":517,"bytesDown":4096,"durationMs":12,"error":"destination side: Connection reset by peer (os error 104)"}"#
        );
    }
}
