use std::collections::BTreeMap;

use egressgate_policy::{parse_policies, DnsName, Mode, PodIdentity, PolicySet, Protocol};
use serde_json::{json, Value};

use super::*;

fn options() -> Options {
    Options {
        group_by: GroupBy::Owner,
        wildcard_min: None,
        mode: Mode::Enforce,
    }
}

/// A decision line of a pod in audit mode, as the gateway writes it.
fn line(pod: &str, labels: Value, owner: Value, destination: &str, extra: Value) -> String {
    let mut line = json!({
        "time": "2026-12-06T10:00:00.000Z", "event": "decision", "connection": 1,
        "verdict": "audit", "reason": "not_allowed",
        "pod": {"namespace": "shop", "name": pod, "labels": labels},
        "source": "198.18.1.2:40000", "destination": destination,
        "names": [], "cnames": [], "decisionUs": 10,
    });
    if !owner.is_null() {
        line["pod"]["owner"] = owner;
    }
    if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
        line.extend(extra.clone());
    }
    line.to_string()
}

fn web(pod: &str, destination: &str, extra: Value) -> String {
    line(
        pod,
        json!({"app": "web", "pod-template-hash": "7c9d"}),
        json!({"kind": "ReplicaSet", "name": "web-7c9d"}),
        destination,
        extra,
    )
}

fn run(lines: &[String], options: &Options) -> Suggestion {
    suggest(lines.join("\n").as_bytes(), options).expect("reads")
}

/// What `egressgate check` does with a policy file.
fn compiled(yaml: &str) -> PolicySet {
    let policies =
        parse_policies("suggested.yaml", yaml).unwrap_or_else(|e| panic!("{e:?} in\n{yaml}"));
    PolicySet::new(policies).unwrap_or_else(|e| panic!("{e:?} in\n{yaml}"))
}

/// The protocols of the grants a pod with `labels` gets for `destination` and `names`.
fn granted(
    set: &PolicySet,
    labels: &[(&str, &str)],
    destination: &str,
    names: &[&str],
) -> Vec<String> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let namespace_labels = BTreeMap::new();
    let pod = PodIdentity {
        namespace: "shop",
        name: "any",
        labels: &labels,
        namespace_labels: &namespace_labels,
    };
    let destination: std::net::SocketAddr = destination.parse().expect("address");
    let names: Vec<DnsName> = names.iter().map(|n| n.parse().expect(n)).collect();
    set.select(&pod)
        .grants(destination.ip(), destination.port(), &names)
        .iter()
        .map(|grant| grant.protocol.to_string())
        .collect()
}

