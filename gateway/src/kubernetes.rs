//! Pod identity from the Kubernetes API: a watch of this node's pods (field selector
//! `spec.nodeName=NODE`) and of all namespaces (their labels are what
//! `ClusterEgressPolicy.spec.namespaceSelector` matches), folded into an IP → pod index that is
//! published whole to the [`Store`].
//!
//! - **Lists and watches.** kube-runtime's watcher lists (paginated), then watches from the list's
//!   `resourceVersion` with `allowWatchBookmarks=true`. A watch that ends or drops is resumed from
//!   the last `resourceVersion` seen, bookmarks included, without a relist. A `410 Gone` relists:
//!   as an `ERROR` event in the stream (the watcher does it), and as the HTTP status of the watch
//!   request itself (the watcher would retry the expired version forever, so the stream is started
//!   anew). Every error backs off (`default_backoff`: 0.8 s doubling to 30 s, with jitter).
//! - **Relists are atomic.** A relist is buffered and replaces the pods (or namespaces) only once
//!   complete: pods absent from it disappear, and until then the last index keeps serving.
//! - **Errors never empty the index.** While the API server is unreachable nothing is published;
//!   lookups use the last index.
//! - **Ready after both first lists.** Nothing is published, and the store is not marked ready,
//!   until the first list of pods *and* of namespaces is complete: a pod without its namespace's
//!   labels would fall out of `namespaceSelector`s.
//! - **What is indexed.** Every address of `status.podIPs` (IPv4 and IPv6; `status.podIP` on an
//!   old object without `podIPs`). Not hostNetwork pods (they use the node's address), not pods
//!   that finished (`Succeeded`/`Failed`: their addresses are free for new pods), not pods without
//!   addresses yet.
//! - **A reused address.** Pods are kept by UID. When two pods claim one address (the CNI gave a
//!   dead pod's address to a new pod before the dead pod's object was updated or deleted), the
//!   pod that claimed it *last* owns it: the one first seen holding it in a later event. Watch
//!   events arrive in `resourceVersion` order and a pod's later updates keep its first claim, so a
//!   terminating pod's status updates or its final `DELETED` do not take the address back. Claims
//!   first seen together (one list) fall back to the later `status.startTime`, then the later
//!   `creationTimestamp`. A pod's published `ips` are only the addresses it owns.
//! - **Publishing.** After each event (bursts that are already buffered are taken together) the
//!   whole index is rebuilt and swapped in, only when something a decision sees changed: a node's
//!   ~110 pods make that cheap, and status-only updates are skipped.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod as PodObject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::config::DaemonSetRef;
use crate::identity::{Identities, Owner, Pod, SelectionCache};
use crate::store::Store;
use crate::watch_metrics::WatchMetrics;

/// The watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("no Kubernetes client configuration (in-cluster or $KUBECONFIG): {0}")]
    Client(#[from] kube::Error),
}

/// See the module docs.
pub struct IdentityWatch {
    client: Client,
    node: String,
    metrics: WatchMetrics,
}

impl std::fmt::Debug for IdentityWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityWatch")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Events taken before one publication, at most: a relist is buffered anyway, this only bounds
/// how long a storm of watch events delays the next publication.
const MAX_BATCH: usize = 256;

impl IdentityWatch {
    /// A client from the in-cluster service account or `$KUBECONFIG`.
    pub async fn connect(node: String, metrics: WatchMetrics) -> Result<Self, WatchError> {
        Ok(Self::new(Client::try_default().await?, node, metrics))
    }

    pub fn new(client: Client, node: String, metrics: WatchMetrics) -> Self {
        IdentityWatch {
            client,
            node,
            metrics,
        }
    }

