//! Confirm1 and Confirm2 (RFC 6189 §5.7, Figure 10).
//!
//! Offsets from the start of the message: `12` confirm_mac (8) · `20` CFB IV (16) ·
//! `36` encrypted part (rest). The encrypted part, once decrypted, is a [`ConfirmBody`]:
//! H0 (32) · word `unused(15)|sig len(9)|0000EVAD` · cache expiry (4) · signature
//! (sig len words, including its type block). Without a signature the message is 19 words.

use crate::codec::{Codec, Reader};
use crate::error::ParseError;

/// Smallest encrypted part: H0, the flags word and the cache expiry.
pub const CONFIRM_MIN_ENCRYPTED_LEN: usize = 40;

/// A Confirm1 or Confirm2 message as carried on the wire (the encrypted part still
/// encrypted). Decrypt `encrypted` with AES-CFB, then parse it with
/// [`ConfirmBody::from_bytes`](crate::codec::Codec::from_bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirm {
    /// MAC over `encrypted` (keyed by mackeyi/mackeyr, RFC 6189 §4.6).
    pub confirm_mac: [u8; 8],
    /// CFB initialisation vector.
    pub iv: [u8; 16],
    /// The encrypted region: at least 40 bytes and a multiple of 4.
    pub encrypted: Vec<u8>,
}

impl Confirm {
    /// Checks the size of the encrypted part (≥ 40 bytes, whole words).
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.encrypted.len() < CONFIRM_MIN_ENCRYPTED_LEN || self.encrypted.len() % 4 != 0 {
            return Err(ParseError::BadField(
                "Confirm encrypted part shorter than 40 bytes or not whole words",
            ));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self) -> usize {
        8 + 16 + self.encrypted.len()
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.confirm_mac);
        out.extend_from_slice(&self.iv);
        out.extend_from_slice(&self.encrypted);
    }

    pub(crate) fn read_body(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let confirm_mac = r.array()?;
        let iv = r.array()?;
        if r.remaining() < CONFIRM_MIN_ENCRYPTED_LEN {
            return Err(ParseError::Truncated);
        }
        let encrypted = r.rest().to_vec();
        let m = Confirm {
            confirm_mac,
            iv,
            encrypted,
        };
        m.validate()?;
        Ok(m)
    }
}

/// The flag bits `0000EVAD` of a Confirm (undefined bits are sent as zero and ignored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConfirmFlags {
    /// E: PBX enrollment (§7.3.1).
    pub e: bool,
    /// V: SAS verified (§7.1).
    pub v: bool,
    /// A: allow clear (§4.7.2).
    pub a: bool,
    /// D: disclosure (§11).
    pub d: bool,
}

impl ConfirmFlags {
    /// The flag byte.
    pub fn to_byte(self) -> u8 {
        (u8::from(self.e) << 3)
            | (u8::from(self.v) << 2)
            | (u8::from(self.a) << 1)
            | u8::from(self.d)
    }

    /// From a flag byte, ignoring the four undefined high bits.
    pub fn from_byte(b: u8) -> Self {
        ConfirmFlags {
            e: b & 0x08 != 0,
            v: b & 0x04 != 0,
            a: b & 0x02 != 0,
            d: b & 0x01 != 0,
        }
    }
}

/// Largest signature length the 9-bit field can express, in words.
pub const MAX_SIG_LEN_WORDS: u16 = 0x1ff;

/// The plaintext of a Confirm's encrypted part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfirmBody {
    /// Hash preimage H0 of the sender's hash chain.
    pub h0: [u8; 32],
    /// Signature length in words (9 bits); must equal `signature.len() / 4`.
    pub sig_len_words: u16,
    /// E, V, A, D flags.
    pub flags: ConfirmFlags,
    /// Cache expiration interval in seconds (`0xffffffff` = forever, 0 = do not cache).
    pub cache_expiry: u32,
    /// Signature type block and signature, `sig_len_words * 4` bytes (empty if none).
    pub signature: Vec<u8>,
}

impl ConfirmBody {
    /// Checks that `sig_len_words` fits 9 bits and matches `signature`.
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.sig_len_words > MAX_SIG_LEN_WORDS
            || usize::from(self.sig_len_words) * 4 != self.signature.len()
        {
            return Err(ParseError::BadField(
                "Confirm signature length does not match signature",
            ));
        }
        Ok(())
    }
}

impl Codec for ConfirmBody {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.h0);
        // An inconsistent length is replaced by one that cannot match the signature bytes,
        // so that `from_bytes` rejects the output instead of reading a different body.
        let sig_len = if self.validate().is_ok() {
            self.sig_len_words
        } else if self.signature.is_empty() {
            1
        } else {
            0
        };
        let word = (u32::from(sig_len) << 8) | u32::from(self.flags.to_byte());
        out.extend_from_slice(&word.to_be_bytes());
        out.extend_from_slice(&self.cache_expiry.to_be_bytes());
        out.extend_from_slice(&self.signature);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let h0 = r.array()?;
        // The 15 unused high bits are ignored on receipt (RFC 6189 §5.7).
        let word = r.u32()?;
        let sig_len_words = ((word >> 8) & u32::from(MAX_SIG_LEN_WORDS)) as u16;
        let flags = ConfirmFlags::from_byte((word & 0xff) as u8);
        let cache_expiry = r.u32()?;
        let signature = r.take(usize::from(sig_len_words) * 4)?.to_vec();
        Ok(ConfirmBody {
            h0,
            sig_len_words,
            flags,
            cache_expiry,
            signature,
        })
    }
}
