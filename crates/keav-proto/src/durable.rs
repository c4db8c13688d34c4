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
//! ([`crate::delivery::Inbox::admit`], the one authority on duplicates) and the epoch rule.
//! With `N` the epoch of the next message to release (`next_expected >> DATA_RATCHET_LOG2`):
//!
//! - a record of epoch `N` is opened by the data opener, which so never moves past an epoch
//!   the inbox still needs a message of (it only ratchets once `next_expected` crossed into
//!   the new epoch);
//! - a record of epoch `N + 1` is opened by a *lookahead* opener, a copy of the data opener
//!   made on the spot ([`Opener::from_state`]) that derives epoch `N + 1`'s key, so a reorder
//!   window straddling an epoch boundary keeps flowing. It is cached while the data opener's
//!   epoch stays the same and dropped when it moves; it is never persisted (its replay window
//!   need not be: the inbox refuses duplicates before anything is opened). It is used only
//!   while the data opener is at epoch `N`; if the data opener is still at `N - 1` (every
//!   message of epoch `N` it saw came through the lookahead), the record is deferred until
//!   a record of epoch `N` moved it;
//! - after a restore the data opener may be ahead of `N` (the application had not
//!   acknowledged every released message): records of its own epoch are opened by it;
//! - any other epoch is deferred ([`Received::Deferred`]; the sender resends it).
//!
//! Since records of epoch `N + 1` leave no trace in the persisted data opener, the inbox rows
//! of a restored channel may lie above the opener's highest record, up to the end of the
//! epoch after the opener's ([`DurableChannel::restore`]).
//!
//! # Early arrivals
//!
//! A deferred data payload is not thrown away: the channel keeps it, unopened, in a bounded
//! in-memory stash ([`DurableConfig::early_records`], [`DurableConfig::early_bytes`]; when
//! full, lower sequence numbers push out higher ones, which are needed later) and
//! [`DurableChannel::next_early`] feeds it back through the same checks once the gap before
//! it has filled. Over a broker queue (JetStream, MQTT persistent sessions) everything queued
//! behind a lost message arrives before its resend can, and without the stash each of those
//! would have to be resent too. Nothing in the stash is authenticated yet, so it changes no
//! key state and is never persisted: after a crash the sender's resends bring it back (it is
//! still in the sender's outbox, as nothing beyond the cumulative ack was acknowledged). A
//! forged payload can take a sequence number's place in the stash (the first copy stays); it
//! fails to open when its turn comes and is dropped, and the genuine record comes with the
//! sender's resend: a delay, never a loss or a forgery.
//!
//! # Flow control
//!
//! A receiver defers what it cannot take (beyond its reorder window of
//! [`InboxLimits::max_pending`] messages, or more than one epoch ahead), and deferred
//! records come back only with the sender's resends. So the sender keeps at most
//! [`DurableConfig::window`] records *in flight* — transmitted, not acknowledged end to end,
//! not in a hop's custody — before it transmits new ones ([`DurableChannel::poll_transmit`];
//! resends are never held back). Custody ([`DurableChannel::on_custody`]) takes a record out
//! of the count, so through a relay or a persistent queue the sender keeps filling the
//! mailbox while the peer is offline; [`DurableConfig::broker_custody`] does the same at the
//! first transmission, for carriers that queue without acknowledging each message.
//!
//! Fast retransmit: an end-to-end ack that frees nothing while the outbox holds the record
//! it names (the receiver is still waiting for it) makes the transmitted records
//! `[upto, upto + window)` due at once, at most once per `rto_initial_ms`
//! ([`DurableChannel::fast_retransmits`] counts them). A receiver should therefore answer
//! [`Received::Duplicate`] payloads with an ack too (after its pending commits), not only
//! [`Received::Data`], and [`Received::Deferred`] ones when something is missing below them
//! ([`DurableChannel::deferral_needs_ack`]): a receiver that is merely behind (everything
//! below the deferred record held or stashed) does not ask for records it already has.
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

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use crate::codec::Reader;
use crate::crypto::kdf32;
use crate::delivery::{Admission, DeliveryError, Inbox, InboxLimits, Outbox, OutboxLimits};
use crate::handshake::SessionOutcome;
use crate::record::{
    self, Aead, Opened, Opener, OpenerState, RatchetPolicy, RecordError, Sealer, SealerState,
    HEADER_LEN, MAX_PLAINTEXT, RECORD_OVERHEAD, TAG_LEN, TYPE_DATA,
};

/// First byte of every durable payload.
pub const PAYLOAD_TAG: u8 = 0x44;
/// Bytes before the record: tag and stream.
pub const PAYLOAD_PREFIX: usize = 2;
/// The data sub-channel ratchets every 2^this records.
pub const DATA_RATCHET_LOG2: u8 = 8;

/// KDF label of the data sub-channel's root key.
const LABEL_DATA: &[u8] = b"KEAV durable data";
/// KDF label of the control sub-channel's root key.
const LABEL_CONTROL: &[u8] = b"KEAV durable control";

/// The data sub-channel's ratchet: by count only.
const DATA_POLICY: RatchetPolicy = RatchetPolicy {
    every_records_log2: DATA_RATCHET_LOG2,
    every_ms: u64::MAX,
};
/// The control sub-channel never ratchets.
const CONTROL_POLICY: RatchetPolicy = RatchetPolicy {
    every_records_log2: 64,
    every_ms: u64::MAX,
};

