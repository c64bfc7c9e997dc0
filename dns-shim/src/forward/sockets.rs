//! Connected UDP sockets to the trusted upstreams, shared by queries and renewed often.
//!
//! A socket per query cost six system calls on every query (socket, bind, connect, two
//! epoll_ctl, close). Instead each upstream has a few connected sockets, each on a port the
//! kernel picks at random, used for [`SOCKET_LIFETIME`] and then replaced (as CoreDNS's forward
//! plugin does). A reader task per socket hands each datagram to the query waiting under its
//! ID; IDs are random and unique per socket while in flight. A connected socket only receives
//! datagrams from the upstream's address (and the node's rpf rule stops pods from forging it);
//! the waiting query still checks the answer against its question.
//!
//! Queries leave in batches: `send` queues the datagram for the socket's sender task, which
//! yields once after the first (so the queries the runtime already woke queue theirs) and sends
//! the queue with one `sendmmsg`. A send the kernel refuses reaches the query as a failed
//! delivery, as a receive error does, so it tries the next upstream.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use nix::sys::socket::{sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::metrics::{Metrics, UpstreamError};
use crate::query::with_id;

/// Sockets per upstream, used in turn.
const SOCKETS_PER_UPSTREAM: usize = 4;
/// How long a socket (and so its source port) takes new queries.
const SOCKET_LIFETIME: Duration = Duration::from_secs(10);
/// How often an idle reader checks whether its socket was retired and nobody waits on it.
const RETIRED_CHECK: Duration = Duration::from_secs(1);
/// Largest DNS message over UDP; a larger buffer would never fill.
const MAX_UDP_MESSAGE: usize = 65_535;
/// Datagrams queued for one query: the answer plus a few forgeries or duplicates.
const QUEUED_PER_QUERY: usize = 4;
/// Queries sent by one `sendmmsg` at most.
const MAX_SEND_BATCH: usize = 64;

/// What the reader hands a waiting query.
#[derive(Debug)]
pub(crate) enum Delivery {
    Datagram(Vec<u8>),
    /// The socket failed (an ICMP error such as port unreachable, reported on the next receive).
    Failed(io::ErrorKind),
}

/// The shared sockets of every upstream.
#[derive(Debug)]
pub(crate) struct UpstreamSockets {
    /// Searched in order: the trusted upstreams are a handful, and hashing a `SocketAddr` on
    /// every query cost more than comparing a few.
    by_upstream: Mutex<Vec<(SocketAddr, Vec<Arc<Shared>>)>>,
    turn: AtomicUsize,
    metrics: Metrics,
}

#[derive(Debug)]
struct Shared {
    socket: UdpSocket,
    born: Instant,
    waiting: Mutex<HashMap<u16, mpsc::Sender<Delivery>>>,
    /// Queries (ID, datagram) for the sender task; unbounded, but each query in flight queues
    /// one, and the queries in flight are bounded by the transports.
    outbox: mpsc::UnboundedSender<(u16, Vec<u8>)>,
}

/// One query sent on a shared socket; its ID is freed when this is dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    shared: Arc<Shared>,
    pub(crate) id: u16,
    deliveries: mpsc::Receiver<Delivery>,
}

impl UpstreamSockets {
    pub(crate) fn new(metrics: Metrics) -> Self {
        UpstreamSockets {
            by_upstream: Mutex::new(Vec::new()),
            turn: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Sends `query` to `upstream` under a fresh random ID (written over the query's own).
    pub(crate) async fn send(&self, upstream: SocketAddr, query: &[u8]) -> io::Result<InFlight> {
        let shared = self.socket_for(upstream)?;
        let (sender, deliveries) = mpsc::channel(QUEUED_PER_QUERY);
        let id = {
            let mut waiting = lock(&shared.waiting);
            let id = loop {
                let id: u16 = rand::random();
                if !waiting.contains_key(&id) {
                    break id;
                }
            };
            waiting.insert(id, sender);
            id
        };
        // Registered before sending, so that no answer can arrive unclaimed.
        let in_flight = InFlight {
            shared,
            id,
            deliveries,
        };
        in_flight
            .shared
            .outbox
            .send((id, with_id(query, id)))
            .map_err(|_| io::Error::other("upstream socket sender gone"))?;
        Ok(in_flight)
    }

    /// The next socket for `upstream`, replacing it when it has lived its time.
    fn socket_for(&self, upstream: SocketAddr) -> io::Result<Arc<Shared>> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % SOCKETS_PER_UPSTREAM;
        let mut by_upstream = lock(&self.by_upstream);
        let at = match by_upstream.iter().position(|(addr, _)| *addr == upstream) {
            Some(at) => at,
            None => {
                by_upstream.push((upstream, Vec::new()));
                by_upstream.len() - 1
            }
        };
        let sockets = &mut by_upstream[at].1;
        if let Some(shared) = sockets.get(turn) {
            if shared.born.elapsed() < SOCKET_LIFETIME {
                return Ok(Arc::clone(shared));
            }
        }
        let (outbox, queued) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            socket: connected(upstream)?,
            born: Instant::now(),
            waiting: Mutex::new(HashMap::new()),
            outbox,
        });
        tokio::spawn(read(Arc::clone(&shared), self.metrics.clone()));
        tokio::spawn(send_queued(Arc::downgrade(&shared), queued));
        match sockets.get_mut(turn) {
            // The retired socket's reader ends once its last waiting query is done.
            Some(slot) => *slot = Arc::clone(&shared),
            None => sockets.push(Arc::clone(&shared)),
        }
        Ok(shared)
    }
}

