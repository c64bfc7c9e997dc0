//! `loadtest`: egressgate's benchmark harness (issue 4).
//!
//! `cargo run -p loadtest --release -- <scenario…|all|smoke|report>` builds the lab (network
//! namespaces, the real gateway with its nftables TPROXY rules, this crate's upstream server),
//! starts HAProxy and nginx from Debian beside the gateway, runs the scenarios against every path
//! in interleaved rounds, saves one JSON file per scenario in `loadtest/results/` and regenerates
//! `docs/benchmarks.md` with SVG charts. `smoke` runs everything tiny (seconds) into a temporary
//! directory and writes no report: that is what CI runs.
//!
//! Layout:
//! - [`env`]: the lab, the peers (HAProxy, nginx), CPU pinning, the paths under test;
//! - [`server`] / [`client`]: the upstream server and the load generator, run as
//!   `loadtest __serve` / `loadtest __client` inside the lab's namespaces;
//! - [`scenarios`]: what is measured and how rounds interleave; [`decision`]: the in-process
//!   decision and reload benchmark; [`restart`]: upgrades, SIGTERM and kill -9 under load, in
//!   a lab of its own; [`journal_cost`]: DNS through the shim with and without the name journal;
//!   [`http_relay`]: plain HTTP through the per-request relay against an older build;
//! - [`results`], [`report`], [`machine`]: the JSON files, the Markdown report, the machine.

mod client;
mod decision;
mod dns;
mod env;
mod http_relay;
mod journal_cost;
mod machine;
mod report;
mod restart;
mod results;
mod scenarios;
mod server;
mod shared_ip;
mod soak;
mod tls;
mod world;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;

use crate::env::{Env, PathKind, Peers};
use crate::scenarios::Settings;

/// The harness's error: a message saying which step failed.
pub struct Error(String);

impl Error {
    pub fn msg(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! from_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error(e.to_string())
            }
        }
    )*};
}
from_error!(
    std::io::Error,
    egressgate_lab::LabError,
    serde_json::Error,
    nix::Error
);

static STOP: AtomicBool = AtomicBool::new(false);
static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// CPUs of the machine, as seen before the harness pinned itself to one.
pub fn cpus() -> usize {
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Ctrl-C or SIGTERM was received: scenarios stop at the next sample and the lab is torn down.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// A progress line on stderr.
pub fn progress(line: &str) {
    eprintln!("loadtest: {line}");
}

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    about = "egressgate benchmark harness: direct vs egressgate vs HAProxy vs nginx",
    after_help = "Scenarios: tcp_bulk tls_bulk tls_connect conn_rate keepalive http_keepalive http_bulk dns udp_flow memory reload soak \
                  restart \
                  dns_journal decision.\n\
                  `all` runs them all; `smoke` runs all of them tiny (for CI); `report` only rewrites \
                  docs/benchmarks.md from loadtest/results/*.json. Needs root (namespaces, nftables)."
)]
struct Cli {
    /// Scenarios to run, `all`, `smoke` or `report`.
    #[arg(required = true)]
    what: Vec<String>,
    /// Interleaved rounds per scenario (default 5; smoke 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Length of one timed sample in seconds (default 3; smoke 0.3).
    #[arg(long)]
    seconds: Option<f64>,
    /// Paths to measure (comma-separated): direct, egressgate, haproxy, nginx.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Idle-connection counts of the memory scenario (default 10000,50000).
    #[arg(long, value_delimiter = ',')]
    memory_counts: Vec<usize>,
    /// Rounds of the memory scenario (default 2).
    #[arg(long)]
    memory_rounds: Option<usize>,
    /// Length of the soak run's churn in seconds (default 300; smoke 2).
    #[arg(long)]
    soak_seconds: Option<f64>,
    /// Rolling upgrades in a row in the restart scenario (default 3).
    #[arg(long)]
    restart_upgrades: Option<usize>,
    /// Seconds of load after each event of the restart scenario (default 8; smoke 2).
    #[arg(long)]
    restart_settle: Option<f64>,
    /// In the restart scenario, pod a also holds a half-sent DNS-over-TCP query open at all
    /// times (a slow or hostile client).
    #[arg(long)]
    restart_slow_tcp_dns: bool,
    /// `dns_journal` also measures this egressgate binary, one from before the name journal
    /// (configured without `state`), as the path `before-journal`.
    #[arg(long)]
    base_bin: Option<PathBuf>,
    /// `http_keepalive` and `http_bulk` also measure this egressgate binary, one from before
    /// the per-request HTTP relay (e.g. built from 343d3021^), as the path `egressgate-base`.
    #[arg(long)]
    http_base_bin: Option<PathBuf>,
    /// A/B: also measure this other egressgate build (e.g. one of the commit before a change)
    /// as the path `baseline`, in egressgate's place (pod b, same config and policy), the two
    /// swapped before each sample so that their rounds interleave; figures are then given as
    /// ratios to it. Results go to a temporary directory unless --results names one, and no
    /// report is written unless --report names one.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// Concurrent clients of conn_rate (default 32).
    #[arg(long)]
    conn_concurrency: Option<usize>,
    /// egressgate's `listen.workers` (default 1). With 2 or more the gateway runs on that many
    /// CPUs, the load's included (the scaling runs); 0 leaves the key out, for an
    /// `EGRESSGATE_BIN` from before it.
    #[arg(long)]
    workers: Option<usize>,
    /// Leave `intercept.clientFirstPorts` out of egressgate's config (every port to the one
    /// TPROXY listener), for an `EGRESSGATE_BIN` from before it.
    #[arg(long)]
    no_client_first: bool,
    /// Where the JSON results go (default loadtest/results; smoke: a temporary directory).
    #[arg(long)]
    results: Option<PathBuf>,
    /// The Markdown report to write (default docs/benchmarks.md).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Do not rewrite the report after the run.
    #[arg(long)]
    no_report: bool,
    /// Do not apt-get install missing peers (haproxy, libnginx-mod-stream, dnsperf).
    #[arg(long)]
    no_install: bool,
}