/// Plaintext length of a control record (a u64 BE cumulative ack).
const ACK_LEN: usize = 8;
/// Exact length of a control payload.
const CONTROL_PAYLOAD_LEN: usize = PAYLOAD_PREFIX + RECORD_OVERHEAD + ACK_LEN;
/// The data sealer refuses (without closing) once the next record would need an epoch above
/// `u32::MAX`, so the channel's state stays exportable.
const DATA_SEQ_LIMIT: u64 = (u32::MAX as u64 + 1) << DATA_RATCHET_LOG2;

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
    /// Flow window: most records in flight (transmitted, not acknowledged end to end, not in
    /// custody) before [`DurableChannel::poll_transmit`] holds new ones back (see the module
    /// docs). Must be greater than 0. Records beyond the *peer's* reorder window (its
    /// `inbox.max_pending`, capped at 2^[`DATA_RATCHET_LOG2`]) wait unopened in the peer's
    /// early-arrival stash, so the window should stay well within the peer's
    /// `early_records`; records the peer can neither open nor stash come back only with
    /// resends.
    pub window: usize,
    /// When `true`, a record counts as covered (out of the flow window) as soon as it was
    /// transmitted once, as custody would make it: for brokers that queue for offline peers
    /// without a per-message acknowledgement (MQTT persistent sessions, QoS 1). The window
    /// then no longer limits the sender; only end-to-end acks and resends pace it.
    pub broker_custody: bool,
    /// Fast retransmit on an ack that frees nothing (see the module docs); `true` by default.
    pub fast_retransmit: bool,
    /// Early arrivals kept in memory (whole payloads, unopened) beyond the reorder window,
    /// at most this many records (see "Early arrivals" in the module docs); 0 turns the
    /// stash off.
    pub early_records: usize,
    /// ... and at most this many payload bytes.
    pub early_bytes: usize,
}

impl Default for DurableConfig {
    /// Outbox 1,000,000 records / 256 MiB, first resend after 2 s doubling up to 60 s; inbox
    /// 256 messages / 4 MiB; custody 10 minutes; window 1,024 records, no broker custody, fast
    /// retransmit on; early arrivals 131,072 records / 16 MiB.
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
            window: 1024,
            broker_custody: false,
            fast_retransmit: true,
            early_records: 1 << 17,
            early_bytes: 16 << 20,
        }
    }
}

impl DurableConfig {
    /// The inbox limits in force: `max_pending` capped at 2^[`DATA_RATCHET_LOG2`].
    fn inbox_limits(&self) -> InboxLimits {
        let cap = 1usize << DATA_RATCHET_LOG2;
        InboxLimits {
            max_pending: self.inbox.max_pending.min(cap),
            ..self.inbox
        }
    }

    /// An empty outbox continuing after `acked`, with the flow settings.
    fn outbox(&self, acked: u64) -> Result<Outbox, DurableError> {
        let mut outbox = Outbox::resume(self.outbox, acked)?;
        outbox.set_window(self.window)?;
        outbox.set_cover_on_send(self.broker_custody);
        Ok(outbox)
    }
}

/// What [`DurableChannel::receive`] did with a payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A new message was authenticated and taken into the inbox: persist `(seq, body)` and the
    /// state, then send an ack. `body` is a copy of what the inbox holds.
    Data {
        /// The message's sequence number.
        seq: u64,
        /// The message.
        body: Vec<u8>,
    },
    /// Already taken (or released): nothing to persist; answer with an ack (the sender
    /// evidently missed one).
    Duplicate {
        /// The record's sequence number.
        seq: u64,
    },
    /// Not taken now (beyond the reorder window, an epoch too far ahead, or no room): kept
    /// in the early-arrival stash if it has room, else the sender resends it later. Nothing
    /// to persist. Answer with an ack (after any pending commit) when
    /// [`DurableChannel::deferral_needs_ack`] says so, so the sender's fast retransmit sends
    /// what is missing.
    Deferred {
        /// The record's sequence number.
        seq: u64,
    },
    /// A valid end-to-end ack: persist the state and delete outbox rows below `upto`.
    /// `freed` records left the outbox.
    Ack {
        /// The peer's cumulative ack.
        upto: u64,
        /// Records this ack removed from the outbox.
        freed: usize,
    },
    /// A valid but stale or duplicated ack: nothing changed (nothing to persist).
    StaleAck,
}

/// Persisted key state of a durable channel (no message contents: the outbox and inbox rows
/// are stored separately). `Debug` shows counters only.
///
/// # Encoding (version 1)
///
/// ```text
/// "KVDS" | version 1 | 4 × (len u16 | part)
/// ```
///
/// The parts, in order: data sealer, data opener, control sealer, control opener, each in
/// its record-layer encoding ([`SealerState::encode`], [`OpenerState::encode`]). A part of
/// length 0 is absent (a closed sealer exports nothing); decoding refuses absent parts, parts
/// longer than [`MAX_PART_LEN`], trailing bytes, parts that do not decode, and parts that
/// disagree (AEAD, KDF context, ratchet policies, in-order openers).
#[derive(Clone, PartialEq, Eq)]
pub struct DurableState {
    data_sealer: Option<SealerState>,
    data_opener: Option<OpenerState>,
    control_sealer: Option<SealerState>,
    control_opener: Option<OpenerState>,
}

