//! Shared tools of the bypass suite (`bypass_*.rs`): a raw TCP client that sends crafted bytes
//! from inside a pod, a ClientHello editor over real captured ClientHellos, PostgreSQL startup
//! builders, and assertions that a denied attempt never reached its destination.

use std::time::{Duration, Instant};

use egressgate_lab::{addr, Decision, GatewayOptions, Lab, Output};

use crate::support::{dig, run_and_decide, SHOP_POLICY};

/// Python in the pod: connects to argv[1]:argv[2] (IPv4 or IPv6) with TCP_NODELAY, sends each
/// hex chunk of argv[5..] as its own `send` with argv[3] seconds between chunks, then reads until
/// the peer closes, resets, or no data comes for argv[4] seconds (0.5 s once data came).
/// Prints `connected`, then every reply as `reply <len> <first 16 bytes in hex> <repr>`, then
/// how it ended: `closed`, `reset`, `quiet` or `error ...`.
const RAW_CLIENT: &str = r#"
import socket, sys, time
host, port, gap, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
chunks = [bytes.fromhex(h) for h in sys.argv[5:]]
family = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(5)
try:
    s.connect((host, port))
except OSError as e:
    print('error connect', type(e).__name__, flush=True)
    sys.exit(0)
print('connected', flush=True)
try:
    for i, chunk in enumerate(chunks):
        if i and gap:
            time.sleep(gap)
        s.sendall(chunk)
    s.settimeout(wait)
    for _ in range(1000):
        data = s.recv(65536)
        if not data:
            print('closed')
            break
        print('reply', len(data), data[:16].hex(), repr(data[:400]), flush=True)
        s.settimeout(0.5)
except ConnectionResetError:
    print('reset')
except BrokenPipeError:
    print('reset')
except socket.timeout:
    print('quiet')
except OSError as e:
    print('error', type(e).__name__)
"#;

/// How long the raw client waits for a first reply after its last send.
const QUIET_SECONDS: &str = "3";

/// Sends `chunks` from pod `letter` to `ip:port`, one `send` each, `gap_ms` apart, and returns
/// what the client saw and the gateway's decision for that connection.
pub fn send_raw(
    lab: &Lab,
    letter: &str,
    ip: &str,
    port: u16,
    chunks: &[Vec<u8>],
    gap_ms: u64,
) -> (Output, Decision) {
    send_and_wait(lab, letter, ip, port, chunks, gap_ms, QUIET_SECONDS)
}

/// [`send_raw`], then keeps the connection open up to `quiet_seconds` waiting for bytes.
pub fn send_and_wait(
    lab: &Lab,
    letter: &str,
    ip: &str,
    port: u16,
    chunks: &[Vec<u8>],
    gap_ms: u64,
    quiet_seconds: &str,
) -> (Output, Decision) {
    let port_text = port.to_string();
    let gap = format!("{}", gap_ms as f64 / 1000.0);
    let hex: Vec<String> = chunks.iter().map(|c| to_hex(c)).collect();
    let mut args: Vec<&str> = vec![
        "python3",
        "-c",
        RAW_CLIENT,
        ip,
        &port_text,
        &gap,
        quiet_seconds,
    ];
    args.extend(hex.iter().map(String::as_str));
    run_and_decide(lab, letter, port, &args)
}

/// [`send_raw`] with the whole payload in one `send`.
pub fn send_once(lab: &Lab, letter: &str, ip: &str, port: u16, bytes: &[u8]) -> (Output, Decision) {
    send_raw(lab, letter, ip, port, &[bytes.to_vec()], 0)
}

/// Every byte in its own TCP segment (`TCP_NODELAY` and a pause between sends).
pub fn one_byte_segments(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes.iter().map(|b| vec![*b]).collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The connection number of a decision line.
pub fn connection_id(d: &Decision) -> u64 {
    d.0["connection"]
        .as_u64()
        .unwrap_or_else(|| panic!("decision without a connection number: {d}"))
}

/// Asserts a deny with exactly `reason` (and `detail`, the peeker's code, when given), that the
/// client received no byte from the destination, and that the gateway never relayed the
/// connection (no `close` line, which only relayed connections get).
pub fn assert_blocked(lab: &Lab, out: &Output, d: &Decision, reason: &str, detail: Option<&str>) {
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("deny"), Some(reason)),
        "{d}\n{out}"
    );
    if let Some(detail) = detail {
        assert_eq!(d.0["detail"].as_str(), Some(detail), "{d}\n{out}");
    }
    assert!(
        !out.stdout.contains("reply") && !out.stdout.contains("hello from"),
        "the client got bytes back through a denied connection:\n{out}\n{d}"
    );
    assert_not_relayed(lab, d);
}

