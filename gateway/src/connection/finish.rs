//! The end of every decision, whatever the stages concluded: the decision line and the decision
//! metrics, both read from the context. A new log field is added here, never in a stage.

use super::context::{Context, Granted};
use super::stop::Stop;
use crate::decision::{Reason, Verdict};
use crate::events::{DecisionLine, PodName};
use crate::metrics::Metrics;
use crate::peek::{Peeked, PgEncryption, PgFirst};
use crate::protocol::Protocol;

/// The `namespace` metric label of connections from no known pod. RFC 1123 labels have no `_`,
/// so no namespace has it; an empty label would take the scrape target's `namespace` instead.
pub const UNKNOWN_NAMESPACE: &str = "_unknown";

/// Prints the decision line and counts the decision.
pub fn finish(
    cx: &Context<'_>,
    outcome: &Result<Granted, Stop>,
    verdict: Verdict,
    metrics: &Metrics,
) {
    let elapsed = cx.accepted.elapsed();
    let mut line = decision_line(cx, outcome, verdict);
    line.decision_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);

    metrics.decision_duration.observe(elapsed.as_secs_f64());
    let protocol = Protocol::label(cx.protocol);
    if let Some(peek_duration) = cx.peek_duration {
        metrics
            .peek_duration
            .with_label_values(&[protocol])
            .observe(peek_duration.as_secs_f64());
    }
    let namespace = cx
        .pod
        .map_or(UNKNOWN_NAMESPACE, |pod| pod.namespace.as_str());
    metrics
        .connections
        .with_label_values(&[verdict.as_str(), line.reason.as_str(), protocol, namespace])
        .inc();
    if verdict != Verdict::Allow {
        metrics.count_denied(namespace, &wanted_destination(cx));
    }
    line.print();
}

fn decision_line<'a>(
    cx: &'a Context<'_>,
    outcome: &'a Result<Granted, Stop>,
    verdict: Verdict,
) -> DecisionLine<'a> {
    let peeked = cx.peeked.as_ref();
    let hello = peeked.and_then(Peeked::client_hello);
    let head = match peeked {
        Some(Peeked::Http(head)) => Some(head),
        _ => None,
    };
    let startup = match peeked {
        Some(Peeked::Postgres(PgFirst::Startup(startup))) => Some(startup),
        _ => None,
    };
    let postgresql_encryption = match peeked {
        Some(Peeked::Postgres(PgFirst::Encrypted(PgEncryption::Tls(_)))) => Some("tls"),
        Some(Peeked::Postgres(PgFirst::Encrypted(PgEncryption::Gssapi))) => Some("gssapi"),
        _ => None,
    };
    let granted = outcome.as_ref().ok();
    DecisionLine {
        time: String::new(),
        event: "decision",
        connection: cx.id,
        verdict,
        reason: match outcome {
            Ok(_) => Reason::Allowed,
            Err(stop) => stop.reason,
        },
        detail: outcome
            .as_ref()
            .err()
            .and_then(|stop| stop.detail.as_ref())
            .map(|detail| detail.code()),
        pod: cx.pod.map(|pod| PodName {
            namespace: &pod.namespace,
            name: &pod.name,
        }),
        source: cx.client.0,
        destination: cx.destination.0,
        names: &cx.names.names,
        cnames: &cx.names.cnames,
        protocol: cx.protocol,
        sni: hello.and_then(|hello| hello.server_name.as_deref()),
        alpn: hello.map_or(&[], |hello| &hello.alpn),
        ech: hello.map(|hello| hello.ech_offered),
        host: head.and_then(|head| head.host.as_deref()),
        database: startup.map(|startup| startup.database.as_str()),
        user: startup.map(|startup| startup.user.as_str()),
        replication: startup.and_then(|startup| startup.replication.as_deref()),
        postgresql_encryption,
        policy: granted.map(|granted| granted.policy.as_str()),
        rule: granted.map(|granted| granted.rule),
        decision_us: 0,
    }
}

/// What the pod tried to reach, for the denied-destinations metric: the name it sent, else the
/// name it resolved, else the address.
fn wanted_destination(cx: &Context<'_>) -> String {
    cx.peeked
        .as_ref()
        .and_then(Peeked::requested_name)
        .or_else(|| cx.names.names.first().map(String::as_str))
        .map_or_else(|| cx.destination.ip().to_string(), str::to_owned)
}
