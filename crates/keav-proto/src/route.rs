//! Relay frames (docs/MESSAGING.md, "Relays and mailboxes"): how devices and `keav relay`
//! services hand durable payloads along a route and acknowledge custody, on any carrier
//! (MQTT, NATS, TCP). Sans-IO: one codec pair, bounded parsing, round-trip tested.
//!
//! A relay never holds a session key. It reads only the frame and the durable payload's
//! header ([`crate::durable::parse_header`]), which it uses as the entry's identity
//! ([`EntryKey`]): to drop duplicates and to name entries in custody acks.
//!
//! # Wire format (all integers big-endian)
//!
//! ```text
//! 0x52 'R' | version 1 | kind | fields
//!
//! kind 1 Forward  hops u8 | src id | dst id | body (rest; a durable payload)
//! kind 2 Stored   src id | dst id | stream u8 | count u16 (1..=MAX_KEYS) | seq u64 × count
//! kind 3 Pull     window u32
//! kind 4 Refused  reason u8 | src id | dst id | stream u8 | seq u64
//! kind 5 Attach   id                     (TCP only: names the connecting device or relay)
//!
//! id = len u8 (1..=64) | bytes of [A-Za-z0-9_-]
//! ```
//!
//! - **Forward**: "deliver `body` from `src` to `dst`". Sent by a device to its relay, by a
//!   relay to the next relay, and by the last relay to the destination device. `hops` is
//!   decremented by each relay; a frame arriving with 0 hops is refused
//!   ([`RefuseReason::HopLimit`]), so a routing loop ends.
//! - **Stored**: custody ack from the receiving hop: the listed entries (all from `src` to
//!   `dst`, one stream) are committed there (a relay's mailbox, or the destination's inbox).
//!   The previous hop may delete them (relay) or stop resending them soon (device outbox).
//! - **Pull**: a device tells its relay it is online and takes up to `window` unacknowledged
//!   Forward frames at a time.
//! - **Refused**: the hop did not take the entry, and why (mailbox full: the sender's
//!   `send` reports it; no route; hop limit).
//! - **Attach**: first frame on a TCP connection to a relay.

/// First byte of every relay frame.
pub const FRAME_TAG: u8 = 0x52;
/// The version this crate speaks.
pub const VERSION: u8 = 1;
/// Hops a new Forward frame starts with.
pub const DEFAULT_HOPS: u8 = 8;
/// Most sequence numbers in one Stored frame.
pub const MAX_KEYS: usize = 1024;
/// Longest id.
pub const MAX_ID_LEN: usize = 64;
/// Longest Forward body (a durable payload: one record plus two bytes, with margin).
pub const MAX_BODY: usize = 64 * 1024;

/// Why a frame could not be parsed.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Malformed frame (the reason names the field).
    #[error("malformed relay frame: {0}")]
    Malformed(&'static str),
    /// A version this implementation does not speak.
    #[error("unsupported relay frame version {0}")]
    Version(u8),
}

/// Whether `id` is a valid device or relay id: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a hop refused an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseReason {
    /// The destination's mailbox is at its bound (entries or bytes).
    MailboxFull = 1,
    /// The hop has no route to the destination.
    NoRoute = 2,
    /// The frame's hop count ran out (a routing loop, or a route too long).
    HopLimit = 3,
    /// The body is not a durable payload.
    BadBody = 4,
}

/// The identity of a mailbox entry: who sent what to whom.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    /// Sending device.
    pub src: String,
    /// Destination device.
    pub dst: String,
    /// Sub-channel ([`crate::durable::Stream`] as a byte).
    pub stream: u8,
    /// Sequence number in that sub-channel.
    pub seq: u64,
}

/// One relay frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Deliver `body` from `src` to `dst`.
    Forward {
        hops: u8,
        src: String,
        dst: String,
        body: Vec<u8>,
    },
    /// Custody ack for entries `src` → `dst` of one stream.
    Stored {
        src: String,
        dst: String,
        stream: u8,
        seqs: Vec<u64>,
    },
    /// The device is online and takes `window` frames at a time.
    Pull { window: u32 },
    /// The hop did not take this entry.
    Refused {
        reason: RefuseReason,
        key: EntryKey,
    },
    /// First frame on a TCP connection: who is connecting.
    Attach { id: String },
}

impl Frame {
    /// The wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        todo!()
    }

    /// Parses one frame (bounded: ids, counts and the body length are checked).
    pub fn decode(_bytes: &[u8]) -> Result<Frame, RouteError> {
        todo!()
    }

    /// For a Forward frame: the entry key of its body (reads the durable payload header).
    pub fn entry_key(&self) -> Option<EntryKey> {
        todo!()
    }
}
