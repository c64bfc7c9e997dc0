//! Bypass suite, the node itself: TCP to the node's own addresses is not intercepted (the
//! rules `return` for local destinations), so a pod can open a connection straight to the
//! gateway's transparent listener. That must not become a way out, nor a loop.

use std::time::Duration;

use egressgate_lab::{GatewayOptions, Lab};

use crate::support::SHOP_POLICY;

/// The lab's TPROXY listener port.
const TPROXY_PORT: u16 = 15001;

fn lab() -> Lab {
    Lab::builder()
        .pods(3)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts")
}

/// Python in a pod: connects to its gateway address on the TPROXY port, sends an HTTP request,
/// holds the connection for 3 s, and prints what came back.
fn hold_script(gateway_ip: &str) -> String {
    format!(
        "import socket\n\
         try:\n    s = socket.create_connection(('{gateway_ip}', {TPROXY_PORT}), timeout=3)\n\
         \x20   s.sendall(b'GET / HTTP/1.1\\r\\nHost: api.example.test\\r\\n\\r\\n')\n\
         \x20   print('reply', s.recv(100))\n\
         except Exception as e:\n    print('error', type(e).__name__)\n"
    )
}

/// The client's output and the decisions for connections to the TPROXY port, after it ran.
fn listener_decisions(lab: &Lab, letter: &str) -> (String, Vec<egressgate_lab::Decision>) {
    let (_, gateway_ip, _, _) = egressgate_lab::addr::pod_addrs(
        lab.pods()
            .iter()
            .position(|p| p.letter == letter)
            .expect("pod exists"),
    );
    let out = lab
        .pod(letter)
        .run(&["python3", "-c", &hold_script(&gateway_ip)]);
    assert!(out.success(), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let decisions = lab
        .gateway()
        .decisions()
        .into_iter()
        .filter(|d| d.destination_port() == Some(TPROXY_PORT))
        .collect();
    (out.stdout, decisions)
}

/// The nftables table refuses pods' connections to the gateway's own ports on node addresses
/// before any socket sees them: no decision, no relay, a refused connection.
#[test]
fn a_selected_pod_cannot_use_the_gateways_listener_as_a_proxy() {
    let lab = lab();
    let (out, decisions) = listener_decisions(&lab, "a");
    assert!(decisions.is_empty(), "{decisions:?}");
    assert!(out.contains("error ConnectionRefusedError"), "{out}");
}

/// A pod that no policy selects (`unselectedPods: allow`, the default) connects to the node's
/// address on the TPROXY port. Were it accepted, the gateway would connect to that destination,
/// its own listener, and relay to itself again and again, each hop holding two descriptors.
/// The table refuses it, and a connection from the node itself would be an unknown source.
#[test]
fn a_connection_to_the_gateways_own_listener_is_not_relayed_to_itself() {
    let lab = lab();
    // Pod c (role=other) is selected by no policy.
    let (out, decisions) = listener_decisions(&lab, "c");
    assert!(
        decisions.is_empty(),
        "the gateway accepted it: {decisions:?}"
    );
    assert!(out.contains("error ConnectionRefusedError"), "{out}");
}
