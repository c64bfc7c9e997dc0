//! The table's entries as plain values that outlive the process: exported for the snapshot and
//! the hand-over, restored at start. Monotonic time does not survive a restart, so an entry
//! leaves as the wall-clock time its TTL (or its last use) ends, and comes back against the
//! wall clock of the new process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::keys::{DestIp, PodIp};
use super::order::Route;
use egressgate_policy::DnsName;

use super::shards::shard_index;
use super::{nanos, Entry, NameTable};

/// One entry as data: `pod` resolved `name` (through `cnames`) to `dst`. It is fresh until
/// `fresh_until` and valid for the table's idle grace after that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedName {
    pub pod: PodIp,
    pub dst: DestIp,
    pub name: String,
    pub cnames: Vec<String>,
    pub fresh_until: SystemTime,
}

/// A connection used a record at `at`: its idle grace starts again from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedTouch {
    pub pod: PodIp,
    pub dst: DestIp,
    pub name: String,
    pub at: SystemTime,
}

/// What [`NameTable::restore`] did with a saved entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// Added, or it extended the entry already there.
    Kept,
    /// Its idle grace had passed: dropped.
    Expired,
    /// Its name breaks the one DNS-name rule ([`DnsName`]), so no rule could use it: dropped.
    NotADnsName,
}

/// An entry seen through [`NameTable::export_each`], borrowed from the table.
#[derive(Debug)]
pub struct ExportedName<'a> {
    pub pod: PodIp,
    pub dst: DestIp,
    pub name: &'a DnsName,
    pub cnames: &'a [Arc<str>],
    pub fresh_until: SystemTime,
}

