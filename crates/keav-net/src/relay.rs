//! `keav relay`: forwards durable payloads along routes and keeps a durable mailbox for
//! offline devices, without any session key (docs/MESSAGING.md, "Relays and mailboxes").
//!
//! A relay is a device id on a broker (MQTT and/or NATS) and optionally a TCP listener. It
//! takes [`Frame::Forward`](keav_proto::route::Frame) frames, decides the next hop from its
//! routes, commits them to the mailbox queue of that hop (redb, [`keav_store::mailbox`]),
//! acknowledges custody to the previous hop (`Stored`), and pushes each queue to its hop:
//! to a device after it said it is online (`Pull`, with a window), to a next relay whenever
//! it is reachable; an entry leaves the mailbox when the hop acknowledges custody. A full
//! queue refuses new entries (`Refused`, mailbox full) and never drops stored ones.
//!
//! # Carriers
//!
//! - **MQTT / NATS**: the relay is device [`RelayConfig::id`] on the broker
//!   ([`crate::mqtt::Link`], [`crate::nats::Link`]); it takes every relay frame of its inbox
//!   (`take_mail`) and answers the sender named by the topic or subject. The link's
//!   `max_payload` should be at least [`MAX_FRAME`] (the CLI sets it).
//! - **TCP listener** ([`RelayConfig::tcp_listen`]): frames are `u32` big-endian length +
//!   frame, 1..=[`MAX_FRAME`] bytes. The first frame of a connection must be
//!   `Attach { id }` (within 10 s), naming the connecting device or relay; otherwise, or on an
//!   oversized or empty frame, the connection is closed. At most 1024 connections at once.
//!   Replies go back on the connection the frame came on; a device or relay attached under
//!   id `X` is pushed its queue on its newest connection.
//! - **TCP next hops** ([`NextHop::TcpRelay`]): the relay connects to `addr`, sends
//!   `Attach { own id }` and pushes frames on that connection (custody acks come back on it);
//!   it reconnects after a failure with a backoff of 100 ms doubling to 10 s.
//!
//! # Routing an incoming `Forward { hops, src, dst, body }`
//!
//! In this order: a body that is not a durable payload is refused (`BadBody`, the refusal names
//! the stream byte and sequence number found where a durable payload has them, if the stream
//! byte is valid, else the data stream and sequence 0); `hops == 0` is refused (`HopLimit`); the
//! first [`RouteRule`] whose `dst` is the frame's destination or `*` gives the next hop
//! (none, or a destination equal to the relay's own id: `NoRoute`). The frame is stored with
//! `hops - 1` in the queue of the next hop: named after the destination for the `*Device`
//! hops, after the next relay's id for the `*Relay` hops. Entries from a device that the
//! relay cannot route are refused, never dropped silently.
//!
//! Frames that arrive together (up to 512, gathered for at most 2 ms) are processed as one
//! batch: one mailbox transaction per queue ([`Mailbox::put_batch`]), then the replies, to
//! the previous hop over the carrier the frame came on: `Stored { src, dst, stream, seqs }`
//! for the entries stored *and* for duplicates of entries already held (grouped per sender,
//! source, destination and stream), `Refused { MailboxFull | NoRoute | HopLimit | BadBody }`
//! for the others. Nothing is acknowledged before it is committed; if the mailbox fails (disk
//! error) nothing is acknowledged and the senders resend. JetStream messages
//! ([`crate::broker::Mail::ack`]) are acknowledged once their batch is committed.
//!
//! # Pushing
//!
//! Each queue has a window of in-flight entries (pushed, no custody ack yet): at most
//! [`RelayConfig::window`], for a device also at most the window of its last `Pull`. The
//! relay reads the next entries from the mailbox ([`Mailbox::peek`], positions after the
//! queue's cursor, skipping entries in flight) and pushes them in order; in-flight entries
//! are pushed again after [`RelayConfig::resend`]. A `Stored { src, dst, stream, seqs }`
//! from a hop removes those entries from the queue named after the hop that sent it (the
//! device id, or the next relay's id), which frees window slots.
//!
//! - **Device queues** are pushed only while the device is online: it sent `Pull { window }`
//!   within [`RelayConfig::presence`]. They are pushed over the carrier the last `Pull` came
//!   on (over TCP: the device's newest attached connection). A `Pull` pushes at once; a
//!   `Pull` from a device that was offline, that changed carrier, or with entries in flight for
//!   250 ms or more (it restarted within the presence window) first pushes every in-flight
//!   entry again.
//! - **Relay queues** are pushed whenever the next relay is connected (TCP) or always
//!   (MQTT, NATS). When a TCP connection to a hop ends, its in-flight entries are pushed again
//!   on the next connection.
//!
//! A hop's `Refused` (other than `Later`, below) leaves the entry in the mailbox and in
//! flight (pushed again after `resend`). In-flight state lives only in memory: a restarted
//! relay (even after SIGKILL) resumes from what its mailbox committed and pushes everything
//! unacknowledged again; the receivers drop duplicates (a relay's mailbox by entry key, a
//! device's inbox by sequence number).
//!
//! # Flow control: `Later` and `Need`
//!
//! A queue is in mailbox *arrival* order, a device releases in *sequence* order through a
//! bounded reorder window (and opens only records of the epoch of the next message to
//! release). After a relay restart some records a sender transmitted may be missing from the
//! mailbox, and the sender's resends land at the tail of the queue: without flow control
//! the window would stay full of entries the device cannot take, pushed again every
//! `resend`, while the one it waits for sits beyond the window (and the sender resends it
//! only on its backoff, up to a minute). Two frames fix this:
//!
//! - **`Refused { Later, key }`** from the hop of queue `q` (the device answers every entry
//!   it defers): the entry leaves the in-flight window (it stays in the mailbox), the
//!   queue's cursor moves back so that the next push starts at that entry's position (the
//!   earliest such position wins), and the queue is **paused**: nothing new is pushed until
//!   the hop acknowledges custody of something (`Stored`, progress) or `resend` has passed
//!   (checked by the timer). `Later` is back-pressure: the relay never walks the queue
//!   pushing entries the device cannot take, so a long backlog drains in work linear in its
//!   length (each push reads the mailbox in chunks from the cursor, past at most a window of
//!   in-flight entries).
//! - **`Need { src, dst, stream, seq }`** from the device `dst` (its queue's hop; from
//!   anyone else it is dropped as malformed): the device needs that entry next. If the
//!   mailbox holds it ([`Mailbox::find`]) it is pushed at once, even while the queue is
//!   paused or its window is full, together with the entries of the next sequence numbers
//!   of the same sender and stream that the mailbox holds and that are not in flight (up to
//!   the free window, at least the entry needed, at most 256). If not, the key is
//!   remembered as *wanted* for the queue (at most 1024 keys per queue, the stalest making
//!   room, each forgotten after a minute; the device asks again while it still needs it) and
//!   the `Need` frame is passed on unchanged to `src` over the carrier it came on (MQTT or
//!   NATS: published to `src`; TCP: `src`'s newest attached connection, if any), so the
//!   sender resends that record at once. When a wanted key is stored it is pushed at once
//!   (whatever the window and pause) and forgotten. A `Need` is passed on to `src` only
//!   directly: in a chain of relays, a sender on another broker is not reached (its own
//!   backoff resends).
//!
//! # Trust
//!
//! The relay reads only relay frames and the durable payload header (for the entry key); it
//! never holds a session key and never logs a body. A forged `Later` or `Need` in a
//! device's name can only delay that device's queue or cause extra pushes and resends
//! (bounded by the window and the rate limits of the devices), never lose or forge an entry. Without broker ACLs (or, over TCP,
//! anything that authenticates `Attach`), whoever can publish under a hop's name can ack that
//! hop's entries away: the end-to-end acks of [`keav_proto::durable`] still make the sender
//! resend, so this costs delivery time, never integrity or exactly-once delivery.

