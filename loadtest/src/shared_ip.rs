//! Names that share one address (a CDN, a shared ingress, or a pod inflating its own records on
//! purpose): what a new connection and a DNS answer cost when a pod resolved thousands of names to
//! the destination's IP, against the same work with a few names.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::Value;

use crate::client::{DnsResult, RrResult};
use crate::env::{Env, PathKind};
use crate::scenarios::{interleave, limit, prepare, proxy_cpu_during, rr_args, Samples};
use crate::Error;

/// Every name under `example.test` is answered with the web server's address, so names in this
/// zone crowd the address pod b connects to.
pub const CROWD_ZONE: &str = "crowd.example.test";
/// The DNS half's names on one address, kept apart from [`CROWD_ZONE`] so that the connection
/// half's two phases do not depend on whether the DNS half ran.
pub const DNS_ONE_IP_ZONE: &str = "dns-crowd.example.test";

/// New TLS connections with the pod's few names on the address, then again after the pod resolved
/// `crowd` more names to it. Two phases in order rather than interleaved rounds: a pod cannot
/// forget names it resolved, and a short TTL would expire them during the sample.
pub fn connections(
    env: &Env,
    seconds: f64,
    rounds: usize,
    crowd: usize,
    samples: &mut Samples,
) -> Result<[String; 2], Error> {
    let few = "few names".to_owned();
    let crowded = format!("{crowd} more names");
    let mut sample = |_: &str, _: usize| connection_sample(env, seconds);
    interleave(
        "shared_ip (few names)",
        rounds,
        std::slice::from_ref(&few),
        samples,
        &mut sample,
    )?;
    resolve_all(env, CROWD_ZONE, crowd)?;
    interleave(
        "shared_ip (crowded)",
        rounds,
        std::slice::from_ref(&crowded),
        samples,
        &mut sample,
    )?;
    Ok([few, crowded])
}

/// DNS through the shim, the same number of names either on distinct addresses or all on one.
pub fn dns(
    env: &Env,
    seconds: f64,
    rounds: usize,
    names: usize,
    concurrency: usize,
    samples: &mut Samples,
) -> Result<[String; 2], Error> {
    let distinct = "names on distinct IPs".to_owned();
    let one = "names on one IP".to_owned();
    let paths = [distinct.clone(), one.clone()];
    interleave("shared_ip_dns", rounds, &paths, samples, |path, _| {
        let zone = if path == distinct {
            crate::dns::BENCH_ZONE
        } else {
            DNS_ONE_IP_ZONE
        };
        dns_sample(env, zone, names, concurrency, seconds)
    })?;
    Ok(paths)
}

fn connection_sample(env: &Env, seconds: f64) -> Result<Vec<(String, f64)>, Error> {
    let path = PathKind::Egressgate;
    prepare(env, path)?;
    let log = env.gateway_log();
    let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let (r, cpu_used): (RrResult, _) = proxy_cpu_during(env, path, || {
        env.client(
            path,
            &rr_args(env, path, true, 1, seconds, 10_000_000, 0.3),
            limit(seconds),
        )
    })?;
    if r.ops == 0 {
        return Err(Error::msg(format!(
            "no connection succeeded: {}",
            r.first_error.unwrap_or_default()
        )));
    }
    let lines = DecisionLines::read(&log, from)?;
    if lines.count == 0 {
        return Err(Error::msg("the gateway logged no decision line"));
    }
    let mut values = vec![
        ("p50".to_owned(), r.latency.p50_us),
        ("p99".to_owned(), r.latency.p99_us),
        ("rate".to_owned(), r.per_second),
        (
            "line_bytes".to_owned(),
            lines.bytes as f64 / lines.count as f64,
        ),
        ("names_on_ip".to_owned(), lines.names_on_ip as f64),
    ];
    if let Some(used) = cpu_used.filter(|&used| used > 0.0 && r.attempts > 0) {
        values.push(("cpu_per_op".to_owned(), used / r.attempts as f64 * 1e6));
    }
    Ok(values)
}

