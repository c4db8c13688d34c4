//! The routing task: one task owns the push state of every queue and takes every incoming
//! frame, in batches (see the module docs of [`super`] for the behaviour).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keav_proto::route::{EntryKey, Frame, RefuseReason, MAX_KEYS};
use keav_store::mailbox::{Entry, Mailbox, PutOutcome};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::{Counters, NextHop, RelayConfig, RouteRule};
use crate::broker::MailAck;

/// Most events processed as one batch.
const BATCH_MAX: usize = 512;
/// How long a batch waits for more events after its first.
const BATCH_WAIT: Duration = Duration::from_millis(2);
/// Most entries read from the mailbox at once when pushing.
const PEEK_MAX: usize = 256;
/// Most entries pushed at once for one `Need` (the entry needed and the ones after it).
const NEED_RUN: usize = 256;
/// Most keys remembered per queue as wanted (needed by the device, not in the mailbox).
const WANTED_MAX: usize = 1024;
/// A wanted key is forgotten after this long (the device asks again while it still needs it).
const WANTED_TTL: Duration = Duration::from_secs(60);

/// Something for the routing task.
pub(crate) enum Event {
    /// A frame from a carrier.
    Frame {
        /// Who sent it, and where replies go.
        from: Source,
        /// The frame's bytes (not parsed yet).
        bytes: Vec<u8>,
        /// JetStream acknowledgement, once the frame is committed (boxed: it is large).
        ack: Option<Box<MailAck>>,
    },
    /// A TCP connection attached as `peer`.
    TcpUp {
        /// The attached id.
        peer: String,
        /// The connection's number.
        conn: u64,
        /// Its outgoing frames.
        tx: mpsc::Sender<Vec<u8>>,
    },
    /// That connection ended.
    TcpDown {
        /// The attached id.
        peer: String,
        /// The connection's number.
        conn: u64,
    },
}

/// Where a frame came from.
#[derive(Clone)]
pub(crate) enum Source {
    /// The MQTT link, from this device or relay id.
    Mqtt(String),
    /// The NATS link, from this device or relay id.
    Nats(String),
    /// A TCP connection attached as `peer`.
    Tcp {
        /// The attached id.
        peer: String,
        /// The connection's number.
        conn: u64,
        /// Its outgoing frames.
        tx: mpsc::Sender<Vec<u8>>,
    },
}

/// A carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Via {
    Mqtt,
    Nats,
    Tcp,
}

impl Source {
    fn peer(&self) -> &str {
        match self {
            Source::Mqtt(p) | Source::Nats(p) | Source::Tcp { peer: p, .. } => p,
        }
    }

    fn via(&self) -> Via {
        match self {
            Source::Mqtt(_) => Via::Mqtt,
            Source::Nats(_) => Via::Nats,
            Source::Tcp { .. } => Via::Tcp,
        }
    }

    /// Identifies the reply path (frames with the same key are answered together).
    fn reply_key(&self) -> ReplyPath {
        let conn = match self {
            Source::Tcp { conn, .. } => *conn,
            _ => 0,
        };
        (self.via(), self.peer().to_string(), conn)
    }
}

/// A reply path: carrier, peer id, TCP connection number (0 on brokers).
type ReplyPath = (Via, String, u64);

/// Where frames to one hop go.
enum Target {
    /// A broker link's publish queue and the hop's id.
    Broker(mpsc::Sender<(String, Vec<u8>)>, String),
    /// A TCP connection's queue.
    Tcp(mpsc::Sender<Vec<u8>>),
}

impl Target {
    /// Queues `frame`; false if the carrier's queue is full or gone (sent again later).
    fn send(&self, frame: Vec<u8>) -> bool {
        match self {
            Target::Broker(tx, to) => tx.try_send((to.clone(), frame)).is_ok(),
            Target::Tcp(tx) => tx.try_send(frame).is_ok(),
        }
    }
}

/// One pushed entry without a custody ack yet.
struct Flight {
    frame: Vec<u8>,
    sent: Instant,
}

/// On a `Pull`, in-flight entries pushed at least this long ago count as lost (the device
/// restarted) and are pushed again at once.
const STALE_ON_PULL: Duration = Duration::from_millis(250);

