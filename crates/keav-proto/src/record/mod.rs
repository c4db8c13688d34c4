//! The record layer of a KEAV secure channel.
//!
//! After a handshake, [`channel`] turns the [`SessionOutcome`]
//! into a [`Sealer`] (our sending direction) and an [`Opener`] (the peer's). Like the rest of
//! this crate it is sans-IO: records are byte buffers and the time is passed in.
//!
//! # Wire format
//!
//! ```text
//! +------+-----------+---------------+---------------------------+---------+
//! | type | epoch     | sequence      | ciphertext                | tag     |
//! | 1 B  | u32 BE    | u64 BE        | 0 ..= 16384 B             | 16 B    |
//! +------+-----------+---------------+---------------------------+---------+
//!  \________ 13-byte header = AAD ________/
//! ```
//!
//! - `type` is `0x17` for application data and `0x15` for the authenticated close (whose
//!   ciphertext is empty). Neither collides with `0x10`, the first byte of every ZRTP packet,
//!   so one datagram socket can carry both.
//! - `epoch` counts ratchet steps of the sending direction, from 0.
//! - `sequence` counts records of the sending direction, from 0, across epochs (it never
//!   restarts at a ratchet). The value `u64::MAX` is never sent: a sealer that reaches it
//!   refuses with [`RecordError::Exhausted`] and closes.
//! - The AEAD is AES-256-GCM or ChaCha20-Poly1305 as negotiated in Hello ([`Aead`]); the
//!   nonce is four zero bytes followed by the sequence number big-endian, and the associated
//!   data is the 13-byte header. A nonce never repeats under one key because sequence numbers
//!   never repeat within a direction and every (direction, epoch) has its own key.
//!
//! A record is at most [`MAX_PLAINTEXT`] + [`RECORD_OVERHEAD`] bytes.
//!
//! # Key schedule
//!
//! With `KDF` the RFC 6189 KDF (HMAC-SHA-256, [`crate::crypto::kdf32`]) and `ctx` the
//! session's KDF_Context:
//!
//! ```text
//! chain_0(i->r)  = KDF(exported_key, "KEAV channel initiator to responder", ctx, 256)
//! chain_0(r->i)  = KDF(exported_key, "KEAV channel responder to initiator", ctx, 256)
//! chain_{e+1}    = KDF(chain_e, "KEAV channel ratchet", ctx, 256)
//! record key_e   = KDF(chain_e, "KEAV channel record key " || wire id, ctx, 256)
//! ```
//!
//! where the wire id is `KGCM` or `KC20`. The exported key already includes the CPace key
//! when CPace ran. The AEAD key is one KDF step away from the chain key (rather than being the
//! chain key itself) so that the AEAD's expanded key state, which lives as long as the epoch,
//! never allows deriving a later epoch; naming the AEAD in the label keeps the two algorithms
//! from ever using the same key.
//!
//! # Ratchet
//!
//! The sealer steps to the next epoch before sending a record when `2^k` records were sent in
//! the current epoch or [`RatchetPolicy::every_ms`] passed since the epoch began
//! ([`RatchetPolicy`]). The chain and AEAD keys of the epoch it leaves are dropped, and they
//! erase themselves (zeroize) when dropped.
//!
//! The opener follows the sender's epoch: it keeps the AEAD state of its current epoch, of the
//! epoch before (so records reordered across a ratchet still open, until `every_ms` after the
//! opener entered the current epoch), and of the next one (precomputed). A record up to
//! [`MAX_EPOCH_SKIP`] epochs ahead is opened with keys derived on the spot, which are kept only
//! if the record authenticates. Records of older epochs are refused with
//! [`RecordError::StaleEpoch`], records further ahead with [`RecordError::EpochTooFar`].
//!
//! Note: the AES-GCM implementation erases its AES round keys on drop, but not the GHASH
//! subkey `H = AES_K(0)`. `H` only authenticates; it reveals neither the record key nor any
//! plaintext, and records of an erased epoch are refused whatever their tag.
//!
//! # AEAD backends
//!
//! By default the AEADs are RustCrypto's `aes-gcm` and `chacha20poly1305` (pure Rust, for
//! small devices). With the cargo feature `fast-aead` they are ring's instead (assembly,
//! several times faster on servers; see docs/BENCHMARKS.md, "Records"). The choice is made at
//! build time for the whole crate ([`AEAD_BACKEND`] tells which) and changes nothing on the
//! wire: same keys, nonces and AAD, records identical bit for bit, so either side may use
//! either backend. The behaviour of [`Opener::open`] is the same too (a refused record is left
//! as it was; the ring backend copies the ciphertext aside first, since ring zeroes the buffer
//! when a tag fails).
//!
//! Key erasure differs: ring's keys (`LessSafeKey`) offer no erasure, so with `fast-aead` the
//! expanded AES key and GHASH table (or the ChaCha20 key) of a dropped epoch remain in freed
//! memory until it is reused. The chain keys and the 32-byte record keys are still erased.
//! Builds that must not leave epoch keys behind (forward secrecy against a later memory dump)
//! should keep the default backend.
//!
//! # Receiving
//!
//! [`Opener::open`] does the cheap checks first, in this order, and only then the AEAD:
//! closed? → length → type → replay window ([`REPLAY_WINDOW`] sequence numbers) → epoch
//! distance. The window is updated only after the record authenticated, so a forged or
//! damaged record never moves it. Any failure leaves the opener usable; drop the record and
//! carry on. The record is decrypted in place and the plaintext returned as a sub-slice.
//!
//! # Persisted state
//!
//! For durable channels (docs/MESSAGING.md) [`Sealer::export_state`] / [`Sealer::from_state`]
//! and [`Opener::export_state`] / [`Opener::from_state`] convert between the live objects and
//! [`SealerState`] / [`OpenerState`], which `encode` to and `decode` from bytes. The AEAD
//! state is never stored: the first record after a restore rebuilds it from the chain key, as
//! after [`Sealer::compact`].
//!
//! ## What is kept, what is lost
//!
//! - Sealer: AEAD, ratchet policy, KDF context, epoch, chain key of that epoch, next sequence
//!   number and records sealed in the epoch. The *time* of the epoch restarts at the
//!   `now_ms` given to [`Sealer::from_state`] (durable channels ratchet by count only).
//! - Opener: AEAD, the grace period of the previous epoch, KDF context, epoch, chain key,
//!   replay window (highest accepted sequence number and bitmap), records received and the
//!   in-order flag. The previous epoch's grace copy is **not** kept: a restored opener
//!   refuses records of the epoch before its current one ([`RecordError::StaleEpoch`]).
//!   Only the chain key of the current epoch is stored, from which earlier epochs cannot be
//!   derived.
//! - A closed sealer or opener exports nothing (`None`).
//!
//! Safety of a restore depends on the caller storing the sealer state **before** any record
//! sealed after the export leaves the process; a sealer restored from an older state would
//! seal sequence numbers again (nonce reuse). The planned outbox (docs/MESSAGING.md) stores
//! each sealed record with the sealer state that produced it in one transaction.
//!
//! ## Encoding (version 1)
//!
//! All integers big-endian. No checksum: keav-store checksums its records.
//!
//! ```text
//! SealerState:  "KVSS" | version 1 | AEAD wire id (4) | every_records_log2 u8 | every_ms u64
//!               | ctx_len u16 | ctx | epoch u32 | chain key (32) | next_seq u64
//!               | epoch_records u64
//! OpenerState:  "KVOS" | version 1 | AEAD wire id (4) | grace_ms u64 | ctx_len u16 | ctx
//!               | epoch u32 | chain key (32) | flags u8 (bit 0 in-order, bit 1 window
//!               non-empty) | highest u64 | bitmap 16 x u64 | received u64
//! ```
//!
//! Decoding refuses: another magic or version, an unknown AEAD, a KDF context longer than
//! [`MAX_STATE_KDF_CONTEXT`], unknown flag bits, trailing bytes, and states no sealer or
//! opener can reach (for example `next_seq == u64::MAX`, more records in the epoch than
//! sealed in all, an epoch ahead of the sequence numbers, a window bit set for a number above
//! the highest one, more bits set than records received).

