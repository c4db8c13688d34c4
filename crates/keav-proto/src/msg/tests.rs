use super::*;
use crate::cache::Zid;
use crate::codec::{Codec, Reader};
use crate::packet::decode_packet;
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Strategies

fn arb_algo() -> impl Strategy<Value = AlgoId> {
    prop_oneof![
        Just(AlgoId::S256),
        Just(AlgoId::AES1),
        Just(AlgoId::HS32),
        Just(AlgoId::X255),
        Just(AlgoId::KVCP),
        any::<[u8; 4]>().prop_map(AlgoId),
    ]
}

fn arb_list(max: usize) -> impl Strategy<Value = Vec<AlgoId>> {
    vec(arb_algo(), 0..=max)
}

fn arb_hello_with(max: usize) -> impl Strategy<Value = Hello> {
    (
        (
            any::<[u8; 4]>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            any::<[u8; 12]>(),
            any::<(bool, bool, bool)>(),
        ),
        (
            arb_list(max),
            arb_list(max),
            arb_list(max),
            arb_list(max),
            arb_list(max),
        ),
        any::<[u8; 8]>(),
    )
        .prop_map(
            |((version, client_id, h3, zid, (s, m, p)), (h, c, a, k, sas), mac)| Hello {
                version,
                client_id,
                h3,
                zid: Zid(zid),
                signature_capable: s,
                mitm: m,
                passive: p,
                hashes: h,
                ciphers: c,
                auth_tags: a,
                key_agreements: k,
                sas_types: sas,
                mac,
            },
        )
}

fn arb_commit_body() -> impl Strategy<Value = CommitBody> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|hvi| CommitBody::Dh { hvi }),
        (any::<[u8; 16]>(), any::<[u8; 8]>())
            .prop_map(|(nonce, key_id)| CommitBody::Preshared { nonce, key_id }),
        any::<[u8; 16]>().prop_map(|nonce| CommitBody::Multistream { nonce }),
    ]
}

/// Any Commit, consistent or not.
fn arb_commit_any() -> impl Strategy<Value = Commit> {
    (
        any::<[u8; 32]>(),
        any::<[u8; 12]>(),
        [arb_algo(), arb_algo(), arb_algo(), arb_algo()],
        prop_oneof![Just(AlgoId::PRSH), Just(AlgoId::MULT), arb_algo()],
        arb_commit_body(),
        any::<[u8; 8]>(),
    )
        .prop_map(
            |(h2, zid, [hash, cipher, auth_tag, sas], ka, body, mac)| Commit {
                h2,
                zid: Zid(zid),
                hash,
                cipher,
                auth_tag,
                key_agreement: ka,
                sas,
                body,
                mac,
            },
        )
}

/// A consistent Commit: the key agreement is forced to match the body.
fn arb_commit() -> impl Strategy<Value = Commit> {
    arb_commit_any().prop_map(|mut c| {
        match c.body {
            CommitBody::Preshared { .. } => c.key_agreement = AlgoId::PRSH,
            CommitBody::Multistream { .. } => c.key_agreement = AlgoId::MULT,
            CommitBody::Dh { .. } => {
                if c.key_agreement == AlgoId::PRSH || c.key_agreement == AlgoId::MULT {
                    c.key_agreement = AlgoId::X255;
                }
            }
        }
        c
    })
}

fn arb_dhpart_with(pv: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = DhPart> {
    (
        any::<[u8; 32]>(),
        any::<[[u8; 8]; 4]>(),
        pv,
        any::<[u8; 8]>(),
    )
        .prop_map(|(h1, [rs1_id, rs2_id, aux_id, pbx_id], pv, mac)| DhPart {
            h1,
            rs1_id,
            rs2_id,
            aux_id,
            pbx_id,
            pv,
            mac,
        })
}

fn arb_dhpart() -> impl Strategy<Value = DhPart> {
    arb_dhpart_with((1usize..=100).prop_flat_map(|w| vec(any::<u8>(), w * 4)))
}

fn arb_confirm_with(enc: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Confirm> {
    (any::<[u8; 8]>(), any::<[u8; 16]>(), enc).prop_map(|(confirm_mac, iv, encrypted)| Confirm {
        confirm_mac,
        iv,
        encrypted,
    })
}

fn arb_confirm() -> impl Strategy<Value = Confirm> {
    arb_confirm_with((10usize..=60).prop_flat_map(|w| vec(any::<u8>(), w * 4)))
}

fn arb_kverify_with(payload: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = KVerify> {
    (arb_algo(), any::<u8>(), payload, any::<[u8; 16]>()).prop_map(
        |(backend, step, payload, mac)| KVerify {
            backend,
            step,
            payload,
            mac,
        },
    )
}

fn arb_kverify() -> impl Strategy<Value = KVerify> {
    arb_kverify_with(vec(any::<u8>(), 0..=MAX_KVERIFY_PAYLOAD))
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_hello_with(MAX_ALGOS_PER_LIST).prop_map(Message::Hello),
        Just(Message::HelloAck),
        arb_commit().prop_map(Message::Commit),
        arb_dhpart().prop_map(Message::DhPart1),
        arb_dhpart().prop_map(Message::DhPart2),
        arb_confirm().prop_map(Message::Confirm1),
        arb_confirm().prop_map(Message::Confirm2),
        Just(Message::Conf2Ack),
        any::<u32>().prop_map(|code| Message::Error(ErrorMsg { code })),
        Just(Message::ErrorAck),
        arb_kverify().prop_map(Message::KVerify),
    ]
}

/// Messages that may break invariants (long lists, odd pv, short Confirm, inconsistent
/// Commit, oversize payloads).
fn arb_message_any() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_hello_with(17).prop_map(Message::Hello),
        arb_commit_any().prop_map(Message::Commit),
        arb_dhpart_with(vec(any::<u8>(), 0..48)).prop_map(Message::DhPart1),
        arb_dhpart_with(vec(any::<u8>(), 1960..1975)).prop_map(Message::DhPart2),
        arb_confirm_with(vec(any::<u8>(), 0..60)).prop_map(Message::Confirm1),
        arb_kverify_with(vec(any::<u8>(), 1020..1030)).prop_map(Message::KVerify),
    ]
}

