//! The arguments of `egressgate explain` and `egressgate test`, and what each exit code means.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::line;
use super::offline::{self, Resolved};
use super::policy_tests;
use super::query::{AskedProtocol, Query};
use super::render::{self, Colour, Output};
use super::trace::Explanation;
use crate::admin_socket::{self, client};
use crate::config::{self, Config};

/// Explained (whatever the verdict) / every test passed.
pub const EXIT_OK: u8 = 0;
/// Could not explain (gateway not reachable, unknown pod, files that do not load) / a test
/// failed.
pub const EXIT_FAILED: u8 = 1;
/// Bad arguments or input (clap's own usage errors too).
pub const EXIT_USAGE: u8 = 2;

/// How long the running gateway has to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

const EXPLAIN_HELP: &str = "\
Examples:
  # Ask the gateway on this node (over state.dir/admin.sock; root or the gateway's user):
  egressgate explain --pod shop/app-1 --to api.example.test:443
  egressgate explain --pod shop/app-1 --to 198.19.0.10:443 --sni evil.example.test -o json
  egressgate explain --pod shop/app-1 --to db.example.test:5432 --database orders --user app
  # From files alone (CI, a laptop), with the gateway's default settings:
  egressgate explain --policies policies/ --identities pods.yaml --pod shop/app-1 \\
      --to 198.19.0.10:443 --sni api.example.test --resolved api.example.test=198.19.0.10 -o json
  # Why did this decision line come out as it did?
  egressgate explain --line '{\"event\":\"decision\",...}'
  kubectl logs ds/egressgate | grep '\"verdict\":\"deny\"' | egressgate explain

A name in --to stands for every address this pod resolved it to. Without --protocol, the
flags decide (--sni tls, --host http, --database/--user postgresql), else the port (443 tls,
80 http, 5432 postgresql), else tcp. Without --sni or --host the client sends the --to name.

Exit codes: 0 explained (whatever the verdict), 1 could not explain (gateway unreachable,
unknown pod, a name the pod did not resolve, files that do not load), 2 bad arguments.";

const TEST_HELP: &str = "\
The tests file:
  settings: {requireSni: true, unselectedPods: allow}   # optional
  namespaces: {shop: {team: shop}}                      # optional namespace labels
  tests:
    - name: the app reaches the API
      pod: {namespace: shop, labels: {role: app}}
      resolved: [api.example.test=198.19.0.10]
      to: 198.19.0.10:443
      sni: api.example.test            # or host, or database + user; protocol optional
      expect: {verdict: allow, reason: allowed}

Example: egressgate test deploy/helm/ci/policies deploy/helm/ci/policy-tests.yaml

Exit codes: 0 every test passed, 1 a test failed (its explain trace is printed), 2 bad input
(policies or tests that do not load, a test that cannot be run).";

