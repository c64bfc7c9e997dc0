//! Restarts and upgrades that lose nothing: names resolved before a SIGTERM restart or a
//! `kill -9` still grant after it, and a second gateway started on the same state directory
//! takes over sockets and table while traffic flows, without a failed query, a refused
//! connection or a broken stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use egressgate_lab::{addr, Gateway, GatewayOptions, Lab};

use crate::bypass_support::metric;
use crate::support::{
    assert_allowed, assert_denied, curl, dig, run_and_decide, shop_lab, SHOP_POLICY,
};

/// How long a gateway may take to exit after SIGTERM with no open connection.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// `curl` to api.example.test at the web server's address, without asking the DNS: only a
/// restored record can make it allowed.
fn curl_without_dns(
    lab: &Lab,
    letter: &str,
    name: &str,
) -> (egressgate_lab::Output, egressgate_lab::Decision) {
    let ca = lab.ca();
    let resolve = format!("{name}:443:{}", addr::WEB);
    let url = format!("https://{name}/");
    run_and_decide(lab, letter, 443, &curl(&ca, &["--resolve", &resolve, &url]))
}

/// Pod `letter` resolves api.example.test, then the gateway stops (SIGTERM) and exits.
fn resolve_then_stop(lab: &mut Lab, letter: &str) {
    assert_eq!(
        dig(lab, letter, addr::API, &[]).last().map(String::as_str),
        Some(addr::WEB)
    );
    let mut old = lab.take_gateway().expect("gateway");
    old.daemon().signal("TERM").expect("signal");
    assert!(
        old.daemon_mut().wait_exit(EXIT_WAIT).is_some(),
        "gateway did not exit on SIGTERM"
    );
}

