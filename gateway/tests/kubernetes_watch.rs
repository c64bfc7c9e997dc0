//! The Kubernetes identity watch (`egressgate::kubernetes`) with the real `kube` client over real
//! HTTP against a fake API server (`fake_apiserver`), publishing into a real `Store`.
//!
//! Every wait is bounded by a deadline; nothing sleeps for a fixed time. The slowest tests go
//! through kube-runtime's error backoff (0.8–1.6 s per error) once or twice.

mod fake_apiserver;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use egressgate::config::Config;
use egressgate::identity::{Identities, Pod};
use egressgate::kubernetes::IdentityWatch;
use egressgate::metrics::Metrics;
use egressgate::store::Store;
use fake_apiserver::{FakeApiServer, ListReply, Recorded, Watch, NAMESPACES, PODS};
use futures::FutureExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NODE: &str = "node-a";
/// How long any single expected outcome may take (errors back off 0.8–1.6 s, then 1.6–3.2 s).
const WAIT: Duration = Duration::from_secs(8);

/// A store fed by an `IdentityWatch` against the fake server.
struct Gateway {
    store: Arc<Store>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start(server: &FakeApiServer) -> Self {
        // `RUST_LOG=egressgate=debug,kube_runtime=debug` shows what the watch did.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).expect("mkdir");
        let text = format!(
            "policyDir: {}\nidentity: {{kubernetes: {{nodeName: {NODE}}}}}\nnftables: {{manage: false}}\n",
            policies.display()
        );
        let config = Config::parse("config.yaml", &text).expect("config");
        let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
        let store = Arc::new(Store::load(&config, metrics).expect("store"));
        let (stop, stopped) = oneshot::channel::<()>();
        let metrics =
            egressgate::watch_metrics::WatchMetrics::register(&prometheus::Registry::new())
                .expect("metrics");
        let watch = IdentityWatch::new(server.client(), NODE.to_owned(), metrics);
        let task = tokio::spawn(watch.run(Arc::clone(&store), async move {
            let _ = stopped.await;
        }));
        Gateway {
            store,
            stop,
            task,
            _dir: dir,
        }
    }

    fn identities(&self) -> Arc<Identities> {
        self.store.current().identities
    }

    fn lookup(&self, ip: &str) -> Option<Arc<Pod>> {
        self.identities().lookup(addr(ip)).cloned()
    }

    fn owner(&self, ip: &str) -> Option<String> {
        self.lookup(ip).map(|pod| pod.name.clone())
    }

    fn is_ready(&self) -> bool {
        self.store.identities_ready().now_or_never().is_some()
    }

    /// Polls `done` until it holds, or fails the test after [`WAIT`].
    async fn until(&self, what: &str, done: impl Fn(&Gateway) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Both first lists done: ready, with an index published.
    async fn ready(&self) {
        tokio::time::timeout(WAIT, self.store.identities_ready())
            .await
            .expect("identities become ready");
    }

    /// Shutdown ends the watch.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the watch stops on shutdown")
            .expect("the watch task did not panic");
    }
}

fn addr(ip: &str) -> IpAddr {
    ip.parse().expect("ip address")
}

/// A running pod of namespace `shop` on this node, as the API serves it (list items carry no
/// `kind`/`apiVersion`; watch objects do, which the client accepts either way).
fn pod(name: &str, resource_version: &str, ips: &[&str], labels: Value) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let mut status = json!({
        "phase": "Running",
        "podIPs": pod_ips,
        "startTime": "2025-01-01T00:00:01Z",
    });
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
    }
    json!({
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": format!("uid-{name}"),
            "resourceVersion": resource_version,
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": labels,
        },
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
        "status": status,
    })
}

/// The same object as a watch event carries it.
fn typed(mut object: Value, kind: &str) -> Value {
    object["kind"] = json!(kind);
    object["apiVersion"] = json!("v1");
    object
}

