//! Interoperability harness between keav and Linphone's bzrtp (libbzrtp 5.1).
//!
//! - [`bzrtp`]: safe wrapper around one bzrtp endpoint (through a small C shim),
//! - [`driver`]: runs two endpoints back to back with a simulated clock,
//! - [`keav`]: keav's sans-IO endpoint behind the same [`driver::Peer`] interface,
//! - [`wire`]: tiny RFC 6189 packet helpers to inspect/tamper bzrtp's packets.
//!
//! Findings about bzrtp's behaviour are in `NOTES.md` next to this crate.

// FFI crate: calling the C shim needs `unsafe`. Every unsafe block is in
// `bzrtp.rs`/`ffi.rs` and documents why it is sound; the workspace-wide
// `forbid(unsafe_code)` is relaxed for this crate only (see Cargo.toml).
#![allow(unsafe_code)]

pub mod bzrtp;
pub mod driver;
mod ffi;
pub mod keav;
pub mod wire;

/// Whether the crate was built against an installed libbzrtp. When false
/// (`cfg(no_bzrtp)`), [`bzrtp::BzrtpEndpoint::new`] always fails and the
/// tests print "skipped: libbzrtp-dev not installed".
pub const BZRTP_AVAILABLE: bool = cfg!(not(no_bzrtp));
