//! The stages on in-memory streams (`tokio::io::duplex`) and tokio's paused clock: the peek
//! deadline and byte cap, a client that leaves, the PostgreSQL negotiation against a scripted
//! server, the peek limit and the unknown-source wait on a real `Proxy`. Client bytes are the
//! real captures of `peek/testdata/`.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egressgate_dns_shim::TableLimits;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::context::ResolvedNames;
use super::postgres::{self, NegotiationFault};
use super::stop::Detail;
use super::*;
use crate::config::Config;
use crate::decision::{PodFault, PolicyDenial, UpstreamFault};
use crate::identity::{Identities, Pod};
use crate::limits::Bounds;
use crate::peek::{self, Peeked, PgEncryption, PgFirst};

macro_rules! capture {
    ($path:literal) => {
        include_bytes!(concat!("../peek/testdata/", $path)).as_slice()
    };
}

const TLS_HELLO: &[u8] =
    capture!("tls/curl-7.88.1-default-sni-api.example.test-alpn-h2-http1.1.bin");
/// 1,924 bytes: over a small `peek.maxBytes`.
const TLS_LARGE_HELLO: &[u8] =
    capture!("tls/chromium-156-pq-x25519mlkem768-ech-grease-sni-api.example.test-1924B.bin");
const HTTP_HEAD: &[u8] = capture!("http/wget-1.21.3-origin-form.bin");
const HTTP2_PREFACE: &[u8] =
    capture!("http/curl-7.88.1-http2-prior-knowledge-preface-not-http1.bin");
const PG_STARTUP: &[u8] = capture!("postgres/psql-15-sslmode-disable-startup-v3.0.bin");
/// An 8-byte SSLRequest, then (after the server's `N`) the StartupMessage.
const PG_SSL_THEN_STARTUP: &[u8] =
    capture!("postgres/psql-15-default-sslmode-prefer-sslrequest-then-startup.bin");
/// An 8-byte GSSENCRequest, then (after `N`) the StartupMessage.
const PG_GSSENC_THEN_STARTUP: &[u8] = capture!(
    "postgres/psql-15-gssencmode-prefer-sslmode-disable-with-krb5-ticket-gssencrequest-startup.bin"
);
const PG_SSL_REQUEST: &[u8] = capture!("postgres/psql-15-sslmode-require-1-sslrequest.bin");
const PG_HELLO_AFTER_S: &[u8] =
    capture!("postgres/psql-15-sslmode-require-2-clienthello-after-S-sni-db.example.test.bin");

const PEEK_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BYTES: usize = 16 * 1024;

fn client() -> ClientAddr {
    ClientAddr(([192, 0, 2, 2], 40000).into())
}

fn destination() -> OrigDstAddr {
    OrigDstAddr(([192, 0, 2, 10], 443).into())
}

/// A connection accepted now, with the pod's end of it.
fn accepted(max_bytes: usize) -> (Streams<DuplexStream, DuplexStream>, DuplexStream) {
    let (gateway, pod) = duplex(64 * 1024);
    let streams = Streams {
        client: gateway,
        upstream: None,
        reader: PeekReader::new(Instant::now() + PEEK_TIMEOUT, max_bytes),
    };
    (streams, pod)
}

/// Dials the one in-memory server the test plays; refuses when it has none (left).
#[derive(Debug)]
struct Scripted(Mutex<Option<DuplexStream>>);

impl Scripted {
    /// The dialer and the server's end.
    fn server() -> (Self, DuplexStream) {
        let (gateway, server) = duplex(64 * 1024);
        (Scripted(Mutex::new(Some(gateway))), server)
    }

    fn refusing() -> Self {
        Scripted(Mutex::new(None))
    }

    fn dialled(&self) -> bool {
        self.0.lock().map_or(true, |left| left.is_none())
    }
}

impl Dial for Scripted {
    type Stream = DuplexStream;

    async fn dial(&self, _: OrigDstAddr) -> io::Result<DuplexStream> {
        let left = self.0.lock().ok().and_then(|mut left| left.take());
        left.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))
    }
}

async fn sniff_then_message(
    streams: &mut Streams<DuplexStream, DuplexStream>,
) -> Result<Peeked, Stop> {
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let peeked = peeking::peek(&mut cx, streams, &Scripted::refusing()).await;
    assert!(cx.peek_duration.is_some());
    peeked
}

// === the reader: deadline, cap, early close ===

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_denied_at_the_peek_deadline() {
    let (mut streams, _pod) = accepted(MAX_BYTES);
    let started = Instant::now();
    let Streams { client, reader, .. } = &mut streams;
    let stop = reader
        .until(client, 0, peek::sniff)
        .await
        .expect_err("times out");
    assert_eq!(stop.reason, Reason::Pod(PodFault::PeekTimeout));
    assert_eq!(started.elapsed(), PEEK_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_counts_from_accept_not_from_the_last_byte() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        // A byte every 300 ms: 16 by 4.8 s, the 17th after the deadline.
        for byte in TLS_HELLO.iter().take(20) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pod.write_all(&[*byte]).await.expect("writes");
        }
        pod
    });
    let stop = sniff_then_message(&mut streams)
        .await
        .expect_err("times out");
    assert_eq!(stop.reason, Reason::Pod(PodFault::PeekTimeout));
    assert_eq!(started.elapsed(), PEEK_TIMEOUT);
    assert_eq!(streams.reader.buf, TLS_HELLO[..16]);
    drop(trickle.await);
}

