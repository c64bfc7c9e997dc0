//! TLS SNI and HTTP Host checks against the names a pod resolved.

use egressgate_lab::addr;

use crate::support::{assert_allowed, assert_denied, curl, dig, run_and_decide, shop_lab, WAIT};

#[test]
fn tls_and_http_to_a_resolved_allowed_name_are_allowed() {
    let lab = shop_lab();
    let ca = lab.ca();
    let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"]));
    assert_allowed(&out, &d, "hello from api.example.test");
    assert_eq!(d.sni(), Some(addr::API), "{d}");
    assert_eq!(d.protocol(), Some("tls"), "{d}");
    assert_eq!(d.destination_ip(), Some(addr::WEB), "{d}");
    assert_eq!(d.pod_namespace(), Some("shop"), "{d}");
    assert!(d.names().contains(&addr::API), "{d}");

    let (out, d) = run_and_decide(&lab, "a", 80, &curl(&ca, &["http://api.example.test/"]));
    assert_allowed(&out, &d, "hello from api.example.test");
    assert_eq!(d.host(), Some(addr::API), "{d}");
    assert_eq!(d.protocol(), Some("http"), "{d}");
}

#[test]
fn tls_allowed_over_ipv6() {
    let lab = shop_lab();
    let ca = lab.ca();
    let args = [
        "curl",
        "-sS",
        "-6",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "https://api.example.test/",
    ];
    let (out, d) = run_and_decide(&lab, "a", 443, &args);
    assert_allowed(&out, &d, "hello from api.example.test");
    assert_eq!(d.destination_ip(), Some(addr::WEB6), "{d}");
}

#[test]
fn resolved_name_outside_policy_is_denied_not_allowed() {
    let lab = shop_lab();
    let ca = lab.ca();
    let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://evil.example.test/"]));
    assert_denied(&out, &d, &["not_allowed"]);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");
}

#[test]
fn sni_of_another_name_on_a_shared_ip_is_denied() {
    let lab = shop_lab();
    let ca = lab.ca();
    // The pod resolved only api; evil shares its IP.
    assert_eq!(
        dig(&lab, "a", addr::API, &[]).last().map(String::as_str),
        Some(addr::WEB)
    );
    let resolve = format!("{}:443:{}", addr::EVIL, addr::WEB);
    let (out, d) = run_and_decide(
        &lab,
        "a",
        443,
        &curl(&ca, &["--resolve", &resolve, "https://evil.example.test/"]),
    );
    assert_denied(&out, &d, &["sni_mismatch", "not_allowed"]);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");
}

#[test]
fn http_host_of_another_name_is_denied_host_mismatch() {
    let lab = shop_lab();
    let ca = lab.ca();
    let (out, d) = run_and_decide(
        &lab,
        "a",
        80,
        &curl(
            &ca,
            &["-H", "Host: evil.example.test", "http://api.example.test/"],
        ),
    );
    assert_denied(&out, &d, &["host_mismatch"]);
    assert_eq!(d.host(), Some(addr::EVIL), "{d}");
}

#[test]
fn ip_literal_without_dns_is_denied_no_dns_record() {
    let lab = shop_lab();
    let ca = lab.ca();
    let (out, d) = run_and_decide(&lab, "b", 443, &curl(&ca, &["-k", "https://198.19.0.10/"]));
    assert_denied(&out, &d, &["no_dns_record"]);
}

#[test]
fn openssl_with_sni_is_allowed_and_without_sni_is_denied() {
    let lab = shop_lab();
    let ca = lab.ca();
    let request = "GET / HTTP/1.0\r\nHost: api.example.test\r\n\r\n";
    let pod = lab.pod("a");
    let cursor = lab.gateway().cursor();
    let out = pod.run_stdin(
        &[
            "openssl",
            "s_client",
            "-4",
            "-connect",
            "api.example.test:443",
            "-servername",
            addr::API,
            "-CAfile",
            &ca,
            "-verify_return_error",
            "-ign_eof",
            "-quiet",
        ],
        request,
    );
    let d = lab
        .gateway()
        .wait_for_decision_since(cursor, |d| d.is(&pod.name, 443), WAIT)
        .expect("decision");
    assert_allowed(&out, &d, "hello from api.example.test");
    assert_eq!(d.sni(), Some(addr::API), "{d}");

    let cursor = lab.gateway().cursor();
    let out = pod.run_stdin(
        &[
            "openssl",
            "s_client",
            "-4",
            "-connect",
            "api.example.test:443",
            "-noservername",
            "-CAfile",
            &ca,
            "-ign_eof",
            "-quiet",
        ],
        request,
    );
    let d = lab
        .gateway()
        .wait_for_decision_since(cursor, |d| d.is(&pod.name, 443), WAIT)
        .expect("decision");
    assert_denied(&out, &d, &["sni_missing"]);
}

#[test]
fn plain_http_to_a_tls_port_is_denied_protocol_mismatch() {
    let lab = shop_lab();
    let ca = lab.ca();
    let (out, d) = run_and_decide(
        &lab,
        "a",
        443,
        &curl(&ca, &["http://api.example.test:443/"]),
    );
    assert_denied(&out, &d, &["protocol_mismatch"]);
}

#[test]
fn another_pods_dns_record_does_not_allow_this_pod() {
    let lab = shop_lab();
    let ca = lab.ca();
    // Pod a resolves api; pod b resolves nothing and connects to the same IP with the same SNI.
    assert_eq!(
        dig(&lab, "a", addr::API, &[]).last().map(String::as_str),
        Some(addr::WEB)
    );
    let resolve = format!("{}:443:{}", addr::API, addr::WEB);
    let (out, d) = run_and_decide(
        &lab,
        "b",
        443,
        &curl(&ca, &["--resolve", &resolve, "https://api.example.test/"]),
    );
    assert_denied(&out, &d, &["no_dns_record"]);
    assert_eq!(d.pod_name(), Some("batch-1"), "{d}");
}
