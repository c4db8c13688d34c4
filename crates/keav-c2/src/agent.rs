//! The device agent: a tokio driver around the sans-IO device engine
//! ([`crate::engine::Device`]), with MQTT ([`crate::mqtt`]), durable state and HTTP update
//! downloads.
//!
//! # Life of an agent
//!
//! 1. [`Identity::enroll`]: if the data directory holds no identity yet, the agent makes a
//!    signing key (stored first, file 0600), registers it with the identity service (proof of
//!    possession, enrollment token) and stores what it was given (its id, its broker
//!    credentials, the C2 server's key; file 0600). Later runs [`Identity::load`] it.
//! 2. [`Agent::start`]: restores the engine from its last snapshot (or starts registered),
//!    connects to the broker with its own account, subscribes to its own command topic and,
//!    if asked, requests to join (simple, human-moderated: the words are shown through
//!    [`Handlers::on_show_words`]; observed: the code goes to [`Handlers::on_present_code`]).
//! 3. Every inbound message goes to the engine; an accepted one's snapshot is written
//!    durably ([`StateStore`]) **before** the agent acts or answers, so a restarted agent
//!    never accepts an old message again. Dropped messages change nothing; each is logged
//!    with its reason and reported as [`AgentNotice::Dropped`].
//! 4. Commands reach the application through [`Handlers`]; the agent answers with the
//!    status the handler returns. Updates: the agent downloads the URL over plain HTTP
//!    (bounded size and time), the engine checks the SHA-256 in constant time and answers
//!    success or a failure status; an activation hands the verified bytes to
//!    [`Handlers::on_activate`].
//! 5. Termination sends the device back to registered; deregistration erases its key and
//!    identity files and ends the agent. Revocation (the broker refuses the device's
//!    credentials — CONNACK codes 4 and 5 only — [`AgentOptions::refusals_before_revoked`]
//!    times in a row, at start or on reconnection) ends the agent with
//!    [`AgentError::Revoked`] instead of retrying forever. Other refusals (server
//!    unavailable…) never count as revocation.
//!
//! # The state file
//!
//! `engine.state` is bound to the device: it starts with `KC2A`, a version byte and the
//! device's id, then the engine's snapshot (empty right after enrollment:
//! [`Identity::enroll`] writes it before the identity, so a registered identity always has
//! one). A state file of another device is refused ([`AgentError::ForeignState`]), and so is
//! a missing one for a registered identity ([`AgentError::StateMissing`]): starting afresh
//! would forget which server messages were already accepted. [`AgentOptions::reset_state`]
//! starts afresh anyway; the server's continuity with the device must then be reset too
//! ([`crate::server::Server::reset_continuity`], `keav c2 reset`).
//! 6. Optional confidentiality ([`crate::confidential`]): the server (or the device,
//!    [`Agent::start_confidential`]) starts a KEAV session whose handshake frames travel as
//!    Generic messages; the agent answers the server's frames (then acknowledges the Generic
//!    command with `DataSuccess`), opens sealed Data (`keav.sealed`) and hands the Data inside
//!    to [`Handlers::on_data`] with `confidential = true`, and seals data for the server
//!    ([`Agent::send_data_confidential`]). The session's state (`confidential.state`, 0600)
//!    is written durably before any frame or sealed record leaves and before opened data is
//!    handed on, so a restart neither reuses a nonce nor opens a record twice.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::acl;
use crate::confidential::{
    self, ConfError, ConfEvent, Confidential, ConfidentialConfig, Pairing, SessionId, Side,
    StoreFirst,
};
use crate::engine::{
    AnyDevice, DeviceConfig, DeviceSnapshot, Dropped, EngineError, JoinRequestKind, Joined,
    JoinedEvent, MustPersist, Outgoing, Registered, RegisteredEvent,
};
use crate::engine::{Counters, Device};
use crate::identity::{BrokerPassword, Client, IdentityError, Registration};
use crate::keys::{Alg, DeviceId, KeyError, PublicKey, SigningKey};
use crate::mqtt::{self, Inbound, LinkOptions, MqttError, MqttLink};
use crate::topics::Topics;
use crate::wire::{Data, JoinCode, Status, Token};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// File holding the device's signing key (algorithm id, then the key's bytes; 0600).
pub const KEY_FILE: &str = "device.key";
/// File holding the device's identity and broker credentials (JSON; 0600).
pub const IDENTITY_FILE: &str = "identity.json";
/// File holding the engine's last snapshot.
pub const STATE_FILE: &str = "engine.state";
/// File holding the confidential session's state (secret; 0600).
pub const CONFIDENTIAL_FILE: &str = "confidential.state";
/// Directory holding verified updates, named by their digest in hex.
pub const UPDATES_DIR: &str = "updates";
/// Default largest update the agent downloads (64 MiB).
pub const DEFAULT_MAX_UPDATE: usize = 64 * 1024 * 1024;