#[test]
fn pods_of_one_deployment_share_a_policy_by_their_common_labels() {
    let lines = [
        web(
            "web-7c9d-a",
            "198.19.0.10:443",
            json!({"names": ["api.example.test"], "protocol": "tls", "sni": "api.example.test"}),
        ),
        line(
            "web-7c9d-b",
            json!({"app": "web", "pod-template-hash": "7c9d", "zone": "b"}),
            json!({"kind": "ReplicaSet", "name": "web-7c9d"}),
            "198.19.0.10:80",
            json!({"names": ["api.example.test"], "protocol": "http", "host": "api.example.test"}),
        ),
    ];
    let suggestion = run(&lines, &options());
    assert_eq!((suggestion.policies, suggestion.learned), (1, 2));
    let yaml = &suggestion.yaml;
    assert!(
        yaml.contains("for Deployment shop/web: 2 decision(s)"),
        "{yaml}"
    );
    assert!(
        yaml.contains("  name: web-egress\n  namespace: shop\n"),
        "{yaml}"
    );
    assert!(
        yaml.contains("    matchLabels:\n      \"app\": \"web\"\n  mode: enforce\n"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("pod-template-hash\":"),
        "volatile label kept: {yaml}"
    );
    assert!(!yaml.contains("zone"), "not shared by every pod: {yaml}");
    assert!(
        yaml.contains(
            "    - to:\n        - dnsName: \"api.example.test\"\n      ports:\n        \
             - {port: 80, protocol: http}\n        - {port: 443, protocol: tls}\n"
        ),
        "one rule per name, every port: {yaml}"
    );
    let set = compiled(yaml);
    let app = [("app", "web"), ("pod-template-hash", "8e0f")];
    let names = ["api.example.test"];
    assert_eq!(granted(&set, &app, "198.19.0.10:443", &names), ["tls"]);
    assert_eq!(granted(&set, &app, "198.19.0.10:80", &names), ["http"]);
    assert!(granted(&set, &app, "198.19.0.10:443", &["evil.example.test"]).is_empty());
    assert!(granted(&set, &[("app", "db")], "198.19.0.10:443", &names).is_empty());
}

#[test]
fn grouping_by_a_label_makes_one_policy_per_value_and_leaves_out_pods_without_it() {
    let key = "app.kubernetes.io/name";
    let lines = [
        line(
            "a-1",
            json!({key: "shop"}),
            Value::Null,
            "198.19.0.10:443",
            json!({"names": ["a.example.test"], "protocol": "tls", "sni": "a.example.test"}),
        ),
        line(
            "a-2",
            json!({key: "shop"}),
            json!({"kind": "StatefulSet", "name": "other"}),
            "198.19.0.10:443",
            json!({"names": ["b.example.test"], "protocol": "tls", "sni": "b.example.test"}),
        ),
        line(
            "c-1",
            json!({key: "cart"}),
            Value::Null,
            "198.19.0.11:443",
            json!({"names": ["c.example.test"], "protocol": "tls", "sni": "c.example.test"}),
        ),
        line(
            "loner",
            json!({"role": "x"}),
            Value::Null,
            "198.19.0.11:443",
            json!({"names": ["c.example.test"], "protocol": "tls", "sni": "c.example.test"}),
        ),
    ];
    let options = Options {
        group_by: GroupBy::Label(key.to_owned()),
        ..options()
    };
    let suggestion = run(&lines, &options);
    assert_eq!(suggestion.policies, 2);
    let yaml = &suggestion.yaml;
    assert!(yaml.contains("  name: shop-egress\n"), "{yaml}");
    assert!(yaml.contains("  name: cart-egress\n"), "{yaml}");
    assert!(
        yaml.contains("\"app.kubernetes.io/name\": \"shop\""),
        "{yaml}"
    );
    assert!(
        yaml.contains("dnsName: \"a.example.test\"")
            && yaml.contains("dnsName: \"b.example.test\"")
    );
    assert_eq!(
        suggestion.skipped.get("pods without the --group-by label"),
        Some(&1)
    );
    assert!(
        suggestion.warnings.iter().any(|w| w.contains("shop/loner")),
        "{:?}",
        suggestion.warnings
    );
    let set = compiled(yaml);
    assert_eq!(
        granted(
            &set,
            &[(key, "shop")],
            "198.19.0.10:443",
            &["b.example.test"]
        ),
        ["tls"]
    );
    assert!(granted(
        &set,
        &[(key, "cart")],
        "198.19.0.10:443",
        &["b.example.test"]
    )
    .is_empty());
}

#[test]
fn a_bare_pod_is_its_own_workload_and_one_without_labels_gets_no_policy() {
    let lines = [
        line(
            "job-x",
            json!({"run": "x"}),
            Value::Null,
            "198.19.0.10:443",
            json!({"names": ["a.example.test"], "protocol": "tls", "sni": "a.example.test"}),
        ),
        line(
            "naked",
            json!({}),
            Value::Null,
            "198.19.0.10:443",
            json!({"names": ["a.example.test"], "protocol": "tls", "sni": "a.example.test"}),
        ),
    ];
    let suggestion = run(&lines, &options());
    assert_eq!(suggestion.policies, 1);
    assert!(
        suggestion.yaml.contains("for Pod shop/job-x"),
        "{}",
        suggestion.yaml
    );
    assert!(
        suggestion
            .warnings
            .iter()
            .any(|w| w.contains("Pod shop/naked") && w.contains("no label")),
        "{:?}",
        suggestion.warnings
    );
}

#[test]
fn an_address_becomes_a_cidr_only_when_reached_without_a_resolved_name() {
    let lines = [
        // Resolved and named: a dnsName, though the address is the same.
        web(
            "web-7c9d-a",
            "198.19.0.10:443",
            json!({"names": ["api.example.test", "evil.example.test"], "protocol": "tls", "sni": "api.example.test"}),
        ),
        // No name resolved at all.
        web(
            "web-7c9d-a",
            "198.19.0.99:443",
            json!({"reason": "no_dns_record", "protocol": "tls", "sni": "x.example.test"}),
        ),
        web(
            "web-7c9d-a",
            "[fd00:99::10]:22",
            json!({"reason": "no_dns_record", "protocol": "unknown"}),
        ),
        // TLS without SNI to a resolved name: a dnsName rule would say sni_missing.
        web(
            "web-7c9d-a",
            "198.19.0.12:443",
            json!({"reason": "sni_missing", "names": ["nosni.example.test"], "protocol": "tls"}),
        ),
        // A TCP protocol to a resolved name: the name.
        web(
            "web-7c9d-a",
            "198.19.0.13:6379",
            json!({"names": ["cache.example.test"], "protocol": "unknown"}),
        ),
        // Nothing read (a protocol whose server speaks first): tcp.
        web(
            "web-7c9d-a",
            "198.19.0.14:25",
            json!({"reason": "peek_timeout", "names": ["mail.example.test"]}),
        ),
    ];
    let yaml = run(&lines, &options()).yaml;
    assert!(
        !yaml.contains("198.19.0.10"),
        "a resolved name is never an IP: {yaml}"
    );
    assert!(yaml.contains("dnsName: \"api.example.test\""), "{yaml}");
    assert!(!yaml.contains("evil"), "only the name used: {yaml}");
    assert!(yaml.contains("cidr: \"198.19.0.99/32\""), "{yaml}");
    assert!(yaml.contains("cidr: \"fd00:99::10/128\""), "{yaml}");
    assert!(
        yaml.contains("cidr: \"198.19.0.12/32\"   # TLS without SNI"),
        "{yaml}"
    );
    assert!(
        yaml.contains(
            "dnsName: \"cache.example.test\"\n      ports:\n        - {port: 6379, protocol: tcp}"
        ),
        "{yaml}"
    );
    assert!(
        yaml.contains(
            "dnsName: \"mail.example.test\"\n      ports:\n        - {port: 25, protocol: tcp}"
        ),
        "{yaml}"
    );
    let set = compiled(&yaml);
    let app = [("app", "web")];
    assert_eq!(granted(&set, &app, "198.19.0.99:443", &[]), ["tls"]);
    assert_eq!(granted(&set, &app, "[fd00:99::10]:22", &[]), ["tcp"]);
    assert_eq!(
        granted(&set, &app, "198.19.0.13:6379", &["cache.example.test"]),
        ["tcp"]
    );
}

#[test]
fn sibling_names_fold_into_a_wildcard_from_the_minimum_on() {
    let lines: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|first| {
            let name = format!("{first}.cdn.example.test");
            web("web-7c9d-a", "198.19.0.10:443", json!({"names": [name], "protocol": "tls", "sni": name}))
        })
        .chain([
            web("web-7c9d-a", "198.19.0.10:80", json!({"names": ["a.cdn.example.test"], "protocol": "http", "host": "a.cdn.example.test"})),
            web("web-7c9d-a", "198.19.0.11:443", json!({"names": ["x.other.test"], "protocol": "tls", "sni": "x.other.test"})),
            web("web-7c9d-a", "198.19.0.11:443", json!({"names": ["y.other.test"], "protocol": "tls", "sni": "y.other.test"})),
            // Siblings under a one-label parent are never folded into `*.test`.
            web("web-7c9d-a", "198.19.0.11:443", json!({"names": ["one.test"], "protocol": "tls", "sni": "one.test"})),
            web("web-7c9d-a", "198.19.0.11:443", json!({"names": ["two.test"], "protocol": "tls", "sni": "two.test"})),
            web("web-7c9d-a", "198.19.0.11:443", json!({"names": ["six.test"], "protocol": "tls", "sni": "six.test"})),
        ])
        .collect();
    let unfolded = run(&lines, &options()).yaml;
    assert!(!unfolded.contains('*'), "{unfolded}");
    let folded = run(
        &lines,
        &Options {
            wildcard_min: Some(3),
            ..options()
        },
    )
    .yaml;
    assert!(
        folded.contains("dnsName: \"*.cdn.example.test\"\n      ports:\n        - {port: 80, protocol: http}\n        - {port: 443, protocol: tls}\n"),
        "ports merged: {folded}"
    );
    assert!(!folded.contains("a.cdn.example.test"), "{folded}");
    assert!(
        folded.contains("\"x.other.test\"") && folded.contains("\"y.other.test\""),
        "two < 3: {folded}"
    );
    assert!(
        folded.contains("\"one.test\"") && !folded.contains("*.test\""),
        "{folded}"
    );
    let set = compiled(&folded);
    assert_eq!(
        granted(
            &set,
            &[("app", "web")],
            "198.19.0.10:443",
            &["zzz.cdn.example.test"]
        ),
        ["tls"]
    );
}