#[derive(Debug, Parser)]
#[command(name = "loadtest __client")]
struct ClientCli {
    #[command(subcommand)]
    mode: client::ClientMode,
}

#[derive(Debug, Parser)]
#[command(name = "loadtest __serve")]
struct ServeCli {
    #[command(flatten)]
    args: server::ServeArgs,
}

fn main() {
    cpus();
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("__client") => client::main(ClientCli::parse_from(args[1..].iter().cloned()).mode),
        Some("__serve") => server::main(ServeCli::parse_from(args[1..].iter().cloned()).args),
        _ => harness(Cli::parse()),
    };
    if let Err(e) = result {
        eprintln!("loadtest: {e}");
        std::process::exit(1);
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn harness(cli: Cli) -> Result<(), Error> {
    let smoke = cli.what.iter().any(|w| w == "smoke");
    let report_only = cli.what.iter().all(|w| w == "report");
    // `smoke` measures the build under test as its own baseline, so that the A/B path keeps
    // working.
    let ab = cli.baseline_bin.is_some() || smoke;
    let results_dir = match (&cli.results, smoke, ab) {
        (Some(dir), _, _) => dir.clone(),
        (None, true, _) => {
            std::env::temp_dir().join(format!("loadtest-smoke-{}", std::process::id()))
        }
        (None, false, true) => {
            std::env::temp_dir().join(format!("loadtest-ab-{}", std::process::id()))
        }
        (None, false, false) => Path::new(env!("CARGO_MANIFEST_DIR")).join("results"),
    };
    let report_path = cli
        .report
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs/benchmarks.md"));
    if report_only {
        let all = results::load_all(&results_dir);
        let path = report::write(&all, &results_dir, &report_path, &target_dir())?;
        progress(&format!(
            "wrote {} ({} scenarios)",
            path.display(),
            all.len()
        ));
        return Ok(());
    }

    let mut names: Vec<&str> = Vec::new();
    for w in &cli.what {
        match w.as_str() {
            "all" | "smoke" => names.extend(scenarios::ALL),
            "report" => {}
            other if scenarios::ALL.contains(&other) => names
                .push(scenarios::ALL[scenarios::ALL.iter().position(|s| *s == other).unwrap_or(0)]),
            other => {
                return Err(Error::msg(format!(
                    "unknown scenario {other:?}; known: {}, all, smoke, report",
                    scenarios::ALL.join(" ")
                )))
            }
        }
    }
    names.dedup();

    let mut settings = if smoke {
        Settings::smoke()
    } else {
        Settings::full()
    };
    if let Some(r) = cli.rounds {
        settings.rounds = r.max(1);
    }
    if let Some(s) = cli.seconds {
        settings.seconds = s.max(0.1);
    }
    if !cli.memory_counts.is_empty() {
        settings.memory_counts = cli.memory_counts.clone();
    }
    if let Some(r) = cli.memory_rounds {
        settings.memory_rounds = r.max(1);
    }
    settings.base_bin = cli.base_bin.clone();
    settings.http_base_bin = cli.http_base_bin.clone();
    settings.restart.slow_tcp_dns = cli.restart_slow_tcp_dns;
    if let Some(n) = cli.restart_upgrades {
        settings.restart.upgrades = n;
    }
    if let Some(seconds) = cli.restart_settle {
        settings.restart.settle = seconds.max(1.0);
    }
    if let Some(seconds) = cli.soak_seconds {
        settings.soak.seconds = seconds.max(1.0);
    }
    if let Some(workers) = cli.workers {
        settings.workers = workers;
    }
    settings.client_first = !cli.no_client_first;
    if let Some(c) = cli.conn_concurrency {
        settings.conn_concurrency = c.max(1);
    }
    let wanted: Vec<PathKind> = if cli.paths.is_empty() {
        let mut all = PathKind::ALL.to_vec();
        if ab {
            // Right after egressgate, so that the two builds' samples are neighbours.
            let after = all.iter().position(|p| *p == PathKind::Egressgate);
            all.insert(after.map_or(all.len(), |i| i + 1), PathKind::Baseline);
        }
        all
    } else {
        cli.paths
            .iter()
            .map(|p| PathKind::parse(p).ok_or_else(|| Error::msg(format!("unknown path {p:?}"))))
            .collect::<Result<_, _>>()?
    };

    install_signal_handlers();
    prepare_process(&settings)?;
    let machine = machine::Machine::describe();
    if names.iter().any(|n| scenarios::needs_root(n)) {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(Error::msg(
                "the lab needs root (network namespaces, nftables); run as root",
            ));
        }
        ensure_gateway_binary()?;
    }
    let env = if names.iter().any(|n| scenarios::needs_lab(n)) {
        let peers = Peers::find(!cli.no_install);
        let baseline_bin = match &cli.baseline_bin {
            Some(bin) => Some(bin.clone()),
            None if smoke => Some(egressgate_lab::gateway::egressgate_bin()?),
            None => None,
        };
        Some(Env::start(
            &wanted,
            peers,
            settings.workers,
            settings.client_first,
            baseline_bin,
        )?)
    } else {
        None
    };
    if let Some(env) = &env {
        progress(&format!(
            "paths: {}; {}",
            env.paths
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", "),
            env.placement.text
        ));
    }
    let run = scenarios::Run {
        settings: &settings,
        machine: &machine,
        env: env.as_ref(),
    };
    let mut failed = Vec::new();
    for name in &names {
        if stopped() {
            break;
        }
        progress(&format!("scenario {name}"));
        match scenarios::run(name, &run) {
            Ok(result) => {
                let path = result.save(&results_dir)?;
                progress(&format!("saved {}", path.display()));
                print_summary(&result);
            }
            Err(e) => {
                progress(&format!("scenario {name} failed: {e}"));
                if let Some(env) = &env {
                    progress(&format!("upstream server: {}", env.server_tail()));
                }
                failed.push(name.to_string());
            }
        }
    }
    drop(env);
    if stopped() {
        return Err(Error::msg("interrupted; the lab was torn down"));
    }
    // An A/B run's results are not the published ones: no report unless one is named.
    if !smoke && !cli.no_report && (!ab || cli.report.is_some()) {
        let all = results::load_all(&results_dir);
        let path = report::write(&all, &results_dir, &report_path, &target_dir())?;
        progress(&format!("wrote {}", path.display()));
    }
    if smoke {
        let _ = std::fs::remove_dir_all(&results_dir);
    }
    if failed.is_empty() {
        progress("done");
        Ok(())
    } else {
        Err(Error::msg(format!(
            "scenarios failed: {}",
            failed.join(", ")
        )))
    }
}

