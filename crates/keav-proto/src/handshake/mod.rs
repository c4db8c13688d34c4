//! The KEAV handshake: RFC 6189 DH and preshared modes, plus the autonomous verification step.
//!
//! [`Endpoint`] is a sans-IO state machine in the style of quinn-proto: it never reads a clock
//! or touches a socket. The driver feeds it bare ZRTP messages and the current time, and drains
//! outgoing messages, timer deadlines and events.
//!
//! # Call order
//!
//! 1. Create the endpoint with [`Endpoint::initiator`] (the side that connects and sends
//!    Commit) or [`Endpoint::responder`] (the side that waits; it sends its Hello only after
//!    it has seen the peer's Hello and its cache, so that its Hello can ask for verification).
//! 2. Loop:
//!    - send everything [`Endpoint::poll_transmit`] returns;
//!    - handle every [`Endpoint::poll_event`]:
//!      [`Event::NeedPeerCache`] → look the peer up (by ZID, or in paranoid mode by the
//!      retained-secret ID hint) and call [`Endpoint::provide_peer_cache`];
//!      [`Event::Established`] → persist [`SessionOutcome::cache_update`] durably *before*
//!      sending what `poll_transmit` returns next (the responder's Conf2ACK), then use the keys;
//!    - wait until a message arrives ([`Endpoint::handle_message`]) or the deadline from
//!      [`Endpoint::poll_timeout`] passes ([`Endpoint::handle_timeout`]).
//! 3. Any `Err` is final: the endpoint is failed, no key was released, and an RFC 6189 Error
//!    message with a coarse code has been queued for the peer. If
//!    [`Error::counts_toward_lockout`] is true the driver records a verification failure.
//!
//! # Verification placement
//!
//! Each side decides whether this session needs the equality test: its own mode policy, the
//! peer's request (`KVRQ` in the peer's Hello) and the absence of a shared retained secret
//! (which both sides detect identically from the DHPart rs IDs). The initiator sends the first
//! verification message in the same flight as DHPart2; the responder answers and, once it holds
//! the result, sends Confirm1 in the same flight — so CPace adds no round trip and SMP one.
//! A CPace key is mixed into s0 before the Confirm keys are derived, so the Confirm MACs also
//! confirm the verification.

pub mod timer;

use std::collections::VecDeque;

use rand_core::{CryptoRng, RngCore};

use crate::cache::{CacheUpdate, Mode, PeerCache, Verification, Zid};
use crate::crypto::{self, HashChain, RsRole, SessionKeys, X25519KeyPair};
use crate::error::{AuthFailure, Error};
use crate::msg::{
    self, AlgoId, Commit, CommitBody, Confirm, ConfirmBody, ConfirmFlags, DhPart, ErrorMsg, Hello,
    KVerify, Message, MessageType,
};
use crate::sas::SasType;
use crate::secret::Secret32;
use keav_verify::{Backend, Binding, Verifier, VerifySecret};
use timer::{Retransmit, Schedule};

/// ZRTP protocol version this implementation speaks.
pub const ZRTP_VERSION: [u8; 4] = *b"1.10";
/// Client identifier sent in Hello.
pub const CLIENT_ID: [u8; 16] = *b"keav 0.1        ";
/// Cache expiration interval meaning "never expires".
pub const CACHE_FOREVER: u32 = u32::MAX;
const MAX_EARLY: usize = 4;
const MAX_SEEN: usize = 32;

/// The ZRTP role of this endpoint in the current exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends Commit, DHPart2, Confirm2.
    Initiator,
    /// Sends DHPart1, Confirm1, Conf2ACK.
    Responder,
}

/// How the session's keys were agreed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAgreement {
    /// A fresh X25519 exchange (DHPart1/DHPart2).
    Dh,
    /// RFC 6189 preshared mode from the retained secret rs1 (no DH).
    Preshared,
}

impl KeyAgreement {
    /// Stable lowercase name.
    pub fn name(&self) -> &'static str {
        match self {
            KeyAgreement::Dh => "dh",
            KeyAgreement::Preshared => "preshared",
        }
    }
}

/// Handshake settings of one device.
pub struct Config {
    /// This device's ZID (ignored in paranoid mode, where a fresh one is drawn per session).
    pub zid: Zid,
    /// Key-continuity mode.
    pub mode: Mode,
    /// Equality-test backends in order of preference (offered in Hello).
    pub backends: Vec<Backend>,
    /// The verification secret (pairing code, keyset key) shared with the peer, if any.
    /// Without one, verification still runs where the mode asks, but is reported *unbound*.
    pub verify_secret: Option<VerifySecret>,
    /// Refuse peers that do not offer KEAV verification (default). Turn off only to talk to
    /// plain ZRTP peers, whose SAS must then be compared by a person.
    pub require_keav: bool,
    /// Accept a cache mismatch repaired only by an *unbound* test (trust-on-first-use
    /// re-pairing). Off by default: a mismatch needs a bound test.
    pub allow_repair: bool,
    /// Cache expiration interval announced in Confirm, seconds ([`CACHE_FOREVER`] = never).
    pub cache_expiry_secs: u32,
    /// SAS rendering schemes in order of preference.
    pub sas_types: Vec<SasType>,
    /// Offer and use preshared mode in `normal` mode (default true).
    pub offer_preshared: bool,
    /// Whole-handshake deadline in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Multiplier applied to the T1/T2 retransmission intervals (high-latency links).
    pub timer_scale: u64,
    /// Retransmit unanswered messages on the RFC 6189 T1/T2 schedules (default true). Turn
    /// off on reliable transports (TCP and other byte streams), where a resend can only
    /// duplicate bytes already in flight; the handshake deadline still applies.
    pub retransmit: bool,
    /// Attempt limits, used to refuse a locked-out peer before any public-key work.
    pub lockout: crate::cache::LockoutPolicy,
    /// AEADs for the secure channel, in order of preference (advertised in Hello's cipher
    /// list; the initiator's first choice that the responder also offers wins).
    pub channel_aeads: Vec<crate::record::Aead>,
}

impl Config {
    /// Defaults for a device with this ZID in `mode`: CPace then SMP, no secret, KEAV required.
    pub fn new(zid: Zid, mode: Mode) -> Self {
        Self {
            zid,
            mode,
            backends: vec![Backend::CPace, Backend::Smp],
            verify_secret: None,
            require_keav: true,
            allow_repair: false,
            cache_expiry_secs: CACHE_FOREVER,
            sas_types: vec![SasType::B32, SasType::B256],
            offer_preshared: true,
            handshake_timeout_ms: 30_000,
            timer_scale: 1,
            retransmit: true,
            lockout: crate::cache::LockoutPolicy::default(),
            channel_aeads: crate::record::Aead::local_preference().to_vec(),
        }
    }
}

impl core::fmt::Debug for Config {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Config")
            .field("zid", &self.zid)
            .field("mode", &self.mode)
            .field("backends", &self.backends)
            .field(
                "verify_secret",
                &self.verify_secret.as_ref().map(|_| "<set>"),
            )
            .field("require_keav", &self.require_keav)
            .field("allow_repair", &self.allow_repair)
            .finish_non_exhaustive()
    }
}

/// How the initiator knows its peer's cache.
#[derive(Debug)]
pub enum PeerLookup {
    /// Ask with [`Event::NeedPeerCache`] once the peer's Hello (and ZID) is known.
    AtHello,
    /// Known in advance (the driver looked the peer up by a local label). `None` = new peer.
    Given(Option<PeerCache>),
}

/// Something the driver must act on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// This side is starting the equality test. From here on the peer may learn whether one
    /// guess of the verification secret was right, so the driver must durably count one
    /// attempt *before* sending anything [`Endpoint::poll_transmit`] returns next, and call
    /// [`Endpoint::abort`] if the peer (or the device) is locked out. A session that completes
    /// clears the count.
    VerificationStarting {
        /// The equality test that is starting.
        backend: Backend,
    },
    /// Look up the peer's cache and call [`Endpoint::provide_peer_cache`].
    NeedPeerCache {
        /// The ZID in the peer's Hello (normal and no-continuity modes look up by this).
        zid: Zid,
        /// Paranoid mode: the peer's retained-secret ID (rs1IDi), to look the cache up by.
        rs_id_hint: Option<[u8; 8]>,
    },
    /// The handshake completed; keys are released.
    Established(Box<SessionOutcome>),
}

