//! Bypass suite, PostgreSQL: a pod allowed only database `orders` as user `app` in the clear
//! tries to reach another database (or hide which one) with a crafted first message. The
//! server's own log (`log_connections = on`) shows which sessions it authorised.

use egressgate_lab::{addr, Decision, GatewayOptions, Lab, Output};

use crate::bypass_support::{
    assert_blocked, assert_reply_starts, one_byte_segments, pg_message, pg_request, pg_startup,
    send_and_wait, send_once, send_raw, Hello, PG_GSSENC_REQUEST, PG_PROTOCOL_3, PG_SSL_REQUEST,
    PYTHON_HELLO,
};
use crate::postgres::ORDERS_POLICY;
use crate::support::dig;

/// Short, so that a startup that never completes is decided quickly.
const PEEK_TIMEOUT_MS: u64 = 2000;

fn lab() -> Lab {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .postgres()
        .gateway(GatewayOptions {
            peek_timeout_ms: PEEK_TIMEOUT_MS,
            ..GatewayOptions::default().policy("db.yaml", ORDERS_POLICY)
        })
        .start()
        .expect("lab starts");
    assert!(dig(&lab, "a", addr::DB_NAME, &[]).contains(&addr::DB.to_owned()));
    lab
}

fn pg(lab: &Lab, bytes: &[u8]) -> (Output, Decision) {
    send_once(lab, "a", addr::DB, 5432, bytes)
}

/// The PostgreSQL server's log.
fn server_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir().join("postgres.stderr")).unwrap_or_default()
}

/// Connections the server accepted from the gateway (which connects from the node's address).
fn server_connections(lab: &Lab) -> usize {
    server_log(lab)
        .matches(&format!("connection received: host={} ", addr::NODE_UP))
        .count()
}

/// Asserts the server never authorised a session for database `other`.
fn assert_no_session_for_other(lab: &Lab) {
    let log = server_log(lab);
    assert!(
        !log.contains("database=other"),
        "the server opened a session on database other:\n{log}"
    );
}

/// Sends `bytes` and asserts a deny with `reason`/`detail` and no connection to the server.
fn blocked(lab: &Lab, bytes: &[u8], reason: &str, detail: Option<&str>) -> Decision {
    let before = server_connections(lab);
    let (out, d) = pg(lab, bytes);
    assert_blocked(lab, &out, &d, reason, detail);
    assert_eq!(
        server_connections(lab),
        before,
        "the server saw a connection for a denied startup: {d}"
    );
    d
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    pg_startup(PG_PROTOCOL_3, params)
}

/// A server reply that begins with AuthenticationOk (`R`, length 8, 0): the session opened.
fn assert_session_opened(out: &Output, d: &Decision) {
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("allow"), Some("allowed")),
        "{d}\n{out}"
    );
    assert_reply_starts(out, "520000000800000000");
}

#[test]
fn duplicate_parameters_and_case_tricks_are_denied() {
    let lab = lab();
    let dup = Some("pg_duplicate_parameter");
    for params in [
        [
            ("user", "app"),
            ("database", "orders"),
            ("database", "other"),
        ],
        [
            ("user", "app"),
            ("database", "other"),
            ("database", "orders"),
        ],
        [
            ("user", "app"),
            ("user", "intruder"),
            ("database", "orders"),
        ],
    ] {
        blocked(&lab, &startup(&params), "malformed", dup);
    }
    // Names are compared exactly, as the server does.
    let d = blocked(
        &lab,
        &startup(&[("user", "app"), ("database", "Orders")]),
        "postgresql_denied",
        None,
    );
    assert_eq!(d.database(), Some("Orders"), "{d}");
    blocked(
        &lab,
        &startup(&[("user", "APP"), ("database", "orders")]),
        "postgresql_denied",
        None,
    );
    // No database: the server uses the user name, and so does the gateway.
    let d = blocked(
        &lab,
        &startup(&[("user", "app")]),
        "postgresql_denied",
        None,
    );
    assert_eq!(d.database(), Some("app"), "{d}");
    blocked(
        &lab,
        &startup(&[("database", "orders")]),
        "malformed",
        Some("pg_missing_user"),
    );
    blocked(
        &lab,
        &pg_message(PG_PROTOCOL_3, b"user\0app\0database\0ord\xffers\0\0"),
        "malformed",
        Some("pg_not_utf8"),
    );
    assert_no_session_for_other(&lab);
}

