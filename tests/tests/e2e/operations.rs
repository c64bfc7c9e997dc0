//! Running the gateway: policy reloads without restarts (a broken update keeps the last good
//! policies) and the admin endpoint.

use std::time::{Duration, Instant};

use egressgate_lab::{GatewayOptions, Lab};
use serde_json::Value;

use crate::support::{assert_allowed, assert_denied, curl, run_and_decide, SHOP_POLICY};

const EVIL_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: evil-too, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: evil.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

fn lab() -> Lab {
    Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts")
}

/// Waits for the `n`-th `policy_reload` line (1-based) and returns it.
fn nth_reload(lab: &Lab, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = lab.gateway().events("policy_reload").nth(n - 1) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no policy_reload #{n}:\n{}",
            lab.gateway().daemon().output_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn policies_reload_on_change_and_a_broken_update_keeps_the_last_good_set() {
    let lab = lab();
    let ca = lab.ca();
    let evil = curl(&ca, &["https://evil.example.test/"]);
    let (out, d) = run_and_decide(&lab, "a", 443, &evil);
    assert_denied(&out, &d, &["not_allowed"]);

    std::fs::write(lab.policy_dir().join("evil.yaml"), EVIL_POLICY).expect("write policy");
    let reload = nth_reload(&lab, 1);
    assert_eq!(reload["result"], "ok", "{reload}");
    assert_eq!(reload["policies"], 3, "{reload}");
    let (out, d) = run_and_decide(&lab, "a", 443, &evil);
    assert_allowed(&out, &d, "hello from evil.example.test");
    assert_eq!(d.policy(), Some("shop/evil-too"), "{d}");

    let broken = EVIL_POLICY.replace("protocol: tls", "protocol: tlz");
    std::fs::write(lab.policy_dir().join("evil.yaml"), broken).expect("write policy");
    let reload = nth_reload(&lab, 2);
    assert_eq!(reload["result"], "error", "{reload}");
    let errors = reload["errors"].to_string();
    assert!(
        errors.contains("evil.yaml:8:"),
        "error without position: {reload}"
    );
    let (out, d) = run_and_decide(&lab, "a", 443, &evil);
    assert_allowed(&out, &d, "hello from evil.example.test");
}

#[test]
fn admin_endpoint_serves_metrics_health_and_readiness() {
    let lab = lab();
    let ca = lab.ca();
    let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"]));
    assert_allowed(&out, &d, "hello from api.example.test");

    let node = lab.node();
    let ready = node.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:15090/readyz",
    ]);
    assert_eq!(ready.stdout.trim(), "200", "{ready}");
    let health = node.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15090/healthz",
    ]);
    assert!(health.success(), "{health}");

    let metrics = node.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15090/metrics",
    ]);
    assert!(metrics.success(), "{metrics}");
    let text = metrics.stdout;
    for needle in [
        r#"egressgate_connections_total{namespace="shop",protocol="tls",reason="allowed",verdict="allow"} 1"#,
        "egressgate_connections_active",
        "egressgate_decision_duration_seconds_count 1",
        r#"egressgate_peek_duration_seconds_count{protocol="tls"} 1"#,
        "egressgate_policies 2",
        "egressgate_dns_queries_total",
        "egressgate_dns_upstream_duration_seconds",
    ] {
        assert!(text.contains(needle), "no {needle:?} in /metrics:\n{text}");
    }
    // Prometheus's own linter (naming, help, units, histogram shape).
    let lint = node.run_stdin(&["promtool", "check", "metrics"], &text);
    assert!(
        lint.success(),
        "promtool check metrics failed (scripts/install-deps installs it):\n{lint}"
    );
}

#[test]
fn a_new_pods_first_connection_waits_for_its_identity() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions {
            identity_override: Some("pods: []\n".to_owned()),
            ..GatewayOptions::default()
                .policy("shop.yaml", SHOP_POLICY)
                .unselected("deny")
        })
        .start()
        .expect("lab starts");
    let ca = lab.ca();
    // The pod connects before the identity source knows it; the source learns it 300 ms later.
    let (out, d) = std::thread::scope(|scope| {
        let client = scope
            .spawn(|| run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"])));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(lab.identity_file(), lab.identity_yaml()).expect("identity");
        client.join().expect("client")
    });
    assert_allowed(&out, &d, "hello from api.example.test");
    assert_eq!(d.policy(), Some("shop/web"), "{d}");
}
