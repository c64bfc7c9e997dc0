//! Reading a client's first bytes until a pure peeker decides, within a deadline and a cap.

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::postgres::NegotiationFault;
use crate::decision::{PodFault, PolicyDenial, Reason};
use crate::peek::{Invalid, Peek};

/// Why reading stopped without a complete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub reason: Reason,
    /// How, for `malformed` and some `protocol_mismatch`: the log's `detail`.
    pub detail: Option<Detail>,
}

/// What exactly was wrong with the first messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    /// A peeker refused the bytes.
    Invalid(Invalid),
    /// The PostgreSQL encryption negotiation went wrong.
    Negotiation(NegotiationFault),
}

impl Detail {
    /// The stable code of the log's `detail` field.
    pub fn code(&self) -> &'static str {
        match self {
            Detail::Invalid(invalid) => invalid.code(),
            Detail::Negotiation(fault) => fault.code(),
        }
    }
}

impl Stop {
    pub fn new(reason: impl Into<Reason>) -> Self {
        Stop {
            reason: reason.into(),
            detail: None,
        }
    }

    fn invalid(invalid: Invalid) -> Self {
        let reason = match invalid {
            // A pod speaking HTTP/2 to an HTTP/1 rule: a protocol it may not use, not garbage.
            Invalid::Http2Preface => Reason::Policy(PolicyDenial::ProtocolMismatch),
            _ => Reason::Pod(PodFault::Malformed),
        };
        Stop {
            reason,
            detail: Some(Detail::Invalid(invalid)),
        }
    }

    pub fn negotiation(fault: NegotiationFault) -> Self {
        Stop {
            reason: Reason::Pod(PodFault::Malformed),
            detail: Some(Detail::Negotiation(fault)),
        }
    }
}

/// The bytes read from the client so far. They are all replayed upstream (from `forwarded`)
/// once the connection is allowed, so nothing the peekers saw is lost.
#[derive(Debug)]
pub struct PeekReader {
    pub buf: Vec<u8>,
    /// Bytes already written upstream (PostgreSQL negotiation).
    pub forwarded: usize,
    deadline: Instant,
    max_bytes: usize,
}

/// Read size: a ClientHello usually arrives in one or two segments.
const READ_CHUNK: usize = 4096;

impl PeekReader {
    pub fn new(deadline: Instant, max_bytes: usize) -> Self {
        PeekReader {
            buf: Vec::new(),
            forwarded: 0,
            deadline,
            max_bytes,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Reads until `parse(&buf[from..])` is complete or invalid. `parse` must be
    /// prefix-monotonic (every peeker is), so re-running it over the grown buffer is exact.
    pub async fn until<T>(
        &mut self,
        client: &mut TcpStream,
        from: usize,
        parse: impl Fn(&[u8]) -> Peek<T>,
    ) -> Result<T, Stop> {
        loop {
            match parse(self.buf.get(from..).unwrap_or_default()) {
                Peek::Complete(value) => return Ok(value),
                Peek::Invalid(invalid) => return Err(Stop::invalid(invalid)),
                Peek::Incomplete => {}
            }
            let room = self.max_bytes.saturating_sub(self.buf.len());
            if room == 0 {
                return Err(Stop::new(Reason::Pod(PodFault::PeekTooLarge)));
            }
            let readable = tokio::time::timeout_at(self.deadline, client.readable()).await;
            let n = match readable {
                Ok(Ok(())) => match self.read_ready(client, room.min(READ_CHUNK)) {
                    Some(n) => n,
                    None => continue,
                },
                Ok(Err(_)) => 0,
                Err(_) => return Err(Stop::new(Reason::Pod(PodFault::PeekTimeout))),
            };
            if n == 0 {
                return Err(Stop::new(Reason::ClientClosed));
            }
        }
    }

    /// Appends what the socket holds, up to `limit` bytes; `None` if it held nothing after all.
    /// The bytes land on the stack first and the buffer grows by what arrived: a connection
    /// waiting for its upstream holds the 500-byte ClientHello it got, not a zeroed 4 KiB read
    /// buffer, and the allocator keeps fewer holes after a burst (RSS per idle connection
    /// 5.1 → 4.4 KiB in the `memory` benchmark).
    fn read_ready(&mut self, client: &TcpStream, limit: usize) -> Option<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        match client.try_read(&mut chunk[..limit]) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            // A reset reads as the client going away, as a failed read did before.
            Err(_) => Some(0),
        }
    }

    /// The bytes read but not yet sent upstream, owned: the relay frees them once written.
    pub fn into_unforwarded(mut self) -> Vec<u8> {
        self.buf.drain(..self.forwarded.min(self.buf.len()));
        self.buf
    }
}
