use std::net::Ipv4Addr;

use super::*;

use std::net::IpAddr;

const POD_A: PodIp = PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2)));
const POD_B: PodIp = PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 3)));
const DST: DestIp = DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)));
const DST2: DestIp = DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 11)));

fn limits() -> TableLimits {
    TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: 100,
        max_names: 1000,
    }
}

fn answer(name: &str, addresses: &[DestIp], ttl: u32) -> Answer {
    Answer {
        name: dns_name(name),
        addresses: addresses.iter().map(|dst| dst.0).collect(),
        cnames: vec!["lb.cdn.example.test".to_owned()],
        ttl,
    }
}

fn names(found: &[ResolvedName]) -> Vec<&str> {
    let mut v: Vec<&str> = found.iter().map(|r| &*r.name).collect();
    v.sort_unstable();
    v
}

fn dns_name(name: &str) -> DnsName {
    name.parse().expect(name)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn entry_lives_for_ttl_plus_idle_grace() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 60), t0);
    let found = table.lookup(POD_A, DST, t0);
    assert_eq!(names(&found), ["api.example.test"]);
    assert_eq!(&*found[0].cnames, [Arc::<str>::from("lb.cdn.example.test")]);
    assert_eq!(table.lookup(POD_A, DST, t0 + secs(89)).len(), 1);
    assert!(table.lookup(POD_A, DST, t0 + secs(90)).is_empty());
}

#[test]
fn lifetimes_say_what_is_left_of_the_ttl_and_the_grace() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 60), t0);
    let mut seen = Vec::new();
    table.lifetimes_each(POD_A, DST, t0 + secs(20), |life| {
        seen.push((
            life.name.to_string(),
            life.cnames.len(),
            life.fresh_left,
            life.live_left,
        ));
    });
    assert_eq!(
        seen,
        [("api.example.test".to_owned(), 1, secs(40), secs(70))]
    );
    let mut in_grace = Vec::new();
    table.lifetimes_each(POD_A, DST, t0 + secs(75), |life| {
        in_grace.push((life.fresh_left, life.live_left));
    });
    assert_eq!(in_grace, [(Duration::ZERO, secs(15))]);
    let mut none = 0;
    table.lifetimes_each(POD_B, DST, t0, |_| none += 1);
    assert_eq!(none, 0);
}

#[test]
fn low_ttl_is_raised_to_min_ttl() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 0), t0);
    assert_eq!(table.lookup(POD_A, DST, t0 + secs(34)).len(), 1);
    assert!(table.lookup(POD_A, DST, t0 + secs(35)).is_empty());
}

#[test]
fn touch_renews_the_idle_grace() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 10), t0);
    // Connections at 30s and 55s keep it alive to 85s; without them it ends at 40s.
    table.touch(POD_A, DST, &dns_name("api.example.test"), t0 + secs(30));
    table.touch(POD_A, DST, &dns_name("api.example.test"), t0 + secs(55));
    // An older touch arriving late does not shorten it.
    table.touch(POD_A, DST, &dns_name("api.example.test"), t0 + secs(20));
    assert_eq!(table.lookup(POD_A, DST, t0 + secs(84)).len(), 1);
    assert!(table.lookup(POD_A, DST, t0 + secs(85)).is_empty());
}

#[test]
fn touches_within_a_second_of_the_last_saved_one_are_not_saved_again() {
    let table = NameTable::new(limits()).log_touches();
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 10), t0);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    for ms in [5_000, 5_001, 5_500, 5_999, 6_000, 6_400, 9_000] {
        table.touch(POD_A, DST, &dns_name("api.example.test"), at(ms));
    }
    let saved: Vec<Instant> = table.take_touches().iter().map(|t| t.at).collect();
    assert_eq!(saved, [at(5_000), at(6_000), at(9_000)]);
    // What was not saved still renews the entry in memory.
    assert_eq!(table.lookup(POD_A, DST, at(9_000) + secs(29)).len(), 1);
}

#[test]
fn touch_does_not_revive_an_expired_record() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 10), t0);
    assert!(table.touch(POD_A, DST, &dns_name("api.example.test"), t0 + secs(39)));
    // Live until 69s now; a touch after that finds nothing to renew.
    assert!(!table.touch(POD_A, DST, &dns_name("api.example.test"), t0 + secs(69)));
    assert!(table.lookup(POD_A, DST, t0 + secs(69)).is_empty());
}

