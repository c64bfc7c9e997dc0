//! Verdicts, reason codes and the pure rules that turn grants plus peeked facts into a verdict.
//!
//! No I/O here: `connection` reads the sockets and calls these functions, so every rule of the
//! README's "Semantics" section is unit-tested without a network.

mod reason;

use egressgate_policy::{DnsName, Grant, GrantPeer, Mode, Protocol, Selection};
use serde::{Deserialize, Serialize};

use crate::peek::http::Host;
use crate::peek::{Peeked, PgEncryption, PgFirst};

pub use reason::{Limit, PodFault, PolicyDenial, Reason, UpstreamFault};

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    /// Denied by the rules, let through because only audit-mode policies select the pod.
    Audit,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "audit",
        }
    }
}

/// A rule's answer for one connection: the grant that allows it, or why none does.
pub type Authorization<'g, 'a> = Result<&'g Grant<'a>, PolicyDenial>;

/// The grants that count: those of enforce-mode policies when any selects the pod (audit-mode
/// policies are then ignored for it), else those of the audit-mode policies.
pub fn effective_grants<'a>(selection: &Selection<'a>, grants: Vec<Grant<'a>>) -> Vec<Grant<'a>> {
    if selection.has_enforce() {
        grants
            .into_iter()
            .filter(|g| g.mode == Mode::Enforce)
            .collect()
    } else {
        grants
    }
}

/// A denial turns into `audit` when no enforce-mode policy selects the pod and audit mode
/// watches that kind of reason ([`Reason::auditable`]).
pub fn denial_verdict(selection: &Selection<'_>, reason: Reason) -> Verdict {
    if reason.auditable() && !selection.has_enforce() {
        Verdict::Audit
    } else {
        Verdict::Deny
    }
}

/// Why no grant matched before any byte was read: no names at all, or names no rule allows.
pub fn no_grant_reason(resolved_any_name: bool) -> PolicyDenial {
    if resolved_any_name {
        PolicyDenial::NotAllowed
    } else {
        PolicyDenial::NoDnsRecord
    }
}

/// The first `tcp` grant: those allow without peeking.
pub fn tcp_grant<'g, 'a>(grants: &'g [Grant<'a>]) -> Option<&'g Grant<'a>> {
    grants.iter().find(|g| matches!(g.protocol, Protocol::Tcp))
}

pub fn has_postgres_grant(grants: &[Grant<'_>]) -> bool {
    grants
        .iter()
        .any(|g| matches!(g.protocol, Protocol::Postgresql(_)))
}

/// The rule for what the connection's first messages came to: the one match a new protocol
/// joins.
pub fn authorize<'g, 'a>(
    peeked: &Peeked,
    grants: &'g [Grant<'a>],
    require_sni: bool,
) -> Authorization<'g, 'a> {
    match peeked {
        Peeked::Tls(hello) => authorize_tls(grants, hello.server_name.as_ref(), require_sni),
        Peeked::Http(head) => authorize_http(grants, head.host.as_ref()),
        Peeked::Postgres(PgFirst::Startup(startup)) => authorize_startup(
            grants,
            &startup.database,
            &startup.user,
            startup.replication.as_deref(),
        ),
        Peeked::Postgres(PgFirst::Cancel) => authorize_cancel(grants),
        Peeked::Postgres(PgFirst::Encrypted(encryption)) => {
            let encrypted = match encryption {
                PgEncryption::Tls(hello) => EncryptedPostgres::Tls {
                    sni: hello.server_name.as_ref(),
                },
                PgEncryption::Gssapi => EncryptedPostgres::Gssapi,
            };
            authorize_encrypted_postgres(grants, encrypted, require_sni)
        }
        Peeked::Postgres(PgFirst::NotNegotiated) | Peeked::Http2 | Peeked::Unknown => {
            Err(PolicyDenial::ProtocolMismatch)
        }
    }
}

/// TLS: a `tls` grant whose names include the SNI (a `cidr` grant needs no name).
pub fn authorize_tls<'g, 'a>(
    grants: &'g [Grant<'a>],
    sni: Option<&DnsName>,
    require_sni: bool,
) -> Authorization<'g, 'a> {
    let tls = grants
        .iter()
        .filter(|g| matches!(g.protocol, Protocol::Tls));
    authorize_name(
        tls,
        Asked::from(sni),
        require_sni,
        PolicyDenial::SniMissing,
        PolicyDenial::SniMismatch,
    )
}

