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
    no_delay_for_accepted(transparent::tcp_listener(addr, BACKLOG)?)
}

/// A listener [`bind_transparent`] made in a predecessor, handed over: same socket, same queue.
pub fn adopt(fd: OwnedFd) -> io::Result<TcpListener> {
    no_delay_for_accepted(transparent::adopt_tcp_listener(fd)?)
}

/// TCP_NODELAY on the listener: Linux copies it to every accepted socket, so a pod's socket has
/// it from the start (what the gateway writes to it before the relay, a server's first flight,
/// goes out at once) and a connection costs no setsockopt(2) of its own. Set again on an adopted
/// listener, which an older predecessor may have made without it.
fn no_delay_for_accepted(listener: TcpListener) -> io::Result<TcpListener> {
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_no_delay_from_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listener = no_delay_for_accepted(listener).expect("nodelay");
        let addr = listener.local_addr().expect("addr");
        let (_near, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (accepted, _) = accepted.expect("accept");
        assert!(accepted.nodelay().expect("getsockopt"));
    }
}
