//! Bypass suite, DNS: the name table must learn only genuine answers of the trusted upstream to
//! queries the shim made. A pod tries other resolvers (port 53 over UDP and TCP and both
//! families, another port, DNS over TLS and over HTTPS), forged answers toward the shim's
//! upstream socket and toward the shim itself, and an answer that arrives after the query timed
//! out.

use std::time::Duration;

use egressgate_lab::daemon::{wait_until, Daemon};
use egressgate_lab::{addr, Decision, GatewayOptions, Lab, Output};

use crate::bypass_support::{assert_blocked, metric};
use crate::support::{dig, run_and_decide, SHOP_POLICY, WAIT};

/// A small UDP DNS server for the upstream namespace: argv = bind address, port, log file,
/// records as JSON `{"name": [ipv4, delay_seconds, ttl]}`. It logs every query as
/// `query <name> <qtype> <peer ip> <peer port> <id>` before answering (after the delay).
/// Unknown names get NXDOMAIN.
const DNS_SERVER: &str = r#"
import json, socket, struct, sys, threading
bind, port, log_path, records = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
log = open(log_path, 'a')
def parse(q):
    ident, = struct.unpack('!H', q[:2])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode('ascii', 'replace'))
        i += 1 + q[i]
    qtype, = struct.unpack('!H', q[i + 1:i + 3])
    return ident, '.'.join(labels).lower(), qtype, q[12:i + 5]
def reply(q):
    ident, name, qtype, question = parse(q)
    rec = records.get(name)
    if rec and qtype == 1:
        ip, delay, ttl = rec
        answer = b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, ttl, 4) + socket.inet_aton(ip)
        return delay, struct.pack('!HHHHHH', ident, 0x8580, 1, 1, 0, 0) + question + answer
    rcode = 0 if rec else 3
    return 0.0, struct.pack('!HHHHHH', ident, 0x8580 | rcode, 1, 0, 0, 0) + question
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((bind, port))
while True:
    q, peer = s.recvfrom(4096)
    try:
        ident, name, qtype, _ = parse(q)
        delay, r = reply(q)
    except Exception:
        continue
    log.write(f'query {name} {qtype} {peer[0]} {peer[1]} {ident}\n')
    log.flush()
    threading.Timer(delay, s.sendto, (r, peer)).start()
"#;

/// Starts [`DNS_SERVER`] in the upstream namespace and waits until its socket is bound.
pub(crate) fn dns_server(
    lab: &Lab,
    name: &str,
    bind: &str,
    port: u16,
    records: &str,
) -> (Daemon, String) {
    let log = lab.dir().join(format!("{name}.queries"));
    let log = log.display().to_string();
    let port_text = port.to_string();
    let daemon = Daemon::spawn(
        lab.up().name(),
        name,
        &["python3", "-c", DNS_SERVER, bind, &port_text, &log, records],
        lab.dir(),
        "TERM",
    )
    .expect("dns server starts");
    let want = format!("{bind}:{port} ");
    wait_until(name, Duration::from_secs(10), || {
        let out = lab.up().run(&["ss", "-Hlun"]);
        Ok(out.stdout.contains(&want))
    })
    .expect("dns server listens");
    (daemon, log)
}

/// curl from pod a to `https://<name>/` with the name pinned to `ip`.
fn pinned_tls(lab: &Lab, name: &str, ip: &str) -> (Output, Decision) {
    let ca = lab.ca();
    let resolve = format!("{name}:443:{ip}");
    let url = format!("https://{name}/");
    run_and_decide(
        lab,
        "a",
        443,
        &[
            "curl",
            "-sS",
            "-4",
            "--max-time",
            "10",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            &url,
        ],
    )
}

/// Queries the rogue resolver logged from the node or a pod (not from the up namespace's own
/// sanity checks).
fn rogue_queries_from_the_cluster(lab: &Lab) -> Vec<String> {
    lab.rogue_dns_queries()
        .into_iter()
        .filter(|q| q.contains(" from 198.18.") || q.ends_with(&format!(" from {}", addr::NODE_UP)))
        .collect()
}

