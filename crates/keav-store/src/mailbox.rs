//! A relay's durable mailbox (docs/MESSAGING.md, "Relays and mailboxes"): per queue (a next
//! hop: a destination device, or the next relay), the relay frames waiting to go there, in
//! arrival order, deduplicated by entry key, bounded.
//!
//! The relay holds no session key: entries are opaque frames plus their
//! [`EntryKey`]. A separate redb file from any device store.
//!
//! # Bounds and policy
//!
//! Each queue holds at most [`MailboxLimits::max_entries`] entries and
//! [`MailboxLimits::max_bytes`] bytes. A put that would exceed either is refused
//! ([`PutOutcome::Full`]): the relay tells the sender (`Refused`, mailbox full), which keeps
//! the message in its outbox. Stored entries are never dropped to make room.
//!
//! # Layout
//!
//! Tables (keys with a queue name are `name ‖ 0x00 ‖ …`; a name never contains 0x00, so one
//! queue is one key range):
//! - `keav_mailbox_meta`: the schema marker (`KEAV-MAILBOX` ‖ version u32 LE);
//! - `keav_mailbox_queues`: name → `'Q' ‖ 1 ‖ next position ‖ entries ‖ bytes` (u64 LE each).
//!   The row stays when the queue empties, so positions are never reused, across restarts too;
//! - `keav_mailbox_entries`: name ‖ 0x00 ‖ position u64 BE → `'E' ‖ 1 ‖ key ‖ frame`;
//! - `keav_mailbox_keys` (dedupe index): name ‖ 0x00 ‖ key → `'K' ‖ 1 ‖ position u64 LE`;
//!
//! where key = `len u8 ‖ src ‖ len u8 ‖ dst ‖ stream u8 ‖ seq u64 BE`. Every value carries the
//! store's checksum bound to its table key (see `codec`); a damaged value is
//! [`Error::CorruptMailbox`] naming the queue (and the position when known), never a panic
//! and never a silently missing entry. [`Mailbox::quarantine_entry`] drops a damaged entry.
//!
//! Each call is one redb write transaction committed with `Durability::Immediate`: a crash
//! leaves all of a batch or none of it, and the counters always match the entries.

use std::path::Path;

use keav_proto::route::{valid_id, EntryKey};
use redb::{
    Builder, Database, ReadOnlyTable, ReadTransaction, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};

use crate::durable::{seal_value, unseal_value};
use crate::Error;

type Raw = TableDefinition<'static, &'static [u8], &'static [u8]>;

const META: Raw = TableDefinition::new("keav_mailbox_meta");
const QUEUES: Raw = TableDefinition::new("keav_mailbox_queues");
const ENTRIES: Raw = TableDefinition::new("keav_mailbox_entries");
const KEYS: Raw = TableDefinition::new("keav_mailbox_keys");

const SCHEMA_KEY: &[u8] = b"schema";
const MAGIC: &[u8; 12] = b"KEAV-MAILBOX";
const SCHEMA_VERSION: u32 = 1;

const QUEUE_TAG: u8 = b'Q';
const ENTRY_TAG: u8 = b'E';
const KEY_TAG: u8 = b'K';

fn schema_value() -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    v
}

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
    db: Database,
    limits: MailboxLimits,
    path: String,
}

impl core::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mailbox")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn corrupt(queue: &str, pos: Option<u64>) -> Error {
    Error::CorruptMailbox {
        queue: queue.to_owned(),
        pos,
    }
}

