//! The step-by-step trace of what the gateway would decide, run through the gateway's own
//! stages (`connection::stages`: `before_peek`, `authorize`) and verdict function on a
//! `Context`, as a connection would be: nothing here re-implements a rule. The stages read a
//! [`Snapshot`] and a [`NameTable`], so the same code explains the running gateway (its store
//! and table), the offline form (files) and the policy tests (a YAML of cases).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use egressgate_dns_shim::{DestIp, NameTable};
use egressgate_policy::{
    DnsName, Grant, GrantPeer, Mode, PolicyKind, PolicySet, Protocol as RuleProtocol,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::query::{Asked, FirstMessage, PodRef, TargetHost};
use super::why;
use crate::connection::context::{Context, Granted};
use crate::connection::stages::{self, Ahead};
use crate::connection::stop::Stop;
use crate::connection::{self, ClientAddr, Fallbacks, OrigDstAddr};
use crate::decision::{Reason, Verdict};
use crate::identity::Pod;
use crate::store::Snapshot;

/// The settings that change a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub(crate) require_sni: bool,
    pub(crate) fallbacks: Fallbacks,
}

/// Where the names come from: the running gateway's table (each record's time left is
/// shown), or the caller's `--resolved` list (no time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Records {
    Live,
    Given,
}

/// Names listed per address; past it, `namesTotal` says how many.
const NAMES_SHOWN: usize = 64;

/// The answer: top-level `verdict` and `reason` (the strictest over the destination's
/// addresses), the pod and its policies, and one trace per address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub verdict: Verdict,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub to: String,
    pub pod: PodView,
    /// The policies that select the pod.
    pub policies: Vec<PolicyView>,
    pub addresses: Vec<AddressTrace>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    /// `namespace/name`, or `name` for a cluster policy.
    pub policy: String,
    pub kind: String,
    pub mode: String,
}

/// What the gateway would decide for one address of the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressTrace {
    pub destination: SocketAddr,
    pub verdict: Verdict,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The policy and rule that allow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// The live names this pod resolved to this address.
    pub names: Vec<NameView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names_total: Option<usize>,
    /// The rules that would grant this address and port (before the first message is checked).
    pub grants: Vec<GrantView>,
    /// Grants of audit-mode policies, which count for nothing while an enforce-mode policy
    /// selects the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_grants: Vec<GrantView>,
    /// What the peek would have found; absent when nothing is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_message: Option<String>,
    /// In the gateway's order.
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NameView {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cnames: Vec<String>,
    /// Seconds left of the record's TTL (or of its last use by an allowed connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Seconds until it stops counting: the TTL left plus the idle grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantView {
    pub policy: String,
    /// Index in the policy's `spec.egress`.
    pub rule: usize,
    pub mode: String,
    pub protocol: String,
    /// The rule's `cidr` that contains the address, or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// the resolved names its `dnsName` peers match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// One stage: its name, what it found (short), and why it matters (a sentence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub outcome: String,
    pub says: String,
}

/// Why a query has no trace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("no pod {pod} is known here ({known} pods are)")]
    UnknownPod { pod: String, known: usize },
    #[error("{pod} holds no live record of {name}: it has not resolved it through the gateway, or the record expired; give IP:PORT to see what a connection to an address would get")]
    NotResolved { pod: String, name: String },
}

/// Explains `asked` against `snapshot` and `table`.
pub fn explain(
    snapshot: &Snapshot,
    table: &NameTable,
    asked: &Asked,
    settings: Settings,
    records: Records,
) -> Result<Explanation, ExplainError> {
    let pod = find_pod(snapshot, &asked.pod)?;
    let addresses = match &asked.to.host {
        TargetHost::Ip(ip) => vec![*ip],
        TargetHost::Name(name) => resolved_addresses(table, pod, name),
    };
    let traces: Vec<AddressTrace> = addresses
        .iter()
        .map(|&ip| {
            let destination = SocketAddr::new(ip, asked.to.port);
            trace_address(
                snapshot,
                table,
                pod,
                destination,
                &asked.first,
                settings,
                records,
            )
        })
        .collect();
    let Some(strictest) = traces.iter().max_by_key(|trace| strictness(trace.verdict)) else {
        return Err(ExplainError::NotResolved {
            pod: asked.pod.to_string(),
            name: asked
                .to
                .host_name()
                .map(DnsName::to_string)
                .unwrap_or_default(),
        });
    };
    let (verdict, reason, detail) = (
        strictest.verdict,
        strictest.reason.clone(),
        strictest.detail.clone(),
    );
    Ok(Explanation {
        verdict,
        reason,
        detail,
        to: asked.to.to_string(),
        pod: pod_view(pod),
        policies: selecting_policies(pod, &snapshot.policies),
        addresses: traces,
    })
}

