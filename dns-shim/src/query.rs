//! The head of a DNS message (RFC 1035 §4.1.1 header + the first question), read without
//! trusting anything after it, and the small replies the shim builds itself from a query.
//!
//! Queries are forwarded byte-exact (only the ID changes), so this reader never needs the whole
//! message: EDNS options, cookies or records hickory cannot decode pass through untouched.

use std::fmt;

use hickory_proto::op::Query;
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// RFC 1035 §4.1.1: the fixed header is 12 octets.
pub const HEADER_LEN: usize = 12;

/// RFC 1035 §4.1.1 flag bits, first flags octet.
const FLAG_QR: u8 = 0x80;
const FLAG_OPCODE: u8 = 0x78;
const FLAG_TC: u8 = 0x02;
const FLAG_RD: u8 = 0x01;
/// Second flags octet: RA, Z, AD (RFC 4035), CD (RFC 4035), RCODE.
const FLAG_RA: u8 = 0x80;
const FLAG_CD: u8 = 0x10;
const RCODE_MASK: u8 = 0x0f;

/// RFC 1035 §4.1.1 RCODE values the shim answers with or names in its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rcode(pub u8);

impl Rcode {
    pub const NOERROR: Rcode = Rcode(0);
    pub const SERVFAIL: Rcode = Rcode(2);
    pub const NXDOMAIN: Rcode = Rcode(3);
    pub const REFUSED: Rcode = Rcode(5);
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0 => "NOERROR",
            1 => "FORMERR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            4 => "NOTIMP",
            5 => "REFUSED",
            n => return write!(f, "RCODE{n}"),
        };
        f.write_str(name)
    }
}

/// One question (RFC 1035 §4.1.2). Names compare case-insensitively (RFC 4343), which also
/// accepts an upstream echoing a 0x20-randomised name in its own case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: Name,
    pub qtype: RecordType,
    pub qclass: DNSClass,
}

impl Question {
    /// Lowercase, no trailing dot: the form the name table and the log use.
    pub fn normalized_name(&self) -> String {
        normalize_name(&self.name)
    }
}

/// Lowercase ASCII presentation form without the root dot.
pub fn normalize_name(name: &Name) -> String {
    let mut s = name.to_lowercase().to_ascii();
    if s.len() > 1 && s.ends_with('.') {
        s.pop();
    }
    s
}

/// What the shim reads from any message before deciding what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHead {
    pub id: u16,
    pub is_response: bool,
    pub truncated: bool,
    pub rcode: Rcode,
    /// `Some` only when QDCOUNT is 1 and that question decodes.
    pub question: Option<Question>,
    /// Offset just past the question section (or the header when `question` is `None`).
    question_end: usize,
}

/// Reads the header and, if QDCOUNT is 1, the question. `None` below 12 bytes.
///
/// A question name with a compression pointer (RFC 1035 §4.1.4) is unreadable: it is the
/// first name of the message, so no stub compresses it, and a pointer may reach into the
/// header, whose ID the forwarder rewrites: the upstream would read another question.
pub fn read_head(bytes: &[u8]) -> Option<MessageHead> {
    let header = bytes.get(..HEADER_LEN)?;
    let id = u16::from_be_bytes([header[0], header[1]]);
    let qdcount = u16::from_be_bytes([header[4], header[5]]);
    let mut head = MessageHead {
        id,
        is_response: header[2] & FLAG_QR != 0,
        truncated: header[2] & FLAG_TC != 0,
        rcode: Rcode(header[3] & RCODE_MASK),
        question: None,
        question_end: HEADER_LEN,
    };
    // Several questions are legal on the wire but no server answers them; treat as opaque.
    if qdcount != 1 {
        return Some(head);
    }
    if !question_name_is_uncompressed(bytes) {
        return Some(head);
    }
    let mut decoder = BinDecoder::new(bytes);
    if decoder.read_slice(HEADER_LEN).is_err() {
        return Some(head);
    }
    if let Ok(query) = Query::read(&mut decoder) {
        head.question = Some(Question {
            name: query.name().clone(),
            qtype: query.query_type(),
            qclass: query.query_class(),
        });
        head.question_end = decoder.index();
    }
    Some(head)
}

/// Whether the name at offset 12 is a plain run of labels ending in the root label.
fn question_name_is_uncompressed(bytes: &[u8]) -> bool {
    let mut at = HEADER_LEN;
    loop {
        match bytes.get(at) {
            None => return false,
            Some(0) => return true,
            Some(&len) if len & LABEL_TYPE_MASK != 0 => return false,
            Some(&len) => at += 1 + usize::from(len),
        }
    }
}

