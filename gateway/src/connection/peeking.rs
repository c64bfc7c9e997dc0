//! The peek stage: the first bytes tell the protocol, then that protocol's peeker reads the
//! whole first message (for PostgreSQL, the negotiation up to the startup or the encryption).

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::context::{Context, Streams};
use super::postgres;
use super::stop::Stop;
use super::upstream::Dial;
use crate::decision;
use crate::peek::{self, Peeked, PgEncryption, PgFirst, Sniffed};
use crate::protocol::Protocol;

/// Peek: reads the first message. Records the protocol in `cx` as soon as it is known, and
/// how long the peek took.
pub async fn peek<C, D>(
    cx: &mut Context<'_>,
    streams: &mut Streams<C, D::Stream>,
    dial: &D,
) -> Result<Peeked, Stop>
where
    C: AsyncRead + AsyncWrite + Unpin,
    D: Dial,
{
    let started = Instant::now();
    let peeked = first_message(cx, streams, dial).await;
    if let Ok(peeked) = &peeked {
        cx.protocol = Some(Protocol::from(peeked));
    }
    cx.peek_duration = Some(started.elapsed());
    peeked
}

/// The one match a new protocol joins: which peeker reads what the first bytes announce.
async fn first_message<C, D>(
    cx: &mut Context<'_>,
    streams: &mut Streams<C, D::Stream>,
    dial: &D,
) -> Result<Peeked, Stop>
where
    C: AsyncRead + AsyncWrite + Unpin,
    D: Dial,
{
    let Streams { client, reader, .. } = streams;
    let sniffed = reader.until(client, 0, peek::sniff).await?;
    cx.protocol = Some(Protocol::from(sniffed));
    // Only a `postgresql` grant makes the encryption answer worth fetching from the server.
    let postgres_grant = decision::has_postgres_grant(&cx.grants);
    Ok(match sniffed {
        Sniffed::TlsHandshake => {
            let hello = reader
                .until(client, 0, peek::tls::peek_client_hello)
                .await?;
            // PostgreSQL 17's direct TLS: the ALPN says what the ClientHello is for.
            if postgres_grant && hello.alpn.iter().any(|p| p == "postgresql") {
                Peeked::Postgres(PgFirst::Encrypted(PgEncryption::Tls(hello)))
            } else {
                Peeked::Tls(hello)
            }
        }
        // The head with how its body is framed: ambiguous framing is refused here already.
        Sniffed::Http1 => Peeked::Http(
            reader
                .until(client, 0, peek::http_framing::peek_request)
                .await?
                .head,
        ),
        Sniffed::Http2Preface => Peeked::Http2,
        Sniffed::Postgres if postgres_grant => {
            Peeked::Postgres(postgres::negotiate(streams, cx.destination, dial).await?)
        }
        Sniffed::Postgres => Peeked::Postgres(postgres::observe(client, reader).await),
        Sniffed::Unknown => Peeked::Unknown,
    })
}
