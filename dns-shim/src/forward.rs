//! The exchange with the trusted upstream resolvers: a fresh random ID per attempt, only the
//! upstream's answer to the same question accepted, upstreams tried in order. Over UDP
//! (`datagrams`), many queries at once on shared, often renewed sockets, a TC answer retried
//! over TCP; a pod's TCP query goes over TCP ([`Forwarder::exchange_tcp`]).
//!
//! The query is forwarded byte-exact apart from its ID (octets 0..2), so EDNS options, cookies and
//! flags reach the upstream as the pod sent them.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::answer::check_response;
use crate::metrics::{Metrics, UpstreamError};
use crate::query::{with_id, MessageHead};

mod datagrams;
mod pending;

pub(crate) use datagrams::{Done, UdpExchanges};

/// An accepted answer from a trusted upstream. `response` still carries the ID the shim chose.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub response: Vec<u8>,
    /// The accepted response's head (question, rcode, TC).
    pub head: MessageHead,
    pub upstream: SocketAddr,
    pub elapsed: Duration,
}

/// Every upstream failed or timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("no upstream answered")]
    AllUpstreamsFailed,
}

/// One attempt's failure, for the metric and the next upstream.
#[derive(Debug)]
enum AttemptError {
    Timeout,
    Io(io::Error),
}

impl From<io::Error> for AttemptError {
    fn from(e: io::Error) -> Self {
        AttemptError::Io(e)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// Per upstream attempt (the TCP retry after TC gets its own).
    timeout: Duration,
    metrics: Metrics,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration, metrics: Metrics) -> Self {
        Forwarder {
            upstreams,
            timeout,
            metrics,
        }
    }

    /// Sends `query` (whose head is `head`) over TCP to each upstream in order until one answers.
    pub(crate) async fn exchange_tcp(
        &self,
        query: &[u8],
        head: &MessageHead,
    ) -> Result<Exchange, ForwardError> {
        for &upstream in &self.upstreams {
            let started = Instant::now();
            match self.tcp(upstream, query, head).await {
                Ok((response, head)) => {
                    let elapsed = started.elapsed();
                    self.metrics.upstream_duration(elapsed.as_secs_f64());
                    return Ok(Exchange {
                        response,
                        head,
                        upstream,
                        elapsed,
                    });
                }
                Err(AttemptError::Timeout) => {
                    tracing::debug!(%upstream, "upstream timed out");
                    self.metrics.upstream_error(UpstreamError::Timeout);
                }
                Err(AttemptError::Io(e)) => {
                    tracing::debug!(%upstream, error = %e, "upstream failed");
                    self.metrics.upstream_error(UpstreamError::Io);
                }
            }
        }
        Err(ForwardError::AllUpstreamsFailed)
    }

    async fn tcp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        head: &MessageHead,
    ) -> Result<(Vec<u8>, MessageHead), AttemptError> {
        let deadline = Instant::now() + self.timeout;
        let id: u16 = rand::random();
        let len = u16::try_from(query.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query over 65535 bytes"))?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&with_id(query, id));
        let exchange = async {
            let mut stream = TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            stream.write_all(&framed).await?;
            loop {
                // RFC 1035 §4.2.2: two-octet length, then the message.
                let len = stream.read_u16().await?;
                let mut response = vec![0u8; usize::from(len)];
                stream.read_exact(&mut response).await?;
                match check_response(id, head.question.as_ref(), &response) {
                    Ok(response_head) => return Ok::<_, io::Error>((response, response_head)),
                    Err(why) => {
                        tracing::debug!(%upstream, %why, "dropped a TCP message that is not the answer");
                        self.metrics.upstream_error(UpstreamError::Mismatch);
                    }
                }
            }
        };
        Ok(timeout_at(deadline, exchange)
            .await
            .map_err(|_| AttemptError::Timeout)??)
    }
}

#[cfg(test)]
mod tests;
