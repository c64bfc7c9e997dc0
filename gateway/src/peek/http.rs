//! HTTP/1 request-head peeker: method, target, version and the host the request is for.
//!
//! Strict on purpose (RFC 9112): the gateway decides on the head it parsed, and the upstream acts
//! on the head it parses, so any byte the two could read differently is a smuggling lever.
//!
//! Line endings: CRLF only. RFC 9112 §2.2 lets a recipient accept a bare LF, and most servers do,
//! but "Host: a\nHost: b" then reads as one header to some and two to others; a bare CR is invalid
//! anyway. Pods' HTTP clients all send CRLF (every capture in `testdata/http` does).
//!
//! Known limits: no leading empty lines before the request line (RFC 9112 §2.2 SHOULD ignore them;
//! no client sends them first on a new connection); percent-encoded or non-ASCII hosts are refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egressgate_policy::DnsName;

use super::{dns_name, is_tchar, Invalid, Peek};

/// Most header lines we read before refusing, as hyper's default. Real heads have 2–20
/// (Chromium navigation: 7); a cap bounds the work per connection and the lines kept to compare.
pub const MAX_HEADERS: usize = 100;

/// A parsed HTTP/1 request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    /// The host the request names: absolute-form authority, else the Host header, without its
    /// port. `None` for HTTP/1.0 without Host, or an empty Host (RFC 9112 §3.2).
    pub host: Option<Host>,
    /// The port next to that host, if one was written.
    pub host_port: Option<u16>,
    /// Bytes of the head through the blank line; a body, if any, follows.
    pub consumed: usize,
}

/// The host part of an authority: a DNS name, or an IP literal, which no `dnsName` rule
/// matches (only a `cidr` rule allows a request naming one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(DnsName),
    Ip(IpAddr),
}

/// An authority (RFC 9110 §7.2 `uri-host [ ":" port ]`) reduced to what a policy matches.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Authority {
    host: Host,
    port: Option<u16>,
}

/// The Host field of a request (RFC 9112 §3.2): an empty value is not the same as none at all.
#[derive(Debug)]
enum HostField {
    Missing,
    Empty,
    Authority(Authority),
}

/// Reads an HTTP/1 request head from the start of `buf`. `Incomplete` until the blank line; the
/// caller caps the bytes it is willing to buffer. Each line is checked as soon as it is whole.
pub fn peek_request_head(buf: &[u8]) -> Peek<RequestHead> {
    match request_head(buf, |_, _, _| Ok(())) {
        Ok(Some(head)) => Peek::Complete(head),
        Ok(None) => Peek::Incomplete,
        Err(invalid) => Peek::Invalid(invalid),
    }
}

/// [`peek_request_head`]'s parser, which also hands every header field (name, OWS-trimmed
/// value, line number) to `field` as soon as its line is whole, in stream order: an error it
/// returns is the head's (the framing parser reads Content-Length and friends this way).
pub(crate) fn request_head(
    buf: &[u8],
    mut field: impl FnMut(&[u8], &[u8], usize) -> Result<(), Invalid>,
) -> Result<Option<RequestHead>, Invalid> {
    let mut pos = 0;
    let Some(line) = next_line(buf, &mut pos, 1)? else {
        return Ok(None);
    };
    let (target, version_minor) = request_line(line)?;
    let target_authority = absolute_form_authority(target)?;

    let mut host_field = HostField::Missing;
    let mut number = 1; // line number, 1-based; the request line is line 1
    loop {
        number += 1;
        let Some(line) = next_line(buf, &mut pos, number)? else {
            return Ok(None);
        };
        if line.is_empty() {
            break;
        }
        if number - 1 > MAX_HEADERS {
            return Err(Invalid::HttpTooManyHeaders { max: MAX_HEADERS });
        }
        let (name, value) = header(line, number)?;
        field(name, value, number)?;
        if name.eq_ignore_ascii_case(b"host") {
            if !matches!(host_field, HostField::Missing) {
                return Err(Invalid::HttpDuplicateHost);
            }
            host_field = match authority(value)? {
                Some(authority) => HostField::Authority(authority),
                None => HostField::Empty,
            };
        }
    }

    // RFC 9112 §3.2.2: with absolute-form the target's authority wins; RFC 9112 §3.2 has the
    // client send a Host "identical to that authority component". We refuse any difference (port
    // included), since the upstream might believe either one.
    let host = match (target_authority, host_field) {
        (Some(target), HostField::Authority(header)) if header == target => Some(target),
        (Some(_), HostField::Authority(_) | HostField::Empty) => {
            return Err(Invalid::HttpHostConflict)
        }
        (Some(target), HostField::Missing) => Some(target),
        (None, HostField::Authority(header)) => Some(header),
        (None, HostField::Empty) => None,
        (None, HostField::Missing) if version_minor == 1 => return Err(Invalid::HttpMissingHost),
        (None, HostField::Missing) => None,
    };
    Ok(Some(RequestHead {
        version_minor,
        host_port: host.as_ref().and_then(|a| a.port),
        host: host.map(|a| a.host),
        consumed: pos,
    }))
}

