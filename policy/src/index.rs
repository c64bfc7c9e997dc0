//! Indexes over a policy set, built once in `PolicySet::new` so that a decision looks only at
//! the policies and rules that can apply, not at all of them.
//!
//! Policies are named by their position in the set; rules by their position in the set's flat
//! list of rules, policy after policy (so rule positions ascend with policy positions).
//!
//! They only narrow the search, and give the answers of a full scan (the tests below hold them
//! to one): [`SelectionIndex`] leaves to the caller's full check every candidate it cannot vouch
//! for, [`NameIndex`] matches as `DnsNamePattern::matches` does, and [`CidrRules`] lists the
//! only rules worth testing against an address.

use std::collections::{BTreeMap, HashMap};

use smallvec::SmallVec;

use crate::model::{EgressRule, Peer, Policy};
use crate::name::{DnsName, Prefix};
use crate::selector::LabelSelector;

/// Which policies select a pod, by its namespace and labels.
#[derive(Debug, Clone, Default)]
pub(crate) struct SelectionIndex {
    /// `EgressPolicy`s by their namespace: they select pods of that namespace only.
    namespaced: HashMap<String, LabelIndex>,
    /// `ClusterEgressPolicy`s: their namespace selector may match any namespace.
    cluster: LabelIndex,
}

/// The policies of one scope, by their pod selectors.
#[derive(Debug, Clone, Default)]
struct LabelIndex {
    /// key → value → policies whose first `matchLabels` pair that is: a pod without the pair
    /// cannot be selected by them.
    by_pair: HashMap<String, HashMap<String, Vec<Candidate>>>,
    /// Policies without `matchLabels`: any pod may match.
    unindexed: Vec<Candidate>,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// Position in the set.
    policy: usize,
    /// Being found proves the policy selects the pod: its scope is the pod's namespace or every
    /// namespace, and its pod selector is the pair it is filed under, or empty. The most common
    /// selectors are like this, and the full check would read the policy for nothing.
    certain: bool,
}

/// Which `dnsName` patterns match a name, found by looking up the name's suffixes.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameIndex {
    /// Fixed part (lowercase, no wildcard) → the patterns with it, sorted by policy. Most fixed
    /// parts belong to one pattern, kept inline in the map's slot.
    /// foldhash: the keys come from the policies, and SipHash's DoS resistance would only cost.
    by_fixed_part: foldhash::HashMap<Box<str>, SmallVec<[NameEntry; 1]>>,
    /// Bit `n` is set when some fixed part has `n` labels: suffixes of other lengths cannot be
    /// keys, so they are not hashed.
    label_counts: u128,
}

/// One `dnsName` peer: where it is and how many labels it accepts in front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct NameEntry {
    policy: usize,
    rule: usize,
    prefix: Prefix,
}

/// The rules with `cidr` peers, so an address is tested against those of the selected policies
/// without visiting every selected policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct CidrRules {
    /// (policy, rule), sorted.
    rules: Vec<(usize, usize)>,
}

// === impl SelectionIndex ===

impl SelectionIndex {
    /// `policies` in set order: their positions are the indices handed out.
    pub(crate) fn new<'p>(policies: impl IntoIterator<Item = &'p Policy>) -> Self {
        let mut index = SelectionIndex::default();
        for (position, policy) in policies.into_iter().enumerate() {
            let scope = match &policy.reference().namespace {
                Some(namespace) => index.namespaced.entry(namespace.clone()).or_default(),
                None => &mut index.cluster,
            };
            scope.insert(position, policy);
        }
        index
    }

    /// The policies that select a pod of `namespace` with `labels`, ascending. `selects` is the
    /// full check, asked only about candidates the index cannot vouch for.
    pub(crate) fn select(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        mut selects: impl FnMut(usize) -> bool,
    ) -> Vec<usize> {
        let mut candidates = Vec::new();
        for scope in self
            .namespaced
            .get(namespace)
            .into_iter()
            .chain([&self.cluster])
        {
            scope.candidates(labels, &mut candidates);
        }
        // A policy is filed in one place only, so sorting alone restores set order.
        candidates.sort_unstable_by_key(|c| c.policy);
        candidates
            .into_iter()
            .filter(|c| c.certain || selects(c.policy))
            .map(|c| c.policy)
            .collect()
    }
}

