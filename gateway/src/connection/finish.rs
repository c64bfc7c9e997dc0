//! The end of every decision, whatever the stages concluded: the decision line and the decision
//! metrics, both read from the context. A new log field is added here, never in a stage.

use egressgate_policy::DnsName;

use super::context::{Context, Granted, ResolvedNames};
use super::stop::Stop;
use crate::decision::{Reason, Verdict};
use crate::events::{DecisionLine, LoggedNames, PodName};
use crate::metrics::Metrics;
use crate::peek::http::RequestHead;
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
    elapsed: std::time::Duration,
    metrics: &Metrics,
) {
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
    // What a suggested policy needs, only where one may be wanted: no enforce policy selects.
    let learnable = !cx.selection.as_ref().is_some_and(|s| s.has_enforce());
    DecisionLine {
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
            labels: learnable.then_some(&pod.labels),
            owner: pod.owner.as_ref().filter(|_| learnable),
        }),
        source: cx.client.0,
        destination: cx.destination.0,
        names: LoggedNames {
            names: &cx.resolved.names,
            first: requested_position(cx),
            max: ResolvedNames::LOGGED,
        },
        names_total: (cx.resolved.total > cx.resolved.logged().len()).then_some(cx.resolved.total),
        cnames: cx.resolved.logged_cnames(),
        protocol: cx.protocol,
        sni: hello.and_then(|hello| hello.server_name.as_deref()),
        alpn: hello.map_or(&[], |hello| &hello.alpn),
        ech: hello.map(|hello| hello.ech_offered),
        host: head.and_then(|head| head.host.as_ref()),
        database: startup.map(|startup| startup.database.as_str()),
        user: startup.map(|startup| startup.user.as_str()),
        replication: startup.and_then(|startup| startup.replication.as_deref()),
        postgresql_encryption,
        policy: granted.map(|granted| granted.policy),
        rule: granted.map(|granted| granted.rule),
        decision_us: 0,
    }
}

/// Where the name the first message asked for is among the names the pod resolved, so that
/// the line lists it first (`egressgate suggest` and people read the first name as the one
/// used). The names are few.
fn requested_position(cx: &Context<'_>) -> Option<usize> {
    let requested = cx.peeked.as_ref().and_then(Peeked::requested_name)?;
    cx.resolved.names.iter().position(|name| name == requested)
}

/// What the pod tried to reach, for the denied-destinations metric: the name (or HTTP host
/// address) it sent, else the name it resolved, else the address.
fn wanted_destination(cx: &Context<'_>) -> String {
    if let Some(Peeked::Http(RequestHead {
        host: Some(host), ..
    })) = &cx.peeked
    {
        return host.to_string();
    }
    cx.peeked
        .as_ref()
        .and_then(Peeked::requested_name)
        .or_else(|| cx.resolved.names.first())
        .map_or_else(|| cx.destination.ip().to_string(), DnsName::to_string)
}

#[cfg(test)]
mod tests {
    use egressgate_policy::{PolicyKind, PolicyRef};
    use tokio::time::Instant;

    use super::*;
    use crate::connection::addr::{ClientAddr, OrigDstAddr};
    use crate::decision::PolicyDenial;
    use crate::identity::Pod;
    use crate::peek::postgres::{peek_first_message, PgMessage};
    use crate::peek::tls::peek_client_hello;
    use crate::peek::{Invalid, Peek};

