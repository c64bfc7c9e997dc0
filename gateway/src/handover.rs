//! The live hand-over between an old and a new gateway on the same node (a rolling update, or a
//! second `egressgate run` with the same state directory).
//!
//! The old process listens on `handover.sock` in the state directory. A new process connects
//! and, over that one stream:
//!
//! ```text
//! new ── Hello(version) ─────────────────────────────────▶ old
//! new ◀── Sockets(roles, addresses) + the listening fds (SCM_RIGHTS)
//! new ◀── Records(dump of the name table)… DumpEnd       (old keeps serving meanwhile)
//!         new restores the dump, readies its identities
//! new ── Stop ───────────────────────────────────────────▶ old
//!         old stops accepting and reading, answers the queries it already read
//! new ◀── Records(everything old recorded since the dump)… Stopped(open connections)
//!         new serves the same sockets; old splices its open connections to their end
//! ```
//!
//! The sockets themselves change hands, not just their ports: connections waiting in a TCP
//! accept queue and datagrams waiting in a UDP receive queue are served by the new process,
//! and nothing is reset. Between Stop and the new process's first accept the kernel queues.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

/// The socket's name in the state directory.
pub const SOCKET_NAME: &str = "handover.sock";
/// Bumped when the exchange changes; a process meeting another version does not hand over.
const PROTOCOL_VERSION: u16 = 1;
/// The most sockets one Sockets message carries (a gateway with more, one per worker on each
/// TPROXY and DNS address, sends several in a row).
const MAX_SOCKETS: usize = 32;
/// The most sockets a successor accepts in all: 1024 workers on a few addresses each.
const MAX_HANDED_SOCKETS: usize = 8192;
/// The largest message; a dump is sent in chunks below it.
const MAX_MESSAGE: usize = 4 << 20;
/// How long one side waits for the other's next message before giving up the hand-over.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Tproxy = 1,
    DnsUdp = 2,
    DnsTcp = 3,
}

/// A listening socket as it changes hands.
#[derive(Debug)]
pub struct HandedSocket {
    pub role: Role,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

/// Why a hand-over did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket: {0}")]
    Io(#[from] io::Error),
    #[error("the other gateway speaks hand-over version {0}, this one {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("unexpected message {got:?} (expected {expected})")]
    Unexpected { got: Kind, expected: &'static str },
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("the other gateway did not answer within {STEP_TIMEOUT:?}")]
    Timeout,
    #[error("the process at the other end runs as uid {peer}, not {ours}")]
    Peer { peer: u32, ours: u32 },
}

/// Message kinds on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Sockets = 2,
    Records = 3,
    DumpEnd = 4,
    Stop = 5,
    Stopped = 6,
    Refused = 7,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Sockets,
            3 => Kind::Records,
            4 => Kind::DumpEnd,
            5 => Kind::Stop,
            6 => Kind::Stopped,
            7 => Kind::Refused,
            _ => return None,
        })
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// `egressgate_handover_*`: how the last hand-over went, on either side.
#[derive(Debug, Clone)]
pub struct HandoverMetrics {
    duration: prometheus::Gauge,
    records: prometheus::IntCounter,
    predecessor_open: prometheus::IntGauge,
    connections: prometheus::IntCounterVec,
}

impl HandoverMetrics {
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let duration = prometheus::Gauge::new(
            "egressgate_handover_duration_seconds",
            "From this gateway's start to serving the sockets it took over (last hand-over)",
        )?;
        let records = prometheus::IntCounter::new(
            "egressgate_handover_records_total",
            "Name records received from the predecessor after its dump (made during the hand-over)",
        )?;
        let predecessor_open = prometheus::IntGauge::new(
            "egressgate_handover_predecessor_open_connections",
            "Connections the predecessor still spliced when it stopped (it drains them)",
        )?;
        let connections = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "egressgate_handover_connections_total",
                "Connections open when this gateway handed over, by outcome (drained: ended in the grace period; cut)",
            ),
            &["outcome"],
        )?;
        for outcome in ["drained", "cut"] {
            connections.with_label_values(&[outcome]);
        }
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(predecessor_open.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        Ok(HandoverMetrics {
            duration,
            records,
            predecessor_open,
            connections,
        })
    }

    pub fn took_over(&self, duration: Duration, records: usize, predecessor_open: u32) {
        self.duration.set(duration.as_secs_f64());
        self.records.inc_by(records as u64);
        self.predecessor_open.set(i64::from(predecessor_open));
    }

    pub fn drained(&self, open: usize, cut: usize) {
        let drained = open.saturating_sub(cut);
        self.connections
            .with_label_values(&["drained"])
            .inc_by(drained as u64);
        self.connections
            .with_label_values(&["cut"])
            .inc_by(cut as u64);
    }
}

