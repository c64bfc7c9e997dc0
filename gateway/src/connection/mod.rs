//! One intercepted TCP connection, stage by stage (docs/ARCHITECTURE.md draws it):
//!
//! ```text
//! accept ─ identify ─ select ─ names ─ grants ─ [tcp grant: no peek] ─ peek ─ authorize
//!        ─ finish (decision line, metrics) ─ deny: reset │ allow/audit: connect
//!        ─ [allowed ClientHello: retry: HelloRetryRequest? second ClientHello, same name,
//!           or a second decision line and reset] ─ relay ─ close
//!        (allowed HTTP/1: relay_http, every later request through `gate`, decided like the
//!        first: a refused one gets its own decision line and ends the connection)
//! ```
//!
//! Each stage is a plain function that returns the next stage's input or a [`Stop`] (the typed
//! denial); what they learn goes into one [`Context`], which `finish` reads for the decision line
//! and the metrics. The stages up to the verdict take any `AsyncRead + AsyncWrite` client and
//! any [`Dial`], so unit tests run them on in-memory streams.
//!
//! TPROXY keeps the original destination as the accepted socket's local address. The gateway
//! connects upstream from the node's own address; only the pod's bytes are relayed, untouched.

mod addr;
pub(crate) mod context;
pub(crate) mod finish;
mod peeking;
mod postgres;
mod reader;
mod retry;
pub(crate) mod stages;
pub(crate) mod stop;
mod upgrade;
mod upstream;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use egressgate_dns_shim::{NameTable, PodIp};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{self, UnselectedPods};
use crate::decision::{self, Limit, PodFault, Reason, Verdict};
use crate::events;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::peek::http::Host;
use crate::peek::{self, Peek, Peeked};
use crate::pipes::PIPES;
use crate::protocol::Protocol;
use crate::relay::{self, Next, Seen};
use crate::store::{Snapshot, Store};
pub use addr::{ClientAddr, OrigDstAddr};
use context::{Context, Granted, Streams};
use egressgate_policy::{DnsName, Selection};
use reader::PeekReader;
use stop::Stop;
use upstream::{Dial, FirstSend, TcpDial, WritesFirst};

/// The upstream connection of an allowed connection, once the verdict is known.
enum Dialled {
    /// Open, by the peek stage (the PostgreSQL SSLRequest negotiation) or within connect(2)
    /// (a near upstream); or failed at once.
    Done(std::io::Result<TcpStream>),
    /// The handshake is under way.
    Connecting(upstream::Connecting),
}

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