/// Longest part of an encoded [`DurableState`].
pub const MAX_PART_LEN: usize = 1024;
const STATE_MAGIC: &[u8; 4] = b"KVDS";
const STATE_VERSION: u8 = 1;

impl core::fmt::Debug for DurableState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableState")
            .field(
                "data_next_seq",
                &self.data_sealer.as_ref().map(|s| s.next_sequence()),
            )
            .field(
                "data_highest_received",
                &self.data_opener.as_ref().and_then(|o| o.highest_sequence()),
            )
            .field(
                "control_next_seq",
                &self.control_sealer.as_ref().map(|s| s.next_sequence()),
            )
            .field(
                "control_highest_received",
                &self
                    .control_opener
                    .as_ref()
                    .and_then(|o| o.highest_sequence()),
            )
            .finish_non_exhaustive()
    }
}

/// The four live parts of a state, checked.
struct Parts<'a> {
    data_sealer: &'a SealerState,
    data_opener: &'a OpenerState,
    control_sealer: &'a SealerState,
    control_opener: &'a OpenerState,
}

fn bad_state(_: crate::ParseError) -> DurableError {
    DurableError::BadState("truncated")
}

impl DurableState {
    /// Versioned encoding (zeroized on drop: it holds chain keys).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let parts: [Option<Zeroizing<Vec<u8>>>; 4] = [
            self.data_sealer.as_ref().map(SealerState::encode),
            self.data_opener.as_ref().map(OpenerState::encode),
            self.control_sealer.as_ref().map(SealerState::encode),
            self.control_opener.as_ref().map(OpenerState::encode),
        ];
        let total = 5 + parts
            .iter()
            .map(|p| 2 + p.as_ref().map_or(0, |p| p.len()))
            .sum::<usize>();
        // Sized up front so that no reallocation leaves a copy of a key behind.
        let mut out = Zeroizing::new(Vec::with_capacity(total));
        out.extend_from_slice(STATE_MAGIC);
        out.push(STATE_VERSION);
        for p in &parts {
            let bytes: &[u8] = p.as_ref().map_or(&[], |p| p.as_slice());
            // Parts are a few hundred bytes (the context is bounded); a longer one cannot
            // exist, and would be written truncated and refused by `decode`.
            let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes.get(..usize::from(len)).unwrap_or(bytes));
        }
        out
    }

    /// Parses and checks an encoding.
    pub fn decode(bytes: &[u8]) -> Result<DurableState, DurableError> {
        let mut r = Reader::new(bytes);
        if r.array::<4>().map_err(bad_state)? != *STATE_MAGIC {
            return Err(DurableError::BadState("magic"));
        }
        if r.u8().map_err(bad_state)? != STATE_VERSION {
            return Err(DurableError::BadState("version"));
        }
        let ds = read_part(&mut r)?;
        let dopen = read_part(&mut r)?;
        let cs = read_part(&mut r)?;
        let copen = read_part(&mut r)?;
        if r.remaining() != 0 {
            return Err(DurableError::BadState("trailing bytes"));
        }
        let state = DurableState {
            data_sealer: Some(SealerState::decode(ds).map_err(part_err("data sealer"))?),
            data_opener: Some(OpenerState::decode(dopen).map_err(part_err("data opener"))?),
            control_sealer: Some(SealerState::decode(cs).map_err(part_err("control sealer"))?),
            control_opener: Some(OpenerState::decode(copen).map_err(part_err("control opener"))?),
        };
        state.parts()?;
        Ok(state)
    }

    /// All four parts, checked for consistency.
    fn parts(&self) -> Result<Parts<'_>, DurableError> {
        let (Some(ds), Some(dopen), Some(cs), Some(copen)) = (
            self.data_sealer.as_ref(),
            self.data_opener.as_ref(),
            self.control_sealer.as_ref(),
            self.control_opener.as_ref(),
        ) else {
            return Err(DurableError::BadState("part missing"));
        };
        let aead = ds.aead();
        if dopen.aead() != aead || cs.aead() != aead || copen.aead() != aead {
            return Err(DurableError::BadState("parts disagree on the AEAD"));
        }
        if ds.policy() != DATA_POLICY {
            return Err(DurableError::BadState("data ratchet policy"));
        }
        if cs.policy() != CONTROL_POLICY {
            return Err(DurableError::BadState("control ratchet policy"));
        }
        if dopen.in_order() || copen.in_order() {
            return Err(DurableError::BadState("in-order opener"));
        }
        Ok(Parts {
            data_sealer: ds,
            data_opener: dopen,
            control_sealer: cs,
            control_opener: copen,
        })
    }
}

/// One length-prefixed part of an encoded [`DurableState`]: present and bounded.
fn read_part<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DurableError> {
    let len = usize::from(r.u16().map_err(bad_state)?);
    if len == 0 {
        return Err(DurableError::BadState("part missing"));
    }
    if len > MAX_PART_LEN {
        return Err(DurableError::BadState("part too long"));
    }
    r.take(len).map_err(bad_state)
}

fn part_err(which: &'static str) -> impl Fn(RecordError) -> DurableError {
    move |_| DurableError::BadState(which)
}

