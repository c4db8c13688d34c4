//! Retained-secret cache values and the policy types shared by the handshake and the store.
//!
//! The handshake never reads or writes storage itself: the driver looks the peer up (by ZID,
//! by local label, or in paranoid mode by retained-secret ID), hands a [`PeerCache`] to the
//! handshake, and persists the [`CacheUpdate`] the handshake returns when a session completes.

use crate::secret::Secret32;

/// A ZRTP identifier (96 bits). Drawn from the OS CSPRNG; fresh per session in paranoid mode.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zid(pub [u8; 12]);

impl core::fmt::Debug for Zid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Zid(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl core::fmt::Display for Zid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Key-continuity mode (PROTOCOL.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No cache: DH and verification every session.
    NoContinuity,
    /// Retained secrets rotated every session; preshared sessions between verifications;
    /// DH and verification on the first session, every `verify_every`-th session after it and
    /// on any cache mismatch.
    Normal {
        /// N: verification runs on sessions 1, 1+N, 1+2N, ... (default 10).
        verify_every: u32,
    },
    /// Fresh random ZID every session, DH and verification every session, cache found by
    /// retained-secret ID only.
    Paranoid,
}

impl Mode {
    /// `normal` with the default N = 10.
    pub const NORMAL: Mode = Mode::Normal { verify_every: 10 };

    /// Stable lowercase name (`no-continuity`, `normal`, `paranoid`).
    pub fn name(&self) -> &'static str {
        match self {
            Mode::NoContinuity => "no-continuity",
            Mode::Normal { .. } => "normal",
            Mode::Paranoid => "paranoid",
        }
    }

    /// Whether this mode keeps retained secrets at all.
    pub fn keeps_cache(&self) -> bool {
        !matches!(self, Mode::NoContinuity)
    }

    /// Stable one-byte code for storage.
    pub fn code(&self) -> u8 {
        match self {
            Mode::NoContinuity => 0,
            Mode::Normal { .. } => 1,
            Mode::Paranoid => 2,
        }
    }
}

impl Default for Mode {
    fn default() -> Self {
        Mode::NORMAL
    }
}

/// What the device remembers about one peer, as the handshake needs it.
#[derive(Clone, Debug, Default)]
pub struct PeerCache {
    /// Newest retained secret.
    pub rs1: Option<Secret32>,
    /// Previous retained secret (kept so that a one-sided failed update does not desynchronise).
    pub rs2: Option<Secret32>,
    /// Unix seconds after which rs1/rs2 must no longer be used; `None` = no expiry.
    pub expires_at: Option<u64>,
    /// Number of sessions completed with this peer so far (the next session is `sessions + 1`).
    pub sessions: u64,
    /// A previous session asked for verification in the next one (e.g. after a mismatch).
    pub verify_due: bool,
    /// The peer is locked out (too many failed verifications) until this unix second.
    pub locked_until: Option<u64>,
}

impl PeerCache {
    /// Retained secrets that are usable at `now` (expired ones count as absent).
    pub fn live_secrets(&self, now_unix: u64) -> (Option<&Secret32>, Option<&Secret32>) {
        if self.expires_at.is_some_and(|t| now_unix >= t) {
            return (None, None);
        }
        (self.rs1.as_ref(), self.rs2.as_ref())
    }
}

/// Result of the autonomous verification step of one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// The equality test ran with a verification secret and passed.
    Bound,
    /// The equality test ran without a verification secret (trust on first use): it only
    /// catches a passive relay.
    Unbound,
    /// The mode did not ask for verification in this session.
    Skipped,
    /// The peer does not speak KEAV verification (plain ZRTP): the SAS is for a human.
    NotSupported,
}

impl Verification {
    /// Stable lowercase name.
    pub fn name(&self) -> &'static str {
        match self {
            Verification::Bound => "bound",
            Verification::Unbound => "unbound",
            Verification::Skipped => "skipped",
            Verification::NotSupported => "not-supported",
        }
    }

    /// Whether the equality test ran in this session.
    pub fn ran(&self) -> bool {
        matches!(self, Verification::Bound | Verification::Unbound)
    }
}

/// What the driver must persist, atomically, when a session completes.
#[derive(Clone, Debug)]
pub struct CacheUpdate {
    /// The new rs1, derived from this session's s0.
    pub rs1: Secret32,
    /// The new rs2 (the rs1 that matched, or the old rs1).
    pub rs2: Option<Secret32>,
    /// New expiry (unix seconds), `None` = no expiry.
    pub expires_at: Option<u64>,
    /// New value of [`PeerCache::sessions`].
    pub sessions: u64,
    /// How this session was verified.
    pub verification: Verification,
}

/// Attempt limits for the equality test (PROTOCOL.md §3): after `max_failures` failed
/// verifications against one peer, further attempts are refused until a backoff expires.
/// The backoff doubles with every further failure, up to `max_backoff_secs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// K: failures tolerated before the peer is locked out.
    pub max_failures: u32,
    /// Lockout after the K-th failure, in seconds.
    pub base_backoff_secs: u64,
    /// Upper bound of the lockout, in seconds.
    pub max_backoff_secs: u64,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self {
            max_failures: 5,
            base_backoff_secs: 60,
            max_backoff_secs: 24 * 3600,
        }
    }
}

impl LockoutPolicy {
    /// The unix second until which a peer with `failures` consecutive failures, the last one
    /// at `last_failure_at`, is locked out; `None` if it is not locked out.
    pub fn locked_until(&self, failures: u32, last_failure_at: u64) -> Option<u64> {
        if failures < self.max_failures.max(1) {
            return None;
        }
        let extra = (failures - self.max_failures.max(1)).min(40);
        let backoff = self
            .base_backoff_secs
            .saturating_mul(1u64 << extra)
            .min(self.max_backoff_secs);
        Some(last_failure_at.saturating_add(backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_starts_at_k_and_doubles_up_to_cap() {
        let p = LockoutPolicy {
            max_failures: 3,
            base_backoff_secs: 10,
            max_backoff_secs: 35,
        };
        assert_eq!(p.locked_until(2, 100), None);
        assert_eq!(p.locked_until(3, 100), Some(110));
        assert_eq!(p.locked_until(4, 100), Some(120));
        assert_eq!(p.locked_until(5, 100), Some(135));
        assert_eq!(p.locked_until(60, 100), Some(135));
    }

    #[test]
    fn expired_secrets_are_not_live() {
        let c = PeerCache {
            rs1: Some(Secret32::new([1; 32])),
            expires_at: Some(50),
            ..Default::default()
        };
        assert!(c.live_secrets(49).0.is_some());
        assert!(c.live_secrets(50).0.is_none());
    }
}
