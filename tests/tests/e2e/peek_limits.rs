//! Clients that are silent, too big or malformed are denied with their own reason, and never
//! reach the destination.

use egressgate_lab::{addr, GatewayOptions, Lab};

use crate::support::{dig, run_and_decide, SHOP_POLICY};

fn lab() -> Lab {
    let options = GatewayOptions {
        peek_timeout_ms: 1000,
        ..GatewayOptions::default().policy("shop.yaml", SHOP_POLICY)
    };
    Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(options)
        .start()
        .expect("lab starts")
}

/// Connects from pod a to the web IP on 443, sends `payload` (Python bytes literal), waits up to
/// 5 s for the gateway to close, and prints what came back.
fn send(lab: &Lab, payload: &str) -> (egressgate_lab::Output, egressgate_lab::Decision) {
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{web}', 443), timeout=5)\n\
         s.sendall({payload})\n\
         try:\n    print('received', len(s.recv(65536)))\n\
         except Exception as e:\n    print('error', type(e).__name__)\n",
        web = addr::WEB,
    );
    run_and_decide(lab, "a", 443, &["python3", "-c", &script])
}

#[test]
fn silent_oversized_and_malformed_first_messages_are_denied() {
    let lab = lab();
    // A live record for the web IP, so the rule applies and the peek decides.
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));

    let (out, d) = send(&lab, "b''");
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("peek_timeout")),
        "{d}\n{out}"
    );

    // A TLS record announcing a 64 KiB ClientHello, then 20 KB of it: past peek.maxBytes.
    let (out, d) = send(
        &lab,
        "b'\\x16\\x03\\x01\\x40\\x00\\x01\\x00\\xff\\xff' + b'\\x00' * 20000",
    );
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("peek_too_large")),
        "{d}\n{out}"
    );

    // A handshake record whose message is a ServerHello (type 2), not a ClientHello.
    let (out, d) = send(
        &lab,
        "b'\\x16\\x03\\x01\\x00\\x08\\x02\\x00\\x00\\x04\\x03\\x03\\x00\\x00'",
    );
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("malformed")),
        "{d}\n{out}"
    );
    assert_eq!(d.0["detail"], "tls_not_client_hello", "{d}");
    assert!(
        out.stdout.contains("error") || out.stdout.contains("received 0"),
        "{out}"
    );
}

/// Python in pod a: `held` connections to the web IP that send the first byte of a ClientHello
/// and no more, then one more; prints how the last one ended. (A connection to a client-first
/// port that sends nothing is held by the kernel, not the gateway: it takes no slot.)
fn one_too_many(held: usize) -> String {
    format!(
        "import socket, time\n\
         held = [socket.create_connection(('{web}', 443), timeout=5) for _ in range({held})]\n\
         for h in held:\n    h.sendall(b'\\x16')\n\
         time.sleep(0.3)\n\
         try:\n    s = socket.create_connection(('{web}', 443), timeout=5)\n\
         \x20   s.sendall(b'x')\n    print('last', len(s.recv(10)))\n\
         except Exception as e:\n    print('last', type(e).__name__)\n",
        web = addr::WEB
    )
}

/// The last connection of `one_too_many` was reset: the reset reached the pod before its write
/// (`ConnectionResetError` from `connect`, whose completion a socket with a timeout checks only
/// later, or `BrokenPipeError` / `ConnectionResetError` from `sendall`), or after it (from
/// `recv`, or as end of stream).
fn was_cut(stdout: &str) -> bool {
    [
        "last ConnectionResetError",
        "last BrokenPipeError",
        "last 0",
    ]
    .iter()
    .any(|ending| stdout.contains(ending))
}

fn limited_lab(options: GatewayOptions) -> Lab {
    Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(options.policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts")
}

#[test]
fn connections_waiting_in_peek_are_bounded_per_pod() {
    let lab = limited_lab(GatewayOptions {
        max_pending_per_pod: Some(2),
        ..GatewayOptions::default()
    });
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));
    let (out, d) = run_and_find(&lab, &one_too_many(2), "peek_limit");
    assert_eq!(d.verdict(), Some("deny"), "{d}\n{out}");
    assert!(was_cut(&out.stdout), "{out}");
}

#[test]
fn open_connections_are_bounded() {
    let lab = limited_lab(GatewayOptions {
        max_connections: Some(2),
        ..GatewayOptions::default()
    });
    let (out, d) = run_and_find(&lab, &one_too_many(2), "connection_limit");
    assert_eq!(d.verdict(), Some("deny"), "{d}\n{out}");
    assert!(was_cut(&out.stdout), "{out}");
}

/// Runs `script` in pod a and returns the decision with `reason` it caused.
fn run_and_find(
    lab: &Lab,
    script: &str,
    reason: &str,
) -> (egressgate_lab::Output, egressgate_lab::Decision) {
    let cursor = lab.gateway().cursor();
    let out = lab.pod("a").run(&["python3", "-c", script]);
    let decision = lab
        .gateway()
        .wait_for_decision_since(
            cursor,
            |d| d.reason() == Some(reason),
            std::time::Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("no {reason} decision:\n{out}\n{e}"));
    (out, decision)
}
