//! What the broker carriers ([`crate::mqtt`], [`crate::nats`]) share: device ids, the
//! subject scheme, payload classification and bounds, the routing table of peers and pending
//! incoming handshakes, the mail queue, the counters, and the handshakes run over a broker.
//!
//! A carrier only connects, subscribes to the device's inbox, feeds every incoming message to
//! the shared router and publishes through its client; everything else is here, so both
//! carriers behave alike (the carrier docs describe that behaviour).
//!
//! # Mail
//!
//! Besides handshake messages and live records, a link carries *mail*: durable payloads
//! (first byte `0x44`, [`keav_proto::durable::PAYLOAD_TAG`]) and relay frames (`0x52`,
//! [`keav_proto::route::FRAME_TAG`]), the traffic of [`crate::messenger`] and
//! [`crate::relay`]. [`Link::publish`](crate::mqtt::Link::publish) sends one to a device's
//! inbox; incoming mail never reaches a live route or `accept` but the bounded queue of
//! [`Link::take_mail`](crate::mqtt::Link::take_mail) (4096 entries; when it is full further
//! mail is dropped and counted as `dropped_busy`: the sender's end-to-end resend recovers it).
//! The same size and topic checks apply as to every payload.
//!
//! Where mail waits while its recipient is offline:
//!
//! - core NATS, MQTT with a clean session: nowhere (lost; the messenger resends);
//! - MQTT with [`LinkOptions::persistent_session`]: the broker's session queue (Mosquitto:
//!   at most `max_queued_messages`, 1000 by default, then it drops new ones with only a log
//!   line);
//! - NATS with [`LinkOptions::jetstream`]: a JetStream stream ([`JetStreamOptions`]), which
//!   refuses new messages with an error to the sender when full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::debug;

use crate::device::Device;
use crate::session::{handshake, log_failure, Attach, Channel, Clock, HsLink, Options, Side};
use crate::udp::{
    channel_from, HsUdp, Source, UdpTx, BARE_MESSAGE, RECORD_BATCH, RECORD_CLOSE, RECORD_DATA,
};
use crate::Error;
use keav_proto::durable::PAYLOAD_TAG;
use keav_proto::handshake::{Endpoint, SessionOutcome};
use keav_proto::msg::Message;
use keav_proto::route::FRAME_TAG;

/// Datagrams queued per peer route.
const PEER_QUEUE: usize = 256;
/// When a peer route's queue is full, the receive loop waits this long for room (the
/// channel's reader is taking records: flow control back to the broker, as a plain
/// subscriber has) before it drops the message; a route that stalled this long drops
/// without waiting until its queue has room again, so a reader that stopped reading cannot
/// hold up the link.
const STALL: Duration = Duration::from_millis(250);
/// Incoming handshakes waiting for `accept`.
const ACCEPT_QUEUE: usize = 16;
/// Incoming mail waiting for the taker of [`Hub::take_mail`].
pub(crate) const MAIL_QUEUE: usize = 4096;
/// How long a responder that completed a handshake from [`Hub::accept_handshake`] keeps
/// answering retransmitted Confirm2 messages (its Conf2ACK may have been lost).
const LINGER: Duration = Duration::from_secs(10);

/// Whether `payload` is mail: a durable payload or a relay frame.
pub(crate) fn is_mail(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(&(PAYLOAD_TAG | FRAME_TAG)))
}

/// How one broker spells subjects (MQTT: topics).
#[derive(Debug)]
pub(crate) struct Scheme {
    /// The carrier's name in logs and errors.
    pub(crate) name: &'static str,
    /// What the handshake failures of `accept` are logged as.
    incoming: &'static str,
    /// The level separator.
    sep: char,
    /// The wildcard matching every remaining level.
    wildcard: &'static str,
}

/// MQTT topics: `keav/v1/<dst>/from/<src>`.
pub(crate) const MQTT: Scheme = Scheme {
    name: "MQTT",
    incoming: "incoming MQTT handshake",
    sep: '/',
    wildcard: "#",
};

/// NATS subjects: `keav.v1.<dst>.from.<src>`.
pub(crate) const NATS: Scheme = Scheme {
    name: "NATS",
    incoming: "incoming NATS handshake",
    sep: '.',
    wildcard: ">",
};

impl Scheme {
    /// The subject on which `from` sends to `to`.
    pub(crate) fn subject(&self, to: &str, from: &str) -> String {
        format!("{}{from}", self.inbox_prefix(to))
    }

    /// Everything up to the sender in `id`'s inbox subjects.
    fn inbox_prefix(&self, id: &str) -> String {
        let s = self.sep;
        format!("keav{s}v1{s}{id}{s}from{s}")
    }

    /// The subscription filter of `id`'s inbox.
    pub(crate) fn inbox_filter(&self, id: &str) -> String {
        format!("{}{}", self.inbox_prefix(id), self.wildcard)
    }
}

/// Options of one broker link ([`crate::mqtt::Link`], [`crate::nats::Link`]).
#[derive(Clone)]
pub struct LinkOptions {
    /// The client id: MQTT client id, NATS connection name (default: the device id). Two MQTT
    /// connections with the same client id push each other off the broker.
    pub client_id: Option<String>,
    /// User name and password, if the broker wants them (never logged).
    pub credentials: Option<(String, String)>,
    /// MQTT keep-alive, NATS ping interval (default 30 s).
    pub keep_alive: Duration,
    /// How long `Link::connect` waits for the broker to accept the connection and the
    /// subscription (default 5 s).
    pub connect_timeout: Duration,
    /// Larger incoming payloads are dropped and counted (default 64 KiB; a record is at most
    /// 16 KiB plus overhead, and so is a record batch: a link that takes the largest record
    /// takes every batch).
    pub max_payload: usize,
    /// Peers routed at once (handshaking or with a live channel; default 1024).
    pub max_peers: usize,
    /// MQTT only (NATS refuses it with [`Error::InvalidInput`]; see `jetstream`): connect with
    /// a persistent session (`clean_session = false`, default `false`). The broker then keeps
    /// the session under the client id — which must be stable: the default client id, the
    /// device id, is — while the device is offline: the inbox subscription survives, and QoS 1
    /// messages published to the inbox meanwhile are queued and arrive after the reconnect.
    /// Mail among them is kept in the mail queue even before
    /// [`take_mail`](crate::mqtt::Link::take_mail) is called (up to its bound), so what
    /// arrives during `connect` is not lost. Mosquitto queues at most `max_queued_messages`
    /// (default 1000) per offline session and drops further ones with only a log line; a
    /// session persists across a broker restart only if the broker saved it (Mosquitto:
    /// `persistence true`, written at shutdown and every `autosave_interval`). rumqttc
    /// acknowledges a message when it reads it, before the application has it: a crash in
    /// between loses it (the messenger's end-to-end acks recover it).
    pub persistent_session: bool,
    /// NATS only (MQTT refuses it with [`Error::InvalidInput`]): take mail from a JetStream
    /// stream, the device's mailbox while it is offline (default `None`: core NATS only,
    /// at most once). See [`JetStreamOptions`].
    pub jetstream: Option<JetStreamOptions>,
    /// Channels of this link send the records that pile up while their link is publishing
    /// as one message, a record batch, instead of one message each (default `true`).
    /// Nothing waits for a batch to fill, so a channel that sends now and then sends one
    /// message per record as without it; a batch is at most the size of the largest
    /// record. Receivers take batches either way. `false`: every record is its own
    /// message, published before `send` returns. See docs/MESSAGING.md.
    pub coalesce_records: bool,
}

