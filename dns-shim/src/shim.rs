//! The shim itself: configuration, and the one pipeline every intercepted query goes through
//! (read → refuse or forward → record → reply), whichever transport brought it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use egressgate_log::{rfc3339_now, write_observed_line};
use prometheus::Registry;

use crate::answer::{read_answer, Answer, Reading};
use crate::client::{Begin, Client, Handler, Transport};
use crate::forward::{Done, Exchange, ForwardError, Forwarder, UdpExchanges};
use crate::log::DnsLine;
use crate::metrics::{Metrics, QueryResult};
use crate::persist::{Journal, Unsaved};
use crate::query::{self, error_reply, read_head, truncated_reply, MessageHead, Rcode};
use crate::table::{NameTable, PodIp};
use crate::{tcp, udp};

/// RFC 1035 §4.2.1: without EDNS a UDP answer may not exceed 512 octets.
const CLASSIC_UDP_PAYLOAD: usize = 512;

/// What to do with a query the pod sent to a server that is not a trusted upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForeignServerPolicy {
    /// Answer it (as that server) with the trusted upstream's answer.
    #[default]
    Forward,
    /// Answer REFUSED.
    Refuse,
}

#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// Trusted resolvers, tried in order. The only servers the shim ever asks.
    pub upstreams: Vec<SocketAddr>,
    pub foreign_servers: ForeignServerPolicy,
    /// Per upstream attempt; the TCP retry after a TC answer gets its own.
    pub upstream_timeout: Duration,
    /// A pod's TCP connection is closed after this long without a complete query.
    pub tcp_idle_timeout: Duration,
}

/// Bound transparent sockets, ready for [`DnsShim::serve`].
#[derive(Debug)]
pub struct ShimListeners {
    pub(crate) udp: udp::UdpListener,
    pub(crate) tcp: tokio::net::TcpListener,
}

impl ShimListeners {
    pub fn udp_local_addr(&self) -> SocketAddr {
        self.udp.local_addr()
    }

    pub fn tcp_local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The UDP and TCP sockets, to hand over to a successor (which serves the same sockets).
    pub fn fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.udp.as_fd(), self.tcp.as_fd())
    }
}

/// See the crate docs.
#[derive(Debug)]
pub struct DnsShim {
    config: ShimConfig,
    table: Arc<NameTable>,
    forwarder: Forwarder,
    metrics: Metrics,
    /// Saves each record before its reply leaves, when the table is persisted.
    journal: Option<Arc<Journal>>,
}

/// How one query ended, for [`DnsShim::finish`].
#[derive(Debug)]
struct Outcome<'a> {
    result: QueryResult,
    reply: Option<Vec<u8>>,
    head: Option<&'a MessageHead>,
    rcode: Option<Rcode>,
    answer: Option<Answer>,
    upstream: Option<(SocketAddr, Duration)>,
}

impl Outcome<'_> {
    fn dropped() -> Self {
        Outcome {
            result: QueryResult::Dropped,
            reply: None,
            head: None,
            rcode: None,
            answer: None,
            upstream: None,
        }
    }
}

// === impl DnsShim ===

impl DnsShim {
    pub fn new(
        config: ShimConfig,
        table: Arc<NameTable>,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let metrics = Metrics::register(registry, &table)?;
        let forwarder = Forwarder::new(
            config.upstreams.clone(),
            config.upstream_timeout,
            metrics.clone(),
        );
        Ok(DnsShim {
            config,
            table,
            forwarder,
            metrics,
            journal: None,
        })
    }

    /// Saves every record in `journal` too, before the pod gets its answer.
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Binds transparent UDP + TCP sockets on `addr` (v4, or v6 with IPV6_V6ONLY). Port 0 binds
    /// the same free port for both. Needs CAP_NET_ADMIN (IP_TRANSPARENT).
    pub fn bind(addr: SocketAddr) -> io::Result<ShimListeners> {
        let udp = udp::bind(addr)?;
        let tcp_addr = SocketAddr::new(addr.ip(), udp.local_addr().port());
        let tcp = tcp::bind(tcp_addr)?;
        Ok(ShimListeners { udp, tcp })
    }