/// The pod by namespace and name.
pub fn find_pod<'s>(snapshot: &'s Snapshot, pod: &PodRef) -> Result<&'s Pod, ExplainError> {
    snapshot
        .identities
        .iter()
        .map(|(_, p)| &**p)
        .find(|p| p.namespace == pod.namespace && p.name == pod.name)
        .ok_or_else(|| ExplainError::UnknownPod {
            pod: pod.to_string(),
            known: snapshot.identities.len(),
        })
}

/// The addresses this pod resolved `name` to (under any of its own addresses), from the
/// table: a walk over every record under the read lock, fine for an operator's question.
fn resolved_addresses(table: &NameTable, pod: &Pod, name: &DnsName) -> Vec<IpAddr> {
    let now = std::time::Instant::now();
    let mut found = Vec::new();
    table.export_each(now, std::time::SystemTime::now(), |record| {
        let (pod_ip, dst) = (record.pod.0, record.dst.0);
        if record.name == name && pod.ips.contains(&pod_ip) && !found.contains(&dst) {
            found.push(dst);
        }
    });
    found.sort();
    found
}

fn strictness(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Allow => 0,
        Verdict::Audit => 1,
        Verdict::Deny => 2,
    }
}

/// The gateway's stages for one connection from `pod` to `destination` whose first message is
/// `first`, and what each found.
pub fn trace_address(
    snapshot: &Snapshot,
    table: &NameTable,
    pod: &Pod,
    destination: SocketAddr,
    first: &FirstMessage,
    settings: Settings,
    records: Records,
) -> AddressTrace {
    // The connection comes from one of the pod's addresses, as the identify stage expects (a
    // pod without one, which no identity source makes, is then an unknown source).
    let source = pod
        .ips
        .first()
        .copied()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let client = ClientAddr(SocketAddr::new(source, 0));
    let mut cx = Context::new(0, Instant::now(), client, OrigDstAddr(destination));
    let mut peeked = false;
    let outcome = match stages::before_peek(&mut cx, snapshot, table) {
        Ok(Ahead::Granted(granted)) => Ok(granted),
        Ok(Ahead::Peek(pod)) => {
            peeked = true;
            cx.protocol = Some(first.protocol());
            stages::authorize(
                &mut cx,
                table,
                pod,
                Ok(first.peeked()),
                settings.require_sni,
            )
        }
        Err(stop) => Err(stop),
    };
    let verdict = connection::verdict(cx.selection.as_ref(), &outcome, settings.fallbacks);
    let run = Run {
        cx: &cx,
        outcome: &outcome,
        verdict,
        peeked,
    };
    record_steps(&run, table, first, settings, records)
}

/// What one run of the stages left behind.
struct Run<'r, 's> {
    cx: &'r Context<'s>,
    outcome: &'r Result<Granted<'s>, Stop>,
    verdict: Verdict,
    /// The stages went as far as the first message (no `tcp` grant allowed it before).
    peeked: bool,
}

