//! The record layer: round trips, tampering, replay and reordering, ratchets, close,
//! reflection, and the documented wire format and key schedule checked against the AEAD
//! crates directly.

mod util;

use keav_proto::cache::Mode;
use keav_proto::crypto::kdf32;
use keav_proto::handshake::Role;
use keav_proto::record::{
    channel, channel_from_parts, Aead, Opened, Opener, RatchetPolicy, RecordError, Sealer,
    HEADER_LEN, MAX_EPOCH_SKIP, MAX_PLAINTEXT, MAX_RECORD_LEN, RECORD_OVERHEAD, REPLAY_WINDOW,
    TAG_LEN, TYPE_CLOSE, TYPE_DATA,
};
use keav_proto::secret::Secret32;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const AEADS: [Aead; 2] = [Aead::Aes256Gcm, Aead::ChaCha20Poly1305];
const CTX: &[u8] = b"ZIDi........ZIDr........total hash of the session.....";
const NEVER: u64 = u64::MAX;

fn key() -> Secret32 {
    Secret32::new([0x42; 32])
}

/// Both ends: (initiator sealer, initiator opener, responder sealer, responder opener).
fn pair(aead: Aead, policy: RatchetPolicy) -> (Sealer, Opener, Sealer, Opener) {
    let (is, io) = channel_from_parts(&key(), CTX, Role::Initiator, aead, policy, 0);
    let (rs, ro) = channel_from_parts(&key(), CTX, Role::Responder, aead, policy, 0);
    (is, io, rs, ro)
}

fn seal(s: &mut Sealer, pt: &[u8], now: u64) -> Vec<u8> {
    let mut out = Vec::new();
    s.seal(pt, now, &mut out).expect("seal");
    out
}

fn open_data(o: &mut Opener, rec: &[u8], now: u64) -> Result<Vec<u8>, RecordError> {
    let mut buf = rec.to_vec();
    match o.open(&mut buf, now)? {
        Opened::Data(d) => Ok(d.to_vec()),
        Opened::Close => panic!("unexpected close"),
    }
}

fn header(rec: &[u8]) -> (u8, u32, u64) {
    (
        rec[0],
        u32::from_be_bytes(rec[1..5].try_into().unwrap()),
        u64::from_be_bytes(rec[5..13].try_into().unwrap()),
    )
}

fn payload(i: u64) -> Vec<u8> {
    let len = (i as usize * 7) % 200;
    (0..len).map(|j| (i as u8) ^ (j as u8)).collect()
}

#[test]
fn round_trip_both_directions_both_aeads() {
    for aead in AEADS {
        let (mut is, mut io, mut rs, mut ro) = pair(aead, RatchetPolicy::default());
        for (n, len) in [0usize, 1, 15, 16, 17, 64, 1000, MAX_PLAINTEXT]
            .into_iter()
            .enumerate()
        {
            let pt: Vec<u8> = (0..len).map(|j| (j * 31 + n) as u8).collect();
            let rec = seal(&mut is, &pt, 5);
            assert_eq!(rec.len(), len + RECORD_OVERHEAD);
            assert_eq!(header(&rec), (TYPE_DATA, 0, n as u64));
            if len >= 16 {
                assert_ne!(&rec[HEADER_LEN..HEADER_LEN + 16], &pt[..16], "encrypted");
            }
            assert_eq!(
                open_data(&mut ro, &rec, 5).unwrap(),
                pt,
                "{aead:?} i->r {len}"
            );

            let rec = seal(&mut rs, &pt, 5);
            assert_eq!(
                open_data(&mut io, &rec, 5).unwrap(),
                pt,
                "{aead:?} r->i {len}"
            );
        }
        assert_eq!(is.records_sent(), 8);
        assert_eq!(ro.records_received(), 8);
        let mut out = vec![0xEE];
        assert_eq!(
            is.seal(&[0; MAX_PLAINTEXT + 1], 5, &mut out),
            Err(RecordError::TooLong)
        );
        assert_eq!(out, [0xEE], "nothing appended on error");
        // seal appends.
        is.seal(b"abc", 5, &mut out).unwrap();
        assert_eq!(out.len(), 1 + 3 + RECORD_OVERHEAD);
        assert_eq!(open_data(&mut ro, &out[1..], 5).unwrap(), b"abc");
    }
}

