//! Decisions by identities that came from the API server: labels, namespaces, deletions.

use crate::support::{allowed, connect, kube_lab, metric, until};

#[test]
fn pods_and_labels_from_the_api_decide_and_changes_apply_live() {
    let lab = kube_lab();
    let kube = lab.kube();

    // Listed from the API: pod a (role=app) allowed, pod b (role=batch) unselected.
    let (_, d) = connect(&lab, "a");
    assert!(allowed(&d), "{d}");
    assert_eq!(d.pod_name(), Some("app-1"), "{d}");
    let (_, d) = connect(&lab, "b");
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("unselected")),
        "{d}"
    );
    // An unselected pod's line names its labels and, once it has one, its controller owner.
    assert_eq!(d.0["pod"]["labels"]["role"], "batch", "{d}");
    kube.kubectl_ok(&[
        "patch",
        "pod",
        "-n",
        "shop",
        "batch-1",
        "--type=merge",
        "-p",
        r#"{"metadata":{"ownerReferences":[{"apiVersion":"batch/v1","kind":"Job","name":"nightly","uid":"6f1d2c1e-0000-4000-8000-000000000001","controller":true}]}}"#,
    ])
    .expect("owner reference");
    until(&lab, "b", "the owner in its line", |d| {
        d.0["pod"]["owner"] == serde_json::json!({"kind": "Job", "name": "nightly"})
    });
    assert_eq!(metric(&lab, "egressgate_identity_pods"), 2.0);
    let pod_ips = kube
        .kubectl_ok(&[
            "get",
            "pod",
            "-n",
            "shop",
            "app-1",
            "-o",
            "jsonpath={.status.podIPs}",
        ])
        .expect("get");
    assert_eq!(
        metric(&lab, "egressgate_identity_addresses"),
        4.0,
        "{pod_ips}"
    );

    // A label change on the pod reaches the gateway through the watch.
    kube.kubectl_ok(&[
        "label",
        "pod",
        "-n",
        "shop",
        "batch-1",
        "role=app",
        "--overwrite",
    ])
    .expect("label");
    until(&lab, "b", "allowed after role=app", allowed);

    // role=other is only allowed in namespaces labelled tier=trusted.
    kube.kubectl_ok(&[
        "label",
        "pod",
        "-n",
        "shop",
        "batch-1",
        "role=other",
        "--overwrite",
    ])
    .expect("label");
    until(&lab, "b", "unselected as role=other", |d| {
        d.reason() == Some("unselected")
    });
    kube.kubectl_ok(&["label", "namespace", "shop", "tier=trusted"])
        .expect("label namespace");
    let d = until(&lab, "b", "allowed by the namespace label", allowed);
    assert_eq!(d.policy(), Some("trusted-others"), "{d}");
}

#[test]
fn a_deleted_pods_address_belongs_to_the_new_pod_that_reuses_it() {
    let lab = kube_lab();
    let kube = lab.kube();
    let (_, d) = connect(&lab, "a");
    assert!(allowed(&d), "{d}");

    kube.delete_pod("shop", "app-1").expect("delete");
    let a = lab.pod("a");
    kube.create_pod("shop", "reused-1", &["role=batch"], &[&a.ipv4, &a.ipv6])
        .expect("new pod on the old address");
    let d = until(&lab, "a", "judged as the new pod", |d| {
        d.pod_name() == Some("reused-1")
    });
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some("unselected")),
        "{d}"
    );
    assert_eq!(metric(&lab, "egressgate_identity_pods"), 2.0);
}