// === the new process ===

/// A hand-over in progress, seen from the new process: sockets and dump received, the old
/// process still serving.
#[derive(Debug)]
pub struct Takeover {
    stream: UnixStream,
    pub sockets: Vec<HandedSocket>,
    /// The old table as frames (`egressgate_dns_shim::persist::apply` reads them).
    pub dump: Vec<u8>,
}

/// What the old process sent when it stopped.
#[derive(Debug)]
pub struct Stopped {
    /// Records made between the dump and the stop.
    pub records: Vec<u8>,
    /// Connections still open in the old process, which it keeps splicing.
    pub open_connections: u32,
}

/// Asks a gateway already serving on `state_dir` for its sockets and table. `Ok(None)` when
/// there is none.
pub async fn connect(state_dir: &Path) -> Result<Option<Takeover>, HandoverError> {
    let stream = match UnixStream::connect(socket_path(state_dir)).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let mut stream = stream;
    // Only a process of our own user may hand us sockets and names: anyone else could grant
    // names to pods through a planted socket.
    check_peer(&stream)?;
    send(&mut stream, Kind::Hello, &PROTOCOL_VERSION.to_le_bytes()).await?;
    let (kind, payload, fds) = step(receive_with_fds(&stream)).await??;
    if kind != Kind::Sockets {
        return Err(HandoverError::Unexpected {
            got: kind,
            expected: "Sockets",
        });
    }
    let mut sockets = read_sockets(&payload, fds)?;
    let mut dump = Vec::new();
    loop {
        let (kind, payload, fds) = step(receive_with_fds(&stream)).await??;
        match kind {
            // More sockets: a predecessor with many workers sends several messages.
            Kind::Sockets if sockets.len() < MAX_HANDED_SOCKETS && dump.is_empty() => {
                sockets.extend(read_sockets(&payload, fds)?)
            }
            Kind::Records if fds.is_empty() => dump.extend_from_slice(&payload),
            Kind::DumpEnd if fds.is_empty() => break,
            got => {
                return Err(HandoverError::Unexpected {
                    got,
                    expected: "Sockets, Records or DumpEnd",
                })
            }
        }
    }
    Ok(Some(Takeover {
        stream,
        sockets,
        dump,
    }))
}

impl Takeover {
    /// Tells the old process to stop serving; returns once it has (with what it recorded
    /// meanwhile). From then on this process must serve the sockets.
    pub async fn finish(mut self) -> Result<Stopped, HandoverError> {
        send(&mut self.stream, Kind::Stop, &[]).await?;
        let mut records = Vec::new();
        loop {
            // Stopping waits for the old process's queries in flight (bounded by its
            // upstream timeouts), so this step gets a longer allowance.
            let (kind, payload) = step(receive(&mut self.stream)).await??;
            match kind {
                Kind::Records => records.extend_from_slice(&payload),
                Kind::Stopped => {
                    let open = payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_le_bytes)
                        .ok_or(HandoverError::Malformed("Stopped"))?;
                    return Ok(Stopped {
                        records,
                        open_connections: open,
                    });
                }
                got => {
                    return Err(HandoverError::Unexpected {
                        got,
                        expected: "Records or Stopped",
                    })
                }
            }
        }
    }
}

// === the old process ===

/// Where a serving gateway waits for its successor.
#[derive(Debug)]
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

/// A successor that said hello in a version this process speaks.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
}

impl Offer {
    /// Listens on `state_dir/handover.sock`, replacing the file of a predecessor (bound under a
    /// temporary name and renamed, so a connecting successor never finds no socket).
    pub fn bind(state_dir: &Path) -> io::Result<Offer> {
        let path = socket_path(state_dir);
        let tmp = state_dir.join(format!("{SOCKET_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        std::fs::rename(&tmp, &path)?;
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path)?);
        Ok(Offer {
            listener,
            path,
            inode,
        })
    }

