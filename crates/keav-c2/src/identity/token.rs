//! Enrollment tokens and the C2 server-key pin they carry.
//!
//! The service issues tokens as `<secret>.<pin>`: `secret` is 32 random bytes and `pin` is
//! the [`ServerKeyPin`] of the C2 server key the service hands out, both base64url without
//! padding (43 characters each). The service stores only the hash of the secret; a device
//! sends only the secret, and after registering checks that the server key in the answer has
//! the pin's fingerprint, so an impostor (or a man in the middle on the plain-HTTP service)
//! cannot make it trust another server key.
//!
//! Tokens of the old format (just the secret, no `.`) are still accepted: the device then has
//! nothing to check the server key against and trusts it on first use (the client logs a
//! warning).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::IdentityError;
use crate::keys::PublicKey;

/// Characters of a pin (32 bytes, base64url without padding).
const PIN_CHARS: usize = 43;

/// The fingerprint of a C2 server key ([`PublicKey::fingerprint`]: SHA-256 over the
/// algorithm id and the key; the server id is its first 8 bytes). Not secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerKeyPin(pub [u8; 32]);

impl ServerKeyPin {
    /// The pin of `key`.
    pub fn of(key: &PublicKey) -> ServerKeyPin {
        ServerKeyPin(key.fingerprint())
    }

    /// Whether `key` has this fingerprint (constant time).
    pub fn matches(&self, key: &PublicKey) -> bool {
        bool::from(ServerKeyPin::of(key).0.ct_eq(&self.0))
    }

    /// Parses the base64url form.
    pub fn parse(s: &str) -> Option<ServerKeyPin> {
        if s.len() != PIN_CHARS {
            return None;
        }
        URL_SAFE_NO_PAD
            .decode(s.as_bytes())
            .ok()
            .and_then(|b| b.try_into().ok())
            .map(ServerKeyPin)
    }
}

impl fmt::Display for ServerKeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for ServerKeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerKeyPin({self})")
    }
}

/// The secret part of `token` (everything before the first `.`; all of it in the old
/// format).
pub fn token_secret(token: &str) -> &str {
    token.split_once('.').map_or(token, |(s, _)| s)
}

/// An enrollment token: zeroized on drop, never printed by `Debug`. Derefs to its text.
#[derive(Clone)]
pub struct EnrollmentToken(Zeroizing<String>);

impl EnrollmentToken {
    /// Wraps a token as the operator handed it over (either format; checked on use).
    pub fn new(token: Zeroizing<String>) -> EnrollmentToken {
        EnrollmentToken(token)
    }

    /// A fresh token pinned to `server_key` (what the service issues).
    pub fn issue(server_key: &PublicKey) -> EnrollmentToken {
        let mut raw = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(raw.as_mut());
        let mut t = Zeroizing::new(String::with_capacity(2 * PIN_CHARS + 1));
        URL_SAFE_NO_PAD.encode_string(raw.as_ref(), &mut t);
        t.push('.');
        t.push_str(&ServerKeyPin::of(server_key).to_string());
        EnrollmentToken(t)
    }

    /// The whole token, to show the operator or hand to a device.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The secret part, which the device sends and the service stores the hash of.
    pub fn secret(&self) -> &str {
        token_secret(&self.0)
    }

    /// The server-key pin: `None` for a token of the old format (no `.`),
    /// [`IdentityError::BadEnrollmentToken`] if the part after the `.` is not a pin or the
    /// secret is empty.
    pub fn pin(&self) -> Result<Option<ServerKeyPin>, IdentityError> {
        match self.0.split_once('.') {
            None => Ok(None),
            Some((secret, pin)) => {
                if secret.is_empty() {
                    return Err(IdentityError::BadEnrollmentToken);
                }
                ServerKeyPin::parse(pin)
                    .map(Some)
                    .ok_or(IdentityError::BadEnrollmentToken)
            }
        }
    }
}

impl std::ops::Deref for EnrollmentToken {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentToken(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Alg, SigningKey};

    #[test]
    fn issued_tokens_carry_the_pin_of_the_key() {
        let k = SigningKey::generate(Alg::Ed25519).unwrap().public();
        let other = SigningKey::generate(Alg::Ed25519).unwrap().public();
        let t = EnrollmentToken::issue(&k);
        assert_eq!(t.len(), 2 * PIN_CHARS + 1);
        let pin = t.pin().unwrap().unwrap();
        assert!(pin.matches(&k));
        assert!(!pin.matches(&other));
        assert_eq!(pin, ServerKeyPin::of(&k));
        assert_eq!(t.secret().len(), PIN_CHARS);
        assert!(!t.secret().contains('.'));
        assert_ne!(EnrollmentToken::issue(&k).secret(), t.secret());
        assert_eq!(ServerKeyPin::parse(&pin.to_string()), Some(pin));
    }

    #[test]
    fn old_and_malformed_tokens() {
        let old = EnrollmentToken::new(Zeroizing::new("just-a-secret".into()));
        assert_eq!(old.pin().unwrap(), None);
        assert_eq!(old.secret(), "just-a-secret");
        for bad in [
            "abc.",
            "abc.short",
            ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "a.b.c",
        ] {
            let t = EnrollmentToken::new(Zeroizing::new(bad.into()));
            assert!(
                matches!(t.pin(), Err(IdentityError::BadEnrollmentToken)),
                "{bad}"
            );
        }
        // 43 characters that are not base64url.
        let t = EnrollmentToken::new(Zeroizing::new(format!("s.{}", "!".repeat(PIN_CHARS))));
        assert!(matches!(t.pin(), Err(IdentityError::BadEnrollmentToken)));
    }

    #[test]
    fn token_debug_is_opaque() {
        let k = SigningKey::generate(Alg::Ed25519).unwrap().public();
        let t = EnrollmentToken::issue(&k);
        assert_eq!(format!("{t:?}"), "EnrollmentToken(..)");
    }
}
