//! Attacks on TCP channels: a man in the middle built from two keav devices, malformed and
//! oversized frames, a slow-loris client, tampered / replayed / truncated records.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{device, settings};
use keav_net::device::Device;
use keav_net::frame::FrameError;
use keav_net::session::Options;
use keav_net::tcp::{self, Listener};
use keav_net::Error;
use keav_proto::cache::Verification;
use keav_store::ANONYMOUS_PEER;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn short_deadline(secret: Option<&str>, ms: u64) -> keav_net::device::DeviceSettings {
    let mut s = settings(secret);
    s.handshake_timeout = Duration::from_millis(ms);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn man_in_the_middle_is_caught_on_both_sides() {
    let dir = TempDir::new().unwrap();
    let secret = "the real pairing code";
    let alice = device(&dir, "alice", settings(Some(secret)));
    let bob = device(&dir, "bob", settings(Some(secret)));
    // The attacker: two keav devices, with a guess of the secret.
    let m1 = device(&dir, "m1", settings(Some("a wrong guess")));
    let m2 = device(&dir, "m2", settings(Some("a wrong guess")));
    let opts = Options::default();

    let mut bob_listener = Listener::bind(&bob, "127.0.0.1:0", opts.clone())
        .await
        .unwrap();
    let bob_addr = bob_listener.local_addr();

    // Control: Alice and Bob pair directly.
    let (ca, cb) = tokio::join!(
        tcp::connect(&alice, bob_addr, "bob", &opts),
        bob_listener.accept()
    );
    assert_eq!(ca.unwrap().peer().verification, Verification::Bound);
    assert_eq!(cb.unwrap().peer().verification, Verification::Bound);

    // The attacker listens for Alice and calls Bob, meaning to relay between the two.
    let mut m1_listener = Listener::bind(&m1, "127.0.0.1:0", opts.clone())
        .await
        .unwrap();
    let mitm_addr = m1_listener.local_addr();
    let mitm = tokio::spawn(async move {
        let opts = Options::default();
        let (from_alice, to_bob) = tokio::join!(
            m1_listener.next_incoming(),
            tcp::connect(&m2, bob_addr, "bob", &opts)
        );
        if let (Ok(inc), Ok(mut to_bob)) = (from_alice, to_bob) {
            if let Ok(mut from_alice) = inc.result {
                // Would relay application data; must never get here.
                while let Ok(Some(d)) = from_alice.recv().await {
                    let _ = to_bob.send(&d).await;
                }
                return true;
            }
        }
        false
    });

    // Alice thinks she calls Bob; Bob sees a caller.
    let (alice_result, bob_incoming) = tokio::join!(
        tcp::connect(&alice, mitm_addr, "bob", &opts),
        bob_listener.next_incoming()
    );
    let alice_err = alice_result.unwrap_err();
    let bob_err = bob_incoming.unwrap().result.unwrap_err();
    for e in [&alice_err, &bob_err] {
        assert!(matches!(e, Error::Handshake(_)), "{e:?}");
        assert!(e.counts_toward_lockout(), "{e:?}");
    }
    assert!(!mitm.await.unwrap(), "the relay got a channel");

    // The attempts are on record: against Bob's record at Alice, in the unknown-peers bucket
    // at Bob (the attacker's device is new to Bob).
    let rec = alice.store().peer_by_label("bob").unwrap().unwrap();
    assert_eq!(rec.verify_failures, 1);
    assert!(rec.cache.verify_due);
    let policy = bob.settings().lockout;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(
        bob.store()
            .lock_state(&ANONYMOUS_PEER, now, &policy)
            .unwrap()
            .failures,
        1
    );
    // Bob's record of Alice is untouched by the attack.
    let alice_at_bob = bob.store().peer_by_zid(&alice.zid()).unwrap().unwrap();
    assert_eq!(
        (alice_at_bob.cache.sessions, alice_at_bob.verify_failures),
        (1, 0)
    );

    // And the real pair still works afterwards, continuing its key history.
    let (ca, cb) = tokio::join!(
        tcp::connect(&alice, bob_addr, "bob", &opts),
        bob_listener.accept()
    );
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    assert_eq!(ca.peer().session_number, 2);
    assert_eq!(cb.peer().session_number, 2);
    assert!(ca.peer().cache_matched);
}

async fn b_listener(dir: &TempDir, deadline_ms: u64) -> (Device, Device, Listener, SocketAddr) {
    let a = device(dir, "a", settings(None));
    let b = device(dir, "b", short_deadline(None, deadline_ms));
    let l = Listener::bind(&b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let addr = l.local_addr();
    (a, b, l, addr)
}

/// Reads until the server cuts the connection; returns how long that took.
async fn time_until_cut(mut s: TcpStream) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return t.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_are_cut_off_and_others_still_served() {
    let dir = TempDir::new().unwrap();
    let (a, _b, mut l, addr) = b_listener(&dir, 3_000).await;

    // A length far over the limit: refused at once, before any allocation.
    let mut evil = TcpStream::connect(addr).await.unwrap();
    evil.write_all(&[0xff, 0xff, 0xff, 0xf0, 0]).await.unwrap();
    let inc = l.next_incoming().await.unwrap();
    assert!(
        matches!(
            inc.result,
            Err(Error::Frame(FrameError::Oversized { len: 0xffff_fff0 }))
        ),
        "{:?}",
        inc.result
    );
    assert!(time_until_cut(evil).await < Duration::from_secs(1));

    // An unknown frame kind.
    let mut evil = TcpStream::connect(addr).await.unwrap();
    evil.write_all(&[0, 0, 0, 2, 7, 1, 2]).await.unwrap();
    let inc = l.next_incoming().await.unwrap();
    assert!(
        matches!(inc.result, Err(Error::Frame(FrameError::UnknownKind(7)))),
        "{:?}",
        inc.result
    );

    // A record before any handshake.
    let mut evil = TcpStream::connect(addr).await.unwrap();
    evil.write_all(&[0, 0, 0, 1, 1, 0x17]).await.unwrap();
    let inc = l.next_incoming().await.unwrap();
    assert!(matches!(
        inc.result,
        Err(Error::Frame(FrameError::Unexpected(_)))
    ));

    // A handshake frame holding garbage: the handshake fails with a parse error.
    let mut evil = TcpStream::connect(addr).await.unwrap();
    evil.write_all(&[0, 0, 0, 3, 0, 1, 2, 3]).await.unwrap();
    let inc = l.next_incoming().await.unwrap();
    assert!(
        matches!(
            inc.result,
            Err(Error::Handshake(keav_proto::Error::Parse(_)))
        ),
        "{:?}",
        inc.result
    );

    // The listener still serves honest callers.
    let opts = Options::default();
    let (ca, cb) = tokio::join!(tcp::connect(&a, addr, "b", &opts), l.accept());
    ca.unwrap();
    cb.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_is_cut_off_at_the_deadline_while_others_are_served() {
    let dir = TempDir::new().unwrap();
    let deadline = Duration::from_millis(1_200);
    let (a, _b, mut l, addr) = b_listener(&dir, deadline.as_millis() as u64).await;

    // One byte of a (legitimate-looking) 200-byte handshake frame every 100 ms.
    let loris = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = loris.into_split();
    let dripper = tokio::spawn(async move {
        let mut frame = vec![0, 0, 0, 200, 0];
        frame.extend_from_slice(&[0x50; 200]);
        for b in frame {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A half-open connection that sends nothing at all.
    let silent = TcpStream::connect(addr).await.unwrap();

    // Meanwhile an honest caller completes.
    let opts = Options::default();
    let (ca, cb) = tokio::join!(tcp::connect(&a, addr, "b", &opts), l.accept());
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    assert!(started.elapsed() < deadline, "honest caller was held up");
    ca.send(b"still here").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"still here");

    // Both slow connections end with a timeout at (about) the deadline.
    for _ in 0..2 {
        let inc = l.next_incoming().await.unwrap();
        assert!(
            matches!(inc.result, Err(Error::Timeout(_))),
            "{:?}",
            inc.result
        );
    }
    let cut = started.elapsed();
    assert!(cut >= deadline - Duration::from_millis(100), "{cut:?}");
    assert!(cut < deadline + Duration::from_secs(1), "{cut:?}");
    let mut buf = [0u8; 64];
    // The server closed the dripping connection (EOF or reset, possibly after an Error frame).
    let t = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(t.is_ok(), "slow-loris connection still open");
    assert!(time_until_cut(silent).await < Duration::from_secs(2));
    dripper.abort();
}

/// What the byte-level proxy does to the first record frame from the client.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    Nothing,
    FlipLastByte,
    Replay,
    DropConnectionAfterRecords(usize),
}

/// A TCP proxy that understands the framing and tampers with client→server records.
async fn tampering_proxy(server: SocketAddr, how: Tamper, seen: Arc<Mutex<Vec<u8>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let upstream = TcpStream::connect(server).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut ur, &mut cw).await;
        });
        let mut records = 0usize;
        loop {
            let mut header = [0u8; 5];
            if cr.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let mut payload = vec![0u8; len];
            if cr.read_exact(&mut payload).await.is_err() {
                return;
            }
            seen.lock().unwrap().extend_from_slice(&payload);
            if header[4] == 1 {
                records += 1;
                match how {
                    Tamper::FlipLastByte if records == 2 => {
                        let last = payload.len() - 1;
                        payload[last] ^= 0x01;
                    }
                    Tamper::Replay if records == 2 => {
                        uw.write_all(&header).await.unwrap();
                        uw.write_all(&payload).await.unwrap();
                    }
                    Tamper::DropConnectionAfterRecords(n) if records > n => {
                        return; // drops both directions' write side to the server
                    }
                    _ => {}
                }
            }
            if uw.write_all(&header).await.is_err() || uw.write_all(&payload).await.is_err() {
                return;
            }
        }
    });
    addr
}

