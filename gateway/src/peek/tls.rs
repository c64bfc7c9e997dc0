//! TLS ClientHello peeker: SNI, ALPN and ECH presence, read from plaintext handshake records.
//!
//! Reassembles the ClientHello across any number of handshake records (RFC 8446 §5.1; OpenSSL's
//! `-max_send_frag 512` really splits one), accepts any record version 0x0300..=0x0304 (Java
//! writes 0x0303, OpenSSL 0x0301), and walks the extensions (RFC 8446 §4.2) with a bounds-checked
//! [`Reader`]. An outer `encrypted_client_hello` is reported but, by design, what a policy sees is
//! then the ECH public name: the inner name is encrypted.
//!
//! Known limits: SSLv2-compatible hellos (first byte 0x80) are not handshake records and are
//! refused. The second ClientHello after a HelloRetryRequest is read by [`super::tls_retry`].

use std::collections::BTreeSet;
use std::net::IpAddr;

use egressgate_policy::DnsName;

use super::{dns_name, Invalid, Peek, Reader};

/// ContentType.handshake (RFC 8446 §5.1).
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
/// HandshakeType.client_hello (RFC 8446 §4).
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// ExtensionType.server_name (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0x0000;
/// ExtensionType.application_layer_protocol_negotiation (RFC 7301 §3.1).
const EXT_ALPN: u16 = 0x0010;
/// ExtensionType.encrypted_client_hello (draft-ietf-tls-esni, "ECH").
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
/// NameType.host_name (RFC 6066 §3).
const NAME_TYPE_HOST_NAME: u8 = 0x00;
/// Record versions seen on ClientHello records: SSL 3.0 through TLS 1.3's 0x0304.
const RECORD_VERSIONS: std::ops::RangeInclusive<u16> = 0x0300..=0x0304;
/// Bytes in a record header: type, version, length (RFC 8446 §5.1).
const RECORD_HEADER_LEN: usize = 5;
/// Bytes in a handshake header: type and a 24-bit length (RFC 8446 §4).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 §5.1: a TLSPlaintext fragment "MUST NOT exceed 2^14 bytes".
pub const MAX_RECORD_LEN: usize = 0x4000;
/// Cap on the ClientHello body. Real ones are 200–2,100 bytes (Chromium with an ML-KEM share
/// and ECH GREASE: 2,020); 64 KiB leaves room for larger post-quantum shares and PSK identities
/// while bounding what we buffer on the word of a 24-bit length the peer chose.
pub const MAX_HANDSHAKE_LEN: usize = 0x1_0000;
/// RFC 8446 §4.1.2: `legacy_session_id<0..32>`.
const MAX_SESSION_ID_LEN: usize = 32;
/// RFC 8446 §4.1.2: `Random random` is 32 bytes.
const RANDOM_LEN: usize = 32;

/// What a policy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI host_name. `None` when there is no server_name extension or it holds no
    /// host_name.
    pub server_name: Option<DnsName>,
    /// ALPN protocol names in the client's order; non-UTF-8 bytes replaced (lossy).
    pub alpn: Vec<String>,
    /// An `encrypted_client_hello` (0xfe0d) extension is present; GREASE looks the same.
    pub ech_offered: bool,
    /// `legacy_version` of the ClientHello (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// Bytes of all records that carried the ClientHello; anything after it is the caller's.
    pub consumed: usize,
}

