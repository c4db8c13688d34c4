//! tokio drivers for KEAV: a device with its durable store pairs with peers over TCP or UDP
//! and gets an end-to-end secure channel; a rendezvous server helps devices find each other.
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

pub mod device;
pub mod error;
pub mod frame;
pub mod rendezvous;
pub mod session;
pub mod tcp;
pub mod udp;

pub use error::Error;

/// Temporary stand-in for `keav_proto::record` (same signatures) until it is merged.
/// NOT SECURE: no encryption. Replaced by `use keav_proto::record` once available.
pub(crate) mod record {
    #![allow(missing_docs, dead_code)]
    use keav_proto::handshake::SessionOutcome;
    pub use keav_proto::record::Aead;
    pub const MAX_PLAINTEXT: usize = 16 * 1024;
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RatchetPolicy {
        pub every_ms: u64,
    }
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum RecordError {
        #[error("record failed authentication")]
        Auth,
        #[error("replayed record")]
        Replay,
        #[error("malformed record")]
        Malformed,
        #[error("no AEAD")]
        NoAead,
    }
    pub enum Opened<'a> {
        Data(&'a [u8]),
        Close,
    }
    pub struct Sealer {
        key: u8,
        seq: u64,
    }
    pub struct Opener {
        key: u8,
        seq: u64,
    }
    fn tag(key: u8, seq: u64, data: &[u8]) -> u8 {
        data.iter()
            .fold(key ^ (seq as u8), |a, b| a.rotate_left(1) ^ b)
    }
    pub fn channel(
        o: &SessionOutcome,
        _p: RatchetPolicy,
        _now: u64,
    ) -> Result<(Sealer, Opener), RecordError> {
        o.channel_aead.ok_or(RecordError::NoAead)?;
        let k = o.exported_key.expose()[0];
        let (a, b) = match o.role {
            keav_proto::handshake::Role::Initiator => (k, k ^ 0x55),
            keav_proto::handshake::Role::Responder => (k ^ 0x55, k),
        };
        Ok((Sealer { key: a, seq: 0 }, Opener { key: b, seq: 0 }))
    }
    impl Sealer {
        pub fn seal(&mut self, pt: &[u8], _now: u64, out: &mut Vec<u8>) -> Result<(), RecordError> {
            out.push(0x17);
            out.extend_from_slice(&self.seq.to_be_bytes());
            out.extend_from_slice(pt);
            out.push(tag(self.key, self.seq, pt));
            self.seq += 1;
            Ok(())
        }
        pub fn seal_close(&mut self, _now: u64, out: &mut Vec<u8>) -> Result<(), RecordError> {
            out.push(0x15);
            out.extend_from_slice(&self.seq.to_be_bytes());
            out.push(tag(self.key, self.seq, b"close"));
            self.seq += 1;
            Ok(())
        }
    }
    impl Opener {
        pub fn open<'a>(&mut self, r: &'a mut [u8], _now: u64) -> Result<Opened<'a>, RecordError> {
            if r.len() < 10 {
                return Err(RecordError::Malformed);
            }
            let kind = r[0];
            let seq = u64::from_be_bytes(r[1..9].try_into().map_err(|_| RecordError::Malformed)?);
            if seq < self.seq {
                return Err(RecordError::Replay);
            }
            let n = r.len();
            let t = r[n - 1];
            let body = &r[9..n - 1];
            let want = if kind == 0x15 {
                tag(self.key, seq, b"close")
            } else {
                tag(self.key, seq, body)
            };
            if t != want || (kind != 0x15 && kind != 0x17) {
                return Err(RecordError::Auth);
            }
            self.seq = seq + 1;
            if kind == 0x15 {
                return Ok(Opened::Close);
            }
            Ok(Opened::Data(&r[9..n - 1]))
        }
    }
}
