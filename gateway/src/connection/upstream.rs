//! Opening the connection to the original destination: from the node's own address, with a
//! timeout. Behind [`Dial`] so the stages can be tested on in-memory streams.

use std::future::Future;
use std::io;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::addr::OrigDstAddr;
use crate::pipes::PIPES;

/// How long an allowed connection may take to reach its destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens upstream connections.
pub trait Dial {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send;

    fn dial(&self, to: OrigDstAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Real TCP connections (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct TcpDial;

impl Dial for TcpDial {
    type Stream = TcpStream;

    async fn dial(&self, to: OrigDstAddr) -> io::Result<TcpStream> {
        TcpDial::start(to)?.connected().await
    }
}

impl TcpDial {
    /// Starts connecting to `to`: the SYN leaves in this call, so what the caller does before
    /// awaiting [`Connecting::connected`] (the decision line) overlaps the handshake instead of
    /// delaying it.
    pub fn start(to: OrigDstAddr) -> io::Result<Connecting> {
        let destination = to.0;
        // The socket is made before connecting, so that running out of descriptors can free
        // the pipe pool's and try again.
        let socket = PIPES.retry_out_of_descriptors(|| {
            Socket::new(
                Domain::for_address(destination),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )
        })?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&destination.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
        Ok(Connecting { stream })
    }
}

/// A connection [`TcpDial::start`] began.
#[derive(Debug)]
pub struct Connecting {
    stream: TcpStream,
}

impl Connecting {
    /// The connection if it is established already: a near upstream (the same node, a veth
    /// away) answers the SYN while connect(2) still runs. Then nothing waits for the event loop
    /// to report it writable, and no timer is armed. Otherwise the caller awaits
    /// [`Connecting::connected`].
    pub fn connected_now(self) -> Result<TcpStream, Connecting> {
        match self.stream.peer_addr() {
            Ok(_) => Ok(self.stream),
            Err(_) => Err(self),
        }
    }

    /// The connection once established, or why it failed (refused, unreachable, timed out).
    pub async fn connected(self) -> io::Result<TcpStream> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.stream.writable())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        match self.stream.take_error()? {
            Some(e) => Err(e),
            None => Ok(self.stream),
        }
    }
}

/// Writes what it can of `bytes` to the connected `stream` at once, without waiting for the
/// event loop: tokio only writes to a socket it has seen writable, and a new one has not been
/// seen yet. How much went; nothing on any error, which the next write through tokio reports.
pub fn send_now(stream: &TcpStream, bytes: &[u8]) -> usize {
    if bytes.is_empty() {
        return 0;
    }
    let flags = nix::libc::MSG_DONTWAIT | nix::libc::MSG_NOSIGNAL;
    socket2::SockRef::from(stream)
        .send_with_flags(bytes, flags)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn a_connection_established_within_connect_is_used_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let to = OrigDstAddr(listener.local_addr().expect("addr"));
        // Loopback answers the SYN inside connect(2): connected before any await.
        let stream = TcpDial::start(to)
            .expect("start")
            .connected_now()
            .expect("connected within connect(2)");
        assert_eq!(send_now(&stream, b"first bytes"), 11);
        let (mut accepted, _) = listener.accept().await.expect("accept");
        let mut got = [0u8; 11];
        accepted.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"first bytes");
    }

    #[tokio::test]
    async fn a_connection_still_opening_is_awaited() {
        // A closed port: refused, so not connected, and `connected` says why.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let refused = TcpDial::start(OrigDstAddr(addr)).expect("start");
        let Err(connecting) = refused.connected_now() else {
            panic!("a refused connection is not connected");
        };
        let error = connecting.connected().await.expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }
}