#[test]
fn dns_to_any_server_on_port_53_is_answered_by_the_trusted_upstream_only() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts");
    // The rogue resolver over both transports, and "servers" that exist nowhere, over IPv6.
    for extra in [
        vec!["@198.19.0.66"],
        vec!["@198.19.0.66", "+tcp"],
        vec!["@fd00:99::66"],
        vec!["@fd00:99::66", "+tcp"],
        vec!["@198.19.0.77", "+tcp"],
    ] {
        let answer = dig(&lab, "a", addr::API, &extra);
        assert_eq!(
            answer.last().map(String::as_str),
            Some(addr::WEB),
            "{extra:?}: {answer:?}"
        );
        assert!(
            !answer.iter().any(|a| a == addr::ROGUE_ANSWER),
            "{answer:?}"
        );
    }
    assert!(
        lab.rogue_dns_queries().is_empty(),
        "the rogue resolver saw queries: {:?}",
        lab.rogue_dns_queries()
    );
    // Every one of them was recorded as an answer of the trusted upstream.
    let answered = lab
        .gateway()
        .wait_for_events("dns", |e| e["name"] == addr::API, 5, WAIT)
        .expect("a dns line per query");
    assert_eq!(answered.len(), 5, "{answered:?}");
    for event in answered {
        assert_eq!(event["upstream"], "198.19.0.53:53", "{event}");
    }
}

#[test]
fn with_foreign_servers_refused_other_resolvers_get_refused() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .gateway(GatewayOptions {
            foreign_servers: "refuse".to_owned(),
            ..GatewayOptions::default().policy("shop.yaml", SHOP_POLICY)
        })
        .start()
        .expect("lab starts");
    for extra in [["+tcp"], ["+notcp"]] {
        let out = lab.pod("a").run(&[
            "dig",
            "+time=3",
            "+tries=1",
            "@198.19.0.66",
            extra[0],
            addr::API,
        ]);
        assert!(out.stdout.contains("status: REFUSED"), "{out}");
        assert!(!out.stdout.contains(addr::ROGUE_ANSWER), "{out}");
    }
    assert!(lab.rogue_dns_queries().is_empty());
    // The trusted server itself still answers.
    assert_eq!(
        dig(&lab, "a", addr::API, &[]).last().map(String::as_str),
        Some(addr::WEB)
    );
}

/// A TLS server in the upstream namespace on each `ip:port` of argv[4..]: it logs every TCP
/// connection it accepts, and on port 853 answers one DNS-over-TLS query through the rogue
/// dnsmasq (so the DoT server really works, see the sanity check).
const TLS_RESOLVER: &str = r#"
import socket, ssl, struct, sys, threading
cert, key, log_path = sys.argv[1], sys.argv[2], sys.argv[3]
binds = [(a, int(p)) for a, p in (x.rsplit(':', 1) for x in sys.argv[4:])]
log = open(log_path, 'a')
lock = threading.Lock()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
def note(text):
    with lock:
        log.write(text + '\n')
        log.flush()
def read_exact(tls, n):
    data = b''
    while len(data) < n:
        chunk = tls.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
def serve(conn, peer, local):
    note(f'accept {local[0]}:{local[1]} from {peer[0]}')
    try:
        conn.settimeout(5)
        tls = ctx.wrap_socket(conn, server_side=True)
        if local[1] == 853:
            n, = struct.unpack('!H', read_exact(tls, 2))
            query = read_exact(tls, n)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(3)
            u.sendto(query, ('198.19.0.66', 53))
            answer = u.recv(4096)
            tls.sendall(struct.pack('!H', len(answer)) + answer)
        tls.close()
    except Exception as e:
        note(f'error {type(e).__name__}')
def listen(addr):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(16)
    while True:
        c, p = s.accept()
        threading.Thread(target=serve, args=(c, p, addr), daemon=True).start()
for b in binds:
    threading.Thread(target=listen, args=(b,), daemon=True).start()
threading.Event().wait()
"#;

