//! egressgate's policy: the `EgressPolicy` / `ClusterEgressPolicy` model, its YAML format with
//! `file:line:column` errors, and the compiled matcher that says which rules allow a
//! connection. It is pure: the gateway reads files, watches the cluster and owns sockets, then
//! passes text and pod identities in and gets policies and grants out.
//!
//! Layout:
//! - [`name`]: [`DnsName`], the one DNS-name rule, and `dnsName` patterns (`db.example`,
//!   `*.example`, `**.example`).
//! - [`selector`]: Kubernetes label selectors.
//! - [`model`]: the policy model; every type rejects invalid rules when built.
//! - [`parse`]: YAML documents → [`Policy`], with [`LoadError`] positions.
//! - [`set`]: [`PolicySet`], pod [`Selection`] and [`Grant`]s.
//! - `index`: the set's indexes (by namespace and pod label, by name suffix, and its `cidr`
//!   rules), which keep a decision from scanning every policy.

#![forbid(unsafe_code)]

mod index;
pub mod model;
pub mod name;
pub mod parse;
pub mod selector;
pub mod set;

pub use model::{
    Cidr, EgressRule, Mode, ModelError, ObjectName, Origin, Peer, Policy, PolicyKind, PolicyRef,
    PortRange, PortRule, PostgresRule, Protocol, Transport,
};
pub use name::{DnsName, DnsNamePattern, NameError};
pub use parse::{parse_policies, LoadError, API_VERSION};
pub use selector::{LabelSelector, Operator, Requirement, SelectorError};
pub use set::{Grant, GrantPeer, KeptSelection, PodIdentity, PolicySet, Selection};
