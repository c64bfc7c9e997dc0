//! What must hold for the peekers (`egressgate::peek`) on any bytes a pod sends.
//!
//! Shared, not copied: the cargo-fuzz targets `fuzz_targets/peek_*.rs` and the stable replay test
//! `gateway/tests/fuzz_corpus.rs` both include this file with `#[path]`, so a corpus input that
//! passes under libFuzzer passes the same assertions in CI. A violated property panics.
//!
//! Every peeker is prefix-monotonic (`peek/mod.rs`): the gateway calls it again after each read,
//! so the bytes are fed here as a TCP stream would deliver them — every prefix of a short input,
//! pseudo-random segment boundaries of a long one — and the first decided answer must be the
//! answer for the whole stream. A TLS ClientHello is also re-framed into other record sizes, and
//! PostgreSQL's SSLRequest/GSSENCRequest negotiation is followed to the next message or the
//! ClientHello after `S`.

use std::fmt::Debug;
use std::net::IpAddr;

use egressgate::peek::http::{peek_request_head, Host, RequestHead};
use egressgate::peek::http_framing::{frame_stream, Frame, Framer, StreamEnd};
use egressgate::peek::postgres::{peek_first_message, FirstMessage, PgMessage};
use egressgate::peek::tls::{peek_client_hello, ClientHello, MAX_RECORD_LEN};
use egressgate::peek::tls_retry::{peek_second_client_hello, peek_server_first};
use egressgate::peek::{sniff, Peek, Sniffed};
use egressgate_policy::DnsName;

/// Inputs up to this long are fed at every prefix; longer ones at sampled cuts.
const ALL_PREFIXES_UP_TO: usize = 64;
/// Segment boundaries sampled in a longer input.
const SEGMENTS: usize = 24;
/// The longest sniff may wait: a 32-byte method token and its space (`peek::MAX_METHOD_LEN`).
const SNIFF_DECIDES_WITHIN: usize = 33;
/// A TCP segment's payload on a 1500-byte-MTU path with timestamps (see the fixtures' README).
const MSS: usize = 1448;
/// `HandshakeType.client_hello`: an input starting with it is a bare handshake message, which
/// the TLS check frames into records itself.
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// What `connection/postgres.rs` allows: SSLRequest or GSSENCRequest, `N`, then the rest.
const PG_MAX_MESSAGES: usize = 3;

/// A TLS byte stream: records carrying a ClientHello (or anything else). An input starting with
/// `0x01` is also taken as a bare handshake message and framed into records of several sizes.
/// The same bytes are read as a server's first answer (a HelloRetryRequest?) too, and what
/// follows a ClientHello as the way to a second one.
pub fn tls(data: &[u8]) {
    let mut rng = Rng::new(data);
    check_sniff(data);
    check_prefixes("peek_server_first", data, peek_server_first, &mut rng);
    tls_stream(data, &mut rng);
    if data.first() == Some(&HANDSHAKE_CLIENT_HELLO) {
        handshake_message(data, &mut rng);
    }
}

/// An HTTP/1 request head (and whatever follows it).
pub fn http(data: &[u8]) {
    let mut rng = Rng::new(data);
    check_sniff(data);
    let (whole, decided_at) =
        check_prefixes("peek_request_head", data, peek_request_head, &mut rng);
    if let Peek::Complete(head) = &whole {
        assert_eq!(
            decided_at,
            Some(head.consumed),
            "decided before the blank line"
        );
        check_request_head(head, data);
    }
}

