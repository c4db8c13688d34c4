//! Rendezvous discovery (the server-assisted discovery of the patent's FIG. 1B): devices
//! register their identifier and address with a rendezvous server; a device asks the server
//! for a peer by identifier and then connects to that peer directly.
//!
//! # Trust model
//!
//! The rendezvous server is **not trusted**. It never sees a key, a retained secret or a
//! SAS: it maps a device identifier to a socket address, nothing more. A lying server (or
//! anyone who answers in its place) can only hand out a wrong address; the device that
//! connects there then runs the KEAV handshake with whoever listens, and that handshake —
//! retained-secret continuity, the Confirm MACs and the autonomous equality test — is what
//! catches an impostor. The server can make a pairing *fail* (deny service) but can never
//! make one *succeed*.
//!
//! The registered address is whatever the device claims; the server does not compare it
//! with the connection's source address (devices behind NAT or on another interface would
//! fail such a check, and it would prove nothing about the key anyway). To test the
//! lying-server case end to end, pre-fill a [`MemoryRendezvousStore`] with
//! [`MemoryRendezvousStore::insert_unchecked`] and run [`spawn`] on it.
//!
//! # Wire protocol (version 1)
//!
//! One TCP connection carries any number of request/response pairs, strictly alternating.
//! Every message is a frame:
//!
//! ```text
//! frame    = length:u16be body            length = len(body), at most 1024 (MAX_MESSAGE)
//! body     = version:u8 (= 1) type:u8 payload
//! id       = len:u8 (1..=64) utf8[len]    no control characters
//! addr     = 4:u8 ipv4[4] port:u16be  |  6:u8 ipv6[16] port:u16be
//! token    = 16 random bytes chosen by the server
//!
//! requests                                  responses
//! 0x01 Register   id addr ttl:u32be         0x81 Registered   token expires_at:u64be
//!                 has_token:u8 (0|1) [token]0x82 Found        addr expires_at:u64be
//! 0x02 Lookup     id                        0x83 NotFound
//! 0x03 Unregister id token                  0x84 Unregistered
//!                                           0xFF Error        code:u8
//! ```
//!
//! Integers are big-endian, `expires_at` is a unix second, a record is live while
//! `now < expires_at`. Trailing bytes after a payload are an error. IPv6 flow labels and
//! scope ids are not carried (a scope id means nothing on another host). Error codes are
//! coarse on purpose ([`ErrorCode`]): bad request, unsupported version, too large, denied,
//! busy, internal.
//!
//! Frames are read with a bounded reader: the length is checked against [`MAX_MESSAGE`]
//! before a single body byte is read, into a fixed buffer (no allocation driven by the
//! peer). A frame that is too long is answered with `Error { TooLarge }` and the connection
//! is closed (the stream cannot be resynchronised); any other malformed request is answered
//! with an `Error` and the connection stays usable, since the framing is still intact.
//!
//! # Registration ownership (anti-griefing, not security)
//!
//! The first registration of an identifier gets a random 16-byte [`Token`]. While that
//! registration is live, a `Register` for the same identifier replaces it (new address, new
//! expiry, *same* token) only if it carries the current token; without it the server answers
//! `Error { Denied }`. `Unregister` needs the token too. Once a registration expires, the
//! identifier is free again: first come, first served, with a fresh token. This only stops a
//! third party from casually overwriting or deleting a live registration; it is not an
//! authentication mechanism (the token travels in clear, the server could be lying, the
//! address is whatever the device claims). Security comes from the KEAV handshake between
//! the devices. Keeping the token across renewals means a lost `Registered` answer never
//! locks a device out of its own identifier.
//!
//! # Server
//!
//! [`serve`] (or [`spawn`], which returns a [`ServerHandle`]) accepts connections on a
//! [`tokio::net::TcpListener`] in the style of mini-redis, bounded by [`Limits`]:
//! at most `max_connections` concurrent connections (a connection over the limit gets
//! `Error { Busy }` and is closed at once), every request must arrive completely within
//! `request_timeout` of the previous answer (idle and slow-loris connections are cut), at most
//! `max_requests_per_connection` requests per connection, TTLs are capped at `max_ttl`, and
//! expired records are never returned and are purged every `purge_interval`. When the
//! shutdown future completes the server stops accepting, lets every request already read
//! finish and be answered, closes idle connections, and returns once every connection task
//! has ended.
//!
//! State lives behind [`RendezvousStore`] (synchronous; the server calls it on the blocking
//! pool), with [`RedbRendezvousStore`] (durable, survives a restart) and
//! [`MemoryRendezvousStore`]. Time is passed in as unix seconds; the server reads it from a
//! [`Clock`] so tests can drive expiry with a [`ManualClock`].
//!
//! # Client
//!
//! [`register`], [`lookup`], [`unregister`] open one connection per call and bound the whole
//! exchange (connect, write, read) by [`DEFAULT_TIMEOUT`]; [`request`] sends any [`Request`]
//! with a caller-chosen timeout.

mod client;
mod proto;
mod server;
mod store;

pub use client::{lookup, register, request, unregister, Registration, DEFAULT_TIMEOUT};
pub use proto::{
    read_frame, write_frame, DeviceId, ErrorCode, Request, Response, Token, MAX_ID_LEN,
    MAX_MESSAGE, VERSION,
};
pub use server::{
    serve, serve_with_clock, spawn, spawn_with_clock, Clock, Limits, ManualClock, ServerHandle,
    SystemClock,
};
pub use store::{
    apply_claim, Claim, Entry, MemoryRendezvousStore, PutOutcome, RedbRendezvousStore,
    RemoveOutcome, RendezvousStore, DEFAULT_MAX_ENTRIES,
};

use std::time::Duration;

/// Everything that can go wrong in rendezvous discovery (client, server or store).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation failed (including the peer closing the connection mid-frame).
    #[error("rendezvous i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The exchange did not complete within the allowed time.
    #[error("rendezvous exchange timed out after {0:?}")]
    Timeout(Duration),
    /// A message could not be parsed.
    #[error("malformed rendezvous message: {0}")]
    Malformed(&'static str),
    /// A message carried a protocol version this implementation does not speak.
    #[error("unsupported rendezvous protocol version {0}")]
    UnsupportedVersion(u8),
    /// A frame announced a body longer than [`MAX_MESSAGE`].
    #[error("rendezvous message of {len} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge {
        /// The announced body length.
        len: usize,
    },
    /// A device identifier is empty, longer than [`MAX_ID_LEN`] bytes or has control characters.
    #[error(
        "invalid device identifier (1 to {MAX_ID_LEN} bytes of UTF-8 without control characters)"
    )]
    InvalidId,
    /// A registered address is unusable (unspecified IP or port 0).
    #[error("invalid address to register (unspecified IP or port 0)")]
    InvalidAddress,
    /// A registration TTL is zero.
    #[error("invalid registration TTL (at least one second)")]
    InvalidTtl,
    /// The server answered with an error.
    #[error("rendezvous server refused the request: {0}")]
    Rejected(ErrorCode),
    /// The server answered with a response that does not fit the request.
    #[error("unexpected rendezvous response")]
    UnexpectedResponse,
    /// The storage engine failed.
    #[error("rendezvous store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored record could not be decoded.
    #[error("stored rendezvous record is corrupt: {0}")]
    Corrupt(&'static str),
    /// The operating system's random generator failed.
    #[error("OS random generator failed")]
    Rng,
    /// A background task of the server panicked or was cancelled.
    #[error("rendezvous server task failed")]
    Task,
}
