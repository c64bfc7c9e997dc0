//! Unit tests for `tls`: built ClientHellos and mutated captures, one per `Invalid` variant.

use super::*;

const CURL: &[u8] =
    include_bytes!("testdata/tls/curl-7.88.1-default-sni-api.example.test-alpn-h2-http1.1.bin");
const OPENSSL: &[u8] =
    include_bytes!("testdata/tls/openssl-3.0.22-s_client-sni-api.example.test.bin");

fn vec16(data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

fn ext(extension_type: u16, data: &[u8]) -> Vec<u8> {
    [&extension_type.to_be_bytes()[..], &vec16(data)].concat()
}

fn sni(names: &[(u8, &[u8])]) -> Vec<u8> {
    let list: Vec<u8> = names
        .iter()
        .flat_map(|(t, n)| [&[*t][..], &vec16(n)].concat())
        .collect();
    ext(EXT_SERVER_NAME, &vec16(&list))
}

fn alpn_ext(names: &[&[u8]]) -> Vec<u8> {
    let list: Vec<u8> = names
        .iter()
        .flat_map(|n| [&[n.len() as u8][..], n].concat())
        .collect();
    ext(EXT_ALPN, &vec16(&list))
}

/// A minimal TLS 1.3-shaped ClientHello body with the given extensions.
fn body(extensions: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![0x03, 0x03];
    b.extend_from_slice(&[0x5a; RANDOM_LEN]);
    b.push(0); // legacy_session_id
    b.extend_from_slice(&vec16(&[0x13, 0x01]));
    b.extend_from_slice(&[0x01, 0x00]); // legacy_compression_methods: null
    b.extend_from_slice(&vec16(&extensions.concat()));
    b
}

fn handshake(body: &[u8]) -> Vec<u8> {
    let len = (body.len() as u32).to_be_bytes();
    [&[HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]][..], body].concat()
}

fn record(payload: &[u8]) -> Vec<u8> {
    [&[0x16, 0x03, 0x01][..], &vec16(payload)].concat()
}

fn hello(extensions: &[Vec<u8>]) -> Vec<u8> {
    record(&handshake(&body(extensions)))
}

