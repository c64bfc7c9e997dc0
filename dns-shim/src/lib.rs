//! The egressgate DNS shim: answers the DNS queries nftables TPROXY diverts from pods (UDP and TCP
//! port 53, to whatever server the pod addressed), resolves them only through the configured
//! trusted upstreams, records each genuine A/AAAA answer in the per-pod [`NameTable`] *before* the
//! pod sees it, and replies as the server the pod addressed. The gateway reads the table to learn
//! which names a pod resolved to the address it is connecting to; policy, the TPROXY rules and the
//! admin endpoint belong to the gateway, not here. From the policy crate it takes only
//! `DnsName`, so the table holds names by the same rule the policies match them with.
//!
//! Layout:
//! - `query`: the head of a DNS message (header + question) and the replies the shim builds itself.
//! - `answer`: reading a response against its query: question match, CNAME chain, min TTL (pure).
//! - `table`: [`NameTable`], the per-pod record of resolved names.
//! - `persist`: the table on disk (journal, snapshot, restore), so restarts forget nothing.
//! - `forward`: the exchange with trusted upstreams: random IDs and ports, TC→TCP, timeouts;
//!   over UDP, every query of a listener in its one task (`UdpExchanges`), none with a task.
//! - `shim`: [`DnsShim`], its config and the one pipeline every query takes.
//! - `udp` / `tcp`: transparent serving (original destination in, reply as that server); they
//!   reach the pipeline only through `client::Handler`.
//! - [`transparent`]: the transparent-socket setup, shared with the gateway's TPROXY listeners.
//! - `log`: the `dns` line per answered query (written by `egressgate_log`). `metrics`: the
//!   Prometheus metrics.
#![forbid(unsafe_code)]

mod answer;
mod batch;
mod client;
mod forward;
mod log;
mod metrics;
pub mod persist;
mod query;
mod shim;
mod table;
mod tcp;
pub mod transparent;
mod udp;

pub use answer::{check_response, read_answer, read_exchange, Answer, Mismatch, Reading};
pub use forward::ForwardError;
pub use query::{edns_udp_payload, read_head, MessageHead, Question, Rcode};
pub use shim::{DnsShim, ForeignServerPolicy, ShimConfig, ShimListeners};
pub use table::{
    DestIp, ExportedName, NameTable, PodIp, RecordLife, ResolvedName, Restored, SavedName,
    SavedTouch, TableLimits, Touched,
};
