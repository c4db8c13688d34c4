//! The C2 server's protocol logic (sans-IO): commands and their responses, updates, joins,
//! resignation, termination and deregistration.

use std::collections::{BTreeSet, HashMap};

use crate::guard::{Guard, GuardConfig, GuardState, PeerState};
use crate::keys::{DeviceId, KeyError, PublicKey, SigningKey};
use crate::registry::DeviceRecord;
pub use crate::registry::DeviceStatus;
use crate::topics::Topics;
use crate::wire::{
    Activate, Body, Data, DeregisterCommand, Envelope, HumanJoinResponse, Initiate, JoinCode,
    JoinCommand, Message, MessageType, ObservationRequest, ObservedJoinResponse, Reader, Response,
    Status, Terminate, Token, JOIN_CODE_LEN,
};

use super::join::{PendingJoin, PendingKind};
use super::{
    corrupt, put32, put8, seal, unseal, Counters, DropReason, Dropped, EngineError, JoinMethod,
    MustPersist, Outgoing, RefuseReason,
};

/// What the server engine knows of a device: the caller fills it from the fleet registry
/// ([`DeviceView::from_record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// The device's id.
    pub id: DeviceId,
    /// Its registered public key (and so its algorithm).
    pub key: PublicKey,
    /// Its status.
    pub status: DeviceStatus,
    /// The groups it belongs to.
    pub groups: BTreeSet<String>,
}

impl DeviceView {
    /// A view of `key` (id derived from it), with no groups.
    pub fn new(key: PublicKey, status: DeviceStatus) -> DeviceView {
        DeviceView {
            id: DeviceId::of_key(&key),
            key,
            status,
            groups: BTreeSet::new(),
        }
    }

    /// The view of a registry record (its key parsed and checked).
    pub fn from_record(record: &DeviceRecord) -> Result<DeviceView, KeyError> {
        Ok(DeviceView {
            id: record.id,
            key: record.key()?,
            status: record.status,
            groups: record.groups.iter().cloned().collect(),
        })
    }
}

/// How simple join requests are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinPolicy {
    /// Every registered device that asks is joined.
    Automatic,
    /// The operator decides ([`ServerEngine::decide_join`]).
    Moderated,
}

/// The server engine's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Replay guard bounds.
    pub guard: GuardConfig,
    /// How simple join requests are answered.
    pub join_policy: JoinPolicy,
    /// Length of join codes in bytes (= words).
    pub join_code_len: usize,
    /// How long a join may wait for its decision, in seconds.
    pub join_ttl: u64,
    /// Lifetime of the replies the engine sends on its own (join outcomes, acknowledgements).
    pub reply_lifetime: u64,
    /// How long after a command's expiry a response is still matched, in seconds.
    pub response_grace: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            guard: GuardConfig::default(),
            join_policy: JoinPolicy::Moderated,
            join_code_len: JOIN_CODE_LEN,
            join_ttl: 600,
            reply_lifetime: 300,
            response_grace: 60,
        }
    }
}

/// What a tracked token was sent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// [`ServerEngine::command`]: an action, data, generic or ID request.
    Command(MessageType),
    /// An update initiate with this digest.
    Update {
        /// SHA-256 of the update.
        digest: [u8; 32],
    },
    /// The activation of the update with this digest.
    Activate {
        /// SHA-256 of the update.
        digest: [u8; 32],
    },
    /// A join command.
    Join,
    /// An observation request about `joining`.
    Observation {
        /// The device being observed.
        joining: DeviceId,
    },
    /// A terminate command.
    Terminate,
    /// A deregister command.
    Deregister,
}

/// Where a tracked command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent, no response yet.
    Pending,
    /// The device answered.
    Answered(Status),
    /// No response came before the command's expiry plus the grace period.
    Expired,
}

#[derive(Debug, Clone)]
struct Tracked {
    device: DeviceId,
    kind: CommandKind,
    expiry: u64,
    outcome: Outcome,
}

/// Who a group command goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Every device in this group.
    Group(String),
    /// These devices.
    Devices(Vec<DeviceId>),
}

/// The result of a group command: one message per device, and the devices left out.
#[derive(Debug, Default)]
pub struct SendReport {
    /// The messages to publish, one per device.
    pub sent: Vec<Outgoing>,
    /// Devices that got nothing, and why (not joined, unknown...).
    pub skipped: Vec<(DeviceId, EngineError)>,
}

/// The replay states changed by a call, to persist before using its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerUpdates(Vec<(DeviceId, PeerState)>);

impl PeerUpdates {
    /// The peers and their new states.
    pub fn peers(&self) -> &[(DeviceId, PeerState)] {
        &self.0
    }

    /// Each peer with its state's stable encoding ([`PeerState::encode`]).
    pub fn encoded(&self) -> Vec<(DeviceId, Vec<u8>)> {
        self.0.iter().map(|(id, s)| (*id, s.encode())).collect()
    }
}

/// Something the server application must know of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A device answered a tracked command.
    Response {
        /// Who answered.
        device: DeviceId,
        /// The command's token.
        token: Token,
        /// What the command was.
        kind: CommandKind,
        /// The device's status code.
        status: Status,
    },
    /// A joined device sent data.
    Data {
        /// Who sent it.
        device: DeviceId,
        /// The message's token.
        token: Token,
        /// The data.
        data: Data,
    },
    /// A joined device sent a generic message.
    Generic {
        /// Who sent it.
        device: DeviceId,
        /// The message's token.
        token: Token,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A device's status changed; mirror it in the registry.
    StatusChanged {
        /// The device.
        device: DeviceId,
        /// Its new status.
        status: DeviceStatus,
    },
    /// A simple join request awaits the operator ([`ServerEngine::decide_join`]).
    JoinRequested {
        /// The device.
        device: DeviceId,
    },
    /// A human-moderated join awaits the operator: show these words on the console
    /// ([`ServerEngine::operator_decide`]).
    HumanJoinPending {
        /// The device.
        device: DeviceId,
        /// The words the device shows too.
        words: Vec<&'static str>,
    },
    /// An observed join waits for its observer.
    ObservationStarted {
        /// The joining device.
        device: DeviceId,
        /// The observer.
        observer: DeviceId,
    },
    /// A device joined.
    Joined {
        /// The device.
        device: DeviceId,
        /// How.
        method: JoinMethod,
    },
    /// A join was refused.
    JoinRefused {
        /// The device.
        device: DeviceId,
        /// How it tried.
        method: JoinMethod,
        /// Why it was refused.
        reason: RefuseReason,
    },
    /// A device resigned from the fleet (it is registered again).
    Resigned {
        /// The device.
        device: DeviceId,
    },
    /// A device asked to be deregistered; it is now revoked: revoke it in the registry and
    /// the broker.
    DeregisterRequested {
        /// The device.
        device: DeviceId,
    },
    /// A tracked command got no response in time.
    CommandExpired {
        /// The device.
        device: DeviceId,
        /// The command's token.
        token: Token,
    },
}

