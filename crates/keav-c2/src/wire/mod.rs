//! The C2 wire format: versioned, signed binary messages (docs/C2.md, "Wire format").
//!
//! ```text
//! offset  size  field
//!      0     1  version (1)
//!      1     1  message type (MessageType)
//!      2     1  signature algorithm id (Alg)
//!      3     8  sender id
//!     11     8  recipient id
//!     19     8  sequence number (u64)
//!     27     8  expiry (u64, unix seconds: the last second the message is valid)
//!     35     1  token length (at most MAX_TOKEN_LEN), then the token
//!      .     2  body length, then the type-specific body (body.rs)
//!      .     2  signature length (must equal Alg::signature_len), then the signature
//! ```
//!
//! Integers are big-endian; every variable field has an explicit length; a message is at
//! most [`MAX_MESSAGE_LEN`] bytes and must end exactly after its signature. The signature
//! covers every byte before the signature length field, so the version, the type, the
//! algorithm id, both ids, the counters and the body are all authenticated.
//!
//! Parse, then verify: [`Message::decode`] needs no key and returns an [`Unverified`]
//! message whose [`Header`] can be looked at (sender, recipient, sequence number, expiry)
//! for cheap checks; [`Unverified::verify`] checks that the header's algorithm is the
//! sender key's before any public-key work, then the signature, and only then yields the
//! [`Message`] and its [`Body`]. [`Message::sign`] builds and signs a message.
//!
//! A receiver verifies the signature before it touches any state: decode, verify, then
//! [`crate::guard::Guard::check`] and [`crate::guard::Guard::commit`], persist, act.

mod body;
mod reader;
mod words;

#[cfg(test)]
mod tests;

use std::fmt;

use rand_core::{OsRng, RngCore};
use thiserror::Error;

pub use body::{
    Action, Activate, Body, BodyCodec, Data, DeregisterCommand, DeregisterRequest, Generic,
    HumanJoinRequest, HumanJoinResponse, IdRequest, Initiate, JoinCommand, JoinRequest,
    ObservationRequest, ObservedJoinRequest, ObservedJoinResponse, Resign, Response, Status,
    Terminate, Value, MAX_DATA_ID_LEN, MAX_PAYLOAD_LEN, MAX_URL_LEN,
};
pub use reader::Reader;
pub use words::{
    join_code_from_words, join_code_words, JoinCode, JOIN_CODE_LEN, MAX_JOIN_CODE_LEN,
    MIN_JOIN_CODE_LEN, WORDS,
};

use crate::keys::{Alg, DeviceId, KeyError, PublicKey, SigningKey};

/// The wire format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Longest message accepted or produced (64 KiB).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Longest token.
pub const MAX_TOKEN_LEN: usize = 64;
/// Length of a token made by [`Token::random`].
pub const RANDOM_TOKEN_LEN: usize = 16;
/// Length of the fixed part of the header (version to expiry).
pub const FIXED_HEADER_LEN: usize = 35;

/// Why a message could not be parsed, built or verified.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The input ends before a field it announced.
    #[error("message truncated")]
    Truncated,
    /// The message is longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds the maximum of {MAX_MESSAGE_LEN}")]
    TooLong(usize),
    /// The version byte is not [`VERSION`].
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    /// The type byte names no [`MessageType`].
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The algorithm byte names no [`Alg`].
    #[error("unknown signature algorithm id {0}")]
    UnknownAlgorithm(u8),
    /// The header's algorithm is not the algorithm of the sender's registered key.
    #[error("message signed with {message}, sender's key is {key}")]
    AlgorithmMismatch {
        /// The algorithm the header names.
        message: Alg,
        /// The algorithm of the key it was checked against.
        key: Alg,
    },
    /// The signature field's length is not the algorithm's signature length.
    #[error("signature of {got} bytes, {expected} expected")]
    SignatureLength {
        /// Length on the wire.
        got: usize,
        /// Length the header's algorithm produces.
        expected: usize,
    },
    /// The signature does not verify under the sender's key.
    #[error("signature does not verify")]
    BadSignature,
    /// Bytes follow the signature, or a body is longer than its fields.
    #[error("trailing bytes")]
    TrailingBytes,
    /// A field's value is out of its bounds or malformed (the field is named).
    #[error("bad field: {0}")]
    BadField(&'static str),
    /// The signing key could not sign.
    #[error("signing failed: {0}")]
    Sign(KeyError),
}

