//! `egressgate explain` against a real running gateway, over its admin socket in the node
//! namespace (as `kubectl exec` into the gateway pod would): names a pod resolved through the
//! shim, with the time left on each record, and the verdict a connection gets; a real denied
//! connection's decision line explained; what the socket refuses; the socket through a
//! hand-over.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use egressgate_lab::{egressgate_bin, Lab, Output};
use serde_json::Value;

use crate::support::{curl, dig, run_and_decide, shop_lab};

fn bin() -> String {
    egressgate_bin()
        .expect("built gateway")
        .display()
        .to_string()
}

/// `egressgate explain ARGS --state-dir <lab state>` in the node namespace.
fn explain(lab: &Lab, args: &[&str]) -> Output {
    let bin = bin();
    let state = lab.state_dir().display().to_string();
    let mut full = vec![bin.as_str(), "explain", "--state-dir", state.as_str()];
    full.extend_from_slice(args);
    lab.node().run(&full)
}

fn json(out: &Output) -> Value {
    assert!(out.success(), "explain failed:\n{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// `curl` over the admin socket in the node namespace: the status code, then the body.
fn socket_request(lab: &Lab, extra: &[&str], path: &str) -> (String, String) {
    let socket = lab.state_dir().join("admin.sock").display().to_string();
    let url = format!("http://egressgate{path}");
    let mut args = vec![
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--unix-socket",
        socket.as_str(),
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-w", "\n%{http_code}", url.as_str()]);
    let out = lab.node().run(&args);
    assert!(out.success(), "curl over the socket failed:\n{out}");
    let (body, code) = out.stdout.rsplit_once('\n').expect("status line");
    (code.to_owned(), body.to_owned())
}

#[test]
fn explain_shows_the_names_the_pod_resolved_with_their_ttl_and_the_verdict() {
    let lab = shop_lab();
    assert_eq!(
        dig(&lab, "a", "api.example.test", &[])
            .last()
            .map(String::as_str),
        Some("198.19.0.10")
    );

    let allowed = json(&explain(
        &lab,
        &[
            "--pod",
            "shop/app-1",
            "--to",
            "api.example.test:443",
            "-o",
            "json",
        ],
    ));
    assert_eq!(allowed["verdict"], "allow", "{allowed:#}");
    assert_eq!(allowed["reason"], "allowed", "{allowed:#}");
    assert_eq!(allowed["pod"]["labels"]["role"], "app", "{allowed:#}");
    assert_eq!(allowed["policies"][0]["policy"], "shop/web", "{allowed:#}");
    assert_eq!(allowed["policies"][0]["mode"], "enforce", "{allowed:#}");
    let address = &allowed["addresses"][0];
    assert_eq!(address["destination"], "198.19.0.10:443", "{allowed:#}");
    assert_eq!(address["policy"], "shop/web", "{allowed:#}");
    let name = &address["names"][0];
    assert_eq!(name["name"], "api.example.test", "{allowed:#}");
    assert_eq!(name["cnames"][0], "lb.cdn.example.test", "{allowed:#}");
    // dnsmasq answers with TTL 60; the lab adds an idle grace of 2 s.
    let ttl = name["ttlSeconds"].as_u64().expect("ttl left");
    assert!((50..=60).contains(&ttl), "{allowed:#}");
    assert_eq!(name["liveSeconds"].as_u64(), Some(ttl + 2), "{allowed:#}");
    let steps: Vec<&str> = address["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        steps,
        ["identify", "select", "names", "grants", "peek", "verdict"]
    );

    let mismatch = json(&explain(
        &lab,
        &[
            "--pod",
            "shop/app-1",
            "--to",
            "198.19.0.10:443",
            "--sni",
            "evil.example.test",
            "-o",
            "json",
        ],
    ));
    assert_eq!(
        (mismatch["verdict"].as_str(), mismatch["reason"].as_str()),
        (Some("deny"), Some("sni_mismatch")),
        "{mismatch:#}"
    );
    // Pod b never resolved anything.
    let unresolved = json(&explain(
        &lab,
        &[
            "--pod",
            "shop/batch-1",
            "--to",
            "198.19.0.10:443",
            "--sni",
            "api.example.test",
            "-o",
            "json",
        ],
    ));
    assert_eq!(unresolved["reason"], "no_dns_record", "{unresolved:#}");

    // For people: a table, and no colour codes through a pipe.
    let table = explain(
        &lab,
        &["--pod", "shop/app-1", "--to", "api.example.test:443"],
    );
    assert!(table.success(), "{table}");
    assert!(table.stdout.contains("api.example.test (ttl "), "{table}");
    assert!(
        table.stdout.starts_with("VERDICT    allow (allowed)"),
        "{table}"
    );
    assert!(
        !table.stdout.contains('\x1b'),
        "colour codes in a pipe:\n{table}"
    );
    let yaml = explain(
        &lab,
        &[
            "--pod",
            "shop/app-1",
            "--to",
            "api.example.test:443",
            "-o",
            "yaml",
        ],
    );
    assert!(yaml.stdout.contains("verdict: allow"), "{yaml}");

    let unknown = explain(&lab, &["--pod", "shop/nobody", "--to", "198.19.0.10:443"]);
    assert_eq!(unknown.status, Some(1), "{unknown}");
    assert!(unknown.stderr.contains("no pod shop/nobody"), "{unknown}");
    let never = explain(
        &lab,
        &["--pod", "shop/batch-1", "--to", "api.example.test:443"],
    );
    assert_eq!(never.status, Some(1), "{never}");
    assert!(
        never
            .stderr
            .contains("holds no live record of api.example.test"),
        "{never}"
    );
    let usage = explain(&lab, &["--pod", "shop/app-1", "--to", "nowhere"]);
    assert_eq!(usage.status, Some(2), "{usage}");
}

#[test]
fn a_denied_connections_decision_line_is_explained() {
    let lab = shop_lab();
    let ca = lab.ca();
    let (out, decision) =
        run_and_decide(&lab, "a", 443, &curl(&ca, &["https://evil.example.test/"]));
    assert!(!out.success(), "{out}");
    assert_eq!(decision.reason(), Some("not_allowed"), "{decision}");
    let line = decision.0.to_string();

    let explained = lab
        .node()
        .run(&[&bin(), "explain", "--line", &line, "-o", "json"]);
    let explained = json(&explained);
    let first = &explained[0];
    assert_eq!(
        (first["verdict"].as_str(), first["reason"].as_str()),
        (Some("deny"), Some("not_allowed")),
        "{explained:#}"
    );
    assert_eq!(first["pod"], "shop/app-1", "{explained:#}");
    let says = first["says"].as_str().unwrap_or_default();
    assert!(
        says.contains("resolved evil.example.test to 198.19.0.10"),
        "{says}"
    );
    let command = first["explainCommand"]
        .as_str()
        .expect("a command to ask now");
    assert_eq!(
        command,
        "egressgate explain --pod shop/app-1 --to 198.19.0.10:443 --sni evil.example.test"
    );

    // The same line on stdin, among other events; and asked of the gateway now, the same answer.
    let log = format!("{{\"event\":\"listening\"}}\n{line}\n");
    let from_stdin = lab.node().run_stdin(&[&bin(), "explain"], &log);
    assert!(from_stdin.success(), "{from_stdin}");
    assert!(
        from_stdin.stdout.starts_with("VERDICT  deny (not_allowed)"),
        "{from_stdin}"
    );
    let args: Vec<&str> = command.split(' ').skip(2).collect();
    let mut now = args.clone();
    now.extend(["-o", "json"]);
    let now = json(&explain(&lab, &now));
    assert_eq!(
        (now["verdict"].as_str(), now["reason"].as_str()),
        (Some("deny"), Some("not_allowed")),
        "{now:#}"
    );
}

#[test]
fn the_admin_socket_refuses_what_it_does_not_serve() {
    let lab = shop_lab();
    let socket = lab.state_dir().join("admin.sock");
    let mode = std::fs::metadata(&socket)
        .expect("admin.sock")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let (code, body) = socket_request(&lab, &[], "/v1/nope");
    assert_eq!(code, "404", "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (code, body) = socket_request(&lab, &[], "/v1/explain");
    assert_eq!(code, "405", "GET on a POST endpoint: {body}");
    let big = format!("{{\"pod\":\"{}\"}}", "x".repeat(70 * 1024));
    let (code, body) = socket_request(&lab, &["-X", "POST", "--data-binary", &big], "/v1/explain");
    assert_eq!(code, "413", "{body}");
    let (code, body) = socket_request(
        &lab,
        &["-X", "POST", "--data-binary", "{\"pod\":1}"],
        "/v1/explain",
    );
    assert_eq!(code, "400", "{body}");
    // The metrics port Prometheus scrapes does not serve it.
    let admin = "http://127.0.0.1:15090/v1/explain";
    let tcp = lab.node().run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-X",
        "POST",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        admin,
    ]);
    assert_eq!(tcp.stdout, "404", "{tcp}");

    // Another user: the file's mode stops it; with the mode opened, the peer check does.
    let as_nobody = |args: &[&str]| {
        let mut full = vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ];
        full.extend_from_slice(args);
        lab.node().run(&full)
    };
    let path = socket.display().to_string();
    let refused = as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--unix-socket",
        &path,
        "http://x/v1/nope",
    ]);
    assert!(
        !refused.success(),
        "nobody connected to a 0600 socket:\n{refused}"
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(lab.state_dir(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let forbidden = as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-w",
        "\n%{http_code}",
        "--unix-socket",
        &path,
        "http://x/v1/explain",
    ]);
    assert!(forbidden.stdout.ends_with("\n403"), "{forbidden}");
    assert!(
        forbidden
            .stdout
            .contains("uid 65534 may not use the admin socket"),
        "{forbidden}"
    );
}

