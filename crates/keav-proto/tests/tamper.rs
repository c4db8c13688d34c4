//! Active attacks on the handshake: every byte flipped, replays from an earlier session,
//! downgrades. Each must end in a typed error and never in a forged key.

mod util;

use keav_proto::cache::Mode;
use keav_proto::handshake::KeyAgreement;
use keav_proto::msg::{AlgoId, Message};
use keav_proto::Error;
use util::{both_ok, run_session, Device, LinkModel, SessionResult};

const T0: u64 = 1_800_000_000;

fn pair(mode: Mode) -> (Device, Device) {
    (
        Device::new("alice", mode, 1).with_secret(b"code"),
        Device::new("bob", mode, 2).with_secret(b"code"),
    )
}

/// Runs the same session (same seeds, same caches) with one byte of one message flipped.
fn flip_all(mode: Mode, warmup: u64, smp: bool) {
    let (mut a0, mut b0) = pair(mode);
    if smp {
        a0.backends = vec![keav_verify::Backend::Smp];
    }
    for k in 0..warmup {
        both_ok(&run_session(
            &mut a0,
            &mut b0,
            LinkModel::PERFECT,
            1000 + k,
            T0,
            None,
        ));
    }
    let snapshot = |d: &Device| Device {
        name: d.name.clone(),
        zid: d.zid,
        mode: d.mode,
        secret: d.secret.clone(),
        peers: d.peers.clone(),
        lockout: d.lockout,
        allow_repair: d.allow_repair,
        require_keav: d.require_keav,
        backends: d.backends.clone(),
    };
    let (mut a, mut b) = (snapshot(&a0), snapshot(&b0));
    let clean = run_session(&mut a, &mut b, LinkModel::PERFECT, 42, T0, None);
    let key = both_ok(&clean).0.exported_key.clone();
    let clean_ka = both_ok(&clean).0.key_agreement;
    let mut cases = 0;
    for (to_b, msgs) in [(true, &clean.a_to_b), (false, &clean.b_to_a)] {
        for (i, m) in msgs.iter().enumerate() {
            for j in 0..m.len() {
                let (mut a, mut b) = (snapshot(&a0), snapshot(&b0));
                let mut hit = false;
                let mut tamper = |dir: bool, idx: usize, mut bytes: Vec<u8>| {
                    if dir == to_b && idx == i && !hit {
                        hit = true;
                        bytes[j] ^= 0x01;
                    }
                    Some(bytes)
                };
                let r = run_session(
                    &mut a,
                    &mut b,
                    LinkModel::PERFECT,
                    42,
                    T0,
                    Some(&mut tamper),
                );
                check_tampered(&r, &key, clean_ka, to_b, i, j);
                cases += 1;
            }
        }
    }
    assert!(cases > 500, "only {cases} cases");
}

fn check_tampered(
    r: &SessionResult,
    clean_key: &keav_proto::secret::Secret32,
    clean_ka: KeyAgreement,
    to_b: bool,
    i: usize,
    j: usize,
) {
    let ctx = format!("direction a->b={to_b} message {i} byte {j}");
    if let (Ok(a), Ok(b)) = (&r.a, &r.b) {
        // The one tolerated outcome: a damaged preshared key ID makes the responder ask for
        // DH (RFC 6189 Error 0x56), and a fresh, fully authenticated DH exchange follows.
        assert!(
            clean_ka == KeyAgreement::Preshared && a.key_agreement == KeyAgreement::Dh,
            "{ctx}: tampering went unnoticed"
        );
        assert!(a.exported_key == b.exported_key, "{ctx}");
        return;
    }
    for o in [&r.a, &r.b].into_iter().flatten() {
        {
            // Only a side whose whole exchange was authentic may finish (e.g. the responder
            // before a corrupted Conf2ACK); its key is the honest one.
            assert!(&o.exported_key == clean_key, "{ctx}: forged key released");
        }
    }
}

#[test]
fn every_byte_flipped_dh_cpace_first_session() {
    flip_all(Mode::NORMAL, 0, false);
}