    /// Watches until `shutdown`, publishing a new index after every change once both first lists
    /// are complete.
    pub async fn run(self, store: Arc<Store>, shutdown: impl std::future::Future) {
        let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut pod_events = watch(Api::<PodObject>::all(self.client.clone()), pod_config);
        let mut namespace_events = watch(
            Api::<Namespace>::all(self.client),
            watcher::Config::default(),
        );
        let mut index = Index::default();
        let metrics = &self.metrics;
        let (mut pods_failing, mut namespaces_failing) = (false, false);
        let mut on_pod = |index: &mut Index, event| {
            metrics.observe("pods", &event, &mut pods_failing);
            index.pod_event(event);
        };
        let mut on_namespace = |index: &mut Index, event| {
            metrics.observe("namespaces", &event, &mut namespaces_failing);
            index.namespace_event(event);
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                Some(event) = pod_events.next() => on_pod(&mut index, event),
                Some(event) = namespace_events.next() => on_namespace(&mut index, event),
            }
            // Whatever else already arrived goes into the same publication.
            for _ in 0..MAX_BATCH {
                let mut more = false;
                if let Some(Some(event)) = pod_events.next().now_or_never() {
                    on_pod(&mut index, event);
                    more = true;
                }
                if let Some(Some(event)) = namespace_events.next().now_or_never() {
                    on_namespace(&mut index, event);
                    more = true;
                }
                if !more {
                    break;
                }
            }
            index.publish(&store);
        }
    }
}

/// kube-runtime's watcher with backoff, started anew when the API server answers a watch request
/// itself with `410 Gone`: the watcher relists on a `410` `ERROR` event but retries a rejected
/// watch with the same expired `resourceVersion` forever.
fn watch<K>(api: Api<K>, config: watcher::Config) -> BoxStream<'static, watcher::Result<Event<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let start = move || watcher::watcher(api.clone(), config.clone()).boxed();
    let first = start();
    futures::stream::unfold((first, start), |(mut inner, start)| async move {
        let item = inner.next().await?;
        if let Err(watcher::Error::WatchStartFailed(kube::Error::Api(status))) = &item {
            if status.code == 410 {
                inner = start();
            }
        }
        Some((item, (inner, start)))
    })
    .default_backoff()
    .boxed()
}

type Labels = BTreeMap<String, String>;

