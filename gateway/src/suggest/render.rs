//! The suggested policies as EgressPolicy YAML, with comments for the reviewer. Every string is
//! written as a JSON string, which YAML reads as the same double-quoted scalar, so no label
//! value or name can break the document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use egressgate_policy::Mode;

use super::input::{Destination, WhyAddress};
use super::rules::{PgSeen, PortUse, Ports};
use super::workload::WorkloadKey;

/// One policy to write.
#[derive(Debug)]
pub(super) struct Suggested<'a> {
    pub key: &'a WorkloadKey,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub pods: Vec<&'a str>,
    pub decisions: usize,
    pub destinations: &'a BTreeMap<Destination, Ports>,
}

/// Pods named in a policy's comment, at most.
const PODS_SHOWN: usize = 5;

pub(super) fn render(policies: &[Suggested<'_>], mode: Mode) -> String {
    let mut out = String::new();
    for (i, policy) in policies.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        write_policy(&mut out, policy, mode);
    }
    out
}

fn write_policy(out: &mut String, policy: &Suggested<'_>, mode: Mode) {
    let key = policy.key;
    let shown: Vec<&str> = policy.pods.iter().copied().take(PODS_SHOWN).collect();
    let more = policy.pods.len().saturating_sub(PODS_SHOWN);
    let _ = writeln!(
        out,
        "# Suggested by `egressgate suggest` for {} {}/{}: {} decision(s) of pod(s) {}{}.",
        key.kind,
        key.namespace,
        key.name,
        policy.decisions,
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
    );
    let _ = writeln!(out, "apiVersion: {}", egressgate_policy::API_VERSION);
    out.push_str("kind: EgressPolicy\nmetadata:\n");
    let _ = writeln!(out, "  name: {}", policy.name);
    let _ = writeln!(out, "  namespace: {}", key.namespace);
    out.push_str("spec:\n  podSelector:\n    matchLabels:\n");
    for (label, value) in &policy.selector {
        let _ = writeln!(out, "      {}: {}", quoted(label), quoted(value));
    }
    let _ = writeln!(
        out,
        "  mode: {}",
        match mode {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    );
    out.push_str("  egress:\n");
    for (destination, ports) in policy.destinations {
        write_rule(out, destination, ports);
    }
}

fn write_rule(out: &mut String, destination: &Destination, ports: &Ports) {
    out.push_str("    - to:\n");
    match destination {
        Destination::Name(name) => {
            let _ = writeln!(out, "        - dnsName: {}", quoted(name));
        }
        Destination::Address(ip, why) => {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            let why = match why {
                WhyAddress::NoName => "reached without a resolved name",
                WhyAddress::UnresolvedName => "the SNI or Host named no name resolved to it",
                WhyAddress::NoNameInMessage => "TLS without SNI or HTTP without a host",
            };
            let _ = writeln!(out, "        - cidr: \"{ip}/{bits}\"   # {why}");
        }
    }
    out.push_str("      ports:\n");
    for (port, used) in ports {
        write_ports(out, *port, used);
    }
}

/// One entry per protocol seen on the port; a `tcp` rule allows every protocol, so it stands
/// alone.
fn write_ports(out: &mut String, port: u16, used: &PortUse) {
    if used.tcp {
        let _ = writeln!(out, "        - {{port: {port}, protocol: tcp}}");
        return;
    }
    for (seen, protocol) in [(used.tls, "tls"), (used.http, "http")] {
        if seen {
            let _ = writeln!(out, "        - {{port: {port}, protocol: {protocol}}}");
        }
    }
    if let Some(pg) = &used.postgresql {
        let _ = writeln!(
            out,
            "        - port: {port}\n          protocol: postgresql"
        );
        write_postgresql(out, pg);
    }
}

fn write_postgresql(out: &mut String, pg: &PgSeen) {
    let databases: Vec<String> = pg.databases().map(|d| quoted(d)).collect();
    let users: Vec<String> = pg.users().map(|u| quoted(u)).collect();
    if databases.is_empty() && users.is_empty() {
        return;
    }
    out.push_str("          postgresql:\n");
    if !databases.is_empty() {
        let _ = writeln!(out, "            databases: [{}]", databases.join(", "));
    }
    if !users.is_empty() {
        let _ = writeln!(out, "            users: [{}]", users.join(", "));
    }
    if pg.allow_encrypted() {
        out.push_str("            allowEncrypted: true   # encrypted sessions were seen\n");
    }
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// An RFC 1123 label for `metadata.name`: `<workload>-egress`, lowercased, other characters as
/// `-`, at most 63 characters.
pub(super) fn policy_name(workload: &str) -> String {
    const SUFFIX: &str = "-egress";
    let mut base: String = workload
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(63 - SUFFIX.len());
    let base = base.trim_matches('-');
    if base.is_empty() {
        return "workload-egress".to_owned();
    }
    format!("{base}{SUFFIX}")
}