pub mod batch;
mod keys;
mod state;
mod window;

#[cfg(test)]
mod tests;

use core::fmt;
use std::sync::Arc;

use crate::handshake::{Role, SessionOutcome};
use crate::secret::Secret32;

use keys::Cipher;
pub use state::{OpenerState, SealerState, MAX_STATE_KDF_CONTEXT};
use window::ReplayWindow;
pub use window::REPLAY_WINDOW;

/// The AEAD implementation this build seals and opens records with: `"ring"` with the
/// `fast-aead` feature, `"rustcrypto"` without.
pub const AEAD_BACKEND: &str = keys::Backend::DEFAULT.name();

/// Largest application payload of one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Length of the record header (type, epoch, sequence).
pub const HEADER_LEN: usize = 13;
/// Length of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// Bytes a record adds to its payload: header and tag.
pub const RECORD_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest record on the wire.
pub const MAX_RECORD_LEN: usize = MAX_PLAINTEXT + RECORD_OVERHEAD;
/// Record type of application data.
pub const TYPE_DATA: u8 = 0x17;
/// Record type of the authenticated close.
pub const TYPE_CLOSE: u8 = 0x15;
/// How many epochs ahead of its current one the opener derives keys for on demand.
pub const MAX_EPOCH_SKIP: u32 = 16;

