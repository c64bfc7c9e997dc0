//! The Grafana dashboards in `deploy/grafana/`: well-formed, every query parses (`promtool check
//! rules`, each query as a recording rule), and every query returns data from a real Prometheus
//! that scrapes the real gateway in the lab while real traffic runs.
//!
//! Two Prometheus servers scrape the same gateway. One is set up like the Prometheus operator's
//! ServiceMonitor in Kubernetes (target labels `node`, relabeled from the pod's node name, and
//! `namespace`, the gateway's own, with `honor_labels` so the gateway's pod `namespace` wins) and
//! is queried with the concrete values a user picks. The other has no target labels and is
//! queried with the variables' "All" values (`.*`), as Grafana sends them when the `node` list
//! is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use egressgate_lab::daemon::{wait_until, Daemon};
use egressgate_lab::{addr, GatewayOptions, Lab};
use serde_json::{json, Value};

use crate::support::{assert_allowed, assert_denied, curl, dig, run_and_decide};

/// Dashboards that must exist; every `*.json` in `deploy/grafana/` is checked.
const DASHBOARDS: [&str; 2] = ["overview.json", "namespace.json"];

/// Substituted for Grafana's interval variables. The test Prometheus scrapes every second, so
/// 15 s windows hold enough samples for `rate` soon after the first scrape.
const RATE_INTERVAL: &str = "15s";
const RANGE: &str = "5m";

/// The `node` target label the first test Prometheus adds, like the ServiceMonitor relabeling.
const LAB_NODE: &str = "lab-node";

/// Written into dashboard queries as `... or vector(0)` so a stat shows 0 instead of "No data";
/// the live test also runs each query without it, so the real part must return data too.
const OR_ZERO: &str = " or vector(0)";

/// Queries that may legitimately return nothing in this test (they still must execute without
/// error): (dashboard file, panel title, why). The test drives every other state the
/// dashboards show, a failed policy reload included.
const MAY_BE_EMPTY: &[(&str, &str, &str)] = &[(
    "overview.json",
    "Seconds since the last watch event",
    "this lab's gateway reads a static identity file: no watch ever delivers an event (the \
     kube_api tier runs the watch against a real API server)",
)];

/// Python in a pod: three datagrams to the web address's UDP port 51820.
const UDP_DATAGRAMS: &str = "import socket\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
for _ in range(3):\n    s.sendto(b'x', ('198.19.0.10', 51820))\n";

/// Labels Prometheus (not the gateway) puts on every series: the target's `instance` and `job`,
/// and `node` from the ServiceMonitor relabeling; `le` is a histogram bucket's bound.
const TARGET_LABELS: [&str; 4] = ["instance", "job", "node", "le"];

/// role=app may reach api.example.test over TLS and HTTP (enforced); role=batch is in audit
/// mode; role=other (pod c) is selected by no policy, so `unselectedPods: allow` decides.
const POLICIES: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports:
        - {port: 443, protocol: tls}
        - {port: 80, protocol: http}
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: batch-audit, namespace: shop}
spec:
  podSelector: {matchLabels: {role: batch}}
  mode: audit
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

const BROKEN_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: broken, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tlz}]
"#;

/// One PromQL query of a dashboard: a panel target or a variable's `label_values`.
#[derive(Debug, Clone)]
struct Query {
    dashboard: String,
    /// Panel title (and refId), or `variable <name>`.
    what: String,
    expr: String,
    /// `label_values(..., label)` variables: the label whose values the query lists.
    lists_label: Option<String>,
}

/// A template variable: name, whether it offers "All" and its all-value.
#[derive(Debug, Clone)]
struct Variable {
    name: String,
    all_value: Option<String>,
}

#[derive(Debug)]
struct Dashboard {
    file: String,
    json: Value,
    queries: Vec<Query>,
    variables: Vec<Variable>,
}

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy/grafana")
}

