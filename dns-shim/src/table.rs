//! The per-pod name table: which names a pod resolved to which address, recorded before the pod
//! sees the answer, read by the gateway for every new connection.
//!
//! Design: one `RwLock` over a map keyed by (pod, destination address) whose slot holds the
//! entries themselves, with room inline for one entry (most addresses carry one name) and, in
//! the entry, for a name of up to [`DnsName::INLINE`] bytes (most names). In a table of a million
//! names every probe misses the cache, so a lookup costs what it touches: the hash probe and
//! that slot. [`NameTable::lookup_each`] lends the names out under the read lock, so the hot
//! path neither allocates nor touches a reference count. `touch` renews an entry through an
//! atomic under the read lock; only `record` and `purge_expired` write. Oldest-first eviction follows [`order`]: linked
//! lists in a slab, O(1) to keep in order and to pick a victim from.
//!
//! An entry is keyed by (pod, destination address, name); its count is what the limits and the
//! `len` gauge measure. A pod's entries live under that pod's key only, so no lookup can reach
//! another pod's names.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use egressgate_policy::DnsName;
use prometheus::IntCounter;

use crate::answer::Answer;
use names::Names;
use order::{NodeId, Order, Route};

mod keys;
mod names;
mod order;
mod saved;

pub use keys::{DestIp, PodIp};
pub use saved::{ExportedName, Restored, SavedName, SavedTouch};

/// How long entries live and how many there may be.
#[derive(Debug, Clone)]
pub struct TableLimits {
    /// Answers with a lower TTL (0 included) are kept at least this long.
    pub min_ttl: Duration,
    /// After the TTL (or the last allowed connection), the entry stays valid this long: a client
    /// may connect a little after its cache expired, or reuse the address for a while.
    pub idle_grace: Duration,
    pub max_names_per_pod: usize,
    pub max_names: usize,
}

/// A live name a pod resolved to some address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedName {
    pub name: DnsName,
    /// The CNAME targets between `name` and the address, in order.
    pub cnames: Arc<[Arc<str>]>,
}

/// One live record and the time it has left, from [`NameTable::lifetimes_each`].
#[derive(Debug, Clone, Copy)]
pub struct RecordLife<'a> {
    pub name: &'a DnsName,
    pub cnames: &'a [Arc<str>],
    /// Until its TTL (or its last use by an allowed connection) ends.
    pub fresh_left: Duration,
    /// Until it stops counting: `fresh_left` plus the idle grace.
    pub live_left: Duration,
}

/// See the module docs.
#[derive(Debug)]
pub struct NameTable {
    limits: TableLimits,
    inner: RwLock<Inner>,
    len: AtomicUsize,
    evictions: IntCounter,
    /// Uses of entries not yet saved, when the table is persisted ([`NameTable::log_touches`]).
    touches: Option<Mutex<Vec<Touched>>>,
}

/// A use of an entry by an allowed connection, waiting to be saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    pub pod: PodIp,
    pub dst: DestIp,
    pub name: DnsName,
    pub at: Instant,
}

/// Uses kept between two saves; past this (a burst of connections faster than the journal's
/// flush), later ones are not saved: a lost use only shortens an entry's life after a crash.
const MAX_UNSAVED_TOUCHES: usize = 65_536;

/// A use is saved only when it moves the entry's last use into a later step of this length (the
/// first use always): a busy name's connections then cost the hot path one lock and allocation
/// per second rather than one each, and a restart restores the last use at most this much early
/// (a slightly shorter idle grace).
const TOUCH_SAVE_STEP_NS: u64 = 1_000_000_000;

#[derive(Debug, Default)]
struct Inner {
    /// foldhash rather than SipHash (with the policy name index, a fifth off the decision
    /// benchmark's p99). Keys carry addresses from DNS answers, which a pod's own zone can
    /// choose; foldhash's per-map random seed and the per-pod limit keep that from degrading
    /// the map.
    routes: foldhash::HashMap<Route, Names>,
    order: Order,
    /// When expired entries were last swept to make room under the global limit.
    last_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    /// Inline when short (most names), else shared by the entries of one answer.
    name: DnsName,
    /// `None` when there are none: most answers, and no allocation for them.
    cnames: Option<Arc<[Arc<str>]>>,
    resolved_at: Instant,
    /// The TTL, already raised to `min_ttl`, in nanoseconds.
    ttl_ns: u64,
    /// Last `touch`, as nanoseconds after `resolved_at` (0: never). An atomic so that `touch`
    /// runs under the read lock.
    used_after_ns: AtomicU64,
    /// Its place in the eviction order.
    node: NodeId,
}