/// When the sending direction ratchets its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatchetPolicy {
    /// Ratchet after `2^every_records_log2` records in one epoch (64 or more: never by count).
    pub every_records_log2: u8,
    /// Ratchet before the first record sent `every_ms` milliseconds or more after the epoch
    /// began (`u64::MAX`: never by time). The opener also forgets the previous epoch's key
    /// this long after it entered the current one.
    pub every_ms: u64,
}

impl Default for RatchetPolicy {
    /// 2^20 records or ten minutes.
    fn default() -> Self {
        RatchetPolicy {
            every_records_log2: 20,
            every_ms: 600_000,
        }
    }
}

impl RatchetPolicy {
    fn records_per_epoch(&self) -> u64 {
        1u64.checked_shl(u32::from(self.every_records_log2))
            .unwrap_or(u64::MAX)
    }
}

/// Why a record could not be sealed or opened.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The session did not negotiate a channel AEAD (the peer is plain ZRTP).
    #[error("the peer negotiated no secure channel")]
    NoChannel,
    /// The record is shorter than header and tag.
    #[error("record truncated")]
    Truncated,
    /// The payload or record is longer than allowed.
    #[error("record too long")]
    TooLong,
    /// Unknown record type, or a close record carrying data.
    #[error("bad record type")]
    BadType,
    /// A record with this sequence number was already accepted.
    #[error("replayed record")]
    Replay,
    /// The sequence number is older than the replay window.
    #[error("record older than the replay window")]
    Stale,
    /// In in-order mode (stream transports): the record is not the next one in sequence, so a
    /// record was dropped, reordered or injected on the way.
    #[error("record out of order (one was dropped, reordered or injected)")]
    OutOfOrder,
    /// The record's epoch is too far ahead of the receiver's.
    #[error("record epoch too far ahead")]
    EpochTooFar,
    /// The record's epoch key was already erased.
    #[error("record epoch no longer accepted")]
    StaleEpoch,
    /// The record failed authentication (forged, damaged, or not for this direction).
    #[error("record authentication failed")]
    BadTag,
    /// Sequence numbers (or epochs) are used up; the sealer is now closed.
    #[error("sequence numbers exhausted; channel closed")]
    Exhausted,
    /// The channel was closed (sealer: close sent or exhausted; opener: close received).
    #[error("channel closed")]
    Closed,
    /// A persisted sealer or opener state is malformed or inconsistent
    /// ([`SealerState::decode`], [`OpenerState::decode`]); the reason names the field.
    #[error("bad channel state: {0}")]
    BadState(&'static str),
    /// A record batch ([`batch`]) is malformed; the reason names what. Nothing in it is used.
    #[error("malformed record batch: {0}")]
    BadBatch(&'static str),
}

/// What an opened record carried.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'a> {
    /// Application data (a sub-slice of the record buffer, decrypted in place).
    Data(&'a [u8]),
    /// The peer's authenticated close: nothing follows in this direction.
    Close,
}

/// Builds the channel of a completed session.
///
/// Fails with [`RecordError::NoChannel`] when the peer negotiated no channel AEAD.
pub fn channel(
    outcome: &SessionOutcome,
    policy: RatchetPolicy,
    now_ms: u64,
) -> Result<(Sealer, Opener), RecordError> {
    let aead = outcome.channel_aead.ok_or(RecordError::NoChannel)?;
    Ok(channel_from_parts(
        &outcome.exported_key,
        &outcome.kdf_context,
        outcome.role,
        aead,
        policy,
        now_ms,
    ))
}

/// Builds a channel from the raw session values (what [`channel`] takes from the outcome).
pub fn channel_from_parts(
    exported_key: &Secret32,
    kdf_context: &[u8],
    role: Role,
    aead: Aead,
    policy: RatchetPolicy,
    now_ms: u64,
) -> (Sealer, Opener) {
    let (send_chain, recv_chain) = keys::initial_chains(exported_key, kdf_context, role);
    // One copy of the context, shared by both directions.
    let ctx: Arc<[u8]> = Arc::from(kdf_context);
    let sealer = Sealer::new(send_chain, ctx.clone(), aead, policy, now_ms);
    let opener = Opener::new(recv_chain, ctx, aead, policy);
    (sealer, opener)
}

/// The keys of the sending direction's current epoch.
struct SealKeys {
    epoch: u32,
    chain: Secret32,
    /// The expanded AEAD state; `None` after [`Sealer::compact`], rebuilt from `chain` by
    /// the next seal.
    cipher: Option<Cipher>,
    epoch_records: u64,
    epoch_start_ms: u64,
}

/// Seals records of our sending direction.
///
/// `Debug` shows the AEAD, epoch and counters, never a key.
pub struct Sealer {
    aead: Aead,
    policy: RatchetPolicy,
    kdf_context: Arc<[u8]>,
    /// `None` once closed; dropping erases the keys.
    keys: Option<SealKeys>,
    next_seq: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("aead", &self.aead)
            .field("policy", &self.policy)
            .field("epoch", &self.keys.as_ref().map(|k| k.epoch))
            .field("next_seq", &self.next_seq)
            .field("closed", &self.keys.is_none())
            .finish()
    }
}

