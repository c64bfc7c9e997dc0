//! The gateway under test: its config file (README, "Configuration"), locating the binary, starting it
//! like hickory's server_harness (wait for the `listening` line, kill and dump output on drop),
//! and reading its JSON lines.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{wait_until, Daemon};
use crate::error::{LabError, Result};
use crate::netns::Netns;
use crate::services::path_str;

/// How long the gateway gets to print `{"event":"listening"}`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Default wait for a decision line after a client finished.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's settings as the lab writes them. `Default` gives the lab's standard config;
/// every field can be overridden, and `config_override` replaces the whole file.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Policy files written into policyDir: (file name, YAML text).
    pub policies: Vec<(String, String)>,
    /// `unselectedPods`: "allow" or "deny".
    pub unselected: String,
    pub tproxy: Vec<String>,
    pub dns_listen: Vec<String>,
    pub admin: String,
    /// `listen.workers`; `None` leaves the default (one per CPU).
    pub workers: Option<usize>,
    pub pod_cidrs: Vec<String>,
    pub interfaces: Vec<String>,
    pub bypass_cidrs: Vec<String>,
    pub manage_nftables: bool,
    pub upstreams: Vec<String>,
    /// `dns.foreignServers`: "forward" or "refuse".
    pub foreign_servers: String,
    pub min_ttl_seconds: u64,
    pub idle_grace_seconds: u64,
    pub peek_timeout_ms: u64,
    pub require_sni: bool,
    /// `peek.maxPendingPerPod`, when set.
    pub max_pending_per_pod: Option<usize>,
    /// `connections.max` and `connections.shutdownGraceSeconds`, when set.
    pub max_connections: Option<usize>,
    pub shutdown_grace_seconds: Option<u64>,
    /// Extra lines inside `intercept:` (indented by two spaces).
    pub intercept_extra: String,
    /// Extra lines inside `nftables:` (indented by two spaces).
    pub nftables_extra: String,
    /// `identity.kubernetes.nodeName` instead of the static identity file (with a lab built
    /// `kube_api()`, whose API server the gateway then watches).
    pub kubernetes_node: Option<String>,
    /// Extra lines inside `state:` (indented by two spaces).
    pub state_extra: String,
    /// Extra top-level YAML appended to the generated file.
    pub extra_yaml: String,
    /// Environment variables set for the gateway process only.
    pub env: Vec<(String, String)>,
    /// The whole config file instead of the generated one. `{policy_dir}` and
    /// `{identity_file}` are replaced by the lab's paths.
    pub config_override: Option<String>,
    /// The whole identity file instead of the generated one (pod-a = shop/app-1 role=app,
    /// pod-b = shop/batch-1 role=batch).
    pub identity_override: Option<String>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            policies: Vec::new(),
            unselected: "allow".to_owned(),
            tproxy: vec!["0.0.0.0:15001".to_owned(), "[::]:15001".to_owned()],
            dns_listen: vec!["0.0.0.0:15053".to_owned(), "[::]:15053".to_owned()],
            admin: "127.0.0.1:15090".to_owned(),
            workers: None,
            pod_cidrs: Vec::new(),
            interfaces: vec!["egp*".to_owned()],
            bypass_cidrs: Vec::new(),
            manage_nftables: true,
            upstreams: vec![format!("{}:53", crate::addr::TRUSTED_DNS)],
            foreign_servers: "forward".to_owned(),
            min_ttl_seconds: 0,
            idle_grace_seconds: 2,
            peek_timeout_ms: 5000,
            require_sni: true,
            max_pending_per_pod: None,
            max_connections: None,
            shutdown_grace_seconds: None,
            intercept_extra: String::new(),
            nftables_extra: String::new(),
            kubernetes_node: None,
            state_extra: String::new(),
            extra_yaml: String::new(),
            env: Vec::new(),
            config_override: None,
            identity_override: None,
        }
    }
}

impl GatewayOptions {
    /// Adds a policy file.
    pub fn policy(mut self, file: &str, yaml: &str) -> Self {
        self.policies.push((file.to_owned(), yaml.to_owned()));
        self
    }

    pub fn unselected(mut self, verdict: &str) -> Self {
        self.unselected = verdict.to_owned();
        self
    }

