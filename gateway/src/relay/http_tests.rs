//! The HTTP/1 relay over loopback TCP: what the gate sees, what reaches the server, and how a
//! stopped connection ends.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// A connected (near, far) pair over loopback.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (near.expect("connect"), far.expect("accept").0)
}

const FIRST: &[u8] = b"GET /1 HTTP/1.1\r\nHost: api.example.test\r\n\r\n";

/// What the gate saw: the host of each later request, or the refusal's code.
type Log = Arc<Mutex<Vec<String>>>;

/// Runs the relay with `first` already peeked; the gate stops at hosts named `evil…` and at
/// refusals unless `audit`. Returns the relay task, the pod's and the server's ends, the log.
async fn start(
    first: &[u8],
    audit: bool,
) -> (tokio::task::JoinHandle<Relayed>, TcpStream, TcpStream, Log) {
    let (pod, client) = pair().await;
    let (upstream, server) = pair().await;
    let log: Log = Arc::default();
    let seen = Arc::clone(&log);
    let gate = move |what: Seen<'_>| {
        let (entry, next) = match what {
            Seen::Request(request) => {
                let host = request
                    .head
                    .host
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                let next = if host.starts_with("evil") {
                    Next::Stop
                } else {
                    Next::Pass
                };
                (host, next)
            }
            Seen::Invalid(invalid) => (invalid.code().to_owned(), Next::Stop),
            Seen::TooLarge => ("too large".to_owned(), Next::Stop),
        };
        seen.lock().expect("log").push(entry);
        match next {
            Next::Stop if audit => Next::Opaque,
            next => next,
        }
    };
    let relay = tokio::spawn(relay_http(
        client,
        upstream,
        first.to_vec(),
        true,
        Duration::from_secs(5),
        16 * 1024,
        gate,
    ));
    (relay, pod, server, log)
}

fn log(log: &Log) -> Vec<String> {
    log.lock().expect("log").clone()
}

#[tokio::test]
async fn a_pipelined_request_for_another_host_stops_before_a_byte_of_it_goes_up() {
    let (relay, mut pod, mut server, seen) = start(FIRST, false).await;
    let second = b"GET /2 HTTP/1.1\r\nHost: other.example.test\r\n\r\n";
    let evil = b"GET /3 HTTP/1.1\r\nHost: evil.example.test\r\n\r\n";
    pod.write_all(&[&second[..], evil].concat())
        .await
        .expect("write");
    let mut received = Vec::new();
    server.read_to_end(&mut received).await.expect("read");
    assert_eq!(received, [FIRST, &second[..]].concat());
    assert_eq!(log(&seen), ["other.example.test", "evil.example.test"]);

    // The answers to what went up still reach the pod; then the connection ends.
    server.write_all(b"two answers").await.expect("answer");
    drop(server);
    let mut answer = [0u8; 11];
    pod.read_exact(&mut answer).await.expect("answers");
    assert_eq!(&answer, b"two answers");
    let mut rest = [0u8; 1];
    let end = pod.read(&mut rest).await;
    assert!(
        matches!(&end, Ok(0))
            || matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    let relayed = relay.await.expect("joins");
    assert!(relayed.error.is_none(), "{:?}", relayed.error);
    assert_eq!(relayed.bytes_up, (FIRST.len() + second.len()) as u64);
}

#[tokio::test]
async fn bodies_go_up_unread_and_only_real_requests_are_shown() {
    let disguised = b"GET /x HTTP/1.1\r\nHost: evil.example.test\r\n\r\n";
    let post = format!(
        "POST /2 HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: {}\r\n\r\n",
        disguised.len()
    );
    let chunked =
        "POST /3 HTTP/1.1\r\nHost: api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunks = format!(
        "{:x}\r\n{}\r\n0\r\nX-Sum: 1\r\n\r\n",
        disguised.len(),
        String::from_utf8_lossy(disguised)
    );
    let last = b"GET /4 HTTP/1.1\r\nHost: other.example.test\r\nConnection: close\r\n\r\n";
    let stream = [
        post.as_bytes(),
        disguised,
        chunked.as_bytes(),
        chunks.as_bytes(),
        last,
    ]
    .concat();
    let (relay, mut pod, mut server, seen) = start(FIRST, false).await;
    // In small pieces, so bodies arrive partly buffered, partly spliced.
    for piece in stream.chunks(7) {
        pod.write_all(piece).await.expect("write");
    }
    pod.shutdown().await.expect("half-close");
    let mut received = Vec::new();
    server.read_to_end(&mut received).await.expect("read");
    assert_eq!(received, [FIRST, &stream].concat());
    assert_eq!(
        log(&seen),
        ["api.example.test", "api.example.test", "other.example.test"]
    );
    drop(server);
    let relayed = relay.await.expect("joins");
    assert!(relayed.error.is_none(), "{:?}", relayed.error);
}