#[test]
fn postgresql_rules_list_the_databases_and_users_seen() {
    let pg = |extra: Value| {
        let mut fields = json!({"names": ["db.example.test"], "protocol": "postgresql"});
        if let (Some(fields), Some(extra)) = (fields.as_object_mut(), extra.as_object()) {
            fields.extend(extra.clone());
        }
        web("web-7c9d-a", "198.19.0.20:5432", fields)
    };
    let lines = [
        pg(json!({"database": "orders", "user": "app"})),
        pg(json!({"reason": "postgresql_denied", "database": "audit", "user": "reporter"})),
        pg(json!({})), // a CancelRequest: no startup
    ];
    let yaml = run(&lines, &options()).yaml;
    assert!(
        yaml.contains(
            "dnsName: \"db.example.test\"\n      ports:\n        - port: 5432\n          \
             protocol: postgresql\n          postgresql:\n            \
             databases: [\"audit\", \"orders\"]\n            users: [\"app\", \"reporter\"]\n"
        ),
        "{yaml}"
    );
    assert!(!yaml.contains("allowEncrypted"), "{yaml}");
    let set = compiled(&yaml);
    let names: [DnsName; 1] = ["db.example.test".parse().expect("valid")];
    let destination: std::net::SocketAddr = "198.19.0.20:5432".parse().expect("address");
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let none = BTreeMap::new();
    let pod = PodIdentity {
        namespace: "shop",
        name: "p",
        labels: &labels,
        namespace_labels: &none,
    };
    let selection = set.select(&pod);
    let grants = selection.grants(destination.ip(), destination.port(), &names);
    let Some(Protocol::Postgresql(rule)) = grants.first().map(|grant| grant.protocol) else {
        panic!("a postgresql grant: {grants:?}");
    };
    assert!(rule.allows("orders", "app") && rule.allows("audit", "reporter"));
    assert!(!rule.allows("other", "app"));

    let encrypted = [
        pg(json!({"database": "orders", "user": "app"})),
        pg(json!({"postgresqlEncryption": "gssapi"})),
        pg(json!({"database": "orders", "user": "app", "replication": "true"})),
    ];
    let yaml = run(&encrypted, &options()).yaml;
    assert!(yaml.contains("allowEncrypted: true"), "{yaml}");
    assert!(
        !yaml.contains("databases:"),
        "physical replication needs any database: {yaml}"
    );
    compiled(&yaml);
}