impl NameTable {
    /// Calls `visit` for every live entry, one shard at a time under its read lock (so
    /// recording for that shard's pods waits meanwhile: about 50 ms for a million entries in
    /// all, a 32nd of that per shard). Encode what you need and return.
    pub fn export_each(
        &self,
        now: Instant,
        wall_now: SystemTime,
        mut visit: impl FnMut(ExportedName<'_>),
    ) {
        for shard in self.shards.iter() {
            let inner = shard.read();
            for (route, entries) in &inner.routes {
                for entry in entries.iter().filter(|e| e.is_live(now, &self.limits)) {
                    visit(ExportedName {
                        pod: route.pod,
                        dst: route.dst,
                        name: &entry.name,
                        cnames: entry.cnames.as_deref().unwrap_or_default(),
                        fresh_until: to_wall(entry.fresh_until(), now, wall_now),
                    });
                }
            }
        }
    }

    /// Puts a saved entry back, judged by the wall clock: an entry already there keeps
    /// whichever of the two stays fresh longer. Limits apply as to any record.
    pub fn restore(&self, saved: &SavedName, now: Instant, wall_now: SystemTime) -> Restored {
        let Some((resolved_at, ttl)) = self.since_wall(saved.fresh_until, now, wall_now) else {
            return Restored::Expired;
        };
        // The file is outside input: its names pass the rule again on the way in.
        let Ok(name) = DnsName::parse(&saved.name) else {
            return Restored::NotADnsName;
        };
        let cnames: Option<Arc<[Arc<str>]>> = (!saved.cnames.is_empty())
            .then(|| saved.cnames.iter().map(|c| Arc::from(c.as_str())).collect());
        let fresh_until = resolved_at.checked_add(ttl);
        let route = Route {
            pod: saved.pod,
            dst: saved.dst,
        };
        let home = shard_index(saved.pod);
        let mut guard = self.shards.at(home).write();
        let inner = &mut *guard;
        let before = inner.order.len();
        let entries = inner.routes.entry(route).or_default();
        match entries.find_mut(&name) {
            Some(entry) => {
                if fresh_until > entry.fresh_until() {
                    entry.resolved_at = resolved_at;
                    entry.ttl_ns = nanos(ttl);
                    entry.used_after_ns.store(0, Ordering::Relaxed);
                    entry.cnames = cnames;
                }
            }
            None => entries.push(Entry {
                name: name.clone(),
                cnames,
                resolved_at,
                ttl_ns: nanos(ttl),
                used_after_ns: AtomicU64::new(0),
                node: inner.order.push(route),
            }),
        }
        self.enforce_pod_limit(inner, saved.pod, now);
        self.count(before, inner.order.len());
        if self.over_limit() {
            let kept = inner
                .routes
                .get(&route)
                .is_some_and(|entries| entries.find(&name).is_some());
            self.enforce_table_limit(home, guard, usize::from(kept), now);
        }
        Restored::Kept
    }

    /// Replays a saved use of an entry (only extends one that is there).
    pub fn restore_touch(&self, touch: &SavedTouch, now: Instant, wall_now: SystemTime) {
        let Some((at, _)) = self.since_wall(touch.at, now, wall_now) else {
            return;
        };
        // A name that breaks the rule was never recorded, so it cannot have been used.
        let Ok(name) = DnsName::parse(&touch.name) else {
            return;
        };
        let inner = self.shards.of(touch.pod).read();
        let entry = inner
            .routes
            .get(&Route {
                pod: touch.pod,
                dst: touch.dst,
            })
            .and_then(|entries| entries.find(&name));
        if let Some(entry) = entry {
            if let Some(after) = at.checked_duration_since(entry.resolved_at) {
                entry
                    .used_after_ns
                    .fetch_max(nanos(after), Ordering::Relaxed);
            }
        }
    }

    /// Drops every entry of `pod` (a pod that no longer exists); returns how many.
    pub fn forget_pod(&self, pod: PodIp) -> usize {
        let mut inner = self.shards.of(pod).write();
        let nodes = inner.order.nodes_of(pod);
        for &node in &nodes {
            inner.remove(node);
        }
        self.len.fetch_sub(nodes.len(), Ordering::Relaxed);
        nodes.len()
    }

    /// The pods that have entries.
    pub fn pods(&self) -> Vec<PodIp> {
        let mut pods: Vec<PodIp> = Vec::new();
        for shard in self.shards.iter() {
            pods.extend(shard.read().routes.keys().map(|route| route.pod));
        }
        pods.sort_unstable();
        pods.dedup();
        pods
    }

    /// `(resolved_at, ttl)` for an entry fresh until `fresh_until` on the wall clock; `None`
    /// when its idle grace is over too.
    fn since_wall(
        &self,
        fresh_until: SystemTime,
        now: Instant,
        wall_now: SystemTime,
    ) -> Option<(Instant, Duration)> {
        match fresh_until.duration_since(wall_now) {
            Ok(left) => Some((now, left)),
            Err(past) => {
                let past = past.duration();
                // Resolved in the past, so that it stays valid exactly `idle_grace` after it
                // went stale; a clock too young for that keeps it from now (a little longer).
                (past < self.limits.idle_grace)
                    .then(|| (now.checked_sub(past).unwrap_or(now), Duration::ZERO))
            }
        }
    }
}

impl Entry {
    /// When the TTL or the last use, whichever is later, ends.
    fn fresh_until(&self) -> Option<Instant> {
        let fresh_for = self.ttl_ns.max(self.used_after_ns.load(Ordering::Relaxed));
        self.resolved_at
            .checked_add(Duration::from_nanos(fresh_for))
    }
}

/// The wall-clock time of `at` (monotonic), given that `now` is `wall_now`; beyond the
/// clock's range, the far future.
fn to_wall(at: Option<Instant>, now: Instant, wall_now: SystemTime) -> SystemTime {
    let far = wall_now + Duration::from_secs(100 * 365 * 86_400);
    match at {
        Some(at) if at >= now => wall_now.checked_add(at - now).unwrap_or(far),
        Some(at) => wall_now.checked_sub(now - at).unwrap_or(wall_now),
        None => far,
    }
}