    fn pod() -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "app-1".into(),
            labels: Default::default(),
            namespace_labels: Default::default(),
            owner: None,
            ips: vec![[192, 0, 2, 2].into()],
            selection: Default::default(),
        }
    }

    fn context(pod: &Pod, port: u16) -> Context<'_> {
        let mut cx = Context::new(
            7,
            Instant::now(),
            ClientAddr(([192, 0, 2, 2], 40000).into()),
            OrigDstAddr(([192, 0, 2, 10], port).into()),
        );
        cx.pod = Some(pod);
        cx.resolved = ResolvedNames {
            names: vec!["api.example.test".parse().expect("valid")],
            cnames: vec!["lb.cdn.example.test".into()],
            ..ResolvedNames::default()
        };
        cx
    }

    /// The line as printed, with an empty `time`.
    fn json(cx: &Context<'_>, outcome: &Result<Granted, Stop>, verdict: Verdict) -> String {
        crate::events::with_empty_time(|line| {
            decision_line(cx, outcome, verdict).write_fields(line)
        })
    }

    /// The fields, their order and their values are what logs, dashboards and alerts read.
    #[test]
    fn an_allowed_tls_decision_line_keeps_its_shape() {
        let capture = include_bytes!(
            "../peek/testdata/tls/curl-7.88.1-default-sni-api.example.test-alpn-h2-http1.1.bin"
        );
        let Peek::Complete(hello) = peek_client_hello(capture) else {
            panic!("capture is a whole ClientHello");
        };
        let pod = pod();
        let mut cx = context(&pod, 443);
        cx.protocol = Some(Protocol::Tls);
        cx.peeked = Some(Peeked::Tls(hello));
        let policy = PolicyRef {
            kind: PolicyKind::EgressPolicy,
            namespace: Some("shop".into()),
            name: "web".into(),
        };
        let granted = Granted {
            policy: &policy,
            rule: 0,
            names: vec!["api.example.test".parse().expect("valid")],
        };
        assert_eq!(
            json(&cx, &Ok(granted), Verdict::Allow),
            r#"{"time":"","event":"decision","connection":7,"verdict":"allow","reason":"allowed","pod":{"namespace":"shop","name":"app-1","labels":{}},"source":"192.0.2.2:40000","destination":"192.0.2.10:443","names":["api.example.test"],"cnames":["lb.cdn.example.test"],"protocol":"tls","sni":"api.example.test","alpn":["h2","http/1.1"],"ech":false,"policy":"shop/web","rule":0,"decisionUs":0}"#
        );
    }

    /// A Host that is an IP literal is typed apart from a name, yet the line writes it as it
    /// always did, and the denied-destinations metric names it.
    #[test]
    fn an_ip_literal_host_is_written_as_text_and_is_the_wanted_destination() {
        let capture = include_bytes!("../peek/testdata/http/curl-7.88.1-ipv6-literal-host.bin");
        let Peek::Complete(head) = crate::peek::http::peek_request_head(capture) else {
            panic!("capture is a whole request head");
        };
        let pod = pod();
        let mut cx = context(&pod, 80);
        cx.protocol = Some(Protocol::Http);
        cx.peeked = Some(Peeked::Http(head));
        let line = json(
            &cx,
            &Err(Stop::new(PolicyDenial::HostMismatch)),
            Verdict::Deny,
        );
        assert!(line.contains(r#""host":"::1""#), "{line}");
        assert_eq!(wanted_destination(&cx), "::1");
    }

    /// The name the ClientHello asked for leads `names`, even past the eighth.
    #[test]
    fn the_requested_name_is_listed_first() {
        let capture = include_bytes!(
            "../peek/testdata/tls/curl-7.88.1-default-sni-api.example.test-alpn-h2-http1.1.bin"
        );
        let Peek::Complete(hello) = peek_client_hello(capture) else {
            panic!("capture is a whole ClientHello");
        };
        let pod = pod();
        let mut cx = context(&pod, 443);
        let mut names: Vec<DnsName> = (0..10)
            .map(|n| format!("n{n}.example.test").parse().expect("valid"))
            .collect();
        names.push("api.example.test".parse().expect("valid"));
        cx.resolved = ResolvedNames {
            total: names.len(),
            names,
            ..ResolvedNames::default()
        };
        cx.protocol = Some(Protocol::Tls);
        cx.peeked = Some(Peeked::Tls(hello));
        let line = json(
            &cx,
            &Err(Stop::new(PolicyDenial::NotAllowed)),
            Verdict::Deny,
        );
        assert!(
            line.contains(r#""names":["api.example.test","n0.example.test","n1.example.test","n2.example.test","n3.example.test","n4.example.test","n5.example.test","n6.example.test"],"namesTotal":11,"#),
            "{line}"
        );
    }

    /// Labels and owner go only into lines of pods no enforce-mode policy selects.
    #[test]
    fn labels_and_owner_are_logged_only_for_pods_no_enforce_policy_selects() {
        let policies = |mode: &str| {
            let yaml = format!(
                "apiVersion: egressgate.dev/v1alpha1\nkind: EgressPolicy\n\
                 metadata: {{name: p, namespace: shop}}\n\
                 spec:\n  podSelector: {{}}\n  mode: {mode}\n  egress: []\n"
            );
            let parsed = egressgate_policy::parse_policies("p.yaml", &yaml).expect("parses");
            egressgate_policy::PolicySet::new(parsed).expect("compiles")
        };
        let mut pod = pod();
        pod.labels.insert("app".into(), "web".into());
        pod.owner = Some(crate::identity::Owner {
            kind: "ReplicaSet".into(),
            name: "web-7c9d".into(),
        });
        let denied = Err(Stop::new(PolicyDenial::NotAllowed));
        let (audit, enforce) = (policies("audit"), policies("enforce"));

        let mut cx = context(&pod, 443);
        cx.selection = Some(pod.select(&audit));
        let line = json(&cx, &denied, Verdict::Audit);
        assert!(
            line.contains(r#""pod":{"namespace":"shop","name":"app-1","labels":{"app":"web"},"owner":{"kind":"ReplicaSet","name":"web-7c9d"}}"#),
            "{line}"
        );

        let mut cx = context(&pod, 443);
        cx.selection = Some(pod.select(&enforce));
        let line = json(&cx, &denied, Verdict::Deny);
        assert!(
            line.contains(r#""pod":{"namespace":"shop","name":"app-1"},"#),
            "{line}"
        );
    }

    #[test]
    fn denied_postgresql_lines_keep_their_shape() {
        let capture = include_bytes!(
            "../peek/testdata/postgres/psql-15-replication-database-startup-v3.0.bin"
        );
        let Peek::Complete(first) = peek_first_message(capture) else {
            panic!("capture is a whole startup");
        };
        let PgMessage::Startup(startup) = first.message else {
            panic!("capture is a startup");
        };
        let pod = pod();
        let mut cx = context(&pod, 5432);
        cx.protocol = Some(Protocol::Postgresql);
        cx.peeked = Some(Peeked::Postgres(PgFirst::Startup(startup)));
        let denied = Err(Stop::new(PolicyDenial::PostgresqlDenied));
        assert_eq!(
            json(&cx, &denied, Verdict::Audit),
            r#"{"time":"","event":"decision","connection":7,"verdict":"audit","reason":"postgresql_denied","pod":{"namespace":"shop","name":"app-1","labels":{}},"source":"192.0.2.2:40000","destination":"192.0.2.10:5432","names":["api.example.test"],"cnames":["lb.cdn.example.test"],"protocol":"postgresql","database":"orders","user":"app","replication":"database","decisionUs":0}"#
        );

        let mut cx = context(&pod, 5432);
        cx.protocol = Some(Protocol::Postgresql);
        cx.peeked = Some(Peeked::Postgres(PgFirst::Encrypted(PgEncryption::Gssapi)));
        let encrypted = Err(Stop::new(PolicyDenial::PostgresqlEncrypted));
        assert_eq!(
            json(&cx, &encrypted, Verdict::Deny),
            r#"{"time":"","event":"decision","connection":7,"verdict":"deny","reason":"postgresql_encrypted","pod":{"namespace":"shop","name":"app-1","labels":{}},"source":"192.0.2.2:40000","destination":"192.0.2.10:5432","names":["api.example.test"],"cnames":["lb.cdn.example.test"],"protocol":"postgresql","postgresqlEncryption":"gssapi","decisionUs":0}"#
        );
    }

    #[test]
    fn malformed_and_unknown_source_lines_keep_their_shape() {
        let pod = pod();
        let mut cx = context(&pod, 443);
        cx.protocol = Some(Protocol::Tls);
        let malformed = Err(Stop::invalid(Invalid::TlsSniIpLiteral));
        assert_eq!(
            json(&cx, &malformed, Verdict::Deny),
            r#"{"time":"","event":"decision","connection":7,"verdict":"deny","reason":"malformed","detail":"tls_sni_ip_literal","pod":{"namespace":"shop","name":"app-1","labels":{}},"source":"192.0.2.2:40000","destination":"192.0.2.10:443","names":["api.example.test"],"cnames":["lb.cdn.example.test"],"protocol":"tls","decisionUs":0}"#
        );

        let cx = Context::new(
            8,
            Instant::now(),
            ClientAddr(([192, 0, 2, 3], 40001).into()),
            OrigDstAddr(([192, 0, 2, 10], 443).into()),
        );
        let unknown = Err(Stop::new(Reason::UnknownSource));
        assert_eq!(
            json(&cx, &unknown, Verdict::Deny),
            r#"{"time":"","event":"decision","connection":8,"verdict":"deny","reason":"unknown_source","pod":null,"source":"192.0.2.3:40001","destination":"192.0.2.10:443","names":[],"cnames":[],"decisionUs":0}"#
        );
    }
}