/// What the watches have seen so far.
#[derive(Debug, Default)]
struct Index {
    /// By UID: a pod's address may be reused by a new pod before the old one is gone.
    pods: HashMap<String, PodEntry>,
    namespaces: HashMap<String, Labels>,
    /// A relist in progress (between `Init` and `InitDone`).
    pod_relist: Option<HashMap<String, PodEntry>>,
    namespace_relist: Option<HashMap<String, Labels>>,
    pods_listed: bool,
    namespaces_listed: bool,
    /// Advances with every pod event and once per relist: when an address was claimed.
    clock: u64,
    /// Something a decision sees changed since the last publication.
    changed: bool,
    /// Published at least once (and the store marked ready).
    published: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEntry {
    namespace: String,
    name: String,
    labels: Labels,
    /// The owner reference with `controller: true`.
    owner: Option<Owner>,
    /// Every address, with the clock at which this pod was first seen holding it.
    ips: Vec<(IpAddr, u64)>,
    started: Option<Time>,
    created: Option<Time>,
}

impl PodEntry {
    fn claimed_at(&self, ip: IpAddr) -> Option<u64> {
        self.ips
            .iter()
            .find_map(|&(own, at)| (own == ip).then_some(at))
    }
}

impl Index {
    fn pod_event(&mut self, event: watcher::Result<Event<PodObject>>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; serving the last index");
                return;
            }
        };
        match event {
            Event::Init => {
                self.clock += 1;
                self.pod_relist = Some(HashMap::new());
            }
            Event::InitApply(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    let entry = pod_entry(&pod, self.pods.get(uid), self.clock);
                    if let Some(entry) = entry {
                        let relist = self.pod_relist.get_or_insert_with(HashMap::new);
                        relist.insert(uid.to_owned(), entry);
                    }
                }
            }
            Event::InitDone => {
                self.pods = self.pod_relist.take().unwrap_or_default();
                self.pods_listed = true;
                self.changed = true;
            }
            Event::Apply(pod) => {
                self.clock += 1;
                let Some(uid) = pod.metadata.uid.as_deref() else {
                    return;
                };
                match pod_entry(&pod, self.pods.get(uid), self.clock) {
                    Some(entry) => {
                        if self.pods.get(uid) != Some(&entry) {
                            self.pods.insert(uid.to_owned(), entry);
                            self.changed = true;
                        }
                    }
                    None => self.changed |= self.pods.remove(uid).is_some(),
                }
            }
            Event::Delete(pod) => {
                self.clock += 1;
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.changed |= self.pods.remove(uid).is_some();
                }
            }
        }
    }

    fn namespace_event(&mut self, event: watcher::Result<Event<Namespace>>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "namespace watch failed; serving the last index");
                return;
            }
        };
        match event {
            Event::Init => self.namespace_relist = Some(HashMap::new()),
            Event::InitApply(ns) => {
                if let Some(name) = ns.metadata.name {
                    let labels = ns.metadata.labels.unwrap_or_default();
                    let relist = self.namespace_relist.get_or_insert_with(HashMap::new);
                    relist.insert(name, labels);
                }
            }
            Event::InitDone => {
                self.namespaces = self.namespace_relist.take().unwrap_or_default();
                self.namespaces_listed = true;
                self.changed = true;
            }
            Event::Apply(ns) => {
                if let Some(name) = ns.metadata.name {
                    let labels = ns.metadata.labels.unwrap_or_default();
                    if self.namespaces.get(&name) != Some(&labels) {
                        self.namespaces.insert(name, labels);
                        self.changed = true;
                    }
                }
            }
            Event::Delete(ns) => {
                if let Some(name) = ns.metadata.name {
                    self.changed |= self.namespaces.remove(&name).is_some();
                }
            }
        }
    }

    /// Swaps in a new index if something changed and both first lists are complete; marks the
    /// store ready on the first publication.
    fn publish(&mut self, store: &Store) {
        if !(self.changed && self.pods_listed && self.namespaces_listed) {
            return;
        }
        self.changed = false;
        let identities = self.identities();
        // `len` counts pods; every address of every pod is an entry of the index.
        let addresses = identities.iter().count();
        store.set_identities(identities);
        if !self.published {
            self.published = true;
            store.mark_identities_ready();
            tracing::info!(
                pods = self.pods.len(),
                namespaces = self.namespaces.len(),
                addresses,
                "pod identities listed; ready"
            );
        } else {
            tracing::debug!(pods = self.pods.len(), addresses, "pod identities updated");
        }
    }

    /// The IP → pod index; see the module docs for who owns a reused address.
    fn identities(&self) -> Identities {
        type Rank<'a> = (u64, Option<&'a Time>, Option<&'a Time>, &'a str);
        let mut owners: HashMap<IpAddr, Rank<'_>> = HashMap::new();
        for (uid, entry) in &self.pods {
            for &(ip, claimed) in &entry.ips {
                let rank = (
                    claimed,
                    entry.started.as_ref(),
                    entry.created.as_ref(),
                    uid.as_str(),
                );
                let owner = owners.entry(ip).or_insert(rank);
                if rank > *owner {
                    tracing::debug!(%ip, pod = %entry.name, "address reused by a newer pod");
                    *owner = rank;
                }
            }
        }
        let mut by_ip = HashMap::with_capacity(owners.len());
        for (uid, entry) in &self.pods {
            let owned: Vec<IpAddr> = entry
                .ips
                .iter()
                .map(|&(ip, _)| ip)
                .filter(|ip| owners.get(ip).is_some_and(|owner| owner.3 == uid))
                .collect();
            if owned.is_empty() {
                continue;
            }
            let pod = Arc::new(Pod {
                namespace: entry.namespace.clone(),
                name: entry.name.clone(),
                labels: entry.labels.clone(),
                namespace_labels: self
                    .namespaces
                    .get(&entry.namespace)
                    .cloned()
                    .unwrap_or_default(),
                owner: entry.owner.clone(),
                ips: owned.clone(),
                selection: SelectionCache::default(),
            });
            for ip in owned {
                by_ip.insert(ip, Arc::clone(&pod));
            }
        }
        Identities::from_index(by_ip)
    }
}