/// A device's last Pull.
struct Pull {
    at: Instant,
    window: u32,
    via: Via,
}

/// Push state of one queue (in memory only: rebuilt from the mailbox after a restart).
struct Queue {
    /// In-flight entries by queue position.
    inflight: BTreeMap<u64, Flight>,
    /// Positions of the in-flight entries by key.
    by_key: HashMap<EntryKey, u64>,
    /// The cursor: the position of the last entry considered by the push (the next peek
    /// starts after it; entries before it are in flight, acknowledged, or pushed out of
    /// order for a `Need`).
    last_pushed: Option<u64>,
    /// The mailbox may hold entries after `last_pushed`.
    more: bool,
    /// For device queues: the device's last Pull.
    pull: Option<Pull>,
    /// The hop answered `Refused { Later }`: push nothing new before this instant, unless
    /// it acknowledges custody of something first.
    paused_until: Option<Instant>,
    /// Keys the device needs that were not in the mailbox (pushed at once when they are
    /// stored), with when they were last asked for.
    wanted: HashMap<EntryKey, Instant>,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            inflight: BTreeMap::new(),
            by_key: HashMap::new(),
            last_pushed: None,
            more: true,
            pull: None,
            paused_until: None,
            wanted: HashMap::new(),
        }
    }

    /// Forgets what is in flight: everything still in the mailbox is pushed again.
    fn rewind(&mut self) {
        self.inflight.clear();
        self.by_key.clear();
        self.last_pushed = None;
        self.more = true;
        self.paused_until = None;
    }

    /// Moves the cursor back so that the next push starts at `pos` at the latest.
    fn rewind_to(&mut self, pos: u64) {
        if self.last_pushed.is_some_and(|last| last >= pos) {
            self.last_pushed = pos.checked_sub(1);
        }
        self.more = true;
    }

    fn paused(&mut self, now: Instant) -> bool {
        match self.paused_until {
            Some(t) if now < t => true,
            Some(_) => {
                self.paused_until = None;
                false
            }
            None => false,
        }
    }

    /// Records `e` as in flight (pushed at `now`).
    fn fly(&mut self, e: Entry, now: Instant) {
        if let Some(old) = self.by_key.insert(e.key, e.pos) {
            if old != e.pos {
                self.inflight.remove(&old);
            }
        }
        self.inflight.insert(
            e.pos,
            Flight {
                frame: e.frame,
                sent: now,
            },
        );
    }

    /// Remembers that the device needs `key` (bounded: the stalest key makes room).
    fn want(&mut self, key: EntryKey, now: Instant) {
        if self.wanted.len() >= WANTED_MAX && !self.wanted.contains_key(&key) {
            let oldest = self
                .wanted
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.wanted.remove(&k);
            }
        }
        self.wanted.insert(key, now);
    }

    fn online(&self, now: Instant, presence: Duration) -> bool {
        self.pull
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.at) < presence)
    }
}

/// Entries to store in one queue.
struct Put {
    queue: String,
    items: Vec<(EntryKey, Vec<u8>)>,
    /// The index in [`Batch::sources`] of each item's sender.
    origins: Vec<usize>,
}

/// A `Need` from a device: the queue, the key needed, the index in [`Batch::sources`] of
/// the device, and how many entries (from the key's sequence number on) to look up.
struct Need {
    queue: String,
    key: EntryKey,
    origin: usize,
    run: usize,
}

/// What one batch of events asks of the mailbox and the carriers.
#[derive(Default)]
struct Batch {
    sources: Vec<Source>,
    puts: Vec<Put>,
    removes: Vec<(String, Vec<EntryKey>)>,
    pulls: Vec<(String, Via, u32)>,
    refusals: Vec<(usize, RefuseReason, EntryKey)>,
    /// `Refused { Later }` from a hop: (its queue, the key).
    laters: Vec<(String, EntryKey)>,
    needs: Vec<Need>,
    acks: Vec<MailAck>,
}

