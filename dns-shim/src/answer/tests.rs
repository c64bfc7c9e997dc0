use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;
use crate::query::{read_head, with_id};

const DIG_A: &[u8] = include_bytes!("../testdata/dig-9.18-udp-query-api.example.test-A.bin");
const DNSMASQ_A: &[u8] =
    include_bytes!("../testdata/dnsmasq-2.90-udp-response-api.example.test-A-cname-chain.bin");
const DIG_AAAA: &[u8] = include_bytes!("../testdata/dig-9.18-udp-query-api.example.test-AAAA.bin");
const DNSMASQ_AAAA: &[u8] =
    include_bytes!("../testdata/dnsmasq-2.90-udp-response-api.example.test-AAAA-cname-chain.bin");
const DIG_NOPE: &[u8] = include_bytes!("../testdata/dig-9.18-udp-query-nope.example.test-A.bin");
const DNSMASQ_NOPE: &[u8] =
    include_bytes!("../testdata/dnsmasq-2.90-udp-response-nope.example.test-nxdomain.bin");
const DIG_DB: &[u8] = include_bytes!("../testdata/dig-9.18-udp-query-db.example.test-A.bin");
const DNSMASQ_DB: &[u8] =
    include_bytes!("../testdata/dnsmasq-2.90-udp-response-db.example.test-A-single.bin");
const DIG_TCP: &[u8] =
    include_bytes!("../testdata/dig-9.18-tcp-query-api.example.test-A-len-prefixed.bin");
const DNSMASQ_TCP: &[u8] = include_bytes!(
    "../testdata/dnsmasq-2.90-tcp-response-api.example.test-A-cname-chain-len-prefixed.bin"
);

macro_rules! glibc {
    ($file:literal) => {
        include_bytes!(concat!(
            "../testdata/glibc-2.36-getaddrinfo-k8s-ndots5/",
            $file
        ))
    };
}

/// (query, response) for the 8 datagrams of one getaddrinfo call under `ndots:5`.
const GLIBC: [(&[u8], &[u8]); 8] = [
    (
        glibc!("01-query-api.example.test.default.svc.cluster.local-A.bin"),
        glibc!("01-response-api.example.test.default.svc.cluster.local-A-nxdomain.bin"),
    ),
    (
        glibc!("02-query-api.example.test.default.svc.cluster.local-AAAA.bin"),
        glibc!("02-response-api.example.test.default.svc.cluster.local-AAAA-nxdomain.bin"),
    ),
    (
        glibc!("03-query-api.example.test.svc.cluster.local-A.bin"),
        glibc!("03-response-api.example.test.svc.cluster.local-A-nxdomain.bin"),
    ),
    (
        glibc!("04-query-api.example.test.svc.cluster.local-AAAA.bin"),
        glibc!("04-response-api.example.test.svc.cluster.local-AAAA-nxdomain.bin"),
    ),
    (
        glibc!("05-query-api.example.test.cluster.local-A.bin"),
        glibc!("05-response-api.example.test.cluster.local-A-nxdomain.bin"),
    ),
    (
        glibc!("06-query-api.example.test.cluster.local-AAAA.bin"),
        glibc!("06-response-api.example.test.cluster.local-AAAA-nxdomain.bin"),
    ),
    (
        glibc!("07-query-api.example.test-A.bin"),
        glibc!("07-response-api.example.test-A-noerror.bin"),
    ),
    (
        glibc!("08-query-api.example.test-AAAA.bin"),
        glibc!("08-response-api.example.test-AAAA-noerror.bin"),
    ),
];

const CHAIN: [&str; 2] = ["api.edge.example.test", "lb.cdn.example.test"];

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn sorted(mut v: Vec<IpAddr>) -> Vec<IpAddr> {
    v.sort();
    v
}