impl Sealer {
    fn new(
        chain: Secret32,
        kdf_context: Arc<[u8]>,
        aead: Aead,
        policy: RatchetPolicy,
        now_ms: u64,
    ) -> Sealer {
        let cipher = keys::epoch_cipher(aead, &chain, &kdf_context);
        Sealer {
            aead,
            policy,
            kdf_context,
            keys: Some(SealKeys {
                epoch: 0,
                chain,
                cipher: Some(cipher),
                epoch_records: 0,
                epoch_start_ms: now_ms,
            }),
            next_seq: 0,
        }
    }

    /// Test hook: continue as if `seq` records had been sent.
    #[cfg(test)]
    pub(crate) fn skip_to_sequence(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// Seals `plaintext` (at most [`MAX_PLAINTEXT`] bytes) into one data record appended to
    /// `out`. Ratchets first if the policy says so.
    ///
    /// Errors: [`RecordError::TooLong`], [`RecordError::Closed`], [`RecordError::Exhausted`]
    /// (the sealer is closed from then on). On error nothing is appended.
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if self.keys.is_none() {
            return Err(RecordError::Closed);
        }
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(RecordError::TooLong);
        }
        self.seal_record(TYPE_DATA, plaintext, now_ms, out)
    }

    /// Appends the authenticated close record to `out` and closes the sealer (its keys are
    /// erased). Errors: [`RecordError::Closed`], [`RecordError::Exhausted`].
    pub fn seal_close(&mut self, now_ms: u64, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let r = self.seal_record(TYPE_CLOSE, &[], now_ms, out);
        if r.is_ok() {
            self.keys = None;
        }
        r
    }

    /// Sequence numbers used so far (records sealed, the close included).
    pub fn records_sent(&self) -> u64 {
        self.next_seq
    }

    /// The epoch of the next record, `None` once closed.
    pub fn epoch(&self) -> Option<u32> {
        self.keys.as_ref().map(|k| k.epoch)
    }

    /// The AEAD in use.
    pub fn aead(&self) -> Aead {
        self.aead
    }

    /// True once a close was sealed or the sequence numbers ran out.
    pub fn is_closed(&self) -> bool {
        self.keys.is_none()
    }

    /// Drops the expanded AEAD state of the current epoch (AES round keys and GHASH table, or
    /// the cipher instance) and keeps only the 32-byte chain key; the next [`Sealer::seal`]
    /// expands the key again (about a microsecond). For servers holding many idle channels:
    /// it cuts the memory of an idle direction to a few hundred bytes. Records are the same
    /// with or without compaction.
    pub fn compact(&mut self) {
        if let Some(k) = self.keys.as_mut() {
            k.cipher = None;
        }
    }

    fn seal_record(
        &mut self,
        ty: u8,
        plaintext: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let seq = self.next_seq;
        let Some(k) = self.keys.as_mut() else {
            return Err(RecordError::Closed);
        };
        if seq == u64::MAX {
            self.keys = None;
            return Err(RecordError::Exhausted);
        }
        let due = k.epoch_records >= self.policy.records_per_epoch()
            || now_ms.saturating_sub(k.epoch_start_ms) >= self.policy.every_ms;
        if due {
            let Some(next_epoch) = k.epoch.checked_add(1) else {
                self.keys = None;
                return Err(RecordError::Exhausted);
            };
            let chain = keys::ratchet(&k.chain, &self.kdf_context);
            // The assignments drop (and so erase) the old chain key and cipher; the new
            // cipher is expanded just below.
            k.cipher = None;
            k.chain = chain;
            k.epoch = next_epoch;
            k.epoch_records = 0;
            k.epoch_start_ms = now_ms;
        }

        let cipher = k
            .cipher
            .get_or_insert_with(|| keys::epoch_cipher(self.aead, &k.chain, &self.kdf_context));

        let start = out.len();
        out.reserve(RECORD_OVERHEAD + plaintext.len());
        out.push(ty);
        out.extend_from_slice(&k.epoch.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(plaintext);
        let tag = out
            .get_mut(start..)
            .and_then(|rec| rec.split_at_mut_checked(HEADER_LEN))
            .and_then(|(header, body)| cipher.seal(seq, header, body));
        let Some(tag) = tag else {
            out.truncate(start);
            return Err(RecordError::TooLong);
        };
        out.extend_from_slice(&tag);
        k.epoch_records += 1;
        self.next_seq = seq + 1;
        Ok(())
    }
}

