//! What the relay remembers of UDP flows: decided (allowed or denied, until a deadline) or being
//! decided (with the few datagrams that came meanwhile). A flow is (pod address, destination,
//! port), the key of the kernel's `udp_flows` sets: the pod's source port is not part of it.
//!
//! Pure: the caller passes the time, so the tests run on paused time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

/// Datagrams kept while a flow is being decided (a pod waits for its address to be known up to
/// `identity.unknownSourceWaitMs`); later ones are dropped. A handshake's first burst fits.
pub(crate) const MAX_QUEUED: usize = 8;

/// Bytes queued in all flows being decided: without it, flows opened by an address that waits
/// for its identity could hold `udp.maxFlows` × 8 × 64 KiB.
const MAX_QUEUED_BYTES: usize = 4 << 20;

/// Flows being decided at once (each a task, possibly waiting for its pod's identity); a new
/// flow past it is refused like one past `udp.maxFlows`.
const MAX_DECIDING: usize = 1024;

/// One flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub pod: IpAddr,
    pub destination: IpAddr,
    pub port: u16,
}

/// A datagram of a flow being decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queued {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
}

/// What to do with a datagram, given what is known of its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Allowed: relay it.
    Allowed,
    /// Denied within `udp.deniedFlowSeconds`: drop it, no new decision line.
    Denied,
    /// Being decided: [`Flows::queue`] it.
    Deciding,
    /// A new flow, now being decided: decide it, and queue the datagram.
    New,
    /// A new flow, and `udp.maxFlows` are remembered: drop it.
    Full,
}

#[derive(Debug)]
enum State {
    Deciding(Vec<Queued>),
    Allowed,
    Denied,
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// When a decided flow is forgotten (never for one being decided).
    until: Option<Instant>,
}

/// The flows the relay knows, at most `max`.
#[derive(Debug)]
pub(crate) struct Flows {
    entries: HashMap<FlowKey, Entry>,
    max: usize,
    idle: Duration,
    denied_for: Duration,
    /// Flows in [`State::Deciding`], and the payload bytes they hold.
    deciding: usize,
    queued_bytes: usize,
}

impl Flows {
    pub(crate) fn new(max: usize, idle: Duration, denied_for: Duration) -> Self {
        Flows {
            entries: HashMap::new(),
            max,
            idle,
            denied_for,
            deciding: 0,
            queued_bytes: 0,
        }
    }

    /// A datagram of `key` arrived at `now`. An allowed flow's idle deadline moves on.
    pub(crate) fn see(&mut self, key: FlowKey, now: Instant) -> Seen {
        if let Some(entry) = self.entries.get_mut(&key) {
            match (&entry.state, entry.until) {
                (State::Deciding(_), _) => return Seen::Deciding,
                (_, Some(until)) if until <= now => {}
                (State::Allowed, _) => {
                    entry.until = Some(now + self.idle);
                    return Seen::Allowed;
                }
                (State::Denied, _) => return Seen::Denied,
            }
        }
        if self.deciding >= MAX_DECIDING {
            return Seen::Full;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.max {
            self.entries
                .retain(|_, entry| entry.until.is_none_or(|until| until > now));
            if self.entries.len() >= self.max {
                return Seen::Full;
            }
        }
        self.deciding += 1;
        self.entries.insert(
            key,
            Entry {
                state: State::Deciding(Vec::new()),
                until: None,
            },
        );
        Seen::New
    }

    /// Keeps a datagram of a flow being decided; `false` (dropped) past [`MAX_QUEUED`] for the
    /// flow or [`MAX_QUEUED_BYTES`] for all, or when the flow is not being decided.
    pub(crate) fn queue(&mut self, key: FlowKey, datagram: Queued) -> bool {
        let len = datagram.payload.len();
        if self.queued_bytes + len > MAX_QUEUED_BYTES {
            return false;
        }
        match self.entries.get_mut(&key).map(|entry| &mut entry.state) {
            Some(State::Deciding(queued)) if queued.len() < MAX_QUEUED => {
                queued.push(datagram);
                self.queued_bytes += len;
                true
            }
            _ => false,
        }
    }

    /// The decision for `key`: remembered from `now`, and the datagrams that waited for it.
    pub(crate) fn settle(&mut self, key: FlowKey, allowed: bool, now: Instant) -> Vec<Queued> {
        let (state, keep) = if allowed {
            (State::Allowed, self.idle)
        } else {
            (State::Denied, self.denied_for)
        };
        let previous = self.entries.insert(
            key,
            Entry {
                state,
                until: Some(now + keep),
            },
        );
        match previous.map(|entry| entry.state) {
            Some(State::Deciding(queued)) => {
                let bytes: usize = queued.iter().map(|d| d.payload.len()).sum();
                // Saturating: a miscount must never take the relay down.
                self.deciding = self.deciding.saturating_sub(1);
                self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
                queued
            }
            _ => Vec::new(),
        }
    }

    /// Forgets every decided flow (policies or pod selections changed): their next datagrams
    /// are decided again. Flows being decided finish with the decision under way.
    pub(crate) fn forget_decided(&mut self) {
        self.entries
            .retain(|_, entry| matches!(entry.state, State::Deciding(_)));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            pod: [198, 18, 1, 2].into(),
            destination: [198, 18, 2, 10].into(),
            port,
        }
    }

