//! The restart scenario (issue 13): continuous load from four pods through egressgate while the
//! gateway is upgraded in place several times (a second process takes over from the running
//! one), restarted with SIGTERM, and killed with SIGKILL and started again. Per event it counts
//! what an operator would see: failed DNS queries, refused or reset new connections,
//! `no_dns_record` denials for names the pods resolved before, broken established streams, the
//! time without service and the new process's time to serve. Reported, never asserted.
//!
//! Layout: [`lab`] (the scenario's own lab and gateway processes), [`load`] (the client run in
//! each pod), [`analysis`] (phases and counts).

pub mod analysis;
pub mod lab;
pub mod load;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use egressgate_lab::addr;

use self::analysis::{Event, EventKind, GatewayLog, PodLoad};
use self::lab::{Binary, RestartLab, EXIT_WAIT};
use self::load::{now_ms, LoadReport};
use crate::env::{self, Streaming};
use crate::results::Better;
use crate::server::TLS_PORT;
use crate::{progress, stopped, Error};

/// The pods that run the load.
const PODS: [&str; 4] = ["a", "b", "c", "d"];
/// Names each pod resolves once at start and then only connects to.
pub const CACHED_PER_POD: usize = 4;
/// Echo streams each pod keeps open.
const STREAMS_PER_POD: usize = 2;

/// How long each part lasts.
#[derive(Debug, Clone)]
pub struct RestartSize {
    /// Load before the first event.
    pub baseline: f64,
    /// Load after each event, before the next.
    pub settle: f64,
    /// Lifetime of one stream (below the gateway's 30 s shutdown grace, so a predecessor drains
    /// its streams rather than cutting them).
    pub stream_life: f64,
    pub upgrades: usize,
    /// Pause after each operation of a load worker.
    pub pace_ms: u64,
    /// Pod a also holds a half-sent DNS-over-TCP query open at all times (a slow or hostile
    /// client; off by default).
    pub slow_tcp_dns: bool,
}

impl RestartSize {
    pub fn full() -> RestartSize {
        RestartSize {
            baseline: 5.0,
            settle: 8.0,
            stream_life: 6.0,
            upgrades: 3,
            pace_ms: 20,
            slow_tcp_dns: false,
        }
    }

    pub fn smoke() -> RestartSize {
        RestartSize {
            baseline: 1.5,
            settle: 2.0,
            stream_life: 1.0,
            upgrades: 3,
            pace_ms: 20,
            slow_tcp_dns: false,
        }
    }

    /// An upper bound of the whole run, for the clients' own time limit.
    fn bound(&self) -> f64 {
        self.baseline
            + (self.upgrades as f64 + 2.0) * (self.settle + 10.0)
            + 2.0 * EXIT_WAIT.as_secs_f64()
    }
}