/// The documented wire format and key schedule, checked by decrypting with the AEAD crates
/// directly (not through the opener).
#[test]
fn wire_format_and_key_schedule_known_answer() {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::KeyInit;
    let policy = RatchetPolicy {
        every_records_log2: 1,
        every_ms: NEVER,
    };
    for aead in AEADS {
        let (mut is, _, mut rs, _) = pair(aead, policy);
        let label: &[u8] = match aead {
            Aead::Aes256Gcm => b"KEAV channel record key KGCM",
            Aead::ChaCha20Poly1305 => b"KEAV channel record key KC20",
        };
        for (sealer, dir_label) in [
            (&mut is, &b"KEAV channel initiator to responder"[..]),
            (&mut rs, &b"KEAV channel responder to initiator"[..]),
        ] {
            let mut chain = kdf32(key().expose(), dir_label, CTX);
            for seq in 0u64..6 {
                let epoch = (seq / 2) as u32;
                if seq > 0 && seq % 2 == 0 {
                    chain = kdf32(chain.expose(), b"KEAV channel ratchet", CTX);
                }
                let pt = payload(seq);
                let rec = seal(sealer, &pt, 0);
                assert_eq!(header(&rec), (TYPE_DATA, epoch, seq));
                let k = kdf32(chain.expose(), label, CTX);
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&seq.to_be_bytes());
                let (aad, rest) = rec.split_at(HEADER_LEN);
                let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
                let mut buf = ct.to_vec();
                let ok = match aead {
                    Aead::Aes256Gcm => aes_gcm::Aes256Gcm::new(k.expose().into())
                        .decrypt_in_place_detached(
                            aes_gcm::Nonce::from_slice(&nonce),
                            aad,
                            &mut buf,
                            aes_gcm::Tag::from_slice(tag),
                        ),
                    Aead::ChaCha20Poly1305 => {
                        chacha20poly1305::ChaCha20Poly1305::new(k.expose().into())
                            .decrypt_in_place_detached(
                                chacha20poly1305::Nonce::from_slice(&nonce),
                                aad,
                                &mut buf,
                                chacha20poly1305::Tag::from_slice(tag),
                            )
                    }
                };
                assert!(ok.is_ok(), "{aead:?} seq {seq}");
                assert_eq!(buf, pt);
            }
        }
    }
}

#[test]
fn every_bit_flip_is_refused_and_the_window_does_not_move() {
    for aead in AEADS {
        let (mut is, _, _, mut ro) = pair(aead, RatchetPolicy::default());
        // Give the opener some history so that the window has a highest number.
        for i in 0..3 {
            let r = seal(&mut is, &payload(i), 0);
            open_data(&mut ro, &r, 0).unwrap();
        }
        let pt = b"attack at dawn, bring snacks!!!!".to_vec();
        let rec = seal(&mut is, &pt, 0);
        let mut close = Vec::new();
        is.seal_close(0, &mut close).unwrap();
        for (orig, is_close) in [(&rec, false), (&close, true)] {
            for bit in 0..orig.len() * 8 {
                let mut bad = orig.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let flipped = bad.clone();
                let err = ro.open(&mut bad, 0).expect_err("flipped record opened");
                let byte = bit / 8;
                let allowed: &[RecordError] = match byte {
                    0 => &[RecordError::BadType, RecordError::BadTag],
                    1..=4 => &[RecordError::EpochTooFar, RecordError::BadTag],
                    // A flip to an already accepted number is a replay.
                    5..=12 => &[RecordError::BadTag, RecordError::Replay],
                    _ => &[RecordError::BadTag],
                };
                assert!(
                    allowed.contains(&err),
                    "{aead:?} close={is_close} bit {bit}: {err:?}"
                );
                assert_eq!(bad, flipped, "buffer untouched on failure");
            }
        }
        assert_eq!(ro.records_received(), 3, "nothing was accepted");
        assert_eq!(open_data(&mut ro, &rec, 0).unwrap(), pt);
        assert_eq!(ro.open(&mut close.clone(), 0), Ok(Opened::Close));
    }
}

