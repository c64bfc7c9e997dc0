//! The policy model: what a parsed `EgressPolicy` or `ClusterEgressPolicy` says.
//!
//! Every type here is built through a constructor or `FromStr` that rejects invalid rules, so a
//! value of these types is always a rule the gateway can enforce.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::name::DnsNamePattern;
use crate::selector::LabelSelector;

/// Kubernetes object names are DNS labels (RFC 1123): 63 characters at most.
const MAX_OBJECT_NAME_LEN: usize = 63;

/// Why a value in a policy was rejected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("not an IP address or CIDR")]
    CidrSyntax,
    #[error("host bits are set; did you mean {network}?")]
    CidrHostBits { network: IpNet },
    #[error(
        "an IPv4-mapped IPv6 range never matches (connections are matched as IPv4); write {ipv4}"
    )]
    CidrIpv4Mapped { ipv4: String },
    #[error("endPort {end_port} is below port {port}")]
    EndPortBelowPort { port: u16, end_port: u16 },
    #[error("port 0 is not a port")]
    PortZero,
    #[error("must be 1-63 lowercase letters, digits or '-', starting and ending alphanumeric")]
    ObjectName,
    #[error("expected one of tcp, tls, http, postgresql, udp")]
    UnknownProtocol,
    #[error("expected enforce or audit")]
    UnknownMode,
    #[error("expected EgressPolicy or ClusterEgressPolicy")]
    UnknownKind,
    #[error("`to` must list at least one peer")]
    EmptyTo,
    #[error("`ports` must list at least one port")]
    EmptyPorts,
    #[error("empty name in postgresql.{field}")]
    EmptyPostgresName { field: &'static str },
}

/// The two policy kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// Namespaced: selects pods of its own namespace.
    EgressPolicy,
    /// Cluster-wide: selects pods in namespaces matching `spec.namespaceSelector` (all if unset).
    ClusterEgressPolicy,
}

/// Identifies a policy in logs and decisions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    /// Set for `EgressPolicy`, `None` for `ClusterEgressPolicy`.
    pub namespace: Option<String>,
    pub name: String,
}

/// Where a policy document starts, for error messages about the whole document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based.
    pub column: usize,
}

/// A Kubernetes object name or namespace (an RFC 1123 label).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName(String);

/// `enforce` denies what no rule grants; `audit` only reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// A parsed policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(crate) reference: PolicyRef,
    pub(crate) origin: Origin,
    pub(crate) pod_selector: LabelSelector,
    /// Always `None` for `EgressPolicy`.
    pub(crate) namespace_selector: Option<LabelSelector>,
    pub(crate) mode: Mode,
    pub(crate) egress: Vec<EgressRule>,
}

/// One `spec.egress` entry: any listed peer, on any listed port entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    to: Vec<Peer>,
    ports: Vec<PortRule>,
}

/// A destination: by DNS name pattern, or by address block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    DnsName(DnsNamePattern),
    Cidr(Cidr),
}

/// An address block with no host bits set; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr(IpNet);

/// An inclusive port range, `port..=endPort`, never empty and never containing 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

/// One `ports` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    range: PortRange,
    protocol: Protocol,
}

/// The application protocol a port entry allows, with its protocol-specific limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Tls,
    Http,
    Postgresql(PostgresRule),
    /// Datagrams to the port, whatever they carry: UDP has no first message to check.
    Udp,
}

/// The transport a port entry covers. A `udp` entry never allows a TCP connection and no other
/// entry allows a datagram, so each transport asks for its own grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Limits on a PostgreSQL startup message. Empty lists mean "any".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PostgresRule {
    pub databases: Vec<String>,
    pub users: Vec<String>,
    /// Whether to let an `SSLRequest`/GSSAPI upgrade through, after which the gateway can no
    /// longer see the startup message. Off by default.
    pub allow_encrypted: bool,
}

// === impl PolicyKind ===

impl FromStr for PolicyKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "EgressPolicy" => Ok(PolicyKind::EgressPolicy),
            "ClusterEgressPolicy" => Ok(PolicyKind::ClusterEgressPolicy),
            _ => Err(ModelError::UnknownKind),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::EgressPolicy => "EgressPolicy",
            PolicyKind::ClusterEgressPolicy => "ClusterEgressPolicy",
        })
    }
}

// === impl PolicyRef ===

impl PolicyRef {
    /// The displayed name in pieces, to be written one after the other: `shop`, `/`,
    /// `orders-db` for an `EgressPolicy`, `orders-db` alone for a `ClusterEgressPolicy`. A
    /// writer that copies strings (a log line per connection) needs no formatting for it.
    pub fn display_parts(&self) -> [&str; 3] {
        match &self.namespace {
            Some(ns) => [ns, "/", &self.name],
            None => ["", "", &self.name],
        }
    }
}

impl fmt::Display for PolicyRef {
    /// `shop/orders-db` for an `EgressPolicy`, `orders-db` for a `ClusterEgressPolicy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.display_parts()
            .into_iter()
            .try_for_each(|part| f.write_str(part))
    }
}

