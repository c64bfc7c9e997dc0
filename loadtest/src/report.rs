//! `docs/benchmarks.md` and its SVG charts (in `loadtest/results/svg/`), from the result files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::results::{Better, MetricResult, ScenarioResult};
use crate::Error;

/// Colours per path, stable across charts.
fn colour(path: &str) -> &'static str {
    match path {
        "direct" | "steady" => "#8c8c8c",
        "egressgate" | "reloading" | "in-process" => "#2a6fdb",
        "haproxy" => "#d9822b",
        "nginx" => "#2f9e44",
        _ => "#7a5ea8",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a < 100_000.0 && v.fract() == 0.0 {
        // Counts: no decimals.
        format!("{v:.0}")
    } else if a >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Ratio or difference against the baseline, as the report shows it.
fn versus(metric: &MetricResult, value: f64, baseline: f64) -> String {
    if metric.unit == "µs" || metric.unit == "ns" || metric.unit == "ms" {
        let delta = value - baseline;
        let sign = if delta >= 0.0 { "+" } else { "−" };
        format!("{sign}{} {}", fmt_value(delta.abs()), metric.unit)
    } else if baseline != 0.0 {
        format!("{:.2}×", value / baseline)
    } else {
        String::new()
    }
}

/// A horizontal bar chart: one bar per path (median), a whisker from min to max.
pub fn svg(result: &ScenarioResult, metric: &MetricResult) -> String {
    let rows = metric.paths.len().max(1);
    let (width, left, right, row_h, top) = (680.0, 120.0, 150.0, 30.0, 40.0);
    let height = top + rows as f64 * row_h + 28.0;
    let plot = width - left - right;
    let max = metric
        .paths
        .iter()
        .map(|p| p.max.max(p.median))
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let x = |v: f64| left + (v.max(0.0) / max) * plot;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        out,
        "<rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"#ffffff\"/>"
    );
    let better = match metric.better {
        Better::Higher => "higher is better",
        Better::Lower => "lower is better",
    };
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{} — {} ({}, {better})</text>",
        esc(&result.title),
        esc(&metric.label),
        esc(&metric.unit)
    );
    let baseline = result
        .baseline
        .as_deref()
        .and_then(|b| metric.path(b))
        .map(|b| b.median);
    for (i, p) in metric.paths.iter().enumerate() {
        let y = top + i as f64 * row_h;
        let bar_w = (x(p.median) - left).max(1.0);
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            y + 15.0,
            esc(&p.path)
        );
        let _ = writeln!(
            out,
            "<rect x=\"{left}\" y=\"{}\" width=\"{bar_w:.1}\" height=\"18\" fill=\"{}\"/>",
            y + 3.0,
            colour(&p.path)
        );
        let (x0, x1, ym) = (x(p.min), x(p.max), y + 12.0);
        let _ = writeln!(
            out,
            "<path d=\"M{x0:.1} {ym} H{x1:.1} M{x0:.1} {} V{} M{x1:.1} {} V{}\" stroke=\"#222\" stroke-width=\"1.2\" fill=\"none\"/>",
            ym - 5.0,
            ym + 5.0,
            ym - 5.0,
            ym + 5.0
        );
        let mut label = fmt_value(p.median);
        if let Some(b) = baseline {
            if Some(p.path.as_str()) != result.baseline.as_deref() {
                label.push_str(&format!("  ({})", versus(metric, p.median, b)));
            }
        }
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\">{}</text>",
            x(p.max).max(x(p.median)) + 6.0,
            y + 15.0,
            esc(&label)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"{}\" fill=\"#555\" font-size=\"11\">bar: median of {} interleaved rounds; whisker: min–max</text>",
        height - 8.0,
        result.rounds
    );
    out.push_str("</svg>\n");
    out
}

fn charted(metric: &MetricResult) -> bool {
    !metric.paths.is_empty()
        && ![
            "lost",
            "upstream_",
            "reloads",
            "fds_per",
            "record_rate",
            "rss_",
        ]
        .iter()
        .any(|k| metric.key.contains(k) && !metric.key.starts_with("rss_per"))
}

/// One target line: what, measured, target, met.
struct Target {
    what: String,
    measured: String,
    target: String,
    met: Option<bool>,
}

fn median(results: &[ScenarioResult], scenario: &str, key: &str, path: &str) -> Option<f64> {
    results
        .iter()
        .find(|r| r.scenario == scenario)?
        .metric(key)?
        .path(path)
        .map(|p| p.median)
}