/// Reads a payload's header without keys (checks tag, stream, record type and minimum length).
pub fn parse_header(payload: &[u8]) -> Result<PayloadHeader, DurableError> {
    let mut r = Reader::new(payload);
    let malformed = |_| DurableError::Malformed("length");
    if r.u8().map_err(malformed)? != PAYLOAD_TAG {
        return Err(DurableError::Malformed("tag"));
    }
    let stream =
        Stream::from_byte(r.u8().map_err(malformed)?).ok_or(DurableError::Malformed("stream"))?;
    if r.u8().map_err(malformed)? != TYPE_DATA {
        return Err(DurableError::Malformed("record type"));
    }
    let epoch = r.u32().map_err(malformed)?;
    let seq = u64::from_be_bytes(r.array().map_err(malformed)?);
    if payload.len() < PAYLOAD_PREFIX + HEADER_LEN + TAG_LEN {
        return Err(DurableError::Malformed("length"));
    }
    Ok(PayloadHeader { stream, epoch, seq })
}

/// The record inside a payload whose header [`parse_header`] accepted.
fn record_of(payload: &[u8]) -> &[u8] {
    payload.get(PAYLOAD_PREFIX..).unwrap_or(&[])
}

/// One durable channel with one peer: both sub-channels, the outbox and the inbox.
///
/// `Debug` shows counters, never keys or messages.
pub struct DurableChannel {
    cfg: DurableConfig,
    data_sealer: Sealer,
    data_opener: Opener,
    /// Opens records of the epoch after the next message to release (module docs).
    lookahead: Option<Lookahead>,
    control_sealer: Sealer,
    control_opener: Opener,
    /// Whole data payloads, by sequence number.
    outbox: Outbox,
    inbox: Inbox,
    /// Fast retransmits made.
    fast_retransmits: u64,
    /// When the last fast retransmit was made.
    last_fast_ms: Option<u64>,
    /// Early arrivals: deferred data payloads, unopened, by sequence number (module docs).
    early: BTreeMap<u64, Vec<u8>>,
    /// Bytes held in `early`.
    early_bytes: usize,
    /// Every data sequence number below the larger of this and `inbox.ack()` is held,
    /// released or stashed: the stash's run that continues the inbox without a gap
    /// ([`DurableChannel::deferral_needs_ack`]). Not persisted (the stash is not).
    stash_run_end: u64,
}

/// What the cheap checks decided about a data record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataCheck {
    /// Already taken or released.
    Duplicate,
    /// Not now (beyond the reorder window, no room, or an epoch out of reach).
    Defer,
    /// Open with the data opener.
    Main,
    /// Open with the lookahead opener of a data opener at this epoch.
    Lookahead(u32),
}

/// A copy of the data opener, for records of the next epoch; never persisted.
struct Lookahead {
    /// The data opener's epoch when the copy was made (valid while it stays there).
    base_epoch: u32,
    opener: Opener,
}

impl core::fmt::Debug for DurableChannel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableChannel")
            .field("aead", &self.data_sealer.aead())
            .field("next_seq", &self.data_sealer.records_sent())
            .field("outbox_len", &self.outbox.len())
            .field("acked", &self.outbox.acked())
            .field("inbox_next", &self.inbox.next_expected())
            .field("inbox_ack", &self.inbox.ack())
            .field("inbox_pending", &self.inbox.pending())
            .field("in_flight", &self.outbox.in_flight())
            .field("lookahead", &self.lookahead.is_some())
            .field("early", &self.early.len())
            .finish_non_exhaustive()
    }
}

impl DurableChannel {
    /// The durable channel of a completed session (both sides derive the same keys; the role
    /// in `outcome` decides the directions). Nothing sent or received yet.
    pub fn new(
        outcome: &SessionOutcome,
        cfg: DurableConfig,
        now_ms: u64,
    ) -> Result<Self, DurableError> {
        let aead: Aead = outcome.channel_aead.ok_or(DurableError::NoChannel)?;
        let ctx = outcome.kdf_context.as_slice();
        let data_root = kdf32(outcome.exported_key.expose(), LABEL_DATA, ctx);
        let control_root = kdf32(outcome.exported_key.expose(), LABEL_CONTROL, ctx);
        let (data_sealer, data_opener) =
            record::channel_from_parts(&data_root, ctx, outcome.role, aead, DATA_POLICY, now_ms);
        let (control_sealer, control_opener) = record::channel_from_parts(
            &control_root,
            ctx,
            outcome.role,
            aead,
            CONTROL_POLICY,
            now_ms,
        );
        Ok(DurableChannel {
            outbox: cfg.outbox(0)?,
            inbox: Inbox::new(0, cfg.inbox_limits())?,
            cfg,
            data_sealer,
            data_opener,
            lookahead: None,
            control_sealer,
            control_opener,
            fast_retransmits: 0,
            last_fast_ms: None,
            early: BTreeMap::new(),
            early_bytes: 0,
            stash_run_end: 0,
        })
    }

