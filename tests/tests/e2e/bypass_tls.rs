//! Bypass suite, TLS: a pod that resolved api.example.test (allowed on 443) tries to reach
//! another name on the same shared IP, or to hide the name it wants, by bending the ClientHello.
//! Real clients (openssl, curl) where they can send the trick; otherwise real captured
//! ClientHellos, edited with every length recomputed, sent raw from the pod.

use egressgate_lab::{addr, Decision, Lab, Output};

use crate::bypass_support::{
    assert_allowed_as, assert_blocked, assert_nginx_never_saw, assert_reply_starts,
    one_byte_segments, records, send_once, send_raw, server_name_list, shop_lab_resolved,
    wait_nginx_saw, Hello, CHROMIUM_ECH_HELLO, EXT_ECH, EXT_PADDING, EXT_SERVER_NAME,
};
use crate::support::{curl, dig, run_and_decide, WAIT};

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
