//! RFC 6189 §5 messages and the KEAV `KVerify` extension message.
//!
//! Every message starts with the preamble `0x505a`, a 16-bit length in 32-bit words (covering
//! the whole message including preamble and length) and an 8-byte ASCII type block.
//! [`Message::parse`] checks, in this order and before any other work: total length
//! ≤ [`MAX_MESSAGE_LEN`] ([`ParseError::TooLong`]), preamble ([`ParseError::BadPreamble`]),
//! length field equal to the bytes present ([`ParseError::LengthMismatch`]), known type block
//! ([`ParseError::UnknownType`]); then it reads the body with a bounds-checked
//! [`Reader`] and rejects trailing bytes.
//!
//! Parsing never needs a secret: MACs are only carried here. Verify them with the *received*
//! bytes ([`mac_covered`]), never with a re-encoding — reserved bits the RFC tells a receiver to
//! ignore are not preserved by [`Message::encode`].
//!
//! [`Message::encode`] is infallible and writes the fields as they are. For a struct that
//! breaks an invariant (see the `validate` methods) the output is guaranteed to be *rejected*
//! by [`Message::parse`], never to parse as some other message; use [`Message::try_encode`]
//! to get an error instead.

mod commit;
mod confirm;
mod dhpart;
mod hello;
mod kverify;
#[cfg(test)]
mod tests;

pub use commit::{Commit, CommitBody};
pub use confirm::{Confirm, ConfirmBody, ConfirmFlags, CONFIRM_MIN_ENCRYPTED_LEN};
pub use dhpart::DhPart;
pub use hello::{Hello, MAX_ALGOS_PER_LIST, ZRTP_VERSION};
pub use kverify::{KVerify, MAX_KVERIFY_PAYLOAD};

use crate::codec::{Codec, Reader};
use crate::error::ParseError;

/// Upper bound on the size of one message in bytes. Anything longer is
/// [`ParseError::TooLong`] before any other check.
pub const MAX_MESSAGE_LEN: usize = 2048;

/// The ZRTP message preamble (first 16 bits of every message).
pub const PREAMBLE: u16 = 0x505a;

/// Bytes of preamble, length and type block at the start of every message.
pub const HEADER_LEN: usize = 12;

/// A 4-byte ASCII algorithm identifier (hash, cipher, auth tag, key agreement, SAS or KEAV
/// verification backend), space-padded as in RFC 6189 §5.1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AlgoId(pub [u8; 4]);

impl AlgoId {
    /// SHA-256 hash (RFC 6189 Table 2).
    pub const S256: AlgoId = AlgoId(*b"S256");
    /// SHA-384 hash.
    pub const S384: AlgoId = AlgoId(*b"S384");
    /// AES with 128-bit keys (Table 3).
    pub const AES1: AlgoId = AlgoId(*b"AES1");
    /// AES with 256-bit keys.
    pub const AES3: AlgoId = AlgoId(*b"AES3");
    /// 32-bit HMAC-SHA1 SRTP auth tag (Table 4).
    pub const HS32: AlgoId = AlgoId(*b"HS32");
    /// 80-bit HMAC-SHA1 SRTP auth tag.
    pub const HS80: AlgoId = AlgoId(*b"HS80");
    /// X25519 key agreement (identifier as used by Linphone's bzrtp).
    pub const X255: AlgoId = AlgoId(*b"X255");
    /// 3072-bit finite-field DH (Table 5).
    pub const DH3K: AlgoId = AlgoId(*b"DH3k");
    /// 2048-bit finite-field DH.
    pub const DH2K: AlgoId = AlgoId(*b"DH2k");
    /// ECDH P-256.
    pub const EC25: AlgoId = AlgoId(*b"EC25");
    /// ECDH P-384.
    pub const EC38: AlgoId = AlgoId(*b"EC38");
    /// Preshared non-DH mode.
    pub const PRSH: AlgoId = AlgoId(*b"Prsh");
    /// Multistream non-DH mode.
    pub const MULT: AlgoId = AlgoId(*b"Mult");
    /// Base32 SAS rendering (Table 6).
    pub const B32: AlgoId = AlgoId(*b"B32 ");
    /// Base256 (PGP word list) SAS rendering.
    pub const B256: AlgoId = AlgoId(*b"B256");
    /// KEAV verification backend: CPace.
    pub const KVCP: AlgoId = AlgoId(*b"KVCP");
    /// KEAV verification backend: Socialist Millionaire Protocol.
    pub const KVSM: AlgoId = AlgoId(*b"KVSM");
    /// KEAV capability marker: verification required.
    pub const KVRQ: AlgoId = AlgoId(*b"KVRQ");

