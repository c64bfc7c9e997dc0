//! Opening the connection to the original destination: from the node's own address, with a
//! timeout. Behind [`Dial`] so the stages can be tested on in-memory streams.

use std::future::Future;
use std::io;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
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
        let (stream, _) = TcpDial::start(to, WritesFirst::No)?.connected(&[]).await?;
        Ok(stream)
    }
}

/// Whether the gateway has bytes to send the moment a new upstream connection is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritesFirst {
    /// It has (a replayed first message), and hands them to [`Connecting::send_if_connected`]
    /// or [`Connecting::connected`]: the handshake's last ACK waits for them and leaves in
    /// their segment, so the server receives one packet instead of two and wakes once for both
    /// (HAProxy's `option tcp-smart-connect`).
    AtOnce,
    /// It has not (the server speaks first, or the bytes come later): the ACK leaves at once,
    /// or the server would not accept the connection until the kernel's delayed-ACK timer
    /// (200 ms).
    No,
}

impl WritesFirst {
    /// For a connection whose first message is `first` (empty: none yet).
    pub fn with(first: &[u8]) -> WritesFirst {
        if first.is_empty() {
            WritesFirst::No
        } else {
            WritesFirst::AtOnce
        }
    }
}

impl TcpDial {
    /// Starts connecting to `to`: the SYN leaves in this call, so what the caller does before
    /// awaiting [`Connecting::connected`] (the decision line) overlaps the handshake instead of
    /// delaying it.
    pub fn start(to: OrigDstAddr, writes_first: WritesFirst) -> io::Result<Connecting> {
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
        let ack_held = writes_first == WritesFirst::AtOnce;
        if ack_held {
            // Off before connect(2): Linux then holds the ACK of the server's SYN-ACK for the
            // first data (at most its delayed-ACK timeout).
            socket.set_tcp_quickack(false)?;
        }
        match socket.connect(&destination.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(Connecting { socket, ack_held })
    }
}

/// A connection [`TcpDial::start`] began, not yet in the event loop.
#[derive(Debug)]
pub struct Connecting {
    socket: Socket,
    /// Quick ACKs are off until the first bytes went (see [`WritesFirst::AtOnce`]).
    ack_held: bool,
}

/// What [`Connecting::send_if_connected`] found.
#[derive(Debug)]
pub enum FirstSend {
    /// Established: the stream (now in the event loop) and how much of the first message
    /// went.
    Sent(TcpStream, usize),
    /// Still opening: await [`Connecting::connected`].
    Opening(Connecting),
}

impl Connecting {
    /// Sends what it can of `first` at once if the connection is established already: a near
    /// upstream (the same node, a veth away) answers the SYN while connect(2) still runs. The
    /// send itself is the test (on a socket still opening it fails with `EAGAIN` and sends
    /// nothing), and the socket joins the event loop only after it: between connect(2) and the
    /// first bytes there is no other system call, and no timer is armed. An empty `first` is
    /// tested with getpeername(2). A connection that failed already is an error.
    pub fn send_if_connected(self, first: &[u8]) -> io::Result<FirstSend> {
        let sent = if first.is_empty() {
            match self.socket.peer_addr() {
                Ok(_) => 0,
                Err(_) => return Ok(FirstSend::Opening(self)),
            }
        } else {
            let flags = nix::libc::MSG_DONTWAIT | nix::libc::MSG_NOSIGNAL;
            match self.socket.send_with_flags(first, flags) {
                Ok(sent) => sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(FirstSend::Opening(self))
                }
                // Refused or reset within connect(2): the send took the socket's error.
                Err(e) => return Err(e),
            }
        };
        if self.ack_held {
            ack_normally(SockRef::from(&self.socket));
        }
        let stream = TcpStream::from_std(std::net::TcpStream::from(self.socket))?;
        Ok(FirstSend::Sent(stream, sent))
    }

    /// The connection once established, with what could be sent of `first` at once; or why it
    /// failed (refused, unreachable, timed out).
    pub async fn connected(self, first: &[u8]) -> io::Result<(TcpStream, usize)> {
        let stream = TcpStream::from_std(std::net::TcpStream::from(self.socket))?;
        tokio::time::timeout(CONNECT_TIMEOUT, stream.writable())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        let sent = match stream.try_write(first) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if self.ack_held {
            ack_normally(SockRef::from(&stream));
        }
        Ok((stream, sent))
    }
}

