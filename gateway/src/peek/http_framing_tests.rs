//! Unit and property tests for `http_framing`: real request heads, pipelined and kept-alive
//! requests, Content-Length and chunked bodies, and every framing the gateway refuses.

use proptest::prelude::*;

use super::*;

const WGET: &[u8] = include_bytes!("testdata/http/wget-1.21.3-origin-form.bin");
const CURL_POST: &[u8] = b"POST /upload HTTP/1.1\r\nHost: api.example.test\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Length: 11\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\nhello=world";

fn head(host: &str, extra: &str) -> String {
    format!("POST / HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

/// The frames of `stream`, which must end between two requests.
fn frames(stream: &[u8]) -> Vec<(usize, Frame)> {
    let (frames, end) = frame_stream(stream);
    assert_eq!(end, StreamEnd::Boundary, "{frames:?}");
    frames
}

fn hosts(frames: &[(usize, Frame)]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|(_, frame)| match frame {
            Frame::Head(request) => request.head.host.as_ref().map(ToString::to_string),
            _ => None,
        })
        .collect()
}

fn refused(stream: &[u8]) -> Invalid {
    match frame_stream(stream) {
        (_, StreamEnd::Invalid(invalid)) => invalid,
        other => panic!("not refused: {other:?}"),
    }
}

// === boundaries ===

#[test]
fn pipelined_requests_without_bodies_are_each_a_head() {
    let second = b"GET /other HTTP/1.1\r\nHost: evil.example.test\r\n\r\n";
    let stream = [WGET, second].concat();
    let frames = frames(&stream);
    assert_eq!(hosts(&frames), ["api.example.test", "evil.example.test"]);
    assert_eq!(frames[1].0, WGET.len());
    let Frame::Head(first) = &frames[0].1 else {
        panic!("a head first");
    };
    assert_eq!(first.body, Body::None);
    assert!(!first.close && !first.expect_continue && first.upgrade.is_empty());
}

#[test]
fn a_content_length_body_is_skipped_unread_even_when_it_looks_like_a_request() {
    let body = b"GET / HTTP/1.1\r\nHost: evil.example.test\r\n\r\n";
    let stream = [
        head(
            "api.example.test",
            &format!("Content-Length: {}\r\n", body.len()),
        )
        .as_bytes(),
        body,
        b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n",
    ]
    .concat();
    let frames = frames(&stream);
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(frames[1].1, Frame::Body(body.len() as u64));
    assert_eq!(hosts(&frames), ["api.example.test", "other.example.test"]);

    let frames = self::frames(CURL_POST);
    assert_eq!(frames[1].1, Frame::Body(11));
    // A Content-Length of 0 is no body at all.
    let empty = head("api.example.test", "Content-Length: 0\r\n");
    assert_eq!(self::frames(empty.as_bytes()).len(), 1);
}

#[test]
fn chunked_bodies_with_extensions_and_trailers_end_where_the_last_chunk_says() {
    let head = head("api.example.test", "Transfer-Encoding: chunked\r\n");
    let chunks = "5;name=value;q=\"x y\"\r\nhello\r\n1e\r\nGET / HTTP/1.1\r\nHost: evil\r\n\r\n\r\n0\r\nX-Checksum: 1\r\n\r\n";
    let next = "GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n";
    let stream = format!("{head}{chunks}{next}");
    let frames = frames(stream.as_bytes());
    let kinds: Vec<&Frame> = frames.iter().map(|(_, f)| f).collect();
    assert!(matches!(kinds[0], Frame::Head(r) if r.body == Body::Chunked));
    assert_eq!(*kinds[1], Frame::Chunk { line: 22, data: 5 });
    assert_eq!(
        *kinds[2],
        Frame::Chunk {
            line: 6,
            data: 0x1e
        }
    );
    assert_eq!(*kinds[3], Frame::LastChunk(2 + 3 + 15 + 2));
    assert_eq!(hosts(&frames), ["api.example.test", "other.example.test"]);
    assert_eq!(frames[4].0, stream.len() - next.len());
}

#[test]
fn expect_upgrade_and_connection_are_reported() {
    let stream = head(
        "api.example.test",
        "Content-Length: 3\r\nExpect: 100-Continue\r\nUpgrade: WebSocket, foo/2\r\nConnection: keep-alive, close\r\n",
    );
    let Peek::Complete(request) = peek_request(stream.as_bytes()) else {
        panic!("a request");
    };
    assert!(request.expect_continue && request.close);
    assert_eq!(request.upgrade, ["websocket", "foo/2"]);
    assert_eq!(request.body, Body::Length(3));

    let http10 = b"GET / HTTP/1.0\r\nHost: api.example.test\r\n\r\n";
    let keep = b"GET / HTTP/1.0\r\nHost: api.example.test\r\nConnection: Keep-Alive\r\n\r\n";
    let close = |buf: &[u8]| match peek_request(buf) {
        Peek::Complete(request) => request.close,
        other => panic!("{other:?}"),
    };
    assert!(close(http10));
    assert!(!close(keep));
}

#[test]
fn every_prefix_of_a_frame_is_incomplete_until_it_is_whole() {
    let head = head("api.example.test", "Transfer-Encoding: chunked\r\n");
    let mut framer = Framer::new();
    for cut in 0..head.len() {
        assert_eq!(framer.next(&head.as_bytes()[..cut]), Peek::Incomplete);
    }
    assert!(matches!(
        framer.next(head.as_bytes()),
        Peek::Complete(Frame::Head(_))
    ));
    let chunk = b"1f;ext\r\n";
    for cut in 0..chunk.len() {
        assert_eq!(
            framer.clone().next(&chunk[..cut]),
            Peek::Incomplete,
            "{cut}"
        );
    }
    assert_eq!(
        framer.next(chunk),
        Peek::Complete(Frame::Chunk { line: 8, data: 31 })
    );
    let last = b"\r\n0\r\nA: b\r\n\r\n";
    for cut in 0..last.len() {
        assert_eq!(framer.clone().next(&last[..cut]), Peek::Incomplete, "{cut}");
    }
    assert_eq!(
        framer.next(last),
        Peek::Complete(Frame::LastChunk(last.len()))
    );
    assert!(framer.at_request_boundary());
    assert_eq!(framer.requests(), 1);
}

// === refused ===

#[test]
fn ambiguous_framing_is_refused_as_smuggling() {
    let cases: &[(&str, &str)] = &[
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "http_content_length_and_transfer_encoding",
        ),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "http_content_length_and_transfer_encoding",
        ),
        (
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "http_duplicate_content_length",
        ),
        ("Content-Length: 5, 5\r\n", "http_bad_content_length"),
        ("Content-Length: +5\r\n", "http_bad_content_length"),
        ("Content-Length: 0x5\r\n", "http_bad_content_length"),
        ("Content-Length: 5 5\r\n", "http_bad_content_length"),
        ("Content-Length:\r\n", "http_bad_content_length"),
        (
            "Content-Length: 1000000000000000000\r\n",
            "http_bad_content_length",
        ),
        ("Transfer-Encoding: gzip\r\n", "http_bad_transfer_encoding"),
        (
            "Transfer-Encoding: chunked, gzip\r\n",
            "http_bad_transfer_encoding",
        ),
        (
            "Transfer-Encoding: chunked, chunked\r\n",
            "http_bad_transfer_encoding",
        ),
        (
            "Transfer-Encoding: Chunked\r\n",
            "http_bad_transfer_encoding",
        ),
        (
            "Transfer-Encoding: identity\r\n",
            "http_bad_transfer_encoding",
        ),
        (
            "Transfer-Encoding: chunked;x=1\r\n",
            "http_bad_transfer_encoding",
        ),
        (
            "Transfer-Encoding: xchunked\r\n",
            "http_bad_transfer_encoding",
        ),
        ("Transfer-Encoding: \r\n", "http_bad_transfer_encoding"),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "http_bad_transfer_encoding",
        ),
        (
            "Transfer-Encoding: foo, chunked\r\n",
            "http_bad_transfer_encoding",
        ),
        ("X-A: 1\r\n Transfer-Encoding: chunked\r\n", "http_obs_fold"),
        (
            "X-A: 1\nTransfer-Encoding: chunked\r\n",
            "http_bad_line_ending",
        ),
        (
            "X-A: 1\rTransfer-Encoding: chunked\r\n",
            "http_bad_line_ending",
        ),
    ];
    for (extra, code) in cases {
        let invalid = refused(head("api.example.test", extra).as_bytes());
        assert_eq!(invalid.code(), *code, "{extra:?}: {invalid}");
        assert!(invalid.is_smuggling(), "{extra:?}");
    }
    // Known codings before chunked are framed: chunked is last.
    let gzip = head("api.example.test", "Transfer-Encoding: gzip, chunked\r\n");
    assert!(matches!(
        peek_request(gzip.as_bytes()),
        Peek::Complete(Request {
            body: Body::Chunked,
            ..
        })
    ));
    let te10 = b"POST / HTTP/1.0\r\nHost: api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(refused(te10), Invalid::HttpTransferEncodingInHttp10);
}

