//! Handshake and record CPU benchmarks of keav, and the in-memory drivers they time.
//!
//! Every driver here runs *both* sides of one complete handshake in one thread, passing the
//! messages between them in memory: no sockets, no clock, no storage. What the benchmarks
//! time is therefore the CPU both devices spend on one handshake.
//!
//! - [`run_keav_handshake`] pumps two [`keav_proto::handshake::Endpoint`]s against each other;
//!   [`KeavSetup`] describes the devices (mode, equality test, pairing code, caches).
//! - With the `peers` feature (default): [`peers::noise_xx_handshake`] (snow) and
//!   [`peers::TlsPair`] (rustls, TLS 1.3 full and resumed handshakes).
//!
//! The record benchmarks use [`records::KeavPipe`] and, with `peers`, [`peers::NoisePipe`]
//! and [`peers::TlsPipe`]: one record sent and received per call, again both sides in one
//! thread.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod keav;
#[cfg(feature = "peers")]
pub mod peers;
pub mod records;

pub use keav::{run_keav_handshake, DeviceSetup, KeavOutcome, KeavSetup};

/// Errors of the benchmark drivers: a handshake that failed or did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The keav handshake returned an error.
    #[error("keav handshake failed: {0}")]
    Keav(#[from] keav_proto::Error),
    /// A keav record could not be sealed or opened.
    #[error("keav record: {0}")]
    Record(#[from] keav_proto::record::RecordError),
    /// The message pump went quiet (or ran out of rounds) before both sides completed.
    #[error("{0} handshake did not complete")]
    Incomplete(&'static str),
    /// Both sides completed but derived different keys.
    #[error("{0}: the two sides derived different keys")]
    KeyMismatch(&'static str),
    /// The session was not of the expected kind (e.g. a TLS handshake that did not resume,
    /// or a keav session that did not use preshared mode).
    #[error("unexpected handshake kind: {0}")]
    UnexpectedKind(String),
    /// snow reported an error.
    #[cfg(feature = "peers")]
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// rustls reported an error.
    #[cfg(feature = "peers")]
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[cfg(feature = "peers")]
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    /// In-memory transfer of TLS records failed.
    #[error("in-memory transfer: {0}")]
    Io(#[from] std::io::Error),
}
