//! `loadtest __client …`: the load generator, run inside a pod namespace (pinned to the load
//! core). Each mode is bounded in count and in time, and prints one JSON object on stdout
//! (`hold` also prints progress lines first). Latencies go into HDR histograms (ns, 3 significant
//! digits); only operations finished after the warm-up are recorded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::RESPONSE;
use crate::{dns, tls, Error};

#[derive(Debug, Subcommand)]
pub enum ClientMode {
    /// One connection downloads up to `max-bytes` for at most `seconds`.
    Bulk(BulkArgs),
    /// Plain HTTP/1.1 bulk on one connection: a large download, or uploads of framed bodies.
    HttpBulk(HttpBulkArgs),
    /// Closed-loop requests: a new (TLS) connection per request, or one kept-alive connection
    /// per worker.
    Rr(RrArgs),
    /// Opens `count` idle connections (each sends a ClientHello), reports, holds until stdin
    /// closes or `seconds` pass.
    Hold(HoldArgs),
    /// Closed-loop UDP DNS queries with `concurrency` outstanding.
    Dns(DnsArgs),
    /// Closed-loop datagrams to a UDP echo server with `concurrency` outstanding.
    Udp(UdpArgs),
    /// The restart scenario's load: new connections, DNS queries and echo streams, each
    /// success and failure timed, until stdin closes.
    RestartLoad(crate::restart::load::LoadArgs),
}

#[derive(Debug, Args)]
pub struct Target {
    /// Where to connect (the upstream, or the explicit proxy).
    #[arg(long)]
    pub target: SocketAddr,
    /// Speak TLS, verifying the lab certificate (`--ca`) for `--sni`.
    #[arg(long)]
    pub tls: bool,
    #[arg(long, default_value = "api.example.test")]
    pub sni: String,
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BulkArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub seconds: f64,
    #[arg(long)]
    pub max_bytes: u64,
}

/// What an `http-bulk` client moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpDirection {
    /// One `GET` of a `max-bytes` body, read until `seconds` pass.
    Down,
    /// `POST`s of `request-bytes` bodies with Content-Length, one after another.
    Up,
    /// The same with `Transfer-Encoding: chunked` ([`UPLOAD_CHUNK`]-byte chunks, the body
    /// rounded up to whole chunks).
    UpChunked,
}

/// The chunk size of chunked uploads (what curl sends from its 64 KiB buffer).
pub const UPLOAD_CHUNK: usize = 64 * 1024;

#[derive(Debug, Args)]
pub struct HttpBulkArgs {
    /// Where to connect; `--sni` is the Host header.
    #[command(flatten)]
    pub target: Target,
    #[arg(long, value_enum)]
    pub direction: HttpDirection,
    #[arg(long)]
    pub seconds: f64,
    #[arg(long)]
    pub max_bytes: u64,
    /// Body of each upload request.
    #[arg(long, default_value_t = 16 << 20)]
    pub request_bytes: u64,
}

#[derive(Debug, Args)]
pub struct RrArgs {
    #[command(flatten)]
    pub target: Target,
    /// A new connection (and handshake) per request.
    #[arg(long)]
    pub new_conn: bool,
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    #[arg(long)]
    pub seconds: f64,
    #[arg(long)]
    pub max_ops: u64,
    /// Not recorded: the first this many seconds.
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// Comma-separated targets; connections are spread over them.
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<SocketAddr>,
    #[arg(long)]
    pub ca: PathBuf,
    #[arg(long, default_value = "api.example.test")]
    pub sni: String,
    #[arg(long)]
    pub count: usize,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Give up opening after this long, and exit after this long in all.
    #[arg(long)]
    pub seconds: f64,
}

#[derive(Debug, Args)]
pub struct DnsArgs {
    #[arg(long)]
    pub server: SocketAddr,
    /// Distinct names queried (`n<i>.<zone>`), cycled.
    #[arg(long, default_value_t = 10_000)]
    pub names: usize,
    /// The zone of the names: `bench.test` (TTL one hour) or `churn.test` (TTL one second).
    #[arg(long, default_value = dns::BENCH_ZONE)]
    pub zone: String,
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    #[arg(long)]
    pub seconds: f64,
    #[arg(long)]
    pub max_queries: u64,
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
}