impl Batch {
    fn source(&mut self, s: &Source) -> usize {
        // Consecutive frames usually share a sender.
        if let Some(last) = self.sources.last() {
            if last.reply_key() == s.reply_key() {
                return self.sources.len() - 1;
            }
        }
        self.sources.push(s.clone());
        self.sources.len() - 1
    }

    fn put(&mut self, queue: &str, key: EntryKey, frame: Vec<u8>, origin: usize) {
        let i = match self.puts.iter().position(|p| p.queue == queue) {
            Some(i) => i,
            None => {
                self.puts.push(Put {
                    queue: queue.to_string(),
                    items: Vec::new(),
                    origins: Vec::new(),
                });
                self.puts.len() - 1
            }
        };
        if let Some(p) = self.puts.get_mut(i) {
            p.items.push((key, frame));
            p.origins.push(origin);
        }
    }

    fn remove(&mut self, queue: &str, keys: Vec<EntryKey>) {
        match self.removes.iter_mut().find(|(q, _)| q == queue) {
            Some((_, k)) => k.extend(keys),
            None => self.removes.push((queue.to_string(), keys)),
        }
    }
}

/// Custody acks being gathered: per (reply path, src, dst, stream), the sequence numbers.
#[derive(Default)]
struct Acks {
    groups: Vec<(usize, EntryKey, Vec<u64>)>,
    index: HashMap<(ReplyPath, String, String, u8), usize>,
}

impl Acks {
    fn add(&mut self, origin: usize, source: &Source, key: EntryKey) {
        let k = (
            source.reply_key(),
            key.src.clone(),
            key.dst.clone(),
            key.stream,
        );
        match self.index.get(&k).and_then(|&i| self.groups.get_mut(i)) {
            Some((_, _, seqs)) => {
                if !seqs.contains(&key.seq) {
                    seqs.push(key.seq);
                }
            }
            None => {
                self.index.insert(k, self.groups.len());
                let seq = key.seq;
                self.groups.push((origin, key, vec![seq]));
            }
        }
    }
}

/// The routing task's state.
pub(crate) struct Router {
    id: String,
    routes: Vec<RouteRule>,
    /// The carrier of each next relay (queues named after a next relay).
    relay_hops: HashMap<String, Via>,
    window: u32,
    resend: Duration,
    presence: Duration,
    mailbox: Arc<Mailbox>,
    counters: Arc<Counters>,
    mqtt: Option<mpsc::Sender<(String, Vec<u8>)>>,
    nats: Option<mpsc::Sender<(String, Vec<u8>)>>,
    /// The newest attached TCP connection of each id.
    tcp: HashMap<String, (u64, mpsc::Sender<Vec<u8>>)>,
    queues: HashMap<String, Queue>,
}

impl Router {
    pub(crate) fn new(
        cfg: &RelayConfig,
        mailbox: Arc<Mailbox>,
        counters: Arc<Counters>,
        mqtt: Option<mpsc::Sender<(String, Vec<u8>)>>,
        nats: Option<mpsc::Sender<(String, Vec<u8>)>>,
        existing: impl Iterator<Item = String>,
    ) -> Router {
        let mut relay_hops = HashMap::new();
        for r in &cfg.routes {
            let via = match &r.next {
                NextHop::MqttRelay(id) => Some((id, Via::Mqtt)),
                NextHop::NatsRelay(id) => Some((id, Via::Nats)),
                NextHop::TcpRelay { id, .. } => Some((id, Via::Tcp)),
                _ => None,
            };
            if let Some((id, via)) = via {
                relay_hops.entry(id.clone()).or_insert(via);
            }
        }
        Router {
            id: cfg.id.clone(),
            routes: cfg.routes.clone(),
            relay_hops,
            window: cfg.window,
            resend: cfg.resend,
            presence: cfg.presence,
            mailbox,
            counters,
            mqtt,
            nats,
            tcp: HashMap::new(),
            queues: existing.map(|q| (q, Queue::new())).collect(),
        }
    }

