//! The stages that need no socket: who the pod is, which policies select it, the names it
//! resolved to the destination, the grants that count, and the authorization of what was peeked.
//! Each returns the next stage's input or a [`Stop`].

use egressgate_dns_shim::NameTable;
use egressgate_policy::{
    DnsName, Grant, PolicySet, Protocol as RuleProtocol, Selection, Transport,
};

use super::addr::{ClientAddr, OrigDstAddr};
use super::context::{Context, Granted, ResolvedNames};
use super::stop::Stop;
use crate::decision::{self, Reason};
use crate::identity::{Identities, Pod};
use crate::peek::Peeked;
use crate::protocol::Protocol;
use crate::store::Snapshot;

/// Identify: the pod that uses the client's address.
pub fn identify(identities: &Identities, client: ClientAddr) -> Result<&Pod, Stop> {
    identities
        .lookup(client.ip())
        .map(|pod| &**pod)
        .ok_or(Stop::new(Reason::UnknownSource))
}

/// The policies that select `pod`; none leaves it to `unselectedPods`.
pub fn select<'s>(pod: &Pod, policies: &'s PolicySet) -> Result<Selection<'s>, Stop> {
    let selection = pod.select(policies);
    if selection.is_empty() {
        return Err(Stop::new(Reason::Unselected));
    }
    Ok(selection)
}

/// Names: the live names this pod resolved to `destination` under any of its addresses, each
/// once, and the CNAMEs on the way; at most [`ResolvedNames::CARRIED`] of them, so that an
/// address shared by thousands of names costs a connection no more than one with a few.
pub fn names(table: &NameTable, pod: &Pod, destination: OrigDstAddr) -> ResolvedNames {
    collect_names(table, pod, destination, ResolvedNames::CARRIED)
}

pub fn collect_names(
    table: &NameTable,
    pod: &Pod,
    destination: OrigDstAddr,
    max: usize,
) -> ResolvedNames {
    let mut resolved = ResolvedNames::default();
    let now = std::time::Instant::now();
    for pod_ip in pod.table_ips() {
        let room = max.saturating_sub(resolved.names.len());
        let dst = destination.table_ip();
        resolved.total += table.lookup_some(pod_ip, dst, now, room, |name, chain| {
            // Several pod addresses: the same name may come under each.
            if pod.ips.len() > 1 && resolved.names.contains(name) {
                return;
            }
            resolved.names.push(name.clone());
            for cname in chain {
                if !resolved.cnames.iter().any(|c| **c == **cname) {
                    resolved.cnames.push(cname.to_string());
                }
            }
        });
    }
    resolved.complete = resolved.total <= max;
    resolved
}

/// What the stages before the peek concluded.
#[derive(Debug)]
pub enum Ahead<'s> {
    /// A `tcp` grant: allowed without reading anything.
    Granted(Granted<'s>),
    /// The first message decides: peek, then [`authorize`].
    Peek(&'s Pod),
}

/// The stages before the peek, in the gateway's order: identify, select, names, grants (every
/// name first when one the connection did not carry may grant a `tcp` or `postgresql` rule),
/// and a `tcp` grant's allow. `egressgate explain` runs exactly these too.
pub fn before_peek<'s>(
    cx: &mut Context<'s>,
    snapshot: &'s Snapshot,
    table: &NameTable,
) -> Result<Ahead<'s>, Stop> {
    let pod = identify(&snapshot.identities, cx.client)?;
    cx.pod = Some(pod);
    let selection = select(pod, &snapshot.policies).inspect_err(|_| {
        // Unselected: the names it resolved to the destination are all its line can tell
        // `egressgate suggest` (nothing is read).
        cx.resolved = names(table, pod, cx.destination);
    })?;
    cx.resolved = names(table, pod, cx.destination);
    cx.grants = grants(&selection, cx.destination, &cx.resolved);
    cx.selection = Some(selection);
    if needs_all_names_before_peek(cx) {
        complete_names(cx, table, pod, None, Completion::All);
    }
    if let Some(grant) = decision::tcp_grant(&cx.grants) {
        cx.protocol = Some(Protocol::Tcp);
        return Ok(Ahead::Granted(Granted::from(grant)));
    }
    Ok(Ahead::Peek(pod))
}

/// When the pod holds more names for the destination than the connection carried, the grants
/// so far came from some of them. The first message's name settles it with one hash probe: if
/// the pod resolved it, that name is the one that counts for an allow. A message without a
/// name, a name the pod did not resolve, or a denial for the probed name falls back to every
/// name, so that the verdict and reason are exactly those of a full look (a cost a pod can
/// only cause itself, bounded by `dns.maxNamesPerPod`).
pub fn complete_names(
    cx: &mut Context<'_>,
    table: &NameTable,
    pod: &Pod,
    requested: Option<&DnsName>,
    scope: Completion,
) {
    if cx.resolved.complete {
        return;
    }
    let Some(selection) = &cx.selection else {
        return;
    };
    if let (Some(name), Completion::ProbeFirst) = (requested, scope) {
        let now = std::time::Instant::now();
        let dst = cx.destination.table_ip();
        if pod
            .table_ips()
            .any(|pod_ip| table.is_resolved(pod_ip, dst, name, now))
        {
            cx.resolved.put_first(name);
            cx.grants = grants_for(selection, cx.destination, std::slice::from_ref(name));
            return;
        }
    }
    let mut all = collect_names(table, pod, cx.destination, usize::MAX);
    if let Some(name) = requested {
        if all.names.contains(name) {
            all.put_first(name);
        }
    }
    cx.grants = grants_for(selection, cx.destination, &all.names);
    cx.resolved = all;
}

