//! DNS names and `dnsName` patterns.
//!
//! A pattern is parsed once into lowercase labels stored reversed (TLD first), like linkerd's
//! `MatchHost`, so matching is a walk from the right with no allocation. The policy set's name
//! index (`crate::index`) instead looks names up by their suffixes, through `Prefix::accepts`
//! here, so both ways share one definition of what matches. A name to match is a [`DnsName`]:
//! checked once when it entered egressgate, never again per pattern.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

/// RFC 1035 §2.3.4: 255 octets on the wire is 253 characters of presentation text.
const MAX_NAME_LEN: usize = 253;
/// RFC 1035 §2.3.4.
const MAX_LABEL_LEN: usize = 63;

/// Why a DNS name or `dnsName` pattern was rejected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {len} characters long, the limit is 253")]
    TooLong { len: usize },
    #[error("empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("label {label:?} is longer than 63 characters")]
    LabelTooLong { label: String },
    #[error("invalid character {ch:?} (allowed: letters, digits, '-', '_')")]
    InvalidChar { ch: char },
    #[error("label {label:?} starts or ends with '-'")]
    HyphenAtEdge { label: String },
    #[error("an IP address is not a DNS name (use `cidr`)")]
    IpLiteral,
    #[error("the last label is all digits, which is not a DNS name")]
    NumericTopLabel,
    #[error("`*` and `**` may only be the whole first label")]
    MisplacedWildcard,
    #[error("a wildcard needs at least one label after it, e.g. `*.example.com`")]
    BareWildcard,
}

/// How many labels a pattern accepts in front of its fixed suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Prefix {
    /// `db.corp.example`: nothing in front.
    Exact,
    /// `*.corp.example`: exactly one label.
    OneLabel,
    /// `**.corp.example`: one or more labels.
    AnyLabels,
}

/// A `dnsName` rule: an exact name, `*.suffix` (exactly one more label) or `**.suffix` (one or
/// more). Matching is case-insensitive and ignores one trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsNamePattern {
    prefix: Prefix,
    /// Lowercase labels of the fixed part, reversed: `corp.example` is `["example", "corp"]`.
    reversed: Vec<String>,
}

// === impl DnsNamePattern ===

impl DnsNamePattern {
    /// Whether `name` is covered by this pattern. Only a [`DnsName`] can be asked, so a hostile
    /// SNI or Host value that breaks the rule never gets this far.
    pub fn matches(&self, name: &DnsName) -> bool {
        let mut labels = name.as_bytes().rsplit(|&byte| byte == b'.');
        for want in &self.reversed {
            match labels.next() {
                Some(label) if label == want.as_bytes() => {}
                _ => return false,
            }
        }
        self.prefix.accepts(labels.count())
    }

    /// Whether this pattern is a plain name without a wildcard.
    pub fn is_exact(&self) -> bool {
        self.prefix == Prefix::Exact
    }

    pub(crate) fn prefix(&self) -> Prefix {
        self.prefix
    }

    /// The fixed part as a [`DnsName`] spells it: `*.Corp.Example` gives `corp.example`.
    pub(crate) fn fixed_part(&self) -> String {
        let labels: Vec<&str> = self.reversed.iter().rev().map(String::as_str).collect();
        labels.join(".")
    }
}

// === impl Prefix ===

impl Prefix {
    /// Whether a name with `extra` labels in front of the fixed part is covered.
    pub(crate) fn accepts(self, extra: usize) -> bool {
        match self {
            Prefix::Exact => extra == 0,
            Prefix::OneLabel => extra == 1,
            Prefix::AnyLabels => extra >= 1,
        }
    }
}

impl FromStr for DnsNamePattern {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: s.len() });
        }
        if s == "*" || s == "**" {
            return Err(NameError::BareWildcard);
        }
        let (prefix, rest) = if let Some(rest) = s.strip_prefix("**.") {
            (Prefix::AnyLabels, rest)
        } else if let Some(rest) = s.strip_prefix("*.") {
            (Prefix::OneLabel, rest)
        } else {
            (Prefix::Exact, s)
        };
        if prefix != Prefix::Exact && rest.is_empty() {
            return Err(NameError::BareWildcard);
        }
        check_name(rest)?;
        let reversed = rest.rsplit('.').map(str::to_ascii_lowercase).collect();
        Ok(DnsNamePattern { prefix, reversed })
    }
}

