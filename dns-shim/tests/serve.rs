//! The shim serving real sockets on loopback (needs CAP_NET_ADMIN for IP_TRANSPARENT; skipped
//! without it), against a fake trusted upstream on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressgate_dns_shim::{
    read_head, DestIp, DnsShim, ForeignServerPolicy, NameTable, PodIp, Rcode, ShimConfig,
    TableLimits,
};
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;

const DIG_A: &[u8] = include_bytes!("../src/testdata/dig-9.18-udp-query-api.example.test-A.bin");
const DNSMASQ_A: &[u8] =
    include_bytes!("../src/testdata/dnsmasq-2.90-udp-response-api.example.test-A-cname-chain.bin");
const DIG_AAAA: &[u8] =
    include_bytes!("../src/testdata/dig-9.18-udp-query-api.example.test-AAAA.bin");
const DNSMASQ_AAAA: &[u8] = include_bytes!(
    "../src/testdata/dnsmasq-2.90-udp-response-api.example.test-AAAA-cname-chain.bin"
);

fn with_id(message: &[u8], id: u16) -> Vec<u8> {
    let mut out = message.to_vec();
    out[..2].copy_from_slice(&id.to_be_bytes());
    out
}

fn id_of(message: &[u8]) -> u16 {
    u16::from_be_bytes([message[0], message[1]])
}

/// The canned answer for a query (matched on its question bytes), with the query's ID.
fn canned(query: &[u8]) -> Vec<u8> {
    let response = if query[2..] == DIG_AAAA[2..] {
        DNSMASQ_AAAA
    } else {
        DNSMASQ_A
    };
    with_id(response, id_of(query))
}

/// A UDP socket and a TCP listener on the same loopback port. The kernel picks the UDP port
/// alone, and a test running beside may hold the TCP one (a connection's local port): then try
/// another.
async fn udp_and_tcp_on_one_port() -> (UdpSocket, TcpListener, SocketAddr) {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = udp.local_addr().expect("addr");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp, addr);
        }
    }
    panic!("no loopback port free for both UDP and TCP in 100 tries");
}

/// A fake trusted upstream answering the fixture queries over UDP and TCP on one port.
async fn fake_upstream() -> SocketAddr {
    let (udp, tcp, addr) = udp_and_tcp_on_one_port().await;
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&canned(&buf[..n]), from).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut query = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let reply = canned(&query);
                    let len = u16::try_from(reply.len()).expect("small");
                    let _ = stream.write_all(&len.to_be_bytes()).await;
                    let _ = stream.write_all(&reply).await;
                }
            });
        }
    });
    addr
}

struct Running {
    table: Arc<NameTable>,
    registry: Registry,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Starts a shim on `bind`. Transparent sockets need CAP_NET_ADMIN: without it the test fails
/// (a skipped test would pass without testing anything).
/// A shim on `bind` that forwards to `upstream` whatever server the pod asked.
async fn start_forwarding(bind: &str, upstream: SocketAddr) -> Running {
    let bind = bind.parse().expect("addr");
    start(bind, vec![upstream], ForeignServerPolicy::Forward).await
}

async fn start(
    bind: SocketAddr,
    upstreams: Vec<SocketAddr>,
    policy: ForeignServerPolicy,
) -> Running {
    let listeners = DnsShim::bind(bind)
        .unwrap_or_else(|e| panic!("bind {bind} (transparent sockets need CAP_NET_ADMIN): {e}"));
    let table = Arc::new(NameTable::new(TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: 100,
        max_names: 1000,
    }));
    let registry = Registry::new();
    let config = ShimConfig {
        upstreams,
        foreign_servers: policy,
        upstream_timeout: Duration::from_secs(2),
        tcp_idle_timeout: Duration::from_secs(2),
    };
    let shim = Arc::new(DnsShim::new(config, table.clone(), &registry).expect("metrics"));
    let addr = listeners.udp_local_addr();
    assert_eq!(listeners.tcp_local_addr().expect("tcp addr"), addr);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(shim.serve(listeners, async {
        let _ = stopped.await;
    }));
    Running {
        table,
        registry,
        addr,
        _stop: stop,
    }
}

fn counter(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn gauge(registry: &Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_gauge().get_value())
        .sum()
}

async fn udp_exchange(from: &str, to: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let client = UdpSocket::bind(from).await.expect("bind client");
    client.send_to(query, to).await.expect("send");
    let mut buf = [0u8; 1500];
    let (n, src) = tokio::time::timeout(Duration::from_millis(3000), client.recv_from(&mut buf))
        .await
        .ok()?
        .expect("recv");
    assert_eq!(src, to, "the reply comes from the address the client asked");
    Some(buf[..n].to_vec())
}

