//! What an operator sees of the Kubernetes identity watch: `egressgate_identity_*` metrics and
//! an `identity_watch` JSON line for every relist, reconnect and error.
//!
//! kube-runtime's watcher handles bookmarks and idle re-watches inside its stream, so they are
//! not visible here: on a quiet node no event may come for a long time without anything being
//! wrong. The age of the last event is therefore only a problem together with errors (see the
//! `EgressgateIdentityWatchFailing` alert).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use egressgate_log::{rfc3339_now, write_json_line};
use kube::runtime::watcher::{self, Event};
use prometheus::{GaugeVec, IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;

use crate::store::Store;

/// The watches, by their `resource` label.
pub(crate) const RESOURCES: [&str; 2] = ["pods", "namespaces"];
/// The `kind` label of watch errors.
const ERROR_KINDS: [&str; 6] = [
    "unreachable",
    "unauthorized",
    "forbidden",
    "gone",
    "api",
    "other",
];

/// See the module docs.
#[derive(Debug, Clone)]
pub struct WatchMetrics {
    pods: IntGauge,
    addresses: IntGauge,
    relists: IntCounterVec,
    errors: IntCounterVec,
    last_event: GaugeVec,
}

/// The `identity_watch` line.
#[derive(Debug, Serialize)]
struct WatchLine<'a> {
    time: String,
    event: &'static str,
    resource: &'a str,
    /// `relist` (a full list starts: first start or after `410 Gone`), `listed` (it completed),
    /// `reconnected` (events again after errors) or `error`.
    what: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl WatchMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let pods = IntGauge::new(
            "egressgate_identity_pods",
            "Pods with addresses in the identities in force (static file or Kubernetes watch)",
        )?;
        let addresses = IntGauge::new(
            "egressgate_identity_addresses",
            "Pod addresses in the identities in force",
        )?;
        let relists = IntCounterVec::new(
            Opts::new(
                "egressgate_identity_watch_relists_total",
                "Full lists of a watched resource (at start, and after 410 Gone)",
            ),
            &["resource"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "egressgate_identity_watch_errors_total",
                "Failed lists and watches, by resource and kind (unreachable, unauthorized, forbidden, gone, api, other)",
            ),
            &["resource", "kind"],
        )?;
        let last_event = GaugeVec::new(
            Opts::new(
                "egressgate_identity_watch_last_event_timestamp_seconds",
                "When the watch of a resource last delivered an event (list items included)",
            ),
            &["resource"],
        )?;
        for resource in RESOURCES {
            relists.with_label_values(&[resource]);
            last_event.with_label_values(&[resource]);
            for kind in ERROR_KINDS {
                errors.with_label_values(&[resource, kind]);
            }
        }
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(addresses.clone()))?;
        registry.register(Box::new(relists.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(last_event.clone()))?;
        Ok(WatchMetrics {
            pods,
            addresses,
            relists,
            errors,
            last_event,
        })
    }

    /// Counts and logs one item of a watch stream. `failing` is that watch's state: set by an
    /// error, cleared (with a `reconnected` line) by the next event.
    pub(crate) fn observe<K>(
        &self,
        resource: &'static str,
        item: &watcher::Result<Event<K>>,
        failing: &mut bool,
    ) {
        match item {
            Ok(event) => {
                self.last_event
                    .with_label_values(&[resource])
                    .set(unix_now());
                if std::mem::take(failing) {
                    line(resource, "reconnected", None, None);
                }
                match event {
                    Event::Init => {
                        self.relists.with_label_values(&[resource]).inc();
                        line(resource, "relist", None, None);
                    }
                    Event::InitDone => line(resource, "listed", None, None),
                    Event::InitApply(_) | Event::Apply(_) | Event::Delete(_) => {}
                }
            }
            Err(e) => {
                let kind = error_kind(e);
                self.errors.with_label_values(&[resource, kind]).inc();
                *failing = true;
                line(resource, "error", Some(kind), Some(e.to_string()));
            }
        }
    }

    /// Keeps the pod and address gauges equal to the identities in force (from either
    /// source) until `shutdown`.
    pub async fn follow(self, store: Arc<Store>, shutdown: impl std::future::Future) {
        let mut updates = store.identity_updates();
        tokio::pin!(shutdown);
        loop {
            let identities = store.current().identities;
            self.pods
                .set(i64::try_from(identities.len()).unwrap_or(i64::MAX));
            self.addresses
                .set(i64::try_from(identities.iter().count()).unwrap_or(i64::MAX));
            tokio::select! {
                _ = &mut shutdown => return,
                changed = updates.changed() => if changed.is_err() { return },
            }
        }
    }
}

fn line(resource: &str, what: &'static str, kind: Option<&'static str>, detail: Option<String>) {
    write_json_line(&WatchLine {
        time: rfc3339_now(),
        event: "identity_watch",
        resource,
        what,
        kind,
        detail,
    });
}

/// The `kind` label of a watch error.
fn error_kind(error: &watcher::Error) -> &'static str {
    let by_code = |code: u16| match code {
        401 => "unauthorized",
        403 => "forbidden",
        410 => "gone",
        _ => "api",
    };
    match error {
        watcher::Error::WatchError(status) => by_code(status.code),
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => by_code(status.code),
            kube::Error::HyperError(_) | kube::Error::Service(_) => "unreachable",
            _ => "other",
        },
        _ => "other",
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
