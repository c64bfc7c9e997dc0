//! The gateway's configuration file: every key documented, defaulted and checked.
//!
//! Unknown keys are errors (a typo in a security control must not be silently ignored), and every
//! error names `file:line:column`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::yaml_file::{self, YamlFileError};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the gateway listens.
    #[serde(default)]
    pub listen: Listen,
    /// Directory of policy files (`*.yaml`, `*.yml`), read in name order.
    pub policy_dir: PathBuf,
    /// Where pod identities (IP → namespace, name, labels) come from.
    pub identity: Identity,
    /// Which pods' egress is intercepted.
    #[serde(default)]
    pub intercept: Intercept,
    /// The nftables table and routing the gateway installs.
    #[serde(default)]
    pub nftables: Nftables,
    /// The DNS shim.
    #[serde(default)]
    pub dns: Dns,
    /// Protocol peeking.
    #[serde(default)]
    pub peek: Peek,
    /// Allowed connections.
    #[serde(default)]
    pub connections: Connections,
    /// UDP other than DNS from pods under an enforce policy.
    #[serde(default)]
    pub udp: Udp,
    /// What outlives the process: the name table on disk, the live hand-over.
    #[serde(default)]
    pub state: State,
    /// The `observe` stream on the admin socket.
    #[serde(default)]
    pub observe: Observe,
    /// Verdict for pods that no policy selects.
    #[serde(default)]
    pub unselected_pods: UnselectedPods,
    /// Verdict for connections from addresses no pod is known to use (after
    /// `identity.unknownSourceWaitMs`): a pod that takes a second address must not leave its
    /// policies behind, so `deny` by default.
    #[serde(default = "UnselectedPods::deny")]
    pub unknown_sources: UnselectedPods,
}

/// Listen addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    /// Transparent TCP listeners that TPROXY sends pod connections to.
    #[serde(default = "Listen::default_tproxy")]
    pub tproxy: Vec<SocketAddr>,
    /// Transparent TCP listeners for connections to `intercept.clientFirstPorts`: the kernel
    /// hands each over with its first bytes (TCP_DEFER_ACCEPT), one wake-up instead of two.
    /// Default: each `tproxy` address on port 15002. Empty: those ports go to `tproxy` as
    /// every other.
    #[serde(default, rename = "clientFirstTproxy")]
    pub client_first_tproxy_set: Option<Vec<SocketAddr>>,
    /// Transparent DNS listeners (UDP and TCP) that TPROXY sends pod DNS to.
    #[serde(default = "Listen::default_dns")]
    pub dns: Vec<SocketAddr>,
    /// The admin endpoint (`/metrics`, `/healthz`, `/readyz`); loopback by default.
    #[serde(default = "Listen::default_admin")]
    pub admin: SocketAddr,
    /// Worker threads of the data path, each with its own socket on every `tproxy` and `dns`
    /// address and `udp.listen` (SO_REUSEPORT). Default: one per CPU the process may use.
    #[serde(default)]
    pub workers: Option<NonZeroUsize>,
}

impl Listen {
    fn default_tproxy() -> Vec<SocketAddr> {
        both_families(15001)
    }

    const CLIENT_FIRST_PORT: u16 = 15002;

    /// `clientFirstTproxy`, or its default: each `tproxy` address on port 15002.
    pub fn client_first_tproxy(&self) -> Vec<SocketAddr> {
        self.client_first_tproxy_set.clone().unwrap_or_else(|| {
            let on_port = |addr: &SocketAddr| SocketAddr::new(addr.ip(), Self::CLIENT_FIRST_PORT);
            self.tproxy.iter().map(on_port).collect()
        })
    }

    fn default_dns() -> Vec<SocketAddr> {
        both_families(15053)
    }

    fn default_admin() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 15090))
    }

    /// At most this many workers: more threads than any node has cores only cost memory.
    const MAX_WORKERS: usize = 1024;

    /// `workers`, or one per CPU this process may run on (its affinity mask and cgroup quota).
    pub fn worker_count(&self) -> NonZeroUsize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            tproxy: Self::default_tproxy(),
            client_first_tproxy_set: None,
            dns: Self::default_dns(),
            admin: Self::default_admin(),
            workers: None,
        }
    }
}