fn restored_names(gateway: &Gateway) -> u64 {
    gateway
        .events("restore")
        .next()
        .and_then(|line| line.get("names").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

#[test]
fn names_resolved_before_a_sigterm_restart_or_a_kill_9_still_grant() {
    let mut lab = shop_lab();
    // SIGTERM, then a new process.
    resolve_then_stop(&mut lab, "a");
    let restarted = lab.start_gateway_process("egressgate-2").expect("restart");
    assert!(
        restored_names(&restarted) >= 1,
        "{}",
        restarted.daemon().output_tail(20)
    );
    lab.replace_gateway(restarted);
    let (out, d) = curl_without_dns(&lab, "a", addr::API);
    assert_allowed(&out, &d, "hello from api.example.test");
    assert!(d.names().contains(&addr::API), "{d}");
    // Restoring grants only what was resolved: evil shares the IP but was never asked for.
    let (out, d) = curl_without_dns(&lab, "a", addr::EVIL);
    assert_denied(&out, &d, &["sni_mismatch", "not_allowed"]);

    // kill -9: nothing is flushed at exit, the journal alone carries the records.
    let mut killed = lab.take_gateway().expect("gateway");
    killed.daemon().signal("KILL").expect("signal");
    assert!(
        killed.daemon_mut().wait_exit(EXIT_WAIT).is_some(),
        "gateway survived SIGKILL"
    );
    let after_crash = lab
        .start_gateway_process("egressgate-3")
        .expect("start after crash");
    assert!(
        restored_names(&after_crash) >= 1,
        "{}",
        after_crash.daemon().output_tail(20)
    );
    lab.replace_gateway(after_crash);
    let (out, d) = curl_without_dns(&lab, "a", addr::API);
    assert_allowed(&out, &d, "hello from api.example.test");
    // Pod b never resolved api: a restored table keeps records per pod.
    let (out, d) = curl_without_dns(&lab, "b", addr::API);
    assert_denied(&out, &d, &["no_dns_record"]);
}

#[test]
fn a_corrupt_or_foreign_state_file_is_skipped_not_fatal() {
    let mut lab = shop_lab();
    resolve_then_stop(&mut lab, "a");
    // A journal of a future format, and garbage named like a journal.
    let state = lab.state_dir();
    let mut future = b"EGNAMES\n".to_vec();
    future.extend_from_slice(&99u16.to_le_bytes());
    std::fs::write(state.join("names.journal.900"), future).expect("write");
    std::fs::write(state.join("names.journal.901"), b"not a journal at all").expect("write");
    let restarted = lab
        .start_gateway_process("egressgate-2")
        .expect("restart despite bad files");
    let line = restarted.events("restore").next().expect("restore line");
    let skipped = line["skippedFiles"].as_array().expect("skippedFiles").len();
    assert_eq!(skipped, 2, "{line}");
    assert!(restored_names(&restarted) >= 1, "{line}");
    lab.replace_gateway(restarted);
    let (out, d) = curl_without_dns(&lab, "a", addr::API);
    assert_allowed(&out, &d, "hello from api.example.test");
}

/// HTTP/1.1 keep-alive requests on one TLS connection every 50 ms for `seconds`; prints
/// `ok N` and exits 0 only if every request got its answer on that one connection.
const STREAM_CLIENT: &str = r#"
import socket, ssl, sys, time
ca, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection((name, 443), timeout=5)
tls = ctx.wrap_socket(raw, server_hostname=name)
ok, end = 0, time.time() + seconds
while time.time() < end:
    tls.sendall(("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name).encode())
    data = b""
    while b"hello from" not in data:
        chunk = tls.recv(4096)
        if not chunk:
            print("closed after", ok); sys.exit(1)
        data += chunk
    ok += 1
    time.sleep(0.05)
print("ok", ok)
"#;

/// What the traffic saw while `event` ran: a long-lived stream from pod a, and back-to-back
/// DNS queries and new TLS connections from pods a and b.
struct Load<T> {
    stream: egressgate_lab::Output,
    failures: Vec<String>,
    rounds: usize,
    event: T,
}

impl<T> Load<T> {
    fn assert_nothing_lost(&self) {
        assert!(
            self.failures.is_empty(),
            "{} failures in {} rounds:\n{}",
            self.failures.len(),
            self.rounds,
            self.failures.join("\n")
        );
        assert!(self.rounds >= 4, "the load ran only {} rounds", self.rounds);
        assert!(
            self.stream.success() && self.stream.stdout.starts_with("ok"),
            "the long-lived stream broke:\n{}",
            self.stream
        );
    }
}

/// Runs `event` 2 s into the load; the load goes on 3 s after it returns.
fn under_load<T: Send>(lab: &Lab, event: impl FnOnce() -> T + Send) -> Load<T> {
    let ca = lab.ca();
    let running = AtomicBool::new(true);
    std::thread::scope(|scope| {
        let stream = scope.spawn(|| {
            lab.pod("a")
                .run(&["python3", "-c", STREAM_CLIENT, &ca, addr::API, "10"])
        });
        let load = |letter: &'static str| {
            let (ca, running) = (&ca, &running);
            scope.spawn(move || {
                let mut failures = Vec::new();
                let mut rounds = 0;
                let deadline = Instant::now() + Duration::from_secs(40);
                while running.load(Ordering::Acquire) && Instant::now() < deadline {
                    let dig =
                        lab.pod(letter)
                            .run(&["dig", "+short", "+time=2", "+tries=1", addr::API]);
                    if !dig.success() || !dig.stdout.contains(addr::WEB) {
                        failures.push(format!("dig from {letter}: {dig}"));
                    }
                    let out = lab
                        .pod(letter)
                        .run(&curl(ca, &["https://api.example.test/"]));
                    if !out.success() || !out.stdout.contains("hello from api.example.test") {
                        failures.push(format!("curl from {letter}: {out}"));
                    }
                    rounds += 1;
                }
                (failures, rounds)
            })
        };
        let loads = [load("a"), load("b")];
        std::thread::sleep(Duration::from_secs(2));
        let event = event();
        std::thread::sleep(Duration::from_secs(3));
        running.store(false, Ordering::Release);
        let (mut failures, mut rounds) = (Vec::new(), 0);
        for load in loads {
            let (f, r) = load.join().expect("load thread");
            failures.extend(f);
            rounds += r;
        }
        let stream = stream.join().expect("stream thread");
        Load {
            stream,
            failures,
            rounds,
            event,
        }
    })
}

/// The old gateway handed over, drained its stream, exited by itself, and neither process
/// denied anything.
fn assert_clean_hand_over(lab: &Lab, mut old: Gateway) {
    let handover = lab
        .gateway()
        .wait_for_events("handover", |_| true, 1, Duration::from_secs(5))
        .expect("successor's handover line");
    assert_eq!(handover[0]["role"], "successor", "{}", handover[0]);
    assert!(
        old.daemon_mut()
            .wait_exit(Duration::from_secs(20))
            .is_some(),
        "old gateway kept running"
    );
    let shutdown = old
        .events("shutdown")
        .next()
        .expect("old gateway's shutdown line");
    assert_eq!(shutdown["handedOver"], true, "{shutdown}");
    assert_eq!(shutdown["cutAfterGrace"], 0, "{shutdown}");
    assert_eq!(
        old.events("handover").count(),
        1,
        "{}",
        old.daemon().output_tail(20)
    );
    for gateway in [&old, lab.gateway()] {
        let denied: Vec<String> = gateway
            .decisions()
            .iter()
            .filter(|d| d.verdict() != Some("allow"))
            .map(ToString::to_string)
            .collect();
        assert!(
            denied.is_empty(),
            "denied during the hand-over:\n{}",
            denied.join("\n")
        );
    }
    assert!(lab.gateway().cursor() > 0, "the successor decided nothing");
    // The successor holds what pod a resolved before it started.
    let (out, d) = curl_without_dns(lab, "a", addr::API);
    assert_allowed(&out, &d, "hello from api.example.test");
}

/// A second gateway started beside the lab's takes over while pods resolve and connect:
/// nothing lost, and a clean hand-over in both processes' lines.
fn take_over_under_load(lab: &mut Lab) {
    let load = under_load(lab, || {
        lab.start_gateway_process("egressgate-2")
            .expect("successor starts")
    });
    load.assert_nothing_lost();
    let old = lab.replace_gateway(load.event).expect("old gateway");
    assert_clean_hand_over(lab, old);
}

#[test]
fn a_second_gateway_takes_over_under_load_without_losing_anything() {
    let mut lab = shop_lab();
    take_over_under_load(&mut lab);
}

/// Sockets listening on `port` in the node namespace (`proto`: "t" TCP, "u" UDP).
fn listening(lab: &Lab, proto: &str, port: u16) -> usize {
    let out = lab
        .node()
        .run(&["ss", &format!("-Hl{proto}n"), &format!("sport = :{port}")]);
    assert!(out.success(), "{out}");
    out.stdout.lines().count()
}

#[test]
fn a_successor_with_fewer_workers_serves_every_socket_its_predecessor_listened_with() {
    let mut lab = Lab::builder()
        .pods(2)
        .dns()
        .web()
        .gateway(GatewayOptions {
            workers: Some(3),
            ..GatewayOptions::default().policy("shop.yaml", SHOP_POLICY)
        })
        .start()
        .expect("lab starts");
    // One socket per worker on each address (IPv4 and IPv6).
    let sockets = [("t", 15001), ("u", 15053), ("t", 15053)];
    for (proto, port) in sockets {
        assert_eq!(listening(&lab, proto, port), 6, "{proto} {port}");
    }
    let config = lab.gateway_config_path();
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains("  workers: 3\n"), "{text}");
    std::fs::write(&config, text.replace("  workers: 3\n", "  workers: 1\n")).expect("config");
    take_over_under_load(&mut lab);
    // The predecessor is gone: the successor, with one worker, serves all of its sockets, so
    // none closed with connections or queries in its queue.
    for (proto, port) in sockets {
        assert_eq!(listening(&lab, proto, port), 6, "{proto} {port}");
    }
    let out = lab
        .pod("a")
        .run(&curl(&lab.ca(), &["https://api.example.test/"]));
    assert!(out.stdout.contains("hello from api.example.test"), "{out}");
}

#[test]
fn after_sigterm_the_gateway_serves_until_its_replacement_takes_over() {
    let mut lab = Lab::builder()
        .pods(2)
        .dns()
        .web()
        .gateway(GatewayOptions {
            state_extra: "  successorWaitSeconds: 20\n".to_owned(),
            ..GatewayOptions::default().policy("shop.yaml", SHOP_POLICY)
        })
        .start()
        .expect("lab starts");
    // A deleted DaemonSet pod: SIGTERM first, its replacement a moment later.
    let load = under_load(&lab, || {
        lab.gateway().daemon().signal("TERM").expect("signal");
        std::thread::sleep(Duration::from_secs(1));
        lab.start_gateway_process("egressgate-2")
            .expect("replacement starts")
    });
    load.assert_nothing_lost();
    let old = lab.replace_gateway(load.event).expect("old gateway");
    assert_clean_hand_over(&lab, old);
}

#[test]
fn restored_names_of_a_pod_that_is_gone_are_not_inherited_by_its_address() {
    let mut lab = shop_lab();
    resolve_then_stop(&mut lab, "b");
    // Pod b is gone while the gateway is down.
    let with_b = lab.identity_yaml();
    let mut in_b = false;
    let without_b: String = with_b
        .split_inclusive('\n')
        .filter(|line| {
            if line.starts_with("  - name: ") {
                in_b = line.contains("batch-1");
            }
            !in_b
        })
        .collect();
    assert!(
        !without_b.contains("batch-1") && without_b.contains("app-1"),
        "{without_b}"
    );
    std::fs::write(lab.identity_file(), &without_b).expect("identity");
    let restarted = lab.start_gateway_process("egressgate-2").expect("restart");
    assert!(restored_names(&restarted) >= 1);
    lab.replace_gateway(restarted);
    let gone = r#"egressgate_state_skipped_records_total{reason="pod_gone"}"#;
    egressgate_lab::daemon::wait_until("b's records dropped", Duration::from_secs(10), || {
        Ok(metric(&lab, gone) >= 1.0)
    })
    .expect("pod_gone counted");
    // A new pod gets b's address: it resolved nothing, so it is granted nothing.
    std::fs::write(lab.identity_file(), &with_b).expect("identity");
    let (out, d) = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (out, d) = curl_without_dns(&lab, "b", addr::API);
            if d.reason() != Some("unknown_source") || Instant::now() > deadline {
                break (out, d);
            }
        }
    };
    assert_denied(&out, &d, &["no_dns_record"]);
}

#[test]
fn only_roots_processes_may_take_over() {
    let lab = shop_lab();
    let socket = lab.state_dir().join("handover.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&socket)
            .expect("handover.sock")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "handover.sock is root's alone");
    // Even through a socket opened to everyone, another user is turned away before a byte.
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (lab.dir(), 0o711),
        (&lab.state_dir(), 0o711),
        (&socket, 0o666),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let hello = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.sendall(bytes([1, 2, 0, 0, 0, 1, 0]))
    print("answer", len(s.recv(64)))
except OSError as e:
    print("closed", e.errno)
"#;
    let out = lab.node().run(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        hello,
        socket.to_str().expect("path"),
    ]);
    assert!(
        out.stdout.contains("answer 0") || out.stdout.contains("closed"),
        "nobody got an answer:\n{out}"
    );
    assert!(
        lab.gateway()
            .daemon()
            .stderr_text()
            .contains("refused a connection"),
        "{}",
        lab.gateway().daemon().output_tail(10)
    );
    // Still serving.
    let (out, d) = run_and_decide(
        &lab,
        "a",
        443,
        &curl(&lab.ca(), &["https://api.example.test/"]),
    );
    assert_allowed(&out, &d, "hello from api.example.test");
}
