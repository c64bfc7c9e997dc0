//! The bench environment: one lab (four pods, the real gateway, the `up` namespace with this
//! crate's upstream server), plus HAProxy and nginx in the node namespace. Each path under test
//! has its own pod, so every path exists at once and rounds can be interleaved:
//!
//! | path        | pod | how its TCP reaches the upstream                                      |
//! |-------------|-----|-----------------------------------------------------------------------|
//! | direct      | a   | routed by the node (ip_forward), no interception                      |
//! | egressgate  | b   | the gateway's own nftables TPROXY rules (`interfaces: [egpb]`), DNS via its shim |
//! | haproxy     | c   | this crate's nftables TPROXY table → HAProxy `bind … transparent`, `server 0.0.0.0` (original destination) |
//! | nginx       | d   | explicit: the client connects to the node (198.18.4.1); nginx `stream` proxies to the fixed upstream |
//! | baseline    | b   | another egressgate build (`--baseline-bin`), in egressgate's place: the two take turns, swapped before each sample |
//!
//! nginx cannot be transparent here: its `listen` has no IP_TRANSPARENT option, and TPROXY only
//! delivers to transparent sockets. Everything is removed on drop (the lab deletes the
//! namespaces, with our nftables table and routing inside them).

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use egressgate_lab::daemon::Daemon;
use egressgate_lab::gateway::Gateway;
use egressgate_lab::{addr, GatewayOptions, Lab, Netns};
use serde::{Deserialize, Serialize};

use crate::server::{BULK_PORT, HOLD_PORTS, HTTP_PORT, TLS_PORT, UDP_ECHO_PORT};
use crate::{progress, Error};

/// A path under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Egressgate,
    Haproxy,
    Nginx,
    /// Another egressgate build, for A/B runs against the current one.
    Baseline,
}

impl PathKind {
    /// The paths measured when none are named (the baseline too when it is given).
    pub const ALL: [PathKind; 4] = [
        PathKind::Direct,
        PathKind::Egressgate,
        PathKind::Haproxy,
        PathKind::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Egressgate => "egressgate",
            PathKind::Haproxy => "haproxy",
            PathKind::Nginx => "nginx",
            PathKind::Baseline => "baseline",
        }
    }

    pub fn parse(s: &str) -> Option<PathKind> {
        PathKind::ALL
            .into_iter()
            .chain([PathKind::Baseline])
            .find(|p| p.name() == s)
    }

    /// An egressgate build: served to pod b by [`Env::serve`].
    pub fn is_egressgate(self) -> bool {
        matches!(self, PathKind::Egressgate | PathKind::Baseline)
    }

    fn pod(self) -> &'static str {
        match self {
            PathKind::Direct => "a",
            PathKind::Egressgate | PathKind::Baseline => "b",
            PathKind::Haproxy => "c",
            PathKind::Nginx => "d",
        }
    }

    /// One line for the report.
    pub fn describe(self) -> &'static str {
        match self {
            PathKind::Direct => "no interception: pod → node (forwarding) → upstream",
            PathKind::Egressgate => {
                "egressgate via its own nftables TPROXY rules (the TLS and HTTP ports are `intercept.clientFirstPorts`: accepted with their first bytes); peeks SNI (on the HTTP port: every request's Host), decides by the names the pod resolved (DNS through the shim), splices"
            }
            PathKind::Haproxy => {
                "HAProxy `mode tcp`, transparent (nftables TPROXY → `bind … transparent`, `server 0.0.0.0` = original destination), `req.ssl_sni` ACL, nbthread 1; the HTTP port `mode http` with a Host ACL"
            }
            PathKind::Nginx => {
                "nginx `stream` with `ssl_preread` (SNI map), one worker; the HTTP port an `http` proxy for the API name only (upstream kept alive); explicit destination (the client connects to the node), since nginx cannot listen transparently"
            }
            PathKind::Baseline => {
                "another egressgate build (`--baseline-bin`) in egressgate's place: same pod, config and policy (its own state directory); the harness stops one and starts the other before each sample"
            }
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The node's address on pod d's link: where nginx listens.
const NGINX_LISTEN: &str = "198.18.4.1";
/// Not 15002: egressgate's client-first listener has it.
const HAPROXY_PORT: u16 = 15012;
/// HAProxy's HTTP-mode frontend, where the plain HTTP port's connections are sent.
const HAPROXY_HTTP_PORT: u16 = 15013;
/// nftables mark and routing table of the HAProxy interception (the gateway uses its own).
const HAPROXY_MARK: u32 = 0x4c54;
const HAPROXY_TABLE: u32 = 204;

/// CPU placement: the proxy under test on one core, everything else on the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placement {
    pub load_cpu: usize,
    pub proxy_cpu: usize,
    pub text: String,
}

