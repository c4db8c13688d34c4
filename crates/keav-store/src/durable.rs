//! Persisted durable channels (docs/MESSAGING.md): per peer device name, the channel's key
//! state, its outbox (sealed records not yet acknowledged end to end) and its inbox (opened
//! messages not yet acknowledged by the application), written in one transaction per
//! [`Store::durable_commit`] so a crash leaves all of a batch or none of it.
//!
//! Tables: `keav_durable` (name → checksummed row), `keav_outbox` and `keav_inbox`
//! (name ‖ 0x00 ‖ seq u64 BE → bytes; the 0x00 cannot occur in a device name, so one
//! name's rows are one key range). Rows are checksummed and bound to their key like the
//! rest of the store; damage is [`Error::CorruptDurable`], never data.
//!
//! Encodings (each followed by the store's 16-byte checksum bound to the table key, see
//! `codec`): row `'D' ‖ 1 ‖ peer ZID (12) ‖ delivered u64 LE ‖ state (rest)`; outbox value
//! `'O' ‖ 1 ‖ payload (rest)`; inbox value `'M' ‖ 1 ‖ message (rest)`. The distinct tags keep
//! a value copied from one table into another (under the same key) from being accepted.
//!
//! A batch ([`Store::durable_commit`]) opens each table once and deletes with range deletes,
//! so its cost is proportional to the rows it touches, not to the size of the outbox.

use keav_proto::route::valid_id;
use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};
use zeroize::Zeroizing;

use crate::{codec, Error, Store};

type Raw = TableDefinition<'static, &'static [u8], &'static [u8]>;
type RawRead = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// Name → row.
const DURABLE: Raw = TableDefinition::new("keav_durable");
/// Name ‖ 0x00 ‖ seq u64 BE → sealed record waiting for its end-to-end ack.
const OUTBOX: Raw = TableDefinition::new("keav_outbox");
/// Name ‖ 0x00 ‖ seq u64 BE → opened message waiting for the application's ack.
const INBOX: Raw = TableDefinition::new("keav_inbox");

const ROW_TAG: u8 = b'D';
const OUTBOX_TAG: u8 = b'O';
const INBOX_TAG: u8 = b'M';
const VERSION: u8 = 1;

/// The persisted row of one durable channel. `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct DurableRow {
    /// The peer's ZID (its verified identity).
    pub peer_zid: [u8; 12],
    /// keav-proto's encoded `DurableState` (opaque here).
    pub state: Zeroizing<Vec<u8>>,
    /// The application acknowledged every message below this sequence number.
    pub delivered: u64,
}

impl core::fmt::Debug for DurableRow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableRow")
            .field("delivered", &self.delivered)
            .field("state_len", &self.state.len())
            .finish_non_exhaustive()
    }
}

/// Changes to one durable channel, applied with others in one transaction.
///
/// Within one update the row is written first, then the new outbox and inbox rows, then the
/// deletions: after the update no row below a `*_delete_below` mark is left. Rows can only
/// be added to a channel that has a row (in the store, or set by this or an earlier update of
/// the same batch). `Debug` shows counts, never payloads or messages.
#[derive(Default)]
pub struct DurableUpdate {
    /// The peer device's name (1–64 chars of `[A-Za-z0-9_-]`).
    pub name: String,
    /// Replaces the row when set.
    pub row: Option<DurableRow>,
    /// Outbox rows to add (sequence number, payload).
    pub outbox_put: Vec<(u64, Vec<u8>)>,
    /// Deletes outbox rows with a sequence number below this.
    pub outbox_delete_below: Option<u64>,
    /// Inbox rows to add (sequence number, message).
    pub inbox_put: Vec<(u64, Zeroizing<Vec<u8>>)>,
    /// Deletes inbox rows with a sequence number below this.
    pub inbox_delete_below: Option<u64>,
}

impl core::fmt::Debug for DurableUpdate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableUpdate")
            .field("name", &self.name)
            .field("row", &self.row)
            .field("outbox_put", &self.outbox_put.len())
            .field("outbox_delete_below", &self.outbox_delete_below)
            .field("inbox_put", &self.inbox_put.len())
            .field("inbox_delete_below", &self.inbox_delete_below)
            .finish()
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if valid_id(name) {
        Ok(())
    } else {
        Err(Error::InvalidName)
    }
}

fn corrupt(name: &str) -> Error {
    Error::CorruptDurable {
        name: name.to_owned(),
    }
}

