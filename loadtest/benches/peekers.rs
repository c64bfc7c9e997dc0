//! Each peeker over real client captures (the gateway's test data: curl, Chromium, Java, node,
//! Python, rustls, OpenSSL, psql, psycopg, pg8000), plus the protocol sniffer.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use egressgate::peek::{self, Peek};

fn captures(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gateway/src/peek/testdata")
        .join(kind);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, std::fs::read(&p).expect("readable capture"))
        })
        .collect();
    files.sort();
    files
}

fn peekers(c: &mut Criterion) {
    let mut group = c.benchmark_group("peek");
    for (name, bytes) in captures("tls") {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        assert!(
            matches!(peek::tls::peek_client_hello(&bytes), Peek::Complete(_)),
            "{name}"
        );
        group.bench_with_input(BenchmarkId::new("tls", &name), &bytes, |b, bytes| {
            b.iter(|| black_box(peek::tls::peek_client_hello(black_box(bytes))))
        });
    }
    for (name, bytes) in captures("http") {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new("http", &name), &bytes, |b, bytes| {
            b.iter(|| black_box(peek::http::peek_request_head(black_box(bytes))))
        });
    }
    for (name, bytes) in captures("postgres")
        .into_iter()
        .filter(|(name, _)| !name.contains("clienthello"))
    {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new("postgres", &name), &bytes, |b, bytes| {
            b.iter(|| black_box(peek::postgres::peek_first_message(black_box(bytes))))
        });
    }
    for (kind, name) in [
        (
            "tls",
            "curl-7.88.1-default-sni-api.example.test-alpn-h2-http1.1",
        ),
        ("http", "curl-7.88.1-origin-form-host-with-port"),
        ("postgres", "psql-15-sslmode-disable-startup-v3.0"),
    ] {
        if let Some((_, bytes)) = captures(kind).into_iter().find(|(n, _)| n == name) {
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_with_input(BenchmarkId::new("sniff", kind), &bytes, |b, bytes| {
                b.iter(|| black_box(peek::sniff(black_box(bytes))))
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = peekers
}
criterion_main!(benches);
