//! The device agent's protocol logic (sans-IO), as a typestate: a [`Device<Registered>`]
//! may only join (or be deregistered); a [`Device<Joined>`] takes commands. Transitions
//! consume the device and need a grant that only an accepted message (or the device's own
//! resignation) produces, so a device cannot be "joined" without its server saying so.

use std::collections::{HashMap, VecDeque};

use subtle::ConstantTimeEq;

use crate::guard::{Guard, GuardConfig, GuardState};
use crate::keys::{DeviceId, PublicKey, SigningKey};
use crate::topics::Topics;
use crate::wire::{
    Body, Data, DeregisterRequest, Envelope, Generic, Header, HumanJoinRequest, JoinCode,
    JoinRequest, Message, ObservedJoinRequest, Reader, Resign, Response, Status, Token,
};

use super::{
    check_digest, corrupt, put32, put8, seal, unseal, Counters, DropReason, Dropped, EngineError,
    MustPersist, Outgoing,
};

/// Most responses a device keeps itself ready to send (oldest forgotten first).
const MAX_OWED: usize = 1024;
/// Most updates a device remembers (initiated, perhaps verified, not yet activated).
const MAX_UPDATES: usize = 8;

/// The device engine's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Replay guard bounds.
    pub guard: GuardConfig,
    /// Lifetime of the messages the device sends, in seconds.
    pub message_lifetime: u64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            guard: GuardConfig::default(),
            message_lifetime: 300,
        }
    }
}

/// How a registered device asks to join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRequestKind {
    /// A join request (the server's policy or operator decides).
    Simple,
    /// A human-moderated join: the device will be given words to show.
    Human,
    /// An observed join, vouched for by `observer` (a joined device).
    Observed {
        /// The observer.
        observer: DeviceId,
    },
}

/// A message a device sends, with the snapshot to persist before publishing it.
pub type DeviceSend = MustPersist<Outgoing, DeviceSnapshot>;

/// Typestate: registered with the identity service, not (yet) in the server's fleet.
#[derive(Debug)]
pub struct Registered {
    attempt: Option<(JoinRequestKind, Token)>,
}

/// Typestate: in the server's fleet.
#[derive(Debug)]
pub struct Joined;

/// A device whose identity was revoked; its signing key is gone with the engine. Erase the
/// stored key and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deregistered {
    /// The revoked identity.
    pub id: DeviceId,
}

/// Proof that the server accepted this device's join ([`Device::join`]).
#[derive(Debug, PartialEq, Eq)]
pub struct JoinGrant(());
/// Proof that the server terminated this device's membership ([`Device::leave`]).
#[derive(Debug, PartialEq, Eq)]
pub struct LeaveGrant(());
/// Proof that the server revoked this device's identity ([`Device::erase`]).
#[derive(Debug, PartialEq, Eq)]
pub struct EraseGrant(());

/// The device state to persist (`KC2D`…, see [`AnyDevice::from_state`]). It already holds
/// the status a grant in the same result leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot(Vec<u8>);

impl DeviceSnapshot {
    /// The bytes to store.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What a registered device learns from an accepted message.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisteredEvent {
    /// The server accepted the join (its response, or its join command, which the device
    /// acknowledged): apply the grant with [`Device::join`].
    Joined(JoinGrant),
    /// The server refused the join (or it failed).
    JoinRefused {
        /// The server's status.
        status: Status,
    },
    /// Human-moderated join: show these words; the operator compares them with the console's.
    ShowWords {
        /// The words.
        words: Vec<&'static str>,
    },
    /// Observed join: present this code to the observer (display, QR code, radio).
    PresentCode {
        /// The code.
        code: JoinCode,
    },
    /// The server checked the device is there (answered automatically).
    Identified {
        /// The request's token.
        token: Token,
    },
    /// The identity is revoked (acknowledged automatically): apply with [`Device::erase`].
    Deregistered(EraseGrant),
}