/// The next CRLF-terminated line from `pos`, without its CRLF; `None` if it isn't whole yet.
pub(crate) fn next_line<'a>(
    buf: &'a [u8],
    pos: &mut usize,
    number: usize,
) -> Result<Option<&'a [u8]>, Invalid> {
    let rest = buf.get(*pos..).unwrap_or_default();
    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = match rest[..lf].strip_suffix(b"\r") {
        Some(line) if !line.contains(&b'\r') => line,
        _ => return Err(Invalid::HttpLineEnding { line: number }),
    };
    *pos += lf + 1;
    Ok(Some(line))
}

/// `method SP request-target SP HTTP-version` (RFC 9112 §3), single spaces only: the target
/// and the minor version. The method is only checked: nothing is decided by it.
fn request_line(line: &[u8]) -> Result<(&[u8], u8), Invalid> {
    let bad = |reason| Invalid::HttpBadRequestLine { reason };
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        return Err(Invalid::HttpBadMethod);
    }
    let (Some(target), Some(version)) = (parts.next(), parts.next()) else {
        return Err(bad("fewer than three parts"));
    };
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(bad(
            "request-target empty or with a byte outside 0x21..=0x7e",
        ));
    }
    // RFC 9112 §2.3: HTTP-version = "HTTP" "/" DIGIT "." DIGIT, case-sensitive.
    let (major, minor) = match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            (major - b'0', minor - b'0')
        }
        _ => return Err(bad("malformed HTTP-version")),
    };
    if method == b"PRI" && target == b"*" && (major, minor) == (2, 0) {
        return Err(Invalid::Http2Preface);
    }
    if major != 1 || minor > 1 {
        return Err(Invalid::HttpUnsupportedVersion { major, minor });
    }
    if method == b"CONNECT" {
        return Err(Invalid::HttpConnect);
    }
    if target == b"*" && method != b"OPTIONS" {
        return Err(bad("asterisk-form with a method other than OPTIONS"));
    }
    Ok((target, minor))
}

/// The authority of an absolute-form target (RFC 9112 §3.2.2), `None` for origin- and
/// asterisk-form. Only `http` and `https` (RFC 9110 §4.2) are accepted.
fn absolute_form_authority(target: &[u8]) -> Result<Option<Authority>, Invalid> {
    let bad = |reason| Invalid::HttpBadRequestLine { reason };
    if target.starts_with(b"/") || target == b"*" {
        return Ok(None);
    }
    let Some(sep) = target.windows(3).position(|w| w == b"://") else {
        return Err(bad(
            "request-target is not origin-, absolute- or asterisk-form",
        ));
    };
    let scheme = &target[..sep];
    if !scheme.eq_ignore_ascii_case(b"http") && !scheme.eq_ignore_ascii_case(b"https") {
        return Err(bad("absolute-form scheme is not http or https"));
    }
    let rest = &target[sep + 3..];
    let end = rest
        .iter()
        .position(|b| b"/?#".contains(b))
        .unwrap_or(rest.len());
    match authority(&rest[..end])? {
        Some(authority) => Ok(Some(authority)),
        None => Err(Invalid::HttpBadHost {
            reason: "empty authority in absolute-form",
        }),
    }
}

