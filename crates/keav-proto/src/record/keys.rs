//! The channel key schedule and the per-epoch AEAD state.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;

use super::{Aead, TAG_LEN};
use crate::crypto::kdf32;
use crate::handshake::Role;
use crate::secret::Secret32;

/// Label of the initiator-to-responder chain key of epoch 0.
pub(super) const LABEL_I2R: &[u8] = b"KEAV channel initiator to responder";
/// Label of the responder-to-initiator chain key of epoch 0.
pub(super) const LABEL_R2I: &[u8] = b"KEAV channel responder to initiator";
/// Label of the one-way ratchet step `chain_{e+1} = KDF(chain_e, ...)`.
pub(super) const LABEL_RATCHET: &[u8] = b"KEAV channel ratchet";

/// Label of the AEAD key of an epoch; it names the AEAD so that the two algorithms never
/// share a key.
pub(super) fn record_key_label(aead: Aead) -> &'static [u8] {
    match aead {
        Aead::Aes256Gcm => b"KEAV channel record key KGCM",
        Aead::ChaCha20Poly1305 => b"KEAV channel record key KC20",
    }
}

/// The chain keys of epoch 0 for the (sending, receiving) directions of `role`.
pub(super) fn initial_chains(
    exported_key: &Secret32,
    kdf_context: &[u8],
    role: Role,
) -> (Secret32, Secret32) {
    let i2r = kdf32(exported_key.expose(), LABEL_I2R, kdf_context);
    let r2i = kdf32(exported_key.expose(), LABEL_R2I, kdf_context);
    match role {
        Role::Initiator => (i2r, r2i),
        Role::Responder => (r2i, i2r),
    }
}

/// One ratchet step: `chain_{e+1} = KDF(chain_e, "KEAV channel ratchet", KDF_Context, 256)`.
pub(super) fn ratchet(chain: &Secret32, kdf_context: &[u8]) -> Secret32 {
    kdf32(chain.expose(), LABEL_RATCHET, kdf_context)
}

/// The AEAD state of the epoch whose chain key is `chain`.
pub(super) fn epoch_cipher(aead: Aead, chain: &Secret32, kdf_context: &[u8]) -> Cipher {
    let key = kdf32(chain.expose(), record_key_label(aead), kdf_context);
    Cipher::new(aead, &key)
}

/// A keyed AEAD instance (key schedule precomputed once per epoch).
///
/// Boxed so that ratchet steps move a pointer rather than copies of the round keys; the
/// instances erase their key material when dropped (AES round keys and the ChaCha20 key).
pub(super) enum Cipher {
    Gcm(Box<Aes256Gcm>),
    ChaCha(Box<ChaCha20Poly1305>),
}

/// The 96-bit nonce of a record: four zero bytes, then the sequence number big-endian.
fn nonce(seq: u64) -> aes_gcm::Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    for (d, s) in n.iter_mut().skip(4).zip(seq.to_be_bytes()) {
        *d = s;
    }
    n.into()
}

impl Cipher {
    pub(super) fn new(aead: Aead, key: &Secret32) -> Cipher {
        match aead {
            Aead::Aes256Gcm => Cipher::Gcm(Box::new(Aes256Gcm::new(key.expose().into()))),
            Aead::ChaCha20Poly1305 => {
                Cipher::ChaCha(Box::new(ChaCha20Poly1305::new(key.expose().into())))
            }
        }
    }

    /// Encrypts `buf` in place; returns the tag, or `None` if the AEAD refuses the length
    /// (never for records of at most `MAX_PLAINTEXT` bytes).
    #[inline]
    pub(super) fn seal(&self, seq: u64, aad: &[u8], buf: &mut [u8]) -> Option<[u8; TAG_LEN]> {
        let n = nonce(seq);
        let tag = match self {
            Cipher::Gcm(c) => c.encrypt_in_place_detached(&n, aad, buf),
            Cipher::ChaCha(c) => c.encrypt_in_place_detached(&n, aad, buf),
        }
        .ok()?;
        let mut out = [0u8; TAG_LEN];
        for (d, s) in out.iter_mut().zip(tag.iter()) {
            *d = *s;
        }
        Some(out)
    }

    /// Verifies the tag and, only if it is valid, decrypts `buf` in place (both AEAD
    /// implementations check the tag before touching the buffer, so a failed open leaves
    /// `buf` as it was).
    #[inline]
    pub(super) fn open(&self, seq: u64, aad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        let n = nonce(seq);
        let tag = tag.into();
        match self {
            Cipher::Gcm(c) => c.decrypt_in_place_detached(&n, aad, buf, tag),
            Cipher::ChaCha(c) => c.decrypt_in_place_detached(&n, aad, buf, tag),
        }
        .is_ok()
    }
}
