//! Durable, end-to-end secure messaging through brokers and relays (docs/MESSAGING.md):
//! send to a device id, receive messages in order with the sender's verified identity, while
//! either side may be offline.
//!
//! A [`Messenger`] is one device on one broker link ([`Carrier`]). Pairing ([`Messenger::pair`]
//! / [`Messenger::accept_pair`]) runs a KEAV handshake over the broker while both devices are
//! online and creates a durable channel ([`keav_proto::durable`]) stored in the device's store.
//! From then on [`Messenger::send`] commits each message to the outbox (one store transaction
//! with the channel state, group-committed) before it leaves, and a background task delivers
//! the outbox directly to the peer's inbox topic or through a relay ([`Delivery`]), resending
//! until the peer's end-to-end ack; received messages are committed to the inbox before they
//! are acknowledged and released in order by [`Messenger::recv`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), keav_net::Error> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keav_net::device::{Device, DeviceSettings};
//! use keav_net::messenger::{Carrier, Messenger, MessengerOptions};
//! use keav_net::mqtt::{Link, LinkOptions};
//!
//! let device = Device::open("monitor.keav", DeviceSettings::default())?;
//! let link = Link::connect("127.0.0.1:1883", "monitor", LinkOptions::default()).await?;
//! let m = Messenger::start(device, Carrier::Mqtt(Arc::new(link)), MessengerOptions::default())
//!     .await?;
//! if !m.peers().iter().any(|p| p == "phone") {
//!     m.pair("phone").await?; // once, while the phone is online (it calls accept_pair)
//! }
//! let seq = m.send("phone", b"72 bpm").await?; // durable when this returns
//! m.flush("phone", Duration::from_secs(30)).await?; // the phone's inbox has it
//! let reply = m.recv().await?; // from a paired peer, in order
//! m.ack(&reply).await?; // not released again after a restart
//! m.shutdown().await?;
//! # let _ = seq; Ok(()) }
//! ```
//!
//! # How it works
//!
//! [`Messenger::start`] loads every durable channel of the device from its store
//! (`keav_store` durable tables: the row with the channel's key state and the application's
//! `delivered` mark, the outbox and inbox rows), takes the link's mail stream
//! ([`crate::broker::Mail`]) and spawns one **actor** task that owns all channels. The public
//! methods talk to it through a command queue; nothing else touches a channel.
//!
//! The actor works in **batches**. It waits for a command, a mail, a timer or room in the
//! receive queue, then takes whatever else is already queued (up to
//! [`MessengerOptions::batch_max`] commands and mails) and applies it to the channels in
//! arrival order:
//!
//! - a send seals the message (`DurableChannel::send`) and adds the outbox row;
//! - a payload from a peer (`DurableChannel::receive`): new data adds an inbox row and asks
//!   for an ack to that peer; a duplicate asks for an ack (the sender missed one); an
//!   end-to-end ack deletes the outbox rows it covers; anything forged or malformed is counted
//!   ([`MessengerStats::rejected`]), logged at debug level and otherwise ignored; a payload
//!   the channel cannot take yet (reorder window, epoch rule) is counted as `deferred`,
//!   kept in the channel's early-arrival stash while it has room (taken once the gap before
//!   it fills, counted as `early`), else left to the sender's resend (through a relay: to
//!   the relay's next push);
//! - an application ack raises the `delivered` mark and deletes the inbox rows below it.
//!
//! Then it seals **one ack per peer** (`ack_payload`, which advances the control sealer),
//! writes every touched channel's row (key state, `delivered`) with all outbox and inbox
//! changes in **one store transaction** (`Store::durable_commit`, on a blocking thread), and
//! only after that transaction returns: answers the senders, transmits the acks, acknowledges
//! JetStream mail and relay custody, and releases the received messages to
//! [`Messenger::recv`]. The outbox is transmitted afterwards from the committed channels
//! (`poll_transmit`: new records first, then resends with per-record backoff). So no payload,
//! ack or custody acknowledgement ever leaves before the state and rows behind it are on disk
//! (keav-proto's persistence contract), and a crash at any point loses nothing that was
//! confirmed and reuses no nonce. A failed commit is fatal to the messenger: every pending and
//! later call fails with [`Error::Shutdown`] (restart it from the store).
//!
//! Timers: the actor wakes at the earliest `poll_timeout` of all channels; every second it
//! checks the link's connection count and, when the link reconnected, makes every outbox
//! record due at once (`resend_all`).
//!
//! # Delivery
//!
//! - [`Delivery::Direct`]: each payload is published to the peer's inbox topic. When the
//!   carrier confirms durable storage (JetStream), the record is in custody (`on_custody`: its
//!   next resend waits `DurableConfig::custody_ms`). With MQTT, messages for an offline peer
//!   are kept only by the broker's persistent session of that peer (if any); otherwise they
//!   are resent with backoff until the peer is back and acks.
//! - [`Delivery::Relay`]: each payload travels in a relay `Forward` frame
//!   ([`keav_proto::route::Frame`], hops [`keav_proto::route::DEFAULT_HOPS`]) to the relay. Its
//!   `Stored` frames for our data put those records in custody; `Refused` frames are counted
//!   ([`MessengerStats::refused`], a warning once per peer) and the record stays in the outbox
//!   (resent later). At start, every [`MessengerOptions::pull_interval`] and after a reconnect
//!   the device sends `Pull` to the relay. `Forward` frames from the relay for this device are
//!   processed like direct payloads from their `src`; after the commit the device answers
//!   `Stored` for every entry it will never need again (taken, duplicate, ack, rejected: a
//!   forged entry must not stay in the relay's window), and `Refused { Later }` for every
//!   deferred one (the relay keeps it, holds back what follows and pushes it again later:
//!   flow control, see [`crate::relay`]). Relay frames from anyone but the configured relay
//!   are rejected. Direct payloads are accepted in relay mode too (they authenticate
//!   themselves).
//! - **Gaps** ([`Delivery::Relay`]): after a batch in which a peer's entries came through
//!   the relay and one was deferred, or after which the channel holds messages beyond a
//!   missing one, the device sends the relay `Need { src: peer, dst: self, stream: data,
//!   seq }` with `seq` the first message it is missing (`inbox_ack`), unless the reorder
//!   window is full anyway; at most once per 500 ms for the same `seq` (counted in
//!   [`MessengerStats::needs`]). The relay pushes that entry at once if it holds it, else it
//!   passes the `Need` on to the peer. A `Need` from the relay naming this device as `src`
//!   is such a request from peer `dst`: the record is made due at once
//!   (`DurableChannel::on_need`) and resent by the next transmit round
//!   ([`MessengerStats::need_resends`]; a repeat for the same record within 1 s is ignored).
//!   So a record a relay lost (killed before it committed it) comes back in a round trip,
//!   not after the sender's backoff.
//!
//! JetStream mail is acknowledged to the server after the commit that took it, deferred
//! payloads included: unacknowledged, they would hold the consumer's `max_ack_pending` slots
//! until `ack_wait` and stall it. A deferred payload with something missing below it is
//! answered with an end-to-end ack instead, which tells the sender where this inbox stands;
//! an ack that does not move makes the sender resend from the gap at once (fast retransmit,
//! `keav_proto::durable`). One kept in the channel's early-arrival stash right after what
//! the inbox holds is not (`DurableChannel::deferral_needs_ack`): the receiver is only
//! behind, and such an ack would bring back records it already has.
//!
//! # Guarantees and their limits
//!
//! - **Exactly once into the inbox, in order**: a message is committed to the receiver's
//!   inbox once; duplicates and replays are refused by sequence number before any AEAD work.
//! - **To the application**: [`Messenger::recv`] returns each message once per process, in
//!   order per peer. A message the application has not acknowledged with [`Messenger::ack`]
//!   before a crash or restart is returned again after it (and only those): exactly once for
//!   an application that acks after processing, at least once for one that crashes between
//!   processing and acking.
//! - **Sender**: [`Messenger::send`] returns once the message is durable; it is resent after
//!   restarts until the peer acknowledges it end to end, and never sealed twice.
//! - **Bounds**: the outbox is bounded (`DurableConfig::outbox`, a full outbox fails `send`
//!   with [`Error::Durable`], never drops old messages); messages released but not yet
//!   acknowledged by the application stay in the store; a receive queue of
//!   [`RECV_QUEUE`] + [`READY_MAX`] released messages waits for `recv`, beyond that payloads
//!   are deferred and resent by their sender.
//! - **One messenger per link and per device**: a messenger takes the link's mail stream
//!   (a restart needs a new link), and [`Messenger::start`] waits (up to
//!   [`START_WAIT`]) until a previous messenger of the same device has stopped. Dropping a
//!   [`Messenger`] stops its task after the store transaction in flight, like a crash at that
//!   point; [`Messenger::shutdown`] also commits and transmits what was queued before it.
//! - **Pairing again** replaces the channel with that peer: messages still in the old
//!   channel's outbox or inbox are lost (the peer re-pairs as well, so both sides start over).

