//! Why a connection got its verdict, grouped by whose doing it is: the policy, the pod's first
//! bytes, the upstream, the gateway's own limits, or a client that left.
//!
//! The codes are a stable interface (logs, metrics, dashboards, alerts): never rename one. Each
//! enum and its codes are written once, in one macro call, so the list of codes cannot drift from
//! the variants.

use serde::{Serialize, Serializer};

/// Declares a fieldless enum whose variants each have a stable wire code, with `ALL` (every
/// variant, in declaration order) and `as_str` (the code) generated from the same list.
macro_rules! wire_codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $code:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable wire code.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $code, )+
                }
            }
        }
    };
}

/// Declares [`Reason`]: variants with a code of their own (`Name = "code"`) and groups that
/// wrap a [`wire_codes!`] enum (`Name(Group)`). The variants, `as_str` and `all` come from the
/// one list; a muncher keeps the list's order in all three.
macro_rules! reasons {
    (@build [$($variants:tt)*] [$($arms:tt)*] [$($all:tt)*]) => {
        /// Why. Grouped by whose doing it is; the codes are flat on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason { $($variants)* }

        impl Reason {
            /// The stable wire code.
            pub fn as_str(self) -> &'static str {
                match self { $($arms)* }
            }

            /// Every reason, in the order the README lists the codes.
            pub fn all() -> impl Iterator<Item = Reason> {
                std::iter::empty() $($all)*
            }
        }
    };
    (
        @build [$($variants:tt)*] [$($arms:tt)*] [$($all:tt)*]
        $(#[$meta:meta])* $variant:ident = $code:literal, $($rest:tt)*
    ) => {
        reasons! {
            @build
            [$($variants)* $(#[$meta])* $variant,]
            [$($arms)* Reason::$variant => $code,]
            [$($all)* .chain([Reason::$variant])]
            $($rest)*
        }
    };
    (
        @build [$($variants:tt)*] [$($arms:tt)*] [$($all:tt)*]
        $(#[$meta:meta])* $variant:ident($group:ident), $($rest:tt)*
    ) => {
        reasons! {
            @build
            [$($variants)* $(#[$meta])* $variant($group),]
            [$($arms)* Reason::$variant(inner) => inner.as_str(),]
            [$($all)* .chain($group::ALL.iter().copied().map(Reason::$variant))]
            $($rest)*
        }
    };
    ($($list:tt)*) => {
        reasons! { @build [] [] [] $($list)* }
    };
}

reasons! {
    /// A rule allows it.
    Allowed = "allowed",
    /// No policy selects the pod; `unselectedPods` decides.
    Unselected = "unselected",
    /// The source address is no known pod's; `unknownSources` decides (deny by default).
    UnknownSource = "unknown_source",
    /// The policies allow no such connection.
    Policy(PolicyDenial),
    /// The pod's first bytes came too slowly, grew too large, or are not valid.
    Pod(PodFault),
    /// The client closed (or reset) before a decision could be made.
    ClientClosed = "client_closed",
    /// The destination failed while the gateway still had to decide.
    Upstream(UpstreamFault),
    /// A bound that protects the gateway itself.
    Limit(Limit),
}

wire_codes! {
    /// The policies in force allow no such connection.
    pub enum PolicyDenial {
        /// The pod resolved no (live) name to this address, and no `cidr` rule covers it.
        NoDnsRecord = "no_dns_record",
        /// Names were resolved, but no rule allows them (or the port) for this pod.
        NotAllowed = "not_allowed",
        /// TLS without SNI to a name-based rule while `peek.requireSni` is on.
        SniMissing = "sni_missing",
        /// The SNI is not one of the allowed names this pod resolved to this address.
        SniMismatch = "sni_mismatch",
        /// An HTTP request without a host (HTTP/1.0 without Host).
        HostMissing = "host_missing",
        /// The HTTP host is not one of the allowed names this pod resolved to this address.
        HostMismatch = "host_mismatch",
        /// The first bytes are not the protocol the rule allows (HTTP/2 preface included).
        ProtocolMismatch = "protocol_mismatch",
        /// A PostgreSQL startup for a database or user the rule does not list.
        PostgresqlDenied = "postgresql_denied",
        /// A PostgreSQL session that turned encrypted, to a rule that limits databases or users
        /// without `allowEncrypted: true`.
        PostgresqlEncrypted = "postgresql_encrypted",
    }
}

wire_codes! {
    /// The pod's first message: too slow, too large, not valid, or framed ambiguously.
    pub enum PodFault {
        /// The client did not send its first message within `peek.timeoutMs`.
        PeekTimeout = "peek_timeout",
        /// The first message grew past `peek.maxBytes`.
        PeekTooLarge = "peek_too_large",
        /// The first message is not valid for its protocol (the `detail` field says how).
        Malformed = "malformed",
        /// An HTTP/1 request framed so that two parsers could read different requests from it
        /// (request smuggling: Content-Length with Transfer-Encoding, obs-fold, a bare CR or
        /// LF, …; the `detail` field says which).
        HttpSmuggling = "http_smuggling",
    }
}

wire_codes! {
    /// The destination failed before the gateway could decide.
    pub enum UpstreamFault {
        /// The destination did not answer a message whose answer the gateway must see before
        /// it can go on: a PostgreSQL encryption request (the rest of the startup depends on
        /// it), or an allowed ClientHello (is it a HelloRetryRequest?).
        UpstreamUnreachable = "upstream_unreachable",
    }
}

wire_codes! {
    /// The gateway's own bounds.
    pub enum Limit {
        /// `connections.max` connections were already open.
        ConnectionLimit = "connection_limit",
        /// `peek.maxPending` connections (or `peek.maxPendingPerPod` from this pod) were already
        /// waiting for their first message.
        PeekLimit = "peek_limit",
    }
}

// === impl Reason ===

impl Reason {
    /// Whether audit mode lets a connection denied for this reason through. It watches what the
    /// policies would deny (the rules, the pod's bytes, an upstream that failed on the way); a
    /// limit protects the gateway itself and a closed client has nothing left to relay.
    pub fn auditable(self) -> bool {
        match self {
            Reason::Policy(_) | Reason::Pod(_) | Reason::Upstream(_) => true,
            Reason::Limit(_) | Reason::ClientClosed => false,
            // Not denials of a rule: the settings decide these.
            Reason::Allowed | Reason::Unselected | Reason::UnknownSource => false,
        }
    }
}

impl From<PolicyDenial> for Reason {
    fn from(denial: PolicyDenial) -> Self {
        Reason::Policy(denial)
    }
}

impl From<PodFault> for Reason {
    fn from(fault: PodFault) -> Self {
        Reason::Pod(fault)
    }
}

impl From<UpstreamFault> for Reason {
    fn from(fault: UpstreamFault) -> Self {
        Reason::Upstream(fault)
    }
}

impl From<Limit> for Reason {
    fn from(limit: Limit) -> Self {
        Reason::Limit(limit)
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes on the wire (those from before the reasons were grouped, plus
    /// `http_smuggling`, issue 14): logs, dashboards and alerts depend on every one of them, in
    /// this README order.
    const WIRE_CODES: [&str; 20] = [
        "allowed",
        "unselected",
        "unknown_source",
        "no_dns_record",
        "not_allowed",
        "sni_missing",
        "sni_mismatch",
        "host_missing",
        "host_mismatch",
        "protocol_mismatch",
        "postgresql_denied",
        "postgresql_encrypted",
        "peek_timeout",
        "peek_too_large",
        "malformed",
        "http_smuggling",
        "client_closed",
        "upstream_unreachable",
        "connection_limit",
        "peek_limit",
    ];

    #[test]
    fn wire_codes_are_unchanged_and_serialise_as_themselves() {
        let codes: Vec<&str> = Reason::all().map(Reason::as_str).collect();
        assert_eq!(codes, WIRE_CODES);
        for reason in Reason::all() {
            let json = serde_json::to_string(&reason).expect("serialises");
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }

    #[test]
    fn only_policy_pod_and_upstream_denials_are_auditable() {
        let not_auditable: Vec<&str> = Reason::all()
            .filter(|r| !r.auditable())
            .map(Reason::as_str)
            .collect();
        assert_eq!(
            not_auditable,
            [
                "allowed",
                "unselected",
                "unknown_source",
                "client_closed",
                "connection_limit",
                "peek_limit"
            ]
        );
    }
}
