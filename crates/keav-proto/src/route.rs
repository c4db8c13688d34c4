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
//! kind 6 Need     src id | dst id | stream u8 | seq u64
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
//!   `send` reports it; no route; hop limit; bad body). Reason 5, [`RefuseReason::Later`], is
//!   flow control, not a failure: the destination device cannot take the entry *now* (its
//!   reorder window, the epoch rule); the relay keeps it and pushes it again later, and stops
//!   pushing further entries of that queue until the device makes progress.
//! - **Attach**: first frame on a TCP connection to a relay.
//! - **Need**: "device `dst` needs entry (`src`, `dst`, `stream`, `seq`) next" (a negative
//!   acknowledgement: `seq` is the first message `dst` is missing). Sent by a device to its
//!   relay; the relay pushes that entry at once if it holds it, else it forwards the frame
//!   unchanged to `src`, whose outbox then resends that record at once.

use crate::codec::Reader;
use crate::durable::{parse_header, Stream};

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
    /// The hop cannot take this entry now (the destination's reorder window): keep it and
    /// push it again later. Flow control, not a failure.
    Later = 5,
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
        /// Hops left; each relay decrements it, and refuses a frame arriving with 0.
        hops: u8,
        /// Sending device.
        src: String,
        /// Destination device.
        dst: String,
        /// A durable payload (1..=[`MAX_BODY`] bytes).
        body: Vec<u8>,
    },
    /// Custody ack for entries `src` → `dst` of one stream.
    Stored {
        /// Sending device of the entries.
        src: String,
        /// Destination device of the entries.
        dst: String,
        /// Sub-channel ([`crate::durable::Stream`] as a byte).
        stream: u8,
        /// Sequence numbers committed (1..=[`MAX_KEYS`]).
        seqs: Vec<u64>,
    },
    /// The device is online and takes `window` frames at a time.
    Pull {
        /// Most unacknowledged Forward frames the device takes at a time.
        window: u32,
    },
    /// The hop did not take this entry.
    Refused {
        /// Why.
        reason: RefuseReason,
        /// The entry refused.
        key: EntryKey,
    },
    /// First frame on a TCP connection: who is connecting.
    Attach {
        /// The connecting device's or relay's id.
        id: String,
    },
    /// Device `dst` needs entry (`src`, `dst`, `stream`, `seq`) next (a negative ack).
    Need {
        /// Sending device of the entry.
        src: String,
        /// The device that needs it.
        dst: String,
        /// Sub-channel ([`crate::durable::Stream`] as a byte).
        stream: u8,
        /// Sequence number of the entry needed.
        seq: u64,
    },
}

const KIND_FORWARD: u8 = 1;
const KIND_STORED: u8 = 2;
const KIND_PULL: u8 = 3;
const KIND_REFUSED: u8 = 4;
const KIND_ATTACH: u8 = 5;
const KIND_NEED: u8 = 6;

impl RefuseReason {
    /// The reason byte's value.
    pub fn from_byte(b: u8) -> Option<RefuseReason> {
        match b {
            1 => Some(RefuseReason::MailboxFull),
            2 => Some(RefuseReason::NoRoute),
            3 => Some(RefuseReason::HopLimit),
            4 => Some(RefuseReason::BadBody),
            5 => Some(RefuseReason::Later),
            _ => None,
        }
    }
}

/// Writes an id. An id too long for its length byte is cut there (and a cut or otherwise
/// invalid id is refused by [`Frame::decode`]).
fn write_id(out: &mut Vec<u8>, id: &str) {
    let bytes = id.as_bytes();
    let len = u8::try_from(bytes.len()).unwrap_or(u8::MAX);
    out.push(len);
    out.extend_from_slice(bytes.get(..usize::from(len)).unwrap_or(bytes));
}

fn malformed(what: &'static str) -> impl Fn(crate::ParseError) -> RouteError {
    move |_| RouteError::Malformed(what)
}

fn read_id(r: &mut Reader<'_>) -> Result<String, RouteError> {
    let len = usize::from(r.u8().map_err(malformed("id length"))?);
    if !(1..=MAX_ID_LEN).contains(&len) {
        return Err(RouteError::Malformed("id length"));
    }
    let bytes = r.take(len).map_err(malformed("id"))?;
    match core::str::from_utf8(bytes) {
        Ok(id) if valid_id(id) => Ok(id.to_owned()),
        _ => Err(RouteError::Malformed("id")),
    }
}

fn read_u64(r: &mut Reader<'_>, what: &'static str) -> Result<u64, RouteError> {
    Ok(u64::from_be_bytes(r.array().map_err(malformed(what))?))
}

fn read_stream(r: &mut Reader<'_>) -> Result<u8, RouteError> {
    let b = r.u8().map_err(malformed("stream"))?;
    match Stream::from_byte(b) {
        Some(_) => Ok(b),
        None => Err(RouteError::Malformed("stream")),
    }
}

