//! The relay of an HTTP/1 connection: the server→client direction is spliced as any other; the
//! client→server direction goes request by request ([`Framer`]), so that every request head is
//! shown to the gate before a byte of it reaches the server. Heads, chunk-size lines and
//! trailers are read into user space; bodies of a known length (Content-Length, each chunk's
//! data) are spliced unread.
//!
//! When the gate stops at a request, nothing more goes up: the server's side is half-closed,
//! the server finishes the responses to the requests it got (they reach the client), and the
//! connection then ends (closed after the server's end, reset if the client still talks). Bytes that are no HTTP request (a refused framing, or what a client
//! sends after the server switched protocols on a later request) are shown to the gate as such:
//! the connection stops there, fail closed.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use super::{
    pump, read_ready, recv_draining, shutdown_write, splice_exactly, with_copy_buffer, write_ready,
    Activity, Ended, RelayError, Relayed, Side,
};
use crate::peek::http_framing::{Frame, Framer, Request};
use crate::peek::{Invalid, Peek};

/// Read size for heads and chunk lines: most heads fit one read; bodies are spliced.
const READ_CHUNK: usize = 4096;
const _: () = assert!(
    READ_CHUNK <= super::COPY_CHUNK,
    "a read takes part of the copy buffer"
);

/// What the gate is shown.
#[derive(Debug)]
pub enum Seen<'a> {
    /// A later request head (not the first, which was decided already).
    Request(&'a Request),
    /// Bytes the framer refuses.
    Invalid(Invalid),
    /// A head or trailer section that grows past the byte cap.
    TooLarge,
}

/// What the gate answers: go on framing, or stop the client→server direction here. An audited
/// refusal goes on opaque (spliced, no longer framed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Pass,
    Opaque,
    Stop,
}

/// How the client→server direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upward {
    /// The client closed (the server's side is half-closed).
    Closed,
    /// The gate stopped it (the server's side is half-closed; the client is reset at the end).
    Stopped,
}

/// Relays an allowed HTTP/1 connection: `buffered` are the client bytes read and not yet sent
/// (starting at a request head; `first_decided` when that first request was decided already),
/// `max_head` caps a head or trailer section, `gate` sees every other request.
pub async fn relay_http(
    client: TcpStream,
    upstream: TcpStream,
    buffered: Vec<u8>,
    first_decided: bool,
    idle_timeout: Duration,
    max_head: usize,
    gate: impl FnMut(Seen<'_>) -> Next,
) -> Relayed {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let activity = Activity::new();
    let mut framed = Framed {
        client: &client,
        upstream: &upstream,
        buf: buffered,
        total: &up,
        activity: &activity,
    };
    // Each direction half-closes on its own here: the upward one ends in several ways.
    let unshared = Ended::default();
    // Both directions are built inside the join (see `relay`).
    let result = tokio::select! {
        result = async {
            tokio::try_join!(
                framed.run(first_decided, max_head, gate),
                pump(&upstream, &client, &down, &activity, Side::Upstream, &unshared),
            )
        } => result.map(|(upward, ())| upward),
        () = activity.idle(idle_timeout) => Err(RelayError::Idle(idle_timeout)),
    };
    match &result {
        Err(error) => {
            if !matches!(error, RelayError::Client(_)) {
                let _ = client.set_zero_linger();
            }
            if !matches!(error, RelayError::Upstream(_)) {
                let _ = upstream.set_zero_linger();
            }
        }
        // The responses to what went up have reached the client: now it learns it was stopped.
        Ok(Upward::Stopped) => {
            let _ = client.set_zero_linger();
        }
        Ok(Upward::Closed) => {}
    }
    Relayed {
        bytes_up: up.into_inner(),
        bytes_down: down.into_inner(),
        error: result.err(),
    }
}

/// The client→server direction, framed.
struct Framed<'a> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    /// Client bytes read, not yet sent, from the current frame on.
    buf: Vec<u8>,
    total: &'a AtomicU64,
    activity: &'a Activity,
}

