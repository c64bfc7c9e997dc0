//! Reading a restart run: the gateways' JSON lines and the clients' reports, cut into phases
//! (the baseline, then one phase per event, from its start to the next one's), and counted.

use std::collections::{BTreeMap, HashSet};

use egressgate_lab::Gateway;
use serde_json::Value;

use super::load::{LoadReport, Op};

/// What the harness did at one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A second process started beside the running one and took over.
    Upgrade,
    /// SIGTERM, wait for the exit, start a new process.
    Sigterm,
    /// SIGKILL, wait for the exit, start a new process.
    Kill,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub kind: EventKind,
    /// When the harness began it (exec of the successor, or the signal), ms since the epoch.
    pub from_ms: u64,
    /// When the stopped process was seen gone (SIGTERM, kill -9).
    pub exited_ms: Option<u64>,
    /// When the new process's `listening` line was seen.
    pub ready_ms: u64,
    /// Index of the process stopped or taken over, and of the new one.
    pub old: usize,
    pub new: usize,
}

/// One gateway process's lines, as far as the scenario reads them.
#[derive(Debug, Default)]
pub struct GatewayLog {
    pub decisions: Vec<Decision>,
    pub listening: Option<Value>,
    /// Its `handover` line as the successor (it took over), and as the predecessor.
    pub took_over: Option<Value>,
    pub handed_over: Option<Value>,
    pub shutdown: Option<Value>,
    pub restore: Option<Value>,
}

#[derive(Debug)]
pub struct Decision {
    pub at_ms: u64,
    pub allowed: bool,
    pub reason: String,
    pub sni: Option<String>,
    pub source: String,
}

impl GatewayLog {
    pub fn read(gateway: &Gateway) -> GatewayLog {
        let mut log = GatewayLog::default();
        for line in gateway.lines() {
            match line.get("event").and_then(Value::as_str) {
                Some("decision") => {
                    let text = |key: &str| line.get(key).and_then(Value::as_str).map(str::to_owned);
                    log.decisions.push(Decision {
                        at_ms: text("time").as_deref().and_then(time_ms).unwrap_or(0),
                        allowed: text("verdict").as_deref() == Some("allow"),
                        reason: text("reason").unwrap_or_default(),
                        sni: text("sni"),
                        source: text("source").unwrap_or_default(),
                    });
                }
                Some("listening") => log.listening = Some(line),
                Some("handover") => {
                    if line.get("role").and_then(Value::as_str) == Some("successor") {
                        log.took_over = Some(line);
                    } else {
                        log.handed_over = Some(line);
                    }
                }
                Some("shutdown") => log.shutdown = Some(line),
                Some("restore") => log.restore = Some(line),
                _ => {}
            }
        }
        log
    }

    fn number(line: Option<&Value>, key: &str) -> Option<f64> {
        line?.get(key)?.as_f64()
    }
}

/// Milliseconds since the epoch of the gateway's `time` (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
pub fn time_ms(text: &str) -> Option<u64> {
    let digits = |range: std::ops::Range<usize>| -> Option<u64> { text.get(range)?.parse().ok() };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hh, mm, ss, ms) = (
        digits(11..13)?,
        digits(14..16)?,
        digits(17..19)?,
        digits(20..23)?,
    );
    // Days from the civil date (Howard Hinnant's algorithm), years from 1970 on.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms)
}

/// The longest time without a success that overlaps `[from, to]`: the interval between two
/// consecutive successes (or `from` and the first, or the last and `end`). `sorted` ascending.
pub fn longest_gap(sorted: &[u64], from: u64, to: u64, end: u64) -> f64 {
    let start = sorted.partition_point(|&t| t < from);
    let mut previous = if start > 0 { sorted[start - 1] } else { from };
    let mut longest = 0;
    for &t in &sorted[start..] {
        longest = longest.max(t.saturating_sub(previous));
        previous = t;
        if t > to {
            return longest as f64;
        }
    }
    longest.max(end.saturating_sub(previous)) as f64
}

/// One client's report with its pod's address.
#[derive(Debug)]
pub struct PodLoad {
    pub letter: String,
    pub ip: String,
    pub report: LoadReport,
}

/// What the counts are read from.
#[derive(Debug)]
pub struct Run<'a> {
    pub loads: &'a [PodLoad],
    pub logs: &'a [GatewayLog],
    pub fresh_name: &'a str,
    pub cached_names: &'a HashSet<String>,
    /// Every success, all pods merged, ascending.
    pub conn_ok: Vec<u64>,
    pub dns_ok: Vec<u64>,
}

