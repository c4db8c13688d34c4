//! TCP channels end to end: bulk exchange both ways, reconnect schedule, shutdown, idle
//! timeout, store errors.

mod common;

use std::time::Duration;

use common::{data, device, settings, sha256};
use keav_net::device::{Device, DeviceSettings};
use keav_net::session::Options;
use keav_net::tcp::{self, Listener};
use keav_net::Error;
use keav_proto::cache::Verification;
use keav_proto::handshake::{KeyAgreement, Role};
use keav_proto::record::RatchetPolicy;
use tempfile::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_and_exchange_megabytes_both_ways() {
    let dir = TempDir::new().unwrap();
    // Ratchet every 16 records, so the bulk transfer crosses a dozen epochs each way.
    let ratchet = RatchetPolicy {
        every_records_log2: 4,
        ..RatchetPolicy::default()
    };
    let a = device(
        &dir,
        "a",
        DeviceSettings {
            ratchet,
            ..settings(Some("pairing code 1234"))
        },
    );
    let b = device(
        &dir,
        "b",
        DeviceSettings {
            ratchet,
            ..settings(Some("pairing code 1234"))
        },
    );
    let mut listener = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let addr = listener.local_addr();

    let opts = Options::default();
    let (ca, cb) = tokio::join!(tcp::connect(&a, addr, "b", &opts), listener.accept());
    let (ca, cb) = (ca.unwrap(), cb.unwrap());

    // What each side learned about the other.
    let (pa, pb) = (ca.peer().clone(), cb.peer().clone());
    assert_eq!(pa.peer_zid, b.zid());
    assert_eq!(pa.local_zid, a.zid());
    assert_eq!(pb.peer_zid, a.zid());
    assert_eq!(pb.local_zid, b.zid());
    assert_eq!((pa.role, pb.role), (Role::Initiator, Role::Responder));
    assert_eq!(pa.session_number, 1);
    assert_eq!(pb.session_number, 1);
    assert_eq!(pa.key_agreement, KeyAgreement::Dh);
    assert_eq!(pa.verification, Verification::Bound);
    assert_eq!(pb.verification, Verification::Bound);
    assert_eq!(pa.sas, pb.sas);
    assert_eq!(pa.channel_aead, pb.channel_aead);
    assert_eq!(pa.label.as_deref(), Some("b"));
    assert_eq!(pa.remote_addr, Some(addr));

    // Both stores persisted the session.
    let rec = a.store().peer_by_label("b").unwrap().unwrap();
    assert_eq!(rec.cache.sessions, 1);
    assert!(rec.cache.rs1.is_some());
    assert_eq!(
        b.store()
            .peer_by_zid(&a.zid())
            .unwrap()
            .unwrap()
            .cache
            .sessions,
        1
    );

    let up = data(3 << 20, 1);
    let down = data((2 << 20) + 12345, 2);
    let (up_hash, down_hash) = (sha256(&up), sha256(&down));

    let (mut a_tx, mut a_rx) = ca.split();
    let (mut b_tx, mut b_rx) = cb.split();
    let send_up = tokio::spawn(async move {
        for piece in up.chunks(100_000) {
            a_tx.send(piece).await.unwrap();
        }
        a_tx.close().await.unwrap();
        a_tx
    });
    let send_down = tokio::spawn(async move {
        b_tx.send(&down).await.unwrap();
        b_tx.close().await.unwrap();
        b_tx
    });
    let recv_up = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(d) = b_rx.recv().await.unwrap() {
            assert!(d.len() <= 16 * 1024);
            got.extend_from_slice(&d);
        }
        // After the authenticated close: None again, never an error.
        assert!(b_rx.recv().await.unwrap().is_none());
        got
    });
    let recv_down = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(d) = a_rx.recv().await.unwrap() {
            got.extend_from_slice(&d);
        }
        got
    });
    let (got_up, got_down) = (recv_up.await.unwrap(), recv_down.await.unwrap());
    assert_eq!(got_up.len(), 3 << 20);
    assert_eq!(sha256(&got_up), up_hash);
    assert_eq!(got_down.len(), (2 << 20) + 12345);
    assert_eq!(sha256(&got_down), down_hash);
    let mut a_tx = send_up.await.unwrap();
    send_down.await.unwrap();
    // Sending after close is refused.
    assert!(matches!(a_tx.send(b"late").await, Err(Error::Closed)));
}