#[test]
fn touch_of_another_pod_or_name_changes_nothing() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 10), t0);
    table.touch(POD_B, DST, &dns_name("api.example.test"), t0 + secs(35));
    table.touch(POD_A, DST, &dns_name("other.example.test"), t0 + secs(35));
    assert!(table.lookup(POD_A, DST, t0 + secs(40)).is_empty());
}

#[test]
fn re_resolving_refreshes_the_entry() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 10), t0);
    table.record(
        POD_A,
        &answer("api.example.test", &[DST], 10),
        t0 + secs(30),
    );
    assert_eq!(table.len(), 1);
    assert_eq!(table.lookup(POD_A, DST, t0 + secs(69)).len(), 1);
    assert!(table.lookup(POD_A, DST, t0 + secs(70)).is_empty());
}

#[test]
fn pod_b_never_sees_pod_a_names() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 60), t0);
    assert!(table.lookup(POD_B, DST, t0).is_empty());
    table.record(POD_B, &answer("db.example.test", &[DST], 60), t0);
    assert_eq!(names(&table.lookup(POD_A, DST, t0)), ["api.example.test"]);
    assert_eq!(names(&table.lookup(POD_B, DST, t0)), ["db.example.test"]);
}

#[test]
fn shared_ip_holds_several_names_deduplicated() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST, DST2], 60), t0);
    table.record(POD_A, &answer("WWW.Example.Test.", &[DST], 60), t0);
    table.record(POD_A, &answer("api.example.test", &[DST], 60), t0);
    assert_eq!(
        names(&table.lookup(POD_A, DST, t0)),
        ["api.example.test", "www.example.test"]
    );
    assert_eq!(names(&table.lookup(POD_A, DST2, t0)), ["api.example.test"]);
    assert_eq!(table.len(), 3);
}

#[test]
fn per_pod_limit_evicts_that_pods_oldest_first() {
    let table = NameTable::new(TableLimits {
        max_names_per_pod: 2,
        ..limits()
    });
    let t0 = Instant::now();
    table.record(POD_B, &answer("b.example.test", &[DST], 60), t0);
    table.record(POD_A, &answer("one.example.test", &[DST], 60), t0);
    table.record(POD_A, &answer("two.example.test", &[DST], 60), t0 + secs(1));
    table.record(
        POD_A,
        &answer("three.example.test", &[DST], 60),
        t0 + secs(2),
    );
    assert_eq!(
        names(&table.lookup(POD_A, DST, t0 + secs(2))),
        ["three.example.test", "two.example.test"]
    );
    assert_eq!(names(&table.lookup(POD_B, DST, t0)), ["b.example.test"]);
    assert_eq!(table.evictions(), 1);
    assert_eq!(table.len(), 3);
}

/// The first address of 198.18.2.0/24 at or after `.from` whose pod is (or is not, if `same`
/// is false) in the shard of `of`.
fn pod_where(of: PodIp, same: bool, from: u8) -> PodIp {
    (from..=u8::MAX)
        .map(|last| PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 2, last))))
        .find(|&pod| pod != of && (shard_index(pod) == shard_index(of)) == same)
        .expect("256 addresses reach every shard")
}

#[test]
fn global_limit_evicts_the_oldest_of_the_recording_pods_shard() {
    let table = NameTable::new(TableLimits {
        max_names: 3,
        ..limits()
    });
    let neighbour = pod_where(POD_A, true, 0);
    let elsewhere = pod_where(POD_A, false, 0);
    let t0 = Instant::now();
    table.record(elsewhere, &answer("oldest.example.test", &[DST], 60), t0);
    table.record(POD_A, &answer("one.example.test", &[DST], 60), t0 + secs(1));
    table.record(
        neighbour,
        &answer("two.example.test", &[DST], 60),
        t0 + secs(2),
    );
    table.record(
        neighbour,
        &answer("three.example.test", &[DST], 60),
        t0 + secs(3),
    );
    let now = t0 + secs(3);
    assert!(table.lookup(POD_A, DST, now).is_empty());
    assert_eq!(table.lookup(elsewhere, DST, now).len(), 1, "another shard");
    assert_eq!(
        names(&table.lookup(neighbour, DST, now)),
        ["three.example.test", "two.example.test"]
    );
    assert_eq!((table.len(), table.evictions()), (3, 1));
}