mod actor;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keav_proto::cache::Zid;
use keav_proto::durable::{DurableChannel, DurableConfig, DurableError};
use keav_proto::handshake::SessionOutcome;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::broker::{valid_device_id, Mail};
use crate::device::Device;
use crate::Error;

/// Released messages queued for [`Messenger::recv`].
pub const RECV_QUEUE: usize = 256;
/// Released messages the background task holds beyond [`RECV_QUEUE`] (popped from the
/// channels, committed, waiting for room in the receive queue).
pub const READY_MAX: usize = 1024;
/// How long [`Messenger::start`] waits for a previous messenger of the same device to stop.
pub const START_WAIT: Duration = Duration::from_secs(10);
/// Commands queued for the background task.
const CMD_QUEUE: usize = 1024;

/// The broker link a messenger uses.
#[derive(Clone)]
pub enum Carrier {
    /// An MQTT link ([`crate::mqtt::Link`]).
    Mqtt(std::sync::Arc<crate::mqtt::Link>),
    /// A NATS link ([`crate::nats::Link`]).
    Nats(std::sync::Arc<crate::nats::Link>),
}

impl core::fmt::Debug for Carrier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Carrier::Mqtt(l) => f.debug_tuple("Carrier::Mqtt").field(l).finish(),
            Carrier::Nats(l) => f.debug_tuple("Carrier::Nats").field(l).finish(),
        }
    }
}

