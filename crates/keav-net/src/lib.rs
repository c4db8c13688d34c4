//! tokio drivers for KEAV: a device with its durable store pairs with peers over TCP, UDP, an
//! MQTT broker ([`mqtt`]) or a NATS server ([`nats`]) and gets an end-to-end secure channel;
//! a rendezvous server helps devices find each other.
//!
//! The protocol work happens in the sans-IO core (`keav-proto`); this crate moves its bytes,
//! runs its timers, keeps the store up to date through `keav_store::ledger`, and turns the
//! handshake's result into a [`session::Channel`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), keav_net::Error> {
//! use keav_net::device::{Device, DeviceSettings};
//! use keav_net::session::Options;
//! let device = Device::open("device.keav", DeviceSettings::default())?;
//! let mut ch = keav_net::tcp::connect(&device, "127.0.0.1:7000", "sensor", &Options::default()).await?;
//! println!("verification: {}", ch.peer().verification.name());
//! ch.send(b"hello").await?;
//! let reply = ch.recv().await?;
//! ch.close().await?;
//! # let _ = reply; Ok(()) }
//! ```
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod broker;
mod coalesce;
pub mod device;
#[cfg(feature = "embedded-broker")]
pub mod embedded_broker;
pub mod error;
pub mod frame;
pub mod messenger;
pub mod mqtt;
pub mod nats;
pub mod relay;
pub mod rendezvous;
pub mod session;
pub mod tcp;
pub mod udp;

pub use error::Error;

pub(crate) use keav_proto::record;