/// The client→server direction of an HTTP/1 connection, request after request: the framer
/// (`peek::http_framing`) gives the same frames whatever the reads, each decided frame is
/// monotonic, each head reads as the head peeker reads it, and no head it passes is ambiguous.
pub fn http_framing(data: &[u8]) {
    let mut rng = Rng::new(data);
    let (frames, end) = frame_stream(data);
    let mut framer = Framer::new();
    let mut pos = 0;
    for (at, frame) in &frames {
        assert_eq!(*at, pos, "frames are not contiguous");
        let rest = &data[pos..];
        // Monotonic: a shorter read is undecided or decides the same.
        let cut = rng.below(rest.len() + 1);
        let answer = framer.clone().next(&rest[..cut]);
        assert!(
            answer == Peek::Incomplete || answer == Peek::Complete(frame.clone()),
            "the first {cut} bytes frame differently: {answer:?} vs {frame:?}"
        );
        assert_eq!(framer.next(rest), Peek::Complete(frame.clone()));
        let len = match frame {
            Frame::Head(request) => {
                check_framed_head(&request.head, rest);
                request.head.consumed
            }
            Frame::Body(n) => usize::try_from(*n).unwrap_or(usize::MAX),
            Frame::Chunk { line, data } => {
                assert!(*line >= 3 && *data > 0, "empty chunk frame");
                line.saturating_add(usize::try_from(*data).unwrap_or(usize::MAX))
            }
            Frame::LastChunk(len) => {
                assert!(
                    rest[..*len].ends_with(b"\r\n\r\n"),
                    "trailer section not closed"
                );
                *len
            }
        };
        assert!(len > 0, "an empty frame");
        pos = pos.saturating_add(len);
    }
    if end == StreamEnd::Boundary {
        assert_eq!(pos, data.len());
        assert!(framer.at_request_boundary());
    }
    // Read in pseudo-random pieces, the same frames come out.
    let mut fed = Framer::new();
    let (mut pos, mut read, mut count) = (0usize, 0usize, 0usize);
    loop {
        if pos >= data.len() && fed.at_request_boundary() {
            break;
        }
        let available = &data[pos.min(data.len())..read.max(pos).min(data.len())];
        match fed.next(available) {
            Peek::Complete(frame) => {
                assert_eq!(
                    frames.get(count).map(|(_, f)| f),
                    Some(&frame),
                    "reads change frame {count}"
                );
                count += 1;
                pos = pos.saturating_add(match &frame {
                    Frame::Head(request) => request.head.consumed,
                    Frame::Body(n) => usize::try_from(*n).unwrap_or(usize::MAX),
                    Frame::Chunk { line, data } => {
                        line.saturating_add(usize::try_from(*data).unwrap_or(usize::MAX))
                    }
                    Frame::LastChunk(len) => *len,
                });
            }
            Peek::Invalid(invalid) => {
                assert_eq!(end, StreamEnd::Invalid(invalid), "reads change the refusal");
                break;
            }
            Peek::Incomplete if read >= data.len() => break,
            Peek::Incomplete => read = read.max(pos) + 1 + rng.below(MSS),
        }
    }
    assert_eq!(count, frames.len(), "reads change the number of frames");
}

/// A head the framer passed: the head peeker reads it the same, and it is unambiguous.
fn check_framed_head(head: &RequestHead, buf: &[u8]) {
    check_request_head(head, buf);
    assert_eq!(
        peek_request_head(&buf[..head.consumed]),
        Peek::Complete(head.clone()),
        "the framer and the head peeker read the head differently"
    );
    let names: Vec<Vec<u8>> = buf[..head.consumed]
        .split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|line| {
            line.iter()
                .position(|&b| b == b':')
                .map(|c| line[..c].to_ascii_lowercase())
        })
        .collect();
    let count = |name: &[u8]| names.iter().filter(|n| n.as_slice() == name).count();
    let (lengths, codings) = (count(b"content-length"), count(b"transfer-encoding"));
    assert!(lengths + codings <= 1, "ambiguous framing passed");
    assert!(count(b"host") <= 1, "two Host fields passed");
}

/// The first bytes of a PostgreSQL connection, followed through the encryption negotiation.
pub fn postgres(data: &[u8]) {
    let mut rng = Rng::new(data);
    check_sniff(data);
    let mut from = 0;
    for _ in 0..PG_MAX_MESSAGES {
        let buf = &data[from..];
        let (whole, decided_at) =
            check_prefixes("peek_first_message", buf, peek_first_message, &mut rng);
        let Peek::Complete(first) = whole else {
            return;
        };
        assert_eq!(
            decided_at,
            Some(first.consumed),
            "decided before the message ended"
        );
        check_first_message(&first, buf);
        if from == 0 {
            assert_eq!(
                sniff(data),
                Peek::Complete(Sniffed::Postgres),
                "sniff misroutes"
            );
        }
        from += first.consumed;
        match first.message {
            // The server answered `S`: a ClientHello follows. Or `N`: the next message does.
            PgMessage::SslRequest => tls_stream(&data[from..], &mut rng),
            // `G` leaves nothing readable; `N` is the next message.
            PgMessage::GssEncRequest => {}
            PgMessage::CancelRequest { .. } | PgMessage::Startup(_) => return,
        }
    }
}

/// The sniffer: monotonic like the peekers, and never undecided for long.
fn check_sniff(data: &[u8]) {
    let mut rng = Rng::new(data);
    let (whole, _) = check_prefixes("sniff", data, sniff, &mut rng);
    if data.len() >= SNIFF_DECIDES_WITHIN {
        assert_ne!(whole, Peek::Incomplete, "sniff still undecided");
    }
}