/// What a joined device learns from an accepted message.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinedEvent {
    /// Run an action; answer with [`Device::respond`] and the token.
    Action {
        /// The action id.
        action: u16,
        /// Its arguments.
        args: Vec<u8>,
        /// The command's token.
        token: Token,
    },
    /// Data from the server; answer with [`Device::respond`].
    Data {
        /// The data.
        data: Data,
        /// The message's token.
        token: Token,
    },
    /// A generic message; answer with [`Device::respond`] if the application wants.
    Generic {
        /// The bytes.
        data: Vec<u8>,
        /// The message's token.
        token: Token,
    },
    /// Download `url`, then [`Device::update_downloaded`] (which checks the digest) or
    /// [`Device::respond`] with a failure status.
    Update {
        /// Where the update is.
        url: String,
        /// Its SHA-256.
        digest: [u8; 32],
        /// The update's token (the activation repeats it).
        token: Token,
    },
    /// Install the update that was downloaded and verified under `token`; then respond.
    Activate {
        /// The verified digest.
        digest: [u8; 32],
        /// The update's token.
        token: Token,
    },
    /// An activation for no verified update, or with another digest: refused with
    /// [`Status::ActivateFail`] (sent automatically).
    ActivateRefused {
        /// The token.
        token: Token,
    },
    /// Observe `joining` and report what it presents with [`Device::observe`].
    ObservationRequest {
        /// The device to observe.
        joining: DeviceId,
        /// The request's token.
        token: Token,
    },
    /// The server checked the device is there (answered automatically).
    Identified {
        /// The request's token.
        token: Token,
    },
    /// The server ended the membership (acknowledged automatically): apply with
    /// [`Device::leave`].
    Terminated(LeaveGrant),
    /// The identity is revoked (acknowledged automatically): apply with [`Device::erase`].
    Deregistered(EraseGrant),
}

/// An accepted message's event, and the reply the engine already signed, if any.
#[derive(Debug)]
pub struct DeviceHandled<E> {
    /// The event.
    pub event: E,
    /// A reply to publish (after persisting).
    pub reply: Option<Outgoing>,
}

#[derive(Debug, Clone)]
enum Owed {
    Command,
    Update,
    Activate,
    Observation(JoinCode),
}

#[derive(Debug, Clone)]
struct UpdateSlot {
    token: Token,
    digest: [u8; 32],
    verified: bool,
}

#[derive(Debug)]
struct Core {
    key: SigningKey,
    id: DeviceId,
    server: DeviceId,
    server_key: PublicKey,
    topics: Topics,
    config: DeviceConfig,
    guard: Guard,
    owed: HashMap<Token, Owed>,
    owed_order: VecDeque<Token>,
    updates: VecDeque<UpdateSlot>,
    counters: Counters,
}

/// A device agent's engine in state `S` ([`Registered`] or [`Joined`]).
///
/// # Call order
///
/// Subscribe to [`Device::topic_in`]. For each message: [`Device::handle`] → on `Ok`,
/// [`MustPersist::persist`] the [`DeviceSnapshot`], then publish
/// [`DeviceHandled::reply`], apply a grant if the event carries one, and act; on `Err` the
/// message had no effect. Every call that sends returns the message inside a
/// [`MustPersist`] too.
#[derive(Debug)]
pub struct Device<S> {
    core: Core,
    state: S,
}

/// A device in any state, as restored from a snapshot.
#[derive(Debug)]
pub enum AnyDevice {
    /// Registered.
    Registered(Device<Registered>),
    /// Joined.
    Joined(Device<Joined>),
    /// Deregistered.
    Deregistered(Deregistered),
}

const STATE_MAGIC: &[u8; 4] = b"KC2D";
const STATE_VERSION: u8 = 1;
const ST_REGISTERED: u8 = 1;
const ST_JOINED: u8 = 2;
const ST_DEREGISTERED: u8 = 3;

