//! The bytes of the state files and of the hand-over stream.
//!
//! A file is a header, then frames. A frame is `magic (2) | length (u16 LE) | CRC-32 of the
//! payload (u32 LE) | payload`, so a reader that meets a torn or corrupt frame skips to the next
//! magic and goes on: one bad record costs that record, never the file. The header names the
//! format version, the file's kind and generation, and the scope (node and pod CIDRs) it was
//! written for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::table::{DestIp, PodIp, SavedName, SavedTouch};

/// The first bytes of every state file.
const FILE_MAGIC: &[u8; 8] = b"EGNAMES\n";
/// The format this build writes and reads. A file of another version is skipped whole.
pub const FORMAT_VERSION: u16 = 1;
/// The first bytes of every frame.
const FRAME_MAGIC: [u8; 2] = [0xE9, 0x6E];
const FRAME_HEAD: usize = 8;
/// A DNS name is at most 253 bytes and a frame carries one name and its CNAME chain.
const MAX_CNAMES: usize = 16;

/// What a state file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Snapshot = 1,
    Journal = 2,
}

/// A state file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: FileKind,
    pub generation: u64,
    /// Which node and pod CIDRs the records belong to (see [`super::Scope`]).
    pub scope: String,
}

/// Why a header was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not an egressgate state file")]
    NotStateFile,
    #[error("format version {0}; this build reads version {FORMAT_VERSION}")]
    Version(u16),
    #[error("truncated or corrupt header")]
    Corrupt,
}

/// One record of a file or of the hand-over stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Name(SavedName),
    Touch(SavedTouch),
}

/// Tags of the payload's first byte.
const TAG_NAME: u8 = 1;
const TAG_TOUCH: u8 = 2;

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.scope.len());
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.generation.to_le_bytes());
        let scope = self.scope.as_bytes();
        let scope = scope.get(..usize::from(u16::MAX)).unwrap_or(scope);
        out.extend_from_slice(&(scope.len() as u16).to_le_bytes());
        out.extend_from_slice(scope);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// The header at the start of `bytes`, and the length it took.
    pub fn decode(bytes: &[u8]) -> Result<(Header, usize), HeaderError> {
        let mut r = Cursor::new(bytes);
        if r.take(FILE_MAGIC.len()) != Some(&FILE_MAGIC[..]) {
            return Err(HeaderError::NotStateFile);
        }
        let version = r.u16().ok_or(HeaderError::Corrupt)?;
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        let kind = match r.u8().ok_or(HeaderError::Corrupt)? {
            1 => FileKind::Snapshot,
            2 => FileKind::Journal,
            _ => return Err(HeaderError::Corrupt),
        };
        let generation = r.u64().ok_or(HeaderError::Corrupt)?;
        let scope_len = r.u16().ok_or(HeaderError::Corrupt)?;
        let scope = r
            .take(usize::from(scope_len))
            .and_then(|s| std::str::from_utf8(s).ok())
            .ok_or(HeaderError::Corrupt)?
            .to_owned();
        let end = r.pos;
        let crc = r.u32().ok_or(HeaderError::Corrupt)?;
        if bytes.get(..end).map(crc32fast::hash) != Some(crc) {
            return Err(HeaderError::Corrupt);
        }
        Ok((
            Header {
                kind,
                generation,
                scope,
            },
            r.pos,
        ))
    }
}

/// Appends the frame of `record` to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Name(n) => encode_name(out, n.pod, n.dst, &n.name, &n.cnames, n.fresh_until),
        Record::Touch(t) => encode_touch(out, t.pod, t.dst, &t.name, t.at),
    }
}

/// Appends a [`Record::Name`] frame from borrowed parts (the hot path: no allocation). A name
/// or CNAME chain too long for a frame is not encoded (no DNS answer has one).
pub fn encode_name(
    out: &mut Vec<u8>,
    pod: PodIp,
    dst: DestIp,
    name: &str,
    cnames: &[impl AsRef<str>],
    fresh_until: SystemTime,
) {
    frame(out, |out| {
        out.push(TAG_NAME);
        put_addr(out, pod.0);
        put_addr(out, dst.0);
        out.extend_from_slice(&unix_ms(fresh_until).to_le_bytes());
        let Ok(count) = u8::try_from(cnames.len()) else {
            return false;
        };
        put_str(out, name) && usize::from(count) <= MAX_CNAMES && {
            out.push(count);
            cnames.iter().all(|c| put_str(out, c.as_ref()))
        }
    });
}

