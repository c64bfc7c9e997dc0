//! The per-pod name table: which names a pod resolved to which address, recorded before the pod
//! sees the answer, read by the gateway for every new connection.
//!
//! Design: one `RwLock` over `HashMap<pod, Pod>`, each pod holding `HashMap<dst, Vec<Entry>>`.
//! The hot path (`lookup`, and `touch` for every allowed connection) takes only the read lock:
//! a lookup is two hash probes and a scan of the few names sharing one address, and `touch`
//! renews an entry through an atomic. Only `record` and `purge_expired` write. Oldest-first
//! eviction uses a sequence number per entry, indexed in a `BTreeMap` per pod and one for the
//! whole table, so picking a victim never scans.
//!
//! An entry is keyed by (pod, destination address, name); its count is what the limits and the
//! `len` gauge measure. A pod's entries live under that pod's key only, so no lookup can reach
//! another pod's names.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::answer::Answer;

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
    pub name: Arc<str>,
    /// The CNAME targets between `name` and the address, in order.
    pub cnames: Arc<[Arc<str>]>,
}

/// See the module docs.
#[derive(Debug)]
pub struct NameTable {
    limits: TableLimits,
    inner: RwLock<Inner>,
    len: AtomicUsize,
    evictions: IntCounter,
}

#[derive(Debug, Default)]
struct Inner {
    pods: HashMap<IpAddr, Pod>,
    /// Every entry by sequence number: the global oldest-first order.
    order: BTreeMap<u64, (IpAddr, IpAddr, Arc<str>)>,
    next_seq: u64,
}

#[derive(Debug, Default)]
struct Pod {
    by_dst: HashMap<IpAddr, Vec<Entry>>,
    /// This pod's entries by sequence number.
    order: BTreeMap<u64, (IpAddr, Arc<str>)>,
}

#[derive(Debug)]
struct Entry {
    name: Arc<str>,
    cnames: Arc<[Arc<str>]>,
    resolved_at: Instant,
    /// The TTL, already raised to `min_ttl`.
    ttl: Duration,
    /// Last `touch`, as nanoseconds after `resolved_at` (0: never). An atomic so that `touch`
    /// runs under the read lock.
    used_after_ns: AtomicU64,
    seq: u64,
}

// === impl NameTable ===

