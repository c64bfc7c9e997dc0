//! The synthetic cluster of the `decision` scenario and of the criterion benches (which include
//! this file with `#[path]`): `policies` policies of `rules` rules in `namespaces` namespaces;
//! policy `p` selects tier `(p / namespaces) % 10` of namespace `p % namespaces`; name `n` of pod
//! `i` matches a rule of one of the pod's policies. Addresses are data only (198.18.128.0/17 for
//! pods, 198.19.128.0/17 for destinations): nothing here touches the network.

use std::net::{IpAddr, Ipv4Addr};

/// Pod tiers per namespace; each is selected by its own policies.
pub const TIERS: usize = 10;

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub namespaces: usize,
    pub policies: usize,
    /// Rules per policy.
    pub rules: usize,
}

impl Shape {
    pub fn total_rules(&self) -> usize {
        self.policies * self.rules
    }
}

pub fn pod_ip(i: usize) -> IpAddr {
    upper_half_ip(18, i)
}

pub fn dst_ip(n: usize) -> IpAddr {
    upper_half_ip(19, n)
}

/// Address `i` (wrapping after 32,768) in 198.`second`.128.0/17.
fn upper_half_ip(second: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        198,
        second,
        128 + (i / 256 % 128) as u8,
        (i % 256) as u8,
    ))
}

/// Name `n` of pod `i`: covered by `*.r<r>.p<p>.corp.test` of a policy selecting the pod.
pub fn name_for(shape: &Shape, i: usize, n: usize) -> String {
    let ns = i % shape.namespaces;
    let tier = (i / shape.namespaces) % TIERS;
    let per_tier = (shape.policies / (shape.namespaces * TIERS)).max(1);
    let p = (ns + shape.namespaces * (tier + TIERS * (n % per_tier)))
        .min(shape.policies.saturating_sub(1));
    let r = (n / per_tier) % shape.rules;
    format!("h{n}.r{r}.p{p}.corp.test")
}

/// The policy set as YAML (one document per policy).
pub fn policy_yaml(shape: &Shape) -> String {
    let mut out = String::new();
    for p in 0..shape.policies {
        let ns = p % shape.namespaces;
        let tier = (p / shape.namespaces) % TIERS;
        out.push_str(&format!(
            "apiVersion: egressgate.dev/v1alpha1\nkind: EgressPolicy\n\
             metadata: {{name: lt-p{p}, namespace: ns{ns}}}\n\
             spec:\n  podSelector: {{matchLabels: {{tier: t{tier}}}}}\n  egress:\n"
        ));
        for r in 0..shape.rules {
            out.push_str(&format!(
                "    - to: [{{dnsName: svc{r}.p{p}.example.test}}, {{dnsName: \"*.r{r}.p{p}.corp.test\"}}]\n      \
                 ports: [{{port: 443, protocol: tls}}]\n"
            ));
        }
        out.push_str("---\n");
    }
    out
}