    fn datagram(byte: u8) -> Queued {
        Queued {
            source: ([198, 18, 1, 2], 40000).into(),
            destination: ([198, 18, 2, 10], 51820).into(),
            payload: vec![byte],
        }
    }

    fn flows() -> Flows {
        Flows::new(2, Duration::from_secs(60), Duration::from_secs(10))
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_flow_queues_until_decided_then_hands_its_datagrams_back() {
        let mut flows = flows();
        let now = Instant::now();
        assert_eq!(flows.see(key(1), now), Seen::New);
        assert!(flows.queue(key(1), datagram(1)));
        assert_eq!(flows.see(key(1), now), Seen::Deciding);
        assert!(flows.queue(key(1), datagram(2)));
        let queued = flows.settle(key(1), true, now);
        assert_eq!(queued, [datagram(1), datagram(2)]);
        assert_eq!(flows.see(key(1), now), Seen::Allowed);
        assert!(
            !flows.queue(key(1), datagram(3)),
            "only a flow being decided queues"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_of_a_flow_being_decided_is_bounded() {
        let mut flows = flows();
        assert_eq!(flows.see(key(1), Instant::now()), Seen::New);
        for byte in 0..MAX_QUEUED {
            assert!(flows.queue(key(1), datagram(byte as u8)));
        }
        assert!(!flows.queue(key(1), datagram(0xff)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_denied_flow_is_remembered_for_denied_flow_seconds_only() {
        let mut flows = flows();
        let start = Instant::now();
        assert_eq!(flows.see(key(1), start), Seen::New);
        assert!(flows.settle(key(1), false, start).is_empty());
        assert_eq!(
            flows.see(key(1), start + Duration::from_secs(9)),
            Seen::Denied
        );
        assert_eq!(
            flows.see(key(1), start + Duration::from_secs(10)),
            Seen::New
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_allowed_flow_lives_while_datagrams_come_and_expires_when_idle() {
        let mut flows = flows();
        let start = Instant::now();
        flows.see(key(1), start);
        flows.settle(key(1), true, start);
        let later = start + Duration::from_secs(50);
        assert_eq!(flows.see(key(1), later), Seen::Allowed);
        assert_eq!(
            flows.see(key(1), later + Duration::from_secs(59)),
            Seen::Allowed
        );
        let idle = later + Duration::from_secs(59) + Duration::from_secs(60);
        assert_eq!(flows.see(key(1), idle), Seen::New);
    }

    #[tokio::test(start_paused = true)]
    async fn past_max_flows_new_ones_are_refused_until_old_ones_expire() {
        let mut flows = flows();
        let start = Instant::now();
        for port in [1, 2] {
            assert_eq!(flows.see(key(port), start), Seen::New);
            flows.settle(key(port), false, start);
        }
        assert_eq!(flows.see(key(3), start), Seen::Full);
        assert_eq!(flows.len(), 2);
        // Known flows are still answered.
        assert_eq!(flows.see(key(1), start), Seen::Denied);
        assert_eq!(
            flows.see(key(3), start + Duration::from_secs(10)),
            Seen::New,
            "expired denials make room"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn queued_bytes_and_flows_being_decided_are_bounded_for_all_flows() {
        let mut flows = Flows::new(1 << 20, Duration::from_secs(60), Duration::from_secs(10));
        let now = Instant::now();
        let big = |port| Queued {
            payload: vec![0; 65_000],
            ..datagram(port)
        };
        let mut queued = 0;
        for port in 0..MAX_DECIDING as u16 {
            assert_eq!(flows.see(key(port), now), Seen::New);
            if flows.queue(key(port), big(0)) {
                queued += 1;
            }
        }
        assert_eq!(queued, MAX_QUEUED_BYTES / 65_000);
        assert_eq!(flows.see(key(u16::MAX), now), Seen::Full);
        // A decision frees its flow's place and bytes.
        assert_eq!(flows.settle(key(0), false, now).len(), 1);
        assert!(flows.queue(key(1), big(1)));
        assert_eq!(flows.see(key(u16::MAX), now), Seen::New);
    }

    #[tokio::test(start_paused = true)]
    async fn forgetting_keeps_flows_being_decided() {
        let mut flows = flows();
        let now = Instant::now();
        flows.see(key(1), now);
        flows.settle(key(1), true, now);
        flows.see(key(2), now);
        flows.forget_decided();
        assert_eq!(flows.see(key(2), now), Seen::Deciding);
        assert_eq!(flows.see(key(1), now), Seen::New);
    }
}