/// `name ‖ 0x00 ‖ seq u64 BE`: one name's rows are one key range, in sequence order.
fn seq_key(name: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence number of a key of `name`'s range (`None`: not such a key).
fn seq_of(name: &str, key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(name.as_bytes())?.strip_prefix(&[0u8])?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// `tag ‖ version ‖ body`, sealed to `key`. Sized up front (with the checksum) so that no
/// reallocation leaves copies of the body behind.
pub(crate) fn seal_value(key: &[u8], tag: u8, body: &[&[u8]]) -> Zeroizing<Vec<u8>> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    let mut b = Zeroizing::new(Vec::with_capacity(2 + len + 16));
    b.push(tag);
    b.push(VERSION);
    for part in body {
        b.extend_from_slice(part);
    }
    codec::seal(key, b)
}

/// Checks the checksum, tag and version; returns the body.
pub(crate) fn unseal_value<'a>(key: &[u8], tag: u8, bytes: &'a [u8]) -> Option<&'a [u8]> {
    let sealed = codec::unseal(key, bytes)?;
    let (&[t, v], body) = sealed.split_first_chunk::<2>()?;
    (t == tag && v == VERSION).then_some(body)
}

fn encode_row(name: &str, row: &DurableRow) -> Zeroizing<Vec<u8>> {
    seal_value(
        name.as_bytes(),
        ROW_TAG,
        &[&row.peer_zid, &row.delivered.to_le_bytes(), &row.state],
    )
}

fn decode_row(name: &str, bytes: &[u8]) -> Option<DurableRow> {
    let body = unseal_value(name.as_bytes(), ROW_TAG, bytes)?;
    let (zid, rest) = body.split_first_chunk::<12>()?;
    let (delivered, state) = rest.split_first_chunk::<8>()?;
    Some(DurableRow {
        peer_zid: *zid,
        state: Zeroizing::new(state.to_vec()),
        delivered: u64::from_le_bytes(*delivered),
    })
}

/// Opens a table for reading; a store that never had a durable channel has none.
fn open_read(rtx: &ReadTransaction, def: Raw) -> Result<Option<RawRead>, Error> {
    match rtx.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every row of `name` in `def`, in sequence order, each verified and passed through `f`.
fn read_rows<T>(
    rtx: &ReadTransaction,
    def: Raw,
    tag: u8,
    name: &str,
    f: impl Fn(&[u8]) -> T,
) -> Result<Vec<(u64, T)>, Error> {
    let Some(t) = open_read(rtx, def)? else {
        return Ok(Vec::new());
    };
    let (lo, hi) = (seq_key(name, 0), seq_key(name, u64::MAX));
    let mut out = Vec::new();
    for entry in t.range(lo.as_slice()..=hi.as_slice())? {
        let (k, v) = entry?;
        let k = k.value();
        let seq = seq_of(name, k).ok_or_else(|| corrupt(name))?;
        let body = unseal_value(k, tag, v.value()).ok_or_else(|| corrupt(name))?;
        out.push((seq, f(body)));
    }
    Ok(out)
}

fn put_rows<'p>(
    t: &mut Table<&'static [u8], &'static [u8]>,
    tag: u8,
    name: &str,
    rows: impl Iterator<Item = (u64, &'p [u8])>,
) -> Result<(), Error> {
    for (seq, payload) in rows {
        let k = seq_key(name, seq);
        let v = seal_value(&k, tag, &[payload]);
        t.insert(k.as_slice(), v.as_slice())?;
    }
    Ok(())
}

/// Range delete of `name`'s rows with a sequence number below `below` (cost proportional to
/// the rows deleted).
fn delete_below(
    t: &mut Table<&'static [u8], &'static [u8]>,
    name: &str,
    below: u64,
) -> Result<(), Error> {
    if below == 0 {
        return Ok(());
    }
    let (lo, hi) = (seq_key(name, 0), seq_key(name, below));
    t.retain_in(lo.as_slice()..hi.as_slice(), |_, _| false)?;
    Ok(())
}

fn delete_all(t: &mut Table<&'static [u8], &'static [u8]>, name: &str) -> Result<(), Error> {
    let (lo, hi) = (seq_key(name, 0), seq_key(name, u64::MAX));
    t.retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)?;
    Ok(())
}

/// Removes every durable channel whose peer is `zid`, with its outbox and inbox rows (inside
/// the caller's transaction; used by [`Store::forget`]). Rows that fail their check are left
/// alone: whose they are cannot be told.
pub(crate) fn remove_peer(txn: &WriteTransaction, zid: &[u8; 12]) -> Result<(), Error> {
    let mut rows = txn.open_table(DURABLE)?;
    let mut names = Vec::new();
    for entry in rows.iter()? {
        let (k, v) = entry?;
        let Ok(name) = core::str::from_utf8(k.value()) else {
            continue;
        };
        if decode_row(name, v.value()).is_some_and(|r| &r.peer_zid == zid) {
            names.push(name.to_string());
        }
    }
    let mut outbox = txn.open_table(OUTBOX)?;
    let mut inbox = txn.open_table(INBOX)?;
    for name in names {
        rows.remove(name.as_bytes())?;
        delete_all(&mut outbox, &name)?;
        delete_all(&mut inbox, &name)?;
    }
    Ok(())
}

