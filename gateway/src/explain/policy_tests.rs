//! `egressgate test POLICY_DIR TESTS.yaml`: expectations about policies, checked with the
//! gateway's own decision code (the explain trace) before the policies reach a cluster.
//!
//! ```yaml
//! settings: {requireSni: true, unselectedPods: allow}   # optional: the gateway's defaults
//! namespaces: {shop: {team: shop}}                      # optional: namespace labels
//! tests:
//!   - name: the app reaches the API over TLS
//!     pod: {namespace: shop, labels: {role: app}}       # name optional
//!     resolved: [api.example.test=198.19.0.10]          # the pod's DNS records
//!     to: 198.19.0.10:443                               # IP:PORT, or a resolved NAME:PORT
//!     protocol: tls                                     # optional, as `explain`
//!     sni: api.example.test                             # or host, or database + user
//!     expect: {verdict: allow, reason: allowed}         # reason optional
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::offline::{self, Resolved};
use super::query::{AskedProtocol, Query};
use super::trace::{self, Explanation, Records, Settings};
use crate::config::UnselectedPods;
use crate::decision::{Reason, Verdict};
use crate::identity::{Identities, Pod};
use crate::store::{load_policy_dir, Snapshot};
use crate::yaml_file;

/// The address a test's pod is known by: only an identity key (a documentation address).
const TEST_POD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    settings: FileSettings,
    #[serde(default)]
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    tests: Vec<TestCase>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileSettings {
    require_sni: Option<bool>,
    unselected_pods: Option<UnselectedPods>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TestCase {
    name: String,
    pod: TestPod,
    #[serde(default)]
    resolved: Vec<String>,
    to: String,
    #[serde(default)]
    protocol: Option<AskedProtocol>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    database: Option<String>,
    #[serde(default)]
    user: Option<String>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TestPod {
    namespace: String,
    #[serde(default = "TestPod::default_name")]
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl TestPod {
    fn default_name() -> String {
        "test-pod".to_owned()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    verdict: Verdict,
    #[serde(default)]
    reason: Option<String>,
}

/// One test's result.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// `None` when it passed; else what was expected.
    pub failure: Option<String>,
    pub explanation: Explanation,
}

/// Every test's result, in file order.
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.failure.is_some()).count()
    }
}