/// Strips and checks the RFC 1035 §4.2.2 two-byte length prefix.
fn unframe(framed: &[u8]) -> &[u8] {
    let len = usize::from(u16::from_be_bytes([framed[0], framed[1]]));
    assert_eq!(len, framed.len() - 2, "length prefix matches the capture");
    &framed[2..]
}

#[test]
fn dnsmasq_cname_chain_a_records_both_addresses_with_min_ttl() {
    let answer = read_exchange(DIG_A, DNSMASQ_A).expect("recordable");
    assert_eq!(answer.name, "api.example.test");
    assert_eq!(
        sorted(answer.addresses),
        vec![v4(127, 0, 0, 10), v4(127, 0, 0, 11)]
    );
    assert_eq!(answer.cnames, CHAIN);
    assert_eq!(answer.ttl, 60);
}

#[test]
fn dnsmasq_cname_chain_aaaa_records_loopback_v6() {
    let answer = read_exchange(DIG_AAAA, DNSMASQ_AAAA).expect("recordable");
    assert_eq!(answer.name, "api.example.test");
    assert_eq!(answer.addresses, vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    assert_eq!(answer.cnames, CHAIN);
    assert_eq!(answer.ttl, 60);
}

#[test]
fn plain_a_record_has_no_cnames_and_its_own_ttl() {
    let answer = read_exchange(DIG_DB, DNSMASQ_DB).expect("recordable");
    assert_eq!(answer.name, "db.example.test");
    assert_eq!(answer.addresses, vec![v4(127, 0, 0, 1)]);
    assert!(answer.cnames.is_empty());
    assert_eq!(answer.ttl, 300);
}

#[test]
fn nxdomain_records_nothing() {
    assert_eq!(read_exchange(DIG_NOPE, DNSMASQ_NOPE), None);
    let head = read_head(DIG_NOPE).expect("head");
    let question = head.question.expect("question");
    assert!(check_response(head.id, Some(&question), DNSMASQ_NOPE).is_ok());
    assert_eq!(read_answer(&question, DNSMASQ_NOPE), Reading::Nothing);
}

#[test]
fn glibc_ndots_series_records_only_the_bare_name_pair() {
    for (i, (query, response)) in GLIBC.iter().enumerate() {
        let answer = read_exchange(query, response);
        if i < 6 {
            assert_eq!(answer, None, "datagram {} is NXDOMAIN", i + 1);
            continue;
        }
        let answer = answer.expect("bare name answers");
        assert_eq!(answer.name, "api.example.test");
        assert_eq!(answer.cnames, CHAIN);
        assert_eq!(answer.ttl, 60);
        let expected = if i == 6 {
            vec![v4(127, 0, 0, 10), v4(127, 0, 0, 11)]
        } else {
            vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]
        };
        assert_eq!(sorted(answer.addresses), expected);
    }
}

#[test]
fn tcp_length_prefixed_fixtures_read_like_udp() {
    let answer = read_exchange(unframe(DIG_TCP), unframe(DNSMASQ_TCP)).expect("recordable");
    assert_eq!(answer.name, "api.example.test");
    assert_eq!(
        sorted(answer.addresses),
        vec![v4(127, 0, 0, 10), v4(127, 0, 0, 11)]
    );
    assert_eq!(answer.ttl, 60);
}

#[test]
fn response_to_another_question_is_rejected() {
    let head = read_head(DIG_A).expect("head");
    // The AAAA answer given the A query's ID: right ID, wrong question type.
    let forged = with_id(DNSMASQ_AAAA, head.id);
    assert_eq!(
        check_response(head.id, head.question.as_ref(), &forged),
        Err(Mismatch::WrongQuestion)
    );
    assert_eq!(read_exchange(DIG_A, &forged), None);
    // Another name entirely.
    let forged = with_id(DNSMASQ_DB, head.id);
    assert_eq!(read_exchange(DIG_A, &forged), None);
}

