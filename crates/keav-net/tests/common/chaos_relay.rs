//! A misbehaving relay for the messaging attack tests: a plain MQTT client that answers to a
//! relay id like `keav relay` does (it takes `Forward` frames from devices on
//! `keav/v1/<relay>/from/<device>`, pushes them to `keav/v1/<dst>/from/<relay>` and
//! acknowledges custody with `Stored` frames), but with seeded chaos: it drops, duplicates,
//! holds back, delays and replays frames, and sometimes acknowledges custody of a frame it
//! then drops (a lying custody ack). It keeps no mailbox and ignores `Pull` (it pushes at
//! once), the devices' `Stored` answers and their flow control (`Refused { Later }`, `Need`).
//!
//! Included with `#[path]` by the tests that use it; it needs `mod common` in the test crate.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keav_proto::route::Frame;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How badly the relay behaves. Percentages are per `Forward` frame taken from a device.
#[derive(Clone, Copy, Debug)]
pub struct Chaos {
    /// Seed of the relay's pseudo-random choices.
    pub seed: u64,
    /// Frames dropped.
    pub drop_pct: u32,
    /// Of the dropped frames, those acknowledged (`Stored`) to the sender anyway.
    pub lie_pct: u32,
    /// Frames pushed twice.
    pub dup_pct: u32,
    /// Frames held back and pushed 100–600 ms later (after later frames, often after the
    /// sender's resend of the same record).
    pub hold_pct: u32,
    /// Frames delayed by 1–40 ms (local reordering).
    pub delay_pct: u32,
    /// Chance per frame that an old frame (one of the last 2048 pushed) is pushed again.
    pub replay_pct: u32,
}

impl Chaos {
    /// A well-behaved relay: pushes every frame at once, once, and acknowledges it.
    pub fn none() -> Chaos {
        Chaos {
            seed: 1,
            drop_pct: 0,
            lie_pct: 0,
            dup_pct: 0,
            hold_pct: 0,
            delay_pct: 0,
            replay_pct: 0,
        }
    }

    /// About 10% each of drops (half of them acknowledged anyway), duplicates, held-back
    /// frames, delays and replays.
    pub fn heavy(seed: u64) -> Chaos {
        Chaos {
            seed,
            drop_pct: 10,
            lie_pct: 50,
            dup_pct: 10,
            hold_pct: 10,
            delay_pct: 10,
            replay_pct: 10,
        }
    }
}

/// What the relay did (a snapshot of its counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChaosStats {
    /// `Forward` frames taken from devices.
    pub forwards: u64,
    /// Frames published to destinations (first pushes, duplicates, held, replays).
    pub pushed: u64,
    /// Frames dropped.
    pub dropped: u64,
    /// Dropped frames whose custody was acknowledged anyway.
    pub lied: u64,
    /// Frames pushed twice.
    pub duplicated: u64,
    /// Frames held back for 100–600 ms.
    pub held: u64,
    /// Frames delayed by a few ms.
    pub delayed: u64,
    /// Old frames pushed again.
    pub replayed: u64,
    /// `Stored` custody acks sent to senders.
    pub custody_acks: u64,
    /// `Pull` frames from devices (ignored).
    pub pulls: u64,
    /// `Stored` frames from devices (ignored).
    pub device_acks: u64,
    /// `Refused { Later }` and `Need` frames from devices (ignored).
    pub flow: u64,
    /// Anything else: undecodable, other kinds, a `Forward` whose `src` is not its sender.
    pub odd: u64,
}

#[derive(Default)]
struct Counters {
    forwards: AtomicU64,
    pushed: AtomicU64,
    dropped: AtomicU64,
    lied: AtomicU64,
    duplicated: AtomicU64,
    held: AtomicU64,
    delayed: AtomicU64,
    replayed: AtomicU64,
    custody_acks: AtomicU64,
    pulls: AtomicU64,
    device_acks: AtomicU64,
    flow: AtomicU64,
    odd: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// xorshift64*: small, seeded, good enough for choosing misdeeds.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pct(&mut self, p: u32) -> bool {
        self.below(100) < u64::from(p)
    }
}

/// The running chaos relay; dropping it stops it.
pub struct ChaosRelay {
    id: String,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ChaosRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Most frames remembered for replays.
const HISTORY: usize = 2048;

struct Worker {
    id: String,
    client: AsyncClient,
    chaos: Chaos,
    rng: Rng,
    counters: Arc<Counters>,
    /// Frames to push at a later instant: (due, topic, frame).
    later: Vec<(Instant, String, Vec<u8>)>,
    history: VecDeque<(String, Vec<u8>)>,
}

impl Worker {
    async fn publish(&mut self, topic: &str, frame: Vec<u8>) {
        bump(&self.counters.pushed);
        // A closed client only happens when the relay is being dropped.
        let _ = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, frame)
            .await;
    }

    async fn push(&mut self, topic: &str, frame: Vec<u8>) {
        if self.history.len() >= HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((topic.to_string(), frame.clone()));
        self.publish(topic, frame).await;
    }

