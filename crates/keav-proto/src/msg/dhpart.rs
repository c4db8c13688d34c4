//! DHPart1 and DHPart2 (RFC 6189 §5.5–5.6, Figures 8–9).
//!
//! Offsets from the start of the message: `12` H1 (32) · `44` rs1ID · `52` rs2ID ·
//! `60` auxsecretID · `68` pbxsecretID (8 each) · `76` pv (rest minus 8) · MAC (8) last.
//! Length: 21 words + pv words (X25519: 29 words, DH3k: 117 words).

use crate::codec::Reader;
use crate::error::ParseError;

/// A DHPart1 or DHPart2 message body (the two share one layout).
///
/// The length of `pv` is implied by the message length; it is a non-empty multiple of 4
/// bytes, bounded by [`MAX_MESSAGE_LEN`](super::MAX_MESSAGE_LEN). Whether it has the right
/// length for the negotiated key agreement (32 bytes for `X255`) is the handshake's check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhPart {
    /// Hash image H1 of the sender's hash chain.
    pub h1: [u8; 32],
    /// rs1ID (truncated MAC of the first retained secret, or random).
    pub rs1_id: [u8; 8],
    /// rs2ID.
    pub rs2_id: [u8; 8],
    /// auxsecretID.
    pub aux_id: [u8; 8],
    /// pbxsecretID.
    pub pbx_id: [u8; 8],
    /// The sender's DH public value.
    pub pv: Vec<u8>,
    /// MAC keyed by H0 over the whole message except this field.
    pub mac: [u8; 8],
}

impl DhPart {
    /// Checks that `pv` is non-empty and a whole number of 32-bit words.
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.pv.is_empty() || self.pv.len() % 4 != 0 {
            return Err(ParseError::BadField(
                "DH public value empty or not a multiple of 4 bytes",
            ));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self) -> usize {
        32 + 4 * 8 + self.pv.len() + 8
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.h1);
        out.extend_from_slice(&self.rs1_id);
        out.extend_from_slice(&self.rs2_id);
        out.extend_from_slice(&self.aux_id);
        out.extend_from_slice(&self.pbx_id);
        out.extend_from_slice(&self.pv);
        out.extend_from_slice(&self.mac);
    }

    pub(crate) fn read_body(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let h1 = r.array()?;
        let rs1_id = r.array()?;
        let rs2_id = r.array()?;
        let aux_id = r.array()?;
        let pbx_id = r.array()?;
        let pv_len = r.remaining().checked_sub(8).ok_or(ParseError::Truncated)?;
        let pv = r.take(pv_len)?.to_vec();
        let mac = r.array()?;
        let m = DhPart {
            h1,
            rs1_id,
            rs2_id,
            aux_id,
            pbx_id,
            pv,
            mac,
        };
        m.validate()?;
        Ok(m)
    }
}
