//! Relaying an allowed connection, both directions at once. Each direction starts by copying
//! (recv into the worker's one copy buffer, send at once): for handshakes, requests and
//! replies that is cheaper than splice(2), which costs two calls and a pipe per chunk. The first
//! read that fills the whole buffer means bulk data: from then on that direction splices,
//! socket → pipe → socket inside the kernel, never through user space. Either way an idle
//! direction holds no buffer and no pipe.
//!
//! Each direction ends on its own: EOF from one side half-closes the other (`shutdown(Write)`),
//! so request/response protocols that half-close keep working. The relay ends when both
//! directions are done, when either side fails (the other side is then reset, so an upstream
//! reset reaches the pod as a reset, not as a clean end), or when no byte has moved either way
//! for the idle timeout (checked every eighth of it): a peer that goes silent cannot pin a
//! connection forever.

use std::cell::Cell;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{splice, SpliceFFlags};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::pipes::PIPES;

mod http;

pub use http::{relay_http, Next, Seen};

/// Most bytes one splice call moves: the default pipe capacity.
const CHUNK: usize = 64 * 1024;
/// Most bytes one copy moves, through the worker's copy buffer. A read that fills it switches its
/// direction to splice.
const COPY_CHUNK: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug)]
pub struct Relayed {
    /// Pod → destination, replayed first-message bytes included.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// `None` for a clean end (both sides closed).
    pub error: Option<RelayError>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("pod side: {0}")]
    Client(io::Error),
    #[error("destination side: {0}")]
    Upstream(io::Error),
    #[error("idle for {0:?}")]
    Idle(Duration),
}

/// Writes `replay` to `upstream` (and frees it), then splices both ways until done, failed or idle.
pub async fn relay(
    client: TcpStream,
    mut upstream: TcpStream,
    replay: Vec<u8>,
    idle_timeout: Duration,
) -> Relayed {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let activity = Activity::new();
    let result = async {
        upstream
            .write_all(&replay)
            .await
            .map_err(RelayError::Upstream)?;
        up.fetch_add(replay.len() as u64, Ordering::Relaxed);
        // Freed before the (possibly hours-long) splice.
        drop(replay);
        let ended = Ended::default();
        // The directions are built inside the join, not bound first: a future bound to a
        // local and then moved would take its room in this state twice (the relay is most of
        // what an idle connection holds).
        tokio::select! {
            result = async {
                tokio::try_join!(
                    pump(&client, &upstream, &up, &activity, Side::Client, &ended),
                    pump(&upstream, &client, &down, &activity, Side::Upstream, &ended),
                )
            } => result.map(|_| ()),
            () = activity.idle(idle_timeout) => Err(RelayError::Idle(idle_timeout)),
        }
    }
    .await;
    if let Err(error) = &result {
        // Tell each side the stream broke instead of ending it cleanly.
        let reset_client = !matches!(error, RelayError::Client(_));
        let reset_upstream = !matches!(error, RelayError::Upstream(_));
        if reset_client {
            let _ = client.set_zero_linger();
        }
        if reset_upstream {
            let _ = upstream.set_zero_linger();
        }
    }
    Relayed {
        bytes_up: up.into_inner(),
        bytes_down: down.into_inner(),
        error: result.err(),
    }
}

/// Which side an error came from, for the reset logic and the log.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn error(self, e: io::Error) -> RelayError {
        match self {
            Side::Client => RelayError::Client(e),
            Side::Upstream => RelayError::Upstream(e),
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// Which directions of a relay have ended, so that the last one skips its half-close.
#[derive(Debug, Default)]
struct Ended(AtomicBool);

impl Ended {
    /// Whether `to` needs a half-close when a direction ends: not when the other direction has
    /// ended already, because the relay then closes both sockets at once, and closing a socket
    /// whose bytes were all read sends the same FIN (one shutdown(2) less per connection).
    /// Shared only by two directions of one relay that closes both sockets once both end.
    fn half_close_needed(&self) -> bool {
        !self.0.swap(true, Ordering::Relaxed)
    }
}

/// Moves bytes `from` → `to` until `from` ends, then half-closes `to` (unless `ended` says the
/// other direction is done too): copied while chunks are small, spliced once one fills the copy
/// buffer (see the module docs). A pipe is borrowed per chunk (see `pipes`): a direction
/// waiting for bytes holds none.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    total: &AtomicU64,
    activity: &Activity,
    side: Side,
    ended: &Ended,
) -> Result<(), RelayError> {
    let mut splicing = false;
    loop {
        let moved = if splicing {
            splice_some(from, to, CHUNK, total, activity, side).await?
        } else {
            copy_some(from, to, total, activity, side).await?
        };
        if moved == 0 {
            if !ended.half_close_needed() {
                return Ok(());
            }
            // EOF: pass the half-close on; the other direction may still be talking.
            return shutdown_write(to).map_err(|e| side.other().error(e));
        }
        splicing |= moved == COPY_CHUNK;
    }
}

