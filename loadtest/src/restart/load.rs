//! `loadtest __client restart-load`: the restart scenario's load, run in one pod until the
//! harness closes its stdin (bounded by `--seconds` and, per worker, `--max-ops`). Every
//! operation ends in a success timestamp or a [`Failure`] with its wall-clock time, so the
//! harness can tell which restart each failure belongs to.
//!
//! Workers, each pausing `--pace-ms` after every operation:
//! - `fresh`: resolve `--fresh-name` through the pod's DNS server (the shim), connect to the
//!   answer, TLS handshake, one request and its response, close;
//! - `cached`: the `--cached-names`, resolved once at start, as a pod that caches DNS answers
//!   does: a new TLS connection to the cached address per operation, never resolving again;
//! - `dns`: one query per operation, for `n<i>.<zone>`;
//! - `dns-tcp`: the same over one kept TCP connection, as a stub that reuses it does: when the
//!   server has closed it (a gateway stops by closing idle ones), the query is sent again once
//!   on a new connection, and only a failure of that counts;
//! - `stream`: a TLS connection (after its own lookup) that sends a numbered block every
//!   `--stream-interval-ms` and checks that the upstream echoes each one back unchanged, for
//!   `--stream-life` seconds; then it closes cleanly and the next one opens;
//! - with `--slow-tcp-dns`, one more connection to the DNS server that sends the length of a
//!   query and nothing more, held until the server closes it, then again: a slow or hostile
//!   client, to show what it does to a hand-over.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::server::{ECHO, RESPONSE};
use crate::{dns, tls, Error};

/// A query unanswered this long has failed (a stub resolver would retry about now).
const DNS_TIMEOUT: Duration = Duration::from_secs(1);
/// A new connection (connect, handshake, request, response) or a stream's echo that takes
/// longer has failed.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes of one stream block.
const BLOCK: usize = 256;
/// Failures kept in the report; beyond this they are only counted.
const MAX_FAILURES: usize = 50_000;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The DNS server the pod uses (intercepted by the shim).
    #[arg(long)]
    pub dns: SocketAddr,
    /// The upstream's TLS port (request/response, and echo after `ECHO\n`).
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub ca: PathBuf,
    /// Resolved before every new connection of the `fresh` and `stream` workers.
    #[arg(long)]
    pub fresh_name: String,
    /// Resolved once at start, then only connected to.
    #[arg(long, value_delimiter = ',')]
    pub cached_names: Vec<String>,
    #[arg(long, default_value = dns::BENCH_ZONE)]
    pub dns_zone: String,
    /// Distinct names the `dns` worker cycles through.
    #[arg(long, default_value_t = 500)]
    pub dns_names: usize,
    #[arg(long, default_value_t = 2)]
    pub fresh_workers: usize,
    #[arg(long, default_value_t = 1)]
    pub cached_workers: usize,
    #[arg(long, default_value_t = 1)]
    pub dns_workers: usize,
    #[arg(long, default_value_t = 1)]
    pub dns_tcp_workers: usize,
    /// Keep a half-sent DNS-over-TCP query open at all times.
    #[arg(long)]
    pub slow_tcp_dns: bool,
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Seconds each stream lives before it closes and the next opens.
    #[arg(long)]
    pub stream_life: f64,
    #[arg(long, default_value_t = 100)]
    pub stream_interval_ms: u64,
    /// Staggers the streams of every pod: this pod's first stream is slot `stream_slot`, of
    /// `stream_slots` in all; slot k's first stream lives (k + 1) / slots of a life, so that
    /// streams end and open all the time rather than all at once.
    #[arg(long, default_value_t = 0)]
    pub stream_slot: usize,
    #[arg(long, default_value_t = 1)]
    pub stream_slots: usize,
    #[arg(long, default_value_t = 20)]
    pub pace_ms: u64,
    /// Upper bound of the run, whatever the harness does.
    #[arg(long)]
    pub seconds: f64,
    /// Upper bound of operations per worker.
    #[arg(long)]
    pub max_ops: u64,
}

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A DNS query (the `dns` worker's, or the lookup before a new connection).
    Dns,
    /// A DNS query over TCP (the `dns-tcp` worker's).
    DnsTcp,
    Fresh,
    Cached,
    /// Opening a stream's connection.
    StreamOpen,
    /// An established stream broke: an error, a close or a wrong echo before its end.
    Stream,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    /// Wall-clock milliseconds since the epoch.
    pub at_ms: u64,
    pub op: Op,
    /// `timeout`, `refused`, `reset`, `eof`, `tls`, `mismatch`, `rcode<N>` or `other`.
    pub kind: String,
    pub detail: String,
    /// Streams: the local port and when the stream opened, to find the gateway that spliced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub started_ms: u64,
    pub ended_ms: u64,
    pub cached_names: usize,
    pub fresh_ok: u64,
    pub cached_ok: u64,
    pub dns_ok: u64,
    pub streams_opened: u64,
    /// Streams that lived their whole life and closed cleanly.
    pub streams_completed: u64,
    /// Blocks echoed back correctly, over every stream.
    pub stream_blocks: u64,
    pub failures: Vec<Failure>,
    pub failures_dropped: u64,
    /// When each new connection (fresh, cached, stream) succeeded, ms since the epoch.
    pub conn_ok_ms: Vec<u64>,
    /// When each DNS query got its answer.
    pub dns_ok_ms: Vec<u64>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why one operation failed.
#[derive(Debug)]
struct Fail {
    kind: String,
    detail: String,
}

impl Fail {
    fn new(kind: &str, detail: impl Into<String>) -> Fail {
        Fail {
            kind: kind.to_owned(),
            detail: detail.into(),
        }
    }

    fn timeout() -> Fail {
        Fail::new("timeout", format!("no answer within {OP_TIMEOUT:?}"))
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => "refused",
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "reset",
            io::ErrorKind::UnexpectedEof => "eof",
            io::ErrorKind::TimedOut => "timeout",
            io::ErrorKind::InvalidData => "tls",
            _ => "other",
        };
        Fail::new(kind, e.to_string())
    }
}

