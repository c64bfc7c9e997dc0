//! What an `observe` stream asks for: the request body of `POST /v1/observe`, checked into a
//! [`Filter`] that matches decision and DNS lines.
//!
//! A DNS line names its pod by address only; the filter finds that pod (and any pod's labels)
//! in the identities in force, so `--pod shop/app-1` shows the pod's lookups and connections.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::Identities;

/// The body of `POST /v1/observe`. Every filter given must match (and each `labels` entry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObserveRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `NAME` or `NAMESPACE/NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `KEY=VALUE`, or `KEY` for "has the label".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// `allow`, `deny` or `audit` (decision lines only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// A reason code (decision lines only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A DNS name, or `*.suffix` for any name under it: the names, SNI, Host and CNAMEs of a
    /// decision; the question and CNAMEs of a DNS answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `IP`, `IP:PORT` or a CIDR: a decision's destination; an answer's addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// A decision's `protocol`, or `dns` for DNS answers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// History from the last this many seconds first (all the history when not following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_seconds: Option<u64>,
    /// Keep streaming new lines.
    #[serde(default)]
    pub follow: bool,
}

/// A checked [`ObserveRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    namespace: Option<String>,
    pod: Option<String>,
    labels: Vec<(String, Option<String>)>,
    verdict: Option<String>,
    reason: Option<String>,
    name: Option<NameMatch>,
    destination: Option<DestinationMatch>,
    protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NameMatch {
    Exact(String),
    /// `*.suffix`: stored as `.suffix`.
    Under(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DestinationMatch {
    Socket(SocketAddr),
    Net(IpNet),
}

const VERDICTS: &[&str] = &["allow", "deny", "audit"];
const PROTOCOLS: &[&str] = &[
    "tls",
    "http",
    "http2",
    "postgresql",
    "tcp",
    "unknown",
    "dns",
];

impl ObserveRequest {
    /// The filter, or what is wrong with the request (a 400).
    pub fn filter(&self) -> Result<Filter, String> {
        let (namespace, pod) = match self.pod.as_deref().map(|pod| pod.split_once('/')) {
            Some(Some((namespace, name))) => {
                if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
                    return Err(format!(
                        "pod {namespace}/{name} is not in namespace {}",
                        self.namespace.as_deref().unwrap_or_default()
                    ));
                }
                (Some(namespace.to_owned()), Some(name.to_owned()))
            }
            Some(None) => (self.namespace.clone(), self.pod.clone()),
            None => (self.namespace.clone(), None),
        };
        let labels = self
            .labels
            .iter()
            .map(|label| match label.split_once('=') {
                Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
                None => (label.clone(), None),
            })
            .collect();
        let one_of = |field: &str, value: &Option<String>, allowed: &[&str]| match value {
            Some(value) if !allowed.contains(&value.as_str()) => Err(format!(
                "{field}: {value:?} is not one of {}",
                allowed.join(", ")
            )),
            _ => Ok(value.clone()),
        };
        let name = match self.name.as_deref() {
            None => None,
            Some(name) => {
                let (pattern, under) = match name.strip_prefix("*.") {
                    Some(suffix) => (suffix, true),
                    None => (name, false),
                };
                let normal = egressgate_policy::DnsName::parse(pattern)
                    .map_err(|_| format!("name: {name:?} is not a DNS name"))?;
                Some(if under {
                    NameMatch::Under(format!(".{normal}"))
                } else {
                    NameMatch::Exact(normal.to_string())
                })
            }
        };
        let destination =
            match self.destination.as_deref() {
                None => None,
                Some(text) => Some(if let Ok(socket) = text.parse::<SocketAddr>() {
                    DestinationMatch::Socket(socket)
                } else if let Ok(ip) = text.parse::<IpAddr>() {
                    DestinationMatch::Net(IpNet::from(ip))
                } else {
                    DestinationMatch::Net(text.parse::<IpNet>().map_err(|_| {
                        format!("destination: {text:?} is not an IP, IP:PORT or CIDR")
                    })?)
                }),
            };
        Ok(Filter {
            namespace,
            pod,
            labels,
            verdict: one_of("verdict", &self.verdict, VERDICTS)?,
            reason: self.reason.clone(),
            name,
            destination,
            protocol: one_of("protocol", &self.protocol, PROTOCOLS)?,
        })
    }
}

impl Filter {
    /// Whether `line` (a decision or DNS line) is wanted. Other events, and lines that are not
    /// JSON objects, never are.
    pub fn matches(&self, line: &Value, identities: &Identities) -> bool {
        let dns = match line.get("event").and_then(Value::as_str) {
            Some("decision") => false,
            Some("dns") => true,
            _ => return false,
        };
        let text = |field: &str| line.get(field).and_then(Value::as_str);
        if dns && (self.verdict.is_some() || self.reason.is_some()) {
            return false;
        }
        if let Some(protocol) = &self.protocol {
            let seen = if dns { Some("dns") } else { text("protocol") };
            if seen != Some(protocol.as_str()) {
                return false;
            }
        }
        if self
            .verdict
            .as_deref()
            .is_some_and(|v| text("verdict") != Some(v))
            || self
                .reason
                .as_deref()
                .is_some_and(|r| text("reason") != Some(r))
        {
            return false;
        }
        self.pod_matches(line, dns, identities)
            && self.name_matches(line, dns)
            && self.destination_matches(line, dns)
    }

    fn pod_matches(&self, line: &Value, dns: bool, identities: &Identities) -> bool {
        if self.namespace.is_none() && self.pod.is_none() && self.labels.is_empty() {
            return true;
        }
        // A decision's pod by name; either line's pod by its source address for labels (and a
        // DNS line's pod altogether).
        let source: Option<IpAddr> = if dns {
            line.get("pod")
                .and_then(Value::as_str)
                .and_then(|ip| ip.parse().ok())
        } else {
            line.get("source")
                .and_then(Value::as_str)
                .and_then(|addr| addr.parse::<SocketAddr>().ok())
                .map(|addr| addr.ip())
        };
        let known = source.and_then(|ip| identities.lookup(ip));
        let (namespace, name) = if dns {
            match known {
                Some(pod) => (Some(pod.namespace.as_str()), Some(pod.name.as_str())),
                None => (None, None),
            }
        } else {
            let pod = line.get("pod");
            (
                pod.and_then(|p| p.get("namespace")).and_then(Value::as_str),
                pod.and_then(|p| p.get("name")).and_then(Value::as_str),
            )
        };
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| namespace != Some(ns))
            || self.pod.as_deref().is_some_and(|pod| name != Some(pod))
        {
            return false;
        }
        if self.labels.is_empty() {
            return true;
        }
        // The line's own labels when it has them (what the pod had then), else the pod's now,
        // if the address is still that pod's.
        let logged = line.get("pod").and_then(|p| p.get("labels"));
        let label = |key: &str| -> Option<String> {
            match logged {
                Some(labels) => labels.get(key).and_then(Value::as_str).map(str::to_owned),
                None => known
                    .filter(|pod| dns || (Some(pod.name.as_str()) == name))
                    .and_then(|pod| pod.labels.get(key).cloned()),
            }
        };
        self.labels
            .iter()
            .all(|(key, wanted)| match (label(key), wanted) {
                (Some(value), Some(wanted)) => value == *wanted,
                (Some(_), None) => true,
                (None, _) => false,
            })
    }

    fn name_matches(&self, line: &Value, dns: bool) -> bool {
        let Some(wanted) = &self.name else {
            return true;
        };
        let listed = |field: &str| {
            line.get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
        };
        let singles: &[&str] = if dns { &["name"] } else { &["sni", "host"] };
        let lists: &[&str] = if dns {
            &["cnames"]
        } else {
            &["names", "cnames"]
        };
        let mut candidates = singles
            .iter()
            .filter_map(|field| line.get(*field).and_then(Value::as_str))
            .chain(lists.iter().flat_map(|field| listed(field)));
        candidates.any(|name| {
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            match wanted {
                NameMatch::Exact(exact) => name == *exact,
                NameMatch::Under(suffix) => name.ends_with(suffix.as_str()),
            }
        })
    }

    fn destination_matches(&self, line: &Value, dns: bool) -> bool {
        let Some(wanted) = &self.destination else {
            return true;
        };
        if dns {
            let addresses = line.get("addresses").and_then(Value::as_array);
            return addresses.into_iter().flatten().any(|address| {
                let ip = address.as_str().and_then(|a| a.parse::<IpAddr>().ok());
                match (wanted, ip) {
                    (DestinationMatch::Net(net), Some(ip)) => net.contains(&ip),
                    _ => false,
                }
            });
        }
        let destination = line
            .get("destination")
            .and_then(Value::as_str)
            .and_then(|addr| addr.parse::<SocketAddr>().ok());
        match (wanted, destination) {
            (DestinationMatch::Socket(socket), Some(seen)) => *socket == seen,
            (DestinationMatch::Net(net), Some(seen)) => net.contains(&seen.ip()),
            _ => false,
        }
    }
}
