//! The API server failing the way real ones do: restarted under traffic, compacted past the
//! watch, unreachable at start, and a token without the right RBAC.

use std::time::Duration;

use egressgate_lab::daemon::wait_until;

use crate::support::{allowed, connect, kube_lab, metric, readyz, until};

#[test]
fn decisions_go_on_while_the_api_restarts_and_a_compacted_watch_relists() {
    let mut lab = kube_lab();
    let relists = |lab: &_| {
        metric(
            lab,
            r#"egressgate_identity_watch_relists_total{resource="pods"}"#,
        )
    };
    let before = relists(&lab);
    assert!(before >= 1.0, "the first list counts");

    // Writes the gateway's watches do not see, then a compaction past all of them: a watch
    // resumed from the gateway's last resourceVersion now gets 410 Gone.
    for i in 0..20 {
        lab.kube()
            .kubectl_ok(&["create", "configmap", "-n", "shop", &format!("filler-{i}")])
            .expect("configmap");
    }
    lab.kube().compact_etcd().expect("compaction");

    lab.kube_mut().stop_apiserver();
    // The last index keeps deciding while the API is away.
    let (_, d) = connect(&lab, "a");
    assert!(allowed(&d), "{d}");
    lab.kube_mut()
        .start_apiserver()
        .expect("API server restarts");

    // The watch resumes (or relists after 410) and sees new changes; no pod is lost or doubled.
    lab.kube()
        .kubectl_ok(&[
            "label",
            "pod",
            "-n",
            "shop",
            "batch-1",
            "role=app",
            "--overwrite",
        ])
        .expect("label");
    until(&lab, "b", "allowed after the restart", allowed);
    assert_eq!(metric(&lab, "egressgate_identity_pods"), 2.0);
    assert!(
        relists(&lab) > before,
        "no relist after the compaction:\n{}",
        lab.gateway().daemon().output_tail(30)
    );
    let lines = lab.gateway().events("identity_watch").collect::<Vec<_>>();
    assert!(
        lines
            .iter()
            .any(|l| l["what"] == "error" && l["kind"] == "unreachable"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l["what"] == "reconnected"),
        "{lines:?}"
    );
}

#[test]
fn a_gateway_started_without_the_api_is_not_ready_until_the_api_answers() {
    let mut lab = kube_lab();
    let old = lab.take_gateway().expect("gateway");
    drop(old);
    lab.kube_mut().stop_apiserver();
    let gateway = lab
        .start_gateway_process("egressgate-2")
        .expect("starts without the API");
    lab.replace_gateway(gateway);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(readyz(&lab), "503", "ready without identities");
    lab.kube_mut().start_apiserver().expect("API server starts");
    wait_until(
        "ready once the API answers",
        Duration::from_secs(30),
        || Ok(readyz(&lab) == "200"),
    )
    .expect("ready");
    let (_, d) = connect(&lab, "a");
    assert!(allowed(&d), "{d}");
}

#[test]
fn a_token_without_rbac_is_a_clear_error_not_a_crash() {
    let mut lab = kube_lab();
    let old = lab.take_gateway().expect("gateway");
    drop(old);
    let kube = lab.kube();
    kube.kubectl_ok(&["create", "serviceaccount", "-n", "kube-system", "nobody"])
        .expect("service account");
    let token = kube.token("kube-system", "nobody").expect("token");
    let kubeconfig = kube
        .kubeconfig_with_token("nobody", &token)
        .expect("kubeconfig");
    let env = [("KUBECONFIG".to_owned(), kubeconfig.display().to_string())];
    let mut gateway = lab
        .start_gateway_process_with("egressgate-nobody", &env)
        .expect("starts");
    let errors = gateway
        .wait_for_events(
            "identity_watch",
            |l| l["what"] == "error" && l["kind"] == "forbidden",
            2,
            Duration::from_secs(20),
        )
        .expect("forbidden errors, named");
    assert!(
        errors[0]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("forbidden"),
        "{}",
        errors[0]
    );
    assert!(
        gateway.daemon_mut().exited().is_none(),
        "the gateway exited"
    );
    lab.replace_gateway(gateway);
    assert_eq!(readyz(&lab), "503");
}