/// Quick ACKs back on once the first bytes carried the handshake's ACK: the rest of the
/// connection acknowledges as any other does (a server that writes a response in pieces
/// without TCP_NODELAY would otherwise wait for our delayed ACK between them).
fn ack_normally(socket: SockRef<'_>) {
    if let Err(e) = socket.set_tcp_quickack(true) {
        tracing::debug!(error = %e, "cannot turn quick ACKs back on");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Connects to `to` and sends `first` at once; the stream and how much went.
    fn sent_at_once(to: OrigDstAddr, first: &[u8]) -> (TcpStream, usize) {
        let started = TcpDial::start(to, WritesFirst::with(first)).expect("start");
        match started.send_if_connected(first).expect("no error") {
            FirstSend::Sent(stream, sent) => (stream, sent),
            FirstSend::Opening(_) => panic!("loopback answers the SYN inside connect(2)"),
        }
    }

    #[tokio::test]
    async fn a_connection_established_within_connect_gets_its_first_bytes_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let to = OrigDstAddr(listener.local_addr().expect("addr"));
        let (_stream, sent) = sent_at_once(to, b"first bytes");
        assert_eq!(sent, 11);
        let (mut accepted, _) = listener.accept().await.expect("accept");
        let mut got = [0u8; 11];
        accepted.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"first bytes");

        // Nothing to send (a server-first protocol): established all the same.
        let (stream, sent) = sent_at_once(to, b"");
        assert_eq!(sent, 0);
        assert!(stream.peer_addr().is_ok());
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_with_or_without_a_first_message() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let to = OrigDstAddr(listener.local_addr().expect("addr"));
        drop(listener);
        // With bytes to send, the send meets the refusal.
        let refused = TcpDial::start(to, WritesFirst::AtOnce).expect("start");
        let error = refused.send_if_connected(b"hello").expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);

        // Without, it is not established, and awaiting it says why.
        let refused = TcpDial::start(to, WritesFirst::No).expect("start");
        let Ok(FirstSend::Opening(connecting)) = refused.send_if_connected(b"") else {
            panic!("a refused connection is not established");
        };
        let error = connecting.connected(&[]).await.expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// Whether the server's kernel has finished the handshake: the connection waits in its
    /// accept queue.
    fn accepted_now(listener: &std::net::TcpListener) -> Option<std::net::TcpStream> {
        match listener.accept() {
            Ok((stream, _)) => Some(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("accept: {e}"),
        }
    }

    #[tokio::test]
    async fn the_handshake_ack_travels_with_the_first_bytes_when_the_gateway_writes_first() {
        use std::io::Read as _;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let to = OrigDstAddr(listener.local_addr().expect("addr"));

        // Loopback answers the SYN within connect(2), and our side is established at once;
        // the server's is not until the ACK arrives, which waits for the first bytes.
        for send_at_once in [true, false] {
            let started = TcpDial::start(to, WritesFirst::AtOnce).expect("start");
            assert!(
                accepted_now(&listener).is_none(),
                "the ACK left before any data"
            );
            let stream = if send_at_once {
                let Ok(FirstSend::Sent(stream, 5)) = started.send_if_connected(b"hello") else {
                    panic!("established within connect(2), and all five bytes sent");
                };
                stream
            } else {
                let (stream, sent) = started.connected(b"hello").await.expect("connected");
                assert_eq!(sent, 5);
                stream
            };
            let mut accepted = accepted_now(&listener).expect("handshake done by the bytes");
            let mut got = [0u8; 5];
            accepted.read_exact(&mut got).expect("read");
            assert_eq!(&got, b"hello");
            // The rest of the connection acknowledges as usual.
            assert!(SockRef::from(&stream).tcp_quickack().expect("quickack"));
        }

        // A server that speaks first gets its ACK at once.
        let _started = TcpDial::start(to, WritesFirst::No).expect("start");
        assert!(
            accepted_now(&listener).is_some(),
            "the handshake completes within connect(2)"
        );
    }
}