fn load_dashboards() -> Vec<Dashboard> {
    let mut files: Vec<String> = std::fs::read_dir(grafana_dir())
        .expect("read deploy/grafana")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".json"))
        .collect();
    files.sort();
    for required in DASHBOARDS {
        assert!(
            files.iter().any(|f| f == required),
            "deploy/grafana/{required} missing"
        );
    }
    files
        .iter()
        .map(|file| {
            let path = grafana_dir().join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
            let mut queries = Vec::new();
            for panel in panels(&json) {
                let title = panel["title"].as_str().unwrap_or("?");
                for target in panel["targets"].as_array().into_iter().flatten() {
                    let expr = target["expr"].as_str().unwrap_or_default();
                    queries.push(Query {
                        dashboard: file.clone(),
                        what: format!("panel {title:?} {}", target["refId"].as_str().unwrap_or("")),
                        expr: expr.to_owned(),
                        lists_label: None,
                    });
                }
            }
            let mut variables = Vec::new();
            for var in json["templating"]["list"].as_array().into_iter().flatten() {
                let name = var["name"].as_str().unwrap_or_default().to_owned();
                if var["type"] == "query" {
                    let text = var["query"]["query"]
                        .as_str()
                        .or_else(|| var["query"].as_str())
                        .unwrap_or_default();
                    let (expr, label) = label_values(text).unwrap_or_else(|| {
                        panic!("{file}: variable {name}: not label_values(metric, label): {text}")
                    });
                    queries.push(Query {
                        dashboard: file.clone(),
                        what: format!("variable {name}"),
                        expr,
                        lists_label: Some(label),
                    });
                }
                let all_value = (var["includeAll"] == true)
                    .then(|| var["allValue"].as_str().unwrap_or_default().to_owned());
                variables.push(Variable { name, all_value });
            }
            Dashboard {
                file: file.clone(),
                json,
                queries,
                variables,
            }
        })
        .collect()
}

/// Every panel, rows' nested panels included (rows themselves excluded).
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            out.push(panel);
        }
    }
    out
}

/// `label_values(selector, label)` as the PromQL query Grafana runs for it (it lists the
/// label's values of the matching series): `group by (label) (selector)`.
fn label_values(text: &str) -> Option<(String, String)> {
    let inner = text
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    let label = label.trim().to_owned();
    Some((format!("group by ({label}) ({})", selector.trim()), label))
}

/// Replaces Grafana variables (`$name`, `${name}`) by `values`; panics on any left over.
fn substitute(query: &Query, values: &BTreeMap<String, String>) -> String {
    let mut names: Vec<&String> = values.keys().collect();
    // `$__range_s` before `$__range`.
    names.sort_by_key(|name| std::cmp::Reverse(name.len()));
    let mut expr = query.expr.clone();
    for name in names {
        expr = expr
            .replace(&format!("${{{name}}}"), &values[name])
            .replace(&format!("${name}"), &values[name]);
    }
    assert!(
        !expr.contains('$'),
        "{} {}: unknown variable left in {expr}",
        query.dashboard,
        query.what
    );
    expr
}

/// Variable values for one pass: the variables' "All" value where they offer one (or the
/// concrete `pick` values), plus Grafana's interval variables.
fn values_for(
    dashboard: &Dashboard,
    pick: &[(&str, &str)],
    use_all: bool,
) -> BTreeMap<String, String> {
    let mut values = BTreeMap::new();
    for var in &dashboard.variables {
        let picked = pick
            .iter()
            .find(|(name, _)| *name == var.name)
            .map(|(_, v)| *v);
        let value = match (&var.all_value, picked) {
            (Some(all), _) if use_all => all.clone(),
            (_, Some(value)) => value.to_owned(),
            (Some(all), None) => all.clone(),
            (None, None) => continue,
        };
        values.insert(var.name.clone(), value);
    }
    for (name, value) in [
        ("__rate_interval", RATE_INTERVAL),
        ("__interval", RATE_INTERVAL),
        ("__range", RANGE),
        ("__range_s", "300"),
    ] {
        values.insert(name.to_owned(), value.to_owned());
    }
    values
}

/// Metric names (`egressgate_…`, and the histogram's `_bucket`) a query uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("egressgate_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Label names a query's `by (...)`/`without (...)` clauses group on.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for keyword in ["by", "without"] {
        let mut rest = expr;
        while let Some(at) = rest.find(keyword) {
            let before_ok = rest[..at]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            let after = rest[at + keyword.len()..].trim_start();
            rest = &rest[at + keyword.len()..];
            if !before_ok || !after.starts_with('(') {
                continue;
            }
            let Some(close) = after.find(')') else {
                continue;
            };
            labels.extend(
                after[1..close]
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    labels
}

/// Label names a query's selectors match on (`{name="…", name=~"…"}`).
fn matcher_labels(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let body = &rest[open + 1..open + close];
        // Values are quoted and the dashboards' values hold no commas; `{{` is a legend.
        for matcher in body.split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                labels.insert(name);
            }
        }
        rest = &rest[open + close..];
    }
    labels
}

