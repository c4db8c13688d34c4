//! The one error type of `keav-net`.

use thiserror::Error;

use crate::frame::FrameError;

/// Everything that can go wrong while pairing or talking over a network.
///
/// Every message is one line, suitable for a command-line tool, and never contains a secret.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The handshake failed (the typed protocol reason). See
    /// [`keav_proto::Error::counts_toward_lockout`] for failures that cost a verification attempt.
    #[error("handshake failed: {0}")]
    Handshake(#[from] keav_proto::Error),
    /// The peer refused the handshake with an RFC 6189 Error message.
    #[error("peer refused the handshake (RFC 6189 error code {code:#x})")]
    Refused {
        /// The RFC 6189 §5.9 error code the peer sent.
        code: u32,
    },
    /// The device store failed (unreadable, corrupt, disk full).
    #[error("device store: {0}")]
    Store(#[from] keav_store::Error),
    /// A socket operation failed.
    #[error("network I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a malformed or oversized frame; the connection was cut off.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// A record failed to open or seal (tampering, replay, a key that ran out). On a stream
    /// transport the channel is dead after this.
    #[error("secure channel: {0}")]
    Record(#[from] keav_proto::record::RecordError),
    /// A durable channel refused (outbox full, a damaged persisted channel state, ...).
    #[error("durable channel: {0}")]
    Durable(#[from] keav_proto::durable::DurableError),
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The channel is closed (it was closed locally, or the peer's authenticated close was
    /// already delivered).
    #[error("channel closed")]
    Closed,
    /// The transport ended without the peer's authenticated close: data may have been cut off.
    #[error("connection ended without an authenticated close (possible truncation)")]
    Truncated,
    /// The local side is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// The session completed but cannot carry a KEAV channel (e.g. a plain ZRTP peer that
    /// negotiated no channel AEAD).
    #[error("session cannot carry a secure channel: {0}")]
    Unsupported(&'static str),
    /// A caller-supplied argument or setting is invalid.
    #[error("invalid argument: {0}")]
    InvalidInput(&'static str),
}

impl Error {
    /// Converts a handshake failure: a bare peer Error message becomes [`Error::Refused`], a
    /// plain deadline [`Error::Timeout`], everything else [`Error::Handshake`] (including a
    /// timeout during the equality test, which counts toward lockout).
    pub fn from_handshake(e: keav_proto::Error) -> Error {
        match e {
            keav_proto::Error::PeerError(code) => Error::Refused { code },
            keav_proto::Error::Timeout => Error::Timeout("handshake deadline"),
            e => Error::Handshake(e),
        }
    }

    /// Whether this failure cost the peer (or this device) a verification attempt: a failed,
    /// aborted or refused equality test, or a refused cache mismatch.
    pub fn counts_toward_lockout(&self) -> bool {
        match self {
            Error::Handshake(e) => e.counts_toward_lockout(),
            _ => false,
        }
    }
}
