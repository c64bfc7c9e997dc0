//! What the `observe` tap costs a decision or DNS line beyond its stdout serialization: nothing
//! but one atomic load when nobody observes and `observe.history` is 0; with a history (the
//! default) or a subscriber, the line's copy and one push under the bus's lock.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use egressgate::config::Observe;
use egressgate::observe::Bus;
use egressgate_log::LineTap;

/// A decision line of the usual size (README, "Logs").
const LINE: &[u8] = br#"{"time":"2026-11-26T23:45:51.259Z","event":"decision","connection":1,"verdict":"allow","reason":"allowed","pod":{"namespace":"shop","name":"app-1"},"source":"198.18.1.2:53416","destination":"198.19.0.10:443","names":["api.example.test"],"cnames":["lb.cdn.example.test"],"protocol":"tls","sni":"api.example.test","alpn":["h2","http/1.1"],"ech":false,"policy":"shop/app","rule":0,"decisionUs":217}
"#;

fn limits(history: usize) -> Observe {
    Observe {
        history,
        max_subscribers: 8,
        queue_lines: 1024,
    }
}

/// As `egressgate_log::write_observed_line` does after serializing: ask the tap, then copy.
fn offer(bus: &Bus) {
    if bus.wanted() {
        LineTap::publish(bus, LINE.to_vec());
    }
}

fn observe_bus(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let mut group = c.benchmark_group("observe_tap");

    let idle = Bus::unregistered(limits(0));
    group.bench_function("nobody_no_history", |b| b.iter(|| offer(black_box(&idle))));

    let history = Bus::unregistered(limits(2048));
    group.bench_function("history_2048", |b| b.iter(|| offer(black_box(&history))));

    // A subscriber that never reads: every line after its queue fills is a counted drop.
    let stalled = Bus::unregistered(limits(2048));
    let _subscription = stalled.subscribe(None, true).expect("room");
    group.bench_function("history_2048_one_stalled_subscriber", |b| {
        b.iter(|| offer(black_box(&stalled)))
    });

    // For scale: serializing the line, which every line pays anyway.
    let value: serde_json::Value = serde_json::from_slice(LINE).expect("json");
    group.bench_function("serialize_line_for_stdout", |b| {
        b.iter(|| black_box(serde_json::to_vec(black_box(&value)).expect("json")))
    });
    group.finish();
}

criterion_group!(benches, observe_bus);
criterion_main!(benches);
