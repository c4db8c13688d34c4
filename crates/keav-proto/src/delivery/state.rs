//! Persisted delivery state: the bytes a durable channel stores for its [`Inbox`] and its
//! [`Outbox`] (docs/MESSAGING.md, "Delivery"), in the same transaction as the opener or sealer
//! state.
//!
//! # Format (version 1)
//!
//! Every integer is a big-endian `u64`; lengths are explicit.
//!
//! * Inbox: `"KVIB"`, version byte `1`, `next_expected`, count, then per held message in
//!   strictly increasing sequence order: `seq`, payload length, payload.
//! * Outbox: `"KVOB"`, version byte `1`, `acked`, `next_seq_floor`, count, then per held
//!   record in strictly increasing sequence order: `seq`, record length, record.
//!
//! The limits are not stored: the caller passes them to `decode_state`, and a state that does
//! not fit them is refused. Resend timers are not stored either: after a restore every held
//! record counts as never sent, so [`Outbox::poll_transmit`] hands all of them out at once, in
//! order, and each record's backoff restarts at `rto_initial_ms`.
//!
//! Decoding never panics and refuses trailing bytes, truncations, an unknown magic or version
//! and any state the live object cannot reach, with [`DeliveryError::BadState`]. The checks
//! are the live objects' own: a decoded state is rebuilt by replaying [`Inbox::insert`] and
//! [`Outbox::push`], so a state is accepted exactly when those operations could have made it.

use super::{DeliveryError, Inbox, InboxLimits, Outbox, OutboxLimits};
use crate::codec::Reader;

const INBOX_MAGIC: &[u8; 4] = b"KVIB";
const OUTBOX_MAGIC: &[u8; 4] = b"KVOB";
const VERSION: u8 = 1;
/// Bytes of one entry besides its payload: sequence number and length.
const ENTRY_HEADER: usize = 16;

fn truncated(_: crate::ParseError) -> DeliveryError {
    DeliveryError::BadState("truncated")
}

fn read_u64(r: &mut Reader<'_>) -> Result<u64, DeliveryError> {
    Ok(u64::from_be_bytes(r.array().map_err(truncated)?))
}

fn read_header(r: &mut Reader<'_>, magic: &[u8; 4]) -> Result<(), DeliveryError> {
    if r.array::<4>().map_err(truncated)? != *magic {
        return Err(DeliveryError::BadState("magic"));
    }
    if r.u8().map_err(truncated)? != VERSION {
        return Err(DeliveryError::BadState("version"));
    }
    Ok(())
}

fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn write_len(out: &mut Vec<u8>, len: usize) {
    // usize is at most 64 bits on every supported target.
    write_u64(out, u64::try_from(len).unwrap_or(u64::MAX));
}

fn write_entries<'a>(
    out: &mut Vec<u8>,
    count: usize,
    entries: impl Iterator<Item = (u64, &'a [u8])>,
) {
    write_len(out, count);
    for (seq, bytes) in entries {
        write_u64(out, seq);
        write_len(out, bytes.len());
        out.extend_from_slice(bytes);
    }
}

/// Reads the count and the entries (each at most `max_len` bytes, in strictly increasing
/// sequence order, at most `max_count` of them) up to the end of the input.
fn read_entries<'a>(
    r: &mut Reader<'a>,
    max_count: usize,
    max_len: usize,
) -> Result<Vec<(u64, &'a [u8])>, DeliveryError> {
    let count = usize::try_from(read_u64(r)?).unwrap_or(usize::MAX);
    if count > max_count {
        return Err(DeliveryError::BadState("count above the limit"));
    }
    // Every entry takes at least ENTRY_HEADER bytes: this bounds the allocation by the input.
    if count > r.remaining() / ENTRY_HEADER {
        return Err(DeliveryError::BadState("truncated"));
    }
    let mut entries: Vec<(u64, &[u8])> = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = read_u64(r)?;
        if entries.last().is_some_and(|(prev, _)| *prev >= seq) {
            return Err(DeliveryError::BadState("sequence numbers not increasing"));
        }
        let len = usize::try_from(read_u64(r)?).unwrap_or(usize::MAX);
        if len > max_len {
            return Err(DeliveryError::BadState("entry too long"));
        }
        entries.push((seq, r.take(len).map_err(truncated)?));
    }
    if r.remaining() != 0 {
        return Err(DeliveryError::BadState("trailing bytes"));
    }
    Ok(entries)
}

impl Inbox {
    /// The versioned encoding of the inbox (next message to release and the held messages),
    /// to persist with the opener state before sending [`Inbox::ack`]. The limits are not
    /// part of it. Format: [`state`](self#format-version-1).
    pub fn encode_state(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(5 + 16 + self.pending_bytes + ENTRY_HEADER * self.pending.len());
        out.extend_from_slice(INBOX_MAGIC);
        out.push(VERSION);
        write_u64(&mut out, self.next_expected);
        write_entries(&mut out, self.pending.len(), self.pending_messages());
        out
    }