/// Records as received: monotonic, and a complete ClientHello is the same in other framings.
fn tls_stream(data: &[u8], rng: &mut Rng) {
    let (whole, decided_at) = check_prefixes("peek_client_hello", data, peek_client_hello, rng);
    let Peek::Complete(hello) = whole else {
        return;
    };
    assert_eq!(
        decided_at,
        Some(hello.consumed),
        "decided before the last record ended"
    );
    check_client_hello(&hello, data);
    assert_eq!(
        sniff(data),
        Peek::Complete(Sniffed::TlsHandshake),
        "sniff misroutes"
    );
    // After a HelloRetryRequest: ChangeCipherSpec, early data, then the second ClientHello.
    let rest = &data[hello.consumed..];
    let (second, decided_at) = check_prefixes(
        "peek_second_client_hello",
        rest,
        peek_second_client_hello,
        rng,
    );
    if let Peek::Complete(second) = &second {
        assert_eq!(
            decided_at,
            Some(second.consumed),
            "second ClientHello decided before its last record ended"
        );
    }
    let message = deframe(&data[..hello.consumed]);
    let size = record_size(rng, message.len());
    let version = record_version(rng);
    let mut framed = frame(&message, size, version);
    let consumed = framed.len();
    // What follows the ClientHello (a ChangeCipherSpec, early data) is the caller's.
    framed.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
    let expected = ClientHello { consumed, ..hello };
    assert_eq!(
        peek_client_hello(&framed),
        Peek::Complete(expected),
        "the ClientHello reads differently in {size}-byte records"
    );
}

/// A bare handshake message, framed canonically (records of 2^14) and in pseudo-random record
/// sizes: both must read the same, apart from the bytes consumed.
fn handshake_message(data: &[u8], rng: &mut Rng) {
    // One message exactly: bytes after it would be trailing handshake bytes in one framing and a
    // separate record in another.
    let message = match data {
        [_, a, b, c, body @ ..] => {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            &data[..4 + len.min(body.len())]
        }
        _ => data,
    };
    let canonical = frame(message, MAX_RECORD_LEN, 0x0301);
    let size = record_size(rng, message.len());
    let split = frame(message, size, record_version(rng));
    let (whole, _) = check_prefixes("peek_client_hello", &split, peek_client_hello, rng);
    if let Peek::Complete(hello) = &whole {
        check_client_hello(hello, &split);
    }
    assert_eq!(
        without_consumed(peek_client_hello(&canonical)),
        without_consumed(whole),
        "the handshake message reads differently in {size}-byte records"
    );
}

/// Feeds `buf` as a stream: every prefix of a short input, else the boundaries of pseudo-random
/// TCP segments. Once a prefix is decided (`Complete` or `Invalid`), it must be the answer for
/// the whole input. Returns that answer and the shortest prefix that decides it (a binary
/// search, sound because the answers are monotonic).
fn check_prefixes<T: Debug + PartialEq>(
    what: &str,
    buf: &[u8],
    peek: fn(&[u8]) -> Peek<T>,
    rng: &mut Rng,
) -> (Peek<T>, Option<usize>) {
    let whole = peek(buf);
    let check = |cut: usize| -> bool {
        let answer = peek(&buf[..cut]);
        let decided = answer != Peek::Incomplete;
        if decided {
            assert_eq!(
                answer,
                whole,
                "{what}: the first {cut} of {} bytes decide differently",
                buf.len()
            );
        }
        decided
    };
    assert!(!check(0), "{what}: decided on no bytes");
    if buf.len() <= ALL_PREFIXES_UP_TO {
        (1..buf.len()).for_each(|cut| {
            check(cut);
        });
    } else {
        // Header boundaries (TLS record 5, handshake 9; PostgreSQL length 4, code 8), then segments.
        [1, 2, 3, 4, 5, 6, 8, 9, 10].into_iter().for_each(|cut| {
            check(cut);
        });
        let mut cut = 0;
        for _ in 0..SEGMENTS {
            cut += segment_len(rng, buf.len());
            if cut >= buf.len() {
                break;
            }
            check(cut);
        }
        check(buf.len() - 1);
    }
    if whole == Peek::Incomplete {
        return (whole, None);
    }
    let (mut undecided, mut decided) = (0, buf.len());
    while decided - undecided > 1 {
        let mid = undecided + (decided - undecided) / 2;
        if check(mid) {
            decided = mid;
        } else {
            undecided = mid;
        }
    }
    (whole, Some(decided))
}

fn check_client_hello(hello: &ClientHello, buf: &[u8]) {
    assert!(hello.consumed <= buf.len());
    assert_eq!(hello.legacy_version >> 8, 0x03);
    if let Some(name) = &hello.server_name {
        assert!(name.parse::<IpAddr>().is_err(), "an IP literal as SNI");
        check_policy_name(name);
    }
    assert!(hello.alpn.iter().all(|p| !p.is_empty()), "empty ALPN name");
}