/// A NATS link's JetStream mailbox ([`LinkOptions::jetstream`]).
///
/// On connect the link gets or creates the stream `stream` capturing `keav.v1.*.from.*`
/// (every device's inbox; file storage, work-queue retention, discard new), and gets or
/// creates a durable pull consumer named after the device id, filtered on
/// `keav.v1.<id>.from.*`, with explicit acks. An existing stream or consumer is used as it is
/// (its limits are not changed). Only one stream on a server may capture these subjects.
///
/// - Mail published by [`Link::publish`](crate::nats::Link::publish) goes through a JetStream
///   publish and returns `Ok(true)` after the server's publish ack (the message is stored).
///   When the stream is full (`max_messages`, `max_bytes`) the publish fails with an error
///   naming the reason: a full mailbox refuses new mail, it never drops stored mail.
/// - Incoming mail comes from the consumer, once
///   [`Link::take_mail`](crate::nats::Link::take_mail) has been called (until then it waits
///   in the stream), with [`Mail::ack`] set: the server redelivers it after `ack_wait` until
///   it is acknowledged ([`MailAck::ack`]), and removes it then. At most `max_ack_pending`
///   messages are delivered unacknowledged at a time; when the mail queue is full the
///   consumer waits (nothing is dropped).
/// - Handshake messages and live records still travel by core publish and subscribe; the
///   stream captures them too (it captures every inbox subject), and the consumer
///   acknowledges and ignores them. The core subscription ignores mail (it comes from the
///   consumer). Messages to devices that never consume (no JetStream, or gone) stay in the
///   stream until `max_age`, counting toward its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JetStreamOptions {
    /// The stream's name (default `KEAV`).
    pub stream: String,
    /// Most messages the stream holds, all devices together (default 1 000 000; -1: no limit).
    pub max_messages: i64,
    /// Most bytes the stream holds (default 1 GiB; -1: no limit).
    pub max_bytes: i64,
    /// Messages older than this are removed, consumed or not (default 7 days; zero: kept
    /// until consumed).
    pub max_age: Duration,
    /// Unacknowledged mail is redelivered after this long (default 30 s).
    pub ack_wait: Duration,
    /// Most mail delivered and not yet acknowledged (default 1024).
    pub max_ack_pending: i64,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            stream: "KEAV".to_string(),
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1024,
        }
    }
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            client_id: None,
            credentials: None,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_payload: 64 * 1024,
            max_peers: 1024,
            persistent_session: false,
            jetstream: None,
            coalesce_records: true,
        }
    }
}

impl core::fmt::Debug for LinkOptions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinkOptions")
            .field("client_id", &self.client_id)
            .field("credentials", &self.credentials.as_ref().map(|(u, _)| u))
            .field("keep_alive", &self.keep_alive)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_payload", &self.max_payload)
            .field("max_peers", &self.max_peers)
            .field("persistent_session", &self.persistent_session)
            .field("jetstream", &self.jetstream)
            .field("coalesce_records", &self.coalesce_records)
            .finish()
    }
}

/// Counters of a broker link's incoming messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Messages received on the inbox (dropped ones included).
    pub received: u64,
    /// Dropped: larger than the link's `max_payload` option.
    pub dropped_oversized: u64,
    /// Dropped: empty, unclassifiable first byte, retained (MQTT), or a malformed topic.
    pub dropped_malformed: u64,
    /// Dropped: from a sender with no route, and not a Hello that could start one.
    pub dropped_unrouted: u64,
    /// Dropped: a route's queue stayed full (its reader took nothing for 250 ms, or had
    /// stalled before), or the accept queue, the mail queue or the peer table was full.
    pub dropped_busy: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    oversized: AtomicU64,
    malformed: AtomicU64,
    unrouted: AtomicU64,
    busy: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Checks a device id: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn valid_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_id(id: &str) -> Result<(), Error> {
    if valid_device_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidInput(
            "a broker device id is 1 to 64 characters of [A-Za-z0-9_-]",
        ))
    }
}

/// Checks a link's device id and bounds before it connects.
pub(crate) fn check_config(id: &str, max_payload: usize, max_peers: usize) -> Result<(), Error> {
    check_id(id)?;
    if max_payload == 0 || max_peers == 0 {
        return Err(Error::InvalidInput(
            "max_payload and max_peers must be positive",
        ));
    }
    Ok(())
}

/// Splits a broker address `host:port` (`[v6]:port` too).
pub(crate) fn host_port(addr: &str) -> Result<(&str, u16), Error> {
    addr.rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_matches(|c| c == '[' || c == ']'),
                p.parse::<u16>().ok()?,
            ))
        })
        .filter(|(h, _)| !h.is_empty())
        .ok_or(Error::InvalidInput("the broker address is host:port"))
}