/// A compact table of medians on stdout.
fn print_summary(result: &results::ScenarioResult) {
    println!("\n== {} ({}) ==", result.title, result.scenario);
    let paths: Vec<&str> = result.paths.iter().map(|p| p.name.as_str()).collect();
    print!("{:<44}", "metric");
    for p in &paths {
        print!("{p:>26}");
    }
    println!();
    for m in &result.metrics {
        print!("{:<44}", format!("{} ({})", m.label, m.unit));
        let base = result.baseline.as_deref().and_then(|b| m.path(b));
        // An A/B run pairs its rounds (see `PathStats::paired_ratio`).
        let ab = result.baseline.as_deref() == Some(PathKind::Baseline.name());
        for p in &paths {
            let cell = m.path(p).map_or_else(
                || "—".to_owned(),
                |s| {
                    let mut cell = format!(
                        "{} [{}–{}]",
                        report::fmt_value(s.median),
                        report::fmt_value(s.min),
                        report::fmt_value(s.max)
                    );
                    let ratio = match base {
                        Some(b) if Some(*p) != result.baseline.as_deref() => {
                            match s.paired_ratio(b).filter(|_| ab) {
                                Some(paired) => Some(format!(" {paired:.2}× paired")),
                                None => (b.median != 0.0)
                                    .then(|| format!(" {:.2}×", s.median / b.median)),
                            }
                        }
                        _ => None,
                    };
                    cell.push_str(ratio.as_deref().unwrap_or_default());
                    cell
                },
            );
            print!("{cell:>26}");
        }
        println!();
    }
    for note in &result.notes {
        println!("  note: {note}");
    }
}