/// The index entry of a pod that owns addresses: not hostNetwork (those share the node's
/// address and are not intercepted), not finished, with addresses. An address `previous` (the same
/// UID) already held keeps its claim time; a new one is claimed at `clock`.
fn pod_entry(pod: &PodObject, previous: Option<&PodEntry>, clock: u64) -> Option<PodEntry> {
    if pod.spec.as_ref().and_then(|spec| spec.host_network) == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    // `podIP` is `podIPs[0]`; only an object without `podIPs` needs it.
    let fallback = status
        .pod_ip
        .as_deref()
        .filter(|_| status.pod_ips.as_ref().is_none_or(Vec::is_empty));
    let mut ips: Vec<(IpAddr, u64)> = Vec::new();
    for text in listed.chain(fallback) {
        let Ok(ip) = text.parse::<IpAddr>() else {
            tracing::debug!(pod = ?pod.metadata.name, ip = text, "pod address not understood");
            continue;
        };
        let ip = ip.to_canonical();
        if ips.iter().all(|&(seen, _)| seen != ip) {
            let claimed = previous.and_then(|p| p.claimed_at(ip)).unwrap_or(clock);
            ips.push((ip, claimed));
        }
    }
    if ips.is_empty() {
        return None;
    }
    Some(PodEntry {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        owner: controller_owner(pod),
        ips,
        started: status.start_time.clone(),
        created: pod.metadata.creation_timestamp.clone(),
    })
}

/// The pod's controller: the one owner reference with `controller: true` (Kubernetes allows at
/// most one).
fn controller_owner(pod: &PodObject) -> Option<Owner> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))?;
    Some(Owner {
        kind: owner.kind.clone(),
        name: owner.name.clone(),
    })
}

/// Watches the DaemonSet that runs this gateway until `shutdown`; `deleted` turns true once it
/// is deleted or being deleted. An established watch keeps its events after the account's RBAC
/// is removed, which `helm uninstall` does right after deleting the DaemonSet.
pub async fn watch_owner(
    owner: DaemonSetRef,
    deleted: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future,
) {
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the owner DaemonSet; its removal is checked at exit");
            return;
        }
    };
    let api: Api<DaemonSet> = Api::namespaced(client, &owner.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", owner.name));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => return,
            event = events.next() => event,
        };
        let gone = match event {
            Some(Ok(Event::Delete(_))) => true,
            Some(Ok(Event::Apply(ds) | Event::InitApply(ds))) => {
                ds.metadata.deletion_timestamp.is_some()
            }
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "owner DaemonSet watch failed; retrying");
                false
            }
            None => return,
        };
        if gone && !deleted.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::info!(daemon_set = %owner.name, "owner DaemonSet deleted: the rules go at exit");
        }
    }
}

