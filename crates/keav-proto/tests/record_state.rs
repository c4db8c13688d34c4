//! Persisted record-layer state: round trips, restores that continue exactly where the live
//! objects stopped, replay and old-epoch attacks across a restart, and a decoder that refuses
//! (without panicking) every malformed or inconsistent input.

use keav_proto::handshake::Role;
use keav_proto::record::{
    channel_from_parts, Aead, Opened, Opener, OpenerState, RatchetPolicy, RecordError, Sealer,
    SealerState, MAX_STATE_KDF_CONTEXT,
};
use keav_proto::secret::Secret32;
use zeroize::Zeroizing;

const AEADS: [Aead; 2] = [Aead::Aes256Gcm, Aead::ChaCha20Poly1305];
const CTX: &[u8] = b"ZIDi........ZIDr........total hash of the session.....";
const KEY_BYTE: u8 = 0x42;

/// Durable-channel policy: ratchet every 4 records, never by time.
const DURABLE: RatchetPolicy = RatchetPolicy {
    every_records_log2: 2,
    every_ms: u64::MAX,
};

fn pair(aead: Aead, policy: RatchetPolicy) -> (Sealer, Opener) {
    let (s, _) = channel_from_parts(
        &Secret32::new([KEY_BYTE; 32]),
        CTX,
        Role::Initiator,
        aead,
        policy,
        0,
    );
    let (_, o) = channel_from_parts(
        &Secret32::new([KEY_BYTE; 32]),
        CTX,
        Role::Responder,
        aead,
        policy,
        0,
    );
    (s, o)
}

fn seal(s: &mut Sealer, i: u64) -> Vec<u8> {
    let mut out = Vec::new();
    s.seal(format!("message {i}").as_bytes(), 0, &mut out)
        .expect("seal");
    out
}

fn open(o: &mut Opener, rec: &[u8]) -> Result<Vec<u8>, RecordError> {
    let mut buf = rec.to_vec();
    match o.open(&mut buf, 0)? {
        Opened::Data(d) => Ok(d.to_vec()),
        Opened::Close => Ok(b"<close>".to_vec()),
    }
}

fn seq_of(rec: &[u8]) -> u64 {
    u64::from_be_bytes(rec[5..13].try_into().unwrap())
}

fn epoch_of(rec: &[u8]) -> u32 {
    u32::from_be_bytes(rec[1..5].try_into().unwrap())
}

#[test]
fn states_round_trip_through_bytes() {
    for aead in AEADS {
        let (mut s, mut o) = pair(aead, DURABLE);
        o.require_in_order();
        for i in 0..9 {
            let r = seal(&mut s, i);
            open(&mut o, &r).unwrap();
        }
        let ss = s.export_state().unwrap();
        assert_eq!(ss.aead(), aead);
        assert_eq!(ss.policy(), DURABLE);
        assert_eq!(ss.next_sequence(), 9);
        assert_eq!(ss.epoch(), 2);
        assert_eq!(ss.epoch_records(), 1);
        let enc: Zeroizing<Vec<u8>> = ss.encode();
        let back = SealerState::decode(&enc).unwrap();
        assert!(back == ss);
        assert_eq!(back.encode().as_slice(), enc.as_slice());

        let os = o.export_state().unwrap();
        assert_eq!(os.epoch(), 2);
        assert_eq!(os.highest_sequence(), Some(8));
        assert_eq!(os.records_received(), 9);
        assert!(os.in_order());
        let enc = os.encode();
        let back = OpenerState::decode(&enc).unwrap();
        assert!(back == os);
        assert_eq!(back.encode().as_slice(), enc.as_slice());
    }
    // A fresh opener (empty window) round-trips too.
    let (_, o) = pair(Aead::Aes256Gcm, DURABLE);
    let os = o.export_state().unwrap();
    assert_eq!(os.highest_sequence(), None);
    assert!(OpenerState::decode(&os.encode()).unwrap() == os);
}