/// Why the agent failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Registration with the identity service failed.
    #[error("identity service: {0}")]
    Identity(#[from] IdentityError),
    /// The broker connection failed.
    #[error("broker: {0}")]
    Mqtt(#[from] MqttError),
    /// The engine refused a call.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// A key could not be made or read.
    #[error("key: {0}")]
    Key(#[from] KeyError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A stored file is malformed.
    #[error("corrupt {0}")]
    Corrupt(&'static str),
    /// The identity was revoked (deregistered): the agent cannot run any more.
    #[error("this device was deregistered")]
    Deregistered,
    /// The broker refuses the device's credentials: the device was revoked (its broker
    /// account is gone). The agent stops rather than retrying forever.
    #[error("the broker refuses this device's credentials ({0}): the device was revoked")]
    Revoked(String),
    /// The state file belongs to another device (or has no device binding).
    #[error("the state file is not this device's (it names {found}); refusing to load it")]
    ForeignState {
        /// The device the file names (`no device` if it has no binding).
        found: String,
    },
    /// The identity is registered but its state file is missing: starting afresh would
    /// forget which messages were accepted. Start with `reset_state` (`--reset-state`) to
    /// do so anyway, and have the operator reset the server's continuity (`keav c2 reset`).
    #[error("the state file {} is missing for a registered identity; start with --reset-state to start afresh (then `keav c2 reset <id>` on the server)", path.display())]
    StateMissing {
        /// The file.
        path: PathBuf,
    },
    /// The call needs the device in another state (e.g. joined).
    #[error("the device is {0}")]
    WrongState(&'static str),
    /// The agent has stopped.
    #[error("the agent has stopped")]
    Stopped,
    /// The confidential layer refused the call (no session yet, payload too long…).
    #[error("confidential: {0}")]
    Confidential(#[from] ConfError),
}

fn io_err(path: &Path, source: std::io::Error) -> AgentError {
    AgentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a device needs to run: its signing key and what the identity service gave it.
pub struct Identity {
    key: SigningKey,
    registration: Registration,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device", &self.registration.device_id)
            .field("server", &self.registration.server_id)
            .finish_non_exhaustive()
    }
}

/// The identity file's JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    device_id: String,
    broker: String,
    broker_username: String,
    broker_password: String,
    server_alg: String,
    server_public_key: String,
}

impl Identity {
    /// An identity from its parts (checked: the registration is for this key).
    pub fn new(key: SigningKey, registration: Registration) -> Result<Identity, AgentError> {
        if key.device_id() != registration.device_id {
            return Err(AgentError::Corrupt("registration is for another key"));
        }
        Ok(Identity { key, registration })
    }

    /// The device's id.
    pub fn device_id(&self) -> DeviceId {
        self.registration.device_id
    }

    /// What the identity service gave the device.
    pub fn registration(&self) -> &Registration {
        &self.registration
    }

    /// Reads the identity from `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Identity>, AgentError> {
        let idp = dir.join(IDENTITY_FILE);
        if !idp.exists() {
            return Ok(None);
        }
        let key = load_key(dir)?.ok_or(AgentError::Corrupt("identity without key"))?;
        let text = Zeroizing::new(std::fs::read(&idp).map_err(|e| io_err(&idp, e))?);
        let mut f: IdentityFile =
            serde_json::from_slice(&text).map_err(|_| AgentError::Corrupt("identity file"))?;
        let password = BrokerPassword::new(Zeroizing::new(std::mem::take(&mut f.broker_password)));
        let alg = Alg::from_name(&f.server_alg).ok_or(AgentError::Corrupt("server algorithm"))?;
        let server_key = STANDARD
            .decode(f.server_public_key.as_bytes())
            .ok()
            .and_then(|b| PublicKey::from_bytes(alg, &b).ok())
            .ok_or(AgentError::Corrupt("server key"))?;
        let device_id = key.device_id();
        if f.device_id != device_id.to_hex() {
            return Err(AgentError::Corrupt("identity is for another key"));
        }
        let server_id = DeviceId::of_key(&server_key);
        let registration = Registration {
            device_id,
            broker_username: f.broker_username,
            broker_password: password,
            broker: f.broker,
            server_id,
            server_key,
            topics: Topics::new(server_id),
        };
        Ok(Some(Identity { key, registration }))
    }

    /// Writes the identity (key and registration) to `dir`, files 0600.
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        save_key(dir, &self.key)?;
        let r = &self.registration;
        let f = IdentityFile {
            device_id: r.device_id.to_hex(),
            broker: r.broker.clone(),
            broker_username: r.broker_username.clone(),
            broker_password: r.broker_password.expose().to_string(),
            server_alg: r.server_key.alg().name().to_string(),
            server_public_key: STANDARD.encode(r.server_key.to_bytes()),
        };
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(&f).map_err(|_| AgentError::Corrupt("identity encode"))?,
        );
        drop(f);
        acl::replace_file(dir, IDENTITY_FILE, &json).map_err(|e| AgentError::Io {
            path: dir.join(IDENTITY_FILE),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(())
    }

    /// The identity in `dir`, or a new one: a fresh `alg` key (kept across a failed
    /// registration, so a retry proves the same key) registered at `service` with
    /// `enrollment_token`.
    pub async fn enroll(
        dir: &Path,
        service: &str,
        enrollment_token: &str,
        alg: Alg,
    ) -> Result<Identity, AgentError> {
        if let Some(id) = Identity::load(dir)? {
            return Ok(id);
        }
        ensure_dir(dir)?;
        let key = match load_key(dir)? {
            Some(k) => k,
            None => {
                let k = tokio::task::spawn_blocking(move || SigningKey::generate(alg))
                    .await
                    .map_err(|_| AgentError::Stopped)??;
                save_key(dir, &k)?;
                k
            }
        };
        let registration = Client::new(service)?
            .register(&key, enrollment_token)
            .await?;
        let id = Identity::new(key, registration)?;
        // The state file first: a registered identity always has one (a missing one later
        // means it was lost, see `AgentError::StateMissing`).
        write_state(dir, id.device_id(), &[])?;
        id.save(dir)?;
        tracing::info!(device = %id.device_id(), "registered with the identity service");
        Ok(id)
    }
}

fn ensure_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))
}

fn save_key(dir: &Path, key: &SigningKey) -> Result<(), AgentError> {
    ensure_dir(dir)?;
    let raw = key.to_bytes()?;
    let mut buf = Zeroizing::new(Vec::with_capacity(raw.len() + 1));
    buf.push(key.alg().id());
    buf.extend_from_slice(&raw);
    acl::replace_file(dir, KEY_FILE, &buf).map_err(|e| AgentError::Io {
        path: dir.join(KEY_FILE),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(())
}

fn load_key(dir: &Path) -> Result<Option<SigningKey>, AgentError> {
    let p = dir.join(KEY_FILE);
    let bytes = match std::fs::read(&p) {
        Ok(b) => Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&p, e)),
    };
    let (alg, raw) = bytes.split_first().ok_or(AgentError::Corrupt("key file"))?;
    let alg = Alg::from_id(*alg)?;
    Ok(Some(SigningKey::from_bytes(alg, raw)?))
}

/// Where the agent keeps its engine snapshot.
#[derive(Debug, Clone)]
pub enum StateStore {
    /// In a data directory (atomic replace, fsync, 0600), with verified updates beside it.
    Dir(PathBuf),
    /// Nowhere (simulated devices, tests): a restart starts afresh.
    Memory,
}

/// What a state file holds.
#[derive(Debug, PartialEq, Eq)]
enum Stored {
    /// No file (or a memory store).
    Nothing,
    /// The fresh file written at enrollment: no snapshot yet.
    Enrolled,
    /// An engine snapshot.
    Snapshot(Vec<u8>),
}

const AGENT_STATE_MAGIC: &[u8; 4] = b"KC2A";
const AGENT_STATE_VERSION: u8 = 1;

/// The state file's bytes: the binding header, then the snapshot (empty: enrolled).
fn bind_state(device: DeviceId, snapshot: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + snapshot.len());
    out.extend_from_slice(AGENT_STATE_MAGIC);
    out.push(AGENT_STATE_VERSION);
    out.extend_from_slice(&device.0);
    out.extend_from_slice(snapshot);
    out
}

/// Checks the binding header of a state file and returns what follows it.
fn unbind_state(device: DeviceId, bytes: &[u8]) -> Result<Stored, AgentError> {
    let Some(rest) = bytes.strip_prefix(AGENT_STATE_MAGIC.as_slice()) else {
        return Err(AgentError::ForeignState {
            found: "no device".into(),
        });
    };
    let (&version, rest) = rest
        .split_first()
        .ok_or(AgentError::Corrupt("state file header"))?;
    if version != AGENT_STATE_VERSION {
        return Err(AgentError::Corrupt("state file version"));
    }
    if rest.len() < 8 {
        return Err(AgentError::Corrupt("state file header"));
    }
    let (id, snapshot) = rest.split_at(8);
    let mut found = [0u8; 8];
    found.copy_from_slice(id);
    let found = DeviceId(found);
    if found != device {
        return Err(AgentError::ForeignState {
            found: found.to_hex(),
        });
    }
    Ok(if snapshot.is_empty() {
        Stored::Enrolled
    } else {
        Stored::Snapshot(snapshot.to_vec())
    })
}

