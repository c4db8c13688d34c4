//! The sans-IO C2 engine: the protocol logic of the C2 server ([`ServerEngine`]) and of the
//! device agent ([`Device`]), with no sockets, no clock and no files (docs/C2-engine.md).
//!
//! Callers pass the MQTT topic and payload of each inbound message together with `now` (unix
//! seconds); the engines return the messages to publish ([`Outgoing`]: topic, bytes, token),
//! events for the application, and the state to persist. A driver (tokio + MQTT + registry)
//! wraps them.
//!
//! # Inbound order
//!
//! Every inbound message goes through the same steps, cheapest first, and is dropped at the
//! first that fails, with a [`DropReason`] that is counted ([`Counters`]) and logged:
//!
//! 1. the topic is one of ours and names the header's sender ([`DropReason::WrongTopic`],
//!    [`DropReason::SenderMismatch`]); decoding ([`DropReason::Malformed`]);
//! 2. the recipient is this identity ([`DropReason::WrongRecipient`]);
//! 3. the sender's registered key is looked up ([`DropReason::UnknownSender`],
//!    [`DropReason::Revoked`]);
//! 4. [`crate::guard::Guard::precheck`] on the still unverified header, read-only, so replays
//!    and stale or far-future messages cost no public-key work ([`DropReason::Replay`],
//!    [`DropReason::BelowWindow`], [`DropReason::Expired`], [`DropReason::ExpiryTooFar`],
//!    [`DropReason::JumpTooFar`]);
//! 5. the header's algorithm must be the key's ([`DropReason::AlgorithmMismatch`]) and the
//!    signature is verified ([`DropReason::BadSignature`]);
//! 6. the message must make sense from this sender in its state ([`DropReason::NotJoined`],
//!    [`DropReason::Unexpected`], [`DropReason::UnknownToken`],
//!    [`DropReason::JoinInProgress`], [`DropReason::TooManyJoins`]);
//! 7. [`crate::guard::Guard::check`] on the verified header, then
//!    [`crate::guard::Guard::commit`] (only a verified message moves the window), then the
//!    engine acts on its in-memory state and returns the events and replies inside a
//!    [`MustPersist`]: the caller gets them only through [`MustPersist::persist`], whose
//!    closure must store the record durably first.
//!
//! Nothing before step 7 changes any state, so a dropped message has no effect at all: a
//! forged message with a high sequence number does not move the window.
//! Outbound messages take a sequence number from the guard's per-peer send counter; they too
//! come inside a [`MustPersist`], so a number is persisted before it is published.

mod device;
mod join;
mod server;

#[cfg(test)]
mod tests;

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::guard::GuardError;
use crate::keys::DeviceId;
use crate::wire::{MessageType, Token, WireError};

pub use device::{
    AnyDevice, Deregistered, Device, DeviceConfig, DeviceHandled, DeviceSend, DeviceSnapshot,
    EraseGrant, JoinGrant, JoinRequestKind, Joined, JoinedEvent, LeaveGrant, Registered,
    RegisteredEvent,
};
pub use join::{JoinMethod, RefuseReason, MAX_PENDING_JOINS};
pub use server::{
    CommandKind, DeviceStatus, DeviceView, JoinDecision, JoinPolicy, Outcome, PeerUpdates,
    SendReport, ServerConfig, ServerEngine, ServerEvent, ServerHandled, Targets,
};

