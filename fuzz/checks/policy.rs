//! What must hold for the policy loader (`egressgate_policy`) on any policy file text.
//!
//! Shared, not copied: the cargo-fuzz target `fuzz_targets/policy.rs` and the stable replay test
//! `policy/tests/fuzz_corpus.rs` both include this file with `#[path]`. A violated property
//! panics.
//!
//! The steps are the gateway's (`store::load_policy_dir`): parse one file, compile the set, then
//! select a pod and ask for grants. Policy files are read with `read_to_string`, so only UTF-8
//! reaches the parser.

use std::collections::BTreeMap;
use std::net::IpAddr;

use egressgate_policy::{
    parse_policies, Cidr, DnsName, DnsNamePattern, GrantPeer, Peer, PodIdentity, Policy, PolicySet,
};

const FILE: &str = "fuzz.yaml";

pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policies = match parse_policies(FILE, text) {
        Ok(policies) => policies,
        Err(errors) => {
            assert!(!errors.is_empty(), "Err with no error");
            // YAML breaks lines at LF, CR, NEL, LS and PS; libyaml may point one line past the
            // end ("unexpected end of stream").
            let last_line = 2 + text
                .chars()
                .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
                .count();
            for error in &errors {
                assert_eq!(error.file, FILE);
                assert!(
                    error.line <= last_line,
                    "error at line {} past {last_line}",
                    error.line
                );
                assert!(!error.to_string().is_empty());
            }
            return;
        }
    };
    for policy in &policies {
        check_peers(policy);
    }
    let references: Vec<_> = policies.iter().map(|p| p.reference().clone()).collect();
    let set = match PolicySet::new(policies) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.is_empty(), "Err with no error");
            let mut sorted = references.clone();
            sorted.sort();
            sorted.dedup();
            assert!(
                sorted.len() < references.len(),
                "refused a set without duplicates"
            );
            return;
        }
    };
    assert_eq!(set.len(), references.len());
    check_grants(&set);
}

/// Every peer prints as what it parses back from.
fn check_peers(policy: &Policy) {
    for rule in policy.egress() {
        assert!(!rule.ports().is_empty());
        for peer in rule.to() {
            match peer {
                Peer::DnsName(pattern) => {
                    let printed = pattern.to_string();
                    assert_eq!(printed.parse::<DnsNamePattern>().as_ref(), Ok(pattern));
                    for name in example_names(&printed) {
                        assert!(
                            pattern.matches(&dns_name(&name)),
                            "{pattern} does not match {name}"
                        );
                        assert!(pattern.matches(&dns_name(&name.to_ascii_uppercase())));
                        assert!(pattern.matches(&dns_name(&format!("{name}."))));
                    }
                }
                Peer::Cidr(cidr) => {
                    assert_eq!(cidr.to_string().parse::<Cidr>().as_ref(), Ok(cidr));
                    assert!(cidr.contains(cidr.net().network()));
                }
            }
        }
    }
}

/// A pod of namespace `shop` labelled `role: app` (the seeds' selectors), and one of each
/// namespace a policy names: each rule of a policy that selects it grants its own first port to
/// a name its dnsName patterns match and to its CIDRs' first address.
fn check_grants(set: &PolicySet) {
    let labels = BTreeMap::from([("role".to_owned(), "app".to_owned())]);
    let namespace_labels = BTreeMap::from([("team".to_owned(), "shop".to_owned())]);
    let mut namespaces: Vec<&str> = set
        .policies()
        .filter_map(|p| p.reference().namespace.as_deref())
        .collect();
    namespaces.push("shop");
    namespaces.dedup();
    for namespace in namespaces {
        let pod = PodIdentity {
            namespace,
            name: "app-1",
            labels: &labels,
            namespace_labels: &namespace_labels,
        };
        let selection = set.select(&pod);
        for reference in selection.policies() {
            let Some(policy) = set.policies().find(|p| p.reference() == reference) else {
                panic!("selected {reference} is not in the set");
            };
            for (index, rule) in policy.egress().iter().enumerate() {
                let port = rule.ports()[0].range().first();
                // A `udp` entry grants datagrams, the others connections: ask for its transport.
                let transport = rule.ports()[0].protocol().transport();
                let granted = |dst: IpAddr, names: &[DnsName]| {
                    let grants = selection.grants_for(transport, dst, port, names);
                    assert!(grants.iter().all(|g| g.protocol.transport() == transport));
                    grants
                        .iter()
                        .any(|g| g.policy == reference && g.rule == index)
                };
                for peer in rule.to() {
                    match peer {
                        Peer::DnsName(pattern) => {
                            for name in example_names(&pattern.to_string()) {
                                let dst = IpAddr::from([198, 51, 100, 7]);
                                assert!(
                                    granted(dst, &[dns_name(&name)]),
                                    "{reference} rule {index}: {name}"
                                );
                            }
                        }
                        Peer::Cidr(cidr) => {
                            let dst = cidr.net().network();
                            assert!(granted(dst, &[]), "{reference} rule {index}: {dst}");
                            let grants = selection.grants_for(transport, dst, port, &[]);
                            assert!(grants.iter().all(|g| match &g.peer {
                                GrantPeer::Cidr(net) => net.contains(&dst.to_canonical()),
                                GrantPeer::Names(names) => !names.is_empty(),
                            }));
                        }
                    }
                }
            }
        }
    }
}

/// Names a printed pattern must match: itself, or with one or two labels in front for a
/// wildcard (while that stays within 253 characters).
fn example_names(pattern: &str) -> Vec<String> {
    let names = if let Some(suffix) = pattern.strip_prefix("**.") {
        vec![format!("a.{suffix}"), format!("a.b.{suffix}")]
    } else if let Some(suffix) = pattern.strip_prefix("*.") {
        vec![format!("a.{suffix}")]
    } else {
        vec![pattern.to_owned()]
    };
    names.into_iter().filter(|n| n.len() <= 253).collect()
}

/// A name the checks built to match a pattern: it must pass the one rule.
fn dns_name(text: &str) -> DnsName {
    DnsName::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}
