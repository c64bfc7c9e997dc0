use std::sync::Arc;

use prometheus::Registry;
use tokio::net::{TcpListener, UdpSocket};

use super::*;
use crate::answer::{read_answer, Reading};
use crate::query::read_head;
use crate::table::{NameTable, TableLimits};

const DIG_A: &[u8] = include_bytes!("../testdata/dig-9.18-udp-query-api.example.test-A.bin");
const DNSMASQ_A: &[u8] =
    include_bytes!("../testdata/dnsmasq-2.90-udp-response-api.example.test-A-cname-chain.bin");
const DNSMASQ_AAAA: &[u8] =
    include_bytes!("../testdata/dnsmasq-2.90-udp-response-api.example.test-AAAA-cname-chain.bin");

fn metrics() -> (Metrics, Registry) {
    let registry = Registry::new();
    let table = Arc::new(NameTable::new(TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: 10,
        max_names: 10,
    }));
    let metrics = Metrics::register(&registry, &table).expect("register");
    (metrics, registry)
}

fn mismatches(registry: &Registry) -> u64 {
    upstream_errors(registry, "mismatch")
}

fn upstream_errors(registry: &Registry, kind: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "egressgate_dns_upstream_errors_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == kind))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn set_tc(message: &mut [u8]) {
    message[2] |= 0x02;
}

/// Takes `queries` through one [`UdpExchanges`] to their ends, in the order they finished.
async fn exchange_all(
    forwarder: &Forwarder,
    queries: &[&[u8]],
) -> Vec<(usize, Result<Exchange, ForwardError>)> {
    let mut exchanges = UdpExchanges::new(forwarder.clone());
    let mut done = Vec::new();
    for (i, query) in queries.iter().enumerate() {
        let head = read_head(query).expect("head");
        exchanges.start(i, query.to_vec(), head, &mut done);
    }
    let mut finished = Vec::new();
    while finished.len() < queries.len() {
        if done.is_empty() {
            exchanges.ready().await;
            exchanges.collect(&mut done);
        }
        finished.extend(done.drain(..).map(|d| (d.context, d.result)));
    }
    assert_eq!(exchanges.in_flight(), 0);
    finished
}

async fn exchange_udp(forwarder: &Forwarder, query: &[u8]) -> Result<Exchange, ForwardError> {
    let mut finished = exchange_all(forwarder, &[query]).await;
    finished.pop().expect("one query").1
}

#[tokio::test]
async fn forged_answers_are_dropped_and_the_genuine_one_accepted() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let (n, client) = upstream.recv_from(&mut buf).await.expect("query");
        let query = buf[..n].to_vec();
        // Byte-exact apart from the ID.
        assert_eq!(&query[2..], &DIG_A[2..]);
        let id = u16::from_be_bytes([query[0], query[1]]);
        let send = |m: Vec<u8>| {
            let upstream = &upstream;
            async move { upstream.send_to(&m, client).await.expect("send") }
        };
        send(with_id(DNSMASQ_A, id.wrapping_add(1))).await; // wrong ID
        send(with_id(DNSMASQ_AAAA, id)).await; // wrong question
        send(query.clone()).await; // not a response
        send(vec![0xde, 0xad]).await; // garbage
        send(with_id(DNSMASQ_A, id)).await; // the answer
        id
    });
    let (metrics, registry) = metrics();
    let forwarder = Forwarder::new(vec![addr], Duration::from_secs(5), metrics);
    let exchange = exchange_udp(&forwarder, DIG_A).await.expect("answered");
    let id = fake.await.expect("fake upstream");
    assert_eq!(exchange.response, with_id(DNSMASQ_A, id));
    assert_eq!(exchange.upstream, addr);
    assert_eq!(mismatches(&registry), 4);
    let question = read_head(DIG_A)
        .and_then(|head| head.question)
        .expect("question");
    assert!(matches!(
        read_answer(&question, &exchange.response),
        Reading::Record(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn silent_upstream_times_out() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    let (metrics, _registry) = metrics();
    let forwarder = Forwarder::new(vec![addr], Duration::from_secs(2), metrics);
    let result = exchange_udp(&forwarder, DIG_A).await;
    assert_eq!(result.err(), Some(ForwardError::AllUpstreamsFailed));
    drop(upstream);
}

#[tokio::test]
async fn next_upstream_is_tried_at_once_when_the_first_is_unreachable() {
    // A port nobody listens on: ICMP port unreachable fails the first attempt at once, long
    // before its timeout.
    let dead = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let (n, client) = upstream.recv_from(&mut buf).await.expect("query");
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        assert_eq!(n, DIG_A.len());
        upstream
            .send_to(&with_id(DNSMASQ_A, id), client)
            .await
            .expect("send");
    });
    let (metrics, registry) = metrics();
    let forwarder = Forwarder::new(vec![dead_addr, addr], Duration::from_secs(60), metrics);
    let exchange = tokio::time::timeout(Duration::from_secs(20), exchange_udp(&forwarder, DIG_A))
        .await
        .expect("the unreachable upstream fails before its timeout")
        .expect("second upstream answers");
    assert_eq!(exchange.upstream, addr);
    assert_eq!(upstream_errors(&registry, "io"), 1);
    assert_eq!(upstream_errors(&registry, "timeout"), 0);
}

