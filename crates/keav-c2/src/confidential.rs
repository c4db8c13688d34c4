//! Optional confidentiality: a KEAV channel between the C2 server and one device, carried
//! inside signed C2 messages (docs/C2-confidential.md).
//!
//! A [`Confidential`] is a sans-IO session object per (server, device) pair. It runs a KEAV
//! handshake whose messages travel as the bodies of C2 [`Generic`] messages, then seals
//! application payloads into KEAV records (AEAD, replay window, ratchet) that travel in
//! [`Data`] values (or Generic bodies). Both layers apply: every frame is inside a C2 message
//! that the engine has already checked (signature by a registered key, replay guard, expiry)
//! before this module sees it, and every record is then authenticated and decrypted by the
//! KEAV record layer with its own replay window.
//!
//! # Frames
//!
//! Everything this module sends is a *frame* (all integers big-endian):
//!
//! ```text
//! "KVCF" | version 1 | kind u8 | session id (8) | payload
//! kind 1 (handshake): payload = one or more (u16 length | bare ZRTP message)
//! kind 2 (record):    payload = one KEAV record (record layer wire format)
//! ```
//!
//! The session id is drawn by the handshake's initiator; records name the session whose
//! keys sealed them, so records still in flight during a rekey open with the previous keys.
//! Handshake frames go in [`Generic`] bodies ([`handshake_body`]); record frames in a
//! [`Data`] whose id is [`SEALED_DATA_ID`] and whose value is [`Value::Bytes`]
//! ([`Confidential::seal_data`]), or in a Generic body. [`is_frame`] and [`is_sealed`] tell
//! them apart from ordinary application bytes.
//!
//! # Call order
//!
//! - Create one [`Confidential`] per pair ([`Confidential::new`]), or restore it
//!   ([`Confidential::from_state`]).
//! - Either side calls [`Confidential::start`] (first session, or a rekey); send the frames of
//!   the returned [`Handled`] as Generic bodies to the peer.
//! - For each Generic from the peer that [`is_frame`]: [`Confidential::handle_frame`]; send the
//!   frames it returns; act on its [`ConfEvent`]s.
//! - Once [`Confidential::is_established`]: [`Confidential::seal`] / [`Confidential::open`]
//!   (or their `_data` forms).
//! - Call [`Confidential::handle_timeout`] when [`Confidential::poll_timeout`] passes.
//!
//! Every call that changes state returns its value inside a [`StoreFirst`]: the caller gets
//! the value (frames to publish, plaintext to act on) only through [`StoreFirst::persist`],
//! whose closure must store the exported state durably first. A sealer restored from a state
//! stored before its last record left would seal the same sequence number again (nonce
//! reuse); storing first rules that out, exactly as the C2 engine's own counters do.
//!
//! # Time
//!
//! `now_ms` is wall-clock unix time in milliseconds (the handshake's lockout and cache expiry
//! use `now_ms / 1000`); it only needs to be monotonic enough for timers.

use std::fmt;

use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

use keav_proto::cache::{LockoutPolicy, Mode, PeerCache, Verification, Zid};
use keav_proto::handshake::{Config, Endpoint, Event, KeyAgreement, PeerLookup, SessionOutcome};
use keav_proto::msg::{peek_type, MessageType as ZrtpType};
use keav_proto::record::{
    channel_from_parts, Opened, Opener, OpenerState, RatchetPolicy, RecordError, Sealer,
    SealerState, MAX_PLAINTEXT,
};
use keav_proto::secret::Secret32;
use keav_verify::VerifySecret;

use crate::engine::{EngineError, MustPersist, Outgoing, PeerUpdates, ServerEngine};
use crate::keys::{DeviceId, PublicKey};
use crate::wire::{Body, BodyCodec, Data, Generic, Reader, Value};

/// The first bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"KVCF";
/// The frame format version.
pub const FRAME_VERSION: u8 = 1;
/// Frame header length: magic, version, kind, session id.
pub const FRAME_HEADER_LEN: usize = 4 + 1 + 1 + 8;
/// The [`Data`] id of a sealed payload (the real id travels inside, encrypted).
pub const SEALED_DATA_ID: &str = "keav.sealed";
/// Largest bare ZRTP message accepted inside a handshake frame.
pub const MAX_HANDSHAKE_MESSAGE: usize = 4096;
/// Largest number of ZRTP messages in one handshake frame.
pub const MAX_HANDSHAKE_BATCH: usize = 8;

const KIND_HANDSHAKE: u8 = 1;
const KIND_RECORD: u8 = 2;
const CHANNEL_LABEL: &[u8] = b"KEAV C2 confidential channel";
const CONTEXT_LABEL: &[u8] = b"KEAV-C2";

