//! DNS records expire after TTL + idle grace.

use std::time::{Duration, Instant};

use egressgate_lab::addr;

use crate::support::{
    assert_allowed, assert_denied, curl, dig, run_and_decide, short_ttl_lab, GRACE_SECONDS,
};

#[test]
fn record_expires_after_ttl_and_idle_grace() {
    let lab = short_ttl_lab();
    let ca = lab.ca();
    let resolve = format!("{}:443:{}", addr::SHORT, addr::WEB);
    let args = curl(&ca, &["--resolve", &resolve, "https://short.example.test/"]);

    assert_eq!(dig(&lab, "a", addr::SHORT, &[]), [addr::WEB]);
    let (out, d) = run_and_decide(&lab, "a", 443, &args);
    assert_allowed(&out, &d, "hello from short.example.test");

    // Every connection counts as a use, so wait a full TTL + grace between attempts; a few
    // attempts absorb timer granularity. Bounded by count and by a deadline.
    let pause = Duration::from_secs(addr::SHORT_TTL_SECONDS + GRACE_SECONDS + 1);
    let deadline = Instant::now() + pause * 4;
    let mut last = None;
    for _ in 0..3 {
        std::thread::sleep(pause);
        let (out, d) = run_and_decide(&lab, "a", 443, &args);
        if d.verdict() == Some("deny") || Instant::now() >= deadline {
            last = Some((out, d));
            break;
        }
        last = Some((out, d));
    }
    let (out, d) = last.expect("at least one attempt");
    assert_denied(&out, &d, &["no_dns_record"]);
}
