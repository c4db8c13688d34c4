//! Confirm1/Confirm2 protection (RFC 6189 §4.6, §5.7): AES-128 in full-block (128-bit
//! feedback) CFB mode over the encrypted part, then a truncated MAC over the ciphertext.

use aes::Aes128;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};

use super::hash::mac8;
use crate::secret::Secret32;

/// Encrypts `data` in place with AES-128-CFB (128-bit feedback; a final partial block is
/// truncated, so the ciphertext has the plaintext's length). The responder uses `zrtpkeyr`
/// for Confirm1, the initiator `zrtpkeyi` for Confirm2; `iv` is the message's random CFB IV.
pub fn confirm_encrypt(zrtpkey: &[u8; 16], iv: &[u8; 16], data: &mut [u8]) {
    cfb_mode::Encryptor::<Aes128>::new(zrtpkey.into(), iv.into()).encrypt(data);
}

/// Decrypts `data` in place; the inverse of [`confirm_encrypt`]. Verify [`confirm_mac`] over
/// the ciphertext first.
pub fn confirm_decrypt(zrtpkey: &[u8; 16], iv: &[u8; 16], data: &mut [u8]) {
    cfb_mode::Decryptor::<Aes128>::new(zrtpkey.into(), iv.into()).decrypt(data);
}

/// `confirm_mac = MAC(mackey, encrypted part)` truncated to 64 bits: `mackeyr` for Confirm1,
/// `mackeyi` for Confirm2. Compare with [`super::mac_eq`].
pub fn confirm_mac(mackey: &Secret32, encrypted: &[u8]) -> [u8; 8] {
    mac8(mackey.expose(), encrypted)
}
