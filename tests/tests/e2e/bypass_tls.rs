//! Bypass suite, TLS: a pod that resolved api.example.test (allowed on 443) tries to reach
//! another name on the same shared IP, or to hide the name it wants, by bending the ClientHello.
//! Real clients (openssl, curl) where they can send the trick; otherwise real captured
//! ClientHellos, edited with every length recomputed, sent raw from the pod.

use std::time::{Duration, Instant};

use egressgate_lab::daemon::Daemon;
use egressgate_lab::{addr, Decision, GatewayOptions, Lab, Output};

use crate::bypass_support::{
    assert_allowed_as, assert_blocked, assert_nginx_never_saw, assert_not_relayed,
    assert_reply_starts, connection_id, one_byte_segments, records, send_once, send_raw,
    server_name_list, shop_lab_resolved, wait_nginx_saw, Hello, CHROMIUM_ECH_HELLO, EXT_ECH,
    EXT_PADDING, EXT_SERVER_NAME,
};
use crate::support::{curl, dig, run_and_decide, SHOP_POLICY, WAIT};

fn tls(lab: &Lab, bytes: &[u8]) -> (Output, Decision) {
    send_once(lab, "a", addr::WEB, 443, bytes)
}

/// `openssl s_client` from pod a to the web IP with `-servername <sni>`, asking for `/path`
/// with Host `<host>`.
fn openssl(lab: &Lab, sni: &str, host: &str, path: &str) -> (Output, Decision) {
    let ca = lab.ca();
    let pod = lab.pod("a");
    let cursor = lab.gateway().cursor();
    let connect = format!("{}:443", addr::WEB);
    let out = pod.run_stdin(
        &[
            "openssl",
            "s_client",
            "-connect",
            &connect,
            "-servername",
            sni,
            "-CAfile",
            &ca,
            "-ign_eof",
            "-quiet",
        ],
        &format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n"),
    );
    let d = lab
        .gateway()
        .wait_for_decision_since(cursor, |d| d.is(&pod.name, 443), WAIT)
        .unwrap_or_else(|e| panic!("no decision:\n{out}\n{e}"));
    (out, d)
}

/// A reply that starts with a TLS handshake record holding a ServerHello.
fn assert_server_hello(out: &Output) {
    assert_reply_starts(out, "160303");
    assert_eq!(
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("reply "))
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|hex| hex.get(10..12)),
        Some("02"),
        "not a ServerHello:\n{out}"
    );
}

#[test]
fn fake_sni_of_another_name_on_the_shared_ip_is_denied() {
    let lab = shop_lab_resolved();
    // A real client claiming a name the pod never resolved, on the IP it resolved for api.
    let (out, d) = openssl(&lab, addr::EVIL, addr::EVIL, "/fake-sni-openssl");
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");
    assert_eq!(d.names(), [addr::API], "{d}");
    assert_nginx_never_saw(&lab, "/fake-sni-openssl");

    // Resolving the other name too does not help: it resolves, but no rule allows it.
    assert!(dig(&lab, "a", addr::OTHER, &[]).contains(&addr::WEB.to_owned()));
    let ca = lab.ca();
    let resolve = format!("{}:443:{}", addr::OTHER, addr::WEB);
    let (out, d) = run_and_decide(
        &lab,
        "a",
        443,
        &curl(
            &ca,
            &[
                "--resolve",
                &resolve,
                "https://other.example.test/fake-sni-curl",
            ],
        ),
    );
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert!(d.names().contains(&addr::OTHER), "{d}");
    assert_nginx_never_saw(&lab, "/fake-sni-curl");
}

#[test]
fn missing_or_hidden_sni_is_denied_sni_missing() {
    let lab = shop_lab_resolved();
    let ca = lab.ca();
    // curl to the IP literal sends no SNI (RFC 6066 forbids IP literals in it).
    let (out, d) = run_and_decide(
        &lab,
        "a",
        443,
        &curl(&ca, &["-k", "https://198.19.0.10/no-sni-curl"]),
    );
    assert_blocked(&lab, &out, &d, "sni_missing", None);
    assert_eq!(d.protocol(), Some("tls"), "{d}");
    assert_nginx_never_saw(&lab, "/no-sni-curl");

    // The allowed name under a name_type other than host_name: not an SNI at all.
    let hidden = Hello::python().set_ext(
        EXT_SERVER_NAME,
        server_name_list(&[(1, addr::API.as_bytes())]),
    );
    let (out, d) = tls(&lab, &hidden.bytes());
    assert_blocked(&lab, &out, &d, "sni_missing", None);

    // No server_name extension at all.
    let (out, d) = tls(&lab, &Hello::python().no_sni().bytes());
    assert_blocked(&lab, &out, &d, "sni_missing", None);
}

