//! The compiled policy set: which policies select a pod, and what they grant.
//!
//! Everything that can be worked out from the policies alone is worked out in
//! [`PolicySet::new`], indexes included (see `crate::index`), so [`PolicySet::select`] and
//! [`Selection::grants`] look only at the policies and rules that can apply.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use smallvec::SmallVec;

use crate::index::{rules_in_order, CidrRules, NameIndex, SelectionIndex};
use crate::model::{EgressRule, Mode, Peer, Policy, PolicyRef, PortRange, Protocol, Transport};
use crate::name::DnsName;
use crate::parse::LoadError;

/// A validated, compiled set of policies. Cheap to share behind an `Arc` and swap whole.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Sorted by [`PolicyRef`], so grants come out in the same order whatever the file order.
    /// The indexes below refer to policies by their position here.
    policies: Vec<Policy>,
    /// Every policy's rules, policy after policy in the order above. The indexes refer to rules
    /// by their position here, so that a match reaches its rule, ports included, in one step.
    rules: Vec<CompiledRule>,
    selection: SelectionIndex,
    names: NameIndex,
    cidr_rules: CidrRules,
    /// Tells this set's [`KeptSelection`]s from another's (0: the empty set).
    id: u64,
}

/// Who a pod is, as the gateway learned it from the cluster.
#[derive(Debug, Clone, Copy)]
pub struct PodIdentity<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub namespace_labels: &'a BTreeMap<String, String>,
}

/// The policies that select one pod.
#[derive(Clone)]
pub struct Selection<'a> {
    set: &'a PolicySet,
    selected: Selected,
}

/// A [`Selection`] kept for the next decisions of the same pod: working out which policies
/// select a pod walks several maps and strings, cold in a big set, while a pod's identity and
/// the set change seldom. Valid only for the set that made it ([`PolicySet::reuse`] checks).
#[derive(Debug, Clone)]
pub struct KeptSelection {
    set_id: u64,
    selected: Selected,
}

#[derive(Debug, Clone)]
struct Selected {
    /// Positions in `set.policies`, ascending.
    policies: Arc<[usize]>,
    has_enforce: bool,
}

/// Source of [`PolicySet`] ids.
static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

/// One (policy, rule, port entry) that allows a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant<'a> {
    pub policy: &'a PolicyRef,
    /// Index in the policy's `spec.egress`.
    pub rule: usize,
    pub mode: Mode,
    pub protocol: &'a Protocol,
    pub peer: GrantPeer,
}

/// Why the destination matched the rule's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantPeer {
    /// The most specific of the rule's `cidr` peers containing the destination.
    Cidr(IpNet),
    /// The resolved names (deduplicated, in the caller's order) that matched a `dnsName` peer.
    Names(Vec<DnsName>),
}

/// A rule's `cidr` peers and ports; its `dnsName` peers live in the set's [`NameIndex`].
#[derive(Debug, Clone)]
struct CompiledRule {
    /// Its policy's position in the set.
    policy: usize,
    /// Its index in the policy's `spec.egress`.
    index: usize,
    /// Longest prefix first, so the first hit is the most specific.
    cidrs: Vec<IpNet>,
    /// Most rules have one entry: kept inline, it costs no extra cache miss.
    ports: SmallVec<[(PortRange, Protocol); 1]>,
    /// It has `dnsName` peers (in the set's [`NameIndex`]).
    has_names: bool,
}

// === impl PolicySet ===

