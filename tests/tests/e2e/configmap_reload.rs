//! Policies mounted the way kubelet mounts a ConfigMap (files linked through an atomically
//! swapped `..data` symlink) reload without restarts, under traffic: open connections keep their
//! verdict, new ones get the new policy, a broken update keeps the last good one.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use egressgate_lab::{GatewayOptions, Lab};
use serde_json::Value;

use crate::support::{assert_allowed, assert_denied, curl, dig, run_and_decide, SHOP_POLICY};

const EVIL_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: evil-too, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: evil.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

/// Publishes `files` as kubelet does: a new timestamped directory, `..data_tmp` pointing at it
/// renamed over `..data`, and a top-level link per file. Links of files no longer present go.
fn publish(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let target = dir.join(format!("..{version}"));
    std::fs::create_dir(&target).expect("mkdir version");
    for (name, text) in files {
        std::fs::write(target.join(name), text).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    symlink(format!("..{version}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("..") {
            continue;
        }
        if !files.iter().any(|(file, _)| *file == name) {
            std::fs::remove_file(&path).expect("remove stale link");
        }
    }
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        symlink(format!("..data/{name}"), &link).expect("link file");
    }
}

/// Waits for a `policy_reload` line after the first `seen` ones.
fn next_reload(lab: &Lab, seen: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = lab.gateway().events("policy_reload").nth(seen) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no policy_reload #{}:\n{}",
            seen + 1,
            lab.gateway().daemon().output_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(lab: &Lab, name: &str) -> Option<f64> {
    let out = lab.node().run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15090/metrics",
    ]);
    out.stdout
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Python in pod a: one TLS connection to evil.example.test, a request, then (after `marker`
/// exists) a second request on the same connection.
fn long_lived_client(ca: &str, marker: &Path) -> String {
    format!(
        "import os, socket, ssl, time\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         s = ctx.wrap_socket(socket.create_connection(('evil.example.test', 443), timeout=10), server_hostname='evil.example.test')\n\
         req = b'GET / HTTP/1.1\\r\\nHost: evil.example.test\\r\\n\\r\\n'\n\
         def get():\n    s.sendall(req)\n    return s.recv(65536).decode(errors='replace')\n\
         print('first', 'hello from evil' in get())\n\
         deadline = time.time() + 20\n\
         while not os.path.exists('{marker}') and time.time() < deadline:\n    time.sleep(0.05)\n\
         print('second', 'hello from evil' in get())\n",
        marker = marker.display()
    )
}

#[test]
fn configmap_updates_reload_under_traffic_and_a_broken_one_keeps_the_last_good() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default())
        .start()
        .expect("lab starts");
    let ca = lab.ca();
    let dir = lab.policy_dir();
    let evil = curl(&ca, &["https://evil.example.test/"]);
    let api = curl(&ca, &["https://api.example.test/"]);

    // v1: the shop policy only.
    publish(&dir, "v1", &[("shop.yaml", SHOP_POLICY)]);
    assert_eq!(next_reload(&lab, 0)["result"], "ok");
    let (out, d) = run_and_decide(&lab, "a", 443, &evil);
    assert_denied(&out, &d, &["not_allowed", "sni_mismatch"]);

    // v2 adds evil while pod a keeps connecting to api: every api connection stays allowed.
    let reloads = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            (0..8)
                .map(|_| lab.pod("a").run(&api))
                .filter(|out| !out.stdout.contains("hello from api.example.test"))
                .count()
        });
        std::thread::sleep(Duration::from_millis(200));
        publish(
            &dir,
            "v2",
            &[("shop.yaml", SHOP_POLICY), ("evil.yaml", EVIL_POLICY)],
        );
        let reload = next_reload(&lab, 1);
        let failures = traffic.join().expect("traffic thread");
        assert_eq!(failures, 0, "api connections failed during the reload");
        reload
    });
    assert_eq!(reloads["result"], "ok", "{reloads}");
    assert_eq!(reloads["policies"], 3, "{reloads}");
    let (out, d) = run_and_decide(&lab, "a", 443, &evil);
    assert_allowed(&out, &d, "hello from evil.example.test");

    // v3 is broken: the last good set (with evil) keeps running, and it shows.
    let broken = EVIL_POLICY.replace("podSelector", "podSelektor");
    publish(
        &dir,
        "v3",
        &[("shop.yaml", SHOP_POLICY), ("evil.yaml", &broken)],
    );
    let reload = next_reload(&lab, 2);
    assert_eq!(reload["result"], "error", "{reload}");
    assert!(
        reload["errors"].to_string().contains("evil.yaml:5:3"),
        "{reload}"
    );
    assert_eq!(metric(&lab, "egressgate_policy_stale"), Some(1.0));
    let (out, d) = run_and_decide(&lab, "a", 443, &evil);
    assert_allowed(&out, &d, "hello from evil.example.test");

    // v4 fixes it by dropping evil: an open evil connection keeps its verdict, new ones are denied.
    assert!(dig(&lab, "a", "evil.example.test", &[])
        .iter()
        .any(|a| !a.is_empty()));
    let marker = lab.dir().join("reloaded");
    let script = long_lived_client(&ca, &marker);
    let cursor = lab.gateway().cursor();
    let kept = std::thread::scope(|scope| {
        let client = scope.spawn(|| lab.pod("a").run(&["python3", "-c", &script]));
        // The long-lived connection is allowed before the policy changes.
        let opened = lab.gateway().wait_for_decision_since(
            cursor,
            |d| d.sni() == Some("evil.example.test"),
            Duration::from_secs(10),
        );
        assert_eq!(opened.expect("decision").verdict(), Some("allow"));
        publish(&dir, "v4", &[("shop.yaml", SHOP_POLICY)]);
        let reload = next_reload(&lab, 3);
        assert_eq!(reload["result"], "ok", "{reload}");
        std::fs::write(&marker, "").expect("marker");
        client.join().expect("client thread")
    });
    assert!(kept.stdout.contains("first True"), "{kept}");
    assert!(
        kept.stdout.contains("second True"),
        "open connection lost its verdict:\n{kept}"
    );
    assert_eq!(metric(&lab, "egressgate_policy_stale"), Some(0.0));
    let (out, d) = run_and_decide(&lab, "a", 443, &evil);
    assert_denied(&out, &d, &["not_allowed", "sni_mismatch"]);
}