/// Moves what `from` has (at most [`COPY_CHUNK`] bytes, once it has any) to `to` by copy; 0
/// when `from` ended. What `to` does not take at once (its send buffer is full) waits on the
/// heap until it does.
async fn copy_some(
    from: &TcpStream,
    to: &TcpStream,
    total: &AtomicU64,
    activity: &Activity,
    side: Side,
) -> Result<usize, RelayError> {
    let (read, rest) = loop {
        read_ready(from).await.map_err(|e| side.error(e))?;
        match copy_now(from, to) {
            Ok(Copied::Nothing) => continue,
            Ok(Copied::Read { read, rest }) => break (read, rest),
            Err(Fault::Read(e)) => return Err(side.error(e)),
            Err(Fault::Write(e)) => return Err(side.other().error(e)),
        }
    };
    let mut sent = 0;
    while sent < rest.len() {
        write_ready(to).await.map_err(|e| side.other().error(e))?;
        match to.try_write(&rest[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(side.other().error(e)),
        }
    }
    if read > 0 {
        total.fetch_add(read as u64, Ordering::Relaxed);
        activity.touch();
    }
    Ok(read)
}

/// Waits until `from` may have bytes (or its end, or an error). Through the socket's own
/// reader waker slot (`poll_read_ready`) rather than `readable()`, whose future joins a list of
/// waiters under a lock on every wait, and holds that list's node in the relay's state: one
/// direction has one waiting task, and this was a tenth of a keep-alive request's
/// instructions.
async fn read_ready(from: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| from.poll_read_ready(cx)).await
}

/// [`read_ready`] for room to write, through the writer waker slot: each socket is written by
/// one direction only.
async fn write_ready(to: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| to.poll_write_ready(cx)).await
}

/// What one [`copy_now`] did.
#[derive(Debug)]
enum Copied {
    /// `from` had nothing after all (tokio's readiness was stale).
    Nothing,
    /// `read` bytes (0: `from` ended), of which `to` did not take `rest` yet (usually none).
    Read { read: usize, rest: Vec<u8> },
}

#[derive(Debug)]
enum Fault {
    Read(io::Error),
    Write(io::Error),
}

