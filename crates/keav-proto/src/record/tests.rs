//! Unit tests that need to reach inside the sealer (sequence and epoch exhaustion).

use super::*;

fn pair(aead: Aead) -> (Sealer, Opener) {
    let k = Secret32::new([9; 32]);
    let (s, _) = channel_from_parts(
        &k,
        b"ctx",
        Role::Initiator,
        aead,
        RatchetPolicy::default(),
        0,
    );
    let (_, o) = channel_from_parts(
        &k,
        b"ctx",
        Role::Responder,
        aead,
        RatchetPolicy::default(),
        0,
    );
    (s, o)
}

fn open_seq(o: &mut Opener, rec: &[u8]) -> Result<u64, RecordError> {
    let mut buf = rec.to_vec();
    o.open(&mut buf, 0)?;
    Ok(u64::from_be_bytes(rec[5..13].try_into().unwrap()))
}

#[test]
fn sequence_exhaustion_closes_instead_of_wrapping() {
    for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
        let (mut s, mut o) = pair(aead);
        s.skip_to_sequence(u64::MAX - 2);
        let mut a = Vec::new();
        s.seal(b"a", 0, &mut a).unwrap();
        let mut b = Vec::new();
        s.seal(b"b", 0, &mut b).unwrap();
        assert_eq!(s.records_sent(), u64::MAX);
        let mut c = Vec::new();
        assert_eq!(s.seal(b"c", 0, &mut c), Err(RecordError::Exhausted));
        assert!(c.is_empty());
        assert!(s.is_closed());
        assert_eq!(s.seal(b"c", 0, &mut c), Err(RecordError::Closed));
        assert_eq!(s.seal_close(0, &mut c), Err(RecordError::Closed));
        assert_eq!(s.records_sent(), u64::MAX, "never wrapped");
        assert!(c.is_empty());
        assert_eq!(open_seq(&mut o, &b), Ok(u64::MAX - 1));
        assert_eq!(open_seq(&mut o, &a), Ok(u64::MAX - 2));
        assert_eq!(open_seq(&mut o, &a), Err(RecordError::Replay));
        assert_eq!(o.window.highest(), Some(u64::MAX - 1));
    }
}

#[test]
fn close_can_use_the_last_sequence_number() {
    let (mut s, mut o) = pair(Aead::Aes256Gcm);
    s.skip_to_sequence(u64::MAX - 1);
    let mut c = Vec::new();
    s.seal_close(0, &mut c).unwrap();
    let mut buf = c.clone();
    assert_eq!(o.open(&mut buf, 0), Ok(Opened::Close));
    let mut s2 = pair(Aead::Aes256Gcm).0;
    s2.skip_to_sequence(u64::MAX);
    assert_eq!(s2.seal_close(0, &mut c), Err(RecordError::Exhausted));
}

#[test]
fn epoch_exhaustion_closes() {
    let (mut s, _) = pair(Aead::ChaCha20Poly1305);
    s.policy.every_records_log2 = 0;
    if let Some(k) = s.keys.as_mut() {
        k.epoch = u32::MAX - 1;
    }
    let mut out = Vec::new();
    s.seal(b"x", 0, &mut out).unwrap(); // epoch MAX-1 still has room for one record
    s.seal(b"y", 0, &mut out).unwrap(); // ratchets to MAX
    assert_eq!(s.epoch(), Some(u32::MAX));
    assert_eq!(s.seal(b"z", 0, &mut out), Err(RecordError::Exhausted));
    assert!(s.is_closed());
}

#[test]
fn opener_at_the_last_epoch_refuses_beyond_and_keeps_working() {
    let (mut s, mut o) = pair(Aead::Aes256Gcm);
    let mut r = Vec::new();
    s.seal(b"x", 0, &mut r).unwrap();
    if let Some(k) = o.keys.as_mut() {
        k.epoch = u32::MAX;
        k.next = None;
    }
    // epoch 0 is far behind MAX: stale.
    assert_eq!(o.open(&mut r.clone(), 0), Err(RecordError::StaleEpoch));
    let mut forged = r.clone();
    forged[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(o.open(&mut forged, 0), Err(RecordError::BadTag));
}

#[test]
fn close_erases_keys() {
    let (mut s, mut o) = pair(Aead::Aes256Gcm);
    let mut c = Vec::new();
    s.seal_close(0, &mut c).unwrap();
    assert!(s.keys.is_none());
    assert_eq!(o.open(&mut c, 0), Ok(Opened::Close));
    assert!(o.keys.is_none());
}

#[test]
fn policy_defaults_and_limits() {
    let p = RatchetPolicy::default();
    assert_eq!((p.every_records_log2, p.every_ms), (20, 600_000));
    assert_eq!(p.records_per_epoch(), 1 << 20);
    let never = RatchetPolicy {
        every_records_log2: 64,
        every_ms: u64::MAX,
    };
    assert_eq!(never.records_per_epoch(), u64::MAX);
    assert_eq!(
        RatchetPolicy {
            every_records_log2: 255,
            every_ms: 0
        }
        .records_per_epoch(),
        u64::MAX
    );
    assert_eq!(RECORD_OVERHEAD, 29);
}
