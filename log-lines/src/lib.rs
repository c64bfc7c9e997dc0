//! egressgate's JSON lines on stdout: the shim's `dns` lines and the gateway's decision, close,
//! reload, restore, listening and shutdown lines share one format and one writer. It owns the
//! queue, the writer thread and the timestamp format; what goes into each line belongs to the
//! crate that writes it. Diagnostics go through `tracing` instead.
//!
//! Layout:
//! - [`write_json_line`], [`flush`]: queue a line; wait until every queued line is written.
//! - [`write_observed_line`], [`set_tap`]: the same, and the line's bytes also to a [`LineTap`]
//!   (the gateway's `observe` bus), serialized once for both.
//! - [`write_json_object`], [`write_observed_object`], `json`: the same for a line written
//!   field by field, without serde's generic path (the lines of every connection).
//! - [`rfc3339_now`]: the `time` field of every line.
//! - `output`: the `json-log` thread that writes queued lines to stdout in batches.
#![forbid(unsafe_code)]

mod json;
mod output;

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use json::JsonObject;
pub use output::flush;

/// Queues `line` for stdout (see [`output`]): one whole line, never interleaved with another.
pub fn write_json_line(line: &impl Serialize) {
    output::push(serialized(line), None);
}

/// [`write_json_line`] for a line written field by field (see [`JsonObject`]).
pub fn write_json_object(write: impl FnOnce(&mut JsonObject<'_>)) {
    output::push(object(write), None);
}

/// Where observed lines go besides stdout: the gateway's `observe` bus.
pub trait LineTap: Send + Sync {
    /// Whether anyone wants lines now. Asked for every observed line, so it must be about one
    /// atomic load: when it says no, a line costs nothing more than [`write_json_line`].
    fn wanted(&self) -> bool;
    /// One line's JSON bytes, exactly as queued for stdout (newline included). Called outside
    /// the stdout queue's lock; must not block.
    fn publish(&self, line: Vec<u8>);
}

static TAP: OnceLock<Arc<dyn LineTap>> = OnceLock::new();

/// Sets the process's tap; `false` if one was already set (the first stays).
pub fn set_tap(tap: Arc<dyn LineTap>) -> bool {
    TAP.set(tap).is_ok()
}

/// [`write_json_line`] for a line `observe` streams (decisions and DNS answers): its bytes also
/// go to the tap, when one is set and wants them.
pub fn write_observed_line(line: &impl Serialize) {
    output::push(serialized(line), tap());
}

/// [`write_observed_line`] for a line written field by field (see [`JsonObject`]).
pub fn write_observed_object(write: impl FnOnce(&mut JsonObject<'_>)) {
    output::push(object(write), tap());
}

fn tap() -> Option<&'static dyn LineTap> {
    TAP.get().map(|tap| &**tap).filter(|tap| tap.wanted())
}

/// Appends `line` as serde_json writes it.
fn serialized(line: &impl Serialize) -> impl FnOnce(&mut Vec<u8>) -> bool + '_ {
    |out| serde_json::to_writer(out, line).is_ok()
}

fn object(write: impl FnOnce(&mut JsonObject<'_>)) -> impl FnOnce(&mut Vec<u8>) -> bool {
    |out| {
        let mut object = JsonObject::new(out);
        write(&mut object);
        object.end();
        true
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-26T10:00:00.123Z`.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(t: SystemTime) -> String {
    let mut text = Vec::with_capacity(24);
    push_rfc3339(&mut text, t);
    String::from_utf8(text).unwrap_or_default()
}

/// Appends `t` as [`rfc3339_now`] writes it.
fn push_rfc3339(out: &mut Vec<u8>, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (last, mut prefix) = LAST_SECOND.get();
    if last != secs {
        prefix = second_prefix(secs);
        LAST_SECOND.set((secs, prefix));
    }
    out.extend_from_slice(&prefix);
    push_digits(out, u64::from(since.subsec_millis()), 3);
    out.push(b'Z');
}

thread_local! {
    /// The last second a time stamp was written for on this thread, and its text: the lines
    /// of one second share it, and only their milliseconds are formatted.
    static LAST_SECOND: Cell<(u64, [u8; SECOND_PREFIX])> =
        const { Cell::new((u64::MAX, [0; SECOND_PREFIX])) };
}

/// `2026-11-26T10:00:00.`
const SECOND_PREFIX: usize = 20;

fn second_prefix(secs: u64) -> [u8; SECOND_PREFIX] {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    // Written digit by digit: `format!` with its padding machinery cost most of a
    // microsecond.
    let mut text = Vec::with_capacity(SECOND_PREFIX);
    for (value, width, separator) in [
        (y, 4, b'-'),
        (m, 2, b'-'),
        (d, 2, b'T'),
        (rem / 3600, 2, b':'),
        (rem % 3600 / 60, 2, b':'),
        (rem % 60, 2, b'.'),
    ] {
        push_digits(&mut text, value, width);
        text.push(separator);
    }
    // Always 20 bytes: every field has its fixed width.
    text.try_into().unwrap_or([b'0'; SECOND_PREFIX])
}

/// The last `width` decimal digits of `value`, zero-padded (years past 9999 need not apply).
fn push_digits(out: &mut Vec<u8>, value: u64, width: u32) {
    for place in (0..width).rev() {
        let digit = value / 10u64.pow(place) % 10;
        out.push(b'0' + digit as u8);
    }
}

/// Howard Hinnant's `civil_from_days` for days since 1970-01-01 (non-negative here).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_formats_utc_with_millis() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_694_400_123);
        assert_eq!(rfc3339(t), "2026-11-26T12:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        let last = UNIX_EPOCH + Duration::from_millis(4_102_444_799_999);
        assert_eq!(rfc3339(last), "2099-12-31T23:59:59.999Z");
        // The same second again (its text is kept), then an earlier one.
        let same_second = UNIX_EPOCH + Duration::from_millis(4_102_444_799_001);
        assert_eq!(rfc3339(same_second), "2099-12-31T23:59:59.001Z");
        assert_eq!(rfc3339(t), "2026-11-26T12:00:00.123Z");
    }
}
