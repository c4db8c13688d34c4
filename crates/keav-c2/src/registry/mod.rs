//! The fleet registry: every device the C2 server knows, the replay guard's per-peer
//! counters, responses per command token, and the identity service's enrollment tokens.
//!
//! [`Registry`] is the store trait; two engines implement it:
//! - [`RedbRegistry`] (the default): one redb file, one write transaction per change, every
//!   row carrying a CRC-32C so a damaged row reads as [`RegistryError::Corrupt`], never as a
//!   panic or as wrong data;
//! - [`PgRegistry`] (feature `postgres`): PostgreSQL through tokio-postgres, tables created on
//!   open inside a schema of the operator's choice, for fleets beyond one machine.
//!
//! Both pass the same test suite (`tests/identity.rs`). Rows read from either engine are
//! validated (algorithm id, key encoding, status, names) before they are returned.
//!
//! Enrollment tokens are stored by their SHA-256 ([`TokenHash`]), never in the clear, and a
//! token is consumed in the same transaction that stores the device it enrolled
//! ([`Registry::enroll_device`]), so a crash cannot leave a used token or an unenrolled
//! device behind.

use std::future::Future;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::keys::{Alg, DeviceId, KeyError, PublicKey};

mod embedded;
#[cfg(feature = "postgres")]
mod postgres;

pub use embedded::RedbRegistry;
#[cfg(feature = "postgres")]
pub use postgres::PgRegistry;

/// Longest device name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest group name, in bytes.
pub const MAX_GROUP_LEN: usize = 64;
/// Most groups a device belongs to.
pub const MAX_GROUPS: usize = 32;
/// Longest command token a response can be recorded under.
pub const MAX_TOKEN_LEN: usize = 255;
/// Largest per-peer counter blob.
pub const MAX_COUNTERS_LEN: usize = 64 * 1024;
/// Largest blob stored per (kind, peer).
pub const MAX_BLOB_LEN: usize = 64 * 1024;

/// What an opaque per-peer blob holds ([`Registry::load_blob`]). Each kind is its own slot;
/// deleting a device deletes its blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlobKind {
    /// The server's confidential-channel state for a device
    /// ([`crate::confidential::Confidential::export_state`]; secret).
    Confidential,
    /// The operator's confidentiality policy for a device (one byte: 1 = required).
    ConfidentialPolicy,
}

impl BlobKind {
    /// The kind's stored code.
    pub fn code(self) -> u8 {
        match self {
            BlobKind::Confidential => 1,
            BlobKind::ConfidentialPolicy => 2,
        }
    }

    /// Every kind (deletion of a device removes them all).
    pub const ALL: [BlobKind; 2] = [BlobKind::Confidential, BlobKind::ConfidentialPolicy];
}
/// Longest broker password hash (Mosquitto's `$7$` hashes are about 130 characters).
pub const MAX_HASH_LEN: usize = 512;

/// Why the registry refused or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A device with this id is already registered.
    #[error("device {0} is already registered")]
    DuplicateId(DeviceId),
    /// This public key is already registered (under the id given).
    #[error("public key already registered as device {0}")]
    DuplicateKey(DeviceId),
    /// No device has this id.
    #[error("no device {0}")]
    NotFound(DeviceId),
    /// The enrollment token is unknown or was used already.
    #[error("enrollment token unknown or already used")]
    EnrollmentInvalid,
    /// The enrollment token has expired.
    #[error("enrollment token expired")]
    EnrollmentExpired,
    /// A value to store is out of bounds (name, group, token or blob too long, bad characters).
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// A stored row failed its checksum or validation.
    #[error("corrupt registry row: {0}")]
    Corrupt(String),
    /// The redb engine failed.
    #[error("redb: {0}")]
    Redb(Box<redb::Error>),
    /// The PostgreSQL engine failed.
    #[cfg(feature = "postgres")]
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A blocking task running a registry call panicked or was cancelled.
    #[error("registry task failed")]
    Task,
    /// The device is revoked: its status cannot change any more (a revoked identity is
    /// deleted and enrolled again, never brought back).
    #[error("device {0} is revoked; its status cannot change")]
    Revoked(DeviceId),
    /// [`Registry::set_status_if`]: the stored status is not the one expected (someone else
    /// changed it since it was read); nothing was written.
    #[error("device {id} is {found:?}, not {expected:?}")]
    StatusConflict {
        /// The device.
        id: DeviceId,
        /// The status the caller expected.
        expected: DeviceStatus,
        /// The status stored.
        found: DeviceStatus,
    },
}

