//! Replay guard tests: replay, reorder, window, lock-out, expiry, persistence.

use proptest::prelude::*;

use super::*;
use crate::keys::{Alg, SigningKey};
use crate::wire::{Envelope, Message, MessageType, Token};

const ME: DeviceId = DeviceId([0xaa; 8]);
const PEER: DeviceId = DeviceId([0x11; 8]);
const NOW: u64 = 1_700_000_000;

fn hdr(seq: u64) -> Header {
    hdr_from(PEER, seq, NOW + 60)
}

fn hdr_from(sender: DeviceId, seq: u64, expiry: u64) -> Header {
    Header {
        msg_type: MessageType::Action,
        alg: Alg::Ed25519,
        sender,
        recipient: ME,
        seq,
        expiry,
        token: Token::default(),
    }
}

fn guard() -> Guard {
    Guard::new(ME, GuardConfig::default())
}

/// Check then commit; the result of either.
fn admit(g: &mut Guard, h: &Header, now: u64) -> Result<(), GuardError> {
    let a = g.check(h, now)?;
    g.commit(a).map(|_| ())
}

#[test]
fn duplicates_are_refused_and_check_changes_nothing() {
    let mut g = guard();
    let before = g.state().clone();
    assert!(g.check(&hdr(1), NOW).is_ok());
    assert!(g.check(&hdr(1), NOW).is_ok());
    assert_eq!(g.state(), &before, "check alone changes nothing");
    admit(&mut g, &hdr(1), NOW).unwrap();
    assert_eq!(
        admit(&mut g, &hdr(1), NOW),
        Err(GuardError::Replay { seq: 1 })
    );
    assert_eq!(g.peer(PEER).unwrap().highest(), 1);
}

#[test]
fn sequence_zero_is_never_accepted() {
    let mut g = guard();
    assert_eq!(
        admit(&mut g, &hdr(0), NOW),
        Err(GuardError::Replay { seq: 0 })
    );
}

#[test]
fn two_admissions_for_one_number_commit_once() {
    let mut g = guard();
    let a = g.check(&hdr(5), NOW).unwrap();
    let b = g.check(&hdr(5), NOW).unwrap();
    assert!(g.commit(a).is_ok());
    assert_eq!(g.commit(b), Err(GuardError::Replay { seq: 5 }));
}

#[test]
fn reorder_within_window_is_accepted_exactly_once() {
    let mut g = guard();
    // 1..=200 delivered as: 200 first, then the rest backwards.
    admit(&mut g, &hdr(200), NOW).unwrap();
    for seq in (1..200).rev() {
        let r = admit(&mut g, &hdr(seq), NOW);
        if 200 - seq < WINDOW {
            assert_eq!(r, Ok(()), "seq {seq} within the window");
        } else {
            assert_eq!(
                r,
                Err(GuardError::BelowWindow { seq, highest: 200 }),
                "seq {seq} below the window"
            );
        }
    }
    // Every one of them a second time: refused.
    for seq in 1..=200 {
        assert!(admit(&mut g, &hdr(seq), NOW).is_err(), "seq {seq} twice");
    }
    // Interleaved: 300, 298, 299, 297, 301 all accepted once.
    for seq in [300, 298, 299, 297, 301] {
        admit(&mut g, &hdr(seq), NOW).unwrap();
    }
    for seq in [300, 298, 299, 297, 301] {
        assert_eq!(
            admit(&mut g, &hdr(seq), NOW),
            Err(GuardError::Replay { seq })
        );
    }
    // The edge of the window: with highest 420, 420 - 127 = 293 is the oldest acceptable.
    admit(&mut g, &hdr(420), NOW).unwrap();
    assert_eq!(admit(&mut g, &hdr(294), NOW), Ok(()));
    assert_eq!(admit(&mut g, &hdr(293), NOW), Ok(()));
    assert_eq!(
        admit(&mut g, &hdr(292), NOW),
        Err(GuardError::BelowWindow {
            seq: 292,
            highest: 420
        })
    );
    // 297..=301 are still in the window and still refused.
    assert_eq!(
        admit(&mut g, &hdr(297), NOW),
        Err(GuardError::Replay { seq: 297 })
    );
}