mod router;
mod tcp;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keav_proto::route::valid_id;
use keav_store::mailbox::{Mailbox, MailboxLimits};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::broker::LinkOptions;
use crate::Error;

/// Longest relay frame on any carrier (a Forward frame with the largest body, with margin).
pub const MAX_FRAME: usize = 70 * 1024;

/// Where entries for a destination go next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// The destination device itself, on this relay's MQTT link (pushed after its Pull).
    MqttDevice,
    /// The destination device itself, on this relay's NATS link.
    NatsDevice,
    /// Another relay with this id on this relay's MQTT link.
    MqttRelay(String),
    /// Another relay with this id on this relay's NATS link.
    NatsRelay(String),
    /// Another relay reached over TCP at `addr` (it must answer to `id`).
    TcpRelay {
        /// Where the next relay listens.
        addr: SocketAddr,
        /// Its relay id (the queue's name).
        id: String,
    },
    /// The destination device itself, attached to this relay's TCP listener.
    TcpDevice,
}

impl NextHop {
    /// The next relay's id, for the `*Relay` hops.
    pub fn relay_id(&self) -> Option<&str> {
        match self {
            NextHop::MqttRelay(id) | NextHop::NatsRelay(id) | NextHop::TcpRelay { id, .. } => {
                Some(id)
            }
            NextHop::MqttDevice | NextHop::NatsDevice | NextHop::TcpDevice => None,
        }
    }
}

