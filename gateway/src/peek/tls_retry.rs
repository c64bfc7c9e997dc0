//! After an allowed ClientHello: did the server ask for another (HelloRetryRequest, RFC 8446
//! §4.1.4), and what does the client's second ClientHello say?
//!
//! A HelloRetryRequest is a ServerHello whose `random` is a fixed value (RFC 8446 §4.1.3). The
//! client then sends a second ClientHello, in cleartext, which "MUST" be the first one except for
//! the changes §4.1.2 lists (key shares, early data, cookie, PSK, padding): the server name and
//! the ALPN list are not among them, so a second ClientHello naming another host than the one the
//! policy checked is refused.
//!
//! Between the two ClientHellos a client may send a ChangeCipherSpec record (the single byte
//! 0x01; middlebox compatibility mode, RFC 8446 §D.4) and, if it offered early data, records of
//! application data that a server which retries skips (RFC 8446 §4.2.10). Both are passed over.
//!
//! Pure and prefix-monotonic like the other peekers; the connection path owns the sockets.

use super::tls::{peek_client_hello, ClientHello, MAX_HANDSHAKE_LEN, MAX_RECORD_LEN};
use super::{Invalid, Peek, Reader};

/// RFC 8446 §4.1.3: the `random` of a HelloRetryRequest, SHA-256("HelloRetryRequest").
pub const HELLO_RETRY_REQUEST_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// ContentType values (RFC 8446 §5.1).
const CONTENT_TYPE_CHANGE_CIPHER_SPEC: u8 = 0x14;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const CONTENT_TYPE_APPLICATION_DATA: u8 = 0x17;
/// HandshakeType.server_hello (RFC 8446 §4).
const HANDSHAKE_SERVER_HELLO: u8 = 0x02;
/// Bytes in a record header: type, version, length (RFC 8446 §5.1).
const RECORD_HEADER_LEN: usize = 5;
/// Handshake type, 24-bit length, `legacy_version`, `random`: enough to tell an HRR.
const SERVER_HELLO_PREFIX_LEN: usize = 1 + 3 + 2 + 32;
/// RFC 8446 §5.2: a TLSCiphertext fragment "MUST NOT exceed 2^14 + 256 bytes".
const MAX_CIPHERTEXT_LEN: usize = MAX_RECORD_LEN + 256;

/// How the server answered the first ClientHello, as far as the gateway needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFirst {
    /// A whole HelloRetryRequest message (and the records it ended in): a second ClientHello
    /// follows.
    HelloRetryRequest,
    /// A ServerHello: the handshake goes on encrypted (TLS 1.3) or as TLS 1.2 does.
    ServerHello,
    /// Anything else (an alert, a handshake message other than ServerHello, bytes that are not
    /// TLS): no second ClientHello can follow that the server would accept, so nothing to check.
    Other,
}

/// Reads the server's first answer far enough to tell a HelloRetryRequest from anything else.
/// An HRR is `Complete` only once its whole handshake message is there, because the client needs
/// all of it before it can send its second ClientHello. Never `Invalid`: the server is trusted,
/// and what is not an HRR is passed on for the client to judge.
pub fn peek_server_first(buf: &[u8]) -> Peek<ServerFirst> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let mut r = Reader::new(buf.get(pos..).unwrap_or_default());
        let Some(content_type) = r.u8() else {
            return Peek::Incomplete;
        };
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Peek::Complete(ServerFirst::Other);
        }
        let Some(version) = r.u16() else {
            return Peek::Incomplete;
        };
        let Some(len) = r.u16().map(usize::from) else {
            return Peek::Incomplete;
        };
        if version >> 8 != 0x03 || len == 0 || len > MAX_RECORD_LEN {
            return Peek::Complete(ServerFirst::Other);
        }
        let (fragment, whole) = match r.take(len) {
            Some(fragment) => (fragment, true),
            None => (r.rest(), false),
        };
        handshake.extend_from_slice(fragment);
        match server_hello(&handshake) {
            Peek::Incomplete if whole => pos += RECORD_HEADER_LEN + len,
            // The client gets the records that carry the HRR whole, or it cannot answer.
            Peek::Incomplete | Peek::Complete(ServerFirst::HelloRetryRequest) if !whole => {
                return Peek::Incomplete
            }
            answer => return answer,
        }
    }
}

