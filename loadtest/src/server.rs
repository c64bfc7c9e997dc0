//! `loadtest __serve`: the upstream side, run in the lab's `up` namespace (pinned with the load
//! generator). One process serves:
//!
//! - plain TCP on [`BULK_PORT`] and TLS on [`TLS_PORT`]: a request `DOWN <n>\n` is answered with
//!   `n` bytes then a close (bulk); anything else is read as HTTP/1.1 requests (up to the blank
//!   line), each answered with [`RESPONSE`], on the same connection until the client closes;
//!   a connection that starts with [`ECHO`] gets every later byte back (the restart scenario's
//!   long-lived streams);
//! - plain HTTP/1.1 on [`HTTP_PORT`] ([`serve_http`]): requests with framed bodies, for the
//!   gateway's per-request HTTP relay (the `http_keepalive` and `http_bulk` scenarios);
//! - [`HOLD_PORTS`]: accepts, reads and discards, never answers (idle connections);
//! - UDP and TCP port 53 on the DNS address: [`crate::dns::respond`];
//! - UDP [`UDP_ECHO_PORT`] on the web address: every datagram echoed (the `udp_flow` scenario).
//!
//! Everything the harness measures passes through here, so it stays minimal: no logging, no
//! allocation per request, a current-thread runtime.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{dns, tls, Error};

pub const BULK_PORT: u16 = 5001;
pub const TLS_PORT: u16 = 5443;
/// Plain HTTP/1.1 with request bodies (an `http` rule in the bench policies).
pub const HTTP_PORT: u16 = 5080;
/// `GET` of this path followed by a byte count is answered with that many bytes of body.
pub const HTTP_BYTES_PATH: &str = "/bytes/";
/// Idle-connection ports: four, so 50k connections from one pod never run short of 4-tuples.
pub const HOLD_PORTS: [u16; 4] = [5101, 5102, 5103, 5104];
/// The UDP echo (WireGuard's port: what an allowed tunnel would use).
pub const UDP_ECHO_PORT: u16 = 51820;
/// The fixed small response to every HTTP request.
pub const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\nhello\n";
/// First bytes of an echo stream.
pub const ECHO: &[u8] = b"ECHO\n";
/// TTL of every DNS answer: nothing expires during a run.
const DNS_TTL: u32 = 3600;
const LISTEN_BACKLOG: i32 = 8192;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the TCP/TLS services (the lab's web address).
    #[arg(long)]
    pub web: Ipv4Addr,
    /// Address of the DNS responder (the lab's trusted DNS address).
    #[arg(long)]
    pub dns: Ipv4Addr,
    #[arg(long)]
    pub cert: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
}

static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

/// Receive buffer of the DNS responder: a few thousand queries.
const DNS_RECEIVE_BUFFER: usize = 4 << 20;

fn deep_receive_buffer(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &DNS_RECEIVE_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &DNS_RECEIVE_BUFFER);
    }
}

pub fn main(args: ServeArgs) -> Result<(), Error> {
    let dns_socket = UdpSocket::bind(SocketAddr::from((args.dns, 53)))?;
    // The shim answers bursts of a batch at a time now: a default-sized buffer here overflowed
    // (lost queries the shim never saw).
    deep_receive_buffer(&dns_socket);
    let web = args.web;
    std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || dns_loop(dns_socket, web))?;
    let echo_socket = UdpSocket::bind(SocketAddr::from((args.web, UDP_ECHO_PORT)))?;
    std::thread::Builder::new()
        .name("udp-echo".into())
        .spawn(move || udp_echo_loop(echo_socket))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&args.cert, &args.key)?);
        let bulk = listen(SocketAddr::from((args.web, BULK_PORT)))?;
        let tls = listen(SocketAddr::from((args.web, TLS_PORT)))?;
        let mut tasks = tokio::task::JoinSet::new();
        let http = listen(SocketAddr::from((args.web, HTTP_PORT)))?;
        tasks.spawn(async move {
            loop {
                if let Ok((stream, _)) = http.accept().await {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = serve_http(stream).await;
                    });
                }
            }
        });
        tasks.spawn(async move {
            loop {
                if let Ok((stream, _)) = bulk.accept().await {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = serve_stream(stream).await;
                    });
                }
            }
        });
        tasks.spawn(async move {
            loop {
                if let Ok((stream, _)) = tls.accept().await {
                    let _ = stream.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = serve_stream(stream).await;
                        }
                    });
                }
            }
        });
        let dns_tcp = listen(SocketAddr::from((args.dns, 53)))?;
        tasks.spawn(async move {
            loop {
                if let Ok((stream, _)) = dns_tcp.accept().await {
                    tokio::spawn(dns_tcp_stream(stream, web));
                }
            }
        });
        for port in HOLD_PORTS {
            let hold = listen(SocketAddr::from((args.web, port)))?;
            tasks.spawn(async move {
                loop {
                    match hold.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(hold_stream(stream));
                        }
                        // Out of descriptors: wait for some to close.
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                    }
                }
            });
        }
        println!("ready");
        while tasks.join_next().await.is_some() {}
        Ok::<(), Error>(())
    })
}

fn listen(addr: SocketAddr) -> Result<TcpListener, Error> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// Bulk (`DOWN <n>\n`) or HTTP request/response, see the module docs.
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut have = 0;
    loop {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        loop {
            let data = &buf[..have];
            if data.starts_with(b"DOWN ") {
                let Some(end) = data.iter().position(|&b| b == b'\n') else {
                    break;
                };
                let bytes: u64 = std::str::from_utf8(&data[5..end])
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                return send_bulk(stream, bytes).await;
            }
            if data.starts_with(ECHO) {
                return echo(stream, &buf[ECHO.len()..have]).await;
            }
            let Some(end) = find(data, b"\r\n\r\n") else {
                break;
            };
            stream.write_all(RESPONSE).await?;
            buf.copy_within(end + 4..have, 0);
            have -= end + 4;
        }
        if have == buf.len() {
            return Ok(()); // not a request we know
        }
    }
}

