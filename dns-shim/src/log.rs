//! The `dns` line: one JSON line per answered (or refused / failed) query, written through
//! `egressgate_log` like the gateway's lines.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// One answered (or refused / failed) query.
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            json,
            r#"{"time":"2026-11-26T09:20:00.123Z","event":"dns","pod":"198.18.1.2","server":"198.19.0.66:53","transport":"udp","name":"api.example.test","type":"A","rcode":"NOERROR","addresses":["198.19.0.10"],"cnames":["lb.cdn.example.test"],"ttl":60,"upstream":"198.19.0.53:53","upstreamMs":1.2}"#
        );
    }
}
