//! Persisted record-layer state: what a durable channel writes to disk so that a [`Sealer`]
//! or an [`Opener`] survives a restart (docs/MESSAGING.md, "Durable channels").
//!
//! [`Sealer::export_state`] / [`Sealer::from_state`] and [`Opener::export_state`] /
//! [`Opener::from_state`] convert between the live objects and [`SealerState`] /
//! [`OpenerState`]; `encode` / `decode` convert those to and from bytes. The AEAD state is
//! never stored: it is rebuilt from the chain key by the first record after a restore, as
//! after [`Sealer::compact`].
//!
//! The format and what it keeps are documented in the record layer's docs
//! ([`crate::record`], "Persisted state").

use core::fmt;
use std::sync::Arc;

use zeroize::{Zeroize, Zeroizing};

use super::window::{position as window_position, ReplayWindow, REPLAY_WINDOW, WORDS};
use super::{Aead, OpenKeys, Opener, RatchetPolicy, RecordError, SealKeys, Sealer};
use crate::codec::Reader;
use crate::secret::Secret32;

/// Longest KDF context a state may carry (the session's is 56 bytes: two ZIDs and a hash).
pub const MAX_STATE_KDF_CONTEXT: usize = 256;

const SEALER_MAGIC: &[u8; 4] = b"KVSS";
const OPENER_MAGIC: &[u8; 4] = b"KVOS";
const VERSION: u8 = 1;
const FLAG_IN_ORDER: u8 = 0x01;
const FLAG_WINDOW: u8 = 0x02;

/// The persisted state of a [`Sealer`] (see ["Persisted state"](crate::record#persisted-state)).
///
/// `Debug` shows the AEAD, epoch and counters, never the chain key; the chain key erases
/// itself when the state is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SealerState {
    aead: Aead,
    policy: RatchetPolicy,
    kdf_context: Vec<u8>,
    epoch: u32,
    chain: Secret32,
    next_seq: u64,
    epoch_records: u64,
}

/// The persisted state of an [`Opener`] (see ["Persisted state"](crate::record#persisted-state)).
///
/// `Debug` shows the AEAD, epoch and counters, never the chain key; the chain key erases
/// itself when the state is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenerState {
    aead: Aead,
    grace_ms: u64,
    kdf_context: Vec<u8>,
    epoch: u32,
    chain: Secret32,
    in_order: bool,
    highest: Option<u64>,
    bits: [u64; WORDS],
    received: u64,
}

impl fmt::Debug for SealerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealerState")
            .field("aead", &self.aead)
            .field("policy", &self.policy)
            .field("epoch", &self.epoch)
            .field("next_seq", &self.next_seq)
            .field("epoch_records", &self.epoch_records)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for OpenerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenerState")
            .field("aead", &self.aead)
            .field("epoch", &self.epoch)
            .field("highest", &self.highest)
            .field("received", &self.received)
            .field("in_order", &self.in_order)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// The state to persist, `None` once the sealer is closed. Store it before any record
    /// sealed after this call leaves the process.
    pub fn export_state(&self) -> Option<SealerState> {
        let k = self.keys.as_ref()?;
        Some(SealerState {
            aead: self.aead,
            policy: self.policy,
            kdf_context: self.kdf_context.to_vec(),
            epoch: k.epoch,
            chain: k.chain.clone(),
            next_seq: self.next_seq,
            epoch_records: k.epoch_records,
        })
    }

    /// A sealer continuing from `state`: the next record gets `state`'s next sequence number.
    /// The epoch's time window restarts at `now_ms`. Fails with [`RecordError::BadState`] on
    /// a state no sealer can reach (only possible for states built by hand; decoded states
    /// are already checked).
    pub fn from_state(state: &SealerState, now_ms: u64) -> Result<Sealer, RecordError> {
        state.validate()?;
        Ok(Sealer {
            aead: state.aead,
            policy: state.policy,
            kdf_context: Arc::from(state.kdf_context.as_slice()),
            keys: Some(SealKeys {
                epoch: state.epoch,
                chain: state.chain.clone(),
                cipher: None,
                epoch_records: state.epoch_records,
                epoch_start_ms: now_ms,
            }),
            next_seq: state.next_seq,
        })
    }
}

