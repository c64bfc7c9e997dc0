//! `egressgate observe`: the client of `POST /v1/observe` on the admin socket.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};

use super::filter::ObserveRequest;
use super::format::{readable, Colour};
use crate::admin_socket::{self, client};
use crate::config::{self, Config};

/// Streams decisions and DNS answers from the gateway running on this node.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without --follow it prints the gateway's recent lines (observe.history, default the last 2048
decision and DNS lines; --since narrows them) and exits; with --follow it keeps printing new
ones. Filters combine: a line must match every one given. A DNS line's pod is found by its
address. A line `--- N line(s) dropped ---` means this observer read too slowly and missed N
lines; the gateway never waits for it.

Examples:
  egressgate observe --since 5m --verdict deny
  egressgate observe -f --pod shop/app-1
  egressgate observe -f -n shop --name '*.example.test' --protocol tls
  egressgate observe -f -l app.kubernetes.io/name=web --destination 198.19.0.0/24
  egressgate observe --since 1h -o json | egressgate suggest

Exit codes: 0 the stream ended (history printed, or the gateway stopped); 1 the gateway could
not be reached or refused the request (too many observers: observe.maxSubscribers); 2 bad
usage.")]
pub struct ObserveArgs {
    /// The running gateway's state directory (its admin.sock); default: the config's, else
    /// /var/lib/egressgate.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The gateway's configuration file, to find its state directory.
    #[arg(long, short, value_name = "FILE", conflicts_with = "state_dir")]
    config: Option<PathBuf>,
    /// Only pods of this namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Only this pod: NAME or NAMESPACE/NAME.
    #[arg(long)]
    pod: Option<String>,
    /// Only pods with this label: KEY=VALUE, or KEY for any value. Repeatable.
    #[arg(long = "label", short = 'l', value_name = "KEY[=VALUE]")]
    labels: Vec<String>,
    /// Only decisions with this verdict.
    #[arg(long, value_parser = ["allow", "deny", "audit"])]
    verdict: Option<String>,
    /// Only decisions with this reason code (README, "Reason codes").
    #[arg(long)]
    reason: Option<String>,
    /// Only lines about this DNS name, or any name under `*.SUFFIX`.
    #[arg(long)]
    name: Option<String>,
    /// Only this destination: IP, IP:PORT or CIDR (a DNS answer's addresses).
    #[arg(long)]
    destination: Option<String>,
    /// Only this protocol; `dns` for DNS answers only.
    #[arg(long, value_parser = ["tls", "http", "http2", "postgresql", "tcp", "unknown", "dns"])]
    protocol: Option<String>,
    /// Recent lines from the last DURATION first, e.g. 30s, 5m, 1h.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// Keep streaming new lines until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// `text`: one readable line each; `json`: the gateway's JSON lines.
    #[arg(long, short = 'o', default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// How long the gateway may take to answer the request itself (not the stream).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `observe`.
pub fn command(args: ObserveArgs) -> ExitCode {
    let request = ObserveRequest {
        namespace: args.namespace.clone(),
        pod: args.pod.clone(),
        labels: args.labels.clone(),
        verdict: args.verdict.clone(),
        reason: args.reason.clone(),
        name: args.name.clone(),
        destination: args.destination.clone(),
        protocol: args.protocol.clone(),
        since_seconds: args.since.map(|since| since.as_secs().max(1)),
        follow: args.follow,
    };
    if let Err(e) = request.filter() {
        eprintln!("egressgate observe: {e}");
        return ExitCode::from(2);
    }
    let state_dir = match (&args.state_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(path)) => match Config::load(path) {
            Ok(config) => config.state.dir,
            Err(e) => {
                eprintln!("egressgate observe: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => config::State::default_dir(),
    };
    let socket = admin_socket::socket_path(&state_dir);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("egressgate observe: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.output == "json";
    let colour = if !json && std::io::stdout().is_terminal() {
        Colour::Terminal
    } else {
        Colour::Plain
    };
    match runtime.block_on(stream(&socket, &request, json, colour)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egressgate observe: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn stream(
    socket: &std::path::Path,
    request: &ObserveRequest,
    json: bool,
    colour: Colour,
) -> Result<(), String> {
    let body = Bytes::from(serde_json::to_vec(request).map_err(|e| e.to_string())?);
    let response = tokio::time::timeout(
        ANSWER_TIMEOUT,
        client::send(socket, Method::POST, "/v1/observe", body),
    )
    .await
    .map_err(|_| format!("no answer within {ANSWER_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    let status = response.status();
    let mut body = response.into_body();
    if status != StatusCode::OK {
        let text = body
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&text).into_owned());
        return Err(format!("the gateway refused: {status}: {message}"));
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the stream broke: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            let shown = if json {
                (!line.trim().is_empty()).then(|| line.into_owned())
            } else {
                readable(&line, colour)
            };
            if let Some(shown) = shown {
                // A closed stdout (`| head`) ends the stream quietly.
                if writeln!(stdout, "{shown}")
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// `90`, `30s`, `5m`, `2h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and s, m or h, e.g. 5m"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        _ => return Err(format!("{text:?}: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }
}