    /// Rebuilds a channel from its persisted state, its outbox rows (any order; every one is
    /// due at once) and its inbox rows (sequence numbers at or above `delivered`, the
    /// application's acknowledged mark; they are released again in order).
    ///
    /// Refuses with [`DurableError::BadState`] what the persistence contract cannot produce:
    /// outbox rows that are not data payloads numbered as their row, repeated, with a gap, or
    /// not ending just below the data sealer's next sequence number (a missing row would
    /// never be resent); inbox rows or a `delivered` mark beyond the end of the epoch after
    /// the data opener's (records of that epoch may have been taken by the lookahead opener,
    /// which the persisted opener does not record), or the opener's highest record missing
    /// from the rows; rows the limits in `cfg` cannot hold. Limits [`Outbox::new`] or
    /// [`Inbox::new`] refuse (and a zero [`DurableConfig::window`]) are
    /// [`DurableError::Delivery`].
    pub fn restore(
        state: &DurableState,
        outbox: Vec<(u64, Vec<u8>)>,
        inbox: Vec<(u64, Vec<u8>)>,
        delivered: u64,
        cfg: DurableConfig,
        now_ms: u64,
    ) -> Result<Self, DurableError> {
        let parts = state.parts()?;
        let data_sealer =
            Sealer::from_state(parts.data_sealer, now_ms).map_err(part_err("data sealer"))?;
        let data_opener =
            Opener::from_state(parts.data_opener, now_ms).map_err(part_err("data opener"))?;
        let control_sealer =
            Sealer::from_state(parts.control_sealer, now_ms).map_err(part_err("control sealer"))?;
        let control_opener =
            Opener::from_state(parts.control_opener, now_ms).map_err(part_err("control opener"))?;

        let outbox = rebuild_outbox(outbox, data_sealer.records_sent(), &cfg, now_ms)?;
        let accepted_end = parts
            .data_opener
            .highest_sequence()
            .map_or(0, |h| h.saturating_add(1));
        // The end of the epoch after the opener's (epochs fit in u32, so no overflow).
        let lookahead_end = (u64::from(parts.data_opener.epoch()) + 2) << DATA_RATCHET_LOG2;
        let inbox = rebuild_inbox(
            inbox,
            delivered,
            accepted_end,
            lookahead_end,
            cfg.inbox_limits(),
        )?;

        Ok(DurableChannel {
            cfg,
            data_sealer,
            data_opener,
            lookahead: None,
            control_sealer,
            control_opener,
            outbox,
            inbox,
            fast_retransmits: 0,
            last_fast_ms: None,
            early: BTreeMap::new(),
            early_bytes: 0,
            stash_run_end: 0,
        })
    }

    /// The state to persist (see the persistence contract in the module docs).
    pub fn export(&self) -> DurableState {
        DurableState {
            data_sealer: self.data_sealer.export_state(),
            data_opener: self.data_opener.export_state(),
            control_sealer: self.control_sealer.export_state(),
            control_opener: self.control_opener.export_state(),
        }
    }

    /// Seals `body` (at most [`crate::record::MAX_PLAINTEXT`] bytes) as the next message and
    /// keeps it in the outbox. Returns its sequence number and the payload; persist both and
    /// the state before transmitting. A full outbox is [`DeliveryError::Full`] (nothing sealed).
    pub fn send(&mut self, body: &[u8], now_ms: u64) -> Result<(u64, Vec<u8>), DurableError> {
        if body.len() > MAX_PLAINTEXT {
            return Err(RecordError::TooLong.into());
        }
        let len = PAYLOAD_PREFIX + RECORD_OVERHEAD + body.len();
        if !self.outbox.has_room_for(len) {
            return Err(DeliveryError::Full.into());
        }
        let seq = self.data_sealer.records_sent();
        if seq >= DATA_SEQ_LIMIT {
            // Refused before the sealer would close itself: the channel stays exportable.
            return Err(RecordError::Exhausted.into());
        }
        let mut payload = Vec::with_capacity(len);
        payload.extend_from_slice(&[PAYLOAD_TAG, Stream::Data as u8]);
        self.data_sealer.seal(body, now_ms, &mut payload)?;
        self.outbox.push(seq, payload.clone(), now_ms)?;
        Ok((seq, payload))
    }

    /// Takes one payload from the carrier (cheap checks first, see the module docs).
    ///
    /// A failed receive changes nothing, with one exception: an authenticated ack above
    /// every message sent ([`DeliveryError::AckBeyondPushed`], only the peer's keys can make
    /// one) is refused after its control record was marked as seen.
    pub fn receive(&mut self, payload: &[u8], now_ms: u64) -> Result<Received, DurableError> {
        let h = parse_header(payload)?;
        match h.stream {
            Stream::Data => self.receive_data(h, payload, now_ms),
            Stream::Control => self.receive_control(payload, now_ms),
        }
    }

    /// The cheap checks of a data record (module docs): inbox admission, then the epoch rule.
    fn check_data(&self, h: &PayloadHeader) -> Result<DataCheck, DurableError> {
        match self.inbox.admit(h.seq) {
            Admission::Accept => {}
            Admission::Duplicate => return Ok(DataCheck::Duplicate),
            Admission::TooFarAhead | Admission::NoRoom => return Ok(DataCheck::Defer),
        }
        let main_epoch = self.data_opener.epoch().ok_or(RecordError::Closed)?;
        let release = self.inbox.next_expected() >> DATA_RATCHET_LOG2;
        let (t, m) = (u64::from(h.epoch), u64::from(main_epoch));
        Ok(if t == release || (t == m && m > release) {
            DataCheck::Main
        } else if m == release && t == release.saturating_add(1) {
            DataCheck::Lookahead(main_epoch)
        } else {
            DataCheck::Defer
        })
    }