    /// Serves sockets a predecessor handed over (see [`ShimListeners::fds`]): bound, listening
    /// and configured as [`DnsShim::bind`] left them.
    pub fn adopt(udp: OwnedFd, tcp: OwnedFd) -> io::Result<ShimListeners> {
        Ok(ShimListeners {
            udp: udp::adopt(udp)?,
            tcp: tcp::adopt(tcp)?,
        })
    }

    /// Serves both listeners until `stop` completes. Then it reads no more queries, answers
    /// those it already read, closes pod TCP connections between queries, and returns.
    pub async fn serve(self: Arc<Self>, listeners: ShimListeners, stop: impl Future<Output = ()>) {
        let ShimListeners { udp, tcp } = listeners;
        tracing::info!(
            udp = %udp.local_addr(),
            tcp = ?tcp.local_addr().ok(),
            upstreams = ?self.config.upstreams,
            "dns shim listening"
        );
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        let stopper = async move {
            stop.await;
            let _ = stopping.send(true);
        };
        tokio::join!(
            udp::serve(self.clone(), udp, stopped.clone()),
            tcp::serve(self.clone(), tcp, self.config.tcp_idle_timeout, stopped),
            stopper,
        );
        tracing::info!("dns shim stopped");
    }

    /// A reply the shim builds itself; dropped when the question is unreadable.
    fn error_outcome<'a>(&self, query: &[u8], head: &'a MessageHead, rcode: Rcode) -> Outcome<'a> {
        let Some(reply) = error_reply(query, head, rcode) else {
            return Outcome::dropped();
        };
        let result = if rcode == Rcode::REFUSED {
            QueryResult::Refused
        } else {
            QueryResult::Servfail
        };
        Outcome {
            result,
            reply: Some(reply),
            head: Some(head),
            rcode: Some(rcode),
            answer: None,
            upstream: None,
        }
    }

    /// Every query ends here: one metric, one log line if the pod gets an answer.
    fn finish(&self, client: Client, outcome: Outcome<'_>) -> Option<Vec<u8>> {
        self.metrics.query(client.transport, outcome.result);
        if outcome.reply.is_none() {
            tracing::debug!(pod = %client.pod, server = %client.server, "query dropped");
            return None;
        }
        let question = outcome.head.and_then(|h| h.question.as_ref());
        let name = question.map(|q| q.normalized_name());
        let (addresses, cnames, ttl) = match &outcome.answer {
            Some(a) => (&a.addresses[..], &a.cnames[..], Some(a.ttl)),
            None => (&[][..], &[][..], None),
        };
        write_observed_line(&DnsLine {
            time: rfc3339_now(),
            event: "dns",
            pod: client.pod.ip(),
            server: client.server,
            transport: client.transport.as_str(),
            name: name.as_deref(),
            qtype: question.map(|q| q.qtype.to_string()),
            rcode: outcome.rcode.map_or_else(String::new, |r| r.to_string()),
            addresses,
            cnames,
            ttl,
            upstream: outcome.upstream.map(|(addr, _)| addr),
            upstream_ms: outcome
                .upstream
                .map(|(_, elapsed)| (elapsed.as_secs_f64() * 1e4).round() / 10.0),
        });
        outcome.reply
    }

    /// The rest of the pipeline once the upstreams answered (or failed): records the answer
    /// (in the table, and in `unsaved` for the journal, which the caller saves before sending
    /// the reply), and returns the reply to send to the pod, if any.
    fn complete_exchange(
        &self,
        query: &[u8],
        head: &MessageHead,
        client: Client,
        result: Result<Exchange, ForwardError>,
        unsaved: &mut Unsaved,
    ) -> Option<Vec<u8>> {
        let exchange = match result {
            Ok(exchange) => exchange,
            Err(e) => {
                tracing::debug!(pod = %client.pod, error = %e, "answering SERVFAIL");
                return self.finish(client, self.error_outcome(query, head, Rcode::SERVFAIL));
            }
        };
        let reading = match &head.question {
            Some(question) => read_answer(question, &exchange.response),
            None => Reading::Unparseable,
        };
        let (result, answer) = match reading {
            Reading::Record(answer) => {
                // Recorded (and saved) before the pod can see the answer and connect.
                let pod = PodIp(client.pod.ip());
                let ttl = self.table.record(pod, &answer, std::time::Instant::now());
                if self.journal.is_some() {
                    unsaved.add(pod, &answer, ttl);
                }
                (QueryResult::Answered, Some(answer))
            }
            Reading::Nothing => (QueryResult::Answered, None),
            Reading::Unparseable => (QueryResult::Passthrough, None),
        };
        let mut reply = exchange.response;
        if client.transport == Transport::Udp && reply.len() > udp_payload_limit(query) {
            if let Some(truncated) = truncated_reply(&reply, &exchange.head) {
                reply = truncated;
            }
        }
        query::set_id(&mut reply, head.id);
        let outcome = Outcome {
            result,
            reply: Some(reply),
            head: Some(head),
            rcode: Some(exchange.head.rcode),
            answer,
            upstream: Some((exchange.upstream, exchange.elapsed)),
        };
        self.finish(client, outcome)
    }

    /// The pod addressed a trusted upstream (by address; the port is whatever TPROXY matched).
    fn is_trusted(&self, server: SocketAddr) -> bool {
        self.config.upstreams.iter().any(|u| u.ip() == server.ip())
    }
}