/// How far [`complete_names`] may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Try the requested name alone first.
    ProbeFirst,
    /// Every name (the probed one was denied: the reason must be a full look's).
    All,
}

/// Grants: the rules that allow this destination and port for these names, enforce-mode ones
/// only when any enforce-mode policy selects the pod.
pub fn grants<'s>(
    selection: &Selection<'s>,
    destination: OrigDstAddr,
    resolved: &ResolvedNames,
) -> Vec<Grant<'s>> {
    grants_for(selection, destination, &resolved.names)
}

pub fn grants_for<'s>(
    selection: &Selection<'s>,
    destination: OrigDstAddr,
    names: &[DnsName],
) -> Vec<Grant<'s>> {
    let grants = selection.grants(destination.ip(), destination.port(), names);
    decision::effective_grants(selection, grants)
}

/// The grants of a UDP flow: `udp` rules only, for these names, enforce-mode ones only when any
/// enforce-mode policy selects the pod. Without a grant among the names carried, every name is
/// looked at (the same full look a denied connection gets).
pub fn udp_grants<'s>(
    cx: &mut Context<'s>,
    table: &NameTable,
    pod: &Pod,
    selection: &Selection<'s>,
) -> Vec<Grant<'s>> {
    let destination = cx.destination;
    let grant = |resolved: &ResolvedNames| {
        let (dst, port) = (destination.ip(), destination.port());
        let grants = selection.grants_for(Transport::Udp, dst, port, &resolved.names);
        decision::effective_grants(selection, grants)
    };
    let grants = grant(&cx.resolved);
    if !grants.is_empty() || cx.resolved.complete {
        return grants;
    }
    let all = collect_names(table, pod, destination, usize::MAX);
    let grants = grant(&all);
    cx.resolved = all;
    grants
}

/// Whether the grants need every name before the peek: when a name the connection did not
/// carry may grant a rule that acts before any name is seen, `tcp` (allows without a peek) or
/// `postgresql` (its grant decides how the gateway answers an SSLRequest).
pub fn needs_all_names_before_peek(cx: &Context<'_>) -> bool {
    !cx.resolved.complete
        && cx.selection.as_ref().is_some_and(|selection| {
            selection.names_may_grant(cx.destination.port(), |protocol| {
                matches!(protocol, RuleProtocol::Tcp | RuleProtocol::Postgresql(_))
            })
        })
}

/// Authorize: the peeked first message against the grants. Without any grant the peek was only
/// for the log (which SNI or Host the pod wanted is what a policy author needs): whatever it
/// found, no rule allows the connection.
pub fn authorize<'s>(
    cx: &mut Context<'s>,
    table: &NameTable,
    pod: &Pod,
    peeked: Result<Peeked, Stop>,
    require_sni: bool,
) -> Result<Granted<'s>, Stop> {
    let requested = peeked.as_ref().ok().and_then(Peeked::requested_name);
    complete_names(cx, table, pod, requested, Completion::ProbeFirst);
    let first = authorize_with(cx, &peeked, require_sni);
    let outcome = match first {
        Err(_) if !cx.resolved.complete => {
            complete_names(cx, table, pod, requested, Completion::All);
            authorize_with(cx, &peeked, require_sni)
        }
        first => first,
    };
    cx.peeked = peeked.ok();
    outcome
}

fn authorize_with<'s>(
    cx: &Context<'s>,
    peeked: &Result<Peeked, Stop>,
    require_sni: bool,
) -> Result<Granted<'s>, Stop> {
    if cx.grants.is_empty() {
        let resolved_any_name = !cx.resolved.names.is_empty();
        return Err(Stop::new(decision::no_grant_reason(resolved_any_name)));
    }
    let peeked = peeked.as_ref().map_err(Clone::clone)?;
    let grant = decision::authorize(peeked, &cx.grants, require_sni).map_err(Stop::new)?;
    Ok(Granted::used(grant, peeked.requested_name()))
}

/// An allowed connection keeps the names it used alive for another idle grace; a denied
/// attempt must not.
pub fn keep_names_alive(
    table: &NameTable,
    pod: &Pod,
    destination: OrigDstAddr,
    granted: &Granted<'_>,
) {
    let now = std::time::Instant::now();
    for pod_ip in pod.table_ips() {
        for name in &granted.names {
            table.touch(pod_ip, destination.table_ip(), name, now);
        }
    }
}
