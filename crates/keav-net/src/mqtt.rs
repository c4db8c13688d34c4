//! KEAV over an MQTT broker: handshakes and records carried end to end as MQTT messages, so
//! the broker (and anyone who can read its topics) sees only RFC 6189 handshake packets and
//! AEAD records.
//!
//! # Topic scheme
//!
//! A device id is 1 to 64 characters of `[A-Za-z0-9_-]` (checked). Device `D`
//!
//! - receives on its inbox: it subscribes to `keav/v1/D/from/#` and accepts only topics
//!   `keav/v1/D/from/S` where `S` is a valid device id (the sender);
//! - sends to peer `P` on `keav/v1/P/from/D`.
//!
//! So a broker can confine each device to reading its own inbox and to publishing under its
//! own name; with Mosquitto, and the MQTT user name equal to the device id:
//!
//! ```text
//! pattern read  keav/v1/%u/from/#
//! pattern write keav/v1/+/from/%u
//! ```
//!
//! Without such ACLs the sender name in a topic is only a routing hint: the KEAV handshake
//! authenticates the peer (its ZID, retained secrets, equality test), never the topic.
//!
//! # Payloads
//!
//! One MQTT message (QoS 1, never retained) carries one datagram, classified by its first byte
//! as on UDP ([`crate::udp`]), except that handshake messages travel bare, as on every
//! stream or broker transport: `0x50` an RFC 6189 message (its preamble `0x505a`; no UDP
//! packet header or CRC, MQTT and TCP frame and check it), `0x17` a data record, `0x15` a close record. Messages larger than
//! [`LinkOptions::max_payload`], empty, unclassifiable, retained, or on a malformed topic are
//! dropped, logged (at debug level, without content) and counted in [`LinkStats`].
//!
//! # Channels
//!
//! Channels are datagram channels, as on UDP: the handshake retransmits on the core's timers
//! (a broker may lose messages across a reconnect), and records that fail to open — forged,
//! replayed, or QoS 1 duplicates — are dropped and counted
//! ([`Channel::dropped_records`](crate::session::Channel::dropped_records)), never delivered.
//!
//! [`Link`] is one MQTT connection of one device. Its event loop (a tokio task) routes each
//! incoming message by its sender: to the channel or handshake with that peer, or — a Hello
//! from a sender with no route — to [`Link::accept`]. Handshake messages from a sender other
//! than the expected peer therefore never reach a handshake. One route per peer: a new
//! [`Link::connect_peer`] to a peer replaces the previous route to it, and so does a Hello
//! from a peer whose channel is established when that Hello differs from the one that
//! started the channel's session (the peer started over, e.g. after a restart); a retransmitted
//! or duplicated Hello of the current session changes nothing. The replaced channel's
//! receiver ends with [`Error::Shutdown`]. Without broker ACLs, anyone who can publish under a
//! peer's name can thus cut that peer's channel off (never read or inject data).
//!
//! Reconnection: rumqttc reconnects when polled after an error; the event loop polls again
//! after a backoff (100 ms doubling to 30 s), then subscribes again. The first connection
//! must succeed within [`LinkOptions::connect_timeout`] or [`Link::connect`] fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::device::Device;
use crate::session::{handshake, log_failure, Attach, Channel, HsLink, Options, Side};
use keav_proto::msg::Message;

use crate::udp::{channel_from, HsUdp, Source, UdpTx, BARE_MESSAGE, RECORD_CLOSE, RECORD_DATA};
use crate::Error;

/// The topic prefix of this scheme's version.
const PREFIX: &str = "keav/v1";
/// Datagrams queued per peer route.
const PEER_QUEUE: usize = 256;
/// Incoming handshakes waiting for [`Link::accept`].
const ACCEPT_QUEUE: usize = 16;

/// Options of one MQTT [`Link`].
#[derive(Clone)]
pub struct LinkOptions {
    /// The MQTT client id (default: the device id). Two connections with the same client id
    /// push each other off the broker.
    pub client_id: Option<String>,
    /// MQTT user name and password, if the broker wants them (never logged).
    pub credentials: Option<(String, String)>,
    /// MQTT keep-alive (default 30 s).
    pub keep_alive: Duration,
    /// How long [`Link::connect`] waits for the broker to accept the connection and the
    /// subscription (default 5 s).
    pub connect_timeout: Duration,
    /// Larger incoming payloads are dropped and counted (default 64 KiB; a record is at most
    /// 16 KiB plus overhead). Payloads beyond four times this bound exceed the MQTT client's
    /// packet limit: rumqttc drops the connection and the event loop reconnects.
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

/// Counters of a [`Link`]'s incoming messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Messages received on the inbox (dropped ones included).
    pub received: u64,
    /// Dropped: larger than [`LinkOptions::max_payload`].
    pub dropped_oversized: u64,
    /// Dropped: empty, unclassifiable first byte, retained, or a malformed topic.
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
            "an MQTT device id is 1 to 64 characters of [A-Za-z0-9_-]",
        ))
    }
}