#[test]
fn restored_sealer_continues_like_an_uninterrupted_twin() {
    for aead in AEADS {
        let (mut twin, _) = pair(aead, DURABLE);
        let (mut s, mut o) = pair(aead, DURABLE);
        for i in 0..7 {
            assert_eq!(seal(&mut s, i), seal(&mut twin, i));
        }
        let bytes = s.export_state().unwrap().encode();
        drop(s);
        let mut restored =
            Sealer::from_state(&SealerState::decode(&bytes).unwrap(), 5_000).unwrap();
        assert_eq!(restored.records_sent(), 7);
        // From here on: byte-identical records (same keys, epochs, nonces), never an old number.
        for i in 7..30 {
            let a = seal(&mut restored, i);
            let b = seal(&mut twin, i);
            assert_eq!(a, b, "record {i}");
            assert_eq!(seq_of(&a), i);
            assert_eq!(epoch_of(&a), (i / 4) as u32);
            assert_eq!(open(&mut o, &a).unwrap(), format!("message {i}").as_bytes());
        }
    }
}

#[test]
fn restored_opener_refuses_replays_and_accepts_the_rest() {
    for aead in AEADS {
        let (mut s, mut o) = pair(aead, DURABLE);
        let recs: Vec<Vec<u8>> = (0..20).map(|i| seal(&mut s, i)).collect();
        // Accept 0..=9 except 5 (delivered late), and 11 (arrived early).
        for (i, r) in recs.iter().enumerate() {
            if (i <= 9 && i != 5) || i == 11 {
                open(&mut o, r).unwrap();
            }
        }
        let bytes = o.export_state().unwrap().encode();
        drop(o);
        let mut o = Opener::from_state(&OpenerState::decode(&bytes).unwrap(), 0).unwrap();
        assert_eq!(o.records_received(), 10);
        assert_eq!(o.epoch(), Some(2));
        // Replays of what was accepted before the restart: refused before any AEAD work.
        for i in [0usize, 3, 4, 9, 11] {
            let got = open(&mut o, &recs[i]);
            assert!(
                got == Err(RecordError::Replay) || got == Err(RecordError::StaleEpoch),
                "record {i}: {got:?}"
            );
        }
        for i in [8usize, 9, 11] {
            assert_eq!(
                open(&mut o, &recs[i]),
                Err(RecordError::Replay),
                "record {i}"
            );
        }
        // New records open, and only once.
        for i in [10usize, 12, 13, 19, 14] {
            assert_eq!(
                open(&mut o, &recs[i]).unwrap(),
                format!("message {i}").as_bytes()
            );
            assert_eq!(open(&mut o, &recs[i]), Err(RecordError::Replay));
        }
        // Record 5 is of epoch 1; the restored opener kept no grace copy of epoch 1.
        assert_eq!(open(&mut o, &recs[5]), Err(RecordError::StaleEpoch));
    }
}

#[test]
fn in_order_flag_survives_a_restore() {
    let (mut s, mut o) = pair(Aead::ChaCha20Poly1305, DURABLE);
    o.require_in_order();
    let recs: Vec<Vec<u8>> = (0..6).map(|i| seal(&mut s, i)).collect();
    open(&mut o, &recs[0]).unwrap();
    open(&mut o, &recs[1]).unwrap();
    let mut o = Opener::from_state(&o.export_state().unwrap(), 0).unwrap();
    assert_eq!(open(&mut o, &recs[3]), Err(RecordError::OutOfOrder));
    assert!(open(&mut o, &recs[2]).is_ok());
}

