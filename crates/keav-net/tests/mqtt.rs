//! KEAV over a real MQTT broker (Mosquitto on 127.0.0.1:1883; each test prints a notice and
//! passes if nothing listens there): pairing and bulk exchange, what an eavesdropper on the
//! broker sees, forged and replayed records, oversized and malformed payloads.

mod common;

use std::time::Duration;

use common::spy::{contains, count_records, listening, records_in, SpyLog};
use common::{device, settings};
use keav_net::mqtt::{Link, LinkOptions};
use keav_net::session::Options;
use keav_net::Error;
use keav_proto::cache::Verification;
use keav_proto::handshake::KeyAgreement;
use keav_proto::msg::Message;
use rand_core::{OsRng, RngCore};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tempfile::TempDir;

const BROKER: &str = "127.0.0.1:1883";

fn broker_up() -> bool {
    listening(BROKER, "MQTT broker")
}

/// A fresh suffix so parallel runs and leftover broker state never collide.
fn suffix() -> String {
    format!("{:016x}", OsRng.next_u64())
}

/// A plain MQTT client subscribed to `keav/#`: records every message, and can publish
/// anything anywhere (the broker has no ACLs here).
struct Eavesdropper {
    client: AsyncClient,
    log: SpyLog,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Eavesdropper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Eavesdropper {
    async fn start(sfx: &str) -> Eavesdropper {
        let mut mo = MqttOptions::new(format!("eve-{sfx}"), "127.0.0.1", 1883);
        mo.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = AsyncClient::new(mo, 64);
        client.subscribe("keav/#", QoS::AtLeastOnce).await.unwrap();
        let log = SpyLog::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let l = log.clone();
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        l.push(p.topic.clone(), p.payload.to_vec());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .unwrap()
            .unwrap();
        Eavesdropper { client, log, task }
    }

    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        self.log.snapshot()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&[(String, Vec<u8>)]) -> bool) {
        self.log.wait_for(what, pred).await;
    }

    /// Publishes and waits until the broker echoed it back (so it is queued for every
    /// subscriber before anything published afterwards).
    async fn inject(&self, topic: &str, payload: Vec<u8>) {
        let before = self.log.count(topic, &payload);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        let t = topic.to_string();
        self.wait_for("its own message", move |log| {
            log.iter()
                .filter(|(lt, lp)| *lt == t && *lp == payload)
                .count()
                > before
        })
        .await;
    }
}

