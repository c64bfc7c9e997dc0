//! One intercepted TCP connection, stage by stage:
//!
//! ```text
//! accept ─ identify pod ─ select policies ─ names this pod resolved to the destination
//!        ─ grants (port, peer) ─ [tcp grant: no peek] ─ peek first message ─ authorize
//!        ─ log decision ─ deny: reset │ allow/audit: connect, replay peeked bytes, splice ─ close
//! ```
//!
//! TPROXY keeps the original destination as the accepted socket's local address. The gateway
//! connects upstream from the node's own address; only the pod's bytes are relayed, untouched.

mod addr;
mod postgres;
mod reader;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use egressgate_dns_shim::NameTable;
use egressgate_policy::{Grant, GrantPeer, Selection};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::config::{self, UnselectedPods};
use crate::decision::{self, EncryptedPostgres, Limit, PolicyDenial, Reason, Verdict};
use crate::events::{CloseLine, DecisionLine, PodName};
use crate::identity::Pod;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::peek::{self, Sniffed};
use crate::pipes::PIPES;
use crate::protocol::Protocol;
use crate::relay;
use crate::store::Store;
pub use addr::{ClientAddr, OrigDstAddr};
use reader::{Detail, PeekReader, Stop};

/// The `namespace` metric label of connections from no known pod.
pub const UNKNOWN_NAMESPACE: &str = "_unknown";

/// How long an allowed connection may take to reach its destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    store: Arc<Store>,
    table: Arc<NameTable>,
    metrics: Metrics,
    peek: config::Peek,
    unselected: UnselectedPods,
    unknown_sources: UnselectedPods,
    idle_timeout: Duration,
    unknown_source_wait: Duration,
    limits: Arc<Limits>,
    next_id: AtomicU64,
}

/// What [`Proxy::decide`] concluded, and what it already holds for the relay.
#[derive(Debug)]
struct Decided {
    verdict: Verdict,
    /// Client bytes read while deciding; replayed upstream from `forwarded`.
    reader: Option<PeekReader>,
    /// Opened while deciding (PostgreSQL encryption negotiation).
    upstream: Option<TcpStream>,
}

/// The winning grant: what the log names, and the names it used.
#[derive(Debug)]
struct Granted {
    policy: String,
    rule: usize,
    names: Vec<String>,
}

/// A decision before the audit rule: the grant, or why none.
type Outcome = Result<Granted, Stop>;