#[test]
fn duplicates_are_replays() {
    for aead in AEADS {
        let (mut is, _, _, mut ro) = pair(aead, RatchetPolicy::default());
        let r0 = seal(&mut is, b"zero", 0);
        let r1 = seal(&mut is, b"one", 0);
        assert_eq!(open_data(&mut ro, &r0, 0).unwrap(), b"zero");
        assert_eq!(open_data(&mut ro, &r0, 0), Err(RecordError::Replay));
        assert_eq!(open_data(&mut ro, &r1, 0).unwrap(), b"one");
        assert_eq!(open_data(&mut ro, &r1, 0), Err(RecordError::Replay));
        assert_eq!(open_data(&mut ro, &r0, 0), Err(RecordError::Replay));
        assert_eq!(ro.records_received(), 2);
    }
}

#[test]
fn reordering_within_the_window_is_accepted_exactly_once() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for aead in AEADS {
        let (mut is, _, _, mut ro) = pair(aead, RatchetPolicy::default());
        let recs: Vec<(Vec<u8>, Vec<u8>)> = (0..REPLAY_WINDOW)
            .map(|i| {
                let p = payload(i);
                (seal(&mut is, &p, 0), p)
            })
            .collect();
        let mut order: Vec<usize> = (0..recs.len()).collect();
        order.shuffle(&mut rng);
        // The newest first, so that the whole set spans exactly the window.
        order.retain(|&i| i != recs.len() - 1);
        order.insert(0, recs.len() - 1);
        for &i in &order {
            assert_eq!(open_data(&mut ro, &recs[i].0, 0).unwrap(), recs[i].1, "{i}");
        }
        for &i in &order {
            assert_eq!(open_data(&mut ro, &recs[i].0, 0), Err(RecordError::Replay));
        }
        assert_eq!(ro.records_received(), REPLAY_WINDOW);
    }
}

#[test]
fn older_than_the_window_is_stale() {
    let (mut is, _, _, mut ro) = pair(Aead::Aes256Gcm, RatchetPolicy::default());
    let recs: Vec<Vec<u8>> = (0..1100).map(|i| seal(&mut is, &payload(i), 0)).collect();
    open_data(&mut ro, &recs[1099], 0).unwrap();
    let edge = (1099 - (REPLAY_WINDOW - 1)) as usize; // 76: oldest still inside
    for (i, rec) in recs.iter().enumerate().take(edge) {
        assert_eq!(open_data(&mut ro, rec, 0), Err(RecordError::Stale), "{i}");
    }
    assert_eq!(
        open_data(&mut ro, &recs[edge], 0).unwrap(),
        payload(edge as u64)
    );
    // A later record slides the window past the one just accepted.
    open_data(&mut ro, &recs[1000], 0).unwrap();
    assert_eq!(open_data(&mut ro, &recs[edge], 0), Err(RecordError::Replay));
}

#[test]
fn truncation_at_every_length_and_overlong_records_are_refused() {
    for aead in AEADS {
        let (mut is, _, _, mut ro) = pair(aead, RatchetPolicy::default());
        let rec = seal(&mut is, &[7u8; 100], 0);
        for len in 0..rec.len() {
            let mut cut = rec[..len].to_vec();
            let err = ro.open(&mut cut, 0).expect_err("truncated record opened");
            if len < RECORD_OVERHEAD {
                assert_eq!(err, RecordError::Truncated, "{len}");
            } else {
                assert_eq!(err, RecordError::BadTag, "{len}");
            }
        }
        let mut longer = rec.clone();
        longer.push(0);
        assert_eq!(ro.open(&mut longer, 0), Err(RecordError::BadTag));
        let mut huge = vec![TYPE_DATA; MAX_RECORD_LEN + 1];
        assert_eq!(ro.open(&mut huge, 0), Err(RecordError::TooLong));
        let mut empty = [];
        assert_eq!(ro.open(&mut empty, 0), Err(RecordError::Truncated));
        // Still intact after all that.
        assert_eq!(open_data(&mut ro, &rec, 0).unwrap(), vec![7u8; 100]);
        // The largest record is accepted.
        let big = seal(&mut is, &[1u8; MAX_PLAINTEXT], 0);
        assert_eq!(big.len(), MAX_RECORD_LEN);
        assert_eq!(open_data(&mut ro, &big, 0).unwrap().len(), MAX_PLAINTEXT);
    }
}

