//! End-to-end tests: the real `egressgate` binary in a network-namespace lab.
//!
//! Needs root, iproute2, nftables, dnsmasq, nginx, openssl, curl, dig, psql, python3 and a PostgreSQL server,
//! and a built gateway: run `cargo build -p egressgate` first (see `egressgate_bin`). Each test
//! builds its own lab with unique namespace names, so tests run in parallel.

mod audit;
mod bypass_dns;
mod bypass_http;
mod bypass_names;
mod bypass_node;
mod bypass_postgres;
mod bypass_support;
mod bypass_tls;
mod bypass_udp;
mod cli;
mod client_first;
mod configmap_reload;
mod dashboards;
mod dns;
mod expiry;
mod explain;
mod faults;
mod image;
mod lifecycle;
mod nftables;
mod observe;
mod operations;
mod peek_limits;
mod postgres;
mod restart;
mod self_check;
mod support;
mod tls_http;
