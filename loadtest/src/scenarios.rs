//! The scenarios. Each measures every available path in interleaved rounds (direct, egressgate,
//! haproxy, nginx, direct, egressgate, …), so slow drifts of a shared machine hit every path
//! alike, and keeps one sample per (metric, path, round); the result holds medians and min–max.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{BulkResult, DnsResult, HoldResult, RrResult, UdpResult};
use crate::env::{Env, PathKind};
use crate::machine::Machine;
use crate::restart::RestartSize;
use crate::results::{Better, MetricResult, PathInfo, PathStats, ScenarioResult};
use crate::server::{BULK_PORT, HOLD_PORTS, HTTP_PORT, TLS_PORT, UDP_ECHO_PORT};
use crate::soak::{self, SoakSize};
use crate::{decision, http_relay, journal_cost, progress, restart, shared_ip, stopped, Error};

/// Every scenario, in run (and report) order. `decision` needs no lab; `restart`,
/// `dns_journal`, `http_keepalive` and `http_bulk` build labs of their own.
pub const ALL: [&str; 18] = [
    "tcp_bulk",
    "tls_bulk",
    "tls_connect",
    "conn_rate",
    "keepalive",
    "http_rr",
    "http_keepalive",
    "http_bulk",
    "dns",
    "shared_ip",
    "shared_ip_dns",
    "udp_flow",
    "memory",
    "reload",
    "soak",
    "restart",
    "dns_journal",
    "decision",
];

/// The scenario runs in the shared bench environment ([`Env`]).
pub fn needs_lab(scenario: &str) -> bool {
    !matches!(
        scenario,
        "decision" | "restart" | "dns_journal" | "http_keepalive" | "http_bulk"
    )
}

/// The scenario runs network namespaces (and the gateway binary).
pub fn needs_root(scenario: &str) -> bool {
    scenario != "decision"
}

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    /// Length of one timed sample.
    pub seconds: f64,
    pub bulk_max_bytes: u64,
    /// Concurrent clients of the connection-rate scenario.
    pub conn_concurrency: usize,
    pub memory_counts: Vec<usize>,
    pub memory_rounds: usize,
    pub dns_names: usize,
    pub dns_concurrency: usize,
    /// Names pod b resolves onto the web server's address in `shared_ip`.
    pub crowd_names: usize,
    /// Names queried on one address (and on distinct ones) in `shared_ip_dns`.
    pub crowd_dns_names: usize,
    pub decision: decision::Size,
    pub soak: SoakSize,
    pub restart: RestartSize,
    /// An egressgate binary from before the name journal, for `dns_journal`.
    pub base_bin: Option<std::path::PathBuf>,
    /// An egressgate binary from before the per-request HTTP relay, for `http_keepalive` and
    /// `http_bulk`.
    pub http_base_bin: Option<std::path::PathBuf>,
    /// egressgate's `listen.workers` (0: the key left out, for binaries from before it). With 2
    /// or more the gateway gets as many CPUs, the load's included: the scaling runs.
    pub workers: usize,
    /// The TLS and HTTP ports go to egressgate's client-first listener
    /// (`intercept.clientFirstPorts`); `false` leaves the key out, for binaries from before it.
    pub client_first: bool,
    pub smoke: bool,
}

impl Settings {
    pub fn full() -> Settings {
        Settings {
            rounds: 5,
            seconds: 3.0,
            bulk_max_bytes: 64 << 30,
            conn_concurrency: 32,
            workers: 1,
            client_first: true,
            memory_counts: vec![10_000, 50_000],
            memory_rounds: 2,
            dns_names: 5_000,
            dns_concurrency: 64,
            crowd_names: 5_000,
            crowd_dns_names: 2_000,
            decision: decision::Size::full(),
            soak: SoakSize::full(),
            restart: RestartSize::full(),
            base_bin: None,
            http_base_bin: None,
            smoke: false,
        }
    }

    pub fn smoke() -> Settings {
        Settings {
            rounds: 1,
            seconds: 0.3,
            bulk_max_bytes: 64 << 20,
            conn_concurrency: 4,
            workers: 1,
            client_first: true,
            memory_counts: vec![200],
            memory_rounds: 1,
            dns_names: 100,
            dns_concurrency: 8,
            crowd_names: 100,
            crowd_dns_names: 50,
            decision: decision::Size::smoke(),
            soak: SoakSize::smoke(),
            restart: RestartSize::smoke(),
            base_bin: None,
            http_base_bin: None,
            smoke: true,
        }
    }

