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