impl AnyDevice {
    /// Restores a device from a [`DeviceSnapshot`]'s bytes. `server` and `server_key` must be
    /// the ones the snapshot was made with.
    pub fn from_state(
        key: SigningKey,
        server_key: PublicKey,
        config: DeviceConfig,
        state: &[u8],
    ) -> Result<AnyDevice, EngineError> {
        let mut core = Core::new(key, server_key, config);
        let body = unseal(state, STATE_MAGIC, STATE_VERSION)?;
        let mut r = Reader::new(body);
        let status = r.u8().map_err(corrupt)?;
        let server = DeviceId(r.array().map_err(corrupt)?);
        if server != core.server {
            return Err(EngineError::Corrupt("state is for another server"));
        }
        let guard_len = r.u32().map_err(corrupt)? as usize;
        let gs = GuardState::decode(r.take(guard_len).map_err(corrupt)?)?;
        core.guard = Guard::from_state(core.id, config.guard, gs);
        let attempt = match r.u8().map_err(corrupt)? {
            0 => None,
            k @ 1..=3 => {
                let kind = match k {
                    1 => JoinRequestKind::Simple,
                    2 => JoinRequestKind::Human,
                    _ => JoinRequestKind::Observed {
                        observer: DeviceId(r.array().map_err(corrupt)?),
                    },
                };
                Some((
                    kind,
                    Token::new(r.vec8().map_err(corrupt)?).map_err(corrupt)?,
                ))
            }
            _ => return Err(EngineError::Corrupt("join attempt")),
        };
        let n = r.u8().map_err(corrupt)?;
        for _ in 0..n {
            let token = Token::new(r.vec8().map_err(corrupt)?).map_err(corrupt)?;
            let digest = r.array().map_err(corrupt)?;
            let verified = match r.u8().map_err(corrupt)? {
                0 => false,
                1 => true,
                _ => return Err(EngineError::Corrupt("update flag")),
            };
            core.push_update(UpdateSlot {
                token,
                digest,
                verified,
            });
        }
        r.expect_end().map_err(corrupt)?;
        Ok(match status {
            ST_REGISTERED => AnyDevice::Registered(Device {
                core,
                state: Registered { attempt },
            }),
            ST_JOINED => AnyDevice::Joined(Device {
                core,
                state: Joined,
            }),
            ST_DEREGISTERED => AnyDevice::Deregistered(Deregistered { id: core.id }),
            _ => return Err(EngineError::Corrupt("device status")),
        })
    }
}

impl Core {
    fn new(key: SigningKey, server_key: PublicKey, config: DeviceConfig) -> Core {
        let id = key.device_id();
        let server = DeviceId::of_key(&server_key);
        Core {
            guard: Guard::new(id, config.guard),
            topics: Topics::new(server),
            id,
            server,
            server_key,
            key,
            config,
            owed: HashMap::new(),
            owed_order: VecDeque::new(),
            updates: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    fn snapshot(&self, status: u8, attempt: Option<&(JoinRequestKind, Token)>) -> DeviceSnapshot {
        let mut out = Vec::new();
        out.extend_from_slice(STATE_MAGIC);
        out.push(STATE_VERSION);
        out.push(status);
        out.extend_from_slice(&self.server.0);
        put32(&mut out, &self.guard.state().encode());
        match attempt {
            None => out.push(0),
            Some((kind, token)) => {
                match kind {
                    JoinRequestKind::Simple => out.push(1),
                    JoinRequestKind::Human => out.push(2),
                    JoinRequestKind::Observed { observer } => {
                        out.push(3);
                        out.extend_from_slice(&observer.0);
                    }
                }
                put8(&mut out, token.as_bytes());
            }
        }
        out.push(self.updates.len() as u8);
        for u in &self.updates {
            put8(&mut out, u.token.as_bytes());
            out.extend_from_slice(&u.digest);
            out.push(u8::from(u.verified));
        }
        DeviceSnapshot(seal(out))
    }

    fn push_update(&mut self, slot: UpdateSlot) {
        self.updates.retain(|u| u.token != slot.token);
        if self.updates.len() >= MAX_UPDATES {
            self.updates.pop_front();
        }
        self.updates.push_back(slot);
    }

    fn owe(&mut self, token: Token, what: Owed) {
        if self.owed.insert(token.clone(), what).is_none() {
            self.owed_order.push_back(token);
        }
        while self.owed.len() > MAX_OWED {
            match self.owed_order.pop_front() {
                Some(t) => {
                    self.owed.remove(&t);
                }
                None => break,
            }
        }
    }

    fn settle(&mut self, token: &Token) -> Option<Owed> {
        let o = self.owed.remove(token)?;
        self.owed_order.retain(|t| t != token);
        Some(o)
    }

    fn send(&mut self, body: Body, token: Token, now: u64) -> Result<Outgoing, EngineError> {
        let seq = self.guard.next_send(self.server)?;
        let env = Envelope {
            sender: self.id,
            recipient: self.server,
            seq,
            expiry: now.saturating_add(self.config.message_lifetime),
            token: token.clone(),
        };
        let msg_type = body.msg_type();
        let bytes = Message::sign(&env, &body, &self.key)?;
        Ok(Outgoing {
            topic: self.topics.to_server(self.id),
            bytes,
            token,
            recipient: self.server,
            msg_type,
        })
    }

    fn respond(&mut self, token: Token, status: Status, now: u64) -> Option<Outgoing> {
        match self.send(Body::Response(Response { status }), token, now) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!(error = %e, "c2 device reply could not be signed");
                None
            }
        }
    }

