//! Relay frames: the documented wire format, round trips, bounds, truncation at every length,
//! and no panic on arbitrary bytes.

use keav_proto::durable::{Stream, PAYLOAD_TAG};
use keav_proto::record::{HEADER_LEN, TAG_LEN, TYPE_DATA};
use keav_proto::route::{
    valid_id, EntryKey, Frame, RefuseReason, RouteError, DEFAULT_HOPS, FRAME_TAG, MAX_BODY,
    MAX_ID_LEN, MAX_KEYS, VERSION,
};
use proptest::prelude::*;

/// A syntactically valid durable payload (keys are not needed to read its header).
fn payload(stream: u8, epoch: u32, seq: u64, ct_len: usize) -> Vec<u8> {
    let mut p = vec![PAYLOAD_TAG, stream, TYPE_DATA];
    p.extend_from_slice(&epoch.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend(std::iter::repeat_n(0xAB, ct_len + TAG_LEN));
    p
}

fn malformed(why: &'static str) -> Result<Frame, RouteError> {
    Err(RouteError::Malformed(why))
}

fn samples() -> Vec<Frame> {
    vec![
        Frame::Forward {
            hops: DEFAULT_HOPS,
            src: "alice".into(),
            dst: "bob-2_x".into(),
            body: payload(1, 0, 7, 3),
        },
        Frame::Forward {
            hops: 0,
            src: "a".repeat(MAX_ID_LEN),
            dst: "b".into(),
            body: vec![0],
        },
        Frame::Stored {
            src: "alice".into(),
            dst: "bob".into(),
            stream: 1,
            seqs: vec![0, 5, u64::MAX],
        },
        Frame::Stored {
            src: "alice".into(),
            dst: "bob".into(),
            stream: 2,
            seqs: (0..MAX_KEYS as u64).collect(),
        },
        Frame::Pull { window: 0 },
        Frame::Pull { window: u32::MAX },
        Frame::Refused {
            reason: RefuseReason::MailboxFull,
            key: EntryKey {
                src: "alice".into(),
                dst: "bob".into(),
                stream: 1,
                seq: 9,
            },
        },
        Frame::Refused {
            reason: RefuseReason::BadBody,
            key: EntryKey {
                src: "r1".into(),
                dst: "Z".into(),
                stream: 2,
                seq: u64::MAX,
            },
        },
        Frame::Attach {
            id: "relay-1".into(),
        },
        Frame::Refused {
            reason: RefuseReason::Later,
            key: EntryKey {
                src: "alice".into(),
                dst: "bob".into(),
                stream: 1,
                seq: 300,
            },
        },
        Frame::Need {
            src: "alice".into(),
            dst: "bob".into(),
            stream: 1,
            seq: 49_156,
        },
        Frame::Need {
            src: "a".repeat(MAX_ID_LEN),
            dst: "Z".into(),
            stream: 2,
            seq: u64::MAX,
        },
    ]
}

#[test]
fn wire_format_is_as_documented() {
    let f = Frame::Forward {
        hops: 8,
        src: "ab".into(),
        dst: "c".into(),
        body: vec![9, 9],
    };
    assert_eq!(f.encode(), [0x52, 1, 1, 8, 2, b'a', b'b', 1, b'c', 9, 9]);
    let f = Frame::Stored {
        src: "a".into(),
        dst: "b".into(),
        stream: 2,
        seqs: vec![1, 258],
    };
    let mut want = vec![0x52, 1, 2, 1, b'a', 1, b'b', 2, 0, 2];
    want.extend_from_slice(&1u64.to_be_bytes());
    want.extend_from_slice(&258u64.to_be_bytes());
    assert_eq!(f.encode(), want);
    assert_eq!(
        Frame::Pull { window: 0x01020304 }.encode(),
        [0x52, 1, 3, 1, 2, 3, 4]
    );
    let f = Frame::Refused {
        reason: RefuseReason::HopLimit,
        key: EntryKey {
            src: "a".into(),
            dst: "b".into(),
            stream: 1,
            seq: 5,
        },
    };
    let mut want = vec![0x52, 1, 4, 3, 1, b'a', 1, b'b', 1];
    want.extend_from_slice(&5u64.to_be_bytes());
    assert_eq!(f.encode(), want);
    assert_eq!(
        Frame::Attach { id: "r".into() }.encode(),
        [0x52, 1, 5, 1, b'r']
    );
    let f = Frame::Need {
        src: "ab".into(),
        dst: "c".into(),
        stream: 1,
        seq: 0x0102,
    };
    let mut want = vec![0x52, 1, 6, 2, b'a', b'b', 1, b'c', 1];
    want.extend_from_slice(&0x0102u64.to_be_bytes());
    assert_eq!(f.encode(), want);
    let f = Frame::Refused {
        reason: RefuseReason::Later,
        key: EntryKey {
            src: "a".into(),
            dst: "b".into(),
            stream: 1,
            seq: 7,
        },
    };
    let mut want = vec![0x52, 1, 4, 5, 1, b'a', 1, b'b', 1];
    want.extend_from_slice(&7u64.to_be_bytes());
    assert_eq!(f.encode(), want);
    assert_eq!((FRAME_TAG, VERSION), (0x52, 1));
    for (r, b) in [
        (RefuseReason::MailboxFull, 1u8),
        (RefuseReason::NoRoute, 2),
        (RefuseReason::HopLimit, 3),
        (RefuseReason::BadBody, 4),
        (RefuseReason::Later, 5),
    ] {
        assert_eq!(RefuseReason::from_byte(b), Some(r));
        assert_eq!(r as u8, b);
    }
}

#[test]
fn samples_round_trip_and_every_truncation_is_refused() {
    for f in samples() {
        let bytes = f.encode();
        assert_eq!(Frame::decode(&bytes), Ok(f.clone()), "{f:?}");
        for n in 0..bytes.len() {
            let r = Frame::decode(&bytes[..n]);
            // A Forward frame cut inside its body is still a (shorter) Forward frame.
            if let (Frame::Forward { body, .. }, Ok(Frame::Forward { body: cut, .. })) = (&f, &r) {
                assert!(body.starts_with(cut) && cut.len() < body.len());
                continue;
            }
            assert!(r.is_err(), "{f:?} cut at {n}: {r:?}");
        }
        let mut long = bytes.clone();
        long.push(0);
        match f {
            Frame::Forward { .. } => assert!(Frame::decode(&long).is_ok()),
            // The count says how many numbers follow.
            Frame::Stored { .. } => {
                assert_eq!(Frame::decode(&long), malformed("sequence numbers"))
            }
            _ => assert_eq!(Frame::decode(&long), malformed("trailing bytes"), "{f:?}"),
        }
    }
}

#[test]
fn header_refusals() {
    assert_eq!(Frame::decode(&[]), malformed("tag"));
    assert_eq!(Frame::decode(&[0x53, 1, 3, 0, 0, 0, 0]), malformed("tag"));
    for v in [0u8, 2, 255] {
        assert_eq!(
            Frame::decode(&[0x52, v, 3, 0, 0, 0, 0]),
            Err(RouteError::Version(v))
        );
    }
    for k in [0u8, 7, 255] {
        assert_eq!(Frame::decode(&[0x52, 1, k, 0, 0, 0, 0]), malformed("kind"));
    }
}

#[test]
fn bounds_are_enforced() {
    // Ids: empty, too long, bad characters, not UTF-8.
    for (len, bytes) in [
        (0u8, vec![]),
        (65, vec![b'a'; 65]),
        (3, b"a b".to_vec()),
        (3, b"a.b".to_vec()),
        (2, vec![0xC3, 0xA9]),
        (1, vec![0xFF]),
    ] {
        let mut f = vec![0x52, 1, 5, len];
        f.extend_from_slice(&bytes);
        assert!(
            matches!(Frame::decode(&f), Err(RouteError::Malformed(w)) if w.starts_with("id")),
            "{bytes:?}"
        );
    }
    assert!(valid_id("A-z_09") && !valid_id("") && !valid_id("é") && !valid_id(&"x".repeat(65)));

    // Invalid frames encode to bytes decode refuses.
    let bad_frames = [
        Frame::Attach { id: String::new() },
        Frame::Attach { id: "a/b".into() },
        Frame::Attach {
            id: "x".repeat(300),
        },
        Frame::Forward {
            hops: 1,
            src: "a".into(),
            dst: "b".into(),
            body: vec![],
        },
        Frame::Forward {
            hops: 1,
            src: "a".into(),
            dst: "b".into(),
            body: vec![1; MAX_BODY + 1],
        },
        Frame::Stored {
            src: "a".into(),
            dst: "b".into(),
            stream: 1,
            seqs: vec![],
        },
        Frame::Stored {
            src: "a".into(),
            dst: "b".into(),
            stream: 1,
            seqs: vec![0; MAX_KEYS + 1],
        },
        Frame::Stored {
            src: "a".into(),
            dst: "b".into(),
            stream: 1,
            seqs: vec![0; 70_000],
        },
        Frame::Stored {
            src: "a".into(),
            dst: "b".into(),
            stream: 3,
            seqs: vec![0],
        },
        Frame::Refused {
            reason: RefuseReason::NoRoute,
            key: EntryKey {
                src: "a".into(),
                dst: "b".into(),
                stream: 0,
                seq: 0,
            },
        },
        Frame::Need {
            src: "a".into(),
            dst: "b".into(),
            stream: 3,
            seq: 0,
        },
        Frame::Need {
            src: String::new(),
            dst: "b".into(),
            stream: 1,
            seq: 0,
        },
        Frame::Need {
            src: "a".into(),
            dst: "b c".into(),
            stream: 1,
            seq: 0,
        },
    ];
    for f in bad_frames {
        assert!(Frame::decode(&f.encode()).is_err(), "{f:?}");
    }
    let max = Frame::Forward {
        hops: 1,
        src: "a".into(),
        dst: "b".into(),
        body: vec![1; MAX_BODY],
    };
    assert_eq!(Frame::decode(&max.encode()), Ok(max));

    // Unknown reason bytes.
    for r in [0u8, 6, 255] {
        let mut f = vec![0x52, 1, 4, r, 1, b'a', 1, b'b', 1];
        f.extend_from_slice(&0u64.to_be_bytes());
        assert_eq!(Frame::decode(&f), malformed("reason"));
    }
    // A Stored count that does not match the numbers that follow.
    let mut f = vec![0x52, 1, 2, 1, b'a', 1, b'b', 1, 0, 2];
    f.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(Frame::decode(&f), malformed("sequence numbers"));
    f.extend_from_slice(&[0; 9]);
    assert_eq!(Frame::decode(&f), malformed("sequence numbers"));
}

#[test]
fn entry_key_reads_the_payload_header() {
    let f = Frame::Forward {
        hops: 3,
        src: "alice".into(),
        dst: "bob".into(),
        body: payload(Stream::Control as u8, 4, 1234, 8),
    };
    assert_eq!(
        f.entry_key(),
        Some(EntryKey {
            src: "alice".into(),
            dst: "bob".into(),
            stream: 2,
            seq: 1234,
        })
    );
    // The key survives the wire.
    assert_eq!(
        Frame::decode(&f.encode()).unwrap().entry_key(),
        f.entry_key()
    );
    // Bodies that are not durable payloads have none.
    let short = payload(1, 0, 1, 0);
    assert_eq!(short.len(), 2 + HEADER_LEN + TAG_LEN);
    for body in [
        vec![1],
        short[..short.len() - 1].to_vec(),
        [&[0x45], &short[1..]].concat(),
        [&short[..1], &[3], &short[2..]].concat(),
    ] {
        let f = Frame::Forward {
            hops: 3,
            src: "a".into(),
            dst: "b".into(),
            body,
        };
        assert_eq!(f.entry_key(), None);
    }
    assert!(Frame::Forward {
        hops: 3,
        src: "a".into(),
        dst: "b".into(),
        body: short,
    }
    .entry_key()
    .is_some());
    for f in samples().into_iter().skip(2) {
        assert_eq!(f.entry_key(), None, "{f:?}");
    }
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u8>(),
            id(),
            id(),
            proptest::collection::vec(any::<u8>(), 1..300)
        )
            .prop_map(|(hops, src, dst, body)| Frame::Forward {
                hops,
                src,
                dst,
                body
            }),
        (
            id(),
            id(),
            1u8..=2,
            proptest::collection::vec(any::<u64>(), 1..40)
        )
            .prop_map(|(src, dst, stream, seqs)| Frame::Stored {
                src,
                dst,
                stream,
                seqs
            }),
        any::<u32>().prop_map(|window| Frame::Pull { window }),
        (1u8..=5, id(), id(), 1u8..=2, any::<u64>()).prop_map(|(r, src, dst, stream, seq)| {
            Frame::Refused {
                reason: RefuseReason::from_byte(r).unwrap(),
                key: EntryKey {
                    src,
                    dst,
                    stream,
                    seq,
                },
            }
        }),
        id().prop_map(|id| Frame::Attach { id }),
        (id(), id(), 1u8..=2, any::<u64>()).prop_map(|(src, dst, stream, seq)| Frame::Need {
            src,
            dst,
            stream,
            seq
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_round_trip(f in frame()) {
        let bytes = f.encode();
        prop_assert_eq!(Frame::decode(&bytes), Ok(f.clone()));
        for n in 0..bytes.len() {
            if let Ok(g) = Frame::decode(&bytes[..n]) {
                // Only a Forward frame cut inside its body still parses.
                let ok = matches!((&f, &g), (Frame::Forward { .. }, Frame::Forward { .. }));
                prop_assert!(ok);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(
        raw in proptest::collection::vec(any::<u8>(), 0..200),
        kind in 0u8..8,
    ) {
        let _ = Frame::decode(&raw);
        let mut v = vec![FRAME_TAG, VERSION, kind];
        v.extend_from_slice(&raw);
        if let Ok(f) = Frame::decode(&v) {
            // Whatever parses is canonical.
            prop_assert_eq!(f.encode(), v);
            let _ = f.entry_key();
        }
    }
}
