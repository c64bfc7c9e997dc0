//! The two ends of an intercepted connection, as distinct types so one cannot be passed where
//! the other belongs (linkerd's `ClientAddr` and `OrigDstAddr`).

use std::net::{IpAddr, SocketAddr};

use egressgate_dns_shim::DestIp;

/// The pod's end: the accepted socket's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Where the pod meant to connect: TPROXY keeps it as the accepted socket's local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

impl ClientAddr {
    /// The address identities and limits know the pod by (IPv4-mapped IPv6 as IPv4).
    pub fn ip(self) -> IpAddr {
        self.0.ip().to_canonical()
    }
}

impl OrigDstAddr {
    /// The address name records and policies know the destination by (IPv4-mapped IPv6 as
    /// IPv4).
    pub fn ip(self) -> IpAddr {
        self.0.ip().to_canonical()
    }

    /// The address as the name table files the pod's records for it.
    pub fn table_ip(self) -> DestIp {
        DestIp(self.ip())
    }

    pub fn port(self) -> u16 {
        self.0.port()
    }
}
