//! What must hold for the DNS shim's readers (`egressgate_dns_shim`) on any query a pod sends and
//! any response that comes back.
//!
//! Shared, not copied: the cargo-fuzz targets `fuzz_targets/dns_*.rs` and the stable replay test
//! `dns-shim/tests/fuzz_corpus.rs` both include this file with `#[path]`. A violated property
//! panics.
//!
//! The steps follow the shim's pipeline (`shim.rs`, `forward.rs`, `tcp.rs`): the head of the
//! pod's query (UDP datagram, or RFC 1035 §4.2.2 length-prefixed TCP messages), its EDNS payload
//! size, the forwarded copy under another ID, the check of the upstream's response against the
//! query, the answer read from it, and its recording in the name table.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use egressgate_dns_shim::{
    check_response, edns_udp_payload, read_answer, read_exchange, read_head, Answer, DestIp,
    Mismatch, NameTable, PodIp, Question, Reading, TableLimits,
};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

/// RFC 1034 §3.6.2 chains the shim follows at most (`answer::MAX_CNAME_CHAIN`).
const MAX_CNAME_CHAIN: usize = 16;
/// Small limits, so that large answers also exercise eviction.
const MAX_NAMES_PER_POD: usize = 32;

/// A query as a pod sends it: one UDP datagram, which is also read as a TCP stream of
/// length-prefixed messages.
pub fn query(data: &[u8]) {
    check_query(data);
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(message) = tail.get(..len) else {
            break;
        };
        check_query(message);
        rest = &tail[len..];
    }
}