    /// The raw 4 bytes.
    pub fn as_bytes(&self) -> &[u8; 4] {
        &self.0
    }
}

impl core::fmt::Debug for AlgoId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AlgoId(\"{}\")", self.0.escape_ascii())
    }
}

impl core::fmt::Display for AlgoId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

impl Codec for AlgoId {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        Ok(AlgoId(r.array()?))
    }
}

/// The message types this crate understands (RFC 6189 Table 1 subset plus KEAV's `KVerify`).
///
/// GoClear, ClearACK, SASrelay, RelayACK, Ping and PingACK are not supported and parse as
/// [`ParseError::UnknownType`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `"Hello   "`
    Hello,
    /// `"HelloACK"`
    HelloAck,
    /// `"Commit  "`
    Commit,
    /// `"DHPart1 "`
    DhPart1,
    /// `"DHPart2 "`
    DhPart2,
    /// `"Confirm1"`
    Confirm1,
    /// `"Confirm2"`
    Confirm2,
    /// `"Conf2ACK"`
    Conf2Ack,
    /// `"Error   "`
    Error,
    /// `"ErrorACK"`
    ErrorAck,
    /// `"KVerify "` (KEAV extension).
    KVerify,
}

impl MessageType {
    /// Every supported type, in protocol order.
    pub const ALL: [MessageType; 11] = [
        MessageType::Hello,
        MessageType::HelloAck,
        MessageType::Commit,
        MessageType::DhPart1,
        MessageType::DhPart2,
        MessageType::Confirm1,
        MessageType::Confirm2,
        MessageType::Conf2Ack,
        MessageType::Error,
        MessageType::ErrorAck,
        MessageType::KVerify,
    ];

    /// The 8-byte type block on the wire.
    pub fn type_block(&self) -> [u8; 8] {
        match self {
            MessageType::Hello => *b"Hello   ",
            MessageType::HelloAck => *b"HelloACK",
            MessageType::Commit => *b"Commit  ",
            MessageType::DhPart1 => *b"DHPart1 ",
            MessageType::DhPart2 => *b"DHPart2 ",
            MessageType::Confirm1 => *b"Confirm1",
            MessageType::Confirm2 => *b"Confirm2",
            MessageType::Conf2Ack => *b"Conf2ACK",
            MessageType::Error => *b"Error   ",
            MessageType::ErrorAck => *b"ErrorACK",
            MessageType::KVerify => *b"KVerify ",
        }
    }

    /// The type for a type block, if known (exact, case-sensitive match).
    pub fn from_type_block(block: &[u8; 8]) -> Option<MessageType> {
        MessageType::ALL
            .into_iter()
            .find(|t| &t.type_block() == block)
    }

    /// Stable name for logs and errors (`"Hello"`, `"DHPart1"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            MessageType::Hello => "Hello",
            MessageType::HelloAck => "HelloACK",
            MessageType::Commit => "Commit",
            MessageType::DhPart1 => "DHPart1",
            MessageType::DhPart2 => "DHPart2",
            MessageType::Confirm1 => "Confirm1",
            MessageType::Confirm2 => "Confirm2",
            MessageType::Conf2Ack => "Conf2ACK",
            MessageType::Error => "Error",
            MessageType::ErrorAck => "ErrorACK",
            MessageType::KVerify => "KVerify",
        }
    }
}

impl core::fmt::Display for MessageType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Error message body (RFC 6189 §5.9): one 32-bit error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorMsg {
    /// The RFC 6189 Table 8 code (e.g. `0x10` malformed packet).
    pub code: u32,
}

/// One parsed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Hello (§5.2).
    Hello(Hello),
    /// HelloACK (§5.3).
    HelloAck,
    /// Commit (§5.4).
    Commit(Commit),
    /// DHPart1 (§5.5).
    DhPart1(DhPart),
    /// DHPart2 (§5.6).
    DhPart2(DhPart),
    /// Confirm1 (§5.7).
    Confirm1(Confirm),
    /// Confirm2 (§5.7).
    Confirm2(Confirm),
    /// Conf2ACK (§5.8).
    Conf2Ack,
    /// Error (§5.9).
    Error(ErrorMsg),
    /// ErrorACK (§5.10).
    ErrorAck,
    /// KEAV verification message.
    KVerify(KVerify),
}