impl PolicySet {
    /// Checks that no two policies share (kind, namespace, name) and compiles them. Every
    /// duplicate is reported at the later definition.
    pub fn new(mut policies: Vec<Policy>) -> Result<PolicySet, Vec<LoadError>> {
        let mut seen: HashMap<&PolicyRef, &Policy> = HashMap::new();
        let mut errors = Vec::new();
        for policy in &policies {
            if let Some(first) = seen.get(policy.reference()) {
                let origin = policy.origin();
                errors.push(LoadError {
                    file: origin.file.clone(),
                    line: origin.line,
                    column: origin.column,
                    message: format!(
                        "duplicate {} {:?} (first defined at {})",
                        policy.reference().kind,
                        policy.reference().to_string(),
                        first.origin()
                    ),
                });
                continue;
            }
            seen.insert(policy.reference(), policy);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        policies.sort_by(|a, b| a.reference().cmp(b.reference()));
        let rules = rules_in_order(&policies)
            .map(|(policy, index, rule)| CompiledRule::new(policy, index, rule))
            .collect();
        Ok(PolicySet {
            selection: SelectionIndex::new(&policies),
            names: NameIndex::new(&policies),
            cidr_rules: CidrRules::new(&policies),
            rules,
            policies,
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// No policies: every pod is unselected.
    pub fn empty() -> PolicySet {
        PolicySet::default()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies, sorted by reference.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter()
    }

    /// Every policy that selects `pod`, sorted by reference. The index narrows the search to the
    /// policies of its namespace (and cluster ones) filed under none or one of its labels.
    pub fn select<'a>(&'a self, pod: &PodIdentity<'_>) -> Selection<'a> {
        let policies = self.selection.select(pod.namespace, pod.labels, |i| {
            selects(&self.policies[i], pod)
        });
        let has_enforce = policies
            .iter()
            .any(|&i| self.policies[i].mode() == Mode::Enforce);
        Selection {
            set: self,
            selected: Selected {
                policies: policies.into(),
                has_enforce,
            },
        }
    }

    /// `kept` as a selection of this set, if this set made it.
    pub fn reuse<'a>(&'a self, kept: &KeptSelection) -> Option<Selection<'a>> {
        (kept.set_id == self.id).then(|| Selection {
            set: self,
            selected: kept.selected.clone(),
        })
    }
}

/// The full check: `p`'s scope takes the pod's namespace and its pod selector the pod.
fn selects(p: &Policy, pod: &PodIdentity<'_>) -> bool {
    let in_scope = match (&p.reference().namespace, p.namespace_selector()) {
        (Some(ns), _) => ns == pod.namespace,
        (None, Some(selector)) => selector.matches(pod.namespace_labels),
        (None, None) => true,
    };
    in_scope && p.pod_selector().matches(pod.labels)
}

/// Each name once, in order: a scan while there are few, a hash set past that, so that an
/// address thousands of names share costs linear time, not quadratic.
fn distinct<'n>(names: impl Iterator<Item = &'n DnsName>) -> Vec<DnsName> {
    const SCAN_UP_TO: usize = 16;
    let mut kept: Vec<&DnsName> = Vec::new();
    let mut seen: Option<foldhash::HashSet<&DnsName>> = None;
    for name in names {
        let new = match &mut seen {
            Some(seen) => seen.insert(name),
            None => !kept.contains(&name),
        };
        if new {
            kept.push(name);
            if seen.is_none() && kept.len() > SCAN_UP_TO {
                seen = Some(kept.iter().copied().collect());
            }
        }
    }
    kept.into_iter().cloned().collect()
}

// === impl CompiledRule ===

impl CompiledRule {
    fn new(policy: usize, index: usize, rule: &EgressRule) -> Self {
        let mut cidrs = Vec::new();
        for peer in rule.to() {
            if let Peer::Cidr(cidr) = peer {
                cidrs.push(cidr.net());
            }
        }
        cidrs.sort_by_key(|net| std::cmp::Reverse(net.prefix_len()));
        let ports = rule
            .ports()
            .iter()
            .map(|p| (p.range(), p.protocol().clone()))
            .collect();
        let has_names = rule
            .to()
            .iter()
            .any(|peer| matches!(peer, Peer::DnsName(_)));
        CompiledRule {
            policy,
            index,
            cidrs,
            ports,
            has_names,
        }
    }

    /// An entry of `transport` covers `port`.
    fn has_port(&self, transport: Transport, port: u16) -> bool {
        self.ports
            .iter()
            .any(|(range, protocol)| protocol.transport() == transport && range.contains(port))
    }

    /// The most specific `cidr` peer containing `dst`.
    fn cidr(&self, dst: IpAddr) -> Option<IpNet> {
        self.cidrs.iter().find(|net| net.contains(&dst)).copied()
    }
}

// === impl Selection ===

impl<'a> Selection<'a> {
    /// The pod is selected by no policy.
    pub fn is_empty(&self) -> bool {
        self.selected.policies.is_empty()
    }

    /// At least one selecting policy is in enforce mode.
    pub fn has_enforce(&self) -> bool {
        self.selected.has_enforce
    }

    /// This selection, to [`reuse`](PolicySet::reuse) with the same set.
    pub fn keep(&self) -> KeptSelection {
        KeptSelection {
            set_id: self.set.id,
            selected: self.selected.clone(),
        }
    }