impl Carrier {
    /// This device's id on the link.
    pub fn device_id(&self) -> &str {
        match self {
            Carrier::Mqtt(l) => l.device_id(),
            Carrier::Nats(l) => l.device_id(),
        }
    }

    pub(crate) async fn publish(&self, to: &str, payload: &[u8]) -> Result<bool, Error> {
        match self {
            Carrier::Mqtt(l) => l.publish(to, payload).await,
            Carrier::Nats(l) => l.publish(to, payload).await,
        }
    }

    fn take_mail(&self) -> Option<mpsc::Receiver<Mail>> {
        match self {
            Carrier::Mqtt(l) => l.take_mail(),
            Carrier::Nats(l) => l.take_mail(),
        }
    }

    pub(crate) fn connections(&self) -> u64 {
        match self {
            Carrier::Mqtt(l) => l.connections(),
            Carrier::Nats(l) => l.connections(),
        }
    }

    async fn handshake_peer(
        &self,
        device: &Device,
        peer: &str,
    ) -> Result<Box<SessionOutcome>, Error> {
        match self {
            Carrier::Mqtt(l) => l.handshake_peer(device, peer).await,
            Carrier::Nats(l) => l.handshake_peer(device, peer).await,
        }
    }

    async fn accept_handshake(
        &self,
        device: &Device,
    ) -> Result<(String, Box<SessionOutcome>), Error> {
        match self {
            Carrier::Mqtt(l) => l.accept_handshake(device).await,
            Carrier::Nats(l) => l.accept_handshake(device).await,
        }
    }
}