#[test]
fn sni_spelling_tricks_are_normalised_or_refused() {
    let lab = shop_lab_resolved();
    // Case and a trailing dot name the same host: allowed only because api really is allowed,
    // and logged in canonical form. The same tricks on evil stay evil.
    let (out, d) = openssl(&lab, "API.Example.TEST", addr::API, "/upper-api");
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(d.sni(), Some(addr::API), "{d}");
    assert!(out.stdout.contains("hello from api.example.test"), "{out}");
    let (out, d) = openssl(&lab, "api.example.test.", addr::API, "/dot-api");
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(d.sni(), Some(addr::API), "{d}");
    let (out, d) = openssl(&lab, "EVIL.EXAMPLE.TEST", addr::EVIL, "/upper-evil");
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");
    assert_nginx_never_saw(&lab, "/upper-evil");
    let (out, d) = openssl(&lab, "evil.example.test.", addr::EVIL, "/dot-evil");
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_nginx_never_saw(&lab, "/dot-evil");

    // Punycode (IDNA A-label of "äpi"): a different name, not a spelling of api.
    let (out, d) = tls(
        &lab,
        &Hello::python().sni(b"xn--pi-uia.example.test").bytes(),
    );
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.sni(), Some("xn--pi-uia.example.test"), "{d}");

    // Byte strings that are not DNS names at all: refused before any comparison, so no parser
    // (a C string cut at the NUL, an IDNA mapping of full-width letters) can read them as api.
    let api_len_label = "a".repeat(64);
    let long_name = format!("{}.example.test", ["abcdefghij"; 25].join("."));
    let not_names: Vec<(&str, Vec<u8>)> = vec![
        (
            "NUL inside",
            b"api.example.test\0.evil.example.test".to_vec(),
        ),
        ("NUL after", b"api.example.test\0".to_vec()),
        (
            "NUL before",
            b"evil.example.test\0api.example.test".to_vec(),
        ),
        ("UTF-8 a-umlaut", "äpi.example.test".as_bytes().to_vec()),
        ("full-width api", "ａｐｉ.example.test".as_bytes().to_vec()),
        (
            "64-byte label",
            format!("{api_len_label}.example.test").into_bytes(),
        ),
        ("name over 253 bytes", long_name.into_bytes()),
        ("two trailing dots", b"api.example.test..".to_vec()),
        ("leading space", b" api.example.test".to_vec()),
        ("empty label", b"api..example.test".to_vec()),
        ("percent-encoded dot", b"api%2eexample.test".to_vec()),
    ];
    for (what, name) in not_names {
        let (out, d) = tls(&lab, &Hello::python().sni(&name).bytes());
        assert_eq!(d.0["detail"], "tls_sni_not_dns_name", "{what}: {d}");
        assert_blocked(&lab, &out, &d, "malformed", None);
    }
    let (out, d) = tls(&lab, &Hello::python().sni(addr::WEB.as_bytes()).bytes());
    assert_blocked(&lab, &out, &d, "malformed", Some("tls_sni_ip_literal"));

    // Two names: two host_names in one list, or two server_name extensions (either order).
    let two_in_list = server_name_list(&[(0, addr::API.as_bytes()), (0, addr::EVIL.as_bytes())]);
    let (out, d) = tls(
        &lab,
        &Hello::python()
            .set_ext(EXT_SERVER_NAME, two_in_list)
            .bytes(),
    );
    assert_blocked(
        &lab,
        &out,
        &d,
        "malformed",
        Some("tls_duplicate_sni_host_name"),
    );
    for (first, second) in [(addr::API, addr::EVIL), (addr::EVIL, addr::API)] {
        let hello = Hello::python()
            .sni(first.as_bytes())
            .push_ext(EXT_SERVER_NAME, server_name_list(&[(0, second.as_bytes())]));
        let (out, d) = tls(&lab, &hello.bytes());
        assert_blocked(&lab, &out, &d, "malformed", Some("tls_duplicate_extension"));
    }
}