/// Reads the packets of the captured bzrtp trace.
fn trace_messages() -> Vec<Vec<u8>> {
    include_str!("testdata/bzrtp_trace.hex")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let p = hex::decode(l.trim()).unwrap();
            decode_packet(&p).unwrap().message.to_vec()
        })
        .collect()
}

fn sample_messages() -> Vec<Message> {
    let mut v: Vec<Message> = trace_messages()
        .iter()
        .map(|m| Message::parse(m).unwrap())
        .collect();
    v.push(Message::Error(ErrorMsg { code: 0x61 }));
    v.push(Message::ErrorAck);
    v.push(Message::Commit(commit_prsh()));
    v.push(Message::Commit(commit_mult()));
    v.push(Message::KVerify(KVerify {
        backend: AlgoId::KVCP,
        step: 2,
        payload: vec![9; 33],
        mac: [7; 16],
    }));
    v.push(Message::KVerify(KVerify {
        backend: AlgoId::KVSM,
        step: 0,
        payload: vec![],
        mac: [1; 16],
    }));
    v.push(Message::DhPart2(dhpart_x255()));
    v
}

fn commit_prsh() -> Commit {
    Commit {
        h2: [0x22; 32],
        zid: Zid([0x33; 12]),
        hash: AlgoId::S256,
        cipher: AlgoId::AES1,
        auth_tag: AlgoId::HS80,
        key_agreement: AlgoId::PRSH,
        sas: AlgoId::B256,
        body: CommitBody::Preshared {
            nonce: [0x44; 16],
            key_id: [0x55; 8],
        },
        mac: [0x66; 8],
    }
}

fn commit_mult() -> Commit {
    Commit {
        key_agreement: AlgoId::MULT,
        body: CommitBody::Multistream { nonce: [0x77; 16] },
        ..commit_prsh()
    }
}

fn dhpart_x255() -> DhPart {
    DhPart {
        h1: [0x11; 32],
        rs1_id: [1; 8],
        rs2_id: [2; 8],
        aux_id: [3; 8],
        pbx_id: [4; 8],
        pv: (0u8..32).collect(),
        mac: [0xee; 8],
    }
}

