//! The gateway's Prometheus metrics. The DNS shim registers its own into the same registry.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

/// Peeks and decisions take microseconds when the client sends at once, seconds when it stalls.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Distinct (namespace, destination) series of `egressgate_denied_connections_total` before new
/// destinations are counted as `other`: a pod probing random names must not blow up the TSDB.
const MAX_DENIED_SERIES: usize = 1000;

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `verdict`, `reason`, `protocol`, `namespace`: one increment per decision.
    pub connections: IntCounterVec,
    /// `namespace`, `destination`: denied and audited connections by what the pod wanted.
    denied: IntCounterVec,
    denied_series: Arc<Mutex<HashSet<(String, String)>>>,
    pub connections_active: IntGauge,
    /// `direction`: `up` (pod → destination, peeked bytes included) or `down`.
    bytes: IntCounterVec,
    /// `bytes{direction="up"}` and `{direction="down"}`, resolved once: every relayed
    /// connection counts both, and a label lookup hashes the label and takes a lock.
    pub bytes_up: IntCounter,
    pub bytes_down: IntCounter,
    /// Accept to verdict, peeking and (PostgreSQL negotiation) upstream round trips included.
    pub decision_duration: Histogram,
    /// `protocol`: first byte to a complete (or refused) first message.
    pub peek_duration: HistogramVec,
    pub upstream_connect_errors: IntCounter,
    /// `verdict`: the requests after the first on allowed HTTP/1 connections (the first is a
    /// connection's decision); only refused ones get a decision line.
    pub http_later_requests: IntCounterVec,
    /// `http_later_requests{verdict="allow"}`, resolved once: most later requests are allowed.
    pub http_later_allowed: IntCounter,
    /// `verdict`: UDP flows the relay decided (their first datagram).
    pub udp_flows: IntCounterVec,
    /// Datagrams the relay sent on for allowed flows (before the kernel carries the flow).
    pub udp_relayed: IntCounter,
    /// `reason`: `denied`, `deciding_queue_full`, `flow_limit`, `send_failed`.
    pub udp_dropped: IntCounterVec,
    /// `result`: `ok` or `error`.
    pub policy_reloads: IntCounterVec,
    pub policies: IntGauge,
    /// 1 while the files on disk failed to load and an older policy set is running.
    pub policy_stale: IntGauge,
    pub policy_last_success: Gauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let http_later_requests = IntCounterVec::new(
            Opts::new(
                "egressgate_http_later_requests_total",
                "HTTP/1 requests after the first on allowed connections, by verdict.",
            ),
            &["verdict"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "egressgate_bytes_total",
                "Bytes relayed, by direction (up: pod to destination).",
            ),
            &["direction"],
        )?;
        let metrics = Metrics {
            connections: IntCounterVec::new(
                Opts::new(
                    "egressgate_connections_total",
                    "TCP connections and UDP flows (protocol udp) decided, by verdict, reason \
                     and protocol.",
                ),
                &["verdict", "reason", "protocol", "namespace"],
            )?,
            denied: IntCounterVec::new(
                Opts::new(
                    "egressgate_denied_connections_total",
                    "Denied and audited connections by pod namespace and wanted destination \
                     (SNI, Host, resolved name or address; `other` past the series cap).",
                ),
                &["namespace", "destination"],
            )?,
            denied_series: Arc::default(),
            connections_active: IntGauge::new(
                "egressgate_connections_active",
                "Connections accepted and not yet closed.",
            )?,
            bytes_up: bytes.with_label_values(&["up"]),
            bytes_down: bytes.with_label_values(&["down"]),
            bytes,
            decision_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "egressgate_decision_duration_seconds",
                    "Time from accept to verdict.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
            )?,
            peek_duration: HistogramVec::new(
                HistogramOpts::new(
                    "egressgate_peek_duration_seconds",
                    "Time spent reading the first client message, by protocol.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["protocol"],
            )?,
            upstream_connect_errors: IntCounter::new(
                "egressgate_upstream_connect_errors_total",
                "Allowed connections whose destination could not be reached.",
            )?,
            http_later_allowed: http_later_requests.with_label_values(&["allow"]),
            http_later_requests,
            udp_flows: IntCounterVec::new(
                Opts::new(
                    "egressgate_udp_flows_total",
                    "UDP flows (pod, destination, port) decided by the relay, by verdict.",
                ),
                &["verdict"],
            )?,
            udp_relayed: IntCounter::new(
                "egressgate_udp_datagrams_relayed_total",
                "Datagrams of allowed UDP flows the relay sent itself (the kernel carries the rest).",
            )?,
            udp_dropped: IntCounterVec::new(
                Opts::new(
                    "egressgate_udp_datagrams_dropped_total",
                    "Datagrams the UDP relay dropped, by reason (denied, deciding_queue_full, \
                     flow_limit, send_failed).",
                ),
                &["reason"],
            )?,
            policy_reloads: IntCounterVec::new(
                Opts::new(
                    "egressgate_policy_reloads_total",
                    "Policy and identity reloads, by result (an error keeps the last good set).",
                ),
                &["result"],
            )?,
            policies: IntGauge::new("egressgate_policies", "Policies in force.")?,
            policy_stale: IntGauge::new(
                "egressgate_policy_stale",
                "1 while the policy files failed to load and the last good set is running.",
            )?,
            policy_last_success: Gauge::new(
                "egressgate_policy_last_reload_success_timestamp_seconds",
                "Unix time of the last successful policy load.",
            )?,
        };
        registry.register(Box::new(metrics.connections.clone()))?;
        registry.register(Box::new(metrics.denied.clone()))?;
        registry.register(Box::new(metrics.connections_active.clone()))?;
        registry.register(Box::new(metrics.bytes.clone()))?;
        registry.register(Box::new(metrics.decision_duration.clone()))?;
        registry.register(Box::new(metrics.peek_duration.clone()))?;
        registry.register(Box::new(metrics.upstream_connect_errors.clone()))?;
        registry.register(Box::new(metrics.http_later_requests.clone()))?;
        registry.register(Box::new(metrics.udp_flows.clone()))?;
        registry.register(Box::new(metrics.udp_relayed.clone()))?;
        registry.register(Box::new(metrics.udp_dropped.clone()))?;
        registry.register(Box::new(metrics.policy_reloads.clone()))?;
        registry.register(Box::new(metrics.policies.clone()))?;
        registry.register(Box::new(metrics.policy_stale.clone()))?;
        registry.register(Box::new(metrics.policy_last_success.clone()))?;
        Ok(metrics)
    }

    /// Counts a denied (or audited) connection under what the pod tried to reach.
    pub(crate) fn count_denied(&self, namespace: &str, destination: &str) {
        let key = (namespace.to_owned(), destination.to_owned());
        let destination = match self.denied_series.lock() {
            Ok(mut seen) if seen.contains(&key) || seen.len() < MAX_DENIED_SERIES => {
                seen.insert(key);
                destination
            }
            _ => "other",
        };
        self.denied
            .with_label_values(&[namespace, destination])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_destinations_are_capped() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("registers");
        for i in 0..MAX_DENIED_SERIES + 5 {
            metrics.count_denied("shop", &format!("host-{i}.example"));
        }
        metrics.count_denied("shop", "host-0.example");
        let families = registry.gather();
        let denied = families
            .iter()
            .find(|f| f.name() == "egressgate_denied_connections_total")
            .expect("family");
        assert_eq!(denied.get_metric().len(), MAX_DENIED_SERIES + 1);
        let other = denied
            .get_metric()
            .iter()
            .find(|m| m.get_label().iter().any(|l| l.value() == "other"))
            .expect("other series");
        assert_eq!(other.get_counter().get_value(), 5.0);
    }

    #[test]
    fn bytes_counted_through_the_resolved_counters_are_the_direction_series() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("registers");
        metrics.bytes_up.inc_by(239);
        metrics.bytes_down.inc_by(803);
        let families = registry.gather();
        let bytes = families
            .iter()
            .find(|f| f.name() == "egressgate_bytes_total")
            .expect("family");
        let by_direction: Vec<(&str, f64)> = bytes
            .get_metric()
            .iter()
            .map(|m| (m.get_label()[0].value(), m.get_counter().get_value()))
            .collect();
        assert_eq!(by_direction, [("down", 803.0), ("up", 239.0)]);
    }
}
