//! X25519 key agreement (`X255`, RFC 7748), as Linphone's bzrtp uses it in place of the RFC
//! 6189 finite-field and NIST-curve groups.

use core::fmt;

use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::Scalar;
use rand_core::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

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
        let shared = match x25519_via_edwards(&self.secret, &pv) {
            Some(s) => s,
            None => Zeroizing::new(self.secret.diffie_hellman(&PublicKey::from(pv)).to_bytes()),
        };
        // All zero = a low-order peer value (RFC 7748 §6.1). Constant time, like dalek's
        // `was_contributory`.
        if bool::from(shared.ct_eq(&[0u8; 32])) {
            return Err(Error::BadPublicValue);
        }
        Ok(Secret32::new(*shared))
    }
}

/// X25519 (RFC 7748 §5) computed on the birationally equivalent Edwards curve, whose
/// constant-time variable-base multiplication uses curve25519-dalek's SIMD backend when the
/// CPU has AVX2 (about 10 % faster than the Montgomery ladder here). Same result as the
/// ladder for every input it accepts; `None` for a `u` that is not the coordinate of a point
/// on the curve (twist points and `u = -1`), which the caller hands to the ladder.
///
/// Why it is the same function: X25519 multiplies by the clamped scalar `k`, a multiple of 8,
/// so `k·P = (k/8)·(8·P)`; `8·P` lies in the prime-order subgroup, where `k/8` may be reduced
/// modulo ℓ. The `u`-coordinate does not depend on the sign of the Edwards `x` chosen for
/// the conversion (`P` and `-P` have the same `u`). Which path runs depends only on the peer's
/// public value, never on a secret.
fn x25519_via_edwards(secret: &StaticSecret, u: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let point = MontgomeryPoint(*u).to_edwards(0)?;
    let mut k = Zeroizing::new(secret.to_bytes());
    // RFC 7748 clamping, then k/8 (a right shift by three bits, little-endian).
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    let mut k8 = Zeroizing::new([0u8; 32]);
    for i in 0..32 {
        let hi = k.get(i + 1).copied().unwrap_or(0);
        k8[i] = (k[i] >> 3) | (hi << 5);
    }
    let scalar = Zeroizing::new(Scalar::from_bytes_mod_order(*k8));
    let shared = *scalar * point.mul_by_cofactor();
    Some(Zeroizing::new(shared.to_montgomery().to_bytes()))
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