/// How messages reach peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Published straight to the peer's inbox topic (the broker's own queue — an MQTT
    /// persistent session or a JetStream stream — is the mailbox, if any).
    Direct,
    /// Through the relay with this device id on the same broker (its mailbox keeps messages
    /// for offline peers); this device also pulls its own messages from that relay.
    Relay(String),
}

/// Options of a [`Messenger`].
#[derive(Clone, Debug)]
pub struct MessengerOptions {
    /// Direct or through a relay (default: direct).
    pub delivery: Delivery,
    /// Outbox/inbox bounds and resend timing of each durable channel.
    pub durable: DurableConfig,
    /// Most messages committed in one store transaction (default 512).
    pub batch_max: usize,
    /// Frames a relay may push before this device's custody acks (default 256).
    pub pull_window: u32,
    /// How often the device tells its relay it is online (default 5 s).
    pub pull_interval: Duration,
}

impl Default for MessengerOptions {
    fn default() -> Self {
        MessengerOptions {
            delivery: Delivery::Direct,
            durable: DurableConfig::default(),
            batch_max: 512,
            pull_window: 256,
            pull_interval: Duration::from_secs(5),
        }
    }
}

/// One message received, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// The sender's device id (the durable channel's name).
    pub from: String,
    /// The sender's ZID, verified by the pairing handshake.
    pub peer_zid: Zid,
    /// The message's sequence number in that channel (from 0, no gaps).
    pub seq: u64,
    /// The message.
    pub body: Vec<u8>,
}

