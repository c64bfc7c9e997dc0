//! Tests over real client captures (`testdata/`, see its README) and properties every peeker
//! must have: each prefix is incomplete until the message is whole, then the answer never changes.

use std::fmt::Debug;

use serde_json::Value;

use super::http::{peek_request_head, RequestHead};
use super::postgres::{peek_first_message, FirstMessage, PgMessage};
use super::tls::{peek_client_hello, ClientHello};
use super::*;

macro_rules! fixtures {
    ($($path:literal,)*) => {
        &[$(($path, include_bytes!(concat!("testdata/", $path)))),*]
    };
}

pub(super) const FIXTURES: &[(&str, &[u8])] = fixtures![
    "http/chromium-156-navigation-origin-form.bin",
    "http/curl-7.88.1-absolute-form-via-proxy.bin",
    "http/curl-7.88.1-connect-api.example.test-443.bin",
    "http/curl-7.88.1-host-header-override-evil.example.test.bin",
    "http/curl-7.88.1-http1.1-with-h2c-upgrade.bin",
    "http/curl-7.88.1-http2-prior-knowledge-preface-not-http1.bin",
    "http/curl-7.88.1-ipv6-literal-host.bin",
    "http/curl-7.88.1-origin-form-host-with-port.bin",
    "http/curl-7.88.1-post-json-head-plus-12-byte-body.bin",
    "http/node-20.20.2-http-get-origin-form.bin",
    "http/python-3.11-urllib-origin-form.bin",
    "http/wget-1.21.3-origin-form.bin",
    "postgres/pg8000-1.31.6-default-sslrequest-then-startup.bin",
    "postgres/pg8000-1.31.6-ssl-context-clienthello-after-S-sni-db.example.test.bin",
    "postgres/psql-15-application_name-orders-api-startup-v3.0.bin",
    "postgres/psql-15-cancelrequest-pid-4242-key-6210279.bin",
    "postgres/psql-15-default-sslmode-prefer-sslrequest-then-startup.bin",
    "postgres/psql-15-gssencmode-prefer-sslmode-disable-with-krb5-ticket-gssencrequest-startup.bin",
    "postgres/psql-15-replication-database-startup-v3.0.bin",
    "postgres/psql-15-sslmode-disable-startup-v3.0.bin",
    "postgres/psql-15-sslmode-require-1-sslrequest.bin",
    "postgres/psql-15-sslmode-require-2-clienthello-after-S-sni-db.example.test.bin",
    "postgres/psql-15-sslmode-require-full-client-bytes.bin",
    "postgres/psql-15-sslmode-require-host-ip-clienthello-after-S-nosni.bin",
    "postgres/psql-15-startup-then-simple-query-pg_sleep.bin",
    "postgres/psycopg-3.3.9-libpq-18-default-sslrequest-then-startup.bin",
    "postgres/psycopg-3.3.9-libpq-18-sslmode-require-clienthello-after-S-alpn-postgresql-pq.bin",
    "postgres/psycopg-3.3.9-libpq-18-sslmode-require-full-client-bytes.bin",
    "tls/chromium-156-pq-x25519mlkem768-ech-grease-sni-api.example.test-1924B.bin",
    "tls/curl-7.88.1-default-sni-api.example.test-alpn-h2-http1.1.bin",
    "tls/curl-7.88.1-http1.1-sni-api.example.test-alpn-http1.1.bin",
    "tls/curl-7.88.1-http2-sni-api.example.test-alpn-h2-http1.1.bin",
    "tls/curl-7.88.1-ip-literal-nosni-alpn-h2-http1.1.bin",
    "tls/java-17.0.15-httpsurlconnection-sni-api.example.test.bin",
    "tls/java-17.0.15-java.net.http.HttpClient-sni-api.example.test-alpn-h2-http1.1.bin",
    "tls/node-20.20.2-https-get-sni-api.example.test.bin",
    "tls/openssl-3.0.22-s_client-noservername-nosni.bin",
    "tls/openssl-3.0.22-s_client-sni-api.example.test.bin",
    "tls/openssl-3.0.22-s_client-tls1_2-only-sni-api.example.test.bin",
    "tls/python-3.11-ssl-wrap_socket-sni-api.example.test.bin",
    "tls/python-3.11-urllib-sni-api.example.test-alpn-http1.1.bin",
    "tls/rustls-0.23.46-ech-grease-sni-api.example.test.bin",
    "tls/rustls-0.23.46-pq-x25519mlkem768-sni-api.example.test-alpn-h2-http1.1.bin",
];