impl InFlight {
    /// The next datagram for this query; `None` if the socket's reader is gone.
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.shared.waiting).remove(&self.id);
    }
}

/// Hands each datagram to the query waiting under its ID until the socket is retired and
/// nobody waits on it any more.
async fn read(shared: Arc<Shared>, metrics: Metrics) {
    let mut buf = vec![0u8; MAX_UDP_MESSAGE];
    loop {
        let received = match timeout(RETIRED_CHECK, shared.socket.recv(&mut buf)).await {
            Ok(received) => received,
            // Only this task holds it: retired from the pool and no query in flight.
            Err(_) if Arc::strong_count(&shared) == 1 => return,
            Err(_) => continue,
        };
        match received {
            Ok(len) => {
                let datagram = &buf[..len];
                let waiting = datagram
                    .get(..2)
                    .map(|id| u16::from_be_bytes([id[0], id[1]]))
                    .and_then(|id| lock(&shared.waiting).get(&id).cloned());
                match waiting {
                    Some(query) => {
                        // A full queue means a flood of datagrams under one ID: drop the rest.
                        let _ = query.try_send(Delivery::Datagram(datagram.to_vec()));
                    }
                    None => {
                        tracing::debug!("dropped an upstream datagram no query waits for");
                        metrics.upstream_error(UpstreamError::Mismatch);
                    }
                }
            }
            Err(e) => {
                let queries: Vec<_> = lock(&shared.waiting).values().cloned().collect();
                for query in queries {
                    let _ = query.try_send(Delivery::Failed(e.kind()));
                }
            }
        }
    }
}

/// Sends the queued queries in batches until the socket is dropped (its outbox with it).
async fn send_queued(shared: Weak<Shared>, mut queued: mpsc::UnboundedReceiver<(u16, Vec<u8>)>) {
    let mut batch = Vec::with_capacity(MAX_SEND_BATCH);
    while let Some(first) = queued.recv().await {
        batch.push(first);
        // Let the queries already woken queue theirs, so that they leave together.
        tokio::task::yield_now().await;
        while batch.len() < MAX_SEND_BATCH {
            match queued.try_recv() {
                Ok(query) => batch.push(query),
                Err(_) => break,
            }
        }
        // Not kept across batches, so that a retired socket's reader can see it unused.
        let Some(shared) = shared.upgrade() else {
            return;
        };
        send_batch(&shared, &batch).await;
        batch.clear();
    }
}

/// Sends `batch` on the shared socket; a query whose datagram the kernel refuses gets a
/// failed delivery at once.
async fn send_batch(shared: &Shared, batch: &[(u16, Vec<u8>)]) {
    let mut rest = batch;
    while !rest.is_empty() {
        let sent = shared
            .socket
            .async_io(Interest::WRITABLE, || {
                send_many(shared.socket.as_raw_fd(), rest)
            })
            .await;
        match sent {
            Ok(n) if n > 0 => rest = &rest[n..],
            // sendmmsg fails only when its first datagram does.
            failed => {
                let kind = failed.err().map_or(io::ErrorKind::Other, |e| e.kind());
                let (id, _) = rest[0];
                if let Some(query) = lock(&shared.waiting).get(&id) {
                    let _ = query.try_send(Delivery::Failed(kind));
                }
                rest = &rest[1..];
            }
        }
    }
}

/// One `sendmmsg` of up to [`MAX_SEND_BATCH`] datagrams on a connected socket; how many left.
fn send_many(fd: RawFd, datagrams: &[(u16, Vec<u8>)]) -> io::Result<usize> {
    let datagrams = &datagrams[..datagrams.len().min(MAX_SEND_BATCH)];
    let iovs: Vec<[IoSlice<'_>; 1]> = datagrams.iter().map(|(_, d)| [IoSlice::new(d)]).collect();
    let to: Vec<Option<SockaddrStorage>> = vec![None; datagrams.len()];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(datagrams.len(), None);
    let sent = sendmmsg(fd, &mut headers, &iovs, &to, [], MsgFlags::empty())?;
    Ok(sent.count())
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
    UdpSocket::from_std(socket)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
