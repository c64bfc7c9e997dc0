//! egressgate's gateway: the TPROXY listener, the protocol peekers, the decision, the splice,
//! the admin endpoint and nftables management. `main.rs` is the `egressgate` command line.
//!
//! Layout (docs/ARCHITECTURE.md has the picture). Public are the modules the binary,
//! `gateway/tests/`, `loadtest/` and `fuzz/` use; the rest is the crate's own. Inside a public
//! module, what only the crate calls (`run`'s wiring: `nft::install`, `Store::watch`, ...) is
//! `pub(crate)`.
//! - [`config`]: the YAML configuration file. `yaml_file`: typed YAML files with
//!   `file:line:column` errors.
//! - [`identity`]: pod IP → namespace, name, labels; [`kubernetes`]: the same from the API;
//!   [`watch_metrics`]: what operators see of that watch.
//! - [`store`]: policies + identities in force, reloaded without restarts.
//! - `listener`: transparent TCP sockets.
//! - `connection`: the stages one connection goes through; `relay`: splice(2) both ways, with
//!   `pipes`, the pipe pool.
//! - [`peek`]: pure parsers of TLS ClientHello, HTTP/1 request head, PostgreSQL first messages.
//! - [`decision`]: verdicts, reason codes and the pure authorization rules.
//! - `udp`: the UDP relay that decides each flow's first datagram from a pod under an enforce
//!   policy, and keeps the nftables UDP sets in step with policies and identities.
//! - `limits`: bounds on open connections and connections waiting in peek.
//! - [`memory_budget`]: whether the caps fit in the cgroup's memory limit.
//! - `protocol`: what a connection speaks. `events`: the JSON decision and close lines.
//!   [`metrics`]: Prometheus.
//! - `admin`: `/metrics`, `/healthz`, `/readyz`. [`admin_socket`]: the operator API on
//!   `state.dir/admin.sock` (a router of JSON endpoints, and its client). [`nft`]: the nftables
//!   table and routing.
//! - `state`: the name table across restarts (restore, journal upkeep, the old side of a
//!   hand-over); `handover`: the exchange that passes sockets and table to a successor.
//! - [`explain`]: `egressgate explain` and `egressgate test`: the decision stages traced step
//!   by step, for the running gateway (its admin socket), files, or a decision line.
//! - [`run`]: wiring it all together for `egressgate run`.
//! - [`observe`]: the bus the decision and DNS lines are tapped into, `POST /v1/observe` and
//!   `egressgate observe`.
//! - [`suggest`]: `egressgate suggest`, policies from the decision lines of audit-mode and
//!   unselected pods.

pub mod admin_socket;
pub mod config;
pub mod decision;
pub mod explain;
pub mod identity;
pub mod kubernetes;
pub mod memory_budget;
pub mod metrics;
pub mod nft;
pub mod observe;
pub mod peek;
pub mod run;
mod state;
pub mod store;
pub mod suggest;
pub mod watch_metrics;

mod admin;
mod connection;
mod events;
mod handover;
mod limits;
mod listener;
mod pipes;
mod protocol;
mod relay;
mod udp;
mod workers;
mod yaml_file;
