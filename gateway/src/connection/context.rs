//! What one connection's stages have learned, in one place: each stage reads what the earlier
//! ones found and adds its own; `finish` reads it all for the decision line and the metrics.

use std::time::Duration;

use egressgate_policy::{Grant, GrantPeer, Selection};
use tokio::time::Instant;

use super::addr::{ClientAddr, OrigDstAddr};
use super::reader::PeekReader;
use crate::identity::Pod;
use crate::peek::Peeked;
use crate::protocol::Protocol;

/// The per-connection context. `'s` is the policy and identity snapshot the decision reads.
#[derive(Debug)]
pub struct Context<'s> {
    /// The `connection` number of the log lines.
    pub id: u64,
    pub accepted: Instant,
    pub client: ClientAddr,
    pub destination: OrigDstAddr,
    /// The pod the client address belongs to, once identified.
    pub pod: Option<&'s Pod>,
    /// The policies that select the pod.
    pub selection: Option<Selection<'s>>,
    pub resolved: ResolvedNames,
    /// The grants that count for this destination and port.
    pub grants: Vec<Grant<'s>>,
    /// Set as soon as the first bytes tell (even if the message then turns out invalid).
    pub protocol: Option<Protocol>,
    pub peeked: Option<Peeked>,
    /// From the first byte read to the whole first message (or the reason there is none).
    pub peek_duration: Option<Duration>,
}

/// The live names the pod resolved to the destination, under any of its addresses.
#[derive(Debug, Default)]
pub struct ResolvedNames {
    /// Each once, in the name table's order.
    pub names: Vec<String>,
    /// The CNAME targets on the way (recorded for the log, never granting).
    pub cnames: Vec<String>,
}

/// The grant that allowed a connection: what the log names, and the names it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub policy: String,
    pub rule: usize,
    pub names: Vec<String>,
}

/// The connection's sockets and the client bytes read while deciding.
#[derive(Debug)]
pub struct Streams<C, U> {
    pub client: C,
    /// Opened while deciding (PostgreSQL encryption negotiation); the relay goes on with it.
    pub upstream: Option<U>,
    pub reader: PeekReader,
}

impl<'s> Context<'s> {
    pub fn new(id: u64, accepted: Instant, client: ClientAddr, destination: OrigDstAddr) -> Self {
        Context {
            id,
            accepted,
            client,
            destination,
            pod: None,
            selection: None,
            resolved: ResolvedNames::default(),
            grants: Vec::new(),
            protocol: None,
            peeked: None,
            peek_duration: None,
        }
    }
}

impl From<&Grant<'_>> for Granted {
    fn from(grant: &Grant<'_>) -> Self {
        Granted {
            policy: grant.policy.to_string(),
            rule: grant.rule,
            names: match &grant.peer {
                GrantPeer::Names(names) => names.clone(),
                GrantPeer::Cidr(_) => Vec::new(),
            },
        }
    }
}
