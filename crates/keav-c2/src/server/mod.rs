//! The C2 server: a tokio driver around the sans-IO [`ServerEngine`], with the fleet
//! registry, the broker (Mosquitto, configured by keav), and the identity service plus the
//! operator API on one HTTP port.
//!
//! [`Server::start`] (shaped like mini-redis: [`run`] runs until `shutdown` resolves):
//!
//! 1. loads or makes the server's signing key (`server.key` in the data directory, 0600;
//!    Ed25519 unless told otherwise) and the engine's last exported state (`server.state`:
//!    pending joins, tracked tokens);
//! 2. fills the engine's device view from the registry and loads every device's replay
//!    counters from it (the registry's counters are written before every action, so they are
//!    never older than the exported state);
//! 3. writes the Mosquitto configuration (password and ACL files for every device that is not
//!    revoked, plus the server's own account with a fresh password) and either starts
//!    `mosquitto -c` itself on a loopback port ([`BrokerSetup::Spawn`]) or reloads a running
//!    broker ([`BrokerSetup::Managed`]);
//! 4. connects to the broker as the server account, subscribes to
//!    [`crate::topics::Topics::server_filter`], and feeds every message to the engine; an
//!    accepted message's peer states are stored with [`Registry::store_counters`] **before**
//!    anything is published, recorded or changed (responses by token go to the registry);
//! 5. optionally serves HTTP ([`ServerOptions::http`]): the identity service's routes
//!    (registration, enrollment tokens, device list, revocation) and the operator's C2 routes
//!    (`/v1/c2/...`, see [`http`]), all operator routes behind the same bearer token, and the
//!    operator's web console ([`console`], `/console/`), which calls those routes.
//!
//! Registration and revocation through the identity service reach the engine at once: the
//! service's broker accounts ([`FleetAccounts`]) add a registered device to the engine's view
//! before its credentials are returned, and take a revoked one out of the fleet before its
//! broker account is withdrawn.

pub mod api;
pub mod client;
mod conf;
pub mod console;
pub mod events;
pub mod http;
pub mod ratelimit;

pub use conf::{unix_now_ms, ConfCounters, ConfNotice, ConfidentialInfo};
pub use ratelimit::RateLimit;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Mutex};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::acl::{self, AclError, BrokerUser, MosquittoConfig, Role};
use crate::confidential::ConfError;
use crate::engine::{
    CommandKind, Counters, DeviceView, Dropped, EngineError, JoinMethod, MustPersist, Outcome,
    Outgoing, PeerUpdates, ServerConfig, ServerEngine, ServerEvent, Targets,
};
use crate::guard::PeerState;
use crate::identity::{
    self, BrokerAccounts, BrokerPassword, IdentityConfig, IdentityError, IdentityState,
    MosquittoAccounts,
};
use crate::keys::{Alg, DeviceId, KeyError, PublicKey, SigningKey};
use crate::mqtt::{self, Inbound, LinkOptions, MqttError, MqttLink};
use crate::registry::{
    BlobKind, DeviceRecord, DeviceStatus, Enrollment, Registry, RegistryError, ResponseRecord,
    TokenHash,
};
use crate::topics::Topics;
use crate::wire::{Body, Data, Token};

/// The server's broker account name.
pub const SERVER_USER: &str = "keav-c2-server";
/// The server's key file in the data directory.
pub const KEY_FILE: &str = "server.key";
/// The engine's exported state in the data directory.
pub const STATE_FILE: &str = "server.state";