    /// Steps 1 to 7 of the inbound order; `admissible` judges the verified message.
    fn inbound(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: u64,
        admissible: impl FnOnce(&Core, &Header, &Body) -> Result<(), DropReason>,
    ) -> Result<(Header, Body), Dropped> {
        let r = self.inbound_inner(topic, payload, now, admissible);
        match &r {
            Ok(_) => self.counters.accept(),
            Err(d) => self.counters.count(d),
        }
        r
    }

    fn inbound_inner(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: u64,
        admissible: impl FnOnce(&Core, &Header, &Body) -> Result<(), DropReason>,
    ) -> Result<(Header, Body), Dropped> {
        if self.topics.recipient_of(topic) != Some(self.id) {
            return Err(Dropped {
                reason: DropReason::WrongTopic,
                sender: None,
                msg_type: None,
            });
        }
        let unverified = Message::decode(payload).map_err(|_| Dropped {
            reason: DropReason::Malformed,
            sender: None,
            msg_type: None,
        })?;
        let (sender, ty) = (unverified.header().sender, unverified.header().msg_type);
        let drop = |reason| Dropped {
            reason,
            sender: Some(sender),
            msg_type: Some(ty),
        };
        if unverified.header().recipient != self.id {
            return Err(drop(DropReason::WrongRecipient));
        }
        if sender != self.server {
            return Err(drop(DropReason::UnknownSender));
        }
        // Cheap, read-only checks before the public-key work; nothing moves until commit.
        self.guard
            .precheck(unverified.header(), now)
            .map_err(|e| drop(DropReason::of_guard(&e)))?;
        let msg = unverified
            .verify(&self.server_key)
            .map_err(|e| drop(DropReason::of_verify(&e)))?;
        let (header, body) = msg.into_parts();
        admissible(self, &header, &body).map_err(drop)?;
        let admission = self
            .guard
            .check(&header, now)
            .map_err(|e| drop(DropReason::of_guard(&e)))?;
        self.guard
            .commit(admission)
            .map_err(|e| drop(DropReason::of_guard(&e)))?;
        Ok((header, body))
    }
}

impl<S> Device<S> {
    /// This device's id.
    pub fn id(&self) -> DeviceId {
        self.core.id
    }

    /// Its server's id.
    pub fn server(&self) -> DeviceId {
        self.core.server
    }

    /// The topic to subscribe to (the server publishes here).
    pub fn topic_in(&self) -> String {
        self.core.topics.to_device(self.core.id)
    }

    /// The topic this device publishes to.
    pub fn topic_out(&self) -> String {
        self.core.topics.to_server(self.core.id)
    }

    /// Drop and acceptance counters.
    pub fn counters(&self) -> &Counters {
        &self.core.counters
    }

    /// Applies a deregistration: the engine and its signing key are dropped.
    pub fn erase(self, _grant: EraseGrant) -> Deregistered {
        Deregistered { id: self.core.id }
    }

    /// Asks the server to revoke this identity. The device is done with once the message is
    /// persisted and published: erase its stored key and state.
    #[allow(clippy::result_large_err)]
    pub fn deregister_request(
        mut self,
        now: u64,
    ) -> Result<MustPersist<(Deregistered, Outgoing), DeviceSnapshot>, (Self, EngineError)> {
        match self.core.send(
            Body::DeregisterRequest(DeregisterRequest),
            Token::random(),
            now,
        ) {
            Ok(o) => {
                let snap = self.core.snapshot(ST_DEREGISTERED, None);
                Ok(MustPersist::new(
                    snap,
                    (Deregistered { id: self.core.id }, o),
                ))
            }
            Err(e) => Err((self, e)),
        }
    }
}

