//! Durable channels: keys (independent of the live channel, as documented), the payload
//! format, exactly-once in-order delivery over a lossy link with acks both ways, forged and
//! replayed payloads, crash-and-restore at random points, the epoch rule, the outbox bound
//! and the persisted state's codec.

mod lossy_link;
mod util;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::OnceLock;

use keav_proto::cache::Mode;
use keav_proto::crypto::kdf32;
use keav_proto::delivery::{DeliveryError, InboxLimits, OutboxLimits};
use keav_proto::durable::{
    parse_header, DurableChannel, DurableConfig, DurableError, DurableState, PayloadHeader,
    Received, Stream, DATA_RATCHET_LOG2, PAYLOAD_PREFIX, PAYLOAD_TAG,
};
use keav_proto::handshake::SessionOutcome;
use keav_proto::record::{
    self, channel_from_parts, Aead, Opened, OpenerState, RatchetPolicy, RecordError, HEADER_LEN,
    MAX_PLAINTEXT, RECORD_OVERHEAD, TAG_LEN,
};
use lossy_link::Link;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use util::{both_ok, run_session, Device, LinkModel};

// ---------------------------------------------------------------------------------------------
// Sessions and helpers
// ---------------------------------------------------------------------------------------------

/// A copy of an outcome (`SessionOutcome` is not `Clone`; the cache update is dropped).
fn copy(o: &SessionOutcome) -> SessionOutcome {
    SessionOutcome {
        role: o.role,
        local_zid: o.local_zid,
        peer_zid: o.peer_zid,
        mode: o.mode,
        key_agreement: o.key_agreement,
        verification: o.verification,
        backend: o.backend,
        sas: o.sas.clone(),
        sas_type: o.sas_type,
        session_number: o.session_number,
        cache_matched: o.cache_matched,
        cache_mismatch: o.cache_mismatch,
        exported_key: o.exported_key.clone(),
        cache_update: None,
        kdf_context: o.kdf_context.clone(),
        channel_aead: o.channel_aead,
    }
}

/// The outcomes of one real handshake between alice (initiator) and bob (responder).
fn sessions() -> &'static (SessionOutcome, SessionOutcome) {
    static PAIR: OnceLock<(SessionOutcome, SessionOutcome)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let mut a = Device::new("alice", Mode::NORMAL, 1);
        let mut b = Device::new("bob", Mode::NORMAL, 2);
        let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 11, 1_800_000_000, None);
        let (oa, ob) = both_ok(&r);
        assert_ne!(oa.role, ob.role);
        assert_eq!(oa.kdf_context, ob.kdf_context);
        assert!(oa.channel_aead.is_some());
        (copy(oa), copy(ob))
    })
}

/// Both ends with `cfg`, created at time 0.
fn pair(cfg: DurableConfig) -> (DurableChannel, DurableChannel) {
    let (oa, ob) = sessions();
    (
        DurableChannel::new(oa, cfg, 0).unwrap(),
        DurableChannel::new(ob, cfg, 0).unwrap(),
    )
}

fn cfg() -> DurableConfig {
    DurableConfig {
        outbox: OutboxLimits {
            max_records: 10_000,
            max_bytes: 10 << 20,
            rto_initial_ms: 20,
            rto_max_ms: 200,
        },
        inbox: InboxLimits::new(256, 4 << 20),
        custody_ms: 1_000,
        ..DurableConfig::default()
    }
}

fn body(i: u64) -> Vec<u8> {
    let len = (i as usize * 13) % 120;
    let mut b = i.to_be_bytes().to_vec();
    b.extend((0..len).map(|j| (i as u8).wrapping_mul(31) ^ j as u8));
    b
}

/// Everything that must stay unchanged when a payload is refused.
fn snapshot(ch: &DurableChannel) -> (Vec<u8>, u64, u64, usize, u64, usize) {
    (
        ch.export().encode().to_vec(),
        ch.inbox_ack(),
        ch.next_to_release(),
        ch.inbox_len(),
        ch.acked(),
        ch.outbox_len(),
    )
}

fn data(ch: &mut DurableChannel, p: &[u8]) -> (u64, Vec<u8>) {
    match ch.receive(p, 0) {
        Ok(Received::Data { seq, body }) => (seq, body),
        other => panic!("expected data, got {other:?}"),
    }
}

/// The parts of an encoded state ("KVDS" | 1 | 4 × (len u16 | part)), for splicing.
fn split_state(bytes: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(&bytes[..5], b"KVDS\x01");
    let mut parts = Vec::new();
    let mut at = 5;
    for _ in 0..4 {
        let len = u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
        parts.push(bytes[at + 2..at + 2 + len].to_vec());
        at += 2 + len;
    }
    assert_eq!(at, bytes.len());
    parts
}