#[test]
fn client_hello_in_one_byte_segments_is_reassembled_not_bypassed() {
    let lab = shop_lab_resolved();
    let evil = Hello::python().sni(addr::EVIL.as_bytes()).bytes();
    let (out, d) = send_raw(&lab, "a", addr::WEB, 443, &one_byte_segments(&evil), 2);
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");

    // The same real ClientHello for api, byte by byte: parsed, allowed, and the server answers.
    let (out, d) = send_raw(&lab, "a", addr::WEB, 443, &one_byte_segments(PYTHON), 2);
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(d.sni(), Some(addr::API), "{d}");
    assert_server_hello(&out);

    // Many small records, each in its own segment.
    let split = Hello::python().sni(addr::EVIL.as_bytes()).records(16);
    let (out, d) = send_raw(&lab, "a", addr::WEB, 443, &one_byte_segments(&split), 1);
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
}

const PYTHON: &[u8] = crate::bypass_support::PYTHON_HELLO;

#[test]
fn client_hello_spread_over_many_records_is_reassembled() {
    let lab = shop_lab_resolved();
    for fragment in [1, 7, 100] {
        let evil = Hello::python().sni(addr::EVIL.as_bytes()).records(fragment);
        let (out, d) = tls(&lab, &evil);
        assert_blocked(&lab, &out, &d, "sni_mismatch", None);
        assert_eq!(d.sni(), Some(addr::EVIL), "fragment {fragment}: {d}");

        let api = Hello::python().records(fragment);
        let (out, d) = tls(&lab, &api);
        assert_allowed_as(&out, &d, addr::API);
        assert_eq!(d.sni(), Some(addr::API), "fragment {fragment}: {d}");
    }

    // Something other than a handshake record between two fragments, and an empty record.
    let handshake = Hello::python().sni(addr::API.as_bytes()).handshake();
    let (head, tail) = handshake.split_at(40);
    let mut alert_between = records(head, 0x4000);
    alert_between.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00]);
    alert_between.extend_from_slice(&records(tail, 0x4000));
    let (out, d) = tls(&lab, &alert_between);
    assert_blocked(
        &lab,
        &out,
        &d,
        "malformed",
        Some("tls_not_handshake_record"),
    );
    let mut empty_record = records(head, 0x4000);
    empty_record.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x00]);
    empty_record.extend_from_slice(&records(tail, 0x4000));
    let (out, d) = tls(&lab, &empty_record);
    assert_blocked(&lab, &out, &d, "malformed", Some("tls_empty_record"));
}

/// `peek.maxBytes` in the lab (the default).
const PEEK_MAX_BYTES: usize = 16_384;

#[test]
fn client_hello_padded_to_the_peek_limit_is_still_checked() {
    let lab = shop_lab_resolved();
    // Padding first and the SNI last, so the name is in the very last bytes the gateway reads.
    let padded = |sni: &str, total: usize, fragment: usize| {
        let hello = Hello::python().no_sni().remove_ext(EXT_PADDING);
        let hello = Hello {
            extensions: [vec![(EXT_PADDING, Vec::new())], hello.extensions].concat(),
            ..hello
        }
        .push_ext(EXT_SERVER_NAME, server_name_list(&[(0, sni.as_bytes())]))
        .padded_to(total, fragment);
        hello.records(fragment)
    };
    let evil = padded(addr::EVIL, PEEK_MAX_BYTES, 0x4000);
    assert_eq!(evil.len(), PEEK_MAX_BYTES);
    let (out, d) = tls(&lab, &evil);
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");

    let (out, d) = tls(&lab, &padded(addr::EVIL, PEEK_MAX_BYTES, 4096));
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);

    let (out, d) = tls(&lab, &padded(addr::API, PEEK_MAX_BYTES, 0x4000));
    assert_allowed_as(&out, &d, addr::API);

    // One byte over the limit: the gateway gives up, and giving up is a deny.
    let (out, d) = tls(&lab, &padded(addr::API, PEEK_MAX_BYTES + 1, 0x4000));
    assert_blocked(&lab, &out, &d, "peek_too_large", None);
}

