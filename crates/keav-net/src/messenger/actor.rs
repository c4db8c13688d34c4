//! The messenger's background task: owns every durable channel, batches commands and mail
//! into one store transaction, and transmits only what is committed (see the module docs of
//! [`crate::messenger`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keav_proto::cache::Zid;
use keav_proto::durable::{
    parse_header, DurableChannel, DurableConfig, DurableState, Received, Stream, DATA_RATCHET_LOG2,
    PAYLOAD_TAG,
};
use keav_proto::route::{EntryKey, Frame, RefuseReason, DEFAULT_HOPS, FRAME_TAG, MAX_KEYS};
use keav_store::{DurableRow, DurableUpdate};
use tokio::sync::{mpsc, oneshot, watch, OwnedMutexGuard};
use tokio::time::Instant;
use tracing::{debug, error, warn};
use zeroize::Zeroizing;

use super::{bump, durable_error, Cmd, Delivery, Message, MessengerOptions, Shared, READY_MAX};
use crate::broker::{Mail, MailAck};
use crate::device::Device;
use crate::Error;

use super::Carrier;

/// How often the actor checks the link's connection count.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Longest sleep when no channel has anything due.
const IDLE: Duration = Duration::from_secs(3600);
/// At most one `Need` per peer and sequence number this often.
const NEED_EVERY: Duration = Duration::from_millis(500);
/// A peer's `Need` for the same record is served at most this often.
const NEED_SERVE_EVERY: Duration = Duration::from_secs(1);

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The channels' clock: milliseconds since the Unix epoch when the messenger started, then
/// monotonic (a wall-clock jump never stalls or floods the resend timers of a running
/// messenger; only relative times matter, restores make every record due at once).
#[derive(Clone, Copy, Debug)]
pub(super) struct Clock {
    unix0: u64,
    t0: Instant,
}

impl Clock {
    pub(super) fn new() -> Clock {
        Clock {
            unix0: Self::unix_ms(),
            t0: Instant::now(),
        }
    }

    fn unix_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(ms)
            .unwrap_or(0)
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.unix0.saturating_add(ms(self.t0.elapsed()))
    }

    /// The instant of clock time `at` (capped to [`IDLE`] from now).
    fn instant_at(&self, at: u64) -> Instant {
        let now = Instant::now();
        let wait = Duration::from_millis(at.saturating_sub(self.now_ms())).min(IDLE);
        now.checked_add(wait).unwrap_or(now)
    }
}

/// A blocking task that died (panicked or was cancelled).
pub(super) fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Io(std::io::Error::other(e))
}

/// One paired peer: its channel and the application's marks.
pub(super) struct Peer {
    pub(super) zid: Zid,
    ch: DurableChannel,
    /// The application acknowledged every message below this.
    delivered: u64,
    /// Every message below this was released in this process (popped).
    released: u64,
    /// Every data sequence number below this was transmitted at least once by this process
    /// or before it (a restored outbox counts as transmitted): later transmissions are resends.
    high: u64,
    /// A relay refusal was logged at warn level already.
    refused_warned: bool,
    /// The last `Need` sent to the relay for this peer's messages: (sequence number, when).
    need_sent: Option<(u64, Instant)>,
    /// The last `Need` of this peer served (a record resent at once): (sequence number, when).
    need_served: Option<(u64, Instant)>,
}

impl Peer {
    fn new(zid: Zid, ch: DurableChannel, delivered: u64) -> Peer {
        let high = ch.next_seq();
        Peer {
            zid,
            ch,
            delivered,
            released: delivered,
            high,
            refused_warned: false,
            need_sent: None,
            need_served: None,
        }
    }

    fn row(&self) -> DurableRow {
        DurableRow {
            peer_zid: self.zid.0,
            state: self.ch.export().encode(),
            delivered: self.delivered,
        }
    }
}