/// The message types, as their one-byte wire ids (0 is not a type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// [`Generic`].
    Generic = 1,
    /// [`Initiate`].
    Initiate = 2,
    /// [`Response`].
    Response = 3,
    /// [`Activate`].
    Activate = 4,
    /// [`Action`].
    Action = 5,
    /// [`Data`].
    Data = 6,
    /// [`IdRequest`].
    IdRequest = 7,
    /// [`JoinRequest`].
    JoinRequest = 8,
    /// [`JoinCommand`].
    JoinCommand = 9,
    /// [`HumanJoinRequest`].
    HumanJoinRequest = 10,
    /// [`HumanJoinResponse`].
    HumanJoinResponse = 11,
    /// [`ObservedJoinRequest`].
    ObservedJoinRequest = 12,
    /// [`ObservedJoinResponse`].
    ObservedJoinResponse = 13,
    /// [`ObservationRequest`].
    ObservationRequest = 14,
    /// [`Resign`].
    Resign = 15,
    /// [`Terminate`].
    Terminate = 16,
    /// [`DeregisterRequest`].
    DeregisterRequest = 17,
    /// [`DeregisterCommand`].
    DeregisterCommand = 18,
}

impl MessageType {
    /// Every type, in id order.
    pub const ALL: [MessageType; 18] = [
        MessageType::Generic,
        MessageType::Initiate,
        MessageType::Response,
        MessageType::Activate,
        MessageType::Action,
        MessageType::Data,
        MessageType::IdRequest,
        MessageType::JoinRequest,
        MessageType::JoinCommand,
        MessageType::HumanJoinRequest,
        MessageType::HumanJoinResponse,
        MessageType::ObservedJoinRequest,
        MessageType::ObservedJoinResponse,
        MessageType::ObservationRequest,
        MessageType::Resign,
        MessageType::Terminate,
        MessageType::DeregisterRequest,
        MessageType::DeregisterCommand,
    ];

    /// The wire id.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The type of a wire id.
    pub fn from_id(id: u8) -> Result<MessageType, WireError> {
        MessageType::ALL
            .iter()
            .copied()
            .find(|t| t.id() == id)
            .ok_or(WireError::UnknownType(id))
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A token: up to [`MAX_TOKEN_LEN`] opaque bytes a responder repeats, so the sender can match
/// responses to commands (and an update's activate to its initiate). Not a secret.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Token(Vec<u8>);

impl Token {
    /// The token of `bytes`, or [`WireError::BadField`] if longer than [`MAX_TOKEN_LEN`].
    pub fn new(bytes: &[u8]) -> Result<Token, WireError> {
        if bytes.len() > MAX_TOKEN_LEN {
            return Err(WireError::BadField("token"));
        }
        Ok(Token(bytes.to_vec()))
    }

    /// A fresh random token of [`RANDOM_TOKEN_LEN`] bytes.
    pub fn random() -> Token {
        let mut b = vec![0u8; RANDOM_TOKEN_LEN];
        OsRng.fill_bytes(&mut b);
        Token(b)
    }

    /// The token's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// The header fields a sender chooses; [`Message::sign`] adds the type (from the body) and
/// the algorithm (from the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Who signs the message.
    pub sender: DeviceId,
    /// Who the message is for; a receiver refuses messages addressed to anyone else.
    pub recipient: DeviceId,
    /// The sender's send counter for this recipient (see [`crate::guard`]), from 1.
    pub seq: u64,
    /// The last unix second at which the message may be accepted.
    pub expiry: u64,
    /// Matches responses to commands.
    pub token: Token,
}

/// A message's header, as decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The body's type.
    pub msg_type: MessageType,
    /// The signature algorithm the sender claims (checked against its key by
    /// [`Unverified::verify`]).
    pub alg: Alg,
    /// Who signed the message.
    pub sender: DeviceId,
    /// Who the message is for.
    pub recipient: DeviceId,
    /// The sender's sequence number for this recipient.
    pub seq: u64,
    /// The last unix second at which the message may be accepted.
    pub expiry: u64,
    /// The token.
    pub token: Token,
}

impl Header {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.push(VERSION);
        out.push(self.msg_type.id());
        out.push(self.alg.id());
        out.extend_from_slice(&self.sender.0);
        out.extend_from_slice(&self.recipient.0);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.expiry.to_be_bytes());
        reader::put_vec8(out, self.token.as_bytes(), MAX_TOKEN_LEN, "token")
    }

    fn decode(r: &mut Reader<'_>) -> Result<Header, WireError> {
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::UnknownVersion(version));
        }
        let msg_type = MessageType::from_id(r.u8()?)?;
        let alg_id = r.u8()?;
        let alg = Alg::from_id(alg_id).map_err(|_| WireError::UnknownAlgorithm(alg_id))?;
        let sender = DeviceId(r.array()?);
        let recipient = DeviceId(r.array()?);
        let seq = r.u64()?;
        let expiry = r.u64()?;
        let token = Token::new(r.vec8()?)?;
        Ok(Header {
            msg_type,
            alg,
            sender,
            recipient,
            seq,
            expiry,
            token,
        })
    }
}

