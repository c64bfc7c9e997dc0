//! The command line without a lab: `check` reports every error with its position, `--help`
//! works everywhere.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use egressgate_lab::cgroup::MemoryCgroup;
use egressgate_lab::gateway::egressgate_bin;

use crate::support::SHOP_POLICY;

fn egressgate(args: &[&str]) -> Output {
    let bin = egressgate_bin().expect("built gateway");
    Command::new(bin).args(args).output().expect("runs")
}

fn write_config(dir: &Path) -> String {
    let config = dir.join("gateway.yaml");
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    std::fs::write(
        dir.join("pods.yaml"),
        "pods:\n  - {name: app-1, namespace: shop, ips: [198.18.1.2]}\n",
    )
    .expect("write");
    std::fs::write(
        &config,
        format!(
            "policyDir: {dir}/policies\nidentity: {{staticFile: {dir}/pods.yaml}}\n\
             intercept: {{interfaces: [\"egp*\"]}}\ndns: {{upstreams: [\"198.19.0.53:53\"]}}\n",
            dir = dir.display()
        ),
    )
    .expect("write");
    config.display().to_string()
}

#[test]
fn check_accepts_valid_files_and_reports_every_error_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    std::fs::write(dir.path().join("policies/shop.yaml"), SHOP_POLICY).expect("write");
    let out = egressgate(&["check", "--config", &config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("ok (2 policies, 1 pods)"), "{stdout}");

    let typo = SHOP_POLICY.replace("podSelector", "podSelektor");
    std::fs::write(dir.path().join("policies/shop.yaml"), typo).expect("write");
    let wildcard = SHOP_POLICY.replace("dnsName: api.example.test", "dnsName: \"api.*.test\"");
    std::fs::write(dir.path().join("policies/more.yaml"), wildcard).expect("write");
    let out = egressgate(&["check", "--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    let policies = dir.path().join("policies");
    for position in [
        format!("{}:5:3: ", policies.join("shop.yaml").display()),
        format!("{}:7:", policies.join("more.yaml").display()),
    ] {
        assert!(stderr.contains(&position), "no {position:?} in:\n{stderr}");
    }
    assert!(stderr.contains("podSelektor"), "{stderr}");

    std::fs::write(
        &config,
        "policyDir: /x\nidentity: {staticFile: /y}\nlisten: {admin: nope}\n",
    )
    .expect("write");
    let out = egressgate(&["check", "--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("gateway.yaml:3:"), "{stderr}");
}

#[test]
fn help_is_available_for_every_command() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["nft-rules", "--help"],
        &["suggest", "--help"],
        &["observe", "--help"],
    ] {
        let out = egressgate(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(stdout.contains("Usage: egressgate"), "{args:?}: {stdout}");
    }
}

/// Runs the gateway with `args` inside `cgroup`.
fn egressgate_in(cgroup: &MemoryCgroup, args: &[&str]) -> Output {
    let bin = egressgate_bin().expect("built gateway");
    let enter = cgroup.enter();
    Command::new(&enter[0])
        .args(&enter[1..])
        .arg(bin)
        .args(args)
        .output()
        .expect("runs")
}

#[test]
fn check_warns_when_the_caps_do_not_fit_in_the_memory_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let cgroup = MemoryCgroup::with_limit(256 << 20).expect("a memory cgroup");

    // The defaults: a million names and 65536 connections need over a GiB when full.
    let out = egressgate_in(&cgroup, &["check", "--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not an error: {out:?}");
    assert!(
        stderr.contains("warning: with dns.maxNames and connections.max both reached")
            && stderr.contains("more than its memory limit of 256 MiB"),
        "{stderr}"
    );

    let text = std::fs::read_to_string(&config).expect("read");
    let small = text.replace(
        "dns: {upstreams: [\"198.19.0.53:53\"]}",
        "dns: {upstreams: [\"198.19.0.53:53\"], maxNames: 100000}\nconnections: {max: 4096}",
    );
    assert_ne!(small, text);
    std::fs::write(&config, small).expect("write");
    let out = egressgate_in(&cgroup, &["check", "--config", &config]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

#[test]
fn run_warns_at_start_when_the_caps_do_not_fit_in_the_memory_limit_and_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let mut text = std::fs::read_to_string(&config).expect("read");
    // Loopback only, in a network namespace of the test's own, and no nftables rules.
    text.push_str(
        "listen: {tproxy: [\"127.0.0.1:15001\"], dns: [\"127.0.0.1:15053\"], \
         admin: \"127.0.0.1:15090\"}\nnftables: {manage: false}\n",
    );
    std::fs::write(&config, text).expect("write");
    let cgroup = MemoryCgroup::with_limit(256 << 20).expect("a memory cgroup");
    let bin = egressgate_bin().expect("built gateway");
    // `unshare --net`, not `ip netns exec`: that one remounts /sys, where the limit is read.
    let mut gateway = Command::new("unshare")
        .arg("--net")
        .args(cgroup.enter())
        .args(["sh", "-c", "ip link set lo up && exec \"$@\"", "sh"])
        .arg(bin)
        .args(["run", "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let stdout = gateway.stdout.take().expect("stdout");
    let (lines, listening) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("\"event\":\"listening\"") && lines.send(line).is_err() {
                return;
            }
        }
    });
    let started = listening.recv_timeout(Duration::from_secs(10));
    // `unshare`, `sh` and `sh` exec into the gateway: the child is the gateway itself.
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", gateway.id()));
    let _ = gateway.kill();
    let out = gateway.wait_with_output().expect("exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(started.is_ok(), "no listening line:\n{stderr}");
    let cgroups = cgroups.expect("the gateway's cgroups");
    assert!(
        cgroups
            .lines()
            .any(|line| line.ends_with(&format!("/{}", cgroup.name()))),
        "{cgroups}"
    );
    assert!(
        stderr.contains("with dns.maxNames and connections.max both reached")
            && stderr.contains("more than its memory limit of 256 MiB"),
        "{stderr}"
    );
}