/// Why the server failed or refused a call.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The engine refused the call (unknown device, not joined, bad token…).
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The registry failed.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// Broker configuration failed.
    #[error("broker configuration: {0}")]
    Acl(#[from] AclError),
    /// The identity service failed.
    #[error("identity service: {0}")]
    Identity(#[from] IdentityError),
    /// The MQTT connection failed.
    #[error("broker: {0}")]
    Mqtt(#[from] MqttError),
    /// A key could not be made or read.
    #[error("key: {0}")]
    Key(#[from] KeyError),
    /// A file or socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The broker could not be started.
    #[error("mosquitto: {0}")]
    Broker(String),
    /// A stored file is malformed.
    #[error("corrupt {0}")]
    Corrupt(&'static str),
    /// A request is malformed (bad id, token, digest, group…).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// No such device.
    #[error("no device {0}")]
    UnknownDevice(DeviceId),
    /// The confidential layer refused the call (no session, payload too long…).
    #[error("confidential: {0}")]
    Confidential(ConfError),
    /// Plain data to a device that must be confidential.
    #[error("device {0} must be sent data confidentially")]
    ConfidentialRequired(DeviceId),
    /// Words were given for a join that is not human-moderated.
    #[error("device {0} has no pending human-moderated join: words are not expected")]
    WordsNotExpected(DeviceId),
    /// A human-moderated join was accepted without the words read on the device.
    #[error("device {0}'s join is human-moderated: give the words it shows")]
    WordsRequired(DeviceId),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How the server reaches its broker.
#[derive(Debug, Clone)]
pub enum BrokerSetup {
    /// keav writes the Mosquitto configuration in `dir` and runs `mosquitto -c` itself on
    /// 127.0.0.1:`port` (0: a free port; never 1883 unless asked), stopped with the server.
    Spawn {
        /// Configuration directory.
        dir: PathBuf,
        /// Port (0: pick a free one).
        port: u16,
        /// The `mosquitto` program.
        program: PathBuf,
    },
    /// A broker already runs with keav's configuration in `dir` (pid `pid`, port `port`):
    /// keav rewrites the files and makes it reload them (SIGHUP).
    Managed {
        /// Configuration directory.
        dir: PathBuf,
        /// Its port.
        port: u16,
        /// Its pid.
        pid: u32,
    },
}

/// How the server runs.
pub struct ServerOptions {
    /// Where the key and the engine state live.
    pub data_dir: PathBuf,
    /// The algorithm of a new server key (an existing key keeps its own).
    pub alg: Alg,
    /// The broker.
    pub broker: BrokerSetup,
    /// Where to serve the identity service and the operator API (None: no HTTP).
    pub http: Option<SocketAddr>,
    /// The operator's bearer token (HTTP).
    pub operator_token: Zeroizing<String>,
    /// The engine's settings (join policy, lifetimes…).
    pub engine: ServerConfig,
    /// Lifetime of commands sent through the API, seconds (default 300).
    pub command_lifetime: u64,
    /// More broker accounts to create (e.g. a monitor), besides the server's and the devices'.
    pub extra_broker_users: Vec<BrokerUser>,
    /// How often the engine ticks (expiries) and its state is saved (default 1 s).
    pub tick: Duration,
    /// Each device's inbound rate limit, checked before any signature work (default: 200
    /// at once, then 50 a second).
    pub inbound_rate: RateLimit,
    /// Most HTTP requests without the operator token in flight at once (identity service
    /// and operator routes together); more are answered 503 at once (default 64).
    pub http_max_in_flight: usize,
    /// Most HTTP requests with the operator token in flight at once, apart from the others
    /// (default 16).
    pub http_max_operator_in_flight: usize,
    /// Longest an HTTP request without the operator token may take to send its whole body
    /// (default 5 s): then it is answered 408 and its place freed.
    pub http_body_timeout: Duration,
    /// Longest an HTTP request may take, reading its body included (default 60 s): then it
    /// is answered 408 and its place among those in flight freed.
    pub http_request_timeout: Duration,
    /// Most HTTP connections open at once (default 1024); one more is closed at once.
    pub http_max_connections: usize,
    /// Longest an HTTP connection may take to send a request's head, and may stay idle
    /// between requests (default 10 s); then it is closed.
    pub http_header_timeout: Duration,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("data_dir", &self.data_dir)
            .field("alg", &self.alg)
            .field("broker", &self.broker)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl ServerOptions {
    /// Options with the defaults: Ed25519, a spawned broker under `data_dir/mosquitto`, no
    /// HTTP, moderated simple joins, commands living 5 minutes.
    pub fn new(data_dir: impl Into<PathBuf>, operator_token: Zeroizing<String>) -> Self {
        let data_dir = data_dir.into();
        ServerOptions {
            broker: BrokerSetup::Spawn {
                dir: data_dir.join("mosquitto"),
                port: 0,
                program: PathBuf::from("mosquitto"),
            },
            data_dir,
            alg: Alg::Ed25519,
            http: None,
            operator_token,
            engine: ServerConfig::default(),
            command_lifetime: 300,
            extra_broker_users: Vec::new(),
            tick: Duration::from_secs(1),
            inbound_rate: RateLimit::default(),
            http_max_in_flight: 64,
            http_max_operator_in_flight: 16,
            http_body_timeout: Duration::from_secs(5),
            http_request_timeout: Duration::from_secs(60),
            http_max_connections: 1024,
            http_header_timeout: Duration::from_secs(10),
        }
    }
}

/// Something that happened in the server (for consoles, logs and tests).
#[derive(Debug, Clone)]
pub enum ServerNotice {
    /// An inbound message was dropped, with no effect.
    Dropped(Dropped),
    /// An engine event, after it was persisted and applied to the registry.
    Event(ServerEvent),
    /// Data a device sent sealed in its confidential session, opened (it came as a C2 Data
    /// with the id `keav.sealed`; this is the Data inside).
    ConfidentialData {
        /// Who sent it.
        device: DeviceId,
        /// The C2 message's token.
        token: Token,
        /// The opened data.
        data: Data,
    },
    /// The confidential layer did something for a device.
    Confidential {
        /// The device.
        device: DeviceId,
        /// What.
        notice: ConfNotice,
    },
    /// A device sent faster than its rate limit ([`ServerOptions::inbound_rate`]): its
    /// messages are dropped before any parsing. Announced for the first refusal of a run,
    /// then every 1000th.
    RateLimited {
        /// The device.
        device: DeviceId,
        /// Messages refused in this run so far.
        refused: u64,
    },
    /// A message was published to a device.
    Published {
        /// The device.
        device: DeviceId,
        /// Its token.
        token: Token,
        /// The signed message.
        bytes: Bytes,
    },
}

/// The result of a command sent to one or more devices.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// Each device's token.
    pub sent: Vec<(DeviceId, Token)>,
    /// Devices left out, and why.
    pub skipped: Vec<(DeviceId, String)>,
}

/// A join awaiting a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingJoinInfo {
    /// The device.
    pub device: DeviceId,
    /// How it joins.
    pub method: JoinMethod,
    /// The words the device shows (human-moderated joins).
    pub words: Option<Vec<&'static str>>,
}

/// A registry shared between the server and the identity service.
pub struct SharedRegistry<R>(pub Arc<R>);

impl<R> Clone for SharedRegistry<R> {
    fn clone(&self) -> Self {
        SharedRegistry(self.0.clone())
    }
}

impl<R: Registry> Registry for SharedRegistry<R> {
    async fn insert_device(&self, record: DeviceRecord) -> Result<(), RegistryError> {
        self.0.insert_device(record).await
    }
    async fn enroll_device(
        &self,
        record: DeviceRecord,
        token: TokenHash,
        now: u64,
    ) -> Result<(), RegistryError> {
        self.0.enroll_device(record, token, now).await
    }
    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        self.0.device(id).await
    }
    async fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.0.devices().await
    }
    async fn set_status(
        &self,
        id: DeviceId,
        status: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        self.0.set_status(id, status).await
    }
    async fn set_status_if(
        &self,
        id: DeviceId,
        expected: DeviceStatus,
        new: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        self.0.set_status_if(id, expected, new).await
    }
    async fn set_groups(&self, id: DeviceId, groups: Vec<String>) -> Result<(), RegistryError> {
        self.0.set_groups(id, groups).await
    }
    async fn delete_device(&self, id: DeviceId) -> Result<bool, RegistryError> {
        self.0.delete_device(id).await
    }
    async fn load_counters(&self, peer: DeviceId) -> Result<Option<Vec<u8>>, RegistryError> {
        self.0.load_counters(peer).await
    }
    async fn store_counters(&self, peer: DeviceId, state: Vec<u8>) -> Result<(), RegistryError> {
        self.0.store_counters(peer, state).await
    }
    async fn load_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        self.0.load_blob(kind, peer).await
    }
    async fn store_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
        blob: Vec<u8>,
    ) -> Result<(), RegistryError> {
        self.0.store_blob(kind, peer, blob).await
    }
    async fn record_response(
        &self,
        token: Vec<u8>,
        device: DeviceId,
        status: u8,
    ) -> Result<(), RegistryError> {
        self.0.record_response(token, device, status).await
    }
    async fn responses(&self, token: Vec<u8>) -> Result<Vec<ResponseRecord>, RegistryError> {
        self.0.responses(token).await
    }
    async fn add_enrollment(
        &self,
        token: TokenHash,
        enrollment: Enrollment,
        now: u64,
    ) -> Result<(), RegistryError> {
        self.0.add_enrollment(token, enrollment, now).await
    }
    async fn enrollment(&self, token: TokenHash, now: u64) -> Result<Enrollment, RegistryError> {
        self.0.enrollment(token, now).await
    }
    async fn devices_in_group(&self, group: String) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.0.devices_in_group(group).await
    }
}

