//! tokio drivers for KEAV: a device with its durable store pairs with peers over TCP or UDP
//! and gets an end-to-end secure channel; a rendezvous server helps devices find each other.
//!
//! The protocol work happens in the sans-IO core (`keav-proto`); this crate moves its bytes,
//! runs its timers, keeps the store up to date through `keav_store::ledger`, and turns the
//! handshake's result into a [`session::Channel`].
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod device;
pub mod error;
pub mod frame;
pub mod rendezvous;
pub mod session;
pub mod tcp;
pub mod udp;

pub use error::Error;