/// Splits a header line into name and OWS-trimmed value (RFC 9112 §5.1, RFC 9110 §5.5).
pub(crate) fn header(line: &[u8], number: usize) -> Result<(&[u8], &[u8]), Invalid> {
    if line.starts_with(b" ") || line.starts_with(b"\t") {
        return Err(Invalid::HttpObsFold { line: number });
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(Invalid::HttpHeaderNoColon { line: number });
    };
    let name = &line[..colon];
    if name.ends_with(b" ") || name.ends_with(b"\t") {
        return Err(Invalid::HttpSpaceBeforeColon { line: number });
    }
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(Invalid::HttpBadHeaderName { line: number });
    }
    // OWS is SP and HTAB only (RFC 9110 §5.6.3). `trim_ascii` would also drop a form feed,
    // so `Host: api.example.test\x0c` would be checked as api while the server sees (and
    // routes or refuses) another value.
    let value = trim_ows(&line[colon + 1..]);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Invalid::HttpBadHeaderValue { line: number });
    }
    Ok((name, value))
}

/// `value` without leading and trailing OWS (SP / HTAB, RFC 9110 §5.6.3).
pub(crate) fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2). Empty gives `None`. The host is an
/// IPv6 literal in brackets, an IPv4 address, or a DNS name (see [`dns_name`]); userinfo
/// (RFC 9110 §4.2.4: treat as an error) and percent-encoding are refused.
fn authority(value: &[u8]) -> Result<Option<Authority>, Invalid> {
    let bad = |reason| Invalid::HttpBadHost { reason };
    if value.is_empty() {
        return Ok(None);
    }
    if value.contains(&b'@') {
        return Err(bad("userinfo in authority"));
    }
    let (host, port) = if let Some(bracketed) = value.strip_prefix(b"[") {
        let Some(close) = bracketed.iter().position(|&b| b == b']') else {
            return Err(bad("unterminated IPv6 literal"));
        };
        let literal = std::str::from_utf8(&bracketed[..close]).unwrap_or_default();
        let Ok(addr) = literal.parse::<Ipv6Addr>() else {
            return Err(bad("invalid IPv6 literal"));
        };
        let port = match &bracketed[close + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(bad("bytes after IPv6 literal")),
        };
        (Host::Ip(addr.into()), port)
    } else {
        let (host, port) = match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        };
        let text = std::str::from_utf8(host).unwrap_or_default();
        let host = match text.parse::<Ipv4Addr>() {
            Ok(addr) => Host::Ip(addr.into()),
            Err(_) => Host::Name(dns_name(host).map_err(bad)?),
        };
        (host, port)
    };
    let port = match port {
        None => None,
        Some(digits) => Some(port_number(digits).ok_or(bad("invalid port"))?),
    };
    Ok(Some(Authority { host, port }))
}

// === impl Host ===

impl Host {
    /// The DNS name, unless the host is an IP literal.
    pub fn name(&self) -> Option<&DnsName> {
        match self {
            Host::Name(name) => Some(name),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    /// The name, or the address as Rust prints it (IPv6 without brackets: `[::1]:80` → `::1`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl serde::Serialize for Host {
    /// As the text the decision line's `host` field has always carried.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Host::Name(name) => name.serialize(serializer),
            Host::Ip(ip) => serializer.collect_str(ip),
        }
    }
}

/// `port = *DIGIT` (RFC 3986 §3.2.3), here 1 to 5 digits within u16; empty is refused.
fn port_number(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
