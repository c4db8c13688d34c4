//! `keav_net::relay` against the local Mosquitto (127.0.0.1:1883) and nats-server
//! (127.0.0.1:4222), driven by fake devices that speak raw relay frames (the bodies are
//! syntactically valid durable payloads built by hand: the relay never opens them).
//!
//! Every wait is bounded (30 s) and fails with what was missing; nothing asserts on timing.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keav_net::broker::Mail;
use keav_net::relay::{Relay, RelayConfig, RelayStats, RouteRule};
use keav_net::{mqtt, nats};
use keav_proto::route::{EntryKey, Frame, RefuseReason, DEFAULT_HOPS};
use keav_store::mailbox::MailboxLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const MQTT: &str = "127.0.0.1:1883";
const NATS: &str = "127.0.0.1:4222";
const WAIT: Duration = Duration::from_secs(30);

/// A unique id for this run.
fn uid(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "rt-{name}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A syntactically valid durable data payload with sequence number `seq` (tag, stream, then
/// a record: type 0x17, epoch, seq, 32 bytes standing for ciphertext and tag).
fn payload(seq: u64) -> Vec<u8> {
    let mut p = vec![0x44, 1, 0x17];
    p.extend_from_slice(&((seq >> 8) as u32).to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..32u8).map(|i| i ^ seq as u8));
    p
}

fn fwd(src: &str, dst: &str, seq: u64) -> Frame {
    Frame::Forward {
        hops: DEFAULT_HOPS,
        src: src.into(),
        dst: dst.into(),
        body: payload(seq),
    }
}

fn stored(src: &str, dst: &str, seqs: Vec<u64>) -> Frame {
    Frame::Stored {
        src: src.into(),
        dst: dst.into(),
        stream: 1,
        seqs,
    }
}

fn key(src: &str, dst: &str, seq: u64) -> EntryKey {
    EntryKey {
        src: src.into(),
        dst: dst.into(),
        stream: 1,
        seq,
    }
}

fn relay_cfg(dir: &Path, id: &str, routes: &[&str]) -> RelayConfig {
    let mut c = RelayConfig::new(id, dir.join(format!("{id}.redb")));
    c.mqtt = Some((MQTT.into(), RelayConfig::link_options()));
    c.routes = routes.iter().map(|r| r.parse().unwrap()).collect();
    // Slow test machines: a device stays online for the whole test after one Pull.
    c.presence = Duration::from_secs(600);
    c
}

/// A fake device on a broker: publishes raw relay frames and reads what comes to its inbox.
struct Dev {
    id: String,
    link: Link,
    rx: mpsc::Receiver<Mail>,
}

enum Link {
    Mqtt(mqtt::Link),
    Nats(nats::Link),
}

impl Dev {
    async fn mqtt(name: &str) -> Dev {
        let id = uid(name);
        let link = mqtt::Link::connect(MQTT, &id, RelayConfig::link_options())
            .await
            .unwrap();
        let rx = link.take_mail().unwrap();
        Dev {
            id,
            link: Link::Mqtt(link),
            rx,
        }
    }

    async fn nats(name: &str) -> Dev {
        let id = uid(name);
        let link = nats::Link::connect(NATS, &id, RelayConfig::link_options())
            .await
            .unwrap();
        let rx = link.take_mail().unwrap();
        Dev {
            id,
            link: Link::Nats(link),
            rx,
        }
    }

    async fn send(&self, to: &str, f: &Frame) {
        self.send_raw(to, &f.encode()).await;
    }

    async fn send_raw(&self, to: &str, bytes: &[u8]) {
        match &self.link {
            Link::Mqtt(l) => l.publish(to, bytes).await.unwrap(),
            Link::Nats(l) => l.publish(to, bytes).await.unwrap(),
        };
    }

    /// The next frame, checking it comes from `from`.
    async fn recv(&mut self, from: &str) -> Frame {
        let m = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: nothing from {from} in {WAIT:?}", self.id))
            .expect("mail stream ended");
        assert_eq!(m.from, from, "frame from an unexpected sender");
        if let Some(a) = m.ack {
            a.ack().await.unwrap();
        }
        Frame::decode(&m.payload).unwrap()
    }

