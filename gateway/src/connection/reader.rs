//! Reading a client's first bytes until a pure peeker decides, within a deadline and a cap.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::stop::Stop;
use crate::decision::{PodFault, Reason};
use crate::peek::Peek;

/// The bytes read from the client so far. They are all replayed upstream (from `forwarded`)
/// once the connection is allowed, so nothing the peekers saw is lost.
#[derive(Debug)]
pub struct PeekReader {
    pub buf: Vec<u8>,
    /// Bytes already written upstream (PostgreSQL negotiation).
    pub forwarded: usize,
    deadline: Instant,
    max_bytes: usize,
}

/// Why [`PeekReader::read_more`] read nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStop {
    /// The byte cap is reached.
    Full,
    /// The deadline passed.
    Timeout,
}

/// Read size: a ClientHello usually arrives in one or two segments.
const READ_CHUNK: usize = 4096;

impl PeekReader {
    pub fn new(deadline: Instant, max_bytes: usize) -> Self {
        PeekReader {
            buf: Vec::new(),
            forwarded: 0,
            deadline,
            max_bytes,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Starts reading a later message (the second ClientHello): the bytes already sent upstream
    /// are dropped, and the new message gets `deadline` and the whole byte cap.
    pub fn restart(&mut self, deadline: Instant) {
        self.buf.drain(..self.forwarded.min(self.buf.len()));
        self.forwarded = 0;
        self.deadline = deadline;
    }

    /// Reads until `parse(&buf[from..])` is complete or invalid. `parse` must be
    /// prefix-monotonic (every peeker is), so re-running it over the grown buffer is exact.
    pub async fn until<T>(
        &mut self,
        client: &mut (impl AsyncRead + Unpin),
        from: usize,
        parse: impl Fn(&[u8]) -> Peek<T>,
    ) -> Result<T, Stop> {
        loop {
            match parse(self.buf.get(from..).unwrap_or_default()) {
                Peek::Complete(value) => return Ok(value),
                Peek::Invalid(invalid) => return Err(Stop::invalid(invalid)),
                Peek::Incomplete => {}
            }
            match self.read_more(client).await {
                Ok(0) => return Err(Stop::new(Reason::ClientClosed)),
                Ok(_) => {}
                Err(ReadStop::Full) => return Err(Stop::new(PodFault::PeekTooLarge)),
                Err(ReadStop::Timeout) => return Err(Stop::new(PodFault::PeekTimeout)),
            }
        }
    }

    /// Appends what `stream` sends next, within the deadline and the byte cap; `Ok(0)` when it
    /// closed or reset.
    pub async fn read_more(
        &mut self,
        stream: &mut (impl AsyncRead + Unpin),
    ) -> Result<usize, ReadStop> {
        let room = self.max_bytes.saturating_sub(self.buf.len());
        if room == 0 {
            return Err(ReadStop::Full);
        }
        tokio::time::timeout_at(self.deadline, self.read(stream, room))
            .await
            .map_err(|_| ReadStop::Timeout)
    }

    /// Appends what the client sends next, up to `limit` bytes; 0 when it closed or reset.
    /// The bytes land on the stack first, only inside a poll, and the buffer grows by what
    /// arrived: a connection waiting for its upstream holds the 500-byte ClientHello it got,
    /// not a 4 KiB read buffer (nor one in its task's future), and the allocator keeps
    /// fewer holes after a burst (RSS per idle connection 5.1 → 4.4 KiB in the `memory`
    /// benchmark). The chunk is not zeroed: the read initializes what it fills, and zeroing
    /// 4 KiB on every poll was a fifth of a connection's instructions.
    async fn read(&mut self, client: &mut (impl AsyncRead + Unpin), limit: usize) -> usize {
        poll_fn(|cx| {
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk[..limit.min(READ_CHUNK)]);
            match Pin::new(&mut *client).poll_read(cx, &mut read) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => {
                    self.buf.extend_from_slice(read.filled());
                    Poll::Ready(read.filled().len())
                }
                // A reset reads as the client going away.
                Poll::Ready(Err(_)) => Poll::Ready(0),
            }
        })
        .await
    }

