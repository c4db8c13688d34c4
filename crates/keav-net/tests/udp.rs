//! UDP channels: a clean pair, a lossy and duplicating link, several peers on one listener.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{data, device, settings};
use keav_net::session::Options;
use keav_net::udp::{self, Listener};
use keav_proto::cache::Verification;
use keav_proto::handshake::KeyAgreement;
use tempfile::TempDir;
use tokio::net::UdpSocket;

#[tokio::test]
async fn clean_pair_exchanges_and_closes() {
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("1234-5678")));
    let b = device(&dir, "b", settings(Some("1234-5678")));
    let mut l = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let addr = l.local_addr();
    let opts = Options::default();
    let (ca, cb) = tokio::join!(udp::connect(&a, addr, "b", &opts), l.accept());
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    assert_eq!(ca.peer().peer_zid, b.zid());
    assert_eq!(cb.peer().peer_zid, a.zid());
    assert_eq!(ca.peer().verification, Verification::Bound);
    assert_eq!(ca.peer().sas, cb.peer().sas);
    assert_eq!(ca.peer().remote_addr, Some(addr));

    let big = data(40_000, 9);
    ca.send(&big).await.unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let d = cb.recv().await.unwrap().unwrap();
        assert!(d.len() <= 16 * 1024);
        got.extend_from_slice(&d);
    }
    assert_eq!(got, big);
    cb.send(b"pong").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"pong");
    ca.close().await.unwrap();
    assert!(cb.recv().await.unwrap().is_none());
    assert_eq!((ca.dropped_records(), cb.dropped_records()), (0, 0));

    // A second session over UDP continues the key history (preshared, no verification).
    let (ca, cb) = tokio::join!(udp::connect(&a, addr, "b", &opts), l.accept());
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    assert_eq!(ca.peer().session_number, 2);
    assert_eq!(cb.peer().key_agreement, KeyAgreement::Preshared);
}

/// A UDP relay between one client and a server that drops the datagrams whose (per
/// direction) index is listed and sends every other datagram twice.
async fn lossy_duplicating_shim(
    server: SocketAddr,
    drop_up: &'static [usize],
    drop_down: &'static [usize],
) -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let counter = dropped.clone();
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let (mut up, mut down) = (0usize, 0usize);
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let d = buf[..n].to_vec();
            let (to, skip) = if src == server {
                down += 1;
                (client, drop_down.contains(&down))
            } else {
                client = Some(src);
                up += 1;
                (Some(server), drop_up.contains(&up))
            };
            let Some(to) = to else { continue };
            if skip {
                counter.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let _ = sock.send_to(&d, to).await;
            let _ = sock.send_to(&d, to).await;
        }
    });
    (addr, dropped)
}

#[tokio::test]
async fn lossy_duplicating_link_completes_and_never_delivers_twice() {
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("shared")));
    let b = device(&dir, "b", settings(Some("shared")));
    let mut l = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    // Lose the first Hello, and the responder's second and fourth handshake datagrams.
    let (shim, lost) = lossy_duplicating_shim(l.local_addr(), &[1], &[2, 4]).await;
    let opts = Options::default();
    let (ca, cb) = tokio::join!(udp::connect(&a, shim, "b", &opts), l.accept());
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    assert_eq!(
        lost.load(Ordering::SeqCst),
        3,
        "the shim did not drop what it should"
    );
    assert_eq!(ca.peer().verification, Verification::Bound);
    assert_eq!(ca.peer().sas, cb.peer().sas);

    let msgs: Vec<Vec<u8>> = (0..30).map(|i| data(1000 + i, i as u64)).collect();
    for m in &msgs {
        ca.send(m).await.unwrap();
    }
    ca.close().await.unwrap();
    let mut got = Vec::new();
    while let Some(d) = tokio::time::timeout(Duration::from_secs(3), cb.recv())
        .await
        .unwrap()
        .unwrap()
    {
        got.push(d);
    }
    // Every message exactly once, in order; each duplicate dropped and counted.
    assert_eq!(got, msgs);
    assert_eq!(cb.dropped_records(), 30);

    // The other direction too.
    cb.send(b"back").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"back");
    assert_eq!(ca.dropped_records(), 0);
    // The duplicate of "back" is dropped; nothing else arrives.
    let r = tokio::time::timeout(Duration::from_millis(200), ca.recv()).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(ca.dropped_records(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_socket_serves_several_peers_and_ignores_strangers() {
    let dir = TempDir::new().unwrap();
    let server = device(&dir, "server", settings(None));
    let l = Listener::bind(&server, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let addr = l.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(l.serve(
        |mut ch| async move {
            while let Ok(Some(d)) = ch.recv().await {
                let mut reply = ch.peer().peer_zid.to_string().into_bytes();
                reply.extend_from_slice(&d);
                if ch.send(&reply).await.is_err() {
                    break;
                }
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    // Garbage from a stranger is ignored.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger.send_to(b"\x10garbage", addr).await.unwrap();
    stranger.send_to(&[0x17; 40], addr).await.unwrap();

    let clients: Vec<_> = (0..3)
        .map(|i| device(&dir, &format!("client{i}"), settings(None)))
        .collect();
    let mut joins = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        joins.push(tokio::spawn(async move {
            let mut ch = udp::connect(&c, addr, "server", &Options::default())
                .await
                .unwrap();
            let msg = format!("hello from {i}");
            ch.send(msg.as_bytes()).await.unwrap();
            let reply = ch.recv().await.unwrap().unwrap();
            let mut want = c.zid().to_string().into_bytes();
            want.extend_from_slice(msg.as_bytes());
            assert_eq!(reply, want);
            ch
        }));
    }
    let mut channels = Vec::new();
    for j in joins {
        channels.push(j.await.unwrap());
    }
    // Graceful shutdown: each client gets the server's authenticated close.
    stop_tx.send(()).unwrap();
    for ch in &mut channels {
        let r = tokio::time::timeout(Duration::from_secs(3), ch.recv())
            .await
            .unwrap();
        assert!(matches!(r, Ok(None)), "{r:?}");
    }
    served.await.unwrap().unwrap();
    // After the authenticated close, recv keeps answering None.
    assert!(matches!(channels[0].recv().await, Ok(None)));
}
