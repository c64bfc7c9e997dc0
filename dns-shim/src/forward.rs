//! The exchange with the trusted upstream resolvers: a fresh random ID per attempt on a shared,
//! often renewed socket (see `sockets`), only the upstream's answer to the same question
//! accepted, TC answers retried over TCP, upstreams tried in order.
//!
//! The query is forwarded byte-exact apart from its ID (octets 0..2), so EDNS options, cookies and
//! flags reach the upstream as the pod sent them.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::answer::check_response;
use crate::metrics::{Metrics, UpstreamError};
use crate::query::{with_id, MessageHead};

mod sockets;

use sockets::{Delivery, UpstreamSockets};

/// The transport to use with the upstream: the pod's, except that a TC UDP answer is retried
/// over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTransport {
    Udp,
    Tcp,
}

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
    sockets: Arc<UpstreamSockets>,
    metrics: Metrics,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration, metrics: Metrics) -> Self {
        Forwarder {
            upstreams,
            timeout,
            sockets: Arc::new(UpstreamSockets::new(metrics.clone())),
            metrics,
        }
    }

    /// Sends `query` (whose head is `head`) to each upstream in order until one answers.
    pub(crate) async fn exchange(
        &self,
        query: &[u8],
        head: &MessageHead,
        transport: UpstreamTransport,
    ) -> Result<Exchange, ForwardError> {
        for &upstream in &self.upstreams {
            let started = Instant::now();
            let attempt = match transport {
                UpstreamTransport::Udp => self.udp_then_tcp(upstream, query, head).await,
                UpstreamTransport::Tcp => self.tcp(upstream, query, head).await,
            };
            match attempt {
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

    async fn udp_then_tcp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        head: &MessageHead,
    ) -> Result<(Vec<u8>, MessageHead), AttemptError> {
        let (response, response_head) = self.udp(upstream, query, head).await?;
        if !response_head.truncated {
            return Ok((response, response_head));
        }
        match self.tcp(upstream, query, head).await {
            Ok(full) => Ok(full),
            Err(e) => {
                // The pod gets the TC answer and retries over TCP itself.
                tracing::debug!(%upstream, error = ?e, "TCP retry after TC failed");
                self.metrics.upstream_error(UpstreamError::TcpRetry);
                Ok((response, response_head))
            }
        }
    }

    async fn udp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        head: &MessageHead,
    ) -> Result<(Vec<u8>, MessageHead), AttemptError> {
        let deadline = Instant::now() + self.timeout;
        let mut in_flight = self.sockets.send(upstream, query).await?;
        loop {
            let delivery = timeout_at(deadline, in_flight.next())
                .await
                .map_err(|_| AttemptError::Timeout)?;
            let response = match delivery {
                Some(Delivery::Datagram(response)) => response,
                Some(Delivery::Failed(kind)) => return Err(io::Error::from(kind).into()),
                None => return Err(io::Error::other("upstream socket closed").into()),
            };
            match check_response(in_flight.id, head.question.as_ref(), &response) {
                Ok(response_head) => return Ok((response, response_head)),
                Err(why) => {
                    tracing::debug!(%upstream, %why, "dropped a datagram that is not the answer");
                    self.metrics.upstream_error(UpstreamError::Mismatch);
                }
            }
        }
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