/// The type, after checking size, preamble and type block (not the length field).
///
/// Cheap routing helper: errors are [`ParseError::TooLong`], [`ParseError::Truncated`] (fewer
/// than 12 bytes), [`ParseError::BadPreamble`] and [`ParseError::UnknownType`].
pub fn peek_type(bytes: &[u8]) -> Result<MessageType, ParseError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(ParseError::TooLong);
    }
    let mut r = Reader::new(bytes);
    if r.u16()? != PREAMBLE {
        return Err(ParseError::BadPreamble);
    }
    let _len = r.u16()?;
    let block: [u8; 8] = r.array()?;
    MessageType::from_type_block(&block).ok_or(ParseError::UnknownType)
}

/// Checks everything up to and including the type block and returns the type and a reader
/// positioned at the body.
fn read_header(bytes: &[u8]) -> Result<(MessageType, Reader<'_>), ParseError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(ParseError::TooLong);
    }
    let mut r = Reader::new(bytes);
    if r.u16()? != PREAMBLE {
        return Err(ParseError::BadPreamble);
    }
    let words = usize::from(r.u16()?);
    if words.checked_mul(4) != Some(bytes.len()) {
        return Err(ParseError::LengthMismatch);
    }
    let block: [u8; 8] = r.array()?;
    let t = MessageType::from_type_block(&block).ok_or(ParseError::UnknownType)?;
    Ok((t, r))
}

impl Message {
    /// Parses one complete message (see the module documentation for the checks).
    pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
        let (t, mut r) = read_header(bytes)?;
        let msg = match t {
            MessageType::Hello => Message::Hello(Hello::read_body(&mut r)?),
            MessageType::HelloAck => Message::HelloAck,
            MessageType::Commit => Message::Commit(Commit::read_body(&mut r)?),
            MessageType::DhPart1 => Message::DhPart1(DhPart::read_body(&mut r)?),
            MessageType::DhPart2 => Message::DhPart2(DhPart::read_body(&mut r)?),
            MessageType::Confirm1 => Message::Confirm1(Confirm::read_body(&mut r)?),
            MessageType::Confirm2 => Message::Confirm2(Confirm::read_body(&mut r)?),
            MessageType::Conf2Ack => Message::Conf2Ack,
            MessageType::Error => Message::Error(ErrorMsg { code: r.u32()? }),
            MessageType::ErrorAck => Message::ErrorAck,
            MessageType::KVerify => Message::KVerify(KVerify::read_body(&mut r)?),
        };
        r.expect_end()?;
        Ok(msg)
    }

    /// The wire form: preamble, length, type block and body.
    ///
    /// Infallible; if `self` breaks an invariant (see [`Message::validate`]) the result is
    /// rejected by [`Message::parse`]. Use [`Message::try_encode`] to catch that early.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&PREAMBLE.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.message_type().type_block());
        match self {
            Message::Hello(m) => m.encode_body(&mut out),
            Message::Commit(m) => m.encode_body(&mut out),
            Message::DhPart1(m) | Message::DhPart2(m) => m.encode_body(&mut out),
            Message::Confirm1(m) | Message::Confirm2(m) => m.encode_body(&mut out),
            Message::Error(m) => out.extend_from_slice(&m.code.to_be_bytes()),
            Message::KVerify(m) => m.encode_body(&mut out),
            Message::HelloAck | Message::Conf2Ack | Message::ErrorAck => {}
        }
        // A length that is not a whole number of words, or does not fit the 16-bit field, is
        // written so that the parser rejects it (floor / saturation never matches the bytes).
        let words = u16::try_from(out.len() / 4).unwrap_or(u16::MAX);
        if let Some(field) = out.get_mut(2..4) {
            field.copy_from_slice(&words.to_be_bytes());
        }
        out
    }

    /// Checks every invariant [`Message::parse`] enforces, so that
    /// `parse(encode(m)) == Ok(m)` exactly when this returns `Ok`.
    pub fn validate(&self) -> Result<(), ParseError> {
        match self {
            Message::Hello(m) => m.validate()?,
            Message::Commit(m) => m.validate()?,
            Message::DhPart1(m) | Message::DhPart2(m) => m.validate()?,
            Message::Confirm1(m) | Message::Confirm2(m) => m.validate()?,
            Message::KVerify(m) => m.validate()?,
            Message::Error(_) | Message::HelloAck | Message::Conf2Ack | Message::ErrorAck => {}
        }
        if self.encoded_len() > MAX_MESSAGE_LEN {
            return Err(ParseError::TooLong);
        }
        Ok(())
    }

    /// [`Message::validate`], then [`Message::encode`].
    pub fn try_encode(&self) -> Result<Vec<u8>, ParseError> {
        self.validate()?;
        Ok(self.encode())
    }

    /// The length [`Message::encode`] produces, in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Message::Hello(m) => m.body_len(),
                Message::Commit(m) => m.body_len(),
                Message::DhPart1(m) | Message::DhPart2(m) => m.body_len(),
                Message::Confirm1(m) | Message::Confirm2(m) => m.body_len(),
                Message::Error(_) => 4,
                Message::KVerify(m) => m.body_len(),
                Message::HelloAck | Message::Conf2Ack | Message::ErrorAck => 0,
            }
    }

    /// The type of this message.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloAck => MessageType::HelloAck,
            Message::Commit(_) => MessageType::Commit,
            Message::DhPart1(_) => MessageType::DhPart1,
            Message::DhPart2(_) => MessageType::DhPart2,
            Message::Confirm1(_) => MessageType::Confirm1,
            Message::Confirm2(_) => MessageType::Confirm2,
            Message::Conf2Ack => MessageType::Conf2Ack,
            Message::Error(_) => MessageType::Error,
            Message::ErrorAck => MessageType::ErrorAck,
            Message::KVerify(_) => MessageType::KVerify,
        }
    }
}