/// A Mosquitto process started by the server, killed by its pid when dropped.
struct BrokerProcess {
    child: Child,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn free_port() -> Result<u16, ServerError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    Ok(l.local_addr().map_err(io("bind a free port"))?.port())
}

fn spawn_mosquitto(program: &Path, conf: &Path, port: u16) -> Result<BrokerProcess, ServerError> {
    let log_path = conf.with_file_name("mosquitto.log");
    let log = std::fs::File::create(&log_path).map_err(io("create the broker log"))?;
    let child = Command::new(program)
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| ServerError::Broker(format!("cannot run {}: {e}", program.display())))?;
    let mut p = BrokerProcess { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(ServerError::Broker(format!("exited ({status}): {log}")));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(p);
        }
        if Instant::now() > deadline {
            return Err(ServerError::Broker(format!("never listened on {port}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn load_or_make_key(dir: &Path, alg: Alg) -> Result<SigningKey, ServerError> {
    let p = dir.join(KEY_FILE);
    match std::fs::read(&p) {
        Ok(b) => {
            let b = Zeroizing::new(b);
            let (id, raw) = b.split_first().ok_or(ServerError::Corrupt("server key"))?;
            let file_alg = Alg::from_id(*id)?;
            if file_alg != alg {
                tracing::warn!(
                    "server key in {} is {file_alg}; keeping it (asked for {alg})",
                    p.display()
                );
            }
            Ok(SigningKey::from_bytes(file_alg, raw)?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = SigningKey::generate(alg)?;
            let raw = k.to_bytes()?;
            let mut buf = Zeroizing::new(vec![alg.id()]);
            buf.extend_from_slice(&raw);
            acl::replace_file(dir, KEY_FILE, &buf)?;
            Ok(k)
        }
        Err(e) => Err(io(format!("read {}", p.display()))(e)),
    }
}

fn view_of(r: &DeviceRecord) -> Option<DeviceView> {
    match DeviceView::from_record(r) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(device = %r.id, error = %e, "registry key unreadable; device left out");
            None
        }
    }
}

/// The server's shared state.
struct Inner<R> {
    registry: SharedRegistry<R>,
    engine: Mutex<ServerEngine>,
    link: MqttLink,
    accounts: Arc<MosquittoAccounts>,
    notices: broadcast::Sender<ServerNotice>,
    data_dir: PathBuf,
    command_lifetime: u64,
    dirty: AtomicBool,
    id: DeviceId,
    public_key: PublicKey,
    broker_addr: String,
    /// Confidential sessions and policies per device (lock after the engine).
    conf: Mutex<HashMap<DeviceId, conf::ConfSlot>>,
    conf_counters: StdMutex<ConfCounters>,
    /// The fleet's topics (the sender of an inbound message, for the rate limit).
    topics: Topics,
    /// Per-device inbound token buckets.
    limiter: StdMutex<ratelimit::Limiter>,
    /// Inbound messages dropped by the rate limit.
    rate_limited: AtomicU64,
    /// The limiter's clock.
    started: Instant,
    /// Recent notices, for the operator.
    events: StdMutex<events::EventLog>,
}

/// The identity service's broker accounts: Mosquitto's files, plus the engine's view, so
/// a device registered through HTTP can talk to the server at once and a revoked one is out
/// of the fleet before its account goes.
pub struct FleetAccounts<R> {
    inner: Arc<Inner<R>>,
}

impl<R: Registry> BrokerAccounts for FleetAccounts<R> {
    async fn add(&self, user: BrokerUser) -> Result<(), IdentityError> {
        let device = (user.role == Role::Device)
            .then(|| DeviceId::from_hex(&user.username))
            .flatten();
        self.inner.accounts.add(user).await?;
        if let Some(id) = device {
            self.inner.refresh(id).await?;
        }
        Ok(())
    }

    async fn remove(&self, username: String) -> Result<(), IdentityError> {
        if let Some(id) = DeviceId::from_hex(&username) {
            // The registry already says revoked (the service writes it first): the engine
            // is told directly, without reading the registry back, so a failing registry
            // read cannot leave the engine accepting the device.
            self.inner.revoke_in_engine(id).await;
        }
        self.inner.accounts.remove(username).await
    }
}

impl<R: Registry> Inner<R> {
    fn notice(&self, n: ServerNotice) {
        // Described before the lock: most notices on the hot path (publishes) are not logged.
        if let Some(d) = events::describe(&n) {
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(d, unix_now_ms() / 1000);
        }
        let _ = self.notices.send(n);
    }

    /// Re-reads a device from the registry into the engine's view. The engine lock is held
    /// across the read and the write, so no status change of the engine interleaves.
    async fn refresh(&self, id: DeviceId) -> Result<(), RegistryError> {
        let mut eng = self.engine.lock().await;
        self.refresh_locked(&mut eng, id).await
    }

    /// [`Inner::refresh`] with the engine lock already held by the caller.
    async fn refresh_locked(
        &self,
        eng: &mut ServerEngine,
        id: DeviceId,
    ) -> Result<(), RegistryError> {
        let rec = self.registry.device(id).await?;
        match rec.as_ref().and_then(view_of) {
            Some(v) => eng.upsert_device(v),
            None => {
                eng.remove_device(id);
            }
        }
        Ok(())
    }

    /// Refuses an operator call on a device the registry says is revoked (its revocation
    /// may come from the identity service, which writes the registry first): the engine's
    /// view is brought back to the registry's. Call with the engine lock held.
    async fn refuse_revoked(
        &self,
        eng: &mut ServerEngine,
        device: DeviceId,
    ) -> Result<(), ServerError> {
        match self.registry.device(device).await? {
            Some(r) if r.status == DeviceStatus::Revoked => {
                if let Some(v) = view_of(&r) {
                    eng.upsert_device(v);
                }
                Err(ServerError::Engine(EngineError::Revoked(device)))
            }
            _ => Ok(()),
        }
    }

    /// Writes a status the engine decided into the registry, with the engine lock held by
    /// the caller (so a revocation cannot interleave between the engine's change and this
    /// write). A revoked device's status is never overwritten with another: the write is
    /// refused, the engine's view is set back to the registry's, and `false` is returned.
    async fn write_status(
        &self,
        eng: &mut ServerEngine,
        device: DeviceId,
        status: DeviceStatus,
    ) -> Result<bool, ServerError> {
        let rec = match self.registry.device(device).await? {
            Some(r) => r,
            None => {
                eng.remove_device(device);
                return Ok(false);
            }
        };
        if rec.status == DeviceStatus::Revoked && status != DeviceStatus::Revoked {
            tracing::warn!(%device, ?status, "device is revoked; status change refused");
            if let Some(v) = view_of(&rec) {
                eng.upsert_device(v);
            }
            return Ok(false);
        }
        if rec.status == status {
            return Ok(true);
        }
        // Compare-and-set: the identity service writes the registry without the engine
        // lock, so the status read above may be stale by now.
        match self
            .registry
            .set_status_if(device, rec.status, status)
            .await
        {
            Ok(_) => Ok(true),
            Err(RegistryError::Revoked(_) | RegistryError::StatusConflict { .. }) => {
                tracing::warn!(%device, ?status, "device status changed meanwhile; status change refused");
                self.refresh_locked(eng, device).await?;
                Ok(false)
            }
            Err(e) => {
                let _ = self.refresh_locked(eng, device).await;
                Err(e.into())
            }
        }
    }

    /// Writes the status changes among `events` into the registry (engine lock held by the
    /// caller, see [`Inner::write_status`]); returns the events to announce: a refused
    /// change, and the join it came with, are left out.
    async fn apply_status(
        &self,
        eng: &mut ServerEngine,
        events: Vec<ServerEvent>,
    ) -> Vec<ServerEvent> {
        let mut refused: Vec<DeviceId> = Vec::new();
        for ev in &events {
            if let ServerEvent::StatusChanged { device, status } = ev {
                match self.write_status(eng, *device, *status).await {
                    Ok(true) => {}
                    Ok(false) => refused.push(*device),
                    Err(e) => {
                        tracing::error!(%device, error = %e, "registry status not updated");
                        refused.push(*device);
                    }
                }
            }
        }
        if refused.is_empty() {
            return events;
        }
        events
            .into_iter()
            .filter(|ev| match ev {
                ServerEvent::StatusChanged { device, .. } | ServerEvent::Joined { device, .. } => {
                    !refused.contains(device)
                }
                _ => true,
            })
            .collect()
    }

    /// Stores every touched peer's counters, then yields the value (the engine lock is held
    /// by the caller, so stores of one peer never reorder).
    async fn persist<T>(&self, mp: MustPersist<T, PeerUpdates>) -> Result<T, ServerError> {
        for (id, bytes) in mp.record().encoded() {
            self.registry.store_counters(id, bytes).await?;
        }
        self.dirty.store(true, Ordering::Relaxed);
        Ok(mp
            .persist(|_| Ok::<(), Infallible>(()))
            .unwrap_or_else(|e| match e {}))
    }

    fn publish(&self, o: Outgoing) {
        let bytes = Bytes::from(o.bytes);
        self.notice(ServerNotice::Published {
            device: o.recipient,
            token: o.token,
            bytes: bytes.clone(),
        });
        self.link.publish(o.topic, bytes);
    }

    /// Applies engine events to the registry and the broker, then announces them. Status
    /// changes must have gone through [`Inner::apply_status`] first, under the engine lock.
    async fn apply(&self, events: Vec<ServerEvent>) {
        for ev in events {
            match &ev {
                ServerEvent::Response {
                    device,
                    token,
                    status,
                    ..
                } => {
                    if let Err(e) = self
                        .registry
                        .record_response(token.as_bytes().to_vec(), *device, status.code())
                        .await
                    {
                        tracing::error!(%device, error = %e, "response not recorded");
                    }
                }
                ServerEvent::DeregisterRequested { device } => {
                    tracing::info!(%device, "device asked to be deregistered; revoking");
                    if let Err(e) = self.accounts.remove(device.to_hex()).await {
                        tracing::error!(%device, error = %e, "broker account not removed");
                    }
                }
                _ => {}
            }
            self.notice(ServerNotice::Event(ev));
        }
    }

    /// The cheap check before any parsing or signature work: the sender's token bucket.
    /// `false`: over the limit, drop (counted, logged at the first of a run).
    fn within_rate(&self, topic: &str) -> bool {
        let Some(device) = self.topics.sender_of(topic) else {
            // Not a device topic: the engine drops it without signature work.
            return true;
        };
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let verdict = match self.limiter.lock() {
            Ok(mut l) => l.check(device, now_ms),
            Err(_) => return true,
        };
        match verdict {
            ratelimit::Verdict::Pass => true,
            ratelimit::Verdict::Limited { log, refused } => {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                if log {
                    tracing::warn!(%device, refused, "device over its inbound rate limit; messages dropped");
                    self.notice(ServerNotice::RateLimited { device, refused });
                }
                false
            }
        }
    }

    async fn on_inbound(&self, m: Inbound) {
        if !self.within_rate(&m.topic) {
            return;
        }
        let mut eng = self.engine.lock().await;
        let mp = match eng.handle(&m.topic, &m.payload, unix_now()) {
            Ok(mp) => mp,
            Err(d) => {
                drop(eng);
                self.notice(ServerNotice::Dropped(d));
                return;
            }
        };
        let h = match self.persist(mp).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "counters not stored; message not acted on");
                return;
            }
        };
        for o in h.outgoing {
            self.publish(o);
        }
        let events = self.confidential_inbound(&mut eng, h.events).await;
        let events = self.apply_status(&mut eng, events).await;
        drop(eng);
        self.apply(events).await;
    }

    async fn tick(&self) {
        self.confidential_tick().await;
        let mut eng = self.engine.lock().await;
        let events = eng.tick(unix_now());
        if !events.is_empty() {
            self.dirty.store(true, Ordering::Relaxed);
            let events = self.apply_status(&mut eng, events).await;
            drop(eng);
            self.apply(events).await;
        } else {
            drop(eng);
        }
        if self.dirty.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.save_state().await {
                self.dirty.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "engine state not saved");
            }
        }
    }

    /// Marks `device` revoked in the engine (its pending join and observations dropped, its
    /// messages refused from now on), without a registry read that could fail, and has the
    /// engine state saved.
    async fn revoke_in_engine(&self, device: DeviceId) {
        let mut eng = self.engine.lock().await;
        self.revoke_in_engine_locked(&mut eng, device);
    }

    fn revoke_in_engine_locked(&self, eng: &mut ServerEngine, device: DeviceId) {
        match eng.set_status(device, DeviceStatus::Revoked) {
            Ok(()) => self.dirty.store(true, Ordering::Relaxed),
            // Not in the engine's view: nothing there to accept its messages.
            Err(EngineError::UnknownDevice(_)) => {}
            Err(e) => tracing::warn!(%device, error = %e, "revocation in the engine"),
        }
    }

    async fn revoke(&self, device: DeviceId) -> Result<(), ServerError> {
        {
            let mut eng = self.engine.lock().await;
            self.registry
                .set_status(device, DeviceStatus::Revoked)
                .await?;
            self.revoke_in_engine_locked(&mut eng, device);
        }
        self.accounts.remove(device.to_hex()).await?;
        tracing::info!(%device, "device revoked");
        self.notice(ServerNotice::Event(ServerEvent::StatusChanged {
            device,
            status: DeviceStatus::Revoked,
        }));
        Ok(())
    }

    async fn save_state(&self) -> Result<(), ServerError> {
        let bytes = self.engine.lock().await.export_state();
        let dir = self.data_dir.clone();
        tokio::task::spawn_blocking(move || acl::replace_file(&dir, STATE_FILE, &bytes))
            .await
            .map_err(|_| ServerError::Broker("state writer failed".into()))??;
        Ok(())
    }

    fn expiry(&self, lifetime: Option<u64>) -> (u64, u64) {
        let now = unix_now();
        (
            now,
            now.saturating_add(lifetime.unwrap_or(self.command_lifetime)),
        )
    }
}

