//! The JSON bodies of the identity service. Binary values (keys, nonces, signatures) are
//! standard base64 with padding; device ids are 16 lower-case hex digits.

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// `POST /v1/challenge` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeBody {
    /// The nonce to sign ([`super::NONCE_LEN`] bytes, base64): random, expiry, MAC.
    pub nonce: String,
    /// Seconds until the nonce expires.
    pub expires_in: u64,
}

/// `POST /v1/register` request.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// `ed25519` or `rsa2048`.
    pub alg: String,
    /// The public key (base64 of [`crate::keys::PublicKey::to_bytes`]).
    pub public_key: String,
    /// The secret part of the operator-issued enrollment token (a whole token
    /// `<secret>.<pin>` is accepted too; the service ignores the pin).
    pub enrollment_token: String,
    /// The challenge nonce (base64).
    pub nonce: String,
    /// Signature over [`super::registration_message`] (base64).
    pub signature: String,
}

impl Drop for RegisterBody {
    fn drop(&mut self) {
        self.enrollment_token.zeroize();
    }
}

impl std::fmt::Debug for RegisterBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterBody")
            .field("alg", &self.alg)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// The two topics a device uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsBody {
    /// Where the device subscribes (server -> device).
    pub subscribe: String,
    /// Where the device publishes (device -> server).
    pub publish: String,
}

/// `POST /v1/register` answer (201).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisteredBody {
    /// The device's id (hex).
    pub device_id: String,
    /// Its MQTT user name (the id in hex).
    pub broker_username: String,
    /// Its MQTT password (only ever sent in this answer).
    pub broker_password: String,
    /// The broker's `host:port`.
    pub broker: String,
    /// The C2 server's id (hex).
    pub server_id: String,
    /// The C2 server's signature algorithm.
    pub server_alg: String,
    /// The C2 server's public key (base64).
    pub server_public_key: String,
    /// The device's topics.
    pub topics: TopicsBody,
}

impl Drop for RegisteredBody {
    fn drop(&mut self) {
        self.broker_password.zeroize();
    }
}

impl std::fmt::Debug for RegisteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredBody")
            .field("device_id", &self.device_id)
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/enrollments` request (every field optional; an empty body is fine).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRequestBody {
    /// Lifetime in seconds (default: the service's, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Name the enrolled device gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Groups the enrolled device joins.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `POST /v1/enrollments` answer (201).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentBody {
    /// The one-time token `<secret>.<server-key pin>` (shown once; the service keeps only
    /// the hash of the secret).
    pub token: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
}

impl Drop for EnrollmentBody {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

impl std::fmt::Debug for EnrollmentBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentBody")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// A device as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBody {
    /// Id (hex).
    pub device_id: String,
    /// `ed25519` or `rsa2048`.
    pub alg: String,
    /// Public key (base64).
    pub public_key: String,
    /// `registered`, `pending_join`, `joined` or `revoked`.
    pub status: String,
    /// Registration time, seconds since the Unix epoch.
    pub created: u64,
    /// Name, if any.
    pub name: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
}

/// `GET /v1/devices` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesBody {
    /// Every device, ordered by id.
    pub devices: Vec<DeviceBody>,
}

/// Every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// What went wrong, for programs (`bad_key`, `bad_signature`, ...).
    pub code: String,
}
