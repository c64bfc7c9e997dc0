//! Unit tests for `tls_retry` on real HelloRetryRequest exchanges (`testdata/tls_retry`, see its
//! README) and edits of them.

use proptest::prelude::*;

use super::*;

/// curl 7.88.1 `--curves P-256:X25519` against `openssl s_server -groups X25519`: the first
/// ClientHello (517 bytes, a P-256 key share), ChangeCipherSpec, the second ClientHello (517).
const CURL: &[u8] = include_bytes!(
    "testdata/tls_retry/curl-7.88.1-curves-P-256-X25519-hello-ccs-hello2-sni-api.example.test.bin"
);
/// The same with `openssl s_client -groups P-256:X25519` (334 + 6 + 306 bytes).
const OPENSSL: &[u8] = include_bytes!(
    "testdata/tls_retry/openssl-3.0.19-s_client-groups-P-256-X25519-hello-ccs-hello2-sni-api.example.test.bin"
);
/// The server's answer to the first: the HelloRetryRequest record (93 bytes), ChangeCipherSpec.
const HRR: &[u8] =
    include_bytes!("testdata/tls_retry/openssl-3.0.19-s_server-groups-X25519-hrr-ccs.bin");
/// A ServerHello (no retry), ChangeCipherSpec and the first encrypted records, as one read.
const SERVER_HELLO: &[u8] =
    include_bytes!("testdata/tls_retry/openssl-3.0.19-s_server-server-hello-first-read-819B.bin");

const CCS: &[u8] = &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01];

/// The first ClientHello of a capture and the bytes after it.
fn split(capture: &[u8]) -> (ClientHello, &[u8]) {
    let Peek::Complete(first) = peek_client_hello(capture) else {
        panic!("capture starts with a ClientHello");
    };
    let rest = &capture[first.consumed..];
    (first, rest)
}

fn second(buf: &[u8]) -> ClientHello {
    match peek_second_client_hello(buf) {
        Peek::Complete(hello) => hello,
        other => panic!("no second ClientHello: {other:?}"),
    }
}

fn replace(buf: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "in place: lengths stay");
    let at = buf
        .windows(from.len())
        .position(|w| w == from)
        .expect("present");
    [&buf[..at], to, &buf[at + from.len()..]].concat()
}

/// Each prefix is `Incomplete` until `at`, and from there on the answer is `whole`'s.
fn assert_decided_at<T: std::fmt::Debug + PartialEq>(
    buf: &[u8],
    at: usize,
    peek: impl Fn(&[u8]) -> Peek<T>,
) {
    let whole = peek(buf);
    for cut in 0..=buf.len() {
        let answer = peek(&buf[..cut]);
        if cut < at {
            assert_eq!(answer, Peek::Incomplete, "cut at {cut}");
        } else {
            assert_eq!(answer, whole, "cut at {cut}");
        }
    }
}

// === the server's first answer ===

#[test]
fn a_hello_retry_request_is_told_once_its_record_is_whole() {
    assert_eq!(
        peek_server_first(HRR),
        Peek::Complete(ServerFirst::HelloRetryRequest)
    );
    assert_decided_at(HRR, 93, peek_server_first);
}

#[test]
fn a_server_hello_is_told_from_its_random() {
    assert_eq!(
        peek_server_first(SERVER_HELLO),
        Peek::Complete(ServerFirst::ServerHello)
    );
    // Record header, handshake header, legacy_version and random: 5 + 4 + 2 + 32.
    assert_decided_at(SERVER_HELLO, 43, peek_server_first);
}

#[test]
fn a_hello_retry_request_in_one_byte_records_is_reassembled() {
    let handshake = &HRR[5..93];
    let framed: Vec<u8> = handshake
        .iter()
        .flat_map(|b| [0x16, 0x03, 0x03, 0x00, 0x01, *b])
        .collect();
    assert_eq!(
        peek_server_first(&framed),
        Peek::Complete(ServerFirst::HelloRetryRequest)
    );
    assert_decided_at(&framed, framed.len(), peek_server_first);
}

#[test]
fn alerts_other_messages_and_non_tls_answers_are_other() {
    let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
    let certificate = [0x16, 0x03, 0x03, 0x00, 0x04, 0x0b, 0x00, 0x00, 0x00];
    let empty_record = [0x16, 0x03, 0x03, 0x00, 0x00];
    let too_long = [0x16, 0x03, 0x03, 0x40, 0x01];
    let huge_handshake = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x01, 0x00, 0x01];
    for answer in [
        &alert[..],
        &certificate,
        &empty_record,
        &too_long,
        &huge_handshake,
        b"HTTP/1.1 400 Bad Request\r\n",
    ] {
        assert_eq!(
            peek_server_first(answer),
            Peek::Complete(ServerFirst::Other),
            "{answer:02x?}"
        );
    }
}

// === the second ClientHello ===

