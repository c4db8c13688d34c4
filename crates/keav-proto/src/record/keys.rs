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

/// The AEAD state of the epoch whose chain key is `chain` (this build's backend).
pub(super) fn epoch_cipher(aead: Aead, chain: &Secret32, kdf_context: &[u8]) -> Cipher {
    epoch_cipher_with(Backend::DEFAULT, aead, chain, kdf_context)
}

/// [`epoch_cipher`] with the backend chosen.
pub(super) fn epoch_cipher_with(
    backend: Backend,
    aead: Aead,
    chain: &Secret32,
    kdf_context: &[u8],
) -> Cipher {
    let key = kdf32(chain.expose(), record_key_label(aead), kdf_context);
    Cipher::with_backend(backend, aead, &key)
}

/// Which AEAD implementation keys the epochs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backend {
    /// RustCrypto `aes-gcm` / `chacha20poly1305` (pure Rust; the default).
    RustCrypto,
    /// ring's assembly AEADs (feature `fast-aead`).
    #[cfg(feature = "fast-aead")]
    Ring,
}

impl Backend {
    /// The backend this build uses: ring with the `fast-aead` feature, RustCrypto otherwise.
    #[cfg(feature = "fast-aead")]
    pub(super) const DEFAULT: Backend = Backend::Ring;
    /// The backend this build uses: ring with the `fast-aead` feature, RustCrypto otherwise.
    #[cfg(not(feature = "fast-aead"))]
    pub(super) const DEFAULT: Backend = Backend::RustCrypto;

    /// Stable lowercase name.
    pub(super) const fn name(self) -> &'static str {
        match self {
            Backend::RustCrypto => "rustcrypto",
            #[cfg(feature = "fast-aead")]
            Backend::Ring => "ring",
        }
    }
}

/// A keyed AEAD instance (key schedule precomputed once per epoch).
///
/// Boxed so that ratchet steps move a pointer rather than copies of the round keys. Both
/// backends produce the same records bit for bit (same key, nonce, AAD, tag).
///
/// Erasure: the RustCrypto instances erase their key material when dropped (AES round keys and
/// the ChaCha20 key; not the GHASH subkey, see the module note). ring's `LessSafeKey` has no
/// public erasure: its expanded AES key and GHASH table, or its ChaCha20 key, stay in the freed
/// heap block after an epoch is dropped (and `unsafe` is forbidden here, so keav cannot wipe
/// them). The 32-byte record key it was built from is a [`Secret32`] and is erased.
pub(super) enum Cipher {
    Gcm(Box<Aes256Gcm>),
    ChaCha(Box<ChaCha20Poly1305>),
    #[cfg(feature = "fast-aead")]
    Ring(Box<ring::aead::LessSafeKey>),
}

/// The 96-bit nonce of a record: four zero bytes, then the sequence number big-endian.
fn nonce(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    for (d, s) in n.iter_mut().skip(4).zip(seq.to_be_bytes()) {
        *d = s;
    }
    n
}

impl Cipher {
    /// A keyed instance of `aead` from `backend`.
    pub(super) fn with_backend(backend: Backend, aead: Aead, key: &Secret32) -> Cipher {
        match backend {
            Backend::RustCrypto => match aead {
                Aead::Aes256Gcm => Cipher::Gcm(Box::new(Aes256Gcm::new(key.expose().into()))),
                Aead::ChaCha20Poly1305 => {
                    Cipher::ChaCha(Box::new(ChaCha20Poly1305::new(key.expose().into())))
                }
            },
            #[cfg(feature = "fast-aead")]
            Backend::Ring => match ring_key(aead, key) {
                Some(k) => Cipher::Ring(Box::new(k)),
                // Not reached (see `ring_key`); the RustCrypto instance seals the same
                // records.
                None => Cipher::with_backend(Backend::RustCrypto, aead, key),
            },
        }
    }

    /// Encrypts `buf` in place; returns the tag, or `None` if the AEAD refuses the length
    /// (never for records of at most `MAX_PLAINTEXT` bytes).
    #[inline]
    pub(super) fn seal(&self, seq: u64, aad: &[u8], buf: &mut [u8]) -> Option<[u8; TAG_LEN]> {
        self.seal_with_nonce(nonce(seq), aad, buf)
    }

    /// [`Cipher::seal`] with an explicit 96-bit nonce (known-answer tests).
    #[inline]
    pub(super) fn seal_with_nonce(
        &self,
        n: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let mut out = [0u8; TAG_LEN];
        let tag = match self {
            Cipher::Gcm(c) => c.encrypt_in_place_detached(&n.into(), aad, buf).ok()?,
            Cipher::ChaCha(c) => c.encrypt_in_place_detached(&n.into(), aad, buf).ok()?,
            #[cfg(feature = "fast-aead")]
            Cipher::Ring(k) => {
                use ring::aead::{Aad, Nonce};
                let tag = k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(aad),
                        buf,
                    )
                    .ok()?;
                for (d, s) in out.iter_mut().zip(tag.as_ref()) {
                    *d = *s;
                }
                return Some(out);
            }
        };
        for (d, s) in out.iter_mut().zip(tag.iter()) {
            *d = *s;
        }
        Some(out)
    }

    /// Verifies the tag and, only if it is valid, decrypts `buf` in place. A failed open
    /// leaves `buf` as it was: the RustCrypto AEADs check the tag before touching the buffer;
    /// ring decrypts while authenticating and zeroes the buffer on failure, so for ring the
    /// ciphertext is first copied into `scratch` (a buffer the opener reuses) and put back on
    /// failure.
    #[inline]
    pub(super) fn open(
        &self,
        seq: u64,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
        scratch: &mut Vec<u8>,
    ) -> bool {
        self.open_with_nonce(nonce(seq), aad, buf, tag, scratch)
    }

    /// [`Cipher::open`] with an explicit 96-bit nonce (known-answer tests).
    #[inline]
    #[cfg_attr(not(feature = "fast-aead"), allow(clippy::ptr_arg))] // `scratch` is ring's
    pub(super) fn open_with_nonce(
        &self,
        n: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
        #[cfg_attr(not(feature = "fast-aead"), allow(unused_variables))] scratch: &mut Vec<u8>,
    ) -> bool {
        match self {
            Cipher::Gcm(c) => c
                .decrypt_in_place_detached(&n.into(), aad, buf, tag.into())
                .is_ok(),
            Cipher::ChaCha(c) => c
                .decrypt_in_place_detached(&n.into(), aad, buf, tag.into())
                .is_ok(),
            #[cfg(feature = "fast-aead")]
            Cipher::Ring(k) => {
                use ring::aead::{Aad, Nonce, Tag};
                scratch.clear();
                scratch.extend_from_slice(buf);
                let ok = k
                    .open_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(aad),
                        Tag::from(*tag),
                        buf,
                        0..,
                    )
                    .is_ok();
                if !ok {
                    for (d, s) in buf.iter_mut().zip(scratch.iter()) {
                        *d = *s;
                    }
                }
                ok
            }
        }
    }
}

/// ring's keyed AEAD for `aead`; `None` only if ring refuses the key, which it does only for a
/// wrong length (both AEADs take the 32 bytes given).
#[cfg(feature = "fast-aead")]
fn ring_key(aead: Aead, key: &Secret32) -> Option<ring::aead::LessSafeKey> {
    use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
    let alg = match aead {
        Aead::Aes256Gcm => &AES_256_GCM,
        Aead::ChaCha20Poly1305 => &CHACHA20_POLY1305,
    };
    UnboundKey::new(alg, key.expose())
        .ok()
        .map(LessSafeKey::new)
}