/// The store's file-level corruption error, reworded for a mailbox (naming its file).
fn file_error(path: &str, e: Error) -> Error {
    match e {
        Error::Corrupt(detail) => Error::CorruptMailboxFile {
            path: path.to_owned(),
            detail,
        },
        other => other,
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if valid_id(name) {
        Ok(())
    } else {
        Err(Error::InvalidName)
    }
}

fn valid_key(key: &EntryKey) -> bool {
    valid_id(&key.src) && valid_id(&key.dst)
}

/// `queue ‖ 0x00 ‖ rest`.
fn queue_key(queue: &str, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(queue.len() + 1 + rest.len());
    k.extend_from_slice(queue.as_bytes());
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn entry_slot(queue: &str, pos: u64) -> Vec<u8> {
    queue_key(queue, &pos.to_be_bytes())
}

fn pos_of(queue: &str, slot: &[u8]) -> Option<u64> {
    let rest = slot.strip_prefix(queue.as_bytes())?.strip_prefix(&[0u8])?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// `len u8 ‖ src ‖ len u8 ‖ dst ‖ stream u8 ‖ seq u64 BE` (ids are validated: ≤ 64 bytes).
fn encode_key(key: &EntryKey) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + key.src.len() + key.dst.len() + 9);
    for id in [&key.src, &key.dst] {
        b.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
        b.extend_from_slice(id.as_bytes());
    }
    b.push(key.stream);
    b.extend_from_slice(&key.seq.to_be_bytes());
    b
}

fn take_id(rest: &mut &[u8]) -> Option<String> {
    let (&len, tail) = rest.split_first()?;
    let (id, tail) = tail.split_at_checked(usize::from(len))?;
    let id = std::str::from_utf8(id).ok().filter(|s| valid_id(s))?;
    *rest = tail;
    Some(id.to_owned())
}

/// Parses an encoded key off the front of `bytes`; returns it and the rest.
fn decode_key(mut bytes: &[u8]) -> Option<(EntryKey, &[u8])> {
    let src = take_id(&mut bytes)?;
    let dst = take_id(&mut bytes)?;
    let (&stream, rest) = bytes.split_first()?;
    let (seq, rest) = rest.split_first_chunk::<8>()?;
    let key = EntryKey {
        src,
        dst,
        stream,
        seq: u64::from_be_bytes(*seq),
    };
    Some((key, rest))
}

/// Counters and next position of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueRow {
    next_pos: u64,
    entries: u64,
    bytes: u64,
}

impl QueueRow {
    fn encode(&self, queue: &str) -> Vec<u8> {
        seal_value(
            queue.as_bytes(),
            QUEUE_TAG,
            &[
                &self.next_pos.to_le_bytes(),
                &self.entries.to_le_bytes(),
                &self.bytes.to_le_bytes(),
            ],
        )
        .to_vec()
    }

    fn decode(queue: &str, bytes: &[u8]) -> Option<QueueRow> {
        let body = unseal_value(queue.as_bytes(), QUEUE_TAG, bytes)?;
        let (a, rest) = body.split_first_chunk::<8>()?;
        let (b, rest) = rest.split_first_chunk::<8>()?;
        let c: &[u8; 8] = rest.try_into().ok()?;
        Some(QueueRow {
            next_pos: u64::from_le_bytes(*a),
            entries: u64::from_le_bytes(*b),
            bytes: u64::from_le_bytes(*c),
        })
    }

    fn stats(&self) -> QueueStats {
        QueueStats {
            entries: self.entries,
            bytes: self.bytes,
        }
    }
}

fn load_row<T: ReadableTable<&'static [u8], &'static [u8]>>(
    queues: &T,
    queue: &str,
) -> Result<QueueRow, Error> {
    match queues.get(queue.as_bytes())? {
        None => Ok(QueueRow::default()),
        Some(v) => QueueRow::decode(queue, v.value()).ok_or_else(|| corrupt(queue, None)),
    }
}

fn decode_entry(queue: &str, slot: &[u8], bytes: &[u8]) -> Result<Entry, Error> {
    let pos = pos_of(queue, slot).ok_or_else(|| corrupt(queue, None))?;
    let body = unseal_value(slot, ENTRY_TAG, bytes).ok_or_else(|| corrupt(queue, Some(pos)))?;
    let (key, frame) = decode_key(body).ok_or_else(|| corrupt(queue, Some(pos)))?;
    Ok(Entry {
        pos,
        key,
        frame: frame.to_vec(),
    })
}

fn decode_index(queue: &str, index_key: &[u8], bytes: &[u8]) -> Result<u64, Error> {
    let body = unseal_value(index_key, KEY_TAG, bytes).ok_or_else(|| corrupt(queue, None))?;
    let pos: &[u8; 8] = body.try_into().map_err(|_| corrupt(queue, None))?;
    Ok(u64::from_le_bytes(*pos))
}

fn frame_len(frame: &[u8]) -> u64 {
    u64::try_from(frame.len()).unwrap_or(u64::MAX)
}