const CHROMIUM: &str =
    "tls/chromium-156-pq-x25519mlkem768-ech-grease-sni-api.example.test-1924B.bin";

fn fixture(path: &str) -> &'static [u8] {
    match FIXTURES.iter().find(|(p, _)| *p == path) {
        Some((_, bytes)) => bytes,
        None => panic!("no fixture {path}"),
    }
}

fn manifest() -> Vec<Value> {
    serde_json::from_str(include_str!("testdata/manifest.json")).expect("manifest.json parses")
}

/// Manifest entries whose parse result has the given `kind` (`tls`, `http`, `postgres`).
fn entries(kind: &str) -> Vec<(&'static str, &'static [u8], Value)> {
    let entries: Vec<_> = manifest()
        .into_iter()
        .filter(|e| e["parsed"]["kind"] == kind)
        .map(|e| {
            let path = e["file"].as_str().expect("file is a string");
            let (path, bytes) = FIXTURES.iter().find(|(p, _)| *p == path).expect("fixture");
            (*path, *bytes, e["parsed"].clone())
        })
        .collect();
    assert!(!entries.is_empty(), "no {kind} entries");
    entries
}

/// linkerd's `check_all_prefixes`: every prefix shorter than the point of decision is
/// `Incomplete`; from there on every prefix gives the full input's answer. For `Complete`, that
/// point is exactly `consumed`.
fn check_all_prefixes<T: Debug + PartialEq>(
    name: &str,
    buf: &[u8],
    peek: impl Fn(&[u8]) -> Peek<T>,
    consumed: impl Fn(&T) -> Option<usize>,
) -> Peek<T> {
    let full = peek(buf);
    assert_ne!(full, Peek::Incomplete, "{name}: whole input is incomplete");
    let mut decided_at = None;
    for end in 0..=buf.len() {
        let answer = peek(&buf[..end]);
        match decided_at {
            None if answer == Peek::Incomplete => {}
            None => {
                assert_eq!(answer, full, "{name}: prefix {end} decides differently");
                decided_at = Some(end);
            }
            Some(_) => assert_eq!(answer, full, "{name}: prefix {end} changes the answer"),
        }
    }
    if let Some(consumed) = match &full {
        Peek::Complete(value) => consumed(value),
        _ => None,
    } {
        assert_eq!(
            decided_at,
            Some(consumed),
            "{name}: completes before consumed"
        );
    }
    full
}

fn tls_consumed(hello: &ClientHello) -> Option<usize> {
    Some(hello.consumed)
}

fn http_consumed(head: &RequestHead) -> Option<usize> {
    Some(head.consumed)
}

fn pg_consumed(message: &FirstMessage) -> Option<usize> {
    Some(message.consumed)
}

/// The ClientHello a TLS manifest entry describes.
fn expected_hello(parsed: &Value) -> ClientHello {
    let strings = |v: &Value| -> Vec<String> {
        let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
        list.iter()
            .map(|s| s.as_str().expect("string").to_owned())
            .collect()
    };
    assert_eq!(parsed["legacy_version"], "TLS1.2");
    let total = parsed["total_bytes"].as_u64().expect("total_bytes");
    let trailing = parsed["trailing_bytes_after_clienthello_records"]
        .as_u64()
        .expect("trailing");
    ClientHello {
        server_name: parsed["sni"].as_str().map(|sni| sni.parse().expect(sni)),
        alpn: strings(&parsed["alpn"]),
        ech_offered: !parsed["ech"].is_null(),
        legacy_version: 0x0303,
        consumed: (total - trailing) as usize,
    }
}

#[test]
fn every_fixture_is_in_the_manifest_with_its_size() {
    let manifest = manifest();
    assert_eq!(manifest.len(), FIXTURES.len());
    for (path, bytes) in FIXTURES {
        let entry = manifest
            .iter()
            .find(|e| e["file"] == *path)
            .expect("manifest entry");
        assert_eq!(entry["size"].as_u64(), Some(bytes.len() as u64), "{path}");
    }
}

#[test]
fn every_tls_fixture_parses_to_the_manifest() {
    let entries = entries("tls");
    assert_eq!(
        entries.len(),
        19,
        "15 TLS clients + 4 PostgreSQL ClientHellos after S"
    );
    for (path, bytes, parsed) in entries {
        let hello = check_all_prefixes(path, bytes, peek_client_hello, tls_consumed);
        assert_eq!(hello, Peek::Complete(expected_hello(&parsed)), "{path}");
        assert_eq!(
            sniff(bytes),
            Peek::Complete(Sniffed::TlsHandshake),
            "{path}"
        );
    }
}