fn join_state(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"KVDS\x01".to_vec();
    for p in parts {
        out.extend_from_slice(&(p.len() as u16).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Keys and format
// ---------------------------------------------------------------------------------------------

/// The documented key schedule: the data and control sub-channels are
/// `channel_from_parts(KDF(exported_key, label, ctx, 256), ...)`, independent of the live
/// channel (whose records the durable channel refuses, and vice versa).
#[test]
fn keys_follow_the_spec_and_differ_from_the_live_channel() {
    let (oa, ob) = sessions();
    let aead = oa.channel_aead.unwrap();
    let (mut a, mut b) = pair(cfg());
    let (seq, p) = a.send(b"hello", 0).unwrap();
    assert_eq!(seq, 0);
    assert_eq!(&p[..2], &[PAYLOAD_TAG, 1]);

    // Bob's data opener built by hand from the documented root opens it.
    let ctx = &ob.kdf_context;
    let data_root = kdf32(ob.exported_key.expose(), b"KEAV durable data", ctx);
    let control_root = kdf32(ob.exported_key.expose(), b"KEAV durable control", ctx);
    let data_policy = RatchetPolicy {
        every_records_log2: DATA_RATCHET_LOG2,
        every_ms: u64::MAX,
    };
    let (_, mut bo) = channel_from_parts(&data_root, ctx, ob.role, aead, data_policy, 0);
    let mut rec = p[PAYLOAD_PREFIX..].to_vec();
    assert_eq!(bo.open(&mut rec, 0).unwrap(), Opened::Data(b"hello"));

    // The live channel's opener cannot open it; the live sealer's record is refused.
    let (mut live_a, _) = record::channel(oa, RatchetPolicy::default(), 0).unwrap();
    let (_, mut live_b) = record::channel(ob, RatchetPolicy::default(), 0).unwrap();
    let mut rec = p[PAYLOAD_PREFIX..].to_vec();
    assert_eq!(live_b.open(&mut rec, 0), Err(RecordError::BadTag));
    let mut live = vec![PAYLOAD_TAG, 1];
    live_a.seal(b"hello", 0, &mut live).unwrap();
    let before = snapshot(&b);
    assert_eq!(
        b.receive(&live, 0),
        Err(DurableError::Record(RecordError::BadTag))
    );
    assert_eq!(snapshot(&b), before);
    assert_eq!(data(&mut b, &p), (0, b"hello".to_vec()));

    // Alice's ack is a control record under the control root.
    let ack = b.ack_payload(0).unwrap();
    assert_eq!(ack.len(), PAYLOAD_PREFIX + RECORD_OVERHEAD + 8);
    assert_eq!(&ack[..2], &[PAYLOAD_TAG, 2]);
    let never = RatchetPolicy {
        every_records_log2: 64,
        every_ms: u64::MAX,
    };
    let (_, mut ao) = channel_from_parts(&control_root, ctx, oa.role, aead, never, 0);
    let mut rec = ack[PAYLOAD_PREFIX..].to_vec();
    assert_eq!(
        ao.open(&mut rec, 0).unwrap(),
        Opened::Data(&1u64.to_be_bytes()[..])
    );
    assert_eq!(a.receive(&ack, 0), Ok(Received::Ack { upto: 1, freed: 1 }));

    // The four roots are all different from each other and from the live chains.
    let roots = [
        data_root.expose().to_vec(),
        control_root.expose().to_vec(),
        oa.exported_key.expose().to_vec(),
    ];
    assert!(roots[0] != roots[1] && roots[0] != roots[2] && roots[1] != roots[2]);
}

/// A data record carrying 8 bytes, relabelled as control (and the reverse), is refused by
/// the other sub-channel's key.
#[test]
fn sub_channels_do_not_open_each_others_records() {
    let (mut a, mut b) = pair(cfg());
    let (_, mut p) = a.send(&7u64.to_be_bytes(), 0).unwrap();
    p[1] = Stream::Control as u8;
    let before = snapshot(&b);
    assert_eq!(
        b.receive(&p, 0),
        Err(DurableError::Record(RecordError::BadTag))
    );
    assert_eq!(snapshot(&b), before);

    let mut ack = b.ack_payload(0).unwrap();
    ack[1] = Stream::Data as u8;
    let before = snapshot(&a);
    assert_eq!(
        a.receive(&ack, 0),
        Err(DurableError::Record(RecordError::BadTag))
    );
    assert_eq!(snapshot(&a), before);
}

#[test]
fn no_channel_aead_is_refused() {
    let mut plain = copy(&sessions().0);
    plain.channel_aead = None;
    assert_eq!(
        DurableChannel::new(&plain, cfg(), 0).err(),
        Some(DurableError::NoChannel)
    );
}

#[test]
fn parse_header_reads_and_checks() {
    let (mut a, mut b) = pair(cfg());
    let (_, p) = a.send(b"x", 0).unwrap();
    assert_eq!(
        parse_header(&p),
        Ok(PayloadHeader {
            stream: Stream::Data,
            epoch: 0,
            seq: 0
        })
    );
    let ack = b.ack_payload(0).unwrap();
    assert_eq!(parse_header(&ack).unwrap().stream, Stream::Control);

    let min = PAYLOAD_PREFIX + HEADER_LEN + TAG_LEN;
    let (_, empty) = a.send(b"", 0).unwrap();
    assert_eq!(empty.len(), min);
    assert!(parse_header(&empty).is_ok());
    for n in 0..min {
        assert_eq!(
            parse_header(&empty[..n]),
            Err(DurableError::Malformed("length")),
            "{n}"
        );
    }
    for (at, v, why) in [
        (0, 0x45, "tag"),
        (1, 0, "stream"),
        (1, 3, "stream"),
        (2, record::TYPE_CLOSE, "record type"),
        (2, 0x16, "record type"),
    ] {
        let mut q = empty.clone();
        q[at] = v;
        assert_eq!(parse_header(&q), Err(DurableError::Malformed(why)));
        let before = snapshot(&b);
        assert_eq!(b.receive(&q, 0), Err(DurableError::Malformed(why)));
        assert_eq!(snapshot(&b), before);
    }
}

/// Data epoch = seq >> DATA_RATCHET_LOG2 for thousands of records, and the receiver follows.
#[test]
fn data_epoch_is_sequence_over_ratchet_interval() {
    let (mut a, mut b) = pair(cfg());
    for i in 0..3000u64 {
        let (seq, p) = a.send(&body(i), i).unwrap();
        assert_eq!(seq, i);
        let h = parse_header(&p).unwrap();
        assert_eq!((h.stream, h.seq), (Stream::Data, i));
        assert_eq!(u64::from(h.epoch), i >> DATA_RATCHET_LOG2, "seq {i}");
        assert_eq!(data(&mut b, &p), (i, body(i)));
        assert_eq!(b.pop(), Some((i, body(i))));
        if i % 100 == 99 {
            let ack = b.ack_payload(i).unwrap();
            assert!(matches!(a.receive(&ack, i), Ok(Received::Ack { upto, .. }) if upto == i + 1));
        }
    }
    assert_eq!(a.next_seq(), 3000);
    // Control records never ratchet.
    let ack = b.ack_payload(0).unwrap();
    assert_eq!(parse_header(&ack).unwrap().epoch, 0);
    assert_eq!(parse_header(&ack).unwrap().seq, 30);
}

#[test]
fn send_bounds() {
    let mut c = cfg();
    c.outbox.max_records = 3;
    let (mut a, mut b) = pair(c);
    assert_eq!(
        a.send(&vec![0; MAX_PLAINTEXT + 1], 0),
        Err(DurableError::Record(RecordError::TooLong))
    );
    for i in 0..3 {
        assert_eq!(a.send(&body(i), 0).unwrap().0, i);
    }
    let before = snapshot(&a);
    assert_eq!(
        a.send(b"one too many", 0),
        Err(DurableError::Delivery(DeliveryError::Full))
    );
    assert_eq!(snapshot(&a), before, "a full outbox sealed something");
    assert_eq!(a.next_seq(), 3);
    // The byte bound too.
    let mut c2 = cfg();
    c2.outbox.max_bytes = 100;
    let (mut a2, _) = pair(c2);
    a2.send(&[0; 60], 0).unwrap();
    assert_eq!(
        a2.send(&[0; 60], 0),
        Err(DurableError::Delivery(DeliveryError::Full))
    );
    assert_eq!(a2.next_seq(), 1);

    // An ack makes room; sequence numbers continue without a gap.
    while let Some((_, p)) = a.poll_transmit(0) {
        let _ = b.receive(&p, 0).unwrap();
    }
    let ack = b.ack_payload(0).unwrap();
    assert_eq!(a.receive(&ack, 0), Ok(Received::Ack { upto: 3, freed: 3 }));
    assert_eq!(a.send(b"now", 0).unwrap().0, 3);
}

// ---------------------------------------------------------------------------------------------
// Forgeries, replays, acks
// ---------------------------------------------------------------------------------------------

/// Every single-bit flip of a data payload is refused (an error, or at most a cheap-check
/// answer for a changed header) without any state change; the genuine payload then opens.
#[test]
fn bit_flipped_data_payloads_change_nothing() {
    let (mut a, mut b) = pair(cfg());
    let (_, p0) = a.send(b"first", 0).unwrap();
    let (_, p1) = a.send(b"second message", 0).unwrap();
    data(&mut b, &p0);
    for bit in 0..p1.len() * 8 {
        let mut q = p1.clone();
        q[bit / 8] ^= 1 << (bit % 8);
        let before = snapshot(&b);
        match b.receive(&q, 0) {
            Err(_) | Ok(Received::Deferred { .. }) | Ok(Received::Duplicate { .. }) => {}
            other => panic!("bit {bit}: {other:?}"),
        }
        assert_eq!(snapshot(&b), before, "bit {bit}");
    }
    assert_eq!(data(&mut b, &p1), (1, b"second message".to_vec()));
    assert_eq!(b.pop(), Some((0, b"first".to_vec())));
    assert_eq!(b.pop(), Some((1, b"second message".to_vec())));
}

/// A replayed payload is a Duplicate, before and after release, without being opened (a
/// payload with the same header and a garbage body gets the same answer).
#[test]
fn replays_are_duplicates_without_opening() {
    let (mut a, mut b) = pair(cfg());
    let (_, p) = a.send(b"once", 0).unwrap();
    let mut garbage = p.clone();
    for x in &mut garbage[PAYLOAD_PREFIX + HEADER_LEN..] {
        *x ^= 0xA5;
    }
    let before = snapshot(&b);
    assert_eq!(
        b.receive(&garbage, 0),
        Err(DurableError::Record(RecordError::BadTag))
    );
    assert_eq!(snapshot(&b), before);
    data(&mut b, &p);
    let held = snapshot(&b);
    assert_eq!(b.receive(&p, 0), Ok(Received::Duplicate { seq: 0 }));
    assert_eq!(b.receive(&garbage, 0), Ok(Received::Duplicate { seq: 0 }));
    assert_eq!(snapshot(&b), held);
    assert_eq!(b.pop(), Some((0, b"once".to_vec())));
    assert_eq!(b.receive(&p, 0), Ok(Received::Duplicate { seq: 0 }));
    assert_eq!(b.receive(&garbage, 0), Ok(Received::Duplicate { seq: 0 }));
    assert_eq!(b.pop(), None);
}

/// Acks: forged ones (bit flips, wrong length) are refused with no change, a replayed one is
/// refused by the control replay window, an older one arriving late is a StaleAck, and an
/// ack for messages never sent is refused.
#[test]
fn control_acks_forged_replayed_and_reordered() {
    let (mut a, mut b) = pair(cfg());
    let payloads: Vec<_> = (0..4).map(|i| a.send(&body(i), 0).unwrap().1).collect();
    data(&mut b, &payloads[0]);
    data(&mut b, &payloads[1]);
    let ack2 = b.ack_payload(0).unwrap();
    data(&mut b, &payloads[2]);
    let ack3 = b.ack_payload(0).unwrap();

    for bit in 0..ack3.len() * 8 {
        let mut q = ack3.clone();
        q[bit / 8] ^= 1 << (bit % 8);
        let before = snapshot(&a);
        assert!(a.receive(&q, 0).is_err(), "bit {bit}");
        assert_eq!(snapshot(&a), before, "bit {bit}");
    }
    for q in [
        &ack3[..ack3.len() - 1],
        &[ack3.as_slice(), &[0]].concat()[..],
    ] {
        assert_eq!(
            a.receive(q, 0),
            Err(DurableError::Malformed("control length"))
        );
    }

    assert_eq!(a.receive(&ack3, 0), Ok(Received::Ack { upto: 3, freed: 3 }));
    assert_eq!((a.acked(), a.outbox_len()), (3, 1));
    let before = snapshot(&a);
    assert_eq!(
        a.receive(&ack3, 0),
        Err(DurableError::Record(RecordError::Replay))
    );
    assert_eq!(snapshot(&a), before);
    // The older ack, delayed: authentic, new to the replay window, but stale.
    assert_eq!(a.receive(&ack2, 0), Ok(Received::StaleAck));
    assert_eq!((a.acked(), a.outbox_len()), (3, 1));
    // The same ack value again (a fresh control record): nothing more to free.
    let ack3b = b.ack_payload(0).unwrap();
    assert_eq!(
        a.receive(&ack3b, 0),
        Ok(Received::Ack { upto: 3, freed: 0 })
    );

    // Bob acks beyond what alice sent (a confused peer): refused, nothing freed. Bob sends
    // to alice here so that bob's ack covers 0..=4 of *his* inbox... built by receiving
    // alice's four messages and a fifth that alice (restored from an old state) never sent
    // cannot exist; instead the ack is checked against a fresh alice that sent nothing.
    data(&mut b, &payloads[3]);
    let ack4 = b.ack_payload(0).unwrap();
    let (mut fresh_a, _) = pair(cfg());
    assert_eq!(
        fresh_a.receive(&ack4, 0),
        Err(DurableError::Delivery(DeliveryError::AckBeyondPushed))
    );
    assert_eq!(fresh_a.outbox_len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Epoch rule and inbox window
// ---------------------------------------------------------------------------------------------

/// Sets a payload's header epoch (the tag then fails, if anything opens it).
fn with_epoch(p: &[u8], epoch: u32) -> Vec<u8> {
    let mut q = p.to_vec();
    q[PAYLOAD_PREFIX + 1..PAYLOAD_PREFIX + 5].copy_from_slice(&epoch.to_be_bytes());
    q
}

/// With N the epoch of the next message to release: records of epoch N + 1 are opened at once
/// by the lookahead opener (the persisted data opener does not move), forged ones are refused
/// without any change, records further ahead (or N + 1 while the data opener lags at N - 1)
/// are deferred, and the window is capped at one epoch.
#[test]
fn next_epoch_is_opened_by_the_lookahead_and_later_ones_deferred() {
    let per = 1u64 << DATA_RATCHET_LOG2;
    let at = |i: u64| i as usize;
    let mut c = cfg();
    c.inbox.max_pending = 100_000; // capped at 2^DATA_RATCHET_LOG2
    let (mut a, mut b) = pair(c);
    let p: Vec<_> = (0..2 * per + 4)
        .map(|i| a.send(&body(i), 0).unwrap().1)
        .collect();
    assert_eq!(parse_header(&p[at(per)]).unwrap().epoch, 1);

    // Beyond the (capped) window.
    assert_eq!(
        b.receive(&p[at(per)], 0),
        Ok(Received::Deferred { seq: per })
    );
    data(&mut b, &p[0]);
    assert_eq!(b.pop().unwrap().0, 0);

    // Inside the window now, of the next epoch: forgeries first, nothing changes.
    let before = snapshot(&b);
    let mut forged = p[at(per)].clone();
    *forged.last_mut().unwrap() ^= 1;
    assert_eq!(
        b.receive(&forged, 0),
        Err(DurableError::Record(RecordError::BadTag))
    );
    // A record of epoch 0 relabelled as epoch 1 (seq 1 is in the window).
    assert_eq!(
        b.receive(&with_epoch(&p[1], 1), 0),
        Err(DurableError::Record(RecordError::BadTag))
    );
    // Two epochs ahead: deferred without opening.
    assert_eq!(
        b.receive(&with_epoch(&p[at(per)], 2), 0),
        Ok(Received::Deferred { seq: per })
    );
    assert_eq!(snapshot(&b), before);

    // The genuine record opens; the persisted data opener is untouched.
    let state = b.export();
    assert_eq!(data(&mut b, &p[at(per)]), (per, body(per)));
    assert_eq!(b.export(), state);
    assert_eq!(
        b.receive(&p[at(per)], 0),
        Ok(Received::Duplicate { seq: per })
    );
    // A forgery of a record the lookahead already opened is a duplicate (never opened).
    assert_eq!(b.receive(&forged, 0), Ok(Received::Duplicate { seq: per }));
    data(&mut b, &p[1]);
    assert_eq!(b.pop().unwrap().0, 1);
    assert_eq!(data(&mut b, &p[at(per) + 1]).0, per + 1);

    // Every message of epoch 0 arrives and is released; the data opener stays at epoch 0.
    for q in &p[2..at(per)] {
        data(&mut b, q);
    }
    assert_eq!(b.inbox_ack(), per + 2);
    for i in 2..per + 2 {
        assert_eq!(b.pop().unwrap().0, i);
    }
    // N = 1 now, the data opener still at 0: an epoch-2 record waits for it to move.
    assert_eq!(
        b.receive(&p[at(2 * per)], 0),
        Ok(Received::Deferred { seq: 2 * per })
    );
    assert_eq!(data(&mut b, &p[at(per) + 2]).0, per + 2);
    // Forged epoch-2 records change nothing either.
    let before = snapshot(&b);
    let mut forged = p[at(2 * per) + 1].clone();
    forged[PAYLOAD_PREFIX + HEADER_LEN] ^= 0x80;
    assert_eq!(
        b.receive(&forged, 0),
        Err(DurableError::Record(RecordError::BadTag))
    );
    assert_eq!(snapshot(&b), before);
    assert_eq!(data(&mut b, &p[at(2 * per) + 1]).0, 2 * per + 1);
    assert_eq!(data(&mut b, &p[at(2 * per)]).0, 2 * per);
    for q in &p[at(per) + 3..at(2 * per)] {
        data(&mut b, q);
    }
    for i in per + 2..2 * per + 2 {
        assert_eq!(b.pop(), Some((i, body(i))));
    }
    assert_eq!(b.pop(), None);
    for i in [2 * per + 3, 2 * per + 2] {
        assert_eq!(data(&mut b, &p[at(i)]).0, i);
    }
    for i in 2 * per + 2..2 * per + 4 {
        assert_eq!(b.pop(), Some((i, body(i))));
    }
}

/// The cap applies after a restore too.
#[test]
fn window_is_capped_after_restore() {
    let per = 1u64 << DATA_RATCHET_LOG2;
    let mut c = cfg();
    c.inbox.max_pending = 100_000;
    let (mut a, b) = pair(c);
    let p: Vec<_> = (0..=per).map(|i| a.send(&body(i), 0).unwrap().1).collect();
    let st = b.export();
    let mut b = DurableChannel::restore(&st, vec![], vec![], 0, c, 0).unwrap();
    assert_eq!(
        b.receive(&p[per as usize], 0),
        Ok(Received::Deferred { seq: per })
    );
    assert_eq!(data(&mut b, &p[per as usize - 1]).0, per - 1);
}

// ---------------------------------------------------------------------------------------------
// Custody and resends
// ---------------------------------------------------------------------------------------------

#[test]
fn custody_delays_resends_and_resend_all_brings_them_back() {
    let (mut a, _) = pair(cfg());
    a.send(b"a", 0).unwrap();
    a.send(b"b", 0).unwrap();
    assert_eq!(a.poll_timeout(), Some(0));
    assert_eq!(a.poll_transmit(0).unwrap().0, 0);
    assert_eq!(a.poll_transmit(0).unwrap().0, 1);
    assert_eq!(a.poll_transmit(0), None);
    assert_eq!(a.poll_timeout(), Some(20));
    a.on_custody(0, 5); // resend of 0 moves to 5 + 1000
    a.on_custody(99, 5); // unknown: ignored
    assert_eq!(a.poll_timeout(), Some(20));
    assert_eq!(a.poll_transmit(20).unwrap().0, 1);
    assert_eq!(a.poll_transmit(20), None);
    assert_eq!(a.poll_timeout(), Some(60)); // 1's backoff doubled
    a.on_custody(1, 10);
    assert_eq!(a.poll_timeout(), Some(1005));
    assert_eq!(a.poll_transmit(1004), None);
    let (s, p) = a.poll_transmit(1005).unwrap();
    assert_eq!(s, 0);
    assert_eq!(parse_header(&p).unwrap().seq, 0);
    a.resend_all(1006);
    assert_eq!(a.poll_timeout(), Some(1006));
    assert_eq!(a.poll_transmit(1006).unwrap().0, 0);
    assert_eq!(a.poll_transmit(1006).unwrap().0, 1);
    assert_eq!(a.poll_transmit(1006), None);
}

// ---------------------------------------------------------------------------------------------
// Flow control
// ---------------------------------------------------------------------------------------------

/// The sender transmits new records only while fewer than `window` are in flight; acks and
/// custody free room, resends are not held back, `broker_custody` covers at the first
/// transmission, a zero window is refused.
#[test]
fn flow_window_holds_new_records_until_acks_or_custody() {
    let mut c = cfg();
    c.window = 4;
    let (mut a, mut b) = pair(c);
    let p: Vec<_> = (0..10).map(|i| a.send(&body(i), 0).unwrap().1).collect();
    let sent: Vec<_> = std::iter::from_fn(|| a.poll_transmit(0).map(|t| t.0)).collect();
    assert_eq!(sent, [0, 1, 2, 3]);
    assert_eq!((a.in_flight(), a.outbox_len()), (4, 10));
    // Nothing new before a resend is due; resends go regardless of the window.
    assert_eq!(a.poll_timeout(), Some(20));
    let resent: Vec<_> = std::iter::from_fn(|| a.poll_transmit(20).map(|t| t.0)).collect();
    assert_eq!(resent, [0, 1, 2, 3]);
    assert_eq!(a.timer_resends(), 4);
    // Custody of 1 frees one slot.
    a.on_custody(1, 20);
    assert_eq!(a.in_flight(), 3);
    assert_eq!(a.poll_transmit(20).map(|t| t.0), Some(4));
    assert_eq!(a.poll_transmit(20).map(|t| t.0), None);
    // An end-to-end ack for 0..2 frees 0 (1 was covered already).
    data(&mut b, &p[0]);
    data(&mut b, &p[1]);
    let ack = b.ack_payload(20).unwrap();
    assert_eq!(a.receive(&ack, 20), Ok(Received::Ack { upto: 2, freed: 2 }));
    assert_eq!(a.in_flight(), 3);
    assert_eq!(a.poll_transmit(20).map(|t| t.0), Some(5));
    assert_eq!(a.poll_transmit(20), None);
    assert!(a.in_flight() <= 4);

    // Broker custody: every record is covered once transmitted; the window never fills.
    let mut c2 = cfg();
    c2.window = 4;
    c2.broker_custody = true;
    let (mut a2, _) = pair(c2);
    for i in 0..10 {
        a2.send(&body(i), 0).unwrap();
    }
    let sent: Vec<_> = std::iter::from_fn(|| a2.poll_transmit(0).map(|t| t.0)).collect();
    assert_eq!(sent, (0..10).collect::<Vec<_>>());
    assert_eq!(a2.in_flight(), 0);

    // A restored sender holds its rows (all never sent, as far as it knows) to the window.
    let rows: Vec<_> = (2..10).map(|i| (i, p[i as usize].clone())).collect();
    let mut a3 = DurableChannel::restore(&a.export(), rows, vec![], 0, c, 100).unwrap();
    let sent: Vec<_> = std::iter::from_fn(|| a3.poll_transmit(100).map(|t| t.0)).collect();
    assert_eq!(sent, [2, 3, 4, 5]);

    // A zero window cannot work.
    let mut z = cfg();
    z.window = 0;
    let (oa, _) = sessions();
    let refused = Err(DurableError::Delivery(DeliveryError::BadLimits("window")));
    assert_eq!(DurableChannel::new(oa, z, 0).map(|_| ()), refused);
    assert_eq!(
        DurableChannel::restore(&a.export(), vec![], vec![], 0, z, 0).map(|_| ()),
        refused
    );
}

/// Over a lossless link that does not reorder, a sender with a window of half an epoch and
/// a receiver that releases messages in chunks (so its window straddles epoch boundaries):
/// nothing is ever deferred or sent twice, and records of the next epoch are taken at once.
#[test]
fn window_straddling_epoch_boundaries_flows_without_deferrals() {
    let per = 1u64 << DATA_RATCHET_LOG2;
    let n = 6 * per + 17;
    let mut c = cfg();
    c.window = 128;
    let (mut a, mut b) = pair(c);
    for i in 0..n {
        a.send(&body(i), 0).unwrap();
    }
    let mut to_b: VecDeque<Vec<u8>> = VecDeque::new();
    let mut to_a: VecDeque<Vec<u8>> = VecDeque::new();
    let (mut transmitted, mut ahead, mut got) = (0u64, 0u64, Vec::new());
    for round in 0.. {
        assert!(round < 10 * n, "no progress");
        // The clock stands still: no resend ever becomes due.
        while let Some((_, p)) = a.poll_transmit(0) {
            transmitted += 1;
            to_b.push_back(p);
        }
        assert!(a.in_flight() <= 128);
        // The receiver takes a few records, acking each, and releases in chunks of 100.
        for _ in 0..7 {
            let Some(p) = to_b.pop_front() else { break };
            let h = parse_header(&p).unwrap();
            if u64::from(h.epoch) > b.next_to_release() >> DATA_RATCHET_LOG2 {
                ahead += 1;
            }
            match b.receive(&p, 0) {
                Ok(Received::Data { seq, .. }) => assert_eq!(seq, h.seq),
                other => panic!("seq {}: {other:?}", h.seq),
            }
            to_a.push_back(b.ack_payload(0).unwrap());
        }
        if b.inbox_len() >= 100 || (to_b.is_empty() && b.inbox_len() > 0) {
            while let Some((seq, m)) = b.pop() {
                assert_eq!(m, body(seq));
                got.push(seq);
            }
        }
        // Acks come back a round later.
        for q in std::mem::take(&mut to_a) {
            assert!(matches!(a.receive(&q, 0), Ok(Received::Ack { .. })));
        }
        if got.len() as u64 == n && a.outbox_len() == 0 {
            break;
        }
    }
    assert_eq!(got, (0..n).collect::<Vec<_>>());
    assert_eq!(transmitted, n, "resends on a lossless link");
    assert_eq!((a.timer_resends(), a.fast_retransmits()), (0, 0));
    assert!(ahead > 0, "the window never straddled an epoch boundary");
}

/// An ack that frees nothing while the outbox holds the record it names makes the window
/// from there due at once; at most once per `rto_initial_ms`; not for a record never sent,
/// nor when disabled.
#[test]
fn duplicate_acks_trigger_a_rate_limited_fast_retransmit() {
    for enabled in [true, false] {
        let mut c = cfg();
        c.window = 4;
        c.fast_retransmit = enabled;
        let (mut a, mut b) = pair(c);
        let p: Vec<_> = (0..6).map(|i| a.send(&body(i), 0).unwrap().1).collect();
        let sent: Vec<_> = std::iter::from_fn(|| a.poll_transmit(0).map(|t| t.0)).collect();
        assert_eq!(sent, [0, 1, 2, 3]);
        // 0 is lost; 1 and 2 arrive and are acked: "0" twice.
        for q in &p[1..3] {
            data(&mut b, q);
        }
        let ack1 = b.ack_payload(5).unwrap();
        let ack2 = b.ack_payload(5).unwrap();
        assert_eq!(a.receive(&ack1, 5), Ok(Received::Ack { upto: 0, freed: 0 }));
        let resent: Vec<_> = std::iter::from_fn(|| a.poll_transmit(5).map(|t| t.0)).collect();
        if !enabled {
            assert!(resent.is_empty());
            assert_eq!(a.fast_retransmits(), 0);
            continue;
        }
        // [0, 0 + window) is due now (4 and 5 were never sent: the window holds them).
        assert_eq!(resent, [0, 1, 2, 3]);
        assert_eq!((a.fast_retransmits(), a.timer_resends()), (1, 0));
        // Rate limit: the next duplicate ack within rto_initial_ms does nothing.
        assert_eq!(
            a.receive(&ack2, 10),
            Ok(Received::Ack { upto: 0, freed: 0 })
        );
        assert_eq!(a.poll_transmit(10), None);
        assert_eq!(a.fast_retransmits(), 1);
        // 0 arrives: the ack frees three, two new records go.
        data(&mut b, &p[0]);
        let ack3 = b.ack_payload(30).unwrap();
        assert_eq!(
            a.receive(&ack3, 30),
            Ok(Received::Ack { upto: 3, freed: 3 })
        );
        let sent: Vec<_> = std::iter::from_fn(|| a.poll_transmit(30).map(|t| t.0)).collect();
        assert_eq!(sent, [4, 5]);
        // After the rate limit, a duplicate ack for 3 resends 3, 4, 5.
        let ack4 = b.ack_payload(30).unwrap();
        assert_eq!(
            a.receive(&ack4, 30),
            Ok(Received::Ack { upto: 3, freed: 0 })
        );
        let resent: Vec<_> = std::iter::from_fn(|| a.poll_transmit(30).map(|t| t.0)).collect();
        assert_eq!(resent, [3, 4, 5]);
        assert_eq!(a.fast_retransmits(), 2);

        // A restored sender has not transmitted its rows yet: a duplicate ack changes
        // nothing (the rows go out first anyway).
        let rows: Vec<_> = (3..6).map(|i| (i, p[i as usize].clone())).collect();
        let mut a2 = DurableChannel::restore(&a.export(), rows, vec![], 0, c, 100).unwrap();
        let ack5 = b.ack_payload(100).unwrap();
        assert_eq!(
            a2.receive(&ack5, 100),
            Ok(Received::Ack { upto: 3, freed: 0 })
        );
        assert_eq!(a2.fast_retransmits(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Simulation: lossy link, acks both ways, crashes
// ---------------------------------------------------------------------------------------------

/// What a side has committed (one store transaction per step of the persistence contract).
#[derive(Default)]
struct Store {
    state: Vec<u8>,
    outbox: BTreeMap<u64, Vec<u8>>,
    inbox: BTreeMap<u64, Vec<u8>>,
    delivered: u64,
}

struct Side {
    ch: DurableChannel,
    store: Store,
    /// Application messages not yet accepted by `send`.
    queue: VecDeque<Vec<u8>>,
    /// Messages `send` accepted (and committed), in sequence order.
    sent: Vec<Vec<u8>>,
    /// Messages released to the application, in order.
    got: Vec<Vec<u8>>,
    /// Every payload that left the process, by sequence number and stream (no nonce reuse).
    wire: HashMap<(u8, u64), Vec<u8>>,
    crashes: usize,
    deferred: usize,
    /// Messages taken from the early-arrival stash.
    early: usize,
    stale: usize,
    /// Restores whose inbox rows lie above the persisted data opener's highest record (taken
    /// by the lookahead opener), and those with rows in the epoch after the opener's.
    restores_above_highest: usize,
    restores_next_epoch: usize,
    /// Counters of the channels before restarts, added up.
    timer_resends: u64,
    fast_retransmits: u64,
}

impl Side {
    fn new(o: &SessionOutcome, cfg: DurableConfig, name: u8, n: u64) -> Side {
        let ch = DurableChannel::new(o, cfg, 0).unwrap();
        let store = Store {
            state: ch.export().encode().to_vec(),
            ..Store::default()
        };
        Side {
            ch,
            store,
            queue: (0..n)
                .map(|i| {
                    let mut b = body(i);
                    b.insert(0, name);
                    b
                })
                .collect(),
            sent: Vec::new(),
            got: Vec::new(),
            wire: HashMap::new(),
            crashes: 0,
            deferred: 0,
            early: 0,
            stale: 0,
            restores_above_highest: 0,
            restores_next_epoch: 0,
            timer_resends: 0,
            fast_retransmits: 0,
        }
    }

    fn commit_state(&mut self) {
        self.store.state = self.ch.export().encode().to_vec();
    }

    fn leave(&mut self, p: &[u8]) {
        let h = parse_header(p).unwrap();
        let prev = self
            .wire
            .entry((h.stream as u8, h.seq))
            .or_insert(p.to_vec());
        assert_eq!(
            prev, p,
            "two payloads with one sequence number (nonce reuse)"
        );
    }

    fn restart(&mut self, cfg: DurableConfig, now: u64) {
        self.crashes += 1;
        self.timer_resends += self.ch.timer_resends();
        self.fast_retransmits += self.ch.fast_retransmits();
        let st = DurableState::decode(&self.store.state).unwrap();
        let opener = OpenerState::decode(&split_state(&self.store.state)[1]).unwrap();
        let live = self.store.inbox.range(self.store.delivered..);
        if let Some((&top, _)) = live.last() {
            if opener.highest_sequence().is_none_or(|h| top > h) {
                self.restores_above_highest += 1;
            }
            if top >> DATA_RATCHET_LOG2 > u64::from(opener.epoch()) {
                self.restores_next_epoch += 1;
            }
        }
        let rows = |m: &BTreeMap<u64, Vec<u8>>| -> Vec<(u64, Vec<u8>)> {
            // Any order will do: reversed.
            m.iter().rev().map(|(s, p)| (*s, p.clone())).collect()
        };
        self.ch = DurableChannel::restore(
            &st,
            rows(&self.store.outbox),
            rows(&self.store.inbox),
            self.store.delivered,
            cfg,
            now,
        )
        .unwrap();
        // Messages released but not acknowledged by the application come again.
        self.got.truncate(self.store.delivered as usize);
        assert_eq!(self.ch.outbox_len(), self.store.outbox.len());
    }
}

struct Sim {
    cfg: DurableConfig,
    rng: StdRng,
    crash_p: f64,
    sides: [Side; 2],
    links: [Link<Vec<u8>>; 2],
}

impl Sim {
    fn new(seed: u64, n: u64, crash_p: f64, cfg: DurableConfig) -> Sim {
        let (oa, ob) = sessions();
        Sim {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            crash_p,
            sides: [Side::new(oa, cfg, b'a', n), Side::new(ob, cfg, b'b', n)],
            links: [Link::new(0.2, 0.1, 40), Link::new(0.2, 0.1, 40)],
        }
    }

    fn crash(&mut self) -> bool {
        self.crash_p > 0.0 && self.rng.gen_bool(self.crash_p)
    }

    /// One side's work at `now`; `link` carries what it transmits.
    fn step(&mut self, i: usize, now: u64) {
        let cfg = self.cfg;
        // Send a few new messages.
        for _ in 0..self.rng.gen_range(0..4) {
            let Some(msg) = self.sides[i].queue.front().cloned() else {
                break;
            };
            let s = &mut self.sides[i];
            match s.ch.send(&msg, now) {
                Ok((seq, p)) => {
                    if self.crash_p > 0.0 && self.rng.gen_bool(self.crash_p) {
                        // Crash before the commit: the payload never leaves.
                        self.sides[i].restart(cfg, now);
                        break;
                    }
                    let s = &mut self.sides[i];
                    s.commit_state();
                    s.store.outbox.insert(seq, p);
                    assert_eq!(seq, s.sent.len() as u64);
                    s.sent.push(msg);
                    s.queue.pop_front();
                }
                Err(DurableError::Delivery(DeliveryError::Full)) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        // Transmit what is due.
        while let Some((_, p)) = self.sides[i].ch.poll_transmit(now) {
            self.sides[i].leave(&p);
            self.links[i].send(&mut self.rng, now, p);
        }
        // Receive.
        let mut need_ack = false;
        for p in self.links[1 - i].take_due(now) {
            let r = self.sides[i].ch.receive(&p, now);
            if matches!(r, Ok(Received::Data { .. }) | Ok(Received::Ack { .. })) && self.crash() {
                // Crash before the commit: as if never received.
                self.sides[i].restart(cfg, now);
                continue;
            }
            let s = &mut self.sides[i];
            match r {
                Ok(Received::Data { seq, body }) => {
                    s.commit_state();
                    s.store.inbox.insert(seq, body);
                    need_ack = true;
                }
                Ok(Received::Duplicate { .. }) => need_ack = true,
                // Acked too (see the module docs): the sender's fast retransmit.
                Ok(Received::Deferred { .. }) => {
                    s.deferred += 1;
                    need_ack = true;
                }
                Ok(Received::Ack { upto, .. }) => {
                    s.commit_state();
                    s.store.outbox = s.store.outbox.split_off(&upto);
                    assert!(upto <= s.sent.len() as u64);
                }
                Ok(Received::StaleAck) => s.stale += 1,
                // The link duplicates and delays acks: the control replay window refuses.
                Err(DurableError::Record(RecordError::Replay | RecordError::Stale)) => {
                    assert_eq!(parse_header(&p).unwrap().stream, Stream::Control);
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        // The application takes what is ready and acknowledges it at once; what that makes
        // room for comes out of the early-arrival stash (committed like any new message).
        loop {
            while let Some((seq, body)) = self.sides[i].ch.pop() {
                let s = &mut self.sides[i];
                assert_eq!(seq, s.got.len() as u64, "out of order or repeated");
                s.got.push(body);
                s.store.delivered = seq + 1;
                s.store.inbox = s.store.inbox.split_off(&(seq + 1));
            }
            let s = &mut self.sides[i];
            match s.ch.next_early(now) {
                Some(Ok(Received::Data { seq, body })) => {
                    s.commit_state();
                    s.store.inbox.insert(seq, body);
                    s.early += 1;
                    need_ack = true;
                }
                Some(other) => panic!("next_early: {other:?}"),
                None => break,
            }
        }
        if need_ack {
            let ack = self.sides[i].ch.ack_payload(now).unwrap();
            if self.crash() {
                self.sides[i].restart(cfg, now);
            } else {
                self.sides[i].commit_state();
                self.sides[i].leave(&ack);
                self.links[i].send(&mut self.rng, now, ack);
            }
        }
        // And sometimes a crash between steps.
        if self.crash() {
            self.sides[i].restart(cfg, now);
        }
    }

    fn check_prefixes(&self) {
        for i in 0..2 {
            let (rx, tx) = (&self.sides[i], &self.sides[1 - i]);
            assert!(rx.got.len() <= tx.sent.len());
            assert_eq!(
                rx.got[..],
                tx.sent[..rx.got.len()],
                "not exactly once in order"
            );
        }
    }

    /// Timer-driven resends and fast retransmits of both sides, restarts included.
    fn resend_counts(&self) -> (u64, u64) {
        let timer = self
            .sides
            .iter()
            .map(|s| s.timer_resends + s.ch.timer_resends())
            .sum();
        let fast = self
            .sides
            .iter()
            .map(|s| s.fast_retransmits + s.ch.fast_retransmits())
            .sum();
        (timer, fast)
    }

    fn done(&self, n: usize) -> bool {
        self.sides
            .iter()
            .all(|s| s.got.len() == n && s.ch.outbox_len() == 0 && s.queue.is_empty())
    }

    fn run(&mut self, n: usize) -> u64 {
        let mut now = 0u64;
        for _ in 0..2_000_000 {
            self.step(0, now);
            self.step(1, now);
            self.check_prefixes();
            if self.done(n) {
                return now;
            }
            let next = [
                self.links[0].next_time(),
                self.links[1].next_time(),
                self.sides[0].ch.poll_timeout(),
                self.sides[1].ch.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            // With messages still queued, time moves on by 1 ms at least.
            now = match next {
                Some(t) => t.max(now + 1),
                None => now + 1,
            };
        }
        panic!(
            "did not finish: got {} / {}, outboxes {} / {}",
            self.sides[0].got.len(),
            self.sides[1].got.len(),
            self.sides[0].ch.outbox_len(),
            self.sides[1].ch.outbox_len()
        );
    }
}

/// Exactly once, in order, both ways, over a link that drops, duplicates and reorders
/// (payloads and acks alike); outboxes drain. With a flow window beyond the peer's reorder
/// window the receiver defers, and it still works; with the default window too.
#[test]
fn lossy_link_delivers_exactly_once_in_order_both_ways() {
    for seed in 0..4 {
        let n = 1200;
        let mut c = cfg();
        c.outbox.max_records = 300;
        let beyond = seed % 2 == 0;
        if beyond {
            c.window = 4096;
            c.inbox.max_pending = 64;
        }
        let mut sim = Sim::new(seed, n as u64, 0.0, c);
        let end = sim.run(n);
        let (timer, fast) = sim.resend_counts();
        eprintln!(
            "seed {seed} window {}: done at {end} ms, deferred {} / {}, timer resends {timer}, \
             fast retransmits {fast}",
            c.window, sim.sides[0].deferred, sim.sides[1].deferred
        );
        for s in &sim.sides {
            assert_eq!(s.got.len(), n);
            if beyond {
                assert!(s.deferred > 0, "the window never deferred");
                assert!(s.early > 0, "nothing came from the stash");
            }
        }
        assert!(fast > 0, "no fast retransmit");
        assert_eq!(sim.sides[0].got, sim.sides[1].sent);
        assert_eq!(sim.sides[1].got, sim.sides[0].sent);
    }
}

/// Fast retransmit (an ack that frees nothing makes the window from the missing record due
/// at once) leaves strictly fewer resends to the backoff timer than without it, over the
/// same lossy link, and everything still arrives exactly once in order.
#[test]
fn fast_retransmit_leaves_fewer_resends_to_the_timer() {
    let mut with = (0, 0, 0);
    let mut without = (0, 0, 0);
    for seed in 0..4 {
        for fast in [true, false] {
            let n = 800;
            let mut c = cfg();
            c.outbox.rto_initial_ms = 200;
            c.outbox.rto_max_ms = 2_000;
            c.window = 64;
            c.fast_retransmit = fast;
            let mut sim = Sim::new(300 + seed, n as u64, 0.0, c);
            let end = sim.run(n);
            assert_eq!(sim.sides[0].got, sim.sides[1].sent);
            assert_eq!(sim.sides[1].got, sim.sides[0].sent);
            let (timer, fast_n) = sim.resend_counts();
            eprintln!("seed {seed} fast {fast}: done at {end} ms, timer resends {timer}, fast retransmits {fast_n}");
            let acc = if fast { &mut with } else { &mut without };
            acc.0 += timer;
            acc.1 += fast_n;
            acc.2 += end;
        }
    }
    eprintln!("with fast retransmit {with:?}, without {without:?} (timer resends, fast, ms)");
    assert_eq!(without.1, 0);
    assert!(with.1 > 0);
    assert!(
        with.0 < without.0,
        "timer resends with fast retransmit {} >= without {}",
        with.0,
        without.0
    );
}

/// The same with crashes of either side at random points (before and after commits): still
/// exactly once in order, no sequence number ever carries two payloads. Among the restores,
/// some have inbox rows the lookahead opener took (above the persisted opener's highest
/// record, in the next epoch).
#[test]
fn crashes_at_random_points_keep_exactly_once() {
    let mut above = 0;
    let mut next_epoch = 0;
    for seed in 0..4 {
        let n = 600;
        let mut c = cfg();
        c.outbox.max_records = 100;
        c.window = 64;
        c.inbox = InboxLimits {
            max_pending: 64,
            max_pending_bytes: 64 * 200,
            max_payload: 200,
        };
        let mut sim = Sim::new(100 + seed, n as u64, 0.01, c);
        sim.run(n);
        let crashes: usize = sim.sides.iter().map(|s| s.crashes).sum();
        assert!(crashes > 20, "only {crashes} crashes");
        above += sim
            .sides
            .iter()
            .map(|s| s.restores_above_highest)
            .sum::<usize>();
        next_epoch += sim
            .sides
            .iter()
            .map(|s| s.restores_next_epoch)
            .sum::<usize>();
        assert_eq!(sim.sides[0].got, sim.sides[1].sent);
        assert_eq!(sim.sides[1].got, sim.sides[0].sent);
    }
    eprintln!(
        "restores with rows above the opener's highest: {above}, in its next epoch: {next_epoch}"
    );
    assert!(next_epoch > 0, "no restore with rows of the next epoch");
    assert!(above >= next_epoch);
}

// ---------------------------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------------------------

/// A restore continues exactly: sequence numbers, resends of the outbox rows, redelivery of
/// unacknowledged inbox rows, refusal of records already taken.
#[test]
fn restore_continues_where_the_state_was_committed() {
    let (mut a, mut b) = pair(cfg());
    let p: Vec<_> = (0..5).map(|i| a.send(&body(i), 0).unwrap().1).collect();
    for q in &p[..3] {
        data(&mut b, q);
    }
    assert_eq!(b.pop().unwrap().0, 0); // app acknowledges 0 → delivered = 1
    let ack = b.ack_payload(0).unwrap();
    assert_eq!(a.receive(&ack, 0), Ok(Received::Ack { upto: 3, freed: 3 }));

    let rows_a: Vec<_> = (3..5).map(|i| (i, p[i as usize].clone())).collect();
    let mut a2 = DurableChannel::restore(&a.export(), rows_a, vec![], 0, cfg(), 50).unwrap();
    assert_eq!((a2.next_seq(), a2.acked(), a2.outbox_len()), (5, 3, 2));
    assert_eq!(a2.poll_timeout(), Some(50));
    assert_eq!(a2.poll_transmit(50), Some((3, p[3].clone())));
    assert_eq!(a2.poll_transmit(50), Some((4, p[4].clone())));
    assert_eq!(a2.poll_transmit(50), None);
    assert_eq!(a2.send(b"next", 50).unwrap().0, 5);

    let rows_b: Vec<_> = (0..3).map(|i| (i, body(i))).collect(); // row 0 is below delivered
    let st_b = DurableState::decode(&b.export().encode()).unwrap();
    assert_eq!(st_b, b.export());
    let mut b2 = DurableChannel::restore(&st_b, vec![], rows_b, 1, cfg(), 50).unwrap();
    assert_eq!(
        (b2.inbox_ack(), b2.next_to_release(), b2.inbox_len()),
        (3, 1, 2)
    );
    for q in &p[..3] {
        let seq = parse_header(q).unwrap().seq;
        assert_eq!(b2.receive(q, 50), Ok(Received::Duplicate { seq }));
    }
    assert_eq!(b2.pop(), Some((1, body(1))));
    assert_eq!(b2.pop(), Some((2, body(2))));
    assert_eq!(b2.pop(), None);
    assert_eq!(data(&mut b2, &p[3]), (3, body(3)));
    // The restored receiver's acks keep working with the restored sender.
    let ack = b2.ack_payload(60).unwrap();
    assert_eq!(
        a2.receive(&ack, 60),
        Ok(Received::Ack { upto: 4, freed: 1 })
    );
}

/// Restores with inbox rows the lookahead opener took (above the persisted data opener's
/// highest record: in the next epoch, and in the opener's own epoch once it moved there by a
/// lower record) are accepted and still deliver exactly once, in order.
#[test]
fn restore_accepts_rows_the_lookahead_took() {
    let per = 1u64 << DATA_RATCHET_LOG2;
    let (mut a, mut b) = pair(cfg());
    let p: Vec<_> = (0..2 * per)
        .map(|i| a.send(&body(i), 0).unwrap().1)
        .collect();
    let mut rows = BTreeMap::new();
    let take = |b: &mut DurableChannel, i: u64, rows: &mut BTreeMap<u64, Vec<u8>>| {
        let (seq, got) = data(b, &p[i as usize]);
        rows.insert(seq, got);
    };
    for i in 0..=100 {
        take(&mut b, i, &mut rows);
    }
    // The application takes 0..=100 and acknowledges 0..50.
    for i in 0..=100 {
        assert_eq!(b.pop().unwrap().0, i);
    }
    let delivered = 50;
    // Next epoch, by the lookahead: 300.
    take(&mut b, 300, &mut rows);
    let st0 = b.export();
    let rows0: Vec<_> = rows
        .range(delivered..)
        .map(|(s, m)| (*s, m.clone()))
        .collect();

    // Restore 1: rows 50..=100 and 300 (next epoch, above the opener's highest 100).
    let mut b1 = DurableChannel::restore(&st0, vec![], rows0, delivered, cfg(), 0).unwrap();
    assert_eq!(b1.receive(&p[300], 0), Ok(Received::Duplicate { seq: 300 }));
    let mut out: Vec<u64> = Vec::new();
    while let Some((s, m)) = b1.pop() {
        assert_eq!(m, body(s));
        out.push(s);
    }
    assert_eq!(out, (delivered..=100).collect::<Vec<_>>());

    // In the first process: epoch 0 completes, then 260 moves the opener to epoch 1, below
    // the row 300 the lookahead took.
    for i in 101..per {
        take(&mut b, i, &mut rows);
        assert_eq!(b.pop().unwrap().0, i);
    }
    take(&mut b, 260, &mut rows);
    let st1 = b.export();
    assert_ne!(st1, st0);
    let rows1: Vec<_> = rows.range(per..).map(|(s, m)| (*s, m.clone())).collect();
    let mut b2 = DurableChannel::restore(&st1, vec![], rows1, per, cfg(), 0).unwrap();
    for i in [260, 300] {
        assert_eq!(
            b2.receive(&p[i as usize], 0),
            Ok(Received::Duplicate { seq: i })
        );
    }
    let mut out = Vec::new();
    for i in (per..2 * per).rev() {
        match b2.receive(&p[i as usize], 0) {
            Ok(Received::Data { seq, .. }) => assert!(seq != 260 && seq != 300),
            Ok(Received::Duplicate { seq }) => assert!(seq == 260 || seq == 300),
            other => panic!("{i}: {other:?}"),
        }
    }
    while let Some((s, m)) = b2.pop() {
        assert_eq!(m, body(s));
        out.push(s);
    }
    assert_eq!(out, (per..2 * per).collect::<Vec<_>>());
}

/// Rows the persistence contract cannot produce are refused.
#[test]
fn restore_refuses_inconsistent_rows() {
    let (mut a, mut b) = pair(cfg());
    let p: Vec<_> = (0..4).map(|i| a.send(&body(i), 0).unwrap().1).collect();
    for q in &p[..3] {
        data(&mut b, q);
    }
    let sa = a.export();
    let sb = b.export();
    let row = |i: u64| (i, p[i as usize].clone());
    let ok = |r: Result<DurableChannel, DurableError>| r.map(|_| ());
    let bad = |why| Err::<(), _>(DurableError::BadState(why));
    let c = cfg();

    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            (0..4).map(row).collect(),
            vec![],
            0,
            c,
            0
        )),
        Ok(())
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            (2..4).map(row).collect(),
            vec![],
            0,
            c,
            0
        )),
        Ok(())
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            (0..4).map(row).chain([(4, p[0].clone())]).collect(),
            vec![],
            0,
            c,
            0
        )),
        bad("outbox row at or above the next sequence number")
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            vec![row(0), row(2), row(3)],
            vec![],
            0,
            c,
            0
        )),
        bad("outbox rows repeated or not contiguous")
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            vec![row(1), row(1), row(2), row(3)],
            vec![],
            0,
            c,
            0
        )),
        bad("outbox rows repeated or not contiguous")
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            vec![row(1), row(2)],
            vec![],
            0,
            c,
            0
        )),
        bad("outbox rows end below the next sequence number")
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            vec![row(2), (3, p[2].clone())],
            vec![],
            0,
            c,
            0
        )),
        bad("outbox row is not its data payload")
    );
    let mut small = cfg();
    small.outbox.max_records = 2;
    assert_eq!(
        ok(DurableChannel::restore(
            &sa,
            (0..4).map(row).collect(),
            vec![],
            0,
            small,
            0
        )),
        bad("outbox rows exceed the limits")
    );

    let irow = |i: u64| (i, body(i));
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            (0..3).map(irow).collect(),
            0,
            c,
            0
        )),
        Ok(())
    );
    assert_eq!(
        ok(DurableChannel::restore(&sb, vec![], vec![], 3, c, 0)),
        Ok(())
    );
    // Rows above the opener's highest record up to the end of the next epoch may have been
    // taken by the lookahead opener; beyond it they cannot exist.
    let per = 1u64 << DATA_RATCHET_LOG2;
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            (0..4).map(irow).collect(),
            0,
            c,
            0
        )),
        Ok(())
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            (0..3).map(irow).chain([irow(2 * per)]).collect(),
            0,
            c,
            0
        )),
        bad("inbox row above the records received")
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            [irow(2 * per - 1)].into(),
            2 * per - 2,
            c,
            0
        )),
        Ok(())
    );
    assert_eq!(
        ok(DurableChannel::restore(&sb, vec![], vec![], 2 * per, c, 0)),
        Ok(())
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            vec![],
            2 * per + 1,
            c,
            0
        )),
        bad("delivered mark above the records received")
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            (0..2).map(irow).collect(),
            0,
            c,
            0
        )),
        bad("the last record received is missing from the inbox rows")
    );
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            vec![irow(1), irow(1), irow(2)],
            0,
            c,
            0
        )),
        bad("inbox rows repeated")
    );
    let mut tiny = cfg();
    tiny.inbox = InboxLimits {
        max_pending: 8,
        max_pending_bytes: 16,
        max_payload: 8,
    };
    assert_eq!(
        ok(DurableChannel::restore(
            &sb,
            vec![],
            (0..3).map(irow).collect(),
            0,
            tiny,
            0
        )),
        bad("inbox row too long")
    );
}

