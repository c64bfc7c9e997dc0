//! The command line without a lab: `check` reports every error with its position, `--help`
//! works everywhere.

use std::path::Path;
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