thread_local! {
    /// The copy buffer of this thread's relays, taken for one [`copy_now`] (or one HTTP read)
    /// at a time: made once per worker, so a copy neither allocates nor clears 16 KiB.
    static COPY_BUFFER: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// Runs `use_buffer` with this thread's copy buffer ([`COPY_CHUNK`] bytes). Nothing may be
/// awaited while it is held, so the buffer is never part of a connection's state.
fn with_copy_buffer<R>(use_buffer: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut buf = COPY_BUFFER
        .take()
        .unwrap_or_else(|| vec![0; COPY_CHUNK].into_boxed_slice());
    let result = use_buffer(&mut buf);
    COPY_BUFFER.set(Some(buf));
    result
}

/// One recv into this thread's copy buffer and one send of what came.
fn copy_now(from: &TcpStream, to: &TcpStream) -> Result<Copied, Fault> {
    with_copy_buffer(|buf| copy_through(from, to, buf))
}

/// One recv into `buf`: how many bytes came (0: `from` ended), or `WouldBlock` if none were
/// there. A short read emptied the socket: tokio then forgets its readiness (as its own
/// poll_read does after a short read), so the next read waits for epoll's next edge instead of
/// making one more recv that finds nothing.
fn recv_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut drained = None;
    let received = from.try_io(Interest::READABLE, || {
        let (n, _) = rustix::net::recv(from.as_fd(), &mut *buf, rustix::net::RecvFlags::empty())?;
        if n > 0 && n < buf.len() {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match drained {
        Some(n) => Ok(n),
        None => received,
    }
}

fn copy_through(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> Result<Copied, Fault> {
    let read = match recv_draining(from, buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Copied::Nothing),
        Err(e) => return Err(Fault::Read(e)),
    };
    let mut written = 0;
    while written < read {
        match to.try_write(&buf[written..read]) {
            Ok(0) => return Err(Fault::Write(io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let rest = buf[written..read].to_vec();
                return Ok(Copied::Read { read, rest });
            }
            Err(e) => return Err(Fault::Write(e)),
        }
    }
    Ok(Copied::Read {
        read,
        rest: Vec::new(),
    })
}

/// Moves exactly `len` bytes `from` → `to` through a pipe, unless `from` ends first; returns
/// how many moved. `to` is not half-closed.
async fn splice_exactly(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    total: &AtomicU64,
    activity: &Activity,
    side: Side,
) -> Result<u64, RelayError> {
    let mut moved = 0;
    while moved < len {
        let max = usize::try_from(len - moved)
            .unwrap_or(usize::MAX)
            .min(CHUNK);
        let chunk = splice_some(from, to, max, total, activity, side).await?;
        if chunk == 0 {
            break;
        }
        moved += chunk as u64;
    }
    Ok(moved)
}

/// Moves what `from` has (at most `max` bytes, once it has any) to `to` through a pipe; 0 when
/// `from` ended.
async fn splice_some(
    from: &TcpStream,
    to: &TcpStream,
    max: usize,
    total: &AtomicU64,
    activity: &Activity,
    side: Side,
) -> Result<usize, RelayError> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        read_ready(from).await.map_err(|e| side.error(e))?;
        let pipe = PIPES.take().map_err(|e| side.error(e))?;
        let filled = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe.write.as_fd(), None, max, flags)
                .map_err(io::Error::from)
        });
        let filled = match filled {
            Ok(filled) => filled,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                PIPES.give_back(pipe);
                continue;
            }
            Err(e) => return Err(side.error(e)),
        };
        if filled == 0 {
            PIPES.give_back(pipe);
            return Ok(0);
        }
        // On error the pipe may hold bytes: it is dropped, not given back.
        let mut left = filled;
        while left > 0 {
            write_ready(to).await.map_err(|e| side.other().error(e))?;
            let drained = match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(drained) => drained,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(side.other().error(e)),
            };
            left -= drained;
            total.fetch_add(drained as u64, Ordering::Relaxed);
            activity.touch();
        }
        PIPES.give_back(pipe);
        return Ok(filled);
    }
}

fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer may already be gone; the other direction reports that.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Whether a byte moved since the idle check last looked. A chunk only sets a flag: reading
/// the clock for every chunk was two clock reads per keep-alive request, a tenth of its
/// instructions. The check wakes every [`IDLE_CHECKS`]th of the timeout instead, so a silent
/// connection ends between the timeout and an eighth more after its last byte.
#[derive(Debug, Default)]
struct Activity {
    moved: AtomicBool,
}

/// Idle checks per idle timeout.
const IDLE_CHECKS: u32 = 8;

