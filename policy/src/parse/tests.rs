//! Parser tests, with exact positions checked by hand against the fixtures.

use super::*;

/// The example from the policy format spec, verbatim.
const SPEC_EXAMPLE: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy            # namespaced; ClusterEgressPolicy has no metadata.namespace and adds spec.namespaceSelector
metadata: {name: orders-db, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}     # LabelSelector: matchLabels + matchExpressions (In, NotIn, Exists, DoesNotExist); {} = all pods
  mode: enforce                               # enforce | audit   (default enforce)
  egress:
    - to:
        - dnsName: db.corp.example            # exact, case-insensitive, trailing dot ignored
        - dnsName: "*.db.corp.example"        # exactly one label
        - dnsName: "**.googleapis.com"        # one or more labels; `*`/`**` only as the whole first label
        - cidr: 192.0.2.0/24                  # legacy peers by address (IPv4 and IPv6; a bare IP = /32 or /128)
      ports:
        - {port: 5432, protocol: postgresql, postgresql: {databases: [orders], users: [app], allowEncrypted: false}}
        - {port: 443, endPort: 8443, protocol: tls}
        - {port: 80, protocol: http}
        - {port: 22, protocol: tcp}
"#;

const CLUSTER_EXAMPLE: &str = r#"
# Cluster-wide baseline.
---
apiVersion: egressgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata:
  name: baseline
  labels: {team: platform}
spec:
  namespaceSelector:
    matchExpressions:
      - {key: env, operator: In, values: [prod, staging]}
      - {key: legacy, operator: DoesNotExist}
  podSelector: {}
  mode: audit
  egress:
    - to: [{cidr: "2001:db8::/32"}, {cidr: 198.51.100.7}]
      ports: [{port: 53, protocol: tcp}]
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: nothing, namespace: shop}
spec: {podSelector: {matchExpressions: [{key: role, operator: Exists}]}, egress: []}
---
"#;

fn errors(text: &str) -> Vec<LoadError> {
    parse_policies("policies/shop.yaml", text).expect_err("should fail")
}

fn one_error(text: &str) -> String {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors[0].to_string()
}

/// A valid document with `line` replaced, for position tests.
fn doc(replace: &str, with: &str) -> String {
    let base = "\
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: ok, namespace: shop}
spec:
  podSelector: {}
  egress:
    - to:
        - dnsName: db.corp.example
      ports:
        - {port: 443, protocol: tls}
";
    assert!(base.contains(replace), "{replace}");
    base.replace(replace, with)
}

#[test]
fn spec_example_parses_to_the_expected_model() {
    let policies = parse_policies("shop.yaml", SPEC_EXAMPLE).expect("valid");
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert_eq!(p.reference().to_string(), "shop/orders-db");
    assert_eq!(p.reference().kind, PolicyKind::EgressPolicy);
    assert_eq!(p.mode(), Mode::Enforce);
    assert_eq!(p.namespace_selector(), None);
    assert_eq!(p.origin().line, 1);
    let rule = &p.egress()[0];
    assert_eq!(rule.to().len(), 4);
    assert!(matches!(&rule.to()[1], Peer::DnsName(n) if n.to_string() == "*.db.corp.example"));
    assert!(matches!(&rule.to()[3], Peer::Cidr(c) if c.to_string() == "192.0.2.0/24"));
    let ports = rule.ports();
    assert_eq!(ports.len(), 4);
    assert_eq!(
        ports[0].protocol(),
        &Protocol::Postgresql(PostgresRule {
            databases: vec!["orders".into()],
            users: vec!["app".into()],
            allow_encrypted: false,
        })
    );
    assert_eq!(
        ports[1].range(),
        PortRange::new(443, Some(8443)).expect("range")
    );
    assert_eq!(ports[2].protocol(), &Protocol::Http);
    assert_eq!(ports[3].protocol(), &Protocol::Tcp);
}

