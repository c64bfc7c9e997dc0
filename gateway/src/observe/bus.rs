//! The bus between the JSON lines and `observe` streams: a bounded history for `--since`, and a
//! bounded queue per subscriber. Publishing never waits: a subscriber whose queue is full loses
//! the line, which is counted (`egressgate_observe_dropped_lines_total`) and told to it.
//!
//! The lines are the bytes already serialized for stdout ([`egressgate_log::LineTap`]); one
//! `Bytes` is shared by the history and every queue. With no subscriber and `observe.history: 0`
//! the bus says it wants nothing, and a line costs one atomic load more than before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper::body::Bytes;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};
use tokio::time::Instant;

use crate::config::Observe;

/// See the module docs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// History kept or someone subscribed: what [`egressgate_log::LineTap::wanted`] answers.
    wanted: AtomicBool,
    limits: Observe,
    state: Mutex<State>,
    metrics: BusMetrics,
}

#[derive(Debug, Default)]
struct State {
    history: VecDeque<Stamped>,
    subscribers: Vec<Subscriber>,
    next_id: u64,
}

/// A line and when it was published.
#[derive(Debug, Clone)]
struct Stamped {
    at: Instant,
    line: Bytes,
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    queue: mpsc::Sender<Bytes>,
    dropped: Arc<AtomicU64>,
}

/// `egressgate_observe_*`.
#[derive(Debug, Clone)]
pub struct BusMetrics {
    subscribers: IntGauge,
    dropped: IntCounter,
    refused: IntCounter,
}

impl BusMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = BusMetrics::unregistered()?;
        registry.register(Box::new(metrics.subscribers.clone()))?;
        registry.register(Box::new(metrics.dropped.clone()))?;
        registry.register(Box::new(metrics.refused.clone()))?;
        Ok(metrics)
    }

    fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(BusMetrics {
            subscribers: IntGauge::new(
                "egressgate_observe_subscribers",
                "observe streams open on the admin socket.",
            )?,
            dropped: IntCounter::new(
                "egressgate_observe_dropped_lines_total",
                "Lines an observe stream lost because it read too slowly (its queue was full).",
            )?,
            refused: IntCounter::new(
                "egressgate_observe_refused_total",
                "observe streams refused because observe.maxSubscribers were open.",
            )?,
        })
    }
}

/// Too many subscribers: the new one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} observe streams are open already (observe.maxSubscribers)")]
pub struct Full(pub usize);

/// What a subscription hands out next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Line(Bytes),
    /// This many lines were lost here because the subscriber read too slowly.
    Dropped(u64),
}

/// One subscriber: the history it asked for, then (if following) the lines published since it
/// subscribed. Unsubscribes when dropped.
#[derive(Debug)]
pub struct Subscription {
    backlog: VecDeque<Bytes>,
    live: Option<mpsc::Receiver<Bytes>>,
    dropped: Arc<AtomicU64>,
    id: u64,
    bus: Arc<Shared>,
}

impl Bus {
    pub fn new(limits: Observe, metrics: BusMetrics) -> Self {
        Bus {
            shared: Arc::new(Shared {
                wanted: AtomicBool::new(limits.history > 0),
                limits,
                state: Mutex::default(),
                metrics,
            }),
        }
    }

    /// A bus whose metrics are registered nowhere (tests, benchmarks).
    pub fn unregistered(limits: Observe) -> Self {
        let metrics = BusMetrics::unregistered().unwrap_or_else(|e| panic!("metric names: {e}"));
        Bus::new(limits, metrics)
    }

    /// Installs the bus as the process's tap of observed lines (decisions, DNS answers).
    pub fn tap_log_lines(&self) {
        if !egressgate_log::set_tap(Arc::new(self.clone())) {
            tracing::warn!("the observe tap was set already; this bus gets no lines");
        }
    }

    /// Subscribes: the history of the last `since` (all of it for `None`), then, with `follow`,
    /// every line published from now on. The backlog and the live lines neither overlap nor
    /// leave a gap: both are taken under one lock.
    pub fn subscribe(&self, since: Option<Duration>, follow: bool) -> Result<Subscription, Full> {
        let shared = &self.shared;
        let mut state = shared.lock();
        let now = Instant::now();
        let backlog = match since {
            Some(since) => state
                .history
                .iter()
                .filter(|stamped| now.duration_since(stamped.at) <= since)
                .map(|stamped| stamped.line.clone())
                .collect(),
            None if follow => VecDeque::new(),
            None => state.history.iter().map(|s| s.line.clone()).collect(),
        };
        let id = state.next_id;
        state.next_id += 1;
        let dropped = Arc::new(AtomicU64::new(0));
        let live = if follow {
            if state.subscribers.len() >= shared.limits.max_subscribers {
                shared.metrics.refused.inc();
                return Err(Full(shared.limits.max_subscribers));
            }
            let (queue, receiver) = mpsc::channel(shared.limits.queue_lines);
            state.subscribers.push(Subscriber {
                id,
                queue,
                dropped: Arc::clone(&dropped),
            });
            shared.subscribers_changed(&state);
            Some(receiver)
        } else {
            None
        };
        Ok(Subscription {
            backlog,
            live,
            dropped,
            id,
            bus: Arc::clone(shared),
        })
    }

    /// Lines in the history now.
    pub fn history_len(&self) -> usize {
        self.shared.lock().history.len()
    }

    /// Publishes one line (its bytes, newline included).
    pub fn publish(&self, line: Bytes) {
        self.shared.publish(line);
    }
}

impl egressgate_log::LineTap for Bus {
    fn wanted(&self) -> bool {
        self.shared.wanted.load(Ordering::Relaxed)
    }

    fn publish(&self, line: Vec<u8>) {
        self.shared.publish(Bytes::from(line));
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, line: Bytes) {
        let mut state = self.lock();
        if self.limits.history > 0 {
            if state.history.len() >= self.limits.history {
                state.history.pop_front();
            }
            state.history.push_back(Stamped {
                at: Instant::now(),
                line: line.clone(),
            });
        }
        let before = state.subscribers.len();
        state
            .subscribers
            .retain(|subscriber| match subscriber.queue.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    subscriber.dropped.fetch_add(1, Ordering::Relaxed);
                    self.metrics.dropped.inc();
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            });
        if state.subscribers.len() != before {
            self.subscribers_changed(&state);
        }
    }

    fn subscribers_changed(&self, state: &State) {
        let count = state.subscribers.len();
        self.metrics
            .subscribers
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.wanted
            .store(self.limits.history > 0 || count > 0, Ordering::Relaxed);
    }
}

impl Subscription {
    /// The next line, or how many were lost before it; `None` at the end of the backlog when
    /// not following. Lost lines are told once the queue is drained, where they belong.
    pub async fn next(&mut self) -> Option<Item> {
        if let Some(line) = self.backlog.pop_front() {
            return Some(Item::Line(line));
        }
        let live = self.live.as_mut()?;
        match live.try_recv() {
            Ok(line) => return Some(Item::Line(line)),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            return Some(Item::Dropped(dropped));
        }
        live.recv().await.map(Item::Line)
    }

    /// Whether lines come after the backlog.
    pub fn follows(&self) -> bool {
        self.live.is_some()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.live.is_none() {
            return;
        }
        let mut state = self.bus.lock();
        state
            .subscribers
            .retain(|subscriber| subscriber.id != self.id);
        self.bus.subscribers_changed(&state);
    }
}
