//! Bounds on what pods can make the gateway hold: connections in total, and connections still
//! waiting for their first message (a slowloris pod must not starve the others).
//!
//! Each admission is an RAII permit; dropping it (however the connection ends) gives it back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    peeking: Mutex<Peeking>,
}

#[derive(Debug, Default)]
struct Peeking {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

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
            peeking: Mutex::default(),
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
        let mut peeking = self.peeking.lock().ok()?;
        let from_source = peeking.by_source.get(&source).copied().unwrap_or(0);
        if peeking.total >= self.bounds.max_peeking
            || from_source >= self.bounds.max_peeking_per_pod
        {
            return None;
        }
        peeking.total += 1;
        peeking.by_source.insert(source, from_source + 1);
        Some(PeekPermit {
            limits: Arc::clone(self),
            source,
        })
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
        if let Ok(mut peeking) = self.limits.peeking.lock() {
            peeking.total = peeking.total.saturating_sub(1);
            if let Some(count) = peeking.by_source.get_mut(&self.source) {
                *count -= 1;
                if *count == 0 {
                    peeking.by_source.remove(&self.source);
                }
            }
        }
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