#[test]
fn cluster_example_parses_and_skips_empty_documents() {
    let policies = parse_policies("cluster.yaml", CLUSTER_EXAMPLE).expect("valid");
    assert_eq!(policies.len(), 2);
    let baseline = &policies[0];
    assert_eq!(baseline.reference().to_string(), "baseline");
    assert_eq!(baseline.reference().namespace, None);
    assert_eq!(baseline.mode(), Mode::Audit);
    assert!(baseline.namespace_selector().is_some());
    assert!(baseline.pod_selector().is_everything());
    assert_eq!(baseline.origin().to_string(), "cluster.yaml:4:1");
    let nothing = &policies[1];
    assert!(nothing.egress().is_empty());
    assert_eq!(nothing.origin().line, 20);
    assert_eq!(parse_policies("e.yaml", ""), Ok(vec![]));
    assert_eq!(
        parse_policies("e.yaml", "# only a comment\n---\n---\n"),
        Ok(vec![])
    );
}

#[test]
fn every_example_rejects_an_unknown_key_in_each_mapping() {
    // Like hickory's test_reject_unknown_fields: a typo in a security rule is an error.
    let cases = [
        (
            SPEC_EXAMPLE,
            "kind: EgressPolicy ",
            "typo: 1\nkind: EgressPolicy ",
            2,
        ),
        (
            SPEC_EXAMPLE,
            "{name: orders-db, ",
            "{typo: 1, name: orders-db, ",
            3,
        ),
        (SPEC_EXAMPLE, "spec:\n", "spec:\n  typo: 1\n", 5),
        (SPEC_EXAMPLE, "{matchLabels:", "{typo: 1, matchLabels:", 5),
        (SPEC_EXAMPLE, "- to:\n", "- typo: 1\n      to:\n", 8),
        (
            SPEC_EXAMPLE,
            "- dnsName: db.",
            "- typo: 1\n          dnsName: db.",
            9,
        ),
        (SPEC_EXAMPLE, "postgresql: {", "postgresql: {typo: 1, ", 14),
        (SPEC_EXAMPLE, "{port: 80,", "{typo: 1, port: 80,", 16),
        (
            CLUSTER_EXAMPLE,
            "name: baseline\n",
            "name: baseline\n  typo: 1\n",
            8,
        ),
        (CLUSTER_EXAMPLE, "{key: env,", "{typo: 1, key: env,", 12),
    ];
    for (example, from, to, line) in cases {
        assert!(example.contains(from), "{from}");
        let errors = errors(&example.replacen(from, to, 1));
        assert_eq!(errors.len(), 1, "{from}: {errors:#?}");
        assert_eq!(errors[0].line, line, "{from}: {}", errors[0]);
        assert!(
            errors[0].message.contains("unknown field `typo`"),
            "{}",
            errors[0]
        );
    }
}

#[test]
fn unknown_key_points_at_the_key() {
    let text = doc(
        "  podSelector: {}\n",
        "  podSelector: {}\n  podSelektor: {}\n",
    );
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:6:3: spec: unknown field `podSelektor`, expected one of \
             `podSelector`, `namespaceSelector`, `mode`, `egress`"
    );
}

#[test]
fn bad_dns_name_points_at_the_value() {
    let text = doc("db.corp.example", "\"*.\"");
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:8:20: spec.egress[0].to[0].dnsName: invalid dnsName \"*.\": \
             a wildcard needs at least one label after it, e.g. `*.example.com`"
    );
    let text = doc("db.corp.example", "db.*.example");
    assert!(one_error(&text).starts_with("policies/shop.yaml:8:20: "));
}

#[test]
fn end_port_below_port_points_at_the_port_entry() {
    let text = doc(
        "{port: 443, protocol: tls}",
        "{port: 443, endPort: 80, protocol: tls}",
    );
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:10:11: spec.egress[0].ports[0]: endPort 80 is below port 443"
    );
}

#[test]
fn bad_api_version_points_at_the_value() {
    let text = doc("v1alpha1", "v1beta1");
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:1:13: apiVersion: invalid apiVersion \"egressgate.dev/v1beta1\": \
             expected egressgate.dev/v1alpha1"
    );
}

