//! What the transports (`udp`, `tcp`) and the pipeline (`shim`) share: who sent a query, over
//! what, and [`Handler`], all a transport needs of the pipeline. The transports know nothing
//! else of the shim, so the pipeline can own them without an import loop.

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