#[test]
fn a_pod_alone_in_its_shard_takes_room_from_the_next_shards() {
    let table = NameTable::new(TableLimits {
        max_names: 2,
        ..limits()
    });
    let newcomer = pod_where(POD_A, false, 0);
    let t0 = Instant::now();
    table.record(POD_A, &answer("one.example.test", &[DST], 60), t0);
    table.record(POD_A, &answer("two.example.test", &[DST], 60), t0);
    table.record(newcomer, &answer("new.example.test", &[DST], 60), t0);
    assert_eq!(
        names(&table.lookup(newcomer, DST, t0)),
        ["new.example.test"]
    );
    assert_eq!(names(&table.lookup(POD_A, DST, t0)), ["two.example.test"]);
    assert_eq!((table.len(), table.evictions()), (2, 1));
}

#[test]
fn an_answer_larger_than_the_limit_keeps_its_newest_addresses() {
    let table = NameTable::new(TableLimits {
        max_names: 2,
        ..limits()
    });
    let dst3 = DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 12)));
    let t0 = Instant::now();
    table.record(POD_B, &answer("other.example.test", &[DST], 60), t0);
    table.record(
        POD_A,
        &answer("big.example.test", &[DST, DST2, dst3], 60),
        t0,
    );
    assert!(table.lookup(POD_A, DST, t0).is_empty());
    assert_eq!(table.lookup(POD_A, DST2, t0).len(), 1);
    assert_eq!(table.lookup(POD_A, dst3, t0).len(), 1);
    assert!(table.lookup(POD_B, DST, t0).is_empty());
    assert_eq!((table.len(), table.evictions()), (2, 2));
}

#[test]
fn pod_addresses_in_runs_spread_evenly_over_the_shards() {
    // Consecutive, as a node's pod CIDR hands them out, and strided (every 32nd, or one per
    // /64), where the low bits alone would put them all in one shard.
    let v4 = |step: u32| -> Vec<IpAddr> {
        (0..256)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i * step)))
            .collect()
    };
    let v6 = |step: u128| -> Vec<IpAddr> {
        (0..256)
            .map(|i| IpAddr::V6(std::net::Ipv6Addr::from((0xfd00 << 112) + i * step)))
            .collect()
    };
    for run in [v4(1), v4(32), v6(1), v6(1 << 64)] {
        let mut per_shard = [0usize; SHARDS];
        for ip in run {
            per_shard[shard_index(PodIp(ip))] += 1;
        }
        // 8 each on average.
        let (least, most) = (per_shard.iter().min(), per_shard.iter().max());
        assert!(least >= Some(&4) && most <= Some(&12), "{per_shard:?}");
    }
}

#[test]
fn many_pods_across_shards_never_hold_more_than_the_limit() {
    const MAX: usize = 40;
    let table = NameTable::new(TableLimits {
        max_names: MAX,
        max_names_per_pod: 5,
        ..limits()
    });
    let pods: Vec<PodIp> = (0..=255u8)
        .map(|last| PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 3, last))))
        .collect();
    let t0 = Instant::now();
    let mut recorded = 0u64;
    for round in 0..3u8 {
        for (i, &pod) in pods.iter().enumerate() {
            let dst = DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, round, 1)));
            let name = format!("n{round}-{i}.example.test");
            table.record(pod, &answer(&name, &[dst, DST], 600), t0);
            recorded += 2;
            assert!(table.len() <= MAX, "{} after pod {i}", table.len());
        }
    }
    let mut held = 0;
    table.export_each(t0, std::time::SystemTime::now(), |_| held += 1);
    assert_eq!(table.len(), held, "the count is exact");
    assert_eq!(table.len(), MAX);
    assert_eq!(table.evictions(), recorded - MAX as u64);
    // A record is kept whole (other entries make room): the last one is all there.
    let last = dns_name("n2-255.example.test");
    let dst = DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 2, 1)));
    assert!(table.is_resolved(pods[255], DST, &last, t0));
    assert!(table.is_resolved(pods[255], dst, &last, t0));
}