    fn receive_data(
        &mut self,
        h: PayloadHeader,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Received, DurableError> {
        let seq = h.seq;
        // The inbox must take whatever the opener accepts: a body longer than it allows is
        // refused before opening (the opener would mark it as seen), and never stashed.
        let body_len = record_of(payload).len().saturating_sub(RECORD_OVERHEAD);
        let check = self.check_data(&h)?;
        if check != DataCheck::Duplicate && body_len > self.inbox.limits().max_payload {
            return Err(DeliveryError::PayloadTooLong.into());
        }
        let main_epoch = self.data_opener.epoch().ok_or(RecordError::Closed)?;
        let opener = match check {
            DataCheck::Duplicate => return Ok(Received::Duplicate { seq }),
            DataCheck::Defer => {
                self.stash(seq, payload);
                return Ok(Received::Deferred { seq });
            }
            DataCheck::Main => &mut self.data_opener,
            DataCheck::Lookahead(main_epoch) => self.lookahead(main_epoch, now_ms)?,
        };
        let mut rec = record_of(payload).to_vec();
        let body = match opener.open(&mut rec, now_ms)? {
            Opened::Data(body) => body.to_vec(),
            // Not reached: `parse_header` accepts data records only.
            Opened::Close => return Err(DurableError::Malformed("record type")),
        };
        if self.data_opener.epoch() != Some(main_epoch) {
            // The data opener moved on: the copy of its old epoch is stale.
            self.lookahead = None;
        }
        self.inbox.insert(seq, body.clone())?;
        Ok(Received::Data { seq, body })
    }

    /// Keeps a deferred data payload for when the gap before it fills (module docs, "Early
    /// arrivals"). The first copy of a sequence number stays; when full, the highest
    /// sequence numbers make room for lower ones.
    fn stash(&mut self, seq: u64, payload: &[u8]) {
        if self.early.contains_key(&seq) || payload.len() > self.cfg.early_bytes {
            return;
        }
        while self.early.len() >= self.cfg.early_records
            || self.early_bytes.saturating_add(payload.len()) > self.cfg.early_bytes
        {
            match self.early.last_key_value() {
                Some((&top, _)) if top > seq => {
                    if let Some((_, p)) = self.early.pop_last() {
                        self.early_bytes -= p.len();
                    }
                    self.stash_run_end = self.stash_run_end.min(top);
                }
                _ => return,
            }
        }
        self.early_bytes += payload.len();
        self.early.insert(seq, payload.to_vec());
        if seq == self.stash_run_end.max(self.inbox.ack()) {
            let mut end = seq.saturating_add(1);
            while self.early.contains_key(&end) {
                end = end.saturating_add(1);
            }
            self.stash_run_end = end;
        }
    }

    /// Whether a [`Received::Deferred`] `seq` should be answered with an ack: not when the
    /// record sits in the early-arrival stash with nothing missing below it (every lower
    /// sequence number held, released or stashed). The receiver is then only behind, not
    /// missing anything, and an ack that does not move would set off a fast retransmit of
    /// records it already holds; they are acknowledged once the stash feeds them in (or,
    /// if the receiver restarts and loses the stash, resent on the sender's timer). A
    /// deferral with a gap below it, or one the stash could not keep, should be answered,
    /// so the sender resends what is missing at once.
    pub fn deferral_needs_ack(&self, seq: u64) -> bool {
        !(self.early.contains_key(&seq) && seq < self.stash_run_end.max(self.inbox.ack()))
    }

    /// Whether [`DurableChannel::next_early`] has something to do now: the lowest early
    /// arrival passes the cheap checks (or is a duplicate to drop).
    pub fn early_ready(&self) -> bool {
        self.early.first_key_value().is_some_and(|(_, p)| {
            parse_header(p).map_or(true, |h| {
                !matches!(self.check_data(&h), Ok(DataCheck::Defer))
            })
        })
    }

    /// Takes the lowest early arrival if the inbox can take it now, as [`DurableChannel::receive`]
    /// would have: `Some(Ok(Received::Data { .. }))` (same persistence duty), or the error of
    /// a stashed payload that does not open (it is dropped: only an attacker makes one, and
    /// the sender still resends the genuine record). Duplicates are dropped silently. `None`
    /// when the stash is empty or its lowest record must still wait. Call it until `None`
    /// after every [`Received::Data`] and whenever the application popped messages.
    pub fn next_early(&mut self, now_ms: u64) -> Option<Result<Received, DurableError>> {
        loop {
            if !self.early_ready() {
                return None;
            }
            let (seq, payload) = self.early.pop_first()?;
            self.early_bytes -= payload.len();
            let h = match parse_header(&payload) {
                Ok(h) => h,
                Err(e) => {
                    // Dropped: `seq` is missing again.
                    self.stash_run_end = self.stash_run_end.min(seq);
                    return Some(Err(e));
                }
            };
            match self.receive_data(h, &payload, now_ms) {
                Ok(Received::Duplicate { .. }) => continue,
                Ok(Received::Deferred { .. }) => {
                    // Not reached (`early_ready` said it passes); keep it for later.
                    self.early_bytes += payload.len();
                    self.early.insert(seq, payload);
                    return None;
                }
                Err(e) => {
                    // Dropped (it does not open): `seq` is missing again.
                    self.stash_run_end = self.stash_run_end.min(seq);
                    return Some(Err(e));
                }
                other => return Some(other),
            }
        }
    }

    /// Early arrivals held (records, bytes).
    pub fn early_len(&self) -> (usize, usize) {
        (self.early.len(), self.early_bytes)
    }

    /// The lookahead opener for a data opener at `main_epoch` (made now if missing or
    /// stale).
    fn lookahead(&mut self, main_epoch: u32, now_ms: u64) -> Result<&mut Opener, DurableError> {
        if self
            .lookahead
            .as_ref()
            .is_some_and(|l| l.base_epoch != main_epoch)
        {
            self.lookahead = None;
        }
        let l = match self.lookahead.take() {
            Some(l) => l,
            None => {
                let state = self.data_opener.export_state().ok_or(RecordError::Closed)?;
                Lookahead {
                    base_epoch: main_epoch,
                    opener: Opener::from_state(&state, now_ms)?,
                }
            }
        };
        Ok(&mut self.lookahead.insert(l).opener)
    }

    fn receive_control(&mut self, payload: &[u8], now_ms: u64) -> Result<Received, DurableError> {
        if payload.len() != CONTROL_PAYLOAD_LEN {
            return Err(DurableError::Malformed("control length"));
        }
        let mut rec = record_of(payload).to_vec();
        let upto = match self.control_opener.open(&mut rec, now_ms)? {
            Opened::Data(pt) => {
                let ack: [u8; ACK_LEN] = pt
                    .try_into()
                    .map_err(|_| DurableError::Malformed("control length"))?;
                u64::from_be_bytes(ack)
            }
            Opened::Close => return Err(DurableError::Malformed("record type")),
        };
        match self.outbox.on_ack(upto) {
            Ok(freed) => {
                if freed == 0 {
                    self.fast_retransmit(upto, now_ms);
                }
                Ok(Received::Ack { upto, freed })
            }
            Err(DeliveryError::StaleAck) => Ok(Received::StaleAck),
            Err(e) => Err(e.into()),
        }
    }

    /// An ack that freed nothing: if the outbox holds `upto` and transmitted it, the
    /// receiver waits for it; resend the window from there now (rate-limited).
    fn fast_retransmit(&mut self, upto: u64, now_ms: u64) {
        if !self.cfg.fast_retransmit {
            return;
        }
        let gap = self.cfg.outbox.rto_initial_ms;
        if self
            .last_fast_ms
            .is_some_and(|t| now_ms < t.saturating_add(gap))
        {
            return;
        }
        if self.outbox.make_due_from(upto, self.cfg.window, now_ms) {
            self.fast_retransmits += 1;
            self.last_fast_ms = Some(now_ms);
        }
    }

    /// The next message for the application, in order (each released once per process; after
    /// a restore, messages not yet acknowledged by the application are released again).
    pub fn pop(&mut self) -> Option<(u64, Vec<u8>)> {
        self.inbox.pop()
    }

    /// Seals a control record carrying the inbox's cumulative ack. Persist the state before
    /// sending it.
    pub fn ack_payload(&mut self, now_ms: u64) -> Result<Vec<u8>, DurableError> {
        let mut payload = Vec::with_capacity(CONTROL_PAYLOAD_LEN);
        payload.extend_from_slice(&[PAYLOAD_TAG, Stream::Control as u8]);
        self.control_sealer
            .seal(&self.inbox.ack().to_be_bytes(), now_ms, &mut payload)?;
        Ok(payload)
    }

    /// The inbox's cumulative ack (every data sequence number below it is held or released).
    pub fn inbox_ack(&self) -> u64 {
        self.inbox.ack()
    }

    /// The next outbox payload due at `now_ms` (new ones first while fewer than
    /// [`DurableConfig::window`] records are in flight, then resends), with its sequence
    /// number.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<(u64, Vec<u8>)> {
        self.outbox
            .poll_transmit(now_ms)
            .map(|(seq, p)| (seq, p.to_vec()))
    }

