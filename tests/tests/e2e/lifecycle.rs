//! The gateway's life: SIGTERM drains open connections, the rules stay after exit so egress
//! fails closed, `egressgate cleanup` removes them (and succeeds when nothing is left); QUIC is
//! refused so clients use TCP.

use std::time::{Duration, Instant};

use egressgate_lab::daemon::Daemon;
use egressgate_lab::gateway::egressgate_bin;
use egressgate_lab::{addr, GatewayOptions, Lab};

use crate::support::{assert_allowed, curl, run_and_decide, SHOP_POLICY};

fn lab(options: GatewayOptions) -> Lab {
    Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(options.policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts")
}

/// Python in pod a: a TLS request on one connection, a pause of `pause_ms`, a second request on
/// the same connection; prints whether each got the page.
fn two_requests(ca: &str, pause_ms: u64) -> String {
    format!(
        "import socket, ssl, time\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         s = ctx.wrap_socket(socket.create_connection(('{api}', 443), timeout=10), server_hostname='{api}')\n\
         req = b'GET / HTTP/1.1\\r\\nHost: {api}\\r\\n\\r\\n'\n\
         def get():\n    s.sendall(req)\n    return 'hello from' in s.recv(65536).decode(errors='replace')\n\
         print('first', get(), flush=True)\n\
         time.sleep({pause})\n\
         print('second', get())\n",
        api = addr::API,
        pause = pause_ms as f64 / 1000.0
    )
}

#[test]
fn sigterm_drains_open_connections_and_the_rules_fail_closed_until_cleanup() {
    let options = GatewayOptions {
        shutdown_grace_seconds: Some(10),
        ..GatewayOptions::default()
    };
    let lab = lab(options);
    let ca = lab.ca();
    let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"]));
    assert_allowed(&out, &d, "hello from api.example.test");

    let script = two_requests(&ca, 1500);
    let cursor = lab.gateway().cursor();
    let client = std::thread::scope(|scope| {
        let client = scope.spawn(|| lab.pod("a").run(&["python3", "-c", &script]));
        lab.gateway()
            .wait_for_decision_since(cursor, |d| d.is("app-1", 443), Duration::from_secs(10))
            .expect("decision for the long connection");
        let pid = lab.gateway().daemon().pid().to_string();
        let killed = lab.node().run(&["kill", "-TERM", &pid]);
        assert!(killed.success(), "{killed}");
        client.join().expect("client thread")
    });
    assert!(client.stdout.contains("first True"), "{client}");
    assert!(
        client.stdout.contains("second True"),
        "SIGTERM cut an open connection:\n{client}"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let shutdown = loop {
        if let Some(line) = lab.gateway().events("shutdown").next() {
            break line;
        }
        assert!(Instant::now() < deadline, "no shutdown line");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(shutdown["openAtStop"], 1, "{shutdown}");
    assert_eq!(shutdown["cutAfterGrace"], 0, "{shutdown}");

    // Gateway gone, rules in place: DNS and TCP are refused, not let through.
    let resolved = lab
        .pod("a")
        .run(&["dig", "+short", "+time=2", "+tries=1", addr::API]);
    assert!(
        !resolved.stdout.contains(addr::WEB),
        "DNS bypassed the stopped shim:\n{resolved}"
    );
    let pinned = format!("{}:443:{}", addr::API, addr::WEB);
    let out = lab.pod("a").run(&curl(
        &ca,
        &["--resolve", &pinned, "https://api.example.test/"],
    ));
    assert!(
        !out.success(),
        "egress bypassed the stopped gateway:\n{out}"
    );
    // Exit 7: the connection itself was refused (reset at once), not a TLS or HTTP failure.
    assert_eq!(out.status, Some(7), "{out}");

    let bin = lab.gateway().bin().display().to_string();
    let config = lab.gateway().config_path().display().to_string();
    let cleaned = lab.node().run(&[&bin, "cleanup", "--config", &config]);
    assert!(cleaned.success(), "{cleaned}");
    let tables = lab.node().run(&["nft", "list", "tables"]);
    assert!(!tables.stdout.contains("egressgate"), "{tables}");
    let rules = lab.node().run(&["ip", "rule", "show"]);
    assert!(!rules.stdout.contains("0x6567"), "{rules}");
    // Again: nothing left to remove is not an error.
    let again = lab.node().run(&[&bin, "cleanup", "--config", &config]);
    assert!(again.success(), "{again}");
    assert!(again.stderr.contains("nothing to remove"), "{again}");
}

#[test]
fn cleanup_with_nothing_to_remove_succeeds_and_says_so() {
    let lab = Lab::builder()
        .pods(1)
        .without_gateway()
        .start()
        .expect("lab starts");
    let bin = egressgate_bin()
        .expect("built gateway")
        .display()
        .to_string();
    let config = lab.dir().join("cleanup.yaml");
    std::fs::write(
        &config,
        format!(
            "policyDir: {dir}/policies\nidentity: {{staticFile: {dir}/pods.yaml}}\n\
             intercept: {{interfaces: [\"egp*\"]}}\ndns: {{upstreams: [\"198.19.0.53:53\"]}}\n",
            dir = lab.dir().display()
        ),
    )
    .expect("write config");
    let config = config.display().to_string();

    // A node where `run` never installed anything: no table, no rule, no route table.
    let cleaned = lab.node().run(&[&bin, "cleanup", "--config", &config]);
    assert!(cleaned.success(), "{cleaned}");
    assert!(cleaned.stderr.contains("nothing to remove"), "{cleaned}");
    assert!(
        cleaned.stdout.is_empty(),
        "stdout is for JSON lines: {cleaned}"
    );

    // What an interrupted install or a partial manual removal leaves: one rule, no table.
    let added = lab
        .node()
        .run(&["ip", "rule", "add", "fwmark", "0x6567", "lookup", "25447"]);
    assert!(added.success(), "{added}");
    let cleaned = lab.node().run(&[&bin, "cleanup", "--config", &config]);
    assert!(cleaned.success(), "{cleaned}");
    assert!(cleaned.stderr.contains("1 ip rule(s)"), "{cleaned}");
    let rules = lab.node().run(&["ip", "rule", "show"]);
    assert!(!rules.stdout.contains("0x6567"), "{rules}");

    let again = lab.node().run(&[&bin, "cleanup", "--config", &config]);
    assert!(again.success(), "{again}");
    assert!(again.stderr.contains("nothing to remove"), "{again}");
}

/// Waits until `daemon` printed a JSON line with `"event":"<event>"`.
fn wait_for_event(daemon: &Daemon, event: &str) -> String {
    let needle = format!("\"event\":\"{event}\"");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = daemon.stdout_text();
        if let Some(line) = text.lines().find(|line| line.contains(&needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no {event} line from {}:\n{}",
            daemon.name(),
            daemon.output_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_gateway_starts_beside_the_first_and_takes_over() {
    let lab = lab(GatewayOptions::default());
    let ca = lab.ca();
    let bin = lab.gateway().bin().display().to_string();
    let config = lab.gateway().config_path().display().to_string();
    // A rolling update with maxSurge 1: the new gateway binds the same ports while the old runs.
    let successor_dir = lab.dir().join("successor");
    std::fs::create_dir_all(&successor_dir).expect("mkdir");
    let successor = Daemon::spawn(
        lab.node().name(),
        "egressgate-successor",
        &[&bin, "run", "--config", &config],
        &successor_dir,
        "TERM",
    )
    .expect("successor starts");
    wait_for_event(&successor, "listening");

    let pid = lab.gateway().daemon().pid().to_string();
    assert!(lab.node().run(&["kill", "-TERM", &pid]).success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.gateway().events("shutdown").next().is_none() {
        assert!(Instant::now() < deadline, "the first gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = lab.pod("a").run(&curl(&ca, &["https://api.example.test/"]));
    assert!(out.stdout.contains("hello from api.example.test"), "{out}");
    let decision = wait_for_event(&successor, "decision");
    assert!(decision.contains("\"verdict\":\"allow\""), "{decision}");
}

/// A stand-in for the Kubernetes API on the node's loopback: answers every GET with `status`
/// (200: the DaemonSet, 404: a NotFound `Status`) and prints the paths it was asked for.
const FAKE_API: &str = r#"
import http.server, json, sys
status, port = int(sys.argv[1]), int(sys.argv[2])
meta = {"name": "egressgate", "namespace": "egressgate"}
found = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta}
missing = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound",
           "code": 404, "message": "daemonsets.apps \"egressgate\" not found"}
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("GET", self.path, flush=True)
        body = json.dumps(found if status == 200 else missing).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer(("127.0.0.1", port), Api)
print("ready", flush=True)
server.serve_forever()
"#;

const FAKE_API_PORT: u16 = 16443;

/// A gateway told it runs as DaemonSet egressgate/egressgate, with a kubeconfig for the fake
/// API; SIGTERM, then the exit's verdict on the rules: what it logged and the node's tables.
fn stop_with_owner_answering(status: u16) -> (String, String, String) {
    let kubeconfig = std::env::temp_dir().join(format!(
        "egressgate-e2e-kubeconfig-{}-{status}",
        std::process::id()
    ));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
             clusters: [{{name: lab, cluster: {{server: \"http://127.0.0.1:{FAKE_API_PORT}\"}}}}]\n\
             users: [{{name: lab, user: {{token: lab}}}}]\n\
             contexts: [{{name: lab, context: {{cluster: lab, user: lab}}}}]\n"
        ),
    )
    .expect("kubeconfig");
    let options = GatewayOptions {
        nftables_extra: "  ownerDaemonSet: {namespace: egressgate, name: egressgate}\n".to_owned(),
        env: vec![("KUBECONFIG".to_owned(), kubeconfig.display().to_string())],
        shutdown_grace_seconds: Some(1),
        ..GatewayOptions::default()
    };
    let lab = lab(options);
    let args = [
        "python3",
        "-c",
        FAKE_API,
        &status.to_string(),
        &FAKE_API_PORT.to_string(),
    ];
    let api = Daemon::spawn(lab.node().name(), "fake-api", &args, lab.dir(), "TERM")
        .expect("fake API starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.stdout_text().contains("ready") {
        assert!(
            Instant::now() < deadline,
            "fake API: {}",
            api.output_tail(10)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let tables = lab.node().run(&["nft", "list", "tables"]);
    assert!(tables.stdout.contains("egressgate"), "{tables}");

    let pid = lab.gateway().daemon().pid().to_string();
    assert!(lab.node().run(&["kill", "-TERM", &pid]).success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let verdict = loop {
        let log = lab.gateway().daemon().stderr_text();
        if let Some(line) = log.lines().find(|line| line.contains("owner DaemonSet")) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no word on the owner DaemonSet:\n{}",
            lab.gateway().daemon().output_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_file(&kubeconfig);
    let tables = lab.node().run(&["nft", "list", "tables"]).stdout;
    (verdict, api.stdout_text(), tables)
}

#[test]
fn an_uninstalled_gateway_removes_its_rules_at_exit() {
    let (verdict, asked, tables) = stop_with_owner_answering(404);
    assert!(verdict.contains("rules removed"), "{verdict}");
    assert!(
        asked.contains("GET /apis/apps/v1/namespaces/egressgate/daemonsets/egressgate"),
        "{asked}"
    );
    assert!(!tables.contains("egressgate"), "{tables}");
}

#[test]
fn a_restarted_gateway_keeps_its_rules_so_egress_fails_closed() {
    let (verdict, asked, tables) = stop_with_owner_answering(200);
    assert!(verdict.contains("rules kept"), "{verdict}");
    assert!(asked.contains("daemonsets/egressgate"), "{asked}");
    assert!(tables.contains("egressgate"), "{tables}");
}