#[test]
fn bad_chunks_and_trailers_are_refused_as_smuggling() {
    let head = head("api.example.test", "Transfer-Encoding: chunked\r\n");
    let cases: &[&str] = &[
        "5 \r\nhello\r\n0\r\n\r\n",
        " 5\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "-1\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5\r\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloX\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "1000000000000000\r\n",
        "5;\r\nhello\r\n0\r\n\r\n",
        "5;a=\r\nhello\r\n0\r\n\r\n",
        "5; a=b\r\nhello\r\n0\r\n\r\n",
        "5;a=\"b\\\"c\"\r\nhello\r\n0\r\n\r\n",
        "5;a=b\nc\r\nhello\r\n0\r\n\r\n",
        "0\r\nContent-Length: 5\r\n\r\n",
        "0\r\nHost: evil.example.test\r\n\r\n",
    ];
    for chunks in cases {
        let invalid = refused(format!("{head}{chunks}").as_bytes());
        assert!(invalid.is_smuggling(), "{chunks:?}: {invalid}");
    }
    let folded = refused(format!("{head}0\r\nA: b\r\n c\r\n\r\n").as_bytes());
    assert_eq!(folded.code(), "http_obs_fold");
    let long = format!("{head}5;{}\r\n", "a".repeat(MAX_CHUNK_LINE));
    assert_eq!(refused(long.as_bytes()).code(), "http_bad_chunk");
}

