//! Reading an upstream response against the query it answers: is it the answer to *this*
//! question, and if so which names, addresses and TTL does the shim record. Pure; a fuzz target
//! and the proptests call [`read_exchange`].

use std::net::IpAddr;

use egressgate_policy::DnsName;
use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use crate::query::{self, MessageHead, Question};

/// RFC 1034 §3.6.2 allows chains; resolvers stop following long before this. Beyond it (or on a
/// loop) the shim records nothing rather than guess.
const MAX_CNAME_CHAIN: usize = 16;

/// What a genuine A/AAAA answer tells the name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The queried name; an answer for a name that breaks the one DNS-name rule is not recorded
    /// (no rule could use it).
    pub name: DnsName,
    /// Every final address of the chain, deduplicated, in answer order.
    pub addresses: Vec<IpAddr>,
    /// The CNAME targets followed from `name`, in order, normalised like `name`.
    pub cnames: Vec<String>,
    /// Lowest TTL along the chain, address records included.
    pub ttl: u32,
}

/// Why a response is not accepted as the answer to a query. The forwarder drops it and keeps
/// waiting: a spoofer must not be able to end the exchange early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Mismatch {
    #[error("shorter than a DNS header")]
    TooShort,
    #[error("QR bit clear: not a response")]
    NotAResponse,
    #[error("ID {got:#06x}, expected {expected:#06x}")]
    WrongId { expected: u16, got: u16 },
    #[error("question differs from the query's")]
    WrongQuestion,
}

/// What the shim can learn from a response that passed [`check_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// A NOERROR A/AAAA answer with at least one address at the end of the chain.
    Record(Answer),
    /// Parsed, nothing to record (NXDOMAIN, NODATA, other types, broken chain).
    Nothing,
    /// hickory cannot decode the whole message; relay it without recording.
    Unparseable,
}

/// Accepts `response` only if it is a response with `expected_id` and, when the query's
/// question was readable, the same question (name case-insensitive, type, class).
pub fn check_response(
    expected_id: u16,
    question: Option<&Question>,
    response: &[u8],
) -> Result<MessageHead, Mismatch> {
    let head = query::read_head(response).ok_or(Mismatch::TooShort)?;
    if !head.is_response {
        return Err(Mismatch::NotAResponse);
    }
    if head.id != expected_id {
        return Err(Mismatch::WrongId {
            expected: expected_id,
            got: head.id,
        });
    }
    if let Some(expected) = question {
        if head.question.as_ref() != Some(expected) {
            return Err(Mismatch::WrongQuestion);
        }
    }
    Ok(head)
}

/// Reads an already accepted `response` to `question`: follows the CNAME chain from the queried
/// name through the answer section and collects the final addresses of the queried type.
pub fn read_answer(question: &Question, response: &[u8]) -> Reading {
    let Ok(message) = Message::from_vec(response) else {
        return Reading::Unparseable;
    };
    if message.response_code() != hickory_proto::op::ResponseCode::NoError
        || !matches!(question.qtype, RecordType::A | RecordType::AAAA)
        || question.qclass != DNSClass::IN
    {
        return Reading::Nothing;
    }
    match follow_chain(question, &message) {
        Some(answer) => Reading::Record(answer),
        None => Reading::Nothing,
    }
}

fn follow_chain(question: &Question, message: &Message) -> Option<Answer> {
    let records = message.answers();
    let mut current: &Name = &question.name;
    let mut ttl = u32::MAX;
    let mut cnames: Vec<String> = Vec::new();
    for _ in 0..=MAX_CNAME_CHAIN {
        let next = records.iter().find_map(|r| match r.data() {
            RData::CNAME(target) if r.dns_class() == DNSClass::IN && r.name() == current => {
                Some((r.ttl(), &target.0))
            }
            _ => None,
        });
        let Some((cname_ttl, target)) = next else {
            return collect_addresses(question, message, current, ttl, cnames);
        };
        let normalized = query::normalize_name(target);
        if target == &question.name || cnames.contains(&normalized) {
            return None; // loop
        }
        ttl = ttl.min(cname_ttl);
        cnames.push(normalized);
        current = target;
    }
    None
}

fn collect_addresses(
    question: &Question,
    message: &Message,
    owner: &Name,
    mut ttl: u32,
    cnames: Vec<String>,
) -> Option<Answer> {
    let mut addresses: Vec<IpAddr> = Vec::new();
    for record in message.answers() {
        if record.dns_class() != DNSClass::IN || record.name() != owner {
            continue;
        }
        let address = match (question.qtype, record.data()) {
            (RecordType::A, RData::A(a)) => IpAddr::V4(a.0),
            (RecordType::AAAA, RData::AAAA(aaaa)) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        ttl = ttl.min(record.ttl());
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    if addresses.is_empty() {
        return None;
    }
    Some(Answer {
        name: DnsName::parse(&question.normalized_name()).ok()?,
        addresses,
        cnames,
        ttl,
    })
}

/// The whole reading path over raw bytes, as the forwarder and the shim apply it: `None` when
/// the response is not accepted for the query or carries nothing to record. The fuzz entry point.
pub fn read_exchange(query: &[u8], response: &[u8]) -> Option<Answer> {
    let head = query::read_head(query)?;
    let question = head.question?;
    check_response(head.id, Some(&question), response).ok()?;
    match read_answer(&question, response) {
        Reading::Record(answer) => Some(answer),
        Reading::Nothing | Reading::Unparseable => None,
    }
}

#[cfg(test)]
mod tests;
