//! The per-pod name table: which names a pod resolved to which address, recorded before the pod
//! sees the answer, read by the gateway for every new connection.
//!
//! Design: the table is split by pod into [`shards`] (32), each one `RwLock` over a map keyed by
//! (pod, destination address), so that workers recording answers for some pods do not hold up
//! lookups and records of the others. A map slot holds the entries themselves, with room inline
//! for one entry (most addresses carry one name) and, in the entry, for a name of up to
//! [`DnsName::INLINE`] bytes (most names). In a table of a million names every probe misses the
//! cache, so a lookup costs what it touches: a multiply to pick the shard, the hash probe and
//! that slot. [`NameTable::lookup_each`] lends the names out under the shard's read lock, so the
//! hot path neither allocates nor touches a reference count. `touch` renews an entry through an
//! atomic under the read lock; only `record`, `restore`, `forget_pod` and `purge_expired`
//! write. Oldest-first eviction follows each shard's [`order`]: linked lists in a slab, O(1) to
//! keep in order and to pick a victim from.
//!
//! An entry is keyed by (pod, destination address, name); its count is what the limits and the
//! `len` gauge measure. A pod's entries live under that pod's key only, all in one shard, so no
//! lookup can reach another pod's names.
//!
//! Limits, when a record goes over them (expired entries go first and are not evictions):
//! - `max_names_per_pod`: the pod's own oldest entries go.
//! - `max_names`, the table's exact total: oldest first *within the shard of the pod recording*.
//!   That shard's expired entries are swept (at most once a second), then its oldest entries
//!   go, whichever pods they belong to, but never the ones this record just wrote. If the shard
//!   holds nothing else, the next shards in turn give up their oldest; only when the table holds
//!   nothing but this record (an answer larger than the limit) does it lose its own oldest. So a
//!   full table evicts among the few pods sharing the recorder's shard rather than the oldest
//!   entries on the node. Each step holds one shard's lock at a time, so two workers never wait
//!   on each other in a cycle; workers recording at the same moment may each go over the limit
//!   by their answer until they have evicted, and at rest the table holds at most `max_names`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLockWriteGuard};
use std::time::{Duration, Instant};

use egressgate_policy::DnsName;
use prometheus::IntCounter;

use crate::answer::Answer;
use order::{NodeId, Route};
use shards::{shard_index, Inner, Shards, SHARDS};

mod keys;
mod names;
mod order;
mod saved;
mod shards;

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
    shards: Shards,
    /// Entries in all shards: each shard adds what it gains and takes off what it loses under
    /// its own lock, so the count is exact whenever no record is half-done.
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

/// Sweeping a shard for expired entries when the table is full is O(n); once a second per shard
/// is enough, since entries only expire as time passes. In between, the oldest are evicted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// `max_names` is clamped to this: each shard's order has 32-bit node ids, and no shard holds
/// more than the whole table (plus what workers recording at once add before they evict).
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
            shards: Shards::new(),
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

        let home = shard_index(pod);
        let mut guard = self.shards.at(home).write();
        let inner = &mut *guard;
        let before = inner.order.len();
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
        self.enforce_pod_limit(inner, pod, now);
        self.count(before, inner.order.len());
        if self.over_limit() {
            let kept = kept_of_answer(inner, pod, &answer.addresses, name);
            self.enforce_table_limit(home, guard, kept, now);
        }
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
        let inner = self.shards.of(pod).read();
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
        let inner = self.shards.of(pod).read();
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
        let inner = self.shards.of(pod).read();
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
        let inner = self.shards.of(pod).read();
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
        let inner = self.shards.of(pod).read();
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

    /// Drops every entry no longer live at `now`; returns how many. Shard by shard, so
    /// recording waits for at most one shard's sweep.
    pub fn purge_expired(&self, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut inner = shard.write();
            let swept = inner.sweep(now, &self.limits);
            self.len.fetch_sub(swept, Ordering::Relaxed);
            removed += swept;
        }
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

    /// Over the per-pod limit, the pod's expired entries go first (not counted as evictions),
    /// then its oldest.
    fn enforce_pod_limit(&self, inner: &mut Inner, pod: PodIp, now: Instant) {
        if inner.order.len_of(pod) <= self.limits.max_names_per_pod {
            return;
        }
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

    /// Over the table's limit: the steps in the module docs. `home` is the recording pod's shard,
    /// still locked, whose newest `kept` entries are the record's own. One shard is locked at a
    /// time, and each is visited once, so this ends even while other workers record.
    fn enforce_table_limit(
        &self,
        home: usize,
        mut inner: RwLockWriteGuard<'_, Inner>,
        kept: usize,
        now: Instant,
    ) {
        self.sweep_if_due(&mut inner, now);
        while self.over_limit() && inner.order.len() > kept {
            self.evict_oldest(&mut inner);
        }
        drop(inner);
        for step in 1..SHARDS {
            if !self.over_limit() {
                return;
            }
            let mut inner = self.shards.at(home + step).write();
            self.sweep_if_due(&mut inner, now);
            while self.over_limit() && self.evict_oldest(&mut inner) {}
        }
        if self.over_limit() {
            // Nothing else is left: the answer alone is larger than the limit.
            let mut inner = self.shards.at(home).write();
            while self.over_limit() && self.evict_oldest(&mut inner) {}
        }
    }

    fn over_limit(&self) -> bool {
        self.len() > self.limits.max_names
    }

    /// Drops the shard's expired entries, at most once per [`SWEEP_INTERVAL`].
    fn sweep_if_due(&self, inner: &mut Inner, now: Instant) {
        let due = inner
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_INTERVAL);
        if due {
            let swept = inner.sweep(now, &self.limits);
            self.len.fetch_sub(swept, Ordering::Relaxed);
            inner.last_sweep = Some(now);
        }
    }

    /// Evicts the shard's oldest entry; false when it has none.
    fn evict_oldest(&self, inner: &mut Inner) -> bool {
        let Some(node) = inner.order.oldest() else {
            return false;
        };
        inner.remove(node);
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.evictions.inc();
        true
    }

    /// Moves the total by what a shard went from `before` to `after`, under that shard's lock.
    /// Nothing when they are equal (a refresh, the common record): an atomic add would still
    /// take the shared line exclusive.
    fn count(&self, before: usize, after: usize) {
        match after.cmp(&before) {
            std::cmp::Ordering::Greater => {
                self.len.fetch_add(after - before, Ordering::Relaxed);
            }
            std::cmp::Ordering::Less => {
                self.len.fetch_sub(before - after, Ordering::Relaxed);
            }
            std::cmp::Ordering::Equal => {}
        }
    }
}

/// How many entries of `pod`'s answer for `name` (one per distinct address) the shard holds:
/// the newest of its order, since recording made each the newest and nothing since added any.
/// Sorted to drop repeats: an answer may carry thousands of addresses.
fn kept_of_answer(inner: &Inner, pod: PodIp, addresses: &[IpAddr], name: &DnsName) -> usize {
    let mut distinct = addresses.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    distinct
        .into_iter()
        .filter(|&dst| {
            inner
                .routes
                .get(&Route {
                    pod,
                    dst: DestIp(dst),
                })
                .is_some_and(|entries| entries.find(name).is_some())
        })
        .count()
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
