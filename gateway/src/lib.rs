//! egressgate's gateway: the TPROXY listener, the protocol peekers, the decision, the splice,
//! the admin endpoint and nftables management. `main.rs` is the `egressgate` command line.
//!
//! Layout (docs/ARCHITECTURE.md has the picture):
//! - [`config`]: the YAML configuration file.
//! - [`identity`]: pod IP → namespace, name, labels; [`kubernetes`]: the same from the API.
//! - [`store`]: policies + identities in force, reloaded without restarts.
//! - [`listener`]: transparent TCP sockets.
//! - [`connection`]: the stages one connection goes through; [`relay`]: splice(2) both ways.
//! - [`peek`]: pure parsers of TLS ClientHello, HTTP/1 request head, PostgreSQL first messages.
//! - [`decision`]: verdicts, reason codes and the pure authorization rules.
//! - [`limits`]: bounds on open connections and connections waiting in peek.
//! - [`memory_budget`]: whether the caps fit in the cgroup's memory limit.
//! - [`protocol`]: what a connection speaks. [`events`]: the JSON decision and close lines. [`metrics`]: Prometheus.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`. [`nft`]: the nftables table and routing.
//! - [`run`]: wiring it all together for `egressgate run`.
//! - [`yaml_file`]: typed YAML files with `file:line:column` errors.

pub mod admin;
pub mod config;
pub mod connection;
pub mod decision;
pub mod events;
pub mod identity;
pub mod kubernetes;
pub mod limits;
pub mod listener;
pub mod memory_budget;
pub mod metrics;
pub mod nft;
pub mod peek;
pub mod pipes;
pub mod protocol;
pub mod relay;
pub mod run;
pub mod store;
pub mod yaml_file;