#[tokio::test]
async fn a_first_message_over_the_byte_cap_is_too_large() {
    let (mut streams, mut pod) = accepted(64);
    pod.write_all(TLS_LARGE_HELLO).await.expect("writes");
    let stop = sniff_then_message(&mut streams)
        .await
        .expect_err("too large");
    assert_eq!(stop.reason, Reason::Pod(PodFault::PeekTooLarge));
    assert_eq!(streams.reader.buf, TLS_LARGE_HELLO[..64]);
}

#[tokio::test]
async fn a_client_that_closes_before_its_first_message_is_whole_is_client_closed() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(&TLS_HELLO[..100]).await.expect("writes");
    drop(pod);
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let stop = peeking::peek(&mut cx, &mut streams, &Scripted::refusing())
        .await
        .expect_err("closed");
    assert_eq!(stop.reason, Reason::ClientClosed);
    // The first bytes told the protocol; the log keeps it.
    assert_eq!(cx.protocol, Some(Protocol::Tls));
}

// === the peek stage on real captures ===

#[tokio::test]
async fn a_client_hello_in_small_pieces_is_peeked_whole() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    let writer = tokio::spawn(async move {
        for piece in TLS_HELLO.chunks(7) {
            pod.write_all(piece).await.expect("writes");
            tokio::task::yield_now().await;
        }
        pod
    });
    let peeked = sniff_then_message(&mut streams).await.expect("peeks");
    let Peeked::Tls(hello) = peeked else {
        panic!("not TLS: {peeked:?}");
    };
    assert_eq!(hello.server_name.as_deref(), Some("api.example.test"));
    assert_eq!(hello.alpn, ["h2", "http/1.1"]);
    // Everything read is replayed upstream.
    assert_eq!(streams.reader.into_unforwarded(), TLS_HELLO);
    drop(writer.await);
}

#[tokio::test]
async fn http_heads_and_the_http2_preface_are_told_apart() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(HTTP_HEAD).await.expect("writes");
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let peeked = peeking::peek(&mut cx, &mut streams, &Scripted::refusing()).await;
    let Ok(Peeked::Http(head)) = peeked else {
        panic!("not HTTP/1: {peeked:?}");
    };
    assert_eq!(
        head.host.map(|host| host.to_string()).as_deref(),
        Some("api.example.test")
    );
    assert_eq!(cx.protocol, Some(Protocol::Http));

    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(HTTP2_PREFACE).await.expect("writes");
    let mut cx = Context::new(2, Instant::now(), client(), destination());
    let peeked = peeking::peek(&mut cx, &mut streams, &Scripted::refusing()).await;
    assert_eq!(peeked, Ok(Peeked::Http2));
    assert_eq!(cx.protocol, Some(Protocol::Http2));
}

#[tokio::test]
async fn a_first_request_framed_ambiguously_is_smuggling_and_h2c_a_protocol_mismatch() {
    let cases: [(&[u8], Reason, &str); 4] = [
        (
            b"POST / HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            Reason::Pod(PodFault::HttpSmuggling),
            "http_content_length_and_transfer_encoding",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: api.example.test\r\n x\r\n\r\n",
            Reason::Pod(PodFault::HttpSmuggling),
            "http_obs_fold",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: h2c\r\n\r\n",
            Reason::Policy(PolicyDenial::ProtocolMismatch),
            "http_upgrade_h2c",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: api.example.test\r\nX: \x00\r\n\r\n",
            Reason::Pod(PodFault::Malformed),
            "http_bad_header_value",
        ),
    ];
    for (request, reason, detail) in cases {
        let (mut streams, mut pod) = accepted(MAX_BYTES);
        pod.write_all(request).await.expect("writes");
        let stop = sniff_then_message(&mut streams).await.expect_err("refused");
        assert_eq!(stop.reason, reason, "{detail}");
        assert_eq!(stop.detail.map(|d| d.code()), Some(detail));
    }
}

#[tokio::test]
async fn without_a_postgresql_grant_a_startup_is_only_read_for_the_log() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(PG_STARTUP).await.expect("writes");
    let peeked = sniff_then_message(&mut streams).await;
    let Ok(Peeked::Postgres(PgFirst::Startup(startup))) = peeked else {
        panic!("no startup: {peeked:?}");
    };
    assert_eq!(
        (startup.user.as_str(), startup.database.as_str()),
        ("app", "orders")
    );
}

#[tokio::test]
async fn without_grants_the_peek_is_only_for_the_log_whatever_it_found() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(TLS_HELLO).await.expect("writes");
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    cx.resolved.names = vec!["evil.example.test".parse().expect("valid")];
    let peeked = peeking::peek(&mut cx, &mut streams, &Scripted::refusing()).await;
    let table = NameTable::new(TableLimits {
        min_ttl: Duration::ZERO,
        idle_grace: Duration::ZERO,
        max_names_per_pod: 1,
        max_names: 1,
    });
    let pod = Pod::default();
    let stop = stages::authorize(&mut cx, &table, &pod, peeked, true).expect_err("no grant");
    assert_eq!(stop, Stop::new(PolicyDenial::NotAllowed));
    let sni = cx.peeked.as_ref().and_then(Peeked::requested_name);
    assert_eq!(sni.map(|sni| sni.as_str()), Some("api.example.test"));

    // A peek that failed changes nothing: no names at all is `no_dns_record`, without detail.
    let mut cx = Context::new(2, Instant::now(), client(), destination());
    let timed_out = Err(Stop::new(PodFault::PeekTimeout));
    let stop = stages::authorize(&mut cx, &table, &pod, timed_out, true).expect_err("no grant");
    assert_eq!(stop, Stop::new(PolicyDenial::NoDnsRecord));
    assert_eq!(cx.peeked, None);
}