/// The metrics of the result: (key, label, unit, which way is better).
pub fn specs() -> Vec<(&'static str, &'static str, &'static str, Better)> {
    use Better::{Higher, Lower};
    vec![
        (
            "dns_failed",
            "failed DNS queries (no answer in 1 s, refused, error)",
            "queries",
            Lower,
        ),
        (
            "conn_refused",
            "new connections refused",
            "connections",
            Lower,
        ),
        (
            "conn_reset",
            "new connections reset (incl. denials)",
            "connections",
            Lower,
        ),
        (
            "conn_failed_other",
            "new connections failed otherwise (timeout, EOF)",
            "connections",
            Lower,
        ),
        (
            "ndr_cached",
            "no_dns_record denials, names resolved once at start",
            "denials",
            Lower,
        ),
        (
            "ndr_fresh",
            "no_dns_record denials, names resolved just before",
            "denials",
            Lower,
        ),
        ("denied_other", "other denials", "denials", Lower),
        (
            "streams_broken",
            "established streams broken",
            "streams",
            Lower,
        ),
        (
            "streams_broken_stopped",
            "of which held by the stopped or killed process",
            "streams",
            Lower,
        ),
        (
            "conn_ok",
            "new connections that succeeded",
            "connections",
            Higher,
        ),
        ("dns_ok", "DNS queries answered", "queries", Higher),
        (
            "gap_conn_ms",
            "longest time without a successful new connection",
            "ms",
            Lower,
        ),
        (
            "gap_dns_ms",
            "longest time without a DNS answer",
            "ms",
            Lower,
        ),
        (
            "conn_back_ms",
            "old process gone → first successful new connection",
            "ms",
            Lower,
        ),
        (
            "dns_back_ms",
            "old process gone → first DNS answer",
            "ms",
            Lower,
        ),
        (
            "ready_after_ms",
            "event start → new process listening (harness)",
            "ms",
            Lower,
        ),
        ("exit_after_ms", "signal → old process gone", "ms", Lower),
        (
            "down_ms",
            "old process gone → new process listening",
            "ms",
            Lower,
        ),
        (
            "start_ms",
            "new process: startMs of its listening line",
            "ms",
            Lower,
        ),
        (
            "handover_ms",
            "successor: hand-over durationMs",
            "ms",
            Lower,
        ),
        (
            "predecessor_handover_ms",
            "predecessor: hand-over durationMs",
            "ms",
            Lower,
        ),
        (
            "restored_names",
            "new process: names in its table when listening",
            "names",
            Higher,
        ),
        (
            "restore_names",
            "new process: names restored from the state directory",
            "names",
            Higher,
        ),
        (
            "records_during_handover",
            "records made during the hand-over, sent after Stop",
            "records",
            Higher,
        ),
        (
            "predecessor_open",
            "predecessor: connections open when it stopped",
            "connections",
            Higher,
        ),
        (
            "predecessor_drained_ms",
            "predecessor: hand-over → its shutdown line",
            "ms",
            Lower,
        ),
        (
            "predecessor_cut",
            "predecessor: connections cut after the grace period",
            "connections",
            Lower,
        ),
    ]
}

/// What one run produced: phases in order, their values, notes.
#[derive(Debug, Default)]
pub struct Outcome {
    pub phases: Vec<String>,
    pub values: Vec<(String, Vec<(String, f64)>)>,
    pub notes: Vec<String>,
}

fn cached_names(letter: &str) -> Vec<String> {
    (0..CACHED_PER_POD)
        .map(|i| format!("cached-{letter}{i}.example.test"))
        .collect()
}

fn load_args(rl: &RestartLab, letter: &str, size: &RestartSize) -> Vec<String> {
    let mut args: Vec<String> = [
        "restart-load",
        "--dns",
        &rl.dns_server(),
        "--port",
        &TLS_PORT.to_string(),
        "--ca",
        &rl.certs.ca.display().to_string(),
        "--fresh-name",
        addr::API,
        "--cached-names",
        &cached_names(letter).join(","),
        "--stream-life",
        &size.stream_life.to_string(),
        "--pace-ms",
        &size.pace_ms.to_string(),
        "--seconds",
        &size.bound().to_string(),
        "--max-ops",
        "1000000",
    ]
    .map(str::to_owned)
    .to_vec();
    let pod = PODS.iter().position(|p| *p == letter).unwrap_or(0);
    args.extend([
        "--streams".to_owned(),
        STREAMS_PER_POD.to_string(),
        "--stream-slot".to_owned(),
        (pod * STREAMS_PER_POD).to_string(),
        "--stream-slots".to_owned(),
        (PODS.len() * STREAMS_PER_POD).to_string(),
    ]);
    if size.slow_tcp_dns && letter == PODS[0] {
        args.push("--slow-tcp-dns".to_owned());
    }
    // Each pod's DNS worker asks for its own names, so the table holds distinct records.
    args.extend(["--dns-zone".to_owned(), format!("{letter}.bench.test")]);
    args
}

/// Sleeps `seconds` in small steps, polling the processes for their exits; false if stopped.
fn hold(rl: &mut RestartLab, seconds: f64) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        if stopped() {
            return false;
        }
        rl.poll_exits();
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Stops the current process with `signal`, waits for its exit, starts `binary`.
fn restart(rl: &mut RestartLab, signal: &str, binary: Binary) -> Result<(u64, u64, usize), Error> {
    let from = now_ms();
    let current = rl.current()?;
    current.gateway.daemon().signal(signal)?;
    if current.gateway.daemon_mut().wait_exit(EXIT_WAIT).is_none() {
        return Err(Error::msg(format!(
            "{} did not exit within {EXIT_WAIT:?} of SIG{signal}",
            current.name
        )));
    }
    let exited = now_ms();
    current.exited_ms = Some(exited);
    let new = rl.start_process(binary)?;
    Ok((from, exited, new))
}

