//! Audit mode: the connection goes through and the would-be deny is logged.

use egressgate_lab::{addr, GatewayOptions, Lab};

use crate::support::{curl, run_and_decide};

const AUDIT_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: batch-audit, namespace: shop}
spec:
  podSelector: {matchLabels: {role: batch}}
  mode: audit
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

#[test]
fn audit_mode_lets_a_denied_connection_through_and_logs_audit() {
    let lab = Lab::builder()
        .pods(2)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("audit.yaml", AUDIT_POLICY))
        .start()
        .expect("lab starts");
    let ca = lab.ca();
    let (out, d) = run_and_decide(&lab, "b", 443, &curl(&ca, &["https://evil.example.test/"]));
    assert!(out.success(), "audit mode must not block:\n{out}\n{d}");
    assert!(out.stdout.contains("hello from evil.example.test"), "{out}");
    assert_eq!(d.verdict(), Some("audit"), "{d}");
    assert_eq!(d.reason(), Some("not_allowed"), "{d}");
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");
    assert_eq!(d.pod_name(), Some("batch-1"), "{d}");
}
