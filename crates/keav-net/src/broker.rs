//! What the broker carriers ([`crate::mqtt`], [`crate::nats`]) share: device ids, the
//! subject scheme, payload classification and bounds, the routing table of peers and pending
//! incoming handshakes, the counters, and the handshakes run over a broker.
//!
//! A carrier only connects, subscribes to the device's inbox, feeds every incoming message to
//! [`Feed::deliver`] and publishes through [`Publisher`]; everything else is here, so both
//! carriers behave alike (the carrier docs describe that behaviour).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use crate::device::Device;
use crate::session::{handshake, log_failure, Attach, Channel, HsLink, Options, Side};
use crate::udp::{channel_from, HsUdp, Source, UdpTx, BARE_MESSAGE, RECORD_CLOSE, RECORD_DATA};
use crate::Error;
use keav_proto::msg::Message;

/// Datagrams queued per peer route.
const PEER_QUEUE: usize = 256;
/// Incoming handshakes waiting for `accept`.
const ACCEPT_QUEUE: usize = 16;

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
    /// 16 KiB plus overhead).
    pub max_payload: usize,
    /// Peers routed at once (handshaking or with a live channel; default 1024).
    pub max_peers: usize,
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
    /// Dropped: a route's queue, the accept queue or the peer table was full.
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
}

impl core::fmt::Debug for BrokerTx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BrokerTx")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl BrokerTx {
    /// Publishes `d`; waits while the client's queue is full.
    pub(crate) async fn send(&self, d: &[u8]) -> Result<(), Error> {
        match &*self.publisher {
            Publisher::Mqtt(c) => crate::mqtt::publish(c, &self.subject, d).await,
            Publisher::Nats(c) => crate::nats::publish(c, &self.subject, d).await,
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
        /// says the broker received it).
        pub async fn publish(&self, to: &str, payload: &[u8]) -> Result<bool, $crate::Error> {
            self.hub.publish(to, payload).await
        }

        /// The stream of incoming durable payloads (first byte 0x44) and relay frames (0x52),
        /// the traffic of [`crate::messenger`] and [`crate::relay`]. Only the first call gets
        /// it (`None` afterwards); before it is taken such payloads are counted as unrouted.
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
    _private: (),
}

impl MailAck {
    /// Tells the server the message is committed (it will not redeliver it).
    pub async fn ack(self) -> Result<(), Error> {
        todo!()
    }
}

/// A Hello from a new sender, with the queue of its further messages.
struct Pending {
    from: String,
    queue: mpsc::Receiver<Vec<u8>>,
    established: Arc<AtomicBool>,
}

/// Where one peer's messages go.
struct Route {
    tx: mpsc::Sender<Vec<u8>>,
    /// Set once this route's handshake completed.
    established: Arc<AtomicBool>,
    /// The peer's Hello message in this route's session.
    hello: Option<Vec<u8>>,
}

impl Route {
    fn new(tx: mpsc::Sender<Vec<u8>>, hello: Option<Vec<u8>>) -> (Route, Arc<AtomicBool>) {
        let established = Arc::new(AtomicBool::new(false));
        let r = Route {
            tx,
            established: established.clone(),
            hello,
        };
        (r, established)
    }
}

/// `payload` if it is a well-formed Hello message.
fn hello_message(payload: &[u8]) -> Option<Vec<u8>> {
    matches!(Message::parse(payload), Ok(Message::Hello(_))).then(|| payload.to_vec())
}

struct Router {
    id: String,
    scheme: &'static Scheme,
    inbox_prefix: String,
    max_payload: usize,
    max_peers: usize,
    routes: Mutex<HashMap<String, Route>>,
    counters: Counters,
}

impl Router {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        // A poisoned map is still a consistent map of senders.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes one incoming message.
    fn route(&self, topic: &str, payload: &[u8], retained: bool, accept: &mpsc::Sender<Pending>) {
        let (c, carrier) = (&self.counters, self.scheme.name);
        bump(&c.received);
        let from = match topic.strip_prefix(self.inbox_prefix.as_str()) {
            Some(s) if valid_device_id(s) => s,
            _ => {
                bump(&c.malformed);
                debug!(
                    carrier,
                    len = topic.len(),
                    "message on a malformed topic dropped"
                );
                return;
            }
        };
        if payload.len() > self.max_payload {
            bump(&c.oversized);
            debug!(
                carrier,
                from,
                len = payload.len(),
                "oversized payload dropped"
            );
            return;
        }
        if retained
            || !matches!(
                payload.first(),
                Some(&(BARE_MESSAGE | RECORD_DATA | RECORD_CLOSE))
            )
        {
            bump(&c.malformed);
            debug!(carrier, from, retained, "unclassifiable payload dropped");
            return;
        }
        let hello = match payload.first() {
            Some(&BARE_MESSAGE) => hello_message(payload),
            _ => None,
        };
        let mut routes = self.routes();
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
                match r.tx.try_send(payload.to_vec()) {
                    Ok(()) => return,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        bump(&c.busy);
                        debug!(carrier, from, "peer queue full: message dropped");
                        return;
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
            return;
        };
        if routes.len() >= self.max_peers {
            routes.retain(|_, r| !r.tx.is_closed());
            if routes.len() >= self.max_peers {
                bump(&c.busy);
                debug!(carrier, from, "peer table full: Hello dropped");
                return;
            }
        }
        let (qtx, qrx) = mpsc::channel(PEER_QUEUE);
        let _ = qtx.try_send(payload.to_vec());
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
            return;
        }
        routes.insert(from.to_string(), route);
    }
}