/// Sweeping the whole table for expired entries when it is full is O(n); once a second is
/// enough, since entries only expire as time passes. In between, the oldest are evicted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// `max_names` is clamped to this: the order's node ids are 32 bits.
const MAX_ENTRIES: usize = 1 << 31;

// === impl NameTable ===

impl NameTable {
    pub fn new(mut limits: TableLimits) -> Self {
        limits.max_names = limits.max_names.min(MAX_ENTRIES);
        // The name and help are fixed, so this cannot fail; the shim registers a clone.
        let evictions = IntCounter::new(
            "egressgate_dns_table_evictions_total",
            "Name table entries evicted because a per-pod or global limit was reached",
        )
        .unwrap_or_else(|_| unreachable!("static metric options are valid"));
        NameTable {
            limits,
            inner: RwLock::new(Inner::default()),
            len: AtomicUsize::new(0),
            evictions,
            touches: None,
        }
    }

    /// Keeps each [`touch`](Self::touch) that found an entry until
    /// [`take_touches`](Self::take_touches), for a journal to save.
    pub fn log_touches(mut self) -> Self {
        self.touches = Some(Mutex::new(Vec::new()));
        self
    }

    /// The uses logged since the last call.
    pub fn take_touches(&self) -> Vec<Touched> {
        self.touches.as_ref().map_or_else(Vec::new, |touches| {
            std::mem::take(&mut *touches.lock().unwrap_or_else(PoisonError::into_inner))
        })
    }

    /// Records (or refreshes) one entry per address of `answer` for `pod`. Returns the TTL the
    /// entries got (raised to `min_ttl`).
    pub fn record(&self, pod: PodIp, answer: &Answer, now: Instant) -> Duration {
        let ttl = Duration::from_secs(u64::from(answer.ttl)).max(self.limits.min_ttl);
        if answer.addresses.is_empty() {
            return ttl;
        }
        let name = &answer.name;
        let cnames: Option<Arc<[Arc<str>]>> = (!answer.cnames.is_empty()).then(|| {
            answer
                .cnames
                .iter()
                .map(|c| Arc::from(c.as_str()))
                .collect()
        });

        let mut guard = self.write();
        let inner = &mut *guard;
        for &dst in &answer.addresses {
            let route = Route {
                pod,
                dst: DestIp(dst),
            };
            let entries = inner.routes.entry(route).or_default();
            match entries.find_mut(name) {
                Some(entry) => {
                    // Re-resolving refreshes: new TTL from now, and the entry is the newest.
                    let last_used = entry.last_used();
                    entry.resolved_at = now;
                    entry.ttl_ns = nanos(ttl);
                    entry.cnames = cnames.clone();
                    let used = last_used.map_or(0, |t| nanos(t.saturating_duration_since(now)));
                    entry.used_after_ns.store(used, Ordering::Relaxed);
                    inner.order.renew(entry.node);
                }
                None => entries.push(Entry {
                    name: name.clone(),
                    cnames: cnames.clone(),
                    resolved_at: now,
                    ttl_ns: nanos(ttl),
                    used_after_ns: AtomicU64::new(0),
                    node: inner.order.push(route),
                }),
            }
        }
        self.enforce_limits(inner, pod, now);
        self.len.store(inner.order.len(), Ordering::Relaxed);
        ttl
    }

