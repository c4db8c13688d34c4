//! State of the rendezvous server behind [`RendezvousStore`]: an in-memory map and a durable
//! redb file.

use super::proto::{put_addr, take_addr, DeviceId, Token};
use super::Error;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The address the device registered (as claimed; not verified).
    pub addr: SocketAddr,
    /// The registration's ownership token.
    pub token: Token,
    /// Unix second at which the registration expires.
    pub expires_at: u64,
}

impl Entry {
    /// Whether the registration is still live at `now` (`now < expires_at`).
    pub fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }
}

/// A registration attempt, as handed to [`RendezvousStore::put`].
#[derive(Clone, Debug)]
pub struct Claim {
    /// The address to register.
    pub addr: SocketAddr,
    /// Unix second at which the registration would expire.
    pub expires_at: u64,
    /// The token presented by the registrant, if any.
    pub presented: Option<Token>,
    /// A fresh random token, used if this claim creates a new registration.
    pub fresh: Token,
}

/// Result of [`RendezvousStore::put`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PutOutcome {
    /// The claim was stored; this is the registration now in force.
    Stored(Entry),
    /// A live registration holds the identifier and the claim did not present its token.
    Denied,
    /// The store is at its record limit.
    Full,
}

/// Result of [`RendezvousStore::remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoveOutcome {
    /// The registration was removed.
    Removed,
    /// No live registration for the identifier.
    NotFound,
    /// The token does not match the live registration.
    Denied,
}

/// The ownership rule, for store implementations: what `put` must store given the record
/// `existing` for the identifier (live or not), or `None` when the claim is denied.
///
/// No live record: a new registration with the claim's fresh token. A live record: replaced
/// (same token, new address and expiry) only when the claim presents its token.
pub fn apply_claim(existing: Option<&Entry>, claim: &Claim, now: u64) -> Option<Entry> {
    match existing.filter(|e| e.is_live(now)) {
        None => Some(Entry {
            addr: claim.addr,
            token: claim.fresh,
            expires_at: claim.expires_at,
        }),
        Some(live) if claim.presented.as_ref() == Some(&live.token) => Some(Entry {
            addr: claim.addr,
            token: live.token,
            expires_at: claim.expires_at,
        }),
        Some(_) => None,
    }
}

/// Where a rendezvous server keeps its registrations. Time is passed in as unix seconds.
///
/// Methods are synchronous and may block (disk); the server calls them on tokio's blocking
/// pool. Each method must be atomic with respect to the others (a `put` decides and writes
/// in one step), so two registrants racing for an identifier cannot both win.
pub trait RendezvousStore: Send + Sync {
    /// Registers `id` according to [`apply_claim`] (atomically), unless that would add a
    /// record beyond the store's limit ([`PutOutcome::Full`]).
    fn put(&self, id: &DeviceId, claim: &Claim, now: u64) -> Result<PutOutcome, Error>;

    /// The live registration of `id` at `now`; expired records are never returned.
    fn get(&self, id: &DeviceId, now: u64) -> Result<Option<Entry>, Error>;

    /// Removes the live registration of `id` if `token` is its token.
    fn remove(&self, id: &DeviceId, token: &Token, now: u64) -> Result<RemoveOutcome, Error>;

    /// Deletes every record expired at `now`; returns how many were deleted.
    fn purge_expired(&self, now: u64) -> Result<usize, Error>;
}

/// Default record limit of the stores.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

/// A [`RendezvousStore`] in memory (lost when the process ends).
#[derive(Debug)]
pub struct MemoryRendezvousStore {
    map: Mutex<HashMap<String, Entry>>,
    max_entries: usize,
}

impl Default for MemoryRendezvousStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRendezvousStore {
    /// An empty store holding at most 1 000 000 records.
    pub fn new() -> Self {
        Self::with_max_entries(DEFAULT_MAX_ENTRIES)
    }

