//! Pod identity from the Kubernetes API: a watch of this node's pods and of all namespaces,
//! folded into an IP → pod index that is published whole to the [`Store`].
//!
//! kube-runtime's watcher lists, then watches with bookmarks, and relists on `410 Gone` or a
//! dropped stream, with backoff. Between relists the last published index keeps serving, so an
//! unreachable API server never empties the table. The gateway reports ready only after the
//! first complete list of both pods and namespaces.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod as PodObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

use crate::identity::{Identities, Pod};
use crate::store::Store;

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
}

impl std::fmt::Debug for IdentityWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityWatch")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// What the watches have seen so far.
#[derive(Debug, Default)]
struct Index {
    /// By UID: a pod's IP may be reused by a new pod before the old one's deletion arrives.
    pods: HashMap<String, PodEntry>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// Pods listed (first list done), namespaces listed.
    listed: (bool, bool),
}

#[derive(Debug, Clone)]
struct PodEntry {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    ips: Vec<IpAddr>,
    /// Orders owners of a reused IP: the newest pod wins.
    created: Option<String>,
}

impl IdentityWatch {
    /// A client from the in-cluster service account or `$KUBECONFIG`.
    pub async fn connect(node: String) -> Result<Self, WatchError> {
        Ok(Self::new(Client::try_default().await?, node))
    }

    pub fn new(client: Client, node: String) -> Self {
        IdentityWatch { client, node }
    }

    /// Watches until `shutdown`, publishing a new index after every change.
    pub async fn run(self, store: Arc<Store>, shutdown: impl std::future::Future) {
        let pods: Api<PodObject> = Api::all(self.client.clone());
        let namespaces: Api<Namespace> = Api::all(self.client);
        let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut pod_events = watcher::watcher(pods, pod_config).default_backoff().boxed();
        let mut namespace_events = watcher::watcher(namespaces, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut index = Index::default();
        let mut pending = Index::default();
        tokio::pin!(shutdown);
        loop {
            let changed = tokio::select! {
                _ = &mut shutdown => return,
                Some(event) = pod_events.next() => match event {
                    Ok(event) => index.apply_pod(&mut pending, event),
                    Err(e) => {
                        tracing::warn!(error = %e, "pod watch failed; serving the last index");
                        false
                    }
                },
                Some(event) = namespace_events.next() => match event {
                    Ok(event) => index.apply_namespace(&mut pending, event),
                    Err(e) => {
                        tracing::warn!(error = %e, "namespace watch failed; serving the last index");
                        false
                    }
                },
            };
            if changed {
                store.set_identities(index.identities());
                if index.listed == (true, true) {
                    store.mark_identities_ready();
                }
            }
        }
    }
}

impl Index {
    /// Applies one pod event; `pending` buffers a relist until it is complete. Returns whether
    /// the published index must change.
    fn apply_pod(&mut self, pending: &mut Index, event: Event<PodObject>) -> bool {
        match event {
            Event::Init => {
                pending.pods.clear();
                false
            }
            Event::InitApply(pod) => {
                if let Some((uid, entry)) = pod_entry(&pod) {
                    pending.pods.insert(uid, entry);
                }
                false
            }
            Event::InitDone => {
                self.pods = std::mem::take(&mut pending.pods);
                self.listed.0 = true;
                true
            }
            Event::Apply(pod) => match pod_entry(&pod) {
                Some((uid, entry)) => {
                    self.pods.insert(uid, entry);
                    true
                }
                None => uid(&pod).is_some_and(|uid| self.pods.remove(&uid).is_some()),
            },
            Event::Delete(pod) => uid(&pod).is_some_and(|uid| self.pods.remove(&uid).is_some()),
        }
    }

    fn apply_namespace(&mut self, pending: &mut Index, event: Event<Namespace>) -> bool {
        match event {
            Event::Init => {
                pending.namespaces.clear();
                false
            }
            Event::InitApply(ns) => {
                if let Some(name) = ns.metadata.name.clone() {
                    pending
                        .namespaces
                        .insert(name, ns.metadata.labels.unwrap_or_default());
                }
                false
            }
            Event::InitDone => {
                self.namespaces = std::mem::take(&mut pending.namespaces);
                self.listed.1 = true;
                true
            }
            Event::Apply(ns) => match ns.metadata.name {
                Some(name) => {
                    let labels = ns.metadata.labels.unwrap_or_default();
                    self.namespaces.insert(name, labels.clone()) != Some(labels)
                }
                None => false,
            },
            Event::Delete(ns) => ns
                .metadata
                .name
                .is_some_and(|name| self.namespaces.remove(&name).is_some()),
        }
    }

    /// The IP → pod index; of two pods claiming one IP the newest wins.
    fn identities(&self) -> Identities {
        let mut by_ip: HashMap<IpAddr, (Option<&str>, Arc<Pod>)> = HashMap::new();
        for entry in self.pods.values() {
            let pod = Arc::new(Pod {
                namespace: entry.namespace.clone(),
                name: entry.name.clone(),
                labels: entry.labels.clone(),
                namespace_labels: self
                    .namespaces
                    .get(&entry.namespace)
                    .cloned()
                    .unwrap_or_default(),
                ips: entry.ips.clone(),
            });
            for &ip in &entry.ips {
                let created = entry.created.as_deref();
                let newer = by_ip.get(&ip).is_none_or(|(other, _)| created > *other);
                if newer {
                    by_ip.insert(ip, (created, Arc::clone(&pod)));
                }
            }
        }
        Identities::from_index(by_ip.into_iter().map(|(ip, (_, pod))| (ip, pod)).collect())
    }
}

fn uid(pod: &PodObject) -> Option<String> {
    pod.metadata.uid.clone()
}

/// The index entry of a pod that owns its addresses: not hostNetwork (those share the node's
/// address and are not intercepted), with IPs, not finished.
fn pod_entry(pod: &PodObject) -> Option<(String, PodEntry)> {
    let uid = uid(pod)?;
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    if ips.is_empty() {
        return None;
    }
    Some((
        uid,
        PodEntry {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            created: pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
        },
    ))
}