#[test]
fn dns_over_tls_and_https_to_a_resolver_ip_are_denied() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts");
    let certs = lab.dir().join("certs");
    let cert = certs.join("cert.pem").display().to_string();
    let key = certs.join("key.pem").display().to_string();
    let log = lab.dir().join("tls-resolver.log");
    let log_text = log.display().to_string();
    let _resolver = Daemon::spawn(
        lab.up().name(),
        "tls-resolver",
        &[
            "python3",
            "-c",
            TLS_RESOLVER,
            &cert,
            &key,
            &log_text,
            "198.19.0.66:853",
            "198.19.0.66:443",
            "198.19.0.53:853",
            "198.19.0.53:443",
        ],
        lab.dir(),
        "TERM",
    )
    .expect("tls resolver starts");
    wait_until("tls resolver", Duration::from_secs(10), || {
        let out = lab.up().run(&["ss", "-Hltn"]);
        Ok(out.stdout.contains("198.19.0.66:853") && out.stdout.contains("198.19.0.53:443"))
    })
    .expect("tls resolver listens");
    // Sanity: from the upstream host itself, the DoT resolver answers (with the rogue answer).
    let sane = lab.up().run(&[
        "dig",
        "+tls",
        "+short",
        "+time=3",
        "+tries=1",
        "@198.19.0.66",
        addr::API,
    ]);
    assert_eq!(sane.stdout.trim(), addr::ROGUE_ANSWER, "{sane}");

    // The pod resolved api, so the gateway has names for the web IP, none for resolver IPs.
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));
    let attempts: [(&[&str], u16, &str); 5] = [
        (
            &[
                "dig",
                "+tls",
                "+time=3",
                "+tries=1",
                "@198.19.0.66",
                addr::API,
            ],
            853,
            "198.19.0.66",
        ),
        (
            &[
                "dig",
                "+tls",
                "+time=3",
                "+tries=1",
                "@198.19.0.53",
                addr::API,
            ],
            853,
            "198.19.0.53",
        ),
        (
            &[
                "dig",
                "+https",
                "+time=3",
                "+tries=1",
                "@198.19.0.66",
                addr::API,
            ],
            443,
            "198.19.0.66",
        ),
        (
            &[
                "dig",
                "+https",
                "+time=3",
                "+tries=1",
                "@198.19.0.53",
                addr::API,
            ],
            443,
            "198.19.0.53",
        ),
        (
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--doh-insecure",
                "--doh-url",
                "https://198.19.0.66/dns-query",
                "https://api.example.test/",
            ],
            443,
            "198.19.0.66",
        ),
    ];
    for (args, port, resolver) in attempts {
        let (out, d) = run_and_decide(&lab, "a", port, args);
        assert_eq!(d.destination_ip(), Some(resolver), "{d}\n{out}");
        assert_blocked(&lab, &out, &d, "no_dns_record", None);
        assert!(!out.stdout.contains(addr::ROGUE_ANSWER), "{out}");
    }
    let seen = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !seen.contains("from 198.18.") && !seen.contains(&format!("from {}", addr::NODE_UP)),
        "a pod's DoT/DoH connection reached the resolver:\n{seen}"
    );
    assert!(rogue_queries_from_the_cluster(&lab).is_empty());
}

/// Lets pod a (role=app) reach a resolver on UDP 5353 by address.
const RESOLVER_5353_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: resolver-5353, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{cidr: 198.19.0.66/32}]
      ports: [{port: 5353, protocol: udp}]
"#;

#[test]
fn answers_from_a_resolver_the_shim_never_sees_grant_nothing() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(
            GatewayOptions::default()
                .policy("shop.yaml", SHOP_POLICY)
                .policy("resolver.yaml", RESOLVER_5353_POLICY),
        )
        .start()
        .expect("lab starts");
    // A resolver on a port other than 53, which a `udp` rule lets the pod reach: the pod gets the
    // right address for api, from outside the shim.
    let records = format!(r#"{{"{}": ["{}", 0, 60]}}"#, addr::API, addr::WEB);
    let (_server, _) = dns_server(&lab, "dns-5353", addr::ROGUE_DNS, 5353, &records);
    let answer = dig(&lab, "a", addr::API, &["@198.19.0.66", "-p", "5353"]);
    assert_eq!(answer, [addr::WEB], "{answer:?}");
    // That answer is no record: the connection is refused like one to an unresolved IP.
    let (out, d) = pinned_tls(&lab, addr::API, addr::WEB);
    assert_blocked(&lab, &out, &d, "no_dns_record", None);
    assert_eq!(d.sni(), Some(addr::API), "{d}");
    // DNS over TCP to that port is a TCP connection like any other: denied.
    let (out, d) = run_and_decide(
        &lab,
        "a",
        5353,
        &[
            "dig",
            "+tcp",
            "+time=3",
            "+tries=1",
            "@198.19.0.66",
            "-p",
            "5353",
            addr::API,
        ],
    );
    assert_blocked(&lab, &out, &d, "no_dns_record", None);
}