/// A broker client that publishes.
#[derive(Clone)]
pub(crate) enum Publisher {
    /// An MQTT client (QoS 1).
    Mqtt(rumqttc::AsyncClient),
    /// A core NATS client (at most once).
    Nats(async_nats::Client),
}

/// Sends datagrams to one peer's inbox.
#[derive(Clone)]
pub(crate) struct BrokerTx {
    publisher: Arc<Publisher>,
    subject: String,
    /// `subject` as NATS takes it (shared bytes: publishing clones a reference, not the
    /// string).
    nats_subject: async_nats::Subject,
}

impl core::fmt::Debug for BrokerTx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BrokerTx")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl BrokerTx {
    pub(crate) fn new(publisher: Arc<Publisher>, subject: String) -> BrokerTx {
        let nats_subject = async_nats::Subject::from(subject.as_str());
        BrokerTx {
            publisher,
            subject,
            nats_subject,
        }
    }

    /// Publishes `d`, which becomes the message's payload without a copy; waits while the
    /// client's queue is full.
    pub(crate) async fn send(&self, d: Vec<u8>) -> Result<(), Error> {
        match &*self.publisher {
            Publisher::Mqtt(c) => crate::mqtt::publish(c, &self.subject, d).await,
            Publisher::Nats(c) => {
                crate::nats::publish_owned(c, self.nats_subject.clone(), Bytes::from(d)).await
            }
        }
    }
}

/// The public methods every broker `Link` has besides `connect`, delegated to its `hub`
/// field (a [`Hub`]), so both carriers document and behave alike.
macro_rules! link_api {
    () => {
        /// This device's id.
        pub fn device_id(&self) -> &str {
            self.hub.device_id()
        }

        /// The incoming-message counters.
        pub fn stats(&self) -> $crate::broker::LinkStats {
            self.hub.stats()
        }

        /// Publishes one payload (a durable payload or a relay frame, see [`$crate::broker::Mail`])
        /// to device `to`'s inbox. Returns whether the broker confirmed it durably stored the
        /// message (JetStream publish ack; `false` for core NATS and MQTT, whose PUBACK only
        /// says the broker received it). Refuses ([`$crate::Error::InvalidInput`]) an invalid
        /// device id, a payload whose first byte is not 0x44 or 0x52, and one larger than the
        /// link's `max_payload`. A full JetStream stream refuses the message with an
        /// [`std::io::ErrorKind::StorageFull`] I/O error naming the server's reason.
        pub async fn publish(&self, to: &str, payload: &[u8]) -> Result<bool, $crate::Error> {
            self.hub.publish(to, payload).await
        }

        /// The stream of incoming durable payloads (first byte 0x44) and relay frames (0x52),
        /// the traffic of [`crate::messenger`] and [`crate::relay`]. Only the first call gets
        /// it (`None` afterwards); before it is taken such payloads are counted as unrouted,
        /// except with an MQTT persistent session (they are queued, up to the queue's bound)
        /// and with JetStream (they wait in the stream). Mail never reaches a live channel
        /// or `accept`; see [`$crate::broker`] for where it waits while the device is offline.
        pub fn take_mail(&self) -> Option<tokio::sync::mpsc::Receiver<$crate::broker::Mail>> {
            self.hub.take_mail()
        }

        /// Runs the handshake as initiator with device `peer_id` like `connect_peer`, but
        /// returns the completed session (persisted in the device's store) instead of a live
        /// channel: what [`crate::messenger`] derives a durable channel from.
        pub async fn handshake_peer(
            &self,
            device: &$crate::device::Device,
            peer_id: &str,
        ) -> Result<Box<keav_proto::handshake::SessionOutcome>, $crate::Error> {
            self.hub.handshake_peer(device, peer_id).await
        }

        /// The responder side of [`Self::handshake_peer`]: the next incoming handshake's
        /// sender and session (failed handshakes are logged and skipped).
        pub async fn accept_handshake(
            &self,
            device: &$crate::device::Device,
        ) -> Result<(String, Box<keav_proto::handshake::SessionOutcome>), $crate::Error> {
            self.hub.accept_handshake(device).await
        }

        /// How many times the link has (re)connected to the broker (1 after `connect`).
        pub fn connections(&self) -> u64 {
            self.hub.connections()
        }

        /// Runs the handshake as initiator with device `peer_id` (also the label under which
        /// the device's store knows the peer) and returns the channel. Replaces any previous
        /// route to this peer.
        pub async fn connect_peer(
            &self,
            device: &$crate::device::Device,
            peer_id: &str,
            opts: &$crate::session::Options,
        ) -> Result<$crate::session::Channel<Self>, $crate::Error> {
            self.hub.connect_peer(device, peer_id, opts).await
        }

        /// Waits for a peer's Hello, runs the handshake as responder, and returns the
        /// caller's device id and the channel. Failed handshakes are logged and skipped;
        /// handshakes run one at a time.
        pub async fn accept(
            &self,
            device: &$crate::device::Device,
            opts: &$crate::session::Options,
        ) -> Result<(String, $crate::session::Channel<Self>), $crate::Error> {
            self.hub.accept(device, opts).await
        }
    };
}
pub(crate) use link_api;

/// One incoming durable payload or relay frame ([`Link::take_mail`](crate::mqtt::Link::take_mail)).
pub struct Mail {
    /// The sender named by the topic or subject (a routing hint, not an identity: the
    /// payload authenticates itself end to end).
    pub from: String,
    /// The payload (first byte 0x44 or 0x52).
    pub payload: Vec<u8>,
    /// For messages from a JetStream consumer: acknowledge once the payload is committed
    /// (`None` when the carrier needs no acknowledgement).
    pub ack: Option<MailAck>,
}

impl core::fmt::Debug for Mail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mail")
            .field("from", &self.from)
            .field("len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Acknowledges one JetStream message.
pub struct MailAck {
    acker: async_nats::jetstream::message::Acker,
}

impl core::fmt::Debug for MailAck {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MailAck").finish_non_exhaustive()
    }
}

impl MailAck {
    pub(crate) fn new(acker: async_nats::jetstream::message::Acker) -> MailAck {
        MailAck { acker }
    }