/// What [`ServerEngine::handle`] returns for an accepted message.
#[derive(Debug, Default)]
pub struct ServerHandled {
    /// Events, in order.
    pub events: Vec<ServerEvent>,
    /// Messages to publish (replies, observation requests).
    pub outgoing: Vec<Outgoing>,
}

/// An operator's join decision, to publish.
#[derive(Debug)]
pub struct JoinDecision {
    /// Whether the device joined.
    pub joined: bool,
    /// Why not, if not.
    pub reason: Option<RefuseReason>,
    /// The response to the device (join ok or refused).
    pub outgoing: Outgoing,
    /// The status change and the join's outcome, as events.
    pub events: Vec<ServerEvent>,
}

/// The C2 server's sans-IO engine.
///
/// # Call order
///
/// - Fill the device view from the registry ([`ServerEngine::upsert_device`]); keep it in
///   step with the registry (each [`ServerEvent::StatusChanged`] goes back to it).
/// - For each MQTT message on [`Topics::server_filter`]: [`ServerEngine::handle`] → on
///   `Ok`, [`MustPersist::persist`] the peer states (durably), then publish the outgoing
///   messages and act on the events; on `Err`, the message had no effect.
/// - Commands ([`ServerEngine::command`], [`ServerEngine::command_group`],
///   [`ServerEngine::initiate_update`], …) likewise: persist, then publish.
/// - Call [`ServerEngine::tick`] now and then to expire commands and joins.
/// - [`ServerEngine::export_state`] / [`ServerEngine::from_state`] carry the replay state,
///   pending joins and tracked tokens across restarts.
#[derive(Debug)]
pub struct ServerEngine {
    key: SigningKey,
    id: DeviceId,
    topics: Topics,
    config: ServerConfig,
    guard: Guard,
    devices: HashMap<DeviceId, DeviceView>,
    tracked: HashMap<Token, Tracked>,
    joins: HashMap<DeviceId, PendingJoin>,
    counters: Counters,
}

const STATE_MAGIC: &[u8; 4] = b"KC2S";
const STATE_VERSION: u8 = 1;