/// `{{label}}` references of a legend format.
fn legend_labels(legend: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut rest = legend;
    while let Some(open) = rest.find("{{") {
        let Some(close) = rest[open..].find("}}") else {
            break;
        };
        labels.insert(rest[open + 2..open + close].trim().to_owned());
        rest = &rest[open + close + 2..];
    }
    labels
}

/// The metric names the gateway's and the DNS shim's sources register (string literals
/// `"egressgate_…"`), histograms' series suffixes included.
fn names_in_sources() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let mut names = BTreeSet::new();
    let mut dirs = vec![root.join("gateway/src"), root.join("dns-shim/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                for name in metric_names(&text) {
                    if text.contains(&format!("\"{name}\"")) {
                        for suffix in ["", "_bucket", "_sum", "_count"] {
                            names.insert(format!("{name}{suffix}"));
                        }
                    }
                }
            }
        }
    }
    names
}

#[test]
fn dashboards_are_well_formed_and_use_only_exported_metrics() {
    let exported = names_in_sources();
    assert!(
        exported.contains("egressgate_connections_total"),
        "no metric names found in the sources: {exported:?}"
    );
    let mut uids = BTreeSet::new();
    for dashboard in load_dashboards() {
        let (file, json) = (&dashboard.file, &dashboard.json);
        let uid = json["uid"].as_str().unwrap_or_default();
        assert!(
            uid.starts_with("egressgate-") && uids.insert(uid.to_owned()),
            "{file}: uid {uid:?} must be fixed, unique and start with egressgate-"
        );
        assert!(
            json["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{file}: schemaVersion"
        );
        assert!(
            json["id"].is_null(),
            "{file}: id must be null for import/provisioning"
        );
        let vars = json["templating"]["list"]
            .as_array()
            .expect("templating.list");
        let var = |name: &str| {
            vars.iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{file}: no {name} variable"))
        };
        let ds = var("datasource");
        assert_eq!(ds["type"], "datasource", "{file}: {ds}");
        assert_eq!(ds["query"], "prometheus", "{file}: {ds}");
        for name in ["namespace", "node"] {
            let v = var(name);
            assert_eq!(v["type"], "query", "{file}: {v}");
            assert_eq!(v["datasource"]["uid"], "${datasource}", "{file}: {v}");
        }
        assert_eq!(
            var("node")["includeAll"],
            true,
            "{file}: node needs All (label may be absent)"
        );
        assert_eq!(
            var("node")["allValue"],
            ".*",
            "{file}: node's All must match no label"
        );

        let mut ids = BTreeSet::new();
        let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
        let rows = json["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .filter(|p| p["type"] == "row");
        for panel in rows.chain(panels(json)) {
            let id = panel["id"].as_u64().expect("panel id");
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(ids.insert(id), "{file}: duplicate panel id {id}");
            let grid = &panel["gridPos"];
            let (x, y, w, h) = (
                grid["x"].as_u64().expect("gridPos.x"),
                grid["y"].as_u64().expect("gridPos.y"),
                grid["w"].as_u64().expect("gridPos.w"),
                grid["h"].as_u64().expect("gridPos.h"),
            );
            assert!(
                x + w <= 24 && w > 0 && h > 0,
                "{file}: {title}: gridPos {grid}"
            );
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(
                        cells.insert((cx, cy)),
                        "{file}: {title} overlaps another panel"
                    );
                }
            }
            if panel["type"] == "row" {
                continue;
            }
            assert!(!title.is_empty(), "{file}: panel {id} has no title");
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{file}: {title}: no description"
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {title}"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{file}: {title}: no queries");
            for target in targets {
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{file}: {title}"
                );
                let expr = target["expr"].as_str().unwrap_or_default();
                let legend = target["legendFormat"].as_str().unwrap_or_default();
                let grouped = grouping_labels(expr);
                for label in legend_labels(legend) {
                    assert!(
                        grouped.contains(&label),
                        "{file}: {title}: legend {{{{{label}}}}} is not grouped on in {expr}"
                    );
                }
            }
        }
        for query in &dashboard.queries {
            let names = metric_names(&query.expr);
            assert!(
                !names.is_empty(),
                "{file}: {}: no egressgate metric",
                query.what
            );
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{file}: {}: {name} is not a metric the gateway registers",
                    query.what
                );
            }
            if query.lists_label.is_none() && !query.expr.contains("$node") {
                panic!(
                    "{file}: {}: does not filter on $node: {}",
                    query.what, query.expr
                );
            }
        }
    }
}