#[tokio::test]
async fn udp_query_is_answered_by_the_trusted_upstream_and_recorded() {
    let upstream = fake_upstream().await;
    let shim = start_forwarding("127.0.0.1:0", upstream).await;
    let reply = udp_exchange("127.0.0.1:0", shim.addr, DIG_A)
        .await
        .expect("answer");
    // The pod's own ID is restored; everything else is the upstream's answer.
    assert_eq!(reply, DNSMASQ_A);
    let pod = PodIp(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let found = shim.table.lookup(
        pod,
        DestIp(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10))),
        Instant::now(),
    );
    assert_eq!(found.len(), 1);
    assert_eq!(&*found[0].name, "api.example.test");
    assert_eq!(found[0].cnames.len(), 2);
    assert_eq!(
        counter(
            &shim.registry,
            "egressgate_dns_queries_total",
            &[("transport", "udp"), ("result", "answered")]
        ),
        1
    );
    assert_eq!(gauge(&shim.registry, "egressgate_dns_recorded_names"), 2.0);
}

#[tokio::test]
async fn tcp_connection_carries_several_queries() {
    let upstream = fake_upstream().await;
    let shim = start_forwarding("127.0.0.1:0", upstream).await;
    let mut stream = TcpStream::connect(shim.addr).await.expect("connect");
    for (query, expected) in [(DIG_A, DNSMASQ_A), (DIG_AAAA, DNSMASQ_AAAA)] {
        let len = u16::try_from(query.len()).expect("small");
        stream.write_all(&len.to_be_bytes()).await.expect("write");
        stream.write_all(query).await.expect("write");
        let len = stream.read_u16().await.expect("len");
        let mut reply = vec![0u8; usize::from(len)];
        stream.read_exact(&mut reply).await.expect("reply");
        assert_eq!(reply, expected);
    }
    let pod = PodIp(IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(
        shim.table
            .lookup(pod, DestIp("::1".parse().expect("ip")), Instant::now())
            .len(),
        1
    );
    assert_eq!(
        counter(
            &shim.registry,
            "egressgate_dns_queries_total",
            &[("transport", "tcp"), ("result", "answered")]
        ),
        2
    );
}

#[tokio::test]
async fn ipv6_listener_answers_from_the_server_address() {
    let upstream = fake_upstream().await;
    let shim = start_forwarding("[::1]:0", upstream).await;
    let reply = udp_exchange("[::1]:0", shim.addr, DIG_AAAA)
        .await
        .expect("answer");
    assert_eq!(reply, DNSMASQ_AAAA);
    let ip: IpAddr = "::1".parse().expect("ip");
    // The pod asked for its own address.
    assert_eq!(
        shim.table
            .lookup(PodIp(ip), DestIp(ip), Instant::now())
            .len(),
        1
    );
}

#[tokio::test]
async fn refuse_policy_answers_refused_for_a_foreign_server() {
    let upstream = fake_upstream().await;
    let shim = start(
        "127.0.0.1:0".parse().expect("addr"),
        vec![upstream],
        ForeignServerPolicy::Refuse,
    )
    .await;
    // Trust is by address: 127.0.0.1 (any port) is the upstream's address, so this is answered.
    let reply = udp_exchange("127.0.0.1:0", shim.addr, DIG_A)
        .await
        .expect("answer");
    assert_eq!(read_head(&reply).expect("head").rcode, Rcode::NOERROR);

    // On ::1 the pod addressed a server that is not a trusted upstream.
    let upstream_v6 = fake_upstream().await;
    let shim6 = start(
        "[::1]:0".parse().expect("addr"),
        vec![upstream_v6],
        ForeignServerPolicy::Refuse,
    )
    .await;
    let reply = udp_exchange("[::1]:0", shim6.addr, DIG_A)
        .await
        .expect("answer");
    let head = read_head(&reply).expect("head");
    assert_eq!(head.rcode, Rcode::REFUSED);
    assert_eq!(head.id, id_of(DIG_A));
    assert!(shim6.table.is_empty());
    assert_eq!(
        counter(
            &shim6.registry,
            "egressgate_dns_queries_total",
            &[("result", "refused")]
        ),
        1
    );
}

#[tokio::test]
async fn dead_upstream_gives_servfail_and_garbage_gives_nothing() {
    let dead = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let shim = start(
        "127.0.0.1:0".parse().expect("addr"),
        vec![dead_addr],
        ForeignServerPolicy::Forward,
    )
    .await;
    let reply = udp_exchange("127.0.0.1:0", shim.addr, DIG_A)
        .await
        .expect("servfail");
    let head = read_head(&reply).expect("head");
    assert_eq!(head.rcode, Rcode::SERVFAIL);
    assert_eq!(head.id, id_of(DIG_A));
    assert_eq!(head.question, read_head(DIG_A).expect("q").question);

    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client
        .send_to(&[0x12, 0x34, 0x01], shim.addr)
        .await
        .expect("send");
    let mut buf = [0u8; 512];
    let nothing =
        tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
    assert!(nothing.is_err(), "no reply to a 3-byte query");
    assert_eq!(
        counter(
            &shim.registry,
            "egressgate_dns_queries_total",
            &[("result", "dropped")]
        ),
        1
    );
}

/// A shim on loopback with one upstream, its address, the sender that stops it, and its task.
fn start_stoppable(
    upstream: SocketAddr,
    upstream_timeout: Duration,
    tcp_idle_timeout: Duration,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listeners = DnsShim::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listeners.udp_local_addr();
    let table = Arc::new(NameTable::new(TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: 100,
        max_names: 1000,
    }));
    let config = ShimConfig {
        upstreams: vec![upstream],
        foreign_servers: ForeignServerPolicy::Forward,
        upstream_timeout,
        tcp_idle_timeout,
    };
    let shim = Arc::new(DnsShim::new(config, table, &Registry::new()).expect("metrics"));
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(shim.serve(listeners, async {
        let _ = stopped.await;
    }));
    (addr, stop, serving)
}

