//! The identity service over HTTP (axum), shaped like mini-redis: [`serve`] runs on the
//! listener it is given until `shutdown` resolves; at most
//! [`IdentityConfig::max_in_flight`] requests are handled at once (others get 503).
//!
//! Routes (operator routes need `Authorization: Bearer <operator token>`):
//!
//! | route | who | answer |
//! | --- | --- | --- |
//! | `POST /v1/challenge` | anyone | 200 [`ChallengeBody`] |
//! | `POST /v1/register` | device with an enrollment token | 201 [`RegisteredBody`] |
//! | `POST /v1/enrollments` | operator | 201 [`EnrollmentBody`] |
//! | `GET /v1/devices` | operator | 200 [`DevicesBody`] |
//! | `GET /v1/devices/{id}` | operator | 200 [`DeviceBody`] |
//! | `POST /v1/devices/{id}/revoke` | operator | 200 [`DeviceBody`] |
//!
//! Errors are `{"error": "...", "code": "..."}` ([`ErrorBody`]); nothing secret (tokens,
//! passwords, nonces) is ever logged.
//!
//! Challenges are stateless ([`super::nonce`]): `POST /v1/challenge` stores nothing. A nonce
//! is remembered only once a registration presenting it has passed the nonce check and the
//! enrollment-token check (so only holders of an operator-issued token can add entries), and
//! only until it expires; that set is bounded by [`IdentityConfig::max_nonces`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::api::{
    ChallengeBody, DeviceBody, DevicesBody, EnrollmentBody, EnrollmentRequestBody, ErrorBody,
    RegisterBody, RegisteredBody, TopicsBody,
};
use super::nonce::{NonceError, NonceKey};
use super::token::{token_secret, EnrollmentToken};
use super::{verify_registration, IdentityError, NONCE_LEN};
use crate::acl::{self, BrokerUser, MosquittoConfig};
use crate::keys::{Alg, DeviceId, KeyError, PublicKey, MAX_PUBLIC_KEY_LEN};
use crate::registry::{DeviceRecord, DeviceStatus, Enrollment, Registry, RegistryError, TokenHash};
use crate::topics::Topics;

/// Longest enrollment lifetime an operator can ask for (30 days).
pub const MAX_ENROLLMENT_TTL: u64 = 30 * 24 * 3600;
/// Longest enrollment token accepted (issued tokens are 87 characters, their secret 43).
const MAX_TOKEN_CHARS: usize = 128;

/// Seconds since the Unix epoch, from the system clock or from a test's hand.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }))
    }

    /// A clock reading `f` (tests drive time by hand with it).
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(f))
    }

    /// The time now.
    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// How the identity service runs.
pub struct IdentityConfig {
    /// The operator's API token (random; compared in constant time).
    pub operator_token: Zeroizing<String>,
    /// The broker's `host:port`, as devices should reach it.
    pub broker: String,
    /// The C2 server's public key (its id is [`DeviceId::of_key`] of it).
    pub server_key: PublicKey,
    /// Default enrollment token lifetime, seconds.
    pub enrollment_ttl: u64,
    /// Challenge nonce lifetime, seconds.
    pub nonce_ttl: u64,
    /// The key challenge nonces are authenticated with (random by default; share one between
    /// instances behind one address).
    pub nonce_key: NonceKey,
    /// Most used nonces remembered at once (each until it expires; registrations beyond get
    /// 503). Challenges themselves store nothing.
    pub max_nonces: usize,
    /// Most requests handled at once (further requests get 503). Requests carrying the
    /// operator token do not count here: they have their own places
    /// ([`IdentityConfig::max_operator_in_flight`]), so unauthenticated clients cannot keep
    /// the operator (a revocation) out.
    pub max_in_flight: usize,
    /// Most requests carrying the operator token handled at once (default 16).
    pub max_operator_in_flight: usize,
    /// Longest an unauthenticated request may take to send its whole body (default 5 s):
    /// then it is answered 408 and its place freed, so slow-body clients cannot hold it.
    pub body_timeout: std::time::Duration,
    /// Largest request body, bytes (larger ones get 413).
    pub body_limit: usize,
    /// The clock.
    pub clock: Clock,
}

