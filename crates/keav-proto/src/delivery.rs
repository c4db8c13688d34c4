//! Exactly-once, in-order delivery over a lossy carrier (docs/MESSAGING.md, "Delivery").
//!
//! Pure logic, sans-IO: no clock (`now_ms` is passed in), no storage. The caller persists
//! both sides with [`Inbox::encode_state`] / [`Inbox::decode_state`] and
//! [`Outbox::encode_state`] / [`Outbox::decode_state`] (format in [`state`]).
//!
//! * [`Inbox`] (receiver): a bounded reorder buffer. [`Inbox::admit`] is the *cheap check*
//!   made before a record is opened (a record the opener authenticates is marked as seen, so
//!   the inbox must never refuse it afterwards); [`Inbox::insert`] stores an authenticated
//!   payload, [`Inbox::pop`] releases messages in sequence order, [`Inbox::ack`] is the
//!   cumulative end-to-end ack to send back.
//! * [`Outbox`] (sender): a bounded store of sealed records kept until an end-to-end ack
//!   covers them, resent with exponential backoff. When full it rejects new records and never
//!   drops old ones.
//!
//! Both are bounded in records and bytes, and refuse bad input with a [`DeliveryError`]
//! rather than panicking.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub mod state;

/// Why a delivery operation was refused. Nothing is changed when one is returned.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The limits cannot work (the reason names the field).
    #[error("bad delivery limits: {0}")]
    BadLimits(&'static str),
    /// Inbox: the sequence number was already released or is already buffered.
    #[error("duplicate message")]
    Duplicate,
    /// Inbox: the sequence number is beyond the reorder window (the sender will resend).
    #[error("message too far ahead of the reorder window")]
    TooFarAhead,
    /// Inbox: the reorder buffer's byte bound has no room (the sender will resend).
    #[error("inbox byte bound reached")]
    NoRoom,
    /// Inbox: the payload is longer than [`InboxLimits::max_payload`].
    #[error("payload longer than the inbox allows")]
    PayloadTooLong,
    /// Outbox: the record or byte bound is reached (new records are rejected, old ones kept).
    #[error("outbox full")]
    Full,
    /// Outbox: sequence numbers must be strictly increasing.
    #[error("sequence number not above the last one pushed")]
    NotIncreasing,
    /// Outbox: the ack is older than one already applied (reordered or replayed).
    #[error("stale ack")]
    StaleAck,
    /// Outbox: the ack covers sequence numbers that were never pushed (forged or confused).
    #[error("ack beyond the records pushed")]
    AckBeyondPushed,
    /// Persisted state: malformed bytes or a state the limits or the live object refuse (the
    /// reason names what is wrong).
    #[error("bad delivery state: {0}")]
    BadState(&'static str),
}

/// Bounds of an [`Inbox`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxLimits {
    /// Reorder window: sequence numbers from the next one to release up to (excluded)
    /// `next_expected + max_pending` are accepted; so at most this many messages are held.
    pub max_pending: usize,
    /// Bound on the payload bytes held (released messages no longer count).
    pub max_pending_bytes: usize,
    /// Longest payload accepted (for example [`crate::record::MAX_PLAINTEXT`]). The inbox
    /// keeps room for one such payload for the next missing message, so a buffer filled by
    /// early messages can never block the one the application is waiting for.
    pub max_payload: usize,
}

impl InboxLimits {
    /// Limits with `max_payload` = [`crate::record::MAX_PLAINTEXT`].
    pub fn new(max_pending: usize, max_pending_bytes: usize) -> Self {
        Self {
            max_pending,
            max_pending_bytes,
            max_payload: crate::record::MAX_PLAINTEXT,
        }
    }
}

/// Answer of the cheap check [`Inbox::admit`], made before a record is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Open the record; [`Inbox::insert`] will take its payload (up to `max_payload` bytes).
    Accept,
    /// Already released or buffered: drop without opening.
    Duplicate,
    /// Beyond the reorder window: drop uncommitted, the sender will resend.
    TooFarAhead,
    /// Within the window but the byte bound has no room now: drop uncommitted, the sender
    /// will resend (room comes back as the application pops messages).
    NoRoom,
}

/// Receiver side: a bounded reorder buffer releasing messages exactly once, in order.
///
/// `Debug` shows positions and counts, never the (decrypted) messages it holds.
#[derive(Clone)]
pub struct Inbox {
    limits: InboxLimits,
    /// Next sequence number [`Inbox::pop`] will release; everything below was released.
    next_expected: u64,
    /// Lowest sequence number at or above `next_expected` that is not buffered.
    contiguous: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
}

impl core::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Inbox")
            .field("limits", &self.limits)
            .field("next_expected", &self.next_expected)
            .field("contiguous", &self.contiguous)
            .field("pending_messages", &self.pending.len())
            .field("pending_bytes", &self.pending_bytes)
            .finish()
    }
}

impl Inbox {
    /// An empty inbox whose next message to release is `next_expected`.
    ///
    /// Refuses limits with `max_pending == 0`, `max_payload == 0` or
    /// `max_pending_bytes < max_payload` (no message could ever be taken).
    pub fn new(next_expected: u64, limits: InboxLimits) -> Result<Self, DeliveryError> {
        if limits.max_pending == 0 {
            return Err(DeliveryError::BadLimits("max_pending"));
        }
        if limits.max_payload == 0 {
            return Err(DeliveryError::BadLimits("max_payload"));
        }
        if limits.max_pending_bytes < limits.max_payload {
            return Err(DeliveryError::BadLimits("max_pending_bytes"));
        }
        Ok(Self {
            limits,
            next_expected,
            contiguous: next_expected,
            pending: BTreeMap::new(),
            pending_bytes: 0,
        })
    }

    /// The limits this inbox enforces.
    pub fn limits(&self) -> InboxLimits {
        self.limits
    }

    /// Next sequence number to release; every number below it was released by [`Inbox::pop`].
    pub fn next_expected(&self) -> u64 {
        self.next_expected
    }

    /// The cumulative end-to-end ack: every sequence number below it is held by the inbox
    /// or was released (docs/MESSAGING.md: "the highest contiguous sequence number committed
    /// to the inbox"). Only send it once the caller has persisted the inbox.
    pub fn ack(&self) -> u64 {
        self.contiguous
    }

