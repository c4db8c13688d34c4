//! Signature algorithms and identities.
//!
//! Every C2 message names its signature algorithm in a one-byte [`Alg`] id that the
//! signature covers, so a message cannot be re-labelled with a weaker algorithm. A peer's
//! public key is registered together with its algorithm, and a message whose algorithm id
//! differs from the sender's registered one is refused before any public-key work.
//!
//! - [`Alg::Ed25519`] (id 1, the default): 32-byte public keys, 64-byte signatures
//!   (ed25519-dalek, strict verification: no malleable or small-order signatures).
//! - [`Alg::RsaPss2048`] (id 2): RSA with a 2048-bit modulus and public exponent 65537,
//!   PSS padding with SHA-256 and a 32-byte salt; public keys travel as PKCS#1 DER,
//!   signatures are 256 bytes.
//!
//! A [`DeviceId`] is 8 bytes. [`DeviceId::of_key`] derives one from a public key
//! (SHA-256 over the algorithm id and the key's bytes, first 8 bytes), so an identity
//! names the key it was issued for.

use std::fmt;

use ed25519_dalek::{Signer, Verifier};
use rand_core::OsRng;
use rsa::pkcs1::{DecodeRsaPublicKey, EncodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

/// RSA modulus size, in bits.
pub const RSA_BITS: usize = 2048;
/// Length of an RSA-2048 signature.
pub const RSA_SIG_LEN: usize = RSA_BITS / 8;
/// Length of an Ed25519 signature.
pub const ED25519_SIG_LEN: usize = 64;
/// Longest public key encoding accepted (a PKCS#1 RSA-2048 key is 270 bytes).
pub const MAX_PUBLIC_KEY_LEN: usize = 300;

/// Why a key could not be made, read or used.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The algorithm id is not one keav knows.
    #[error("unknown signature algorithm id {0}")]
    UnknownAlgorithm(u8),
    /// A public or private key encoding is malformed or of the wrong size.
    #[error("malformed {0} key")]
    MalformedKey(&'static str),
    /// An RSA key has another modulus size or exponent than RSA-2048 with e = 65537.
    #[error("RSA key is not 2048-bit with exponent 65537")]
    RsaParameters,
    /// The signature has the wrong length for its algorithm.
    #[error("signature length {got}, expected {expected}")]
    SignatureLength {
        /// Length received.
        got: usize,
        /// Length the algorithm produces.
        expected: usize,
    },
    /// The signature does not verify under the key.
    #[error("signature does not verify")]
    BadSignature,
    /// Key generation or signing failed inside the RSA implementation.
    #[error("RSA operation failed")]
    Rsa,
}

/// A signature algorithm, as its one-byte wire id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Alg {
    /// Ed25519 (RFC 8032), the default.
    Ed25519 = 1,
    /// RSA-2048, PSS with SHA-256 (MGF1-SHA-256, 32-byte salt).
    RsaPss2048 = 2,
}

impl Alg {
    /// The algorithm of a wire id.
    pub fn from_id(id: u8) -> Result<Alg, KeyError> {
        match id {
            1 => Ok(Alg::Ed25519),
            2 => Ok(Alg::RsaPss2048),
            other => Err(KeyError::UnknownAlgorithm(other)),
        }
    }

    /// The wire id.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The signature length this algorithm produces.
    pub fn signature_len(self) -> usize {
        match self {
            Alg::Ed25519 => ED25519_SIG_LEN,
            Alg::RsaPss2048 => RSA_SIG_LEN,
        }
    }

