//! Versioned binary encoding of the stored values, each record sealed with a checksum.
//!
//! Every record is `tag ‖ version ‖ body ‖ check`, where `check` is the first 16 bytes of
//! `SHA-256("keav-store/v1" ‖ len(key) ‖ key ‖ tag ‖ version ‖ body)`. Binding the table key
//! into the checksum also catches a record copied under another peer's key. Decoding verifies
//! the checksum first, then parses with a bounds-checked reader that must consume every byte;
//! any failure yields `None` (the caller reports it as corruption) and never a panic.

use crate::{Identity, PeerId, PeerRecord};
use keav_proto::cache::{Mode, PeerCache, Verification, Zid};
use keav_proto::secret::Secret32;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const PEER_TAG: u8 = b'P';
const PEER_VERSION: u8 = 1;
const IDENTITY_TAG: u8 = b'I';
const IDENTITY_VERSION: u8 = 1;
const CHECK_LEN: usize = 16;

/// Longest accepted peer label, in bytes.
pub(crate) const MAX_LABEL_LEN: usize = 255;

// Presence flags of the optional fields of a peer record.
const F_ZID: u16 = 1 << 0;
const F_LABEL: u16 = 1 << 1;
const F_RS1: u16 = 1 << 2;
const F_RS2: u16 = 1 << 3;
const F_EXPIRES: u16 = 1 << 4;
const F_VERIFY_DUE: u16 = 1 << 5;
const F_LOCKED: u16 = 1 << 6;
const F_LAST_FAILURE: u16 = 1 << 7;
const F_LAST_VERIFICATION: u16 = 1 << 8;
const F_ALL: u16 = (1 << 9) - 1;

fn check(key: &[u8], sealed_part: &[u8]) -> [u8; CHECK_LEN] {
    let mut h = Sha256::new();
    h.update(b"keav-store/v1");
    h.update((key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(sealed_part);
    let digest = h.finalize();
    let mut out = [0u8; CHECK_LEN];
    for (o, d) in out.iter_mut().zip(digest.iter()) {
        *o = *d;
    }
    out
}

/// Appends the checksum to `buf` (which holds tag, version and body).
pub(crate) fn seal(key: &[u8], mut buf: Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
    let c = check(key, &buf);
    buf.extend_from_slice(&c);
    buf
}

/// Verifies the checksum and returns the sealed part (tag, version, body).
pub(crate) fn unseal<'a>(key: &[u8], bytes: &'a [u8]) -> Option<&'a [u8]> {
    let split = bytes.len().checked_sub(CHECK_LEN)?;
    let (sealed, c) = bytes.split_at(split);
    let expected = check(key, sealed);
    if bool::from(expected.ct_eq(c)) {
        Some(sealed)
    } else {
        None
    }
}

/// Bounds-checked reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }

    fn secret(&mut self) -> Option<Secret32> {
        Secret32::from_slice(self.take(32)?)
    }

    fn finish(self) -> Option<()> {
        self.buf.is_empty().then_some(())
    }
}

fn verification_code(v: Verification) -> u8 {
    match v {
        Verification::Bound => 0,
        Verification::Unbound => 1,
        Verification::Skipped => 2,
        Verification::NotSupported => 3,
    }
}

fn verification_from_code(c: u8) -> Option<Verification> {
    Some(match c {
        0 => Verification::Bound,
        1 => Verification::Unbound,
        2 => Verification::Skipped,
        3 => Verification::NotSupported,
        _ => return None,
    })
}

fn mode_from(code: u8, verify_every: u32) -> Option<Mode> {
    match (code, verify_every) {
        (0, 0) => Some(Mode::NoContinuity),
        (1, n) => Some(Mode::Normal { verify_every: n }),
        (2, 0) => Some(Mode::Paranoid),
        _ => None,
    }
}

