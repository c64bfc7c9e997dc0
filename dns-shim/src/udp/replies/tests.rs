//! On real loopback sockets, no privileges: replies leave in batches, each to its pod, from the
//! address the pod asked, and one the kernel refuses does not hold up the others.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use super::*;
use crate::batch::MAX_BATCH;
use crate::client::Transport;

/// A socket on 127.0.0.1, any port: a pod, or the listener.
async fn loopback() -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("loopback socket")
}

fn outgoing(pod: SocketAddr, server: SocketAddr, reply: &[u8]) -> Outgoing {
    Outgoing {
        reply: reply.to_vec(),
        client: Client {
            pod,
            server,
            transport: Transport::Udp,
        },
    }
}

/// Sends all of `batch`.
async fn send_all(listener: &UdpSocket, mut batch: Vec<Outgoing>) {
    let local = listener.local_addr().expect("local");
    send_batch(listener, &ReplySockets::default(), local, &mut batch).await;
}

async fn receive(pod: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 512];
    let (len, from) = tokio::time::timeout(Duration::from_secs(5), pod.recv_from(&mut buf))
        .await
        .expect("a reply in time")
        .expect("recv");
    (buf[..len].to_vec(), from)
}

#[tokio::test]
async fn each_pod_gets_its_replies_in_order() {
    let listener = loopback().await;
    let local = listener.local_addr().expect("local");
    let (a, b) = (loopback().await, loopback().await);
    let (a_addr, b_addr) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
    let batch = vec![
        outgoing(a_addr, local, b"a1"),
        outgoing(b_addr, local, b"b1"),
        outgoing(a_addr, local, b"a2"),
    ];
    send_all(&listener, batch).await;
    assert_eq!(receive(&a).await, (b"a1".to_vec(), local));
    assert_eq!(receive(&a).await, (b"a2".to_vec(), local));
    assert_eq!(receive(&b).await, (b"b1".to_vec(), local));
}

#[tokio::test]
async fn more_than_one_batch_all_arrive() {
    let listener = loopback().await;
    let local = listener.local_addr().expect("local");
    let a = loopback().await;
    let a_addr = a.local_addr().expect("a");
    let count = MAX_BATCH * 2 + 3;
    let batch = (0..count)
        .map(|i| {
            outgoing(
                a_addr,
                local,
                &u16::try_from(i).expect("small").to_be_bytes(),
            )
        })
        .collect();
    send_all(&listener, batch).await;
    for i in 0..count {
        let (reply, _) = receive(&a).await;
        assert_eq!(reply, u16::try_from(i).expect("small").to_be_bytes());
    }
}

#[tokio::test]
async fn replies_leave_from_the_address_the_pod_asked() {
    // Any address of 127/8 is local, so IP_PKTINFO may choose 127.0.0.2 without privileges.
    let listener = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .expect("listener");
    let port = listener.local_addr().expect("local").port();
    let server: SocketAddr = (Ipv4Addr::new(127, 0, 0, 2), port).into();
    let a = loopback().await;
    let batch = vec![
        outgoing(a.local_addr().expect("a"), server, b"one"),
        outgoing(a.local_addr().expect("a"), server, b"two"),
    ];
    send_all(&listener, batch).await;
    assert_eq!(receive(&a).await, (b"one".to_vec(), server));
    assert_eq!(receive(&a).await, (b"two".to_vec(), server));
}

#[tokio::test]
async fn a_refused_reply_does_not_hold_up_the_others() {
    let listener = loopback().await;
    let local = listener.local_addr().expect("local");
    let a = loopback().await;
    let a_addr = a.local_addr().expect("a");
    // The kernel refuses port 0 as a destination (EINVAL).
    let nowhere: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    let batch = vec![
        outgoing(nowhere, local, b"lost"),
        outgoing(a_addr, local, b"first"),
        outgoing(nowhere, local, b"lost"),
        outgoing(a_addr, local, b"second"),
    ];
    send_all(&listener, batch).await;
    assert_eq!(receive(&a).await.0, b"first");
    assert_eq!(receive(&a).await.0, b"second");
}
