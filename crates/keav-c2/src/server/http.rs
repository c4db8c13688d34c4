//! The operator's C2 routes, served beside the identity service's (every route needs
//! `Authorization: Bearer <operator token>`, compared in constant time):
//!
//! | route | does | answer |
//! | --- | --- | --- |
//! | `POST /v1/c2/command` | action, data, generic or ID request to a device or a group | 200 [`SentBody`] |
//! | `POST /v1/c2/update` | update initiate to a device or a group | 200 [`SentBody`] |
//! | `POST /v1/c2/activate` | activate a verified update | 200 [`SentBody`] |
//! | `GET /v1/c2/responses/{token}` | where a token stands | 200 [`TokenBody`] |
//! | `POST /v1/c2/responses` | several tokens at once | 200 [`TokenListBody`] |
//! | `GET /v1/c2/joins` | pending joins (with words) | 200 [`JoinsBody`] |
//! | `POST /v1/c2/joins/{id}` | accept or refuse a join | 200 [`DecidedBody`] |
//! | `POST /v1/c2/devices/{id}/join` | join command | 200 [`SentBody`] |
//! | `POST /v1/c2/devices/{id}/terminate` | terminate | 200 [`SentBody`] |
//! | `POST /v1/c2/devices/{id}/deregister` | deregister command, then revocation | 200 [`SentBody`] |
//! | `POST /v1/c2/devices/{id}/revoke` | revocation (registry, engine, broker) | 200 [`SentBody`] |
//! | `POST /v1/c2/devices/{id}/reset` | reset the replay continuity of a device that lost its state | 200 [`SentBody`] |
//! | `POST /v1/c2/devices/{id}/confidential` | start/rekey a confidential session, set the policy ([`ConfidentialBody`], optional) | 200 [`SentBody`] (handshake tokens) |
//! | `GET /v1/c2/devices/{id}/confidential` | where the device's confidentiality stands | 200 [`ConfidentialInfoBody`] |
//! | `GET /v1/c2/stats` | counters | 200 [`StatsBody`] |
//! | `GET /v1/c2/events?after=N&limit=M` | recent events numbered above N (at most M, default and most 500) | 200 [`EventsBody`] |
//!
//! The web console ([`super::console`]) is served beside these routes, without the token:
//! it is static and holds no data; it calls these routes with the token the operator gives.
//!
//! Errors are the identity service's `{"error", "code"}` bodies.
//!
//! The operator token is checked by a layer in front of every route, before the request's
//! body is read or parsed: a caller without the token gets 401 whatever it sends. The whole
//! HTTP service (these routes and the identity service's) is behind in-flight limits
//! ([`limit_in_flight`]): requests beyond them are answered 503 at once, and a request may
//! hold its place for a bounded time only (408 after that), so clients that never finish
//! sending their body cannot keep the service locked. Requests with the operator token
//! have places of their own, and unauthenticated requests must send their body within a
//! short deadline, so unauthenticated clients cannot keep the operator from revoking.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::api::*;
use super::events::{EventsBody, MAX_EVENTS_PER_CALL};
use super::{Sent, Server, ServerError};
use crate::engine::{EngineError, JoinMethod, Outcome, Targets};
use crate::identity::api::ErrorBody;
use crate::keys::DeviceId;
use crate::registry::Registry;
use crate::wire::{Action, Body, Data, Generic, IdRequest, Status, Token, Value};

/// Most tokens asked for in one call.
const MAX_TOKENS: usize = 10_000;

struct AppState<R> {
    server: Server<R>,
    operator_digest: [u8; 32],
}