#[test]
fn chromium_hello_has_sni_alpn_and_grease_ech() {
    let expected = ClientHello {
        server_name: Some("api.example.test".parse().expect("valid")),
        alpn: vec!["h2".into(), "http/1.1".into()],
        ech_offered: true,
        legacy_version: 0x0303,
        consumed: 1924,
    };
    assert_eq!(
        peek_client_hello(fixture(CHROMIUM)),
        Peek::Complete(expected)
    );
}

#[test]
fn chromium_hello_split_1448_plus_476_needs_the_second_read() {
    let bytes = fixture(CHROMIUM);
    assert_eq!(bytes.len(), 1448 + 476);
    assert_eq!(peek_client_hello(&bytes[..1448]), Peek::Incomplete);
    assert!(matches!(peek_client_hello(bytes), Peek::Complete(h) if h.consumed == 1924));
}

/// Re-frames a one-record ClientHello into records of at most `size` bytes.
pub(super) fn reframe(record: &[u8], size: usize, version: [u8; 2]) -> Vec<u8> {
    let payload = &record[5..];
    assert_eq!(
        usize::from(u16::from_be_bytes([record[3], record[4]])),
        payload.len()
    );
    let mut out = Vec::new();
    for chunk in payload.chunks(size) {
        out.extend_from_slice(&[0x16, version[0], version[1]]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn client_hello_split_into_small_records_gives_the_same_answer() {
    for (path, bytes, parsed) in entries("tls") {
        for size in [1, 7, 512] {
            let framed = reframe(bytes, size, [0x03, 0x01]);
            let mut expected = expected_hello(&parsed);
            expected.consumed = framed.len();
            assert_eq!(
                peek_client_hello(&framed),
                Peek::Complete(expected),
                "{path} / {size}"
            );
        }
    }
    let framed = reframe(fixture(CHROMIUM), 7, [0x03, 0x03]);
    check_all_prefixes("chromium/7", &framed, peek_client_hello, tls_consumed);
}

#[test]
fn bytes_after_the_client_hello_are_left_to_the_caller() {
    let mut bytes = fixture(CHROMIUM).to_vec();
    bytes.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]); // change_cipher_spec
    bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x02, 0xab, 0xcd]); // early data
    assert!(matches!(peek_client_hello(&bytes), Peek::Complete(h) if h.consumed == 1924));
}