impl From<tokio::time::error::Elapsed> for Fail {
    fn from(_: tokio::time::error::Elapsed) -> Fail {
        Fail::timeout()
    }
}

/// What every worker shares.
struct Ctx {
    args: LoadArgs,
    connector: TlsConnector,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    next_id: AtomicU16,
    report: Mutex<LoadReport>,
}

impl Ctx {
    fn running(&self) -> bool {
        Instant::now() < self.deadline && !self.stop.load(Ordering::Acquire)
    }

    fn report(&self) -> std::sync::MutexGuard<'_, LoadReport> {
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, op: Op, fail: Fail, stream: Option<(u16, u64)>) {
        let mut report = self.report();
        if report.failures.len() >= MAX_FAILURES {
            report.failures_dropped += 1;
            return;
        }
        report.failures.push(Failure {
            at_ms: now_ms(),
            op,
            kind: fail.kind,
            detail: fail.detail,
            port: stream.map(|(port, _)| port),
            opened_ms: stream.map(|(_, opened)| opened),
        });
    }

    fn connected(&self, op: Op) {
        let at = now_ms();
        let mut report = self.report();
        match op {
            Op::Fresh => report.fresh_ok += 1,
            Op::Cached => report.cached_ok += 1,
            _ => report.streams_opened += 1,
        }
        report.conn_ok_ms.push(at);
    }

    async fn pace(&self) {
        tokio::time::sleep(Duration::from_millis(self.args.pace_ms)).await;
    }

    /// One query through the pod's DNS server; success and failure are both recorded.
    async fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match query(self.args.dns, name, id).await {
            Ok(ip) => {
                let at = now_ms();
                let mut report = self.report();
                report.dns_ok += 1;
                report.dns_ok_ms.push(at);
                Some(ip)
            }
            Err(fail) => {
                self.fail(Op::Dns, fail, None);
                None
            }
        }
    }

    /// TCP connect and TLS handshake to `ip` for `name`; also returns the local port.
    async fn open(&self, ip: Ipv4Addr, name: &str) -> Result<(TlsStream<TcpStream>, u16), Fail> {
        let server_name = tls::server_name(name).map_err(|e| Fail::new("other", e.to_string()))?;
        tokio::time::timeout(OP_TIMEOUT, async {
            let tcp = TcpStream::connect(SocketAddr::from((ip, self.args.port))).await?;
            tcp.set_nodelay(true)?;
            let port = tcp.local_addr()?.port();
            let tls = self.connector.connect(server_name, tcp).await?;
            Ok::<_, Fail>((tls, port))
        })
        .await?
    }

    /// A new connection, one request and response, close.
    async fn request(&self, ip: Ipv4Addr, name: &str) -> Result<(), Fail> {
        let (mut tls, _) = self.open(ip, name).await?;
        tokio::time::timeout(OP_TIMEOUT, async {
            let request = format!("GET / HTTP/1.1\r\nHost: {name}\r\nUser-Agent: loadtest\r\n\r\n");
            tls.write_all(request.as_bytes()).await?;
            let mut got = vec![0u8; RESPONSE.len()];
            tls.read_exact(&mut got).await?;
            if got != RESPONSE {
                return Err(Fail::new("mismatch", "unexpected response"));
            }
            let _ = tls.shutdown().await;
            Ok(())
        })
        .await?
    }
}

