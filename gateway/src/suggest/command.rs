//! The `suggest` subcommand: its flags, input files and exit codes.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use egressgate_policy::Mode;

use super::{suggest, GroupBy, Options};

/// Reads decision lines and prints EgressPolicy YAML allowing what the pods did.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Only lines of pods in audit mode or selected by no policy teach (the gateway logs their labels
and owner); other lines are counted and left out. Each destination gets one rule: the name the
pod resolved and used, or a /32 or /128 cidr when it reached the address without one.

Examples:
  kubectl logs -n egressgate ds/egressgate --since=24h | egressgate suggest > suggested.yaml
  egressgate suggest --group-by app.kubernetes.io/name decisions.jsonl
  egressgate observe --since 1h -o json | egressgate suggest --wildcard-min 3

Exit codes: 0 policies written; 1 nothing to learn from, or an input could not be read;
2 bad usage.")]
pub struct SuggestArgs {
    /// Files of JSON lines (gateway stdout); none or `-` reads stdin.
    files: Vec<PathBuf>,
    /// Group pods by this label's value (e.g. app.kubernetes.io/name) instead of by their
    /// owner (a Deployment, StatefulSet, DaemonSet, Job or the pod itself).
    #[arg(long, value_name = "LABEL_KEY")]
    group_by: Option<String>,
    /// Fold N or more names that differ only in their first label into `*.parent` (N ≥ 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(2..))]
    wildcard_min: Option<u16>,
    /// The suggested policies' `spec.mode`.
    #[arg(long, default_value = "enforce", value_parser = ["enforce", "audit"])]
    mode: String,
}

/// Runs `suggest`: YAML on stdout, a summary and warnings on stderr.
pub fn command(args: SuggestArgs) -> ExitCode {
    let options = Options {
        group_by: args.group_by.map_or(GroupBy::Owner, GroupBy::Label),
        wildcard_min: args.wildcard_min.map(usize::from),
        mode: if args.mode == "audit" {
            Mode::Audit
        } else {
            Mode::Enforce
        },
    };
    let input: Box<dyn BufRead> = match open(&args.files) {
        Ok(input) => input,
        Err(e) => {
            eprintln!("egressgate suggest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let suggestion = match suggest(input, &options) {
        Ok(suggestion) => suggestion,
        Err(e) => {
            eprintln!("egressgate suggest: cannot read the input: {e}");
            return ExitCode::FAILURE;
        }
    };
    for warning in &suggestion.warnings {
        eprintln!("warning: {warning}");
    }
    let skipped: Vec<String> = suggestion
        .skipped
        .iter()
        .map(|(why, n)| format!("{n} {why}"))
        .collect();
    eprintln!(
        "egressgate suggest: {} line(s), {} decision(s) learned, {} policy(ies){}",
        suggestion.lines,
        suggestion.learned,
        suggestion.policies,
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; left out: {}", skipped.join(", "))
        }
    );
    if suggestion.policies == 0 {
        eprintln!(
            "egressgate suggest: nothing to suggest: no decision line of a pod in audit mode \
             or selected by no policy"
        );
        return ExitCode::FAILURE;
    }
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(suggestion.yaml.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egressgate suggest: cannot write: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The files one after the other, or stdin.
fn open(files: &[PathBuf]) -> Result<Box<dyn BufRead>, String> {
    if files.is_empty() || files.iter().all(|f| f.as_os_str() == "-") {
        return Ok(Box::new(BufReader::new(std::io::stdin())));
    }
    let mut chained: Box<dyn BufRead> = Box::new(std::io::empty());
    for path in files {
        let next: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(BufReader::new(std::io::stdin()))
        } else {
            let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Box::new(BufReader::new(file))
        };
        chained = Box::new(std::io::Read::chain(chained, next));
    }
    Ok(chained)
}