/// What each HTTP capture must give: (file, method, target, minor, host, port, consumed), or the
/// Invalid it must give.
#[test]
fn every_http_fixture_parses_to_the_manifest() {
    type Expected = Result<(&'static str, Option<u16>), Invalid>;
    let api = |port| Ok(("api.example.test", port));
    let table: &[(&str, Expected)] = &[
        (
            "http/chromium-156-navigation-origin-form.bin",
            api(Some(18080)),
        ),
        ("http/curl-7.88.1-absolute-form-via-proxy.bin", api(None)),
        (
            "http/curl-7.88.1-connect-api.example.test-443.bin",
            Err(Invalid::HttpConnect),
        ),
        (
            "http/curl-7.88.1-host-header-override-evil.example.test.bin",
            Ok(("evil.example.test", None)),
        ),
        (
            "http/curl-7.88.1-http1.1-with-h2c-upgrade.bin",
            api(Some(18080)),
        ),
        (
            "http/curl-7.88.1-ipv6-literal-host.bin",
            Ok(("::1", Some(18080))),
        ),
        (
            "http/curl-7.88.1-origin-form-host-with-port.bin",
            api(Some(18080)),
        ),
        (
            "http/curl-7.88.1-post-json-head-plus-12-byte-body.bin",
            api(Some(18080)),
        ),
        (
            "http/node-20.20.2-http-get-origin-form.bin",
            api(Some(18080)),
        ),
        ("http/python-3.11-urllib-origin-form.bin", api(Some(18080))),
        ("http/wget-1.21.3-origin-form.bin", api(Some(18080))),
    ];
    let entries = entries("http");
    assert_eq!(entries.len(), 12);
    for (path, bytes, parsed) in entries {
        let answer = check_all_prefixes(path, bytes, peek_request_head, http_consumed);
        if parsed["http2_prior_knowledge"] == true {
            assert_eq!(answer, Peek::Invalid(Invalid::Http2Preface), "{path}");
            assert_eq!(
                sniff(bytes),
                Peek::Complete(Sniffed::Http2Preface),
                "{path}"
            );
            continue;
        }
        assert_eq!(sniff(bytes), Peek::Complete(Sniffed::Http1), "{path}");
        let (_, expected) = table.iter().find(|(p, _)| *p == path).expect("table row");
        let (host, port) = match expected {
            Ok(host_port) => *host_port,
            Err(invalid) => {
                assert_eq!(answer, Peek::Invalid(invalid.clone()), "{path}");
                continue;
            }
        };
        let version = parsed["version"].as_str().expect("version");
        let expected = RequestHead {
            version_minor: if version == "HTTP/1.1" { 1 } else { 0 },
            host: Some(match host.parse::<std::net::IpAddr>() {
                Ok(ip) => http::Host::Ip(ip),
                Err(_) => http::Host::Name(host.parse().expect(host)),
            }),
            host_port: port,
            consumed: parsed["head_bytes"].as_u64().expect("head_bytes") as usize,
        };
        assert_eq!(answer, Peek::Complete(expected), "{path}");
    }
}

/// The message a PostgreSQL manifest message describes.
fn expected_pg(message: &Value) -> FirstMessage {
    let code = message["code"].as_u64().expect("code");
    let consumed = message["length"].as_u64().expect("length") as usize;
    let message = match code {
        80877103 => PgMessage::SslRequest,
        80877104 => PgMessage::GssEncRequest,
        80877102 => PgMessage::CancelRequest {
            process_id: message["pid"].as_u64().expect("pid") as u32,
            secret_key: (message["secret"].as_u64().expect("secret") as u32)
                .to_be_bytes()
                .to_vec(),
        },
        code => {
            let params = message["params"].as_object().expect("params");
            let param = |name: &str| params.get(name).and_then(Value::as_str).map(str::to_owned);
            PgMessage::Startup(postgres::Startup {
                protocol_major: (code >> 16) as u16,
                protocol_minor: (code & 0xffff) as u16,
                user: param("user").expect("user"),
                database: param("database").expect("database"),
                replication: param("replication"),
                application_name: param("application_name"),
                parameters: Vec::new(), // compared separately: the manifest's order is lost
            })
        }
    };
    FirstMessage { message, consumed }
}

#[test]
fn every_postgres_fixture_parses_message_by_message() {
    let entries = entries("postgres");
    assert_eq!(entries.len(), 12);
    for (path, bytes, parsed) in entries {
        assert_eq!(sniff(bytes), Peek::Complete(Sniffed::Postgres), "{path}");
        let messages = parsed["messages"].as_array().expect("messages");
        let mut offset = 0;
        for message in messages {
            assert_eq!(message["offset"].as_u64(), Some(offset as u64), "{path}");
            let rest = &bytes[offset..];
            if message["name"] == "TLS ClientHello" {
                let Peek::Complete(hello) = peek_client_hello(rest) else {
                    panic!("{path}: no ClientHello at {offset}");
                };
                assert_eq!(
                    hello.server_name.as_deref(),
                    message["sni"].as_str(),
                    "{path}"
                );
                let alpn: Vec<&str> = hello.alpn.iter().map(String::as_str).collect();
                let want: Vec<&str> = message["alpn"]
                    .as_array()
                    .map_or(vec![], |a| a.iter().filter_map(Value::as_str).collect());
                assert_eq!(alpn, want, "{path}");
                offset += hello.consumed;
                continue;
            }
            if message.get("tag").is_some() {
                break; // a regular message after the startup: past the peek
            }
            let name = format!("{path}@{offset}");
            let answer = check_all_prefixes(&name, rest, peek_first_message, pg_consumed);
            let Peek::Complete(mut got) = answer else {
                panic!("{name}: {answer:?}");
            };
            if let PgMessage::Startup(startup) = &mut got.message {
                let mut params = std::mem::take(&mut startup.parameters);
                params.sort();
                let mut want: Vec<(String, String)> = message["params"]
                    .as_object()
                    .expect("params")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("value").to_owned()))
                    .collect();
                want.sort();
                assert_eq!(params, want, "{name}");
            }
            assert_eq!(got, expected_pg(message), "{name}");
            offset += got.consumed;
        }
    }
}

