//! PostgreSQL's first messages: SSLRequest / GSSENCRequest negotiation, then the startup.
//!
//! After an encryption request the server's one-byte answer decides what comes next, so the
//! gateway opens the upstream connection, forwards the request, relays the answer, and keeps
//! peeking: `N` → the next plaintext message, `S` → a TLS ClientHello (SNI rules), `G` → GSSAPI
//! (nothing more to see).

use egressgate_policy::Grant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::reader::{PeekReader, Stop};
use super::{connect, describe, OrigDstAddr, Outcome};
use crate::decision::{self, EncryptedPostgres, PodFault, Reason, UpstreamFault};
use crate::events::DecisionLine;
use crate::peek::postgres::{peek_first_message, PgMessage};
use crate::peek::tls::peek_client_hello;

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

pub(super) async fn negotiate(
    require_sni: bool,
    grants: &[Grant<'_>],
    client: &mut TcpStream,
    reader: &mut PeekReader,
    upstream: &mut Option<TcpStream>,
    line: &mut DecisionLine,
) -> Outcome {
    let mut from = 0;
    for _ in 0..MAX_MESSAGES {
        let first = reader.until(client, from, peek_first_message).await?;
        let end = from + first.consumed;
        match first.message {
            PgMessage::Startup(startup) => {
                line.database = Some(startup.database.clone());
                line.user = Some(startup.user.clone());
                line.replication = startup.replication.clone();
                return decision::authorize_startup(
                    grants,
                    &startup.database,
                    &startup.user,
                    startup.replication.as_deref(),
                )
                .map(describe)
                .map_err(Stop::new);
            }
            PgMessage::CancelRequest { .. } => {
                return decision::authorize_cancel(grants)
                    .map(describe)
                    .map_err(Stop::new);
            }
            PgMessage::SslRequest | PgMessage::GssEncRequest => {
                // Bytes sent before the server's answer would be read by the server as if they
                // were protected (CVE-2021-23214): refuse them.
                if reader.buf.len() > end {
                    return Err(Stop::negotiation(NegotiationFault::BytesBeforeAnswer));
                }
                let answer = exchange(reader, upstream, from, end, line).await?;
                client
                    .write_all(&[answer])
                    .await
                    .map_err(|_| Stop::new(Reason::ClientClosed))?;
                from = end;
                match answer {
                    b'N' => continue,
                    b'S' => {
                        let hello = reader.until(client, from, peek_client_hello).await?;
                        line.postgresql_encryption = Some("tls");
                        line.sni = hello.server_name.clone();
                        line.alpn = hello.alpn.clone();
                        line.ech = Some(hello.ech_offered);
                        let sni = hello.server_name.as_deref();
                        return decision::authorize_encrypted_postgres(
                            grants,
                            EncryptedPostgres::Tls { sni },
                            require_sni,
                        )
                        .map(describe)
                        .map_err(Stop::new);
                    }
                    b'G' => {
                        line.postgresql_encryption = Some("gssapi");
                        return decision::authorize_encrypted_postgres(
                            grants,
                            EncryptedPostgres::Gssapi,
                            require_sni,
                        )
                        .map(describe)
                        .map_err(Stop::new);
                    }
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
pub(super) async fn observe(
    client: &mut TcpStream,
    reader: &mut PeekReader,
    line: &mut DecisionLine,
) {
    if let Ok(first) = reader.until(client, 0, peek_first_message).await {
        if let PgMessage::Startup(startup) = first.message {
            line.database = Some(startup.database);
            line.user = Some(startup.user);
            line.replication = startup.replication;
        }
    }
}

/// Forwards `buf[from..end]` (an encryption request) upstream and reads the one-byte answer,
/// within the peek deadline.
async fn exchange(
    reader: &mut PeekReader,
    upstream: &mut Option<TcpStream>,
    from: usize,
    end: usize,
    line: &DecisionLine,
) -> Result<u8, Stop> {
    let unreachable = || Stop::new(UpstreamFault::UpstreamUnreachable);
    if upstream.is_none() {
        let destination = OrigDstAddr(line.destination);
        *upstream = Some(connect(destination).await.map_err(|_| unreachable())?);
    }
    let server = upstream.as_mut().ok_or_else(unreachable)?;
    let request = reader.buf.get(from..end).unwrap_or_default();
    let deadline = reader.deadline();
    let mut answer = [0u8; 1];
    let io = async {
        server.write_all(request).await?;
        server.read_exact(&mut answer).await
    };
    match tokio::time::timeout_at(deadline, io).await {
        Ok(Ok(_)) => {
            reader.forwarded = end;
            Ok(answer[0])
        }
        Ok(Err(_)) => Err(unreachable()),
        Err(_) => Err(Stop::new(PodFault::PeekTimeout)),
    }
}