/// A message whose signature has been verified. Only [`Unverified::verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    header: Header,
    body: Body,
}

impl Message {
    /// Parses `bytes` without any key: the header, the body (checked against its type's
    /// codec) and the signature's length. Refuses anything longer than [`MAX_MESSAGE_LEN`]
    /// before reading it.
    pub fn decode(bytes: &[u8]) -> Result<Unverified, WireError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(WireError::TooLong(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        let header = Header::decode(&mut r)?;
        let body_bytes = r.vec16()?;
        let signed_len = r.position();
        let sig_len = usize::from(r.u16()?);
        let expected = header.alg.signature_len();
        if sig_len != expected {
            return Err(WireError::SignatureLength {
                got: sig_len,
                expected,
            });
        }
        r.take(sig_len)?;
        r.expect_end()?;
        let body = Body::decode(header.msg_type, body_bytes)?;
        Ok(Unverified {
            header,
            body,
            bytes: bytes.to_vec(),
            signed_len,
        })
    }

    /// Builds the message `envelope` + `body` and signs it with `key` (the header's algorithm
    /// is the key's). Fails if a field is out of bounds or the result would exceed
    /// [`MAX_MESSAGE_LEN`].
    pub fn sign(envelope: &Envelope, body: &Body, key: &SigningKey) -> Result<Vec<u8>, WireError> {
        let header = Header {
            msg_type: body.msg_type(),
            alg: key.alg(),
            sender: envelope.sender,
            recipient: envelope.recipient,
            seq: envelope.seq,
            expiry: envelope.expiry,
            token: envelope.token.clone(),
        };
        let mut out = Vec::with_capacity(128);
        header.encode(&mut out)?;
        let mut body_bytes = Vec::new();
        body.encode(&mut body_bytes)?;
        reader::put_vec16(&mut out, &body_bytes, usize::from(u16::MAX), "body")?;
        let sig_len = key.alg().signature_len();
        let total = out.len() + 2 + sig_len;
        if total > MAX_MESSAGE_LEN {
            return Err(WireError::TooLong(total));
        }
        let sig = key.sign(&out).map_err(WireError::Sign)?;
        if sig.len() != sig_len {
            return Err(WireError::SignatureLength {
                got: sig.len(),
                expected: sig_len,
            });
        }
        reader::put_vec16(&mut out, &sig, sig_len, "signature")?;
        Ok(out)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The body.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// Header and body.
    pub fn into_parts(self) -> (Header, Body) {
        (self.header, self.body)
    }
}

/// A parsed message whose signature has not been checked yet. Its header may be used for
/// cheap checks (topic, recipient, replay window) before [`Unverified::verify`].
#[derive(Debug, Clone)]
pub struct Unverified {
    header: Header,
    body: Body,
    bytes: Vec<u8>,
    signed_len: usize,
}

impl Unverified {
    /// The header, not yet authenticated.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> &[u8] {
        self.bytes.get(..self.signed_len).unwrap_or_default()
    }

    /// Checks the signature with the sender's registered key: first that the header's
    /// algorithm is `key`'s ([`WireError::AlgorithmMismatch`], before any public-key work),
    /// then the signature itself.
    pub fn verify(self, key: &PublicKey) -> Result<Message, WireError> {
        if self.header.alg != key.alg() {
            return Err(WireError::AlgorithmMismatch {
                message: self.header.alg,
                key: key.alg(),
            });
        }
        // The signature is the last `signature_len` bytes (decode checked the layout).
        let sig = self
            .bytes
            .get(self.signed_len + 2..)
            .ok_or(WireError::Truncated)?;
        key.verify(self.signed_bytes(), sig).map_err(|e| match e {
            KeyError::SignatureLength { got, expected } => {
                WireError::SignatureLength { got, expected }
            }
            _ => WireError::BadSignature,
        })?;
        Ok(Message {
            header: self.header,
            body: self.body,
        })
    }
}
