//! HTTP/1 request framing (RFC 9112 §6, §7): where each request on a connection ends, so that
//! every request head, not only the first, can be checked.
//!
//! [`Framer`] walks the client→server byte stream request by request. For each request it reads
//! the head with the head peeker's rules ([`super::http`]) plus the fields that frame the body,
//! and then says how the body is delimited: nothing (a request without framing has no body, RFC
//! 9112 §6.3), `Content-Length` bytes, or chunks up to the last chunk and its trailer section.
//! Body bytes are never looked at: the framer hands out their length so the caller can move them
//! unread (splice a known length); only chunk-size lines and trailers are parsed.
//!
//! Anything two HTTP parsers could frame differently is refused, since the gateway would then
//! check other requests than the server serves (request smuggling): both `Content-Length` and
//! `Transfer-Encoding`, a repeated or invalid `Content-Length`, `Transfer-Encoding` in HTTP/1.0,
//! a transfer coding other than a lowercase `chunked` last (after optional known codings), and,
//! from the head peeker, obs-fold and bare CR or LF. [`Invalid::is_smuggling`] tells these apart.
//! `Upgrade: h2c` (a switch to HTTP/2, which the gateway does not read) and `CONNECT` (a tunnel
//! anywhere) are refused too. `Expect: 100-continue` and upgrades to other protocols are reported
//! for the caller, which alone sees the server's answers.
//!
//! Like the peekers, pure: [`Framer::next`] answers for the bytes at the front of what it is
//! given, `Incomplete` until a head or chunk line is whole, and is prefix-monotonic.

use super::http::{header, next_line, request_head, trim_ows, RequestHead, MAX_HEADERS};
use super::{is_tchar, Invalid, Peek};

