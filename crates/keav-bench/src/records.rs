//! In-memory record pipes: one sender and one receiver of an established channel, driven in
//! one thread, for the record-layer benchmarks.
//!
//! Each pipe's `transfer` sends one payload as one record and returns the plaintext the
//! receiver got, so a caller can check the round trip. What `transfer` does is exactly what
//! the benchmark times:
//!
//! - [`KeavPipe`]: `Sealer::seal` into a reused buffer (cleared first), then `Opener::open`
//!   in place on that buffer.
//! - `peers::NoisePipe` (feature `peers`): snow `TransportState::write_message` into a reused
//!   buffer, then `read_message` into a second reused buffer.
//! - `peers::TlsPipe` (feature `peers`): rustls client `writer().write_all` → `write_tls`
//!   into a reused `Vec` → server `read_tls` + `process_new_packets` → `reader().read_exact`
//!   into a reused buffer: the calls a rustls user makes per record over a byte stream.

use keav_proto::handshake::Role;
use keav_proto::record::{self, Aead, Opened, Opener, RatchetPolicy, Sealer, MAX_RECORD_LEN};
use rand_core::OsRng;

use crate::{run_keav_handshake, BenchError, KeavSetup};

/// The benchmark's payload sizes: 64 B, 1 KiB, 16 KiB (the largest keav and TLS record).
pub const PAYLOAD_SIZES: [usize; 3] = [64, 1024, 16 * 1024];

/// One direction of a keav secure channel: the initiator's [`Sealer`] and the responder's
/// [`Opener`], keyed from a real keav session (DH + CPace, first session).
pub struct KeavPipe {
    sealer: Sealer,
    opener: Opener,
    buf: Vec<u8>,
    now_ms: u64,
}

impl core::fmt::Debug for KeavPipe {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeavPipe")
            .field("sealer", &self.sealer)
            .field("opener", &self.opener)
            .finish_non_exhaustive()
    }
}

impl KeavPipe {
    /// Runs one keav first session in memory and builds the initiator-to-responder direction
    /// of its channel with `aead` (whatever Hello negotiated) and the default
    /// [`RatchetPolicy`] (2^20 records or ten minutes; the clock stays at 0, so only the
    /// record count ratchets).
    pub fn new(aead: Aead) -> Result<Self, BenchError> {
        let o = run_keav_handshake(
            &KeavSetup::first_session(keav_verify::Backend::CPace),
            &mut OsRng,
        )?;
        Ok(Self::from_parts(
            &o.initiator.exported_key,
            &o.responder.exported_key,
            &o.initiator.kdf_context,
            &o.responder.kdf_context,
            aead,
            RatchetPolicy::default(),
        ))
    }

    /// Builds the pipe from each side's session values (they must agree for records to
    /// open).
    pub fn from_parts(
        initiator_key: &keav_proto::secret::Secret32,
        responder_key: &keav_proto::secret::Secret32,
        initiator_ctx: &[u8],
        responder_ctx: &[u8],
        aead: Aead,
        policy: RatchetPolicy,
    ) -> Self {
        let (sealer, _) = record::channel_from_parts(
            initiator_key,
            initiator_ctx,
            Role::Initiator,
            aead,
            policy,
            0,
        );
        let (_, opener) = record::channel_from_parts(
            responder_key,
            responder_ctx,
            Role::Responder,
            aead,
            policy,
            0,
        );
        Self {
            sealer,
            opener,
            buf: Vec::with_capacity(MAX_RECORD_LEN),
            now_ms: 0,
        }
    }

    /// Seals `payload` into the reused buffer and opens it in place; returns the plaintext.
    pub fn transfer(&mut self, payload: &[u8]) -> Result<&[u8], BenchError> {
        self.buf.clear();
        self.sealer.seal(payload, self.now_ms, &mut self.buf)?;
        match self.opener.open(&mut self.buf, self.now_ms)? {
            Opened::Data(d) => Ok(d),
            Opened::Close => Err(BenchError::UnexpectedKind("close record".into())),
        }
    }

    /// Records sealed so far.
    pub fn records_sent(&self) -> u64 {
        self.sealer.records_sent()
    }

    /// Records opened so far.
    pub fn records_received(&self) -> u64 {
        self.opener.records_received()
    }

    /// The sealer's and the opener's current epochs.
    pub fn epochs(&self) -> (Option<u32>, Option<u32>) {
        (self.sealer.epoch(), self.opener.epoch())
    }

    /// The wire record of the last transfer (decrypted in place: header, plaintext, tag).
    pub fn last_record_len(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keav_proto::record::{RecordError, RECORD_OVERHEAD};

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn keav_pipe_round_trips_every_size_for_both_aeads() {
        for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
            let mut p = KeavPipe::new(aead).unwrap();
            for n in PAYLOAD_SIZES {
                let msg = payload(n);
                for _ in 0..3 {
                    assert_eq!(p.transfer(&msg).unwrap(), &msg[..]);
                    assert_eq!(p.last_record_len(), n + RECORD_OVERHEAD);
                }
            }
            assert_eq!(p.records_sent(), 9);
            assert_eq!(p.records_received(), 9);
        }
    }

    #[test]
    fn keav_pipe_really_encrypts_and_authenticates() {
        let mut p = KeavPipe::new(Aead::Aes256Gcm).unwrap();
        let msg = payload(1024);
        // Seal only: the wire bytes must not contain the plaintext.
        let mut wire = Vec::new();
        p.sealer.seal(&msg, 0, &mut wire).unwrap();
        assert!(!wire.windows(32).any(|w| w == &msg[..32]));
        // A flipped ciphertext bit is refused, and the genuine record then still opens.
        let mut bad = wire.clone();
        bad[20] ^= 1;
        assert_eq!(p.opener.open(&mut bad, 0), Err(RecordError::BadTag));
        let mut good = wire.clone();
        assert_eq!(p.opener.open(&mut good, 0), Ok(Opened::Data(&msg[..])));
        // Opening the same record twice is a replay.
        let mut again = wire.clone();
        assert_eq!(p.opener.open(&mut again, 0), Err(RecordError::Replay));
    }

    #[test]
    fn keav_pipe_keeps_working_across_ratchets() {
        let o = run_keav_handshake(
            &KeavSetup::first_session(keav_verify::Backend::CPace),
            &mut OsRng,
        )
        .unwrap();
        let policy = RatchetPolicy {
            every_records_log2: 2,
            every_ms: u64::MAX,
        };
        let mut p = KeavPipe::from_parts(
            &o.initiator.exported_key,
            &o.responder.exported_key,
            &o.initiator.kdf_context,
            &o.responder.kdf_context,
            Aead::ChaCha20Poly1305,
            policy,
        );
        let msg = payload(64);
        for _ in 0..20 {
            assert_eq!(p.transfer(&msg).unwrap(), &msg[..]);
        }
        assert_eq!(p.epochs(), (Some(4), Some(4)));
    }

    #[test]
    fn keav_pipe_with_mismatched_keys_fails() {
        let a = keav_proto::secret::Secret32::new([1; 32]);
        let b = keav_proto::secret::Secret32::new([2; 32]);
        let mut p = KeavPipe::from_parts(
            &a,
            &b,
            b"ctx",
            b"ctx",
            Aead::Aes256Gcm,
            RatchetPolicy::default(),
        );
        assert!(matches!(
            p.transfer(b"hello"),
            Err(BenchError::Record(RecordError::BadTag))
        ));
    }
}