/// The receiving direction's keys: the current epoch's chain key and AEAD state, and the
/// AEAD state of the epoch before (during its grace period). Later epochs are derived from
/// `chain` when their first record arrives.
struct OpenKeys {
    epoch: u32,
    chain: Secret32,
    /// `None` after [`Opener::compact`]; rebuilt from `chain` by the next record.
    current: Option<Cipher>,
    previous: Option<Cipher>,
    /// `now_ms` from which `previous` is dropped.
    previous_until_ms: u64,
}

/// Which key opens a record, decided before any AEAD work.
enum Slot {
    Current,
    Previous,
    /// `epoch + skip` (skip >= 1), derived on the spot: its cipher, the chain key of the epoch
    /// before it (to keep that epoch's cipher as `previous` when skip > 1) and its own chain
    /// key. They replace the stored keys only if the record authenticates.
    Ahead(Cipher, Option<Secret32>, Secret32),
}

/// Opens records of the peer's sending direction.
///
/// `Debug` shows the AEAD, epoch and counters, never a key.
pub struct Opener {
    aead: Aead,
    prev_grace_ms: u64,
    kdf_context: Arc<[u8]>,
    /// `None` once closed; dropping erases the keys.
    keys: Option<OpenKeys>,
    window: ReplayWindow,
    received: u64,
    /// Stream transports: only the next sequence number is acceptable.
    in_order: bool,
    /// Copy of the ciphertext while a record is opened (ring backend only; stays empty with
    /// RustCrypto). Holds no secret.
    scratch: Vec<u8>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("aead", &self.aead)
            .field("epoch", &self.keys.as_ref().map(|k| k.epoch))
            .field("records_received", &self.received)
            .field("closed", &self.keys.is_none())
            .finish()
    }
}

