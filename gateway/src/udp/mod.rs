//! The UDP relay: UDP (other than DNS) from pods under an enforce policy, decided flow by flow.
//!
//! ```text
//! pod ─ UDP, not :53 ─▶ nftables intercept
//!   flow (pod, dst, port) in udp_flows ─▶ passes at kernel speed, refreshes the idle timeout
//!   ─▶ udp_policy: pod in udp_unpoliced (no enforce policy) ─▶ as before: passes (443 refused
//!   with blockQuic)
//!   else ─ tproxy ─▶ relay (udp.listen): Flows.see
//!     allowed ─▶ send it on as the pod, marked udp.flowMark ─▶ udp_output adds the flow to
//!                udp_flows: the kernel carries the next datagrams
//!     denied (within udp.deniedFlowSeconds) ─▶ drop
//!     new ─▶ Decider.decide (identify, select, names, udp grants ─▶ decision line) ─▶ settle
//!            allow/audit: send the queued datagrams on │ deny: drop them
//! ```
//!
//! Why a set fed from the data path, and not a set the gateway writes or a relay for every
//! datagram: the kernel matches (pod, destination, port) in one lookup per datagram, so an
//! allowed flow costs no copy through the gateway; and the element is added by the datagram
//! that opened the flow (an `output` rule on the mark), so allowing a flow costs no `nft`
//! process and no netlink round trip, and no datagram can overtake the decision. The relay sees
//! only the first datagrams of each flow (and all of a denied one, dropped).
//!
//! It sends a datagram as the pod: a transparent socket bound to the pod's address and port,
//! so the server's answers go to the pod directly (routed, never through the gateway) and the
//! flow is the one the pod's next datagrams belong to.

mod decide;
mod flows;
mod unpoliced;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use egressgate_dns_shim::transparent::{self, Sharing};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::time::Instant;

pub(crate) use decide::Decider;
use flows::{FlowKey, Flows, Queued, Seen};
pub(crate) use unpoliced::keep_unpoliced;

use crate::config;
use crate::connection::{ClientAddr, OrigDstAddr};
use crate::decision::Verdict;

/// The largest UDP payload: nothing a pod sends is cut short.
const MAX_DATAGRAM: usize = 65_535;

/// Shared by the relay's sockets and the tasks deciding flows.
#[derive(Debug)]
pub(crate) struct UdpRelay {
    decider: Decider,
    flows: Mutex<Flows>,
    flow_mark: u32,
}

impl UdpRelay {
    pub(crate) fn new(decider: Decider, config: &config::Udp) -> Self {
        UdpRelay {
            decider,
            flows: Mutex::new(Flows::new(
                config.max_flows,
                config.flow_idle(),
                config.denied_flow(),
            )),
            flow_mark: config.flow_mark,
        }
    }

    /// A transparent socket for TPROXY'd datagrams on `addr`.
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
        transparent::udp_listener(addr)
    }

    /// Relays what arrives on `socket` until `shutdown`.
    pub(crate) async fn serve(self: Arc<Self>, socket: UdpSocket, shutdown: impl Future) {
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = tokio::select! {
                _ = &mut shutdown => return,
                received = socket.async_io(Interest::READABLE, || {
                    transparent::recv_with_orig_dst(socket.as_raw_fd(), &mut buf)
                }) => received,
            };
            let datagram = match received {
                Ok(Some(datagram)) => datagram,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP relay receive failed");
                    continue;
                }
            };
            // Without the original destination there is nowhere to send it.
            let Some(destination) = datagram.orig_dst else {
                continue;
            };
            self.received(datagram.source, destination, &buf[..datagram.len]);
        }
    }

    /// One datagram from `source` (a pod) to `destination`.
    fn received(self: &Arc<Self>, source: SocketAddr, destination: SocketAddr, payload: &[u8]) {
        let key = FlowKey {
            pod: source.ip().to_canonical(),
            destination: destination.ip().to_canonical(),
            port: destination.port(),
        };
        let mut flows = self.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = flows.see(key, Instant::now());
        let queued = || Queued {
            source,
            destination,
            payload: payload.to_vec(),
        };
        match seen {
            Seen::Allowed => {
                drop(flows);
                self.send_on(source, destination, payload);
            }
            Seen::Denied => self.drop_datagram("denied"),
            Seen::Full => self.drop_datagram("flow_limit"),
            Seen::Deciding => {
                if !flows.queue(key, queued()) {
                    self.drop_datagram("deciding_queue_full");
                }
            }
            Seen::New => {
                flows.queue(key, queued());
                drop(flows);
                let relay = Arc::clone(self);
                tokio::spawn(async move {
                    let verdict = relay
                        .decider
                        .decide(ClientAddr(source), OrigDstAddr(destination))
                        .await;
                    relay.settle(key, verdict);
                });
            }
        }
    }

    /// The verdict for `key`: the datagrams that waited go on, or are dropped.
    fn settle(&self, key: FlowKey, verdict: Verdict) {
        let allowed = verdict != Verdict::Deny;
        let queued = self
            .flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .settle(key, allowed, Instant::now());
        for datagram in queued {
            if allowed {
                self.send_on(datagram.source, datagram.destination, &datagram.payload);
            } else {
                self.drop_datagram("denied");
            }
        }
    }

    /// Every decided flow is decided again at its next datagram (policies or selections
    /// changed); the kernel's `udp_flows` are flushed beside this.
    pub(crate) fn forget_decided(&self) {
        self.flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_decided();
    }

    /// Sends `payload` to `destination` as `source` (the pod), marked so that the kernel adds
    /// the flow to `udp_flows`.
    fn send_on(&self, source: SocketAddr, destination: SocketAddr, payload: &[u8]) {
        let sent = send_as(source, destination, payload, self.flow_mark);
        match sent {
            Ok(_) => self.decider.metrics.udp_relayed.inc(),
            Err(e) => {
                tracing::debug!(%source, %destination, error = %e, "UDP relay send failed");
                self.drop_datagram("send_failed");
            }
        }
    }

    fn drop_datagram(&self, reason: &str) {
        self.decider
            .metrics
            .udp_dropped
            .with_label_values(&[reason])
            .inc();
    }
}

/// One datagram from a transparent socket bound to `source` (not a local address: IP_TRANSPARENT
/// allows it), with SO_MARK `mark`. A socket per datagram: only a flow's first datagrams come
/// here. It is never connected, so no answer to the pod is ever delivered to it.
fn send_as(
    source: SocketAddr,
    destination: SocketAddr,
    payload: &[u8],
    mark: u32,
) -> io::Result<usize> {
    let socket = transparent::udp_bound_to(source, Sharing::Address)?;
    socket.set_mark(mark)?;
    socket.send_to(payload, &destination.into())
}
