//! The UDP exchange with the trusted upstreams for many queries at once, without a task per
//! query: the caller (the UDP listener's one task) starts each query here, waits on
//! [`UdpExchanges::ready`] beside its listener, and [`UdpExchanges::collect`]s what finished.
//!
//! Each upstream has a few connected sockets, each on a port the kernel picks at random, used
//! for [`SOCKET_LIFETIME`] and then replaced (as CoreDNS's forward plugin does); a retired
//! socket is closed once nothing waits on it. A query goes out under a fresh random ID, unique
//! on its socket while it waits ([`Pending`]). Queries started (or moved on) in a round are
//! queued and leave together at the end of [`UdpExchanges::collect`], one `sendmmsg` per socket
//! ([`batch::send_many`]); one the kernel refuses moves on alone. A connected socket only receives datagrams from
//! the upstream's address (and the node's rpf rule stops pods from forging it); an answer must
//! still come from the address the query went to, under its ID, and answer its question
//! ([`check_response`]). A query whose upstream times out or fails moves on to the next
//! upstream; after the last, it ends with [`ForwardError::AllUpstreamsFailed`]. A TC answer is
//! retried over TCP (a task, the rare case).

use std::future::{poll_fn, Future};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, Sleep};

use super::pending::{Pending, SocketId, Waiting};
use super::{Exchange, ForwardError, Forwarder};
use crate::answer::check_response;
use crate::batch;
use crate::metrics::UpstreamError;
use crate::query::{set_id, MessageHead};
use crate::transparent;

/// Sockets per upstream, used in turn.
const SOCKETS_PER_UPSTREAM: usize = 4;
/// How long a socket (and so its source port) takes new queries.
const SOCKET_LIFETIME: Duration = Duration::from_secs(10);
/// Each upstream socket's receive buffer: answers wait in it while the listener's task handles a
/// round. About 2 KiB each (the kernel counts whole buffers): room for about 500, more than a
/// socket's share of the queries in flight.
const UPSTREAM_RECEIVE_BUFFER: usize = 1 << 20;
/// Largest DNS message over UDP; a larger buffer would never fill.
const MAX_UDP_MESSAGE: usize = 65_535;
/// Datagrams one `recvmmsg` reads from an upstream socket.
const RECEIVE_BATCH: usize = 32;
/// `recvmmsg` calls per socket per [`UdpExchanges::collect`]: enough to empty it under load,
/// few enough that the listener is not kept waiting behind a flood.
const RECEIVES_PER_COLLECT: usize = 2;

/// A query through the upstreams, as it finished.
#[derive(Debug)]
pub(crate) struct Done<T> {
    pub(crate) context: T,
    pub(crate) query: Vec<u8>,
    pub(crate) head: MessageHead,
    pub(crate) result: Result<Exchange, ForwardError>,
}

/// A query on its way through the upstreams.
#[derive(Debug)]
struct Attempt<T> {
    context: T,
    /// As the pod sent it (its own ID).
    query: Vec<u8>,
    head: MessageHead,
    /// Index into the forwarder's upstreams of the one asked now.
    upstream: usize,
    /// When the current upstream was first asked (its answer's `elapsed`).
    started: Instant,
}

/// A query registered in [`Pending`] and waiting for its socket's next `sendmmsg`.
#[derive(Debug)]
struct Queued {
    socket: SocketId,
    id: u16,
    /// The query under `id`.
    message: Vec<u8>,
}

#[derive(Debug)]
struct UpstreamSocket {
    id: SocketId,
    upstream: SocketAddr,
    socket: Arc<UdpSocket>,
    born: Instant,
    error: ErrorSignal,
}

/// Fires when the socket has an error pending (ICMP port unreachable from an upstream that is
/// down): tokio's receive readiness does not wake for an error alone, and without this the
/// queries on the socket would wait for their timeout instead of moving on at once.
struct ErrorSignal(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl ErrorSignal {
    fn arm(socket: &Arc<UdpSocket>) -> Self {
        let socket = Arc::clone(socket);
        ErrorSignal(Some(Box::pin(async move {
            // An error of `ready` itself means the socket is unusable: as good as fired.
            let _ = socket.ready(Interest::ERROR).await;
        })))
    }

    /// Whether it fired (and stays fired until [`UpstreamSocket::take_error`] re-arms it).
    fn poll_fired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let Some(signal) = &mut self.0 else {
            return true;
        };
        if signal.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.0 = None;
        true
    }

    fn fired(&self) -> bool {
        self.0.is_none()
    }
}