pub fn run(size: &RestartSize) -> Result<Outcome, Error> {
    let mut rl = RestartLab::start()?;
    let clients: Vec<(String, String, Streaming)> = PODS
        .iter()
        .map(|letter| {
            let args = load_args(&rl, letter, size);
            let limit = Duration::from_secs_f64(size.bound() + 10.0);
            let client = env::spawn_in(rl.lab.pod(letter), &rl.exe, None, &args, limit)?;
            Ok(((*letter).to_owned(), rl.pod_ip(letter), client))
        })
        .collect::<Result<_, Error>>()?;
    let load_from = now_ms();
    progress(&format!(
        "restart: load running from pods {}; baseline {:.1} s",
        PODS.join(", "),
        size.baseline
    ));
    let events = drive(&mut rl, size);
    let load_to = now_ms();
    // Whatever happened, collect the clients' reports.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut loads = Vec::new();
    let mut notes = Vec::new();
    for (letter, ip, client) in clients {
        match client.finish(deadline) {
            Some(line) => match serde_json::from_str::<LoadReport>(&line) {
                Ok(report) => loads.push(PodLoad { letter, ip, report }),
                Err(e) => notes.push(format!("pod {letter}: unreadable report: {e}")),
            },
            None => notes.push(format!("pod {letter}: the load client printed no report")),
        }
    }
    let events = events?;
    // Predecessors drain their streams (at most one stream life) and exit by themselves.
    let drained = Instant::now() + Duration::from_secs_f64(size.stream_life + 10.0);
    while Instant::now() < drained {
        rl.poll_exits();
        let last = rl.processes.len().saturating_sub(1);
        if rl.processes[..last].iter().all(|p| p.exited_ms.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in &rl.processes[..rl.processes.len().saturating_sub(1)] {
        if p.exited_ms.is_none() {
            notes.push(format!(
                "{} was still running at the end of the run",
                p.name
            ));
        }
    }
    if loads.len() < PODS.len() {
        return Err(Error::msg(format!(
            "only {} of {} load clients reported: {}\nupstream: {}",
            loads.len(),
            PODS.len(),
            notes.join("; "),
            rl.server_tail()
        )));
    }
    let logs: Vec<GatewayLog> = rl
        .processes
        .iter()
        .map(|p| GatewayLog::read(&p.gateway))
        .collect();
    let cached: HashSet<String> = PODS.iter().flat_map(|l| cached_names(l)).collect();
    let analysed = analysis::Run::new(&loads, &logs, addr::API, &cached);
    let mut outcome = Outcome::default();
    let first = events.first().map_or(load_to, |e| e.from_ms);
    outcome.phases.push("baseline".to_owned());
    outcome.values.push((
        "baseline".to_owned(),
        analysed.phase(load_from + 500, first, None),
    ));
    for (i, event) in events.iter().enumerate() {
        let to = events.get(i + 1).map_or(load_to, |next| next.from_ms);
        outcome.phases.push(event.name.clone());
        outcome.values.push((
            event.name.clone(),
            analysed.phase(event.from_ms, to, Some(event)),
        ));
    }
    if size.slow_tcp_dns {
        notes.push(format!(
            "With --restart-slow-tcp-dns: pod {} also held a half-sent DNS-over-TCP query open at \
             all times (the length of a query, never the query), reopened whenever the gateway \
             closed it.",
            PODS[0]
        ));
    }
    outcome.notes = notes;
    outcome
        .notes
        .extend(describe(&rl, &events, &logs, &loads, &outcome));
    for (i, event) in events.iter().enumerate() {
        let to = events.get(i + 1).map_or(load_to, |next| next.from_ms);
        outcome.notes.push(format!(
            "{}, failures by operation and kind: {}.",
            event.name,
            analysed.breakdown(event.from_ms, to)
        ));
    }
    Ok(outcome)
}

/// The events, in order: the rolling upgrades, the SIGTERM restart, the kill -9.
fn drive(rl: &mut RestartLab, size: &RestartSize) -> Result<Vec<Event>, Error> {
    let mut events = Vec::new();
    if !hold(rl, size.baseline) {
        return Err(Error::msg("interrupted"));
    }
    for n in 1..=size.upgrades {
        let old = rl.processes.len() - 1;
        let binary = rl.processes[old].binary.other();
        let name = format!("upgrade {n}");
        progress(&format!(
            "restart: {name}: {} ({}) → a new process ({})",
            rl.processes[old].name,
            rl.processes[old].binary.name(),
            binary.name()
        ));
        let from = now_ms();
        let new = rl.start_process(binary)?;
        events.push(Event {
            name,
            kind: EventKind::Upgrade,
            from_ms: from,
            exited_ms: None,
            ready_ms: rl.processes[new].ready_ms,
            old,
            new,
        });
        if !hold(rl, size.settle) {
            return Err(Error::msg("interrupted"));
        }
    }
    for (kind, signal, name) in [
        (EventKind::Sigterm, "TERM", "SIGTERM restart"),
        (EventKind::Kill, "KILL", "kill -9 restart"),
    ] {
        let old = rl.processes.len() - 1;
        let binary = rl.processes[old].binary.other();
        progress(&format!("restart: {name} of {}", rl.processes[old].name));
        let (from, exited, new) = restart(rl, signal, binary)?;
        events.push(Event {
            name: name.to_owned(),
            kind,
            from_ms: from,
            exited_ms: Some(exited),
            ready_ms: rl.processes[new].ready_ms,
            old,
            new,
        });
        if !hold(rl, size.settle) {
            return Err(Error::msg("interrupted"));
        }
    }
    Ok(events)
}

/// Notes for the report: what ran, each event in one line, the goals of the issue.
fn describe(
    rl: &RestartLab,
    events: &[Event],
    logs: &[GatewayLog],
    loads: &[PodLoad],
    outcome: &Outcome,
) -> Vec<String> {
    let mut notes = Vec::new();
    let sum = |key: &str| -> u64 {
        loads
            .iter()
            .map(|l| match key {
                "fresh" => l.report.fresh_ok,
                "cached" => l.report.cached_ok,
                "dns" => l.report.dns_ok,
                "streams" => l.report.streams_opened,
                "completed" => l.report.streams_completed,
                "blocks" => l.report.stream_blocks,
                _ => l.report.failures_dropped,
            })
            .sum()
    };
    notes.push(format!(
        "Load over the whole run, 4 pods: {} fresh connections (each after its own lookup), {} \
         connections to cached names, {} DNS answers, {} streams opened ({} ran their whole life \
         and closed cleanly), {} echoed blocks verified.",
        sum("fresh"),
        sum("cached"),
        sum("dns"),
        sum("streams"),
        sum("completed"),
        sum("blocks")
    ));
    notes.push(format!(
        "Per pod (successful new connections / failures of any kind): {}.",
        loads
            .iter()
            .map(|l| format!(
                "{} {} / {}",
                l.letter,
                l.report.conn_ok_ms.len(),
                l.report.failures.len() as u64 + l.report.failures_dropped
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let value = |phase: &str, key: &str| -> Option<f64> {
        outcome
            .values
            .iter()
            .find(|(p, _)| p == phase)?
            .1
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    };
    for e in events {
        let old = &rl.processes[e.old];
        let new = &rl.processes[e.new];
        let listening = logs.get(e.new).and_then(|l| l.listening.as_ref());
        let start_ms = listening
            .and_then(|l| l.get("startMs")?.as_f64())
            .unwrap_or(f64::NAN);
        let line =
            match e.kind {
                EventKind::Upgrade => {
                    let handover = logs.get(e.new).and_then(|l| l.took_over.as_ref());
                    let role_ok = handover
                        .and_then(|h| h.get("role")?.as_str())
                        .is_some_and(|r| r == "successor");
                    let shutdown = logs.get(e.old).and_then(|l| l.shutdown.as_ref());
                    format!(
                    "{}: {} ({}) handed over to {} ({}){}: ready {} ms after its exec (startMs \
                     {start_ms:.0}, hand-over {} ms); the predecessor {}.",
                    e.name,
                    old.name,
                    old.binary.name(),
                    new.name,
                    new.binary.name(),
                    if role_ok { "" } else { " — NO successor hand-over line" },
                    e.ready_ms.saturating_sub(e.from_ms),
                    handover
                        .and_then(|h| h.get("durationMs")?.as_f64())
                        .map_or_else(|| "?".to_owned(), |v| format!("{v:.0}")),
                    match shutdown {
                        Some(s) => format!(
                            "printed its shutdown line (handedOver {}, {} open at stop, {} cut \
                             after the grace period){}",
                            s.get("handedOver").unwrap_or(&serde_json::Value::Null),
                            s.get("openAtStop").unwrap_or(&serde_json::Value::Null),
                            s.get("cutAfterGrace").unwrap_or(&serde_json::Value::Null),
                            if old.exited_ms.is_some() {
                                " and exited"
                            } else {
                                " but had not exited"
                            }
                        ),
                        None => "printed no shutdown line".to_owned(),
                    }
                )
                }
                EventKind::Sigterm | EventKind::Kill => format!(
                    "{}: {} ({}) gone {} ms after the signal; {} ({}) listening {} ms later \
                 (startMs {start_ms:.0}, {} names restored); no new connection succeeded for \
                 {} ms, no DNS answer for {} ms.",
                    e.name,
                    old.name,
                    old.binary.name(),
                    e.exited_ms.map_or(0, |x| x.saturating_sub(e.from_ms)),
                    new.name,
                    new.binary.name(),
                    e.exited_ms.map_or(0, |x| e.ready_ms.saturating_sub(x)),
                    value(&e.name, "restore_names").unwrap_or(f64::NAN),
                    value(&e.name, "gap_conn_ms").unwrap_or(f64::NAN),
                    value(&e.name, "gap_dns_ms").unwrap_or(f64::NAN),
                ),
            };
        notes.push(line);
    }
    // The goals.
    let total = |phases: &[&str], keys: &[&str]| -> f64 {
        phases
            .iter()
            .flat_map(|p| keys.iter().map(move |k| value(p, k).unwrap_or(0.0)))
            .sum()
    };
    let upgrades: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == EventKind::Upgrade)
        .map(|e| e.name.as_str())
        .collect();
    let keys = [
        "dns_failed",
        "conn_refused",
        "conn_reset",
        "conn_failed_other",
        "ndr_cached",
        "ndr_fresh",
        "streams_broken",
    ];
    let verdict = |n: f64| if n == 0.0 { "met" } else { "MISSED" };
    let planned = total(&upgrades, &keys);
    notes.push(format!(
        "Goal (issue 13), rolling upgrades: zero failed queries, refused or reset connections, \
         no_dns_record denials and broken streams: {} in all — {}.",
        planned,
        verdict(planned)
    ));
    let sigterm = total(&["SIGTERM restart"], &["ndr_cached", "ndr_fresh"]);
    notes.push(format!(
        "Goal, SIGTERM restart: names kept (no_dns_record for names resolved before: {sigterm} — \
         {}); a gap exists between the old process's exit and the new one's start (counted as \
         failures above; the old one drains its open connections first).",
        verdict(sigterm)
    ));
    let killed = total(&["kill -9 restart"], &["ndr_cached", "ndr_fresh"]);
    notes.push(format!(
        "Goal, kill -9: zero no_dns_record for names resolved before the crash: {killed} — {}; \
         the gap is stated above; established streams of the killed process are lost \
         (expected): {}.",
        verdict(killed),
        value("kill -9 restart", "streams_broken_stopped").unwrap_or(0.0)
    ));
    notes.push(
        "Reading the gaps: the harness polls for the listening line every 50 ms, so its times \
         are up to 50 ms late. The SIGTERM gap includes the old process's drain: it stops \
         listening at once and waits for its open connections (here streams of at most one \
         life; in general up to connections.shutdownGraceSeconds, 30 s by default) before it \
         exits and the new one can start. A DNS query in flight when a process stops is lost and \
         its client waits for its timeout (1 s here, 5 s for glibc's resolver): that is most of \
         the DNS gap after kill -9. While nothing listens the node rejects DNS with ICMP port \
         unreachable, which the kernel rate-limits per pod (net.ipv4.icmp_ratelimit), so most \
         queries then time out instead of failing fast."
            .to_owned(),
    );
    notes.push(
        "Both binaries are the same build: the copy stands for another version, so the \
         hand-over is exercised between two executables, not between two versions of the code."
            .to_owned(),
    );
    let dropped = sum("dropped");
    if dropped > 0 {
        notes.push(format!(
            "{dropped} failures beyond the clients' record limit were counted but not timed."
        ));
    }
    notes
}