impl Opener {
    /// The state to persist, `None` once the opener is closed. The previous epoch's grace
    /// copy is not part of it.
    pub fn export_state(&self) -> Option<OpenerState> {
        let k = self.keys.as_ref()?;
        let (highest, bits) = self.window.parts();
        Some(OpenerState {
            aead: self.aead,
            grace_ms: self.prev_grace_ms,
            kdf_context: self.kdf_context.to_vec(),
            epoch: k.epoch,
            chain: k.chain.clone(),
            in_order: self.in_order,
            highest,
            bits,
            received: self.received,
        })
    }

    /// An opener continuing from `state`: records accepted before the export are refused as
    /// replays, and records of the epoch before `state`'s are refused as
    /// [`RecordError::StaleEpoch`]. `now_ms` is accepted for symmetry with
    /// [`Sealer::from_state`]; the opener keeps no timer across a restore.
    pub fn from_state(state: &OpenerState, now_ms: u64) -> Result<Opener, RecordError> {
        let _ = now_ms;
        state.validate()?;
        Ok(Opener {
            aead: state.aead,
            prev_grace_ms: state.grace_ms,
            kdf_context: Arc::from(state.kdf_context.as_slice()),
            keys: Some(OpenKeys {
                epoch: state.epoch,
                chain: state.chain.clone(),
                current: None,
                previous: None,
                previous_until_ms: 0,
            }),
            window: ReplayWindow::from_parts(state.highest, state.bits),
            received: state.received,
            in_order: state.in_order,
            scratch: Vec::new(),
        })
    }
}

fn bad(_: crate::ParseError) -> RecordError {
    RecordError::BadState("truncated")
}

fn read_u64(r: &mut Reader<'_>) -> Result<u64, RecordError> {
    Ok(u64::from_be_bytes(r.array().map_err(bad)?))
}

/// Magic and version.
fn read_header(r: &mut Reader<'_>, magic: &[u8; 4]) -> Result<(), RecordError> {
    if r.array::<4>().map_err(bad)? != *magic {
        return Err(RecordError::BadState("magic"));
    }
    if r.u8().map_err(bad)? != VERSION {
        return Err(RecordError::BadState("version"));
    }
    Ok(())
}

fn read_aead(r: &mut Reader<'_>) -> Result<Aead, RecordError> {
    Aead::from_wire_id(&r.array().map_err(bad)?).ok_or(RecordError::BadState("aead"))
}

fn read_context(r: &mut Reader<'_>) -> Result<Vec<u8>, RecordError> {
    let len = usize::from(r.u16().map_err(bad)?);
    if len > MAX_STATE_KDF_CONTEXT {
        return Err(RecordError::BadState("kdf context length"));
    }
    Ok(r.take(len).map_err(bad)?.to_vec())
}

fn read_chain(r: &mut Reader<'_>) -> Result<Secret32, RecordError> {
    let mut bytes = r.array::<32>().map_err(bad)?;
    let chain = Secret32::new(bytes);
    bytes.zeroize();
    Ok(chain)
}

