//! Transparent sockets: bound to addresses that need not be the node's own, so nftables TPROXY
//! can hand them traffic addressed to anywhere, and a reply can leave as the server a pod
//! addressed. The one setup for the gateway's TCP listeners and UDP relay and the shim's UDP and
//! TCP sockets.
//!
//! Every one is nonblocking, has IP_TRANSPARENT (IPV6_TRANSPARENT and IPV6_V6ONLY for IPv6, so a
//! v4 and a v6 socket on the same port coexist) and SO_REUSEADDR. Setting IP_TRANSPARENT needs
//! CAP_NET_ADMIN.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, OwnedFd, RawFd};

use nix::libc;
use nix::sys::socket::{
    recvmmsg, recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, MultiHeaders, RecvMsg,
    SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

/// Which protocol a [`socket`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
}

/// Whether a [`socket`] joins others on the same address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// SO_REUSEADDR only: the shim's reply sockets, bound to the address (and port) a pod asked,
    /// which a listener may share.
    Address,
    /// SO_REUSEPORT as well: a rolling update starts the new gateway beside the old one on the
    /// same node, and both serve until the old one drains.
    Port,
}

/// A transparent socket for `addr`'s family, configured but not bound yet.
pub fn socket(addr: SocketAddr, kind: Kind, sharing: Sharing) -> io::Result<Socket> {
    let (ty, protocol) = match kind {
        Kind::Tcp => (Type::STREAM, Protocol::TCP),
        Kind::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_reuse_address(true)?;
    if sharing == Sharing::Port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A transparent TCP listener on `addr` (sharing its port) with `backlog` pending connections.
/// Each accepted socket's local address is the destination the client asked for.
pub fn tcp_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = socket(addr, Kind::Tcp, Sharing::Port)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    TcpListener::from_std(socket.into())
}

/// A listener [`tcp_listener`] made in a predecessor, handed over: same socket, same queue.
pub fn adopt_tcp_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// A transparent UDP socket on `addr` (sharing its port) that reports each datagram's original
/// destination (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR): read it with [`recv_with_orig_dst`].
pub fn udp_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket(addr, Kind::Udp, Sharing::Port)?;
    if addr.is_ipv6() {
        setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true)?;
    } else {
        setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true)?;
    }
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A transparent UDP socket bound to `addr`, which need not be local: to send as the server a
/// pod addressed, or as the pod itself.
pub fn udp_bound_to(addr: SocketAddr, sharing: Sharing) -> io::Result<Socket> {
    let socket = socket(addr, Kind::Udp, sharing)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// One datagram read by [`recv_with_orig_dst`].
#[derive(Debug, Clone, Copy)]
pub struct Datagram {
    pub len: usize,
    /// Who sent it.
    pub source: SocketAddr,
    /// The address it was sent to, from IP_RECVORIGDSTADDR; `None` if the kernel sent none.
    pub orig_dst: Option<SocketAddr>,
}

/// `recvmsg` on a [`udp_listener`] with the original destination control message.
/// `Ok(None)`: a datagram not worth handling (truncated, or no usable source address).
pub fn recv_with_orig_dst(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<Datagram>> {
    let mut iov = [IoSliceMut::new(buf)];
    // Room for either family's original destination.
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    datagram(&msg)
}

/// Asks for a receive buffer of `bytes` on `socket`: past `net.core.rmem_max` with
/// CAP_NET_ADMIN (SO_RCVBUFFORCE), else as much as that limit allows. A socket served in rounds
/// by one task holds a burst in its buffer until the next read; too small a buffer drops it.
pub(crate) fn grow_receive_buffer(socket: &impl AsFd, bytes: usize) {
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        if let Err(e) = setsockopt(socket, sockopt::RcvBuf, &bytes) {
            tracing::debug!(error = %e, "SO_RCVBUF not set");
        }
    }
}

/// `recvmmsg` on a [`udp_listener`]: up to `bufs.len()` datagrams in one system call, the
/// `i`-th into `bufs[i]`. Entry `i` of the result describes `bufs[i]` (`None` as in
/// [`recv_with_orig_dst`]); there are as many entries as datagrams read, at least one.
pub fn recv_many_with_orig_dst(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
) -> io::Result<Vec<Option<Datagram>>> {
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
        bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
    // Room for either family's original destination, per datagram.
    let cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(iovs.len(), Some(cmsg));
    let received = recvmmsg(fd, &mut headers, &mut iovs, MsgFlags::empty(), None)?;
    received.map(|msg| datagram(&msg)).collect()
}

/// What one received message says, `None` when it is not worth handling.
fn datagram(msg: &RecvMsg<'_, '_, SockaddrStorage>) -> io::Result<Option<Datagram>> {
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Ok(None);
    }
    let mut orig_dst = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                orig_dst = Some(SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(sin))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                orig_dst = Some(SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(sin6))));
            }
            _ => {}
        }
    }
    let source = msg.address.as_ref().and_then(to_socket_addr);
    Ok(source.map(|source| Datagram {
        len: msg.bytes,
        source,
        orig_dst,
    }))
}

fn to_socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::AsRawFd;

    use super::*;

    /// IP_RECVORIGDSTADDR needs no privilege: on a plain socket the original destination is the
    /// socket's own address.
    #[test]
    fn recvmmsg_reads_a_burst_with_each_source_and_destination() {
        let listener = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
        setsockopt(&listener, sockopt::Ipv4OrigDstAddr, &true).expect("IP_RECVORIGDSTADDR");
        listener.set_nonblocking(true).expect("nonblocking");
        let local = listener.local_addr().expect("local");
        let (a, b) = (
            UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("a"),
            UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("b"),
        );
        a.send_to(b"first", local).expect("send");
        b.send_to(b"second!", local).expect("send");
        a.send_to(b"third", local).expect("send");
        let mut bufs = vec![vec![0u8; 64]; 8];
        let read = recv_many_with_orig_dst(listener.as_raw_fd(), &mut bufs).expect("recvmmsg");
        let seen: Vec<_> = read
            .iter()
            .zip(&bufs)
            .map(|(d, buf)| {
                let d = d.expect("a whole datagram with a source");
                assert_eq!(d.orig_dst, Some(local));
                (buf[..d.len].to_vec(), d.source)
            })
            .collect();
        let from = |s: &UdpSocket| s.local_addr().expect("addr");
        assert_eq!(
            seen,
            vec![
                (b"first".to_vec(), from(&a)),
                (b"second!".to_vec(), from(&b)),
                (b"third".to_vec(), from(&a)),
            ]
        );
        // Nothing left: the nonblocking socket says so instead of waiting.
        let empty = recv_many_with_orig_dst(listener.as_raw_fd(), &mut bufs);
        assert_eq!(
            empty.map(|d| d.len()).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
    }

    #[test]
    fn a_truncated_datagram_is_not_handled() {
        let listener = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let local = listener.local_addr().expect("local");
        let a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("a");
        a.send_to(&[7u8; 100], local).expect("send");
        a.send_to(&[8u8; 10], local).expect("send");
        let mut bufs = vec![vec![0u8; 32]; 4];
        let read = recv_many_with_orig_dst(listener.as_raw_fd(), &mut bufs).expect("recvmmsg");
        assert_eq!(read.len(), 2);
        assert!(read[0].is_none());
        assert_eq!(read[1].map(|d| d.len), Some(10));
    }
}