/// The operator routes over `server` (merged into the identity service's router).
pub fn router<R: Registry>(server: Server<R>, operator_token: &str) -> Router {
    let st = Arc::new(AppState {
        server,
        operator_digest: Sha256::digest(operator_token.as_bytes()).into(),
    });
    Router::new()
        .route("/v1/c2/command", post(command::<R>))
        .route("/v1/c2/update", post(update::<R>))
        .route("/v1/c2/activate", post(activate::<R>))
        .route("/v1/c2/responses", post(responses_many::<R>))
        .route("/v1/c2/responses/:token", get(responses_one::<R>))
        .route("/v1/c2/joins", get(joins::<R>))
        .route("/v1/c2/joins/:id", post(decide::<R>))
        .route(
            "/v1/c2/devices/:id/:verb",
            post(device_verb::<R>).get(device_get::<R>),
        )
        .route("/v1/c2/stats", get(stats::<R>))
        .route("/v1/c2/events", get(events::<R>))
        // Before any extractor: the token is checked before the body is read.
        .route_layer(middleware::from_fn_with_state(
            st.clone(),
            require_operator::<R>,
        ))
        .layer(DefaultBodyLimit::max(1024 * 1024))
        .with_state(st)
}

async fn require_operator<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    req: Request,
    next: Next,
) -> Response {
    match operator(&st, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Runs every revocation request (`POST …/revoke`, the identity service's and the operator
/// C2 route) on its own task, so it completes even if the client goes away mid-request
/// (axum drops a handler's future when its connection closes). Revocations have no body,
/// so this costs nothing to a client that never finishes sending one.
pub fn uncancellable_revocations(app: Router) -> Router {
    app.layer(middleware::from_fn(|req: Request, next: Next| async move {
        let revoke =
            req.method() == axum::http::Method::POST && req.uri().path().ends_with("/revoke");
        if !revoke {
            return next.run(req).await;
        }
        match tokio::spawn(next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error".into(),
            )
            .into_response(),
        }
    }))
}

/// The HTTP service's in-flight limits ([`limit_in_flight`]).
#[derive(Debug, Clone, Copy)]
pub struct InFlightLimits {
    /// Most requests without the operator token in flight at once (at least 1).
    pub max: usize,
    /// Most requests with the operator token in flight at once (at least 1), apart from
    /// the others: unauthenticated clients cannot take these places.
    pub max_operator: usize,
    /// Longest a request may take, reading its body included.
    pub timeout: std::time::Duration,
    /// Longest a request without the operator token may take to send its whole body.
    pub body_timeout: std::time::Duration,
}

/// Puts `app` behind in-flight limits: requests carrying the operator token (checked in
/// constant time, as the operator routes do) and the others each have their own places
/// (`limits.max_operator`, `limits.max`), so unauthenticated clients cannot keep the
/// operator (a revocation) out. One request more than its pool allows is answered
/// `503 {"code": "busy"}` at once, without being read. A request without the operator token
/// must send its whole body within `limits.body_timeout`, or it is answered
/// `408 {"code": "timeout"}` and its place freed. Any request taking longer than
/// `limits.timeout` is answered 408 too (work that must complete, like a revocation, runs
/// on its own task).
pub fn limit_in_flight(app: Router, operator_token: &str, limits: InFlightLimits) -> Router {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max.max(1)));
    let operator_permits = Arc::new(tokio::sync::Semaphore::new(limits.max_operator.max(1)));
    let operator_digest: [u8; 32] = Sha256::digest(operator_token.as_bytes()).into();
    app.layer(middleware::from_fn(move |req: Request, next: Next| {
        let permits = permits.clone();
        let operator_permits = operator_permits.clone();
        async move {
            let is_operator = bearer_matches(req.headers(), &operator_digest);
            let pool = if is_operator {
                operator_permits
            } else {
                permits
            };
            let Ok(permit) = pool.try_acquire_owned() else {
                tracing::warn!(
                    operator = is_operator,
                    "HTTP request refused: too many in flight"
                );
                return ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many requests in flight".into(),
                )
                .into_response();
            };
            let work = async move {
                if is_operator {
                    return next.run(req).await;
                }
                let (req, expired) =
                    crate::identity::server::with_body_deadline(req, limits.body_timeout);
                let r = next.run(req).await;
                if expired.load(std::sync::atomic::Ordering::Relaxed) {
                    return crate::identity::server::body_timed_out();
                }
                r
            };
            let r = match tokio::time::timeout(limits.timeout, work).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("HTTP request timed out");
                    ApiError(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        "request took too long".into(),
                    )
                    .into_response()
                }
            };
            drop(permit);
            r
        }
    }))
}