    /// Whether a `dnsName` rule of the selecting policies covers `port` with a protocol that
    /// `wanted` accepts. A caller holding only some of the names a pod resolved to an address
    /// asks this before it concludes that none of the others would grant.
    pub fn names_may_grant(&self, port: u16, wanted: impl Fn(&Protocol) -> bool) -> bool {
        let rules = &self.set.rules;
        self.selected.policies.iter().any(|&policy| {
            let start = rules.partition_point(|rule| rule.policy < policy);
            rules[start..]
                .iter()
                .take_while(|rule| rule.policy == policy)
                .filter(|rule| rule.has_names)
                .flat_map(|rule| &rule.ports)
                .any(|(range, protocol)| range.contains(port) && wanted(protocol))
        })
    }

    /// The selecting policies, sorted by reference.
    pub fn policies(&self) -> impl Iterator<Item = &'a PolicyRef> + '_ {
        let set = self.set;
        self.selected
            .policies
            .iter()
            .map(move |&i| set.policies[i].reference())
    }

    /// The TCP grants of a connection: [`grants_for`](Self::grants_for) with
    /// [`Transport::Tcp`], so a `udp` entry never allows a connection.
    pub fn grants(&self, dst: IpAddr, port: u16, resolved_names: &[DnsName]) -> Vec<Grant<'a>> {
        self.grants_for(Transport::Tcp, dst, port, resolved_names)
    }

    /// Every (policy, rule, port entry) of `transport` whose port range contains `port` and whose
    /// peers match: a `cidr` peer containing `dst`, or a `dnsName` peer matching at least one of
    /// `resolved_names` (names this pod resolved to `dst`).
    /// Grants come by policy (sorted by reference), then rule, then port entry. A `cidr` match
    /// wins over names: the rule then allows the address whatever the name.
    pub fn grants_for(
        &self,
        transport: Transport,
        dst: IpAddr,
        port: u16,
        resolved_names: &[DnsName],
    ) -> Vec<Grant<'a>> {
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; IPv4 rules must still match.
        let dst = dst.to_canonical();
        let rules = &self.set.rules;
        // (rule, index in `resolved_names` or `None` for a cidr match): rules are in policy
        // order, so once sorted these are in grant order, each rule's names in the caller's.
        let mut hits: SmallVec<[(usize, Option<usize>); 4]> = SmallVec::new();
        self.set
            .cidr_rules
            .for_each_selected(&self.selected.policies, |rule| {
                let compiled = &rules[rule];
                if compiled.has_port(transport, port) && compiled.cidr(dst).is_some() {
                    hits.push((rule, None));
                }
            });
        for (index, name) in resolved_names.iter().enumerate() {
            self.set
                .names
                .for_each_match(name, &self.selected.policies, |rule| {
                    if rules[rule].has_port(transport, port) {
                        hits.push((rule, Some(index)));
                    }
                });
        }
        hits.sort_unstable();

        let mut grants = Vec::new();
        for rule_hits in hits.chunk_by(|a, b| a.0 == b.0) {
            let rule = &rules[rule_hits[0].0];
            let policy = &self.set.policies[rule.policy];
            let peer = match rule.cidr(dst) {
                Some(net) => GrantPeer::Cidr(net),
                None => {
                    let names = rule_hits.iter().filter_map(|&(_, n)| n);
                    GrantPeer::Names(distinct(names.map(|n| &resolved_names[n])))
                }
            };
            let protocols: SmallVec<[&Protocol; 2]> = rule
                .ports
                .iter()
                .filter(|(range, protocol)| {
                    protocol.transport() == transport && range.contains(port)
                })
                .map(|(_, protocol)| protocol)
                .collect();
            let grant = |protocol, peer| Grant {
                policy: policy.reference(),
                rule: rule.index,
                mode: policy.mode(),
                protocol,
                peer,
            };
            // The last (usually the only) port entry takes the peer, the others a copy.
            if let Some((last, others)) = protocols.split_last() {
                grants.extend(others.iter().map(|protocol| grant(protocol, peer.clone())));
                grants.push(grant(last, peer));
            }
        }
        grants
    }
}