/// Whether binding both would share one port of one family (a wildcard covers every address).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv6() == b.is_ipv6()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn both_families(port: u16) -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::from(([0u16; 8], port)),
    ]
}

/// Identity source: exactly one of `staticFile` and `kubernetes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    /// A YAML file listing namespaces and pods (see README, "Identity"), reloaded on change.
    #[serde(default)]
    pub static_file: Option<PathBuf>,
    /// Watch the pods of this node and all namespaces through the Kubernetes API (in-cluster
    /// service account, or `$KUBECONFIG`).
    #[serde(default)]
    pub kubernetes: Option<KubernetesIdentity>,
    /// A connection from an address no pod is known to use waits up to this long for the
    /// identity source to learn it (a new pod can connect before its address is announced);
    /// after that it is an unknown source and follows `unselectedPods`.
    #[serde(default = "Identity::default_unknown_source_wait_ms")]
    pub unknown_source_wait_ms: u64,
}

impl Identity {
    fn default_unknown_source_wait_ms() -> u64 {
        2000
    }

    pub(crate) fn unknown_source_wait(&self) -> Duration {
        Duration::from_millis(self.unknown_source_wait_ms)
    }
}

/// The Kubernetes identity source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesIdentity {
    /// The node whose pods are watched; default: `$NODE_NAME` (set from the downward API).
    #[serde(default)]
    pub node_name: Option<String>,
}

impl KubernetesIdentity {
    /// The configured node name, else `$NODE_NAME`.
    pub(crate) fn node_name(&self) -> Option<String> {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|name| !name.is_empty())
    }
}

/// Which traffic is intercepted: packets arriving from a pod CIDR **or** a matching interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Intercept {
    /// Source ranges of pods on this node.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// Interface name patterns (nftables `iifname`, `*` as a trailing wildcard), e.g. `cali*`.
    #[serde(default)]
    pub interfaces: Vec<InterfacePattern>,
    /// Destinations never intercepted: cluster pod and service ranges, node-local services.
    #[serde(default)]
    pub bypass_cidrs: Vec<IpNet>,
    /// Reject UDP to port 443 (QUIC) from pods no enforce policy selects, so that clients fall
    /// back to TCP, where policy applies. (Pods under an enforce policy get UDP 443 only
    /// through a `udp` rule, whatever this says.)
    #[serde(default = "default_true")]
    pub block_quic: bool,
    /// Pods whose traffic is never intercepted, kept current from the identity source: the
    /// cluster DNS servers (their queries to the outside would otherwise come back to the shim,
    /// which asks them: a loop). Requires `nftables.manage`.
    #[serde(default)]
    pub exclude_pods: Vec<ExcludedPods>,
    /// Destination ports whose protocol has the client speak first (TLS, HTTP, PostgreSQL):
    /// their connections go to `listen.clientFirstTproxy`. A server-first protocol (SMTP,
    /// MySQL, FTP) on one of them would wait about a second for its greeting, so list none.
    #[serde(default = "Intercept::default_client_first_ports")]
    pub client_first_ports: Vec<u16>,
}

impl Intercept {
    fn default_client_first_ports() -> Vec<u16> {
        vec![80, 443, 5432, 8080, 8443]
    }
}

/// Pods of one namespace with all of some labels.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExcludedPods {
    pub namespace: String,
    #[serde(default)]
    pub match_labels: std::collections::BTreeMap<String, String>,
}

impl ExcludedPods {
    pub(crate) fn matches(&self, pod: &crate::identity::Pod) -> bool {
        pod.namespace == self.namespace
            && self
                .match_labels
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
    }
}

impl Default for Intercept {
    fn default() -> Self {
        Self {
            pod_cidrs: Vec::new(),
            interfaces: Vec::new(),
            bypass_cidrs: Vec::new(),
            block_quic: true,
            exclude_pods: Vec::new(),
            client_first_ports: Self::default_client_first_ports(),
        }
    }
}

/// An interface name, optionally ending in `*`: what nftables accepts in a quoted `iifname`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct InterfacePattern(String);

impl InterfacePattern {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InterfacePattern {
    type Error = String;

