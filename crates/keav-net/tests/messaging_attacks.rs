//! Attacks on durable messaging (docs/MESSAGING.md, issue 5) over real brokers: Mosquitto on
//! 127.0.0.1:1883 and nats-server on 127.0.0.1:4222 (a test prints a notice and passes if its
//! broker is not there).
//!
//! - a misbehaving relay (drops, duplicates, holds back, delays, replays, lies about custody):
//!   every message still arrives exactly once, in order;
//! - a broker-wide eavesdropper (`#` on MQTT, `>` on NATS): no message body, no pairing code
//!   and no window of the persisted key state in anything the broker carried;
//! - forged and replayed payloads and relay frames injected on a receiver's topics: counted
//!   and dropped, nothing extra reaches the application, the channel keeps working;
//! - a relay whose mailbox is full refuses, and nothing is lost.

#[path = "common/broker_spy.rs"]
mod broker_spy;
#[path = "common/chaos_relay.rs"]
mod chaos_relay;
mod common;

use std::sync::Arc;
use std::time::Duration;

use broker_spy::{find_window, secret_windows, MqttSpy, NatsSpy, WINDOW};
use chaos_relay::{Chaos, ChaosRelay};
use common::spy::{contains, listening, Entry, SpyLog};
use common::{device, settings};
use keav_net::broker::LinkOptions;
use keav_net::device::Device;
use keav_net::messenger::{Carrier, Delivery, Messenger, MessengerOptions, MessengerStats};
use keav_net::relay::{NextHop, Relay, RelayConfig, RouteRule};
use keav_net::{mqtt, nats};
use keav_proto::route::{Frame, DEFAULT_HOPS};
use keav_store::mailbox::MailboxLimits;
use rand_core::{OsRng, RngCore};
use tempfile::TempDir;

const MQTT: &str = "127.0.0.1:1883";
const NATS: &str = "127.0.0.1:4222";

/// Bound of every single wait for one message, flush or pairing.
const WAIT: Duration = Duration::from_secs(60);

fn suffix() -> String {
    format!("{:016x}", OsRng.next_u64())
}

/// Short resend and custody timers so that lost records come back within seconds.
fn fast_opts(delivery: Delivery) -> MessengerOptions {
    let mut o = MessengerOptions {
        delivery,
        pull_interval: Duration::from_millis(300),
        ..MessengerOptions::default()
    };
    o.durable.outbox.rto_initial_ms = 300;
    o.durable.outbox.rto_max_ms = 1_000;
    o.durable.custody_ms = 1_500;
    o
}

async fn mqtt_carrier(id: &str) -> Carrier {
    let l = tokio::time::timeout(WAIT, mqtt::Link::connect(MQTT, id, LinkOptions::default()))
        .await
        .expect("MQTT connect timed out")
        .unwrap();
    Carrier::Mqtt(Arc::new(l))
}

async fn nats_carrier(id: &str) -> Carrier {
    let l = tokio::time::timeout(WAIT, nats::Link::connect(NATS, id, LinkOptions::default()))
        .await
        .expect("NATS connect timed out")
        .unwrap();
    Carrier::Nats(Arc::new(l))
}

async fn start(dev: &Device, carrier: Carrier, o: &MessengerOptions) -> Messenger {
    tokio::time::timeout(WAIT, Messenger::start(dev.clone(), carrier, o.clone()))
        .await
        .expect("Messenger::start timed out")
        .unwrap()
}

/// `a` (device `da`, id `ida`) pairs with `b` (`db`, `idb`); checks the verified identities.
async fn pair(
    (a, da, ida): (&Messenger, &Device, &str),
    (b, db, idb): (&Messenger, &Device, &str),
) {
    let (za, rb) = tokio::time::timeout(WAIT, async { tokio::join!(a.pair(idb), b.accept_pair()) })
        .await
        .expect("pairing timed out");
    let (zb_seen, (from, za_seen)) = (za.unwrap(), rb.unwrap());
    assert_eq!(from, ida);
    assert_eq!(zb_seen, db.zid());
    assert_eq!(za_seen, da.zid());
    assert!(a.peers().contains(&idb.to_string()));
    assert!(b.peers().contains(&ida.to_string()));
}