    /// The next new gateway that wants to take over. Connections that are not one (another
    /// version, garbage) are answered and closed.
    pub async fn next(&self) -> Successor {
        loop {
            let Ok((mut stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            // Only a process of our own user may take the sockets (and stop this one).
            if let Err(e) = check_peer(&stream) {
                tracing::warn!(error = %e, "hand-over socket: refused a connection");
                continue;
            }
            match step(receive(&mut stream)).await {
                Ok(Ok((Kind::Hello, payload))) => {
                    let version = payload
                        .get(..2)
                        .and_then(|b| b.try_into().ok())
                        .map(u16::from_le_bytes);
                    if version == Some(PROTOCOL_VERSION) {
                        return Successor { stream };
                    }
                    tracing::warn!(
                        ?version,
                        "a gateway of another hand-over version asked to take over; refused"
                    );
                    let _ = send(&mut stream, Kind::Refused, &PROTOCOL_VERSION.to_le_bytes()).await;
                }
                other => tracing::warn!(?other, "hand-over socket: not a hello; closed"),
            }
        }
    }

    /// Removes the socket file if it is still this process's (a successor replaces it by
    /// renaming its own over it).
    pub fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Successor {
    /// Sends the listening sockets (duplicates of them: this process keeps serving until
    /// [`Successor::stopped`]'s caller stops).
    pub async fn send_sockets(
        &mut self,
        sockets: &[(Role, SocketAddr, BorrowedFd<'_>)],
    ) -> Result<(), HandoverError> {
        // At least one message, even with no socket: the successor waits for it.
        let messages: Vec<&[(Role, SocketAddr, BorrowedFd<'_>)]> = if sockets.is_empty() {
            vec![&[]]
        } else {
            sockets.chunks(MAX_SOCKETS).collect()
        };
        for sockets in messages {
            let mut payload =
                vec![u8::try_from(sockets.len()).map_err(|_| HandoverError::Malformed("Sockets"))?];
            for (role, addr, _) in sockets {
                payload.push(*role as u8);
                put_socket_addr(&mut payload, *addr);
            }
            let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, _, fd)| *fd).collect();
            let mut message = header(Kind::Sockets, payload.len())?;
            message.extend_from_slice(&payload);
            send_with_fds(&self.stream, &message, &fds).await?;
        }
        Ok(())
    }

    /// Sends the table dump, in chunks, then DumpEnd.
    pub async fn send_dump(&mut self, dump: &[u8]) -> Result<(), HandoverError> {
        for chunk in chunks(dump) {
            send(&mut self.stream, Kind::Records, chunk).await?;
        }
        send(&mut self.stream, Kind::DumpEnd, &[]).await?;
        Ok(())
    }

    /// Waits for the successor's Stop. An error means it went away: keep serving.
    pub async fn wait_for_stop(&mut self) -> Result<(), HandoverError> {
        match step(receive(&mut self.stream)).await?? {
            (Kind::Stop, _) => Ok(()),
            (got, _) => Err(HandoverError::Unexpected {
                got,
                expected: "Stop",
            }),
        }
    }

    /// After this process stopped serving: the records made since the dump, and how many
    /// connections it still splices.
    pub async fn stopped(
        mut self,
        records: &[u8],
        open_connections: usize,
    ) -> Result<(), HandoverError> {
        for chunk in chunks(records) {
            send(&mut self.stream, Kind::Records, chunk).await?;
        }
        let open = u32::try_from(open_connections).unwrap_or(u32::MAX);
        send(&mut self.stream, Kind::Stopped, &open.to_le_bytes()).await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}

// === framing ===

/// Chunks of frames below [`MAX_MESSAGE`]. Frames may straddle chunks: the receiver joins them.
fn chunks(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.chunks(MAX_MESSAGE / 2)
}

fn header(kind: Kind, len: usize) -> Result<Vec<u8>, HandoverError> {
    let len = u32::try_from(len).map_err(|_| HandoverError::Malformed("oversized"))?;
    let mut out = Vec::with_capacity(5);
    out.push(kind as u8);
    out.extend_from_slice(&len.to_le_bytes());
    Ok(out)
}

async fn send(stream: &mut UnixStream, kind: Kind, payload: &[u8]) -> Result<(), HandoverError> {
    let mut message = header(kind, payload.len())?;
    message.extend_from_slice(payload);
    stream.write_all(&message).await?;
    Ok(())
}

async fn receive(stream: &mut UnixStream) -> Result<(Kind, Vec<u8>), HandoverError> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    let kind = Kind::from_u8(head[0]).ok_or(HandoverError::Malformed("kind"))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(HandoverError::Malformed("length"));
    }
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await?;
    if kind == Kind::Refused {
        let version = payload
            .get(..2)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u16::from_le_bytes);
        return Err(HandoverError::Version(version));
    }
    Ok((kind, payload))
}

/// Sends `message` in one `sendmsg` with `fds` attached to its first byte.
async fn send_with_fds(
    stream: &UnixStream,
    message: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut sent = 0;
    while sent < message.len() {
        let rest = &message[sent..];
        let n = stream
            .async_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if sent == 0 && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("too many sockets to hand over"));
                }
                rustix::net::sendmsg(
                    stream.as_fd(),
                    &[IoSlice::new(rest)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            })
            .await?;
        sent += n;
    }
    Ok(())
}