// === the PostgreSQL encryption negotiation ===

/// The client sends `request`, expects `answer`, then sends `then`; the server expects
/// `request` and answers `answer`. Returns what the negotiation came to.
async fn negotiate(
    request: &'static [u8],
    answer: u8,
    then: &'static [u8],
) -> (Result<PgFirst, Stop>, Streams<DuplexStream, DuplexStream>) {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    let (dial, mut server) = Scripted::server();
    let pod_side = tokio::spawn(async move {
        pod.write_all(request).await.expect("writes");
        let mut answered = [0u8; 1];
        pod.read_exact(&mut answered).await.expect("answer");
        assert_eq!(answered[0], answer);
        pod.write_all(then).await.expect("writes");
        pod
    });
    let server_side = tokio::spawn(async move {
        let mut received = vec![0u8; request.len()];
        server.read_exact(&mut received).await.expect("request");
        assert_eq!(received, request);
        server.write_all(&[answer]).await.expect("answers");
        server
    });
    let negotiated = postgres::negotiate(&mut streams, destination(), &dial).await;
    drop(pod_side.await.expect("pod side"));
    drop(server_side.await.expect("server side"));
    (negotiated, streams)
}

#[tokio::test]
async fn an_ssl_request_the_server_refuses_goes_on_to_the_startup() {
    let (request, startup) = PG_SSL_THEN_STARTUP.split_at(8);
    let (negotiated, streams) = negotiate(request, b'N', startup).await;
    let Ok(PgFirst::Startup(startup_message)) = negotiated else {
        panic!("no startup: {negotiated:?}");
    };
    assert_eq!(startup_message.user, "app");
    // The request went upstream already: only the startup is left to replay.
    assert!(streams.upstream.is_some());
    assert_eq!(streams.reader.into_unforwarded(), startup);
}

#[tokio::test]
async fn a_gssenc_request_the_server_accepts_is_encrypted_gssapi() {
    let (request, _) = PG_GSSENC_THEN_STARTUP.split_at(8);
    let (negotiated, streams) = negotiate(request, b'G', b"").await;
    assert_eq!(negotiated, Ok(PgFirst::Encrypted(PgEncryption::Gssapi)));
    assert_eq!(streams.reader.forwarded, 8);
}

#[tokio::test]
async fn after_s_the_client_hello_is_peeked_for_its_sni() {
    let (negotiated, streams) = negotiate(PG_SSL_REQUEST, b'S', PG_HELLO_AFTER_S).await;
    let Ok(PgFirst::Encrypted(PgEncryption::Tls(hello))) = negotiated else {
        panic!("no ClientHello: {negotiated:?}");
    };
    assert_eq!(hello.server_name.as_deref(), Some("db.example.test"));
    assert_eq!(streams.reader.into_unforwarded(), PG_HELLO_AFTER_S);
}

#[tokio::test]
async fn an_unexpected_server_answer_is_malformed() {
    let (negotiated, _) = negotiate(PG_SSL_REQUEST, b'E', b"").await;
    let stop = negotiated.expect_err("refused");
    assert_eq!(stop.reason, Reason::Pod(PodFault::Malformed));
    let fault = NegotiationFault::UnexpectedServerAnswer { answer: b'E' };
    assert_eq!(stop.detail, Some(Detail::Negotiation(fault)));
    assert_eq!(fault.code(), "pg_unexpected_server_answer");
}

#[tokio::test]
async fn bytes_sent_before_the_encryption_answer_are_refused_without_dialling() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(PG_SSL_THEN_STARTUP).await.expect("writes");
    let (dial, _server) = Scripted::server();
    let stop = postgres::negotiate(&mut streams, destination(), &dial)
        .await
        .expect_err("refused");
    let fault = NegotiationFault::BytesBeforeAnswer;
    assert_eq!(stop.detail, Some(Detail::Negotiation(fault)));
    assert_eq!(
        stop.detail.map(|d| d.code()),
        Some("pg_bytes_before_encryption_answer")
    );
    assert!(!dial.dialled());
}

#[tokio::test]
async fn an_unreachable_server_is_the_upstreams_fault() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(PG_SSL_REQUEST).await.expect("writes");
    let stop = postgres::negotiate(&mut streams, destination(), &Scripted::refusing())
        .await
        .expect_err("unreachable");
    assert_eq!(stop, Stop::new(UpstreamFault::UpstreamUnreachable));
}

#[tokio::test(start_paused = true)]
async fn a_server_that_never_answers_runs_into_the_peek_deadline() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(PG_SSL_REQUEST).await.expect("writes");
    let (dial, mut server) = Scripted::server();
    let started = Instant::now();
    let stop = postgres::negotiate(&mut streams, destination(), &dial)
        .await
        .expect_err("times out");
    assert_eq!(stop.reason, Reason::Pod(PodFault::PeekTimeout));
    assert_eq!(started.elapsed(), PEEK_TIMEOUT);
    let mut received = [0u8; 8];
    server.read_exact(&mut received).await.expect("request");
    assert_eq!(received, PG_SSL_REQUEST);
}