/// Everything a completed session yields.
#[derive(Debug)]
pub struct SessionOutcome {
    /// Our role in the exchange that completed.
    pub role: Role,
    /// Our ZID in this session.
    pub local_zid: Zid,
    /// The peer's ZID in this session.
    pub peer_zid: Zid,
    /// The mode this device ran.
    pub mode: Mode,
    /// DH or preshared.
    pub key_agreement: KeyAgreement,
    /// What the equality test did.
    pub verification: Verification,
    /// Which equality test ran, if any.
    pub backend: Option<Backend>,
    /// The rendered SAS (for logs, or a person when the peer is plain ZRTP).
    pub sas: String,
    /// The SAS rendering used.
    pub sas_type: SasType,
    /// The session number with this peer as this device counts it (1 = first).
    pub session_number: u64,
    /// A retained secret matched (key continuity held).
    pub cache_matched: bool,
    /// We expected a match and none occurred (RFC 6189 §4.3.2).
    pub cache_mismatch: bool,
    /// The ZRTP exported key (RFC 6189 §4.5.2), with the CPace key mixed in when CPace ran.
    pub exported_key: Secret32,
    /// What to persist. `None` = leave the cache as it is (no-continuity mode, or a mismatch
    /// with a plain ZRTP peer whose SAS has not been verified).
    pub cache_update: Option<CacheUpdate>,
    /// RFC 6189 KDF_Context of this session (ZIDi || ZIDr || total_hash); not secret.
    pub kdf_context: Vec<u8>,
    /// The AEAD negotiated for the secure channel (`None` with a plain ZRTP peer).
    pub channel_aead: Option<crate::record::Aead>,
}

impl SessionOutcome {
    /// Derives an application key from the exported key:
    /// `KDF(exported_key, label, KDF_Context, bits)` (what bzrtp's `bzrtp_exportKey` does).
    pub fn export(&self, label: &[u8], bits: u32) -> crate::secret::SecretBytes {
        crate::secret::SecretBytes::new(crypto::kdf(
            self.exported_key.expose(),
            label,
            &self.kdf_context,
            bits,
        ))
    }
}

#[derive(Debug)]
struct PeerHello {
    bytes: Vec<u8>,
    msg: Hello,
    mac_checked: bool,
}

/// Negotiated algorithms.
#[derive(Clone, Copy, Debug)]
struct Choice {
    auth_tag: AlgoId,
    sas: AlgoId,
    preshared: bool,
}

/// Post-s0 state, shared by both roles.
struct Keyed {
    ka: KeyAgreement,
    ctx: Vec<u8>,
    s0: Secret32,
    base: SessionKeys,
    final_keys: Option<SessionKeys>,
    vmac_i: Secret32,
    vmac_r: Secret32,
    verifier: Option<Verifier>,
    backend: Option<Backend>,
    demanded: bool,
    next_step: u8,
    last_v_mine: Option<Vec<u8>>,
    matched: bool,
    mismatch: bool,
    /// Bytes of the peer message whose MAC is keyed by the peer's H0 (DHPart1/DHPart2), or by
    /// its H1 in preshared mode (Commit), checked when Confirm reveals H0.
    peer_deferred: Vec<u8>,
    peer_deferred_type: MessageType,
    /// DH: the peer's revealed H1. Preshared responder: the initiator's H2 from Commit.
    peer_link: [u8; 32],
    sas_type: SasType,
    peer_expiry: Option<u32>,
    confirm1_sent: bool,
}

impl Keyed {
    fn keys(&self) -> &SessionKeys {
        self.final_keys.as_ref().unwrap_or(&self.base)
    }
}

enum State {
    /// Waiting for the peer's Hello.
    AwaitHello,
    /// Waiting for the driver's cache lookup.
    AwaitCache,
    /// Responder: Hello sent, waiting for Commit.
    AwaitCommit,
    /// Initiator: Commit sent.
    CommitSent(Box<CommitSent>),
    /// Responder: DHPart1 sent, waiting for DHPart2.
    DhPart1Sent(Box<DhPart1Sent>),
    /// Both: keys agreed; verification (if any) and the Confirm exchange run.
    Keyed(Box<Keyed>),
    /// Initiator: Confirm2 sent, waiting for Conf2ACK.
    Confirm2Sent(Box<Option<SessionOutcome>>),
    /// Completed (responder keeps answering Confirm2 retransmissions).
    Done,
    /// Failed; every further call returns an error.
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitHello => "AwaitHello",
            State::AwaitCache => "AwaitCache",
            State::AwaitCommit => "AwaitCommit",
            State::CommitSent(_) => "CommitSent",
            State::DhPart1Sent(_) => "DhPart1Sent",
            State::Keyed(_) => "Keyed",
            State::Confirm2Sent(_) => "Confirm2Sent",
            State::Done => "Done",
            State::Failed => "Failed",
        }
    }
}

struct CommitSent {
    choice: Choice,
    commit: Vec<u8>,
    /// DH mode: our key pair and the DHPart2 we committed to.
    dh: Option<(X25519KeyPair, Vec<u8>)>,
    /// Preshared mode: the preshared key.
    psk: Option<Secret32>,
}

struct DhPart1Sent {
    choice: Choice,
    commit: Vec<u8>,
    commit_h2: [u8; 32],
    hvi: [u8; 32],
    dhpart1: Vec<u8>,
    keypair: X25519KeyPair,
}

/// A sans-IO KEAV handshake endpoint. See the module documentation for the call order.
pub struct Endpoint {
    cfg: Config,
    role: Role,
    zid: Zid,
    chain: HashChain,
    hello: Vec<u8>,
    hello_sent: bool,
    kvrq_sent: bool,
    unix_now: u64,
    deadline_ms: u64,
    peer: Option<PeerHello>,
    cache: Option<Option<PeerCache>>,
    state: State,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    flight: Vec<Vec<u8>>,
    retransmit: Option<Retransmit>,
    hello_timer: Option<Retransmit>,
    seen: VecDeque<[u8; 32]>,
    last_rx: Option<[u8; 32]>,
    last_response: Vec<Vec<u8>>,
    early: Vec<Vec<u8>>,
    error_sent: bool,
    /// An equality test started and has not finished yet.
    verifying: bool,
}