    /// Tells the server the message is committed (it will not redeliver it). Returns once the
    /// server confirmed the ack (so a link dropped right afterwards cannot lose it); an error
    /// means the message may be redelivered.
    pub async fn ack(self) -> Result<(), Error> {
        self.acker
            .double_ack()
            .await
            .map_err(|e| Error::Io(std::io::Error::other(format!("NATS JetStream ack: {e}"))))
    }
}

/// A Hello from a new sender, with the queue of its further messages.
struct Pending {
    from: String,
    queue: mpsc::Receiver<Bytes>,
    established: Arc<AtomicBool>,
}

/// Where one peer's messages go.
struct Route {
    tx: mpsc::Sender<Bytes>,
    /// Set when the queue stayed full for [`STALL`]; cleared once it takes a message again.
    stalled: Arc<AtomicBool>,
    /// Set once this route's handshake completed.
    established: Arc<AtomicBool>,
    /// The peer's Hello message in this route's session.
    hello: Option<Bytes>,
}

impl Route {
    fn new(tx: mpsc::Sender<Bytes>, hello: Option<Bytes>) -> (Route, Arc<AtomicBool>) {
        let established = Arc::new(AtomicBool::new(false));
        let r = Route {
            tx,
            stalled: Arc::new(AtomicBool::new(false)),
            established: established.clone(),
            hello,
        };
        (r, established)
    }
}

/// A message for a route whose queue is full: [`Feed::deliver`] waits for room.
struct Blocked {
    tx: mpsc::Sender<Bytes>,
    stalled: Arc<AtomicBool>,
    payload: Bytes,
}

/// `payload` if it is a well-formed Hello message.
fn hello_message(payload: &Bytes) -> Option<Bytes> {
    matches!(Message::parse(payload), Ok(Message::Hello(_))).then(|| payload.clone())
}

/// Where a link's incoming mail comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MailSource {
    /// The inbox subscription; mail before `take_mail` is counted as unrouted.
    Inbox,
    /// The inbox subscription of a persistent session: mail before `take_mail` is queued.
    InboxEarly,
    /// A JetStream consumer ([`Feed::consumed`]); the inbox subscription ignores mail.
    Consumer,
}

struct Router {
    id: String,
    scheme: &'static Scheme,
    inbox_prefix: String,
    max_payload: usize,
    max_peers: usize,
    routes: Mutex<HashMap<String, Route>>,
    counters: Counters,
    mail_source: MailSource,
    mail: mpsc::Sender<Mail>,
    /// Set once `take_mail` was called.
    mail_taken: watch::Sender<bool>,
    /// MQTT connections acknowledged by the broker (NATS counts its own).
    connections: AtomicU64,
}

impl Router {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        // A poisoned map is still a consistent map of senders.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sender named by an inbox `topic`, if it is well formed.
    fn sender<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(self.inbox_prefix.as_str())
            .filter(|s| valid_device_id(s))
    }

    /// Counts and checks one incoming message: its sender if the topic is well formed and
    /// the payload not oversized.
    fn check<'t>(&self, topic: &'t str, payload: &[u8]) -> Option<&'t str> {
        let (c, carrier) = (&self.counters, self.scheme.name);
        bump(&c.received);
        let Some(from) = self.sender(topic) else {
            bump(&c.malformed);
            debug!(
                carrier,
                len = topic.len(),
                "message on a malformed topic dropped"
            );
            return None;
        };
        if payload.len() > self.max_payload {
            bump(&c.oversized);
            debug!(
                carrier,
                from,
                len = payload.len(),
                "oversized payload dropped"
            );
            return None;
        }
        Some(from)
    }

    /// Queues one incoming mail from the inbox subscription (never waits).
    fn mail(&self, from: &str, payload: &[u8]) {
        let (c, carrier) = (&self.counters, self.scheme.name);
        if self.mail_source == MailSource::Inbox && !*self.mail_taken.borrow() {
            bump(&c.unrouted);
            debug!(carrier, from, "mail before take_mail: dropped");
            return;
        }
        let mail = Mail {
            from: from.to_string(),
            payload: payload.to_vec(),
            ack: None,
        };
        match self.mail.try_send(mail) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&c.busy);
                debug!(carrier, from, "mail queue full: mail dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                bump(&c.unrouted);
                debug!(carrier, from, "mail receiver gone: mail dropped");
            }
        }
    }

    /// Removes the route to `peer` if it is the one whose queue `tx` feeds or a dead one.
    fn remove_route(&self, peer: &str, tx: Option<&mpsc::Sender<Bytes>>) {
        let mut routes = self.routes();
        let ours = routes
            .get(peer)
            .is_some_and(|r| r.tx.is_closed() || tx.is_some_and(|tx| tx.same_channel(&r.tx)));
        if ours {
            routes.remove(peer);
        }
    }

    /// Routes one incoming message through the locked route table `routes`; a message for a
    /// route whose queue is full (and that has not stalled) is given back to wait for room.
    fn route(
        &self,
        routes: &mut HashMap<String, Route>,
        topic: &str,
        payload: &Bytes,
        retained: bool,
        accept: &mpsc::Sender<Pending>,
    ) -> Option<Blocked> {
        let (c, carrier) = (&self.counters, self.scheme.name);
        if self.mail_source == MailSource::Consumer && !retained && is_mail(payload) {
            // The JetStream consumer delivers (and counts) it.
            return None;
        }
        let from = self.check(topic, payload)?;
        if !retained && is_mail(payload) {
            self.mail(from, payload);
            return None;
        }
        if retained
            || !matches!(
                payload.first(),
                Some(&(BARE_MESSAGE | RECORD_DATA | RECORD_CLOSE | RECORD_BATCH))
            )
        {
            bump(&c.malformed);
            debug!(carrier, from, retained, "unclassifiable payload dropped");
            return None;
        }
        let hello = match payload.first() {
            Some(&BARE_MESSAGE) => hello_message(payload),
            _ => None,
        };
        if let Some(r) = routes.get_mut(from) {
            let new_session = match (&hello, &r.hello) {
                // A retransmitted or duplicated Hello of this route's session, or a Hello
                // during its handshake: the route's handshake deals with it.
                (Some(h), Some(old)) => h != old && r.established.load(Ordering::Acquire),
                (Some(_), None) if r.established.load(Ordering::Acquire) => true,
                (Some(h), None) => {
                    r.hello = Some(h.clone());
                    false
                }
                (None, _) => false,
            };
            if new_session {
                // The peer started over (e.g. it restarted): the new session replaces the
                // established one, whose receiver ends with `Error::Shutdown`.
                debug!(
                    carrier,
                    from, "a new Hello from an established peer: new session"
                );
                routes.remove(from);
            } else {
                match r.tx.try_send(payload.clone()) {
                    Ok(()) => {
                        r.stalled.store(false, Ordering::Relaxed);
                        return None;
                    }
                    Err(mpsc::error::TrySendError::Full(payload)) => {
                        if r.stalled.load(Ordering::Relaxed) {
                            bump(&c.busy);
                            debug!(carrier, from, "peer queue stalled: message dropped");
                            return None;
                        }
                        return Some(Blocked {
                            tx: r.tx.clone(),
                            stalled: r.stalled.clone(),
                            payload,
                        });
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        routes.remove(from);
                    }
                }
            }
        }
        let Some(hello) = hello else {
            bump(&c.unrouted);
            debug!(
                carrier,
                from, "message from a sender with no route is not a Hello: dropped"
            );
            return None;
        };
        if routes.len() >= self.max_peers {
            routes.retain(|_, r| !r.tx.is_closed());
            if routes.len() >= self.max_peers {
                bump(&c.busy);
                debug!(carrier, from, "peer table full: Hello dropped");
                return None;
            }
        }
        let (qtx, qrx) = mpsc::channel(PEER_QUEUE);
        let _ = qtx.try_send(payload.clone());
        let (route, established) = Route::new(qtx, Some(hello));
        let pending = Pending {
            from: from.to_string(),
            queue: qrx,
            established,
        };
        if accept.try_send(pending).is_err() {
            bump(&c.busy);
            debug!(
                carrier,
                from, "accept queue full: Hello dropped (the peer retransmits)"
            );
            return None;
        }
        routes.insert(from.to_string(), route);
        None
    }
}