/// Why an inbound message was dropped. Every drop is counted under its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The payload does not parse (layout, bounds, unknown version, type or algorithm).
    Malformed,
    /// The topic is not one this engine receives on.
    WrongTopic,
    /// The topic names another device than the header's sender (a message published on
    /// another device's topic).
    SenderMismatch,
    /// The message is addressed to another identity.
    WrongRecipient,
    /// The sender is not a known device (or, for a device, not its server).
    UnknownSender,
    /// The sender's identity is revoked.
    Revoked,
    /// The header's algorithm is not the sender's registered algorithm.
    AlgorithmMismatch,
    /// The signature does not verify.
    BadSignature,
    /// The sender is not joined, and the message is not one a non-joined device may send.
    NotJoined,
    /// The message type does not belong in this direction or in the receiver's state.
    Unexpected,
    /// A response or join reply whose token matches nothing awaited from this sender.
    UnknownToken,
    /// The sequence number was already accepted.
    Replay,
    /// The sequence number is below the reorder window.
    BelowWindow,
    /// The message is past its expiry.
    Expired,
    /// The message's expiry is too far in the future.
    ExpiryTooFar,
    /// The sequence number jumps too far ahead (the lock-out attack).
    JumpTooFar,
    /// A join request from a device whose human-moderated or observed join is still open:
    /// it would replace the code being compared (words reset by an attacker).
    JoinInProgress,
    /// A join request that would open a join while [`MAX_PENDING_JOINS`] are open.
    TooManyJoins,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 18] = [
        DropReason::Malformed,
        DropReason::WrongTopic,
        DropReason::SenderMismatch,
        DropReason::WrongRecipient,
        DropReason::UnknownSender,
        DropReason::Revoked,
        DropReason::AlgorithmMismatch,
        DropReason::BadSignature,
        DropReason::NotJoined,
        DropReason::Unexpected,
        DropReason::UnknownToken,
        DropReason::Replay,
        DropReason::BelowWindow,
        DropReason::Expired,
        DropReason::ExpiryTooFar,
        DropReason::JumpTooFar,
        DropReason::JoinInProgress,
        DropReason::TooManyJoins,
    ];

    fn index(self) -> usize {
        DropReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or_default()
    }

    /// A short snake-case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::WrongTopic => "wrong_topic",
            DropReason::SenderMismatch => "sender_mismatch",
            DropReason::WrongRecipient => "wrong_recipient",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::Revoked => "revoked",
            DropReason::AlgorithmMismatch => "algorithm_mismatch",
            DropReason::BadSignature => "bad_signature",
            DropReason::NotJoined => "not_joined",
            DropReason::Unexpected => "unexpected",
            DropReason::UnknownToken => "unknown_token",
            DropReason::Replay => "replay",
            DropReason::BelowWindow => "below_window",
            DropReason::Expired => "expired",
            DropReason::ExpiryTooFar => "expiry_too_far",
            DropReason::JumpTooFar => "jump_too_far",
            DropReason::JoinInProgress => "join_in_progress",
            DropReason::TooManyJoins => "too_many_joins",
        }
    }

    fn of_guard(e: &GuardError) -> DropReason {
        match e {
            GuardError::WrongRecipient { .. } => DropReason::WrongRecipient,
            GuardError::Replay { .. } => DropReason::Replay,
            GuardError::BelowWindow { .. } => DropReason::BelowWindow,
            GuardError::JumpTooFar { .. } => DropReason::JumpTooFar,
            GuardError::Expired { .. } => DropReason::Expired,
            GuardError::ExpiryTooFar { .. } => DropReason::ExpiryTooFar,
            _ => DropReason::Malformed,
        }
    }

    fn of_verify(e: &WireError) -> DropReason {
        match e {
            WireError::AlgorithmMismatch { .. } => DropReason::AlgorithmMismatch,
            WireError::BadSignature => DropReason::BadSignature,
            _ => DropReason::Malformed,
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dropped inbound message: why, and what little is known about it (unauthenticated unless
/// the reason comes after signature verification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Why.
    pub reason: DropReason,
    /// The sender the header or topic claims, if it got that far.
    pub sender: Option<DeviceId>,
    /// The message type the header claims, if it got that far.
    pub msg_type: Option<MessageType>,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dropped ({})", self.reason)?;
        if let Some(t) = self.msg_type {
            write!(f, " {t}")?;
        }
        if let Some(s) = self.sender {
            write!(f, " from {s}")?;
        }
        Ok(())
    }
}

/// Drop counters, one per [`DropReason`], plus the number of messages accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    dropped: [u64; DropReason::ALL.len()],
    accepted: u64,
}

impl Counters {
    /// Messages dropped for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.dropped.get(reason.index()).copied().unwrap_or(0)
    }

    /// Messages dropped, all reasons together.
    pub fn dropped(&self) -> u64 {
        self.dropped.iter().sum()
    }

    /// Messages accepted (committed by the guard).
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Each reason with a non-zero count.
    pub fn nonzero(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn count(&mut self, d: &Dropped) {
        if let Some(n) = self.dropped.get_mut(d.reason.index()) {
            *n = n.saturating_add(1);
        }
        tracing::warn!(
            reason = d.reason.name(),
            sender = ?d.sender,
            msg_type = ?d.msg_type,
            "c2 message dropped"
        );
    }

    fn accept(&mut self) {
        self.accepted = self.accepted.saturating_add(1);
    }
}

/// A value the caller may use only after persisting `record`: the engine has already moved
/// its replay state (or taken a sequence number) and a restart must not re-open it.
///
/// ```ignore
/// let handled = engine.handle(topic, payload, now)?
///     .persist(|record| store.write(record))?;   // durable first
/// act_on(handled);                                // then act / publish
/// ```
#[must_use = "the state must be persisted before the value is used"]
#[derive(Debug)]
pub struct MustPersist<T, R> {
    record: R,
    value: T,
}

impl<T, R> MustPersist<T, R> {
    fn new(record: R, value: T) -> Self {
        MustPersist { record, value }
    }

