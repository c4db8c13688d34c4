//! KEAV over a real NATS server (nats-server on 127.0.0.1:4222; each test prints a notice and
//! passes if nothing listens there): pairing and bulk exchange, what a subscriber to `keav.>`
//! sees, forged and replayed records, oversized and malformed payloads.

mod common;

use std::time::Duration;

use common::spy::{contains, count_records, listening, records_in, SpyLog};
use common::{device, settings};
use futures_util::StreamExt;
use keav_net::nats::{Link, LinkOptions};
use keav_net::session::{Channel, Options};
use keav_net::Error;
use keav_proto::cache::Verification;
use keav_proto::handshake::KeyAgreement;
use keav_proto::msg::Message;
use rand_core::{OsRng, RngCore};
use tempfile::TempDir;

const SERVER: &str = "127.0.0.1:4222";

fn server_up() -> bool {
    listening(SERVER, "NATS server")
}

/// Fresh device ids (random suffix) so parallel runs never collide.
fn ids(names: &[&str]) -> (String, Vec<String>) {
    let sfx = format!("{:016x}", OsRng.next_u64());
    let ids = names.iter().map(|n| format!("{n}-{sfx}")).collect();
    (sfx, ids)
}

/// A plain NATS client subscribed to `keav.>`: records every message and can publish anywhere
/// (the server has no permissions set here).
struct Eve {
    client: async_nats::Client,
    log: SpyLog,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Eve {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Eve {
    async fn start() -> Eve {
        let client = async_nats::connect(SERVER).await.unwrap();
        let mut sub = client.subscribe("keav.>").await.unwrap();
        let log = SpyLog::default();
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                l.push(m.subject.to_string(), m.payload.to_vec());
            }
        });
        Eve { client, log, task }
    }

    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        self.log.snapshot()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&[(String, Vec<u8>)]) -> bool) {
        self.log.wait_for(what, pred).await;
    }

    /// Publishes and waits until the server echoed it back to us (the server then handled it
    /// before anything published afterwards).
    async fn inject(&self, subject: &str, payload: Vec<u8>) {
        let before = self.log.count(subject, &payload);
        self.client
            .publish(subject.to_string(), payload.clone().into())
            .await
            .unwrap();
        let s = subject.to_string();
        self.wait_for("its own message", move |log| {
            log.iter()
                .filter(|(lt, lp)| *lt == s && *lp == payload)
                .count()
                > before
        })
        .await;
    }
}

fn body(from: &str, i: usize, sfx: &str) -> Vec<u8> {
    format!("secret reading {i:03} of {from} [{sfx}] ")
        .repeat(1 + i % 5)
        .into_bytes()
}

async fn link(id: &str) -> Link {
    Link::connect(SERVER, id, LinkOptions::default())
        .await
        .unwrap()
}

/// `la` calls `idb`, `lb` accepts: both channels.
async fn pair(
    (la, a): (&Link, &keav_net::device::Device),
    (lb, b): (&Link, &keav_net::device::Device),
) -> (Channel<Link>, Channel<Link>) {
    let o = Options::default();
    let (ca, cb) = tokio::join!(la.connect_peer(a, lb.device_id(), &o), lb.accept(b, &o));
    let (ca, (from, cb)) = (ca.unwrap(), cb.unwrap());
    assert_eq!(from, la.device_id());
    (ca, cb)
}

