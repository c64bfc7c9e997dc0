//! Keeps nftables in step with policies and identities: `udp_unpoliced_v4/6` holds the
//! addresses of pods no enforce policy selects (their UDP passes as before), and when a pod's
//! selection or the policies change, the allowed flows are forgotten (kernel and relay), so
//! each is decided again under the new rules at its next datagram.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use egressgate_policy::{PolicyRef, PolicySet};

use super::UdpRelay;
use crate::config::Config;
use crate::nft;
use crate::store::{Snapshot, Store};

/// Policy reloads do not signal identity watchers: they are noticed within this.
const POLL: Duration = Duration::from_secs(1);

/// What the rules depend on: each pod address and the policies that select it.
type Selections = BTreeMap<IpAddr, Vec<PolicyRef>>;

pub(crate) async fn keep_unpoliced(
    config: Config,
    store: Arc<Store>,
    relay: Arc<UdpRelay>,
    shutdown: impl Future<Output = ()>,
) {
    let mut updates = store.identity_updates();
    let mut installed: Option<(Vec<IpAddr>, Selections)> = None;
    let mut policies: Option<Arc<PolicySet>> = None;
    tokio::pin!(shutdown);
    loop {
        let snapshot = store.current();
        let (unpoliced, selections) = survey(&snapshot);
        let policies_changed = policies
            .as_ref()
            .is_some_and(|seen| !Arc::ptr_eq(seen, &snapshot.policies));
        let selections_changed = installed
            .as_ref()
            .is_some_and(|(_, seen)| changed_any(seen, &selections));
        let forget = policies_changed || selections_changed;
        if forget || installed.as_ref().map(|(seen, _)| seen) != Some(&unpoliced) {
            // nft runs a process: off the async workers.
            let (config, list) = (config.clone(), unpoliced.clone());
            let updated =
                tokio::task::spawn_blocking(move || nft::set_udp_unpoliced(&config, &list, forget))
                    .await;
            match updated {
                Ok(Ok(())) => {
                    if forget {
                        relay.forget_decided();
                    }
                    installed = Some((unpoliced, selections));
                    policies = Some(Arc::clone(&snapshot.policies));
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot update the UDP sets"),
                Err(e) => tracing::warn!(error = %e, "UDP sets update panicked"),
            }
        } else {
            policies = Some(Arc::clone(&snapshot.policies));
        }
        drop(snapshot);
        tokio::select! {
            () = &mut shutdown => return,
            changed = updates.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Whether an address of `before` has another selection now, or is gone. A new address is no
/// change: no flow of it was decided as a known pod's.
fn changed_any(before: &Selections, now: &Selections) -> bool {
    before
        .iter()
        .any(|(ip, policies)| now.get(ip) != Some(policies))
}

/// The addresses of pods no enforce policy selects (sorted), and every address's selection.
fn survey(snapshot: &Snapshot) -> (Vec<IpAddr>, Selections) {
    let mut unpoliced = Vec::new();
    let mut selections = Selections::new();
    for (ip, pod) in snapshot.identities.iter() {
        let selection = pod.select(&snapshot.policies);
        if !selection.has_enforce() {
            unpoliced.push(*ip);
        }
        selections.insert(*ip, selection.policies().cloned().collect());
    }
    unpoliced.sort_unstable();
    (unpoliced, selections)
}

#[cfg(test)]
mod tests {
    use egressgate_policy::PolicyKind;

    use super::*;

    fn policy(name: &str) -> PolicyRef {
        PolicyRef {
            kind: PolicyKind::EgressPolicy,
            namespace: Some("shop".to_owned()),
            name: name.to_owned(),
        }
    }

    #[test]
    fn a_new_pod_forgets_no_flow_but_a_changed_or_gone_one_does() {
        let a: IpAddr = [198, 18, 1, 2].into();
        let b: IpAddr = [198, 18, 1, 3].into();
        let before = Selections::from([(a, vec![policy("web")])]);
        let added = Selections::from([(a, vec![policy("web")]), (b, vec![])]);
        assert!(!changed_any(&before, &added));
        let relabelled = Selections::from([(a, vec![policy("web"), policy("tunnel")])]);
        assert!(changed_any(&before, &relabelled));
        assert!(changed_any(&before, &Selections::new()));
    }
}