impl std::fmt::Debug for ErrorSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.fired() { "fired" } else { "armed" })
    }
}

impl UpstreamSocket {
    fn new(id: SocketId, upstream: SocketAddr, born: Instant) -> io::Result<Self> {
        let socket = Arc::new(connected(upstream)?);
        let error = ErrorSignal::arm(&socket);
        Ok(UpstreamSocket {
            id,
            upstream,
            socket,
            born,
            error,
        })
    }

    /// The error its signal fired for, if still pending (a receive may have taken it first);
    /// the signal is re-armed for the next one.
    fn take_error(&mut self) -> Option<io::Error> {
        if !self.error.fired() {
            return None;
        }
        let error = self.socket.take_error().unwrap_or_else(Some);
        // Forget the error readiness tokio saw, or the new signal would fire at once.
        let _ = (self.socket).try_io(Interest::ERROR, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        self.error = ErrorSignal::arm(&self.socket);
        error
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct UdpExchanges<T> {
    forwarder: Forwarder,
    /// By upstream, in the forwarder's order: the sockets that take new queries.
    live: Vec<Vec<UpstreamSocket>>,
    /// Replaced sockets that queries still wait on.
    retired: Vec<UpstreamSocket>,
    next_socket: SocketId,
    turn: usize,
    pending: Pending<Attempt<T>>,
    /// Registered, not sent yet: sent at the end of [`UdpExchanges::collect`].
    queued: Vec<Queued>,
    timer: Pin<Box<Sleep>>,
    tcp_retries: JoinSet<Done<T>>,
    /// TCP retries that finished while [`UdpExchanges::ready`] polled them.
    tcp_done: Vec<Done<T>>,
    /// Untouched pages are never made resident (see the listener's buffers in `udp`).
    bufs: Vec<Vec<u8>>,
}

impl<T: Send + 'static> UdpExchanges<T> {
    pub(crate) fn new(forwarder: Forwarder) -> Self {
        let live = forwarder.upstreams.iter().map(|_| Vec::new()).collect();
        UdpExchanges {
            forwarder,
            live,
            retired: Vec::new(),
            next_socket: 0,
            turn: 0,
            pending: Pending::default(),
            queued: Vec::new(),
            timer: Box::pin(sleep_until(Instant::now())),
            tcp_retries: JoinSet::new(),
            tcp_done: Vec::new(),
            bufs: vec![vec![0u8; MAX_UDP_MESSAGE]; RECEIVE_BATCH],
        }
    }

    /// Queries started and not yet collected.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len() + self.tcp_retries.len() + self.tcp_done.len()
    }

    /// Queues `query` (whose head is `head`) for the first upstream; the next
    /// [`UdpExchanges::collect`] sends it. A query no upstream has a socket for ends at once, in
    /// `done`.
    pub(crate) fn start(
        &mut self,
        context: T,
        query: Vec<u8>,
        head: MessageHead,
        done: &mut Vec<Done<T>>,
    ) {
        let attempt = Attempt {
            context,
            query,
            head,
            upstream: 0,
            started: Instant::now(),
        };
        self.queue(attempt, done);
    }

    /// Completes when [`UdpExchanges::collect`] may find something: a datagram on an upstream
    /// socket, a deadline passed, a TCP retry done, queries to send. Cancel-safe.
    pub(crate) async fn ready(&mut self) {
        poll_fn(|cx| {
            let mut ready = !self.tcp_done.is_empty() || !self.queued.is_empty();
            for socket in self.live.iter_mut().flatten().chain(&mut self.retired) {
                ready |= socket.socket.poll_recv_ready(cx).is_ready();
                ready |= socket.error.poll_fired(cx);
            }
            if let Some(deadline) = self.pending.next_deadline() {
                if self.timer.deadline() != deadline {
                    self.timer.as_mut().reset(deadline);
                }
                ready |= self.timer.as_mut().poll(cx).is_ready();
            }
            while let Poll::Ready(Some(joined)) = self.tcp_retries.poll_join_next(cx) {
                // A retry task only fails by panicking, which would be our bug: its query
                // goes unanswered and the stub asks again.
                if let Ok(done) = joined {
                    self.tcp_done.push(done);
                }
                ready = true;
            }
            if ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Reads what the upstreams sent, expires what timed out (moving it to the next upstream),
    /// sends what is queued, and appends every query that finished to `done`.
    pub(crate) fn collect(&mut self, done: &mut Vec<Done<T>>) {
        done.append(&mut self.tcp_done);
        while let Some(Ok(finished)) = self.tcp_retries.try_join_next() {
            done.push(finished);
        }
        let mut failed = Vec::new();
        let sockets = self.live.iter_mut().flatten().chain(&mut self.retired);
        for socket in sockets {
            read_socket(
                socket,
                &mut self.bufs,
                &mut self.pending,
                &self.forwarder,
                &mut self.tcp_retries,
                done,
                &mut failed,
            );
            if let Some(e) = socket.take_error() {
                fail_socket(socket, &e, &mut self.pending, &self.forwarder, &mut failed);
            }
        }
        for waiting in failed {
            self.next_upstream(waiting.query, done);
        }
        for waiting in self.pending.expire(Instant::now()) {
            let upstream = waiting.upstream;
            tracing::debug!(%upstream, "upstream timed out");
            self.forwarder
                .metrics
                .upstream_error(UpstreamError::Timeout);
            self.next_upstream(waiting.query, done);
        }
        self.send_queued(done);
        let pending = &self.pending;
        self.retired.retain(|s| pending.on_socket(s.id) > 0);
    }

    /// Asks the upstream after the one that failed `attempt`, if there is one.
    fn next_upstream(&mut self, mut attempt: Attempt<T>, done: &mut Vec<Done<T>>) {
        attempt.upstream += 1;
        attempt.started = Instant::now();
        self.queue(attempt, done);
    }

    /// Queues `attempt` for its upstream, or the next one that has a socket.
    fn queue(&mut self, mut attempt: Attempt<T>, done: &mut Vec<Done<T>>) {
        while let Some(&upstream) = self.forwarder.upstreams.get(attempt.upstream) {
            match self.queue_to(attempt, upstream) {
                Ok(()) => return,
                Err((failed, e)) => {
                    tracing::debug!(%upstream, error = %e, "upstream failed");
                    self.forwarder.metrics.upstream_error(UpstreamError::Io);
                    attempt = failed;
                    attempt.upstream += 1;
                    attempt.started = Instant::now();
                }
            }
        }
        done.push(Done {
            context: attempt.context,
            query: attempt.query,
            head: attempt.head,
            result: Err(ForwardError::AllUpstreamsFailed),
        });
    }

    /// Registers `attempt` under a fresh ID and queues it for `upstream`. Registered before it
    /// is sent, so that no answer can arrive unclaimed.
    #[allow(clippy::result_large_err)] // the attempt comes back to move on; it is not boxed
    fn queue_to(
        &mut self,
        attempt: Attempt<T>,
        upstream: SocketAddr,
    ) -> Result<(), (Attempt<T>, io::Error)> {
        let index = attempt.upstream;
        let now = Instant::now();
        let turn = match self.socket_for(index, upstream, now) {
            Ok(turn) => turn,
            Err(e) => return Err((attempt, e)),
        };
        let socket = &self.live[index][turn];
        let mut message = attempt.query.clone();
        let id = self
            .pending
            .insert(socket.id, upstream, now, self.forwarder.timeout, attempt);
        set_id(&mut message, id);
        self.queued.push(Queued {
            socket: socket.id,
            id,
            message,
        });
        Ok(())
    }

    /// Sends the queued queries, one `sendmmsg` per socket (more past [`batch::MAX_BATCH`]). A
    /// query the kernel refuses moves on to the next upstream (queued and sent in turn), or ends
    /// in `done` after the last.
    fn send_queued(&mut self, done: &mut Vec<Done<T>>) {
        while !self.queued.is_empty() {
            let mut queued = std::mem::take(&mut self.queued);
            // Stable: each socket's queries leave in the order they came.
            queued.sort_by_key(|q| q.socket);
            let mut refused = Vec::new();
            for group in queued.chunk_by(|a, b| a.socket == b.socket) {
                let socket = self
                    .live
                    .iter()
                    .flatten()
                    .chain(&self.retired)
                    .find(|s| s.id == group[0].socket);
                // A queued query waits on its socket, so a retired one is still kept.
                if let Some(socket) = socket {
                    send_group(socket, group, &mut refused);
                }
            }
            for (socket, id, e) in refused {
                let Some(waiting) = self.pending.remove(socket, id) else {
                    continue;
                };
                let upstream = waiting.upstream;
                tracing::debug!(%upstream, error = %e, "upstream failed");
                self.forwarder.metrics.upstream_error(UpstreamError::Io);
                self.next_upstream(waiting.query, done);
            }
        }
    }

    /// The next live socket for upstream `index` (its position in `live[index]`), replacing it
    /// when it has lived its time.
    fn socket_for(
        &mut self,
        index: usize,
        upstream: SocketAddr,
        now: Instant,
    ) -> io::Result<usize> {
        self.turn = (self.turn + 1) % SOCKETS_PER_UPSTREAM;
        let sockets = &mut self.live[index];
        let turn = self.turn.min(sockets.len());
        let fresh = sockets
            .get(turn)
            .is_some_and(|s| now.duration_since(s.born) < SOCKET_LIFETIME);
        if fresh {
            return Ok(turn);
        }
        let replacement = UpstreamSocket::new(self.next_socket, upstream, now)?;
        self.next_socket += 1;
        if turn < sockets.len() {
            let old = std::mem::replace(&mut sockets[turn], replacement);
            self.retired.push(old);
        } else {
            sockets.push(replacement);
        }
        Ok(turn)
    }
}

/// Sends `group` (queries for `socket`), `sendmmsg` after `sendmmsg`. The kernel stops at a
/// datagram it refuses: that one goes into `refused` with the error, and the rest continue.
fn send_group(
    socket: &UpstreamSocket,
    group: &[Queued],
    refused: &mut Vec<(SocketId, u16, io::Error)>,
) {
    let mut rest = group;
    while let Some(first) = rest.first() {
        let datagrams = rest.iter().map(|q| (&q.message[..], None));
        // Straight to the kernel: tokio's `try_io` refuses until the reactor has seen the
        // socket writable, which a new socket has not yet.
        match batch::send_many(socket.socket.as_raw_fd(), datagrams, None) {
            Ok(sent) if sent > 0 => rest = &rest[sent.min(rest.len())..],
            failed => {
                let e = failed
                    .err()
                    .unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                refused.push((first.socket, first.id, e));
                rest = &rest[1..];
            }
        }
    }
}

/// Reads up to [`RECEIVES_PER_COLLECT`] `recvmmsg` batches from `socket`: an answer finishes
/// its query (or starts its TCP retry when truncated); anything else is dropped. A receive error
/// (an ICMP error such as port unreachable) fails every query waiting on the socket, into
/// `failed`.
fn read_socket<T: Send + 'static>(
    socket: &UpstreamSocket,
    bufs: &mut [Vec<u8>],
    pending: &mut Pending<Attempt<T>>,
    forwarder: &Forwarder,
    tcp_retries: &mut JoinSet<Done<T>>,
    done: &mut Vec<Done<T>>,
    failed: &mut Vec<Waiting<Attempt<T>>>,
) {
    for _ in 0..RECEIVES_PER_COLLECT {
        let received = socket.socket.try_io(Interest::READABLE, || {
            transparent::recv_many_with_orig_dst(socket.socket.as_raw_fd(), bufs)
        });
        let datagrams = match received {
            Ok(datagrams) => datagrams,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                fail_socket(socket, &e, pending, forwarder, failed);
                continue;
            }
        };
        let full = datagrams.len() == bufs.len();
        for (datagram, buf) in datagrams.into_iter().zip(&*bufs) {
            let Some(datagram) = datagram else {
                continue;
            };
            let received = Received {
                socket,
                datagram: &buf[..datagram.len],
                from: datagram.source,
            };
            received.take(pending, forwarder, tcp_retries, done);
        }
        if !full {
            return;
        }
    }
}

/// Moves every query waiting on `socket` into `failed`, for its next upstream.
fn fail_socket<T>(
    socket: &UpstreamSocket,
    error: &io::Error,
    pending: &mut Pending<Attempt<T>>,
    forwarder: &Forwarder,
    failed: &mut Vec<Waiting<Attempt<T>>>,
) {
    let upstream = socket.upstream;
    for waiting in pending.fail_socket(socket.id) {
        tracing::debug!(%upstream, %error, "upstream failed");
        forwarder.metrics.upstream_error(UpstreamError::Io);
        failed.push(waiting);
    }
}

/// One datagram read from an upstream socket.
struct Received<'a> {
    socket: &'a UpstreamSocket,
    datagram: &'a [u8],
    from: SocketAddr,
}

impl Received<'_> {
    /// Finishes the query this answers (or starts its TCP retry when truncated), or drops it.
    fn take<T: Send + 'static>(
        self,
        pending: &mut Pending<Attempt<T>>,
        forwarder: &Forwarder,
        tcp_retries: &mut JoinSet<Done<T>>,
        done: &mut Vec<Done<T>>,
    ) {
        let Received {
            socket,
            datagram,
            from,
        } = self;
        let Some(id) = datagram
            .get(..2)
            .map(|id| u16::from_be_bytes([id[0], id[1]]))
        else {
            drop_datagram(forwarder, "dropped an upstream datagram no query waits for");
            return;
        };
        let Some(waiting) = pending.get(socket.id, id, from) else {
            drop_datagram(forwarder, "dropped an upstream datagram no query waits for");
            return;
        };
        let response_head = match check_response(id, waiting.query.head.question.as_ref(), datagram)
        {
            Ok(response_head) => response_head,
            Err(why) => {
                let upstream = socket.upstream;
                tracing::debug!(%upstream, %why, "dropped a datagram that is not the answer");
                forwarder.metrics.upstream_error(UpstreamError::Mismatch);
                return;
            }
        };
        let Some(waiting) = pending.remove(socket.id, id) else {
            return;
        };
        let attempt = waiting.query;
        let response = datagram.to_vec();
        if response_head.truncated {
            tcp_retries.spawn(retry_over_tcp(
                forwarder.clone(),
                attempt,
                waiting.upstream,
                response,
                response_head,
            ));
            return;
        }
        done.push(answered(
            forwarder,
            attempt,
            waiting.upstream,
            response,
            response_head,
        ));
    }
}