impl Opener {
    fn new(chain: Secret32, kdf_context: Arc<[u8]>, aead: Aead, policy: RatchetPolicy) -> Opener {
        let current = keys::epoch_cipher(aead, &chain, &kdf_context);
        Opener {
            aead,
            prev_grace_ms: policy.every_ms,
            kdf_context,
            keys: Some(OpenKeys {
                epoch: 0,
                chain,
                current: Some(current),
                previous: None,
                previous_until_ms: 0,
            }),
            window: ReplayWindow::new(),
            received: 0,
            in_order: false,
            scratch: Vec::new(),
        }
    }

    /// Accept only the next record in sequence (for transports that neither lose nor reorder,
    /// such as TCP): any gap or reordering is then an attack and fails with
    /// [`RecordError::OutOfOrder`] instead of being tolerated by the replay window.
    pub fn require_in_order(&mut self) {
        self.in_order = true;
    }

    /// Drops the expanded AEAD state (current epoch and the previous one's grace copy) and
    /// the reusable scratch buffer, keeping only the 32-byte chain key; the next record
    /// expands the key again. A record of the previous epoch that arrives after compaction
    /// is refused as [`RecordError::StaleEpoch`]. See [`Sealer::compact`].
    pub fn compact(&mut self) {
        if let Some(k) = self.keys.as_mut() {
            k.current = None;
            k.previous = None;
        }
        self.scratch = Vec::new();
    }

