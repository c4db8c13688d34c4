//! Commit (RFC 6189 §5.4, Figures 5–7).
//!
//! Offsets from the start of the message: `12` H2 (32) · `44` ZID (12) · `56` hash ·
//! `60` cipher · `64` auth tag · `68` key agreement · `72` SAS (4 each) · `76` then by key
//! agreement: DH `hvi` (32), 29 words in all; `Prsh` nonce (16) and key ID (8), 27 words;
//! `Mult` nonce (16), 25 words · MAC (8) last.

use super::AlgoId;
use crate::cache::Zid;
use crate::codec::{Codec, Reader};
use crate::error::ParseError;

/// The mode-specific part of a Commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitBody {
    /// DH mode: the commitment `hvi = hash(initiator's DHPart2 || responder's Hello)`.
    Dh {
        /// The hvi commitment.
        hvi: [u8; 32],
    },
    /// Preshared mode (key agreement `Prsh`).
    Preshared {
        /// Initiator's nonce.
        nonce: [u8; 16],
        /// keyID derived from the retained secret.
        key_id: [u8; 8],
    },
    /// Multistream mode (key agreement `Mult`).
    Multistream {
        /// Initiator's nonce.
        nonce: [u8; 16],
    },
}

impl CommitBody {
    fn len(&self) -> usize {
        match self {
            CommitBody::Dh { .. } => 32,
            CommitBody::Preshared { .. } => 24,
            CommitBody::Multistream { .. } => 16,
        }
    }
}

/// A Commit message. Which [`CommitBody`] is read is decided by `key_agreement`: `Prsh` →
/// preshared, `Mult` → multistream, anything else → DH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Hash image H2 of the initiator's hash chain.
    pub h2: [u8; 32],
    /// The initiator's ZID (must equal the one in its Hello; checked by the handshake).
    pub zid: Zid,
    /// Chosen hash type.
    pub hash: AlgoId,
    /// Chosen cipher type.
    pub cipher: AlgoId,
    /// Chosen SRTP auth tag type.
    pub auth_tag: AlgoId,
    /// Chosen key agreement type.
    pub key_agreement: AlgoId,
    /// Chosen SAS type.
    pub sas: AlgoId,
    /// Mode-specific fields; must agree with `key_agreement`.
    pub body: CommitBody,
    /// MAC keyed by H1 over the whole message except this field.
    pub mac: [u8; 8],
}

impl Commit {
    /// Checks that `body` agrees with `key_agreement`.
    pub fn validate(&self) -> Result<(), ParseError> {
        let ok = match self.body {
            CommitBody::Dh { .. } => {
                self.key_agreement != AlgoId::PRSH && self.key_agreement != AlgoId::MULT
            }
            CommitBody::Preshared { .. } => self.key_agreement == AlgoId::PRSH,
            CommitBody::Multistream { .. } => self.key_agreement == AlgoId::MULT,
        };
        if ok {
            Ok(())
        } else {
            Err(ParseError::BadField(
                "Commit body does not match key agreement",
            ))
        }
    }

    pub(crate) fn body_len(&self) -> usize {
        32 + 12 + 5 * 4 + self.body.len() + 8
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.h2);
        out.extend_from_slice(&self.zid.0);
        for a in [
            self.hash,
            self.cipher,
            self.auth_tag,
            self.key_agreement,
            self.sas,
        ] {
            a.encode(out);
        }
        // An inconsistent body is written as-is: its length then disagrees with what the
        // key agreement announces, so the parser rejects it.
        match &self.body {
            CommitBody::Dh { hvi } => out.extend_from_slice(hvi),
            CommitBody::Preshared { nonce, key_id } => {
                out.extend_from_slice(nonce);
                out.extend_from_slice(key_id);
            }
            CommitBody::Multistream { nonce } => out.extend_from_slice(nonce),
        }
        out.extend_from_slice(&self.mac);
    }

    pub(crate) fn read_body(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let h2 = r.array()?;
        let zid = Zid(r.array()?);
        let hash = AlgoId::read(r)?;
        let cipher = AlgoId::read(r)?;
        let auth_tag = AlgoId::read(r)?;
        let key_agreement = AlgoId::read(r)?;
        let sas = AlgoId::read(r)?;
        let body = if key_agreement == AlgoId::PRSH {
            CommitBody::Preshared {
                nonce: r.array()?,
                key_id: r.array()?,
            }
        } else if key_agreement == AlgoId::MULT {
            CommitBody::Multistream { nonce: r.array()? }
        } else {
            CommitBody::Dh { hvi: r.array()? }
        };
        let mac = r.array()?;
        Ok(Commit {
            h2,
            zid,
            hash,
            cipher,
            auth_tag,
            key_agreement,
            sas,
            body,
            mac,
        })
    }
}