/// Receives one message and the fds that came with it (only Sockets should have any).
async fn receive_with_fds(
    stream: &UnixStream,
) -> Result<(Kind, Vec<u8>, Vec<OwnedFd>), HandoverError> {
    let mut head = [0u8; 5];
    let mut fds = Vec::new();
    let mut got = 0;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    while got < head.len() {
        let n = stream
            .async_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let received = rustix::net::recvmsg(
                    stream.as_fd(),
                    &mut [IoSliceMut::new(&mut head[got..])],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received_fds) = message {
                        fds.extend(received_fds);
                    }
                }
                Ok(received.bytes)
            })
            .await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let kind = match Kind::from_u8(head[0]) {
        Some(Kind::Refused) => return Err(HandoverError::Version(0)),
        Some(kind) => kind,
        None => return Err(HandoverError::Malformed("kind")),
    };
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(HandoverError::Malformed("length"));
    }
    let mut payload = vec![0; len];
    let mut filled = 0;
    while filled < len {
        let n = stream
            .async_io(Interest::READABLE, || {
                rustix::net::recv(stream.as_fd(), &mut payload[filled..], RecvFlags::empty())
                    .map(|(n, _)| n)
                    .map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        filled += n;
    }
    Ok((kind, payload, fds))
}

fn read_sockets(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<HandedSocket>, HandoverError> {
    let malformed = || HandoverError::Malformed("Sockets");
    let (&count, mut rest) = payload.split_first().ok_or_else(malformed)?;
    if usize::from(count) != fds.len() {
        return Err(malformed());
    }
    let mut sockets = Vec::with_capacity(fds.len());
    for fd in fds {
        let (&role, after) = rest.split_first().ok_or_else(malformed)?;
        let role = match role {
            1 => Role::Tproxy,
            2 => Role::DnsUdp,
            3 => Role::DnsTcp,
            _ => return Err(malformed()),
        };
        let (addr, after) = take_socket_addr(after).ok_or_else(malformed)?;
        rest = after;
        sockets.push(HandedSocket { role, addr, fd });
    }
    Ok(sockets)
}

fn put_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_le_bytes());
}

fn take_socket_addr(bytes: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let (&family, rest) = bytes.split_first()?;
    let (ip, rest): (IpAddr, &[u8]) = match family {
        4 => {
            let octets: [u8; 4] = rest.get(..4)?.try_into().ok()?;
            (Ipv4Addr::from(octets).into(), rest.get(4..)?)
        }
        6 => {
            let octets: [u8; 16] = rest.get(..16)?.try_into().ok()?;
            (Ipv6Addr::from(octets).into(), rest.get(16..)?)
        }
        _ => return None,
    };
    let port = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?);
    Some((SocketAddr::new(ip, port), rest.get(2..)?))
}

/// The peer must run as our effective user (root, for a gateway).
fn check_peer(stream: &UnixStream) -> Result<(), HandoverError> {
    let peer = stream.peer_cred()?.uid();
    let ours = rustix::process::geteuid().as_raw();
    if peer == ours {
        Ok(())
    } else {
        Err(HandoverError::Peer { peer, ours })
    }
}

/// One step of the exchange, bounded in time.
async fn step<T>(future: impl std::future::Future<Output = T>) -> Result<T, HandoverError> {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .map_err(|_| HandoverError::Timeout)
}

#[cfg(test)]
mod tests;
