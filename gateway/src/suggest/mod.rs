//! `egressgate suggest`: EgressPolicy YAML that allows exactly what pods in audit mode, or
//! selected by no policy, were seen doing in their decision lines.
//!
//! - `input`: a decision line → an observation (workload pod, destination, port, protocol), or
//!   why it teaches nothing. Only lines with `pod.labels` teach: the gateway writes them for pods
//!   no enforce-mode policy selects.
//! - `workload`: which policy a pod's connections go to (its owner, or a label's value), and the
//!   policy's pod selector.
//! - `rules`: per workload, one rule per destination with its ports and protocols;
//!   `--wildcard-min` folding.
//! - `render`: the YAML, commented for review.
//! - `command`: the subcommand's flags, input and exit codes.

mod command;
mod input;
mod render;
mod rules;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;

use egressgate_policy::Mode;

pub use command::{command, SuggestArgs};
pub use workload::GroupBy;

use input::Skip;
use render::Suggested;
use rules::Reached;
use workload::WorkloadKey;

/// What `suggest` is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub group_by: GroupBy,
    /// Fold this many sibling names or more into `*.parent`; `None` never folds.
    pub wildcard_min: Option<usize>,
    /// The `spec.mode` of the suggested policies.
    pub mode: Mode,
}

/// The suggested policies and what was left out, for stderr.
#[derive(Debug, Default)]
pub struct Suggestion {
    /// EgressPolicy documents; empty when nothing was learnable.
    pub yaml: String,
    pub policies: usize,
    pub lines: usize,
    pub learned: usize,
    /// Lines left out, by why.
    pub skipped: BTreeMap<String, usize>,
    /// Workloads no policy could be written for, and why.
    pub warnings: Vec<String>,
}

/// One workload's pods and connections.
#[derive(Debug, Default)]
struct Workload {
    /// Pod name → its labels, as its lines showed them.
    pods: BTreeMap<String, BTreeMap<String, String>>,
    decisions: usize,
    reached: Reached,
}

/// Reads decision lines from `input` until its end and suggests policies.
pub fn suggest(input: impl BufRead, options: &Options) -> std::io::Result<Suggestion> {
    let mut suggestion = Suggestion::default();
    let mut workloads: BTreeMap<WorkloadKey, Workload> = BTreeMap::new();
    let mut unlabelled = BTreeSet::new();
    for text in input.lines() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        suggestion.lines += 1;
        let observation = match input::observe(&text) {
            Ok(observation) => observation,
            Err(skip) => {
                let why = match skip {
                    // Only the count of other events is of no interest.
                    Skip::NotADecision => continue,
                    skip => skip.to_string(),
                };
                *suggestion.skipped.entry(why).or_default() += 1;
                continue;
            }
        };
        let Some(key) = options.group_by.key(&observation.pod, &observation.labels) else {
            unlabelled.insert(format!(
                "{}/{}",
                observation.pod.namespace, observation.pod.name
            ));
            *suggestion
                .skipped
                .entry("pods without the --group-by label".to_owned())
                .or_default() += 1;
            continue;
        };
        suggestion.learned += 1;
        let workload = workloads.entry(key).or_default();
        workload.decisions += 1;
        workload
            .pods
            .insert(observation.pod.name.clone(), observation.labels);
        for destination in observation.destinations {
            workload
                .reached
                .add(destination, observation.port, observation.used.clone());
        }
    }
    if !unlabelled.is_empty() {
        let pods: Vec<String> = unlabelled.into_iter().collect();
        suggestion.warnings.push(format!(
            "left out pods without the --group-by label: {}",
            pods.join(", ")
        ));
    }
    if let Some(min) = options.wildcard_min {
        for workload in workloads.values_mut() {
            workload.reached.fold_wildcards(min);
        }
    }
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    let mut policies = Vec::new();
    for (key, workload) in &workloads {
        let selector = options.group_by.selector(key, workload.pods.values());
        if selector.is_empty() {
            suggestion.warnings.push(format!(
                "{} {}/{}: its pods share no label to select them by; no policy written \
                 (try --group-by LABEL)",
                key.kind, key.namespace, key.name
            ));
            continue;
        }
        policies.push(Suggested {
            key,
            name: unique_name(&mut names, key),
            selector,
            pods: workload.pods.keys().map(String::as_str).collect(),
            decisions: workload.decisions,
            destinations: &workload.reached.destinations,
        });
    }
    suggestion.policies = policies.len();
    suggestion.yaml = render::render(&policies, options.mode);
    Ok(suggestion)
}

/// `<workload>-egress`, or `<workload>-N-egress` when two workloads of a namespace map to one.
fn unique_name(taken: &mut BTreeSet<(String, String)>, key: &WorkloadKey) -> String {
    let mut name = render::policy_name(&key.name);
    let mut n = 2;
    while !taken.insert((key.namespace.clone(), name.clone())) {
        let base: String = key.name.chars().take(48).collect();
        name = render::policy_name(&format!("{base}-{n}"));
        n += 1;
    }
    name
}

#[cfg(test)]
mod tests;