#[test]
fn lock_out_attempt_is_refused_and_moves_nothing() {
    let mut g = guard();
    admit(&mut g, &hdr(1), NOW).unwrap();
    let before = g.state().clone();
    assert_eq!(
        admit(&mut g, &hdr(u64::MAX), NOW),
        Err(GuardError::JumpTooFar {
            seq: u64::MAX,
            highest: 1,
            max_jump: DEFAULT_MAX_JUMP
        })
    );
    assert_eq!(g.state(), &before);
    // Later normal messages still go through.
    admit(&mut g, &hdr(2), NOW).unwrap();
    admit(&mut g, &hdr(3), NOW).unwrap();
    // The bound itself: exactly max_jump ahead is accepted, one more is not.
    assert!(admit(&mut g, &hdr(3 + DEFAULT_MAX_JUMP + 1), NOW).is_err());
    admit(&mut g, &hdr(3 + DEFAULT_MAX_JUMP), NOW).unwrap();
    // A fresh peer: the first number counts from 0.
    let mut g = guard();
    assert!(matches!(
        admit(&mut g, &hdr(DEFAULT_MAX_JUMP + 1), NOW),
        Err(GuardError::JumpTooFar { .. })
    ));
    assert!(g.peer(PEER).is_none());
    admit(&mut g, &hdr(DEFAULT_MAX_JUMP), NOW).unwrap();
}

#[test]
fn expiry_is_enforced_both_ways() {
    let mut g = guard();
    // Valid up to and including its expiry second.
    admit(&mut g, &hdr_from(PEER, 1, NOW), NOW).unwrap();
    assert_eq!(
        admit(&mut g, &hdr_from(PEER, 2, NOW - 1), NOW),
        Err(GuardError::Expired {
            expiry: NOW - 1,
            now: NOW
        })
    );
    // A command withheld for an hour, delivered after its one-minute expiry.
    let withheld = hdr_from(PEER, 3, NOW + 60);
    assert!(matches!(
        admit(&mut g, &withheld, NOW + 3600),
        Err(GuardError::Expired { .. })
    ));
    // Expiry too far in the future (a message meant to be replayable for years).
    assert_eq!(
        admit(&mut g, &hdr_from(PEER, 4, u64::MAX), NOW),
        Err(GuardError::ExpiryTooFar {
            expiry: u64::MAX,
            limit: NOW + DEFAULT_MAX_LIFETIME
        })
    );
    admit(&mut g, &hdr_from(PEER, 5, NOW + DEFAULT_MAX_LIFETIME), NOW).unwrap();
    // Refused messages did not move the state.
    assert_eq!(g.peer(PEER).unwrap().highest(), 5);
    admit(&mut g, &hdr(2), NOW).unwrap();
    // `now` near u64::MAX does not overflow.
    let g2 = guard();
    assert!(g2.check(&hdr_from(PEER, 1, u64::MAX), u64::MAX).is_ok());
    // Configurable lifetime.
    let g3 = Guard::new(
        ME,
        GuardConfig {
            max_lifetime: 10,
            ..GuardConfig::default()
        },
    );
    assert!(g3.check(&hdr_from(PEER, 1, NOW + 10), NOW).is_ok());
    assert!(g3.check(&hdr_from(PEER, 1, NOW + 11), NOW).is_err());
}

#[test]
fn messages_for_another_device_are_refused() {
    let g = guard();
    let mut h = hdr(1);
    h.recipient = DeviceId([0xbb; 8]);
    assert_eq!(
        g.check(&h, NOW),
        Err(GuardError::WrongRecipient {
            recipient: DeviceId([0xbb; 8]),
            me: ME
        })
    );
}

#[test]
fn peers_are_independent_and_send_counters_are_separate() {
    let mut g = guard();
    let other = DeviceId([0x22; 8]);
    admit(&mut g, &hdr(7), NOW).unwrap();
    admit(&mut g, &hdr_from(other, 7, NOW + 5), NOW).unwrap();
    assert!(admit(&mut g, &hdr_from(other, 7, NOW + 5), NOW).is_err());
    // Receiving does not move the send counter, and each peer has its own.
    assert_eq!(g.next_send(PEER), Ok(1));
    assert_eq!(g.next_send(PEER), Ok(2));
    assert_eq!(g.next_send(other), Ok(1));
    assert_eq!(g.peer(PEER).unwrap().next_send(), 3);
    assert_eq!(g.peer(PEER).unwrap().highest(), 7);
    // Sending does not open the receive window.
    assert!(admit(&mut g, &hdr(7), NOW).is_err());
}