/// HTTP/1: an `http` grant whose names include the request's host (always required: an
/// HTTP/1.1 request without one is malformed, an HTTP/1.0 one is `host_missing`). A host that is
/// an IP literal is named, but only a `cidr` grant admits it.
pub fn authorize_http<'g, 'a>(
    grants: &'g [Grant<'a>],
    host: Option<&Host>,
) -> Authorization<'g, 'a> {
    let http = grants
        .iter()
        .filter(|g| matches!(g.protocol, Protocol::Http));
    let asked = match host {
        None => Asked::Nothing,
        Some(Host::Name(name)) => Asked::Name(name),
        Some(Host::Ip(_)) => Asked::Address,
    };
    authorize_name(
        http,
        asked,
        true,
        PolicyDenial::HostMissing,
        PolicyDenial::HostMismatch,
    )
}

/// A plaintext PostgreSQL StartupMessage: a `postgresql` grant listing the database and user.
///
/// A physical replication startup (`replication=true`, also `on`, `yes`, `1`) names no database:
/// it streams the whole cluster, so only a rule without a database list allows it. Logical
/// replication (`replication=database`) names its database and is checked like any session.
pub fn authorize_startup<'g, 'a>(
    grants: &'g [Grant<'a>],
    database: &str,
    user: &str,
    replication: Option<&str>,
) -> Authorization<'g, 'a> {
    let mut postgres = grants
        .iter()
        .filter(|g| postgres_rule(g).is_some())
        .peekable();
    if postgres.peek().is_none() {
        return Err(PolicyDenial::ProtocolMismatch);
    }
    let physical = replication.is_some_and(is_physical_replication);
    postgres
        .find(|g| {
            postgres_rule(g).is_some_and(|rule| {
                rule.allows(database, user) && (!physical || rule.databases.is_empty())
            })
        })
        .ok_or(PolicyDenial::PostgresqlDenied)
}

/// PostgreSQL reads `replication` as a boolean (physical) or the word `database` (logical).
fn is_physical_replication(value: &str) -> bool {
    ["true", "on", "yes", "1"]
        .iter()
        .any(|word| value.eq_ignore_ascii_case(word))
}

/// A CancelRequest names no database or user: any `postgresql` grant allows it (it only works
/// with the secret key of a session the pod already has).
pub fn authorize_cancel<'g, 'a>(grants: &'g [Grant<'a>]) -> Authorization<'g, 'a> {
    grants
        .iter()
        .find(|g| postgres_rule(g).is_some())
        .ok_or(PolicyDenial::ProtocolMismatch)
}

/// How a PostgreSQL session turned encrypted, with what the gateway could still see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptedPostgres<'a> {
    /// TLS, after `S` or direct (ALPN `postgresql`): the ClientHello's SNI, if it has one.
    Tls { sni: Option<&'a DnsName> },
    /// GSSAPI after `G`: no name to see.
    Gssapi,
}

/// A PostgreSQL session that turned encrypted (TLS after `S`, direct TLS, or GSSAPI after `G`):
/// SNI rules as for `tls` when there is a ClientHello, then the startup is invisible, so a rule
/// that limits databases or users allows it only with `allowEncrypted: true`.
pub fn authorize_encrypted_postgres<'g, 'a>(
    grants: &'g [Grant<'a>],
    encrypted: EncryptedPostgres<'_>,
    require_sni: bool,
) -> Authorization<'g, 'a> {
    let postgres: Vec<&Grant<'a>> = grants
        .iter()
        .filter(|g| postgres_rule(g).is_some())
        .collect();
    if postgres.is_empty() {
        return Err(PolicyDenial::ProtocolMismatch);
    }
    let named: Vec<&Grant<'a>> = match encrypted {
        EncryptedPostgres::Tls { sni } => postgres
            .iter()
            .copied()
            .filter(|g| name_allowed(g, Asked::from(sni), require_sni))
            .collect(),
        EncryptedPostgres::Gssapi => postgres,
    };
    if named.is_empty() {
        let missing = encrypted == EncryptedPostgres::Tls { sni: None };
        return Err(if missing {
            PolicyDenial::SniMissing
        } else {
            PolicyDenial::SniMismatch
        });
    }
    named
        .into_iter()
        .find(|g| {
            postgres_rule(g).is_some_and(|rule| rule.allow_encrypted || !rule.restricts_startup())
        })
        .ok_or(PolicyDenial::PostgresqlEncrypted)
}

fn postgres_rule<'a>(grant: &Grant<'a>) -> Option<&'a egressgate_policy::PostgresRule> {
    match grant.protocol {
        Protocol::Postgresql(rule) => Some(rule),
        _ => None,
    }
}

/// What a first message named, as a grant's peer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked<'a> {
    /// No SNI, no Host.
    Nothing,
    Name(&'a DnsName),
    /// An HTTP Host that is an IP literal: named, but no `dnsName` rule's.
    Address,
}

