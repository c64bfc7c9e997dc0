//! Decision lines in, observations out: what one connection of a learnable pod did, reduced to
//! the workload it belongs to and the destination, port and protocol a rule must allow.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::identity::Owner;

/// The fields of a decision line that a suggestion reads (README, "Logs"). Other fields, and
/// fields added later, are ignored.
#[derive(Debug, Deserialize)]
struct Event {
    event: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Line {
    verdict: Option<String>,
    reason: Option<String>,
    pod: Option<LinePod>,
    destination: Option<SocketAddr>,
    #[serde(default)]
    names: Vec<String>,
    protocol: Option<String>,
    sni: Option<String>,
    host: Option<String>,
    database: Option<String>,
    user: Option<String>,
    replication: Option<String>,
    postgresql_encryption: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct LinePod {
    pub namespace: String,
    pub name: String,
    /// Present only for pods no enforce-mode policy selects: the mark of a learnable line.
    pub labels: Option<BTreeMap<String, String>>,
    pub owner: Option<Owner>,
}

/// One learnable connection.
#[derive(Debug)]
pub(super) struct Observation {
    pub pod: LinePod,
    pub labels: BTreeMap<String, String>,
    /// One, except for an unselected pod's connection to an address it resolved several names
    /// to: nothing was read, so each of them may be the one it used.
    pub destinations: Vec<Destination>,
    pub port: u16,
    pub used: Use,
}

/// What a rule's `to` names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Destination {
    /// A name the pod resolved to the address (lowercase, no trailing dot), or a folded
    /// `*.parent`.
    Name(String),
    /// An address reached without a name a `dnsName` rule could match, and why.
    Address(IpAddr, WhyAddress),
}

/// Why a destination became a `cidr`: said next to it in the YAML, for the reviewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum WhyAddress {
    /// The pod resolved no name to the address.
    NoName,
    /// The SNI or Host named something the pod did not resolve to the address.
    UnresolvedName,
    /// TLS without SNI, or HTTP/1.0 without a host: a `dnsName` rule denies those.
    NoNameInMessage,
}

/// The protocol a port rule needs, with what PostgreSQL showed of its sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Use {
    Tcp,
    Tls,
    Http,
    Postgresql(PgSession),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct PgSession {
    pub database: Option<String>,
    pub user: Option<String>,
    /// `replication=true` (physical): only a rule without a database list allows it.
    pub physical_replication: bool,
    /// The session turned encrypted: its startup was not seen.
    pub encrypted: bool,
}

/// Why a line taught nothing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Skip {
    /// Not JSON, or not a decision line's shape.
    Unreadable,
    /// Another event (`dns`, `close`, ...).
    NotADecision,
    /// No `pod.labels`: an enforce-mode policy selects the pod, or the source was unknown.
    NotLearnable,
    /// A `deny` verdict: a limit or a client that closed, which no rule changes.
    Denied,
    /// A reason no rule should grant (`malformed`, `http_smuggling`, ...).
    Reason(String),
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Unreadable => f.write_str("not a decision line"),
            Skip::NotADecision => f.write_str("other events"),
            Skip::NotLearnable => f.write_str("enforced or unknown pods"),
            Skip::Denied => f.write_str("deny verdicts"),
            Skip::Reason(reason) => write!(f, "reason {reason}"),
        }
    }
}

/// Reasons whose connections a suggested rule should allow: what the pod did, observed in audit
/// mode or unselected. The others (`malformed`, `http_smuggling`, `peek_too_large`,
/// `upstream_unreachable`, the limits) say the connection was broken, not wanted.
const LEARNABLE_REASONS: &[&str] = &[
    "allowed",
    "unselected",
    "no_dns_record",
    "not_allowed",
    "sni_missing",
    "sni_mismatch",
    "host_missing",
    "host_mismatch",
    "protocol_mismatch",
    "postgresql_denied",
    "postgresql_encrypted",
    "peek_timeout",
];