    fn try_from(pattern: String) -> Result<Self, Self::Error> {
        let stem = pattern.strip_suffix('*').unwrap_or(&pattern);
        // IFNAMSIZ is 16 including the NUL; the characters allowed keep the nft rule unquotable.
        let valid = !pattern.is_empty()
            && pattern.len() <= 15
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
        if valid {
            Ok(Self(pattern))
        } else {
            Err(format!(
                "invalid interface pattern {pattern:?}: up to 15 of [A-Za-z0-9-_.@], optionally ending in `*`"
            ))
        }
    }
}

/// nftables management.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Nftables {
    /// Install (and on every start, atomically replace) the gateway's table and routing rules.
    #[serde(default = "default_true")]
    pub manage: bool,
    /// Name of the `inet` table.
    #[serde(default = "Nftables::default_table")]
    pub table: String,
    /// Packet mark that routes intercepted packets to the local stack; pick one no CNI uses.
    #[serde(default = "Nftables::default_mark")]
    pub mark: u32,
    /// Routing table holding the `local` default route for marked packets.
    #[serde(default = "Nftables::default_route_table")]
    pub route_table: u32,
    /// The DaemonSet running this gateway. When set, the rules are removed at exit if it is
    /// gone or being deleted (uninstalled); otherwise (restart, rollout, eviction) they stay and
    /// egress fails closed. Needs API access (in-cluster or `$KUBECONFIG`).
    #[serde(default)]
    pub owner_daemon_set: Option<DaemonSetRef>,
}

/// A DaemonSet by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl Nftables {
    fn default_table() -> String {
        "egressgate".to_owned()
    }

    fn default_mark() -> u32 {
        0x6567 // "eg"
    }

    fn default_route_table() -> u32 {
        25447
    }
}

impl Default for Nftables {
    fn default() -> Self {
        Self {
            manage: true,
            table: Self::default_table(),
            mark: Self::default_mark(),
            route_table: Self::default_route_table(),
            owner_daemon_set: None,
        }
    }
}

/// The DNS shim.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dns {
    /// Trusted resolvers; empty = the nameservers of the node's /etc/resolv.conf.
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    /// What to do with a query a pod addressed to a server that is not a trusted upstream.
    #[serde(default)]
    pub foreign_servers: ForeignServers,
    /// How long to wait for a trusted upstream before trying the next one / answering SERVFAIL.
    #[serde(default = "Dns::default_upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    /// Recorded answers live at least this long, whatever their TTL.
    #[serde(default = "Dns::default_min_ttl_seconds")]
    pub min_ttl_seconds: u64,
    /// After the TTL, a record stays usable until it has not been used for this long.
    #[serde(default = "Dns::default_idle_grace_seconds")]
    pub idle_grace_seconds: u64,
    /// Most (destination, name) records kept per pod; the oldest is evicted first.
    #[serde(default = "Dns::default_max_names_per_pod")]
    pub max_names_per_pod: usize,
    /// Most records kept in all; past it, the oldest among the pods sharing the recording pod's
    /// shard of the table (1 of 32) are evicted first.
    #[serde(default = "Dns::default_max_names")]
    pub max_names: usize,
}

impl Dns {
    fn default_upstream_timeout_ms() -> u64 {
        2000
    }

    fn default_min_ttl_seconds() -> u64 {
        5
    }

    fn default_idle_grace_seconds() -> u64 {
        30
    }

    fn default_max_names_per_pod() -> usize {
        10_000
    }

    fn default_max_names() -> usize {
        1_000_000
    }

    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms)
    }
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            foreign_servers: ForeignServers::default(),
            upstream_timeout_ms: Self::default_upstream_timeout_ms(),
            min_ttl_seconds: Self::default_min_ttl_seconds(),
            idle_grace_seconds: Self::default_idle_grace_seconds(),
            max_names_per_pod: Self::default_max_names_per_pod(),
            max_names: Self::default_max_names(),
        }
    }
}

/// Queries addressed to a server other than a trusted upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ForeignServers {
    /// Answer them through the trusted upstreams, as the server the pod addressed.
    #[default]
    Forward,
    /// Answer REFUSED.
    Refuse,
}

