//! The soak run (issue 5): as many concurrent spliced connections as the descriptor limit
//! allows, then minutes of connection and DNS churn through egressgate. Afterwards descriptors,
//! memory, name-table entries and open connections must be back at their baseline, and every
//! connection the clients opened must have its `decision` line. The figures are reported, never
//! asserted: this is a benchmark, not a test.

use std::time::{Duration, Instant};

use crate::client::{DnsResult, RrResult};
use crate::dns::CHURN_ZONE;
use crate::env::{Env, PathKind};
use crate::results::Better;
use crate::scenarios::{count_after, fd_count, hold_sample, limit, prepare, rr_args, status_kib};
use crate::{progress, stopped, Error};

/// How long the churn lasts and how it is cut into chunks (a progress line after each).
#[derive(Debug, Clone)]
pub struct SoakSize {
    pub seconds: f64,
    pub chunk_seconds: f64,
    /// Distinct short-TTL names the DNS churn cycles through.
    pub dns_names: usize,
}

impl SoakSize {
    pub fn full() -> SoakSize {
        SoakSize {
            seconds: 300.0,
            chunk_seconds: 20.0,
            dns_names: 20_000,
        }
    }

    pub fn smoke() -> SoakSize {
        SoakSize {
            seconds: 2.0,
            chunk_seconds: 1.0,
            dns_names: 50,
        }
    }
}

/// Answers expire after one second, stay valid for the lab's `idleGraceSeconds` (2 s) and are
/// purged every 5 s: wait this long before reading the table's final size.
const TABLE_SETTLES: Duration = Duration::from_secs(10);
/// Descriptors that may come and go without a leak: the pipe pool, runtime internals.
pub const FD_SLACK: f64 = 200.0;

/// What the gateway looks like at one moment.
#[derive(Debug, Clone, Copy)]
struct Gauges {
    rss_mib: f64,
    fds: f64,
    table_names: f64,
    active: f64,
}

impl Gauges {
    fn read(env: &Env, pid: u32) -> Gauges {
        let metrics = metrics_text(env);
        Gauges {
            rss_mib: status_kib(pid, "VmRSS:").unwrap_or(0.0) / 1024.0,
            fds: fd_count(pid).unwrap_or(0.0),
            table_names: gauge(&metrics, "egressgate_dns_recorded_names"),
            active: gauge(&metrics, "egressgate_connections_active"),
        }
    }
}

/// What `sample` reports: (key, label, unit, which way is better).
pub fn specs() -> Vec<(&'static str, &'static str, &'static str, Better)> {
    use Better::{Higher, Lower};
    vec![
        (
            "conns_peak",
            "connections held at the peak",
            "connections",
            Higher,
        ),
        ("rss_peak", "gateway RSS at the peak", "MiB", Lower),
        (
            "rss_per_conn_peak",
            "gateway RSS per idle connection at the peak",
            "KiB",
            Lower,
        ),
        (
            "fds_per_conn_peak",
            "gateway descriptors per connection at the peak",
            "fds",
            Lower,
        ),
        ("churn_seconds", "churn duration", "s", Higher),
        (
            "churn_connections",
            "connections opened during the churn",
            "connections",
            Higher,
        ),
        ("churn_rate", "new connections per second", "conn/s", Higher),
        ("churn_errors", "failed connections", "connections", Lower),
        ("decision_lines", "decision lines logged", "lines", Higher),
        ("close_lines", "close lines logged", "lines", Higher),
        (
            "missing_decisions",
            "connections without a decision line",
            "connections",
            Lower,
        ),
        (
            "dns_queries",
            "DNS queries during the churn",
            "queries",
            Higher,
        ),
        ("dns_unanswered", "DNS queries unanswered", "queries", Lower),
        ("rss_baseline", "RSS before the churn", "MiB", Lower),
        ("rss_first_chunk", "RSS after the first chunk", "MiB", Lower),
        ("rss_after", "RSS after the churn", "MiB", Lower),
        (
            "rss_growth",
            "RSS growth after the first chunk",
            "MiB",
            Lower,
        ),
        ("fds_baseline", "descriptors before the churn", "fds", Lower),
        ("fds_after", "descriptors after the churn", "fds", Lower),
        (
            "names_baseline",
            "name-table entries before the churn",
            "names",
            Lower,
        ),
        (
            "names_peak",
            "name-table entries at the peak of the churn",
            "names",
            Lower,
        ),
        (
            "names_after",
            "name-table entries after expiry",
            "names",
            Lower,
        ),
        (
            "active_after",
            "connections still open after the churn",
            "connections",
            Lower,
        ),
    ]
}