fn drop_datagram(forwarder: &Forwarder, why: &'static str) {
    tracing::debug!("{why}");
    forwarder.metrics.upstream_error(UpstreamError::Mismatch);
}

/// A TC answer asks again over TCP; if that fails the pod gets the TC answer and retries over
/// TCP itself.
async fn retry_over_tcp<T>(
    forwarder: Forwarder,
    attempt: Attempt<T>,
    upstream: SocketAddr,
    response: Vec<u8>,
    response_head: MessageHead,
) -> Done<T> {
    let (response, response_head) =
        match forwarder.tcp(upstream, &attempt.query, &attempt.head).await {
            Ok(full) => full,
            Err(e) => {
                tracing::debug!(%upstream, error = ?e, "TCP retry after TC failed");
                forwarder.metrics.upstream_error(UpstreamError::TcpRetry);
                (response, response_head)
            }
        };
    answered(&forwarder, attempt, upstream, response, response_head)
}

fn answered<T>(
    forwarder: &Forwarder,
    attempt: Attempt<T>,
    upstream: SocketAddr,
    response: Vec<u8>,
    head: MessageHead,
) -> Done<T> {
    let elapsed = attempt.started.elapsed();
    forwarder.metrics.upstream_duration(elapsed.as_secs_f64());
    Done {
        context: attempt.context,
        query: attempt.query,
        head: attempt.head,
        result: Ok(Exchange {
            response,
            head,
            upstream,
            elapsed,
        }),
    }
}

/// A nonblocking UDP socket on a kernel-chosen port, connected to `upstream`.
fn connected(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(upstream)?;
    socket.set_nonblocking(true)?;
    transparent::grow_receive_buffer(&socket, UPSTREAM_RECEIVE_BUFFER);
    UdpSocket::from_std(socket)
}

#[cfg(test)]
mod tests;