/// A fake upstream that answers every query it receives with [`DNSMASQ_A`] under the query's ID.
async fn answering_upstream() -> SocketAddr {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let (_, client) = upstream.recv_from(&mut buf).await.expect("query");
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            upstream
                .send_to(&with_id(DNSMASQ_A, id), client)
                .await
                .expect("send");
        }
    });
    addr
}

#[tokio::test]
async fn a_query_the_kernel_refuses_moves_on_alone_and_its_batch_is_answered() {
    let (first, second) = (answering_upstream().await, answering_upstream().await);
    // Past the largest IPv4 UDP payload (65,507 bytes): every upstream's send refuses it
    // (EMSGSIZE), in the middle of the batch the others leave in.
    let mut too_big = DIG_A.to_vec();
    too_big.resize(65_520, 0);
    let (metrics, registry) = metrics();
    let forwarder = Forwarder::new(vec![first, second], Duration::from_secs(5), metrics);
    let queries = [DIG_A, DIG_A, &too_big[..], DIG_A, DIG_A];
    let mut finished = exchange_all(&forwarder, &queries).await;
    finished.sort_by_key(|(i, _)| *i);
    for (i, result) in finished {
        if i == 2 {
            assert_eq!(result.err(), Some(ForwardError::AllUpstreamsFailed));
        } else {
            let exchange = result.expect("answered");
            assert_eq!(
                exchange.upstream, first,
                "query {i} stays on the first upstream"
            );
        }
    }
    assert_eq!(
        upstream_errors(&registry, "io"),
        2,
        "refused once per upstream"
    );
}

#[tokio::test]
async fn truncated_udp_answer_is_retried_over_tcp() {
    // The kernel picks the UDP port alone; a test beside may hold its TCP twin: try another.
    let mut bound = None;
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = udp.local_addr().expect("addr");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            bound = Some((udp, tcp, addr));
            break;
        }
    }
    let (udp, tcp, addr) = bound.expect("a loopback port free for both UDP and TCP");
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let (_, client) = udp.recv_from(&mut buf).await.expect("query");
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let mut tc = with_id(DNSMASQ_A, id);
        set_tc(&mut tc);
        udp.send_to(&tc, client).await.expect("send");
    });
    tokio::spawn(async move {
        let (mut stream, _) = tcp.accept().await.expect("accept");
        let len = stream.read_u16().await.expect("len");
        let mut query = vec![0u8; usize::from(len)];
        stream.read_exact(&mut query).await.expect("query");
        assert_eq!(&query[2..], &DIG_A[2..]);
        let id = u16::from_be_bytes([query[0], query[1]]);
        // A forged message on the stream first, then the answer.
        for m in [with_id(DNSMASQ_A, id ^ 0xffff), with_id(DNSMASQ_A, id)] {
            let len = u16::try_from(m.len()).expect("small");
            stream.write_all(&len.to_be_bytes()).await.expect("write");
            stream.write_all(&m).await.expect("write");
        }
    });
    let (metrics, registry) = metrics();
    let forwarder = Forwarder::new(vec![addr], Duration::from_secs(5), metrics);
    let exchange = exchange_udp(&forwarder, DIG_A).await.expect("answered");
    assert!(!exchange.head.truncated, "the full TCP answer is returned");
    assert_eq!(&exchange.response[2..], &DNSMASQ_A[2..]);
    assert_eq!(mismatches(&registry), 1);
}