impl IdentityConfig {
    /// A configuration with the defaults: enrollment tokens live a day, nonces two minutes
    /// under a fresh random key, 1024 used nonces remembered, 64 requests in flight, 16 KiB
    /// bodies, the system clock.
    pub fn new(operator_token: Zeroizing<String>, broker: String, server_key: PublicKey) -> Self {
        IdentityConfig {
            operator_token,
            broker,
            server_key,
            enrollment_ttl: 24 * 3600,
            nonce_ttl: 120,
            nonce_key: NonceKey::generate(),
            max_nonces: 1024,
            max_in_flight: 64,
            max_operator_in_flight: 16,
            body_timeout: std::time::Duration::from_secs(5),
            body_limit: 16 * 1024,
            clock: Clock::system(),
        }
    }
}

impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("broker", &self.broker)
            .field("server_key", &self.server_key)
            .finish_non_exhaustive()
    }
}

/// Where the service creates and withdraws broker accounts.
///
/// [`MosquittoAccounts`] is the real one; tests use a double that records the calls.
pub trait BrokerAccounts: Send + Sync + 'static {
    /// A fresh password and its hash in the broker's format. Runs on the blocking pool
    /// (hashing is deliberately slow). The default uses [`acl::new_password`] and
    /// [`acl::hash_password`].
    fn new_credentials(&self) -> Result<(Zeroizing<String>, String), IdentityError> {
        let password = acl::new_password();
        let hash = acl::hash_password(&password)?;
        Ok((password, hash))
    }

    /// Gives `user` access to the broker.
    fn add(&self, user: BrokerUser) -> impl Future<Output = Result<(), IdentityError>> + Send;

    /// Withdraws the account `username` (a no-op if there is none).
    fn remove(&self, username: String) -> impl Future<Output = Result<(), IdentityError>> + Send;
}

/// Broker accounts kept in a Mosquitto password and ACL file ([`MosquittoConfig`]); every
/// change rewrites the files and, when the broker's pid is known, makes it reload them.
pub struct MosquittoAccounts {
    config: MosquittoConfig,
    pid: Option<u32>,
    users: tokio::sync::Mutex<BTreeMap<String, BrokerUser>>,
}

impl std::fmt::Debug for MosquittoAccounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MosquittoAccounts")
            .field("dir", &self.config.dir)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl MosquittoAccounts {
    /// Accounts for every device of `registry` that is not revoked, plus `fixed` (the C2
    /// server's own account); writes the files once (and applies them if `pid` is given).
    pub async fn load<R: Registry>(
        registry: &R,
        config: MosquittoConfig,
        pid: Option<u32>,
        fixed: Vec<BrokerUser>,
    ) -> Result<MosquittoAccounts, IdentityError> {
        let mut users = BTreeMap::new();
        for d in registry.devices().await? {
            if d.status != DeviceStatus::Revoked {
                let u = BrokerUser::device(d.id, d.password_hash);
                users.insert(u.username.clone(), u);
            }
        }
        for u in fixed {
            users.insert(u.username.clone(), u);
        }
        let accounts = MosquittoAccounts {
            config,
            pid,
            users: tokio::sync::Mutex::new(users),
        };
        {
            let users = accounts.users.lock().await;
            accounts.write(&users).await?;
        }
        Ok(accounts)
    }

    /// Writes (and applies) the files; the caller holds the lock, so writes never reorder.
    async fn write(&self, users: &BTreeMap<String, BrokerUser>) -> Result<(), IdentityError> {
        let list: Vec<BrokerUser> = users.values().cloned().collect();
        let config = self.config.clone();
        let pid = self.pid;
        tokio::task::spawn_blocking(move || match pid {
            Some(pid) => config.apply(&list, pid).map(|_| ()),
            None => config.write(&list).map(|_| ()),
        })
        .await
        .map_err(|_| IdentityError::Task)??;
        Ok(())
    }
}