/// Reads a ClientHello from the start of `buf`, across as many handshake records as it spans.
///
/// Checks run in stream order (record header, handshake header, then body once whole), so a
/// prefix that is already `Invalid` stays `Invalid` for the same reason.
pub fn peek_client_hello(buf: &[u8]) -> Peek<ClientHello> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let mut r = Reader::new(buf.get(pos..).unwrap_or_default());
        let Some(content_type) = r.u8() else {
            return Peek::Incomplete;
        };
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Peek::Invalid(Invalid::TlsNotHandshakeRecord { content_type });
        }
        let Some(version) = r.u16() else {
            return Peek::Incomplete;
        };
        if !RECORD_VERSIONS.contains(&version) {
            return Peek::Invalid(Invalid::TlsRecordVersion { version });
        }
        let Some(len) = r.u16().map(usize::from) else {
            return Peek::Incomplete;
        };
        if len == 0 {
            return Peek::Invalid(Invalid::TlsEmptyRecord);
        }
        if len > MAX_RECORD_LEN {
            return Peek::Invalid(Invalid::TlsRecordTooLong { len });
        }
        let before = handshake.len();
        let (fragment, whole) = match r.take(len) {
            Some(fragment) => (fragment, true),
            None => (r.rest(), false),
        };
        handshake.extend_from_slice(fragment);

        let mut hs = Reader::new(&handshake);
        if let Some(handshake_type) = hs.u8() {
            if handshake_type != HANDSHAKE_CLIENT_HELLO {
                return Peek::Invalid(Invalid::TlsNotClientHello { handshake_type });
            }
        }
        if let Some(body_len) = hs.u24() {
            let body_len = body_len as usize; // u24 always fits
            if body_len > MAX_HANDSHAKE_LEN {
                let max = MAX_HANDSHAKE_LEN;
                return Peek::Invalid(Invalid::TlsHandshakeTooLong { len: body_len, max });
            }
            let total = HANDSHAKE_HEADER_LEN + body_len;
            if before + len > total {
                let len = before + len - total;
                return Peek::Invalid(Invalid::TlsTrailingHandshakeBytes { len });
            }
            if let Some(body) = hs.take(body_len) {
                // The record that ends the message is whole: `before + len <= total` above.
                let consumed = pos + RECORD_HEADER_LEN + len;
                return match client_hello(body, consumed) {
                    Ok(hello) => Peek::Complete(hello),
                    Err(invalid) => Peek::Invalid(invalid),
                };
            }
        }
        if !whole {
            return Peek::Incomplete;
        }
        pos += RECORD_HEADER_LEN + len;
    }
}

