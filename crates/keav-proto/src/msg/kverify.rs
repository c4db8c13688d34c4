//! KVerify, the KEAV verification message (type block `"KVerify "`).
//!
//! Offsets from the start of the message: `12` backend (4) · `16` step (1) ·
//! `17` reserved (1, zero) · `18` payload length in bytes (2) · `20` payload, zero-padded to a
//! multiple of 4 · MAC (16) last. Length: 9 words + ⌈payload/4⌉ words.

use super::{pad4, AlgoId};
use crate::codec::{Codec, Reader};
use crate::error::ParseError;

/// Largest KVerify payload in bytes.
pub const MAX_KVERIFY_PAYLOAD: usize = 1024;

/// One step of the KEAV equality test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KVerify {
    /// Verification backend (`KVCP`, `KVSM`, ...).
    pub backend: AlgoId,
    /// Step number within the backend's exchange.
    pub step: u8,
    /// Backend message, at most [`MAX_KVERIFY_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
    /// MAC over the whole message except this field.
    pub mac: [u8; 16],
}

impl KVerify {
    /// Checks the payload bound.
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.payload.len() > MAX_KVERIFY_PAYLOAD {
            return Err(ParseError::BadField("KVerify payload above 1024 bytes"));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self) -> usize {
        4 + 1 + 1 + 2 + pad4(self.payload.len()) + 16
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        self.backend.encode(out);
        out.push(self.step);
        out.push(0);
        // An over-long payload saturates the field; the parser rejects either way.
        let len = u16::try_from(self.payload.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.payload);
        out.resize(out.len() + pad4(self.payload.len()) - self.payload.len(), 0);
        out.extend_from_slice(&self.mac);
    }

    pub(crate) fn read_body(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let backend = AlgoId::read(r)?;
        let step = r.u8()?;
        if r.u8()? != 0 {
            return Err(ParseError::BadField("KVerify reserved byte not zero"));
        }
        let len = usize::from(r.u16()?);
        if len > MAX_KVERIFY_PAYLOAD {
            return Err(ParseError::BadField("KVerify payload above 1024 bytes"));
        }
        let payload = r.take(len)?.to_vec();
        if r.take(pad4(len) - len)?.iter().any(|&b| b != 0) {
            return Err(ParseError::BadField("KVerify padding not zero"));
        }
        let mac = r.array()?;
        Ok(KVerify {
            backend,
            step,
            payload,
            mac,
        })
    }
}