impl Device<Registered> {
    /// A registered device of `key`, commanded by the server holding `server_key`.
    pub fn new(key: SigningKey, server_key: PublicKey, config: DeviceConfig) -> Self {
        Device {
            core: Core::new(key, server_key, config),
            state: Registered { attempt: None },
        }
    }

    /// The current state, to persist (e.g. right after [`Device::new`]).
    pub fn snapshot(&self) -> DeviceSnapshot {
        self.core
            .snapshot(ST_REGISTERED, self.state.attempt.as_ref())
    }

    /// Asks to join; the answer comes through [`Device::handle`]. A new request replaces an
    /// older one.
    pub fn request_join(
        &mut self,
        kind: JoinRequestKind,
        now: u64,
    ) -> Result<MustPersist<Outgoing, DeviceSnapshot>, EngineError> {
        let body = match kind {
            JoinRequestKind::Simple => Body::JoinRequest(JoinRequest),
            JoinRequestKind::Human => Body::HumanJoinRequest(HumanJoinRequest),
            JoinRequestKind::Observed { observer } => {
                Body::ObservedJoinRequest(ObservedJoinRequest { observer })
            }
        };
        let token = Token::random();
        let out = self.core.send(body, token.clone(), now)?;
        self.state.attempt = Some((kind, token));
        Ok(MustPersist::new(self.snapshot(), out))
    }

    /// Processes one message from the broker. `Err`: dropped, counted, no effect.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<MustPersist<DeviceHandled<RegisteredEvent>, DeviceSnapshot>, Dropped> {
        let attempt = self.state.attempt.clone();
        let (header, body) = self.core.inbound(topic, payload, now, |core, h, b| {
            let awaited = |ok: bool| match &attempt {
                Some((_, t)) if *t == h.token && ok => Ok(()),
                _ => Err(DropReason::UnknownToken),
            };
            match b {
                // A join command is obeyed only if it is the newest message from the server:
                // one sent before a terminate and delivered late must not re-join.
                Body::JoinCommand(_) => {
                    let highest = core.guard.peer(core.server).map_or(0, |p| p.highest());
                    if h.seq > highest {
                        Ok(())
                    } else {
                        Err(DropReason::Unexpected)
                    }
                }
                Body::IdRequest(_) | Body::DeregisterCommand(_) => Ok(()),
                Body::Response(_) => awaited(true),
                Body::HumanJoinResponse(_) => {
                    awaited(matches!(attempt, Some((JoinRequestKind::Human, _))))
                }
                Body::ObservedJoinResponse(_) => awaited(matches!(
                    attempt,
                    Some((JoinRequestKind::Observed { .. }, _))
                )),
                Body::Action(_)
                | Body::Data(_)
                | Body::Generic(_)
                | Body::Initiate(_)
                | Body::Activate(_)
                | Body::ObservationRequest(_)
                | Body::Terminate(_) => Err(DropReason::NotJoined),
                _ => Err(DropReason::Unexpected),
            }
        })?;
        let token = header.token;
        let mut status = ST_REGISTERED;
        let (event, reply) = match body {
            Body::Response(Response { status: s }) => {
                self.state.attempt = None;
                if s == Status::JoinOk {
                    status = ST_JOINED;
                    (RegisteredEvent::Joined(JoinGrant(())), None)
                } else {
                    (RegisteredEvent::JoinRefused { status: s }, None)
                }
            }
            Body::HumanJoinResponse(r) => (
                RegisteredEvent::ShowWords {
                    words: r.code.words(),
                },
                None,
            ),
            Body::ObservedJoinResponse(r) => (RegisteredEvent::PresentCode { code: r.code }, None),
            Body::JoinCommand(_) => {
                self.state.attempt = None;
                status = ST_JOINED;
                let reply = self.core.respond(token, Status::JoinOk, now);
                (RegisteredEvent::Joined(JoinGrant(())), reply)
            }
            Body::IdRequest(_) => {
                let reply = self.core.respond(token.clone(), Status::Identified, now);
                (RegisteredEvent::Identified { token }, reply)
            }
            _ => {
                // DeregisterCommand (admissible lets nothing else through).
                status = ST_DEREGISTERED;
                let reply = self.core.respond(token, Status::DeregisterOk, now);
                (RegisteredEvent::Deregistered(EraseGrant(())), reply)
            }
        };
        let snap = self.core.snapshot(status, self.state.attempt.as_ref());
        Ok(MustPersist::new(snap, DeviceHandled { event, reply }))
    }

    /// Applies an accepted join.
    pub fn join(self, _grant: JoinGrant) -> Device<Joined> {
        Device {
            core: self.core,
            state: Joined,
        }
    }
}

