//! The decision of one UDP flow, from its first datagram: the connection stages that need no
//! bytes (identify, select, names), `udp` grants, and the same `finish` as a TCP connection, so
//! the decision line and metrics are those of a connection with `protocol: udp`.

use std::sync::Arc;
use std::time::Duration;

use egressgate_dns_shim::NameTable;
use tokio::time::Instant;

use crate::config::UnselectedPods;
use crate::connection::context::{Context, Granted};
use crate::connection::stop::Stop;
use crate::connection::{fallback, finish, stages, ClientAddr, OrigDstAddr, Proxy};
use crate::decision::{self, Reason, Verdict};
use crate::metrics::Metrics;
use crate::protocol::Protocol;
use crate::store::{Snapshot, Store};

/// What a decision needs, shared by the relay's tasks.
#[derive(Debug)]
pub(crate) struct Decider {
    /// For the `connection` numbers, shared with TCP.
    pub proxy: Arc<Proxy>,
    pub store: Arc<Store>,
    pub table: Arc<NameTable>,
    pub metrics: Metrics,
    pub unknown_sources: UnselectedPods,
    pub unknown_source_wait: Duration,
}

impl Decider {
    /// Decides the flow of a datagram from `client` to `destination`, prints its decision line
    /// and counts it.
    pub(crate) async fn decide(&self, client: ClientAddr, destination: OrigDstAddr) -> Verdict {
        let accepted = Instant::now();
        let deadline = accepted + self.unknown_source_wait;
        let snapshot = self.store.pod_by_ip(client.ip(), deadline).await;
        let mut cx = Context::new(self.proxy.next_id(), accepted, client, destination);
        cx.protocol = Some(Protocol::Udp);
        let outcome = flow_stages(&mut cx, &snapshot, &self.table);
        let verdict = self.verdict(&cx, &outcome);
        finish::finish(&cx, &outcome, verdict, accepted.elapsed(), &self.metrics);
        self.metrics
            .udp_flows
            .with_label_values(&[verdict.as_str()])
            .inc();
        verdict
    }

    /// Allowed by a `udp` rule; unknown sources follow `unknownSources`; pods no policy selects
    /// keep their UDP (`unselectedPods` is about connections the gateway can judge); else deny,
    /// or audit when only audit-mode policies select the pod.
    fn verdict(&self, cx: &Context<'_>, outcome: &Result<Granted, Stop>) -> Verdict {
        let Err(stop) = outcome else {
            return Verdict::Allow;
        };
        match (stop.reason, &cx.selection) {
            (Reason::UnknownSource, _) => fallback(self.unknown_sources),
            (Reason::Unselected, _) => Verdict::Allow,
            (reason, Some(selection)) => decision::denial_verdict(selection, reason),
            (_, None) => Verdict::Deny,
        }
    }
}

/// The stages of a flow, in order; what they learn goes into `cx`.
fn flow_stages<'s>(
    cx: &mut Context<'s>,
    snapshot: &'s Snapshot,
    table: &NameTable,
) -> Result<Granted<'s>, Stop> {
    let pod = stages::identify(&snapshot.identities, cx.client)?;
    cx.pod = Some(pod);
    let selection = stages::select(pod, &snapshot.policies)?;
    cx.resolved = stages::names(table, pod, cx.destination);
    cx.grants = stages::udp_grants(cx, table, pod, &selection);
    cx.selection = Some(selection);
    let Some(grant) = cx.grants.first() else {
        let resolved_any_name = !cx.resolved.names.is_empty();
        return Err(Stop::new(decision::no_grant_reason(resolved_any_name)));
    };
    let granted = Granted::from(grant);
    stages::keep_names_alive(table, pod, cx.destination, &granted);
    Ok(granted)
}