/// Runs the tests of `tests_file` against the policies of `policy_dir`. An `Err` is bad input
/// (policies or tests that do not load, a case that cannot be explained): every problem, one
/// a line.
pub fn run(policy_dir: &Path, tests_file: &Path) -> Result<Report, Vec<String>> {
    let policies = load_policy_dir(policy_dir)?;
    let file: TestFile = yaml_file::load(tests_file).map_err(|e| vec![e.to_string()])?;
    let shown = tests_file.display();
    let settings = Settings {
        require_sni: file
            .settings
            .require_sni
            .unwrap_or(Settings::defaults().require_sni),
        fallbacks: crate::connection::Fallbacks {
            unselected: file
                .settings
                .unselected_pods
                .unwrap_or(Settings::defaults().fallbacks.unselected),
            ..Settings::defaults().fallbacks
        },
    };
    let policies = Arc::new(policies);
    let mut errors = Vec::new();
    let mut outcomes = Vec::new();
    for (number, case) in file.tests.iter().enumerate() {
        let name = format!("{shown}: test {} ({})", number + 1, case.name);
        match run_case(&policies, &file.namespaces, case, settings) {
            Ok(explanation) => outcomes.push(Outcome {
                name: case.name.clone(),
                failure: judge(&case.expect, &explanation),
                explanation,
            }),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
        if let Some(reason) = &case.expect.reason {
            if !Reason::all().any(|r| r.as_str() == reason) {
                errors.push(format!(
                    "{name}: expect.reason {reason:?} is no reason code"
                ));
            }
        }
    }
    if file.tests.is_empty() {
        errors.push(format!("{shown}: no tests"));
    }
    if errors.is_empty() {
        Ok(Report { outcomes })
    } else {
        Err(errors)
    }
}

fn run_case(
    policies: &Arc<egressgate_policy::PolicySet>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    case: &TestCase,
    settings: Settings,
) -> Result<Explanation, String> {
    let query = Query {
        pod: format!("{}/{}", case.pod.namespace, case.pod.name),
        to: case.to.clone(),
        protocol: case.protocol,
        sni: case.sni.clone(),
        host: case.host.clone(),
        database: case.database.clone(),
        user: case.user.clone(),
    };
    let asked = query.check().map_err(|e| e.to_string())?;
    let resolved: Resolved = case
        .resolved
        .join(",")
        .parse()
        .map_err(|e| format!("resolved: {e}"))?;
    let pod = Arc::new(Pod {
        namespace: case.pod.namespace.clone(),
        name: case.pod.name.clone(),
        labels: case.pod.labels.clone(),
        namespace_labels: namespaces
            .get(&case.pod.namespace)
            .cloned()
            .unwrap_or_default(),
        owner: None,
        ips: vec![TEST_POD_IP],
        selection: Default::default(),
    });
    let table = offline::table_for(&pod, &resolved);
    let snapshot = Snapshot {
        policies: Arc::clone(policies),
        identities: Arc::new(Identities::from_index(HashMap::from([(TEST_POD_IP, pod)]))),
    };
    trace::explain(&snapshot, &table, &asked, settings, Records::Given).map_err(|e| e.to_string())
}

/// `None` when the explanation meets the expectation.
fn judge(expect: &Expect, explanation: &Explanation) -> Option<String> {
    let verdict_ok = explanation.verdict == expect.verdict;
    let reason_ok = expect
        .reason
        .as_ref()
        .is_none_or(|reason| *reason == explanation.reason);
    if verdict_ok && reason_ok {
        return None;
    }
    Some(format!(
        "expected {}{}, got {} ({})",
        expect.verdict.as_str(),
        expect
            .reason
            .as_ref()
            .map_or(String::new(), |r| format!(" ({r})")),
        explanation.verdict.as_str(),
        explanation.reason
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &str = include_str!("testdata/policies.yaml");
    const TESTS: &str = include_str!("testdata/tests.yaml");

    fn files(tests: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).expect("mkdir");
        std::fs::write(policies.join("shop.yaml"), POLICIES).expect("policies");
        let file = dir.path().join("tests.yaml");
        std::fs::write(&file, tests).expect("tests");
        (dir, file)
    }

    #[test]
    fn the_example_tests_pass_with_the_gateways_decisions() {
        let (dir, file) = files(TESTS);
        let report = run(&dir.path().join("policies"), &file).expect("loads");
        for outcome in &report.outcomes {
            assert!(
                outcome.failure.is_none(),
                "{}: {:?}",
                outcome.name,
                outcome.failure
            );
        }
        assert_eq!(report.outcomes.len(), 9);
    }

    #[test]
    fn a_wrong_expectation_fails_with_its_trace() {
        let wrong = TESTS.replacen("reason: sni_mismatch", "reason: allowed", 1);
        let (dir, file) = files(&wrong);
        let report = run(&dir.path().join("policies"), &file).expect("loads");
        assert_eq!(report.failed(), 1);
        let failed = report
            .outcomes
            .iter()
            .find(|o| o.failure.is_some())
            .expect("one failure");
        assert_eq!(
            failed.failure.as_deref(),
            Some("expected deny (allowed), got deny (sni_mismatch)")
        );
        assert!(!failed.explanation.addresses[0].steps.is_empty());
    }

    #[test]
    fn bad_input_names_the_test_and_the_problem() {
        let (dir, file) = files("tests:\n  - name: x\n    pod: {namespace: shop}\n    to: nowhere\n    expect: {verdict: allow}\n");
        let errors = run(&dir.path().join("policies"), &file).expect_err("bad destination");
        assert!(
            errors[0].contains("test 1 (x): destination \"nowhere\""),
            "{errors:?}"
        );
        let (dir, file) = files("tests:\n  - name: x\n    pod: {namespace: shop}\n    to: 192.0.2.9:1\n    expect: {verdict: allow, reason: fine}\n");
        let errors = run(&dir.path().join("policies"), &file).expect_err("bad reason");
        assert!(
            errors[0].contains("\"fine\" is no reason code"),
            "{errors:?}"
        );
        let (dir, file) = files("tests:\n  - name: x\n    pod: {namespace: shop}\n    to: 192.0.2.9:1\n    expect: {verdict: maybe}\n");
        let errors = run(&dir.path().join("policies"), &file).expect_err("bad verdict");
        assert!(errors[0].contains("tests.yaml:"), "a position: {errors:?}");
        let (dir, file) = files("tests: []\nsetings: {}\n");
        assert!(
            run(&dir.path().join("policies"), &file).is_err(),
            "unknown key"
        );
    }
}
