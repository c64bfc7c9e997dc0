//! The `dns_journal` scenario (issue 13): what the name journal costs per DNS answer. Since
//! the journal, the shim appends every record to `state.dir` before the reply leaves. There is
//! no switch to turn it off; a gateway whose `state.dir` is a regular file cannot create its
//! journal, warns, and keeps the table in memory only (`gateway/src/state.rs`, `journal`). So
//! the A/B runs the same binary with two configs, restarted between samples, in interleaved
//! rounds: `direct` (pod a asks the responder itself), `journal` and `in-memory` (pod b through
//! the shim), and with `--base-bin` `before-journal`: a build from before the journal (its config
//! has no `state`). The gateway is pinned as in the `dns` scenario; its state directory is
//! emptied before each `journal` sample.

use std::path::PathBuf;
use std::time::Duration;

use egressgate_lab::daemon::Daemon;
use egressgate_lab::{Gateway, GatewayOptions, Lab};

use crate::client::DnsResult;
use crate::env::{self, CpuAwake, Placement};
use crate::scenarios::{cpu_seconds, interleave, limit, Samples, Settings};
use crate::{progress, Error};

/// The warning of a gateway without a usable state directory.
const NO_JOURNAL_WARNING: &str = "cannot keep the name table on disk";

/// The paths of the A/B, in round order.
pub fn paths(s: &Settings) -> Vec<String> {
    let mut paths: Vec<String> = ["direct", "journal", "in-memory"]
        .map(str::to_owned)
        .to_vec();
    if s.base_bin.is_some() {
        paths.push(BASE.to_owned());
    }
    paths
}

/// The path of `--base-bin`.
const BASE: &str = "before-journal";

/// Field order is drop order: the gateway and the server before the lab.
struct JournalLab {
    gateway: Option<(String, Gateway)>,
    server: Daemon,
    lab: Lab,
    exe: PathBuf,
    placement: Placement,
    options: GatewayOptions,
    state_dir: PathBuf,
    not_a_dir: PathBuf,
    started: usize,
    /// In-memory gateways that did not print the warning (they may have journaled after all).
    unexpected: Vec<String>,
    base_bin: Option<PathBuf>,
    _awake: CpuAwake,
}