/// Decrements the active gauge however the connection ends.
struct ActiveGuard(prometheus::IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Proxy {
    pub fn new(
        store: Arc<Store>,
        table: Arc<NameTable>,
        metrics: Metrics,
        limits: Arc<Limits>,
        config: &config::Config,
    ) -> Self {
        Proxy {
            store,
            table,
            metrics,
            peek: config.peek.clone(),
            unselected: config.unselected_pods,
            unknown_sources: config.unknown_sources,
            idle_timeout: config.connections.idle_timeout(),
            unknown_source_wait: config.identity.unknown_source_wait(),
            limits,
            next_id: AtomicU64::new(1),
        }
    }

    /// Accepts until `shutdown`; each connection runs in its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl std::future::Future) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((client, source)) => {
                        tokio::spawn(Arc::clone(&self).handle(client, ClientAddr(source)));
                    }
                    Err(e) => {
                        // EMFILE and friends: free the descriptors the pipe pool keeps, and back
                        // off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        PIPES.release_kept();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    async fn handle(self: Arc<Self>, mut client: TcpStream, source: ClientAddr) {
        let accepted = Instant::now();
        self.metrics.connections_active.inc();
        let _active = ActiveGuard(self.metrics.connections_active.clone());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let destination = match client.local_addr() {
            Ok(addr) => OrigDstAddr(addr),
            Err(e) => {
                tracing::debug!(error = %e, "connection gone before it was examined");
                return;
            }
        };
        let mut line = DecisionLine::new(id, source, destination);
        let permit = self.limits.connection();
        let decided = match permit {
            Some(_) => {
                self.decide(&mut client, source, destination, &mut line, accepted)
                    .await
            }
            None => {
                // No waiting here, but name the pod if it is known.
                line.pod = self
                    .store
                    .current()
                    .identities
                    .lookup(source.ip())
                    .map(|pod| PodName {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                    });
                line.reason = Reason::Limit(Limit::ConnectionLimit);
                Decided {
                    verdict: Verdict::Deny,
                    reader: None,
                    upstream: None,
                }
            }
        };
        line.verdict = decided.verdict;
        line.decision_us = u64::try_from(accepted.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics
            .decision_duration
            .observe(accepted.elapsed().as_secs_f64());
        // Sources that are no known pod get a value no namespace can have (RFC 1123 labels have
        // no `_`): an empty label would take the scrape target's `namespace` instead.
        let namespace = line
            .pod
            .as_ref()
            .map_or(UNKNOWN_NAMESPACE, |pod| pod.namespace.as_str());
        self.metrics
            .connections
            .with_label_values(&[
                line.verdict.as_str(),
                line.reason.as_str(),
                Protocol::label(line.protocol),
                namespace,
            ])
            .inc();
        if line.verdict != Verdict::Allow {
            self.metrics
                .count_denied(namespace, &wanted_destination(&line));
        }
        line.print();

        if decided.verdict == Verdict::Deny {
            reset(client);
            return;
        }
        self.relay(id, client, destination, decided, accepted).await;
    }

    /// Runs every stage up to the verdict, filling `line` as facts are learned.
    async fn decide(
        &self,
        client: &mut TcpStream,
        source: ClientAddr,
        destination: OrigDstAddr,
        line: &mut DecisionLine,
        accepted: Instant,
    ) -> Decided {
        let snapshot = self
            .store
            .pod_by_ip(source.ip(), accepted + self.unknown_source_wait)
            .await;
        let fallback = |setting: UnselectedPods| Decided {
            verdict: match setting {
                UnselectedPods::Allow => Verdict::Allow,
                UnselectedPods::Deny => Verdict::Deny,
            },
            reader: None,
            upstream: None,
        };

        let Some(pod) = snapshot.identities.lookup(source.ip()) else {
            line.reason = Reason::UnknownSource;
            return fallback(self.unknown_sources);
        };
        line.reason = Reason::Unselected;
        line.pod = Some(PodName {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        });
        let selection = pod.select(&snapshot.policies);
        if selection.is_empty() {
            return fallback(self.unselected);
        }

        resolved_names(
            &self.table,
            pod,
            destination,
            &mut line.names,
            &mut line.cnames,
        );
        let names: Vec<&str> = line.names.iter().map(String::as_str).collect();
        let grants = decision::effective_grants(
            &selection,
            selection.grants(destination.ip(), destination.port(), &names),
        );

        let mut reader = PeekReader::new(accepted + self.peek.timeout(), self.peek.max_bytes);
        let mut upstream = None;
        let needs_peek = decision::tcp_grant(&grants).is_none();
        // Held while this connection waits for its first message.
        let peek_permit = needs_peek.then(|| self.limits.peek(source.ip()));
        let outcome = if matches!(peek_permit, Some(None)) {
            Err(Stop::new(Reason::Limit(Limit::PeekLimit)))
        } else if grants.is_empty() {
            let reason = decision::no_grant_reason(!names.is_empty());
            // Still read what the pod sends, for the log: which SNI or Host it wanted is what a
            // policy author needs. Whatever the peek finds, no rule allows the connection.
            let _ = self
                .peek_and_authorize(&[], client, &mut reader, &mut upstream, line)
                .await;
            Err(Stop::new(reason))
        } else if let Some(grant) = decision::tcp_grant(&grants) {
            line.protocol = Some(Protocol::Tcp);
            Ok(describe(grant))
        } else {
            self.peek_and_authorize(&grants, client, &mut reader, &mut upstream, line)
                .await
        };
        if let Ok(granted) = &outcome {
            // An allowed connection keeps the names it used alive for another idle grace; a
            // denied attempt must not.
            let now = std::time::Instant::now();
            for &ip in &pod.ips {
                for name in &granted.names {
                    self.table.touch(ip, destination.ip(), name, now);
                }
            }
        }
        self.conclude(&selection, outcome, line, reader, upstream)
    }

    /// Applies the audit rule and records the outcome in `line`.
    fn conclude(
        &self,
        selection: &Selection<'_>,
        outcome: Outcome,
        line: &mut DecisionLine,
        reader: PeekReader,
        upstream: Option<TcpStream>,
    ) -> Decided {
        let verdict = match &outcome {
            Ok(granted) => {
                line.reason = Reason::Allowed;
                line.policy = Some(granted.policy.clone());
                line.rule = Some(granted.rule);
                Verdict::Allow
            }
            Err(stop) => {
                line.reason = stop.reason;
                line.detail = stop.detail.as_ref().map(Detail::code);
                decision::denial_verdict(selection, stop.reason)
            }
        };
        Decided {
            verdict,
            reader: Some(reader),
            upstream,
        }
    }

    /// Reads the first message and checks it against the grants.
    async fn peek_and_authorize(
        &self,
        grants: &[Grant<'_>],
        client: &mut TcpStream,
        reader: &mut PeekReader,
        upstream: &mut Option<TcpStream>,
        line: &mut DecisionLine,
    ) -> Outcome {
        let started = Instant::now();
        let sniffed = reader.until(client, 0, peek::sniff).await;
        line.protocol = sniffed.as_ref().ok().copied().map(Protocol::from);
        let outcome = match sniffed {
            Err(stop) => Err(stop),
            Ok(Sniffed::TlsHandshake) => self.authorize_tls(grants, client, reader, line).await,
            Ok(Sniffed::Http1) => {
                match reader.until(client, 0, peek::http::peek_request_head).await {
                    Ok(head) => {
                        line.host = head.host.clone();
                        decision::authorize_http(grants, head.host.as_deref())
                            .map_err(Stop::new)
                            .map(describe)
                    }
                    Err(stop) => Err(stop),
                }
            }
            Ok(Sniffed::Http2Preface) => {
                Err(Stop::new(Reason::Policy(PolicyDenial::ProtocolMismatch)))
            }
            Ok(Sniffed::Postgres) => {
                if decision::has_postgres_grant(grants) {
                    let require_sni = self.peek.require_sni;
                    postgres::negotiate(require_sni, grants, client, reader, upstream, line).await
                } else {
                    postgres::observe(client, reader, line).await;
                    Err(Stop::new(Reason::Policy(PolicyDenial::ProtocolMismatch)))
                }
            }
            Ok(Sniffed::Unknown) => Err(Stop::new(Reason::Policy(PolicyDenial::ProtocolMismatch))),
        };
        self.metrics
            .peek_duration
            .with_label_values(&[Protocol::label(line.protocol)])
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// A TLS ClientHello: `tls` rules, or PostgreSQL direct TLS (ALPN `postgresql`).
    async fn authorize_tls(
        &self,
        grants: &[Grant<'_>],
        client: &mut TcpStream,
        reader: &mut PeekReader,
        line: &mut DecisionLine,
    ) -> Outcome {
        let hello = reader
            .until(client, 0, peek::tls::peek_client_hello)
            .await?;
        line.sni = hello.server_name.clone();
        line.alpn = hello.alpn.clone();
        line.ech = Some(hello.ech_offered);
        let sni = hello.server_name.as_deref();
        let direct_postgres = hello.alpn.iter().any(|p| p == "postgresql");
        let authorization = if direct_postgres && decision::has_postgres_grant(grants) {
            line.protocol = Some(Protocol::Postgresql);
            line.postgresql_encryption = Some("tls");
            let encrypted = EncryptedPostgres::Tls { sni };
            decision::authorize_encrypted_postgres(grants, encrypted, self.peek.require_sni)
        } else {
            decision::authorize_tls(grants, sni, self.peek.require_sni)
        };
        authorization.map(describe).map_err(Stop::new)
    }

    /// Connects to `destination` (unless negotiation already did), replays the peeked bytes,
    /// and splices.
    async fn relay(
        &self,
        id: u64,
        client: TcpStream,
        destination: OrigDstAddr,
        decided: Decided,
        accepted: Instant,
    ) {
        let replay = decided
            .reader
            .map(PeekReader::into_unforwarded)
            .unwrap_or_default();
        let upstream = match decided.upstream {
            Some(upstream) => Ok(upstream),
            None => connect(destination).await,
        };
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(e) => {
                self.metrics.upstream_connect_errors.inc();
                reset(client);
                CloseLine::print(
                    id,
                    (0, 0),
                    elapsed_ms(accepted),
                    Some(format!("connect: {e}")),
                );
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let relayed = relay::relay(client, upstream, replay, self.idle_timeout).await;
        self.metrics
            .bytes
            .with_label_values(&["up"])
            .inc_by(relayed.bytes_up);
        self.metrics
            .bytes
            .with_label_values(&["down"])
            .inc_by(relayed.bytes_down);
        CloseLine::print(
            id,
            (relayed.bytes_up, relayed.bytes_down),
            elapsed_ms(accepted),
            relayed.error.map(|e| e.to_string()),
        );
    }
}

fn describe(grant: &Grant<'_>) -> Granted {
    Granted {
        policy: grant.policy.to_string(),
        rule: grant.rule,
        names: match &grant.peer {
            GrantPeer::Names(names) => names.clone(),
            GrantPeer::Cidr(_) => Vec::new(),
        },
    }
}

/// What the pod tried to reach, for the denied-destinations metric: the name it sent, else the
/// name it resolved, else the address.
fn wanted_destination(line: &DecisionLine) -> String {
    line.sni
        .clone()
        .or_else(|| line.host.clone())
        .or_else(|| line.names.first().cloned())
        .unwrap_or_else(|| line.destination.ip().to_canonical().to_string())
}

/// The live names this pod resolved to `destination`, under any of its addresses, each once;
/// and the CNAMEs on the way, for the log.
fn resolved_names(
    table: &NameTable,
    pod: &Pod,
    destination: OrigDstAddr,
    names: &mut Vec<String>,
    cnames: &mut Vec<String>,
) {
    let now = std::time::Instant::now();
    for &ip in &pod.ips {
        table.lookup_each(ip, destination.ip(), now, |name, chain| {
            if names.iter().any(|n| n == name) {
                return;
            }
            names.push(name.to_owned());
            for cname in chain {
                if !cnames.iter().any(|c| **c == **cname) {
                    cnames.push(cname.to_string());
                }
            }
        });
    }
}

/// Opens the upstream connection to the original destination.
async fn connect(destination: OrigDstAddr) -> std::io::Result<TcpStream> {
    let destination = destination.0;
    // The socket is made before connecting, so that running out of descriptors can free the
    // pipe pool's and try again.
    let socket = PIPES.retry_out_of_descriptors(|| match destination {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    })?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(destination))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Denied connections are reset, so the client fails at once instead of waiting for data.
fn reset(client: TcpStream) {
    if let Err(e) = client.set_zero_linger() {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0; closing normally");
    }
    drop(client);
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}
