//! What an operator asks `explain`: a pod, a destination and the first message a client would
//! send, as it arrives (JSON on the admin socket, flags on the command line) and as the typed
//! values the trace runs on. Bad input becomes a [`QueryError`] here, never deeper.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use egressgate_policy::DnsName;
use serde::{Deserialize, Serialize};

use crate::peek::http::{Host, RequestHead};
use crate::peek::postgres::Startup;
use crate::peek::tls::ClientHello;
use crate::peek::{Peeked, PgFirst};
use crate::protocol::Protocol;

/// The query as sent over the socket (`POST /v1/explain`): the CLI's flags, one to one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Query {
    /// `NAMESPACE/NAME`.
    pub pod: String,
    /// `HOST:PORT`, `IP:PORT` or `[IPv6]:PORT`.
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AskedProtocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The protocol a client would speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AskedProtocol {
    Tls,
    Http,
    Postgresql,
    /// Bytes of no protocol the gateway reads (only a `tcp` rule allows them).
    Tcp,
}

/// A pod by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// Where the connection would go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: TargetHost,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    Ip(IpAddr),
    /// A DNS name: its addresses are those the pod resolved it to.
    Name(DnsName),
}

/// The first message the trace authorizes, as the peekers would have found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstMessage {
    Tls {
        sni: Option<DnsName>,
    },
    Http {
        host: Host,
    },
    Postgresql {
        database: String,
        user: String,
    },
    /// Opaque bytes.
    Opaque,
}

/// A query that cannot be explained as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("pod {0:?}: expected NAMESPACE/NAME")]
    Pod(String),
    #[error("destination {0:?}: expected HOST:PORT, IP:PORT or [IPv6]:PORT")]
    Target(String),
    #[error("{what} {value:?} is not a DNS name: {why}")]
    Name {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("--{flag} does not go with --protocol {protocol}")]
    Mismatch {
        flag: &'static str,
        protocol: &'static str,
    },
    #[error("--protocol postgresql needs --user (the database defaults to it)")]
    NoUser,
}

/// A query, checked: what the trace runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub pod: PodRef,
    pub to: Target,
    pub first: FirstMessage,
}

// === impl Query ===

impl Query {
    /// Checks every field. The protocol defaults to what the flags imply (`--sni` tls,
    /// `--host` http, `--database`/`--user` postgresql), else to the port's usual one (443 tls,
    /// 80 http, 5432 postgresql), else `tcp`. Without `--sni` or `--host`, the client is taken
    /// to send the destination's name as curl does (an IP destination: no SNI, the IP as Host).
    pub fn check(&self) -> Result<Asked, QueryError> {
        let pod: PodRef = self.pod.parse()?;
        let to: Target = self.to.parse()?;
        let protocol = self
            .protocol
            .unwrap_or_else(|| self.implied_protocol(to.port));
        let name_of_target = match &to.host {
            TargetHost::Name(name) => Some(name.clone()),
            TargetHost::Ip(_) => None,
        };
        let refuse = |flag| {
            Err(QueryError::Mismatch {
                flag,
                protocol: protocol.as_str(),
            })
        };
        let pg_flags = self.database.is_some() || self.user.is_some();
        let first = match protocol {
            AskedProtocol::Tls if self.host.is_some() => return refuse("host"),
            AskedProtocol::Tls if pg_flags => return refuse("database/--user"),
            AskedProtocol::Tls => FirstMessage::Tls {
                sni: match &self.sni {
                    Some(sni) => Some(checked_name("--sni", sni)?),
                    None => name_of_target,
                },
            },
            AskedProtocol::Http if self.sni.is_some() => return refuse("sni"),
            AskedProtocol::Http if pg_flags => return refuse("database/--user"),
            AskedProtocol::Http => FirstMessage::Http {
                host: match (&self.host, &to.host) {
                    (Some(host), _) => Host::Name(checked_name("--host", host)?),
                    (None, TargetHost::Name(name)) => Host::Name(name.clone()),
                    (None, TargetHost::Ip(ip)) => Host::Ip(*ip),
                },
            },
            AskedProtocol::Postgresql if self.sni.is_some() => return refuse("sni"),
            AskedProtocol::Postgresql if self.host.is_some() => return refuse("host"),
            AskedProtocol::Postgresql => {
                let user = self.user.clone().ok_or(QueryError::NoUser)?;
                // As the server does: no database (or an empty one) means the user's.
                let database = self
                    .database
                    .clone()
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| user.clone());
                FirstMessage::Postgresql { database, user }
            }
            AskedProtocol::Tcp if self.sni.is_some() => return refuse("sni"),
            AskedProtocol::Tcp if self.host.is_some() => return refuse("host"),
            AskedProtocol::Tcp if pg_flags => return refuse("database/--user"),
            AskedProtocol::Tcp => FirstMessage::Opaque,
        };
        Ok(Asked { pod, to, first })
    }

    fn implied_protocol(&self, port: u16) -> AskedProtocol {
        if self.sni.is_some() {
            AskedProtocol::Tls
        } else if self.host.is_some() {
            AskedProtocol::Http
        } else if self.database.is_some() || self.user.is_some() {
            AskedProtocol::Postgresql
        } else {
            match port {
                443 => AskedProtocol::Tls,
                80 => AskedProtocol::Http,
                5432 => AskedProtocol::Postgresql,
                _ => AskedProtocol::Tcp,
            }
        }
    }
}