/// Protocol peeking limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peek {
    /// A client that has not sent its whole first message by then is denied (`peek_timeout`).
    #[serde(default = "Peek::default_timeout_ms")]
    pub timeout_ms: u64,
    /// A first message larger than this is denied (`peek_too_large`).
    #[serde(default = "Peek::default_max_bytes")]
    pub max_bytes: usize,
    /// Deny TLS without SNI to name-based rules (`sni_missing`).
    #[serde(default = "default_true")]
    pub require_sni: bool,
    /// Connections waiting for their first message at once; more are reset (`peek_limit`).
    #[serde(default = "Peek::default_max_pending")]
    pub max_pending: usize,
    /// The same, per source address: one slow pod cannot use the whole budget.
    #[serde(default = "Peek::default_max_pending_per_pod")]
    pub max_pending_per_pod: usize,
}

impl Peek {
    fn default_timeout_ms() -> u64 {
        5000
    }

    fn default_max_bytes() -> usize {
        16 * 1024
    }

    fn default_max_pending() -> usize {
        4096
    }

    fn default_max_pending_per_pod() -> usize {
        256
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl Default for Peek {
    fn default() -> Self {
        Self {
            timeout_ms: Self::default_timeout_ms(),
            max_bytes: Self::default_max_bytes(),
            require_sni: true,
            max_pending: Self::default_max_pending(),
            max_pending_per_pod: Self::default_max_pending_per_pod(),
        }
    }
}

/// Allowed connections.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connections {
    /// A relayed connection on which no byte moved either way for this long is closed (both
    /// sides reset), so a silent peer cannot hold it forever.
    #[serde(default = "Connections::default_idle_timeout_seconds")]
    pub idle_timeout_seconds: u64,
    /// Connections open at once; more are reset (`connection_limit`), so a flood cannot exhaust
    /// the gateway's file descriptors or memory.
    #[serde(default = "Connections::default_max")]
    pub max: usize,
    /// On SIGTERM the gateway stops accepting and waits this long for open connections to end.
    #[serde(default = "Connections::default_shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
}

impl Connections {
    fn default_idle_timeout_seconds() -> u64 {
        3600
    }

    fn default_max() -> usize {
        65_536
    }

    fn default_shutdown_grace_seconds() -> u64 {
        30
    }

    pub(crate) fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_seconds)
    }
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            idle_timeout_seconds: Self::default_idle_timeout_seconds(),
            max: Self::default_max(),
            shutdown_grace_seconds: Self::default_shutdown_grace_seconds(),
        }
    }
}

/// The UDP relay: decides the first datagram of each flow (pod address, destination, port) from
/// a pod under an enforce policy; allowed flows then pass in the kernel (`udp_flows` sets).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Udp {
    /// Transparent UDP sockets that TPROXY sends undecided datagrams to (first of each family).
    #[serde(default = "Udp::default_listen")]
    pub listen: Vec<SocketAddr>,
    /// An allowed flow with no datagram from the pod for this long is forgotten (kernel set
    /// timeout): its next datagram is decided again.
    #[serde(default = "Udp::default_flow_idle_seconds")]
    pub flow_idle_seconds: u64,
    /// A denied flow's further datagrams are dropped without another decision line for this
    /// long, so a flood costs one line per flow.
    #[serde(default = "Udp::default_denied_flow_seconds")]
    pub denied_flow_seconds: u64,
    /// Flows remembered at once (allowed and denied, each; also the kernel sets' size). A new
    /// flow past it is dropped (`egressgate_udp_datagrams_dropped_total{reason="flow_limit"}`).
    #[serde(default = "Udp::default_max_flows")]
    pub max_flows: usize,
    /// The mark on the datagrams the relay sends for an allowed flow; an `output` rule adds
    /// their flow to `udp_flows`. Pick one no CNI uses, other than `nftables.mark`.
    #[serde(default = "Udp::default_flow_mark")]
    pub flow_mark: u32,
}

impl Udp {
    fn default_listen() -> Vec<SocketAddr> {
        both_families(15054)
    }

    fn default_flow_idle_seconds() -> u64 {
        60
    }

