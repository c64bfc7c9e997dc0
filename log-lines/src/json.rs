//! Writing a line's JSON object field by field, for the lines written per connection (a
//! decision, a close). serde_json's generic path escapes every key and every value byte by
//! byte and formats numbers and addresses through `fmt`: most of a connection's user-space
//! instructions went there. Here keys are written as they are (they are constants), strings
//! that need no escape (names, addresses, codes: nearly all) are copied at once, and the rare
//! one that does is escaped by serde_json, so the output is the same bytes serde_json writes.

use std::fmt::Display;
use std::io::Write;
use std::net::SocketAddr;

use serde::Serialize;

/// One JSON object being written into `out`: opened by [`JsonObject::new`], closed by
/// [`JsonObject::end`]. Keys must be plain ASCII without `"` or `\` (they are literals).
#[derive(Debug)]
pub struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, empty: true }
    }

    pub fn end(self) {
        self.out.push(b'}');
    }

    fn key(&mut self, key: &'static str) {
        debug_assert!(needs_no_escape(key), "key {key:?}");
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// `"time"`: now, as [`crate::rfc3339_now`] writes it.
    pub fn time(&mut self, key: &'static str) {
        self.key(key);
        self.out.push(b'"');
        crate::push_rfc3339(self.out, std::time::SystemTime::now());
        self.out.push(b'"');
    }

    pub fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        push_str(self.out, value);
    }

    /// Left out when `None`.
    pub fn opt_str(&mut self, key: &'static str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    /// A string of `parts` one after the other, without joining them first.
    pub fn concat(&mut self, key: &'static str, parts: &[&str]) {
        self.key(key);
        if parts.iter().all(|part| needs_no_escape(part)) {
            self.out.push(b'"');
            for part in parts {
                self.out.extend_from_slice(part.as_bytes());
            }
            self.out.push(b'"');
        } else {
            // Writing a str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *self.out, &parts.concat());
        }
    }

    pub fn u64(&mut self, key: &'static str, value: u64) {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    pub fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    pub fn null(&mut self, key: &'static str) {
        self.key(key);
        self.out.extend_from_slice(b"null");
    }

    /// An address as a string, as `Display` writes it.
    pub fn socket_addr(&mut self, key: &'static str, addr: SocketAddr) {
        self.key(key);
        match addr {
            SocketAddr::V4(v4) => {
                // By hand: `Display` formats each octet through `fmt`'s padding machinery.
                self.out.push(b'"');
                for (at, octet) in v4.ip().octets().into_iter().enumerate() {
                    if at > 0 {
                        self.out.push(b'.');
                    }
                    self.out
                        .extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
                }
                self.out.push(b':');
                self.out
                    .extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
                self.out.push(b'"');
            }
            SocketAddr::V6(_) => push_display(self.out, &addr),
        }
    }

    /// Anything else as a string, as its `Display` writes it.
    pub fn display(&mut self, key: &'static str, value: &impl Display) {
        self.key(key);
        push_display(self.out, value);
    }

    /// An array of strings.
    pub fn strs<'s>(&mut self, key: &'static str, values: impl IntoIterator<Item = &'s str>) {
        self.key(key);
        self.out.push(b'[');
        for (at, value) in values.into_iter().enumerate() {
            if at > 0 {
                self.out.push(b',');
            }
            push_str(self.out, value);
        }
        self.out.push(b']');
    }

    /// A nested object written field by field.
    pub fn object(&mut self, key: &'static str, write: impl FnOnce(&mut JsonObject<'_>)) {
        self.key(key);
        let mut nested = JsonObject::new(self.out);
        write(&mut nested);
        nested.end();
    }

    /// A value of any shape, through serde_json (for fields that are rare or small).
    pub fn value(&mut self, key: &'static str, value: &impl Serialize) -> serde_json::Result<()> {
        self.key(key);
        serde_json::to_writer(&mut *self.out, value)
    }
}

/// Whether `text` goes into a JSON string as it is: serde_json escapes `"`, `\` and the
/// control characters below U+0020, nothing else. Eight bytes at a time: every string of a
/// line passes here.
fn needs_no_escape(text: &str) -> bool {
    let mut words = text.as_bytes().chunks_exact(8);
    let words_plain = words.by_ref().all(|word| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        !word_needs_escape(u64::from_le_bytes(bytes))
    });
    words_plain
        && words
            .remainder()
            .iter()
            .all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

