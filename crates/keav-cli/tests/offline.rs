//! Issue 5's offline-delivery tests with real processes: a device sends 100,000 messages to
//! a peer that is offline, through a `keav relay` process that is killed (SIGKILL) and
//! restarted twice while the messages flow; the peer then comes back and must receive every
//! message exactly once, in order.
//!
//! Needs the local Mosquitto on 127.0.0.1:1883 (`.ci/run` starts it). The message count can
//! be lowered with `KEAV_OFFLINE_MESSAGES` for quick local runs.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader};
use std::process::ChildStdout;

use common::{path_str, Joined, Proc, SHORT};
use keav_net::broker::LinkOptions;
use keav_net::device::{Device, DeviceSettings};
use keav_net::messenger::{Carrier, Delivery, Messenger, MessengerOptions};

const MQTT: &str = "127.0.0.1:1883";

fn count() -> u64 {
    std::env::var("KEAV_OFFLINE_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

fn run_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// Message `i`'s body: its number and some filler, distinct per message.
fn body(i: u64) -> Vec<u8> {
    format!("reading {i:08} bpm {} ......", 60 + i % 40).into_bytes()
}

/// `keav relay` on the MQTT broker, mailbox at `mailbox`; returns once it is routing (its
/// first stdout line, `relay ID running`).
fn start_relay(id: &str, mailbox: &Path) -> (Proc, BufReader<ChildStdout>) {
    let mut p = Proc::spawn(&[
        "relay",
        "--id",
        id,
        "--mailbox",
        path_str(mailbox),
        "--mqtt",
        MQTT,
        "--route",
        "*=mqtt",
    ]);
    let out = p.stdout.take().expect("stdout");
    let (line, out) = Joined::spawn(move || {
        let mut r = BufReader::new(out);
        let mut l = String::new();
        let _ = r.read_line(&mut l);
        (l, r)
    })
    .join_timeout(SHORT);
    assert_eq!(
        line.trim_end(),
        format!("relay {id} running"),
        "stderr:\n{}",
        p.stderr_text()
    );
    (p, out)
}

async fn messenger(dir: &Path, name: &str, relay: &str) -> Messenger {
    let device = Device::open(dir.join(format!("{name}.redb")), DeviceSettings::default())
        .expect("device store");
    let link = keav_net::mqtt::Link::connect(MQTT, name, LinkOptions::default())
        .await
        .expect("MQTT link (is Mosquitto running on 127.0.0.1:1883?)");
    let opts = MessengerOptions {
        delivery: Delivery::Relay(relay.to_string()),
        ..MessengerOptions::default()
    };
    Messenger::start(device, Carrier::Mqtt(Arc::new(link)), opts)
        .await
        .expect("messenger")
}

#[test]
fn offline_peer_gets_every_message_once_in_order_through_a_relay_killed_twice() {
    let n = count();
    let dir = tempfile::tempdir().unwrap();
    let run = run_id();
    let (relay_id, mon, phone) = (
        format!("relay-{run}"),
        format!("mon-{run}"),
        format!("phone-{run}"),
    );
    let mailbox = dir.path().join("mailbox.redb");
    let mut relay = start_relay(&relay_id, &mailbox);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let m = messenger(dir.path(), &mon, &relay_id).await;
        let p = messenger(dir.path(), &phone, &relay_id).await;
        let (acc, zid) = tokio::join!(p.accept_pair(), m.pair(&phone));
        let (from, _) = acc.expect("phone pairs");
        assert_eq!(from, mon);
        zid.expect("monitor pairs");
        p.shutdown().await.expect("phone goes offline");

        // The phone is offline. Send n messages; kill the relay twice while they flow.
        let started = Instant::now();
        let mut kills = 0;
        let window = 512u64;
        let mut i = 0u64;
        let mut seqs = Vec::with_capacity(n as usize);
        while i < n {
            let end = (i + window).min(n);
            let bodies: Vec<Vec<u8>> = (i..end).map(body).collect();
            let sends = bodies.iter().map(|b| m.send(&phone, b));
            for (k, r) in (i..end).zip(futures_util::future::join_all(sends).await) {
                seqs.push((r.expect("send commits"), k));
            }
            i = end;
            if kills < 2 && i >= n * (kills + 1) / 3 {
                // Let the relay take part of the stream, then kill it mid-way.
                tokio::time::sleep(Duration::from_millis(300)).await;
                relay.0.kill();
                // Reaped, so the lock on its mailbox file is gone.
                let _ = relay.0.child.wait();
                kills += 1;
                relay = start_relay(&relay_id, &mailbox);
            }
        }
        assert_eq!(kills, 2);
        // Every message got its own sequence number; map them back to bodies.
        seqs.sort_unstable();
        assert!(seqs
            .iter()
            .enumerate()
            .all(|(s, (seq, _))| *seq == s as u64));
        eprintln!("sent {n} in {:.1} s", started.elapsed().as_secs_f64());

        // The phone comes back and drains its mailbox.
        let p = messenger(dir.path(), &phone, &relay_id).await;
        let started = Instant::now();
        for (expect_seq, k) in &seqs {
            let msg = tokio::time::timeout(Duration::from_secs(120), p.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("message {expect_seq} did not arrive; stats {:?}", p.stats())
                })
                .expect("recv");
            assert_eq!(msg.seq, *expect_seq, "in order");
            assert_eq!(msg.from, mon);
            assert_eq!(msg.body, body(*k), "body of message {expect_seq}");
            if msg.seq % 1000 == 999 || msg.seq + 1 == n {
                p.ack(&msg).await.expect("ack");
            }
        }
        eprintln!(
            "received {n} in {:.1} s; phone {:?}",
            started.elapsed().as_secs_f64(),
            p.stats()
        );
        // Nothing more: no duplicate is released.
        assert!(
            tokio::time::timeout(Duration::from_secs(2), p.recv())
                .await
                .is_err(),
            "a message was released twice"
        );
        m.flush(&phone, Duration::from_secs(120))
            .await
            .expect("every message acknowledged end to end");
        m.shutdown().await.unwrap();
        p.shutdown().await.unwrap();
    });
    relay.0.kill();
}
