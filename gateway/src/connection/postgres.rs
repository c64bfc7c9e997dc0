//! PostgreSQL's first messages: SSLRequest / GSSENCRequest negotiation, then the startup.
//!
//! After an encryption request the server's one-byte answer decides what comes next, so the
//! gateway opens the upstream connection, forwards the request, relays the answer, and keeps
//! peeking: `N` → the next plaintext message, `S` → a TLS ClientHello (SNI rules), `G` → GSSAPI
//! (nothing more to see).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::addr::OrigDstAddr;
use super::context::Streams;
use super::reader::PeekReader;
use super::stop::Stop;
use super::upstream::Dial;
use crate::decision::{PodFault, Reason, UpstreamFault};
use crate::peek::postgres::{peek_first_message, PgMessage};
use crate::peek::tls::peek_client_hello;
use crate::peek::{PgEncryption, PgFirst};

/// GSSENCRequest → `N`, SSLRequest → `N`, StartupMessage: the longest legal sequence.
const MAX_MESSAGES: usize = 3;

/// How the encryption negotiation went wrong (`malformed`, with these `detail` codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegotiationFault {
    /// Bytes after an encryption request, before the server's answer.
    BytesBeforeAnswer,
    /// The server answered something else than `S`, `N` or `G`.
    UnexpectedServerAnswer { answer: u8 },
    /// More than [`MAX_MESSAGES`] first messages.
    TooManyNegotiations,
}

impl NegotiationFault {
    pub fn code(self) -> &'static str {
        match self {
            NegotiationFault::BytesBeforeAnswer => "pg_bytes_before_encryption_answer",
            NegotiationFault::UnexpectedServerAnswer { .. } => "pg_unexpected_server_answer",
            NegotiationFault::TooManyNegotiations => "pg_too_many_negotiations",
        }
    }
}

/// Runs the client's first messages to a startup, a cancel or an encrypted session, relaying
/// encryption requests to `destination` (dialled on the first one) and its answers back.
pub async fn negotiate<C, D>(
    streams: &mut Streams<C, D::Stream>,
    destination: OrigDstAddr,
    dial: &D,
) -> Result<PgFirst, Stop>
where
    C: AsyncRead + AsyncWrite + Unpin,
    D: Dial,
{
    let mut from = 0;
    for _ in 0..MAX_MESSAGES {
        let Streams { client, reader, .. } = &mut *streams;
        let first = reader.until(client, from, peek_first_message).await?;
        let end = from + first.consumed;
        match first.message {
            PgMessage::Startup(startup) => return Ok(PgFirst::Startup(startup)),
            PgMessage::CancelRequest { .. } => return Ok(PgFirst::Cancel),
            PgMessage::SslRequest | PgMessage::GssEncRequest => {
                // Bytes sent before the server's answer would be read by the server as if they
                // were protected (CVE-2021-23214): refuse them.
                if reader.buf.len() > end {
                    return Err(Stop::negotiation(NegotiationFault::BytesBeforeAnswer));
                }
                let upstream = match &mut streams.upstream {
                    Some(upstream) => upstream,
                    None => {
                        let dialled = dial.dial(destination).await.map_err(|_| unreachable())?;
                        streams.upstream.insert(dialled)
                    }
                };
                let answer = exchange(&mut streams.reader, upstream, from, end).await?;
                streams
                    .client
                    .write_all(&[answer])
                    .await
                    .map_err(|_| Stop::new(Reason::ClientClosed))?;
                from = end;
                match answer {
                    b'N' => continue,
                    b'S' => {
                        let Streams { client, reader, .. } = &mut *streams;
                        let hello = reader.until(client, from, peek_client_hello).await?;
                        return Ok(PgFirst::Encrypted(PgEncryption::Tls(hello)));
                    }
                    b'G' => return Ok(PgFirst::Encrypted(PgEncryption::Gssapi)),
                    answer => {
                        let fault = NegotiationFault::UnexpectedServerAnswer { answer };
                        return Err(Stop::negotiation(fault));
                    }
                }
            }
        }
    }
    Err(Stop::negotiation(NegotiationFault::TooManyNegotiations))
}

/// Without a `postgresql` grant nothing is relayed; a plaintext startup is still read so the
/// log shows which database and user were wanted.
pub async fn observe(client: &mut (impl AsyncRead + Unpin), reader: &mut PeekReader) -> PgFirst {
    match reader.until(client, 0, peek_first_message).await {
        Ok(first) => match first.message {
            PgMessage::Startup(startup) => PgFirst::Startup(startup),
            _ => PgFirst::NotNegotiated,
        },
        Err(_) => PgFirst::NotNegotiated,
    }
}

fn unreachable() -> Stop {
    Stop::new(UpstreamFault::UpstreamUnreachable)
}

/// Forwards `buf[from..end]` (an encryption request) upstream and reads the one-byte answer,
/// within the peek deadline.
async fn exchange(
    reader: &mut PeekReader,
    upstream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    from: usize,
    end: usize,
) -> Result<u8, Stop> {
    let request = reader.buf.get(from..end).unwrap_or_default();
    let mut answer = [0u8; 1];
    let io = async {
        upstream.write_all(request).await?;
        upstream.read_exact(&mut answer).await
    };
    match tokio::time::timeout_at(reader.deadline(), io).await {
        Ok(Ok(_)) => {
            reader.forwarded = end;
            Ok(answer[0])
        }
        Ok(Err(_)) => Err(unreachable()),
        Err(_) => Err(Stop::new(PodFault::PeekTimeout)),
    }
}