#[test]
fn h2c_upgrades_and_connect_are_refused() {
    for upgrade in ["h2c", "H2C", "websocket, h2c", "h2c/1"] {
        let stream = head("api.example.test", &format!("Upgrade: {upgrade}\r\n"));
        let invalid = refused(stream.as_bytes());
        assert_eq!(invalid, Invalid::HttpUpgradeH2c, "{upgrade}");
        assert!(invalid.is_refused_http() && !invalid.is_smuggling());
    }
    let connect = b"CONNECT evil.example.test:443 HTTP/1.1\r\nHost: evil.example.test:443\r\n\r\n";
    assert!(refused(connect).is_refused_http());
    // A later request is held to every rule of the first.
    let second = [WGET, b"GET / HTTP/1.1\r\n\r\n"].concat();
    assert_eq!(refused(&second), Invalid::HttpMissingHost);
}

// === properties ===

/// A request body and how it is framed.
#[derive(Debug, Clone)]
enum TestBody {
    None,
    Length(Vec<u8>),
    /// Chunks (non-empty data each) and trailer lines.
    Chunked(Vec<Vec<u8>>, Vec<(String, String)>),
}

fn test_request() -> impl Strategy<Value = (String, String, TestBody)> {
    let host = prop::sample::select(vec!["api.example.test", "evil.example.test", "a.b"]);
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "HEAD", "OPTIONS"]);
    let data = proptest::collection::vec(any::<u8>(), 0..80);
    let chunk = proptest::collection::vec(any::<u8>(), 1..40);
    let trailer = ("x-[a-z]{1,8}", "[a-z0-9 ]{0,10}[a-z0-9]");
    let body = prop_oneof![
        Just(TestBody::None),
        data.prop_map(TestBody::Length),
        (
            proptest::collection::vec(chunk, 0..5),
            proptest::collection::vec(trailer, 0..3)
        )
            .prop_map(|(chunks, trailers)| TestBody::Chunked(chunks, trailers)),
    ];
    (
        method.prop_map(str::to_owned),
        host.prop_map(str::to_owned),
        body,
    )
}