/// Whether `owner` is gone or being deleted: the gateway was uninstalled rather than restarted
/// or rolled (a rollout keeps the DaemonSet; `helm uninstall` deletes it before its pods).
pub async fn daemon_set_removed(owner: &DaemonSetRef) -> Result<bool, kube::Error> {
    let api: Api<DaemonSet> = Api::namespaced(Client::try_default().await?, &owner.namespace);
    let found = api.get_opt(&owner.name).await?;
    Ok(found.is_none_or(|daemon_set| daemon_set.metadata.deletion_timestamp.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> PodObject {
        serde_json::from_value(value).expect("pod object")
    }

    fn object(uid: &str, ips: &[&str], started: &str) -> PodObject {
        let pod_ips: Vec<_> = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
        pod(serde_json::json!({
            "metadata": {"name": uid, "namespace": "shop", "uid": uid, "resourceVersion": "1",
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIPs": pod_ips, "startTime": started},
        }))
    }

    fn owner(index: &Index, ip: &str) -> Option<String> {
        let ip = ip.parse().expect("ip");
        index.identities().lookup(ip).map(|pod| pod.name.clone())
    }

    #[test]
    fn entries_skip_host_network_finished_and_addressless_pods() {
        let host = pod(serde_json::json!({
            "metadata": {"name": "h", "namespace": "kube-system", "uid": "h"},
            "spec": {"containers": [], "hostNetwork": true},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}]},
        }));
        assert!(pod_entry(&host, None, 1).is_none());
        let mut done = object("done", &["198.18.0.9"], "2025-01-01T00:00:00Z");
        if let Some(status) = done.status.as_mut() {
            status.phase = Some("Succeeded".into());
        }
        assert!(pod_entry(&done, None, 1).is_none());
        assert!(pod_entry(&object("pending", &[], "2025-01-01T00:00:00Z"), None, 1).is_none());
        // Only `podIP` (an old object), an IPv4-mapped address, and a garbage entry.
        let old = pod(serde_json::json!({
            "metadata": {"name": "old", "namespace": "shop", "uid": "old"},
            "spec": {"containers": []},
            "status": {"phase": "Pending", "podIP": "::ffff:198.18.0.7"},
        }));
        let entry = pod_entry(&old, None, 3).expect("indexed");
        assert_eq!(entry.ips, vec![("198.18.0.7".parse().expect("ip"), 3)]);
        let odd = object(
            "odd",
            &["not-an-ip", "fd00::7", "fd00::7"],
            "2025-01-01T00:00:00Z",
        );
        let entry = pod_entry(&odd, None, 4).expect("indexed");
        assert_eq!(entry.ips, vec![("fd00::7".parse().expect("ip"), 4)]);
    }

    #[test]
    fn the_owner_is_the_controller_reference() {
        let reference = |kind: &str, name: &str, controller: Option<bool>| {
            serde_json::json!({"apiVersion": "apps/v1", "kind": kind, "name": name,
                               "uid": name, "controller": controller})
        };
        let mut owned = object("web-7c9d-x2", &["198.18.0.8"], "2025-01-01T00:00:00Z");
        owned.metadata.owner_references = serde_json::from_value(serde_json::json!([
            reference("ConfigMap", "not-a-controller", None),
            reference("ReplicaSet", "web-7c9d", Some(true)),
        ]))
        .expect("owner references");
        let entry = pod_entry(&owned, None, 1).expect("indexed");
        let owner = entry.owner.expect("controller found");
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ReplicaSet", "web-7c9d")
        );
        let bare = object("bare", &["198.18.0.9"], "2025-01-01T00:00:00Z");
        assert!(pod_entry(&bare, None, 1).expect("indexed").owner.is_none());
    }

    #[test]
    fn a_reused_address_belongs_to_the_last_claim_then_the_later_start() {
        let mut index = Index::default();
        index.pod_event(Ok(Event::Init));
        // One list: both claim .5; the later start wins whatever the order. Started at
        // second precision and with a fraction, to compare times and not strings.
        let old = object("old", &["198.18.0.5", "fd00::5"], "2025-01-01T00:00:01Z");
        let new = object("new", &["198.18.0.5"], "2025-01-01T00:00:01.5Z");
        index.pod_event(Ok(Event::InitApply(new)));
        index.pod_event(Ok(Event::InitApply(old.clone())));
        index.pod_event(Ok(Event::InitDone));
        assert_eq!(owner(&index, "198.18.0.5").as_deref(), Some("new"));
        let stale = index.identities();
        let stale = stale.lookup("fd00::5".parse().expect("ip")).expect("old");
        assert_eq!(stale.ips, vec!["fd00::5".parse::<IpAddr>().expect("ip")]);

        // A later claim beats an earlier start: `late` started before `old` but got .6 after.
        let first = object("first", &["198.18.0.6"], "2025-01-01T00:00:09Z");
        let late = object("late", &["198.18.0.6"], "2025-01-01T00:00:00Z");
        index.pod_event(Ok(Event::Apply(first.clone())));
        index.pod_event(Ok(Event::Apply(late)));
        assert_eq!(owner(&index, "198.18.0.6").as_deref(), Some("late"));
        // The first pod's later updates keep its first claim; its deletion leaves `late` alone.
        index.pod_event(Ok(Event::Apply(first.clone())));
        assert_eq!(owner(&index, "198.18.0.6").as_deref(), Some("late"));
        index.pod_event(Ok(Event::Delete(first)));
        assert_eq!(owner(&index, "198.18.0.6").as_deref(), Some("late"));
    }
}
