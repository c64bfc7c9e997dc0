//! Transparent TCP listeners: nftables TPROXY hands them connections addressed to anywhere, and
//! each accepted socket's local address is the destination the pod asked for.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Pending connections per listener: a node's pods may open many at once.
const BACKLOG: i32 = 4096;

/// A plain TCP listener (the admin endpoint) that a second gateway on the node can share.
pub fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds `addr` with IP_TRANSPARENT (IPV6_TRANSPARENT and IPV6_V6ONLY for IPv6, so a v4 and a
/// v6 listener on the same port coexist). Needs CAP_NET_ADMIN.
pub fn bind_transparent(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // A rolling update starts the new gateway beside the old one on the same node: both accept
    // until the old one drains.
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A listener [`bind_transparent`] made in a predecessor, handed over: same socket, same queue.
pub fn adopt(fd: OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}
