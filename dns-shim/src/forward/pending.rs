//! The queries waiting for an upstream's answer: each under the upstream socket and the random ID
//! it was sent with, with the address it was sent to and its deadline. Pure bookkeeping; the
//! sockets and the clock belong to the caller (`datagrams`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Names one upstream socket for as long as the process lives (never reused), so an answer on a
/// renewed socket cannot claim a query sent on its predecessor.
pub(crate) type SocketId = u64;

/// One query sent upstream, waiting for its answer.
#[derive(Debug)]
pub(crate) struct Waiting<T> {
    /// What the owner needs to finish (or retry) the query.
    pub(crate) query: T,
    /// The only address an answer may come from.
    pub(crate) upstream: SocketAddr,
    deadline: Instant,
}

/// The waiting queries, by socket and ID, and their deadlines.
#[derive(Debug)]
pub(crate) struct Pending<T> {
    by_key: HashMap<(SocketId, u16), Waiting<T>>,
    /// In sending order. Every attempt gets the same timeout, so deadlines are in order too; an
    /// entry whose query was answered stays until it is popped or compacted away.
    deadlines: VecDeque<(Instant, SocketId, u16)>,
    per_socket: HashMap<SocketId, usize>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            by_key: HashMap::new(),
            deadlines: VecDeque::new(),
            per_socket: HashMap::new(),
        }
    }
}

impl<T> Pending<T> {
    /// Registers `query`, sent at `now` to `upstream` on `socket`, under a fresh random ID (unique
    /// on that socket while it waits), and returns the ID to send it with.
    pub(crate) fn insert(
        &mut self,
        socket: SocketId,
        upstream: SocketAddr,
        now: Instant,
        timeout: Duration,
        query: T,
    ) -> u16 {
        let id = loop {
            let id: u16 = rand::random();
            if !self.by_key.contains_key(&(socket, id)) {
                break id;
            }
        };
        let deadline = now + timeout;
        self.by_key.insert(
            (socket, id),
            Waiting {
                query,
                upstream,
                deadline,
            },
        );
        self.deadlines.push_back((deadline, socket, id));
        *self.per_socket.entry(socket).or_default() += 1;
        id
    }

    /// The query waiting under `id` on `socket`, if a datagram from `from` may answer it: one
    /// for an unknown (or expired) ID, or from another address, answers nothing.
    pub(crate) fn get(&self, socket: SocketId, id: u16, from: SocketAddr) -> Option<&Waiting<T>> {
        self.by_key
            .get(&(socket, id))
            .filter(|waiting| waiting.upstream == from)
    }

    /// Stops waiting for the query under `id` on `socket` (answered, or its send failed).
    pub(crate) fn remove(&mut self, socket: SocketId, id: u16) -> Option<Waiting<T>> {
        let waiting = self.by_key.remove(&(socket, id))?;
        self.forget_one(socket);
        self.compact();
        Some(waiting)
    }

    /// Removes and returns the queries whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Waiting<T>> {
        let mut expired = Vec::new();
        while let Some(&(deadline, socket, id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            // The ID may have been answered, or answered and reused with a later deadline.
            let due = self
                .by_key
                .get(&(socket, id))
                .is_some_and(|waiting| waiting.deadline <= now);
            if due {
                if let Some(waiting) = self.by_key.remove(&(socket, id)) {
                    self.forget_one(socket);
                    expired.push(waiting);
                }
            }
        }
        expired
    }

    /// Removes and returns every query waiting on `socket` (which failed).
    pub(crate) fn fail_socket(&mut self, socket: SocketId) -> Vec<Waiting<T>> {
        let keys: Vec<_> = self
            .by_key
            .keys()
            .filter(|(s, _)| *s == socket)
            .copied()
            .collect();
        self.per_socket.remove(&socket);
        let failed = keys
            .into_iter()
            .filter_map(|key| self.by_key.remove(&key))
            .collect();
        self.compact();
        failed
    }

