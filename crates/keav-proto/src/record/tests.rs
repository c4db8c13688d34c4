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

// ---- AEAD backends --------------------------------------------------------------------------

use keys::{Backend, Cipher};

/// Every backend compiled into this build.
fn backends() -> Vec<Backend> {
    #[allow(unused_mut)]
    let mut b = vec![Backend::RustCrypto];
    #[cfg(feature = "fast-aead")]
    b.push(Backend::Ring);
    b
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn key32(b: &[u8]) -> Secret32 {
    Secret32::new(b.try_into().unwrap())
}

/// Published known answers, run on every backend: RFC 8439 section 2.8.2 (ChaCha20-Poly1305)
/// and a NIST CAVS `gcmEncryptExtIV256` vector (AES-256-GCM, 96-bit IV, with AAD).
#[test]
fn backends_match_published_vectors() {
    let rfc8439_pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one \
tip for the future, sunscreen would be it.";
    let vectors = [
        (
            Aead::ChaCha20Poly1305,
            h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"),
            h("070000004041424344454647"),
            h("50515253c0c1c2c3c4c5c6c7"),
            rfc8439_pt.to_vec(),
            h(
                "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692dd\
bd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def0\
8e4b7a9de576d26586cec64b6116",
            ),
            h("1ae10b594f09e26a7e902ecbd0600691"),
        ),
        (
            Aead::Aes256Gcm,
            h("92e11dcdaa866f5ce790fd24501f92509aacf4cb8b1339d50c9c1240935dd08b"),
            h("ac93a1a6145299bde902f21a"),
            h("1e0889016f67601c8ebea4943bc23ad6"),
            h("2d71bcfa914e4ac045b2aa60955fad24"),
            h("8995ae2e6df3dbf96fac7b7137bae67f"),
            h("eca5aa77d51d4a0a14d9c51e1da474ab"),
        ),
    ];
    for backend in backends() {
        for (aead, key, nonce, aad, pt, ct, tag) in &vectors {
            let c = Cipher::with_backend(backend, *aead, &key32(key));
            let n: [u8; 12] = nonce[..].try_into().unwrap();
            let mut buf = pt.clone();
            let t = c.seal_with_nonce(n, aad, &mut buf).unwrap();
            assert_eq!(&buf, ct, "{backend:?} {aead:?} ciphertext");
            assert_eq!(&t[..], &tag[..], "{backend:?} {aead:?} tag");
            let mut scratch = Vec::new();
            assert!(c.open_with_nonce(n, aad, &mut buf, &t, &mut scratch));
            assert_eq!(&buf, pt, "{backend:?} {aead:?} decrypts");
        }
    }
}

/// A failed open leaves the buffer as it was, on every backend (ring zeroes it internally).
#[test]
fn failed_open_leaves_buffer_on_every_backend() {
    for backend in backends() {
        for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
            let c = Cipher::with_backend(backend, aead, &Secret32::new([5; 32]));
            let mut scratch = Vec::new();
            for len in [0usize, 1, 64, 1000] {
                let mut ct: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let tag = c.seal(7, b"hdr", &mut ct).unwrap();
                let mut bad_tag = tag;
                bad_tag[3] ^= 0x40;
                for (seq, aad, t) in [
                    (7, &b"hdr"[..], &bad_tag),
                    (8, b"hdr", &tag),
                    (7, b"hds", &tag),
                ] {
                    let mut buf = ct.clone();
                    assert!(!c.open(seq, aad, &mut buf, t, &mut scratch), "{backend:?}");
                    assert_eq!(buf, ct, "{backend:?} {aead:?} {len}: buffer changed");
                }
                let mut buf = ct.clone();
                assert!(c.open(7, b"hdr", &mut buf, &tag, &mut scratch));
                assert_eq!(buf, (0..len).map(|i| i as u8).collect::<Vec<u8>>());
            }
        }
    }
}

#[test]
fn backend_name_matches_the_build() {
    #[cfg(feature = "fast-aead")]
    assert_eq!(AEAD_BACKEND, "ring");
    #[cfg(not(feature = "fast-aead"))]
    assert_eq!(AEAD_BACKEND, "rustcrypto");
}