// === impl Handler for DnsShim ===

impl Handler for DnsShim {
    async fn handle(&self, query: &[u8], client: Client) -> Option<Vec<u8>> {
        let head = match self.begin(query, client) {
            Begin::Reply(reply) => return reply,
            Begin::Forward(head) => head,
        };
        let result = self.forwarder.exchange_tcp(query, &head).await;
        let mut unsaved = Unsaved::default();
        let reply = self.complete_exchange(query, &head, client, result, &mut unsaved);
        self.save(&mut unsaved);
        reply
    }

    fn begin(&self, query: &[u8], client: Client) -> Begin {
        let Some(head) = read_head(query) else {
            return Begin::Reply(self.finish(client, Outcome::dropped()));
        };
        // Answering a response could turn the shim into a reflector.
        if head.is_response {
            return Begin::Reply(self.finish(client, Outcome::dropped()));
        }
        if self.config.foreign_servers == ForeignServerPolicy::Refuse
            && !self.is_trusted(client.server)
        {
            let refused = self.error_outcome(query, &head, Rcode::REFUSED);
            return Begin::Reply(self.finish(client, refused));
        }
        Begin::Forward(head)
    }

    fn complete(&self, done: Done<Client>, unsaved: &mut Unsaved) -> Option<Vec<u8>> {
        self.complete_exchange(&done.query, &done.head, done.context, done.result, unsaved)
    }

    fn save(&self, unsaved: &mut Unsaved) {
        if let Some(journal) = &self.journal {
            journal.save(unsaved);
        }
    }

    fn udp_exchanges(&self) -> UdpExchanges<Client> {
        UdpExchanges::new(self.forwarder.clone())
    }

    fn note_dropped(&self, transport: Transport) {
        self.metrics.query(transport, QueryResult::Dropped);
    }
}

/// The largest UDP answer the pod accepts: its EDNS payload size (RFC 6891 §6.2.3), else 512.
fn udp_payload_limit(query: &[u8]) -> usize {
    query::edns_udp_payload(query).map_or(CLASSIC_UDP_PAYLOAD, |size| {
        usize::from(size).max(CLASSIC_UDP_PAYLOAD)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_limit_is_the_edns_payload_size_or_512() {
        let dig = include_bytes!("testdata/dig-9.18-udp-query-api.example.test-A.bin");
        let glibc = include_bytes!(
            "testdata/glibc-2.36-getaddrinfo-k8s-ndots5/07-query-api.example.test-A.bin"
        );
        assert_eq!(udp_payload_limit(dig), 1232);
        assert_eq!(udp_payload_limit(glibc), 512);
        assert_eq!(udp_payload_limit(&[0u8; 5]), 512);
    }
}
