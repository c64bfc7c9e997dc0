//! The rules in force: the compiled policies and the pod identities.
//!
//! Connections read a [`Snapshot`] without locks (`ArcSwap`); a connection keeps the verdict it
//! got, new connections see new rules. A reload parses and compiles everything first and swaps
//! only if *everything* loaded: a broken update keeps the last good rules running and is reported
//! (a `policy_reload` JSON line with every error and its position, the reload counter, the
//! `egressgate_policy_stale` gauge).
//!
//! Reloads happen when inotify (the `notify` crate) reports a change in the policy directory —
//! kubelet updates a ConfigMap volume by swapping its `..data` symlink, one rename event — on
//! SIGHUP, and on a slow poll that catches what inotify cannot see (a directory that was
//! replaced, watch limits). A reload whose files did not change since the last read is skipped.
//!
//! Identities come either from the static file (reloaded like the policies) or from the
//! Kubernetes watch, which publishes whole indexes with [`Store::set_identities`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use egressgate_policy::{parse_policies, PolicySet};
use notify::Watcher;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::identity::Identities;
use crate::metrics::Metrics;

/// Everything a decision needs besides the name table.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub policies: Arc<PolicySet>,
    pub identities: Arc<Identities>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Store {
    policy_dir: PathBuf,
    /// `None` when identities come from Kubernetes.
    identity_file: Option<PathBuf>,
    policies: ArcSwap<PolicySet>,
    identities: ArcSwap<Identities>,
    /// True once identities are complete (static file read, or the first Kubernetes list done).
    identities_ready: watch::Sender<bool>,
    /// Bumped whenever a new identity index is published, for connections waiting on a pod.
    identities_published: watch::Sender<u64>,
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

/// Which reload `Store::watch` asks for.
#[derive(Debug, Clone, Copy)]
enum Reload {
    /// An inotify event or the poll: only if a file changed.
    IfChanged,
    /// SIGHUP: read everything again.
    Always,
}

/// Files loaded together.
struct Loaded {
    policies: PolicySet,
    identities: Option<Identities>,
}

/// After a change event, wait this long for the rest of a burst (an editor's save, a ConfigMap
/// swap) before reading.
const DEBOUNCE: Duration = Duration::from_millis(100);

impl Store {
    /// Loads the configured policy directory and the static identity file if any; every problem
    /// is returned.
    pub fn load(config: &Config, metrics: Metrics) -> Result<Store, Vec<String>> {
        let policy_dir = config.policy_dir.clone();
        let identity_file = config.identity.static_file.clone();
        let fingerprint = fingerprint(&policy_dir, identity_file.as_deref());
        let loaded = load_files(&policy_dir, identity_file.as_deref())?;
        let ready = loaded.identities.is_some();
        let store = Store {
            policy_dir,
            identity_file,
            policies: ArcSwap::from_pointee(loaded.policies),
            identities: ArcSwap::from_pointee(loaded.identities.unwrap_or_default()),
            identities_ready: watch::Sender::new(ready),
            identities_published: watch::Sender::new(0),
            fingerprint: Mutex::new(fingerprint),
            metrics,
        };
        store.record_success();
        Ok(store)
    }

    pub fn current(&self) -> Snapshot {
        Snapshot {
            policies: self.policies.load_full(),
            identities: self.identities.load_full(),
        }
    }

    /// Whether `snapshot` is still what [`current`](Self::current) gives (no reload since),
    /// without taking a reference.
    pub fn is_current(&self, snapshot: &Snapshot) -> bool {
        Arc::ptr_eq(&self.policies.load(), &snapshot.policies)
            && Arc::ptr_eq(&self.identities.load(), &snapshot.identities)
    }

    /// Publishes a whole new identity index (the Kubernetes watch).
    pub(crate) fn set_identities(&self, identities: Identities) {
        self.identities.store(Arc::new(identities));
        self.identities_published
            .send_modify(|generation| *generation += 1);
    }

    /// Changes whenever a new identity index is published.
    pub(crate) fn identity_updates(&self) -> watch::Receiver<u64> {
        self.identities_published.subscribe()
    }

    /// The pod using `ip`, waiting until `deadline` for an index that knows it: a pod's first
    /// connection can race the watch event that announces its address, and must not be judged
    /// as an unknown source because of that.
    pub(crate) async fn pod_by_ip(&self, ip: IpAddr, deadline: tokio::time::Instant) -> Snapshot {
        // Nearly always known: no subscription on the connection's path.
        let snapshot = self.current();
        if snapshot.identities.lookup(ip).is_some() {
            return snapshot;
        }
        // Subscribed before looking again, so that no publication after that look is missed.
        let mut published = self.identities_published.subscribe();
        loop {
            let snapshot = self.current();
            if snapshot.identities.lookup(ip).is_some() {
                return snapshot;
            }
            let changed = tokio::time::timeout_at(deadline, published.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return self.current();
            }
        }
    }

    /// Identities are complete: the gateway may report ready.
    pub(crate) fn mark_identities_ready(&self) {
        self.identities_ready.send_replace(true);
    }

    /// Waits until identities are complete.
    pub async fn identities_ready(&self) {
        let mut ready = self.identities_ready.subscribe();
        // The sender lives in `self`, so this only ends when ready.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Re-reads everything; swaps only on full success. Logs and counts the outcome.
    fn reload(&self) -> Result<(), Vec<String>> {
        let fingerprint = fingerprint(&self.policy_dir, self.identity_file.as_deref());
        let result = load_files(&self.policy_dir, self.identity_file.as_deref());
        if let Ok(mut seen) = self.fingerprint.lock() {
            *seen = fingerprint;
        }
        let errors = match result {
            Ok(loaded) => {
                self.policies.store(Arc::new(loaded.policies));
                if let Some(identities) = loaded.identities {
                    self.set_identities(identities);
                }
                self.record_success();
                Vec::new()
            }
            Err(errors) => {
                self.metrics.policy_stale.set(1);
                errors
            }
        };
        let label = if errors.is_empty() { "ok" } else { "error" };
        self.metrics
            .policy_reloads
            .with_label_values(&[label])
            .inc();
        let current = self.current();
        egressgate_log::write_json_line(&ReloadLine {
            time: egressgate_log::rfc3339_now(),
            event: "policy_reload",
            result: label,
            policies: current.policies.len(),
            pods: current.identities.len(),
            errors: &errors,
        });
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn record_success(&self) {
        self.metrics.policy_stale.set(0);
        self.metrics.policies.set(self.policies.load().len() as i64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics.policy_last_success.set(now.as_secs_f64());
    }

    /// Reloads when a file changed since the last read.
    fn reload_if_changed(&self) {
        let now = fingerprint(&self.policy_dir, self.identity_file.as_deref());
        let changed = self.fingerprint.lock().map_or(true, |seen| *seen != now);
        if changed {
            // The outcome is logged and counted by `reload`; the last good rules stay either way.
            let _ = self.reload();
        }
    }

    /// Reloads on inotify events, SIGHUP and every `poll`, until `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, poll: Duration, shutdown: impl std::future::Future) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "no SIGHUP handler"))
            .ok();
        let (changed, mut changes) = mpsc::unbounded_channel();
        // Kept alive for the loop; without it (no inotify) the poll still reloads.
        let _watcher = self
            .watch_files(changed)
            .map_err(|e| tracing::warn!(error = %e, "no inotify watch; polling only"))
            .ok();
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticker.tick() => self.reload_off_runtime(Reload::IfChanged).await,
                Some(()) = changes.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                    self.reload_off_runtime(Reload::IfChanged).await;
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.reload_off_runtime(Reload::Always).await;
                }
            }
        }
    }

    /// Reading, parsing and compiling a large policy set (and freeing the old one) takes tens of
    /// milliseconds: done on a blocking thread so that no runtime worker stalls the connections
    /// queued on it meanwhile.
    async fn reload_off_runtime(self: &Arc<Self>, when: Reload) {
        let store = Arc::clone(self);
        let reloaded = tokio::task::spawn_blocking(move || match when {
            Reload::IfChanged => store.reload_if_changed(),
            // The outcome is logged and counted by `reload`; the last good rules stay either way.
            Reload::Always => drop(store.reload()),
        });
        if let Err(e) = reloaded.await {
            tracing::error!(error = %e, "policy reload panicked; the last good rules stay");
        }
    }

    /// An inotify watch of the policy directory and the identity file's directory.
    fn watch_files(
        &self,
        changed: mpsc::UnboundedSender<()>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let identity_name = self
            .identity_file
            .as_deref()
            .and_then(Path::file_name)
            .map(ToOwned::to_owned);
        let policy_dir = self.policy_dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let concerns_inputs = event.is_ok_and(|event| {
                    !event.kind.is_access()
                        && event
                            .paths
                            .iter()
                            .any(|path| is_input(path, &policy_dir, identity_name.as_deref()))
                });
                if concerns_inputs {
                    let _ = changed.send(());
                }
            })?;
        watcher.watch(&self.policy_dir, notify::RecursiveMode::NonRecursive)?;
        if let Some(dir) = self.identity_file.as_deref().and_then(Path::parent) {
            watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        }
        Ok(watcher)
    }
}