impl core::fmt::Display for NextHop {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NextHop::MqttDevice => f.write_str("mqtt"),
            NextHop::NatsDevice => f.write_str("nats"),
            NextHop::TcpDevice => f.write_str("tcp"),
            NextHop::MqttRelay(id) => write!(f, "mqtt:{id}"),
            NextHop::NatsRelay(id) => write!(f, "nats:{id}"),
            NextHop::TcpRelay { addr, id } => write!(f, "tcp:{addr}/{id}"),
        }
    }
}

/// One routing rule: entries for `dst` (a device id, or `*` for any) go to `next`. The first
/// matching rule wins; without one, an entry is refused (no route).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRule {
    /// Destination device id or `*`.
    pub dst: String,
    /// Next hop.
    pub next: NextHop,
}

impl RouteRule {
    /// Whether this rule applies to destination `dst`.
    pub fn matches(&self, dst: &str) -> bool {
        self.dst == "*" || self.dst == dst
    }
}

impl core::fmt::Display for RouteRule {
    /// The rule in the syntax [`RouteRule::from_str`](core::str::FromStr) reads.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}={}", self.dst, self.next)
    }
}

impl core::str::FromStr for RouteRule {
    type Err = Error;
    /// `DST=mqtt`, `DST=nats`, `DST=tcp` (device attached over TCP), `DST=mqtt:RELAY`,
    /// `DST=nats:RELAY`, `DST=tcp:HOST:PORT/RELAY`; `DST` may be `*`. `HOST` is an IP address
    /// or a name, resolved once here (the first address wins).
    fn from_str(s: &str) -> Result<Self, Error> {
        let (dst, hop) = s.split_once('=').ok_or(Error::InvalidInput(
            "a route is DST=HOP, HOP one of mqtt, nats, tcp, mqtt:RELAY, nats:RELAY, tcp:HOST:PORT/RELAY",
        ))?;
        if dst != "*" && !valid_id(dst) {
            return Err(Error::InvalidInput(
                "a route's DST is `*` or a device id (1 to 64 characters of [A-Za-z0-9_-])",
            ));
        }
        let relay = |id: &str| {
            if valid_id(id) {
                Ok(id.to_string())
            } else {
                Err(Error::InvalidInput(
                    "a route's RELAY is a relay id (1 to 64 characters of [A-Za-z0-9_-])",
                ))
            }
        };
        let next = match hop.split_once(':') {
            None => match hop {
                "mqtt" => NextHop::MqttDevice,
                "nats" => NextHop::NatsDevice,
                "tcp" => NextHop::TcpDevice,
                _ => {
                    return Err(Error::InvalidInput(
                        "a route's hop is mqtt, nats, tcp, mqtt:RELAY, nats:RELAY or tcp:HOST:PORT/RELAY",
                    ))
                }
            },
            Some(("mqtt", id)) => NextHop::MqttRelay(relay(id)?),
            Some(("nats", id)) => NextHop::NatsRelay(relay(id)?),
            Some(("tcp", rest)) => {
                let (addr, id) = rest.rsplit_once('/').ok_or(Error::InvalidInput(
                    "a TCP relay hop is tcp:HOST:PORT/RELAY",
                ))?;
                let id = relay(id)?;
                let addr = match addr.parse::<SocketAddr>() {
                    Ok(a) => a,
                    Err(_) => addr
                        .to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or(Error::InvalidInput(
                            "a TCP relay hop's HOST:PORT is not an address that resolves",
                        ))?,
                };
                NextHop::TcpRelay { addr, id }
            }
            Some(_) => {
                return Err(Error::InvalidInput(
                    "a route's hop is mqtt, nats, tcp, mqtt:RELAY, nats:RELAY or tcp:HOST:PORT/RELAY",
                ))
            }
        };
        Ok(RouteRule {
            dst: dst.to_string(),
            next,
        })
    }
}

