//! Bypass suite, HTTP/1: a pod that resolved api.example.test (allowed on 80/http) tries to get
//! nginx, which serves evil.example.test on the same IP, to serve evil instead: a second Host,
//! an absolute-form target, folding, case, line-ending, framing and proxy tricks, and later
//! requests on the same connection. Every attempt uses its own path, and nginx's access log shows
//! whether the request reached it.

use std::time::{Duration, Instant};

use egressgate_lab::daemon::Daemon;
use egressgate_lab::{addr, Decision, GatewayOptions, Lab, Output};

use crate::bypass_support::{
    assert_allowed_as, assert_blocked, assert_nginx_never_saw, connection_id, metric, send_once,
    send_raw, shop_lab_resolved, wait_nginx_saw,
};
use crate::support::{curl, dig, run_and_decide, SHOP_POLICY, WAIT};

fn http(lab: &Lab, request: &str) -> (Output, Decision) {
    send_once(lab, "a", addr::WEB, 80, request.as_bytes())
}

/// Sends `request` (which asks for `path`) and asserts it was denied with `reason`/`detail`
/// and never reached nginx.
fn blocked(lab: &Lab, path: &str, request: &str, reason: &str, detail: Option<&str>) -> Decision {
    assert!(
        request.contains(path),
        "{request:?} does not ask for {path}"
    );
    let (out, d) = http(lab, request);
    assert_blocked(lab, &out, &d, reason, detail);
    assert_nginx_never_saw(lab, path);
    d
}

#[test]
fn real_clients_naming_another_host_are_denied() {
    let lab = shop_lab_resolved();
    let ca = lab.ca();
    let cases: [(&[&str], &str, &str, Option<&str>); 5] = [
        // Host header of another name on the shared IP.
        (
            &[
                "-H",
                "Host: evil.example.test",
                "http://api.example.test/rc-host",
            ],
            "/rc-host",
            "host_mismatch",
            None,
        ),
        // Absolute-form target naming evil, Host naming api.
        (
            &[
                "--request-target",
                "http://evil.example.test/rc-absolute",
                "http://api.example.test/",
            ],
            "/rc-absolute",
            "malformed",
            Some("http_host_conflict"),
        ),
        // The shared IP used as a forward proxy for evil.
        (
            &[
                "-x",
                "http://api.example.test:80",
                "http://evil.example.test/rc-proxy",
            ],
            "/rc-proxy",
            "host_mismatch",
            None,
        ),
        // The shared IP used as a CONNECT proxy (a tunnel to anywhere).
        (
            &[
                "-p",
                "-x",
                "http://api.example.test:80",
                "https://evil.example.test/rc-connect",
            ],
            "/rc-connect",
            "malformed",
            Some("http_connect"),
        ),
        // HTTP/1.0 without Host.
        (
            &[
                "--http1.0",
                "-H",
                "Host:",
                "http://api.example.test/rc-nohost",
            ],
            "/rc-nohost",
            "host_missing",
            None,
        ),
    ];
    for (args, path, reason, detail) in cases {
        let (out, d) = run_and_decide(&lab, "a", 80, &curl(&ca, args));
        assert_blocked(&lab, &out, &d, reason, detail);
        assert_nginx_never_saw(&lab, path);
    }
    let d = blocked_h2(&lab);
    assert_eq!(d.protocol(), Some("http2"), "{d}");
}

/// HTTP/2 with prior knowledge: a protocol the http rule does not speak.
fn blocked_h2(lab: &Lab) -> Decision {
    let ca = lab.ca();
    let (out, d) = run_and_decide(
        lab,
        "a",
        80,
        &curl(
            &ca,
            &["--http2-prior-knowledge", "http://api.example.test/rc-h2"],
        ),
    );
    assert_blocked(lab, &out, &d, "protocol_mismatch", None);
    assert_nginx_never_saw(lab, "/rc-h2");
    d
}