    /// Number of messages held (buffered or ready, not yet popped).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Payload bytes held.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// The held messages in sequence order (for persisting them).
    pub fn pending_messages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pending.iter().map(|(s, p)| (*s, p.as_slice()))
    }

    /// Exclusive end of the reorder window.
    fn window_end(&self) -> u64 {
        let max = u64::try_from(self.limits.max_pending).unwrap_or(u64::MAX);
        self.next_expected.saturating_add(max)
    }

    /// Bytes that must stay free after taking `seq`: room for one payload of the next
    /// missing message, unless `seq` is that message.
    fn reserve_for(&self, seq: u64) -> usize {
        if seq == self.contiguous {
            0
        } else {
            self.limits.max_payload
        }
    }

    /// Whether `len` more payload bytes for `seq` fit in the byte bound.
    fn fits(&self, seq: u64, len: usize) -> bool {
        self.pending_bytes
            .checked_add(len)
            .and_then(|n| n.checked_add(self.reserve_for(seq)))
            .is_some_and(|n| n <= self.limits.max_pending_bytes)
    }

    /// The cheap check made before opening the record numbered `seq`. If it says
    /// [`Admission::Accept`], an [`Inbox::insert`] of `seq` with a payload of at most
    /// `max_payload` bytes made before any other change succeeds.
    pub fn admit(&self, seq: u64) -> Admission {
        if seq < self.next_expected || self.pending.contains_key(&seq) {
            Admission::Duplicate
        } else if seq >= self.window_end() {
            Admission::TooFarAhead
        } else if !self.fits(seq, self.limits.max_payload) {
            Admission::NoRoom
        } else {
            Admission::Accept
        }
    }

    /// Stores the authenticated payload of message `seq`. Refuses what [`Inbox::admit`]
    /// would refuse (checking the actual payload length), and changes nothing then.
    pub fn insert(&mut self, seq: u64, payload: Vec<u8>) -> Result<(), DeliveryError> {
        if payload.len() > self.limits.max_payload {
            return Err(DeliveryError::PayloadTooLong);
        }
        if seq < self.next_expected || self.pending.contains_key(&seq) {
            return Err(DeliveryError::Duplicate);
        }
        if seq >= self.window_end() {
            return Err(DeliveryError::TooFarAhead);
        }
        if !self.fits(seq, payload.len()) {
            return Err(DeliveryError::NoRoom);
        }
        self.pending_bytes += payload.len();
        self.pending.insert(seq, payload);
        while self.pending.contains_key(&self.contiguous) {
            // `contiguous` < window end <= u64::MAX, so this cannot overflow.
            self.contiguous = self.contiguous.saturating_add(1);
        }
        Ok(())
    }

    /// Releases the next message in sequence order, if it has arrived.
    pub fn pop(&mut self) -> Option<(u64, Vec<u8>)> {
        let seq = self.next_expected;
        let payload = self.pending.remove(&seq)?;
        self.pending_bytes -= payload.len();
        self.next_expected = seq.saturating_add(1);
        Some((seq, payload))
    }
}

/// Bounds and resend timing of an [`Outbox`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most records held.
    pub max_records: usize,
    /// Most record bytes held.
    pub max_bytes: usize,
    /// Delay before the first resend of a record, in milliseconds.
    pub rto_initial_ms: u64,
    /// Cap of the resend delay, which doubles after each resend.
    pub rto_max_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    record: Vec<u8>,
    /// When the record is due (first send: the push time; then the resend time).
    due_ms: u64,
    /// Delay used for the next resend.
    rto_ms: u64,
    /// Transmitted at least once (or a hop took custody of it): in `due`, not in `unsent`.
    sent: bool,
    /// Covered without an end-to-end ack: a hop took custody of it, or it was transmitted
    /// while first transmissions count as custody ([`Outbox::set_cover_on_send`]).
    covered: bool,
    /// The current due time was brought forward ([`Outbox::make_due`],
    /// [`Outbox::make_due_from`], [`Outbox::resend_all`]) rather than set by the backoff.
    expedited: bool,
}

/// Sender side: keeps sealed records until an end-to-end ack covers them, resending with
/// exponential backoff.
///
/// Every operation on one record costs O(log n) in the number of records held (durable
/// outboxes hold up to a million): the records are kept in sequence order and indexed by due
/// time. Only [`Outbox::resend_all`] touches every record.
///
/// # Flow window
///
/// A record is *in flight* when it was transmitted, is not acknowledged end to end and is not
/// *covered* (no hop took custody of it, [`Outbox::on_custody`]; with
/// [`Outbox::set_cover_on_send`] a first transmission covers it at once).
/// [`Outbox::poll_transmit`] hands out a never-sent record only while fewer than the window
/// ([`Outbox::set_window`], unlimited by default) are in flight; resends are not limited. The
/// count ([`Outbox::in_flight`]) is kept up to date by every operation, in O(1) per record.
#[derive(Clone)]
pub struct Outbox {
    limits: OutboxLimits,
    /// In strictly increasing sequence order.
    entries: VecDeque<Entry>,
    /// Sequence numbers of the held records never transmitted (they go out first, in order).
    unsent: BTreeSet<u64>,
    /// `(due_ms, seq)` of every held record never transmitted (its push time, or as moved by
    /// [`Outbox::make_due`] and [`Outbox::resend_all`]).
    unsent_due: BTreeSet<(u64, u64)>,
    /// `(due_ms, seq)` of every held record transmitted at least once (its resend time).
    due: BTreeSet<(u64, u64)>,
    bytes: usize,
    /// Highest cumulative ack applied.
    acked: u64,
    /// One above the last sequence number pushed (0 before any push).
    end: u64,
    /// Held records that are sent and not covered.
    in_flight: usize,
    /// Most records in flight before new ones wait.
    window: usize,
    /// A first transmission covers the record (brokers that queue for offline peers).
    cover_on_send: bool,
    /// Resends whose due time came from the backoff or a custody delay.
    timer_resends: u64,
}

impl core::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Outbox")
            .field("limits", &self.limits)
            .field("records", &self.entries.len())
            .field("unsent", &self.unsent.len())
            .field("in_flight", &self.in_flight)
            .field("window", &self.window)
            .field("bytes", &self.bytes)
            .field("acked", &self.acked)
            .field("end", &self.end)
            .finish()
    }
}

impl Outbox {
    /// An empty outbox. Refuses zero bounds, `rto_initial_ms == 0` and
    /// `rto_max_ms < rto_initial_ms`.
    pub fn new(limits: OutboxLimits) -> Result<Self, DeliveryError> {
        if limits.max_records == 0 {
            return Err(DeliveryError::BadLimits("max_records"));
        }
        if limits.max_bytes == 0 {
            return Err(DeliveryError::BadLimits("max_bytes"));
        }
        if limits.rto_initial_ms == 0 {
            return Err(DeliveryError::BadLimits("rto_initial_ms"));
        }
        if limits.rto_max_ms < limits.rto_initial_ms {
            return Err(DeliveryError::BadLimits("rto_max_ms"));
        }
        Ok(Self {
            limits,
            entries: VecDeque::new(),
            unsent: BTreeSet::new(),
            unsent_due: BTreeSet::new(),
            due: BTreeSet::new(),
            bytes: 0,
            acked: 0,
            end: 0,
            in_flight: 0,
            window: usize::MAX,
            cover_on_send: false,
            timer_resends: 0,
        })
    }