fn write_state(dir: &Path, device: DeviceId, snapshot: &[u8]) -> Result<(), AgentError> {
    ensure_dir(dir)?;
    acl::replace_file(dir, STATE_FILE, &bind_state(device, snapshot)).map_err(|e| {
        AgentError::Io {
            path: dir.join(STATE_FILE),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    Ok(())
}

impl StateStore {
    fn load(&self, device: DeviceId) -> Result<Stored, AgentError> {
        match self {
            StateStore::Memory => Ok(Stored::Nothing),
            StateStore::Dir(d) => {
                let p = d.join(STATE_FILE);
                match std::fs::read(&p) {
                    Ok(b) => unbind_state(device, &b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Stored::Nothing),
                    Err(e) => Err(io_err(&p, e)),
                }
            }
        }
    }

    async fn save(&self, device: DeviceId, snap: &DeviceSnapshot) -> Result<(), AgentError> {
        match self {
            StateStore::Memory => Ok(()),
            StateStore::Dir(d) => {
                let (d, bytes) = (d.clone(), snap.bytes().to_vec());
                tokio::task::spawn_blocking(move || write_state(&d, device, &bytes))
                    .await
                    .map_err(|_| AgentError::Stopped)??;
                Ok(())
            }
        }
    }

    fn load_confidential(&self) -> Result<Option<Zeroizing<Vec<u8>>>, AgentError> {
        match self {
            StateStore::Memory => Ok(None),
            StateStore::Dir(d) => {
                let p = d.join(CONFIDENTIAL_FILE);
                match std::fs::read(&p) {
                    Ok(b) => Ok(Some(Zeroizing::new(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err(&p, e)),
                }
            }
        }
    }

    async fn save_confidential(&self, state: &[u8]) -> Result<(), AgentError> {
        match self {
            StateStore::Memory => Ok(()),
            StateStore::Dir(d) => {
                let (d, bytes) = (d.clone(), Zeroizing::new(state.to_vec()));
                tokio::task::spawn_blocking(move || {
                    ensure_dir(&d)?;
                    acl::replace_file(&d, CONFIDENTIAL_FILE, &bytes).map_err(|e| AgentError::Io {
                        path: d.join(CONFIDENTIAL_FILE),
                        source: std::io::Error::other(e.to_string()),
                    })
                })
                .await
                .map_err(|_| AgentError::Stopped)??;
                Ok(())
            }
        }
    }

    fn erase_identity(&self) {
        if let StateStore::Dir(d) = self {
            for f in [KEY_FILE, IDENTITY_FILE, CONFIDENTIAL_FILE] {
                let _ = std::fs::remove_file(d.join(f));
            }
        }
    }
}

/// What the application does with commands. Every method has a default; the defaults
/// refuse what they do not know (`ActionUnknown`, `DataTypeUnknown`) and accept the rest.
///
/// Handlers run on the agent's task: they should return quickly.
pub trait Handlers: Send + 'static {
    /// Runs action `action` with `args`; the status is the response.
    fn on_action(&mut self, action: u16, args: &[u8]) -> Status {
        let _ = (action, args);
        Status::ActionUnknown
    }

    /// Takes data from the server; the status is the response. `confidential`: the data
    /// came sealed in the device's confidential session (and was opened), not in the clear.
    fn on_data(&mut self, data: &Data, confidential: bool) -> Status {
        let _ = (data, confidential);
        Status::DataTypeUnknown
    }

    /// Takes a generic message; `Some(status)` answers it.
    fn on_generic(&mut self, data: &[u8]) -> Option<Status> {
        let _ = data;
        None
    }

    /// An update was downloaded and its digest verified (it waits for its activation).
    fn on_update_verified(&mut self, digest: &[u8; 32], update: &[u8]) {
        let _ = (digest, update);
    }

    /// Installs the verified update; the status is the response (`ActivateSuccess` or
    /// `ActivateFail`).
    fn on_activate(&mut self, digest: &[u8; 32], update: &[u8]) -> Status {
        let _ = (digest, update);
        Status::ActivateSuccess
    }

    /// Human-moderated join: show these words to the person who approves the join.
    fn on_show_words(&mut self, words: &[&'static str]) {
        let _ = words;
    }

    /// Observed join: present this code to the observing device.
    fn on_present_code(&mut self, code: &JoinCode) {
        let _ = code;
    }

    /// This device is asked to observe `joining`: the code it saw, or `None`.
    fn on_observation(&mut self, joining: DeviceId) -> Option<JoinCode> {
        let _ = joining;
        None
    }

    /// The device joined the fleet.
    fn on_joined(&mut self) {}

    /// The join was refused.
    fn on_join_refused(&mut self, status: Status) {
        let _ = status;
    }

    /// The server ended the membership (the device is registered again).
    fn on_terminated(&mut self) {}

    /// The identity was revoked; the agent stops and erases its key.
    fn on_deregistered(&mut self) {}
}

/// Where the device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStatus {
    /// Registered, not (yet) in the fleet.
    Registered,
    /// In the fleet.
    Joined,
    /// Deregistered (the agent has stopped).
    Deregistered,
}

/// Something that happened in the agent (for operators' logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentNotice {
    /// An inbound message was dropped, with no effect.
    Dropped(Dropped),
    /// The device joined.
    Joined,
    /// The join was refused.
    JoinRefused(Status),
    /// Words to show for a human-moderated join.
    Words(Vec<&'static str>),
    /// The agent answered the command `token` with `status`.
    Responded {
        /// The command's token.
        token: Token,
        /// The answer.
        status: Status,
    },
    /// The membership ended.
    Terminated,
    /// The identity was revoked.
    Deregistered,
    /// A confidential session with the server was established.
    ConfidentialEstablished {
        /// Its id.
        session: SessionId,
        /// It replaced a previous session.
        rekey: bool,
    },
    /// A confidential handshake failed (the previous session, if any, stays in use).
    ConfidentialFailed(String),
    /// A message was refused by the confidential layer (after the C2 checks passed).
    ConfidentialRefused(String),
}

/// Where the device's confidentiality stands ([`Agent::confidential_info`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentConfidential {
    /// A session is established.
    pub established: bool,
    /// The session's id.
    pub session: Option<SessionId>,
    /// Sessions completed with the server.
    pub sessions: u64,
    /// Records sealed in the current session.
    pub records_sealed: u64,
    /// Records opened in the current session.
    pub records_opened: u64,
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Where the snapshot goes.
    pub store: StateStore,
    /// The engine's settings.
    pub engine: DeviceConfig,
    /// Ask to join at start (if registered).
    pub join: Option<JoinRequestKind>,
    /// Largest update downloaded.
    pub max_update: usize,
    /// Time allowed for an update download.
    pub download_timeout: Duration,
    /// Override of the broker address the identity service gave.
    pub broker: Option<String>,
    /// How long to wait for the broker at start.
    pub connect_timeout: Duration,
    /// Refuse plain data from the server (answered `DataTypeUnknown`, not handed to
    /// [`Handlers::on_data`]): only data sealed in the confidential session is taken.
    pub require_confidential: bool,
    /// Start from a fresh state, whatever the state file holds (missing, another device's,
    /// or this device's): the device is registered again and accepts server messages it
    /// may have accepted before. The operator must reset the server's continuity with it.
    pub reset_state: bool,
    /// Connections the broker refuses for the credentials (CONNACK codes 4 and 5) in a row,
    /// at start or on reconnection, before the agent takes the device as revoked and stops
    /// with [`AgentError::Revoked`] (default 3; at least 1). At start, a refused connection
    /// is retried after [`AgentOptions::refusal_backoff`] (doubling), so a broker still
    /// loading a new account's password is not taken for a revocation.
    pub refusals_before_revoked: u64,
    /// Wait before retrying a connection refused at start (default 500 ms, doubling).
    pub refusal_backoff: Duration,
}

impl AgentOptions {
    /// Defaults: snapshots in `store`, default engine settings, no join request, 64 MiB
    /// updates downloaded within 5 minutes.
    pub fn new(store: StateStore) -> AgentOptions {
        AgentOptions {
            store,
            engine: DeviceConfig::default(),
            join: None,
            max_update: DEFAULT_MAX_UPDATE,
            download_timeout: Duration::from_secs(300),
            broker: None,
            connect_timeout: Duration::from_secs(10),
            require_confidential: false,
            reset_state: false,
            refusals_before_revoked: 3,
            refusal_backoff: Duration::from_millis(500),
        }
    }
}

enum Control {
    Join(JoinRequestKind, oneshot::Sender<Result<(), AgentError>>),
    SendData(Data, oneshot::Sender<Result<(), AgentError>>),
    SendConfidential(Data, oneshot::Sender<Result<(), AgentError>>),
    StartConfidential(oneshot::Sender<Result<(), AgentError>>),
    Resign(oneshot::Sender<Result<(), AgentError>>),
    Deregister(oneshot::Sender<Result<(), AgentError>>),
}

struct Downloaded {
    token: Token,
    digest: [u8; 32],
    result: Result<Vec<u8>, Status>,
}

#[derive(Debug, Default)]
struct Shared {
    counters: Counters,
    confidential: AgentConfidential,
}

/// A running agent. Dropping it stops the agent (as a crash would: what was persisted
/// stays).
#[derive(Debug)]
pub struct Agent {
    id: DeviceId,
    control: mpsc::Sender<Control>,
    status: watch::Receiver<AgentStatus>,
    notices: broadcast::Sender<AgentNotice>,
    first: StdMutex<Option<broadcast::Receiver<AgentNotice>>>,
    shared: Arc<StdMutex<Shared>>,
    task: Option<JoinHandle<Result<(), AgentError>>>,
}

enum Phase {
    Registered(Device<Registered>),
    Joined(Device<Joined>),
    Gone,
}

impl Phase {
    fn status(&self) -> AgentStatus {
        match self {
            Phase::Registered(_) => AgentStatus::Registered,
            Phase::Joined(_) => AgentStatus::Joined,
            Phase::Gone => AgentStatus::Deregistered,
        }
    }

    fn counters(&self) -> Counters {
        match self {
            Phase::Registered(d) => d.counters().clone(),
            Phase::Joined(d) => d.counters().clone(),
            Phase::Gone => Counters::default(),
        }
    }
}

impl Agent {
    /// Restores the engine, connects, subscribes, asks to join if told to, and runs until
    /// dropped, [`Agent::stop`]ped or deregistered.
    pub async fn start<H: Handlers>(
        identity: Identity,
        options: AgentOptions,
        handlers: H,
    ) -> Result<Agent, AgentError> {
        let Identity { key, registration } = identity;
        let id = registration.device_id;
        let server_key = registration.server_key.clone();
        let pairing = Pairing::new(&server_key, &key.public());
        let conf = match options.store.load_confidential()? {
            Some(state) => Some(Confidential::from_state(
                &state,
                Side::Device,
                pairing.clone(),
                ConfidentialConfig::default(),
                now_ms(),
            )?),
            None => None,
        };
        let stored = if options.reset_state {
            tracing::warn!(device = %id, "starting from a fresh state (--reset-state)");
            Stored::Enrolled
        } else {
            match options.store.load(id)? {
                Stored::Nothing => match &options.store {
                    StateStore::Dir(d) => {
                        return Err(AgentError::StateMissing {
                            path: d.join(STATE_FILE),
                        })
                    }
                    StateStore::Memory => Stored::Enrolled,
                },
                s => s,
            }
        };
        let phase = match stored {
            Stored::Snapshot(bytes) => {
                match AnyDevice::from_state(key, server_key, options.engine, &bytes)? {
                    AnyDevice::Registered(d) => Phase::Registered(d),
                    AnyDevice::Joined(d) => Phase::Joined(d),
                    AnyDevice::Deregistered(_) => return Err(AgentError::Deregistered),
                }
            }
            Stored::Enrolled | Stored::Nothing => {
                let d = Device::<Registered>::new(key, server_key, options.engine);
                options.store.save(id, &d.snapshot()).await?;
                Phase::Registered(d)
            }
        };
        let topic_in = registration.topics.to_device(id);
        let mut lo = LinkOptions::new(
            options
                .broker
                .clone()
                .unwrap_or_else(|| registration.broker.clone()),
            registration.broker_username.clone(),
            registration.broker_password.clone(),
            topic_in,
        );
        lo.connect_timeout = options.connect_timeout;
        let (link, inbound) = connect_at_start(
            id,
            options.refusals_before_revoked,
            options.refusal_backoff,
            || mqtt::connect(lo.clone()),
        )
        .await?;
        let (control_tx, control_rx) = mpsc::channel(16);
        let (status_tx, status_rx) = watch::channel(phase.status());
        let (notices, first) = broadcast::channel(1024);
        let shared = Arc::new(StdMutex::new(Shared::default()));
        let (dl_tx, dl_rx) = mpsc::channel(8);
        let mut run = Runner {
            id,
            phase,
            refusals_seen: link.refusals(),
            link,
            options,
            handlers,
            status: status_tx,
            notices: notices.clone(),
            shared: shared.clone(),
            downloads: dl_tx,
            verified: VecDeque::new(),
            pairing,
            conf,
        };
        if let (Some(kind), Phase::Registered(_)) = (run.options.join, &run.phase) {
            run.request_join(kind).await?;
        }
        // What was restored (status, counters, confidential session) is visible as soon as
        // `start` returns, not only once the task first runs.
        run.sync();
        let task = tokio::spawn(run.run(inbound, control_rx, dl_rx));
        tracing::info!(device = %id, "agent running");
        Ok(Agent {
            id,
            control: control_tx,
            status: status_rx,
            notices,
            first: StdMutex::new(Some(first)),
            shared,
            task: Some(task),
        })
    }

    /// The device's id.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// Where the device stands now.
    pub fn status(&self) -> AgentStatus {
        *self.status.borrow()
    }

    /// Waits until the device stands where `f` says (or the agent stops).
    pub async fn wait_status(&self, f: impl Fn(AgentStatus) -> bool) -> Option<AgentStatus> {
        let mut rx = self.status.clone();
        rx.wait_for(|s| f(*s)).await.ok().map(|s| *s)
    }

    /// The engine's drop and acceptance counters.
    pub fn counters(&self) -> Counters {
        self.shared
            .lock()
            .map(|s| s.counters.clone())
            .unwrap_or_default()
    }

    /// The agent's notices: the first call gets every notice since the start, later calls
    /// those from then on.
    pub fn notices(&self) -> broadcast::Receiver<AgentNotice> {
        match self.first.lock().ok().and_then(|mut f| f.take()) {
            Some(rx) => rx,
            None => self.notices.subscribe(),
        }
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), AgentError>>) -> Control,
    ) -> Result<(), AgentError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Asks to join (a registered device).
    pub async fn request_join(&self, kind: JoinRequestKind) -> Result<(), AgentError> {
        self.call(|tx| Control::Join(kind, tx)).await
    }

    /// Sends data to the server (a joined device).
    pub async fn send_data(&self, data: Data) -> Result<(), AgentError> {
        self.call(|tx| Control::SendData(data, tx)).await
    }

    /// Sends data to the server sealed in the confidential session (a joined device with an
    /// established session; [`AgentError::Confidential`] otherwise).
    pub async fn send_data_confidential(&self, data: Data) -> Result<(), AgentError> {
        self.call(|tx| Control::SendConfidential(data, tx)).await
    }

    /// Starts a confidential session with the server (or rekeys the current one); it is
    /// established once the server answered ([`AgentNotice::ConfidentialEstablished`]).
    pub async fn start_confidential(&self) -> Result<(), AgentError> {
        self.call(Control::StartConfidential).await
    }

    /// Where the device's confidentiality stands.
    pub fn confidential_info(&self) -> AgentConfidential {
        self.shared
            .lock()
            .map(|s| s.confidential)
            .unwrap_or_default()
    }

    /// Leaves the fleet (stays registered).
    pub async fn resign(&self) -> Result<(), AgentError> {
        self.call(Control::Resign).await
    }

    /// Asks the server to revoke this identity; the agent then stops and erases its key.
    pub async fn deregister(&self) -> Result<(), AgentError> {
        self.call(Control::Deregister).await
    }

    /// Stops the agent and returns how its loop ended.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        match self.task.take() {
            Some(t) => {
                t.abort();
                match t.await {
                    Ok(r) => r,
                    Err(_) => Ok(()),
                }
            }
            None => Ok(()),
        }
    }

    /// Waits for the agent's loop to end by itself (deregistration, revocation, a failure)
    /// and returns how it ended; the agent can still be [`Agent::stop`]ped after (a no-op).
    pub async fn finished(&mut self) -> Result<(), AgentError> {
        match self.task.as_mut() {
            Some(t) => {
                let r = t.await;
                self.task = None;
                r.map_err(|_| AgentError::Stopped)?
            }
            None => Err(AgentError::Stopped),
        }
    }

    /// Waits for the agent's loop to end by itself (deregistration, broker gone for good).
    pub async fn join(mut self) -> Result<(), AgentError> {
        match self.task.take() {
            Some(t) => t.await.map_err(|_| AgentError::Stopped)?,
            None => Ok(()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

struct Runner<H> {
    id: DeviceId,
    phase: Phase,
    /// The link's refusal count when it was last seen connected.
    refusals_seen: u64,
    link: MqttLink,
    options: AgentOptions,
    handlers: H,
    status: watch::Sender<AgentStatus>,
    notices: broadcast::Sender<AgentNotice>,
    shared: Arc<StdMutex<Shared>>,
    downloads: mpsc::Sender<Downloaded>,
    /// Verified updates kept for their activation (token, digest, bytes); at most 8.
    verified: VecDeque<(Token, [u8; 32], Arc<Vec<u8>>)>,
    /// The (server, device) pair of the confidential channel.
    pairing: Pairing,
    /// The confidential session, once one was started or restored.
    conf: Option<Confidential>,
}

impl<H: Handlers> Runner<H> {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut control: mpsc::Receiver<Control>,
        mut downloads: mpsc::Receiver<Downloaded>,
    ) -> Result<(), AgentError> {
        // What was restored is visible at once (status, counters, confidential session).
        self.sync();
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let r = tokio::select! {
                m = inbound.recv() => match m {
                    Some(m) => self.on_inbound(m).await,
                    None => return Err(AgentError::Stopped),
                },
                _ = ticker.tick() => match self.revoked() {
                    Some(e) => Err(e),
                    None => self.confidential_tick().await,
                },
                c = control.recv() => match c {
                    Some(c) => self.on_control(c).await,
                    None => return Ok(()),
                },
                Some(d) = downloads.recv() => self.on_downloaded(d).await,
            };
            self.sync();
            if let Err(e) = r {
                // A failed persist: nothing was acted on. Stop rather than run on a state
                // that may not be durable.
                tracing::error!(device = %self.id, error = %e, "agent stopped");
                return Err(e);
            }
            if matches!(self.phase, Phase::Gone) {
                // Let the publisher flush the acknowledgement.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(());
            }
        }
    }

    /// Whether the broker has refused the device's credentials often enough in a row to take
    /// it as revoked.
    fn revoked(&mut self) -> Option<AgentError> {
        let refusals = self.link.refusals();
        if self.link.is_connected() {
            self.refusals_seen = refusals;
            return None;
        }
        let in_a_row = refusals.saturating_sub(self.refusals_seen);
        (in_a_row >= self.options.refusals_before_revoked.max(1)).then(|| {
            tracing::error!(device = %self.id, refusals = in_a_row, "the broker refuses this device: revoked");
            AgentError::Revoked(format!("{in_a_row} reconnections refused"))
        })
    }

    fn sync(&self) {
        let _ = self.status.send(self.phase.status());
        if let Ok(mut s) = self.shared.lock() {
            s.counters = self.phase.counters();
            s.confidential = match &self.conf {
                None => AgentConfidential::default(),
                Some(c) => AgentConfidential {
                    established: c.is_established(),
                    session: c.session(),
                    sessions: c.sessions(),
                    records_sealed: c.records_sealed().unwrap_or(0),
                    records_opened: c.records_opened().unwrap_or(0),
                },
            };
        }
    }

    /// Stores the confidential state durably, then yields the value.
    async fn conf_persist<T>(&mut self, sf: StoreFirst<T>) -> Result<T, AgentError> {
        self.options.store.save_confidential(sf.state()).await?;
        Ok(sf
            .persist(|_| Ok::<(), Infallible>(()))
            .unwrap_or_else(|e| match e {}))
    }

    fn conf_or_new(&mut self) -> &mut Confidential {
        let pairing = self.pairing.clone();
        self.conf.get_or_insert_with(|| {
            Confidential::new(
                Side::Device,
                pairing,
                ConfidentialConfig::default(),
                &mut rand_core::OsRng,
            )
        })
    }

    /// Sends handshake frames to the server as Generic messages (snapshot stored first).
    async fn send_frames(&mut self, frames: Vec<Vec<u8>>) -> Result<(), AgentError> {
        for f in frames {
            let Phase::Joined(d) = &mut self.phase else {
                return Err(AgentError::WrongState("not joined"));
            };
            let mp = d.send_generic(f, now())?;
            self.send(mp).await?;
        }
        Ok(())
    }

    fn conf_events(&mut self, events: Vec<ConfEvent>) {
        for ev in events {
            match ev {
                ConfEvent::Established { session, rekey, .. } => {
                    tracing::info!(device = %self.id, ?session, rekey, "confidential session established");
                    self.notice(AgentNotice::ConfidentialEstablished { session, rekey });
                }
                ConfEvent::Failed { error, .. } => {
                    tracing::warn!(device = %self.id, %error, "confidential handshake failed");
                    self.notice(AgentNotice::ConfidentialFailed(error.to_string()));
                }
            }
        }
    }

    fn conf_refused(&self, reason: String) {
        tracing::warn!(device = %self.id, %reason, "refused by the confidential layer");
        self.notice(AgentNotice::ConfidentialRefused(reason));
    }

    async fn start_confidential(&mut self) -> Result<(), AgentError> {
        if !matches!(self.phase, Phase::Joined(_)) {
            return Err(AgentError::WrongState("not joined"));
        }
        let sf = self.conf_or_new().start(now_ms(), &mut rand_core::OsRng)?;
        let h = self.conf_persist(sf).await?;
        self.send_frames(h.frames).await?;
        self.conf_events(h.events);
        Ok(())
    }

    async fn send_confidential(&mut self, data: Data) -> Result<(), AgentError> {
        if !matches!(self.phase, Phase::Joined(_)) {
            return Err(AgentError::WrongState("not joined"));
        }
        let conf = self.conf.as_mut().ok_or(ConfError::NoSession)?;
        let sf = conf.seal_data(&data, now_ms())?;
        let sealed = self.conf_persist(sf).await?;
        let Phase::Joined(d) = &mut self.phase else {
            return Err(AgentError::WrongState("not joined"));
        };
        let mp = d.send_data(sealed, now())?;
        self.send(mp).await
    }

    /// A handshake frame from the server (in a Generic command): answer it, then
    /// acknowledge the command.
    async fn on_frame(&mut self, frame: &[u8], token: Token) -> Result<(), AgentError> {
        let r = self
            .conf_or_new()
            .handle_frame(frame, now_ms(), &mut rand_core::OsRng);
        match r {
            Ok(sf) => {
                let h = self.conf_persist(sf).await?;
                self.send_frames(h.frames).await?;
                self.conf_events(h.events);
                self.respond(token, Status::DataSuccess).await
            }
            Err(e) => {
                self.conf_refused(format!("handshake frame: {e}"));
                self.respond(token, Status::DataTypeUnknown).await
            }
        }
    }

    /// Data from the server: sealed data is opened first; plain data is refused when the
    /// device requires confidentiality.
    async fn on_server_data(&mut self, data: Data, token: Token) -> Result<(), AgentError> {
        if data.id == confidential::SEALED_DATA_ID {
            let opened = match self.conf.as_mut() {
                None => Err(ConfError::NoSession),
                Some(c) => c.open_data(&data, now_ms()),
            };
            return match opened {
                Ok(sf) => {
                    let inner = self.conf_persist(sf).await?;
                    let s = self.handlers.on_data(&inner, true);
                    self.respond(token, s).await
                }
                Err(e) => {
                    self.conf_refused(format!("sealed data: {e}"));
                    self.respond(token, Status::DataTypeUnknown).await
                }
            };
        }
        if self.options.require_confidential {
            self.conf_refused("plain data while confidentiality is required".into());
            return self.respond(token, Status::DataTypeUnknown).await;
        }
        let s = self.handlers.on_data(&data, false);
        self.respond(token, s).await
    }

    async fn confidential_tick(&mut self) -> Result<(), AgentError> {
        let due = self
            .conf
            .as_ref()
            .and_then(|c| c.poll_timeout())
            .is_some_and(|t| t <= now_ms());
        if !due {
            return Ok(());
        }
        let Some(conf) = self.conf.as_mut() else {
            return Ok(());
        };
        let sf = conf.handle_timeout(now_ms(), &mut rand_core::OsRng);
        let h = self.conf_persist(sf).await?;
        if matches!(self.phase, Phase::Joined(_)) {
            self.send_frames(h.frames).await?;
        }
        self.conf_events(h.events);
        Ok(())
    }

    /// Reports `n`, after publishing the status and counters, so that whoever a notice wakes
    /// reads counters that include what the notice reports. (While the phase is taken out
    /// for a step, the run loop publishes once the step is over.)
    fn notice(&self, n: AgentNotice) {
        if !matches!(self.phase, Phase::Gone) {
            self.sync();
        }
        let _ = self.notices.send(n);
    }

    /// Persists the snapshot, then yields the value.
    async fn persist<T>(&mut self, mp: MustPersist<T, DeviceSnapshot>) -> Result<T, AgentError> {
        self.options.store.save(self.id, mp.record()).await?;
        Ok(mp
            .persist(|_| Ok::<(), Infallible>(()))
            .unwrap_or_else(|e| match e {}))
    }

    fn publish(&self, o: Outgoing) {
        self.link.publish(o.topic, o.bytes);
    }

    async fn send(&mut self, mp: MustPersist<Outgoing, DeviceSnapshot>) -> Result<(), AgentError> {
        let o = self.persist(mp).await?;
        self.publish(o);
        Ok(())
    }

    async fn request_join(&mut self, kind: JoinRequestKind) -> Result<(), AgentError> {
        let Phase::Registered(d) = &mut self.phase else {
            return Err(AgentError::WrongState("not registered"));
        };
        let mp = d.request_join(kind, now())?;
        self.send(mp).await
    }

    async fn on_control(&mut self, c: Control) -> Result<(), AgentError> {
        match c {
            Control::Join(kind, tx) => {
                let r = self.request_join(kind).await;
                let _ = tx.send(r);
            }
            Control::SendData(data, tx) => {
                let r = match &mut self.phase {
                    Phase::Joined(d) => match d.send_data(data, now()) {
                        Ok(mp) => self.send(mp).await,
                        Err(e) => Err(e.into()),
                    },
                    _ => Err(AgentError::WrongState("not joined")),
                };
                let _ = tx.send(r);
            }
            Control::SendConfidential(data, tx) => {
                let r = self.send_confidential(data).await;
                let _ = tx.send(r);
            }
            Control::StartConfidential(tx) => {
                let r = self.start_confidential().await;
                let _ = tx.send(r);
            }
            Control::Resign(tx) => {
                let r = match std::mem::replace(&mut self.phase, Phase::Gone) {
                    Phase::Joined(d) => match d.resign(now()) {
                        Ok((reg, mp)) => {
                            self.phase = Phase::Registered(reg);
                            self.send(mp).await
                        }
                        Err((d, e)) => {
                            self.phase = Phase::Joined(d);
                            Err(e.into())
                        }
                    },
                    other => {
                        self.phase = other;
                        Err(AgentError::WrongState("not joined"))
                    }
                };
                let _ = tx.send(r);
            }
            Control::Deregister(tx) => {
                let r = match std::mem::replace(&mut self.phase, Phase::Gone) {
                    Phase::Registered(d) => self.deregister_request(d.deregister_request(now())),
                    Phase::Joined(d) => self.deregister_request(d.deregister_request(now())),
                    Phase::Gone => Err(AgentError::Deregistered),
                };
                let r = match r {
                    Ok(mp) => {
                        let r = self.persist(mp).await.map(|(_, o)| self.publish(o));
                        if r.is_ok() {
                            self.options.store.erase_identity();
                            self.notice(AgentNotice::Deregistered);
                        }
                        r
                    }
                    Err(e) => Err(e),
                };
                let _ = tx.send(r);
            }
        }
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn deregister_request<S>(
        &mut self,
        r: Result<
            MustPersist<(crate::engine::Deregistered, Outgoing), DeviceSnapshot>,
            (Device<S>, EngineError),
        >,
    ) -> Result<MustPersist<(crate::engine::Deregistered, Outgoing), DeviceSnapshot>, AgentError>
    where
        Phase: From<Device<S>>,
    {
        match r {
            Ok(mp) => Ok(mp),
            Err((d, e)) => {
                self.phase = Phase::from(d);
                Err(e.into())
            }
        }
    }

    async fn on_inbound(&mut self, m: Inbound) -> Result<(), AgentError> {
        let t = now();
        match std::mem::replace(&mut self.phase, Phase::Gone) {
            Phase::Registered(mut d) => match d.handle(&m.topic, &m.payload, t) {
                Err(dropped) => {
                    self.phase = Phase::Registered(d);
                    self.notice(AgentNotice::Dropped(dropped));
                    Ok(())
                }
                Ok(mp) => {
                    // Until persisted, the old phase stays (a failed persist stops the agent).
                    self.options
                        .store
                        .save(self.id, mp.record())
                        .await
                        .inspect_err(|_| {
                            tracing::error!("snapshot not persisted; message not acted on");
                        })?;
                    let h = mp
                        .persist(|_| Ok::<(), Infallible>(()))
                        .unwrap_or_else(|e| match e {});
                    if let Some(r) = h.reply {
                        self.publish(r);
                    }
                    self.phase = Phase::Registered(d);
                    self.on_registered_event(h.event);
                    Ok(())
                }
            },
            Phase::Joined(mut d) => match d.handle(&m.topic, &m.payload, t) {
                Err(dropped) => {
                    self.phase = Phase::Joined(d);
                    self.notice(AgentNotice::Dropped(dropped));
                    Ok(())
                }
                Ok(mp) => {
                    self.options.store.save(self.id, mp.record()).await?;
                    let h = mp
                        .persist(|_| Ok::<(), Infallible>(()))
                        .unwrap_or_else(|e| match e {});
                    if let Some(r) = h.reply {
                        self.publish(r);
                    }
                    self.phase = Phase::Joined(d);
                    self.on_joined_event(h.event).await
                }
            },
            Phase::Gone => Ok(()),
        }
    }

    fn on_registered_event(&mut self, ev: RegisteredEvent) {
        match ev {
            RegisteredEvent::Joined(grant) => {
                if let Phase::Registered(d) = std::mem::replace(&mut self.phase, Phase::Gone) {
                    self.phase = Phase::Joined(d.join(grant));
                }
                tracing::info!(device = %self.id, "joined the fleet");
                self.handlers.on_joined();
                self.notice(AgentNotice::Joined);
            }
            RegisteredEvent::JoinRefused { status } => {
                tracing::info!(device = %self.id, ?status, "join refused");
                self.handlers.on_join_refused(status);
                self.notice(AgentNotice::JoinRefused(status));
            }
            RegisteredEvent::ShowWords { words } => {
                self.handlers.on_show_words(&words);
                self.notice(AgentNotice::Words(words));
            }
            RegisteredEvent::PresentCode { code } => self.handlers.on_present_code(&code),
            RegisteredEvent::Identified { .. } => {}
            RegisteredEvent::Deregistered(grant) => {
                if let Phase::Registered(d) = std::mem::replace(&mut self.phase, Phase::Gone) {
                    let _ = d.erase(grant);
                }
                self.gone();
            }
        }
    }

    fn gone(&mut self) {
        tracing::warn!(device = %self.id, "identity revoked by the server; erasing the key");
        self.options.store.erase_identity();
        self.handlers.on_deregistered();
        self.notice(AgentNotice::Deregistered);
    }

    async fn respond(&mut self, token: Token, status: Status) -> Result<(), AgentError> {
        let Phase::Joined(d) = &mut self.phase else {
            return Ok(());
        };
        match d.respond(&token, status, now()) {
            Ok(mp) => {
                self.send(mp).await?;
                self.notice(AgentNotice::Responded { token, status });
            }
            Err(e) => tracing::warn!(device = %self.id, error = %e, "response not sent"),
        }
        Ok(())
    }

    async fn on_joined_event(&mut self, ev: JoinedEvent) -> Result<(), AgentError> {
        match ev {
            JoinedEvent::Action {
                action,
                args,
                token,
            } => {
                let s = self.handlers.on_action(action, &args);
                self.respond(token, s).await
            }
            JoinedEvent::Data { data, token } => self.on_server_data(data, token).await,
            JoinedEvent::Generic { data, token } if confidential::is_frame(&data) => {
                self.on_frame(&data, token).await
            }
            JoinedEvent::Generic { data, token } => match self.handlers.on_generic(&data) {
                Some(s) => self.respond(token, s).await,
                None => Ok(()),
            },
            JoinedEvent::Update { url, digest, token } => {
                let tx = self.downloads.clone();
                let (max, timeout) = (self.options.max_update, self.options.download_timeout);
                tokio::spawn(async move {
                    let result = download(&url, max, timeout).await;
                    let _ = tx
                        .send(Downloaded {
                            token,
                            digest,
                            result,
                        })
                        .await;
                });
                Ok(())
            }
            JoinedEvent::Activate { digest, token } => {
                let update = match self.verified.iter().position(|(t, _, _)| *t == token) {
                    Some(i) => self.verified.remove(i).map(|(_, _, b)| b),
                    None => self.load_update(&digest).map(Arc::new),
                };
                let s = match update {
                    Some(bytes) => self.handlers.on_activate(&digest, &bytes),
                    None => Status::ActivateFail,
                };
                self.respond(token, s).await
            }
            JoinedEvent::ActivateRefused { token } => {
                self.notice(AgentNotice::Responded {
                    token,
                    status: Status::ActivateFail,
                });
                Ok(())
            }
            JoinedEvent::ObservationRequest { joining, token } => {
                let seen = self.handlers.on_observation(joining);
                if let Phase::Joined(d) = &mut self.phase {
                    match d.observe(&token, seen.as_ref(), now()) {
                        Ok(mp) => self.send(mp).await?,
                        Err(e) => tracing::warn!(error = %e, "observation not answered"),
                    }
                }
                Ok(())
            }
            JoinedEvent::Identified { .. } => Ok(()),
            JoinedEvent::Terminated(grant) => {
                if let Phase::Joined(d) = std::mem::replace(&mut self.phase, Phase::Gone) {
                    self.phase = Phase::Registered(d.leave(grant));
                }
                self.handlers.on_terminated();
                self.notice(AgentNotice::Terminated);
                Ok(())
            }
            JoinedEvent::Deregistered(grant) => {
                if let Phase::Joined(d) = std::mem::replace(&mut self.phase, Phase::Gone) {
                    let _ = d.erase(grant);
                }
                self.gone();
                Ok(())
            }
        }
    }

    fn update_path(&self, digest: &[u8; 32]) -> Option<PathBuf> {
        match &self.options.store {
            StateStore::Dir(d) => Some(d.join(UPDATES_DIR).join(to_hex(digest))),
            StateStore::Memory => None,
        }
    }

    fn load_update(&self, digest: &[u8; 32]) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.update_path(digest)?).ok()?;
        // A file on disk is checked again before it is installed.
        crate::engine::check_digest(&bytes, digest).then_some(bytes)
    }

    async fn on_downloaded(&mut self, d: Downloaded) -> Result<(), AgentError> {
        let Phase::Joined(dev) = &mut self.phase else {
            return Ok(());
        };
        let Downloaded {
            token,
            digest,
            result,
        } = d;
        let bytes = match result {
            Ok(b) => b,
            Err(status) => {
                tracing::warn!(device = %self.id, ?status, "update download failed");
                return self.respond(token, status).await;
            }
        };
        let mp = match dev.update_downloaded(&token, &bytes, now()) {
            Ok(mp) => mp,
            Err(e) => {
                tracing::warn!(error = %e, "update report refused by the engine");
                return Ok(());
            }
        };
        let ok = crate::engine::check_digest(&bytes, &digest);
        if ok {
            // Kept before the success is reported, so an activation always finds it.
            if let Some(p) = self.update_path(&digest) {
                if let Some(dir) = p.parent() {
                    let _ = ensure_dir(dir);
                    if let Err(e) = acl::replace_file(dir, &to_hex(&digest), &bytes) {
                        tracing::warn!(error = %e, "verified update not stored on disk");
                    }
                }
            }
            self.handlers.on_update_verified(&digest, &bytes);
            if self.verified.len() >= 8 {
                self.verified.pop_front();
            }
            self.verified
                .push_back((token.clone(), digest, Arc::new(bytes)));
        }
        self.send(mp).await?;
        let status = if ok {
            Status::UpdateSuccess
        } else {
            Status::UpdateFailDigest
        };
        tracing::info!(device = %self.id, ?status, "update downloaded");
        self.notice(AgentNotice::Responded { token, status });
        Ok(())
    }
}