impl Activity {
    fn new() -> Self {
        Activity::default()
    }

    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `timeout` (and at most an eighth more).
    async fn idle(&self, timeout: Duration) {
        // At least 1 ms: a zero tick would never add up to the timeout.
        let tick = (timeout / IDLE_CHECKS).max(Duration::from_millis(1));
        let mut quiet = Duration::ZERO;
        while quiet < timeout {
            tokio::time::sleep(tick).await;
            if self.moved.swap(false, Ordering::Relaxed) {
                quiet = Duration::ZERO;
            } else {
                quiet += tick;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    use super::*;

    /// A connected (near, far) pair over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (near.expect("connect"), far.expect("accept").0)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_with_half_close_and_replay_first() {
        let (mut pod, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            client,
            upstream,
            b"peeked ".to_vec(),
            Duration::from_secs(5),
        ));

        pod.write_all(b"request").await.expect("write");
        pod.shutdown().await.expect("half-close");
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.expect("read");
        assert_eq!(request, b"peeked request");

        // The server answers after the pod's half-close, 1 MiB of it.
        let body = vec![7u8; 1 << 20];
        server.write_all(&body).await.expect("write");
        server.shutdown().await.expect("close");
        let mut response = Vec::new();
        pod.read_to_end(&mut response).await.expect("read");
        assert_eq!(response.len(), body.len());

        let relayed = relay.await.expect("joins");
        assert!(relayed.error.is_none(), "{:?}", relayed.error);
        assert_eq!((relayed.bytes_up, relayed.bytes_down), (14, 1 << 20));
    }

    #[tokio::test]
    async fn a_small_chunk_is_copied_and_a_full_buffer_is_read_as_one_chunk() {
        let (mut pod, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let (total, activity) = (AtomicU64::new(0), Activity::new());
        pod.write_all(b"hello").await.expect("write");
        let moved = copy_some(&client, &upstream, &total, &activity, Side::Client).await;
        assert_eq!(moved.expect("copied"), 5);
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        // More than the buffer waiting: one full chunk, which is what switches to splice.
        pod.write_all(&[3u8; COPY_CHUNK * 2]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let moved = copy_some(&client, &upstream, &total, &activity, Side::Client).await;
        assert_eq!(moved.expect("copied"), COPY_CHUNK);
        assert_eq!(total.load(Ordering::Relaxed), 5 + COPY_CHUNK as u64);
    }

    #[tokio::test]
    async fn what_the_destination_cannot_take_yet_waits_and_arrives_in_order() {
        let (mut pod, client) = pair().await;
        let (upstream, mut server) = pair().await;
        socket2::SockRef::from(&upstream)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        // The server reads nothing yet: fill what the kernel holds for it.
        let mut queued = 0;
        loop {
            match upstream.try_write(&[1u8; 65536]) {
                Ok(n) => queued += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("fill: {e}"),
            }
        }
        pod.write_all(&[2u8; 4096]).await.expect("write");
        let (total, activity) = (AtomicU64::new(0), Activity::new());
        let copy = copy_some(&client, &upstream, &total, &activity, Side::Client);
        let read = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut got = vec![0u8; queued + 4096];
            server.read_exact(&mut got).await.expect("read");
            got
        };
        let (moved, got) = tokio::join!(copy, read);
        assert_eq!(moved.expect("copied"), 4096);
        assert!(got[..queued].iter().all(|&b| b == 1));
        assert!(got[queued..].iter().all(|&b| b == 2));
    }

    #[tokio::test]
    async fn a_silent_connection_ends_after_the_idle_timeout() {
        let (_pod, client) = pair().await;
        let (upstream, _server) = pair().await;
        let started = Instant::now();
        let relayed = relay(client, upstream, Vec::new(), Duration::from_millis(200)).await;
        assert!(
            matches!(relayed.error, Some(RelayError::Idle(_))),
            "{:?}",
            relayed.error
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// A byte postpones the end: it comes between the timeout and an eighth more after the
    /// last one.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_a_timeout_after_its_last_byte() {
        let activity = Activity::new();
        let started = Instant::now();
        let timeout = Duration::from_millis(800);
        let last_byte = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            activity.touch();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = activity.idle(timeout) => {}
            () = last_byte => unreachable!("pending"),
        }
        let idle_after = started.elapsed() - Duration::from_millis(500);
        assert!(
            idle_after >= timeout && idle_after <= timeout + timeout / IDLE_CHECKS,
            "{idle_after:?}"
        );
    }

    #[tokio::test]
    async fn an_upstream_reset_reaches_the_pod_as_a_reset() {
        let (mut pod, client) = pair().await;
        let (upstream, server) = pair().await;
        let relay = tokio::spawn(relay(client, upstream, Vec::new(), Duration::from_secs(5)));
        server.set_zero_linger().expect("linger");
        drop(server);
        let relayed = relay.await.expect("joins");
        assert!(
            matches!(relayed.error, Some(RelayError::Upstream(_))),
            "{:?}",
            relayed.error
        );
        let mut buf = [0u8; 16];
        let read = pod.read(&mut buf).await;
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{read:?}"
        );
    }
}
