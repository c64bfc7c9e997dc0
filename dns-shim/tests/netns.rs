//! The network-namespace lab: a real `dig` in a "pod" namespace asks a server address that does
//! not exist; nftables TPROXY in the "node" namespace hands the query to the shim, which asks the
//! real dnsmasq in an "upstream" namespace and answers as the address dig asked.
//!
//! ```text
//!  pod ns                 node ns (shim)                           upstream ns
//!  198.18.1.2 ── veth ── 198.18.1.1 [TPROXY :53 → shim]  198.19.0.1 ── veth ── 198.19.0.53 dnsmasq
//! ```
//!
//! Needs root, `ip`, `nft`, `dnsmasq` and `dig`; skipped (with a message) otherwise. Every
//! namespace has a unique name and is deleted on drop, panics included.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use egressgate_dns_shim::{
    DestIp, DnsShim, ForeignServerPolicy, NameTable, PodIp, ShimConfig, TableLimits,
};
use nix::sched::CloneFlags;
use prometheus::Registry;

const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 53);
/// Nobody has these addresses: the pod's "rogue" resolvers.
const ROGUE_FALLBACK: &str = "198.19.9.9"; // TPROXY to the shim's random port: per-reply socket
const ROGUE_PKTINFO: &str = "198.19.9.10"; // TPROXY to the shim's :53 listener: IP_PKTINFO
const ANSWER: &str = "198.19.0.10";

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    let tools = ["ip", "nft", "dnsmasq", "dig"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    root && tools
}

/// Three namespaces and dnsmasq; torn down on drop.
struct Lab {
    pod: String,
    node: String,
    upstream: String,
    dnsmasq: Option<Child>,
    pid_file: String,
}