impl From<Device<Registered>> for Phase {
    fn from(d: Device<Registered>) -> Phase {
        Phase::Registered(d)
    }
}

impl From<Device<Joined>> for Phase {
    fn from(d: Device<Joined>) -> Phase {
        Phase::Joined(d)
    }
}

/// Downloads `url` (plain `http://host[:port]/path`), at most `max` bytes within `timeout`.
/// Failures map to the update statuses: unreachable → `UpdateFailServer`, an HTTP error
/// status → `UpdateFailHttp`, too large or cut short → `UpdateFailFile`.
pub async fn download(url: &str, max: usize, timeout: Duration) -> Result<Vec<u8>, Status> {
    let uri: Uri = url.parse().map_err(|_| Status::UpdateFailServer)?;
    if uri.scheme_str() != Some("http") {
        return Err(Status::UpdateFailServer);
    }
    let authority = uri.authority().ok_or(Status::UpdateFailServer)?.clone();
    let host_port = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let fetch = async {
        let stream = TcpStream::connect(&host_port)
            .await
            .map_err(|_| Status::UpdateFailServer)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Status::UpdateFailServer)?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|_| Status::UpdateFailServer)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|_| Status::UpdateFailServer)?;
        if resp.status() != StatusCode::OK {
            conn.abort();
            return Err(Status::UpdateFailHttp);
        }
        let body = Limited::new(resp.into_body(), max)
            .collect()
            .await
            .map_err(|_| Status::UpdateFailFile)?
            .to_bytes();
        conn.abort();
        Ok(body.to_vec())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| Status::UpdateFailServer)?
}

