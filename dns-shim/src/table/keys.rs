//! The two addresses a record is filed under, as distinct types: the table's API takes a
//! (pod, destination) pair in many places, and two bare `IpAddr`s there could be swapped
//! silently. Both are plain copies of an address, so the hot path pays nothing for them.
//!
//! ```
//! # use egressgate_dns_shim::{DestIp, NameTable, PodIp};
//! fn live_names(table: &NameTable, pod: PodIp, dst: DestIp) -> usize {
//!     table.lookup(pod, dst, std::time::Instant::now()).len()
//! }
//! ```
//!
//! ```compile_fail
//! # use egressgate_dns_shim::{DestIp, NameTable, PodIp};
//! fn live_names(table: &NameTable, pod: PodIp, dst: DestIp) -> usize {
//!     table.lookup(dst, pod, std::time::Instant::now()).len() // swapped
//! }
//! ```

use std::fmt;
use std::net::IpAddr;

/// A pod's own address: the source of its DNS queries and of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodIp(pub IpAddr);

/// An address a DNS answer gave the pod: where its connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestIp(pub IpAddr);

impl fmt::Display for PodIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for DestIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