    /// Takes what a just-accepted client has already sent, without waiting: a client that
    /// speaks first has usually sent its first message by the time it is accepted (always, on
    /// a deferred-accept listener), and tokio takes an accepted socket as readable until a read
    /// finds it empty. A read shorter than asked emptied the socket, so tokio is told so (a
    /// `WouldBlock` from inside `try_io`): the next read then waits for the client's next bytes
    /// instead of first calling recv(2) for nothing. Nothing there yet (or an error, or the
    /// end) is left to the next read, which meets it again.
    pub fn read_ready(&mut self, client: &TcpStream) {
        let room = self
            .max_bytes
            .saturating_sub(self.buf.len())
            .min(READ_CHUNK);
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let chunk = chunk.get_mut(..room).unwrap_or_default();
        let mut drained = None;
        let read = client.try_io(Interest::READABLE, || {
            let ((read, _), _) =
                rustix::net::recv(client, &mut *chunk, rustix::net::RecvFlags::DONTWAIT)?;
            if !read.is_empty() && read.len() < room {
                drained = Some(&*read);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(&*read)
        });
        if let Some(read) = drained.or(read.ok()) {
            self.buf.extend_from_slice(read);
        }
    }

    /// The bytes read but not yet sent upstream, owned: the relay frees them once written.
    pub fn into_unforwarded(mut self) -> Vec<u8> {
        self.buf.drain(..self.forwarded.min(self.buf.len()));
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn what_a_client_sent_before_accept_is_taken_at_once_and_nothing_else_waits() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (quiet, _) = listener.accept().await.expect("accept");
        let mut reader = PeekReader::new(Instant::now() + Duration::from_secs(5), 16);
        // Nothing sent: nothing read, and no wait.
        reader.read_ready(&quiet);
        assert!(reader.buf.is_empty());

        let mut speaker = tokio::net::TcpStream::connect(addr).await.expect("connect");
        speaker
            .write_all(b"first message, longer than the cap")
            .await
            .expect("write");
        let (accepted, _) = listener.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_millis(20)).await;
        reader.read_ready(&accepted);
        assert_eq!(reader.buf, b"first message, l", "up to the byte cap");
        silent.shutdown().await.expect("close");
    }

    /// Whether tokio would let a read of `stream` try the socket now.
    async fn believed_readable(stream: &tokio::net::TcpStream) -> bool {
        futures::poll!(Box::pin(stream.ready(Interest::READABLE))).is_ready()
    }

    #[tokio::test]
    async fn a_first_message_taken_whole_leaves_no_readiness_behind() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"hello").await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (accepted, _) = listener.accept().await.expect("accept");
        // tokio takes an accepted socket as readable...
        assert!(believed_readable(&accepted).await);
        let mut reader = PeekReader::new(Instant::now() + Duration::from_secs(5), 4096);
        reader.read_ready(&accepted);
        assert_eq!(reader.buf, b"hello");
        // ...until a read empties it: the next read waits for the client's next bytes instead
        // of calling recv(2) for nothing.
        tokio::task::yield_now().await;
        assert!(!believed_readable(&accepted).await, "drained");

        client.write_all(b" again").await.expect("write");
        let mut accepted = accepted;
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_more(&mut accepted));
        assert_eq!(read.await.expect("woken").expect("read"), 6);
        assert_eq!(reader.buf, b"hello again");
    }

    #[tokio::test]
    async fn a_client_gone_before_accept_is_met_by_the_next_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (mut accepted, _) = listener.accept().await.expect("accept");
        let mut reader = PeekReader::new(Instant::now() + Duration::from_secs(5), 4096);
        reader.read_ready(&accepted);
        assert!(reader.buf.is_empty());
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_more(&mut accepted));
        assert_eq!(read.await.expect("no wait").expect("read"), 0, "the end");
    }
}