/// The bytes of a request.
fn serialise(method: &str, host: &str, body: &TestBody) -> Vec<u8> {
    let mut out = format!("{method} /p HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n").into_bytes();
    match body {
        TestBody::None => out.extend_from_slice(b"\r\n"),
        TestBody::Length(data) => {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", data.len()).as_bytes());
            out.extend_from_slice(data);
        }
        TestBody::Chunked(chunks, trailers) => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for chunk in chunks {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n");
            for (name, value) in trailers {
                out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Feeds `stream` as reads of the given sizes, like the gateway would: each frame is asked for
/// with the bytes read so far past the previous one, body bytes are skipped. Returns the frames.
fn feed(stream: &[u8], reads: &[usize]) -> (Vec<(usize, Frame)>, StreamEnd) {
    let mut framer = Framer::new();
    let mut frames = Vec::new();
    let (mut pos, mut read, mut sizes) = (0usize, 0usize, reads.iter().cycle());
    loop {
        if pos >= stream.len() && framer.at_request_boundary() {
            return (frames, StreamEnd::Boundary);
        }
        let available = &stream[pos.min(stream.len())..read.max(pos).min(stream.len())];
        match framer.next(available) {
            Peek::Complete(frame) => {
                pos += match &frame {
                    Frame::Head(request) => request.head.consumed,
                    Frame::Body(n) => *n as usize,
                    Frame::Chunk { line, data } => line + *data as usize,
                    Frame::LastChunk(len) => *len,
                };
                frames.push((pos, frame));
            }
            Peek::Invalid(invalid) => return (frames, StreamEnd::Invalid(invalid)),
            Peek::Incomplete if read >= stream.len() => return (frames, StreamEnd::Incomplete),
            Peek::Incomplete => read = read.max(pos) + sizes.next().copied().unwrap_or(1).max(1),
        }
    }
}

proptest! {
    #[test]
    fn generated_streams_frame_into_exactly_their_requests(
        requests in proptest::collection::vec(test_request(), 1..6),
        reads in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let stream: Vec<u8> = requests
            .iter()
            .flat_map(|(method, host, body)| serialise(method, host, body))
            .collect();
        let (frames, end) = feed(&stream, &reads);
        prop_assert_eq!(&end, &StreamEnd::Boundary);
        let heads: Vec<&str> = frames
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::Head(r) => r.head.host.as_ref()?.name().map(|name| name.as_str()),
                _ => None,
            })
            .collect();
        let expected: Vec<&str> = requests.iter().map(|(_, host, _)| host.as_str()).collect();
        prop_assert_eq!(heads, expected);
        // The same frames as the stream read at once.
        let (whole, _) = frame_stream(&stream);
        prop_assert_eq!(frames.len(), whole.len());
        for ((_, fed), (_, at_once)) in frames.iter().zip(&whole) {
            prop_assert_eq!(fed, at_once);
        }
        // Bodies are exactly what was sent.
        let mut bodies = Vec::new();
        for (_, f) in &frames {
            match f {
                Frame::Body(n) => bodies.push(*n),
                Frame::Chunk { data, .. } => bodies.push(*data),
                _ => {}
            }
        }
        let sent: Vec<u64> = requests
            .iter()
            .flat_map(|(_, _, body)| match body {
                TestBody::None => Vec::new(),
                TestBody::Length(data) if data.is_empty() => Vec::new(),
                TestBody::Length(data) => vec![data.len() as u64],
                TestBody::Chunked(chunks, _) => chunks.iter().map(|c| c.len() as u64).collect(),
            })
            .collect();
        prop_assert_eq!(bodies, sent);
    }

    #[test]
    fn content_length_with_transfer_encoding_anywhere_is_smuggling(
        (method, host, _) in test_request(),
        before in 0usize..3,
        length in 0u64..100_000,
        coding in prop::sample::select(vec!["chunked", "gzip, chunked", "Chunked", "identity"]),
    ) {
        let mut fields = vec![
            "Accept: */*".to_owned(),
            "User-Agent: t".to_owned(),
            format!("Transfer-Encoding: {coding}"),
        ];
        fields.insert(before, format!("Content-Length: {length}"));
        let stream = format!(
            "{method} / HTTP/1.1\r\nHost: {host}\r\n{}\r\n\r\n",
            fields.join("\r\n")
        );
        let (_, end) = frame_stream(stream.as_bytes());
        let StreamEnd::Invalid(invalid) = end else {
            panic!("framed: {stream:?}");
        };
        prop_assert!(invalid.is_smuggling(), "{}", invalid);
    }

    #[test]
    fn arbitrary_bytes_in_any_state_never_panic_and_stay_monotonic(
        prefix in prop::sample::select(vec![
            "",
            "POST / HTTP/1.1\r\nHost: a.b\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a.b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
            "POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length: 3\r\n\r\nabc",
        ]),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
        cut in any::<prop::sample::Index>(),
    ) {
        let (_, end) = frame_stream(prefix.as_bytes());
        // The framer in the state the (valid) prefix leaves it in.
        let framer = {
            let mut framer = Framer::new();
            let mut pos = 0;
            while pos < prefix.len() {
                match framer.next(&prefix.as_bytes()[pos..]) {
                    Peek::Complete(Frame::Head(r)) => pos += r.head.consumed,
                    Peek::Complete(Frame::Body(n)) => pos += n as usize,
                    Peek::Complete(Frame::Chunk { line, data }) => pos += line + data as usize,
                    Peek::Complete(Frame::LastChunk(len)) => pos += len,
                    other => panic!("{other:?}"),
                }
            }
            framer
        };
        prop_assert!(matches!(end, StreamEnd::Boundary | StreamEnd::Incomplete));
        let cut = cut.index(tail.len() + 1);
        let whole = framer.clone().next(&tail);
        let prefix_answer = framer.clone().next(&tail[..cut]);
        if prefix_answer != Peek::Incomplete {
            prop_assert_eq!(prefix_answer, whole);
        }
        let _ = frame_stream(&[prefix.as_bytes(), &tail].concat());
    }
}