#[test]
fn only_lines_of_audit_and_unselected_pods_teach() {
    let mut enforced: Value = serde_json::from_str(&web(
        "web-7c9d-a",
        "198.19.0.10:443",
        json!({"verdict": "deny"}),
    ))
    .expect("json");
    if let Some(pod) = enforced["pod"].as_object_mut() {
        pod.remove("labels");
        pod.remove("owner");
    }
    let lines = [
        enforced.to_string(),
        web(
            "web-7c9d-a",
            "198.19.0.10:443",
            json!({"verdict": "deny", "reason": "connection_limit"}),
        ),
        web(
            "web-7c9d-a",
            "198.19.0.10:443",
            json!({"reason": "malformed", "detail": "tls_malformed"}),
        ),
        json!({"event": "dns", "pod": "198.18.1.2"}).to_string(),
        "not json".to_owned(),
        json!({"event": "decision", "verdict": "deny", "reason": "unknown_source", "pod": null})
            .to_string(),
        format!(
            "2026-12-06T10:00:00Z stdout F {}",
            web(
                "web-7c9d-a",
                "198.19.0.10:443",
                json!({"reason": "unselected", "verdict": "allow", "names": ["api.example.test"], "protocol": "tls", "sni": "api.example.test"})
            )
        ),
    ];
    let suggestion = run(&lines, &options());
    assert_eq!(suggestion.learned, 1, "{:?}", suggestion.skipped);
    let skipped: Vec<(&str, usize)> = suggestion
        .skipped
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        skipped,
        [
            ("deny verdicts", 1),
            ("enforced or unknown pods", 2),
            ("not a decision line", 1),
            ("reason malformed", 1),
        ]
    );
    assert!(suggestion.yaml.contains("dnsName: \"api.example.test\""));
    let nothing = run(&lines[..3], &options());
    assert_eq!((nothing.policies, nothing.yaml.as_str()), (0, ""));
}

