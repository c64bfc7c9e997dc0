//! The exchange over a real Unix socket, with real listening sockets changing hands.

use std::io::Read;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;

use super::*;

#[tokio::test]
async fn sockets_dump_and_late_records_reach_the_successor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offer = Offer::bind(dir.path()).expect("offer");
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let (tcp_addr, udp_addr) = (
        tcp.local_addr().expect("addr"),
        udp.local_addr().expect("addr"),
    );
    // Waiting in the queues before the hand-over: they must reach the successor.
    let mut queued = TcpStream::connect(tcp_addr).expect("connect");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
    sender.send_to(b"query", udp_addr).expect("send");

    let old = tokio::spawn(async move {
        let mut successor = offer.next().await;
        successor
            .send_sockets(&[
                (Role::Tproxy, tcp_addr, tcp.as_fd()),
                (Role::DnsUdp, udp_addr, udp.as_fd()),
            ])
            .await
            .expect("sockets");
        successor.send_dump(b"the dump").await.expect("dump");
        successor.wait_for_stop().await.expect("stop");
        successor
            .stopped(b"late records", 3)
            .await
            .expect("stopped");
        // The old process's descriptors close here.
    });

    let takeover = connect(dir.path())
        .await
        .expect("connect")
        .expect("an old gateway");
    assert_eq!(takeover.dump, b"the dump");
    let roles: Vec<(Role, SocketAddr)> =
        takeover.sockets.iter().map(|s| (s.role, s.addr)).collect();
    assert_eq!(roles, [(Role::Tproxy, tcp_addr), (Role::DnsUdp, udp_addr)]);
    let Takeover {
        stream,
        sockets,
        dump,
    } = takeover;
    let stopped = Takeover {
        stream,
        sockets: Vec::new(),
        dump,
    }
    .finish()
    .await
    .expect("finish");
    assert_eq!(stopped.records, b"late records");
    assert_eq!(stopped.open_connections, 3);
    old.await.expect("old side");

    let mut sockets = sockets.into_iter();
    let listener = TcpListener::from(sockets.next().expect("tcp").fd);
    let (mut accepted, _) = listener
        .accept()
        .expect("the queued connection, accepted here");
    queued.write_all_and_close();
    let mut got = String::new();
    accepted.read_to_string(&mut got).expect("read");
    assert_eq!(got, "hello");
    let udp = UdpSocket::from(sockets.next().expect("udp").fd);
    let mut buf = [0u8; 16];
    let (n, _) = udp
        .recv_from(&mut buf)
        .expect("the queued datagram, read here");
    assert_eq!(&buf[..n], b"query");
}

trait WriteAndClose {
    fn write_all_and_close(&mut self);
}

impl WriteAndClose for TcpStream {
    fn write_all_and_close(&mut self) {
        use std::io::Write;
        self.write_all(b"hello").expect("write");
        self.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
}

#[tokio::test]
async fn more_sockets_than_one_message_holds_reach_the_successor_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offer = Offer::bind(dir.path()).expect("offer");
    // Many workers: one socket each on one address, over two messages and a bit.
    let count = MAX_SOCKETS * 2 + 3;
    let sockets: Vec<UdpSocket> = (0..count)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("udp"))
        .collect();
    let addrs: Vec<SocketAddr> = sockets
        .iter()
        .map(|s| s.local_addr().expect("addr"))
        .collect();
    let expected = addrs.clone();
    let old = tokio::spawn(async move {
        let mut successor = offer.next().await;
        let handed: Vec<(Role, SocketAddr, BorrowedFd<'_>)> = sockets
            .iter()
            .zip(&addrs)
            .map(|(socket, addr)| (Role::DnsUdp, *addr, socket.as_fd()))
            .collect();
        successor.send_sockets(&handed).await.expect("sockets");
        successor.send_dump(b"dump").await.expect("dump");
    });
    let takeover = connect(dir.path())
        .await
        .expect("connect")
        .expect("an old gateway");
    old.await.expect("old side");
    assert_eq!(takeover.dump, b"dump");
    let got: Vec<SocketAddr> = takeover.sockets.iter().map(|s| s.addr).collect();
    assert_eq!(got, expected);
    // Each fd is the socket named with it.
    for socket in takeover.sockets {
        let fd = UdpSocket::from(socket.fd);
        assert_eq!(fd.local_addr().expect("addr"), socket.addr);
    }
}

#[tokio::test]
async fn no_old_gateway_means_nothing_to_take_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(connect(dir.path()).await.expect("connect").is_none());
    // A socket file left by a process that died.
    let offer = Offer::bind(dir.path()).expect("offer");
    drop(offer);
    assert!(connect(dir.path()).await.expect("connect").is_none());
}

#[tokio::test]
async fn another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offer = Offer::bind(dir.path()).expect("offer");
    let old = tokio::spawn(async move { offer.next().await });
    let mut stream = UnixStream::connect(socket_path(dir.path()))
        .await
        .expect("connect");
    send(&mut stream, Kind::Hello, &99u16.to_le_bytes())
        .await
        .expect("hello");
    let answer = receive(&mut stream).await;
    assert!(
        matches!(answer, Err(HandoverError::Version(PROTOCOL_VERSION))),
        "{answer:?}"
    );
    old.abort();
}

#[test]
fn a_successor_replaces_the_socket_file_and_the_old_one_leaves_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    runtime.block_on(async {
        let old = Offer::bind(dir.path()).expect("old");
        let new = Offer::bind(dir.path()).expect("new");
        old.remove();
        assert!(
            socket_path(dir.path()).exists(),
            "the old one removed its successor's socket"
        );
        new.remove();
        assert!(!socket_path(dir.path()).exists());
    });
}
