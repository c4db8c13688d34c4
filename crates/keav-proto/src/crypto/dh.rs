//! X25519 key agreement (`X255`, RFC 7748), as Linphone's bzrtp uses it in place of the RFC
//! 6189 finite-field and NIST-curve groups.

use core::fmt;

use rand_core::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::error::Error;
use crate::secret::Secret32;

/// An X25519 private key with its public value. [`X25519KeyPair::agree`] consumes it, so one
/// key pair serves exactly one agreement. The private key is zeroized on drop and never
/// printed.
pub struct X25519KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl X25519KeyPair {
    /// Draws a fresh private key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> X25519KeyPair {
        let secret = StaticSecret::random_from_rng(rng);
        let public = PublicKey::from(&secret);
        X25519KeyPair { secret, public }
    }

    /// Builds a key pair from fixed private-key bytes (clamped as RFC 7748 says). For test
    /// vectors and deterministic interop tests only; sessions use [`X25519KeyPair::generate`].
    pub fn from_private_bytes(bytes: [u8; 32]) -> X25519KeyPair {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        X25519KeyPair { secret, public }
    }

    /// The 32-byte public value (pvi / pvr in DHPart2 / DHPart1).
    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Computes the DHResult with the peer's public value and erases the private key.
    ///
    /// Fails with [`Error::BadPublicValue`] if `peer_pv` is not 32 bytes or if the result is
    /// all zero (a low-order peer value, RFC 7748 §6.1), the X25519 counterpart of RFC 6189
    /// §4.4.1's check against 1 and p-1.
    pub fn agree(self, peer_pv: &[u8]) -> Result<Secret32, Error> {
        let pv: [u8; 32] = peer_pv.try_into().map_err(|_| Error::BadPublicValue)?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(pv));
        if !shared.was_contributory() {
            return Err(Error::BadPublicValue);
        }
        Ok(Secret32::new(shared.to_bytes()))
    }
}

impl fmt::Debug for X25519KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "X25519KeyPair(public=")?;
        for b in &self.public.as_bytes()[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}