impl BrokerAccounts for MosquittoAccounts {
    async fn add(&self, user: BrokerUser) -> Result<(), IdentityError> {
        let mut users = self.users.lock().await;
        let previous = users.insert(user.username.clone(), user.clone());
        if let Err(e) = self.write(&users).await {
            match previous {
                Some(p) => users.insert(p.username.clone(), p),
                None => users.remove(&user.username),
            };
            return Err(e);
        }
        Ok(())
    }

    async fn remove(&self, username: String) -> Result<(), IdentityError> {
        let mut users = self.users.lock().await;
        users.remove(&username);
        // Even if the write fails the user stays out of the in-memory set: the next
        // successful write drops it (revocation fails closed).
        self.write(&users).await
    }
}

/// The service's shared state.
pub struct IdentityState<R, B> {
    registry: R,
    accounts: B,
    config: IdentityConfig,
    server_id: DeviceId,
    topics: Topics,
    operator_digest: [u8; 32],
    /// Nonces used by a registration, with their expiry (see the module docs).
    used_nonces: StdMutex<HashMap<[u8; NONCE_LEN], u64>>,
    in_flight: Arc<Semaphore>,
    operator_in_flight: Arc<Semaphore>,
}

impl<R, B> std::fmt::Debug for IdentityState<R, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityState")
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

impl<R: Registry, B: BrokerAccounts> IdentityState<R, B> {
    /// State over `registry` and `accounts`.
    pub fn new(registry: R, accounts: B, config: IdentityConfig) -> Arc<Self> {
        let server_id = DeviceId::of_key(&config.server_key);
        let operator_digest = Sha256::digest(config.operator_token.as_bytes()).into();
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let operator_in_flight = Arc::new(Semaphore::new(config.max_operator_in_flight.max(1)));
        Arc::new(IdentityState {
            registry,
            accounts,
            server_id,
            topics: Topics::new(server_id),
            operator_digest,
            used_nonces: StdMutex::new(HashMap::new()),
            in_flight,
            operator_in_flight,
            config,
        })
    }

    /// The registry.
    pub fn registry(&self) -> &R {
        &self.registry
    }

    /// The broker accounts.
    pub fn accounts(&self) -> &B {
        &self.accounts
    }

    /// The C2 server's id.
    pub fn server_id(&self) -> DeviceId {
        self.server_id
    }

    /// How many used nonces the service remembers (the only per-nonce state it keeps).
    pub fn used_nonces(&self) -> usize {
        match self.used_nonces.lock() {
            Ok(t) => t.len(),
            Err(poisoned) => poisoned.into_inner().len(),
        }
    }
}

/// Runs the service on `listener` until `shutdown` resolves, then stops accepting and lets
/// requests in progress finish (for up to [`DRAIN_TIME`]). Connections are bounded by
/// `ConnLimits::default()` ([`serve_router`]).
pub async fn serve<R, B>(
    listener: TcpListener,
    state: Arc<IdentityState<R, B>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), IdentityError>
where
    R: Registry,
    B: BrokerAccounts,
{
    serve_router(listener, router(state), ConnLimits::default(), shutdown).await;
    Ok(())
}

/// Connection-level limits of an HTTP listener ([`serve_router`]). Request-level limits
/// (in flight, body size and deadline) are layers of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections open at once (at least 1). A connection beyond it is closed as soon
    /// as it is accepted, before anything is read, and logged.
    pub max_connections: usize,
    /// Longest a connection may take to send a request's head (request line and headers):
    /// the first request's, and each next one's on a kept-alive connection (so an idle
    /// connection is closed after this too). Then the connection is closed.
    pub header_timeout: std::time::Duration,
}

