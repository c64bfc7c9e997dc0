//! The policy file format: Kubernetes-style YAML → [`Policy`], with `file:line:column` errors.
//!
//! Validation runs inside `Deserialize`, so serde_yaml_ng tags each error with the position of
//! the value it was deserializing. Two details decide where that position lands:
//! - Scalars go through `FromStr` from `visit_str` (`Parsed`). `#[serde(try_from)]` would
//!   convert after the scalar is done, and the error would land on the enclosing mapping.
//! - Cross-field checks (a peer's one-of, `endPort ≥ port`, kind vs namespace) run in the
//!   mapping's own `visit_map` (`from_mapping`), so they point at that mapping.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU16;
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::model::{
    Cidr, EgressRule, Mode, ModelError, ObjectName, Origin, Peer, Policy, PolicyKind, PolicyRef,
    PortRange, PortRule, PostgresRule, Protocol,
};
use crate::name::DnsNamePattern;
use crate::selector::{LabelSelector, Requirement};

/// The only `apiVersion` this crate reads.
pub const API_VERSION: &str = "egressgate.dev/v1alpha1";

/// One rejected policy document (or a duplicate policy), with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    /// 1-based; 0 if unknown.
    pub line: usize,
    /// 1-based; 0 if unknown.
    pub column: usize,
    pub message: String,
}

/// Faults that need more than one value to see.
#[derive(Debug, thiserror::Error)]
enum Invalid {
    #[error("expected {API_VERSION}")]
    ApiVersion,
    #[error(
        "EgressPolicy needs metadata.namespace (ClusterEgressPolicy is the cluster-wide kind)"
    )]
    NamespaceRequired,
    #[error("ClusterEgressPolicy must not set metadata.namespace")]
    NamespaceForbidden,
    #[error(
        "namespaceSelector is only allowed on ClusterEgressPolicy \
         (an EgressPolicy selects pods of its own namespace)"
    )]
    NamespaceSelectorForbidden,
    #[error("a peer needs exactly one of dnsName or cidr")]
    PeerNeedsOne,
    #[error("protocol is required: one of tcp, tls, http, postgresql, udp")]
    ProtocolRequired,
    #[error("`postgresql` settings need protocol: postgresql")]
    PostgresWithoutProtocol,
    #[error(
        "`postgresql` settings do not apply to protocol: udp (a udp rule allows datagrams to \
         its ports, nothing more)"
    )]
    PostgresOnUdp,
    #[error(transparent)]
    Model(#[from] ModelError),
}

// === impl LoadError ===

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for LoadError {}

/// Parses every document in one file. Each document stands alone: a broken one yields its
/// error and the rest are still parsed, so the result lists every bad document at once.
/// Empty documents (only comments, or a stray `---`) are skipped.
pub fn parse_policies(file_label: &str, text: &str) -> Result<Vec<Policy>, Vec<LoadError>> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for chunk in split_documents(text) {
        let origin = chunk.origin(file_label);
        for document in serde_yaml_ng::Deserializer::from_str(chunk.text) {
            match (DocumentSeed { origin: &origin }).deserialize(document) {
                Ok(Some(policy)) => policies.push(policy),
                Ok(None) => {}
                Err(err) => {
                    errors.push(load_error(file_label, &err, chunk.first_line, &origin));
                    // After a syntax error libyaml cannot resume, and serde_yaml_ng's iterator
                    // would hand back the same error forever.
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

// === documents ===

/// The text of one YAML document and the 0-based line it starts on.
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

impl Chunk<'_> {
    /// The first line with content, for messages about the whole document.
    fn origin(&self, file: &str) -> Origin {
        for (i, line) in self.text.lines().enumerate() {
            let (skipped, rest) = match line.strip_prefix("---").filter(|_| is_marker(line)) {
                Some(rest) => (3, rest),
                None => (0, line),
            };
            let content = rest.trim_start();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let column = skipped + rest.chars().count() - content.chars().count() + 1;
            return Origin {
                file: file.to_owned(),
                line: self.first_line + i + 1,
                column,
            };
        }
        Origin {
            file: file.to_owned(),
            line: self.first_line + 1,
            column: 1,
        }
    }
}

/// Splits at `---` lines. libyaml stops at the first syntax error, so parsing documents
/// separately is what lets one broken document leave the others readable. A `---` in column 0
/// always starts a document in YAML, even inside a block scalar, so this split is exact.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let (mut start, mut start_line, mut pos) = (0, 0, 0);
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line) && pos > start {
            chunks.push(Chunk {
                text: &text[start..pos],
                first_line: start_line,
            });
            start = pos;
            start_line = line_no;
        }
        pos += line.len();
    }
    chunks.push(Chunk {
        text: &text[start..],
        first_line: start_line,
    });
    chunks
}

