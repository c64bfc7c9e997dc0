//! Bypass suite, UDP. A pod under an enforce policy sends UDP (other than DNS, which the shim
//! answers) only where a `protocol: udp` rule allows it: by a name it resolved through the shim,
//! or by a cidr. A WireGuard-like sender, dig to another port and QUIC are refused otherwise, one
//! decision line per flow however many datagrams; allowed flows get their answers on both
//! families, and after the first datagram the kernel carries them. Pods no enforce policy
//! selects keep their UDP (QUIC on 443 refused so clients fall back to TCP).

use std::time::{Duration, Instant};

use egressgate_lab::daemon::{wait_until, Daemon};
use egressgate_lab::{addr, Decision, GatewayOptions, Lab};

use crate::bypass_dns::dns_server;
use crate::bypass_support::metric;
use crate::support::{dig, SHOP_POLICY, WAIT};

/// A UDP server in the upstream namespace on every `ip port` pair of argv[2..]: it logs each
/// datagram as `<local port> from <peer ip>` to argv[1] and echoes it back.
const UDP_ECHO: &str = r#"
import select, socket, sys
log = open(sys.argv[1], 'a')
socks = []
for spec in sys.argv[2:]:
    ip, port = spec.rsplit(' ', 1)
    family = socket.AF_INET6 if ':' in ip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((ip, int(port)))
    socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(4096)
        log.write(f'{s.getsockname()[1]} from {peer[0]}\n')
        log.flush()
        s.sendto(data, peer)
"#;

/// Python in a pod: `count` datagrams shaped like WireGuard handshake initiations (type 1,
/// three zero bytes, a sequence number, keys and MACs: 148 bytes) to argv[1] port argv[2], 5 ms
/// apart, then the echoes until a second passes without one. Prints `answers <n>` (distinct
/// sequence numbers echoed) or the error that stopped it.
const WIREGUARD_LIKE: &str = r#"
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.connect((host, port))
for i in range(count):
    try:
        s.send(bytes([1, 0, 0, 0]) + i.to_bytes(4, 'big') + bytes(range(140)))
    except ConnectionRefusedError:
        pass
    time.sleep(0.005)
s.settimeout(1.0)
seen = set()
try:
    while True:
        seen.add(int.from_bytes(s.recv(2048)[4:8], 'big'))
except Exception as e:
    error = type(e).__name__
print('answers', len(seen), error)
"#;

/// Python in a pod: one datagram shaped like a QUIC v1 Initial (long header, version 1) to
/// argv[1] port argv[2]; prints `answer <len>` or the error.
const QUIC_PROBE: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((host, port))
initial = bytes([0xc3, 0, 0, 0, 1, 8]) + bytes(8) + bytes([0]) + bytes(1185)
try:
    s.send(initial)
    print('answer', len(s.recv(2048)))
except Exception as e:
    print('error', type(e).__name__)
"#;

/// Pod a (role=app) may send UDP to api.example.test:51820 and :443 by name, and to
/// 198.19.0.10 and fd00:99::10 port 8443 by cidr.
const UDP_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: tunnel, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 51820, protocol: udp}, {port: 443, protocol: udp}]
    - to: [{cidr: 198.19.0.10/32}, {cidr: "fd00:99::10/128"}]
      ports: [{port: 8443, protocol: udp}]
"#;

/// The batch pod (b) only under an audit-mode policy.
const AUDIT_BATCH_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: batch-audit, namespace: shop}
spec:
  podSelector: {matchLabels: {role: batch}}
  mode: audit
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

/// The echo server on [`addr::WEB`] and [`addr::WEB6`], ports 443, 853, 8443 and 51820.
fn udp_echo(lab: &Lab) -> (Daemon, std::path::PathBuf) {
    let log = lab.dir().join("udp-echo.log");
    let log_text = log.display().to_string();
    let specs: Vec<String> = [443, 853, 8443, 51820]
        .iter()
        .flat_map(|port| {
            [
                format!("{} {port}", addr::WEB),
                format!("{} {port}", addr::WEB6),
            ]
        })
        .collect();
    let mut args = vec!["python3", "-c", UDP_ECHO, &log_text];
    args.extend(specs.iter().map(String::as_str));
    let echo = Daemon::spawn(lab.up().name(), "udp-echo", &args, lab.dir(), "TERM")
        .expect("udp echo starts");
    wait_until("udp echo", Duration::from_secs(10), || {
        let out = lab.up().run(&["ss", "-Hlun"]);
        Ok(out.stdout.contains(&format!("[{}]:51820", addr::WEB6)))
    })
    .expect("udp echo listens");
    (echo, log)
}

fn lab(pods: usize, options: GatewayOptions) -> Lab {
    Lab::builder()
        .pods(pods)
        .dns()
        .gateway(options)
        .start()
        .expect("lab starts")
}

