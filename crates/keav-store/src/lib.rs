//! Durable, crash-safe device store of KEAV (PROTOCOL.md §4), on [redb] 2.
//!
//! One file holds what a device must remember between sessions:
//! - its **identity** (a random ZID drawn from the OS CSPRNG on first open, and its creation
//!   time);
//! - one **peer record** per known peer: optional ZID and local label, key-continuity
//!   [`Mode`], the retained secrets rs1/rs2 with their expiry, the session counter, the
//!   `verify_due` flag, the verification failure counter with the lockout deadline, and the
//!   outcome of the last verification;
//! - three **indexes** (by ZID, by label, and by the initiator retained-secret ID
//!   `rs1IDi`/`rs2IDi` of RFC 6189 §4.3.1, which paranoid mode looks peers up by).
//! - the **channel states** of durable channels, per (peer, channel id): the record layer's
//!   sealer and opener states ([`Store::put_channel_state`], [`ChannelState`]).
//! - the **durable channels** by peer device name: key state, outbox and inbox, changed in
//!   batches of one transaction each ([`Store::durable_commit`], [`DurableUpdate`]).
//!
//! A relay's [`mailbox`] is a separate file with the same record format.
//!
//! Every change is one redb write transaction committed with `Durability::Immediate` (fsync
//! before [`Store::commit_session`] returns): the record, its index entries and the counters
//! change together or not at all. Records use a private versioned binary encoding sealed with
//! a 128-bit truncated SHA-256 checksum bound to the record's key, so a damaged value is
//! reported instead of being used. Index hits are cross-checked against the record they point
//! to. No error message ever contains a secret.
//!
//! # What happens when things go wrong
//!
//! - **Crash (power loss, `kill -9`, panic) during [`Store::commit_session`]** or any other
//!   update: redb commits are atomic, so the next [`Store::open`] sees exactly the state
//!   before the interrupted transaction — old rs1/rs2, old session counter, old failure
//!   counters — or, if the commit had completed, exactly the new one. Never a mixture. If the
//!   peer had already rotated to the new secrets, the next session finds that the peer's rs2
//!   (its previous rs1) matches our rs1, so it still succeeds by key continuity; if only we had
//!   rotated, our rs2 matches the peer's rs1. At worst (both sides interrupted on different
//!   sides of the commit more than once) nothing matches: that is an ordinary *cache
//!   mismatch*, which falls back to one DH exchange with a verification secret (PROTOCOL.md
//!   §4) and never silently accepts a man in the middle. A crash during a failure-counter
//!   update either counts the failure or not; lockouts recorded by a committed transaction
//!   survive restarts.
//! - **Corrupted file** (not a redb file, a redb file of another program, a different schema
//!   version, a truncated file, or pages whose redb checksums fail): [`Store::open`] fails with
//!   [`Error::Corrupt`], whose message tells the operator to move the file aside. Nothing is
//!   deleted or overwritten automatically. Once the file is moved aside, the next open creates
//!   a fresh store: the device gets a **new identity** and re-pairs with its peers as in the
//!   *deleted store* case below. (If redb's integrity check could roll the file back to its
//!   last intact commit, it has already done so when the error is returned; the file is still
//!   reported as corrupt because state may have been lost.) Should the storage engine itself
//!   fail on damaged data, the panic is caught and reported as [`Error::Corrupt`] too.
//! - **Corrupted record** (a stored value whose checksum, version or layout is wrong): the
//!   read returns [`Error::CorruptRecord`] naming the peer handle; wrong secrets are never
//!   returned. The caller decides when to drop the record with [`Store::quarantine_corrupt`];
//!   afterwards that peer is unknown, so the next session with it is a first session (DH and
//!   verification, which needs a verification secret to be bound).
//! - **Deleted store**: the next open creates a new store with a **new identity** and no peers.
//!   Peers that remember this device still hold retained secrets for it, so they see a *cache
//!   mismatch* in the next session (by the old ZID the device is gone; by the new ZID it is a
//!   stranger) and, per PROTOCOL.md §4, accept it only if the equality test passes with a
//!   verification secret (or their policy allows re-pairing).
//!
//! Erasure: [`Store::forget`] removes the record, its index entries and its channel states in
//! one transaction, and every in-memory copy of a secret made by this crate is zeroized. redb
//! is copy-on-write, so the bytes of freed pages stay in the file until the pages are reused;
//! protect the file itself (permissions, disk encryption) accordingly.
//!
//! [redb]: https://docs.rs/redb/2
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod channels;
mod codec;
mod durable;
pub mod ledger;
pub mod mailbox;
#[cfg(test)]
mod tests;