#[test]
fn wrong_kind_points_at_the_value() {
    let text = doc("kind: EgressPolicy", "kind: NetworkPolicy");
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:2:7: kind: invalid kind \"NetworkPolicy\": \
             expected EgressPolicy or ClusterEgressPolicy"
    );
}

#[test]
fn missing_namespace_points_at_metadata() {
    let text = doc(
        "metadata: {name: ok, namespace: shop}",
        "metadata: {name: ok}",
    );
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:3:11: metadata: EgressPolicy needs metadata.namespace \
             (ClusterEgressPolicy is the cluster-wide kind)"
    );
}

#[test]
fn kind_after_metadata_is_still_checked_against_it() {
    let text = doc("kind: EgressPolicy\n", "").replace(
        "metadata: {name: ok, namespace: shop}",
        "metadata: {name: ok}\nkind: EgressPolicy",
    );
    let err = one_error(&text);
    assert!(
        err.starts_with("policies/shop.yaml:1:1: EgressPolicy needs"),
        "{err}"
    );
    let text = doc("kind: EgressPolicy", "kind: ClusterEgressPolicy");
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:3:11: metadata: ClusterEgressPolicy must not set metadata.namespace"
    );
}

#[test]
fn namespace_selector_only_on_cluster_policies() {
    let text = doc(
        "  podSelector: {}\n",
        "  podSelector: {}\n  namespaceSelector: {}\n",
    );
    let err = one_error(&text);
    assert!(
        err.starts_with("policies/shop.yaml:5:3: spec: namespaceSelector is only allowed"),
        "{err}"
    );
}

#[test]
fn yaml_syntax_error_is_positioned_and_later_documents_still_parse() {
    let text = format!(
        "{}---\n{}---\n{}",
        doc("name: ok", "name: first"),
        doc("kind: EgressPolicy", "kind: EgressPolicy: x"),
        doc("db.corp.example", "db..example")
    );
    let errs = errors(&text);
    assert_eq!(
        errs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "policies/shop.yaml:13:19: mapping values are not allowed in this context",
            "policies/shop.yaml:30:20: spec.egress[0].to[0].dnsName: invalid dnsName \
                 \"db..example\": empty label (two dots in a row, or a leading dot)",
        ]
    );
    // The document's events are read up to a syntax error, so earlier semantic errors win;
    // here the first token is already bad.
    let text = format!("{}---\n{}", doc("", ""), "\tspec: {}\n");
    let errors = errors(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!((errors[0].line, errors[0].column), (12, 1), "{}", errors[0]);
}

#[test]
fn every_bad_document_is_reported() {
    let text = [
        doc("v1alpha1", "v2"),
        doc("", ""),
        doc("tls}", "quic}"),
        doc("db.corp.example", "10.0.0.1"),
        doc("{port: 443,", "{port: 70000,"),
        doc("{port: 443, protocol: tls}", "{port: 443}"),
        doc(
            "dnsName: db.corp.example",
            "{dnsName: a.example, cidr: 10.0.0.0/8}",
        ),
        doc(
            "    - to:\n        - dnsName: db.corp.example\n",
            "    - to: []\n",
        ),
        doc(
            "{port: 443, protocol: tls}",
            "{port: 443, protocol: tls, postgresql: {}}",
        ),
    ]
    .join("---\n");
    let got: Vec<String> = errors(&text).iter().map(ToString::to_string).collect();
    let want = [
        "policies/shop.yaml:1:13: apiVersion: invalid apiVersion \"egressgate.dev/v2\": \
             expected egressgate.dev/v1alpha1",
        "policies/shop.yaml:32:33: spec.egress[0].ports[0].protocol: invalid protocol \"quic\": \
             expected one of tcp, tls, http, postgresql, udp",
        "policies/shop.yaml:41:20: spec.egress[0].to[0].dnsName: invalid dnsName \"10.0.0.1\": \
             an IP address is not a DNS name (use `cidr`)",
        "policies/shop.yaml:54:18: spec.egress[0].ports[0].port: invalid value: \
             integer `70000`, expected a nonzero u16",
        "policies/shop.yaml:65:11: spec.egress[0].ports[0]: protocol is required: \
             one of tcp, tls, http, postgresql, udp",
        "policies/shop.yaml:74:11: spec.egress[0].to[0]: a peer needs exactly one of \
             dnsName or cidr",
        "policies/shop.yaml:84:11: spec.egress[0].to: must list at least one entry",
        "policies/shop.yaml:97:11: spec.egress[0].ports[0]: `postgresql` settings need \
             protocol: postgresql",
    ];
    assert_eq!(got, want);
}