/// A listener with what its acceptor needs; one task at a time holds it.
struct Acceptor {
    listener: TcpListener,
    shutdown: BoxFuture<'static, ()>,
    /// Dropped with the acceptor: tells `Proxy::serve` that accepting ended.
    _done: oneshot::Sender<()>,
}

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

    /// The `connection` number of the next decision line: TCP connections and UDP flows share
    /// one sequence.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Accepts until `shutdown`.
    ///
    /// The listener passes from task to task: the task that accepts a connection hands the
    /// listener on to a new task and then serves its connection. The next `accept4` (which
    /// mostly finds the queue empty) so runs once this connection waits, after its first bytes
    /// went upstream, instead of before this connection's first poll.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let (done, ended) = oneshot::channel();
        let acceptor = Acceptor {
            listener,
            shutdown: Box::pin(shutdown),
            _done: done,
        };
        tokio::spawn(self.accept(acceptor));
        // Err once the acceptor is dropped: it saw `shutdown`, or its runtime stopped.
        let _ = ended.await;
    }

    /// Accepts one connection (or stops), hands `acceptor` on, and serves the connection.
    /// Boxed: the task spawns its own kind.
    fn accept(self: Arc<Self>, mut acceptor: Acceptor) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            loop {
                tokio::select! {
                    () = &mut acceptor.shutdown => return,
                    accepted = acceptor.listener.accept() => match accepted {
                        Ok((client, source)) => {
                            tokio::spawn(Arc::clone(&self).accept(acceptor));
                            return self.handle(client, ClientAddr(source)).await;
                        }
                        Err(e) => {
                            // EMFILE and friends: free the descriptors the pipe pool keeps, and
                            // back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            PIPES.release_kept();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        })
    }

    async fn handle(self: Arc<Self>, client: TcpStream, source: ClientAddr) {
        let accepted = Instant::now();
        self.metrics.connections_active.inc();
        let _active = ActiveGuard(self.metrics.connections_active.clone());
        let id = self.next_id();
        // Held until the connection closes: `connections.max` counts open connections.
        let permit = self.limits.connection();
        // Each phase's future is boxed: the task itself stays small, so what an idle relayed
        // connection holds is the relay's state, not the largest stage's (the peek's).
        let open = self.open(id, client, source, accepted, permit.is_some());
        let Some(opened) = Box::pin(open).await else {
            return;
        };
        let Opened {
            streams,
            upstream,
            destination,
            http,
            moved,
        } = opened;
        if http {
            let relay = self.relay_http(id, (source, destination), streams, upstream, accepted);
            Box::pin(relay).await;
        } else {
            Box::pin(self.relay(id, streams, upstream, accepted, moved)).await;
        }
        drop(permit);
    }

    /// Everything before the relay: examine (the stages and the verdict), connect upstream
    /// and the retry stage. `None` when the connection ended here (denied, or the upstream
    /// unreachable or refused by the retry stage).
    async fn open(
        &self,
        id: u64,
        client: TcpStream,
        source: ClientAddr,
        accepted: Instant,
        admitted: bool,
    ) -> Option<Opened> {
        let destination = match client.local_addr() {
            Ok(addr) => OrigDstAddr(addr),
            Err(e) => {
                tracing::debug!(error = %e, "connection gone before it was examined");
                return None;
            }
        };
        let mut streams = Streams {
            client,
            upstream: None,
            reader: PeekReader::new(accepted + self.peek.timeout(), self.peek.max_bytes),
        };
        streams.reader.read_ready(&streams.client);
        // No waiting over the limit, but the log names the pod if it is known.
        let snapshot = if admitted {
            self.wait_for_pod(source, accepted).await
        } else {
            self.store.current()
        };
        let mut cx = Context::new(id, accepted, source, destination);
        // The outcome lives only until the decision line: a connection waiting for its upstream
        // (or, later, for the server's first answer) does not hold it.
        let (verdict, dialled, retries, sent) = {
            // Boxed: the peek's state is the largest of the stages, and is gone once decided.
            let examine = self.examine(&mut cx, &snapshot, admitted, &mut streams);
            let (verdict, outcome) = Box::pin(examine).await;
            let decided = accepted.elapsed();
            if verdict == Verdict::Deny {
                finish::finish(&cx, &outcome, verdict, decided, &self.metrics);
                reset(streams.client);
                return None;
            }
            // Only a ClientHello a rule allowed is held to its second one; audit lets anything on.
            let hello = cx.peeked.as_ref().and_then(Peeked::client_hello);
            let retries = verdict == Verdict::Allow && hello.is_some();
            // The connect starts before the decision line is written. When it completes within
            // connect(2), the first message goes up at once too: the line's formatting then
            // overlaps the server's work instead of delaying its first byte; otherwise the
            // upstream handshake, and the first message goes once it is done.
            let (dialled, sent) = match streams.upstream.take() {
                Some(upstream) => (Dialled::Done(Ok(upstream)), 0),
                None => {
                    let first = first_message(&cx, verdict, &streams.reader);
                    let started = TcpDial::start(destination, WritesFirst::with(first))
                        .and_then(|connecting| connecting.send_if_connected(first));
                    match started {
                        Ok(FirstSend::Sent(upstream, sent)) => (Dialled::Done(Ok(upstream)), sent),
                        Ok(FirstSend::Opening(connecting)) => (Dialled::Connecting(connecting), 0),
                        Err(e) => (Dialled::Done(Err(e)), 0),
                    }
                }
            };
            finish::finish(&cx, &outcome, verdict, decided, &self.metrics);
            (verdict, dialled, retries, sent)
        };
        let (dialled, sent) = match dialled {
            Dialled::Done(result) => (result, sent),
            Dialled::Connecting(connecting) => {
                let first = first_message(&cx, verdict, &streams.reader);
                match connecting.connected(first).await {
                    Ok((upstream, sent)) => (Ok(upstream), sent),
                    Err(e) => (Err(e), 0),
                }
            }
        };
        let mut upstream = match dialled {
            Ok(upstream) => upstream,
            Err(e) => {
                self.metrics.upstream_connect_errors.inc();
                reset(streams.client);
                let error = format!("connect: {e}");
                events::print_close(id, (0, 0), elapsed_ms(accepted), Some(&error));
                return None;
            }
        };
        let moved = if retries {
            match self.retry(&mut cx, &mut streams, &mut upstream, sent).await {
                Some(moved) => moved,
                None => {
                    reset(streams.client);
                    return None;
                }
            }
        } else {
            streams.reader.forwarded += sent;
            retry::Moved {
                up: sent as u64,
                down: 0,
            }
        };
        // An allowed HTTP/1 connection goes on request by request (every Host checked).
        let http = verdict == Verdict::Allow && matches!(cx.peeked, Some(Peeked::Http(_)));
        Some(Opened {
            streams,
            upstream,
            destination,
            http,
            moved,
        })
    }

    /// Everything up to the verdict, which it returns with the outcome it came from (for the
    /// decision line). `cx` arrives empty and from here borrows `snapshot`.
    async fn examine<'s>(
        &self,
        cx: &mut Context<'s>,
        snapshot: &'s Snapshot,
        admitted: bool,
        streams: &mut Streams<TcpStream, TcpStream>,
    ) -> (Verdict, Result<Granted<'s>, Stop>) {
        let outcome = if admitted {
            self.decide(cx, snapshot, streams, &TcpDial).await
        } else {
            cx.pod = stages::identify(&snapshot.identities, cx.client).ok();
            Err(Stop::new(Limit::ConnectionLimit))
        };
        (self.verdict(cx, &outcome), outcome)
    }

    /// The policies and identities to decide with, once they know the client's address or
    /// `identity.unknownSourceWaitMs` after accept: a pod's first connection can race the watch
    /// event that announces its address.
    async fn wait_for_pod(&self, client: ClientAddr, accepted: Instant) -> Snapshot {
        let deadline = accepted + self.unknown_source_wait;
        self.store.pod_by_ip(client.ip(), deadline).await
    }

    /// The stages up to the verdict, in order; what they learn goes into `cx`.
    async fn decide<'s, C, D>(
        &self,
        cx: &mut Context<'s>,
        snapshot: &'s Snapshot,
        streams: &mut Streams<C, D::Stream>,
        dial: &D,
    ) -> Result<Granted<'s>, Stop>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        D: Dial,
    {
        let pod = match stages::before_peek(cx, snapshot, &self.table)? {
            stages::Ahead::Granted(granted) => return Ok(granted),
            stages::Ahead::Peek(pod) => pod,
        };
        // Held while this connection waits for its first message.
        let _peeking = self
            .limits
            .peek(cx.client.ip())
            .ok_or(Stop::new(Limit::PeekLimit))?;
        let peeked = peeking::peek(cx, streams, dial).await;
        let granted = stages::authorize(cx, &self.table, pod, peeked, self.peek.require_sni)?;
        stages::keep_names_alive(&self.table, pod, cx.destination, &granted);
        Ok(granted)
    }

    /// Allowed by a rule; else the settings for unknown and unselected pods; else deny, or
    /// audit when only audit-mode policies select the pod and the reason is one audit watches.
    fn verdict(&self, cx: &Context<'_>, outcome: &Result<Granted, Stop>) -> Verdict {
        let fallbacks = Fallbacks {
            unselected: self.unselected,
            unknown_sources: self.unknown_sources,
        };
        verdict(cx.selection.as_ref(), outcome, fallbacks)
    }

    /// The retry stage ([`retry::check`]) of an allowed connection. A refused second
    /// ClientHello gets a decision line of its own; `None` when its verdict is deny.
    async fn retry<C, U>(
        &self,
        cx: &mut Context<'_>,
        streams: &mut Streams<C, U>,
        upstream: &mut U,
        sent: usize,
    ) -> Option<retry::Moved>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let Streams { client, reader, .. } = streams;
        let timeout = self.peek.timeout();
        let outcome = retry::check(cx, client, upstream, reader, sent, timeout).await;
        match outcome {
            Ok((_, moved)) => Some(moved),
            Err(stop) => {
                let outcome = Err(stop);
                let verdict = self.verdict(cx, &outcome);
                finish::finish(cx, &outcome, verdict, cx.accepted.elapsed(), &self.metrics);
                (verdict != Verdict::Deny).then(retry::Moved::default)
            }
        }
    }

    /// Relay of an allowed HTTP/1 connection: the client→server direction request by request,
    /// each later request authorized like the first ([`Proxy::gate`]); the server→client
    /// direction spliced. A first request that asks to switch protocols waits for the server's
    /// answer: after `101` the connection is opaque, as any other.
    async fn relay_http(
        &self,
        id: u64,
        (source, destination): (ClientAddr, OrigDstAddr),
        mut streams: Streams<TcpStream, TcpStream>,
        mut upstream: TcpStream,
        accepted: Instant,
    ) {
        let reader = &mut streams.reader;
        let first =
            peek::http_framing::peek_request(&reader.buf[reader.forwarded.min(reader.buf.len())..]);
        let mut first_decided = true;
        if let Peek::Complete(first) = first {
            if !first.upgrade.is_empty() && first.body == peek::http_framing::Body::None {
                let head = first.head.consumed;
                let timeout = self.peek.timeout();
                let answer = upgrade::first_upgrade(
                    &mut streams.client,
                    &mut upstream,
                    reader,
                    head,
                    timeout,
                )
                .await;
                match answer {
                    Ok(true) => {
                        let moved = retry::Moved {
                            up: head as u64,
                            down: 0,
                        };
                        return self.relay(id, streams, upstream, accepted, moved).await;
                    }
                    Ok(false) => first_decided = false,
                    Err(e) => {
                        reset(streams.client);
                        let error = format!("upgrade: {e}");
                        let bytes = (head as u64, 0);
                        events::print_close(id, bytes, elapsed_ms(accepted), Some(&error));
                        return;
                    }
                }
            }
        }
        let Streams { client, reader, .. } = streams;
        let buffered = reader.into_unforwarded();
        let mut allowed = None;
        let gate = |seen: Seen<'_>| self.gate(id, (source, destination), seen, &mut allowed);
        let relayed = relay::relay_http(
            client,
            upstream,
            buffered,
            first_decided,
            self.idle_timeout,
            self.peek.max_bytes,
            gate,
        )
        .await;
        self.count_relayed(id, accepted, relayed, retry::Moved::default());
    }

    /// A later request on an HTTP/1 connection (or bytes that are none), decided like the first
    /// with the policies, identities and names of now. A refused one gets its decision line;
    /// an allowed one keeps its names alive, as the first did, and gets none.
    ///
    /// `allowed` remembers the last allowed request's host: the next request for the same host,
    /// while no reload changed policies or identities, is allowed again once the names it used
    /// are found live (the probe that also keeps them alive), without the whole decision.
    fn gate(
        &self,
        id: u64,
        (source, destination): (ClientAddr, OrigDstAddr),
        seen: Seen<'_>,
        allowed: &mut Option<AllowedHost>,
    ) -> Next {
        if let (Seen::Request(request), Some(last)) = (&seen, &*allowed) {
            if last.allows_again(self, destination, request) {
                self.metrics.http_later_allowed.inc();
                return Next::Pass;
            }
        }
        let snapshot = self.store.current();
        let mut cx = Context::new(id, Instant::now(), source, destination);
        cx.protocol = Some(Protocol::Http);
        let outcome = self.later_request(&mut cx, &snapshot, &seen);
        let refusal = !matches!(seen, Seen::Request(_));
        let count = |verdict: Verdict| {
            let requests = &self.metrics.http_later_requests;
            requests.with_label_values(&[verdict.as_str()]).inc();
        };
        let stop = match outcome {
            Ok(granted) => {
                self.metrics.http_later_allowed.inc();
                *allowed = match (&seen, cx.pod) {
                    (Seen::Request(request), Some(pod)) => Some(AllowedHost {
                        host: request.head.host.clone(),
                        pod_ips: pod.table_ips().collect(),
                        names: granted.names,
                        snapshot: snapshot.clone(),
                    }),
                    _ => None,
                };
                return Next::Pass;
            }
            Err(stop) => stop,
        };
        *allowed = None;
        let outcome = Err(stop);
        let verdict = self.verdict(&cx, &outcome);
        finish::finish(&cx, &outcome, verdict, cx.accepted.elapsed(), &self.metrics);
        count(verdict);
        match verdict {
            Verdict::Deny => Next::Stop,
            // Audit lets it through; bytes that frame no request can only go on unframed.
            _ if refusal => Next::Opaque,
            _ => Next::Pass,
        }
    }

    fn later_request<'s>(
        &self,
        cx: &mut Context<'s>,
        snapshot: &'s Snapshot,
        seen: &Seen<'_>,
    ) -> Result<Granted<'s>, Stop> {
        let pod = stages::identify(&snapshot.identities, cx.client)?;
        cx.pod = Some(pod);
        let selection = stages::select(pod, &snapshot.policies)?;
        cx.resolved = stages::names(&self.table, pod, cx.destination);
        cx.grants = stages::grants(&selection, cx.destination, &cx.resolved);
        cx.selection = Some(selection);
        let request = match seen {
            Seen::Request(request) => request,
            Seen::Invalid(invalid) => return Err(Stop::invalid(invalid.clone())),
            Seen::TooLarge => return Err(Stop::new(PodFault::PeekTooLarge)),
        };
        let peeked = Ok(Peeked::Http(request.head.clone()));
        let granted = stages::authorize(cx, &self.table, pod, peeked, self.peek.require_sni)?;
        stages::keep_names_alive(&self.table, pod, cx.destination, &granted);
        Ok(granted)
    }

    /// Relay: the peeked bytes not yet forwarded, then splice both ways until both sides are
    /// done; `moved` is what the retry stage already carried.
    async fn relay(
        &self,
        id: u64,
        streams: Streams<TcpStream, TcpStream>,
        upstream: TcpStream,
        accepted: Instant,
        moved: retry::Moved,
    ) {
        let Streams { client, reader, .. } = streams;
        let replay = reader.into_unforwarded();
        let relayed = relay::relay(client, upstream, replay, self.idle_timeout).await;
        self.count_relayed(id, accepted, relayed, moved);
    }

    /// The byte counters and the `close` line of a relayed connection.
    fn count_relayed(
        &self,
        id: u64,
        accepted: Instant,
        relayed: relay::Relayed,
        moved: retry::Moved,
    ) {
        let (up, down) = (relayed.bytes_up + moved.up, relayed.bytes_down + moved.down);
        self.metrics.bytes_up.inc_by(up);
        self.metrics.bytes_down.inc_by(down);
        let error = relayed.error.map(|e| e.to_string());
        events::print_close(id, (up, down), elapsed_ms(accepted), error.as_deref());
    }
}