#[test]
fn restart_then_replay_is_refused() {
    let mut g = guard();
    for seq in [1, 2, 4, 3, 10] {
        admit(&mut g, &hdr(seq), NOW).unwrap();
    }
    g.next_send(PEER).unwrap();
    let saved = g.state().encode();
    let peer_saved = g.peer(PEER).unwrap().encode();
    assert_eq!(peer_saved.len(), PEER_STATE_LEN);
    drop(g);

    // Whole-state restore.
    let mut g = Guard::from_state(
        ME,
        GuardConfig::default(),
        GuardState::decode(&saved).unwrap(),
    );
    for seq in [1, 2, 3, 4, 10] {
        assert_eq!(
            admit(&mut g, &hdr(seq), NOW),
            Err(GuardError::Replay { seq })
        );
    }
    admit(&mut g, &hdr(5), NOW).unwrap();
    assert_eq!(g.next_send(PEER), Ok(2), "send counter survives too");

    // Per-peer restore.
    let mut g = Guard::new(ME, GuardConfig::default());
    g.load_peer(PEER, PeerState::decode(&peer_saved).unwrap());
    assert_eq!(
        admit(&mut g, &hdr(10), NOW),
        Err(GuardError::Replay { seq: 10 })
    );
    admit(&mut g, &hdr(9), NOW).unwrap();
}

#[test]
fn signed_messages_through_the_documented_call_order() {
    // decode -> verify -> check -> commit -> persist; a replay after "restart" is refused.
    let server = SigningKey::generate(Alg::Ed25519).unwrap();
    let mut out_guard = Guard::new(server.device_id(), GuardConfig::default());
    let env = Envelope {
        sender: server.device_id(),
        recipient: ME,
        seq: out_guard.next_send(ME).unwrap(),
        expiry: NOW + 30,
        token: Token::random(),
    };
    let bytes = Message::sign(&env, &crate::wire::Terminate.into(), &server).unwrap();

    let mut g = guard();
    let m = Message::decode(&bytes)
        .unwrap()
        .verify(&server.public())
        .unwrap();
    let a = g.check(m.header(), NOW).unwrap();
    let persisted = g.commit(a).unwrap().encode();

    let mut g = guard();
    g.load_peer(server.device_id(), PeerState::decode(&persisted).unwrap());
    let again = Message::decode(&bytes)
        .unwrap()
        .verify(&server.public())
        .unwrap();
    assert_eq!(
        g.check(again.header(), NOW),
        Err(GuardError::Replay { seq: 1 })
    );
}