// === the retry stage: HelloRetryRequest and the second ClientHello ===

/// curl's first ClientHello (517 bytes), ChangeCipherSpec (6), second ClientHello (517).
const RETRY_CLIENT: &[u8] =
    capture!("tls_retry/curl-7.88.1-curves-P-256-X25519-hello-ccs-hello2-sni-api.example.test.bin");
const RETRY_FIRST_LEN: usize = 517;
/// The server's HelloRetryRequest and ChangeCipherSpec.
const RETRY_HRR: &[u8] = capture!("tls_retry/openssl-3.0.19-s_server-groups-X25519-hrr-ccs.bin");
/// A server's first read without a retry (ServerHello, ChangeCipherSpec, encrypted records).
const RETRY_SERVER_HELLO: &[u8] =
    capture!("tls_retry/openssl-3.0.19-s_server-server-hello-first-read-819B.bin");

/// The connection after its first ClientHello was peeked (and allowed): the context, the
/// streams, the pod's end and the server's end.
async fn allowed_hello(
    sent: &[u8],
) -> (
    Context<'static>,
    Streams<DuplexStream, DuplexStream>,
    DuplexStream,
    DuplexStream,
) {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(sent).await.expect("writes");
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let peeked = peeking::peek(&mut cx, &mut streams, &Scripted::refusing()).await;
    cx.peeked = Some(peeked.expect("a ClientHello"));
    let (upstream, server) = duplex(64 * 1024);
    streams.upstream = Some(upstream);
    (cx, streams, pod, server)
}

async fn run_retry(
    cx: &mut Context<'_>,
    streams: &mut Streams<DuplexStream, DuplexStream>,
) -> Result<(retry::Retry, retry::Moved), Stop> {
    run_retry_after(cx, streams, 0).await
}

/// The retry stage when the first `sent` bytes of the ClientHello went up as the connection
/// opened.
async fn run_retry_after(
    cx: &mut Context<'_>,
    streams: &mut Streams<DuplexStream, DuplexStream>,
    sent: usize,
) -> Result<(retry::Retry, retry::Moved), Stop> {
    let Streams {
        client,
        upstream,
        reader,
    } = streams;
    let upstream = upstream.as_mut().expect("dialled");
    retry::check(cx, client, upstream, reader, sent, PEEK_TIMEOUT).await
}

/// Reads exactly `len` bytes.
async fn read_n(stream: &mut DuplexStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await.expect("reads");
    buf
}

#[tokio::test]
async fn without_a_retry_the_servers_first_read_reaches_the_client_and_nothing_else_is_held() {
    let (mut cx, mut streams, mut pod, mut server) = allowed_hello(TLS_HELLO).await;
    server.write_all(RETRY_SERVER_HELLO).await.expect("answers");
    let (told, moved) = run_retry(&mut cx, &mut streams).await.expect("passes");
    assert_eq!(told, retry::Retry::None);
    assert_eq!(read_n(&mut server, TLS_HELLO.len()).await, TLS_HELLO);
    assert_eq!(
        read_n(&mut pod, RETRY_SERVER_HELLO.len()).await,
        RETRY_SERVER_HELLO
    );
    assert_eq!(
        moved,
        retry::Moved {
            up: TLS_HELLO.len() as u64,
            down: RETRY_SERVER_HELLO.len() as u64
        }
    );
    assert!(streams.reader.into_unforwarded().is_empty());
}

/// What goes up as the connection opens is what the next stage would write first: only the
/// ClientHello before the retry stage, everything read when the relay replays it.
#[tokio::test]
async fn the_first_message_is_what_the_next_stage_writes_first() {
    let (cx, mut streams, _pod, _server) = allowed_hello(TLS_HELLO).await;
    streams.reader.buf.extend_from_slice(b"early data");
    let first = super::first_message(&cx, Verdict::Allow, &streams.reader);
    assert_eq!(first, TLS_HELLO);
    let audited = super::first_message(&cx, Verdict::Audit, &streams.reader);
    assert_eq!(audited.len(), TLS_HELLO.len() + b"early data".len());
}

#[tokio::test]
async fn bytes_of_the_client_hello_sent_as_the_connection_opened_are_not_sent_again() {
    let (mut cx, mut streams, _pod, mut server) = allowed_hello(TLS_HELLO).await;
    server.write_all(RETRY_SERVER_HELLO).await.expect("answers");
    let (told, moved) = run_retry_after(&mut cx, &mut streams, 100)
        .await
        .expect("passes");
    assert_eq!(told, retry::Retry::None);
    assert_eq!(
        read_n(&mut server, TLS_HELLO.len() - 100).await,
        TLS_HELLO[100..]
    );
    // Counted once, as the ClientHello's bytes.
    assert_eq!(moved.up, TLS_HELLO.len() as u64);
    assert!(streams.reader.into_unforwarded().is_empty());
}