/// The topic on which `from` sends to `to`.
pub fn topic(to: &str, from: &str) -> String {
    format!("{PREFIX}/{to}/from/{from}")
}

fn mqtt_error(what: &str, e: impl core::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("MQTT {what}: {e}")))
}

/// Sends datagrams to one peer's inbox.
#[derive(Clone)]
pub(crate) struct MqttTx {
    client: AsyncClient,
    topic: String,
}

impl core::fmt::Debug for MqttTx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MqttTx")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl MqttTx {
    /// Queues `d` for publication (QoS 1). Waits while the client's request queue is full.
    pub(crate) async fn send(&self, d: &[u8]) -> Result<(), Error> {
        self.client
            .publish(self.topic.as_str(), QoS::AtLeastOnce, false, d.to_vec())
            .await
            .map_err(|e| mqtt_error("publish", e))
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
    /// The peer's Hello message (without the packet header) in this route's session.
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

struct Shared {
    id: String,
    inbox_prefix: String,
    max_payload: usize,
    max_peers: usize,
    routes: Mutex<HashMap<String, Route>>,
    counters: Counters,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        // A poisoned map is still a consistent map of senders.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes one incoming message.
    fn route(&self, topic: &str, payload: &[u8], retained: bool, accept: &mpsc::Sender<Pending>) {
        let c = &self.counters;
        bump(&c.received);
        let from = match topic.strip_prefix(self.inbox_prefix.as_str()) {
            Some(s) if valid_device_id(s) => s,
            _ => {
                bump(&c.malformed);
                debug!(
                    len = topic.len(),
                    "MQTT message on a malformed topic dropped"
                );
                return;
            }
        };
        if payload.len() > self.max_payload {
            bump(&c.oversized);
            debug!(from, len = payload.len(), "oversized MQTT payload dropped");
            return;
        }
        if retained
            || !matches!(
                payload.first(),
                Some(&(BARE_MESSAGE | RECORD_DATA | RECORD_CLOSE))
            )
        {
            bump(&c.malformed);
            debug!(from, retained, "unclassifiable MQTT payload dropped");
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
                debug!(from, "a new Hello from an established peer: new session");
                routes.remove(from);
            } else {
                match r.tx.try_send(payload.to_vec()) {
                    Ok(()) => return,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        bump(&c.busy);
                        debug!(from, "peer queue full: MQTT message dropped");
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
                from,
                "MQTT message from a sender with no route is not a Hello: dropped"
            );
            return;
        };
        if routes.len() >= self.max_peers {
            routes.retain(|_, r| !r.tx.is_closed());
            if routes.len() >= self.max_peers {
                bump(&c.busy);
                debug!(from, "peer table full: Hello dropped");
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
                from,
                "accept queue full: Hello dropped (the peer retransmits)"
            );
            return;
        }
        routes.insert(from.to_string(), route);
    }
}

/// One device's connection to an MQTT broker, carrying KEAV channels to peers addressed by
/// device id. Dropping it stops the event loop (its channels stop receiving).
pub struct Link {
    shared: Arc<Shared>,
    client: AsyncClient,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    task: JoinHandle<()>,
}

impl core::fmt::Debug for Link {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("mqtt::Link")
            .field("device_id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

impl Link {
    /// Connects to the broker at `broker` (`host:port`, plain TCP) as device `device_id`,
    /// subscribes to its inbox and starts the event loop. Fails if the broker does not accept
    /// the connection and the subscription within [`LinkOptions::connect_timeout`].
    pub async fn connect(
        broker: &str,
        device_id: &str,
        options: LinkOptions,
    ) -> Result<Link, Error> {
        check_id(device_id)?;
        if options.max_payload == 0 || options.max_peers == 0 {
            return Err(Error::InvalidInput(
                "max_payload and max_peers must be positive",
            ));
        }
        let (host, port) = broker
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((
                    h.trim_matches(|c| c == '[' || c == ']'),
                    p.parse::<u16>().ok()?,
                ))
            })
            .filter(|(h, _)| !h.is_empty())
            .ok_or(Error::InvalidInput("the MQTT broker address is host:port"))?;
        let client_id = options
            .client_id
            .clone()
            .unwrap_or_else(|| device_id.to_string());
        let mut mo = MqttOptions::new(client_id, host, port);
        mo.set_keep_alive(options.keep_alive.max(Duration::from_secs(5)));
        // Room for a topic and the MQTT header around the largest payload we take; a bit
        // more on the way in so moderately oversized payloads are counted, not fatal.
        let slack = 1024;
        mo.set_max_packet_size(
            options.max_payload.saturating_mul(4).saturating_add(slack),
            options.max_payload.saturating_add(slack),
        );
        mo.set_clean_session(true);
        if let Some((u, p)) = &options.credentials {
            mo.set_credentials(u.clone(), p.clone());
        }
        let (client, eventloop) = AsyncClient::new(mo, 64);
        let shared = Arc::new(Shared {
            id: device_id.to_string(),
            inbox_prefix: format!("{PREFIX}/{device_id}/from/"),
            max_payload: options.max_payload,
            max_peers: options.max_peers,
            routes: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(event_loop(
            eventloop,
            client.clone(),
            shared.clone(),
            accept_tx,
            ready_tx,
        ));
        let link = Link {
            shared,
            client,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            task,
        };
        match tokio::time::timeout(options.connect_timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => {
                info!(device_id, broker, "connected to the MQTT broker");
                Ok(link)
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(mqtt_error("event loop", "stopped")),
            Err(_) => Err(Error::Timeout("MQTT broker connection")),
        }
    }

    /// This device's id.
    pub fn device_id(&self) -> &str {
        &self.shared.id
    }

    /// The incoming-message counters.
    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        LinkStats {
            received: c.received.load(Ordering::Relaxed),
            dropped_oversized: c.oversized.load(Ordering::Relaxed),
            dropped_malformed: c.malformed.load(Ordering::Relaxed),
            dropped_unrouted: c.unrouted.load(Ordering::Relaxed),
            dropped_busy: c.busy.load(Ordering::Relaxed),
        }
    }

    /// Runs the handshake as initiator with device `peer_id` (also the label under which the
    /// device's store knows the peer) and returns the channel. Replaces any previous route to
    /// this peer.
    pub async fn connect_peer(
        &self,
        device: &Device,
        peer_id: &str,
        opts: &Options,
    ) -> Result<Channel<Link>, Error> {
        check_id(peer_id)?;
        if peer_id == self.shared.id {
            return Err(Error::InvalidInput("an MQTT device cannot call itself"));
        }
        let deadline = Instant::now() + device.settings().handshake_timeout;
        let (qtx, qrx) = mpsc::channel(PEER_QUEUE);
        let (route, established) = Route::new(qtx, None);
        self.shared.routes().insert(peer_id.to_string(), route);
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

    /// Waits for a peer's Hello, runs the handshake as responder, and returns the caller's
    /// device id and the channel. Failed handshakes are logged and skipped; handshakes run one
    /// at a time.
    pub async fn accept(
        &self,
        device: &Device,
        opts: &Options,
    ) -> Result<(String, Channel<Link>), Error> {
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
                Err(e) => log_failure("incoming MQTT handshake", None, &e),
            }
        }
    }

    fn hs_link(&self, peer_id: &str, queue: mpsc::Receiver<Vec<u8>>) -> HsUdp {
        HsUdp::new_bare(
            UdpTx::Mqtt(MqttTx {
                client: self.client.clone(),
                topic: topic(peer_id, &self.shared.id),
            }),
            Source::Queue(queue),
        )
    }
}

async fn event_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    accept: mpsc::Sender<Pending>,
    ready: oneshot::Sender<Result<(), Error>>,
) {
    let mut ready = Some(ready);
    let inbox = format!("{}#", shared.inbox_prefix);
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                shared.route(&p.topic, &p.payload, p.retain, &accept);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                // Clean session: subscribe on every (re)connection. Through a task, since the
                // request queue is drained by this very loop.
                let (client, inbox) = (client.clone(), inbox.clone());
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(inbox, QoS::AtLeastOnce).await {
                        debug!(error = %e, "MQTT subscribe request failed");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                let ok = s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if !ok {
                    warn!(device_id = %shared.id, "the MQTT broker refused the inbox subscription");
                }
                if let Some(r) = ready.take() {
                    let _ = r.send(if ok {
                        Ok(())
                    } else {
                        Err(Error::InvalidInput(
                            "the MQTT broker refused the inbox subscription",
                        ))
                    });
                    if !ok {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(mqtt_error("broker", e)));
                    return;
                }
                warn!(device_id = %shared.id, error = %e, retry_in = ?backoff, "MQTT connection lost");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
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
        for bad in ["a/b", "a+", "#", "a b", "é", "a.b"] {
            assert!(!valid_device_id(bad), "{bad}");
        }
        assert_eq!(topic("p", "d"), "keav/v1/p/from/d");
    }
}