/// Whether an inotify event on `path` may change the inputs: anything in the policy directory,
/// but in the identity file's directory (which may hold unrelated, busy files such as logs) only
/// the file itself and kubelet's `..data` symlink swap.
fn is_input(path: &Path, policy_dir: &Path, identity_name: Option<&std::ffi::OsStr>) -> bool {
    if path == policy_dir || path.parent() == Some(policy_dir) {
        return true;
    }
    path.file_name().is_some_and(|name| {
        Some(name) == identity_name || name.as_encoded_bytes().starts_with(b"..")
    })
}

fn load_files(policy_dir: &Path, identity_file: Option<&Path>) -> Result<Loaded, Vec<String>> {
    let policies = load_policy_dir(policy_dir);
    let identities = identity_file
        .map(|file| Identities::load(file).map_err(|e| vec![e.to_string()]))
        .transpose();
    match (policies, identities) {
        (Ok(policies), Ok(identities)) => Ok(Loaded {
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

fn fingerprint(policy_dir: &Path, identity_file: Option<&Path>) -> Fingerprint {
    let mut paths = policy_files(policy_dir).unwrap_or_default();
    paths.extend(identity_file.map(Path::to_path_buf));
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
    fn only_events_on_the_inputs_trigger_a_reload() {
        let policies = Path::new("/etc/egressgate/policies");
        let identity = Some(std::ffi::OsStr::new("pods.yaml"));
        let input = |path: &str| is_input(Path::new(path), policies, identity);
        assert!(input("/etc/egressgate/policies/web.yaml"));
        assert!(input("/etc/egressgate/policies/..data"));
        assert!(input("/etc/egressgate/policies"));
        assert!(input("/etc/identity/pods.yaml"));
        assert!(input("/etc/identity/..data_tmp"));
        assert!(!input("/etc/identity/egressgate.stdout"));
        assert!(!input("/etc/egressgate/policies/sub/web.yaml"));
        assert!(!is_input(
            Path::new("/etc/identity/pods.yaml"),
            policies,
            None
        ));
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
    fn a_vanished_policy_directory_keeps_the_last_good_set_until_it_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = setup(dir.path());
        let store = Store::load(
            &config,
            Metrics::register(&prometheus::Registry::new()).expect("metrics"),
        )
        .expect("loads");
        let policies = dir.path().join("policies");
        std::fs::rename(&policies, dir.path().join("moved")).expect("move away");
        let errors = store.reload().expect_err("directory gone");
        assert!(errors[0].contains("policies"), "{errors:?}");
        assert_eq!(store.current().policies.len(), 1);
        std::fs::rename(dir.path().join("moved"), &policies).expect("move back");
        store.reload().expect("back");
        assert_eq!(store.current().policies.len(), 1);
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
