//! Transparent TCP serving: the accepted socket's local address is the server the pod
//! addressed. RFC 1035 §4.2.2 framing (two-octet length), several queries per connection, answered
//! in order, closed after the idle timeout.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::client::{Client, Handler, Transport};
use crate::transparent;

/// Open pod connections. Each costs a socket and a task while idle; beyond this new ones are
/// closed at once (the stub retries or falls back to UDP).
const MAX_CONNECTIONS: usize = 512;

/// Pause after a failed accept (EMFILE and the like) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Kernel accept queue length.
const BACKLOG: i32 = 1024;

/// A transparent listener on `addr` (see [`transparent`]).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    transparent::tcp_listener(addr, BACKLOG)
}

/// A listener [`bind`] made, handed over by a predecessor.
pub(crate) fn adopt(fd: OwnedFd) -> io::Result<TcpListener> {
    transparent::adopt_tcp_listener(fd)
}

/// Serves connections until `stopped` turns true; then each open one answers the query it is
/// reading, if any, and closes. A connection is closed after `idle` without a complete query.
pub(crate) async fn serve<H: Handler>(
    shim: Arc<H>,
    listener: TcpListener,
    idle: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let (stream, pod) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%pod, "TCP connections over capacity; closed");
            shim.note_dropped(Transport::Tcp);
            continue;
        };
        // TPROXY keeps the original destination as the accepted socket's local address.
        let server = match stream.local_addr() {
            Ok(server) => server,
            Err(e) => {
                tracing::debug!(%pod, error = %e, "no local address on accepted socket");
                continue;
            }
        };
        let client = Client {
            pod,
            server,
            transport: Transport::Tcp,
        };
        connections.spawn(connection(
            shim.clone(),
            stream,
            client,
            idle,
            permit,
            stopped.clone(),
        ));
    }
    crate::client::drain(&mut connections).await;
}

async fn connection<H: Handler>(
    shim: Arc<H>,
    mut stream: TcpStream,
    client: Client,
    idle: Duration,
    _permit: OwnedSemaphorePermit,
    mut stopped: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    loop {
        // Between queries, stopping closes the connection: the stub's next query opens a new
        // one, which the successor (or nobody, at exit) accepts.
        let len = tokio::select! {
            len = timeout(idle, stream.read_u16()) => len,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        let Ok(Ok(len)) = len else {
            return; // idle, closed or broken
        };
        let mut query = vec![0u8; usize::from(len)];
        // A query not fully sent when stopping is abandoned: a client that sends half a query
        // must not hold up a hand-over or an exit for the idle timeout.
        let read = tokio::select! {
            read = timeout(idle, stream.read_exact(&mut query)) => read,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        if !matches!(read, Ok(Ok(_))) {
            return;
        }
        let Some(reply) = shim.handle(&query, client).await else {
            // Nothing to say (unreadable query, failed upstream): close rather than leave the
            // stub waiting for an answer that will not come.
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        // The answer to a query already read is sent, but once stopping a client that does not
        // read it gets a short grace only.
        let written = tokio::select! {
            written = timeout(idle, stream.write_all(&framed)) => written,
            () = stop_grace(&mut stopped) => return,
        };
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
}

/// How long a reply may still take to write once the shim stops.
const STOP_WRITE_GRACE: Duration = Duration::from_secs(1);

/// Completes [`STOP_WRITE_GRACE`] after the stop signal.
async fn stop_grace(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
    tokio::time::sleep(STOP_WRITE_GRACE).await;
}