/// A connection [`Proxy::open`] allowed and connected: what its relay needs.
struct Opened {
    streams: Streams<TcpStream, TcpStream>,
    upstream: TcpStream,
    destination: OrigDstAddr,
    /// An allowed HTTP/1 connection, relayed request by request.
    http: bool,
    /// What the retry stage already carried.
    moved: retry::Moved,
}

/// The last later request an HTTP/1 connection was allowed, and what allowed it.
struct AllowedHost {
    /// The policies and identities it was decided with.
    snapshot: Snapshot,
    host: Option<Host>,
    pod_ips: Vec<PodIp>,
    /// The names the grant used; none for a `cidr` grant, which needs no name.
    names: Vec<DnsName>,
}

impl AllowedHost {
    /// Whether `request` is decided as the last one was: same host, same policies and
    /// identities, and each name used still live for the pod (every live one is kept alive,
    /// as [`stages::keep_names_alive`] does).
    fn allows_again(
        &self,
        proxy: &Proxy,
        destination: OrigDstAddr,
        request: &peek::http_framing::Request,
    ) -> bool {
        if request.head.host != self.host || !proxy.store.is_current(&self.snapshot) {
            return false;
        }
        let now = std::time::Instant::now();
        self.names.iter().all(|name| {
            self.pod_ips.iter().fold(false, |live, &ip| {
                proxy.table.touch(ip, destination.table_ip(), name, now) | live
            })
        })
    }
}

