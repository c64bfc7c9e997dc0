//! Who a source address is: pod IP → namespace, name, labels and the namespace's labels.
//!
//! For now the source is a static YAML file (the Kubernetes watch comes with the Helm chart).
//! Unknown addresses are not an error: they are "unselected" and follow `unselectedPods`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use egressgate_dns_shim::PodIp;
use egressgate_policy::{KeptSelection, PodIdentity, PolicySet, Selection};
use serde::Deserialize;

use crate::yaml_file::{self, YamlFileError};

/// One pod, as the policies see it.
#[derive(Debug, Default)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    /// The controller that made the pod (its owner reference with `controller: true`), when
    /// known: `egressgate suggest` groups decisions by it.
    pub owner: Option<Owner>,
    /// Every address of the pod: a dual-stack pod may resolve over IPv4 and connect over IPv6,
    /// and its DNS records are its own under either address.
    pub ips: Vec<IpAddr>,
    /// Which policies selected it at its last decision: see [`Pod::select`].
    pub selection: SelectionCache,
}

/// A pod's controlling owner, as its owner reference names it (a Deployment's pods name their
/// ReplicaSet).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

/// A pod's last [`Selection`], kept without a lock. A pod whose identity changes is a new `Pod`,
/// and a reload is a new `PolicySet`, so the kept selection is right while its set is current.
#[derive(Debug, Default)]
pub struct SelectionCache(ArcSwapOption<KeptSelection>);

impl Pod {
    /// The pod's addresses as the name table files its records: each may have resolved names.
    pub fn table_ips(&self) -> impl Iterator<Item = PodIp> + '_ {
        self.ips.iter().map(|&ip| PodIp(ip))
    }

    /// The policies that select this pod: the kept selection when `policies` made it (the
    /// common case, a few cache lines instead of a walk through the selection index), else
    /// worked out and kept.
    pub fn select<'a>(&self, policies: &'a PolicySet) -> Selection<'a> {
        if let Some(selection) = self
            .selection
            .0
            .load()
            .as_deref()
            .and_then(|kept| policies.reuse(kept))
        {
            return selection;
        }
        let selection = policies.select(&self.identity());
        self.selection.0.store(Some(Arc::new(selection.keep())));
        selection
    }

    fn identity(&self) -> PodIdentity<'_> {
        PodIdentity {
            namespace: &self.namespace,
            name: &self.name,
            labels: &self.labels,
            namespace_labels: &self.namespace_labels,
        }
    }
}

/// Every known pod by address.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    by_ip: PodsByIp,
}

/// Looked up once per connection with the client's address, which a pod cannot forge (the
/// nftables reverse-path check): foldhash, seeded per process, instead of SipHash.
type PodsByIp = HashMap<IpAddr, Arc<Pod>, foldhash::fast::RandomState>;

/// The static identity file (README, "Identity").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    #[serde(default)]
    namespaces: Vec<NamespaceEntry>,
    #[serde(default)]
    pods: Vec<PodEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceEntry {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodEntry {
    name: String,
    namespace: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Optional: what a Kubernetes watch reads from the pod's controller owner reference.
    #[serde(default)]
    owner: Option<Owner>,
}

/// An identity file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    File(#[from] YamlFileError),
    #[error("{file}: address {ip} is listed for both {first} and {second}")]
    DuplicateAddress {
        file: String,
        ip: IpAddr,
        first: String,
        second: String,
    },
}

impl Identities {
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let parsed = yaml_file::load(path)?;
        Self::build(&path.display().to_string(), parsed)
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, IdentityError> {
        let parsed = yaml_file::parse(file, text)?;
        Self::build(file, parsed)
    }

    fn build(file: &str, parsed: IdentityFile) -> Result<Self, IdentityError> {
        let namespace_labels: HashMap<&str, &BTreeMap<String, String>> = parsed
            .namespaces
            .iter()
            .map(|ns| (ns.name.as_str(), &ns.labels))
            .collect();
        let mut by_ip = PodsByIp::default();
        for entry in &parsed.pods {
            let pod = Arc::new(Pod {
                namespace: entry.namespace.clone(),
                name: entry.name.clone(),
                labels: entry.labels.clone(),
                namespace_labels: namespace_labels
                    .get(entry.namespace.as_str())
                    .map(|labels| (*labels).clone())
                    .unwrap_or_default(),
                owner: entry.owner.clone(),
                ips: entry.ips.iter().map(|ip| ip.to_canonical()).collect(),
                selection: SelectionCache::default(),
            });
            for ip in &entry.ips {
                let ip = ip.to_canonical();
                if let Some(first) = by_ip.insert(ip, Arc::clone(&pod)) {
                    return Err(IdentityError::DuplicateAddress {
                        file: file.to_owned(),
                        ip,
                        first: format!("{}/{}", first.namespace, first.name),
                        second: format!("{}/{}", pod.namespace, pod.name),
                    });
                }
            }
        }
        Ok(Identities { by_ip })
    }

