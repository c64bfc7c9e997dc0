//! The chart against the real API server: `helm install`, `upgrade` and `uninstall`, what its
//! ServiceAccount may do, and the gateway removing its rules when the chart is uninstalled.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use egressgate_lab::{Lab, Output};

use egressgate_lab::GatewayOptions;

use crate::support::{allowed, connect, kube_lab_with};

/// The release; its objects are `eg-chart-egressgate` (the lab's own ServiceAccount is
/// `egressgate`, so the two never collide).
const RELEASE: &str = "eg-chart";
const FULLNAME: &str = "eg-chart-egressgate";

/// helm as `scripts/check-deploy` installs it (`$HELM` overrides).
fn helm_bin() -> PathBuf {
    if let Some(helm) = std::env::var_os("HELM") {
        return PathBuf::from(helm);
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/tools");
    std::fs::read_dir(&tools)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("helm"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no helm under {}: run scripts/check-deploy once",
                tools.display()
            )
        })
}

fn chart() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/helm/egressgate")
        .display()
        .to_string()
}

/// `helm ARGS` as cluster admin, in the node namespace.
fn helm(lab: &Lab, args: &[&str]) -> Output {
    let kubeconfig = format!("KUBECONFIG={}", lab.kube().admin_kubeconfig().display());
    let helm = helm_bin().display().to_string();
    // helm keeps its cache and config under $HOME: the lab's, not the user's.
    let home = format!("HOME={}", lab.dir().display());
    let mut argv = vec!["env", &home, &kubeconfig, &helm];
    argv.extend_from_slice(args);
    lab.node().run(&argv)
}

fn install(lab: &Lab) {
    let chart = chart();
    let out = helm(
        lab,
        &[
            "install",
            RELEASE,
            &chart,
            "-n",
            "kube-system",
            "--set",
            "intercept.interfaces={egp*}",
        ],
    );
    assert!(out.success(), "helm install:\n{out}");
}

/// A kubeconfig for the chart's ServiceAccount, its token from the TokenRequest API.
fn chart_kubeconfig(lab: &Lab) -> String {
    let token = lab.kube().token("kube-system", FULLNAME).expect("token");
    lab.kube()
        .kubeconfig_with_token("chart", &token)
        .expect("kubeconfig")
        .display()
        .to_string()
}

#[test]
fn the_chart_installs_upgrades_and_grants_its_account_only_what_it_needs() {
    // The gateways of this lab know which DaemonSet runs them: the chart's, once installed.
    let mut lab = kube_lab_with(GatewayOptions {
        nftables_extra: format!("  ownerDaemonSet: {{namespace: kube-system, name: {FULLNAME}}}\n"),
        ..GatewayOptions::default()
    });
    install(&lab);
    let kube = lab.kube();
    kube.kubectl_ok(&["get", "daemonset", "-n", "kube-system", FULLNAME])
        .expect("the DaemonSet exists");
    let config = |kube: &egressgate_lab::kube::KubeApi| {
        kube.kubectl_ok(&[
            "get",
            "configmap",
            "-n",
            "kube-system",
            &format!("{FULLNAME}-config"),
            "-o",
            "jsonpath={.data.config\\.yaml}",
        ])
        .expect("config")
    };
    assert!(
        config(kube).contains("minTtlSeconds: 5"),
        "{}",
        config(kube)
    );

    let chart = chart();
    let out = helm(
        &lab,
        &[
            "upgrade",
            RELEASE,
            &chart,
            "-n",
            "kube-system",
            "--reuse-values",
            "--set",
            "dns.minTtlSeconds=7",
        ],
    );
    assert!(out.success(), "helm upgrade:\n{out}");
    assert!(
        config(kube).contains("minTtlSeconds: 7"),
        "{}",
        config(kube)
    );

    // What the chart's account may do, asked of the API server's authorizer.
    let kubeconfig = chart_kubeconfig(&lab);
    let can = |args: &[&str]| {
        let mut argv = vec!["kubectl", "--kubeconfig", &kubeconfig, "auth", "can-i"];
        argv.extend_from_slice(args);
        lab.node().run(&argv).stdout.trim().to_owned()
    };
    for (args, want) in [
        (&["list", "pods", "--all-namespaces"][..], "yes"),
        (&["watch", "pods", "--all-namespaces"], "yes"),
        (&["watch", "namespaces"], "yes"),
        (
            &["get", &format!("daemonset/{FULLNAME}"), "-n", "kube-system"],
            "yes",
        ),
        (&["get", "daemonset/other", "-n", "kube-system"], "no"),
        (&["get", "secrets", "-n", "kube-system"], "no"),
        (&["create", "pods", "-n", "shop"], "no"),
        (&["delete", "pods", "-n", "shop"], "no"),
        (&["update", "pods/status", "-n", "shop"], "no"),
        (&["list", "configmaps", "-n", "kube-system"], "no"),
        (
            &["create", "serviceaccounts/token", "-n", "kube-system"],
            "no",
        ),
    ] {
        assert_eq!(can(args), want, "can-i {args:?}");
    }

    // The gateway, as the chart's account, watches and decides.
    let old = lab.take_gateway().expect("gateway");
    drop(old);
    let env = [("KUBECONFIG".to_owned(), kubeconfig.clone())];
    let gateway = lab
        .start_gateway_process_with("egressgate-chart", &env)
        .expect("starts");
    lab.replace_gateway(gateway);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, d) = connect(&lab, "a");
        if allowed(&d) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never allowed as the chart's account: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Uninstall: the DaemonSet goes, then its account's RBAC; the gateway saw the deletion
    // through its watch and removes its rules at exit.
    let out = helm(&lab, &["uninstall", RELEASE, "-n", "kube-system"]);
    assert!(out.success(), "helm uninstall:\n{out}");
    assert!(
        !lab.kube()
            .kubectl(&["get", "daemonset", "-n", "kube-system", FULLNAME])
            .success(),
        "the DaemonSet outlived the uninstall"
    );
    let tables = lab.node().run(&["nft", "list", "tables"]);
    assert!(tables.stdout.contains("egressgate"), "{tables}");
    let mut gateway = lab.take_gateway().expect("gateway");
    gateway.daemon().signal("TERM").expect("signal");
    assert!(
        gateway
            .daemon_mut()
            .wait_exit(Duration::from_secs(20))
            .is_some(),
        "no exit"
    );
    let log = gateway.daemon().stderr_text();
    assert!(
        log.contains("nftables rules removed"),
        "{}",
        gateway.daemon().output_tail(20)
    );
    let tables = lab.node().run(&["nft", "list", "tables"]);
    assert!(!tables.stdout.contains("egressgate"), "{tables}");
}