#[derive(Debug, Args)]
pub struct UdpArgs {
    #[arg(long)]
    pub server: SocketAddr,
    /// Payload bytes per datagram (the first two carry its sequence number).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    #[arg(long)]
    pub seconds: f64,
    #[arg(long)]
    pub max_datagrams: u64,
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
}

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    fn from(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkResult {
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RrResult {
    /// Operations recorded (after warm-up) and failed.
    pub ops: u64,
    /// Operations started, warm-up and the window's last ones included: with `--new-conn`, the
    /// connections opened.
    #[serde(default)]
    pub attempts: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Recording window.
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldResult {
    pub opened: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub open_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsResult {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UdpResult {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    pub seconds: f64,
    /// Datagrams echoed per second.
    pub per_second: f64,
    /// Payload echoed per second, one way.
    pub gbit_per_s: f64,
    pub latency: Latency,
}

fn histogram() -> Result<Histogram<u64>, Error> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| Error::msg(e.to_string()))
}

pub fn main(mode: ClientMode) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let json = match mode {
        ClientMode::Bulk(args) => serde_json::to_string(&runtime.block_on(bulk(args))?)?,
        ClientMode::HttpBulk(args) => serde_json::to_string(&runtime.block_on(http_bulk(args))?)?,
        ClientMode::Rr(args) => serde_json::to_string(&runtime.block_on(rr(args))?)?,
        ClientMode::Hold(args) => serde_json::to_string(&runtime.block_on(hold(args))?)?,
        ClientMode::Dns(args) => serde_json::to_string(&dns_load(args)?)?,
        ClientMode::Udp(args) => serde_json::to_string(&udp_load(args)?)?,
        ClientMode::RestartLoad(args) => serde_json::to_string(&crate::restart::load::main(args)?)?,
    };
    println!("{json}");
    Ok(())
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connects (and handshakes) to `target`.
async fn connect(
    target: &Target,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Box<dyn Stream>, Error> {
    let tcp = TcpStream::connect(target.target).await?;
    tcp.set_nodelay(true)?;
    match tls {
        Some(connector) => {
            let name = tls::server_name(&target.sni)?;
            Ok(Box::new(connector.connect(name, tcp).await?))
        }
        None => Ok(Box::new(tcp)),
    }
}

fn connector(target: &Target) -> Result<Option<tokio_rustls::TlsConnector>, Error> {
    if !target.tls {
        return Ok(None);
    }
    let ca = target
        .ca
        .as_ref()
        .ok_or_else(|| Error::msg("--tls needs --ca"))?;
    Ok(Some(tokio_rustls::TlsConnector::from(tls::client_config(
        ca,
    )?)))
}

async fn bulk(args: BulkArgs) -> Result<BulkResult, Error> {
    let connector = connector(&args.target)?;
    let mut stream = connect(&args.target, connector.as_ref()).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    stream
        .write_all(format!("DOWN {}\n", args.max_bytes).as_bytes())
        .await?;
    let mut buf = vec![0u8; 1 << 20];
    // Time from the first byte, so the handshake and request are not in the rate.
    let first = stream.read(&mut buf).await?;
    let start = Instant::now();
    let mut bytes = 0u64;
    if first > 0 {
        while Instant::now() < deadline && bytes < args.max_bytes {
            let left = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await;
            match left {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => bytes += n as u64,
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BulkResult {
        bytes,
        seconds,
        gbit_per_s: bytes as f64 * 8.0 / seconds.max(1e-9) / 1e9,
    })
}

async fn http_bulk(args: HttpBulkArgs) -> Result<BulkResult, Error> {
    let mut stream = connect(&args.target, None).await?;
    let host = &args.target.sni;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let start;
    if args.direction == HttpDirection::Down {
        let request = format!(
            "GET {}{} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: loadtest\r\n\r\n",
            crate::server::HTTP_BYTES_PATH,
            args.max_bytes
        );
        stream.write_all(request.as_bytes()).await?;
        // Time from the first byte, so the request is not in the rate; the head is not counted.
        let first = stream.read(&mut buf).await?;
        start = Instant::now();
        let head = crate::server::find(&buf[..first], b"\r\n\r\n")
            .ok_or_else(|| Error::msg("response head not in the first read"))?;
        bytes += (first - head - 4) as u64;
        while Instant::now() < deadline && bytes < args.max_bytes {
            match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => bytes += n as u64,
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    } else {
        // Whole requests, each acknowledged by the server's response, so the rate counts only
        // bytes the server read.
        let chunked = args.direction == HttpDirection::UpChunked;
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_owned()
        } else {
            format!("Content-Length: {}", args.request_bytes)
        };
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: {host}\r\nUser-Agent: loadtest\r\n{framing}\r\n\r\n"
        );
        // A chunked body is whole chunks, each framed and written at once.
        let mut chunk = format!("{UPLOAD_CHUNK:x}\r\n").into_bytes();
        chunk.resize(chunk.len() + UPLOAD_CHUNK, 0);
        chunk.extend_from_slice(b"\r\n");
        let body = if chunked {
            args.request_bytes.div_ceil(UPLOAD_CHUNK as u64) * UPLOAD_CHUNK as u64
        } else {
            args.request_bytes
        };
        start = Instant::now();
        let mut last = start;
        while Instant::now() < deadline && bytes < args.max_bytes {
            stream.write_all(head.as_bytes()).await?;
            let mut left = body;
            while left > 0 {
                if chunked {
                    stream.write_all(&chunk).await?;
                    left -= UPLOAD_CHUNK as u64;
                } else {
                    let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                    stream.write_all(&buf[..n]).await?;
                    left -= n as u64;
                }
            }
            if chunked {
                stream.write_all(b"0\r\n\r\n").await?;
            }
            read_response(&mut stream).await?;
            bytes += body;
            last = Instant::now();
        }
        let seconds = (last - start).as_secs_f64();
        return Ok(BulkResult {
            bytes,
            seconds,
            gbit_per_s: bytes as f64 * 8.0 / seconds.max(1e-9) / 1e9,
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BulkResult {
        bytes,
        seconds,
        gbit_per_s: bytes as f64 * 8.0 / seconds.max(1e-9) / 1e9,
    })
}

/// Reads the response to a request: the upstream's fixed one as a relay passes it on, or the
/// same status and body with the headers an HTTP proxy rewrote (HAProxy and nginx in front of
/// the plain HTTP port).
async fn read_response(stream: &mut Box<dyn Stream>) -> Result<(), Error> {
    let mut got = [0u8; 1024];
    let mut have = 0;
    loop {
        let n = stream.read(&mut got[have..]).await?;
        if n == 0 {
            return Err(Error::msg("closed before the response"));
        }
        have += n;
        match whole_response(&got[..have]) {
            Some(true) => return Ok(()),
            Some(false) => return Err(Error::msg("unexpected response")),
            None if have == got.len() => return Err(Error::msg("response too long")),
            None => {}
        }
    }
}

/// Whether `got`, one response, is the expected one; `None` while it is incomplete.
fn whole_response(got: &[u8]) -> Option<bool> {
    if got == RESPONSE {
        return Some(true);
    }
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let (head, body) = got.split_at(head_end);
    // The expected body is the end of the fixed response.
    let Some(expected_body) = content_length(head)
        .and_then(|length| RESPONSE.len().checked_sub(length))
        .map(|at| &RESPONSE[at..])
    else {
        return Some(false);
    };
    if body.len() < expected_body.len() {
        return None;
    }
    Some(head.starts_with(b"HTTP/1.1 200 ") && body == expected_body)
}

/// The Content-Length of a response head, whatever the header name's case.
fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// Sends one request and reads its response.
async fn exchange(stream: &mut Box<dyn Stream>, request: &[u8]) -> Result<(), Error> {
    stream.write_all(request).await?;
    read_response(stream).await
}

async fn rr(args: RrArgs) -> Result<RrResult, Error> {
    let connector = connector(&args.target)?.map(Arc::new);
    let request = Arc::new(
        format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: loadtest\r\n\r\n",
            args.target.sni
        )
        .into_bytes(),
    );
    let start = Instant::now();
    let record_from = start + Duration::from_secs_f64(args.warmup);
    let deadline = record_from + Duration::from_secs_f64(args.seconds);
    let per_worker = args.max_ops.div_ceil(args.concurrency.max(1) as u64);
    let target = Arc::new(args.target);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (connector, request, target) = (connector.clone(), request.clone(), target.clone());
        let new_conn = args.new_conn;
        workers.spawn(async move {
            let mut hist = histogram()?;
            let mut errors = 0u64;
            let mut first_error = None;
            let mut kept: Option<Box<dyn Stream>> = None;
            let mut done = 0u64;
            let mut attempts = 0u64;
            while done < per_worker && Instant::now() < deadline {
                attempts += 1;
                let began = Instant::now();
                let result = async {
                    let mut stream = match kept.take() {
                        Some(stream) => stream,
                        None => connect(&target, connector.as_deref()).await?,
                    };
                    exchange(&mut stream, &request).await?;
                    if !new_conn {
                        kept = Some(stream);
                    }
                    Ok::<(), Error>(())
                };
                let result = tokio::time::timeout(Duration::from_secs(5), result).await;
                let ended = Instant::now();
                match result {
                    Ok(Ok(())) => {
                        if began >= record_from && ended <= deadline {
                            let ns = u64::try_from((ended - began).as_nanos()).unwrap_or(u64::MAX);
                            hist.saturating_record(ns);
                            done += 1;
                        }
                    }
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                        kept = None;
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "timed out after 5 s".to_owned());
                        kept = None;
                    }
                }
                if errors > 1000 {
                    break;
                }
            }
            Ok::<_, Error>((hist, errors, first_error, attempts))
        });
    }
    let mut hist = histogram()?;
    let mut errors = 0;
    let mut attempts = 0;
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        let (h, e, f, a) = joined.map_err(|e| Error::msg(e.to_string()))??;
        hist.add(&h).map_err(|e| Error::msg(e.to_string()))?;
        errors += e;
        attempts += a;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let seconds = (Instant::now().min(deadline) - record_from.min(Instant::now()))
        .as_secs_f64()
        .max(1e-9);
    Ok(RrResult {
        ops: hist.len(),
        attempts,
        errors,
        first_error,
        seconds,
        per_second: hist.len() as f64 / seconds,
        latency: Latency::from(&hist),
    })
}

async fn hold(args: HoldArgs) -> Result<HoldResult, Error> {
    let hello = Arc::new(tls::client_hello(&args.ca, &args.sni)?);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let open_deadline = start + Duration::from_secs_f64(args.seconds / 2.0);
    let mut held = Vec::with_capacity(args.count);
    let mut errors = 0usize;
    let mut first_error = None;
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut last_report = Instant::now();
    while held.len() + errors < args.count && Instant::now() < open_deadline {
        while pending.len() < args.concurrency && next < args.count {
            let target = args.targets[next % args.targets.len().max(1)];
            let hello = hello.clone();
            pending.spawn(async move {
                let mut stream = TcpStream::connect(target).await?;
                stream.write_all(&hello).await?;
                Ok::<_, Error>(stream)
            });
            next += 1;
        }
        let Ok(Some(joined)) =
            tokio::time::timeout_at(open_deadline.into(), pending.join_next()).await
        else {
            break;
        };
        match joined.map_err(|e| Error::msg(e.to_string()))? {
            Ok(stream) => held.push(stream),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            println!("progress {} {}", held.len(), errors);
            last_report = Instant::now();
        }
    }
    let open_seconds = start.elapsed().as_secs_f64();
    println!("ready {} {}", held.len(), errors);
    // Hold until the harness closes our stdin (it has measured) or the time bound.
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
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
    while !closed.load(Ordering::Acquire) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(HoldResult {
        opened: held.len(),
        errors,
        first_error,
        open_seconds,
    })
}

/// Closed loop over one connected UDP socket: `concurrency` queries outstanding, each answer
/// (matched by ID) sends the next; a query unanswered for a second is counted lost and replaced.
fn dns_load(args: DnsArgs) -> Result<DnsResult, Error> {
    let names: Vec<String> = (0..args.names.max(1))
        .map(|i| dns::bench_name(i, &args.zone))
        .collect();
    let window = Window {
        concurrency: args.concurrency,
        max: args.max_queries,
        warmup: args.warmup,
        seconds: args.seconds,
    };
    let run = closed_loop(args.server, &window, |id, sent| {
        dns::query(id, &names[(sent as usize) % names.len()])
    })?;
    Ok(DnsResult {
        sent: run.sent,
        answered: run.answered,
        lost: run.lost,
        seconds: run.seconds,
        per_second: run.answered as f64 / run.seconds,
        latency: Latency::from(&run.hist),
    })
}

/// Closed-loop datagrams of `size` bytes to a UDP echo server, `concurrency` outstanding.
fn udp_load(args: UdpArgs) -> Result<UdpResult, Error> {
    let window = Window {
        concurrency: args.concurrency,
        max: args.max_datagrams,
        warmup: args.warmup,
        seconds: args.seconds,
    };
    let mut payload = vec![0u8; args.size.max(2)];
    let run = closed_loop(args.server, &window, |id, _| {
        payload[..2].copy_from_slice(&id.to_be_bytes());
        payload.clone()
    })?;
    let per_second = run.answered as f64 / run.seconds;
    Ok(UdpResult {
        sent: run.sent,
        answered: run.answered,
        lost: run.lost,
        seconds: run.seconds,
        per_second,
        // Payload only, one way: what the flow carries, not the headers.
        gbit_per_s: per_second * payload.len() as f64 * 8.0 / 1e9,
        latency: Latency::from(&run.hist),
    })
}

/// How long and how hard a [`closed_loop`] runs.
struct Window {
    concurrency: usize,
    max: u64,
    warmup: f64,
    seconds: f64,
}

/// What a [`closed_loop`] counted after the warm-up (`sent` includes it).
struct LoopRun {
    sent: u64,
    answered: u64,
    lost: u64,
    seconds: f64,
    hist: Histogram<u64>,
}

/// Keeps `window.concurrency` datagrams outstanding to `server`, each made by `make(id, sent)`
/// with the 16-bit `id` in its first two bytes (a DNS ID, or an echo's sequence number); an
/// answer is matched by those bytes, and one unanswered after a second is lost.
fn closed_loop(
    server: SocketAddr,
    window: &Window,
    mut make: impl FnMut(u16, u64) -> Vec<u8>,
) -> Result<LoopRun, Error> {
    let socket = std::net::UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut sent_at: Vec<Option<Instant>> = vec![None; 65_536];
    let mut hist = histogram()?;
    let start = Instant::now();
    let record_from = start + Duration::from_secs_f64(window.warmup);
    let deadline = record_from + Duration::from_secs_f64(window.seconds);
    let lost_after = Duration::from_secs(1);
    let (mut sent, mut answered, mut lost) = (0u64, 0u64, 0u64);
    let mut next_id: u16 = 0;
    let mut outstanding = 0usize;
    let mut buf = vec![0u8; 65_536];
    let mut last_sweep = Instant::now();
    let mut send = |sent_at: &mut Vec<Option<Instant>>, sent: &mut u64| -> Result<(), Error> {
        // Skip IDs still outstanding.
        while sent_at[usize::from(next_id)].is_some() {
            next_id = next_id.wrapping_add(1);
        }
        let datagram = make(next_id, *sent);
        // Timed from before the send: on a shared CPU the answer may be queued before `send`
        // returns, and a later timestamp would make the round trip look almost free.
        let at = Instant::now();
        socket.send(&datagram)?;
        sent_at[usize::from(next_id)] = Some(at);
        next_id = next_id.wrapping_add(1);
        *sent += 1;
        Ok(())
    };
    while Instant::now() < deadline && sent < window.max {
        while outstanding < window.concurrency.max(1) && sent < window.max {
            send(&mut sent_at, &mut sent)?;
            outstanding += 1;
        }
        match socket.recv(&mut buf) {
            Ok(n) => {
                let Some(id) = dns::id(&buf[..n]) else {
                    continue;
                };
                if let Some(at) = sent_at[usize::from(id)].take() {
                    outstanding -= 1;
                    let now = Instant::now();
                    if at >= record_from {
                        answered += 1;
                        let ns = u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX);
                        hist.saturating_record(ns);
                    }
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
        if last_sweep.elapsed() >= Duration::from_millis(200) {
            let now = Instant::now();
            for slot in sent_at.iter_mut() {
                if slot.is_some_and(|at| now - at > lost_after) {
                    *slot = None;
                    lost += 1;
                    outstanding -= 1;
                }
            }
            last_sweep = now;
        }
    }
    let seconds = (Instant::now().min(deadline) - record_from)
        .as_secs_f64()
        .max(1e-9);
    Ok(LoopRun {
        sent,
        answered,
        lost,
        seconds,
        hist,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_whole_once_its_body_is_in_whatever_its_headers() {
        assert_eq!(whole_response(RESPONSE), Some(true));
        assert_eq!(whole_response(&RESPONSE[..RESPONSE.len() - 1]), None);
        assert_eq!(whole_response(b"HTTP/1.1 200 OK\r\nContent-Len"), None);
        let rewritten = b"HTTP/1.1 200 OK\r\nserver: nginx\r\ncontent-length: 6\r\n\
                          connection: keep-alive\r\n\r\nhello\n";
        assert_eq!(whole_response(rewritten), Some(true));
        assert_eq!(whole_response(&rewritten[..rewritten.len() - 2]), None);
    }

    #[test]
    fn a_refusal_or_another_body_is_not_the_response() {
        let refused = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nhello\n";
        assert_eq!(whole_response(refused), Some(false));
        let other = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhullo\n";
        assert_eq!(whole_response(other), Some(false));
        let unframed = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
        assert_eq!(whole_response(unframed), Some(false));
        let too_long = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nhello\n";
        assert_eq!(whole_response(too_long), Some(false));
    }
}