/// The session id the initiator of a handshake draws.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 8]);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Which end of the C2 pair this object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The C2 server.
    Server,
    /// The device.
    Device,
}

/// The C2 pair a channel belongs to: both registered signing keys. Both ends build the same
/// value; it is mixed into the channel keys, so a channel is bound to exactly this pairing.
#[derive(Clone, PartialEq, Eq)]
pub struct Pairing {
    server: DeviceId,
    device: DeviceId,
    server_fp: [u8; 32],
    device_fp: [u8; 32],
}

impl fmt::Debug for Pairing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pairing")
            .field("server", &self.server)
            .field("device", &self.device)
            .finish()
    }
}

impl Pairing {
    /// The pair of the server key `server` and the device key `device`.
    pub fn new(server: &PublicKey, device: &PublicKey) -> Pairing {
        Pairing {
            server: DeviceId::of_key(server),
            device: DeviceId::of_key(device),
            server_fp: server.fingerprint(),
            device_fp: device.fingerprint(),
        }
    }

    /// The server's id.
    pub fn server(&self) -> DeviceId {
        self.server
    }

    /// The device's id.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The channel's KDF context: the session's RFC 6189 KDF_Context, a label, both key
    /// fingerprints and the session id.
    fn context(&self, kdf_context: &[u8], sid: SessionId) -> Vec<u8> {
        let mut c = Vec::with_capacity(kdf_context.len() + CONTEXT_LABEL.len() + 72);
        c.extend_from_slice(kdf_context);
        c.extend_from_slice(CONTEXT_LABEL);
        c.extend_from_slice(&self.server_fp);
        c.extend_from_slice(&self.device_fp);
        c.extend_from_slice(&sid.0);
        c
    }
}

/// Settings of a confidential session.
pub struct ConfidentialConfig {
    /// When the record keys ratchet.
    pub ratchet: RatchetPolicy,
    /// Verify-every-N of the KEAV `normal` mode (the equality test runs in the first session
    /// and every N-th; see docs/C2-confidential.md for why it adds little here).
    pub verify_every: u32,
    /// A verification secret provisioned out of band for this pair, if any. Without one the
    /// equality test is *unbound* and a retained-secret mismatch is refused.
    pub verify_secret: Option<Zeroizing<Vec<u8>>>,
    /// Accept a retained-secret mismatch without a bound test (re-pairing after one side lost
    /// its state). Off by default; prefer [`Confidential::reset_continuity`] by an operator.
    pub allow_repair: bool,
    /// Whole-handshake deadline in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Retransmit unanswered handshake messages (RFC 6189 T1/T2). Off by default: MQTT QoS 1
    /// delivers, and every C2 message costs a signature.
    pub retransmit: bool,
    /// Attempt limits for failed verifications.
    pub lockout: LockoutPolicy,
}

impl Default for ConfidentialConfig {
    fn default() -> Self {
        ConfidentialConfig {
            ratchet: RatchetPolicy::default(),
            verify_every: 10,
            verify_secret: None,
            allow_repair: false,
            handshake_timeout_ms: 60_000,
            retransmit: false,
            lockout: LockoutPolicy::default(),
        }
    }
}

impl fmt::Debug for ConfidentialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfidentialConfig")
            .field("ratchet", &self.ratchet)
            .field("verify_every", &self.verify_every)
            .field(
                "verify_secret",
                &self.verify_secret.as_ref().map(|_| "<set>"),
            )
            .field("allow_repair", &self.allow_repair)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("retransmit", &self.retransmit)
            .finish_non_exhaustive()
    }
}

/// Why a confidential call failed or a frame was refused. Nothing changed.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfError {
    /// The bytes are not a frame of this module (magic, version, kind, lengths).
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// No channel is established yet (seal), or none with the record's session id (open).
    #[error("no established session for this record")]
    NoSession,
    /// A handshake frame for no handshake in progress (and not the start of a new one).
    #[error("handshake frame for no handshake in progress")]
    UnexpectedHandshake,
    /// The peer started a handshake while this side's own was running, and this side wins
    /// the contention (the server's handshake goes on; the device's answers it).
    #[error("handshake contention: ours continues")]
    Contention,
    /// The record layer refused to seal or open (forged or damaged record, replay, too old,
    /// too long, exhausted).
    #[error("record: {0}")]
    Record(RecordError),
    /// The handshake could not be started.
    #[error("handshake could not start: {0}")]
    Start(String),
    /// The payload is larger than one record.
    #[error("payload of {0} bytes exceeds one record")]
    TooLong(usize),
    /// A sealed [`Data`] did not decode after opening (the sender sealed garbage).
    #[error("sealed data does not decode")]
    BadInner,
    /// A persisted state could not be read, or belongs to another pair.
    #[error("confidential state: {0}")]
    State(&'static str),
    /// A persisted state has a version this code does not read.
    #[error("unknown confidential state version {0}")]
    UnknownStateVersion(u8),
}

