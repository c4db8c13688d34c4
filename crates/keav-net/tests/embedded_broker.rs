//! The in-process MQTT broker: free ports, plain MQTT QoS 1 through it, a persistent session
//! catching up, two KEAV devices pairing over it, and a shutdown that frees its port.
#![cfg(feature = "embedded-broker")]

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{device, settings};
use keav_net::embedded_broker::{BrokerOptions, EmbeddedBroker};
use keav_net::mqtt::{Link, LinkOptions};
use keav_net::session::Options;
use keav_net::Error;
use keav_proto::cache::Verification;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tempfile::TempDir;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A rumqttc client whose event loop runs in a task: incoming publishes and the fact that
/// the connection ended come out of `events`.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Ev>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
enum Ev {
    ConnAck { session_present: bool },
    SubAck,
    PubAck,
    Publish(Publish),
    Ended(String),
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects and waits for the CONNACK.
    async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (Client, bool) {
        let mut mo = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        mo.set_clean_session(clean);
        mo.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = AsyncClient::new(mo, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let e = match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Ev::ConnAck {
                        session_present: a.session_present,
                    },
                    Ok(Event::Incoming(Packet::SubAck(_))) => Ev::SubAck,
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish(p),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Ended(e.to_string()));
                        return;
                    }
                };
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
        let mut c = Client {
            client,
            events,
            task,
        };
        match c.next().await {
            Ev::ConnAck { session_present } => (c, session_present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn next(&mut self) -> Ev {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no MQTT event in time")
            .expect("event task gone")
    }

    /// The next event that is not a PUBACK.
    async fn next_not_puback(&mut self) -> Ev {
        loop {
            match self.next().await {
                Ev::PubAck => continue,
                e => return e,
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        assert!(matches!(self.next_not_puback().await, Ev::SubAck));
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    async fn publish(&mut self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        assert!(matches!(self.next().await, Ev::PubAck));
    }

    async fn expect_publish(&mut self) -> Publish {
        match self.next_not_puback().await {
            Ev::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Sends DISCONNECT and waits until the event loop ended.
    async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        loop {
            if let Ev::Ended(_) = self.next().await {
                return;
            }
        }
    }
}

fn start() -> EmbeddedBroker {
    EmbeddedBroker::start(BrokerOptions::default()).unwrap()
}

#[test]
fn two_brokers_listen_on_distinct_free_loopback_ports() {
    let (b1, b2) = (start(), start());
    let (a1, a2) = (b1.addr(), b2.addr());
    assert_ne!(a1.port(), a2.port());
    for a in [a1, a2] {
        assert!(a.ip().is_loopback(), "{a}");
        assert_ne!(a.port(), 0);
        assert_ne!(a.port(), 1883);
        // Something listens there: rumqttd.
        TcpStream::connect_timeout(&a, WAIT).unwrap();
    }
}

#[test]
fn bad_options_and_a_taken_port_are_errors() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let opts = BrokerOptions {
        bind: taken.local_addr().unwrap(),
        ..BrokerOptions::default()
    };
    let e = EmbeddedBroker::start(opts).unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e:?}");
    for bad in [
        BrokerOptions {
            queue_segment_bytes: 512,
            ..BrokerOptions::default()
        },
        BrokerOptions {
            max_payload: 2 << 20,
            ..BrokerOptions::default()
        },
        BrokerOptions {
            queue_segments: 0,
            ..BrokerOptions::default()
        },
        BrokerOptions {
            connect_timeout: Duration::from_secs(3600),
            ..BrokerOptions::default()
        },
    ] {
        let e = EmbeddedBroker::start(bad).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mqtt_qos1_through_the_broker() {
    let broker = start();
    let (mut sub, _) = Client::connect(broker.addr(), "sub", true).await;
    sub.subscribe("sensors/+/hr").await;
    let (mut publ, _) = Client::connect(broker.addr(), "pub", true).await;
    publ.publish("sensors/watch/hr", b"72 bpm".to_vec()).await;
    let p = sub.expect_publish().await;
    assert_eq!(p.topic, "sensors/watch/hr");
    assert_eq!(&p.payload[..], b"72 bpm");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    // A full-size KEAV payload (64 KiB) fits the default packet limit.
    let big: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    publ.publish("sensors/watch/hr", big.clone()).await;
    assert_eq!(&sub.expect_publish().await.payload[..], &big[..]);
    // A topic nobody subscribed to reaches nobody; the next message still arrives.
    publ.publish("elsewhere", b"x".to_vec()).await;
    publ.publish("sensors/ring/hr", b"64 bpm".to_vec()).await;
    let p = sub.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("sensors/ring/hr", &b"64 bpm"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_what_was_published_while_it_was_offline() {
    let broker = start();
    let (mut phone, present) = Client::connect(broker.addr(), "phone", false).await;
    assert!(!present);
    phone.subscribe("hr/phone").await;
    phone.disconnect().await;

    let (mut watch, _) = Client::connect(broker.addr(), "watch", true).await;
    for i in 0..5u8 {
        watch.publish("hr/phone", vec![60 + i]).await;
    }
    let (mut phone, present) = Client::connect(broker.addr(), "phone", false).await;
    assert!(present, "the broker forgot the persistent session");
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(phone.expect_publish().await.payload.to_vec());
    }
    assert_eq!(got, (0..5u8).map(|i| vec![60 + i]).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keav_devices_pair_and_talk_over_the_embedded_broker() {
    let broker = start();
    let addr = broker.addr().to_string();
    let dir = TempDir::new().unwrap();
    let a = device(&dir, "a", settings(Some("embedded-4711")));
    let b = device(&dir, "b", settings(Some("embedded-4711")));
    let la = Link::connect(&addr, "watch", LinkOptions::default())
        .await
        .unwrap();
    let lb = Link::connect(&addr, "phone", LinkOptions::default())
        .await
        .unwrap();
    let opts = Options::default();
    let (ca, cb) = tokio::join!(la.connect_peer(&a, "phone", &opts), lb.accept(&b, &opts));
    let (mut ca, (from, mut cb)) = (ca.unwrap(), cb.unwrap());
    assert_eq!(from, "watch");
    assert_eq!(ca.peer().peer_zid, b.zid());
    assert_eq!(cb.peer().peer_zid, a.zid());
    assert_eq!(ca.peer().verification, Verification::Bound);
    assert_eq!(cb.peer().verification, Verification::Bound);
    assert_eq!(ca.peer().sas, cb.peer().sas);

    const N: usize = 20;
    let msg = |i: usize| format!("heart rate {} bpm", 60 + i).into_bytes();
    for i in 0..N {
        ca.send(&msg(i)).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..N {
        let d = tokio::time::timeout(WAIT, cb.recv())
            .await
            .expect("a reading went missing")
            .unwrap()
            .unwrap();
        got.push(d);
    }
    let mut want: Vec<Vec<u8>> = (0..N).map(msg).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    cb.send(b"ack").await.unwrap();
    let reply = tokio::time::timeout(WAIT, ca.recv()).await.unwrap();
    assert_eq!(reply.unwrap().unwrap(), b"ack");
    ca.close().await.unwrap();
    let end = tokio::time::timeout(WAIT, cb.recv()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_frees_the_port() {
    let broker = start();
    let addr = broker.addr();
    let (mut client, _) = Client::connect(addr, "c", true).await;
    client.subscribe("t").await;
    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .unwrap();
    // The connected client loses its connection...
    match client.next().await {
        Ev::Ended(why) => eprintln!("client connection ended: {why}"),
        other => panic!("expected the connection to end, got {other:?}"),
    }
    // ...nothing listens any more, and the port can be bound again.
    let refused = TcpStream::connect_timeout(&addr, WAIT).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    drop(TcpListener::bind(addr).unwrap());

    // Dropping a broker stops it too.
    let b = start();
    let addr = b.addr();
    drop(b);
    assert!(TcpStream::connect_timeout(&addr, WAIT).is_err());
}
