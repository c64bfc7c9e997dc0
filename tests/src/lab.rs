//! The lab: a `node` namespace running the gateway, pod namespaces behind `egp*` veths and an
//! `up` namespace with the upstream services. Built with [`Lab::builder`]; dropping the lab
//! stops every process, deletes every namespace and `/etc/netns` directory, and removes its
//! temporary directory, also when a test panics (after dumping the gateway's output). Set
//! `EGRESSGATE_LAB_KEEP=1` to keep the directory (configs and every process's output).
//!
//! ```text
//!  pod-a 198.18.1.2/30 fd00:1::2 ──egpa─┐
//!                                       node (egressgate, ip_forward) ──uplink── up 198.19.0.2/24
//!  pod-b 198.18.2.2/30 fd00:2::2 ──egpb─┘    198.19.0.1 fd00:99::1        .53 .66 .10 .20 fd00:99::10
//! ```

use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use tempfile::TempDir;

use crate::addr;
use crate::daemon::Daemon;
use crate::error::{LabError, Result};
use crate::gateway::{egressgate_bin, Gateway, GatewayOptions};
use crate::kube::KubeApi;
use crate::netns::{host, pids_in, tail, Netns};
use crate::services::{self, Certs, Postgres};

/// Most pods a lab can have (addresses 198.18.1.0/30 … 198.18.4.0/30).
pub const MAX_PODS: usize = 4;
const POD_LETTERS: [&str; MAX_PODS] = ["a", "b", "c", "d"];

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

/// What to start; see [`Lab::builder`].
#[derive(Debug, Clone)]
pub struct LabBuilder {
    pods: usize,
    dns: bool,
    web: bool,
    postgres: bool,
    k8s_search: bool,
    kube_api: bool,
    gateway: Option<GatewayOptions>,
}

impl LabBuilder {
    /// Number of pod namespaces (1..=4): "a" is shop/app-1 (role=app), "b" is shop/batch-1
    /// (role=batch), "c"/"d" are shop/pod-c, shop/pod-d (role=other).
    pub fn pods(mut self, count: usize) -> Self {
        self.pods = count;
        self
    }

    /// The trusted (198.19.0.53) and rogue (198.19.0.66) dnsmasq.
    pub fn dns(mut self) -> Self {
        self.dns = true;
        self
    }

    /// nginx on 198.19.0.10 / fd00:99::10, ports 80 and 443.
    pub fn web(mut self) -> Self {
        self.web = true;
        self
    }

    /// PostgreSQL on 198.19.0.20:5432.
    pub fn postgres(mut self) -> Self {
        self.postgres = true;
        self
    }

    /// dns + web + postgres.
    pub fn all_services(self) -> Self {
        self.dns().web().postgres()
    }

    /// Pods' resolv.conf gets Kubernetes' search list and `options ndots:5`, as glibc sees it
    /// in a real pod.
    pub fn k8s_resolv_conf(mut self) -> Self {
        self.k8s_search = true;
        self
    }

    /// A real Kubernetes API server (etcd + kube-apiserver, [`KubeApi`]) on the node
    /// namespace's loopback, started before the gateway, with the lab's namespace `shop`
    /// (`team=shop`) and its pods as Pod objects bound to [`crate::kube::NODE_NAME`]. A gateway
    /// whose options name `kubernetes_node` gets `KUBECONFIG` for the `egressgate` account.
    pub fn kube_api(mut self) -> Self {
        self.kube_api = true;
        self
    }

    /// Runs the gateway with these options in the node namespace.
    pub fn gateway(mut self, options: GatewayOptions) -> Self {
        self.gateway = Some(options);
        self
    }

    /// Plain routing through the node, no gateway (the lab's self-check).
    pub fn without_gateway(mut self) -> Self {
        self.gateway = None;
        self
    }

    /// Builds the lab. On error, whatever was created is removed again.
    pub fn start(self) -> Result<Lab> {
        if self.pods == 0 || self.pods > MAX_PODS {
            return Err(LabError::new(format!("pods must be 1..={MAX_PODS}")));
        }
        SWEEP.call_once(sweep_stale_namespaces);
        let prefix = format!(
            "eg{}-{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()?;
        // postgres runs as user postgres and must reach its data directory inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let mut lab = Lab {
            prefix,
            gateway: None,
            gateway_env: Vec::new(),
            kube: None,
            postgres: None,
            daemons: Vec::new(),
            pods: Vec::new(),
            node: None,
            up: None,
            certs: None,
            rogue_log: dir.path().join("dnsmasq-rogue.log"),
            dir: Some(dir),
        };
        lab.build(&self)?;
        Ok(lab)
    }
}