/// Plain HTTP/1.1, request after request until the client closes: `GET /bytes/<n>` is answered
/// with an `n`-byte body; any other request's body (Content-Length or chunked) is read and
/// dropped, then answered with [`RESPONSE`]. Anything it does not understand closes.
pub async fn serve_http(stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut stream = tokio::io::BufStream::with_capacity(256 * 1024, 64 * 1024, stream);
    let mut line = Vec::with_capacity(256);
    let mut sink = vec![0u8; 256 * 1024];
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let request_line = String::from_utf8_lossy(&line).into_owned();
        let (mut length, mut chunked) = (0u64, false);
        loop {
            line.clear();
            if stream.read_until(b'\n', &mut line).await? == 0 {
                return Ok(());
            }
            if line == b"\r\n" {
                break;
            }
            let header = String::from_utf8_lossy(&line).to_ascii_lowercase();
            if let Some(value) = header.strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            } else if header.starts_with("transfer-encoding:") && header.contains("chunked") {
                chunked = true;
            }
        }
        if chunked {
            loop {
                line.clear();
                stream.read_until(b'\n', &mut line).await?;
                let size = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| u64::from_str_radix(l.trim().split(';').next()?, 16).ok());
                match size {
                    Some(0) => break,
                    Some(size) => discard(&mut stream, size + 2, &mut sink).await?,
                    None => return Ok(()),
                }
            }
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if stream.read_until(b'\n', &mut line).await? == 0 || line == b"\r\n" {
                    break;
                }
            }
        } else {
            discard(&mut stream, length, &mut sink).await?;
        }
        let bytes: Option<u64> = request_line
            .strip_prefix("GET ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|target| target.strip_prefix(HTTP_BYTES_PATH))
            .and_then(|n| n.parse().ok());
        match bytes {
            Some(bytes) => {
                stream
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\n\r\n").as_bytes(),
                    )
                    .await?;
                stream.flush().await?;
                let mut left = bytes;
                while left > 0 {
                    let n = usize::try_from(left.min(ZEROS.len() as u64)).unwrap_or(ZEROS.len());
                    stream.get_mut().write_all(&ZEROS[..n]).await?;
                    left -= n as u64;
                }
            }
            None => {
                stream.write_all(RESPONSE).await?;
                stream.flush().await?;
            }
        }
    }
}

/// Reads and drops `bytes` bytes.
async fn discard<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut bytes: u64,
    sink: &mut [u8],
) -> std::io::Result<()> {
    while bytes > 0 {
        let want = usize::try_from(bytes.min(sink.len() as u64)).unwrap_or(sink.len());
        let n = stream.read(&mut sink[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        bytes -= n as u64;
    }
    Ok(())
}

async fn send_bulk<S: AsyncWrite + Unpin>(mut stream: S, bytes: u64) -> std::io::Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(ZEROS.len() as u64)).unwrap_or(ZEROS.len());
        stream.write_all(&ZEROS[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await
}

/// Sends back `first`, then every byte read, until the client closes.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    first: &[u8],
) -> std::io::Result<()> {
    stream.write_all(first).await?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// What a held connection answers to its ClientHello: a ServerHello (TLS 1.2 shape, no
/// extensions, in one record), as a real server's first flight begins. A proxy that reads the
/// server's first answer before relaying (egressgate's retry stage, looking for a
/// HelloRetryRequest) then relays the connection: the `memory` scenario holds idle relayed
/// connections on every path, not connections still waiting for their server.
fn hold_answer() -> Vec<u8> {
    let head = [
        0x16, 0x03, 0x03, 0x00, 0x2c, // record: handshake, 44 bytes
        0x02, 0x00, 0x00, 0x28, // server_hello, 40 bytes
        0x03, 0x03, // legacy_version
    ];
    let tail = [
        0x00, // legacy_session_id: empty
        0x13, 0x01, // cipher_suite
        0x00, // legacy_compression_method
        0x00, 0x00, // extensions: none
    ];
    [&head[..], &[0x11; 32], &tail].concat()
}

async fn hold_stream(mut stream: tokio::net::TcpStream) {
    let mut buf = [0u8; 512];
    let mut answered = false;
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if !answered {
            answered = true;
            if stream.write_all(&hold_answer()).await.is_err() {
                break;
            }
        }
    }
}

/// DNS over TCP: length-prefixed queries, answered in order, until the client closes.
async fn dns_tcp_stream(mut stream: tokio::net::TcpStream, web: Ipv4Addr) {
    let mut out = Vec::with_capacity(512);
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        if !dns::respond(&query, web, DNS_TTL, &mut out) {
            return;
        }
        let Ok(len) = u16::try_from(out.len()) else {
            return;
        };
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&out);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn udp_echo_loop(socket: UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let _ = socket.send_to(&buf[..n], from);
    }
}

fn dns_loop(socket: UdpSocket, web: Ipv4Addr) {
    let socket = Arc::new(socket);
    let mut buf = [0u8; 2048];
    let mut out = Vec::with_capacity(512);
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if dns::respond(&buf[..n], web, DNS_TTL, &mut out) {
            let _ = socket.send_to(&out, from);
        }
    }
}
