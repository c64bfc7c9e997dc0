//! The rules in force: the compiled policies and the pod identities, swapped whole.
//!
//! Connections read a [`Snapshot`] without locks (`ArcSwap`). A reload builds a complete new
//! snapshot first and swaps only if *everything* loaded: a broken file keeps the last good rules
//! running and is reported (JSON line, metric, every error with its position). Reloads happen on
//! SIGHUP and when a poll sees a file change; polling rather than inotify because ConfigMap
//! volumes swap a symlink to a new directory, which a poll of (name, size, mtime) always sees.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use egressgate_policy::{parse_policies, PolicySet};
use serde::Serialize;

use crate::config::Config;
use crate::identity::Identities;
use crate::metrics::Metrics;

/// Everything a decision needs besides the name table.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub policies: PolicySet,
    pub identities: Identities,
}

/// See the module docs.
#[derive(Debug)]
pub struct Store {
    policy_dir: PathBuf,
    identity_file: PathBuf,
    current: ArcSwap<Snapshot>,
    /// What the files looked like when last read, successfully or not.
    fingerprint: Mutex<Fingerprint>,
    metrics: Metrics,
}

/// (path, length, mtime) of every input file, in order.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The `policy_reload` JSON line.
#[derive(Debug, Serialize)]
struct ReloadLine<'a> {
    time: String,
    event: &'static str,
    result: &'static str,
    policies: usize,
    pods: usize,
    errors: &'a [String],
}

impl Store {
    /// Loads the configured policy directory and identity file; every problem is returned.
    pub fn load(config: &Config, metrics: Metrics) -> Result<Store, Vec<String>> {
        let policy_dir = config.policy_dir.clone();
        let identity_file = config.identity.static_file.clone();
        let fingerprint = fingerprint(&policy_dir, &identity_file);
        let snapshot = load_snapshot(&policy_dir, &identity_file)?;
        Ok(Store {
            policy_dir,
            identity_file,
            current: ArcSwap::from_pointee(snapshot),
            fingerprint: Mutex::new(fingerprint),
            metrics,
        })
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads everything; swaps only on full success. Logs and counts the outcome.
    pub fn reload(&self) -> Result<(), Vec<String>> {
        let fingerprint = fingerprint(&self.policy_dir, &self.identity_file);
        let result = load_snapshot(&self.policy_dir, &self.identity_file);
        if let Ok(mut seen) = self.fingerprint.lock() {
            *seen = fingerprint;
        }
        let (label, errors) = match &result {
            Ok(_) => ("ok", Vec::new()),
            Err(errors) => ("error", errors.clone()),
        };
        self.metrics
            .policy_reloads
            .with_label_values(&[label])
            .inc();
        if let Ok(snapshot) = result {
            self.current.store(Arc::new(snapshot));
        }
        let current = self.current();
        egressgate_dns_shim::log::write_json_line(&ReloadLine {
            time: egressgate_dns_shim::log::rfc3339_now(),
            event: "policy_reload",
            result: label,
            policies: current.policies.len(),
            pods: current.identities.len(),
            errors: &errors,
        });
        self.metrics.policies.set(current.policies.len() as i64);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Reloads when a file changed since the last read.
    pub fn reload_if_changed(&self) {
        let now = fingerprint(&self.policy_dir, &self.identity_file);
        let changed = self.fingerprint.lock().map_or(true, |seen| *seen != now);
        if changed {
            // The outcome is logged and counted by `reload`; the last good rules stay either way.
            let _ = self.reload();
        }
    }

    /// Polls for changes every `interval` and reloads on SIGHUP, until `shutdown`.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl std::future::Future) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; reloading on file changes only");
                None
            }
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticker.tick() => self.reload_if_changed(),
                Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => None } } => {
                    let _ = self.reload();
                }
            }
        }
    }
}

fn load_snapshot(policy_dir: &Path, identity_file: &Path) -> Result<Snapshot, Vec<String>> {
    let policies = load_policy_dir(policy_dir);
    let identities = Identities::load(identity_file).map_err(|e| vec![e.to_string()]);
    match (policies, identities) {
        (Ok(policies), Ok(identities)) => Ok(Snapshot {
            policies,
            identities,
        }),
        (Err(mut a), Err(b)) => {
            a.extend(b);
            Err(a)
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// Every `*.yaml` / `*.yml` file of `dir` in name order, compiled into one set. Hidden files are
/// skipped: ConfigMap volumes keep their real files under `..data/` and link them from the top.
pub fn load_policy_dir(dir: &Path) -> Result<PolicySet, Vec<String>> {
    let files = policy_files(dir).map_err(|e| vec![format!("{}: {e}", dir.display())])?;
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let file = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_policies(&file, &text) {
                Ok(parsed) => policies.extend(parsed),
                Err(errs) => errors.extend(errs.iter().map(ToString::to_string)),
            },
            Err(e) => errors.push(format!("{file}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    PolicySet::new(policies).map_err(|errs| errs.iter().map(ToString::to_string).collect())
}

fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn fingerprint(policy_dir: &Path, identity_file: &Path) -> Fingerprint {
    let mut paths = policy_files(policy_dir).unwrap_or_default();
    paths.push(identity_file.to_path_buf());
    paths
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let modified = meta.and_then(|m| m.modified().ok());
            (path, len, modified)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: egressgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {}\n  egress:\n    - to: [{dnsName: api.example.test}]\n      ports: [{port: 443, protocol: tls}]\n";

    fn setup(dir: &Path) -> Config {
        std::fs::create_dir(dir.join("policies")).expect("mkdir");
        std::fs::write(dir.join("policies/web.yaml"), POLICY).expect("write");
        std::fs::write(dir.join("policies/notes.txt"), "not yaml: [").expect("write");
        std::fs::write(dir.join("pods.yaml"), "pods: []\n").expect("write");
        let text = format!(
            "policyDir: {}\nidentity: {{staticFile: {}}}\nnftables: {{manage: false}}\n",
            dir.join("policies").display(),
            dir.join("pods.yaml").display()
        );
        Config::parse("c.yaml", &text).expect("config")
    }

    #[test]
    fn a_broken_update_keeps_the_last_good_policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = setup(dir.path());
        let store = Store::load(
            &config,
            Metrics::register(&prometheus::Registry::new()).expect("metrics"),
        )
        .expect("loads");
        assert_eq!(store.current().policies.len(), 1);

        let broken = POLICY.replace("protocol: tls", "protocol: tlz");
        std::fs::write(dir.path().join("policies/web.yaml"), &broken).expect("write");
        std::fs::write(
            dir.path().join("policies/more.yml"),
            POLICY.replace("name: web", "name: web2"),
        )
        .expect("write");
        let errors = store.reload().expect_err("broken");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("web.yaml:8:"), "{errors:?}");
        assert_eq!(store.current().policies.len(), 1, "last good set kept");

        std::fs::write(dir.path().join("policies/web.yaml"), POLICY).expect("write");
        store.reload().expect("fixed");
        assert_eq!(store.current().policies.len(), 2);
    }

    #[test]
    fn startup_reports_every_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = setup(dir.path());
        std::fs::write(dir.path().join("policies/web.yaml"), "kind: [").expect("write");
        std::fs::write(dir.path().join("pods.yaml"), "pods: 3\n").expect("write");
        let errors = Store::load(
            &config,
            Metrics::register(&prometheus::Registry::new()).expect("metrics"),
        )
        .expect_err("broken");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("web.yaml:1:"), "{errors:?}");
        assert!(errors[1].contains("pods.yaml:1:"), "{errors:?}");
    }
}