impl core::fmt::Debug for Message {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Message")
            .field("from", &self.from)
            .field("seq", &self.seq)
            .field("len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Counters of a messenger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessengerStats {
    /// Messages committed by `send`.
    pub sent: u64,
    /// Payloads put on the carrier (first sends and resends).
    pub transmitted: u64,
    /// Of those, resends.
    pub resent: u64,
    /// Messages taken into an inbox.
    pub received: u64,
    /// Payloads dropped: duplicates.
    pub duplicates: u64,
    /// Payloads dropped: failed authentication or malformed.
    pub rejected: u64,
    /// Payloads not taken on arrival (reorder window, epoch rule): kept in the channel's
    /// early-arrival stash while it has room, else the sender resends them.
    pub deferred: u64,
    /// Messages taken from the early-arrival stash once the gap before them filled (also
    /// counted in `received`).
    pub early: u64,
    /// Entries a relay refused (mailbox full, no route).
    pub refused: u64,
    /// `Need` frames sent to the relay (this device missed a message of a peer).
    pub needs: u64,
    /// Records resent at once because the peer needed them (a `Need` passed on by the relay).
    pub need_resends: u64,
}

/// The counters, shared by the actor (writer) and the handle (reader).
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    transmitted: AtomicU64,
    resent: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    deferred: AtomicU64,
    early: AtomicU64,
    refused: AtomicU64,
    needs: AtomicU64,
    need_resends: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What the actor and the handle share.
#[derive(Default)]
struct Shared {
    counters: Counters,
    /// Paired peers and their ZIDs.
    peers: Mutex<BTreeMap<String, Zid>>,
    /// The actor stopped on a store failure.
    failed: AtomicBool,
}

impl Shared {
    fn set_peers(&self, peers: BTreeMap<String, Zid>) {
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }
}

/// A command to the actor.
enum Cmd {
    Send {
        to: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    Ack {
        from: String,
        seq: u64,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Flush {
        to: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Install {
        name: String,
        zid: Zid,
        channel: Box<DurableChannel>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Shutdown,
}

/// Converts a durable-channel failure: record-layer refusals (a message too long, keys used
/// up) keep their record error, the rest is [`Error::Durable`].
pub(crate) fn durable_error(e: DurableError) -> Error {
    match e {
        DurableError::Record(r) => Error::Record(r),
        e => Error::Durable(e),
    }
}

/// One lock per device identity: a device runs one messenger at a time (the lock is held by
/// the running actor).
fn device_lock(zid: Zid) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<Zid, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    LOCKS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(zid)
        .or_default()
        .clone()
}

/// A device's durable messaging endpoint.
pub struct Messenger {
    device: Device,
    carrier: Carrier,
    opts: MessengerOptions,
    cmd: mpsc::Sender<Cmd>,
    inbox: tokio::sync::Mutex<mpsc::Receiver<Message>>,
    shared: Arc<Shared>,
    clock: actor::Clock,
    /// Dropped with the messenger: tells the actor to stop.
    _alive: watch::Sender<()>,
    task: JoinHandle<()>,
}

impl core::fmt::Debug for Messenger {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Messenger")
            .field("device_id", &self.carrier.device_id())
            .field("delivery", &self.opts.delivery)
            .finish_non_exhaustive()
    }
}

impl Messenger {
    /// Starts the messenger of `device` on `carrier`: restores every durable channel from the
    /// store (unacknowledged messages are resent, unacknowledged received ones released
    /// again) and starts the background tasks.
    ///
    /// Errors: bad options or relay id, the link's mail already taken ([`Error::InvalidInput`]),
    /// another messenger of this device still running after [`START_WAIT`]
    /// ([`Error::Timeout`]), a store failure or a damaged channel ([`Error::Store`],
    /// [`Error::Durable`]).
    pub async fn start(
        device: Device,
        carrier: Carrier,
        opts: MessengerOptions,
    ) -> Result<Messenger, Error> {
        if opts.batch_max == 0 || opts.pull_window == 0 || opts.pull_interval.is_zero() {
            return Err(Error::InvalidInput(
                "batch_max, pull_window and pull_interval must be positive",
            ));
        }
        if let Delivery::Relay(r) = &opts.delivery {
            if !valid_device_id(r) || r == carrier.device_id() {
                return Err(Error::InvalidInput(
                    "the relay id is a device id other than this device's",
                ));
            }
        }
        let guard = tokio::time::timeout(START_WAIT, device_lock(device.zid()).lock_owned())
            .await
            .map_err(|_| Error::Timeout("another messenger of this device is still running"))?;
        let clock = actor::Clock::new();
        let now = clock.now_ms();
        let (dev, cfg) = (device.clone(), opts.durable);
        let peers = tokio::task::spawn_blocking(move || actor::load(&dev, cfg, now))
            .await
            .map_err(actor::join_error)??;
        let mail = carrier.take_mail().ok_or(Error::InvalidInput(
            "the link's mail is already taken (one messenger or relay per link)",
        ))?;
        let shared = Arc::new(Shared::default());
        shared.set_peers(peers.iter().map(|(n, p)| (n.clone(), p.zid)).collect());
        let (cmd, cmd_rx) = mpsc::channel(CMD_QUEUE);
        let (msg_tx, msg_rx) = mpsc::channel(RECV_QUEUE);
        let (alive, alive_rx) = watch::channel(());
        let actor = actor::Actor::new(
            device.clone(),
            carrier.clone(),
            opts.clone(),
            clock,
            peers,
            shared.clone(),
            msg_tx,
        );
        let task = tokio::spawn(actor.run(cmd_rx, mail, alive_rx, guard));
        Ok(Messenger {
            device,
            carrier,
            opts,
            cmd,
            inbox: tokio::sync::Mutex::new(msg_rx),
            shared,
            clock,
            _alive: alive,
            task,
        })
    }

    /// Pairs with device `peer` (initiator; both online): handshake, then a new durable
    /// channel, replacing an existing one with that peer (whose undelivered messages are lost:
    /// the error case is documented). Returns the peer's verified ZID.
    pub async fn pair(&self, peer: &str) -> Result<Zid, Error> {
        if !valid_device_id(peer) || peer == self.carrier.device_id() {
            return Err(Error::InvalidInput(
                "the peer is a device id other than this device's",
            ));
        }
        let outcome = self.carrier.handshake_peer(&self.device, peer).await?;
        self.install(peer.to_string(), &outcome).await
    }

    /// Waits for a device to pair with this one (responder); returns its id and ZID.
    pub async fn accept_pair(&self) -> Result<(String, Zid), Error> {
        let (peer, outcome) = self.carrier.accept_handshake(&self.device).await?;
        if !valid_device_id(&peer) {
            return Err(Error::InvalidInput("the peer's device id is invalid"));
        }
        let zid = self.install(peer.clone(), &outcome).await?;
        Ok((peer, zid))
    }

    async fn install(&self, name: String, outcome: &SessionOutcome) -> Result<Zid, Error> {
        let channel = DurableChannel::new(outcome, self.opts.durable, self.clock.now_ms())
            .map_err(durable_error)?;
        let zid = outcome.peer_zid;
        self.call(|reply| Cmd::Install {
            name,
            zid,
            channel: Box::new(channel),
            reply,
        })
        .await?;
        Ok(zid)
    }

    /// Commits `body` to the outbox of the channel with `to` and returns its sequence number
    /// once it is durable; delivery continues in the background. Errors: no channel with `to`
    /// ([`Error::InvalidInput`]), outbox full, message too long, store failure.
    pub async fn send(&self, to: &str, body: &[u8]) -> Result<u64, Error> {
        if body.len() > keav_proto::record::MAX_PLAINTEXT {
            return Err(Error::Record(keav_proto::record::RecordError::TooLong));
        }
        self.call(|reply| Cmd::Send {
            to: to.to_string(),
            body: body.to_vec(),
            reply,
        })
        .await
    }

    /// The next message from any peer, in order per peer. Each message is returned once per
    /// process; until [`Messenger::ack`] it is returned again after a restart.
    pub async fn recv(&self) -> Result<Message, Error> {
        self.inbox.lock().await.recv().await.ok_or(Error::Shutdown)
    }

    /// The application is done with `msg` and every earlier message from the same peer.
    /// Acknowledging a message not yet returned by [`Messenger::recv`] (or from an unknown
    /// peer) is [`Error::InvalidInput`]; an older acknowledgement changes nothing.
    pub async fn ack(&self, msg: &Message) -> Result<(), Error> {
        self.call(|reply| Cmd::Ack {
            from: msg.from.clone(),
            seq: msg.seq,
            reply,
        })
        .await
    }

    /// Waits until every message sent to `to` so far is acknowledged end to end, or `timeout`.
    pub async fn flush(&self, to: &str, timeout: Duration) -> Result<(), Error> {
        let call = self.call(|reply| Cmd::Flush {
            to: to.to_string(),
            reply,
        });
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| Error::Timeout("waiting for the peer's end-to-end ack"))?
    }

    /// The paired peers' device ids.
    pub fn peers(&self) -> Vec<String> {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The counters.
    pub fn stats(&self) -> MessengerStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MessengerStats {
            sent: l(&c.sent),
            transmitted: l(&c.transmitted),
            resent: l(&c.resent),
            received: l(&c.received),
            duplicates: l(&c.duplicates),
            rejected: l(&c.rejected),
            deferred: l(&c.deferred),
            early: l(&c.early),
            refused: l(&c.refused),
            needs: l(&c.needs),
            need_resends: l(&c.need_resends),
        }
    }

    /// Stops the background tasks after committing what is in flight.
    pub async fn shutdown(self) -> Result<(), Error> {
        let Messenger {
            cmd, task, shared, ..
        } = self;
        // If the actor is gone already, the join below says how it ended.
        let _ = cmd.send(Cmd::Shutdown).await;
        task.await.map_err(actor::join_error)?;
        if shared.failed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        Ok(())
    }

    /// Sends a command and waits for its answer.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Cmd,
    ) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(make(reply))
            .await
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }
}