#[tokio::test]
async fn twelve_sessions_follow_the_normal_mode_schedule() {
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("s3cret")));
    let b = device(&dir, "b", settings(Some("s3cret")));
    let mut listener = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let addr = listener.local_addr();
    let opts = Options::default();
    for n in 1..=12u64 {
        let (ca, cb) = tokio::join!(tcp::connect(&a, addr, "b", &opts), listener.accept());
        let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
        let verifies = n == 1 || n == 11;
        for p in [ca.peer(), cb.peer()] {
            assert_eq!(p.session_number, n, "session {n}");
            if verifies {
                assert_eq!(p.key_agreement, KeyAgreement::Dh, "session {n}");
                assert_eq!(p.verification, Verification::Bound, "session {n}");
            } else {
                assert_eq!(p.key_agreement, KeyAgreement::Preshared, "session {n}");
                assert_eq!(p.verification, Verification::Skipped, "session {n}");
                assert!(p.cache_matched);
            }
        }
        let msg = format!("session {n}");
        ca.send(msg.as_bytes()).await.unwrap();
        assert_eq!(cb.recv().await.unwrap().unwrap(), msg.as_bytes());
        ca.close().await.unwrap();
        assert!(cb.recv().await.unwrap().is_none());
        cb.close().await.unwrap();
        assert!(ca.recv().await.unwrap().is_none());
    }
}

#[tokio::test]
async fn serve_echoes_then_shuts_down_gracefully() {
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(None));
    let b = device(&dir, "b", settings(None));
    let listener = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let addr = listener.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(listener.serve(
        |mut ch| async move {
            while let Ok(Some(d)) = ch.recv().await {
                if ch.send(&d).await.is_err() {
                    break;
                }
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    let mut c1 = tcp::connect(&a, addr, "b", &Options::default())
        .await
        .unwrap();
    assert_eq!(c1.peer().verification, Verification::Unbound);
    c1.send(b"ping").await.unwrap();
    assert_eq!(c1.recv().await.unwrap().unwrap(), b"ping");

    stop_tx.send(()).unwrap();
    // The in-flight channel is closed by the server with an authenticated close.
    let r = tokio::time::timeout(Duration::from_secs(3), c1.recv())
        .await
        .unwrap();
    assert!(matches!(r, Ok(None)), "{r:?}");
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Nothing listens any more.
    assert!(tcp::connect(&a, addr, "b", &Options::default())
        .await
        .is_err());
}

#[tokio::test]
async fn idle_timeout_is_reported_and_not_fatal() {
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(None));
    let b = device(&dir, "b", settings(None));
    let mut listener = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let opts = Options {
        idle_timeout: Some(Duration::from_millis(150)),
        ..Options::default()
    };
    let (ca, cb) = tokio::join!(
        tcp::connect(&a, listener.local_addr(), "b", &opts),
        listener.accept()
    );
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    assert!(matches!(ca.recv().await, Err(Error::Timeout(_))));
    cb.send(b"late but fine").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"late but fine");
}

#[tokio::test]
async fn unreadable_store_is_a_store_error() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("garbage.keav");
    std::fs::write(&path, vec![0x5a; 10_000]).unwrap();
    match Device::open(&path, DeviceSettings::default()) {
        Err(e @ Error::Store(_)) => assert!(e.to_string().starts_with("device store")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn connection_refused_is_an_io_error() {
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(None));
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = tcp::connect(&a, port, "nobody", &Options::default()).await;
    assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
}

#[tokio::test]
async fn compacted_channels_keep_working() {
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(None));
    let b = device(&dir, "b", settings(None));
    let mut listener = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let opts = Options::default();
    let (ca, cb) = tokio::join!(
        tcp::connect(&a, listener.local_addr(), "b", &opts),
        listener.accept()
    );
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    for i in 0..5u8 {
        ca.compact();
        cb.compact();
        ca.send(&[i; 100]).await.unwrap();
        assert_eq!(cb.recv().await.unwrap().unwrap(), vec![i; 100]);
        cb.send(&[i + 100; 10]).await.unwrap();
        assert_eq!(ca.recv().await.unwrap().unwrap(), vec![i + 100; 10]);
    }
    ca.close().await.unwrap();
    assert_eq!(cb.recv().await.unwrap(), None);
}
