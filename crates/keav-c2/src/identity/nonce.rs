//! Stateless challenge nonces.
//!
//! A nonce is `random (16) || expiry (8, big-endian Unix seconds) || tag (32)`, where the tag
//! is HMAC-SHA-256 under the service's [`NonceKey`] over a label, the random part and the
//! expiry. Issuing one stores nothing, so unauthenticated callers of `POST /v1/challenge`
//! cannot make the service grow; checking one is a MAC computation and a constant-time
//! comparison, then a look at the (now authenticated) expiry.
//!
//! The MAC proves only that this service issued the nonce and when it expires. Single use is
//! the service's business: it remembers a nonce from the moment a registration presenting it
//! passed the nonce and enrollment-token checks until the nonce expires (see
//! `server::IdentityState::used_nonces`).

use std::fmt;

use keav_proto::crypto::hmac_sha256;
use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

/// Length of the random part of a nonce.
pub const NONCE_RANDOM_LEN: usize = 16;
/// Length of the MAC tag of a nonce (a full HMAC-SHA-256 output).
pub const NONCE_TAG_LEN: usize = 32;
/// Length of a challenge nonce: random, expiry, tag.
pub const NONCE_LEN: usize = NONCE_RANDOM_LEN + 8 + NONCE_TAG_LEN;

/// Domain separation label of the nonce MAC.
const NONCE_LABEL: &[u8] = b"keav-c2 challenge nonce v1\0";
/// Length of a nonce key (the HMAC-SHA-256 block size: used by HMAC as it is).
const KEY_LEN: usize = 64;

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NonceError {
    /// The tag does not verify: the nonce was not issued under this key, or was altered.
    #[error("nonce not issued by this service, or altered")]
    Invalid,
    /// The nonce verified but its expiry has passed.
    #[error("nonce expired")]
    Expired,
}

/// The secret key nonces are authenticated with: zeroized on drop, never printed.
///
/// [`NonceKey::generate`] makes a fresh one (the default: nonces then do not survive a
/// restart, devices simply ask again); services behind one address can share one with
/// [`NonceKey::from_bytes`].
pub struct NonceKey(Zeroizing<[u8; KEY_LEN]>);

impl NonceKey {
    /// A fresh random key.
    pub fn generate() -> NonceKey {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(k.as_mut());
        NonceKey(k)
    }

    /// A key from 64 secret bytes.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> NonceKey {
        NonceKey(bytes)
    }

    fn tag(&self, random: &[u8], expiry: &[u8]) -> [u8; NONCE_TAG_LEN] {
        hmac_sha256(self.0.as_ref(), &[NONCE_LABEL, random, expiry])
    }

    /// A fresh nonce that expires at `expires` (Unix seconds).
    pub fn issue(&self, expires: u64) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        let (random, rest) = nonce.split_at_mut(NONCE_RANDOM_LEN);
        OsRng.fill_bytes(random);
        let (expiry, tag) = rest.split_at_mut(8);
        expiry.copy_from_slice(&expires.to_be_bytes());
        tag.copy_from_slice(&self.tag(random, expiry));
        nonce
    }

    /// Checks `nonce` at time `now`: the tag first (constant time), then the expiry it
    /// authenticates. Returns the expiry. A nonce is expired from its expiry second on.
    pub fn check(&self, nonce: &[u8; NONCE_LEN], now: u64) -> Result<u64, NonceError> {
        let (random, rest) = nonce.split_at(NONCE_RANDOM_LEN);
        let (expiry, tag) = rest.split_at(8);
        let want = self.tag(random, expiry);
        if !bool::from(want.as_slice().ct_eq(tag)) {
            return Err(NonceError::Invalid);
        }
        let mut e = [0u8; 8];
        e.copy_from_slice(expiry);
        let expires = u64::from_be_bytes(e);
        if now >= expires {
            return Err(NonceError::Expired);
        }
        Ok(expires)
    }
}

impl fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_nonces_verify_until_they_expire() {
        let k = NonceKey::generate();
        let n = k.issue(1000);
        assert_eq!(k.check(&n, 0), Ok(1000));
        assert_eq!(k.check(&n, 999), Ok(1000));
        assert_eq!(k.check(&n, 1000), Err(NonceError::Expired));
        assert_eq!(k.check(&n, u64::MAX), Err(NonceError::Expired));
        // Fresh randomness every time.
        assert_ne!(k.issue(1000), n);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let k = NonceKey::generate();
        let n = k.issue(1000);
        for byte in 0..NONCE_LEN {
            for bit in 0..8 {
                let mut t = n;
                t[byte] ^= 1 << bit;
                assert_eq!(k.check(&t, 0), Err(NonceError::Invalid), "{byte}.{bit}");
            }
        }
    }

    #[test]
    fn extending_the_expiry_or_another_key_is_refused() {
        let k = NonceKey::generate();
        let mut n = k.issue(1000);
        n[NONCE_RANDOM_LEN..NONCE_RANDOM_LEN + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(k.check(&n, 2000), Err(NonceError::Invalid));
        let other = NonceKey::generate();
        assert_eq!(other.check(&k.issue(1000), 0), Err(NonceError::Invalid));
        assert_eq!(k.check(&[0u8; NONCE_LEN], 0), Err(NonceError::Invalid));
        let shared = NonceKey::from_bytes(Zeroizing::new([7u8; KEY_LEN]));
        let again = NonceKey::from_bytes(Zeroizing::new([7u8; KEY_LEN]));
        assert_eq!(again.check(&shared.issue(1000), 0), Ok(1000));
    }

    #[test]
    fn key_debug_is_opaque() {
        let k = NonceKey::from_bytes(Zeroizing::new([0x41; KEY_LEN]));
        assert_eq!(format!("{k:?}"), "NonceKey(..)");
    }
}