impl fmt::Debug for Selection<'_> {
    /// The selecting policies only: the whole set would drown them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let policies: Vec<&PolicyRef> = self.policies().collect();
        f.debug_struct("Selection")
            .field("policies", &policies)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<DnsName> {
        names.iter().map(|n| n.parse().expect(n)).collect()
    }
    use crate::parse::parse_policies;

    const POLICIES: &str = r#"
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: orders-db, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: db.corp.example}, {dnsName: "*.db.corp.example"}]
      ports: [{port: 5432, protocol: postgresql, postgresql: {databases: [orders]}}]
    - to: [{dnsName: "**.googleapis.com"}, {cidr: 192.0.2.0/24}, {cidr: 192.0.2.128/25}]
      ports:
        - {port: 443, endPort: 8443, protocol: tls}
        - {port: 443, protocol: tcp}
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: role, operator: In, values: [app, web]}]}
  mode: audit
  egress:
    - to: [{cidr: "2001:db8::/32"}, {dnsName: api.example}]
      ports: [{port: 80, protocol: http}]
---
apiVersion: egressgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: prod-dns}
spec:
  namespaceSelector: {matchLabels: {env: prod}}
  podSelector: {}
  mode: audit
  egress: []
---
apiVersion: egressgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: everyone}
spec:
  podSelector: {matchExpressions: [{key: batch, operator: DoesNotExist}]}
  egress:
    - to: [{cidr: 10.0.0.0/8}]
      ports: [{port: 22, protocol: tcp}]