    /// An index built elsewhere (the Kubernetes watch), keyed by canonical addresses.
    pub(crate) fn from_index(by_ip: HashMap<IpAddr, Arc<Pod>>) -> Self {
        let by_ip = by_ip
            .into_iter()
            .map(|(ip, pod)| (ip.to_canonical(), pod))
            .collect();
        Identities { by_ip }
    }

    /// The pod using `ip` (IPv4-mapped IPv6 addresses are looked up as IPv4).
    pub fn lookup(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// Every (address, pod) pair.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Arc<Pod>)> {
        self.by_ip.iter()
    }

    /// How many pods (not addresses) are known.
    pub fn len(&self) -> usize {
        let mut pods: Vec<*const Pod> = self.by_ip.values().map(Arc::as_ptr).collect();
        pods.sort_unstable();
        pods.dedup();
        pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "namespaces:\n  - name: shop\n    labels: {team: shop}\npods:\n  - name: app-1\n    namespace: shop\n    ips: [198.18.1.2, \"fd00:1::2\"]\n    labels: {role: app}\n    owner: {kind: ReplicaSet, name: app-7c9d}\n  - name: lonely\n    namespace: other\n    ips: [198.18.3.2]\n";

    #[test]
    fn pods_are_found_by_every_address_with_namespace_labels() {
        let ids = Identities::parse("pods.yaml", FILE).expect("valid");
        let pod = ids
            .lookup("198.18.1.2".parse().expect("ip"))
            .expect("known");
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "app-1")
        );
        assert_eq!(pod.labels.get("role").map(String::as_str), Some("app"));
        assert_eq!(
            pod.namespace_labels.get("team").map(String::as_str),
            Some("shop")
        );
        let v6 = ids.lookup("fd00:1::2".parse().expect("ip")).expect("known");
        assert!(Arc::ptr_eq(v6, pod), "one pod, two addresses");
        assert_eq!(pod.ips.len(), 2);
        let owner = pod.owner.as_ref().expect("owner given");
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ReplicaSet", "app-7c9d")
        );
        let mapped = ids.lookup("::ffff:198.18.1.2".parse().expect("ip"));
        assert!(mapped.is_some_and(|mapped| Arc::ptr_eq(mapped, pod)));
        let lonely = ids
            .lookup("198.18.3.2".parse().expect("ip"))
            .expect("known");
        assert!(lonely.namespace_labels.is_empty());
        assert!(lonely.owner.is_none(), "owner is optional");
        assert!(ids.lookup("198.18.9.9".parse().expect("ip")).is_none());
        assert_eq!(ids.len(), 2, "pods, not addresses");
    }

    #[test]
    fn errors_name_the_position_or_the_conflict() {
        let err = Identities::parse(
            "pods.yaml",
            "pods:\n  - name: a\n    namespace: x\n    ips: [1.2.3.4]\n    lables: {}\n",
        )
        .expect_err("unknown key");
        let shown = err.to_string();
        assert!(shown.starts_with("pods.yaml:5:5: "), "{shown}");
        assert!(shown.contains("unknown field `lables`"), "{shown}");

        let dup = "pods:\n  - {name: a, namespace: x, ips: [1.2.3.4]}\n  - {name: b, namespace: x, ips: [1.2.3.4]}\n";
        let shown = Identities::parse("pods.yaml", dup)
            .expect_err("duplicate")
            .to_string();
        assert!(
            shown.contains("1.2.3.4 is listed for both x/a and x/b"),
            "{shown}"
        );
    }

    #[test]
    fn a_kept_selection_follows_policy_reloads() {
        let policies = |pod_label: &str| {
            let yaml = format!(
                "apiVersion: egressgate.dev/v1alpha1\nkind: EgressPolicy\n\
                 metadata: {{name: p, namespace: shop}}\n\
                 spec:\n  podSelector: {{matchLabels: {{role: {pod_label}}}}}\n  egress: []\n"
            );
            let parsed = egressgate_policy::parse_policies("p.yaml", &yaml).expect("parses");
            PolicySet::new(parsed).expect("compiles")
        };
        let ids = Identities::parse("pods.yaml", FILE).expect("valid");
        let pod = ids
            .lookup("198.18.1.2".parse().expect("ip"))
            .expect("known");
        let (selects, reloaded) = (policies("app"), policies("web"));
        assert_eq!(pod.select(&selects).policies().count(), 1);
        assert!(pod.selection.0.load().is_some(), "kept");
        assert_eq!(pod.select(&selects).policies().count(), 1, "reused");
        assert!(pod.select(&reloaded).is_empty(), "worked out anew");
        assert!(pod.select(&reloaded).is_empty());
        assert_eq!(pod.select(&selects).policies().count(), 1);
    }
}