impl core::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Endpoint")
            .field("role", &self.role)
            .field("zid", &self.zid)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An initiator: sends Hello now and Commit once it has the peer's Hello and cache.
    /// `now_ms` is a monotonic millisecond clock, `unix_now` wall-clock seconds (cache expiry
    /// and lockout).
    pub fn initiator<R: RngCore + CryptoRng>(
        cfg: Config,
        lookup: PeerLookup,
        now_ms: u64,
        unix_now: u64,
        rng: &mut R,
    ) -> Result<Self, Error> {
        let cache = match lookup {
            PeerLookup::AtHello => None,
            PeerLookup::Given(c) => Some(c),
        };
        let mut ep = Self::new(cfg, Role::Initiator, cache, now_ms, unix_now, rng);
        if let Some(Some(c)) = &ep.cache {
            ep.check_lockout(c)?;
        }
        let demand = ep.cache.as_ref().map(|c| ep.policy_demands(c.as_ref()));
        ep.send_hello(demand.unwrap_or(false), now_ms)?;
        Ok(ep)
    }

    /// A responder: waits for the peer's Hello.
    pub fn responder<R: RngCore + CryptoRng>(
        cfg: Config,
        now_ms: u64,
        unix_now: u64,
        rng: &mut R,
    ) -> Self {
        Self::new(cfg, Role::Responder, None, now_ms, unix_now, rng)
    }

    fn new<R: RngCore + CryptoRng>(
        cfg: Config,
        role: Role,
        cache: Option<Option<PeerCache>>,
        now_ms: u64,
        unix_now: u64,
        rng: &mut R,
    ) -> Self {
        let zid = match cfg.mode {
            Mode::Paranoid => {
                let mut z = [0u8; 12];
                rng.fill_bytes(&mut z);
                // The initiator's paranoid ZID starts with its rs1IDi so that the responder
                // can find its cache by retained-secret ID; the rest stays random.
                if let Some(Some(c)) = &cache {
                    if let (Some(rs1), _) = c.live_secrets(unix_now) {
                        let id = crypto::rs_id(rs1, b"Initiator");
                        z[..8].copy_from_slice(&id);
                    }
                }
                Zid(z)
            }
            _ => cfg.zid,
        };
        let deadline_ms = now_ms.saturating_add(cfg.handshake_timeout_ms);
        Self {
            role,
            zid,
            chain: HashChain::generate(rng),
            hello: Vec::new(),
            hello_sent: false,
            kvrq_sent: false,
            unix_now,
            deadline_ms,
            peer: None,
            cache,
            state: State::AwaitHello,
            out: VecDeque::new(),
            events: VecDeque::new(),
            flight: Vec::new(),
            retransmit: None,
            hello_timer: None,
            seen: VecDeque::new(),
            last_rx: None,
            last_response: Vec::new(),
            early: Vec::new(),
            error_sent: false,
            verifying: false,
            cfg,
        }
    }

    /// Our current role (an initiator can become responder through commit contention).
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our ZID in this session.
    pub fn zid(&self) -> Zid {
        self.zid
    }

    /// Whether the handshake completed.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the handshake failed.
    pub fn is_failed(&self) -> bool {
        matches!(self.state, State::Failed)
    }

    /// Next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time at which [`Endpoint::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        if matches!(self.state, State::Done | State::Failed) {
            return None;
        }
        let mut t = self.deadline_ms;
        if let Some(r) = &self.retransmit {
            t = t.min(r.deadline());
        }
        if let Some(r) = &self.hello_timer {
            t = t.min(r.deadline());
        }
        Some(t)
    }

    /// Drives retransmissions and the handshake deadline.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Result<(), Error> {
        if matches!(self.state, State::Done) {
            return Ok(());
        }
        if matches!(self.state, State::Failed) {
            return Err(Error::Misuse("handshake already failed"));
        }
        if now_ms >= self.deadline_ms {
            let e = match &self.state {
                State::Keyed(k)
                    if self.role == Role::Responder && k.demanded && k.verifier.is_none() =>
                {
                    Error::Downgrade("peer did not run the required verification")
                }
                _ => Error::Timeout,
            };
            return Err(self.fail(e));
        }
        if let Some(t) = &mut self.hello_timer {
            match t.fire(now_ms) {
                Some(true) => self.out.push_back(self.hello.clone()),
                Some(false) => {}
                // RFC 6189 §6: after the Hello schedule, a late Commit is still accepted;
                // the overall deadline ends the attempt.
                None => self.hello_timer = None,
            }
        }
        if let Some(t) = &mut self.retransmit {
            match t.fire(now_ms) {
                Some(true) => self.out.extend(self.flight.iter().cloned()),
                Some(false) => {}
                None => return Err(self.fail(Error::Timeout)),
            }
        }
        Ok(())
    }

    /// Ends the handshake on the driver's decision (e.g. the peer turned out to be locked out
    /// when [`Event::VerificationStarting`] was recorded). Messages not yet taken from
    /// [`Endpoint::poll_transmit`] are discarded; an Error message with the reason's coarse
    /// code is queued instead. Returns the error to report.
    pub fn abort(&mut self, reason: Error) -> Error {
        self.out.clear();
        self.fail(reason)
    }

    /// Supplies the peer's cache after [`Event::NeedPeerCache`]. `None` = unknown peer.
    pub fn provide_peer_cache<R: RngCore + CryptoRng>(
        &mut self,
        cache: Option<PeerCache>,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(), Error> {
        if !matches!(self.state, State::AwaitCache) {
            return Err(Error::Misuse("provide_peer_cache outside AwaitCache"));
        }
        if let Some(c) = &cache {
            if let Err(e) = self.check_lockout(c) {
                return Err(self.fail(e));
            }
        }
        self.cache = Some(cache);
        let r = self.after_cache(now_ms, rng);
        self.finish_step(r, now_ms, rng)
    }

    /// Handles one bare ZRTP message from the peer.
    pub fn handle_message<R: RngCore + CryptoRng>(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(), Error> {
        match self.state {
            State::Failed => return Err(Error::Misuse("handshake already failed")),
            State::Done if self.role == Role::Initiator => return Ok(()),
            _ => {}
        }
        let r = self.dispatch(bytes, now_ms, rng);
        self.finish_step(r, now_ms, rng)
    }

    fn finish_step<R: RngCore + CryptoRng>(
        &mut self,
        r: Result<Step, Error>,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(), Error> {
        match r {
            Err(e) => Err(self.fail(e)),
            Ok(Step::Advanced) => {
                // Retry buffered early messages now that the state moved on.
                let mut guard = 0;
                while !self.early.is_empty() && guard < 8 {
                    guard += 1;
                    let pending = core::mem::take(&mut self.early);
                    let mut progressed = false;
                    for m in pending {
                        match self.dispatch(&m, now_ms, rng) {
                            Ok(Step::Advanced) => progressed = true,
                            Ok(_) => {}
                            Err(e) => return Err(self.fail(e)),
                        }
                    }
                    if !progressed {
                        break;
                    }
                }
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        // A test that started and did not complete gave the peer one guess: say so, so that
        // the driver counts it toward lockout.
        let started = self.verifying;
        let e = match e {
            e @ (Error::Verification(_) | Error::VerificationAborted(_) | Error::Misuse(_)) => e,
            e if started => Error::VerificationAborted(Box::new(e)),
            e => e,
        };
        if !self.error_sent && !matches!(e, Error::PeerError(_) | Error::Misuse(_)) {
            self.error_sent = true;
            let msg = Message::Error(ErrorMsg {
                code: e.wire_code(),
            })
            .encode();
            self.out.push_back(msg);
        }
        self.state = State::Failed;
        self.retransmit = None;
        self.hello_timer = None;
        self.flight.clear();
        self.early.clear();
        e
    }

    fn check_lockout(&self, c: &PeerCache) -> Result<(), Error> {
        match c.locked_until {
            Some(until) if until > self.unix_now => Err(Error::LockedOut { until }),
            _ => Ok(()),
        }
    }

    /// Whether this device's mode asks for verification with a peer in this cache state.
    fn policy_demands(&self, cache: Option<&PeerCache>) -> bool {
        match self.cfg.mode {
            Mode::NoContinuity | Mode::Paranoid => true,
            Mode::Normal { verify_every } => match cache {
                None => true,
                Some(c) => {
                    c.live_secrets(self.unix_now).0.is_none()
                        || c.verify_due
                        || c.sessions % u64::from(verify_every.max(1)) == 0
                }
            },
        }
    }

    fn my_cache(&self) -> Option<&PeerCache> {
        self.cache.as_ref().and_then(|c| c.as_ref())
    }

    fn my_secrets(&self) -> (Option<&Secret32>, Option<&Secret32>) {
        if !self.cfg.mode.keeps_cache() {
            return (None, None);
        }
        match self.my_cache() {
            Some(c) => c.live_secrets(self.unix_now),
            None => (None, None),
        }
    }

    fn send_hello(&mut self, kvrq: bool, now_ms: u64) -> Result<(), Error> {
        let mut sas_types: Vec<AlgoId> = self.cfg.sas_types.iter().map(|s| sas_algo(*s)).collect();
        for b in &self.cfg.backends {
            sas_types.push(AlgoId(b.wire_id()));
        }
        if kvrq && !self.cfg.backends.is_empty() {
            sas_types.push(AlgoId::KVRQ);
        }
        sas_types.truncate(7);
        let mut kas = vec![AlgoId::X255];
        if matches!(self.cfg.mode, Mode::Normal { .. }) && self.cfg.offer_preshared {
            kas.push(AlgoId::PRSH);
        }
        let hello = Hello {
            version: ZRTP_VERSION,
            client_id: CLIENT_ID,
            h3: self.chain.h3,
            zid: self.zid,
            signature_capable: false,
            mitm: false,
            passive: false,
            hashes: vec![AlgoId::S256],
            ciphers: core::iter::once(AlgoId::AES1)
                .chain(self.cfg.channel_aeads.iter().map(|a| AlgoId(a.wire_id())))
                .take(7)
                .collect(),
            auth_tags: vec![AlgoId::HS32, AlgoId::HS80],
            key_agreements: kas,
            sas_types,
            mac: [0; 8],
        };
        let bytes = encode_with_mac(&Message::Hello(hello), MessageType::Hello, &self.chain.h2)?;
        self.hello = bytes.clone();
        self.hello_sent = true;
        self.kvrq_sent = kvrq;
        self.out.push_back(bytes);
        self.hello_timer = self
            .cfg
            .retransmit
            .then(|| Retransmit::start(Schedule::T1.scaled(self.cfg.timer_scale), now_ms));
        Ok(())
    }

    fn send_flight(&mut self, msgs: Vec<Vec<u8>>, now_ms: u64) {
        self.out.extend(msgs.iter().cloned());
        self.flight = msgs;
        self.retransmit = self
            .cfg
            .retransmit
            .then(|| Retransmit::start(Schedule::T2.scaled(self.cfg.timer_scale), now_ms));
    }

    fn respond(&mut self, msgs: Vec<Vec<u8>>) {
        self.out.extend(msgs.iter().cloned());
        self.last_response = msgs;
    }

    fn peer_hello(&self) -> Result<&PeerHello, Error> {
        self.peer.as_ref().ok_or(Error::Misuse("no peer Hello"))
    }

    /// The equality test both sides will use: the first backend in the *initiator's* list
    /// that the responder also offers (both sides compute the same answer).
    fn peer_offers_keav(&self) -> Option<Backend> {
        let theirs = &self.peer.as_ref()?.msg.sas_types;
        match self.role {
            Role::Initiator => self
                .cfg
                .backends
                .iter()
                .copied()
                .find(|b| theirs.iter().any(|a| a.0 == b.wire_id())),
            Role::Responder => theirs
                .iter()
                .filter_map(|a| Backend::from_wire_id(&a.0))
                .find(|b| self.cfg.backends.contains(b)),
        }
    }

    /// The channel AEAD: the initiator's first choice that the responder also offers (both
    /// Hellos are authenticated by the end of the handshake, so this cannot be downgraded).
    fn negotiated_aead(&self) -> Option<crate::record::Aead> {
        use crate::record::Aead;
        let peer = self.peer.as_ref()?;
        let theirs: Vec<Aead> = peer
            .msg
            .ciphers
            .iter()
            .filter_map(|a| Aead::from_wire_id(&a.0))
            .collect();
        match self.role {
            Role::Initiator => self
                .cfg
                .channel_aeads
                .iter()
                .copied()
                .find(|a| theirs.contains(a)),
            Role::Responder => theirs
                .into_iter()
                .find(|a| self.cfg.channel_aeads.contains(a)),
        }
    }

    fn offers_sas(&self, a: AlgoId) -> bool {
        self.cfg.sas_types.iter().any(|s| sas_algo(*s) == a)
    }

    fn peer_requests_verification(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| p.msg.sas_types.contains(&AlgoId::KVRQ))
    }

    // ---------------------------------------------------------------------------------
    // Dispatch
    // ---------------------------------------------------------------------------------

    fn dispatch<R: RngCore + CryptoRng>(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        if bytes.len() > msg::MAX_MESSAGE_LEN {
            return Err(crate::ParseError::TooLong.into());
        }
        let digest = crypto::sha256(bytes);
        if self.seen.contains(&digest) {
            // A byte-identical retransmission: the responder answers the initiator's latest
            // message again; everything else is ignored.
            if self.role == Role::Responder && self.last_rx == Some(digest) {
                self.out.extend(self.last_response.iter().cloned());
            }
            return Ok(Step::Ignored);
        }
        let message = Message::parse(bytes)?;
        let t = message.message_type();
        match (t, message) {
            (MessageType::HelloAck, _) => {
                self.hello_timer = None;
                Ok(Step::Ignored)
            }
            (MessageType::ErrorAck, _) => Ok(Step::Ignored),
            (_, Message::Error(e)) => {
                // Preshared fallback: the responder has no matching secret, use DH.
                if e.code == 0x56 && self.role == Role::Initiator {
                    if let State::CommitSent(cs) = &self.state {
                        if cs.choice.preshared {
                            self.out.push_back(Message::ErrorAck.encode());
                            let mut choice = cs.choice;
                            choice.preshared = false;
                            self.mark_seen(digest);
                            self.send_commit(choice, now_ms, rng)?;
                            return Ok(Step::Advanced);
                        }
                    }
                }
                self.out.push_back(Message::ErrorAck.encode());
                Err(Error::PeerError(e.code))
            }
            (_, message) => {
                let step = self.on_message(message, bytes, now_ms, rng)?;
                match step {
                    Step::Advanced => self.mark_seen(digest),
                    Step::Buffered => {
                        if self.early.len() < MAX_EARLY {
                            self.early.push(bytes.to_vec());
                        }
                    }
                    Step::Ignored => {}
                }
                Ok(step)
            }
        }
    }

    fn mark_seen(&mut self, digest: [u8; 32]) {
        if self.seen.len() >= MAX_SEEN {
            self.seen.pop_front();
        }
        self.seen.push_back(digest);
        self.last_rx = Some(digest);
    }

    fn unexpected(&self, t: MessageType) -> Error {
        Error::Unexpected {
            message: t.name(),
            state: self.state.name(),
        }
    }

    fn on_message<R: RngCore + CryptoRng>(
        &mut self,
        message: Message,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        let t = message.message_type();
        let state = core::mem::replace(&mut self.state, State::Failed);
        match (state, message) {
            (State::AwaitHello, Message::Hello(h)) => {
                self.state = State::AwaitHello;
                self.on_hello(h, bytes, now_ms, rng)
            }
            (s @ (State::AwaitHello | State::AwaitCache), Message::Commit(_)) => {
                self.state = s;
                Ok(Step::Buffered)
            }
            (State::AwaitCommit, Message::Commit(c)) => self.on_commit(c, bytes, rng),
            (State::CommitSent(cs), Message::Commit(c)) => self.on_contention(cs, c, bytes, rng),
            (State::CommitSent(cs), Message::DhPart1(d)) => {
                self.on_dhpart1(*cs, d, bytes, now_ms, rng)
            }
            (State::CommitSent(cs), Message::Confirm1(c)) if cs.choice.preshared => {
                self.on_preshared_confirm1(*cs, c, bytes, now_ms, rng)
            }
            (State::DhPart1Sent(s), Message::DhPart2(d)) => {
                self.on_dhpart2(*s, d, bytes, now_ms, rng)
            }
            (s @ State::DhPart1Sent(_), Message::KVerify(_)) => {
                self.state = s;
                Ok(Step::Buffered)
            }
            (State::Keyed(k), Message::KVerify(v)) => self.on_kverify(k, v, bytes, now_ms, rng),
            (State::Keyed(k), Message::Confirm1(c)) if self.role == Role::Initiator => {
                self.on_confirm1(k, c, now_ms, rng)
            }
            (State::Keyed(k), Message::Confirm2(c)) if self.role == Role::Responder => {
                self.on_confirm2(k, c, rng)
            }
            (State::Confirm2Sent(outcome), Message::Conf2Ack) => {
                self.retransmit = None;
                self.flight.clear();
                if let Some(o) = *outcome {
                    self.events.push_back(Event::Established(Box::new(o)));
                }
                self.state = State::Done;
                Ok(Step::Advanced)
            }
            (State::Confirm2Sent(o), Message::Confirm1(_)) => {
                // A late copy of Confirm1 (ours was already accepted): ignore.
                self.state = State::Confirm2Sent(o);
                Ok(Step::Ignored)
            }
            (State::Done, _) => {
                self.state = State::Done;
                Ok(Step::Ignored)
            }
            (s, Message::Hello(_)) if !matches!(s, State::AwaitHello) => {
                // A different Hello mid-exchange (peer restarted, or an attacker): refuse.
                self.state = s;
                Err(self.unexpected(t))
            }
            (s, _) => {
                self.state = s;
                Err(self.unexpected(t))
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Hello and cache
    // ---------------------------------------------------------------------------------

    fn on_hello<R: RngCore + CryptoRng>(
        &mut self,
        h: Hello,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        if &h.version[..3] != b"1.1" {
            return Err(Error::UnsupportedVersion);
        }
        if h.zid == self.zid {
            return Err(Error::EqualZids);
        }
        // Cheap checks before any public-key work: algorithms we can agree on.
        if !implied(&h.hashes, AlgoId::S256) {
            return Err(Error::NoCommonAlgorithm("hash"));
        }
        if !implied(&h.ciphers, AlgoId::AES1) {
            return Err(Error::NoCommonAlgorithm("cipher"));
        }
        if !h.key_agreements.contains(&AlgoId::X255) {
            return Err(Error::NoCommonAlgorithm("key agreement"));
        }
        let zid = h.zid;
        self.peer = Some(PeerHello {
            bytes: bytes.to_vec(),
            msg: h,
            mac_checked: false,
        });
        if self.cfg.require_keav && self.peer_offers_keav().is_none() {
            return Err(Error::Downgrade("peer does not offer KEAV verification"));
        }
        self.out.push_back(Message::HelloAck.encode());
        if self.cache.is_some() {
            self.after_cache(now_ms, rng)?;
            return Ok(Step::Advanced);
        }
        let rs_id_hint = match self.cfg.mode {
            Mode::Paranoid => {
                let mut id = [0u8; 8];
                id.copy_from_slice(&zid.0[..8]);
                Some(id)
            }
            _ => None,
        };
        self.events
            .push_back(Event::NeedPeerCache { zid, rs_id_hint });
        self.state = State::AwaitCache;
        Ok(Step::Advanced)
    }

    fn after_cache<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        match self.role {
            Role::Responder => {
                let demand = self.policy_demands(self.my_cache());
                self.send_hello(demand, now_ms)?;
                self.state = State::AwaitCommit;
                Ok(Step::Advanced)
            }
            Role::Initiator => {
                let choice = self.choose_algorithms()?;
                self.send_commit(choice, now_ms, rng)?;
                Ok(Step::Advanced)
            }
        }
    }

    fn choose_algorithms(&self) -> Result<Choice, Error> {
        let peer = &self.peer_hello()?.msg;
        let auth_tag = [AlgoId::HS32, AlgoId::HS80]
            .into_iter()
            .find(|a| peer.auth_tags.contains(a))
            .unwrap_or(AlgoId::HS32);
        let sas = self
            .cfg
            .sas_types
            .iter()
            .map(|s| sas_algo(*s))
            .find(|a| peer.sas_types.contains(a))
            .unwrap_or(AlgoId::B32);
        let verify = self.policy_demands(self.my_cache()) || self.peer_requests_verification();
        let preshared = matches!(self.cfg.mode, Mode::Normal { .. })
            && self.cfg.offer_preshared
            && peer.key_agreements.contains(&AlgoId::PRSH)
            && self.my_secrets().0.is_some()
            && !(verify && self.peer_offers_keav().is_some());
        Ok(Choice {
            auth_tag,
            sas,
            preshared,
        })
    }

    // ---------------------------------------------------------------------------------
    // Initiator: Commit, DHPart2
    // ---------------------------------------------------------------------------------

    fn send_commit<R: RngCore + CryptoRng>(
        &mut self,
        choice: Choice,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(), Error> {
        let (body, ka, dh, psk) = if choice.preshared {
            let rs1 = self
                .my_secrets()
                .0
                .cloned()
                .ok_or(Error::Misuse("preshared without rs1"))?;
            let psk = crypto::preshared_key(&rs1, None, None);
            let mut nonce = [0u8; 16];
            rng.fill_bytes(&mut nonce);
            let key_id = crypto::preshared_key_id(&psk);
            (
                CommitBody::Preshared { nonce, key_id },
                AlgoId::PRSH,
                None,
                Some(psk),
            )
        } else {
            let (kp, dh2_bytes) = self.dh_part(Role::Initiator, rng)?;
            let hvi = crypto::hvi(&dh2_bytes, &self.peer_hello()?.bytes);
            (
                CommitBody::Dh { hvi },
                AlgoId::X255,
                Some((kp, dh2_bytes)),
                None,
            )
        };
        let commit = Commit {
            h2: self.chain.h2,
            zid: self.zid,
            hash: AlgoId::S256,
            cipher: AlgoId::AES1,
            auth_tag: choice.auth_tag,
            key_agreement: ka,
            sas: choice.sas,
            body,
            mac: [0; 8],
        };
        let bytes = encode_with_mac(
            &Message::Commit(commit),
            MessageType::Commit,
            &self.chain.h1,
        )?;
        self.hello_timer = None;
        self.send_flight(vec![bytes.clone()], now_ms);
        self.state = State::CommitSent(Box::new(CommitSent {
            choice,
            commit: bytes,
            dh,
            psk,
        }));
        Ok(())
    }

    /// A fresh key pair and our DHPart (DHPart2 as initiator, DHPart1 as responder): our H1,
    /// our rs IDs for this role (random where we hold no secret), random aux/pbx IDs, and the
    /// MAC keyed by H0 (checked by the peer once Confirm reveals H0).
    fn dh_part<R: RngCore + CryptoRng>(
        &self,
        role: Role,
        rng: &mut R,
    ) -> Result<(X25519KeyPair, Vec<u8>), Error> {
        let (label, t): (&[u8], _) = match role {
            Role::Initiator => (b"Initiator", MessageType::DhPart2),
            Role::Responder => (b"Responder", MessageType::DhPart1),
        };
        let kp = X25519KeyPair::generate(rng);
        let (rs1, rs2) = self.my_secrets();
        let mut id = |rs: Option<&Secret32>| match rs {
            Some(s) => crypto::rs_id(s, label),
            None => crypto::random_id(rng),
        };
        let (rs1_id, rs2_id) = (id(rs1), id(rs2));
        let part = DhPart {
            h1: self.chain.h1,
            rs1_id,
            rs2_id,
            aux_id: crypto::random_id(rng),
            pbx_id: crypto::random_id(rng),
            pv: kp.public().to_vec(),
            mac: [0; 8],
        };
        let message = match role {
            Role::Initiator => Message::DhPart2(part),
            Role::Responder => Message::DhPart1(part),
        };
        Ok((kp, encode_with_mac(&message, t, &self.chain.h0)?))
    }

    /// RFC 6189 §4.2: both sides sent Commit.
    fn on_contention<R: RngCore + CryptoRng>(
        &mut self,
        cs: Box<CommitSent>,
        theirs: Commit,
        bytes: &[u8],
        rng: &mut R,
    ) -> Result<Step, Error> {
        let mine_pre = cs.choice.preshared;
        let theirs_pre = matches!(theirs.body, CommitBody::Preshared { .. });
        let i_win = match (mine_pre, theirs_pre, &theirs.body) {
            (false, true, _) => true,
            (true, false, _) => false,
            (false, false, CommitBody::Dh { hvi }) => match Message::parse(&cs.commit) {
                Ok(Message::Commit(Commit {
                    body: CommitBody::Dh { hvi: mine },
                    ..
                })) => mine > *hvi,
                _ => true,
            },
            (true, true, CommitBody::Preshared { nonce, .. }) => match Message::parse(&cs.commit) {
                Ok(Message::Commit(Commit {
                    body: CommitBody::Preshared { nonce: mine, .. },
                    ..
                })) => mine > *nonce,
                _ => true,
            },
            _ => {
                return Err(Error::Unexpected {
                    message: "Commit",
                    state: "CommitSent",
                })
            }
        };
        if i_win {
            self.state = State::CommitSent(cs);
            return Ok(Step::Ignored);
        }
        // We lose: become the responder for their Commit.
        self.role = Role::Responder;
        self.retransmit = None;
        self.flight.clear();
        self.on_commit(theirs, bytes, rng)
    }

    fn on_dhpart1<R: RngCore + CryptoRng>(
        &mut self,
        cs: CommitSent,
        d: DhPart,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        let (kp, dh2_bytes) = cs.dh.ok_or(Error::Unexpected {
            message: "DHPart1",
            state: "CommitSent(preshared)",
        })?;
        // Hash chain: H1 -> H2 -> H3 of the responder's Hello, then the Hello MAC.
        let h2 = crypto::sha256(&d.h1);
        self.check_peer_hello(&h2)?;
        let dh = kp.agree(&d.pv)?;
        let s1 = crypto::match_retained(self.my_secrets(), RsRole::Responder, &d.rs1_id, &d.rs2_id);
        let peer = self.peer_hello()?;
        let total = crypto::total_hash_dh(&peer.bytes, &cs.commit, bytes, &dh2_bytes);
        let ctx = crypto::kdf_context(&self.zid, &peer.msg.zid, &total);
        let s0 = crypto::s0_dh(
            &dh,
            &self.zid,
            &peer.msg.zid,
            &total,
            s1.as_ref(),
            None,
            None,
        );
        let in_sync = self.rs1_in_sync(b"Responder", &d.rs1_id);
        let mut keyed = self.keyed(KeyAgreement::Dh, ctx, s0, s1.is_some(), cs.choice, d.h1);
        keyed.peer_deferred = bytes.to_vec();
        keyed.peer_deferred_type = MessageType::DhPart1;
        keyed.demanded = self.policy_demands(self.my_cache())
            || self.peer_requests_verification()
            || !keyed.matched
            || !in_sync;
        let mut flight = vec![dh2_bytes];
        if keyed.demanded {
            if let Some(backend) = self.peer_offers_keav() {
                let binding = Binding::new(&keyed.base.sashash, &keyed.ctx);
                let (v, first) = Verifier::start(
                    backend,
                    keav_verify::Role::Initiator,
                    &binding,
                    self.cfg.verify_secret.as_ref(),
                    rng,
                )?;
                keyed.backend = Some(backend);
                keyed.verifier = Some(v);
                self.verifying = true;
                self.events
                    .push_back(Event::VerificationStarting { backend });
                if let Some(m) = first {
                    let vb = self.kverify(&keyed, m)?;
                    keyed.next_step = 2;
                    flight.push(vb);
                }
            }
        }
        self.send_flight(flight, now_ms);
        self.state = State::Keyed(Box::new(keyed));
        Ok(Step::Advanced)
    }

    /// Whether the peer's rs1 is our rs1 (caches in step). A match through an rs2 on either
    /// side means one side missed an update — after a crash, or because someone else used a
    /// stolen cache in between — so the session runs the equality test (PROTOCOL.md).
    /// Symmetric: both sides compare the same pair of rs1 values.
    fn rs1_in_sync(&self, peer_label: &[u8], peer_rs1_id: &[u8; 8]) -> bool {
        self.my_secrets()
            .0
            .is_some_and(|rs1| crypto::mac_eq(&crypto::rs_id(rs1, peer_label), peer_rs1_id))
    }

    fn check_peer_hello(&mut self, h2: &[u8; 32]) -> Result<(), Error> {
        let peer = self.peer.as_mut().ok_or(Error::Misuse("no peer Hello"))?;
        if !crypto::chain_link_ok(h2, &peer.msg.h3) {
            return Err(Error::Auth(AuthFailure::HashChain));
        }
        let covered = msg::mac_covered(&peer.bytes, MessageType::Hello)?;
        if !crypto::mac_eq(&crypto::mac8(h2, covered), &peer.msg.mac) {
            return Err(Error::Auth(AuthFailure::HelloMac));
        }
        peer.mac_checked = true;
        Ok(())
    }

    fn keyed(
        &self,
        ka: KeyAgreement,
        ctx: Vec<u8>,
        s0: Secret32,
        matched: bool,
        choice: Choice,
        peer_link: [u8; 32],
    ) -> Keyed {
        let base = SessionKeys::derive(&s0, &ctx);
        let vmac_i = crypto::kdf32(s0.expose(), b"KEAV Initiator verify MAC key", &ctx);
        let vmac_r = crypto::kdf32(s0.expose(), b"KEAV Responder verify MAC key", &ctx);
        let known = self.my_secrets().0.is_some();
        Keyed {
            ka,
            ctx,
            s0,
            base,
            final_keys: None,
            vmac_i,
            vmac_r,
            verifier: None,
            backend: None,
            demanded: false,
            next_step: 1,
            last_v_mine: None,
            matched,
            mismatch: known && !matched,
            peer_deferred: Vec::new(),
            peer_deferred_type: MessageType::DhPart1,
            peer_link,
            sas_type: SasType::from_algo(&choice.sas.0).unwrap_or(SasType::B32),
            peer_expiry: None,
            confirm1_sent: false,
        }
    }

    // ---------------------------------------------------------------------------------
    // Responder: Commit, DHPart2
    // ---------------------------------------------------------------------------------

    fn on_commit<R: RngCore + CryptoRng>(
        &mut self,
        c: Commit,
        bytes: &[u8],
        rng: &mut R,
    ) -> Result<Step, Error> {
        // The Commit reveals the initiator's H2: check it against its Hello, then the Hello MAC.
        self.check_peer_hello(&c.h2)?;
        let peer_zid = self.peer_hello()?.msg.zid;
        if c.zid != peer_zid {
            return Err(Error::Auth(AuthFailure::CommitMac));
        }
        if c.hash != AlgoId::S256 {
            return Err(Error::NoCommonAlgorithm("hash"));
        }
        if c.cipher != AlgoId::AES1 {
            return Err(Error::NoCommonAlgorithm("cipher"));
        }
        if c.auth_tag != AlgoId::HS32 && c.auth_tag != AlgoId::HS80 {
            return Err(Error::NoCommonAlgorithm("auth tag"));
        }
        if SasType::from_algo(&c.sas.0).is_none() || !self.offers_sas(c.sas) {
            return Err(Error::NoCommonAlgorithm("SAS"));
        }
        self.hello_timer = None;
        let choice = Choice {
            auth_tag: c.auth_tag,
            sas: c.sas,
            preshared: matches!(c.body, CommitBody::Preshared { .. }),
        };
        match c.body {
            CommitBody::Dh { hvi } => {
                if c.key_agreement != AlgoId::X255 {
                    return Err(Error::NoCommonAlgorithm("key agreement"));
                }
                let (kp, d1_bytes) = self.dh_part(Role::Responder, rng)?;
                self.respond(vec![d1_bytes.clone()]);
                self.state = State::DhPart1Sent(Box::new(DhPart1Sent {
                    choice,
                    commit: bytes.to_vec(),
                    commit_h2: c.h2,
                    hvi,
                    dhpart1: d1_bytes,
                    keypair: kp,
                }));
                Ok(Step::Advanced)
            }
            CommitBody::Preshared { key_id, .. } => {
                if !(self.cfg.offer_preshared && matches!(self.cfg.mode, Mode::Normal { .. })) {
                    return Err(Error::NoCommonAlgorithm("key agreement"));
                }
                let demand = self.policy_demands(self.my_cache());
                let psk = self
                    .my_secrets()
                    .0
                    .map(|rs1| crypto::preshared_key(rs1, None, None))
                    .filter(|psk| crypto::mac_eq(&crypto::preshared_key_id(psk), &key_id));
                let psk = match psk {
                    Some(p) if !demand && matches!(self.cfg.mode, Mode::Normal { .. }) => p,
                    _ => {
                        // RFC 6189 §4.4.2.3: no usable shared secret (or this session must run
                        // DH and verification): ask for DH mode; a DH Commit may follow.
                        self.out
                            .push_back(Message::Error(ErrorMsg { code: 0x56 }).encode());
                        self.state = State::AwaitCommit;
                        return Ok(Step::Advanced);
                    }
                };
                let peer = self.peer_hello()?;
                let total = crypto::total_hash_preshared(&self.hello, bytes);
                let ctx = crypto::kdf_context(&peer.msg.zid, &self.zid, &total);
                let s0 = crypto::s0_preshared(&psk, &ctx);
                let mut keyed = self.keyed(KeyAgreement::Preshared, ctx, s0, true, choice, c.h2);
                keyed.peer_deferred = bytes.to_vec();
                keyed.peer_deferred_type = MessageType::Commit;
                let confirm1 = self.confirm(&keyed, rng)?;
                keyed.confirm1_sent = true;
                self.respond(vec![confirm1]);
                self.state = State::Keyed(Box::new(keyed));
                Ok(Step::Advanced)
            }
            CommitBody::Multistream { .. } => Err(Error::NoCommonAlgorithm("key agreement")),
        }
    }

    fn on_dhpart2<R: RngCore + CryptoRng>(
        &mut self,
        s: DhPart1Sent,
        d: DhPart,
        bytes: &[u8],
        _now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        // Reveals the initiator's H1: chain to the Commit's H2, then the Commit MAC, then hvi.
        if !crypto::chain_link_ok(&d.h1, &s.commit_h2) {
            return Err(Error::Auth(AuthFailure::HashChain));
        }
        let covered = msg::mac_covered(&s.commit, MessageType::Commit)?;
        let commit_mac = match Message::parse(&s.commit) {
            Ok(Message::Commit(c)) => c.mac,
            _ => return Err(Error::Misuse("stored Commit unparsable")),
        };
        if !crypto::mac_eq(&crypto::mac8(&d.h1, covered), &commit_mac) {
            return Err(Error::Auth(AuthFailure::CommitMac));
        }
        if !crypto::mac_eq(&crypto::hvi(bytes, &self.hello), &s.hvi) {
            return Err(Error::Auth(AuthFailure::Hvi));
        }
        let dh = s.keypair.agree(&d.pv)?;
        let s1 = crypto::match_retained(self.my_secrets(), RsRole::Initiator, &d.rs1_id, &d.rs2_id);
        let peer = self.peer_hello()?;
        let total = crypto::total_hash_dh(&self.hello, &s.commit, &s.dhpart1, bytes);
        let ctx = crypto::kdf_context(&peer.msg.zid, &self.zid, &total);
        let s0 = crypto::s0_dh(
            &dh,
            &peer.msg.zid,
            &self.zid,
            &total,
            s1.as_ref(),
            None,
            None,
        );
        let in_sync = self.rs1_in_sync(b"Initiator", &d.rs1_id);
        let mut keyed = self.keyed(KeyAgreement::Dh, ctx, s0, s1.is_some(), s.choice, d.h1);
        keyed.peer_deferred = bytes.to_vec();
        keyed.peer_deferred_type = MessageType::DhPart2;
        // Our own policy counts even if our Hello could not say so (we lost commit
        // contention after sending a Hello without KVRQ): we then wait for the test.
        keyed.demanded =
            self.kvrq_sent || self.policy_demands(self.my_cache()) || !keyed.matched || !in_sync;
        if keyed.demanded && self.peer_offers_keav().is_none() && self.cfg.require_keav {
            return Err(Error::Downgrade("verification required but not offered"));
        }
        if !keyed.demanded || self.peer_offers_keav().is_none() {
            // No verification asked for by us; send Confirm1 now. If the initiator still
            // starts one (its own policy), we switch to it in on_kverify.
            let c1 = self.confirm(&keyed, rng)?;
            keyed.confirm1_sent = true;
            self.respond(vec![c1]);
        }
        self.state = State::Keyed(Box::new(keyed));
        Ok(Step::Advanced)
    }

    // ---------------------------------------------------------------------------------
    // Verification messages
    // ---------------------------------------------------------------------------------

    fn kverify(&self, k: &Keyed, payload: Vec<u8>) -> Result<Vec<u8>, Error> {
        let backend = k.backend.ok_or(Error::Misuse("no backend"))?;
        let m = KVerify {
            backend: AlgoId(backend.wire_id()),
            step: k.next_step,
            payload,
            mac: [0; 16],
        };
        let mut bytes = Message::KVerify(m).encode();
        let key = match self.role {
            Role::Initiator => &k.vmac_i,
            Role::Responder => &k.vmac_r,
        };
        let covered = msg::mac_covered(&bytes, MessageType::KVerify)?;
        let full = crypto::hmac_sha256(key.expose(), &[covered]);
        msg::set_trailing_mac(&mut bytes, &full[..16])?;
        Ok(bytes)
    }

    fn on_kverify<R: RngCore + CryptoRng>(
        &mut self,
        mut k: Box<Keyed>,
        v: KVerify,
        bytes: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        let peer_key = match self.role {
            Role::Initiator => &k.vmac_r,
            Role::Responder => &k.vmac_i,
        };
        let covered = msg::mac_covered(bytes, MessageType::KVerify)?;
        let full = crypto::hmac_sha256(peer_key.expose(), &[covered]);
        if !crypto::mac_eq(&full[..16], &v.mac) {
            return Err(Error::Auth(AuthFailure::VerifyMac));
        }
        let expected_step = match (self.role, k.verifier.is_some()) {
            (Role::Responder, false) => 1,
            _ => k.next_step,
        };
        if v.step != expected_step {
            if v.step > expected_step {
                self.state = State::Keyed(k);
                return Ok(Step::Buffered);
            }
            return Err(Error::Unexpected {
                message: "KVerify",
                state: "Keyed(step)",
            });
        }
        let backend = Backend::from_wire_id(&v.backend.0)
            .ok_or(Error::Downgrade("unknown verification backend"))?;
        if self.role == Role::Responder && k.verifier.is_none() {
            // The initiator starts the test (its own policy or ours). Any Confirm1 we sent
            // without it is void.
            if Some(backend) != self.peer_offers_keav() {
                return Err(Error::Downgrade(
                    "verification backend differs from negotiation",
                ));
            }
            let binding = Binding::new(&k.base.sashash, &k.ctx);
            let (ver, _) = Verifier::start(
                backend,
                keav_verify::Role::Responder,
                &binding,
                self.cfg.verify_secret.as_ref(),
                rng,
            )?;
            k.verifier = Some(ver);
            k.backend = Some(backend);
            k.confirm1_sent = false;
            self.verifying = true;
            self.events
                .push_back(Event::VerificationStarting { backend });
            self.last_response.clear();
        } else if Some(backend) != k.backend {
            return Err(Error::Downgrade("verification backend changed"));
        }
        let verifier = k.verifier.as_mut().ok_or(Error::Misuse("no verifier"))?;
        let reply = match verifier.receive(&v.payload, rng) {
            Ok(r) => r,
            Err(e) => {
                // SMP: the responder that learns "not equal" still sends its last message so
                // that the initiator learns it too.
                if let Some(last) = verifier.take_final_message() {
                    k.next_step = v.step.saturating_add(1);
                    if let Ok(vb) = self.kverify(&k, last) {
                        self.out.push_back(vb);
                    }
                }
                return Err(e.into());
            }
        };
        let ready = verifier.ready_for_confirm();
        if verifier.is_finished() {
            self.verifying = false;
        }
        k.next_step = v.step.saturating_add(1);
        let mut out = Vec::new();
        if let Some(r) = reply {
            let vb = self.kverify(&k, r)?;
            k.next_step = k.next_step.saturating_add(1);
            k.last_v_mine = Some(vb.clone());
            out.push(vb);
        } else {
            k.last_v_mine = None;
        }
        if ready {
            self.finalize_keys(&mut k);
        }
        match self.role {
            Role::Responder => {
                if ready && !k.confirm1_sent {
                    let c1 = self.confirm(&k, rng)?;
                    k.confirm1_sent = true;
                    out.push(c1);
                }
                if !out.is_empty() {
                    self.respond(out);
                }
            }
            Role::Initiator => {
                // A final message of ours (CPace's Ta) travels with Confirm2; anything the
                // responder still needs before its Confirm1 goes now.
                let finished = k.verifier.as_ref().is_some_and(|v| v.is_finished());
                if !out.is_empty() && !finished {
                    k.last_v_mine = None;
                    self.send_flight(out, now_ms);
                }
            }
        }
        self.state = State::Keyed(k);
        Ok(Step::Advanced)
    }

    fn finalize_keys(&self, k: &mut Keyed) {
        if k.final_keys.is_some() {
            return;
        }
        if let Some(key) = k.verifier.as_ref().and_then(|v| v.key()) {
            let mut ctx = k.ctx.clone();
            ctx.extend_from_slice(&key[..]);
            let s0v = crypto::kdf32(k.s0.expose(), b"KEAV verified s0", &ctx);
            k.final_keys = Some(SessionKeys::derive(&s0v, &k.ctx));
        }
    }

    // ---------------------------------------------------------------------------------
    // Confirm
    // ---------------------------------------------------------------------------------

    fn confirm<R: RngCore + CryptoRng>(&self, k: &Keyed, rng: &mut R) -> Result<Vec<u8>, Error> {
        let keys = k.keys();
        let bound = k.verifier.as_ref().is_some_and(|v| v.is_bound());
        let expiry = if self.cfg.mode.keeps_cache() {
            self.cfg.cache_expiry_secs
        } else {
            0
        };
        let body = ConfirmBody {
            h0: self.chain.h0,
            sig_len_words: 0,
            flags: ConfirmFlags {
                e: false,
                v: bound,
                a: false,
                d: false,
            },
            cache_expiry: expiry,
            signature: Vec::new(),
        };
        let mut plain = Vec::new();
        crate::codec::Codec::encode(&body, &mut plain);
        let mut iv = [0u8; 16];
        rng.fill_bytes(&mut iv);
        let (zkey, mkey) = match self.role {
            Role::Initiator => (&keys.zrtpkeyi, &keys.mackeyi),
            Role::Responder => (&keys.zrtpkeyr, &keys.mackeyr),
        };
        crypto::confirm_encrypt(zkey, &iv, &mut plain);
        let confirm_mac = crypto::confirm_mac(mkey, &plain);
        let c = Confirm {
            confirm_mac,
            iv,
            encrypted: plain,
        };
        Ok(match self.role {
            Role::Initiator => Message::Confirm2(c),
            Role::Responder => Message::Confirm1(c),
        }
        .encode())
    }

    /// Checks a peer Confirm with `keys`; returns the decrypted body.
    fn open_confirm(&self, keys: &SessionKeys, c: &Confirm) -> Option<ConfirmBody> {
        let (zkey, mkey) = match self.role {
            Role::Initiator => (&keys.zrtpkeyr, &keys.mackeyr),
            Role::Responder => (&keys.zrtpkeyi, &keys.mackeyi),
        };
        if !crypto::mac_eq(&crypto::confirm_mac(mkey, &c.encrypted), &c.confirm_mac) {
            return None;
        }
        let mut plain = c.encrypted.clone();
        crypto::confirm_decrypt(zkey, &c.iv, &mut plain);
        <ConfirmBody as crate::codec::Codec>::from_bytes(&plain).ok()
    }

    /// Checks the H0 a Confirm revealed against the chain and the deferred MAC.
    fn check_peer_h0(&mut self, k: &Keyed, h0: &[u8; 32]) -> Result<(), Error> {
        match (k.ka, k.peer_deferred_type) {
            (KeyAgreement::Dh, t) => {
                if !crypto::chain_link_ok(h0, &k.peer_link) {
                    return Err(Error::Auth(AuthFailure::HashChain));
                }
                let covered = msg::mac_covered(&k.peer_deferred, t)?;
                let mac = trailing_mac(&k.peer_deferred)?;
                if !crypto::mac_eq(&crypto::mac8(h0, covered), &mac) {
                    return Err(Error::Auth(if t == MessageType::DhPart1 {
                        AuthFailure::DhPart1Mac
                    } else {
                        AuthFailure::DhPart2Mac
                    }));
                }
                Ok(())
            }
            (KeyAgreement::Preshared, MessageType::Commit) => {
                // Responder: H0 -> H1 keys the Commit MAC; H1 -> H2 of the Commit.
                let h1 = crypto::sha256(h0);
                if !crypto::chain_link_ok(&h1, &k.peer_link) {
                    return Err(Error::Auth(AuthFailure::HashChain));
                }
                let covered = msg::mac_covered(&k.peer_deferred, MessageType::Commit)?;
                let mac = trailing_mac(&k.peer_deferred)?;
                if !crypto::mac_eq(&crypto::mac8(&h1, covered), &mac) {
                    return Err(Error::Auth(AuthFailure::CommitMac));
                }
                Ok(())
            }
            (KeyAgreement::Preshared, _) => {
                // Initiator: H0 -> H1 -> H2, which keys the responder's Hello MAC.
                let h2 = crypto::sha256(&crypto::sha256(h0));
                self.check_peer_hello(&h2)
            }
        }
    }

    fn on_preshared_confirm1<R: RngCore + CryptoRng>(
        &mut self,
        cs: CommitSent,
        c: Confirm,
        _bytes: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        let psk = cs.psk.ok_or(Error::Misuse("preshared state without key"))?;
        let peer = self.peer_hello()?;
        let total = crypto::total_hash_preshared(&peer.bytes, &cs.commit);
        let ctx = crypto::kdf_context(&self.zid, &peer.msg.zid, &total);
        let s0 = crypto::s0_preshared(&psk, &ctx);
        let mut keyed = self.keyed(KeyAgreement::Preshared, ctx, s0, true, cs.choice, [0; 32]);
        keyed.peer_deferred_type = MessageType::Hello;
        let k = Box::new(keyed);
        self.on_confirm1(k, c, now_ms, rng)
    }

    fn on_confirm1<R: RngCore + CryptoRng>(
        &mut self,
        k: Box<Keyed>,
        c: Confirm,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Step, Error> {
        if let Some(v) = &k.verifier {
            if !v.ready_for_confirm() {
                self.state = State::Keyed(k);
                return Ok(Step::Buffered);
            }
        } else if k.demanded && self.peer_offers_keav().is_some() {
            return Err(Error::Misuse("verification demanded but not started"));
        }
        let body = match self.open_confirm(k.keys(), &c) {
            Some(b) => b,
            None => {
                if k.final_keys.is_some() && self.open_confirm(&k.base, &c).is_some() {
                    // A Confirm1 the responder made before it saw our verification message:
                    // stale, not an attack. Wait for the verified one.
                    self.state = State::Keyed(k);
                    return Ok(Step::Ignored);
                }
                return Err(Error::Auth(AuthFailure::Confirm1Mac));
            }
        };
        self.check_peer_h0(&k, &body.h0)?;
        let mut k = k;
        k.peer_expiry = Some(body.cache_expiry);
        let outcome = self.outcome(&k)?;
        let c2 = self.confirm(&k, rng)?;
        let mut flight = Vec::new();
        if let Some(v) = k.last_v_mine.take() {
            flight.push(v);
        }
        flight.push(c2);
        self.send_flight(flight, now_ms);
        self.state = State::Confirm2Sent(Box::new(Some(outcome)));
        Ok(Step::Advanced)
    }

    fn on_confirm2<R: RngCore + CryptoRng>(
        &mut self,
        k: Box<Keyed>,
        c: Confirm,
        _rng: &mut R,
    ) -> Result<Step, Error> {
        if let Some(v) = &k.verifier {
            if !v.is_finished() {
                self.state = State::Keyed(k);
                return Ok(Step::Buffered);
            }
        } else if k.demanded && self.peer_offers_keav().is_some() {
            return Err(Error::Downgrade("peer skipped the required verification"));
        }
        let body = self
            .open_confirm(k.keys(), &c)
            .ok_or(Error::Auth(AuthFailure::Confirm2Mac))?;
        self.check_peer_h0(&k, &body.h0)?;
        let mut k = k;
        k.peer_expiry = Some(body.cache_expiry);
        let outcome = self.outcome(&k)?;
        self.respond(vec![Message::Conf2Ack.encode()]);
        self.events.push_back(Event::Established(Box::new(outcome)));
        self.state = State::Done;
        Ok(Step::Advanced)
    }

    /// Applies the cache-mismatch rule and builds the session outcome.
    fn outcome(&self, k: &Keyed) -> Result<SessionOutcome, Error> {
        let peer = self.peer_hello()?;
        let verification = match &k.verifier {
            Some(v) if v.is_bound() => Verification::Bound,
            Some(_) => Verification::Unbound,
            None if self.peer_offers_keav().is_none() => Verification::NotSupported,
            None => Verification::Skipped,
        };
        let mut update_allowed = true;
        if k.mismatch {
            match verification {
                Verification::Bound => {}
                Verification::Unbound if self.cfg.allow_repair => {}
                Verification::NotSupported if !self.cfg.require_keav => {
                    // Plain ZRTP peer (a person compares the SAS): RFC 6189 §4.6.1.1, keep
                    // the old cache until the SAS is verified.
                    update_allowed = false;
                }
                _ => return Err(Error::CacheMismatch),
            }
        }
        let sessions = self.my_cache().map_or(0, |c| c.sessions).saturating_add(1);
        let mine = if self.cfg.mode.keeps_cache() {
            self.cfg.cache_expiry_secs
        } else {
            0
        };
        let interval = mine.min(k.peer_expiry.unwrap_or(0));
        let cache_update = if update_allowed && interval > 0 {
            Some(CacheUpdate {
                rs1: k.keys().new_rs1.clone(),
                rs2: self.my_secrets().0.cloned(),
                expires_at: (interval != CACHE_FOREVER)
                    .then(|| self.unix_now.saturating_add(u64::from(interval))),
                sessions,
                verification,
            })
        } else {
            None
        };
        let (local_zid, peer_zid) = (self.zid, peer.msg.zid);
        Ok(SessionOutcome {
            role: self.role,
            local_zid,
            peer_zid,
            mode: self.cfg.mode,
            key_agreement: k.ka,
            verification,
            backend: k.backend.filter(|_| verification.ran()),
            sas: k.sas_type.render(&k.base.sashash),
            sas_type: k.sas_type,
            session_number: sessions,
            cache_matched: k.matched,
            cache_mismatch: k.mismatch,
            exported_key: k.keys().exported_key.clone(),
            cache_update,
            kdf_context: k.ctx.clone(),
            channel_aead: self.negotiated_aead(),
        })
    }
}

/// Result of processing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Advanced,
    Ignored,
    Buffered,
}

fn implied(list: &[AlgoId], mandatory: AlgoId) -> bool {
    // RFC 6189 §5.1: mandatory algorithms are supported even when not listed.
    list.is_empty() || list.contains(&mandatory)
}

fn sas_algo(s: SasType) -> AlgoId {
    match s {
        SasType::B32 => AlgoId::B32,
        SasType::B256 => AlgoId::B256,
    }
}

/// Encodes a message whose trailing MAC is keyed by a hash-chain element (Hello by H2,
/// Commit by H1, DHPart by H0).
fn encode_with_mac(m: &Message, t: MessageType, key: &[u8; 32]) -> Result<Vec<u8>, Error> {
    let mut bytes = m.encode();
    let mac = crypto::mac8(key, msg::mac_covered(&bytes, t)?);
    msg::set_trailing_mac(&mut bytes, &mac)?;
    Ok(bytes)
}

fn trailing_mac(bytes: &[u8]) -> Result<[u8; 8], Error> {
    let n = bytes.len();
    let tail = bytes
        .get(n.saturating_sub(8)..)
        .ok_or(crate::ParseError::Truncated)?;
    let mut m = [0u8; 8];
    m.copy_from_slice(tail);
    Ok(m)
}