impl Framed<'_> {
    async fn run(
        &mut self,
        first_decided: bool,
        max_head: usize,
        mut gate: impl FnMut(Seen<'_>) -> Next,
    ) -> Result<Upward, RelayError> {
        let mut framer = Framer::new();
        loop {
            let frame = match framer.next(&self.buf) {
                Peek::Complete(frame) => frame,
                Peek::Invalid(invalid) => return self.refused(gate(Seen::Invalid(invalid))).await,
                Peek::Incomplete if self.buf.len() >= max_head => {
                    return self.refused(gate(Seen::TooLarge)).await
                }
                Peek::Incomplete => {
                    if self.read().await? == 0 {
                        // A partial head or chunk line was never checked: it does not go up.
                        return self.close_upstream(Upward::Closed);
                    }
                    continue;
                }
            };
            match frame {
                Frame::Head(request) => {
                    if framer.requests() > 1 || !first_decided {
                        match gate(Seen::Request(&request)) {
                            Next::Pass => {}
                            Next::Opaque => return self.opaque().await,
                            Next::Stop => return self.close_upstream(Upward::Stopped),
                        }
                    }
                    self.send(request.head.consumed).await?;
                }
                Frame::Body(len) => {
                    if !self.body(0, len).await? {
                        return self.close_upstream(Upward::Closed);
                    }
                }
                Frame::Chunk { line, data } => {
                    if !self.body(line, data).await? {
                        return self.close_upstream(Upward::Closed);
                    }
                }
                Frame::LastChunk(len) => self.send(len).await?,
            }
        }
    }

    /// After a refusal: opaque (audit) or stopped.
    async fn refused(&mut self, next: Next) -> Result<Upward, RelayError> {
        match next {
            Next::Opaque => self.opaque().await,
            Next::Pass | Next::Stop => self.close_upstream(Upward::Stopped),
        }
    }

    /// Everything from here on is spliced unread (audit mode let a refused request through).
    async fn opaque(&mut self) -> Result<Upward, RelayError> {
        let len = self.buf.len();
        self.send(len).await?;
        pump(
            self.client,
            self.upstream,
            self.total,
            self.activity,
            Side::Client,
            &Ended::default(),
        )
        .await?;
        Ok(Upward::Closed)
    }

    fn close_upstream(&self, how: Upward) -> Result<Upward, RelayError> {
        shutdown_write(self.upstream).map_err(RelayError::Upstream)?;
        Ok(how)
    }

    /// The first `prefix` buffered bytes (a chunk's size line), then `len` body bytes: those
    /// already read go up with the prefix in one write, the rest is spliced. False if the client
    /// ended first.
    async fn body(&mut self, prefix: usize, len: u64) -> Result<bool, RelayError> {
        let buffered = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(self.buf.len().saturating_sub(prefix));
        self.send(prefix + buffered).await?;
        let rest = len - buffered as u64;
        let moved = splice_exactly(
            self.client,
            self.upstream,
            rest,
            self.total,
            self.activity,
            Side::Client,
        )
        .await?;
        Ok(moved == rest)
    }

    /// Writes the first `len` buffered bytes upstream and drops them from the buffer.
    async fn send(&mut self, len: usize) -> Result<(), RelayError> {
        let len = len.min(self.buf.len());
        let mut sent = 0;
        while sent < len {
            match self.upstream.try_write(&self.buf[sent..len]) {
                Ok(n) => {
                    sent += n;
                    self.total.fetch_add(n as u64, Ordering::Relaxed);
                    self.activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => write_ready(self.upstream)
                    .await
                    .map_err(RelayError::Upstream)?,
                Err(e) => return Err(RelayError::Upstream(e)),
            }
        }
        self.buf.drain(..len);
        Ok(())
    }

    /// Reads what the client sends next into the buffer; 0 when it closed. The bytes land in
    /// the worker's copy buffer first and the buffer grows by what arrived: a small request head costs a
    /// small allocation (the allocator's per-thread cache), not a 4 KiB one per request.
    async fn read(&mut self) -> Result<usize, RelayError> {
        loop {
            match self.try_read() {
                Ok(n) => {
                    if n > 0 {
                        self.activity.touch();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        // A connection waiting for its client holds no buffer (see the memory
                        // budget); one that keeps sending (chunk after chunk) keeps it.
                        self.buf = Vec::new();
                    }
                    read_ready(self.client).await.map_err(RelayError::Client)?;
                }
                Err(e) => return Err(RelayError::Client(e)),
            }
        }
    }

    /// One non-blocking read of at most [`READ_CHUNK`] bytes, appended to the buffer. Through
    /// the worker's copy buffer, which lives only in this call, never in the relay's future
    /// (which an idle connection keeps), and is not cleared per read.
    fn try_read(&mut self) -> io::Result<usize> {
        with_copy_buffer(|chunk| {
            let chunk = &mut chunk[..READ_CHUNK];
            let n = recv_draining(self.client, chunk)?;
            self.buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        })
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