#[test]
fn wrong_lengths_are_denied_or_read_exactly_as_the_server_reads_them() {
    let lab = lab();
    let other = startup(&[("user", "app"), ("database", "other")]);
    // A first message length outside 8..=10000 is no PostgreSQL message at all.
    for len in [4u32, 7, 10_001, 0x7fff_ffff] {
        let mut bytes = other.clone();
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        let d = blocked(&lab, &bytes, "protocol_mismatch", None);
        assert_eq!(d.protocol(), Some("unknown"), "{d}");
    }
    // A length that stops before the terminator.
    let mut cut = other.clone();
    let short = u32::try_from(other.len() - 1).expect("fits");
    cut[..4].copy_from_slice(&short.to_be_bytes());
    blocked(&lab, &cut, "malformed", Some("pg_missing_nul"));
    // Bytes inside the length after the terminator (a second parameter block).
    let mut body = b"user\0app\0database\0orders\0\0".to_vec();
    body.extend_from_slice(b"database\0other\0\0");
    blocked(
        &lab,
        &pg_message(PG_PROTOCOL_3, &body),
        "malformed",
        Some("pg_trailing_bytes"),
    );
    // A length longer than what is sent: the gateway waits for the rest, then gives up.
    let mut long = other.clone();
    let longer = u32::try_from(other.len() + 100).expect("fits");
    long[..4].copy_from_slice(&longer.to_be_bytes());
    let (out, d) = send_and_wait(&lab, "a", addr::DB, 5432, &[long], 0, "5");
    assert_blocked(&lab, &out, &d, "peek_timeout", None);
    assert_eq!(d.database(), None, "{d}");
    // Encryption requests of the wrong length.
    let mut ssl12 = pg_request(PG_SSL_REQUEST);
    ssl12[..4].copy_from_slice(&12u32.to_be_bytes());
    ssl12.extend_from_slice(&[0; 4]);
    blocked(&lab, &ssl12, "malformed", Some("pg_wrong_length"));

    // A startup for orders followed by a second one for other: the gateway reads exactly the
    // declared length, as the server does, so both see database orders; the bytes after it are
    // a protocol message to the server, not a second startup.
    let allowed = startup(&[("user", "app"), ("database", "orders")]);
    let (out, d) = pg(&lab, &[allowed.as_slice(), other.as_slice()].concat());
    assert_session_opened(&out, &d);
    assert_eq!(d.database(), Some("orders"), "{d}");
    assert_no_session_for_other(&lab);
}

#[test]
fn old_and_unknown_protocol_versions_are_denied() {
    let lab = lab();
    // Protocol 2.0's fixed-size startup packet (database[64] user[32] options[64] ...).
    let mut v2 = vec![0u8; 288];
    v2[..5].copy_from_slice(b"other");
    v2[64..67].copy_from_slice(b"app");
    let d = blocked(
        &lab,
        &pg_message(0x0002_0000, &v2),
        "malformed",
        Some("pg_protocol_2"),
    );
    assert_eq!(d.protocol(), Some("postgresql"), "{d}");
    // Protocol 4.0 is no PostgreSQL the gateway knows.
    blocked(
        &lab,
        &pg_startup(0x0004_0000, &[("user", "app"), ("database", "other")]),
        "protocol_mismatch",
        None,
    );
    // An unknown special request code (1234.5681).
    blocked(&lab, &pg_request(0x04d2_1631), "protocol_mismatch", None);
    assert_no_session_for_other(&lab);
}