    /// When [`DurableChannel::poll_transmit`] next has something (ms), `None` when the outbox is
    /// empty.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.outbox.poll_timeout()
    }

    /// A hop (relay, broker with a persistent queue) took custody of data record `seq`: its
    /// next resend moves to `now_ms + custody_ms`, and it no longer counts against the flow
    /// window. Unknown sequence numbers are ignored.
    pub fn on_custody(&mut self, seq: u64, now_ms: u64) {
        self.outbox
            .on_custody(seq, now_ms.saturating_add(self.cfg.custody_ms));
    }

    /// The peer needs data record `seq` next (a relay forwarded its `Need` frame,
    /// [`crate::route::Frame::Need`]): if the outbox holds it, it is resent by the next
    /// [`DurableChannel::poll_transmit`] at or after `now_ms`. Returns whether it is held.
    pub fn on_need(&mut self, seq: u64, now_ms: u64) -> bool {
        self.outbox.make_due(seq, now_ms)
    }

    /// Every unacknowledged outbox record becomes due at `now_ms` (call when the carrier
    /// reconnects or the peer is seen again).
    pub fn resend_all(&mut self, now_ms: u64) {
        self.outbox.resend_all(now_ms);
    }

    /// Records in the outbox (sent, not yet acknowledged end to end).
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Records in flight: transmitted, not acknowledged end to end, not in custody (at most
    /// [`DurableConfig::window`], unless a restore or custody changes brought more back).
    pub fn in_flight(&self) -> usize {
        self.outbox.in_flight()
    }

    /// Fast retransmits made so far (by this process; see the module docs).
    pub fn fast_retransmits(&self) -> u64 {
        self.fast_retransmits
    }

    /// Resends so far driven by the backoff timer or a custody delay (by this process), as
    /// opposed to fast retransmits, [`DurableChannel::on_need`] and
    /// [`DurableChannel::resend_all`].
    pub fn timer_resends(&self) -> u64 {
        self.outbox.timer_resends()
    }

    /// Highest end-to-end ack received (every message below it is in the peer's inbox).
    pub fn acked(&self) -> u64 {
        self.outbox.acked()
    }

    /// Sequence number the next `send` will use.
    pub fn next_seq(&self) -> u64 {
        self.data_sealer.records_sent()
    }

    /// Messages held in the inbox (received, not yet released by [`DurableChannel::pop`]).
    pub fn inbox_len(&self) -> usize {
        self.inbox.pending()
    }

    /// Sequence number of the next message [`DurableChannel::pop`] releases.
    pub fn next_to_release(&self) -> u64 {
        self.inbox.next_expected()
    }
}