    /// Authenticates and decrypts one record in place.
    ///
    /// On success returns the plaintext (a sub-slice of `record`) or [`Opened::Close`], after
    /// which the opener is closed and its keys erased. On error the record is refused, the
    /// opener's state is unchanged (except the time-based erasure of the previous epoch's key)
    /// and `record` is left as it was.
    pub fn open<'a>(
        &mut self,
        record: &'a mut [u8],
        now_ms: u64,
    ) -> Result<Opened<'a>, RecordError> {
        let Some(k) = self.keys.as_mut() else {
            return Err(RecordError::Closed);
        };
        if record.len() < RECORD_OVERHEAD {
            return Err(RecordError::Truncated);
        }
        if record.len() > MAX_RECORD_LEN {
            return Err(RecordError::TooLong);
        }
        let (header, rest) = record
            .split_first_chunk_mut::<HEADER_LEN>()
            .ok_or(RecordError::Truncated)?;
        let [ty, e0, e1, e2, e3, s0, s1, s2, s3, s4, s5, s6, s7] = *header;
        let close = match ty {
            TYPE_DATA => false,
            TYPE_CLOSE if rest.len() == TAG_LEN => true,
            _ => return Err(RecordError::BadType),
        };
        let epoch = u32::from_be_bytes([e0, e1, e2, e3]);
        let seq = u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        self.window.check(seq)?;
        if self.in_order && seq != self.window.next_expected() {
            return Err(RecordError::OutOfOrder);
        }

        if k.previous.is_some() && now_ms >= k.previous_until_ms {
            k.previous = None;
        }
        let slot = if epoch == k.epoch {
            Slot::Current
        } else if epoch < k.epoch {
            if epoch + 1 == k.epoch && k.previous.is_some() {
                Slot::Previous
            } else {
                return Err(RecordError::StaleEpoch);
            }
        } else {
            // `epoch > k.epoch` here, so the subtraction cannot wrap.
            let skip = epoch - k.epoch;
            if skip > MAX_EPOCH_SKIP {
                return Err(RecordError::EpochTooFar);
            }
            // Derive epoch+1 ..= epoch+skip from the current chain key, keeping the last two.
            let mut before = None;
            let mut at = keys::ratchet(&k.chain, &self.kdf_context);
            for _ in 1..skip {
                let after = keys::ratchet(&at, &self.kdf_context);
                before = Some(core::mem::replace(&mut at, after));
            }
            let cipher = keys::epoch_cipher(self.aead, &at, &self.kdf_context);
            Slot::Ahead(cipher, before, at)
        };

        let (ct, tag) = rest
            .split_last_chunk_mut::<TAG_LEN>()
            .ok_or(RecordError::Truncated)?;
        let cipher = match &slot {
            Slot::Current => {
                let (aead, chain, ctx) = (self.aead, &k.chain, &self.kdf_context);
                k.current
                    .get_or_insert_with(|| keys::epoch_cipher(aead, chain, ctx))
            }
            Slot::Previous => match &k.previous {
                Some(c) => c,
                None => return Err(RecordError::StaleEpoch),
            },
            Slot::Ahead(c, _, _) => c,
        };
        if !cipher.open(seq, &header[..], ct, tag, &mut self.scratch) {
            return Err(RecordError::BadTag);
        }

        // Authentic: commit.
        self.window.mark(seq);
        self.received += 1;
        match slot {
            Slot::Current | Slot::Previous => {}
            Slot::Ahead(cipher, before, at) => {
                // The epoch just before the new one stays openable for the grace period:
                // the old current one when skipping one epoch, else rebuilt from `before`.
                k.previous = match before {
                    None => k.current.take(),
                    Some(chain) => Some(keys::epoch_cipher(self.aead, &chain, &self.kdf_context)),
                };
                // The assignments drop (and so erase) the old chain key and cipher.
                k.current = Some(cipher);
                k.chain = at;
                k.epoch = epoch;
                k.previous_until_ms = now_ms.saturating_add(self.prev_grace_ms);
            }
        }
        if close {
            self.keys = None;
            return Ok(Opened::Close);
        }
        Ok(Opened::Data(ct))
    }

    /// Whether a close record was received.
    pub fn is_closed(&self) -> bool {
        self.keys.is_none()
    }

    /// Records opened successfully (the close included).
    pub fn records_received(&self) -> u64 {
        self.received
    }

    /// The receiver's current epoch, `None` once closed.
    pub fn epoch(&self) -> Option<u32> {
        self.keys.as_ref().map(|k| k.epoch)
    }

    /// The AEAD in use.
    pub fn aead(&self) -> Aead {
        self.aead
    }
}

/// The AEAD protecting channel records, negotiated in Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aead {
    /// AES-256-GCM (preferred where the CPU has AES instructions).
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    ChaCha20Poly1305,
}

impl Aead {
    /// The 4-byte identifier advertised in the Hello cipher list (plain ZRTP peers ignore it).
    pub fn wire_id(self) -> [u8; 4] {
        match self {
            Aead::Aes256Gcm => *b"KGCM",
            Aead::ChaCha20Poly1305 => *b"KC20",
        }
    }

    /// Parses a Hello cipher-list entry.
    pub fn from_wire_id(id: &[u8; 4]) -> Option<Aead> {
        match id {
            b"KGCM" => Some(Aead::Aes256Gcm),
            b"KC20" => Some(Aead::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// This machine's preference: AES-256-GCM first when the CPU has AES and carry-less
    /// multiply instructions, ChaCha20-Poly1305 first otherwise.
    pub fn local_preference() -> [Aead; 2] {
        if has_aes_instructions() {
            [Aead::Aes256Gcm, Aead::ChaCha20Poly1305]
        } else {
            [Aead::ChaCha20Poly1305, Aead::Aes256Gcm]
        }
    }

    /// Stable lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Aead::Aes256Gcm => "aes-256-gcm",
            Aead::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn has_aes_instructions() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn has_aes_instructions() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
fn has_aes_instructions() -> bool {
    false
}