impl ServerEngine {
    /// A fresh engine for the server holding `key` (its id is the key's).
    pub fn new(key: SigningKey, config: ServerConfig) -> ServerEngine {
        let id = key.device_id();
        ServerEngine {
            guard: Guard::new(id, config.guard),
            topics: Topics::new(id),
            id,
            key,
            config,
            devices: HashMap::new(),
            tracked: HashMap::new(),
            joins: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// An engine continuing from [`ServerEngine::export_state`]'s bytes. The device view
    /// starts empty: fill it from the registry.
    pub fn from_state(
        key: SigningKey,
        config: ServerConfig,
        state: &[u8],
    ) -> Result<ServerEngine, EngineError> {
        let mut e = ServerEngine::new(key, config);
        let body = unseal(state, STATE_MAGIC, STATE_VERSION)?;
        let mut r = Reader::new(body);
        let guard_len = r.u32().map_err(corrupt)? as usize;
        let gs = GuardState::decode(r.take(guard_len).map_err(corrupt)?)?;
        e.guard = Guard::from_state(e.id, config.guard, gs);
        let n = r.u32().map_err(corrupt)?;
        for _ in 0..n {
            let id = DeviceId(r.array().map_err(corrupt)?);
            let j = PendingJoin::decode(&mut r)?;
            e.joins.insert(id, j);
        }
        let n = r.u32().map_err(corrupt)?;
        for _ in 0..n {
            let token = Token::new(r.vec8().map_err(corrupt)?).map_err(corrupt)?;
            let device = DeviceId(r.array().map_err(corrupt)?);
            let kind = decode_kind(&mut r)?;
            let expiry = r.u64().map_err(corrupt)?;
            let outcome = match r.u8().map_err(corrupt)? {
                0 => Outcome::Pending,
                1 => Outcome::Answered(Status::from_code(r.u8().map_err(corrupt)?)),
                2 => Outcome::Expired,
                _ => return Err(EngineError::Corrupt("outcome")),
            };
            e.tracked.insert(
                token,
                Tracked {
                    device,
                    kind,
                    expiry,
                    outcome,
                },
            );
        }
        r.expect_end().map_err(corrupt)?;
        Ok(e)
    }

    /// The engine's state: `KC2S`, version 1, the guard state (u32 length), the pending
    /// joins, the tracked tokens, and an 8-byte SHA-256 prefix (docs/C2-engine.md).
    pub fn export_state(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(STATE_MAGIC);
        out.push(STATE_VERSION);
        put32(&mut out, &self.guard.state().encode());
        let mut joins: Vec<_> = self.joins.iter().collect();
        joins.sort_by_key(|(id, _)| **id);
        out.extend_from_slice(&(joins.len() as u32).to_be_bytes());
        for (id, j) in joins {
            out.extend_from_slice(&id.0);
            j.encode(&mut out);
        }
        out.extend_from_slice(&(self.tracked.len() as u32).to_be_bytes());
        for (token, t) in &self.tracked {
            put8(&mut out, token.as_bytes());
            out.extend_from_slice(&t.device.0);
            encode_kind(&t.kind, &mut out);
            out.extend_from_slice(&t.expiry.to_be_bytes());
            match t.outcome {
                Outcome::Pending => out.push(0),
                Outcome::Answered(s) => out.extend_from_slice(&[1, s.code()]),
                Outcome::Expired => out.push(2),
            }
        }
        seal(out)
    }

    /// The server's id.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The fleet's topics.
    pub fn topics(&self) -> Topics {
        self.topics
    }

    /// Drop and acceptance counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Adds or replaces a device's record. A record with status Revoked drops the device's
    /// pending join and the observations related to it, so no later approval or
    /// confirmation can re-admit it. A device the engine knows as revoked stays revoked
    /// (a record saying otherwise keeps Revoked, with a warning): a revoked identity is
    /// removed ([`ServerEngine::remove_device`]) and enrolled again, never brought back.
    pub fn upsert_device(&mut self, mut record: DeviceView) {
        let id = record.id;
        let was_revoked = self
            .devices
            .get(&id)
            .is_some_and(|d| d.status == DeviceStatus::Revoked);
        if was_revoked && record.status != DeviceStatus::Revoked {
            tracing::warn!(device = %id, status = record.status.name(), "c2: a revoked device stays revoked");
            record.status = DeviceStatus::Revoked;
        }
        if record.status != DeviceStatus::PendingJoin {
            // A join is only ever decided for a device still pending.
            self.drop_join(id);
        }
        if record.status == DeviceStatus::Revoked {
            self.forget_pending(id);
        }
        self.devices.insert(id, record);
    }

    /// Sets a device's status in the engine's view (an operator's change, mirrored from the
    /// registry). Leaving Revoked is refused ([`EngineError::Revoked`]); revoking drops
    /// the device's pending join and related observations; any status other than
    /// PendingJoin ends a pending join.
    pub fn set_status(
        &mut self,
        device: DeviceId,
        status: DeviceStatus,
    ) -> Result<(), EngineError> {
        match self.status(device)? {
            DeviceStatus::Revoked if status != DeviceStatus::Revoked => {
                return Err(EngineError::Revoked(device))
            }
            _ => {}
        }
        if status != DeviceStatus::PendingJoin {
            self.drop_join(device);
        }
        self.change_status(device, status);
        Ok(())
    }

    /// Removes a device's record (its messages are then dropped as from an unknown sender).
    pub fn remove_device(&mut self, id: DeviceId) -> Option<DeviceView> {
        self.forget_pending(id);
        self.devices.remove(&id)
    }

    /// Resets the continuity of `device` after a legitimate re-install that lost its
    /// counters (same key, fresh agent state): the receive window for its messages and the
    /// send counter for messages to it start afresh, its pending join and observations are
    /// dropped. Its status is unchanged (a re-installed agent starts registered: terminate
    /// or re-join it as needed). The fresh peer state comes inside the [`MustPersist`]:
    /// store it (registry counters) before using the engine further, so a restart does not
    /// bring the old window back.
    ///
    /// Risk: messages the device sent before, recorded by someone and not yet expired
    /// ([`crate::guard::GuardConfig::max_lifetime`] at most), can be replayed once more.
    /// Refused for an unknown ([`EngineError::UnknownDevice`]) or revoked
    /// ([`EngineError::Revoked`]) device.
    pub fn reset_continuity(
        &mut self,
        device: DeviceId,
    ) -> Result<MustPersist<(), PeerUpdates>, EngineError> {
        if self.status(device)? == DeviceStatus::Revoked {
            return Err(EngineError::Revoked(device));
        }
        self.guard.reset_peer(device);
        self.forget_pending(device);
        tracing::warn!(%device, "c2: continuity reset by the operator");
        Ok(MustPersist::new(self.updates(&[device]), ()))
    }

    /// Installs a peer's persisted replay state (e.g. read from the registry's counters at
    /// start, which are never older than an exported state's).
    pub fn load_peer(&mut self, peer: DeviceId, state: PeerState) {
        self.guard.load_peer(peer, state);
    }

    /// A device's record.
    pub fn device(&self, id: DeviceId) -> Option<&DeviceView> {
        self.devices.get(&id)
    }

    /// Whether the command with `token` is still waiting for its response.
    pub fn pending(&self, token: &Token) -> bool {
        self.outcome(token) == Some(Outcome::Pending)
    }

    /// Where the command with `token` stands, if it is tracked.
    pub fn outcome(&self, token: &Token) -> Option<Outcome> {
        self.tracked.get(token).map(|t| t.outcome)
    }

    /// The device and kind of the command with `token`.
    pub fn tracked(&self, token: &Token) -> Option<(DeviceId, CommandKind)> {
        self.tracked.get(token).map(|t| (t.device, t.kind))
    }

    /// Stops tracking `token`.
    pub fn forget(&mut self, token: &Token) {
        self.tracked.remove(token);
    }

    /// Stops tracking every answered or expired command, except updates that may still be
    /// activated.
    pub fn prune_settled(&mut self) {
        self.tracked.retain(|_, t| {
            t.outcome == Outcome::Pending || matches!(t.kind, CommandKind::Update { .. })
        });
    }

    /// The words of a pending human-moderated join, for the operator's console.
    pub fn join_words(&self, device: DeviceId) -> Option<Vec<&'static str>> {
        match &self.joins.get(&device)?.kind {
            PendingKind::Human { code } => Some(code.words()),
            _ => None,
        }
    }

    /// The devices whose join awaits a decision, with the method.
    pub fn pending_joins(&self) -> Vec<(DeviceId, JoinMethod)> {
        let mut v: Vec<_> = self.joins.iter().map(|(d, j)| (*d, j.method())).collect();
        v.sort_by_key(|(d, _)| *d);
        v
    }

    // ---- outbound ----

    /// Sends an action, data, generic or ID request to one device, with a fresh random
    /// token that [`ServerEngine::outcome`] then tracks. Actions, data and generic messages
    /// go to joined devices only; ID requests to any device that is not revoked.
    pub fn command(
        &mut self,
        device: DeviceId,
        body: Body,
        expiry: u64,
        now: u64,
    ) -> Result<MustPersist<Outgoing, PeerUpdates>, EngineError> {
        let ty = command_type(&body)?;
        self.check_expiry(expiry, now)?;
        self.commandable(device, ty)?;
        let out = self.send_tracked(device, body, CommandKind::Command(ty), expiry)?;
        Ok(MustPersist::new(self.updates(&[device]), out))
    }

    /// Sends `body` to every target (one signed message each, each with its own sequence
    /// number and random token). Targets that cannot be commanded are reported in
    /// [`SendReport::skipped`].
    pub fn command_group(
        &mut self,
        targets: &Targets,
        body: Body,
        expiry: u64,
        now: u64,
    ) -> Result<MustPersist<SendReport, PeerUpdates>, EngineError> {
        let ty = command_type(&body)?;
        self.check_expiry(expiry, now)?;
        let ids: Vec<DeviceId> = match targets {
            Targets::Devices(v) => v.clone(),
            Targets::Group(g) => {
                let mut v: Vec<_> = self
                    .devices
                    .values()
                    .filter(|d| d.groups.contains(g))
                    .map(|d| d.id)
                    .collect();
                v.sort();
                v
            }
        };
        let mut report = SendReport::default();
        let mut touched = Vec::new();
        for id in ids {
            let r = self.commandable(id, ty).and_then(|()| {
                self.send_tracked(id, body.clone(), CommandKind::Command(ty), expiry)
            });
            match r {
                Ok(o) => {
                    touched.push(id);
                    report.sent.push(o);
                }
                Err(e) => report.skipped.push((id, e)),
            }
        }
        Ok(MustPersist::new(self.updates(&touched), report))
    }

    /// Starts an update: the device downloads `url`, checks that its SHA-256 is `digest`
    /// and responds; then [`ServerEngine::activate`] with the same token.
    pub fn initiate_update(
        &mut self,
        device: DeviceId,
        url: &str,
        digest: [u8; 32],
        expiry: u64,
        now: u64,
    ) -> Result<MustPersist<Outgoing, PeerUpdates>, EngineError> {
        self.check_expiry(expiry, now)?;
        self.commandable(device, MessageType::Initiate)?;
        let body = Body::Initiate(Initiate {
            url: url.to_owned(),
            digest,
        });
        let out = self.send_tracked(device, body, CommandKind::Update { digest }, expiry)?;
        Ok(MustPersist::new(self.updates(&[device]), out))
    }

    /// Activates the update the device reported as downloaded and verified (its response to
    /// the initiate with `token` was [`Status::UpdateSuccess`]). The activate message repeats
    /// the token and the digest; the token is then tracked for the activation's response.
    pub fn activate(
        &mut self,
        device: DeviceId,
        token: &Token,
        expiry: u64,
        now: u64,
    ) -> Result<MustPersist<Outgoing, PeerUpdates>, EngineError> {
        self.check_expiry(expiry, now)?;
        self.commandable(device, MessageType::Activate)?;
        let t = self.tracked.get(token).ok_or(EngineError::UnknownToken)?;
        let digest = match (t.kind, t.outcome) {
            (CommandKind::Update { digest }, Outcome::Answered(Status::UpdateSuccess))
                if t.device == device =>
            {
                digest
            }
            _ if t.device != device => return Err(EngineError::UnknownToken),
            _ => return Err(EngineError::UpdateNotReady),
        };
        let body = Body::Activate(Activate { digest });
        let out = self.send(device, body, token.clone(), expiry)?;
        self.tracked.insert(
            token.clone(),
            Tracked {
                device,
                kind: CommandKind::Activate { digest },
                expiry,
                outcome: Outcome::Pending,
            },
        );
        Ok(MustPersist::new(self.updates(&[device]), out))
    }

    /// Sends a join command to a registered device; it joins when the device answers
    /// [`Status::JoinOk`] ([`ServerEvent::Joined`]).
    pub fn join_command(
        &mut self,
        device: DeviceId,
        expiry: u64,
        now: u64,
    ) -> Result<MustPersist<Outgoing, PeerUpdates>, EngineError> {
        self.check_expiry(expiry, now)?;
        match self.status(device)? {
            DeviceStatus::Joined => return Err(EngineError::AlreadyJoined(device)),
            DeviceStatus::Revoked => return Err(EngineError::Revoked(device)),
            _ => {}
        }
        let body = Body::JoinCommand(JoinCommand);
        let out = self.send_tracked(device, body, CommandKind::Join, expiry)?;
        Ok(MustPersist::new(self.updates(&[device]), out))
    }

    /// Tells a joined device to leave the fleet. The device is registered again at once
    /// (nothing more it sends is acted on); its response is tracked under the token.
    pub fn terminate(
        &mut self,
        device: DeviceId,
        expiry: u64,
        now: u64,
    ) -> Result<MustPersist<Outgoing, PeerUpdates>, EngineError> {
        self.check_expiry(expiry, now)?;
        self.commandable(device, MessageType::Terminate)?;
        let out = self.send_tracked(
            device,
            Body::Terminate(Terminate),
            CommandKind::Terminate,
            expiry,
        )?;
        self.change_status(device, DeviceStatus::Registered);
        // A join command answered late, or an observation it was asked for, must not count.
        self.forget_pending(device);
        Ok(MustPersist::new(self.updates(&[device]), out))
    }

    /// Tells a device that its identity is revoked. The device is revoked at once (its later
    /// messages, including its response, are dropped): revoke it in the registry and broker.
    pub fn deregister(
        &mut self,
        device: DeviceId,
        expiry: u64,
        now: u64,
    ) -> Result<MustPersist<Outgoing, PeerUpdates>, EngineError> {
        self.check_expiry(expiry, now)?;
        if self.status(device)? == DeviceStatus::Revoked {
            return Err(EngineError::Revoked(device));
        }
        let body = Body::DeregisterCommand(DeregisterCommand);
        let out = self.send_tracked(device, body, CommandKind::Deregister, expiry)?;
        self.change_status(device, DeviceStatus::Revoked);
        Ok(MustPersist::new(self.updates(&[device]), out))
    }

    /// The operator's decision on a simple join request (under [`JoinPolicy::Moderated`]).
    pub fn decide_join(
        &mut self,
        device: DeviceId,
        accept: bool,
        now: u64,
    ) -> Result<MustPersist<JoinDecision, PeerUpdates>, EngineError> {
        match self.joins.get(&device) {
            Some(j) if matches!(j.kind, PendingKind::Simple) => {}
            _ => return Err(EngineError::NoPendingJoin(device)),
        }
        let reason = (!accept).then_some(RefuseReason::Operator);
        self.finish_join(device, reason, now)
    }

    /// The operator's decision on a human-moderated join: `accept` with the words the operator
    /// read on the device and typed back. Only a pending *human-moderated* join is decided
    /// here ([`EngineError::NoPendingJoin`] otherwise), and only while the device is still
    /// pending ([`EngineError::Revoked`] once revoked). Wrong or unknown words refuse the join (and end
    /// it: the device must ask again, with a new code).
    pub fn operator_decide<S: AsRef<str>>(
        &mut self,
        device: DeviceId,
        accept: bool,
        words_typed: &[S],
        now: u64,
    ) -> Result<MustPersist<JoinDecision, PeerUpdates>, EngineError> {
        let code = match self.joins.get(&device).map(|j| &j.kind) {
            Some(PendingKind::Human { code }) => code.clone(),
            _ => return Err(EngineError::NoPendingJoin(device)),
        };
        let reason = if !accept {
            Some(RefuseReason::Operator)
        } else if JoinCode::from_words(words_typed).as_ref() != Some(&code) {
            Some(RefuseReason::WrongCode)
        } else {
            None
        };
        self.finish_join(device, reason, now)
    }

    /// Expires commands whose response did not come by their expiry plus the grace period,
    /// and joins not decided in time (the device is registered again); refuses observed
    /// joins whose observer is no longer joined. Expired joins are pruned here (with their
    /// observation tokens), so call it regularly: open joins are bounded by
    /// [`super::MAX_PENDING_JOINS`].
    pub fn tick(&mut self, now: u64) -> Vec<ServerEvent> {
        let mut events = Vec::new();
        let grace = self.config.response_grace;
        let mut expired: Vec<(Token, DeviceId)> = self
            .tracked
            .iter_mut()
            .filter(|(_, t)| t.outcome == Outcome::Pending && now > t.expiry.saturating_add(grace))
            .map(|(tok, t)| {
                t.outcome = Outcome::Expired;
                (tok.clone(), t.device)
            })
            .collect();
        expired.sort_by_key(|e| e.1);
        for (token, device) in expired {
            events.push(ServerEvent::CommandExpired { device, token });
        }
        let mut late: Vec<DeviceId> = self
            .joins
            .iter()
            .filter(|(_, j)| now > j.expires)
            .map(|(d, _)| *d)
            .collect();
        late.sort();
        // Observed joins whose observer cannot observe any more (left, revoked, removed).
        let mut orphaned: Vec<DeviceId> = self
            .joins
            .iter()
            .filter(|(d, j)| {
                !late.contains(d)
                    && matches!(j.kind, PendingKind::Observed { observer, .. }
                        if self.status(observer).ok() != Some(DeviceStatus::Joined))
            })
            .map(|(d, _)| *d)
            .collect();
        orphaned.sort();
        let ended = late.into_iter().map(|d| (d, RefuseReason::Expired)).chain(
            orphaned
                .into_iter()
                .map(|d| (d, RefuseReason::ObserverRejected)),
        );
        for (device, reason) in ended {
            if let Some(j) = self.drop_join(device) {
                events.push(ServerEvent::JoinRefused {
                    device,
                    method: j.method(),
                    reason,
                });
                // Only a device still pending goes back to registered.
                if self.status(device).ok() == Some(DeviceStatus::PendingJoin)
                    && self.change_status(device, DeviceStatus::Registered)
                {
                    events.push(ServerEvent::StatusChanged {
                        device,
                        status: DeviceStatus::Registered,
                    });
                }
            }
        }
        events
    }

    // ---- inbound ----

    /// Processes one message the broker delivered on `topic` (see the module docs for the
    /// order of checks). `Err`: dropped, counted, no effect. `Ok`: persist the record, then
    /// publish [`ServerHandled::outgoing`] and act on [`ServerHandled::events`].
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<MustPersist<ServerHandled, PeerUpdates>, Dropped> {
        match self.inbound(topic, payload, now) {
            Ok(v) => {
                self.counters.accept();
                Ok(v)
            }
            Err(d) => {
                self.counters.count(&d);
                Err(d)
            }
        }
    }

    fn inbound(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<MustPersist<ServerHandled, PeerUpdates>, Dropped> {
        let drop = |reason, sender, msg_type| Dropped {
            reason,
            sender,
            msg_type,
        };
        let from_topic =
            self.topics
                .sender_of(topic)
                .ok_or(drop(DropReason::WrongTopic, None, None))?;
        let unverified = Message::decode(payload)
            .map_err(|_| drop(DropReason::Malformed, Some(from_topic), None))?;
        let (sender, ty) = (unverified.header().sender, unverified.header().msg_type);
        let drop = |reason| Dropped {
            reason,
            sender: Some(sender),
            msg_type: Some(ty),
        };
        if sender != from_topic {
            return Err(drop(DropReason::SenderMismatch));
        }
        if unverified.header().recipient != self.id {
            return Err(drop(DropReason::WrongRecipient));
        }
        let rec = self
            .devices
            .get(&sender)
            .ok_or(drop(DropReason::UnknownSender))?;
        if rec.status == DeviceStatus::Revoked {
            return Err(drop(DropReason::Revoked));
        }
        let status = rec.status;
        // Cheap, read-only checks before the public-key work; nothing moves until commit.
        self.guard
            .precheck(unverified.header(), now)
            .map_err(|e| drop(DropReason::of_guard(&e)))?;
        let msg = unverified
            .verify(&rec.key)
            .map_err(|e| drop(DropReason::of_verify(&e)))?;
        let (header, body) = msg.into_parts();
        self.admissible(sender, status, &header.token, &body, now)
            .map_err(drop)?;
        let admission = self
            .guard
            .check(&header, now)
            .map_err(|e| drop(DropReason::of_guard(&e)))?;
        self.guard
            .commit(admission)
            .map_err(|e| drop(DropReason::of_guard(&e)))?;
        let mut touched = vec![sender];
        let handled = self.act(sender, header.token, body, now, &mut touched);
        Ok(MustPersist::new(self.updates(&touched), handled))
    }

    /// Whether a verified message makes sense from `sender` in `status`. Changes nothing.
    fn admissible(
        &self,
        sender: DeviceId,
        status: DeviceStatus,
        token: &Token,
        body: &Body,
        now: u64,
    ) -> Result<(), DropReason> {
        let joined = status == DeviceStatus::Joined;
        match body {
            Body::Response(_) => {
                let t = self.tracked.get(token).ok_or(DropReason::UnknownToken)?;
                if t.device != sender || t.outcome != Outcome::Pending {
                    return Err(DropReason::UnknownToken);
                }
                if let CommandKind::Observation { joining } = t.kind {
                    match self.joins.get(&joining).map(|j| &j.kind) {
                        Some(PendingKind::Observed {
                            observer,
                            observation,
                            ..
                        }) if *observer == sender && observation == token => {}
                        _ => return Err(DropReason::UnknownToken),
                    }
                    // The observer vouches only while it is a member; the device it vouches
                    // for must still be pending (not revoked meanwhile).
                    if !joined {
                        return Err(DropReason::NotJoined);
                    }
                    if self.status(joining).ok() != Some(DeviceStatus::PendingJoin) {
                        return Err(DropReason::UnknownToken);
                    }
                }
                Ok(())
            }
            Body::Data(_) | Body::Generic(_) | Body::Resign(_) => {
                if joined {
                    Ok(())
                } else {
                    Err(DropReason::NotJoined)
                }
            }
            Body::JoinRequest(_) | Body::HumanJoinRequest(_) | Body::ObservedJoinRequest(_) => {
                if joined {
                    return Err(DropReason::Unexpected);
                }
                match self.joins.get(&sender) {
                    // The words being compared cannot be reset by a new request.
                    Some(j) if j.locks_out_requests(now) => {
                        tracing::warn!(device = %sender, method = ?j.method(),
                            "c2 join request refused: a join with a code is in progress");
                        Err(DropReason::JoinInProgress)
                    }
                    Some(_) => Ok(()),
                    None => {
                        let opens = !matches!(body, Body::JoinRequest(_))
                            || self.config.join_policy == JoinPolicy::Moderated;
                        if opens && self.joins.len() >= super::MAX_PENDING_JOINS {
                            tracing::warn!(device = %sender, "c2 join request refused: too many open joins");
                            Err(DropReason::TooManyJoins)
                        } else {
                            Ok(())
                        }
                    }
                }
            }
            Body::DeregisterRequest(_) => Ok(()),
            _ => Err(DropReason::Unexpected),
        }
    }

    fn act(
        &mut self,
        sender: DeviceId,
        token: Token,
        body: Body,
        now: u64,
        touched: &mut Vec<DeviceId>,
    ) -> ServerHandled {
        let mut h = ServerHandled::default();
        let reply_expiry = now.saturating_add(self.config.reply_lifetime);
        match body {
            Body::Response(Response { status }) => {
                self.on_response(sender, token, status, now, touched, &mut h);
            }
            Body::Data(data) => h.events.push(ServerEvent::Data {
                device: sender,
                token,
                data,
            }),
            Body::Generic(g) => h.events.push(ServerEvent::Generic {
                device: sender,
                token,
                data: g.data,
            }),
            Body::JoinRequest(_) => {
                if self.config.join_policy == JoinPolicy::Automatic {
                    self.drop_join(sender);
                    self.status_event(sender, DeviceStatus::Joined, &mut h);
                    h.events.push(ServerEvent::Joined {
                        device: sender,
                        method: JoinMethod::Simple,
                    });
                    self.reply(sender, token, Status::JoinOk, reply_expiry, &mut h);
                } else {
                    self.open_join(sender, token, PendingKind::Simple, now);
                    self.status_event(sender, DeviceStatus::PendingJoin, &mut h);
                    h.events.push(ServerEvent::JoinRequested { device: sender });
                }
            }
            Body::HumanJoinRequest(_) => {
                let code = JoinCode::random(self.config.join_code_len);
                let words = code.words();
                let body = Body::HumanJoinResponse(HumanJoinResponse { code: code.clone() });
                self.open_join(sender, token.clone(), PendingKind::Human { code }, now);
                self.status_event(sender, DeviceStatus::PendingJoin, &mut h);
                self.push_send(sender, body, token, self.join_expiry(now), &mut h);
                h.events.push(ServerEvent::HumanJoinPending {
                    device: sender,
                    words,
                });
            }
            Body::ObservedJoinRequest(req) => {
                let observer = req.observer;
                let ok = observer != sender
                    && self
                        .devices
                        .get(&observer)
                        .is_some_and(|d| d.status == DeviceStatus::Joined);
                if !ok {
                    self.drop_join(sender);
                    if self.change_status(sender, DeviceStatus::Registered) {
                        h.events.push(ServerEvent::StatusChanged {
                            device: sender,
                            status: DeviceStatus::Registered,
                        });
                    }
                    h.events.push(ServerEvent::JoinRefused {
                        device: sender,
                        method: JoinMethod::Observed,
                        reason: RefuseReason::BadObserver,
                    });
                    self.reply(sender, token, Status::JoinRefused, reply_expiry, &mut h);
                } else {
                    let code = JoinCode::random(self.config.join_code_len);
                    let observation = Token::random();
                    let expiry = self.join_expiry(now);
                    let to_joining =
                        Body::ObservedJoinResponse(ObservedJoinResponse { code: code.clone() });
                    let to_observer = Body::ObservationRequest(ObservationRequest {
                        joining: sender,
                        code: code.clone(),
                    });
                    self.open_join(
                        sender,
                        token.clone(),
                        PendingKind::Observed {
                            observer,
                            code,
                            observation: observation.clone(),
                        },
                        now,
                    );
                    self.status_event(sender, DeviceStatus::PendingJoin, &mut h);
                    self.push_send(sender, to_joining, token, expiry, &mut h);
                    if self.push_send(observer, to_observer, observation.clone(), expiry, &mut h) {
                        touched.push(observer);
                        self.tracked.insert(
                            observation,
                            Tracked {
                                device: observer,
                                kind: CommandKind::Observation { joining: sender },
                                expiry,
                                outcome: Outcome::Pending,
                            },
                        );
                    }
                    h.events.push(ServerEvent::ObservationStarted {
                        device: sender,
                        observer,
                    });
                }
            }
            Body::Resign(_) => {
                self.status_event(sender, DeviceStatus::Registered, &mut h);
                self.forget_pending(sender);
                // No reply: the device left on its own and awaits nothing.
                h.events.push(ServerEvent::Resigned { device: sender });
            }
            Body::DeregisterRequest(_) => {
                // No reply: the device erased its identity after sending the request.
                self.status_event(sender, DeviceStatus::Revoked, &mut h);
                h.events
                    .push(ServerEvent::DeregisterRequested { device: sender });
            }
            // `admissible` lets nothing else through.
            _ => {}
        }
        h
    }

    fn on_response(
        &mut self,
        sender: DeviceId,
        token: Token,
        status: Status,
        now: u64,
        touched: &mut Vec<DeviceId>,
        h: &mut ServerHandled,
    ) {
        let Some(t) = self.tracked.get_mut(&token) else {
            return;
        };
        t.outcome = Outcome::Answered(status);
        let kind = t.kind;
        h.events.push(ServerEvent::Response {
            device: sender,
            token: token.clone(),
            kind,
            status,
        });
        match kind {
            CommandKind::Join => {
                // `admissible` let this through only for a device neither joined nor
                // revoked, with the join command still pending (terminate, revocation and
                // removal settle it).
                if status == Status::JoinOk
                    && matches!(
                        self.status(sender).ok(),
                        Some(DeviceStatus::Registered | DeviceStatus::PendingJoin)
                    )
                {
                    self.drop_join(sender);
                    self.status_event(sender, DeviceStatus::Joined, h);
                    h.events.push(ServerEvent::Joined {
                        device: sender,
                        method: JoinMethod::Command,
                    });
                } else if status != Status::JoinOk {
                    h.events.push(ServerEvent::JoinRefused {
                        device: sender,
                        method: JoinMethod::Command,
                        reason: RefuseReason::DeviceRefused,
                    });
                }
            }
            CommandKind::Observation { joining } => {
                let reason =
                    (status != Status::ObservedJoinValid).then_some(RefuseReason::ObserverRejected);
                if let Ok(d) = self.finish_join_inner(joining, reason, now) {
                    touched.push(joining);
                    h.events.extend(d.events);
                    h.outgoing.push(d.outgoing);
                }
            }
            _ => {}
        }
    }

    // ---- helpers ----

    fn finish_join(
        &mut self,
        device: DeviceId,
        reason: Option<RefuseReason>,
        now: u64,
    ) -> Result<MustPersist<JoinDecision, PeerUpdates>, EngineError> {
        let decision = self.finish_join_inner(device, reason, now)?;
        Ok(MustPersist::new(self.updates(&[device]), decision))
    }

    /// Ends the pending join of `device`: joined if `reason` is `None`, refused otherwise;
    /// signs the response to the device's request.
    fn finish_join_inner(
        &mut self,
        device: DeviceId,
        reason: Option<RefuseReason>,
        now: u64,
    ) -> Result<JoinDecision, EngineError> {
        let j = self
            .joins
            .get(&device)
            .ok_or(EngineError::NoPendingJoin(device))?;
        // Only a device still pending can be admitted or refused: a revoked (or otherwise
        // moved on) device is never re-admitted by a late approval or confirmation.
        match self.status(device)? {
            DeviceStatus::PendingJoin => {}
            DeviceStatus::Revoked => return Err(EngineError::Revoked(device)),
            _ => return Err(EngineError::NoPendingJoin(device)),
        }
        let (token, method) = (j.token.clone(), j.method());
        let status = if reason.is_none() {
            Status::JoinOk
        } else {
            Status::JoinRefused
        };
        let expiry = now.saturating_add(self.config.reply_lifetime);
        let outgoing = self.send(device, Body::Response(Response { status }), token, expiry)?;
        self.drop_join(device);
        let mut events = Vec::new();
        let new_status = if reason.is_none() {
            DeviceStatus::Joined
        } else {
            DeviceStatus::Registered
        };
        if self.change_status(device, new_status) {
            events.push(ServerEvent::StatusChanged {
                device,
                status: new_status,
            });
        }
        events.push(match reason {
            None => ServerEvent::Joined { device, method },
            Some(reason) => ServerEvent::JoinRefused {
                device,
                method,
                reason,
            },
        });
        Ok(JoinDecision {
            joined: reason.is_none(),
            reason,
            outgoing,
            events,
        })
    }

    fn open_join(&mut self, device: DeviceId, token: Token, kind: PendingKind, now: u64) {
        // A new request replaces an older simple or expired one (`admissible` refuses the
        // others), and settles its observation: at most one open per joining device.
        self.drop_join(device);
        self.joins.insert(
            device,
            PendingJoin {
                token,
                expires: self.join_expiry(now),
                kind,
            },
        );
    }

    fn join_expiry(&self, now: u64) -> u64 {
        now.saturating_add(self.config.join_ttl.min(self.config.guard.max_lifetime))
    }

    fn status(&self, device: DeviceId) -> Result<DeviceStatus, EngineError> {
        self.devices
            .get(&device)
            .map(|d| d.status)
            .ok_or(EngineError::UnknownDevice(device))
    }

    /// Sets a status; whether it changed. A revoked device stays revoked; revoking drops
    /// everything pending for the device ([`ServerEngine::forget_pending`]).
    fn change_status(&mut self, device: DeviceId, status: DeviceStatus) -> bool {
        let changed = match self.devices.get_mut(&device) {
            Some(d) if d.status == DeviceStatus::Revoked => {
                if status != DeviceStatus::Revoked {
                    tracing::warn!(%device, status = status.name(), "c2: a revoked device stays revoked");
                }
                false
            }
            Some(d) if d.status != status => {
                d.status = status;
                true
            }
            _ => false,
        };
        if status == DeviceStatus::Revoked {
            self.forget_pending(device);
        }
        changed
    }

    /// Removes a pending join and stops tracking its observation token if still unanswered
    /// (an observation answered later then matches nothing).
    fn drop_join(&mut self, device: DeviceId) -> Option<PendingJoin> {
        let j = self.joins.remove(&device)?;
        if let Some(t) = j.observation() {
            if self.outcome(t) == Some(Outcome::Pending) {
                self.tracked.remove(t);
            }
        }
        Some(j)
    }

    /// Drops what is pending about `device` when it leaves (revoked, terminated, resigned,
    /// removed): its own join, the join commands sent to it and every observation it was
    /// asked for or is the subject of. A late join completion or observation confirmation
    /// then matches nothing ([`DropReason::UnknownToken`]).
    fn forget_pending(&mut self, device: DeviceId) {
        self.drop_join(device);
        self.tracked.retain(|_, t| {
            let pending = t.outcome == Outcome::Pending;
            let stale = match t.kind {
                CommandKind::Join => t.device == device,
                CommandKind::Observation { joining } => t.device == device || joining == device,
                _ => false,
            };
            !(pending && stale)
        });
    }

    fn status_event(&mut self, device: DeviceId, status: DeviceStatus, h: &mut ServerHandled) {
        if self.change_status(device, status) {
            h.events.push(ServerEvent::StatusChanged { device, status });
        }
    }

    fn commandable(&self, device: DeviceId, ty: MessageType) -> Result<(), EngineError> {
        match self.status(device)? {
            DeviceStatus::Joined => Ok(()),
            DeviceStatus::Revoked => Err(EngineError::Revoked(device)),
            _ if ty == MessageType::IdRequest => Ok(()),
            _ => Err(EngineError::NotJoined(device)),
        }
    }

    fn check_expiry(&self, expiry: u64, now: u64) -> Result<(), EngineError> {
        if expiry < now || expiry > now.saturating_add(self.config.guard.max_lifetime) {
            return Err(EngineError::BadExpiry { expiry, now });
        }
        Ok(())
    }

    fn send(
        &mut self,
        to: DeviceId,
        body: Body,
        token: Token,
        expiry: u64,
    ) -> Result<Outgoing, EngineError> {
        let seq = self.guard.next_send(to)?;
        let env = Envelope {
            sender: self.id,
            recipient: to,
            seq,
            expiry,
            token: token.clone(),
        };
        let msg_type = body.msg_type();
        let bytes = Message::sign(&env, &body, &self.key)?;
        Ok(Outgoing {
            topic: self.topics.to_device(to),
            bytes,
            token,
            recipient: to,
            msg_type,
        })
    }

    fn send_tracked(
        &mut self,
        to: DeviceId,
        body: Body,
        kind: CommandKind,
        expiry: u64,
    ) -> Result<Outgoing, EngineError> {
        let token = Token::random();
        let out = self.send(to, body, token.clone(), expiry)?;
        self.tracked.insert(
            token,
            Tracked {
                device: to,
                kind,
                expiry,
                outcome: Outcome::Pending,
            },
        );
        Ok(out)
    }

    /// Signs and queues a message while handling an inbound one; whether it was queued.
    fn push_send(
        &mut self,
        to: DeviceId,
        body: Body,
        token: Token,
        expiry: u64,
        h: &mut ServerHandled,
    ) -> bool {
        match self.send(to, body, token, expiry) {
            Ok(o) => {
                h.outgoing.push(o);
                true
            }
            Err(e) => {
                tracing::error!(device = %to, error = %e, "c2 reply could not be signed");
                false
            }
        }
    }

    fn reply(
        &mut self,
        to: DeviceId,
        token: Token,
        status: Status,
        expiry: u64,
        h: &mut ServerHandled,
    ) {
        self.push_send(to, Body::Response(Response { status }), token, expiry, h);
    }

    fn updates(&self, touched: &[DeviceId]) -> PeerUpdates {
        let mut ids: Vec<DeviceId> = touched.to_vec();
        ids.sort();
        ids.dedup();
        PeerUpdates(
            ids.into_iter()
                .filter_map(|id| self.guard.peer(id).map(|s| (id, *s)))
                .collect(),
        )
    }
}

fn command_type(body: &Body) -> Result<MessageType, EngineError> {
    match body {
        Body::Action(_) | Body::Data(_) | Body::Generic(_) | Body::IdRequest(_) => {
            Ok(body.msg_type())
        }
        other => Err(EngineError::NotACommand(other.msg_type())),
    }
}

fn encode_kind(kind: &CommandKind, out: &mut Vec<u8>) {
    match kind {
        CommandKind::Command(t) => out.extend_from_slice(&[1, t.id()]),
        CommandKind::Update { digest } => {
            out.push(2);
            out.extend_from_slice(digest);
        }
        CommandKind::Activate { digest } => {
            out.push(3);
            out.extend_from_slice(digest);
        }
        CommandKind::Join => out.push(4),
        CommandKind::Observation { joining } => {
            out.push(5);
            out.extend_from_slice(&joining.0);
        }
        CommandKind::Terminate => out.push(6),
        CommandKind::Deregister => out.push(7),
    }
}

fn decode_kind(r: &mut Reader<'_>) -> Result<CommandKind, EngineError> {
    Ok(match r.u8().map_err(corrupt)? {
        1 => CommandKind::Command(MessageType::from_id(r.u8().map_err(corrupt)?).map_err(corrupt)?),
        2 => CommandKind::Update {
            digest: r.array().map_err(corrupt)?,
        },
        3 => CommandKind::Activate {
            digest: r.array().map_err(corrupt)?,
        },
        4 => CommandKind::Join,
        5 => CommandKind::Observation {
            joining: DeviceId(r.array().map_err(corrupt)?),
        },
        6 => CommandKind::Terminate,
        7 => CommandKind::Deregister,
        _ => return Err(EngineError::Corrupt("command kind")),
    })
}