#[test]
fn every_dashboard_query_parses_as_a_recording_rule() {
    let mut rules = Vec::new();
    for dashboard in load_dashboards() {
        let values = values_for(
            &dashboard,
            &[("namespace", "shop"), ("node", LAB_NODE)],
            true,
        );
        for (i, query) in dashboard.queries.iter().enumerate() {
            let expr = substitute(query, &values);
            let stem = dashboard.file.trim_end_matches(".json");
            rules.push(json!({"record": format!("dashboard:{stem}:query_{i}"), "expr": expr}));
            if expr.contains(OR_ZERO) {
                rules.push(json!({
                    "record": format!("dashboard:{stem}:query_{i}_strict"),
                    "expr": expr.replace(OR_ZERO, ""),
                }));
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // JSON is YAML: promtool reads it as a rules file.
    let file = dir.path().join("dashboards.rules.yml");
    let doc = json!({"groups": [{"name": "dashboards", "rules": rules}]});
    std::fs::write(&file, serde_json::to_string_pretty(&doc).expect("json")).expect("write");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs (Debian package `prometheus`; scripts/install-deps installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(
        text.contains(&format!("{} rules found", rules.len())),
        "promtool did not check every rule:\n{text}"
    );
}

/// Percent-encodes a query string value.
fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A Prometheus server in the lab's node namespace, scraping the gateway's admin endpoint
/// every second.
struct Prometheus {
    daemon: Daemon,
    port: u16,
}

impl Prometheus {
    fn start(lab: &Lab, name: &str, port: u16, node_label: Option<&str>) -> Self {
        let dir = lab.dir().join(name);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        // Like the Prometheus operator's ServiceMonitor: target labels `namespace` (the
        // gateway's own) and `node` (relabeled from the pod's node name), and `honor_labels` so
        // the gateway's `namespace` (the pod's) wins over the target's.
        let scrape = node_label
            .map(|node| {
                format!(
                    "    honor_labels: true\n    static_configs:\n      \
                     - targets: [\"127.0.0.1:15090\"]\n        \
                     labels: {{node: {node}, namespace: egressgate-system}}\n"
                )
            })
            .unwrap_or_else(|| {
                "    static_configs:\n      - targets: [\"127.0.0.1:15090\"]\n".to_owned()
            });
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: egressgate\n{scrape}"
            ),
        )
        .expect("write prometheus config");
        let daemon = Daemon::spawn(
            lab.node().name(),
            name,
            &[
                "prometheus",
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address=127.0.0.1:{port}"),
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            lab.dir(),
            "TERM",
        )
        .expect("prometheus starts (Debian package `prometheus`)");
        Self { daemon, port }
    }

    fn wait_ready(&mut self, lab: &Lab) {
        let url = format!("http://127.0.0.1:{}/-/ready", self.port);
        let result = wait_until("prometheus ready", Duration::from_secs(20), || {
            if let Some(status) = self.daemon.exited() {
                return Err(egressgate_lab::LabError::new(format!("exited: {status}")));
            }
            Ok(lab
                .node()
                .run(&["curl", "-sf", "--max-time", "2", &url])
                .success())
        });
        if let Err(err) = result {
            panic!("{err}\n{}", self.daemon.output_tail(30));
        }
    }

    /// Runs every query (one curl); the `data.result` arrays in order.
    fn query_all(&self, lab: &Lab, exprs: &[String]) -> Result<Vec<Vec<Value>>, String> {
        let urls: Vec<String> = exprs
            .iter()
            .map(|e| {
                format!(
                    "http://127.0.0.1:{}/api/v1/query?query={}",
                    self.port,
                    urlencode(e)
                )
            })
            .collect();
        let mut args = vec!["curl", "-sS", "--max-time", "10", "-w", "\\n"];
        args.extend(urls.iter().map(String::as_str));
        let out = lab.node().run(&args);
        let lines: Vec<&str> = out.stdout.lines().collect();
        if lines.len() != exprs.len() {
            return Err(format!(
                "{} answers for {} queries:\n{out}",
                lines.len(),
                exprs.len()
            ));
        }
        let mut results = Vec::new();
        for (line, expr) in lines.iter().zip(exprs) {
            let answer: Value = serde_json::from_str(line)
                .map_err(|err| format!("{expr}: not JSON ({err}): {line}"))?;
            if answer["status"] != "success" {
                // A query Prometheus rejects fails the test at once: it will not get better.
                panic!(
                    "query failed: {expr}\n{answer}\n{}",
                    self.daemon.output_tail(10)
                );
            }
            results.push(
                answer["data"]["result"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        Ok(results)
    }
}

/// One query of one pass against one server.
#[derive(Debug)]
struct Check {
    server: usize,
    label: String,
    expr: String,
    must_have_data: bool,
    /// For variable queries on the labelled server: a value the list must include.
    lists: Option<(String, String)>,
}

/// Waits for a `policy_reload` line with `result` after the first `after` ones; returns how many
/// reload lines there are then.
fn wait_for_reload(lab: &Lab, after: usize, result: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reloads: Vec<Value> = lab.gateway().events("policy_reload").collect();
        if reloads.iter().skip(after).any(|r| r["result"] == result) {
            return reloads.len();
        }
        assert!(
            Instant::now() < deadline,
            "no policy_reload with result {result}:\n{}",
            lab.gateway().daemon().output_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_dashboard_query_returns_data_from_prometheus_scraping_the_gateway() {
    let started = Instant::now();
    let mut options = GatewayOptions::default().policy("shop.yaml", POLICIES);
    // A dead first upstream (nothing listens on the upstream host's own address): every query
    // fails over to the trusted one, so the DNS upstream error panels have data.
    options.upstreams = vec![
        format!("{}:53", addr::UP),
        format!("{}:53", addr::TRUSTED_DNS),
    ];
    let lab = Lab::builder()
        .pods(3)
        .dns()
        .web()
        .gateway(options)
        .start()
        .expect("lab starts");
    let mut servers = [
        Prometheus::start(&lab, "prometheus-node", 9090, Some(LAB_NODE)),
        Prometheus::start(&lab, "prometheus-plain", 9091, None),
    ];
    for server in &mut servers {
        server.wait_ready(&lab);
    }

    // Policy reloads: one that fails (the last good set keeps running), one that succeeds.
    let broken = lab.policy_dir().join("broken.yaml");
    std::fs::write(&broken, BROKEN_POLICY).expect("write policy");
    let seen = wait_for_reload(&lab, 0, "error");
    std::fs::remove_file(&broken).expect("remove policy");
    wait_for_reload(&lab, seen, "ok");

    // Traffic: allowed TLS and HTTP, denied, audited, unselected, no DNS record; DNS queries.
    let ca = lab.ca();
    let answers = dig(&lab, "a", addr::API, &[]);
    assert!(answers.iter().any(|a| a == addr::WEB), "{answers:?}");
    for round in 0..2 {
        let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"]));
        assert_allowed(&out, &d, "hello from api.example.test");
        let (out, d) = run_and_decide(&lab, "a", 80, &curl(&ca, &["http://api.example.test/"]));
        assert_allowed(&out, &d, "hello from api.example.test");
        let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://evil.example.test/"]));
        assert_denied(&out, &d, &["not_allowed", "sni_mismatch"]);
        let (out, d) = run_and_decide(&lab, "b", 443, &curl(&ca, &["https://evil.example.test/"]));
        assert_eq!(d.verdict(), Some("audit"), "{d}\n{out}");
        let (out, d) = run_and_decide(&lab, "c", 443, &curl(&ca, &["https://api.example.test/"]));
        assert_eq!(d.reason(), Some("unselected"), "{d}\n{out}");
        let direct = format!("https://{}/", addr::DB);
        let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &[&direct]));
        assert_denied(&out, &d, &["no_dns_record"]);
        // UDP from the enforced pod, which no `udp` rule allows: a denied flow, then drops.
        let udp = lab.pod("a").run(&["python3", "-c", UDP_DATAGRAMS]);
        assert!(udp.success(), "{udp}");
        if round == 0 {
            // Counters seen at two scrapes, so `increase` over the range is above zero.
            std::thread::sleep(Duration::from_millis(1500));
        }
    }

    let dashboards = load_dashboards();
    // Every metric and label the dashboards use is one the gateway really exports.
    let metrics = lab.node().run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15090/metrics",
    ]);
    assert!(metrics.success(), "{metrics}");
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in metrics.stdout.lines().filter(|l| !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = exported.entry(line[..name_end].to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.find('}').unwrap_or(line.len())];
            labels.extend(
                body.split("\",")
                    .filter_map(|kv| kv.split('=').next())
                    .map(|k| k.trim_start_matches(',').trim().to_owned()),
            );
        }
    }
    let picks = [("namespace", "shop"), ("node", LAB_NODE)];
    for dashboard in &dashboards {
        let values = values_for(dashboard, &picks, false);
        for query in &dashboard.queries {
            let expr = substitute(query, &values);
            let mut known: BTreeSet<String> =
                TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect();
            for name in metric_names(&expr) {
                let labels = exported.get(&name).unwrap_or_else(|| {
                    panic!("{} {}: {name} not in /metrics", dashboard.file, query.what)
                });
                known.extend(labels.iter().cloned());
            }
            let used = grouping_labels(&expr)
                .into_iter()
                .chain(matcher_labels(&expr));
            for label in used {
                assert!(
                    known.contains(&label),
                    "{} {}: label {label} is not exported with {:?}",
                    dashboard.file,
                    query.what,
                    metric_names(&expr)
                );
            }
        }
    }

    // What to ask: every query of every dashboard, on both servers.
    let mut checks = Vec::new();
    for dashboard in &dashboards {
        for (server, use_all) in [(0, false), (1, true)] {
            let values = values_for(dashboard, &picks, use_all);
            for query in &dashboard.queries {
                let expr = substitute(query, &values);
                let label = format!(
                    "{} {} on {} with {values:?}",
                    dashboard.file,
                    query.what,
                    servers[server].daemon.name()
                );
                let exempt = MAY_BE_EMPTY
                    .iter()
                    .any(|(file, title, _)| *file == dashboard.file && query.what.contains(title));
                let lists = query.lists_label.as_ref().filter(|_| server == 0).map(|l| {
                    let value = picks.iter().find(|(n, _)| n == l).map_or("", |(_, v)| *v);
                    (l.clone(), value.to_owned())
                });
                if expr.contains(OR_ZERO) {
                    checks.push(Check {
                        server,
                        label: format!("{label} (without{OR_ZERO})"),
                        expr: expr.replace(OR_ZERO, ""),
                        must_have_data: !exempt,
                        lists: None,
                    });
                }
                checks.push(Check {
                    server,
                    label,
                    expr,
                    must_have_data: !exempt,
                    lists,
                });
            }
        }
    }

    // Poll until every query has data (the first scrape takes a few seconds).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<String>;
    loop {
        missing = Vec::new();
        for (index, server) in servers.iter().enumerate() {
            let mine: Vec<&Check> = checks.iter().filter(|c| c.server == index).collect();
            let exprs: Vec<String> = mine.iter().map(|c| c.expr.clone()).collect();
            match server.query_all(&lab, &exprs) {
                Err(err) => missing.push(err),
                Ok(results) => {
                    for (check, result) in mine.iter().zip(results) {
                        if check.must_have_data && result.is_empty() {
                            missing.push(format!("no data: {}\n    {}", check.label, check.expr));
                        }
                        if let Some((label, value)) = &check.lists {
                            let listed = result.iter().any(|s| s["metric"][label] == **value);
                            if !listed {
                                missing.push(format!(
                                    "{}: {value:?} not listed: {result:?}",
                                    check.label
                                ));
                            }
                        }
                    }
                }
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        missing.is_empty(),
        "after {:?}, {} dashboard queries still fail:\n{}\n{}",
        started.elapsed(),
        missing.len(),
        missing.join("\n"),
        servers[0].daemon.output_tail(10)
    );

    eprintln!(
        "dashboards: {} queries returned data in {:?}",
        checks.len(),
        started.elapsed()
    );
}
