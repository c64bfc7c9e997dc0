//! The `dns` line: one JSON line per answered (or refused / failed) query, written through
//! `egressgate_log` like the gateway's lines.
//!
//! The round queues a [`DnsRecord`] (what the line needs, owned; no text) and the `json-log`
//! thread serializes it as a [`DnsLine`], so the listener's task spends no time on JSON.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use egressgate_log::LineSource;
use hickory_proto::rr::{Name, RecordType};
use serde::Serialize;

use crate::query::{normalize_name, Rcode};

/// One answered (or refused / failed) query, as written.
#[derive(Debug, Serialize)]
pub(crate) struct DnsLine<'a> {
    pub time: String,
    pub event: &'static str,
    pub pod: IpAddr,
    pub server: SocketAddr,
    pub transport: &'static str,
    pub name: Option<&'a str>,
    #[serde(rename = "type")]
    pub qtype: Option<String>,
    pub rcode: String,
    pub addresses: &'a [IpAddr],
    pub cnames: &'a [String],
    pub ttl: Option<u32>,
    pub upstream: Option<SocketAddr>,
    #[serde(rename = "upstreamMs")]
    pub upstream_ms: Option<f64>,
}

/// What a [`DnsLine`] is made of, taken when the query ends and turned into text later.
#[derive(Debug)]
pub(crate) struct DnsRecord {
    pub time: SystemTime,
    pub pod: IpAddr,
    pub server: SocketAddr,
    pub transport: &'static str,
    /// The question's name as asked (normalised when written).
    pub name: Option<Name>,
    pub qtype: Option<RecordType>,
    pub rcode: Option<Rcode>,
    pub addresses: Vec<IpAddr>,
    pub cnames: Vec<String>,
    pub ttl: Option<u32>,
    /// The upstream that answered, and how long it took.
    pub upstream: Option<(SocketAddr, Duration)>,
}

/// A line's fixed part, field names and punctuation included, with room for its numbers.
const FIXED_LEN: usize = 240;

impl LineSource for DnsRecord {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let name = self.name.as_ref().map(normalize_name);
        let line = DnsLine {
            time: egressgate_log::rfc3339(self.time),
            event: "dns",
            pod: self.pod,
            server: self.server,
            transport: self.transport,
            name: name.as_deref(),
            qtype: self.qtype.map(|t| t.to_string()),
            rcode: self.rcode.map_or_else(String::new, |r| r.to_string()),
            addresses: &self.addresses,
            cnames: &self.cnames,
            ttl: self.ttl,
            upstream: self.upstream.map(|(addr, _)| addr),
            upstream_ms: self
                .upstream
                .map(|(_, elapsed)| (elapsed.as_secs_f64() * 1e4).round() / 10.0),
        };
        serde_json::to_writer(out, &line)
    }

    fn estimated_len(&self) -> usize {
        let name = self.name.as_ref().map_or(0, Name::len);
        let cnames: usize = self.cnames.iter().map(|c| c.len() + 3).sum();
        // An IPv6 address quoted, with its comma.
        FIXED_LEN + name + self.addresses.len() * 42 + cnames
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    const EXPECTED: &str = r#"{"time":"2026-11-26T09:20:00.123Z","event":"dns","pod":"198.18.1.2","server":"198.19.0.66:53","transport":"udp","name":"api.example.test","type":"A","rcode":"NOERROR","addresses":["198.19.0.10"],"cnames":["lb.cdn.example.test"],"ttl":60,"upstream":"198.19.0.53:53","upstreamMs":1.2}"#;

    #[test]
    fn line_has_the_documented_fields() {
        let addresses = ["198.19.0.10".parse().expect("ip")];
        let cnames = ["lb.cdn.example.test".to_owned()];
        let line = DnsLine {
            time: "2026-11-26T09:20:00.123Z".to_owned(),
            event: "dns",
            pod: "198.18.1.2".parse().expect("ip"),
            server: "198.19.0.66:53".parse().expect("addr"),
            transport: "udp",
            name: Some("api.example.test"),
            qtype: Some("A".to_owned()),
            rcode: "NOERROR".to_owned(),
            addresses: &addresses,
            cnames: &cnames,
            ttl: Some(60),
            upstream: Some("198.19.0.53:53".parse().expect("addr")),
            upstream_ms: Some(1.2),
        };
        let json = serde_json::to_string(&line).expect("serialises");
        assert_eq!(json, EXPECTED);
    }

    #[test]
    fn a_record_written_later_gives_the_same_line() {
        let record = DnsRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_795_684_800_123),
            pod: "198.18.1.2".parse().expect("ip"),
            server: "198.19.0.66:53".parse().expect("addr"),
            transport: "udp",
            // As a stub may ask it: mixed case, fully qualified.
            name: Some(Name::from_ascii("Api.Example.TEST.").expect("name")),
            qtype: Some(RecordType::A),
            rcode: Some(Rcode::NOERROR),
            addresses: vec!["198.19.0.10".parse().expect("ip")],
            cnames: vec!["lb.cdn.example.test".to_owned()],
            ttl: Some(60),
            upstream: Some((
                "198.19.0.53:53".parse().expect("addr"),
                Duration::from_micros(1_234),
            )),
        };
        let mut out = Vec::new();
        record.write_json(&mut out).expect("serialises");
        assert_eq!(String::from_utf8(out).expect("utf-8"), EXPECTED);
        assert!(record.estimated_len() >= EXPECTED.len());
    }

    #[test]
    fn a_refused_query_without_answer_or_upstream_writes_nulls_and_empty_lists() {
        let record = DnsRecord {
            time: UNIX_EPOCH,
            pod: "fd00::2".parse().expect("ip"),
            server: "[fd00::53]:53".parse().expect("addr"),
            transport: "tcp",
            name: None,
            qtype: None,
            rcode: None,
            addresses: Vec::new(),
            cnames: Vec::new(),
            ttl: None,
            upstream: None,
        };
        let mut out = Vec::new();
        record.write_json(&mut out).expect("serialises");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"time":"1970-01-01T00:00:00.000Z","event":"dns","pod":"fd00::2","server":"[fd00::53]:53","transport":"tcp","name":null,"type":null,"rcode":"","addresses":[],"cnames":[],"ttl":null,"upstream":null,"upstreamMs":null}"#
        );
    }
}