    fn default_denied_flow_seconds() -> u64 {
        10
    }

    fn default_max_flows() -> usize {
        65_536
    }

    fn default_flow_mark() -> u32 {
        0x6568 // "eh"
    }

    pub fn flow_idle(&self) -> Duration {
        Duration::from_secs(self.flow_idle_seconds)
    }

    pub fn denied_flow(&self) -> Duration {
        Duration::from_secs(self.denied_flow_seconds)
    }
}

impl Default for Udp {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
            flow_idle_seconds: Self::default_flow_idle_seconds(),
            denied_flow_seconds: Self::default_denied_flow_seconds(),
            max_flows: Self::default_max_flows(),
            flow_mark: Self::default_flow_mark(),
        }
    }
}

/// The state directory: the name journal and snapshot, and the hand-over socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct State {
    /// Kept across restarts (the chart mounts a hostPath here). Two gateways given the same
    /// directory hand over to each other: the one started later takes over.
    #[serde(default = "State::default_dir")]
    pub dir: PathBuf,
    /// How often the journal is compacted into a snapshot.
    #[serde(default = "State::default_snapshot_interval_seconds")]
    pub snapshot_interval_seconds: u64,
    /// What the old gateway does once it has handed over and its connections have ended (or
    /// the grace period passed): `exit`, or `wait` for SIGTERM (under a DaemonSet, which deletes
    /// the old pod itself and would restart a container that exits).
    #[serde(default)]
    pub after_handover: AfterHandover,
    /// After SIGTERM, keep serving up to this long for a successor to take over before
    /// stopping (0: stop at once). Under a DaemonSet the replacement of a deleted pod starts
    /// while the old one terminates: with a wait, it takes the sockets over and nothing is
    /// refused in between.
    #[serde(default)]
    pub successor_wait_seconds: u64,
}

impl State {
    pub(crate) fn default_dir() -> PathBuf {
        PathBuf::from("/var/lib/egressgate")
    }

    fn default_snapshot_interval_seconds() -> u64 {
        60
    }

    pub(crate) fn snapshot_interval(&self) -> Duration {
        Duration::from_secs(self.snapshot_interval_seconds)
    }

    pub(crate) fn successor_wait(&self) -> Duration {
        Duration::from_secs(self.successor_wait_seconds)
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: Self::default_dir(),
            snapshot_interval_seconds: Self::default_snapshot_interval_seconds(),
            after_handover: AfterHandover::default(),
            successor_wait_seconds: 0,
        }
    }
}

/// The `observe` bus: recent decision and DNS lines for `--since`, and live subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Observe {
    /// Lines kept for `observe --since` (0: none, and lines cost nothing while nobody observes).
    #[serde(default = "Observe::default_history")]
    pub history: usize,
    /// `observe` streams served at once; more are refused (503).
    #[serde(default = "Observe::default_max_subscribers")]
    pub max_subscribers: usize,
    /// Lines queued for one subscriber; past it, its lines are dropped and counted.
    #[serde(default = "Observe::default_queue_lines")]
    pub queue_lines: usize,
}

impl Observe {
    fn default_history() -> usize {
        2048
    }

    fn default_max_subscribers() -> usize {
        8
    }

    fn default_queue_lines() -> usize {
        1024
    }
}

impl Default for Observe {
    fn default() -> Self {
        Self {
            history: Self::default_history(),
            max_subscribers: Self::default_max_subscribers(),
            queue_lines: Self::default_queue_lines(),
        }
    }
}

/// See [`State::after_handover`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AfterHandover {
    #[default]
    Exit,
    Wait,
}

/// Verdict for connections that no policy can judge: from pods no policy selects
/// (`unselectedPods`), or from unknown addresses (`unknownSources`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UnselectedPods {
    #[default]
    Allow,
    Deny,
}

impl UnselectedPods {
    /// The default of `unknownSources`.
    pub(crate) fn deny() -> Self {
        UnselectedPods::Deny
    }
}

fn default_true() -> bool {
    true
}