/// A running lab; see the module docs.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    gateway: Option<Gateway>,
    /// Environment the lab's gateway processes get (`KUBECONFIG` with `kube_api()`).
    gateway_env: Vec<(String, String)>,
    kube: Option<KubeApi>,
    postgres: Option<Postgres>,
    daemons: Vec<Daemon>,
    pods: Vec<Pod>,
    node: Option<Netns>,
    up: Option<Netns>,
    certs: Option<Certs>,
    rogue_log: PathBuf,
    /// `None` only while dropping a lab kept for debugging (`EGRESSGATE_LAB_KEEP`).
    dir: Option<TempDir>,
}

/// A pod namespace and its identity.
#[derive(Debug)]
pub struct Pod {
    /// "a", "b", ...
    pub letter: String,
    /// Kubernetes name (`app-1`, `batch-1`, ...), as in decision lines' `pod.name`.
    pub name: String,
    pub namespace: String,
    pub role: String,
    pub ipv4: String,
    pub ipv6: String,
    ns: Netns,
}

impl Deref for Pod {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            pods: 2,
            dns: false,
            web: false,
            postgres: false,
            k8s_search: false,
            kube_api: false,
            gateway: None,
        }
    }

    /// The unique prefix of this lab's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's temporary directory (configs, logs, certificate).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("lab directory exists while the lab runs")
            .path()
    }

    /// Pod "a", "b", ... Panics on a pod the lab does not have.
    pub fn pod(&self, letter: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.letter == letter)
            .unwrap_or_else(|| panic!("lab has no pod {letter:?}"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn node(&self) -> &Netns {
        self.node
            .as_ref()
            .expect("node namespace exists while the lab runs")
    }

    pub fn up(&self) -> &Netns {
        self.up
            .as_ref()
            .expect("up namespace exists while the lab runs")
    }

    /// The gateway. Panics for a lab built `without_gateway()`.
    pub fn gateway(&self) -> &Gateway {
        self.gateway
            .as_ref()
            .expect("lab was built without a gateway")
    }

    /// The certificate every upstream serves; pass it to clients as the CA (`--cacert`).
    pub fn ca_cert(&self) -> &Path {
        &self
            .certs
            .as_ref()
            .expect("certificate exists while the lab runs")
            .cert
    }

    /// [`Lab::ca_cert`] as a string, for command lines.
    pub fn ca(&self) -> String {
        self.ca_cert().display().to_string()
    }

    /// Queries the rogue DNS server logged (dnsmasq `query[...]` lines).
    pub fn rogue_dns_queries(&self) -> Vec<String> {
        std::fs::read_to_string(&self.rogue_log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("query["))
            .map(str::to_owned)
            .collect()
    }

    /// The trusted dnsmasq's log (queries included).
    pub fn trusted_dns_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("dnsmasq-trusted.log")).unwrap_or_default()
    }

    fn build(&mut self, spec: &LabBuilder) -> Result<()> {
        let dir = self.dir().to_path_buf();
        self.certs = Some(Certs::generate(&dir.join("certs"))?);
        self.build_topology(spec)?;
        let up = self.up();
        if spec.dns {
            let trusted = services::start_trusted_dns(up, &dir)?;
            self.daemons.push(trusted);
            let rogue = services::start_rogue_dns(self.up(), &dir, &self.rogue_log)?;
            self.daemons.push(rogue);
        }
        if spec.web {
            let certs = self
                .certs
                .clone()
                .ok_or_else(|| LabError::new("no certs"))?;
            let web = services::start_web(self.up(), &dir, &certs)?;
            self.daemons.push(web);
        }
        if spec.postgres {
            let certs = self
                .certs
                .clone()
                .ok_or_else(|| LabError::new("no certs"))?;
            self.postgres = Some(Postgres::start(self.up(), &dir, &certs)?);
        }
        let mut gateway_env = Vec::new();
        if spec.kube_api {
            let kube = KubeApi::start(self.node(), &dir)?;
            kube.create_namespace("shop", &["team=shop"])?;
            for pod in &self.pods {
                let role = format!("role={}", pod.role);
                kube.create_pod(&pod.namespace, &pod.name, &[&role], &[&pod.ipv4, &pod.ipv6])?;
            }
            let kubeconfig = kube.gateway_kubeconfig()?;
            gateway_env.push(("KUBECONFIG".to_owned(), kubeconfig.display().to_string()));
            self.kube = Some(kube);
        }
        if let Some(options) = &spec.gateway {
            let bin = egressgate_bin()?;
            let policy_dir = dir.join("policies");
            std::fs::create_dir_all(&policy_dir)?;
            for (file, text) in &options.policies {
                std::fs::write(policy_dir.join(file), text)?;
            }
            // In a directory of its own, as a ConfigMap volume would be: the gateway watches
            // it, and the busy log files in `dir` would wake that watch on every line.
            let identity = self.identity_file();
            if let Some(identity_dir) = identity.parent() {
                std::fs::create_dir_all(identity_dir)?;
            }
            let identity_text = match &options.identity_override {
                Some(text) => text.clone(),
                None => self.identity_yaml(),
            };
            std::fs::write(&identity, identity_text)?;
            let config = dir.join("gateway.yaml");
            std::fs::write(
                &config,
                options.config_yaml(&policy_dir, &identity, &self.state_dir())?,
            )?;
            self.gateway_env = gateway_env
                .into_iter()
                .chain(options.env.iter().cloned())
                .collect();
            self.gateway = Some(Gateway::start(
                self.node(),
                bin,
                config,
                &self.gateway_env,
                &dir,
            )?);
        }
        Ok(())
    }

    fn build_topology(&mut self, spec: &LabBuilder) -> Result<()> {
        let node = Netns::create(&format!("{}-node", self.prefix))?;
        node.exec_ok(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        self.node = Some(node);
        let up = Netns::create(&format!("{}-up", self.prefix))?;
        self.up = Some(up);

        let (node, up) = (self.node(), self.up());
        node.ip(&[
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            up.name(),
        ])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", addr::NODE_UP),
            "dev",
            "uplink",
        ])?;
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", addr::NODE_UP6),
            "dev",
            "uplink",
            "nodad",
        ])?;
        node.ip(&["link", "set", "uplink", "up"])?;
        up.ip(&["addr", "add", &format!("{}/24", addr::UP), "dev", "eth0"])?;
        for extra in [addr::TRUSTED_DNS, addr::ROGUE_DNS, addr::WEB, addr::DB] {
            up.ip(&["addr", "add", &format!("{extra}/32"), "dev", "eth0"])?;
        }
        for extra in [addr::UP6, addr::WEB6] {
            up.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{extra}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        up.ip(&["link", "set", "eth0", "up"])?;
        up.ip(&["route", "add", "default", "via", addr::NODE_UP])?;
        up.ip(&["-6", "route", "add", "default", "via", addr::NODE_UP6])?;

        for (index, letter) in POD_LETTERS.iter().enumerate().take(spec.pods) {
            let pod = self.build_pod(index, letter, spec.k8s_search)?;
            self.pods.push(pod);
        }
        Ok(())
    }

    fn build_pod(&self, index: usize, letter: &str, k8s_search: bool) -> Result<Pod> {
        let (ipv4, gw4, ipv6, gw6) = addr::pod_addrs(index);
        let mut ns = Netns::create(&format!("{}-p{letter}", self.prefix))?;
        let mut resolv = format!("nameserver {}\n", addr::TRUSTED_DNS);
        if k8s_search {
            resolv.push_str(
                "search default.svc.cluster.local svc.cluster.local cluster.local\n\
                 options ndots:5\n",
            );
        }
        ns.set_resolv_conf(&resolv)?;
        let node = self.node();
        let veth = format!("egp{letter}");
        node.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.ip(&["addr", "add", &format!("{gw4}/30"), "dev", &veth])?;
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{gw6}/64"),
            "dev",
            &veth,
            "nodad",
        ])?;
        node.ip(&["link", "set", &veth, "up"])?;
        ns.ip(&["addr", "add", &format!("{ipv4}/30"), "dev", "eth0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ipv6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw4])?;
        ns.ip(&["-6", "route", "add", "default", "via", &gw6])?;
        let (name, role) = match letter {
            "a" => ("app-1".to_owned(), "app"),
            "b" => ("batch-1".to_owned(), "batch"),
            other => (format!("pod-{other}"), "other"),
        };
        Ok(Pod {
            letter: letter.to_owned(),
            name,
            namespace: "shop".to_owned(),
            role: role.to_owned(),
            ipv4,
            ipv6,
            ns,
        })
    }

    /// The static identity file (README, "Identity") for this lab's pods.
    pub fn identity_yaml(&self) -> String {
        let mut text = String::from(
            "# written by egressgate-lab\nnamespaces:\n  - name: shop\n    labels: {team: shop}\npods:\n",
        );
        for pod in &self.pods {
            text.push_str(&format!(
                "  - name: {}\n    namespace: {}\n    ips: [\"{}\", \"{}\"]\n    labels: {{role: {}}}\n",
                pod.name, pod.namespace, pod.ipv4, pod.ipv6, pod.role
            ));
        }
        text
    }

    /// Paths for the lab's gateway config and policies (also when it has no gateway).
    pub fn gateway_config_path(&self) -> PathBuf {
        self.dir().join("gateway.yaml")
    }

    /// The gateway's static identity file: tests rewrite it to exercise identity reloads.
    pub fn identity_file(&self) -> PathBuf {
        self.dir().join("identity/pods.yaml")
    }

    /// The gateway's `state.dir`: the name journal and snapshot, the hand-over socket.
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// Starts another `egressgate run` with the lab's config, logging as `name`: with the
    /// first one still running it takes over; after it stopped, it restarts from the state.
    pub fn start_gateway_process(&self, name: &str) -> Result<Gateway> {
        self.start_gateway_process_with(name, &self.gateway_env)
    }

    /// [`Lab::start_gateway_process`] with `env` instead of the lab's gateway environment.
    pub fn start_gateway_process_with(
        &self,
        name: &str,
        env: &[(String, String)],
    ) -> Result<Gateway> {
        Gateway::start_named(
            self.node(),
            egressgate_bin()?,
            self.gateway_config_path(),
            env,
            self.dir(),
            name,
        )
    }

    /// Makes `gateway` the lab's gateway; returns the one it replaces.
    pub fn replace_gateway(&mut self, gateway: Gateway) -> Option<Gateway> {
        self.gateway.replace(gateway)
    }

    /// The lab's Kubernetes API server. Panics for a lab built without `kube_api()`.
    pub fn kube(&self) -> &KubeApi {
        self.kube
            .as_ref()
            .expect("lab was built without kube_api()")
    }

    pub fn kube_mut(&mut self) -> &mut KubeApi {
        self.kube
            .as_mut()
            .expect("lab was built without kube_api()")
    }

    /// Takes the lab's gateway out (to stop or kill it).
    pub fn take_gateway(&mut self) -> Option<Gateway> {
        self.gateway.take()
    }

    /// The gateway's `policyDir`: tests write files here to exercise reloads.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir().join("policies")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "egressgate-lab: lab {} torn down after a failure; trusted DNS log:\n{}",
                self.prefix,
                tail(&self.trusted_dns_log(), 30)
            );
        }
        // Processes first (the gateway dumps its output if panicking), then namespaces.
        self.gateway.take();
        self.kube.take();
        self.postgres.take();
        self.daemons.clear();
        self.pods.clear();
        self.node.take();
        self.up.take();
        if std::env::var_os("EGRESSGATE_LAB_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("egressgate-lab: kept {}", dir.keep().display());
            }
        }
    }
}

/// Removes namespaces left by a lab whose process died without dropping it (`eg<pid>-<n>-…`
/// with no such pid), killing what still runs in them.
fn sweep_stale_namespaces() {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return;
    };
    let me = std::process::id();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = stale_owner(name) else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for leftover in pids_in(name) {
            let _ = host(&["kill", "-s", "KILL", &leftover.to_string()]);
        }
        let _ = host(&["ip", "netns", "del", name]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
    }
}

/// The owning pid of a lab namespace name `eg<pid>-<n>-<role>`.
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("eg")?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let counter = parts.next()?;
    let role = parts.next()?;
    let known = ["node", "up", "pa", "pb", "pc", "pd"].contains(&role);
    (counter.bytes().all(|b| b.is_ascii_digit()) && known).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::stale_owner;

    #[test]
    fn stale_owner_reads_only_lab_namespace_names() {
        assert_eq!(stale_owner("eg123-0-node"), Some(123));
        assert_eq!(stale_owner("eg7-12-pb"), Some(7));
        assert_eq!(stale_owner("eg123-0-other"), None);
        assert_eq!(stale_owner("egress-0-node"), None);
        assert_eq!(stale_owner("cni-1234"), None);
    }
}