fn apply(txn: &WriteTransaction, updates: &[DurableUpdate]) -> Result<(), Error> {
    let mut rows = txn.open_table(DURABLE)?;
    let mut outbox = txn.open_table(OUTBOX)?;
    let mut inbox = txn.open_table(INBOX)?;
    for (i, u) in updates.iter().enumerate() {
        let name = u.name.as_str();
        if let Some(row) = &u.row {
            rows.insert(name.as_bytes(), encode_row(name, row).as_slice())?;
        } else if (!u.outbox_put.is_empty() || !u.inbox_put.is_empty())
            && rows.get(name.as_bytes())?.is_none()
        {
            return Err(Error::NotFound);
        }
        let out = u.outbox_put.iter().map(|(s, p)| (*s, p.as_slice()));
        put_rows(&mut outbox, OUTBOX_TAG, name, out)?;
        let inb = u.inbox_put.iter().map(|(s, m)| (*s, m.as_slice()));
        put_rows(&mut inbox, INBOX_TAG, name, inb)?;
        if let Some(below) = u.outbox_delete_below {
            delete_below(&mut outbox, name, below)?;
        }
        if let Some(below) = u.inbox_delete_below {
            delete_below(&mut inbox, name, below)?;
        }
        if i == 0 {
            crate::failpoint("durable_commit:after_first");
        }
    }
    crate::failpoint("durable_commit:before_commit");
    Ok(())
}

impl Store {
    /// Applies `updates` in one write transaction (fsync once): all of them or, on an error
    /// or a crash, none.
    ///
    /// [`Error::InvalidName`] if a name is not 1–64 characters of `[A-Za-z0-9_-]`;
    /// [`Error::NotFound`] if an update adds outbox or inbox rows to a channel without a row.
    pub fn durable_commit(&self, updates: &[DurableUpdate]) -> Result<(), Error> {
        for u in updates {
            check_name(&u.name)?;
        }
        if updates.is_empty() {
            return Ok(());
        }
        self.write(|txn| apply(txn, updates))
    }

    /// The row of the durable channel with `name`; [`Error::CorruptDurable`] if it fails its
    /// integrity check.
    pub fn durable_row(&self, name: &str) -> Result<Option<DurableRow>, Error> {
        check_name(name)?;
        self.read(|rtx| {
            let Some(t) = open_read(rtx, DURABLE)? else {
                return Ok(None);
            };
            let Some(v) = t.get(name.as_bytes())? else {
                return Ok(None);
            };
            decode_row(name, v.value())
                .map(Some)
                .ok_or_else(|| corrupt(name))
        })
    }

    /// Names of all durable channels, sorted.
    pub fn durable_names(&self) -> Result<Vec<String>, Error> {
        self.read(|rtx| {
            let Some(t) = open_read(rtx, DURABLE)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (k, _) = entry?;
                let name = std::str::from_utf8(k.value())
                    .ok()
                    .filter(|n| valid_id(n))
                    .ok_or_else(|| {
                        Error::Corrupt("durable channel table holds an invalid name".into())
                    })?;
                out.push(name.to_owned());
            }
            Ok(out)
        })
    }

    /// The outbox rows of `name`, in sequence order; [`Error::CorruptDurable`] if any fails
    /// its integrity check.
    pub fn durable_outbox(&self, name: &str) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        check_name(name)?;
        self.read(|rtx| read_rows(rtx, OUTBOX, OUTBOX_TAG, name, <[u8]>::to_vec))
    }

    /// The inbox rows of `name`, in sequence order; [`Error::CorruptDurable`] if any fails
    /// its integrity check.
    #[allow(clippy::type_complexity)] // the stub's signature
    pub fn durable_inbox(&self, name: &str) -> Result<Vec<(u64, Zeroizing<Vec<u8>>)>, Error> {
        check_name(name)?;
        self.read(|rtx| read_rows(rtx, INBOX, INBOX_TAG, name, |m| Zeroizing::new(m.to_vec())))
    }

    /// Deletes the channel with `name` and all its outbox and inbox rows (damaged or not) in
    /// one transaction; whether its row existed.
    pub fn durable_delete(&self, name: &str) -> Result<bool, Error> {
        check_name(name)?;
        self.write(|txn| {
            let existed = txn.open_table(DURABLE)?.remove(name.as_bytes())?.is_some();
            delete_all(&mut txn.open_table(OUTBOX)?, name)?;
            delete_all(&mut txn.open_table(INBOX)?, name)?;
            Ok(existed)
        })
    }
}
