//! Bounds on what pods can make the gateway hold: connections in total, and connections still
//! waiting for their first message (a slowloris pod must not starve the others).
//!
//! Each admission is an RAII permit; dropping it (however the connection ends) gives it back.
//! Every worker admits connections here, twice per connection: the totals are atomics and the
//! per-source counts are in shards by address, so workers admitting different pods' connections
//! never wait for one another.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use egressgate_dns_shim::PodIp;
use tokio::sync::Notify;

/// The configured bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_connections: usize,
    pub max_peeking: usize,
    pub max_peeking_per_pod: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct Limits {
    bounds: Bounds,
    connections: AtomicUsize,
    /// Signalled when the last connection ends (graceful shutdown waits on it).
    idle: Notify,
    peeking: AtomicUsize,
    peeking_by_source: [Mutex<SourceCounts>; SOURCE_SHARDS],
}

/// Shards of the per-source peeking counts, picked as the name table picks a pod's shard.
const SOURCE_SHARDS: usize = 32;

/// Connections waiting for their first message, by source address (only sources with some).
/// foldhash, seeded per process: a pod can only send from its own address (the nftables
/// reverse-path check), and SipHash was most of the cost of a permit.
type SourceCounts = HashMap<IpAddr, usize, foldhash::fast::RandomState>;

/// One admitted connection.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<Limits>);

/// One connection allowed to wait for its first message.
#[derive(Debug)]
pub struct PeekPermit {
    limits: Arc<Limits>,
    source: IpAddr,
}

impl Limits {
    pub fn new(bounds: Bounds) -> Arc<Self> {
        Arc::new(Limits {
            bounds,
            connections: AtomicUsize::new(0),
            idle: Notify::new(),
            peeking: AtomicUsize::new(0),
            peeking_by_source: std::array::from_fn(|_| Mutex::default()),
        })
    }

    /// Admits a connection unless `max_connections` are open.
    pub fn connection(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let admitted = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.bounds.max_connections).then_some(open + 1)
            })
            .is_ok();
        admitted.then(|| ConnectionPermit(Arc::clone(self)))
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Waits until no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open_connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Lets a connection from `source` wait for its first message, within the global and the
    /// per-source bounds.
    pub fn peek(self: &Arc<Self>, source: IpAddr) -> Option<PeekPermit> {
        self.peeking
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |peeking| {
                (peeking < self.bounds.max_peeking).then_some(peeking + 1)
            })
            .ok()?;
        let admitted = match self.source_counts(source).entry(source) {
            Entry::Occupied(mut count) if *count.get() < self.bounds.max_peeking_per_pod => {
                *count.get_mut() += 1;
                true
            }
            Entry::Occupied(_) => false,
            Entry::Vacant(count) if self.bounds.max_peeking_per_pod > 0 => {
                count.insert(1);
                true
            }
            Entry::Vacant(_) => false,
        };
        if !admitted {
            self.peeking.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(PeekPermit {
            limits: Arc::clone(self),
            source,
        })
    }

    fn source_counts(&self, source: IpAddr) -> MutexGuard<'_, SourceCounts> {
        self.peeking_by_source[PodIp(source).shard(SOURCE_SHARDS)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drop for PeekPermit {
    fn drop(&mut self) {
        if let Entry::Occupied(mut count) =
            self.limits.source_counts(self.source).entry(self.source)
        {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
        self.limits.peeking.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> Arc<Limits> {
        Limits::new(Bounds {
            max_connections: 2,
            max_peeking: 3,
            max_peeking_per_pod: 2,
        })
    }

    #[test]
    fn connections_are_bounded_and_permits_return() {
        let limits = limits();
        let a = limits.connection().expect("first");
        let _b = limits.connection().expect("second");
        assert!(limits.connection().is_none());
        drop(a);
        assert!(limits.connection().is_some());
    }

    #[test]
    fn peeking_is_bounded_per_source_and_in_total() {
        let limits = limits();
        let (one, two, three) = (
            "198.18.1.2".parse().expect("ip"),
            "198.18.2.2".parse().expect("ip"),
            "198.18.3.2".parse().expect("ip"),
        );
        let first = limits.peek(one).expect("1st from one");
        let _second = limits.peek(one).expect("2nd from one");
        assert!(limits.peek(one).is_none(), "per-pod bound");
        let _other = limits.peek(two).expect("another pod");
        assert!(limits.peek(three).is_none(), "global bound");
        drop(first);
        assert!(limits.peek(one).is_some());
    }

    #[test]
    fn peek_permits_taken_and_returned_by_many_threads_keep_both_bounds() {
        let limits = Limits::new(Bounds {
            max_connections: 1,
            max_peeking: 12,
            max_peeking_per_pod: 3,
        });
        // Eight sources (in different shards and sharing some), eight threads each.
        let sources: Vec<IpAddr> = (0..8u8)
            .map(|i| IpAddr::from([198, 18, 1, i * 33]))
            .collect();
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let limits = &limits;
                let sources = &sources;
                scope.spawn(move || {
                    for round in 0..2000 {
                        let source = sources[(thread + round) % sources.len()];
                        let held: Vec<PeekPermit> =
                            (0..4).filter_map(|_| limits.peek(source)).collect();
                        assert!(held.len() <= 3, "per-source bound");
                        assert!(limits.peeking.load(Ordering::Acquire) <= 12, "global bound");
                    }
                });
            }
        });
        assert_eq!(limits.peeking.load(Ordering::Acquire), 0);
        for source in sources {
            assert!(
                limits.source_counts(source).is_empty(),
                "{source} forgotten"
            );
        }
        // Every slot is free again: the global bound admits twelve at once.
        let all: Vec<PeekPermit> = (0..4u8)
            .flat_map(|i| std::iter::repeat_n(IpAddr::from([198, 18, 2, i]), 3))
            .filter_map(|source| limits.peek(source))
            .collect();
        assert_eq!(all.len(), 12);
        assert!(limits.peek(IpAddr::from([198, 18, 2, 9])).is_none());
    }

    #[test]
    fn no_peeking_per_pod_admits_none_and_keeps_nothing() {
        let limits = Limits::new(Bounds {
            max_connections: 1,
            max_peeking: 4,
            max_peeking_per_pod: 0,
        });
        let source = IpAddr::from([198, 18, 1, 2]);
        assert!(limits.peek(source).is_none());
        assert_eq!(limits.peeking.load(Ordering::Acquire), 0);
        assert!(limits.source_counts(source).is_empty());
    }

    #[tokio::test]
    async fn all_closed_waits_for_the_last_connection() {
        let limits = limits();
        let permit = limits.connection().expect("admitted");
        let waiter = tokio::spawn({
            let limits = Arc::clone(&limits);
            async move { limits.all_closed().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(permit);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("wakes")
            .expect("joins");
    }
}
