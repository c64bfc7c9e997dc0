//! The `http_keepalive` and `http_bulk` scenarios (issue 14): what the per-request HTTP/1 relay
//! costs. Since issue 14, a connection an `http` rule allows is relayed request by request (the
//! client→server direction framed, every request's Host authorized, bodies spliced by length);
//! before, the first request's Host was peeked and the rest spliced blindly. A lab of its own
//! (pod a direct, pod b intercepted, a policy with only an `http` rule, which an older build
//! parses too) runs interleaved rounds of `direct`, `egressgate` (this build) and, with
//! `--http-base-bin`, `egressgate-base` (a build from before the per-request relay) in the same
//! position: the gateway variant of a sample is started for it (the previous one stopped),
//! pinned as in the shared bench, and pod b resolves the name through its shim first.

use std::path::PathBuf;
use std::time::Duration;

use egressgate_lab::daemon::Daemon;
use egressgate_lab::{addr, Gateway, GatewayOptions, Lab};

use crate::client::{BulkResult, RrResult};
use crate::env::{self, CpuAwake, Placement};
use crate::scenarios::{cpu_seconds, interleave, limit, rr_values, Samples, Settings};
use crate::server::HTTP_PORT;
use crate::{progress, Error};

/// The path of `--http-base-bin`.
pub const BASE: &str = "egressgate-base";
/// The path of this build.
const NEW: &str = "egressgate";
/// Body of each upload request.
const UPLOAD_REQUEST_BYTES: u64 = 16 << 20;

/// The paths of the A/B, in round order.
pub fn paths(s: &Settings) -> Vec<String> {
    let mut paths = vec!["direct".to_owned(), NEW.to_owned()];
    if s.http_base_bin.is_some() {
        paths.push(BASE.to_owned());
    }
    paths
}

/// Pod b (role=batch) may reach api.example.test over plain HTTP on the HTTP port.
fn policy() -> String {
    format!(
        "apiVersion: egressgate.dev/v1alpha1\n\
         kind: EgressPolicy\n\
         metadata: {{name: loadtest-http, namespace: shop}}\n\
         spec:\n  podSelector: {{matchLabels: {{role: batch}}}}\n  egress:\n    \
         - to: [{{dnsName: {api}}}]\n      ports:\n        \
         - {{port: {HTTP_PORT}, protocol: http}}\n",
        api = addr::API,
    )
}

/// Field order is drop order: the gateway and the server before the lab.
struct HttpLab {
    gateway: Option<(String, Gateway)>,
    _server: Daemon,
    lab: Lab,
    exe: PathBuf,
    placement: Placement,
    options: GatewayOptions,
    started: usize,
    base_bin: Option<PathBuf>,
    _awake: CpuAwake,
}

