//! Hello (RFC 6189 §5.2, Figure 3).
//!
//! Body layout after the 12-byte header (offsets from the start of the message):
//! `12` version (4) · `16` client id (16) · `32` H3 (32) · `64` ZID (12) ·
//! `76` flag/count word `0|S|M|P|unused(8)|hc|cc|ac|kc|sc` (4) · `80` algorithm lists,
//! 4 bytes each, in the order hash, cipher, auth tag, key agreement, SAS · MAC (8).
//! Length: 22 + (hc + cc + ac + kc + sc) words.

use super::AlgoId;
use crate::cache::Zid;
use crate::codec::{Codec, Reader};
use crate::error::ParseError;

/// The ZRTP protocol version this crate speaks.
pub const ZRTP_VERSION: [u8; 4] = *b"1.10";

/// Largest algorithm list a Hello can carry (the counts are 4-bit fields limited to 0..=7).
pub const MAX_ALGOS_PER_LIST: usize = 7;

const FLAG_S: u32 = 1 << 30;
const FLAG_M: u32 = 1 << 29;
const FLAG_P: u32 = 1 << 28;

/// A Hello message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version, `b"1.10"` for RFC 6189. Not checked by the parser (negotiation is
    /// the handshake's business).
    pub version: [u8; 4],
    /// Client identifier (vendor and release), space padded.
    pub client_id: [u8; 16],
    /// Hash image H3 of the sender's hash chain.
    pub h3: [u8; 32],
    /// The sender's ZID.
    pub zid: Zid,
    /// S: able to verify SAS signatures.
    pub signature_capable: bool,
    /// M: a trusted MiTM (PBX) able to send SASrelay.
    pub mitm: bool,
    /// P: passive, never sends Commit.
    pub passive: bool,
    /// Hash types in preference order (at most 7).
    pub hashes: Vec<AlgoId>,
    /// Cipher types (at most 7).
    pub ciphers: Vec<AlgoId>,
    /// SRTP auth tag types (at most 7).
    pub auth_tags: Vec<AlgoId>,
    /// Key agreement types (at most 7).
    pub key_agreements: Vec<AlgoId>,
    /// SAS types (at most 7).
    pub sas_types: Vec<AlgoId>,
    /// MAC keyed by H2 over the whole message except this field.
    pub mac: [u8; 8],
}

impl Hello {
    fn lists(&self) -> [&Vec<AlgoId>; 5] {
        [
            &self.hashes,
            &self.ciphers,
            &self.auth_tags,
            &self.key_agreements,
            &self.sas_types,
        ]
    }

    /// Checks that every algorithm list holds at most [`MAX_ALGOS_PER_LIST`] entries.
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.lists().iter().any(|l| l.len() > MAX_ALGOS_PER_LIST) {
            return Err(ParseError::BadField("Hello algorithm list longer than 7"));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self) -> usize {
        4 + 16 + 32 + 12 + 4 + 4 * self.lists().iter().map(|l| l.len()).sum::<usize>() + 8
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.version);
        out.extend_from_slice(&self.client_id);
        out.extend_from_slice(&self.h3);
        out.extend_from_slice(&self.zid.0);
        let mut word = 0u32;
        if self.signature_capable {
            word |= FLAG_S;
        }
        if self.mitm {
            word |= FLAG_M;
        }
        if self.passive {
            word |= FLAG_P;
        }
        // Over-long lists get a count of 15 (saturated), which the parser rejects.
        for (i, l) in self.lists().iter().enumerate() {
            let count = u32::try_from(l.len()).unwrap_or(15).min(15);
            word |= count << (16 - 4 * i);
        }
        out.extend_from_slice(&word.to_be_bytes());
        for l in self.lists() {
            for a in l {
                a.encode(out);
            }
        }
        out.extend_from_slice(&self.mac);
    }

    pub(crate) fn read_body(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let version = r.array()?;
        let client_id = r.array()?;
        let h3 = r.array()?;
        let zid = Zid(r.array()?);
        let word = r.u32()?;
        // The leading zero bit and the 8 unused bits are ignored on receipt (RFC 6189 §5.2).
        let mut counts = [0usize; 5];
        for (i, c) in counts.iter_mut().enumerate() {
            *c = ((word >> (16 - 4 * i)) & 0xf) as usize;
            if *c > MAX_ALGOS_PER_LIST {
                return Err(ParseError::BadField("Hello algorithm count above 7"));
            }
        }
        // Fail on a short body before allocating anything.
        let needed = 4 * counts.iter().sum::<usize>() + 8;
        if r.remaining() < needed {
            return Err(ParseError::Truncated);
        }
        let mut lists: [Vec<AlgoId>; 5] = Default::default();
        for (list, &c) in lists.iter_mut().zip(counts.iter()) {
            list.reserve_exact(c);
            for _ in 0..c {
                list.push(AlgoId::read(r)?);
            }
        }
        let mac = r.array()?;
        let [hashes, ciphers, auth_tags, key_agreements, sas_types] = lists;
        Ok(Hello {
            version,
            client_id,
            h3,
            zid,
            signature_capable: word & FLAG_S != 0,
            mitm: word & FLAG_M != 0,
            passive: word & FLAG_P != 0,
            hashes,
            ciphers,
            auth_tags,
            key_agreements,
            sas_types,
            mac,
        })
    }
}