/// Reads one line; blank lines and anything before the first `{` (a `kubectl logs` prefix)
/// are tolerated.
pub(super) fn observe(text: &str) -> Result<Observation, Skip> {
    let json = text.find('{').map_or("", |at| &text[at..]);
    // Other events have other shapes (a `dns` line's `pod` is an address).
    let event: Event = serde_json::from_str(json).map_err(|_| Skip::Unreadable)?;
    if event.event.as_deref() != Some("decision") {
        return Err(Skip::NotADecision);
    }
    let mut line: Line = serde_json::from_str(json).map_err(|_| Skip::Unreadable)?;
    let Some(mut pod) = line.pod.take() else {
        return Err(Skip::NotLearnable);
    };
    let Some(labels) = pod.labels.take() else {
        return Err(Skip::NotLearnable);
    };
    match line.verdict.as_deref() {
        Some("allow" | "audit") => {}
        _ => return Err(Skip::Denied),
    }
    let reason = line.reason.clone().unwrap_or_default();
    if !LEARNABLE_REASONS.contains(&reason.as_str()) {
        return Err(Skip::Reason(reason));
    }
    let destination_addr = line.destination.ok_or(Skip::Unreadable)?;
    let used = usage(&line);
    let destinations = if reason == "unselected" && line.protocol.is_none() {
        unread(&line, destination_addr.ip())
    } else {
        vec![destination(&line, destination_addr.ip(), &used)]
    };
    Ok(Observation {
        pod,
        labels,
        destinations,
        port: destination_addr.port(),
        used,
    })
}

fn usage(line: &Line) -> Use {
    let postgres = line.protocol.as_deref() == Some("postgresql")
        || line.postgresql_encryption.is_some()
        || line.database.is_some();
    if postgres {
        return Use::Postgresql(PgSession {
            database: line.database.clone(),
            user: line.user.clone(),
            physical_replication: line.replication.as_deref().is_some_and(|value| {
                ["true", "on", "yes", "1"]
                    .iter()
                    .any(|word| value.eq_ignore_ascii_case(word))
            }),
            encrypted: line.postgresql_encryption.is_some(),
        });
    }
    match line.protocol.as_deref() {
        Some("tls") => Use::Tls,
        Some("http") => Use::Http,
        // `tcp` (a tcp rule allowed it unread), `http2` and `unknown` bytes, or nothing read
        // (`peek_timeout`: a protocol whose server speaks first): only a `tcp` rule allows them.
        _ => Use::Tcp,
    }
}

/// A name from a line, in the form a policy writes it; `None` for one that breaks the DNS-name
/// rule (an HTTP host that is an IP literal, say).
fn normal_name(name: &str) -> Option<String> {
    egressgate_policy::DnsName::parse(name)
        .ok()
        .map(|name| name.to_string())
}

/// An unselected pod's connection, allowed unread: every name it resolved to the address, else
/// the address.
fn unread(line: &Line, ip: IpAddr) -> Vec<Destination> {
    let names: Vec<Destination> = line
        .names
        .iter()
        .filter_map(|name| normal_name(name))
        .map(Destination::Name)
        .collect();
    if names.is_empty() {
        return vec![Destination::Address(ip, WhyAddress::NoName)];
    }
    names
}

/// The name the connection used, else its address. The name a message carried (SNI, Host)
/// counts only if the pod resolved it to the address; a message that must carry a name and
/// did not gets a `cidr`, since a `dnsName` rule would deny it.
fn destination(line: &Line, ip: IpAddr, used: &Use) -> Destination {
    let resolved: Vec<String> = line
        .names
        .iter()
        .filter_map(|name| normal_name(name))
        .collect();
    let requested = line.sni.as_deref().or(line.host.as_deref());
    if let Some(requested) = requested {
        return match normal_name(requested) {
            Some(name) if resolved.contains(&name) => Destination::Name(name),
            _ => Destination::Address(ip, WhyAddress::UnresolvedName),
        };
    }
    let tls_session = matches!(used, Use::Postgresql(pg) if pg.encrypted)
        && line.postgresql_encryption.as_deref() == Some("tls");
    if matches!(used, Use::Tls | Use::Http) || tls_session {
        return Destination::Address(ip, WhyAddress::NoNameInMessage);
    }
    match resolved.into_iter().next() {
        Some(name) => Destination::Name(name),
        None => Destination::Address(ip, WhyAddress::NoName),
    }
}
