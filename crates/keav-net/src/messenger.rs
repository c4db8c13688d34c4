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

use std::time::Duration;

use keav_proto::durable::DurableConfig;
use keav_proto::cache::Zid;

use crate::device::Device;
use crate::Error;

/// The broker link a messenger uses.
#[derive(Clone)]
pub enum Carrier {
    /// An MQTT link ([`crate::mqtt::Link`]).
    Mqtt(std::sync::Arc<crate::mqtt::Link>),
    /// A NATS link ([`crate::nats::Link`]).
    Nats(std::sync::Arc<crate::nats::Link>),
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
    /// Payloads not taken now (reorder window, epoch rule): the sender resends.
    pub deferred: u64,
    /// Entries a relay refused (mailbox full, no route).
    pub refused: u64,
}

/// A device's durable messaging endpoint.
pub struct Messenger {
    _private: (),
}

impl core::fmt::Debug for Messenger {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Messenger").finish_non_exhaustive()
    }
}

impl Messenger {
    /// Starts the messenger of `device` on `carrier`: restores every durable channel from the
    /// store (unacknowledged messages are resent, unacknowledged received ones released
    /// again) and starts the background tasks.
    pub async fn start(
        _device: Device,
        _carrier: Carrier,
        _opts: MessengerOptions,
    ) -> Result<Messenger, Error> {
        todo!()
    }

    /// Pairs with device `peer` (initiator; both online): handshake, then a new durable
    /// channel, replacing an existing one with that peer (whose undelivered messages are lost:
    /// the error case is documented). Returns the peer's verified ZID.
    pub async fn pair(&self, _peer: &str) -> Result<Zid, Error> {
        todo!()
    }

    /// Waits for a device to pair with this one (responder); returns its id and ZID.
    pub async fn accept_pair(&self) -> Result<(String, Zid), Error> {
        todo!()
    }

    /// Commits `body` to the outbox of the channel with `to` and returns its sequence number
    /// once it is durable; delivery continues in the background. Errors: no channel with `to`
    /// ([`Error::InvalidInput`]), outbox full, message too long, store failure.
    pub async fn send(&self, _to: &str, _body: &[u8]) -> Result<u64, Error> {
        todo!()
    }

    /// The next message from any peer, in order per peer. Each message is returned once per
    /// process; until [`Messenger::ack`] it is returned again after a restart.
    pub async fn recv(&self) -> Result<Message, Error> {
        todo!()
    }

    /// The application is done with `msg` and every earlier message from the same peer.
    pub async fn ack(&self, _msg: &Message) -> Result<(), Error> {
        todo!()
    }

    /// Waits until every message sent to `to` so far is acknowledged end to end, or `timeout`.
    pub async fn flush(&self, _to: &str, _timeout: Duration) -> Result<(), Error> {
        todo!()
    }

    /// The paired peers' device ids.
    pub fn peers(&self) -> Vec<String> {
        todo!()
    }

    /// The counters.
    pub fn stats(&self) -> MessengerStats {
        todo!()
    }

    /// Stops the background tasks after committing what is in flight.
    pub async fn shutdown(self) -> Result<(), Error> {
        todo!()
    }
}