#[test]
fn a_lookup_does_not_wait_for_another_shards_writer() {
    let table = Arc::new(NameTable::new(limits()));
    let elsewhere = pod_where(POD_A, false, 0);
    let t0 = Instant::now();
    table.record(elsewhere, &answer("api.example.test", &[DST], 60), t0);
    // As a worker recording for POD_A's shard would.
    let writing = table.shards.of(POD_A).write();
    let (done, finished) = std::sync::mpsc::channel();
    let other = Arc::clone(&table);
    let worker = std::thread::spawn(move || {
        let found = other.lookup(elsewhere, DST, t0).len();
        other.record(elsewhere, &answer("db.example.test", &[DST2], 60), t0);
        let _ = done.send(found);
    });
    // Only a bound on failure (a blocked lookup never answers), not a timing of success.
    let found = finished.recv_timeout(secs(60));
    drop(writing);
    worker.join().expect("the worker does not panic");
    assert_eq!(found, Ok(1));
    assert_eq!(table.lookup(elsewhere, DST2, t0).len(), 1);
}

#[test]
fn limit_drops_expired_entries_before_live_ones() {
    let table = NameTable::new(TableLimits {
        max_names_per_pod: 2,
        ..limits()
    });
    let t0 = Instant::now();
    table.record(POD_A, &answer("old.example.test", &[DST], 60), t0);
    table.record(
        POD_A,
        &answer("short.example.test", &[DST], 1),
        t0 + secs(1),
    );
    let later = t0 + secs(60);
    table.record(POD_A, &answer("new.example.test", &[DST], 60), later);
    assert_eq!(
        names(&table.lookup(POD_A, DST, later)),
        ["new.example.test", "old.example.test"]
    );
    assert_eq!(table.evictions(), 0);
}

#[test]
fn refreshed_entry_counts_as_new_for_eviction() {
    let table = NameTable::new(TableLimits {
        max_names_per_pod: 2,
        ..limits()
    });
    let t0 = Instant::now();
    table.record(POD_A, &answer("one.example.test", &[DST], 60), t0);
    table.record(POD_A, &answer("two.example.test", &[DST], 60), t0);
    table.record(POD_A, &answer("one.example.test", &[DST], 60), t0);
    table.record(POD_A, &answer("three.example.test", &[DST], 60), t0);
    assert_eq!(
        names(&table.lookup(POD_A, DST, t0)),
        ["one.example.test", "three.example.test"]
    );
}

#[test]
fn purge_removes_only_expired_entries() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("short.example.test", &[DST, DST2], 10), t0);
    table.record(POD_B, &answer("long.example.test", &[DST], 600), t0);
    assert_eq!(table.len(), 3);
    assert_eq!(table.purge_expired(t0 + secs(39)), 0);
    assert_eq!(table.purge_expired(t0 + secs(40)), 2);
    assert_eq!(table.len(), 1);
    assert_eq!(
        names(&table.lookup(POD_B, DST, t0 + secs(40))),
        ["long.example.test"]
    );
    // Indexes stay consistent: the global limit still works after a purge.
    assert_eq!(table.purge_expired(t0 + secs(40)), 0);
    assert!(!table.is_empty());
}

#[test]
fn empty_answer_records_nothing() {
    let table = NameTable::new(limits());
    table.record(POD_A, &answer("api.example.test", &[], 60), Instant::now());
    assert!(table.is_empty());
}

#[test]
fn names_of_every_length_come_back_whole() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    // Around the inline limit, and the longest a DNS name can be.
    // `n` bytes of 60-letter labels (a label may not exceed 63).
    let label = |n: usize| -> String {
        (0..n)
            .map(|i| if i % 61 == 60 { '.' } else { 'a' })
            .collect()
    };
    let lengths = [
        DnsName::INLINE - 1,
        DnsName::INLINE,
        DnsName::INLINE + 1,
        253,
    ];
    let recorded: Vec<String> = lengths
        .iter()
        .map(|&len| format!("{}.test", label(len - 5)))
        .collect();
    for name in &recorded {
        assert!(name.len() <= 253);
        table.record(POD_A, &answer(&name.to_uppercase(), &[DST, DST2], 10), t0);
    }
    let mut want: Vec<&str> = recorded.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(names(&table.lookup(POD_A, DST2, t0)), want);
    let mut seen = Vec::new();
    table.lookup_each(POD_A, DST, t0, |name, cnames| {
        assert_eq!(cnames, [Arc::<str>::from("lb.cdn.example.test")]);
        seen.push(name.to_owned());
    });
    seen.sort_unstable();
    assert_eq!(seen, want);
    // Touch finds them by name too: only the touched one outlives the others.
    table.touch(POD_A, DST, &dns_name(&recorded[3]), t0 + secs(30));
    assert_eq!(
        names(&table.lookup(POD_A, DST, t0 + secs(50))),
        [&*recorded[3]]
    );
}