    /// An empty outbox continuing a stream whose records below `acked` were all pushed and
    /// acknowledged (as if by [`Outbox::push`] and [`Outbox::on_ack`]): the next push must be
    /// numbered `acked` or above, and acks up to `acked` are accepted (as stale or empty).
    /// For rebuilding an outbox from stored rows. Refuses the limits [`Outbox::new`] refuses.
    pub fn resume(limits: OutboxLimits, acked: u64) -> Result<Self, DeliveryError> {
        let mut ob = Outbox::new(limits)?;
        ob.acked = acked;
        ob.end = acked;
        Ok(ob)
    }

    /// The limits this outbox enforces.
    pub fn limits(&self) -> OutboxLimits {
        self.limits
    }

    /// Sets the flow window: [`Outbox::poll_transmit`] hands out a never-sent record only
    /// while fewer than `window` records are in flight (see the type's docs). Refuses 0
    /// ([`DeliveryError::BadLimits`]): nothing new would ever leave.
    pub fn set_window(&mut self, window: usize) -> Result<(), DeliveryError> {
        if window == 0 {
            return Err(DeliveryError::BadLimits("window"));
        }
        self.window = window;
        Ok(())
    }

    /// The flow window (`usize::MAX` unless set).
    pub fn window(&self) -> usize {
        self.window
    }

    /// When `on`, a record's first transmission covers it as custody would (for carriers
    /// that queue for an offline peer without acknowledging each message): from then on it
    /// no longer counts against the window. Records transmitted before keep their state.
    pub fn set_cover_on_send(&mut self, on: bool) {
        self.cover_on_send = on;
    }

    /// Records transmitted, not acknowledged end to end and not covered by custody.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Resends so far whose due time came from the backoff or a custody delay (not from
    /// [`Outbox::make_due`], [`Outbox::make_due_from`] or [`Outbox::resend_all`]).
    pub fn timer_resends(&self) -> u64 {
        self.timer_resends
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Highest cumulative ack applied so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// One above the last sequence number pushed (0 before any push).
    pub fn next_seq_floor(&self) -> u64 {
        self.end
    }

    /// The held records in sequence order (for persisting them).
    pub fn records(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.entries.iter().map(|e| (e.seq, e.record.as_slice()))
    }

    /// Whether a record of `len` bytes fits now (the check [`Outbox::push`] makes besides
    /// the sequence number): lets a sender refuse before it seals anything.
    pub fn has_room_for(&self, len: usize) -> bool {
        self.entries.len() < self.limits.max_records
            && self
                .bytes
                .checked_add(len)
                .is_some_and(|b| b <= self.limits.max_bytes)
    }

    /// Stores `record` (sequence number `seq`, strictly above the previous one) to be sent
    /// from `now_ms` on. A full outbox returns [`DeliveryError::Full`] and keeps what it has.
    pub fn push(&mut self, seq: u64, record: Vec<u8>, now_ms: u64) -> Result<(), DeliveryError> {
        // `u64::MAX` is never a record's sequence number (the record layer refuses to seal
        // it), and accepting it would leave no room above it: refused like a repeat.
        if seq < self.end || seq < self.acked || seq == u64::MAX {
            return Err(DeliveryError::NotIncreasing);
        }
        if !self.has_room_for(record.len()) {
            return Err(DeliveryError::Full);
        }
        self.bytes += record.len();
        self.entries.push_back(Entry {
            seq,
            record,
            due_ms: now_ms,
            rto_ms: self.limits.rto_initial_ms,
            sent: false,
            covered: false,
            expedited: false,
        });
        self.unsent.insert(seq);
        self.unsent_due.insert((now_ms, seq));
        self.end = seq.saturating_add(1);
        Ok(())
    }

    /// Position of record `seq` in `entries` (binary search).
    fn index_of(&self, seq: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&seq, |e| e.seq).ok()
    }

    /// Moves record `idx`'s due time to `due_ms`, keeping the index in step.
    fn set_due(&mut self, idx: usize, due_ms: u64) {
        if let Some(e) = self.entries.get_mut(idx) {
            let index = if e.sent {
                &mut self.due
            } else {
                &mut self.unsent_due
            };
            index.remove(&(e.due_ms, e.seq));
            e.due_ms = due_ms;
            index.insert((due_ms, e.seq));
        }
    }

    /// Record `idx` leaves the never-sent records (transmitted, or a hop holds it).
    fn mark_sent(&mut self, idx: usize) {
        if let Some(e) = self.entries.get_mut(idx) {
            if e.sent {
                return;
            }
            self.unsent.remove(&e.seq);
            self.unsent_due.remove(&(e.due_ms, e.seq));
            self.due.insert((e.due_ms, e.seq));
            e.sent = true;
            if !e.covered {
                self.in_flight += 1;
            }
        }
    }

    /// Whether [`Outbox::poll_transmit`] may hand out a never-sent record now.
    fn may_send_new(&self) -> bool {
        self.in_flight < self.window
    }