    /// Routes until `shutdown` changes (or its sender is gone).
    pub(crate) async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for q in names {
            self.push(&q).await;
        }
        let period = (self.resend / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                ev = events.recv() => match ev {
                    Some(ev) => {
                        let batch = gather(ev, &mut events).await;
                        self.process(batch).await;
                    }
                    None => {
                        // No carrier left: nothing more can happen.
                        let _ = shutdown.changed().await;
                        break;
                    }
                },
                _ = tick.tick() => self.tick().await,
            }
        }
    }

    /// Runs `f` on the mailbox on a blocking thread (redb commits fsync).
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Mailbox) -> T + Send + 'static,
    ) -> Option<T> {
        let mb = self.mailbox.clone();
        tokio::task::spawn_blocking(move || f(&mb)).await.ok()
    }

    /// The queue an entry for `dst` goes to, if any route takes it.
    fn route(&self, dst: &str) -> Option<String> {
        if dst == self.id {
            return None;
        }
        let r = self.routes.iter().find(|r| r.matches(dst))?;
        Some(r.next.relay_id().unwrap_or(dst).to_string())
    }

    fn malformed(&self, from: &Source, len: usize, why: &dyn core::fmt::Display) {
        Counters::add(&self.counters.malformed, 1);
        debug!(from = from.peer(), len, reason = %why, "relay frame dropped");
    }

    /// Sorts one incoming frame into the batch.
    fn classify(&mut self, from: Source, bytes: &[u8], b: &mut Batch) {
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => return self.malformed(&from, bytes.len(), &e),
        };
        let key = frame.entry_key();
        match frame {
            Frame::Forward {
                hops,
                src,
                dst,
                body,
            } => {
                Counters::add(&self.counters.received, 1);
                let origin = b.source(&from);
                let Some(key) = key else {
                    let (stream, seq) = loose_header(&body);
                    let key = EntryKey {
                        src,
                        dst,
                        stream,
                        seq,
                    };
                    b.refusals.push((origin, RefuseReason::BadBody, key));
                    return;
                };
                if hops == 0 {
                    b.refusals.push((origin, RefuseReason::HopLimit, key));
                    return;
                }
                let Some(queue) = self.route(&dst) else {
                    b.refusals.push((origin, RefuseReason::NoRoute, key));
                    return;
                };
                let stored = Frame::Forward {
                    hops: hops - 1,
                    src,
                    dst,
                    body,
                }
                .encode();
                b.put(&queue, key, stored, origin);
            }
            Frame::Stored {
                src,
                dst,
                stream,
                seqs,
            } => {
                let keys = seqs
                    .into_iter()
                    .map(|seq| EntryKey {
                        src: src.clone(),
                        dst: dst.clone(),
                        stream,
                        seq,
                    })
                    .collect();
                b.remove(from.peer(), keys);
            }
            Frame::Pull { window } => b.pulls.push((from.peer().to_string(), from.via(), window)),
            Frame::Refused {
                reason: RefuseReason::Later,
                key,
            } => {
                Counters::add(&self.counters.later, 1);
                b.laters.push((from.peer().to_string(), key));
            }
            Frame::Need {
                src,
                dst,
                stream,
                seq,
            } => {
                // Only the destination device itself asks, for its own queue.
                if dst != from.peer()
                    || self.relay_hops.contains_key(&dst)
                    || self.route(&dst).as_deref() != Some(dst.as_str())
                {
                    return self.malformed(&from, bytes.len(), &"Need from another hop");
                }
                Counters::add(&self.counters.needs, 1);
                let origin = b.source(&from);
                let run = self
                    .queues
                    .get(&dst)
                    .zip(self.target(&dst, Instant::now()))
                    .map_or(1, |(st, (_, window))| {
                        window.saturating_sub(st.inflight.len()).clamp(1, NEED_RUN)
                    });
                b.needs.push(Need {
                    queue: dst.clone(),
                    key: EntryKey {
                        src,
                        dst,
                        stream,
                        seq,
                    },
                    origin,
                    run,
                });
            }
            Frame::Refused { reason, key } => {
                debug!(
                    from = from.peer(),
                    ?reason,
                    src = key.src,
                    dst = key.dst,
                    stream = key.stream,
                    seq = key.seq,
                    "next hop refused an entry (pushed again later)"
                );
            }
            Frame::Attach { .. } => self.malformed(&from, bytes.len(), &"unexpected Attach"),
        }
    }

    /// Sends `frame` back to `to` (dropped if the carrier's queue is full: the sender resends).
    fn reply(&self, to: &Source, frame: &Frame) {
        let bytes = frame.encode();
        let ok = match to {
            Source::Mqtt(p) => self
                .mqtt
                .as_ref()
                .is_some_and(|tx| tx.try_send((p.clone(), bytes)).is_ok()),
            Source::Nats(p) => self
                .nats
                .as_ref()
                .is_some_and(|tx| tx.try_send((p.clone(), bytes)).is_ok()),
            Source::Tcp { tx, .. } => tx.try_send(bytes).is_ok(),
        };
        if !ok {
            debug!(
                to = to.peer(),
                "reply dropped: carrier queue full or closed"
            );
        }
    }

    /// Handles one batch: classify, one mailbox call (puts, then removes), replies, pushes.
    async fn process(&mut self, events: Vec<Event>) {
        let now = Instant::now();
        let mut b = Batch::default();
        let mut touched: HashSet<String> = HashSet::new();
        for ev in events {
            match ev {
                Event::TcpUp { peer, conn, tx } => {
                    let replaced = self.tcp.insert(peer.clone(), (conn, tx));
                    if replaced.is_some() {
                        if let Some(q) = self.queues.get_mut(&peer) {
                            q.rewind();
                        }
                    }
                    touched.insert(peer);
                }
                Event::TcpDown { peer, conn } => {
                    if self.tcp.get(&peer).is_some_and(|(c, _)| *c == conn) {
                        self.tcp.remove(&peer);
                        if let Some(q) = self.queues.get_mut(&peer) {
                            q.rewind();
                        }
                    }
                }
                Event::Frame { from, bytes, ack } => {
                    b.acks.extend(ack.map(|a| *a));
                    self.classify(from, &bytes, &mut b);
                }
            }
        }

        let (puts, removes) = (std::mem::take(&mut b.puts), std::mem::take(&mut b.removes));
        let needs = std::mem::take(&mut b.needs);
        let done = if puts.is_empty() && removes.is_empty() && needs.is_empty() {
            Some((puts, Vec::new(), removes, Vec::new(), needs, Vec::new()))
        } else {
            self.db(move |mb| {
                let put_res: Vec<_> = puts
                    .iter()
                    .map(|p| mb.put_batch(&p.queue, &p.items))
                    .collect();
                let rm_res: Vec<_> = removes.iter().map(|(q, k)| mb.remove(q, k)).collect();
                let need_res: Vec<_> = needs.iter().map(|n| look_up_run(mb, n)).collect();
                (puts, put_res, removes, rm_res, needs, need_res)
            })
            .await
        };
        let Some((puts, put_res, removes, rm_res, needs, need_res)) = done else {
            warn!("mailbox task failed: batch not acknowledged (senders resend)");
            return;
        };

        let mut failed = false;
        let mut acks = Acks::default();
        // Entries a device needs that were just stored: pushed at once.
        let mut arrived: Vec<(String, Entry)> = Vec::new();
        let mut refusals = std::mem::take(&mut b.refusals);
        for (p, res) in puts.into_iter().zip(put_res) {
            let outcomes = match res {
                Ok(o) if o.len() == p.items.len() => o,
                Ok(_) => {
                    warn!(
                        queue = p.queue,
                        "mailbox returned a wrong number of outcomes"
                    );
                    failed = true;
                    continue;
                }
                Err(e) => {
                    warn!(queue = p.queue, error = %e, "mailbox put failed (senders resend)");
                    failed = true;
                    continue;
                }
            };
            let mut any = false;
            for (((key, frame), origin), out) in p.items.into_iter().zip(p.origins).zip(outcomes) {
                let Some(source) = b.sources.get(origin) else {
                    continue;
                };
                match out {
                    PutOutcome::Stored(pos) => {
                        Counters::add(&self.counters.stored, 1);
                        any = true;
                        if self
                            .queues
                            .get_mut(&p.queue)
                            .is_some_and(|st| st.wanted.remove(&key).is_some())
                        {
                            arrived.push((
                                p.queue.clone(),
                                Entry {
                                    pos,
                                    key: key.clone(),
                                    frame,
                                },
                            ));
                        }
                        acks.add(origin, source, key);
                    }
                    PutOutcome::Duplicate => {
                        Counters::add(&self.counters.duplicates, 1);
                        acks.add(origin, source, key);
                    }
                    PutOutcome::Full => refusals.push((origin, RefuseReason::MailboxFull, key)),
                }
            }
            if any {
                self.queues
                    .entry(p.queue.clone())
                    .or_insert_with(Queue::new)
                    .more = true;
                touched.insert(p.queue);
            }
        }

        for ((queue, keys), res) in removes.into_iter().zip(rm_res) {
            match res {
                Ok(n) => {
                    Counters::add(&self.counters.delivered, n as u64);
                    if let Some(st) = self.queues.get_mut(&queue) {
                        for k in &keys {
                            if let Some(pos) = st.by_key.remove(k) {
                                st.inflight.remove(&pos);
                            }
                        }
                        // Progress: the hop took custody of something, so it has room again.
                        st.paused_until = None;
                    }
                    touched.insert(queue);
                }
                Err(e) => {
                    warn!(queue, error = %e, "mailbox remove failed (the hop acks again)");
                }
            }
        }

        for (queue, via, window) in b.pulls.drain(..) {
            let presence = self.presence;
            let st = self.queues.entry(queue.clone()).or_insert_with(Queue::new);
            let was_online =
                st.online(now, presence) && st.pull.as_ref().is_some_and(|p| p.via == via);
            // A device that restarted within the presence window lost what was in flight to
            // it: entries unacknowledged for a while are pushed again now, not after `resend`.
            let stale = st
                .inflight
                .values()
                .any(|f| now.saturating_duration_since(f.sent) >= STALE_ON_PULL);
            if !was_online || stale {
                st.rewind();
            }
            st.pull = Some(Pull {
                at: now,
                window,
                via,
            });
            st.more = true;
            touched.insert(queue);
        }

        // Back-pressure: the hop cannot take these entries now. They leave the window, the
        // next push starts again at the earliest of them, and the queue waits for progress.
        for (queue, key) in std::mem::take(&mut b.laters) {
            let resend = self.resend;
            let Some(st) = self.queues.get_mut(&queue) else {
                continue;
            };
            if let Some(pos) = st.by_key.remove(&key) {
                st.inflight.remove(&pos);
                st.rewind_to(pos);
                st.paused_until = Some(now + resend);
            }
        }

        for (need, res) in needs.into_iter().zip(need_res) {
            self.on_need(need, res, &b.sources, now);
        }
        for (queue, e) in arrived {
            debug!(
                queue,
                seq = e.key.seq,
                "an entry the device needs arrived: pushed at once"
            );
            self.push_now(&queue, vec![e], true, now);
        }

        for (origin, reason, key) in refusals {
            Counters::add(&self.counters.refused, 1);
            let Some(source) = b.sources.get(origin) else {
                continue;
            };
            debug!(
                from = source.peer(),
                ?reason,
                src = key.src,
                dst = key.dst,
                stream = key.stream,
                seq = key.seq,
                "entry refused"
            );
            self.reply(source, &Frame::Refused { reason, key });
        }

        for (origin, key, seqs) in acks.groups {
            let Some(source) = b.sources.get(origin) else {
                continue;
            };
            for chunk in seqs.chunks(MAX_KEYS) {
                let f = Frame::Stored {
                    src: key.src.clone(),
                    dst: key.dst.clone(),
                    stream: key.stream,
                    seqs: chunk.to_vec(),
                };
                self.reply(source, &f);
            }
        }
        if !failed && !b.acks.is_empty() {
            let acks = std::mem::take(&mut b.acks);
            tokio::spawn(async move {
                for a in acks {
                    if let Err(e) = a.ack().await {
                        debug!(error = %e, "JetStream ack failed (the message comes again)");
                    }
                }
            });
        }

        for q in touched {
            self.push(&q).await;
        }
    }

    /// The carrier to reach hop `q` on.
    fn via_target(&self, via: Via, q: &str) -> Option<Target> {
        match via {
            Via::Mqtt => self
                .mqtt
                .as_ref()
                .map(|tx| Target::Broker(tx.clone(), q.to_string())),
            Via::Nats => self
                .nats
                .as_ref()
                .map(|tx| Target::Broker(tx.clone(), q.to_string())),
            Via::Tcp => self.tcp.get(q).map(|(_, tx)| Target::Tcp(tx.clone())),
        }
    }

    /// Where queue `q` is pushed now and its window, or `None` if its hop is unreachable
    /// (a device that is offline, a next relay not connected).
    fn target(&self, q: &str, now: Instant) -> Option<(Target, usize)> {
        let cap = self.window as usize;
        if let Some(via) = self.relay_hops.get(q) {
            return Some((self.via_target(*via, q)?, cap));
        }
        let st = self.queues.get(q)?;
        if !st.online(now, self.presence) {
            return None;
        }
        let p = st.pull.as_ref()?;
        Some((self.via_target(p.via, q)?, cap.min(p.window as usize)))
    }

    /// Pushes the next entries of queue `q` (from its cursor on, skipping those in flight)
    /// while its window has room and it is not paused.
    ///
    /// Reads the mailbox in chunks of [`PEEK_MAX`] whatever the room, so walking past the
    /// entries in flight after the cursor (at most a window of them) costs a few reads.
    async fn push(&mut self, q: &str) {
        let now = Instant::now();
        let Some((target, window)) = self.target(q, now) else {
            return;
        };
        loop {
            let st = self.queues.entry(q.to_string()).or_insert_with(Queue::new);
            if st.paused(now) || !st.more || st.inflight.len() >= window {
                return;
            }
            let (after, name) = (st.last_pushed, q.to_string());
            let entries = match self.db(move |mb| mb.peek(&name, after, PEEK_MAX)).await {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    warn!(queue = q, error = %e, "mailbox read failed (pushed again later)");
                    return;
                }
                None => return,
            };
            let Some(st) = self.queues.get_mut(q) else {
                return;
            };
            if entries.len() < PEEK_MAX {
                st.more = false;
            }
            if entries.is_empty() {
                return;
            }
            for e in entries {
                if st.by_key.contains_key(&e.key) {
                    st.last_pushed = Some(e.pos);
                    continue;
                }
                if st.inflight.len() >= window || !target.send(e.frame.clone()) {
                    // The rest is read again by the next push.
                    st.more = true;
                    return;
                }
                Counters::add(&self.counters.pushed, 1);
                st.last_pushed = Some(e.pos);
                st.fly(e, now);
            }
        }
    }

    /// Pushes `entries` of queue `q` now, whatever its window and pause (entries a device
    /// needs). Entries in flight are skipped, except the first one if `force_first`.
    fn push_now(&mut self, q: &str, entries: Vec<Entry>, force_first: bool, now: Instant) {
        let Some((target, _)) = self.target(q, now) else {
            return;
        };
        let Some(st) = self.queues.get_mut(q) else {
            return;
        };
        for (i, e) in entries.into_iter().enumerate() {
            if st.by_key.contains_key(&e.key) && !(force_first && i == 0) {
                continue;
            }
            if !target.send(e.frame.clone()) {
                return;
            }
            Counters::add(&self.counters.pushed, 1);
            st.fly(e, now);
        }
    }

    /// A device needs an entry next: pushes it (and the entries after it that the mailbox
    /// holds) at once if it is there; otherwise remembers it as wanted and passes the `Need`
    /// on to the entry's sender, over the carrier the `Need` came on, so that it resends.
    fn on_need(
        &mut self,
        need: Need,
        res: Result<Vec<Entry>, keav_store::Error>,
        sources: &[Source],
        now: Instant,
    ) {
        let Need {
            queue, key, origin, ..
        } = need;
        let entries = match res {
            Ok(e) => e,
            Err(e) => {
                warn!(queue, error = %e, "mailbox read failed (the device asks again)");
                return;
            }
        };
        if entries.first().is_some_and(|e| e.key == key) {
            if let Some(st) = self.queues.get_mut(&queue) {
                st.wanted.remove(&key);
            }
            debug!(
                queue,
                seq = key.seq,
                run = entries.len(),
                "the device needs an entry: pushed at once"
            );
            self.push_now(&queue, entries, true, now);
            return;
        }
        self.queues
            .entry(queue.clone())
            .or_insert_with(Queue::new)
            .want(key.clone(), now);
        if key.src == self.id || key.src == key.dst {
            return;
        }
        let Some(source) = sources.get(origin) else {
            return;
        };
        let frame = Frame::Need {
            src: key.src.clone(),
            dst: key.dst.clone(),
            stream: key.stream,
            seq: key.seq,
        }
        .encode();
        let sent = match source.via() {
            Via::Mqtt => self
                .mqtt
                .as_ref()
                .is_some_and(|tx| tx.try_send((key.src.clone(), frame)).is_ok()),
            Via::Nats => self
                .nats
                .as_ref()
                .is_some_and(|tx| tx.try_send((key.src.clone(), frame)).is_ok()),
            Via::Tcp => self
                .tcp
                .get(&key.src)
                .is_some_and(|(_, tx)| tx.try_send(frame).is_ok()),
        };
        if sent {
            Counters::add(&self.counters.needs_forwarded, 1);
        }
        debug!(
            queue,
            src = key.src,
            seq = key.seq,
            forwarded = sent,
            "the device needs an entry the mailbox does not hold: asked its sender"
        );
    }

    /// Pushes overdue in-flight entries again, pushes queues whose hop became reachable, and
    /// forgets idle queue state.
    async fn tick(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for q in names {
            let Some((target, _)) = self.target(&q, now) else {
                continue;
            };
            if let Some(st) = self.queues.get_mut(&q) {
                for f in st.inflight.values_mut() {
                    if now.saturating_duration_since(f.sent) < self.resend {
                        continue;
                    }
                    if !target.send(f.frame.clone()) {
                        break;
                    }
                    f.sent = now;
                    Counters::add(&self.counters.pushed, 1);
                }
            }
            self.push(&q).await;
        }
        let presence = self.presence;
        for st in self.queues.values_mut() {
            st.wanted
                .retain(|_, at| now.saturating_duration_since(*at) < WANTED_TTL);
        }
        self.queues
            .retain(|_, st| !st.inflight.is_empty() || st.more || st.online(now, presence));
    }
}

