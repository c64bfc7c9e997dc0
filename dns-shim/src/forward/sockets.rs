//! Connected UDP sockets to the trusted upstreams, shared by queries and renewed often.
//!
//! A socket per query cost six system calls on every query (socket, bind, connect, two
//! epoll_ctl, close). Instead each upstream has a few connected sockets, each on a port the
//! kernel picks at random, used for [`SOCKET_LIFETIME`] and then replaced (as CoreDNS's forward
//! plugin does). A reader task per socket hands each datagram to the query waiting under its
//! ID; IDs are random and unique per socket while in flight. A connected socket only receives
//! datagrams from the upstream's address (and the node's rpf rule stops pods from forging it);
//! the waiting query still checks the answer against its question.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

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
        in_flight.shared.socket.send(&with_id(query, id)).await?;
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
        let shared = Arc::new(Shared {
            socket: connected(upstream)?,
            born: Instant::now(),
            waiting: Mutex::new(HashMap::new()),
        });
        tokio::spawn(read(Arc::clone(&shared), self.metrics.clone()));
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