    /// Calls `visit(name, cnames)` for each live name this pod resolved to `dst`
    /// (deduplicated), with its CNAME chain. It runs under the read lock: copy out what you
    /// need and return.
    pub fn lookup_each(
        &self,
        pod: PodIp,
        dst: DestIp,
        now: Instant,
        mut visit: impl FnMut(&DnsName, &[Arc<str>]),
    ) {
        let inner = self.read();
        let Some(entries) = inner.routes.get(&Route { pod, dst }) else {
            return;
        };
        for entry in entries.iter().filter(|e| e.is_live(now, &self.limits)) {
            visit(&entry.name, entry.cnames.as_deref().unwrap_or_default());
        }
    }

    /// Like [`lookup_each`](Self::lookup_each), with how long each record has left: for
    /// `egressgate explain`, which shows an operator why a name does or does not count.
    pub fn lifetimes_each(
        &self,
        pod: PodIp,
        dst: DestIp,
        now: Instant,
        mut visit: impl FnMut(RecordLife<'_>),
    ) {
        let inner = self.read();
        let Some(entries) = inner.routes.get(&Route { pod, dst }) else {
            return;
        };
        for entry in entries.iter().filter(|e| e.is_live(now, &self.limits)) {
            let fresh_for = Duration::from_nanos(
                entry
                    .ttl_ns
                    .max(entry.used_after_ns.load(Ordering::Relaxed)),
            );
            let fresh_until = entry.resolved_at.checked_add(fresh_for);
            let fresh_left =
                fresh_until.map_or(Duration::MAX, |until| until.saturating_duration_since(now));
            let live_left = fresh_until
                .and_then(|until| until.checked_add(self.limits.idle_grace))
                .map_or(Duration::MAX, |until| until.saturating_duration_since(now));
            visit(RecordLife {
                name: &entry.name,
                cnames: entry.cnames.as_deref().unwrap_or_default(),
                fresh_left,
                live_left,
            });
        }
    }

    /// Like [`lookup_each`](Self::lookup_each) for at most `max` live names, and returns how
    /// many names this pod holds for `dst` (expired ones not yet purged included). What a
    /// connection carries stays bounded however many names share the address.
    pub fn lookup_some(
        &self,
        pod: PodIp,
        dst: DestIp,
        now: Instant,
        max: usize,
        mut visit: impl FnMut(&DnsName, &[Arc<str>]),
    ) -> usize {
        let inner = self.read();
        let Some(entries) = inner.routes.get(&Route { pod, dst }) else {
            return 0;
        };
        let live = entries.iter().filter(|e| e.is_live(now, &self.limits));
        for entry in live.take(max) {
            visit(&entry.name, entry.cnames.as_deref().unwrap_or_default());
        }
        entries.len()
    }

    /// Whether `pod` resolved `name` to `dst` and the record is live: one hash probe for the
    /// route, one for the name.
    pub fn is_resolved(&self, pod: PodIp, dst: DestIp, name: &DnsName, now: Instant) -> bool {
        let inner = self.read();
        inner
            .routes
            .get(&Route { pod, dst })
            .and_then(|entries| entries.find(name))
            .is_some_and(|entry| entry.is_live(now, &self.limits))
    }

    /// [`lookup_each`](Self::lookup_each), collected.
    pub fn lookup(&self, pod: PodIp, dst: DestIp, now: Instant) -> Vec<ResolvedName> {
        let mut found = Vec::new();
        self.lookup_each(pod, dst, now, |name, cnames| {
            found.push(ResolvedName {
                name: name.clone(),
                cnames: Arc::from(cnames),
            });
        });
        found
    }

    /// A connection was allowed through this record: extends its idle grace. False when the
    /// pod holds no live record of the name (nothing is extended).
    pub fn touch(&self, pod: PodIp, dst: DestIp, name: &DnsName, now: Instant) -> bool {
        let inner = self.read();
        let entry = inner
            .routes
            .get(&Route { pod, dst })
            .and_then(|entries| entries.find(name))
            .filter(|entry| entry.is_live(now, &self.limits));
        let Some(entry) = entry else {
            return false;
        };
        let after = nanos(now.saturating_duration_since(entry.resolved_at));
        let before = entry.used_after_ns.fetch_max(after, Ordering::Relaxed);
        drop(inner);
        if before == 0 || after / TOUCH_SAVE_STEP_NS > before / TOUCH_SAVE_STEP_NS {
            self.log_touch(pod, dst, name, now);
        }
        true
    }

    fn log_touch(&self, pod: PodIp, dst: DestIp, name: &DnsName, at: Instant) {
        let Some(touches) = &self.touches else {
            return;
        };
        let mut touches = touches.lock().unwrap_or_else(PoisonError::into_inner);
        if touches.len() < MAX_UNSAVED_TOUCHES {
            touches.push(Touched {
                pod,
                dst,
                name: name.clone(),
                at,
            });
        }
    }

    /// Drops every entry no longer live at `now`; returns how many.
    pub fn purge_expired(&self, now: Instant) -> usize {
        let mut inner = self.write();
        let removed = self.sweep(&mut inner, now);
        self.len.store(inner.order.len(), Ordering::Relaxed);
        removed
    }

    /// Entries (pod, address, name) currently held, live or not yet purged.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted by the limits so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.get()
    }

