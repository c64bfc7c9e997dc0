//! The DNS shim: queries to any server are answered by the trusted upstream and recorded.

use egressgate_lab::{addr, GatewayOptions, Lab};

use crate::support::{assert_allowed, curl, dig, run_and_decide, SHOP_POLICY};

#[test]
fn queries_to_a_rogue_server_are_answered_by_the_trusted_upstream() {
    let lab = Lab::builder()
        .pods(2)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts");
    let ca = lab.ca();

    let udp = dig(&lab, "a", addr::API, &["@198.19.0.66"]);
    assert_eq!(udp.last().map(String::as_str), Some(addr::WEB), "{udp:?}");
    assert!(!udp.iter().any(|a| a == addr::ROGUE_ANSWER), "{udp:?}");
    let tcp = dig(&lab, "a", addr::API, &["@198.19.0.66", "+tcp"]);
    assert_eq!(tcp.last().map(String::as_str), Some(addr::WEB), "{tcp:?}");
    assert!(
        lab.rogue_dns_queries().is_empty(),
        "the rogue server saw queries: {:?}",
        lab.rogue_dns_queries()
    );

    // The answer to the rogue-addressed query is what authorises the connection: curl does not
    // resolve again.
    let resolve = format!("{}:443:{}", addr::API, addr::WEB);
    let (out, d) = run_and_decide(
        &lab,
        "a",
        443,
        &curl(&ca, &["--resolve", &resolve, "https://api.example.test/"]),
    );
    assert_allowed(&out, &d, "hello from api.example.test");
    assert!(lab.rogue_dns_queries().is_empty());
}

#[test]
fn glibc_search_list_resolution_is_recorded_under_the_real_name() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .k8s_resolv_conf()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts");
    let ca = lab.ca();
    // ndots:5 walks the search list (NXDOMAIN each) before the absolute name.
    let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"]));
    assert_allowed(&out, &d, "hello from api.example.test");
}
