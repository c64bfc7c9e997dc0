//! The gateway's Prometheus metrics. The DNS shim registers its own into the same registry.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Peeks and decisions take microseconds when the client sends at once, seconds when it stalls.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `verdict`, `reason`, `protocol`: one increment per decision.
    pub connections: IntCounterVec,
    pub connections_active: IntGauge,
    /// `direction`: `up` (pod → destination, peeked bytes included) or `down`.
    pub bytes: IntCounterVec,
    /// Accept to verdict, peeking and (PostgreSQL negotiation) upstream round trips included.
    pub decision_duration: Histogram,
    /// `protocol`: first byte to a complete (or refused) first message.
    pub peek_duration: HistogramVec,
    pub upstream_connect_errors: IntCounter,
    /// `result`: `ok` or `error`.
    pub policy_reloads: IntCounterVec,
    pub policies: IntGauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Metrics {
            connections: IntCounterVec::new(
                Opts::new(
                    "egressgate_connections_total",
                    "TCP connections decided, by verdict, reason and protocol.",
                ),
                &["verdict", "reason", "protocol"],
            )?,
            connections_active: IntGauge::new(
                "egressgate_connections_active",
                "Connections accepted and not yet closed.",
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "egressgate_bytes_total",
                    "Bytes relayed, by direction (up: pod to destination).",
                ),
                &["direction"],
            )?,
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
            policy_reloads: IntCounterVec::new(
                Opts::new(
                    "egressgate_policy_reloads_total",
                    "Policy and identity reloads, by result (an error keeps the last good set).",
                ),
                &["result"],
            )?,
            policies: IntGauge::new("egressgate_policies", "Policies in force.")?,
        };
        registry.register(Box::new(metrics.connections.clone()))?;
        registry.register(Box::new(metrics.connections_active.clone()))?;
        registry.register(Box::new(metrics.bytes.clone()))?;
        registry.register(Box::new(metrics.decision_duration.clone()))?;
        registry.register(Box::new(metrics.peek_duration.clone()))?;
        registry.register(Box::new(metrics.upstream_connect_errors.clone()))?;
        registry.register(Box::new(metrics.policy_reloads.clone()))?;
        registry.register(Box::new(metrics.policies.clone()))?;
        Ok(metrics)
    }
}