#[test]
fn after_a_hand_over_the_successor_serves_the_socket() {
    let mut lab = shop_lab();
    dig(&lab, "a", "api.example.test", &[]);
    let successor = lab
        .start_gateway_process("egressgate-2")
        .expect("successor starts");
    let mut old = lab.replace_gateway(successor).expect("old gateway");
    lab.gateway()
        .wait_for_events("handover", |_| true, 1, Duration::from_secs(10))
        .expect("successor's handover line");
    assert!(
        old.daemon_mut()
            .wait_exit(Duration::from_secs(20))
            .is_some(),
        "old gateway kept running"
    );
    drop(old);
    assert!(
        lab.state_dir().join("admin.sock").exists(),
        "the old process removed the successor's socket"
    );
    let answer = json(&explain(
        &lab,
        &[
            "--pod",
            "shop/app-1",
            "--to",
            "api.example.test:443",
            "-o",
            "json",
        ],
    ));
    assert_eq!(answer["verdict"], "allow", "{answer:#}");
    assert_eq!(
        answer["addresses"][0]["names"][0]["name"], "api.example.test",
        "names carried over: {answer:#}"
    );
}

/// The offline form and `egressgate test`, without a lab: files in, verdicts out.
mod offline {
    use std::path::Path;
    use std::process::Command;

