//! The per-session hash chain H0..H3 (RFC 6189 §9, used by §5.2–§5.7), the hvi commitment
//! (§4.4.1.1) and total_hash (§4.4.1.4, §4.4.2.4).

use core::fmt;

use rand_core::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::hash::{sha256, sha256_parts};

/// One endpoint's hash chain: H0 is random, `H1 = hash(H0)`, `H2 = hash(H1)`,
/// `H3 = hash(H2)`. H3 goes in Hello, H2 in Commit, H1 in DHPart1/2, H0 in Confirm1/2; each
/// revealed element keys the MAC of the message sent one step earlier.
///
/// Zeroized on drop; `Debug` shows only the public H3.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HashChain {
    /// The random preimage, revealed last (in Confirm).
    pub h0: [u8; 32],
    /// `sha256(h0)`.
    pub h1: [u8; 32],
    /// `sha256(h1)`.
    pub h2: [u8; 32],
    /// `sha256(h2)`, sent in Hello.
    pub h3: [u8; 32],
}

impl HashChain {
    /// Builds the chain from a given H0.
    pub fn from_h0(h0: [u8; 32]) -> HashChain {
        let h1 = sha256(&h0);
        let h2 = sha256(&h1);
        let h3 = sha256(&h2);
        HashChain { h0, h1, h2, h3 }
    }

    /// Draws a fresh random H0 and builds the chain.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> HashChain {
        let mut h0 = [0u8; 32];
        rng.fill_bytes(&mut h0);
        let chain = HashChain::from_h0(h0);
        h0.zeroize();
        chain
    }
}

impl fmt::Debug for HashChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HashChain(h3=")?;
        for b in &self.h3[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// Whether `sha256(preimage) == image`, compared in constant time: checks a revealed chain
/// element against the one received earlier (e.g. H2 from Commit against Hello's H3).
pub fn chain_link_ok(preimage: &[u8; 32], image: &[u8; 32]) -> bool {
    sha256(preimage).ct_eq(image).into()
}

/// The initiator's commitment `hvi = hash(initiator's DHPart2 || responder's Hello)`
/// (RFC 6189 §4.4.1.1), over the encoded messages (not the packets).
pub fn hvi(dhpart2: &[u8], responder_hello: &[u8]) -> [u8; 32] {
    sha256_parts(&[dhpart2, responder_hello])
}

/// `total_hash = hash(Hello of responder || Commit || DHPart1 || DHPart2)` (RFC 6189
/// §4.4.1.4), over the encoded messages.
pub fn total_hash_dh(
    responder_hello: &[u8],
    commit: &[u8],
    dhpart1: &[u8],
    dhpart2: &[u8],
) -> [u8; 32] {
    sha256_parts(&[responder_hello, commit, dhpart1, dhpart2])
}

/// `total_hash = hash(Hello of responder || Commit)` in preshared mode (RFC 6189 §4.4.2.4).
pub fn total_hash_preshared(responder_hello: &[u8], commit: &[u8]) -> [u8; 32] {
    sha256_parts(&[responder_hello, commit])
}