#[test]
fn response_with_wrong_id_is_rejected() {
    let head = read_head(DIG_A).expect("head");
    let forged = with_id(DNSMASQ_A, head.id.wrapping_add(1));
    assert!(matches!(
        check_response(head.id, head.question.as_ref(), &forged),
        Err(Mismatch::WrongId { .. })
    ));
    assert_eq!(read_exchange(DIG_A, &forged), None);
}

#[test]
fn query_echoed_back_is_not_a_response() {
    let head = read_head(DIG_A).expect("head");
    assert_eq!(
        check_response(head.id, head.question.as_ref(), DIG_A),
        Err(Mismatch::NotAResponse)
    );
}

#[test]
fn question_name_compares_case_insensitively() {
    // 0x20 randomisation: the upstream echoes the name in the case the query used.
    let mut mixed = DNSMASQ_A.to_vec();
    mixed[13] = b'A'; // "api" -> "Api": first label starts at offset 12 (length octet).
    let answer = read_exchange(DIG_A, &mixed).expect("same question");
    assert_eq!(answer.name, "api.example.test");
}

#[test]
fn every_strict_prefix_of_an_answer_records_nothing() {
    for end in 0..DNSMASQ_A.len() {
        assert_eq!(
            read_exchange(DIG_A, &DNSMASQ_A[..end]),
            None,
            "prefix {end}"
        );
    }
}

fn fixture_pairs() -> Vec<(&'static [u8], &'static [u8])> {
    let mut pairs = vec![
        (DIG_A, DNSMASQ_A),
        (DIG_AAAA, DNSMASQ_AAAA),
        (DIG_NOPE, DNSMASQ_NOPE),
        (DIG_DB, DNSMASQ_DB),
        (&DIG_TCP[2..], &DNSMASQ_TCP[2..]),
    ];
    pairs.extend(GLIBC);
    pairs
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(query in prop::collection::vec(any::<u8>(), 0..600),
                                   response in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = read_head(&query);
        let _ = read_exchange(&query, &response);
        let _ = read_exchange(DIG_A, &response);
        if let Some(head) = read_head(&query) {
            let _ = crate::query::error_reply(&query, &head, crate::query::Rcode::SERVFAIL);
            let _ = crate::query::truncated_reply(&query, &head);
        }
    }

    #[test]
    fn mutated_fixtures_never_panic(pair in 0usize..13,
                                    edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                                    cut in any::<usize>()) {
        let (query, response) = fixture_pairs()[pair];
        let mut mutated = response.to_vec();
        for (at, byte) in edits {
            let at = at % mutated.len();
            mutated[at] = byte;
        }
        mutated.truncate(cut % (mutated.len() + 1));
        if let Some(answer) = read_exchange(query, &mutated) {
            prop_assert!(!answer.addresses.is_empty());
            prop_assert!(!answer.name.ends_with('.'));
        }
    }
}

/// A name hickory reads but the one DNS-name rule refuses (a label ending in `-`): the answer is
/// relayed like any other, but nothing is recorded, since no rule could ever use the name.
#[test]
fn an_answer_for_a_name_outside_the_rule_records_nothing() {
    use hickory_proto::op::{Message, MessageType, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::Record;

    let exchange = |name: &str| {
        let name = Name::from_ascii(name).expect("hickory reads it");
        let mut query = Message::new();
        query
            .set_id(7)
            .add_query(Query::query(name.clone(), RecordType::A));
        let mut response = query.clone();
        response
            .set_message_type(MessageType::Response)
            .add_answer(Record::from_rdata(
                name,
                60,
                RData::A(A::new(198, 19, 0, 10)),
            ));
        let (query, response) = (query.to_vec(), response.to_vec());
        read_exchange(&query.expect("encodes"), &response.expect("encodes"))
    };
    let recorded = exchange("api-.example.test.").map(|answer| answer.name);
    assert_eq!(recorded, None);
    let recorded = exchange("API.example.test.").map(|answer| answer.name.to_string());
    assert_eq!(recorded.as_deref(), Some("api.example.test"));
}