/// Whether a device stored as `current` may be set to `new`, when the caller expected it to
/// be `expected` (if given). Revoked is final ([`RegistryError::Revoked`]); setting Revoked
/// again is allowed (idempotent).
pub(crate) fn check_transition(
    id: DeviceId,
    current: DeviceStatus,
    expected: Option<DeviceStatus>,
    new: DeviceStatus,
) -> Result<(), RegistryError> {
    if current == DeviceStatus::Revoked && new != DeviceStatus::Revoked {
        return Err(RegistryError::Revoked(id));
    }
    match expected {
        Some(expected) if expected != current => Err(RegistryError::StatusConflict {
            id,
            expected,
            found: current,
        }),
        _ => Ok(()),
    }
}

/// Where a device stands in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeviceStatus {
    /// Has an identity from the identity service; not yet joined.
    Registered = 1,
    /// Asked to join; waiting for a person or a device to vouch for it.
    PendingJoin = 2,
    /// Member of the fleet: the server commands it.
    Joined = 3,
    /// Identity withdrawn: no broker account, refused everywhere.
    Revoked = 4,
}

impl DeviceStatus {
    /// The status of a stored code.
    pub fn from_code(code: u8) -> Option<DeviceStatus> {
        match code {
            1 => Some(DeviceStatus::Registered),
            2 => Some(DeviceStatus::PendingJoin),
            3 => Some(DeviceStatus::Joined),
            4 => Some(DeviceStatus::Revoked),
            _ => None,
        }
    }

    /// The stored code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// A short lower-case name (`registered`, `pending_join`, `joined`, `revoked`).
    pub fn name(self) -> &'static str {
        match self {
            DeviceStatus::Registered => "registered",
            DeviceStatus::PendingJoin => "pending_join",
            DeviceStatus::Joined => "joined",
            DeviceStatus::Revoked => "revoked",
        }
    }
}

/// One device of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Its identity.
    pub id: DeviceId,
    /// Its signature algorithm.
    pub alg: Alg,
    /// Its public key, as [`PublicKey::to_bytes`] encodes it.
    pub public_key: Vec<u8>,
    /// Where it stands.
    pub status: DeviceStatus,
    /// Its broker password's hash (Mosquitto password-file format), never the password.
    pub password_hash: String,
    /// When it was registered, in seconds since the Unix epoch.
    pub created: u64,
    /// An optional human-readable name.
    pub name: Option<String>,
    /// The groups it belongs to (a command can address a group).
    pub groups: Vec<String>,
}

impl DeviceRecord {
    /// The record's public key, parsed and checked.
    pub fn key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::from_bytes(self.alg, &self.public_key)
    }

    /// Checks every field's bounds (called before storing and after reading).
    pub fn validate(&self) -> Result<(), RegistryError> {
        self.key()
            .map_err(|_| RegistryError::Invalid("public key"))?;
        if self.password_hash.len() > MAX_HASH_LEN || !printable(&self.password_hash) {
            return Err(RegistryError::Invalid("password hash"));
        }
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        validate_groups(&self.groups)
    }
}

/// What an enrollment token allows: one registration before `expires`, with the name and
/// groups the operator chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// Expiry, in seconds since the Unix epoch (the token is refused from then on).
    pub expires: u64,
    /// The name the enrolled device gets.
    pub name: Option<String>,
    /// The groups the enrolled device joins.
    pub groups: Vec<String>,
}

impl Enrollment {
    /// Checks the name and groups.
    pub fn validate(&self) -> Result<(), RegistryError> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        validate_groups(&self.groups)
    }
}

/// The SHA-256 of an enrollment token: what the registry stores and looks up.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// The hash of `token`.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TokenHash({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// A device's answer to a command, recorded under the command's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseRecord {
    /// Who answered.
    pub device: DeviceId,
    /// The response's status code.
    pub status: u8,
}