    /// The config file text for the given paths.
    pub fn config_yaml(
        &self,
        policy_dir: &Path,
        identity_file: &Path,
        state_dir: &Path,
    ) -> Result<String> {
        let policy_dir = path_str(policy_dir)?;
        let identity_file = path_str(identity_file)?;
        let state_dir = path_str(state_dir)?;
        if let Some(text) = &self.config_override {
            return Ok(text
                .replace("{policy_dir}", policy_dir)
                .replace("{identity_file}", identity_file)
                .replace("{state_dir}", state_dir));
        }
        Ok(format!(
            "# written by egressgate-lab\n\
             listen:\n  tproxy: {tproxy}\n  dns: {dns}\n  admin: {admin}\n{workers}\
             policyDir: {policy_dir}\n\
             identity:\n  {identity}\n\
             intercept:\n  podCidrs: {pod_cidrs}\n  interfaces: {interfaces}\n  bypassCidrs: {bypass}\n{intercept_extra}\
             nftables:\n  manage: {manage}\n{nftables_extra}\
             dns:\n  upstreams: {upstreams}\n  foreignServers: {foreign}\n  \
             minTtlSeconds: {min_ttl}\n  idleGraceSeconds: {grace}\n\
             peek:\n  timeoutMs: {peek_timeout}\n  requireSni: {require_sni}\n{peek_extra}\
             connections:\n{connections}\
             unselectedPods: {unselected}\n\
             state:\n  dir: {state_dir}\n{state_extra}{extra}",
            tproxy = flow(&self.tproxy),
            dns = flow(&self.dns_listen),
            admin = quote(&self.admin),
            workers = optional("workers", self.workers),
            pod_cidrs = flow(&self.pod_cidrs),
            interfaces = flow(&self.interfaces),
            bypass = flow(&self.bypass_cidrs),
            intercept_extra = self.intercept_extra,
            manage = self.manage_nftables,
            nftables_extra = self.nftables_extra,
            upstreams = flow(&self.upstreams),
            foreign = self.foreign_servers,
            min_ttl = self.min_ttl_seconds,
            grace = self.idle_grace_seconds,
            peek_timeout = self.peek_timeout_ms,
            require_sni = self.require_sni,
            peek_extra = optional("maxPendingPerPod", self.max_pending_per_pod),
            connections = [
                optional("max", self.max_connections),
                optional("shutdownGraceSeconds", self.shutdown_grace_seconds),
                "  idleTimeoutSeconds: 600\n".to_owned(),
            ]
            .concat(),
            identity = match &self.kubernetes_node {
                Some(node) => format!("kubernetes: {{nodeName: {node}}}"),
                None => format!("staticFile: {identity_file}"),
            },
            unselected = self.unselected,
            state_extra = self.state_extra,
            extra = self.extra_yaml,
        ))
    }
}

/// `  key: value\n` when set.
fn optional(key: &str, value: Option<impl fmt::Display>) -> String {
    value.map_or_else(String::new, |value| format!("  {key}: {value}\n"))
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn flow(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Where the `egressgate` binary is: `$EGRESSGATE_BIN` if set, else `egressgate` in the cargo
/// profile directory this executable was built into (`<target>/<profile>/deps/e2e-…` for tests,
/// `<target>/<profile>/demo` for the demo), which follows `CARGO_TARGET_DIR` and `--release`.
/// Cargo does not hand one package's binaries to another's tests, so run
/// `cargo build -p egressgate` (same profile) first.
pub fn egressgate_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("EGRESSGATE_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(LabError::new(format!(
                "EGRESSGATE_BIN={} is not a file",
                path.display()
            )))
        };
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| LabError::new("current_exe has no parent"))?
        .to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    let path = dir.join("egressgate");
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::new(format!(
            "egressgate binary not found at {}: run `cargo build -p egressgate` with the same \
             profile first, or set EGRESSGATE_BIN",
            path.display()
        )))
    }
}

/// The running gateway (`egressgate run --config FILE` in the node namespace).
#[derive(Debug)]
pub struct Gateway {
    daemon: Daemon,
    bin: PathBuf,
    config: PathBuf,
}