/// A query and the response to it: a two-byte big-endian query length, the query, then the
/// response (the rest of the input).
pub fn response(data: &[u8]) {
    let [hi, lo, rest @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
    let Some(query) = rest.get(..len) else {
        return;
    };
    let response = &rest[len..];
    let expected = exchange(query, response);
    assert_eq!(read_exchange(query, response), expected, "read_exchange");
    if let Some(answer) = expected {
        record(&answer);
    }
}

fn check_query(q: &[u8]) {
    let head = read_head(q);
    assert_eq!(head.is_some(), q.len() >= 12, "a head iff 12 bytes");
    let Some(head) = head else {
        return;
    };
    assert_eq!(head.id, u16::from_be_bytes([q[0], q[1]]));
    assert_eq!(head.is_response, q[2] & 0x80 != 0);
    assert_eq!(head.truncated, q[2] & 0x02 != 0);
    assert_eq!(head.rcode.0, q[3] & 0x0f);
    if let Some(question) = &head.question {
        assert_eq!(q[4..6], [0, 1], "a question read with QDCOUNT != 1");
        check_name(question);
    }
    // The UDP reply limit (`shim::udp_payload_limit`): the OPT record's payload size, read
    // without decoding the message, is the one a full decoder finds.
    // (hickory reserves room for every record the header counts: only small counts are
    // compared, or each run would allocate megabytes.)
    let payload = edns_udp_payload(q);
    let counted: usize = (4..12)
        .step_by(2)
        .map(|at| usize::from(u16::from_be_bytes([q[at], q[at + 1]])))
        .sum();
    let decoded = (counted <= 64).then(|| Message::from_vec(q));
    if let Some(Ok(Some(edns))) = decoded.map(|m| m.map(|m| m.extensions().clone())) {
        assert_eq!(
            payload.map(|size| size.max(512)),
            Some(edns.max_payload()),
            "EDNS payload size"
        );
    }

    // A question whose name is compressed (or cut short) is unreadable: a pointer may reach
    // into the header, and the question would then change with the ID the forwarder writes.
    if question_has_pointer(q) {
        assert_eq!(head.question, None, "a compressed question was read");
        return;
    }
    // The forwarder changes the ID only: the head reads the same.
    let mut forwarded = q.to_vec();
    forwarded[..2].copy_from_slice(&(!head.id).to_be_bytes());
    let again = read_head(&forwarded).expect("12 bytes have a head");
    assert_eq!(
        again.question, head.question,
        "the question depends on the ID"
    );
    assert_eq!(
        (again.is_response, again.truncated, again.rcode),
        (head.is_response, head.truncated, head.rcode)
    );

    // A response that echoes the query is accepted for it, and only under its ID.
    if !head.is_response {
        assert_eq!(
            check_response(head.id, head.question.as_ref(), q),
            Err(Mismatch::NotAResponse)
        );
    }
    let mut echo = q.to_vec();
    echo[2] |= 0x80;
    let accepted = check_response(head.id, head.question.as_ref(), &echo)
        .expect("the query echoed as a response is accepted");
    assert_eq!(accepted.question, head.question);
    let other = head.id.wrapping_add(1);
    assert_eq!(
        check_response(other, head.question.as_ref(), &echo),
        Err(Mismatch::WrongId {
            expected: other,
            got: head.id
        })
    );
    if let Some(question) = &head.question {
        if let Reading::Record(answer) = read_answer(question, &echo) {
            check_answer(question, &answer);
        }
    }
}

/// The reading path step by step (forwarder, then shim), checking each step's verdict against
/// the bytes; the answer `read_exchange` must give.
fn exchange(query: &[u8], response: &[u8]) -> Option<Answer> {
    let head = read_head(query)?;
    let Some(question) = head.question else {
        // An unreadable question is forwarded anyway and any response under the ID accepted;
        // the shim then relays it without recording (`Reading::Unparseable`).
        let _ = check_response(head.id, None, response);
        return None;
    };
    match check_response(head.id, Some(&question), response) {
        Ok(accepted) => {
            assert_eq!(accepted.id, head.id);
            assert!(accepted.is_response);
            assert_eq!(accepted.question.as_ref(), Some(&question));
        }
        Err(Mismatch::TooShort) => {
            assert!(response.len() < 12);
            return None;
        }
        Err(Mismatch::NotAResponse) => {
            assert_eq!(response[2] & 0x80, 0);
            return None;
        }
        Err(Mismatch::WrongId { expected, got }) => {
            assert_eq!(
                (expected, got),
                (head.id, u16::from_be_bytes([response[0], response[1]]))
            );
            return None;
        }
        Err(_) => return None,
    }
    match read_answer(&question, response) {
        Reading::Record(answer) => {
            check_answer(&question, &answer);
            Some(answer)
        }
        Reading::Nothing | Reading::Unparseable => None,
    }
}

/// An answer the table would record: for the queried name, addresses of the queried family,
/// each once, behind a bounded chain without repeats.
fn check_answer(question: &Question, answer: &Answer) {
    assert_eq!(answer.name.as_str(), question.normalized_name());
    assert!(!answer.addresses.is_empty(), "an answer without addresses");
    for (i, address) in answer.addresses.iter().enumerate() {
        assert!(!answer.addresses[..i].contains(address), "address twice");
        match question.qtype {
            RecordType::A => assert!(address.is_ipv4()),
            RecordType::AAAA => assert!(address.is_ipv6()),
            other => panic!("recorded an answer to a {other} query"),
        }
    }
    assert!(answer.cnames.len() <= MAX_CNAME_CHAIN);
    for (i, cname) in answer.cnames.iter().enumerate() {
        assert!(
            !answer.cnames[..i].contains(cname),
            "a CNAME loop was followed"
        );
        assert_ne!(
            cname.as_str(),
            answer.name.as_str(),
            "a CNAME loop was followed"
        );
    }
}

/// Whether the first question's name (from offset 12) has a compression pointer (RFC 1035
/// §4.1.4) or is cut short: real stubs never compress it, it is the message's first name.
fn question_has_pointer(q: &[u8]) -> bool {
    let mut at = 12;
    loop {
        match q.get(at) {
            None => return true,
            Some(0) => return false,
            Some(&len) if len & 0xc0 != 0 => return true,
            Some(&len) => at += 1 + usize::from(len),
        }
    }
}

/// Lowercase ASCII presentation form, the key of the table and the log.
fn check_name(question: &Question) {
    let name = question.normalized_name();
    assert!(!name.is_empty());
    assert!(name.is_ascii(), "non-ASCII name {name:?}");
    assert!(
        !name.bytes().any(|b| b.is_ascii_uppercase()),
        "not lowercase: {name:?}"
    );
}

/// Records `answer` for one pod, as the shim does before replying: each of its (last, when
/// evicting) addresses then names it, and everything is gone once TTL and grace have passed.
fn record(answer: &Answer) {
    let limits = TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: MAX_NAMES_PER_POD,
        max_names: 2 * MAX_NAMES_PER_POD,
    };
    let valid_for =
        Duration::from_secs(u64::from(answer.ttl)).max(limits.min_ttl) + limits.idle_grace;
    let table = NameTable::new(limits);
    let pod = PodIp(IpAddr::from([10, 244, 1, 2]));
    let now = Instant::now();
    table.record(pod, answer, now);
    assert_eq!(table.len(), answer.addresses.len().min(MAX_NAMES_PER_POD));
    for dst in answer.addresses.iter().rev().take(MAX_NAMES_PER_POD) {
        let dst = DestIp(*dst);
        let names = table.lookup(pod, dst, now);
        assert_eq!(names.len(), 1, "one name recorded for {dst}");
        assert_eq!(names[0].cnames.len(), answer.cnames.len());
        table.touch(pod, dst, &names[0].name, now);
        assert!(table
            .lookup(PodIp(IpAddr::from([10, 244, 1, 3])), dst, now)
            .is_empty());
    }
    // A second answer for the same name refreshes rather than adds.
    table.record(pod, answer, now);
    assert_eq!(table.len(), answer.addresses.len().min(MAX_NAMES_PER_POD));
    if let Some(later) = now.checked_add(valid_for) {
        table.purge_expired(later);
        assert!(table.is_empty(), "entries outlive TTL and grace");
    }
}