"#;

    fn set() -> PolicySet {
        PolicySet::new(parse_policies("p.yaml", POLICIES).expect("valid")).expect("no duplicates")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selected(
        set: &PolicySet,
        ns: &str,
        pod: &[(&str, &str)],
        ns_labels: &[(&str, &str)],
    ) -> Vec<String> {
        let (labels, namespace_labels) = (labels(pod), labels(ns_labels));
        let pod = PodIdentity {
            namespace: ns,
            name: "pod-0",
            labels: &labels,
            namespace_labels: &namespace_labels,
        };
        set.select(&pod)
            .policies()
            .map(ToString::to_string)
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn namespaced_policies_select_only_their_namespace() {
        let set = set();
        assert_eq!(set.len(), 4);
        assert_eq!(
            selected(&set, "shop", &[("role", "app")], &[]),
            ["shop/orders-db", "shop/web", "everyone"]
        );
        assert_eq!(
            selected(&set, "other", &[("role", "app")], &[]),
            ["everyone"]
        );
        assert_eq!(
            selected(&set, "shop", &[("role", "web")], &[]),
            ["shop/web", "everyone"]
        );
    }

    #[test]
    fn a_kept_selection_is_reused_only_by_the_set_that_made_it() {
        let (first, same_text) = (set(), set());
        let (labels, none) = (labels(&[("role", "app")]), labels(&[]));
        let pod = PodIdentity {
            namespace: "shop",
            name: "pod-0",
            labels: &labels,
            namespace_labels: &none,
        };
        let selection = first.select(&pod);
        let kept = selection.keep();
        let reused = first.reuse(&kept).expect("same set");
        assert!(reused.policies().eq(selection.policies()));
        assert_eq!(reused.has_enforce(), selection.has_enforce());
        assert_eq!(reused.policies().count(), 3);
        // A reload builds a new set, even from the same text: what it selects may differ.
        assert!(same_text.reuse(&kept).is_none());
        assert!(PolicySet::empty().reuse(&kept).is_none());
    }

    #[test]
    fn cluster_policies_use_the_namespace_selector_when_set() {
        let set = set();
        assert_eq!(
            selected(&set, "billing", &[], &[("env", "prod")]),
            ["everyone", "prod-dns"]
        );
        assert_eq!(
            selected(&set, "billing", &[], &[("env", "dev")]),
            ["everyone"]
        );
        assert!(selected(&set, "billing", &[("batch", "1")], &[]).is_empty());
    }

    #[test]
    fn audit_and_enforce_flags() {
        let set = set();
        let (none, prod, web) = (
            labels(&[]),
            labels(&[("env", "prod")]),
            labels(&[("role", "web"), ("batch", "y")]),
        );
        let pod = |ns, labels, ns_labels| PodIdentity {
            namespace: ns,
            name: "p",
            labels,
            namespace_labels: ns_labels,
        };
        let audit_only = set.select(&pod("shop", &web, &none));
        assert!(!audit_only.is_empty());
        assert!(!audit_only.has_enforce());
        let mixed = set.select(&pod("x", &none, &prod));
        assert!(mixed.has_enforce());
        let nothing = set.select(&pod("x", &web, &none));
        assert!(nothing.is_empty());
        assert!(!nothing.has_enforce());
        assert!(PolicySet::empty()
            .select(&pod("x", &none, &none))
            .is_empty());
    }

    #[test]
    fn names_may_grant_looks_at_the_dns_name_rules_of_the_selecting_policies_only() {
        let set = set();
        let (app, none) = (labels(&[("role", "app")]), labels(&[]));
        let pod = PodIdentity {
            namespace: "shop",
            name: "p",
            labels: &app,
            namespace_labels: &none,
        };
        let selection = set.select(&pod);
        let tcp = |p: &Protocol| matches!(p, Protocol::Tcp);
        let postgres = |p: &Protocol| matches!(p, Protocol::Postgresql(_));
        assert!(selection.names_may_grant(443, tcp));
        assert!(selection.names_may_grant(5432, postgres));
        assert!(!selection.names_may_grant(5432, tcp));
        assert!(!selection.names_may_grant(8443, tcp), "tcp is on 443 only");
        // `everyone` allows tcp/22, but by cidr: no name can grant it.
        assert!(!selection.names_may_grant(22, tcp));
    }

    #[test]
    fn grants_union_every_matching_rule_and_port_entry() {
        let set = set();
        let (app, none) = (labels(&[("role", "app")]), labels(&[]));
        let pod = PodIdentity {
            namespace: "shop",
            name: "p",
            labels: &app,
            namespace_labels: &none,
        };
        let selection = set.select(&pod);

        let grants = selection.grants(
            ip("203.0.113.9"),
            443,
            &names(&[
                "storage.googleapis.com",
                "x.example",
                "storage.googleapis.com",
            ]),
        );
        assert_eq!(grants.len(), 2);
        assert!(grants
            .iter()
            .all(|g| g.policy.to_string() == "shop/orders-db" && g.rule == 1));
        assert_eq!(grants[0].protocol, &Protocol::Tls);
        assert_eq!(grants[1].protocol, &Protocol::Tcp);
        assert_eq!(
            grants[0].peer,
            GrantPeer::Names(names(&["storage.googleapis.com"]))
        );
        assert_eq!(grants[0].mode, Mode::Enforce);

        // Port range edges: 8443 only matches the tls entry, 8444 nothing.
        let grants = selection.grants(ip("203.0.113.9"), 8443, &names(&["a.googleapis.com"]));
        assert_eq!(grants.len(), 1);
        assert!(selection
            .grants(ip("203.0.113.9"), 8444, &names(&["a.googleapis.com"]))
            .is_empty());
        assert!(selection
            .grants(ip("203.0.113.9"), 443, &names(&["googleapis.com"]))
            .is_empty());

        let grants = selection.grants(
            ip("198.51.100.1"),
            5432,
            &names(&["replica.db.corp.example", "db.corp.example"]),
        );
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].rule, 0);
        assert_eq!(
            grants[0].peer,
            GrantPeer::Names(names(&["replica.db.corp.example", "db.corp.example"]))
        );
        assert!(matches!(grants[0].protocol, Protocol::Postgresql(pg) if pg.allows("orders", "u")));
        assert!(selection
            .grants(ip("198.51.100.1"), 5432, &names(&["a.b.db.corp.example"]))
            .is_empty());
    }

    #[test]
    fn cidr_grants_pick_the_most_specific_block_and_beat_names() {
        let set = set();
        let (app, none) = (labels(&[("role", "app")]), labels(&[]));
        let pod = PodIdentity {
            namespace: "shop",
            name: "p",
            labels: &app,
            namespace_labels: &none,
        };
        let selection = set.select(&pod);
        let grants = selection.grants(ip("192.0.2.200"), 443, &names(&["x.googleapis.com"]));
        assert_eq!(
            grants[0].peer,
            GrantPeer::Cidr("192.0.2.128/25".parse().expect("net"))
        );
        let grants = selection.grants(ip("192.0.2.1"), 443, &[]);
        assert_eq!(
            grants[0].peer,
            GrantPeer::Cidr("192.0.2.0/24".parse().expect("net"))
        );
        // An IPv4-mapped IPv6 destination still matches IPv4 blocks.
        assert_eq!(selection.grants(ip("::ffff:192.0.2.1"), 443, &[]).len(), 2);
        assert_eq!(
            selection.grants(ip("10.9.9.9"), 22, &[])[0]
                .policy
                .to_string(),
            "everyone"
        );
    }

    #[test]
    fn ipv6_cidr_and_audit_mode_grants() {
        let set = set();
        let (web, none) = (labels(&[("role", "web")]), labels(&[]));
        let pod = PodIdentity {
            namespace: "shop",
            name: "p",
            labels: &web,
            namespace_labels: &none,
        };
        let selection = set.select(&pod);
        let grants = selection.grants(ip("2001:db8::5"), 80, &[]);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].mode, Mode::Audit);
        assert_eq!(grants[0].protocol, &Protocol::Http);
        assert_eq!(
            grants[0].peer,
            GrantPeer::Cidr("2001:db8::/32".parse().expect("net"))
        );
        assert!(selection.grants(ip("2001:db9::5"), 80, &[]).is_empty());
        assert_eq!(
            selection
                .grants(ip("2001:db9::5"), 80, &names(&["API.example."]))
                .len(),
            1
        );
    }

    #[test]
    fn udp_entries_grant_only_datagrams_and_tcp_entries_only_connections() {
        let text = r#"
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: tunnel, namespace: vpn}
spec:
  podSelector: {}
  egress:
    - to: [{dnsName: wg.example}, {cidr: 198.18.9.0/24}]
      ports: [{port: 51820, protocol: udp}, {port: 443, protocol: tls}]
    - to: [{cidr: "fd00:9::/64"}]
      ports: [{port: 443, protocol: udp}]