#[test]
fn psql_sslrequest_then_client_hello_for_db_example_test() {
    let bytes = fixture("postgres/psql-15-sslmode-require-full-client-bytes.bin");
    let first = FirstMessage {
        message: PgMessage::SslRequest,
        consumed: 8,
    };
    assert_eq!(peek_first_message(bytes), Peek::Complete(first));
    assert_eq!(sniff(&bytes[8..]), Peek::Complete(Sniffed::TlsHandshake));
    let Peek::Complete(hello) = peek_client_hello(&bytes[8..]) else {
        panic!("no ClientHello after SSLRequest");
    };
    assert_eq!(hello.server_name.as_deref(), Some("db.example.test"));
    assert_eq!(8 + hello.consumed, bytes.len());
}

#[test]
fn psql_cancel_request_carries_pid_and_key() {
    let bytes = fixture("postgres/psql-15-cancelrequest-pid-4242-key-6210279.bin");
    let message = PgMessage::CancelRequest {
        process_id: 4242,
        secret_key: vec![0, 0x5e, 0xc2, 0xe7],
    };
    assert_eq!(
        peek_first_message(bytes),
        Peek::Complete(FirstMessage {
            message,
            consumed: 16
        })
    );
}

#[test]
fn psql_replication_startup_names_user_database_and_mode() {
    let bytes = fixture("postgres/psql-15-replication-database-startup-v3.0.bin");
    let Peek::Complete(FirstMessage {
        message: PgMessage::Startup(s),
        consumed: 77,
    }) = peek_first_message(bytes)
    else {
        panic!("not a startup");
    };
    assert_eq!((s.user.as_str(), s.database.as_str()), ("app", "orders"));
    assert_eq!(s.replication.as_deref(), Some("database"));
    assert_eq!(s.application_name.as_deref(), Some("psql"));
    assert_eq!((s.protocol_major, s.protocol_minor), (3, 0));
}

#[test]
fn sniff_decides_only_when_it_can() {
    assert_eq!(sniff(b""), Peek::Incomplete);
    assert_eq!(sniff(&[0x16]), Peek::Incomplete);
    assert_eq!(sniff(&[0x16, 0x03]), Peek::Complete(Sniffed::TlsHandshake));
    assert_eq!(sniff(&[0x16, 0x10]), Peek::Complete(Sniffed::Unknown));
    assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Peek::Incomplete);
    assert_eq!(
        sniff(b"PRI /x HTTP/1.1\r\n"),
        Peek::Complete(Sniffed::Http1)
    );
    for method in [
        "GET",
        "POST",
        "PUT",
        "HEAD",
        "DELETE",
        "OPTIONS",
        "PATCH",
        "TRACE",
        "CONNECT",
        "MKCALENDAR",
    ] {
        assert_eq!(sniff(method.as_bytes()), Peek::Incomplete, "{method}");
        let line = format!("{method} / HTTP/1.1\r\n");
        assert_eq!(
            sniff(line.as_bytes()),
            Peek::Complete(Sniffed::Http1),
            "{method}"
        );
    }
    assert_eq!(sniff(b" GET /"), Peek::Complete(Sniffed::Unknown));
    assert_eq!(
        sniff(b"SSH-2.0-OpenSSH_9.2\r\n"),
        Peek::Complete(Sniffed::Unknown)
    );
    assert_eq!(sniff(&[b'A'; 40]), Peek::Complete(Sniffed::Unknown));
    assert_eq!(
        sniff(&[0x00, 0x00, 0x00, 0x08, 0x04, 0xd2]),
        Peek::Incomplete
    );
    assert_eq!(
        sniff(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]),
        Peek::Complete(Sniffed::Postgres)
    );
    assert_eq!(
        sniff(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]),
        Peek::Complete(Sniffed::Postgres)
    );
    assert_eq!(
        sniff(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]),
        Peek::Complete(Sniffed::Postgres)
    );
    assert_eq!(
        sniff(&[0, 0, 0, 9, 0x00, 0x03, 0x00, 0x02]),
        Peek::Complete(Sniffed::Postgres)
    );
    assert_eq!(
        sniff(&[0, 0, 0, 9, 0x00, 0x04, 0x00, 0x00]),
        Peek::Complete(Sniffed::Unknown)
    );
    assert_eq!(
        sniff(&[0, 0, 0, 4, 0x00, 0x03, 0x00, 0x00]),
        Peek::Complete(Sniffed::Unknown)
    );
    assert_eq!(sniff(&[0, 1]), Peek::Complete(Sniffed::Unknown));
    assert_eq!(sniff(&[0x80, 0x2e]), Peek::Complete(Sniffed::Unknown));
    for (path, bytes) in FIXTURES {
        check_all_prefixes(path, bytes, sniff, |_| None); // sniff consumes nothing
    }
}