const SLOW_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: names, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}, {dnsName: slow.example.test}, {dnsName: late.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

/// A lab whose trusted upstream (198.19.0.53:53) is [`DNS_SERVER`]: `slow.example.test`
/// answers after 1.5 s, `late.example.test` after 3.5 s (past the shim's 2 s timeout). Returns
/// the lab, the server and its query log.
fn slow_upstream_lab() -> (Lab, Daemon, String) {
    let lab = Lab::builder()
        .pods(1)
        .web()
        .gateway(GatewayOptions::default().policy("names.yaml", SLOW_POLICY))
        .start()
        .expect("lab starts");
    let records = format!(
        r#"{{"api.example.test": ["{web}", 0, 60], "slow.example.test": ["{web}", 1.5, 60], "late.example.test": ["{web}", 3.5, 60]}}"#,
        web = addr::WEB
    );
    let (server, log) = dns_server(&lab, "dns-upstream", addr::TRUSTED_DNS, 53, &records);
    (lab, server, log)
}

/// Python in pod a: asks the shim (via 198.19.0.53:53) for slow.example.test, reads the
/// upstream's query log for the port and ID the shim used (an oracle no real attacker has: it
/// makes each check below deterministic), sends forged answers naming 198.19.0.99 with a raw
/// socket, then prints the answer the stub got. argv[2] selects the forgeries: `near-misses`
/// (wrong ID, wrong question, wrong source address, wrong source port) or `perfect`.
const FORGER: &str = r#"
import socket, struct, sys, time
log_path, mode = sys.argv[1], sys.argv[2]
NODE, UPSTREAM, ROGUE, FORGED = '198.19.0.1', '198.19.0.53', '198.19.0.66', '198.19.0.99'
def qname(name):
    return b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'
def message(ident, flags, name, answer_ip=None):
    question = qname(name) + struct.pack('!HH', 1, 1)
    if answer_ip is None:
        return struct.pack('!HHHHHH', ident, flags, 1, 0, 0, 0) + question
    answer = b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, 300, 4) + socket.inet_aton(answer_ip)
    return struct.pack('!HHHHHH', ident, flags, 1, 1, 0, 0) + question + answer
