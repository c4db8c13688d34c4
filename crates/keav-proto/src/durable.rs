//! Durable channels (docs/MESSAGING.md): a KEAV session's keys used for messages that are
//! stored and forwarded while the peer is offline, delivered exactly once and in order.
//!
//! Sans-IO like the rest of the crate: [`DurableChannel`] seals messages into payloads,
//! takes payloads in, releases messages in order and says what must be persisted. The caller
//! (keav-net's messenger) stores, transmits and keeps the time.
//!
//! # Keys
//!
//! With `KDF` the RFC 6189 KDF and `ctx` the session's KDF_Context, two sub-channels are built
//! with [`crate::record::channel_from_parts`] from keys independent of the live channel's:
//!
//! ```text
//! data root    = KDF(exported_key, "KEAV durable data", ctx, 256)
//! control root = KDF(exported_key, "KEAV durable control", ctx, 256)
//! ```
//!
//! - **data**: the messages. Ratchets by count only, every 2^[`DATA_RATCHET_LOG2`] records
//!   (never by time), so epoch = sequence >> [`DATA_RATCHET_LOG2`] and a receiver can follow
//!   any backlog; the chain key of an epoch is erased when the next one begins.
//! - **control**: end-to-end acks. Never ratchets (acks carry only sequence numbers, and lost
//!   acks must never leave the receiver unable to follow), own sequence numbers, so nonces of
//!   the two sub-channels never meet (different keys anyway).
//!
//! # Payload (what carriers and relays see)
//!
//! ```text
//! +------+--------+----------------------------------------------+
//! | 0x44 | stream | record (keav-proto record layer wire format)  |
//! | 'D'  | 1 data |  type 0x17 | epoch u32 | seq u64 | ct | tag  |
//! |      | 2 ctl  |                                              |
//! +------+--------+----------------------------------------------+
//! ```
//!
//! [`parse_header`] reads `(stream, epoch, seq)` without keys: relays use it to deduplicate
//! and to acknowledge custody. A control record's plaintext is the receiver's cumulative ack
//! (u64 BE: every data sequence number below it is committed in the receiver's inbox).
//!
//! # Receiving
//!
//! Cheap checks before any AEAD work: tag, stream, length, then (data) the inbox admission
//! ([`crate::delivery::Inbox::admit`]) and the epoch rule — a data record is opened only when
//! its epoch is the epoch of the next message to release, so the opener never moves past a
//! message the inbox still needs (a later-epoch record is deferred; the sender resends it).
//!
//! # Persistence contract
//!
//! Every method that changes key state says what the caller must commit (one store
//! transaction) *before* the bytes it returns leave the process:
//!
//! - [`DurableChannel::send`]: the state ([`DurableChannel::export`]) and the outbox row
//!   `(seq, payload)`; only then may the payload be transmitted.
//! - [`DurableChannel::receive`] returning [`Received::Data`]: the state and the inbox row
//!   `(seq, body)`; only then may an ack be sent.
//! - [`DurableChannel::ack_payload`]: the state (control sealer) before the ack leaves.
//! - [`Received::Ack`]: the state (control opener) and the deletion of outbox rows below
//!   `upto`.
//! - The application's acknowledgement of released messages: the new `delivered` mark and
//!   the deletion of inbox rows below it.

use crate::delivery::{DeliveryError, InboxLimits, OutboxLimits};
use crate::handshake::SessionOutcome;
use crate::record::RecordError;

/// First byte of every durable payload.
pub const PAYLOAD_TAG: u8 = 0x44;
/// Bytes before the record: tag and stream.
pub const PAYLOAD_PREFIX: usize = 2;
/// The data sub-channel ratchets every 2^this records.
pub const DATA_RATCHET_LOG2: u8 = 8;

/// Which sub-channel a payload belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stream {
    /// Application messages.
    Data = 1,
    /// End-to-end acks.
    Control = 2,
}

