//! The RFC 6189 (ZRTP) key schedule, for the one suite KEAV negotiates: hash S256 (SHA-256),
//! MAC HMAC-SHA-256, cipher AES1 (AES-128, CFB for the Confirm messages) and key agreement
//! X25519 (`X255`, as Linphone's bzrtp names it).
//!
//! Everything here is a pure function of its inputs (the random generator is passed in), so
//! the handshake state machine can call it without I/O.
//!
//! | RFC 6189 section | Items |
//! |---|---|
//! | §4.3, §4.3.1 | [`rs_id`], [`random_id`], [`match_retained`] |
//! | §4.4.1.1 | [`hvi`] |
//! | §4.4.1.4 | [`total_hash_dh`], [`kdf_context`], [`s0_dh`], [`X25519KeyPair`] |
//! | §4.4.2 | [`preshared_key`], [`preshared_key_id`], [`total_hash_preshared`], [`s0_preshared`] |
//! | §4.5.1 | [`kdf`], [`kdf32`] |
//! | §4.5.2, §4.5.3, §4.6.1 | [`SessionKeys`] |
//! | §4.6, §5.7 | [`confirm_encrypt`], [`confirm_decrypt`], [`confirm_mac`] |
//! | §9 (hash chain) | [`HashChain`], [`chain_link_ok`] |

mod chain;
mod confirm;
mod dh;
mod hash;
mod kdf;
mod retained;

pub use chain::{chain_link_ok, hvi, total_hash_dh, total_hash_preshared, HashChain};
pub use confirm::{confirm_decrypt, confirm_encrypt, confirm_mac};
pub use dh::X25519KeyPair;
pub use hash::{hmac_sha256, mac8, mac_eq, sha256, sha256_parts};
pub use kdf::{
    kdf, kdf32, kdf_context, preshared_key, preshared_key_id, s0_dh, s0_preshared, SessionKeys,
};
pub use retained::{match_retained, random_id, rs_id, RsRole};

/// Length in bytes of a ZRTP message MAC, retained-secret ID or preshared key ID (64 bits).
pub const MAC_LEN: usize = 8;

#[cfg(test)]
mod tests;