#[test]
fn unknown_types_and_close_with_data_are_bad_types() {
    let (mut is, _, _, mut ro) = pair(Aead::Aes256Gcm, RatchetPolicy::default());
    let rec = seal(&mut is, b"data", 0);
    for ty in [0x00u8, 0x10, 0x14, 0x16, 0x18, 0xFF] {
        let mut r = rec.clone();
        r[0] = ty;
        assert_eq!(ro.open(&mut r, 0), Err(RecordError::BadType), "{ty:#x}");
    }
    let mut r = rec.clone();
    r[0] = TYPE_CLOSE;
    assert_eq!(ro.open(&mut r, 0), Err(RecordError::BadType));
    // An empty data record relabelled as close fails authentication (the type is in the AAD).
    let mut empty = seal(&mut is, b"", 0);
    empty[0] = TYPE_CLOSE;
    assert_eq!(ro.open(&mut empty, 0), Err(RecordError::BadTag));
    assert!(!ro.is_closed());
    assert_eq!(open_data(&mut ro, &rec, 0).unwrap(), b"data");
}

#[test]
fn ratchet_by_count_with_reordering_across_boundaries() {
    let policy = RatchetPolicy {
        every_records_log2: 3,
        every_ms: NEVER,
    };
    for aead in AEADS {
        let (mut is, _, _, mut ro) = pair(aead, policy);
        let recs: Vec<Vec<u8>> = (0..64).map(|i| seal(&mut is, &payload(i), 0)).collect();
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(header(r), (TYPE_DATA, (i / 8) as u32, i as u64));
        }
        assert_eq!(is.epoch(), Some(7));
        let ok = |ro: &mut Opener, i: usize| {
            assert_eq!(
                open_data(ro, &recs[i], 0).unwrap(),
                payload(i as u64),
                "record {i}"
            );
        };
        // Epoch 0 except 5 and 7; then 8 (epoch 1) before 7 (epoch 0, the previous one).
        for i in [0, 1, 2, 3, 4, 6, 8, 7, 9, 10] {
            ok(&mut ro, i);
        }
        assert_eq!(ro.epoch(), Some(1));
        // Into epoch 2: epoch 0's key is gone even though 5 is well inside the window.
        ok(&mut ro, 16);
        assert_eq!(
            open_data(&mut ro, &recs[5], 0),
            Err(RecordError::StaleEpoch)
        );
        ok(&mut ro, 11); // epoch 1 = previous
                         // Skip ahead three epochs (2 -> 5): derived on demand.
        ok(&mut ro, 41);
        assert_eq!(ro.epoch(), Some(5));
        ok(&mut ro, 39); // epoch 4, the previous one, derived during the skip
        assert_eq!(
            open_data(&mut ro, &recs[30], 0),
            Err(RecordError::StaleEpoch)
        );
        assert_eq!(
            open_data(&mut ro, &recs[17], 0),
            Err(RecordError::StaleEpoch)
        );
        ok(&mut ro, 40);
        for i in 42..64 {
            ok(&mut ro, i);
        }
        assert_eq!(ro.epoch(), Some(7));
        assert_eq!(open_data(&mut ro, &recs[41], 0), Err(RecordError::Replay));
    }
}

#[test]
fn forged_epochs_do_not_move_the_receiver() {
    let policy = RatchetPolicy {
        every_records_log2: 0, // every record is a new epoch
        every_ms: NEVER,
    };
    let (mut is, _, _, mut ro) = pair(Aead::ChaCha20Poly1305, policy);
    let recs: Vec<Vec<u8>> = (0..40).map(|i| seal(&mut is, &payload(i), 0)).collect();
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(header(r).1, i as u32);
    }
    open_data(&mut ro, &recs[0], 0).unwrap();
    assert_eq!(ro.epoch(), Some(0));
    let far = 1 + MAX_EPOCH_SKIP as usize;
    assert_eq!(
        open_data(&mut ro, &recs[far], 0),
        Err(RecordError::EpochTooFar)
    );
    // A forged record of a reachable epoch fails and leaves the keys alone.
    let mut forged = recs[far - 1].clone();
    *forged.last_mut().unwrap() ^= 1;
    assert_eq!(ro.open(&mut forged, 0), Err(RecordError::BadTag));
    assert_eq!(ro.epoch(), Some(0));
    open_data(&mut ro, &recs[1], 0).unwrap();
    assert_eq!(ro.epoch(), Some(1));
    // Now within reach: derives MAX_EPOCH_SKIP epochs ahead.
    open_data(&mut ro, &recs[far], 0).unwrap();
    assert_eq!(ro.epoch(), Some(far as u32));
    open_data(&mut ro, &recs[far - 1], 0).unwrap();
    assert_eq!(
        open_data(&mut ro, &recs[far - 2], 0),
        Err(RecordError::StaleEpoch)
    );
}

