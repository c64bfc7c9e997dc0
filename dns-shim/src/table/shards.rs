//! The table split by pod into [`SHARDS`] parts, each behind its own lock, so that a worker
//! recording an answer holds up only the pods of one shard. All of a pod's entries live in its
//! shard: the per-pod limit, `forget_pod` and the rule that no lookup reaches another pod's
//! names each stay within one lock.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use super::keys::PodIp;
use super::names::Names;
use super::order::{NodeId, Order, Route};
use super::{Entry, TableLimits};

/// A power of two, so that picking a shard is a multiply and a shift. With one worker per core,
/// a lookup finds its shard being written about (workers recording at that moment) / `SHARDS`
/// of the time: 32 keeps that rare up to a few dozen cores, while a shard of a full node
/// (110 pods) still holds 3 or 4 pods for the global limit to evict among (module docs of
/// [`super`]). An idle shard costs a few hundred bytes.
pub(super) const SHARDS: usize = 32;

/// See the module docs.
#[derive(Debug)]
pub(super) struct Shards([Shard; SHARDS]);

/// One shard on cache lines of its own (two: the adjacent-line prefetcher fetches them in
/// pairs), so that workers taking neighbouring shards' locks do not bounce a line between cores.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct Shard(RwLock<Inner>);

/// A shard's entries and their eviction order.
#[derive(Debug, Default)]
pub(super) struct Inner {
    /// foldhash rather than SipHash (with the policy name index, a fifth off the decision
    /// benchmark's p99). Keys carry addresses from DNS answers, which a pod's own zone can
    /// choose; foldhash's per-map random seed and the per-pod limit keep that from degrading
    /// the map.
    pub(super) routes: foldhash::HashMap<Route, Names>,
    pub(super) order: Order,
    /// When expired entries were last swept to make room under the global limit.
    pub(super) last_sweep: Option<Instant>,
}

/// The shard of `pod` (see [`PodIp::shard`]).
pub(super) fn shard_index(pod: PodIp) -> usize {
    pod.shard(SHARDS)
}

// === impl Shards ===

impl Shards {
    pub(super) fn new() -> Self {
        Shards(std::array::from_fn(|_| Shard::default()))
    }

    /// The shard that holds `pod`'s entries.
    pub(super) fn of(&self, pod: PodIp) -> &Shard {
        self.at(shard_index(pod))
    }

    /// Shard `index`, taken modulo [`SHARDS`].
    pub(super) fn at(&self, index: usize) -> &Shard {
        &self.0[index % SHARDS]
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Shard> {
        self.0.iter()
    }
}

// === impl Shard ===

impl Shard {
    pub(super) fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic elsewhere while writing leaves indexes that are still memory-safe; serving
        // stale names beats taking the node's egress down.
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Inner ===

impl Inner {
    /// The entry of an ordered node (every node has one).
    pub(super) fn entry(&self, node: NodeId) -> Option<&Entry> {
        let route = self.order.route(node);
        self.routes
            .get(&route)
            .and_then(|entries| entries.iter().find(|e| e.node == node))
    }

    /// Removes the entry of `node` from the routes and the order.
    pub(super) fn remove(&mut self, node: NodeId) {
        let route = self.order.remove(node);
        if let Some(entries) = self.routes.get_mut(&route) {
            entries.retain(|e| e.node != node);
            if entries.is_empty() {
                self.routes.remove(&route);
            }
        }
    }

    /// Drops every entry no longer live at `now`; returns how many.
    pub(super) fn sweep(&mut self, now: Instant, limits: &TableLimits) -> usize {
        let Inner { routes, order, .. } = self;
        let before = order.len();
        routes.retain(|_, entries| {
            entries.retain(|e| {
                let live = e.is_live(now, limits);
                if !live {
                    order.remove(e.node);
                }
                live
            });
            !entries.is_empty()
        });
        before - order.len()
    }
}