/// Encodes a peer record (stored under key `rec.id`).
pub(crate) fn encode_peer(rec: &PeerRecord) -> Zeroizing<Vec<u8>> {
    let c = &rec.cache;
    let mut flags = 0u16;
    let mut set = |cond: bool, bit: u16| {
        if cond {
            flags |= bit;
        }
    };
    set(rec.zid.is_some(), F_ZID);
    set(rec.label.is_some(), F_LABEL);
    set(c.rs1.is_some(), F_RS1);
    set(c.rs2.is_some(), F_RS2);
    set(c.expires_at.is_some(), F_EXPIRES);
    set(c.verify_due, F_VERIFY_DUE);
    set(c.locked_until.is_some(), F_LOCKED);
    set(rec.last_failure_at.is_some(), F_LAST_FAILURE);
    set(rec.last_verification.is_some(), F_LAST_VERIFICATION);

    let mut b = Zeroizing::new(Vec::with_capacity(256));
    b.push(PEER_TAG);
    b.push(PEER_VERSION);
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&rec.id);
    if let Some(z) = rec.zid {
        b.extend_from_slice(&z.0);
    }
    if let Some(label) = &rec.label {
        // Labels are validated to 1..=MAX_LABEL_LEN bytes before they reach the encoder;
        // clamp anyway so that the length byte always matches what follows.
        let bytes = label.as_bytes();
        let n = bytes.len().min(MAX_LABEL_LEN);
        b.push(n as u8);
        b.extend_from_slice(bytes.get(..n).unwrap_or_default());
    }
    let verify_every = match rec.mode {
        Mode::Normal { verify_every } => verify_every,
        _ => 0,
    };
    b.push(rec.mode.code());
    b.extend_from_slice(&verify_every.to_le_bytes());
    if let Some(s) = &c.rs1 {
        b.extend_from_slice(s.expose());
    }
    if let Some(s) = &c.rs2 {
        b.extend_from_slice(s.expose());
    }
    if let Some(t) = c.expires_at {
        b.extend_from_slice(&t.to_le_bytes());
    }
    b.extend_from_slice(&c.sessions.to_le_bytes());
    if let Some(t) = c.locked_until {
        b.extend_from_slice(&t.to_le_bytes());
    }
    b.extend_from_slice(&rec.verify_failures.to_le_bytes());
    if let Some(t) = rec.last_failure_at {
        b.extend_from_slice(&t.to_le_bytes());
    }
    if let Some((n, v)) = rec.last_verification {
        b.extend_from_slice(&n.to_le_bytes());
        b.push(verification_code(v));
    }
    b.extend_from_slice(&rec.created_at.to_le_bytes());
    b.extend_from_slice(&rec.updated_at.to_le_bytes());
    seal(&rec.id, b)
}

/// Decodes and verifies a peer record stored under key `id`.
pub(crate) fn decode_peer(id: &PeerId, bytes: &[u8]) -> Option<PeerRecord> {
    let sealed = unseal(id, bytes)?;
    let mut r = Reader { buf: sealed };
    if r.u8()? != PEER_TAG || r.u8()? != PEER_VERSION {
        return None;
    }
    let flags = r.u16()?;
    if flags & !F_ALL != 0 {
        return None;
    }
    let has = |bit: u16| flags & bit != 0;
    let stored_id: PeerId = r.array()?;
    if stored_id != *id {
        return None;
    }
    let zid = if has(F_ZID) {
        Some(Zid(r.array()?))
    } else {
        None
    };
    let label = if has(F_LABEL) {
        let n = usize::from(r.u8()?);
        if n == 0 {
            return None;
        }
        Some(String::from_utf8(r.take(n)?.to_vec()).ok()?)
    } else {
        None
    };
    let code = r.u8()?;
    let verify_every = r.u32()?;
    let mode = mode_from(code, verify_every)?;
    let rs1 = if has(F_RS1) { Some(r.secret()?) } else { None };
    let rs2 = if has(F_RS2) { Some(r.secret()?) } else { None };
    let expires_at = if has(F_EXPIRES) { Some(r.u64()?) } else { None };
    let sessions = r.u64()?;
    let locked_until = if has(F_LOCKED) { Some(r.u64()?) } else { None };
    let verify_failures = r.u32()?;
    let last_failure_at = if has(F_LAST_FAILURE) {
        Some(r.u64()?)
    } else {
        None
    };
    let last_verification = if has(F_LAST_VERIFICATION) {
        let n = r.u64()?;
        Some((n, verification_from_code(r.u8()?)?))
    } else {
        None
    };
    let created_at = r.u64()?;
    let updated_at = r.u64()?;
    r.finish()?;
    Some(PeerRecord {
        id: *id,
        zid,
        label,
        mode,
        cache: PeerCache {
            rs1,
            rs2,
            expires_at,
            sessions,
            verify_due: has(F_VERIFY_DUE),
            locked_until,
        },
        verify_failures,
        last_failure_at,
        last_verification,
        created_at,
        updated_at,
    })
}

