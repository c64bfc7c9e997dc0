//! Transparent TCP listeners: nftables TPROXY hands them connections addressed to anywhere, and
//! each accepted socket's local address is the destination the pod asked for.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

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

/// A transparent listener for ports whose clients speak first (`intercept.clientFirstPorts`):
/// the kernel hands a connection over only once its first bytes arrived (TCP_DEFER_ACCEPT), so
/// the gateway wakes once per connection, with the ClientHello or request to peek, instead of
/// once for the accept and again for the bytes.
///
/// A client that waits for the server instead gets its connection about a second later (the
/// kernel's first SYN-ACK retransmission); one that sends nothing but a FIN is handed over at
/// once, one that resets is never handed over.
pub fn bind_transparent_client_first(addr: SocketAddr) -> io::Result<TcpListener> {
    defer_accept(bind_transparent(addr)?)
}

/// A listener [`bind_transparent_client_first`] made in a predecessor, handed over.
pub fn adopt_client_first(fd: OwnedFd) -> io::Result<TcpListener> {
    defer_accept(adopt(fd)?)
}

/// Seconds the kernel holds a connection that sent no data before handing it over anyway:
/// the least that defers at all (rounded up to one SYN-ACK retransmission).
const DEFER_ACCEPT_SECONDS: nix::libc::c_int = 1;

fn defer_accept(listener: TcpListener) -> io::Result<TcpListener> {
    set_defer_accept(&listener, DEFER_ACCEPT_SECONDS)?;
    Ok(listener)
}

/// setsockopt(TCP_DEFER_ACCEPT): no safe wrapper exists (std's is unstable, rust-lang#119639;
/// socket2, nix and rustix have none).
#[allow(unsafe_code)]
fn set_defer_accept(listener: &impl AsFd, seconds: nix::libc::c_int) -> io::Result<()> {
    use nix::libc;
    let fd = listener.as_fd().as_raw_fd();
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is borrowed from a live socket for the duration of the call, and the option
    // value points to a `c_int` on this stack frame whose size is `len`.
    let status = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            len,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

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

    /// The client-first listener hands a connection over with its first bytes, not before.
    #[tokio::test]
    async fn a_deferred_listener_accepts_only_once_the_client_spoke() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listener = defer_accept(listener).expect("TCP_DEFER_ACCEPT");
        let addr = listener.local_addr().expect("addr");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let early = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(early.is_err(), "handed over before any byte arrived");

        client.write_all(b"\x16\x03\x01").await.expect("write");
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("handed over once the client spoke")
            .expect("accept");
        // The bytes are there on the first read: one wake-up.
        let mut first = [0u8; 3];
        let read = accepted
            .try_read(&mut first)
            .expect("readable without waiting");
        assert_eq!(&first[..read], b"\x16\x03\x01");
    }
}
