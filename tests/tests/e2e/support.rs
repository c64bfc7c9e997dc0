//! Shared policies and client helpers.

use std::time::Duration;

use egressgate_lab::{Decision, GatewayOptions, Lab, Output};

/// role=app may reach api.example.test over TLS on 443 and HTTP on 80; role=batch may reach it
/// over TLS. Both pods are selected, so a missing DNS record (not `unselectedPods`) decides.
pub const SHOP_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports:
        - {port: 443, protocol: tls}
        - {port: 80, protocol: http}
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: batch-web, namespace: shop}
spec:
  podSelector: {matchLabels: {role: batch}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports:
        - {port: 443, protocol: tls}
"#;

pub const WAIT: Duration = Duration::from_secs(10);

/// Pods a (role=app) and b (role=batch), DNS and web, [`SHOP_POLICY`].
pub fn shop_lab() -> Lab {
    Lab::builder()
        .pods(2)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts")
}

/// Runs `args` in pod `letter` and returns its output and the first decision for that pod to
/// `port` made after the command started.
pub fn run_and_decide(lab: &Lab, letter: &str, port: u16, args: &[&str]) -> (Output, Decision) {
    let pod = lab.pod(letter);
    let cursor = lab.gateway().cursor();
    let out = pod.run(args);
    let decision = lab
        .gateway()
        .wait_for_decision_since(cursor, |d| d.is(&pod.name, port), WAIT)
        .unwrap_or_else(|err| panic!("no decision for {}:\n{out}\n{err}", out.command));
    (out, decision)
}

/// Asserts a connection was allowed: client succeeded, body seen, decision `allow`/`allowed`.
pub fn assert_allowed(out: &Output, decision: &Decision, body: &str) {
    assert!(out.success(), "client failed:\n{out}\ndecision: {decision}");
    assert!(
        out.stdout.contains(body),
        "expected {body:?} in the response:\n{out}"
    );
    assert_eq!(decision.verdict(), Some("allow"), "{decision}");
    assert_eq!(decision.reason(), Some("allowed"), "{decision}");
}

/// Asserts a connection was denied for one of `reasons`, and the client did not get through.
pub fn assert_denied(out: &Output, decision: &Decision, reasons: &[&str]) {
    assert!(
        !out.success(),
        "client succeeded through a denied connection:\n{out}\ndecision: {decision}"
    );
    assert!(
        !out.stdout.contains("hello from"),
        "response body leaked through a denied connection:\n{out}"
    );
    assert_eq!(decision.verdict(), Some("deny"), "{decision}");
    let reason = decision.reason().unwrap_or_default();
    assert!(
        reasons.contains(&reason),
        "reason {reason:?}, want one of {reasons:?}: {decision}"
    );
}

/// `dig +short` through the pod's resolver (`@server` if given); the answer lines.
pub fn dig(lab: &Lab, letter: &str, name: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["dig", "+short", "+time=3", "+tries=1"];
    args.extend_from_slice(extra);
    args.push(name);
    let out = lab.pod(letter).run(&args);
    assert!(out.success(), "dig failed:\n{out}");
    out.stdout.lines().map(str::to_owned).collect()
}

/// `curl` with the lab CA, IPv4 only (one connection, one decision), 10 s bound.
pub fn curl<'a>(ca: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["curl", "-sS", "-4", "--max-time", "10", "--cacert", ca];
    args.extend_from_slice(rest);
    args
}

/// role=app may reach short.example.test (TTL 1 s in the lab's DNS) over TLS.
pub const SHORT_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: short, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: short.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

/// The `dns.idleGraceSeconds` of [`short_ttl_lab`].
pub const GRACE_SECONDS: u64 = 2;

/// One pod, DNS and web, [`SHORT_POLICY`], no TTL floor and a [`GRACE_SECONDS`] idle grace.
pub fn short_ttl_lab() -> Lab {
    Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions {
            min_ttl_seconds: 0,
            idle_grace_seconds: GRACE_SECONDS,
            ..GatewayOptions::default().policy("short.yaml", SHORT_POLICY)
        })
        .start()
        .expect("lab starts")
}