/// A fleet registry. Every method is one atomic change or one consistent read.
///
/// Methods take owned arguments so that engines can move them into blocking tasks.
pub trait Registry: Send + Sync + 'static {
    /// Stores a new device. Refuses a known id ([`RegistryError::DuplicateId`]) or a known
    /// public key ([`RegistryError::DuplicateKey`]).
    fn insert_device(
        &self,
        record: DeviceRecord,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Consumes the enrollment token `token` (valid at `now`) and stores `record`, in one
    /// transaction: if the device is refused, the token stays usable.
    fn enroll_device(
        &self,
        record: DeviceRecord,
        token: TokenHash,
        now: u64,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The device `id`, if known.
    fn device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<DeviceRecord>, RegistryError>> + Send;

    /// Every device, ordered by id.
    fn devices(&self) -> impl Future<Output = Result<Vec<DeviceRecord>, RegistryError>> + Send;

    /// Sets a device's status and returns the updated record. A revoked device stays
    /// revoked ([`RegistryError::Revoked`] for any other status).
    fn set_status(
        &self,
        id: DeviceId,
        status: DeviceStatus,
    ) -> impl Future<Output = Result<DeviceRecord, RegistryError>> + Send;

    /// Compare-and-set: sets the status to `new` only if it is `expected`, atomically (one
    /// transaction / one conditional `UPDATE`), and returns the updated record. Otherwise
    /// nothing is written: [`RegistryError::StatusConflict`] with the stored status,
    /// [`RegistryError::Revoked`] if the device is revoked and `new` is not Revoked,
    /// [`RegistryError::NotFound`]. Use it wherever a status is changed because of a status
    /// read earlier, so a concurrent change (a revocation above all) is never overwritten.
    fn set_status_if(
        &self,
        id: DeviceId,
        expected: DeviceStatus,
        new: DeviceStatus,
    ) -> impl Future<Output = Result<DeviceRecord, RegistryError>> + Send;

    /// Replaces a device's groups.
    fn set_groups(
        &self,
        id: DeviceId,
        groups: Vec<String>,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Removes a device (its counters and blobs too); `false` if it was not there.
    fn delete_device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// The replay guard's stored state for `peer` (opaque bytes), if any.
    fn load_counters(
        &self,
        peer: DeviceId,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, RegistryError>> + Send;

    /// Stores the replay guard's state for `peer` durably (returns once committed).
    fn store_counters(
        &self,
        peer: DeviceId,
        state: Vec<u8>,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The blob of kind `kind` stored for `peer` (opaque bytes), if any.
    fn load_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, RegistryError>> + Send;

    /// Stores the blob of kind `kind` for `peer` durably (returns once committed), replacing
    /// the previous one. At most [`MAX_BLOB_LEN`] bytes.
    fn store_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
        blob: Vec<u8>,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Records `device`'s response `status` to the command `token` (a later response from
    /// the same device to the same token replaces the earlier one).
    fn record_response(
        &self,
        token: Vec<u8>,
        device: DeviceId,
        status: u8,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Every response recorded under `token`, ordered by device id.
    fn responses(
        &self,
        token: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<ResponseRecord>, RegistryError>> + Send;

    /// Stores a new enrollment token (by its hash). Expired tokens are purged on the way.
    fn add_enrollment(
        &self,
        token: TokenHash,
        enrollment: Enrollment,
        now: u64,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The enrollment `token` allows at `now`, without consuming it
    /// ([`RegistryError::EnrollmentInvalid`] or [`RegistryError::EnrollmentExpired`]
    /// otherwise).
    fn enrollment(
        &self,
        token: TokenHash,
        now: u64,
    ) -> impl Future<Output = Result<Enrollment, RegistryError>> + Send;

    /// The devices of `group`, ordered by id.
    fn devices_in_group(
        &self,
        group: String,
    ) -> impl Future<Output = Result<Vec<DeviceRecord>, RegistryError>> + Send {
        async move {
            let all = self.devices().await?;
            Ok(all
                .into_iter()
                .filter(|d| d.groups.contains(&group))
                .collect())
        }
    }
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@')
}

/// Checks a device name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._:@-]`.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.bytes().all(name_char) {
        return Err(RegistryError::Invalid("device name"));
    }
    Ok(())
}

/// Checks a group list: at most [`MAX_GROUPS`] names of 1 to [`MAX_GROUP_LEN`] bytes of
/// `[A-Za-z0-9._:@-]`, no repeats.
pub fn validate_groups(groups: &[String]) -> Result<(), RegistryError> {
    if groups.len() > MAX_GROUPS {
        return Err(RegistryError::Invalid("group list"));
    }
    for (i, g) in groups.iter().enumerate() {
        if g.is_empty() || g.len() > MAX_GROUP_LEN || !g.bytes().all(name_char) {
            return Err(RegistryError::Invalid("group name"));
        }
        if groups[..i].contains(g) {
            return Err(RegistryError::Invalid("group list"));
        }
    }
    Ok(())
}

fn validate_token(token: &[u8]) -> Result<(), RegistryError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(RegistryError::Invalid("command token"));
    }
    Ok(())
}

fn validate_blob(blob: &[u8]) -> Result<(), RegistryError> {
    if blob.len() > MAX_BLOB_LEN {
        return Err(RegistryError::Invalid("blob"));
    }
    Ok(())
}

fn validate_counters(state: &[u8]) -> Result<(), RegistryError> {
    if state.len() > MAX_COUNTERS_LEN {
        return Err(RegistryError::Invalid("counter state"));
    }
    Ok(())
}

fn corrupt(what: &str) -> RegistryError {
    RegistryError::Corrupt(what.to_string())
}

/// Bounded reader over a stored row (every read checks the remaining length).
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RegistryError> {
        if self.buf.len() < n {
            return Err(corrupt("row truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, RegistryError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, RegistryError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u64(&mut self) -> Result<u64, RegistryError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes16(&mut self) -> Result<&'a [u8], RegistryError> {
        let n = self.u16()?;
        self.take(n)
    }

    fn string8(&mut self) -> Result<String, RegistryError> {
        let n = usize::from(self.u8()?);
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt("string not UTF-8"))
    }

    fn opt_string8(&mut self) -> Result<Option<String>, RegistryError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string8()?)),
            _ => Err(corrupt("bad option tag")),
        }
    }

    fn strings8(&mut self) -> Result<Vec<String>, RegistryError> {
        let n = usize::from(self.u8()?);
        if n > MAX_GROUPS {
            return Err(corrupt("too many groups"));
        }
        (0..n).map(|_| self.string8()).collect()
    }

    fn end(&self) -> Result<(), RegistryError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}