fn invalid(buf: &[u8]) -> Invalid {
    match peek_client_hello(buf) {
        Peek::Invalid(invalid) => invalid,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn complete(buf: &[u8]) -> ClientHello {
    match peek_client_hello(buf) {
        Peek::Complete(hello) => hello,
        other => panic!("expected Complete, got {other:?}"),
    }
}

#[test]
fn sni_is_lowercased_without_trailing_dot_and_alpn_and_ech_are_read() {
    let buf = hello(&[
        sni(&[(0, b"API.Example.Test.")]),
        alpn_ext(&[b"h2", b"\xff"]),
        ext(EXT_ENCRYPTED_CLIENT_HELLO, &[0, 1, 2]),
    ]);
    let hello = complete(&buf);
    assert_eq!(hello.server_name.as_deref(), Some("api.example.test"));
    assert_eq!(hello.alpn, ["h2", "\u{fffd}"]);
    assert!(hello.ech_offered);
    assert_eq!((hello.legacy_version, hello.consumed), (0x0303, buf.len()));
}

#[test]
fn sni_without_host_name_is_complete_with_no_name() {
    let hello = complete(&hello(&[sni(&[(0x01, b"opaque")])]));
    assert_eq!(hello.server_name, None);
}

#[test]
fn tls12_hello_without_extensions_block_is_accepted() {
    let mut b = body(&[]);
    b.truncate(b.len() - 2);
    assert_eq!(complete(&record(&handshake(&b))).server_name, None);
}

#[test]
fn duplicate_sni_host_name_rejected() {
    let buf = hello(&[sni(&[(0, b"a.example"), (0, b"b.example")])]);
    assert_eq!(invalid(&buf), Invalid::TlsDuplicateSniHostName);
}

#[test]
fn duplicate_extension_rejected() {
    let buf = hello(&[
        alpn_ext(&[b"h2"]),
        sni(&[(0, b"a.example")]),
        alpn_ext(&[b"h2"]),
    ]);
    assert_eq!(
        invalid(&buf),
        Invalid::TlsDuplicateExtension {
            extension_type: EXT_ALPN
        }
    );
}

/// Past the first `SeenExtensions::FEW` types the check goes on in a set: a repeat of an
/// early type, and of a late one, are both found.
#[test]
fn duplicate_extension_after_many_rejected() {
    let many: Vec<Vec<u8>> = (0x1000..0x1000 + 2 * SeenExtensions::FEW as u16)
        .map(|extension_type| ext(extension_type, &[]))
        .collect();
    let accepted = hello(&many);
    assert!(matches!(peek_client_hello(&accepted), Peek::Complete(_)));
    for repeated in [0x1000, 0x1000 + 2 * SeenExtensions::FEW as u16 - 1] {
        let mut extensions = many.clone();
        extensions.push(ext(repeated, &[]));
        assert_eq!(
            invalid(&hello(&extensions)),
            Invalid::TlsDuplicateExtension {
                extension_type: repeated
            }
        );
    }
}

#[test]
fn duplicate_extension_in_real_hello_rejected() {
    // Turn OpenSSL's ec_point_formats (0x000b, 4 bytes) into a second supported_groups.
    let mut buf = OPENSSL.to_vec();
    let at = buf
        .windows(5)
        .position(|w| w == [0x00, 0x0b, 0x00, 0x04, 0x03])
        .expect("ext");
    buf[at + 1] = 0x0a;
    assert_eq!(
        invalid(&buf),
        Invalid::TlsDuplicateExtension {
            extension_type: 0x000a
        }
    );
}

#[test]
fn nul_in_real_sni_rejected() {
    let mut buf = CURL.to_vec();
    let at = buf
        .windows(16)
        .position(|w| w == b"api.example.test")
        .expect("sni");
    buf[at + 3] = 0x00;
    let reason = "byte outside [A-Za-z0-9_-] in a label";
    assert_eq!(invalid(&buf), Invalid::TlsSniNotDnsName { reason });
}

#[test]
fn ip_literal_sni_rejected() {
    for name in [&b"127.0.0.1"[..], b"10.1.2.3.", b"::1", b"fe80::1"] {
        assert_eq!(
            invalid(&hello(&[sni(&[(0, name)])])),
            Invalid::TlsSniIpLiteral
        );
    }
    let reason = "all-numeric last label";
    assert_eq!(
        invalid(&hello(&[sni(&[(0, b"127.1")])])),
        Invalid::TlsSniNotDnsName { reason }
    );
}

#[test]
fn sni_labels_must_be_1_to_63_bytes() {
    let ok = format!("{}.example", "a".repeat(63));
    assert!(complete(&hello(&[sni(&[(0, ok.as_bytes())])]))
        .server_name
        .is_some());
    let long = format!("{}.example", "a".repeat(64));
    let reason = "label longer than 63 bytes";
    assert_eq!(
        invalid(&hello(&[sni(&[(0, long.as_bytes())])])),
        Invalid::TlsSniNotDnsName { reason }
    );
    for (name, reason) in [
        (&b"a..example"[..], "empty label"),
        (b".", "empty name"),
        (b"-a.example", "label starts or ends with '-'"),
        (b"a b.example", "byte outside [A-Za-z0-9_-] in a label"),
    ] {
        assert_eq!(
            invalid(&hello(&[sni(&[(0, name)])])),
            Invalid::TlsSniNotDnsName { reason }
        );
    }
}

#[test]
fn malformed_server_name_and_alpn_rejected() {
    let malformed = Invalid::TlsMalformed {
        field: "server_name",
    };
    assert_eq!(invalid(&hello(&[ext(EXT_SERVER_NAME, &[])])), malformed);
    assert_eq!(invalid(&hello(&[ext(EXT_SERVER_NAME, &[0, 0])])), malformed);
    assert_eq!(
        invalid(&hello(&[ext(EXT_SERVER_NAME, &[0, 4, 0, 0, 9, b'a'])])),
        malformed
    );
    let alpn = |reason| Invalid::TlsAlpnMalformed { reason };
    assert_eq!(
        invalid(&hello(&[alpn_ext(&[b""])])),
        alpn("empty protocol name")
    );
    assert_eq!(
        invalid(&hello(&[alpn_ext(&[])])),
        alpn("empty protocol_name_list")
    );
    let extra = ext(EXT_ALPN, &[0, 3, 2, b'h', b'2', 0xff]);
    assert_eq!(
        invalid(&hello(&[extra])),
        alpn("bytes after protocol_name_list")
    );
    let short = ext(EXT_ALPN, &[0, 3, 5, b'h', b'2']);
    assert_eq!(invalid(&hello(&[short])), alpn("truncated protocol name"));
}

#[test]
fn inconsistent_body_lengths_rejected() {
    let mut b = body(&[]);
    b[2 + RANDOM_LEN] = 33; // legacy_session_id longer than the body can hold
    assert!(matches!(
        invalid(&record(&handshake(&b))),
        Invalid::TlsMalformed { .. }
    ));
    let mut b = body(&[sni(&[(0, b"a.example")])]);
    b.push(0); // a byte after the extensions block
    let field = "extensions";
    assert_eq!(
        invalid(&record(&handshake(&b))),
        Invalid::TlsMalformed { field }
    );
    let mut b = body(&[]);
    b[2 + RANDOM_LEN + 2] = 1; // cipher_suites of odd length
    assert!(matches!(
        invalid(&record(&handshake(&b))),
        Invalid::TlsMalformed { .. }
    ));
    let mut b = body(&[]);
    b[0] = 0x02;
    assert_eq!(
        invalid(&record(&handshake(&b))),
        Invalid::TlsClientVersion { version: 0x0203 }
    );
}

#[test]
fn record_layer_faults_rejected_as_soon_as_visible() {
    let buf = hello(&[]);
    assert_eq!(
        invalid(&[0x17]),
        Invalid::TlsNotHandshakeRecord { content_type: 0x17 }
    );
    assert_eq!(
        invalid(&[0x16, 0x02, 0x00]),
        Invalid::TlsRecordVersion { version: 0x0200 }
    );
    assert_eq!(
        invalid(&[0x16, 0x03, 0x05]),
        Invalid::TlsRecordVersion { version: 0x0305 }
    );
    assert_eq!(invalid(&[0x16, 0x03, 0x01, 0, 0]), Invalid::TlsEmptyRecord);
    assert_eq!(
        invalid(&[0x16, 0x03, 0x01, 0x40, 0x01]),
        Invalid::TlsRecordTooLong { len: 0x4001 }
    );
    assert_eq!(
        invalid(&[0x16, 0x03, 0x01, 0, 9, 0x02]),
        Invalid::TlsNotClientHello { handshake_type: 2 }
    );
    let too_long = [0x16, 0x03, 0x01, 0, 9, 0x01, 0x01, 0x00, 0x01];
    let max = MAX_HANDSHAKE_LEN;
    assert_eq!(
        invalid(&too_long),
        Invalid::TlsHandshakeTooLong { len: 0x10001, max }
    );
    let mut java = buf.clone();
    java[2] = 0x03; // Java's record version 0x0303 is fine
    assert!(matches!(peek_client_hello(&java), Peek::Complete(_)));
    // An alert record between two fragments of the hello.
    let framed: Vec<u8> = [record(&buf[5..20]), vec![0x15, 0x03, 0x03, 0, 2, 2, 40]].concat();
    assert_eq!(
        invalid(&framed),
        Invalid::TlsNotHandshakeRecord { content_type: 0x15 }
    );
}

#[test]
fn handshake_bytes_after_the_hello_in_its_record_rejected() {
    let mut payload = hello(&[])[5..].to_vec();
    payload.extend_from_slice(&[0x01, 0x00]);
    assert_eq!(
        invalid(&record(&payload)),
        Invalid::TlsTrailingHandshakeBytes { len: 2 }
    );
}