/// The gateway prints a `close` line for every connection it relayed; a denied one has none.
pub fn assert_not_relayed(lab: &Lab, d: &Decision) {
    let id = connection_id(d);
    let relayed = lab
        .gateway()
        .events("close")
        .any(|line| line["connection"].as_u64() == Some(id));
    assert!(!relayed, "connection {id} was relayed upstream: {d}");
}

/// Asserts the first reply from the destination starts with the bytes `hex_prefix`.
pub fn assert_reply_starts(out: &Output, hex_prefix: &str) {
    let first = out
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("reply "))
        .and_then(|rest| rest.split(' ').nth(1));
    assert!(
        first.is_some_and(|hex| hex.starts_with(hex_prefix)),
        "no reply starting with {hex_prefix}:\n{out}"
    );
}

/// Asserts an allow with `name` among the names used.
pub fn assert_allowed_as(out: &Output, d: &Decision, name: &str) {
    assert_eq!(
        (d.verdict(), d.reason()),
        (Some("allow"), Some("allowed")),
        "{d}\n{out}"
    );
    assert!(d.names().contains(&name), "{d}");
}

/// nginx's access log (one line per HTTP request nginx served, `"GET /path HTTP/1.1"` included).
pub fn nginx_access_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir().join("nginx").join("access.log")).unwrap_or_default()
}

/// Asserts nginx never logged a request for `path` (give each attempt its own path).
pub fn assert_nginx_never_saw(lab: &Lab, path: &str) {
    // nginx writes the line when the request ends; give a request that did get through time.
    std::thread::sleep(Duration::from_millis(200));
    let log = nginx_access_log(lab);
    assert!(
        !log.contains(&format!(" {path} ")),
        "nginx served {path}:\n{log}"
    );
}

/// Waits up to 5 s for nginx to log a request for `path`; returns the line.
pub fn wait_nginx_saw(lab: &Lab, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = nginx_access_log(lab);
        if let Some(line) = log.lines().find(|l| l.contains(&format!(" {path} "))) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "nginx never logged {path}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of one sample of the gateway's `/metrics` (`name{labels}` as printed), 0 if absent.
pub fn metric(lab: &Lab, series: &str) -> f64 {
    let out = lab.node().run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15090/metrics",
    ]);
    assert!(out.success(), "{out}");
    out.stdout
        .lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

// === TLS ===

/// Real ClientHellos captured from clients on loopback (`gateway/src/peek/testdata/tls`).
pub const PYTHON_HELLO: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../gateway/src/peek/testdata/tls/python-3.11-urllib-sni-api.example.test-alpn-http1.1.bin"
));
pub const CHROMIUM_ECH_HELLO: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../gateway/src/peek/testdata/tls/chromium-156-pq-x25519mlkem768-ech-grease-sni-api.example.test-1924B.bin"
));

/// ExtensionType values (RFC 8446 §4.2, RFC 6066, RFC 7685, draft-ietf-tls-esni).
pub const EXT_SERVER_NAME: u16 = 0x0000;
pub const EXT_PADDING: u16 = 0x0015;
pub const EXT_ECH: u16 = 0xfe0d;

/// A ClientHello taken apart into its fixed fields and its extensions, to be edited and
/// re-serialised with every length recomputed.
#[derive(Debug, Clone)]
pub struct Hello {
    /// legacy_version through legacy_compression_methods, as captured.
    pub fixed: Vec<u8>,
    pub extensions: Vec<(u16, Vec<u8>)>,
}

fn be16(n: usize) -> [u8; 2] {
    u16::try_from(n).expect("length fits 16 bits").to_be_bytes()
}

fn be24(n: usize) -> [u8; 3] {
    let n = u32::try_from(n).expect("length fits 24 bits");
    let [_, a, b, c] = n.to_be_bytes();
    [a, b, c]
}

fn read16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