/// `count` WireGuard-like datagrams from pod `letter`; how many were echoed.
fn wireguard_like(lab: &Lab, letter: &str, ip: &str, port: u16, count: usize) -> usize {
    let (port, count) = (port.to_string(), count.to_string());
    let out = lab
        .pod(letter)
        .run(&["python3", "-c", WIREGUARD_LIKE, ip, &port, &count]);
    assert!(out.success(), "{out}");
    let answers = out
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok());
    answers.unwrap_or_else(|| panic!("no count in {out}"))
}

fn quic_probe(lab: &Lab, letter: &str, ip: &str, port: u16) -> String {
    let port = port.to_string();
    let out = lab
        .pod(letter)
        .run(&["python3", "-c", QUIC_PROBE, ip, &port]);
    assert!(out.success(), "{out}");
    out.stdout
}

/// The UDP decisions for `ip:port` (`[ip]:port` for IPv6) so far.
fn udp_decisions(lab: &Lab, ip: &str, port: u16) -> Vec<Decision> {
    let destination = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    lab.gateway()
        .decisions()
        .into_iter()
        .filter(|d| d.protocol() == Some("udp") && d.destination() == Some(destination.as_str()))
        .collect()
}

fn wait_udp_decision(lab: &Lab, ip: &str, port: u16) -> Decision {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(d) = udp_decisions(lab, ip, port).into_iter().next() {
            return d;
        }
        assert!(Instant::now() < deadline, "no UDP decision for {ip}:{port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn names(d: &Decision) -> Vec<String> {
    d.0["names"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn echo_log(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The kernel's allowed flows (`nft list set`), both families.
fn kernel_flows(lab: &Lab) -> String {
    ["udp_flows_v4", "udp_flows_v6"]
        .iter()
        .map(|set| {
            let out = lab
                .node()
                .run(&["nft", "list", "set", "inet", "egressgate", set]);
            assert!(out.success(), "{out}");
            out.stdout
        })
        .collect()
}

/// Waits until the gateway has put pod `letter`'s IPv4 address in `udp_unpoliced_v4` (or, with
/// `false`, until the set is known and without it).
fn wait_unpoliced(lab: &Lab, letter: &str, expected: bool) {
    let ip = lab.pod(letter).ipv4.clone();
    wait_until("udp_unpoliced_v4", WAIT, || {
        let out = lab.node().run(&[
            "nft",
            "list",
            "set",
            "inet",
            "egressgate",
            "udp_unpoliced_v4",
        ]);
        Ok(out.success() && out.stdout.contains(&ip) == expected)
    })
    .expect("udp_unpoliced_v4 follows the policies");
}

/// UDP tunnels, DNS to another port and QUIC from a pod under an enforce policy without a
/// `udp` rule: dropped, never at the server, one decision line per flow for a flood.
#[test]
fn udp_without_a_udp_rule_is_denied_once_per_flow_and_never_reaches_the_server() {
    let lab = lab(
        1,
        GatewayOptions::default().policy("shop.yaml", SHOP_POLICY),
    );
    let (_echo, log) = udp_echo(&lab);
    wait_unpoliced(&lab, "a", false);
    // The pod resolved api (→ web): a name, but no rule allows UDP to it.
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));

    let before = metric(
        &lab,
        "egressgate_udp_datagrams_dropped_total{reason=\"denied\"}",
    );
    assert_eq!(wireguard_like(&lab, "a", addr::WEB, 51820, 30), 0);
    let d = wait_udp_decision(&lab, addr::WEB, 51820);
    assert_eq!(d.verdict(), Some("deny"), "{d}");
    assert_eq!(d.reason(), Some("not_allowed"), "{d}");
    assert_eq!(names(&d), [addr::API], "{d}");
    assert_eq!(d.0["pod"]["name"], "app-1", "{d}");
    // A flood is one flow: one line, and every other datagram counted as dropped.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(udp_decisions(&lab, addr::WEB, 51820).len(), 1);
    let dropped = metric(
        &lab,
        "egressgate_udp_datagrams_dropped_total{reason=\"denied\"}",
    ) - before;
    assert!(dropped >= 29.0, "dropped {dropped}");
    assert!(metric(&lab, "egressgate_udp_flows_total{verdict=\"deny\"}") >= 1.0);
    assert!(
        metric(
            &lab,
            "egressgate_connections_total{namespace=\"shop\",protocol=\"udp\",reason=\"not_allowed\",verdict=\"deny\"}"
        ) >= 1.0
    );

    // IPv6, an address the pod never resolved, DNS over QUIC, QUIC on 443.
    assert_eq!(wireguard_like(&lab, "a", addr::WEB6, 51820, 3), 0);
    let d = wait_udp_decision(&lab, addr::WEB6, 51820);
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("no_dns_record")),
        "{d}"
    );
    assert_eq!(wireguard_like(&lab, "a", addr::WEB, 853, 3), 0);
    for ip in [addr::WEB, addr::WEB6] {
        let answer = quic_probe(&lab, "a", ip, 443);
        assert!(
            answer.contains("error"),
            "QUIC to {ip}:443 got through: {answer}"
        );
        let d = wait_udp_decision(&lab, ip, 443);
        assert_eq!(d.verdict(), Some("deny"), "{d}");
    }

    // dig over UDP to a resolver on another port: no answer, and the resolver saw nothing.
    let records = format!(r#"{{"{}": ["{}", 0, 60]}}"#, addr::API, addr::WEB);
    let (_server, queries) = dns_server(&lab, "dns-5353", addr::ROGUE_DNS, 5353, &records);
    let out = lab.pod("a").run(&[
        "dig",
        "+time=2",
        "+tries=1",
        "@198.19.0.66",
        "-p",
        "5353",
        addr::API,
    ]);
    assert!(!out.success(), "dig to port 5353 got an answer:\n{out}");
    assert!(out.stdout.contains("timed out"), "{out}");
    let d = wait_udp_decision(&lab, addr::ROGUE_DNS, 5353);
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("no_dns_record")),
        "{d}"
    );
    assert!(echo_log(std::path::Path::new(&queries)).is_empty());

    let seen = echo_log(&log);
    assert!(
        seen.is_empty(),
        "a denied datagram reached the server:\n{seen}"
    );
}