// ---------------------------------------------------------------------------------------------
// The state codec
// ---------------------------------------------------------------------------------------------

fn busy_state() -> DurableState {
    let (mut a, mut b) = pair(cfg());
    for i in 0..300 {
        let (_, p) = a.send(&body(i), 0).unwrap();
        data(&mut b, &p);
        b.pop();
    }
    let ack = b.ack_payload(0).unwrap();
    a.receive(&ack, 0).unwrap();
    let ack = a.ack_payload(0).unwrap();
    b.receive(&ack, 0).unwrap();
    a.export()
}

#[test]
fn state_round_trips_and_hides_keys() {
    let st = busy_state();
    let bytes = st.encode();
    assert_eq!(DurableState::decode(&bytes), Ok(st.clone()));
    assert_eq!(DurableState::decode(&bytes).unwrap().encode(), bytes);

    let (oa, _) = sessions();
    let ctx = &oa.kdf_context;
    let roots = [
        kdf32(oa.exported_key.expose(), b"KEAV durable data", ctx),
        kdf32(oa.exported_key.expose(), b"KEAV durable control", ctx),
    ];
    let (a, _) = pair(cfg());
    for d in [
        format!("{st:?}"),
        format!("{:?}", a.export()),
        format!("{a:?}"),
    ] {
        for k in &roots {
            assert!(!d.contains(&hex::encode(k.expose())), "{d}");
            assert!(!d.contains(&format!("{:?}", k.expose())), "{d}");
        }
        // No chain key bytes either (parts carry 32-byte keys; a derived Debug would show
        // byte arrays).
        assert!(!d.contains("chain") && d.len() < 400, "{d}");
    }
}