    /// A short name for logs and the CLI (`ed25519`, `rsa2048`).
    pub fn name(self) -> &'static str {
        match self {
            Alg::Ed25519 => "ed25519",
            Alg::RsaPss2048 => "rsa2048",
        }
    }

    /// The algorithm named `ed25519` or `rsa2048` (as [`Alg::name`] prints).
    pub fn from_name(name: &str) -> Option<Alg> {
        match name {
            "ed25519" => Some(Alg::Ed25519),
            "rsa2048" | "rsa" => Some(Alg::RsaPss2048),
            _ => None,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An 8-byte identity: a device's, or a server's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId(pub [u8; 8]);

impl DeviceId {
    /// The identity derived from a public key (see the module docs).
    pub fn of_key(key: &PublicKey) -> DeviceId {
        let digest = key.fingerprint();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        DeviceId(id)
    }

    /// Sixteen lower-case hex digits (also the device's broker user name).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses sixteen hex digits.
    pub fn from_hex(s: &str) -> Option<DeviceId> {
        if s.len() != 16 || !s.is_ascii() {
            return None;
        }
        let mut id = [0u8; 8];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(DeviceId(id))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.to_hex())
    }
}

/// A public key with its algorithm.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// An Ed25519 key.
    Ed25519(ed25519_dalek::VerifyingKey),
    /// An RSA-2048 key (e = 65537).
    Rsa(Box<rsa::RsaPublicKey>),
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fp = self.fingerprint();
        write!(
            f,
            "PublicKey({}, {:02x}{:02x}{:02x}{:02x}…)",
            self.alg(),
            fp[0],
            fp[1],
            fp[2],
            fp[3]
        )
    }
}

impl PublicKey {
    /// The key's algorithm.
    pub fn alg(&self) -> Alg {
        match self {
            PublicKey::Ed25519(_) => Alg::Ed25519,
            PublicKey::Rsa(_) => Alg::RsaPss2048,
        }
    }

    /// The key's encoding: 32 bytes for Ed25519, PKCS#1 DER for RSA.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            PublicKey::Ed25519(k) => k.to_bytes().to_vec(),
            // Encoding a key we hold cannot fail; an empty vector would fail every later parse.
            PublicKey::Rsa(k) => k
                .to_pkcs1_der()
                .map(|d| d.as_bytes().to_vec())
                .unwrap_or_default(),
        }
    }

    /// Reads a key of algorithm `alg` from [`PublicKey::to_bytes`]'s encoding. RSA keys must
    /// have a 2048-bit modulus and exponent 65537; Ed25519 keys must be valid points that are
    /// not of small order (checked again by strict verification).
    pub fn from_bytes(alg: Alg, bytes: &[u8]) -> Result<PublicKey, KeyError> {
        if bytes.len() > MAX_PUBLIC_KEY_LEN {
            return Err(KeyError::MalformedKey(alg.name()));
        }
        match alg {
            Alg::Ed25519 => {
                let arr: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| KeyError::MalformedKey("ed25519"))?;
                let k = ed25519_dalek::VerifyingKey::from_bytes(&arr)
                    .map_err(|_| KeyError::MalformedKey("ed25519"))?;
                if k.is_weak() {
                    return Err(KeyError::MalformedKey("ed25519"));
                }
                Ok(PublicKey::Ed25519(k))
            }
            Alg::RsaPss2048 => {
                let k = rsa::RsaPublicKey::from_pkcs1_der(bytes)
                    .map_err(|_| KeyError::MalformedKey("rsa2048"))?;
                if k.size() * 8 != RSA_BITS || k.e() != &rsa::BigUint::from(65537u32) {
                    return Err(KeyError::RsaParameters);
                }
                Ok(PublicKey::Rsa(Box::new(k)))
            }
        }
    }

    /// SHA-256 over the algorithm id and the key's encoding.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([self.alg().id()]);
        h.update(self.to_bytes());
        h.finalize().into()
    }

    /// Checks `sig` over `msg`. The length is checked before any public-key work.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        let expected = self.alg().signature_len();
        if sig.len() != expected {
            return Err(KeyError::SignatureLength {
                got: sig.len(),
                expected,
            });
        }
        match self {
            PublicKey::Ed25519(k) => {
                let s = ed25519_dalek::Signature::from_slice(sig)
                    .map_err(|_| KeyError::BadSignature)?;
                k.verify_strict(msg, &s).map_err(|_| KeyError::BadSignature)
            }
            PublicKey::Rsa(k) => {
                let vk = rsa::pss::VerifyingKey::<Sha256>::new((**k).clone());
                let s = rsa::pss::Signature::try_from(sig).map_err(|_| KeyError::BadSignature)?;
                vk.verify(msg, &s).map_err(|_| KeyError::BadSignature)
            }
        }
    }
}