/// `egressgate explain`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXPLAIN_HELP)]
pub struct ExplainArgs {
    /// The pod, NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME", conflicts_with = "line", requires = "to")]
    pub pod: Option<String>,
    /// The destination: HOST:PORT (the running gateway) or IP:PORT.
    #[arg(long, value_name = "HOST:PORT", requires = "pod")]
    pub to: Option<String>,
    /// What the client speaks.
    #[arg(long, value_enum)]
    pub protocol: Option<AskedProtocol>,
    /// The TLS SNI the client sends.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["host", "database", "user"])]
    pub sni: Option<String>,
    /// The HTTP Host the client sends.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["database", "user"])]
    pub host: Option<String>,
    /// The PostgreSQL database (defaults to the user).
    #[arg(long, value_name = "D", requires = "user")]
    pub database: Option<String>,
    /// The PostgreSQL user.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// Offline: the policy directory (instead of asking the running gateway).
    #[arg(long, value_name = "DIR", requires_all = ["identities", "pod"])]
    pub policies: Option<PathBuf>,
    /// Offline: the static identity file (the gateway's format).
    #[arg(long, value_name = "FILE", requires = "policies")]
    pub identities: Option<PathBuf>,
    /// Offline: the pod's DNS records.
    #[arg(long, value_name = "NAME=IP[,NAME=IP…]", requires = "policies")]
    pub resolved: Option<Resolved>,
    /// A decision line to explain ('-': read lines from stdin, as with no --pod).
    #[arg(long, value_name = "JSON")]
    pub line: Option<String>,
    /// The running gateway's state directory (its admin.sock); default: the config's, else
    /// /var/lib/egressgate.
    #[arg(long, value_name = "DIR", conflicts_with = "policies")]
    pub state_dir: Option<PathBuf>,
    /// The gateway's configuration file, to find its state directory.
    #[arg(long, short, value_name = "FILE", conflicts_with_all = ["policies", "state_dir"])]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

/// `egressgate test`.
#[derive(Debug, clap::Args)]
#[command(after_help = TEST_HELP)]
pub struct TestArgs {
    /// The policy directory under test.
    #[arg(value_name = "POLICY_DIR")]
    pub policies: PathBuf,
    /// The expectations (YAML).
    #[arg(value_name = "TESTS.yaml")]
    pub tests: PathBuf,
}

/// Runs `egressgate explain`.
pub fn explain(args: ExplainArgs) -> ExitCode {
    let colour = Colour::for_stdout();
    let Some(pod) = args.pod.clone() else {
        return explain_lines(args.line.as_deref(), args.output, colour);
    };
    let query = Query {
        pod,
        to: args.to.clone().unwrap_or_default(),
        protocol: args.protocol,
        sni: args.sni.clone(),
        host: args.host.clone(),
        database: args.database.clone(),
        user: args.user.clone(),
    };
    if let Err(e) = query.check() {
        return fail(EXIT_USAGE, &e.to_string());
    }
    let explained = match (&args.policies, &args.identities) {
        (Some(policies), Some(identities)) => {
            let resolved = args.resolved.clone().unwrap_or_default();
            offline::explain(policies, identities, &query, &resolved).map_err(|e| (EXIT_FAILED, e))
        }
        _ => ask_gateway(&args, &query),
    };
    match explained {
        Ok(explanation) => print_out(args.output, &explanation, |e| {
            render::explanation_table(e, colour)
        }),
        Err((code, message)) => fail(code, &message),
    }
}

fn explain_lines(line_arg: Option<&str>, output: Output, colour: Colour) -> ExitCode {
    let text = match line_arg {
        Some(line) if line != "-" => line.to_owned(),
        _ => {
            let mut text = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut text) {
                return fail(EXIT_FAILED, &format!("cannot read stdin: {e}"));
            }
            text
        }
    };
    match line::explain_lines(&text) {
        Ok(explained) => print_out(output, &explained, |e| render::lines_table(e, colour)),
        Err(e) => fail(EXIT_FAILED, &e),
    }
}

/// `POST /v1/explain` to the running gateway.
fn ask_gateway(args: &ExplainArgs, query: &Query) -> Result<Explanation, (u8, String)> {
    let state_dir = match (&args.state_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(path)) => Config::load(path)
            .map_err(|e| (EXIT_FAILED, e.to_string()))?
            .state
            .dir
            .clone(),
        (None, None) => config::State::default_dir(),
    };
    let socket = admin_socket::socket_path(&state_dir);
    let body = serde_json::to_vec(query).map_err(|e| (EXIT_FAILED, e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (EXIT_FAILED, format!("cannot start the async runtime: {e}")))?;
    let (status, body) = runtime
        .block_on(client::call(
            &socket,
            Method::POST,
            super::endpoint::PATH,
            body.into(),
            ANSWER_TIMEOUT,
        ))
        .map_err(|e| (EXIT_FAILED, e.to_string()))?;
    if status != StatusCode::OK {
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            error: String,
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map_or_else(|_| String::from_utf8_lossy(&body).into_owned(), |e| e.error);
        let code = if status == StatusCode::BAD_REQUEST {
            EXIT_USAGE
        } else {
            EXIT_FAILED
        };
        return Err((code, format!("the gateway answered {status}: {message}")));
    }
    serde_json::from_slice(&body).map_err(|e| {
        (
            EXIT_FAILED,
            format!("cannot read the gateway's answer: {e}"),
        )
    })
}

/// Runs `egressgate test`.
pub fn test(args: TestArgs) -> ExitCode {
    let report = match policy_tests::run(&args.policies, &args.tests) {
        Ok(report) => report,
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let colour = Colour::for_stdout();
    for outcome in &report.outcomes {
        match &outcome.failure {
            None => println!("ok    {}", outcome.name),
            Some(failure) => {
                println!("FAIL  {}: {failure}", outcome.name);
                for line in render::explanation_table(&outcome.explanation, colour).lines() {
                    println!("      {line}");
                }
            }
        }
    }
    let failed = report.failed();
    println!("{} passed, {failed} failed", report.outcomes.len() - failed);
    if failed == 0 {
        ExitCode::from(EXIT_OK)
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

fn print_out<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl Fn(&T) -> String,
) -> ExitCode {
    let text = match output {
        Output::Table => Ok(table(value)),
        structured => render::structured(value, structured),
    };
    match text {
        Ok(text) => {
            print!("{text}");
            ExitCode::from(EXIT_OK)
        }
        Err(e) => fail(EXIT_FAILED, &e),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("egressgate explain: {message}");
    ExitCode::from(code)
}