#[test]
fn udp_entries_parse_for_names_and_cidrs_and_refuse_postgresql_settings() {
    let text = doc(
        "{port: 443, protocol: tls}",
        "{port: 51820, endPort: 51821, protocol: udp}",
    );
    let policies = parse_policies("policies/shop.yaml", &text).expect("valid");
    let port = &policies[0].egress()[0].ports()[0];
    assert_eq!(port.protocol(), &Protocol::Udp);
    assert_eq!(port.range().to_string(), "51820-51821");

    let text = doc(
        "{port: 443, protocol: tls}",
        "{port: 51820, protocol: udp, postgresql: {users: [app]}}",
    );
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:10:11: spec.egress[0].ports[0]: `postgresql` settings do not apply \
         to protocol: udp (a udp rule allows datagrams to its ports, nothing more)"
    );
}

#[test]
fn port_zero_and_bad_cidr_point_at_the_value() {
    let text = doc("{port: 443,", "{port: 0,");
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:10:18: spec.egress[0].ports[0].port: invalid value: \
             integer `0`, expected a nonzero u16"
    );
    let text = doc("dnsName: db.corp.example", "cidr: 10.0.0.1/8");
    assert_eq!(
        one_error(&text),
        "policies/shop.yaml:8:17: spec.egress[0].to[0].cidr: invalid cidr \"10.0.0.1/8\": \
             host bits are set; did you mean 10.0.0.0/8?"
    );
}

#[test]
fn missing_fields_are_named() {
    let text = doc("  podSelector: {}\n", "");
    assert!(one_error(&text).contains("spec: missing field `podSelector`"));
    let text = doc("apiVersion: egressgate.dev/v1alpha1\n", "");
    assert!(one_error(&text).contains("missing field `apiVersion`"));
    let text = doc("name: ok, ", "");
    assert!(one_error(&text).contains("metadata: missing field `name`"));
}

#[test]
fn invalid_selector_and_mode_are_rejected() {
    let text = doc(
        "podSelector: {}",
        "podSelector: {matchExpressions: [{key: a, operator: in}]}",
    );
    assert!(one_error(&text).contains("unknown operator \"in\""));
    let text = doc("podSelector: {}", "podSelector: {}\n  mode: dryrun");
    assert!(one_error(&text).contains("invalid mode \"dryrun\": expected enforce or audit"));
    let text = doc("name: ok", "name: Orders_DB");
    assert!(one_error(&text).starts_with("policies/shop.yaml:3:18: metadata.name: invalid name"));
}

#[test]
fn split_documents_keeps_line_numbers() {
    let chunks = split_documents("a: 1\n---\nb: 2\n--- # c\n---x: 3\n");
    let got: Vec<(usize, &str)> = chunks.iter().map(|c| (c.first_line, c.text)).collect();
    assert_eq!(
        got,
        [(0, "a: 1\n"), (1, "---\nb: 2\n"), (3, "--- # c\n---x: 3\n")]
    );
}

#[test]
fn strip_mark_shifts_context_lines() {
    assert_eq!(
        strip_mark(
            "bad at line 2 column 3, while parsing at line 1 column 1",
            2,
            3,
            10
        ),
        "bad, while parsing at line 11 column 1"
    );
    assert_eq!(strip_mark("x: bad at line 2 column 3", 2, 3, 10), "x: bad");
}