impl Default for ConnLimits {
    /// 1024 connections, 10 s for a request head.
    fn default() -> ConnLimits {
        ConnLimits {
            max_connections: 1024,
            header_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// Longest [`serve_router`] waits, once told to stop, for requests in progress.
pub const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `app` over HTTP/1.1 on `listener` until `shutdown` resolves, with `limits` on
/// connections: clients that open connections and never send a request (or send its head
/// slowly) cannot hold them beyond `limits.header_timeout`, nor more than
/// `limits.max_connections` of them. Accept errors (out of file descriptors) are logged and
/// retried after 100 ms. On shutdown it stops accepting, lets requests in progress finish
/// for up to [`DRAIN_TIME`], and returns.
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "HTTP connection closed: too many open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(
                hyper_util::rt::TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(app.clone()),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIME, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still in progress at shutdown were cut off");
    }
}

/// The service's routes (for embedding into a larger axum app).
pub fn router<R: Registry, B: BrokerAccounts>(state: Arc<IdentityState<R, B>>) -> Router {
    let limit = state.config.body_limit;
    Router::new()
        .route("/v1/challenge", post(challenge::<R, B>))
        .route("/v1/register", post(register::<R, B>))
        .route("/v1/enrollments", post(create_enrollment::<R, B>))
        .route("/v1/devices", get(list_devices::<R, B>))
        .route("/v1/devices/:id", get(get_device::<R, B>))
        .route("/v1/devices/:id/revoke", post(revoke::<R, B>))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_in_flight::<R, B>,
        ))
        .with_state(state)
}

/// An error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

fn err(status: StatusCode, code: &'static str, message: &'static str) -> ApiError {
    ApiError {
        status,
        code,
        message,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: self.message.to_string(),
            code: self.code.to_string(),
        });
        if self.status == StatusCode::UNAUTHORIZED {
            (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!("identity service: {e}");
    err(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}

fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::NotFound(_) => err(StatusCode::NOT_FOUND, "not_found", "no such device"),
        RegistryError::EnrollmentInvalid => err(
            StatusCode::UNAUTHORIZED,
            "enrollment_invalid",
            "enrollment token unknown or already used",
        ),
        RegistryError::EnrollmentExpired => err(
            StatusCode::UNAUTHORIZED,
            "enrollment_expired",
            "enrollment token expired",
        ),
        RegistryError::DuplicateId(_) | RegistryError::DuplicateKey(_) => err(
            StatusCode::CONFLICT,
            "duplicate",
            "device or key already registered",
        ),
        RegistryError::Invalid(_) => err(
            StatusCode::BAD_REQUEST,
            "invalid",
            "name or groups out of bounds",
        ),
        other => internal(other),
    }
}

async fn not_found() -> ApiError {
    err(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn limit_in_flight<R: Registry, B: BrokerAccounts>(
    State(st): State<Arc<IdentityState<R, B>>>,
    req: Request,
    next: Next,
) -> Response {
    // The operator has its own places: unauthenticated clients cannot starve it.
    let is_operator = operator(&st, req.headers()).is_ok();
    let pool = if is_operator {
        &st.operator_in_flight
    } else {
        &st.in_flight
    };
    let Ok(permit) = pool.clone().try_acquire_owned() else {
        tracing::warn!(
            operator = is_operator,
            "HTTP request refused: too many in flight"
        );
        return busy();
    };
    if is_operator {
        let resp = next.run(req).await;
        drop(permit);
        return resp;
    }
    let (req, expired) = with_body_deadline(req, st.config.body_timeout);
    let resp = next.run(req).await;
    drop(permit);
    if expired.load(Ordering::Relaxed) {
        return body_timed_out();
    }
    resp
}

fn busy() -> Response {
    err(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "too many requests in flight",
    )
    .into_response()
}

/// A request body that fails once its deadline passes (see [`with_body_deadline`]).
struct DeadlineBody {
    inner: axum::body::Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

impl axum::body::HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return std::task::Poll::Ready(Some(Err(axum::Error::new(
                "request body took too long",
            ))));
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Gives `req` a body that must be all read within `deadline` (from now): reading past it
/// fails, and the flag returned is set; the caller then answers [`body_timed_out`] whatever
/// the handler made of the failure. A handler that does not read the body (one refusing the
/// request first) is not affected.
pub(crate) fn with_body_deadline(
    req: Request,
    deadline: std::time::Duration,
) -> (Request, Arc<AtomicBool>) {
    let expired = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = DeadlineBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(deadline)),
        expired: expired.clone(),
    };
    (
        Request::from_parts(parts, axum::body::Body::new(body)),
        expired,
    )
}

/// The answer to a request whose body did not come in time: 408 `{"code": "timeout"}`.
pub(crate) fn body_timed_out() -> Response {
    tracing::warn!("HTTP request body too slow");
    err(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        "request body took too long",
    )
    .into_response()
}

/// Checks the operator's bearer token (constant time, over SHA-256 digests so the lengths
/// leak nothing either).
fn operator<R, B>(st: &IdentityState<R, B>, headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthorized = || {
        err(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "operator token missing or wrong",
        )
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let token = value.strip_prefix("Bearer ").ok_or_else(unauthorized)?;
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if bool::from(digest.ct_eq(&st.operator_digest)) {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body too large",
            )
        } else {
            err(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "request body unreadable",
            )
        }
    })
}

