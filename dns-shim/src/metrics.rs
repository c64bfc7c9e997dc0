//! The shim's Prometheus metrics, registered into the registry the gateway passes in.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, PullingGauge, Registry,
};

use crate::client::Transport;
use crate::table::NameTable;

/// Every `QueryResult`, in the order of [`QueryResult::index`].
const QUERY_RESULTS: usize = 5;

/// `result` label of `egressgate_dns_queries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueryResult {
    /// Trusted answer relayed (recorded if it was a recordable A/AAAA answer).
    Answered,
    Servfail,
    Refused,
    /// Nothing sent back: shorter than a header, a response, over capacity, or a failure for a
    /// query with no readable question.
    Dropped,
    /// Query or answer unreadable: relayed as-is, nothing recorded.
    Passthrough,
}

impl QueryResult {
    fn index(self) -> usize {
        match self {
            QueryResult::Answered => 0,
            QueryResult::Servfail => 1,
            QueryResult::Refused => 2,
            QueryResult::Dropped => 3,
            QueryResult::Passthrough => 4,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            QueryResult::Answered => "answered",
            QueryResult::Servfail => "servfail",
            QueryResult::Refused => "refused",
            QueryResult::Dropped => "dropped",
            QueryResult::Passthrough => "passthrough",
        }
    }
}

/// `reason` label of `egressgate_dns_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    Timeout,
    Io,
    /// A datagram or TCP message that was not the answer (wrong source, ID or question).
    Mismatch,
    /// TC answer, and the TCP retry failed: the truncated answer is relayed.
    TcpRetry,
}

impl UpstreamError {
    fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Timeout => "timeout",
            UpstreamError::Io => "io",
            UpstreamError::Mismatch => "mismatch",
            UpstreamError::TcpRetry => "tcp_retry",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    queries: IntCounterVec,
    /// Each `queries` series, looked up once (by hashing its labels) on first use: every query
    /// counts one.
    query_counters: Arc<[[OnceLock<IntCounter>; QUERY_RESULTS]; 2]>,
    upstream_duration: Histogram,
    upstream_errors: IntCounterVec,
}

impl Metrics {
    pub(crate) fn register(
        registry: &Registry,
        table: &Arc<NameTable>,
    ) -> Result<Self, prometheus::Error> {
        let queries = IntCounterVec::new(
            Opts::new(
                "egressgate_dns_queries_total",
                "DNS queries intercepted, by client transport and outcome",
            ),
            &["transport", "result"],
        )?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "egressgate_dns_upstream_duration_seconds",
                "Time from sending a query to a trusted upstream to its accepted answer",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "egressgate_dns_upstream_errors_total",
                "Failed or rejected exchanges with trusted upstreams, by reason",
            ),
            &["reason"],
        )?;
        let weak = Arc::downgrade(table);
        let recorded = PullingGauge::new(
            "egressgate_dns_recorded_names",
            "Entries (pod, address, name) in the DNS name table",
            Box::new(move || weak.upgrade().map_or(0.0, |t| t.len() as f64)),
        )?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(recorded))?;
        registry.register(Box::new(table.evictions_counter().clone()))?;
        Ok(Metrics {
            queries,
            query_counters: Arc::default(),
            upstream_duration,
            upstream_errors,
        })
    }

    pub(crate) fn query(&self, transport: Transport, result: QueryResult) {
        let by_transport = match transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
        };
        self.query_counters[by_transport][result.index()]
            .get_or_init(|| {
                self.queries
                    .with_label_values(&[transport.as_str(), result.as_str()])
            })
            .inc();
    }

    pub(crate) fn upstream_duration(&self, seconds: f64) {
        self.upstream_duration.observe(seconds);
    }

    pub(crate) fn upstream_error(&self, reason: UpstreamError) {
        self.upstream_errors
            .with_label_values(&[reason.as_str()])
            .inc();
    }
}
