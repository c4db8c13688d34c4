//! Retained-secret IDs and the matching rule of RFC 6189 §4.3 / §4.3.1.

use rand_core::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;

use super::hash::mac8;
use crate::secret::Secret32;

/// The role whose label an ID was computed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsRole {
    /// IDs sent by the initiator in DHPart2: `MAC(rs, "Initiator")`.
    Initiator,
    /// IDs sent by the responder in DHPart1: `MAC(rs, "Responder")`.
    Responder,
}

impl RsRole {
    /// The MAC label of this role (`b"Initiator"` / `b"Responder"`).
    pub fn label(&self) -> &'static [u8] {
        match self {
            RsRole::Initiator => b"Initiator",
            RsRole::Responder => b"Responder",
        }
    }
}

/// A retained-secret ID (RFC 6189 §4.3.1): `MAC(rs, label)` truncated to 64 bits, e.g.
/// `rs1IDi = rs_id(rs1, b"Initiator")`, `rs2IDr = rs_id(rs2, b"Responder")`.
pub fn rs_id(rs: &Secret32, label: &[u8]) -> [u8; 8] {
    mac8(rs.expose(), label)
}

/// A random 64-bit ID, sent in place of the ID of a secret one does not have (RFC 6189 §4.3),
/// so that an eavesdropper cannot tell which secrets exist.
pub fn random_id(rng: &mut (impl RngCore + CryptoRng)) -> [u8; 8] {
    let mut id = [0u8; 8];
    rng.fill_bytes(&mut id);
    id
}

/// Whether my secret `rs` (if any) has the ID `id` under `label`, in constant time.
fn has_id(rs: Option<&Secret32>, label: &[u8], id: &[u8; 8]) -> bool {
    match rs {
        Some(rs) => rs_id(rs, label).ct_eq(id).into(),
        None => false,
    }
}

/// RFC 6189 §4.3: which retained secret both sides share, giving s1.
///
/// `mine` are my (rs1, rs2); `peer_rs1_id` / `peer_rs2_id` are the IDs the peer sent, computed
/// with the peer's role label `peer_role` (so the local side is the other role). The rule is
/// the RFC's: s1 is the initiator's rs1 if it matches the responder's rs1 or rs2; otherwise
/// the initiator's rs2 if that matches the responder's rs1 or rs2; otherwise null (`None`).
/// Both sides therefore pick the same value. Secrets I do not have never match.
pub fn match_retained(
    mine: (Option<&Secret32>, Option<&Secret32>),
    peer_role: RsRole,
    peer_rs1_id: &[u8; 8],
    peer_rs2_id: &[u8; 8],
) -> Option<Secret32> {
    let label = peer_role.label();
    let (my_rs1, my_rs2) = mine;
    match peer_role {
        // I am the responder: the initiator's secrets are the peer's, in preference order
        // rs1IDi then rs2IDi; find which of my secrets each one equals.
        RsRole::Initiator => {
            for id in [peer_rs1_id, peer_rs2_id] {
                for rs in [my_rs1, my_rs2] {
                    if has_id(rs, label, id) {
                        return rs.cloned();
                    }
                }
            }
            None
        }
        // I am the initiator: my own secrets in preference order rs1 then rs2, each checked
        // against either of the responder's IDs.
        RsRole::Responder => {
            for rs in [my_rs1, my_rs2] {
                if has_id(rs, label, peer_rs1_id) || has_id(rs, label, peer_rs2_id) {
                    return rs.cloned();
                }
            }
            None
        }
    }
}
