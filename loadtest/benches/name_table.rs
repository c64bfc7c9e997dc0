//! The name table: `lookup` in a table of 1M names (1k pods × 1k names), alone and while another
//! thread keeps recording answers (as a DNS worker does beside the connection workers), `lookup`
//! when one address carries many names (a CDN), and `record` (refreshing an existing name, and
//! adding new ones at the per-pod limit, which evicts).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use egressgate_dns_shim::{Answer, DestIp, NameTable, PodIp, TableLimits};

mod common;
use common::{dst_ip, pod_ip};

const PODS: usize = 1000;
const NAMES_PER_POD: usize = 1000;

fn table(per_pod: usize, total: usize) -> NameTable {
    NameTable::new(TableLimits {
        min_ttl: Duration::from_secs(3600),
        idle_grace: Duration::from_secs(3600),
        max_names_per_pod: per_pod,
        max_names: total,
    })
}

fn answer(name: String, dst: IpAddr) -> Answer {
    Answer {
        name: name.parse().expect("a valid name"),
        addresses: vec![dst],
        cnames: Vec::new(),
        ttl: 3600,
    }
}

fn name_table(c: &mut Criterion) {
    let mut group = c.benchmark_group("name_table");
    let now = Instant::now();
    let big = table(NAMES_PER_POD * 2, PODS * NAMES_PER_POD * 2);
    for i in 0..PODS {
        for n in 0..NAMES_PER_POD {
            big.record(
                PodIp(pod_ip(i)),
                &answer(format!("h{n}.p{i}.corp.test"), dst_ip(n)),
                now,
            );
        }
    }
    group.bench_function("lookup_1M_names", |b| {
        let mut k = 0usize;
        b.iter(|| {
            k = k.wrapping_add(7919);
            let (i, n) = (k % PODS, (k / PODS) % NAMES_PER_POD);
            black_box(big.lookup(PodIp(pod_ip(i)), DestIp(dst_ip(n)), now))
        })
    });
    group.bench_function("lookup_miss_1M_names", |b| {
        let miss = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 99));
        b.iter(|| black_box(big.lookup(PodIp(pod_ip(3)), DestIp(black_box(miss)), now)))
    });
    group.bench_function("lookup_1M_names_while_recording", |b| {
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // Re-resolutions of every pod's names in turn, as long as the measurement runs.
            scope.spawn(|| {
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    k = k.wrapping_add(104_729);
                    let (i, n) = (k % PODS, (k / PODS) % NAMES_PER_POD);
                    let a = answer(format!("h{n}.p{i}.corp.test"), dst_ip(n));
                    big.record(PodIp(pod_ip(i)), &a, now);
                }
            });
            let mut k = 0usize;
            b.iter(|| {
                k = k.wrapping_add(7919);
                let (i, n) = (k % PODS, (k / PODS) % NAMES_PER_POD);
                black_box(big.lookup(PodIp(pod_ip(i)), DestIp(dst_ip(n)), now))
            });
            stop.store(true, Ordering::Relaxed);
        });
    });
    group.bench_function("record_refresh_1M_names", |b| {
        let a = answer("h5.p3.corp.test".to_owned(), dst_ip(5));
        b.iter(|| big.record(PodIp(pod_ip(3)), black_box(&a), now))
    });
    drop(big);

    // One address shared by many names, as behind a CDN or a shared ingress.
    for names in [1usize, 10, 100, 1000] {
        let shared = table(10_000, 100_000);
        let dst = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10));
        for n in 0..names {
            shared.record(
                PodIp(pod_ip(0)),
                &answer(format!("site{n}.cdn.test"), dst),
                now,
            );
        }
        group.bench_with_input(
            BenchmarkId::new("lookup_names_on_one_address", names),
            &names,
            |b, _| b.iter(|| black_box(shared.lookup(PodIp(pod_ip(0)), DestIp(dst), now))),
        );
    }

    let full = table(1000, 1_000_000);
    for n in 0..1000 {
        full.record(
            PodIp(pod_ip(0)),
            &answer(format!("n{n}.full.test"), dst_ip(n)),
            now,
        );
    }
    group.bench_function("record_new_evicting_at_pod_limit", |b| {
        let mut n = 1000usize;
        b.iter(|| {
            n += 1;
            full.record(
                PodIp(pod_ip(0)),
                &answer(format!("n{n}.full.test"), dst_ip(n % 30_000)),
                now,
            )
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = name_table
}
criterion_main!(benches);
