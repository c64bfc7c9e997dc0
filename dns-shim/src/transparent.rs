//! Transparent sockets: bound to addresses that need not be the node's own, so nftables TPROXY
//! can hand them traffic addressed to anywhere, and a reply can leave as the server a pod
//! addressed. The one setup for the gateway's TCP listeners and the shim's UDP and TCP sockets.
//!
//! Every one is nonblocking, has IP_TRANSPARENT (IPV6_TRANSPARENT and IPV6_V6ONLY for IPv6, so a
//! v4 and a v6 socket on the same port coexist) and SO_REUSEADDR. Setting IP_TRANSPARENT needs
//! CAP_NET_ADMIN.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

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