#[test]
fn ratchet_by_time_with_reordering_and_previous_key_expiry() {
    let policy = RatchetPolicy {
        every_records_log2: 64, // never by count
        every_ms: 1000,
    };
    for aead in AEADS {
        let (is, _, _, ro) = pair(aead, policy);
        let (mut is, mut ro) = (is, ro);
        // (send time, expected epoch)
        let plan = [
            (0u64, 0u32),
            (400, 0),
            (999, 0),
            (1000, 1),
            (1500, 1),
            (1999, 1),
            (2000, 2),
            (2500, 2),
            (2999, 2),
            (3000, 3),
            (9000, 4), // a long pause is still one step
            (9100, 4),
            (10_000, 5),
        ];
        let recs: Vec<Vec<u8>> = plan
            .iter()
            .enumerate()
            .map(|(i, &(t, e))| {
                let r = seal(&mut is, &payload(i as u64), t);
                assert_eq!(header(&r).1, e, "record {i} at {t}");
                r
            })
            .collect();
        let ok = |ro: &mut Opener, i: usize, now: u64| {
            assert_eq!(
                open_data(ro, &recs[i], now).unwrap(),
                payload(i as u64),
                "{i}"
            );
        };
        ok(&mut ro, 0, 10);
        ok(&mut ro, 3, 1010); // epoch 1 arrives before ...
        ok(&mut ro, 1, 1020); // ... epoch 0's records, reordered across the boundary
        ok(&mut ro, 4, 1510);
        ok(&mut ro, 6, 2010); // epoch 2
        ok(&mut ro, 5, 2020); // epoch 1 is the previous one
        assert_eq!(
            open_data(&mut ro, &recs[2], 2030),
            Err(RecordError::StaleEpoch)
        );
        ok(&mut ro, 9, 3010); // epoch 3
        ok(&mut ro, 7, 3020); // epoch 2 = previous
                              // every_ms after entering epoch 3, epoch 2's key is forgotten.
        assert_eq!(
            open_data(&mut ro, &recs[8], 4010),
            Err(RecordError::StaleEpoch)
        );
        ok(&mut ro, 10, 9010);
        ok(&mut ro, 12, 10_010);
        ok(&mut ro, 11, 10_020); // epoch 4 = previous
        assert_eq!(ro.records_received(), 11);
    }
}

#[test]
fn close_is_authenticated_and_final() {
    for aead in AEADS {
        let (mut is, _, _, mut ro) = pair(aead, RatchetPolicy::default());
        let before = seal(&mut is, b"sent before close", 0);
        let mut close = Vec::new();
        is.seal_close(0, &mut close).unwrap();
        assert_eq!(close.len(), RECORD_OVERHEAD);
        assert_eq!(header(&close), (TYPE_CLOSE, 0, 1));
        assert!(is.is_closed());
        assert_eq!(is.records_sent(), 2);
        let mut out = Vec::new();
        assert_eq!(is.seal(b"x", 0, &mut out), Err(RecordError::Closed));
        assert_eq!(is.seal_close(0, &mut out), Err(RecordError::Closed));
        assert!(out.is_empty());

        // A forged close does nothing.
        let mut forged = close.clone();
        forged[HEADER_LEN] ^= 0x80;
        assert_eq!(ro.open(&mut forged, 0), Err(RecordError::BadTag));
        assert!(!ro.is_closed());

        let mut c = close.clone();
        assert_eq!(ro.open(&mut c, 0), Ok(Opened::Close));
        assert!(ro.is_closed());
        assert_eq!(ro.records_received(), 1);
        // Everything afterwards is refused, even a genuine earlier record.
        assert_eq!(open_data(&mut ro, &before, 0), Err(RecordError::Closed));
        let mut c = close.clone();
        assert_eq!(ro.open(&mut c, 0), Err(RecordError::Closed));
        let mut junk = [0u8; 3];
        assert_eq!(ro.open(&mut junk, 0), Err(RecordError::Closed));
    }
}

