//! `sendmmsg`: many datagrams in one system call. The UDP listener's replies (each to its pod,
//! from the server the pod asked) and the queries to the upstreams (on connected sockets) leave
//! through it.
//!
//! The kernel sends in order and stops at the first datagram it refuses: it returns how many
//! it sent, or the error when it sent none. So a caller continues with the rest after a short
//! count, and after an error deals with the first datagram alone and continues after it.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use nix::libc;
use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};

/// Datagrams sent by one `sendmmsg` at most (the kernel's UIO_MAXIOV is 1024); enough to empty
/// a round, small enough to keep the batch's buffers light.
pub(crate) const MAX_BATCH: usize = 64;

/// One datagram: its bytes and, on an unconnected socket, where it goes.
pub(crate) type Outbound<'a> = (&'a [u8], Option<SocketAddr>);

/// One `sendmmsg` of the first [`MAX_BATCH`] of `datagrams`, from `source` when given
/// (IP_PKTINFO / IPV6_PKTINFO, the same for all). Returns how many were sent, at least 1: an
/// error means the first was refused. (None of an empty batch.)
pub(crate) fn send_many<'a>(
    fd: RawFd,
    datagrams: impl IntoIterator<Item = Outbound<'a>>,
    source: Option<IpAddr>,
) -> io::Result<usize> {
    let mut iovs: Vec<[IoSlice<'a>; 1]> = Vec::new();
    let mut destinations: Vec<Option<SockaddrStorage>> = Vec::new();
    for (payload, to) in datagrams.into_iter().take(MAX_BATCH) {
        if source.is_some_and(|s| to.is_some_and(|to| to.is_ipv4() != s.is_ipv4())) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "pod and server address families differ",
            ));
        }
        iovs.push([IoSlice::new(payload)]);
        destinations.push(to.map(SockaddrStorage::from));
    }
    let v4_info;
    let v6_info;
    let (cmsgs, cmsg_space) = match source {
        None => (Vec::new(), None),
        Some(IpAddr::V4(source)) => {
            v4_info = libc::in_pktinfo {
                ipi_ifindex: 0,
                // Network byte order: the octets as they are in memory.
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(source.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            (
                vec![ControlMessage::Ipv4PacketInfo(&v4_info)],
                Some(nix::cmsg_space!(libc::in_pktinfo)),
            )
        }
        Some(IpAddr::V6(source)) => {
            v6_info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: source.octets(),
                },
                ipi6_ifindex: 0,
            };
            (
                vec![ControlMessage::Ipv6PacketInfo(&v6_info)],
                Some(nix::cmsg_space!(libc::in6_pktinfo)),
            )
        }
    };
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(iovs.len(), cmsg_space);
    let sent = sendmmsg(
        fd,
        &mut headers,
        &iovs,
        &destinations,
        &cmsgs,
        MsgFlags::empty(),
    )?;
    Ok(sent.count())
}
