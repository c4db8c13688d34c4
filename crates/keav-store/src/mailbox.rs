//! A relay's durable mailbox (docs/MESSAGING.md, "Relays and mailboxes"): per queue (a next
//! hop: a destination device, or the next relay), the relay frames waiting to go there, in
//! arrival order, deduplicated by entry key, bounded.
//!
//! The relay holds no session key: entries are opaque frames plus their
//! [`EntryKey`](keav_proto::route::EntryKey). A separate redb file from any device store.
//!
//! # Bounds and policy
//!
//! Each queue holds at most [`MailboxLimits::max_entries`] entries and
//! [`MailboxLimits::max_bytes`] bytes. A put that would exceed either is refused
//! ([`PutOutcome::Full`]): the relay tells the sender (`Refused`, mailbox full), which keeps
//! the message in its outbox. Stored entries are never dropped to make room.

use std::path::Path;

use keav_proto::route::EntryKey;

use crate::Error;

/// Bounds of every queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxLimits {
    /// Most entries per queue (default 1,000,000).
    pub max_entries: u64,
    /// Most frame bytes per queue (default 1 GiB).
    pub max_bytes: u64,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        MailboxLimits {
            max_entries: 1_000_000,
            max_bytes: 1 << 30,
        }
    }
}

/// What happened to one put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored under this queue position (increasing per queue, never reused).
    Stored(u64),
    /// An entry with the same key is already in the queue (nothing stored).
    Duplicate,
    /// The queue is at its bound (nothing stored).
    Full,
}

/// One queued entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in its queue.
    pub pos: u64,
    /// Identity.
    pub key: EntryKey,
    /// The frame to send.
    pub frame: Vec<u8>,
}

/// Size of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries held.
    pub entries: u64,
    /// Frame bytes held.
    pub bytes: u64,
}

/// A relay's mailbox file.
pub struct Mailbox {
    _private: (),
}

impl core::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mailbox").finish_non_exhaustive()
    }
}

impl Mailbox {
    /// Opens (or creates) the mailbox at `path`. A damaged file is an error, never a silent
    /// reset.
    pub fn open(_path: &Path, _limits: MailboxLimits) -> Result<Mailbox, Error> {
        todo!()
    }

    /// Adds entries to `queue` in one transaction (fsync once); one outcome per item, in order.
    pub fn put_batch(
        &self,
        _queue: &str,
        _items: &[(EntryKey, Vec<u8>)],
    ) -> Result<Vec<PutOutcome>, Error> {
        todo!()
    }

    /// Up to `max` entries of `queue` with a position above `after` (None: from the start),
    /// in order.
    pub fn peek(&self, _queue: &str, _after: Option<u64>, _max: usize) -> Result<Vec<Entry>, Error> {
        todo!()
    }

    /// Removes the entries of `queue` with these keys (custody passed on) in one transaction;
    /// returns how many were there.
    pub fn remove(&self, _queue: &str, _keys: &[EntryKey]) -> Result<usize, Error> {
        todo!()
    }

    /// Every non-empty queue and its size, sorted by name.
    pub fn queues(&self) -> Result<Vec<(String, QueueStats)>, Error> {
        todo!()
    }

    /// The size of `queue`.
    pub fn queue_stats(&self, _queue: &str) -> Result<QueueStats, Error> {
        todo!()
    }
}