fn is_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

fn load_error(
    file: &str,
    err: &serde_yaml_ng::Error,
    first_line: usize,
    doc: &Origin,
) -> LoadError {
    let Some(location) = err.location() else {
        return LoadError {
            file: file.to_owned(),
            line: doc.line,
            column: doc.column,
            message: err.to_string(),
        };
    };
    LoadError {
        file: file.to_owned(),
        line: first_line + location.line(),
        column: location.column(),
        message: strip_mark(
            &err.to_string(),
            location.line(),
            location.column(),
            first_line,
        ),
    }
}

/// Drops serde_yaml_ng's " at line L column C" (we print the position in front) and shifts any
/// other position libyaml mentions ("while parsing a block mapping at line …") from
/// document-relative to file lines.
fn strip_mark(message: &str, line: usize, column: usize, first_line: usize) -> String {
    let mark = format!(" at line {line} column {column}");
    let Some(at) = message.rfind(&mark) else {
        return message.to_owned();
    };
    let mut out = message[..at].to_owned();
    let mut rest = &message[at + mark.len()..];
    const AT_LINE: &str = " at line ";
    while let Some(i) = rest.find(AT_LINE) {
        let (before, after) = rest.split_at(i + AT_LINE.len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(n) = after[..digits].parse::<usize>() {
            out.push_str(&(n + first_line).to_string());
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum DocumentField {
    ApiVersion,
    Kind,
    Metadata,
    Spec,
}

struct DocumentSeed<'a> {
    origin: &'a Origin,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Option<Policy>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Policy>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Option<Policy>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an EgressPolicy or ClusterEgressPolicy document")
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<Policy>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<Policy>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<Policy>, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Policy>, A::Error> {
        let mut api_version = false;
        let mut kind = None;
        let mut metadata = None;
        let mut spec = None;
        while let Some(field) = map.next_key::<DocumentField>()? {
            match field {
                DocumentField::ApiVersion if api_version => {
                    return Err(de::Error::duplicate_field("apiVersion"))
                }
                DocumentField::ApiVersion => {
                    map.next_value::<Parsed<ApiVersion>>()?;
                    api_version = true;
                }
                DocumentField::Kind if kind.is_some() => {
                    return Err(de::Error::duplicate_field("kind"))
                }
                DocumentField::Kind => kind = Some(map.next_value::<Parsed<PolicyKind>>()?.0),
                DocumentField::Metadata if metadata.is_some() => {
                    return Err(de::Error::duplicate_field("metadata"))
                }
                DocumentField::Metadata => {
                    metadata = Some(map.next_value_seed(MetadataSeed(kind))?)
                }
                DocumentField::Spec if spec.is_some() => {
                    return Err(de::Error::duplicate_field("spec"))
                }
                DocumentField::Spec => spec = Some(map.next_value_seed(SpecSeed(kind))?),
            }
        }
        if !api_version {
            return Err(de::Error::missing_field("apiVersion"));
        }
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let metadata = metadata.ok_or_else(|| de::Error::missing_field("metadata"))?;
        let spec = spec.ok_or_else(|| de::Error::missing_field("spec"))?;
        // Repeated for documents that put `kind` after `metadata` or `spec`; those errors
        // point at the document instead of the offending mapping.
        check_metadata(kind, &metadata).map_err(de::Error::custom)?;
        check_spec(kind, &spec).map_err(de::Error::custom)?;
        Ok(Some(Policy {
            reference: PolicyRef {
                kind,
                namespace: metadata.namespace.map(ObjectName::into_string),
                name: metadata.name.into_string(),
            },
            origin: self.origin.clone(),
            pod_selector: spec.pod_selector,
            namespace_selector: spec.namespace_selector,
            mode: spec.mode,
            egress: spec.egress,
        }))
    }
}

struct ApiVersion;

impl FromStr for ApiVersion {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Invalid> {
        if s == API_VERSION {
            Ok(ApiVersion)
        } else {
            Err(Invalid::ApiVersion)
        }
    }
}

// === metadata and spec ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: Parsed<ObjectName>,
    namespace: Option<Parsed<ObjectName>>,
    // Accepted so manifests written for kubectl load unchanged; they carry no policy meaning.
    #[serde(rename = "labels")]
    _labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "annotations")]
    _annotations: Option<BTreeMap<String, String>>,
}