#[test]
fn two_hosts_absolute_form_and_userinfo_are_refused() {
    let lab = shop_lab_resolved();
    let dup = Some("http_duplicate_host");
    blocked(
        &lab,
        "/dup-1",
        "GET /dup-1 HTTP/1.1\r\nHost: api.example.test\r\nHost: evil.example.test\r\n\r\n",
        "malformed",
        dup,
    );
    blocked(
        &lab,
        "/dup-2",
        "GET /dup-2 HTTP/1.1\r\nHost: evil.example.test\r\nHost: api.example.test\r\n\r\n",
        "malformed",
        dup,
    );
    blocked(
        &lab,
        "/dup-3",
        "GET /dup-3 HTTP/1.1\r\nhost: api.example.test\r\nHOST: evil.example.test\r\n\r\n",
        "malformed",
        dup,
    );

    let conflict = Some("http_host_conflict");
    blocked(
        &lab,
        "/abs-1",
        "GET http://evil.example.test/abs-1 HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
        "malformed",
        conflict,
    );
    blocked(
        &lab,
        "/abs-2",
        "GET http://api.example.test/abs-2 HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
        "malformed",
        conflict,
    );
    blocked(
        &lab,
        "/abs-3",
        "GET http://api.example.test:8080/abs-3 HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
        "malformed",
        conflict,
    );
    // Absolute form alone names the host: evil, whatever the case of scheme and name.
    let d = blocked(
        &lab,
        "/abs-4",
        "GET HTTP://EVIL.EXAMPLE.TEST/abs-4 HTTP/1.0\r\n\r\n",
        "host_mismatch",
        None,
    );
    assert_eq!(d.host(), Some(addr::EVIL), "{d}");
    // userinfo: `api.example.test@` is not the host; refused rather than guessed.
    blocked(
        &lab,
        "/abs-5",
        "GET http://api.example.test@evil.example.test/abs-5 HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
        "malformed",
        Some("http_bad_host"),
    );
    blocked(
        &lab,
        "/abs-6",
        "GET /abs-6 HTTP/1.1\r\nHost: api.example.test@evil.example.test\r\n\r\n",
        "malformed",
        Some("http_bad_host"),
    );
}