pub use channels::ChannelState;
pub use durable::{DurableRow, DurableUpdate};
use hmac::{Hmac, Mac};
use keav_proto::cache::{CacheUpdate, LockoutPolicy, Mode, PeerCache, Verification, Zid};
use keav_proto::secret::Secret32;
use rand_core::{OsRng, RngCore};
use redb::{
    Builder, Database, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle, WriteTransaction,
};
use sha2::Sha256;
use std::path::Path;
use subtle::ConstantTimeEq;

/// Random local handle of a peer record (never sent on the wire).
pub type PeerId = [u8; 16];

/// Failure bucket for peers that cannot be identified (e.g. an attacker in paranoid mode whose
/// retained-secret IDs match nobody). It is created on its first failure, holds no secrets, and
/// is not listed by [`Store::list_peers`].
pub const ANONYMOUS_PEER: PeerId = [0u8; 16];

/// The device's own identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The device ZID, drawn from the OS CSPRNG when the store was created.
    pub zid: Zid,
    /// Unix second at which the store was created.
    pub created_at: u64,
}

/// Everything the store remembers about one peer.
#[derive(Clone, Debug)]
pub struct PeerRecord {
    /// Local handle of the record.
    pub id: PeerId,
    /// The peer's ZID, if known (paranoid-mode peers have none).
    pub zid: Option<Zid>,
    /// Local, unique, human-chosen name.
    pub label: Option<String>,
    /// Key-continuity mode used with this peer.
    pub mode: Mode,
    /// Retained secrets, expiry, session counter, `verify_due` and lockout deadline.
    pub cache: PeerCache,
    /// Consecutive failed verifications (reset by a session whose equality test ran).
    pub verify_failures: u32,
    /// Unix second of the last failed verification.
    pub last_failure_at: Option<u64>,
    /// Session number and outcome of the verification step of the last committed session.
    pub last_verification: Option<(u64, Verification)>,
    /// Unix second at which the record was created.
    pub created_at: u64,
    /// Unix second of the last committed session or failure.
    pub updated_at: u64,
}

impl PartialEq for PeerRecord {
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (&self.cache, &o.cache);
        self.id == o.id
            && self.zid == o.zid
            && self.label == o.label
            && self.mode == o.mode
            && a.rs1 == b.rs1
            && a.rs2 == b.rs2
            && a.expires_at == b.expires_at
            && a.sessions == b.sessions
            && a.verify_due == b.verify_due
            && a.locked_until == b.locked_until
            && self.verify_failures == o.verify_failures
            && self.last_failure_at == o.last_failure_at
            && self.last_verification == o.last_verification
            && self.created_at == o.created_at
            && self.updated_at == o.updated_at
    }
}

impl Eq for PeerRecord {}

/// Lockout state of a peer at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockState {
    /// Consecutive failed verifications.
    pub failures: u32,
    /// The peer is locked out until this unix second (`None`: not locked out now).
    pub locked_until: Option<u64>,
}