    /// When [`Pending::expire`] should next be called (possibly early: for an answered query).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|&(deadline, _, _)| deadline)
    }

    /// Queries waiting on `socket`.
    pub(crate) fn on_socket(&self, socket: SocketId) -> usize {
        self.per_socket.get(&socket).copied().unwrap_or(0)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    fn forget_one(&mut self, socket: SocketId) {
        if let Some(count) = self.per_socket.get_mut(&socket) {
            *count -= 1;
            if *count == 0 {
                self.per_socket.remove(&socket);
            }
        }
    }

    /// Drops the deadlines of answered queries once they outnumber the waiting ones, so that a
    /// busy shim does not keep a timeout's worth of them (amortized: each is dropped once).
    fn compact(&mut self) {
        if self.deadlines.len() <= 2 * self.by_key.len() + 64 {
            return;
        }
        let by_key = &self.by_key;
        self.deadlines.retain(|&(deadline, socket, id)| {
            by_key
                .get(&(socket, id))
                .is_some_and(|waiting| waiting.deadline == deadline)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    fn upstream() -> SocketAddr {
        "198.18.0.53:53".parse().expect("addr")
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_expires_at_its_deadline_not_before() {
        let mut pending = Pending::default();
        let id = pending.insert(1, upstream(), Instant::now(), TIMEOUT, "q");
        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        assert!(pending.expire(Instant::now()).is_empty());
        assert!(pending.get(1, id, upstream()).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        let expired = pending.expire(Instant::now());
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].query, "q");
        assert_eq!(pending.len(), 0);
        assert_eq!(pending.on_socket(1), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_for_an_expired_id_answers_nothing() {
        let mut pending = Pending::default();
        let id = pending.insert(1, upstream(), Instant::now(), TIMEOUT, ());
        tokio::time::advance(TIMEOUT).await;
        assert_eq!(pending.expire(Instant::now()).len(), 1);
        assert!(pending.get(1, id, upstream()).is_none());
        assert!(pending.remove(1, id).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_for_an_unknown_id_or_another_socket_answers_nothing() {
        let mut pending = Pending::default();
        let id = pending.insert(1, upstream(), Instant::now(), TIMEOUT, ());
        assert!(pending.get(1, id.wrapping_add(1), upstream()).is_none());
        assert!(pending.get(2, id, upstream()).is_none());
        assert!(pending.get(1, id, upstream()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_from_another_server_answers_nothing() {
        let mut pending = Pending::default();
        let id = pending.insert(1, upstream(), Instant::now(), TIMEOUT, ());
        let forger: SocketAddr = "198.18.0.66:53".parse().expect("addr");
        let other_port: SocketAddr = "198.18.0.53:5353".parse().expect("addr");
        assert!(pending.get(1, id, forger).is_none());
        assert!(pending.get(1, id, other_port).is_none());
        assert_eq!(
            pending.len(),
            1,
            "the query still waits for the real answer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_query_does_not_expire() {
        let mut pending = Pending::default();
        let id = pending.insert(1, upstream(), Instant::now(), TIMEOUT, ());
        assert!(pending.remove(1, id).is_some());
        tokio::time::advance(TIMEOUT).await;
        assert!(pending.expire(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn ids_are_unique_per_socket_while_waiting() {
        let mut pending = Pending::default();
        let ids: std::collections::BTreeSet<u16> = (0..2000)
            .map(|_| pending.insert(1, upstream(), Instant::now(), TIMEOUT, ()))
            .collect();
        assert_eq!(ids.len(), 2000);
        assert_eq!(pending.on_socket(1), 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_socket_releases_only_its_queries() {
        let mut pending = Pending::default();
        pending.insert(1, upstream(), Instant::now(), TIMEOUT, "a");
        pending.insert(2, upstream(), Instant::now(), TIMEOUT, "b");
        pending.insert(1, upstream(), Instant::now(), TIMEOUT, "c");
        let mut failed: Vec<_> = pending
            .fail_socket(1)
            .into_iter()
            .map(|w| w.query)
            .collect();
        failed.sort();
        assert_eq!(failed, ["a", "c"]);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending.on_socket(1), 0);
        tokio::time::advance(TIMEOUT).await;
        let expired: Vec<_> = pending
            .expire(Instant::now())
            .into_iter()
            .map(|w| w.query)
            .collect();
        assert_eq!(expired, ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn answered_deadlines_do_not_pile_up() {
        let mut pending = Pending::default();
        for _ in 0..10_000 {
            let id = pending.insert(1, upstream(), Instant::now(), TIMEOUT, ());
            pending.remove(1, id);
        }
        assert!(pending.deadlines.len() <= 64 + 1);
    }
}