impl Lab {
    fn new() -> Lab {
        let tag = format!("{}-{:04x}", std::process::id(), rand::random::<u16>());
        let mut lab = Lab {
            pod: format!("egs-pod-{tag}"),
            node: format!("egs-node-{tag}"),
            upstream: format!("egs-up-{tag}"),
            dnsmasq: None,
            pid_file: format!("/tmp/egs-dnsmasq-{tag}.pid"),
        };
        // Created one by one so that Drop removes whichever exist if a step fails.
        for ns in [&lab.pod, &lab.node, &lab.upstream] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (pod, node, up) = (lab.pod.clone(), lab.node.clone(), lab.upstream.clone());
        // pod <-> node
        run(&[
            "ip", "-n", &node, "link", "add", "egs-p", "type", "veth", "peer", "name", "eth0",
            "netns", &pod,
        ]);
        run(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            "198.18.1.1/24",
            "dev",
            "egs-p",
        ]);
        run(&["ip", "-n", &node, "link", "set", "egs-p", "up"]);
        run(&[
            "ip",
            "-n",
            &pod,
            "addr",
            "add",
            &format!("{POD}/24"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", &pod, "link", "set", "eth0", "up"]);
        run(&[
            "ip",
            "-n",
            &pod,
            "route",
            "add",
            "default",
            "via",
            "198.18.1.1",
        ]);
        // node <-> upstream
        run(&[
            "ip", "-n", &node, "link", "add", "egs-u", "type", "veth", "peer", "name", "eth0",
            "netns", &up,
        ]);
        run(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            "198.19.0.1/24",
            "dev",
            "egs-u",
        ]);
        run(&["ip", "-n", &node, "link", "set", "egs-u", "up"]);
        run(&[
            "ip",
            "-n",
            &up,
            "addr",
            "add",
            &format!("{UPSTREAM}/24"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", &up, "link", "set", "eth0", "up"]);
        run(&[
            "ip",
            "-n",
            &up,
            "route",
            "add",
            "default",
            "via",
            "198.19.0.1",
        ]);
        // TPROXY'd packets are marked and delivered locally (the usual policy routing).
        run(&[
            "ip", "-n", &node, "rule", "add", "fwmark", "1", "lookup", "100",
        ]);
        run(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ]);
        lab.start_dnsmasq();
        lab
    }

    fn start_dnsmasq(&mut self) {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.upstream,
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
            ])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--port=53",
                "--bind-interfaces",
            ])
            .arg(format!("--listen-address={UPSTREAM}"))
            .arg(format!("--pid-file={}", self.pid_file))
            .args(["--local=/example.test/", "--local-ttl=300"])
            .arg(format!("--host-record=lb.cdn.example.test,{ANSWER}"))
            .arg("--cname=api.example.test,api.edge.example.test,60")
            .arg("--cname=api.edge.example.test,lb.cdn.example.test,120")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        self.dnsmasq = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.dig(&self.node, &UPSTREAM.to_string(), &["+short"]);
            if out.contains(ANSWER) {
                return;
            }
            assert!(Instant::now() < deadline, "dnsmasq did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn dig(&self, ns: &str, server: &str, extra: &[&str]) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "dig",
                &format!("@{server}"),
                "api.example.test",
                "A",
            ])
            .args(["+time=3", "+tries=1"])
            .args(extra)
            .output()
            .expect("dig");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nft(&self, rules: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), rules.as_bytes())
            .expect("write rules");
        assert!(child.wait().expect("nft").success(), "nft rules:\n{rules}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            // `ip netns exec` execs dnsmasq, so this is dnsmasq's own pid.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.pid_file);
        for ns in [&self.pod, &self.node, &self.upstream] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The shim on its own thread inside the node namespace.
struct ShimThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShimThread {
    /// Starts the shim in `ns` on 0.0.0.0:0 and 0.0.0.0:53; returns it and the random port.
    fn start(ns: &str, table: Arc<NameTable>) -> (ShimThread, u16) {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u16, String>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ns_path = format!("/run/netns/{ns}");
        let thread = std::thread::spawn(move || {
            let started = (|| -> Result<_, String> {
                let file = File::open(&ns_path).map_err(|e| format!("{ns_path}: {e}"))?;
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns: {e}"))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                // Sockets must be created on this thread, inside the namespace.
                let (random, port53) = rt.block_on(async {
                    let random = DnsShim::bind("0.0.0.0:0".parse().expect("addr"));
                    let port53 = DnsShim::bind("0.0.0.0:53".parse().expect("addr"));
                    (random, port53)
                });
                let random = random.map_err(|e| format!("bind: {e}"))?;
                let port53 = port53.map_err(|e| format!("bind :53: {e}"))?;
                Ok((rt, random, port53))
            })();
            let (rt, random, port53) = match started {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(random.udp_local_addr().port()));
            rt.block_on(async move {
                let config = ShimConfig {
                    upstreams: vec![SocketAddr::new(IpAddr::V4(UPSTREAM), 53)],
                    foreign_servers: ForeignServerPolicy::Forward,
                    upstream_timeout: Duration::from_secs(2),
                    tcp_idle_timeout: Duration::from_secs(5),
                };
                let registry = Registry::new();
                let shim = Arc::new(DnsShim::new(config, table, &registry).expect("metrics"));
                tokio::select! {
                    () = shim.clone().serve(random, std::future::pending()) => {}
                    () = shim.clone().serve(port53, std::future::pending()) => {}
                    _ = stopped => {}
                }
            });
        });
        let port = ready_rx
            .recv()
            .expect("shim thread")
            .unwrap_or_else(|e| panic!("starting the shim in {ns}: {e}"));
        let shim = ShimThread {
            stop: Some(stop),
            thread: Some(thread),
        };
        (shim, port)
    }
}

impl Drop for ShimThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answered_by(out: &str, server: &str, transport: &str) {
    assert!(out.contains("status: NOERROR"), "dig output:\n{out}");
    assert!(
        out.contains(&format!("SERVER: {server}#53({server}) ({transport})")),
        "dig output:\n{out}"
    );
    let answer = out
        .lines()
        .any(|l| l.starts_with("lb.cdn.example.test.") && l.ends_with(ANSWER));
    assert!(answer, "dig output:\n{out}");
    assert!(
        out.contains("api.example.test.\t60\tIN\tCNAME\tapi.edge.example.test."),
        "dig output:\n{out}"
    );
}

#[test]
fn pod_asking_a_rogue_server_gets_the_trusted_answer_from_that_address_and_is_recorded() {
    // A missing tool fails the test: a skipped test would pass without testing anything.
    assert!(
        available(),
        "needs root, ip, nft, dnsmasq and dig (scripts/install-deps)"
    );
    let lab = Lab::new();
    let table = Arc::new(NameTable::new(TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: 100,
        max_names: 1000,
    }));
    let (shim, port) = ShimThread::start(&lab.node, table.clone());
    lab.nft(&format!(
        "table ip egs {{
            chain pre {{
                type filter hook prerouting priority mangle; policy accept;
                iifname \"egs-p\" ip daddr {ROGUE_PKTINFO} udp dport 53 tproxy to :53 meta mark set 1 accept
                iifname \"egs-p\" ip daddr {ROGUE_PKTINFO} tcp dport 53 tproxy to :53 meta mark set 1 accept
                iifname \"egs-p\" udp dport 53 tproxy to :{port} meta mark set 1 accept
                iifname \"egs-p\" tcp dport 53 tproxy to :{port} meta mark set 1 accept
            }}
        }}"
    ));

    let dst = DestIp(IpAddr::V4(ANSWER.parse().expect("ip")));
    let pod = PodIp(IpAddr::V4(POD));
    assert!(table.lookup(pod, dst, Instant::now()).is_empty());

    // UDP to a nonexistent server; reply sent by a transparent socket bound to 198.19.9.9:53.
    let out = lab.dig(&lab.pod, ROGUE_FALLBACK, &[]);
    answered_by(&out, ROGUE_FALLBACK, "UDP");
    let found = table.lookup(pod, dst, Instant::now());
    assert_eq!(found.len(), 1, "recorded: {found:?}");
    assert_eq!(&*found[0].name, "api.example.test");
    let cnames: Vec<&str> = found[0].cnames.iter().map(|c| &**c).collect();
    assert_eq!(cnames, ["api.edge.example.test", "lb.cdn.example.test"]);
    // Another pod address sees nothing.
    assert!(table
        .lookup(
            PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 3))),
            dst,
            Instant::now()
        )
        .is_empty());

    // TCP to the same nonexistent server: the accepted socket's local address is 198.19.9.9:53.
    let out = lab.dig(&lab.pod, ROGUE_FALLBACK, &["+tcp"]);
    answered_by(&out, ROGUE_FALLBACK, "TCP");

    // UDP via the :53 listener: sendmsg with IP_PKTINFO from the non-local 198.19.9.10.
    let out = lab.dig(&lab.pod, ROGUE_PKTINFO, &[]);
    answered_by(&out, ROGUE_PKTINFO, "UDP");
    let out = lab.dig(&lab.pod, ROGUE_PKTINFO, &["+tcp"]);
    answered_by(&out, ROGUE_PKTINFO, "TCP");

    // The pod asking the trusted upstream directly is intercepted and answered the same way.
    let out = lab.dig(&lab.pod, &UPSTREAM.to_string(), &[]);
    answered_by(&out, &UPSTREAM.to_string(), "UDP");

    assert_eq!(table.lookup(pod, dst, Instant::now()).len(), 1);
    assert_eq!(table.len(), 1);
    drop(shim);
    drop(lab);
}