/// What the JetStream consumer does with one message it delivered ([`Feed::consumed`]).
pub(crate) enum Consumed {
    /// Mail from this sender: hand it to [`Feed::send_mail`] (acknowledged by the taker).
    Mail(String),
    /// Not mail (a handshake message or a record, which the core subscription delivers), or
    /// dropped and counted: acknowledge it and go on.
    Ignore,
}

/// The inbound side of a broker link: the carrier's receive loop hands every message of the
/// inbox subscription to [`Feed::deliver`].
#[derive(Clone)]
pub(crate) struct Feed {
    router: Arc<Router>,
    accept: mpsc::Sender<Pending>,
}

impl Feed {
    /// Counts, checks and routes one incoming message (`retained`: an MQTT retained message).
    /// Waits up to [`STALL`] while the route's queue is full.
    pub(crate) async fn deliver(&self, subject: &str, payload: &Bytes, retained: bool) {
        let blocked = {
            let mut routes = self.router.routes();
            self.router
                .route(&mut routes, subject, payload, retained, &self.accept)
        };
        if let Some(b) = blocked {
            self.wait_for_room(b).await;
        }
    }

    /// [`Feed::deliver`] for a batch of (subject, payload) messages in order (none retained),
    /// taking the route table's lock once for the run of messages that find room.
    pub(crate) async fn deliver_all<'m>(
        &self,
        msgs: impl IntoIterator<Item = (&'m str, &'m Bytes)>,
    ) {
        let mut msgs = msgs.into_iter();
        loop {
            let blocked = {
                let mut routes = self.router.routes();
                msgs.by_ref().find_map(|(subject, payload)| {
                    self.router
                        .route(&mut routes, subject, payload, false, &self.accept)
                })
            };
            match blocked {
                Some(b) => self.wait_for_room(b).await,
                None => return,
            }
        }
    }

    /// Waits up to [`STALL`] for room in a full route's queue.
    ///
    /// It waits for an eighth of the queue to be free, not for one slot: a reader that is
    /// busy with a full queue would otherwise wake this loop (another thread, often) for
    /// every record it takes, and the loop put one record back each time. If the reader
    /// took less than that within [`STALL`], whatever room it made is used; only a reader
    /// that took nothing loses the message.
    async fn wait_for_room(&self, b: Blocked) {
        let (c, carrier) = (&self.router.counters, self.router.scheme.name);
        let room = (b.tx.max_capacity() / 8).max(1);
        let payload = match tokio::time::timeout(STALL, b.tx.reserve_many(room)).await {
            Ok(Ok(mut permits)) => match permits.next() {
                Some(permit) => {
                    permit.send(b.payload);
                    return;
                }
                None => b.payload,
            },
            Ok(Err(_)) => {
                bump(&c.unrouted);
                debug!(carrier, "peer route closed while waiting: message dropped");
                return;
            }
            Err(_) => b.payload,
        };
        match b.tx.try_send(payload) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                b.stalled.store(true, Ordering::Relaxed);
                bump(&c.busy);
                debug!(carrier, "peer queue full for {STALL:?}: message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                bump(&c.unrouted);
                debug!(carrier, "peer route closed while waiting: message dropped");
            }
        }
    }

    /// Counts one (re)connection acknowledged by the broker (MQTT ConnAck).
    pub(crate) fn connected(&self) {
        bump(&self.router.connections);
    }

    /// Classifies one message of the JetStream consumer; mail is counted and checked like
    /// the inbox subscription's messages.
    pub(crate) fn consumed(&self, subject: &str, payload: &[u8]) -> Consumed {
        if !is_mail(payload) {
            return Consumed::Ignore;
        }
        match self.router.check(subject, payload) {
            Some(from) => Consumed::Mail(from.to_string()),
            None => Consumed::Ignore,
        }
    }

    /// Waits until `take_mail` was called; `false` if the link is gone.
    pub(crate) async fn mail_taken(&self) -> bool {
        let mut rx = self.router.mail_taken.subscribe();
        let taken = rx.wait_for(|t| *t).await.is_ok();
        taken
    }

    /// Queues one mail, waiting while the queue is full; gives it back if its receiver is gone.
    pub(crate) async fn send_mail(&self, mail: Mail) -> Result<(), Mail> {
        self.router.mail.send(mail).await.map_err(|e| e.0)
    }
}

