//! DNS names and `dnsName` patterns.
//!
//! A pattern is parsed once into lowercase labels stored reversed (TLD first), like linkerd's
//! `MatchHost`, so matching is a walk from the right with no allocation. The policy set's name
//! index (`crate::index`) instead looks names up by their suffixes, through `Prefix::accepts` and
//! `match_form` here, so both ways share one definition of what matches.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

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
    /// Whether `name` is covered by this pattern. Names that are not valid DNS names (see
    /// [`normalize_name`]) never match, so a hostile SNI or Host value cannot slip through.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if check_name(name).is_err() {
            return false;
        }
        let mut labels = name.rsplit('.');
        for want in &self.reversed {
            match labels.next() {
                Some(label) if label.eq_ignore_ascii_case(want) => {}
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

    /// The fixed part in [`match_form`]: `*.Corp.Example` gives `corp.example`.
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

/// Lowercases `name` and strips one trailing dot; `None` if it is not a valid DNS name (labels
/// of 1..=63 letters, digits, `-` or `_`, no `-` at either end, at most 253 characters, not an IP
/// address). Used for SNI, Host headers and DNS answers before they meet a policy.
pub fn normalize_name(name: &str) -> Option<String> {
    match_form(name).map(Cow::into_owned)
}

/// Checks `name` by the one rule every DNS name in egressgate follows (see [`normalize_name`])
/// and returns it lowercased without its trailing dot; the error says which part broke the rule.
/// The gateway's peekers check SNI and Host values with it, so what a peeker accepts is exactly
/// what a pattern can match.
pub fn parse_name(name: &str) -> Result<String, NameError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    check_name(name)?;
    Ok(name.to_ascii_lowercase())
}

/// [`normalize_name`] without the copy when `name` is already lowercase without a trailing dot,
/// as names from the gateway's name table are: checked once per lookup, not once per pattern.
pub(crate) fn match_form(name: &str) -> Option<Cow<'_, str>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    check_name(name).ok()?;
    Some(if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    })
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

    #[test]
    fn exact_pattern_matches_only_that_name() {
        let p = pat("db.corp.example");
        assert!(p.matches("db.corp.example"));
        assert!(!p.matches("x.db.corp.example"));
        assert!(!p.matches("corp.example"));
        assert!(!p.matches("db.corp.example.com"));
        assert!(!p.matches("adb.corp.example"));
        assert!(p.is_exact());
    }

    #[test]
    fn single_star_matches_exactly_one_label() {
        let p = pat("*.db.corp.example");
        assert!(p.matches("a.db.corp.example"));
        assert!(p.matches("a-b_c.db.corp.example"));
        assert!(!p.matches("db.corp.example"));
        assert!(!p.matches("a.b.db.corp.example"));
        assert!(!p.is_exact());
    }

    #[test]
    fn double_star_matches_one_or_more_labels() {
        let p = pat("**.googleapis.com");
        assert!(p.matches("storage.googleapis.com"));
        assert!(p.matches("a.b.c.googleapis.com"));
        assert!(!p.matches("googleapis.com"));
        assert!(!p.matches("notgoogleapis.com"));
    }

    #[test]
    fn matching_ignores_case_and_one_trailing_dot() {
        let p = pat("DB.Corp.Example.");
        assert_eq!(p.to_string(), "db.corp.example");
        assert!(p.matches("db.corp.example"));
        assert!(p.matches("DB.CORP.EXAMPLE."));
        assert!(!p.matches("db.corp.example.."));
        assert!(pat("*.EXAMPLE").matches("Foo.example."));
    }

    #[test]
    fn star_dot_tld_needs_a_label_in_front() {
        let p = pat("*.com");
        assert!(p.matches("example.com"));
        assert!(!p.matches("com"));
        assert!(!p.matches("a.example.com"));
        assert!(pat("com").matches("com"));
        assert!(!pat("com").matches("example.com"));
    }

    #[test]
    fn invalid_names_never_match() {
        let p = pat("**.example");
        assert!(!p.matches("a b.example"));
        assert!(!p.matches(".example"));
        assert!(!p.matches("a..example"));
        assert!(!p.matches("-a.example"));
        assert!(!p.matches(""));
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
        assert!(pat("_sip._tcp.example").matches("_SIP._tcp.example"));
    }

    #[test]
    fn parse_name_says_which_part_broke_the_rule() {
        assert_eq!(parse_name("Api.Example.COM."), Ok("api.example.com".into()));
        assert_eq!(parse_name("x.example.."), Err(NameError::EmptyLabel));
        assert_eq!(parse_name("127.1"), Err(NameError::NumericTopLabel));
        assert_eq!(parse_name("10.0.0.1."), Err(NameError::IpLiteral));
        assert_eq!(parse_name("a*.example"), Err(NameError::MisplacedWildcard));
    }

    #[test]
    fn normalize_name_lowercases_and_strips_one_dot() {
        assert_eq!(
            normalize_name("Api.Example.COM.").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(normalize_name("x.example").as_deref(), Some("x.example"));
        assert_eq!(normalize_name("x.example.."), None);
        assert_eq!(normalize_name("*.example"), None);
        assert_eq!(normalize_name("10.0.0.1"), None);
        assert_eq!(normalize_name(""), None);
        assert_eq!(normalize_name("."), None);
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_-]{0,10}[a-zA-Z]"
    }

    fn name(min: usize, max: usize) -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(label(), min..=max)
    }

    proptest! {
        #[test]
        fn normalize_name_is_idempotent(s in "[a-zA-Z0-9._*-]{0,40}\\.?") {
            if let Some(once) = normalize_name(&s) {
                prop_assert_eq!(normalize_name(&once), Some(once.clone()));
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
            prop_assert!(!p.matches(&suffix));
            prop_assert!(p.matches(&many));
            prop_assert!(p.matches(&one));
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
            prop_assert_eq!(p.matches(&candidate), front.len() == 1);
        }

        #[test]
        fn exact_pattern_matches_itself_in_any_case(n in name(1, 5)) {
            let n = n.join(".");
            let p = pat(&n);
            let dotted = format!("{}.", n);
            prop_assert!(p.matches(&n.to_ascii_uppercase()));
            prop_assert!(p.matches(&dotted));
            prop_assert_eq!(p.to_string(), n.to_ascii_lowercase());
        }
    }
}