#[test]
fn state_after_a_ratchet_cannot_open_the_epoch_before() {
    for aead in AEADS {
        let (mut s, mut o) = pair(aead, DURABLE);
        let recs: Vec<Vec<u8>> = (0..8).map(|i| seal(&mut s, i)).collect();
        // Epoch 0 = 0..4, epoch 1 = 4..8. Record 3 is held back by the network.
        for i in [0usize, 1, 2, 4, 5] {
            open(&mut o, &recs[i]).unwrap();
        }
        let state = o.export_state().unwrap();
        assert_eq!(state.epoch(), 1);
        // The live opener would still take record 3 in its grace period; the restored one
        // cannot: the state holds only epoch 1's chain key.
        let mut live = Opener::from_state(&state, 0).unwrap();
        assert_eq!(open(&mut live, &recs[3]), Err(RecordError::StaleEpoch));
        assert!(open(&mut o, &recs[3]).is_ok());

        // Forcing the state's epoch back to 0 does not help: the stored chain key is epoch
        // 1's, which does not open epoch 0's records.
        let mut bytes = state.encode().to_vec();
        let epoch_at = 4 + 1 + 4 + 8 + 2 + CTX.len();
        assert_eq!(bytes[epoch_at..epoch_at + 4], 1u32.to_be_bytes());
        bytes[epoch_at..epoch_at + 4].copy_from_slice(&0u32.to_be_bytes());
        let forced = OpenerState::decode(&bytes).unwrap();
        let mut forced = Opener::from_state(&forced, 0).unwrap();
        assert_eq!(open(&mut forced, &recs[3]), Err(RecordError::BadTag));

        // Same for a sealer state: re-labelled epoch 0, it does not reproduce epoch 0 records.
        let (mut s2, _) = pair(aead, DURABLE);
        let early: Vec<Vec<u8>> = (0..6).map(|i| seal(&mut s2, i)).collect();
        let st = s2.export_state().unwrap();
        assert_eq!(st.epoch(), 1);
        let mut b = st.encode().to_vec();
        let epoch_at = 4 + 1 + 4 + 1 + 8 + 2 + CTX.len();
        b[epoch_at..epoch_at + 4].copy_from_slice(&0u32.to_be_bytes());
        let mut forged = Sealer::from_state(&SealerState::decode(&b).unwrap(), 0).unwrap();
        let (_, mut fresh) = pair(aead, DURABLE);
        let rec = seal(&mut forged, 6);
        assert_eq!(epoch_of(&rec), 0);
        assert_ne!(rec, early[0]);
        assert_eq!(open(&mut fresh, &rec), Err(RecordError::BadTag));
    }
}

#[test]
fn closed_ends_export_nothing() {
    let (mut s, mut o) = pair(Aead::Aes256Gcm, DURABLE);
    let mut close = Vec::new();
    s.seal_close(0, &mut close).unwrap();
    assert!(s.export_state().is_none());
    assert_eq!(open(&mut o, &close).unwrap(), b"<close>");
    assert!(o.export_state().is_none());
}

#[test]
fn debug_shows_no_key_material() {
    let (mut s, mut o) = pair(Aead::Aes256Gcm, DURABLE);
    let r = seal(&mut s, 0);
    open(&mut o, &r).unwrap();
    let ss = s.export_state().unwrap();
    let os = o.export_state().unwrap();
    let enc_s = ss.encode();
    let enc_o = os.encode();
    // The chain key sits right after the epoch in both encodings.
    let key_s = &enc_s[4 + 1 + 4 + 1 + 8 + 2 + CTX.len() + 4..][..32];
    let key_o = &enc_o[4 + 1 + 4 + 8 + 2 + CTX.len() + 4..][..32];
    for (dbg, key) in [(format!("{ss:?}"), key_s), (format!("{os:?}"), key_o)] {
        let hex_key: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let dec: Vec<String> = key.iter().map(|b| b.to_string()).collect();
        assert!(!dbg.contains(&hex_key[..8]), "{dbg}");
        assert!(!dbg.contains(&dec[..4].join(", ")), "{dbg}");
        assert!(!dbg.contains("chain"), "{dbg}");
        assert!(dbg.contains("epoch"), "{dbg}");
    }
}

