//! Unit tests for `postgres`: built messages, one or more per `Invalid` variant.

use super::*;

fn message(code: u32, body: &[u8]) -> Vec<u8> {
    let len = (8 + body.len()) as u32;
    [&len.to_be_bytes()[..], &code.to_be_bytes(), body].concat()
}

fn startup_bytes(code: u32, params: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value);
        body.push(0);
    }
    body.push(0);
    message(code, &body)
}

fn invalid(buf: &[u8]) -> Invalid {
    match peek_first_message(buf) {
        Peek::Invalid(invalid) => invalid,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn startup_of(buf: &[u8]) -> Startup {
    match peek_first_message(buf) {
        Peek::Complete(FirstMessage {
            message: PgMessage::Startup(s),
            consumed,
        }) => {
            assert_eq!(consumed, buf.len());
            s
        }
        other => panic!("expected a startup, got {other:?}"),
    }
}

#[test]
fn protocol_3_2_startup_without_database_defaults_to_user() {
    let s = startup_of(&startup_bytes(
        0x0003_0002,
        &[("user", b"app"), ("_pq_.x", b"1")],
    ));
    assert_eq!((s.protocol_major, s.protocol_minor), (3, 2));
    assert_eq!((s.user.as_str(), s.database.as_str()), ("app", "app"));
    assert_eq!(
        s.parameters,
        [("user".into(), "app".into()), ("_pq_.x".into(), "1".into())]
    );
    let s = startup_of(&startup_bytes(
        0x0003_0000,
        &[("user", b"app"), ("database", b"")],
    ));
    assert_eq!(s.database, "app");
}

#[test]
fn protocol_2_and_other_majors_rejected() {
    let v2 = startup_bytes(0x0002_0000, &[("user", b"app")]);
    assert_eq!(invalid(&v2[..8]), Invalid::PgProtocol2 { minor: 0 });
    let v4 = startup_bytes(0x0004_0000, &[("user", b"app")]);
    assert_eq!(
        invalid(&v4),
        Invalid::PgUnsupportedProtocol { major: 4, minor: 0 }
    );
    assert_eq!(
        invalid(&message(0x04d2_1631, &[])),
        Invalid::PgUnknownCode { code: 80877105 }
    );
}

#[test]
fn duplicate_database_rejected() {
    let buf = startup_bytes(
        0x0003_0000,
        &[
            ("user", b"app"),
            ("database", b"orders"),
            ("database", b"billing"),
        ],
    );
    let dup = Invalid::PgDuplicateParameter {
        name: "database",
        offset: 33,
    };
    assert_eq!(invalid(&buf), dup);
}

#[test]
fn wrong_lengths_rejected_before_the_body_arrives() {
    assert_eq!(
        invalid(&[0, 0, 0, 7]),
        Invalid::PgLengthOutOfRange { len: 7 }
    );
    assert_eq!(
        invalid(&10_001u32.to_be_bytes()),
        Invalid::PgLengthOutOfRange { len: 10_001 }
    );
    let ssl = message(SSL_REQUEST_CODE, &[0]);
    let wrong = |request, len| Invalid::PgWrongLength { request, len };
    assert_eq!(invalid(&ssl[..8]), wrong("SSLRequest", 9));
    assert_eq!(
        invalid(&message(GSSENC_REQUEST_CODE, &[0; 8])),
        wrong("GSSENCRequest", 16)
    );
    assert_eq!(
        invalid(&message(CANCEL_REQUEST_CODE, &[0; 7])),
        wrong("CancelRequest", 15)
    );
    assert_eq!(
        invalid(&message(CANCEL_REQUEST_CODE, &[0; 261])),
        wrong("CancelRequest", 269)
    );
}

#[test]
fn protocol_3_2_cancel_request_with_a_32_byte_key_accepted() {
    let body = [&4242u32.to_be_bytes()[..], &[0xab; 32]].concat();
    let got = peek_first_message(&message(CANCEL_REQUEST_CODE, &body));
    let message = PgMessage::CancelRequest {
        process_id: 4242,
        secret_key: vec![0xab; 32],
    };
    assert_eq!(
        got,
        Peek::Complete(FirstMessage {
            message,
            consumed: 44
        })
    );
}

#[test]
fn startup_layout_faults_rejected() {
    let code = 0x0003_0000;
    assert_eq!(
        invalid(&message(code, b"user\0app\0")),
        Invalid::PgMissingNul
    );
    assert_eq!(invalid(&message(code, b"user\0app")), Invalid::PgMissingNul);
    assert_eq!(invalid(&message(code, b"")), Invalid::PgMissingNul);
    assert_eq!(
        invalid(&message(code, b"user\0app\0\0xy")),
        Invalid::PgTrailingBytes { len: 2 }
    );
    assert_eq!(
        invalid(&startup_bytes(code, &[("database", b"orders")])),
        Invalid::PgMissingUser
    );
    assert_eq!(
        invalid(&startup_bytes(code, &[("user", b"")])),
        Invalid::PgMissingUser
    );
    let latin1 = startup_bytes(code, &[("user", b"app"), ("application_name", b"caf\xe9")]);
    assert_eq!(invalid(&latin1), Invalid::PgNotUtf8 { offset: 34 });
}