/// The broker-independent state of one device's broker link.
pub(crate) struct Hub {
    router: Arc<Router>,
    publisher: Arc<Publisher>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    mail_rx: Mutex<Option<mpsc::Receiver<Mail>>>,
    /// The JetStream context mail is published through, if the link has one.
    jetstream: Option<async_nats::jetstream::Context>,
    /// Responders answering retransmitted Confirm2 messages for a while
    /// ([`Hub::accept_handshake`]); dropped with the hub.
    lingering: Mutex<JoinSet<()>>,
    /// [`LinkOptions::coalesce_records`].
    coalesce: bool,
}

impl Hub {
    /// A hub for device `id` (checked by [`check_config`]) with the bounds and options of
    /// `options`, that publishes through `publisher` (mail through `jetstream` if given),
    /// and the feed for its inbox.
    pub(crate) fn new(
        scheme: &'static Scheme,
        id: &str,
        options: &LinkOptions,
        publisher: Publisher,
        mail_source: MailSource,
        jetstream: Option<async_nats::jetstream::Context>,
    ) -> (Hub, Feed) {
        let (mail, mail_rx) = mpsc::channel(MAIL_QUEUE);
        let router = Arc::new(Router {
            id: id.to_string(),
            scheme,
            inbox_prefix: scheme.inbox_prefix(id),
            max_payload: options.max_payload,
            max_peers: options.max_peers,
            routes: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            mail_source,
            mail,
            mail_taken: watch::Sender::new(false),
            connections: AtomicU64::new(0),
        });
        let (accept, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
        let feed = Feed {
            router: router.clone(),
            accept,
        };
        let hub = Hub {
            router,
            publisher: Arc::new(publisher),
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            mail_rx: Mutex::new(Some(mail_rx)),
            jetstream,
            lingering: Mutex::new(JoinSet::new()),
            coalesce: options.coalesce_records,
        };
        (hub, feed)
    }

    /// Publishes one mail to `to`'s inbox; `true` if the broker confirmed it stored it.
    pub(crate) async fn publish(&self, to: &str, payload: &[u8]) -> Result<bool, Error> {
        check_id(to)?;
        if !is_mail(payload) {
            return Err(Error::InvalidInput(
                "publish carries durable payloads (0x44) and relay frames (0x52) only",
            ));
        }
        if payload.len() > self.router.max_payload {
            return Err(Error::InvalidInput(
                "the payload is larger than the link's max_payload",
            ));
        }
        let subject = self.router.scheme.subject(to, &self.router.id);
        if let Some(js) = &self.jetstream {
            return crate::nats::publish_stored(js, subject, payload)
                .await
                .map(|()| true);
        }
        match &*self.publisher {
            Publisher::Mqtt(c) => crate::mqtt::publish(c, &subject, payload.to_vec()).await?,
            Publisher::Nats(c) => crate::nats::publish(c, &subject, payload).await?,
        }
        Ok(false)
    }

    /// The initiator's handshake with `peer_id`, without a channel.
    pub(crate) async fn handshake_peer(
        &self,
        device: &Device,
        peer_id: &str,
    ) -> Result<Box<SessionOutcome>, Error> {
        check_id(peer_id)?;
        if peer_id == self.router.id {
            return Err(Error::InvalidInput("a broker device cannot call itself"));
        }
        let deadline = Instant::now() + device.settings().handshake_timeout;
        let (qtx, qrx) = mpsc::channel(PEER_QUEUE);
        let (route, established) = Route::new(qtx.clone(), None);
        self.router.routes().insert(peer_id.to_string(), route);
        let mut link = self.hs_link(peer_id, qrx);
        let done = handshake(
            device,
            Side::Initiator(peer_id),
            &mut HsLink::Udp(&mut link),
            deadline,
        )
        .await;
        match done {
            Ok(done) => {
                established.store(true, Ordering::Release);
                // The initiator completes last (on the Conf2ACK): nothing more to answer, but
                // the route absorbs late duplicates of the peer's Hello for a while, which
                // would otherwise look like a new incoming handshake.
                self.linger(peer_id, link, None);
                Ok(done.outcome)
            }
            Err(e) => {
                drop(link);
                self.router.remove_route(peer_id, Some(&qtx));
                Err(e)
            }
        }
    }

    /// Keeps a completed handshake's route (and the responder's endpoint) for [`LINGER`].
    fn linger(&self, peer: &str, link: HsUdp, endpoint: Option<Box<Endpoint>>) {
        let mut tasks = self.lingering.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(linger(
            self.router.clone(),
            peer.to_string(),
            link,
            endpoint,
        ));
    }

    /// The next incoming handshake as responder, without a channel (failed ones are logged
    /// and skipped). The completed endpoint lingers in the background for [`LINGER`] (or
    /// until the peer's route is replaced) to answer a retransmitted Confirm2.
    pub(crate) async fn accept_handshake(
        &self,
        device: &Device,
    ) -> Result<(String, Box<SessionOutcome>), Error> {
        let mut pending = self.accept_rx.lock().await;
        loop {
            let Pending {
                from,
                queue,
                established,
            } = pending.recv().await.ok_or(Error::Shutdown)?;
            let deadline = Instant::now() + device.settings().handshake_timeout;
            let mut link = self.hs_link(&from, queue);
            match handshake(
                device,
                Side::Responder,
                &mut HsLink::Udp(&mut link),
                deadline,
            )
            .await
            {
                Ok(done) => {
                    established.store(true, Ordering::Release);
                    self.linger(&from, link, Some(Box::new(done.endpoint)));
                    return Ok((from, done.outcome));
                }
                Err(e) => {
                    drop(link);
                    self.router.remove_route(&from, None);
                    log_failure(self.router.scheme.incoming, None, &e);
                }
            }
        }
    }

    /// The mail receiver, the first time.
    pub(crate) fn take_mail(&self) -> Option<mpsc::Receiver<Mail>> {
        let rx = self
            .mail_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        self.router.mail_taken.send_replace(true);
        Some(rx)
    }

    /// Successful (re)connections to the broker.
    pub(crate) fn connections(&self) -> u64 {
        match &*self.publisher {
            Publisher::Mqtt(_) => self.router.connections.load(Ordering::Relaxed),
            Publisher::Nats(c) => c.statistics().connects.load(Ordering::Relaxed),
        }
    }

    /// This device's id.
    pub(crate) fn device_id(&self) -> &str {
        &self.router.id
    }

    /// The incoming-message counters.
    pub(crate) fn stats(&self) -> LinkStats {
        let c = &self.router.counters;
        LinkStats {
            received: c.received.load(Ordering::Relaxed),
            dropped_oversized: c.oversized.load(Ordering::Relaxed),
            dropped_malformed: c.malformed.load(Ordering::Relaxed),
            dropped_unrouted: c.unrouted.load(Ordering::Relaxed),
            dropped_busy: c.busy.load(Ordering::Relaxed),
        }
    }

    /// The handshake as initiator with device `peer_id`; replaces any route to it.
    pub(crate) async fn connect_peer<T>(
        &self,
        device: &Device,
        peer_id: &str,
        opts: &Options,
    ) -> Result<Channel<T>, Error> {
        check_id(peer_id)?;
        if peer_id == self.router.id {
            return Err(Error::InvalidInput("a broker device cannot call itself"));
        }
        let deadline = Instant::now() + device.settings().handshake_timeout;
        let (qtx, qrx) = mpsc::channel(PEER_QUEUE);
        let (route, established) = Route::new(qtx, None);
        self.router.routes().insert(peer_id.to_string(), route);
        let mut link = self.hs_link(peer_id, qrx);
        let done = handshake(
            device,
            Side::Initiator(peer_id),
            &mut HsLink::Udp(&mut link),
            deadline,
        )
        .await?;
        established.store(true, Ordering::Release);
        channel_from(
            device,
            done,
            link,
            false,
            Some(peer_id.to_string()),
            opts,
            Attach {
                coalesce: self.coalesce,
                ..Attach::default()
            },
        )
    }

    /// The next incoming handshake as responder (failed ones are logged and skipped).
    pub(crate) async fn accept<T>(
        &self,
        device: &Device,
        opts: &Options,
    ) -> Result<(String, Channel<T>), Error> {
        let mut pending = self.accept_rx.lock().await;
        loop {
            let Pending {
                from,
                queue,
                established,
            } = pending.recv().await.ok_or(Error::Shutdown)?;
            let deadline = Instant::now() + device.settings().handshake_timeout;
            let mut link = self.hs_link(&from, queue);
            let done = handshake(
                device,
                Side::Responder,
                &mut HsLink::Udp(&mut link),
                deadline,
            )
            .await
            .and_then(|done| {
                let attach = Attach {
                    coalesce: self.coalesce,
                    ..Attach::default()
                };
                channel_from(device, done, link, true, None, opts, attach)
            });
            match done {
                Ok(ch) => {
                    established.store(true, Ordering::Release);
                    return Ok((from, ch));
                }
                Err(e) => log_failure(self.router.scheme.incoming, None, &e),
            }
        }
    }

    fn hs_link(&self, peer_id: &str, queue: mpsc::Receiver<Bytes>) -> HsUdp {
        HsUdp::new_bare(
            UdpTx::Broker(BrokerTx::new(
                self.publisher.clone(),
                self.router.scheme.subject(peer_id, &self.router.id),
            )),
            Source::Queue(queue),
        )
    }
}

/// Keeps a completed handshake's route for [`LINGER`], so late duplicates of the peer's
/// handshake messages end here, and with a responder's endpoint answers retransmitted
/// Confirm2 messages (the initiator completes only on our Conf2ACK, which may have been
/// lost); then drops the route. Ends early when the route is replaced (its queue closes).
async fn linger(router: Arc<Router>, from: String, mut link: HsUdp, mut ep: Option<Box<Endpoint>>) {
    let clock = Clock::start();
    let until = Instant::now() + LINGER;
    loop {
        let m = tokio::select! {
            m = link.recv_message() => m,
            _ = tokio::time::sleep_until(until) => break,
        };
        let Ok(m) = m else { break };
        // Only a retransmitted Confirm2 needs an answer (Conf2ACK); anything else could only
        // make the completed endpoint queue an Error for the peer.
        let Some(ep) = ep.as_mut() else { continue };
        if !matches!(Message::parse(&m), Ok(Message::Confirm2(_))) {
            continue;
        }
        if ep
            .handle_message(&m, clock.now_ms(), &mut rand_core::OsRng)
            .is_err()
        {
            break;
        }
        let msgs: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit()).collect();
        if link.send_messages(&msgs).await.is_err() {
            break;
        }
        debug!(
            carrier = router.scheme.name,
            from, "answered a retransmitted Confirm2"
        );
    }
    drop(link);
    router.remove_route(&from, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(valid_device_id("a"));
        assert!(valid_device_id("sensor-01_B"));
        assert!(valid_device_id(&"x".repeat(64)));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id(&"x".repeat(65)));
        for bad in ["a/b", "a+", "#", "a b", "é", "a.b", "a*", "a>"] {
            assert!(!valid_device_id(bad), "{bad}");
        }
    }

    #[test]
    fn subjects() {
        assert_eq!(MQTT.subject("p", "d"), "keav/v1/p/from/d");
        assert_eq!(MQTT.inbox_filter("d"), "keav/v1/d/from/#");
        assert_eq!(NATS.subject("p", "d"), "keav.v1.p.from.d");
        assert_eq!(NATS.inbox_filter("d"), "keav.v1.d.from.>");
    }

    /// A hub with no broker behind it (the client is never polled) and a route to `peer`
    /// whose queue holds two messages.
    fn hub_with_route(peer: &str) -> (Hub, Feed, mpsc::Receiver<Bytes>) {
        hub_with_queue(peer, 2)
    }

    fn hub_with_queue(peer: &str, capacity: usize) -> (Hub, Feed, mpsc::Receiver<Bytes>) {
        let (client, _eventloop) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 9), 4);
        let (hub, feed) = Hub::new(
            &MQTT,
            "me",
            &LinkOptions {
                max_payload: 1024,
                max_peers: 4,
                ..LinkOptions::default()
            },
            Publisher::Mqtt(client),
            MailSource::Inbox,
            None,
        );
        let (qtx, qrx) = mpsc::channel(capacity);
        let (route, established) = Route::new(qtx, None);
        established.store(true, Ordering::Release);
        hub.router.routes().insert(peer.to_string(), route);
        (hub, feed, qrx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_route_waits_for_its_reader_and_a_stalled_one_drops() {
        let (hub, feed, mut q) = hub_with_route("peer");
        let topic = MQTT.subject("me", "peer");
        let rec = |i: u8| Bytes::from(vec![RECORD_DATA, i]);
        feed.deliver(&topic, &rec(0), false).await;
        feed.deliver(&topic, &rec(1), false).await;
        // The queue is full: the third waits until the reader takes one, then goes in.
        let (t0, r2) = (Instant::now(), rec(2));
        let (_, first) = tokio::join!(feed.deliver(&topic, &r2, false), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            q.recv().await
        });
        assert_eq!(first, Some(rec(0)));
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert_eq!(hub.stats().dropped_busy, 0);
        // Nobody reads: after STALL the message is dropped and counted, and the route is
        // stalled: the next one is dropped at once.
        let t0 = Instant::now();
        feed.deliver(&topic, &rec(3), false).await;
        assert!((STALL..STALL + Duration::from_millis(10)).contains(&t0.elapsed()));
        assert_eq!(hub.stats().dropped_busy, 1);
        let t0 = Instant::now();
        feed.deliver(&topic, &rec(4), false).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(hub.stats().dropped_busy, 2);
        // Once the reader takes something, the route takes messages (and waits) again.
        assert_eq!(q.recv().await, Some(rec(1)));
        feed.deliver(&topic, &rec(5), false).await;
        assert_eq!(hub.stats().dropped_busy, 2);
        let r6 = rec(6);
        let (_, next) = tokio::join!(feed.deliver(&topic, &r6, false), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            q.recv().await
        });
        assert_eq!(next, Some(rec(2)));
        let got: Vec<_> = [q.recv().await, q.recv().await].into();
        assert_eq!(got, [Some(rec(5)), Some(rec(6))]);
        assert_eq!(hub.stats().dropped_busy, 2);
        // A route whose reader is gone while a message waits: counted as unrouted.
        feed.deliver(&topic, &rec(7), false).await;
        feed.deliver(&topic, &rec(8), false).await;
        let r9 = rec(9);
        let (_, ()) = tokio::join!(feed.deliver(&topic, &r9, false), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(q);
        });
        assert_eq!(hub.stats().dropped_unrouted, 1);
        assert_eq!(hub.stats().dropped_busy, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_route_wakes_the_link_for_an_eighth_of_its_queue_or_what_its_reader_freed() {
        // A queue of 16: the waiting message goes in once 2 slots are free.
        let (hub, feed, mut q) = hub_with_queue("peer", 16);
        let topic = MQTT.subject("me", "peer");
        let rec = |i: u8| Bytes::from(vec![RECORD_DATA, i]);
        for i in 0..16 {
            feed.deliver(&topic, &rec(i), false).await;
        }
        let (t0, r16) = (Instant::now(), rec(16));
        let (_, took) = tokio::join!(feed.deliver(&topic, &r16, false), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let a = q.recv().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            (a, q.recv().await)
        });
        assert_eq!(took, (Some(rec(0)), Some(rec(1))));
        assert_eq!(t0.elapsed(), Duration::from_millis(20));
        // A reader that frees one slot only, and then takes nothing: the message still goes
        // in (after STALL), nothing is dropped and the route is not stalled.
        feed.deliver(&topic, &rec(17), false).await;
        let (t0, r18) = (Instant::now(), rec(18));
        let (_, took) = tokio::join!(feed.deliver(&topic, &r18, false), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            q.recv().await
        });
        assert_eq!(took, Some(rec(2)));
        assert_eq!(t0.elapsed(), STALL);
        assert_eq!(hub.stats().dropped_busy, 0);
        let mut rest = Vec::new();
        while let Ok(r) = q.try_recv() {
            rest.push(r);
        }
        let want: Vec<_> = (3..=18).map(rec).collect();
        assert_eq!(rest, want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_routed_in_order_and_waits_for_room_midway() {
        let (hub, feed, mut q) = hub_with_route("peer");
        let topic = MQTT.subject("me", "peer");
        let stranger = MQTT.subject("me", "stranger");
        let rec = |i: u8| Bytes::from(vec![RECORD_DATA, i]);
        // Five records for the route (whose queue holds two) and, in the middle, one from a
        // sender with no route: the batch waits for the reader twice and loses nothing.
        let batch = [
            (topic.as_str(), rec(0)),
            (topic.as_str(), rec(1)),
            (stranger.as_str(), rec(9)),
            (topic.as_str(), rec(2)),
            (topic.as_str(), rec(3)),
            (topic.as_str(), rec(4)),
        ];
        let deliver = feed.deliver_all(batch.iter().map(|(t, p)| (*t, p)));
        let read = async {
            let mut got = Vec::new();
            while got.len() < 5 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                got.push(q.recv().await);
            }
            got
        };
        let ((), got) = tokio::join!(deliver, read);
        let want: Vec<_> = (0..5).map(|i| Some(rec(i))).collect();
        assert_eq!(got, want);
        let stats = hub.stats();
        assert_eq!(stats.received, 6);
        assert_eq!(stats.dropped_unrouted, 1);
        assert_eq!(stats.dropped_busy, 0);
        // A route that stalled drops the rest of a batch at once and counts each message.
        let r5 = [(topic.as_str(), rec(5)), (topic.as_str(), rec(6))];
        feed.deliver_all(r5.iter().map(|(t, p)| (*t, p))).await;
        let t0 = Instant::now();
        let r7 = [(topic.as_str(), rec(7)), (topic.as_str(), rec(8))];
        feed.deliver_all(r7.iter().map(|(t, p)| (*t, p))).await;
        assert!(t0.elapsed() >= STALL);
        assert_eq!(hub.stats().dropped_busy, 2);
    }

    #[test]
    fn addresses() {
        assert_eq!(host_port("127.0.0.1:4222").ok(), Some(("127.0.0.1", 4222)));
        assert_eq!(host_port("[::1]:1883").ok(), Some(("::1", 1883)));
        for bad in ["no-port", ":1883", "h:", "h:70000"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }
}