fn put_u16(out: &mut Vec<u8>, n: usize) {
    // Callers bound every length by the MAX_* constants, all below 2^16.
    out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
}

fn put_string8(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_string8(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_string8(out, s);
        }
    }
}

fn put_strings8(out: &mut Vec<u8>, v: &[String]) {
    out.push(u8::try_from(v.len()).unwrap_or(u8::MAX));
    for s in v {
        put_string8(out, s);
    }
}

/// Appends the CRC-32C of everything before it.
fn seal(mut row: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&row);
    row.extend_from_slice(&crc.to_be_bytes());
    row
}

/// Checks and strips a row's CRC-32C.
fn unseal(row: &[u8]) -> Result<&[u8], RegistryError> {
    if row.len() < 4 {
        return Err(corrupt("row shorter than its checksum"));
    }
    let (body, crc) = row.split_at(row.len() - 4);
    let want = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != want {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(body)
}

const ROW_VERSION: u8 = 1;

/// A device row: version, alg, status, created, key, hash, name, groups, CRC-32C.
fn encode_device(r: &DeviceRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + r.public_key.len() + r.password_hash.len());
    out.push(ROW_VERSION);
    out.push(r.alg.id());
    out.push(r.status.code());
    out.extend_from_slice(&r.created.to_be_bytes());
    put_u16(&mut out, r.public_key.len());
    out.extend_from_slice(&r.public_key);
    put_u16(&mut out, r.password_hash.len());
    out.extend_from_slice(r.password_hash.as_bytes());
    put_opt_string8(&mut out, &r.name);
    put_strings8(&mut out, &r.groups);
    seal(out)
}