fn targets(results: &[ScenarioResult]) -> Vec<Target> {
    let mut out = Vec::new();
    let m = |s: &str, k: &str, p: &str| median(results, s, k, p);
    let mut ratio = |what: &str, s: &str, k: &str, of: &str, min: f64, target: &str| {
        let (a, b) = (m(s, k, "egressgate"), m(s, k, of));
        out.push(Target {
            what: what.to_owned(),
            measured: match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => {
                    format!("{:.2}× ({} vs {})", a / b, fmt_value(a), fmt_value(b))
                }
                _ => "not measured".to_owned(),
            },
            target: target.to_owned(),
            met: match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b >= min),
                _ => None,
            },
        });
    };
    ratio(
        "plain TCP bulk throughput vs direct",
        "tcp_bulk",
        "throughput",
        "direct",
        0.85,
        "≥ 0.85×",
    );
    ratio(
        "TLS bulk throughput vs direct",
        "tls_bulk",
        "throughput",
        "direct",
        0.95,
        "≥ 0.95×",
    );
    ratio(
        "new TLS connections/s vs direct",
        "conn_rate",
        "rate",
        "direct",
        0.95,
        "≥ 0.95×",
    );
    ratio(
        "allowed UDP flow throughput vs direct",
        "udp_flow",
        "throughput",
        "direct",
        0.9,
        "≥ 0.9×",
    );
    ratio(
        "new TLS connections/s vs HAProxy (SNI ACL)",
        "conn_rate",
        "rate",
        "haproxy",
        1.2,
        "≥ 1.2×",
    );
    // Issue 14: the per-request HTTP relay within 10 % of the build before it.
    for (key, what) in [
        ("down", "download"),
        ("up", "upload (Content-Length)"),
        ("up_chunked", "upload (chunked)"),
    ] {
        ratio(
            &format!("plain HTTP {what} throughput vs the build before the per-request relay"),
            "http_bulk",
            key,
            "egressgate-base",
            0.9,
            "≥ 0.9×",
        );
    }
    // Issue 17: at least as good as the best of HAProxy and nginx, measured in the same run.
    // `added`: the figure minus the direct path's (latencies).
    let mut vs_best_peer = |what: &str, s: &str, k: &str, lower_is_better: bool, added: bool| {
        let value = |path: &str| {
            let v = m(s, k, path)?;
            if added {
                Some(v - m(s, k, "direct")?)
            } else {
                Some(v)
            }
        };
        let ours = value("egressgate");
        let best = ["haproxy", "nginx"]
            .into_iter()
            .filter_map(|peer| Some((peer, value(peer)?)))
            .min_by(|a, b| {
                let order = a.1.total_cmp(&b.1);
                if lower_is_better {
                    order
                } else {
                    order.reverse()
                }
            });
        let shown = |v: f64| {
            if added {
                format!("{v:+.1}")
            } else {
                fmt_value(v)
            }
        };
        out.push(Target {
            what: what.to_owned(),
            measured: match (ours, best) {
                (Some(ours), Some((peer, best))) => {
                    format!("{} vs {} ({peer})", shown(ours), shown(best))
                }
                _ => "not measured".to_owned(),
            },
            target: if lower_is_better {
                "≤ best peer".to_owned()
            } else {
                "≥ best peer".to_owned()
            },
            met: match (ours, best) {
                (Some(ours), Some((_, best))) => Some(if lower_is_better {
                    ours <= best
                } else {
                    ours >= best
                }),
                _ => None,
            },
        });
    };
    vs_best_peer(
        "proxy CPU per new TLS connection (µs)",
        "tls_connect",
        "cpu_per_op",
        true,
        false,
    );
    vs_best_peer(
        "proxy CPU per new TLS connection, 32 clients (µs)",
        "conn_rate",
        "cpu_per_op",
        true,
        false,
    );
    vs_best_peer(
        "new TLS connection, added p50 (µs)",
        "tls_connect",
        "p50",
        true,
        true,
    );
    vs_best_peer(
        "new TLS connection, added p99 (µs)",
        "tls_connect",
        "p99",
        true,
        true,
    );
    vs_best_peer(
        "new TLS connections/s, 32 clients",
        "conn_rate",
        "rate",
        false,
        false,
    );
    vs_best_peer(
        "keep-alive request, added p50 (µs)",
        "keepalive",
        "p50",
        true,
        true,
    );
    vs_best_peer(
        "proxy CPU per keep-alive request (µs)",
        "keepalive",
        "cpu_per_op",
        true,
        false,
    );
    vs_best_peer(
        "plain HTTP keep-alive request, Host checked per request, added p50 (µs)",
        "http_rr",
        "p50",
        true,
        true,
    );
    vs_best_peer(
        "proxy CPU per plain HTTP keep-alive request, Host checked per request (µs)",
        "http_rr",
        "cpu_per_op",
        true,
        false,
    );
    vs_best_peer(
        "RSS per idle spliced connection, 10k (KiB)",
        "memory",
        "rss_per_conn_10000",
        true,
        false,
    );
    let mut added = |what: &str, s: &str, k: &str, max: f64| {
        let (a, b) = (m(s, k, "egressgate"), m(s, k, "direct"));
        out.push(Target {
            what: what.to_owned(),
            measured: match (a, b) {
                (Some(a), Some(b)) => {
                    format!("{:+.1} µs ({} vs {} µs)", a - b, fmt_value(a), fmt_value(b))
                }
                _ => "not measured".to_owned(),
            },
            target: format!("≤ +{max} µs"),
            met: match (a, b) {
                (Some(a), Some(b)) => Some(a - b <= max),
                _ => None,
            },
        });
    };
    added("new TLS connection, added p50", "tls_connect", "p50", 40.0);
    added("new TLS connection, added p99", "tls_connect", "p99", 150.0);
    added("keep-alive request, added p50", "keepalive", "p50", 10.0);
    added("DNS through the shim, added p50", "dns", "p50", 30.0);
    added("DNS through the shim, added p99", "dns", "p99", 200.0);
    added(
        "allowed UDP flow, added round-trip p50",
        "udp_flow",
        "p50",
        10.0,
    );
    for (key, what) in [("p50", "p50"), ("p99", "p99")] {
        let added_by = |path: &str| {
            Some(m("http_keepalive", key, path)? - m("http_keepalive", key, "direct")?)
        };
        let (new, base) = (added_by("egressgate"), added_by("egressgate-base"));
        out.push(Target {
            what: format!(
                "plain HTTP keep-alive request, added {what} vs the build before the per-request relay"
            ),
            measured: match (new, base) {
                (Some(new), Some(base)) if base > 0.0 => format!(
                    "{:.2}× (+{} vs +{} µs)",
                    new / base,
                    fmt_value(new),
                    fmt_value(base)
                ),
                _ => "not measured".to_owned(),
            },
            target: "≤ 1.1×".to_owned(),
            met: match (new, base) {
                (Some(new), Some(base)) if base > 0.0 => Some(new / base <= 1.1),
                _ => None,
            },
        });
    }
    let mut absolute =
        |what: &str, value: Option<f64>, unit: &str, target: &str, ok: &dyn Fn(f64) -> bool| {
            out.push(Target {
                what: what.to_owned(),
                measured: value.map_or_else(
                    || "not measured".to_owned(),
                    |v| format!("{} {unit}", fmt_value(v)),
                ),
                target: target.to_owned(),
                met: value.map(ok),
            });
        };
    let dns_qps = m("dns", "dnsperf_qps", "egressgate").or(m("dns", "qps", "egressgate"));
    absolute(
        "DNS shim queries/s measured (limited by the generator and upstream sharing one CPU)",
        dns_qps,
        "q/s",
        "≥ 100k q/s",
        &|v| v >= 100_000.0,
    );
    absolute(
        "DNS shim queries/s on one core (1 / shim CPU time per query)",
        m("dns", "qps_per_core", "egressgate"),
        "q/s",
        "≥ 100k q/s",
        &|v| v >= 100_000.0,
    );
    // The largest count measured (a run may ask for fewer).
    let count = [50_000, 10_000]
        .into_iter()
        .find(|count| m("memory", &format!("rss_per_conn_{count}"), "egressgate").is_some())
        .unwrap_or(50_000);
    let held = m("memory", &format!("conns_{count}"), "egressgate").map_or_else(String::new, |n| {
        if n < f64::from(count) {
            format!(" (measured with {n:.0} connections: fd limit)")
        } else {
            String::new()
        }
    });
    absolute(
        &format!(
            "gateway RSS per idle spliced connection at {}k{held}",
            count / 1000
        ),
        m("memory", &format!("rss_per_conn_{count}"), "egressgate"),
        "KiB",
        "≤ 10 KiB",
        &|v| v <= 10.0,
    );
    absolute(
        "decision p99 (10k rules, 1k pods, 1M names)",
        m("decision", "decision_p99", "in-process").map(|ns| ns / 1000.0),
        "µs",
        "≤ 2 µs",
        &|v| v <= 2.0,
    );
    absolute(
        "policy reload of that size",
        m("decision", "reload_ms", "in-process"),
        "ms",
        "≤ 100 ms",
        &|v| v <= 100.0,
    );
    let (steady, reloading) = (
        m("reload", "max", "steady"),
        m("reload", "max", "reloading"),
    );
    out.push(Target {
        what: "no stall during reload (new-connection max latency, reloading vs steady)".to_owned(),
        measured: match (steady, reloading) {
            (Some(s), Some(r)) => format!("max {} µs vs {} µs", fmt_value(r), fmt_value(s)),
            _ => "not measured".to_owned(),
        },
        target: "no visible stall".to_owned(),
        met: match (steady, reloading) {
            // A stall of the size of a reload (tens of ms) dwarfs the steady max.
            (Some(s), Some(r)) => Some(r <= s * 2.0 + 2000.0),
            _ => None,
        },
    });
    restart_targets(results, &mut out);
    out
}

