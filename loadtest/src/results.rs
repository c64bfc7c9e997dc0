//! The result files: one JSON document per scenario in `loadtest/results/`, read back by the
//! report.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::machine::Machine;
use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// Median, min and max of one path's samples (one per round).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathStats {
    pub path: String,
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl PathStats {
    pub fn new(path: &str, samples: Vec<f64>) -> Option<PathStats> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(PathStats {
            path: path.to_owned(),
            samples,
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }

    /// The median of this path's samples divided by `base`'s of the same round: paired, the
    /// machine's drift between rounds cancels out (an A/B run's ratio). `None` unless both
    /// have a sample for every round.
    pub fn paired_ratio(&self, base: &PathStats) -> Option<f64> {
        if self.samples.len() != base.samples.len() {
            return None;
        }
        let ratios: Vec<f64> = self
            .samples
            .iter()
            .zip(&base.samples)
            .map(|(value, base)| value / base)
            .filter(|ratio| ratio.is_finite())
            .collect();
        if ratios.len() != base.samples.len() {
            return None;
        }
        PathStats::new(&self.path, ratios).map(|stats| stats.median)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricResult {
    pub key: String,
    pub label: String,
    pub unit: String,
    pub better: Better,
    pub paths: Vec<PathStats>,
}

impl MetricResult {
    pub fn path(&self, path: &str) -> Option<&PathStats> {
        self.paths.iter().find(|p| p.path == path)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathInfo {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub title: String,
    pub description: String,
    /// The path ratios are taken against (`direct` for the network scenarios).
    pub baseline: Option<String>,
    pub started: String,
    pub seconds: f64,
    pub rounds: usize,
    pub smoke: bool,
    pub machine: Machine,
    pub placement: String,
    pub paths: Vec<PathInfo>,
    pub settings: BTreeMap<String, serde_json::Value>,
    pub metrics: Vec<MetricResult>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    pub fn metric(&self, key: &str) -> Option<&MetricResult> {
        self.metrics.iter().find(|m| m.key == key)
    }

    pub fn save(&self, dir: &Path) -> Result<std::path::PathBuf, Error> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.scenario));
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(path)
    }
}

/// Every `*.json` result in `dir`, in scenario order.
pub fn load_all(dir: &Path) -> Vec<ScenarioResult> {
    let mut all: Vec<ScenarioResult> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter_map(|p| serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok())
        .collect();
    all.sort_by_key(|r: &ScenarioResult| {
        crate::scenarios::ALL
            .iter()
            .position(|s| *s == r.scenario)
            .unwrap_or(usize::MAX)
    });
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paired_ratio_cancels_the_drift_between_rounds() {
        // Both builds slow down together in round 2; the change is 10 % in every round.
        let base = PathStats::new("baseline", vec![100.0, 200.0, 100.0]).expect("stats");
        let new = PathStats::new("egressgate", vec![110.0, 220.0, 110.0]).expect("stats");
        let paired = new.paired_ratio(&base).expect("same rounds");
        assert!((paired - 1.1).abs() < 1e-9, "{paired}");
        // Drift that is uneven between rounds but shared by both builds cancels too.
        let base = PathStats::new("baseline", vec![100.0, 300.0, 90.0]).expect("stats");
        let new = PathStats::new("egressgate", vec![110.0, 330.0, 99.0]).expect("stats");
        assert!((new.paired_ratio(&base).expect("same rounds") - 1.1).abs() < 1e-9);
        assert!((new.median / base.median - 1.1).abs() < 1e-9);
        // Where pairing differs from the ratio of medians: a round disturbed for one build
        // alone (round 2 here) moves the medians' ratio, not the paired one.
        let base = PathStats::new("baseline", vec![100.0, 200.0, 300.0]).expect("stats");
        let new = PathStats::new("egressgate", vec![110.0, 330.0, 330.0]).expect("stats");
        assert!((new.paired_ratio(&base).expect("same rounds") - 1.1).abs() < 1e-9);
        assert!((new.median / base.median - 1.65).abs() < 1e-9);

        // A failed round leaves nothing to pair with.
        let short = PathStats::new("egressgate", vec![110.0, 220.0]).expect("stats");
        assert_eq!(short.paired_ratio(&base), None);
        let zero = PathStats::new("baseline", vec![0.0, 1.0, 1.0]).expect("stats");
        assert_eq!(new.paired_ratio(&zero), None);
    }
}