def checksum(data):
    if len(data) % 2:
        data += b'\0'
    s = sum(struct.unpack('!%dH' % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff
def udp_packet(src, sport, dst, dport, payload):
    length = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 17, length)
    csum = checksum(pseudo + struct.pack('!HHHH', sport, dport, length, 0) + payload) or 0xffff
    udp = struct.pack('!HHHH', sport, dport, length, csum) + payload
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + length, 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + udp
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def forge(src, sport, dport, payload):
    raw.sendto(udp_packet(src, sport, NODE, dport, payload), (NODE, 0))
stub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
stub.settimeout(5)
stub.sendto(message(0x1234, 0x0100, 'slow.example.test'), (UPSTREAM, 53))
port = ident = None
for _ in range(200):
    for line in open(log_path):
        parts = line.split()
        if parts[1] == 'slow.example.test':
            port, ident = int(parts[4]), int(parts[5])
    if port:
        break
    time.sleep(0.01)
print('shim upstream socket', port, flush=True)
if mode == 'near-misses':
    for k in range(1, 101):
        forge(UPSTREAM, 53, port, message((ident + k) % 65536, 0x8580, 'slow.example.test', FORGED))
    forge(UPSTREAM, 53, port, message(ident, 0x8580, 'api.example.test', FORGED))
    forge(ROGUE, 53, port, message(ident, 0x8580, 'slow.example.test', FORGED))
    forge(UPSTREAM, 5353, port, message(ident, 0x8580, 'slow.example.test', FORGED))
    # And a forged response sent to the shim itself, as if it were a query.
    stub2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stub2.sendto(message(0x4321, 0x8580, 'api.example.test', FORGED), (UPSTREAM, 53))
else:
    forge(UPSTREAM, 53, port, message(ident, 0x8580, 'slow.example.test', FORGED))
print('forged', flush=True)
reply = stub.recv(4096)
print('answer', socket.inet_ntoa(reply[-4:]))
"#;

fn forge(lab: &Lab, log: &str, mode: &str) -> Output {
    let out = lab.pod("a").run(&["python3", "-c", FORGER, log, mode]);
    assert!(out.stdout.contains("forged"), "{out}");
    out
}

/// The `dns` line for `name`.
fn dns_line(lab: &Lab, name: &str) -> serde_json::Value {
    let mut lines = lab
        .gateway()
        .wait_for_events("dns", |e| e["name"] == name, 1, WAIT)
        .unwrap_or_else(|e| panic!("no dns line for {name}: {e}"));
    lines.swap_remove(0)
}

#[test]
fn forged_answers_toward_the_shim_are_rejected_and_not_learned() {
    let (lab, _upstream, log) = slow_upstream_lab();
    let mismatches = "egressgate_dns_upstream_errors_total{reason=\"mismatch\"}";
    let dropped = "egressgate_dns_queries_total{result=\"dropped\",transport=\"udp\"}";
    assert_eq!(metric(&lab, mismatches), 0.0);
    let out = forge(&lab, &log, "near-misses");
    assert!(
        out.stdout.contains(&format!("answer {}", addr::WEB)),
        "{out}"
    );
    // Every forgery carries a source address that is not routed back through the pod's
    // interface: the reverse-path check drops them before they reach the shim's sockets.
    assert_eq!(metric(&lab, mismatches), 0.0, "{out}");
    // The response sent to the shim as a query was dropped, not answered or recorded.
    assert_eq!(metric(&lab, dropped), 1.0);
    let line = dns_line(&lab, "slow.example.test");
    assert_eq!(line["addresses"], serde_json::json!([addr::WEB]), "{line}");
    assert!(
        lab.gateway()
            .dns_events()
            .iter()
            .all(|e| e["name"] != addr::API),
        "the forged response was answered"
    );

    // Nothing the forger named is a record: the forged address is refused for both names.
    for name in ["slow.example.test", addr::API] {
        let (out, d) = pinned_tls(&lab, name, addr::ROGUE_ANSWER);
        assert_blocked(&lab, &out, &d, "no_dns_record", None);
    }
    // The genuine answer is.
    let (out, d) = pinned_tls(&lab, "slow.example.test", addr::WEB);
    assert_eq!(d.reason(), Some("allowed"), "{d}\n{out}");
}

/// A pod sends the node a packet with the trusted upstream's address as source, matching the
/// shim's source port and query ID (32 bits, which the pod may try as often as it can make the
/// shim ask). The strict reverse-path check in the nftables table drops it: that source is not
/// routed through the pod's interface.
#[test]
fn a_forged_answer_matching_port_and_id_is_not_learned() {
    let (lab, _upstream, log) = slow_upstream_lab();
    let out = forge(&lab, &log, "perfect");
    let (tls_out, d) = pinned_tls(&lab, "slow.example.test", addr::ROGUE_ANSWER);
    assert_blocked(&lab, &tls_out, &d, "no_dns_record", None);
    assert!(
        out.stdout.contains(&format!("answer {}", addr::WEB)),
        "{out}"
    );
}

#[test]
fn an_answer_after_the_query_timed_out_is_not_learned() {
    let (lab, _upstream, log) = slow_upstream_lab();
    let out = lab
        .pod("a")
        .run(&["dig", "+time=8", "+tries=1", "late.example.test"]);
    // The shim gave up after dns.upstreamTimeoutMs (2 s) and said so.
    assert!(out.stdout.contains("status: SERVFAIL"), "{out}");
    let line = dns_line(&lab, "late.example.test");
    assert_eq!(line["rcode"], "SERVFAIL", "{line}");
    // The upstream did answer, 3.5 s after the query; wait until it has.
    std::thread::sleep(Duration::from_millis(2000));
    let queries = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(queries.contains("query late.example.test 1"), "{queries}");
    let timeouts = "egressgate_dns_upstream_errors_total{reason=\"timeout\"}";
    assert_eq!(metric(&lab, timeouts), 1.0);
    let (out, d) = pinned_tls(&lab, "late.example.test", addr::WEB);
    assert_blocked(&lab, &out, &d, "no_dns_record", None);
}