impl HttpLab {
    fn start(scenario: &str, base_bin: Option<PathBuf>) -> Result<HttpLab, Error> {
        let placement = Placement::detect();
        let awake = CpuAwake::hold();
        let exe = std::env::current_exe()?;
        let options = GatewayOptions {
            interfaces: vec!["egpb".to_owned()],
            // Pinned to one CPU after it starts, so it cannot count its CPUs itself.
            workers: Some(1),
            env: vec![("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned())],
            ..GatewayOptions::default()
        }
        .policy("loadtest-http.yaml", &policy());
        progress(&format!(
            "{scenario}: starting its lab (pod a direct, pod b through the gateway)"
        ));
        let (mut lab, server, _certs) = env::served_lab(2, options.clone(), placement.load_cpu)?;
        // The lab's own gateway goes: each sample starts the variant it measures.
        drop(lab.take_gateway());
        Ok(HttpLab {
            gateway: None,
            _server: server,
            lab,
            exe,
            placement,
            options,
            started: 0,
            base_bin,
            _awake: awake,
        })
    }

    /// The running gateway of `variant`, started (and pod b's name resolved) if another ran.
    fn pid_for(&mut self, variant: &str) -> Result<u32, Error> {
        if let Some((running, gateway)) = &self.gateway {
            if running == variant {
                return Ok(gateway.daemon().pid());
            }
        }
        if let Some((_, mut old)) = self.gateway.take() {
            old.daemon_mut().stop();
        }
        let (bin, options) = match (&self.base_bin, variant) {
            // From before `listen.workers`: TOKIO_WORKER_THREADS sizes it.
            (Some(base), BASE) => (
                base.clone(),
                GatewayOptions {
                    workers: None,
                    ..self.options.clone()
                },
            ),
            _ => (
                egressgate_lab::gateway::egressgate_bin()?,
                self.options.clone(),
            ),
        };
        // A state directory per variant: the builds need not share a journal format.
        let state = self.lab.dir().join(format!("state-{variant}"));
        let config = self.lab.dir().join(format!("gateway-{variant}.yaml"));
        std::fs::write(
            &config,
            options.config_yaml(&self.lab.policy_dir(), &self.lab.identity_file(), &state)?,
        )?;
        self.started += 1;
        let gateway = Gateway::start_named(
            self.lab.node(),
            bin,
            config,
            &self.options.env,
            self.lab.dir(),
            &format!("egressgate-{variant}-{}", self.started),
        )?;
        let pid = gateway.daemon().pid();
        env::pin(pid, &self.placement.proxy_cpu.to_string())?;
        self.gateway = Some((variant.to_owned(), gateway));
        let out = self.lab.pod("b").run_with(
            &["dig", "+short", "+time=2", "+tries=3", addr::API],
            None,
            Duration::from_secs(10),
        )?;
        if out.stdout.trim() != addr::WEB {
            return Err(Error::msg(format!(
                "pod b cannot resolve {} through the {variant} shim:\n{out}",
                addr::API
            )));
        }
        Ok(pid)
    }
}

fn target() -> String {
    format!("{}:{HTTP_PORT}", addr::WEB)
}

fn keepalive_args(s: &Settings) -> Vec<String> {
    [
        "rr",
        "--target",
        &target(),
        "--sni",
        addr::API,
        "--seconds",
        &s.seconds.to_string(),
        "--max-ops",
        "10000000",
        "--warmup",
        "0.3",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn bulk_args(s: &Settings, direction: &str) -> Vec<String> {
    [
        "http-bulk",
        "--target",
        &target(),
        "--sni",
        addr::API,
        "--direction",
        direction,
        "--seconds",
        &s.seconds.to_string(),
        "--max-bytes",
        &s.bulk_max_bytes.to_string(),
        "--request-bytes",
        &UPLOAD_REQUEST_BYTES.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The bulk runs of one sample: (metric key, the client's `--direction`).
const BULK_RUNS: [(&str, &str); 3] = [("down", "down"), ("up", "up"), ("up_chunked", "up-chunked")];

/// Runs `scenario` (`http_keepalive` or `http_bulk`) into `samples`; returns its paths.
pub fn run(scenario: &str, s: &Settings, samples: &mut Samples) -> Result<Vec<String>, Error> {
    let mut hl = HttpLab::start(scenario, s.http_base_bin.clone())?;
    let paths = paths(s);
    let bulk = scenario == "http_bulk";
    let result = interleave(scenario, s.rounds, &paths, samples, |path, _| {
        let (pod, pid) = match path {
            "direct" => ("a", None),
            variant => ("b", Some(hl.pid_for(variant)?)),
        };
        let ns = hl.lab.pod(pod);
        let cpu = Some(hl.placement.load_cpu);
        let mut values = Vec::new();
        if bulk {
            for (key, arg) in BULK_RUNS {
                let before = pid.and_then(cpu_seconds);
                let r: BulkResult =
                    env::run_client(ns, &hl.exe, cpu, &bulk_args(s, arg), limit(s.seconds))?;
                if r.bytes == 0 {
                    return Err(Error::msg(format!("{key}: no byte moved")));
                }
                values.push((key.to_owned(), r.gbit_per_s));
                let used = pid.and_then(cpu_seconds).zip(before).map(|(a, b)| a - b);
                if let Some(used) = used {
                    values.push((
                        format!("cpu_per_gib_{key}"),
                        used * 1e3 / (r.bytes as f64 / f64::from(1u32 << 30)),
                    ));
                }
            }
        } else {
            let before = pid.and_then(cpu_seconds);
            let r: RrResult =
                env::run_client(ns, &hl.exe, cpu, &keepalive_args(s), limit(s.seconds))?;
            if r.ops == 0 {
                return Err(Error::msg(format!(
                    "no request succeeded: {}",
                    r.first_error.unwrap_or_default()
                )));
            }
            values = rr_values(&r);
            let used = pid.and_then(cpu_seconds).zip(before).map(|(a, b)| a - b);
            if let Some(used) = used.filter(|&used| used > 0.0 && r.attempts > 0) {
                values.push(("cpu_per_op".to_owned(), used / r.attempts as f64 * 1e6));
            }
        }
        Ok(values)
    });
    if let Some((_, mut gateway)) = hl.gateway.take() {
        gateway.daemon_mut().stop();
    }
    match &hl.base_bin {
        Some(base) => samples.notes.push(format!(
            "{BASE}: {} (a build from before the per-request HTTP relay), same config and policy.",
            base.display()
        )),
        None => samples.notes.push(format!(
            "{BASE} not measured: no --http-base-bin (a build from before the per-request HTTP \
             relay, e.g. of 343d3021^)."
        )),
    }
    result.map(|()| paths)
}