impl Stream {
    /// The stream byte's value.
    pub fn from_byte(b: u8) -> Option<Stream> {
        match b {
            1 => Some(Stream::Data),
            2 => Some(Stream::Control),
            _ => None,
        }
    }
}

/// What a durable payload says about itself, read without keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PayloadHeader {
    /// The sub-channel.
    pub stream: Stream,
    /// The record's epoch.
    pub epoch: u32,
    /// The record's sequence number in its sub-channel.
    pub seq: u64,
}

/// Why a durable operation failed. A failed `receive` changes nothing.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurableError {
    /// Not a durable payload (tag, stream byte or length wrong; the reason says which).
    #[error("malformed durable payload: {0}")]
    Malformed(&'static str),
    /// The record layer refused (forged, replayed, closed, exhausted, ...).
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The delivery bookkeeping refused (outbox full, stale ack, ...).
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The session negotiated no channel AEAD (plain ZRTP peer).
    #[error("the peer negotiated no secure channel")]
    NoChannel,
    /// A persisted durable state is malformed or inconsistent (the reason names the field).
    #[error("bad durable channel state: {0}")]
    BadState(&'static str),
}

/// Bounds and timing of one durable channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableConfig {
    /// Sender side (bound: a full outbox refuses `send` with [`DeliveryError::Full`]).
    pub outbox: OutboxLimits,
    /// Receiver side. `max_pending` is capped at 2^[`DATA_RATCHET_LOG2`] (the epoch rule).
    pub inbox: InboxLimits,
    /// After a hop took custody of a record ([`DurableChannel::on_custody`]), resend it only
    /// after this long (milliseconds) if no end-to-end ack came.
    pub custody_ms: u64,
}

impl Default for DurableConfig {
    /// Outbox 1,000,000 records / 256 MiB, first resend after 2 s doubling up to 60 s; inbox
    /// 256 messages / 4 MiB; custody 10 minutes.
    fn default() -> Self {
        DurableConfig {
            outbox: OutboxLimits {
                max_records: 1_000_000,
                max_bytes: 256 << 20,
                rto_initial_ms: 2_000,
                rto_max_ms: 60_000,
            },
            inbox: InboxLimits::new(256, 4 << 20),
            custody_ms: 600_000,
        }
    }
}

/// What [`DurableChannel::receive`] did with a payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A new message was authenticated and taken into the inbox: persist `(seq, body)` and the
    /// state, then send an ack. `body` is a copy of what the inbox holds.
    Data { seq: u64, body: Vec<u8> },
    /// Already taken (or released): nothing to persist; answer with an ack (the sender
    /// evidently missed one).
    Duplicate { seq: u64 },
    /// Not taken now (beyond the reorder window, a later epoch, or no room): the sender
    /// resends it later. Nothing to persist, no ack needed.
    Deferred { seq: u64 },
    /// A valid end-to-end ack: persist the state and delete outbox rows below `upto`.
    /// `freed` records left the outbox.
    Ack { upto: u64, freed: usize },
    /// A valid but stale or duplicated ack: nothing changed (nothing to persist).
    StaleAck,
}

/// Persisted key state of a durable channel (no message contents: the outbox and inbox rows
/// are stored separately). `Debug` shows counters only.
#[derive(Clone, PartialEq, Eq)]
pub struct DurableState {
    _private: (),
}

impl core::fmt::Debug for DurableState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableState").finish_non_exhaustive()
    }
}

impl DurableState {
    /// Versioned encoding (zeroized on drop: it holds chain keys).
    pub fn encode(&self) -> zeroize::Zeroizing<Vec<u8>> {
        todo!()
    }

    /// Parses and checks an encoding.
    pub fn decode(_bytes: &[u8]) -> Result<DurableState, DurableError> {
        todo!()
    }
}

/// Reads a payload's header without keys (checks tag, stream, record type and minimum length).
pub fn parse_header(_payload: &[u8]) -> Result<PayloadHeader, DurableError> {
    todo!()
}