/// Errors of the store. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Operating-system I/O error.
    #[error("store i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a KEAV store, has another schema version, or is damaged.
    #[error(
        "store file is corrupt or not a KEAV store ({0}); move the file aside: the device then \
         starts with a new identity and re-pairs with its peers"
    )]
    Corrupt(String),
    /// One peer record failed its integrity check.
    #[error(
        "stored record of peer {} failed its integrity check; drop it with quarantine_corrupt \
         (that peer then has to pair again)",
        hex(.peer)
    )]
    CorruptRecord {
        /// Handle of the damaged record.
        peer: PeerId,
    },
    /// One channel-state record failed its integrity check.
    #[error(
        "stored state of channel {channel} with peer {} failed its integrity check; delete it \
         with delete_channel_state (the channel then has to be established again)",
        hex(.peer)
    )]
    CorruptChannel {
        /// The peer of the damaged channel.
        peer: PeerId,
        /// The channel id.
        channel: u32,
    },
    /// The stored row, outbox or inbox of a durable channel failed its integrity check.
    #[error(
        "stored data of durable channel {name} failed its integrity check; delete it with \
         durable_delete (the channel then has to be established again)"
    )]
    CorruptDurable {
        /// The peer device's name.
        name: String,
    },
    /// A value of a relay mailbox failed its integrity check.
    #[error(
        "mailbox queue {queue} holds a damaged value{}; drop a damaged entry with \
         Mailbox::quarantine_entry (its sender resends it)",
        .pos.map(|p| format!(" at position {p}")).unwrap_or_default()
    )]
    CorruptMailbox {
        /// The queue (next hop) whose data is damaged.
        queue: String,
        /// Position of the damaged entry, when known.
        pos: Option<u64>,
    },
    /// A relay mailbox file is damaged, not a KEAV mailbox, or of another schema version.
    #[error(
        "mailbox file {path} is corrupt or not a KEAV mailbox ({detail}); move it aside: a \
         new mailbox is created, and the senders resend what was not yet passed on"
    )]
    CorruptMailboxFile {
        /// The mailbox file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A device, relay or queue name is not 1 to 64 characters of `[A-Za-z0-9_-]`.
    #[error("invalid name (1 to 64 characters of [A-Za-z0-9_-] expected)")]
    InvalidName,
    /// No record with this handle.
    #[error("no such peer")]
    NotFound,
    /// Another peer already has this label.
    #[error("label already used by another peer")]
    LabelTaken,
    /// Another peer already has this ZID.
    #[error("ZID already bound to another peer")]
    ZidTaken,
    /// The label is empty or longer than 255 bytes.
    #[error("invalid label (1 to 255 bytes expected)")]
    InvalidLabel,
    /// Any other storage-engine error (message only).
    #[error("store engine error: {0}")]
    Db(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Error {
    fn storage(e: redb::StorageError) -> Error {
        match e {
            redb::StorageError::Corrupted(msg) => Error::Corrupt(msg),
            redb::StorageError::Io(io) => match io.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData => {
                    Error::Corrupt(format!("file truncated or unreadable: {io}"))
                }
                _ => Error::Io(io),
            },
            other => Error::Db(other.to_string()),
        }
    }
}

impl From<redb::StorageError> for Error {
    fn from(e: redb::StorageError) -> Self {
        Error::storage(e)
    }
}

impl From<redb::DatabaseError> for Error {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::Storage(s) => Error::storage(s),
            redb::DatabaseError::DatabaseAlreadyOpen => {
                Error::Db("store is already open (by this or another process)".into())
            }
            redb::DatabaseError::UpgradeRequired(v) => {
                Error::Corrupt(format!("unsupported redb file format version {v}"))
            }
            other => Error::Db(other.to_string()),
        }
    }
}

impl From<redb::TransactionError> for Error {
    fn from(e: redb::TransactionError) -> Self {
        match e {
            redb::TransactionError::Storage(s) => Error::storage(s),
            other => Error::Db(other.to_string()),
        }
    }
}

impl From<redb::TableError> for Error {
    fn from(e: redb::TableError) -> Self {
        match e {
            redb::TableError::Storage(s) => Error::storage(s),
            redb::TableError::TableTypeMismatch { .. }
            | redb::TableError::TableIsMultimap(_)
            | redb::TableError::TableIsNotMultimap(_)
            | redb::TableError::TypeDefinitionChanged { .. }
            | redb::TableError::TableDoesNotExist(_) => {
                Error::Corrupt(format!("unexpected table layout: {e}"))
            }
            other => Error::Db(other.to_string()),
        }
    }
}