/// Lines of `observe.history`, at most: about 500 bytes each, so 32 MiB.
const MAX_OBSERVE_HISTORY: usize = 65_536;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] YamlFileError),
    /// Parsed, but the values do not fit together.
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Config = yaml_file::load(path)?;
        config.checked(&path.display().to_string())
    }

    /// Parses configuration text; `file` labels errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: Config = yaml_file::parse(file, text)?;
        config.checked(file)
    }

    fn checked(self, file: &str) -> Result<Self, ConfigError> {
        self.check().map_err(|message| ConfigError::Invalid {
            file: file.to_owned(),
            message,
        })?;
        Ok(self)
    }

    /// Cross-field checks serde cannot express.
    fn check(&self) -> Result<(), String> {
        if self.identity.static_file.is_some() == self.identity.kubernetes.is_some() {
            return Err("identity: set exactly one of staticFile and kubernetes".into());
        }
        if self.listen.tproxy.is_empty() {
            return Err("listen.tproxy: at least one address is needed".into());
        }
        // SO_REUSEPORT would let the two share a port, each taking some of the connections.
        let taken = |addr: &&SocketAddr| {
            let others = self.listen.tproxy.iter().chain(&self.listen.dns);
            others.clone().any(|other| same_socket(*other, **addr))
        };
        if let Some(addr) = self.listen.client_first_tproxy().iter().find(taken) {
            return Err(format!(
                "listen.clientFirstTproxy: {addr} is also a tproxy or dns address"
            ));
        }
        if self.intercept.client_first_ports.contains(&0) {
            return Err("intercept.clientFirstPorts: 0 is no port".into());
        }
        if self
            .listen
            .workers
            .is_some_and(|workers| workers.get() > Listen::MAX_WORKERS)
        {
            return Err(format!("listen.workers: at most {}", Listen::MAX_WORKERS));
        }
        if self.peek.max_bytes < 64 {
            return Err("peek.maxBytes: must be at least 64".into());
        }
        if self.peek.timeout_ms == 0 || self.dns.upstream_timeout_ms == 0 {
            return Err("peek.timeoutMs and dns.upstreamTimeoutMs must be positive".into());
        }
        if self.connections.idle_timeout_seconds == 0 {
            return Err("connections.idleTimeoutSeconds must be positive".into());
        }
        if self.connections.max == 0
            || self.peek.max_pending == 0
            || self.peek.max_pending_per_pod == 0
        {
            return Err(
                "connections.max, peek.maxPending and peek.maxPendingPerPod must be positive"
                    .into(),
            );
        }
        if self.nftables.manage
            && self.intercept.pod_cidrs.is_empty()
            && self.intercept.interfaces.is_empty()
        {
            return Err(
                "intercept: name podCidrs or interfaces when nftables.manage is true".into(),
            );
        }
        let table = &self.nftables.table;
        let table_ok = !table.is_empty()
            && table.len() <= 64
            && table.starts_with(|c: char| c.is_ascii_alphabetic())
            && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !table_ok {
            // It goes into the nft script as written.
            return Err(format!(
                "nftables.table: {table:?} must be a letter then up to 63 of [A-Za-z0-9_]"
            ));
        }
        if !self.intercept.exclude_pods.is_empty() && !self.nftables.manage {
            return Err("intercept.excludePods needs nftables.manage: true".into());
        }
        if self.nftables.owner_daemon_set.is_some() && !self.nftables.manage {
            return Err("nftables.ownerDaemonSet needs nftables.manage: true".into());
        }
        if self.nftables.mark == 0 {
            return Err("nftables.mark: must not be 0".into());
        }
        if self.udp.flow_mark == 0 || self.udp.flow_mark == self.nftables.mark {
            return Err("udp.flowMark: must not be 0 nor nftables.mark".into());
        }
        if self.udp.flow_idle_seconds == 0
            || self.udp.denied_flow_seconds == 0
            || self.udp.max_flows == 0
        {
            return Err(
                "udp.flowIdleSeconds, udp.deniedFlowSeconds and udp.maxFlows must be positive"
                    .into(),
            );
        }
        if self.state.snapshot_interval_seconds == 0 {
            return Err("state.snapshotIntervalSeconds must be positive".into());
        }
        // Each stream holds one of the admin socket's connections; explain needs some too.
        let max_streams = crate::admin_socket::MAX_CONNECTIONS / 2;
        if !(1..=max_streams).contains(&self.observe.max_subscribers) {
            return Err(format!(
                "observe.maxSubscribers: must be 1 to {max_streams} (the admin socket serves {} \
                 connections)",
                crate::admin_socket::MAX_CONNECTIONS
            ));
        }
        if self.observe.queue_lines == 0 || self.observe.history > MAX_OBSERVE_HISTORY {
            return Err(format!(
                "observe.queueLines must be positive and observe.history at most \
                 {MAX_OBSERVE_HISTORY}"
            ));
        }
        Ok(())
    }

    /// The trusted upstreams, falling back to the node's resolv.conf.
    pub fn dns_upstreams(&self) -> Vec<SocketAddr> {
        if !self.dns.upstreams.is_empty() {
            return self.dns.upstreams.clone();
        }
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        resolv_conf_nameservers(&text)
    }
}