/// Sends `n` bodies from each side concurrently; each side must get exactly the other's.
async fn exchange(ca: Channel<Link>, cb: Channel<Link>, n: usize, sfx: &str) {
    let (a_tx, a_rx) = ca.split();
    let (b_tx, b_rx) = cb.split();
    let send = |mut tx: keav_net::session::SendHalf<Link>, who: &'static str| {
        let sfx = sfx.to_string();
        tokio::spawn(async move {
            for i in 0..n {
                tx.send(&body(who, i, &sfx)).await.unwrap();
            }
            tx
        })
    };
    let recv = |mut rx: keav_net::session::RecvHalf<Link>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..n {
                let d = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
                got.push(d.expect("a message went missing").unwrap().unwrap());
            }
            got.sort();
            (rx, got)
        })
    };
    let (sa, sb) = (send(a_tx, "a"), send(b_tx, "b"));
    let (ra, rb) = (recv(a_rx), recv(b_rx));
    let ((a_rx, got_a), (mut b_rx, got_b)) = (ra.await.unwrap(), rb.await.unwrap());
    let (mut a_tx, _b_tx) = (sa.await.unwrap(), sb.await.unwrap());
    for (got, who) in [(got_a, "b"), (got_b, "a")] {
        let mut want: Vec<Vec<u8>> = (0..n).map(|i| body(who, i, sfx)).collect();
        want.sort();
        assert!(got == want, "the bodies from {who} differ");
    }
    assert_eq!((a_rx.dropped_records(), b_rx.dropped_records()), (0, 0));
    a_tx.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), b_rx.recv()).await;
    assert!(matches!(end, Ok(Ok(None))), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_bulk_exchange_and_a_subscriber_sees_no_plaintext() {
    if !server_up() {
        return;
    }
    let (sfx, ids) = ids(&["a", "b"]);
    let code = format!("pairing-code-{sfx}");
    let eve = Eve::start().await;
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some(&code)));
    let b = device(&dir, "b", settings(Some(&code)));
    let (la, lb) = (link(&ids[0]).await, link(&ids[1]).await);
    assert_eq!(lb.device_id(), ids[1]);

    let (ca, cb) = pair((&la, &a), (&lb, &b)).await;
    assert_eq!((ca.peer().peer_zid, cb.peer().peer_zid), (b.zid(), a.zid()));
    assert_eq!(ca.peer().key_agreement, KeyAgreement::Dh);
    assert_eq!(ca.peer().verification, Verification::Bound);
    assert_eq!(cb.peer().verification, Verification::Bound);
    assert_eq!(ca.peer().sas, cb.peer().sas);
    assert_eq!(ca.peer().label.as_deref(), Some(ids[1].as_str()));
    const N: usize = 200;
    exchange(ca, cb, N, &sfx).await;

    // The subscriber to `keav.>` saw our two subjects, handshake messages and records only.
    let (ab, ba) = (
        format!("keav.v1.{}.from.{}", ids[1], ids[0]),
        format!("keav.v1.{}.from.{}", ids[0], ids[1]),
    );
    let kinds =
        |log: &[(String, Vec<u8>)], kind: u8| count_records(log, |s| s.contains(&sfx), kind);
    eve.wait_for("all records", |log| {
        kinds(log, 0x17) >= 2 * N && kinds(log, 0x15) == 1
    })
    .await;
    let log = eve.snapshot();
    let ours: Vec<_> = log.iter().filter(|(s, _)| s.contains(&sfx)).collect();
    assert!(ours.len() >= 6, "{} messages", ours.len());
    assert!(ours.iter().any(|(_, p)| p.starts_with(&[0x50, 0x5a])));
    assert_eq!(kinds(&log, 0x15), 1);
    for (s, p) in &ours {
        assert!(*s == ab || *s == ba, "unexpected subject {s}");
        assert!(matches!(p.first(), Some(0x50 | 0x17 | 0x15 | 0x42)), "{s}");
        if p.first() == Some(&0x42) {
            assert!(records_in(p).len() >= 2, "a malformed batch on {s}");
        }
        assert!(!contains(p, b"secret reading"), "plaintext on {s}");
        assert!(!contains(p, code.as_bytes()), "pairing code on {s}");
        assert!(!contains(p, sfx.as_bytes()), "suffix on {s}");
    }

    // A second session continues the key history.
    let (mut ca, mut cb) = pair((&la, &a), (&lb, &b)).await;
    for p in [ca.peer(), cb.peer()] {
        assert_eq!(p.session_number, 2);
        assert_eq!(p.key_agreement, KeyAgreement::Preshared);
    }
    cb.send(b"again").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_records_are_dropped_and_counted() {
    if !server_up() {
        return;
    }
    let (_, ids) = ids(&["a", "b"]);
    let eve = Eve::start().await;
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("2468")));
    let b = device(&dir, "b", settings(Some("2468")));
    let (la, lb) = (link(&ids[0]).await, link(&ids[1]).await);
    let (mut ca, mut cb) = pair((&la, &a), (&lb, &b)).await;

    ca.send(b"first").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"first");
    let victim = format!("keav.v1.{}.from.{}", ids[1], ids[0]);
    let find = |pred: &dyn Fn(&[u8]) -> bool| {
        eve.snapshot()
            .into_iter()
            .find(|(s, p)| *s == victim && pred(p))
            .map(|(_, p)| p)
    };
    let is_record = |p: &[u8]| p.first() == Some(&0x17);
    eve.wait_for("a record to b", |log| {
        log.iter().any(|(s, p)| *s == victim && is_record(p))
    })
    .await;
    let record = find(&is_record).unwrap();
    let hello = find(&|p| matches!(Message::parse(p), Ok(Message::Hello(_)))).unwrap();
    let (mut tag, mut inner) = (record.clone(), record.clone());
    *tag.last_mut().unwrap() ^= 0x01;
    let mid = inner.len() / 2;
    inner[mid] ^= 0x80;
    for p in [record, tag, inner, hello] {
        eve.inject(&victim, p).await;
    }

    ca.send(b"second").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"second");
    assert_eq!(cb.dropped_records(), 3);
    cb.send(b"reply").await.unwrap();
    assert_eq!(ca.recv().await.unwrap().unwrap(), b"reply");
    assert_eq!(ca.dropped_records(), 0);
    let s = lb.stats();
    assert_eq!((s.dropped_oversized, s.dropped_malformed), (0, 0), "{s:?}");
}