/// A distinctive message body: `tok` marks every body (the eavesdropper looks for it).
fn body(from: &str, i: usize, tok: &str) -> Vec<u8> {
    format!("heart-rate reading {i:04} from {from} <{tok}> ")
        .repeat(1 + i % 4)
        .into_bytes()
}

fn bodies(from: &str, n: usize, tok: &str) -> Vec<Vec<u8>> {
    (0..n).map(|i| body(from, i, tok)).collect()
}

/// Sends `bodies` one after the other; they must get the sequence numbers `first..`.
async fn send_all(m: &Messenger, to: &str, first: u64, bodies: &[Vec<u8>]) {
    for (i, b) in bodies.iter().enumerate() {
        let seq = tokio::time::timeout(WAIT, m.send(to, b))
            .await
            .expect("send timed out")
            .unwrap();
        assert_eq!(
            seq,
            first + i as u64,
            "sequence number of message {i} to {to}"
        );
    }
}

/// Receives exactly `bodies` from `from`, in order, numbered `first..`; acknowledges them.
async fn recv_exact(m: &Messenger, from: &str, first: u64, bodies: &[Vec<u8>]) {
    for (i, want) in bodies.iter().enumerate() {
        let seq = first + i as u64;
        let msg = tokio::time::timeout(WAIT, m.recv())
            .await
            .unwrap_or_else(|_| panic!("message {seq} from {from} never arrived"))
            .unwrap();
        assert_eq!(msg.from, from, "sender of message {seq}");
        assert_eq!(
            msg.seq, seq,
            "messages from {from} out of order or repeated"
        );
        assert!(
            msg.body == *want,
            "body of message {seq} from {from} differs"
        );
        if i % 64 == 63 || i + 1 == bodies.len() {
            m.ack(&msg).await.unwrap();
        }
    }
}

/// Nothing more reaches the application within a short while.
async fn expect_nothing_more(m: &Messenger, who: &str) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(700), m.recv()).await {
        panic!("{who} got an extra message: {r:?}");
    }
}

async fn flush(m: &Messenger, to: &str) {
    tokio::time::timeout(WAIT + Duration::from_secs(5), m.flush(to, WAIT))
        .await
        .expect("flush hung past its own timeout")
        .unwrap_or_else(|e| panic!("flush to {to}: {e}"));
}

async fn shutdown(m: Messenger) {
    tokio::time::timeout(WAIT, m.shutdown())
        .await
        .expect("shutdown timed out")
        .unwrap();
}