/// A plain list, oldest first, that follows the documented rules step by step: the table (its
/// maps, slab and linked lists) must agree with it after every operation.
mod model {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// Two pods sharing a shard and one in another: eviction within a shard and across.
    fn pods() -> [PodIp; 3] {
        [POD_A, pod_where(POD_A, true, 0), pod_where(POD_A, false, 0)]
    }
    const DSTS: [DestIp; 3] = [DST, DST2, DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 12)))];
    const NAMES: [&str; 4] = ["a.test", "b.test", "c.test", "d.test"];
    const LIMITS: TableLimits = TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(10),
        max_names_per_pod: 4,
        max_names: 7,
    };

    #[derive(Debug, Clone)]
    enum Op {
        Record {
            pod: usize,
            name: usize,
            dsts: Vec<usize>,
            ttl: u32,
        },
        Touch {
            pod: usize,
            dst: usize,
            name: usize,
        },
        Purge,
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, 0..4usize, proptest::collection::vec(0..3usize, 1..3), 0..30u32)
                .prop_map(|(pod, name, dsts, ttl)| Op::Record { pod, name, dsts, ttl }),
            1 => (0..3usize, 0..3usize, 0..4usize)
                .prop_map(|(pod, dst, name)| Op::Touch { pod, dst, name }),
            1 => Just(Op::Purge),
            2 => (0..20u64).prop_map(Op::Wait),
        ]
    }

    /// (pod, dst, name, resolved at, TTL, last touch), all times in seconds; oldest first.
    type Row = (usize, usize, usize, u64, u64, u64);

    fn live(row: &Row, now: u64) -> bool {
        now < (row.3 + row.4).max(row.5) + LIMITS.idle_grace.as_secs()
    }

    struct Model {
        pods: [PodIp; 3],
        rows: Vec<Row>,
        evictions: u64,
        /// Per shard.
        last_sweep: HashMap<usize, u64>,
    }

    impl Model {
        fn record(&mut self, pod: usize, name: usize, dsts: &[usize], ttl: u32, now: u64) {
            let ttl = u64::from(ttl).max(LIMITS.min_ttl.as_secs());
            for &dst in dsts {
                self.rows.retain(|r| (r.0, r.1, r.2) != (pod, dst, name));
                self.rows.push((pod, dst, name, now, ttl, 0));
            }
            if self.rows.iter().filter(|r| r.0 == pod).count() > LIMITS.max_names_per_pod {
                self.rows.retain(|r| r.0 != pod || live(r, now));
                while self.rows.iter().filter(|r| r.0 == pod).count() > LIMITS.max_names_per_pod {
                    let Some(oldest) = self.rows.iter().position(|r| r.0 == pod) else {
                        break;
                    };
                    self.rows.remove(oldest);
                    self.evictions += 1;
                }
            }
            if self.rows.len() <= LIMITS.max_names {
                return;
            }
            // The recording pod's shard, sparing this answer's rows (its newest); then every
            // other shard in turn; then, if need be, this answer's own.
            let home = shard_index(self.pods[pod]);
            let kept = self
                .rows
                .iter()
                .filter(|r| r.0 == pod && r.2 == name && dsts.contains(&r.1))
                .count();
            self.sweep_if_due(home, now);
            while self.rows.len() > LIMITS.max_names && self.rows_in(home) > kept {
                self.evict_oldest(home);
            }
            for step in 1..SHARDS {
                if self.rows.len() <= LIMITS.max_names {
                    return;
                }
                let shard = (home + step) % SHARDS;
                self.sweep_if_due(shard, now);
                while self.rows.len() > LIMITS.max_names && self.evict_oldest(shard) {}
            }
            while self.rows.len() > LIMITS.max_names && self.evict_oldest(home) {}
        }

        fn shard_of(&self, row: &Row) -> usize {
            shard_index(self.pods[row.0])
        }

        fn rows_in(&self, shard: usize) -> usize {
            self.rows
                .iter()
                .filter(|r| self.shard_of(r) == shard)
                .count()
        }

        fn sweep_if_due(&mut self, shard: usize, now: u64) {
            if self.last_sweep.get(&shard).is_none_or(|&last| now > last) {
                let pods = self.pods;
                self.rows
                    .retain(|r| shard_index(pods[r.0]) != shard || live(r, now));
                self.last_sweep.insert(shard, now);
            }
        }

        fn evict_oldest(&mut self, shard: usize) -> bool {
            let Some(oldest) = self.rows.iter().position(|r| self.shard_of(r) == shard) else {
                return false;
            };
            self.rows.remove(oldest);
            self.evictions += 1;
            true
        }

        /// A touch renews a live record only: an expired one stays expired.
        fn touch(&mut self, pod: usize, dst: usize, name: usize, now: u64) -> bool {
            let row = self
                .rows
                .iter_mut()
                .find(|r| (r.0, r.1, r.2) == (pod, dst, name) && live(r, now));
            let found = row.is_some();
            if let Some(row) = row {
                row.5 = row.5.max(now);
            }
            found
        }
    }

    proptest! {
        #[test]
        fn the_table_agrees_with_a_plain_list(ops in proptest::collection::vec(op(), 1..60)) {
            let table = NameTable::new(LIMITS);
            let pods = pods();
            let mut model = Model {
                pods,
                rows: Vec::new(),
                evictions: 0,
                last_sweep: HashMap::new(),
            };
            let t0 = Instant::now();
            let mut now = 0u64;
            for op in ops {
                let at = t0 + secs(now);
                match op {
                    Op::Record { pod, name, dsts, ttl } => {
                        let addresses: Vec<IpAddr> = dsts.iter().map(|&d| DSTS[d].0).collect();
                        let answer = Answer {
                            name: dns_name(NAMES[name]),
                            addresses,
                            cnames: Vec::new(),
                            ttl,
                        };
                        table.record(pods[pod], &answer, at);
                        model.record(pod, name, &dsts, ttl, now);
                    }
                    Op::Touch { pod, dst, name } => {
                        let live = table.touch(pods[pod], DSTS[dst], &dns_name(NAMES[name]), at);
                        prop_assert_eq!(live, model.touch(pod, dst, name, now));
                    }
                    Op::Purge => {
                        let before = model.rows.len();
                        model.rows.retain(|r| live(r, now));
                        prop_assert_eq!(table.purge_expired(at), before - model.rows.len());
                    }
                    Op::Wait(s) => now += s,
                }
                let at = t0 + secs(now);
                prop_assert_eq!(table.len(), model.rows.len());
                prop_assert_eq!(table.evictions(), model.evictions);
                for (p, &pod) in pods.iter().enumerate() {
                    for (d, &dst) in DSTS.iter().enumerate() {
                        let mut want: Vec<&str> = model
                            .rows
                            .iter()
                            .filter(|r| (r.0, r.1) == (p, d) && live(r, now))
                            .map(|r| NAMES[r.2])
                            .collect();
                        want.sort_unstable();
                        let found = table.lookup(pod, dst, at);
                        prop_assert_eq!(names(&found), want);
                    }
                }
            }
        }
    }
}