/// Configuration of a relay.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The relay's id (as a device id on brokers and in TCP `Attach`).
    pub id: String,
    /// The mailbox file.
    pub mailbox: PathBuf,
    /// Bounds of each mailbox queue.
    pub limits: MailboxLimits,
    /// MQTT broker `host:port` and link options.
    pub mqtt: Option<(String, LinkOptions)>,
    /// NATS server `host:port` and link options.
    pub nats: Option<(String, LinkOptions)>,
    /// TCP listener address (port 0: any free port).
    pub tcp_listen: Option<SocketAddr>,
    /// Routing rules, in order.
    pub routes: Vec<RouteRule>,
    /// Frames pushed to a next relay before its custody acks (default 256).
    pub window: u32,
    /// Unacknowledged pushed frames are pushed again after this long (default 2 s).
    pub resend: Duration,
    /// A device counts as online this long after its last Pull (default 15 s).
    pub presence: Duration,
}

impl RelayConfig {
    /// A relay `id` with its mailbox at `mailbox`, default bounds and timing, no carriers and
    /// no routes yet.
    pub fn new(id: &str, mailbox: PathBuf) -> RelayConfig {
        RelayConfig {
            id: id.to_string(),
            mailbox,
            limits: MailboxLimits::default(),
            mqtt: None,
            nats: None,
            tcp_listen: None,
            routes: Vec::new(),
            window: 256,
            resend: Duration::from_secs(2),
            presence: Duration::from_secs(15),
        }
    }

    /// Link options fit for a relay: the defaults with `max_payload` = [`MAX_FRAME`].
    pub fn link_options() -> LinkOptions {
        LinkOptions {
            max_payload: MAX_FRAME,
            ..LinkOptions::default()
        }
    }

