//! How many decision-sized lines per second several threads log at once, as the gateway's
//! workers do (each line formatted field by field, then queued for the `json-log` thread):
//!
//!     cargo run --release -p egressgate-log --example log_contention -- 2 300000 > /dev/null
//!
//! Arguments: threads, lines per thread. Prints to stderr; send stdout somewhere cheap.

use std::net::SocketAddr;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let lines: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(300_000);
    let source: SocketAddr = "198.18.1.2:40000".parse().expect("address");
    let destination: SocketAddr = "198.18.0.10:443".parse().expect("address");
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(move || {
                for connection in 0..lines {
                    egressgate_log::write_json_object(|line| {
                        line.time("time");
                        line.str("event", "decision");
                        line.u64("connection", connection);
                        line.str("verdict", "allow");
                        line.str("reason", "allowed");
                        line.object("pod", |pod| {
                            pod.str("namespace", "shop");
                            pod.str("name", "web-7d9f8b6c5d-x2x4q");
                        });
                        line.socket_addr("source", source);
                        line.socket_addr("destination", destination);
                        line.strs("names", ["api.example.test"]);
                        line.str("protocol", "tls");
                        line.str("sni", "api.example.test");
                        line.strs("alpn", ["h2", "http/1.1"]);
                        line.bool("ech", false);
                        line.concat("policy", &["shop", "/", "web"]);
                        line.u64("rule", 0);
                        line.u64("decisionUs", 42);
                    });
                }
            });
        }
    });
    egressgate_log::flush();
    let seconds = start.elapsed().as_secs_f64();
    let total = threads as f64 * lines as f64;
    eprintln!(
        "{threads} thread(s), {total} lines in {seconds:.3} s: {:.0} lines/s",
        total / seconds
    );
}