struct Metadata {
    name: ObjectName,
    namespace: Option<ObjectName>,
}

/// Carries `kind` when it came first, so metadata errors point at `metadata`.
struct MetadataSeed(Option<PolicyKind>);

impl<'de> DeserializeSeed<'de> for MetadataSeed {
    type Value = Metadata;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Metadata, D::Error> {
        from_mapping(d, "policy metadata", |raw: RawMetadata| {
            let metadata = Metadata {
                name: raw.name.0,
                namespace: raw.namespace.map(|n| n.0),
            };
            if let Some(kind) = self.0 {
                check_metadata(kind, &metadata)?;
            }
            Ok::<_, Invalid>(metadata)
        })
    }
}

fn check_metadata(kind: PolicyKind, metadata: &Metadata) -> Result<(), Invalid> {
    match (kind, &metadata.namespace) {
        (PolicyKind::EgressPolicy, None) => Err(Invalid::NamespaceRequired),
        (PolicyKind::ClusterEgressPolicy, Some(_)) => Err(Invalid::NamespaceForbidden),
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    pod_selector: De<LabelSelector>,
    namespace_selector: Option<De<LabelSelector>>,
    mode: Option<Parsed<Mode>>,
    egress: Vec<De<EgressRule>>,
}

struct Spec {
    pod_selector: LabelSelector,
    namespace_selector: Option<LabelSelector>,
    mode: Mode,
    egress: Vec<EgressRule>,
}

/// Carries `kind` when it came first, so a misplaced namespaceSelector points at `spec`.
struct SpecSeed(Option<PolicyKind>);

impl<'de> DeserializeSeed<'de> for SpecSeed {
    type Value = Spec;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Spec, D::Error> {
        from_mapping(d, "policy spec", |raw: RawSpec| {
            let spec = Spec {
                pod_selector: raw.pod_selector.0,
                namespace_selector: raw.namespace_selector.map(|s| s.0),
                mode: raw.mode.map(|m| m.0).unwrap_or_default(),
                egress: raw.egress.into_iter().map(|r| r.0).collect(),
            };
            if let Some(kind) = self.0 {
                check_spec(kind, &spec)?;
            }
            Ok::<_, Invalid>(spec)
        })
    }
}

fn check_spec(kind: PolicyKind, spec: &Spec) -> Result<(), Invalid> {
    if kind == PolicyKind::EgressPolicy && spec.namespace_selector.is_some() {
        return Err(Invalid::NamespaceSelectorForbidden);
    }
    Ok(())
}

// === rules ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    to: NonEmpty<De<Peer>>,
    ports: NonEmpty<De<PortRule>>,
}

impl<'de> Deserialize<'de> for De<EgressRule> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_mapping(d, "an egress rule", |raw: RawRule| {
            let to = raw.to.0.into_iter().map(|p| p.0).collect();
            let ports = raw.ports.0.into_iter().map(|p| p.0).collect();
            EgressRule::new(to, ports).map(De)
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPeer {
    dns_name: Option<Parsed<DnsNamePattern>>,
    cidr: Option<Parsed<Cidr>>,
}

impl<'de> Deserialize<'de> for De<Peer> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_mapping(d, "a peer (dnsName or cidr)", |raw: RawPeer| {
            match (raw.dns_name, raw.cidr) {
                (Some(name), None) => Ok(De(Peer::DnsName(name.0))),
                (None, Some(cidr)) => Ok(De(Peer::Cidr(cidr.0))),
                _ => Err(Invalid::PeerNeedsOne),
            }
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPort {
    port: NonZeroU16,
    end_port: Option<NonZeroU16>,
    protocol: Option<Parsed<ProtocolName>>,
    postgresql: Option<RawPostgres>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPostgres {
    #[serde(default)]
    databases: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    allow_encrypted: bool,
}

impl<'de> Deserialize<'de> for De<PortRule> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_mapping(d, "a port entry", |raw: RawPort| {
            let range = PortRange::new(raw.port.get(), raw.end_port.map(NonZeroU16::get))?;
            let protocol = match (raw.protocol.map(|p| p.0), raw.postgresql) {
                (None, _) => return Err(Invalid::ProtocolRequired),
                (Some(ProtocolName::Postgresql), pg) => {
                    let pg = pg.unwrap_or_default();
                    let rule = PostgresRule::new(pg.databases, pg.users, pg.allow_encrypted)?;
                    Protocol::Postgresql(rule)
                }
                (Some(ProtocolName::Udp), Some(_)) => return Err(Invalid::PostgresOnUdp),
                (Some(_), Some(_)) => return Err(Invalid::PostgresWithoutProtocol),
                (Some(ProtocolName::Udp), None) => Protocol::Udp,
                (Some(ProtocolName::Tcp), None) => Protocol::Tcp,
                (Some(ProtocolName::Tls), None) => Protocol::Tls,
                (Some(ProtocolName::Http), None) => Protocol::Http,
            };
            Ok(De(PortRule::new(range, protocol)))
        })
    }
}

/// `protocol:` before its settings are attached.
enum ProtocolName {
    Tcp,
    Tls,
    Http,
    Postgresql,
    Udp,
}

impl FromStr for ProtocolName {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "tcp" => Ok(ProtocolName::Tcp),
            "tls" => Ok(ProtocolName::Tls),
            "http" => Ok(ProtocolName::Http),
            "postgresql" => Ok(ProtocolName::Postgresql),
            "udp" => Ok(ProtocolName::Udp),
            _ => Err(ModelError::UnknownProtocol),
        }
    }
}

// === selectors ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<De<Requirement>>,
}

