//! The one error type of `keav-proto`, with nested categories.
//!
//! Detailed reasons stay local; [`Error::wire_code`] maps each failure to the coarse RFC 6189
//! §5.9 code that may be sent to the peer.

use thiserror::Error;

/// A message or packet that could not be parsed. Never needs any secret to detect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Fewer bytes than the structure needs.
    #[error("truncated input")]
    Truncated,
    /// More bytes than the structure allows (or trailing bytes).
    #[error("input too long or trailing bytes")]
    TooLong,
    /// The message does not start with the ZRTP preamble 0x505a.
    #[error("bad preamble")]
    BadPreamble,
    /// The length field disagrees with the bytes present.
    #[error("length field does not match")]
    LengthMismatch,
    /// The 8-byte message type block is not one we know.
    #[error("unknown message type")]
    UnknownType,
    /// A field holds a value outside its allowed range.
    #[error("invalid field: {0}")]
    BadField(&'static str),
    /// The packet's CRC-32c does not match its contents.
    #[error("bad CRC-32c")]
    BadCrc,
    /// The packet header (first byte or magic cookie) is wrong.
    #[error("bad packet header")]
    BadPacketHeader,
}

/// Which integrity check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AuthFailure {
    /// Hello MAC (keyed by H2) did not verify.
    #[error("Hello MAC")]
    HelloMac,
    /// Commit MAC (keyed by H1) did not verify.
    #[error("Commit MAC")]
    CommitMac,
    /// DHPart1 MAC (keyed by H0) did not verify.
    #[error("DHPart1 MAC")]
    DhPart1Mac,
    /// DHPart2 MAC (keyed by H0) did not verify.
    #[error("DHPart2 MAC")]
    DhPart2Mac,
    /// A revealed hash-chain element does not hash to the previous one.
    #[error("hash chain")]
    HashChain,
    /// The DHPart2 does not match the hvi commitment in the Commit.
    #[error("hvi commitment")]
    Hvi,
    /// The Confirm1 MAC did not verify.
    #[error("Confirm1 MAC")]
    Confirm1Mac,
    /// The Confirm2 MAC did not verify.
    #[error("Confirm2 MAC")]
    Confirm2Mac,
    /// A KEAV verification message MAC did not verify.
    #[error("verification message MAC")]
    VerifyMac,
}

/// Everything that can make a KEAV handshake fail.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Malformed bytes.
    #[error("malformed input: {0}")]
    Parse(#[from] ParseError),
    /// An integrity check failed (tampering or a man in the middle).
    #[error("integrity check failed: {0}")]
    Auth(AuthFailure),
    /// The peer's DH public value is invalid (all-zero shared secret, wrong length).
    #[error("invalid DH public value")]
    BadPublicValue,
    /// No algorithm of a category in common with the peer.
    #[error("no common {0} algorithm")]
    NoCommonAlgorithm(&'static str),
    /// The peer's ZRTP version is not supported.
    #[error("unsupported ZRTP version")]
    UnsupportedVersion,
    /// Both Hellos carry the same ZID.
    #[error("equal ZIDs in Hello")]
    EqualZids,
    /// A message arrived that the current state does not accept (and is not a retransmission).
    #[error("unexpected {message} in state {state}")]
    Unexpected {
        /// The message type.
        message: &'static str,
        /// The handshake state.
        state: &'static str,
    },
    /// The peer does not offer what this device requires (e.g. KEAV verification was stripped
    /// from its Hello), or asked for a weaker mode than this session needs.
    #[error("downgrade refused: {0}")]
    Downgrade(&'static str),
    /// The peer is known but no retained secret matches, and the session was not rescued by a
    /// bound equality test (PROTOCOL.md §4 cache-mismatch rule).
    #[error("retained-secret cache mismatch: possible man in the middle")]
    CacheMismatch,
    /// The equality test failed or was aborted (counts toward lockout).
    #[error("autonomous verification failed: {0}")]
    Verification(#[from] keav_verify::Error),
    /// The handshake failed after the equality test had started but before it completed
    /// (the peer aborted, went silent, or sent garbage). The peer may have tested one guess of
    /// the secret, so this counts toward lockout like a failed test.
    #[error("autonomous verification aborted: {0}")]
    VerificationAborted(Box<Error>),
    /// The peer is locked out after too many failed verifications.
    #[error("peer locked out until unix time {until}")]
    LockedOut {
        /// Unix second at which attempts are allowed again.
        until: u64,
    },
    /// A preshared Commit arrived but no retained secret matches its key ID.
    #[error("no shared secret for preshared mode")]
    NoSharedSecret,
    /// The peer sent an Error message with this RFC 6189 code.
    #[error("peer reported error code {0:#x}")]
    PeerError(u32),
    /// The handshake ran out of retransmissions.
    #[error("handshake timed out")]
    Timeout,
    /// A caller used the API out of order (a bug in the driver, not the peer).
    #[error("API misuse: {0}")]
    Misuse(&'static str),
}

impl Error {
    /// The coarse RFC 6189 §5.9 error code to send to the peer for this failure.
    pub fn wire_code(&self) -> u32 {
        match self {
            Error::Parse(_) => 0x10,
            Error::Auth(AuthFailure::Hvi) => 0x62,
            Error::Auth(AuthFailure::Confirm1Mac | AuthFailure::Confirm2Mac) => 0x70,
            Error::Auth(_) => 0x10,
            Error::BadPublicValue => 0x61,
            Error::NoCommonAlgorithm(_) => 0x40,
            Error::UnsupportedVersion => 0x30,
            Error::EqualZids => 0x90,
            Error::Unexpected { .. } => 0x10,
            Error::Downgrade(_) => 0x40,
            Error::CacheMismatch | Error::Verification(_) => 0x70,
            Error::VerificationAborted(inner) => inner.wire_code(),
            Error::LockedOut { .. } => 0xA0,
            Error::NoSharedSecret => 0x56,
            Error::PeerError(_) => 0x20,
            Error::Timeout => 0xB0,
            Error::Misuse(_) => 0x20,
        }
    }

    /// Whether this failure counts toward the peer's verification lockout.
    pub fn counts_toward_lockout(&self) -> bool {
        matches!(
            self,
            Error::Verification(_) | Error::CacheMismatch | Error::VerificationAborted(_)
        )
    }
}