impl Placement {
    pub fn detect() -> Placement {
        let cpus = crate::cpus();
        let (load_cpu, proxy_cpu) = if cpus >= 2 { (0, 1) } else { (0, 0) };
        let text = format!(
            "CPU {proxy_cpu}: the proxy under test (every egressgate thread via `taskset -a`, with one \
             worker: `listen.workers: 1`; HAProxy nbthread 1; \
             nginx one worker). CPU {load_cpu}: the load generator, the upstream server (TCP/TLS/DNS), dnsperf and \
             the harness. The direct path's forwarding runs in softirq on the sending CPU, i.e. CPU {load_cpu}; \
             a proxy's own work runs on CPU {proxy_cpu}."
        );
        Placement {
            load_cpu,
            proxy_cpu,
            text,
        }
    }
}

/// What the harness found of the peers.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    pub haproxy: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    /// `load_module` line for the stream module, when nginx has it as a dynamic module.
    pub nginx_stream_module: Option<String>,
    pub dnsperf: bool,
}

impl Peers {
    /// Finds haproxy, nginx with the stream module and dnsperf; installs what is missing from
    /// Debian when `install` (root, apt-get).
    pub fn find(install: bool) -> Peers {
        let mut peers = Peers::probe();
        let missing: Vec<&str> = [
            (peers.haproxy.is_none(), "haproxy"),
            (peers.nginx_stream_module.is_none(), "libnginx-mod-stream"),
            (!peers.dnsperf, "dnsperf"),
        ]
        .into_iter()
        .filter_map(|(missing, package)| missing.then_some(package))
        .collect();
        if !missing.is_empty() && install {
            progress(&format!(
                "installing {} from Debian (apt-get; --no-install to skip)",
                missing.join(" ")
            ));
            let ok = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("apt-get")
                    .args(["update", "-qq"])
                    .stdin(Stdio::null())
                    .status();
                let _ = Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(Stdio::null())
                    .status();
            }
            peers = Peers::probe();
        }
        peers
    }

    fn probe() -> Peers {
        let haproxy = which("haproxy");
        let nginx = which("nginx");
        let nginx_stream_module = nginx.as_ref().and_then(|nginx| {
            let out = Command::new(nginx).arg("-V").output().ok()?;
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            if text.contains("--with-stream ") || text.ends_with("--with-stream") {
                return Some(String::new()); // built in
            }
            ["/usr/lib/nginx/modules", "/usr/share/nginx/modules"]
                .iter()
                .map(|dir| Path::new(dir).join("ngx_stream_module.so"))
                .find(|path| path.is_file())
                .map(|path| format!("load_module {};\n", path.display()))
        });
        Peers {
            haproxy,
            nginx,
            nginx_stream_module,
            dnsperf: which("dnsperf").is_some(),
        }
    }
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The running environment. Field order is drop order: peers and server before the lab.
#[derive(Debug)]
pub struct Env {
    haproxy: Option<Daemon>,
    nginx: Option<Daemon>,
    server: Daemon,
    /// Before `lab`, so that it stops before the lab's namespaces go.
    serving: Mutex<Serving>,
    baseline: Option<Baseline>,
    /// Where every gateway process is pinned, and what it has in its environment.
    gateway_cpus: String,
    gateway_env: Vec<(String, String)>,
    pub lab: Lab,
    pub exe: PathBuf,
    pub paths: Vec<PathKind>,
    /// Paths that could not be set up, and why.
    pub skipped: Vec<(PathKind, String)>,
    pub placement: Placement,
    pub peers: Peers,
    pub certs: Certs,
    /// RLIMIT_NOFILE every process of the lab has (hard limit; soft raised to it).
    pub nofile: u64,
    _cpu_awake: CpuAwake,
}

/// The egressgate process serving pod b, and which build it is.
#[derive(Debug)]
struct Serving {
    path: PathKind,
    gateway: Gateway,
    /// Processes started so far (their log names).
    started: usize,
}

/// The build of the `baseline` path and its config file.
#[derive(Debug)]
struct Baseline {
    bin: PathBuf,
    config: PathBuf,
}