async fn query(server: SocketAddr, name: &str, id: u16) -> Result<Ipv4Addr, Fail> {
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    socket.connect(server).await?;
    socket.send(&dns::query(id, name)).await?;
    let deadline = tokio::time::Instant::now() + DNS_TIMEOUT;
    let mut buf = [0u8; 1500];
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| Fail::new("timeout", format!("no answer within {DNS_TIMEOUT:?}")))??;
        match dns::answer_v4(&buf[..n], id) {
            None => continue,
            Some(Ok(ip)) => return Ok(ip),
            Some(Err(rcode)) => {
                return Err(Fail::new(
                    &format!("rcode{rcode}"),
                    format!("{name}: RCODE {rcode} or no address"),
                ))
            }
        }
    }
}

pub fn main(args: LoadArgs) -> Result<LoadReport, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The harness closes our stdin to end the run.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
        flag.store(true, Ordering::Release);
    });
    runtime.block_on(run(args, stop))
}

async fn run(args: LoadArgs, stop: Arc<AtomicBool>) -> Result<LoadReport, Error> {
    let connector = TlsConnector::from(tls::client_config(&args.ca)?);
    let ctx = Arc::new(Ctx {
        deadline: Instant::now() + Duration::from_secs_f64(args.seconds),
        connector,
        stop,
        next_id: AtomicU16::new((std::process::id() as u16).wrapping_mul(7919)),
        report: Mutex::new(LoadReport {
            started_ms: now_ms(),
            ..LoadReport::default()
        }),
        args,
    });
    // The cached names: resolved once, now (a few tries: this is the setup, not the test).
    let mut cached = Vec::new();
    for name in &ctx.args.cached_names {
        let mut ip = None;
        for _ in 0..5 {
            ip = ctx.lookup(name).await;
            if ip.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ip = ip.ok_or_else(|| Error::msg(format!("cannot resolve {name} at start")))?;
        cached.push((name.clone(), ip));
    }
    {
        // Setup lookups are not part of the measured load.
        let mut report = ctx.report();
        report.cached_names = cached.len();
        report.failures.clear();
    }
    let cached = Arc::new(cached);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..ctx.args.fresh_workers {
        workers.spawn(fresh(Arc::clone(&ctx)));
    }
    for worker in 0..ctx.args.cached_workers {
        workers.spawn(cached_worker(Arc::clone(&ctx), Arc::clone(&cached), worker));
    }
    for worker in 0..ctx.args.dns_workers {
        workers.spawn(dns_worker(Arc::clone(&ctx), worker));
    }
    for worker in 0..ctx.args.dns_tcp_workers {
        workers.spawn(dns_tcp_worker(Arc::clone(&ctx), worker));
    }
    if ctx.args.slow_tcp_dns {
        workers.spawn(slow_tcp_dns(Arc::clone(&ctx)));
    }
    for stream in 0..ctx.args.streams {
        workers.spawn(stream_worker(Arc::clone(&ctx), stream));
    }
    while workers.join_next().await.is_some() {}
    let mut report = ctx.report().clone();
    report.ended_ms = now_ms();
    Ok(report)
}

async fn fresh(ctx: Arc<Ctx>) {
    let mut ops = 0;
    while ctx.running() && ops < ctx.args.max_ops {
        ops += 1;
        let name = ctx.args.fresh_name.clone();
        if let Some(ip) = ctx.lookup(&name).await {
            match ctx.request(ip, &name).await {
                Ok(()) => ctx.connected(Op::Fresh),
                Err(fail) => ctx.fail(Op::Fresh, fail, None),
            }
        }
        ctx.pace().await;
    }
}

async fn cached_worker(ctx: Arc<Ctx>, cached: Arc<Vec<(String, Ipv4Addr)>>, worker: usize) {
    if cached.is_empty() {
        return;
    }
    let mut ops = 0u64;
    while ctx.running() && ops < ctx.args.max_ops {
        let (name, ip) = &cached[(worker + ops as usize) % cached.len()];
        ops += 1;
        match ctx.request(*ip, name).await {
            Ok(()) => ctx.connected(Op::Cached),
            Err(fail) => ctx.fail(Op::Cached, fail, None),
        }
        ctx.pace().await;
    }
}

async fn dns_worker(ctx: Arc<Ctx>, worker: usize) {
    let names = ctx.args.dns_names.max(1);
    let mut ops = 0u64;
    while ctx.running() && ops < ctx.args.max_ops {
        let i = (worker * 7919 + ops as usize) % names;
        ops += 1;
        let _ = ctx.lookup(&dns::bench_name(i, &ctx.args.dns_zone)).await;
        ctx.pace().await;
    }
}

/// One query over `stream`: the answer's address, and the stream to reuse.
async fn tcp_exchange(
    mut stream: TcpStream,
    name: &str,
    id: u16,
) -> Result<(TcpStream, Ipv4Addr), Fail> {
    let query = dns::query(id, name);
    let len = u16::try_from(query.len()).map_err(|_| Fail::new("other", "query too long"))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    let answer = tokio::time::timeout(DNS_TIMEOUT, async {
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await?;
        let mut answer = vec![0u8; usize::from(len)];
        stream.read_exact(&mut answer).await?;
        Ok::<_, Fail>(answer)
    })
    .await
    .map_err(|_| Fail::new("timeout", format!("no answer within {DNS_TIMEOUT:?}")))??;
    match dns::answer_v4(&answer, id) {
        Some(Ok(ip)) => Ok((stream, ip)),
        Some(Err(rcode)) => Err(Fail::new(
            &format!("rcode{rcode}"),
            format!("{name}: RCODE {rcode} or no address"),
        )),
        None => Err(Fail::new("other", "not the answer to the query")),
    }
}

async fn dns_tcp_worker(ctx: Arc<Ctx>, worker: usize) {
    let names = ctx.args.dns_names.max(1);
    let mut kept: Option<TcpStream> = None;
    let mut ops = 0u64;
    while ctx.running() && ops < ctx.args.max_ops {
        let name = dns::bench_name(
            (worker * 104_729 + ops as usize + 1) % names,
            &ctx.args.dns_zone,
        );
        ops += 1;
        let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
        let mut outcome = Err(Fail::new("other", "not sent"));
        for _ in 0..2 {
            let reused = kept.is_some();
            let stream = match kept.take() {
                Some(stream) => Ok(stream),
                None => tokio::time::timeout(DNS_TIMEOUT, TcpStream::connect(ctx.args.dns))
                    .await
                    .map_err(Fail::from)
                    .and_then(|connected| connected.map_err(Fail::from)),
            };
            outcome = match stream {
                Ok(stream) => tcp_exchange(stream, &name, id).await,
                Err(fail) => Err(fail),
            };
            // A kept connection the server closed meanwhile: a stub sends the query again on a
            // new one.
            let stale = matches!(&outcome, Err(f) if f.kind == "eof" || f.kind == "reset");
            if !(reused && stale) {
                break;
            }
        }
        match outcome {
            Ok((stream, _)) => {
                kept = Some(stream);
                let at = now_ms();
                let mut report = ctx.report();
                report.dns_ok += 1;
                report.dns_ok_ms.push(at);
            }
            Err(fail) => ctx.fail(Op::DnsTcp, fail, None),
        }
        ctx.pace().await;
    }
}

/// See the module docs: a half-sent query held open, again and again.
async fn slow_tcp_dns(ctx: Arc<Ctx>) {
    let mut ops = 0u64;
    while ctx.running() && ops < ctx.args.max_ops {
        ops += 1;
        if let Ok(Ok(mut stream)) =
            tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(ctx.args.dns)).await
        {
            // The length of a 32-byte query; the query never follows.
            if stream.write_all(&[0x00, 0x20]).await.is_ok() {
                let mut byte = [0u8; 1];
                while ctx.running() {
                    match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte))
                        .await
                    {
                        Err(_) => continue,
                        Ok(_) => break, // closed by the server (or an error)
                    }
                }
            }
        }
        ctx.pace().await;
    }
}

