//! The redb fleet registry (the default engine).
//!
//! Tables (all `&[u8] -> &[u8]`):
//! - `c2_devices`: device id (8 bytes) -> device row (see `encode_device`, CRC-32C sealed);
//! - `c2_keys`: public-key fingerprint (32 bytes) -> device id, to refuse a key twice;
//! - `c2_counters`: peer id -> replay-guard state, CRC-32C sealed;
//! - `c2_blobs`: kind code (1 byte), peer id -> opaque blob (e.g. confidential state),
//!   CRC-32C sealed;
//! - `c2_responses`: token length (1 byte), token, device id -> status (1 byte);
//! - `c2_enrollments`: token hash (32 bytes) -> enrollment row, CRC-32C sealed.
//!
//! Every change is one write transaction, committed before the call returns (redb's default
//! durability: fsync on commit). Calls run on tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use super::BlobKind;
use super::{
    check_transition, decode_device, decode_enrollment, encode_device, encode_enrollment, seal,
    unseal, validate_blob, validate_counters, validate_groups, validate_token, DeviceRecord,
    DeviceStatus, Enrollment, Registry, RegistryError, ResponseRecord, TokenHash,
};
use crate::keys::DeviceId;

type Raw = TableDefinition<'static, &'static [u8], &'static [u8]>;

const DEVICES: Raw = TableDefinition::new("c2_devices");
const KEYS: Raw = TableDefinition::new("c2_keys");
const COUNTERS: Raw = TableDefinition::new("c2_counters");
const BLOBS: Raw = TableDefinition::new("c2_blobs");
const RESPONSES: Raw = TableDefinition::new("c2_responses");
const ENROLLMENTS: Raw = TableDefinition::new("c2_enrollments");

/// A fleet registry in one redb file.
#[derive(Clone)]
pub struct RedbRegistry {
    db: Arc<Database>,
}

impl std::fmt::Debug for RedbRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbRegistry")
    }
}

fn db_err<E: Into<redb::Error>>(e: E) -> RegistryError {
    match e.into() {
        redb::Error::Corrupted(msg) => RegistryError::Corrupt(msg),
        other => RegistryError::Redb(Box::new(other)),
    }
}

fn device_id(key: &[u8]) -> Result<DeviceId, RegistryError> {
    let id: [u8; 8] = key
        .try_into()
        .map_err(|_| RegistryError::Corrupt("device id not 8 bytes".into()))?;
    Ok(DeviceId(id))
}

fn blob_key(kind: BlobKind, peer: DeviceId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = kind.code();
    k[1..].copy_from_slice(&peer.0);
    k
}

