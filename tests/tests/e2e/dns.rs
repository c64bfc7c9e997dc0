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

/// The cluster's DNS servers are pods too: their own queries to the outside must not be
/// intercepted (the shim would ask them again). `intercept.excludePods` keeps their addresses
/// out of interception, from the identity source.
#[test]
fn excluded_pods_reach_their_dns_server_directly_others_do_not() {
    let identity = "namespaces:\n  - name: shop\n  - name: kube-system\npods:\n  \
         - {name: app-1, namespace: shop, ips: [198.18.1.2, \"fd00:1::2\"], labels: {role: app}}\n  \
         - {name: coredns-1, namespace: kube-system, ips: [198.18.2.2, \"fd00:2::2\"], labels: {k8s-app: kube-dns}}\n";
    let lab = Lab::builder()
        .pods(2)
        .dns()
        .gateway(GatewayOptions {
            identity_override: Some(identity.to_owned()),
            intercept_extra:
                "  excludePods: [{namespace: kube-system, matchLabels: {k8s-app: kube-dns}}]\n"
                    .to_owned(),
            ..GatewayOptions::default()
        })
        .start()
        .expect("lab starts");
    let rogue = format!("@{}", addr::ROGUE_DNS);
    // Pod a is intercepted: the trusted upstream answers, the rogue server sees nothing.
    let answer = dig(&lab, "a", addr::API, &[&rogue]);
    assert!(answer.contains(&addr::WEB.to_owned()), "{answer:?}");
    assert!(lab.rogue_dns_queries().is_empty());
    // Pod b is a DNS server: its query reaches the server it asked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = dig(&lab, "b", addr::API, &[&rogue]);
        if answer.contains(&addr::ROGUE_ANSWER.to_owned()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pod b still intercepted: {answer:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!lab.rogue_dns_queries().is_empty());
}
