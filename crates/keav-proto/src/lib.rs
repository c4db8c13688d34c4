//! Sans-IO core of KEAV (Key Exchange with Autonomous Verification).
//!
//! This crate holds everything that does not touch the outside world: the RFC 6189 (ZRTP)
//! wire format, the key schedule, SAS rendering, the handshake state machine with its three
//! modes, and the retained-secret cache *values* (persisting them is `keav-store`'s job).
//! Callers pass bytes and the current time in, and take bytes, timer deadlines and events out.
//! There is no clock, socket, thread or file access in here.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod cache;
pub mod codec;
pub mod crypto;
pub mod delivery;
pub mod durable;
pub mod error;
pub mod handshake;
pub mod msg;
pub mod packet;
pub mod record;
pub mod route;
pub mod sas;
pub mod secret;

pub use error::{Error, ParseError};
