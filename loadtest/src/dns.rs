//! Just enough DNS wire format for the load generator and the upstream responder: one question,
//! one A answer. The responder answers every A query at once (no logging, no cache), so that the
//! upstream is never what limits a DNS measurement: `*.example.test` → the web address (so pods can
//! resolve the names the egressgate policy allows), anything else → an address in 198.19.128.0/17
//! derived from the name (never connected to), TTL one hour (one second under `churn.test`, for
//! the soak run). AAAA and other types get NODATA.

use std::net::Ipv4Addr;

/// RD set, one question.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + name.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        // Names here are ours: labels are short ASCII.
        out.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        out.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    out.extend_from_slice(&[0, 0, 1, 0, 1]);
    out
}

/// The ID of a response (or query).
pub fn id(message: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*message.first()?, *message.get(1)?]))
}

/// What a response to query `id` says: `None` if `message` is not that response, else the A
/// address, or the RCODE when it has none (0 for an answer without an address).
pub fn answer_v4(message: &[u8], id: u16) -> Option<Result<Ipv4Addr, u8>> {
    if message.len() < 12 || self::id(message)? != id || message[2] & 0x80 == 0 {
        return None;
    }
    let rcode = message[3] & 0x0f;
    let answers = u16::from_be_bytes([message[6], message[7]]);
    let n = message.len();
    // The responder's one A record comes last: ..., RDLENGTH 4, the address.
    if rcode != 0 || answers == 0 || n < 12 + 16 || message[n - 6..n - 4] != [0, 4] {
        return Some(Err(rcode));
    }
    Some(Ok(Ipv4Addr::new(
        message[n - 4],
        message[n - 3],
        message[n - 2],
        message[n - 1],
    )))
}

/// The question of `message`: (lowercase name without trailing dot, qtype, end offset).
fn question(message: &[u8]) -> Option<(String, u16, usize)> {
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(*message.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // no compression in questions we answer
        }
        let label = message.get(pos..pos + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        pos += len;
    }
    let qtype = u16::from_be_bytes([*message.get(pos)?, *message.get(pos + 1)?]);
    Some((name, qtype, pos + 4))
}

/// The answer the responder gives `name`.
pub fn address_for(name: &str, web: Ipv4Addr) -> Ipv4Addr {
    if name == "example.test" || name.ends_with(".example.test") {
        return web;
    }
    // FNV-1a, folded into 198.19.128.0/17.
    let mut hash: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let low = hash & 0x7fff;
    Ipv4Addr::new(198, 19, 128 | (low >> 8) as u8, (low & 0xff) as u8)
}

/// The responder's answer to `query`, written into `out`; `false` if `query` is not one.
pub fn respond(query: &[u8], web: Ipv4Addr, ttl: u32, out: &mut Vec<u8>) -> bool {
    out.clear();
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return false;
    }
    let Some((name, qtype, end)) = question(query) else {
        return false;
    };
    out.extend_from_slice(&query[..2]);
    // QR, opcode 0, AA, RD copied; RA; NOERROR.
    out.push(0x84 | (query[2] & 0x01));
    out.push(0x80);
    let answers: u16 = if qtype == 1 { 1 } else { 0 };
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..end]);
    if qtype == 1 {
        let ttl = if name.ends_with(CHURN_ZONE) {
            CHURN_TTL
        } else {
            ttl
        };
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&address_for(&name, web).octets());
    }
    true
}

/// The zone of the DNS benchmark's names: answered with the responder's long TTL.
pub const BENCH_ZONE: &str = "bench.test";
/// Names under this zone are answered with [`CHURN_TTL`], so that the soak run's records expire.
pub const CHURN_ZONE: &str = "churn.test";
pub const CHURN_TTL: u32 = 1;

/// The names the DNS load uses: `n<i>.<zone>`.
pub fn bench_name(i: usize, zone: &str) -> String {
    format!("n{i}.{zone}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_a_queries_with_the_web_address_for_lab_names() {
        let web = Ipv4Addr::new(198, 19, 0, 10);
        let q = query(0x1234, "API.example.test");
        let mut out = Vec::new();
        assert!(respond(&q, web, 60, &mut out));
        assert_eq!(id(&out), Some(0x1234));
        assert_eq!(out[2] & 0x80, 0x80);
        assert_eq!(&out[6..8], &[0, 1]);
        assert_eq!(&out[out.len() - 4..], &[198, 19, 0, 10]);
        let other = address_for("n1.bench.test", web);
        assert_eq!(other.octets()[..2], [198, 19]);
        assert!(other.octets()[2] >= 128);
    }

    #[test]
    fn reads_the_address_of_the_matching_response_only() {
        let web = Ipv4Addr::new(198, 19, 0, 10);
        let mut out = Vec::new();
        assert!(respond(&query(7, "c1.example.test"), web, 60, &mut out));
        assert_eq!(answer_v4(&out, 7), Some(Ok(web)));
        assert_eq!(answer_v4(&out, 8), None);
        assert_eq!(answer_v4(&query(7, "c1.example.test"), 7), None);
        out[3] |= 2; // SERVFAIL
        assert_eq!(answer_v4(&out, 7), Some(Err(2)));
    }

    #[test]
    fn rejects_responses_and_garbage() {
        let mut out = Vec::new();
        let web = Ipv4Addr::new(198, 19, 0, 10);
        assert!(!respond(&[0; 5], web, 60, &mut out));
        let mut q = query(1, "a.test");
        q[2] |= 0x80;
        assert!(!respond(&q, web, 60, &mut out));
    }
}