#[tokio::test]
async fn concurrent_queries_share_a_few_sockets_and_each_gets_its_own_answer() {
    const QUERIES: usize = 16;
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let mut received = Vec::new();
        let mut buf = [0u8; 512];
        while received.len() < QUERIES {
            let (n, client) = upstream.recv_from(&mut buf).await.expect("query");
            received.push((u16::from_be_bytes([buf[0], buf[1]]), client, n));
        }
        // Answered in reverse order: each must still reach the query that asked.
        for &(id, client, _) in received.iter().rev() {
            upstream
                .send_to(&with_id(DNSMASQ_A, id), client)
                .await
                .expect("send");
        }
        received
    });
    let (metrics, registry) = metrics();
    let forwarder = Forwarder::new(vec![addr], Duration::from_secs(5), metrics);
    let exchanges = exchange_all(&forwarder, &[DIG_A; QUERIES]).await;
    let received = fake.await.expect("fake upstream");
    let ports: std::collections::BTreeSet<u16> = received
        .iter()
        .map(|(_, client, _)| client.port())
        .collect();
    assert!(ports.len() <= 4, "one socket per query: {ports:?}");
    let ids: std::collections::BTreeSet<u16> = received.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids.len(), QUERIES, "IDs reused while in flight");
    for (_, exchange) in exchanges {
        let exchange = exchange.expect("answered");
        let id = u16::from_be_bytes([exchange.response[0], exchange.response[1]]);
        assert!(ids.contains(&id));
    }
    assert_eq!(mismatches(&registry), 0);
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_times_out_and_the_next_one_answers() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    let answering = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let (_, client) = upstream.recv_from(&mut buf).await.expect("query");
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        upstream
            .send_to(&with_id(DNSMASQ_A, id), client)
            .await
            .expect("send");
        Instant::now()
    });
    let (metrics, _registry) = metrics();
    let timeout = Duration::from_secs(2);
    let forwarder = Forwarder::new(vec![silent_addr, addr], timeout, metrics);
    let started = Instant::now();
    let exchange = exchange_udp(&forwarder, DIG_A)
        .await
        .expect("second upstream answers");
    assert_eq!(exchange.upstream, addr);
    let asked = answering.await.expect("second upstream");
    assert!(
        asked.duration_since(started) >= timeout,
        "the second upstream is asked only once the first timed out"
    );
    drop(silent);
}

#[tokio::test]
async fn a_tcp_query_goes_to_the_upstreams_over_tcp() {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut stream, _) = tcp.accept().await.expect("accept");
        let len = stream.read_u16().await.expect("len");
        let mut query = vec![0u8; usize::from(len)];
        stream.read_exact(&mut query).await.expect("query");
        let id = u16::from_be_bytes([query[0], query[1]]);
        let answer = with_id(DNSMASQ_A, id);
        let len = u16::try_from(answer.len()).expect("small");
        stream.write_all(&len.to_be_bytes()).await.expect("write");
        stream.write_all(&answer).await.expect("write");
    });
    let (metrics, _registry) = metrics();
    let forwarder = Forwarder::new(vec![addr], Duration::from_secs(5), metrics);
    let head = read_head(DIG_A).expect("head");
    let exchange = forwarder
        .exchange_tcp(DIG_A, &head)
        .await
        .expect("answered");
    assert_eq!(&exchange.response[2..], &DNSMASQ_A[2..]);
}