fn response_prefix(token: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + token.len() + 8);
    // validate_token bounds the length by 255.
    k.push(u8::try_from(token.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(token);
    k
}

impl RedbRegistry {
    /// Opens (or creates) the registry file at `path` and creates its tables.
    pub fn open(path: &Path) -> Result<RedbRegistry, RegistryError> {
        let db = Database::create(path).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        for t in [DEVICES, KEYS, COUNTERS, BLOBS, RESPONSES, ENROLLMENTS] {
            tx.open_table(t).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(RedbRegistry { db: Arc::new(db) })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, RegistryError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|_| RegistryError::Task)?
    }

    fn insert_in(tx: &redb::WriteTransaction, record: &DeviceRecord) -> Result<(), RegistryError> {
        let fp = record
            .key()
            .map_err(|_| RegistryError::Invalid("public key"))?
            .fingerprint();
        let mut keys = tx.open_table(KEYS).map_err(db_err)?;
        if let Some(existing) = keys.get(fp.as_slice()).map_err(db_err)? {
            return Err(RegistryError::DuplicateKey(device_id(existing.value())?));
        }
        let mut devices = tx.open_table(DEVICES).map_err(db_err)?;
        if devices
            .get(record.id.0.as_slice())
            .map_err(db_err)?
            .is_some()
        {
            return Err(RegistryError::DuplicateId(record.id));
        }
        devices
            .insert(record.id.0.as_slice(), encode_device(record).as_slice())
            .map_err(db_err)?;
        keys.insert(fp.as_slice(), record.id.0.as_slice())
            .map_err(db_err)?;
        Ok(())
    }

    /// Reads, changes and writes back one device row in one transaction; if `change`
    /// fails, nothing is written.
    fn update<F>(db: &Database, id: DeviceId, change: F) -> Result<DeviceRecord, RegistryError>
    where
        F: FnOnce(&mut DeviceRecord) -> Result<(), RegistryError>,
    {
        let tx = db.begin_write().map_err(db_err)?;
        let rec = {
            let mut devices = tx.open_table(DEVICES).map_err(db_err)?;
            let mut rec = match devices.get(id.0.as_slice()).map_err(db_err)? {
                Some(row) => decode_device(id, row.value())?,
                None => return Err(RegistryError::NotFound(id)),
            };
            change(&mut rec)?;
            rec.validate()?;
            devices
                .insert(id.0.as_slice(), encode_device(&rec).as_slice())
                .map_err(db_err)?;
            rec
        };
        tx.commit().map_err(db_err)?;
        Ok(rec)
    }
}

impl Registry for RedbRegistry {
    async fn insert_device(&self, record: DeviceRecord) -> Result<(), RegistryError> {
        record.validate()?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(db_err)?;
            Self::insert_in(&tx, &record)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn enroll_device(
        &self,
        record: DeviceRecord,
        token: TokenHash,
        now: u64,
    ) -> Result<(), RegistryError> {
        record.validate()?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(db_err)?;
            {
                let mut t = tx.open_table(ENROLLMENTS).map_err(db_err)?;
                let e = match t.remove(token.0.as_slice()).map_err(db_err)? {
                    Some(row) => decode_enrollment(row.value())?,
                    None => return Err(RegistryError::EnrollmentInvalid),
                };
                if now >= e.expires {
                    return Err(RegistryError::EnrollmentExpired);
                }
            }
            // An error here drops `tx` uncommitted: the token is not consumed.
            Self::insert_in(&tx, &record)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(DEVICES).map_err(db_err)?;
            match t.get(id.0.as_slice()).map_err(db_err)? {
                Some(row) => Ok(Some(decode_device(id, row.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(DEVICES).map_err(db_err)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                out.push(decode_device(device_id(k.value())?, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn set_status(
        &self,
        id: DeviceId,
        status: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        self.blocking(move |db| {
            Self::update(db, id, |r| {
                check_transition(id, r.status, None, status)?;
                r.status = status;
                Ok(())
            })
        })
        .await
    }

    async fn set_status_if(
        &self,
        id: DeviceId,
        expected: DeviceStatus,
        new: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        self.blocking(move |db| {
            Self::update(db, id, |r| {
                check_transition(id, r.status, Some(expected), new)?;
                r.status = new;
                Ok(())
            })
        })
        .await
    }

    async fn set_groups(&self, id: DeviceId, groups: Vec<String>) -> Result<(), RegistryError> {
        validate_groups(&groups)?;
        self.blocking(move |db| {
            Self::update(db, id, |r| {
                r.groups = groups;
                Ok(())
            })
            .map(|_| ())
        })
        .await
    }

    async fn delete_device(&self, id: DeviceId) -> Result<bool, RegistryError> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(db_err)?;
            let found = {
                let mut devices = tx.open_table(DEVICES).map_err(db_err)?;
                let removed = devices.remove(id.0.as_slice()).map_err(db_err)?;
                match removed {
                    Some(row) => {
                        let rec = decode_device(id, row.value())?;
                        drop(row);
                        let fp = rec
                            .key()
                            .map_err(|_| RegistryError::Corrupt("stored key".into()))?
                            .fingerprint();
                        tx.open_table(KEYS)
                            .map_err(db_err)?
                            .remove(fp.as_slice())
                            .map_err(db_err)?;
                        tx.open_table(COUNTERS)
                            .map_err(db_err)?
                            .remove(id.0.as_slice())
                            .map_err(db_err)?;
                        let mut blobs = tx.open_table(BLOBS).map_err(db_err)?;
                        for kind in BlobKind::ALL {
                            blobs
                                .remove(blob_key(kind, id).as_slice())
                                .map_err(db_err)?;
                        }
                        true
                    }
                    None => false,
                }
            };
            tx.commit().map_err(db_err)?;
            Ok(found)
        })
        .await
    }

    async fn load_counters(&self, peer: DeviceId) -> Result<Option<Vec<u8>>, RegistryError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(COUNTERS).map_err(db_err)?;
            match t.get(peer.0.as_slice()).map_err(db_err)? {
                Some(row) => Ok(Some(unseal(row.value())?.to_vec())),
                None => Ok(None),
            }
        })
        .await
    }

    async fn store_counters(&self, peer: DeviceId, state: Vec<u8>) -> Result<(), RegistryError> {
        validate_counters(&state)?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(db_err)?;
            tx.open_table(COUNTERS)
                .map_err(db_err)?
                .insert(peer.0.as_slice(), seal(state).as_slice())
                .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn load_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(BLOBS).map_err(db_err)?;
            match t.get(blob_key(kind, peer).as_slice()).map_err(db_err)? {
                Some(row) => Ok(Some(unseal(row.value())?.to_vec())),
                None => Ok(None),
            }
        })
        .await
    }

    async fn store_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
        blob: Vec<u8>,
    ) -> Result<(), RegistryError> {
        validate_blob(&blob)?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(db_err)?;
            tx.open_table(BLOBS)
                .map_err(db_err)?
                .insert(blob_key(kind, peer).as_slice(), seal(blob).as_slice())
                .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn record_response(
        &self,
        token: Vec<u8>,
        device: DeviceId,
        status: u8,
    ) -> Result<(), RegistryError> {
        validate_token(&token)?;
        self.blocking(move |db| {
            let mut key = response_prefix(&token);
            key.extend_from_slice(&device.0);
            let tx = db.begin_write().map_err(db_err)?;
            tx.open_table(RESPONSES)
                .map_err(db_err)?
                .insert(key.as_slice(), [status].as_slice())
                .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn responses(&self, token: Vec<u8>) -> Result<Vec<ResponseRecord>, RegistryError> {
        validate_token(&token)?;
        self.blocking(move |db| {
            let prefix = response_prefix(&token);
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(RESPONSES).map_err(db_err)?;
            let mut out = Vec::new();
            for item in t.range(prefix.as_slice()..).map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let Some(rest) = k.value().strip_prefix(prefix.as_slice()) else {
                    break;
                };
                let device = device_id(rest)?;
                let status = match v.value() {
                    [s] => *s,
                    _ => return Err(RegistryError::Corrupt("response row".into())),
                };
                out.push(ResponseRecord { device, status });
            }
            Ok(out)
        })
        .await
    }

    async fn add_enrollment(
        &self,
        token: TokenHash,
        enrollment: Enrollment,
        now: u64,
    ) -> Result<(), RegistryError> {
        enrollment.validate()?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(db_err)?;
            {
                let mut t = tx.open_table(ENROLLMENTS).map_err(db_err)?;
                // Purge expired (and unreadable) tokens so the table stays small.
                t.retain(|_, row| decode_enrollment(row).is_ok_and(|e| now < e.expires))
                    .map_err(db_err)?;
                t.insert(
                    token.0.as_slice(),
                    encode_enrollment(&enrollment).as_slice(),
                )
                .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn enrollment(&self, token: TokenHash, now: u64) -> Result<Enrollment, RegistryError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(ENROLLMENTS).map_err(db_err)?;
            let e = match t.get(token.0.as_slice()).map_err(db_err)? {
                Some(row) => decode_enrollment(row.value())?,
                None => return Err(RegistryError::EnrollmentInvalid),
            };
            if now >= e.expires {
                return Err(RegistryError::EnrollmentExpired);
            }
            Ok(e)
        })
        .await
    }
}