/// Keeps idle CPUs out of sleep states while held, through the PM QoS interface
/// (/dev/cpu_dma_latency = 0, as tuned's latency-performance profile does). In a VM an idle
/// vCPU otherwise halts, and waking it costs a hypervisor exit (~70 µs here) at every hand-off
/// between the load CPU and the proxy CPU: that would swamp every proxy's latency.
#[derive(Debug)]
pub(crate) struct CpuAwake {
    held: Result<std::fs::File, String>,
}

impl CpuAwake {
    pub(crate) fn hold() -> CpuAwake {
        let held = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .and_then(|mut file| {
                std::io::Write::write_all(&mut file, &0i32.to_ne_bytes())?;
                Ok(file)
            })
            .map_err(|e| e.to_string());
        if let Err(e) = &held {
            progress(&format!(
                "cannot hold /dev/cpu_dma_latency at 0 ({e}): latencies include CPU wake-ups"
            ));
        }
        CpuAwake { held }
    }

    pub(crate) fn describe(&self) -> String {
        match &self.held {
            Ok(_) => "CPU idle: /dev/cpu_dma_latency held at 0 for the whole run, so an idle CPU \
                      polls instead of sleeping (in this VM a halted vCPU takes ~70 µs to wake, \
                      on every hand-off between the two CPUs, for every path alike)."
                .to_owned(),
            Err(e) => format!("CPU idle: not held ({e}); latencies include waking sleeping CPUs."),
        }
    }
}

/// A CA and a leaf certificate for the upstream (webpki, which rustls uses, rejects the lab's
/// self-signed CA certificate as a server certificate).
#[derive(Debug, Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub(crate) fn generate(dir: &Path) -> Result<Certs, Error> {
        std::fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name).display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let run = |args: &[&str]| -> Result<(), Error> {
            let out = Command::new("openssl")
                .args(args)
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() {
                Ok(())
            } else {
                Err(Error::msg(format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )))
            }
        };
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        let (ca, ca_key) = (p("ca.pem"), p("ca.key"));
        args.extend([
            "-days",
            "3",
            "-subj",
            "/CN=loadtest-ca",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ]);
        run(&args)?;
        let (key, csr, cert, ext) = (p("leaf.key"), p("leaf.csr"), p("leaf.pem"), p("leaf.ext"));
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend([
            "-subj",
            "/CN=api.example.test",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        run(&args)?;
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n\
                 subjectAltName=DNS:{},DNS:bulk.example.test,DNS:*.example.test,IP:{}\n",
                addr::API,
                addr::WEB
            ),
        )?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "3",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ])?;
        Ok(Certs {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        })
    }
}

/// The egressgate policy of the bench: pod b (role=batch) may reach api.example.test over TLS on
/// the TLS and idle-connection ports and over plain HTTP on the HTTP port, bulk.example.test over
/// plain TCP on the bulk port, and the web address's UDP echo by a `udp` rule (so its UDP is
/// policed, not passed as unselected).
fn policy() -> String {
    format!(
        "apiVersion: egressgate.dev/v1alpha1\n\
         kind: EgressPolicy\n\
         metadata: {{name: loadtest, namespace: shop}}\n\
         spec:\n  podSelector: {{matchLabels: {{role: batch}}}}\n  egress:\n    \
         - to: [{{dnsName: {api}}}]\n      ports:\n        \
         - {{port: {tls}, protocol: tls}}\n        \
         - {{port: {hold0}, endPort: {hold1}, protocol: tls}}\n        \
         - {{port: {http}, protocol: http}}\n    \
         - to: [{{dnsName: bulk.example.test}}]\n      ports:\n        \
         - {{port: {bulk}, protocol: tcp}}\n    \
         - to: [{{cidr: {web}/32}}]\n      ports:\n        \
         - {{port: {udp}, protocol: udp}}\n",
        api = addr::API,
        tls = TLS_PORT,
        http = HTTP_PORT,
        hold0 = HOLD_PORTS[0],
        hold1 = HOLD_PORTS[HOLD_PORTS.len() - 1],
        bulk = BULK_PORT,
        web = addr::WEB,
        udp = UDP_ECHO_PORT,
    )
}