/// For a `Need`: the entry needed, if the mailbox holds it, followed by those of the next
/// `run - 1` sequence numbers of the same sender and stream that it holds (empty if the
/// entry needed is not there).
fn look_up_run(mb: &Mailbox, need: &Need) -> Result<Vec<Entry>, keav_store::Error> {
    let Some(first) = mb.find(&need.queue, &need.key)? else {
        return Ok(Vec::new());
    };
    let mut out = vec![first];
    let mut key = need.key.clone();
    for _ in 1..need.run {
        let Some(next) = key.seq.checked_add(1) else {
            break;
        };
        key.seq = next;
        if let Some(e) = mb.find(&need.queue, &key)? {
            out.push(e);
        }
    }
    Ok(out)
}

/// For a refusal of a body that is not a durable payload: its stream byte and sequence number
/// if they can be read where a durable payload has them, else data stream and sequence 0
/// (the Refused frame must name a valid stream).
fn loose_header(body: &[u8]) -> (u8, u64) {
    const DATA: u8 = keav_proto::durable::Stream::Data as u8;
    let stream = match body.get(1) {
        Some(&s) if keav_proto::durable::Stream::from_byte(s).is_some() => s,
        _ => return (DATA, 0),
    };
    // tag | stream | type | epoch u32 | seq u64
    match body.get(7..15).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        Some(b) => (stream, u64::from_be_bytes(b)),
        None => (stream, 0),
    }
}

/// The first event and whatever follows within [`BATCH_WAIT`], up to [`BATCH_MAX`].
async fn gather(first: Event, events: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    let mut batch = vec![first];
    let deadline = Instant::now() + BATCH_WAIT;
    while batch.len() < BATCH_MAX {
        match events.try_recv() {
            Ok(e) => batch.push(e),
            Err(TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some(e)) => batch.push(e),
                    _ => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        }
    }
    batch
}
