//! `keav bench`: keav measured beside TLS 1.3 (rustls) and Noise (snow), and the drivers the
//! measurements use.
//!
//! [`run()`] executes the scenarios chosen in [`Options`] (the patent's latency table over a
//! link model, CPU per handshake, records, throughput, memory per session, bytes on the
//! wire) and returns a [`Report`], which [`Report::write`] turns into `report.md`,
//! `results.json` and PNG plots. The criterion benches under `benches/` time the same
//! in-memory drivers with criterion's statistics.
//!
//! Two kinds of drivers:
//!
//! - **In memory** (CPU, wire bytes, records, memory): both sides of one handshake run in one
//!   thread and pass their messages in memory — no sockets, no clock, no storage — so what
//!   is timed is the CPU the two devices spend.
//! - **Over loopback sockets** (latency, throughput): [`link::LinkProxy`] delays every byte by
//!   a [`LinkModel`] and counts bytes and causal flights; keav runs as real `keav-net`
//!   devices with durable stores, TLS and Noise through [`net_peers`].
//!
//! In-memory drivers:
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
pub mod link;
#[cfg(feature = "peers")]
pub mod net_peers;
pub mod options;
#[cfg(feature = "peers")]
pub mod peers;
pub mod records;
pub mod report;
pub mod run;
pub mod scenario;

pub use options::{LinkModel, Options, Scenario};
pub use report::Report;
pub use run::{run, Ctx, Progress, Quiet};

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
    /// An I/O operation failed (sockets, files, in-memory transfers).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// keav-net failed (latency and throughput scenarios).
    #[error("keav-net: {0}")]
    Net(#[from] keav_net::Error),
    /// A flag or option value is invalid or conflicts with another.
    #[error("{0}")]
    InvalidOption(String),
    /// The run was stopped (Ctrl-C) before this measurement finished.
    #[error("stopped before the measurement finished")]
    Cancelled,
    /// The report or a plot could not be produced, or a scenario could not run.
    #[error("{0}")]
    Report(String),
}