#[test]
fn every_byte_flipped_preshared_session() {
    flip_all(Mode::NORMAL, 1, false);
}

#[test]
fn every_byte_flipped_dh_smp_session() {
    flip_all(Mode::Paranoid, 1, true);
}

#[test]
fn messages_replayed_from_an_earlier_session_are_rejected() {
    for (mode, warm) in [(Mode::NORMAL, 0u64), (Mode::NORMAL, 1), (Mode::Paranoid, 1)] {
        let (mut a, mut b) = pair(mode);
        for k in 0..warm {
            both_ok(&run_session(
                &mut a,
                &mut b,
                LinkModel::PERFECT,
                500 + k,
                T0,
                None,
            ));
        }
        let base_a = a.peers.clone();
        let base_b = b.peers.clone();
        let old = run_session(&mut a, &mut b, LinkModel::PERFECT, 1, T0, None);
        both_ok(&old);
        // Same cache state again, new session: replace message i of one direction by the
        // old session's message i.
        for (to_b, old_msgs) in [(true, &old.a_to_b), (false, &old.b_to_a)] {
            for (i, replay) in old_msgs.iter().enumerate() {
                a.peers = base_a.clone();
                b.peers = base_b.clone();
                let replay = replay.clone();
                let mut tamper = |dir: bool, idx: usize, bytes: Vec<u8>| {
                    Some(if dir == to_b && idx == i {
                        replay.clone()
                    } else {
                        bytes
                    })
                };
                let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 2, T0, Some(&mut tamper));
                let is_ack = matches!(
                    Message::parse(&replay),
                    Ok(Message::HelloAck | Message::Conf2Ack)
                );
                if is_ack {
                    // Content-free acknowledgements are identical across sessions.
                    both_ok(&r);
                    continue;
                }
                assert!(
                    r.a.is_err() || r.b.is_err(),
                    "{mode:?}: replay of message {i} (a->b={to_b}) accepted"
                );
                for o in [&r.a, &r.b].into_iter().flatten() {
                    // Only the responder before a replayed Conf2ACK could finish.
                    assert!(o.exported_key != both_ok(&old).0.exported_key);
                }
            }
        }
    }
}

/// Rewrites the algorithm lists of the initiator's Hello (the first message a->b).
fn strip_hello(filter: impl Fn(&AlgoId) -> bool + Copy) -> SessionResult {
    let (mut a, mut b) = pair(Mode::NORMAL);
    let mut tamper = move |dir: bool, idx: usize, bytes: Vec<u8>| {
        if dir && idx == 0 {
            if let Ok(Message::Hello(mut h)) = Message::parse(&bytes) {
                h.sas_types.retain(|x| filter(x));
                h.key_agreements.retain(|x| filter(x));
                return Some(Message::Hello(h).encode());
            }
        }
        Some(bytes)
    };
    run_session(&mut a, &mut b, LinkModel::PERFECT, 3, T0, Some(&mut tamper))
}

#[test]
fn stripping_keav_verification_from_hello_is_a_downgrade() {
    let r = strip_hello(|a| *a != AlgoId::KVCP && *a != AlgoId::KVSM);
    assert!(
        matches!(r.b, Err(Error::Downgrade(_))),
        "{:?}",
        r.b.as_ref().err()
    );
    assert!(r.a.is_err());
}

#[test]
fn stripping_the_verification_request_is_caught_by_the_hello_mac() {
    let r = strip_hello(|a| *a != AlgoId::KVRQ);
    assert!(
        matches!(
            r.b,
            Err(Error::Auth(keav_proto::error::AuthFailure::HelloMac))
        ),
        "{:?}",
        r.b.as_ref().err()
    );
}

#[test]
fn stripping_preshared_from_hello_is_caught_by_the_hello_mac() {
    let r = strip_hello(|a| *a != AlgoId::PRSH);
    assert!(
        matches!(r.b, Err(Error::Auth(_))),
        "{:?}",
        r.b.as_ref().err()
    );
}