/// A name from the operator, by the rule the peekers apply.
fn checked_name(what: &'static str, value: &str) -> Result<DnsName, QueryError> {
    DnsName::parse(value).map_err(|e| QueryError::Name {
        what,
        value: value.to_owned(),
        why: e.to_string(),
    })
}

// === impl AskedProtocol ===

impl AskedProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            AskedProtocol::Tls => "tls",
            AskedProtocol::Http => "http",
            AskedProtocol::Postgresql => "postgresql",
            AskedProtocol::Tcp => "tcp",
        }
    }
}

// === impl PodRef ===

impl FromStr for PodRef {
    type Err = QueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(PodRef {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(QueryError::Pod(s.to_owned())),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl Target ===

impl FromStr for Target {
    type Err = QueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || QueryError::Target(s.to_owned());
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Target {
                host: TargetHost::Ip(addr.ip().to_canonical()),
                port: addr.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(bad)?;
        let name = DnsName::parse(host).map_err(|_| bad())?;
        Ok(Target {
            host: TargetHost::Name(name),
            port,
        })
    }
}

impl Target {
    /// The name, when the destination was given by name.
    pub fn host_name(&self) -> Option<&DnsName> {
        match &self.host {
            TargetHost::Name(name) => Some(name),
            TargetHost::Ip(_) => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            TargetHost::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            TargetHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

// === impl FirstMessage ===

impl FirstMessage {
    /// What the peek stage would have found, for `stages::authorize`.
    pub fn peeked(&self) -> Peeked {
        match self {
            FirstMessage::Tls { sni } => Peeked::Tls(ClientHello {
                server_name: sni.clone(),
                alpn: Vec::new(),
                ech_offered: false,
                legacy_version: 0x0303,
                consumed: 0,
            }),
            FirstMessage::Http { host } => Peeked::Http(RequestHead {
                version_minor: 1,
                host: Some(host.clone()),
                host_port: None,
                consumed: 0,
            }),
            FirstMessage::Postgresql { database, user } => {
                Peeked::Postgres(PgFirst::Startup(Startup {
                    protocol_major: 3,
                    protocol_minor: 0,
                    user: user.clone(),
                    database: database.clone(),
                    replication: None,
                    application_name: None,
                    parameters: vec![
                        ("user".to_owned(), user.clone()),
                        ("database".to_owned(), database.clone()),
                    ],
                }))
            }
            FirstMessage::Opaque => Peeked::Unknown,
        }
    }

    /// The protocol the peek stage would have set.
    pub fn protocol(&self) -> Protocol {
        match self {
            FirstMessage::Tls { .. } => Protocol::Tls,
            FirstMessage::Http { .. } => Protocol::Http,
            FirstMessage::Postgresql { .. } => Protocol::Postgresql,
            FirstMessage::Opaque => Protocol::Unknown,
        }
    }

    /// In words, for the trace.
    pub fn describe(&self) -> String {
        match self {
            FirstMessage::Tls { sni: Some(sni) } => format!("TLS ClientHello, SNI {sni}"),
            FirstMessage::Tls { sni: None } => "TLS ClientHello without SNI".to_owned(),
            FirstMessage::Http { host } => format!("HTTP/1.1 request, Host {host}"),
            FirstMessage::Postgresql { database, user } => {
                format!("PostgreSQL startup, database {database}, user {user}")
            }
            FirstMessage::Opaque => "bytes of no protocol the gateway reads".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns_name(name: &str) -> DnsName {
        name.parse().expect(name)
    }

    fn query(pod: &str, to: &str) -> Query {
        Query {
            pod: pod.to_owned(),
            to: to.to_owned(),
            ..Query::default()
        }
    }

    #[test]
    fn destinations_are_addresses_or_names_with_a_port() {
        let v4: Target = "198.19.0.10:443".parse().expect("v4");
        assert_eq!(v4.host, TargetHost::Ip("198.19.0.10".parse().expect("ip")));
        let v6: Target = "[fd00:99::10]:80".parse().expect("v6");
        assert_eq!(v6.port, 80);
        let name: Target = "API.Example.test.:443".parse().expect("name");
        assert_eq!(name.host, TargetHost::Name(dns_name("api.example.test")));
        for bad in [
            "api.example.test",
            "api.example.test:0",
            "a b:1",
            ":443",
            "x:99999",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
        assert!("shop".parse::<PodRef>().is_err());
        assert!("shop/a/b".parse::<PodRef>().is_err());
        assert_eq!(
            "shop/app-1".parse::<PodRef>().expect("pod").to_string(),
            "shop/app-1"
        );
    }

    #[test]
    fn the_protocol_and_first_message_follow_flags_then_port() {
        let tls = query("shop/a", "api.example.test:443").check().expect("ok");
        assert_eq!(
            tls.first,
            FirstMessage::Tls {
                sni: Some(dns_name("api.example.test"))
            }
        );
        let by_ip = query("shop/a", "198.19.0.10:443").check().expect("ok");
        assert_eq!(by_ip.first, FirstMessage::Tls { sni: None });
        let http = query("shop/a", "198.19.0.10:80").check().expect("ok");
        assert_eq!(
            http.first,
            FirstMessage::Http {
                host: Host::Ip("198.19.0.10".parse().expect("ip"))
            }
        );
        let mut pg = query("shop/a", "db.example.test:5432");
        pg.user = Some("app".into());
        assert_eq!(
            pg.check().expect("ok").first,
            FirstMessage::Postgresql {
                database: "app".into(),
                user: "app".into()
            }
        );
        let mut sni = query("shop/a", "198.19.0.10:8443");
        sni.sni = Some("Evil.Example.test".into());
        assert_eq!(
            sni.check().expect("ok").first,
            FirstMessage::Tls {
                sni: Some(dns_name("evil.example.test"))
            }
        );
        assert_eq!(
            query("shop/a", "198.19.0.10:22").check().expect("ok").first,
            FirstMessage::Opaque
        );
    }

    #[test]
    fn contradictory_or_bad_fields_are_refused() {
        let mut both = query("shop/a", "198.19.0.10:443");
        both.protocol = Some(AskedProtocol::Tls);
        both.host = Some("x.test".into());
        assert_eq!(
            both.check(),
            Err(QueryError::Mismatch {
                flag: "host",
                protocol: "tls"
            })
        );
        let mut no_user = query("shop/a", "198.19.0.10:5432");
        no_user.protocol = Some(AskedProtocol::Postgresql);
        assert_eq!(no_user.check(), Err(QueryError::NoUser));
        let mut ip_sni = query("shop/a", "198.19.0.10:443");
        ip_sni.sni = Some("198.19.0.10".into());
        assert!(matches!(ip_sni.check(), Err(QueryError::Name { .. })));
        let json = r#"{"pod":"shop/a","to":"x.test:1","colour":"red"}"#;
        assert!(
            serde_json::from_str::<Query>(json).is_err(),
            "unknown field"
        );
    }
}
