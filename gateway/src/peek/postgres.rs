//! PostgreSQL first-message peeker: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage.
//!
//! Parses one message ("Message Formats" of the PostgreSQL protocol docs; server side:
//! `ProcessStartupPacket` in src/backend/tcop/backend_startup.c). The caller runs the sequence:
//! after SSLRequest the server answers `S` (a TLS ClientHello follows: see `tls`) or `N` (the
//! next message follows in the clear); after GSSENCRequest `G` means everything after is
//! encrypted and nothing more can be read.

use std::collections::BTreeSet;

use super::{Invalid, Peek, Reader};

/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`: the server refuses longer first messages too.
pub const MAX_STARTUP_PACKET_LENGTH: u32 = 10_000;
/// Smallest first message: Int32 length and Int32 code.
const MIN_PACKET_LENGTH: u32 = 8;
/// `SSLRequest` code 80877103: 1234 in the high 16 bits, 5679 in the low.
const SSL_REQUEST_CODE: u32 = 0x04d2_162f;
/// `GSSENCRequest` code 80877104: 1234 / 5680.
const GSSENC_REQUEST_CODE: u32 = 0x04d2_1630;
/// `CancelRequest` code 80877102: 1234 / 5678.
const CANCEL_REQUEST_CODE: u32 = 0x04d2_162e;
/// High 16 bits shared by the special request codes.
const SPECIAL_MAJOR: u16 = 1234;
/// CancelRequest: length, code, process ID; then the secret key.
const CANCEL_HEADER_LEN: u32 = 12;
/// Protocol 3.0's secret key is 4 bytes; 3.2 allows up to 256 (`MAX_CANCEL_KEY_LENGTH`).
const CANCEL_KEY_LEN: std::ops::RangeInclusive<u32> = 4..=256;

/// One parsed first message and the bytes it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstMessage {
    pub message: PgMessage,
    /// Bytes of this message; the next message (or a ClientHello after `S`) starts here.
    pub consumed: usize,
}

/// The messages a PostgreSQL client may send first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgMessage {
    /// Asks for TLS; the server answers one byte, `S` or `N`.
    SslRequest,
    /// Asks for GSSAPI encryption; the server answers `G` or `N`.
    GssEncRequest,
    /// Cancels a query on another connection (names no database or user).
    CancelRequest {
        process_id: u32,
        secret_key: Vec<u8>,
    },
    /// Opens a session.
    Startup(Startup),
}

/// A StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Always 3.
    pub protocol_major: u16,
    /// 0 for 3.0, 2 for 3.2 (libpq 18 with `max_protocol_version=3.2`); any value is kept.
    pub protocol_minor: u16,
    pub user: String,
    /// `database`, or `user` when absent or empty, as the server does.
    pub database: String,
    /// `replication` (`true`, `database`, ...): a replication connection.
    pub replication: Option<String>,
    pub application_name: Option<String>,
    /// Every name/value pair in wire order, `user` and `database` included.
    pub parameters: Vec<(String, String)>,
}

/// Reads one PostgreSQL first message from the start of `buf`.
///
/// Checks run in stream order: the length as soon as its 4 bytes are in, the code and the fixed
/// lengths with the next 4, the body once whole.
pub fn peek_first_message(buf: &[u8]) -> Peek<FirstMessage> {
    let mut r = Reader::new(buf);
    let Some(len) = r.u32() else {
        return Peek::Incomplete;
    };
    if !(MIN_PACKET_LENGTH..=MAX_STARTUP_PACKET_LENGTH).contains(&len) {
        return Peek::Invalid(Invalid::PgLengthOutOfRange { len });
    }
    let Some(code) = r.u32() else {
        return Peek::Incomplete;
    };
    if let Err(invalid) = check_code(code, len) {
        return Peek::Invalid(invalid);
    }
    // `len` is at most 10,000: the casts below can't truncate.
    let Some(body) = r.take((len - MIN_PACKET_LENGTH) as usize) else {
        return Peek::Incomplete;
    };
    let message = match code {
        SSL_REQUEST_CODE => PgMessage::SslRequest,
        GSSENC_REQUEST_CODE => PgMessage::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            let mut body = Reader::new(body);
            let (Some(process_id), secret_key) = (body.u32(), body.rest()) else {
                return Peek::Invalid(Invalid::PgWrongLength {
                    request: "CancelRequest",
                    len,
                });
            };
            PgMessage::CancelRequest {
                process_id,
                secret_key: secret_key.to_vec(),
            }
        }
        _ => match startup(code, body) {
            Ok(startup) => PgMessage::Startup(startup),
            Err(invalid) => return Peek::Invalid(invalid),
        },
    };
    Peek::Complete(FirstMessage {
        message,
        consumed: len as usize,
    })
}

/// Whether the first 8 bytes look like a PostgreSQL first message, for [`super::sniff`]:
/// `None` while fewer than 8 bytes are in and the ones present still fit.
pub(crate) fn sniff_header(buf: &[u8]) -> Option<bool> {
    // The length is at most 10,000 = 0x2710, so its first two bytes are zero.
    let fits = buf.iter().take(2).all(|&b| b == 0x00);
    let mut r = Reader::new(buf);
    let (Some(len), Some(code)) = (r.u32(), r.u32()) else {
        return if fits { None } else { Some(false) };
    };
    let major = (code >> 16) as u16;
    Some(
        (MIN_PACKET_LENGTH..=MAX_STARTUP_PACKET_LENGTH).contains(&len)
            && (matches!(
                code,
                SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE
            ) || major == 3
                || major == 2),
    )
}

/// Checks the request code against the message length.
fn check_code(code: u32, len: u32) -> Result<(), Invalid> {
    let (major, minor) = ((code >> 16) as u16, code as u16);
    match code {
        SSL_REQUEST_CODE if len != MIN_PACKET_LENGTH => Err(Invalid::PgWrongLength {
            request: "SSLRequest",
            len,
        }),
        GSSENC_REQUEST_CODE if len != MIN_PACKET_LENGTH => Err(Invalid::PgWrongLength {
            request: "GSSENCRequest",
            len,
        }),
        CANCEL_REQUEST_CODE if !CANCEL_KEY_LEN.contains(&len.saturating_sub(CANCEL_HEADER_LEN)) => {
            Err(Invalid::PgWrongLength {
                request: "CancelRequest",
                len,
            })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => Ok(()),
        _ if major == SPECIAL_MAJOR => Err(Invalid::PgUnknownCode { code }),
        _ if major == 2 => Err(Invalid::PgProtocol2 { minor }),
        _ if major != 3 => Err(Invalid::PgUnsupportedProtocol { major, minor }),
        _ => Ok(()),
    }
}

/// The StartupMessage body: `String name, String value` pairs ending in one extra NUL, which the
/// server requires to be the last byte.
fn startup(code: u32, body: &[u8]) -> Result<Startup, Invalid> {
    let mut r = Reader::new(body);
    let mut parameters: Vec<(String, String)> = Vec::new();
    let mut names = BTreeSet::new();
    loop {
        let offset = MIN_PACKET_LENGTH as usize + r.offset();
        let name = r.until(0x00).ok_or(Invalid::PgMissingNul)?;
        if name.is_empty() {
            if !r.is_empty() {
                return Err(Invalid::PgTrailingBytes { len: r.left() });
            }
            break;
        }
        let value_offset = MIN_PACKET_LENGTH as usize + r.offset();
        let value = r.until(0x00).ok_or(Invalid::PgMissingNul)?;
        let name = std::str::from_utf8(name).map_err(|_| Invalid::PgNotUtf8 { offset })?;
        let value = std::str::from_utf8(value).map_err(|_| Invalid::PgNotUtf8 {
            offset: value_offset,
        })?;
        if !names.insert(name) {
            return Err(Invalid::PgDuplicateParameter {
                name: known_name(name),
                offset,
            });
        }
        parameters.push((name.to_owned(), value.to_owned()));
    }
    let find = |wanted: &str| {
        parameters
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.clone())
    };
    let user = find("user")
        .filter(|user| !user.is_empty())
        .ok_or(Invalid::PgMissingUser)?;
    let database = find("database")
        .filter(|db| !db.is_empty())
        .unwrap_or_else(|| user.clone());
    Ok(Startup {
        protocol_major: (code >> 16) as u16,
        protocol_minor: code as u16,
        user,
        database,
        replication: find("replication"),
        application_name: find("application_name"),
        parameters,
    })
}

/// A static name for a duplicate-parameter error: the peer's own bytes never go into an error.
fn known_name(name: &str) -> &'static str {
    match name {
        "user" => "user",
        "database" => "database",
        "replication" => "replication",
        "options" => "options",
        "application_name" => "application_name",
        "client_encoding" => "client_encoding",
        _ => "(other)",
    }
}

#[cfg(test)]
#[path = "postgres_tests.rs"]
mod tests;