#[test]
fn state_decode_refuses_malformed_and_inconsistent_input() {
    let st = busy_state();
    let bytes = st.encode().to_vec();
    for n in 0..bytes.len() {
        assert!(
            DurableState::decode(&bytes[..n]).is_err(),
            "truncated at {n}"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        DurableState::decode(&long),
        Err(DurableError::BadState("trailing bytes"))
    );
    let mut v = bytes.clone();
    v[4] = 2;
    assert_eq!(
        DurableState::decode(&v),
        Err(DurableError::BadState("version"))
    );
    v = bytes.clone();
    v[0] = b'X';
    assert_eq!(
        DurableState::decode(&v),
        Err(DurableError::BadState("magic"))
    );

    let parts = split_state(&bytes);
    // A missing part.
    let mut p = parts.clone();
    p[2].clear();
    assert_eq!(
        DurableState::decode(&join_state(&p)),
        Err(DurableError::BadState("part missing"))
    );
    // A part too long.
    let mut p = parts.clone();
    p[1].resize(2000, 0);
    assert_eq!(
        DurableState::decode(&join_state(&p)),
        Err(DurableError::BadState("part too long"))
    );
    // Parts swapped: the control sealer in the data slot (its policy gives it away), an opener
    // in a sealer's slot.
    let mut p = parts.clone();
    p.swap(0, 2);
    assert_eq!(
        DurableState::decode(&join_state(&p)),
        Err(DurableError::BadState("data ratchet policy"))
    );
    let mut p = parts.clone();
    p.swap(0, 1);
    assert_eq!(
        DurableState::decode(&join_state(&p)),
        Err(DurableError::BadState("data sealer"))
    );
    // Parts of channels with different AEADs.
    let (oa, _) = sessions();
    let mut other = copy(oa);
    other.channel_aead = Some(match oa.channel_aead.unwrap() {
        Aead::Aes256Gcm => Aead::ChaCha20Poly1305,
        Aead::ChaCha20Poly1305 => Aead::Aes256Gcm,
    });
    let o = DurableChannel::new(&other, cfg(), 0).unwrap();
    let other_parts = split_state(&o.export().encode());
    let mut p = parts.clone();
    p[3] = other_parts[3].clone();
    assert_eq!(
        DurableState::decode(&join_state(&p)),
        Err(DurableError::BadState("parts disagree on the AEAD"))
    );
    // A part that does not decode.
    let mut p = parts.clone();
    p[3][0] ^= 1;
    assert_eq!(
        DurableState::decode(&join_state(&p)),
        Err(DurableError::BadState("control opener"))
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn taken(r: &Result<Received, DurableError>) -> bool {
        matches!(r, Ok(Received::Data { .. } | Received::Ack { .. }))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Garbage never decodes and never panics (with and without the right magic).
        #[test]
        fn state_decode_refuses_garbage(
            raw in proptest::collection::vec(any::<u8>(), 0..1200),
            magic in any::<bool>(),
        ) {
            let mut v = raw;
            if magic {
                let mut m = b"KVDS\x01".to_vec();
                m.extend_from_slice(&v);
                v = m;
            }
            prop_assert!(DurableState::decode(&v).is_err());
        }

        /// A flipped bit is refused, or (in key material, which has no checksum here:
        /// keav-store checksums its records) decodes to a different state that encodes back
        /// to exactly the flipped bytes.
        #[test]
        fn state_bit_flips_are_refused_or_canonical(bit in 0usize..100_000) {
            static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
            let bytes = BYTES.get_or_init(|| busy_state().encode().to_vec());
            let bit = bit % (bytes.len() * 8);
            let mut v = bytes.clone();
            v[bit / 8] ^= 1 << (bit % 8);
            if let Ok(st) = DurableState::decode(&v) {
                prop_assert_eq!(st.encode().to_vec(), v.clone());
                prop_assert_ne!(st, DurableState::decode(bytes).unwrap());
            }
            // Header and length fields are always structural.
            if bit / 8 < 7 {
                prop_assert!(DurableState::decode(&v).is_err());
            }
        }

        /// Arbitrary payloads never panic the receiver and never deliver anything.
        #[test]
        fn receive_never_panics_or_delivers_garbage(
            stream in 0u8..4,
            epoch in prop::sample::select(vec![0u32, 1, 2, u32::MAX]),
            seq in prop::sample::select(vec![0u64, 1, 5, 255, 256, u64::MAX]),
            tail in proptest::collection::vec(any::<u8>(), 0..100),
            raw in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let (_, mut b) = pair(cfg());
            let before = snapshot(&b);
            let r = b.receive(&raw, 0);
            prop_assert!(!taken(&r), "{:?}", r);
            let mut p = vec![PAYLOAD_TAG, stream, record::TYPE_DATA];
            p.extend_from_slice(&epoch.to_be_bytes());
            p.extend_from_slice(&seq.to_be_bytes());
            p.extend_from_slice(&tail);
            let r = b.receive(&p, 0);
            prop_assert!(!taken(&r), "{:?}", r);
            prop_assert_eq!(snapshot(&b), before);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Early arrivals (the stash)
// ---------------------------------------------------------------------------------------------

/// Drains the stash: every record it releases, as (seq, body), and the errors it reported.
fn drain_early(b: &mut DurableChannel) -> (Vec<(u64, Vec<u8>)>, Vec<DurableError>) {
    let (mut got, mut errs) = (Vec::new(), Vec::new());
    loop {
        while let Some((seq, body)) = b.pop() {
            got.push((seq, body));
        }
        match b.next_early(0) {
            Some(Ok(Received::Data { .. })) => {}
            Some(Ok(other)) => panic!("next_early gave {other:?}"),
            Some(Err(e)) => errs.push(e),
            None => break,
        }
    }
    while let Some((seq, body)) = b.pop() {
        got.push((seq, body));
    }
    (got, errs)
}

#[test]
fn a_backlog_behind_a_gap_is_released_from_the_stash_without_resends() {
    let n = 3 * (1u64 << DATA_RATCHET_LOG2) + 17;
    let (mut a, mut b) = pair(cfg());
    let p: Vec<_> = (0..n).map(|i| a.send(&body(i), 0).unwrap().1).collect();
    // Everything but record 3 arrives, far beyond the reorder window and across epochs.
    let mut released = Vec::new();
    for (i, q) in p.iter().enumerate() {
        if i == 3 {
            continue;
        }
        match b.receive(q, 0).unwrap() {
            Received::Data { .. } | Received::Deferred { .. } => {}
            other => panic!("{other:?}"),
        }
        while let Some(m) = b.pop() {
            released.push(m);
        }
    }
    assert_eq!(released.len(), 3, "only 0..3 before the gap");
    assert!(!b.early_ready(), "the stash waits for the gap");
    let (held, _) = b.early_len();
    assert!(held as u64 >= n - 4 - 256, "held {held}");
    // Nothing in the stash is persisted: the key state did not move past the gap.
    assert_eq!(b.inbox_ack(), 3);

    // The gap fills: the whole backlog comes out of the stash, once, in order.
    data(&mut b, &p[3]);
    while let Some(m) = b.pop() {
        released.push(m);
    }
    assert!(b.early_ready(), "room in the window again");
    let (got, errs) = drain_early(&mut b);
    assert!(errs.is_empty(), "{errs:?}");
    released.extend(got);
    let seqs: Vec<u64> = released.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (0..n).collect::<Vec<_>>());
    assert!(released.iter().all(|(s, b2)| *b2 == body(*s)));
    assert_eq!(b.inbox_ack(), n);
    assert_eq!(b.early_len(), (0, 0));
    // Late copies are duplicates.
    assert_eq!(
        b.receive(&p[n as usize - 1], 0),
        Ok(Received::Duplicate { seq: n - 1 })
    );
}

#[test]
fn the_stash_is_bounded_and_keeps_the_lowest_sequence_numbers() {
    let mut c = cfg();
    c.early_records = 10;
    let (mut a, mut b) = pair(c);
    let p: Vec<_> = (0..400u64)
        .map(|i| a.send(&body(i), 0).unwrap().1)
        .collect();
    // Arrive in reverse order (highest first), without record 0.
    for q in p[1..].iter().rev() {
        assert!(matches!(
            b.receive(q, 0),
            Ok(Received::Data { .. } | Received::Deferred { .. })
        ));
    }
    // The window holds 1..256; the stash the 10 lowest beyond it.
    assert_eq!(b.early_len().0, 10);
    data(&mut b, &p[0]);
    let (got, errs) = drain_early(&mut b);
    assert!(errs.is_empty());
    let last = got.last().unwrap().0;
    assert_eq!(got.len() as u64, last + 1);
    assert_eq!(last, 255 + 10, "window, then exactly the stashed ten");
    // The rest comes with resends.
    for q in &p[last as usize + 1..] {
        data(&mut b, q);
    }
    let (rest, _) = drain_early(&mut b);
    assert_eq!(rest.first().unwrap().0, last + 1);
    assert_eq!(rest.last().unwrap().0, 399);

    // Off: nothing is stashed.
    let mut off = cfg();
    off.early_records = 0;
    let (mut a, mut b) = pair(off);
    let p: Vec<_> = (0..300u64)
        .map(|i| a.send(&body(i), 0).unwrap().1)
        .collect();
    assert_eq!(b.receive(&p[299], 0), Ok(Received::Deferred { seq: 299 }));
    assert_eq!(b.early_len(), (0, 0));
}

#[test]
fn a_forged_stashed_record_delays_but_neither_forges_nor_loses() {
    let (mut a, mut b) = pair(cfg());
    let p: Vec<_> = (0..600u64)
        .map(|i| a.send(&body(i), 0).unwrap().1)
        .collect();
    // An attacker plants a forgery of record 300 before the genuine one arrives.
    let mut forged = p[300].clone();
    *forged.last_mut().unwrap() ^= 1;
    let before = snapshot(&b);
    assert_eq!(b.receive(&forged, 0), Ok(Received::Deferred { seq: 300 }));
    assert_eq!(snapshot(&b), before, "a stashed payload changes no state");
    for q in &p[1..] {
        b.receive(q, 0).unwrap();
    }
    data(&mut b, &p[0]);
    let (got, errs) = drain_early(&mut b);
    // Released up to the forgery's place, which fails to open and is dropped.
    assert_eq!(got.last().unwrap().0, 299);
    assert_eq!(errs, vec![DurableError::Record(RecordError::BadTag)]);
    // The sender's resend of 300 fills it; the rest follows from the stash, in order.
    data(&mut b, &p[300]);
    let (rest, errs) = drain_early(&mut b);
    assert!(errs.is_empty());
    let seqs: Vec<u64> = rest.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (300..600).collect::<Vec<_>>());
    assert!(rest.iter().all(|(s, b2)| *b2 == body(*s)));
}

/// A receiver whose reorder window (256) is full, nothing popped, and the `n` payloads its
/// peer sealed.
fn window_full(cfg: DurableConfig, n: u64) -> (Vec<Vec<u8>>, DurableChannel) {
    let (mut a, mut b) = pair(cfg);
    let p: Vec<_> = (0..n).map(|i| a.send(&body(i), 0).unwrap().1).collect();
    for q in &p[..256] {
        data(&mut b, q);
    }
    (p, b)
}

/// A receiver that is only behind (records beyond its window arrive in order and are
/// stashed) does not ask for them again; one missing a record does, and so does one whose
/// stash lost or dropped the record.
#[test]
fn deferrals_ask_for_an_ack_only_when_something_is_missing() {
    // In order, nothing popped: the window (256) fills, the rest is stashed in order.
    let (p, mut b) = window_full(cfg(), 700);
    for (i, q) in p.iter().enumerate().take(400).skip(256) {
        assert_eq!(b.receive(q, 0), Ok(Received::Deferred { seq: i as u64 }));
        assert!(!b.deferral_needs_ack(i as u64), "{i}: only behind");
    }
    // A resend of a stashed record asks for nothing either.
    assert_eq!(b.receive(&p[300], 0), Ok(Received::Deferred { seq: 300 }));
    assert!(!b.deferral_needs_ack(300));
    // 400 is lost: everything after it has a gap below it.
    for (i, q) in p.iter().enumerate().take(450).skip(401) {
        assert_eq!(b.receive(q, 0), Ok(Received::Deferred { seq: i as u64 }));
        assert!(b.deferral_needs_ack(i as u64), "{i}: 400 is missing");
    }
    // Its resend closes the gap: the run goes on through what was stashed after it.
    assert_eq!(b.receive(&p[400], 0), Ok(Received::Deferred { seq: 400 }));
    assert!(!b.deferral_needs_ack(400));
    assert_eq!(b.receive(&p[450], 0), Ok(Received::Deferred { seq: 450 }));
    assert!(!b.deferral_needs_ack(450));
    // Everything comes out, in order, once the application pops.
    let (got, errs) = drain_early(&mut b);
    assert!(errs.is_empty());
    let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (0..451).collect::<Vec<_>>());

    // A stash too small to keep a record: it must be asked for.
    let mut small = cfg();
    small.early_records = 4;
    let (p, mut b) = window_full(small, 270);
    for i in 256..260u64 {
        b.receive(&p[i as usize], 0).unwrap();
        assert!(!b.deferral_needs_ack(i));
    }
    assert_eq!(b.receive(&p[260], 0), Ok(Received::Deferred { seq: 260 }));
    assert!(b.deferral_needs_ack(260), "not kept: ask for it");
    // A lower record pushes out the highest: the run ends below what was pushed out.
    let (p, mut b) = window_full(small, 270);
    for i in [257u64, 258, 259, 260] {
        b.receive(&p[i as usize], 0).unwrap();
        assert!(b.deferral_needs_ack(i), "{i}: 256 is missing");
    }
    b.receive(&p[256], 0).unwrap();
    assert!(!b.deferral_needs_ack(256));
    assert!(!b.deferral_needs_ack(259));
    assert!(b.deferral_needs_ack(260), "pushed out of the stash");

    // A forged record in the run: once it fails to open, its place is missing again.
    let (p, mut b) = window_full(cfg(), 300);
    let mut forged = p[256].clone();
    *forged.last_mut().unwrap() ^= 1;
    b.receive(&forged, 0).unwrap();
    for q in &p[257..260] {
        b.receive(q, 0).unwrap();
    }
    assert!(!b.deferral_needs_ack(259), "the forgery is not known yet");
    // One message popped makes room for 256: its forgery fails to open and is dropped.
    assert_eq!(b.pop().map(|m| m.0), Some(0));
    assert!(matches!(b.next_early(0), Some(Err(_))));
    assert!(b.deferral_needs_ack(259), "256 is missing again");
    assert_eq!(b.receive(&p[260], 0), Ok(Received::Deferred { seq: 260 }));
    assert!(b.deferral_needs_ack(260), "256 is missing again");
}