/// An error answer.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: self.2,
            code: self.1.to_string(),
        });
        if self.0 == StatusCode::UNAUTHORIZED {
            (self.0, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else {
            (self.0, body).into_response()
        }
    }
}

fn bad(what: &'static str) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid", what.to_string())
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> ApiError {
        match &e {
            ServerError::Engine(EngineError::UnknownDevice(_)) | ServerError::UnknownDevice(_) => {
                ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            ServerError::WordsNotExpected(_) => {
                ApiError(StatusCode::CONFLICT, "no_human_join", e.to_string())
            }
            ServerError::WordsRequired(_) => {
                ApiError(StatusCode::CONFLICT, "words_required", e.to_string())
            }
            ServerError::Engine(EngineError::NoPendingJoin(_)) => {
                ApiError(StatusCode::CONFLICT, "no_pending_join", e.to_string())
            }
            ServerError::Engine(EngineError::BadExpiry { .. }) | ServerError::Invalid(_) => {
                ApiError(StatusCode::BAD_REQUEST, "invalid", e.to_string())
            }
            ServerError::Engine(_)
            | ServerError::Confidential(_)
            | ServerError::ConfidentialRequired(_) => {
                ApiError(StatusCode::CONFLICT, "refused", e.to_string())
            }
            ServerError::Registry(crate::registry::RegistryError::Revoked(_))
            | ServerError::Registry(crate::registry::RegistryError::StatusConflict { .. }) => {
                ApiError(StatusCode::CONFLICT, "refused", e.to_string())
            }
            ServerError::Registry(crate::registry::RegistryError::NotFound(_)) => {
                ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "operator call failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".into(),
                )
            }
        }
    }
}