impl<'de> Deserialize<'de> for De<LabelSelector> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_mapping(d, "a label selector", |raw: RawSelector| {
            let exprs = raw.match_expressions.into_iter().map(|r| r.0).collect();
            LabelSelector::new(raw.match_labels, exprs).map(De)
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

impl<'de> Deserialize<'de> for De<Requirement> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_mapping(d, "a matchExpressions entry", |raw: RawRequirement| {
            Requirement::new(&raw.key, &raw.operator, raw.values).map(De)
        })
    }
}

// === serde glue ===

/// A model value deserialized from a mapping; the impls above say how.
struct De<T>(T);

/// Deserializes `R` from a mapping and converts it within the same `visit_map`, so a
/// conversion error carries that mapping's position.
fn from_mapping<'de, D, R, T, E, F>(
    d: D,
    expecting: &'static str,
    convert: F,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    R: Deserialize<'de>,
    E: fmt::Display,
    F: FnOnce(R) -> Result<T, E>,
{
    struct MappingVisitor<R, F> {
        expecting: &'static str,
        convert: F,
        raw: PhantomData<fn() -> R>,
    }

    impl<'de, R, T, E, F> Visitor<'de> for MappingVisitor<R, F>
    where
        R: Deserialize<'de>,
        E: fmt::Display,
        F: FnOnce(R) -> Result<T, E>,
    {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let raw = R::deserialize(de::value::MapAccessDeserializer::new(map))?;
            (self.convert)(raw).map_err(de::Error::custom)
        }
    }

    d.deserialize_map(MappingVisitor {
        expecting,
        convert,
        raw: PhantomData,
    })
}

/// A scalar parsed with `FromStr` while the deserializer still knows where it is.
struct Parsed<T>(T);

/// What a scalar is called in messages: `invalid dnsName "*.": …`.
trait ScalarField: FromStr<Err: fmt::Display> {
    const NAME: &'static str;
}

impl ScalarField for DnsNamePattern {
    const NAME: &'static str = "dnsName";
}

impl ScalarField for Cidr {
    const NAME: &'static str = "cidr";
}

impl ScalarField for ObjectName {
    const NAME: &'static str = "name";
}

impl ScalarField for Mode {
    const NAME: &'static str = "mode";
}

impl ScalarField for PolicyKind {
    const NAME: &'static str = "kind";
}

impl ScalarField for ProtocolName {
    const NAME: &'static str = "protocol";
}

impl ScalarField for ApiVersion {
    const NAME: &'static str = "apiVersion";
}

impl<'de, T: ScalarField> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor<T>(PhantomData<fn() -> T>);

        impl<'de, T: ScalarField> Visitor<'de> for ScalarVisitor<T> {
            type Value = Parsed<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a {} string", T::NAME)
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Parsed<T>, E> {
                s.parse()
                    .map(Parsed)
                    .map_err(|err| E::custom(format_args!("invalid {} {s:?}: {err}", T::NAME)))
            }
        }

        d.deserialize_str(ScalarVisitor(PhantomData))
    }
}

/// A list that must have at least one entry; the error points at the list.
struct NonEmpty<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SeqVisitor<T>(PhantomData<fn() -> T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
            type Value = NonEmpty<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-empty list")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NonEmpty<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(de::Error::custom("must list at least one entry"));
                }
                Ok(NonEmpty(items))
            }
        }

        d.deserialize_seq(SeqVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests;