    /// Replies from the relay until every sequence number in `want` is acknowledged or
    /// refused; returns the acknowledged ones and the refusals.
    async fn replies(
        &mut self,
        relay: &str,
        want: &[u64],
    ) -> (BTreeSet<u64>, Vec<(RefuseReason, EntryKey)>) {
        let mut ok = BTreeSet::new();
        let mut refused = Vec::new();
        while !want
            .iter()
            .all(|s| ok.contains(s) || refused.iter().any(|(_, k): &(_, EntryKey)| k.seq == *s))
        {
            match self.recv(relay).await {
                Frame::Stored {
                    src, stream, seqs, ..
                } => {
                    assert_eq!((src.as_str(), stream), (self.id.as_str(), 1));
                    ok.extend(seqs);
                }
                Frame::Refused { reason, key } => refused.push((reason, key)),
                other => panic!("unexpected reply {other:?}"),
            }
        }
        (ok, refused)
    }

    /// Says it is online and takes `n` Forward frames from `relay`, in order of arrival.
    async fn pull(&mut self, relay: &str, window: u32, n: usize) -> Vec<Frame> {
        self.send(relay, &Frame::Pull { window }).await;
        self.take(relay, n).await
    }

    async fn take(&mut self, relay: &str, n: usize) -> Vec<Frame> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.recv(relay).await {
                f @ Frame::Forward { .. } => got.push(f),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        got
    }
}

