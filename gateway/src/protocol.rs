//! What a connection speaks, as far as the gateway can tell: the `protocol` of the decision line
//! and the metrics' `protocol` label.

use serde::{Serialize, Serializer};

use crate::peek::{Peeked, Sniffed};

/// A connection's protocol. The codes are a stable interface (logs, metrics): never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// Allowed by a `tcp` rule: nothing was read.
    Tcp,
    Tls,
    Http,
    /// The HTTP/2 prior-knowledge preface (never allowed: rules speak HTTP/1).
    Http2,
    /// Plaintext first messages, or TLS with ALPN `postgresql` to a `postgresql` rule.
    Postgresql,
    /// None of the above.
    Unknown,
    /// A UDP flow (its first datagram; UDP is not peeked).
    Udp,
}

impl Protocol {
    /// The metric label of a connection where nothing was read.
    pub const NONE_LABEL: &'static str = "none";

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Postgresql => "postgresql",
            Protocol::Unknown => "unknown",
            Protocol::Udp => "udp",
        }
    }

    /// The metric label for `protocol`, [`Self::NONE_LABEL`] when nothing was read.
    pub fn label(protocol: Option<Protocol>) -> &'static str {
        protocol.map_or(Self::NONE_LABEL, Protocol::as_str)
    }
}

impl From<Sniffed> for Protocol {
    fn from(sniffed: Sniffed) -> Self {
        match sniffed {
            Sniffed::TlsHandshake => Protocol::Tls,
            Sniffed::Http1 => Protocol::Http,
            Sniffed::Http2Preface => Protocol::Http2,
            Sniffed::Postgres => Protocol::Postgresql,
            Sniffed::Unknown => Protocol::Unknown,
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl From<&Peeked> for Protocol {
    fn from(peeked: &Peeked) -> Self {
        match peeked {
            Peeked::Tls(_) => Protocol::Tls,
            Peeked::Http(_) => Protocol::Http,
            // Direct TLS with ALPN `postgresql` included.
            Peeked::Postgres(_) => Protocol::Postgresql,
            Peeked::Http2 => Protocol::Http2,
            Peeked::Unknown => Protocol::Unknown,
        }
    }
}