/// Raises RLIMIT_NOFILE (inherited by the lab's processes: 50k connections need ~300k fds in a
/// proxy) and pins the harness to the load CPU.
fn prepare_process(settings: &Settings) -> Result<(), Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // Raising the hard limit needs CAP_SYS_RESOURCE; the soft limit can always go up to it.
    if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        let most = settings.memory_counts.iter().copied().max().unwrap_or(0);
        progress(&format!(
            "RLIMIT_NOFILE is capped at {hard} (no CAP_SYS_RESOURCE to raise it to {want}): \
             memory runs are capped per path (egressgate needs 2 fds per connection), {most} \
             connections may not fit"
        ));
    }
    let placement = env::Placement::detect();
    let mut set = nix::sched::CpuSet::new();
    set.set(placement.load_cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Builds the gateway binary of this profile (cargo does not build another package's binary
/// for us), unless `EGRESSGATE_BIN` names one.
fn ensure_gateway_binary() -> Result<(), Error> {
    if std::env::var_os("EGRESSGATE_BIN").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .ok_or_else(|| Error::msg("current_exe has no parent"))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-q", "-p", "egressgate"]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    progress(&format!("building egressgate ({profile})"));
    match cmd.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(Error::msg(format!("cargo build -p egressgate: {status}"))),
        Err(e) if profile_dir.join("egressgate").is_file() => {
            progress(&format!(
                "cannot run cargo ({e}); using the existing binary"
            ));
            Ok(())
        }
        Err(e) => Err(Error::msg(format!(
            "cannot run cargo to build egressgate: {e}"
        ))),
    }
}

/// SIGINT/SIGTERM set [`STOP`]; the run then unwinds normally, so the lab is torn down.
fn install_signal_handlers() {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                STOP.store(true, Ordering::Relaxed);
                progress("stopping after the current sample (cleaning up the lab)");
            });
        });
    if let Err(e) = spawned {
        progress(&format!("no signal handler: {e}"));
    }
}