#[test]
fn folding_line_endings_and_odd_bytes_are_refused() {
    let lab = shop_lab_resolved();
    blocked(
        &lab,
        "/fold-1",
        "GET /fold-1 HTTP/1.1\r\nHost: api.example.test\r\n evil.example.test\r\n\r\n",
        "http_smuggling",
        Some("http_obs_fold"),
    );
    blocked(
        &lab,
        "/fold-2",
        "GET /fold-2 HTTP/1.1\r\nX-Pad: a\r\n\tHost: evil.example.test\r\nHost: api.example.test\r\n\r\n",
        "http_smuggling",
        Some("http_obs_fold"),
    );
    // Bare LF, where some parsers see one header line and others two.
    blocked(
        &lab,
        "/lf-1",
        "GET /lf-1 HTTP/1.1\nHost: evil.example.test\n\n",
        "http_smuggling",
        Some("http_bad_line_ending"),
    );
    blocked(
        &lab,
        "/lf-2",
        "GET /lf-2 HTTP/1.1\r\nHost: api.example.test\r\nX-Pad: a\nHost: evil.example.test\r\n\r\n",
        "http_smuggling",
        Some("http_bad_line_ending"),
    );
    blocked(
        &lab,
        "/cr-1",
        "GET /cr-1 HTTP/1.1\r\nHost: api.example.test\rHost: evil.example.test\r\n\r\n",
        "http_smuggling",
        Some("http_bad_line_ending"),
    );
    blocked(
        &lab,
        "/colon-1",
        "GET /colon-1 HTTP/1.1\r\nHost : evil.example.test\r\n\r\n",
        "malformed",
        Some("http_space_before_colon"),
    );
    // A form feed is no whitespace in HTTP (OWS is SP and HTAB): not trimmed, refused.
    for (path, host) in [
        ("/ff-1", "api.example.test\x0c"),
        ("/ff-2", "\x0capi.example.test"),
    ] {
        blocked(
            &lab,
            path,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            "malformed",
            Some("http_bad_header_value"),
        );
    }
    blocked(
        &lab,
        "/nul-1",
        "GET /nul-1 HTTP/1.1\r\nHost: api.example.test\0evil.example.test\r\n\r\n",
        "malformed",
        Some("http_bad_header_value"),
    );
    for (path, host) in [
        ("/list-1", "api.example.test, evil.example.test"),
        ("/list-2", "api.example.test evil.example.test"),
        ("/pct-1", "api%2eexample.test"),
        ("/idn-1", "äpi.example.test"),
    ] {
        blocked(
            &lab,
            path,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            "malformed",
            Some("http_bad_host"),
        );
    }
    let mut many = String::from("GET /many-1 HTTP/1.1\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-Pad-{i}: a\r\n"));
    }
    many.push_str("Host: evil.example.test\r\n\r\n");
    blocked(
        &lab,
        "/many-1",
        &many,
        "malformed",
        Some("http_too_many_headers"),
    );
    // Request lines that are not HTTP/1.0 or 1.1.
    blocked(
        &lab,
        "/v-1",
        "GET /v-1 HTTP/1.2\r\nHost: evil.example.test\r\n\r\n",
        "malformed",
        Some("http_unsupported_version"),
    );
    blocked(
        &lab,
        "/v-2",
        "GET /v-2\r\n\r\n",
        "malformed",
        Some("http_bad_request_line"),
    );
    blocked(
        &lab,
        "/v-3",
        "GET  /v-3 HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
        "malformed",
        Some("http_bad_request_line"),
    );
    // An empty line before the request line (RFC 9112 §2.2 lets servers skip it).
    blocked(
        &lab,
        "/crlf-1",
        "\r\nGET /crlf-1 HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
        "protocol_mismatch",
        None,
    );
    // A lowercase `connect` is no method nginx knows; the gateway refuses its target.
    blocked(
        &lab,
        "/connect-1",
        "connect evil.example.test:443 HTTP/1.1\r\nHost: evil.example.test\r\nX-Path: /connect-1\r\n\r\n",
        "malformed",
        Some("http_bad_request_line"),
    );
}

#[test]
fn ambiguous_framing_of_the_first_request_is_refused_as_smuggling() {
    let lab = shop_lab_resolved();
    // Each would frame its body one way for the gateway and maybe another for the server: the
    // "body" here is a request for evil that a server reading the other framing would serve.
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: evil.example.test\r\n\r\n";
    let cases = [
        (
            "/cl-te",
            "Content-Length: 4\r\nTransfer-Encoding: chunked",
            "http_content_length_and_transfer_encoding",
        ),
        (
            "/te-cl",
            "Transfer-Encoding: chunked\r\nContent-Length: 4",
            "http_content_length_and_transfer_encoding",
        ),
        (
            "/cl-cl",
            "Content-Length: 0\r\nContent-Length: 48",
            "http_duplicate_content_length",
        ),
        (
            "/cl-list",
            "Content-Length: 0, 48",
            "http_bad_content_length",
        ),
        (
            "/te-case",
            "Transfer-Encoding: Chunked",
            "http_bad_transfer_encoding",
        ),
        (
            "/te-x",
            "Transfer-Encoding: xchunked",
            "http_bad_transfer_encoding",
        ),
        (
            "/te-twice",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            "http_bad_transfer_encoding",
        ),
    ];
    for (path, fields, detail) in cases {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: api.example.test\r\n{fields}\r\n\r\n0\r\n\r\n{smuggled}"
        );
        blocked(&lab, path, &request, "http_smuggling", Some(detail));
    }
    blocked(
        &lab,
        "/te-10",
        &format!("POST /te-10 HTTP/1.0\r\nHost: api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        "http_smuggling",
        Some("http_transfer_encoding_in_http10"),
    );
    assert_nginx_never_saw(&lab, "/smuggled");

    // Unambiguous framing passes: curl's chunked upload and a Content-Length body.
    let ca = lab.ca();
    for args in [
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "hello",
            "http://api.example.test/chunked-ok",
        ][..],
        &[
            "--data-binary",
            "hello",
            "http://api.example.test/length-ok",
        ],
    ] {
        let (out, d) = run_and_decide(&lab, "a", 80, &curl(&ca, args));
        assert_allowed_as(&out, &d, addr::API);
        assert!(out.stdout.contains("hello from api.example.test"), "{out}");
    }
    wait_nginx_saw(&lab, "/chunked-ok");
    wait_nginx_saw(&lab, "/length-ok");
}