#[tokio::test]
async fn after_a_retry_a_second_client_hello_with_the_same_name_goes_on() {
    let (first, rest) = RETRY_CLIENT.split_at(RETRY_FIRST_LEN);
    let (mut cx, mut streams, mut pod, mut server) = allowed_hello(first).await;
    let pod_side = tokio::spawn(async move {
        assert_eq!(read_n(&mut pod, RETRY_HRR.len()).await, RETRY_HRR);
        pod.write_all(rest).await.expect("writes");
        pod
    });
    server.write_all(RETRY_HRR).await.expect("retries");
    let (told, moved) = run_retry(&mut cx, &mut streams).await.expect("same name");
    assert_eq!(told, retry::Retry::SameName);
    assert_eq!(moved.up, RETRY_FIRST_LEN as u64);
    assert_eq!(read_n(&mut server, first.len()).await, first);
    // The ChangeCipherSpec and the second ClientHello go up with the relay.
    assert_eq!(streams.reader.into_unforwarded(), rest);
    drop(pod_side.await.expect("pod side"));
}

#[tokio::test]
async fn a_second_client_hello_naming_another_server_is_refused_before_it_reaches_it() {
    let (first, rest) = RETRY_CLIENT.split_at(RETRY_FIRST_LEN);
    let at = rest
        .windows(16)
        .position(|w| w == b"api.example.test")
        .expect("SNI in the second ClientHello");
    let mut evil = rest.to_vec();
    evil[at..at + 3].copy_from_slice(b"web");
    // Sent at once with the first: it waits in the peek buffer, unforwarded, all the same.
    let sent = [first, &evil].concat();
    let (mut cx, mut streams, _pod, mut server) = allowed_hello(&sent).await;
    server.write_all(RETRY_HRR).await.expect("retries");
    let stop = run_retry(&mut cx, &mut streams).await.expect_err("refused");
    assert_eq!(stop, Stop::invalid(peek::Invalid::TlsRetrySniChanged));
    assert_eq!(stop.detail.map(|d| d.code()), Some("tls_retry_sni_changed"));
    // The log names what the second ClientHello asked for.
    let sni = cx.peeked.as_ref().and_then(Peeked::requested_name);
    assert_eq!(sni.map(|sni| sni.as_str()), Some("web.example.test"));
    // The server got the first ClientHello and nothing more.
    drop(streams);
    let mut received = Vec::new();
    server.read_to_end(&mut received).await.expect("reads");
    assert_eq!(received, first);
}

#[tokio::test]
async fn a_change_cipher_spec_that_is_not_one_byte_0x01_is_malformed() {
    let (first, rest) = RETRY_CLIENT.split_at(RETRY_FIRST_LEN);
    let mut bad = rest.to_vec();
    bad[5] = 0x02;
    let (mut cx, mut streams, _pod, mut server) = allowed_hello(&[first, &bad].concat()).await;
    server.write_all(RETRY_HRR).await.expect("retries");
    let stop = run_retry(&mut cx, &mut streams).await.expect_err("refused");
    assert_eq!(stop, Stop::invalid(peek::Invalid::TlsBadChangeCipherSpec));
}