/// Loads every durable channel of `device` (blocking: store reads).
pub(super) fn load(
    device: &Device,
    cfg: DurableConfig,
    now: u64,
) -> Result<BTreeMap<String, Peer>, Error> {
    let store = device.store();
    let mut peers = BTreeMap::new();
    for name in store.durable_names()? {
        let Some(row) = store.durable_row(&name)? else {
            continue;
        };
        let state = DurableState::decode(&row.state).map_err(|e| {
            error!(peer = %name, error = %e, "damaged durable channel state");
            durable_error(e)
        })?;
        let outbox = store.durable_outbox(&name)?;
        let inbox: Vec<(u64, Vec<u8>)> = store
            .durable_inbox(&name)?
            .into_iter()
            .filter(|(seq, _)| *seq >= row.delivered)
            .map(|(seq, mut body)| (seq, std::mem::take(&mut *body)))
            .collect();
        let ch = DurableChannel::restore(&state, outbox, inbox, row.delivered, cfg, now).map_err(
            |e| {
                error!(peer = %name, error = %e, "durable channel cannot be restored");
                durable_error(e)
            },
        )?;
        peers.insert(name, Peer::new(Zid(row.peer_zid), ch, row.delivered));
    }
    Ok(peers)
}

/// A flush waiting for the peer's end-to-end ack.
struct Waiter {
    name: String,
    target: u64,
    reply: oneshot::Sender<Result<(), Error>>,
}

/// A new channel to install after the batch before it is committed.
struct Install {
    name: String,
    zid: Zid,
    channel: Box<DurableChannel>,
    reply: oneshot::Sender<Result<(), Error>>,
}

/// What happened to one incoming durable payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Taken, a duplicate, an ack: never needed again.
    Done,
    /// Not taken now: the sender (or the relay, or JetStream) must deliver it again.
    Deferred,
    /// Forged, malformed, from an unknown sender: never useful.
    Rejected,
}

/// Everything applied to the channels since the last commit, and what to do after it.
#[derive(Default)]
struct Batch {
    /// Commands and mails taken.
    items: usize,
    /// Store changes per channel; every channel here gets its row rewritten.
    updates: BTreeMap<String, DurableUpdate>,
    /// Peers owed an end-to-end ack.
    ack_to: BTreeSet<String>,
    /// Peers whose acks arrived (flush waiters to check).
    acked: BTreeSet<String>,
    /// Senders to answer with their sequence numbers.
    sends: Vec<(oneshot::Sender<Result<u64, Error>>, u64)>,
    /// Application acks to answer.
    app_acks: Vec<oneshot::Sender<Result<(), Error>>>,
    /// JetStream messages to acknowledge.
    mail_acks: Vec<MailAck>,
    /// Relay custody acks to send: (src, stream) -> sequence numbers.
    stored: BTreeMap<(String, u8), Vec<u64>>,
    /// Entries the relay pushed that the channel deferred: answered `Refused { Later }`.
    later: Vec<EntryKey>,
    /// Peers whose entries came through the relay in this batch, and whether one of them
    /// was deferred (they may need to ask for their next missing message).
    relayed: BTreeMap<String, bool>,
    /// Messages popped from the channels, released once committed.
    staged: Vec<Message>,
    /// A channel to install after this batch (ends the batch).
    install: Option<Install>,
    /// Stop after this batch.
    shutdown: bool,
}

impl Batch {
    fn update(&mut self, name: &str) -> &mut DurableUpdate {
        self.updates
            .entry(name.to_string())
            .or_insert_with(|| DurableUpdate {
                name: name.to_string(),
                ..DurableUpdate::default()
            })
    }

    fn closed(&self, batch_max: usize) -> bool {
        self.items >= batch_max || self.install.is_some() || self.shutdown
    }
}

/// Publishes one durable payload to `to`, directly or in a relay Forward frame; returns
/// whether the carrier took custody.
async fn transmit(
    carrier: &Carrier,
    id: &str,
    relay: Option<&str>,
    to: &str,
    payload: &[u8],
) -> Result<bool, Error> {
    match relay {
        None => carrier.publish(to, payload).await,
        Some(r) => {
            let frame = Frame::Forward {
                hops: DEFAULT_HOPS,
                src: id.to_string(),
                dst: to.to_string(),
                body: payload.to_vec(),
            };
            carrier.publish(r, &frame.encode()).await
        }
    }
}