    /// Checks the id, the timing and that every route's carrier is configured.
    fn check(&self) -> Result<(), Error> {
        if !valid_id(&self.id) {
            return Err(Error::InvalidInput(
                "a relay id is 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        if self.window == 0 || self.resend.is_zero() || self.presence.is_zero() {
            return Err(Error::InvalidInput(
                "the relay's window, resend and presence must be positive",
            ));
        }
        for r in &self.routes {
            if r.next.relay_id() == Some(self.id.as_str()) {
                return Err(Error::InvalidInput("a route's next relay is this relay"));
            }
            let ok = match r.next {
                NextHop::MqttDevice | NextHop::MqttRelay(_) => self.mqtt.is_some(),
                NextHop::NatsDevice | NextHop::NatsRelay(_) => self.nats.is_some(),
                NextHop::TcpDevice => self.tcp_listen.is_some(),
                NextHop::TcpRelay { .. } => true,
            };
            if !ok {
                return Err(Error::InvalidInput(
                    "a route uses a carrier this relay has not configured (mqtt, nats or a TCP listener)",
                ));
            }
        }
        // One carrier per next relay: its queue is pushed over one of them.
        for (i, a) in self.routes.iter().enumerate() {
            for b in self.routes.iter().skip(i + 1) {
                if let (Some(x), Some(y)) = (a.next.relay_id(), b.next.relay_id()) {
                    if x == y && a.next != b.next {
                        return Err(Error::InvalidInput(
                            "routes name the same next relay with two different hops",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counters of a relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Forward frames received.
    pub received: u64,
    /// Entries committed to the mailbox.
    pub stored: u64,
    /// Duplicates of entries already held (acknowledged again, not stored).
    pub duplicates: u64,
    /// Entries refused (mailbox full, no route, hop limit, bad body).
    pub refused: u64,
    /// Frames pushed to next hops (first pushes and re-pushes).
    pub pushed: u64,
    /// Entries whose custody passed to the next hop (removed from the mailbox).
    pub delivered: u64,
    /// Frames dropped: malformed or unexpected.
    pub malformed: u64,
    /// `Refused { Later }` answers from hops (entries a device could not take yet).
    pub later: u64,
    /// `Need` frames taken from devices.
    pub needs: u64,
    /// `Need` frames passed on to the entry's sender (the mailbox did not hold the entry).
    pub needs_forwarded: u64,
}

/// The live counters behind [`RelayStats`].
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    pushed: AtomicU64,
    delivered: AtomicU64,
    malformed: AtomicU64,
    later: AtomicU64,
    needs: AtomicU64,
    needs_forwarded: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RelayStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            received: l(&self.received),
            stored: l(&self.stored),
            duplicates: l(&self.duplicates),
            refused: l(&self.refused),
            pushed: l(&self.pushed),
            delivered: l(&self.delivered),
            malformed: l(&self.malformed),
            later: l(&self.later),
            needs: l(&self.needs),
            needs_forwarded: l(&self.needs_forwarded),
        }
    }
}

/// A broker link of the relay.
#[derive(Clone)]
enum BrokerLink {
    Mqtt(Arc<crate::mqtt::Link>),
    Nats(Arc<crate::nats::Link>),
}

impl BrokerLink {
    async fn publish(&self, to: &str, payload: &[u8]) -> Result<bool, Error> {
        match self {
            BrokerLink::Mqtt(l) => l.publish(to, payload).await,
            BrokerLink::Nats(l) => l.publish(to, payload).await,
        }
    }

    fn take_mail(&self) -> Option<mpsc::Receiver<crate::broker::Mail>> {
        match self {
            BrokerLink::Mqtt(l) => l.take_mail(),
            BrokerLink::Nats(l) => l.take_mail(),
        }
    }
}

/// Outgoing frames queued per broker link.
const PUBLISH_QUEUE: usize = 4096;
/// Events (frames, TCP connections) queued for the routing task.
const EVENT_QUEUE: usize = 4096;

/// Publishes what the routing task queues for a broker link, in order.
async fn publish_loop(link: BrokerLink, mut rx: mpsc::Receiver<(String, Vec<u8>)>) {
    while let Some((to, frame)) = rx.recv().await {
        if let Err(e) = link.publish(&to, &frame).await {
            tracing::debug!(to, error = %e, "relay publish failed (the frame is sent again later)");
        }
    }
}

/// Hands a broker link's mail to the routing task.
async fn mail_loop(
    mut mail: mpsc::Receiver<crate::broker::Mail>,
    events: mpsc::Sender<router::Event>,
    nats: bool,
) {
    while let Some(m) = mail.recv().await {
        let from = if nats {
            router::Source::Nats(m.from)
        } else {
            router::Source::Mqtt(m.from)
        };
        let ev = router::Event::Frame {
            from,
            bytes: m.payload,
            ack: m.ack.map(Box::new),
        };
        if events.send(ev).await.is_err() {
            return;
        }
    }
}

/// Background tasks, aborted when dropped (also when `start` fails half-way).
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A running relay.
pub struct Relay {
    tcp_addr: Option<SocketAddr>,
    counters: Arc<Counters>,
    mailbox: Option<Arc<Mailbox>>,
    shutdown: watch::Sender<bool>,
    router: Option<JoinHandle<()>>,
    tasks: Tasks,
    links: Vec<BrokerLink>,
}

impl core::fmt::Debug for Relay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Relay")
            .field("tcp_addr", &self.tcp_addr)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(r) = &self.router {
            r.abort();
        }
        // `tasks` aborts its own when dropped.
    }
}

impl Relay {
    /// Opens the mailbox, connects the carriers, binds the listener and starts routing.
    pub async fn start(cfg: RelayConfig) -> Result<Relay, Error> {
        cfg.check()?;
        let (path, limits) = (cfg.mailbox.clone(), cfg.limits);
        let mailbox = tokio::task::spawn_blocking(move || Mailbox::open(&path, limits))
            .await
            .map_err(|_| Error::Io(std::io::Error::other("mailbox open task failed")))??;
        let mailbox = Arc::new(mailbox);

        let mut links = Vec::new();
        let mut carriers = Vec::new();
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let mut tasks = Tasks::default();
        let mut mqtt_tx = None;
        let mut nats_tx = None;
        if let Some((addr, opts)) = &cfg.mqtt {
            let link = crate::mqtt::Link::connect(addr, &cfg.id, opts.clone()).await?;
            links.push(BrokerLink::Mqtt(Arc::new(link)));
            carriers.push(format!("mqtt={addr}"));
        }
        if let Some((addr, opts)) = &cfg.nats {
            let link = crate::nats::Link::connect(addr, &cfg.id, opts.clone()).await?;
            links.push(BrokerLink::Nats(Arc::new(link)));
            carriers.push(format!("nats={addr}"));
        }
        for link in &links {
            let nats = matches!(link, BrokerLink::Nats(_));
            let mail = link.take_mail().ok_or(Error::InvalidInput(
                "the broker link's mail stream is already taken",
            ))?;
            let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
            tasks.0.push(tokio::spawn(publish_loop(link.clone(), rx)));
            tasks
                .0
                .push(tokio::spawn(mail_loop(mail, events_tx.clone(), nats)));
            if nats {
                nats_tx = Some(tx);
            } else {
                mqtt_tx = Some(tx);
            }
        }
        let conn_ids = Arc::new(AtomicU64::new(1));
        let counters = Arc::new(Counters::default());
        let mut tcp_addr = None;
        if let Some(addr) = cfg.tcp_listen {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let local = listener.local_addr()?;
            tcp_addr = Some(local);
            carriers.push(format!("tcp={local}"));
            tasks.0.push(tokio::spawn(tcp::listen(
                listener,
                events_tx.clone(),
                counters.clone(),
                conn_ids.clone(),
            )));
        }
        let mut dialed = Vec::new();
        for r in &cfg.routes {
            if let NextHop::TcpRelay { addr, id } = &r.next {
                if dialed.contains(id) {
                    continue;
                }
                dialed.push(id.clone());
                tasks.0.push(tokio::spawn(tcp::connect_out(
                    *addr,
                    id.clone(),
                    cfg.id.clone(),
                    events_tx.clone(),
                    counters.clone(),
                    conn_ids.clone(),
                )));
            }
        }
        drop(events_tx);

        let existing = {
            let mb = mailbox.clone();
            tokio::task::spawn_blocking(move || mb.queues())
                .await
                .map_err(|_| Error::Io(std::io::Error::other("mailbox task failed")))??
        };
        let routes: Vec<String> = cfg.routes.iter().map(ToString::to_string).collect();
        info!(
            id = cfg.id,
            carriers = carriers.join(" "),
            tcp = ?tcp_addr,
            routes = routes.join(" "),
            queues = existing.len(),
            "relay started"
        );
        let (shutdown, shutdown_rx) = watch::channel(false);
        let router = router::Router::new(
            &cfg,
            mailbox.clone(),
            counters.clone(),
            mqtt_tx,
            nats_tx,
            existing.into_iter().map(|(q, _)| q),
        );
        let router = tokio::spawn(router.run(events_rx, shutdown_rx));
        Ok(Relay {
            tcp_addr,
            counters,
            mailbox: Some(mailbox),
            shutdown,
            router: Some(router),
            tasks,
            links,
        })
    }

    /// The TCP listener's address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The counters.
    pub fn stats(&self) -> RelayStats {
        self.counters.snapshot()
    }

    /// Bytes and entries held per queue (for operators and the demo).
    pub fn queues(&self) -> Result<Vec<(String, keav_store::mailbox::QueueStats)>, Error> {
        match &self.mailbox {
            Some(m) => Ok(m.queues()?),
            None => Err(Error::Shutdown),
        }
    }

    /// Stops routing and closes the carriers (the mailbox keeps what it holds). The batch
    /// being processed is finished first; once this returns the mailbox file is closed.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let _ = self.shutdown.send(true);
        if let Some(r) = self.router.take() {
            let _ = r.await;
        }
        for t in std::mem::take(&mut self.tasks.0) {
            t.abort();
            let _ = t.await;
        }
        self.links.clear();
        self.mailbox = None;
        info!("relay stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_print() {
        let cases = [
            ("B=mqtt", "B", NextHop::MqttDevice),
            ("*=nats", "*", NextHop::NatsDevice),
            ("dev_1=tcp", "dev_1", NextHop::TcpDevice),
            ("*=mqtt:R2", "*", NextHop::MqttRelay("R2".into())),
            ("x=nats:r-3", "x", NextHop::NatsRelay("r-3".into())),
            (
                "*=tcp:127.0.0.1:7000/R2",
                "*",
                NextHop::TcpRelay {
                    addr: "127.0.0.1:7000".parse().unwrap(),
                    id: "R2".into(),
                },
            ),
            (
                "*=tcp:[::1]:7000/R2",
                "*",
                NextHop::TcpRelay {
                    addr: "[::1]:7000".parse().unwrap(),
                    id: "R2".into(),
                },
            ),
        ];
        for (s, dst, next) in cases {
            let r: RouteRule = s.parse().unwrap();
            assert_eq!(r.dst, dst, "{s}");
            assert_eq!(r.next, next, "{s}");
            let again: RouteRule = r.to_string().parse().unwrap();
            assert_eq!(again, r, "{s}");
        }
        let r: RouteRule = "B=tcp:localhost:7000/R2".parse().unwrap();
        assert!(matches!(r.next, NextHop::TcpRelay { addr, .. } if addr.port() == 7000));
    }

    #[test]
    fn bad_routes_are_refused() {
        for bad in [
            "",
            "B",
            "=mqtt",
            "B=",
            "B=udp",
            "a/b=mqtt",
            "**=mqtt",
            "B=mqtt:",
            "B=mqtt:a.b",
            "B=nats:*",
            "B=tcp:127.0.0.1:7000",
            "B=tcp:127.0.0.1/R2",
            "B=tcp:127.0.0.1:99999/R2",
            "B=tcp:/R2",
            "B=ftp:R2",
            "B=mqtt=R",
        ] {
            assert!(bad.parse::<RouteRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_checks() {
        let mut c = RelayConfig::new("R", "x".into());
        assert!(c.check().is_ok());
        c.routes.push("*=mqtt".parse().unwrap());
        assert!(c.check().is_err(), "mqtt route without an MQTT link");
        c.mqtt = Some(("127.0.0.1:1883".into(), RelayConfig::link_options()));
        assert!(c.check().is_ok());
        c.routes.push("*=mqtt:R".parse().unwrap());
        assert!(c.check().is_err(), "next relay is itself");
        c.routes.pop();
        c.routes.push("a=mqtt:R2".parse().unwrap());
        c.routes.push("b=tcp:127.0.0.1:1/R2".parse().unwrap());
        assert!(c.check().is_err(), "one next relay, two hops");
        c.routes.pop();
        c.routes.push("b=tcp".parse().unwrap());
        assert!(c.check().is_err(), "tcp device route without a listener");
        c.tcp_listen = Some("127.0.0.1:0".parse().unwrap());
        assert!(c.check().is_ok());
        c.window = 0;
        assert!(c.check().is_err());
        c.window = 1;
        c.id = "a b".into();
        assert!(c.check().is_err());
    }
}
