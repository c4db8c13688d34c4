//! Replay protection for C2 messages: sans-IO, no clock (callers pass `now` in unix seconds).
//!
//! For each peer a [`Guard`] keeps a receive state (the highest sequence number accepted and
//! a [`WINDOW`]-bit bitmap of the numbers just below it, so messages that MQTT delivers out of
//! order are still accepted, once each) and a separate send counter ([`Guard::next_send`]).
//! A message is refused if
//! - it is addressed to another device ([`GuardError::WrongRecipient`]);
//! - its sequence number was already accepted ([`GuardError::Replay`]) or lies below the
//!   window ([`GuardError::BelowWindow`]);
//! - its sequence number jumps more than [`GuardConfig::max_jump`] past the highest accepted
//!   one ([`GuardError::JumpTooFar`]). Without this bound one validly signed message with
//!   sequence number 2^64−1 (replayed from a buggy or compromised sender, or sent once by
//!   mistake) would lock the receiver out for good: every later number would be "old";
//! - it is past its expiry ([`GuardError::Expired`]) or its expiry lies more than
//!   [`GuardConfig::max_lifetime`] in the future ([`GuardError::ExpiryTooFar`]), so a
//!   command withheld by the broker or an attacker cannot be delivered much later.
//!
//! Sequence numbers start at 1: a fresh peer state behaves as if 0 had been accepted.
//!
//! # Call order
//!
//! 1. [`crate::wire::Message::decode`] (no key);
//! 2. [`Guard::precheck`] on the unverified header: the cheap, read-only acceptance check
//!    (recipient, expiry, window) before any public-key work. It changes nothing, so an
//!    unauthenticated message cannot move the state (a forged message with a huge sequence
//!    number is refused later by its signature and leaves the window where it was);
//! 3. [`crate::wire::Unverified::verify`] with the sender's registered key. **The signature is
//!    verified before the guard state is touched**;
//! 4. [`Guard::check`] on the verified header → an [`Admission`];
//! 5. [`Guard::commit`] the admission (it re-checks, so two admissions for the same number
//!    cannot both be committed) and persist the peer's state ([`Guard::peer`],
//!    [`PeerState::encode`], or the whole [`GuardState`]) durably;
//! 6. only then act on the message.
//!
//! Persisting before acting means a crash between the two loses the message (the sender sees
//! no response and retries with a new number) but a restart never re-opens an accepted one.
//! Senders likewise persist after [`Guard::next_send`] and before publishing, so a number is
//! never used twice.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::keys::DeviceId;
use crate::wire::Header;

/// Width of the reorder window, in sequence numbers.
pub const WINDOW: u64 = 128;
/// Default [`GuardConfig::max_jump`]: 2^20.
pub const DEFAULT_MAX_JUMP: u64 = 1 << 20;
/// Default [`GuardConfig::max_lifetime`]: one day.
pub const DEFAULT_MAX_LIFETIME: u64 = 24 * 60 * 60;

/// Why the guard refused a message, or could not do what it was asked.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuardError {
    /// The message is addressed to another device.
    #[error("message addressed to {recipient}, not to this device ({me})")]
    WrongRecipient {
        /// The header's recipient.
        recipient: DeviceId,
        /// This device.
        me: DeviceId,
    },
    /// This sequence number was already accepted from this peer.
    #[error("replay: sequence number {seq} already accepted")]
    Replay {
        /// The refused number.
        seq: u64,
    },
    /// The sequence number is too old to be told apart from a replay.
    #[error("sequence number {seq} is below the window (highest accepted {highest})")]
    BelowWindow {
        /// The refused number.
        seq: u64,
        /// The highest number accepted from the peer.
        highest: u64,
    },
    /// The sequence number jumps too far ahead (the lock-out attack).
    #[error("sequence number {seq} jumps more than {max_jump} past {highest}")]
    JumpTooFar {
        /// The refused number.
        seq: u64,
        /// The highest number accepted from the peer.
        highest: u64,
        /// The configured bound.
        max_jump: u64,
    },
    /// The message's expiry has passed.
    #[error("message expired at {expiry}, now {now}")]
    Expired {
        /// The header's expiry (unix seconds).
        expiry: u64,
        /// The time of the check.
        now: u64,
    },
    /// The message's expiry is further in the future than allowed.
    #[error("message expiry {expiry} is beyond the limit {limit}")]
    ExpiryTooFar {
        /// The header's expiry (unix seconds).
        expiry: u64,
        /// The latest expiry accepted at the time of the check.
        limit: u64,
    },
    /// The send counter for a peer is used up (2^64−1 messages sent).
    #[error("send counter exhausted")]
    SendExhausted,
    /// A persisted state could not be read.
    #[error("guard state corrupt: {0}")]
    Corrupt(&'static str),
    /// A persisted state has a version this code does not read.
    #[error("unknown guard state version {0}")]
    UnknownStateVersion(u8),
}