/// What happened in a handshake.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfEvent {
    /// A session was established; seal and open use it from now on.
    Established {
        /// The new session.
        session: SessionId,
        /// There was a session before (this was a rekey).
        rekey: bool,
        /// How the keys were agreed (always DH here).
        key_agreement: KeyAgreement,
        /// What the equality test did.
        verification: Verification,
        /// A retained secret of the previous session matched (key continuity held).
        cache_matched: bool,
    },
    /// The handshake failed; no key was released, the previous session (if any) stays in use.
    Failed {
        /// The session that was being agreed.
        session: SessionId,
        /// Why.
        error: keav_proto::Error,
    },
}

/// The frames to send and the events of one call.
#[derive(Debug, Default)]
pub struct Handled {
    /// Handshake frames to send to the peer, in order, each as one Generic body
    /// ([`handshake_body`]).
    pub frames: Vec<Vec<u8>>,
    /// Events, in order.
    pub events: Vec<ConfEvent>,
}

/// A value the caller may use only after storing `state` durably (see the module docs).
#[must_use = "the state must be persisted before the value is used"]
pub struct StoreFirst<T> {
    state: Zeroizing<Vec<u8>>,
    value: T,
}

impl<T> fmt::Debug for StoreFirst<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreFirst")
            .field("state_len", &self.state.len())
            .finish_non_exhaustive()
    }
}

impl<T> StoreFirst<T> {
    /// The encoded state to store (secret: it holds channel and retained keys).
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Runs `store` on the state; yields the value only if it succeeded.
    pub fn persist<E>(self, store: impl FnOnce(&[u8]) -> Result<(), E>) -> Result<T, E> {
        store(&self.state)?;
        Ok(self.value)
    }
}

/// Whether `bytes` (a Generic body or a Data value) is a frame of this module.
pub fn is_frame(bytes: &[u8]) -> bool {
    bytes.len() >= FRAME_HEADER_LEN && bytes.get(..4) == Some(&FRAME_MAGIC[..])
}

/// Whether `data` is a sealed payload ([`Confidential::seal_data`]).
pub fn is_sealed(data: &Data) -> bool {
    data.id == SEALED_DATA_ID && matches!(&data.value, Value::Bytes(b) if is_frame(b))
}

/// The C2 body that carries a frame: a [`Generic`] message.
pub fn handshake_body(frame: Vec<u8>) -> Body {
    Body::Generic(Generic { data: frame })
}

/// Sends one frame from the server to `device` as a Generic command
/// ([`ServerEngine::command`]; the device may answer it like any command).
pub fn server_send(
    engine: &mut ServerEngine,
    device: DeviceId,
    frame: Vec<u8>,
    expiry: u64,
    now: u64,
) -> Result<MustPersist<Outgoing, PeerUpdates>, EngineError> {
    engine.command(device, handshake_body(frame), expiry, now)
}

struct Frame<'a> {
    kind: u8,
    sid: SessionId,
    payload: &'a [u8],
}

fn parse_frame(bytes: &[u8]) -> Result<Frame<'_>, ConfError> {
    if !is_frame(bytes) {
        return Err(ConfError::Malformed("magic"));
    }
    let (head, payload) = bytes
        .split_at_checked(FRAME_HEADER_LEN)
        .ok_or(ConfError::Malformed("length"))?;
    let [_, _, _, _, version, kind, s0, s1, s2, s3, s4, s5, s6, s7] =
        <[u8; FRAME_HEADER_LEN]>::try_from(head).map_err(|_| ConfError::Malformed("length"))?;
    if version != FRAME_VERSION {
        return Err(ConfError::Malformed("version"));
    }
    if kind != KIND_HANDSHAKE && kind != KIND_RECORD {
        return Err(ConfError::Malformed("kind"));
    }
    Ok(Frame {
        kind,
        sid: SessionId([s0, s1, s2, s3, s4, s5, s6, s7]),
        payload,
    })
}

fn frame_header(kind: u8, sid: SessionId, extra: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEADER_LEN + extra);
    f.extend_from_slice(&FRAME_MAGIC);
    f.push(FRAME_VERSION);
    f.push(kind);
    f.extend_from_slice(&sid.0);
    f
}

/// Splits a handshake payload into its ZRTP messages (bounded in size and number).
fn split_batch(payload: &[u8]) -> Result<Vec<&[u8]>, ConfError> {
    let mut r = Reader::new(payload);
    let mut msgs = Vec::new();
    while r.remaining() > 0 {
        if msgs.len() == MAX_HANDSHAKE_BATCH {
            return Err(ConfError::Malformed("too many handshake messages"));
        }
        let m = r
            .vec16()
            .map_err(|_| ConfError::Malformed("handshake message length"))?;
        if m.is_empty() || m.len() > MAX_HANDSHAKE_MESSAGE {
            return Err(ConfError::Malformed("handshake message length"));
        }
        msgs.push(m);
    }
    if msgs.is_empty() {
        return Err(ConfError::Malformed("empty handshake frame"));
    }
    Ok(msgs)
}