#[test]
fn an_upgrade_to_h2c_is_refused() {
    let lab = shop_lab_resolved();
    // curl --http2 on http:// asks to upgrade the connection: Upgrade: h2c, HTTP2-Settings.
    let ca = lab.ca();
    let (out, d) = run_and_decide(
        &lab,
        "a",
        80,
        &curl(&ca, &["--http2", "http://api.example.test/h2c-up"]),
    );
    assert_blocked(
        &lab,
        &out,
        &d,
        "protocol_mismatch",
        Some("http_upgrade_h2c"),
    );
    assert_nginx_never_saw(&lab, "/h2c-up");
    blocked(
        &lab,
        "/h2c-2",
        "GET /h2c-2 HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: websocket, H2C\r\n\r\n",
        "protocol_mismatch",
        Some("http_upgrade_h2c"),
    );
}

#[test]
fn case_dots_and_ports_are_normalised_not_trusted() {
    let lab = shop_lab_resolved();
    for (path, host) in [
        ("/case-evil", "EVIL.Example.TEST"),
        ("/dot-evil", "evil.example.test."),
        ("/port-evil", "evil.example.test:80"),
        ("/ip-host", "198.19.0.10"),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nhOsT: {host}\r\n\r\n");
        blocked(&lab, path, &request, "host_mismatch", None);
    }
    // The same spellings of api are api: allowed, and nginx serves api.
    for (path, host) in [
        ("/case-api", "API.Example.TEST"),
        ("/dot-api", "api.example.test."),
        ("/port-api", "api.example.test:80"),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHOST: {host}\r\nConnection: close\r\n\r\n");
        let (out, d) = http(&lab, &request);
        assert_allowed_as(&out, &d, addr::API);
        assert_eq!(d.host(), Some(addr::API), "{d}");
        assert!(out.stdout.contains("hello from api.example.test"), "{out}");
        wait_nginx_saw(&lab, path);
    }
}

#[test]
fn a_request_head_in_one_byte_segments_is_still_checked() {
    let lab = shop_lab_resolved();
    let request =
        "GET /slow-evil HTTP/1.1\r\nHost: api.example.test\r\nHost: evil.example.test\r\n\r\n";
    let chunks: Vec<Vec<u8>> = request.bytes().map(|b| vec![b]).collect();
    let (out, d) = send_raw(&lab, "a", addr::WEB, 80, &chunks, 2);
    assert_blocked(&lab, &out, &d, "malformed", Some("http_duplicate_host"));
    assert_nginx_never_saw(&lab, "/slow-evil");
    let request = "GET /slow-evil-2 HTTP/1.1\r\nHost: evil.example.test\r\n\r\n";
    let chunks: Vec<Vec<u8>> = request.bytes().map(|b| vec![b]).collect();
    let (out, d) = send_raw(&lab, "a", addr::WEB, 80, &chunks, 2);
    assert_blocked(&lab, &out, &d, "host_mismatch", None);
    assert_nginx_never_saw(&lab, "/slow-evil-2");
}

/// The decisions for connection `id` so far.
fn decisions_of(lab: &Lab, id: u64) -> Vec<Decision> {
    lab.gateway()
        .decisions()
        .into_iter()
        .filter(|d| d.0["connection"].as_u64() == Some(id))
        .collect()
}

/// The second decision line of the connection `first` was decided on.
fn later_decision(lab: &Lab, first: &Decision, out: &Output) -> Decision {
    let id = connection_id(first);
    let cursor = 0;
    lab.gateway()
        .wait_for_decision_since(
            cursor,
            |d| d.0["connection"].as_u64() == Some(id) && d.verdict() == Some("deny"),
            WAIT,
        )
        .unwrap_or_else(|e| panic!("no decision for the later request:\n{out}\n{e}"))
}

