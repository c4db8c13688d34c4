//! SHA-256, HMAC-SHA-256 and the truncated ZRTP MAC.

use hmac::digest::generic_array::GenericArray;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// SHA-256 block size: HMAC keys up to this length are used zero-padded, longer ones hashed.
const BLOCK: usize = 64;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SHA-256 of the concatenation of `parts` (no separators, no length prefixes).
pub fn sha256_parts(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// HMAC-SHA-256 (RFC 2104) keyed by `key` over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // Build the RFC 2104 key block ourselves (hash if longer than a block, zero-pad) so that
    // construction is infallible; a block-sized key is used by HMAC unchanged.
    let mut block = Zeroizing::new([0u8; BLOCK]);
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new(GenericArray::from_slice(&block[..]));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The ZRTP message MAC (RFC 6189 §5.1.2.1 with S256): HMAC-SHA-256 truncated to its leftmost
/// 64 bits. Also used for retained-secret IDs, the preshared key ID and `confirm_mac`.
pub fn mac8(key: &[u8], data: &[u8]) -> [u8; 8] {
    let full = hmac_sha256(key, &[data]);
    let mut out = [0u8; 8];
    out.copy_from_slice(&full[..8]);
    out
}

/// Constant-time equality of two byte strings (`false` if the lengths differ; the length
/// itself is not secret).
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}
