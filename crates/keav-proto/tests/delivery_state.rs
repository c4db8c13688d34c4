//! Persisted delivery state: round trips, restores that continue where the live objects
//! stopped, a lossy simulation with crashes of both sides, and a decoder that refuses
//! (without panicking) every malformed or inconsistent input.

use keav_proto::delivery::{Admission, DeliveryError, Inbox, InboxLimits, Outbox, OutboxLimits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod lossy_link;
use lossy_link::Link;

const IN_LIMITS: InboxLimits = InboxLimits {
    max_pending: 16,
    max_pending_bytes: 24,
    max_payload: 8,
};

const OUT_LIMITS: OutboxLimits = OutboxLimits {
    max_records: 8,
    max_bytes: 100,
    rto_initial_ms: 100,
    rto_max_ms: 1000,
};

fn bad(why: &'static str) -> Result<(), DeliveryError> {
    Err(DeliveryError::BadState(why))
}

fn inbox_ok(bytes: &[u8]) -> Result<(), DeliveryError> {
    Inbox::decode_state(bytes, IN_LIMITS).map(|_| ())
}

fn outbox_ok(bytes: &[u8]) -> Result<(), DeliveryError> {
    Outbox::decode_state(bytes, OUT_LIMITS, 0).map(|_| ())
}

fn held(ib: &Inbox) -> Vec<(u64, Vec<u8>)> {
    ib.pending_messages()
        .map(|(s, p)| (s, p.to_vec()))
        .collect()
}

fn records(ob: &Outbox) -> Vec<(u64, Vec<u8>)> {
    ob.records().map(|(s, r)| (s, r.to_vec())).collect()
}

/// A reachable inbox an ascending replay could not rebuild: 5 and 6 arrived early (under the
/// reserve), then 0 filled the reserve. Next to release 0, 24 of 24 bytes used.
fn full_inbox() -> Inbox {
    let mut ib = Inbox::new(0, IN_LIMITS).unwrap();
    ib.insert(5, vec![5; 8]).unwrap();
    ib.insert(6, vec![6; 8]).unwrap();
    ib.insert(0, vec![0; 8]).unwrap();
    assert_eq!((ib.pending_bytes(), ib.ack()), (24, 1));
    ib
}

/// Released 10..12, holds 12, 13 and 15 (ack 14).
fn gappy_inbox() -> Inbox {
    let mut ib = Inbox::new(10, IN_LIMITS).unwrap();
    for (s, p) in [
        (11, &b"b"[..]),
        (10, b"a"),
        (12, b"cc"),
        (13, b""),
        (15, b"e"),
    ] {
        ib.insert(s, p.to_vec()).unwrap();
    }
    assert_eq!(ib.pop(), Some((10, b"a".to_vec())));
    assert_eq!(ib.pop(), Some((11, b"b".to_vec())));
    assert_eq!((ib.next_expected(), ib.ack(), ib.pending()), (12, 14, 3));
    ib
}

/// Acked 3, holds 3 (sent), 5 and 7 (never sent).
fn sample_outbox() -> Outbox {
    let mut ob = Outbox::new(OUT_LIMITS).unwrap();
    for s in [1, 2, 3, 5, 7] {
        ob.push(s, vec![s as u8; s as usize], 0).unwrap();
    }
    for _ in 0..3 {
        ob.poll_transmit(0).unwrap();
    }
    assert_eq!(ob.on_ack(3), Ok(2));
    ob
}

fn samples() -> Vec<(Vec<u8>, bool)> {
    let mut emptied = sample_outbox();
    emptied.on_ack(8).unwrap();
    vec![
        (Inbox::new(0, IN_LIMITS).unwrap().encode_state(), true),
        (full_inbox().encode_state(), true),
        (gappy_inbox().encode_state(), true),
        (Outbox::new(OUT_LIMITS).unwrap().encode_state(), false),
        (sample_outbox().encode_state(), false),
        (emptied.encode_state(), false),
    ]
}

#[test]
fn states_round_trip_and_re_encode_identically() {
    for ib in [
        Inbox::new(7, IN_LIMITS).unwrap(),
        full_inbox(),
        gappy_inbox(),
    ] {
        let bytes = ib.encode_state();
        let back = Inbox::decode_state(&bytes, IN_LIMITS).unwrap();
        assert_eq!(back.encode_state(), bytes);
        assert_eq!(
            (
                back.next_expected(),
                back.ack(),
                back.pending(),
                back.pending_bytes()
            ),
            (
                ib.next_expected(),
                ib.ack(),
                ib.pending(),
                ib.pending_bytes()
            )
        );
        assert_eq!(held(&back), held(&ib));
        assert_eq!(back.limits(), IN_LIMITS);
    }
    let ob = sample_outbox();
    let bytes = ob.encode_state();
    assert_eq!(&bytes[..5], b"KVOB\x01");
    let back = Outbox::decode_state(&bytes, OUT_LIMITS, 0).unwrap();
    assert_eq!(back.encode_state(), bytes);
    assert_eq!(
        (
            back.acked(),
            back.next_seq_floor(),
            back.len(),
            back.bytes()
        ),
        (3, 8, 3, 15)
    );
    assert_eq!(records(&back), records(&ob));
    // The exact layout of a small state.
    let mut ib = Inbox::new(2, IN_LIMITS).unwrap();
    ib.insert(3, b"xy".to_vec()).unwrap();
    let mut want = b"KVIB\x01".to_vec();
    for v in [2u64, 1, 3, 2] {
        want.extend_from_slice(&v.to_be_bytes());
    }
    want.extend_from_slice(b"xy");
    assert_eq!(ib.encode_state(), want);
}

#[test]
fn restored_inbox_continues_in_order_and_refuses_what_it_released() {
    let ib = gappy_inbox();
    let mut back = Inbox::decode_state(&ib.encode_state(), IN_LIMITS).unwrap();
    for s in [10, 11, 12, 13, 15, 0] {
        assert_eq!(back.admit(s), Admission::Duplicate, "seq {s}");
        assert_eq!(back.insert(s, vec![1]), Err(DeliveryError::Duplicate));
    }
    assert_eq!(back.admit(14), Admission::Accept);
    assert_eq!(back.pop(), Some((12, b"cc".to_vec())));
    assert_eq!(back.pop(), Some((13, b"".to_vec())));
    assert_eq!(back.pop(), None);
    back.insert(14, b"d".to_vec()).unwrap();
    assert_eq!(back.ack(), 16);
    assert_eq!(back.pop(), Some((14, b"d".to_vec())));
    assert_eq!(back.pop(), Some((15, b"e".to_vec())));
    assert_eq!(
        (back.pop(), back.next_expected(), back.pending_bytes()),
        (None, 16, 0)
    );
    assert_eq!(back.admit(15), Admission::Duplicate);

    // The full inbox keeps its reserve rule after a restore: nothing but a pop makes room.
    let mut full = Inbox::decode_state(&full_inbox().encode_state(), IN_LIMITS).unwrap();
    assert_eq!(full.admit(1), Admission::NoRoom);
    assert_eq!(full.pop(), Some((0, vec![0; 8])));
    assert_eq!(full.admit(2), Admission::NoRoom);
    assert_eq!(full.admit(1), Admission::Accept);
}

#[test]
fn restored_outbox_resends_exactly_the_unacked_then_behaves_like_the_original() {
    let mut orig = sample_outbox();
    let mut back = Outbox::decode_state(&orig.encode_state(), OUT_LIMITS, 5_000).unwrap();
    // Every held record is due at once, in order; nothing else.
    assert_eq!(back.poll_timeout(), Some(5_000));
    let mut burst = Vec::new();
    while let Some((s, r)) = back.poll_transmit(5_000) {
        burst.push((s, r.to_vec()));
    }
    assert_eq!(burst, records(&orig));
    // Backoff restarted: next resend of each after rto_initial_ms.
    assert_eq!(back.poll_timeout(), Some(5_100));
    // The original sends its never-sent records; its timers differ, its contents do not.
    while orig.poll_transmit(5_000).is_some() {}
    // Same answers to the same operations from here on.
    for ob in [&mut orig, &mut back] {
        assert_eq!(ob.push(7, vec![0], 0), Err(DeliveryError::NotIncreasing));
        assert_eq!(ob.on_ack(2), Err(DeliveryError::StaleAck));
        assert_eq!(ob.on_ack(9), Err(DeliveryError::AckBeyondPushed));
        ob.push(9, vec![9; 9], 6_000).unwrap();
        assert_eq!(ob.on_ack(6), Ok(2));
    }
    assert_eq!(records(&orig), records(&back));
    assert_eq!(orig.encode_state(), back.encode_state());
    assert_eq!(back.poll_transmit(6_000).map(|t| t.0), Some(9));
    assert_eq!(back.on_ack(10), Ok(2));
    assert!(back.is_empty());
    assert_eq!(
        Outbox::decode_state(&back.encode_state(), OUT_LIMITS, 0)
            .unwrap()
            .next_seq_floor(),
        10
    );
}

#[test]
fn states_outside_the_limits_are_refused() {
    let full = full_inbox().encode_state();
    let gappy = gappy_inbox().encode_state();
    for (bytes, limits, why) in [
        (
            &full,
            InboxLimits {
                max_pending_bytes: 16,
                ..IN_LIMITS
            },
            "byte bound or its reserve",
        ),
        (
            &full,
            InboxLimits {
                max_pending: 3,
                ..IN_LIMITS
            },
            "message beyond the window",
        ),
        (
            &gappy,
            InboxLimits {
                max_payload: 1,
                ..IN_LIMITS
            },
            "entry too long",
        ),
    ] {
        assert_eq!(Inbox::decode_state(bytes, limits).map(|_| ()), bad(why));
    }
    assert_eq!(
        Inbox::decode_state(&gappy_inbox().encode_state(), InboxLimits::new(0, 1 << 20))
            .map(|_| ()),
        Err(DeliveryError::BadLimits("max_pending"))
    );
    let bytes = sample_outbox().encode_state();
    for (limits, why) in [
        (
            OutboxLimits {
                max_records: 2,
                ..OUT_LIMITS
            },
            "count above the limit",
        ),
        (
            OutboxLimits {
                max_bytes: 14,
                ..OUT_LIMITS
            },
            "outbox bound",
        ),
    ] {
        assert_eq!(
            Outbox::decode_state(&bytes, limits, 0).map(|_| ()),
            bad(why)
        );
    }
}

fn enc(magic: &[u8], head: &[u64], entries: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.push(1);
    for v in head {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&(entries.len() as u64).to_be_bytes());
    for (s, p) in entries {
        out.extend_from_slice(&s.to_be_bytes());
        out.extend_from_slice(&(p.len() as u64).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

#[test]
fn inconsistent_states_are_refused() {
    let e8 = &[0u8; 8][..];
    // Sanity: the hand encoder matches.
    assert_eq!(
        enc(b"KVIB", &[12], &[(12, b"cc"), (13, b""), (15, b"e")]),
        gappy_inbox().encode_state()
    );
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[0], &[(0, e8), (5, e8), (6, e8)])),
        Ok(())
    );
    // Unreachable: two early messages use the reserve of the missing one.
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[0], &[(1, e8), (5, e8), (6, e8)])),
        bad("byte bound or its reserve")
    );
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[5], &[(4, b"x")])),
        bad("message already released")
    );
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[5], &[(21, b"x")])),
        bad("message beyond the window")
    );
    assert_eq!(inbox_ok(&enc(b"KVIB", &[5], &[(20, b"x")])), Ok(()));
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[5], &[(7, b"x"), (6, b"x")])),
        bad("sequence numbers not increasing")
    );
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[5], &[(7, b"x"), (7, b"x")])),
        bad("sequence numbers not increasing")
    );
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[5], &[(5, &[0; 9])])),
        bad("entry too long")
    );
    assert_eq!(inbox_ok(&enc(b"KVOB", &[5], &[])), bad("magic"));
    let mut v2 = enc(b"KVIB", &[5], &[]);
    v2[4] = 2;
    assert_eq!(inbox_ok(&v2), bad("version"));
    let many: Vec<(u64, &[u8])> = (0..17).map(|s| (s, &b""[..])).collect();
    assert_eq!(
        inbox_ok(&enc(b"KVIB", &[0], &many)),
        bad("count above the limit")
    );
    // A count promising more entries than the bytes hold.
    let mut lie = enc(b"KVIB", &[0], &[(0, b"")]);
    lie[13..21].copy_from_slice(&2u64.to_be_bytes());
    assert_eq!(inbox_ok(&lie), bad("truncated"));
    lie[13..21].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(inbox_ok(&lie), bad("count above the limit"));
    let mut long = enc(b"KVIB", &[0], &[(0, b"")]);
    long[29..37].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(inbox_ok(&long), bad("entry too long"));

    assert_eq!(
        enc(
            b"KVOB",
            &[3, 8],
            &[(3, &[3; 3]), (5, &[5; 5]), (7, &[7; 7])]
        ),
        sample_outbox().encode_state()
    );
    assert_eq!(outbox_ok(&enc(b"KVOB", &[3, 3], &[])), Ok(()));
    // Nothing held but the floors differ: the last record pushed would still be held.
    assert_eq!(
        outbox_ok(&enc(b"KVOB", &[3, 4], &[])),
        bad("next sequence floor")
    );
    assert_eq!(
        outbox_ok(&enc(b"KVOB", &[4, 3], &[])),
        bad("next sequence floor")
    );
    assert_eq!(
        outbox_ok(&enc(b"KVOB", &[3, 9], &[(5, b"x")])),
        bad("next sequence floor")
    );
    assert_eq!(outbox_ok(&enc(b"KVOB", &[3, 6], &[(5, b"x")])), Ok(()));
    assert_eq!(
        outbox_ok(&enc(b"KVOB", &[3, 6], &[(2, b"x"), (5, b"x")])),
        bad("record below the acked floor")
    );
    assert_eq!(
        outbox_ok(&enc(b"KVOB", &[3, 6], &[(5, b"x"), (4, b"x")])),
        bad("sequence numbers not increasing")
    );
    assert_eq!(
        outbox_ok(&enc(b"KVOB", &[0, 1], &[(0, &[0; 101])])),
        bad("entry too long")
    );
    assert_eq!(
        outbox_ok(&enc(b"KVOB", &[0, 2], &[(0, &[0; 50]), (1, &[0; 51])])),
        bad("outbox bound")
    );
    // Sequence number 2^64-1 is never a record's (the outbox refuses to push it).
    assert!(outbox_ok(&enc(b"KVOB", &[u64::MAX, u64::MAX], &[(u64::MAX, b"")])).is_err());
    assert_eq!(outbox_ok(&enc(b"KVIB", &[0, 0], &[])), bad("magic"));
}