// === impl LabelIndex ===

impl LabelIndex {
    fn insert(&mut self, position: usize, policy: &Policy) {
        let selector = policy.pod_selector();
        let mut pairs = selector.match_labels().iter();
        let first = pairs.next();
        let candidate = Candidate {
            policy: position,
            certain: pairs.next().is_none()
                && selector.match_expressions().is_empty()
                && policy
                    .namespace_selector()
                    .is_none_or(LabelSelector::is_everything),
        };
        match first {
            Some((key, value)) => self
                .by_pair
                .entry(key.clone())
                .or_default()
                .entry(value.clone())
                .or_default()
                .push(candidate),
            None => self.unindexed.push(candidate),
        }
    }

    fn candidates(&self, labels: &BTreeMap<String, String>, out: &mut Vec<Candidate>) {
        out.extend_from_slice(&self.unindexed);
        for (key, value) in labels {
            if let Some(policies) = self.by_pair.get(key).and_then(|values| values.get(value)) {
                out.extend_from_slice(policies);
            }
        }
    }
}

// === impl NameIndex ===

impl NameIndex {
    /// `policies` in set order: their positions are the indices handed out.
    pub(crate) fn new<'p>(policies: impl IntoIterator<Item = &'p Policy>) -> Self {
        let mut index = NameIndex::default();
        for (rule_index, (policy_index, _, rule)) in rules_in_order(policies).enumerate() {
            for peer in rule.to() {
                if let Peer::DnsName(pattern) = peer {
                    let fixed_part = pattern.fixed_part();
                    index.label_counts |= label_count_bit(fixed_part.split('.').count());
                    index
                        .by_fixed_part
                        .entry(fixed_part.into())
                        .or_default()
                        .push(NameEntry {
                            policy: policy_index,
                            rule: rule_index,
                            prefix: pattern.prefix(),
                        });
                }
            }
        }
        for entries in index.by_fixed_part.values_mut() {
            // Already in policy order; this also drops a pattern repeated within a rule.
            entries.sort_unstable();
            entries.dedup();
        }
        index
    }

    /// Calls `found(rule)` for each `dnsName` peer of a `selected` policy (indices, ascending)
    /// that matches `name`, in no particular order; a rule may be reported more than once.
    pub(crate) fn for_each_match(
        &self,
        name: &DnsName,
        selected: &[usize],
        mut found: impl FnMut(usize),
    ) {
        let name = name.as_str();
        let labels = name.matches('.').count() + 1;
        // The name itself, then what is left after dropping 1, 2, … leading labels.
        let suffixes =
            std::iter::once(name).chain(name.match_indices('.').map(|(dot, _)| &name[dot + 1..]));
        for (extra, suffix) in suffixes.enumerate() {
            if self.label_counts & label_count_bit(labels - extra) == 0 {
                continue;
            }
            if let Some(entries) = self.by_fixed_part.get(suffix) {
                for_each_selected(
                    entries,
                    |e| e.policy,
                    selected,
                    |entry| {
                        if entry.prefix.accepts(extra) {
                            found(entry.rule);
                        }
                    },
                );
            }
        }
    }
}

/// A valid name has at most 127 labels; should one ever have more, all such counts share the
/// top bit, which can only cost a lookup, never a match.
fn label_count_bit(labels: usize) -> u128 {
    1 << labels.min(127)
}

// === impl CidrRules ===

impl CidrRules {
    /// `policies` in set order: their positions are the indices handed out.
    pub(crate) fn new<'p>(policies: impl IntoIterator<Item = &'p Policy>) -> Self {
        let rules = rules_in_order(policies)
            .enumerate()
            .filter(|(_, (_, _, rule))| rule.to().iter().any(|peer| matches!(peer, Peer::Cidr(_))))
            .map(|(rule_index, (policy_index, _, _))| (policy_index, rule_index))
            .collect();
        CidrRules { rules }
    }

    /// Calls `found(rule)` for each rule with `cidr` peers of a `selected` policy (indices,
    /// ascending), in order.
    pub(crate) fn for_each_selected(&self, selected: &[usize], mut found: impl FnMut(usize)) {
        for_each_selected(
            &self.rules,
            |&(policy, _)| policy,
            selected,
            |&(_, rule)| found(rule),
        );
    }
}

