//! The PostgreSQL fleet registry (feature `postgres`), for fleets served from more than one
//! machine.
//!
//! All tables live in one schema named by the operator (created on open with the tables):
//! `devices` (id, key fingerprint, algorithm, key, status, password hash, created, name,
//! groups), `counters`, `responses` and `enrollments`. Each change is one statement or one
//! transaction. Rows read back are validated like the redb engine's (algorithm id, key
//! encoding, status, names), so a row edited by hand into nonsense is a typed error.
//!
//! One connection is shared behind a mutex (tokio-postgres pipelines the statements of
//! concurrent callers; transactions hold the mutex). No TLS: run the database on the same
//! host or a private network.

use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, NoTls, Row};

use super::{
    check_transition, checked, validate_blob, validate_counters, validate_groups, validate_token,
    BlobKind, DeviceRecord, DeviceStatus, Enrollment, Registry, RegistryError, ResponseRecord,
    TokenHash,
};
use crate::keys::{Alg, DeviceId};

/// A fleet registry in a PostgreSQL schema.
pub struct PgRegistry {
    client: Mutex<Client>,
    schema: String,
}

impl std::fmt::Debug for PgRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgRegistry({})", self.schema)
    }
}

const DEVICE_COLUMNS: &str = "id, alg, public_key, status, password_hash, created, name, groups";

fn i64_of(n: u64) -> Result<i64, RegistryError> {
    i64::try_from(n).map_err(|_| RegistryError::Invalid("time"))
}

fn device_of_row(row: &Row) -> Result<DeviceRecord, RegistryError> {
    let bad = |what: &str| RegistryError::Corrupt(format!("devices row: {what}"));
    let id: Vec<u8> = row.try_get(0)?;
    let id = DeviceId(id.as_slice().try_into().map_err(|_| bad("id"))?);
    let alg: i16 = row.try_get(1)?;
    let alg = u8::try_from(alg)
        .ok()
        .and_then(|a| Alg::from_id(a).ok())
        .ok_or_else(|| bad("alg"))?;
    let status: i16 = row.try_get(3)?;
    let status = u8::try_from(status)
        .ok()
        .and_then(DeviceStatus::from_code)
        .ok_or_else(|| bad("status"))?;
    let created: i64 = row.try_get(5)?;
    let rec = DeviceRecord {
        id,
        alg,
        public_key: row.try_get(2)?,
        status,
        password_hash: row.try_get(4)?,
        created: u64::try_from(created).map_err(|_| bad("created"))?,
        name: row.try_get(6)?,
        groups: row.try_get(7)?,
    };
    checked(rec)
}

fn enrollment_of_row(row: &Row) -> Result<Enrollment, RegistryError> {
    let expires: i64 = row.try_get(0)?;
    let e = Enrollment {
        expires: u64::try_from(expires)
            .map_err(|_| RegistryError::Corrupt("enrollments row: expires".into()))?,
        name: row.try_get(1)?,
        groups: row.try_get(2)?,
    };
    e.validate()
        .map_err(|err| RegistryError::Corrupt(format!("enrollments row: {err}")))?;
    Ok(e)
}

