//! The benches' view of the harness's synthetic cluster (`src/world.rs`, shared with the
//! `decision` scenario): the compiled policy set and each pod's labels.
#![allow(dead_code)]

use std::collections::BTreeMap;

use egressgate_policy::{parse_policies, PolicySet};

#[path = "../../src/world.rs"]
mod world;

// Each bench uses its own part of this module.
#[allow(unused_imports)]
pub use world::{dst_ip, name_for, pod_ip, Shape, TIERS};

pub fn policy_set(shape: &Shape) -> PolicySet {
    let yaml = world::policy_yaml(shape);
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