fn decode_device(id: DeviceId, row: &[u8]) -> Result<DeviceRecord, RegistryError> {
    let mut r = Reader { buf: unseal(row)? };
    if r.u8()? != ROW_VERSION {
        return Err(corrupt("unknown device row version"));
    }
    let alg = Alg::from_id(r.u8()?).map_err(|_| corrupt("unknown algorithm"))?;
    let status = DeviceStatus::from_code(r.u8()?).ok_or_else(|| corrupt("unknown status"))?;
    let created = r.u64()?;
    let public_key = r.bytes16()?.to_vec();
    let password_hash =
        String::from_utf8(r.bytes16()?.to_vec()).map_err(|_| corrupt("password hash not UTF-8"))?;
    let name = r.opt_string8()?;
    let groups = r.strings8()?;
    r.end()?;
    let rec = DeviceRecord {
        id,
        alg,
        public_key,
        status,
        password_hash,
        created,
        name,
        groups,
    };
    checked(rec)
}

/// Validates a record read from an engine.
fn checked(rec: DeviceRecord) -> Result<DeviceRecord, RegistryError> {
    match rec.validate() {
        Ok(()) => Ok(rec),
        Err(e) => Err(RegistryError::Corrupt(format!("device {}: {e}", rec.id))),
    }
}

/// An enrollment row: version, expiry, name, groups, CRC-32C.
fn encode_enrollment(e: &Enrollment) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.push(ROW_VERSION);
    out.extend_from_slice(&e.expires.to_be_bytes());
    put_opt_string8(&mut out, &e.name);
    put_strings8(&mut out, &e.groups);
    seal(out)
}

fn decode_enrollment(row: &[u8]) -> Result<Enrollment, RegistryError> {
    let mut r = Reader { buf: unseal(row)? };
    if r.u8()? != ROW_VERSION {
        return Err(corrupt("unknown enrollment row version"));
    }
    let e = Enrollment {
        expires: r.u64()?,
        name: r.opt_string8()?,
        groups: r.strings8()?,
    };
    r.end()?;
    e.validate()
        .map_err(|err| RegistryError::Corrupt(format!("enrollment: {err}")))?;
    Ok(e)
}

#[cfg(test)]
mod store_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn record() -> DeviceRecord {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        DeviceRecord {
            id: k.device_id(),
            alg: Alg::Ed25519,
            public_key: k.public().to_bytes(),
            status: DeviceStatus::Joined,
            password_hash: "$7$101$abc$def".into(),
            created: 1_700_000_000,
            name: Some("pump-7".into()),
            groups: vec!["pumps".into(), "site-a".into()],
        }
    }

    #[test]
    fn device_row_round_trips_and_every_bit_flip_is_caught() {
        let r = record();
        let row = encode_device(&r);
        assert_eq!(decode_device(r.id, &row).unwrap(), r);
        for i in 0..row.len() {
            for bit in 0..8 {
                let mut bad = row.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    matches!(decode_device(r.id, &bad), Err(RegistryError::Corrupt(_))),
                    "flip at byte {i} bit {bit} not caught"
                );
            }
        }
        for n in 0..row.len() {
            assert!(decode_device(r.id, &row[..n]).is_err());
        }
    }

    #[test]
    fn a_well_sealed_row_with_invalid_fields_is_still_refused() {
        let mut r = record();
        r.public_key = vec![0u8; 32]; // small-order point
        let row = encode_device(&r);
        assert!(matches!(
            decode_device(r.id, &row),
            Err(RegistryError::Corrupt(_))
        ));
    }

    #[test]
    fn enrollment_row_round_trips() {
        let e = Enrollment {
            expires: 42,
            name: None,
            groups: vec!["g".into()],
        };
        let row = encode_enrollment(&e);
        assert_eq!(decode_enrollment(&row).unwrap(), e);
        let mut bad = row.clone();
        bad[3] ^= 0x40;
        assert!(decode_enrollment(&bad).is_err());
    }

    #[test]
    fn names_and_groups_are_bounded() {
        assert!(validate_name("pump-7").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert!(validate_groups(&["a".into(), "a".into()]).is_err());
        let many: Vec<String> = (0..33).map(|i| format!("g{i}")).collect();
        assert!(validate_groups(&many).is_err());
    }
}
