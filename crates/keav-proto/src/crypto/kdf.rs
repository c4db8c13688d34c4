//! The ZRTP KDF (RFC 6189 §4.5.1), s0 in DH and preshared modes (§4.4.1.4, §4.4.2) and the
//! session keys derived from s0 (§4.5.2, §4.5.3, §4.6.1).

use core::fmt;

use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::hash::{hmac_sha256, mac8};
use crate::cache::Zid;
use crate::secret::Secret32;

/// `KDF(KI, Label, Context, L) = HMAC(KI, i || Label || 0x00 || Context || L)` truncated to the
/// leftmost `L` bits (RFC 6189 §4.5.1), with the counter `i` = 1 and `L` both 32-bit
/// big-endian and `L` given in bits.
///
/// The output has `ceil(L / 8)` bytes, at most 32 (the HMAC-SHA-256 length; the RFC does not
/// allow a larger `L`, and a larger one is still encoded as given but yields 32 bytes). If `L`
/// is not a multiple of 8, the unused low bits of the last byte are zero.
pub fn kdf(ki: &[u8], label: &[u8], context: &[u8], l_bits: u32) -> Vec<u8> {
    let full = Zeroizing::new(hmac_sha256(
        ki,
        &[
            &1u32.to_be_bytes(),
            label,
            &[0u8],
            context,
            &l_bits.to_be_bytes(),
        ],
    ));
    let n = (l_bits.div_ceil(8) as usize).min(full.len());
    let mut out = full[..n].to_vec();
    let rem = l_bits % 8;
    if rem != 0 && (l_bits as usize) < full.len() * 8 {
        if let Some(last) = out.last_mut() {
            *last &= 0xFFu8 << (8 - rem);
        }
    }
    out
}

/// [`kdf`] with `L` = 256, as a secret (s0 in preshared mode, ZRTPSess, MAC keys, rs1, ...).
pub fn kdf32(ki: &[u8], label: &[u8], context: &[u8]) -> Secret32 {
    Secret32::new(hmac_sha256(
        ki,
        &[
            &1u32.to_be_bytes(),
            label,
            &[0u8],
            context,
            &256u32.to_be_bytes(),
        ],
    ))
}

/// `KDF_Context = ZIDi || ZIDr || total_hash` (RFC 6189 §4.4.1.4 and §4.4.2.4), 56 bytes.
pub fn kdf_context(zidi: &Zid, zidr: &Zid, total_hash: &[u8; 32]) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(12 + 12 + 32);
    ctx.extend_from_slice(&zidi.0);
    ctx.extend_from_slice(&zidr.0);
    ctx.extend_from_slice(total_hash);
    ctx
}

/// Feeds `len(s) || s` into the hash, with a 32-bit big-endian length in octets; a null
/// secret contributes only a zero length.
fn update_len_prefixed(h: &mut Sha256, s: Option<&[u8]>) {
    let s = s.unwrap_or(&[]);
    // Secrets are at most a few hundred bytes; saturate rather than wrap for absurd inputs.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    h.update(len.to_be_bytes());
    h.update(s);
}

/// s0 in DH mode (RFC 6189 §4.4.1.4):
///
/// `s0 = hash(counter || DHResult || "ZRTP-HMAC-KDF" || ZIDi || ZIDr || total_hash ||
/// len(s1) || s1 || len(s2) || s2 || len(s3) || s3)`
///
/// with counter = 1 and all `len()` 32-bit big-endian octet counts; `None` stands for a null
/// secret (length 0, no bytes). `s1` is the matched retained secret ([`super::match_retained`]),
/// `s2` the matched auxsecret, `s3` the matched pbxsecret. For X25519 the DHResult is the
/// 32-byte shared secret as RFC 7748 outputs it.
pub fn s0_dh(
    dh_result: &Secret32,
    zidi: &Zid,
    zidr: &Zid,
    total_hash: &[u8; 32],
    s1: Option<&Secret32>,
    s2: Option<&[u8]>,
    s3: Option<&[u8]>,
) -> Secret32 {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(dh_result.expose());
    h.update(b"ZRTP-HMAC-KDF");
    h.update(zidi.0);
    h.update(zidr.0);
    h.update(total_hash);
    update_len_prefixed(&mut h, s1.map(|s| &s.expose()[..]));
    update_len_prefixed(&mut h, s2);
    update_len_prefixed(&mut h, s3);
    Secret32::new(h.finalize().into())
}