fn check_request_head(head: &RequestHead, buf: &[u8]) {
    assert!(head.consumed <= buf.len());
    assert!(
        buf[..head.consumed].ends_with(b"\r\n\r\n"),
        "head ends without a blank line"
    );
    // The request line starts with the method and one space.
    let method = buf.split(|&byte| byte == b' ').next().unwrap_or_default();
    assert!(!method.is_empty() && method != b"CONNECT");
    assert!(head.version_minor <= 1);
    match &head.host {
        Some(Host::Name(name)) => {
            assert!(
                name.parse::<IpAddr>().is_err(),
                "an IP literal as a Host name"
            );
            check_policy_name(name);
        }
        Some(Host::Ip(_)) => {}
        // HTTP/1.0 without Host, or an empty Host (RFC 9112 §3.2: a target without authority).
        None => assert_eq!(head.host_port, None),
    }
    let routed = if method.len() < SNIFF_DECIDES_WITHIN {
        Sniffed::Http1
    } else {
        Sniffed::Unknown
    };
    assert_eq!(sniff(buf), Peek::Complete(routed), "sniff misroutes");
}

fn check_first_message(first: &FirstMessage, buf: &[u8]) {
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    assert_eq!(first.consumed, len, "consumed is not the message length");
    assert!((8..=10_000).contains(&first.consumed) && first.consumed <= buf.len());
    match &first.message {
        PgMessage::SslRequest | PgMessage::GssEncRequest => assert_eq!(first.consumed, 8),
        PgMessage::CancelRequest { secret_key, .. } => {
            assert!((4..=256).contains(&secret_key.len()));
            assert_eq!(first.consumed, 12 + secret_key.len());
        }
        PgMessage::Startup(startup) => {
            assert_eq!(startup.protocol_major, 3);
            assert!(!startup.user.is_empty() && !startup.database.is_empty());
            let value = |wanted: &str| {
                let mut found = startup.parameters.iter().filter(|(n, _)| n == wanted);
                let value = found.next().map(|(_, v)| v.as_str());
                assert_eq!(found.next(), None, "parameter {wanted:?} twice");
                value
            };
            assert_eq!(value("user"), Some(startup.user.as_str()));
            match value("database") {
                Some(db) if !db.is_empty() => assert_eq!(db, startup.database),
                _ => assert_eq!(startup.database, startup.user),
            }
            let mut names: Vec<&str> = startup.parameters.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            let count = names.len();
            names.dedup();
            assert_eq!(names.len(), count, "duplicate startup parameter");
        }
    }
}

/// A name a peeker hands to policy must already be in the policy's normal form: lowercase, no
/// trailing dot, a valid DNS name (so a pattern matches it or it matches nothing, never both).
fn check_policy_name(name: &DnsName) {
    assert_eq!(
        DnsName::parse(name).as_ref(),
        Ok(name),
        "a peeked name policy does not accept as it is"
    );
}

/// The handshake bytes carried by well-formed records (a complete ClientHello's).
fn deframe(records: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    let mut rest = records;
    while let [_, _, _, hi, lo, after @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        message.extend_from_slice(&after[..len]);
        rest = &after[len..];
    }
    message
}

/// `message` in handshake records of `size` bytes (the last shorter) with record `version`.
fn frame(message: &[u8], size: usize, version: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / size * 5 + 5);
    for chunk in message.chunks(size) {
        let len = u16::try_from(chunk.len()).expect("record size fits 16 bits");
        out.push(0x16);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn without_consumed(answer: Peek<ClientHello>) -> Peek<ClientHello> {
    match answer {
        Peek::Complete(hello) => Peek::Complete(ClientHello {
            consumed: 0,
            ..hello
        }),
        other => other,
    }
}

/// A record fragment size: tiny (OpenSSL `-max_send_frag`-like splits down to 1 byte), any, or
/// the 2^14 maximum.
fn record_size(rng: &mut Rng, message_len: usize) -> usize {
    match rng.below(4) {
        0 => 1 + rng.below(8),
        1 => 1 + rng.below(512),
        2 => 1 + rng.below(message_len.clamp(1, MAX_RECORD_LEN)),
        _ => MAX_RECORD_LEN,
    }
}

/// Any record version a ClientHello record may carry (0x0300..=0x0304).
fn record_version(rng: &mut Rng) -> u16 {
    0x0300 + rng.below(5) as u16
}

/// The size of the next TCP segment: a few bytes, up to or exactly an MSS, or anything.
fn segment_len(rng: &mut Rng, len: usize) -> usize {
    match rng.below(4) {
        0 => 1 + rng.below(8),
        1 => 1 + rng.below(MSS),
        2 => MSS,
        _ => 1 + rng.below(len),
    }
}

/// Deterministic pseudo-random choices seeded by the input (FNV-1a, then xorshift64*), so a
/// corpus file replays exactly as the fuzzer ran it.
struct Rng(u64);

impl Rng {
    fn new(data: &[u8]) -> Self {
        let hash = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Rng(hash | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x % n.max(1) as u64) as usize
    }
}