    /// Rebuilds an inbox from [`Inbox::encode_state`]'s bytes under `limits`. Refuses with
    /// [`DeliveryError::BadState`] malformed bytes and any state an inbox with these limits
    /// cannot hold (too many or too long messages, a message outside the reorder window, the
    /// byte bound or its reserve for the next missing message broken), and with
    /// [`DeliveryError::BadLimits`] limits [`Inbox::new`] refuses.
    pub fn decode_state(bytes: &[u8], limits: InboxLimits) -> Result<Inbox, DeliveryError> {
        let mut r = Reader::new(bytes);
        read_header(&mut r, INBOX_MAGIC)?;
        let next_expected = read_u64(&mut r)?;
        let mut inbox = Inbox::new(next_expected, limits)?;
        let entries = read_entries(&mut r, limits.max_pending, limits.max_payload)?;
        // Replay. The messages above the first gap all arrived while the gap was open, so
        // they went in under the reserve rule; the run from `next_expected` up to the gap can
        // go in after them, each as the next missing message. Every reachable state replays
        // this way, and whatever replays is reachable.
        let mut gap = next_expected;
        for (seq, _) in &entries {
            if *seq != gap {
                break;
            }
            gap = gap.saturating_add(1);
        }
        let (run, early): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(s, _)| *s < gap);
        for (seq, payload) in early.into_iter().chain(run) {
            inbox.insert(seq, payload.to_vec()).map_err(|e| match e {
                DeliveryError::Duplicate => DeliveryError::BadState("message already released"),
                DeliveryError::TooFarAhead => DeliveryError::BadState("message beyond the window"),
                DeliveryError::NoRoom => DeliveryError::BadState("byte bound or its reserve"),
                DeliveryError::PayloadTooLong => DeliveryError::BadState("entry too long"),
                _ => DeliveryError::BadState("inconsistent inbox"),
            })?;
        }
        Ok(inbox)
    }
}

impl Outbox {
    /// The versioned encoding of the outbox (acked floor, next sequence floor and the held
    /// records), to persist with the sealer state. Neither the limits nor the resend timers
    /// are part of it. Format: [`state`](self#format-version-1).
    pub fn encode_state(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + 24 + self.bytes + ENTRY_HEADER * self.entries.len());
        out.extend_from_slice(OUTBOX_MAGIC);
        out.push(VERSION);
        write_u64(&mut out, self.acked);
        write_u64(&mut out, self.end);
        write_entries(&mut out, self.entries.len(), self.records());
        out
    }

    /// Rebuilds an outbox from [`Outbox::encode_state`]'s bytes under `limits`. Resend timers
    /// are not persisted: every held record is due at `now_ms` as if never sent (so
    /// [`Outbox::poll_transmit`] returns them all at once, in order) and its backoff restarts.
    ///
    /// Refuses with [`DeliveryError::BadState`] malformed bytes and any state an outbox with
    /// these limits cannot reach (too many records or bytes, records below the acked floor or
    /// out of order, a next sequence floor not one above the last record — or equal to the
    /// acked floor when none is held), and with [`DeliveryError::BadLimits`] limits
    /// [`Outbox::new`] refuses.
    pub fn decode_state(
        bytes: &[u8],
        limits: OutboxLimits,
        now_ms: u64,
    ) -> Result<Outbox, DeliveryError> {
        let mut r = Reader::new(bytes);
        read_header(&mut r, OUTBOX_MAGIC)?;
        let acked = read_u64(&mut r)?;
        let end = read_u64(&mut r)?;
        let mut outbox = Outbox::new(limits)?;
        let entries = read_entries(&mut r, limits.max_records, limits.max_bytes)?;
        // Replay: as if everything below `acked` had been pushed and acknowledged, then the
        // held records pushed again.
        outbox.acked = acked;
        outbox.end = acked;
        for (seq, record) in entries {
            outbox
                .push(seq, record.to_vec(), now_ms)
                .map_err(|e| match e {
                    DeliveryError::NotIncreasing => {
                        DeliveryError::BadState("record below the acked floor")
                    }
                    DeliveryError::Full => DeliveryError::BadState("outbox bound"),
                    _ => DeliveryError::BadState("inconsistent outbox"),
                })?;
        }
        // Acks drop records from the front only, so the last record pushed is held until all
        // are acked: the floor is one above it, or the acked floor once nothing is held.
        if outbox.end != end {
            return Err(DeliveryError::BadState("next sequence floor"));
        }
        Ok(outbox)
    }
}