/// Bounds the guard applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// Largest accepted step past the highest accepted sequence number.
    pub max_jump: u64,
    /// Largest accepted distance between `now` and a message's expiry, in seconds.
    pub max_lifetime: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            max_jump: DEFAULT_MAX_JUMP,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }
}

/// What the guard keeps for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    /// Highest sequence number accepted from the peer (0: none yet).
    highest: u64,
    /// Bit `i` set: `highest - i` was accepted.
    window: u128,
    /// The sequence number the next message to the peer gets.
    next_send: u64,
}

/// Encoded length of a [`PeerState`].
pub const PEER_STATE_LEN: usize = 1 + 8 + 16 + 8 + 8;
const PEER_STATE_VERSION: u8 = 1;
const STATE_MAGIC: &[u8; 4] = b"KC2G";
const STATE_VERSION: u8 = 1;

fn checksum(bytes: &[u8]) -> [u8; 8] {
    let d = Sha256::digest(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

impl Default for PeerState {
    fn default() -> Self {
        PeerState {
            highest: 0,
            window: 1,
            next_send: 1,
        }
    }
}

impl PeerState {
    /// Highest sequence number accepted from the peer (0 if none).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// The sequence number the next message to the peer will get.
    pub fn next_send(&self) -> u64 {
        self.next_send
    }

    fn check_seq(&self, seq: u64, max_jump: u64) -> Result<(), GuardError> {
        if seq > self.highest {
            if seq - self.highest > max_jump {
                return Err(GuardError::JumpTooFar {
                    seq,
                    highest: self.highest,
                    max_jump,
                });
            }
            return Ok(());
        }
        let back = self.highest - seq;
        if back >= WINDOW {
            return Err(GuardError::BelowWindow {
                seq,
                highest: self.highest,
            });
        }
        if self.window & (1u128 << back) != 0 {
            return Err(GuardError::Replay { seq });
        }
        Ok(())
    }

    fn accept(&mut self, seq: u64) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.window = if shift >= WINDOW {
                0
            } else {
                self.window << shift
            };
            self.window |= 1;
            self.highest = seq;
        } else {
            self.window |= 1u128 << (self.highest - seq);
        }
    }

    /// The state's stable encoding: version (1), highest (u64), window (u128), next send
    /// (u64), then the first 8 bytes of SHA-256 over the preceding bytes; [`PEER_STATE_LEN`]
    /// bytes, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PEER_STATE_LEN);
        out.push(PEER_STATE_VERSION);
        out.extend_from_slice(&self.highest.to_be_bytes());
        out.extend_from_slice(&self.window.to_be_bytes());
        out.extend_from_slice(&self.next_send.to_be_bytes());
        let c = checksum(&out);
        out.extend_from_slice(&c);
        out
    }

    /// Reads [`PeerState::encode`]'s bytes (exactly [`PEER_STATE_LEN`]).
    pub fn decode(bytes: &[u8]) -> Result<PeerState, GuardError> {
        if bytes.len() != PEER_STATE_LEN {
            return Err(GuardError::Corrupt("peer state length"));
        }
        let (body, sum) = bytes.split_at(PEER_STATE_LEN - 8);
        if checksum(body) != sum {
            return Err(GuardError::Corrupt("peer state checksum"));
        }
        let version = body.first().copied().unwrap_or(0);
        if version != PEER_STATE_VERSION {
            return Err(GuardError::UnknownStateVersion(version));
        }
        let field = |r: std::ops::Range<usize>| body.get(r).ok_or(GuardError::Corrupt("peer"));
        let u64_at = |at: usize| -> Result<u64, GuardError> {
            let b: [u8; 8] = field(at..at + 8)?
                .try_into()
                .map_err(|_| GuardError::Corrupt("peer"))?;
            Ok(u64::from_be_bytes(b))
        };
        let highest = u64_at(1)?;
        let window: [u8; 16] = field(9..25)?
            .try_into()
            .map_err(|_| GuardError::Corrupt("peer"))?;
        let window = u128::from_be_bytes(window);
        let next_send = u64_at(25)?;
        if window & 1 == 0 {
            // The highest accepted number is always marked.
            return Err(GuardError::Corrupt("peer state window"));
        }
        Ok(PeerState {
            highest,
            window,
            next_send,
        })
    }
}