fn write_context(out: &mut Vec<u8>, ctx: &[u8]) {
    // `validate` bounds the length, so the cast cannot truncate for a state that exists.
    let len = u16::try_from(ctx.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(ctx.get(..usize::from(len)).unwrap_or(ctx));
}

fn check_context(ctx: &[u8]) -> Result<(), RecordError> {
    if ctx.len() > MAX_STATE_KDF_CONTEXT {
        return Err(RecordError::BadState("kdf context length"));
    }
    Ok(())
}

impl SealerState {
    /// Encoded length with a context of `ctx_len` bytes.
    fn encoded_len(ctx_len: usize) -> usize {
        4 + 1 + 4 + 1 + 8 + 2 + ctx_len + 4 + 32 + 8 + 8
    }

    /// The versioned encoding (see ["Persisted state"](crate::record#persisted-state)), in a buffer that erases itself.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        // Sized up front so that no reallocation leaves a copy of the key behind.
        let mut out = Zeroizing::new(Vec::with_capacity(Self::encoded_len(
            self.kdf_context.len(),
        )));
        out.extend_from_slice(SEALER_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.aead.wire_id());
        out.push(self.policy.every_records_log2);
        out.extend_from_slice(&self.policy.every_ms.to_be_bytes());
        write_context(&mut out, &self.kdf_context);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(self.chain.expose());
        out.extend_from_slice(&self.next_seq.to_be_bytes());
        out.extend_from_slice(&self.epoch_records.to_be_bytes());
        out
    }

    /// Parses and validates an encoded state; any other input is
    /// [`RecordError::BadState`].
    pub fn decode(bytes: &[u8]) -> Result<SealerState, RecordError> {
        let mut r = Reader::new(bytes);
        read_header(&mut r, SEALER_MAGIC)?;
        let aead = read_aead(&mut r)?;
        let every_records_log2 = r.u8().map_err(bad)?;
        let every_ms = read_u64(&mut r)?;
        let kdf_context = read_context(&mut r)?;
        let epoch = r.u32().map_err(bad)?;
        let chain = read_chain(&mut r)?;
        let next_seq = read_u64(&mut r)?;
        let epoch_records = read_u64(&mut r)?;
        if r.remaining() != 0 {
            return Err(RecordError::BadState("trailing bytes"));
        }
        let state = SealerState {
            aead,
            policy: RatchetPolicy {
                every_records_log2,
                every_ms,
            },
            kdf_context,
            epoch,
            chain,
            next_seq,
            epoch_records,
        };
        state.validate()?;
        Ok(state)
    }

    /// Refuses states no sealer can reach.
    fn validate(&self) -> Result<(), RecordError> {
        check_context(&self.kdf_context)?;
        if self.next_seq == u64::MAX {
            return Err(RecordError::BadState("sequence numbers exhausted"));
        }
        if self.epoch_records > self.next_seq {
            return Err(RecordError::BadState(
                "records in epoch exceed records sealed",
            ));
        }
        if self.epoch_records > self.policy.records_per_epoch() {
            return Err(RecordError::BadState("records in epoch exceed the policy"));
        }
        // Every ratchet is followed by a record in the new epoch.
        if self.epoch > 0 && (self.epoch_records == 0 || u64::from(self.epoch) > self.next_seq) {
            return Err(RecordError::BadState("epoch ahead of sequence numbers"));
        }
        Ok(())
    }

    /// The AEAD of the channel.
    pub fn aead(&self) -> Aead {
        self.aead
    }

    /// The ratchet policy.
    pub fn policy(&self) -> RatchetPolicy {
        self.policy
    }

    /// The epoch of the next record (unless the policy ratchets first).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The sequence number the next record will carry.
    pub fn next_sequence(&self) -> u64 {
        self.next_seq
    }

    /// Records sealed in the current epoch.
    pub fn epoch_records(&self) -> u64 {
        self.epoch_records
    }
}

impl OpenerState {
    fn encoded_len(ctx_len: usize) -> usize {
        4 + 1 + 4 + 8 + 2 + ctx_len + 4 + 32 + 1 + 8 + 8 * WORDS + 8
    }

