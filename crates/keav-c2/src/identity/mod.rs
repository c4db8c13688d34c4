//! The identity service: dynamic device identities with proof of key possession.
//!
//! A device makes its own signing key, asks the service for a challenge (a fresh, stateless
//! server nonce: [`nonce`]), signs a domain-separated message over that nonce, its algorithm
//! id and its public key ([`registration_message`]), and registers with an enrollment token
//! the operator issued (which pins the C2 server key: [`token`]). The service checks formats
//! first, then the nonce and the token (cheap), then the signature; only then does it store the device (identity [`DeviceId::of_key`]) and issue
//! broker credentials. Operator calls (enrollment tokens, device list, revocation) need the
//! operator's bearer token. HTTP routes, JSON bodies and error codes: `docs/C2.md`,
//! "Identity service".
//!
//! - [`server`]: [`serve`] (axum), [`IdentityState`], [`IdentityConfig`], the
//!   [`BrokerAccounts`] trait and its Mosquitto implementation [`MosquittoAccounts`];
//! - [`client`]: [`Client`], used by the device agent and by operator tools;
//! - [`api`]: the JSON bodies both sides exchange;
//! - [`nonce`]: the stateless challenge nonces ([`NonceKey`]);
//! - [`token`]: enrollment tokens ([`EnrollmentToken`]) and the C2 server-key pin they carry
//!   ([`ServerKeyPin`]).
//!
//! The service speaks plain HTTP: the registration answer carries the device's broker
//! password, so deploy it behind TLS (a terminating proxy) or on a trusted network.

use std::fmt;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::acl::AclError;
use crate::keys::{Alg, DeviceId, KeyError, PublicKey};
use crate::registry::RegistryError;

pub mod api;
pub mod client;
pub mod nonce;
pub mod server;
pub mod token;

pub use client::{Challenge, Client, Registration};
pub use nonce::{NonceError, NonceKey, NONCE_LEN};
pub use server::{serve, BrokerAccounts, Clock, IdentityConfig, IdentityState, MosquittoAccounts};
pub use token::{EnrollmentToken, ServerKeyPin};

/// Domain separation label of the registration proof of possession.
pub const REGISTER_LABEL: &[u8] = b"keav-c2 register v1";

/// Why an identity call failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The registry failed.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// A key could not be read or used.
    #[error("key: {0}")]
    Key(#[from] KeyError),
    /// Broker credentials could not be made or applied.
    #[error("broker accounts: {0}")]
    Acl(#[from] AclError),
    /// A socket failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange failed below the application.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The service answered with an error (`status`, and its `code`, e.g. `bad_signature`).
    #[error("service refused: {status} {code}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The service's error code.
        code: String,
    },
    /// The service's answer was malformed or inconsistent with the request.
    #[error("bad answer from the identity service: {0}")]
    BadAnswer(&'static str),
    /// The service address is not `http://host:port` or `host:port`.
    #[error("identity service address must be http://host:port")]
    BadAddress,
    /// The call took too long.
    #[error("identity service call timed out")]
    Timeout,
    /// A blocking task (signature check, password hashing) failed.
    #[error("background task failed")]
    Task,
    /// The enrollment token is neither `<secret>` nor `<secret>.<server-key pin>`.
    #[error("enrollment token malformed (expected <secret> or <secret>.<server-key pin>)")]
    BadEnrollmentToken,
    /// The C2 server key the identity service answered with is not the one the enrollment
    /// token pins: the service is an impostor or the answer was altered.
    #[error("the identity service's C2 server key does not match the enrollment token's pin")]
    ServerKeyMismatch,
}

/// A broker password: zeroized on drop, never printed by `Debug`.
#[derive(Clone)]
pub struct BrokerPassword(Zeroizing<String>);

impl BrokerPassword {
    /// Wraps a password.
    pub fn new(password: Zeroizing<String>) -> BrokerPassword {
        BrokerPassword(password)
    }

    /// The password, to hand to the MQTT client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BrokerPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerPassword(..)")
    }
}

/// The message a device signs to prove it holds the private key of `public_key`:
/// `"keav-c2 register v1" 0x00 nonce(NONCE_LEN) alg-id(1) key-length(2, big-endian) key`.
pub fn registration_message(nonce: &[u8; NONCE_LEN], alg: Alg, public_key: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(REGISTER_LABEL.len() + 1 + NONCE_LEN + 3 + public_key.len());
    m.extend_from_slice(REGISTER_LABEL);
    m.push(0);
    m.extend_from_slice(nonce);
    m.push(alg.id());
    // Keys are at most MAX_PUBLIC_KEY_LEN (300) bytes.
    let len = u16::try_from(public_key.len()).unwrap_or(u16::MAX);
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(public_key);
    m
}

/// Checks a registration proof (used by the service; public for tests and other servers).
pub fn verify_registration(
    key: &PublicKey,
    nonce: &[u8; NONCE_LEN],
    signature: &[u8],
) -> Result<(), KeyError> {
    key.verify(
        &registration_message(nonce, key.alg(), &key.to_bytes()),
        signature,
    )
}

/// The device id of `s` (16 hex digits), as the HTTP routes name devices.
pub fn parse_device_id(s: &str) -> Option<DeviceId> {
    DeviceId::from_hex(&s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    #[test]
    fn proof_binds_nonce_alg_and_key() {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        let pk = k.public();
        let n = [7u8; NONCE_LEN];
        let sig = k
            .sign(&registration_message(&n, Alg::Ed25519, &pk.to_bytes()))
            .unwrap();
        verify_registration(&pk, &n, &sig).unwrap();
        assert!(verify_registration(&pk, &[8u8; NONCE_LEN], &sig).is_err());
        let other = SigningKey::generate(Alg::Ed25519).unwrap().public();
        assert!(verify_registration(&other, &n, &sig).is_err());
        // The label is in the message: a signature over the bare nonce does not count.
        let bare = k.sign(&n).unwrap();
        assert!(verify_registration(&pk, &n, &bare).is_err());
    }

    #[test]
    fn bodies_carrying_secrets_do_not_print_them() {
        let e = api::EnrollmentBody {
            token: "enrollment-secret.pin".into(),
            expires: 7,
        };
        assert!(!format!("{e:?}").contains("enrollment-secret"));
        let r = api::RegisterBody {
            alg: "ed25519".into(),
            public_key: "pk".into(),
            enrollment_token: "enrollment-secret".into(),
            nonce: "n".into(),
            signature: "s".into(),
        };
        assert!(!format!("{r:?}").contains("enrollment-secret"));
    }

    #[test]
    fn password_debug_is_opaque() {
        let p = BrokerPassword::new(Zeroizing::new("hunter2-secret".into()));
        assert_eq!(format!("{p:?}"), "BrokerPassword(..)");
        assert_eq!(p.expose(), "hunter2-secret");
    }
}