/// Block `seq` of stream `stream`: its numbers, then a pattern derived from them.
fn block(stream: usize, seq: u64) -> [u8; BLOCK] {
    let mut out = [0u8; BLOCK];
    out[..8].copy_from_slice(&seq.to_le_bytes());
    out[8..12].copy_from_slice(&(stream as u32).to_le_bytes());
    for (i, b) in out.iter_mut().enumerate().skip(12) {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i * 7 + stream) as u8;
    }
    out
}

async fn stream_worker(ctx: Arc<Ctx>, stream: usize) {
    let life = Duration::from_secs_f64(ctx.args.stream_life);
    let slots = ctx.args.stream_slots.max(1);
    let slot = (ctx.args.stream_slot + stream) % slots;
    let mut this_life = life.mul_f64((slot + 1) as f64 / slots as f64);
    let interval = Duration::from_millis(ctx.args.stream_interval_ms);
    let name = ctx.args.fresh_name.clone();
    let mut ops = 0;
    while ctx.running() && ops < ctx.args.max_ops {
        ops += 1;
        let Some(ip) = ctx.lookup(&name).await else {
            ctx.pace().await;
            continue;
        };
        let (mut tls, port) = match ctx.open(ip, &name).await {
            Ok(opened) => opened,
            Err(fail) => {
                ctx.fail(Op::StreamOpen, fail, None);
                ctx.pace().await;
                continue;
            }
        };
        ctx.connected(Op::StreamOpen);
        let opened_ms = now_ms();
        let end = Instant::now() + this_life;
        this_life = life;
        let result = async {
            tls.write_all(ECHO).await?;
            let mut blocks = 0u64;
            while Instant::now() < end && ctx.running() {
                let sent = block(stream, blocks);
                let mut got = [0u8; BLOCK];
                tokio::time::timeout(OP_TIMEOUT, async {
                    tls.write_all(&sent).await?;
                    tls.read_exact(&mut got).await?;
                    Ok::<_, Fail>(())
                })
                .await??;
                if got != sent {
                    return Err(Fail::new(
                        "mismatch",
                        format!("block {blocks} came back changed"),
                    ));
                }
                blocks += 1;
                ctx.report().stream_blocks += 1;
                tokio::time::sleep(interval).await;
            }
            tls.shutdown().await?;
            Ok::<_, Fail>(())
        }
        .await;
        match result {
            Ok(()) => ctx.report().streams_completed += 1,
            Err(fail) => ctx.fail(Op::Stream, fail, Some((port, opened_ms))),
        }
    }
}