/// The outbox of a restored channel: rows sorted, each a data payload numbered as its row,
/// no repeat, no gap, the last one just below the sealer's next sequence number.
fn rebuild_outbox(
    mut rows: Vec<(u64, Vec<u8>)>,
    next_seq: u64,
    cfg: &DurableConfig,
    now_ms: u64,
) -> Result<Outbox, DurableError> {
    rows.sort_unstable_by_key(|(seq, _)| *seq);
    // Acks delete rows from the front only: everything below the first row was acked.
    let floor = rows.first().map_or(next_seq, |(seq, _)| *seq);
    let mut outbox = cfg.outbox(floor)?;
    let mut expect = floor;
    for (seq, payload) in rows {
        if seq >= next_seq {
            return Err(DurableError::BadState(
                "outbox row at or above the next sequence number",
            ));
        }
        if seq != expect {
            return Err(DurableError::BadState(
                "outbox rows repeated or not contiguous",
            ));
        }
        match parse_header(&payload) {
            Ok(h) if h.stream == Stream::Data && h.seq == seq => {}
            _ => return Err(DurableError::BadState("outbox row is not its data payload")),
        }
        outbox.push(seq, payload, now_ms).map_err(|e| match e {
            DeliveryError::Full => DurableError::BadState("outbox rows exceed the limits"),
            _ => DurableError::BadState("outbox rows"),
        })?;
        expect = seq.saturating_add(1);
    }
    if expect != next_seq {
        return Err(DurableError::BadState(
            "outbox rows end below the next sequence number",
        ));
    }
    outbox.resend_all(now_ms);
    Ok(outbox)
}

/// The inbox of a restored channel: `delivered` and the rows at or above it must lie below
/// `lookahead_end` (the end of the epoch after the data opener's: records up to there may
/// have been taken by a lookahead opener, which the persisted opener does not record), and
/// the opener's highest record (one below `accepted_end`) must be among the rows unless the
/// application already acknowledged it.
fn rebuild_inbox(
    mut rows: Vec<(u64, Vec<u8>)>,
    delivered: u64,
    accepted_end: u64,
    lookahead_end: u64,
    limits: InboxLimits,
) -> Result<Inbox, DurableError> {
    if delivered > accepted_end.max(lookahead_end) {
        return Err(DurableError::BadState(
            "delivered mark above the records received",
        ));
    }
    let mut inbox = Inbox::new(delivered, limits)?;
    rows.retain(|(seq, _)| *seq >= delivered);
    rows.sort_unstable_by_key(|(seq, _)| *seq);
    if rows
        .iter()
        .any(|(seq, _)| *seq >= accepted_end.max(lookahead_end))
    {
        return Err(DurableError::BadState(
            "inbox row above the records received",
        ));
    }
    let highest = accepted_end.saturating_sub(1);
    if accepted_end > delivered
        && rows
            .binary_search_by_key(&highest, |(seq, _)| *seq)
            .is_err()
    {
        return Err(DurableError::BadState(
            "the last record received is missing from the inbox rows",
        ));
    }
    // Insert the rows above the first gap first, then the run up to it (each as the next
    // missing message), as `Inbox::decode_state` does: every reachable inbox replays so.
    let mut gap = delivered;
    for (seq, _) in &rows {
        if *seq != gap {
            break;
        }
        gap = gap.saturating_add(1);
    }
    let (run, early): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(s, _)| *s < gap);
    for (seq, body) in early.into_iter().chain(run) {
        inbox.insert(seq, body).map_err(|e| match e {
            DeliveryError::Duplicate => DurableError::BadState("inbox rows repeated"),
            DeliveryError::TooFarAhead => DurableError::BadState("inbox row beyond the window"),
            DeliveryError::NoRoom => DurableError::BadState("inbox rows exceed the byte bound"),
            DeliveryError::PayloadTooLong => DurableError::BadState("inbox row too long"),
            _ => DurableError::BadState("inbox rows"),
        })?;
    }
    Ok(inbox)
}
