//! Broker-wide eavesdroppers for the messaging attack tests: an MQTT client subscribed to `#`
//! and a NATS client subscribed to `>` that record every message the broker delivers (into a
//! [`SpyLog`]) and can publish anything anywhere (the test brokers have no ACLs); and the
//! check that no window of key material occurs in what they recorded.
//!
//! Included with `#[path]` by the tests that use it; it needs `mod common` in the test crate.
#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;

use crate::common::spy::{Entry, SpyLog};

/// A subscriber to every topic of an MQTT broker (`#`; `$SYS` topics excluded by MQTT).
pub struct MqttSpy {
    client: AsyncClient,
    /// What it saw.
    pub log: SpyLog,
    task: JoinHandle<()>,
}

impl Drop for MqttSpy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MqttSpy {
    /// Connects as `client_id`, subscribes to `#` and returns once the broker acknowledged
    /// the subscription (bounded: 5 s, else panics).
    pub async fn start(host: &str, port: u16, client_id: &str) -> MqttSpy {
        let mut mo = MqttOptions::new(client_id, host, port);
        mo.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = AsyncClient::new(mo, 1024);
        client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
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
            .expect("the spy's subscription was never acknowledged")
            .expect("the spy's event loop ended");
        MqttSpy { client, log, task }
    }

    /// Publishes `payload` on `topic` (QoS 1, not retained) and waits (bounded) until the
    /// broker delivered it back to the spy, so it is queued for every subscriber before
    /// anything published afterwards.
    pub async fn inject(&self, topic: &str, payload: Vec<u8>) {
        let before = self.log.count(topic, &payload);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        let t = topic.to_string();
        self.log
            .wait_for("its own injected message", move |log| {
                log.iter()
                    .filter(|(lt, lp)| *lt == t && *lp == payload)
                    .count()
                    > before
            })
            .await;
    }
}

/// A subscriber to every subject of a NATS server (`>`).
pub struct NatsSpy {
    client: async_nats::Client,
    /// What it saw.
    pub log: SpyLog,
    task: JoinHandle<()>,
}

impl Drop for NatsSpy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NatsSpy {
    /// Connects to `addr` (`host:port`) and subscribes to `>`; returns once the server has
    /// the subscription (a flush round trip).
    pub async fn start(addr: &str) -> NatsSpy {
        let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(addr))
            .await
            .expect("NATS connect timed out")
            .unwrap();
        let mut sub = client.subscribe(">").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), client.flush())
            .await
            .expect("NATS flush timed out")
            .unwrap();
        let log = SpyLog::default();
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                l.push(m.subject.to_string(), m.payload.to_vec());
            }
        });
        NatsSpy { client, log, task }
    }

    /// Publishes and waits (bounded) until the server delivered it back to the spy.
    pub async fn inject(&self, subject: &str, payload: Vec<u8>) {
        let before = self.log.count(subject, &payload);
        self.client
            .publish(subject.to_string(), payload.clone().into())
            .await
            .unwrap();
        let s = subject.to_string();
        self.log
            .wait_for("its own injected message", move |log| {
                log.iter()
                    .filter(|(lt, lp)| *lt == s && *lp == payload)
                    .count()
                    > before
            })
            .await;
    }
}

/// Window length of the key-material check.
pub const WINDOW: usize = 16;

/// Every `WINDOW`-byte window of `secret` with at least 12 distinct byte values (key bytes;
/// counters, lengths, flags and magic numbers have far fewer).
pub fn secret_windows(secret: &[u8]) -> HashSet<[u8; WINDOW]> {
    secret
        .windows(WINDOW)
        .filter(|w| w.iter().collect::<HashSet<_>>().len() >= 12)
        .filter_map(|w| <[u8; WINDOW]>::try_from(w).ok())
        .collect()
}

/// The first recorded message (topic, offset) containing one of `windows`.
pub fn find_window(log: &[Entry], windows: &HashSet<[u8; WINDOW]>) -> Option<(String, usize)> {
    log.iter().find_map(|(t, p)| {
        p.windows(WINDOW)
            .position(|w| <[u8; WINDOW]>::try_from(w).is_ok_and(|w| windows.contains(&w)))
            .map(|at| (t.clone(), at))
    })
}
