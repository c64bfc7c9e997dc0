use std::net::Ipv4Addr;

use super::*;

const POD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));
const POD_B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 3));
const DST: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10));
const DST2: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 11));

fn limits() -> TableLimits {
    TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: 100,
        max_names: 1000,
    }
}

fn answer(name: &str, addresses: &[IpAddr], ttl: u32) -> Answer {
    Answer {
        name: name.to_owned(),
        addresses: addresses.to_vec(),
        cnames: vec!["lb.cdn.example.test".to_owned()],
        ttl,
    }
}

fn names(found: &[ResolvedName]) -> Vec<&str> {
    let mut v: Vec<&str> = found.iter().map(|r| &*r.name).collect();
    v.sort_unstable();
    v
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
    table.touch(POD_A, DST, "api.example.test", t0 + secs(30));
    table.touch(POD_A, DST, "api.example.test", t0 + secs(55));
    // An older touch arriving late does not shorten it.
    table.touch(POD_A, DST, "api.example.test", t0 + secs(20));
    assert_eq!(table.lookup(POD_A, DST, t0 + secs(84)).len(), 1);
    assert!(table.lookup(POD_A, DST, t0 + secs(85)).is_empty());
}

#[test]
fn touch_of_another_pod_or_name_changes_nothing() {
    let table = NameTable::new(limits());
    let t0 = Instant::now();
    table.record(POD_A, &answer("api.example.test", &[DST], 10), t0);
    table.touch(POD_B, DST, "api.example.test", t0 + secs(35));
    table.touch(POD_A, DST, "other.example.test", t0 + secs(35));
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

#[test]
fn global_limit_evicts_the_oldest_across_pods() {
    let table = NameTable::new(TableLimits {
        max_names: 2,
        ..limits()
    });
    let t0 = Instant::now();
    table.record(POD_A, &answer("one.example.test", &[DST], 60), t0);
    table.record(POD_B, &answer("two.example.test", &[DST], 60), t0);
    table.record(POD_B, &answer("three.example.test", &[DST], 60), t0);
    assert!(table.lookup(POD_A, DST, t0).is_empty());
    assert_eq!(table.len(), 2);
    assert_eq!(table.evictions(), 1);
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