fn set_len_field(bytes: &mut [u8]) {
    let words = (bytes.len() / 4) as u16;
    bytes[2..4].copy_from_slice(&words.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Known layouts, byte for byte

#[test]
fn hello_layout_matches_rfc_figure_3() {
    let hello = Hello {
        version: ZRTP_VERSION,
        client_id: *b"keav test cid 01",
        h3: [0xa3; 32],
        zid: Zid([0xc0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        signature_capable: false,
        mitm: true,
        passive: false,
        hashes: vec![AlgoId::S256],
        ciphers: vec![AlgoId::AES1],
        auth_tags: vec![AlgoId::HS32, AlgoId::HS80],
        key_agreements: vec![AlgoId::X255, AlgoId::DH3K],
        sas_types: vec![AlgoId::B32],
        mac: [0xd1, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8],
    };
    let b = Message::Hello(hello.clone()).encode();
    // 22 fixed words + 7 algorithm words.
    assert_eq!(b.len(), 29 * 4);
    assert_eq!(&b[0..2], &[0x50, 0x5a]);
    assert_eq!(&b[2..4], &[0x00, 29]);
    assert_eq!(&b[4..12], b"Hello   ");
    assert_eq!(&b[12..16], b"1.10");
    assert_eq!(&b[16..32], b"keav test cid 01");
    assert_eq!(&b[32..64], &[0xa3; 32]);
    assert_eq!(&b[64..76], &[0xc0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    // 0|S|M|P, 8 unused bits, hc=1 cc=1 ac=2 kc=2 sc=1.
    assert_eq!(&b[76..80], &[0x20, 0x01, 0x12, 0x21]);
    assert_eq!(&b[80..84], b"S256");
    assert_eq!(&b[84..88], b"AES1");
    assert_eq!(&b[88..96], b"HS32HS80");
    assert_eq!(&b[96..104], b"X255DH3k");
    assert_eq!(&b[104..108], b"B32 ");
    assert_eq!(
        &b[108..116],
        &[0xd1, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8]
    );
    assert_eq!(Message::parse(&b), Ok(Message::Hello(hello.clone())));

    // Each flag in its own bit of byte 76.
    for (s, m, p, byte) in [
        (true, false, false, 0x40),
        (false, true, false, 0x20),
        (false, false, true, 0x10),
    ] {
        let h = Hello {
            signature_capable: s,
            mitm: m,
            passive: p,
            ..hello.clone()
        };
        assert_eq!(Message::Hello(h).encode()[76], byte);
    }
    assert_eq!(mac_covered(&b, MessageType::Hello), Ok(&b[..108]));
}

#[test]
fn commit_layouts_match_rfc_figures_5_to_7() {
    let dh = Commit {
        key_agreement: AlgoId::X255,
        body: CommitBody::Dh { hvi: [0x88; 32] },
        ..commit_prsh()
    };
    let b = Message::Commit(dh.clone()).encode();
    assert_eq!(b.len(), 29 * 4);
    assert_eq!(&b[0..4], &[0x50, 0x5a, 0, 29]);
    assert_eq!(&b[4..12], b"Commit  ");
    assert_eq!(&b[12..44], &[0x22; 32]);
    assert_eq!(&b[44..56], &[0x33; 12]);
    assert_eq!(&b[56..76], b"S256AES1HS80X255B256");
    assert_eq!(&b[76..108], &[0x88; 32]);
    assert_eq!(&b[108..116], &[0x66; 8]);
    assert_eq!(Message::parse(&b), Ok(Message::Commit(dh)));

    let b = Message::Commit(commit_prsh()).encode();
    assert_eq!(b.len(), 27 * 4);
    assert_eq!(&b[0..4], &[0x50, 0x5a, 0, 27]);
    assert_eq!(&b[68..72], b"Prsh");
    assert_eq!(&b[76..92], &[0x44; 16]);
    assert_eq!(&b[92..100], &[0x55; 8]);
    assert_eq!(&b[100..108], &[0x66; 8]);
    assert_eq!(Message::parse(&b), Ok(Message::Commit(commit_prsh())));

    let b = Message::Commit(commit_mult()).encode();
    assert_eq!(b.len(), 25 * 4);
    assert_eq!(&b[0..4], &[0x50, 0x5a, 0, 25]);
    assert_eq!(&b[68..72], b"Mult");
    assert_eq!(&b[76..92], &[0x77; 16]);
    assert_eq!(&b[92..100], &[0x66; 8]);
    assert_eq!(Message::parse(&b), Ok(Message::Commit(commit_mult())));
}

#[test]
fn dhpart_layout_matches_rfc_figures_8_and_9() {
    let d = dhpart_x255();
    for (m, block) in [
        (Message::DhPart1(d.clone()), b"DHPart1 "),
        (Message::DhPart2(d.clone()), b"DHPart2 "),
    ] {
        let b = m.encode();
        // 21 words + 8 words of X25519 public value.
        assert_eq!(b.len(), 29 * 4);
        assert_eq!(&b[0..4], &[0x50, 0x5a, 0, 29]);
        assert_eq!(&b[4..12], block);
        assert_eq!(&b[12..44], &[0x11; 32]);
        assert_eq!(&b[44..52], &[1; 8]);
        assert_eq!(&b[52..60], &[2; 8]);
        assert_eq!(&b[60..68], &[3; 8]);
        assert_eq!(&b[68..76], &[4; 8]);
        assert_eq!(&b[76..108], &(0u8..32).collect::<Vec<_>>()[..]);
        assert_eq!(&b[108..116], &[0xee; 8]);
        assert_eq!(Message::parse(&b), Ok(m));
    }
}

#[test]
fn small_messages_layout() {
    assert_eq!(Message::HelloAck.encode(), b"\x50\x5a\x00\x03HelloACK");
    assert_eq!(Message::Conf2Ack.encode(), b"\x50\x5a\x00\x03Conf2ACK");
    assert_eq!(Message::ErrorAck.encode(), b"\x50\x5a\x00\x03ErrorACK");
    assert_eq!(
        Message::Error(ErrorMsg { code: 0x100 }).encode(),
        b"\x50\x5a\x00\x04Error   \x00\x00\x01\x00"
    );
}

#[test]
fn confirm_layout_and_body() {
    let body = ConfirmBody {
        h0: [0x0a; 32],
        sig_len_words: 0,
        flags: ConfirmFlags {
            e: false,
            v: true,
            a: false,
            d: true,
        },
        cache_expiry: 0xffff_ffff,
        signature: vec![],
    };
    let pt = body.to_bytes();
    assert_eq!(pt.len(), CONFIRM_MIN_ENCRYPTED_LEN);
    assert_eq!(&pt[32..36], &[0, 0, 0, 0x05]);
    assert_eq!(&pt[36..40], &[0xff; 4]);
    assert_eq!(ConfirmBody::from_bytes(&pt), Ok(body.clone()));

    let c = Confirm {
        confirm_mac: [0xcc; 8],
        iv: [0x1f; 16],
        encrypted: pt.clone(),
    };
    let b = Message::Confirm1(c.clone()).encode();
    // Without a signature a Confirm is 19 words (RFC 6189 §5.7).
    assert_eq!(b.len(), 19 * 4);
    assert_eq!(&b[0..4], &[0x50, 0x5a, 0, 19]);
    assert_eq!(&b[4..12], b"Confirm1");
    assert_eq!(&b[12..20], &[0xcc; 8]);
    assert_eq!(&b[20..36], &[0x1f; 16]);
    assert_eq!(&b[36..76], &pt[..]);
    assert_eq!(Message::parse(&b), Ok(Message::Confirm1(c)));

    // With a 3-word signature: sig len field 3, all flags.
    let signed = ConfirmBody {
        sig_len_words: 3,
        signature: b"X509abcdefgh".to_vec(),
        flags: ConfirmFlags {
            e: true,
            v: true,
            a: true,
            d: true,
        },
        cache_expiry: 0,
        ..body.clone()
    };
    let pt = signed.to_bytes();
    assert_eq!(&pt[32..36], &[0, 0, 0x03, 0x0f]);
    assert_eq!(&pt[40..], b"X509abcdefgh");
    assert_eq!(ConfirmBody::from_bytes(&pt), Ok(signed.clone()));
    // Maximum 9-bit length.
    let mut w = pt.clone();
    w[32..36].copy_from_slice(&[0, 0x01, 0xff, 0x0f]);
    w.resize(40 + 511 * 4, 0);
    assert_eq!(
        ConfirmBody::from_bytes(&w).map(|b| b.sig_len_words),
        Ok(511)
    );

    // Unused bits (15 high bits, 4 high flag bits) are ignored on receipt.
    let mut noisy = pt.clone();
    noisy[32] = 0xff;
    noisy[33] |= 0xfe;
    noisy[35] |= 0xf0;
    assert_eq!(ConfirmBody::from_bytes(&noisy), Ok(signed.clone()));

    // Signature length that disagrees with the bytes present.
    let mut short = pt.clone();
    short[34] = 4;
    assert_eq!(ConfirmBody::from_bytes(&short), Err(ParseError::Truncated));
    let mut long = pt;
    long[34] = 2;
    assert_eq!(ConfirmBody::from_bytes(&long), Err(ParseError::TooLong));
    assert!(ConfirmBody::from_bytes(&[0; 39]).is_err());

    // An inconsistent struct is caught by validate and its encoding is rejected.
    for bad in [
        ConfirmBody {
            sig_len_words: 2,
            ..signed.clone()
        },
        ConfirmBody {
            sig_len_words: 1,
            signature: vec![],
            ..signed.clone()
        },
        ConfirmBody {
            sig_len_words: 600,
            signature: vec![0; 2400],
            ..signed.clone()
        },
    ] {
        assert!(bad.validate().is_err());
        assert!(ConfirmBody::from_bytes(&bad.to_bytes()).is_err());
    }
}

#[test]
fn kverify_layout_and_checks() {
    let k = KVerify {
        backend: AlgoId::KVCP,
        step: 3,
        payload: vec![0xab; 5],
        mac: [0x5c; 16],
    };
    let b = Message::KVerify(k.clone()).encode();
    assert_eq!(b.len(), 12 + 8 + 8 + 16);
    assert_eq!(&b[0..4], &[0x50, 0x5a, 0, 11]);
    assert_eq!(&b[4..12], b"KVerify ");
    assert_eq!(&b[12..16], b"KVCP");
    assert_eq!(&b[16..20], &[3, 0, 0, 5]);
    assert_eq!(&b[20..25], &[0xab; 5]);
    assert_eq!(&b[25..28], &[0, 0, 0]);
    assert_eq!(&b[28..44], &[0x5c; 16]);
    assert_eq!(Message::parse(&b), Ok(Message::KVerify(k.clone())));
    assert_eq!(mac_covered(&b, MessageType::KVerify), Ok(&b[..28]));

    for pad in 25..28 {
        let mut x = b.clone();
        x[pad] = 1;
        assert_eq!(
            Message::parse(&x),
            Err(ParseError::BadField("KVerify padding not zero"))
        );
    }
    for reserved in [0x01, 0x80] {
        let mut x = b.clone();
        x[17] = reserved;
        assert_eq!(
            Message::parse(&x),
            Err(ParseError::BadField("KVerify reserved byte not zero"))
        );
    }
    // A payload length pointing into the MAC or beyond.
    let mut x = b.clone();
    x[19] = 9;
    assert!(Message::parse(&x).is_err());
    let mut x = b.clone();
    x[18..20].copy_from_slice(&1025u16.to_be_bytes());
    assert_eq!(
        Message::parse(&x),
        Err(ParseError::BadField("KVerify payload above 1024 bytes"))
    );

    let max = KVerify {
        payload: vec![1; MAX_KVERIFY_PAYLOAD],
        ..k.clone()
    };
    let b = Message::KVerify(max.clone()).try_encode().unwrap();
    assert_eq!(Message::parse(&b), Ok(Message::KVerify(max)));
    let over = Message::KVerify(KVerify {
        payload: vec![1; MAX_KVERIFY_PAYLOAD + 1],
        ..k
    });
    assert!(over.try_encode().is_err());
    assert!(Message::parse(&over.encode()).is_err());
}

// ---------------------------------------------------------------------------------------------
// Captured trace from deployed implementations

fn hmac_sha256_64(key: &[u8], data: &[u8]) -> [u8; 8] {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 8];
    out.copy_from_slice(&full[..8]);
    out
}

/// `[H0, H1, H2, H3]` of endpoint 0x12345678, then of 0x87654321.
fn trace_hash_chains() -> Vec<[[u8; 32]; 4]> {
    let hs: Vec<[u8; 32]> = include_str!("testdata/bzrtp_trace_hashchains.hex")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| hex::decode(l.trim()).unwrap().try_into().unwrap())
        .collect();
    assert_eq!(hs.len(), 8);
    vec![[hs[0], hs[1], hs[2], hs[3]], [hs[4], hs[5], hs[6], hs[7]]]
}

#[test]
fn captured_trace_fields_and_macs() {
    let msgs = trace_messages();
    let chains = trace_hash_chains();
    // Packets alternate between the endpoints as listed in the trace file.
    let owner = [0usize, 1, 0, 1, 0, 1, 0, 1, 0];
    assert_eq!(msgs.len(), owner.len());
    for (bytes, &who) in msgs.iter().zip(owner.iter()) {
        let h = &chains[who];
        let m = Message::parse(bytes).unwrap();
        assert_eq!(m.encode(), *bytes);
        let t = m.message_type();
        assert_eq!(peek_type(bytes), Ok(t));
        match &m {
            Message::Hello(hello) => {
                assert_eq!(hello.version, *b"1.10");
                assert_eq!(&hello.client_id, b"LINPHONE-ZRTPCPP");
                assert_eq!(hello.h3, h[3]);
                assert!(!hello.signature_capable && !hello.mitm && !hello.passive);
                assert_eq!(hello.hashes, [AlgoId::S256]);
                assert_eq!(hello.ciphers, [AlgoId::AES1]);
                assert_eq!(hello.auth_tags, [AlgoId::HS32, AlgoId::HS80]);
                assert_eq!(
                    hello.key_agreements,
                    [AlgoId::DH3K, AlgoId(*b"DH2k"), AlgoId::MULT]
                );
                assert_eq!(hello.sas_types, [AlgoId::B32]);
                let covered = mac_covered(bytes, t).unwrap();
                assert_eq!(hmac_sha256_64(&h[2], covered), hello.mac);
            }
            Message::Commit(c) => {
                assert_eq!(c.h2, h[2]);
                assert_eq!(c.key_agreement, AlgoId::DH3K);
                assert!(matches!(c.body, CommitBody::Dh { .. }));
                let covered = mac_covered(bytes, t).unwrap();
                assert_eq!(hmac_sha256_64(&h[1], covered), c.mac);
            }
            Message::DhPart1(d) | Message::DhPart2(d) => {
                assert_eq!(d.h1, h[1]);
                assert_eq!(d.pv.len(), 384);
                let covered = mac_covered(bytes, t).unwrap();
                assert_eq!(hmac_sha256_64(&h[0], covered), d.mac);
            }
            Message::Confirm1(c) | Message::Confirm2(c) => {
                assert_eq!(c.encrypted.len(), 40);
            }
            Message::HelloAck | Message::Conf2Ack => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Header checks

#[test]
fn header_errors() {
    let b = Message::HelloAck.encode();
    assert_eq!(Message::parse(&[]), Err(ParseError::Truncated));
    assert_eq!(Message::parse(&b[..3]), Err(ParseError::Truncated));
    let mut x = b.clone();
    x[0] = 0x51;
    assert_eq!(Message::parse(&x), Err(ParseError::BadPreamble));
    let mut x = b.clone();
    x[3] = 4;
    assert_eq!(Message::parse(&x), Err(ParseError::LengthMismatch));
    assert_eq!(Message::parse(&b[..8]), Err(ParseError::LengthMismatch));
    // Length field consistent with 8 bytes: no room for a type block.
    assert_eq!(
        Message::parse(b"\x50\x5a\x00\x02Hell"),
        Err(ParseError::Truncated)
    );
    let mut x = b.clone();
    x[4..12].copy_from_slice(b"Ping    ");
    assert_eq!(Message::parse(&x), Err(ParseError::UnknownType));
    x[4..12].copy_from_slice(b"helloack");
    assert_eq!(Message::parse(&x), Err(ParseError::UnknownType));
    // Trailing bytes within a consistent length.
    let mut x = b.clone();
    x.extend_from_slice(&[0; 4]);
    set_len_field(&mut x);
    assert_eq!(Message::parse(&x), Err(ParseError::TooLong));
    assert_eq!(peek_type(&b), Ok(MessageType::HelloAck));
    assert_eq!(peek_type(&b[..11]), Err(ParseError::Truncated));
}

#[test]
fn oversize_rejected_first() {
    // Valid-looking header, 2052 bytes: TooLong regardless of the rest.
    let mut b = vec![0u8; MAX_MESSAGE_LEN + 4];
    b[..12].copy_from_slice(b"\x50\x5a\x02\x01DHPart1 ");
    assert_eq!(Message::parse(&b), Err(ParseError::TooLong));
    assert_eq!(peek_type(&b), Err(ParseError::TooLong));
    // Even garbage: size is checked before the preamble.
    assert_eq!(
        Message::parse(&vec![0xff; MAX_MESSAGE_LEN + 1]),
        Err(ParseError::TooLong)
    );
    // The largest DHPart that fits, and one word more.
    let fits = DhPart {
        pv: vec![7; MAX_MESSAGE_LEN - 12 - 72],
        ..dhpart_x255()
    };
    let m = Message::DhPart1(fits.clone());
    assert_eq!(m.encoded_len(), MAX_MESSAGE_LEN);
    assert_eq!(Message::parse(&m.try_encode().unwrap()), Ok(m));
    let over = Message::DhPart1(DhPart {
        pv: vec![7; MAX_MESSAGE_LEN - 12 - 72 + 4],
        ..fits
    });
    assert_eq!(over.validate(), Err(ParseError::TooLong));
    assert_eq!(Message::parse(&over.encode()), Err(ParseError::TooLong));
}

#[test]
fn hello_counts_bounded_and_reserved_bits_ignored() {
    let b = Message::parse(&trace_messages()[0]).unwrap().encode();
    // Set hc to 8 (and compensate the length so only the count is wrong).
    let mut x = b.clone();
    x[77] = (x[77] & 0xf0) | 8;
    x.splice(80..80, *b"S384");
    x.splice(80..80, std::iter::repeat_n(0u8, 24));
    set_len_field(&mut x);
    assert_eq!(
        Message::parse(&x),
        Err(ParseError::BadField("Hello algorithm count above 7"))
    );
    // hc 15.
    let mut x = b.clone();
    x[77] |= 0x0f;
    assert!(Message::parse(&x).is_err());
    // Leading zero bit and the 8 unused bits set: ignored.
    let mut x = b.clone();
    x[76] |= 0x80 | 0x0f;
    x[77] |= 0xf0;
    assert_eq!(Message::parse(&x), Message::parse(&b));
    // Lists longer than 7 are refused by validate and their encoding does not parse.
    let mut h = match Message::parse(&b).unwrap() {
        Message::Hello(h) => h,
        _ => unreachable!(),
    };
    h.sas_types = vec![AlgoId::B32; 8];
    assert!(h.validate().is_err());
    assert!(Message::parse(&Message::Hello(h.clone()).encode()).is_err());
    h.sas_types = vec![AlgoId::B32; 16];
    assert!(Message::parse(&Message::Hello(h).encode()).is_err());
}

#[test]
fn commit_inconsistent_body_rejected() {
    for (ka, body) in [
        (AlgoId::PRSH, CommitBody::Dh { hvi: [0; 32] }),
        (AlgoId::MULT, CommitBody::Dh { hvi: [0; 32] }),
        (AlgoId::X255, CommitBody::Multistream { nonce: [0; 16] }),
        (AlgoId::PRSH, CommitBody::Multistream { nonce: [0; 16] }),
        (
            AlgoId::X255,
            CommitBody::Preshared {
                nonce: [0; 16],
                key_id: [0; 8],
            },
        ),
        (
            AlgoId::MULT,
            CommitBody::Preshared {
                nonce: [0; 16],
                key_id: [0; 8],
            },
        ),
    ] {
        let c = Commit {
            key_agreement: ka,
            body,
            ..commit_prsh()
        };
        assert!(c.validate().is_err());
        let m = Message::Commit(c);
        assert!(m.try_encode().is_err());
        assert!(Message::parse(&m.encode()).is_err());
    }
}

#[test]
fn dhpart_and_confirm_bounds() {
    let mut b = Message::DhPart1(dhpart_x255()).encode();
    // Remove the whole pv: 21 words, empty pv.
    b.drain(76..108);
    set_len_field(&mut b);
    assert_eq!(
        Message::parse(&b),
        Err(ParseError::BadField(
            "DH public value empty or not a multiple of 4 bytes"
        ))
    );
    let c = Confirm {
        confirm_mac: [0; 8],
        iv: [0; 16],
        encrypted: vec![0; 36],
    };
    assert!(c.validate().is_err());
    assert_eq!(
        Message::parse(&Message::Confirm2(c).encode()),
        Err(ParseError::Truncated)
    );
}

// ---------------------------------------------------------------------------------------------
// MAC helpers

#[test]
fn set_trailing_mac_works_and_checks() {
    let mut b = Message::DhPart2(dhpart_x255()).encode();
    let full = [0x42u8; 32];
    set_trailing_mac(&mut b, &full).unwrap();
    match Message::parse(&b).unwrap() {
        Message::DhPart2(d) => {
            assert_eq!(d.mac, [0x42; 8]);
            assert_eq!(d.pv, dhpart_x255().pv);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        set_trailing_mac(&mut b, &[1; 7]),
        Err(ParseError::BadField(
            "MAC shorter than the trailing MAC field"
        ))
    );
    let mut k = Message::KVerify(KVerify {
        backend: AlgoId::KVSM,
        step: 1,
        payload: vec![1, 2, 3],
        mac: [0; 16],
    })
    .encode();
    set_trailing_mac(&mut k, &(0u8..16).collect::<Vec<_>>()).unwrap();
    match Message::parse(&k).unwrap() {
        Message::KVerify(kv) => {
            assert_eq!(kv.mac, core::array::from_fn::<u8, 16, _>(|i| i as u8));
            assert_eq!(kv.payload, [1, 2, 3]);
        }
        other => panic!("{other:?}"),
    }
    let mut ack = Message::HelloAck.encode();
    assert!(set_trailing_mac(&mut ack, &[0; 8]).is_err());
    assert_eq!(ack, Message::HelloAck.encode());
    // A header with no room for the MAC.
    let mut short = b"\x50\x5a\x00\x03Hello   \x00\x00\x00".to_vec();
    assert_eq!(
        set_trailing_mac(&mut short, &[0; 8]),
        Err(ParseError::Truncated)
    );
    assert_eq!(
        mac_covered(&short, MessageType::Hello),
        Err(ParseError::Truncated)
    );
    assert_eq!(mac_covered(&ack, MessageType::HelloAck), Ok(&ack[..]));
    assert!(mac_covered(&ack, MessageType::Hello).is_err());
    assert_eq!(trailing_mac_len(MessageType::Commit), 8);
    assert_eq!(trailing_mac_len(MessageType::KVerify), 16);
    assert_eq!(trailing_mac_len(MessageType::Confirm1), 0);
}

#[test]
fn names_blocks_and_debug() {
    for t in MessageType::ALL {
        assert_eq!(MessageType::from_type_block(&t.type_block()), Some(t));
        assert!(t.name().len() <= 8);
        assert!(t.type_block().starts_with(t.name().as_bytes()));
    }
    assert_eq!(format!("{:?}", AlgoId::B32), "AlgoId(\"B32 \")");
    assert_eq!(
        format!("{:?}", AlgoId([0x41, 0, 0xff, 0x42])),
        "AlgoId(\"A\\x00\\xffB\")"
    );
    assert_eq!(AlgoId::DH3K.to_string(), "DH3k");
    assert_eq!(MessageType::Conf2Ack.to_string(), "Conf2ACK");
}

#[test]
fn codec_reads_concatenated_messages() {
    let msgs = sample_messages();
    let mut stream = Vec::new();
    for m in &msgs {
        Codec::encode(m, &mut stream);
    }
    let mut r = Reader::new(&stream);
    for m in &msgs {
        assert_eq!(&<Message as Codec>::read(&mut r).unwrap(), m);
    }
    assert_eq!(r.remaining(), 0);
}

// ---------------------------------------------------------------------------------------------
// Truncation and corruption

fn check_truncations(bytes: &[u8]) {
    for k in 0..bytes.len() {
        assert!(
            Message::parse(&bytes[..k]).is_err(),
            "prefix {k} of {bytes:02x?}"
        );
    }
}

/// Fixed-layout types must also reject word-truncation with a length field that was fixed up
/// (DHPart and Confirm legitimately have variable-length tails).
fn check_structural_truncations(bytes: &[u8]) {
    let t = peek_type(bytes).unwrap();
    if matches!(
        t,
        MessageType::DhPart1 | MessageType::DhPart2 | MessageType::Confirm1 | MessageType::Confirm2
    ) {
        return;
    }
    let mut k = bytes.len();
    while k >= 16 {
        k -= 4;
        let mut x = bytes[..k].to_vec();
        set_len_field(&mut x);
        assert!(Message::parse(&x).is_err(), "{t:?} cut to {k}");
    }
}

/// Flipping a byte of the preamble, length or type block (with any non-zero mask), or any bit
/// of a Hello count, must give an error or a different message — never the same one, never a
/// panic.
fn check_header_flips(bytes: &[u8]) {
    let orig = Message::parse(bytes).unwrap();
    let mut positions: Vec<(usize, u8)> = (0..12)
        .flat_map(|i| (1..=255u8).map(move |m| (i, m)))
        .collect();
    if orig.message_type() == MessageType::Hello {
        // Count nibbles: low nibble of byte 77, bytes 78 and 79.
        positions.extend((1..16u8).map(|m| (77, m)));
        positions.extend((78..80).flat_map(|i| (1..=255u8).map(move |m| (i, m))));
    }
    for (i, m) in positions {
        let mut x = bytes.to_vec();
        x[i] ^= m;
        match Message::parse(&x) {
            Err(_) => {}
            Ok(other) => assert_ne!(other, orig, "flip {m:#x} at {i}"),
        }
    }
}

#[test]
fn sample_truncations_and_flips() {
    for m in sample_messages() {
        let b = m.encode();
        assert_eq!(Message::parse(&b), Ok(m));
        check_truncations(&b);
        check_structural_truncations(&b);
        check_header_flips(&b);
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip(m in arb_message()) {
        prop_assert_eq!(m.validate(), Ok(()));
        let b = m.encode();
        prop_assert_eq!(b.len(), m.encoded_len());
        prop_assert_eq!(b.len() % 4, 0);
        prop_assert_eq!(peek_type(&b), Ok(m.message_type()));
        let p = Message::parse(&b);
        prop_assert_eq!(p.as_ref(), Ok(&m));
        prop_assert_eq!(p.unwrap().encode(), b);
    }

    #[test]
    fn validate_iff_round_trips(m in arb_message_any()) {
        let back = Message::parse(&m.encode());
        if m.validate().is_ok() {
            prop_assert_eq!(back, Ok(m));
        } else {
            prop_assert!(back.is_err(), "invalid {:?} parsed as {:?}", m, back);
        }
    }

    #[test]
    fn truncations_rejected(m in arb_message()) {
        let b = m.encode();
        check_truncations(&b);
        check_structural_truncations(&b);
    }

    #[test]
    fn header_flips_rejected_or_different(m in arb_message()) {
        check_header_flips(&m.encode());
    }

    #[test]
    fn confirm_body_round_trip(
        h0: [u8; 32],
        fl in 0u8..16,
        cache_expiry: u32,
        sig_words in 0usize..40,
        fill: u8,
    ) {
        let body = ConfirmBody {
            h0,
            sig_len_words: sig_words as u16,
            flags: ConfirmFlags::from_byte(fl),
            cache_expiry,
            signature: vec![fill; sig_words * 4],
        };
        prop_assert_eq!(body.flags.to_byte(), fl);
        let b = body.to_bytes();
        prop_assert_eq!(b.len(), 40 + sig_words * 4);
        prop_assert_eq!(ConfirmBody::from_bytes(&b), Ok(body.clone()));
        // It fits a Confirm's encrypted part.
        let c = Confirm { confirm_mac: [0; 8], iv: [0; 16], encrypted: b };
        prop_assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn parse_never_panics(bytes in vec(any::<u8>(), 0..2100)) {
        let _ = Message::parse(&bytes);
        let _ = peek_type(&bytes);
        let _ = ConfirmBody::from_bytes(&bytes);
    }

    /// Random bodies behind a valid header and length reach the body parsers.
    #[test]
    fn parse_never_panics_valid_header(
        t in proptest::sample::select(MessageType::ALL.to_vec()),
        body in vec(any::<u8>(), 0..600).prop_map(|mut v| { v.truncate(v.len() / 4 * 4); v }),
    ) {
        let mut b = vec![0x50, 0x5a, 0, 0];
        b.extend_from_slice(&t.type_block());
        b.extend_from_slice(&body);
        set_len_field(&mut b);
        if let Ok(m) = Message::parse(&b) {
            prop_assert_eq!(m.message_type(), t);
            // Whatever parses is valid and re-parses to itself.
            prop_assert_eq!(m.validate(), Ok(()));
            prop_assert_eq!(Message::parse(&m.encode()), Ok(m));
        }
    }
}