#[tokio::test(start_paused = true)]
async fn a_server_that_never_answers_the_client_hello_is_unreachable_at_the_deadline() {
    let (mut cx, mut streams, _pod, _server) = allowed_hello(TLS_HELLO).await;
    let started = Instant::now();
    let stop = run_retry(&mut cx, &mut streams)
        .await
        .expect_err("no answer");
    assert_eq!(stop, Stop::new(UpstreamFault::UpstreamUnreachable));
    assert_eq!(started.elapsed(), PEEK_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_sends_its_second_client_hello_times_out() {
    let first = &RETRY_CLIENT[..RETRY_FIRST_LEN];
    let (mut cx, mut streams, _pod, mut server) = allowed_hello(first).await;
    server.write_all(RETRY_HRR).await.expect("retries");
    let started = Instant::now();
    let stop = run_retry(&mut cx, &mut streams)
        .await
        .expect_err("times out");
    assert_eq!(stop, Stop::new(PodFault::PeekTimeout));
    assert_eq!(started.elapsed(), PEEK_TIMEOUT);
}

#[tokio::test]
async fn a_server_that_closes_without_answering_is_left_to_the_relay() {
    let (mut cx, mut streams, _pod, mut server) = allowed_hello(TLS_HELLO).await;
    let server_side = tokio::spawn(async move {
        read_n(&mut server, TLS_HELLO.len()).await;
    });
    let (told, moved) = run_retry(&mut cx, &mut streams).await.expect("passes");
    assert_eq!((told, moved.down), (retry::Retry::None, 0));
    server_side.await.expect("server side");

    // Gone before the ClientHello could be written: unreachable.
    let (mut cx, mut streams, _pod, server) = allowed_hello(TLS_HELLO).await;
    drop(server);
    let stop = run_retry(&mut cx, &mut streams).await.expect_err("gone");
    assert_eq!(stop, Stop::new(UpstreamFault::UpstreamUnreachable));
}

#[tokio::test]
async fn other_connections_are_not_held() {
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(HTTP_HEAD).await.expect("writes");
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let peeked = peeking::peek(&mut cx, &mut streams, &Scripted::refusing()).await;
    cx.peeked = peeked.ok();
    let (upstream, _server) = duplex(1024);
    streams.upstream = Some(upstream);
    let outcome = run_retry(&mut cx, &mut streams).await;
    assert_eq!(outcome, Ok((retry::Retry::None, retry::Moved::default())));
    assert_eq!(streams.reader.into_unforwarded(), HTTP_HEAD);
}

// === a first request that asks to upgrade ===

#[tokio::test]
async fn an_upgrade_is_opaque_only_once_the_server_switches() {
    let request = b"GET /ws HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: websocket\r\n\r\n";
    for (answer, switched) in [
        (
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"[..],
            true,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
    ] {
        let (mut streams, mut pod) = accepted(MAX_BYTES);
        // Bytes behind the request wait: after a 101 they are the new protocol's.
        pod.write_all(&[&request[..], b"\x81\x05hello"].concat())
            .await
            .expect("writes");
        let peeked = sniff_then_message(&mut streams).await.expect("a request");
        assert!(matches!(peeked, Peeked::Http(_)));
        let (mut upstream, mut server) = duplex(64 * 1024);
        server.write_all(answer).await.expect("answers");
        let Streams { client, reader, .. } = &mut streams;
        let told =
            upgrade::first_upgrade(client, &mut upstream, reader, request.len(), PEEK_TIMEOUT)
                .await
                .expect("answered");
        assert_eq!(told, switched);
        assert_eq!(read_n(&mut server, request.len()).await, request);
        // The client got the server's first read (up to its status line at least).
        let mut got = vec![0u8; 12];
        pod.read_exact(&mut got).await.expect("status");
        assert_eq!(&got, &answer[..12]);
        assert_eq!(streams.reader.into_unforwarded(), b"\x81\x05hello");
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_that_does_not_answer_an_upgrade_fails_at_the_deadline() {
    let request = b"GET /ws HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: websocket\r\n\r\n";
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(request).await.expect("writes");
    sniff_then_message(&mut streams).await.expect("a request");
    let (mut upstream, _server) = duplex(1024);
    let Streams { client, reader, .. } = &mut streams;
    let error = upgrade::first_upgrade(client, &mut upstream, reader, request.len(), PEEK_TIMEOUT)
        .await
        .expect_err("no answer");
    assert_eq!(error.kind(), io::ErrorKind::TimedOut);
}

// === a real Proxy: the peek limit, the unknown-source wait ===

const POLICY: &str = "apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{cidr: 192.0.2.0/28}]
      ports: [{port: 443, protocol: tls}]
";

const POD: &str = "namespaces: [{name: shop}]
pods: [{name: app-1, namespace: shop, ips: [192.0.2.2], labels: {role: app}}]
";

const NO_POD: &str = "pods: []\n";

/// A `Proxy` over the policy above, with `pods` as the identity file.
struct Gateway {
    proxy: Proxy,
    store: Arc<Store>,
    limits: Arc<Limits>,
    table: Arc<NameTable>,
    _dir: tempfile::TempDir,
}

fn gateway(pods: &str) -> Gateway {
    gateway_with(POLICY, pods, 16)
}

fn gateway_with(policy: &str, pods: &str, max_names: usize) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |path: &Path, text: &str| std::fs::write(path, text).expect("writes");
    std::fs::create_dir(dir.path().join("policies")).expect("mkdir");
    write(&dir.path().join("policies/web.yaml"), policy);
    write(&dir.path().join("pods.yaml"), pods);
    let text = format!(
        "policyDir: {}\nidentity: {{staticFile: {}, unknownSourceWaitMs: 1000}}\n\
         nftables: {{manage: false}}\n",
        dir.path().join("policies").display(),
        dir.path().join("pods.yaml").display()
    );
    let config = Config::parse("c.yaml", &text).expect("config");
    let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
    let store = Arc::new(Store::load(&config, metrics.clone()).expect("store"));
    let table = Arc::new(NameTable::new(TableLimits {
        min_ttl: Duration::ZERO,
        idle_grace: Duration::from_secs(60),
        max_names_per_pod: max_names,
        max_names,
    }));
    let limits = Limits::new(Bounds {
        max_connections: 16,
        max_peeking: 16,
        max_peeking_per_pod: 1,
    });
    let proxy = Proxy::new(
        Arc::clone(&store),
        Arc::clone(&table),
        metrics,
        Arc::clone(&limits),
        &config,
    );
    Gateway {
        proxy,
        store,
        limits,
        table,
        _dir: dir,
    }
}

#[tokio::test]
async fn over_the_peek_limit_nothing_is_read_and_the_connection_is_denied() {
    let gateway = gateway(POD);
    let snapshot = gateway.store.current();
    let waiting = gateway.limits.peek(client().ip()).expect("first peek slot");

    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(TLS_HELLO).await.expect("writes");
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let outcome = gateway
        .proxy
        .decide(&mut cx, &snapshot, &mut streams, &Scripted::refusing())
        .await;
    assert_eq!(outcome, Err(Stop::new(Limit::PeekLimit)));
    assert_eq!(gateway.proxy.verdict(&cx, &outcome), Verdict::Deny);
    assert_eq!(cx.protocol, None);
    assert!(streams.reader.buf.is_empty());

    // The slot is back once the other connection is done with it.
    drop(waiting);
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(TLS_HELLO).await.expect("writes");
    let mut cx = Context::new(2, Instant::now(), client(), destination());
    let outcome = gateway
        .proxy
        .decide(&mut cx, &snapshot, &mut streams, &Scripted::refusing())
        .await;
    let granted = outcome.expect("allowed by the cidr rule");
    assert_eq!(
        (granted.policy.to_string(), granted.rule),
        ("shop/web".into(), 0)
    );
    assert_eq!(cx.protocol, Some(Protocol::Tls));
}

#[tokio::test(start_paused = true)]
async fn a_connection_waits_for_its_pod_to_be_announced() {
    let gateway = gateway(NO_POD);
    let announced = Duration::from_millis(300);
    let store = Arc::clone(&gateway.store);
    let announce = tokio::spawn(async move {
        tokio::time::sleep(announced).await;
        store.set_identities(Identities::parse("pods.yaml", POD).expect("identities"));
    });
    let accepted_at = Instant::now();
    let snapshot = gateway.proxy.wait_for_pod(client(), accepted_at).await;
    assert_eq!(accepted_at.elapsed(), announced);
    let pod = snapshot
        .identities
        .lookup(client().ip())
        .expect("announced");
    assert_eq!(pod.name, "app-1");
    announce.await.expect("announced");
}

#[tokio::test(start_paused = true)]
async fn an_address_no_pod_announces_is_an_unknown_source_after_the_wait() {
    let gateway = gateway(NO_POD);
    let accepted_at = Instant::now();
    let snapshot = gateway.proxy.wait_for_pod(client(), accepted_at).await;
    assert_eq!(accepted_at.elapsed(), Duration::from_millis(1000));

    let (mut streams, _pod) = accepted(MAX_BYTES);
    let mut cx = Context::new(1, accepted_at, client(), destination());
    let outcome = gateway
        .proxy
        .decide(&mut cx, &snapshot, &mut streams, &Scripted::refusing())
        .await;
    assert_eq!(outcome, Err(Stop::new(Reason::UnknownSource)));
    // `unknownSources` defaults to deny.
    assert_eq!(gateway.proxy.verdict(&cx, &outcome), Verdict::Deny);
    assert!(cx.pod.is_none());
}

// === names sharing one address ===

/// `names` for the pod's address and the test destination, as one DNS answer each.
fn resolve(table: &NameTable, names: impl IntoIterator<Item = String>) {
    let now = std::time::Instant::now();
    for name in names {
        let answer = egressgate_dns_shim::Answer {
            name: name.parse().expect("a valid name"),
            addresses: vec![destination().ip()],
            cnames: Vec::new(),
            ttl: 300,
        };
        table.record(egressgate_dns_shim::PodIp(client().ip()), &answer, now);
    }
}

/// 5,000 names on one address, as a CDN or shared ingress has (or a pod that inflates them);
/// `api.example.test` resolved last, so it is none of the names a connection carries.
fn crowded(policy: &str) -> Gateway {
    let gateway = gateway_with(policy, POD, 10_000);
    let others = (0..5_000).map(|i| format!("site-{i}.cdn.example.test"));
    resolve(
        &gateway.table,
        others.chain(["api.example.test".to_owned()]),
    );
    gateway
}

const TLS_BY_NAME: &str = "apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
";

/// The names the grant used, or the denial, and the names the connection carried.
async fn decide_hello(
    gateway: &Gateway,
    hello: &[u8],
) -> (Result<Vec<DnsName>, Stop>, ResolvedNames) {
    let snapshot = gateway.store.current();
    let (mut streams, mut pod) = accepted(MAX_BYTES);
    pod.write_all(hello).await.expect("writes");
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let outcome = gateway
        .proxy
        .decide(&mut cx, &snapshot, &mut streams, &Scripted::refusing())
        .await
        .map(|granted| granted.names);
    (outcome, std::mem::take(&mut cx.resolved))
}

#[tokio::test]
async fn an_sni_among_thousands_of_names_on_its_address_is_found_by_one_probe() {
    let gateway = crowded(TLS_BY_NAME);
    let (outcome, resolved) = decide_hello(&gateway, TLS_HELLO).await;
    let names = outcome.expect("api.example.test was resolved to the address");
    assert_eq!(names, ["api.example.test"]);
    // The connection carried a bounded sample, the requested name first, and the count.
    assert!(!resolved.complete);
    assert_eq!(resolved.total, 5_001);
    assert!(resolved.names.len() <= ResolvedNames::CARRIED + 1);
    assert_eq!(resolved.logged().len(), ResolvedNames::LOGGED);
    assert_eq!(resolved.logged()[0], "api.example.test");
}

#[tokio::test]
async fn with_thousands_of_names_a_denial_has_the_reason_a_full_look_gives() {
    // The SNI (api.example.test) is not among the names; another resolved name is allowed: the
    // reason is `sni_mismatch`, as with few names, not `not_allowed`.
    let policy = TLS_BY_NAME.replace("api.example.test", "site-4999.cdn.example.test");
    let gateway = gateway_with(&policy, POD, 10_000);
    let others = (0..5_000).map(|i| format!("site-{i}.cdn.example.test"));
    resolve(&gateway.table, others);
    let (outcome, resolved) = decide_hello(&gateway, TLS_HELLO).await;
    assert_eq!(outcome, Err(Stop::new(PolicyDenial::SniMismatch)));
    assert!(resolved.complete, "fell back to every name");

    // No rule for any of them: `not_allowed`.
    let gateway = crowded(&TLS_BY_NAME.replace("api.example.test", "other.example.test"));
    let (outcome, _) = decide_hello(&gateway, TLS_HELLO).await;
    assert_eq!(outcome, Err(Stop::new(PolicyDenial::NotAllowed)));
}

#[tokio::test]
async fn a_tcp_rule_for_a_name_past_the_carried_ones_allows_without_a_peek() {
    let policy = TLS_BY_NAME.replace("protocol: tls", "protocol: tcp");
    let gateway = crowded(&policy);
    let snapshot = gateway.store.current();
    // The client says nothing: a server-speaks-first protocol.
    let (mut streams, _pod) = accepted(MAX_BYTES);
    let mut cx = Context::new(1, Instant::now(), client(), destination());
    let outcome = gateway
        .proxy
        .decide(&mut cx, &snapshot, &mut streams, &Scripted::refusing())
        .await;
    let granted = outcome.expect("granted by api.example.test");
    assert_eq!(granted.names, ["api.example.test"]);
    assert_eq!(cx.protocol, Some(Protocol::Tcp));
}

// === later requests on an allowed HTTP/1 connection ===

/// The policy of the names tests, with an `http` rule instead.
fn http_by_name() -> String {
    TLS_BY_NAME.replace("protocol: tls", "protocol: http")
}

fn later_request(host: &str) -> peek::http_framing::Request {
    let head = format!("GET /next HTTP/1.1\r\nHost: {host}\r\n\r\n");
    match peek::http_framing::peek_request(head.as_bytes()) {
        Peek::Complete(request) => request,
        other => panic!("a whole request head, got {other:?}"),
    }
}

fn gate(gateway: &Gateway, host: &str, allowed: &mut Option<AllowedHost>) -> Next {
    let request = later_request(host);
    let ends = (client(), destination());
    gateway
        .proxy
        .gate(7, ends, Seen::Request(&request), allowed)
}

fn later_allowed(gateway: &Gateway) -> u64 {
    gateway.proxy.metrics.http_later_allowed.get()
}

#[tokio::test]
async fn a_later_request_for_the_host_allowed_last_needs_its_name_still_live() {
    let gateway = gateway_with(&http_by_name(), POD, 4);
    resolve(&gateway.table, ["api.example.test".to_owned()]);
    let mut allowed = None;
    assert_eq!(gate(&gateway, "api.example.test", &mut allowed), Next::Pass);
    assert!(allowed.is_some(), "an allowed request is remembered");
    assert_eq!(gate(&gateway, "api.example.test", &mut allowed), Next::Pass);
    assert_eq!(later_allowed(&gateway), 2);

    // The pod's name table is full of newer names: the one the requests used is gone.
    resolve(
        &gateway.table,
        (0..4).map(|i| format!("site-{i}.example.test")),
    );
    assert!(gateway
        .table
        .lookup(
            egressgate_dns_shim::PodIp(client().ip()),
            egressgate_dns_shim::DestIp(destination().ip()),
            std::time::Instant::now(),
        )
        .iter()
        .all(|resolved| &*resolved.name != "api.example.test"));
    assert_eq!(gate(&gateway, "api.example.test", &mut allowed), Next::Stop);
    assert!(allowed.is_none(), "a refusal forgets the allowed host");
    assert_eq!(later_allowed(&gateway), 2);
}

#[tokio::test]
async fn a_later_request_for_another_host_is_decided_whole() {
    let gateway = gateway_with(&http_by_name(), POD, 16);
    resolve(&gateway.table, ["api.example.test".to_owned()]);
    let mut allowed = None;
    assert_eq!(gate(&gateway, "api.example.test", &mut allowed), Next::Pass);
    assert_eq!(
        gate(&gateway, "evil.example.test", &mut allowed),
        Next::Stop
    );
}

#[tokio::test]
async fn a_later_request_after_the_pods_identity_changed_is_decided_whole() {
    let gateway = gateway_with(&http_by_name(), POD, 16);
    resolve(&gateway.table, ["api.example.test".to_owned()]);
    let mut allowed = None;
    assert_eq!(gate(&gateway, "api.example.test", &mut allowed), Next::Pass);

    // The address now belongs to no pod: `unknownSources` (deny) decides.
    let gone = Identities::parse("pods.yaml", NO_POD).expect("identities");
    gateway.store.set_identities(gone);
    assert_eq!(gate(&gateway, "api.example.test", &mut allowed), Next::Stop);
    assert_eq!(later_allowed(&gateway), 1);
}

// === serve: the listener handed from task to task ===

/// The pod the loopback clients of `serve` are.
const LOOPBACK_POD: &str = "namespaces: [{name: shop}]
pods: [{name: app-1, namespace: shop, ips: [127.0.0.1], labels: {role: app}}]
";

#[tokio::test]
async fn serve_accepts_every_connection_and_stops_at_shutdown() {
    let Gateway { proxy, _dir, .. } = gateway(LOOPBACK_POD);
    let proxy = Arc::new(proxy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(Arc::clone(&proxy).serve(listener, async {
        let _ = stopped.await;
    }));

    // All open at once: each is accepted although the ones before it are still being served.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connects");
        client.write_all(TLS_HELLO).await.expect("writes");
        clients.push(client);
    }
    for mut client in clients {
        // The destination (the listener's own address) is in no rule: denied, closed.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest));
        let _ = read.await.expect("closed by the gateway");
    }
    let denied = ["deny", "no_dns_record", "tls", "shop"];
    assert_eq!(
        proxy.metrics.connections.with_label_values(&denied).get(),
        3
    );

    stop.send(()).expect("serving");
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve returns at shutdown")
        .expect("no panic");
    let refused = tokio::net::TcpStream::connect(address).await;
    assert!(refused.is_err(), "the listener is closed");
}
