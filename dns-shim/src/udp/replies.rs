//! Batched replies: the listener's task gathers the replies of a round (see `udp::serve`) and
//! sends them with `sendmmsg`, one system call per sending socket (and source address) instead
//! of one per reply. Batches form on their own under load: a round holds whatever the upstreams
//! answered since the last; a lone query's reply leaves at once.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{send_reply, ReplySockets};
use crate::batch::send_many;
use crate::client::Client;

/// One answer for a pod, ready to send.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) reply: Vec<u8>,
    pub(super) client: Client,
}

/// How a reply leaves as the server the pod addressed (see the `udp` module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    /// The pod addressed the listener itself.
    Listener,
    /// Same port as the listener: the listener, with IP_PKTINFO choosing this source.
    ListenerFrom(IpAddr),
    /// Another port: a transparent socket bound to the server.
    Bound(SocketAddr),
}

impl Route {
    fn of(local: SocketAddr, server: SocketAddr) -> Route {
        if server == local {
            Route::Listener
        } else if server.port() == local.port() {
            Route::ListenerFrom(server.ip())
        } else {
            Route::Bound(server)
        }
    }
}

/// Sends `batch`, grouped by route (in order within a route).
pub(super) async fn send_batch(
    listener: &UdpSocket,
    reply_sockets: &ReplySockets,
    local: SocketAddr,
    batch: &mut [Outgoing],
) {
    batch.sort_by_key(|o| Route::of(local, o.client.server));
    for group in batch.chunk_by(|a, b| a.client.server == b.client.server) {
        let route = Route::of(local, group[0].client.server);
        let bound;
        let (socket, source) = match route {
            Route::Listener => (listener, None),
            Route::ListenerFrom(source) => (listener, Some(source)),
            Route::Bound(server) => match reply_sockets.bound_to(server) {
                Ok(socket) => {
                    bound = socket;
                    (&*bound, None)
                }
                Err(e) => {
                    tracing::debug!(%server, error = %e, replies = group.len(),
                        "UDP replies failed: no socket for the server");
                    continue;
                }
            },
        };
        let alone = Alone {
            listener,
            reply_sockets,
            local,
        };
        send_group(socket, source, group, &alone).await;
    }
}

/// What sending one reply alone needs: the unbatched path, which can fall back from
/// IP_PKTINFO to a bound socket.
struct Alone<'a> {
    listener: &'a UdpSocket,
    reply_sockets: &'a ReplySockets,
    local: SocketAddr,
}

/// Sends `group` (one server) on `socket`, `sendmmsg` after `sendmmsg`. A reply the kernel
/// refuses is sent [`Alone`] instead, and the rest continue in batches.
async fn send_group(
    socket: &UdpSocket,
    source: Option<IpAddr>,
    group: &[Outgoing],
    alone: &Alone<'_>,
) {
    let mut rest = group;
    while !rest.is_empty() {
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                let datagrams = rest.iter().map(|o| (&o.reply[..], Some(o.client.pod)));
                send_many(socket.as_raw_fd(), datagrams, source)
            })
            .await;
        match sent {
            Ok(n) if n > 0 => rest = &rest[n..],
            // sendmmsg fails only when its first message does: send that one alone.
            failed => {
                tracing::debug!(result = ?failed, "sendmmsg failed; sending one reply alone");
                let failed = &rest[0];
                let sent = send_reply(
                    alone.listener,
                    alone.reply_sockets,
                    alone.local,
                    &failed.reply,
                    failed.client,
                )
                .await;
                if let Err(e) = sent {
                    tracing::debug!(pod = %failed.client.pod, server = %failed.client.server,
                        error = %e, "UDP reply failed");
                }
                rest = &rest[1..];
            }
        }
    }
}

#[cfg(test)]
mod tests;
