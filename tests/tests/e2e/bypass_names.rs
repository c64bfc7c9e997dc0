//! Bypass suite, names: the destination IP must carry a live name that *this pod* resolved,
//! through the shim, for *that* address family and address. Connecting to an allowed name's IP
//! without resolving it, with another pod's record, across families, with a disallowed name on
//! the same IP, or after the record expired is denied; and a source address that is not the
//! pod's must not escape policy.

use std::time::{Duration, Instant};

use egressgate_lab::{addr, Decision, GatewayOptions, Lab, Output};

use crate::bypass_support::{assert_blocked, assert_nginx_never_saw};
use crate::support::{
    assert_allowed, dig, run_and_decide, short_ttl_lab, GRACE_SECONDS, SHOP_POLICY, WAIT,
};

fn shop_lab(options: GatewayOptions) -> Lab {
    Lab::builder()
        .pods(2)
        .dns()
        .web()
        .gateway(options.policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts")
}

/// curl from pod `letter` to `url` with `name:port` pinned to `ip` (no DNS lookup by curl);
/// `-6` for an IPv6 `ip`.
fn pinned(
    lab: &Lab,
    letter: &str,
    name: &str,
    port: u16,
    ip: &str,
    url: &str,
) -> (Output, Decision) {
    let ca = lab.ca();
    let (family, shown) = if ip.contains(':') {
        ("-6", format!("[{ip}]"))
    } else {
        ("-4", ip.to_owned())
    };
    let resolve = format!("{name}:{port}:{shown}");
    let args = [
        "curl",
        "-sS",
        family,
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        url,
    ];
    run_and_decide(lab, letter, port, &args)
}

#[test]
fn an_allowed_names_ip_without_resolving_it_is_denied() {
    let lab = shop_lab(GatewayOptions::default());
    // Pod a may use api on 443 and 80, knows its addresses, and never asks the DNS.
    for (port, ip, url) in [
        (443, addr::WEB, "https://api.example.test/unresolved-tls"),
        (80, addr::WEB, "http://api.example.test/unresolved-http"),
        (443, addr::WEB6, "https://api.example.test/unresolved-tls6"),
    ] {
        let (out, d) = pinned(&lab, "a", addr::API, port, ip, url);
        assert_blocked(&lab, &out, &d, "no_dns_record", None);
        assert!(d.names().is_empty(), "{d}");
        assert_eq!(d.destination_ip(), Some(ip), "{d}");
    }
    assert_nginx_never_saw(&lab, "/unresolved-http");
    // The first message was still read, for the log.
    assert!(lab
        .gateway()
        .decisions()
        .iter()
        .any(|d| d.sni() == Some(addr::API) && d.reason() == Some("no_dns_record")));
}

#[test]
fn an_ip_only_another_pod_resolved_is_denied() {
    let lab = shop_lab(GatewayOptions::default());
    assert!(dig(&lab, "b", addr::API, &[]).contains(&addr::WEB.to_owned()));
    let (out, d) = pinned(
        &lab,
        "a",
        addr::API,
        443,
        addr::WEB,
        "https://api.example.test/",
    );
    assert_blocked(&lab, &out, &d, "no_dns_record", None);
    assert_eq!(d.pod_name(), Some("app-1"), "{d}");
    // Same client once pod a resolved the name itself: allowed.
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));
    let (out, d) = pinned(
        &lab,
        "a",
        addr::API,
        443,
        addr::WEB,
        "https://api.example.test/",
    );
    assert_allowed(&out, &d, "hello from api.example.test");
}

#[test]
fn a_record_of_one_family_does_not_open_the_other() {
    let lab = shop_lab(GatewayOptions::default());
    // Pod a resolves only AAAA, pod b only A; both may use api over TLS.
    assert!(dig(&lab, "a", addr::API, &["AAAA"]).contains(&addr::WEB6.to_owned()));
    assert!(dig(&lab, "b", addr::API, &["A"]).contains(&addr::WEB.to_owned()));
    let url = "https://api.example.test/";
    let (out, d) = pinned(&lab, "a", addr::API, 443, addr::WEB, url);
    assert_blocked(&lab, &out, &d, "no_dns_record", None);
    let (out, d) = pinned(&lab, "b", addr::API, 443, addr::WEB6, url);
    assert_blocked(&lab, &out, &d, "no_dns_record", None);
    // Each family it did resolve works.
    let (out, d) = pinned(&lab, "a", addr::API, 443, addr::WEB6, url);
    assert_allowed(&out, &d, "hello from api.example.test");
    let (out, d) = pinned(&lab, "b", addr::API, 443, addr::WEB, url);
    assert_allowed(&out, &d, "hello from api.example.test");
}