/// Polls (bounded: 20 s) until `pred` holds for the messenger's counters; returns them.
async fn wait_stats(
    m: &Messenger,
    what: &str,
    pred: impl Fn(&MessengerStats) -> bool,
) -> MessengerStats {
    for _ in 0..400 {
        let s = m.stats();
        if pred(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached: {what}: {:?}", m.stats());
}

fn seed() -> u64 {
    std::env::var("KEAV_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| OsRng.next_u64())
}

// ---------------------------------------------------------------------------------------
// 1. A misbehaving relay.
// ---------------------------------------------------------------------------------------

/// A payload with a durable header (data stream, epoch 0, sequence number `seq`) and a
/// record that opens nowhere: enough for the relay's entry keys.
fn fake_payload(seq: u64) -> Vec<u8> {
    let mut p = vec![0x44, 0x01, 0x17, 0, 0, 0, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0xa5; 24]);
    p
}

/// The chaos relay itself, with raw links: it drops (and lies about some drops),
/// duplicates, reorders and replays, so the messenger test below is really under attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_relay_really_misbehaves() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    let sfx = suffix();
    let relay =
        ChaosRelay::start("127.0.0.1", 1883, &format!("chaos-{sfx}"), Chaos::heavy(7)).await;
    let (ids, idd) = (format!("s-{sfx}"), format!("d-{sfx}"));
    let connect = |id: String| async move {
        mqtt::Link::connect(MQTT, &id, LinkOptions::default())
            .await
            .unwrap()
    };
    let (ls, ld) = (connect(ids.clone()).await, connect(idd.clone()).await);
    let (mut ms, mut md) = (ls.take_mail().unwrap(), ld.take_mail().unwrap());
    const N: u64 = 400;
    for seq in 0..N {
        let f = forward(&ids, &idd, &fake_payload(seq));
        ls.publish(relay.id(), &f).await.unwrap();
    }
    // Bounded: every frame is taken, and the held ones (at most 600 ms) are pushed.
    for _ in 0..400 {
        if relay.stats().forwards == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(relay.stats().forwards, N, "{:?}", relay.stats());
    // Held frames are pushed within 600 ms; then take (bounded) everything the relay pushed:
    // the frames to the destination and the custody acks to the sender.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut got = Vec::new();
    let mut acked = std::collections::BTreeSet::new();
    let mut acks = 0u64;
    for _ in 0..600 {
        while let Ok(m) = md.try_recv() {
            assert_eq!(m.from, relay.id());
            match Frame::decode(&m.payload) {
                Ok(Frame::Forward { src, dst, body, .. }) => {
                    assert_eq!((src.as_str(), dst.as_str()), (ids.as_str(), idd.as_str()));
                    got.push(keav_proto::durable::parse_header(&body).unwrap().seq);
                }
                other => panic!("the destination got {other:?}"),
            }
        }
        while let Ok(m) = ms.try_recv() {
            match Frame::decode(&m.payload) {
                Ok(Frame::Stored { seqs, .. }) => {
                    acks += 1;
                    acked.extend(seqs);
                }
                other => panic!("the sender got {other:?}"),
            }
        }
        let s = relay.stats();
        if got.len() as u64 + acks == s.pushed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        got.len() as u64 + acks,
        relay.stats().pushed,
        "frames went missing"
    );
    let distinct: std::collections::BTreeSet<u64> = got.iter().copied().collect();
    let s = relay.stats();
    eprintln!(
        "{s:?}; {} pushed frames, {} distinct",
        got.len(),
        distinct.len()
    );
    assert!(distinct.len() < N as usize, "nothing dropped");
    assert!(got.len() > distinct.len(), "nothing duplicated or replayed");
    assert!(got.windows(2).any(|w| w[1] < w[0]), "nothing reordered");
    assert!(
        acked.iter().any(|s| !distinct.contains(s)),
        "no lying custody ack"
    );
    assert!(
        distinct.iter().all(|s| acked.contains(s)),
        "a pushed frame not acked"
    );
    assert!(s.dropped > 0 && s.lied > 0 && s.held > 0 && s.delayed > 0 && s.replayed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_relay_loses_nothing_and_delivers_exactly_once_in_order() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    let sfx = suffix();
    let seed = seed();
    eprintln!("chaos relay seed {seed} (KEAV_CHAOS_SEED repeats the relay's choices)");
    let relay = ChaosRelay::start(
        "127.0.0.1",
        1883,
        &format!("chaos-{sfx}"),
        Chaos::heavy(seed),
    )
    .await;
    let (ida, idb) = (format!("a-{sfx}"), format!("b-{sfx}"));
    let dir = TempDir::new().unwrap();
    let da = device(&dir, "a", settings(Some("chaos pairing")));
    let db = device(&dir, "b", settings(Some("chaos pairing")));
    let o = fast_opts(Delivery::Relay(relay.id().to_string()));
    let a = start(&da, mqtt_carrier(&ida).await, &o).await;
    let b = start(&db, mqtt_carrier(&idb).await, &o).await;
    pair((&a, &da, &ida), (&b, &db, &idb)).await;

    const N_AB: usize = 2_000;
    const N_BA: usize = 500;
    let ab = bodies("a", N_AB, &sfx);
    let ba = bodies("b", N_BA, &sfx);
    tokio::join!(
        send_all(&a, &idb, 0, &ab),
        send_all(&b, &ida, 0, &ba),
        recv_exact(&b, &ida, 0, &ab),
        recv_exact(&a, &idb, 0, &ba),
    );
    tokio::join!(flush(&a, &idb), flush(&b, &ida));
    tokio::join!(expect_nothing_more(&a, "a"), expect_nothing_more(&b, "b"));

    let (sa, sb, sr) = (a.stats(), b.stats(), relay.stats());
    eprintln!("a: {sa:?}\nb: {sb:?}\nrelay: {sr:?}");
    // The relay really misbehaved, both ways.
    assert!(sr.dropped > 0 && sr.lied > 0 && sr.duplicated > 0, "{sr:?}");
    assert!(sr.held > 0 && sr.delayed > 0 && sr.replayed > 0, "{sr:?}");
    assert_eq!(sr.odd, 0, "{sr:?}");
    // Exactly once into each inbox, whatever arrived how often.
    assert_eq!((sa.sent, sb.sent), (N_AB as u64, N_BA as u64));
    assert_eq!(sb.received, N_AB as u64, "{sb:?}");
    assert_eq!(sa.received, N_BA as u64, "{sa:?}");
    // The receivers saw (and dropped) duplicates, and had to put records off; the senders
    // had to resend.
    assert!(sa.duplicates > 0 && sb.duplicates > 0, "{sa:?} {sb:?}");
    assert!(sb.deferred > 0, "{sb:?}");
    assert!(sa.resent > 0 && sb.resent > 0, "{sa:?} {sb:?}");
    assert_eq!(sa.refused + sb.refused, 0);
    shutdown(a).await;
    shutdown(b).await;
}

// ---------------------------------------------------------------------------------------
// 2. A broker-wide eavesdropper.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broker {
    Mqtt,
    Nats,
}

impl Broker {
    fn topic(self, to: &str, from: &str) -> String {
        match self {
            Broker::Mqtt => format!("keav/v1/{to}/from/{from}"),
            Broker::Nats => format!("keav.v1.{to}.from.{from}"),
        }
    }

    async fn carrier(self, id: &str) -> Carrier {
        match self {
            Broker::Mqtt => mqtt_carrier(id).await,
            Broker::Nats => nats_carrier(id).await,
        }
    }
}

/// Pairing and 300 messages each way (direct delivery) while a subscriber to everything
/// records the broker's traffic; then nothing secret may be in it.
async fn eavesdropper_run(broker: Broker, log: &SpyLog) {
    let sfx = suffix();
    // Tokens independent of the device ids (which the topics carry).
    let (tok, code) = (suffix(), format!("pairing code {}", suffix()));
    let (ida, idb) = (format!("a-{sfx}"), format!("b-{sfx}"));
    let dir = TempDir::new().unwrap();
    let da = device(&dir, "a", settings(Some(&code)));
    let db = device(&dir, "b", settings(Some(&code)));
    let o = fast_opts(Delivery::Direct);
    let a = start(&da, broker.carrier(&ida).await, &o).await;
    let b = start(&db, broker.carrier(&idb).await, &o).await;
    pair((&a, &da, &ida), (&b, &db, &idb)).await;

    const N: usize = 300;
    let ab = bodies("a", N, &tok);
    let ba = bodies("b", N, &tok);
    tokio::join!(
        send_all(&a, &idb, 0, &ab),
        send_all(&b, &ida, 0, &ba),
        recv_exact(&b, &ida, 0, &ab),
        recv_exact(&a, &idb, 0, &ba),
    );
    tokio::join!(flush(&a, &idb), flush(&b, &ida));
    shutdown(a).await;
    shutdown(b).await;

    let (t_ab, t_ba) = (broker.topic(&idb, &ida), broker.topic(&ida, &idb));
    let (x, y) = (t_ab.clone(), t_ba.clone());
    log.wait_for("every data payload both ways", move |log| {
        let data = |t: &str| {
            log.iter()
                .filter(|(lt, p)| lt == t && p.starts_with(&[0x44, 0x01]))
                .count()
        };
        data(&x) >= N && data(&y) >= N
    })
    .await;
    let log = log.snapshot();
    let ours: Vec<&Entry> = log.iter().filter(|(t, _)| t.contains(&sfx)).collect();
    assert!(ours.len() >= 2 * N + 4, "only {} messages seen", ours.len());
    // Our traffic: the two inbox topics, handshake messages (0x50) and durable payloads.
    assert!(ours.iter().any(|(_, p)| p.first() == Some(&0x50)));
    assert!(
        ours.iter().any(|(_, p)| p.starts_with(&[0x44, 0x02])),
        "no acks seen"
    );
    for (t, p) in &ours {
        assert!(*t == t_ab || *t == t_ba, "unexpected topic {t}");
        assert!(
            matches!(p.first(), Some(0x50 | 0x44)),
            "unexpected payload on {t}"
        );
    }

    // Everything the broker carried during the run (other tests' traffic included).
    for (t, p) in &log {
        assert!(!contains(p, tok.as_bytes()), "a message body on {t}");
        assert!(!contains(p, b"heart-rate reading"), "a message body on {t}");
        assert!(!contains(p, code.as_bytes()), "the pairing code on {t}");
    }
    for (dev, peer) in [(&da, &idb), (&db, &ida)] {
        let row = dev
            .store()
            .durable_row(peer)
            .unwrap()
            .expect("no durable row after the run");
        let windows = secret_windows(&row.state);
        // Four sub-channel states with a 32-byte chain key each.
        assert!(windows.len() >= 4 * (32 - WINDOW + 1), "{}", windows.len());
        // The detector works: a planted window is found.
        // A decoy without key material (a reversed state could contain a window by chance).
        let planted = b"no key material in here; ".repeat(8);
        let probe: Vec<Entry> = vec![
            ("probe".into(), planted),
            ("probe".into(), {
                let w = windows.iter().next().unwrap();
                let mut p = b"xx".to_vec();
                p.extend_from_slice(w);
                p
            }),
        ];
        assert_eq!(find_window(&probe, &windows).map(|(_, at)| at), Some(2));
        assert_eq!(
            find_window(&log, &windows),
            None,
            "key material of the persisted state in the broker's traffic"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_eavesdropper_sees_no_body_code_or_key_material() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    let spy = MqttSpy::start("127.0.0.1", 1883, &format!("spy-{}", suffix())).await;
    eavesdropper_run(Broker::Mqtt, &spy.log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_eavesdropper_sees_no_body_code_or_key_material() {
    if !listening(NATS, "NATS server") {
        return;
    }
    let spy = NatsSpy::start(NATS).await;
    eavesdropper_run(Broker::Nats, &spy.log).await;
}

// ---------------------------------------------------------------------------------------
// 3. Forged and replayed injections.
// ---------------------------------------------------------------------------------------

/// Offset of the sequence number in a durable payload (tag, stream, record type, epoch).
const SEQ_AT: usize = 7;

fn with_seq(payload: &[u8], seq: u64) -> Vec<u8> {
    let mut p = payload.to_vec();
    p[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_be_bytes());
    p
}

fn flip(payload: &[u8], at: usize) -> Vec<u8> {
    let mut p = payload.to_vec();
    let i = at.min(p.len() - 1);
    p[i] ^= 0x04;
    p
}

fn forward(src: &str, dst: &str, body: &[u8]) -> Vec<u8> {
    Frame::Forward {
        hops: DEFAULT_HOPS - 1,
        src: src.to_string(),
        dst: dst.to_string(),
        body: body.to_vec(),
    }
    .encode()
}

fn random(prefix: &[u8], len: usize) -> Vec<u8> {
    let mut p = prefix.to_vec();
    let mut rest = vec![0u8; len];
    OsRng.fill_bytes(&mut rest);
    p.extend_from_slice(&rest);
    p
}

/// (topic, frame, body) of the Forward frames pushed to `dst` from `src` (through `relay`)
/// whose body is on `stream`.
fn pushed(log: &[Entry], relay: &str, src: &str, dst: &str, stream: u8) -> Vec<(Vec<u8>, Vec<u8>)> {
    let topic = format!("keav/v1/{dst}/from/{relay}");
    log.iter()
        .filter(|(t, _)| *t == topic)
        .filter_map(|(_, p)| match Frame::decode(p) {
            Ok(Frame::Forward { src: s, body, .. }) if s == src && body.get(1) == Some(&stream) => {
                Some((p.clone(), body))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_injections_are_dropped_and_the_channel_keeps_working() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    let sfx = suffix();
    let spy = MqttSpy::start("127.0.0.1", 1883, &format!("spy-{sfx}")).await;
    // A well-behaved relay (the chaos relay with no chaos): the traffic is relay frames.
    let relay = ChaosRelay::start("127.0.0.1", 1883, &format!("r-{sfx}"), Chaos::none()).await;
    let rid = relay.id().to_string();
    let (ida, idb, idc) = (format!("a-{sfx}"), format!("b-{sfx}"), format!("c-{sfx}"));
    let dir = TempDir::new().unwrap();
    let da = device(&dir, "a", settings(Some("1234")));
    let db = device(&dir, "b", settings(Some("1234")));
    let dc = device(&dir, "c", settings(Some("1234")));
    let o = fast_opts(Delivery::Relay(rid.clone()));
    let a = start(&da, mqtt_carrier(&ida).await, &o).await;
    let b = start(&db, mqtt_carrier(&idb).await, &o).await;
    let c = start(&dc, mqtt_carrier(&idc).await, &o).await;
    pair((&a, &da, &ida), (&b, &db, &idb)).await;
    pair((&c, &dc, &idc), (&b, &db, &idb)).await;

    let ab = bodies("a", 70, &sfx);
    let ba = bodies("b", 5, &sfx);
    tokio::join!(
        send_all(&a, &idb, 0, &ab[..20]),
        send_all(&b, &ida, 0, &ba),
        recv_exact(&b, &ida, 0, &ab[..20]),
        recv_exact(&a, &idb, 0, &ba),
    );
    tokio::join!(flush(&a, &idb), flush(&b, &ida));

    // Captured from the broker: a's data record 5 and one of a's acks, as b got them.
    let (r, i) = (rid.clone(), ida.clone());
    let bb = idb.clone();
    spy.log
        .wait_for("a's records and acks pushed to b", move |log| {
            !pushed(log, &r, &i, &bb, 1).is_empty() && !pushed(log, &r, &i, &bb, 2).is_empty()
        })
        .await;
    let log = spy.log.snapshot();
    let (frame5, data5) = pushed(&log, &rid, &ida, &idb, 1)
        .into_iter()
        .find(|(_, body)| keav_proto::durable::parse_header(body).is_ok_and(|h| h.seq == 5))
        .expect("a's record 5 pushed to b");
    let (ctl_frame, ctl) = pushed(&log, &rid, &ida, &idb, 2).pop().unwrap();
    assert!(!contains(&data5, sfx.as_bytes()));

    let (sa0, sb0, sc0) = (a.stats(), b.stats(), c.stats());
    let t_direct = format!("keav/v1/{idb}/from/{ida}");
    let t_relay = format!("keav/v1/{idb}/from/{rid}");
    let mut dups = 0u64;
    let mut rejects = 0u64;
    // (b) exact replays, directly and in the relay's frame: duplicates.
    spy.inject(&t_direct, data5.clone()).await;
    spy.inject(&t_relay, frame5.clone()).await;
    // (a) a bit-flipped copy (record 5 is old: refused as a duplicate before any AEAD work),
    // and copies claiming the next sequence number 20, as is and flipped: fail to open.
    spy.inject(&t_direct, flip(&data5, data5.len() - 1)).await;
    dups += 3;
    spy.inject(&t_direct, with_seq(&data5, 20)).await;
    spy.inject(
        &t_relay,
        forward(&ida, &idb, &flip(&with_seq(&data5, 20), 20)),
    )
    .await;
    rejects += 2;
    // (c) a's ack replayed (directly, in the relay's frame, bit-flipped): refused.
    spy.inject(&t_direct, ctl.clone()).await;
    spy.inject(&t_relay, ctl_frame.clone()).await;
    spy.inject(&t_direct, flip(&ctl, 12)).await;
    rejects += 3;
    // (d) Forward frames with a forged src: an unknown device; c, a real peer of b, whose
    // next sequence number 0 the record claims; a relay frame from a device that is not the
    // relay; an entry for another destination.
    let mallory = format!("mallory-{sfx}");
    spy.inject(&t_relay, forward(&mallory, &idb, &with_seq(&data5, 20)))
        .await;
    spy.inject(&t_relay, forward(&idc, &idb, &with_seq(&data5, 0)))
        .await;
    spy.inject(&t_direct, forward(&ida, &idb, &with_seq(&data5, 20)))
        .await;
    spy.inject(&t_relay, forward(&ida, &mallory, &with_seq(&data5, 20)))
        .await;
    rejects += 4;
    // (e) garbage with the durable-payload and relay-frame tags, on both topics.
    let mut garbage = vec![
        vec![0x44],
        random(&[0x44, 0x09], 40),
        // A well-formed header for record 20 of epoch 0, random record: fails to open.
        random(&with_seq(&data5[..15], 20), 40),
        // A control payload of the wrong length.
        random(&[0x44, 0x02, 0x17], 40),
        random(&[0x52, 0x07], 40),
        random(&[0x52, 0x01, 0x01, 0x08], 60),
        random(&[0x52, 0x01, 0x09], 10),
    ];
    garbage.push(random(&[0x52, 0x01, 0x02], 5));
    for g in &garbage {
        spy.inject(&t_direct, g.clone()).await;
        spy.inject(&t_relay, g.clone()).await;
        rejects += 2;
    }

    let sb = wait_stats(&b, "b counted every injection", |s| {
        s.rejected >= sb0.rejected + rejects && s.duplicates >= sb0.duplicates + dups
    })
    .await;
    // The channels keep working: 50 more from a and 5 from c (whose sequence number 0 the
    // forgery claimed), all in order, nothing extra.
    send_all(&a, &idb, 20, &ab[20..]).await;
    recv_exact(&b, &ida, 20, &ab[20..]).await;
    let cb = bodies("c", 5, &sfx);
    send_all(&c, &idb, 0, &cb).await;
    recv_exact(&b, &idc, 0, &cb).await;
    tokio::join!(flush(&a, &idb), flush(&c, &idb));
    expect_nothing_more(&b, "b").await;

    let sb1 = b.stats();
    eprintln!("b before: {sb0:?}\nb after injection: {sb:?}\nb at the end: {sb1:?}");
    assert_eq!(sb1.rejected - sb0.rejected, rejects, "{sb1:?}");
    assert_eq!(sb1.duplicates - sb0.duplicates, dups, "{sb1:?}");
    assert_eq!(sb1.deferred, sb0.deferred, "{sb1:?}");
    assert_eq!(sb1.received, 20 + 50 + 5, "{sb1:?}");
    let (sa1, sc1) = (a.stats(), c.stats());
    assert_eq!(sa1.rejected, sa0.rejected, "{sa1:?}");
    assert_eq!(sc1.rejected, sc0.rejected, "{sc1:?}");
    assert_eq!(sa1.received, 5);
    assert_eq!(relay.stats().odd, 0);
    shutdown(a).await;
    shutdown(b).await;
    shutdown(c).await;
}

// ---------------------------------------------------------------------------------------
// 4. A relay that refuses (mailbox full), and nothing is lost.
// ---------------------------------------------------------------------------------------

fn queued_for(relay: &Relay, id: &str) -> u64 {
    relay
        .queues()
        .unwrap()
        .iter()
        .filter(|(q, _)| q.contains(id))
        .map(|(_, s)| s.entries)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_relay_mailbox_refuses_and_nothing_is_lost() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    let sfx = suffix();
    let dir = TempDir::new().unwrap();
    let rid = format!("relay-{sfx}");
    let mut cfg = RelayConfig::new(&rid, dir.path().join("mailbox.redb"));
    cfg.limits = MailboxLimits {
        max_entries: 20,
        max_bytes: 1 << 20,
    };
    cfg.mqtt = Some((MQTT.to_string(), LinkOptions::default()));
    cfg.routes = vec![RouteRule {
        dst: "*".to_string(),
        next: NextHop::MqttDevice,
    }];
    cfg.resend = Duration::from_millis(500);
    cfg.presence = Duration::from_secs(1);
    let relay = tokio::time::timeout(WAIT, Relay::start(cfg))
        .await
        .expect("relay start timed out")
        .unwrap();

    let (ida, idb) = (format!("a-{sfx}"), format!("b-{sfx}"));
    let da = device(&dir, "a", settings(Some("relay pairing")));
    let db = device(&dir, "b", settings(Some("relay pairing")));
    let o = fast_opts(Delivery::Relay(rid.clone()));
    let a = start(&da, mqtt_carrier(&ida).await, &o).await;
    let b = start(&db, mqtt_carrier(&idb).await, &o).await;
    pair((&a, &da, &ida), (&b, &db, &idb)).await;
    // b goes offline (its messenger and link are gone).
    shutdown(b).await;

    const N: usize = 50;
    let ab = bodies("a", N, &sfx);
    send_all(&a, &idb, 0, &ab).await;
    let sa = wait_stats(&a, "a relay refusal reached a", |s| s.refused > 0).await;
    assert!(relay.stats().refused > 0, "{:?}", relay.stats());
    // The mailbox holds at most its bound.
    for _ in 0..100 {
        assert!(queued_for(&relay, &idb) <= 20);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queued_for(&relay, &idb), 20, "{:?}", relay.queues());
    eprintln!("a while b is offline: {sa:?}\nrelay: {:?}", relay.stats());

    // b comes back: every message arrives, once, in order, as the mailbox drains and a
    // resends what the relay refused.
    let b = start(&db, mqtt_carrier(&idb).await, &o).await;
    recv_exact(&b, &ida, 0, &ab).await;
    flush(&a, &idb).await;
    expect_nothing_more(&b, "b").await;
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.refused > 0, "{sa:?}");
    assert_eq!(sb.received, N as u64, "{sb:?}");
    for _ in 0..400 {
        if queued_for(&relay, &idb) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(queued_for(&relay, &idb), 0, "{:?}", relay.queues());
    let rs = relay.stats();
    eprintln!("a: {sa:?}\nb: {sb:?}\nrelay: {rs:?}");
    assert!(rs.stored >= N as u64 && rs.delivered >= N as u64, "{rs:?}");
    shutdown(a).await;
    shutdown(b).await;
    tokio::time::timeout(WAIT, relay.shutdown())
        .await
        .expect("relay shutdown timed out")
        .unwrap();
}