/// The background task of one messenger.
pub(super) struct Actor {
    device: Device,
    carrier: Carrier,
    opts: MessengerOptions,
    clock: Clock,
    id: String,
    relay: Option<String>,
    peers: BTreeMap<String, Peer>,
    shared: Arc<Shared>,
    msg_tx: mpsc::Sender<Message>,
    /// Committed, released messages waiting for room in `msg_tx`.
    ready: VecDeque<Message>,
    waiters: Vec<Waiter>,
    connections: u64,
    next_pull: Instant,
}

impl Actor {
    pub(super) fn new(
        device: Device,
        carrier: Carrier,
        opts: MessengerOptions,
        clock: Clock,
        peers: BTreeMap<String, Peer>,
        shared: Arc<Shared>,
        msg_tx: mpsc::Sender<Message>,
    ) -> Actor {
        let relay = match &opts.delivery {
            Delivery::Direct => None,
            Delivery::Relay(r) => Some(r.clone()),
        };
        Actor {
            id: carrier.device_id().to_string(),
            device,
            carrier,
            opts,
            clock,
            relay,
            peers,
            shared,
            msg_tx,
            ready: VecDeque::new(),
            waiters: Vec::new(),
            connections: 0,
            next_pull: Instant::now(),
        }
    }

    /// Runs until the messenger is dropped or shut down, or a commit fails. `_guard` (the
    /// device's messenger lock) is released when this returns.
    pub(super) async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut mail: mpsc::Receiver<Mail>,
        alive: watch::Receiver<()>,
        _guard: OwnedMutexGuard<()>,
    ) {
        self.connections = self.carrier.connections();
        if self.relay.is_some() {
            self.pull().await;
        }
        self.pump(&alive).await;
        self.release();
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut mail_open = true;
        let mut alive_wait = alive.clone();
        let tx = self.msg_tx.clone();
        loop {
            let mut batch = Batch::default();
            let wake = self.next_wake();
            tokio::select! {
                r = alive_wait.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                c = cmds.recv() => match c {
                    Some(c) => self.on_cmd(c, &mut batch),
                    None => break,
                },
                m = mail.recv(), if mail_open => match m {
                    Some(m) => self.on_mail(m, &mut batch),
                    None => {
                        warn!(device = %self.id, "the link's mail stream ended: nothing more is received");
                        mail_open = false;
                    }
                },
                p = tx.reserve(), if !self.ready.is_empty() => {
                    if let (Ok(p), Some(m)) = (p, self.ready.pop_front()) {
                        p.send(m);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = tick.tick() => self.housekeeping().await,
            }
            // Take whatever else is queued, up to the batch bound.
            while !batch.closed(self.opts.batch_max) {
                let mut took = false;
                if let Ok(c) = cmds.try_recv() {
                    self.on_cmd(c, &mut batch);
                    took = true;
                }
                if mail_open && !batch.closed(self.opts.batch_max) {
                    if let Ok(m) = mail.try_recv() {
                        self.on_mail(m, &mut batch);
                        took = true;
                    }
                }
                if !took {
                    break;
                }
            }
            let shutdown = batch.shutdown;
            if let Err(e) = self.finish(batch).await {
                error!(device = %self.id, error = %e, "durable messaging stopped: the store failed");
                self.shared.failed.store(true, Ordering::Release);
                break;
            }
            if stopped(&alive) {
                break;
            }
            self.pump(&alive).await;
            self.release();
            if shutdown {
                break;
            }
        }
        // Pending flushes, and commands never taken, end with `Error::Shutdown` (their
        // answer channels are dropped here).
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn next_wake(&self) -> Instant {
        if self.peers.values().any(|p| p.ch.early_ready()) {
            return Instant::now();
        }
        let due = self
            .peers
            .values()
            .filter_map(|p| p.ch.poll_timeout())
            .min();
        match due {
            Some(at) => self.clock.instant_at(at),
            None => Instant::now() + IDLE,
        }
    }

    fn reject(&self, from: &str, why: &dyn core::fmt::Display) {
        bump(&self.shared.counters.rejected, 1);
        debug!(device = %self.id, from, reason = %why, "payload rejected");
    }

    fn on_cmd(&mut self, cmd: Cmd, batch: &mut Batch) {
        batch.items += 1;
        match cmd {
            Cmd::Send { to, body, reply } => {
                let now = self.now();
                let Some(p) = self.peers.get_mut(&to) else {
                    let _ = reply.send(Err(Error::InvalidInput(
                        "no durable channel with this peer",
                    )));
                    return;
                };
                match p.ch.send(&body, now) {
                    Ok((seq, payload)) => {
                        batch.update(&to).outbox_put.push((seq, payload));
                        batch.sends.push((reply, seq));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(durable_error(e)));
                    }
                }
            }
            Cmd::Ack { from, seq, reply } => {
                let Some(p) = self.peers.get_mut(&from) else {
                    let _ = reply.send(Err(Error::InvalidInput(
                        "no durable channel with this peer",
                    )));
                    return;
                };
                if seq >= p.released {
                    let _ = reply.send(Err(Error::InvalidInput(
                        "acknowledging a message that was not received",
                    )));
                    return;
                }
                if seq >= p.delivered {
                    p.delivered = seq.saturating_add(1);
                    let delivered = p.delivered;
                    batch.update(&from).inbox_delete_below = Some(delivered);
                }
                batch.app_acks.push(reply);
            }
            Cmd::Flush { to, reply } => {
                let Some(p) = self.peers.get(&to) else {
                    let _ = reply.send(Err(Error::InvalidInput(
                        "no durable channel with this peer",
                    )));
                    return;
                };
                let target = p.ch.next_seq();
                if p.ch.acked() >= target {
                    let _ = reply.send(Ok(()));
                } else {
                    self.waiters.push(Waiter {
                        name: to,
                        target,
                        reply,
                    });
                }
            }
            Cmd::Install {
                name,
                zid,
                channel,
                reply,
            } => {
                batch.install = Some(Install {
                    name,
                    zid,
                    channel,
                    reply,
                });
            }
            Cmd::Shutdown => batch.shutdown = true,
        }
    }

    fn on_mail(&mut self, mail: Mail, batch: &mut Batch) {
        batch.items += 1;
        let Mail { from, payload, ack } = mail;
        let done = match payload.first() {
            // A deferred payload's mail is acknowledged to the carrier too: left
            // unacknowledged it would hold one of the consumer's `max_ack_pending` slots
            // until `ack_wait`, and enough of them stall the whole consumer. It is in the
            // channel's stash, or the sender resends it (after an end-to-end ack that says
            // where the gap is, when there is one: fast retransmit).
            Some(&PAYLOAD_TAG) => {
                self.on_payload(&from, &payload, batch);
                true
            }
            Some(&FRAME_TAG) => self.on_frame(&from, &payload, batch),
            _ => {
                self.reject(&from, &"neither a durable payload nor a relay frame");
                true
            }
        };
        if let (Some(ack), true) = (ack, done) {
            batch.mail_acks.push(ack);
        }
    }

    /// One durable payload from peer `src`.
    fn on_payload(&mut self, src: &str, payload: &[u8], batch: &mut Batch) -> Outcome {
        let now = self.now();
        let c = &self.shared.counters;
        let Some(p) = self.peers.get_mut(src) else {
            self.reject(src, &"no durable channel with the sender");
            return Outcome::Rejected;
        };
        match p.ch.receive(payload, now) {
            Ok(Received::Data { seq, body }) => {
                bump(&c.received, 1);
                batch
                    .update(src)
                    .inbox_put
                    .push((seq, Zeroizing::new(body)));
                batch.ack_to.insert(src.to_string());
                self.take_early(src, batch);
                Outcome::Done
            }
            Ok(Received::Duplicate { .. }) => {
                bump(&c.duplicates, 1);
                batch.ack_to.insert(src.to_string());
                Outcome::Done
            }
            Ok(Received::Deferred { seq }) => {
                bump(&c.deferred, 1);
                // When something is missing below it, tell the sender where this inbox
                // stands: an ack that does not move is its cue to resend from the gap at
                // once (keav_proto::durable, fast retransmit). A receiver merely behind
                // (the record stashed right after what it holds) asks for nothing.
                if p.ch.deferral_needs_ack(seq) {
                    batch.ack_to.insert(src.to_string());
                }
                Outcome::Deferred
            }
            Ok(Received::Ack { upto, .. }) => {
                let u = batch.update(src);
                u.outbox_delete_below = Some(u.outbox_delete_below.map_or(upto, |b| b.max(upto)));
                batch.acked.insert(src.to_string());
                Outcome::Done
            }
            Ok(Received::StaleAck) => Outcome::Done,
            Err(e) => {
                self.reject(src, &e);
                Outcome::Rejected
            }
        }
    }

    /// After a message was taken from `src`: releases what is in order now (it reaches the
    /// application only after the commit), so the reorder window moves on within the batch,
    /// and takes early arrivals the channel stashed while they were beyond its window.
    fn take_early(&mut self, src: &str, batch: &mut Batch) {
        let now = self.now();
        let Some(p) = self.peers.get_mut(src) else {
            return;
        };
        loop {
            while self.ready.len() + batch.staged.len() < READY_MAX {
                let Some((seq, body)) = p.ch.pop() else {
                    break;
                };
                p.released = seq.saturating_add(1);
                batch.staged.push(Message {
                    from: src.to_string(),
                    peer_zid: p.zid,
                    seq,
                    body,
                });
            }
            match p.ch.next_early(now) {
                Some(Ok(Received::Data { seq, body })) => {
                    bump(&self.shared.counters.received, 1);
                    bump(&self.shared.counters.early, 1);
                    batch
                        .update(src)
                        .inbox_put
                        .push((seq, Zeroizing::new(body)));
                    batch.ack_to.insert(src.to_string());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    bump(&self.shared.counters.rejected, 1);
                    debug!(device = %self.id, from = src, reason = %e, "stashed payload rejected");
                }
                None => break,
            }
        }
    }

    /// One relay frame; returns whether its JetStream message may be acknowledged.
    fn on_frame(&mut self, from: &str, bytes: &[u8], batch: &mut Batch) -> bool {
        let Some(relay) = self.relay.clone() else {
            self.reject(from, &"relay frame, but this device delivers directly");
            return true;
        };
        if from != relay {
            self.reject(from, &"relay frame from a device other than the relay");
            return true;
        }
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.reject(from, &e);
                return true;
            }
        };
        let now = self.now();
        match frame {
            Frame::Forward { src, dst, body, .. } => {
                if dst != self.id {
                    self.reject(from, &"relay forwarded an entry for another device");
                    return true;
                }
                let header = parse_header(&body).ok();
                let outcome = self.on_payload(&src, &body, batch);
                if outcome != Outcome::Rejected {
                    let deferred = batch.relayed.entry(src.clone()).or_default();
                    *deferred |= outcome == Outcome::Deferred;
                }
                if outcome == Outcome::Deferred {
                    // The relay keeps it and holds back what follows until we make progress.
                    if let Some(h) = header {
                        batch.later.push(EntryKey {
                            src,
                            dst: self.id.clone(),
                            stream: h.stream as u8,
                            seq: h.seq,
                        });
                    }
                    return false;
                }
                // Taken, duplicate, ack or rejected: the relay may let go of it.
                if let Some(h) = header {
                    batch
                        .stored
                        .entry((src, h.stream as u8))
                        .or_default()
                        .push(h.seq);
                }
                true
            }
            Frame::Stored {
                src,
                dst,
                stream,
                seqs,
            } => {
                if src == self.id && stream == Stream::Data as u8 {
                    if let Some(p) = self.peers.get_mut(&dst) {
                        for seq in seqs {
                            p.ch.on_custody(seq, now);
                        }
                    }
                }
                true
            }
            Frame::Refused {
                reason: RefuseReason::Later,
                ..
            } => {
                debug!(device = %self.id, "ignored a Later refusal (meant for relays)");
                true
            }
            Frame::Refused { reason, key } => {
                if key.src == self.id {
                    bump(&self.shared.counters.refused, 1);
                    if let Some(p) = self.peers.get_mut(&key.dst) {
                        if !p.refused_warned {
                            p.refused_warned = true;
                            warn!(device = %self.id, peer = %key.dst, relay = %relay, ?reason,
                                "the relay refused a message; it stays in the outbox and is resent later");
                        }
                    }
                }
                true
            }
            Frame::Need {
                src,
                dst,
                stream,
                seq,
            } => {
                // Peer `dst` needs our record `seq` next and the relay does not hold it.
                if src != self.id || stream != Stream::Data as u8 {
                    debug!(device = %self.id, "ignored a Need for another device or stream");
                    return true;
                }
                let Some(p) = self.peers.get_mut(&dst) else {
                    debug!(device = %self.id, peer = %dst, "ignored a Need from an unknown peer");
                    return true;
                };
                let at = Instant::now();
                let repeat = p.need_served.is_some_and(|(s, t)| {
                    s == seq && at.saturating_duration_since(t) < NEED_SERVE_EVERY
                });
                if !repeat {
                    p.need_served = Some((seq, at));
                    if p.ch.on_need(seq, now) {
                        bump(&self.shared.counters.need_resends, 1);
                        debug!(device = %self.id, peer = %dst, seq, "peer needs a record: resent now");
                    }
                }
                true
            }
            Frame::Pull { .. } | Frame::Attach { .. } => {
                debug!(device = %self.id, "ignored a relay frame meant for relays");
                true
            }
        }
    }

    /// Seals the acks, commits the batch, then does everything that had to wait for it.
    async fn finish(&mut self, mut batch: Batch) -> Result<(), Error> {
        let ready: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.ch.early_ready())
            .map(|(n, _)| n.clone())
            .collect();
        for name in ready {
            self.take_early(&name, &mut batch);
        }
        let now = self.now();
        let mut acks = Vec::new();
        for name in std::mem::take(&mut batch.ack_to) {
            let Some(p) = self.peers.get_mut(&name) else {
                continue;
            };
            match p.ch.ack_payload(now) {
                Ok(payload) => {
                    batch.update(&name);
                    acks.push((name, payload));
                }
                Err(e) => debug!(device = %self.id, peer = %name, error = %e, "no ack sealed"),
            }
        }
        let mut updates = Vec::with_capacity(batch.updates.len());
        for (name, mut u) in std::mem::take(&mut batch.updates) {
            if let Some(p) = self.peers.get(&name) {
                u.row = Some(p.row());
                updates.push(u);
            }
        }
        if !updates.is_empty() {
            self.commit(updates).await?;
        }

        // Committed: answer, release, acknowledge, transmit.
        bump(&self.shared.counters.sent, batch.sends.len() as u64);
        for (reply, seq) in batch.sends {
            let _ = reply.send(Ok(seq));
        }
        for reply in batch.app_acks {
            let _ = reply.send(Ok(()));
        }
        self.ready.extend(batch.staged);
        for ack in batch.mail_acks {
            if let Err(e) = ack.ack().await {
                debug!(device = %self.id, error = %e, "JetStream ack failed (the server redelivers)");
            }
        }
        let relay = self.relay.clone();
        for (name, payload) in acks {
            if let Err(e) =
                transmit(&self.carrier, &self.id, relay.as_deref(), &name, &payload).await
            {
                debug!(device = %self.id, peer = %name, error = %e, "ack not sent");
            }
        }
        if let Some(relay) = &relay {
            for ((src, stream), seqs) in batch.stored {
                for chunk in seqs.chunks(MAX_KEYS) {
                    let frame = Frame::Stored {
                        src: src.clone(),
                        dst: self.id.clone(),
                        stream,
                        seqs: chunk.to_vec(),
                    };
                    if let Err(e) = self.carrier.publish(relay, &frame.encode()).await {
                        debug!(device = %self.id, error = %e, "custody ack to the relay not sent");
                    }
                }
            }
            for key in batch.later {
                let frame = Frame::Refused {
                    reason: RefuseReason::Later,
                    key,
                };
                if let Err(e) = self.carrier.publish(relay, &frame.encode()).await {
                    debug!(device = %self.id, error = %e, "Later to the relay not sent");
                }
            }
            for (name, deferred) in batch.relayed {
                self.need(relay, &name, deferred).await;
            }
        }
        self.check_waiters();
        if let Some(install) = batch.install {
            self.install(install).await?;
        }
        Ok(())
    }

    /// After a batch with entries from `name` through the relay: if one was deferred, or the
    /// channel holds messages beyond a missing one, tells the relay which message it needs
    /// next (`Need`, at most once per [`NEED_EVERY`] for the same one), unless the reorder
    /// window is full anyway (the application is the bottleneck, not a missing message).
    async fn need(&mut self, relay: &str, name: &str, deferred: bool) {
        let cap = self
            .opts
            .durable
            .inbox
            .max_pending
            .min(1 << DATA_RATCHET_LOG2) as u64;
        let Some(p) = self.peers.get_mut(name) else {
            return;
        };
        let (next, missing) = (p.ch.next_to_release(), p.ch.inbox_ack());
        let held_beyond = p.ch.inbox_len() as u64 > missing.saturating_sub(next);
        if !(deferred || held_beyond) || missing >= next.saturating_add(cap) {
            return;
        }
        let at = Instant::now();
        if p.need_sent
            .is_some_and(|(s, t)| s == missing && at.saturating_duration_since(t) < NEED_EVERY)
        {
            return;
        }
        p.need_sent = Some((missing, at));
        let frame = Frame::Need {
            src: name.to_string(),
            dst: self.id.clone(),
            stream: Stream::Data as u8,
            seq: missing,
        };
        bump(&self.shared.counters.needs, 1);
        debug!(device = %self.id, peer = %name, seq = missing, "asked the relay for the next message");
        if let Err(e) = self.carrier.publish(relay, &frame.encode()).await {
            debug!(device = %self.id, error = %e, "Need to the relay not sent");
        }
    }

    /// One store transaction on a blocking thread.
    async fn commit(&self, updates: Vec<DurableUpdate>) -> Result<(), Error> {
        let device = self.device.clone();
        tokio::task::spawn_blocking(move || device.store().durable_commit(&updates))
            .await
            .map_err(join_error)?
            .map_err(Error::Store)
    }

    /// Replaces the channel with `name` by a new one (one transaction: the new row, the old
    /// channel's outbox and inbox rows deleted).
    async fn install(&mut self, install: Install) -> Result<(), Error> {
        let Install {
            name,
            zid,
            channel,
            reply,
        } = install;
        if self.peers.remove(&name).is_some() {
            self.ready.retain(|m| m.from != name);
            for w in std::mem::take(&mut self.waiters) {
                if w.name == name {
                    let _ = w.reply.send(Err(Error::Closed));
                } else {
                    self.waiters.push(w);
                }
            }
        }
        let peer = Peer::new(zid, *channel, 0);
        let update = DurableUpdate {
            name: name.clone(),
            row: Some(peer.row()),
            outbox_delete_below: Some(u64::MAX),
            inbox_delete_below: Some(u64::MAX),
            ..DurableUpdate::default()
        };
        if let Err(e) = self.commit(vec![update]).await {
            let _ = reply.send(Err(Error::Shutdown));
            return Err(e);
        }
        self.peers.insert(name, peer);
        self.shared
            .set_peers(self.peers.iter().map(|(n, p)| (n.clone(), p.zid)).collect());
        let _ = reply.send(Ok(()));
        Ok(())
    }

    fn check_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        for w in std::mem::take(&mut self.waiters) {
            if w.reply.is_closed() {
                continue; // timed out
            }
            match self.peers.get(&w.name) {
                None => {
                    let _ = w.reply.send(Err(Error::Closed));
                }
                Some(p) if p.ch.acked() >= w.target => {
                    let _ = w.reply.send(Ok(()));
                }
                Some(_) => self.waiters.push(w),
            }
        }
    }

    /// Transmits what the committed outboxes have due (at most `batch_max` per peer per
    /// call; the rest is due at once and goes on the next round).
    async fn pump(&mut self, alive: &watch::Receiver<()>) {
        let now = self.now();
        let relay = self.relay.clone();
        let names: Vec<String> = self.peers.keys().cloned().collect();
        let c = &self.shared.counters;
        for name in names {
            for _ in 0..self.opts.batch_max {
                if stopped(alive) {
                    return;
                }
                let Some(p) = self.peers.get_mut(&name) else {
                    break;
                };
                let Some((seq, payload)) = p.ch.poll_transmit(now) else {
                    break;
                };
                let resend = seq < p.high;
                p.high = p.high.max(seq.saturating_add(1));
                match transmit(&self.carrier, &self.id, relay.as_deref(), &name, &payload).await {
                    Ok(custody) => {
                        bump(&c.transmitted, 1);
                        if resend {
                            bump(&c.resent, 1);
                        }
                        if custody && relay.is_none() {
                            if let Some(p) = self.peers.get_mut(&name) {
                                p.ch.on_custody(seq, now);
                            }
                        }
                    }
                    Err(e) => {
                        debug!(device = %self.id, peer = %name, error = %e,
                            "publish failed; the outbox resends later");
                        break;
                    }
                }
            }
        }
    }

    /// Pops committed messages in order and hands them to `recv` while there is room.
    fn release(&mut self) {
        for (name, p) in self.peers.iter_mut() {
            while self.ready.len() < READY_MAX {
                let Some((seq, body)) = p.ch.pop() else {
                    break;
                };
                p.released = seq.saturating_add(1);
                self.ready.push_back(Message {
                    from: name.clone(),
                    peer_zid: p.zid,
                    seq,
                    body,
                });
            }
        }
        while !self.ready.is_empty() {
            let Ok(permit) = self.msg_tx.try_reserve() else {
                break;
            };
            if let Some(m) = self.ready.pop_front() {
                permit.send(m);
            }
        }
    }

    /// Every second: a reconnected link makes every outbox record due; the relay hears from
    /// this device every `pull_interval`.
    async fn housekeeping(&mut self) {
        let connections = self.carrier.connections();
        if connections > self.connections {
            self.connections = connections;
            let now = self.now();
            for p in self.peers.values_mut() {
                p.ch.resend_all(now);
            }
            if self.relay.is_some() {
                self.pull().await;
            }
        }
        if self.relay.is_some() && Instant::now() >= self.next_pull {
            self.pull().await;
        }
    }

    /// Tells the relay this device is online.
    async fn pull(&mut self) {
        self.next_pull = Instant::now() + self.opts.pull_interval;
        let Some(relay) = &self.relay else {
            return;
        };
        let frame = Frame::Pull {
            window: self.opts.pull_window,
        };
        if let Err(e) = self.carrier.publish(relay, &frame.encode()).await {
            debug!(device = %self.id, error = %e, "pull to the relay not sent");
        }
    }
}

/// Whether the messenger handle is gone.
fn stopped(alive: &watch::Receiver<()>) -> bool {
    alive.has_changed().is_err()
}