impl From<redb::CommitError> for Error {
    fn from(e: redb::CommitError) -> Self {
        match e {
            redb::CommitError::Storage(s) => Error::storage(s),
            other => Error::Db(other.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schema

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("keav_meta");
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keav_peers");
/// ZID (12 bytes) -> peer handle. Unique.
const ZID_IDX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keav_idx_zid");
/// Label -> peer handle. Unique.
const LABEL_IDX: TableDefinition<&str, &[u8]> = TableDefinition::new("keav_idx_label");
/// rs ID (8 bytes) ‖ peer handle -> empty. Several peers may share an rs ID.
const RSID_IDX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keav_idx_rsid");

const SCHEMA_KEY: &str = "schema";
const IDENTITY_KEY: &str = "identity";
const MAGIC: &[u8; 10] = b"KEAV-STORE";
/// Version of the table layout and record encodings.
const SCHEMA_VERSION: u32 = 1;

fn schema_value() -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    v
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// RFC 6189 retained-secret ID: the first 8 bytes of HMAC-SHA256(key = rs, msg = role).
fn rs_id(rs: &Secret32, role: &[u8]) -> Result<[u8; 8], Error> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(rs.expose())
        .map_err(|_| Error::Db("HMAC key rejected".into()))?;
    mac.update(role);
    let tag = mac.finalize().into_bytes();
    let mut out = [0u8; 8];
    for (o, t) in out.iter_mut().zip(tag.iter()) {
        *o = *t;
    }
    Ok(out)
}

fn initiator_rs_ids(cache: &PeerCache) -> Result<Vec<[u8; 8]>, Error> {
    let mut ids = Vec::with_capacity(2);
    for rs in [&cache.rs1, &cache.rs2].into_iter().flatten() {
        ids.push(rs_id(rs, b"Initiator")?);
    }
    Ok(ids)
}

fn rsid_key(rsid: &[u8; 8], peer: &PeerId) -> [u8; 24] {
    let mut k = [0u8; 24];
    let (a, b) = k.split_at_mut(8);
    a.copy_from_slice(rsid);
    b.copy_from_slice(peer);
    k
}

/// Test-only fault injection: `KEAV_STORE_FAILPOINT=<name>` aborts the process the first time
/// that point is reached, `<name>@<n>` the n-th time (counted across all stores of the process).
#[cfg(any(test, feature = "failpoints"))]
fn failpoint(name: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static FAILPOINT: std::sync::OnceLock<Option<(String, u32)>> = std::sync::OnceLock::new();
    static HITS: AtomicU32 = AtomicU32::new(0);
    let armed = FAILPOINT.get_or_init(|| {
        let v = std::env::var("KEAV_STORE_FAILPOINT").ok()?;
        Some(match v.split_once('@') {
            Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    if let Some((point, nth)) = armed {
        if point == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *nth {
            std::process::abort();
        }
    }
}

#[cfg(not(any(test, feature = "failpoints")))]
#[inline(always)]
fn failpoint(_name: &str) {}

/// Runs `f`, turning a panic of the storage engine (e.g. on damaged pages) into an error.
fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(Error::Corrupt(
            "the storage engine failed on inconsistent data".into(),
        )),
    }
}

fn load<T: ReadableTable<&'static [u8], &'static [u8]>>(
    peers: &T,
    id: &PeerId,
) -> Result<Option<PeerRecord>, Error> {
    match peers.get(id.as_slice())? {
        None => Ok(None),
        Some(v) => codec::decode_peer(id, v.value())
            .map(Some)
            .ok_or(Error::CorruptRecord { peer: *id }),
    }
}

fn peer_id_from(bytes: &[u8]) -> Result<PeerId, Error> {
    bytes
        .try_into()
        .map_err(|_| Error::Corrupt("index entry of wrong size".into()))
}

fn index_mismatch() -> Error {
    Error::Corrupt("index entry does not match the record it points to".into())
}

fn validate_label(label: &str) -> Result<(), Error> {
    if label.is_empty() || label.len() > codec::MAX_LABEL_LEN {
        return Err(Error::InvalidLabel);
    }
    Ok(())
}

fn put(txn: &WriteTransaction, rec: &PeerRecord) -> Result<(), Error> {
    let enc = codec::encode_peer(rec);
    txn.open_table(PEERS)?
        .insert(rec.id.as_slice(), enc.as_slice())?;
    Ok(())
}

fn add_rsids(txn: &WriteTransaction, rec: &PeerRecord) -> Result<(), Error> {
    let mut t = txn.open_table(RSID_IDX)?;
    for rsid in initiator_rs_ids(&rec.cache)? {
        t.insert(rsid_key(&rsid, &rec.id).as_slice(), [].as_slice())?;
    }
    Ok(())
}

fn remove_rsids(txn: &WriteTransaction, rec: &PeerRecord) -> Result<(), Error> {
    let mut t = txn.open_table(RSID_IDX)?;
    for rsid in initiator_rs_ids(&rec.cache)? {
        t.remove(rsid_key(&rsid, &rec.id).as_slice())?;
    }
    Ok(())
}

/// Removes every index entry that points to `id`, without needing its (maybe damaged) record.
fn scrub_indexes(txn: &WriteTransaction, id: &PeerId) -> Result<(), Error> {
    txn.open_table(ZID_IDX)?.retain(|_, v| v != id.as_slice())?;
    txn.open_table(LABEL_IDX)?
        .retain(|_, v| v != id.as_slice())?;
    txn.open_table(RSID_IDX)?
        .retain(|k, _| k.get(8..) != Some(id.as_slice()))?;
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Store

/// The device store: one redb file, opened by one process at a time.
pub struct Store {
    db: Database,
}

impl core::fmt::Debug for Store {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens the store at `path`, creating it (and the device identity) if the file is absent
    /// or empty. The parent directory must exist. Uses the system clock for the creation time.
    pub fn open(path: &Path) -> Result<Store, Error> {
        Self::open_at(path, now_unix())
    }

    /// Like [`Store::open`], with the current unix time passed in.
    ///
    /// Runs redb's full integrity check (every page checksum) and checks the schema magic and
    /// version and the identity record; any failure is [`Error::Corrupt`].
    pub fn open_at(path: &Path, now: u64) -> Result<Store, Error> {
        guard(|| {
            let mut db = Builder::new().create(path)?;
            if !db.check_integrity()? {
                return Err(Error::Corrupt(
                    "redb integrity check failed (damaged pages; the file was rolled back to \
                     its last intact commit)"
                        .into(),
                ));
            }
            let store = Store { db };
            store.init(now)?;
            Ok(store)
        })
    }

    fn init(&self, now: u64) -> Result<(), Error> {
        let rtx = self.db.begin_read()?;
        let names: Vec<String> = rtx.list_tables()?.map(|h| h.name().to_string()).collect();
        let multimaps = rtx.list_multimap_tables()?.count();
        if names.is_empty() && multimaps == 0 {
            drop(rtx);
            return self.initialize(now);
        }
        if !names.iter().any(|n| n == META.name()) {
            return Err(Error::Corrupt(
                "not a KEAV store (a redb database without KEAV metadata)".into(),
            ));
        }
        let meta = rtx.open_table(META)?;
        let schema = meta
            .get(SCHEMA_KEY)?
            .ok_or_else(|| Error::Corrupt("schema marker missing".into()))?;
        let schema = schema.value();
        if schema.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(Error::Corrupt("bad schema magic".into()));
        }
        if schema != schema_value().as_slice() {
            let v = schema
                .get(MAGIC.len()..)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes);
            return Err(Error::Corrupt(match v {
                Some(v) => {
                    format!("store schema version {v}, this build reads version {SCHEMA_VERSION}")
                }
                None => "malformed schema marker".into(),
            }));
        }
        for t in [
            PEERS.name(),
            ZID_IDX.name(),
            LABEL_IDX.name(),
            RSID_IDX.name(),
        ] {
            if !names.iter().any(|n| n == t) {
                return Err(Error::Corrupt(format!("table {t} missing")));
            }
        }
        Self::read_identity(&rtx)?;
        Ok(())
    }

    fn initialize(&self, now: u64) -> Result<(), Error> {
        let mut zid = [0u8; 12];
        OsRng
            .try_fill_bytes(&mut zid)
            .map_err(|_| Error::Io(std::io::Error::other("OS random generator failed")))?;
        let identity = Identity {
            zid: Zid(zid),
            created_at: now,
        };
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(SCHEMA_KEY, schema_value().as_slice())?;
            let enc = codec::encode_identity(IDENTITY_KEY.as_bytes(), &identity);
            meta.insert(IDENTITY_KEY, enc.as_slice())?;
            txn.open_table(PEERS)?;
            txn.open_table(ZID_IDX)?;
            txn.open_table(LABEL_IDX)?;
            txn.open_table(RSID_IDX)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn read_identity(rtx: &ReadTransaction) -> Result<Identity, Error> {
        let meta = rtx.open_table(META)?;
        let v = meta
            .get(IDENTITY_KEY)?
            .ok_or_else(|| Error::Corrupt("identity missing".into()))?;
        codec::decode_identity(IDENTITY_KEY.as_bytes(), v.value())
            .ok_or_else(|| Error::Corrupt("identity record failed its integrity check".into()))
    }

    /// Runs `f` in one write transaction and commits it; an error aborts it (nothing changes).
    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T, Error>) -> Result<T, Error> {
        guard(|| {
            let txn = self.db.begin_write()?;
            match f(&txn) {
                Ok(v) => {
                    txn.commit()?;
                    Ok(v)
                }
                Err(e) => {
                    // Dropping also aborts; an abort failure changes nothing on disk.
                    let _ = txn.abort();
                    Err(e)
                }
            }
        })
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T, Error>) -> Result<T, Error> {
        guard(|| {
            let rtx = self.db.begin_read()?;
            f(&rtx)
        })
    }

    /// The device identity.
    pub fn identity(&self) -> Result<Identity, Error> {
        self.read(Self::read_identity)
    }

    /// Creates a peer record with an empty cache and returns its new random handle.
    ///
    /// Fails with [`Error::LabelTaken`] / [`Error::ZidTaken`] if another record has the label
    /// or ZID, and [`Error::InvalidLabel`] for an empty or over-long label.
    pub fn create_peer(
        &self,
        zid: Option<Zid>,
        label: Option<&str>,
        mode: Mode,
        now: u64,
    ) -> Result<PeerId, Error> {
        if let Some(l) = label {
            validate_label(l)?;
        }
        self.write(|txn| {
            if let Some(l) = label {
                if txn.open_table(LABEL_IDX)?.get(l)?.is_some() {
                    return Err(Error::LabelTaken);
                }
            }
            if let Some(z) = zid {
                if txn.open_table(ZID_IDX)?.get(z.0.as_slice())?.is_some() {
                    return Err(Error::ZidTaken);
                }
            }
            let id = {
                let peers = txn.open_table(PEERS)?;
                loop {
                    let mut id = [0u8; 16];
                    OsRng.try_fill_bytes(&mut id).map_err(|_| {
                        Error::Io(std::io::Error::other("OS random generator failed"))
                    })?;
                    if id != ANONYMOUS_PEER && peers.get(id.as_slice())?.is_none() {
                        break id;
                    }
                }
            };
            let rec = PeerRecord {
                id,
                zid,
                label: label.map(str::to_owned),
                mode,
                cache: PeerCache::default(),
                verify_failures: 0,
                last_failure_at: None,
                last_verification: None,
                created_at: now,
                updated_at: now,
            };
            put(txn, &rec)?;
            if let Some(z) = zid {
                txn.open_table(ZID_IDX)?
                    .insert(z.0.as_slice(), id.as_slice())?;
            }
            if let Some(l) = label {
                txn.open_table(LABEL_IDX)?.insert(l, id.as_slice())?;
            }
            Ok(id)
        })
    }

    /// The record with handle `id`, if any.
    pub fn peer(&self, id: &PeerId) -> Result<Option<PeerRecord>, Error> {
        self.read(|rtx| load(&rtx.open_table(PEERS)?, id))
    }

    /// The record whose ZID is `zid`, if any.
    pub fn peer_by_zid(&self, zid: &Zid) -> Result<Option<PeerRecord>, Error> {
        self.read(|rtx| {
            let Some(v) = rtx.open_table(ZID_IDX)?.get(zid.0.as_slice())? else {
                return Ok(None);
            };
            let id = peer_id_from(v.value())?;
            let rec = load(&rtx.open_table(PEERS)?, &id)?.ok_or_else(index_mismatch)?;
            if rec.zid != Some(*zid) {
                return Err(index_mismatch());
            }
            Ok(Some(rec))
        })
    }

    /// The record labelled `label`, if any.
    pub fn peer_by_label(&self, label: &str) -> Result<Option<PeerRecord>, Error> {
        self.read(|rtx| {
            let Some(v) = rtx.open_table(LABEL_IDX)?.get(label)? else {
                return Ok(None);
            };
            let id = peer_id_from(v.value())?;
            let rec = load(&rtx.open_table(PEERS)?, &id)?.ok_or_else(index_mismatch)?;
            if rec.label.as_deref() != Some(label) {
                return Err(index_mismatch());
            }
            Ok(Some(rec))
        })
    }

    /// Paranoid-mode lookup: the record whose rs1 or rs2 has initiator ID `id`
    /// (`HMAC-SHA256(rs, "Initiator")` truncated to 8 bytes), if any.
    pub fn peer_by_initiator_rs_id(&self, id: &[u8; 8]) -> Result<Option<PeerRecord>, Error> {
        self.read(|rtx| {
            let idx = rtx.open_table(RSID_IDX)?;
            let peers = rtx.open_table(PEERS)?;
            let lo = rsid_key(id, &[0u8; 16]);
            let hi = rsid_key(id, &[0xffu8; 16]);
            // 64-bit IDs of distinct peers practically never collide; if they do, the
            // first (lowest handle) wins and the handshake's MAC checks reject a wrong guess.
            let Some(entry) = idx.range(lo.as_slice()..=hi.as_slice())?.next() else {
                return Ok(None);
            };
            let (k, _) = entry?;
            let peer = peer_id_from(k.value().get(8..).unwrap_or_default())?;
            let rec = load(&peers, &peer)?.ok_or_else(index_mismatch)?;
            let matches = initiator_rs_ids(&rec.cache)?
                .iter()
                .any(|x| bool::from(x.ct_eq(id)));
            if !matches {
                return Err(index_mismatch());
            }
            Ok(Some(rec))
        })
    }

    /// All peer records (without the [`ANONYMOUS_PEER`] bucket), in handle order.
    /// Fails with [`Error::CorruptRecord`] on the first damaged record.
    pub fn list_peers(&self) -> Result<Vec<PeerRecord>, Error> {
        self.read(|rtx| {
            let peers = rtx.open_table(PEERS)?;
            let mut out = Vec::with_capacity(usize::try_from(peers.len()?).unwrap_or(0));
            for entry in peers.iter()? {
                let (k, v) = entry?;
                let id = peer_id_from(k.value())?;
                if id == ANONYMOUS_PEER {
                    continue;
                }
                let rec =
                    codec::decode_peer(&id, v.value()).ok_or(Error::CorruptRecord { peer: id })?;
                out.push(rec);
            }
            Ok(out)
        })
    }

    /// Persists a completed session in ONE write transaction: rs1, rs2, expiry and the session
    /// counter from `update`; `last_verification = (update.sessions, update.verification)`;
    /// clears `verify_due`; when the equality test ran (`Bound` or `Unbound`) resets the
    /// failure counter and lockout; replaces the record's entries in the rs-ID index; sets
    /// `updated_at = now`. The ZID is left as it is (see [`Store::set_zid`]).
    ///
    /// In [`Mode::NoContinuity`] no secret is kept: rs1, rs2 and the expiry are cleared and
    /// only the counters are updated.
    pub fn commit_session(&self, id: &PeerId, update: &CacheUpdate, now: u64) -> Result<(), Error> {
        self.write(|txn| {
            let old = load(&txn.open_table(PEERS)?, id)?.ok_or(Error::NotFound)?;
            remove_rsids(txn, &old)?;
            let mut rec = old.clone();
            if rec.mode.keeps_cache() {
                rec.cache.rs1 = Some(update.rs1.clone());
                rec.cache.rs2 = update.rs2.clone();
                rec.cache.expires_at = update.expires_at;
            } else {
                rec.cache.rs1 = None;
                rec.cache.rs2 = None;
                rec.cache.expires_at = None;
            }
            rec.cache.sessions = update.sessions;
            rec.cache.verify_due = false;
            rec.last_verification = Some((update.sessions, update.verification));
            if update.verification.ran() {
                rec.verify_failures = 0;
                rec.last_failure_at = None;
                rec.cache.locked_until = None;
            }
            rec.updated_at = now;
            put(txn, &rec)?;
            failpoint("commit_session:after_write");
            add_rsids(txn, &rec)?;
            failpoint("commit_session:before_commit");
            Ok(())
        })
    }

    /// Counts one failed verification against `id` (durably, atomically) and returns the
    /// resulting lockout state. Sets `cache.locked_until` per `policy` and `verify_due`.
    /// For [`ANONYMOUS_PEER`] the bucket record is created on first use.
    pub fn record_verification_failure(
        &self,
        id: &PeerId,
        now: u64,
        policy: &LockoutPolicy,
    ) -> Result<LockState, Error> {
        self.write(|txn| {
            let rec = load(&txn.open_table(PEERS)?, id)?;
            let mut rec = match rec {
                Some(r) => r,
                None if *id == ANONYMOUS_PEER => PeerRecord {
                    id: ANONYMOUS_PEER,
                    zid: None,
                    label: None,
                    mode: Mode::Paranoid,
                    cache: PeerCache::default(),
                    verify_failures: 0,
                    last_failure_at: None,
                    last_verification: None,
                    created_at: now,
                    updated_at: now,
                },
                None => return Err(Error::NotFound),
            };
            rec.verify_failures = rec.verify_failures.saturating_add(1);
            rec.last_failure_at = Some(now);
            let locked = policy.locked_until(rec.verify_failures, now);
            rec.cache.locked_until = locked.max(rec.cache.locked_until);
            rec.cache.verify_due = true;
            rec.updated_at = now;
            put(txn, &rec)?;
            Ok(LockState {
                failures: rec.verify_failures,
                locked_until: rec.cache.locked_until.filter(|t| *t > now),
            })
        })
    }

    /// Takes back one failure counted in advance (a verification attempt recorded when it
    /// started, see `keav_proto::handshake::Event::VerificationStarting`) once the attempt
    /// succeeded. Used for [`ANONYMOUS_PEER`], whose counter a successful session does not
    /// reset; a lockout already in force is recomputed from the remaining failures.
    pub fn retract_verification_failure(
        &self,
        id: &PeerId,
        policy: &LockoutPolicy,
    ) -> Result<(), Error> {
        self.write(|txn| {
            let Some(mut rec) = load(&txn.open_table(PEERS)?, id)? else {
                return Ok(());
            };
            rec.verify_failures = rec.verify_failures.saturating_sub(1);
            rec.cache.locked_until = rec
                .last_failure_at
                .and_then(|t| policy.locked_until(rec.verify_failures, t));
            if rec.verify_failures == 0 {
                rec.last_failure_at = None;
            }
            put(txn, &rec)?;
            Ok(())
        })
    }

    /// The lockout state of `id` at `now`: the later of the stored deadline and the one
    /// `policy` gives for the stored failures. Unknown [`ANONYMOUS_PEER`] = no failures.
    pub fn lock_state(
        &self,
        id: &PeerId,
        now: u64,
        policy: &LockoutPolicy,
    ) -> Result<LockState, Error> {
        let rec = self.peer(id)?;
        let Some(rec) = rec else {
            if *id == ANONYMOUS_PEER {
                return Ok(LockState {
                    failures: 0,
                    locked_until: None,
                });
            }
            return Err(Error::NotFound);
        };
        let by_policy = rec
            .last_failure_at
            .and_then(|t| policy.locked_until(rec.verify_failures, t));
        Ok(LockState {
            failures: rec.verify_failures,
            locked_until: by_policy.max(rec.cache.locked_until).filter(|t| *t > now),
        })
    }

    /// Sets or clears the "verify in the next session" flag.
    pub fn set_verify_due(&self, id: &PeerId, due: bool) -> Result<(), Error> {
        self.write(|txn| {
            let mut rec = load(&txn.open_table(PEERS)?, id)?.ok_or(Error::NotFound)?;
            rec.cache.verify_due = due;
            put(txn, &rec)
        })
    }

    /// Sets or clears the local label of a record (fails with [`Error::LabelTaken`] if
    /// another record has it, [`Error::InvalidLabel`] if empty or over-long).
    pub fn set_label(&self, id: &PeerId, label: Option<&str>) -> Result<(), Error> {
        if let Some(l) = label {
            validate_label(l)?;
        }
        self.write(|txn| {
            let mut rec = load(&txn.open_table(PEERS)?, id)?.ok_or(Error::NotFound)?;
            if rec.label.as_deref() == label {
                return Ok(());
            }
            let mut idx = txn.open_table(LABEL_IDX)?;
            if let Some(l) = label {
                if idx.get(l)?.is_some() {
                    return Err(Error::LabelTaken);
                }
                idx.insert(l, id.as_slice())?;
            }
            if let Some(old) = rec.label.as_deref() {
                idx.remove(old)?;
            }
            drop(idx);
            rec.label = label.map(str::to_owned);
            put(txn, &rec)
        })
    }

    /// Sets or clears the peer's ZID (and the ZID index). [`Error::ZidTaken`] if another
    /// record has it.
    pub fn set_zid(&self, id: &PeerId, zid: Option<Zid>) -> Result<(), Error> {
        self.write(|txn| {
            let mut rec = load(&txn.open_table(PEERS)?, id)?.ok_or(Error::NotFound)?;
            if rec.zid == zid {
                return Ok(());
            }
            let mut idx = txn.open_table(ZID_IDX)?;
            if let Some(z) = zid {
                if idx.get(z.0.as_slice())?.is_some() {
                    return Err(Error::ZidTaken);
                }
                idx.insert(z.0.as_slice(), id.as_slice())?;
            }
            if let Some(old) = rec.zid {
                idx.remove(old.0.as_slice())?;
            }
            drop(idx);
            rec.zid = zid;
            put(txn, &rec)
        })
    }

    /// Removes the record, all its index entries, its channel states and its durable channels
    /// (keys, outbox and inbox); returns whether the record existed.
    pub fn forget(&self, id: &PeerId) -> Result<bool, Error> {
        // The peer's durable channels (messaging keys, queued messages) go with it. A damaged
        // record has no readable ZID: its durable channels stay (`durable_delete` removes them
        // by name).
        let zid = self.peer(id).ok().flatten().and_then(|p| p.zid);
        self.write(|txn| {
            let existed = txn.open_table(PEERS)?.remove(id.as_slice())?.is_some();
            scrub_indexes(txn, id)?;
            channels::remove_peer(txn, id)?;
            if let Some(zid) = &zid {
                durable::remove_peer(txn, &zid.0)?;
            }
            Ok(existed)
        })
    }

    /// Drops a record (typically one that failed its integrity check, reported as
    /// [`Error::CorruptRecord`]) and every index entry pointing to it, without decoding it.
    /// [`Error::NotFound`] if there is no such record.
    pub fn quarantine_corrupt(&self, id: &PeerId) -> Result<(), Error> {
        if self.forget(id)? {
            Ok(())
        } else {
            Err(Error::NotFound)
        }
    }
}