impl JournalLab {
    fn start(base_bin: Option<PathBuf>) -> Result<JournalLab, Error> {
        let placement = Placement::detect();
        let awake = CpuAwake::hold();
        let exe = std::env::current_exe()?;
        let options = GatewayOptions {
            interfaces: vec!["egpb".to_owned()],
            // Pinned to one CPU after it starts, so it cannot count its CPUs itself.
            workers: Some(1),
            env: vec![("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned())],
            ..GatewayOptions::default()
        };
        progress("dns_journal: starting its lab (pod a direct, pod b through the shim)");
        let (mut lab, server, _certs) = env::served_lab(2, options.clone(), placement.load_cpu)?;
        // The lab's own gateway goes: each sample starts the variant it measures.
        drop(lab.take_gateway());
        let state_dir = lab.dir().join("journal-state");
        let not_a_dir = lab.dir().join("state-is-a-file");
        std::fs::write(
            &not_a_dir,
            "not a directory: the gateway keeps its table in memory\n",
        )?;
        Ok(JournalLab {
            gateway: None,
            server,
            lab,
            exe,
            placement,
            options,
            state_dir,
            not_a_dir,
            started: 0,
            unexpected: Vec::new(),
            base_bin,
            _awake: awake,
        })
    }

    /// Makes `variant` the running gateway (a fresh process, an empty state directory).
    fn switch(&mut self, variant: &str) -> Result<u32, Error> {
        if let Some((_, mut old)) = self.gateway.take() {
            old.daemon_mut().stop();
        }
        let state = if variant == "journal" {
            let _ = std::fs::remove_dir_all(&self.state_dir);
            self.state_dir.clone()
        } else {
            self.not_a_dir.clone()
        };
        let config = self.lab.dir().join(format!("gateway-{variant}.yaml"));
        let mut text =
            self.options
                .config_yaml(&self.lab.policy_dir(), &self.lab.identity_file(), &state)?;
        let bin = match (&self.base_bin, variant) {
            (Some(base), BASE) => {
                // Its config knows no `state` nor `listen.workers` (and rejects unknown keys).
                text = text.replace(&format!("state:\n  dir: {}\n", state.display()), "");
                text = text.replace("  workers: 1\n", "");
                base.clone()
            }
            _ => egressgate_lab::gateway::egressgate_bin()?,
        };
        std::fs::write(&config, text)?;
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
        if variant == "in-memory" {
            // The warning is logged at start; give stderr a moment.
            std::thread::sleep(Duration::from_millis(200));
            if !gateway.daemon().stderr_text().contains(NO_JOURNAL_WARNING) {
                self.unexpected.push(gateway.daemon().name().to_owned());
            }
        }
        self.gateway = Some((variant.to_owned(), gateway));
        Ok(pid)
    }

    fn pid_for(&mut self, variant: &str) -> Result<u32, Error> {
        match &self.gateway {
            Some((running, gateway)) if running == variant => Ok(gateway.daemon().pid()),
            _ => self.switch(variant),
        }
    }
}

fn dns_args(s: &Settings, concurrency: usize) -> Vec<String> {
    [
        "dns",
        "--server",
        &format!("{}:53", egressgate_lab::addr::TRUSTED_DNS),
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
}

/// Runs the A/B into `samples`.
pub fn run(s: &Settings, samples: &mut Samples) -> Result<(), Error> {
    let mut jl = JournalLab::start(s.base_bin.clone())?;
    let paths = paths(s);
    let result = interleave("dns_journal", s.rounds, &paths, samples, |path, _| {
        let (pod, pid) = match path {
            "direct" => ("a", None),
            variant => ("b", Some(jl.pid_for(variant)?)),
        };
        let ns = jl.lab.pod(pod);
        let cpu = Some(jl.placement.load_cpu);
        let latency: DnsResult =
            env::run_client(ns, &jl.exe, cpu, &dns_args(s, 1), limit(s.seconds))?;
        let before = pid.and_then(cpu_seconds);
        let load: DnsResult = env::run_client(
            ns,
            &jl.exe,
            cpu,
            &dns_args(s, s.dns_concurrency),
            limit(s.seconds),
        )?;
        let used = pid
            .and_then(cpu_seconds)
            .zip(before)
            .map(|(after, before)| after - before);
        let mut values = vec![
            ("p50".to_owned(), latency.latency.p50_us),
            ("p99".to_owned(), latency.latency.p99_us),
            ("p999".to_owned(), latency.latency.p999_us),
            ("qps".to_owned(), load.per_second),
            ("lost".to_owned(), (latency.lost + load.lost) as f64),
        ];
        if let Some(used) = used.filter(|&used| used > 0.0 && load.answered > 0) {
            values.push((
                "cpu_per_query".to_owned(),
                used / load.answered as f64 * 1e6,
            ));
        }
        Ok(values)
    });
    if let Some((_, mut gateway)) = jl.gateway.take() {
        gateway.daemon_mut().stop();
    }
    if !jl.unexpected.is_empty() {
        samples.notes.push(format!(
            "in-memory gateways without the warning \"{NO_JOURNAL_WARNING}\" (they may have \
             journaled after all): {}",
            jl.unexpected.join(", ")
        ));
    }
    let journal_files = std::fs::read_dir(&jl.state_dir).map_or(0, Iterator::count);
    samples.notes.push(format!(
        "The journal variant's state directory held {journal_files} file(s) after its last \
         sample; the in-memory variant's `state.dir` is a regular file, so its gateway warned \
         and kept no journal."
    ));
    if let Some(base) = &jl.base_bin {
        samples.notes.push(format!(
            "{BASE}: {} (a build from before the name journal), same config less `state`.",
            base.display()
        ));
    }
    if result.is_err() {
        progress(&format!("upstream server: {}", jl.server.output_tail(10)));
    }
    result
}