impl Frame {
    /// The wire encoding.
    ///
    /// A frame whose fields break the bounds (an invalid id, no sequence numbers or more
    /// than [`MAX_KEYS`], an empty or oversized body, an unknown stream byte) still encodes,
    /// to bytes [`Frame::decode`] refuses.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FRAME_TAG, VERSION];
        match self {
            Frame::Forward {
                hops,
                src,
                dst,
                body,
            } => {
                out.reserve(4 + src.len() + dst.len() + body.len());
                out.push(KIND_FORWARD);
                out.push(*hops);
                write_id(&mut out, src);
                write_id(&mut out, dst);
                out.extend_from_slice(body);
            }
            Frame::Stored {
                src,
                dst,
                stream,
                seqs,
            } => {
                out.push(KIND_STORED);
                write_id(&mut out, src);
                write_id(&mut out, dst);
                out.push(*stream);
                // More than u16::MAX numbers are cut at the count (decode refuses the count).
                let count = u16::try_from(seqs.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&count.to_be_bytes());
                for s in seqs.iter().take(usize::from(count)) {
                    out.extend_from_slice(&s.to_be_bytes());
                }
            }
            Frame::Pull { window } => {
                out.push(KIND_PULL);
                out.extend_from_slice(&window.to_be_bytes());
            }
            Frame::Refused { reason, key } => {
                out.push(KIND_REFUSED);
                out.push(*reason as u8);
                write_id(&mut out, &key.src);
                write_id(&mut out, &key.dst);
                out.push(key.stream);
                out.extend_from_slice(&key.seq.to_be_bytes());
            }
            Frame::Attach { id } => {
                out.push(KIND_ATTACH);
                write_id(&mut out, id);
            }
            Frame::Need {
                src,
                dst,
                stream,
                seq,
            } => {
                out.push(KIND_NEED);
                write_id(&mut out, src);
                write_id(&mut out, dst);
                out.push(*stream);
                out.extend_from_slice(&seq.to_be_bytes());
            }
        }
        out
    }

    /// Parses one frame (bounded: ids, counts and the body length are checked).
    pub fn decode(bytes: &[u8]) -> Result<Frame, RouteError> {
        let mut r = Reader::new(bytes);
        if r.u8().map_err(malformed("tag"))? != FRAME_TAG {
            return Err(RouteError::Malformed("tag"));
        }
        let version = r.u8().map_err(malformed("version"))?;
        if version != VERSION {
            return Err(RouteError::Version(version));
        }
        let frame = match r.u8().map_err(malformed("kind"))? {
            KIND_FORWARD => {
                let hops = r.u8().map_err(malformed("hops"))?;
                let src = read_id(&mut r)?;
                let dst = read_id(&mut r)?;
                let body = r.rest();
                if !(1..=MAX_BODY).contains(&body.len()) {
                    return Err(RouteError::Malformed("body length"));
                }
                Frame::Forward {
                    hops,
                    src,
                    dst,
                    body: body.to_vec(),
                }
            }
            KIND_STORED => {
                let src = read_id(&mut r)?;
                let dst = read_id(&mut r)?;
                let stream = read_stream(&mut r)?;
                let count = usize::from(r.u16().map_err(malformed("count"))?);
                if !(1..=MAX_KEYS).contains(&count) {
                    return Err(RouteError::Malformed("count"));
                }
                // The count is bounded, and checked against the input before allocating.
                if r.remaining() != count * 8 {
                    return Err(RouteError::Malformed("sequence numbers"));
                }
                let mut seqs = Vec::with_capacity(count);
                for _ in 0..count {
                    seqs.push(read_u64(&mut r, "sequence numbers")?);
                }
                Frame::Stored {
                    src,
                    dst,
                    stream,
                    seqs,
                }
            }
            KIND_PULL => Frame::Pull {
                window: r.u32().map_err(malformed("window"))?,
            },
            KIND_REFUSED => {
                let reason = RefuseReason::from_byte(r.u8().map_err(malformed("reason"))?)
                    .ok_or(RouteError::Malformed("reason"))?;
                let src = read_id(&mut r)?;
                let dst = read_id(&mut r)?;
                let stream = read_stream(&mut r)?;
                let seq = read_u64(&mut r, "seq")?;
                Frame::Refused {
                    reason,
                    key: EntryKey {
                        src,
                        dst,
                        stream,
                        seq,
                    },
                }
            }
            KIND_ATTACH => Frame::Attach {
                id: read_id(&mut r)?,
            },
            KIND_NEED => Frame::Need {
                src: read_id(&mut r)?,
                dst: read_id(&mut r)?,
                stream: read_stream(&mut r)?,
                seq: read_u64(&mut r, "seq")?,
            },
            _ => return Err(RouteError::Malformed("kind")),
        };
        if r.remaining() != 0 {
            return Err(RouteError::Malformed("trailing bytes"));
        }
        Ok(frame)
    }

    /// For a Forward frame: the entry key of its body (reads the durable payload header).
    /// `None` for other frames and for a body that is not a durable payload.
    pub fn entry_key(&self) -> Option<EntryKey> {
        let Frame::Forward { src, dst, body, .. } = self else {
            return None;
        };
        let h = parse_header(body).ok()?;
        Some(EntryKey {
            src: src.clone(),
            dst: dst.clone(),
            stream: h.stream as u8,
            seq: h.seq,
        })
    }
}