fn body(from: &str, i: usize, sfx: &str) -> Vec<u8> {
    format!("confidential body {i:03} from {from} [{sfx}] ")
        .repeat(1 + i % 7)
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_over_broker_exchange_and_eavesdropper_sees_no_plaintext() {
    if !broker_up() {
        return;
    }
    let sfx = suffix();
    let code = format!("pairing-code-{sfx}");
    let (ida, idb) = (format!("a-{sfx}"), format!("b-{sfx}"));
    let eve = Eavesdropper::start(&sfx).await;
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some(&code)));
    let b = device(&dir, "b", settings(Some(&code)));
    let la = Link::connect(BROKER, &ida, LinkOptions::default())
        .await
        .unwrap();
    let lb = Link::connect(BROKER, &idb, LinkOptions::default())
        .await
        .unwrap();
    assert_eq!(la.device_id(), ida);
    let opts = Options::default();

    let (ca, cb) = tokio::join!(la.connect_peer(&a, &idb, &opts), lb.accept(&b, &opts));
    let (ca, (from, cb)) = (ca.unwrap(), cb.unwrap());
    assert_eq!(from, ida);
    assert_eq!(ca.peer().peer_zid, b.zid());
    assert_eq!(cb.peer().peer_zid, a.zid());
    assert_eq!(ca.peer().key_agreement, KeyAgreement::Dh);
    assert_eq!(ca.peer().verification, Verification::Bound);
    assert_eq!(cb.peer().verification, Verification::Bound);
    assert_eq!(ca.peer().sas, cb.peer().sas);
    assert_eq!(ca.peer().label.as_deref(), Some(idb.as_str()));
    assert_eq!(ca.peer().remote_addr, None);

    // 200 messages each way, concurrently.
    const N: usize = 200;
    let (mut a_tx, a_rx) = ca.split();
    let (mut b_tx, b_rx) = cb.split();
    let (s1, s2) = (sfx.clone(), sfx.clone());
    let send_ab = tokio::spawn(async move {
        for i in 0..N {
            a_tx.send(&body("a", i, &s1)).await.unwrap();
        }
        a_tx
    });
    let send_ba = tokio::spawn(async move {
        for i in 0..N {
            b_tx.send(&body("b", i, &s2)).await.unwrap();
        }
        b_tx
    });
    let recv = |mut rx: keav_net::session::RecvHalf<Link>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..N {
                let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("a message went missing")
                    .unwrap()
                    .unwrap();
                got.push(d);
            }
            (rx, got)
        })
    };
    let (rb, ra) = (recv(b_rx), recv(a_rx));
    let ((mut b_rx, mut got_b), (a_rx, mut got_a)) = (rb.await.unwrap(), ra.await.unwrap());
    let (mut a_tx, _b_tx) = (send_ab.await.unwrap(), send_ba.await.unwrap());
    let mut want_b: Vec<Vec<u8>> = (0..N).map(|i| body("a", i, &sfx)).collect();
    let mut want_a: Vec<Vec<u8>> = (0..N).map(|i| body("b", i, &sfx)).collect();
    for v in [&mut got_a, &mut got_b, &mut want_a, &mut want_b] {
        v.sort();
    }
    assert_eq!(got_b, want_b);
    assert_eq!(got_a, want_a);
    assert_eq!((a_rx.dropped_records(), b_rx.dropped_records()), (0, 0));
    a_tx.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), b_rx.recv())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop((a_tx, a_rx, b_rx));

    // What the broker (and any subscriber) saw: our two topics, only handshake packets and
    // records, never a message body or the pairing code.
    let (ab, ba) = (
        format!("keav/v1/{idb}/from/{ida}"),
        format!("keav/v1/{ida}/from/{idb}"),
    );
    let s = sfx.clone();
    eve.wait_for("all records", move |log| {
        count_records(log, |t| t.contains(&s), 0x17) >= 2 * N
    })
    .await;
    let log = eve.snapshot();
    let ours: Vec<_> = log.iter().filter(|(t, _)| t.contains(&sfx)).collect();
    assert!(ours.len() >= 6, "{} messages", ours.len());
    // Handshake messages travel bare (preamble 0x505a), records start with their type,
    // record batches (several records in one message) with 0x42 and hold only records.
    assert!(ours.iter().any(|(_, p)| p.starts_with(&[0x50, 0x5a])));
    for (t, p) in &ours {
        assert!(*t == ab || *t == ba, "unexpected topic {t}");
        assert!(matches!(p.first(), Some(0x50 | 0x17 | 0x15 | 0x42)), "{t}");
        if p.first() == Some(&0x42) {
            assert!(records_in(p).len() >= 2, "a malformed batch on {t}");
        }
        assert!(!contains(p, b"confidential body"), "plaintext on {t}");
        assert!(!contains(p, code.as_bytes()), "pairing code on {t}");
        assert!(
            !contains(p, sfx.as_bytes()),
            "suffix (in every body and the code) on {t}"
        );
    }

    // A second session over the broker continues the key history.
    let (ca, cb) = tokio::join!(la.connect_peer(&a, &idb, &opts), lb.accept(&b, &opts));
    let (mut ca, (_, mut cb)) = (ca.unwrap(), cb.unwrap());
    for p in [ca.peer(), cb.peer()] {
        assert_eq!(p.session_number, 2);
        assert_eq!(p.key_agreement, KeyAgreement::Preshared);
        assert_eq!(p.verification, Verification::Skipped);
    }
    cb.send(b"second session").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"second session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_records_are_dropped_and_the_channel_keeps_working() {
    if !broker_up() {
        return;
    }
    let sfx = suffix();
    let (ida, idb) = (format!("a-{sfx}"), format!("b-{sfx}"));
    let eve = Eavesdropper::start(&sfx).await;
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("4711")));
    let b = device(&dir, "b", settings(Some("4711")));
    let la = Link::connect(BROKER, &ida, LinkOptions::default())
        .await
        .unwrap();
    let lb = Link::connect(BROKER, &idb, LinkOptions::default())
        .await
        .unwrap();
    let opts = Options::default();
    let (ca, cb) = tokio::join!(la.connect_peer(&a, &idb, &opts), lb.accept(&b, &opts));
    let (mut ca, (_, mut cb)) = (ca.unwrap(), cb.unwrap());

    ca.send(b"first").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"first");
    let victim = format!("keav/v1/{idb}/from/{ida}");
    let v = victim.clone();
    eve.wait_for("a record to b", move |log| {
        log.iter().any(|(t, p)| *t == v && p.first() == Some(&0x17))
    })
    .await;
    let captured = eve
        .snapshot()
        .into_iter()
        .find(|(t, p)| *t == victim && p.first() == Some(&0x17))
        .unwrap()
        .1;
    let mut forged = captured.clone();
    *forged.last_mut().unwrap() ^= 0x01;
    let mut forged2 = captured.clone();
    let mid = forged2.len() / 2;
    forged2[mid] ^= 0x80;
    eve.inject(&victim, captured).await;
    eve.inject(&victim, forged).await;
    eve.inject(&victim, forged2).await;
    // A's Hello of this session, replayed: it starts nothing and breaks nothing.
    let hello = eve
        .snapshot()
        .into_iter()
        .find(|(t, p)| *t == victim && matches!(Message::parse(p), Ok(Message::Hello(_))))
        .expect("a Hello from a to b")
        .1;
    eve.inject(&victim, hello).await;

    // The replay and the forgeries reach b before a's next record (queued earlier at the
    // broker), are dropped, and the genuine record still opens.
    ca.send(b"second").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"second");
    assert_eq!(cb.dropped_records(), 3);
    cb.send(b"reply").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"reply");
    assert_eq!(ca.dropped_records(), 0);
    assert_eq!(
        lb.stats().dropped_oversized + lb.stats().dropped_malformed,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_malformed_and_unrouted_payloads_are_counted() {
    if !broker_up() {
        return;
    }
    let sfx = suffix();
    let id = format!("dev-{sfx}");
    let eve = Eavesdropper::start(&sfx).await;
    let opts = LinkOptions {
        max_payload: 32 * 1024,
        ..LinkOptions::default()
    };
    let l = Link::connect(BROKER, &id, opts).await.unwrap();
    let inbox = |from: &str| format!("keav/v1/{id}/from/{from}");
    let mut oversized = vec![0x17u8; 40 * 1024];
    oversized[1] = 1;
    eve.inject(&inbox("x"), oversized).await;
    eve.inject(&inbox("x"), Vec::new()).await;
    eve.inject(&inbox("x"), b"\x99hello".to_vec()).await;
    eve.inject(&format!("keav/v1/{id}/from/x/y"), vec![0x17; 40])
        .await;
    eve.inject(&inbox("x"), vec![0x17; 40]).await;
    eve.inject(&inbox("x"), b"\x50\x5anot a ZRTP message".to_vec())
        .await;
    for _ in 0..200 {
        if l.stats().received >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let s = l.stats();
    assert_eq!(s.received, 6, "{s:?}");
    assert_eq!(s.dropped_oversized, 1, "{s:?}");
    assert_eq!(s.dropped_malformed, 3, "{s:?}");
    assert_eq!(s.dropped_unrouted, 2, "{s:?}");
    assert_eq!(s.dropped_busy, 0, "{s:?}");

    // The link still serves a pairing afterwards.
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(None));
    let b = device(&dir, "b", settings(None));
    let la = Link::connect(BROKER, &format!("peer-{sfx}"), LinkOptions::default())
        .await
        .unwrap();
    let o = Options::default();
    let (ca, cb) = tokio::join!(la.connect_peer(&a, &id, &o), l.accept(&b, &o));
    let (mut ca, (_, mut cb)) = (ca.unwrap(), cb.unwrap());
    ca.send(b"still fine").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"still fine");
}

