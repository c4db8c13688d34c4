//! Issue 5: the broker's own queue as the mailbox, and the broker killed (SIGKILL) and
//! restarted twice while 100,000 messages flow to an offline device: an MQTT persistent
//! session on a private Mosquitto (with persistence), and a JetStream stream on a private
//! nats-server. The device comes back and must receive every message exactly once, in order.
//!
//! Each test starts its own broker process on a free loopback port and kills it by PID.
//! `KEAV_OUTAGE_MESSAGES` lowers the count for quick local runs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{device, settings};
use keav_net::messenger::{Carrier, Messenger, MessengerOptions};
use keav_net::mqtt::LinkOptions;
use keav_net::nats::JetStreamOptions;
use rand_core::{OsRng, RngCore};
use tempfile::TempDir;

fn count() -> u64 {
    std::env::var("KEAV_OUTAGE_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mqtt,
    Nats,
}

/// A broker process of our own on `port`, restartable, killed (SIGKILL) when dropped.
struct Broker {
    kind: Kind,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Broker {
    fn start(kind: Kind, dir: &Path) -> Option<Broker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut b = Broker {
            kind,
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        b.spawn()?;
        Some(b)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Option<()> {
        let mut cmd = match self.kind {
            Kind::Mqtt => {
                let conf = self.dir.join("mosquitto.conf");
                let data = self.dir.join("mosquitto-data");
                std::fs::create_dir_all(&data).ok()?;
                // Queue without bound for offline persistent sessions; save to disk every
                // second (what was received since the last save is lost by a SIGKILL: the
                // senders' outboxes resend it after they reconnect).
                std::fs::write(
                    &conf,
                    format!(
                        "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                         persistence_location {}/\nautosave_interval 1\n\
                         max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n\
                         persistent_client_expiration 1h\n",
                        self.port,
                        data.display()
                    ),
                )
                .ok()?;
                let mut c = Command::new("mosquitto");
                c.arg("-c").arg(conf);
                c
            }
            Kind::Nats => {
                let mut c = Command::new("nats-server");
                c.args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(self.dir.join("jetstream"));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        self.child = Some(child);
        for _ in 0..400 {
            if std::net::TcpStream::connect(self.addr()).is_ok() {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "the private {:?} broker never listened on {}",
            self.kind,
            self.addr()
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn().expect("broker restarts");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn link_options(kind: Kind) -> LinkOptions {
    match kind {
        Kind::Mqtt => LinkOptions {
            persistent_session: true,
            ..LinkOptions::default()
        },
        Kind::Nats => LinkOptions {
            jetstream: Some(JetStreamOptions::default()),
            ..LinkOptions::default()
        },
    }
}

async fn messenger(
    kind: Kind,
    addr: &str,
    dev: &keav_net::device::Device,
    id: &str,
    opts: &MessengerOptions,
) -> Messenger {
    let carrier = match kind {
        Kind::Mqtt => Carrier::Mqtt(Arc::new(
            keav_net::mqtt::Link::connect(addr, id, link_options(kind))
                .await
                .expect("MQTT link"),
        )),
        Kind::Nats => Carrier::Nats(Arc::new(
            keav_net::nats::Link::connect(addr, id, link_options(kind))
                .await
                .expect("NATS link"),
        )),
    };
    Messenger::start(dev.clone(), carrier, opts.clone())
        .await
        .expect("messenger")
}

fn body(i: u64) -> Vec<u8> {
    format!("heart rate sample {i:08} bpm {}", 55 + i % 50).into_bytes()
}

async fn outage(kind: Kind) {
    let dir = TempDir::new().unwrap();
    let Some(mut broker) = Broker::start(kind, dir.path()) else {
        eprintln!("skipped: cannot start a private {kind:?} broker (is it installed?)");
        return;
    };
    let n = count();
    let sfx = format!("{:012x}", OsRng.next_u64() >> 16);
    let (ida, idb) = (format!("mon-{sfx}"), format!("phone-{sfx}"));
    let a_dev = device(&dir, &ida, settings(Some("outage code 5531")));
    let b_dev = device(&dir, &idb, settings(Some("outage code 5531")));
    // A resend of a record the broker lost comes from the reconnect (every unacknowledged
    // record is due again once the link is back), not from a short timer.
    let mut opts = MessengerOptions::default();
    opts.durable.outbox.rto_initial_ms = 60_000;
    opts.durable.outbox.rto_max_ms = 60_000;
    // Mosquitto queues for the offline persistent session without a per-message ack: a
    // record counts as in custody once published, so the flow window lets the whole backlog
    // go out (JetStream's publish acks put records in custody anyway).
    opts.durable.broker_custody = kind == Kind::Mqtt;
    let addr = broker.addr();
    let a = messenger(kind, &addr, &a_dev, &ida, &opts).await;
    let b = messenger(kind, &addr, &b_dev, &idb, &opts).await;
    let (acc, zid) = tokio::join!(b.accept_pair(), a.pair(&idb));
    assert_eq!(acc.expect("b pairs").0, ida);
    zid.expect("a pairs");
    b.shutdown().await.expect("b goes offline");

    let started = Instant::now();
    let mut sent: BTreeMap<u64, u64> = BTreeMap::new();
    let mut kills = 0u64;
    let mut i = 0u64;
    while i < n {
        let end = (i + 512).min(n);
        let bodies: Vec<Vec<u8>> = (i..end).map(body).collect();
        let sends = bodies.iter().map(|x| a.send(&idb, x));
        for (k, r) in (i..end).zip(futures_util::future::join_all(sends).await) {
            assert!(sent.insert(r.expect("send commits"), k).is_none());
        }
        i = end;
        if kills < 2 && i >= n * (kills + 1) / 3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            broker.restart();
            kills += 1;
        }
    }
    assert_eq!(kills, 2);
    assert!(
        sent.keys().copied().eq(0..n),
        "sequence numbers 0..n, once each"
    );
    eprintln!(
        "{kind:?}: {n} sent in {:.1} s, broker killed twice; sender {:?}",
        started.elapsed().as_secs_f64(),
        a.stats()
    );

    // The device comes back and drains the broker's queue (and the resends).
    let b = messenger(kind, &addr, &b_dev, &idb, &opts).await;
    let started = Instant::now();
    for (seq, k) in &sent {
        let msg = tokio::time::timeout(Duration::from_secs(180), b.recv())
            .await
            .unwrap_or_else(|_| panic!("message {seq} never came; receiver {:?}", b.stats()))
            .expect("recv");
        assert_eq!(msg.seq, *seq, "in order, no gap, no repeat");
        assert_eq!(msg.from, ida);
        assert_eq!(msg.body, body(*k));
        if msg.seq % 1000 == 999 || msg.seq + 1 == n {
            b.ack(&msg).await.expect("ack");
        }
    }
    eprintln!(
        "{kind:?}: {n} received in {:.1} s; receiver {:?}",
        started.elapsed().as_secs_f64(),
        b.stats()
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), b.recv())
            .await
            .is_err(),
        "a message was released twice"
    );
    a.flush(&idb, Duration::from_secs(180))
        .await
        .expect("every message acknowledged end to end");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_persistent_session_broker_killed_twice_offline_device_gets_all_once_in_order() {
    outage(Kind::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_server_killed_twice_offline_device_gets_all_once_in_order() {
    outage(Kind::Nats).await;
}