#[test]
fn a_second_client_hello_cannot_switch_the_name() {
    let lab = shop_lab_resolved();
    let api = Hello::python().handshake();
    let evil = Hello::python().sni(addr::EVIL.as_bytes()).handshake();

    // Two ClientHellos in one record, either order: refused outright.
    for (first, second) in [(&api, &evil), (&evil, &api)] {
        let both = records(&[first.as_slice(), second.as_slice()].concat(), 0x4000);
        let (out, d) = tls(&lab, &both);
        assert_blocked(
            &lab,
            &out,
            &d,
            "malformed",
            Some("tls_trailing_handshake_bytes"),
        );
    }

    // Evil first, api in a second record: the first decides.
    let evil_first = [records(&evil, 0x4000), records(&api, 0x4000)].concat();
    let (out, d) = tls(&lab, &evil_first);
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");

    // Api first, evil in a second record: decided on the first, which is the one the server
    // answers (its ServerHello); the second reaches the server only as bytes after it.
    let api_first = [records(&api, 0x4000), records(&evil, 0x4000)].concat();
    let (out, d) = tls(&lab, &api_first);
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(d.sni(), Some(addr::API), "{d}");
    assert_server_hello(&out);
}

/// RFC 8446 §4.2.8: the key_share extension.
const EXT_KEY_SHARE: u16 = 0x0033;
/// A ChangeCipherSpec record (middlebox compatibility mode, RFC 8446 §D.4).
const CHANGE_CIPHER_SPEC: &[u8] = &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
/// The first 16 bytes of a HelloRetryRequest record: record and handshake headers (a ServerHello),
/// legacy_version, and the start of the fixed random of RFC 8446 §4.1.3.
const HRR_START: &str = "1603030058020000540303cf21ad74e5";
/// That HelloRetryRequest record (5 + 0x58 bytes) and the ChangeCipherSpec record after it.
const HRR_FLIGHT_LEN: usize = 5 + 0x58 + 6;