/// Appends a [`Record::Touch`] frame.
pub fn encode_touch(out: &mut Vec<u8>, pod: PodIp, dst: DestIp, name: &str, at: SystemTime) {
    frame(out, |out| {
        out.push(TAG_TOUCH);
        put_addr(out, pod.0);
        put_addr(out, dst.0);
        out.extend_from_slice(&unix_ms(at).to_le_bytes());
        put_str(out, name)
    });
}

/// Writes a frame whose payload `payload` appends; undone when it says `false` or grows
/// past a frame's length.
fn frame(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>) -> bool) {
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&[0; 6]);
    let body = out.len();
    let complete = payload(out);
    let (true, Ok(len)) = (complete, u16::try_from(out.len() - body)) else {
        out.truncate(start);
        return;
    };
    let crc = crc32fast::hash(&out[body..]);
    out[start + 2..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The records in `bytes` (after the header), skipping what is corrupt or torn.
#[derive(Debug)]
pub struct Frames<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Stretches of bytes skipped because they were not a valid frame.
    pub corrupt: usize,
}

impl<'a> Frames<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Frames {
            bytes,
            pos: 0,
            corrupt: 0,
        }
    }

    /// Moves past the bad byte at `pos` to the next frame magic, counting one corrupt stretch.
    fn resync(&mut self) {
        self.corrupt += 1;
        let from = self.pos + 1;
        self.pos = self
            .bytes
            .get(from..)
            .and_then(|rest| rest.windows(2).position(|w| w == FRAME_MAGIC))
            .map_or(self.bytes.len(), |at| from + at);
    }
}

impl Iterator for Frames<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            let rest = self.bytes.get(self.pos..)?;
            if rest.is_empty() {
                return None;
            }
            let Some(head) = rest.get(..FRAME_HEAD) else {
                // A torn last frame: the process died mid-write.
                self.corrupt += 1;
                self.pos = self.bytes.len();
                return None;
            };
            if head[..2] != FRAME_MAGIC {
                self.resync();
                continue;
            }
            let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
            let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let Some(payload) = rest.get(FRAME_HEAD..FRAME_HEAD + len) else {
                self.resync();
                continue;
            };
            if crc32fast::hash(payload) != crc {
                self.resync();
                continue;
            }
            match decode_payload(payload) {
                Some(record) => {
                    self.pos += FRAME_HEAD + len;
                    return Some(record);
                }
                None => self.resync(),
            }
        }
    }
}

fn decode_payload(payload: &[u8]) -> Option<Record> {
    let mut r = Cursor::new(payload);
    let tag = r.u8()?;
    let pod = PodIp(r.addr()?);
    let dst = DestIp(r.addr()?);
    let at = UNIX_EPOCH.checked_add(Duration::from_millis(r.u64()?))?;
    let name = r.str()?;
    let record = match tag {
        TAG_NAME => {
            let count = usize::from(r.u8()?);
            let cnames = (0..count).map(|_| r.str()).collect::<Option<Vec<_>>>()?;
            Record::Name(SavedName {
                pod,
                dst,
                name,
                cnames,
                fresh_until: at,
            })
        }
        TAG_TOUCH => Record::Touch(SavedTouch { pod, dst, name, at }),
        _ => return None,
    };
    r.at_end().then_some(record)
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn put_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

/// `false` when `s` is longer than a length byte can say.
fn put_str(out: &mut Vec<u8>, s: &str) -> bool {
    let Ok(len) = u8::try_from(s.len()) else {
        return false;
    };
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    true
}

/// A bounds-checked reader over a payload.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let taken = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(taken)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn addr(&mut self) -> Option<IpAddr> {
        match self.u8()? {
            4 => Some(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => None,
        }
    }

    fn str(&mut self) -> Option<String> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }

    fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