    /// The next record to put on the carrier at `now_ms`: never-sent records first (in
    /// order) while the flow window allows, then the record whose resend time passed
    /// earliest. Each resend doubles the record's delay, up to `rto_max_ms`.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<(u64, &[u8])> {
        let fresh = if self.may_send_new() {
            self.unsent.first().copied()
        } else {
            None
        };
        let seq = match fresh {
            Some(seq) => seq,
            None => {
                let &(due, seq) = self.due.first()?;
                if due > now_ms {
                    return None;
                }
                seq
            }
        };
        let idx = self.index_of(seq)?;
        if fresh.is_some() {
            if self.cover_on_send {
                if let Some(e) = self.entries.get_mut(idx) {
                    e.covered = true;
                }
            }
            self.mark_sent(idx);
        } else if self.entries.get(idx).is_some_and(|e| !e.expedited) {
            self.timer_resends += 1;
        }
        let rto = self.entries.get(idx)?.rto_ms;
        self.set_due(idx, now_ms.saturating_add(rto));
        let max = self.limits.rto_max_ms;
        let e = self.entries.get_mut(idx)?;
        e.expedited = false;
        e.rto_ms = e.rto_ms.saturating_mul(2).min(max);
        Some((e.seq, e.record.as_slice()))
    }

    /// Earliest time at which [`Outbox::poll_transmit`] has something to send (a never-sent
    /// record is due from its push time, if the flow window lets it go), or `None` when
    /// nothing is held.
    pub fn poll_timeout(&self) -> Option<u64> {
        let resend = self.due.first().map(|&(due, _)| due);
        let fresh = if self.may_send_new() {
            self.unsent_due.first().map(|&(due, _)| due)
        } else {
            None
        };
        match (resend, fresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A hop took custody of record `seq` (it holds it and will deliver it): its next resend
    /// moves to `until_ms` if that is later than it was due, and it no longer counts against
    /// the flow window. A record never sent by this outbox (after a restore) now counts as
    /// sent, since the hop holds it. Unknown sequence numbers (acknowledged or never pushed)
    /// are ignored.
    pub fn on_custody(&mut self, seq: u64, until_ms: u64) {
        let Some(idx) = self.index_of(seq) else {
            return;
        };
        if let Some(e) = self.entries.get_mut(idx) {
            if e.sent && !e.covered {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            e.covered = true;
        }
        self.mark_sent(idx);
        if self.entries.get(idx).is_some_and(|e| until_ms > e.due_ms) {
            self.set_due(idx, until_ms);
            if let Some(e) = self.entries.get_mut(idx) {
                e.expedited = false;
            }
        }
    }

    /// Brings record `idx`'s due time forward to `now_ms` (if it was due later).
    fn expedite(&mut self, idx: usize, now_ms: u64) {
        if self.entries.get(idx).is_some_and(|e| e.due_ms > now_ms) {
            self.set_due(idx, now_ms);
            if let Some(e) = self.entries.get_mut(idx) {
                e.expedited = true;
            }
        }
    }

    /// The receiver said it needs record `seq` next (a negative ack, forwarded by a relay):
    /// if it is held, it becomes due at `now_ms` (unless it was due earlier already), so the
    /// next [`Outbox::poll_transmit`] resends it; its backoff is left as it is. Returns
    /// whether the record is held (acknowledged or never pushed: `false`, nothing changes).
    pub fn make_due(&mut self, seq: u64, now_ms: u64) -> bool {
        let Some(idx) = self.index_of(seq) else {
            return false;
        };
        self.expedite(idx, now_ms);
        true
    }

    /// Fast retransmit: if record `from` is held and was transmitted, every transmitted
    /// record numbered in `from .. from + count` becomes due at `now_ms` (unless due earlier
    /// already; backoffs are left as they are) and `true` is returned. Otherwise nothing
    /// changes and `false` is returned. O(count · log n).
    pub fn make_due_from(&mut self, from: u64, count: usize, now_ms: u64) -> bool {
        let Some(start) = self.index_of(from) else {
            return false;
        };
        if !self.entries.get(start).is_some_and(|e| e.sent) {
            return false;
        }
        let stop = from.saturating_add(u64::try_from(count).unwrap_or(u64::MAX));
        let mut idx = start;
        while let Some(e) = self.entries.get(idx) {
            if e.seq >= stop {
                break;
            }
            if e.sent {
                self.expedite(idx, now_ms);
            }
            idx += 1;
        }
        true
    }

    /// Every held record becomes due at `now_ms` and its backoff restarts at
    /// `rto_initial_ms` (the carrier reconnected or the peer came back). Custody and the
    /// flow window's count are unchanged. O(n).
    pub fn resend_all(&mut self, now_ms: u64) {
        let rto = self.limits.rto_initial_ms;
        for e in self.entries.iter_mut() {
            e.due_ms = now_ms;
            e.rto_ms = rto;
            e.expedited = true;
        }
        // In sequence order, so already sorted: the sets are built in linear time.
        self.due = self
            .entries
            .iter()
            .filter(|e| e.sent)
            .map(|e| (now_ms, e.seq))
            .collect();
        self.unsent_due = self
            .entries
            .iter()
            .filter(|e| !e.sent)
            .map(|e| (now_ms, e.seq))
            .collect();
    }

    /// Applies a cumulative ack: every record numbered below `cumulative` is dropped; returns
    /// how many. An ack below one already applied ([`DeliveryError::StaleAck`]) or above
    /// everything pushed ([`DeliveryError::AckBeyondPushed`]) changes nothing.
    pub fn on_ack(&mut self, cumulative: u64) -> Result<usize, DeliveryError> {
        if cumulative < self.acked {
            return Err(DeliveryError::StaleAck);
        }
        if cumulative > self.end {
            return Err(DeliveryError::AckBeyondPushed);
        }
        self.acked = cumulative;
        let mut dropped = 0;
        while let Some(e) = self.entries.front() {
            if e.seq >= cumulative {
                break;
            }
            self.bytes -= e.record.len();
            if e.sent {
                self.due.remove(&(e.due_ms, e.seq));
                if !e.covered {
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
            } else {
                self.unsent.remove(&e.seq);
                self.unsent_due.remove(&(e.due_ms, e.seq));
            }
            self.entries.pop_front();
            dropped += 1;
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small_inbox(next: u64, max_pending: usize, max_bytes: usize) -> Inbox {
        Inbox::new(
            next,
            InboxLimits {
                max_pending,
                max_pending_bytes: max_bytes,
                max_payload: 8,
            },
        )
        .unwrap()
    }

    fn outbox(max_records: usize, max_bytes: usize) -> Outbox {
        Outbox::new(OutboxLimits {
            max_records,
            max_bytes,
            rto_initial_ms: 100,
            rto_max_ms: 1000,
        })
        .unwrap()
    }

    #[test]
    fn inbox_bad_limits_refused() {
        let l = InboxLimits::new(0, 1 << 20);
        assert_eq!(
            Inbox::new(0, l).unwrap_err(),
            DeliveryError::BadLimits("max_pending")
        );
        let l = InboxLimits::new(4, 100);
        assert_eq!(
            Inbox::new(0, l).unwrap_err(),
            DeliveryError::BadLimits("max_pending_bytes")
        );
        assert_eq!(
            InboxLimits::new(4, 1).max_payload,
            crate::record::MAX_PLAINTEXT
        );
    }

    #[test]
    fn inbox_admission_and_order() {
        let mut ib = small_inbox(10, 4, 64);
        assert_eq!(ib.admit(9), Admission::Duplicate);
        assert_eq!(ib.admit(14), Admission::TooFarAhead);
        assert_eq!(ib.admit(13), Admission::Accept);
        ib.insert(12, b"c".to_vec()).unwrap();
        assert_eq!(ib.admit(12), Admission::Duplicate);
        assert_eq!(ib.insert(12, b"x".to_vec()), Err(DeliveryError::Duplicate));
        assert_eq!(
            ib.insert(14, b"x".to_vec()),
            Err(DeliveryError::TooFarAhead)
        );
        assert_eq!(ib.pop(), None);
        assert_eq!(ib.ack(), 10);
        ib.insert(10, b"a".to_vec()).unwrap();
        assert_eq!(ib.ack(), 11);
        ib.insert(11, b"b".to_vec()).unwrap();
        assert_eq!(ib.ack(), 13);
        assert_eq!((ib.pending(), ib.pending_bytes()), (3, 3));
        assert_eq!(ib.pop(), Some((10, b"a".to_vec())));
        assert_eq!(ib.pop(), Some((11, b"b".to_vec())));
        assert_eq!(ib.pop(), Some((12, b"c".to_vec())));
        assert_eq!(ib.pop(), None);
        assert_eq!((ib.next_expected(), ib.ack()), (13, 13));
        assert_eq!((ib.pending(), ib.pending_bytes()), (0, 0));
        assert_eq!(ib.admit(12), Admission::Duplicate);
        assert_eq!(ib.admit(16), Admission::Accept);
    }

    #[test]
    fn inbox_byte_bound_keeps_room_for_the_missing_message() {
        // 24 bytes, payloads up to 8: early messages may use 16, the missing one the rest.
        let mut ib = small_inbox(0, 100, 24);
        ib.insert(1, vec![0; 8]).unwrap();
        ib.insert(2, vec![0; 8]).unwrap();
        assert_eq!(ib.admit(3), Admission::NoRoom);
        assert_eq!(ib.insert(3, vec![0; 1]), Err(DeliveryError::NoRoom));
        assert_eq!(ib.admit(0), Admission::Accept);
        assert_eq!(ib.insert(0, vec![0; 9]), Err(DeliveryError::PayloadTooLong));
        ib.insert(0, vec![0; 8]).unwrap();
        assert_eq!(ib.pending_bytes(), 24);
        assert_eq!(ib.ack(), 3);
        // Full: even the next missing message waits for the application to pop.
        assert_eq!(ib.admit(3), Admission::NoRoom);
        assert_eq!(ib.pop().map(|m| m.0), Some(0));
        assert_eq!(ib.admit(3), Admission::Accept);
        assert_eq!(ib.admit(4), Admission::NoRoom);
    }

    #[test]
    fn inbox_window_at_the_top_of_the_sequence_space() {
        // The record layer never sends u64::MAX; the window ends below it.
        let mut ib = small_inbox(u64::MAX - 2, 4, 64);
        assert_eq!(ib.admit(u64::MAX), Admission::TooFarAhead);
        ib.insert(u64::MAX - 1, vec![1]).unwrap();
        ib.insert(u64::MAX - 2, vec![2]).unwrap();
        assert_eq!(ib.ack(), u64::MAX);
        assert_eq!(ib.pop(), Some((u64::MAX - 2, vec![2])));
        assert_eq!(ib.pop(), Some((u64::MAX - 1, vec![1])));
        assert_eq!(ib.pop(), None);
        assert_eq!(ib.admit(0), Admission::Duplicate);
        assert_eq!(ib.admit(u64::MAX), Admission::TooFarAhead);
    }

    #[test]
    fn inbox_debug_shows_no_message() {
        let mut ib = small_inbox(0, 4, 64);
        ib.insert(1, b"hr 7293".to_vec()).unwrap();
        let d = format!("{ib:?}");
        assert!(d.contains("pending_messages: 1"), "{d}");
        assert!(!d.contains("7293") && !d.contains("104"), "{d}");
    }

    #[test]
    fn outbox_refuses_the_last_sequence_number() {
        let mut ob = outbox(8, 1024);
        ob.push(u64::MAX - 1, vec![1], 0).unwrap();
        assert_eq!(
            ob.push(u64::MAX, vec![2], 0),
            Err(DeliveryError::NotIncreasing)
        );
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.next_seq_floor(), u64::MAX);
    }

    proptest! {
        /// Any permutation with duplicates of 0..n, dropped-and-resent when refused, comes
        /// out as 0..n exactly once, in order, without exceeding the bounds.
        #[test]
        fn inbox_permutations_deliver_exactly_once_in_order(
            n in 1usize..80,
            max_pending in 1usize..12,
            extra_bytes in 0usize..40,
            seed in any::<u64>(),
        ) {
            use rand::{seq::SliceRandom, Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let max_bytes = 8 + extra_bytes;
            let mut ib = small_inbox(0, max_pending, max_bytes);
            let len = |s: u64| (s % 9) as usize; // 0..=8 bytes
            let mut net: Vec<u64> = (0..n as u64).collect();
            for _ in 0..rng.gen_range(0..=n) {
                net.push(rng.gen_range(0..n as u64));
            }
            net.shuffle(&mut rng);
            let mut net: VecDeque<u64> = net.into();
            let mut out = Vec::new();
            let mut steps = 0;
            while out.len() < n {
                steps += 1;
                prop_assert!(steps < 100 * n * (n + 1), "no progress");
                if let Some(seq) = net.pop_front() {
                    match ib.admit(seq) {
                        Admission::Accept => ib.insert(seq, vec![seq as u8; len(seq)]).unwrap(),
                        Admission::Duplicate => {
                            prop_assert!(seq < ib.next_expected() || ib.pending_messages().any(|m| m.0 == seq));
                            prop_assert_eq!(ib.insert(seq, vec![0; 1]), Err(DeliveryError::Duplicate));
                        }
                        Admission::TooFarAhead | Admission::NoRoom => {
                            prop_assert!(ib.insert(seq, vec![0; 8]).is_err());
                            net.push_back(seq); // the sender resends
                        }
                    }
                }
                prop_assert!(ib.pending() <= max_pending);
                prop_assert!(ib.pending_bytes() <= max_bytes);
                // A slow application: pops only sometimes.
                if rng.gen_bool(0.5) || net.is_empty() {
                    while let Some((seq, p)) = ib.pop() {
                        prop_assert_eq!(p, vec![seq as u8; len(seq)]);
                        out.push(seq);
                    }
                }
                prop_assert!(ib.ack() >= ib.next_expected());
            }
            prop_assert_eq!(out, (0..n as u64).collect::<Vec<_>>());
            prop_assert_eq!((ib.pending(), ib.pending_bytes()), (0, 0));
        }

        /// No sequence of operations panics or breaks the bounds.
        #[test]
        fn inbox_arbitrary_input_respects_bounds(
            ops in proptest::collection::vec((any::<bool>(), 0u64..40, 0usize..12), 0..200),
        ) {
            let mut ib = small_inbox(3, 5, 20);
            for (pop, seq, len) in ops {
                if pop {
                    let before = ib.next_expected();
                    if let Some((s, _)) = ib.pop() {
                        prop_assert_eq!(s, before);
                    }
                } else {
                    let adm = ib.admit(seq);
                    let res = ib.insert(seq, vec![0; len]);
                    match adm {
                        // Admit is the promise: an accepted record's payload is taken.
                        Admission::Accept => prop_assert!(len > 8 || res.is_ok()),
                        Admission::Duplicate => prop_assert!(res == Err(DeliveryError::Duplicate) || len > 8),
                        Admission::TooFarAhead => prop_assert!(res.is_err()),
                        // Admit assumes the longest payload; a shorter one may still fit.
                        Admission::NoRoom => prop_assert!(len < 8 || res.is_err()),
                    }
                }
                prop_assert!(ib.pending() <= 5);
                prop_assert!(ib.pending_bytes() <= 20);
            }
        }
    }

    #[test]
    fn outbox_bad_limits_refused() {
        let ok = OutboxLimits {
            max_records: 1,
            max_bytes: 1,
            rto_initial_ms: 1,
            rto_max_ms: 1,
        };
        assert!(Outbox::new(ok).is_ok());
        for (l, why) in [
            (
                OutboxLimits {
                    max_records: 0,
                    ..ok
                },
                "max_records",
            ),
            (OutboxLimits { max_bytes: 0, ..ok }, "max_bytes"),
            (
                OutboxLimits {
                    rto_initial_ms: 0,
                    ..ok
                },
                "rto_initial_ms",
            ),
            (
                OutboxLimits {
                    rto_initial_ms: 2,
                    ..ok
                },
                "rto_max_ms",
            ),
        ] {
            assert_eq!(Outbox::new(l).unwrap_err(), DeliveryError::BadLimits(why));
        }
    }

    #[test]
    fn outbox_sends_new_first_then_resends_with_backoff() {
        let mut ob = outbox(8, 100);
        ob.push(0, b"r0".to_vec(), 0).unwrap();
        assert_eq!(ob.poll_timeout(), Some(0));
        assert_eq!(ob.poll_transmit(0), Some((0, &b"r0"[..])));
        assert_eq!(ob.poll_transmit(0), None);
        assert_eq!(ob.poll_timeout(), Some(100));
        ob.push(1, b"r1".to_vec(), 50).unwrap();
        assert_eq!(ob.poll_timeout(), Some(50));
        // r0 is due at 100 but the never-sent r1 goes first.
        assert_eq!(ob.poll_transmit(150).map(|t| t.0), Some(1)); // r1 due at 250
        assert_eq!(ob.poll_transmit(150).map(|t| t.0), Some(0)); // resend 1, next at 350
        assert_eq!(ob.poll_transmit(150), None);
        assert_eq!(ob.poll_timeout(), Some(250));
        assert_eq!(ob.poll_transmit(249), None);
        assert_eq!(ob.poll_transmit(250).map(|t| t.0), Some(1)); // next at 450
    }

    #[test]
    fn outbox_backoff_doubles_up_to_the_cap() {
        let mut ob = outbox(8, 100);
        ob.push(7, b"r".to_vec(), 0).unwrap();
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(7));
        let mut sent_at = Vec::new();
        for _ in 0..7 {
            let due = ob.poll_timeout().unwrap();
            assert_eq!(ob.poll_transmit(due - 1), None);
            assert_eq!(ob.poll_transmit(due).map(|t| t.0), Some(7));
            sent_at.push(due);
        }
        // Delays 100, 200, 400, 800, then capped at 1000.
        assert_eq!(sent_at, [100, 300, 700, 1500, 2500, 3500, 4500]);
        assert_eq!(ob.len(), 1);
    }

    #[test]
    fn outbox_ack_removes_and_bad_acks_change_nothing() {
        let mut ob = outbox(8, 100);
        for s in 5..9 {
            ob.push(s, vec![s as u8; 3], 0).unwrap();
        }
        assert_eq!((ob.len(), ob.bytes()), (4, 12));
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(5));
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(6));
        assert_eq!(ob.on_ack(10), Err(DeliveryError::AckBeyondPushed));
        assert_eq!(ob.on_ack(u64::MAX), Err(DeliveryError::AckBeyondPushed));
        assert_eq!((ob.len(), ob.bytes(), ob.acked()), (4, 12, 0));
        assert_eq!(ob.on_ack(7), Ok(2));
        assert_eq!((ob.len(), ob.bytes(), ob.acked()), (2, 6, 7));
        assert_eq!(ob.on_ack(6), Err(DeliveryError::StaleAck));
        assert_eq!(ob.on_ack(7), Ok(0));
        assert_eq!((ob.len(), ob.bytes(), ob.acked()), (2, 6, 7));
        // 7 and 8 were never sent: they still go out first, in order.
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(7));
        // An ack covering a never-sent record (the receiver had it from before a restart).
        assert_eq!(ob.on_ack(9), Ok(2));
        assert!(ob.is_empty());
        assert_eq!(
            (ob.bytes(), ob.poll_timeout(), ob.poll_transmit(u64::MAX)),
            (0, None, None)
        );
        assert_eq!(ob.push(8, vec![1], 0), Err(DeliveryError::NotIncreasing));
        ob.push(9, vec![1], 0).unwrap();
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(9));
    }

    #[test]
    fn outbox_full_rejects_new_and_keeps_old() {
        let mut ob = outbox(3, 10);
        ob.push(0, vec![0; 4], 0).unwrap();
        ob.push(1, vec![1; 4], 0).unwrap();
        assert_eq!(ob.push(2, vec![2; 3], 0), Err(DeliveryError::Full)); // bytes
        ob.push(2, vec![2; 2], 0).unwrap();
        assert_eq!(ob.push(3, vec![], 0), Err(DeliveryError::Full)); // records
        assert_eq!(ob.push(1, vec![], 0), Err(DeliveryError::NotIncreasing));
        assert_eq!((ob.len(), ob.bytes(), ob.next_seq_floor()), (3, 10, 3));
        let held: Vec<_> = ob.records().map(|(s, r)| (s, r.to_vec())).collect();
        assert_eq!(held, [(0, vec![0; 4]), (1, vec![1; 4]), (2, vec![2; 2])]);
        ob.on_ack(1).unwrap();
        ob.push(3, vec![3; 4], 0).unwrap();
        assert_eq!((ob.len(), ob.bytes()), (3, 10));
    }

    #[test]
    fn outbox_custody_moves_a_resend_later_only() {
        let mut ob = outbox(8, 100);
        ob.push(0, b"r0".to_vec(), 0).unwrap();
        ob.push(1, b"r1".to_vec(), 0).unwrap();
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(0)); // due 100
        ob.on_custody(0, 50); // earlier: unchanged
        ob.on_custody(7, 5000); // unknown: ignored
                                // 1 was never sent; custody counts as sent, due at 500.
        ob.on_custody(1, 500);
        assert_eq!(ob.poll_timeout(), Some(100));
        ob.on_custody(0, 1000);
        assert_eq!(ob.poll_timeout(), Some(500));
        assert_eq!(ob.poll_transmit(499), None);
        assert_eq!(ob.poll_transmit(500).map(|t| t.0), Some(1)); // next 600
        assert_eq!(ob.poll_transmit(999).map(|t| t.0), Some(1)); // due 600 < 1000
        assert_eq!(ob.poll_transmit(1000).map(|t| t.0), Some(0));
        // Acked records are unknown to custody.
        ob.on_ack(2).unwrap();
        ob.on_custody(0, 9000);
        assert_eq!((ob.poll_timeout(), ob.len()), (None, 0));
    }

    #[test]
    fn outbox_make_due_resends_one_record_now() {
        let mut ob = outbox(8, 100);
        for s in 0..3 {
            ob.push(s, vec![s as u8], 0).unwrap();
        }
        for _ in 0..3 {
            ob.poll_transmit(0).unwrap();
        }
        // All three due at 100; custody pushes 1 to 10_000.
        ob.on_custody(1, 10_000);
        ob.on_custody(0, 10_000);
        ob.on_custody(2, 10_000);
        assert_eq!(ob.poll_transmit(50), None);
        assert!(ob.make_due(1, 50));
        assert_eq!(ob.poll_timeout(), Some(50));
        assert_eq!(ob.poll_transmit(50).map(|t| t.0), Some(1));
        // Backoff kept: the initial 100 doubled once by the first send, so 200 now.
        assert_eq!(ob.poll_timeout(), Some(250));
        assert_eq!(ob.poll_transmit(249), None);
        // A record due earlier stays due then.
        assert!(ob.make_due(1, 1000));
        assert_eq!(ob.poll_timeout(), Some(250));
        // Unknown and acknowledged records: false, nothing changes.
        assert!(!ob.make_due(7, 0));
        ob.on_ack(1).unwrap();
        assert!(!ob.make_due(0, 0));
        assert_eq!(ob.poll_timeout(), Some(250));
        assert_eq!(ob.len(), 2);
    }

    #[test]
    fn outbox_resend_all_makes_everything_due_and_restarts_backoff() {
        let mut ob = outbox(8, 100);
        for s in 0..3 {
            ob.push(s, vec![s as u8], 0).unwrap();
        }
        for _ in 0..3 {
            ob.poll_transmit(0).unwrap();
        }
        for t in [100, 300, 700] {
            while ob.poll_transmit(t).is_some() {}
        }
        assert_eq!(ob.poll_timeout(), Some(1500));
        ob.resend_all(710);
        assert_eq!(ob.poll_timeout(), Some(710));
        let order: Vec<_> = (0..3)
            .filter_map(|_| ob.poll_transmit(710).map(|t| t.0))
            .collect();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(ob.poll_timeout(), Some(810)); // backoff back at 100
    }

    #[test]
    fn outbox_window_holds_back_new_records_only() {
        let mut ob = outbox(8, 100);
        assert_eq!(ob.set_window(0), Err(DeliveryError::BadLimits("window")));
        assert_eq!(ob.window(), usize::MAX);
        ob.set_window(2).unwrap();
        for s in 0..5 {
            ob.push(s, vec![s as u8], 0).unwrap();
        }
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(0));
        assert_eq!(ob.poll_transmit(0).map(|t| t.0), Some(1));
        assert_eq!(ob.in_flight(), 2);
        // The window is full: nothing new, and no timeout for the waiting records.
        assert_eq!(ob.poll_transmit(0), None);
        assert_eq!(ob.poll_timeout(), Some(100));
        // Resends are not limited.
        assert_eq!(ob.poll_transmit(100).map(|t| t.0), Some(0));
        assert_eq!(ob.timer_resends(), 1);
        // Custody covers 1: one more new record may go.
        ob.on_custody(1, 150);
        assert_eq!(ob.in_flight(), 1);
        assert_eq!(ob.poll_timeout(), Some(0));
        assert_eq!(ob.poll_transmit(100).map(|t| t.0), Some(2));
        assert_eq!(ob.poll_transmit(100).map(|t| t.0), None);
        // Custody of a never-sent record covers it without it counting.
        ob.on_custody(4, 150);
        assert_eq!(ob.in_flight(), 2);
        // The ack frees 0 and 1; only 0 counted (1 was covered).
        assert_eq!(ob.on_ack(2), Ok(2));
        assert_eq!(ob.in_flight(), 1);
        assert_eq!(ob.poll_transmit(100).map(|t| t.0), Some(3));
        assert_eq!(ob.in_flight(), 2);
        assert_eq!(ob.on_ack(5), Ok(3));
        assert_eq!((ob.in_flight(), ob.poll_timeout()), (0, None));
        // Cover on send: the window never fills.
        ob.set_cover_on_send(true);
        for s in 5..9 {
            ob.push(s, vec![s as u8], 200).unwrap();
        }
        for s in 5..9 {
            assert_eq!(ob.poll_transmit(200).map(|t| t.0), Some(s));
        }
        assert_eq!(ob.in_flight(), 0);
    }

    #[test]
    fn outbox_make_due_from_brings_a_run_forward() {
        let mut ob = outbox(8, 1000);
        for s in 0..6 {
            ob.push(s, vec![s as u8], 0).unwrap();
        }
        for _ in 0..4 {
            ob.poll_transmit(0).unwrap();
        }
        // 4 and 5 were never sent; 6 is not held.
        assert!(!ob.make_due_from(4, 3, 10));
        assert!(!ob.make_due_from(6, 3, 10));
        assert_eq!(ob.poll_timeout(), Some(0)); // 4 and 5 may go
        assert_eq!(ob.poll_transmit(10).map(|t| t.0), Some(4));
        assert_eq!(ob.poll_transmit(10).map(|t| t.0), Some(5));
        assert!(ob.make_due_from(1, 2, 10));
        let got: Vec<_> = std::iter::from_fn(|| ob.poll_transmit(10).map(|t| t.0)).collect();
        assert_eq!(got, [1, 2]);
        // Resends brought forward are not timer resends.
        assert_eq!(ob.timer_resends(), 0);
        assert_eq!(ob.poll_transmit(100).map(|t| t.0), Some(0));
        assert_eq!(ob.timer_resends(), 1);
    }

    #[test]
    fn outbox_resume_and_room() {
        let mut ob = Outbox::resume(
            OutboxLimits {
                max_records: 2,
                max_bytes: 10,
                rto_initial_ms: 1,
                rto_max_ms: 1,
            },
            40,
        )
        .unwrap();
        assert_eq!((ob.acked(), ob.next_seq_floor()), (40, 40));
        assert_eq!(ob.on_ack(40), Ok(0));
        assert_eq!(ob.on_ack(39), Err(DeliveryError::StaleAck));
        assert_eq!(ob.on_ack(41), Err(DeliveryError::AckBeyondPushed));
        assert_eq!(ob.push(39, vec![], 0), Err(DeliveryError::NotIncreasing));
        assert!(ob.has_room_for(10) && !ob.has_room_for(11));
        ob.push(40, vec![0; 6], 0).unwrap();
        assert!(ob.has_room_for(4) && !ob.has_room_for(5));
        ob.push(41, vec![], 0).unwrap();
        assert!(!ob.has_room_for(0));
        assert!(Outbox::resume(
            OutboxLimits {
                max_records: 0,
                max_bytes: 1,
                rto_initial_ms: 1,
                rto_max_ms: 1
            },
            0
        )
        .is_err());
    }

    /// One record of the model.
    #[derive(Clone, Copy)]
    struct M {
        seq: u64,
        len: usize,
        due: u64,
        rto: u64,
        sent: bool,
        covered: bool,
        expedited: bool,
    }

    /// The straightforward O(n) outbox the indexed one must behave like.
    struct Model {
        e: Vec<M>,
        acked: u64,
        end: u64,
        window: usize,
        cover_on_send: bool,
        timer_resends: u64,
    }

    impl Model {
        fn new(window: usize, cover_on_send: bool) -> Model {
            Model {
                e: Vec::new(),
                acked: 0,
                end: 0,
                window,
                cover_on_send,
                timer_resends: 0,
            }
        }
        fn in_flight(&self) -> usize {
            self.e.iter().filter(|x| x.sent && !x.covered).count()
        }
        fn push(&mut self, seq: u64, len: usize, now: u64, l: OutboxLimits) -> bool {
            let bytes: usize = self.e.iter().map(|x| x.len).sum::<usize>() + len;
            if seq < self.end || seq < self.acked || seq == u64::MAX {
                return false;
            }
            if self.e.len() >= l.max_records || bytes > l.max_bytes {
                return false;
            }
            self.e.push(M {
                seq,
                len,
                due: now,
                rto: l.rto_initial_ms,
                sent: false,
                covered: false,
                expedited: false,
            });
            self.end = seq + 1;
            true
        }
        fn poll(&mut self, now: u64, l: OutboxLimits) -> Option<u64> {
            let fresh = if self.in_flight() < self.window {
                self.e.iter().position(|x| !x.sent)
            } else {
                None
            };
            let i = match fresh {
                Some(i) => i,
                None => {
                    let i = (0..self.e.len())
                        .filter(|&i| self.e[i].sent)
                        .min_by_key(|&i| (self.e[i].due, self.e[i].seq))?;
                    if self.e[i].due > now {
                        return None;
                    }
                    if !self.e[i].expedited {
                        self.timer_resends += 1;
                    }
                    i
                }
            };
            let cover = self.cover_on_send;
            let x = &mut self.e[i];
            if !x.sent && cover {
                x.covered = true;
            }
            x.sent = true;
            x.expedited = false;
            x.due = now.saturating_add(x.rto);
            x.rto = (x.rto * 2).min(l.rto_max_ms);
            Some(x.seq)
        }
        fn ack(&mut self, c: u64) -> Result<usize, DeliveryError> {
            if c < self.acked {
                return Err(DeliveryError::StaleAck);
            }
            if c > self.end {
                return Err(DeliveryError::AckBeyondPushed);
            }
            self.acked = c;
            let before = self.e.len();
            self.e.retain(|x| x.seq >= c);
            Ok(before - self.e.len())
        }
        fn custody(&mut self, seq: u64, until: u64) {
            if let Some(x) = self.e.iter_mut().find(|x| x.seq == seq) {
                x.sent = true;
                x.covered = true;
                if until > x.due {
                    x.due = until;
                    x.expedited = false;
                }
            }
        }
        fn make_due(&mut self, seq: u64, now: u64) -> bool {
            match self.e.iter_mut().find(|x| x.seq == seq) {
                Some(x) => {
                    if x.due > now {
                        x.due = now;
                        x.expedited = true;
                    }
                    true
                }
                None => false,
            }
        }
        fn make_due_from(&mut self, from: u64, count: usize, now: u64) -> bool {
            if !self.e.iter().any(|x| x.seq == from && x.sent) {
                return false;
            }
            for x in &mut self.e {
                if x.seq >= from
                    && x.seq < from.saturating_add(count as u64)
                    && x.sent
                    && x.due > now
                {
                    x.due = now;
                    x.expedited = true;
                }
            }
            true
        }
        fn resend_all(&mut self, now: u64, l: OutboxLimits) {
            for x in &mut self.e {
                x.due = now;
                x.rto = l.rto_initial_ms;
                x.expedited = true;
            }
        }
        fn timeout(&self) -> Option<u64> {
            let fresh = self.in_flight() < self.window;
            self.e
                .iter()
                .filter(|x| x.sent || fresh)
                .map(|x| x.due)
                .min()
        }
    }

    proptest! {
        /// The indexed outbox answers exactly like the O(n) model, whatever the operations:
        /// order of transmissions, timeouts, the flow window's in-flight count (custody and
        /// cover-on-send included) and the count of timer-driven resends.
        #[test]
        fn outbox_matches_the_linear_model(
            ops in proptest::collection::vec((0u8..8, 0u64..40, 0usize..6, 0u64..3000), 0..300),
            window in prop_oneof![Just(usize::MAX), 1usize..5],
            cover_on_send in any::<bool>(),
        ) {
            let mut ob = outbox(6, 20);
            ob.set_window(window).unwrap();
            ob.set_cover_on_send(cover_on_send);
            let l = ob.limits();
            let mut m = Model::new(window, cover_on_send);
            for (op, seq, len, now) in ops {
                match op {
                    0 | 1 => prop_assert_eq!(ob.push(seq, vec![0; len], now).is_ok(), m.push(seq, len, now, l)),
                    2 => prop_assert_eq!(ob.on_ack(seq), m.ack(seq)),
                    3 | 4 => prop_assert_eq!(ob.poll_transmit(now).map(|t| t.0), m.poll(now, l)),
                    5 => { ob.on_custody(seq, now); m.custody(seq, now); }
                    6 => if len % 2 == 0 {
                        prop_assert_eq!(ob.make_due(seq, now), m.make_due(seq, now));
                    } else {
                        prop_assert_eq!(ob.make_due_from(seq, len, now), m.make_due_from(seq, len, now));
                    },
                    _ => { ob.resend_all(now); m.resend_all(now, l); }
                }
                prop_assert_eq!(ob.poll_timeout(), m.timeout());
                prop_assert_eq!(ob.len(), m.e.len());
                prop_assert_eq!(ob.in_flight(), m.in_flight());
                prop_assert!(ob.in_flight() <= window);
                prop_assert_eq!(ob.timer_resends(), m.timer_resends);
                prop_assert_eq!(ob.records().map(|r| r.0).collect::<Vec<_>>(), m.e.iter().map(|x| x.seq).collect::<Vec<_>>());
            }
        }
    }

    proptest! {
        /// No sequence of operations panics, breaks the bounds, or loses an unacked record.
        #[test]
        fn outbox_arbitrary_input_respects_bounds(
            ops in proptest::collection::vec((0u8..3, 0u64..30, 0usize..6, 0u64..5000), 0..200),
        ) {
            let mut ob = outbox(4, 12);
            let mut model: Vec<u64> = Vec::new();
            for (op, seq, len, now) in ops {
                match op {
                    0 => if ob.push(seq, vec![0; len], now).is_ok() { model.push(seq) },
                    1 => if ob.on_ack(seq).is_ok() { model.retain(|&s| s >= seq) },
                    _ => if let Some((s, _)) = ob.poll_transmit(now) {
                        prop_assert!(model.contains(&s));
                    },
                }
                prop_assert!(ob.len() <= 4 && ob.bytes() <= 12);
                prop_assert_eq!(ob.records().map(|r| r.0).collect::<Vec<_>>(), model.clone());
            }
        }
    }
}