fn dns_sample(
    env: &Env,
    zone: &str,
    names: usize,
    concurrency: usize,
    seconds: f64,
) -> Result<Vec<(String, f64)>, Error> {
    let path = PathKind::Egressgate;
    let args = dns_args(env, zone, names, concurrency, seconds, 100_000_000);
    let (load, cpu_used): (DnsResult, _) =
        proxy_cpu_during(env, path, || env.client(path, &args, limit(seconds)))?;
    let mut values = vec![
        ("qps".to_owned(), load.per_second),
        ("lost".to_owned(), load.lost as f64),
    ];
    if let Some(used) = cpu_used.filter(|&used| used > 0.0 && load.answered > 0) {
        let per_query = used / load.answered as f64;
        values.push(("cpu_per_query".to_owned(), per_query * 1e6));
        values.push(("qps_per_core".to_owned(), 1.0 / per_query));
    }
    Ok(values)
}

/// Pod b resolves `n0.<zone>` … `n<count-1>.<zone>` through the shim, each at least once.
fn resolve_all(env: &Env, zone: &str, count: usize) -> Result<(), Error> {
    let path = PathKind::Egressgate;
    // The generator cycles the names: a few passes make up for the odd lost answer.
    let passes = 3;
    let args = dns_args(env, zone, count, 64, 60.0, (count * passes) as u64);
    let r: DnsResult = env.client(path, &args, limit(60.0))?;
    if r.answered < count as u64 {
        return Err(Error::msg(format!(
            "pod b resolved {} of {count} names in {zone}",
            r.answered
        )));
    }
    Ok(())
}

fn dns_args(
    env: &Env,
    zone: &str,
    names: usize,
    concurrency: usize,
    seconds: f64,
    max_queries: u64,
) -> Vec<String> {
    [
        "dns",
        "--server",
        &env.dns_server().to_string(),
        "--names",
        &names.to_string(),
        "--zone",
        zone,
        "--concurrency",
        &concurrency.to_string(),
        "--seconds",
        &seconds.to_string(),
        "--max-queries",
        &max_queries.to_string(),
        "--warmup",
        "0",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The gateway's decision lines written since a byte offset of its log.
#[derive(Debug, Default, PartialEq)]
struct DecisionLines {
    count: usize,
    bytes: usize,
    /// The most names a line said the pod had resolved to the address: `namesTotal` when the
    /// list was cut, else the list's length.
    names_on_ip: usize,
}

impl DecisionLines {
    fn read(log: &Path, from: u64) -> Result<DecisionLines, Error> {
        let mut file = std::fs::File::open(log)?;
        file.seek(SeekFrom::Start(from))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(DecisionLines::parse(&text))
    }

    fn parse(text: &str) -> DecisionLines {
        let mut lines = DecisionLines::default();
        for line in text.lines() {
            let Ok(value) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if value["event"] != "decision" {
                continue;
            }
            lines.count += 1;
            lines.bytes += line.len() + 1;
            let listed = value["names"].as_array().map_or(0, Vec::len);
            let total = value["namesTotal"].as_u64().map_or(listed, |t| t as usize);
            lines.names_on_ip = lines.names_on_ip.max(total);
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_lines_count_size_and_the_names_a_line_stands_for() {
        let log = concat!(
            "{\"event\":\"listening\"}\n",
            "{\"event\":\"decision\",\"names\":[\"api.example.test\",\"bulk.example.test\"]}\n",
            "not json\n",
            "{\"event\":\"decision\",\"names\":[\"a\",\"b\"],\"namesTotal\":5002}\n",
        );
        let lines = DecisionLines::parse(log);
        assert_eq!(lines.count, 2);
        assert_eq!(lines.names_on_ip, 5002);
        let decision_bytes: usize = log
            .lines()
            .filter(|l| l.contains("decision"))
            .map(|l| l.len() + 1)
            .sum();
        assert_eq!(lines.bytes, decision_bytes);
    }
}