#[tokio::test]
async fn ambiguous_framing_later_on_is_refused_and_audit_lets_it_through_unframed() {
    let smuggling = b"POST /2 HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    for audit in [false, true] {
        let (relay, mut pod, mut server, seen) = start(FIRST, audit).await;
        pod.write_all(smuggling).await.expect("write");
        pod.shutdown().await.expect("half-close");
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.expect("read");
        let expected = if audit {
            [FIRST, &smuggling[..]].concat()
        } else {
            FIRST.to_vec()
        };
        assert_eq!(received, expected, "audit: {audit}");
        assert_eq!(log(&seen), ["http_content_length_and_transfer_encoding"]);
        drop(server);
        relay.await.expect("joins");
    }
}

#[tokio::test]
async fn a_client_that_ends_inside_a_head_or_body_sends_nothing_unchecked() {
    let (relay, mut pod, mut server, seen) = start(FIRST, false).await;
    pod.write_all(b"POST /2 HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .expect("write");
    pod.write_all(b"GET /3 HTTP/1.1\r\nHost: evil")
        .await
        .expect("write");
    pod.shutdown().await.expect("half-close");
    let mut received = Vec::new();
    server.read_to_end(&mut received).await.expect("read");
    // The body takes the next 10 bytes, whatever they look like; then the stream ends.
    assert!(
        received.ends_with(b"\r\n\r\nabcGET /3 "),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    // What follows the body is read as the next head: no request.
    assert_eq!(log(&seen), ["api.example.test", "http_bad_method"]);

    // A head cut short is not sent at all.
    drop(server);
    relay.await.expect("joins");
    let (relay, mut pod, mut server, _) = start(FIRST, false).await;
    pod.write_all(b"GET /2 HTTP/1.1\r\nHost: evil.exa")
        .await
        .expect("write");
    pod.shutdown().await.expect("half-close");
    let mut received = Vec::new();
    server.read_to_end(&mut received).await.expect("read");
    assert_eq!(received, FIRST);
    drop(server);
    relay.await.expect("joins");
}

#[tokio::test]
async fn a_large_body_is_spliced_whole_and_the_next_request_is_still_shown() {
    let body = vec![b'x'; 1 << 20];
    let head = format!(
        "PUT /big HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let next = b"GET /after HTTP/1.1\r\nHost: evil.example.test\r\n\r\n";
    let head_len = head.len();
    let (relay, mut pod, mut server, seen) = start(FIRST, false).await;
    let writer = tokio::spawn(async move {
        pod.write_all(head.as_bytes()).await.expect("write");
        pod.write_all(&body).await.expect("write");
        pod.write_all(next).await.expect("write");
        pod
    });
    let mut received = Vec::new();
    server.read_to_end(&mut received).await.expect("read");
    assert_eq!(
        received.len(),
        FIRST.len() + head_len + (1 << 20),
        "head, body, nothing more"
    );
    assert!(received.ends_with(b"xxxx"));
    assert_eq!(log(&seen), ["api.example.test", "evil.example.test"]);
    drop(server);
    drop(writer.await.expect("writer"));
    let relayed = relay.await.expect("joins");
    assert_eq!(relayed.bytes_up, received.len() as u64);
}