/// What `unselectedPods` and `unknownSources` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fallbacks {
    pub unselected: UnselectedPods,
    pub unknown_sources: UnselectedPods,
}

/// The verdict of the stages' outcome: allowed by a rule; else the settings for unknown and
/// unselected pods; else deny, or audit when only audit-mode policies select the pod and the
/// reason is one audit watches.
pub(crate) fn verdict(
    selection: Option<&Selection<'_>>,
    outcome: &Result<Granted, Stop>,
    fallbacks: Fallbacks,
) -> Verdict {
    let Err(stop) = outcome else {
        return Verdict::Allow;
    };
    match (stop.reason, selection) {
        (Reason::UnknownSource, _) => fallback(fallbacks.unknown_sources),
        (Reason::Unselected, _) => fallback(fallbacks.unselected),
        (reason, Some(selection)) => decision::denial_verdict(selection, reason),
        (_, None) => Verdict::Deny,
    }
}

/// The verdict `unselectedPods` or `unknownSources` gives.
pub(crate) fn fallback(setting: UnselectedPods) -> Verdict {
    match setting {
        UnselectedPods::Allow => Verdict::Allow,
        UnselectedPods::Deny => Verdict::Deny,
    }
}

/// What the stage after [`Proxy::open`] writes upstream first: an allowed TLS connection's first
/// ClientHello (the retry stage), nothing for an allowed HTTP/1 connection (its relay frames each
/// request), else every byte read so far (the relay's replay).
fn first_message<'r>(cx: &Context<'_>, verdict: Verdict, reader: &'r PeekReader) -> &'r [u8] {
    let unforwarded = reader.buf.get(reader.forwarded..).unwrap_or_default();
    let hello = cx.peeked.as_ref().and_then(Peeked::client_hello);
    match (&cx.peeked, hello) {
        _ if verdict != Verdict::Allow => unforwarded,
        (Some(Peeked::Http(_)), _) => &[],
        (_, Some(hello)) => unforwarded.get(..hello.consumed).unwrap_or(unforwarded),
        _ => unforwarded,
    }
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

#[cfg(test)]
mod tests;
