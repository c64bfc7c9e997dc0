//! The `egressgate` command line.
//!
//! stdout carries only JSON lines (decisions, DNS answers, reloads); diagnostics go to stderr,
//! filtered by `EGRESSGATE_LOG` (tracing's env-filter syntax, default `info`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use egressgate::config::Config;
use egressgate::identity::Identities;
use egressgate::memory_budget::{self, Budget};
use egressgate::store::load_policy_dir;

#[derive(Debug, Parser)]
#[command(
    name = "egressgate",
    version,
    about = "Transparent egress gateway: allows pod connections by DNS name and application \
             protocol, without decrypting anything."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve: DNS shim, TPROXY listener, admin endpoint; installs the nftables rules.
    Run {
        /// The configuration file (README, "Configuration").
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration, every policy file and the identity file; print every error
    /// as file:line:column and exit non-zero if there is any.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the nftables script `run` installs, for review.
    NftRules {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Explain what the gateway decides for a pod, a destination and a first message, step by
    /// step (asking the running gateway, or from files), or why a decision line came out as it
    /// did.
    Explain(Box<egressgate::explain::cli::ExplainArgs>),
    /// Check expectations about policies (pod, resolved names, destination, first message →
    /// verdict and reason) with the gateway's own decision code.
    Test(egressgate::explain::cli::TestArgs),
    /// Remove the nftables table and policy routing `run` installed. They stay when the gateway
    /// stops, so that egress fails closed; this ends interception (e.g. on uninstall).
    Cleanup {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Suggest EgressPolicy YAML that allows exactly what pods in audit mode, or selected by no
    /// policy, did (from decision lines).
    Suggest(egressgate::suggest::SuggestArgs),
    /// Stream decisions and DNS answers from the gateway on this node (its admin socket),
    /// filtered; one readable line each.
    Observe(Box<egressgate::observe::ObserveArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EGRESSGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::NftRules { config } => with_config(&config, |config| {
            print!("{}", egressgate::nft::render(config));
            Ok(())
        }),
        // Nothing to remove is a success: the rules are gone either way (a second `cleanup`, a
        // node where `run` never installed them, a pre-delete hook after the last gateway).
        Command::Cleanup { config } => with_config(&config, |config| {
            let removed = egressgate::nft::remove(config).map_err(|e| e.to_string())?;
            eprintln!("egressgate cleanup: {removed}");
            Ok(())
        }),
        Command::Suggest(args) => egressgate::suggest::command(args),
        Command::Observe(args) => egressgate::observe::command(*args),
        Command::Explain(args) => egressgate::explain::cli::explain(*args),
        Command::Test(args) => egressgate::explain::cli::test(args),
    }
}

/// Loads the configuration and runs `action`; errors go to stderr and a failing exit code.
fn with_config(path: &Path, action: impl FnOnce(&Config) -> Result<(), String>) -> ExitCode {
    match Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|config| action(&config))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // The control plane's runtime: pod traffic runs on the workers `run` starts.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(egressgate::run::run(config));
    // The shutdown line and the last decisions are queued, not yet written.
    egressgate_log::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egressgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut errors = Vec::new();
    let policies = load_policy_dir(&config.policy_dir)
        .map_err(|e| errors.extend(e))
        .ok();
    let identities = config.identity.static_file.as_ref().and_then(|file| {
        Identities::load(file)
            .map_err(|e| errors.push(e.to_string()))
            .ok()
    });
    if config.dns_upstreams().is_empty() {
        errors.push(format!(
            "{}: dns.upstreams is empty and /etc/resolv.conf names no nameserver",
            path.display()
        ));
    }
    if !errors.is_empty() {
        for error in &errors {
            eprintln!("{error}");
        }
        eprintln!("{} error(s)", errors.len());
        return ExitCode::FAILURE;
    }
    if let Some(warning) =
        memory_budget::cgroup_limit().and_then(|limit| Budget::of(&config).exceeds(limit))
    {
        eprintln!("warning: {warning}");
    }
    let pods = match identities {
        Some(identities) => format!("{} pods", identities.len()),
        None => "pods from the Kubernetes API".to_owned(),
    };
    println!(
        "{}: ok ({} policies, {pods})",
        path.display(),
        policies.map_or(0, |p| p.len()),
    );
    ExitCode::SUCCESS
}