    use serde_json::Value;

    use super::bin;
    use crate::support::SHOP_POLICY;

    fn egressgate(args: &[&str]) -> std::process::Output {
        Command::new(bin()).args(args).output().expect("runs")
    }

    fn files(dir: &Path) -> (String, String) {
        std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
        std::fs::write(dir.join("policies/shop.yaml"), SHOP_POLICY).expect("policies");
        std::fs::write(
            dir.join("pods.yaml"),
            "pods:\n  - {name: app-1, namespace: shop, ips: [198.18.1.2], labels: {role: app}}\n",
        )
        .expect("identities");
        (
            dir.join("policies").display().to_string(),
            dir.join("pods.yaml").display().to_string(),
        )
    }

    #[test]
    fn offline_explain_takes_exactly_the_documented_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (policies, identities) = files(dir.path());
        let ask = |sni: &str| {
            let out = egressgate(&[
                "explain",
                "--policies",
                &policies,
                "--identities",
                &identities,
                "--pod",
                "shop/app-1",
                "--to",
                "198.19.0.10:443",
                "--protocol",
                "tls",
                "--sni",
                sni,
                "--resolved",
                "api.example.test=198.19.0.10,evil.example.test=198.19.0.10",
                "-o",
                "json",
            ]);
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).expect("JSON")
        };
        let allowed = ask("api.example.test");
        assert_eq!(
            (allowed["verdict"].as_str(), allowed["reason"].as_str()),
            (Some("allow"), Some("allowed")),
            "{allowed:#}"
        );
        assert!(
            allowed["addresses"][0]["names"][0]
                .get("ttlSeconds")
                .is_none(),
            "given names have no TTL: {allowed:#}"
        );
        let denied = ask("evil.example.test");
        assert_eq!(
            (denied["verdict"].as_str(), denied["reason"].as_str()),
            (Some("deny"), Some("sni_mismatch")),
            "{denied:#}"
        );

        let missing = egressgate(&[
            "explain",
            "--policies",
            &policies,
            "--pod",
            "shop/app-1",
            "--to",
            "198.19.0.10:443",
        ]);
        assert_eq!(
            missing.status.code(),
            Some(2),
            "--identities is required offline: {missing:?}"
        );
        let both = egressgate(&[
            "explain",
            "--policies",
            &policies,
            "--identities",
            &identities,
            "--pod",
            "shop/app-1",
            "--to",
            "198.19.0.10:443",
            "--sni",
            "a.test",
            "--host",
            "a.test",
        ]);
        assert_eq!(both.status.code(), Some(2), "{both:?}");
        let help = egressgate(&["explain", "--help"]);
        let help = String::from_utf8_lossy(&help.stdout);
        for wanted in ["Examples:", "--resolved", "Exit codes: 0 explained"] {
            assert!(help.contains(wanted), "{wanted} missing:\n{help}");
        }
    }

    #[test]
    fn policy_tests_exit_0_when_they_pass_1_when_one_fails_2_on_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (policies, _) = files(dir.path());
        let tests = dir.path().join("tests.yaml");
        let case = |sni: &str, reason: &str| {
            format!(
                "tests:\n  - name: app to the API\n    pod: {{namespace: shop, labels: {{role: app}}}}\n    \
                 resolved: [api.example.test=198.19.0.10, evil.example.test=198.19.0.10]\n    \
                 to: 198.19.0.10:443\n    sni: {sni}\n    expect: {{verdict: allow, reason: {reason}}}\n"
            )
        };
        let path = tests.display().to_string();
        std::fs::write(&tests, case("api.example.test", "allowed")).expect("write");
        let pass = egressgate(&["test", &policies, &path]);
        assert_eq!(pass.status.code(), Some(0), "{pass:?}");
        assert!(String::from_utf8_lossy(&pass.stdout).contains("1 passed, 0 failed"));

        std::fs::write(&tests, case("evil.example.test", "allowed")).expect("write");
        let fail = egressgate(&["test", &policies, &path]);
        assert_eq!(fail.status.code(), Some(1), "{fail:?}");
        let stdout = String::from_utf8_lossy(&fail.stdout);
        assert!(
            stdout.contains(
                "FAIL  app to the API: expected allow (allowed), got deny (sni_mismatch)"
            ),
            "{stdout}"
        );
        assert!(stdout.contains("STEP"), "the trace is printed:\n{stdout}");

        std::fs::write(
            &tests,
            case("api.example.test", "allowed").replace("expect", "expekt"),
        )
        .expect("write");
        let bad = egressgate(&["test", &policies, &path]);
        assert_eq!(bad.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("tests.yaml:"),
            "{bad:?}"
        );

        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/ci/full.policy-tests.yaml");
        assert!(example.exists(), "the chart's example policy tests");
    }
}