#[test]
fn reflection_and_foreign_channels_are_rejected() {
    for aead in AEADS {
        let (mut is, mut io, mut rs, mut ro) = pair(aead, RatchetPolicy::default());
        let from_i = seal(&mut is, b"hello responder", 0);
        let from_r = seal(&mut rs, b"hello initiator", 0);
        // Reflected back to the sender: wrong direction key.
        assert_eq!(open_data(&mut io, &from_i, 0), Err(RecordError::BadTag));
        assert_eq!(open_data(&mut ro, &from_r, 0), Err(RecordError::BadTag));
        // Other AEAD, other context, other key.
        let other = match aead {
            Aead::Aes256Gcm => Aead::ChaCha20Poly1305,
            Aead::ChaCha20Poly1305 => Aead::Aes256Gcm,
        };
        let p = RatchetPolicy::default();
        let mut wrong = [
            channel_from_parts(&key(), CTX, Role::Responder, other, p, 0).1,
            channel_from_parts(&key(), b"other ctx", Role::Responder, aead, p, 0).1,
            channel_from_parts(&Secret32::new([1; 32]), CTX, Role::Responder, aead, p, 0).1,
        ];
        for o in &mut wrong {
            assert_eq!(open_data(o, &from_i, 0), Err(RecordError::BadTag));
        }
        // The right pairing still works.
        assert_eq!(open_data(&mut ro, &from_i, 0).unwrap(), b"hello responder");
        assert_eq!(open_data(&mut io, &from_r, 0).unwrap(), b"hello initiator");
    }
}

#[test]
fn debug_prints_no_key() {
    let (is, io, _, _) = pair(Aead::Aes256Gcm, RatchetPolicy::default());
    let send_key = kdf32(key().expose(), b"KEAV channel initiator to responder", CTX);
    let rec_key = kdf32(send_key.expose(), b"KEAV channel record key KGCM", CTX);
    let d = format!("{is:?} {io:?}");
    for k in [key(), send_key, rec_key] {
        assert!(!d.contains(&hex::encode(k.expose())), "{d}");
        assert!(!d.contains(&format!("{:?}", k.expose())), "{d}");
    }
    assert!(d.contains("Sealer") && d.contains("Opener") && d.contains("Aes256Gcm"));
    assert!(d.len() < 400, "{d}");
}

