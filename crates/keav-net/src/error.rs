//! The one error type of `keav-net`.

use thiserror::Error;

/// Everything that can go wrong while pairing or talking over a network.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The handshake failed (the typed protocol reason).
    #[error("handshake failed: {0}")]
    Handshake(#[from] keav_proto::Error),
    /// The device store failed.
    #[error("device store: {0}")]
    Store(#[from] keav_store::Error),
    /// A socket operation failed.
    #[error("network I/O: {0}")]
    Io(#[from] std::io::Error),
}