"#;
        let set = PolicySet::new(parse_policies("u.yaml", text).expect("valid")).expect("set");
        let none = labels(&[]);
        let pod = PodIdentity {
            namespace: "vpn",
            name: "p",
            labels: &none,
            namespace_labels: &none,
        };
        let selection = set.select(&pod);
        let udp = selection.grants_for(
            Transport::Udp,
            ip("203.0.113.5"),
            51820,
            &names(&["wg.example"]),
        );
        assert_eq!(udp.len(), 1);
        assert_eq!(udp[0].protocol, &Protocol::Udp);
        assert_eq!(udp[0].peer, GrantPeer::Names(names(&["wg.example"])));
        // The same destination over TCP: the udp entry grants nothing.
        assert!(selection
            .grants(ip("203.0.113.5"), 51820, &names(&["wg.example"]))
            .is_empty());
        // And the tls entry grants no datagram to 443.
        assert!(selection
            .grants_for(
                Transport::Udp,
                ip("203.0.113.5"),
                443,
                &names(&["wg.example"])
            )
            .is_empty());
        assert_eq!(
            selection.grants(ip("203.0.113.5"), 443, &names(&["wg.example"]))[0].protocol,
            &Protocol::Tls
        );
        let by_cidr = selection.grants_for(Transport::Udp, ip("198.18.9.7"), 51820, &[]);
        assert_eq!(
            by_cidr[0].peer,
            GrantPeer::Cidr("198.18.9.0/24".parse().expect("net"))
        );
        assert_eq!(
            selection
                .grants_for(Transport::Udp, ip("fd00:9::1"), 443, &[])
                .len(),
            1
        );
        assert!(selection.grants(ip("fd00:9::1"), 443, &[]).is_empty());
        assert!(selection
            .grants_for(Transport::Udp, ip("198.18.9.7"), 51821, &[])
            .is_empty());
        assert!(!selection.names_may_grant(51820, |p| matches!(p, Protocol::Tcp)));
        assert!(selection.names_may_grant(51820, |p| matches!(p, Protocol::Udp)));
    }

    #[test]
    fn duplicate_names_are_rejected_at_the_later_definition() {
        let mut policies = parse_policies("a.yaml", POLICIES).expect("valid");
        policies.extend(parse_policies("b.yaml", POLICIES).expect("valid"));
        let errors = PolicySet::new(policies).expect_err("duplicates");
        assert_eq!(errors.len(), 4);
        assert_eq!(
            errors[0].to_string(),
            "b.yaml:2:1: duplicate EgressPolicy \"shop/orders-db\" (first defined at a.yaml:2:1)"
        );
        assert_eq!(errors[2].to_string().split(':').nth(1), Some("25"));
    }

    #[test]
    fn same_name_in_another_namespace_or_kind_is_not_a_duplicate() {
        let text = POLICIES
            .replace("namespace: shop}", "namespace: shop2}")
            .replace("{name: prod-dns}", "{name: prod-dns-2}")
            .replace("{name: everyone}", "{name: everyone-2}");
        let mut policies = parse_policies("a.yaml", POLICIES).expect("valid");
        policies.extend(parse_policies("b.yaml", &text).expect("valid"));
        assert_eq!(PolicySet::new(policies).expect("distinct").len(), 8);
    }
}