    async fn custody(&mut self, key: keav_proto::route::EntryKey) {
        bump(&self.counters.custody_acks);
        let ack = Frame::Stored {
            src: key.src.clone(),
            dst: key.dst,
            stream: key.stream,
            seqs: vec![key.seq],
        };
        let topic = format!("keav/v1/{}/from/{}", key.src, self.id);
        self.publish(&topic, ack.encode()).await;
    }

    async fn on_frame(&mut self, from: &str, bytes: &[u8]) {
        let c = self.counters.clone();
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(_) => {
                bump(&c.odd);
                return;
            }
        };
        let key = frame.entry_key();
        match frame {
            Frame::Forward {
                hops,
                src,
                dst,
                body,
            } if src == from && hops > 0 => {
                bump(&c.forwards);
                let out = Frame::Forward {
                    hops: hops - 1,
                    src,
                    dst: dst.clone(),
                    body,
                }
                .encode();
                let topic = format!("keav/v1/{dst}/from/{}", self.id);
                let ch = self.chaos;
                let mut acked = true;
                if self.rng.pct(ch.drop_pct) {
                    bump(&c.dropped);
                    acked = self.rng.pct(ch.lie_pct);
                    if acked {
                        bump(&c.lied);
                    }
                } else if self.rng.pct(ch.dup_pct) {
                    bump(&c.duplicated);
                    self.push(&topic, out.clone()).await;
                    self.push(&topic, out).await;
                } else if self.rng.pct(ch.hold_pct) {
                    bump(&c.held);
                    let at = Instant::now() + Duration::from_millis(100 + self.rng.below(500));
                    self.later.push((at, topic, out));
                } else if self.rng.pct(ch.delay_pct) {
                    bump(&c.delayed);
                    let at = Instant::now() + Duration::from_millis(1 + self.rng.below(40));
                    self.later.push((at, topic, out));
                } else {
                    self.push(&topic, out).await;
                }
                if acked {
                    if let Some(k) = key {
                        self.custody(k).await;
                    }
                }
                if !self.history.is_empty() && self.rng.pct(ch.replay_pct) {
                    bump(&c.replayed);
                    let i = self.rng.below(self.history.len() as u64) as usize;
                    if let Some((t, f)) = self.history.get(i).cloned() {
                        self.publish(&t, f).await;
                    }
                }
            }
            Frame::Pull { .. } => bump(&c.pulls),
            Frame::Stored { .. } => bump(&c.device_acks),
            Frame::Refused {
                reason: keav_proto::route::RefuseReason::Later,
                ..
            }
            | Frame::Need { .. } => bump(&c.flow),
            _ => bump(&c.odd),
        }
    }

    async fn release_due(&mut self) {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.later)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.later = keep;
        for (_, topic, frame) in due {
            self.push(&topic, frame).await;
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some((from, payload)) => self.on_frame(&from, &payload).await,
                    None => break,
                },
                _ = tick.tick() => self.release_due().await,
            }
        }
    }
}

impl ChaosRelay {
    /// Connects to the MQTT broker at `host:port` as relay `id`, subscribes to its inbox and
    /// returns once the broker acknowledged the subscription (bounded: 5 s, else panics).
    pub async fn start(host: &str, port: u16, id: &str, chaos: Chaos) -> ChaosRelay {
        let mut mo = MqttOptions::new(id, host, port);
        mo.set_max_packet_size(1 << 20, 1 << 20);
        mo.set_keep_alive(Duration::from_secs(30));
        mo.set_clean_session(true);
        let (client, mut ev) = AsyncClient::new(mo, 4096);
        let inbox = format!("keav/v1/{id}/from/#");
        let prefix = format!("keav/v1/{id}/from/");
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let sub_client = client.clone();
        let events = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // Clean session: subscribe on every connection, through a task (this
                        // loop drains the request queue).
                        let (c, f) = (sub_client.clone(), inbox.clone());
                        tokio::spawn(async move {
                            let _ = c.subscribe(f, QoS::AtLeastOnce).await;
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(from) = p.topic.strip_prefix(prefix.as_str()) {
                            let _ = tx.send((from.to_string(), p.payload.to_vec()));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let worker = Worker {
            id: id.to_string(),
            client,
            chaos,
            rng: Rng::new(chaos.seed),
            counters: counters.clone(),
            later: Vec::new(),
            history: VecDeque::new(),
        };
        let work = tokio::spawn(worker.run(rx));
        tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .expect("the chaos relay's subscription was never acknowledged")
            .expect("the chaos relay's event loop ended");
        ChaosRelay {
            id: id.to_string(),
            counters,
            tasks: vec![events, work],
        }
    }

    /// The relay's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the relay did so far.
    pub fn stats(&self) -> ChaosStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ChaosStats {
            forwards: l(&c.forwards),
            pushed: l(&c.pushed),
            dropped: l(&c.dropped),
            lied: l(&c.lied),
            duplicated: l(&c.duplicated),
            held: l(&c.held),
            delayed: l(&c.delayed),
            replayed: l(&c.replayed),
            custody_acks: l(&c.custody_acks),
            pulls: l(&c.pulls),
            device_acks: l(&c.device_acks),
            flow: l(&c.flow),
            odd: l(&c.odd),
        }
    }
}
