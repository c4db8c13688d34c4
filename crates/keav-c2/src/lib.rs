//! Command and control for keav fleets, derived from SRUP (docs/C2.md).
//!
//! A C2 server commands devices over an MQTT broker with signed, sequence-numbered binary
//! messages; an identity service gives devices identities at run time; joins can be vouched
//! for by a person or by a device that is already in the fleet; the broker's ACLs confine
//! each device to its own topics.
//!
//! Layers, from the wire up:
//! - [`keys`]: signature algorithms (Ed25519 by default, RSA-2048 PSS/SHA-256 selectable),
//!   device identifiers;
//! - [`topics`]: the MQTT topic scheme the ACLs are written against;
//! - [`wire`]: the versioned binary messages, one codec per type, parse then verify;
//! - [`guard`]: replay protection (per-peer counters, bounded reorder window, expiry), sans-IO;
//! - [`engine`]: the sans-IO protocol logic of the server and of the device agent;
//! - [`acl`]: Mosquitto configuration, password and ACL files for a fleet;
//! - [`registry`]: the fleet registry (devices, counters, responses, enrollment tokens)
//!   behind a store trait, on redb or PostgreSQL;
//! - [`identity`]: the identity service (HTTP) that gives devices identities and broker
//!   credentials against proof of key possession, and its client;
//! - [`confidential`]: optional confidentiality, a KEAV channel between the server and a
//!   device carried inside signed C2 messages;
//! - [`mqtt`]: the broker link (credentials, QoS 1, reconnect with backoff);
//! - [`server`] and [`agent`]: the tokio C2 server (with the identity service and the
//!   operator API on one HTTP port) and the device agent around the engine.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod acl;
pub mod agent;
pub mod confidential;
pub mod engine;
pub mod error;
pub mod guard;
pub mod identity;
pub mod keys;
pub mod mqtt;
pub mod registry;
pub mod server;
pub mod topics;
pub mod wire;

pub use error::C2Error;
