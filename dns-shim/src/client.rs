//! What the transports (`udp`, `tcp`) and the pipeline (`shim`) share: who sent a query, over
//! what, and [`Handler`], all a transport needs of the pipeline. The transports know nothing
//! else of the shim, so the pipeline can own them without an import loop. Also how a stopping
//! transport drains what it already took.

use std::future::Future;
use std::net::SocketAddr;

/// The client side of an intercepted query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Where a query came from and where it was going.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client {
    pub(crate) pod: SocketAddr,
    /// The original destination: the server the pod addressed, which the reply comes from.
    pub(crate) server: SocketAddr,
    pub(crate) transport: Transport,
}

/// The pipeline, as a transport sees it (the shim's `DnsShim`).
pub(crate) trait Handler: Send + Sync + 'static {
    /// The reply to send to the pod, if any.
    fn handle(&self, query: &[u8], client: Client) -> impl Future<Output = Option<Vec<u8>>> + Send;

    /// A query turned away before the pipeline (over capacity).
    fn note_dropped(&self, transport: Transport);
}

/// How long a stopping shim waits for the queries it already read. Past this (a query stuck on
/// a slow or dead upstream) they are dropped unanswered, and the stub asks again, of the
/// successor: waiting longer would hold up the hand-over, during which nothing is served.
pub(crate) const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits for `tasks` (queries or connections already taken) up to [`DRAIN_LIMIT`], then aborts
/// the rest.
pub(crate) async fn drain(tasks: &mut tokio::task::JoinSet<()>) {
    let finished = tokio::time::timeout(DRAIN_LIMIT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::info!(
            left = tasks.len(),
            "queries still waiting on an upstream dropped at stop"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}