impl Env {
    /// The lab with egressgate running `workers` workers (see `Settings::workers`), its
    /// client-first listener taking the TLS and HTTP ports if `client_first`.
    /// With `baseline_bin`, that build is the `baseline` path (see [`Env::serve`]).
    pub fn start(
        wanted: &[PathKind],
        peers: Peers,
        workers: usize,
        client_first: bool,
        baseline_bin: Option<PathBuf>,
    ) -> Result<Env, Error> {
        let mut placement = Placement::detect();
        let gateway_cpus = if workers >= 2 {
            let cpus = workers.min(crate::cpus());
            placement.text.push_str(&format!(
                " Scaling run: egressgate runs {workers} workers on CPUs 0-{} (the load's CPU \
                 included), HAProxy and nginx as above.",
                cpus - 1
            ));
            format!("0-{}", cpus - 1)
        } else {
            placement.proxy_cpu.to_string()
        };
        let cpu_awake = CpuAwake::hold();
        placement.text.push(' ');
        placement.text.push_str(&cpu_awake.describe());
        let exe = std::env::current_exe()?;
        let options = GatewayOptions {
            interfaces: vec!["egpb".to_owned()],
            // It is pinned after it starts, so it cannot count its CPUs itself. A binary from
            // before `listen.workers` sizes its runtime from this instead.
            workers: (workers > 0).then_some(workers),
            env: vec![("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned())],
            intercept_extra: if client_first {
                client_first_ports()
            } else {
                String::new()
            },
            ..GatewayOptions::default()
        }
        .policy("loadtest.yaml", &policy());
        progress("starting the lab (4 pods, node with egressgate, upstream)");
        let (mut lab, server, certs) = served_lab(4, options.clone(), placement.load_cpu)?;
        let gateway = lab
            .take_gateway()
            .ok_or_else(|| Error::msg("the lab started no gateway"))?;
        pin(gateway.daemon().pid(), &gateway_cpus)?;
        let baseline = match baseline_bin {
            Some(bin) => {
                // Its own state directory: the builds need not share a journal format.
                let config = lab.dir().join("gateway-baseline.yaml");
                let state = lab.dir().join("state-baseline");
                std::fs::write(
                    &config,
                    options.config_yaml(&lab.policy_dir(), &lab.identity_file(), &state)?,
                )?;
                Some(Baseline { bin, config })
            }
            None => None,
        };
        let mut env = Env {
            haproxy: None,
            nginx: None,
            server,
            serving: Mutex::new(Serving {
                path: PathKind::Egressgate,
                gateway,
                started: 1,
            }),
            baseline,
            gateway_cpus,
            gateway_env: options.env,
            lab,
            exe,
            paths: Vec::new(),
            skipped: Vec::new(),
            placement,
            peers,
            certs,
            nofile: nofile_limit(),
            _cpu_awake: cpu_awake,
        };
        for &path in wanted {
            let started = match path {
                PathKind::Direct | PathKind::Egressgate => Ok(()),
                PathKind::Baseline if env.baseline.is_none() => Err(Error::msg(
                    "no --baseline-bin (the egressgate build to compare with)",
                )),
                PathKind::Baseline => Ok(()),
                PathKind::Haproxy => env.start_haproxy(),
                PathKind::Nginx => env.start_nginx(),
            };
            let checked = started.and_then(|()| env.check(path));
            match checked {
                Ok(()) => env.paths.push(path),
                Err(e) => {
                    progress(&format!("path {path} unavailable: {e}"));
                    env.skipped.push((path, e.to_string()));
                }
            }
        }
        Ok(env)
    }

    pub fn pod(&self, path: PathKind) -> &Netns {
        self.lab.pod(path.pod())
    }

    /// Where a client of `path` connects for the upstream `port`.
    pub fn target(&self, path: PathKind, port: u16) -> SocketAddr {
        let ip: Ipv4Addr = match path {
            PathKind::Nginx => NGINX_LISTEN.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            _ => addr::WEB.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        SocketAddr::new(IpAddr::V4(ip), port)
    }

    pub fn dns_server(&self) -> SocketAddr {
        SocketAddr::new(
            addr::TRUSTED_DNS
                .parse()
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            53,
        )
    }

    pub fn ca(&self) -> String {
        self.certs.ca.display().to_string()
    }

    /// How many idle connections `path` can hold within [`Env::nofile`]: the proxy needs this
    /// many descriptors per connection (egressgate: two sockets and two pipes; HAProxy and
    /// nginx: two sockets), the client and the upstream one each.
    pub fn capacity(&self, path: PathKind) -> usize {
        let per_conn = match path {
            PathKind::Direct => 1,
            // Two sockets; pipes are borrowed from a small pool only while bytes are in flight.
            PathKind::Egressgate | PathKind::Baseline => 2,
            PathKind::Haproxy | PathKind::Nginx => 2,
        };
        let room = usize::try_from(self.nofile)
            .unwrap_or(usize::MAX)
            .saturating_sub(2000);
        room / per_conn
    }

    /// Process ids of the proxy of `path` (none for direct).
    pub fn proxy_pid(&self, path: PathKind) -> Option<u32> {
        match path {
            PathKind::Direct => None,
            PathKind::Egressgate | PathKind::Baseline => {
                Some(self.serving().gateway.daemon().pid())
            }
            PathKind::Haproxy => self.haproxy.as_ref().map(Daemon::pid),
            PathKind::Nginx => self.nginx.as_ref().map(Daemon::pid),
        }
    }

    fn serving(&self) -> MutexGuard<'_, Serving> {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the gateway serving pod b now writes its log lines (decisions, DNS answers).
    pub fn gateway_log(&self) -> PathBuf {
        self.serving().gateway.daemon().stdout_path().to_path_buf()
    }

    /// Makes `path`'s build (egressgate or baseline) the gateway of pod b: stops the other one
    /// if it runs, and starts this one with its config and state directory, pinned as the first
    /// was. Between samples, so that no connection of a sample spans the swap.
    pub fn serve(&self, path: PathKind) -> Result<(), Error> {
        let mut serving = self.serving();
        if serving.path == path {
            return Ok(());
        }
        let (bin, config) = match (path, &self.baseline) {
            (PathKind::Baseline, Some(baseline)) => (baseline.bin.clone(), baseline.config.clone()),
            (PathKind::Egressgate, _) => (
                egressgate_lab::gateway::egressgate_bin()?,
                self.lab.gateway_config_path(),
            ),
            _ => {
                return Err(Error::msg(format!(
                    "{path} is not an egressgate build here"
                )))
            }
        };
        serving.gateway.daemon_mut().stop();
        serving.started += 1;
        let name = format!("egressgate-{}-{}", path.name(), serving.started);
        let gateway = Gateway::start_named(
            self.lab.node(),
            bin,
            config,
            &self.gateway_env,
            self.lab.dir(),
            &name,
        )?;
        pin(gateway.daemon().pid(), &self.gateway_cpus)?;
        serving.gateway = gateway;
        serving.path = path;
        Ok(())
    }

    /// Pod b resolves the names the policy allows through the shim, so the gateway's name table
    /// has them (the DNS scenario's names can evict them: the table keeps 10k per pod).
    pub fn resolve_names(&self) -> Result<(), Error> {
        let pod = self.pod(PathKind::Egressgate);
        for name in [addr::API, "bulk.example.test"] {
            let out = pod.run_with(
                &["dig", "+short", "+time=2", "+tries=3", name],
                None,
                Duration::from_secs(10),
            )?;
            if out.stdout.trim() != addr::WEB {
                return Err(Error::msg(format!(
                    "pod b cannot resolve {name} through the shim:\n{out}"
                )));
            }
        }
        Ok(())
    }

    /// Runs `loadtest __client ARGS` in `path`'s pod, pinned to the load CPU, bounded by `limit`;
    /// returns its JSON line.
    pub fn client<T: serde::de::DeserializeOwned>(
        &self,
        path: PathKind,
        args: &[String],
        limit: Duration,
    ) -> Result<T, Error> {
        run_client(
            self.pod(path),
            &self.exe,
            Some(self.placement.load_cpu),
            args,
            limit,
        )
    }

    /// Runs a program (dnsperf) in `path`'s pod, pinned to the load CPU.
    pub fn run_pinned(
        &self,
        path: PathKind,
        argv: &[&str],
        limit: Duration,
    ) -> Result<egressgate_lab::Output, Error> {
        let cpu = self.placement.load_cpu.to_string();
        let mut full: Vec<&str> = vec!["taskset", "-c", &cpu];
        full.extend_from_slice(argv);
        Ok(self.pod(path).run_with(&full, None, limit)?)
    }

    /// Starts `loadtest __client ARGS` in `path`'s pod with piped stdin/stdout (the `hold` mode).
    pub fn spawn_client(
        &self,
        path: PathKind,
        args: &[String],
        limit: Duration,
    ) -> Result<Streaming, Error> {
        spawn_in(
            self.pod(path),
            &self.exe,
            Some(self.placement.load_cpu),
            args,
            limit,
        )
    }

    /// Checks one request over a new TLS connection on `path`.
    fn check(&self, path: PathKind) -> Result<(), Error> {
        crate::scenarios::prepare(self, path)?;
        let args = crate::scenarios::rr_args(self, path, true, 1, 2.0, 3, 0.0);
        let result: crate::client::RrResult = self.client(path, &args, Duration::from_secs(15))?;
        if result.ops == 0 {
            return Err(Error::msg(format!(
                "no request got through: {}",
                result.first_error.unwrap_or_default()
            )));
        }
        Ok(())
    }

    fn start_haproxy(&mut self) -> Result<(), Error> {
        let bin = self
            .peers
            .haproxy
            .clone()
            .ok_or_else(|| Error::msg("haproxy is not installed (apt-get install haproxy)"))?;
        let node = self.lab.node();
        let nft = format!(
            "table inet loadtest_haproxy {{\n  chain prerouting {{\n    \
             type filter hook prerouting priority mangle; policy accept;\n    \
             iifname \"egpc\" meta l4proto tcp socket transparent 1 meta mark set {HAPROXY_MARK:#x} accept\n    \
             iifname \"egpc\" meta nfproto ipv4 tcp dport {HTTP_PORT} tproxy ip to :{HAPROXY_HTTP_PORT} meta mark set {HAPROXY_MARK:#x} accept\n    \
             iifname \"egpc\" meta nfproto ipv4 meta l4proto tcp tproxy ip to :{HAPROXY_PORT} meta mark set {HAPROXY_MARK:#x} accept\n  \
             }}\n}}\n"
        );
        let out = node.run_stdin(&["nft", "-f", "-"], &nft);
        if !out.success() {
            return Err(Error::msg(format!("nft: {out}")));
        }
        node.exec_ok(&[
            "ip",
            "rule",
            "add",
            "fwmark",
            &format!("{HAPROXY_MARK:#x}"),
            "lookup",
            &HAPROXY_TABLE.to_string(),
        ])?;
        node.exec_ok(&[
            "ip",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &HAPROXY_TABLE.to_string(),
        ])?;
        let dir = self.lab.dir().join("haproxy");
        std::fs::create_dir_all(&dir)?;
        // Two descriptors per connection, within the limit the lab inherited.
        let maxconn = (self.nofile.saturating_sub(1000) / 2).clamp(256, 200_000);
        let config = format!(
            "# written by loadtest: transparent TCP proxy with an SNI ACL; the plain HTTP port\n\
             # in HTTP mode with a Host ACL on each request\n\
             global\n    nbthread 1\n    maxconn {maxconn}\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\
             frontend intercept\n    bind 0.0.0.0:{HAPROXY_PORT} transparent\n    maxconn {maxconn}\n    \
             tcp-request inspect-delay 5s\n    \
             tcp-request content accept if {{ dst_port {BULK_PORT} }}\n    \
             tcp-request content accept if {{ req.ssl_sni -i {api} }}\n    \
             tcp-request content reject\n    default_backend original\n\
             backend original\n    server original 0.0.0.0\n\
             frontend http_intercept\n    mode http\n    bind 0.0.0.0:{HAPROXY_HTTP_PORT} transparent\n    \
             maxconn {maxconn}\n    http-request deny unless {{ req.hdr(host) -i {api} }}\n    \
             default_backend original_http\n\
             backend original_http\n    mode http\n    server original 0.0.0.0\n",
            api = addr::API,
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let cpu = self.placement.proxy_cpu.to_string();
        let daemon = Daemon::spawn(
            node.name(),
            "haproxy",
            &[
                "taskset",
                "-c",
                &cpu,
                path_str(&bin)?,
                "-db",
                "-f",
                path_str(&path)?,
            ],
            &dir,
            "TERM",
        )?;
        let pid = daemon.pid();
        self.haproxy = Some(daemon);
        wait_listening(node, &format!(":{HAPROXY_PORT}"), pid)?;
        wait_listening(node, &format!(":{HAPROXY_HTTP_PORT}"), pid)?;
        Ok(())
    }

    fn start_nginx(&mut self) -> Result<(), Error> {
        let bin = self
            .peers
            .nginx
            .clone()
            .ok_or_else(|| Error::msg("nginx is not installed"))?;
        let module = self.peers.nginx_stream_module.clone().ok_or_else(|| {
            Error::msg("nginx has no stream module (apt-get install libnginx-mod-stream)")
        })?;
        let dir = self.lab.dir().join("nginx-stream");
        std::fs::create_dir_all(&dir)?;
        let d = path_str(&dir)?.to_owned();
        let mut sni_ports = vec![TLS_PORT];
        sni_ports.extend(HOLD_PORTS);
        let sni_listens: String = sni_ports
            .iter()
            .map(|port| format!("    listen {NGINX_LISTEN}:{port} backlog=8192;\n"))
            .collect();
        let config = format!(
            "# written by loadtest: nginx stream with ssl_preread, explicit destination; an http\n\
             # server checking each request's Host on the plain HTTP port\n\
             {module}daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nworker_rlimit_nofile {nofile};\n\
             events {{ worker_connections {connections}; }}\n\
             stream {{\n  proxy_connect_timeout 5s;\n  proxy_timeout 1h;\n\
             \x20 map $ssl_preread_server_name $sni_upstream {{\n    {api} {web};\n    default 127.0.0.2;\n  }}\n\
             \x20 server {{\n    listen {NGINX_LISTEN}:{BULK_PORT} backlog=8192;\n    proxy_pass {web}:{BULK_PORT};\n  }}\n\
             \x20 server {{\n{sni_listens}    ssl_preread on;\n    proxy_pass $sni_upstream:$server_port;\n  }}\n}}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000000;\n  keepalive_timeout 1h;\n\
             \x20 upstream web_http {{\n    server {web}:{HTTP_PORT};\n    keepalive 16;\n    \
             keepalive_requests 1000000000;\n  }}\n\
             \x20 server {{\n    listen {NGINX_LISTEN}:{HTTP_PORT} default_server backlog=8192;\n    return 403;\n  }}\n\
             \x20 server {{\n    listen {NGINX_LISTEN}:{HTTP_PORT};\n    server_name {api};\n    location / {{\n      \
             proxy_pass http://web_http;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
            api = addr::API,
            web = addr::WEB,
            nofile = self.nofile,
            connections = self.nofile.saturating_sub(256).max(512),
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config)?;
        let cpu = self.placement.proxy_cpu.to_string();
        let node = self.lab.node();
        let daemon = Daemon::spawn(
            node.name(),
            "nginx-stream",
            &[
                "taskset",
                "-c",
                &cpu,
                path_str(&bin)?,
                "-p",
                &d,
                "-e",
                &format!("{d}/error.log"),
                "-c",
                path_str(&path)?,
            ],
            &dir,
            "TERM",
        )?;
        let pid = daemon.pid();
        self.nginx = Some(daemon);
        wait_listening(node, &format!("{NGINX_LISTEN}:{TLS_PORT}"), pid).map_err(|e| {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            Error::msg(format!("{e}\n{log}"))
        })
    }

    /// The upstream server's output, for diagnostics.
    pub fn server_tail(&self) -> String {
        self.server.output_tail(20)
    }
}

/// The `intercept.clientFirstPorts` line for the ports whose clients speak first: TLS (the
/// connect and hold scenarios) and HTTP.
fn client_first_ports() -> String {
    let ports: Vec<String> = [TLS_PORT, HTTP_PORT]
        .into_iter()
        .chain(HOLD_PORTS)
        .map(|port| port.to_string())
        .collect();
    format!("  clientFirstPorts: [{}]\n", ports.join(", "))
}

/// A lab of `pods` pods and `options`' gateway, every namespace tuned for load, and the
/// loadtest server running upstream on `server_cpu` with the certificates it serves.
pub(crate) fn served_lab(
    pods: usize,
    options: GatewayOptions,
    server_cpu: usize,
) -> Result<(Lab, Daemon, Certs), Error> {
    let lab = Lab::builder().pods(pods).gateway(options).start()?;
    for ns in lab
        .pods()
        .iter()
        .map(|p| &**p)
        .chain([lab.node(), lab.up()])
    {
        tune(ns)?;
    }
    let certs = Certs::generate(&lab.dir().join("loadtest-certs"))?;
    let server = start_server(&lab, &std::env::current_exe()?, &certs, server_cpu)?;
    Ok((lab, server, certs))
}

/// Sysctls of a lab namespace for load: more ephemeral ports, TIME_WAIT reuse for outgoing
/// connections (tens of thousands of short connections per run), deeper accept queues.
fn tune(ns: &Netns) -> Result<(), Error> {
    ns.exec_ok(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
        "net.core.somaxconn=65535",
        "net.ipv4.tcp_max_syn_backlog=65535",
    ])?;
    Ok(())
}

/// Pins every thread of `pid` to `cpu`.
/// Pins every thread of `pid` to `cpus` (a `taskset -c` list).
pub fn pin(pid: u32, cpus: &str) -> Result<(), Error> {
    let out = Command::new("taskset")
        .args(["-a", "-pc", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "taskset {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The hard RLIMIT_NOFILE (the harness raised its soft limit to it; the lab inherits it).
pub fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

pub(crate) fn start_server(
    lab: &Lab,
    exe: &Path,
    certs: &Certs,
    cpu: usize,
) -> Result<Daemon, Error> {
    let dir = lab.dir().to_path_buf();
    let (cert, key) = (certs.cert.clone(), certs.key.clone());
    let cpu = cpu.to_string();
    let mut daemon = Daemon::spawn(
        lab.up().name(),
        "loadtest-serve",
        &[
            "taskset",
            "-c",
            &cpu,
            path_str(exe)?,
            "__serve",
            "--web",
            addr::WEB,
            "--dns",
            addr::TRUSTED_DNS,
            "--cert",
            path_str(&cert)?,
            "--key",
            path_str(&key)?,
        ],
        &dir,
        "TERM",
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if daemon.stdout_text().contains("ready") {
            return Ok(daemon);
        }
        if let Some(status) = daemon.exited() {
            return Err(Error::msg(format!(
                "upstream server exited ({status}):\n{}",
                daemon.output_tail(20)
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::msg(format!(
                "upstream server not ready:\n{}",
                daemon.output_tail(20)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `loadtest __client ARGS` in `ns` (pinned to `cpu` if given), bounded by `limit`; returns
/// its JSON line.
pub fn run_client<T: serde::de::DeserializeOwned>(
    ns: &Netns,
    exe: &Path,
    cpu: Option<usize>,
    args: &[String],
    limit: Duration,
) -> Result<T, Error> {
    let cpu = cpu.map(|cpu| cpu.to_string());
    let exe = exe.display().to_string();
    let mut argv: Vec<&str> = match &cpu {
        Some(cpu) => vec!["taskset", "-c", cpu],
        None => Vec::new(),
    };
    argv.extend([exe.as_str(), "__client"]);
    argv.extend(args.iter().map(String::as_str));
    let out = ns.run_with(&argv, None, limit)?;
    if !out.success() {
        return Err(Error::msg(format!("client failed:\n{out}")));
    }
    let line = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| Error::msg(format!("client printed no result:\n{out}")))?;
    Ok(serde_json::from_str(line)?)
}

/// Starts `loadtest __client ARGS` in `ns` (pinned to `cpu` if given) with piped stdin/stdout,
/// killed by `timeout` after `limit`.
pub fn spawn_in(
    ns: &Netns,
    exe: &Path,
    cpu: Option<usize>,
    args: &[String],
    limit: Duration,
) -> Result<Streaming, Error> {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", ns.name(), "timeout", "-k", "2"])
        .arg(limit.as_secs().max(1).to_string());
    if let Some(cpu) = cpu {
        command.args(["taskset", "-c", &cpu.to_string()]);
    }
    let mut child = command
        .arg(exe)
        .arg("__client")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| Error::msg("no stdout"))?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stdin = child.stdin.take();
    Ok(Streaming {
        child,
        stdin,
        lines,
    })
}

fn wait_listening(ns: &Netns, needle: &str, pid: u32) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = ns.run_with(&["ss", "-Hltn"], None, Duration::from_secs(5))?;
        if out.stdout.contains(needle) {
            return Ok(());
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(Error::msg(format!("process {pid} exited before listening")));
        }
        if Instant::now() > deadline {
            return Err(Error::msg(format!("nothing listens on {needle}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn path_str(path: &Path) -> Result<&str, Error> {
    path.to_str()
        .ok_or_else(|| Error::msg(format!("non-UTF-8 path {}", path.display())))
}

/// A client started with [`Env::spawn_client`]: read its lines, close its stdin to end it.
#[derive(Debug)]
pub struct Streaming {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Streaming {
    /// The next line starting with `prefix`, printing progress lines; `None` at the deadline
    /// or when the client ended.
    pub fn wait_for(&mut self, prefix: &str, deadline: Instant, label: &str) -> Option<String> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Some(line),
                Ok(line) if line.starts_with("progress") => {
                    progress(&format!("{label}: {line}"));
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Closes stdin (the client stops holding) and waits for its result line.
    pub fn finish(mut self, deadline: Instant) -> Option<String> {
        self.stdin.take();
        let line = self.wait_for("{", deadline, "");
        let _ = self.child.kill();
        let _ = self.child.wait();
        line
    }

    pub fn stderr(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        text
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