/// Each step of `run`, with what it found.
fn record_steps(
    run: &Run<'_, '_>,
    table: &NameTable,
    first: &FirstMessage,
    settings: Settings,
    records: Records,
) -> AddressTrace {
    let Run {
        cx,
        outcome,
        verdict,
        peeked,
    } = *run;
    let destination = cx.destination.0;
    let reason = match outcome {
        Ok(_) => Reason::Allowed,
        Err(stop) => stop.reason,
    };
    let detail = outcome
        .as_ref()
        .err()
        .and_then(|stop| stop.detail.as_ref())
        .map(|detail| detail.code().to_owned());
    let mut steps = Vec::new();
    let mut names = Vec::new();
    let mut names_total = None;
    let mut grants = Vec::new();
    let mut ignored_grants = Vec::new();

    match cx.pod {
        Some(pod) => steps.push(Step {
            step: "identify".into(),
            outcome: format!("{}/{}", pod.namespace, pod.name),
            says: format!(
                "{} is {}/{} (labels {}; namespace labels {})",
                cx.client.ip(),
                pod.namespace,
                pod.name,
                labels_text(&pod.labels),
                labels_text(&pod.namespace_labels),
            ),
        }),
        None => steps.push(Step {
            step: "identify".into(),
            outcome: "unknown_source".into(),
            says: format!("no pod is known to use {}", cx.client.ip()),
        }),
    }
    if let (Some(pod), None) = (cx.pod, &cx.selection) {
        let setting = match settings.fallbacks.unselected {
            crate::config::UnselectedPods::Allow => "allow",
            crate::config::UnselectedPods::Deny => "deny",
        };
        steps.push(Step {
            step: "select".into(),
            outcome: "unselected".into(),
            says: format!(
                "no policy selects {}/{}: unselectedPods ({setting}) decides and nothing is read",
                pod.namespace, pod.name
            ),
        });
    }
    if let (Some(pod), Some(selection)) = (cx.pod, &cx.selection) {
        let policies: Vec<String> = selection
            .policies()
            .map(|policy| policy.to_string())
            .collect();
        let modes = if selection.has_enforce() {
            "an enforce-mode policy selects it: only enforce-mode rules count"
        } else {
            "only audit-mode policies select it: what they would deny is let through as audit"
        };
        steps.push(Step {
            step: "select".into(),
            outcome: policies.join(", "),
            says: modes.to_owned(),
        });

        let (listed, listed_names, total) =
            record_names(table, pod, DestIp(destination.ip()), records);
        names = listed;
        if total > names.len() {
            names_total = Some(total);
        }
        steps.push(Step {
            step: "names".into(),
            outcome: if names.is_empty() {
                "none".to_owned()
            } else {
                names.iter().map(name_text).collect::<Vec<_>>().join(", ")
            },
            says: if names.is_empty() {
                format!(
                    "the pod resolved no name to {} through the gateway (or the record expired): \
                     only a cidr rule can match",
                    destination.ip()
                )
            } else {
                format!(
                    "names this pod resolved to {}; a dnsName rule matches only these",
                    destination.ip()
                )
            },
        });

        grants = cx.grants.iter().map(grant_view).collect();
        if selection.has_enforce() {
            ignored_grants = selection
                .grants(destination.ip(), destination.port(), &listed_names)
                .iter()
                .filter(|grant| grant.mode == Mode::Audit)
                .map(grant_view)
                .collect();
        }
        steps.push(Step {
            step: "grants".into(),
            outcome: if grants.is_empty() {
                "none".to_owned()
            } else {
                grants.iter().map(grant_text).collect::<Vec<_>>().join("; ")
            },
            says: if grants.is_empty() {
                format!(
                    "no rule allows port {} for these names or this address",
                    destination.port()
                )
            } else {
                "rules whose peers and port match; the first message must satisfy one".to_owned()
            },
        });
        let first_says = if !peeked {
            "a tcp rule allows it without reading anything".to_owned()
        } else if cx.grants.is_empty() {
            format!(
                "{} (read only for the log: no rule matches)",
                first.describe()
            )
        } else {
            first.describe()
        };
        steps.push(Step {
            step: "peek".into(),
            outcome: if peeked {
                first.protocol().as_str().to_owned()
            } else {
                "nothing read".to_owned()
            },
            says: first_says,
        });
    }
    let granted = outcome.as_ref().ok();
    let facts = why::Facts {
        pod: cx.pod.map(|pod| format!("{}/{}", pod.namespace, pod.name)),
        destination: Some(destination),
        names: names.iter().map(|n| n.name.clone()).collect(),
        requested: cx
            .peeked
            .as_ref()
            .and_then(|p| p.requested_name())
            .map(DnsName::to_string),
        first_message: peeked.then(|| first.describe()),
        policy: granted.map(|g| g.policy.to_string()),
        rule: granted.map(|g| g.rule),
    };
    steps.push(Step {
        step: "verdict".into(),
        outcome: format!("{} ({})", verdict.as_str(), reason.as_str()),
        says: why::says(reason.as_str(), verdict.as_str(), &facts),
    });
    AddressTrace {
        destination,
        verdict,
        reason: reason.as_str().to_owned(),
        detail,
        policy: granted.map(|g| g.policy.to_string()),
        rule: granted.map(|g| g.rule),
        names,
        names_total,
        grants,
        ignored_grants,
        first_message: peeked.then(|| first.describe()),
        steps,
    }
}