fn nonce_used() -> ApiError {
    err(StatusCode::CONFLICT, "nonce_used", "nonce already used")
}

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|_| err(StatusCode::BAD_REQUEST, "bad_json", "malformed JSON body"))
}

fn device_body(d: &DeviceRecord) -> DeviceBody {
    DeviceBody {
        device_id: d.id.to_hex(),
        alg: d.alg.name().to_string(),
        public_key: STANDARD.encode(&d.public_key),
        status: d.status.name().to_string(),
        created: d.created,
        name: d.name.clone(),
        groups: d.groups.clone(),
    }
}

fn path_id(id: &str) -> Result<DeviceId, ApiError> {
    super::parse_device_id(id).ok_or_else(|| {
        err(
            StatusCode::BAD_REQUEST,
            "bad_device_id",
            "device id must be 16 hex digits",
        )
    })
}

async fn challenge<R: Registry, B: BrokerAccounts>(
    State(st): State<Arc<IdentityState<R, B>>>,
) -> Result<Json<ChallengeBody>, ApiError> {
    // Stateless: the nonce carries its expiry and a MAC; nothing is stored.
    let expires = st.config.clock.now().saturating_add(st.config.nonce_ttl);
    let nonce = st.config.nonce_key.issue(expires);
    Ok(Json(ChallengeBody {
        nonce: STANDARD.encode(nonce),
        expires_in: st.config.nonce_ttl,
    }))
}

/// The registration request, with every field parsed and length-checked (no public-key
/// work yet).
struct Parsed {
    key: PublicKey,
    token: TokenHash,
    nonce: [u8; NONCE_LEN],
    signature: Vec<u8>,
}

fn parse_register(b: &RegisterBody) -> Result<Parsed, ApiError> {
    let bad_key = |m| err(StatusCode::BAD_REQUEST, "bad_key", m);
    let alg = Alg::from_name(&b.alg)
        .ok_or_else(|| err(StatusCode::BAD_REQUEST, "bad_alg", "unknown algorithm"))?;
    if b.public_key.len() > MAX_PUBLIC_KEY_LEN * 2 {
        return Err(bad_key("public key too long"));
    }
    let raw = STANDARD
        .decode(&b.public_key)
        .map_err(|_| bad_key("public key is not base64"))?;
    let key = PublicKey::from_bytes(alg, &raw).map_err(|e| match e {
        KeyError::RsaParameters => bad_key("RSA key must be 2048-bit with exponent 65537"),
        _ => bad_key("public key malformed, of the wrong length or weak"),
    })?;
    let nonce: [u8; NONCE_LEN] = STANDARD
        .decode(b.nonce.as_bytes())
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| err(StatusCode::BAD_REQUEST, "bad_nonce", "nonce malformed"))?;
    let signature = STANDARD
        .decode(b.signature.as_bytes())
        .ok()
        .filter(|s| s.len() == alg.signature_len())
        .ok_or_else(|| {
            err(
                StatusCode::BAD_REQUEST,
                "bad_signature_format",
                "signature malformed or of the wrong length",
            )
        })?;
    // Devices send the secret part of the token; a whole `<secret>.<pin>` token works too.
    let secret = token_secret(&b.enrollment_token);
    if secret.is_empty() || b.enrollment_token.len() > MAX_TOKEN_CHARS {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "enrollment_invalid",
            "enrollment token missing or malformed",
        ));
    }
    Ok(Parsed {
        key,
        token: TokenHash::of(secret),
        nonce,
        signature,
    })
}