#[test]
fn forget_pod_drops_only_that_pods_entries() {
    let table = NameTable::new(limits());
    let now = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST, DST2], 60), now);
    table.record(POD_B, &answer("api.example.test", &[DST], 60), now);
    assert_eq!(table.pods(), vec![POD_A, POD_B]);
    assert_eq!(table.forget_pod(POD_A), 2);
    assert!(table.lookup(POD_A, DST, now).is_empty());
    assert_eq!(names(&table.lookup(POD_B, DST, now)), ["api.example.test"]);
    assert_eq!(table.len(), 1);
}

#[test]
fn export_and_restore_keep_what_stays_fresh_longest() {
    let source = NameTable::new(limits());
    let now = Instant::now();
    let wall = std::time::SystemTime::now();
    source.record(POD_A, &answer("api.example.test", &[DST], 60), now);
    let mut saved = Vec::new();
    source.export_each(now, wall, |e| {
        saved.push(SavedName {
            pod: e.pod,
            dst: e.dst,
            name: e.name.to_string(),
            cnames: e.cnames.iter().map(|c| c.to_string()).collect(),
            fresh_until: e.fresh_until,
        });
    });
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].cnames, ["lb.cdn.example.test"]);
    let fresh_for = saved[0].fresh_until.duration_since(wall).expect("future");
    assert!(
        fresh_for.as_secs() == 59 || fresh_for.as_secs() == 60,
        "{fresh_for:?}"
    );

    let target = NameTable::new(limits());
    target.record(POD_A, &answer("api.example.test", &[DST], 5), now);
    assert_eq!(target.restore(&saved[0], now, wall), Restored::Kept);
    // The restored entry outlives the 5 s one it met: 60 s TTL + 30 s grace.
    assert_eq!(target.lookup(POD_A, DST, now + secs(80)).len(), 1);
    assert!(target.lookup(POD_A, DST, now + secs(91)).is_empty());
    assert_eq!(target.len(), 1, "merged, not duplicated");
}