fn sample_states() -> (Vec<u8>, Vec<u8>) {
    let (mut s, mut o) = pair(Aead::ChaCha20Poly1305, DURABLE);
    for i in 0..70 {
        let r = seal(&mut s, i);
        if i % 3 != 0 {
            open(&mut o, &r).unwrap();
        }
    }
    (
        s.export_state().unwrap().encode().to_vec(),
        o.export_state().unwrap().encode().to_vec(),
    )
}

#[test]
fn truncations_and_trailing_bytes_are_refused() {
    let (ss, os) = sample_states();
    for n in 0..ss.len() {
        assert!(
            matches!(SealerState::decode(&ss[..n]), Err(RecordError::BadState(_))),
            "{n}"
        );
    }
    for n in 0..os.len() {
        assert!(
            matches!(OpenerState::decode(&os[..n]), Err(RecordError::BadState(_))),
            "{n}"
        );
    }
    let mut long = ss.clone();
    long.push(0);
    assert_eq!(
        SealerState::decode(&long),
        Err(RecordError::BadState("trailing bytes"))
    );
    let mut long = os.clone();
    long.push(0);
    assert_eq!(
        OpenerState::decode(&long),
        Err(RecordError::BadState("trailing bytes"))
    );
    // Each kind refuses the other's encoding.
    assert_eq!(
        SealerState::decode(&os),
        Err(RecordError::BadState("magic"))
    );
    assert_eq!(
        OpenerState::decode(&ss),
        Err(RecordError::BadState("magic"))
    );
}

#[test]
fn every_bit_flip_is_refused_or_decodes_to_a_valid_state() {
    let (ss, os) = sample_states();
    let mut accepted = 0;
    for bit in 0..ss.len() * 8 {
        let mut b = ss.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        if let Ok(st) = SealerState::decode(&b) {
            // Whatever decodes also restores and re-encodes to the same bytes.
            assert_eq!(st.encode().as_slice(), b.as_slice());
            Sealer::from_state(&st, 0).unwrap();
            accepted += 1;
        }
    }
    for bit in 0..os.len() * 8 {
        let mut b = os.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        if let Ok(st) = OpenerState::decode(&b) {
            assert_eq!(st.encode().as_slice(), b.as_slice());
            Opener::from_state(&st, 0).unwrap();
            accepted += 1;
        }
    }
    // Key and context bits cannot be checked without a checksum; header bits must be.
    assert!(accepted > 0);
    for bit in 0..9 * 8 {
        let mut b = ss.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(SealerState::decode(&b).is_err(), "header bit {bit}");
    }
}

/// Field offsets of the sealer encoding with the test context.
const S_LOG2: usize = 9;
const S_CTX_LEN: usize = S_LOG2 + 1 + 8;
const S_EPOCH: usize = S_CTX_LEN + 2 + CTX.len();
const S_NEXT: usize = S_EPOCH + 4 + 32;
const S_EREC: usize = S_NEXT + 8;

fn patched(base: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    b
}

#[test]
fn inconsistent_sealer_states_are_refused() {
    let (ss, _) = sample_states();
    let st = SealerState::decode(&ss).unwrap();
    assert_eq!(
        (st.epoch(), st.next_sequence(), st.epoch_records()),
        (17, 70, 2)
    );
    let bad = |b: Vec<u8>| SealerState::decode(&b);
    assert_eq!(
        bad(patched(&ss, 4, &[2])),
        Err(RecordError::BadState("version"))
    );
    assert_eq!(
        bad(patched(&ss, 5, b"XXXX")),
        Err(RecordError::BadState("aead"))
    );
    assert!(bad(patched(&ss, S_NEXT, &u64::MAX.to_be_bytes())).is_err());
    // More records in the epoch than sealed, or than the policy allows.
    assert!(bad(patched(&ss, S_EREC, &71u64.to_be_bytes())).is_err());
    assert!(bad(patched(&ss, S_EREC, &5u64.to_be_bytes())).is_err());
    assert!(bad(patched(&ss, S_EREC, &4u64.to_be_bytes())).is_ok());
    // An epoch the sequence numbers cannot have reached; an epoch > 0 with no record.
    assert!(bad(patched(&ss, S_EPOCH, &71u32.to_be_bytes())).is_err());
    assert!(bad(patched(&ss, S_EREC, &0u64.to_be_bytes())).is_err());
    // A context length beyond the bound (the bytes would be there).
    let mut long = ss[..S_CTX_LEN].to_vec();
    long.extend_from_slice(&((MAX_STATE_KDF_CONTEXT + 1) as u16).to_be_bytes());
    long.extend_from_slice(&[0u8; MAX_STATE_KDF_CONTEXT + 1]);
    long.extend_from_slice(&ss[S_EPOCH..]);
    assert_eq!(bad(long), Err(RecordError::BadState("kdf context length")));
    // A context length that disagrees with the bytes present.
    assert!(bad(patched(
        &ss,
        S_CTX_LEN,
        &((CTX.len() + 1) as u16).to_be_bytes()
    ))
    .is_err());
}