    /// An empty store holding at most `max_entries` records.
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max_entries,
        }
    }

    /// Number of records held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Stores `entry` under `id` as is, ignoring the ownership rule and the record limit.
    ///
    /// For tests and tools only: e.g. a lying server whose store maps a device's identifier
    /// to an attacker's address.
    pub fn insert_unchecked(&self, id: &DeviceId, entry: Entry) {
        self.lock().insert(id.as_str().to_owned(), entry);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Every critical section leaves the map consistent, so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RendezvousStore for MemoryRendezvousStore {
    fn put(&self, id: &DeviceId, claim: &Claim, now: u64) -> Result<PutOutcome, Error> {
        let mut map = self.lock();
        let existing = map.get(id.as_str());
        let Some(entry) = apply_claim(existing, claim, now) else {
            return Ok(PutOutcome::Denied);
        };
        if existing.is_none() && map.len() >= self.max_entries {
            map.retain(|_, e| e.is_live(now));
            if map.len() >= self.max_entries {
                return Ok(PutOutcome::Full);
            }
        }
        map.insert(id.as_str().to_owned(), entry.clone());
        Ok(PutOutcome::Stored(entry))
    }

    fn get(&self, id: &DeviceId, now: u64) -> Result<Option<Entry>, Error> {
        let mut map = self.lock();
        match map.get(id.as_str()) {
            Some(e) if e.is_live(now) => Ok(Some(e.clone())),
            Some(_) => {
                map.remove(id.as_str());
                Ok(None)
            }
            None => Ok(None),
        }
    }

    fn remove(&self, id: &DeviceId, token: &Token, now: u64) -> Result<RemoveOutcome, Error> {
        let mut map = self.lock();
        let outcome = match map.get(id.as_str()) {
            Some(e) if !e.is_live(now) => {
                map.remove(id.as_str());
                RemoveOutcome::NotFound
            }
            Some(e) if e.token == *token => {
                map.remove(id.as_str());
                RemoveOutcome::Removed
            }
            Some(_) => RemoveOutcome::Denied,
            None => RemoveOutcome::NotFound,
        };
        Ok(outcome)
    }

    fn purge_expired(&self, now: u64) -> Result<usize, Error> {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| e.is_live(now));
        Ok(before.saturating_sub(map.len()))
    }
}

/// Table of registrations: identifier → encoded [`Entry`] (format byte, address, token,
/// expiry). The name carries the schema version.
const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("keav_rendezvous_v1");
const RECORD_FORMAT: u8 = 1;

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(44);
    out.push(RECORD_FORMAT);
    put_addr(&mut out, &e.addr);
    out.extend_from_slice(&e.token.to_bytes());
    out.extend_from_slice(&e.expires_at.to_be_bytes());
    out
}

fn decode_entry(b: &[u8]) -> Result<Entry, Error> {
    let (&format, rest) = b.split_first().ok_or(Error::Corrupt("empty record"))?;
    if format != RECORD_FORMAT {
        return Err(Error::Corrupt("unknown record format"));
    }
    let (addr, rest) = take_addr(rest).map_err(|_| Error::Corrupt("bad address"))?;
    let bad_len = || Error::Corrupt("bad record length");
    let (token, rest) = rest.split_first_chunk::<16>().ok_or_else(bad_len)?;
    let expires = <[u8; 8]>::try_from(rest).map_err(|_| bad_len())?;
    Ok(Entry {
        addr,
        token: Token::from_bytes(*token),
        expires_at: u64::from_be_bytes(expires),
    })
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    Error::Store(Box::new(e.into()))
}

/// A durable [`RendezvousStore`] in a redb file: registrations survive a restart of the
/// server. Every change is one write transaction committed with redb's default (immediate)
/// durability.
pub struct RedbRendezvousStore {
    db: Database,
    max_entries: u64,
}

impl std::fmt::Debug for RedbRendezvousStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbRendezvousStore")
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl RedbRendezvousStore {
    /// Opens the store at `path`, creating the file if needed; at most 1 000 000 records.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with_max_entries(path, DEFAULT_MAX_ENTRIES)
    }

    /// Opens the store at `path`, creating the file if needed; at most `max_entries` records.
    pub fn open_with_max_entries(
        path: impl AsRef<Path>,
        max_entries: usize,
    ) -> Result<Self, Error> {
        let db = Database::create(path).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(TABLE).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self {
            db,
            max_entries: u64::try_from(max_entries).unwrap_or(u64::MAX),
        })
    }
}