#[test]
fn truncations_and_trailing_bytes_are_refused() {
    for (bytes, is_inbox) in samples() {
        let dec = |b: &[u8]| if is_inbox { inbox_ok(b) } else { outbox_ok(b) };
        assert_eq!(dec(&bytes), Ok(()));
        for cut in 0..bytes.len() {
            let r = dec(&bytes[..cut]);
            assert!(
                matches!(r, Err(DeliveryError::BadState(_))),
                "cut at {cut} of {}: {r:?}",
                bytes.len()
            );
        }
        for extra in [&[0u8][..], &[0xff], &[0; 16]] {
            let mut long = bytes.clone();
            long.extend_from_slice(extra);
            assert!(matches!(dec(&long), Err(DeliveryError::BadState(_))));
        }
    }
}

#[test]
fn every_bit_flip_is_refused_or_decodes_to_a_valid_state() {
    let mut accepted = 0;
    for (bytes, is_inbox) in samples() {
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let re = if is_inbox {
                Inbox::decode_state(&b, IN_LIMITS).map(|x| x.encode_state())
            } else {
                Outbox::decode_state(&b, OUT_LIMITS, 0).map(|x| x.encode_state())
            };
            match re {
                // Accepted flips (payload bytes, some sequence bits) give a canonical state.
                Ok(re) => {
                    assert_eq!(re, b, "flip {i}");
                    accepted += 1;
                }
                Err(e) => assert!(matches!(e, DeliveryError::BadState(_)), "{e:?}"),
            }
        }
    }
    assert!(accepted > 0);
}