#[test]
fn every_request_on_a_connection_is_checked_not_only_the_first() {
    let lab = shop_lab_resolved();
    let first = b"GET /ka-1 HTTP/1.1\r\nHost: api.example.test\r\n\r\n".to_vec();
    let evil =
        b"GET /ka-2 HTTP/1.1\r\nHost: evil.example.test\r\nConnection: close\r\n\r\n".to_vec();
    // Kept alive (after the first answer), or pipelined in the same write.
    for chunks in [
        vec![first.clone(), evil.clone()],
        vec![[first.clone(), evil.clone()].concat()],
    ] {
        let (out, d) = send_raw(&lab, "a", addr::WEB, 80, &chunks, 300);
        assert_allowed_as(&out, &d, addr::API);
        assert_eq!(d.host(), Some(addr::API), "{d}");
        let denied = later_decision(&lab, &d, &out);
        assert_eq!(denied.reason(), Some("host_mismatch"), "{denied}");
        assert_eq!(denied.host(), Some(addr::EVIL), "{denied}");
        // The allowed answer is not cut; the other never comes.
        assert!(out.stdout.contains("hello from api.example.test"), "{out}");
        assert!(
            !out.stdout.contains("hello from evil.example.test"),
            "{out}"
        );
        wait_nginx_saw(&lab, "/ka-1");
        assert_nginx_never_saw(&lab, "/ka-2");
    }

    // curl --next reuses the connection; its second request names evil.
    let ca = lab.ca();
    let (out, d) = run_and_decide(
        &lab,
        "a",
        80,
        &curl(
            &ca,
            &[
                "http://api.example.test/next-1",
                "--next",
                "-H",
                "Host: evil.example.test",
                "http://api.example.test/next-2",
            ],
        ),
    );
    assert_allowed_as(&out, &d, addr::API);
    assert!(out.stdout.contains("hello from api.example.test"), "{out}");
    assert!(!out.stdout.contains("hello from evil"), "{out}");
    let denied = later_decision(&lab, &d, &out);
    assert_eq!(denied.reason(), Some("host_mismatch"), "{denied}");
    assert_nginx_never_saw(&lab, "/next-2");

    // Several allowed requests on one connection: each served, one decision line.
    let (out, d) = run_and_decide(
        &lab,
        "a",
        80,
        &curl(
            &ca,
            &[
                "http://api.example.test/ok-1",
                "--next",
                "--data-binary",
                "GET /in-body HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
                "http://api.example.test/ok-2",
                "--next",
                "http://api.example.test/ok-3",
            ],
        ),
    );
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(
        out.stdout.matches("hello from api.example.test").count(),
        3,
        "{out}"
    );
    wait_nginx_saw(&lab, "/ok-3");
    assert_nginx_never_saw(&lab, "/in-body");
    let id = connection_id(&d);
    lab.gateway()
        .wait_for_events(
            "close",
            |line| line["connection"].as_u64() == Some(id),
            1,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("not closed:\n{out}\n{e}"));
    assert_eq!(decisions_of(&lab, id).len(), 1);
    // Counted, though only the refused ones have lines: 3 denied, the two allowed after ok-1.
    let count = |verdict: &str| {
        metric(
            &lab,
            &format!("egressgate_http_later_requests_total{{verdict=\"{verdict}\"}}"),
        )
    };
    assert_eq!((count("deny"), count("allow")), (3.0, 2.0));
}