/// Parses a whole ClientHello body (RFC 8446 §4.1.2; RFC 5246 §7.4.1.2 for TLS 1.2 and older,
/// where the extensions block may be absent).
fn client_hello(body: &[u8], consumed: usize) -> Result<ClientHello, Invalid> {
    let malformed = |field| Invalid::TlsMalformed { field };
    let mut r = Reader::new(body);
    let legacy_version = r.u16().ok_or(malformed("legacy_version"))?;
    if legacy_version >> 8 != 0x03 {
        return Err(Invalid::TlsClientVersion {
            version: legacy_version,
        });
    }
    r.take(RANDOM_LEN).ok_or(malformed("random"))?;
    let session_id = r.sub_u8().ok_or(malformed("legacy_session_id"))?;
    if session_id.left() > MAX_SESSION_ID_LEN {
        return Err(malformed("legacy_session_id"));
    }
    // cipher_suites<2..2^16-2>: a non-empty list of two-byte values.
    let suites = r.sub_u16().ok_or(malformed("cipher_suites"))?.rest();
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(malformed("cipher_suites"));
    }
    // legacy_compression_methods<1..2^8-1>
    let compression = r.sub_u8().ok_or(malformed("legacy_compression_methods"))?;
    if compression.is_empty() {
        return Err(malformed("legacy_compression_methods"));
    }

    let mut hello = ClientHello {
        server_name: None,
        alpn: Vec::new(),
        ech_offered: false,
        legacy_version,
        consumed,
    };
    if r.is_empty() {
        return Ok(hello);
    }
    let mut extensions = r.sub_u16().ok_or(malformed("extensions"))?;
    if !r.is_empty() {
        return Err(malformed("extensions"));
    }
    let mut seen = SeenExtensions::default();
    while !extensions.is_empty() {
        let extension_type = extensions.u16().ok_or(malformed("extension_type"))?;
        let data = extensions.sub_u16().ok_or(malformed("extension_data"))?;
        if !seen.insert(extension_type) {
            return Err(Invalid::TlsDuplicateExtension { extension_type });
        }
        match extension_type {
            EXT_SERVER_NAME => hello.server_name = server_name(data)?,
            EXT_ALPN => hello.alpn = alpn(data)?,
            EXT_ENCRYPTED_CLIENT_HELLO => hello.ech_offered = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// The extension types of one ClientHello so far, to refuse a repeated one (RFC 8446 §4.2).
/// A real ClientHello has about 20: they stay in an array, scanned, with no allocation per
/// connection; past [`SeenExtensions::FEW`] they move to a set, so a hostile ClientHello of
/// thousands costs n log n, not n².
#[derive(Debug, Default)]
struct SeenExtensions {
    few: [u16; SeenExtensions::FEW],
    len: usize,
    many: BTreeSet<u16>,
}

impl SeenExtensions {
    const FEW: usize = 32;

    /// `false` if `extension_type` was seen before.
    fn insert(&mut self, extension_type: u16) -> bool {
        if let Some((seen, [slot, ..])) = self.few.split_at_mut_checked(self.len) {
            if seen.contains(&extension_type) {
                return false;
            }
            *slot = extension_type;
            self.len += 1;
            return true;
        }
        if self.many.is_empty() {
            self.many.extend(self.few);
        }
        self.many.insert(extension_type)
    }
}

/// `ServerNameList` of RFC 6066 §3. Names of unknown types are skipped, assuming the
/// `opaque<1..2^16-1>` shape of `HostName` (as rustls does); no host_name gives `None`.
fn server_name(mut data: Reader<'_>) -> Result<Option<DnsName>, Invalid> {
    let malformed = Invalid::TlsMalformed {
        field: "server_name",
    };
    let mut list = data.sub_u16().ok_or(malformed.clone())?;
    if !data.is_empty() || list.is_empty() {
        return Err(malformed);
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8().ok_or(malformed.clone())?;
        let name = list.sub_u16().ok_or(malformed.clone())?.rest();
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        // RFC 6066 §3: "MUST NOT contain more than one name of the same name_type".
        if host.is_some() {
            return Err(Invalid::TlsDuplicateSniHostName);
        }
        host = Some(host_name(name)?);
    }
    Ok(host)
}

/// A `HostName`: RFC 6066 §3 forbids IP literals and wants a DNS name in ASCII (A-labels).
/// Every IP literal breaks the name rule, so the address parse runs only for a refused name,
/// to say which refusal it is.
fn host_name(raw: &[u8]) -> Result<DnsName, Invalid> {
    dns_name(raw).map_err(|reason| {
        let text = std::str::from_utf8(raw).unwrap_or_default();
        let text = text.strip_suffix('.').unwrap_or(text);
        match text.parse::<IpAddr>() {
            Ok(_) => Invalid::TlsSniIpLiteral,
            Err(_) => Invalid::TlsSniNotDnsName { reason },
        }
    })
}

/// `ProtocolNameList` of RFC 7301 §3.1: `ProtocolName protocol_name_list<2..2^16-1>`, each
/// `opaque ProtocolName<1..2^8-1>`.
fn alpn(mut data: Reader<'_>) -> Result<Vec<String>, Invalid> {
    let malformed = |reason| Invalid::TlsAlpnMalformed { reason };
    let mut list = data
        .sub_u16()
        .ok_or(malformed("truncated protocol_name_list"))?;
    if !data.is_empty() {
        return Err(malformed("bytes after protocol_name_list"));
    }
    if list.is_empty() {
        return Err(malformed("empty protocol_name_list"));
    }
    let mut names = Vec::new();
    while !list.is_empty() {
        let name = list
            .sub_u8()
            .ok_or(malformed("truncated protocol name"))?
            .rest();
        if name.is_empty() {
            return Err(malformed("empty protocol name"));
        }
        names.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(names)
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
