//! The command line without a lab: `check` reports every error with its position, `--help`
//! works everywhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    ] {
        let out = egressgate(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(stdout.contains("Usage: egressgate"), "{args:?}: {stdout}");
    }
}

/// A memory cgroup of its own (cgroup v2, or v1's memory controller), removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn with_limit(bytes: u64) -> MemoryCgroup {
        let name = format!("egressgate-test-{}", std::process::id());
        let (dir, file) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (Path::new("/sys/fs/cgroup").join(name), "memory.max")
        } else {
            (
                Path::new("/sys/fs/cgroup/memory").join(name),
                "memory.limit_in_bytes",
            )
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = MemoryCgroup { dir };
        std::fs::write(cgroup.dir.join(file), bytes.to_string()).expect("set the limit");
        cgroup
    }

    /// Runs the gateway with `args` inside this cgroup.
    fn egressgate(&self, args: &[&str]) -> Output {
        let bin = egressgate_bin().expect("built gateway");
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.dir)
            .arg(bin)
            .args(args)
            .output()
            .expect("runs")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The processes run in it have exited: an empty cgroup can be removed.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

#[test]
fn check_warns_when_the_caps_do_not_fit_in_the_memory_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let cgroup = MemoryCgroup::with_limit(256 << 20);

    // The defaults: a million names and 65536 connections need over a GiB when full.
    let out = cgroup.egressgate(&["check", "--config", &config]);
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
    let out = cgroup.egressgate(&["check", "--config", &config]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}
