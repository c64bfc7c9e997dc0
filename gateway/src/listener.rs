//! Transparent TCP listeners: nftables TPROXY hands them connections addressed to anywhere, and
//! each accepted socket's local address is the destination the pod asked for.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use egressgate_dns_shim::transparent;
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

/// Binds a transparent listener on `addr` (see [`transparent`]; needs CAP_NET_ADMIN).
pub fn bind_transparent(addr: SocketAddr) -> io::Result<TcpListener> {
    transparent::tcp_listener(addr, BACKLOG)
}

/// A listener [`bind_transparent`] made in a predecessor, handed over: same socket, same queue.
pub fn adopt(fd: OwnedFd) -> io::Result<TcpListener> {
    transparent::adopt_tcp_listener(fd)
}