impl Device<Joined> {
    /// The current state, to persist.
    pub fn snapshot(&self) -> DeviceSnapshot {
        self.core.snapshot(ST_JOINED, None)
    }

    /// Processes one message from the broker. `Err`: dropped, counted, no effect.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<MustPersist<DeviceHandled<JoinedEvent>, DeviceSnapshot>, Dropped> {
        let (header, body) = self.core.inbound(topic, payload, now, |_, _, b| match b {
            Body::Action(_)
            | Body::Data(_)
            | Body::Generic(_)
            | Body::Initiate(_)
            | Body::Activate(_)
            | Body::IdRequest(_)
            | Body::ObservationRequest(_)
            | Body::Terminate(_)
            | Body::DeregisterCommand(_) => Ok(()),
            _ => Err(DropReason::Unexpected),
        })?;
        let token = header.token;
        let core = &mut self.core;
        let mut status = ST_JOINED;
        let (event, reply) = match body {
            Body::Action(a) => {
                core.owe(token.clone(), Owed::Command);
                (
                    JoinedEvent::Action {
                        action: a.action,
                        args: a.args,
                        token,
                    },
                    None,
                )
            }
            Body::Data(data) => {
                core.owe(token.clone(), Owed::Command);
                (JoinedEvent::Data { data, token }, None)
            }
            Body::Generic(g) => {
                core.owe(token.clone(), Owed::Command);
                (
                    JoinedEvent::Generic {
                        data: g.data,
                        token,
                    },
                    None,
                )
            }
            Body::Initiate(i) => {
                core.owe(token.clone(), Owed::Update);
                core.push_update(UpdateSlot {
                    token: token.clone(),
                    digest: i.digest,
                    verified: false,
                });
                (
                    JoinedEvent::Update {
                        url: i.url,
                        digest: i.digest,
                        token,
                    },
                    None,
                )
            }
            Body::Activate(a) => {
                let ready = core.updates.iter().any(|u| {
                    u.token == token && u.verified && bool::from(u.digest.ct_eq(&a.digest))
                });
                if ready {
                    core.owe(token.clone(), Owed::Activate);
                    core.updates.retain(|u| u.token != token);
                    (
                        JoinedEvent::Activate {
                            digest: a.digest,
                            token,
                        },
                        None,
                    )
                } else {
                    let reply = core.respond(token.clone(), Status::ActivateFail, now);
                    (JoinedEvent::ActivateRefused { token }, reply)
                }
            }
            Body::IdRequest(_) => {
                let reply = core.respond(token.clone(), Status::Identified, now);
                (JoinedEvent::Identified { token }, reply)
            }
            Body::ObservationRequest(o) => {
                core.owe(token.clone(), Owed::Observation(o.code));
                (
                    JoinedEvent::ObservationRequest {
                        joining: o.joining,
                        token,
                    },
                    None,
                )
            }
            Body::Terminate(_) => {
                status = ST_REGISTERED;
                let reply = core.respond(token, Status::TerminateOk, now);
                (JoinedEvent::Terminated(LeaveGrant(())), reply)
            }
            _ => {
                // DeregisterCommand (admissible lets nothing else through).
                status = ST_DEREGISTERED;
                let reply = core.respond(token, Status::DeregisterOk, now);
                (JoinedEvent::Deregistered(EraseGrant(())), reply)
            }
        };
        let snap = self.core.snapshot(status, None);
        Ok(MustPersist::new(snap, DeviceHandled { event, reply }))
    }

    /// Answers the command with `token` (an action, data, generic message or activation).
    /// Updates are answered by [`Device::update_downloaded`] on success, observations by
    /// [`Device::observe`].
    pub fn respond(
        &mut self,
        token: &Token,
        status: Status,
        now: u64,
    ) -> Result<MustPersist<Outgoing, DeviceSnapshot>, EngineError> {
        match self.core.owed.get(token) {
            None => return Err(EngineError::UnknownToken),
            Some(Owed::Observation(_)) => return Err(EngineError::StatusNotAllowed),
            Some(Owed::Update) if status == Status::UpdateSuccess => {
                return Err(EngineError::StatusNotAllowed)
            }
            Some(_) => {}
        }
        let out = self
            .core
            .send(Body::Response(Response { status }), token.clone(), now)?;
        self.core.settle(token);
        Ok(MustPersist::new(self.snapshot(), out))
    }

    /// Reports the download of the update with `token`: checks (in constant time) that
    /// `file`'s SHA-256 is the initiate's digest and answers [`Status::UpdateSuccess`]
    /// (the update may then be activated) or [`Status::UpdateFailDigest`].
    pub fn update_downloaded(
        &mut self,
        token: &Token,
        file: &[u8],
        now: u64,
    ) -> Result<MustPersist<Outgoing, DeviceSnapshot>, EngineError> {
        if !matches!(self.core.owed.get(token), Some(Owed::Update)) {
            return Err(EngineError::UnknownToken);
        }
        let slot = self
            .core
            .updates
            .iter()
            .position(|u| u.token == *token)
            .ok_or(EngineError::UnknownToken)?;
        let good = self
            .core
            .updates
            .get(slot)
            .is_some_and(|u| check_digest(file, &u.digest));
        let status = if good {
            Status::UpdateSuccess
        } else {
            Status::UpdateFailDigest
        };
        let out = self
            .core
            .send(Body::Response(Response { status }), token.clone(), now)?;
        if let Some(u) = self.core.updates.get_mut(slot) {
            u.verified = good;
        }
        self.core.settle(token);
        Ok(MustPersist::new(self.snapshot(), out))
    }

    /// Reports an observation: `observed` is the code the joining device presented (`None`
    /// if it could not be observed). Compared in constant time with the server's: equal →
    /// [`Status::ObservedJoinValid`], different → [`Status::ObservedJoinInvalid`], none →
    /// [`Status::ObservedJoinFail`].
    pub fn observe(
        &mut self,
        token: &Token,
        observed: Option<&JoinCode>,
        now: u64,
    ) -> Result<MustPersist<Outgoing, DeviceSnapshot>, EngineError> {
        let Some(Owed::Observation(expected)) = self.core.owed.get(token) else {
            return Err(EngineError::UnknownToken);
        };
        let status = match observed {
            Some(c) if c == expected => Status::ObservedJoinValid,
            Some(_) => Status::ObservedJoinInvalid,
            None => Status::ObservedJoinFail,
        };
        let out = self
            .core
            .send(Body::Response(Response { status }), token.clone(), now)?;
        self.core.settle(token);
        Ok(MustPersist::new(self.snapshot(), out))
    }

    /// Sends data to the server.
    pub fn send_data(
        &mut self,
        data: Data,
        now: u64,
    ) -> Result<MustPersist<Outgoing, DeviceSnapshot>, EngineError> {
        let out = self.core.send(Body::Data(data), Token::random(), now)?;
        Ok(MustPersist::new(self.snapshot(), out))
    }

    /// Sends a generic message to the server.
    pub fn send_generic(
        &mut self,
        data: Vec<u8>,
        now: u64,
    ) -> Result<MustPersist<Outgoing, DeviceSnapshot>, EngineError> {
        let out = self
            .core
            .send(Body::Generic(Generic { data }), Token::random(), now)?;
        Ok(MustPersist::new(self.snapshot(), out))
    }

    /// Leaves the fleet on the device's own initiative (it stays registered).
    #[allow(clippy::result_large_err)]
    pub fn resign(
        mut self,
        now: u64,
    ) -> Result<(Device<Registered>, DeviceSend), (Self, EngineError)> {
        match self.core.send(Body::Resign(Resign), Token::random(), now) {
            Ok(o) => {
                let d = Device {
                    core: self.core,
                    state: Registered { attempt: None },
                };
                let snap = d.snapshot();
                Ok((d, MustPersist::new(snap, o)))
            }
            Err(e) => Err((self, e)),
        }
    }

    /// Applies the server's termination: the device is registered again.
    pub fn leave(self, _grant: LeaveGrant) -> Device<Registered> {
        Device {
            core: self.core,
            state: Registered { attempt: None },
        }
    }
}