impl<'a> From<Option<&'a DnsName>> for Asked<'a> {
    fn from(name: Option<&'a DnsName>) -> Self {
        name.map_or(Asked::Nothing, Asked::Name)
    }
}

/// The first candidate whose peer admits what was asked; `ProtocolMismatch` when there is no
/// candidate.
fn authorize_name<'g, 'a>(
    candidates: impl Iterator<Item = &'g Grant<'a>>,
    asked: Asked<'_>,
    require_name: bool,
    missing: PolicyDenial,
    mismatch: PolicyDenial,
) -> Authorization<'g, 'a> {
    let mut candidates = candidates.peekable();
    if candidates.peek().is_none() {
        return Err(PolicyDenial::ProtocolMismatch);
    }
    candidates
        .find(|g| name_allowed(g, asked, require_name))
        .ok_or(if asked == Asked::Nothing {
            missing
        } else {
            mismatch
        })
}

/// `cidr` peers admit anything; `dnsName` peers admit the names this pod resolved to the
/// destination that match the rule (`GrantPeer::Names`), and no name only if not required.
fn name_allowed(grant: &Grant<'_>, asked: Asked<'_>, require_name: bool) -> bool {
    match (&grant.peer, asked) {
        (GrantPeer::Cidr(_), _) => true,
        (GrantPeer::Names(names), Asked::Name(name)) => names.contains(name),
        (GrantPeer::Names(_), Asked::Address) => false,
        (GrantPeer::Names(_), Asked::Nothing) => !require_name,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use egressgate_policy::{parse_policies, PodIdentity, PolicySet};

    use super::*;

    const POLICIES: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}, {dnsName: "*.cdn.example.test"}]
      ports: [{port: 443, protocol: tls}, {port: 80, protocol: http}]
    - to: [{cidr: 192.0.2.0/24}]
      ports: [{port: 443, protocol: tls}, {port: 22, protocol: tcp}]
    - to: [{dnsName: db.example.test}]
      ports: [{port: 5432, protocol: postgresql, postgresql: {databases: [orders], users: [app]}}]
    - to: [{dnsName: open-db.example.test}]
      ports: [{port: 5432, protocol: postgresql}]
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: watch, namespace: shop}
spec:
  podSelector: {matchLabels: {role: batch}}
  mode: audit
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: watch-app, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  mode: audit
  egress:
    - to: [{dnsName: evil.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

    fn set() -> PolicySet {
        PolicySet::new(parse_policies("p.yaml", POLICIES).expect("parses")).expect("compiles")
    }

    fn labels(role: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("role".to_owned(), role.to_owned())])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn name(s: &str) -> DnsName {
        s.parse().expect(s)
    }

    /// Effective grants for a pod with `role` to `dst:port` having resolved `names`.
    fn with_grants<R>(
        role: &str,
        dst: &str,
        port: u16,
        names: &[&str],
        f: impl FnOnce(&Selection<'_>, &[Grant<'_>]) -> R,
    ) -> R {
        let set = set();
        let pod_labels = labels(role);
        let no_labels = BTreeMap::new();
        let pod = PodIdentity {
            namespace: "shop",
            name: "p",
            labels: &pod_labels,
            namespace_labels: &no_labels,
        };
        let selection = set.select(&pod);
        let names: Vec<DnsName> = names.iter().map(|n| name(n)).collect();
        let grants = effective_grants(&selection, selection.grants(ip(dst), port, &names));
        f(&selection, &grants)
    }

    fn policy_of(auth: Authorization<'_, '_>) -> Result<String, PolicyDenial> {
        auth.map(|g| format!("{}#{}", g.policy, g.rule))
    }

    #[test]
    fn sni_must_be_a_name_this_pod_resolved_to_this_address() {
        with_grants(
            "app",
            "198.19.0.10",
            443,
            &["api.example.test"],
            |_, grants| {
                assert_eq!(
                    policy_of(authorize_tls(grants, Some(&name("api.example.test")), true)),
                    Ok("shop/web#0".into())
                );
                assert_eq!(
                    policy_of(authorize_tls(
                        grants,
                        Some(&name("API.example.test.")),
                        true
                    )),
                    Ok("shop/web#0".into())
                );
                // Same shared IP, another name: the pod never resolved it here.
                assert_eq!(
                    authorize_tls(grants, Some(&name("evil.example.test")), true).err(),
                    Some(PolicyDenial::SniMismatch)
                );
                assert_eq!(
                    authorize_tls(grants, None, true).err(),
                    Some(PolicyDenial::SniMissing)
                );
                assert!(authorize_tls(grants, None, false).is_ok());
                assert_eq!(
                    authorize_http(grants, Some(&Host::Name(name("api.example.test")))).err(),
                    Some(PolicyDenial::ProtocolMismatch)
                );
                assert_eq!(
                    authorize_startup(grants, "orders", "app", None).err(),
                    Some(PolicyDenial::ProtocolMismatch)
                );
            },
        );
        with_grants(
            "app",
            "198.19.0.10",
            80,
            &["api.example.test"],
            |_, grants| {
                assert_eq!(
                    authorize_http(grants, Some(&Host::Name(name("api.example.test"))))
                        .map(|g| g.rule),
                    Ok(0)
                );
                assert_eq!(
                    authorize_http(grants, Some(&Host::Name(name("evil.example.test")))).err(),
                    Some(PolicyDenial::HostMismatch)
                );
                assert_eq!(
                    authorize_http(grants, None).err(),
                    Some(PolicyDenial::HostMissing)
                );
                // An IP literal host names no `dnsName` rule's name.
                assert_eq!(
                    authorize_http(grants, Some(&Host::Ip(ip("198.19.0.10")))).err(),
                    Some(PolicyDenial::HostMismatch)
                );
                assert_eq!(
                    authorize_tls(grants, Some(&name("api.example.test")), true).err(),
                    Some(PolicyDenial::ProtocolMismatch)
                );
            },
        );
    }

    #[test]
    fn audit_policies_do_not_widen_an_enforced_pod() {
        // role=app is selected by enforce `web` and audit `watch-app` (which names evil).
        with_grants(
            "app",
            "198.19.0.10",
            443,
            &["evil.example.test"],
            |selection, grants| {
                assert!(grants.is_empty(), "{grants:?}");
                assert_eq!(
                    denial_verdict(selection, PolicyDenial::NotAllowed.into()),
                    Verdict::Deny
                );
            },
        );
    }

    #[test]
    fn audit_only_pods_get_audit_instead_of_deny() {
        with_grants(
            "batch",
            "198.19.0.10",
            443,
            &["evil.example.test"],
            |selection, grants| {
                assert!(grants.is_empty());
                assert_eq!(
                    denial_verdict(selection, PolicyDenial::NotAllowed.into()),
                    Verdict::Audit
                );
                // The limits protect the gateway, and a closed client has nothing to relay.
                for reason in [Limit::PeekLimit.into(), Reason::ClientClosed] {
                    assert_eq!(denial_verdict(selection, reason), Verdict::Deny);
                }
            },
        );
        with_grants(
            "batch",
            "198.19.0.10",
            443,
            &["api.example.test"],
            |_, grants| {
                let auth = authorize_tls(grants, Some(&name("api.example.test")), true);
                assert_eq!(policy_of(auth), Ok("shop/watch#0".into()));
            },
        );
    }

    #[test]
    fn cidr_rules_need_no_name_and_tcp_needs_no_peek() {
        with_grants("app", "192.0.2.7", 443, &[], |_, grants| {
            assert!(authorize_tls(grants, None, true).is_ok());
            assert!(authorize_tls(grants, Some(&name("anything.example")), true).is_ok());
            assert!(tcp_grant(grants).is_none());
            assert_eq!(
                authorize_http(grants, Some(&Host::Name(name("x.example")))).err(),
                Some(PolicyDenial::ProtocolMismatch)
            );
        });

        with_grants("app", "192.0.2.7", 22, &[], |_, grants| {
            assert_eq!(tcp_grant(grants).map(|g| g.rule), Some(1));
        });
        with_grants("app", "198.19.0.99", 22, &[], |_, grants| {
            assert!(grants.is_empty())
        });
        assert_eq!(no_grant_reason(false), PolicyDenial::NoDnsRecord);
        assert_eq!(no_grant_reason(true), PolicyDenial::NotAllowed);
    }

    /// Real captures, peeked as the connection path would.
    fn peeked_captures() -> (Peeked, Peeked, PgFirst) {
        use crate::peek::{http, postgres, tls, Peek};
        let Peek::Complete(hello) = tls::peek_client_hello(include_bytes!(
            "../peek/testdata/tls/curl-7.88.1-default-sni-api.example.test-alpn-h2-http1.1.bin"
        )) else {
            panic!("a whole ClientHello");
        };
        let Peek::Complete(head) = http::peek_request_head(include_bytes!(
            "../peek/testdata/http/wget-1.21.3-origin-form.bin"
        )) else {
            panic!("a whole request head");
        };
        let Peek::Complete(first) = postgres::peek_first_message(include_bytes!(
            "../peek/testdata/postgres/psql-15-sslmode-disable-startup-v3.0.bin"
        )) else {
            panic!("a whole startup");
        };
        let postgres::PgMessage::Startup(startup) = first.message else {
            panic!("a startup");
        };
        (
            Peeked::Tls(hello),
            Peeked::Http(head),
            PgFirst::Startup(startup),
        )
    }

    #[test]
    fn authorize_follows_what_was_peeked() {
        let (tls, http, startup) = peeked_captures();
        let rule = |auth: Authorization<'_, '_>| auth.map(|g| g.rule);
        let names = ["api.example.test"];
        with_grants("app", "198.19.0.10", 443, &names, |_, grants| {
            assert_eq!(rule(authorize(&tls, grants, true)), Ok(0));
            for other in [&http, &Peeked::Http2, &Peeked::Unknown] {
                assert_eq!(
                    rule(authorize(other, grants, true)),
                    Err(PolicyDenial::ProtocolMismatch)
                );
            }
        });
        with_grants("app", "198.19.0.10", 80, &names, |_, grants| {
            assert_eq!(rule(authorize(&http, grants, true)), Ok(0));
        });
        let names = ["db.example.test"];
        with_grants("app", "198.19.0.20", 5432, &names, |_, grants| {
            let postgres =
                |first| authorize(&Peeked::Postgres(first), grants, true).map(|g| g.rule);
            assert_eq!(postgres(startup), Ok(2));
            assert_eq!(postgres(PgFirst::Cancel), Ok(2));
            assert_eq!(
                postgres(PgFirst::Encrypted(PgEncryption::Gssapi)),
                Err(PolicyDenial::PostgresqlEncrypted)
            );
            assert_eq!(
                postgres(PgFirst::NotNegotiated),
                Err(PolicyDenial::ProtocolMismatch)
            );
        });
    }

    #[test]
    fn postgres_startup_and_encryption_rules() {
        with_grants(
            "app",
            "198.19.0.20",
            5432,
            &["db.example.test"],
            |_, grants| {
                assert!(has_postgres_grant(grants));
                assert_eq!(
                    authorize_startup(grants, "orders", "app", None).map(|g| g.rule),
                    Ok(2)
                );
                assert_eq!(
                    authorize_startup(grants, "other", "app", None).err(),
                    Some(PolicyDenial::PostgresqlDenied)
                );
                assert_eq!(
                    authorize_startup(grants, "orders", "intruder", None).err(),
                    Some(PolicyDenial::PostgresqlDenied)
                );
                assert!(authorize_cancel(grants).is_ok());
                // Physical replication streams every database: not under `databases: [orders]`.
                for value in ["true", "ON", "yes", "1"] {
                    assert_eq!(
                        authorize_startup(grants, "orders", "app", Some(value)).err(),
                        Some(PolicyDenial::PostgresqlDenied),
                        "{value}"
                    );
                }
                assert!(authorize_startup(grants, "orders", "app", Some("database")).is_ok());
                assert!(authorize_startup(grants, "orders", "app", Some("false")).is_ok());
                let tls = |sni| EncryptedPostgres::Tls { sni };
                let (db, evil) = (name("db.example.test"), name("evil.example.test"));
                assert_eq!(
                    authorize_encrypted_postgres(grants, tls(Some(&db)), true).err(),
                    Some(PolicyDenial::PostgresqlEncrypted)
                );
                assert_eq!(
                    authorize_encrypted_postgres(grants, tls(Some(&evil)), true).err(),
                    Some(PolicyDenial::SniMismatch)
                );
                assert_eq!(
                    authorize_encrypted_postgres(grants, tls(None), true).err(),
                    Some(PolicyDenial::SniMissing)
                );
                assert_eq!(
                    authorize_encrypted_postgres(grants, EncryptedPostgres::Gssapi, true).err(),
                    Some(PolicyDenial::PostgresqlEncrypted)
                );
                assert_eq!(
                    authorize_tls(grants, Some(&name("db.example.test")), true).err(),
                    Some(PolicyDenial::ProtocolMismatch)
                );
            },
        );
        with_grants(
            "app",
            "198.19.0.21",
            5432,
            &["open-db.example.test"],
            |_, grants| {
                let sni = name("open-db.example.test");
                let tls = EncryptedPostgres::Tls { sni: Some(&sni) };
                assert!(authorize_encrypted_postgres(grants, tls, true).is_ok());
                let gssapi = EncryptedPostgres::Gssapi;
                assert!(authorize_encrypted_postgres(grants, gssapi, true).is_ok());
            },
        );
    }
}