    /// The eviction counter, for the shim to register (`egressgate_dns_table_evictions_total`).
    pub(crate) fn evictions_counter(&self) -> &IntCounter {
        &self.evictions
    }

    /// Over a limit, expired entries go first (not counted as evictions), then the oldest.
    fn enforce_limits(&self, inner: &mut Inner, pod: PodIp, now: Instant) {
        if inner.order.len_of(pod) > self.limits.max_names_per_pod {
            for node in inner.order.nodes_of(pod) {
                if !inner
                    .entry(node)
                    .is_some_and(|e| e.is_live(now, &self.limits))
                {
                    inner.remove(node);
                }
            }
            while inner.order.len_of(pod) > self.limits.max_names_per_pod {
                let Some(node) = inner.order.oldest_of(pod) else {
                    break;
                };
                inner.remove(node);
                self.evictions.inc();
            }
        }
        if inner.order.len() > self.limits.max_names {
            if inner
                .last_sweep
                .is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_INTERVAL)
            {
                self.sweep(inner, now);
                inner.last_sweep = Some(now);
            }
            while inner.order.len() > self.limits.max_names {
                let Some(node) = inner.order.oldest() else {
                    break;
                };
                inner.remove(node);
                self.evictions.inc();
            }
        }
    }

    /// Drops every expired entry; returns how many.
    fn sweep(&self, inner: &mut Inner, now: Instant) -> usize {
        let Inner { routes, order, .. } = inner;
        let before = order.len();
        routes.retain(|_, entries| {
            entries.retain(|e| {
                let live = e.is_live(now, &self.limits);
                if !live {
                    order.remove(e.node);
                }
                live
            });
            !entries.is_empty()
        });
        before - order.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic elsewhere while writing leaves indexes that are still memory-safe; serving
        // stale names beats taking the node's egress down.
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Inner ===

impl Inner {
    /// The entry of an ordered node (every node has one).
    fn entry(&self, node: NodeId) -> Option<&Entry> {
        let route = self.order.route(node);
        self.routes
            .get(&route)
            .and_then(|entries| entries.iter().find(|e| e.node == node))
    }

    /// Removes the entry of `node` from the routes and the order.
    fn remove(&mut self, node: NodeId) {
        let route = self.order.remove(node);
        if let Some(entries) = self.routes.get_mut(&route) {
            entries.retain(|e| e.node != node);
            if entries.is_empty() {
                self.routes.remove(&route);
            }
        }
    }
}

// === impl Entry ===

impl Entry {
    fn last_used(&self) -> Option<Instant> {
        match self.used_after_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => self.resolved_at.checked_add(Duration::from_nanos(ns)),
        }
    }

    /// `now < max(resolved_at + ttl, last_used) + idle_grace`.
    fn is_live(&self, now: Instant, limits: &TableLimits) -> bool {
        let fresh_for = self.ttl_ns.max(self.used_after_ns.load(Ordering::Relaxed));
        let valid_for = Duration::from_nanos(fresh_for).saturating_add(limits.idle_grace);
        match self.resolved_at.checked_add(valid_for) {
            Some(expires) => now < expires,
            None => true, // beyond the clock's range: never expires in practice
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
