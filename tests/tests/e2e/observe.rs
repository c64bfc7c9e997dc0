//! Day 2 in the lab: a workload runs in audit mode, `egressgate suggest` turns its decision
//! lines into a policy, the policy is applied in enforce mode and the same traffic gets no
//! denial while a new destination is denied; `egressgate observe` sees that denial as it
//! happens, filtered.

use std::time::Duration;

use egressgate_lab::daemon::{wait_until, Daemon};
use egressgate_lab::{addr, egressgate_bin, Decision, GatewayOptions, Lab, Output};

use crate::support::{curl, run_and_decide};

/// Every connection of role=app is audited: the policy allows nothing.
const AUDIT_ALL: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: app-audit, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  mode: audit
  egress: []
"#;

/// Pod a is shop/app-1 of Deployment `app` (its ReplicaSet `app-7c9d`), in audit mode; pod b
/// is shop/batch-1, a bare pod no policy selects.
fn identities() -> String {
    let (a4, _, a6, _) = addr::pod_addrs(0);
    let (b4, _, b6, _) = addr::pod_addrs(1);
    format!(
        "namespaces:\n  - name: shop\n    labels: {{team: shop}}\npods:\n\
         \x20 - name: app-1\n    namespace: shop\n    ips: [\"{a4}\", \"{a6}\"]\n\
         \x20   labels: {{role: app, pod-template-hash: 7c9d}}\n\
         \x20   owner: {{kind: ReplicaSet, name: app-7c9d}}\n\
         \x20 - name: batch-1\n    namespace: shop\n    ips: [\"{b4}\", \"{b6}\"]\n\
         \x20   labels: {{role: batch}}\n"
    )
}

fn psql() -> Vec<&'static str> {
    vec![
        "psql",
        "host=db.example.test dbname=orders user=app sslmode=disable gssencmode=disable \
         connect_timeout=5",
        "-Atc",
        "select 1",
    ]
}

/// The workload's traffic: TLS and HTTP to a name, HTTP to the bare address, PostgreSQL from
/// pod a; TLS to another name from pod b. Every client must succeed; the decisions are returned.
fn workload(lab: &Lab) -> Vec<(Output, Decision)> {
    let ca = lab.ca();
    let web_by_address = format!("http://{}/", addr::WEB);
    let runs = [
        ("a", 443, curl(&ca, &["https://api.example.test/"])),
        ("a", 80, curl(&ca, &["http://api.example.test/"])),
        ("a", 80, curl(&ca, &["-o", "/dev/null", &web_by_address])),
        ("a", 5432, psql()),
        ("b", 443, curl(&ca, &["https://other.example.test/"])),
    ];
    runs.iter()
        .map(|(pod, port, args)| {
            let (out, decision) = run_and_decide(lab, pod, *port, args);
            assert!(out.success(), "{out}\n{decision}");
            (out, decision)
        })
        .collect()
}

fn egressgate(lab: &Lab, args: &[&str]) -> Output {
    let bin = egressgate_bin().expect("built gateway");
    let bin = bin.to_str().expect("utf-8 path");
    let mut argv = vec![bin];
    argv.extend_from_slice(args);
    lab.node().run(&argv)
}