fn put_items(
    txn: &WriteTransaction,
    limits: &MailboxLimits,
    queue: &str,
    items: &[(EntryKey, Vec<u8>)],
) -> Result<Vec<PutOutcome>, Error> {
    let mut queues = txn.open_table(QUEUES)?;
    let mut entries = txn.open_table(ENTRIES)?;
    let mut keys = txn.open_table(KEYS)?;
    let mut row = load_row(&queues, queue)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, (key, frame)) in items.iter().enumerate() {
        if i == items.len() / 2 {
            crate::failpoint("mailbox_put:mid");
        }
        let enc_key = encode_key(key);
        let index_key = queue_key(queue, &enc_key);
        if let Some(v) = keys.get(index_key.as_slice())? {
            decode_index(queue, &index_key, v.value())?;
            out.push(PutOutcome::Duplicate);
            continue;
        }
        let len = frame_len(frame);
        let bytes = row.bytes.saturating_add(len);
        let (Some(entries_after), Some(next)) =
            (row.entries.checked_add(1), row.next_pos.checked_add(1))
        else {
            out.push(PutOutcome::Full);
            continue;
        };
        if entries_after > limits.max_entries || bytes > limits.max_bytes {
            out.push(PutOutcome::Full);
            continue;
        }
        let pos = row.next_pos;
        let slot = entry_slot(queue, pos);
        let value = seal_value(&slot, ENTRY_TAG, &[&enc_key, frame]);
        entries.insert(slot.as_slice(), value.as_slice())?;
        let index = seal_value(&index_key, KEY_TAG, &[&pos.to_le_bytes()]);
        keys.insert(index_key.as_slice(), index.as_slice())?;
        row = QueueRow {
            next_pos: next,
            entries: entries_after,
            bytes,
        };
        out.push(PutOutcome::Stored(pos));
    }
    queues.insert(queue.as_bytes(), row.encode(queue).as_slice())?;
    crate::failpoint("mailbox_put:before_commit");
    Ok(out)
}

fn remove_keys(txn: &WriteTransaction, queue: &str, keys: &[EntryKey]) -> Result<usize, Error> {
    let mut queues = txn.open_table(QUEUES)?;
    let mut entries = txn.open_table(ENTRIES)?;
    let mut index = txn.open_table(KEYS)?;
    let mut row = load_row(&queues, queue)?;
    let mut removed = 0usize;
    for (i, key) in keys.iter().enumerate() {
        if i == keys.len() / 2 {
            crate::failpoint("mailbox_remove:mid");
        }
        if !valid_key(key) {
            continue;
        }
        let index_key = queue_key(queue, &encode_key(key));
        let pos = match index.remove(index_key.as_slice())? {
            None => continue,
            Some(v) => decode_index(queue, &index_key, v.value())?,
        };
        let slot = entry_slot(queue, pos);
        let entry = match entries.remove(slot.as_slice())? {
            // The index points to no entry: the file was changed behind our back.
            None => return Err(corrupt(queue, Some(pos))),
            Some(v) => decode_entry(queue, &slot, v.value())?,
        };
        if entry.key != *key {
            return Err(corrupt(queue, Some(pos)));
        }
        row.entries = row
            .entries
            .checked_sub(1)
            .ok_or_else(|| corrupt(queue, None))?;
        row.bytes = row
            .bytes
            .checked_sub(frame_len(&entry.frame))
            .ok_or_else(|| corrupt(queue, None))?;
        removed = removed.saturating_add(1);
    }
    if removed > 0 {
        queues.insert(queue.as_bytes(), row.encode(queue).as_slice())?;
    }
    Ok(removed)
}

/// Drops the entry at `pos` without decoding it, drops the index entries that point to it
/// or are damaged, and rebuilds the queue's counters from its remaining entries.
fn quarantine(txn: &WriteTransaction, queue: &str, pos: u64) -> Result<bool, Error> {
    let mut queues = txn.open_table(QUEUES)?;
    let mut entries = txn.open_table(ENTRIES)?;
    let mut index = txn.open_table(KEYS)?;
    let existed = entries.remove(entry_slot(queue, pos).as_slice())?.is_some();
    // The index keys of this queue start with `queue ‖ 0x00 ‖ len`, len in 1..=64.
    let (lo, hi) = (queue_key(queue, &[1]), queue_key(queue, &[u8::MAX]));
    index.retain_in(lo.as_slice()..hi.as_slice(), |k, v| {
        decode_index(queue, k, v).is_ok_and(|p| p != pos)
    })?;
    let old_next = queues
        .get(queue.as_bytes())?
        .and_then(|v| QueueRow::decode(queue, v.value()))
        .map_or(0, |r| r.next_pos);
    let mut row = QueueRow {
        next_pos: old_next.max(pos.saturating_add(1)),
        ..QueueRow::default()
    };
    let (lo, hi) = (entry_slot(queue, 0), entry_slot(queue, u64::MAX));
    for e in entries.range(lo.as_slice()..=hi.as_slice())? {
        let (k, v) = e?;
        // Another damaged entry is counted with its whole value length (more than its frame,
        // so the bound stays safe) and stays reported until it is quarantined too.
        let (p, len) = match decode_entry(queue, k.value(), v.value()) {
            Ok(entry) => (Some(entry.pos), frame_len(&entry.frame)),
            Err(_) => (pos_of(queue, k.value()), frame_len(v.value())),
        };
        row.entries = row.entries.saturating_add(1);
        row.bytes = row.bytes.saturating_add(len);
        if let Some(p) = p {
            row.next_pos = row.next_pos.max(p.saturating_add(1));
        }
    }
    queues.insert(queue.as_bytes(), row.encode(queue).as_slice())?;
    Ok(existed)
}