/// A running C2 server (cheap to clone). The API methods are the operator's; the HTTP routes
/// ([`http`]) call them.
pub struct Server<R> {
    inner: Arc<Inner<R>>,
    http_addr: Option<SocketAddr>,
    running: Arc<StdMutex<Option<Running>>>,
}

impl<R> Clone for Server<R> {
    fn clone(&self) -> Self {
        Server {
            inner: self.inner.clone(),
            http_addr: self.http_addr,
            running: self.running.clone(),
        }
    }
}

struct Running {
    tasks: Vec<JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    broker: Option<BrokerProcess>,
}

impl<R> std::fmt::Debug for Server<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.inner.id)
            .field("broker", &self.inner.broker_addr)
            .field("http", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Runs a server until `shutdown` resolves (see [`Server::start`]).
pub async fn run<R: Registry>(
    options: ServerOptions,
    registry: R,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = Server::start(options, registry).await?;
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

impl<R: Registry> Server<R> {
    /// Starts the server (see the module docs) and returns once it is connected to the
    /// broker and, if asked, serving HTTP.
    pub async fn start(options: ServerOptions, registry: R) -> Result<Server<R>, ServerError> {
        let registry = SharedRegistry(Arc::new(registry));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&options.data_dir)
                .map_err(io("create the data directory"))?;
        }
        let key = load_or_make_key(&options.data_dir, options.alg)?;
        let public_key = key.public();
        let state_path = options.data_dir.join(STATE_FILE);
        let mut engine = match std::fs::read(&state_path) {
            Ok(bytes) => ServerEngine::from_state(key, options.engine, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ServerEngine::new(key, options.engine)
            }
            Err(e) => return Err(io("read the engine state")(e)),
        };
        let id = engine.id();
        let topics = engine.topics();
        let devices = registry.devices().await?;
        for d in &devices {
            if let Some(v) = view_of(d) {
                engine.upsert_device(v);
            }
            if let Some(c) = registry.load_counters(d.id).await? {
                match PeerState::decode(&c) {
                    Ok(s) => engine.load_peer(d.id, s),
                    Err(e) => {
                        tracing::error!(device = %d.id, error = %e, "stored counters unreadable");
                        return Err(ServerError::Corrupt("stored counters"));
                    }
                }
            }
        }
        let ids: Vec<DeviceId> = devices.iter().map(|d| d.id).collect();
        let conf_slots = Inner::load_confidential(&registry, &engine, &public_key, &ids).await?;
        tracing::info!(server = %id, devices = devices.len(), confidential = conf_slots.len(), "fleet loaded");

        // The broker: the server's account gets a fresh password on every start.
        let password = acl::new_password();
        let server_user = BrokerUser {
            username: SERVER_USER.to_string(),
            password_hash: acl::hash_password(&password)?,
            role: Role::Server,
        };
        let mut fixed = vec![server_user];
        fixed.extend(options.extra_broker_users.iter().cloned());
        let (dir, port, pid, process) = match &options.broker {
            BrokerSetup::Spawn { dir, port, program } => {
                let port = if *port == 0 { free_port()? } else { *port };
                let mut cfg = MosquittoConfig::new(dir.clone(), port, topics);
                if running_as_root() {
                    cfg.run_as = Some("root".into());
                }
                // Files first (pid unknown), then the broker, then the accounts with its pid.
                MosquittoAccounts::load(&registry, cfg.clone(), None, fixed.clone()).await?;
                let conf = acl::conf_path(&std::fs::canonicalize(dir).map_err(io("broker dir"))?);
                let (program, conf2) = (program.clone(), conf.clone());
                let p =
                    tokio::task::spawn_blocking(move || spawn_mosquitto(&program, &conf2, port))
                        .await
                        .map_err(|_| ServerError::Broker("start failed".into()))??;
                let pid = p.child.id();
                (dir.clone(), port, pid, Some(p))
            }
            BrokerSetup::Managed { dir, port, pid } => (dir.clone(), *port, *pid, None),
        };
        let mut cfg = MosquittoConfig::new(dir, port, topics);
        if running_as_root() {
            cfg.run_as = Some("root".into());
        }
        let accounts = Arc::new(MosquittoAccounts::load(&registry, cfg, Some(pid), fixed).await?);
        let broker_addr = format!("127.0.0.1:{port}");
        // The reload is applied on the broker's next loop pass: retry the first login.
        let mut attempt = 0;
        let (link, inbound) = loop {
            let lo = LinkOptions::new(
                broker_addr.clone(),
                SERVER_USER,
                BrokerPassword::new(password.clone()),
                topics.server_filter(),
            );
            match mqtt::connect(lo).await {
                Ok(x) => break x,
                Err(MqttError::Refused { .. }) if attempt < 20 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        drop(password);
        let (notices, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            registry: registry.clone(),
            engine: Mutex::new(engine),
            link,
            accounts,
            notices,
            data_dir: options.data_dir.clone(),
            command_lifetime: options.command_lifetime,
            dirty: AtomicBool::new(true),
            id,
            public_key: public_key.clone(),
            broker_addr: broker_addr.clone(),
            conf: Mutex::new(conf_slots),
            conf_counters: StdMutex::new(ConfCounters::default()),
            topics,
            limiter: StdMutex::new(ratelimit::Limiter::new(options.inbound_rate)),
            rate_limited: AtomicU64::new(0),
            started: Instant::now(),
            events: StdMutex::new(events::EventLog::new(unix_now_ms())),
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(main_loop(
            inner.clone(),
            inbound,
            options.tick,
            stop_rx.clone(),
        )));
        let mut http_addr = None;
        if let Some(addr) = options.http {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(io(format!("bind {addr}")))?;
            http_addr = Some(listener.local_addr().map_err(io("HTTP address"))?);
            let mut idc = IdentityConfig::new(
                options.operator_token.clone(),
                broker_addr.clone(),
                public_key,
            );
            idc.body_timeout = options.http_body_timeout;
            let limits = http::InFlightLimits {
                max: options.http_max_in_flight,
                max_operator: options.http_max_operator_in_flight,
                timeout: options.http_request_timeout,
                body_timeout: options.http_body_timeout,
            };
            let id_state = IdentityState::new(
                registry.clone(),
                FleetAccounts {
                    inner: inner.clone(),
                },
                idc,
            );
            let server = Server {
                inner: inner.clone(),
                http_addr,
                running: Arc::new(StdMutex::new(None)),
            };
            let app = http::limit_in_flight(
                http::uncancellable_revocations(
                    identity::server::router(id_state)
                        .merge(http::router(server, &options.operator_token))
                        .merge(console::router()),
                ),
                &options.operator_token,
                limits,
            );
            let mut stop = stop_rx.clone();
            let conn_limits = identity::server::ConnLimits {
                max_connections: options.http_max_connections,
                header_timeout: options.http_header_timeout,
            };
            tasks.push(tokio::spawn(identity::server::serve_router(
                listener,
                app,
                conn_limits,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )));
        }
        tracing::info!(server = %id, broker = %broker_addr, http = ?http_addr, "C2 server running");
        Ok(Server {
            inner,
            http_addr,
            running: Arc::new(StdMutex::new(Some(Running {
                tasks,
                stop: stop_tx,
                broker: process,
            }))),
        })
    }

    /// Stops the HTTP server and the MQTT loop, saves the engine state, stops a broker it
    /// started.
    pub async fn shutdown(&self) {
        let running = self.running.lock().ok().and_then(|mut r| r.take());
        let Some(mut running) = running else { return };
        let _ = running.stop.send(true);
        for t in running.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Err(e) = self.inner.save_state().await {
            tracing::error!(error = %e, "engine state not saved at shutdown");
        }
        drop(running.broker.take());
    }

    /// The server's id.
    pub fn id(&self) -> DeviceId {
        self.inner.id
    }

    /// The server's public key (devices verify commands with it).
    pub fn public_key(&self) -> &PublicKey {
        &self.inner.public_key
    }

    /// The broker's `host:port`.
    pub fn broker_addr(&self) -> &str {
        &self.inner.broker_addr
    }

    /// Where HTTP is served, if it is.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The server's notices from now on.
    pub fn notices(&self) -> broadcast::Receiver<ServerNotice> {
        self.inner.notices.subscribe()
    }

    /// At most `max` of the recent events numbered above `after` ([`events`]).
    pub fn events(&self, after: u64, max: usize) -> events::EventsBody {
        self.inner
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .after(after, max)
    }

    /// The engine's drop and acceptance counters.
    pub async fn counters(&self) -> Counters {
        self.inner.engine.lock().await.counters().clone()
    }

    /// Inbound payloads dropped for their size before parsing.
    pub fn oversized(&self) -> u64 {
        self.inner.link.oversized()
    }

    /// Inbound messages dropped by the per-device rate limit, before parsing.
    pub fn rate_limited(&self) -> u64 {
        self.inner.rate_limited.load(Ordering::Relaxed)
    }

    /// The registry.
    pub fn registry(&self) -> &R {
        &self.inner.registry.0
    }

    /// Sends an action, data, generic message or ID request to one device; returns its token.
    pub async fn command(&self, device: DeviceId, body: Body) -> Result<Token, ServerError> {
        if matches!(body, Body::Data(_)) && self.inner.required(device).await {
            return Err(ServerError::ConfidentialRequired(device));
        }
        let (now, expiry) = self.inner.expiry(None);
        let mut eng = self.inner.engine.lock().await;
        let mp = eng.command(device, body, expiry, now)?;
        let o = self.inner.persist(mp).await?;
        let token = o.token.clone();
        self.inner.publish(o);
        Ok(token)
    }

    /// Sends `body` to every target (one token each).
    pub async fn command_group(
        &self,
        targets: &Targets,
        body: Body,
        lifetime: Option<u64>,
    ) -> Result<Sent, ServerError> {
        // Plain data never goes to a device that must be confidential.
        let mut refused = Vec::new();
        let narrowed;
        let mut targets = targets;
        if matches!(body, Body::Data(_)) {
            let required: Vec<DeviceId> = self
                .inner
                .conf
                .lock()
                .await
                .iter()
                .filter(|(_, s)| s.required)
                .map(|(d, _)| *d)
                .collect();
            if !required.is_empty() {
                let (no, yes): (Vec<DeviceId>, Vec<DeviceId>) = self
                    .targets(targets)
                    .await?
                    .into_iter()
                    .partition(|d| required.contains(d));
                refused = no;
                narrowed = Targets::Devices(yes);
                targets = &narrowed;
            }
        }
        let (now, expiry) = self.inner.expiry(lifetime);
        let mut eng = self.inner.engine.lock().await;
        let mp = eng.command_group(targets, body, expiry, now)?;
        let report = self.inner.persist(mp).await?;
        let mut sent = Sent::default();
        for o in report.sent {
            sent.sent.push((o.recipient, o.token.clone()));
            self.inner.publish(o);
        }
        sent.skipped = report
            .skipped
            .into_iter()
            .map(|(d, e)| (d, e.to_string()))
            .collect();
        sent.skipped.extend(
            refused
                .into_iter()
                .map(|d| (d, ServerError::ConfidentialRequired(d).to_string())),
        );
        Ok(sent)
    }

    async fn targets(&self, targets: &Targets) -> Result<Vec<DeviceId>, ServerError> {
        Ok(match targets {
            Targets::Devices(v) => v.clone(),
            Targets::Group(g) => self
                .inner
                .registry
                .devices_in_group(g.clone())
                .await?
                .into_iter()
                .map(|d| d.id)
                .collect(),
        })
    }

    /// Starts an update on every target: each downloads `url` and checks `digest`.
    pub async fn initiate_update(
        &self,
        targets: &Targets,
        url: &str,
        digest: [u8; 32],
    ) -> Result<Sent, ServerError> {
        let ids = self.targets(targets).await?;
        let (now, expiry) = self.inner.expiry(None);
        let mut eng = self.inner.engine.lock().await;
        let mut sent = Sent::default();
        for id in ids {
            match eng.initiate_update(id, url, digest, expiry, now) {
                Ok(mp) => {
                    let o = self.inner.persist(mp).await?;
                    sent.sent.push((id, o.token.clone()));
                    self.inner.publish(o);
                }
                Err(e) => sent.skipped.push((id, e.to_string())),
            }
        }
        Ok(sent)
    }

    /// Activates the update `token` that `device` reported downloaded and verified.
    pub async fn activate(&self, device: DeviceId, token: &Token) -> Result<(), ServerError> {
        let (now, expiry) = self.inner.expiry(None);
        let mut eng = self.inner.engine.lock().await;
        let mp = eng.activate(device, token, expiry, now)?;
        let o = self.inner.persist(mp).await?;
        self.inner.publish(o);
        Ok(())
    }

    /// Where the command `token` stands in this server run (`None`: not tracked).
    pub async fn outcome(&self, token: &Token) -> Option<Outcome> {
        self.inner.engine.lock().await.outcome(token)
    }

    /// What the command `token` was, and to whom.
    pub async fn tracked(&self, token: &Token) -> Option<(DeviceId, CommandKind)> {
        self.inner.engine.lock().await.tracked(token)
    }

    /// The responses recorded under `token` (durable, from the registry).
    pub async fn responses(&self, token: &Token) -> Result<Vec<ResponseRecord>, ServerError> {
        Ok(self
            .inner
            .registry
            .responses(token.as_bytes().to_vec())
            .await?)
    }

    /// The joins awaiting a decision.
    pub async fn pending_joins(&self) -> Vec<PendingJoinInfo> {
        let eng = self.inner.engine.lock().await;
        eng.pending_joins()
            .into_iter()
            .map(|(device, method)| PendingJoinInfo {
                device,
                method,
                words: eng.join_words(device),
            })
            .collect()
    }

    /// The operator's decision on a pending join; `words` are those read on the device
    /// (human-moderated joins). Returns whether the device joined.
    pub async fn decide(
        &self,
        device: DeviceId,
        accept: bool,
        words: &[String],
    ) -> Result<bool, ServerError> {
        let now = unix_now();
        let mut eng = self.inner.engine.lock().await;
        let method = eng
            .pending_joins()
            .into_iter()
            .find(|(d, _)| *d == device)
            .map(|(_, m)| m)
            .ok_or(EngineError::NoPendingJoin(device))?;
        if !words.is_empty() && method != JoinMethod::Human {
            return Err(ServerError::WordsNotExpected(device));
        }
        // Accepting a human-moderated join without the words would only refuse it (and end
        // the attempt): refuse the call instead, the join stays pending.
        if accept && words.is_empty() && method == JoinMethod::Human {
            return Err(ServerError::WordsRequired(device));
        }
        self.inner.refuse_revoked(&mut eng, device).await?;
        let mp = match method {
            JoinMethod::Human => eng.operator_decide(device, accept, words, now)?,
            _ => eng.decide_join(device, accept, now)?,
        };
        let d = self.inner.persist(mp).await?;
        let events = self.inner.apply_status(&mut eng, d.events).await;
        drop(eng);
        self.inner.publish(d.outgoing);
        self.inner.apply(events).await;
        Ok(d.joined)
    }

    /// Sends a join command to a registered device.
    pub async fn join_command(&self, device: DeviceId) -> Result<Token, ServerError> {
        let (now, expiry) = self.inner.expiry(None);
        let mut eng = self.inner.engine.lock().await;
        self.inner.refuse_revoked(&mut eng, device).await?;
        let mp = eng.join_command(device, expiry, now)?;
        let o = self.inner.persist(mp).await?;
        let t = o.token.clone();
        self.inner.publish(o);
        Ok(t)
    }

    /// Ends a device's membership (it stays registered).
    pub async fn terminate(&self, device: DeviceId) -> Result<Token, ServerError> {
        let (now, expiry) = self.inner.expiry(None);
        let mut eng = self.inner.engine.lock().await;
        self.inner.refuse_revoked(&mut eng, device).await?;
        let mp = eng.terminate(device, expiry, now)?;
        let o = self.inner.persist(mp).await?;
        // Under the engine lock: a revocation cannot slip between the engine's change and
        // the registry's, and a revoked device is never set back to registered.
        if !self
            .inner
            .write_status(&mut eng, device, DeviceStatus::Registered)
            .await?
        {
            return Err(ServerError::Engine(EngineError::Revoked(device)));
        }
        drop(eng);
        let t = o.token.clone();
        self.inner.publish(o);
        self.announce_status(device, DeviceStatus::Registered);
        Ok(t)
    }

    /// Tells a device its identity is withdrawn, then revokes it (registry, engine, and
    /// after a short delay for the message to be delivered, its broker account).
    pub async fn deregister(&self, device: DeviceId) -> Result<Token, ServerError> {
        let (now, expiry) = self.inner.expiry(None);
        let mut eng = self.inner.engine.lock().await;
        self.inner.refuse_revoked(&mut eng, device).await?;
        let mp = eng.deregister(device, expiry, now)?;
        let o = self.inner.persist(mp).await?;
        self.inner
            .write_status(&mut eng, device, DeviceStatus::Revoked)
            .await?;
        drop(eng);
        let t = o.token.clone();
        self.inner.publish(o);
        self.announce_status(device, DeviceStatus::Revoked);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = inner.accounts.remove(device.to_hex()).await {
                tracing::error!(%device, error = %e, "broker account not removed");
            }
        });
        Ok(t)
    }

    fn announce_status(&self, device: DeviceId, status: DeviceStatus) {
        self.inner
            .notice(ServerNotice::Event(ServerEvent::StatusChanged {
                device,
                status,
            }));
    }

    /// Revokes a device at once: registry, engine (everything it sends is dropped), broker
    /// account (the broker disconnects it and refuses it from then on).
    ///
    /// The registry and the engine change under the engine lock, so no inbound message is
    /// acted on between them and no status the engine decided before can overwrite the
    /// revocation. The work runs in its own task: it completes even if the caller (an HTTP
    /// request whose client went away) is cancelled.
    pub async fn revoke(&self, device: DeviceId) -> Result<(), ServerError> {
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.revoke(device).await })
            .await
            .map_err(|_| ServerError::Broker("revocation task failed".into()))?
    }

    /// Resets the server's continuity with a device that lost its state (its agent started
    /// again with `--reset-state`, so its sequence numbers start again at 1): the replay
    /// counters the server keeps for it start afresh (registry first, then the engine), its
    /// pending join is forgotten, and a joined device is registered again (it must join
    /// again). Refused for a revoked device.
    pub async fn reset_continuity(&self, device: DeviceId) -> Result<(), ServerError> {
        let mut eng = self.inner.engine.lock().await;
        self.inner.refuse_revoked(&mut eng, device).await?;
        // The engine resets the replay window and the send counter and forgets the pending
        // join; the fresh counters are stored before anything else.
        let mp = eng.reset_continuity(device)?;
        self.inner.persist(mp).await?;
        let written = self
            .inner
            .write_status(&mut eng, device, DeviceStatus::Registered)
            .await;
        self.inner.refresh_locked(&mut eng, device).await?;
        self.inner.dirty.store(true, Ordering::Relaxed);
        drop(eng);
        if !written? {
            return Err(ServerError::Engine(EngineError::Revoked(device)));
        }
        tracing::warn!(%device, "replay continuity reset by the operator");
        self.announce_status(device, DeviceStatus::Registered);
        Ok(())
    }

    /// Adds a device to the fleet directly (without the identity service): registry, engine
    /// view, broker account. For provisioning tools and simulations.
    pub async fn add_device(&self, record: DeviceRecord) -> Result<(), ServerError> {
        let user = BrokerUser::device(record.id, record.password_hash.clone());
        let id = record.id;
        self.inner.registry.insert_device(record).await?;
        self.inner.refresh(id).await?;
        self.inner.accounts.add(user).await?;
        Ok(())
    }

    /// Sets a device's groups (registry and engine view).
    pub async fn set_groups(
        &self,
        device: DeviceId,
        groups: Vec<String>,
    ) -> Result<(), ServerError> {
        self.inner.registry.set_groups(device, groups).await?;
        self.inner.refresh(device).await?;
        Ok(())
    }

    /// The groups a device is in, as the engine sees them.
    pub async fn groups(&self, device: DeviceId) -> Option<BTreeSet<String>> {
        self.inner
            .engine
            .lock()
            .await
            .device(device)
            .map(|d| d.groups.clone())
    }
}

async fn main_loop<R: Registry>(
    inner: Arc<Inner<R>>,
    mut inbound: tokio::sync::mpsc::Receiver<Inbound>,
    tick: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = inbound.recv() => match m {
                Some(m) => inner.on_inbound(m).await,
                None => {
                    tracing::error!("MQTT link closed");
                    return;
                }
            },
            _ = ticker.tick() => inner.tick().await,
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests;