fn namespace(name: &str, resource_version: &str, labels: Value) -> Value {
    json!({
        "metadata": {
            "name": name,
            "uid": format!("uid-ns-{name}"),
            "resourceVersion": resource_version,
            "labels": labels,
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.labels.get(key).map(String::as_str)
}

fn namespace_label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.namespace_labels.get(key).map(String::as_str)
}

/// A server with `pods` at resourceVersion 100 and namespace `shop` (team=shop) at 50; a gateway
/// that listed both and opened both watches.
async fn listed(pods: Vec<Value>) -> (FakeApiServer, Gateway, Watch, Watch) {
    let server = FakeApiServer::start().await;
    server.set_list(PODS, ListReply::items("100", pods));
    let namespaces = vec![namespace("shop", "50", json!({"team": "shop"}))];
    server.set_list(NAMESPACES, ListReply::items("50", namespaces));
    let gateway = Gateway::start(&server);
    gateway.ready().await;
    let pod_watch = server.next_watch(PODS, WAIT).await;
    let namespace_watch = server.next_watch(NAMESPACES, WAIT).await;
    (server, gateway, pod_watch, namespace_watch)
}

fn statuses(requests: &[Recorded]) -> Vec<u16> {
    requests.iter().map(|r| r.status).collect()
}

#[tokio::test]
async fn lists_resolve_every_address_and_ready_waits_for_both_lists() {
    let server = FakeApiServer::start().await;
    let web = pod(
        "web",
        "90",
        &["198.18.0.10", "fd00:18::10"],
        json!({"app": "web"}),
    );
    let db = pod("db", "91", &["198.18.0.11"], json!({"app": "db"}));
    let mut host = pod("node-agent", "92", &["10.0.0.1"], json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    let mut done = pod("job-1", "93", &["198.18.0.12"], json!({}));
    done["status"]["phase"] = json!("Succeeded");
    let pending = pod("starting", "94", &[], json!({}));
    // Two pages: ready only after the second.
    server.set_list(
        PODS,
        ListReply::Pages {
            resource_version: "100".into(),
            pages: vec![vec![web], vec![db, host, done, pending]],
        },
    );
    server.set_list(
        NAMESPACES,
        ListReply::items("50", vec![namespace("shop", "49", json!({"team": "shop"}))]),
    );
    server.hold_lists(NAMESPACES, true);
    let gateway = Gateway::start(&server);

    // Pods are listed and watched; namespaces are not listed yet: not ready, nothing published.
    let pod_watch = server.next_watch(PODS, WAIT).await;
    server
        .wait_for_requests(WAIT, "the namespace list", |requests| {
            requests
                .iter()
                .any(|r| r.resource == NAMESPACES && !r.watch)
        })
        .await;
    assert!(
        !gateway.is_ready(),
        "ready before the namespaces were listed"
    );
    assert!(gateway.identities().is_empty(), "published before ready");

    server.hold_lists(NAMESPACES, false);
    gateway.ready().await;
    let web = gateway.lookup("198.18.0.10").expect("web by IPv4");
    assert_eq!((web.namespace.as_str(), web.name.as_str()), ("shop", "web"));
    assert_eq!(label(&web, "app"), Some("web"));
    assert_eq!(namespace_label(&web, "team"), Some("shop"));
    assert_eq!(web.ips, vec![addr("198.18.0.10"), addr("fd00:18::10")]);
    let by_v6 = gateway.lookup("fd00:18::10").expect("web by IPv6");
    assert!(Arc::ptr_eq(&web, &by_v6));
    assert_eq!(gateway.owner("::ffff:198.18.0.10").as_deref(), Some("web"));
    assert_eq!(gateway.owner("198.18.0.11").as_deref(), Some("db"));
    assert!(
        gateway.lookup("10.0.0.1").is_none(),
        "hostNetwork pods are skipped"
    );
    assert!(
        gateway.lookup("198.18.0.12").is_none(),
        "finished pods are skipped"
    );
    assert_eq!(gateway.identities().len(), 2, "web and db");

    // What the client asked: this node's pods, paginated, then a watch from the list's version
    // with bookmarks; all namespaces.
    let lists = server.requests_of(PODS, false);
    assert_eq!(lists.len(), 2, "{lists:#?}");
    for list in &lists {
        assert!(
            list.raw_query
                .contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "{list:?}"
        );
        assert_eq!(list.param("fieldSelector"), Some("spec.nodeName=node-a"));
        assert_eq!(list.param("limit"), Some("500"));
        assert_eq!(list.param("watch"), None);
    }
    assert_eq!(lists[0].param("continue"), None);
    assert_eq!(lists[1].param("continue"), Some("page-1"));
    let watch = &pod_watch.request;
    assert_eq!(watch.param("watch"), Some("true"));
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(watch.param("resourceVersion"), Some("100"));
    assert_eq!(watch.param("fieldSelector"), Some("spec.nodeName=node-a"));
    let namespace_watch = server.next_watch(NAMESPACES, WAIT).await;
    let watch = &namespace_watch.request;
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(watch.param("resourceVersion"), Some("50"));
    assert_eq!(watch.param("fieldSelector"), None);
    gateway.stop().await;
}

#[tokio::test]
async fn watch_events_change_the_index() {
    let web = pod(
        "web",
        "90",
        &["198.18.0.10", "fd00:18::10"],
        json!({"app": "web"}),
    );
    let (_server, gateway, pods, namespaces) = listed(vec![web.clone()]).await;

    // MODIFIED labels.
    let relabeled = pod(
        "web",
        "101",
        &["198.18.0.10", "fd00:18::10"],
        json!({"app": "web", "tier": "front"}),
    );
    pods.modified(&typed(relabeled.clone(), "Pod"));
    gateway
        .until("the new label is visible", |g| {
            g.lookup("fd00:18::10")
                .is_some_and(|p| label(&p, "tier") == Some("front"))
        })
        .await;

    // ADDED: a new pod; a hostNetwork pod is not indexed (the next event shows it was handled).
    let mut host = pod("node-agent", "102", &["10.0.0.1"], json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    pods.added(&typed(host, "Pod"));
    pods.added(&typed(
        pod("api", "103", &["198.18.0.20"], json!({"app": "api"})),
        "Pod",
    ));
    gateway
        .until("the new pod is indexed", |g| {
            g.owner("198.18.0.20").as_deref() == Some("api")
        })
        .await;
    assert!(gateway.lookup("10.0.0.1").is_none());

    // Namespace labels follow a MODIFIED namespace.
    namespaces.modified(&typed(
        namespace("shop", "51", json!({"team": "payments"})),
        "Namespace",
    ));
    gateway
        .until("the namespace label is visible", |g| {
            g.lookup("198.18.0.10")
                .is_some_and(|p| namespace_label(&p, "team") == Some("payments"))
        })
        .await;

    // A pod that finished is dropped; a DELETED pod loses every address.
    let mut finished = pod("api", "104", &["198.18.0.20"], json!({"app": "api"}));
    finished["status"]["phase"] = json!("Failed");
    pods.modified(&typed(finished, "Pod"));
    gateway
        .until("the finished pod is gone", |g| {
            g.lookup("198.18.0.20").is_none()
        })
        .await;
    let mut deleted = relabeled;
    deleted["metadata"]["resourceVersion"] = json!("105");
    pods.deleted(&typed(deleted, "Pod"));
    gateway
        .until("the deleted pod is gone", |g| g.identities().is_empty())
        .await;
    assert!(gateway.is_ready(), "deletions do not make it unready");
    gateway.stop().await;
}

#[tokio::test]
async fn a_reused_address_goes_to_the_new_pod_and_stays_after_the_old_one_is_deleted() {
    let mut old = pod(
        "old",
        "90",
        &["198.18.0.5", "fd00:18::5"],
        json!({"app": "old"}),
    );
    old["metadata"]["creationTimestamp"] = json!("2025-01-01T00:10:00Z");
    old["status"]["startTime"] = json!("2025-01-01T00:10:01Z");
    let (_server, gateway, pods, _namespaces) = listed(vec![old.clone()]).await;
    assert_eq!(gateway.owner("198.18.0.5").as_deref(), Some("old"));

    // The CNI gave .5 to a new pod before the old one's object went away. The new pod was
    // created *before* the old one (it waited to be scheduled): its claim is what counts.
    let mut new = pod("new", "101", &["198.18.0.5"], json!({"app": "new"}));
    new["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    new["status"]["startTime"] = json!("2025-01-01T00:20:00Z");
    pods.added(&typed(new, "Pod"));
    gateway
        .until("the new pod owns the address", |g| {
            g.owner("198.18.0.5").as_deref() == Some("new")
        })
        .await;
    // The old pod keeps the address nobody else claims, and only that one.
    let stale = gateway.lookup("fd00:18::5").expect("old by IPv6");
    assert_eq!(stale.name, "old");
    assert_eq!(stale.ips, vec![addr("fd00:18::5")]);

    // The old pod's later updates (terminating) do not take the address back.
    let mut terminating = old.clone();
    terminating["metadata"]["resourceVersion"] = json!("102");
    terminating["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:30:00Z");
    terminating["metadata"]["labels"] = json!({"app": "old", "terminating": "yes"});
    pods.modified(&typed(terminating.clone(), "Pod"));
    gateway
        .until("the old pod's update is seen", |g| {
            g.lookup("fd00:18::5")
                .is_some_and(|p| label(&p, "terminating") == Some("yes"))
        })
        .await;
    assert_eq!(gateway.owner("198.18.0.5").as_deref(), Some("new"));

    // Its DELETED removes only what it owned.
    terminating["metadata"]["resourceVersion"] = json!("103");
    pods.deleted(&typed(terminating, "Pod"));
    gateway
        .until("the old pod is gone", |g| g.lookup("fd00:18::5").is_none())
        .await;
    let new = gateway.lookup("198.18.0.5").expect("the new pod keeps .5");
    assert_eq!(
        (new.name.as_str(), new.ips.as_slice()),
        ("new", &[addr("198.18.0.5")][..])
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_gone_event_relists_and_the_relist_replaces_the_index() {
    let a = pod("a", "90", &["198.18.0.1"], json!({"v": "1"}));
    let b = pod("b", "91", &["198.18.0.2"], json!({"v": "1"}));
    let (server, gateway, pods, _namespaces) = listed(vec![a, b]).await;
    let before = gateway.identities();
    assert_eq!(before.len(), 2);

    // The relist: `a` is gone, `b` changed, `c` is new. Held, to look at the index meanwhile.
    let b2 = pod("b", "150", &["198.18.0.2"], json!({"v": "2"}));
    let c = pod("c", "160", &["198.18.0.3"], json!({}));
    server.set_list(PODS, ListReply::items("200", vec![b2, c]));
    server.hold_lists(PODS, true);
    pods.expired("100");
    server
        .wait_for_requests(WAIT, "the relist", |requests| {
            requests
                .iter()
                .filter(|r| r.resource == PODS && !r.watch)
                .count()
                == 2
        })
        .await;
    assert!(
        Arc::ptr_eq(&before, &gateway.identities()),
        "the last index serves during the relist"
    );

    server.hold_lists(PODS, false);
    gateway
        .until("the relist replaced the index", |g| {
            g.lookup("198.18.0.1").is_none() && g.lookup("198.18.0.3").is_some()
        })
        .await;
    let b = gateway.lookup("198.18.0.2").expect("b");
    assert_eq!(label(&b, "v"), Some("2"));
    assert_eq!(gateway.identities().len(), 2);

    let relist = &server.requests_of(PODS, false)[1];
    assert_eq!(
        relist.param("resourceVersion"),
        None,
        "a fresh, consistent list"
    );
    assert_eq!(relist.param("fieldSelector"), Some("spec.nodeName=node-a"));
    let watch = server.next_watch(PODS, WAIT).await;
    assert_eq!(watch.request.param("resourceVersion"), Some("200"));
    gateway.stop().await;
}

#[tokio::test]
async fn gone_as_an_http_status_on_watch_and_list_relists_too() {
    let a = pod("a", "90", &["198.18.0.1"], json!({}));
    let (server, gateway, pods, _namespaces) = listed(vec![a]).await;

    // The watch drops; resuming from 100 is refused with HTTP 410, and so is the first relist.
    server.reject_watch(PODS, 410);
    server.list_once(PODS, ListReply::Status(410));
    let c = pod("c", "250", &["198.18.0.3"], json!({}));
    server.set_list(PODS, ListReply::items("300", vec![c]));
    pods.drop_mid_event();

    let watch = server.next_watch(PODS, WAIT).await;
    assert_eq!(watch.request.param("resourceVersion"), Some("300"));
    gateway
        .until("the relist replaced the index", |g| {
            g.lookup("198.18.0.1").is_none() && g.lookup("198.18.0.3").is_some()
        })
        .await;

    let watches = server.requests_of(PODS, true);
    let versions: Vec<_> = watches
        .iter()
        .map(|r| r.param("resourceVersion").unwrap_or_default())
        .collect();
    assert_eq!(versions, ["100", "100", "300"], "{watches:#?}");
    assert_eq!(statuses(&watches), [200, 410, 200]);
    let lists = server.requests_of(PODS, false);
    assert_eq!(statuses(&lists), [200, 410, 200], "{lists:#?}");
    gateway.stop().await;
}

#[tokio::test]
async fn a_dropped_stream_resumes_from_the_last_bookmark_without_a_relist() {
    let a = pod("a", "90", &["198.18.0.1"], json!({"v": "1"}));
    let (server, gateway, pods, _namespaces) = listed(vec![a]).await;
    assert_eq!(pods.request.param("resourceVersion"), Some("100"));

    pods.modified(&typed(
        pod("a", "105", &["198.18.0.1"], json!({"v": "2"})),
        "Pod",
    ));
    gateway
        .until("the update is visible", |g| {
            g.lookup("198.18.0.1")
                .is_some_and(|p| label(&p, "v") == Some("2"))
        })
        .await;
    pods.bookmark("Pod", "120");
    let before = gateway.identities();
    pods.drop_mid_event();

    let resumed = server.next_watch(PODS, WAIT).await;
    assert_eq!(resumed.request.param("resourceVersion"), Some("120"));
    assert_eq!(resumed.request.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(server.requests_of(PODS, false).len(), 1, "no relist");
    assert!(
        Arc::ptr_eq(&before, &gateway.identities()),
        "the index is served unchanged across the reconnect"
    );

    resumed.added(&typed(pod("b", "121", &["198.18.0.2"], json!({})), "Pod"));
    gateway
        .until("the resumed watch delivers", |g| {
            g.lookup("198.18.0.2").is_some()
        })
        .await;
    assert_eq!(gateway.owner("198.18.0.1").as_deref(), Some("a"));
    gateway.stop().await;
}

#[tokio::test]
async fn an_unreachable_api_server_keeps_the_last_index() {
    let a = pod("a", "90", &["198.18.0.1"], json!({}));
    let (server, gateway, _pods, _namespaces) = listed(vec![a]).await;
    let before = gateway.identities();

    server.set_down(true);
    // Two unanswered watch attempts: the first at once, the next after the backoff.
    server
        .wait_for_requests(WAIT, "two unanswered pod watches", |requests| {
            requests
                .iter()
                .filter(|r| r.resource == PODS && r.watch && r.status == 0)
                .count()
                >= 2
        })
        .await;
    assert!(
        Arc::ptr_eq(&before, &gateway.identities()),
        "nothing published"
    );
    assert_eq!(gateway.owner("198.18.0.1").as_deref(), Some("a"));
    assert!(gateway.is_ready(), "still ready: the last index serves");

    server.set_down(false);
    let resumed = server.next_watch(PODS, WAIT).await;
    assert_eq!(resumed.request.param("resourceVersion"), Some("100"));
    assert_eq!(
        server.requests_of(PODS, false).len(),
        1,
        "resumed, no relist"
    );
    resumed.added(&typed(pod("b", "101", &["198.18.0.2"], json!({})), "Pod"));
    gateway
        .until("the resumed watch delivers", |g| {
            g.lookup("198.18.0.2").is_some()
        })
        .await;
    gateway.stop().await;
}