#[test]
fn many_names_on_one_address_are_each_found_by_name_as_they_come_and_go() {
    let table = NameTable::new(TableLimits {
        max_names_per_pod: 300,
        ..limits()
    });
    let t0 = Instant::now();
    let name = |i: usize| dns_name(&format!("site-{i}.cdn.example.test"));
    for i in 0..200 {
        // Short-lived odd names, so a purge leaves holes all over the route.
        let ttl = if i % 2 == 0 { 600 } else { 5 };
        table.record(POD_A, &answer(&name(i), &[DST], ttl), t0);
    }
    for i in 0..200 {
        assert!(table.is_resolved(POD_A, DST, &name(i), t0), "{i}");
    }
    assert!(!table.is_resolved(POD_A, DST, &dns_name("site-200.cdn.example.test"), t0));
    assert!(!table.is_resolved(POD_B, DST, &name(0), t0));
    // Re-recording finds the existing entry: still one per name.
    table.record(POD_A, &answer(&name(7), &[DST], 600), t0);
    assert_eq!(table.len(), 200);

    let later = t0 + secs(60);
    assert_eq!(table.purge_expired(later), 99);
    for i in 0..200 {
        let live = i % 2 == 0 || i == 7;
        assert_eq!(table.is_resolved(POD_A, DST, &name(i), later), live, "{i}");
    }
    // Past the per-pod limit the oldest go, and the index follows.
    for i in 200..400 {
        table.record(POD_A, &answer(&name(i), &[DST], 600), later);
    }
    assert_eq!(table.len(), 300);
    assert!(!table.is_resolved(POD_A, DST, &name(0), later));
    assert!(table.is_resolved(POD_A, DST, &name(7), later));
    assert!(table.is_resolved(POD_A, DST, &name(399), later));
}

#[test]
fn lookup_some_lends_a_bounded_sample_and_counts_the_rest() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    for i in 0..50 {
        let name = format!("site-{i}.cdn.example.test");
        table.record(POD_A, &answer(&name, &[DST], 60), t0);
    }
    let mut seen = Vec::new();
    let total = table.lookup_some(POD_A, DST, t0, 8, |name, _| seen.push(name.to_owned()));
    assert_eq!((seen.len(), total), (8, 50));
    assert_eq!(
        table.lookup_some(POD_B, DST, t0, 8, |_, _| panic!("none")),
        0
    );
}

#[test]
fn a_saved_name_outside_the_rule_is_not_restored() {
    let table = NameTable::new(limits());
    let wall = std::time::SystemTime::now();
    let saved = SavedName {
        pod: POD_A,
        dst: DST,
        name: "a b.example.test".into(),
        cnames: Vec::new(),
        fresh_until: wall + secs(60),
    };
    assert_eq!(
        table.restore(&saved, Instant::now(), wall),
        Restored::NotADnsName
    );
    assert!(table.is_empty());
}
