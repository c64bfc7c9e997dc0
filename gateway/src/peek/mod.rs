//! Peekers: pure parsers over the first bytes a pod sends on a new connection.
//!
//! Each peeker takes the bytes received so far and answers [`Peek::Complete`] (a value that says
//! how many bytes it consumed), [`Peek::Incomplete`] (read more) or [`Peek::Invalid`] (deny, with
//! a stable reason code). Nothing is decrypted and nothing is written: the caller owns the socket,
//! the buffer, the byte cap and the timeout, and replays the peeked bytes upstream.
//!
//! Every peeker is prefix-monotonic: once some prefix of a stream gives `Complete` or `Invalid`,
//! every longer prefix gives the same answer, so the caller may simply call again after each read.
//!
//! Layout:
//! - [`sniff`] picks the protocol from the first bytes;
//! - [`tls::peek_client_hello`]: SNI, ALPN, ECH presence (RFC 8446, RFC 6066, RFC 7301);
//! - [`tls_retry`]: the server's first answer (a HelloRetryRequest?) and the second ClientHello;
//! - [`http::peek_request_head`]: request line and Host (RFC 9112, RFC 9110);
//! - [`http_framing::Framer`]: request boundaries on a connection (RFC 9112 §6, §7), smuggling;
//! - [`postgres::peek_first_message`]: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage;
//! - [`Peeked`]: what they found, as the connection path hands it to the authorization.

pub mod http;
pub mod http_framing;
pub mod postgres;
pub mod tls;
pub mod tls_retry;

mod invalid;
mod peeked;

pub use invalid::Invalid;
pub use peeked::{Peeked, PgEncryption, PgFirst};

use egressgate_policy::{DnsName, NameError};

/// The answer of a peeker for the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek<T> {
    /// The message is whole; `T` says how many bytes it took.
    Complete(T),
    /// Nothing is wrong yet, but more bytes are needed to decide.
    Incomplete,
    /// The bytes can't be the expected message; more bytes won't change that.
    Invalid(Invalid),
}

/// Which protocol a connection speaks, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS handshake record (content type 0x16, major version 0x03).
    TlsHandshake,
    /// An HTTP/1 request line (a method token followed by a space).
    Http1,
    /// The HTTP/2 connection preface (RFC 9113 §3.4).
    Http2Preface,
    /// A PostgreSQL first message (length, then a request code or protocol 3.x / 2.x).
    Postgres,
    /// None of the above.
    Unknown,
}

/// The HTTP/2 client connection preface, RFC 9113 §3.4.
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token [`sniff`] waits for. The longest registered method
/// (`BASELINE-CONTROL`, `UPDATEREDIRECTREF`) has 17 bytes; 32 leaves room without letting a
/// stream of letters keep the sniffer undecided.
const MAX_METHOD_LEN: usize = 32;

/// Decides from the first bytes which peeker to run.
///
/// - `0x16 0x03`: a TLS handshake record (RFC 8446 §5.1);
/// - the 24-byte HTTP/2 preface (RFC 9113 §3.4); `Incomplete` while the input is a prefix of it;
/// - a method token (RFC 9110 §9.1, `tchar`s) of at most [`MAX_METHOD_LEN`] bytes then SP:
///   HTTP/1;
/// - an Int32 length in 8..=10000 then SSLRequest, GSSENCRequest, CancelRequest or a protocol
///   code of major 3 (or 2, so that the PostgreSQL peeker can name the old protocol): PostgreSQL.
pub fn sniff(buf: &[u8]) -> Peek<Sniffed> {
    let Some(&first) = buf.first() else {
        return Peek::Incomplete;
    };
    if first == 0x16 {
        return match buf.get(1) {
            None => Peek::Incomplete,
            Some(0x03) => Peek::Complete(Sniffed::TlsHandshake),
            Some(_) => Peek::Complete(Sniffed::Unknown),
        };
    }
    let n = buf.len().min(HTTP2_PREFACE.len());
    if buf[..n] == HTTP2_PREFACE[..n] {
        if n == HTTP2_PREFACE.len() {
            return Peek::Complete(Sniffed::Http2Preface);
        }
        return Peek::Incomplete;
    }
    if is_tchar(first) {
        for (i, &b) in buf.iter().enumerate().take(MAX_METHOD_LEN + 1) {
            if b == b' ' && i > 0 {
                return Peek::Complete(Sniffed::Http1);
            }
            if !is_tchar(b) || i == MAX_METHOD_LEN {
                return Peek::Complete(Sniffed::Unknown);
            }
        }
        return Peek::Incomplete;
    }
    if first == 0x00 {
        return match postgres::sniff_header(buf) {
            Some(true) => Peek::Complete(Sniffed::Postgres),
            Some(false) => Peek::Complete(Sniffed::Unknown),
            None => Peek::Incomplete,
        };
    }
    Peek::Complete(Sniffed::Unknown)
}

/// `tchar` of RFC 9110 §5.6.2: the bytes of a token (methods, field names).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks that `raw` is a DNS host name a policy can match, by the policy crate's one rule
/// ([`DnsName::parse`]: what a peeker accepts is exactly what a pattern can match). The error
/// is a short static reason: peer bytes never reach an [`Invalid`].
pub(crate) fn dns_name(raw: &[u8]) -> Result<DnsName, &'static str> {
    // A byte that is not UTF-8 is outside every label's alphabet; the lossy text fails on it.
    DnsName::parse(&String::from_utf8_lossy(raw)).map_err(|error| match error {
        NameError::Empty => "empty name",
        NameError::TooLong { .. } => "name longer than 253 bytes",
        NameError::EmptyLabel => "empty label",
        NameError::LabelTooLong { .. } => "label longer than 63 bytes",
        NameError::HyphenAtEdge { .. } => "label starts or ends with '-'",
        // Only an IPv4 address with a trailing dot gets here: the TLS peeker refuses IP
        // literals first, and an HTTP host ends at its first ':'.
        NameError::NumericTopLabel | NameError::IpLiteral => "all-numeric last label",
        NameError::InvalidChar { .. } | NameError::MisplacedWildcard => {
            "byte outside [A-Za-z0-9_-] in a label"
        }
        _ => "not a DNS name",
    })
}

/// A cursor over untrusted bytes that checks every length before slicing (rustls `Reader`).
/// Every read returns `None` instead of panicking when the bytes run out.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes read so far.
    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    /// Bytes left to read.
    pub(crate) fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The next `n` bytes, or `None` (and nothing consumed) if fewer are left.
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let bytes = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        bytes
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u24(&mut self) -> Option<u32> {
        self.array::<3>()
            .map(|[a, b, c]| u32::from_be_bytes([0, a, b, c]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// A sub-reader over a vector with a one-byte length prefix.
    pub(crate) fn sub_u8(&mut self) -> Option<Reader<'a>> {
        let len = self.u8()?;
        self.take(usize::from(len)).map(Reader::new)
    }

    /// A sub-reader over a vector with a two-byte length prefix.
    pub(crate) fn sub_u16(&mut self) -> Option<Reader<'a>> {
        let len = self.u16()?;
        self.take(usize::from(len)).map(Reader::new)
    }

    /// The bytes up to `delim`, consuming the delimiter too; `None` if there is no `delim`.
    pub(crate) fn until(&mut self, delim: u8) -> Option<&'a [u8]> {
        let rest = self.buf.get(self.pos..)?;
        let len = rest.iter().position(|&b| b == delim)?;
        let bytes = self.take(len)?;
        self.pos += 1;
        Some(bytes)
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