/// Longest chunk-size line (with extensions, RFC 9112 §7.1.1). Real clients send the size alone
/// (a few hex digits); extensions are legal but unused, and 4 KiB bounds what one waits for.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Hex digits of a chunk size: 15 keep it below 2^60, far above any body, with no overflow.
const MAX_CHUNK_SIZE_DIGITS: usize = 15;
/// Digits of a Content-Length: 18 stay below 10^18 < 2^63.
const MAX_CONTENT_LENGTH_DIGITS: usize = 18;
/// Transfer codings of the IANA registry a request may name before `chunked` (RFC 9112 §7).
const KNOWN_CODINGS: [&[u8]; 5] = [b"gzip", b"deflate", b"compress", b"x-gzip", b"x-compress"];

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No `Content-Length` and no `Transfer-Encoding`: no body; the next byte starts the next
    /// request (RFC 9112 §6.3, rule 7).
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: …, chunked`: chunks up to the last one and its trailer section.
    Chunked,
}

/// One request head, with what frames it and what the caller must watch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: RequestHead,
    pub body: Body,
    /// `Expect: 100-continue` (RFC 9110 §10.1.1): the client may wait for the server's 100
    /// before it sends the body, or send it anyway.
    pub expect_continue: bool,
    /// The `Upgrade` protocols asked for, lowercased (never `h2c`); the stream is opaque once the
    /// server answers 101.
    pub upgrade: Vec<String>,
    /// `Connection: close`, or HTTP/1.0 without `keep-alive`: the server reads no further request.
    pub close: bool,
}

/// What the bytes at the front of the stream are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A request head of `request.head.consumed` bytes: check it before it goes on.
    Head(Request),
    /// `len` bytes of `Content-Length` body: move them unread.
    Body(u64),
    /// A chunk: `line` bytes (the CRLF that ended the previous chunk's data, if any, and this
    /// chunk's size line), then `data` bytes of data to move unread.
    Chunk { line: usize, data: u64 },
    /// The last chunk, its trailer section and the blank line: `len` bytes. The request ends.
    LastChunk(usize),
}

/// Where the stream is, between frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a request head (between requests).
    Head,
    /// After a head with `Content-Length: n`, n > 0.
    Body(u64),
    /// At a chunk-size line; `first` is false after a chunk's data, whose CRLF comes first.
    Chunk { first: bool },
}

/// The client→server direction of one HTTP/1 connection, frame by frame.
#[derive(Debug, Clone)]
pub struct Framer {
    state: State,
    requests: u64,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

impl Framer {
    /// At the start of a connection: a request head comes first.
    pub fn new() -> Self {
        Framer {
            state: State::Head,
            requests: 0,
        }
    }

    /// Between two requests: the next frame is a head (or the client closes cleanly here).
    pub fn at_request_boundary(&self) -> bool {
        self.state == State::Head
    }

    /// Request heads read so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The frame at the front of `buf`, the stream's bytes from the end of the last frame on.
    /// `Complete` moves the framer past it: the caller then moves that frame's bytes (for
    /// `Body` and `Chunk` data, possibly more than `buf` holds: the next bytes of the stream).
    /// `Incomplete` and `Invalid` leave it where it was.
    pub fn next(&mut self, buf: &[u8]) -> Peek<Frame> {
        let (frame, state) = match self.state {
            State::Head => match request(buf) {
                Ok(Some(request)) => {
                    let state = match request.body {
                        Body::None | Body::Length(0) => State::Head,
                        Body::Length(n) => State::Body(n),
                        Body::Chunked => State::Chunk { first: true },
                    };
                    (Frame::Head(request), state)
                }
                Ok(None) => return Peek::Incomplete,
                Err(invalid) => return Peek::Invalid(invalid),
            },
            State::Body(n) => (Frame::Body(n), State::Head),
            State::Chunk { first } => match chunk(buf, first) {
                Ok(Some((line, 0))) => match trailers(buf, line) {
                    Ok(Some(end)) => (Frame::LastChunk(end), State::Head),
                    Ok(None) => return Peek::Incomplete,
                    Err(invalid) => return Peek::Invalid(invalid),
                },
                Ok(Some((line, data))) => {
                    (Frame::Chunk { line, data }, State::Chunk { first: false })
                }
                Ok(None) => return Peek::Incomplete,
                Err(invalid) => return Peek::Invalid(invalid),
            },
        };
        if matches!(frame, Frame::Head(_)) {
            self.requests += 1;
        }
        self.state = state;
        Peek::Complete(frame)
    }
}

/// How a stream given whole to [`frame_stream`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Between two requests.
    Boundary,
    /// Inside a head, a chunk line or a body: more bytes would be needed.
    Incomplete,
    /// At a frame the framer refused.
    Invalid(Invalid),
}

/// The frames of a whole client→server stream, each with its offset, as a caller that moves each
/// frame's bytes (bodies unread) sees them; and how the stream ended. For tests and fuzzing: the
/// gateway feeds [`Framer::next`] what it has read.
pub fn frame_stream(stream: &[u8]) -> (Vec<(usize, Frame)>, StreamEnd) {
    let mut framer = Framer::new();
    let mut frames = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = stream.get(pos..).unwrap_or_default();
        if rest.is_empty() && framer.at_request_boundary() {
            return (frames, StreamEnd::Boundary);
        }
        let frame = match framer.next(rest) {
            Peek::Complete(frame) => frame,
            Peek::Incomplete => return (frames, StreamEnd::Incomplete),
            Peek::Invalid(invalid) => return (frames, StreamEnd::Invalid(invalid)),
        };
        let len = match &frame {
            Frame::Head(request) => request.head.consumed as u64,
            Frame::Body(n) => *n,
            Frame::Chunk { line, data } => (*line as u64).saturating_add(*data),
            Frame::LastChunk(len) => *len as u64,
        };
        frames.push((pos, frame));
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|len| pos.checked_add(len))
        else {
            return (frames, StreamEnd::Incomplete);
        };
        if end > stream.len() {
            return (frames, StreamEnd::Incomplete);
        }
        pos = end;
    }
}

/// Reads a request head at the start of `buf` and how its body is framed. Each framing field is
/// checked when its line is whole; the combination at the blank line.
pub fn peek_request(buf: &[u8]) -> Peek<Request> {
    match request(buf) {
        Ok(Some(request)) => Peek::Complete(request),
        Ok(None) => Peek::Incomplete,
        Err(invalid) => Peek::Invalid(invalid),
    }
}

/// The framing fields of one head, as they arrive.
#[derive(Debug, Default)]
struct Fields {
    content_length: Option<u64>,
    /// A `Transfer-Encoding` field, accepted only when it ends in `chunked`.
    transfer_encoding: bool,
    expect_continue: bool,
    upgrade: Vec<String>,
    close: bool,
    keep_alive: bool,
}

fn request(buf: &[u8]) -> Result<Option<Request>, Invalid> {
    let mut fields = Fields::default();
    let Some(head) = request_head(buf, |name, value, _| fields.add(name, value))? else {
        return Ok(None);
    };
    // RFC 9112 §6.1: a server MAY reject both; a proxy that forwarded them would let the server
    // pick either. RFC 9112 §6.1 also: Transfer-Encoding in HTTP/1.0 means faulty framing.
    if fields.transfer_encoding && fields.content_length.is_some() {
        return Err(Invalid::HttpContentLengthAndTransferEncoding);
    }
    if fields.transfer_encoding && head.version_minor == 0 {
        return Err(Invalid::HttpTransferEncodingInHttp10);
    }
    let body = match (fields.transfer_encoding, fields.content_length) {
        (true, _) => Body::Chunked,
        (false, Some(n)) => Body::Length(n),
        (false, None) => Body::None,
    };
    let close = fields.close || (head.version_minor == 0 && !fields.keep_alive);
    Ok(Some(Request {
        head,
        body,
        expect_continue: fields.expect_continue,
        upgrade: fields.upgrade,
        close,
    }))
}

impl Fields {
    fn add(&mut self, name: &[u8], value: &[u8]) -> Result<(), Invalid> {
        if name.eq_ignore_ascii_case(b"content-length") {
            if self.content_length.is_some() {
                return Err(Invalid::HttpDuplicateContentLength);
            }
            if self.transfer_encoding {
                return Err(Invalid::HttpContentLengthAndTransferEncoding);
            }
            self.content_length = Some(content_length(value)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if self.transfer_encoding {
                return Err(Invalid::HttpBadTransferEncoding {
                    reason: "more than one Transfer-Encoding field",
                });
            }
            if self.content_length.is_some() {
                return Err(Invalid::HttpContentLengthAndTransferEncoding);
            }
            transfer_codings(value)?;
            self.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            self.expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            for protocol in list(value) {
                let protocol = String::from_utf8_lossy(protocol).to_ascii_lowercase();
                // `h2c` and `h2c/…`: HTTP/2 over cleartext (RFC 7540 §3.2).
                if protocol == "h2c" || protocol.starts_with("h2c/") {
                    return Err(Invalid::HttpUpgradeH2c);
                }
                self.upgrade.push(protocol);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in list(value) {
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }
}

/// `Content-Length = 1*DIGIT` (RFC 9110 §8.6), nothing else: no sign, no list ("5, 5" is legal
/// to collapse but read differently by some parsers), no other whitespace than the OWS trimmed.
fn content_length(value: &[u8]) -> Result<u64, Invalid> {
    if value.is_empty()
        || value.len() > MAX_CONTENT_LENGTH_DIGITS
        || !value.iter().all(u8::is_ascii_digit)
    {
        return Err(Invalid::HttpBadContentLength);
    }
    value
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(Invalid::HttpBadContentLength)
}

/// The `Transfer-Encoding` list (RFC 9112 §6.1): known codings, spelled in lowercase without
/// parameters, and `chunked` exactly once and last (RFC 9112 §6.3, rule 4: a request whose body
/// length "cannot be determined reliably" is refused). Servers disagree on case and on unknown
/// codings, so anything else is refused rather than guessed.
fn transfer_codings(value: &[u8]) -> Result<(), Invalid> {
    let bad = |reason| Err(Invalid::HttpBadTransferEncoding { reason });
    let codings: Vec<&[u8]> = value.split(|&b| b == b',').map(trim_ows).collect();
    let Some((last, before)) = codings.split_last() else {
        return bad("empty Transfer-Encoding");
    };
    if *last != b"chunked" {
        return bad("chunked is not the last transfer coding");
    }
    for coding in before {
        if !KNOWN_CODINGS.contains(coding) {
            return bad(if *coding == b"chunked" {
                "chunked more than once"
            } else {
                "unknown transfer coding"
            });
        }
    }
    Ok(())
}

/// The non-empty elements of a comma-separated field value (RFC 9110 §5.6.1), OWS trimmed.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|item| !item.is_empty())
}

/// A chunk-size line at the start of `buf` (after the CRLF ending the previous data unless
/// `first`): its length with that CRLF, and the chunk size (RFC 9112 §7.1).
///
/// `chunk = chunk-size [ chunk-ext ] CRLF`, `chunk-size = 1*HEXDIG`. Extensions are accepted as
/// `;name` or `;name=value` (a token, or a quoted-string without escapes) with no whitespace:
/// BWS is legal there but parsers read it differently, so it is refused.
fn chunk(buf: &[u8], first: bool) -> Result<Option<(usize, u64)>, Invalid> {
    let bad = |reason| Invalid::HttpBadChunk { reason };
    let mut pos = 0;
    if !first {
        match buf {
            [] | [b'\r'] => return Ok(None),
            [b'\r', b'\n', ..] => pos = 2,
            _ => return Err(bad("chunk data not followed by CRLF")),
        }
    }
    let rest = buf.get(pos..).unwrap_or_default();
    let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > MAX_CHUNK_SIZE_DIGITS {
        return Err(bad("chunk size over 15 hex digits"));
    }
    if digits == rest.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err(bad("chunk size is not hex digits"));
    }
    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
        if rest.len() >= MAX_CHUNK_LINE {
            return Err(bad("chunk-size line over 4 KiB"));
        }
        return Ok(None);
    };
    if lf + 1 > MAX_CHUNK_LINE {
        return Err(bad("chunk-size line over 4 KiB"));
    }
    let line = match rest[..lf].strip_suffix(b"\r") {
        Some(line) if !line.contains(&b'\r') => line,
        _ => return Err(bad("chunk-size line does not end in CRLF")),
    };
    chunk_extensions(&line[digits..])?;
    let size = rest[..digits].iter().fold(0u64, |n, d| {
        let digit = char::from(*d).to_digit(16).unwrap_or_default();
        (n << 4) | u64::from(digit)
    });
    Ok(Some((pos + lf + 1, size)))
}

/// `*( ";" name [ "=" value ] )` after the chunk size, with no whitespace (RFC 9112 §7.1.1).
fn chunk_extensions(mut ext: &[u8]) -> Result<(), Invalid> {
    let bad = Invalid::HttpBadChunk {
        reason: "malformed chunk extension",
    };
    let token = |bytes: &[u8]| bytes.iter().take_while(|&&b| is_tchar(b)).count();
    while !ext.is_empty() {
        let Some(rest) = ext.strip_prefix(b";") else {
            return Err(bad);
        };
        let name = token(rest);
        if name == 0 {
            return Err(bad);
        }
        ext = &rest[name..];
        if let Some(value) = ext.strip_prefix(b"=") {
            let len = match value.strip_prefix(b"\"") {
                Some(quoted) => {
                    let Some(end) = quoted.iter().position(|&b| b == b'"') else {
                        return Err(bad);
                    };
                    // qdtext only: no escapes, no controls.
                    if quoted[..end]
                        .iter()
                        .any(|&b| b == b'\\' || b < 0x20 || b == 0x7f)
                    {
                        return Err(bad);
                    }
                    end + 2
                }
                None => token(value),
            };
            if len == 0 {
                return Err(bad);
            }
            ext = &value[len..];
        }
    }
    Ok(())
}

/// The trailer section after the last chunk's line (`line` bytes): field lines until the blank
/// line (RFC 9112 §7.1.2), each checked like a header line. Returns the length through it.
fn trailers(buf: &[u8], line: usize) -> Result<Option<usize>, Invalid> {
    let mut pos = line;
    let mut number = 0;
    loop {
        number += 1;
        let Some(field) = next_line(buf, &mut pos, number)? else {
            return Ok(None);
        };
        if field.is_empty() {
            return Ok(Some(pos));
        }
        if number > MAX_HEADERS {
            return Err(Invalid::HttpTooManyHeaders { max: MAX_HEADERS });
        }
        let (name, _) = header(field, number)?;
        // Framing fields in trailers would frame nothing (RFC 9110 §6.5.1); some parsers merge
        // trailers into the header section, so a late Content-Length or Host is refused.
        for framing in [
            &b"content-length"[..],
            b"transfer-encoding",
            b"host",
            b"upgrade",
            b"connection",
        ] {
            if name.eq_ignore_ascii_case(framing) {
                return Err(Invalid::HttpBadChunk {
                    reason: "framing or routing field in the trailer section",
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "http_framing_tests.rs"]
mod tests;