/// Stopping (a hand-over, an exit) must not wait on a client that sent half a query: its
/// connection is closed at once, while a query already read is still answered.
#[tokio::test]
async fn stopping_does_not_wait_for_half_sent_tcp_queries() {
    let upstream = fake_upstream().await;
    // Idle far longer than the test may take: only stopping can end the slow connection.
    let (addr, stop, serving) =
        start_stoppable(upstream, Duration::from_secs(2), Duration::from_secs(60));

    // A well-behaved client: one full query, answered.
    let mut good = TcpStream::connect(addr).await.expect("connect");
    let len = u16::try_from(DIG_A.len()).expect("small");
    good.write_all(&len.to_be_bytes()).await.expect("write");
    good.write_all(DIG_A).await.expect("write");
    let reply_len = good.read_u16().await.expect("reply length");
    let mut reply = vec![0u8; usize::from(reply_len)];
    good.read_exact(&mut reply).await.expect("reply");
    assert_eq!(id_of(&reply), id_of(DIG_A));
    // A slow one: the length of a query and half of it, then nothing.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(&len.to_be_bytes()).await.expect("write");
    slow.write_all(&DIG_A[..DIG_A.len() / 2])
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    drop(stop);
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve returns without waiting for the slow client")
        .expect("serve task");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the slow client's connection is closed: {closed:?}"
    );
}

/// A query stuck on an upstream that never answers does not hold up a stop past the drain limit
/// (a hand-over serves nothing meanwhile); it goes unanswered and the stub asks again.
#[tokio::test]
async fn stopping_waits_at_most_a_second_for_queries_stuck_upstream() {
    let silent = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("silent upstream");
    let (addr, stop, serving) = start_stoppable(
        silent.local_addr().expect("addr"),
        Duration::from_secs(30),
        Duration::from_secs(10),
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
    client.send_to(DIG_A, addr).await.expect("send");
    let mut buf = [0u8; 512];
    // The query reached the upstream: it is in flight.
    tokio::time::timeout(Duration::from_secs(5), silent.recv_from(&mut buf))
        .await
        .expect("forwarded")
        .expect("recv");

    let started = Instant::now();
    drop(stop);
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve returns")
        .expect("serve task");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "stopped after {took:?}"
    );
}

/// A stub with many queries outstanding on one socket (as dnsperf keeps 256) gets every answer:
/// the bursts the listener's one task reads and the answers it gathers are not lost.
#[tokio::test]
async fn a_burst_of_outstanding_queries_from_one_socket_is_all_answered() {
    const QUERIES: u16 = 4096;
    const OUTSTANDING: u16 = 256;
    let upstream = fake_upstream().await;
    let shim = start_forwarding("127.0.0.1:0", upstream).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    let mut answered = std::collections::BTreeSet::new();
    let mut sent = 0u16;
    let mut buf = [0u8; 1500];
    while answered.len() < usize::from(QUERIES) {
        while sent < QUERIES && usize::from(sent) - answered.len() < usize::from(OUTSTANDING) {
            client
                .send_to(&with_id(DIG_A, sent), shim.addr)
                .await
                .expect("send");
            sent += 1;
        }
        let received = tokio::time::timeout(Duration::from_secs(3), client.recv(&mut buf)).await;
        let Ok(Ok(n)) = received else {
            let missing: Vec<u16> = (0..sent).filter(|id| !answered.contains(id)).collect();
            panic!(
                "{} of {sent} sent unanswered, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(40)]
            );
        };
        answered.insert(id_of(&buf[..n]));
    }
}
