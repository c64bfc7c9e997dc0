use std::sync::Arc;
use std::time::Duration;

use egressgate_log::LineTap;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::format::{readable, Colour};
use super::*;
use crate::admin_socket::{self, client, AdminSocket, Router};
use crate::config::{Config, Observe};
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::store::Store;

fn limits(history: usize, queue_lines: usize, max_subscribers: usize) -> Observe {
    Observe {
        history,
        max_subscribers,
        queue_lines,
    }
}

fn line(n: u64) -> Bytes {
    Bytes::from(format!("{{\"event\":\"decision\",\"connection\":{n}}}\n"))
}

fn connection(item: Option<Item>) -> Option<u64> {
    match item? {
        Item::Line(bytes) => serde_json::from_slice::<Value>(&bytes).ok()?["connection"].as_u64(),
        Item::Dropped(_) => None,
    }
}

#[tokio::test(start_paused = true)]
async fn the_history_keeps_the_last_lines_and_since_narrows_them() {
    let bus = Bus::unregistered(limits(3, 8, 2));
    for n in 0..5 {
        bus.publish(line(n));
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert_eq!(bus.history_len(), 3, "bounded");
    let mut all = bus.subscribe(None, false).expect("history");
    let mut seen = Vec::new();
    while let Some(n) = connection(all.next().await) {
        seen.push(n);
    }
    assert_eq!(seen, [2, 3, 4], "the newest, oldest first");
    // Lines 3 and 4 were published 120 s and 60 s ago.
    let mut recent = bus
        .subscribe(Some(Duration::from_secs(150)), false)
        .expect("since");
    assert_eq!(connection(recent.next().await), Some(3));
    assert_eq!(connection(recent.next().await), Some(4));
    assert_eq!(recent.next().await, None, "not following: the end");
}

#[tokio::test(start_paused = true)]
async fn a_slow_subscriber_loses_lines_counted_and_told_and_never_blocks_publishing() {
    let metrics_registry = prometheus::Registry::new();
    let metrics = BusMetrics::register(&metrics_registry).expect("register");
    let bus = Bus::new(limits(0, 2, 2), metrics);
    let mut slow = bus.subscribe(None, true).expect("follow");
    let mut fast = bus.subscribe(None, true).expect("follow");
    for n in 0..5 {
        bus.publish(line(n));
        // The fast one keeps up.
        assert_eq!(connection(fast.next().await), Some(n));
    }
    // The slow one got the first two; three were dropped.
    assert_eq!(connection(slow.next().await), Some(0));
    assert_eq!(connection(slow.next().await), Some(1));
    assert_eq!(
        slow.next().await,
        Some(Item::Dropped(3)),
        "told where they belong"
    );
    bus.publish(line(5));
    assert_eq!(connection(slow.next().await), Some(5), "then live again");
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&metrics_registry.gather())
        .expect("encode");
    assert!(
        text.contains("egressgate_observe_dropped_lines_total 3"),
        "{text}"
    );
    assert!(text.contains("egressgate_observe_subscribers 2"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn subscribers_are_bounded_and_freed_when_dropped() {
    let bus = Bus::unregistered(limits(0, 4, 1));
    assert!(!bus.wanted(), "no history, nobody: lines cost nothing");
    let first = bus.subscribe(None, true).expect("first");
    assert!(bus.wanted());
    assert_eq!(bus.subscribe(None, true).err(), Some(Full(1)));
    // Reading the history does not take a subscriber's place.
    assert!(bus.subscribe(None, false).is_ok());
    drop(first);
    assert!(!bus.wanted(), "the last one gone");
    let mut second = bus.subscribe(None, true).expect("room again");
    bus.publish(line(7));
    assert_eq!(connection(second.next().await), Some(7));
    let kept = Bus::unregistered(limits(1, 4, 1));
    assert!(kept.wanted(), "a history wants every line");
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_following_with_since_gets_the_history_then_live_lines_without_a_gap() {
    let bus = Bus::unregistered(limits(10, 8, 2));
    bus.publish(line(1));
    let mut follower = bus
        .subscribe(Some(Duration::from_secs(60)), true)
        .expect("follow");
    bus.publish(line(2));
    assert_eq!(connection(follower.next().await), Some(1));
    assert_eq!(connection(follower.next().await), Some(2));
    let pending = tokio::time::timeout(Duration::from_secs(3600), follower.next()).await;
    assert!(pending.is_err(), "waits for the next line");
}

fn decision(extra: Value) -> Value {
    let mut line = json!({
        "time": "2026-12-06T10:00:01.234Z", "event": "decision", "connection": 1,
        "verdict": "deny", "reason": "not_allowed",
        "pod": {"namespace": "shop", "name": "app-1"},
        "source": "198.18.1.2:40000", "destination": "198.19.0.10:443",
        "names": ["api.example.test"], "cnames": ["lb.cdn.example.test"],
        "protocol": "tls", "sni": "api.example.test", "decisionUs": 10,
    });
    if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
        line.extend(extra.clone());
    }
    line
}

fn dns_line() -> Value {
    json!({"time": "2026-12-06T10:00:01.200Z", "event": "dns", "pod": "198.18.1.2",
           "server": "198.19.0.53:53", "transport": "udp", "name": "api.example.test",
           "type": "A", "rcode": "NOERROR", "addresses": ["198.19.0.10"],
           "cnames": ["lb.cdn.example.test"], "ttl": 60, "upstream": "198.19.0.53:53",
           "upstreamMs": 0.4})
}

fn identities() -> Identities {
    Identities::parse(
        "pods.yaml",
        "pods:\n  - {name: app-1, namespace: shop, ips: [198.18.1.2], labels: {role: app}}\n",
    )
    .expect("identities")
}

fn matches(request: Value, line: &Value) -> bool {
    let request: ObserveRequest = serde_json::from_value(request).expect("request");
    request
        .filter()
        .expect("valid")
        .matches(line, &identities())
}

#[test]
fn filters_match_decisions_and_dns_answers_alike() {
    let deny = decision(json!({}));
    let dns = dns_line();
    for (request, decision_matches, dns_matches) in [
        (json!({}), true, true),
        (json!({"namespace": "shop"}), true, true),
        (json!({"namespace": "other"}), false, false),
        (json!({"pod": "shop/app-1"}), true, true),
        (json!({"pod": "app-2"}), false, false),
        (json!({"labels": ["role=app"]}), true, true),
        (json!({"labels": ["role"]}), true, true),
        (json!({"labels": ["role=db"]}), false, false),
        (json!({"verdict": "deny"}), true, false),
        (json!({"verdict": "allow"}), false, false),
        (json!({"reason": "not_allowed"}), true, false),
        (json!({"name": "api.example.test"}), true, true),
        (json!({"name": "*.cdn.example.test"}), true, true),
        (json!({"name": "API.Example.Test."}), true, true),
        (json!({"name": "other.example.test"}), false, false),
        (json!({"destination": "198.19.0.10"}), true, true),
        (json!({"destination": "198.19.0.10:443"}), true, false),
        (json!({"destination": "198.19.0.10:80"}), false, false),
        (json!({"destination": "198.19.0.0/24"}), true, true),
        (json!({"destination": "fd00::/8"}), false, false),
        (json!({"protocol": "tls"}), true, false),
        (json!({"protocol": "dns"}), false, true),
        (
            json!({"namespace": "shop", "verdict": "deny", "name": "api.example.test"}),
            true,
            false,
        ),
    ] {
        assert_eq!(
            matches(request.clone(), &deny),
            decision_matches,
            "decision, {request}"
        );
        assert_eq!(
            matches(request.clone(), &dns),
            dns_matches,
            "dns, {request}"
        );
    }
    // A line's own labels (an audit-mode pod's) count over the pod's labels now.
    let audited =
        decision(json!({"pod": {"namespace": "shop", "name": "app-1", "labels": {"role": "old"}}}));
    assert!(matches(json!({"labels": ["role=old"]}), &audited));
    // An unknown source has no pod.
    let unknown = decision(json!({"pod": null, "source": "198.18.9.9:1"}));
    assert!(!matches(json!({"namespace": "shop"}), &unknown));
    assert!(matches(json!({"verdict": "deny"}), &unknown));
    // Other events never.
    assert!(!matches(
        json!({}),
        &json!({"event": "close", "connection": 1})
    ));
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    for (request, says) in [
        (json!({"verdict": "maybe"}), "verdict"),
        (json!({"protocol": "smtp"}), "protocol"),
        (json!({"name": "bad name"}), "not a DNS name"),
        (json!({"destination": "somewhere"}), "not an IP"),
        (json!({"namespace": "a", "pod": "b/c"}), "not in namespace"),
    ] {
        let request: ObserveRequest = serde_json::from_value(request).expect("request");
        let error = request.filter().expect_err("refused");
        assert!(error.contains(says), "{error}");
    }
    let unknown = serde_json::from_value::<ObserveRequest>(json!({"verdicts": ["deny"]}));
    assert!(unknown.is_err(), "unknown fields are refused");
}

#[test]
fn readable_lines_are_one_per_decision_and_plain_off_a_terminal() {
    let allow =
        decision(json!({"verdict": "allow", "reason": "allowed", "policy": "shop/web", "rule": 0}));
    let shown = readable(&allow.to_string(), Colour::Plain).expect("a line");
    assert_eq!(
        shown,
        "10:00:01.234 ALLOW shop/app-1 → api.example.test:443 (198.19.0.10) tls \
         sni=api.example.test  allowed by shop/web rule 0"
    );
    assert!(!shown.contains('\x1b'));
    let coloured = readable(&allow.to_string(), Colour::Terminal).expect("a line");
    assert!(coloured.contains("\x1b[32mALLOW\x1b[0m"), "{coloured}");
    let dns = readable(&dns_line().to_string(), Colour::Plain).expect("a line");
    assert_eq!(
        dns,
        "10:00:01.200 DNS   198.18.1.2 api.example.test A via lb.cdn.example.test → 198.19.0.10 \
         (ttl 60)  NOERROR"
    );
    let unknown = decision(
        json!({"pod": null, "names": [], "source": "198.18.9.9:1", "reason": "unknown_source", "protocol": null, "sni": null}),
    );
    let shown = readable(&unknown.to_string(), Colour::Plain).expect("a line");
    assert!(
        shown.contains("DENY  198.18.9.9:1 (unknown) → 198.19.0.10:443  unknown_source"),
        "{shown}"
    );
    assert!(
        readable("\n", Colour::Plain).is_none(),
        "keep-alives are not shown"
    );
    let dropped = readable(
        r#"{"time":"2026-12-06T10:00:02.000Z","event":"dropped","lines":4}"#,
        Colour::Plain,
    );
    assert_eq!(
        dropped.as_deref(),
        Some("10:00:02.000 --- 4 line(s) dropped: this observer read too slowly ---")
    );
}

/// A store with one pod, `shop/app-1` at 198.18.1.2.
fn store(dir: &std::path::Path) -> Arc<Store> {
    std::fs::create_dir(dir.join("policies")).expect("mkdir");
    std::fs::write(
        dir.join("pods.yaml"),
        "pods:\n  - {name: app-1, namespace: shop, ips: [198.18.1.2], labels: {role: app}}\n",
    )
    .expect("write");
    let text = format!(
        "policyDir: {}\nidentity: {{staticFile: {}}}\nnftables: {{manage: false}}\n",
        dir.join("policies").display(),
        dir.join("pods.yaml").display()
    );
    let config = Config::parse("c.yaml", &text).expect("config");
    let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
    Arc::new(Store::load(&config, metrics).expect("store"))
}

#[tokio::test]
async fn the_endpoint_streams_matching_lines_and_refuses_what_it_cannot_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let bus = Bus::unregistered(limits(16, 16, 1));
    let router = {
        let (bus, store) = (bus.clone(), Arc::clone(&store));
        Router::new().route(Method::POST, "/v1/observe", move |request| {
            let response = handle(&bus, &store, &request);
            async move { response }
        })
    };
    let socket = AdminSocket::bind(dir.path()).expect("bind");
    let path = admin_socket::socket_path(dir.path());
    tokio::spawn(socket.serve(router, std::future::pending()));
    let publish = |value: Value| bus.publish(Bytes::from(format!("{value}\n")));
    publish(decision(json!({"connection": 1})));
    publish(dns_line());
    publish(decision(
        json!({"connection": 2, "pod": {"namespace": "other", "name": "x"}}),
    ));

    // History, filtered, and the end.
    let request = json!({"namespace": "shop"}).to_string();
    let (status, body) = client::call(
        &path,
        Method::POST,
        "/v1/observe",
        request.into(),
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<Value> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (lines[0]["connection"].as_u64(), lines[1]["event"].as_str()),
        (Some(1), Some("dns"))
    );

    // Following: a line published afterwards arrives as it happens.
    let request = json!({"follow": true, "verdict": "deny"}).to_string();
    let response = client::send(&path, Method::POST, "/v1/observe", request.into())
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The second follower is refused while the first streams.
    let request = json!({"follow": true}).to_string();
    let (status, refusal) = client::call(
        &path,
        Method::POST,
        "/v1/observe",
        request.into(),
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&refusal).contains("maxSubscribers"));
    publish(decision(json!({"connection": 3, "verdict": "allow"})));
    publish(decision(json!({"connection": 4})));
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("in time")
        .expect("a frame")
        .expect("data");
    let data = frame.into_data().expect("data");
    let value: Value = serde_json::from_slice(&data).expect("json");
    assert_eq!(
        value["connection"].as_u64(),
        Some(4),
        "the allow was filtered out"
    );
    drop(body);

    // Refusals.
    for (request, status) in [
        ("{\"verdict\":\"maybe\"}", StatusCode::BAD_REQUEST),
        ("{\"follow\":\"yes\"}", StatusCode::BAD_REQUEST),
    ] {
        let (got, _) = client::call(
            &path,
            Method::POST,
            "/v1/observe",
            request.into(),
            Duration::from_secs(5),
        )
        .await
        .expect("answer");
        assert_eq!(got, status, "{request}");
    }
    let (got, _) = client::call(
        &path,
        Method::GET,
        "/v1/observe",
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await
    .expect("answer");
    assert_eq!(got, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(start_paused = true)]
async fn a_follower_that_went_away_is_freed_on_a_quiet_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let bus = Bus::unregistered(limits(0, 16, 1));
    let router = {
        let (bus, store) = (bus.clone(), Arc::clone(&store));
        Router::new().route(Method::POST, "/v1/observe", move |request| {
            let response = handle(&bus, &store, &request);
            async move { response }
        })
    };
    let socket = AdminSocket::bind(dir.path()).expect("bind");
    let path = admin_socket::socket_path(dir.path());
    tokio::spawn(socket.serve(router, std::future::pending()));
    let request = json!({"follow": true}).to_string();
    let response = client::send(&path, Method::POST, "/v1/observe", request.into())
        .await
        .expect("answer");
    assert!(bus.wanted(), "subscribed");
    drop(response);
    // No line is published: only the keep-alive finds the closed connection.
    for _ in 0..4 {
        tokio::time::sleep(HEARTBEAT).await;
        if !bus.wanted() {
            return;
        }
    }
    panic!("the subscription outlived its client");
}