const EACH_BYTE: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Whether one of the word's bytes is below 0x20, `"` or `\`. `(x - n·EACH_BYTE) & !x &
/// HIGH_BITS` is non-zero exactly when some byte of `x` is below `n` (n ≤ 0x80; bytes of
/// 0x80 and above, UTF-8 beyond ASCII, never count); a byte equal to `c` is a zero byte of
/// `x ^ c·EACH_BYTE`.
fn word_needs_escape(word: u64) -> bool {
    let below = |x: u64, n: u64| x.wrapping_sub(n * EACH_BYTE) & !x & HIGH_BITS != 0;
    below(word, 0x20)
        || below(word ^ (u64::from(b'"') * EACH_BYTE), 1)
        || below(word ^ (u64::from(b'\\') * EACH_BYTE), 1)
}

fn push_str(out: &mut Vec<u8>, text: &str) {
    if needs_no_escape(text) {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(out, text);
    }
}

fn push_display(out: &mut Vec<u8>, value: &impl Display) {
    let start = out.len();
    out.push(b'"');
    // Writing into a Vec fails only if `Display` does.
    let written = write!(out, "{value}").is_ok();
    let text = out.get(start + 1..).unwrap_or_default();
    if written && std::str::from_utf8(text).is_ok_and(needs_no_escape) {
        out.push(b'"');
    } else {
        out.truncate(start);
        let text = value.to_string();
        let _ = serde_json::to_writer(out, &text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(write: impl FnOnce(&mut JsonObject<'_>)) -> String {
        let mut out = Vec::new();
        let mut object = JsonObject::new(&mut out);
        write(&mut object);
        object.end();
        String::from_utf8(out).expect("UTF-8")
    }

    /// Every byte that needs an escape, at every place of strings up to 24 bytes long, among
    /// plain ASCII and multi-byte UTF-8: found exactly where the byte-by-byte rule finds it.
    #[test]
    fn the_escape_check_agrees_with_the_byte_rule_everywhere() {
        let byte_rule = |text: &str| text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        let fillers = [
            "abcdefghijklmnopqrstuvwx",
            "é-ü-ß-€-日本-~!#$%&'()*+,/:;<=>?@[]^_`{|}\u{7f}",
        ];
        let specials = (0u8..0x20).chain([b'"', b'\\']).map(char::from);
        for special in specials.chain(['a', 'é', '\u{7f}', ' ']) {
            for filler in fillers {
                let chars: Vec<char> = filler.chars().take(24).collect();
                for len in 0..=chars.len() {
                    for at in 0..=len {
                        let mut text: String = chars[..len].iter().collect();
                        let byte_at = text.char_indices().nth(at).map_or(text.len(), |(i, _)| i);
                        text.insert(byte_at, special);
                        assert_eq!(needs_no_escape(&text), byte_rule(&text), "{text:?}");
                    }
                    let text: String = chars[..len].iter().collect();
                    assert_eq!(needs_no_escape(&text), byte_rule(&text), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn fields_are_written_as_serde_json_writes_them() {
        let v4: SocketAddr = "198.18.0.7:40000".parse().expect("addr");
        let v6: SocketAddr = "[fd00::1]:443".parse().expect("addr");
        let line = written(|o| {
            o.str("plain", "api.example.test");
            o.str("quoted", "a \"b\" \\ c\n\u{1}é");
            o.concat("joined", &["shop", "/", "orders"]);
            o.concat("joined_quoted", &["a\"", "/", "b"]);
            o.opt_str("absent", None);
            o.u64("n", u64::MAX);
            o.bool("yes", true);
            o.null("none");
            o.socket_addr("v4", v4);
            o.socket_addr("v6", v6);
            o.display("shown", &"tab\there");
            o.strs("list", ["x", "y\"z"]);
            o.strs("empty", []);
            o.object("nested", |n| n.str("k", "v"));
            o.value("map", &std::collections::BTreeMap::from([("a", 1)]))
                .expect("serializes");
        });
        use serde_json::{json, to_string};
        let fields = [
            ("plain", json!("api.example.test")),
            ("quoted", json!("a \"b\" \\ c\n\u{1}é")),
            ("joined", json!("shop/orders")),
            ("joined_quoted", json!("a\"/b")),
            ("n", json!(u64::MAX)),
            ("yes", json!(true)),
            ("none", json!(null)),
            ("v4", json!("198.18.0.7:40000")),
            ("v6", json!("[fd00::1]:443")),
            ("shown", json!("tab\there")),
            ("list", json!(["x", "y\"z"])),
            ("empty", json!([])),
            ("nested", json!({"k": "v"})),
            ("map", json!({"a": 1})),
        ];
        // serde_json's own text of each value, in this order.
        let expected: Vec<String> = fields
            .iter()
            .map(|(key, value)| {
                format!(
                    "{}:{}",
                    to_string(key).expect("key"),
                    to_string(value).expect("value")
                )
            })
            .collect();
        assert_eq!(line, format!("{{{}}}", expected.join(",")));
    }

    #[test]
    fn an_empty_object_is_braces() {
        assert_eq!(written(|_| {}), "{}");
    }
}