/// The server's first handshake message, reassembled so far.
fn server_hello(handshake: &[u8]) -> Peek<ServerFirst> {
    let mut hs = Reader::new(handshake);
    let Some(handshake_type) = hs.u8() else {
        return Peek::Incomplete;
    };
    if handshake_type != HANDSHAKE_SERVER_HELLO {
        return Peek::Complete(ServerFirst::Other);
    }
    let Some(body_len) = hs.u24() else {
        return Peek::Incomplete;
    };
    let body_len = body_len as usize; // u24 always fits
    if body_len > MAX_HANDSHAKE_LEN {
        return Peek::Complete(ServerFirst::Other);
    }
    if handshake.len() < SERVER_HELLO_PREFIX_LEN {
        return Peek::Incomplete;
    }
    // legacy_version, then random (RFC 8446 §4.1.3).
    let random = hs.take(2).and_then(|_| hs.take(32));
    if random != Some(&HELLO_RETRY_REQUEST_RANDOM[..]) {
        return Peek::Complete(ServerFirst::ServerHello);
    }
    if handshake.len() < 4 + body_len {
        return Peek::Incomplete;
    }
    Peek::Complete(ServerFirst::HelloRetryRequest)
}

/// Reads the client's second ClientHello: skips ChangeCipherSpec records (exactly the byte 0x01)
/// and application data records (early data the retrying server skips), then reads the
/// ClientHello with [`peek_client_hello`]'s rules. `consumed` counts the skipped records too.
pub fn peek_second_client_hello(buf: &[u8]) -> Peek<ClientHello> {
    let mut pos = 0;
    loop {
        let mut r = Reader::new(buf.get(pos..).unwrap_or_default());
        let Some(content_type) = r.u8() else {
            return Peek::Incomplete;
        };
        if content_type == CONTENT_TYPE_HANDSHAKE {
            return match peek_client_hello(buf.get(pos..).unwrap_or_default()) {
                Peek::Complete(mut hello) => {
                    hello.consumed += pos;
                    Peek::Complete(hello)
                }
                other => other,
            };
        }
        if content_type != CONTENT_TYPE_CHANGE_CIPHER_SPEC
            && content_type != CONTENT_TYPE_APPLICATION_DATA
        {
            return Peek::Invalid(Invalid::TlsNotHandshakeRecord { content_type });
        }
        let Some(version) = r.u16() else {
            return Peek::Incomplete;
        };
        if version >> 8 != 0x03 {
            return Peek::Invalid(Invalid::TlsRecordVersion { version });
        }
        let Some(len) = r.u16().map(usize::from) else {
            return Peek::Incomplete;
        };
        if content_type == CONTENT_TYPE_CHANGE_CIPHER_SPEC {
            // RFC 8446 §5: any other change_cipher_spec value aborts the handshake.
            match (len, r.u8()) {
                (1, None) => return Peek::Incomplete,
                (1, Some(0x01)) => {}
                _ => return Peek::Invalid(Invalid::TlsBadChangeCipherSpec),
            }
        } else {
            if len == 0 || len > MAX_CIPHERTEXT_LEN {
                return Peek::Invalid(Invalid::TlsRecordTooLong { len });
            }
            if r.take(len).is_none() {
                return Peek::Incomplete;
            }
        }
        pos += RECORD_HEADER_LEN + len;
    }
}

/// RFC 8446 §4.1.2: the second ClientHello keeps the first one's server name and ALPN list.
pub fn check_second_client_hello(first: &ClientHello, second: &ClientHello) -> Result<(), Invalid> {
    if second.server_name != first.server_name {
        return Err(Invalid::TlsRetrySniChanged);
    }
    if second.alpn != first.alpn {
        return Err(Invalid::TlsRetryAlpnChanged);
    }
    Ok(())
}

#[cfg(test)]
#[path = "tls_retry_tests.rs"]
mod tests;