/// The live names of the pod's records for `dst`, under any of its addresses, at most
/// [`NAMES_SHOWN`] (as shown, and as names), and how many there are.
fn record_names(
    table: &NameTable,
    pod: &Pod,
    dst: DestIp,
    records: Records,
) -> (Vec<NameView>, Vec<DnsName>, usize) {
    let now = std::time::Instant::now();
    let mut names: Vec<NameView> = Vec::new();
    let mut listed: Vec<DnsName> = Vec::new();
    let mut total = 0;
    for pod_ip in pod.table_ips() {
        table.lifetimes_each(pod_ip, dst, now, |life| {
            if names.iter().any(|n| n.name == life.name.as_str()) {
                return;
            }
            total += 1;
            if names.len() < NAMES_SHOWN {
                listed.push(life.name.clone());
                let seconds = |d: Duration| (records == Records::Live).then_some(d.as_secs());
                names.push(NameView {
                    name: life.name.to_string(),
                    cnames: life.cnames.iter().map(|c| c.to_string()).collect(),
                    ttl_seconds: seconds(life.fresh_left),
                    live_seconds: seconds(life.live_left),
                });
            }
        });
    }
    (names, listed, total)
}

fn name_text(name: &NameView) -> String {
    match (name.ttl_seconds, name.live_seconds) {
        (Some(ttl), Some(live)) => format!("{} (ttl {ttl}s, live {live}s)", name.name),
        _ => name.name.clone(),
    }
}

fn grant_view(grant: &Grant<'_>) -> GrantView {
    let (cidr, names) = match &grant.peer {
        GrantPeer::Cidr(net) => (Some(net.to_string()), Vec::new()),
        GrantPeer::Names(names) => (None, names.iter().map(DnsName::to_string).collect()),
    };
    GrantView {
        policy: grant.policy.to_string(),
        rule: grant.rule,
        mode: mode_text(grant.mode).to_owned(),
        protocol: rule_protocol_text(grant.protocol),
        cidr,
        names,
    }
}

fn grant_text(grant: &GrantView) -> String {
    let peer = match &grant.cidr {
        Some(cidr) => format!("cidr {cidr}"),
        None => grant.names.join(", "),
    };
    format!(
        "{} rule {} {} ({peer})",
        grant.policy, grant.rule, grant.protocol
    )
}

fn rule_protocol_text(protocol: &RuleProtocol) -> String {
    match protocol {
        RuleProtocol::Tcp => "tcp".to_owned(),
        RuleProtocol::Tls => "tls".to_owned(),
        RuleProtocol::Http => "http".to_owned(),
        RuleProtocol::Udp => "udp".to_owned(),
        RuleProtocol::Postgresql(rule) => {
            let list = |items: &[String]| {
                if items.is_empty() {
                    "any".to_owned()
                } else {
                    items.join("|")
                }
            };
            format!(
                "postgresql databases={} users={}",
                list(&rule.databases),
                list(&rule.users)
            )
        }
    }
}