/// (policy position, index in the policy's `spec.egress`, rule) of every rule, policy after
/// policy: the n-th is rule position n (see the module docs).
pub(crate) fn rules_in_order<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
) -> impl Iterator<Item = (usize, usize, &'p EgressRule)> {
    policies
        .into_iter()
        .enumerate()
        .flat_map(|(position, policy)| {
            let rules = policy.egress().iter().enumerate();
            rules.map(move |(index, rule)| (position, index, rule))
        })
}

/// Calls `f`, in order, on the `items` (sorted by `policy_of`) whose policy is in `selected`
/// (ascending), walking the shorter list: a pattern that every namespace's policy repeats
/// (`**.amazonaws.com`) must not cost a scan of all of them for a pod selected by a few.
fn for_each_selected<T>(
    items: &[T],
    policy_of: impl Fn(&T) -> usize,
    selected: &[usize],
    mut f: impl FnMut(&T),
) {
    if items.len() <= selected.len() {
        items
            .iter()
            .filter(|item| selected.binary_search(&policy_of(item)).is_ok())
            .for_each(f);
    } else {
        for &policy in selected {
            let start = items.partition_point(|item| policy_of(item) < policy);
            items[start..]
                .iter()
                .take_while(|item| policy_of(item) == policy)
                .for_each(&mut f);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The indexes must not change an answer: `select` and `grants` are held to the full scans
    //! they replaced, kept here as the oracle.

    use std::cmp::Reverse;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use ipnet::IpNet;

    use crate::DnsName;
    use proptest::collection::{btree_map, btree_set, vec};
    use proptest::prelude::*;
    use proptest::sample::select;

    use crate::model::{
        Cidr, EgressRule, Mode, Origin, Peer, Policy, PolicyKind, PolicyRef, PortRange, PortRule,
        PostgresRule, Protocol, Transport,
    };
    use crate::name::DnsNamePattern;
    use crate::selector::{LabelSelector, Requirement};
    use crate::set::{Grant, GrantPeer, PodIdentity, PolicySet};

    /// Every policy whose scope and pod selector take the pod, in set order.
    fn select_all<'a>(set: &'a PolicySet, pod: &PodIdentity<'_>) -> Vec<&'a Policy> {
        set.policies()
            .filter(|p| {
                let in_scope = match (&p.reference().namespace, p.namespace_selector()) {
                    (Some(ns), _) => ns == pod.namespace,
                    (None, Some(selector)) => selector.matches(pod.namespace_labels),
                    (None, None) => true,
                };
                in_scope && p.pod_selector().matches(pod.labels)
            })
            .collect()
    }

    /// Every rule of every selected policy, each peer matched in turn.
    fn grants_all<'a>(
        selected: &[&'a Policy],
        transport: Transport,
        dst: IpAddr,
        port: u16,
        resolved_names: &[DnsName],
    ) -> Vec<Grant<'a>> {
        let dst = dst.to_canonical();
        let mut grants = Vec::new();
        for policy in selected {
            for (index, rule) in policy.egress().iter().enumerate() {
                let ports: Vec<&PortRule> = rule
                    .ports()
                    .iter()
                    .filter(|p| p.protocol().transport() == transport && p.range().contains(port))
                    .collect();
                if ports.is_empty() {
                    continue;
                }
                let Some(peer) = peer(rule, dst, resolved_names) else {
                    continue;
                };
                for entry in ports {
                    grants.push(Grant {
                        policy: policy.reference(),
                        rule: index,
                        mode: policy.mode(),
                        protocol: entry.protocol(),
                        peer: peer.clone(),
                    });
                }
            }
        }
        grants
    }

    fn peer(rule: &EgressRule, dst: IpAddr, resolved_names: &[DnsName]) -> Option<GrantPeer> {
        let mut cidrs: Vec<IpNet> = Vec::new();
        let mut patterns: Vec<&DnsNamePattern> = Vec::new();
        for peer in rule.to() {
            match peer {
                Peer::Cidr(cidr) => cidrs.push(cidr.net()),
                Peer::DnsName(pattern) => patterns.push(pattern),
            }
        }
        cidrs.sort_by_key(|net| Reverse(net.prefix_len()));
        if let Some(net) = cidrs.iter().find(|net| net.contains(&dst)) {
            return Some(GrantPeer::Cidr(*net));
        }
        let mut names: Vec<DnsName> = Vec::new();
        for name in resolved_names {
            if !names.contains(name) && patterns.iter().any(|p| p.matches(name)) {
                names.push(name.clone());
            }
        }
        (!names.is_empty()).then_some(GrantPeer::Names(names))
    }

    // Small vocabularies, so that policies, pods and names collide often.
    const NAMESPACES: [&str; 3] = ["a", "b", "c"];
    const KEYS: [&str; 3] = ["app", "team", "tier"];
    const VALUES: [&str; 3] = ["x", "y", "z"];
    const LABELS: [&str; 3] = ["a", "b", "c"];

    fn word(words: &[&'static str]) -> impl Strategy<Value = String> {
        select(words.to_vec()).prop_map(str::to_owned)
    }

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        btree_map(word(&KEYS), word(&VALUES), 0..=3)
    }

    fn requirement() -> impl Strategy<Value = Requirement> {
        (word(&KEYS), 0..4, btree_set(word(&VALUES), 1..=2)).prop_map(|(key, op, values)| {
            let (op, values) = match op {
                0 => ("In", values.into_iter().collect()),
                1 => ("NotIn", values.into_iter().collect()),
                2 => ("Exists", Vec::new()),
                _ => ("DoesNotExist", Vec::new()),
            };
            Requirement::new(&key, op, values).expect("valid requirement")
        })
    }

    fn selector() -> impl Strategy<Value = LabelSelector> {
        (
            btree_map(word(&KEYS), word(&VALUES), 0..=2),
            vec(requirement(), 0..=2),
        )
            .prop_map(|(labels, expressions)| {
                LabelSelector::new(labels, expressions).expect("valid selector")
            })
    }

    /// Exact, `*.` and `**.` patterns, some written in capitals.
    fn pattern() -> impl Strategy<Value = DnsNamePattern> {
        (
            select(vec!["", "*.", "**."]),
            vec(word(&LABELS), 1..=2),
            any::<bool>(),
        )
            .prop_map(|(prefix, labels, upper)| {
                let text = format!("{prefix}{}", labels.join("."));
                let text = if upper {
                    text.to_ascii_uppercase()
                } else {
                    text
                };
                text.parse().expect("valid pattern")
            })
    }

    /// Nested blocks, so that the most specific one matters.
    fn cidr() -> impl Strategy<Value = Cidr> {
        select(vec![
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3",
            "0.0.0.0/0",
            "2001:db8::/32",
            "2001:db8::1",
        ])
        .prop_map(|s| s.parse().expect("valid cidr"))
    }

    fn port_rule() -> impl Strategy<Value = PortRule> {
        let protocol = prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Tls),
            Just(Protocol::Http),
            Just(Protocol::Postgresql(PostgresRule::default())),
            Just(Protocol::Udp),
        ];
        (
            select(vec![80u16, 443, 5432]),
            proptest::option::of(0u16..=8000),
            protocol,
        )
            .prop_map(|(first, span, protocol)| {
                let range = PortRange::new(first, span.map(|s| first + s)).expect("valid range");
                PortRule::new(range, protocol)
            })
    }

    fn rule() -> impl Strategy<Value = EgressRule> {
        let peer = prop_oneof![
            3 => pattern().prop_map(Peer::DnsName),
            1 => cidr().prop_map(Peer::Cidr),
        ];
        (vec(peer, 1..=3), vec(port_rule(), 1..=2))
            .prop_map(|(to, ports)| EgressRule::new(to, ports).expect("valid rule"))
    }

    /// Namespaced and cluster policies (with or without a namespace selector), named by their
    /// position so names are unique but sort differently ("p10" < "p2").
    fn policies() -> impl Strategy<Value = Vec<Policy>> {
        let policy = (
            proptest::option::of(word(&NAMESPACES)),
            proptest::option::of(selector()),
            selector(),
            any::<bool>(),
            vec(rule(), 0..=3),
        );
        vec(policy, 0..=12).prop_map(|policies| {
            policies
                .into_iter()
                .enumerate()
                .map(
                    |(i, (namespace, ns_selector, pod_selector, audit, egress))| {
                        let kind = match namespace {
                            Some(_) => PolicyKind::EgressPolicy,
                            None => PolicyKind::ClusterEgressPolicy,
                        };
                        Policy {
                            namespace_selector: ns_selector.filter(|_| namespace.is_none()),
                            reference: PolicyRef {
                                kind,
                                namespace,
                                name: format!("p{i}"),
                            },
                            origin: Origin {
                                file: "p.yaml".into(),
                                line: i + 1,
                                column: 1,
                            },
                            pod_selector,
                            mode: if audit { Mode::Audit } else { Mode::Enforce },
                            egress,
                        }
                    },
                )
                .collect()
        })
    }

    /// Valid names in any case with or without the trailing dot, and names that must never
    /// match.
    fn resolved_name() -> impl Strategy<Value = String> {
        let valid = (vec(word(&LABELS), 1..=3), any::<bool>(), any::<bool>()).prop_map(
            |(labels, upper, dot)| {
                let name = labels.join(".");
                let name = if upper {
                    name.to_ascii_uppercase()
                } else {
                    name
                };
                if dot {
                    format!("{name}.")
                } else {
                    name
                }
            },
        );
        let invalid = select(vec![
            "", ".", "a..b", "-a.b", "10.1.2.3", "b.a..", "*.a", "a b",
        ])
        .prop_map(str::to_owned);
        prop_oneof![4 => valid, 1 => invalid]
    }

    #[derive(Debug, Clone)]
    struct Query {
        namespace: String,
        labels: BTreeMap<String, String>,
        namespace_labels: BTreeMap<String, String>,
        dst: IpAddr,
        port: u16,
        names: Vec<String>,
    }

    fn query() -> impl Strategy<Value = Query> {
        let dst = select(vec![
            "10.1.2.3",
            "10.1.9.9",
            "10.200.0.1",
            "192.0.2.1",
            "::ffff:10.1.2.3",
            "2001:db8::1",
            "2001:db9::1",
        ])
        .prop_map(|s| s.parse::<IpAddr>().expect("valid address"));
        (
            word(&NAMESPACES),
            labels(),
            labels(),
            dst,
            select(vec![80u16, 443, 5432, 6000]),
            vec(resolved_name(), 0..=5),
        )
            .prop_map(
                |(namespace, labels, namespace_labels, dst, port, names)| Query {
                    namespace,
                    labels,
                    namespace_labels,
                    dst,
                    port,
                    names,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn select_and_grants_answer_what_a_full_scan_answers(
            policies in policies(), queries in vec(query(), 1..=8),
        ) {
            let set = PolicySet::new(policies).expect("names are unique");
            for q in &queries {
                let pod = PodIdentity {
                    namespace: &q.namespace,
                    name: "pod",
                    labels: &q.labels,
                    namespace_labels: &q.namespace_labels,
                };
                let selection = set.select(&pod);
                let want = select_all(&set, &pod);
                prop_assert_eq!(
                    selection.policies().collect::<Vec<_>>(),
                    want.iter().map(|p| p.reference()).collect::<Vec<_>>()
                );
                // A name that breaks the rule never becomes a `DnsName`: it can grant nothing.
                let names: Vec<DnsName> = q.names.iter().filter_map(|n| n.parse().ok()).collect();
                prop_assert_eq!(
                    selection.grants(q.dst, q.port, &names),
                    grants_all(&want, Transport::Tcp, q.dst, q.port, &names)
                );
                prop_assert_eq!(
                    selection.grants_for(Transport::Udp, q.dst, q.port, &names),
                    grants_all(&want, Transport::Udp, q.dst, q.port, &names)
                );
            }
        }
    }
}