/// The persistent state of a [`Guard`]: one [`PeerState`] per peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardState {
    peers: BTreeMap<DeviceId, PeerState>,
}

impl GuardState {
    /// The stable encoding: `KC2G`, version (1), peer count (u32), then per peer its id and
    /// its [`PeerState::encode`] bytes in id order, then the first 8 bytes of SHA-256 over
    /// everything before.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.peers.len() * (8 + PEER_STATE_LEN));
        out.extend_from_slice(STATE_MAGIC);
        out.push(STATE_VERSION);
        let n = u32::try_from(self.peers.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        for (id, p) in self.peers.iter().take(n as usize) {
            out.extend_from_slice(&id.0);
            out.extend_from_slice(&p.encode());
        }
        let c = checksum(&out);
        out.extend_from_slice(&c);
        out
    }

    /// Reads [`GuardState::encode`]'s bytes. Refuses a wrong length, checksum, magic or
    /// version, ids out of order and duplicates.
    pub fn decode(bytes: &[u8]) -> Result<GuardState, GuardError> {
        let body_len = bytes
            .len()
            .checked_sub(8)
            .ok_or(GuardError::Corrupt("state length"))?;
        let (body, sum) = bytes.split_at(body_len);
        if checksum(body) != sum {
            return Err(GuardError::Corrupt("state checksum"));
        }
        if body.get(..4) != Some(&STATE_MAGIC[..]) {
            return Err(GuardError::Corrupt("state magic"));
        }
        let version = body.get(4).copied().ok_or(GuardError::Corrupt("state"))?;
        if version != STATE_VERSION {
            return Err(GuardError::UnknownStateVersion(version));
        }
        let n: [u8; 4] = body
            .get(5..9)
            .and_then(|b| b.try_into().ok())
            .ok_or(GuardError::Corrupt("state"))?;
        let n = u32::from_be_bytes(n) as usize;
        let entries = body.get(9..).unwrap_or_default();
        let entry = 8 + PEER_STATE_LEN;
        if n.checked_mul(entry) != Some(entries.len()) {
            return Err(GuardError::Corrupt("state length"));
        }
        let mut peers = BTreeMap::new();
        let mut last: Option<DeviceId> = None;
        for e in entries.chunks_exact(entry) {
            let (id, p) = e.split_at(8);
            let id = DeviceId(id.try_into().map_err(|_| GuardError::Corrupt("state"))?);
            if last.is_some_and(|l| l >= id) {
                return Err(GuardError::Corrupt("state peer order"));
            }
            last = Some(id);
            peers.insert(id, PeerState::decode(p)?);
        }
        Ok(GuardState { peers })
    }
}

/// Proof that [`Guard::check`] accepted a header; [`Guard::commit`] consumes it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an admission changes nothing until it is committed"]
pub struct Admission {
    peer: DeviceId,
    seq: u64,
}

impl Admission {
    /// The peer the message came from.
    pub fn peer(&self) -> DeviceId {
        self.peer
    }