/// An established session's two directions.
struct Live {
    sid: SessionId,
    sealer: Sealer,
    opener: Opener,
}

/// A handshake in progress.
struct Running {
    sid: SessionId,
    ep: Endpoint,
    initiator: bool,
}

/// A responder endpoint kept after its session completed, to answer a retransmitted
/// Confirm2 (only with [`ConfidentialConfig::retransmit`]). Never persisted.
struct Finished {
    sid: SessionId,
    ep: Endpoint,
}

/// The confidential session of one (server, device) pair. See the module docs.
///
/// `Debug` shows ids and counters, never a key.
pub struct Confidential {
    side: Side,
    pairing: Pairing,
    config: ConfidentialConfig,
    zid: Zid,
    /// Key continuity with the peer (retained secrets rs1/rs2 and the session counter).
    cache: Option<PeerCache>,
    failures: u32,
    last_failure: u64,
    current: Option<Live>,
    previous: Option<(SessionId, Opener)>,
    running: Option<Running>,
    finished: Option<Finished>,
}

impl fmt::Debug for Confidential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confidential")
            .field("side", &self.side)
            .field("pairing", &self.pairing)
            .field("session", &self.current.as_ref().map(|l| l.sid))
            .field("sealer", &self.current.as_ref().map(|l| &l.sealer))
            .field("opener", &self.current.as_ref().map(|l| &l.opener))
            .field("handshake", &self.running.as_ref().map(|r| r.sid))
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Confidential {
    /// A fresh session object (no channel yet) for `side` of `pairing`.
    pub fn new<R: RngCore + CryptoRng>(
        side: Side,
        pairing: Pairing,
        config: ConfidentialConfig,
        rng: &mut R,
    ) -> Confidential {
        let mut z = [0u8; 12];
        rng.fill_bytes(&mut z);
        Confidential {
            side,
            pairing,
            config,
            zid: Zid(z),
            cache: None,
            failures: 0,
            last_failure: 0,
            current: None,
            previous: None,
            running: None,
            finished: None,
        }
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The pair.
    pub fn pairing(&self) -> &Pairing {
        &self.pairing
    }

    /// Whether a channel is established (seal and open work).
    pub fn is_established(&self) -> bool {
        self.current.is_some()
    }

    /// The established session's id.
    pub fn session(&self) -> Option<SessionId> {
        self.current.as_ref().map(|l| l.sid)
    }

    /// Whether a handshake is in progress.
    pub fn is_handshaking(&self) -> bool {
        self.running.is_some()
    }

    /// Records sealed in the current session (= the next record's sequence number).
    pub fn records_sealed(&self) -> Option<u64> {
        self.current.as_ref().map(|l| l.sealer.records_sent())
    }

    /// Records opened in the current session.
    pub fn records_opened(&self) -> Option<u64> {
        self.current.as_ref().map(|l| l.opener.records_received())
    }

    /// Sessions completed with the peer (key continuity counter).
    pub fn sessions(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.sessions)
    }

    /// Forgets the retained secrets (an operator's decision after the peer lost its state):
    /// the next handshake starts a new key-continuity chain. The channel stays as it is.
    pub fn reset_continuity(&mut self) -> StoreFirst<()> {
        self.cache = None;
        self.failures = 0;
        self.last_failure = 0;
        self.store(())
    }

    fn handshake_config(&self) -> Config {
        let mut c = Config::new(
            self.zid,
            Mode::Normal {
                verify_every: self.config.verify_every.max(1),
            },
        );
        c.verify_secret = self
            .config
            .verify_secret
            .as_ref()
            .map(|s| VerifySecret::new(s.to_vec()));
        c.allow_repair = self.config.allow_repair;
        // DH every session: forward secrecy for every rekey; the retained secret is still
        // mixed into s0 (key continuity).
        c.offer_preshared = false;
        c.handshake_timeout_ms = self.config.handshake_timeout_ms;
        c.retransmit = self.config.retransmit;
        c.lockout = self.config.lockout;
        c
    }

    /// The cache as the handshake sees it, with the lockout deadline from the failure count.
    fn peer_cache(&self) -> Option<PeerCache> {
        let locked = self
            .config
            .lockout
            .locked_until(self.failures, self.last_failure);
        match &self.cache {
            Some(c) => {
                let mut c = c.clone();
                c.locked_until = locked;
                Some(c)
            }
            None if locked.is_some() => Some(PeerCache {
                locked_until: locked,
                ..PeerCache::default()
            }),
            None => None,
        }
    }

    /// Starts a handshake as initiator: the first session, or a rekey (the current session
    /// stays in use until the new one is established). Replaces a handshake in progress.
    pub fn start<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<StoreFirst<Handled>, ConfError> {
        let mut sid = [0u8; 8];
        rng.fill_bytes(&mut sid);
        let sid = SessionId(sid);
        let ep = Endpoint::initiator(
            self.handshake_config(),
            PeerLookup::Given(self.peer_cache()),
            now_ms,
            now_ms / 1000,
            rng,
        )
        .map_err(|e| ConfError::Start(e.to_string()))?;
        self.running = Some(Running {
            sid,
            ep,
            initiator: true,
        });
        let mut h = Handled::default();
        self.drive(now_ms, rng, &mut h, Ok(()));
        Ok(self.store(h))
    }

    /// Handles a frame the peer sent in a C2 Generic message (already verified and
    /// admitted by the C2 engine). `Err`: refused, nothing changed.
    pub fn handle_frame<R: RngCore + CryptoRng>(
        &mut self,
        frame: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<StoreFirst<Handled>, ConfError> {
        let f = parse_frame(frame)?;
        if f.kind != KIND_HANDSHAKE {
            return Err(ConfError::Malformed("not a handshake frame"));
        }
        let msgs = split_batch(f.payload)?;
        let mut h = Handled::default();

        // A retransmitted Confirm2 for a session this side completed as responder.
        if let Some(fin) = self.finished.as_mut().filter(|x| x.sid == f.sid) {
            for m in &msgs {
                // The endpoint is done; it answers retransmissions or ignores the rest.
                let _ = fin.ep.handle_message(m, now_ms, rng);
            }
            h.frames.extend(batch(f.sid, &mut fin.ep));
            return Ok(self.store(h));
        }

        let ours = self.running.as_ref().is_some_and(|r| r.sid == f.sid);
        if !ours {
            let is_hello = msgs
                .first()
                .is_some_and(|m| peek_type(m).ok() == Some(ZrtpType::Hello));
            if !is_hello {
                return Err(ConfError::UnexpectedHandshake);
            }
            // Contention: both sides started. The server's handshake wins.
            if self.side == Side::Server && self.running.as_ref().is_some_and(|r| r.initiator) {
                return Err(ConfError::Contention);
            }
            let ep = Endpoint::responder(self.handshake_config(), now_ms, now_ms / 1000, rng);
            self.running = Some(Running {
                sid: f.sid,
                ep,
                initiator: false,
            });
        }
        let mut result = Ok(());
        for m in &msgs {
            let Some(run) = self.running.as_mut().filter(|r| r.sid == f.sid) else {
                break;
            };
            result = run.ep.handle_message(m, now_ms, rng);
            if result.is_err() {
                break;
            }
            // Handle this message's events before the next one (a cache lookup must be
            // answered before the endpoint can take the next message).
            result = self.step_events(now_ms, rng, &mut h);
            if result.is_err() {
                break;
            }
        }
        self.drive(now_ms, rng, &mut h, result);
        Ok(self.store(h))
    }

    /// The next time [`Confidential::handle_timeout`] must be called, if a handshake runs.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.running.as_ref().and_then(|r| r.ep.poll_timeout())
    }

    /// Drives retransmissions and the handshake deadline.
    pub fn handle_timeout<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> StoreFirst<Handled> {
        let mut h = Handled::default();
        let r = match self.running.as_mut() {
            Some(run) => run.ep.handle_timeout(now_ms),
            None => Ok(()),
        };
        self.drive(now_ms, rng, &mut h, r);
        self.store(h)
    }

    /// Handles the endpoint's events (cache lookups, verification accounting, completion).
    fn step_events<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
        h: &mut Handled,
    ) -> Result<(), keav_proto::Error> {
        loop {
            let Some(run) = self.running.as_mut() else {
                return Ok(());
            };
            let Some(ev) = run.ep.poll_event() else {
                return Ok(());
            };
            match ev {
                Event::NeedPeerCache { .. } => {
                    // One peer per object: its cache is ours whatever ZID it presents.
                    let cache = self.peer_cache();
                    if let Some(run) = self.running.as_mut() {
                        run.ep.provide_peer_cache(cache, now_ms, rng)?;
                    }
                }
                Event::VerificationStarting { .. } => {
                    let unix = now_ms / 1000;
                    if let Some(until) = self
                        .config
                        .lockout
                        .locked_until(self.failures, self.last_failure)
                    {
                        if unix < until {
                            let e = keav_proto::Error::LockedOut { until };
                            if let Some(run) = self.running.as_mut() {
                                return Err(run.ep.abort(e));
                            }
                        }
                    }
                    // Counted now, cleared when the session completes (persisted with the
                    // frames this call returns, before they are sent).
                    self.failures = self.failures.saturating_add(1);
                    self.last_failure = unix;
                }
                Event::Established(o) => self.established(*o, now_ms, h),
                _ => {}
            }
        }
    }

    fn established(&mut self, o: SessionOutcome, now_ms: u64, h: &mut Handled) {
        let Some(run) = self.running.take() else {
            return;
        };
        let sid = run.sid;
        let Some(aead) = o.channel_aead else {
            // Cannot happen with require_keav; treat as a failed handshake.
            h.events.push(ConfEvent::Failed {
                session: sid,
                error: keav_proto::Error::Downgrade("no channel AEAD negotiated"),
            });
            return;
        };
        let key = o.export(CHANNEL_LABEL, 256);
        let Some(key) = Secret32::from_slice(key.expose()) else {
            return;
        };
        let ctx = self.pairing.context(&o.kdf_context, sid);
        let (sealer, opener) =
            channel_from_parts(&key, &ctx, o.role, aead, self.config.ratchet, now_ms);
        if let Some(u) = &o.cache_update {
            self.cache = Some(PeerCache {
                rs1: Some(u.rs1.clone()),
                rs2: u.rs2.clone(),
                expires_at: u.expires_at,
                sessions: u.sessions,
                verify_due: false,
                locked_until: None,
            });
        }
        self.failures = 0;
        self.last_failure = 0;
        let rekey = self.current.is_some();
        if let Some(old) = self.current.take() {
            self.previous = Some((old.sid, old.opener));
        }
        self.current = Some(Live {
            sid,
            sealer,
            opener,
        });
        if !run.initiator && self.config.retransmit {
            self.finished = Some(Finished { sid, ep: run.ep });
        } else {
            self.finished = None;
            // The responder's Conf2ACK is still queued in its endpoint: take it now.
            let mut ep = run.ep;
            h.frames.extend(batch(sid, &mut ep));
        }
        h.events.push(ConfEvent::Established {
            session: sid,
            rekey,
            key_agreement: o.key_agreement,
            verification: o.verification,
            cache_matched: o.cache_matched,
        });
    }

    /// After a step: handle events, collect outgoing frames, or record the failure.
    fn drive<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
        h: &mut Handled,
        result: Result<(), keav_proto::Error>,
    ) {
        let result = result.and_then(|()| self.step_events(now_ms, rng, h));
        if let Some(fin) = self.finished.as_mut() {
            let sid = fin.sid;
            h.frames.extend(batch(sid, &mut fin.ep));
        }
        match result {
            Ok(()) => {
                if let Some(run) = self.running.as_mut() {
                    let sid = run.sid;
                    h.frames.extend(batch(sid, &mut run.ep));
                }
            }
            Err(error) => {
                if let Some(mut run) = self.running.take() {
                    let sid = run.sid;
                    // The endpoint queued an RFC 6189 Error message for the peer.
                    h.frames.extend(batch(sid, &mut run.ep));
                    // A failed equality test stays counted (it was counted when it
                    // started); only a completed session clears the count.
                    tracing::warn!(error = %error, "confidential handshake failed");
                    h.events.push(ConfEvent::Failed {
                        session: sid,
                        error,
                    });
                }
            }
        }
    }

    /// Seals `plaintext` (at most one record, [`MAX_PLAINTEXT`] bytes) into a record frame
    /// for a Data value or a Generic body.
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        now_ms: u64,
    ) -> Result<StoreFirst<Vec<u8>>, ConfError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(ConfError::TooLong(plaintext.len()));
        }
        let live = self.current.as_mut().ok_or(ConfError::NoSession)?;
        let mut frame = frame_header(KIND_RECORD, live.sid, plaintext.len() + 29);
        live.sealer
            .seal(plaintext, now_ms, &mut frame)
            .map_err(ConfError::Record)?;
        Ok(self.store(frame))
    }

    /// Opens a record frame from the peer. `Err`: refused (forged, damaged, replayed, for no
    /// known session), nothing changed.
    pub fn open(
        &mut self,
        frame: &[u8],
        now_ms: u64,
    ) -> Result<StoreFirst<Zeroizing<Vec<u8>>>, ConfError> {
        let f = parse_frame(frame)?;
        if f.kind != KIND_RECORD {
            return Err(ConfError::Malformed("not a record frame"));
        }
        let opener = match (&mut self.current, &mut self.previous) {
            (Some(l), _) if l.sid == f.sid => &mut l.opener,
            (_, Some((sid, o))) if *sid == f.sid => o,
            _ => return Err(ConfError::NoSession),
        };
        let mut buf = Zeroizing::new(f.payload.to_vec());
        let pt = match opener.open(&mut buf, now_ms).map_err(ConfError::Record)? {
            Opened::Data(pt) => Zeroizing::new(pt.to_vec()),
            // This module never sends a close; a peer that does ends its direction.
            Opened::Close => return Err(ConfError::Record(RecordError::Closed)),
        };
        Ok(self.store(pt))
    }

    /// Seals a whole [`Data`] (id and typed value): the result is a Data with id
    /// [`SEALED_DATA_ID`] whose bytes are the record frame, so neither the real id nor the
    /// value is visible on the wire.
    pub fn seal_data(&mut self, data: &Data, now_ms: u64) -> Result<StoreFirst<Data>, ConfError> {
        let mut inner = Zeroizing::new(Vec::new());
        data.encode(&mut inner)
            .map_err(|_| ConfError::TooLong(MAX_PLAINTEXT + 1))?;
        let s = self.seal(&inner, now_ms)?;
        Ok(StoreFirst {
            state: s.state,
            value: Data {
                id: SEALED_DATA_ID.to_string(),
                value: Value::Bytes(s.value),
            },
        })
    }

    /// Opens a sealed [`Data`] ([`is_sealed`]) and decodes the Data inside. If the record
    /// is authentic but its content does not decode ([`ConfError::BadInner`], a peer that
    /// sealed garbage), the record is consumed: the opener's window has marked it.
    pub fn open_data(&mut self, data: &Data, now_ms: u64) -> Result<StoreFirst<Data>, ConfError> {
        if data.id != SEALED_DATA_ID {
            return Err(ConfError::Malformed("not a sealed data id"));
        }
        let Value::Bytes(frame) = &data.value else {
            return Err(ConfError::Malformed("not a sealed data value"));
        };
        let s = self.open(frame, now_ms)?;
        let inner = decode_data(&s.value)?;
        Ok(StoreFirst {
            state: s.state,
            value: inner,
        })
    }

    // ---- persistence ----

    fn store<T>(&self, value: T) -> StoreFirst<T> {
        StoreFirst {
            state: self.export_state(),
            value,
        }
    }

    /// The state to persist: pair, ZID, key-continuity cache, failure count, and the
    /// current (and previous) session's record-layer states. A handshake in progress is not
    /// part of it (after a restart, start again). The bytes are secret.
    pub fn export_state(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(512));
        out.extend_from_slice(STATE_MAGIC);
        out.push(STATE_VERSION);
        out.push(match self.side {
            Side::Server => 0,
            Side::Device => 1,
        });
        out.extend_from_slice(&self.pairing.server_fp);
        out.extend_from_slice(&self.pairing.device_fp);
        out.extend_from_slice(&self.zid.0);
        out.extend_from_slice(&self.failures.to_be_bytes());
        out.extend_from_slice(&self.last_failure.to_be_bytes());
        match &self.cache {
            None => out.push(0),
            Some(c) => {
                let flags = 1
                    | (u8::from(c.rs1.is_some()) << 1)
                    | (u8::from(c.rs2.is_some()) << 2)
                    | (u8::from(c.expires_at.is_some()) << 3)
                    | (u8::from(c.verify_due) << 4);
                out.push(flags);
                for s in [&c.rs1, &c.rs2].into_iter().flatten() {
                    out.extend_from_slice(s.expose());
                }
                if let Some(t) = c.expires_at {
                    out.extend_from_slice(&t.to_be_bytes());
                }
                out.extend_from_slice(&c.sessions.to_be_bytes());
            }
        }
        let live = self
            .current
            .as_ref()
            .and_then(|l| Some((l.sid, l.sealer.export_state()?, l.opener.export_state()?)));
        match live {
            None => out.push(0),
            Some((sid, s, o)) => {
                out.push(1);
                out.extend_from_slice(&sid.0);
                put16(&mut out, &s.encode());
                put16(&mut out, &o.encode());
            }
        }
        let prev = self
            .previous
            .as_ref()
            .and_then(|(sid, o)| Some((*sid, o.export_state()?)));
        match prev {
            None => out.push(0),
            Some((sid, o)) => {
                out.push(1);
                out.extend_from_slice(&sid.0);
                put16(&mut out, &o.encode());
            }
        }
        let sum = checksum(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Restores a session object from [`Confidential::export_state`]'s bytes. `side` and
    /// `pairing` must be the ones it was created with ([`ConfError::State`] otherwise).
    pub fn from_state(
        bytes: &[u8],
        side: Side,
        pairing: Pairing,
        config: ConfidentialConfig,
        now_ms: u64,
    ) -> Result<Confidential, ConfError> {
        let body_len = bytes
            .len()
            .checked_sub(CHECKSUM_LEN)
            .ok_or(ConfError::State("length"))?;
        let (body, sum) = bytes.split_at(body_len);
        if checksum(body) != sum {
            return Err(ConfError::State("checksum"));
        }
        let bad = |_| ConfError::State("truncated");
        let mut r = Reader::new(body);
        if r.array::<4>().map_err(bad)? != *STATE_MAGIC {
            return Err(ConfError::State("magic"));
        }
        let v = r.u8().map_err(bad)?;
        if v != STATE_VERSION {
            return Err(ConfError::UnknownStateVersion(v));
        }
        let stored_side = match r.u8().map_err(bad)? {
            0 => Side::Server,
            1 => Side::Device,
            _ => return Err(ConfError::State("side")),
        };
        if stored_side != side {
            return Err(ConfError::State("side"));
        }
        let sfp: [u8; 32] = r.array().map_err(bad)?;
        let dfp: [u8; 32] = r.array().map_err(bad)?;
        if sfp != pairing.server_fp || dfp != pairing.device_fp {
            return Err(ConfError::State("another pairing"));
        }
        let zid = Zid(r.array().map_err(bad)?);
        let failures = r.u32().map_err(bad)?;
        let last_failure = r.u64().map_err(bad)?;
        let flags = r.u8().map_err(bad)?;
        let cache = if flags == 0 {
            None
        } else {
            if flags & !0x1f != 0 || flags & 1 == 0 {
                return Err(ConfError::State("cache flags"));
            }
            let mut secret = |bit: u8| -> Result<Option<Secret32>, ConfError> {
                if flags & bit == 0 {
                    return Ok(None);
                }
                Ok(Some(Secret32::new(r.array().map_err(bad)?)))
            };
            let rs1 = secret(1 << 1)?;
            let rs2 = secret(1 << 2)?;
            let expires_at = if flags & (1 << 3) != 0 {
                Some(r.u64().map_err(bad)?)
            } else {
                None
            };
            Some(PeerCache {
                rs1,
                rs2,
                expires_at,
                sessions: r.u64().map_err(bad)?,
                verify_due: flags & (1 << 4) != 0,
                locked_until: None,
            })
        };
        let current = match r.u8().map_err(bad)? {
            0 => None,
            1 => {
                let sid = SessionId(r.array().map_err(bad)?);
                let s = SealerState::decode(r.vec16().map_err(bad)?).map_err(state_err)?;
                let o = OpenerState::decode(r.vec16().map_err(bad)?).map_err(state_err)?;
                Some(Live {
                    sid,
                    sealer: Sealer::from_state(&s, now_ms).map_err(state_err)?,
                    opener: Opener::from_state(&o, now_ms).map_err(state_err)?,
                })
            }
            _ => return Err(ConfError::State("session flag")),
        };
        let previous = match r.u8().map_err(bad)? {
            0 => None,
            1 => {
                let sid = SessionId(r.array().map_err(bad)?);
                let o = OpenerState::decode(r.vec16().map_err(bad)?).map_err(state_err)?;
                Some((sid, Opener::from_state(&o, now_ms).map_err(state_err)?))
            }
            _ => return Err(ConfError::State("previous flag")),
        };
        if r.remaining() != 0 {
            return Err(ConfError::State("trailing bytes"));
        }
        Ok(Confidential {
            side,
            pairing,
            config,
            zid,
            cache,
            failures,
            last_failure,
            current,
            previous,
            running: None,
            finished: None,
        })
    }
}