/// ring and RustCrypto produce identical records: same ciphertext and tag for every length
/// around the block boundaries up to a full record, and each opens what the other sealed.
#[cfg(feature = "fast-aead")]
#[test]
fn ring_and_rustcrypto_records_are_identical() {
    for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
        let key = Secret32::new([0xa7; 32]);
        let rc = Cipher::with_backend(Backend::RustCrypto, aead, &key);
        let rg = Cipher::with_backend(Backend::Ring, aead, &key);
        let mut scratch = Vec::new();
        let lens = [
            0usize,
            1,
            15,
            16,
            17,
            63,
            64,
            65,
            255,
            256,
            1024,
            4099,
            MAX_PLAINTEXT,
        ];
        for (i, len) in lens.into_iter().enumerate() {
            let pt: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
            let seq = [0u64, 1, 0x0102_0304_0506_0708, u64::MAX - 1][i % 4];
            let aad = [TYPE_DATA, 0, 0, 0, i as u8, 9, 9, 9, 9, 9, 9, 9, i as u8];
            let mut a = pt.clone();
            let ta = rc.seal(seq, &aad, &mut a).unwrap();
            let mut b = pt.clone();
            let tb = rg.seal(seq, &aad, &mut b).unwrap();
            assert_eq!(a, b, "{aead:?} {len}: ciphertext differs");
            assert_eq!(ta, tb, "{aead:?} {len}: tag differs");
            if len > 0 {
                assert_ne!(a, pt, "encrypted");
            }
            // Cross-open.
            assert!(
                rg.open(seq, &aad, &mut a, &ta, &mut scratch),
                "ring opens RustCrypto"
            );
            assert_eq!(a, pt);
            assert!(
                rc.open(seq, &aad, &mut b, &tb, &mut scratch),
                "RustCrypto opens ring"
            );
            assert_eq!(b, pt);
        }
    }
}

/// Whole records from a `Sealer` (this build: ring) open with RustCrypto epoch keys derived
/// independently from the key schedule, across a ratchet, and vice versa for the opener.
#[cfg(feature = "fast-aead")]
#[test]
fn channel_records_open_across_backends() {
    let exported = Secret32::new([3; 32]);
    let ctx = b"kdf context";
    let policy = RatchetPolicy {
        every_records_log2: 1,
        every_ms: u64::MAX,
    };
    for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
        let (mut s, _) = channel_from_parts(&exported, ctx, Role::Initiator, aead, policy, 0);
        let (_, mut o) = channel_from_parts(&exported, ctx, Role::Responder, aead, policy, 0);
        let (chain0, _) = keys::initial_chains(&exported, ctx, Role::Initiator);
        let chain1 = keys::ratchet(&chain0, ctx);
        let rc = [
            keys::epoch_cipher_with(Backend::RustCrypto, aead, &chain0, ctx),
            keys::epoch_cipher_with(Backend::RustCrypto, aead, &chain1, ctx),
        ];
        let mut scratch = Vec::new();
        for seq in 0u64..4 {
            let pt = vec![seq as u8; 100];
            let mut rec = Vec::new();
            s.seal(&pt, 0, &mut rec).unwrap();
            let epoch = (seq / 2) as usize;
            assert_eq!(rec[1..5], (epoch as u32).to_be_bytes());
            // RustCrypto opens the ring-sealed record.
            let mut copy = rec.clone();
            let (hdr, rest) = copy.split_at_mut(HEADER_LEN);
            let (ct, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
            let tag: [u8; TAG_LEN] = (&*tag).try_into().unwrap();
            assert!(rc[epoch].open(seq, hdr, ct, &tag, &mut scratch));
            assert_eq!(ct, &pt[..]);
            // A RustCrypto-sealed record of the same header is byte-identical, and the
            // (ring) opener accepts it.
            let mut body = pt.clone();
            let t = rc[epoch].seal(seq, &rec[..HEADER_LEN], &mut body).unwrap();
            let mut rc_rec = rec[..HEADER_LEN].to_vec();
            rc_rec.extend_from_slice(&body);
            rc_rec.extend_from_slice(&t);
            assert_eq!(rc_rec, rec, "{aead:?} seq {seq}: records differ");
            assert_eq!(o.open(&mut rc_rec, 0), Ok(Opened::Data(&pt[..])));
        }
        assert_eq!(o.epoch(), Some(1));
    }
}
