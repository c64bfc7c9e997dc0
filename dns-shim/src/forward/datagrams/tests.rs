//! On loopback sockets, no privileges: the queries queued for one upstream socket leave in
//! `sendmmsg` batches, in order, and one the kernel refuses is set aside without holding up the
//! rest.

use std::net::Ipv4Addr;

use super::*;

/// Past the largest IPv4 UDP payload (65,507 bytes): the kernel refuses it (EMSGSIZE).
const TOO_BIG: usize = 65_520;

const SOCKET: SocketId = 7;

/// The upstream, and a socket of ours connected to it.
async fn upstream_and_socket() -> (UdpSocket, UpstreamSocket) {
    let upstream = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("upstream");
    let addr = upstream.local_addr().expect("addr");
    let socket = UpstreamSocket::new(SOCKET, addr, Instant::now()).expect("connected socket");
    (upstream, socket)
}

/// A query of `len` bytes under `id`.
fn queued(id: u16, len: usize) -> Queued {
    let mut message = vec![0u8; len];
    message[..2].copy_from_slice(&id.to_be_bytes());
    Queued {
        socket: SOCKET,
        id,
        message,
    }
}

/// The IDs of the next `count` datagrams `upstream` receives.
async fn received_ids(upstream: &UdpSocket, count: usize) -> Vec<u16> {
    let mut buf = vec![0u8; 65_535];
    let mut ids = Vec::new();
    for _ in 0..count {
        let n = tokio::time::timeout(Duration::from_secs(5), upstream.recv(&mut buf))
            .await
            .expect("a query in time")
            .expect("recv");
        assert!(n >= 2);
        ids.push(u16::from_be_bytes([buf[0], buf[1]]));
    }
    ids
}

#[tokio::test]
async fn the_kernel_sends_up_to_a_refused_datagram_and_says_how_many() {
    let (_upstream, socket) = upstream_and_socket().await;
    let group = [
        queued(1, 40),
        queued(2, 40),
        queued(3, TOO_BIG),
        queued(4, 40),
    ];
    let datagrams = group.iter().map(|q| (&q.message[..], None));
    let sent = batch::send_many(socket.socket.as_raw_fd(), datagrams, None).expect("sent some");
    assert_eq!(sent, 2, "a short count, not an error");
    let datagrams = group[2..].iter().map(|q| (&q.message[..], None));
    let refused = batch::send_many(socket.socket.as_raw_fd(), datagrams, None);
    assert_eq!(
        refused.err().and_then(|e| e.raw_os_error()),
        Some(nix::libc::EMSGSIZE)
    );
}

#[tokio::test]
async fn a_short_send_continues_and_a_refused_query_is_set_aside() {
    let (upstream, socket) = upstream_and_socket().await;
    let group = [
        queued(1, 40),
        queued(2, 40),
        queued(3, TOO_BIG),
        queued(4, 40),
        queued(5, TOO_BIG),
    ];
    let mut refused = Vec::new();
    send_group(&socket, &group, &mut refused);
    let refused: Vec<_> = refused
        .into_iter()
        .map(|(socket, id, e)| (socket, id, e.raw_os_error()))
        .collect();
    let emsgsize = Some(nix::libc::EMSGSIZE);
    assert_eq!(refused, [(SOCKET, 3, emsgsize), (SOCKET, 5, emsgsize)]);
    assert_eq!(received_ids(&upstream, 3).await, [1, 2, 4]);
}

#[tokio::test]
async fn more_queries_than_one_sendmmsg_takes_all_leave_in_order() {
    let (upstream, socket) = upstream_and_socket().await;
    let count = batch::MAX_BATCH * 2 + 3;
    let ids: Vec<u16> = (0..count)
        .map(|i| u16::try_from(i).expect("small"))
        .collect();
    let group: Vec<Queued> = ids.iter().map(|&id| queued(id, 40)).collect();
    let mut refused = Vec::new();
    send_group(&socket, &group, &mut refused);
    assert!(refused.is_empty());
    assert_eq!(received_ids(&upstream, count).await, ids);
}
