//! What the transports (`udp`, `tcp`) and the pipeline (`shim`) share: who sent a query, over
//! what, and [`Handler`], all a transport needs of the pipeline. The transports know nothing
//! else of the shim, so the pipeline can own them without an import loop. Also how a stopping
//! transport drains what it already took.

use std::future::Future;
use std::net::SocketAddr;

use crate::forward::{Done, UdpExchanges};
use crate::persist::Unsaved;
use crate::query::MessageHead;

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

/// How the pipeline takes a query before any upstream is asked.
#[derive(Debug)]
pub(crate) enum Begin {
    /// Settled without an upstream: the reply (REFUSED), or none (an unreadable query).
    Reply(Option<Vec<u8>>),
    /// To forward upstream; the query's head.
    Forward(MessageHead),
}

/// The pipeline, as a transport sees it (the shim's `DnsShim`). TCP takes a query through it
/// in one call ([`Handler::handle`]); UDP in steps, so that one task serves every query:
/// [`Handler::begin`], then the exchange in [`UdpExchanges`], then [`Handler::complete`], and
/// [`Handler::save`] before the replies leave.
pub(crate) trait Handler: Send + Sync + 'static {
    /// The whole pipeline for a query over TCP: the reply to send to the pod, if any.
    fn handle(&self, query: &[u8], client: Client) -> impl Future<Output = Option<Vec<u8>>> + Send;

    /// The pipeline up to asking an upstream.
    fn begin(&self, query: &[u8], client: Client) -> Begin;

    /// The pipeline after the exchange: records the answer (the journal's part in `unsaved`)
    /// and returns the reply to send to the pod, if any.
    fn complete(&self, done: Done<Client>, unsaved: &mut Unsaved) -> Option<Vec<u8>>;

    /// Saves `unsaved` in the journal (if any): called before the replies of its answers leave.
    fn save(&self, unsaved: &mut Unsaved);

    /// The exchange with the upstreams for UDP queries, for one listener's task.
    fn udp_exchanges(&self) -> UdpExchanges<Client>;

    /// A query turned away before the pipeline (over capacity).
    fn note_dropped(&self, transport: Transport);
}

/// How long a stopping shim waits for the queries it already read. Past this (a query stuck on
/// a slow or dead upstream) they are dropped unanswered, and the stub asks again, of the
/// successor: waiting longer would hold up the hand-over, during which nothing is served.
pub(crate) const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits for `tasks` (the TCP connections already taken) up to [`DRAIN_LIMIT`], then aborts
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