impl Mailbox {
    /// Opens (or creates) the mailbox at `path`. A damaged file is an error, never a silent
    /// reset.
    ///
    /// Runs redb's full integrity check and checks the schema marker: a damaged file, another
    /// redb file (a device store, say) or another schema version is
    /// [`Error::CorruptMailboxFile`].
    /// `limits` apply from now on; entries already stored beyond lower limits stay.
    pub fn open(path: &Path, limits: MailboxLimits) -> Result<Mailbox, Error> {
        let name = path.display().to_string();
        let r = crate::guard(|| {
            let mut db = Builder::new().create(path)?;
            if !db.check_integrity()? {
                return Err(Error::Corrupt(
                    "mailbox integrity check failed (damaged pages; the file was rolled back \
                     to its last intact commit)"
                        .into(),
                ));
            }
            let mailbox = Mailbox {
                db,
                limits,
                path: name.clone(),
            };
            mailbox.init()?;
            Ok(mailbox)
        });
        r.map_err(|e| file_error(&name, e))
    }

    fn init(&self) -> Result<(), Error> {
        let rtx = self.db.begin_read()?;
        let names: Vec<String> = rtx.list_tables()?.map(|h| h.name().to_string()).collect();
        if names.is_empty() && rtx.list_multimap_tables()?.count() == 0 {
            drop(rtx);
            return self.write(|txn| {
                txn.open_table(META)?
                    .insert(SCHEMA_KEY, schema_value().as_slice())?;
                for t in [QUEUES, ENTRIES, KEYS] {
                    txn.open_table(t)?;
                }
                Ok(())
            });
        }
        if !names.iter().any(|n| n == META.name()) {
            return Err(Error::Corrupt(
                "not a KEAV mailbox (a redb database without mailbox metadata)".into(),
            ));
        }
        let meta = rtx.open_table(META)?;
        let marker = meta
            .get(SCHEMA_KEY)?
            .ok_or_else(|| Error::Corrupt("mailbox schema marker missing".into()))?;
        let marker = marker.value();
        if marker.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(Error::Corrupt("bad mailbox schema magic".into()));
        }
        if marker != schema_value().as_slice() {
            return Err(Error::Corrupt(format!(
                "mailbox schema {}, this build reads version {SCHEMA_VERSION}",
                crate::hex(marker.get(MAGIC.len()..).unwrap_or_default())
            )));
        }
        for t in [QUEUES, ENTRIES, KEYS] {
            if !names.iter().any(|n| n == t.name()) {
                return Err(Error::Corrupt(format!(
                    "mailbox table {} missing",
                    t.name()
                )));
            }
        }
        Ok(())
    }

    /// Runs `f` in one write transaction and commits it; an error aborts it.
    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T, Error>) -> Result<T, Error> {
        let r = crate::guard(|| {
            let txn = self.db.begin_write()?;
            match f(&txn) {
                Ok(v) => {
                    txn.commit()?;
                    Ok(v)
                }
                Err(e) => {
                    let _ = txn.abort();
                    Err(e)
                }
            }
        });
        r.map_err(|e| file_error(&self.path, e))
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T, Error>) -> Result<T, Error> {
        let r = crate::guard(|| {
            let rtx = self.db.begin_read()?;
            f(&rtx)
        });
        r.map_err(|e| file_error(&self.path, e))
    }

    fn table(
        rtx: &ReadTransaction,
        def: Raw,
    ) -> Result<ReadOnlyTable<&'static [u8], &'static [u8]>, Error> {
        Ok(rtx.open_table(def)?)
    }

    /// The bounds in force.
    pub fn limits(&self) -> MailboxLimits {
        self.limits
    }

    /// Adds entries to `queue` in one transaction (fsync once); one outcome per item, in order.
    ///
    /// [`Error::InvalidName`] (nothing stored) if the queue name or a key's `src` or `dst` is
    /// not 1–64 characters of `[A-Za-z0-9_-]`. A key that occurs twice in `items` is stored
    /// once (the second is a [`PutOutcome::Duplicate`]).
    pub fn put_batch(
        &self,
        queue: &str,
        items: &[(EntryKey, Vec<u8>)],
    ) -> Result<Vec<PutOutcome>, Error> {
        check_name(queue)?;
        if !items.iter().all(|(k, _)| valid_key(k)) {
            return Err(Error::InvalidName);
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|txn| put_items(txn, &self.limits, queue, items))
    }

    /// Up to `max` entries of `queue` with a position above `after` (None: from the start),
    /// in order.
    pub fn peek(&self, queue: &str, after: Option<u64>, max: usize) -> Result<Vec<Entry>, Error> {
        check_name(queue)?;
        let start = match after {
            None => 0,
            Some(a) => match a.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
        };
        if max == 0 {
            return Ok(Vec::new());
        }
        self.read(|rtx| {
            let t = Self::table(rtx, ENTRIES)?;
            let (lo, hi) = (entry_slot(queue, start), entry_slot(queue, u64::MAX));
            let mut out = Vec::new();
            for e in t.range(lo.as_slice()..=hi.as_slice())?.take(max) {
                let (k, v) = e?;
                out.push(decode_entry(queue, k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    /// The entry of `queue` with this key, if the queue holds it (a point lookup through the
    /// dedupe index, whatever its position).
    ///
    /// [`Error::InvalidName`] if the queue name is invalid; a key whose `src` or `dst` is not
    /// a valid id is never held (`None`). A damaged index value or entry, or an index value
    /// pointing to no entry or to an entry with another key, is [`Error::CorruptMailbox`].
    pub fn find(&self, queue: &str, key: &EntryKey) -> Result<Option<Entry>, Error> {
        check_name(queue)?;
        if !valid_key(key) {
            return Ok(None);
        }
        self.read(|rtx| {
            let index_key = queue_key(queue, &encode_key(key));
            let pos = match Self::table(rtx, KEYS)?.get(index_key.as_slice())? {
                None => return Ok(None),
                Some(v) => decode_index(queue, &index_key, v.value())?,
            };
            let slot = entry_slot(queue, pos);
            let entry = match Self::table(rtx, ENTRIES)?.get(slot.as_slice())? {
                None => return Err(corrupt(queue, Some(pos))),
                Some(v) => decode_entry(queue, &slot, v.value())?,
            };
            if entry.key != *key {
                return Err(corrupt(queue, Some(pos)));
            }
            Ok(Some(entry))
        })
    }

    /// Removes the entries of `queue` with these keys (custody passed on) in one transaction;
    /// returns how many were there.
    pub fn remove(&self, queue: &str, keys: &[EntryKey]) -> Result<usize, Error> {
        check_name(queue)?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.write(|txn| remove_keys(txn, queue, keys))
    }

    /// Drops the entry at `pos` of `queue` (typically one reported damaged by
    /// [`Error::CorruptMailbox`]) without decoding it, together with its index entry and any
    /// damaged index entry of the queue, and recounts the queue (another damaged entry counts
    /// with its whole stored size until it is dropped too). Its sender still holds the
    /// message in its outbox and resends it. Returns whether there was such an entry.
    ///
    /// Scans the whole queue: an operator's repair, not a hot path.
    pub fn quarantine_entry(&self, queue: &str, pos: u64) -> Result<bool, Error> {
        check_name(queue)?;
        self.write(|txn| quarantine(txn, queue, pos))
    }

    /// Every non-empty queue and its size, sorted by name.
    pub fn queues(&self) -> Result<Vec<(String, QueueStats)>, Error> {
        self.read(|rtx| {
            let t = Self::table(rtx, QUEUES)?;
            let mut out = Vec::new();
            for e in t.iter()? {
                let (k, v) = e?;
                let k = k.value();
                let name = std::str::from_utf8(k)
                    .ok()
                    .filter(|n| valid_id(n))
                    .ok_or_else(|| corrupt(&String::from_utf8_lossy(k), None))?;
                let row = QueueRow::decode(name, v.value()).ok_or_else(|| corrupt(name, None))?;
                if row.entries > 0 {
                    out.push((name.to_owned(), row.stats()));
                }
            }
            Ok(out)
        })
    }

    /// The size of `queue`.
    pub fn queue_stats(&self, queue: &str) -> Result<QueueStats, Error> {
        check_name(queue)?;
        self.read(|rtx| Ok(load_row(&Self::table(rtx, QUEUES)?, queue)?.stats()))
    }
}