/// Field offsets of the opener encoding with the test context.
const O_EPOCH: usize = 4 + 1 + 4 + 8 + 2 + CTX.len();
const O_FLAGS: usize = O_EPOCH + 4 + 32;
const O_HIGH: usize = O_FLAGS + 1;
const O_BITS: usize = O_HIGH + 8;
const O_RECV: usize = O_BITS + 128;

#[test]
fn inconsistent_opener_states_are_refused() {
    let (_, os) = sample_states();
    let st = OpenerState::decode(&os).unwrap();
    assert_eq!(st.highest_sequence(), Some(68));
    assert_eq!(st.records_received(), 46);
    let bad = |b: Vec<u8>| OpenerState::decode(&b);
    assert_eq!(
        bad(patched(&os, O_FLAGS, &[0x06])),
        Err(RecordError::BadState("unknown flags"))
    );
    // An empty window with records, a highest number in an empty window.
    assert!(bad(patched(&os, O_FLAGS, &[0x00])).is_err());
    // Highest not marked: move it to a number whose bit is clear (69 was never received).
    assert!(bad(patched(&os, O_HIGH, &69u64.to_be_bytes())).is_err());
    // A bit set above the highest number (ring position 100 while highest is 68).
    let word = O_BITS + 8; // word 1 covers numbers 64..128
    let mut b = os.clone();
    b[word + 8 - 1 - (100 - 64) / 8] |= 1 << ((100 - 64) % 8);
    assert!(bad(b).is_err());
    // More received than numbers up to the highest; fewer received than bits set.
    assert!(bad(patched(&os, O_RECV, &70u64.to_be_bytes())).is_err());
    assert!(bad(patched(&os, O_RECV, &45u64.to_be_bytes())).is_err());
    assert!(bad(patched(&os, O_RECV, &69u64.to_be_bytes())).is_ok());
    // An epoch beyond the highest sequence number.
    assert!(bad(patched(&os, O_EPOCH, &69u32.to_be_bytes())).is_err());
    // A fresh opener's state with a stray bit.
    let (_, fresh) = pair(Aead::Aes256Gcm, DURABLE);
    let f = fresh.export_state().unwrap().encode().to_vec();
    assert!(OpenerState::decode(&f).is_ok());
    assert!(bad(patched(&f, O_BITS + 7, &[1])).is_err());
    assert!(bad(patched(&f, O_RECV + 7, &[1])).is_err());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = SealerState::decode(&b);
            let _ = OpenerState::decode(&b);
        }

        #[test]
        fn random_edits_of_valid_states_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let (ss, os) = sample_states();
            for base in [ss, os] {
                let mut b = base.clone();
                for (at, v) in &edits {
                    let n = b.len();
                    b[at % n] = *v;
                }
                b.truncate(b.len() - cut % 4);
                if let Ok(st) = SealerState::decode(&b) {
                    prop_assert!(Sealer::from_state(&st, 0).is_ok());
                }
                if let Ok(st) = OpenerState::decode(&b) {
                    prop_assert!(Opener::from_state(&st, 0).is_ok());
                }
            }
        }
    }
}