#[test]
fn channel_from_a_real_handshake() {
    use util::{both_ok, run_session, Device, LinkModel};
    let mut a = Device::new("alice", Mode::NORMAL, 1);
    let mut b = Device::new("bob", Mode::NORMAL, 2);
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 3, 1_800_000_000, None);
    let (oa, ob) = both_ok(&r);
    let p = RatchetPolicy::default();
    let (mut sa, mut oa_open) = channel(oa, p, 0).unwrap();
    let (mut sb, mut ob_open) = channel(ob, p, 0).unwrap();
    assert_eq!(Some(sa.aead()), oa.channel_aead);
    let r1 = seal(&mut sa, b"ping", 1);
    assert_eq!(open_data(&mut ob_open, &r1, 1).unwrap(), b"ping");
    let r2 = seal(&mut sb, b"pong", 2);
    assert_eq!(open_data(&mut oa_open, &r2, 2).unwrap(), b"pong");
    // Reflected (seq 1 is new to alice's opener, so the AEAD decides).
    let r3 = seal(&mut sa, b"mirror", 3);
    assert_eq!(open_data(&mut oa_open, &r3, 3), Err(RecordError::BadTag));
    assert_eq!(open_data(&mut ob_open, &r3, 3).unwrap(), b"mirror");

    let mut plain = match r.a {
        Ok(o) => o,
        Err(e) => panic!("{e:?}"),
    };
    plain.channel_aead = None;
    assert_eq!(channel(&plain, p, 0).err(), Some(RecordError::NoChannel));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes, with and without a plausible header, never panic and never open.
        #[test]
        fn open_never_panics_on_arbitrary_bytes(
            aes in any::<bool>(),
            ty in prop::sample::select(vec![TYPE_DATA, TYPE_CLOSE, 0x10, 0x00]),
            epoch in prop::sample::select(vec![0u32, 1, 2, 17, u32::MAX]),
            seq in any::<u64>(),
            body in prop::collection::vec(any::<u8>(), 0..300),
            raw in prop::collection::vec(any::<u8>(), 0..300),
            now in any::<u64>(),
        ) {
            let aead = if aes { Aead::Aes256Gcm } else { Aead::ChaCha20Poly1305 };
            let (_, _, _, mut ro) = pair(aead, RatchetPolicy::default());
            let mut r = raw.clone();
            prop_assert!(ro.open(&mut r, now).is_err());
            let mut rec = vec![ty];
            rec.extend_from_slice(&epoch.to_be_bytes());
            rec.extend_from_slice(&seq.to_be_bytes());
            rec.extend_from_slice(&body);
            prop_assert!(ro.open(&mut rec, now).is_err());
            prop_assert_eq!(ro.records_received(), 0);
        }

        /// Random interleavings of sealing, delivering (possibly damaged, duplicated or
        /// reordered), injecting junk and closing. Checks against a model: an accepted record
        /// is a genuine one, with its own payload, accepted at most once; a damaged one is
        /// never accepted; nothing is accepted after a close.
        #[test]
        fn random_operation_sequences(
            aes in any::<bool>(),
            log2 in 0u8..5,
            every_ms in prop::sample::select(vec![50u64, 1000, u64::MAX]),
            ops in prop::collection::vec((0u8..8, any::<u16>(), any::<u16>()), 1..120),
        ) {
            let aead = if aes { Aead::Aes256Gcm } else { Aead::ChaCha20Poly1305 };
            let policy = RatchetPolicy { every_records_log2: log2, every_ms };
            let (mut is, _, _, mut ro) = pair(aead, policy);
            let mut sent: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new(); // (record, payload or close)
            let mut accepted = std::collections::HashSet::new();
            let mut now = 0u64;
            let mut closed_seen = false;
            for (op, a, b) in ops {
                match op {
                    0 | 1 => {
                        let pt: Vec<u8> = (0..(a % 80)).map(|i| i as u8 ^ b as u8).collect();
                        let mut out = Vec::new();
                        match is.seal(&pt, now, &mut out) {
                            Ok(()) => sent.push((out, Some(pt))),
                            Err(e) => prop_assert_eq!(e, RecordError::Closed),
                        }
                    }
                    2 => now += u64::from(a % 700),
                    3 | 4 if !sent.is_empty() => {
                        let i = a as usize % sent.len();
                        let mut buf = sent[i].0.clone();
                        let seq = header(&buf).2;
                        match ro.open(&mut buf, now) {
                            Ok(o) => {
                                prop_assert!(!closed_seen);
                                prop_assert!(accepted.insert(seq), "accepted twice: {}", seq);
                                match (o, &sent[i].1) {
                                    (Opened::Data(d), Some(p)) => prop_assert_eq!(d, &p[..]),
                                    (Opened::Close, None) => closed_seen = true,
                                    _ => prop_assert!(false, "wrong kind"),
                                }
                            }
                            Err(e) => prop_assert!(
                                matches!(e, RecordError::Replay | RecordError::Stale
                                    | RecordError::StaleEpoch | RecordError::EpochTooFar
                                    | RecordError::Closed),
                                "genuine record refused with {:?}", e
                            ),
                        }
                    }
                    5 if !sent.is_empty() => {
                        let i = a as usize % sent.len();
                        let mut buf = sent[i].0.clone();
                        let pos = b as usize % (buf.len() * 8 + 1);
                        if pos == buf.len() * 8 {
                            buf.pop();
                        } else {
                            buf[pos / 8] ^= 1 << (pos % 8);
                        }
                        prop_assert!(ro.open(&mut buf, now).is_err());
                    }
                    6 => {
                        let mut junk: Vec<u8> = (0..(a % 64)).map(|i| (i ^ b) as u8).collect();
                        prop_assert!(ro.open(&mut junk, now).is_err());
                    }
                    7 if a % 16 == 0 => {
                        let mut out = Vec::new();
                        if is.seal_close(now, &mut out).is_ok() {
                            sent.push((out, None));
                        }
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(ro.records_received(), accepted.len() as u64);
            prop_assert_eq!(ro.is_closed(), closed_seen);
        }
    }
}

#[test]
fn random_sizes_round_trip() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let policy = RatchetPolicy {
        every_records_log2: 4,
        every_ms: 10_000,
    };
    for aead in AEADS {
        let (mut is, _, _, mut ro) = pair(aead, policy);
        let mut out = Vec::new();
        let mut now = 0;
        for _ in 0..300 {
            let len = rng.gen_range(0..=2048);
            let pt: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            now += rng.gen_range(0..200);
            out.clear();
            is.seal(&pt, now, &mut out).unwrap();
            match ro.open(&mut out, now).unwrap() {
                Opened::Data(d) => assert_eq!(d, &pt[..]),
                Opened::Close => panic!(),
            }
        }
    }
}