impl Hello {
    /// Parses a captured ClientHello (one or more handshake records).
    pub fn parse(records: &[u8]) -> Self {
        let mut handshake = Vec::new();
        let mut pos = 0;
        while pos < records.len() {
            assert_eq!(records[pos], 0x16, "not a handshake record");
            let len = read16(records, pos + 3);
            handshake.extend_from_slice(&records[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        assert_eq!(handshake[0], 0x01, "not a ClientHello");
        let body = &handshake[4..];
        let mut at = 2 + 32;
        at += 1 + usize::from(body[at]); // session id
        at += 2 + read16(body, at); // cipher suites
        at += 1 + usize::from(body[at]); // compression methods
        let fixed = body[..at].to_vec();
        let end = at + 2 + read16(body, at);
        at += 2;
        let mut extensions = Vec::new();
        while at < end {
            let ty = u16::try_from(read16(body, at)).expect("u16");
            let len = read16(body, at + 2);
            extensions.push((ty, body[at + 4..at + 4 + len].to_vec()));
            at += 4 + len;
        }
        Hello { fixed, extensions }
    }

    /// The python-3.11 ClientHello (SNI api.example.test, ALPN http/1.1, a padding extension).
    pub fn python() -> Self {
        Self::parse(PYTHON_HELLO)
    }

    /// Replaces the server_name extension's data (kept in place), or adds it first.
    pub fn set_ext(mut self, ty: u16, data: Vec<u8>) -> Self {
        match self.extensions.iter_mut().find(|(t, _)| *t == ty) {
            Some(ext) => ext.1 = data,
            None => self.extensions.insert(0, (ty, data)),
        }
        self
    }

    pub fn remove_ext(mut self, ty: u16) -> Self {
        self.extensions.retain(|(t, _)| *t != ty);
        self
    }

    pub fn push_ext(mut self, ty: u16, data: Vec<u8>) -> Self {
        self.extensions.push((ty, data));
        self
    }

    /// SNI with one host_name of these raw bytes.
    pub fn sni(self, name: &[u8]) -> Self {
        self.set_ext(EXT_SERVER_NAME, server_name_list(&[(0, name)]))
    }

    pub fn no_sni(self) -> Self {
        self.remove_ext(EXT_SERVER_NAME)
    }

    /// The handshake message: type 1, 24-bit length, body.
    pub fn handshake(&self) -> Vec<u8> {
        let mut exts = Vec::new();
        for (ty, data) in &self.extensions {
            exts.extend_from_slice(&ty.to_be_bytes());
            exts.extend_from_slice(&be16(data.len()));
            exts.extend_from_slice(data);
        }
        let mut body = self.fixed.clone();
        body.extend_from_slice(&be16(exts.len()));
        body.extend_from_slice(&exts);
        let mut out = vec![0x01];
        out.extend_from_slice(&be24(body.len()));
        out.extend_from_slice(&body);
        out
    }

    /// The handshake in TLS records of at most `fragment` bytes each (record version 0x0301).
    pub fn records(&self, fragment: usize) -> Vec<u8> {
        records(&self.handshake(), fragment)
    }

    /// One record (the usual case).
    pub fn bytes(&self) -> Vec<u8> {
        self.records(0x4000)
    }

    /// Sets the padding extension so that [`Hello::records`]`(fragment)` is exactly `total` bytes.
    pub fn padded_to(self, total: usize, fragment: usize) -> Self {
        let mut pad = 0usize;
        let mut hello = self;
        for _ in 0..64 {
            hello = hello.set_ext(EXT_PADDING, vec![0; pad]);
            let len = hello.records(fragment).len();
            if len == total {
                return hello;
            }
            // Adding a record header can overshoot; step back by the excess then.
            pad = (pad + total)
                .checked_sub(len)
                .expect("total is larger than the unpadded hello");
        }
        panic!("cannot pad to {total} bytes with {fragment}-byte records");
    }
}

/// Handshake bytes cut into handshake records of at most `fragment` bytes.
pub fn records(handshake: &[u8], fragment: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in handshake.chunks(fragment) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&be16(chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

/// A server_name extension body: `ServerNameList` of (name_type, name) entries.
pub fn server_name_list(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (ty, name) in entries {
        list.push(*ty);
        list.extend_from_slice(&be16(name.len()));
        list.extend_from_slice(name);
    }
    let mut out = be16(list.len()).to_vec();
    out.extend_from_slice(&list);
    out
}

// === PostgreSQL ===

/// Protocol 3.0.
pub const PG_PROTOCOL_3: u32 = 0x0003_0000;
/// SSLRequest and GSSENCRequest codes.
pub const PG_SSL_REQUEST: u32 = 80_877_103;
pub const PG_GSSENC_REQUEST: u32 = 80_877_104;

/// A StartupMessage with `code` and these parameters, terminated, with its true length.
pub fn pg_startup(code: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    pg_message(code, &body)
}

/// Length (Int32, including itself), code (Int32), body.
pub fn pg_message(code: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(8 + body.len()).expect("length fits");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An 8-byte request (SSLRequest, GSSENCRequest).
pub fn pg_request(code: u32) -> Vec<u8> {
    pg_message(code, &[])
}

/// One pod (a, role=app: api.example.test on 443/tls and 80/http) that has resolved api.
pub fn shop_lab_resolved() -> Lab {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts");
    assert!(dig(&lab, "a", addr::API, &[]).contains(&addr::WEB.to_owned()));
    lab
}