/// A `udp` rule allows a flow by a name the pod resolved through the shim, or by a cidr, on
/// both families; answers come back, the decision line names the rule, and after the first
/// datagram the kernel carries the flow (the relay sends only the first few).
#[test]
fn a_udp_rule_allows_flows_by_resolved_name_and_by_cidr_both_ways_on_both_families() {
    let options = GatewayOptions {
        extra_yaml: "udp:\n  deniedFlowSeconds: 1\n".to_owned(),
        ..GatewayOptions::default()
    };
    let lab = lab(
        1,
        options
            .policy("shop.yaml", SHOP_POLICY)
            .policy("tunnel.yaml", UDP_POLICY),
    );
    let (_echo, log) = udp_echo(&lab);
    wait_unpoliced(&lab, "a", false);

    // Not resolved yet: the name rule cannot apply.
    assert_eq!(wireguard_like(&lab, "a", addr::WEB, 51820, 2), 0);
    let d = wait_udp_decision(&lab, addr::WEB, 51820);
    assert_eq!(d.reason(), Some("no_dns_record"), "{d}");
    std::thread::sleep(Duration::from_millis(1100));

    assert!(dig(&lab, "a", addr::API, &["A"]).contains(&addr::WEB.to_owned()));
    assert!(dig(&lab, "a", addr::API, &["AAAA"]).contains(&addr::WEB6.to_owned()));
    let relayed_before = metric(&lab, "egressgate_udp_datagrams_relayed_total");
    for ip in [addr::WEB, addr::WEB6] {
        let cursor = udp_decisions(&lab, ip, 51820).len();
        assert_eq!(wireguard_like(&lab, "a", ip, 51820, 40), 40, "to {ip}");
        let d = udp_decisions(&lab, ip, 51820)
            .into_iter()
            .nth(cursor)
            .unwrap_or_else(|| panic!("no new decision for {ip}"));
        assert_eq!(
            (d.verdict(), d.reason(), d.policy()),
            (Some("allow"), Some("allowed"), Some("shop/tunnel")),
            "{d}"
        );
        assert_eq!(d.0["rule"], 0, "{d}");
        assert_eq!(names(&d), [addr::API], "{d}");
        assert_eq!(udp_decisions(&lab, ip, 51820).len(), cursor + 1);
    }
    // 80 datagrams answered; the relay sent only the first of each flow (and any that raced
    // the kernel's set), the kernel the rest.
    let relayed = metric(&lab, "egressgate_udp_datagrams_relayed_total") - relayed_before;
    assert!((2.0..=8.0).contains(&relayed), "relayed {relayed}");
    let flows = kernel_flows(&lab);
    let pod = lab.pod("a");
    assert!(
        flows.contains(&format!("{} . {} . 51820", pod.ipv4, addr::WEB)),
        "{flows}"
    );
    assert!(
        flows.contains(&format!("{} . {} . 51820", pod.ipv6, addr::WEB6)),
        "{flows}"
    );
    assert!(metric(&lab, "egressgate_udp_flows_total{verdict=\"allow\"}") >= 2.0);

    // By cidr, with no name at all; both families.
    for ip in [addr::WEB, addr::WEB6] {
        assert_eq!(wireguard_like(&lab, "a", ip, 8443, 5), 5, "to {ip}:8443");
        let d = wait_udp_decision(&lab, ip, 8443);
        assert_eq!(
            (d.verdict(), d.policy()),
            (Some("allow"), Some("shop/tunnel")),
            "{d}"
        );
        assert_eq!(d.0["rule"], 1, "{d}");
    }
    // QUIC to 443, allowed by the udp rule for the resolved name.
    let answer = quic_probe(&lab, "a", addr::WEB, 443);
    assert!(answer.contains("answer 1200"), "{answer}");
    // A port the rule does not list stays closed.
    assert_eq!(wireguard_like(&lab, "a", addr::WEB, 853, 2), 0);

    let seen = echo_log(&log);
    let pod_v4 = format!("from {}", pod.ipv4);
    assert!(seen.contains(&format!("51820 {pod_v4}")), "{seen}");
    assert!(seen.contains(&format!("8443 from {}", pod.ipv6)), "{seen}");
    assert!(!seen.contains("853 from"), "{seen}");
}

