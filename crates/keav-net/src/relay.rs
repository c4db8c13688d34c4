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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keav_store::mailbox::MailboxLimits;

use crate::broker::LinkOptions;
use crate::Error;

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
    TcpRelay { addr: SocketAddr, id: String },
    /// The destination device itself, attached to this relay's TCP listener.
    TcpDevice,
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

impl core::str::FromStr for RouteRule {
    type Err = Error;
    /// `DST=mqtt`, `DST=nats`, `DST=tcp` (device attached over TCP), `DST=mqtt:RELAY`,
    /// `DST=nats:RELAY`, `DST=tcp:HOST:PORT/RELAY`; `DST` may be `*`.
    fn from_str(_s: &str) -> Result<Self, Error> {
        todo!()
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
}

/// A running relay.
pub struct Relay {
    _private: (),
}

impl core::fmt::Debug for Relay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

impl Relay {
    /// Opens the mailbox, connects the carriers, binds the listener and starts routing.
    pub async fn start(_cfg: RelayConfig) -> Result<Relay, Error> {
        todo!()
    }

    /// The TCP listener's address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        todo!()
    }

    /// The counters.
    pub fn stats(&self) -> RelayStats {
        todo!()
    }

    /// Bytes and entries held per queue (for operators and the demo).
    pub fn queues(&self) -> Result<Vec<(String, keav_store::mailbox::QueueStats)>, Error> {
        todo!()
    }

    /// Stops routing and closes the carriers (the mailbox keeps what it holds).
    pub async fn shutdown(self) -> Result<(), Error> {
        todo!()
    }
}