#[test]
fn a_startup_split_byte_by_byte_is_still_checked() {
    let lab = lab();
    let before = server_connections(&lab);
    let other = startup(&[("user", "app"), ("database", "other")]);
    let (out, d) = send_raw(&lab, "a", addr::DB, 5432, &one_byte_segments(&other), 2);
    assert_blocked(&lab, &out, &d, "postgresql_denied", None);
    assert_eq!(d.database(), Some("other"), "{d}");
    assert_eq!(server_connections(&lab), before);

    // The allowed startup, byte by byte: parsed, allowed, and the server opens the session.
    let orders = startup(&[("user", "app"), ("database", "orders")]);
    let (out, d) = send_raw(&lab, "a", addr::DB, 5432, &one_byte_segments(&orders), 2);
    assert_session_opened(&out, &d);
    assert_eq!(d.database(), Some("orders"), "{d}");
    assert_no_session_for_other(&lab);
}

#[test]
fn encryption_requests_cannot_smuggle_a_startup() {
    let lab = lab();
    let other = startup(&[("user", "app"), ("database", "other")]);
    // Startup bytes sent before the server's answer to SSLRequest (CVE-2021-23214 pattern).
    let d = blocked(
        &lab,
        &[pg_request(PG_SSL_REQUEST), other.clone()].concat(),
        "malformed",
        Some("pg_bytes_before_encryption_answer"),
    );
    assert_eq!(d.protocol(), Some("postgresql"), "{d}");

    // SSLRequest, then (after the server's `S`) a cleartext startup instead of a ClientHello.
    let (out, d) = send_raw(
        &lab,
        "a",
        addr::DB,
        5432,
        &[pg_request(PG_SSL_REQUEST), other.clone()],
        300,
    );
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("malformed")),
        "{d}\n{out}"
    );
    assert_eq!(d.0["detail"], "tls_not_handshake_record", "{d}");

    // SSLRequest, `S`, then a ClientHello for another name: TLS to the database's IP is
    // checked like any TLS, so it cannot carry another name.
    let (out, d) = send_raw(
        &lab,
        "a",
        addr::DB,
        5432,
        &[pg_request(PG_SSL_REQUEST), PYTHON_HELLO.to_vec()],
        300,
    );
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("sni_mismatch")),
        "{d}\n{out}"
    );
    assert_eq!(d.sni(), Some(addr::API), "{d}");

    // SSLRequest, `S`, then a ClientHello for the database: the startup is now invisible, and
    // this rule lists databases without allowEncrypted.
    let hello = Hello::python().sni(addr::DB_NAME.as_bytes()).bytes();
    let (out, d) = send_raw(
        &lab,
        "a",
        addr::DB,
        5432,
        &[pg_request(PG_SSL_REQUEST), hello],
        300,
    );
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("postgresql_encrypted")),
        "{d}\n{out}"
    );
    assert_eq!(d.0["postgresqlEncryption"], "tls", "{d}");

    // GSSENCRequest: this server answers `G`, after which nothing can be read.
    let (out, d) = send_raw(
        &lab,
        "a",
        addr::DB,
        5432,
        &[pg_request(PG_GSSENC_REQUEST), other],
        300,
    );
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("postgresql_encrypted")),
        "{d}\n{out}"
    );
    assert_eq!(d.0["postgresqlEncryption"], "gssapi", "{d}");
    assert_no_session_for_other(&lab);
}

/// A physical replication connection (`replication=true`) is not bound to its `database`
/// parameter: it streams the WAL of every database in the cluster. A rule limited to `orders`
/// must not let it through just because the startup also says `database=orders`.
#[test]
fn physical_replication_is_not_allowed_by_a_database_restricted_rule() {
    let lab = lab();
    let d = blocked(
        &lab,
        &startup(&[
            ("user", "app"),
            ("database", "orders"),
            ("replication", "true"),
        ]),
        "postgresql_denied",
        None,
    );
    assert_eq!(d.database(), Some("orders"), "{d}");
}