#[test]
fn policy_names_are_rfc1123_labels_and_unique() {
    assert_eq!(render::policy_name("Web_App.v2"), "web-app-v2-egress");
    let long = "x".repeat(80);
    let name = render::policy_name(&long);
    assert!(name.len() <= 63 && name.ends_with("-egress"), "{name}");
    let mut taken = std::collections::BTreeSet::new();
    let key = |name: &str| WorkloadKey {
        namespace: "shop".into(),
        kind: "Deployment".into(),
        name: name.into(),
    };
    assert_eq!(unique_name(&mut taken, &key("web")), "web-egress");
    assert_eq!(unique_name(&mut taken, &key("WEB")), "web-2-egress");
    let yaml = run(
        &[
            line(
                "x",
                json!({"a": "1"}),
                json!({"kind": "Deployment", "name": "web"}),
                "198.19.0.10:443",
                json!({"protocol": "tls"}),
            ),
            line(
                "y",
                json!({"a": "2"}),
                json!({"kind": "StatefulSet", "name": "web"}),
                "198.19.0.10:443",
                json!({"protocol": "tls"}),
            ),
        ],
        &options(),
    )
    .yaml;
    assert_eq!(compiled(&yaml).len(), 2, "{yaml}");
}

#[test]
fn an_unselected_pods_unread_connection_allows_tcp_to_each_name_it_resolved_there() {
    let unread = |destination: &str, names: Value| {
        line(
            "batch-1",
            json!({"role": "batch"}),
            Value::Null,
            destination,
            json!({"verdict": "allow", "reason": "unselected", "names": names}),
        )
    };
    let lines = [
        unread(
            "198.19.0.10:443",
            json!(["api.example.test", "other.example.test"]),
        ),
        unread("198.19.0.30:8443", json!([])),
    ];
    let yaml = run(&lines, &options()).yaml;
    for name in ["api.example.test", "other.example.test"] {
        assert!(
            yaml.contains(&format!(
                "dnsName: \"{name}\"\n      ports:\n        - {{port: 443, protocol: tcp}}\n"
            )),
            "{yaml}"
        );
    }
    assert!(yaml.contains("cidr: \"198.19.0.30/32\""), "{yaml}");
    let set = compiled(&yaml);
    let batch = [("role", "batch")];
    assert_eq!(
        granted(&set, &batch, "198.19.0.10:443", &["other.example.test"]),
        ["tcp"]
    );
}
