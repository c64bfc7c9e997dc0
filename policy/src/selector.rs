//! Kubernetes label selectors: `matchLabels` plus `matchExpressions`.
//!
//! Semantics follow `metav1.LabelSelector`: every term must hold; an empty selector selects
//! everything.

use std::collections::{BTreeMap, BTreeSet};

/// Kubernetes caps label names and values at 63 characters.
const MAX_LABEL_NAME_LEN: usize = 63;
/// The optional key prefix is a DNS subdomain.
const MAX_LABEL_PREFIX_LEN: usize = 253;

/// Why a label selector was rejected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("invalid label key {key:?}")]
    InvalidKey { key: String },
    #[error("invalid label value {value:?} for key {key:?}")]
    InvalidValue { key: String, value: String },
    #[error("unknown operator {operator:?}: expected In, NotIn, Exists or DoesNotExist")]
    UnknownOperator { operator: String },
    #[error("operator {operator} on key {key:?} needs at least one value")]
    ValuesRequired { key: String, operator: &'static str },
    #[error("operator {operator} on key {key:?} takes no values")]
    ValuesForbidden { key: String, operator: &'static str },
}

/// A label selector that has been checked: keys and values are valid label syntax and each
/// operator has the values it needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    match_labels: BTreeMap<String, String>,
    match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    operator: Operator,
}

/// A `matchExpressions` operator, carrying the values it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// The label is present and its value is one of these.
    In(BTreeSet<String>),
    /// The label is absent, or its value is none of these.
    NotIn(BTreeSet<String>),
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

// === impl LabelSelector ===

impl LabelSelector {
    /// The empty selector, `{}`: selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn new(
        match_labels: BTreeMap<String, String>,
        match_expressions: Vec<Requirement>,
    ) -> Result<Self, SelectorError> {
        for (key, value) in &match_labels {
            check_key(key)?;
            check_value(key, value)?;
        }
        Ok(LabelSelector {
            match_labels,
            match_expressions,
        })
    }

    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// The `matchLabels` pairs, which a pod must all carry: the policy set files policies under
    /// one.
    pub(crate) fn match_labels(&self) -> &BTreeMap<String, String> {
        &self.match_labels
    }

    pub(crate) fn match_expressions(&self) -> &[Requirement] {
        &self.match_expressions
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

// === impl Requirement ===

impl Requirement {
    /// Builds a term from its YAML spelling (`operator` is case-sensitive, as in Kubernetes).
    pub fn new(key: &str, operator: &str, values: Vec<String>) -> Result<Self, SelectorError> {
        check_key(key)?;
        for value in &values {
            check_value(key, value)?;
        }
        let needs_values = |name: &'static str| {
            if values.is_empty() {
                return Err(SelectorError::ValuesRequired {
                    key: key.to_owned(),
                    operator: name,
                });
            }
            Ok(values.iter().cloned().collect::<BTreeSet<_>>())
        };
        let no_values = |name: &'static str| {
            if !values.is_empty() {
                return Err(SelectorError::ValuesForbidden {
                    key: key.to_owned(),
                    operator: name,
                });
            }
            Ok(())
        };
        let operator = match operator {
            "In" => Operator::In(needs_values("In")?),
            "NotIn" => Operator::NotIn(needs_values("NotIn")?),
            "Exists" => no_values("Exists").map(|()| Operator::Exists)?,
            "DoesNotExist" => no_values("DoesNotExist").map(|()| Operator::DoesNotExist)?,
            other => {
                return Err(SelectorError::UnknownOperator {
                    operator: other.to_owned(),
                })
            }
        };
        Ok(Requirement {
            key: key.to_owned(),
            operator,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(set) => value.is_some_and(|v| set.contains(v)),
            Operator::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// `[prefix/]name`: prefix a DNS subdomain, name a label name.
fn check_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= MAX_LABEL_PREFIX_LEN
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    if !prefix_ok || name.is_empty() || !is_label_name(name) {
        return Err(SelectorError::InvalidKey {
            key: key.to_owned(),
        });
    }
    Ok(())
}

fn check_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() || is_label_name(value) {
        return Ok(());
    }
    Err(SelectorError::InvalidValue {
        key: key.to_owned(),
        value: value.to_owned(),
    })
}

/// Kubernetes label name/value syntax: `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, ≤ 63.
fn is_label_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            s.len() <= MAX_LABEL_NAME_LEN
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> Requirement {
        Requirement::new(key, op, values.iter().map(|v| v.to_string()).collect()).expect(op)
    }

    #[test]
    fn empty_selector_selects_everything() {
        let s = LabelSelector::everything();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("role", "app")])));
    }

    #[test]
    fn match_labels_needs_every_pair() {
        let s =
            LabelSelector::new(labels(&[("role", "app"), ("tier", "db")]), vec![]).expect("valid");
        assert!(s.matches(&labels(&[("role", "app"), ("tier", "db"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("role", "app")])));
        assert!(!s.matches(&labels(&[("role", "app"), ("tier", "web")])));
    }

    #[test]
    fn in_needs_the_label_with_a_listed_value() {
        let r = req("env", "In", &["prod", "staging"]);
        assert!(r.matches(&labels(&[("env", "prod")])));
        assert!(!r.matches(&labels(&[("env", "dev")])));
        assert!(!r.matches(&labels(&[])));
    }

    #[test]
    fn not_in_accepts_an_absent_label() {
        let r = req("env", "NotIn", &["prod"]);
        assert!(r.matches(&labels(&[])));
        assert!(r.matches(&labels(&[("env", "dev")])));
        assert!(!r.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist_look_only_at_the_key() {
        let exists = req("app.kubernetes.io/name", "Exists", &[]);
        let absent = req("app.kubernetes.io/name", "DoesNotExist", &[]);
        let with = labels(&[("app.kubernetes.io/name", "")]);
        assert!(exists.matches(&with));
        assert!(!absent.matches(&with));
        assert!(!exists.matches(&labels(&[])));
        assert!(absent.matches(&labels(&[])));
    }

    #[test]
    fn all_terms_must_hold() {
        let s = LabelSelector::new(
            labels(&[("role", "app")]),
            vec![
                req("env", "In", &["prod"]),
                req("canary", "DoesNotExist", &[]),
            ],
        )
        .expect("valid");
        assert!(s.matches(&labels(&[("role", "app"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[
            ("role", "app"),
            ("env", "prod"),
            ("canary", "1")
        ])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn malformed_terms_are_rejected() {
        let err = |k: &str, op: &str, vs: &[&str]| {
            Requirement::new(k, op, vs.iter().map(|v| v.to_string()).collect())
                .expect_err("invalid")
        };
        assert!(matches!(
            err("env", "in", &["a"]),
            SelectorError::UnknownOperator { .. }
        ));
        assert!(matches!(
            err("env", "In", &[]),
            SelectorError::ValuesRequired { .. }
        ));
        assert!(matches!(
            err("env", "Exists", &["a"]),
            SelectorError::ValuesForbidden { .. }
        ));
        assert!(matches!(
            err("-env", "Exists", &[]),
            SelectorError::InvalidKey { .. }
        ));
        assert!(matches!(
            err("A/env", "Exists", &[]),
            SelectorError::InvalidKey { .. }
        ));
        assert!(matches!(
            err("env", "In", &["bad value"]),
            SelectorError::InvalidValue { .. }
        ));
        assert!(LabelSelector::new(labels(&[("role", "a b")]), vec![]).is_err());
    }
}