/// The inbound side of a broker link: the carrier's receive loop hands every message of the
/// inbox subscription to [`Feed::deliver`].
pub(crate) struct Feed {
    router: Arc<Router>,
    accept: mpsc::Sender<Pending>,
}

impl Feed {
    /// Counts, checks and routes one incoming message (`retained`: an MQTT retained message).
    pub(crate) fn deliver(&self, subject: &str, payload: &[u8], retained: bool) {
        self.router.route(subject, payload, retained, &self.accept);
    }
}

/// The broker-independent state of one device's broker link.
pub(crate) struct Hub {
    router: Arc<Router>,
    publisher: Arc<Publisher>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
}

impl Hub {
    /// A hub for device `id` (checked by [`check_config`]) that publishes through
    /// `publisher`, and the feed for its inbox.
    pub(crate) fn new(
        scheme: &'static Scheme,
        id: &str,
        max_payload: usize,
        max_peers: usize,
        publisher: Publisher,
    ) -> (Hub, Feed) {
        let router = Arc::new(Router {
            id: id.to_string(),
            scheme,
            inbox_prefix: scheme.inbox_prefix(id),
            max_payload,
            max_peers,
            routes: Mutex::new(HashMap::new()),
            counters: Counters::default(),
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
        };
        (hub, feed)
    }

    pub(crate) async fn publish(&self, _to: &str, _payload: &[u8]) -> Result<bool, Error> {
        todo!()
    }

    pub(crate) async fn handshake_peer(
        &self,
        _device: &Device,
        _peer_id: &str,
    ) -> Result<Box<keav_proto::handshake::SessionOutcome>, Error> {
        todo!()
    }

    pub(crate) async fn accept_handshake(
        &self,
        _device: &Device,
    ) -> Result<(String, Box<keav_proto::handshake::SessionOutcome>), Error> {
        todo!()
    }

    pub(crate) fn take_mail(&self) -> Option<mpsc::Receiver<Mail>> {
        todo!()
    }

    pub(crate) fn connections(&self) -> u64 {
        todo!()
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
            Attach::default(),
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
            .and_then(|done| channel_from(device, done, link, true, None, opts, Attach::default()));
            match done {
                Ok(ch) => {
                    established.store(true, Ordering::Release);
                    return Ok((from, ch));
                }
                Err(e) => log_failure(self.router.scheme.incoming, None, &e),
            }
        }
    }

    fn hs_link(&self, peer_id: &str, queue: mpsc::Receiver<Vec<u8>>) -> HsUdp {
        HsUdp::new_bare(
            UdpTx::Broker(BrokerTx {
                publisher: self.publisher.clone(),
                subject: self.router.scheme.subject(peer_id, &self.router.id),
            }),
            Source::Queue(queue),
        )
    }
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

    #[test]
    fn addresses() {
        assert_eq!(host_port("127.0.0.1:4222").ok(), Some(("127.0.0.1", 4222)));
        assert_eq!(host_port("[::1]:1883").ok(), Some(("::1", 1883)));
        for bad in ["no-port", ":1883", "h:", "h:70000"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }
}