/// Bytes the raw client read in all, however the reads split them.
fn replied_bytes(stdout: &str) -> usize {
    stdout
        .lines()
        .filter_map(|line| {
            line.strip_prefix("reply ")?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// The decisions for connection `id` so far.
fn decisions_of(lab: &Lab, id: u64) -> Vec<Decision> {
    lab.gateway()
        .decisions()
        .into_iter()
        .filter(|d| d.0["connection"].as_u64() == Some(id))
        .collect()
}

/// The port of [`retry_lab`]'s TLS 1.3 server (the lab's nginx speaks TLS 1.2 at most).
const RETRY_PORT: u16 = 8443;

/// A lab whose pod a resolved api and may reach it over TLS on 443..=8443, with
/// `openssl s_server -groups X25519` on the web IP's [`RETRY_PORT`]: it takes only X25519 key
/// shares, so a ClientHello without one gets a HelloRetryRequest.
fn retry_lab() -> (Lab, Daemon) {
    let policy = SHOP_POLICY.replace(
        "{port: 443, protocol: tls}",
        "{port: 443, endPort: 8443, protocol: tls}",
    );
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", &policy))
        .start()
        .expect("lab starts");
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));
    let cert = lab.ca();
    let key = lab
        .ca_cert()
        .with_file_name("key.pem")
        .display()
        .to_string();
    let accept = format!("{}:{RETRY_PORT}", addr::WEB);
    let server = Daemon::spawn(
        lab.up().name(),
        "s_server",
        &[
            "openssl", "s_server", "-accept", &accept, "-cert", &cert, "-key", &key, "-groups",
            "X25519", "-www",
        ],
        lab.dir(),
        "TERM",
    )
    .expect("s_server starts");
    let probe = format!("exec 3<>/dev/tcp/{}/{RETRY_PORT}", addr::WEB);
    let deadline = Instant::now() + WAIT;
    while !lab.up().run(&["bash", "-c", &probe]).success() {
        assert!(Instant::now() < deadline, "{}", server.output_tail(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    (lab, server)
}

#[test]
fn after_a_hello_retry_request_the_second_client_hello_must_keep_the_name() {
    let (lab, _server) = retry_lab();
    // A ClientHello for api without a key share: the server answers with a HelloRetryRequest.
    let first = Hello::python().set_ext(EXT_KEY_SHARE, vec![0, 0]).bytes();
    let evil = [
        CHANGE_CIPHER_SPEC,
        &Hello::python().sni(addr::EVIL.as_bytes()).bytes(),
    ]
    .concat();

    // The second ClientHello after the HRR, or sent at once behind the first: either way it is
    // read before a byte of it goes up.
    for chunks in [
        vec![first.clone(), evil.clone()],
        vec![[first.as_slice(), &evil].concat()],
    ] {
        let cursor = lab.gateway().cursor();
        let (out, allowed) = send_raw(&lab, "a", addr::WEB, RETRY_PORT, &chunks, 500);
        assert_allowed_as(&out, &allowed, addr::API);
        assert_eq!(allowed.sni(), Some(addr::API), "{allowed}");
        let id = connection_id(&allowed);
        let denied = lab
            .gateway()
            .wait_for_decision_since(
                cursor,
                |d| d.0["connection"].as_u64() == Some(id) && d.verdict() == Some("deny"),
                WAIT,
            )
            .unwrap_or_else(|e| panic!("no second decision:\n{out}\n{e}"));
        assert_eq!(
            (denied.reason(), denied.0["detail"].as_str()),
            (Some("malformed"), Some("tls_retry_sni_changed")),
            "{denied}"
        );
        assert_eq!(denied.sni(), Some(addr::EVIL), "{denied}");
        // The client got the HelloRetryRequest, then a reset; nothing was relayed.
        assert_reply_starts(&out, HRR_START);
        assert_eq!(out.stdout.matches("reply ").count(), 1, "{out}");
        assert!(out.stdout.contains("reset"), "{out}");
        assert_not_relayed(&lab, &denied);
    }

    // The same name in the second ClientHello: passed on (the server answers it), one decision.
    let api = [CHANGE_CIPHER_SPEC, &Hello::python().bytes()].concat();
    let (out, allowed) = send_raw(&lab, "a", addr::WEB, RETRY_PORT, &[first, api], 500);
    assert_allowed_as(&out, &allowed, addr::API);
    assert_reply_starts(&out, HRR_START);
    // The server answered the second ClientHello: more than the HelloRetryRequest came back
    // (in one read or several, as the timing falls).
    assert!(replied_bytes(&out.stdout) > HRR_FLIGHT_LEN, "{out}");
    let id = connection_id(&allowed);
    lab.gateway()
        .wait_for_events(
            "close",
            |line| line["connection"].as_u64() == Some(id),
            1,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("not relayed:\n{out}\n{e}"));
    assert_eq!(decisions_of(&lab, id).len(), 1, "{out}");
}

#[test]
fn real_clients_answering_a_hello_retry_request_are_allowed() {
    let (lab, _server) = retry_lab();
    let cert = lab.ca();
    let connect = format!("{}:{RETRY_PORT}", addr::WEB);
    let pod = lab.pod("a");
    let cursor = lab.gateway().cursor();
    let out = pod.run_stdin(
        &[
            "openssl",
            "s_client",
            "-connect",
            &connect,
            "-servername",
            addr::API,
            "-CAfile",
            &cert,
            "-groups",
            "P-256:X25519",
            "-msg",
            "-ign_eof",
        ],
        "GET / HTTP/1.0\r\n\r\n",
    );
    let d = lab
        .gateway()
        .wait_for_decision_since(cursor, |d| d.is(&pod.name, RETRY_PORT), WAIT)
        .unwrap_or_else(|e| panic!("no decision:\n{out}\n{e}"));
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(
        out.stdout.matches("], ClientHello").count(),
        2,
        "no HelloRetryRequest:\n{out}"
    );
    assert!(out.stdout.contains("HTTP/1.0 200 ok"), "{out}");

    let url = format!("https://{}:{RETRY_PORT}/", addr::API);
    let (out, d) = run_and_decide(
        &lab,
        "a",
        RETRY_PORT,
        &curl(
            &cert,
            &["--curves", "P-256:X25519", "-o", "/dev/null", &url],
        ),
    );
    assert!(out.success(), "{out}\n{d}");
    assert_allowed_as(&out, &d, addr::API);
    let id = connection_id(&d);
    lab.gateway()
        .wait_for_events(
            "close",
            |line| line["connection"].as_u64() == Some(id),
            1,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("not relayed:\n{out}\n{e}"));
    assert_eq!(decisions_of(&lab, id).len(), 1, "{out}");
}

#[test]
fn ech_with_a_mismatched_outer_name_is_denied() {
    let lab = shop_lab_resolved();
    // Chromium's real ClientHello carries an encrypted_client_hello extension (GREASE); what
    // the gateway checks is the outer SNI.
    let chromium = Hello::parse(CHROMIUM_ECH_HELLO);
    assert!(chromium.extensions.iter().any(|(t, _)| *t == EXT_ECH));
    let (out, d) = tls(&lab, &chromium.clone().sni(addr::EVIL.as_bytes()).bytes());
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.0["ech"], true, "{d}");
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");

    // An ECH extension added to a hello whose outer name is evil.
    let fake_ech = vec![0x00, 0x00, 0x01, 0x00, 0x01, 0x42, 0x00, 0x00, 0x00, 0x00];
    let hello = Hello::python()
        .sni(addr::EVIL.as_bytes())
        .push_ext(EXT_ECH, fake_ech.clone());
    let (out, d) = tls(&lab, &hello.bytes());
    assert_blocked(&lab, &out, &d, "sni_mismatch", None);
    assert_eq!(d.0["ech"], true, "{d}");

    // ECH and no outer name at all.
    let hello = Hello::python().no_sni().push_ext(EXT_ECH, fake_ech);
    let (out, d) = tls(&lab, &hello.bytes());
    assert_blocked(&lab, &out, &d, "sni_missing", None);
    assert_eq!(d.0["ech"], true, "{d}");
}

/// Documented limit (docs/security.md): with ECH, the outer (public) name is what is checked;
/// the inner name is encrypted. An allowed outer name passes, and the log says ECH was offered.
#[test]
fn limit_ech_inner_name_is_not_visible_outer_name_is_checked() {
    let lab = shop_lab_resolved();
    let (out, d) = tls(&lab, &Hello::parse(CHROMIUM_ECH_HELLO).bytes());
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(d.0["ech"], true, "{d}");
    assert_eq!(d.sni(), Some(addr::API), "{d}");
}

/// Documented limit (docs/security.md): the gateway decides on the ClientHello and never sees
/// the HTTP request inside TLS. A server that routes by the inner Host (domain fronting) serves
/// another name that shares the IP.
#[test]
fn limit_domain_fronting_inside_tls_is_not_visible() {
    let lab = shop_lab_resolved();
    let (out, d) = openssl(&lab, addr::API, addr::EVIL, "/fronted");
    assert_allowed_as(&out, &d, addr::API);
    assert_eq!(d.sni(), Some(addr::API), "{d}");
    assert!(out.stdout.contains("hello from evil.example.test"), "{out}");
    wait_nginx_saw(&lab, "/fronted");
}

#[test]
fn openings_that_are_not_a_client_hello_are_denied() {
    let lab = shop_lab_resolved();
    // SSLv2-compatible ClientHello (no extensions, so no SNI): not a handshake record.
    let sslv2 = [
        0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x2f, 0x00,
        0x00, 0x35, 0x00, 0x00, 0x0a, 0x01, 0x00, 0x80, 0x07, 0x00, 0xc0, 0x00, 0x00, 0x04, 0x00,
        0x00, 0x05, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89,
        0xab, 0xcd, 0xef,
    ];
    let (out, d) = tls(&lab, &sslv2);
    assert_blocked(&lab, &out, &d, "protocol_mismatch", None);
    // A ChangeCipherSpec or application-data record before the ClientHello.
    for opening in [
        [0x14, 0x03, 0x03, 0x00, 0x01, 0x01],
        [0x17, 0x03, 0x03, 0x00, 0x01, 0x00],
    ] {
        let bytes = [opening.as_slice(), PYTHON].concat();
        let (out, d) = tls(&lab, &bytes);
        assert_blocked(&lab, &out, &d, "protocol_mismatch", None);
    }
    // A handshake record holding a ServerHello-typed message, and a bad record version.
    let mut not_hello = Hello::python().bytes();
    not_hello[5] = 0x02;
    let (out, d) = tls(&lab, &not_hello);
    assert_blocked(&lab, &out, &d, "malformed", Some("tls_not_client_hello"));
    let mut bad_version = Hello::python().bytes();
    bad_version[2] = 0x05;
    let (out, d) = tls(&lab, &bad_version);
    assert_blocked(&lab, &out, &d, "malformed", Some("tls_bad_record_version"));
}