impl Codec for Message {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&Message::encode(self));
    }

    /// Reads one message whose length field tells how many bytes it occupies (for stream
    /// transports that concatenate messages).
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let mut peek = r.clone();
        if peek.u16()? != PREAMBLE {
            return Err(ParseError::BadPreamble);
        }
        let len = usize::from(peek.u16()?) * 4;
        if len > MAX_MESSAGE_LEN {
            return Err(ParseError::TooLong);
        }
        Message::parse(r.take(len)?)
    }
}

/// Length of the trailing MAC of this message type: 8 for Hello, Commit, DHPart1 and
/// DHPart2, 16 for KVerify, 0 otherwise (Confirm's `confirm_mac` is not trailing).
pub fn trailing_mac_len(t: MessageType) -> usize {
    match t {
        MessageType::Hello | MessageType::Commit | MessageType::DhPart1 | MessageType::DhPart2 => 8,
        MessageType::KVerify => 16,
        MessageType::HelloAck
        | MessageType::Confirm1
        | MessageType::Confirm2
        | MessageType::Conf2Ack
        | MessageType::Error
        | MessageType::ErrorAck => 0,
    }
}

/// Overwrites the trailing MAC of an encoded message with the leftmost
/// [`trailing_mac_len`] bytes of `mac` (so a full HMAC output may be passed: RFC 6189 MACs are
/// truncated HMACs).
///
/// Errors: whatever [`peek_type`] reports; [`ParseError::BadField`] if the type has no
/// trailing MAC or `mac` is shorter than it; [`ParseError::Truncated`] if `encoded` is too
/// short to hold header and MAC.
pub fn set_trailing_mac(encoded: &mut [u8], mac: &[u8]) -> Result<(), ParseError> {
    let t = peek_type(encoded)?;
    let n = trailing_mac_len(t);
    if n == 0 {
        return Err(ParseError::BadField("message type has no trailing MAC"));
    }
    let mac = mac.get(..n).ok_or(ParseError::BadField(
        "MAC shorter than the trailing MAC field",
    ))?;
    let start = encoded
        .len()
        .checked_sub(n)
        .filter(|s| *s >= HEADER_LEN)
        .ok_or(ParseError::Truncated)?;
    let field = encoded.get_mut(start..).ok_or(ParseError::Truncated)?;
    field.copy_from_slice(mac);
    Ok(())
}

/// The bytes a trailing MAC covers: the whole encoded message except its last
/// [`trailing_mac_len`]`(t)` bytes (all of it for types without a trailing MAC).
///
/// Errors: whatever [`peek_type`] reports; [`ParseError::BadField`] if `encoded` is not of
/// type `t`; [`ParseError::Truncated`] if it is too short to hold header and MAC.
pub fn mac_covered(encoded: &[u8], t: MessageType) -> Result<&[u8], ParseError> {
    if peek_type(encoded)? != t {
        return Err(ParseError::BadField("message type differs"));
    }
    let n = trailing_mac_len(t);
    let end = encoded
        .len()
        .checked_sub(n)
        .filter(|e| *e >= HEADER_LEN)
        .ok_or(ParseError::Truncated)?;
    encoded.get(..end).ok_or(ParseError::Truncated)
}

/// Rounds `n` up to a multiple of 4.
pub(crate) fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}
