//! The server's pending joins: one per joining device, with its method and, for moderated
//! and observed joins, the random code the server drew for it.

use crate::keys::DeviceId;
use crate::wire::{JoinCode, Reader, Token};

use super::{corrupt, put8, EngineError};

/// Most joins open at once on a server. A join request that would open one more is dropped
/// ([`super::DropReason::TooManyJoins`]) until joins are decided or expire
/// ([`super::ServerEngine::tick`]), so a flood of requests cannot grow the server's memory
/// and state file without bound.
pub const MAX_PENDING_JOINS: usize = 1024;

/// How a device joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinMethod {
    /// Join request answered by policy or by the operator, without a code.
    Simple,
    /// The server's join command to a registered device.
    Command,
    /// The operator compares the words shown by the device with the console's.
    Human,
    /// A joined device (the observer) confirms the code the joining device presents.
    Observed,
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The operator refused.
    Operator,
    /// The operator typed words that are not the device's code.
    WrongCode,
    /// The observer saw another code, or could not observe.
    ObserverRejected,
    /// The observer named is not a joined device.
    BadObserver,
    /// The join was not decided in time.
    Expired,
    /// The device refused the join command.
    DeviceRefused,
}

/// A join awaiting a decision.
#[derive(Debug, Clone)]
pub(crate) struct PendingJoin {
    /// The joining device's request token; the server's replies repeat it.
    pub token: Token,
    /// The last second the join may be decided.
    pub expires: u64,
    pub kind: PendingKind,
}

#[derive(Debug, Clone)]
pub(crate) enum PendingKind {
    /// A simple join request under the moderated policy.
    Simple,
    /// Human-moderated: the code shown on the device.
    Human { code: JoinCode },
    /// Observed: the observer, the code, and the token of the observation request.
    Observed {
        observer: DeviceId,
        code: JoinCode,
        observation: Token,
    },
}

impl PendingJoin {
    /// The observation token of an observed join.
    pub(crate) fn observation(&self) -> Option<&Token> {
        match &self.kind {
            PendingKind::Observed { observation, .. } => Some(observation),
            _ => None,
        }
    }

    /// Whether a new request must not replace this join: its code is being compared (by the
    /// operator or the observer) and it has not expired.
    pub(crate) fn locks_out_requests(&self, now: u64) -> bool {
        now <= self.expires
            && matches!(
                self.kind,
                PendingKind::Human { .. } | PendingKind::Observed { .. }
            )
    }

    pub(crate) fn method(&self) -> JoinMethod {
        match self.kind {
            PendingKind::Simple => JoinMethod::Simple,
            PendingKind::Human { .. } => JoinMethod::Human,
            PendingKind::Observed { .. } => JoinMethod::Observed,
        }
    }

    /// Encoding: token (u8 len), expires (u64), kind (u8: 1 simple, 2 human, 3 observed),
    /// then the code (u8 len), and for observed the observer (8) and observation token.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put8(out, self.token.as_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        match &self.kind {
            PendingKind::Simple => out.push(1),
            PendingKind::Human { code } => {
                out.push(2);
                put8(out, code.as_bytes());
            }
            PendingKind::Observed {
                observer,
                code,
                observation,
            } => {
                out.push(3);
                put8(out, code.as_bytes());
                out.extend_from_slice(&observer.0);
                put8(out, observation.as_bytes());
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<PendingJoin, EngineError> {
        let token = Token::new(r.vec8().map_err(corrupt)?).map_err(corrupt)?;
        let expires = r.u64().map_err(corrupt)?;
        let code = |r: &mut Reader<'_>| -> Result<JoinCode, EngineError> {
            JoinCode::from_bytes(r.vec8().map_err(corrupt)?)
                .ok_or(EngineError::Corrupt("join code"))
        };
        let kind = match r.u8().map_err(corrupt)? {
            1 => PendingKind::Simple,
            2 => PendingKind::Human { code: code(r)? },
            3 => {
                let c = code(r)?;
                let observer = DeviceId(r.array().map_err(corrupt)?);
                let observation = Token::new(r.vec8().map_err(corrupt)?).map_err(corrupt)?;
                PendingKind::Observed {
                    observer,
                    code: c,
                    observation,
                }
            }
            _ => return Err(EngineError::Corrupt("join kind")),
        };
        Ok(PendingJoin {
            token,
            expires,
            kind,
        })
    }
}