    fn as_map(&self) -> BTreeMap<String, serde_json::Value> {
        [
            ("rounds", json!(self.rounds)),
            ("sample_seconds", json!(self.seconds)),
            ("bulk_max_bytes", json!(self.bulk_max_bytes)),
            ("conn_concurrency", json!(self.conn_concurrency)),
            ("workers", json!(self.workers)),
            ("client_first", json!(self.client_first)),
            ("memory_counts", json!(self.memory_counts)),
            ("memory_rounds", json!(self.memory_rounds)),
            ("dns_names", json!(self.dns_names)),
            ("dns_concurrency", json!(self.dns_concurrency)),
            ("crowd_names", json!(self.crowd_names)),
            ("crowd_dns_names", json!(self.crowd_dns_names)),
            ("soak_seconds", json!(self.soak.seconds)),
            ("restart_baseline_seconds", json!(self.restart.baseline)),
            ("restart_settle_seconds", json!(self.restart.settle)),
            (
                "restart_stream_life_seconds",
                json!(self.restart.stream_life),
            ),
            ("restart_upgrades", json!(self.restart.upgrades)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// One metric a scenario reports.
#[derive(Debug, Clone)]
struct Spec {
    key: String,
    label: String,
    unit: &'static str,
    better: Better,
}

/// The rate figures of a DNS run through the shim (`run` says how it was loaded).
fn dns_rate_specs(run: &str) -> Vec<Spec> {
    vec![
        spec(
            "qps",
            &format!("queries/s, {run}"),
            "queries/s",
            Better::Higher,
        ),
        spec(
            "lost",
            &format!("lost queries, {run}"),
            "queries",
            Better::Lower,
        ),
        spec(
            "cpu_per_query",
            &format!("shim CPU time per query (user + system, {run})"),
            "µs",
            Better::Lower,
        ),
        spec(
            "qps_per_core",
            "queries/s one core of shim sustains (1 / CPU time per query)",
            "queries/s",
            Better::Higher,
        ),
    ]
}

fn spec(key: &str, label: &str, unit: &'static str, better: Better) -> Spec {
    Spec {
        key: key.to_owned(),
        label: label.to_owned(),
        unit,
        better,
    }
}

/// Samples as they come: (metric, path) → one value per round.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    values: BTreeMap<(String, String), Vec<f64>>,
    pub(crate) notes: Vec<String>,
}

impl Samples {
    pub(crate) fn add(&mut self, path: &str, values: Vec<(String, f64)>) {
        for (key, value) in values {
            self.values
                .entry((key, path.to_owned()))
                .or_default()
                .push(value);
        }
    }
}

/// What a scenario run needs besides the environment.
#[derive(Debug)]
pub struct Run<'a> {
    pub settings: &'a Settings,
    pub machine: &'a Machine,
    pub env: Option<&'a Env>,
}

/// Progress with an estimate of the time left.
struct Meter {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
}

impl Meter {
    fn new(label: &str, total: usize) -> Meter {
        Meter {
            label: label.to_owned(),
            total,
            done: 0,
            started: Instant::now(),
        }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        let elapsed = self.started.elapsed().as_secs_f64();
        let left = elapsed / self.done as f64 * (self.total - self.done.min(self.total)) as f64;
        progress(&format!(
            "[{} {}/{}] {what} (elapsed {:.0}s, ~{:.0}s left)",
            self.label, self.done, self.total, elapsed, left
        ));
    }
}

/// Runs `sample` for each round and path, interleaved; failed samples become notes.
pub(crate) fn interleave(
    label: &str,
    rounds: usize,
    paths: &[String],
    samples: &mut Samples,
    mut sample: impl FnMut(&str, usize) -> Result<Vec<(String, f64)>, Error>,
) -> Result<(), Error> {
    let mut meter = Meter::new(label, rounds * paths.len());
    for round in 0..rounds {
        for path in paths {
            if stopped() {
                return Err(Error::msg("interrupted"));
            }
            match sample(path, round) {
                Ok(values) => {
                    let shown: Vec<String> = values
                        .iter()
                        .map(|(k, v)| format!("{k}={}", short(*v)))
                        .collect();
                    meter.step(&format!(
                        "round {}/{rounds} {path}: {}",
                        round + 1,
                        shown.join(" ")
                    ));
                    samples.add(path, values);
                }
                Err(e) => {
                    meter.step(&format!("round {}/{rounds} {path}: FAILED", round + 1));
                    progress(&format!("  {e}"));
                    samples
                        .notes
                        .push(format!("round {} {path}: sample failed: {e}", round + 1));
                }
            }
        }
    }
    Ok(())
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Runs one scenario and returns its result.
pub fn run(name: &str, run: &Run<'_>) -> Result<ScenarioResult, Error> {
    let started = egressgate_log::rfc3339_now();
    let clock = Instant::now();
    let s = run.settings;
    let env = || {
        run.env
            .ok_or_else(|| Error::msg("this scenario needs the lab"))
    };
    // Every scenario starts with the current build serving pod b (an A/B run's previous one
    // may have ended with the baseline's).
    if let Some(env) = run.env {
        env.serve(PathKind::Egressgate)?;
    }
    let mut samples = Samples::default();
    let (title, description, baseline, specs, paths): (
        &str,
        String,
        Option<&str>,
        Vec<Spec>,
        Vec<String>,
    ) = match name {
        "tcp_bulk" | "tls_bulk" => {
            let env = env()?;
            let tls = name == "tls_bulk";
            let paths = path_names(&env.paths);
            interleave(name, s.rounds, &paths, &mut samples, |path, _| {
                let path = kind(path)?;
                prepare(env, path)?;
                let r: BulkResult = env.client(
                    path,
                    &bulk_args(env, path, tls, s.seconds, s.bulk_max_bytes),
                    limit(s.seconds),
                )?;
                Ok(vec![("throughput".into(), r.gbit_per_s)])
            })?;
            (
                if tls {
                    "TLS bulk throughput"
                } else {
                    "Plain TCP bulk throughput"
                },
                format!(
                    "One connection downloads from the upstream for {}s (capped at {} MiB){}. \
                         Rate from the first byte to the last.",
                    s.seconds,
                    s.bulk_max_bytes >> 20,
                    if tls {
                        ": TLS 1.3 (rustls, AES-GCM), records decrypted by the client"
                    } else {
                        " over plain TCP (egressgate: a `tcp` rule by name, no peek)"
                    }
                ),
                Some("direct"),
                vec![spec("throughput", "throughput", "Gbit/s", Better::Higher)],
                paths,
            )
        }
        "tls_connect" | "conn_rate" | "keepalive" | "http_rr" => {
            let env = env()?;
            let (new_conn, concurrency) = match name {
                "tls_connect" => (true, 1),
                "conn_rate" => (true, s.conn_concurrency),
                _ => (false, 1),
            };
            let plain_http = name == "http_rr";
            let paths = path_names(&env.paths);
            interleave(name, s.rounds, &paths, &mut samples, |path, _| {
                let path = kind(path)?;
                prepare(env, path)?;
                // One kept-alive plain connection to the HTTP port, or TLS to the TLS port.
                let target = if plain_http {
                    target_args(env, path, HTTP_PORT, false)
                } else {
                    target_args(env, path, TLS_PORT, true)
                };
                let args = rr_args_to(target, new_conn, concurrency, s.seconds, 10_000_000, 0.3);
                let (r, cpu_used): (RrResult, _) =
                    proxy_cpu_during(env, path, || env.client(path, &args, limit(s.seconds)))?;
                if r.ops == 0 {
                    return Err(Error::msg(format!(
                        "no operation succeeded: {}",
                        r.first_error.unwrap_or_default()
                    )));
                }
                let mut values = rr_values(&r);
                // The proxy's own cost per operation, steadier here than latency: what it spent
                // over the whole client run, warm-up included, over every operation started.
                if let Some(used) = cpu_used.filter(|&used| used > 0.0 && r.attempts > 0) {
                    values.push(("cpu_per_op".to_owned(), used / r.attempts as f64 * 1e6));
                }
                Ok(values)
            })?;
            let what = match name {
                    "tls_connect" => format!(
                        "One client, closed loop: connect, full TLS 1.3 handshake (no resumption), \
                         a small HTTP/1.1 request, the {}-byte response, close. Latency per connection.",
                        crate::server::RESPONSE.len()
                    ),
                    "conn_rate" => format!(
                        "{concurrency} concurrent closed-loop clients, each making new TLS \
                         connections as above: connections per second at saturation."
                    ),
                    "http_rr" => format!(
                        "One client sends small HTTP/1.1 requests (`Host: {api}`) over one \
                         kept-alive plain connection to port {HTTP_PORT}, one at a time: latency \
                         per request. Each proxy checks every request's Host: egressgate by an \
                         `http` rule (the per-request relay), HAProxy in HTTP mode with a Host \
                         ACL (transparent, as for TLS), nginx as an HTTP proxy whose only \
                         server_name is {api} (the default server answers 403), keeping its \
                         upstream connection alive.",
                        api = egressgate_lab::addr::API
                    ),
                    _ => "One client sends small HTTP/1.1 requests over one kept-alive TLS \
                          connection, one at a time: latency per request."
                        .to_owned(),
                };
            let title = match name {
                "tls_connect" => "New TLS connection latency",
                "conn_rate" => "New TLS connections per second",
                "http_rr" => "Plain HTTP keep-alive request latency, Host checked per request",
                _ => "Keep-alive request latency",
            };
            (title, what, Some("direct"), rr_specs(), paths)
        }
        "http_keepalive" => {
            let paths = http_relay::run(name, s, &mut samples)?;
            (
                "Plain HTTP keep-alive request latency (per-request relay)",
                format!(
                    "Since issue 14 a connection an `http` rule allows is relayed request by \
                     request: every request framed and its Host authorized. One client sends \
                     small HTTP/1.1 requests (`Host: {api}`) over one kept-alive plain \
                     connection to port {HTTP_PORT}, one at a time, {secs}s per sample. In a lab \
                     of its own: `direct` is pod a; `egressgate` is pod b through this build \
                     (policy: an `http` rule by dnsName); `egressgate-base`, when measured, is a \
                     build from before the per-request relay (first request peeked, the rest \
                     spliced) in the same position, rounds interleaved.",
                    api = egressgate_lab::addr::API,
                    secs = s.seconds
                ),
                Some("direct"),
                rr_specs(),
                paths,
            )
        }
        "http_bulk" => {
            let paths = http_relay::run(name, s, &mut samples)?;
            let mut specs = Vec::new();
            for (key, what, short) in [
                ("down", "download (one GET, one large body)", "download"),
                ("up", "upload (POSTs of 16 MiB, Content-Length)", "upload"),
                (
                    "up_chunked",
                    "upload (POSTs of 16 MiB, chunked, 64 KiB chunks)",
                    "chunked upload",
                ),
            ] {
                specs.push(spec(key, what, "Gbit/s", Better::Higher));
                specs.push(spec(
                    &format!("cpu_per_gib_{key}"),
                    &format!("proxy CPU time per GiB, {short} (user + system)"),
                    "ms",
                    Better::Lower,
                ));
            }
            (
                "Plain HTTP bulk upload and download (per-request relay)",
                format!(
                    "One plain HTTP/1.1 connection to port {HTTP_PORT} (`Host: {api}`), {secs}s \
                     each: a download of one response body (capped at {cap} MiB, rate from the \
                     first byte), then uploads of 16 MiB request bodies one after another, with \
                     Content-Length, then chunked (rate over acknowledged requests). Paths and \
                     lab as in http_keepalive. CPU per GiB: the gateway's user + system time \
                     during the run over the bytes moved.",
                    api = egressgate_lab::addr::API,
                    secs = s.seconds,
                    cap = s.bulk_max_bytes >> 20,
                ),
                Some("direct"),
                specs,
                paths,
            )
        }
        "dns" => {
            let env = env()?;
            let paths: Vec<String> = env
                .paths
                .iter()
                .filter(|p| **p == PathKind::Direct || p.is_egressgate())
                .map(|p| p.name().to_owned())
                .collect();
            let query_file = env.lab.dir().join("dnsperf-queries.txt");
            let queries: String = (0..s.dns_names)
                .map(|i| format!("{} A\n", crate::dns::bench_name(i, crate::dns::BENCH_ZONE)))
                .collect();
            std::fs::write(&query_file, queries)?;
            interleave(name, s.rounds, &paths, &mut samples, |path, _| {
                let path = kind(path)?;
                prepare(env, path)?;
                dns_sample(env, path, s, &query_file)
            })?;
            let mut specs = vec![
                spec("p50", "latency p50 (1 outstanding)", "µs", Better::Lower),
                spec("p99", "latency p99 (1 outstanding)", "µs", Better::Lower),
                spec("p999", "latency p99.9 (1 outstanding)", "µs", Better::Lower),
            ];
            let generator = format!("own generator, {} outstanding", s.dns_concurrency);
            specs.extend(dns_rate_specs(&generator));
            if env.peers.dnsperf {
                specs.push(spec(
                    "dnsperf_qps",
                    "dnsperf queries/s",
                    "queries/s",
                    Better::Higher,
                ));
                specs.push(spec(
                    "dnsperf_avg",
                    "dnsperf average latency",
                    "µs",
                    Better::Lower,
                ));
                specs.push(spec(
                    "dnsperf_lost",
                    "dnsperf lost queries",
                    "queries",
                    Better::Lower,
                ));
            }
            (
                    "DNS through the shim vs the upstream directly",
                    format!(
                        "UDP A queries for {} distinct names to the trusted DNS address. direct: \
                         pod a reaches the upstream responder itself; egressgate: pod b's query is \
                         TPROXYed to the shim, which forwards it, records the answer in the name \
                         table and replies. The upstream is this harness's responder (no cache, no \
                         log), so the upstream is not the limit. dnsperf: 1 client, 256 outstanding, \
                         {}s.",
                        s.dns_names, s.seconds
                    ),
                    Some("direct"),
                    specs,
                    paths,
                )
        }
        "shared_ip" => {
            let env = env()?;
            let paths =
                shared_ip::connections(env, s.seconds, s.rounds, s.crowd_names, &mut samples)?;
            (
                "Names sharing one IP: new TLS connections",
                format!(
                    "Pod b makes new TLS connections to api.example.test as in tls_connect \
                     (egressgate only), first with the few names it resolved to the web server's \
                     address, then after resolving {} more names (`n<i>.{}`) to that same \
                     address. Phases in order, not interleaved: a pod cannot forget names. \
                     `names on the IP` is what the decision lines report (`namesTotal`).",
                    s.crowd_names,
                    shared_ip::CROWD_ZONE
                ),
                Some("few names"),
                vec![
                    spec("p50", "new connection latency p50", "µs", Better::Lower),
                    spec("p99", "new connection latency p99", "µs", Better::Lower),
                    spec(
                        "rate",
                        "connections/s (one client)",
                        "ops/s",
                        Better::Higher,
                    ),
                    spec(
                        "cpu_per_op",
                        "proxy CPU time per connection (user + system)",
                        "µs",
                        Better::Lower,
                    ),
                    spec("line_bytes", "decision line size", "bytes", Better::Lower),
                    spec("names_on_ip", "names on the IP", "names", Better::Higher),
                ],
                paths.to_vec(),
            )
        }
        "shared_ip_dns" => {
            let env = env()?;
            let paths = shared_ip::dns(
                env,
                s.seconds,
                s.rounds,
                s.crowd_dns_names,
                s.dns_concurrency,
                &mut samples,
            )?;
            (
                "Names sharing one IP: DNS through the shim",
                format!(
                    "Pod b queries {} names through the shim ({} outstanding), cycled: either \
                     names the responder spreads over a /17 (`n<i>.bench.test`) or names all \
                     answered with one address (`n<i>.{}`). Every answer is recorded under the \
                     pod before it is sent on.",
                    s.crowd_dns_names,
                    s.dns_concurrency,
                    shared_ip::DNS_ONE_IP_ZONE
                ),
                Some("names on distinct IPs"),
                dns_rate_specs(&format!("{} outstanding", s.dns_concurrency)),
                paths.to_vec(),
            )
        }
        "udp_flow" => {
            let env = env()?;
            let paths: Vec<String> = env
                .paths
                .iter()
                .filter(|p| **p == PathKind::Direct || p.is_egressgate())
                .map(|p| p.name().to_owned())
                .collect();
            interleave(name, s.rounds, &paths, &mut samples, |path, _| {
                let path = kind(path)?;
                prepare(env, path)?;
                udp_flow_sample(env, path, s)
            })?;
            (
                "An allowed UDP flow vs direct",
                format!(
                    "Closed-loop datagrams to a UDP echo server on the web address (port {UDP_ECHO_PORT}). \
                     direct: pod a, routed by the node; egressgate: pod b, under an enforce \
                     policy whose `udp` rule (by cidr) allows the flow. The first datagram of the \
                     flow goes through the gateway's UDP relay (its decision), the rest through \
                     the kernel's `udp_flows` set. Latency: one outstanding {UDP_SMALL}-byte \
                     datagram; throughput: {UDP_WINDOW} outstanding {UDP_LARGE}-byte datagrams \
                     (payload, one way), {}s each.",
                    s.seconds
                ),
                Some("direct"),
                vec![
                    spec("p50", "round trip p50 (1 outstanding)", "µs", Better::Lower),
                    spec("p99", "round trip p99 (1 outstanding)", "µs", Better::Lower),
                    spec(
                        "throughput",
                        &format!("throughput, {UDP_WINDOW} outstanding"),
                        "Gbit/s",
                        Better::Higher,
                    ),
                    spec(
                        "datagrams",
                        &format!("datagrams/s, {UDP_WINDOW} outstanding"),
                        "datagrams/s",
                        Better::Higher,
                    ),
                    spec(
                        "lost",
                        "lost datagrams",
                        "datagrams",
                        Better::Lower,
                    ),
                    spec(
                        "gateway_cpu",
                        "gateway CPU time during the throughput run (user + system)",
                        "ms",
                        Better::Lower,
                    ),
                ],
                paths,
            )
        }
        "memory" => {
            let env = env()?;
            let paths = path_names(&env.paths);
            let mut specs = Vec::new();
            for &count in &s.memory_counts {
                if stopped() {
                    return Err(Error::msg("interrupted"));
                }
                let label = format!("memory {count}");
                for path in &env.paths {
                    let fit = env.capacity(*path).min(env.capacity(PathKind::Direct));
                    if fit < count {
                        samples.notes.push(format!(
                            "{count} connections: {path} measured with {fit} only: \
                                 RLIMIT_NOFILE is {} here and cannot be raised (no \
                                 CAP_SYS_RESOURCE); per-connection figures are from {fit}",
                            env.nofile
                        ));
                    }
                }
                interleave(&label, s.memory_rounds, &paths, &mut samples, |path, _| {
                    let path = kind(path)?;
                    let fit = env.capacity(path).min(env.capacity(PathKind::Direct));
                    hold_sample(env, path, count, count.min(fit))
                })?;
                let k = if count >= 1000 && count % 1000 == 0 {
                    format!("{}k", count / 1000)
                } else {
                    count.to_string()
                };
                specs.push(spec(
                    &format!("conns_{count}"),
                    &format!("connections actually held for {k}"),
                    "connections",
                    Better::Higher,
                ));
                specs.push(spec(
                    &format!("rss_per_conn_{count}"),
                    &format!("proxy RSS per idle connection at {k}"),
                    "KiB",
                    Better::Lower,
                ));
                specs.push(spec(
                    &format!("rss_{count}"),
                    &format!("proxy RSS with {k} idle connections"),
                    "MiB",
                    Better::Lower,
                ));
                specs.push(spec(
                    &format!("fds_per_conn_{count}"),
                    &format!("proxy file descriptors per connection at {k}"),
                    "fds",
                    Better::Lower,
                ));
                specs.push(spec(
                    &format!("slab_per_conn_{count}"),
                    &format!("kernel slab per connection at {k} (whole machine, noisy)"),
                    "KiB",
                    Better::Lower,
                ));
                specs.push(spec(
                    &format!("upstream_{count}"),
                    &format!("connections established at the upstream at {k}"),
                    "connections",
                    Better::Higher,
                ));
            }
            (
                    "Memory with idle connections",
                    format!(
                        "A client opens {} connections (spread over {} upstream ports), each sends \
                         one TLS ClientHello (SNI {}), which the upstream answers with a ServerHello \
                         record and nothing more, and holds them: idle relayed connections on every \
                         path (egressgate reads the server's first answer before it relays; before \
                         2026-12-07 the upstream did not answer, and egressgate's connections were \
                         measured still waiting for it). Measured once all are open: the proxy's RSS \
                         (/proc/PID/status VmRSS) and fds against its idle baseline, the kernel's \
                         slab (whole machine) and how many connections the upstream has established \
                         (proof they were spliced, not stuck in a peek).",
                        s.memory_counts
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(" and "),
                        HOLD_PORTS.len(),
                        egressgate_lab::addr::API
                    ),
                    Some("direct"),
                    specs,
                    paths,
                )
        }
        "reload" => {
            let env = env()?;
            if !env.paths.contains(&PathKind::Egressgate) {
                return Err(Error::msg("reload needs the egressgate path"));
            }
            reload(env, s, &mut samples)?;
            let mut specs = rr_specs();
            specs.push(spec("max", "latency max", "µs", Better::Lower));
            specs.push(spec(
                "reloads",
                "policy reloads in the window",
                "reloads",
                Better::Higher,
            ));
            (
                    "Policy reload under load",
                    format!(
                        "egressgate only. A {}-rule policy set ({} policies) is in force in both \
                         windows; {} clients make new TLS connections as in conn_rate. `steady`: \
                         nothing changes; `reloading`: the policy files are rewritten every second, \
                         so the gateway reloads them while connections arrive. Stalls show in \
                         p99.9 and max.",
                        s.decision.rules(),
                        s.decision.policies,
                        s.conn_concurrency.min(8)
                    ),
                    Some("steady"),
                    specs,
                    vec!["steady".to_owned(), "reloading".to_owned()],
                )
        }
        "soak" => {
            let env = env()?;
            if !env.paths.contains(&PathKind::Egressgate) {
                return Err(Error::msg("soak needs the egressgate path"));
            }
            let capacity = env
                .capacity(PathKind::Egressgate)
                .min(env.capacity(PathKind::Direct));
            let peak = if s.smoke { capacity.min(200) } else { capacity };
            let paths = vec![PathKind::Egressgate.name().to_owned()];
            interleave(name, 1, &paths, &mut samples, |_, _| {
                soak::sample(env, peak, &s.soak, s.conn_concurrency)
            })?;
            samples.notes.push(format!(
                "Peak: {peak} idle TLS connections held at once, the most RLIMIT_NOFILE ({}) \
                     allows here (the issue asks for 50,000; the limit cannot be raised without \
                     CAP_SYS_RESOURCE).",
                env.nofile
            ));
            (
                "Soak: peak connections, then churn",
                format!(
                    "egressgate only. First {peak} concurrent idle spliced TLS connections (opened, \
                     measured, closed). Then {:.0} s of churn in chunks of {:.0} s: {} clients \
                     opening a new TLS connection per request for two thirds of each chunk, then \
                     DNS queries for {} names with a one-second TTL. Afterwards the gateway must \
                     be back at its baseline: no open connection, descriptors within {} of the \
                     start, name-table entries expired and purged, RSS flat after the first \
                     chunk; and every connection opened must have its decision line.",
                    s.soak.seconds,
                    s.soak.chunk_seconds,
                    s.conn_concurrency,
                    s.soak.dns_names,
                    soak::FD_SLACK
                ),
                None,
                soak::specs()
                    .into_iter()
                    .map(|(k, l, u, b)| spec(k, l, u, b))
                    .collect(),
                paths,
            )
        }
        "restart" => {
            let outcome = restart::run(&s.restart)?;
            for (phase, values) in outcome.values {
                samples.add(&phase, values);
            }
            samples.notes.extend(outcome.notes);
            let r = &s.restart;
            (
                "Restarts and upgrades under load",
                format!(
                    "egressgate only, in a lab of its own: 4 pods, all intercepted, each running \
                     for the whole run 2 workers making new TLS connections (each after its own \
                     DNS lookup of api.example.test through the shim), 1 worker connecting to \
                     {cached} names the pod resolved once at start and never again (a pod that \
                     caches DNS answers), 1 worker of DNS queries over UDP and 1 over a kept \
                     TCP connection (a connection the gateway closed is retried once on a new \
                     one, as stubs do), and 2 streams (staggered), each a TLS connection sending a numbered 256-byte block every 100 ms and checking its \
                     echo, living {life} s before the next opens; every worker pauses {pace} ms \
                     after each operation. After {base} s: {n} rolling upgrades in a row (a \
                     second `egressgate run` with the same config and state directory takes \
                     over; the binary alternates between the build and a copy of it), then a \
                     SIGTERM restart (signal, wait for the exit, start), then kill -9 and start; \
                     {settle} s of load after each. Each phase runs from its event to the next \
                     one. Failures are timed by the clients; no_dns_record denials are read from \
                     the decision lines of every gateway process (cached: names resolved once \
                     at the start, before every event; fresh: resolved just before the \
                     connection). Gaps: the longest interval without a success from the event's \
                     start until a second after the new process listened.",
                    cached = restart::CACHED_PER_POD,
                    life = r.stream_life,
                    pace = r.pace_ms,
                    base = r.baseline,
                    n = r.upgrades,
                    settle = r.settle,
                ),
                None,
                restart::specs()
                    .into_iter()
                    .map(|(k, l, u, b)| spec(k, l, u, b))
                    .collect(),
                outcome.phases,
            )
        }
        "dns_journal" => {
            journal_cost::run(s, &mut samples)?;
            (
                "DNS: the cost of the name journal",
                format!(
                    "Since issue 13 the shim appends every record to the journal in `state.dir` \
                     before the reply leaves. A/B of the same binary in a lab of its own, {} \
                     interleaved rounds: `journal` (a writable state directory, emptied before \
                     each sample) against `in-memory` (`state.dir` is a regular file: the gateway \
                     warns and keeps no journal), both pinned as in the `dns` scenario and \
                     restarted for every sample; `direct` is pod a asking the responder itself; \
                     `before-journal`, when measured, is a build from before the journal with \
                     the same config less `state`. \
                     UDP A queries for {} names: latency with 1 outstanding, then {} outstanding \
                     for the rate and the gateway's CPU time per answer.",
                    s.rounds, s.dns_names, s.dns_concurrency
                ),
                Some("direct"),
                vec![
                    spec("p50", "latency p50 (1 outstanding)", "µs", Better::Lower),
                    spec("p99", "latency p99 (1 outstanding)", "µs", Better::Lower),
                    spec("p999", "latency p99.9 (1 outstanding)", "µs", Better::Lower),
                    spec(
                        "qps",
                        &format!("queries/s, {} outstanding", s.dns_concurrency),
                        "queries/s",
                        Better::Higher,
                    ),
                    spec("lost", "lost queries", "queries", Better::Lower),
                    spec(
                        "cpu_per_query",
                        "gateway CPU time per answered query",
                        "µs",
                        Better::Lower,
                    ),
                ],
                journal_cost::paths(s),
            )
        }
        "decision" => {
            let paths = vec!["in-process".to_owned()];
            let size = &s.decision;
            let bench = decision::Bench::build(size)?;
            interleave(name, s.rounds.max(3), &paths, &mut samples, |_, _| {
                bench.measure(size)
            })?;
            samples.notes.extend(bench.notes());
            (
                    "Decision and reload cost (in process)",
                    format!(
                        "The gateway's decision for a new connection, with its own code: identity \
                         lookup → policy selection → names this pod resolved to the destination \
                         (NameTable::lookup) → Selection::grants → effective grants → TLS \
                         authorization. {} rules in {} policies, {} pods, {} recorded names; each \
                         decision timed alone ({} per round). Reload: egressgate::store::load_policy_dir \
                         of that policy set (read, parse, compile). Single thread, pinned.",
                        size.rules(),
                        size.policies,
                        size.pods,
                        size.pods * size.names_per_pod,
                        size.decisions
                    ),
                    None,
                    decision::specs()
                        .into_iter()
                        .map(|(k, l, u, b)| spec(k, l, u, b))
                        .collect(),
                    paths,
                )
        }
        other => return Err(Error::msg(format!("unknown scenario {other:?}"))),
    };
    // An A/B run: every figure also as a ratio to the other build.
    let baseline = if paths.iter().any(|p| p == PathKind::Baseline.name()) {
        Some(PathKind::Baseline.name())
    } else {
        baseline
    };
    let metrics = specs
        .into_iter()
        .map(|spec| MetricResult {
            paths: paths
                .iter()
                .filter_map(|p| {
                    let values = samples.values.get(&(spec.key.clone(), p.clone()))?;
                    PathStats::new(p, values.clone())
                })
                .collect(),
            key: spec.key,
            label: spec.label,
            unit: spec.unit.to_owned(),
            better: spec.better,
        })
        .collect();
    let mut path_infos: Vec<PathInfo> = paths
        .iter()
        .map(|p| PathInfo {
            name: p.clone(),
            description: PathKind::parse(p)
                .map(|k| k.describe().to_owned())
                .unwrap_or_default(),
        })
        .collect();
    let mut notes = samples.notes;
    if let Some(env) = run.env {
        for (path, why) in &env.skipped {
            notes.push(format!("path {path} skipped: {why}"));
        }
    }
    if name == "dns" {
        path_infos.iter_mut().for_each(|p| {
            p.description = match p.name.as_str() {
                "direct" => "pod a queries the upstream responder directly".to_owned(),
                _ => "pod b's queries go through the DNS shim (TPROXY)".to_owned(),
            }
        });
    }
    Ok(ScenarioResult {
        scenario: name.to_owned(),
        title: title.to_owned(),
        description,
        baseline: baseline.map(str::to_owned),
        started,
        seconds: clock.elapsed().as_secs_f64(),
        rounds: match name {
            "memory" => s.memory_rounds,
            "restart" => 1,
            _ => s.rounds,
        },
        smoke: s.smoke,
        machine: run.machine.clone(),
        placement: run
            .env
            .map(|e| e.placement.text.clone())
            .unwrap_or_else(|| "the harness thread, pinned to CPU 0".to_owned()),
        paths: path_infos,
        settings: s.as_map(),
        metrics,
        notes,
    })
}

fn path_names(paths: &[PathKind]) -> Vec<String> {
    paths.iter().map(|p| p.name().to_owned()).collect()
}

fn kind(path: &str) -> Result<PathKind, Error> {
    PathKind::parse(path).ok_or_else(|| Error::msg(format!("unknown path {path}")))
}

/// Before a sample of an egressgate build: that build serves pod b (see `Env::serve`), and
/// the pod re-resolves the allowed names (see `Env::resolve_names`).
pub(crate) fn prepare(env: &Env, path: PathKind) -> Result<(), Error> {
    if path.is_egressgate() {
        env.serve(path)?;
        env.resolve_names()?;
    }
    Ok(())
}

pub(crate) fn limit(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds + 20.0)
}

fn rr_specs() -> Vec<Spec> {
    vec![
        spec("rate", "operations/s", "ops/s", Better::Higher),
        spec("p50", "latency p50", "µs", Better::Lower),
        spec("p90", "latency p90", "µs", Better::Lower),
        spec("p99", "latency p99", "µs", Better::Lower),
        spec("p999", "latency p99.9", "µs", Better::Lower),
        spec(
            "cpu_per_op",
            "proxy CPU time per operation (user + system, all threads)",
            "µs",
            Better::Lower,
        ),
    ]
}

pub(crate) fn rr_values(r: &RrResult) -> Vec<(String, f64)> {
    vec![
        ("rate".into(), r.per_second),
        ("p50".into(), r.latency.p50_us),
        ("p90".into(), r.latency.p90_us),
        ("p99".into(), r.latency.p99_us),
        ("p999".into(), r.latency.p999_us),
    ]
}

fn target_args(env: &Env, path: PathKind, port: u16, tls: bool) -> Vec<String> {
    let mut args = vec!["--target".to_owned(), env.target(path, port).to_string()];
    if tls {
        args.extend(["--tls".to_owned(), "--ca".to_owned(), env.ca()]);
    }
    args
}

fn bulk_args(env: &Env, path: PathKind, tls: bool, seconds: f64, max: u64) -> Vec<String> {
    let port = if tls { TLS_PORT } else { BULK_PORT };
    let mut args = vec!["bulk".to_owned()];
    args.extend(target_args(env, path, port, tls));
    args.extend([
        "--seconds".to_owned(),
        seconds.to_string(),
        "--max-bytes".to_owned(),
        max.to_string(),
    ]);
    args
}

/// Arguments of an `rr` client over TLS to the TLS port.
pub fn rr_args(
    env: &Env,
    path: PathKind,
    new_conn: bool,
    concurrency: usize,
    seconds: f64,
    max_ops: u64,
    warmup: f64,
) -> Vec<String> {
    let target = target_args(env, path, TLS_PORT, true);
    rr_args_to(target, new_conn, concurrency, seconds, max_ops, warmup)
}

/// Arguments of an `rr` client to `target` (its [`target_args`]).
fn rr_args_to(
    target: Vec<String>,
    new_conn: bool,
    concurrency: usize,
    seconds: f64,
    max_ops: u64,
    warmup: f64,
) -> Vec<String> {
    let mut args = vec!["rr".to_owned()];
    args.extend(target);
    if new_conn {
        args.push("--new-conn".to_owned());
    }
    args.extend([
        "--concurrency".to_owned(),
        concurrency.to_string(),
        "--seconds".to_owned(),
        seconds.to_string(),
        "--max-ops".to_owned(),
        max_ops.to_string(),
        "--warmup".to_owned(),
        warmup.to_string(),
    ]);
    args
}

fn dns_sample(
    env: &Env,
    path: PathKind,
    s: &Settings,
    query_file: &Path,
) -> Result<Vec<(String, f64)>, Error> {
    let server = env.dns_server().to_string();
    let dns_args = |concurrency: usize| -> Vec<String> {
        [
            "dns",
            "--server",
            &server,
            "--names",
            &s.dns_names.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--seconds",
            &s.seconds.to_string(),
            "--max-queries",
            "100000000",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let latency: DnsResult = env.client(path, &dns_args(1), limit(s.seconds))?;
    let (load, cpu_used): (DnsResult, _) = proxy_cpu_during(env, path, || {
        env.client(path, &dns_args(s.dns_concurrency), limit(s.seconds))
    })?;
    let mut values = vec![
        ("p50".to_owned(), latency.latency.p50_us),
        ("p99".to_owned(), latency.latency.p99_us),
        ("p999".to_owned(), latency.latency.p999_us),
        ("qps".to_owned(), load.per_second),
        ("lost".to_owned(), (latency.lost + load.lost) as f64),
    ];
    // The shim's own cost, whatever else limits the rate here (the generator and the upstream
    // share the other CPU): CPU time per answered query, and the rate one core would sustain.
    if let Some(used) = cpu_used.filter(|&used| used > 0.0 && load.answered > 0) {
        let per_query = used / load.answered as f64;
        values.push(("cpu_per_query".to_owned(), per_query * 1e6));
        values.push(("qps_per_core".to_owned(), 1.0 / per_query));
    }
    if env.peers.dnsperf {
        let seconds = format!("{}", s.seconds.ceil().max(1.0));
        let file = query_file.display().to_string();
        let out = env.run_pinned(
            path,
            &[
                "dnsperf",
                "-s",
                egressgate_lab::addr::TRUSTED_DNS,
                "-p",
                "53",
                "-d",
                &file,
                "-l",
                &seconds,
                "-c",
                "1",
                "-T",
                "1",
                // Socket buffers in KiB: the default (~32 KiB) overflowed at 120k q/s.
                "-b",
                "4096",
                "-q",
                "256",
                "-t",
                "1",
            ],
            limit(s.seconds),
        )?;
        let field = |key: &str| -> Option<f64> {
            out.stdout
                .lines()
                .find(|l| l.trim_start().starts_with(key))?
                .split_once(':')?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        match (field("Queries per second"), field("Average Latency (s)")) {
            (Some(qps), Some(avg)) => {
                values.push(("dnsperf_qps".to_owned(), qps));
                values.push(("dnsperf_avg".to_owned(), avg * 1e6));
                values.push((
                    "dnsperf_lost".to_owned(),
                    field("Queries lost").unwrap_or(0.0),
                ));
            }
            _ => return Err(Error::msg(format!("dnsperf output not understood:\n{out}"))),
        }
    }
    Ok(values)
}

/// Datagram sizes and window of the `udp_flow` scenario.
const UDP_SMALL: usize = 64;
const UDP_LARGE: usize = 1400;
const UDP_WINDOW: usize = 32;

/// One `udp_flow` round on `path`: latency with one datagram outstanding, then throughput with
/// [`UDP_WINDOW`], each from a new source port. The flow is (pod address, destination, port),
/// so through egressgate only the first datagram of the first round is decided; later rounds
/// find the flow in the kernel's set (within `udp.flowIdleSeconds`).
fn udp_flow_sample(env: &Env, path: PathKind, s: &Settings) -> Result<Vec<(String, f64)>, Error> {
    let server = env.target(path, UDP_ECHO_PORT).to_string();
    let udp_args = |size: usize, concurrency: usize| -> Vec<String> {
        [
            "udp",
            "--server",
            &server,
            "--size",
            &size.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--seconds",
            &s.seconds.to_string(),
            "--max-datagrams",
            "100000000",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let latency: UdpResult = env.client(path, &udp_args(UDP_SMALL, 1), limit(s.seconds))?;
    let (load, cpu_used): (UdpResult, _) = proxy_cpu_during(env, path, || {
        env.client(path, &udp_args(UDP_LARGE, UDP_WINDOW), limit(s.seconds))
    })?;
    if latency.answered == 0 || load.answered == 0 {
        return Err(Error::msg(format!(
            "no echo: {} of {} and {} of {} answered",
            latency.answered, latency.sent, load.answered, load.sent
        )));
    }
    let mut values = vec![
        ("p50".to_owned(), latency.latency.p50_us),
        ("p99".to_owned(), latency.latency.p99_us),
        ("throughput".to_owned(), load.gbit_per_s),
        ("datagrams".to_owned(), load.per_second),
        ("lost".to_owned(), (latency.lost + load.lost) as f64),
    ];
    if let Some(used) = cpu_used {
        values.push(("gateway_cpu".to_owned(), used * 1e3));
    }
    Ok(values)
}

/// Runs `work`; also returns the CPU seconds the proxy of `path` spent meanwhile (`None` for
/// the direct path, or if /proc could not be read).
pub(crate) fn proxy_cpu_during<T>(
    env: &Env,
    path: PathKind,
    work: impl FnOnce() -> Result<T, Error>,
) -> Result<(T, Option<f64>), Error> {
    let pid = env.proxy_pid(path);
    let before = pid.and_then(cpu_seconds);
    let result = work()?;
    let used = pid
        .and_then(cpu_seconds)
        .zip(before)
        .map(|(after, before)| after - before);
    Ok((result, used))
}

/// User + system CPU time of process `pid` (all its threads) so far, from /proc/PID/stat.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces: state is the first, utime the
    // 12th and stime the 13th (proc(5) fields 14 and 15).
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: f64 = fields.next()?.parse::<f64>().ok()? + fields.next()?.parse::<f64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks / per_second as f64)
}

/// Each proxy's RSS before its first memory sample, by pid.
static FIRST_RSS: std::sync::Mutex<BTreeMap<u32, f64>> = std::sync::Mutex::new(BTreeMap::new());

pub(crate) fn status_kib(pid: u32, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(crate) fn fd_count(pid: u32) -> Option<f64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as f64)
}

fn slab_kib() -> Option<f64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Slab:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Established TCP connections in the upstream namespace (`ss -s`).
fn upstream_established(env: &Env) -> Option<f64> {
    let out = env
        .lab
        .up()
        .run_with(&["ss", "-s"], None, Duration::from_secs(10))
        .ok()?;
    let line = out.stdout.lines().find(|l| l.starts_with("TCP:"))?;
    let at = line.find("estab ")? + "estab ".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Opens `count` idle connections through `path`, measures, closes them.
pub(crate) fn hold_sample(
    env: &Env,
    path: PathKind,
    key: usize,
    count: usize,
) -> Result<Vec<(String, f64)>, Error> {
    prepare(env, path)?;
    let pid = env.proxy_pid(path);
    // The idle baseline is the proxy's RSS before its first sample: allocators keep memory
    // after connections close, so a later "before" would hide the connections' cost.
    let rss0 = pid.and_then(|p| {
        let now = status_kib(p, "VmRSS:")?;
        let mut first = FIRST_RSS.lock().ok()?;
        Some(*first.entry(p).or_insert(now))
    });
    let fds0 = pid.and_then(fd_count);
    let slab0 = slab_kib();
    let up0 = upstream_established(env).unwrap_or(0.0);
    let targets: Vec<String> = HOLD_PORTS
        .iter()
        .map(|&port| env.target(path, port).to_string())
        .collect();
    let bound = 60.0 + count as f64 / 250.0;
    let args: Vec<String> = [
        "hold",
        "--targets",
        &targets.join(","),
        "--ca",
        &env.ca(),
        "--count",
        &count.to_string(),
        "--concurrency",
        "128",
        "--seconds",
        &bound.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let deadline = Instant::now() + Duration::from_secs_f64(bound + 10.0);
    let mut client = env.spawn_client(path, &args, Duration::from_secs_f64(bound + 5.0))?;
    let label = format!("  {path} {count}");
    let Some(ready) = client.wait_for("ready", deadline, &label) else {
        return Err(Error::msg(format!(
            "hold client never got ready: {}",
            client.stderr()
        )));
    };
    let mut parts = ready.split_whitespace().skip(1);
    let opened: f64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // Let the proxy finish peeking and connecting upstream, then wait until the upstream count
    // stops growing.
    let mut up = up0;
    let settle = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(700));
        let now = upstream_established(env).unwrap_or(0.0);
        if now <= up || Instant::now() > settle {
            up = up.max(now);
            break;
        }
        up = now;
    }
    let rss1 = pid.and_then(|p| status_kib(p, "VmRSS:"));
    let fds1 = pid.and_then(fd_count);
    let slab1 = slab_kib();
    let result = client.finish(deadline);
    let held: Option<HoldResult> = result.and_then(|l| serde_json::from_str(&l).ok());
    if opened < count as f64 * 0.99 {
        let why = held.and_then(|h| h.first_error).unwrap_or_default();
        return Err(Error::msg(format!(
            "only {opened} of {count} connections opened: {why}"
        )));
    }
    // Wait for the proxy and the upstream to close them before the next sample, so that the
    // next sample's baseline is idle.
    let drained = Instant::now() + Duration::from_secs(60);
    while upstream_established(env).is_some_and(|n| n > up0 + 32.0) && Instant::now() < drained {
        std::thread::sleep(Duration::from_millis(200));
    }
    if let (Some(pid), Some(fds0)) = (pid, fds0) {
        let drained = Instant::now() + Duration::from_secs(60);
        while fd_count(pid).is_some_and(|n| n > fds0 + 32.0) && Instant::now() < drained {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut values = vec![
        (format!("upstream_{key}"), up - up0),
        (format!("conns_{key}"), opened),
    ];
    if let (Some(a), Some(b)) = (slab0, slab1) {
        values.push((format!("slab_per_conn_{key}"), (b - a) / opened));
    }
    if let (Some(a), Some(b)) = (rss0, rss1) {
        values.push((format!("rss_per_conn_{key}"), (b - a) / opened));
        values.push((format!("rss_{key}"), b / 1024.0));
    }
    if let (Some(a), Some(b)) = (fds0, fds1) {
        values.push((format!("fds_per_conn_{key}"), (b - a) / opened));
    }
    Ok(values)
}

/// Counts `needle` in `file` after `offset`; returns the count and the new end offset.
pub(crate) fn count_after(file: &Path, offset: u64, needle: &str) -> (usize, u64) {
    let Ok(mut f) = std::fs::File::open(file) else {
        return (0, offset);
    };
    let _ = f.seek(SeekFrom::Start(offset));
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    (text.matches(needle).count(), offset + text.len() as u64)
}

fn reload(env: &Env, s: &Settings, samples: &mut Samples) -> Result<(), Error> {
    let dir = env.lab.policy_dir();
    let big = dir.join("zz-loadtest-big.yaml");
    let text = decision::policy_yaml(&s.decision);
    std::fs::write(&big, &text)?;
    // Let the gateway load it before the first window.
    std::thread::sleep(Duration::from_millis(2500));
    let stdout = env.gateway_log();
    let needle = "\"event\":\"policy_reload\"";
    let concurrency = s.conn_concurrency.min(8);
    let paths = ["steady".to_owned(), "reloading".to_owned()];
    let result = interleave("reload", s.rounds, &paths, samples, |path, _| {
        prepare(env, PathKind::Egressgate)?;
        let start = std::fs::metadata(&stdout).map_or(0, |m| m.len());
        let writing = Arc::new(AtomicBool::new(path == "reloading"));
        let writer = {
            let (writing, big, text) = (writing.clone(), big.clone(), text.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while writing.load(Ordering::Acquire) {
                    n += 1;
                    let _ = std::fs::write(&big, format!("# rewrite {n}\n{text}"));
                    let until = Instant::now() + Duration::from_secs(1);
                    while writing.load(Ordering::Acquire) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        };
        let r: Result<RrResult, Error> = env.client(
            PathKind::Egressgate,
            &rr_args(
                env,
                PathKind::Egressgate,
                true,
                concurrency,
                s.seconds.max(1.2),
                10_000_000,
                0.3,
            ),
            limit(s.seconds.max(1.2)),
        );
        writing.store(false, Ordering::Release);
        let _ = writer.join();
        let (reloads, _) = count_after(&stdout, start, needle);
        // The last rewrite may still be loading: let it finish outside the next window.
        std::thread::sleep(Duration::from_millis(1500));
        let r = r?;
        let mut values = rr_values(&r);
        values.push(("max".into(), r.latency.max_us));
        values.push(("reloads".into(), reloads as f64));
        Ok(values)
    });
    let _ = std::fs::remove_file(&big);
    result
}