fn payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.resize(8 + (seq % 57) as usize, (seq % 251) as u8);
    p
}

/// Both ends persist after every change (the sender after a push or an ack, the receiver
/// before it acks) and crash at random steps: the live object is replaced by what its last
/// saved state decodes to. Messages in flight survive a crash. Returns the receiver's and the
/// sender's crashes and the transmissions.
fn simulate_with_crashes(seed: u64, n: u64, crash_p: f64) -> (u64, u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let out_limits = OutboxLimits {
        max_records: 48,
        max_bytes: 2048,
        rto_initial_ms: 40,
        rto_max_ms: 2000,
    };
    let in_limits = InboxLimits {
        max_pending: 16,
        max_pending_bytes: 400,
        max_payload: 64,
    };
    let mut outbox = Outbox::new(out_limits).unwrap();
    let mut inbox = Inbox::new(0, in_limits).unwrap();
    let mut out_saved = outbox.encode_state();
    let mut in_saved = inbox.encode_state();
    let mut data: Link<(u64, Vec<u8>)> = Link::new(0.2, 0.1, 150);
    let mut acks: Link<u64> = Link::new(0.2, 0.1, 150);
    let (mut next_push, mut now, mut steps, mut tx) = (0u64, 0u64, 0u64, 0u64);
    let (mut in_crashes, mut out_crashes) = (0u64, 0u64);
    let mut received = Vec::new();

    while received.len() < n as usize || !outbox.is_empty() {
        steps += 1;
        assert!(steps < 40 * n + 10_000, "seed {seed}: no progress");

        if rng.gen_bool(crash_p) {
            out_crashes += 1;
            outbox = Outbox::decode_state(&out_saved, out_limits, now).unwrap();
            assert_eq!(outbox.encode_state(), out_saved);
        }
        if rng.gen_bool(crash_p) {
            in_crashes += 1;
            inbox = Inbox::decode_state(&in_saved, in_limits).unwrap();
            assert_eq!(inbox.encode_state(), in_saved);
        }

        while next_push < n && outbox.push(next_push, payload(next_push), now).is_ok() {
            next_push += 1;
        }
        out_saved = outbox.encode_state();
        while let Some((seq, record)) = outbox.poll_transmit(now) {
            tx += 1;
            let record = record.to_vec();
            data.send(&mut rng, now, (seq, record));
        }
        // A sender crash after transmitting: the restore sends everything held again.
        if rng.gen_bool(crash_p) {
            out_crashes += 1;
            outbox = Outbox::decode_state(&out_saved, out_limits, now).unwrap();
            let mut again = 0;
            while outbox.poll_transmit(now).is_some() {
                again += 1;
            }
            assert_eq!(again, outbox.len());
        }

        for (seq, record) in data.take_due(now) {
            if inbox.admit(seq) == Admission::Accept {
                inbox.insert(seq, record).unwrap();
            } else if inbox.admit(seq) != Admission::Duplicate {
                continue;
            }
            // The application takes the messages with the same commit.
            while let Some((seq, p)) = inbox.pop() {
                assert_eq!(seq, received.len() as u64, "seed {seed}: out of order");
                assert_eq!(p, payload(seq));
                received.push(seq);
            }
            in_saved = inbox.encode_state();
            acks.send(&mut rng, now, inbox.ack());
        }

        for ack in acks.take_due(now) {
            // A stale ack (reordered, or from before a sender crash) changes nothing.
            let _ = outbox.on_ack(ack);
        }
        out_saved = outbox.encode_state();

        let next = [outbox.poll_timeout(), data.next_time(), acks.next_time()]
            .into_iter()
            .flatten()
            .min();
        if let Some(t) = next {
            now = now.max(t);
        }
    }
    assert_eq!(received, (0..n).collect::<Vec<_>>());
    assert_eq!((inbox.pending(), inbox.ack(), outbox.acked()), (0, n, n));
    (in_crashes, out_crashes, tx)
}