impl Gateway {
    /// Starts the gateway with `env` added to its environment and waits for its `listening` line.
    pub fn start(
        node: &Netns,
        bin: PathBuf,
        config: PathBuf,
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Result<Self> {
        Self::start_named(node, bin, config, env, log_dir, "egressgate")
    }

    /// [`Gateway::start`] with output in `<log_dir>/<name>.{stdout,stderr}`: a second gateway
    /// process beside the first (a restart, or a successor taking over).
    pub fn start_named(
        node: &Netns,
        bin: PathBuf,
        config: PathBuf,
        env: &[(String, String)],
        log_dir: &Path,
        name: &str,
    ) -> Result<Self> {
        let assignments: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["env"];
        args.extend(assignments.iter().map(String::as_str));
        args.extend([path_str(&bin)?, "run", "--config", path_str(&config)?]);
        let daemon = Daemon::spawn(node.name(), name, &args, log_dir, "TERM")?;
        let mut gateway = Self {
            daemon,
            bin,
            config,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if gateway.events("listening").next().is_some() {
                return Ok(gateway);
            }
            if let Some(status) = gateway.daemon.exited() {
                return Err(LabError::new(format!(
                    "egressgate exited ({status}) before its listening line\n{}",
                    gateway.daemon.output_tail(40)
                )));
            }
            if Instant::now() >= deadline {
                return Err(LabError::new(format!(
                    "egressgate printed no listening line within {STARTUP_TIMEOUT:?}\n{}",
                    gateway.daemon.output_tail(40)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }

    /// Every JSON object line on stdout so far (other lines are skipped).
    pub fn lines(&self) -> Vec<Value> {
        self.daemon
            .stdout_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Lines whose `event` is `event`.
    pub fn events(&self, event: &str) -> impl Iterator<Item = Value> {
        let event = event.to_owned();
        self.lines()
            .into_iter()
            .filter(move |line| line.get("event").and_then(Value::as_str) == Some(&event))
    }

    /// Every decision line so far.
    pub fn decisions(&self) -> Vec<Decision> {
        self.events("decision").map(Decision).collect()
    }

    /// `dns` event lines so far.
    pub fn dns_events(&self) -> Vec<Value> {
        self.events("dns").collect()
    }

    /// The `event` lines matching `pred`, once there are at least `count` of them, waiting up
    /// to `timeout`: lines reach stdout through a writer that flushes every few milliseconds,
    /// so an answer can reach a client before its line is printed.
    pub fn wait_for_events(
        &self,
        event: &str,
        pred: impl Fn(&Value) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let mut found = Vec::new();
        wait_until(&format!("{count} {event} lines"), timeout, || {
            found = self.events(event).filter(|line| pred(line)).collect();
            Ok(found.len() >= count)
        })
        .map_err(|e| {
            LabError::new(format!(
                "{e}: {} matched\n{}",
                found.len(),
                self.daemon.output_tail(30)
            ))
        })?;
        Ok(found)
    }

    /// The number of decisions so far: pass it to [`Gateway::wait_for_decision_since`] to see
    /// only decisions made after this point.
    pub fn cursor(&self) -> usize {
        self.decisions().len()
    }

    /// The first decision matching `pred`, waiting up to `timeout` for it.
    pub fn wait_for_decision(
        &self,
        pred: impl Fn(&Decision) -> bool,
        timeout: Duration,
    ) -> Result<Decision> {
        self.wait_for_decision_since(0, pred, timeout)
    }

    /// The first decision after the first `cursor` decisions that matches `pred`, waiting up to
    /// `timeout`. The error lists the decisions that did not match.
    pub fn wait_for_decision_since(
        &self,
        cursor: usize,
        pred: impl Fn(&Decision) -> bool,
        timeout: Duration,
    ) -> Result<Decision> {
        let deadline = Instant::now() + timeout;
        loop {
            let decisions = self.decisions();
            let recent = decisions.get(cursor..).unwrap_or_default();
            if let Some(found) = recent.iter().find(|d| pred(d)) {
                return Ok(found.clone());
            }
            if Instant::now() >= deadline {
                let seen: Vec<String> = recent.iter().map(ToString::to_string).collect();
                return Err(LabError::new(format!(
                    "no matching decision within {timeout:?}; decisions since #{cursor}:\n{}\n{}",
                    seen.join("\n"),
                    self.daemon.output_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.daemon.stop();
        if std::thread::panicking() {
            eprintln!(
                "egressgate-lab: gateway output (test failed):\n{}",
                self.daemon.output_tail(60)
            );
        }
    }
}

/// One `{"event":"decision",...}` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision(pub Value);

impl Decision {
    fn str_field(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    /// `allow`, `deny` or `audit`.
    pub fn verdict(&self) -> Option<&str> {
        self.str_field("verdict")
    }

    pub fn reason(&self) -> Option<&str> {
        self.str_field("reason")
    }

    pub fn protocol(&self) -> Option<&str> {
        self.str_field("protocol")
    }

    pub fn sni(&self) -> Option<&str> {
        self.str_field("sni")
    }

    pub fn host(&self) -> Option<&str> {
        self.str_field("host")
    }

    pub fn database(&self) -> Option<&str> {
        self.str_field("database")
    }

    pub fn user(&self) -> Option<&str> {
        self.str_field("user")
    }

    pub fn policy(&self) -> Option<&str> {
        self.str_field("policy")
    }

    pub fn source(&self) -> Option<&str> {
        self.str_field("source")
    }

    pub fn destination(&self) -> Option<&str> {
        self.str_field("destination")
    }

    /// The destination's port, from `"198.19.0.10:443"` or `"[fd00:99::10]:443"`.
    pub fn destination_port(&self) -> Option<u16> {
        self.destination()?.rsplit(':').next()?.parse().ok()
    }

    /// The destination's IP without brackets.
    pub fn destination_ip(&self) -> Option<&str> {
        let dest = self.destination()?;
        let (ip, _) = dest.rsplit_once(':')?;
        Some(ip.trim_start_matches('[').trim_end_matches(']'))
    }

    /// `pod.name`.
    pub fn pod_name(&self) -> Option<&str> {
        self.0.get("pod")?.get("name")?.as_str()
    }

    pub fn pod_namespace(&self) -> Option<&str> {
        self.0.get("pod")?.get("namespace")?.as_str()
    }

    /// `names`: the DNS names this pod resolved to the destination.
    pub fn names(&self) -> Vec<&str> {
        self.0
            .get("names")
            .and_then(Value::as_array)
            .map(|names| names.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    /// Matches a decision for pod `pod` (its name, e.g. `app-1`) to destination port `port`.
    pub fn is(&self, pod: &str, port: u16) -> bool {
        self.pod_name() == Some(pod) && self.destination_port() == Some(port)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