impl PgRegistry {
    /// Connects to `url` (a libpq-style connection string or `postgres://` URL) and creates
    /// `schema` and its tables if missing. `schema` is 1 to 48 characters of `[a-z0-9_]`,
    /// starting with a letter.
    pub async fn connect(url: &str, schema: &str) -> Result<PgRegistry, RegistryError> {
        let valid = !schema.is_empty()
            && schema.len() <= 48
            && schema.starts_with(|c: char| c.is_ascii_lowercase())
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(RegistryError::Invalid("schema name"));
        }
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("registry database connection ended: {e}");
            }
        });
        let s = schema;
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.devices (
                 id bytea NOT NULL, fingerprint bytea NOT NULL, alg smallint NOT NULL,
                 public_key bytea NOT NULL, status smallint NOT NULL,
                 password_hash text NOT NULL, created bigint NOT NULL, name text,
                 groups text[] NOT NULL,
                 CONSTRAINT devices_id PRIMARY KEY (id),
                 CONSTRAINT devices_fingerprint UNIQUE (fingerprint));
             CREATE TABLE IF NOT EXISTS {s}.counters (
                 peer bytea PRIMARY KEY, state bytea NOT NULL);
             CREATE TABLE IF NOT EXISTS {s}.blobs (
                 kind smallint NOT NULL, peer bytea NOT NULL, blob bytea NOT NULL,
                 PRIMARY KEY (kind, peer));
             CREATE TABLE IF NOT EXISTS {s}.responses (
                 token bytea NOT NULL, device bytea NOT NULL, status smallint NOT NULL,
                 PRIMARY KEY (token, device));
             CREATE TABLE IF NOT EXISTS {s}.enrollments (
                 hash bytea PRIMARY KEY, expires bigint NOT NULL, name text,
                 groups text[] NOT NULL);"
        );
        client.batch_execute(&ddl).await?;
        Ok(PgRegistry {
            client: Mutex::new(client),
            schema: schema.to_string(),
        })
    }

    /// Drops the schema and everything in it (tests and decommissioning).
    pub async fn drop_schema(&self) -> Result<(), RegistryError> {
        let c = self.client.lock().await;
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await?;
        Ok(())
    }

    async fn insert_with(
        c: &impl GenericClient,
        s: &str,
        r: &DeviceRecord,
    ) -> Result<(), RegistryError> {
        let fp = r
            .key()
            .map_err(|_| RegistryError::Invalid("public key"))?
            .fingerprint();
        // Look first (the key before the id, as the redb engine does); the constraints catch
        // a concurrent insert from another process.
        if let Some(row) = c
            .query_opt(
                &format!("SELECT id FROM {s}.devices WHERE fingerprint = $1"),
                &[&fp.as_slice()],
            )
            .await?
        {
            let id: Vec<u8> = row.try_get(0)?;
            let id = id.as_slice().try_into().map(DeviceId).unwrap_or(r.id);
            return Err(RegistryError::DuplicateKey(id));
        }
        if c.query_opt(
            &format!("SELECT 1 FROM {s}.devices WHERE id = $1"),
            &[&r.id.0.as_slice()],
        )
        .await?
        .is_some()
        {
            return Err(RegistryError::DuplicateId(r.id));
        }
        let res = c
            .execute(
                &format!(
                    "INSERT INTO {s}.devices (fingerprint, {DEVICE_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                ),
                &[
                    &fp.as_slice(),
                    &r.id.0.as_slice(),
                    &i16::from(r.alg.id()),
                    &r.public_key,
                    &i16::from(r.status.code()),
                    &r.password_hash,
                    &i64_of(r.created)?,
                    &r.name,
                    &r.groups,
                ],
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let constraint = e.as_db_error().and_then(|d| d.constraint()).unwrap_or("");
                if constraint == "devices_fingerprint" {
                    Err(RegistryError::DuplicateKey(r.id))
                } else {
                    Err(RegistryError::DuplicateId(r.id))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The error for a conditional status update that changed no row (read after the fact;
    /// the classification is informative, the refusal itself was atomic).
    async fn why_not_updated(
        c: &impl GenericClient,
        s: &str,
        id: DeviceId,
        expected: Option<DeviceStatus>,
        new: DeviceStatus,
    ) -> RegistryError {
        let row = match c
            .query_opt(
                &format!("SELECT status FROM {s}.devices WHERE id = $1"),
                &[&id.0.as_slice()],
            )
            .await
        {
            Ok(row) => row,
            Err(e) => return e.into(),
        };
        let Some(row) = row else {
            return RegistryError::NotFound(id);
        };
        let current = row
            .try_get::<_, i16>(0)
            .ok()
            .and_then(|v| u8::try_from(v).ok())
            .and_then(DeviceStatus::from_code);
        let Some(current) = current else {
            return RegistryError::Corrupt("devices row: status".into());
        };
        match check_transition(id, current, expected, new) {
            Err(e) => e,
            // Changed again in between: report it as a conflict with what is stored now.
            Ok(()) => RegistryError::StatusConflict {
                id,
                expected: expected.unwrap_or(current),
                found: current,
            },
        }
    }
}

/// The stored code of [`DeviceStatus::Revoked`].
const REVOKED: i16 = DeviceStatus::Revoked as i16;

impl Registry for PgRegistry {
    async fn insert_device(&self, record: DeviceRecord) -> Result<(), RegistryError> {
        record.validate()?;
        let c = self.client.lock().await;
        Self::insert_with(&*c, &self.schema, &record).await
    }

    async fn enroll_device(
        &self,
        record: DeviceRecord,
        token: TokenHash,
        now: u64,
    ) -> Result<(), RegistryError> {
        record.validate()?;
        let s = &self.schema;
        let mut c = self.client.lock().await;
        let tx = c.transaction().await?;
        let row = tx
            .query_opt(
                &format!("DELETE FROM {s}.enrollments WHERE hash = $1 RETURNING expires"),
                &[&token.0.as_slice()],
            )
            .await?;
        let Some(row) = row else {
            return Err(RegistryError::EnrollmentInvalid);
        };
        let expires: i64 = row.try_get(0)?;
        if i64_of(now)? >= expires {
            // Dropping `tx` rolls back: an expired token is refused, not consumed.
            return Err(RegistryError::EnrollmentExpired);
        }
        Self::insert_with(&tx, s, &record).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        let s = &self.schema;
        let c = self.client.lock().await;
        let row = c
            .query_opt(
                &format!("SELECT {DEVICE_COLUMNS} FROM {s}.devices WHERE id = $1"),
                &[&id.0.as_slice()],
            )
            .await?;
        row.as_ref().map(device_of_row).transpose()
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let s = &self.schema;
        let c = self.client.lock().await;
        let rows = c
            .query(
                &format!("SELECT {DEVICE_COLUMNS} FROM {s}.devices ORDER BY id"),
                &[],
            )
            .await?;
        rows.iter().map(device_of_row).collect()
    }

    async fn set_status(
        &self,
        id: DeviceId,
        status: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        let s = &self.schema;
        let c = self.client.lock().await;
        // Revoked is final: the row is only updated if it is not revoked or stays revoked.
        let row = c
            .query_opt(
                &format!(
                    "UPDATE {s}.devices SET status = $2 WHERE id = $1 AND (status <> $3 OR $2 = $3)
                     RETURNING {DEVICE_COLUMNS}"
                ),
                &[&id.0.as_slice(), &i16::from(status.code()), &REVOKED],
            )
            .await?;
        match row {
            Some(row) => device_of_row(&row),
            None => Err(Self::why_not_updated(&*c, s, id, None, status).await),
        }
    }

    async fn set_status_if(
        &self,
        id: DeviceId,
        expected: DeviceStatus,
        new: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        let s = &self.schema;
        let c = self.client.lock().await;
        // One conditional statement: the compare and the set are atomic.
        let row = c
            .query_opt(
                &format!(
                    "UPDATE {s}.devices SET status = $3
                     WHERE id = $1 AND status = $2 AND (status <> $4 OR $3 = $4)
                     RETURNING {DEVICE_COLUMNS}"
                ),
                &[
                    &id.0.as_slice(),
                    &i16::from(expected.code()),
                    &i16::from(new.code()),
                    &REVOKED,
                ],
            )
            .await?;
        match row {
            Some(row) => device_of_row(&row),
            None => Err(Self::why_not_updated(&*c, s, id, Some(expected), new).await),
        }
    }

    async fn set_groups(&self, id: DeviceId, groups: Vec<String>) -> Result<(), RegistryError> {
        validate_groups(&groups)?;
        let s = &self.schema;
        let c = self.client.lock().await;
        let n = c
            .execute(
                &format!("UPDATE {s}.devices SET groups = $2 WHERE id = $1"),
                &[&id.0.as_slice(), &groups],
            )
            .await?;
        if n == 0 {
            return Err(RegistryError::NotFound(id));
        }
        Ok(())
    }

    async fn delete_device(&self, id: DeviceId) -> Result<bool, RegistryError> {
        let s = &self.schema;
        let mut c = self.client.lock().await;
        let tx = c.transaction().await?;
        let n = tx
            .execute(
                &format!("DELETE FROM {s}.devices WHERE id = $1"),
                &[&id.0.as_slice()],
            )
            .await?;
        tx.execute(
            &format!("DELETE FROM {s}.counters WHERE peer = $1"),
            &[&id.0.as_slice()],
        )
        .await?;
        tx.execute(
            &format!("DELETE FROM {s}.blobs WHERE peer = $1"),
            &[&id.0.as_slice()],
        )
        .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn load_counters(&self, peer: DeviceId) -> Result<Option<Vec<u8>>, RegistryError> {
        let s = &self.schema;
        let c = self.client.lock().await;
        let row = c
            .query_opt(
                &format!("SELECT state FROM {s}.counters WHERE peer = $1"),
                &[&peer.0.as_slice()],
            )
            .await?;
        match row {
            Some(row) => {
                let state: Vec<u8> = row.try_get(0)?;
                validate_counters(&state)
                    .map_err(|_| RegistryError::Corrupt("counters row too long".into()))?;
                Ok(Some(state))
            }
            None => Ok(None),
        }
    }

    async fn store_counters(&self, peer: DeviceId, state: Vec<u8>) -> Result<(), RegistryError> {
        validate_counters(&state)?;
        let s = &self.schema;
        let c = self.client.lock().await;
        c.execute(
            &format!(
                "INSERT INTO {s}.counters (peer, state) VALUES ($1, $2)
                 ON CONFLICT (peer) DO UPDATE SET state = EXCLUDED.state"
            ),
            &[&peer.0.as_slice(), &state],
        )
        .await?;
        Ok(())
    }

    async fn load_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        let s = &self.schema;
        let c = self.client.lock().await;
        let row = c
            .query_opt(
                &format!("SELECT blob FROM {s}.blobs WHERE kind = $1 AND peer = $2"),
                &[&i16::from(kind.code()), &peer.0.as_slice()],
            )
            .await?;
        match row {
            Some(row) => {
                let blob: Vec<u8> = row.try_get(0)?;
                validate_blob(&blob)
                    .map_err(|_| RegistryError::Corrupt("blob row too long".into()))?;
                Ok(Some(blob))
            }
            None => Ok(None),
        }
    }

    async fn store_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
        blob: Vec<u8>,
    ) -> Result<(), RegistryError> {
        validate_blob(&blob)?;
        let s = &self.schema;
        let c = self.client.lock().await;
        c.execute(
            &format!(
                "INSERT INTO {s}.blobs (kind, peer, blob) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, peer) DO UPDATE SET blob = EXCLUDED.blob"
            ),
            &[&i16::from(kind.code()), &peer.0.as_slice(), &blob],
        )
        .await?;
        Ok(())
    }

    async fn record_response(
        &self,
        token: Vec<u8>,
        device: DeviceId,
        status: u8,
    ) -> Result<(), RegistryError> {
        validate_token(&token)?;
        let s = &self.schema;
        let c = self.client.lock().await;
        c.execute(
            &format!(
                "INSERT INTO {s}.responses (token, device, status) VALUES ($1, $2, $3)
                 ON CONFLICT (token, device) DO UPDATE SET status = EXCLUDED.status"
            ),
            &[&token, &device.0.as_slice(), &i16::from(status)],
        )
        .await?;
        Ok(())
    }

    async fn responses(&self, token: Vec<u8>) -> Result<Vec<ResponseRecord>, RegistryError> {
        validate_token(&token)?;
        let s = &self.schema;
        let c = self.client.lock().await;
        let rows = c
            .query(
                &format!(
                    "SELECT device, status FROM {s}.responses WHERE token = $1 ORDER BY device"
                ),
                &[&token],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let bad = || RegistryError::Corrupt("responses row".into());
                let device: Vec<u8> = row.try_get(0)?;
                let status: i16 = row.try_get(1)?;
                Ok(ResponseRecord {
                    device: DeviceId(device.as_slice().try_into().map_err(|_| bad())?),
                    status: u8::try_from(status).map_err(|_| bad())?,
                })
            })
            .collect()
    }

    async fn add_enrollment(
        &self,
        token: TokenHash,
        enrollment: Enrollment,
        now: u64,
    ) -> Result<(), RegistryError> {
        enrollment.validate()?;
        let s = &self.schema;
        let mut c = self.client.lock().await;
        let tx = c.transaction().await?;
        tx.execute(
            &format!("DELETE FROM {s}.enrollments WHERE expires <= $1"),
            &[&i64_of(now)?],
        )
        .await?;
        tx.execute(
            &format!(
                "INSERT INTO {s}.enrollments (hash, expires, name, groups) VALUES ($1, $2, $3, $4)"
            ),
            &[
                &token.0.as_slice(),
                &i64_of(enrollment.expires)?,
                &enrollment.name,
                &enrollment.groups,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn enrollment(&self, token: TokenHash, now: u64) -> Result<Enrollment, RegistryError> {
        let s = &self.schema;
        let c = self.client.lock().await;
        let row = c
            .query_opt(
                &format!("SELECT expires, name, groups FROM {s}.enrollments WHERE hash = $1"),
                &[&token.0.as_slice()],
            )
            .await?;
        let Some(row) = row else {
            return Err(RegistryError::EnrollmentInvalid);
        };
        let e = enrollment_of_row(&row)?;
        if now >= e.expires {
            return Err(RegistryError::EnrollmentExpired);
        }
        Ok(e)
    }
}