#[test]
fn lossy_channel_with_crashes_delivers_2_000_exactly_once_in_order() {
    for seed in [11, 12, 13] {
        let (ic, oc, tx) = simulate_with_crashes(seed, 2_000, 0.01);
        eprintln!("seed {seed}: {ic} receiver and {oc} sender crashes, {tx} transmissions");
        assert!(ic >= 5 && oc >= 5, "seed {seed}: only {ic} + {oc} crashes");
        assert!(tx > 2_000);
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert!(Inbox::decode_state(&b, IN_LIMITS).is_err() || b.starts_with(b"KVIB"));
            prop_assert!(Outbox::decode_state(&b, OUT_LIMITS, 0).is_err() || b.starts_with(b"KVOB"));
            // With a valid header too, so the body parser sees random input.
            for magic in [&b"KVIB\x01"[..], b"KVOB\x01"] {
                let mut v = magic.to_vec();
                v.extend_from_slice(&b);
                if let Ok(ib) = Inbox::decode_state(&v, IN_LIMITS) {
                    prop_assert_eq!(ib.encode_state(), v.clone());
                }
                if let Ok(ob) = Outbox::decode_state(&v, OUT_LIMITS, 0) {
                    prop_assert_eq!(ob.encode_state(), v);
                }
            }
        }

        #[test]
        fn random_edits_of_valid_states_never_panic(
            which in 0usize..6,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let (mut b, is_inbox) = samples().swap_remove(which);
            for (at, v) in edits {
                let i = at % b.len();
                b[i] = v;
            }
            if is_inbox {
                if let Ok(ib) = Inbox::decode_state(&b, IN_LIMITS) {
                    prop_assert_eq!(ib.encode_state(), b);
                }
            } else if let Ok(ob) = Outbox::decode_state(&b, OUT_LIMITS, 0) {
                prop_assert_eq!(ob.encode_state(), b);
            }
        }

        /// Any state reached by random operations round-trips and restores an equal inbox.
        #[test]
        fn reachable_inbox_states_round_trip(
            ops in proptest::collection::vec((any::<bool>(), 0u64..24, 0usize..9), 0..80),
        ) {
            let mut ib = Inbox::new(0, IN_LIMITS).unwrap();
            for (pop, seq, len) in ops {
                if pop {
                    ib.pop();
                } else {
                    let _ = ib.insert(seq, vec![seq as u8; len]);
                }
                let bytes = ib.encode_state();
                let back = Inbox::decode_state(&bytes, IN_LIMITS);
                prop_assert!(back.is_ok(), "{:?} refused: {:?}", held(&ib), back.err());
                let back = back.unwrap();
                prop_assert_eq!(back.encode_state(), bytes);
                prop_assert_eq!((back.ack(), back.pending_bytes()), (ib.ack(), ib.pending_bytes()));
            }
        }

        /// Any state reached by random operations round-trips.
        #[test]
        fn reachable_outbox_states_round_trip(
            ops in proptest::collection::vec((0u8..3, 0u64..30, 0usize..30), 0..80),
        ) {
            let mut ob = Outbox::new(OUT_LIMITS).unwrap();
            for (op, seq, len) in ops {
                match op {
                    0 => { let _ = ob.push(seq, vec![1; len], 0); }
                    1 => { let _ = ob.on_ack(seq); }
                    _ => { ob.poll_transmit(seq * 100); }
                }
                let bytes = ob.encode_state();
                let back = Outbox::decode_state(&bytes, OUT_LIMITS, 0);
                prop_assert!(back.is_ok(), "{:?}", back.err());
                prop_assert_eq!(back.unwrap().encode_state(), bytes);
            }
        }
    }
}