fn mode_text(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "none".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn pod_view(pod: &Pod) -> PodView {
    PodView {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        ips: pod.ips.clone(),
        labels: pod.labels.clone(),
        namespace_labels: pod.namespace_labels.clone(),
    }
}

fn selecting_policies(pod: &Pod, policies: &PolicySet) -> Vec<PolicyView> {
    let selection = pod.select(policies);
    policies
        .policies()
        .filter(|policy| selection.policies().any(|r| r == policy.reference()))
        .map(|policy| PolicyView {
            policy: policy.reference().to_string(),
            kind: match policy.reference().kind {
                PolicyKind::EgressPolicy => "EgressPolicy",
                PolicyKind::ClusterEgressPolicy => "ClusterEgressPolicy",
            }
            .to_owned(),
            mode: mode_text(policy.mode()).to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use egressgate_dns_shim::{Answer, PodIp, TableLimits};

    use super::super::query::Query;
    use super::*;
    use crate::identity::Identities;

    const POLICIES: &str = "\
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: app, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: \"*.example.test\"}]
      ports: [{port: 443, protocol: tls}]
    - to: [{dnsName: ssh.example.test}]
      ports: [{port: 22, protocol: tcp}]
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: watch, namespace: shop}
spec:
  podSelector: {}
  mode: audit
  egress:
    - to: [{dnsName: \"**.test\"}]
      ports: [{port: 443, protocol: tls}]
";
    const PODS: &str =
        "pods:\n  - {name: app-1, namespace: shop, ips: [198.18.1.2], labels: {role: app}}\n";
    const POD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 1, 2));
    const DST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 19, 0, 10));

    fn snapshot() -> Snapshot {
        let parsed = egressgate_policy::parse_policies("p.yaml", POLICIES).expect("parses");
        Snapshot {
            policies: Arc::new(PolicySet::new(parsed).expect("compiles")),
            identities: Arc::new(Identities::parse("pods.yaml", PODS).expect("pods")),
        }
    }

    fn table() -> NameTable {
        NameTable::new(TableLimits {
            min_ttl: Duration::ZERO,
            idle_grace: Duration::from_secs(30),
            max_names_per_pod: 1000,
            max_names: 1000,
        })
    }

    fn record(table: &NameTable, name: &str, ttl: u32) {
        let answer = Answer {
            name: name.parse().expect(name),
            addresses: vec![DST],
            cnames: Vec::new(),
            ttl,
        };
        table.record(PodIp(POD), &answer, std::time::Instant::now());
    }

    fn ask(to: &str, sni: Option<&str>) -> Asked {
        Query {
            pod: "shop/app-1".into(),
            to: to.into(),
            sni: sni.map(str::to_owned),
            ..Query::default()
        }
        .check()
        .expect("valid")
    }

    #[test]
    fn live_records_show_their_time_left_and_audit_grants_are_set_aside() {
        let table = table();
        record(&table, "api.example.test", 60);
        let explained = explain(
            &snapshot(),
            &table,
            &ask("api.example.test:443", None),
            Settings::defaults(),
            Records::Live,
        )
        .expect("explained");
        assert_eq!(
            (explained.verdict, explained.reason.as_str()),
            (Verdict::Allow, "allowed")
        );
        let modes: Vec<(&str, &str)> = explained
            .policies
            .iter()
            .map(|p| (p.policy.as_str(), p.mode.as_str()))
            .collect();
        assert_eq!(modes, [("shop/app", "enforce"), ("shop/watch", "audit")]);
        let address = &explained.addresses[0];
        assert_eq!(address.destination, SocketAddr::new(DST, 443));
        let name = &address.names[0];
        assert_eq!(name.name, "api.example.test");
        let ttl = name.ttl_seconds.expect("live: a ttl");
        assert!((59..=60).contains(&ttl), "{name:?}");
        assert_eq!(name.live_seconds, Some(ttl + 30));
        assert_eq!((address.grants.len(), address.ignored_grants.len()), (1, 1));
        assert_eq!(address.ignored_grants[0].policy, "shop/watch");
        assert_eq!(
            (address.policy.as_deref(), address.rule),
            (Some("shop/app"), Some(0))
        );
    }

    #[test]
    fn a_tcp_grant_allows_before_any_peek() {
        let table = table();
        record(&table, "ssh.example.test", 60);
        let explained = explain(
            &snapshot(),
            &table,
            &ask("ssh.example.test:22", None),
            Settings::defaults(),
            Records::Live,
        )
        .expect("explained");
        let address = &explained.addresses[0];
        assert_eq!(
            (address.verdict, address.reason.as_str()),
            (Verdict::Allow, "allowed")
        );
        let peek = address
            .steps
            .iter()
            .find(|s| s.step == "peek")
            .expect("peek step");
        assert_eq!(peek.outcome, "nothing read");
        assert_eq!(address.first_message, None);
    }

    #[test]
    fn past_the_names_a_connection_carries_the_verdict_is_a_full_looks() {
        let table = table();
        for i in 0..100 {
            record(&table, &format!("n{i}.other.test"), 60);
        }
        record(&table, "late.example.test", 60);
        let snapshot = snapshot();
        let ask_for = |sni| {
            explain(
                &snapshot,
                &table,
                &ask("198.19.0.10:443", Some(sni)),
                Settings::defaults(),
                Records::Live,
            )
            .expect("explained")
        };
        let allowed = ask_for("late.example.test");
        assert_eq!(allowed.reason, "allowed", "{allowed:#?}");
        assert_eq!(allowed.addresses[0].names_total, Some(101));
        assert_eq!(allowed.addresses[0].names.len(), NAMES_SHOWN);
        let denied = ask_for("n3.other.test");
        assert_eq!(
            (denied.verdict, denied.reason.as_str()),
            (Verdict::Deny, "sni_mismatch")
        );
    }

    #[test]
    fn a_name_the_pod_never_resolved_and_an_unknown_pod_are_errors() {
        let table = table();
        let snapshot = snapshot();
        let never = explain(
            &snapshot,
            &table,
            &ask("api.example.test:443", None),
            Settings::defaults(),
            Records::Live,
        );
        assert!(
            matches!(never, Err(ExplainError::NotResolved { .. })),
            "{never:?}"
        );
        let mut nobody = ask("198.19.0.10:443", None);
        nobody.pod.name = "nobody".into();
        let unknown = explain(
            &snapshot,
            &table,
            &nobody,
            Settings::defaults(),
            Records::Live,
        );
        assert_eq!(
            unknown,
            Err(ExplainError::UnknownPod {
                pod: "shop/nobody".into(),
                known: 1
            })
        );
    }
}
