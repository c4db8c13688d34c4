//! Mail over the broker links (durable payloads 0x44 and relay frames 0x52), handshakes that
//! return the session instead of a live channel, MQTT persistent sessions, the NATS JetStream
//! mailbox, and a broker restart. Against Mosquitto on 127.0.0.1:1883 and nats-server (with
//! JetStream) on 127.0.0.1:4222; tests that need their own broker configuration start a
//! private `mosquitto` or `nats-server` on a free loopback port and kill it by PID. Each test
//! prints a notice and passes if its broker is missing.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::spy::{listening, SpyLog};
use common::{device, settings};
use futures_util::StreamExt;
use keav_net::broker::{JetStreamOptions, LinkOptions, LinkStats, Mail};
use keav_net::device::Device;
use keav_net::Error;
use keav_proto::handshake::{Role, SessionOutcome};
use keav_proto::msg::Message;
use rand_core::{OsRng, RngCore};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tempfile::TempDir;
use tokio::sync::mpsc::Receiver;

const MQTT: &str = "127.0.0.1:1883";
const NATS: &str = "127.0.0.1:4222";

/// A fresh suffix so parallel runs and leftover broker state never collide.
fn suffix() -> String {
    format!("{:016x}", OsRng.next_u64())
}

/// A durable-payload-like (0x44) or relay-frame-like (0x52) mail body.
fn mail_body(tag: u8, i: usize, sfx: &str) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(format!("mail {i:04} [{sfx}]").as_bytes());
    v
}

/// Receives one mail, failing after a bounded wait.
async fn next_mail(rx: &mut Receiver<Mail>, what: &str) -> Mail {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: no mail came"))
        .unwrap_or_else(|| panic!("{what}: the mail queue ended"))
}

/// Polls `f` (bounded: 15 s) until it holds; panics naming `what` otherwise.
async fn wait_until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

/// A loopback port nothing listens on (right now).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A broker process of our own, killed (SIGKILL, by PID) when dropped.
struct Private {
    child: Child,
}

impl Private {
    /// Starts `cmd` and waits (bounded) until it listens on `port`; `None` if it cannot start.
    fn start(mut cmd: Command, port: u16) -> Option<Private> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let p = Private { child };
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..200 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the private broker never listened on {addr}");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The two carriers behind one interface, and a raw client that watches and injects.

trait TestLink: Sized {
    const NAME: &'static str;
    async fn open(addr: &str, id: &str, o: LinkOptions) -> Result<Self, Error>;
    fn take_mail(&self) -> Option<Receiver<Mail>>;
    async fn publish(&self, to: &str, p: &[u8]) -> Result<bool, Error>;
    fn stats(&self) -> LinkStats;
    fn connections(&self) -> u64;
    async fn handshake_peer(&self, d: &Device, peer: &str) -> Result<Box<SessionOutcome>, Error>;
    async fn accept_handshake(&self, d: &Device) -> Result<(String, Box<SessionOutcome>), Error>;
    /// The subject on which `from` sends to `to`.
    fn subject(to: &str, from: &str) -> String;
    /// A subject inside `to`'s inbox filter that names no valid sender.
    fn bad_subject(to: &str) -> String;
}

impl TestLink for keav_net::mqtt::Link {
    const NAME: &'static str = "MQTT";
    async fn open(addr: &str, id: &str, o: LinkOptions) -> Result<Self, Error> {
        Self::connect(addr, id, o).await
    }
    fn take_mail(&self) -> Option<Receiver<Mail>> {
        self.take_mail()
    }
    async fn publish(&self, to: &str, p: &[u8]) -> Result<bool, Error> {
        self.publish(to, p).await
    }
    fn stats(&self) -> LinkStats {
        self.stats()
    }
    fn connections(&self) -> u64 {
        self.connections()
    }
    async fn handshake_peer(&self, d: &Device, peer: &str) -> Result<Box<SessionOutcome>, Error> {
        self.handshake_peer(d, peer).await
    }
    async fn accept_handshake(&self, d: &Device) -> Result<(String, Box<SessionOutcome>), Error> {
        self.accept_handshake(d).await
    }
    fn subject(to: &str, from: &str) -> String {
        keav_net::mqtt::topic(to, from)
    }
    fn bad_subject(to: &str) -> String {
        format!("keav/v1/{to}/from/x/y")
    }
}

impl TestLink for keav_net::nats::Link {
    const NAME: &'static str = "NATS";
    async fn open(addr: &str, id: &str, o: LinkOptions) -> Result<Self, Error> {
        Self::connect(addr, id, o).await
    }
    fn take_mail(&self) -> Option<Receiver<Mail>> {
        self.take_mail()
    }
    async fn publish(&self, to: &str, p: &[u8]) -> Result<bool, Error> {
        self.publish(to, p).await
    }
    fn stats(&self) -> LinkStats {
        self.stats()
    }
    fn connections(&self) -> u64 {
        self.connections()
    }
    async fn handshake_peer(&self, d: &Device, peer: &str) -> Result<Box<SessionOutcome>, Error> {
        self.handshake_peer(d, peer).await
    }
    async fn accept_handshake(&self, d: &Device) -> Result<(String, Box<SessionOutcome>), Error> {
        self.accept_handshake(d).await
    }
    fn subject(to: &str, from: &str) -> String {
        keav_net::nats::subject(to, from)
    }
    fn bad_subject(to: &str) -> String {
        format!("keav.v1.{to}.from.x.y")
    }
}

/// A plain client subscribed to every keav topic/subject: logs what the broker delivers and
/// publishes anything anywhere (the brokers have no ACLs here).
enum Spy {
    Mqtt(AsyncClient, SpyLog, tokio::task::JoinHandle<()>),
    Nats(async_nats::Client, SpyLog, tokio::task::JoinHandle<()>),
}

impl Drop for Spy {
    fn drop(&mut self) {
        match self {
            Spy::Mqtt(_, _, t) | Spy::Nats(_, _, t) => t.abort(),
        }
    }
}

impl Spy {
    async fn mqtt(sfx: &str) -> Spy {
        let mut mo = MqttOptions::new(format!("spy-{sfx}"), "127.0.0.1", 1883);
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
        Spy::Mqtt(client, log, task)
    }