/// Checks that `frames` are Forwards `src` -> `dst` with sequence numbers `seqs`, in order,
/// with `hops` left and the original bodies.
fn check_forwards(
    frames: &[Frame],
    src: &str,
    dst: &str,
    seqs: impl Iterator<Item = u64>,
    hops: u8,
) {
    let seqs: Vec<u64> = seqs.collect();
    assert_eq!(frames.len(), seqs.len());
    for (f, s) in frames.iter().zip(seqs) {
        assert_eq!(
            f,
            &Frame::Forward {
                hops,
                src: src.into(),
                dst: dst.into(),
                body: payload(s),
            }
        );
    }
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < until, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn entries(relay: &Relay, queue: &str) -> u64 {
    relay
        .queues()
        .unwrap()
        .iter()
        .find(|(q, _)| q == queue)
        .map_or(0, |(_, s)| s.entries)
}

/// Starts a relay, retrying while the mailbox of a dropped instance is still being closed.
async fn start_again(cfg: RelayConfig) -> Relay {
    let mut last = None;
    for _ in 0..200 {
        match Relay::start(cfg.clone()).await {
            Ok(r) => return r,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("relay did not start again: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_destination_gets_its_entries_in_order_after_pull_and_the_mailbox_empties() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let relay = Relay::start(relay_cfg(dir.path(), &rid, &["*=mqtt"]))
        .await
        .unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    let n = 50u64;
    for s in 0..n {
        a.send(&rid, &fwd(&a.id, &b.id, s)).await;
    }
    let (ok, refused) = a.replies(&rid, &(0..n).collect::<Vec<_>>()).await;
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(ok, (0..n).collect());
    assert_eq!(entries(&relay, &b.id), n);

    let got = b.pull(&rid, 256, n as usize).await;
    check_forwards(&got, &a.id, &b.id, 0..n, DEFAULT_HOPS - 1);
    b.send(&rid, &stored(&a.id, &b.id, (0..n).collect())).await;
    eventually("the mailbox is empty", || entries(&relay, &b.id) == 0).await;
    eventually("stats", || relay.stats().delivered == n).await;
    let st = relay.stats();
    assert_eq!(
        (
            st.received,
            st.stored,
            st.duplicates,
            st.refused,
            st.malformed
        ),
        (n, n, 0, 0, 0)
    );
    assert!(st.pushed >= n);
    assert!(relay.queues().unwrap().is_empty());
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_window_caps_the_push_and_acks_open_it() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = relay_cfg(dir.path(), &rid, &["*=mqtt"]);
    cfg.resend = Duration::from_secs(600);
    let relay = Relay::start(cfg).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    for s in 0..10 {
        a.send(&rid, &fwd(&a.id, &b.id, s)).await;
    }
    a.replies(&rid, &(0..10).collect::<Vec<_>>()).await;
    // Window 4: four frames, and the fifth only comes after an ack frees a slot.
    let got = b.pull(&rid, 4, 4).await;
    check_forwards(&got, &a.id, &b.id, 0..4, DEFAULT_HOPS - 1);
    // (A relay ignoring the window pushes all ten in the same loop as these four.)
    assert_eq!(relay.stats().pushed, 4);
    for s in 0..10u64 {
        if s + 4 < 10 {
            b.send(&rid, &stored(&a.id, &b.id, vec![s])).await;
            let next = b.take(&rid, 1).await;
            check_forwards(&next, &a.id, &b.id, s + 4..s + 5, DEFAULT_HOPS - 1);
        }
    }
    b.send(&rid, &stored(&a.id, &b.id, (6..10).collect())).await;
    eventually("the mailbox is empty", || entries(&relay, &b.id) == 0).await;
    // No resend happened (resend is 600 s): exactly one push per entry.
    assert_eq!(relay.stats().pushed, 10);
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_stored_once_and_acknowledged_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let relay = Relay::start(relay_cfg(dir.path(), &rid, &["*=mqtt"]))
        .await
        .unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    for s in [0, 0, 0, 1] {
        a.send(&rid, &fwd(&a.id, &b.id, s)).await;
    }
    let (ok, refused) = a.replies(&rid, &[0, 1]).await;
    assert!(refused.is_empty());
    assert_eq!(ok, [0, 1].into());
    assert_eq!(entries(&relay, &b.id), 2);
    // Once more, later: still acknowledged, still not stored again.
    a.send(&rid, &fwd(&a.id, &b.id, 0)).await;
    let (ok, _) = a.replies(&rid, &[0]).await;
    assert_eq!(ok, [0].into());
    let st = relay.stats();
    assert_eq!((st.received, st.stored, st.duplicates), (5, 2, 3));
    assert_eq!(entries(&relay, &b.id), 2);
    let got = b.pull(&rid, 256, 2).await;
    check_forwards(&got, &a.id, &b.id, 0..2, DEFAULT_HOPS - 1);
    b.send(&rid, &stored(&a.id, &b.id, vec![0, 1])).await;
    eventually("the mailbox is empty", || entries(&relay, &b.id) == 0).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses_new_entries_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = relay_cfg(dir.path(), &rid, &["*=mqtt"]);
    cfg.limits = MailboxLimits {
        max_entries: 5,
        max_bytes: 1 << 20,
    };
    let relay = Relay::start(cfg).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    for s in 0..8 {
        a.send(&rid, &fwd(&a.id, &b.id, s)).await;
    }
    let (ok, refused) = a.replies(&rid, &(0..8).collect::<Vec<_>>()).await;
    assert_eq!(ok, (0..5).collect());
    let want: Vec<_> = (5..8)
        .map(|s| (RefuseReason::MailboxFull, key(&a.id, &b.id, s)))
        .collect();
    assert_eq!(refused, want);
    assert_eq!(entries(&relay, &b.id), 5);
    assert_eq!(relay.stats().refused, 3);

    // The five stored ones all arrive; once they are acked there is room again.
    let got = b.pull(&rid, 256, 5).await;
    check_forwards(&got, &a.id, &b.id, 0..5, DEFAULT_HOPS - 1);
    b.send(&rid, &stored(&a.id, &b.id, (0..5).collect())).await;
    eventually("the mailbox is empty", || entries(&relay, &b.id) == 0).await;
    for s in 5..8 {
        a.send(&rid, &fwd(&a.id, &b.id, s)).await;
    }
    let (ok, refused) = a.replies(&rid, &[5, 6, 7]).await;
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(ok, (5..8).collect());
    let got = b.take(&rid, 3).await;
    check_forwards(&got, &a.id, &b.id, 5..8, DEFAULT_HOPS - 1);
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_entries_are_refused_with_the_reason_and_junk_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut a = Dev::mqtt("A").await;
    let b = uid("B");
    let c = uid("C");
    let relay = Relay::start(relay_cfg(dir.path(), &rid, &[&format!("{b}=mqtt")]))
        .await
        .unwrap();

    // No route to C; a relay is never a destination; hops ran out; not a durable payload.
    a.send(&rid, &fwd(&a.id, &c, 0)).await;
    a.send(&rid, &fwd(&a.id, &rid, 1)).await;
    let mut spent = fwd(&a.id, &b, 2);
    if let Frame::Forward { hops, .. } = &mut spent {
        *hops = 0;
    }
    a.send(&rid, &spent).await;
    let bad = Frame::Forward {
        hops: DEFAULT_HOPS,
        src: a.id.clone(),
        dst: b.clone(),
        body: b"not a durable payload".to_vec(),
    };
    a.send(&rid, &bad).await;
    // Wrong tag, otherwise shaped like a payload: the refusal names its stream and sequence.
    let mut wrong_tag = payload(9);
    wrong_tag[0] = 0x45;
    let bad2 = Frame::Forward {
        hops: DEFAULT_HOPS,
        src: a.id.clone(),
        dst: b.clone(),
        body: wrong_tag,
    };
    a.send(&rid, &bad2).await;
    // Junk: a truncated frame, an Attach over MQTT, a Pull cut short.
    a.send_raw(&rid, &[0x52, 1]).await;
    a.send(&rid, &Frame::Attach { id: a.id.clone() }).await;
    a.send_raw(&rid, &[0x52, 1, 3, 0]).await;
    // A good one last: once it is acknowledged, everything before it was processed.
    a.send(&rid, &fwd(&a.id, &b, 3)).await;

    let mut refused = Vec::new();
    loop {
        match a.recv(&rid).await {
            Frame::Refused { reason, key } => refused.push((reason, key)),
            Frame::Stored { seqs, .. } if seqs == [3] => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        refused,
        vec![
            (RefuseReason::NoRoute, key(&a.id, &c, 0)),
            (RefuseReason::NoRoute, key(&a.id, &rid, 1)),
            (RefuseReason::HopLimit, key(&a.id, &b, 2)),
            (
                RefuseReason::BadBody,
                // "not a durable payload": no valid stream byte, so data and 0.
                key(&a.id, &b, 0)
            ),
            (RefuseReason::BadBody, key(&a.id, &b, 9)),
        ]
    );
    let st = relay.stats();
    assert_eq!(
        st,
        RelayStats {
            received: 6,
            stored: 1,
            duplicates: 0,
            refused: 5,
            pushed: 0,
            delivered: 0,
            malformed: 3,
            later: 0,
            needs: 0,
            needs_forwarded: 0,
        }
    );
    let q = relay.queues().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].0.as_str(), q[0].1.entries), (b.as_str(), 1));
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_chained_mqtt_tcp_mqtt_deliver_to_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (uid("R1"), uid("R2"));
    let mut c2 = relay_cfg(dir.path(), &r2, &["*=mqtt"]);
    c2.tcp_listen = Some("127.0.0.1:0".parse().unwrap());
    let relay2 = Relay::start(c2).await.unwrap();
    let port = relay2.tcp_addr().unwrap().port();
    let route = format!("*=tcp:127.0.0.1:{port}/{r2}");
    let relay1 = Relay::start(relay_cfg(dir.path(), &r1, &[&route]))
        .await
        .unwrap();

    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    let n = 100u64;
    for s in 0..n {
        a.send(&r1, &fwd(&a.id, &b.id, s)).await;
    }
    let (ok, refused) = a.replies(&r1, &(0..n).collect::<Vec<_>>()).await;
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(ok.len() as u64, n);
    // R2 takes custody from R1 over TCP, so R1's queue for R2 empties without B.
    eventually("R1 handed everything to R2", || entries(&relay1, &r2) == 0).await;
    assert_eq!(entries(&relay2, &b.id), n);
    eventually("R1 counted the hand-over", || relay1.stats().delivered == n).await;

    let got = b.pull(&r2, 256, n as usize).await;
    check_forwards(&got, &a.id, &b.id, 0..n, DEFAULT_HOPS - 2);
    b.send(&r2, &stored(&a.id, &b.id, (0..n).collect())).await;
    eventually("R2's mailbox is empty", || entries(&relay2, &b.id) == 0).await;
    assert_eq!(relay2.stats().stored, n);
    relay1.shutdown().await.unwrap();
    relay2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_resumes_from_its_mailbox_and_pushes_unacked_entries_again() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = relay_cfg(dir.path(), &rid, &["*=mqtt"]);
    cfg.resend = Duration::from_secs(600);
    let relay = Relay::start(cfg.clone()).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    for s in 0..20 {
        a.send(&rid, &fwd(&a.id, &b.id, s)).await;
    }
    a.replies(&rid, &(0..20).collect::<Vec<_>>()).await;
    relay.shutdown().await.unwrap();

    // Graceful restart: everything is still there.
    let relay = Relay::start(cfg.clone()).await.unwrap();
    assert_eq!(entries(&relay, &b.id), 20);
    let got = b.pull(&rid, 256, 20).await;
    check_forwards(&got, &a.id, &b.id, 0..20, DEFAULT_HOPS - 1);
    // B acks only the first 5, then the relay is dropped without a shutdown.
    b.send(&rid, &stored(&a.id, &b.id, (0..5).collect())).await;
    eventually("the first acks are applied", || {
        entries(&relay, &b.id) == 15
    })
    .await;
    drop(relay);

    // The unacknowledged 15 are pushed again after the restart.
    let relay = start_again(cfg.clone()).await;
    assert_eq!(entries(&relay, &b.id), 15);
    let got = b.pull(&rid, 256, 15).await;
    check_forwards(&got, &a.id, &b.id, 5..20, DEFAULT_HOPS - 1);
    b.send(&rid, &stored(&a.id, &b.id, (5..20).collect())).await;
    eventually("the mailbox is empty", || entries(&relay, &b.id) == 0).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_queues_on_mqtt_are_pushed_again_after_a_restart() {
    // R1 -> R2 over MQTT; R2 is down while R1 takes the entries, and R1 restarts before R2
    // comes up: R1 pushes from its mailbox once R2 acks.
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (uid("R1"), uid("R2"));
    let mut c1 = relay_cfg(dir.path(), &r1, &[&format!("*=mqtt:{r2}")]);
    c1.resend = Duration::from_millis(200);
    let relay1 = Relay::start(c1.clone()).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    for s in 0..10 {
        a.send(&r1, &fwd(&a.id, &b.id, s)).await;
    }
    a.replies(&r1, &(0..10).collect::<Vec<_>>()).await;
    relay1.shutdown().await.unwrap();
    let relay1 = Relay::start(c1).await.unwrap();
    let relay2 = Relay::start(relay_cfg(dir.path(), &r2, &["*=mqtt"]))
        .await
        .unwrap();
    eventually("R1 handed everything to R2", || entries(&relay1, &r2) == 0).await;
    // Pushes over MQTT while R2 was subscribing may have landed in any order: R2 keeps its
    // arrival order, and ordering is the receiving device's job.
    let mut got = b.pull(&r2, 256, 10).await;
    got.sort_by_key(|f| Frame::entry_key(f).map(|k| k.seq));
    check_forwards(&got, &a.id, &b.id, 0..10, DEFAULT_HOPS - 2);
    relay1.shutdown().await.unwrap();
    relay2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_devices_through_a_relay() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = RelayConfig::new(&rid, dir.path().join("r.redb"));
    cfg.nats = Some((NATS.into(), RelayConfig::link_options()));
    cfg.routes = vec!["*=nats".parse().unwrap()];
    let relay = Relay::start(cfg).await.unwrap();
    let mut a = Dev::nats("A").await;
    let mut b = Dev::nats("B").await;
    for s in 0..30 {
        a.send(&rid, &fwd(&a.id, &b.id, s)).await;
    }
    let (ok, _) = a.replies(&rid, &(0..30).collect::<Vec<_>>()).await;
    assert_eq!(ok, (0..30).collect());
    let got = b.pull(&rid, 256, 30).await;
    check_forwards(&got, &a.id, &b.id, 0..30, DEFAULT_HOPS - 1);
    b.send(&rid, &stored(&a.id, &b.id, (0..30).collect())).await;
    eventually("the mailbox is empty", || entries(&relay, &b.id) == 0).await;
    relay.shutdown().await.unwrap();
}

// --- Flow control: Later and Need ---

fn later(src: &str, dst: &str, seq: u64) -> Frame {
    Frame::Refused {
        reason: RefuseReason::Later,
        key: key(src, dst, seq),
    }
}

fn need(src: &str, dst: &str, seq: u64) -> Frame {
    Frame::Need {
        src: src.into(),
        dst: dst.into(),
        stream: 1,
        seq,
    }
}

fn seq_of(f: &Frame) -> u64 {
    f.entry_key()
        .expect("a Forward frame with a durable payload")
        .seq
}

/// `a` stores `seqs` (in this order) at the relay and waits for their custody acks.
async fn store(a: &mut Dev, rid: &str, dst: &str, seqs: &[u64]) {
    for &s in seqs {
        a.send(rid, &fwd(&a.id, dst, s)).await;
    }
    let (ok, refused) = a.replies(rid, seqs).await;
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(ok, seqs.iter().copied().collect());
}

/// A fake receiving device with a reorder window of `window` messages, like a messenger: it
/// holds what fits (and releases in order), answers `Stored` for what it took or already
/// had and `Later` for what is beyond its window, and after each batch with a deferral or a
/// gap sends one `Need` for its next missing message (once per missing message). Runs until
/// it released `0..n`; returns the frames it got (sequence numbers, in arrival order).
async fn drain_as_device(b: &mut Dev, rid: &str, src: &str, n: u64, window: u64) -> Vec<u64> {
    let mut next = 0u64;
    let mut held = BTreeSet::new();
    let mut got = Vec::new();
    let mut asked = None;
    while next < n {
        // One batch: the first frame, then whatever else is there already.
        let mut frames = vec![b.recv(rid).await];
        while let Ok(m) = b.rx.try_recv() {
            assert_eq!(m.from, rid);
            frames.push(Frame::decode(&m.payload).unwrap());
        }
        let (mut took, mut deferred) = (Vec::new(), Vec::new());
        for f in frames {
            assert!(matches!(f, Frame::Forward { .. }), "unexpected {f:?}");
            let s = seq_of(&f);
            got.push(s);
            if s < next || held.contains(&s) {
                took.push(s);
            } else if s < next + window {
                held.insert(s);
                took.push(s);
                while held.remove(&next) {
                    next += 1;
                }
            } else {
                deferred.push(s);
            }
        }
        if !took.is_empty() {
            b.send(rid, &stored(src, &b.id, took)).await;
        }
        for &s in &deferred {
            b.send(rid, &later(src, &b.id, s)).await;
        }
        let gap = held.iter().any(|&s| s > next);
        if (gap || !deferred.is_empty()) && asked != Some(next) && next < n {
            asked = Some(next);
            b.send(rid, &need(src, &b.id, next)).await;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_pauses_the_queue_and_need_pushes_the_entry_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = relay_cfg(dir.path(), &rid, &["*=mqtt"]);
    // No timer-driven push during the test: only the frames below move the queue.
    cfg.resend = Duration::from_secs(600);
    let relay = Relay::start(cfg).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    store(&mut a, &rid, &b.id, &(0..100).collect::<Vec<_>>()).await;

    let got = b.pull(&rid, 16, 16).await;
    check_forwards(&got, &a.id, &b.id, 0..16, DEFAULT_HOPS - 1);
    // The device cannot take any of them now.
    for s in 0..16 {
        b.send(&rid, &later(&a.id, &b.id, s)).await;
    }
    eventually("the Later answers are counted", || {
        relay.stats().later == 16
    })
    .await;
    // Paused: nothing more is pushed (the window is empty, and the queue holds 100). The
    // Need for 0 pushes 0 and the entries after it, at once, whatever the pause: the next
    // frames are those (a relay that kept pushing would have sent 16.. first).
    b.send(&rid, &need(&a.id, &b.id, 0)).await;
    let got = b.take(&rid, 16).await;
    check_forwards(&got, &a.id, &b.id, 0..16, DEFAULT_HOPS - 1);
    let st = relay.stats();
    assert_eq!(
        (st.pushed, st.needs, st.needs_forwarded),
        (32, 1, 0),
        "{st:?}"
    );

    // The device takes 0..8 and puts 8..16 off: once the Later answers are in, custody of
    // 0..8 is progress, and the push starts again at the earliest entry put off.
    for s in 8..16 {
        b.send(&rid, &later(&a.id, &b.id, s)).await;
    }
    eventually("the second Later answers are counted", || {
        relay.stats().later == 24
    })
    .await;
    b.send(&rid, &stored(&a.id, &b.id, (0..8).collect())).await;
    let got = b.take(&rid, 16).await;
    check_forwards(&got, &a.id, &b.id, 8..24, DEFAULT_HOPS - 1);
    eventually("the acked entries left the mailbox", || {
        entries(&relay, &b.id) == 92
    })
    .await;
    assert_eq!(relay.stats().pushed, 48);
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_is_pushed_again_after_resend() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = relay_cfg(dir.path(), &rid, &["*=mqtt"]);
    cfg.resend = Duration::from_millis(300);
    let relay = Relay::start(cfg).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    store(&mut a, &rid, &b.id, &(0..40).collect::<Vec<_>>()).await;
    let got = b.pull(&rid, 8, 8).await;
    check_forwards(&got, &a.id, &b.id, 0..8, DEFAULT_HOPS - 1);
    for s in 0..8 {
        b.send(&rid, &later(&a.id, &b.id, s)).await;
    }
    // Without any progress the relay tries again once `resend` passed, from the same entry.
    let got = b.take(&rid, 8).await;
    check_forwards(&got, &a.id, &b.id, 0..8, DEFAULT_HOPS - 1);
    b.send(&rid, &stored(&a.id, &b.id, (0..8).collect())).await;
    let got = b.take(&rid, 8).await;
    check_forwards(&got, &a.id, &b.id, 8..16, DEFAULT_HOPS - 1);
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_small_window_drains_a_queue_whose_first_entry_came_last() {
    // Arrival order 1..n, then 0 (a resend that landed at the tail). The device's reorder
    // window (32) is smaller than the relay's push window (64): it defers, the relay pauses
    // instead of pushing the queue again and again, and the Need for 0 reaches past the
    // window to the tail.
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = relay_cfg(dir.path(), &rid, &["*=mqtt"]);
    cfg.resend = Duration::from_secs(600);
    let relay = Relay::start(cfg).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    let n = 600u64;
    let mut order: Vec<u64> = (1..n).collect();
    order.push(0);
    store(&mut a, &rid, &b.id, &order).await;

    b.send(&rid, &Frame::Pull { window: 64 }).await;
    let aid = a.id.clone();
    let got = drain_as_device(&mut b, &rid, &aid, n, 32).await;
    eventually("the mailbox is empty", || entries(&relay, &b.id) == 0).await;
    // The relay counts a removal once its commit is done, just after the mailbox shows it.
    eventually("every entry is counted as delivered", || {
        relay.stats().delivered == n
    })
    .await;
    // Frames pushed before the last acks landed may still be on their way through the broker:
    // every frame the relay counts as pushed reaches the device, and no other.
    let mut frames = got.len() as u64;
    eventually("every pushed frame reached the device", || {
        while b.rx.try_recv().is_ok() {
            frames += 1;
        }
        relay.stats().pushed == frames
    })
    .await;
    let st = relay.stats();
    eprintln!("{st:?}; the device got {frames} frames for {n} entries");
    assert!(st.later > 0 && st.needs > 0, "{st:?}");
    assert_eq!(st.needs_forwarded, 0, "{st:?}");
    assert_eq!(st.delivered, n);
    // Bounded work: every entry pushed about once, plus at most a few windows put off.
    assert!(st.pushed <= n + 4 * 64, "{st:?}");
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_need_for_a_missing_entry_reaches_its_sender_and_the_resend_is_pushed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let rid = uid("R");
    let mut cfg = relay_cfg(dir.path(), &rid, &["*=mqtt"]);
    cfg.resend = Duration::from_secs(600);
    let relay = Relay::start(cfg).await.unwrap();
    let mut a = Dev::mqtt("A").await;
    let mut b = Dev::mqtt("B").await;
    let n = 60u64;
    // Entry 10 never reached the relay (it was down when the sender transmitted it).
    let without: Vec<u64> = (0..n).filter(|&s| s != 10).collect();
    store(&mut a, &rid, &b.id, &without).await;

    b.send(&rid, &Frame::Pull { window: 64 }).await;
    let (aid, bid, r) = (a.id.clone(), b.id.clone(), rid.clone());
    let drain = tokio::spawn(async move {
        let got = drain_as_device(&mut b, &r, &aid, n, 32).await;
        (b, got)
    });
    // The sender hears that its peer needs 10, and resends it.
    match a.recv(&rid).await {
        Frame::Need {
            src,
            dst,
            stream,
            seq,
        } => assert_eq!((src, dst, stream, seq), (a.id.clone(), bid.clone(), 1, 10)),
        other => panic!("unexpected {other:?}"),
    }
    a.send(&rid, &fwd(&a.id, &bid, 10)).await;
    let (_b, got) = tokio::time::timeout(WAIT, drain)
        .await
        .expect("the device never got every entry")
        .unwrap();
    // 10 came once, right after it was stored (the queue was paused and its window full).
    assert_eq!(got.iter().filter(|&&s| s == 10).count(), 1);
    eventually("the mailbox is empty", || entries(&relay, &bid) == 0).await;
    let st = relay.stats();
    eprintln!("{st:?}");
    assert!(
        st.needs >= 1 && st.needs_forwarded >= 1 && st.later > 0,
        "{st:?}"
    );
    relay.shutdown().await.unwrap();
}

// --- TCP ---

async fn tcp_send(s: &mut TcpStream, f: &Frame) {
    tcp_send_raw(s, &f.encode()).await;
}

async fn tcp_send_raw(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(&(bytes.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
}

/// The next frame, or `None` when the relay closed the connection.
async fn tcp_recv(s: &mut TcpStream) -> Option<Frame> {
    let read = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.ok()?;
        Some(Frame::decode(&buf).unwrap())
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("nothing on TCP")
}

async fn attach(addr: std::net::SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    tcp_send(&mut s, &Frame::Attach { id: id.into() }).await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_devices_attach_forward_pull_and_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new("R", dir.path().join("r.redb"));
    cfg.tcp_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.routes = vec!["*=tcp".parse().unwrap()];
    let relay = Relay::start(cfg).await.unwrap();
    let addr = relay.tcp_addr().unwrap();

    let mut a = attach(addr, "A").await;
    for s in 0..20 {
        tcp_send(&mut a, &fwd("A", "B", s)).await;
    }
    let mut ok = BTreeSet::new();
    while ok.len() < 20 {
        match tcp_recv(&mut a).await {
            Some(Frame::Stored { seqs, .. }) => ok.extend(seqs),
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut b = attach(addr, "B").await;
    tcp_send(&mut b, &Frame::Pull { window: 64 }).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(tcp_recv(&mut b).await.unwrap());
    }
    check_forwards(&got, "A", "B", 0..20, DEFAULT_HOPS - 1);
    tcp_send(&mut b, &stored("A", "B", (0..20).collect())).await;
    eventually("the mailbox is empty", || entries(&relay, "B") == 0).await;

    // A first frame that is not Attach, an oversized length, an empty frame, a bad id:
    // the connection is closed.
    let mut bad = TcpStream::connect(addr).await.unwrap();
    tcp_send(&mut bad, &Frame::Pull { window: 1 }).await;
    assert_eq!(tcp_recv(&mut bad).await, None);
    let mut bad = TcpStream::connect(addr).await.unwrap();
    bad.write_all(&(80u32 * 1024).to_be_bytes()).await.unwrap();
    assert_eq!(tcp_recv(&mut bad).await, None);
    let mut bad = TcpStream::connect(addr).await.unwrap();
    bad.write_all(&0u32.to_be_bytes()).await.unwrap();
    assert_eq!(tcp_recv(&mut bad).await, None);
    let mut bad = attach(addr, "B").await;
    bad.write_all(&(80u32 * 1024).to_be_bytes()).await.unwrap();
    assert_eq!(tcp_recv(&mut bad).await, None);
    // The relay still serves the others.
    tcp_send(&mut a, &fwd("A", "B", 20)).await;
    assert_eq!(tcp_recv(&mut a).await, Some(stored("A", "B", vec![20])));
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_device_reconnecting_gets_its_in_flight_entries_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new("R", dir.path().join("r.redb"));
    cfg.tcp_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.routes = vec!["*=tcp".parse().unwrap()];
    cfg.resend = Duration::from_secs(600);
    let relay = Relay::start(cfg).await.unwrap();
    let addr = relay.tcp_addr().unwrap();
    let mut a = attach(addr, "A").await;
    for s in 0..5 {
        tcp_send(&mut a, &fwd("A", "B", s)).await;
    }
    let mut ok = BTreeSet::new();
    while ok.len() < 5 {
        if let Some(Frame::Stored { seqs, .. }) = tcp_recv(&mut a).await {
            ok.extend(seqs);
        }
    }
    let mut b = attach(addr, "B").await;
    tcp_send(&mut b, &Frame::Pull { window: 64 }).await;
    for _ in 0..5 {
        tcp_recv(&mut b).await.unwrap();
    }
    drop(b);
    // A new connection (B restarted and lost what it had not committed).
    let mut b = attach(addr, "B").await;
    tcp_send(&mut b, &Frame::Pull { window: 64 }).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(tcp_recv(&mut b).await.unwrap());
    }
    check_forwards(&got, "A", "B", 0..5, DEFAULT_HOPS - 1);
    relay.shutdown().await.unwrap();
}

#[test]
fn route_rules_from_the_command_line() {
    let r: RouteRule = "*=tcp:127.0.0.1:7000/R2".parse().unwrap();
    assert_eq!(r.to_string(), "*=tcp:127.0.0.1:7000/R2");
    assert!("*=tcp:127.0.0.1:7000".parse::<RouteRule>().is_err());
}
