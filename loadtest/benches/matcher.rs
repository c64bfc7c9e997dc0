//! The matcher: `PolicySet::select` (which policies select a pod) and `Selection::grants` (which
//! rules allow a destination), at 100 and 10k rules.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use egressgate_policy::{DnsName, PodIdentity};

mod common;
use common::{dst_ip, labels, name_for, policy_set, Shape};

fn matcher(c: &mut Criterion) {
    let mut group = c.benchmark_group("matcher");
    for shape in [
        Shape {
            namespaces: 1,
            policies: 10,
            rules: 10,
        },
        Shape {
            namespaces: 10,
            policies: 1000,
            rules: 10,
        },
    ] {
        let set = policy_set(&shape);
        let rules = shape.total_rules();
        let pod = 17;
        let (namespace, pod_labels, ns_labels) = labels(&shape, pod);
        let identity = PodIdentity {
            namespace: &namespace,
            name: "p17",
            labels: &pod_labels,
            namespace_labels: &ns_labels,
        };
        group.bench_with_input(BenchmarkId::new("select", rules), &identity, |b, id| {
            b.iter(|| black_box(set.select(black_box(id))))
        });
        let selection = set.select(&identity);
        assert!(!selection.is_empty());
        let names: [DnsName; 1] = [name_for(&shape, pod, 5).parse().expect("a valid name")];
        group.bench_with_input(BenchmarkId::new("grants_hit", rules), &names, |b, names| {
            let grants = selection.grants(dst_ip(5), 443, names);
            assert!(!grants.is_empty(), "the synthetic name must match");
            b.iter(|| black_box(selection.grants(black_box(dst_ip(5)), 443, black_box(names))))
        });
        let miss: [DnsName; 1] = ["nothing.example.org".parse().expect("a valid name")];
        group.bench_with_input(BenchmarkId::new("grants_miss", rules), &miss, |b, names| {
            b.iter(|| black_box(selection.grants(black_box(dst_ip(5)), 443, black_box(names))))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = matcher
}
criterion_main!(benches);
