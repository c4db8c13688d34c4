//! Known-answer tests. Sources of the expected values:
//! - HMAC-SHA-256: RFC 4231 test cases 1, 2 and 6.
//! - KDF and session keys: the `bzrtpCryptoTest` KDF patterns of Linphone's bzrtp (generated
//!   there with GNU ZRTP C++), one key and KDF_Context for all labels.
//! - X25519: RFC 7748 §5.2 and §6.1.
//! - AES-CFB: NIST SP 800-38A F.3.13 (CFB128-AES128.Encrypt); the partial-block case was
//!   cross-checked with `openssl enc -aes-128-cfb`.
//! - s0, preshared key, key ID, IDs, total_hash, hvi, exported key: computed with Python's
//!   `hashlib`/`hmac` directly from the RFC 6189 formulas (independent of this code).

use super::*;
use crate::cache::Zid;
use crate::error::Error;
use crate::secret::Secret32;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn h32(s: &str) -> [u8; 32] {
    h(s).try_into().unwrap()
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(6189)
}

// ---------------------------------------------------------------- hash, HMAC, MAC

#[test]
fn sha256_known_answers() {
    assert_eq!(
        hex::encode(sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(sha256_parts(&[b"a", b"", b"bc"]), sha256(b"abc"));
}

#[test]
fn hmac_rfc4231() {
    // Test case 1.
    assert_eq!(
        hex::encode(hmac_sha256(&[0x0b; 20], &[b"Hi There"])),
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    );
    // Test case 2, split into parts.
    assert_eq!(
        hex::encode(hmac_sha256(
            b"Jefe",
            &[b"what do ya want ", b"for nothing?"]
        )),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // Test case 6: key longer than the block (131 bytes) is hashed first.
    assert_eq!(
        hex::encode(hmac_sha256(
            &[0xaa; 131],
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"]
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
    // A key of exactly one block is used as is.
    let k64 = [0x5c; 64];
    assert_ne!(
        hmac_sha256(&k64, &[b"x"]),
        hmac_sha256(&sha256(&k64), &[b"x"])
    );
}

#[test]
fn mac8_is_truncated_hmac_and_mac_eq_works() {
    let full = hmac_sha256(&[0x0b; 20], &[b"Hi There"]);
    let m = mac8(&[0x0b; 20], b"Hi There");
    assert_eq!(m[..], full[..8]);
    assert!(mac_eq(&m, &full[..8]));
    let mut bad = m;
    bad[7] ^= 1;
    assert!(!mac_eq(&bad, &m));
    assert!(!mac_eq(&m[..7], &m));
}

// ---------------------------------------------------------------- KDF (bzrtp vectors)

const BZ_KEY: &str = "33e66c01ca6fe64fb76ffde31cabc0fbad3d3102676b0c090fc996381e0a8c2f";
const BZ_CTX: &str = "f01f240200000000\
    8024adfb94a90690cf9ced13998c51347dc435a74d75254480c211f2d3205ea71b4ba4eec78eb7357528e56fcf4f749f";

#[test]
fn kdf_matches_bzrtp_vectors() {
    let key = h(BZ_KEY);
    let ctx = h(BZ_CTX);
    assert_eq!(ctx.len(), 56);
    let cases: [(&str, u32, &str); 9] = [
        (
            "Responder SRTP master key",
            128,
            "f2cfc5724acfd7b50e89bed8a5c9f2cd",
        ),
        (
            "Responder SRTP master salt",
            112,
            "3c8fb13fd6ca83fbd6af3bd5ab1c",
        ),
        (
            "SAS",
            256,
            "d269b0718ad58f3c8e0dcf4535811d951847314128319f54c606595b522c5287",
        ),
        (
            "ZRTP Session Key",
            256,
            "c363390bc9ee13aa9e6a00528409ddc90717e01d1ae2dcf9a70ab98886ac6975",
        ),
        (
            "retained secret",
            256,
            "a7272dee77e7990c24b20b9f54ba2b617a23d8a59765829b78072bc51299015c",
        ),
        (
            "Responder ZRTP key",
            128,
            "75767d41829cb697c7a20d6812eadb9a",
        ),
        (
            "Initiator ZRTP key",
            128,
            "08a821460cbd6ce0f1fe3c4c704e3bea",
        ),
        (
            "Responder HMAC key",
            256,
            "2169f15c1b85a23977024d5ea71f481623fe94dc1aabf489b8744d0d373d7cab",
        ),
        (
            "Initiator HMAC key",
            256,
            "1d117befd627cc5a80d0236e8d496be42a6a0118ac4159e861b9b14a784b5d3f",
        ),
    ];
    for (label, l, want) in cases {
        assert_eq!(
            hex::encode(kdf(&key, label.as_bytes(), &ctx, l)),
            want,
            "{label}"
        );
        if l == 256 {
            assert_eq!(
                hex::encode(kdf32(&key, label.as_bytes(), &ctx).expose()),
                want
            );
        }
    }
}

#[test]
fn kdf_length_field_is_in_bits_and_changes_output() {
    let key = h(BZ_KEY);
    let ctx = h(BZ_CTX);
    // L is part of the MAC input: a 128-bit key is not the prefix of the 256-bit output.
    let k128 = kdf(&key, b"SAS", &ctx, 128);
    let k256 = kdf(&key, b"SAS", &ctx, 256);
    assert_eq!(k128.len(), 16);
    assert_ne!(k128[..], k256[..16]);
    // Oversized L is clamped to the HMAC length; odd L masks the unused bits.
    assert_eq!(kdf(&key, b"SAS", &ctx, 512).len(), 32);
    let k12 = kdf(&key, b"SAS", &ctx, 12);
    assert_eq!(k12.len(), 2);
    assert_eq!(k12[1] & 0x0f, 0);
}

#[test]
fn session_keys_match_bzrtp_vectors() {
    let s0 = Secret32::from_slice(&h(BZ_KEY)).unwrap();
    let k = SessionKeys::derive(&s0, &h(BZ_CTX));
    assert_eq!(
        hex::encode(k.mackeyi.expose()),
        "1d117befd627cc5a80d0236e8d496be42a6a0118ac4159e861b9b14a784b5d3f"
    );
    assert_eq!(
        hex::encode(k.mackeyr.expose()),
        "2169f15c1b85a23977024d5ea71f481623fe94dc1aabf489b8744d0d373d7cab"
    );
    assert_eq!(hex::encode(k.zrtpkeyi), "08a821460cbd6ce0f1fe3c4c704e3bea");
    assert_eq!(hex::encode(k.zrtpkeyr), "75767d41829cb697c7a20d6812eadb9a");
    assert_eq!(
        hex::encode(k.sashash),
        "d269b0718ad58f3c8e0dcf4535811d951847314128319f54c606595b522c5287"
    );
    assert_eq!(
        hex::encode(k.zrtp_sess.expose()),
        "c363390bc9ee13aa9e6a00528409ddc90717e01d1ae2dcf9a70ab98886ac6975"
    );
    assert_eq!(
        hex::encode(k.new_rs1.expose()),
        "a7272dee77e7990c24b20b9f54ba2b617a23d8a59765829b78072bc51299015c"
    );
    // Not in bzrtp's patterns: Python hmac over the RFC formula.
    assert_eq!(
        hex::encode(k.exported_key.expose()),
        "612ea0e3d222da5493edc9bd4d1d625d2d95931459c603e1410350c9e3bbcbc0"
    );
    let dbg = format!("{k:?}");
    assert!(!dbg.contains("1d11") && !dbg.contains("d269"), "{dbg}");
}

// ---------------------------------------------------------------- s0, preshared, context

fn zids() -> (Zid, Zid) {
    let mut i = [0u8; 12];
    let mut r = [0u8; 12];
    for k in 0..12 {
        i[k] = k as u8 + 1;
        r[k] = 0xa1 + k as u8;
    }
    (Zid(i), Zid(r))
}

const HELLO: &[u8] = b"HELLO-responder";
const COMMIT: &[u8] = b"COMMIT-msg";
const DH1: &[u8] = b"DHPart1-msg";
const DH2: &[u8] = b"DHPart2-msg-longer";

#[test]
fn total_hash_hvi_and_context() {
    let th = total_hash_dh(HELLO, COMMIT, DH1, DH2);
    assert_eq!(
        hex::encode(th),
        "23d1c93ea12e15f82eb0c1446ed4286518160d2d3df47876c387fee6eba611a7"
    );
    assert_eq!(
        hex::encode(hvi(DH2, HELLO)),
        "0b531fa1165c077b9b380bd466b7ff25f20ff331a81025524de9eeb7241f7345"
    );
    // Order matters: the commitment is DHPart2 first.
    assert_ne!(hvi(HELLO, DH2), hvi(DH2, HELLO));
    assert_eq!(
        hex::encode(total_hash_preshared(HELLO, COMMIT)),
        "03ce14ff3505dd213cba54030ab8842782b307927e4a9638ee43fea53220f91b"
    );
    let (zi, zr) = zids();
    let ctx = kdf_context(&zi, &zr, &th);
    assert_eq!(ctx.len(), 56);
    assert_eq!(ctx[..12], zi.0);
    assert_eq!(ctx[12..24], zr.0);
    assert_eq!(ctx[24..], th);
}

#[test]
fn s0_dh_known_answers() {
    let (zi, zr) = zids();
    let th = total_hash_dh(HELLO, COMMIT, DH1, DH2);
    let dh = Secret32::new([0x42; 32]);
    let s1 = Secret32::new([0x11; 32]);
    let pbx = [0x33u8; 32];
    let none = s0_dh(&dh, &zi, &zr, &th, None, None, None);
    assert_eq!(
        hex::encode(none.expose()),
        "9fa77c61298db3dc1ce9f88ae3f5d698d83f009e76eff675817f5f3dcc646c12"
    );
    let s1only = s0_dh(&dh, &zi, &zr, &th, Some(&s1), None, None);
    assert_eq!(
        hex::encode(s1only.expose()),
        "6a8437089e17ac83bd489ca59401f0e40697ab12a5d7ec7ad343a33b4bf27355"
    );
    let all = s0_dh(
        &dh,
        &zi,
        &zr,
        &th,
        Some(&s1),
        Some(b"aux secret"),
        Some(&pbx),
    );
    assert_eq!(
        hex::encode(all.expose()),
        "416d013f87566dcf6f173e116d867e412077d36e1c3781ecf5020ce020431a89"
    );
    // ZIDi and ZIDr are ordered by role, not by side.
    assert_ne!(s0_dh(&dh, &zr, &zi, &th, None, None, None), none);
    // An empty but present s2 is the same as a null one (both are len 0).
    assert_eq!(s0_dh(&dh, &zi, &zr, &th, None, Some(b""), None), none);
}

#[test]
fn preshared_known_answers() {
    let rs1 = Secret32::new([0x77; 32]);
    let psk = preshared_key(&rs1, None, None);
    assert_eq!(
        hex::encode(psk.expose()),
        "5175fc90ff541907460c5d7d1b5cc5b457232a9304b1f309e4aad8c052a6aadd"
    );
    assert_eq!(
        hex::encode(preshared_key(&rs1, Some(b"aux secret"), None).expose()),
        "b47c68cf7ba8bd5e8c55e5230c65d88b15626a412f790eb993dc0f9133b964ef"
    );
    assert_eq!(hex::encode(preshared_key_id(&psk)), "81902fd65c8ccb8b");
    let (zi, zr) = zids();
    let ctx = kdf_context(&zi, &zr, &total_hash_preshared(HELLO, COMMIT));
    assert_eq!(
        hex::encode(s0_preshared(&psk, &ctx).expose()),
        "a701a5a480379d12a0761276b5d66092b0ec57b916184fde5ad99178d61494ce"
    );
}

// ---------------------------------------------------------------- hash chain

#[test]
fn hash_chain_links() {
    let c = HashChain::from_h0([0; 32]);
    assert_eq!(
        hex::encode(c.h1),
        "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
    );
    assert_eq!(c.h2, sha256(&c.h1));
    assert_eq!(c.h3, sha256(&c.h2));
    assert!(chain_link_ok(&c.h0, &c.h1));
    assert!(chain_link_ok(&c.h1, &c.h2));
    assert!(chain_link_ok(&c.h2, &c.h3));
    assert!(!chain_link_ok(&c.h0, &c.h2));
    assert!(!chain_link_ok(&c.h3, &c.h2));

    let mut r = rng();
    let a = HashChain::generate(&mut r);
    let b = HashChain::generate(&mut r);
    assert_ne!(a.h0, b.h0);
    assert_ne!(a.h0, [0; 32]);
    assert!(chain_link_ok(&a.h2, &a.h3));
    let dbg = format!("{a:?}");
    assert!(!dbg.contains(&hex::encode(&a.h0[..4])), "{dbg}");
}

// ---------------------------------------------------------------- X25519

#[test]
fn x25519_rfc7748_section_6_1() {
    let alice = X25519KeyPair::from_private_bytes(h32(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let bob = X25519KeyPair::from_private_bytes(h32(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    assert_eq!(
        hex::encode(alice.public()),
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    );
    assert_eq!(
        hex::encode(bob.public()),
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    );
    let (apub, bpub) = (alice.public(), bob.public());
    let k1 = alice.agree(&bpub).unwrap();
    let k2 = bob.agree(&apub).unwrap();
    assert_eq!(
        hex::encode(k1.expose()),
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    );
    assert_eq!(k1, k2);
}

#[test]
fn x25519_rfc7748_section_5_2() {
    let k = X25519KeyPair::from_private_bytes(h32(
        "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
    ));
    let out = k
        .agree(&h(
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
        ))
        .unwrap();
    assert_eq!(
        hex::encode(out.expose()),
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    );
}

#[test]
fn x25519_rejects_bad_public_values() {
    let mut r = rng();
    // Low-order points (RFC 7748 §6.1 all-zero check): 0, 1, the order-8 points, p, p+1.
    let low_order = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];
    for pv in low_order {
        let kp = X25519KeyPair::generate(&mut r);
        assert!(
            matches!(kp.agree(&h(pv)), Err(Error::BadPublicValue)),
            "{pv}"
        );
    }
    for len in [0usize, 31, 33, 384] {
        let kp = X25519KeyPair::generate(&mut r);
        assert!(matches!(
            kp.agree(&vec![9u8; len]),
            Err(Error::BadPublicValue)
        ));
    }
    // Random pairs agree; Debug shows no private key.
    let a = X25519KeyPair::generate(&mut r);
    let b = X25519KeyPair::generate(&mut r);
    assert_ne!(a.public(), b.public());
    assert!(format!("{a:?}").starts_with("X25519KeyPair(public="));
    let (ap, bp) = (a.public(), b.public());
    assert_eq!(a.agree(&bp).unwrap(), b.agree(&ap).unwrap());
}

// ---------------------------------------------------------------- Confirm

const NIST_KEY: &str = "2b7e151628aed2a6abf7158809cf4f3c";
const NIST_IV: &str = "000102030405060708090a0b0c0d0e0f";
const NIST_PT: &str = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51\
    30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710";
const NIST_CT: &str = "3b3fd92eb72dad20333449f8e83cfb4ac8a64537a0b3a93fcde3cdad9f1ce58b\
    26751f67a3cbb140b1808cf187a4f4dfc04b05357c5d1c0eeac4c66f9ff7f2e6";

#[test]
fn confirm_cfb_nist_sp800_38a() {
    let key: [u8; 16] = h(NIST_KEY).try_into().unwrap();
    let iv: [u8; 16] = h(NIST_IV).try_into().unwrap();
    let mut data = h(NIST_PT);
    confirm_encrypt(&key, &iv, &mut data);
    assert_eq!(hex::encode(&data), NIST_CT);
    confirm_decrypt(&key, &iv, &mut data);
    assert_eq!(hex::encode(&data), NIST_PT);

    // Partial final block (a Confirm's encrypted part is 40 bytes without signature):
    // truncated keystream, same prefix as the full-block ciphertext.
    let mut part = h(NIST_PT)[..40].to_vec();
    confirm_encrypt(&key, &iv, &mut part);
    assert_eq!(hex::encode(&part), NIST_CT[..80]);
    confirm_decrypt(&key, &iv, &mut part);
    assert_eq!(part, h(NIST_PT)[..40]);
}

#[test]
fn confirm_mac_is_mac8_over_ciphertext() {
    let k = Secret32::new([0x24; 32]);
    let ct = h(NIST_CT);
    assert_eq!(confirm_mac(&k, &ct), mac8(&[0x24; 32], &ct));
    let mut tampered = ct.clone();
    tampered[0] ^= 0x80;
    assert!(!mac_eq(&confirm_mac(&k, &tampered), &confirm_mac(&k, &ct)));
}

// ---------------------------------------------------------------- retained secrets

#[test]
fn rs_ids_known_answers() {
    let rs1 = Secret32::new([0x77; 32]);
    assert_eq!(hex::encode(rs_id(&rs1, b"Initiator")), "e8d0b4e19abf6ec5");
    assert_eq!(hex::encode(rs_id(&rs1, b"Responder")), "edd36b4e80bb78b1");
    assert_eq!(RsRole::Initiator.label(), b"Initiator");
    assert_eq!(RsRole::Responder.label(), b"Responder");
    let mut r = rng();
    assert_ne!(random_id(&mut r), random_id(&mut r));
}

/// One side's (rs1, rs2).
type Pair<'a> = (Option<&'a Secret32>, Option<&'a Secret32>);

/// What each side computes as s1 when the initiator holds `(i1, i2)` and the responder
/// `(r1, r2)`, with absent secrets replaced by random IDs as the RFC requires.
fn both_sides(i: Pair, r: Pair) -> (Option<Secret32>, Option<Secret32>) {
    let mut g = rng();
    let mut ids = |rs: Option<&Secret32>, role: RsRole| match rs {
        Some(s) => rs_id(s, role.label()),
        None => random_id(&mut g),
    };
    // DHPart2 from the initiator, DHPart1 from the responder.
    let (i1, i2) = (ids(i.0, RsRole::Initiator), ids(i.1, RsRole::Initiator));
    let (r1, r2) = (ids(r.0, RsRole::Responder), ids(r.1, RsRole::Responder));
    let at_initiator = match_retained(i, RsRole::Responder, &r1, &r2);
    let at_responder = match_retained(r, RsRole::Initiator, &i1, &i2);
    (at_initiator, at_responder)
}

#[test]
fn match_retained_is_symmetric() {
    let a = Secret32::new([0xA1; 32]);
    let b = Secret32::new([0xB2; 32]);
    let c = Secret32::new([0xC3; 32]);
    let d = Secret32::new([0xD4; 32]);

    // (initiator, responder, expected s1)
    let cases: Vec<(Pair, Pair, Option<&Secret32>)> = vec![
        // In sync.
        ((Some(&a), Some(&b)), (Some(&a), Some(&b)), Some(&a)),
        // Responder updated, initiator did not: initiator's rs1 is the responder's rs2.
        ((Some(&b), Some(&c)), (Some(&a), Some(&b)), Some(&b)),
        // Initiator updated, responder did not: initiator's rs2 is the responder's rs1.
        ((Some(&a), Some(&b)), (Some(&b), Some(&c)), Some(&b)),
        // Only the rs2s agree.
        ((Some(&a), Some(&c)), (Some(&b), Some(&c)), Some(&c)),
        // Initiator rs1 wins over initiator rs2 when both match something.
        ((Some(&a), Some(&b)), (Some(&b), Some(&a)), Some(&a)),
        // Disjoint caches.
        ((Some(&a), Some(&b)), (Some(&c), Some(&d)), None),
        // One side has no cache at all.
        ((None, None), (Some(&a), Some(&b)), None),
        ((Some(&a), None), (None, None), None),
        // Only rs1 on each side.
        ((Some(&a), None), (Some(&a), None), Some(&a)),
        ((Some(&a), None), (None, Some(&a)), Some(&a)),
    ];
    for (n, (i, r, want)) in cases.into_iter().enumerate() {
        let (at_i, at_r) = both_sides(i, r);
        assert_eq!(at_i.as_ref(), want, "case {n} initiator");
        assert_eq!(at_r.as_ref(), want, "case {n} responder");
    }
}

#[test]
fn match_retained_uses_the_peer_role_label() {
    let a = Secret32::new([0xA1; 32]);
    // IDs computed with the wrong label must not match.
    let wrong = rs_id(&a, b"Initiator");
    assert!(match_retained((Some(&a), None), RsRole::Responder, &wrong, &wrong).is_none());
    let right = rs_id(&a, b"Responder");
    assert_eq!(
        match_retained((Some(&a), None), RsRole::Responder, &right, &[0; 8]),
        Some(a.clone())
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// The RFC 6189 §4.3 rule evaluated on the secret values themselves (the oracle).
    fn rfc_s1(i: Pair, r: Pair) -> Option<Secret32> {
        let in_r = |s: &Secret32| r.0 == Some(s) || r.1 == Some(s);
        match (i.0, i.1) {
            (Some(s), _) if in_r(s) => Some(s.clone()),
            (_, Some(s)) if in_r(s) => Some(s.clone()),
            _ => None,
        }
    }

    proptest! {
        // Each slot picks one of four secrets or none (index 4).
        #[test]
        fn match_retained_agrees_with_rfc_rule(
            i1 in 0usize..5, i2 in 0usize..5, r1 in 0usize..5, r2 in 0usize..5,
        ) {
            let pool: Vec<Secret32> = (0u8..4).map(|k| Secret32::new([k + 1; 32])).collect();
            let pick = |n: usize| pool.get(n);
            let i = (pick(i1), pick(i2));
            let r = (pick(r1), pick(r2));
            let want = rfc_s1(i, r);
            let (at_i, at_r) = both_sides(i, r);
            prop_assert_eq!(at_i, want.clone());
            prop_assert_eq!(at_r, want);
        }

        #[test]
        fn confirm_round_trip_any_length(
            key in any::<[u8; 16]>(), iv in any::<[u8; 16]>(),
            data in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let mut buf = data.clone();
            confirm_encrypt(&key, &iv, &mut buf);
            if data.len() >= 4 {
                prop_assert_ne!(&buf, &data);
            }
            confirm_decrypt(&key, &iv, &mut buf);
            prop_assert_eq!(buf, data);
        }
    }
}

/// The Edwards-form X25519 in `dh.rs` must be the RFC 7748 function for every input: points
/// of the curve (with and without small-order components), points of the twist, both values
/// of the ignored top bit, non-canonical encodings and the low-order list.
#[test]
fn x25519_matches_the_montgomery_ladder_on_all_kinds_of_input() {
    use rand::RngCore;
    let mut r = rng();
    let reference = |k: [u8; 32], u: [u8; 32]| x25519_dalek::x25519(k, u);
    let check = |k: [u8; 32], u: [u8; 32]| {
        let expected = reference(k, u);
        match X25519KeyPair::from_private_bytes(k).agree(&u) {
            Ok(s) => assert_eq!(s.expose(), &expected, "u = {}", hex::encode(u)),
            Err(Error::BadPublicValue) => assert_eq!(expected, [0; 32], "{}", hex::encode(u)),
            Err(e) => panic!("{e}"),
        }
    };
    let order8 = h32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800");
    for i in 0..300 {
        let mut k = [0u8; 32];
        r.fill_bytes(&mut k);
        // A point of the curve: someone's public key.
        let mut other = [0u8; 32];
        r.fill_bytes(&mut other);
        let mut on_curve = reference(other, x25519_dalek::X25519_BASEPOINT_BYTES);
        check(k, on_curve);
        // The same with the ignored top bit set.
        on_curve[31] |= 0x80;
        check(k, on_curve);
        // Random u: about half are on the twist.
        let mut u = [0u8; 32];
        r.fill_bytes(&mut u);
        check(k, u);
        // A curve point plus a small-order component (a public key times a small-order
        // point is not reachable from u alone; use the order-8 point and u + p forms).
        if i % 50 == 0 {
            check(k, order8);
            // u + p for small u is a non-canonical encoding of u.
            let mut noncanon =
                h32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
            noncanon[0] = noncanon[0].wrapping_add(9); // p + 9 ≡ 9, the base point
            check(k, noncanon);
            check(k, x25519_dalek::X25519_BASEPOINT_BYTES);
        }
    }
    // u = -1 (p - 1) has no Edwards point: the ladder answers.
    let minus_one = h32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
    let mut k = [0u8; 32];
    r.fill_bytes(&mut k);
    check(k, minus_one);
}