/// A private signing key. Prints nothing in `Debug`; Ed25519 keys zeroize on drop (the RSA
/// implementation zeroizes its private parts on drop too).
pub enum SigningKey {
    /// An Ed25519 key (boxed: the expanded key is 224 bytes).
    Ed25519(Box<ed25519_dalek::SigningKey>),
    /// An RSA-2048 key.
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, ..)", self.alg())
    }
}

impl SigningKey {
    /// A fresh key from the OS's random source. RSA-2048 generation takes a while (tens of
    /// milliseconds to seconds).
    pub fn generate(alg: Alg) -> Result<SigningKey, KeyError> {
        match alg {
            Alg::Ed25519 => Ok(SigningKey::Ed25519(Box::new(
                ed25519_dalek::SigningKey::generate(&mut OsRng),
            ))),
            Alg::RsaPss2048 => {
                let k = rsa::RsaPrivateKey::new(&mut OsRng, RSA_BITS).map_err(|_| KeyError::Rsa)?;
                Ok(SigningKey::Rsa(Box::new(k)))
            }
        }
    }

    /// The key's algorithm.
    pub fn alg(&self) -> Alg {
        match self {
            SigningKey::Ed25519(_) => Alg::Ed25519,
            SigningKey::Rsa(_) => Alg::RsaPss2048,
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        match self {
            SigningKey::Ed25519(k) => PublicKey::Ed25519(k.verifying_key()),
            SigningKey::Rsa(k) => PublicKey::Rsa(Box::new(k.to_public_key())),
        }
    }

    /// The identity derived from the public half ([`DeviceId::of_key`]).
    pub fn device_id(&self) -> DeviceId {
        DeviceId::of_key(&self.public())
    }

    /// Signs `msg` ([`Alg::signature_len`] bytes).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            SigningKey::Ed25519(k) => Ok(k.sign(msg).to_bytes().to_vec()),
            SigningKey::Rsa(k) => {
                let sk = rsa::pss::BlindedSigningKey::<Sha256>::new((**k).clone());
                let sig = sk
                    .try_sign_with_rng(&mut OsRng, msg)
                    .map_err(|_| KeyError::Rsa)?;
                Ok(sig.to_vec())
            }
        }
    }

    /// The private key's encoding, to store: the 32-byte seed for Ed25519, PKCS#8 DER for
    /// RSA.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        match self {
            SigningKey::Ed25519(k) => Ok(Zeroizing::new(k.to_bytes().to_vec())),
            SigningKey::Rsa(k) => {
                let doc = k.to_pkcs8_der().map_err(|_| KeyError::Rsa)?;
                Ok(Zeroizing::new(doc.as_bytes().to_vec()))
            }
        }
    }

    /// Reads [`SigningKey::to_bytes`]'s encoding.
    pub fn from_bytes(alg: Alg, bytes: &[u8]) -> Result<SigningKey, KeyError> {
        match alg {
            Alg::Ed25519 => {
                let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
                    bytes
                        .try_into()
                        .map_err(|_| KeyError::MalformedKey("ed25519"))?,
                );
                Ok(SigningKey::Ed25519(Box::new(
                    ed25519_dalek::SigningKey::from_bytes(&seed),
                )))
            }
            Alg::RsaPss2048 => {
                let k = rsa::RsaPrivateKey::from_pkcs8_der(bytes)
                    .map_err(|_| KeyError::MalformedKey("rsa2048"))?;
                if k.size() * 8 != RSA_BITS || k.e() != &rsa::BigUint::from(65537u32) {
                    return Err(KeyError::RsaParameters);
                }
                Ok(SigningKey::Rsa(Box::new(k)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_sign_verify_and_tamper() {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        let pk = k.public();
        let sig = k.sign(b"reboot").unwrap();
        assert_eq!(sig.len(), 64);
        pk.verify(b"reboot", &sig).unwrap();
        assert_eq!(pk.verify(b"reboot!", &sig), Err(KeyError::BadSignature));
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert_eq!(pk.verify(b"reboot", &bad), Err(KeyError::BadSignature));
        assert_eq!(
            pk.verify(b"reboot", &sig[..63]),
            Err(KeyError::SignatureLength {
                got: 63,
                expected: 64
            })
        );
        let back = PublicKey::from_bytes(Alg::Ed25519, &pk.to_bytes()).unwrap();
        assert_eq!(back, pk);
        let sk2 = SigningKey::from_bytes(Alg::Ed25519, &k.to_bytes().unwrap()).unwrap();
        assert_eq!(sk2.public(), pk);
        assert_eq!(sk2.device_id(), k.device_id());
    }

    #[test]
    fn rsa_sign_verify_and_cross_algorithm() {
        let k = SigningKey::generate(Alg::RsaPss2048).unwrap();
        let pk = k.public();
        let sig = k.sign(b"update").unwrap();
        assert_eq!(sig.len(), RSA_SIG_LEN);
        pk.verify(b"update", &sig).unwrap();
        assert_eq!(pk.verify(b"updatE", &sig), Err(KeyError::BadSignature));
        let der = pk.to_bytes();
        assert_eq!(PublicKey::from_bytes(Alg::RsaPss2048, &der).unwrap(), pk);
        // An RSA key's bytes are not an Ed25519 key, and vice versa.
        assert!(PublicKey::from_bytes(Alg::Ed25519, &der).is_err());
        let ed = SigningKey::generate(Alg::Ed25519).unwrap().public();
        assert!(PublicKey::from_bytes(Alg::RsaPss2048, &ed.to_bytes()).is_err());
        let sk2 = SigningKey::from_bytes(Alg::RsaPss2048, &k.to_bytes().unwrap()).unwrap();
        assert_eq!(sk2.public(), pk);
    }

    #[test]
    fn weak_or_short_ed25519_keys_are_refused() {
        // The identity point is of small order.
        let mut ident = [0u8; 32];
        ident[0] = 1;
        assert!(PublicKey::from_bytes(Alg::Ed25519, &ident).is_err());
        assert!(PublicKey::from_bytes(Alg::Ed25519, &[7u8; 31]).is_err());
        assert!(PublicKey::from_bytes(Alg::Ed25519, &[7u8; 400]).is_err());
    }

    #[test]
    fn ids_and_names() {
        assert_eq!(Alg::from_id(1), Ok(Alg::Ed25519));
        assert_eq!(Alg::from_id(2), Ok(Alg::RsaPss2048));
        assert_eq!(Alg::from_id(0), Err(KeyError::UnknownAlgorithm(0)));
        assert_eq!(Alg::from_name("rsa2048"), Some(Alg::RsaPss2048));
        let id = DeviceId([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
        assert_eq!(id.to_hex(), "deadbeef00010203");
        assert_eq!(DeviceId::from_hex("deadbeef00010203"), Some(id));
        assert_eq!(DeviceId::from_hex("deadbeef0001020"), None);
        assert_eq!(DeviceId::from_hex("deadbeef0001020g"), None);
        assert_eq!(DeviceId::from_hex("ééééééé"), None);
    }

    #[test]
    fn signing_key_debug_prints_no_secret() {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        let seed = hex::encode(k.to_bytes().unwrap().as_slice());
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&seed[..8]), "{dbg}");
        assert_eq!(dbg, "SigningKey(ed25519, ..)");
    }
}