// === impl Origin ===

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

// === impl ObjectName ===

impl ObjectName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl FromStr for ObjectName {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let bytes = s.as_bytes();
        let valid = matches!((bytes.first(), bytes.last()), (Some(f), Some(l)) if ok(f) && ok(l))
            && bytes.len() <= MAX_OBJECT_NAME_LEN
            && bytes.iter().all(|b| ok(b) || *b == b'-');
        if !valid {
            return Err(ModelError::ObjectName);
        }
        Ok(ObjectName(s.to_owned()))
    }
}

// === impl Mode ===

impl FromStr for Mode {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            _ => Err(ModelError::UnknownMode),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

// === impl Policy ===

impl Policy {
    pub fn reference(&self) -> &PolicyRef {
        &self.reference
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn pod_selector(&self) -> &LabelSelector {
        &self.pod_selector
    }

    /// Only a `ClusterEgressPolicy` can have one; `None` there means every namespace.
    pub fn namespace_selector(&self) -> Option<&LabelSelector> {
        self.namespace_selector.as_ref()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn egress(&self) -> &[EgressRule] {
        &self.egress
    }
}

// === impl EgressRule ===

impl EgressRule {
    pub fn new(to: Vec<Peer>, ports: Vec<PortRule>) -> Result<Self, ModelError> {
        if to.is_empty() {
            return Err(ModelError::EmptyTo);
        }
        if ports.is_empty() {
            return Err(ModelError::EmptyPorts);
        }
        Ok(EgressRule { to, ports })
    }

    pub fn to(&self) -> &[Peer] {
        &self.to
    }

    pub fn ports(&self) -> &[PortRule] {
        &self.ports
    }
}

// === impl Cidr ===

impl Cidr {
    pub fn net(&self) -> IpNet {
        self.0
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr)
    }
}

impl FromStr for Cidr {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        let net = match s.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => s.parse().map_err(|_| ModelError::CidrSyntax)?,
        };
        // A rule like 10.0.0.1/8 is most likely a typo; refuse to guess which part was meant.
        if net.trunc() != net {
            return Err(ModelError::CidrHostBits {
                network: net.trunc(),
            });
        }
        // Destinations are matched in canonical form (::ffff:a.b.c.d as a.b.c.d), so a range
        // inside ::ffff:0:0/96 could never match anything.
        if let IpNet::V6(v6) = net {
            if let (Some(ipv4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
                return Err(ModelError::CidrIpv4Mapped {
                    ipv4: format!("{ipv4}/{}", v6.prefix_len() - 96),
                });
            }
        }
        Ok(Cidr(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

// === impl PortRange ===

impl PortRange {
    /// `port..=end_port`, or just `port`.
    pub fn new(port: u16, end_port: Option<u16>) -> Result<Self, ModelError> {
        if port == 0 {
            return Err(ModelError::PortZero);
        }
        let last = end_port.unwrap_or(port);
        if last < port {
            return Err(ModelError::EndPortBelowPort {
                port,
                end_port: last,
            });
        }
        Ok(PortRange { first: port, last })
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

// === impl PortRule ===

impl PortRule {
    pub fn new(range: PortRange, protocol: Protocol) -> Self {
        PortRule { range, protocol }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    pub fn protocol(&self) -> &Protocol {
        &self.protocol
    }
}

// === impl Protocol ===

impl Protocol {
    pub fn transport(&self) -> Transport {
        match self {
            Protocol::Tcp | Protocol::Tls | Protocol::Http | Protocol::Postgresql(_) => {
                Transport::Tcp
            }
            Protocol::Udp => Transport::Udp,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Postgresql(_) => "postgresql",
            Protocol::Udp => "udp",
        })
    }
}

// === impl PostgresRule ===

impl PostgresRule {
    pub fn new(
        databases: Vec<String>,
        users: Vec<String>,
        allow_encrypted: bool,
    ) -> Result<Self, ModelError> {
        // PostgreSQL reads an empty database as "same as the user": never what a rule means.
        if databases.iter().any(String::is_empty) {
            return Err(ModelError::EmptyPostgresName { field: "databases" });
        }
        if users.iter().any(String::is_empty) {
            return Err(ModelError::EmptyPostgresName { field: "users" });
        }
        Ok(PostgresRule {
            databases,
            users,
            allow_encrypted,
        })
    }

    /// Whether a startup message for `database` as `user` is allowed. Names compare exactly:
    /// the server treats them case-sensitively in the startup packet.
    pub fn allows(&self, database: &str, user: &str) -> bool {
        (self.databases.is_empty() || self.databases.iter().any(|d| d == database))
            && (self.users.is_empty() || self.users.iter().any(|u| u == user))
    }

    /// Whether the rule limits databases or users, so the startup message must be read.
    pub fn restricts_startup(&self) -> bool {
        !self.databases.is_empty() || !self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_ranges_are_refused_with_the_ipv4_spelling() {
        let err = "::ffff:192.0.2.0/120".parse::<Cidr>().expect_err("mapped");
        assert_eq!(
            err,
            ModelError::CidrIpv4Mapped {
                ipv4: "192.0.2.0/24".to_owned()
            }
        );
        assert!("::ffff:192.0.2.7".parse::<Cidr>().is_err());
        assert!(
            "::/0".parse::<Cidr>().is_ok(),
            "all of IPv6 is a plain IPv6 range"
        );
    }

    #[test]
    fn cidr_accepts_v4_v6_and_bare_addresses() {
        let v4: Cidr = "192.0.2.0/24".parse().expect("v4");
        assert!(v4.contains("192.0.2.77".parse().expect("ip")));
        assert!(!v4.contains("192.0.3.1".parse().expect("ip")));
        let v6: Cidr = "2001:db8::/32".parse().expect("v6");
        assert!(v6.contains("2001:db8::1".parse().expect("ip")));
        assert!(!v6.contains("192.0.2.1".parse().expect("ip")));
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().expect("bare").to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            "2001:db8::1".parse::<Cidr>().expect("bare").to_string(),
            "2001:db8::1/128"
        );
    }

    #[test]
    fn cidr_with_host_bits_is_rejected_with_a_suggestion() {
        let err = "10.0.0.1/8".parse::<Cidr>().expect_err("host bits");
        assert_eq!(
            err.to_string(),
            "host bits are set; did you mean 10.0.0.0/8?"
        );
        assert_eq!("10.0.0.0/33".parse::<Cidr>(), Err(ModelError::CidrSyntax));
        assert_eq!("db.example".parse::<Cidr>(), Err(ModelError::CidrSyntax));
    }

    #[test]
    fn port_range_is_inclusive_and_ordered() {
        let r = PortRange::new(443, Some(8443)).expect("range");
        assert!(r.contains(443) && r.contains(8443) && r.contains(1000));
        assert!(!r.contains(442) && !r.contains(8444));
        assert_eq!(r.to_string(), "443-8443");
        let single = PortRange::new(80, None).expect("single");
        assert!(single.contains(80) && !single.contains(81));
        assert_eq!(
            PortRange::new(443, Some(80)),
            Err(ModelError::EndPortBelowPort {
                port: 443,
                end_port: 80
            })
        );
        assert_eq!(PortRange::new(0, None), Err(ModelError::PortZero));
    }

    #[test]
    fn postgres_rule_empty_lists_allow_anything() {
        let any = PostgresRule::default();
        assert!(any.allows("x", "y"));
        assert!(!any.restricts_startup());
        let rule =
            PostgresRule::new(vec!["orders".into()], vec!["app".into()], false).expect("valid");
        assert!(rule.allows("orders", "app"));
        assert!(!rule.allows("Orders", "app"));
        assert!(!rule.allows("orders", "admin"));
        assert!(rule.restricts_startup());
        let users_only = PostgresRule::new(vec![], vec!["app".into()], true).expect("valid");
        assert!(users_only.allows("anything", "app"));
        assert!(PostgresRule::new(vec![String::new()], vec![], false).is_err());
    }

    #[test]
    fn object_names_are_dns_labels() {
        assert!("orders-db".parse::<ObjectName>().is_ok());
        assert!("a".parse::<ObjectName>().is_ok());
        for bad in ["", "Orders", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert_eq!(
                bad.parse::<ObjectName>(),
                Err(ModelError::ObjectName),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn displays_are_stable() {
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(
            Protocol::Postgresql(PostgresRule::default()).to_string(),
            "postgresql"
        );
        assert_eq!(Protocol::Udp.to_string(), "udp");
        assert_eq!(Protocol::Udp.transport(), Transport::Udp);
        assert_eq!(Protocol::Http.transport(), Transport::Tcp);
        assert_eq!(Mode::Audit.to_string(), "audit");
        assert_eq!(Mode::default(), Mode::Enforce);
        let ns = PolicyRef {
            kind: PolicyKind::EgressPolicy,
            namespace: Some("shop".into()),
            name: "orders-db".into(),
        };
        assert_eq!(ns.to_string(), "shop/orders-db");
        let cluster = PolicyRef {
            kind: PolicyKind::ClusterEgressPolicy,
            namespace: None,
            name: "dns".into(),
        };
        assert_eq!(cluster.to_string(), "dns");
    }

    #[test]
    fn egress_rule_needs_peers_and_ports() {
        let peer = Peer::Cidr("10.0.0.0/8".parse().expect("cidr"));
        let port = PortRule::new(PortRange::new(22, None).expect("port"), Protocol::Tcp);
        assert_eq!(
            EgressRule::new(vec![], vec![port.clone()]),
            Err(ModelError::EmptyTo)
        );
        assert_eq!(
            EgressRule::new(vec![peer.clone()], vec![]),
            Err(ModelError::EmptyPorts)
        );
        assert!(EgressRule::new(vec![peer], vec![port]).is_ok());
    }
}