impl RendezvousStore for RedbRendezvousStore {
    fn put(&self, id: &DeviceId, claim: &Claim, now: u64) -> Result<PutOutcome, Error> {
        // redb serialises write transactions, so deciding and writing here is atomic.
        let tx = self.db.begin_write().map_err(db_err)?;
        let outcome = {
            let mut table = tx.open_table(TABLE).map_err(db_err)?;
            let existing = match table.get(id.as_str()).map_err(db_err)? {
                Some(v) => Some(decode_entry(v.value())?),
                None => None,
            };
            match apply_claim(existing.as_ref(), claim, now) {
                None => PutOutcome::Denied,
                Some(entry) => {
                    let mut full = false;
                    if existing.is_none() && table.len().map_err(db_err)? >= self.max_entries {
                        table
                            .retain(|_, v| decode_entry(v).is_ok_and(|e| e.is_live(now)))
                            .map_err(db_err)?;
                        full = table.len().map_err(db_err)? >= self.max_entries;
                    }
                    if full {
                        PutOutcome::Full
                    } else {
                        table
                            .insert(id.as_str(), encode_entry(&entry).as_slice())
                            .map_err(db_err)?;
                        PutOutcome::Stored(entry)
                    }
                }
            }
        };
        match outcome {
            PutOutcome::Stored(_) => tx.commit().map_err(db_err)?,
            _ => tx.abort().map_err(db_err)?,
        }
        Ok(outcome)
    }

    fn get(&self, id: &DeviceId, now: u64) -> Result<Option<Entry>, Error> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TABLE).map_err(db_err)?;
        match table.get(id.as_str()).map_err(db_err)? {
            Some(v) => {
                let e = decode_entry(v.value())?;
                Ok(e.is_live(now).then_some(e))
            }
            None => Ok(None),
        }
    }

    fn remove(&self, id: &DeviceId, token: &Token, now: u64) -> Result<RemoveOutcome, Error> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let outcome = {
            let mut table = tx.open_table(TABLE).map_err(db_err)?;
            let existing = match table.get(id.as_str()).map_err(db_err)? {
                Some(v) => Some(decode_entry(v.value())?),
                None => None,
            };
            match existing {
                None => RemoveOutcome::NotFound,
                Some(e) if !e.is_live(now) => {
                    table.remove(id.as_str()).map_err(db_err)?;
                    RemoveOutcome::NotFound
                }
                Some(e) if e.token == *token => {
                    table.remove(id.as_str()).map_err(db_err)?;
                    RemoveOutcome::Removed
                }
                Some(_) => RemoveOutcome::Denied,
            }
        };
        tx.commit().map_err(db_err)?;
        Ok(outcome)
    }

    fn purge_expired(&self, now: u64) -> Result<usize, Error> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let removed = {
            let mut table = tx.open_table(TABLE).map_err(db_err)?;
            let before = table.len().map_err(db_err)?;
            // Undecodable records are dropped too: they can never be served.
            table
                .retain(|_, v| decode_entry(v).is_ok_and(|e| e.is_live(now)))
                .map_err(db_err)?;
            before.saturating_sub(table.len().map_err(db_err)?)
        };
        tx.commit().map_err(db_err)?;
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_codec_round_trip_and_corruption() {
        let e = Entry {
            addr: "[fe80::1]:7000".parse().unwrap(),
            token: Token::from_bytes([3; 16]),
            expires_at: 12345,
        };
        let b = encode_entry(&e);
        assert_eq!(b.len(), 1 + 1 + 16 + 2 + 16 + 8);
        assert_eq!(decode_entry(&b).unwrap(), e);
        for n in 0..b.len() {
            assert!(decode_entry(&b[..n]).is_err());
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(decode_entry(&longer).is_err());
        let mut fmt = b;
        fmt[0] = 9;
        assert!(decode_entry(&fmt).is_err());
    }
}