    /// The accepted sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Replay protection for one local identity (see the module docs for the call order).
#[derive(Debug, Clone)]
pub struct Guard {
    me: DeviceId,
    config: GuardConfig,
    state: GuardState,
}

impl Guard {
    /// A guard for messages addressed to `me`, with no peer state yet.
    pub fn new(me: DeviceId, config: GuardConfig) -> Guard {
        Guard::from_state(me, config, GuardState::default())
    }

    /// A guard that continues from a persisted state.
    pub fn from_state(me: DeviceId, config: GuardConfig, state: GuardState) -> Guard {
        Guard { me, config, state }
    }

    /// The whole state, to persist.
    pub fn state(&self) -> &GuardState {
        &self.state
    }

    /// The bounds in force.
    pub fn config(&self) -> GuardConfig {
        self.config
    }

    /// One peer's state (to persist just that record), if any.
    pub fn peer(&self, peer: DeviceId) -> Option<&PeerState> {
        self.state.peers.get(&peer)
    }

    /// Installs a peer's persisted state (e.g. read lazily from a store).
    pub fn load_peer(&mut self, peer: DeviceId, state: PeerState) {
        self.state.peers.insert(peer, state);
    }

    /// Forgets a peer (after deregistration). A peer that comes back starts afresh, so only
    /// do this when its key is no longer accepted.
    pub fn remove_peer(&mut self, peer: DeviceId) -> Option<PeerState> {
        self.state.peers.remove(&peer)
    }

    /// The read-only acceptance check to run on a header *before* its signature is verified
    /// (cheap checks first): the same rules as [`Guard::check`], but it yields no
    /// [`Admission`], so nothing unverified can be committed with it. Changes nothing.
    pub fn precheck(&self, header: &Header, now: u64) -> Result<(), GuardError> {
        self.check(header, now).map(|_| ())
    }

    /// Resets a peer's continuity: its receive window and its send counter start afresh, as
    /// for a new peer, and the fresh state is returned to persist. For an operator, after
    /// the peer's software was legitimately re-installed with the same key (its counters
    /// lost). Until the messages it sent before expire ([`GuardConfig::max_lifetime`] at
    /// most), a recorded one could be replayed once more.
    pub fn reset_peer(&mut self, peer: DeviceId) -> &PeerState {
        let p = self.state.peers.entry(peer).or_default();
        *p = PeerState::default();
        p
    }

    /// Checks a header against the replay rules at time `now`, changing nothing.
    pub fn check(&self, header: &Header, now: u64) -> Result<Admission, GuardError> {
        if header.recipient != self.me {
            return Err(GuardError::WrongRecipient {
                recipient: header.recipient,
                me: self.me,
            });
        }
        if now > header.expiry {
            return Err(GuardError::Expired {
                expiry: header.expiry,
                now,
            });
        }
        let limit = now.saturating_add(self.config.max_lifetime);
        if header.expiry > limit {
            return Err(GuardError::ExpiryTooFar {
                expiry: header.expiry,
                limit,
            });
        }
        let fresh = PeerState::default();
        let peer = self.state.peers.get(&header.sender).unwrap_or(&fresh);
        peer.check_seq(header.seq, self.config.max_jump)?;
        Ok(Admission {
            peer: header.sender,
            seq: header.seq,
        })
    }

    /// Records an admitted message as accepted, after checking its sequence number again
    /// against the current state (another message may have been committed since the check).
    /// Returns the peer's new state, which the caller persists before acting.
    pub fn commit(&mut self, admission: Admission) -> Result<&PeerState, GuardError> {
        let max_jump = self.config.max_jump;
        let peer = self.state.peers.entry(admission.peer).or_default();
        peer.check_seq(admission.seq, max_jump)?;
        peer.accept(admission.seq);
        Ok(peer)
    }

    /// Takes the next sequence number for a message to `peer` (from 1, then increasing). The
    /// caller persists the state before publishing the message.
    pub fn next_send(&mut self, peer: DeviceId) -> Result<u64, GuardError> {
        let p = self.state.peers.entry(peer).or_default();
        let seq = p.next_send;
        p.next_send = seq.checked_add(1).ok_or(GuardError::SendExhausted)?;
        Ok(seq)
    }
}