    /// The record to persist.
    pub fn record(&self) -> &R {
        &self.record
    }

    /// Runs `store` on the record; yields the value only if it succeeded.
    pub fn persist<E>(self, store: impl FnOnce(&R) -> Result<(), E>) -> Result<T, E> {
        store(&self.record)?;
        Ok(self.value)
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The MQTT topic.
    pub topic: String,
    /// The signed message.
    pub bytes: Vec<u8>,
    /// The message's token (responses repeat it).
    pub token: Token,
    /// The message's recipient.
    pub recipient: DeviceId,
    /// The message's type.
    pub msg_type: MessageType,
}

/// Why an engine call (not an inbound message) failed. Nothing changed.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineError {
    /// No device with this id is known.
    #[error("unknown device {0}")]
    UnknownDevice(DeviceId),
    /// The device is not joined (commands go to joined devices only).
    #[error("device {0} is not joined")]
    NotJoined(DeviceId),
    /// The device is revoked (and a revoked device stays revoked).
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    /// The device is already joined.
    #[error("device {0} is already joined")]
    AlreadyJoined(DeviceId),
    /// This body cannot be sent with this call (use the dedicated call).
    #[error("{0} cannot be sent this way")]
    NotACommand(MessageType),
    /// No command, update or request with this token is awaiting this.
    #[error("unknown or settled token")]
    UnknownToken,
    /// `activate` before the device reported a verified download for the token.
    #[error("the update is not ready to activate")]
    UpdateNotReady,
    /// No join is pending for the device, or not one of this kind.
    #[error("no pending join of this kind for {0}")]
    NoPendingJoin(DeviceId),
    /// The observer named in an observed join cannot observe.
    #[error("observer {0} is not a joined device")]
    BadObserver(DeviceId),
    /// The status is not allowed for this call (e.g. update success outside update_downloaded).
    #[error("status not allowed here")]
    StatusNotAllowed,
    /// The expiry is in the past or beyond the guard's lifetime bound.
    #[error("expiry {expiry} out of range at {now}")]
    BadExpiry {
        /// The expiry asked for.
        expiry: u64,
        /// The time of the call.
        now: u64,
    },
    /// Building or signing the message failed.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The send counter is exhausted.
    #[error("guard: {0}")]
    Guard(#[from] GuardError),
    /// A persisted engine state could not be read.
    #[error("engine state corrupt: {0}")]
    Corrupt(&'static str),
    /// A persisted engine state has a version this code does not read.
    #[error("unknown engine state version {0}")]
    UnknownStateVersion(u8),
}

/// Whether `data`'s SHA-256 is `digest`, compared in constant time. The device agent calls
/// this on a downloaded update (or uses [`Device::update_downloaded`], which does).
pub fn check_digest(data: &[u8], digest: &[u8; 32]) -> bool {
    let d: [u8; 32] = Sha256::digest(data).into();
    bool::from(d.ct_eq(digest))
}

// ---- small state codec helpers (engine state files) ----

const CHECKSUM_LEN: usize = 8;

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let d = Sha256::digest(bytes);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&d[..CHECKSUM_LEN]);
    out
}

/// Appends the checksum over `out`.
fn seal(mut out: Vec<u8>) -> Vec<u8> {
    let c = checksum(&out);
    out.extend_from_slice(&c);
    out
}

/// Checks the trailing checksum and the magic and version; returns the bytes after them.
fn unseal<'a>(bytes: &'a [u8], magic: &[u8; 4], version: u8) -> Result<&'a [u8], EngineError> {
    let body_len = bytes
        .len()
        .checked_sub(CHECKSUM_LEN)
        .ok_or(EngineError::Corrupt("state length"))?;
    let (body, sum) = bytes.split_at(body_len);
    if checksum(body) != sum {
        return Err(EngineError::Corrupt("state checksum"));
    }
    if body.get(..4) != Some(&magic[..]) {
        return Err(EngineError::Corrupt("state magic"));
    }
    let v = body.get(4).copied().ok_or(EngineError::Corrupt("state"))?;
    if v != version {
        return Err(EngineError::UnknownStateVersion(v));
    }
    Ok(body.get(5..).unwrap_or_default())
}

fn put8(out: &mut Vec<u8>, b: &[u8]) {
    // Callers only pass tokens (≤ 64 bytes) and join codes (≤ 16 bytes).
    let n = u8::try_from(b.len()).unwrap_or(u8::MAX);
    out.push(n);
    out.extend_from_slice(b.get(..usize::from(n)).unwrap_or_default());
}

fn put32(out: &mut Vec<u8>, b: &[u8]) {
    let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b.get(..n as usize).unwrap_or_default());
}

fn corrupt(_: WireError) -> EngineError {
    EngineError::Corrupt("state field")
}