const STATE_MAGIC: &[u8; 4] = b"KVCS";
const STATE_VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 8;

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let d = Sha256::digest(bytes);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&d[..CHECKSUM_LEN]);
    out
}

fn state_err(_: RecordError) -> ConfError {
    ConfError::State("record-layer state")
}

fn put16(out: &mut Vec<u8>, b: &[u8]) {
    // Record-layer states are a few hundred bytes (KDF context at most 256).
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b.get(..usize::from(n)).unwrap_or_default());
}

/// Drains the endpoint's outgoing messages into one handshake frame (none if empty).
fn batch(sid: SessionId, ep: &mut Endpoint) -> Option<Vec<u8>> {
    let msgs: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit()).collect();
    if msgs.is_empty() {
        return None;
    }
    let len: usize = msgs.iter().map(|m| m.len() + 2).sum();
    let mut f = frame_header(KIND_HANDSHAKE, sid, len);
    for m in msgs {
        put16(&mut f, &m);
    }
    Some(f)
}

fn decode_data(bytes: &[u8]) -> Result<Data, ConfError> {
    let mut r = Reader::new(bytes);
    let d = Data::decode(&mut r).map_err(|_| ConfError::BadInner)?;
    r.expect_end().map_err(|_| ConfError::BadInner)?;
    Ok(d)
}
