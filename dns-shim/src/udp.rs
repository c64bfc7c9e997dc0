//! Transparent UDP serving: TPROXY'd datagrams for any destination arrive on one socket with
//! IP_RECVORIGDSTADDR; each reply leaves *as the server the pod addressed*.
//!
//! Replying as that server needs its address and its port. When the original destination port
//! equals the listener's port, `sendmsg` with IP_PKTINFO / IPV6_PKTINFO sets the source address
//! (a transparent socket may use a non-local one). Otherwise (TPROXY to another port, the usual
//! case) a transparent socket bound to the original destination sends the reply; it is kept for
//! the next reply from that server (pods mostly ask one: the cluster DNS Service).
//!
//! One task serves the listener (see [`serve`]): queries arrive in batches (`recvmmsg`, each
//! with its original destination), go upstream through `forward`'s `UdpExchanges` (no task per
//! query), and their replies leave in batches (`replies`, `sendmmsg`).
//!
//! Kept reply sockets stay unconnected: TPROXY's first lookup takes only *connected* UDP sockets
//! (`nf_tproxy_get_sock_v4`, `NF_TPROXY_LOOKUP_ESTABLISHED`), so the pods' next queries still
//! reach the listener and never a reply socket.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use nix::libc;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn, SockaddrIn6};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::client::{Begin, Client, Handler, Transport, DRAIN_LIMIT};
use crate::forward::{Done, UdpExchanges};
use crate::persist::Unsaved;
use crate::transparent::{self, Sharing};

mod replies;

use replies::Outgoing;

/// Queries being forwarded at once. Each waits (its query kept) for up to the upstream
/// timeouts; beyond this a flood is dropped instead of growing without bound.
const MAX_IN_FLIGHT: usize = 1024;

/// The largest UDP payload; a larger datagram cannot arrive, so no query is cut short.
const MAX_DATAGRAM: usize = 65_535;

/// Datagrams read by one `recvmmsg`: a burst of queries costs one system call (and one
/// wake-up) instead of one each.
const RECEIVE_BATCH: usize = 32;

/// The listener's receive buffer: the queries that arrive while [`serve`]'s task handles a round
/// wait in it. A small query takes about 2 KiB of it (the kernel counts its whole buffer), so
/// this holds about 2000, more than [`MAX_IN_FLIGHT`]; the default (208 KiB) dropped bursts of
/// a few hundred.
const LISTENER_RECEIVE_BUFFER: usize = 4 << 20;

/// `recvmmsg` calls one round makes at most while its batches come back full. More would empty
/// the listener faster but send the upstream bigger bursts: 128 at once overflowed the default
/// receive buffer (about 90 small datagrams) of the loadtest's resolver.
const RECEIVE_BATCHES_PER_ROUND: usize = 2;

/// Servers whose reply socket is kept. Past this (pods asking many servers), replies from new
/// servers use a socket each, as before, instead of holding ever more descriptors.
const MAX_REPLY_SOCKETS: usize = 64;

#[derive(Debug)]
pub(crate) struct UdpListener {
    socket: UdpSocket,
    local: SocketAddr,
}

impl UdpListener {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// A transparent UDP socket on `addr` that reports original destinations.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpListener> {
    let socket = transparent::udp_listener(addr)?;
    transparent::grow_receive_buffer(&socket, LISTENER_RECEIVE_BUFFER);
    let local = socket.local_addr()?;
    Ok(UdpListener { socket, local })
}

/// A socket [`bind`] made, handed over by a predecessor.
pub(crate) fn adopt(fd: OwnedFd) -> io::Result<UdpListener> {
    let socket = std::net::UdpSocket::from(fd);
    socket.set_nonblocking(true)?;
    let socket = UdpSocket::from_std(socket)?;
    let local = socket.local_addr()?;
    Ok(UdpListener { socket, local })
}

