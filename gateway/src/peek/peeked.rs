//! What the peekers found in a connection's first messages, once the connection path has run
//! them: the one value the authorization and the decision line read.

use egressgate_policy::DnsName;

use super::http::RequestHead;
use super::postgres::Startup;
use super::tls::ClientHello;

/// A connection's first message, as far as a protocol was recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    Tls(ClientHello),
    Http(RequestHead),
    Postgres(PgFirst),
    /// The HTTP/2 prior-knowledge preface: no rule speaks it.
    Http2,
    /// Bytes of no protocol the gateway knows.
    Unknown,
}

/// What a PostgreSQL client's first messages came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgFirst {
    /// A plaintext StartupMessage, after any encryption request the server refused.
    Startup(Startup),
    /// A CancelRequest (names no database or user).
    Cancel,
    /// The session turned encrypted; the startup is out of sight.
    Encrypted(PgEncryption),
    /// Without a `postgresql` grant nothing is negotiated, and the first message was no whole
    /// startup.
    NotNegotiated,
}

/// How a PostgreSQL session turned encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgEncryption {
    /// TLS after `S`, or direct TLS with ALPN `postgresql`.
    Tls(ClientHello),
    /// GSSAPI after `G`.
    Gssapi,
}

impl Peeked {
    /// The ClientHello, if the connection started TLS (directly or after an SSLRequest).
    pub fn client_hello(&self) -> Option<&ClientHello> {
        match self {
            Peeked::Tls(hello) | Peeked::Postgres(PgFirst::Encrypted(PgEncryption::Tls(hello))) => {
                Some(hello)
            }
            _ => None,
        }
    }

    /// Puts `hello` where the ClientHello is (a refused second ClientHello, for the log).
    pub fn replace_client_hello(&mut self, hello: ClientHello) {
        match self {
            Peeked::Tls(old) | Peeked::Postgres(PgFirst::Encrypted(PgEncryption::Tls(old))) => {
                *old = hello
            }
            _ => {}
        }
    }

    /// The name the client asked for in its first message: the SNI or the HTTP host (unless
    /// that is an IP literal).
    pub fn requested_name(&self) -> Option<&DnsName> {
        match self {
            Peeked::Http(head) => head.host.as_ref()?.name(),
            _ => self.client_hello()?.server_name.as_ref(),
        }
    }
}