/// `n` small bodies sent back to back from `ca` to `cb` (which reads meanwhile); `cb` must
/// get them all, in order.
async fn burst(ca: &mut Channel<Link>, cb: &mut Channel<Link>, n: usize, tag: &str) {
    let want: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("{tag} {i:05}").into_bytes())
        .collect();
    let sending = async {
        for w in &want {
            ca.send(w).await.unwrap();
        }
    };
    let receiving = async {
        for (i, w) in want.iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(10), cb.recv())
                .await
                .unwrap_or_else(|_| panic!("{tag}: message {i} went missing"))
                .unwrap()
                .unwrap();
            assert_eq!(&got, w, "{tag}: message {i} out of order or damaged");
        }
    };
    tokio::join!(sending, receiving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_leaves_in_record_batches_unless_coalescing_is_off() {
    if !server_up() {
        return;
    }
    let (_, ids) = ids(&["a", "b", "c", "d"]);
    let eve = Eve::start().await;
    let dir = TempDir::new().unwrap();
    let dev: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| device(&dir, n, settings(Some("1357"))))
        .collect();
    const N: usize = 3000;

    // Coalescing (the default): the burst arrives whole and in order, and the subscriber
    // saw fewer messages than records, some of them batches.
    let (la, lb) = (link(&ids[0]).await, link(&ids[1]).await);
    let (mut ca, mut cb) = pair((&la, &dev[0]), (&lb, &dev[1])).await;
    burst(&mut ca, &mut cb, N, "coalesced").await;
    assert_eq!(cb.dropped_records(), 0);
    let to_b = format!("keav.v1.{}.from.{}", ids[1], ids[0]);
    let t = to_b.clone();
    eve.wait_for("every record to b", move |log| {
        count_records(log, |s| s == t, 0x17) >= N
    })
    .await;
    let log = eve.snapshot();
    let msgs: Vec<_> = log.iter().filter(|(s, _)| *s == to_b).collect();
    let batches = msgs
        .iter()
        .filter(|(_, p)| p.first() == Some(&0x42))
        .count();
    let records = count_records(&log, |s| s == to_b, 0x17);
    assert_eq!(records, N, "each record once");
    assert!(batches > 0, "no batch in {} messages", msgs.len());
    assert!(msgs.len() < N, "{} messages for {N} records", msgs.len());
    for (_, p) in msgs.iter().filter(|(_, p)| p.first() == Some(&0x42)) {
        assert!(p.len() <= keav_proto::record::batch::MAX_BATCH_LEN);
    }
    // A close after a burst comes after all of it.
    burst(&mut ca, &mut cb, 500, "before close").await;
    ca.close().await.unwrap();
    assert!(matches!(cb.recv().await, Ok(None)));

    // Coalescing off: one message per record, never a batch.
    let off = LinkOptions {
        coalesce_records: false,
        ..LinkOptions::default()
    };
    let lc = Link::connect(SERVER, &ids[2], off.clone()).await.unwrap();
    let ld = Link::connect(SERVER, &ids[3], off).await.unwrap();
    let (mut cc, mut cd) = pair((&lc, &dev[2]), (&ld, &dev[3])).await;
    burst(&mut cc, &mut cd, N, "one by one").await;
    let to_d = format!("keav.v1.{}.from.{}", ids[3], ids[2]);
    let t = to_d.clone();
    eve.wait_for("every record to d", move |log| {
        count_records(log, |s| s == t, 0x17) >= N
    })
    .await;
    let log = eve.snapshot();
    assert!(!log
        .iter()
        .any(|(s, p)| *s == to_d && p.first() == Some(&0x42)));
    assert_eq!(
        log.iter()
            .filter(|(s, p)| *s == to_d && p.first() == Some(&0x17))
            .count(),
        N
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_truncated_and_forged_batches_are_dropped_and_counted() {
    if !server_up() {
        return;
    }
    let (_, ids) = ids(&["a", "b"]);
    let eve = Eve::start().await;
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("8642")));
    let b = device(&dir, "b", settings(Some("8642")));
    let (la, lb) = (link(&ids[0]).await, link(&ids[1]).await);
    let (mut ca, mut cb) = pair((&la, &a), (&lb, &b)).await;
    let victim = format!("keav.v1.{}.from.{}", ids[1], ids[0]);
    // Bursts until the subscriber has seen a batch to b.
    let mut round = 0;
    let batch = loop {
        burst(&mut ca, &mut cb, 1000, &format!("round {round}")).await;
        let v = victim.clone();
        let found = eve
            .snapshot()
            .into_iter()
            .find(|(s, p)| *s == v && p.first() == Some(&0x42));
        if let Some((_, p)) = found {
            break p;
        }
        round += 1;
        assert!(round < 5, "no record batch after {round} bursts");
    };
    let k = records_in(&batch).len() as u64;
    assert!(k >= 2);
    let dropped0 = cb.dropped_records();

    // Replayed whole: every record in it is a replay (k dropped).
    eve.inject(&victim, batch.clone()).await;
    // Truncated, and with a length prefix that runs past the end: refused whole (1 each).
    eve.inject(&victim, batch[..batch.len() - 1].to_vec()).await;
    let mut long = batch.clone();
    long[1..3].copy_from_slice(&u16::MAX.to_be_bytes());
    eve.inject(&victim, long).await;
    // Its records reordered and one of them forged: all k refused (replays, a bad tag).
    let mut recs: Vec<Vec<u8>> = records_in(&batch).into_iter().map(<[u8]>::to_vec).collect();
    recs.reverse();
    *recs[0].last_mut().unwrap() ^= 1;
    let mut forged = vec![0x42];
    for r in &recs {
        forged.extend_from_slice(&(r.len() as u16).to_be_bytes());
        forged.extend_from_slice(r);
    }
    eve.inject(&victim, forged).await;

    // The channel goes on; nothing injected was delivered (the next message is the next one).
    ca.send(b"after the attack").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"after the attack");
    assert_eq!(cb.dropped_records() - dropped0, k + 2 + k);
    let s = lb.stats();
    assert_eq!((s.dropped_oversized, s.dropped_malformed), (0, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_payloads_are_counted() {
    if !server_up() {
        return;
    }
    let (_, ids) = ids(&["dev", "peer"]);
    let id = &ids[0];
    let eve = Eve::start().await;
    let opts = LinkOptions {
        max_payload: 32 * 1024,
        ..LinkOptions::default()
    };
    let l = Link::connect(SERVER, id, opts).await.unwrap();
    let inbox = format!("keav.v1.{id}.from.x");
    let mut oversized = vec![0x17u8; 40 * 1024];
    oversized[1] = 1;
    let cases: [(&str, Vec<u8>); 6] = [
        (&inbox, oversized),
        (&inbox, Vec::new()),
        (&inbox, b"\x99hello".to_vec()),
        (&format!("keav.v1.{id}.from.x.y"), vec![0x17; 40]),
        (&inbox, vec![0x17; 40]),
        (&inbox, b"\x50\x5anot a ZRTP message".to_vec()),
    ];
    for (s, p) in cases {
        eve.inject(s, p).await;
    }
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
    let lp = link(&ids[1]).await;
    let (mut ca, mut cb) = pair((&lp, &a), (&l, &b)).await;
    ca.send(b"still fine").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"still fine");
}

#[tokio::test]
async fn bad_ids_and_unreachable_server_fail_clearly() {
    for bad in ["", "a.b", "*", ">", "x y"] {
        let r = Link::connect(SERVER, bad, LinkOptions::default()).await;
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{bad:?}: {r:?}");
    }
    let r = Link::connect("no-port", "dev", LinkOptions::default()).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let r = Link::connect("127.0.0.1:1", "dev", LinkOptions::default()).await;
    assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
    if !server_up() {
        return;
    }
    let (_, ids) = ids(&["self"]);
    let l = link(&ids[0]).await;
    let dir = TempDir::new().unwrap();
    let d = device(&dir, "d", settings(None));
    let r = l.connect_peer(&d, &ids[0], &Options::default()).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let r = l.connect_peer(&d, "bad.peer", &Options::default()).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_calls_again_replaces_its_live_channel() {
    if !server_up() {
        return;
    }
    let (_, ids) = ids(&["a", "b"]);
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("1357")));
    let b = device(&dir, "b", settings(Some("1357")));
    let (la, lb) = (link(&ids[0]).await, link(&ids[1]).await);
    let (mut old_a, mut old_b) = pair((&la, &a), (&lb, &b)).await;
    old_a.send(b"one").await.unwrap();
    assert_eq!(old_b.recv().await.unwrap().unwrap(), b"one");

    let (mut ca, mut cb) = pair((&la, &a), (&lb, &b)).await;
    assert_eq!(cb.peer().session_number, 2);
    ca.send(b"two").await.unwrap();
    assert_eq!(cb.recv().await.unwrap().unwrap(), b"two");
    for old in [&mut old_a, &mut old_b] {
        let r = tokio::time::timeout(Duration::from_secs(5), old.recv()).await;
        assert!(matches!(r, Ok(Err(Error::Shutdown))), "{r:?}");
    }
    assert_eq!(lb.stats().dropped_busy, 0);
}
