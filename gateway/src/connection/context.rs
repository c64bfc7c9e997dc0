//! What one connection's stages have learned, in one place: each stage reads what the earlier
//! ones found and adds its own; `finish` reads it all for the decision line and the metrics.

use std::time::Duration;

use egressgate_policy::{DnsName, Grant, GrantPeer, PolicyRef, Selection};
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

/// The live names the pod resolved to the destination, under any of its addresses: all of
/// them, or, when more share the address than a connection carries ([`ResolvedNames::CARRIED`]),
/// the first of them and the name the first message asked for.
#[derive(Debug)]
pub struct ResolvedNames {
    /// Each once; the name the first message asked for first once it is known to be resolved.
    pub names: Vec<DnsName>,
    /// The CNAME targets on the way (recorded for the log, never granting).
    pub cnames: Vec<String>,
    /// The names the pod holds for the destination (expired ones not yet purged included).
    pub total: usize,
    /// `names` holds every name the pod resolved to the destination.
    pub complete: bool,
}

impl Default for ResolvedNames {
    /// None resolved: nothing left out.
    fn default() -> Self {
        ResolvedNames {
            names: Vec::new(),
            cnames: Vec::new(),
            total: 0,
            complete: true,
        }
    }
}

impl ResolvedNames {
    /// Names a connection copies out of the table. Past it the grants come from these and from
    /// one hash probe for the name the first message asks for (see `stages::complete_names`).
    pub const CARRIED: usize = 16;

    /// Names a decision line lists; `namesTotal` says how many there were.
    pub const LOGGED: usize = 8;

    /// The names a decision line lists.
    pub fn logged(&self) -> &[DnsName] {
        &self.names[..self.names.len().min(Self::LOGGED)]
    }

    /// The CNAMEs a decision line lists.
    pub fn logged_cnames(&self) -> &[String] {
        &self.cnames[..self.cnames.len().min(Self::LOGGED)]
    }

    /// Puts `name` first (adding it if it is not carried).
    pub fn put_first(&mut self, name: &DnsName) {
        match self.names.iter().position(|n| n == name) {
            Some(at) => self.names[..=at].rotate_right(1),
            None => self.names.insert(0, name.clone()),
        }
    }
}

/// The grant that allowed a connection: what the log names, and the names it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted<'s> {
    pub policy: &'s PolicyRef,
    pub rule: usize,
    pub names: Vec<DnsName>,
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

impl<'s> Granted<'s> {
    /// The grant that allowed a first message asking for `requested`: of a `dnsName` grant,
    /// that name is the one used; a message naming nothing used all the grant's names.
    pub fn used(grant: &Grant<'s>, requested: Option<&DnsName>) -> Self {
        let names = match (&grant.peer, requested) {
            (GrantPeer::Names(_), Some(name)) => vec![name.clone()],
            (GrantPeer::Names(names), None) => names.clone(),
            (GrantPeer::Cidr(_), _) => Vec::new(),
        };
        Granted {
            policy: grant.policy,
            rule: grant.rule,
            names,
        }
    }
}

impl<'s> From<&Grant<'s>> for Granted<'s> {
    fn from(grant: &Grant<'s>) -> Self {
        Granted::used(grant, None)
    }
}