/// RFC 1035 §4.1.4: the two high bits of a length octet mark a pointer (or, RFC 6891 §5,
/// a reserved label type); a plain label has them clear.
const LABEL_TYPE_MASK: u8 = 0xc0;
/// RFC 6891 §6.1.2: the OPT pseudo-record's TYPE; its CLASS is the sender's UDP payload size.
const TYPE_OPT: u16 = 41;

/// The UDP payload size a query's OPT record (RFC 6891 §6.1.2) advertises, found by walking
/// the sections without decoding any record: a decoder that reserves room from the header's
/// counts would allocate megabytes for a 12-byte query that claims 65535 records.
/// `None` without an OPT record or when the message ends before one.
pub fn edns_udp_payload(message: &[u8]) -> Option<u16> {
    let count = |at: usize| read_u16(message, at).map(usize::from);
    let (questions, answers, authorities, additionals) =
        (count(4)?, count(6)?, count(8)?, count(10)?);
    let mut at = HEADER_LEN;
    for _ in 0..questions {
        at = skip_name(message, at)? + 4;
    }
    for _ in 0..answers + authorities {
        at = skip_record(message, at)?;
    }
    for _ in 0..additionals {
        let name_end = skip_name(message, at)?;
        if read_u16(message, name_end)? == TYPE_OPT {
            return read_u16(message, name_end + 2);
        }
        at = skip_record(message, at)?;
    }
    None
}

/// Offset just past the name at `at`: its root label or its compression pointer.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *message.get(at)?;
        match len & LABEL_TYPE_MASK {
            0 if len == 0 => return Some(at + 1),
            0 => at += 1 + usize::from(len),
            LABEL_TYPE_MASK => return Some(at + 2).filter(|&end| end <= message.len()),
            _ => return None,
        }
    }
}

/// Offset just past the resource record at `at` (RFC 1035 §4.1.3: name, TYPE, CLASS, TTL,
/// RDLENGTH, RDATA).
fn skip_record(message: &[u8], at: usize) -> Option<usize> {
    let fixed = skip_name(message, at)?;
    let end = fixed + 10 + usize::from(read_u16(message, fixed + 8)?);
    Some(end).filter(|&end| end <= message.len())
}