impl AsFd for UdpListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Answers queries until `stopped` turns true, then those already read (for up to
/// [`DRAIN_LIMIT`]).
///
/// One task does it all, in rounds: read a batch of queries and queue each for the upstream (or
/// settle it at once), read the upstreams' answers and what timed out, send the queued queries
/// (one `sendmmsg` per upstream socket), complete each finished query (its answer recorded in
/// the table, its journal records gathered), save the round's journal records in one write, and
/// only then send the round's replies together.
pub(crate) async fn serve<H: Handler>(
    shim: Arc<H>,
    listener: UdpListener,
    mut stopped: watch::Receiver<bool>,
) {
    let local = listener.local;
    let socket = listener.socket;
    let reply_sockets = ReplySockets::default();
    let mut exchanges = shim.udp_exchanges();
    // Untouched pages of these buffers are never made resident: the kernel writes only what
    // arrives, so a batch of full-size buffers costs little memory.
    let mut bufs = vec![vec![0u8; MAX_DATAGRAM]; RECEIVE_BATCH];
    let mut done = Vec::new();
    let mut unsaved = Unsaved::default();
    let mut outgoing = Vec::new();
    let mut draining: Option<Instant> = None;
    loop {
        if draining.is_some() && exchanges.in_flight() == 0 {
            break;
        }
        tokio::select! {
            received = socket.async_io(Interest::READABLE, || {
                transparent::recv_many_with_orig_dst(socket.as_raw_fd(), &mut bufs)
            }), if draining.is_none() => {
                let mut received = Some(received);
                // A burst is read on while it lasts (up to a bound), so that the socket's
                // buffer does not fill while the round's answers are handled.
                for _ in 0..RECEIVE_BATCHES_PER_ROUND {
                    let received = received.take().unwrap_or_else(|| {
                        socket.try_io(Interest::READABLE, || {
                            transparent::recv_many_with_orig_dst(socket.as_raw_fd(), &mut bufs)
                        })
                    });
                    let datagrams = match received {
                        Ok(datagrams) => datagrams,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "UDP receive failed");
                            break;
                        }
                    };
                    let full = datagrams.len() == RECEIVE_BATCH;
                    for (datagram, buf) in datagrams.into_iter().zip(&bufs) {
                        let Some(datagram) = datagram else {
                            continue;
                        };
                        let client = Client {
                            pod: datagram.source,
                            server: datagram.orig_dst.unwrap_or(local),
                            transport: Transport::Udp,
                        };
                        let query = &buf[..datagram.len];
                        take(&*shim, &mut exchanges, query, client, &mut done, &mut outgoing);
                    }
                    if !full {
                        break;
                    }
                }
            }
            () = exchanges.ready() => {}
            _ = stopped.wait_for(|stop| *stop), if draining.is_none() => {
                draining = Some(Instant::now() + DRAIN_LIMIT);
            }
            () = sleep_until(draining.unwrap_or_else(Instant::now)), if draining.is_some() => {
                tracing::info!(
                    left = exchanges.in_flight(),
                    "queries still waiting on an upstream dropped at stop"
                );
                break;
            }
        }
        exchanges.collect(&mut done);
        for finished in done.drain(..) {
            let client = finished.context;
            if let Some(reply) = shim.complete(finished, &mut unsaved) {
                outgoing.push(Outgoing { reply, client });
            }
        }
        // Saved before any reply of the round leaves.
        shim.save(&mut unsaved);
        if !outgoing.is_empty() {
            replies::send_batch(&socket, &reply_sockets, local, &mut outgoing).await;
            outgoing.clear();
        }
    }
}

/// Starts `query` through the pipeline: its reply now (REFUSED) into `outgoing`, or upstream.
fn take<H: Handler>(
    shim: &H,
    exchanges: &mut UdpExchanges<Client>,
    query: &[u8],
    client: Client,
    done: &mut Vec<Done<Client>>,
    outgoing: &mut Vec<Outgoing>,
) {
    match shim.begin(query, client) {
        Begin::Reply(Some(reply)) => outgoing.push(Outgoing { reply, client }),
        Begin::Reply(None) => {}
        Begin::Forward(_) if exchanges.in_flight() >= MAX_IN_FLIGHT => {
            tracing::debug!(pod = %client.pod, "UDP queries over capacity; dropped");
            shim.note_dropped(Transport::Udp);
        }
        Begin::Forward(head) => exchanges.start(client, query.to_vec(), head, done),
    }
}

/// Sends `reply` to the pod from the address (and port) it addressed.
async fn send_reply(
    socket: &UdpSocket,
    reply_sockets: &ReplySockets,
    local: SocketAddr,
    reply: &[u8],
    client: Client,
) -> io::Result<()> {
    let server = client.server;
    if server == local {
        socket.send_to(reply, client.pod).await?;
        return Ok(());
    }
    if server.port() == local.port() {
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                send_from(socket.as_raw_fd(), reply, client.pod, server.ip())
            })
            .await;
        match sent {
            Ok(_) => return Ok(()),
            Err(e) => tracing::debug!(error = %e, "IP_PKTINFO send failed; binding the source"),
        }
    }
    reply_sockets
        .bound_to(server)?
        .send_to(reply, client.pod)
        .await?;
    Ok(())
}

/// Transparent sockets bound to the servers pods addressed, kept for their next replies.
#[derive(Debug, Default)]
struct ReplySockets {
    by_server: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

impl ReplySockets {
    /// The kept socket for `server`, or a new one (kept while there is room).
    fn bound_to(&self, server: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let mut by_server = self
            .by_server
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(socket) = by_server.get(&server) {
            return Ok(Arc::clone(socket));
        }
        // Not SO_REUSEPORT: the listener alone receives queries.
        let socket = transparent::udp_bound_to(server, Sharing::Address)?;
        let socket = Arc::new(UdpSocket::from_std(socket.into())?);
        if by_server.len() < MAX_REPLY_SOCKETS {
            by_server.insert(server, Arc::clone(&socket));
        }
        Ok(socket)
    }
}

/// `sendmsg` with IP_PKTINFO / IPV6_PKTINFO choosing `source` as the source address.
fn send_from(fd: RawFd, reply: &[u8], pod: SocketAddr, source: IpAddr) -> io::Result<usize> {
    let iov = [IoSlice::new(reply)];
    match (pod, source) {
        (SocketAddr::V4(pod), IpAddr::V4(source)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                // Network byte order: the octets as they are in memory.
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(source.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsgs = [ControlMessage::Ipv4PacketInfo(&info)];
            Ok(sendmsg(
                fd,
                &iov,
                &cmsgs,
                MsgFlags::empty(),
                Some(&SockaddrIn::from(pod)),
            )?)
        }
        (SocketAddr::V6(pod), IpAddr::V6(source)) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: source.octets(),
                },
                ipi6_ifindex: 0,
            };
            let cmsgs = [ControlMessage::Ipv6PacketInfo(&info)];
            Ok(sendmsg(
                fd,
                &iov,
                &cmsgs,
                MsgFlags::empty(),
                Some(&SockaddrIn6::from(pod)),
            )?)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "pod and server address families differ",
        )),
    }
}
