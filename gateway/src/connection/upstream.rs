//! Opening the connection to the original destination: from the node's own address, with a
//! timeout. Behind [`Dial`] so the stages can be tested on in-memory streams.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

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
        let destination = to.0;
        // The socket is made before connecting, so that running out of descriptors can free
        // the pipe pool's and try again.
        let socket = PIPES.retry_out_of_descriptors(|| match destination {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        })?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(destination))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}