impl<'a> Run<'a> {
    pub fn new(
        loads: &'a [PodLoad],
        logs: &'a [GatewayLog],
        fresh_name: &'a str,
        cached_names: &'a HashSet<String>,
    ) -> Run<'a> {
        let mut conn_ok: Vec<u64> = loads
            .iter()
            .flat_map(|l| l.report.conn_ok_ms.iter().copied())
            .collect();
        let mut dns_ok: Vec<u64> = loads
            .iter()
            .flat_map(|l| l.report.dns_ok_ms.iter().copied())
            .collect();
        conn_ok.sort_unstable();
        dns_ok.sort_unstable();
        Run {
            loads,
            logs,
            fresh_name,
            cached_names,
            conn_ok,
            dns_ok,
        }
    }

    /// Failures in `[from, to)` by operation and kind, as `op kind: n` in one line.
    pub fn breakdown(&self, from: u64, to: u64) -> String {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for f in self
            .loads
            .iter()
            .flat_map(|l| &l.report.failures)
            .filter(|f| f.at_ms >= from && f.at_ms < to)
        {
            *by.entry(format!("{:?} {}", f.op, f.kind)).or_default() += 1;
        }
        if by.is_empty() {
            return "no failure".to_owned();
        }
        by.into_iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The gateway process that decided the connection from `source` made around `opened_ms`.
    fn holder(&self, source: &str, opened_ms: u64) -> Option<usize> {
        self.logs
            .iter()
            .enumerate()
            .flat_map(|(i, log)| log.decisions.iter().map(move |d| (i, d)))
            .filter(|(_, d)| {
                d.source == source && d.at_ms + 3000 >= opened_ms && d.at_ms <= opened_ms + 500
            })
            .min_by_key(|(_, d)| d.at_ms.abs_diff(opened_ms))
            .map(|(i, _)| i)
    }

    /// The counts of one phase `[from, to)`; `event` is `None` for the baseline.
    pub fn phase(&self, from: u64, to: u64, event: Option<&Event>) -> Vec<(String, f64)> {
        let mut counts: BTreeMap<&str, f64> = BTreeMap::new();
        for key in [
            "dns_failed",
            "conn_refused",
            "conn_reset",
            "conn_failed_other",
            "streams_broken",
            "ndr_cached",
            "ndr_fresh",
            "denied_other",
        ] {
            counts.insert(key, 0.0);
        }
        if event.is_some_and(|e| e.kind != EventKind::Upgrade) {
            counts.insert("streams_broken_stopped", 0.0);
        }
        let mut bump = |key: &'static str| *counts.entry(key).or_insert(0.0) += 1.0;
        for load in self.loads {
            for f in load
                .report
                .failures
                .iter()
                .filter(|f| f.at_ms >= from && f.at_ms < to)
            {
                match (f.op, f.kind.as_str()) {
                    (Op::Dns | Op::DnsTcp, _) => bump("dns_failed"),
                    (Op::Stream, _) => {
                        bump("streams_broken");
                        let source = format!("{}:{}", load.ip, f.port.unwrap_or(0));
                        let held_by = f.opened_ms.and_then(|at| self.holder(&source, at));
                        if event
                            .is_some_and(|e| e.kind != EventKind::Upgrade && held_by == Some(e.old))
                        {
                            bump("streams_broken_stopped");
                        }
                    }
                    (_, "refused") => bump("conn_refused"),
                    (_, "reset") => bump("conn_reset"),
                    _ => bump("conn_failed_other"),
                }
            }
        }
        for d in self
            .logs
            .iter()
            .flat_map(|log| &log.decisions)
            .filter(|d| d.at_ms >= from && d.at_ms < to && !d.allowed)
        {
            let sni = d.sni.as_deref().unwrap_or("");
            match d.reason.as_str() {
                "no_dns_record" if self.cached_names.contains(sni) => bump("ndr_cached"),
                "no_dns_record" if sni == self.fresh_name => bump("ndr_fresh"),
                _ => bump("denied_other"),
            }
        }
        let in_phase = |sorted: &[u64]| {
            (sorted.partition_point(|&t| t < to) - sorted.partition_point(|&t| t < from)) as f64
        };
        let mut values: Vec<(String, f64)> =
            counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        values.push(("conn_ok".to_owned(), in_phase(&self.conn_ok)));
        values.push(("dns_ok".to_owned(), in_phase(&self.dns_ok)));
        // Around an event: from its start until a second after the new process listened. In the
        // baseline: the whole phase (the normal spacing of successes).
        let (window_from, window_to) = match event {
            Some(e) => (e.from_ms, e.ready_ms + 1000),
            None => (from, to),
        };
        values.push((
            "gap_conn_ms".to_owned(),
            longest_gap(&self.conn_ok, window_from, window_to, to),
        ));
        values.push((
            "gap_dns_ms".to_owned(),
            longest_gap(&self.dns_ok, window_from, window_to, to),
        ));
        if let Some(e) = event {
            if let Some(exited) = e.exited_ms {
                // From the old process's exit (the new one is started at once) to the first
                // success: how long until service is back.
                let first = |sorted: &[u64]| {
                    let at = sorted.partition_point(|&t| t < exited);
                    sorted.get(at).map(|&t| t.saturating_sub(exited) as f64)
                };
                if let Some(ms) = first(&self.conn_ok) {
                    values.push(("conn_back_ms".to_owned(), ms));
                }
                if let Some(ms) = first(&self.dns_ok) {
                    values.push(("dns_back_ms".to_owned(), ms));
                }
            }
            values.extend(self.event_values(e));
        }
        values
    }

    fn event_values(&self, e: &Event) -> Vec<(String, f64)> {
        let mut values = vec![(
            "ready_after_ms".to_owned(),
            e.ready_ms.saturating_sub(e.from_ms) as f64,
        )];
        if let Some(exited) = e.exited_ms {
            values.push((
                "exit_after_ms".to_owned(),
                exited.saturating_sub(e.from_ms) as f64,
            ));
            values.push((
                "down_ms".to_owned(),
                e.ready_ms.saturating_sub(exited) as f64,
            ));
        }
        let new = self.logs.get(e.new);
        let old = self.logs.get(e.old);
        let mut put = |key: &str, value: Option<f64>| {
            if let Some(v) = value {
                values.push((key.to_owned(), v));
            }
        };
        put(
            "start_ms",
            GatewayLog::number(new.and_then(|l| l.listening.as_ref()), "startMs"),
        );
        put(
            "restored_names",
            GatewayLog::number(new.and_then(|l| l.listening.as_ref()), "restoredNames"),
        );
        if e.kind == EventKind::Upgrade {
            let handover = new.and_then(|l| l.took_over.as_ref());
            put("handover_ms", GatewayLog::number(handover, "durationMs"));
            put(
                "records_during_handover",
                GatewayLog::number(handover, "recordsDuringHandover"),
            );
            put(
                "predecessor_open",
                GatewayLog::number(handover, "predecessorOpenConnections"),
            );
            put(
                "predecessor_handover_ms",
                GatewayLog::number(old.and_then(|l| l.handed_over.as_ref()), "durationMs"),
            );
            let shutdown = old.and_then(|l| l.shutdown.as_ref());
            put(
                "predecessor_cut",
                GatewayLog::number(shutdown, "cutAfterGrace"),
            );
            put(
                "predecessor_drained_ms",
                shutdown
                    .and_then(|s| s.get("time")?.as_str())
                    .and_then(time_ms)
                    .map(|t| t.saturating_sub(e.ready_ms) as f64),
            );
        } else {
            put(
                "restore_names",
                GatewayLog::number(new.and_then(|l| l.restore.as_ref()), "names"),
            );
        }
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gateway_time_format() {
        assert_eq!(time_ms("1970-01-01T00:00:01.250Z"), Some(1250));
        // 2026-12-06T09:27:28.123Z, checked with `date -d ... +%s`.
        assert_eq!(time_ms("2026-12-06T09:27:28.123Z"), Some(1_796_549_248_123));
        assert_eq!(time_ms("garbage"), None);
    }

    #[test]
    fn the_longest_gap_overlaps_the_window() {
        let ok = [100, 110, 120, 500, 510, 900];
        // 120 → 500 overlaps [200, 300].
        assert_eq!(longest_gap(&ok, 200, 300, 1000), 380.0);
        // Only the spacing inside [100, 130]... and the pair that crosses its end.
        assert_eq!(longest_gap(&ok, 100, 115, 1000), 10.0);
        // Nothing after 900: until the end.
        assert_eq!(longest_gap(&ok, 950, 960, 1000), 100.0);
    }
}