async fn tamper_run(how: Tamper) -> (Vec<Vec<u8>>, Error) {
    let dir = TempDir::new().unwrap();
    let (a, _b, mut l, addr) = b_listener(&dir, 5_000).await;
    let proxy = tampering_proxy(addr, how, Arc::default()).await;
    let opts = Options::default();
    let (ca, cb) = tokio::join!(tcp::connect(&a, proxy, "b", &opts), l.accept());
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    for m in [&b"one"[..], b"two", b"three"] {
        ca.send(m).await.unwrap();
    }
    let mut delivered = Vec::new();
    let err = loop {
        match cb.recv().await {
            Ok(Some(d)) => delivered.push(d),
            Ok(None) => panic!("clean close after tampering"),
            Err(e) => break e,
        }
    };
    // The channel is dead afterwards.
    assert!(matches!(cb.recv().await, Err(Error::Closed)));
    (delivered, err)
}

#[tokio::test]
async fn tampered_record_is_fatal_and_never_delivered() {
    let (delivered, err) = tamper_run(Tamper::FlipLastByte).await;
    assert_eq!(delivered, vec![b"one".to_vec()]);
    assert!(matches!(err, Error::Record(_)), "{err:?}");
}

#[tokio::test]
async fn replayed_record_is_fatal_and_never_delivered() {
    let (delivered, err) = tamper_run(Tamper::Replay).await;
    assert_eq!(delivered, vec![b"one".to_vec(), b"two".to_vec()]);
    assert!(matches!(err, Error::Record(_)), "{err:?}");
}

#[tokio::test]
async fn truncation_without_close_is_reported() {
    let (delivered, err) = tamper_run(Tamper::DropConnectionAfterRecords(2)).await;
    assert_eq!(delivered, vec![b"one".to_vec(), b"two".to_vec()]);
    assert!(matches!(err, Error::Truncated), "{err:?}");
}

#[tokio::test]
async fn records_are_encrypted_on_the_wire() {
    let dir = TempDir::new().unwrap();
    let (a, _b, mut l, addr) = b_listener(&dir, 5_000).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let proxy = tampering_proxy(addr, Tamper::Nothing, seen.clone()).await;
    let opts = Options::default();
    let (ca, cb) = tokio::join!(tcp::connect(&a, proxy, "b", &opts), l.accept());
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    let marker = b"MARKER-0123456789-the quick brown fox jumps over the lazy dog";
    ca.send(marker).await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), marker);
    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > marker.len());
    assert!(!wire.windows(16).any(|w| w == &marker[..16]));
}