/// Pods no enforce policy selects (unselected, or under audit-mode policies only) keep the UDP
/// they had before: any port passes without a decision, QUIC on 443 is refused so clients fall
/// back to TCP.
#[test]
fn audit_and_unselected_pods_keep_their_udp_and_quic_stays_refused() {
    let lab = lab(
        3,
        GatewayOptions::default()
            .policy(
                "shop.yaml",
                SHOP_POLICY.split("---").next().unwrap_or_default(),
            )
            .policy("batch.yaml", AUDIT_BATCH_POLICY),
    );
    let (_echo, log) = udp_echo(&lab);
    for letter in ["b", "c"] {
        wait_unpoliced(&lab, letter, true);
    }
    wait_unpoliced(&lab, "a", false);
    for letter in ["b", "c"] {
        assert_eq!(wireguard_like(&lab, letter, addr::WEB, 51820, 5), 5);
        // The wait above saw the IPv4 set; the pod's first IPv6 exchange may still race the
        // IPv6 set and neighbour discovery on a loaded machine, so it gets the same wait.
        wait_until("IPv6 UDP from an unpoliced pod", WAIT, || {
            Ok(wireguard_like(&lab, letter, addr::WEB6, 853, 2) == 2)
        })
        .expect("IPv6 UDP of an unpoliced pod passes");
        for ip in [addr::WEB, addr::WEB6] {
            let answer = quic_probe(&lab, letter, ip, 443);
            assert!(
                answer.contains("error ConnectionRefusedError"),
                "QUIC from pod {letter} to {ip}:443 was not refused: {answer}"
            );
        }
    }
    // The kernel passed it all: the relay decided nothing.
    assert!(
        lab.gateway()
            .decisions()
            .iter()
            .all(|d| d.protocol() != Some("udp")),
        "{:?}",
        lab.gateway().decisions()
    );
    assert!(!echo_log(&log).lines().any(|l| l.starts_with("443 ")));
    // Pod a is enforced: same datagrams, refused.
    assert_eq!(wireguard_like(&lab, "a", addr::WEB, 51820, 2), 0);
}

/// A flow allowed by a `udp` rule does not outlive the rule: once the policy file loses it, the
/// kernel's flows are flushed and the next datagram is decided again, and denied.
#[test]
fn removing_the_udp_rule_ends_an_allowed_flow_at_its_next_datagram() {
    let lab = lab(
        1,
        GatewayOptions::default()
            .policy("shop.yaml", SHOP_POLICY)
            .policy("tunnel.yaml", UDP_POLICY),
    );
    let (_echo, _log) = udp_echo(&lab);
    wait_unpoliced(&lab, "a", false);
    assert_eq!(wireguard_like(&lab, "a", addr::WEB, 8443, 5), 5);
    let flow = format!("{} . {} . 8443", lab.pod("a").ipv4, addr::WEB);
    assert!(kernel_flows(&lab).contains(&flow));

    std::fs::remove_file(lab.policy_dir().join("tunnel.yaml")).expect("remove the udp rule");
    wait_until("udp_flows flushed", WAIT, || {
        Ok(!kernel_flows(&lab).contains(&flow))
    })
    .expect("the allowed flow is forgotten");
    assert_eq!(wireguard_like(&lab, "a", addr::WEB, 8443, 5), 0);
    let decisions = udp_decisions(&lab, addr::WEB, 8443);
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert_eq!(decisions[1].verdict(), Some("deny"), "{}", decisions[1]);
    assert_eq!(
        decisions[1].reason(),
        Some("no_dns_record"),
        "{}",
        decisions[1]
    );
}