impl NameTable {
    pub fn new(limits: TableLimits) -> Self {
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
        }
    }

    /// Records (or refreshes) one entry per address of `answer` for `pod`.
    pub fn record(&self, pod: IpAddr, answer: &Answer, now: Instant) {
        if answer.addresses.is_empty() {
            return;
        }
        let name: Arc<str> = Arc::from(normalize(&answer.name));
        let cnames: Arc<[Arc<str>]> = answer
            .cnames
            .iter()
            .map(|c| Arc::from(normalize(c)))
            .collect();
        let ttl = Duration::from_secs(u64::from(answer.ttl)).max(self.limits.min_ttl);

        let mut guard = self.write();
        let inner = &mut *guard;
        for dst in &answer.addresses {
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let pod_entry = inner.pods.entry(pod).or_default();
            let entries = pod_entry.by_dst.entry(*dst).or_default();
            match entries.iter_mut().find(|e| e.name == name) {
                Some(entry) => {
                    // Re-resolving refreshes: new TTL from now, the last touch is kept.
                    let last_used = entry.last_used();
                    pod_entry.order.remove(&entry.seq);
                    inner.order.remove(&entry.seq);
                    entry.resolved_at = now;
                    entry.ttl = ttl;
                    entry.cnames = cnames.clone();
                    entry.seq = seq;
                    let used = last_used.map_or(0, |t| nanos(t.saturating_duration_since(now)));
                    entry.used_after_ns.store(used, Ordering::Relaxed);
                }
                None => {
                    entries.push(Entry {
                        name: name.clone(),
                        cnames: cnames.clone(),
                        resolved_at: now,
                        ttl,
                        used_after_ns: AtomicU64::new(0),
                        seq,
                    });
                    self.len.fetch_add(1, Ordering::Relaxed);
                }
            }
            pod_entry.order.insert(seq, (*dst, name.clone()));
            inner.order.insert(seq, (pod, *dst, name.clone()));
        }
        self.enforce_limits(inner, pod, now);
    }

    /// Live names this pod resolved to `dst` (deduplicated), with their CNAME chains.
    pub fn lookup(&self, pod: IpAddr, dst: IpAddr, now: Instant) -> Vec<ResolvedName> {
        let inner = self.read();
        let Some(entries) = inner.pods.get(&pod).and_then(|p| p.by_dst.get(&dst)) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter(|e| e.is_live(now, &self.limits))
            .map(|e| ResolvedName {
                name: e.name.clone(),
                cnames: e.cnames.clone(),
            })
            .collect()
    }

    /// A connection was allowed through this record: extends its idle grace.
    pub fn touch(&self, pod: IpAddr, dst: IpAddr, name: &str, now: Instant) {
        let inner = self.read();
        let entry = inner
            .pods
            .get(&pod)
            .and_then(|p| p.by_dst.get(&dst))
            .and_then(|entries| entries.iter().find(|e| &*e.name == name));
        if let Some(entry) = entry {
            let after = nanos(now.saturating_duration_since(entry.resolved_at));
            entry.used_after_ns.fetch_max(after, Ordering::Relaxed);
        }
    }

    /// Drops every entry no longer live at `now`; returns how many.
    pub fn purge_expired(&self, now: Instant) -> usize {
        let mut inner = self.write();
        let Inner { pods, order, .. } = &mut *inner;
        let mut removed = 0;
        pods.retain(|_, pod| {
            let Pod {
                by_dst,
                order: pod_order,
            } = pod;
            by_dst.retain(|_, entries| {
                entries.retain(|e| {
                    if e.is_live(now, &self.limits) {
                        return true;
                    }
                    pod_order.remove(&e.seq);
                    order.remove(&e.seq);
                    removed += 1;
                    false
                });
                !entries.is_empty()
            });
            !by_dst.is_empty()
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
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
    fn enforce_limits(&self, inner: &mut Inner, pod: IpAddr, now: Instant) {
        let pod_len = |inner: &Inner| inner.pods.get(&pod).map_or(0, |p| p.order.len());
        if pod_len(inner) > self.limits.max_names_per_pod {
            self.drop_expired_of(inner, pod, now);
            while pod_len(inner) > self.limits.max_names_per_pod {
                let Some((&seq, _)) = inner.pods.get(&pod).and_then(|p| p.order.first_key_value())
                else {
                    break;
                };
                self.remove(inner, seq);
                self.evictions.inc();
            }
        }
        if inner.order.len() > self.limits.max_names {
            let expired: Vec<IpAddr> = inner.pods.keys().copied().collect();
            for p in expired {
                self.drop_expired_of(inner, p, now);
            }
            while inner.order.len() > self.limits.max_names {
                let Some((&seq, _)) = inner.order.first_key_value() else {
                    break;
                };
                self.remove(inner, seq);
                self.evictions.inc();
            }
        }
    }

    fn drop_expired_of(&self, inner: &mut Inner, pod: IpAddr, now: Instant) {
        let Some(p) = inner.pods.get(&pod) else {
            return;
        };
        let dead: Vec<u64> = p
            .by_dst
            .values()
            .flatten()
            .filter(|e| !e.is_live(now, &self.limits))
            .map(|e| e.seq)
            .collect();
        for seq in dead {
            self.remove(inner, seq);
        }
    }

    /// Removes the entry with sequence number `seq` from every index.
    fn remove(&self, inner: &mut Inner, seq: u64) {
        let Some((pod, dst, _)) = inner.order.remove(&seq) else {
            return;
        };
        let Some(p) = inner.pods.get_mut(&pod) else {
            return;
        };
        p.order.remove(&seq);
        if let Some(entries) = p.by_dst.get_mut(&dst) {
            let before = entries.len();
            entries.retain(|e| e.seq != seq);
            self.len
                .fetch_sub(before - entries.len(), Ordering::Relaxed);
            if entries.is_empty() {
                p.by_dst.remove(&dst);
            }
        }
        if p.by_dst.is_empty() {
            inner.pods.remove(&pod);
        }
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
        let used = Duration::from_nanos(self.used_after_ns.load(Ordering::Relaxed));
        let valid_for = self.ttl.max(used).saturating_add(limits.idle_grace);
        match self.resolved_at.checked_add(valid_for) {
            Some(expires) => now < expires,
            None => true, // beyond the clock's range: never expires in practice
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn normalize(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

#[cfg(test)]
mod tests;