#[test]
fn in_order_mode_refuses_gaps_and_swaps_but_keeps_the_channel_usable() {
    use keav_proto::handshake::Role;
    use keav_proto::record::{channel_from_parts, Aead, Opened, RatchetPolicy, RecordError};
    use keav_proto::secret::Secret32;
    let key = Secret32::new([7; 32]);
    let (mut tx, _) = channel_from_parts(
        &key,
        b"ctx",
        Role::Initiator,
        Aead::Aes256Gcm,
        RatchetPolicy::default(),
        0,
    );
    let (_, mut rx) = channel_from_parts(
        &key,
        b"ctx",
        Role::Responder,
        Aead::Aes256Gcm,
        RatchetPolicy::default(),
        0,
    );
    rx.require_in_order();
    let mut recs = Vec::new();
    for i in 0..3u8 {
        let mut out = Vec::new();
        tx.seal(&[i; 4], 0, &mut out).expect("seal");
        recs.push(out);
    }
    let mut r0 = recs[0].clone();
    assert_eq!(rx.open(&mut r0, 0), Ok(Opened::Data(&[0u8; 4][..])));
    // Record 1 dropped: record 2 is refused, and the refusal changes nothing.
    let mut r2 = recs[2].clone();
    assert_eq!(rx.open(&mut r2, 0), Err(RecordError::OutOfOrder));
    let mut r1 = recs[1].clone();
    assert_eq!(rx.open(&mut r1, 0), Ok(Opened::Data(&[1u8; 4][..])));
    let mut r2 = recs[2].clone();
    assert_eq!(rx.open(&mut r2, 0), Ok(Opened::Data(&[2u8; 4][..])));
}

#[test]
fn compaction_changes_no_record_and_survives_ratchets() {
    // Ratchet every 2^2 records; one channel compacts after every record, its twin never.
    let policy = RatchetPolicy {
        every_records_log2: 2,
        every_ms: NEVER,
    };
    for aead in AEADS {
        let (mut a, _, _, mut b) = pair(aead, policy);
        let (mut a2, _, _, mut b2) = pair(aead, policy);
        for i in 0..40u64 {
            let pt = payload(i);
            let r1 = seal(&mut a, &pt, 0);
            a.compact();
            let r2 = seal(&mut a2, &pt, 0);
            assert_eq!(r1, r2, "{aead:?} record {i} differs after compaction");
            assert_eq!(open_data(&mut b, &r1, 0).unwrap(), pt);
            b.compact();
            // A compacted opener still refuses a forgery and a replay.
            let mut forged = r1.clone();
            let last = forged.len() - 1;
            forged[last] ^= 1;
            assert_eq!(open_data(&mut b, &forged, 0), Err(RecordError::Replay));
            assert_eq!(open_data(&mut b2, &forged, 0), Err(RecordError::BadTag));
            assert_eq!(open_data(&mut b2, &r2, 0).unwrap(), pt);
        }
        assert_eq!(a.epoch(), a2.epoch());
        assert!(a.epoch().unwrap() >= 9);
        assert_eq!(b.epoch(), b2.epoch());
    }
}

#[test]
fn compacted_opener_drops_the_previous_epoch_early() {
    // Without compaction a record of the previous epoch opens during the grace period;
    // after compaction it is refused as stale (documented).
    let policy = RatchetPolicy {
        every_records_log2: 1,
        every_ms: NEVER,
    };
    let (mut a, _, _, mut b) = pair(Aead::ChaCha20Poly1305, policy);
    let r0 = seal(&mut a, b"e0 r0", 0);
    let r1 = seal(&mut a, b"e0 r1", 0);
    let r2 = seal(&mut a, b"e1 r2", 0);
    assert_eq!(header(&r2).1, 1);
    let (_, _, _, mut twin) = pair(Aead::ChaCha20Poly1305, policy);
    for o in [&mut b, &mut twin] {
        assert_eq!(open_data(o, &r0, 0).unwrap(), b"e0 r0");
        assert_eq!(open_data(o, &r2, 0).unwrap(), b"e1 r2");
    }
    assert_eq!(open_data(&mut twin, &r1, 0).unwrap(), b"e0 r1");
    b.compact();
    assert_eq!(open_data(&mut b, &r1, 0), Err(RecordError::StaleEpoch));
}
