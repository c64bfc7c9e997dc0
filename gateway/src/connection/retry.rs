//! The retry stage, after an allowed ClientHello and before the splice: the first ClientHello
//! goes to the server, the server's first answer is read far enough to tell a HelloRetryRequest
//! (RFC 8446 §4.1.4), and after one the client's second ClientHello, in cleartext, must name the
//! same server (and ALPN list) as the first (RFC 8446 §4.1.2).
//!
//! Bytes the client sent after its first ClientHello stay in the peek buffer until then: a second
//! ClientHello sent early is checked like one sent in answer. The server's bytes read here (its
//! first read, or the HelloRetryRequest) are written to the client; the relay splices the rest.
//! Both sides are bounded by `peek.timeoutMs` each and by a byte cap.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::context::Context;
use super::reader::PeekReader;
use super::stop::Stop;
use crate::decision::{PodFault, Reason, UpstreamFault};
use crate::peek::tls::MAX_HANDSHAKE_LEN;
use crate::peek::tls_retry::{
    check_second_client_hello, peek_second_client_hello, peek_server_first, ServerFirst,
};
use crate::peek::{Peek, Peeked};

/// Most server bytes read to tell its answer: the largest HelloRetryRequest (a 64 KiB handshake
/// message, for a big cookie) in records of 5 bytes or more. Real ones are about 100 bytes in
/// one record, and a ServerHello is told from its first 43 bytes.
const MAX_SERVER_FIRST: usize = 2 * MAX_HANDSHAKE_LEN;

/// Bytes the stage moved itself, for the `close` line and the byte counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub up: u64,
    pub down: u64,
}

/// What the server's first answer was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// No HelloRetryRequest: nothing more to check.
    None,
    /// A HelloRetryRequest, and a second ClientHello that keeps the name.
    SameName,
}

/// Runs the stage for a connection allowed on the ClientHello in `cx.peeked` (nothing to do for
/// other connections). On a refused second ClientHello, `cx.peeked` holds it, for the log.
/// The first `sent` bytes of the ClientHello are upstream already (written as the connection
/// opened).
pub async fn check<C, U>(
    cx: &mut Context<'_>,
    client: &mut C,
    upstream: &mut U,
    reader: &mut PeekReader,
    sent: usize,
    timeout: Duration,
) -> Result<(Retry, Moved), Stop>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut moved = Moved::default();
    // Borrowed, not cloned: only a refusal at the end replaces it, after its last use.
    let Some(first) = cx.peeked.as_ref().and_then(Peeked::client_hello) else {
        return Ok((Retry::None, moved));
    };
    // The first ClientHello ends `consumed` bytes after what was forwarded before it (the
    // SSLRequest of a PostgreSQL session); nothing after it goes up yet.
    let end = (reader.forwarded + first.consumed).min(reader.buf.len());
    let hello = reader.buf.get(reader.forwarded..end).unwrap_or_default();
    let deadline = Instant::now() + timeout;
    let rest = hello.get(sent..).unwrap_or_default();
    match tokio::time::timeout_at(deadline, upstream.write_all(rest)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => return Err(Stop::new(UpstreamFault::UpstreamUnreachable)),
    }
    moved.up = hello.len() as u64;
    reader.forwarded = end;

    let mut answer = PeekReader::new(deadline, MAX_SERVER_FIRST);
    let told = loop {
        match peek_server_first(&answer.buf) {
            Peek::Complete(told) => break told,
            Peek::Invalid(_) => break ServerFirst::Other,
            Peek::Incomplete => {}
        }
        match answer.read_more(upstream).await {
            // The server closed or reset: the relay passes that on.
            Ok(0) => break ServerFirst::Other,
            Ok(_) => {}
            // No answer in time (or a larger one than any HelloRetryRequest): whether a second
            // ClientHello follows cannot be known, so the connection does not go on.
            Err(_) => return Err(Stop::new(UpstreamFault::UpstreamUnreachable)),
        }
    };
    match tokio::time::timeout_at(deadline, client.write_all(&answer.buf)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(Stop::new(Reason::ClientClosed)),
        Err(_) => return Err(Stop::new(PodFault::PeekTimeout)),
    }
    moved.down = answer.buf.len() as u64;
    if told != ServerFirst::HelloRetryRequest {
        return Ok((Retry::None, moved));
    }

    reader.restart(Instant::now() + timeout);
    let second = reader.until(client, 0, peek_second_client_hello).await?;
    let checked = check_second_client_hello(first, &second);
    if checked.is_err() {
        if let Some(peeked) = cx.peeked.as_mut() {
            peeked.replace_client_hello(second);
        }
    }
    checked.map_err(Stop::invalid)?;
    Ok((Retry::SameName, moved))
}
