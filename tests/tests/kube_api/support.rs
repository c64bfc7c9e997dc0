//! Shared by the tier's tests: the lab with a real API server, and waiting for a verdict.

use std::time::{Duration, Instant};

use egressgate_lab::{kube, Decision, GatewayOptions, Lab, Output};

/// role=app may reach api.example.test over TLS; pods labelled role=other may too, in
/// namespaces labelled tier=trusted. Everyone else is unselected, and unselected is denied.
pub const POLICIES: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
---
apiVersion: egressgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: trusted-others}
spec:
  namespaceSelector: {matchLabels: {tier: trusted}}
  podSelector: {matchLabels: {role: other}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

/// Two pods (a = shop/app-1 role=app, b = shop/batch-1 role=batch) as Pod objects in a real
/// API server; the gateway watches it.
pub fn kube_lab() -> Lab {
    kube_lab_with(GatewayOptions::default())
}

/// [`kube_lab`] with other gateway options (the identity source and policies are set here).
pub fn kube_lab_with(options: GatewayOptions) -> Lab {
    Lab::builder()
        .pods(2)
        .dns()
        .web()
        .kube_api()
        .gateway(GatewayOptions {
            kubernetes_node: Some(kube::NODE_NAME.to_owned()),
            ..options.policy("policies.yaml", POLICIES).unselected("deny")
        })
        .start()
        .expect("lab with a real API server starts")
}

/// One TLS connection from pod `letter` to api.example.test, and its decision.
pub fn connect(lab: &Lab, letter: &str) -> (Output, Decision) {
    let pod = lab.pod(letter);
    let cursor = lab.gateway().cursor();
    let ca = lab.ca();
    let out = pod.run(&[
        "curl",
        "-sS",
        "-4",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "https://api.example.test/",
    ]);
    let decision = lab
        .gateway()
        // By address: the pod on it may be another one than the lab named.
        .wait_for_decision_since(
            cursor,
            |d| {
                d.source()
                    .is_some_and(|s| s.starts_with(&format!("{}:", pod.ipv4)))
                    && d.destination_port() == Some(443)
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("no decision:\n{out}\n{e}"));
    (out, decision)
}

/// Connects from `letter` until the decision satisfies `want` (the watch delivers changes
/// asynchronously), up to 20 s; panics with the last decision otherwise.
pub fn until(lab: &Lab, letter: &str, what: &str, want: impl Fn(&Decision) -> bool) -> Decision {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (out, d) = connect(lab, letter);
        if want(&d) {
            return d;
        }
        if Instant::now() > deadline {
            panic!(
                "never {what}; last:\n{out}\n{d}\n{}",
                lab.gateway().daemon().output_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn allowed(d: &Decision) -> bool {
    d.verdict() == Some("allow")
}

/// `/readyz` of the gateway in the lab's node namespace: the HTTP status.
pub fn readyz(lab: &Lab) -> String {
    lab.node()
        .run(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            "http://127.0.0.1:15090/readyz",
        ])
        .stdout
}

/// One sample of the gateway's `/metrics`, 0 when absent.
pub fn metric(lab: &Lab, series: &str) -> f64 {
    let out = lab.node().run(&[
        "curl",
        "-s",
        "--max-time",
        "5",
        "http://127.0.0.1:15090/metrics",
    ]);
    out.stdout
        .lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