/// Issue 13: restarts and upgrades that lose nothing, and what the journal costs a DNS answer.
fn restart_targets(results: &[ScenarioResult], out: &mut Vec<Target>) {
    let restart = results.iter().find(|r| r.scenario == "restart");
    let value = |phase: &str, key: &str| -> Option<f64> {
        restart?.metric(key)?.path(phase).map(|p| p.median)
    };
    let upgrades: Vec<String> = restart
        .map(|r| {
            r.paths
                .iter()
                .filter(|p| p.name.starts_with("upgrade"))
                .map(|p| p.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut count = |what: String, phases: &[String], keys: &[&str]| {
        let measured: Option<f64> = if phases.is_empty() {
            None
        } else {
            phases
                .iter()
                .flat_map(|p| keys.iter().map(move |k| value(p, k)))
                .sum()
        };
        out.push(Target {
            what,
            measured: measured.map_or_else(|| "not measured".to_owned(), |n| format!("{n:.0}")),
            target: "0".to_owned(),
            met: measured.map(|n| n == 0.0),
        });
    };
    let keys = [
        "dns_failed",
        "conn_refused",
        "conn_reset",
        "conn_failed_other",
        "ndr_cached",
        "ndr_fresh",
        "streams_broken",
    ];
    count(
        format!(
            "{} rolling upgrades under load: failed DNS queries, refused/reset/failed new \
             connections, no_dns_record denials, broken streams",
            upgrades.len()
        ),
        &upgrades,
        &keys,
    );
    for phase in ["SIGTERM restart", "kill -9 restart"] {
        count(
            format!("{phase}: no_dns_record denials for names resolved before it"),
            &[phase.to_owned()],
            &["ndr_cached", "ndr_fresh"],
        );
    }
    let back =
        value("kill -9 restart", "conn_back_ms").zip(value("kill -9 restart", "dns_back_ms"));
    out.push(Target {
        what: "kill -9: new connections and DNS work again after the new process starts".to_owned(),
        measured: back.map_or_else(
            || "not measured".to_owned(),
            |(conn, dns)| format!("{conn:.0} ms (connections), {dns:.0} ms (DNS)"),
        ),
        target: "≤ 1 s".to_owned(),
        met: back.map(|(conn, dns)| conn.max(dns) <= 1000.0),
    });
    // "Today's" is the build from before the journal when it was measured, else the same build
    // without a usable state directory.
    let m = |key: &str, path: &str| median(results, "dns_journal", key, path);
    let without = ["before-journal", "in-memory"]
        .into_iter()
        .find(|path| m("p50", path).is_some())
        .unwrap_or("in-memory");
    let added = m("p50", "journal")
        .zip(m("p50", without))
        .zip(m("p50", "direct"))
        .map(|((j, w), d)| (j - d, w - d));
    out.push(Target {
        what: format!("DNS added p50 with the name journal vs `{without}` (`dns_journal`)"),
        measured: added.map_or_else(
            || "not measured".to_owned(),
            |(j, w)| format!("+{j:.1} µs vs +{w:.1} µs"),
        ),
        target: "within 10 %".to_owned(),
        met: added.map(|(j, w)| j <= w * 1.10),
    });
    let cpu = m("cpu_per_query", "journal").zip(m("cpu_per_query", without));
    out.push(Target {
        what: format!("gateway CPU per DNS answer with the name journal vs `{without}`"),
        measured: cpu.map_or_else(
            || "not measured".to_owned(),
            |(j, w)| format!("{j:.1} µs vs {w:.1} µs ({:+.0} %)", (j / w - 1.0) * 100.0),
        ),
        target: "(the cost per answer)".to_owned(),
        met: None,
    });
}

/// Criterion's estimates under `target/criterion`: (benchmark id, median ns).
fn criterion_estimates(target: &Path) -> Vec<(String, f64)> {
    let root = target.join("criterion");
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "new") {
                    let estimates = path.join("estimates.json");
                    let value = std::fs::read_to_string(&estimates)
                        .ok()
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                        .and_then(|v| v["median"]["point_estimate"].as_f64());
                    if let (Some(value), Ok(rel)) = (value, dir.strip_prefix(&root)) {
                        out.push((rel.display().to_string(), value));
                    }
                } else if path.file_name().is_some_and(|n| n != "report") {
                    stack.push(path);
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// Writes the report and the charts; returns the report's path.
pub fn write(
    results: &[ScenarioResult],
    results_dir: &Path,
    report: &Path,
    target_dir: &Path,
) -> Result<PathBuf, Error> {
    let svg_dir = results_dir.join("svg");
    std::fs::create_dir_all(&svg_dir)?;
    let report_dir = report.parent().unwrap_or(Path::new("."));
    let rel_svg = relative(report_dir, &svg_dir);
    let mut md = String::new();
    md.push_str("# egressgate benchmarks\n\n");
    md.push_str(
        "<!-- Generated by `cargo run -p loadtest --release -- report` from loadtest/results/*.json; \
         edits are overwritten. -->\n\n",
    );
    md.push_str(
        "Measured by the `loadtest` harness (issue 4): the network-namespace lab of the end-to-end \
         tests, the real `egressgate` binary with its nftables TPROXY rules, and HAProxy and nginx \
         from Debian on the same node, all measured in one run with interleaved rounds. Ratios are \
         against the direct path of the same run. Numbers depend on the machine: compare ratios, \
         not absolute values, and re-run on a quiet machine before quoting them.\n\n",
    );
    if let Some(first) = results.first() {
        let m = &first.machine;
        md.push_str("## Machine\n\n| | |\n|---|---|\n");
        for (k, v) in [
            ("CPUs (nproc)", m.nproc.to_string()),
            ("CPU model", m.cpu_model.clone()),
            ("virtualization", m.virtualization.clone()),
            ("kernel", m.kernel.clone()),
            ("OS", m.os.clone()),
            ("memory", format!("{} GiB", m.memory_gib)),
            (
                "load average at start (1/5/15 min)",
                m.loadavg_at_start.clone(),
            ),
            (
                "CPU busy in the 2 s before the run (all CPUs)",
                m.cpu_busy_at_start.map_or_else(
                    || "not measured".to_owned(),
                    |b| format!("{:.1} %", b * 100.0),
                ),
            ),
            (
                "kernel memory monitor",
                // Recorded since a later run than some results may come from.
                results
                    .iter()
                    .find_map(|r| r.machine.memory_monitor.clone())
                    .unwrap_or_else(|| "not recorded".to_owned()),
            ),
            ("HAProxy", m.haproxy.clone()),
            ("nginx", m.nginx.clone()),
            ("dnsperf", m.dnsperf.clone()),
            ("rustc", m.rustc.clone()),
            ("egressgate commit", m.commit.clone()),
        ] {
            let _ = writeln!(md, "| {k} | {} |", esc(&v));
        }
        // Busy means other work: more than 10 % of the CPUs in use before the run started.
        let busy: Vec<&str> = results
            .iter()
            .filter(|r| r.machine.cpu_busy_at_start.is_some_and(|busy| busy > 0.10))
            .map(|r| r.scenario.as_str())
            .collect();
        if !busy.is_empty() {
            let _ = writeln!(
                md,
                "\n**Noisy:** the machine was busy with other work when these scenarios' run \
                 started (over 10 % of the CPUs in use before it): {}. Treat their numbers as \
                 indicative and re-run on a quiet machine.",
                busy.join(", ")
            );
        }
        md.push_str("\n## Method\n\n");
        let _ = writeln!(md, "**CPU placement.** {}\n", esc(&first.placement));
        md.push_str(
            "**Paths.** Each path has its own pod in the same lab, so all exist at once and \
             rounds interleave (direct, egressgate, haproxy, nginx, direct, …):\n\n| path | what |\n|---|---|\n",
        );
        let mut seen = Vec::new();
        for r in results {
            for p in &r.paths {
                if !p.description.is_empty() && !seen.contains(&p.name) && r.scenario != "dns" {
                    seen.push(p.name.clone());
                    let _ = writeln!(md, "| {} | {} |", p.name, p.description);
                }
            }
        }
        md.push_str(
            "\nThe upstream is the harness's own server in the `up` namespace (plain TCP, TLS \
             via rustls, an idle-connection sink and a DNS responder), the clients are the \
             harness's own generator (tokio, rustls, HDR histograms) and dnsperf. Every sample is \
             bounded in count and time. Each table cell is the median of the rounds, with min–max \
             below it; the last columns compare with the baseline (a ratio, or the added time for \
             latencies). A change to the gateway is checked for regressions by an A/B run: \
             `--baseline-bin` measures the build before it in egressgate's place, the two \
             swapped before each sample so that their rounds interleave \
             (loadtest/README.md).\n",
        );
    }

    md.push_str("\n## Targets (issues 4, 13 and 17)\n\n| target | measured (egressgate) | goal | |\n|---|---|---|---|\n");
    for t in targets(results) {
        let mark = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "—",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {mark} |",
            t.what, t.measured, t.target
        );
    }

    md.push_str("\n## Results\n");
    for r in results {
        let _ = writeln!(md, "\n### {}\n\n{}\n", r.title, esc(&r.description));
        // Scenarios re-run alone after a code change say which code they measured, and on
        // which machine when it is not the one the "Machine" table describes: only figures of
        // one run compare.
        let (commit, machine) = match results.first() {
            Some(first) => (
                (first.machine.commit != r.machine.commit)
                    .then(|| format!(", egressgate commit {}", r.machine.commit)),
                (first.machine.cpu_model != r.machine.cpu_model
                    || first.machine.kernel != r.machine.kernel)
                    .then(|| {
                        format!(
                            ", on another machine ({}, {} CPUs, {})",
                            r.machine.cpu_model, r.machine.nproc, r.machine.virtualization
                        )
                    }),
            ),
            None => (None, None),
        };
        let _ = writeln!(
            md,
            "Scenario `{}`, {} round(s), started {}, took {:.0} s{}{}.\n",
            r.scenario,
            r.rounds,
            r.started,
            r.seconds,
            commit.unwrap_or_default(),
            machine.unwrap_or_default()
        );
        let paths: Vec<&str> = r.paths.iter().map(|p| p.name.as_str()).collect();
        let others: Vec<&str> = paths
            .iter()
            .copied()
            .filter(|p| Some(*p) != r.baseline.as_deref())
            .collect();
        md.push_str("| metric | ");
        md.push_str(&paths.join(" | "));
        if let Some(b) = &r.baseline {
            for o in &others {
                let _ = write!(md, " | {o} vs {b}");
            }
        }
        md.push_str(" |\n|---|");
        md.push_str(&"---|".repeat(paths.len()));
        if r.baseline.is_some() {
            md.push_str(&"---|".repeat(others.len()));
        }
        md.push('\n');
        for metric in &r.metrics {
            let _ = write!(md, "| {} ({}) |", metric.label, metric.unit);
            for p in &paths {
                match metric.path(p) {
                    // One sample (one round): no range to show.
                    Some(s) if s.samples.len() == 1 => {
                        let _ = write!(md, " {} |", fmt_value(s.median));
                    }
                    Some(s) => {
                        let _ = write!(
                            md,
                            " {}<br><sub>{}–{}</sub> |",
                            fmt_value(s.median),
                            fmt_value(s.min),
                            fmt_value(s.max)
                        );
                    }
                    None => md.push_str(" — |"),
                }
            }
            if let Some(b) = r.baseline.as_deref().and_then(|b| metric.path(b)) {
                for o in &others {
                    match metric.path(o) {
                        Some(s) => {
                            let _ = write!(md, " {} |", versus(metric, s.median, b.median));
                        }
                        None => md.push_str(" — |"),
                    }
                }
            } else if r.baseline.is_some() {
                md.push_str(&" — |".repeat(others.len()));
            }
            md.push('\n');
        }
        md.push('\n');
        // The restart scenario's phases are events, not paths: only its gaps make a chart.
        for metric in r
            .metrics
            .iter()
            .filter(|m| charted(m) && (r.scenario != "restart" || m.key.starts_with("gap_")))
        {
            let file = format!("{}-{}.svg", r.scenario, metric.key);
            std::fs::write(svg_dir.join(&file), svg(r, metric))?;
            let _ = writeln!(
                md,
                "![{} — {}]({rel_svg}/{file})",
                esc(&r.title),
                esc(&metric.label)
            );
        }
        if !r.notes.is_empty() {
            md.push_str("\nNotes:\n\n");
            for note in &r.notes {
                let _ = writeln!(md, "- {}", esc(note));
            }
        }
    }

    let estimates = criterion_estimates(target_dir);
    md.push_str(SCALING);
    md.push_str(HOPS);
    md.push_str("\n## Micro-benchmarks\n\n");
    md.push_str(
        "criterion benches in `loadtest/benches/` (`cargo bench -p loadtest`): the matcher \
         (`PolicySet::select` + `Selection::grants`), the name table (`NameTable::lookup` / \
         `record`) and each peeker over real client captures. Medians from the last \
         `cargo bench` on this machine:\n\n",
    );
    if estimates.is_empty() {
        md.push_str("_No criterion results found: run `cargo bench -p loadtest`, then `cargo run -p loadtest --release -- report`._\n");
    } else {
        md.push_str("| benchmark | median |\n|---|---|\n");
        for (id, ns) in estimates {
            let _ = writeln!(md, "| `{id}` | {} |", fmt_ns(ns));
        }
    }
    md.push_str(
        "\n## Running\n\n```sh\ncargo run -p loadtest --release -- all          # every scenario, then this report\n\
         cargo run -p loadtest --release -- tcp_bulk dns # some scenarios\n\
         cargo run -p loadtest --release -- smoke        # seconds; what CI runs\n\
         cargo bench -p loadtest                         # micro-benchmarks\n\
         cargo run -p loadtest --release -- report       # regenerate this file\n```\n\n\
         See `loadtest/README.md` for the options (rounds, sample length, paths, memory counts).\n",
    );
    std::fs::write(report, md)?;
    Ok(report.to_path_buf())
}

/// `to` relative to `from` (both absolute or both relative to the same root).
fn relative(from: &Path, to: &Path) -> String {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_owned(); from.len() - common];
    parts.extend(
        to[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

/// How egressgate scales past the one proxy CPU the runs above give it, and why: the design,
/// and a 1 → 2 worker run (this machine has 2 CPUs, one of them the load's).
const SCALING: &str = "
## Scaling across cores

Every figure above is for one proxy core (`listen.workers: 1`). A node runs one worker per
CPU the gateway may use:

- **One listener per worker.** Each worker is a thread with its own single-threaded tokio
  runtime and its own socket on every TPROXY, DNS and UDP-relay address (SO_REUSEPORT). The
  kernel spreads new connections by their address hash, and pods' DNS queries by their
  socket, over the workers; a connection stays on its worker from accept to close, so nothing
  hands a task or a wake-up to another thread. A DNS listener task per worker batches its
  queries (`recvmmsg`, `sendmmsg` to the upstreams and back).
- **Nothing on the path serializes the workers.** Policies and identities are read through
  `ArcSwap` (no lock). The name table is 32 shards by pod, each behind its own `RwLock`:
  recording a DNS answer write-locks only that pod's shard, and a connection's lookup reads
  one shard (the table benchmark: lookups beside a recording thread at 0.5–1.0 µs, where one
  lock gave 1.2–1.6 µs and a p99 up to 103 µs). The peek limits (`peek.maxPending`,
  `peek.maxPendingPerPod`), which every connection takes and gives back, are an atomic total
  and per-source counts in 32 shards by address (until 2026-12-07 one mutex, taken twice
  per connection by every worker). Small relay chunks are copied through a
  per-worker buffer; only bulk chunks borrow a pipe from the shared pool, one short lock per
  64 KiB. Counters are atomics.
- **What it should give:** CPU per connection and per query flat as workers are added, so
  connections/s and queries/s grow with cores until the NIC, the kernel's own per-socket
  work, or the load.
- **Measured, 1 → 2 workers** (2026-12-07, `--workers 1` and `--workers 2`, 3 rounds each;
  with 2 the gateway runs on both CPUs, the load's included, so throughput cannot double and
  the CPU per operation is the figure): the kernel gave the two workers 51 % and 49 % of the
  work (CPU time per thread over 10 s of `conn_rate`). Proxy CPU per new TLS connection
  (32 clients) 130 → 136 µs (+5 %, both at the load's rate, ~2100/s); shim CPU per DNS query
  9.31 → 9.12 µs (flat; 107k → 110k q/s per core), DNS p99 97 → 80 µs. No figure grows
  with the second worker beyond the noise of a shared CPU.
- **What may limit it first:** the JSON log is written by one thread for all workers. Each
  worker formats its lines (about 1 µs each) in a buffer of its own and takes the shared
  queue's lock only to copy the bytes in (until 2026-12-07 the formatting happened under
  that lock, which every worker takes for every decision, close and `dns` line); the thread
  only writes batches. So past some hundred thousand lines/s stdout and its reader become the
  limit, and producers wait once 4 MiB are queued (no line is dropped). `observe` keeps the
  last decision and `dns` lines in a ring behind one more short lock per line. The one queue
  itself tops out near a million lines/s per node: `cargo run --release -p egressgate-log
  --example log_contention -- <threads> <lines>` (stdout to /dev/null) logs 1.0M
  decision-sized lines/s from one thread and 0.95–1.04M from two together here (0.92–0.94M
  with the formatting under the lock), the two then waiting on the queue's mutex.
- **Memory** per connection does not depend on the worker count; each worker adds its
  runtime and a 16 KiB copy buffer.
";

/// Where a new TLS connection's added latency goes, hop by hop (a tcpdump, not the harness).
const HOPS: &str = "
## Where a new connection's time goes

`loadtest/tools/latency_hops.py` reads a tcpdump of the lab's node namespace taken during
`tls_connect` (one client) and times each hop through the proxy (a packet arriving on one side
to its counterpart leaving on the other), and the client's and the server's own turns between
those packets. Medians of about 10,000 connections each, 2026-12-07 (commit 7e0ba646), one run
per column:

| µs (median) | egressgate, client-first port | egressgate, other port | HAProxy |
|---|---|---|---|
| ClientHello in → SYN to the server | 19.6 | 12.4 | 10.5 |
| SYN → SYN-ACK | 2.6 | 2.9 | 2.6 |
| SYN-ACK → ClientHello to the server | 6.9 | 6.9 | 7.4 |
| server's first flight in → out | 7.6 | 8.1 | 7.4 |
| client's Finished in → out | 7.6 | 10.5 | 7.4 |
| *server's turn*: ClientHello → its first flight | 113.7 | 115.2 | 105.1 |
| *client's turn*: server's first flight → its Finished | 183.8 | 186.4 | 172.6 |
| *client's turn*: last byte of the response → next SYN | 42.4 | 39.8 | 22.9 |
| ClientHello in → server's last byte to the client | 395.8 | 398.9 | 354.5 |

- The proxy's own hops add about 10 µs over HAProxy's on a client-first port and 3 µs on
  other ports. On a port of `intercept.clientFirstPorts` the kernel hands the connection over
  with its ClientHello (TCP_DEFER_ACCEPT): one wake-up instead of two, but the accept (the
  kernel creating the socket, `accept4`, registering it) then happens after the ClientHello
  arrived instead of while the client was still computing it. In an A/B of the same binary
  (10 runs each, alternated, 2026-12-07) the option cost nothing in the client's p50 (520.5
  vs 519.5 µs) and saved about 3 % CPU (110 vs 114 µs per connection).
- Most of the rest of HAProxy's lead is on the CPU the lab's client and server share: the
  same server and client take longer turns behind egressgate (and behind nginx: its server
  turn is 114.2 µs) than behind HAProxy. Counted from `/proc/<pid>/status` over 5 s of
  `tls_connect`, per connection: behind egressgate the server sleeps and is woken 2.9 times
  (2.4 behind HAProxy) and the client is preempted 0.6 times (0.3), and each spends about
  9 µs more CPU. The packets are the same (count and kind, both sides); which of the proxy's
  timings makes the server sleep once more is not found yet. On a machine with a CPU each for
  client, server and proxy this part would go away; this one has two.
- The SYN-ACK of a near server arrives while connect(2) still runs; the ClientHello goes up
  at once (before the decision line is formatted), without waiting for the event loop to
  report the socket writable (that hop went from 24.3 to 7.2 µs); the next connection's
  `accept4` runs only after this connection's ClientHello went up (the listener passes from
  task to task).
- The handshake's last ACK leaves with the ClientHello (quick ACKs are off on the upstream
  socket from before connect(2) until the first bytes went, as HAProxy's
  `option tcp-smart-connect`): one packet less per connection, the server's kernel completes
  the handshake and queues the ClientHello at once, and a server without `TCP_DEFER_ACCEPT`
  wakes once for both. In a tcpdump of the node during `tls_connect` (2026-12-07, taken with
  tcpdump's own load on the machine, so every hop slower than above) the SYN-ACK → ClientHello
  hop went from 18.6 to 9.5 µs and the pure ACKs on the upstream side from 5.5 to 5.0 per
  connection (both directions counted; the server's first flight is still acknowledged at
  once). End to end it is below this machine's noise: an A/B against the build before it
  (`--baseline-bin`, 15 interleaved rounds of `tls_connect`) gave proxy CPU 0.99× and p50
  1.02× as medians of the paired rounds, where an A/A run of one binary against a copy of
  itself spreads by ±4 % (single rounds 0.75–1.22×).

### Where the proxy's CPU goes

Per new TLS connection during `tls_connect` (one client), from
`loadtest/tools/per_connection.py <path>`: the proxy's user and system time from /proc over
4 s (the total exact, the split tick-sampled), divided by the connections the node opened
upstream; then, in the next 4 s, the system calls on the proxy's CPU by name (perf on the
syscall tracepoints, which slow every call, hence the separate window), divided by the
`connect` calls. Three or four runs each (HAProxy one), on the AMD EPYC machine of the tls_connect
run above, 2026-12-07 18:30 UTC, egressgate at commit f3971092 (with the delayed handshake
ACK):

| per connection | egressgate | nginx | HAProxy |
|---|---|---|---|
| user CPU (µs) | 34–45 | 16–20 | 39 |
| kernel CPU (µs) | 231–251 | 212–239 | 266 |
| system calls | 37.3–38.1 | 32.2–32.9 | 58.1 (18.5 of them `clock_gettime`) |
| `epoll_wait` / `recvfrom` / send | 9.1 / 7.8 / 5.8 | 8.9 / 6.9 / 5.9 | 9.3 / 9.1 / 5.1 |
| `epoll_ctl` | 4 | 2 | 4 |
| `accept4` | 2 | 1 | 2 |
| `getsockname` / `shutdown` | 1 / 1 | 0 / 0 | 1 / 1 |
| `setsockopt` / `getsockopt` | 3 / 0 | 2 / 1 | 2 / 1 |

- The system calls egressgate makes and nginx does not: one more `setsockopt` (the two
  `TCP_QUICKACK` around the first upstream send, for one packet less (see above); the pod's
  socket inherits `TCP_NODELAY` from the listener, and no `getsockopt(SO_ERROR)` is needed
  when the first send is the test), `getsockname` (the original
  destination of a transparent connection), `shutdown` and one more `recvfrom` (half-close is
  passed on: after the client's FIN the server's own FIN is read, where nginx closes both
  sides at the client's), the `epoll_ctl` DEL tokio makes before it closes a socket (2), and
  the `accept4` that finds the queue empty (tokio's listener is edge-triggered). None of the
  recvs finds nothing (`perf trace --failure`: no EAGAIN). Removing the last three would mean
  leaving tokio's sockets. A system call itself costs 0.2 µs here (`perf bench syscall`);
  with their work these account for a few µs of the kernel-side difference, which varies
  from 0 to 50 µs between runs.
- User space is the steady part of the gap: 15–25 µs (measured before the instruction
  cuts of the next section). It is spread thin (`perf record
  -C 1`): tokio's task and readiness machinery, the decision and close lines (serde, the time
  stamp), the decision (pod, selection, names, grants); nothing above 2.5 µs. A uprobe on
  the standard library's clock read counts 51 per connection (about 80 ns each in this VM):
  36 in tokio's time driver and scheduler around its parks, 12 of the gateway's own.
  Since this section was first written: fat LTO with one codegen unit (about −5 % CPU), no
  eventfd write per connection (a worker keeps a timer within 1 s, so a connection's deadlines
  no longer wake tokio's driver), the byte counters resolved once.
- Per keep-alive request (`keepalive`, perf on the syscall tracepoints of CPU 1, 2026-12-07)
  the three proxies make the same system calls: per direction one `epoll_wait`, one
  `recvfrom` and one send (`sendto`; nginx `writev`), and HAProxy two `clock_gettime` more.
  What egressgate spends beyond nginx per request is user space.

### The kernel's part

Measured again on a quiet machine (load average 0.00, 2026-12-07 22:50 UTC, commit
68e08496): `per_connection.py` gave egressgate 37 µs user + 244 µs kernel per new TLS
connection, nginx 27 + 210. Sampling the proxy's CPU (`perf record -C 1`, 9999 Hz, 5 s,
about 7,300 connections each) splits it by symbol: egressgate 30 µs user and 221 µs kernel,
nginx 16 and 190. What the kernel's extra 30 µs is not:

- **More packets:** per connection egressgate sends the server 2.8 data segments and 3.1
  pure ACKs, nginx 3.0 and 4.0 (tcpdump of the node, both legs).
- **More sleeps:** the proxy's thread sleeps and is woken 5.3 times per connection,
  nginx's 5.0, HAProxy's 5.8 (`/proc/<pid>/task/*/status` over 5 s).
- **One cause:** the difference is spread over the whole network path, grouped by kernel
  symbol (µs per connection, egressgate vs nginx): TCP 66 vs 62, slab and memory-cgroup
  accounting 18 vs 14, netfilter, FIB and socket lookups 16 vs 12, system-call entry and
  exit 8 vs 4.5 (5.4 more calls: see the table above), the scheduler equal (32 vs 32).

The netfilter share is the interception itself: every packet from an intercepted pod runs the
`intercept` chain (the reverse-path FIB check, then the `socket transparent` lookup that
finds the gateway's socket), and the ACKs the client's and the server's kernels send in
answer to the gateway's own sends are processed on the gateway's CPU. nginx here is
addressed explicitly (it cannot listen transparently), so its pod's packets skip that chain;
HAProxy, intercepted the same way as egressgate, spends 266 µs in the kernel.

### Instructions per connection and per request

CPU time here moves by ±5 % between runs, so user-space work is counted instead:
`loadtest/tools/instructions.py <path> [--scenario tls_connect|keepalive|http_rr]` runs the proxy
under valgrind's callgrind, counts the instructions it executes (all threads, user space) in
a window mid-run and divides by the connections it opened upstream or by its keep-alive
requests. Exact to a few instructions between runs. 2026-12-07:

| user-space instructions | egressgate at 322c851b | at 68e08496 | now | nginx | HAProxy |
|---|---|---|---|---|---|
| per new TLS connection (`tls_connect`) | 65.6k | 45.3k | 42.6k | 20.5k | 34.4k |
| per keep-alive request (`keepalive`) | 5.79k | 4.82k | 4.82k | 2.41k | 6.21k |
| per plain HTTP request, Host checked (`http_rr`, 2026-12-08) | – | – | 9.78k | 18.2k | 28.9k |

- What went, per connection: 12.3k of zeroing a 4 KiB stack chunk on every peek read (now
  uninitialized memory; a `rep stosb` that valgrind counts per byte, so less time than the
  count says), 6.5k of serde_json's generic path for the decision and close lines (now
  written field by field, the same bytes), 1.4k of time-stamp formatting (once per second,
  then the milliseconds), 0.8k of a set of the ClientHello's extension types (an array now),
  and per relayed chunk a clock read (the idle timeout now checks a flag every eighth of
  itself) and a lock on the socket's list of waiters (now its own waker slot). The last two
  are most of what went per keep-alive request.
- Then (68e08496 → now, 2.7k): the peek limits' one mutex and four SipHashes of the source
  address per connection (1.0k; now an atomic, sharded counts and foldhash: see Scaling
  across cores), the allowing policy's name formatted into a `String` for the decision line
  (0.7k; now borrowed and copied in pieces), an IP-address parse of every SNI before the
  name rule (0.5k; now only for a refused name), UTF-8 checks where names were only compared
  or hashed (0.4k) and the JSON escape check (0.2k; now eight bytes at a time).
- Per plain HTTP request (`http_rr`, where each proxy parses every request head and checks
  its Host): 18.7k → 9.78k. Each read of the per-request relay cleared a 4 KiB stack chunk
  (now the worker's copy buffer, as the copy direction uses), the read after a request's last
  bytes was one more `recv` that found nothing (now the short-read rule of the copy
  direction: 7 → 6 system calls per request), and every head's method and target were copied
  into two `String`s that nothing read (0.6k; the method is still checked). nginx's http proxy and HAProxy's `mode
  http` rewrite the messages they pass on (headers parsed into tables, a new request line and
  response head written); egressgate passes the bytes on unchanged once the head is framed.
- What is left of a connection: tokio's scheduler, I/O driver and timer wheel (about 10k,
  with some 27 clock reads around its 9 parks: two in the time driver's, one in the
  scheduler's own loop, none of them switchable), the allocator (about 5k for some 16
  allocations, three of them tokio's cache-aligned ones through `posix_memalign`), the two
  log lines (about 4k), the decision (about 6k: pod, selection, names, grants) and the
  ClientHello peek (about 3k). Of a keep-alive request: mostly tokio's wake-up, poll and
  park around the two copies.
- The user/kernel split of `per_connection.py` (tick-sampled) cannot show it: two runs each
  at 3cbfe769 gave egressgate 39 and 51 µs of user time per connection, nginx 21 and 34.
- End to end the change is within this machine's noise: an A/B against 322c851b
  (`--baseline-bin`, 15 interleaved rounds) gave proxy CPU per new connection 1.00× and per
  keep-alive request 0.99× (medians of the paired rounds; an A/A run spreads ±4 %); the
  second step against 68e08496 (15 rounds, all of it but the SNI parse) 0.98× and 1.01×.
- Tried and not kept: mimalloc as the global allocator took another 2.7k instructions off a
  connection but grew RSS per idle connection by 13 % (4.18 vs 3.69 KiB in a memory A/B).
";