    async fn nats() -> Spy {
        Spy::nats_at(NATS).await
    }

    async fn nats_at(addr: &str) -> Spy {
        let client = async_nats::connect(addr).await.unwrap();
        let mut sub = client.subscribe("keav.>").await.unwrap();
        client.flush().await.unwrap();
        let log = SpyLog::default();
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                l.push(m.subject.to_string(), m.payload.to_vec());
            }
        });
        Spy::Nats(client, log, task)
    }

    fn log(&self) -> &SpyLog {
        match self {
            Spy::Mqtt(_, l, _) | Spy::Nats(_, l, _) => l,
        }
    }

    /// Publishes and waits until the broker echoed it back (so the broker handled it before
    /// anything published afterwards).
    async fn inject(&self, subject: &str, payload: Vec<u8>) {
        let before = self.log().count(subject, &payload);
        match self {
            Spy::Mqtt(c, _, _) => c
                .publish(subject, QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap(),
            Spy::Nats(c, _, _) => c
                .publish(subject.to_string(), payload.clone().into())
                .await
                .unwrap(),
        }
        let s = subject.to_string();
        self.log()
            .wait_for("its own message", move |log| {
                log.iter().filter(|(t, p)| *t == s && *p == payload).count() > before
            })
            .await;
    }

    /// How many handshake messages of type `want` were seen on `subject`.
    fn count_type(&self, subject: &str, want: fn(&Message) -> bool) -> usize {
        self.log()
            .snapshot()
            .iter()
            .filter(|(t, p)| t == subject && Message::parse(p).is_ok_and(|m| want(&m)))
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// Mail round trip, both carriers

async fn mail_round_trip<L: TestLink>(addr: &str, spy: Spy, sfx: &str) {
    let (ida, idb) = (format!("ma-{sfx}"), format!("mb-{sfx}"));
    let opts = LinkOptions {
        max_payload: 32 * 1024,
        ..LinkOptions::default()
    };
    let la = L::open(addr, &ida, opts.clone()).await.unwrap();
    let lb = L::open(addr, &idb, opts).await.unwrap();
    assert_eq!((la.connections(), lb.connections()), (1, 1), "{}", L::NAME);

    // Before take_mail, mail is counted as unrouted.
    assert!(!la.publish(&idb, &mail_body(0x44, 0, sfx)).await.unwrap());
    wait_until("the early mail counted", || {
        lb.stats().dropped_unrouted == 1
    })
    .await;

    let mut rx = lb.take_mail().expect("the first take_mail gets the queue");
    assert!(lb.take_mail().is_none(), "take_mail works only once");

    // Durable payloads and relay frames arrive as mail, with their sender.
    let sent: Vec<Vec<u8>> = (1..=10)
        .map(|i| mail_body(if i % 2 == 0 { 0x44 } else { 0x52 }, i, sfx))
        .collect();
    for m in &sent {
        assert!(!la.publish(&idb, m).await.unwrap(), "no durable-store ack");
    }
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        let m = next_mail(&mut rx, "round trip").await;
        assert_eq!(m.from, ida);
        assert!(m.ack.is_none(), "core carriers need no ack");
        got.push(m.payload);
    }
    let (mut want, mut got) = (sent.clone(), got);
    want.sort();
    got.sort();
    assert_eq!(got, want);

    // publish carries mail only, to valid ids, within max_payload.
    for (to, p) in [
        (idb.as_str(), vec![0x17u8; 40]),
        (idb.as_str(), b"\x50\x5ahandshake-like".to_vec()),
        (idb.as_str(), Vec::new()),
        (idb.as_str(), vec![0x44; 32 * 1024 + 1]),
        ("bad/id", mail_body(0x44, 0, sfx)),
        ("bad.id", mail_body(0x44, 0, sfx)),
        ("", mail_body(0x44, 0, sfx)),
    ] {
        let r = la.publish(to, &p).await;
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{to}: {r:?}");
    }

    // Oversized and malformed mail is counted, records from strangers are not mail, and mail
    // from anyone who can publish on the inbox arrives with that (unauthenticated) name.
    let before = lb.stats();
    let inbox_x = L::subject(&idb, "x");
    let mut oversized = mail_body(0x44, 99, sfx);
    oversized.resize(40 * 1024, 0);
    spy.inject(&inbox_x, oversized).await;
    spy.inject(&L::bad_subject(&idb), mail_body(0x52, 98, sfx))
        .await;
    spy.inject(&inbox_x, Vec::new()).await;
    spy.inject(&inbox_x, vec![0x17; 40]).await;
    let marker = mail_body(0x52, 97, sfx);
    spy.inject(&inbox_x, marker.clone()).await;
    let m = next_mail(&mut rx, "marker").await;
    assert_eq!((m.from.as_str(), &m.payload), ("x", &marker));
    assert!(rx.try_recv().is_err(), "nothing else became mail");
    let s = lb.stats();
    assert_eq!(s.received - before.received, 5, "{s:?}");
    assert_eq!(s.dropped_oversized - before.dropped_oversized, 1, "{s:?}");
    assert_eq!(s.dropped_malformed - before.dropped_malformed, 2, "{s:?}");
    assert_eq!(s.dropped_unrouted - before.dropped_unrouted, 1, "{s:?}");
    assert_eq!(s.dropped_busy, 0, "{s:?}");
    assert_eq!(
        (before.dropped_oversized, before.dropped_malformed),
        (0, 0),
        "{before:?}"
    );
    assert_eq!(before.received, 11, "{before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_mail_round_trip_take_once_and_counters() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    let sfx = suffix();
    let spy = Spy::mqtt(&sfx).await;
    mail_round_trip::<keav_net::mqtt::Link>(MQTT, spy, &sfx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mail_round_trip_take_once_and_counters() {
    if !listening(NATS, "NATS server") {
        return;
    }
    let sfx = suffix();
    let spy = Spy::nats().await;
    mail_round_trip::<keav_net::nats::Link>(NATS, spy, &sfx).await;
}

// ---------------------------------------------------------------------------------------------
// Handshakes that return the session (durable-style pairing), both carriers

async fn pairing<L: TestLink>(addr: &str, spy: Spy, sfx: &str, o: LinkOptions) {
    let code = format!("code-{sfx}");
    let (ida, idb) = (format!("ha-{sfx}"), format!("hb-{sfx}"));
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some(&code)));
    let b = device(&dir, "b", settings(Some(&code)));
    let la = L::open(addr, &ida, o.clone()).await.unwrap();
    let lb = L::open(addr, &idb, o).await.unwrap();
    // Mail is taken, so a JetStream consumer runs (and must ignore the handshake messages).
    let (mut ra, mut rb) = (la.take_mail().unwrap(), lb.take_mail().unwrap());

    let (oa, ob) = tokio::join!(la.handshake_peer(&a, &idb), lb.accept_handshake(&b));
    let (oa, (from, ob)) = (oa.unwrap(), ob.unwrap());
    assert_eq!(from, ida);
    assert_eq!((oa.role, ob.role), (Role::Initiator, Role::Responder));
    assert_eq!(oa.peer_zid, b.zid());
    assert_eq!(ob.peer_zid, a.zid());
    assert_eq!(oa.exported_key.expose(), ob.exported_key.expose());
    assert_eq!(oa.kdf_context, ob.kdf_context);
    assert_eq!((oa.session_number, ob.session_number), (1, 1));
    // Persisted: the store knows the peer under the initiator's label.
    assert!(a.store().peer_by_label(&idb).unwrap().is_some());

    // The responder keeps answering a retransmitted Confirm2 after it completed (the
    // initiator's retransmission when our Conf2ACK was lost): replay A's Confirm2.
    let (ab, ba) = (L::subject(&idb, &ida), L::subject(&ida, &idb));
    let is_confirm2: fn(&Message) -> bool = |m| matches!(m, Message::Confirm2(_));
    let is_conf2ack: fn(&Message) -> bool = |m| matches!(m, Message::Conf2Ack);
    let (ab2, ba2) = (ab.clone(), ba.clone());
    spy.log()
        .wait_for("Confirm2 and Conf2ACK", move |log| {
            let seen = |s: &str, f: fn(&Message) -> bool| {
                log.iter()
                    .any(|(t, p)| t == s && Message::parse(p).is_ok_and(|m| f(&m)))
            };
            seen(&ab2, is_confirm2) && seen(&ba2, is_conf2ack)
        })
        .await;
    let confirm2 = spy
        .log()
        .snapshot()
        .into_iter()
        .find(|(t, p)| *t == ab && Message::parse(p).is_ok_and(|m| is_confirm2(&m)))
        .unwrap()
        .1;
    let acks = spy.count_type(&ba, is_conf2ack);
    spy.inject(&ab, confirm2).await;
    let ba3 = ba.clone();
    spy.log()
        .wait_for("a second Conf2ACK", move |log| {
            log.iter()
                .filter(|(t, p)| *t == ba3 && Message::parse(p).is_ok_and(|m| is_conf2ack(&m)))
                .count()
                > acks
        })
        .await;

    // Pairing again right away (routes of the first handshake still lingering) continues
    // the key history with a new key.
    let (oa2, ob2) = tokio::join!(la.handshake_peer(&a, &idb), lb.accept_handshake(&b));
    let (oa2, (from2, ob2)) = (oa2.unwrap(), ob2.unwrap());
    assert_eq!(from2, ida);
    assert_eq!((oa2.session_number, ob2.session_number), (2, 2));
    assert_eq!(oa2.exported_key.expose(), ob2.exported_key.expose());
    assert_ne!(oa2.exported_key.expose(), oa.exported_key.expose());

    // And the other way round.
    let (ob3, oa3) = tokio::join!(lb.handshake_peer(&b, &ida), la.accept_handshake(&a));
    let (ob3, (from3, oa3)) = (ob3.unwrap(), oa3.unwrap());
    assert_eq!(from3, idb);
    assert_eq!((ob3.role, oa3.role), (Role::Initiator, Role::Responder));
    assert_eq!(ob3.exported_key.expose(), oa3.exported_key.expose());

    // Handshake messages never became mail, and nothing was dropped as busy.
    assert!(ra.try_recv().is_err() && rb.try_recv().is_err());
    for s in [la.stats(), lb.stats()] {
        assert_eq!((s.dropped_busy, s.dropped_oversized), (0, 0), "{s:?}");
    }

    // A device cannot call itself, nor a bad id.
    for bad in [ida.as_str(), "a/b", ""] {
        let r = la.handshake_peer(&a, bad).await;
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{bad}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_pairing_returns_equal_sessions_and_the_responder_lingers() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    let sfx = suffix();
    let spy = Spy::mqtt(&sfx).await;
    pairing::<keav_net::mqtt::Link>(MQTT, spy, &sfx, LinkOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_pairing_returns_equal_sessions_and_the_responder_lingers() {
    if !listening(NATS, "NATS server") {
        return;
    }
    let sfx = suffix();
    let spy = Spy::nats().await;
    pairing::<keav_net::nats::Link>(NATS, spy, &sfx, LinkOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_pairing_with_jetstream_on() {
    // Its own server: a JetStream stream must not stay behind on the shared one.
    let Some(server) = common::private_nats::PrivateNats::start() else {
        eprintln!("skipped: nats-server is not installed");
        return;
    };
    let nats = server.addr();
    let sfx = suffix();
    let spy = Spy::nats_at(nats).await;
    let o = LinkOptions {
        jetstream: Some(JetStreamOptions::default()),
        ..LinkOptions::default()
    };
    pairing::<keav_net::nats::Link>(nats, spy, &sfx, o).await;
    for id in [format!("ha-{sfx}"), format!("hb-{sfx}")] {
        delete_consumer(nats, "KEAV", &id).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Options each carrier refuses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrier_options_are_checked() {
    let sfx = suffix();
    let js = LinkOptions {
        jetstream: Some(JetStreamOptions::default()),
        ..LinkOptions::default()
    };
    let r = keav_net::mqtt::Link::connect(MQTT, &format!("o-{sfx}"), js).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let persistent = LinkOptions {
        persistent_session: true,
        ..LinkOptions::default()
    };
    let r = keav_net::nats::Link::connect(NATS, &format!("o-{sfx}"), persistent).await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    for bad in [
        JetStreamOptions {
            stream: "A.B".into(),
            ..JetStreamOptions::default()
        },
        JetStreamOptions {
            stream: String::new(),
            ..JetStreamOptions::default()
        },
        JetStreamOptions {
            max_messages: 0,
            ..JetStreamOptions::default()
        },
        JetStreamOptions {
            ack_wait: Duration::ZERO,
            ..JetStreamOptions::default()
        },
    ] {
        let o = LinkOptions {
            jetstream: Some(bad.clone()),
            ..LinkOptions::default()
        };
        let r = keav_net::nats::Link::connect(NATS, &format!("o-{sfx}"), o).await;
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{bad:?}: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT persistent session

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_persistent_session_receives_mail_published_while_offline() {
    if !listening(MQTT, "MQTT broker") {
        return;
    }
    type L = keav_net::mqtt::Link;
    let sfx = suffix();
    let (ida, idb) = (format!("pa-{sfx}"), format!("pb-{sfx}"));
    let persistent = LinkOptions {
        persistent_session: true,
        ..LinkOptions::default()
    };
    // B's session (and subscription) is created, then B goes offline.
    let lb = L::connect(MQTT, &idb, persistent.clone()).await.unwrap();
    drop(lb);
    let la = L::connect(MQTT, &ida, LinkOptions::default())
        .await
        .unwrap();
    const N: usize = 100;
    let sent: BTreeSet<Vec<u8>> = (0..N).map(|i| mail_body(0x44, i, &sfx)).collect();
    for m in &sent {
        assert!(!la.publish(&idb, m).await.unwrap());
    }
    // B comes back: everything queued meanwhile arrives, even what came during connect.
    let lb = L::connect(MQTT, &idb, persistent).await.unwrap();
    let mut rx = lb.take_mail().unwrap();
    let mut got = BTreeSet::new();
    while got.len() < N {
        let m = next_mail(&mut rx, "queued mail").await;
        assert_eq!(m.from, ida);
        assert!(sent.contains(&m.payload), "unexpected mail");
        got.insert(m.payload);
    }
    assert_eq!(got, sent);
    assert_eq!(lb.stats().dropped_unrouted, 0);
    drop(lb);

    // A clean-session device gets nothing published while it was offline (and connecting
    // with a clean session removes B's stored session from the shared broker).
    let lb = L::connect(MQTT, &idb, LinkOptions::default())
        .await
        .unwrap();
    drop(lb);
    assert!(!la
        .publish(&idb, &mail_body(0x44, 1000, &sfx))
        .await
        .unwrap());
    let lb = L::connect(MQTT, &idb, LinkOptions::default())
        .await
        .unwrap();
    let mut rx = lb.take_mail().unwrap();
    let marker = mail_body(0x52, 1001, &sfx);
    la.publish(&idb, &marker).await.unwrap();
    let m = next_mail(&mut rx, "marker").await;
    assert_eq!(
        m.payload, marker,
        "the mail sent while offline was not kept"
    );
}

// ---------------------------------------------------------------------------------------------
// NATS JetStream mailbox

async fn delete_consumer(server: &str, stream: &str, id: &str) {
    let Ok(c) = async_nats::connect(server).await else {
        return;
    };
    let js = async_nats::jetstream::new(c);
    if let Ok(s) = js.get_stream(stream).await {
        let _ = s.delete_consumer(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_keeps_mail_for_an_offline_device_and_redelivers_only_unacked_mail() {
    // Its own server: a JetStream stream must not stay behind on the shared one.
    let Some(server) = common::private_nats::PrivateNats::start() else {
        eprintln!("skipped: nats-server is not installed");
        return;
    };
    let nats = server.addr();
    type L = keav_net::nats::Link;
    let sfx = suffix();
    let (ida, idb) = (format!("ja-{sfx}"), format!("jb-{sfx}"));
    let js = LinkOptions {
        jetstream: Some(JetStreamOptions {
            ack_wait: Duration::from_secs(1),
            ..JetStreamOptions::default()
        }),
        ..LinkOptions::default()
    };
    // B's consumer is created, then B goes offline.
    let lb = L::connect(nats, &idb, js.clone()).await.unwrap();
    drop(lb);
    let la = L::connect(nats, &ida, js.clone()).await.unwrap();
    const N: usize = 100;
    let sent: Vec<Vec<u8>> = (0..N)
        .map(|i| mail_body(if i % 3 == 0 { 0x52 } else { 0x44 }, i, &sfx))
        .collect();
    for m in &sent {
        assert!(la.publish(&idb, m).await.unwrap(), "stored by JetStream");
    }

    // B comes back and gets all of it; it acknowledges the even ones only.
    let lb = L::connect(nats, &idb, js.clone()).await.unwrap();
    let mut rx = lb.take_mail().unwrap();
    let mut got = BTreeSet::new();
    let mut acked = BTreeSet::new();
    while got.len() < N {
        let m = next_mail(&mut rx, "stored mail").await;
        assert_eq!(m.from, ida);
        let i = sent
            .iter()
            .position(|s| *s == m.payload)
            .expect("mail that was sent");
        let ack = m.ack.expect("JetStream mail carries an ack");
        if i % 2 == 0 && !acked.contains(&i) {
            ack.ack().await.unwrap();
            acked.insert(i);
        }
        got.insert(i);
    }
    assert_eq!(acked.len(), N / 2);
    drop(rx);
    drop(lb);

    // B again: only the unacknowledged ones come back.
    let lb = L::connect(nats, &idb, js.clone()).await.unwrap();
    let mut rx = lb.take_mail().unwrap();
    let mut again = BTreeSet::new();
    while again.len() < N / 2 {
        let m = next_mail(&mut rx, "redelivered mail").await;
        let i = sent.iter().position(|s| *s == m.payload).unwrap();
        assert!(!acked.contains(&i), "acked mail {i} was redelivered");
        m.ack
            .expect("JetStream mail carries an ack")
            .ack()
            .await
            .unwrap();
        again.insert(i);
    }
    // Online, mail comes once, from the consumer only (the core subscription ignores it).
    let live = mail_body(0x44, 5000, &sfx);
    assert!(la.publish(&idb, &live).await.unwrap());
    loop {
        let m = next_mail(&mut rx, "live mail").await;
        let ack = m
            .ack
            .expect("from the consumer, never from the core subscription");
        ack.ack().await.unwrap();
        if m.payload == live {
            break;
        }
        let i = sent.iter().position(|s| *s == m.payload).unwrap();
        assert!(!acked.contains(&i), "acked mail {i} was redelivered");
    }
    // Once the server has nothing pending for B, nothing else can arrive.
    let c = async_nats::connect(nats).await.unwrap();
    let stream = async_nats::jetstream::new(c)
        .get_stream("KEAV")
        .await
        .unwrap();
    let mut drained = false;
    for _ in 0..400 {
        let info = stream.consumer_info(&idb).await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(drained, "the consumer still has pending mail");
    while let Ok(m) = rx.try_recv() {
        assert!(m.ack.is_some(), "mail from the core subscription");
        assert_ne!(m.payload, live, "the live mail came twice");
        let i = sent.iter().position(|s| *s == m.payload);
        assert!(
            i.is_none_or(|i| !acked.contains(&i)),
            "acked mail redelivered"
        );
    }
    assert_eq!(lb.stats().dropped_busy, 0);
    drop((la, lb));
    delete_consumer(nats, "KEAV", &idb).await;
    delete_consumer(nats, "KEAV", &ida).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_jetstream_mailbox_refuses_new_mail_with_an_error() {
    let dir = TempDir::new().unwrap();
    let port = free_port();
    let mut cmd = Command::new("nats-server");
    cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path());
    let Some(_server) = Private::start(cmd, port) else {
        eprintln!("NOTICE: nats-server cannot be started: test skipped");
        return;
    };
    type L = keav_net::nats::Link;
    let addr = format!("127.0.0.1:{port}");
    let sfx = suffix();
    let (ida, idb) = (format!("fa-{sfx}"), format!("fb-{sfx}"));
    let js = LinkOptions {
        jetstream: Some(JetStreamOptions {
            stream: "KEAVSMALL".into(),
            max_messages: 5,
            ..JetStreamOptions::default()
        }),
        ..LinkOptions::default()
    };
    let lb = L::connect(&addr, &idb, js.clone()).await.unwrap();
    let la = L::connect(&addr, &ida, js).await.unwrap();
    for i in 0..5 {
        assert!(la.publish(&idb, &mail_body(0x44, i, &sfx)).await.unwrap());
    }
    let r = la.publish(&idb, &mail_body(0x44, 5, &sfx)).await;
    match r {
        Err(Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            assert!(e.to_string().contains("full"), "{e}");
        }
        r => panic!("a full mailbox must refuse: {r:?}"),
    }
    // Until B takes its mail, it stays in the stream; once acked, there is room again.
    let mut rx = lb.take_mail().unwrap();
    for i in 0..5 {
        let m = next_mail(&mut rx, "stored mail").await;
        assert_eq!(m.payload, mail_body(0x44, i, &sfx), "in order");
        m.ack.unwrap().ack().await.unwrap();
    }
    assert!(la.publish(&idb, &mail_body(0x44, 6, &sfx)).await.unwrap());
    let m = next_mail(&mut rx, "mail after room was made").await;
    assert_eq!(m.payload, mail_body(0x44, 6, &sfx));
}

// ---------------------------------------------------------------------------------------------
// MQTT broker restart

fn mosquitto(dir: &TempDir, port: u16) -> Command {
    let conf = dir.path().join("mosquitto.conf");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Mosquitto started as root drops to its own user: let it write its database.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [dir.path(), data.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
    }
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nautosave_interval 1\n",
            data.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(conf);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_links_reconnect_after_a_broker_restart_and_mail_flows_again() {
    let dir = TempDir::new().unwrap();
    let port = free_port();
    let Some(mut broker) = Private::start(mosquitto(&dir, port), port) else {
        eprintln!("NOTICE: mosquitto cannot be started: test skipped");
        return;
    };
    type L = keav_net::mqtt::Link;
    let addr = format!("127.0.0.1:{port}");
    let sfx = suffix();
    let (ida, idb) = (format!("ra-{sfx}"), format!("rb-{sfx}"));
    let la = L::connect(&addr, &ida, LinkOptions::default())
        .await
        .unwrap();
    let persistent = LinkOptions {
        persistent_session: true,
        ..LinkOptions::default()
    };
    let lb = L::connect(&addr, &idb, persistent).await.unwrap();
    let mut rx = lb.take_mail().unwrap();
    assert_eq!((la.connections(), lb.connections()), (1, 1));
    la.publish(&idb, &mail_body(0x44, 0, &sfx)).await.unwrap();
    assert_eq!(
        next_mail(&mut rx, "before").await.payload,
        mail_body(0x44, 0, &sfx)
    );

    // kill -9, then the same broker on the same port.
    broker.kill();
    drop(broker);
    let Some(_broker) = Private::start(mosquitto(&dir, port), port) else {
        panic!("mosquitto did not restart");
    };
    for _ in 0..1200 {
        if la.connections() >= 2 && lb.connections() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        la.connections() >= 2 && lb.connections() >= 2,
        "links did not reconnect: {} {}",
        la.connections(),
        lb.connections()
    );
    // B subscribes again right after its ConnAck: publish until one mail makes it through.
    let mut through = None;
    for i in 1..=100 {
        la.publish(&idb, &mail_body(0x44, i, &sfx)).await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            through = Some(m);
            break;
        }
    }
    let m = through.expect("no mail after the restart");
    assert_eq!(m.from, ida);
    assert!(m.payload.starts_with(&[0x44]));
}
