//! egressgate-lab: a network-namespace lab that runs the real `egressgate` binary between pods
//! and an upstream network, for the end-to-end tests (`tests/e2e/`) and the demo (`src/bin/demo.rs`).
//!
//! The lab owns namespaces, veths, the upstream services (dnsmasq, nginx, PostgreSQL) and the
//! gateway process; it knows nothing of the gateway's internals and talks to it only through the
//! documented config file, identity file, CLI and JSON log lines (README: "Configuration", "Identity", "Logs").
//!
//! Layout:
//! - [`lab`]: the [`Lab`] builder and topology; everything it creates is removed on drop.
//! - [`netns`]: one network namespace, and running client commands inside it.
//! - [`daemon`]: a long-running process in a namespace, killed (whole process group) on drop.
//! - [`services`]: the upstream certificate, dnsmasq (trusted and rogue), nginx and PostgreSQL.
//! - [`gateway`]: the gateway's config, locating its binary, and its decision lines.
//! - [`addr`]: the lab's fixed addresses.
//! - [`cgroup`]: a memory cgroup to run a process under test in.
//!
//! Safety rules kept throughout: addresses only from 198.18.0.0/15 and fd00::/8, every client
//! runs inside a namespace (`ip netns exec`), and every wait has a deadline.
#![forbid(unsafe_code)]

pub mod addr;
pub mod cgroup;
pub mod daemon;
pub mod error;
pub mod gateway;
pub mod image;
pub mod kube;
pub mod lab;
pub mod netns;
pub mod services;

pub use error::{LabError, Result};
pub use gateway::{egressgate_bin, Decision, Gateway, GatewayOptions};
pub use lab::{Lab, LabBuilder};
pub use netns::{Netns, Output};