#[test]
fn real_second_client_hellos_keep_the_name_and_pass() {
    for (capture, second_len) in [(CURL, 517), (OPENSSL, 306)] {
        let (first, rest) = split(capture);
        assert_eq!(&rest[..CCS.len()], CCS, "middlebox compatibility mode");
        let hello = second(rest);
        assert_eq!(hello.consumed, CCS.len() + second_len);
        assert_eq!(hello.consumed, rest.len());
        assert_eq!(hello.server_name.as_deref(), Some("api.example.test"));
        assert_eq!(check_second_client_hello(&first, &hello), Ok(()));
        assert_decided_at(rest, rest.len(), peek_second_client_hello);
    }
}

#[test]
fn a_second_client_hello_for_another_name_is_refused() {
    let (first, rest) = split(CURL);
    let other = replace(rest, b"api.example.test", b"web.example.test");
    let hello = second(&other);
    assert_eq!(hello.server_name.as_deref(), Some("web.example.test"));
    assert_eq!(
        check_second_client_hello(&first, &hello),
        Err(Invalid::TlsRetrySniChanged)
    );
    assert_eq!(Invalid::TlsRetrySniChanged.code(), "tls_retry_sni_changed");

    // Dropping the name is a change too.
    let no_sni = ClientHello {
        server_name: None,
        ..hello.clone()
    };
    assert_eq!(
        check_second_client_hello(&first, &no_sni),
        Err(Invalid::TlsRetrySniChanged)
    );
    let other_alpn = ClientHello {
        server_name: first.server_name.clone(),
        alpn: vec!["h2".into()],
        ..hello
    };
    assert_eq!(
        check_second_client_hello(&first, &other_alpn),
        Err(Invalid::TlsRetryAlpnChanged)
    );
}

#[test]
fn without_change_cipher_spec_and_after_early_data_the_hello_is_found() {
    let (_, rest) = split(OPENSSL);
    let hello2 = &rest[CCS.len()..];
    assert_eq!(second(hello2).consumed, hello2.len());
    let early = [0x17, 0x03, 0x03, 0x00, 0x03, 0xaa, 0xbb, 0xcc];
    let with_early = [CCS, &early, &early, hello2].concat();
    assert_eq!(second(&with_early).consumed, with_early.len());
    assert_decided_at(&with_early, with_early.len(), peek_second_client_hello);
}

#[test]
fn anything_else_before_the_second_client_hello_is_refused() {
    let (_, rest) = split(OPENSSL);
    let hello2 = &rest[CCS.len()..];
    let cases: [(&[u8], Invalid); 5] = [
        (
            &[0x14, 0x03, 0x03, 0x00, 0x01, 0x02],
            Invalid::TlsBadChangeCipherSpec,
        ),
        (
            &[0x14, 0x03, 0x03, 0x00, 0x02, 0x01, 0x01],
            Invalid::TlsBadChangeCipherSpec,
        ),
        (
            &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
            Invalid::TlsNotHandshakeRecord { content_type: 0x15 },
        ),
        (
            &[0x14, 0x02, 0x00, 0x00, 0x01, 0x01],
            Invalid::TlsRecordVersion { version: 0x0200 },
        ),
        (
            &[0x17, 0x03, 0x03, 0x00, 0x00],
            Invalid::TlsRecordTooLong { len: 0 },
        ),
    ];
    for (before, invalid) in cases {
        let buf = [before, hello2].concat();
        assert_eq!(
            peek_second_client_hello(&buf),
            Peek::Invalid(invalid),
            "{before:02x?}"
        );
    }
    // Not a ClientHello at all: the first peeker's reasons.
    let server_hello_from_client = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
    assert_eq!(
        peek_second_client_hello(&server_hello_from_client),
        Peek::Invalid(Invalid::TlsNotClientHello { handshake_type: 2 })
    );
}

proptest! {
    #[test]
    fn arbitrary_and_mutated_answers_never_panic_and_stay_monotonic(
        index in 0usize..4,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        noise in proptest::collection::vec(any::<u8>(), 0..300),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut buf = match index {
            0 => HRR.to_vec(),
            1 => SERVER_HELLO.to_vec(),
            2 => split(CURL).1.to_vec(),
            _ => noise,
        };
        for (at, byte) in edits {
            if !buf.is_empty() {
                let at = at.index(buf.len());
                buf[at] = byte;
            }
        }
        let cut = cut.index(buf.len() + 1);
        for peek in [
            |b: &[u8]| format!("{:?}", peek_server_first(b)),
            |b: &[u8]| format!("{:?}", peek_second_client_hello(b)),
        ] {
            let prefix = peek(&buf[..cut]);
            if prefix != format!("{:?}", Peek::<()>::Incomplete) {
                prop_assert_eq!(prefix, peek(&buf), "cut at {}", cut);
            }
        }
    }
}