fn read_u16(message: &[u8], at: usize) -> Option<u16> {
    let bytes = message.get(at..at + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Replaces the ID (octets 0..2) and leaves every other byte as it was.
pub fn with_id(message: &[u8], id: u16) -> Vec<u8> {
    let mut out = message.to_vec();
    set_id(&mut out, id);
    out
}

/// Sets the ID in place; a message shorter than 2 bytes is left alone.
pub fn set_id(message: &mut [u8], id: u16) {
    if let Some(slot) = message.get_mut(..2) {
        slot.copy_from_slice(&id.to_be_bytes());
    }
}

/// A reply of `rcode` to `query` echoing its header and question byte-exact (keeps the 0x20
/// case of the name), with no records. `None` if the question could not be read: without it a
/// stub could not match the reply anyway.
pub fn error_reply(query: &[u8], head: &MessageHead, rcode: Rcode) -> Option<Vec<u8>> {
    head.question.as_ref()?;
    let mut out = query.get(..head.question_end)?.to_vec();
    out[2] = FLAG_QR | (out[2] & (FLAG_OPCODE | FLAG_RD));
    out[3] = FLAG_RA | (out[3] & FLAG_CD) | (rcode.0 & RCODE_MASK);
    set_counts(&mut out);
    Some(out)
}

/// RFC 1035 §4.2.1 / RFC 2181 §9: `response` cut to header + question with TC set, for a UDP
/// client whose payload size the full answer exceeds; the stub then asks again over TCP.
/// `None` if the response's question could not be read.
pub fn truncated_reply(response: &[u8], head: &MessageHead) -> Option<Vec<u8>> {
    head.question.as_ref()?;
    let mut out = response.get(..head.question_end)?.to_vec();
    out[2] |= FLAG_TC;
    set_counts(&mut out);
    Some(out)
}

/// QDCOUNT 1, ANCOUNT/NSCOUNT/ARCOUNT 0.
fn set_counts(out: &mut [u8]) {
    out[4..HEADER_LEN].copy_from_slice(&[0x00, 0x01, 0, 0, 0, 0, 0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIG_A: &[u8] = include_bytes!("testdata/dig-9.18-udp-query-api.example.test-A.bin");

    #[test]
    fn head_of_dig_query_reads_question() {
        let head = read_head(DIG_A).expect("head");
        assert!(!head.is_response);
        let q = head.question.expect("question");
        assert_eq!(q.normalized_name(), "api.example.test");
        assert_eq!(q.qtype, RecordType::A);
        assert_eq!(q.qclass, DNSClass::IN);
    }

    #[test]
    fn short_message_has_no_head() {
        assert_eq!(read_head(&DIG_A[..11]), None);
        let head = read_head(&DIG_A[..12]).expect("header only");
        assert_eq!(head.question, None);
    }

    #[test]
    fn servfail_reply_echoes_question_and_id() {
        let head = read_head(DIG_A).expect("head");
        let reply = error_reply(DIG_A, &head, Rcode::SERVFAIL).expect("reply");
        let parsed = read_head(&reply).expect("reply head");
        assert_eq!(parsed.id, head.id);
        assert!(parsed.is_response);
        assert_eq!(parsed.rcode, Rcode::SERVFAIL);
        assert_eq!(parsed.question, head.question);
        let msg = hickory_proto::op::Message::from_vec(&reply).expect("parses");
        assert!(msg.answers().is_empty() && msg.additionals().is_empty());
        assert!(msg.recursion_desired());
    }

    #[test]
    fn error_reply_needs_a_question() {
        let head = read_head(&DIG_A[..20]).expect("head");
        assert_eq!(error_reply(&DIG_A[..20], &head, Rcode::REFUSED), None);
    }

    #[test]
    fn truncated_reply_keeps_question_drops_records_sets_tc() {
        const DNSMASQ_A: &[u8] =
            include_bytes!("testdata/dnsmasq-2.90-udp-response-api.example.test-A-cname-chain.bin");
        let head = read_head(DNSMASQ_A).expect("head");
        let reply = truncated_reply(DNSMASQ_A, &head).expect("reply");
        let parsed = read_head(&reply).expect("reply head");
        assert!(parsed.truncated && parsed.is_response);
        assert_eq!(parsed.id, head.id);
        assert_eq!(parsed.question, head.question);
        let msg = hickory_proto::op::Message::from_vec(&reply).expect("parses");
        assert!(msg.answers().is_empty());
        assert!(reply.len() < DNSMASQ_A.len());
    }

    #[test]
    fn question_with_a_compression_pointer_is_unreadable() {
        // The pointer (0xc0 0x00) reaches back into the header: the name would change with
        // the ID the forwarder writes.
        let mut query = DIG_A[..HEADER_LEN].to_vec();
        query.extend_from_slice(&[3, b'a', b'p', b'i', 0xc0, 0x00, 0, 1, 0, 1]);
        let head = read_head(&query).expect("head");
        assert_eq!(head.question, None);
        assert_eq!(error_reply(&query, &head, Rcode::REFUSED), None);
    }

    #[test]
    fn edns_payload_is_read_from_the_opt_record() {
        const GLIBC_A: &[u8] = include_bytes!(
            "testdata/glibc-2.36-getaddrinfo-k8s-ndots5/07-query-api.example.test-A.bin"
        );
        assert_eq!(edns_udp_payload(DIG_A), Some(1232));
        assert_eq!(edns_udp_payload(GLIBC_A), None);
        // Counts that promise more than the message holds end the walk.
        let mut huge_counts = DIG_A[..HEADER_LEN].to_vec();
        huge_counts[6..12].copy_from_slice(&[0xff; 6]);
        assert_eq!(edns_udp_payload(&huge_counts), None);
        // Cut inside the OPT record's TYPE: no payload size.
        assert_eq!(edns_udp_payload(&DIG_A[..0x24]), None);
    }

    #[test]
    fn edns_payload_skips_answer_records_with_pointers() {
        const DNSMASQ_A: &[u8] =
            include_bytes!("testdata/dnsmasq-2.90-udp-response-api.example.test-A-cname-chain.bin");
        let parsed = hickory_proto::op::Message::from_vec(DNSMASQ_A).expect("parses");
        assert!(!parsed.answers().is_empty());
        let expected = parsed.extensions().as_ref().map(|edns| edns.max_payload());
        assert_eq!(edns_udp_payload(DNSMASQ_A), expected);
    }

    #[test]
    fn rcode_names() {
        assert_eq!(Rcode::NXDOMAIN.to_string(), "NXDOMAIN");
        assert_eq!(Rcode(11).to_string(), "RCODE11");
    }
}
