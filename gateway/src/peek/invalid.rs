//! Why a peeker refused the first bytes of a connection.
//!
//! Every variant is the pod's fault (it sent something we won't pass on): a failing upstream or a
//! bug of ours are other types. Variants carry numbers or static context only, never peer bytes,
//! so they are safe to log as they are. [`Invalid::code`] is the stable reason code for deny logs
//! and metrics: never rename one.

/// A reason to refuse the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    // === TLS (RFC 8446, RFC 6066, RFC 7301) ===
    /// A record before the ClientHello ended was not a handshake record (RFC 8446 §5.1: handshake
    /// messages are not interleaved with other record types).
    #[error("TLS record content type {content_type:#04x} where a handshake record (0x16) belongs")]
    TlsNotHandshakeRecord { content_type: u8 },
    #[error("TLS record version {version:#06x} outside 0x0300..=0x0304")]
    TlsRecordVersion { version: u16 },
    /// RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
    #[error("empty TLS handshake record")]
    TlsEmptyRecord,
    #[error("TLS record of {len} bytes exceeds the 2^14 limit of RFC 8446 §5.1")]
    TlsRecordTooLong { len: usize },
    #[error("TLS handshake message type {handshake_type} where a ClientHello (1) belongs")]
    TlsNotClientHello { handshake_type: u8 },
    #[error("ClientHello of {len} bytes exceeds the {max}-byte cap")]
    TlsHandshakeTooLong { len: usize, max: usize },
    /// The record that ends the ClientHello carries more handshake bytes; a client sends nothing
    /// else in a handshake record before the server's answer (RFC 8446 §4.1.2).
    #[error("{len} handshake bytes after the ClientHello in its last record")]
    TlsTrailingHandshakeBytes { len: usize },
    #[error("ClientHello legacy_version {version:#06x} is not 0x03xx")]
    TlsClientVersion { version: u16 },
    #[error("malformed ClientHello: bad length or trailing bytes in {field}")]
    TlsMalformed { field: &'static str },
    /// RFC 8446 §4.2: at most one extension of each type.
    #[error("ClientHello repeats extension {extension_type:#06x} (RFC 8446 §4.2)")]
    TlsDuplicateExtension { extension_type: u16 },
    /// RFC 6066 §3: at most one name of each name_type.
    #[error("server_name has more than one host_name (RFC 6066 §3)")]
    TlsDuplicateSniHostName,
    /// RFC 6066 §3: literal IPv4 and IPv6 addresses are not permitted in HostName.
    #[error("server_name is an IP literal (RFC 6066 §3)")]
    TlsSniIpLiteral,
    #[error("server_name is not a DNS name: {reason}")]
    TlsSniNotDnsName { reason: &'static str },
    #[error("malformed ALPN extension (RFC 7301 §3.1): {reason}")]
    TlsAlpnMalformed { reason: &'static str },
    /// RFC 8446 §5: a change_cipher_spec record is the single byte 0x01, or the handshake aborts.
    #[error("ChangeCipherSpec record other than the single byte 0x01 (RFC 8446 §5)")]
    TlsBadChangeCipherSpec,
    /// RFC 8446 §4.1.2: the ClientHello after a HelloRetryRequest keeps the first one's
    /// server_name.
    #[error("the ClientHello after a HelloRetryRequest names another server (RFC 8446 §4.1.2)")]
    TlsRetrySniChanged,
    /// RFC 8446 §4.1.2: ... and its ALPN list.
    #[error("the ClientHello after a HelloRetryRequest changes the ALPN list (RFC 8446 §4.1.2)")]
    TlsRetryAlpnChanged,

    // === HTTP/1 (RFC 9112, RFC 9110) ===
    /// RFC 9112 §2.2: a bare CR is invalid; this peeker also refuses a bare LF (see `http`).
    #[error("HTTP line {line} does not end in CRLF")]
    HttpLineEnding { line: usize },
    #[error("HTTP method is not a token (RFC 9110 §9.1)")]
    HttpBadMethod,
    #[error("malformed HTTP request line: {reason}")]
    HttpBadRequestLine { reason: &'static str },
    #[error("HTTP version {major}.{minor} is not 1.0 or 1.1")]
    HttpUnsupportedVersion { major: u8, minor: u8 },
    #[error("HTTP/2 connection preface where an HTTP/1 request belongs")]
    Http2Preface,
    /// CONNECT asks for a tunnel to an arbitrary authority (RFC 9110 §9.3.6).
    #[error("HTTP CONNECT (a tunnel to anywhere) is not allowed")]
    HttpConnect,
    /// RFC 9112 §5.2: obs-fold is rejected outside message/http.
    #[error("HTTP line {line} is folded (obs-fold, RFC 9112 §5.2)")]
    HttpObsFold { line: usize },
    #[error("HTTP line {line} has no colon")]
    HttpHeaderNoColon { line: usize },
    /// RFC 9112 §5.1: a server MUST reject whitespace between field name and colon.
    #[error("HTTP line {line} has whitespace before the colon (RFC 9112 §5.1)")]
    HttpSpaceBeforeColon { line: usize },
    #[error("HTTP line {line} has a field name that is not a token")]
    HttpBadHeaderName { line: usize },
    /// RFC 9110 §5.5: NUL, CR and LF (and here every other control but HTAB) are refused.
    #[error("HTTP line {line} has a control byte in its value")]
    HttpBadHeaderValue { line: usize },
    #[error("HTTP request has more than {max} header lines")]
    HttpTooManyHeaders { max: usize },
    /// RFC 9112 §3.2: a server MUST reject a request with more than one Host field line.
    #[error("HTTP request has more than one Host header (RFC 9112 §3.2)")]
    HttpDuplicateHost,
    #[error("bad HTTP host: {reason}")]
    HttpBadHost { reason: &'static str },
    #[error("HTTP absolute-form target and Host header name different hosts")]
    HttpHostConflict,
    /// RFC 9112 §3.2: a server MUST reject an HTTP/1.1 request without Host.
    #[error("HTTP/1.1 request without Host (RFC 9112 §3.2)")]
    HttpMissingHost,

    // === HTTP/1 framing (RFC 9112 §6, §7): what parsers could frame differently ===
    /// RFC 9112 §6.1: a server MAY reject a request with both; one that doesn't picks one.
    #[error("HTTP request with both Content-Length and Transfer-Encoding (RFC 9112 §6.1)")]
    HttpContentLengthAndTransferEncoding,
    #[error("HTTP request with more than one Content-Length")]
    HttpDuplicateContentLength,
    #[error("HTTP Content-Length is not 1 to 18 digits (RFC 9110 §8.6)")]
    HttpBadContentLength,
    /// RFC 9112 §6.3: unless chunked is the last coding the length cannot be determined.
    #[error("HTTP Transfer-Encoding the gateway does not frame: {reason}")]
    HttpBadTransferEncoding { reason: &'static str },
    /// RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    #[error("HTTP/1.0 request with Transfer-Encoding (RFC 9112 §6.1)")]
    HttpTransferEncodingInHttp10,
    #[error("bad HTTP chunk: {reason}")]
    HttpBadChunk { reason: &'static str },
    /// A switch to cleartext HTTP/2 (RFC 7540 §3.2), which the gateway does not read.
    #[error("HTTP Upgrade to h2c is not allowed")]
    HttpUpgradeH2c,

    // === PostgreSQL (protocol docs, "Message Formats") ===
    #[error("PostgreSQL first message length {len} outside 8..=10000")]
    PgLengthOutOfRange { len: u32 },
    #[error("PostgreSQL {request} with length {len}")]
    PgWrongLength { request: &'static str, len: u32 },
    #[error("PostgreSQL protocol 2.{minor} (removed in PostgreSQL 14)")]
    PgProtocol2 { minor: u16 },
    #[error("PostgreSQL protocol {major}.{minor} is not 3.x")]
    PgUnsupportedProtocol { major: u16, minor: u16 },
    #[error("unknown PostgreSQL request code {code}")]
    PgUnknownCode { code: u32 },
    #[error("PostgreSQL startup packet lacks a terminating NUL")]
    PgMissingNul,
    #[error("{len} bytes after the PostgreSQL startup packet terminator")]
    PgTrailingBytes { len: usize },
    /// PostgreSQL keeps the last of two equal names; a policy that read the first would be fooled.
    #[error("duplicate PostgreSQL startup parameter {name} at byte {offset}")]
    PgDuplicateParameter { name: &'static str, offset: usize },
    #[error("PostgreSQL startup packet has no user")]
    PgMissingUser,
    #[error("PostgreSQL startup parameter at byte {offset} is not UTF-8")]
    PgNotUtf8 { offset: usize },
}

impl Invalid {
    /// Framing that two HTTP/1 parsers could read differently, so that the gateway would check
    /// other requests than the server serves: request smuggling.
    pub fn is_smuggling(&self) -> bool {
        matches!(
            self,
            Self::HttpContentLengthAndTransferEncoding
                | Self::HttpDuplicateContentLength
                | Self::HttpBadContentLength
                | Self::HttpBadTransferEncoding { .. }
                | Self::HttpTransferEncodingInHttp10
                | Self::HttpBadChunk { .. }
                | Self::HttpObsFold { .. }
                | Self::HttpLineEnding { .. }
        )
    }

    /// Valid HTTP/1 the gateway refuses: a tunnel (CONNECT) or a switch to h2c.
    pub fn is_refused_http(&self) -> bool {
        matches!(self, Self::HttpConnect | Self::HttpUpgradeH2c)
    }

    /// A stable snake_case reason code for deny logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TlsNotHandshakeRecord { .. } => "tls_not_handshake_record",
            Self::TlsRecordVersion { .. } => "tls_bad_record_version",
            Self::TlsEmptyRecord => "tls_empty_record",
            Self::TlsRecordTooLong { .. } => "tls_record_too_long",
            Self::TlsNotClientHello { .. } => "tls_not_client_hello",
            Self::TlsHandshakeTooLong { .. } => "tls_handshake_too_long",
            Self::TlsTrailingHandshakeBytes { .. } => "tls_trailing_handshake_bytes",
            Self::TlsClientVersion { .. } => "tls_bad_client_version",
            Self::TlsMalformed { .. } => "tls_malformed",
            Self::TlsDuplicateExtension { .. } => "tls_duplicate_extension",
            Self::TlsDuplicateSniHostName => "tls_duplicate_sni_host_name",
            Self::TlsSniIpLiteral => "tls_sni_ip_literal",
            Self::TlsSniNotDnsName { .. } => "tls_sni_not_dns_name",
            Self::TlsAlpnMalformed { .. } => "tls_alpn_malformed",
            Self::TlsBadChangeCipherSpec => "tls_bad_change_cipher_spec",
            Self::TlsRetrySniChanged => "tls_retry_sni_changed",
            Self::TlsRetryAlpnChanged => "tls_retry_alpn_changed",
            Self::HttpLineEnding { .. } => "http_bad_line_ending",
            Self::HttpBadMethod => "http_bad_method",
            Self::HttpBadRequestLine { .. } => "http_bad_request_line",
            Self::HttpUnsupportedVersion { .. } => "http_unsupported_version",
            Self::Http2Preface => "http2_preface",
            Self::HttpConnect => "http_connect",
            Self::HttpObsFold { .. } => "http_obs_fold",
            Self::HttpHeaderNoColon { .. } => "http_header_no_colon",
            Self::HttpSpaceBeforeColon { .. } => "http_space_before_colon",
            Self::HttpBadHeaderName { .. } => "http_bad_header_name",
            Self::HttpBadHeaderValue { .. } => "http_bad_header_value",
            Self::HttpTooManyHeaders { .. } => "http_too_many_headers",
            Self::HttpDuplicateHost => "http_duplicate_host",
            Self::HttpBadHost { .. } => "http_bad_host",
            Self::HttpHostConflict => "http_host_conflict",
            Self::HttpMissingHost => "http_missing_host",
            Self::HttpContentLengthAndTransferEncoding => {
                "http_content_length_and_transfer_encoding"
            }
            Self::HttpDuplicateContentLength => "http_duplicate_content_length",
            Self::HttpBadContentLength => "http_bad_content_length",
            Self::HttpBadTransferEncoding { .. } => "http_bad_transfer_encoding",
            Self::HttpTransferEncodingInHttp10 => "http_transfer_encoding_in_http10",
            Self::HttpBadChunk { .. } => "http_bad_chunk",
            Self::HttpUpgradeH2c => "http_upgrade_h2c",
            Self::PgLengthOutOfRange { .. } => "pg_length_out_of_range",
            Self::PgWrongLength { .. } => "pg_wrong_length",
            Self::PgProtocol2 { .. } => "pg_protocol_2",
            Self::PgUnsupportedProtocol { .. } => "pg_unsupported_protocol",
            Self::PgUnknownCode { .. } => "pg_unknown_request_code",
            Self::PgMissingNul => "pg_missing_nul",
            Self::PgTrailingBytes { .. } => "pg_trailing_bytes",
            Self::PgDuplicateParameter { .. } => "pg_duplicate_parameter",
            Self::PgMissingUser => "pg_missing_user",
            Self::PgNotUtf8 { .. } => "pg_not_utf8",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_invalid_has_a_distinct_snake_case_code_and_a_message() {
        let all = [
            Invalid::TlsNotHandshakeRecord { content_type: 0x17 },
            Invalid::TlsRecordVersion { version: 0x0200 },
            Invalid::TlsEmptyRecord,
            Invalid::TlsRecordTooLong { len: 0x4001 },
            Invalid::TlsNotClientHello { handshake_type: 2 },
            Invalid::TlsHandshakeTooLong {
                len: 0x10001,
                max: 0x10000,
            },
            Invalid::TlsTrailingHandshakeBytes { len: 1 },
            Invalid::TlsClientVersion { version: 0x0200 },
            Invalid::TlsMalformed { field: "random" },
            Invalid::TlsDuplicateExtension { extension_type: 0 },
            Invalid::TlsDuplicateSniHostName,
            Invalid::TlsSniIpLiteral,
            Invalid::TlsSniNotDnsName {
                reason: "empty label",
            },
            Invalid::TlsAlpnMalformed {
                reason: "empty protocol name",
            },
            Invalid::TlsBadChangeCipherSpec,
            Invalid::TlsRetrySniChanged,
            Invalid::TlsRetryAlpnChanged,
            Invalid::HttpLineEnding { line: 1 },
            Invalid::HttpBadMethod,
            Invalid::HttpBadRequestLine { reason: "x" },
            Invalid::HttpUnsupportedVersion { major: 1, minor: 2 },
            Invalid::Http2Preface,
            Invalid::HttpConnect,
            Invalid::HttpObsFold { line: 2 },
            Invalid::HttpHeaderNoColon { line: 2 },
            Invalid::HttpSpaceBeforeColon { line: 2 },
            Invalid::HttpBadHeaderName { line: 2 },
            Invalid::HttpBadHeaderValue { line: 2 },
            Invalid::HttpTooManyHeaders { max: 100 },
            Invalid::HttpDuplicateHost,
            Invalid::HttpBadHost { reason: "x" },
            Invalid::HttpHostConflict,
            Invalid::HttpMissingHost,
            Invalid::HttpContentLengthAndTransferEncoding,
            Invalid::HttpDuplicateContentLength,
            Invalid::HttpBadContentLength,
            Invalid::HttpBadTransferEncoding { reason: "x" },
            Invalid::HttpTransferEncodingInHttp10,
            Invalid::HttpBadChunk { reason: "x" },
            Invalid::HttpUpgradeH2c,
            Invalid::PgLengthOutOfRange { len: 4 },
            Invalid::PgWrongLength {
                request: "SSLRequest",
                len: 9,
            },
            Invalid::PgProtocol2 { minor: 0 },
            Invalid::PgUnsupportedProtocol { major: 4, minor: 0 },
            Invalid::PgUnknownCode { code: 80877105 },
            Invalid::PgMissingNul,
            Invalid::PgTrailingBytes { len: 1 },
            Invalid::PgDuplicateParameter {
                name: "database",
                offset: 30,
            },
            Invalid::PgMissingUser,
            Invalid::PgNotUtf8 { offset: 8 },
        ];
        let mut codes: Vec<&str> = all.iter().map(Invalid::code).collect();
        for (invalid, code) in all.iter().zip(&codes) {
            assert!(code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert!(!invalid.to_string().is_empty());
        }
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert_eq!(
            Invalid::PgDuplicateParameter {
                name: "database",
                offset: 30
            }
            .to_string(),
            "duplicate PostgreSQL startup parameter database at byte 30"
        );
    }
}