/// `nameserver` lines of a resolv.conf, on port 53.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "policyDir: /p\nidentity: {staticFile: /i}\nintercept: {interfaces: [\"egp*\"]}\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = Config::parse("c.yaml", MINIMAL).expect("valid");
        assert_eq!(config.listen.tproxy.len(), 2);
        assert_eq!(config.listen.admin.to_string(), "127.0.0.1:15090");
        assert_eq!(config.peek.max_bytes, 16384);
        assert_eq!(config.peek.timeout(), Duration::from_secs(5));
        assert!(config.peek.require_sni);
        assert_eq!(config.unselected_pods, UnselectedPods::Allow);
        assert_eq!(config.unknown_sources, UnselectedPods::Deny);
        assert_eq!(config.dns.foreign_servers, ForeignServers::Forward);
        assert!(config.nftables.manage);
        assert_eq!(config.udp.listen.len(), 2);
        assert_eq!(config.udp.flow_idle(), Duration::from_secs(60));
        assert_eq!(config.udp.denied_flow(), Duration::from_secs(10));
        assert_eq!(config.udp.max_flows, 65_536);
        assert_eq!(config.udp.flow_mark, 0x6568);
    }

    #[test]
    fn workers_default_to_the_cpus_available_and_are_bounded() {
        let config = Config::parse("c.yaml", MINIMAL).expect("valid");
        let cpus = std::thread::available_parallelism().expect("cpus");
        assert_eq!(config.listen.worker_count(), cpus);
        let text = format!("{MINIMAL}listen: {{workers: 3}}\n");
        let config = Config::parse("c.yaml", &text).expect("valid");
        assert_eq!(config.listen.worker_count().get(), 3);
        for bad in ["listen: {workers: 0}", "listen: {workers: 1025}"] {
            let text = format!("{MINIMAL}{bad}\n");
            let shown = Config::parse("c.yaml", &text).expect_err(bad).to_string();
            assert!(shown.contains("listen.workers"), "{bad}: {shown}");
        }
    }

    #[test]
    fn client_first_listeners_have_ports_of_their_own() {
        let config = Config::parse("c.yaml", MINIMAL).expect("valid");
        let client_first: Vec<String> = (config.listen.client_first_tproxy().iter())
            .map(ToString::to_string)
            .collect();
        assert_eq!(client_first, ["0.0.0.0:15002", "[::]:15002"]);
        assert_eq!(
            config.intercept.client_first_ports,
            [80, 443, 5432, 8080, 8443]
        );
        let base = "policyDir: /p\nidentity: {staticFile: /i}\n";
        for bad in [
            "listen: {clientFirstTproxy: [\"127.0.0.1:15001\"]}\nintercept: {interfaces: [egp0]}",
            "listen: {clientFirstTproxy: [\"[::]:15053\"]}\nintercept: {interfaces: [egp0]}",
            "intercept: {interfaces: [egp0], clientFirstPorts: [443, 0]}",
            "listen: {tproxy: [\"127.0.0.1:15002\"]}\nintercept: {interfaces: [egp0]}",
        ] {
            let text = format!("{base}{bad}\n");
            let shown = Config::parse("c.yaml", &text).expect_err(bad).to_string();
            assert!(shown.contains("clientFirst"), "{bad}: {shown}");
        }
        let text = format!(
            "{base}listen: {{clientFirstTproxy: [\"127.0.0.1:15001\"], tproxy: [\"127.0.0.2:15001\"]}}\n\
             intercept: {{interfaces: [egp0], clientFirstPorts: []}}\n"
        );
        let config = Config::parse("c.yaml", &text).expect("another address, same port");
        assert!(config.intercept.client_first_ports.is_empty());
    }

    #[test]
    fn the_udp_flow_mark_must_differ_from_the_interception_mark() {
        for bad in [
            "udp: {flowMark: 0}",
            "udp: {flowMark: 0x6567}",
            "udp: {maxFlows: 0}",
        ] {
            let text = format!("{MINIMAL}{bad}\n");
            let shown = Config::parse("c.yaml", &text).expect_err(bad).to_string();
            assert!(shown.contains("udp."), "{bad}: {shown}");
        }
        let text = format!("{MINIMAL}udp: {{flowMark: 0x10, flowIdleSeconds: 5}}\n");
        let config = Config::parse("c.yaml", &text).expect("valid");
        assert_eq!(config.udp.flow_idle(), Duration::from_secs(5));
    }

    #[test]
    fn unknown_key_is_rejected_with_position() {
        let text = format!("{MINIMAL}peek:\n  timeoutMS: 10\n");
        let err = Config::parse("c.yaml", &text).expect_err("unknown key");
        let shown = err.to_string();
        assert!(shown.starts_with("c.yaml:5:3: "), "{shown}");
        assert!(shown.contains("unknown field `timeoutMS`"), "{shown}");
    }

    #[test]
    fn bad_values_are_rejected_with_position() {
        let text = format!("{MINIMAL}unselectedPods: maybe\n");
        let shown = Config::parse("c.yaml", &text).expect_err("bad").to_string();
        assert!(shown.starts_with("c.yaml:4:17: "), "{shown}");

        let text =
            "policyDir: /p\nidentity: {staticFile: /i}\nintercept: {interfaces: [\"bad name\"]}\n";
        let shown = Config::parse("c.yaml", text).expect_err("bad").to_string();
        assert!(shown.contains("invalid interface pattern"), "{shown}");
        assert!(shown.starts_with("c.yaml:3:"), "{shown}");
    }

    #[test]
    fn managed_nftables_needs_something_to_intercept() {
        let shown = Config::parse("c.yaml", "policyDir: /p\nidentity: {staticFile: /i}\n")
            .expect_err("nothing intercepted")
            .to_string();
        assert!(shown.contains("intercept"), "{shown}");
    }

    #[test]
    fn nft_table_name_must_be_safe_to_write_into_the_script() {
        let text = format!("{MINIMAL}nftables: {{table: \"x; flush ruleset\"}}\n");
        let shown = Config::parse("c.yaml", &text).expect_err("bad").to_string();
        assert!(shown.contains("nftables.table"), "{shown}");
        let text = format!("{MINIMAL}nftables: {{table: egress_2}}\n");
        assert!(Config::parse("c.yaml", &text).is_ok());
    }

    #[test]
    fn identity_source_is_exactly_one() {
        let both = "policyDir: /p\nidentity: {staticFile: /i, kubernetes: {}}\nnftables: {manage: false}\n";
        let shown = Config::parse("c.yaml", both).expect_err("both").to_string();
        assert!(shown.contains("exactly one"), "{shown}");
        let none = "policyDir: /p\nidentity: {}\nnftables: {manage: false}\n";
        assert!(Config::parse("c.yaml", none).is_err());
        let kube =
            "policyDir: /p\nidentity: {kubernetes: {nodeName: n1}}\nnftables: {manage: false}\n";
        let config = Config::parse("c.yaml", kube).expect("valid");
        let node = config.identity.kubernetes.and_then(|k| k.node_name());
        assert_eq!(node.as_deref(), Some("n1"));
    }

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let text = "search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n";
        let servers = resolv_conf_nameservers(text);
        assert_eq!(
            servers,
            vec![
                "10.96.0.10:53".parse().expect("addr"),
                "[fd00::a]:53".parse().expect("addr")
            ]
        );
    }
}