fn operator<R>(st: &AppState<R>, headers: &HeaderMap) -> Result<(), ApiError> {
    if bearer_matches(headers, &st.operator_digest) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "operator token missing or wrong".into(),
        ))
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>` with the token whose SHA-256 is
/// `digest` (compared in constant time).
fn bearer_matches(headers: &HeaderMap, digest: &[u8; 32]) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    bool::from(got.ct_eq(digest))
}

fn device_id(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::from_hex(&s.to_ascii_lowercase()).ok_or_else(|| bad("device id"))
}

/// A token's hex form.
pub fn token_hex(t: &Token) -> String {
    t.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a token's hex form.
pub fn parse_token(s: &str) -> Option<Token> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let bytes = bytes?;
    if bytes.is_empty() {
        return None;
    }
    Token::new(&bytes).ok()
}

/// Parses 64 hex digits.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let t = parse_token(s)?;
    t.as_bytes().try_into().ok()
}

fn targets(device: &Option<String>, group: &Option<String>) -> Result<Targets, ApiError> {
    match (device, group) {
        (Some(d), None) => Ok(Targets::Devices(vec![device_id(d)?])),
        (None, Some(g)) => {
            crate::registry::validate_groups(std::slice::from_ref(g))
                .map_err(|_| bad("group name"))?;
            Ok(Targets::Group(g.clone()))
        }
        _ => Err(bad("give exactly one of device and group")),
    }
}

fn b64(s: &str) -> Result<Vec<u8>, ApiError> {
    STANDARD.decode(s.as_bytes()).map_err(|_| bad("base64"))
}

fn body_of(c: &CommandBody) -> Result<Body, ApiError> {
    let n = usize::from(c.action.is_some())
        + usize::from(c.data_id.is_some())
        + usize::from(c.generic.is_some())
        + usize::from(c.id_request);
    if n != 1 {
        return Err(bad(
            "give exactly one of action, data_id, generic, id_request",
        ));
    }
    if let Some(a) = c.action {
        let args = c.args.as_deref().map(b64).transpose()?.unwrap_or_default();
        return Ok(Body::Action(Action { action: a, args }));
    }
    if let Some(id) = &c.data_id {
        let value = match c.value.as_ref().ok_or_else(|| bad("data needs a value"))? {
            ValueBody::U64(v) => Value::U64(*v),
            ValueBody::I64(v) => Value::I64(*v),
            ValueBody::F64(v) => Value::F64(*v),
            ValueBody::Bool(v) => Value::Bool(*v),
            ValueBody::Text(v) => Value::Text(v.clone()),
            ValueBody::Bytes(v) => Value::Bytes(b64(v)?),
        };
        return Ok(Body::Data(Data {
            id: id.clone(),
            value,
        }));
    }
    if let Some(g) = &c.generic {
        return Ok(Body::Generic(Generic { data: b64(g)? }));
    }
    Ok(Body::IdRequest(IdRequest))
}

fn sent_body(s: Sent) -> SentBody {
    SentBody {
        sent: s
            .sent
            .into_iter()
            .map(|(d, t)| SentItem {
                device: d.to_hex(),
                token: token_hex(&t),
            })
            .collect(),
        skipped: s
            .skipped
            .into_iter()
            .map(|(d, reason)| SkippedItem {
                device: d.to_hex(),
                reason,
            })
            .collect(),
    }
}

/// A status's name (`ActionSuccess`…).
pub fn status_name(code: u8) -> String {
    match Status::from_code(code) {
        Status::Other(c) => format!("Other({c})"),
        s => format!("{s:?}"),
    }
}

async fn command<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Json(c): Json<CommandBody>,
) -> Result<Json<SentBody>, ApiError> {
    let t = targets(&c.device, &c.group)?;
    let body = body_of(&c)?;
    if c.confidential {
        let Body::Data(data) = body else {
            return Err(bad("only data can be sent confidentially"));
        };
        let ids = match t {
            Targets::Devices(v) => v,
            Targets::Group(g) => st
                .server
                .registry()
                .devices_in_group(g)
                .await
                .map_err(ServerError::from)?
                .into_iter()
                .map(|d| d.id)
                .collect(),
        };
        let mut sent = Sent::default();
        for id in ids {
            match st.server.send_confidential(id, data.clone()).await {
                Ok(tok) => sent.sent.push((id, tok)),
                Err(e) => sent.skipped.push((id, e.to_string())),
            }
        }
        return refuse_single(&c.device, sent);
    }
    let sent = st.server.command_group(&t, body, c.lifetime).await?;
    refuse_single(&c.device, sent)
}

/// A command for one named device that was not sent is an error, not a report.
fn refuse_single(device: &Option<String>, sent: Sent) -> Result<Json<SentBody>, ApiError> {
    if device.is_some() {
        if let Some((_, why)) = sent.skipped.first() {
            return Err(ApiError(StatusCode::CONFLICT, "refused", why.clone()));
        }
    }
    Ok(Json(sent_body(sent)))
}

async fn update<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Json(u): Json<UpdateBody>,
) -> Result<Json<SentBody>, ApiError> {
    let t = targets(&u.device, &u.group)?;
    let digest = parse_digest(&u.digest).ok_or_else(|| bad("digest must be 64 hex digits"))?;
    if !u.url.starts_with("http://") || u.url.len() > crate::wire::MAX_URL_LEN {
        return Err(bad("url must be http://…"));
    }
    let sent = st.server.initiate_update(&t, &u.url, digest).await?;
    refuse_single(&u.device, sent)
}

async fn activate<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Json(a): Json<ActivateBody>,
) -> Result<Json<SentBody>, ApiError> {
    let d = device_id(&a.device)?;
    let t = parse_token(&a.token).ok_or_else(|| bad("token"))?;
    st.server.activate(d, &t).await?;
    Ok(Json(SentBody {
        sent: vec![SentItem {
            device: d.to_hex(),
            token: a.token,
        }],
        skipped: vec![],
    }))
}

async fn token_body<R: Registry>(server: &Server<R>, t: &Token) -> Result<TokenBody, ApiError> {
    let outcome = match server.outcome(t).await {
        None => "unknown",
        Some(Outcome::Pending) => "pending",
        Some(Outcome::Answered(_)) => "answered",
        Some(Outcome::Expired) => "expired",
    };
    let responses = server
        .responses(t)
        .await?
        .into_iter()
        .map(|r| RecordedBody {
            device: r.device.to_hex(),
            status: r.status,
            status_name: status_name(r.status),
        })
        .collect();
    Ok(TokenBody {
        token: token_hex(t),
        outcome: outcome.to_string(),
        responses,
    })
}

async fn responses_one<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Path(token): Path<String>,
) -> Result<Json<TokenBody>, ApiError> {
    let t = parse_token(&token).ok_or_else(|| bad("token"))?;
    Ok(Json(token_body(&st.server, &t).await?))
}

async fn responses_many<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Json(b): Json<TokensBody>,
) -> Result<Json<TokenListBody>, ApiError> {
    if b.tokens.len() > MAX_TOKENS {
        return Err(bad("too many tokens"));
    }
    let mut out = Vec::with_capacity(b.tokens.len());
    for s in &b.tokens {
        let t = parse_token(s).ok_or_else(|| bad("token"))?;
        out.push(token_body(&st.server, &t).await?);
    }
    Ok(Json(TokenListBody { tokens: out }))
}

/// A join method's name.
pub fn method_name(m: JoinMethod) -> &'static str {
    match m {
        JoinMethod::Simple => "simple",
        JoinMethod::Command => "command",
        JoinMethod::Human => "human",
        JoinMethod::Observed => "observed",
    }
}

async fn joins<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
) -> Result<Json<JoinsBody>, ApiError> {
    let joins = st
        .server
        .pending_joins()
        .await
        .into_iter()
        .map(|j| JoinBody {
            device: j.device.to_hex(),
            method: method_name(j.method).to_string(),
            words: j.words.map(|w| w.into_iter().map(str::to_string).collect()),
        })
        .collect();
    Ok(Json(JoinsBody { joins }))
}

async fn decide<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Path(id): Path<String>,
    Json(d): Json<DecideBody>,
) -> Result<Json<DecidedBody>, ApiError> {
    let id = device_id(&id)?;
    if d.words.len() > 64 {
        return Err(bad("too many words"));
    }
    let joined = st.server.decide(id, d.accept, &d.words).await?;
    let reason = match (joined, d.accept) {
        (true, _) => None,
        (false, false) => Some("refused by the operator".to_string()),
        (false, true) => Some("wrong words".to_string()),
    };
    Ok(Json(DecidedBody { joined, reason }))
}

fn no_route() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not_found", "no such route".into())
}

async fn device_get<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Path((id, verb)): Path<(String, String)>,
) -> Result<Json<ConfidentialInfoBody>, ApiError> {
    let id = device_id(&id)?;
    if verb != "confidential" {
        return Err(no_route());
    }
    let i = st.server.confidential_info(id).await?;
    Ok(Json(ConfidentialInfoBody {
        device: id.to_hex(),
        required: i.required,
        established: i.established,
        handshaking: i.handshaking,
        session: i
            .session
            .map(|s| s.0.iter().map(|b| format!("{b:02x}")).collect()),
        sessions: i.sessions,
        records_sealed: i.records_sealed,
        records_opened: i.records_opened,
    }))
}

async fn device_verb<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    Path((id, verb)): Path<(String, String)>,
    body: Option<Json<ConfidentialBody>>,
) -> Result<Json<SentBody>, ApiError> {
    let id = device_id(&id)?;
    if verb == "confidential" {
        let b = body.map(|Json(b)| b).unwrap_or_default();
        if let Some(r) = b.required {
            st.server.set_confidential_required(id, r).await?;
        }
        let tokens = if b.start.unwrap_or(true) {
            st.server.confidential_start(id).await?
        } else {
            Vec::new()
        };
        return Ok(Json(SentBody {
            sent: tokens
                .iter()
                .map(|t| SentItem {
                    device: id.to_hex(),
                    token: token_hex(t),
                })
                .collect(),
            skipped: vec![],
        }));
    }
    let token = match verb.as_str() {
        "join" => Some(st.server.join_command(id).await?),
        "terminate" => Some(st.server.terminate(id).await?),
        "deregister" => Some(st.server.deregister(id).await?),
        "revoke" => {
            st.server.revoke(id).await?;
            None
        }
        "reset" => {
            st.server.reset_continuity(id).await?;
            None
        }
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route".into(),
            ))
        }
    };
    Ok(Json(SentBody {
        sent: token
            .map(|t| SentItem {
                device: id.to_hex(),
                token: token_hex(&t),
            })
            .into_iter()
            .collect(),
        skipped: vec![],
    }))
}

async fn stats<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
) -> Result<Json<StatsBody>, ApiError> {
    let c = st.server.counters().await;
    let mut dropped: Vec<(String, u64)> = c
        .nonzero()
        .into_iter()
        .map(|(r, n)| (r.name().to_string(), n))
        .collect();
    let limited = st.server.rate_limited();
    if limited > 0 {
        dropped.push(("rate_limited".to_string(), limited));
    }
    Ok(Json(StatsBody {
        accepted: c.accepted(),
        dropped,
        oversized: st.server.oversized(),
        confidential: st.server.confidential_counters().named(),
    }))
}

async fn events<R: Registry>(
    State(st): State<Arc<AppState<R>>>,
    uri: axum::http::Uri,
) -> Result<Json<EventsBody>, ApiError> {
    let (after, limit) = events_query(uri.query().unwrap_or(""))?;
    Ok(Json(st.server.events(after, limit)))
}

/// `after` (default 0) and `limit` (default and at most [`MAX_EVENTS_PER_CALL`], at least 1)
/// of an events query; anything else in it is refused.
fn events_query(q: &str) -> Result<(u64, usize), ApiError> {
    let (mut after, mut limit) = (0u64, MAX_EVENTS_PER_CALL);
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| bad("query"))?;
        match k {
            "after" => after = v.parse().map_err(|_| bad("after"))?,
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| bad("limit"))?
                    .clamp(1, MAX_EVENTS_PER_CALL)
            }
            _ => return Err(bad("query")),
        }
    }
    Ok((after, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_query_takes_after_and_a_bounded_limit_and_refuses_the_rest() {
        assert_eq!(events_query("").ok(), Some((0, MAX_EVENTS_PER_CALL)));
        assert_eq!(
            events_query("after=12").ok(),
            Some((12, MAX_EVENTS_PER_CALL))
        );
        assert_eq!(events_query("after=3&limit=7").ok(), Some((3, 7)));
        assert_eq!(events_query("limit=0").ok(), Some((0, 1)));
        assert_eq!(
            events_query("limit=999999").ok(),
            Some((0, MAX_EVENTS_PER_CALL))
        );
        for q in [
            "after=-1",
            "after=x",
            "after",
            "limit=1e3",
            "since=4",
            "after=1&x=2",
        ] {
            let e = events_query(q)
                .err()
                .unwrap_or_else(|| panic!("{q} accepted"));
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{q}");
        }
    }
}