#[test]
fn a_disallowed_name_on_the_shared_ip_grants_nothing_to_an_allowed_sni() {
    let lab = shop_lab(GatewayOptions::default());
    // Pod a resolves evil (same IP as api) and then claims api: it never resolved api.
    assert!(dig(&lab, "a", addr::EVIL, &[]).contains(&addr::WEB.to_owned()));
    let (out, d) = pinned(
        &lab,
        "a",
        addr::API,
        443,
        addr::WEB,
        "https://api.example.test/",
    );
    assert_blocked(&lab, &out, &d, "not_allowed", None);
    assert_eq!(d.names(), [addr::EVIL], "{d}");
    assert_eq!(d.sni(), Some(addr::API), "{d}");
}

#[test]
fn a_record_used_after_ttl_and_grace_is_denied_and_denied_attempts_do_not_extend_it() {
    let lab = short_ttl_lab();
    // The record is made between these two instants.
    let asked = Instant::now();
    assert_eq!(dig(&lab, "a", addr::SHORT, &[]), [addr::WEB]);
    let answered = Instant::now();
    let life = Duration::from_secs(addr::SHORT_TTL_SECONDS + GRACE_SECONDS);

    // While the record lives, keep using it for denied connections (another SNI): a deny must
    // not count as a use that keeps the record alive.
    let mut denied = 0;
    while Instant::now() + Duration::from_millis(800) < asked + life && denied < 10 {
        let (out, d) = pinned(
            &lab,
            "a",
            addr::EVIL,
            443,
            addr::WEB,
            "https://evil.example.test/",
        );
        assert_blocked(&lab, &out, &d, "sni_mismatch", None);
        denied += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        denied > 0,
        "the lab was too slow to try within the record's life"
    );

    // One second past TTL + grace: the allowed name is refused like any unresolved IP.
    let after = answered + life + Duration::from_secs(1);
    std::thread::sleep(after.saturating_duration_since(Instant::now()));
    let (out, d) = pinned(
        &lab,
        "a",
        addr::SHORT,
        443,
        addr::WEB,
        "https://short.example.test/",
    );
    assert_blocked(&lab, &out, &d, "no_dns_record", None);
    assert_eq!(d.sni(), Some(addr::SHORT), "{d}");
}

/// A second address on pod a's own link (its IPv6 /64 is on-link on the node's veth), used as
/// the source of a connection to a name no policy gives pod a.
const UNASSIGNED: &str = "fd00:1::3";

fn from_unassigned_source(lab: &Lab) -> (Output, Decision) {
    let pod = lab.pod("a");
    let added = pod.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:1::3/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    assert!(added.success(), "{added}");
    let ca = lab.ca();
    let resolve = format!("{}:443:[{}]", addr::EVIL, addr::WEB6);
    let cursor = lab.gateway().cursor();
    let out = pod.run(&[
        "curl",
        "-sS",
        "-6",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "--interface",
        UNASSIGNED,
        "--resolve",
        &resolve,
        "https://evil.example.test/unassigned",
    ]);
    let source = format!("[{UNASSIGNED}]:");
    let d = lab
        .gateway()
        .wait_for_decision_since(
            cursor,
            |d| d.source().is_some_and(|s| s.starts_with(&source)),
            WAIT,
        )
        .unwrap_or_else(|e| panic!("no decision:\n{out}\n{e}"));
    (out, d)
}

/// A pod that can use a second address on its link (IPv6 on-link prefixes, bridge CNIs,
/// CAP_NET_RAW with a user-space stack) must not leave its policies behind: a source address in
/// no pod's identity is an unknown source, denied by default (`unknownSources`).
#[test]
fn a_source_address_that_is_not_the_pods_does_not_escape_policy() {
    let lab = shop_lab(GatewayOptions::default());
    let (out, d) = from_unassigned_source(&lab);
    assert_blocked(&lab, &out, &d, "unknown_source", None);
    assert_eq!(d.pod_name(), None, "{d}");
}

/// `unknownSources: allow` is an explicit choice, logged as such.
#[test]
fn with_unknown_sources_allowed_an_unassigned_source_is_let_through_and_logged() {
    let lab = shop_lab(GatewayOptions {
        extra_yaml: "unknownSources: allow\n".to_owned(),
        ..GatewayOptions::default()
    });
    let (out, d) = from_unassigned_source(&lab);
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("allow"), Some("unknown_source")),
        "{d}\n{out}"
    );
    assert_eq!(d.pod_name(), None, "{d}");
}
