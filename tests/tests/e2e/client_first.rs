//! Client-first ports (`intercept.clientFirstPorts`) go to a listener the kernel hands each
//! connection to only with its first bytes (TCP_DEFER_ACCEPT). A server-first protocol on such
//! a port still works, a second late; on any other port it is relayed at once.

use std::time::Duration;

use egressgate_lab::daemon::{wait_until, Daemon};
use egressgate_lab::{addr, GatewayOptions, Lab};

use crate::support::dig;

/// 8443 is a client-first port by default; 2525 is not.
const POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: greeted, namespace: shop}
spec:
  podSelector: {}
  egress:
    - to: [{dnsName: api.example.test}]
      ports:
        - {port: 8443, protocol: tcp}
        - {port: 2525, protocol: tcp}
"#;

/// An SMTP-like server upstream: it greets every connection first, then closes it.
fn greeting_server(lab: &Lab) -> Daemon {
    let script = format!(
        "import socket, threading\n\
         def serve(port):\n\
         \x20   s = socket.create_server(('{web}', port))\n\
         \x20   while True:\n\
         \x20       c, _ = s.accept()\n\
         \x20       c.sendall(b'220 greeted\\r\\n')\n\
         \x20       c.close()\n\
         for port in (8443, 2525):\n\
         \x20   threading.Thread(target=serve, args=(port,), daemon=True).start()\n\
         print('ready', flush=True)\n\
         threading.Event().wait()\n",
        web = addr::WEB
    );
    let server = Daemon::spawn(
        lab.up().name(),
        "greeting-server",
        &["python3", "-c", &script],
        lab.dir(),
        "TERM",
    )
    .expect("greeting server starts");
    wait_until("greeting server", Duration::from_secs(10), || {
        Ok(server.stdout_text().contains("ready"))
    })
    .expect("greeting server ready");
    server
}

/// Seconds until the pod read the server's greeting on `port`, or what went wrong.
fn greeted_after(lab: &Lab, port: u16) -> f64 {
    let script = format!(
        "import socket, time\n\
         start = time.monotonic()\n\
         s = socket.create_connection(('{web}', {port}), timeout=10)\n\
         greeting = s.recv(64)\n\
         print(greeting.decode().strip(), time.monotonic() - start)\n",
        web = addr::WEB
    );
    let out = lab.pod("a").run(&["python3", "-c", &script]);
    let seconds = out
        .stdout
        .strip_prefix("220 greeted ")
        .and_then(|rest| rest.trim().parse().ok());
    seconds.unwrap_or_else(|| panic!("port {port}: no greeting: {out}"))
}

#[test]
fn a_server_first_protocol_on_a_client_first_port_is_relayed_a_second_late() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .gateway(GatewayOptions::default().policy("greeted.yaml", POLICY))
        .start()
        .expect("lab starts");
    let _server = greeting_server(&lab);
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));

    // Not deferred: the gateway takes the connection at once and the greeting follows.
    let at_once = greeted_after(&lab, 2525);
    // Deferred: the pod sends nothing, so the kernel hands the connection over only after its
    // first SYN-ACK retransmission (1 s), and then it is relayed as any other.
    let deferred = greeted_after(&lab, 8443);
    assert!(at_once < 0.9, "port 2525 waited {at_once} s");
    assert!(deferred >= 0.9, "port 8443 was not deferred: {deferred} s");

    let decisions = lab.gateway().decisions();
    for port in [2525, 8443] {
        let decision = decisions
            .iter()
            .find(|d| d.is("app-1", port))
            .unwrap_or_else(|| panic!("no decision for {port}: {decisions:?}"));
        assert_eq!(decision.verdict(), Some("allow"), "{decision}");
        assert_eq!(decision.0["protocol"], "tcp", "{decision}");
    }
}
