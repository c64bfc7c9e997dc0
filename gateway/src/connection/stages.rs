//! The stages that need no socket: who the pod is, which policies select it, the names it
//! resolved to the destination, the grants that count, and the authorization of what was peeked.
//! Each returns the next stage's input or a [`Stop`].

use egressgate_dns_shim::NameTable;
use egressgate_policy::{Grant, PolicySet, Selection};

use super::addr::{ClientAddr, OrigDstAddr};
use super::context::{Context, Granted, ResolvedNames};
use super::stop::Stop;
use crate::decision::{self, Reason};
use crate::identity::{Identities, Pod};
use crate::peek::Peeked;

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
/// once, and the CNAMEs on the way.
pub fn names(table: &NameTable, pod: &Pod, destination: OrigDstAddr) -> ResolvedNames {
    let mut resolved = ResolvedNames::default();
    let now = std::time::Instant::now();
    for &ip in &pod.ips {
        table.lookup_each(ip, destination.ip(), now, |name, chain| {
            if resolved.names.iter().any(|n| n == name) {
                return;
            }
            resolved.names.push(name.to_owned());
            for cname in chain {
                if !resolved.cnames.iter().any(|c| **c == **cname) {
                    resolved.cnames.push(cname.to_string());
                }
            }
        });
    }
    resolved
}

/// Grants: the rules that allow this destination and port for these names, enforce-mode ones
/// only when any enforce-mode policy selects the pod.
pub fn grants<'s>(
    selection: &Selection<'s>,
    destination: OrigDstAddr,
    resolved: &ResolvedNames,
) -> Vec<Grant<'s>> {
    let names: Vec<&str> = resolved.names.iter().map(String::as_str).collect();
    let grants = selection.grants(destination.ip(), destination.port(), &names);
    decision::effective_grants(selection, grants)
}

/// Authorize: the peeked first message against the grants. Without any grant the peek was only
/// for the log (which SNI or Host the pod wanted is what a policy author needs): whatever it
/// found, no rule allows the connection.
pub fn authorize(
    cx: &mut Context<'_>,
    peeked: Result<Peeked, Stop>,
    require_sni: bool,
) -> Result<Granted, Stop> {
    if cx.grants.is_empty() {
        cx.peeked = peeked.ok();
        let resolved_any_name = !cx.resolved.names.is_empty();
        return Err(Stop::new(decision::no_grant_reason(resolved_any_name)));
    }
    let peeked = cx.peeked.insert(peeked?);
    decision::authorize(peeked, &cx.grants, require_sni)
        .map(Granted::from)
        .map_err(Stop::new)
}

/// An allowed connection keeps the names it used alive for another idle grace; a denied
/// attempt must not.
pub fn keep_names_alive(table: &NameTable, pod: &Pod, destination: OrigDstAddr, granted: &Granted) {
    let now = std::time::Instant::now();
    for &ip in &pod.ips {
        for name in &granted.names {
            table.touch(ip, destination.ip(), name, now);
        }
    }
}