#[test]
fn later_requests_are_held_to_the_framing_and_h2c_rules_of_the_first() {
    let lab = shop_lab_resolved();
    let first = b"GET /l-1 HTTP/1.1\r\nHost: api.example.test\r\n\r\n".to_vec();
    let cases: [(&str, &str, &str, &str); 3] = [
        (
            "/l-smuggle",
            "POST /l-smuggle HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /l-evil HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
            "http_smuggling",
            "http_content_length_and_transfer_encoding",
        ),
        (
            "/l-h2c",
            "GET /l-h2c HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
            "protocol_mismatch",
            "http_upgrade_h2c",
        ),
        (
            "/l-fold",
            "GET /l-fold HTTP/1.1\r\nHost: api.example.test\r\n evil.example.test\r\n\r\n",
            "http_smuggling",
            "http_obs_fold",
        ),
    ];
    for (path, later, reason, detail) in cases {
        let (out, d) = send_raw(
            &lab,
            "a",
            addr::WEB,
            80,
            &[first.clone(), later.as_bytes().to_vec()],
            300,
        );
        assert_allowed_as(&out, &d, addr::API);
        let denied = later_decision(&lab, &d, &out);
        assert_eq!(
            (denied.reason(), denied.0["detail"].as_str()),
            (Some(reason), Some(detail)),
            "{denied}"
        );
        assert_nginx_never_saw(&lab, path);
    }
    assert_nginx_never_saw(&lab, "/l-evil");

    // A first request that asks to upgrade, which nginx does not do (it answers 200): the
    // connection stays HTTP, and the next request is checked.
    let upgrade = b"GET /u-1 HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
    let evil = b"GET /u-2 HTTP/1.1\r\nHost: evil.example.test\r\n\r\n".to_vec();
    let (out, d) = send_raw(&lab, "a", addr::WEB, 80, &[upgrade, evil], 300);
    assert_allowed_as(&out, &d, addr::API);
    assert!(out.stdout.contains("hello from api.example.test"), "{out}");
    let denied = later_decision(&lab, &d, &out);
    assert_eq!(denied.reason(), Some("host_mismatch"), "{denied}");
    assert_nginx_never_saw(&lab, "/u-2");
}

/// A WebSocket-style server on the web IP's port 8080: answers the first request head with
/// `101 Switching Protocols`, then echoes whatever comes.
const SWITCHING_SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(8)
while True:
    c, _ = s.accept()
    data = b''
    while b'\r\n\r\n' not in data:
        more = c.recv(4096)
        if not more: break
        data += more
    c.sendall(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n')
    rest = data.split(b'\r\n\r\n', 1)[1] if b'\r\n\r\n' in data else b''
    if rest: c.sendall(rest)
    while True:
        more = c.recv(4096)
        if not more: break
        c.sendall(more)
    c.close()
"#;

#[test]
fn after_the_server_switches_protocols_the_connection_is_opaque() {
    let policy = SHOP_POLICY.replace(
        "{port: 80, protocol: http}",
        "{port: 80, endPort: 8080, protocol: http}",
    );
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", &policy))
        .start()
        .expect("lab starts");
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));
    let server = Daemon::spawn(
        lab.up().name(),
        "switching",
        &["python3", "-c", SWITCHING_SERVER, addr::WEB],
        lab.dir(),
        "TERM",
    )
    .expect("server starts");
    let probe = format!("exec 3<>/dev/tcp/{}/8080", addr::WEB);
    let deadline = Instant::now() + WAIT;
    while !lab.up().run(&["bash", "-c", &probe]).success() {
        assert!(Instant::now() < deadline, "{}", server.output_tail(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    let upgrade = b"GET /ws HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
    // After the 101 these bytes are the new protocol's, whatever they look like.
    let frames = b"GET /x HTTP/1.1\r\nHost: evil.example.test\r\n\r\n".to_vec();
    let (out, d) = send_raw(&lab, "a", addr::WEB, 8080, &[upgrade, frames], 300);
    assert_allowed_as(&out, &d, addr::API);
    assert!(out.stdout.contains("101 Switching"), "{out}");
    assert!(
        out.stdout.contains("evil.example.test"),
        "not echoed: {out}"
    );
    let id = connection_id(&d);
    lab.gateway()
        .wait_for_events(
            "close",
            |line| line["connection"].as_u64() == Some(id),
            1,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("not closed:\n{out}\n{e}"));
    assert_eq!(decisions_of(&lab, id).len(), 1, "{out}");
}