    /// The versioned encoding (see ["Persisted state"](crate::record#persisted-state)), in a buffer that erases itself.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(Self::encoded_len(
            self.kdf_context.len(),
        )));
        out.extend_from_slice(OPENER_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.aead.wire_id());
        out.extend_from_slice(&self.grace_ms.to_be_bytes());
        write_context(&mut out, &self.kdf_context);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(self.chain.expose());
        let mut flags = 0;
        if self.in_order {
            flags |= FLAG_IN_ORDER;
        }
        if self.highest.is_some() {
            flags |= FLAG_WINDOW;
        }
        out.push(flags);
        out.extend_from_slice(&self.highest.unwrap_or(0).to_be_bytes());
        for w in &self.bits {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend_from_slice(&self.received.to_be_bytes());
        out
    }

    /// Parses and validates an encoded state; any other input is
    /// [`RecordError::BadState`].
    pub fn decode(bytes: &[u8]) -> Result<OpenerState, RecordError> {
        let mut r = Reader::new(bytes);
        read_header(&mut r, OPENER_MAGIC)?;
        let aead = read_aead(&mut r)?;
        let grace_ms = read_u64(&mut r)?;
        let kdf_context = read_context(&mut r)?;
        let epoch = r.u32().map_err(bad)?;
        let chain = read_chain(&mut r)?;
        let flags = r.u8().map_err(bad)?;
        if flags & !(FLAG_IN_ORDER | FLAG_WINDOW) != 0 {
            return Err(RecordError::BadState("unknown flags"));
        }
        let highest_raw = read_u64(&mut r)?;
        let mut bits = [0u64; WORDS];
        for w in &mut bits {
            *w = read_u64(&mut r)?;
        }
        let received = read_u64(&mut r)?;
        if r.remaining() != 0 {
            return Err(RecordError::BadState("trailing bytes"));
        }
        let highest = if flags & FLAG_WINDOW != 0 {
            Some(highest_raw)
        } else if highest_raw != 0 {
            return Err(RecordError::BadState("highest set in an empty window"));
        } else {
            None
        };
        let state = OpenerState {
            aead,
            grace_ms,
            kdf_context,
            epoch,
            chain,
            in_order: flags & FLAG_IN_ORDER != 0,
            highest,
            bits,
            received,
        };
        state.validate()?;
        Ok(state)
    }

    /// Refuses states no opener can reach.
    fn validate(&self) -> Result<(), RecordError> {
        check_context(&self.kdf_context)?;
        let set: u64 = self.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        let Some(h) = self.highest else {
            if set != 0 || self.received != 0 || self.epoch != 0 {
                return Err(RecordError::BadState("empty window with records"));
            }
            return Ok(());
        };
        let (w, m) = window_position(h);
        if self.bits.get(w).is_none_or(|b| b & m == 0) {
            return Err(RecordError::BadState("highest not marked"));
        }
        if h < REPLAY_WINDOW - 1 {
            // Ring positions above the highest number were never accepted.
            for s in h + 1..REPLAY_WINDOW {
                let (w, m) = window_position(s);
                if self.bits.get(w).is_none_or(|b| b & m != 0) {
                    return Err(RecordError::BadState("window bit above highest"));
                }
            }
        }
        if set > self.received {
            return Err(RecordError::BadState("window holds more than received"));
        }
        if h.checked_add(1).is_some_and(|n| self.received > n) {
            return Err(RecordError::BadState("received exceeds highest"));
        }
        // A record of epoch e carries a sequence number of at least e.
        if u64::from(self.epoch) > h {
            return Err(RecordError::BadState("epoch ahead of sequence numbers"));
        }
        Ok(())
    }

    /// The AEAD of the channel.
    pub fn aead(&self) -> Aead {
        self.aead
    }

    /// The receiver's epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The highest sequence number accepted, `None` before the first record.
    pub fn highest_sequence(&self) -> Option<u64> {
        self.highest
    }

    /// Records opened before the export.
    pub fn records_received(&self) -> u64 {
        self.received
    }

    /// Whether the opener accepts only the next record in sequence.
    pub fn in_order(&self) -> bool {
        self.in_order
    }
}