#[tokio::test]
async fn bad_ids_and_unreachable_broker_fail_clearly() {
    for bad in ["", "a/b", "#", "+", "x y"] {
        let r = Link::connect(BROKER, bad, LinkOptions::default()).await;
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{bad:?}: {r:?}");
    }
    let r = Link::connect("no-port", "dev", LinkOptions::default()).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let r = Link::connect("127.0.0.1:1", "dev", LinkOptions::default()).await;
    assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
    if !broker_up() {
        return;
    }
    let l = Link::connect(
        BROKER,
        &format!("self-{}", suffix()),
        LinkOptions::default(),
    )
    .await
    .unwrap();
    let dir = TempDir::new().unwrap();
    let d = device(&dir, "d", settings(None));
    let own = l.device_id().to_string();
    let r = l.connect_peer(&d, &own, &Options::default()).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let r = l.connect_peer(&d, "bad/peer", &Options::default()).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_starts_over_replaces_its_live_channel() {
    if !broker_up() {
        return;
    }
    let sfx = suffix();
    let (ida, idb) = (format!("a-{sfx}"), format!("b-{sfx}"));
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("0000")));
    let b = device(&dir, "b", settings(Some("0000")));
    let la = Link::connect(BROKER, &ida, LinkOptions::default())
        .await
        .unwrap();
    let lb = Link::connect(BROKER, &idb, LinkOptions::default())
        .await
        .unwrap();
    let opts = Options::default();
    let (ca, cb) = tokio::join!(la.connect_peer(&a, &idb, &opts), lb.accept(&b, &opts));
    let (mut old_a, (_, mut old_b)) = (ca.unwrap(), cb.unwrap());
    old_a.send(b"one").await.unwrap();
    assert_eq!(old_b.recv().await.unwrap().unwrap(), b"one");

    // a calls again while both old channels are alive (as after a restart of a).
    let (ca, cb) = tokio::join!(la.connect_peer(&a, &idb, &opts), lb.accept(&b, &opts));
    let (mut ca, (from, mut cb)) = (ca.unwrap(), cb.unwrap());
    assert_eq!(from, ida);
    assert_eq!(ca.peer().session_number, 2);
    assert_eq!(cb.peer().key_agreement, KeyAgreement::Preshared);
    ca.send(b"two").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"two");
    cb.send(b"back").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"back");
    // The replaced channels stop receiving.
    for old in [&mut old_a, &mut old_b] {
        let r = tokio::time::timeout(Duration::from_secs(5), old.recv())
            .await
            .unwrap();
        assert!(matches!(r, Err(Error::Shutdown)), "{r:?}");
    }
}