async fn register<R: Registry, B: BrokerAccounts>(
    State(st): State<Arc<IdentityState<R, B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // 1. Formats and lengths.
    let bytes = body_bytes(body)?;
    let req: RegisterBody = json(&bytes)?;
    let p = parse_register(&req)?;
    drop(req);
    let now = st.config.clock.now();
    // 2. Cheap checks: the nonce's MAC and expiry (no state), the enrollment token (not
    //    consumed yet), then single use of the nonce (remembered as used whatever happens
    //    next, until it expires).
    let nonce_expires = st
        .config
        .nonce_key
        .check(&p.nonce, now)
        .map_err(|e| match e {
            NonceError::Expired => err(StatusCode::GONE, "nonce_expired", "nonce expired"),
            _ => err(
                StatusCode::BAD_REQUEST,
                "nonce_invalid",
                "nonce not issued by this service or altered",
            ),
        })?;
    let enrollment = st
        .registry
        .enrollment(p.token, now)
        .await
        .map_err(registry_error)?;
    // Only a look here: a nonce is remembered as used once its proof of possession verified,
    // so that failed attempts (by someone holding a valid enrollment token) cannot fill the
    // table and turn everyone else away.
    if st
        .used_nonces
        .lock()
        .map_err(|_| internal("nonce table poisoned"))?
        .contains_key(&p.nonce)
    {
        return Err(nonce_used());
    }
    // 3. The proof of possession (on the blocking pool: RSA verification is slow).
    let Parsed {
        key,
        token,
        nonce,
        signature,
    } = p;
    let (key, nonce) = tokio::task::spawn_blocking(move || {
        verify_registration(&key, &nonce, &signature).map(|()| (key, nonce))
    })
    .await
    .map_err(internal)?
    .map_err(|_| {
        tracing::info!("identity service: registration with a bad proof of possession");
        err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_signature",
            "proof of possession does not verify",
        )
    })?;
    // Single use of the nonce (checked again: a concurrent registration may have used it
    // meanwhile), remembered until it expires, whatever happens next.
    {
        let mut used = st
            .used_nonces
            .lock()
            .map_err(|_| internal("nonce table poisoned"))?;
        if used.contains_key(&nonce) {
            return Err(nonce_used());
        }
        if used.len() >= st.config.max_nonces {
            used.retain(|_, expires| now < *expires);
        }
        if used.len() >= st.config.max_nonces {
            tracing::warn!("identity service: registration refused, used-nonce table full");
            return Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many registrations in progress",
            ));
        }
        used.insert(nonce, nonce_expires);
    }
    let id = DeviceId::of_key(&key);
    // 4. Credentials, then the device (consuming the token in the same transaction), then
    //    the broker account.
    let st2 = st.clone();
    let (password, hash) = tokio::task::spawn_blocking(move || st2.accounts.new_credentials())
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let record = DeviceRecord {
        id,
        alg: key.alg(),
        public_key: key.to_bytes(),
        status: DeviceStatus::Registered,
        password_hash: hash.clone(),
        created: now,
        name: enrollment.name,
        groups: enrollment.groups,
    };
    if let Err(e) = st.registry.enroll_device(record, token, now).await {
        if let RegistryError::DuplicateId(existing) | RegistryError::DuplicateKey(existing) = &e {
            let revoked = matches!(
                st.registry.device(*existing).await,
                Ok(Some(d)) if d.status == DeviceStatus::Revoked
            );
            if revoked {
                return Err(err(
                    StatusCode::FORBIDDEN,
                    "revoked",
                    "this key's identity was revoked",
                ));
            }
        }
        return Err(registry_error(e));
    }
    if let Err(e) = st.accounts.add(BrokerUser::device(id, hash)).await {
        tracing::error!("identity service: broker account for {id} failed: {e}");
        // Undo the registration so the device can retry with a new token.
        if let Err(e) = st.registry.delete_device(id).await {
            tracing::error!("identity service: could not undo registration of {id}: {e}");
        }
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "broker account could not be created",
        ));
    }
    tracing::info!(device = %id, alg = %key.alg(), "identity service: device registered");
    let server_key = &st.config.server_key;
    let answer = RegisteredBody {
        device_id: id.to_hex(),
        broker_username: id.to_hex(),
        broker_password: password.to_string(),
        broker: st.config.broker.clone(),
        server_id: st.server_id.to_hex(),
        server_alg: server_key.alg().name().to_string(),
        server_public_key: STANDARD.encode(server_key.to_bytes()),
        topics: TopicsBody {
            subscribe: st.topics.to_device(id),
            publish: st.topics.to_server(id),
        },
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn create_enrollment<R: Registry, B: BrokerAccounts>(
    State(st): State<Arc<IdentityState<R, B>>>,
    request: Request,
) -> Result<Response, ApiError> {
    // The operator's token first: an unauthenticated caller gets its 401 before a byte of
    // its body is read.
    operator(&st, request.headers())?;
    let bytes = body_bytes(Bytes::from_request(request, &()).await)?;
    let req: EnrollmentRequestBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        EnrollmentRequestBody::default()
    } else {
        json(&bytes)?
    };
    let ttl = req.ttl_secs.unwrap_or(st.config.enrollment_ttl);
    if ttl == 0 || ttl > MAX_ENROLLMENT_TTL {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "bad_ttl",
            "ttl_secs must be 1 to 30 days",
        ));
    }
    let now = st.config.clock.now();
    // `<secret>.<pin of the C2 server key>`: the device checks the key it is given.
    let token = EnrollmentToken::issue(&st.config.server_key);
    let expires = now.saturating_add(ttl);
    let enrollment = Enrollment {
        expires,
        name: req.name,
        groups: req.groups,
    };
    st.registry
        .add_enrollment(TokenHash::of(token.secret()), enrollment, now)
        .await
        .map_err(registry_error)?;
    tracing::info!(expires, "identity service: enrollment token issued");
    let answer = EnrollmentBody {
        token: token.as_str().to_string(),
        expires,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn list_devices<R: Registry, B: BrokerAccounts>(
    State(st): State<Arc<IdentityState<R, B>>>,
    headers: HeaderMap,
) -> Result<Json<DevicesBody>, ApiError> {
    operator(&st, &headers)?;
    let devices = st.registry.devices().await.map_err(registry_error)?;
    Ok(Json(DevicesBody {
        devices: devices.iter().map(device_body).collect(),
    }))
}

async fn get_device<R: Registry, B: BrokerAccounts>(
    State(st): State<Arc<IdentityState<R, B>>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<DeviceBody>, ApiError> {
    operator(&st, &headers)?;
    let id = path_id(&id)?;
    match st.registry.device(id).await.map_err(registry_error)? {
        Some(d) => Ok(Json(device_body(&d))),
        None => Err(err(StatusCode::NOT_FOUND, "not_found", "no such device")),
    }
}

async fn revoke<R: Registry, B: BrokerAccounts>(
    State(st): State<Arc<IdentityState<R, B>>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<DeviceBody>, ApiError> {
    operator(&st, &headers)?;
    let id = path_id(&id)?;
    // The registry first: once this returns, the C2 server refuses the device even if the
    // broker update below fails.
    let d = st
        .registry
        .set_status(id, DeviceStatus::Revoked)
        .await
        .map_err(registry_error)?;
    if let Err(e) = st.accounts.remove(id.to_hex()).await {
        tracing::error!("identity service: broker account of revoked {id} not removed: {e}");
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "device revoked, but its broker account could not be removed yet",
        ));
    }
    tracing::info!(device = %id, "identity service: device revoked");
    Ok(Json(device_body(&d)))
}