impl fmt::Display for DnsNamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            Prefix::Exact => {}
            Prefix::OneLabel => f.write_str("*.")?,
            Prefix::AnyLabels => f.write_str("**.")?,
        }
        for (i, label) in self.reversed.iter().rev().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(label)?;
        }
        Ok(())
    }
}

/// A DNS name that passed the one rule every name in egressgate follows: labels of 1..=63
/// letters, digits, `-` or `_`, no `-` at either end, at most 253 characters, not an IP address
/// (nor a name whose last label is all digits). Kept lowercase without the trailing dot, so two
/// names are equal exactly when their text is, and nothing downstream lowercases again.
///
/// The peekers build it from SNI and Host, the DNS shim from the answers it records, the
/// gateway from names a file or an operator gives; [`DnsName::parse`] (or `FromStr`) is the only
/// way in. Cheap to clone: a name of up to [`DnsName::INLINE`] bytes (most names) is stored
/// inline, a longer one shared.
#[derive(Clone)]
pub struct DnsName(Repr);

#[derive(Clone)]
enum Repr {
    Inline {
        len: u8,
        bytes: [u8; DnsName::INLINE],
    },
    Shared(Arc<str>),
}

// === impl DnsName ===

impl DnsName {
    /// Longest name kept inline; 38 bytes make a 40-byte `DnsName`.
    pub const INLINE: usize = 38;

    /// Checks `name` by the one rule (see the type) and returns it lowercased without its
    /// trailing dot; the error says which part broke the rule.
    pub fn parse(name: &str) -> Result<DnsName, NameError> {
        let name = name.strip_suffix('.').unwrap_or(name);
        check_name(name)?;
        let mut bytes = [0; DnsName::INLINE];
        match (bytes.get_mut(..name.len()), u8::try_from(name.len())) {
            (Some(inline), Ok(len)) => {
                inline.copy_from_slice(name.as_bytes());
                inline.make_ascii_lowercase();
                Ok(DnsName(Repr::Inline { len, bytes }))
            }
            _ => Ok(DnsName(Repr::Shared(Arc::from(name.to_ascii_lowercase())))),
        }
    }

    /// The name's bytes, without the UTF-8 check [`DnsName::as_str`] makes: comparisons and
    /// hashes use these (the hot path compares names on every connection and answer).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Repr::Shared(name) => name.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Copied from a checked name, whole: ASCII, so always valid UTF-8.
            Repr::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|name| std::str::from_utf8(name).ok())
                .unwrap_or_default(),
            Repr::Shared(name) => name,
        }
    }
}

impl std::ops::Deref for DnsName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for DnsName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for DnsName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for DnsName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for DnsName {}

impl PartialEq<str> for DnsName {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for DnsName {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl std::hash::Hash for DnsName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that `Borrow<str>` lookups find it.
        self.as_str().hash(state);
    }
}

impl PartialOrd for DnsName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DnsName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Byte order is `str` order.
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DnsName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        DnsName::parse(s)
    }
}

impl serde::Serialize for DnsName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Checks a name that has already lost its trailing dot.
fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    let labels = check_labels(name);
    // Every IP literal breaks a label rule (IPv6 has `:`, IPv4 ends in a numeric label), so the
    // costlier parse only runs then, to report the more telling reason.
    if labels.is_err() && name.parse::<IpAddr>().is_ok() {
        return Err(NameError::IpLiteral);
    }
    labels
}

fn check_labels(name: &str) -> Result<(), NameError> {
    // Split by hand: on names this short, `str::split` costs more than the checks.
    let mut rest = name;
    let last = loop {
        match rest.bytes().position(|b| b == b'.') {
            Some(dot) => {
                check_label(&rest[..dot])?;
                rest = &rest[dot + 1..];
            }
            None => {
                check_label(rest)?;
                break rest;
            }
        }
    };
    // No TLD is numeric; this also catches short IPv4 forms like `127.1` that resolvers accept.
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NameError::NumericTopLabel);
    }
    Ok(())
}

