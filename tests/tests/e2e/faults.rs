//! Faults on either side: an upstream that refuses, and the gateway running out of file
//! descriptors. Nothing gets stuck, nothing spins, and the gateway recovers.

use std::time::{Duration, Instant};

use egressgate_lab::{addr, GatewayOptions, Lab};

use crate::support::{assert_allowed, curl, dig};

const TCP_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {}
  egress:
    - to: [{dnsName: api.example.test}]
      ports:
        - {port: 443, protocol: tls}
        - {port: 8443, protocol: tcp}
"#;

fn lab() -> Lab {
    Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("web.yaml", TCP_POLICY))
        .start()
        .expect("lab starts")
}

#[test]
fn an_upstream_that_refuses_resets_the_pod_and_logs_the_error() {
    let lab = lab();
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));
    // Allowed by policy, but nothing listens on 8443 upstream.
    let cursor = lab.gateway().cursor();
    // The errno tells a reset (the pod's connection was established, then cut) from a refusal
    // (ConnectionRefusedError). curl reports both as "Couldn't connect" when the reset lands
    // before it checks the connect, which a quick gateway makes likely.
    let script = format!(
        "import socket\n\
         try:\n\
         \x20   s = socket.create_connection(('{web}', 8443), timeout=10)\n\
         \x20   s.sendall(b'GET / HTTP/1.1\\r\\nHost: api.example.test\\r\\n\\r\\n')\n\
         \x20   print('read', len(s.recv(10)))\n\
         except Exception as e:\n    print('error', type(e).__name__)\n",
        web = addr::WEB
    );
    let out = lab.pod("a").run(&["python3", "-c", &script]);
    // TPROXY completed the pod's handshake with the gateway, so the refusal arrives as a reset.
    assert!(out.stdout.contains("error ConnectionResetError"), "{out}");
    let decision = lab
        .gateway()
        .wait_for_decision_since(cursor, |d| d.is("app-1", 8443), Duration::from_secs(10))
        .expect("decision");
    assert_eq!(decision.verdict(), Some("allow"), "{decision}");
    let connection = decision.0["connection"].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let close = loop {
        if let Some(close) = lab
            .gateway()
            .events("close")
            .find(|c| c["connection"] == connection)
        {
            break close;
        }
        assert!(Instant::now() < deadline, "no close line for {connection}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let error = close["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("connect") && error.contains("refused"),
        "{close}"
    );
}

/// Python in pod a: `count` connections held open for `hold_s` seconds, each after the first
/// byte of a ClientHello (so that the kernel hands them to the gateway at once: 443 is a
/// client-first port).
fn hold_connections(count: usize, hold_s: f64) -> String {
    format!(
        "import socket, time\n\
         held = []\n\
         for _ in range({count}):\n    try:\n        s = socket.create_connection(('{web}', 443), timeout=2)\n        s.sendall(b'\\x16')\n        held.append(s)\n    except Exception:\n        pass\n\
         print('held', len(held), flush=True)\n\
         time.sleep({hold_s})\n",
        web = addr::WEB
    )
}

#[test]
fn out_of_file_descriptors_the_gateway_backs_off_and_recovers() {
    let lab = lab();
    let ca = lab.ca();
    let pid = lab.gateway().daemon().pid().to_string();
    // A handful of descriptors beyond what the gateway already uses.
    let limited = lab
        .node()
        .run(&["prlimit", "--pid", &pid, "--nofile=96:96"]);
    assert!(limited.success(), "{limited}");
    let warnings_before = accept_failures(&lab);
    let out = lab
        .pod("a")
        .run(&["python3", "-c", &hold_connections(150, 2.0)]);
    assert!(out.success(), "{out}");
    let failures = accept_failures(&lab) - warnings_before;
    assert!(failures > 0, "the limit was never reached:\n{out}");
    // A spinning accept loop logs a failure per attempt, thousands a second; backing off keeps
    // it to one per 50 ms per listener.
    assert!(
        failures < 200,
        "{failures} accept failures in ~2 s: the accept loop spins"
    );

    // The held connections are gone, but the gateway may still be accepting and closing the
    // ones left in its listen backlog, and each takes a descriptor: it serves again once they
    // are through. (Their decisions keep arriving meanwhile: pick the one with curl's SNI.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let (out, d) = loop {
        let cursor = lab.gateway().cursor();
        let out = lab.pod("a").run(&curl(&ca, &["https://api.example.test/"]));
        let d = lab
            .gateway()
            .wait_for_decision_since(
                cursor,
                |d| d.sni() == Some(addr::API),
                Duration::from_secs(10),
            )
            .expect("decision for curl");
        if out.success() || Instant::now() > deadline {
            break (out, d);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_allowed(&out, &d, "hello from api.example.test");
}

fn accept_failures(lab: &Lab) -> usize {
    lab.gateway()
        .daemon()
        .stderr_text()
        .lines()
        .filter(|line| line.contains("accept failed"))
        .count()
}