/// The temporary preshared key (RFC 6189 §4.4.2.2):
///
/// `preshared_key = hash(len(rs1) || rs1 || len(auxsecret) || auxsecret || len(pbxsecret) ||
/// pbxsecret)`
///
/// `None` stands for an absent auxsecret / pbxsecret (length 0). rs1 is mandatory: preshared
/// mode must not be used without it.
pub fn preshared_key(rs1: &Secret32, aux: Option<&[u8]>, pbx: Option<&[u8]>) -> Secret32 {
    let mut h = Sha256::new();
    update_len_prefixed(&mut h, Some(&rs1.expose()[..]));
    update_len_prefixed(&mut h, aux);
    update_len_prefixed(&mut h, pbx);
    Secret32::new(h.finalize().into())
}

/// The preshared Commit's key ID: `MAC(preshared_key, "Prsh")` truncated to 64 bits
/// (RFC 6189 §4.4.2.2).
pub fn preshared_key_id(psk: &Secret32) -> [u8; 8] {
    mac8(psk.expose(), b"Prsh")
}

/// s0 in preshared mode: `KDF(preshared_key, "ZRTP PSK", KDF_Context, 256)` (RFC 6189
/// §4.4.2.4).
pub fn s0_preshared(psk: &Secret32, kdf_context: &[u8]) -> Secret32 {
    kdf32(psk.expose(), b"ZRTP PSK", kdf_context)
}

/// The keys derived from s0 in DH or preshared mode with S256 and AES1.
///
/// Zeroized on drop; `Debug` prints nothing secret.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionKeys {
    /// `KDF(s0, "Initiator HMAC key", ctx, 256)`: keys the Confirm2 MAC.
    pub mackeyi: Secret32,
    /// `KDF(s0, "Responder HMAC key", ctx, 256)`: keys the Confirm1 MAC.
    pub mackeyr: Secret32,
    /// `KDF(s0, "Initiator ZRTP key", ctx, 128)`: encrypts Confirm2.
    pub zrtpkeyi: [u8; 16],
    /// `KDF(s0, "Responder ZRTP key", ctx, 128)`: encrypts Confirm1.
    pub zrtpkeyr: [u8; 16],
    /// `KDF(s0, "SAS", ctx, 256)`; its leftmost 32 bits are the sasvalue.
    pub sashash: [u8; 32],
    /// `KDF(s0, "ZRTP Session Key", ctx, 256)`.
    pub zrtp_sess: Secret32,
    /// `KDF(s0, "Exported key", ctx, 256)`: the root of KEAV's channel keys.
    pub exported_key: Secret32,
    /// `KDF(s0, "retained secret", ctx, 256)`: the next rs1 (RFC 6189 §4.6.1).
    pub new_rs1: Secret32,
}

impl SessionKeys {
    /// Derives all session keys from s0 and `KDF_Context` (RFC 6189 §4.5.2, §4.5.3, §4.6.1),
    /// with L = 256 for hash-length values and L = 128 for the AES-128 Confirm keys.
    pub fn derive(s0: &Secret32, kdf_context: &[u8]) -> SessionKeys {
        let ki = s0.expose();
        let key16 = |label: &[u8]| {
            let full = Zeroizing::new(kdf(ki, label, kdf_context, 128));
            let mut k = [0u8; 16];
            // kdf with L = 128 returns exactly 16 bytes.
            for (d, s) in k.iter_mut().zip(full.iter()) {
                *d = *s;
            }
            k
        };
        SessionKeys {
            mackeyi: kdf32(ki, b"Initiator HMAC key", kdf_context),
            mackeyr: kdf32(ki, b"Responder HMAC key", kdf_context),
            zrtpkeyi: key16(b"Initiator ZRTP key"),
            zrtpkeyr: key16(b"Responder ZRTP key"),
            sashash: *kdf32(ki, b"SAS", kdf_context).expose(),
            zrtp_sess: kdf32(ki, b"ZRTP Session Key", kdf_context),
            exported_key: kdf32(ki, b"Exported key", kdf_context),
            new_rs1: kdf32(ki, b"retained secret", kdf_context),
        }
    }
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}
