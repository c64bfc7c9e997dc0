//! The synthetic cluster of the benches (the same shape as the harness's `decision` scenario):
//! `policies` policies of `rules` rules in `namespaces` namespaces; policy `p` selects tier
//! `(p / namespaces) % 10` of namespace `p % namespaces`; name `n` of pod `i` matches a rule of
//! one of the pod's policies. Addresses are data only (198.18.128.0/17, 198.19.128.0/17).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use egressgate_policy::{parse_policies, PolicySet};

pub const TIERS: usize = 10;

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub namespaces: usize,
    pub policies: usize,
    pub rules: usize,
}

impl Shape {
    pub fn total_rules(&self) -> usize {
        self.policies * self.rules
    }
}

pub fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        198,
        18,
        128 + (i / 256 % 128) as u8,
        (i % 256) as u8,
    ))
}

pub fn dst_ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        198,
        19,
        128 + (n / 256 % 128) as u8,
        (n % 256) as u8,
    ))
}

pub fn name_for(shape: &Shape, i: usize, n: usize) -> String {
    let ns = i % shape.namespaces;
    let tier = (i / shape.namespaces) % TIERS;
    let per_tier = (shape.policies / (shape.namespaces * TIERS)).max(1);
    let p = (ns + shape.namespaces * (tier + TIERS * (n % per_tier))).min(shape.policies - 1);
    let r = (n / per_tier) % shape.rules;
    format!("h{n}.r{r}.p{p}.corp.test")
}

pub fn policy_set(shape: &Shape) -> PolicySet {
    let mut yaml = String::new();
    for p in 0..shape.policies {
        let ns = p % shape.namespaces;
        let tier = (p / shape.namespaces) % TIERS;
        yaml.push_str(&format!(
            "apiVersion: egressgate.dev/v1alpha1\nkind: EgressPolicy\n\
             metadata: {{name: lt-p{p}, namespace: ns{ns}}}\n\
             spec:\n  podSelector: {{matchLabels: {{tier: t{tier}}}}}\n  egress:\n"
        ));
        for r in 0..shape.rules {
            yaml.push_str(&format!(
                "    - to: [{{dnsName: svc{r}.p{p}.example.test}}, {{dnsName: \"*.r{r}.p{p}.corp.test\"}}]\n      \
                 ports: [{{port: 443, protocol: tls}}]\n"
            ));
        }
        yaml.push_str("---\n");
    }
    PolicySet::new(parse_policies("bench.yaml", &yaml).expect("valid policies"))
        .expect("no duplicates")
}

/// Labels of pod `i`: (namespace, pod labels, namespace labels).
pub fn labels(
    shape: &Shape,
    i: usize,
) -> (String, BTreeMap<String, String>, BTreeMap<String, String>) {
    let ns = i % shape.namespaces;
    let pod = [
        (
            "tier".to_owned(),
            format!("t{}", (i / shape.namespaces) % TIERS),
        ),
        ("app".to_owned(), format!("a{i}")),
    ]
    .into_iter()
    .collect();
    let namespace = [("team".to_owned(), format!("t{ns}"))]
        .into_iter()
        .collect();
    (format!("ns{ns}"), pod, namespace)
}