/// One soak run: the peak, then the churn, then the return to baseline.
pub fn sample(
    env: &Env,
    capacity: usize,
    size: &SoakSize,
    concurrency: usize,
) -> Result<Vec<(String, f64)>, Error> {
    let path = PathKind::Egressgate;
    let pid = env
        .proxy_pid(path)
        .ok_or_else(|| Error::msg("soak needs the egressgate path"))?;
    let stdout = env.gateway_log();

    progress(&format!("  soak: {capacity} concurrent idle connections"));
    let reported: Vec<&str> = specs().iter().map(|(key, ..)| *key).collect();
    let mut values: Vec<(String, f64)> = hold_sample(env, path, capacity, capacity)?
        .into_iter()
        .map(|(key, value)| (key.replace(&format!("_{capacity}"), "_peak"), value))
        .filter(|(key, _)| reported.contains(&key.as_str()))
        .collect();

    prepare(env, path)?;
    let baseline = Gauges::read(env, pid);
    let offset = std::fs::metadata(&stdout).map_or(0, |m| m.len());
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(size.seconds);
    let (mut attempts, mut errors, mut queries, mut answered) = (0u64, 0u64, 0u64, 0u64);
    let mut first_chunk: Option<Gauges> = None;
    let mut table_peak = baseline.table_names;
    while Instant::now() < end && !stopped() {
        // Two thirds of a chunk new TLS connections, one third DNS churn.
        let chunk = size
            .chunk_seconds
            .min(end.saturating_duration_since(Instant::now()).as_secs_f64())
            .max(0.3);
        let connect = chunk * 2.0 / 3.0;
        // The DNS churn may have evicted the allowed names (oldest first, per-pod limit).
        prepare(env, path)?;
        let r: RrResult = env.client(
            path,
            &rr_args(env, path, true, concurrency, connect, u64::MAX / 4, 0.0),
            limit(connect),
        )?;
        attempts += r.attempts;
        errors += r.errors;
        let lookups = chunk / 3.0;
        let d: DnsResult = env.client(
            path,
            &dns_args(env, size.dns_names, lookups),
            limit(lookups),
        )?;
        queries += d.sent;
        answered += d.answered;
        let now = Gauges::read(env, pid);
        table_peak = table_peak.max(now.table_names);
        first_chunk.get_or_insert(now);
        progress(&format!(
            "  soak {:.0}/{:.0} s: {attempts} connections ({errors} failed), {queries} queries; \
             RSS {:.1} MiB, {} fds, {} names, {} active",
            started.elapsed().as_secs_f64(),
            size.seconds,
            now.rss_mib,
            now.fds,
            now.table_names,
            now.active
        ));
    }
    let churn_seconds = started.elapsed().as_secs_f64();

    // Back to baseline: connections closed, descriptors released, records expired and purged.
    let drained = Instant::now() + Duration::from_secs(60);
    while Instant::now() < drained {
        let now = Gauges::read(env, pid);
        if now.active == 0.0 && now.fds <= baseline.fds + FD_SLACK {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(TABLE_SETTLES);
    let after = Gauges::read(env, pid);
    let (decisions, _) = count_after(&stdout, offset, "\"event\":\"decision\"");
    let (closes, _) = count_after(&stdout, offset, "\"event\":\"close\"");
    let first = first_chunk.unwrap_or(baseline);

    values.extend([
        ("churn_seconds".to_owned(), churn_seconds),
        ("churn_connections".to_owned(), attempts as f64),
        (
            "churn_rate".to_owned(),
            attempts as f64 / churn_seconds.max(1e-9),
        ),
        ("churn_errors".to_owned(), errors as f64),
        ("decision_lines".to_owned(), decisions as f64),
        ("close_lines".to_owned(), closes as f64),
        // Every connection opened has its decision line; more lines than connections would mean
        // connections the clients did not count (none are expected).
        (
            "missing_decisions".to_owned(),
            attempts.saturating_sub(decisions as u64) as f64,
        ),
        ("dns_queries".to_owned(), queries as f64),
        (
            "dns_unanswered".to_owned(),
            queries.saturating_sub(answered) as f64,
        ),
        ("rss_baseline".to_owned(), baseline.rss_mib),
        ("rss_first_chunk".to_owned(), first.rss_mib),
        ("rss_after".to_owned(), after.rss_mib),
        ("rss_growth".to_owned(), after.rss_mib - first.rss_mib),
        ("fds_baseline".to_owned(), baseline.fds),
        ("fds_after".to_owned(), after.fds),
        ("names_baseline".to_owned(), baseline.table_names),
        ("names_peak".to_owned(), table_peak),
        ("names_after".to_owned(), after.table_names),
        ("active_after".to_owned(), after.active),
    ]);
    Ok(values)
}

fn dns_args(env: &Env, names: usize, seconds: f64) -> Vec<String> {
    [
        "dns",
        "--server",
        &env.dns_server().to_string(),
        "--names",
        &names.to_string(),
        "--zone",
        CHURN_ZONE,
        "--concurrency",
        "8",
        "--seconds",
        &seconds.to_string(),
        "--max-queries",
        "100000000",
        "--warmup",
        "0",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The gateway's `/metrics` text (empty if the admin port does not answer).
fn metrics_text(env: &Env) -> String {
    // The lab runs the gateway with the default admin address.
    let url = format!(
        "http://{}/metrics",
        egressgate_lab::GatewayOptions::default().admin
    );
    env.lab
        .node()
        .run_with(
            &["curl", "-s", "--max-time", "5", &url],
            None,
            Duration::from_secs(10),
        )
        .map(|out| out.stdout)
        .unwrap_or_default()
}

/// The value of an unlabelled gauge in Prometheus text, 0 when absent.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_unlabelled_gauges_only() {
        let text = "# HELP x y\negressgate_connections_active 3\n\
                    egressgate_connections_active_total 9\negressgate_dns_recorded_names 12\n";
        assert_eq!(gauge(text, "egressgate_connections_active"), 3.0);
        assert_eq!(gauge(text, "egressgate_dns_recorded_names"), 12.0);
        assert_eq!(gauge(text, "egressgate_policies"), 0.0);
    }
}