fn check_label(label: &str) -> Result<(), NameError> {
    if label.is_empty() {
        return Err(NameError::EmptyLabel);
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(NameError::LabelTooLong {
            label: label.to_owned(),
        });
    }
    if let Some(at) = label
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        // The bytes before are ASCII, so a character starts at `at`.
        let ch = label[at..].chars().next().unwrap_or_default();
        return Err(if ch == '*' {
            NameError::MisplacedWildcard
        } else {
            NameError::InvalidChar { ch }
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(NameError::HyphenAtEdge {
            label: label.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pat(s: &str) -> DnsNamePattern {
        s.parse().expect(s)
    }

    /// Whether `pattern` matches `name`; a name that breaks the rule matches nothing.
    trait MatchesText {
        fn matches_text(&self, name: &str) -> bool;
    }

    impl MatchesText for DnsNamePattern {
        fn matches_text(&self, name: &str) -> bool {
            DnsName::parse(name).is_ok_and(|name| self.matches(&name))
        }
    }

    #[test]
    fn exact_pattern_matches_only_that_name() {
        let p = pat("db.corp.example");
        assert!(p.matches_text("db.corp.example"));
        assert!(!p.matches_text("x.db.corp.example"));
        assert!(!p.matches_text("corp.example"));
        assert!(!p.matches_text("db.corp.example.com"));
        assert!(!p.matches_text("adb.corp.example"));
        assert!(p.is_exact());
    }

    #[test]
    fn single_star_matches_exactly_one_label() {
        let p = pat("*.db.corp.example");
        assert!(p.matches_text("a.db.corp.example"));
        assert!(p.matches_text("a-b_c.db.corp.example"));
        assert!(!p.matches_text("db.corp.example"));
        assert!(!p.matches_text("a.b.db.corp.example"));
        assert!(!p.is_exact());
    }

    #[test]
    fn double_star_matches_one_or_more_labels() {
        let p = pat("**.googleapis.com");
        assert!(p.matches_text("storage.googleapis.com"));
        assert!(p.matches_text("a.b.c.googleapis.com"));
        assert!(!p.matches_text("googleapis.com"));
        assert!(!p.matches_text("notgoogleapis.com"));
    }

    #[test]
    fn matching_ignores_case_and_one_trailing_dot() {
        let p = pat("DB.Corp.Example.");
        assert_eq!(p.to_string(), "db.corp.example");
        assert!(p.matches_text("db.corp.example"));
        assert!(p.matches_text("DB.CORP.EXAMPLE."));
        assert!(!p.matches_text("db.corp.example.."));
        assert!(pat("*.EXAMPLE").matches_text("Foo.example."));
    }

    #[test]
    fn star_dot_tld_needs_a_label_in_front() {
        let p = pat("*.com");
        assert!(p.matches_text("example.com"));
        assert!(!p.matches_text("com"));
        assert!(!p.matches_text("a.example.com"));
        assert!(pat("com").matches_text("com"));
        assert!(!pat("com").matches_text("example.com"));
    }

    #[test]
    fn invalid_names_never_match() {
        let p = pat("**.example");
        assert!(!p.matches_text("a b.example"));
        assert!(!p.matches_text(".example"));
        assert!(!p.matches_text("a..example"));
        assert!(!p.matches_text("-a.example"));
        assert!(!p.matches_text(""));
    }

    #[test]
    fn bad_patterns_are_rejected_with_a_reason() {
        let cases = [
            ("", NameError::Empty),
            (".", NameError::Empty),
            ("*", NameError::BareWildcard),
            ("**", NameError::BareWildcard),
            ("*.", NameError::BareWildcard),
            ("a.*.example", NameError::MisplacedWildcard),
            ("*a.example", NameError::MisplacedWildcard),
            ("***.example", NameError::MisplacedWildcard),
            ("*.*.example", NameError::MisplacedWildcard),
            ("a..example", NameError::EmptyLabel),
            ("a b.example", NameError::InvalidChar { ch: ' ' }),
            ("-a.example", NameError::HyphenAtEdge { label: "-a".into() }),
            ("192.0.2.1", NameError::IpLiteral),
            ("::1", NameError::IpLiteral),
            ("::ffff:192.0.2.1", NameError::IpLiteral),
            ("a.é.example", NameError::InvalidChar { ch: 'é' }),
            ("127.1", NameError::NumericTopLabel),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<DnsNamePattern>(), Err(want), "{input:?}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(matches!(
            long_label.parse::<DnsNamePattern>(),
            Err(NameError::LabelTooLong { .. })
        ));
        let long_name = ["abcdefghi"; 26].join(".");
        assert_eq!(
            long_name.parse::<DnsNamePattern>(),
            Err(NameError::TooLong { len: 259 })
        );
    }

    #[test]
    fn underscore_labels_are_allowed() {
        assert!(pat("_sip._tcp.example").matches_text("_SIP._tcp.example"));
    }

    #[test]
    fn dns_name_parse_says_which_part_broke_the_rule() {
        let parse = |s| DnsName::parse(s).map(|n| n.to_string());
        assert_eq!(parse("Api.Example.COM."), Ok("api.example.com".into()));
        assert_eq!(parse("x.example.."), Err(NameError::EmptyLabel));
        assert_eq!(parse("127.1"), Err(NameError::NumericTopLabel));
        assert_eq!(parse("10.0.0.1."), Err(NameError::IpLiteral));
        assert_eq!(parse("a*.example"), Err(NameError::MisplacedWildcard));
        assert_eq!(parse("*.example"), Err(NameError::MisplacedWildcard));
        assert_eq!(parse(""), Err(NameError::Empty));
        assert_eq!(parse("."), Err(NameError::Empty));
    }

    #[test]
    fn dns_names_long_and_short_compare_and_hash_by_their_text() {
        use std::collections::HashSet;
        let long = format!("{}.example", "Ab".repeat(30));
        let short = DnsName::parse("API.example.").expect("valid");
        let long = DnsName::parse(&long).expect("valid");
        assert_eq!(short, "api.example");
        assert_eq!(long.as_str(), format!("{}.example", "ab".repeat(30)));
        let set: HashSet<DnsName> = [short.clone(), long.clone()].into();
        assert!(set.contains("api.example"));
        assert!(set.contains(long.as_str()));
        assert_eq!(std::mem::size_of::<DnsName>(), 40);
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_-]{0,10}[a-zA-Z]"
    }

    fn name(min: usize, max: usize) -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(label(), min..=max)
    }

    proptest! {
        #[test]
        fn dns_name_parse_is_idempotent(s in "[a-zA-Z0-9._*-]{0,60}\\.?") {
            if let Ok(once) = DnsName::parse(&s) {
                prop_assert_eq!(DnsName::parse(&once), Ok(once.clone()));
            }
        }

        #[test]
        fn double_star_never_matches_its_own_suffix(
            suffix in name(2, 2), front in name(1, 4),
        ) {
            let suffix = suffix.join(".");
            let p = pat(&format!("**.{suffix}"));
            let many = format!("{}.{}", front.join("."), suffix);
            let one = format!("{}.{}", front[0], suffix);
            prop_assert!(!p.matches_text(&suffix));
            prop_assert!(p.matches_text(&many));
            prop_assert!(p.matches_text(&one));
        }

        #[test]
        fn single_star_matches_exactly_one_extra_label(
            suffix in name(2, 2), front in name(0, 4),
        ) {
            let suffix = suffix.join(".");
            let p = pat(&format!("*.{suffix}"));
            let candidate = if front.is_empty() {
                suffix.clone()
            } else {
                format!("{}.{suffix}", front.join("."))
            };
            prop_assert_eq!(p.matches_text(&candidate), front.len() == 1);
        }

        #[test]
        fn exact_pattern_matches_itself_in_any_case(n in name(1, 5)) {
            let n = n.join(".");
            let p = pat(&n);
            let dotted = format!("{}.", n);
            prop_assert!(p.matches_text(&n.to_ascii_uppercase()));
            prop_assert!(p.matches_text(&dotted));
            prop_assert_eq!(p.to_string(), n.to_ascii_lowercase());
        }
    }
}