/// Handlers that remember nothing and accept every action and data (simulated fleets and
/// demos): actions answer `ActionSuccess`, data `DataSuccess`.
#[derive(Debug, Default, Clone, Copy)]
pub struct AcceptAll;

impl Handlers for AcceptAll {
    fn on_action(&mut self, _action: u16, _args: &[u8]) -> Status {
        Status::ActionSuccess
    }
    fn on_data(&mut self, _data: &Data, _confidential: bool) -> Status {
        Status::DataSuccess
    }
}

/// Connects at start. The stored credentials refused (CONNACK codes 4 and 5) `needed` times in
/// a row (retried after `backoff`, doubling up to 5 s): the account is gone, the device
/// revoked. Any other failure, other refusals included (server unavailable…), is an MQTT
/// error, not a revocation.
async fn connect_at_start<T, F, Fut>(
    id: DeviceId,
    needed: u64,
    backoff: Duration,
    mut connect: F,
) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MqttError>>,
{
    let needed = needed.max(1);
    let mut backoff = backoff;
    let mut in_a_row = 0u64;
    loop {
        match connect().await {
            Ok(x) => return Ok(x),
            Err(e) if e.refuses_credentials() => {
                in_a_row += 1;
                if in_a_row >= needed {
                    tracing::error!(device = %id, refusals = in_a_row, error = %e, "the broker refuses this device: revoked");
                    return Err(AgentError::Revoked(format!(
                        "{e}; {in_a_row} connections refused"
                    )));
                }
                tracing::warn!(device = %id, error = %e, retry_in = ?backoff, "the broker refused the connection; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_bound_to_their_device() {
        let (me, other) = (DeviceId([1; 8]), DeviceId([2; 8]));
        let snap = b"KC2D snapshot".to_vec();
        assert_eq!(
            unbind_state(me, &bind_state(me, &snap)).unwrap(),
            Stored::Snapshot(snap.clone())
        );
        assert_eq!(
            unbind_state(me, &bind_state(me, &[])).unwrap(),
            Stored::Enrolled
        );
        match unbind_state(me, &bind_state(other, &snap)) {
            Err(AgentError::ForeignState { found }) => assert_eq!(found, other.to_hex()),
            r => panic!("{r:?}"),
        }
        // The engine's bare snapshot (no binding), and cut or unknown headers.
        assert!(matches!(
            unbind_state(me, &snap),
            Err(AgentError::ForeignState { .. })
        ));
        let full = bind_state(me, &snap);
        for cut in 0..13 {
            assert!(unbind_state(me, &full[..cut]).is_err(), "{cut}");
        }
        let mut v2 = full.clone();
        v2[4] = 2;
        assert!(matches!(
            unbind_state(me, &v2),
            Err(AgentError::Corrupt("state file version"))
        ));
    }

    /// Feeds [`connect_at_start`] a script of connection results (`Ok(())`, or a refusal
    /// code, or a timeout); returns the outcome and the attempts made.
    async fn start_with(needed: u64, script: &[Option<u8>]) -> (Result<(), AgentError>, usize) {
        let mut attempts = 0usize;
        let r = connect_at_start(DeviceId([1; 8]), needed, Duration::ZERO, || {
            let step = script.get(attempts).copied();
            attempts += 1;
            async move {
                match step {
                    Some(None) => Ok(()),
                    Some(Some(code)) => Err(MqttError::Refused {
                        code,
                        reason: format!("code {code}"),
                    }),
                    None => Err(MqttError::Timeout),
                }
            }
        })
        .await;
        (r, attempts)
    }

    #[tokio::test]
    async fn only_credential_refusals_in_a_row_mean_revoked_at_start() {
        // A broker still loading the new account's password: refused twice, then in.
        let (r, n) = start_with(3, &[Some(5), Some(4), None]).await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(n, 3);
        // Refused for the credentials three times in a row: revoked, no fourth attempt.
        let (r, n) = start_with(3, &[Some(5), Some(4), Some(5), None]).await;
        assert!(matches!(r, Err(AgentError::Revoked(_))), "{r:?}");
        assert_eq!(n, 3);
        // Server unavailable (and the other non-credential codes) are not a revocation.
        for code in [1, 2, 3] {
            let (r, n) = start_with(3, &[Some(code)]).await;
            assert!(
                matches!(r, Err(AgentError::Mqtt(MqttError::Refused { code: c, .. })) if c == code),
                "{code}: {r:?}"
            );
            assert_eq!(n, 1);
        }
        // Not even after credential refusals.
        let (r, _) = start_with(3, &[Some(5), Some(5), Some(3)]).await;
        assert!(matches!(r, Err(AgentError::Mqtt(_))), "{r:?}");
        // At least one refusal is needed, whatever the option says.
        let (r, n) = start_with(0, &[Some(4), None]).await;
        assert!(matches!(r, Err(AgentError::Revoked(_))), "{r:?}");
        assert_eq!(n, 1);
    }
}