/// One durable channel with one peer: both sub-channels, the outbox and the inbox.
///
/// `Debug` shows counters, never keys or messages.
pub struct DurableChannel {
    _private: (),
}

impl core::fmt::Debug for DurableChannel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableChannel").finish_non_exhaustive()
    }
}

impl DurableChannel {
    /// The durable channel of a completed session (both sides derive the same keys; the role
    /// in `outcome` decides the directions). Nothing sent or received yet.
    pub fn new(
        _outcome: &SessionOutcome,
        _cfg: DurableConfig,
        _now_ms: u64,
    ) -> Result<Self, DurableError> {
        todo!()
    }

    /// Rebuilds a channel from its persisted state, its outbox rows (any order; every one is
    /// due at once) and its inbox rows (sequence numbers at or above `delivered`, the
    /// application's acknowledged mark; they are released again in order).
    pub fn restore(
        _state: &DurableState,
        _outbox: Vec<(u64, Vec<u8>)>,
        _inbox: Vec<(u64, Vec<u8>)>,
        _delivered: u64,
        _cfg: DurableConfig,
        _now_ms: u64,
    ) -> Result<Self, DurableError> {
        todo!()
    }

    /// The state to persist (see the persistence contract in the module docs).
    pub fn export(&self) -> DurableState {
        todo!()
    }

    /// Seals `body` (at most [`crate::record::MAX_PLAINTEXT`] bytes) as the next message and
    /// keeps it in the outbox. Returns its sequence number and the payload; persist both and
    /// the state before transmitting. A full outbox is [`DeliveryError::Full`] (nothing sealed).
    pub fn send(&mut self, _body: &[u8], _now_ms: u64) -> Result<(u64, Vec<u8>), DurableError> {
        todo!()
    }

    /// Takes one payload from the carrier (cheap checks first, see the module docs).
    pub fn receive(&mut self, _payload: &[u8], _now_ms: u64) -> Result<Received, DurableError> {
        todo!()
    }

    /// The next message for the application, in order (each released once per process; after
    /// a restore, messages not yet acknowledged by the application are released again).
    pub fn pop(&mut self) -> Option<(u64, Vec<u8>)> {
        todo!()
    }

    /// Seals a control record carrying the inbox's cumulative ack. Persist the state before
    /// sending it.
    pub fn ack_payload(&mut self, _now_ms: u64) -> Result<Vec<u8>, DurableError> {
        todo!()
    }

    /// The inbox's cumulative ack (every data sequence number below it is held or released).
    pub fn inbox_ack(&self) -> u64 {
        todo!()
    }

    /// The next outbox payload due at `now_ms` (new ones first, then resends), with its
    /// sequence number.
    pub fn poll_transmit(&mut self, _now_ms: u64) -> Option<(u64, Vec<u8>)> {
        todo!()
    }

    /// When [`DurableChannel::poll_transmit`] next has something (ms), `None` when the outbox is
    /// empty.
    pub fn poll_timeout(&self) -> Option<u64> {
        todo!()
    }

    /// A hop (relay, broker with a persistent queue) took custody of data record `seq`: its
    /// next resend moves to `now_ms + custody_ms`. Unknown sequence numbers are ignored.
    pub fn on_custody(&mut self, _seq: u64, _now_ms: u64) {
        todo!()
    }

    /// Every unacknowledged outbox record becomes due at `now_ms` (call when the carrier
    /// reconnects or the peer is seen again).
    pub fn resend_all(&mut self, _now_ms: u64) {
        todo!()
    }

    /// Records in the outbox (sent, not yet acknowledged end to end).
    pub fn outbox_len(&self) -> usize {
        todo!()
    }

    /// Highest end-to-end ack received (every message below it is in the peer's inbox).
    pub fn acked(&self) -> u64 {
        todo!()
    }

    /// Sequence number the next `send` will use.
    pub fn next_seq(&self) -> u64 {
        todo!()
    }
}