/// The documented order with the read-only precheck first: a forged message with a high
/// sequence number passes the precheck, fails its signature, and leaves the window alone, so
/// a later genuine message with a lower number is still accepted.
fn receive(g: &mut Guard, bytes: &[u8], key: &crate::keys::PublicKey) -> Result<(), String> {
    let u = Message::decode(bytes).map_err(|e| e.to_string())?;
    g.precheck(u.header(), NOW).map_err(|e| e.to_string())?;
    let m = u.verify(key).map_err(|e| e.to_string())?;
    let a = g.check(m.header(), NOW).map_err(|e| e.to_string())?;
    g.commit(a).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn forged_high_sequence_does_not_advance_the_window() {
    let server = SigningKey::generate(Alg::Ed25519).unwrap();
    let mallory = SigningKey::generate(Alg::Ed25519).unwrap();
    let msg = |seq: u64, key: &SigningKey| {
        let env = Envelope {
            sender: server.device_id(),
            recipient: ME,
            seq,
            expiry: NOW + 30,
            token: Token::random(),
        };
        Message::sign(&env, &crate::wire::Terminate.into(), key).unwrap()
    };
    let mut g = guard();
    receive(&mut g, &msg(1, &server), &server.public()).unwrap();
    let before = g.state().clone();
    let forged = msg(500, &mallory);
    assert!(g
        .precheck(Message::decode(&forged).unwrap().header(), NOW)
        .is_ok());
    assert!(receive(&mut g, &forged, &server.public()).is_err());
    assert_eq!(g.state(), &before, "a forgery moves nothing");
    // Lower than the forgery's number, and still accepted.
    receive(&mut g, &msg(2, &server), &server.public()).unwrap();
    assert_eq!(g.peer(server.device_id()).unwrap().highest(), 2);
    // The genuine number 500 is accepted later too (not marked as seen by the forgery).
    receive(&mut g, &msg(500, &server), &server.public()).unwrap();
    // The precheck refuses replays before any signature work, and changes nothing.
    let st = g.state().clone();
    assert_eq!(
        g.precheck(Message::decode(&msg(500, &mallory)).unwrap().header(), NOW),
        Err(GuardError::Replay { seq: 500 })
    );
    assert_eq!(g.state(), &st);
}

#[test]
fn reset_peer_starts_afresh() {
    let mut g = guard();
    for s in 1..=5 {
        admit(&mut g, &hdr(s), NOW).unwrap();
    }
    g.next_send(PEER).unwrap();
    assert_eq!(
        admit(&mut g, &hdr(1), NOW),
        Err(GuardError::Replay { seq: 1 })
    );
    assert_eq!(g.reset_peer(PEER), &PeerState::default());
    admit(&mut g, &hdr(1), NOW).unwrap();
    assert_eq!(g.next_send(PEER).unwrap(), 1);
    // Another peer is untouched; resetting an unknown peer creates a fresh state.
    let other = DeviceId([0x22; 8]);
    assert_eq!(g.reset_peer(other), &PeerState::default());
    assert_eq!(g.peer(PEER).unwrap().highest(), 1);
}

#[test]
fn corrupt_states_are_refused() {
    let mut g = guard();
    admit(&mut g, &hdr(3), NOW).unwrap();
    admit(&mut g, &hdr_from(DeviceId([0x22; 8]), 3, NOW + 1), NOW).unwrap();
    let s = g.state().encode();
    assert_eq!(GuardState::decode(&s).as_ref(), Ok(g.state()));
    for i in 0..s.len() {
        let mut bad = s.clone();
        bad[i] ^= 0x04;
        assert!(GuardState::decode(&bad).is_err(), "byte {i}");
    }
    for n in 0..s.len() {
        assert!(GuardState::decode(&s[..n]).is_err(), "cut at {n}");
    }
    assert_eq!(
        GuardState::decode(&GuardState::default().encode()),
        Ok(GuardState::default())
    );
    let p = g.peer(PEER).unwrap().encode();
    for i in 0..p.len() {
        let mut bad = p.clone();
        bad[i] ^= 0x80;
        assert!(PeerState::decode(&bad).is_err(), "peer byte {i}");
    }
    assert_eq!(
        PeerState::decode(&p[..10]),
        Err(GuardError::Corrupt("peer state length"))
    );
}

#[test]
fn errors_display_their_reason() {
    assert_eq!(
        GuardError::Replay { seq: 9 }.to_string(),
        "replay: sequence number 9 already accepted"
    );
    assert_eq!(
        GuardError::JumpTooFar {
            seq: u64::MAX,
            highest: 1,
            max_jump: 16
        }
        .to_string(),
        "sequence number 18446744073709551615 jumps more than 16 past 1"
    );
    assert_eq!(
        GuardError::Expired { expiry: 1, now: 2 }.to_string(),
        "message expired at 1, now 2"
    );
}

/// A reference model: the set of accepted numbers.
#[derive(Default)]
struct Model {
    accepted: std::collections::BTreeSet<u64>,
}

impl Model {
    fn highest(&self) -> u64 {
        self.accepted.last().copied().unwrap_or(0)
    }
    fn admit(&mut self, seq: u64) -> bool {
        let h = self.highest();
        let ok = seq != 0
            && !self.accepted.contains(&seq)
            && (seq > h || h - seq < WINDOW)
            && (seq <= h || seq - h <= DEFAULT_MAX_JUMP);
        if ok {
            self.accepted.insert(seq);
        }
        ok
    }
}

proptest! {
    #[test]
    fn prop_guard_matches_model(seqs in prop::collection::vec(
        prop_oneof![0u64..400, Just(u64::MAX), (1u64 << 20)..(1u64 << 21)], 1..200)) {
        let mut g = guard();
        let mut model = Model::default();
        for s in seqs {
            let ok = admit(&mut g, &hdr(s), NOW).is_ok();
            prop_assert_eq!(ok, model.admit(s), "seq {}", s);
        }
        let restored = GuardState::decode(&g.state().encode()).unwrap();
        prop_assert_eq!(&restored, g.state());
    }

    #[test]
    fn prop_state_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = GuardState::decode(&bytes);
        let _ = PeerState::decode(&bytes);
    }
}