#[test]
fn suggest_from_audit_then_enforce_replays_without_denials_and_observe_sees_a_new_denial() {
    let lab = Lab::builder()
        .pods(2)
        .dns()
        .web()
        .postgres()
        .gateway(GatewayOptions {
            identity_override: Some(identities()),
            ..GatewayOptions::default().policy("audit.yaml", AUDIT_ALL)
        })
        .start()
        .expect("lab starts");

    // Day 1: audit mode.
    let audited = workload(&lab);
    let verdicts: Vec<(&str, &str)> = audited
        .iter()
        .map(|(_, d)| (d.verdict().unwrap_or("?"), d.reason().unwrap_or("?")))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("audit", "not_allowed"),
            ("audit", "not_allowed"),
            ("audit", "not_allowed"),
            ("audit", "not_allowed"),
            ("allow", "unselected"),
        ]
    );
    assert_eq!(
        audited[0].1 .0["pod"]["owner"],
        serde_json::json!({"kind": "ReplicaSet", "name": "app-7c9d"}),
        "{}",
        audited[0].1
    );

    // Suggest from the gateway's own stdout.
    let stdout = lab.gateway().daemon().stdout_path().to_owned();
    let suggested = egressgate(&lab, &["suggest", stdout.to_str().expect("utf-8 path")]);
    assert!(suggested.success(), "{suggested}");
    let yaml = &suggested.stdout;
    for expected in [
        "for Deployment shop/app: 4 decision(s)",
        "  name: app-egress\n",
        "      \"role\": \"app\"\n  mode: enforce\n",
        "- dnsName: \"api.example.test\"\n      ports:\n        - {port: 80, protocol: http}\n        - {port: 443, protocol: tls}\n",
        "- cidr: \"198.19.0.10/32\"",
        "- dnsName: \"db.example.test\"\n      ports:\n        - port: 5432\n          protocol: postgresql\n          postgresql:\n            databases: [\"orders\"]\n            users: [\"app\"]\n",
        "for Pod shop/batch-1",
        // Unselected: nothing was read, so only a tcp rule to the name it resolved.
        "- dnsName: \"other.example.test\"\n      ports:\n        - {port: 443, protocol: tcp}\n",
    ] {
        assert!(yaml.contains(expected), "missing {expected:?} in:\n{yaml}");
    }
    assert!(!yaml.contains("pod-template-hash\":"), "{yaml}");
    assert!(
        yaml.matches("cidr:").count() == 1,
        "a cidr only for the bare address:\n{yaml}"
    );

    // Review done: enforce it instead of the audit policy.
    let policies = lab.policy_dir();
    std::fs::write(policies.join("suggested.yaml"), yaml).expect("write");
    std::fs::remove_file(policies.join("audit.yaml")).expect("remove");
    lab.gateway()
        .wait_for_events(
            "policy_reload",
            |line| line["result"] == "ok" && line["policies"] == 2,
            1,
            Duration::from_secs(10),
        )
        .expect("the suggested policies load");
    let config = lab.gateway_config_path();
    let checked = egressgate(
        &lab,
        &["check", "--config", config.to_str().expect("utf-8")],
    );
    assert!(checked.success(), "{checked}");

    // The same traffic: not one denial.
    let replayed = workload(&lab);
    for (out, decision) in &replayed {
        assert_eq!(
            (decision.verdict(), decision.reason()),
            (Some("allow"), Some("allowed")),
            "{out}\n{decision}"
        );
        assert!(
            decision.0["pod"].get("labels").is_none(),
            "enforced: {decision}"
        );
    }

    // `observe --follow`, filtered to pod a's denials, while pods a and b connect.
    let state = lab.state_dir();
    let bin = egressgate_bin().expect("built gateway");
    let follower = Daemon::spawn(
        lab.node().name(),
        "observe",
        &[
            bin.to_str().expect("utf-8 path"),
            "observe",
            "--state-dir",
            state.to_str().expect("utf-8 path"),
            "--follow",
            "--pod",
            "shop/app-1",
            "--verdict",
            "deny",
            "-o",
            "json",
        ],
        lab.dir(),
        "TERM",
    )
    .expect("observe starts");
    wait_until("the observer subscribed", Duration::from_secs(10), || {
        let metrics = lab
            .node()
            .run(&["curl", "-s", "http://127.0.0.1:15090/metrics"]);
        Ok(metrics.stdout.contains("egressgate_observe_subscribers 1"))
    })
    .expect("subscribed");
    let ca = lab.ca();
    let (out, other_pod) =
        run_and_decide(&lab, "b", 443, &curl(&ca, &["https://evil.example.test/"]));
    assert_eq!(other_pod.verdict(), Some("allow"), "{out}\n{other_pod}");
    let (out, allowed) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"]));
    assert_eq!(allowed.verdict(), Some("allow"), "{out}\n{allowed}");
    // A destination the workload never reached.
    let (out, denied) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://evil.example.test/"]));
    assert!(!out.success(), "{out}");
    assert_eq!(denied.verdict(), Some("deny"), "{denied}");
    let mut seen = Vec::new();
    wait_until(
        "observe printed the denial",
        Duration::from_secs(10),
        || {
            seen = follower
                .stdout_text()
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(str::to_owned)
                .collect();
            Ok(!seen.is_empty())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", follower.output_tail(20)));
    assert_eq!(
        seen.len(),
        1,
        "only pod a's denial passes the filters: {seen:?}"
    );
    let line: serde_json::Value = serde_json::from_str(&seen[0]).expect("a JSON line");
    assert_eq!(line["connection"], denied.0["connection"], "{line}");
    assert_eq!(line["sni"], addr::EVIL, "{line}");
    drop(follower);

    // The readable form, from the history: one line per decision, no colour off a terminal.
    let shown = egressgate(
        &lab,
        &[
            "observe",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--since",
            "5m",
            "--pod",
            "shop/app-1",
            "--name",
            "evil.example.test",
        ],
    );
    assert!(shown.success(), "{shown}");
    assert!(!shown.stdout.contains('\x1b'), "{shown}");
    let lines: Vec<&str> = shown.stdout.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains(
            "DENY  shop/app-1 → evil.example.test:443 (198.19.0.10) tls sni=evil.example.test"
        )),
        "{shown}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("DNS   198.18.1.2 evil.example.test A")),
        "the pod's lookup, found by its address: {shown}"
    );
    assert!(lines.iter().all(|l| !l.contains("batch")), "{shown}");

    // By label, DNS lines only: pod b's lookups, found by its address.
    let batch_dns = egressgate(
        &lab,
        &[
            "observe",
            "--config",
            config.to_str().expect("utf-8 path"),
            "-l",
            "role=batch",
            "--protocol",
            "dns",
            "-o",
            "json",
        ],
    );
    assert!(batch_dns.success(), "{batch_dns}");
    let (b4, _, _, _) = addr::pod_addrs(1);
    let lines: Vec<serde_json::Value> = batch_dns
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert!(!lines.is_empty(), "{batch_dns}");
    assert!(
        lines
            .iter()
            .all(|line| line["event"] == "dns" && line["pod"] == b4.as_str()),
        "{batch_dns}"
    );

    // Bad usage and an unreachable gateway have their exit codes.
    let bad = egressgate(&lab, &["observe", "--verdict", "maybe"]);
    assert_eq!(bad.status, Some(2), "{bad}");
    let nowhere = egressgate(&lab, &["observe", "--state-dir", "/nonexistent/egressgate"]);
    assert_eq!(nowhere.status, Some(1), "{nowhere}");
    assert!(nowhere.stderr.contains("cannot connect"), "{nowhere}");
}
