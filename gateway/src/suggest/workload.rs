//! Which workload a pod's connections belong to, and the selector of its suggested policy.

use std::collections::{BTreeMap, BTreeSet};

use super::input::LinePod;

/// How pods are put together into one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// The pod's controller (a ReplicaSet's pods as their Deployment); a pod without one is a
    /// workload of its own.
    Owner,
    /// The value of this label; pods without it are left out.
    Label(String),
}

/// One workload: what its policy is named after and selects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct WorkloadKey {
    pub namespace: String,
    /// `Deployment`, `StatefulSet`, `Pod`, ... or `label` for `--group-by`.
    pub kind: String,
    pub name: String,
}

/// Labels that differ between pods of one workload, or between its rollouts: never in a
/// selector.
const VOLATILE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "job-name",
    "batch.kubernetes.io/job-name",
];

impl GroupBy {
    /// The workload of `pod`, or `None` when `--group-by`'s label is missing.
    pub(super) fn key(
        &self,
        pod: &LinePod,
        labels: &BTreeMap<String, String>,
    ) -> Option<WorkloadKey> {
        let namespace = pod.namespace.clone();
        match self {
            GroupBy::Label(key) => Some(WorkloadKey {
                namespace,
                kind: "label".to_owned(),
                name: labels.get(key)?.clone(),
            }),
            GroupBy::Owner => Some(match &pod.owner {
                Some(owner) => {
                    let (kind, name) = deployment_of(&owner.kind, &owner.name, labels)
                        .unwrap_or((&owner.kind, &owner.name));
                    WorkloadKey {
                        namespace,
                        kind: kind.to_owned(),
                        name: name.to_owned(),
                    }
                }
                None => WorkloadKey {
                    namespace,
                    kind: "Pod".to_owned(),
                    name: pod.name.clone(),
                },
            }),
        }
    }

    /// The `matchLabels` of the workload's policy: the label itself, or the labels every pod of
    /// an owner shares (less the volatile ones). Empty means no selector would fit.
    pub(super) fn selector<'a>(
        &self,
        key: &WorkloadKey,
        pods: impl Iterator<Item = &'a BTreeMap<String, String>>,
    ) -> BTreeMap<String, String> {
        match self {
            GroupBy::Label(label) => BTreeMap::from([(label.clone(), key.name.clone())]),
            GroupBy::Owner => {
                let mut common: Option<BTreeSet<(&String, &String)>> = None;
                for labels in pods {
                    let these: BTreeSet<_> = labels
                        .iter()
                        .filter(|(k, _)| !VOLATILE_LABELS.contains(&k.as_str()))
                        .collect();
                    common = Some(match common {
                        None => these,
                        Some(common) => common.intersection(&these).copied().collect(),
                    });
                }
                common
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }
        }
    }
}

/// A ReplicaSet named `<deployment>-<pod-template-hash>` (the hash is the pod's label of that
/// name) belongs to that Deployment.
fn deployment_of<'a>(
    kind: &str,
    name: &'a str,
    labels: &BTreeMap<String, String>,
) -> Option<(&'static str, &'a str)> {
    if kind != "ReplicaSet" {
        return None;
    }
    let hash = labels.get("pod-template-hash")?;
    let deployment = name.strip_suffix(hash.as_str())?.strip_suffix('-')?;
    (!deployment.is_empty()).then_some(("Deployment", deployment))
}