/// Encodes the device identity (stored under key `key`).
pub(crate) fn encode_identity(key: &[u8], id: &Identity) -> Zeroizing<Vec<u8>> {
    let mut b = Zeroizing::new(Vec::with_capacity(40));
    b.push(IDENTITY_TAG);
    b.push(IDENTITY_VERSION);
    b.extend_from_slice(&id.zid.0);
    b.extend_from_slice(&id.created_at.to_le_bytes());
    seal(key, b)
}

/// Decodes and verifies the device identity.
pub(crate) fn decode_identity(key: &[u8], bytes: &[u8]) -> Option<Identity> {
    let sealed = unseal(key, bytes)?;
    let mut r = Reader { buf: sealed };
    if r.u8()? != IDENTITY_TAG || r.u8()? != IDENTITY_VERSION {
        return None;
    }
    let zid = Zid(r.array()?);
    let created_at = r.u64()?;
    r.finish()?;
    Some(Identity { zid, created_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PeerRecord {
        PeerRecord {
            id: [7; 16],
            zid: Some(Zid([9; 12])),
            label: Some("kitchen-sensor".into()),
            mode: Mode::Normal { verify_every: 7 },
            cache: PeerCache {
                rs1: Some(Secret32::new([1; 32])),
                rs2: Some(Secret32::new([2; 32])),
                expires_at: Some(1_000),
                sessions: 42,
                verify_due: true,
                locked_until: Some(77),
            },
            verify_failures: 3,
            last_failure_at: Some(66),
            last_verification: Some((41, Verification::Unbound)),
            created_at: 5,
            updated_at: 6,
        }
    }

    #[test]
    fn peer_round_trip_full_and_empty() {
        let rec = sample();
        let enc = encode_peer(&rec);
        assert_eq!(decode_peer(&rec.id, &enc), Some(rec.clone()));

        let bare = PeerRecord {
            id: [3; 16],
            zid: None,
            label: None,
            mode: Mode::Paranoid,
            cache: PeerCache::default(),
            verify_failures: 0,
            last_failure_at: None,
            last_verification: None,
            created_at: 0,
            updated_at: 0,
        };
        let enc = encode_peer(&bare);
        assert_eq!(decode_peer(&bare.id, &enc), Some(bare));
    }

    #[test]
    fn every_single_bit_flip_and_truncation_is_rejected() {
        let rec = sample();
        let enc = encode_peer(&rec);
        for i in 0..enc.len() {
            for bit in 0..8 {
                let mut bad = enc.to_vec();
                bad[i] ^= 1 << bit;
                assert!(decode_peer(&rec.id, &bad).is_none(), "flip {i}/{bit}");
            }
        }
        for n in 0..enc.len() {
            assert!(
                decode_peer(&rec.id, &enc[..n]).is_none(),
                "truncated to {n}"
            );
        }
    }

    #[test]
    fn record_under_another_key_is_rejected() {
        let rec = sample();
        let enc = encode_peer(&rec);
        assert!(decode_peer(&[8; 16], &enc).is_none());
    }

    #[test]
    fn identity_round_trip_and_flip() {
        let id = Identity {
            zid: Zid([0xA5; 12]),
            created_at: 123,
        };
        let enc = encode_identity(b"identity", &id);
        assert_eq!(decode_identity(b"identity", &enc), Some(id));
        let mut bad = enc.to_vec();
        bad[3] ^= 0x10;
        assert!(decode_identity(b"identity", &bad).is_none());
    }
}
